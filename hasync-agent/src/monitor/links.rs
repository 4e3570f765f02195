//! Link groups: data interfaces down (no carrier, or set down) or missing, from the netlink
//! link watcher, judged as each change arrives. A carrier loss too short to be seen as a
//! state (the kernel coalesces link events within a second and reported only its end, or two
//! changes came between two reads) is seen by the interface's carrier-down count: the group
//! fails for that moment, and its monitor's hold-down follows.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use tracing::error;

use super::record;
use crate::{
    cluster::{Condition, Membership},
    config::monitor::LinkGroup,
    netlink::{Ifaces, LinkWatch, NetlinkError},
};

/// Why `group` fails with the interfaces as `ifaces` lists them, if it does.
pub fn link_group_cause(group: &LinkGroup, ifaces: &Ifaces) -> Option<String> {
    group_cause(group, ifaces, &BTreeSet::new())
}

/// Why `group` fails with the interfaces as `ifaces` lists them and those in `lost` (up, but
/// their carrier went down since the last look) taken for down, if it does.
fn group_cause(group: &LinkGroup, ifaces: &Ifaces, lost: &BTreeSet<String>) -> Option<String> {
    let failed: Vec<String> = group
        .interfaces
        .iter()
        .filter_map(|name| match ifaces.get(name) {
            None => Some(format!("{name} missing")),
            Some(i) if !i.up => Some(format!("{name} down")),
            Some(_) if lost.contains(name) => Some(format!("{name} lost its carrier for a moment")),
            Some(_) => None,
        })
        .collect();
    group
        .failure_condition
        .fails(failed.len(), group.interfaces.len())
        .then(|| failed.join(", "))
}

/// Each interface's carrier-down count as last seen, with its index (a re-created interface
/// counts anew).
#[derive(Debug, Default)]
struct CarrierCounts(BTreeMap<String, (u32, u32)>);

impl CarrierCounts {
    /// The interfaces of `ifaces` that are up but whose carrier went down since the last look
    /// (a loss seen only by its count); the counts are kept for the next.
    fn lost_since(&mut self, ifaces: &Ifaces) -> BTreeSet<String> {
        let mut lost = BTreeSet::new();
        for (name, i) in ifaces {
            let before = self.0.insert(name.clone(), (i.index, i.carrier_downs));
            let missed =
                before.is_some_and(|(index, downs)| index == i.index && i.carrier_downs > downs);
            if i.up && missed {
                lost.insert(name.clone());
            }
        }
        self.0.retain(|name, _| ifaces.contains_key(name));
        lost
    }
}

/// Records `groups`' verdicts on `table`: a group that fails only by a loss seen in the counts
/// fails and recovers at once (its monitor's hold-down then holds the member down).
fn judge(
    groups: &[LinkGroup],
    table: &Ifaces,
    counts: &mut CarrierCounts,
    membership: &Mutex<Membership>,
) {
    let lost = counts.lost_since(table);
    for g in groups {
        let condition = Condition::LinkGroup(g.name.clone());
        let cause = link_group_cause(g, table);
        if cause.is_none() && !lost.is_empty() {
            if let Some(brief) = group_cause(g, table, &lost) {
                record(membership, condition.clone(), Some(brief));
            }
        }
        record(membership, condition, cause);
    }
}

/// Not knowing is not "up": with no interface watcher, the groups fail, naming why.
pub(super) fn fail_unwatched_groups(
    groups: &[LinkGroup],
    e: &NetlinkError,
    membership: &Mutex<Membership>,
) {
    for g in groups {
        let cause = format!("interface state cannot be watched: {e}");
        record(
            membership,
            Condition::LinkGroup(g.name.clone()),
            Some(cause),
        );
    }
}

