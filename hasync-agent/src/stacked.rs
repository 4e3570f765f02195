//! Devices stacked on a zone interface — VLAN, macvlan, macvtap and ipvlan devices — are in
//! its zone. Their frames cross the zone interface, where the XDP program sees them (a tagged
//! frame comes in on the zone interface's index), but the routing table names the stacked
//! device: a destination routed out of `out0.20`, or a source routed back through it. The
//! datapath's route checks (`hasync_ebpf::route`) look a zone up by that interface, so ZONES
//! binds each stacked device to the zone of the interface it sits on (transitively: a VLAN on a
//! VLAN), unless the config names it itself. Without it, every flow to a host behind a VLAN
//! device had its replies bound to no zone, and the strict policy dropped them.
//!
//! The bindings follow the interface table: [`spawn`] keeps them as devices come and go.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use hasync_common::{maps::ZONE_IFINDEX_LIMIT, ZoneBinding};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{
    datapath::{error_chain, Datapath},
    lock::lock_on_worker,
    netlink::{Ifaces, LinkWatch},
};

/// Devices stacked on stacked devices are followed this deep (QinQ is two).
const MAX_DEPTH: usize = 4;

/// The configured zone interfaces, by name, with their bindings.
pub type ZoneInterfaces = Vec<(String, ZoneBinding)>;

/// The bindings the stacked devices of `ifaces` get from the zone interfaces they sit on:
/// `(index, binding)`, in index order. A virtual wire's end routes nothing: devices on it get
/// none. A device the config names keeps its own. Indexes ZONES cannot hold
/// ([`ZONE_IFINDEX_LIMIT`] and above) are left out: see [`unbindable`].
pub fn bindings(zones: &[(String, ZoneBinding)], ifaces: &Ifaces) -> Vec<(u32, ZoneBinding)> {
    let mut all = stacked_on_zones(zones, ifaces);
    all.retain(|(index, _)| *index < ZONE_IFINDEX_LIMIT);
    all
}

/// The indexes of the stacked devices ZONES cannot hold: they stay in no zone (a route out
/// of one binds replies to no zone).
pub fn unbindable(zones: &[(String, ZoneBinding)], ifaces: &Ifaces) -> Vec<u32> {
    let mut all: Vec<u32> = stacked_on_zones(zones, ifaces)
        .into_iter()
        .map(|(index, _)| index)
        .collect();
    all.retain(|index| *index >= ZONE_IFINDEX_LIMIT);
    all
}

/// Every stacked device's binding, as [`bindings`] says, whatever its index.
fn stacked_on_zones(zones: &[(String, ZoneBinding)], ifaces: &Ifaces) -> Vec<(u32, ZoneBinding)> {
    let configured = |name: &str| zones.iter().any(|(n, _)| n == name);
    let mut bound: BTreeMap<u32, ZoneBinding> = zones
        .iter()
        .filter(|(_, b)| !b.has(ZoneBinding::VWIRE))
        .filter_map(|(name, b)| Some((ifaces.get(name)?.index, *b)))
        .collect();
    let mut stacked = BTreeMap::new();
    for _ in 0..MAX_DEPTH {
        let found: Vec<(u32, ZoneBinding)> = ifaces
            .iter()
            .filter(|(name, i)| !configured(name) && !bound.contains_key(&i.index))
            .filter_map(|(_, i)| Some((i.index, *bound.get(&i.lower?)?)))
            .collect();
        if found.is_empty() {
            break;
        }
        bound.extend(found.iter().copied());
        stacked.extend(found);
    }
    stacked.into_iter().collect()
}

/// Says that stacked device `index` stays in no zone: ZONES cannot hold its index.
pub fn say_unbindable(index: u32) {
    warn!(
        ifindex = index,
        limit = ZONE_IFINDEX_LIMIT,
        "a stacked device's index is too large for the zone map: it stays in no zone"
    );
}

/// The zone interfaces of `names` that sit on another one of them, as `(upper, lower)`: XDP
/// sees the upper one's frames on the lower one first, in the lower one's zone, and then on the
/// upper one in its own, where the strict policy drops them as zone mismatches.
pub fn nested<'a>(names: &'a [String], ifaces: &Ifaces) -> Vec<(&'a str, &'a str)> {
    let index = |name: &str| ifaces.get(name).map(|i| i.index);
    names
        .iter()
        .filter_map(|upper| {
            let lower = ifaces.get(upper)?.lower?;
            let under = names.iter().find(|n| index(n) == Some(lower))?;
            Some((upper.as_str(), under.as_str()))
        })
        .collect()
}

/// Writes `next` into ZONES and unbinds what `applied` had that `next` has not (unless a zone
/// interface has that index now). Returns what is bound now; an index whose write failed is
/// tried again at the next change.
pub fn apply(
    dp: &mut Datapath,
    applied: &[(u32, ZoneBinding)],
    next: &[(u32, ZoneBinding)],
    zone_indexes: &[u32],
) -> Vec<(u32, ZoneBinding)> {
    let mut now = Vec::new();
    for &(index, binding) in next {
        if applied.contains(&(index, binding)) {
            now.push((index, binding));
            continue;
        }
        match dp.set_zone(index, binding) {
            Ok(()) => {
                info!(
                    ifindex = index,
                    zone = binding.zone.0,
                    "stacked device bound to its zone"
                );
                now.push((index, binding));
            }
            Err(e) => {
                warn!(ifindex = index, error = %error_chain(&e), "binding a stacked device to its zone failed")
            }
        }
    }
    let gone = applied.iter().filter(|(index, _)| {
        !next.iter().any(|(i, _)| i == index) && !zone_indexes.contains(index)
    });
    for &(index, binding) in gone {
        match dp.set_zone(index, ZoneBinding::default()) {
            Ok(()) => info!(
                ifindex = index,
                zone = binding.zone.0,
                "stacked device gone from its zone"
            ),
            // Kept in the list, so the next change tries again.
            Err(e) => {
                warn!(ifindex = index, error = %error_chain(&e), "unbinding a stacked device failed");
                now.push((index, binding));
            }
        }
    }
    now
}

