//! The `hasync` command line.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hasync_common::{maps::DEFAULT_SESSION_CAPACITY, MemberId, Policy, ZoneId};

use crate::datapath::{check_interface_name, MAX_SESSION_CAPACITY};

#[derive(Debug, Parser)]
#[command(
    name = "hasync",
    version,
    about = "Session-sync agent for an XDP stateful datapath"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the datapath, attach it to the data interfaces and run until SIGINT/SIGTERM.
    Agent(AgentArgs),
    /// Run a whole cluster in network namespaces on this host, with traffic through it (root).
    Lab(crate::lab::LabArgs),
    /// Show the running agent's cluster, sessions, statistics or counters.
    Show(crate::control::command::ShowArgs),
    /// Suspend this member: the members that see its sessions' traffic take them over; it
    /// stays suspended until `hasync functional`.
    Suspend(crate::control::command::ConnectArgs),
    /// End a suspension: the member holds as tentative, then becomes active.
    Functional(crate::control::command::ConnectArgs),
    /// Write every member's config, the cluster key and the sync interfaces' setup commands
    /// from one cluster description.
    Provision(crate::provision::ProvisionArgs),
    /// Check config files, or show what two members' configs disagree on.
    Config(crate::provision::diff::ConfigArgs),
    /// Remove the datapath a stopped agent left pinned: detach XDP, drop the session table.
    Teardown(crate::service::TeardownArgs),
    /// Install as a systemd service: the binary, the unit, an example config and a new cluster
    /// key (an existing config or key is never overwritten).
    Install(crate::service::InstallArgs),
    /// Remove the binary and the unit `install` put in place; the config and the key stay.
    Uninstall(crate::service::InstallArgs),
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Run as a cluster member from this configuration file (zones, sync links, members).
    /// Without it, the agent runs standalone on the interfaces given with `--interface`.
    #[arg(long, value_name = "FILE", conflicts_with = "interfaces")]
    pub config: Option<std::path::PathBuf>,

    /// A data interface to attach to, optionally in a zone (`eth0=lan`). Repeat for more.
    /// Zone names get ids 1, 2, ... in order of first appearance.
    #[arg(long = "interface", value_name = "IF[=ZONE]", required_unless_present = "config", value_parser = parse_interface)]
    pub interfaces: Vec<InterfaceArg>,

    /// This member's id in the cluster, 1–16.
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_member)]
    pub member: MemberId,

    /// What to do with a TCP segment that is not a SYN and has no session.
    #[arg(long, value_enum, default_value_t = PolicyArg::Strict)]
    pub policy: PolicyArg,

    /// Capacity of the session table (LRU: the least recently used session goes when full).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SESSION_CAPACITY, value_parser = parse_capacity)]
    pub session_capacity: u32,

    /// Interval of the expiry sweep, in milliseconds (100–600000).
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = parse_sweep_interval)]
    pub sweep_interval_ms: u64,
}

/// `IF[=ZONE]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceArg {
    pub name: String,
    pub zone: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PolicyArg {
    /// Drop it, as a stateful firewall does.
    Strict,
    /// Pass it, counted, without creating a session.
    Loose,
}

impl From<PolicyArg> for Policy {
    fn from(p: PolicyArg) -> Policy {
        match p {
            PolicyArg::Strict => Policy::Strict,
            PolicyArg::Loose => Policy::Loose,
        }
    }
}

/// Longest zone name.
pub const MAX_ZONE_NAME: usize = 32;

fn parse_interface(s: &str) -> Result<InterfaceArg, String> {
    let (name, zone) = match s.split_once('=') {
        Some((name, zone)) => (name, Some(zone)),
        None => (s, None),
    };
    check_interface_name(name).map_err(|e| match zone {
        Some(_) => format!("in `{s}`: {e}"),
        None => e.to_string(),
    })?;
    if let Some(zone) = zone {
        if zone.is_empty() {
            return Err(format!("in `{s}`: the zone name after `=` is empty"));
        }
        if zone.len() > MAX_ZONE_NAME
            || !zone
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "in `{s}`: zone name `{zone}` must be 1–{MAX_ZONE_NAME} of A–Z, a–z, 0–9, `-`, `_`"
            ));
        }
    }
    Ok(InterfaceArg {
        name: name.to_owned(),
        zone: zone.map(str::to_owned),
    })
}

fn parse_member(s: &str) -> Result<MemberId, String> {
    let range = || format!("{}–{}", 1, MemberId::MAX);
    let n: u64 = s
        .parse()
        .map_err(|_| format!("member id `{s}` is not a number in {}", range()))?;
    match u8::try_from(n).map(MemberId) {
        Ok(m) if m.is_valid() => Ok(m),
        _ => Err(format!("member id {n} is out of range {}", range())),
    }
}

fn parse_capacity(s: &str) -> Result<u32, String> {
    let range = format!("1–{MAX_SESSION_CAPACITY}");
    let n: u64 = s
        .parse()
        .map_err(|_| format!("session capacity `{s}` is not a number in {range}"))?;
    match u32::try_from(n) {
        Ok(n) if (1..=MAX_SESSION_CAPACITY).contains(&n) => Ok(n),
        _ => Err(format!("session capacity {n} is out of range {range}")),
    }
}

/// Accepted sweep intervals, in milliseconds.
pub const SWEEP_INTERVAL_MS: std::ops::RangeInclusive<u64> = 100..=600_000;

