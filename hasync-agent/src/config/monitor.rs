//! `[monitor]`: the failure conditions a member watches besides its datapath. A failed link
//! group (data interfaces down or gone) or path group (ping targets unanswered) makes the member
//! Non-functional, so peers take its sessions over; after it recovers, the member stays down
//! for the monitor fail hold-down time, then goes Tentative, then Active.
//!
//! Groups are the local member's own (its interfaces and next hops), so they are not among the
//! settings members must agree on.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

use super::check_ifname;

/// `[monitor]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Monitor {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub link_groups: Vec<LinkGroup>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_groups: Vec<PathGroup>,
}

/// When a group fails: as soon as one of its members fails, or only when all of them have.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FailureCondition {
    #[default]
    Any,
    All,
}

impl FailureCondition {
    /// Does a group fail with `failed` of its `total` members failed?
    pub fn fails(self, failed: usize, total: usize) -> bool {
        match self {
            FailureCondition::Any => failed > 0,
            FailureCondition::All => total > 0 && failed == total,
        }
    }
}

/// `[[monitor.link_groups]]`: data interfaces that must be up (operationally: carrier too).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LinkGroup {
    pub name: String,
    #[serde(default)]
    pub failure_condition: FailureCondition,
    pub interfaces: Vec<String>,
}

/// `[[monitor.path_groups]]`: addresses the agent pings (ICMP or ICMPv6 echo) that must answer.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PathGroup {
    pub name: String,
    #[serde(default)]
    pub failure_condition: FailureCondition,
    pub targets: Vec<IpAddr>,
    /// Time between two echoes to a target.
    #[serde(default = "defaults::interval_ms")]
    pub interval_ms: u64,
    /// Consecutive unanswered echoes that fail a target; one answer restores it.
    #[serde(default = "defaults::failures")]
    pub failures: u32,
}

impl PathGroup {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
}

mod defaults {
    pub fn interval_ms() -> u64 {
        200
    }
    pub fn failures() -> u32 {
        10
    }
}

/// Ranges, named once so messages and checks agree.
pub(super) mod range {
    pub const INTERVAL_MS: (u64, u64) = (50, 60_000);
    pub const FAILURES: (u64, u64) = (1, 100);
    /// Members of one group, and groups of one kind.
    pub const MAX_ITEMS: usize = 16;
}

impl Monitor {
    /// Every group's name, key and value problems, into `p`.
    pub fn check(&self, p: &mut Vec<String>) {
        let mut names = BTreeSet::new();
        for (i, g) in self.link_groups.iter().enumerate() {
            let key = format!("monitor.link_groups[{i}]");
            check_group(p, &key, &g.name, g.interfaces.len(), &mut names);
            let mut seen = BTreeSet::new();
            for ifname in &g.interfaces {
                check_ifname(p, &format!("{key}.interfaces"), ifname);
                if !seen.insert(ifname) {
                    p.push(format!("{key}.interfaces lists \"{ifname}\" twice"));
                }
            }
        }
        for (i, g) in self.path_groups.iter().enumerate() {
            let key = format!("monitor.path_groups[{i}]");
            check_group(p, &key, &g.name, g.targets.len(), &mut names);
            let mut seen = BTreeSet::new();
            for target in &g.targets {
                if let Some(why) = super::not_unicast_elsewhere(*target) {
                    p.push(format!(
                        "{key}.targets: {target} cannot test a path: it is {why}"
                    ));
                }
                if !seen.insert(target) {
                    p.push(format!("{key}.targets lists {target} twice"));
                }
            }
            super::check_range(
                p,
                &format!("{key}.interval_ms"),
                g.interval_ms,
                range::INTERVAL_MS,
            );
            super::check_range(
                p,
                &format!("{key}.failures"),
                u64::from(g.failures),
                range::FAILURES,
            );
        }
        for (kind, n) in [
            ("link_groups", self.link_groups.len()),
            ("path_groups", self.path_groups.len()),
        ] {
            if n > range::MAX_ITEMS {
                p.push(format!(
                    "{n} monitor.{kind} is more than the maximum of {}",
                    range::MAX_ITEMS
                ));
            }
        }
    }
}

/// A group's name (unique across link and path groups) and size.
fn check_group<'a>(
    p: &mut Vec<String>,
    key: &str,
    name: &'a str,
    members: usize,
    names: &mut BTreeSet<&'a str>,
) {
    if super::check_name_length(p, key, name) && !names.insert(name) {
        p.push(format!(
            "{key}.name = \"{name}\" is used by two monitor groups"
        ));
    }
    if members == 0 {
        p.push(format!("{key} \"{name}\" monitors nothing (empty list)"));
    }
    if members > range::MAX_ITEMS {
        p.push(format!(
            "{key} \"{name}\" has {members} entries, more than the maximum of {}",
            range::MAX_ITEMS
        ));
    }
}
