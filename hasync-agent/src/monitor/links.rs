//! Link groups: data interfaces down (no carrier, or set down) or missing, from the netlink
//! link watcher, judged as each change arrives.

use std::sync::{Arc, Mutex};

use tracing::warn;

use super::record;
use crate::{
    cluster::{Condition, Membership},
    config::monitor::LinkGroup,
    netlink::{Ifaces, LinkWatch, NetlinkError},
};

/// Why `group` fails with the interfaces as `ifaces` lists them, if it does.
pub fn link_group_cause(group: &LinkGroup, ifaces: &Ifaces) -> Option<String> {
    let failed: Vec<String> = group
        .interfaces
        .iter()
        .filter_map(|name| match ifaces.get(name) {
            None => Some(format!("{name} missing")),
            Some(i) if !i.up => Some(format!("{name} down")),
            Some(_) => None,
        })
        .collect();
    group
        .failure_condition
        .fails(failed.len(), group.interfaces.len())
        .then(|| failed.join(", "))
}

pub(super) async fn watch_link_groups(
    groups: Vec<LinkGroup>,
    links: Result<LinkWatch, NetlinkError>,
    membership: Arc<Mutex<Membership>>,
) {
    let mut watch = match links {
        Ok(w) => w,
        Err(e) => {
            // Not knowing is not "up": the groups fail, naming why.
            for g in &groups {
                let cause = format!("interface state cannot be watched: {e}");
                record(
                    &membership,
                    Condition::LinkGroup(g.name.clone()),
                    Some(cause),
                );
            }
            return;
        }
    };
    let mut table = watch.now();
    loop {
        if let Some(t) = &table {
            for g in &groups {
                let cause = link_group_cause(g, t);
                record(&membership, Condition::LinkGroup(g.name.clone()), cause);
            }
        }
        table = match watch.changed().await {
            Some(t) => Some(t),
            None => {
                warn!("interface state is no longer watched; link groups keep their last verdict");
                return;
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::monitor::FailureCondition, netlink::Iface};

    #[test]
    fn a_link_group_fails_by_its_condition_naming_the_interfaces() {
        let iface = |index, up| Iface {
            index,
            up,
            mtu: Some(1500),
            mac: None,
            xdp: Default::default(),
            lower: None,
        };
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
}