fn parse_sweep_interval(s: &str) -> Result<u64, String> {
    let range = format!(
        "{}–{} ms",
        SWEEP_INTERVAL_MS.start(),
        SWEEP_INTERVAL_MS.end()
    );
    let n: u64 = s
        .parse()
        .map_err(|_| format!("sweep interval `{s}` is not a number in {range}"))?;
    if !SWEEP_INTERVAL_MS.contains(&n) {
        return Err(format!("sweep interval {n} ms is out of range {range}"));
    }
    Ok(n)
}

/// An interface to attach, with its zone id (`ZoneId::NONE` without a zone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub interface: String,
    pub zone: ZoneId,
}

/// Zone names and ids, and each interface's zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZonePlan {
    /// Zone names with their ids, in id order (1, 2, ...).
    pub zones: Vec<(String, ZoneId)>,
    /// The interfaces in command-line order.
    pub bindings: Vec<Binding>,
}

impl AgentArgs {
    /// Numbers the zones in order of first appearance and checks no interface is given twice.
    pub fn zone_plan(&self) -> Result<ZonePlan, String> {
        let mut zones: Vec<(String, ZoneId)> = Vec::new();
        let mut bindings: Vec<Binding> = Vec::new();
        for InterfaceArg { name, zone } in &self.interfaces {
            if bindings.iter().any(|b| &b.interface == name) {
                return Err(format!("interface `{name}` is given twice"));
            }
            let zone = match zone {
                None => ZoneId::NONE,
                Some(zone) => match zones.iter().find(|(z, _)| z == zone) {
                    Some((_, id)) => *id,
                    None => {
                        // At most one zone per interface, and --interface values are few.
                        let id = u16::try_from(zones.len() + 1)
                            .map_err(|_| format!("more than {} zones", u16::MAX))?;
                        zones.push((zone.clone(), ZoneId(id)));
                        ZoneId(id)
                    }
                },
            };
            bindings.push(Binding {
                interface: name.clone(),
                zone,
            });
        }
        Ok(ZonePlan { zones, bindings })
    }

    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.sweep_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;

    use super::*;

    fn agent(args: &[&str]) -> Result<AgentArgs, clap::Error> {
        let argv = ["hasync", "agent"].iter().chain(args).copied();
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Agent(a) => a,
            other => panic!("parsed as another command: {other:?}"),
        })
    }

    fn error(args: &[&str]) -> String {
        agent(args).expect_err("should be refused").to_string()
    }

    #[test]
    fn defaults() {
        let a = agent(&["--interface", "veth0"]).expect("parse");
        assert_eq!(
            a.interfaces,
            [InterfaceArg {
                name: "veth0".into(),
                zone: None
            }]
        );
        assert_eq!(a.member, MemberId(1));
        assert_eq!(a.policy, PolicyArg::Strict);
        assert_eq!(a.session_capacity, DEFAULT_SESSION_CAPACITY);
        assert_eq!(a.sweep_interval(), Duration::from_secs(1));
    }

    #[test]
    fn zones_are_numbered_in_order_of_first_appearance() {
        let a = agent(&[
            "--interface=wan0=untrust",
            "--interface",
            "lan0=trust",
            "--interface",
            "mgmt0",
            "--interface",
            "wan1=untrust",
            "--member",
            "16",
            "--policy",
            "loose",
        ])
        .expect("parse");
        assert_eq!(a.member, MemberId(16));
        assert_eq!(a.policy, PolicyArg::Loose);
        let plan = a.zone_plan().expect("plan");
        assert_eq!(
            plan.zones,
            [("untrust".into(), ZoneId(1)), ("trust".into(), ZoneId(2))]
        );
        let b: Vec<_> = plan
            .bindings
            .iter()
            .map(|b| (b.interface.as_str(), b.zone.0))
            .collect();
        assert_eq!(b, [("wan0", 1), ("lan0", 2), ("mgmt0", 0), ("wan1", 1)]);
    }

    #[test]
    fn bad_values_are_refused_naming_the_value_and_the_range() {
        for (args, want) in [
            (
                &["--interface", ""][..],
                "interface name \"\" is invalid: it is empty",
            ),
            (
                &["--interface", "=lan"],
                "in `=lan`: interface name \"\" is invalid: it is empty",
            ),
            (
                &["--interface", "eth0="],
                "in `eth0=`: the zone name after `=` is empty",
            ),
            (&["--interface", "eth0=a b"], "zone name `a b` must be 1–32"),
            (
                &["--interface", "a-very-long-interface"],
                "longer than 15 bytes",
            ),
            (
                &["--interface", "e0", "--member", "0"],
                "member id 0 is out of range 1–16",
            ),
            (
                &["--interface", "e0", "--member", "17"],
                "member id 17 is out of range 1–16",
            ),
            (
                &["--interface", "e0", "--member", "x"],
                "member id `x` is not a number in 1–16",
            ),
            (
                &["--interface", "e0", "--session-capacity", "0"],
                "session capacity 0 is out of range 1–67108864",
            ),
            (
                &["--interface", "e0", "--sweep-interval-ms", "5"],
                "sweep interval 5 ms is out of range 100–600000 ms",
            ),
            (
                &["--interface", "e0", "--policy", "lax"],
                "invalid value 'lax'",
            ),
        ] {
            let msg = error(args);
            assert!(msg.contains(want), "{args:?}: {msg}");
        }
        let e = agent(&[]).expect_err("--interface is required");
        assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn an_interface_given_twice_is_refused() {
        let a = agent(&["--interface", "e0=lan", "--interface", "e0=wan"]).expect("parse");
        assert_eq!(
            a.zone_plan().expect_err("twice"),
            "interface `e0` is given twice"
        );
    }
}
