//! How a member forwards: `[local] forwarding` (the kernel, or XDP for established sessions in
//! a Layer 3 deployment) and `[[vwire]]` (virtual wires: interface pairs the XDP program
//! bridges, tracking what crosses).
//!
//! Both are the local member's own choices, so they are not among the settings members must
//! agree on; a peer that takes a wire's flows over needs its own wire between the same zones.

use std::collections::{BTreeMap, BTreeSet};

use hasync_common::{Forwarding, ZoneBinding};
use serde::{Deserialize, Serialize};

use super::{check_ifname, Config};

/// `[local] forwarding`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ForwardingName {
    /// The kernel routes every packet (the default).
    #[default]
    Kernel,
    /// XDP forwards established sessions itself; the rest goes to the kernel.
    Xdp,
}

impl ForwardingName {
    /// The datapath's value.
    pub fn datapath(self) -> Forwarding {
        match self {
            ForwardingName::Kernel => Forwarding::Kernel,
            ForwardingName::Xdp => Forwarding::Xdp,
        }
    }
}

/// `[[vwire]]`: two interfaces joined in XDP, with no routing and no MAC rewrite.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Vwire {
    pub name: String,
    /// Exactly two interfaces, each in a zone.
    pub interfaces: Vec<String>,
    /// What becomes of non-IP frames (ARP, LLDP, STP, ...): they cross the wire by default.
    #[serde(default, skip_serializing_if = "is_forward")]
    pub non_ip: NonIp,
}

/// `[[vwire]] non_ip`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NonIp {
    #[default]
    Forward,
    Drop,
}

fn is_forward(v: &NonIp) -> bool {
    *v == NonIp::Forward
}

impl Vwire {
    /// The binding bits of this wire's ends.
    fn flags(&self) -> u8 {
        match self.non_ip {
            NonIp::Forward => ZoneBinding::VWIRE,
            NonIp::Drop => ZoneBinding::VWIRE | ZoneBinding::NON_IP_DROP,
        }
    }

    /// The two ends, when the wire has exactly two.
    pub fn ends(&self) -> Option<(&str, &str)> {
        match self.interfaces.as_slice() {
            [a, b] => Some((a.as_str(), b.as_str())),
            _ => None,
        }
    }
}

impl Config {
    /// The binding bits `ifname` gets from the virtual wire it is an end of (0: none).
    pub fn wire_flags(&self, ifname: &str) -> u8 {
        self.vwire
            .iter()
            .find(|w| w.interfaces.iter().any(|i| i == ifname))
            .map_or(0, Vwire::flags)
    }

    /// Checks that the forwarding maps hold every port the config can ask for: the routed zone
    /// interfaces (with `forwarding = "xdp"`) and the wires' ends. Past that the start failed,
    /// or a port check failed every second once the interfaces existed, and with it every
    /// later port and address change.
    pub(super) fn check_port_counts(&self, p: &mut Vec<String>) {
        let max = hasync_common::maps::PORTS_CAPACITY as usize;
        if self.local.forwarding == ForwardingName::Xdp {
            let routed = self
                .interface_zones()
                .filter(|(_, _, b)| !b.has(ZoneBinding::VWIRE))
                .count();
            if routed > max {
                p.push(format!(
                    "{routed} routed zone interfaces are more than the {max} forwarding in XDP can send to (local.forwarding = \"xdp\")"
                ));
            }
        }
        let ends = self.vwire.len() * 2;
        if ends > max {
            p.push(format!(
                "{} virtual wires are more than the {} the datapath holds",
                self.vwire.len(),
                max / 2
            ));
        }
    }

    /// Checks `[[vwire]]`, pushing one line per problem.
    pub(super) fn check_vwires(&self, p: &mut Vec<String>) {
        let zoned: BTreeSet<&str> = self
            .zones
            .iter()
            .flat_map(|z| z.interfaces.iter().map(String::as_str))
            .collect();
        let mut names = BTreeSet::new();
        let mut wire_of: BTreeMap<&str, &str> = BTreeMap::new();
        for (i, w) in self.vwire.iter().enumerate() {
            let key = format!("vwire[{i}]");
            super::check_name_length(p, &key, &w.name);
            if !names.insert(w.name.as_str()) {
                p.push(format!("{key}.name = \"{}\" is defined twice", w.name));
            }
            match w.ends() {
                None => p.push(format!(
                    "{key}.interfaces has {} interface(s): a virtual wire joins exactly two",
                    w.interfaces.len()
                )),
                Some((a, b)) if a == b => p.push(format!(
                    "{key}.interfaces: \"{a}\" is both ends of the wire"
                )),
                Some(_) => {}
            }
            for ifname in &w.interfaces {
                check_ifname(p, &format!("{key}.interfaces"), ifname);
                if !zoned.contains(ifname.as_str()) {
                    p.push(format!(
                        "{key}.interfaces: \"{ifname}\" is in no zone (a wire's ends are zone interfaces, so the policy applies to what crosses)"
                    ));
                }
                if let Some(other) = wire_of.insert(ifname, &w.name) {
                    if other != w.name {
                        p.push(format!(
                            "interface \"{ifname}\" is in two virtual wires: \"{other}\" and \"{}\"",
                            w.name
                        ));
                    }
                }
            }
        }
    }
}