/// The indexes the zone interfaces have in `ifaces`.
pub fn zone_indexes(zones: &[(String, ZoneBinding)], ifaces: &Ifaces) -> Vec<u32> {
    zones
        .iter()
        .filter_map(|(name, _)| ifaces.get(name).map(|i| i.index))
        .collect()
}

/// Keeps the stacked devices' bindings current with every change of the interface table.
/// `applied`: what start-up bound.
pub fn spawn(
    dp: Arc<Mutex<Datapath>>,
    zones: ZoneInterfaces,
    mut links: LinkWatch,
    mut applied: Vec<(u32, ZoneBinding)>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut told = Vec::new();
        while let Some(ifaces) = links.changed().await {
            let unbound = unbindable(&zones, &ifaces);
            for &index in unbound.iter().filter(|i| !told.contains(*i)) {
                say_unbindable(index);
            }
            told = unbound;
            let next = bindings(&zones, &ifaces);
            if next == applied {
                continue;
            }
            let indexes = zone_indexes(&zones, &ifaces);
            applied = apply(&mut lock_on_worker(&dp), &applied, &next, &indexes);
        }
    })
}

#[cfg(test)]
mod tests {
    use hasync_common::ZoneId;

    use super::*;
    use crate::netlink::Iface;

    fn iface(index: u32, lower: Option<u32>) -> Iface {
        Iface {
            index,
            up: true,
            mtu: Some(1500),
            mac: None,
            xdp: Default::default(),
            lower,
            carrier_downs: 0,
        }
    }

    fn zones() -> ZoneInterfaces {
        let mut wire = ZoneBinding::new(ZoneId(3));
        wire.flags |= ZoneBinding::VWIRE;
        vec![
            ("in0".into(), ZoneBinding::new(ZoneId(1))),
            ("out0".into(), ZoneBinding::new(ZoneId(2))),
            ("out0.30".into(), ZoneBinding::new(ZoneId(1))),
            ("vw0".into(), wire),
        ]
    }

    #[test]
    fn devices_stacked_on_a_zone_interface_are_in_its_zone() {
        let mut ifaces = Ifaces::new();
        ifaces.insert("in0".into(), iface(2, None));
        ifaces.insert("out0".into(), iface(3, None));
        ifaces.insert("vw0".into(), iface(4, None));
        ifaces.insert("out0.20".into(), iface(10, Some(3)));
        ifaces.insert("out0.20.5".into(), iface(11, Some(10)));
        ifaces.insert("mv0".into(), iface(12, Some(2)));
        // Named by the config: its own zone, and its own stacked devices follow it.
        ifaces.insert("out0.30".into(), iface(13, Some(3)));
        ifaces.insert("out0.30.7".into(), iface(14, Some(13)));
        // On a virtual wire's end, on an interface in no zone, or not stacked at all.
        ifaces.insert("vw0.9".into(), iface(15, Some(4)));
        ifaces.insert("eth9".into(), iface(16, None));
        ifaces.insert("eth9.4".into(), iface(17, Some(16)));
        let zone = |z| ZoneBinding::new(ZoneId(z));
        assert_eq!(
            bindings(&zones(), &ifaces),
            vec![(10, zone(2)), (11, zone(2)), (12, zone(1)), (14, zone(1))]
        );
    }

    #[test]
    fn a_zone_interface_on_another_is_found() {
        let mut ifaces = Ifaces::new();
        ifaces.insert("out0".into(), iface(3, None));
        ifaces.insert("out0.30".into(), iface(13, Some(3)));
        ifaces.insert("out0.40".into(), iface(14, Some(3)));
        let names: Vec<String> = ["out0", "out0.30"].map(String::from).to_vec();
        assert_eq!(nested(&names, &ifaces), [("out0.30", "out0")]);
    }

    #[test]
    fn a_device_whose_index_the_zone_map_cannot_hold_is_left_out() {
        let mut ifaces = Ifaces::new();
        ifaces.insert("out0".into(), iface(3, None));
        ifaces.insert("mv0".into(), iface(10, Some(3)));
        ifaces.insert("mv1".into(), iface(ZONE_IFINDEX_LIMIT, Some(3)));
        let zone = ZoneBinding::new(ZoneId(2));
        assert_eq!(bindings(&zones(), &ifaces), [(10, zone)]);
        assert_eq!(unbindable(&zones(), &ifaces), [ZONE_IFINDEX_LIMIT]);
    }

    #[test]
    fn a_zone_interface_that_is_missing_binds_nothing_on_it() {
        let mut ifaces = Ifaces::new();
        ifaces.insert("out0.20".into(), iface(10, Some(3)));
        assert!(bindings(&zones(), &ifaces).is_empty());
    }
}