/// Judges the groups at every change of the interface table; returns only when the
/// interface watcher is gone (it panicked), which ends the agent ([`crate::tasks`]): a
/// verdict kept from then on would be stale.
pub(super) async fn watch_link_groups(
    groups: Vec<LinkGroup>,
    mut watch: LinkWatch,
    membership: Arc<Mutex<Membership>>,
) {
    let mut table = watch.now();
    let mut counts = CarrierCounts::default();
    loop {
        if let Some(t) = &table {
            judge(&groups, t, &mut counts, &membership);
        }
        let Some(next) = watch.changed().await else {
            error!("interface state is no longer watched: the link groups cannot be judged");
            return;
        };
        table = Some(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::monitor::FailureCondition, netlink::Iface};

    /// An interface at `index`, `up` or not, its carrier down `carrier_downs` times.
    fn iface_at(index: u32, up: bool, carrier_downs: u32) -> Iface {
        Iface {
            index,
            up,
            mtu: Some(1500),
            mac: None,
            xdp: Default::default(),
            lower: None,
            carrier_downs,
        }
    }

    #[test]
    fn a_link_group_fails_by_its_condition_naming_the_interfaces() {
        let iface = |index, up| iface_at(index, up, 0);
        let mut ifaces = Ifaces::new();
        ifaces.insert("in0".into(), iface(2, true));
        ifaces.insert("out0".into(), iface(3, false));
        let mut g = LinkGroup {
            name: "data".into(),
            failure_condition: FailureCondition::Any,
            interfaces: vec!["in0".into(), "out0".into(), "out1".into()],
        };
        assert_eq!(
            link_group_cause(&g, &ifaces).as_deref(),
            Some("out0 down, out1 missing")
        );
        g.failure_condition = FailureCondition::All;
        assert_eq!(link_group_cause(&g, &ifaces), None, "in0 is up");
        ifaces.insert("in0".into(), iface(2, false));
        assert_eq!(
            link_group_cause(&g, &ifaces).as_deref(),
            Some("in0 down, out0 down, out1 missing")
        );
    }

    /// A carrier loss seen only by the interface's count (the kernel reported its end only)
    /// fails the group for that moment: the failure is recorded and recovers at once, so the
    /// monitor's hold-down holds the member down. An interface made anew (another index, its
    /// count from zero) and one whose loss was seen as a state count nothing more.
    #[test]
    fn a_carrier_loss_seen_only_by_its_count_fails_the_group_for_a_moment() {
        use std::time::Instant;

        use crate::cluster::MemberState;
        let iface = iface_at;
        let table = |i: Iface| Ifaces::from([("out0".to_string(), i)]);
        let t0 = Instant::now();
        let m = Mutex::new(super::super::tests::lone_member(t0));
        assert_eq!(
            crate::lock::lock(&m).evaluate(t0).local_state,
            Some(MemberState::Active)
        );
        let groups = [LinkGroup {
            name: "uplink".into(),
            failure_condition: FailureCondition::Any,
            interfaces: vec!["out0".into()],
        }];
        let mut counts = CarrierCounts::default();
        let held = |m: &Mutex<Membership>| crate::lock::lock(m).hold_down_until().is_some();
        judge(&groups, &table(iface(3, true, 2)), &mut counts, &m);
        judge(&groups, &table(iface(3, true, 2)), &mut counts, &m);
        assert!(!held(&m), "no loss yet");
        judge(&groups, &table(iface(3, true, 3)), &mut counts, &m);
        assert!(held(&m), "the loss the count shows");
        assert_eq!(
            crate::lock::lock(&m).faults().count(),
            0,
            "recovered at once"
        );
        let state = crate::lock::lock(&m).evaluate(t0).local_state;
        assert_eq!(state, Some(MemberState::NonFunctional));

        // Step by step: a loss seen as a state, an interface made anew (its count from zero,
        // or higher than the old one's), a count gone back: none is a loss seen only by its
        // count; a count that grows while up is one.
        let mut counts = CarrierCounts::default();
        let steps = [
            (iface(3, true, 3), false),
            (iface(3, false, 4), false),
            (iface(3, true, 4), false),
            (iface(9, true, 0), false),
            (iface(9, true, 1), true),
            (iface(11, true, 5), false),
            (iface(11, true, 2), false),
            (iface(11, true, 2), false),
        ];
        for (i, (seen, lost)) in steps.into_iter().enumerate() {
            let found = counts.lost_since(&table(seen));
            assert_eq!(!found.is_empty(), lost, "step {i}: {found:?}");
        }
    }
}
