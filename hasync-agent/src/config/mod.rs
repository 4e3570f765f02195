//! Configuration: the TOML file every member runs with, and its validation.
//!
//! Parsing ([`Config::from_toml`]) and checking ([`Config::validate`]) are separate so
//! `hasync config check` reports every problem at once, each naming the key, the value and what
//! is allowed.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    os::unix::fs::{MetadataExt as _, PermissionsExt},
    path::{Path, PathBuf},
};

use hasync_common::{
    maps::EMBRYONIC_SHARE, ClusterId, DatapathConfig, MalformedAction, MemberId, OtherProtocols,
    Policy, State, ZoneBinding, ZoneId, STATE_COUNT,
};
use serde::{Deserialize, Serialize};

pub mod forwarding;
pub mod ids;
pub mod monitor;
pub use forwarding::{ForwardingName, Vwire};
pub use monitor::Monitor;

/// Default path of the configuration file.
pub const DEFAULT_PATH: &str = "/etc/hasync/hasync.toml";
/// Default TCP port of the sync links.
pub const DEFAULT_SYNC_PORT: u16 = 7471;
/// Minimum length of the cluster key file, in bytes.
pub const MIN_KEY_BYTES: usize = 32;
/// Default address of the metrics and dashboard HTTP server: loopback only.
pub const DEFAULT_HTTP: &str = "127.0.0.1:9471";
/// Where the agent keeps its state (`[local] state_dir`): the unit's `StateDirectory`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/hasync";

/// Errors of the config module.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path} has {} problem(s):\n{}", problems.len(), Problems(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

struct Problems<'a>(&'a [String]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {p}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub cluster: Cluster,
    pub local: Local,
    pub ha4: Link,
    #[serde(default)]
    pub ha4_backup: Option<Link>,
    #[serde(default)]
    pub zones: Vec<Zone>,
    #[serde(default)]
    pub members: Vec<Member>,
    /// Idle timeouts per session state, in seconds, by state name (`established = 3600`).
    #[serde(default)]
    pub timeouts: BTreeMap<String, u64>,
    /// Link and path monitoring.
    #[serde(default, skip_serializing_if = "is_default")]
    pub monitor: Monitor,
    /// Virtual wires.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vwire: Vec<Vwire>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    #[serde(with = "ids::cluster_id")]
    pub id: ClusterId,
    #[serde(default)]
    pub description: String,
    pub key_file: PathBuf,
    #[serde(default = "defaults::keepalive_threshold_ms")]
    pub keepalive_threshold_ms: u64,
    #[serde(default)]
    pub sync_timeout_min: u64,
    #[serde(default = "defaults::monitor_fail_hold_down_min")]
    pub monitor_fail_hold_down_min: u64,
    /// The monitor fail hold-down in seconds instead of minutes, for labs and tests; takes
    /// the place of `monitor_fail_hold_down_min` when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor_fail_hold_down_s: Option<u64>,
    #[serde(default = "defaults::tentative_hold_s")]
    pub tentative_hold_s: u64,
    /// TCP port the sync links listen on.
    #[serde(default = "defaults::sync_port")]
    pub sync_port: u16,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PolicyName {
    #[default]
    Strict,
    Loose,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum MalformedName {
    #[default]
    Drop,
    Pass,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Local {
    #[serde(with = "ids::member_id")]
    pub member: MemberId,
    #[serde(default = "defaults::control_socket")]
    pub control_socket: PathBuf,
    /// A group whose members may use the control socket read-only (`show`; `suspend` and
    /// `functional` stay root's and the agent's user's): the socket is given to it. Default:
    /// none (the socket stays the agent's group's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_group: Option<String>,
    #[serde(default = "defaults::traffic_log")]
    pub traffic_log: PathBuf,
    /// Directory of what the agent keeps across restarts: `hasync suspend`'s mark (see
    /// [`crate::suspend_mark`]). Default `/var/lib/hasync` (the unit's `StateDirectory`).
    #[serde(default = "defaults::state_dir")]
    pub state_dir: PathBuf,
    /// Directory on bpffs where the datapath's maps and XDP links are pinned, so they outlive
    /// the agent: a restart or an upgrade keeps the sessions and the traffic (`hasync teardown`
    /// removes them). Empty: nothing is pinned and the datapath goes away with the agent.
    #[serde(default = "defaults::pin_dir")]
    pub pin_dir: PathBuf,
    #[serde(default)]
    pub policy: PolicyName,
    /// What to do with truncated or malformed frames.
    #[serde(default)]
    pub malformed: MalformedName,
    /// Capacity of the session table.
    #[serde(default = "defaults::session_capacity")]
    pub session_capacity: u32,
    /// Embryonic sessions (not assured yet: a TCP handshake not completed, a UDP flow not yet
    /// a stream, any ICMP echo) of this member's the table holds at most; past this, each new
    /// one evicts the oldest, and assured sessions are never evicted. Each other member's
    /// embryonic sessions get as many again here (apart, so one member's flood evicts only its
    /// own), so all members' together take at most half of `session_capacity`. Default: one
    /// eighth of `session_capacity`, less in clusters of more than 4 members (see
    /// [`Config::embryonic_capacity`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embryonic_capacity: Option<u32>,
    /// Assured sessions that peers' records may hold in this member's table, all peers
    /// together; past it, records that would add one are refused (`replicas-over-limit`), so
    /// what peers send never takes the room this member's own flows need. 1 to
    /// `session_capacity`; default three quarters of it, or in a cluster of n > 4 members the
    /// others' (n−1)/n.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_limit: Option<u32>,
    /// Address of the HTTP server for `/metrics` and the dashboard (`127.0.0.1:9471`);
    /// empty disables it.
    #[serde(default = "defaults::http")]
    pub http: String,
    /// Who forwards established sessions: the kernel (default) or XDP.
    #[serde(default, skip_serializing_if = "is_default")]
    pub forwarding: ForwardingName,
    /// The least severe datapath event the XDP programs log: `off`, `error`, `warn` (default:
    /// sessions of ours replaced by a peer's newer version), `info` (also sessions taken over)
    /// or `debug` (also malformed frames, sampled).
    #[serde(default, skip_serializing_if = "is_default")]
    pub datapath_log: crate::datapath::DatapathLog,
    /// Flaps (falls from Active to Non-functional, counted until the member stays Active a
    /// monitor hold-down time) at which the member suspends itself, if another member is
    /// Active to take its traffic, until `hasync functional` or until no other member is in
    /// service; 0 (default): no limit.
    #[serde(default, skip_serializing_if = "is_default")]
    pub max_flaps: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub interface: String,
    /// Address with prefix length, e.g. `198.18.100.1/24` or `fd00:100::1/64`.
    pub address: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Zone {
    pub name: String,
    pub interfaces: Vec<String>,
    /// What packets of IP protocols the datapath does not track (GRE, ESP, SCTP, ...), and
    /// ICMP types it does not (neither queries, errors nor link-scope messages), that come in
    /// on this zone's interfaces get: `drop` or `pass`, counted either way. Default:
    /// as `[local] policy` says (strict drops, loose passes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_protocols: Option<OtherProtocolsName>,
    /// Whether a flow's first packet that comes in on this zone is checked against the
    /// routing table (default `true`): its replies are bound to the zone its destination is
    /// routed to, and it makes no session when its source is not routed back into this zone
    /// or its destination is routed back out of the interface it came in on. `false`: replies
    /// are bound to the zone of the first reply, nothing checked (routing asymmetric across
    /// zones, policy routing by firewall mark, VLAN devices on the zone's interfaces, hosts of
    /// two subnets on one link).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_check: Option<bool>,
}

/// `[[zones]] other_protocols`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OtherProtocolsName {
    Drop,
    Pass,
}

impl Zone {
    /// The datapath's binding of this zone's interfaces, `id` being the zone's id.
    pub fn binding(&self, id: ZoneId) -> ZoneBinding {
        let other = match self.other_protocols {
            None => OtherProtocols::ByPolicy,
            Some(OtherProtocolsName::Drop) => OtherProtocols::Drop,
            Some(OtherProtocolsName::Pass) => OtherProtocols::Pass,
        };
        let flags = match self.route_check {
            Some(false) => ZoneBinding::NO_ROUTE_CHECK,
            None | Some(true) => 0,
        };
        ZoneBinding {
            other_protocols: other as u8,
            flags,
            ..ZoneBinding::new(id)
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Member {
    #[serde(with = "ids::member_id")]
    pub id: MemberId,
    pub serial: String,
    pub ha4: IpAddr,
    #[serde(default)]
    pub ha4_backup: Option<IpAddr>,
    #[serde(default = "defaults::yes")]
    pub session_sync: bool,
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    #[serde(default)]
    pub description: String,
}

mod defaults {
    use std::path::PathBuf;

    pub fn keepalive_threshold_ms() -> u64 {
        10_000
    }
    pub fn monitor_fail_hold_down_min() -> u64 {
        1
    }
    pub fn tentative_hold_s() -> u64 {
        60
    }
    pub fn sync_port() -> u16 {
        super::DEFAULT_SYNC_PORT
    }
    pub fn control_socket() -> PathBuf {
        "/run/hasync/hasync.sock".into()
    }
    pub fn traffic_log() -> PathBuf {
        "/var/log/hasync/traffic.jsonl".into()
    }
    pub fn pin_dir() -> PathBuf {
        crate::datapath::DEFAULT_PIN_DIR.into()
    }
    pub fn state_dir() -> PathBuf {
        super::DEFAULT_STATE_DIR.into()
    }
    pub fn session_capacity() -> u32 {
        hasync_common::maps::DEFAULT_SESSION_CAPACITY
    }
    pub fn http() -> String {
        super::DEFAULT_HTTP.into()
    }
    pub fn yes() -> bool {
        true
    }
}

/// Ranges, named once so messages and checks agree.
pub(crate) mod range {
    use hasync_common::{ClusterId, MemberId};

    pub const CLUSTER_ID: (u64, u64) = (ClusterId::MIN as u64, ClusterId::MAX as u64);
    pub const MEMBER_ID: (u64, u64) = (1, MemberId::MAX as u64);
    pub const KEEPALIVE_MS: (u64, u64) = (5_000, 60_000);
    pub const SYNC_TIMEOUT_MIN: (u64, u64) = (0, 30);
    pub const HOLD_DOWN_MIN: (u64, u64) = (1, 60);
    pub const HOLD_DOWN_S: (u64, u64) = (1, 3600);
    pub const TENTATIVE_S: (u64, u64) = (10, 600);
    pub const MAX_FLAPS: (u64, u64) = (0, 16);
    pub const MAX_MEMBERS: usize = 16;
    pub const SESSION_CAPACITY: (u64, u64) = (1, crate::datapath::MAX_SESSION_CAPACITY as u64);
    pub const TIMEOUT_S: (u64, u64) = (1, 30 * 24 * 3600);
}

fn check_range(problems: &mut Vec<String>, key: &str, value: u64, (lo, hi): (u64, u64)) {
    if value < lo || value > hi {
        problems.push(format!("{key} = {value} is out of range {lo}–{hi}"));
    }
}

/// Splits `addr/prefix` and checks it.
pub fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let (addr, prefix) = text.split_once('/').ok_or_else(|| {
        format!("\"{text}\" has no prefix length (expected e.g. 198.18.100.1/24)")
    })?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("\"{addr}\" is not an IP address"))?;
    let prefix: u8 = prefix
        .parse()
        .map_err(|_| format!("prefix length \"{prefix}\" is not a number"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(format!("prefix length {prefix} is out of range 0–{max}"));
    }
    Ok((addr, prefix))
}

/// [`Config::initial_sync_limit`] when `sync_timeout_min = 0`: a full sync of the largest
/// table takes seconds on a working link (a million sessions in about 1.2 s in `bench sync`).
pub const DEFAULT_INITIAL_SYNC_LIMIT: std::time::Duration = std::time::Duration::from_secs(5 * 60);

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Config::from_toml(path, &text)?;
        config.validate(path)?;
        Ok(config)
    }

    /// Parses without validating.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Checks every rule, reporting all problems at once. `path` only names the file.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        self.cluster.check(&mut p);
        self.check_local(&mut p);
        self.check_sync_links(&mut p);
        self.check_zones(&mut p);
        self.check_members(&mut p);
        self.check_local_member(&mut p);
        self.check_timeouts(&mut p);
        self.monitor.check(&mut p);
        self.check_vwires(&mut p);
        self.check_port_counts(&mut p);

        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems: p,
            })
        }
    }

    /// `[local]`: the member id, the table's capacities, the pin directory, the HTTP address.
    fn check_local(&self, p: &mut Vec<String>) {
        let l = &self.local;
        check_range(p, "local.member", u64::from(l.member.0), range::MEMBER_ID);
        check_range(
            p,
            "local.session_capacity",
            u64::from(l.session_capacity),
            range::SESSION_CAPACITY,
        );
        if let Some(e) = l.embryonic_capacity {
            // As many again are kept for each other member's embryonic sessions.
            let most = self.embryonic_capacity_max();
            if most == 0 {
                let parts = self.replica_parts().max(1);
                p.push(format!(
                    "local.embryonic_capacity = {e} does not fit: local.session_capacity = {} leaves no room for embryonic sessions (each member id up to {parts} gets at most session_capacity / 2 / {parts})",
                    l.session_capacity,
                ));
            } else {
                check_range(
                    p,
                    "local.embryonic_capacity",
                    u64::from(e),
                    (1, u64::from(most)),
                );
            }
        }
        if let Some(r) = l.replica_limit {
            let most = u64::from(l.session_capacity);
            check_range(p, "local.replica_limit", u64::from(r), (1, most));
        }
        check_range(
            p,
            "local.max_flaps",
            u64::from(l.max_flaps),
            range::MAX_FLAPS,
        );
        check_pin_dir(p, &l.pin_dir);
        for (key, path) in [
            ("local.control_socket", &l.control_socket),
            ("local.traffic_log", &l.traffic_log),
            ("local.state_dir", &l.state_dir),
        ] {
            if !path.is_absolute() {
                p.push(format!(
                    "{key} = \"{}\" must be an absolute path",
                    path.display()
                ));
            }
        }

        if let Err(e) = l.http_addr() {
            p.push(e);
        }
    }

    /// `[ha4]` and `[ha4_backup]`: valid, and on two different interfaces.
    fn check_sync_links(&self, p: &mut Vec<String>) {
        check_link(p, "ha4", &self.ha4);
        if let Some(b) = &self.ha4_backup {
            check_link(p, "ha4_backup", b);
            if b.interface == self.ha4.interface {
                p.push(format!(
                    "ha4_backup.interface = \"{}\" is the same interface as ha4.interface",
                    b.interface
                ));
            }
            let addr = |l: &Link| parse_cidr(&l.address).ok().map(|(a, _)| a);
            if addr(b).is_some() && addr(b) == addr(&self.ha4) {
                p.push(format!(
                    "ha4_backup.address = \"{}\" is ha4's address: the backup link needs an address of its own, on its own interface",
                    b.address
                ));
            }
        }
    }

    /// Zones: unique names, an interface in at most one zone, never a sync interface.
    fn check_zones(&self, p: &mut Vec<String>) {
        let mut zone_names = BTreeSet::new();
        let mut iface_zone: BTreeMap<&str, &str> = BTreeMap::new();
        for (i, z) in self.zones.iter().enumerate() {
            check_name_length(p, &format!("zones[{i}]"), &z.name);
            if !zone_names.insert(z.name.as_str()) {
                p.push(format!("zones[{i}].name = \"{}\" is defined twice", z.name));
            }
            let mut listed = BTreeSet::new();
            for ifname in &z.interfaces {
                check_ifname(p, &format!("zones[{i}].interfaces"), ifname);
                if !listed.insert(ifname) {
                    p.push(format!("zones[{i}].interfaces lists \"{ifname}\" twice"));
                    continue;
                }
                if let Some(other) = iface_zone.insert(ifname, &z.name) {
                    p.push(format!(
                        "interface \"{ifname}\" is in two zones: \"{other}\" and \"{}\"",
                        z.name
                    ));
                }
                let sync = [Some(&self.ha4), self.ha4_backup.as_ref()];
                if sync.iter().flatten().any(|link| link.interface == *ifname) {
                    p.push(format!(
                        "zones[{i}].interfaces: \"{ifname}\" is a sync interface (ha4 or ha4_backup) and cannot carry data traffic"
                    ));
                }
            }
        }
        if self.zones.len() > hasync_common::maps::MAX_ZONES as usize {
            p.push(format!(
                "{} zones are more than the {} the datapath records",
                self.zones.len(),
                hasync_common::maps::MAX_ZONES
            ));
        }
    }

    /// Members: ids and serials unique, at most 16.
    fn check_members(&self, p: &mut Vec<String>) {
        if self.members.len() > range::MAX_MEMBERS {
            p.push(format!(
                "{} [[members]] is more than the maximum of 16",
                self.members.len()
            ));
        }
        let mut ids = BTreeSet::new();
        let mut serials = BTreeSet::new();
        self.check_member_addresses(p);
        for (i, m) in self.members.iter().enumerate() {
            check_range(
                p,
                &format!("members[{i}].id"),
                u64::from(m.id.0),
                range::MEMBER_ID,
            );
            if !ids.insert(m.id) {
                p.push(format!("members[{i}].id = {} is used by two members", m.id));
            }
            if m.serial.is_empty() {
                p.push(format!("members[{i}].serial is empty"));
            } else if m.serial.chars().any(char::is_control) {
                // It goes into comments of the files provisioning writes (a script among
                // them), into logs and views: a newline would end a comment.
                p.push(format!(
                    "members[{i}].serial = {:?} holds a control character",
                    m.serial
                ));
            } else if !serials.insert(m.serial.as_str()) {
                p.push(format!(
                    "members[{i}].serial = \"{}\" is used by two members",
                    m.serial
                ));
            }
        }
    }

    /// Enabled members' sync addresses: of their link's family (a member of the other one
    /// could never be dialled or admitted), and each at one member only (the listener tells
    /// members apart by address).
    fn check_member_addresses(&self, p: &mut Vec<String>) {
        let links = [
            ("ha4", Some(&self.ha4)),
            ("ha4_backup", self.ha4_backup.as_ref()),
        ];
        for (section, link) in links {
            let family = link
                .and_then(|l| parse_cidr(&l.address).ok())
                .map(|(a, _)| a.is_ipv4());
            let mut seen: BTreeMap<IpAddr, MemberId> = BTreeMap::new();
            // A disabled member is neither dialled nor admitted: its old address may be a
            // replacement's.
            let enabled = self.members.iter().enumerate().filter(|(_, m)| m.enabled);
            for (i, m) in enabled {
                let addr = if section == "ha4" {
                    Some(m.ha4)
                } else {
                    m.ha4_backup
                };
                let Some(addr) = addr else { continue };
                if let Some(why) = not_unicast_elsewhere(addr) {
                    p.push(format!(
                        "members[{i}].{section} = {addr} is {why}: a member is dialled at and admitted from a unicast address of its own"
                    ));
                }
                if family.is_some_and(|v4| v4 != addr.is_ipv4()) {
                    p.push(format!(
                        "members[{i}].{section} = {addr} is not of the family of {section}.address = \"{}\" (a sync link is IPv4 or IPv6 at every member)",
                        link.map_or("", |l| l.address.as_str())
                    ));
                }
                if let Some(other) = seen.insert(addr, m.id) {
                    p.push(format!(
                        "members[{i}].{section} = {addr} is also member {other}'s: each member needs its own address"
                    ));
                }
            }
        }
    }

    /// The local member: listed in `[[members]]`, enabled, with the addresses of its sync
    /// links (a backup address when there is a `[ha4_backup]` link).
    fn check_local_member(&self, p: &mut Vec<String>) {
        let Some(me) = self.members.iter().find(|m| m.id == self.local.member) else {
            p.push(format!(
                "local.member = {} is missing from [[members]] (every member, the local one included, must be listed)",
                self.local.member
            ));
            return;
        };
        check_own_address(p, "ha4", &self.ha4, me.id, me.ha4);
        match (&self.ha4_backup, me.ha4_backup) {
            (Some(b), Some(mine)) => check_own_address(p, "ha4_backup", b, me.id, mine),
            (Some(_), None) => p.push(format!(
                "[ha4_backup] is configured but members[id={}] (the local member) has no ha4_backup address: peers could never reach its backup link",
                me.id
            )),
            // No [ha4_backup] here while the shared member list has one (a failed backup
            // interface taken out on this member alone): peers see its backup link down.
            (None, _) => {}
        }
        if !me.enabled {
            p.push(format!(
                "members[id={}] is the local member but enabled = false",
                me.id
            ));
        }
    }

    /// `[timeouts]`: known session states, durations in range.
    fn check_timeouts(&self, p: &mut Vec<String>) {
        for (name, secs) in &self.timeouts {
            if !State::ALL.iter().any(|s| s.name() == name) {
                let known: Vec<_> = State::ALL.iter().map(|s| s.name()).collect();
                p.push(format!(
                    "timeouts.{name} is not a session state (known: {})",
                    known.join(", ")
                ));
            }
            check_range(p, &format!("timeouts.{name}"), *secs, range::TIMEOUT_S);
        }
    }

    /// The longest a starting member waits for its reachable peers' full syncs
    /// (`sync_timeout_min`; 0 takes [`DEFAULT_INITIAL_SYNC_LIMIT`]), and takes its own sessions
    /// back from them into an empty table (counted from the first one's start). Bounded either
    /// way: a peer whose full sync never ends (stalled, or lying) would otherwise hold the
    /// member in `initial` for good, and keep open the window in which peers may write the
    /// sessions it owns.
    pub fn initial_sync_limit(&self) -> std::time::Duration {
        match self.cluster.sync_timeout_min {
            0 => DEFAULT_INITIAL_SYNC_LIMIT,
            min => std::time::Duration::from_secs(min.saturating_mul(60)),
        }
    }

    /// How long a member stays non-functional after a failed link or path monitor recovered.
    pub fn monitor_hold_down(&self) -> std::time::Duration {
        let c = &self.cluster;
        std::time::Duration::from_secs(
            c.monitor_fail_hold_down_s
                .unwrap_or(c.monitor_fail_hold_down_min.saturating_mul(60)),
        )
    }

    /// Where the metrics and dashboard HTTP server listens; `None` when `local.http` is empty.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.local.http_addr().ok().flatten()
    }

    /// Where the datapath is pinned; `None` when `local.pin_dir` is empty (no pinning).
    pub fn pin_dir(&self) -> Option<&Path> {
        Some(self.local.pin_dir.as_path()).filter(|d| !d.as_os_str().is_empty())
    }

    pub fn local_member(&self) -> MemberId {
        self.local.member
    }

    /// The share of the table this member's embryonic sessions take by default (1 / this),
    /// unless `local.embryonic_capacity` says: one eighth, less in clusters whose member ids go
    /// past 4, so that every member's (this member's own, and as many copies of each other
    /// member's, in a part of the ring per member id) take at most half the table. The
    /// datapath applies it to the table it uses (a pinned one keeps its size).
    pub fn embryonic_share(&self) -> u32 {
        EMBRYONIC_SHARE.max(2 * u32::from(self.replica_parts()).max(1))
    }

    /// The largest `local.embryonic_capacity` for `session_capacity` (zero: none fits).
    fn embryonic_capacity_max(&self) -> u32 {
        self.local.session_capacity / 2 / u32::from(self.replica_parts()).max(1)
    }

    /// Member ids that get a replica part in the datapath's embryonic ring: 1 to the highest
    /// configured.
    pub fn replica_parts(&self) -> u8 {
        self.members.iter().map(|m| m.id.0).max().unwrap_or(0)
    }

    /// The datapath configuration this file asks for.
    pub fn datapath(&self) -> DatapathConfig {
        let mut cfg = DatapathConfig::with_defaults(self.local_member());
        for (i, state) in State::ALL.iter().enumerate().take(STATE_COUNT) {
            if let Some(secs) = self.timeouts.get(state.name()) {
                cfg.timeouts_ns[i] = secs.saturating_mul(1_000_000_000);
            }
        }
        cfg.policy = match self.local.policy {
            PolicyName::Strict => Policy::Strict as u8,
            PolicyName::Loose => Policy::Loose as u8,
        };
        cfg.malformed = match self.local.malformed {
            MalformedName::Drop => MalformedAction::Drop as u8,
            MalformedName::Pass => MalformedAction::Pass as u8,
        };
        cfg.forwarding = self.local.forwarding.datapath() as u8;
        cfg.vwire = u8::from(!self.vwire.is_empty());
        // A genuine takeover waits out the keepalive threshold (validation keeps it ≤ 60 s).
        cfg.claim_quiet_ms = u32::try_from(self.cluster.keepalive_threshold_ms).unwrap_or(u32::MAX);
        cfg
    }

    /// Every zone interface with its zone and the datapath's binding for it (a zone's id is
    /// its position plus one; validation keeps that within `u16`).
    pub fn interface_zones(&self) -> impl Iterator<Item = (&str, &Zone, ZoneBinding)> {
        self.zones.iter().zip(1u16..).flat_map(move |(zone, id)| {
            zone.interfaces.iter().map(move |ifname| {
                let mut binding = zone.binding(ZoneId(id));
                binding.flags |= self.wire_flags(ifname);
                (ifname.as_str(), zone, binding)
            })
        })
    }

    /// Zone names in order; a zone's id is its position plus one.
    pub fn zone_names(&self) -> Vec<String> {
        self.zones.iter().map(|z| z.name.clone()).collect()
    }

    /// A digest of everything members must agree on, for the hello: one 8-byte digest per
    /// [`AgreedSection`], in its order, so a peer can name what differs
    /// ([`differing_sections`]).
    pub fn fingerprint(&self) -> [u8; 32] {
        use blake2::{Blake2s256, Digest};
        let mut out = [0u8; 32];
        for ((_, lines), slot) in self.agreed_sections().iter().zip(out.chunks_exact_mut(8)) {
            let mut h = Blake2s256::new();
            for line in lines {
                h.update(line.as_bytes());
                h.update(b"\n");
            }
            slot.copy_from_slice(&h.finalize()[..8]);
        }
        out
    }

    /// The settings members must agree on, one `key = value` line each, in a stable order
    /// (`hasync config diff`).
    pub fn agreed_lines(&self) -> Vec<String> {
        self.agreed_sections()
            .into_iter()
            .flat_map(|(_, lines)| lines)
            .collect()
    }

    /// [`Config::agreed_lines`] by section.
    fn agreed_sections(&self) -> [(AgreedSection, Vec<String>); 4] {
        let c = &self.cluster;
        let mut cluster = vec![
            format!("cluster.id = {}", c.id),
            format!(
                "cluster.keepalive_threshold_ms = {}",
                c.keepalive_threshold_ms
            ),
            format!("cluster.sync_timeout_min = {}", c.sync_timeout_min),
            format!(
                "cluster.monitor_fail_hold_down_min = {}",
                c.monitor_fail_hold_down_min
            ),
            format!("cluster.tentative_hold_s = {}", c.tentative_hold_s),
            format!("cluster.sync_port = {}", c.sync_port),
        ];
        if let Some(secs) = c.monitor_fail_hold_down_s {
            cluster.push(format!("cluster.monitor_fail_hold_down_s = {secs}"));
        }
        let zones = vec![format!("zones = [{}]", self.zone_names().join(", "))];
        let timeouts = self
            .timeouts
            .iter()
            .map(|(name, secs)| format!("timeouts.{name} = {secs}"))
            .collect();
        let mut members: Vec<_> = self.members.iter().collect();
        members.sort_by_key(|m| m.id);
        let members = members
            .into_iter()
            .map(|m| {
                format!(
                    "members[id={}] = serial {}, ha4 {}, ha4_backup {}, session_sync {}, enabled {}",
                    m.id,
                    m.serial,
                    m.ha4,
                    m.ha4_backup
                        .map_or_else(|| "none".to_string(), |a| a.to_string()),
                    m.session_sync,
                    m.enabled
                )
            })
            .collect();
        [
            (AgreedSection::Cluster, cluster),
            (AgreedSection::Zones, zones),
            (AgreedSection::Timeouts, timeouts),
            (AgreedSection::Members, members),
        ]
    }
}

/// The default timeout of the session state named `name` (as `[timeouts]` names it).
pub fn default_timeout_s(name: &str) -> Option<u64> {
    State::ALL
        .iter()
        .find(|state| state.name() == name)
        .map(|state| state.default_timeout_s())
}

/// The parts of the settings members must agree on, each with its own digest in the
/// fingerprint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgreedSection {
    /// `[cluster]`: id, timers, hold times, sync port.
    Cluster,
    /// Zone names in order. Members translate zones by name, so a zone only some members have
    /// (a rolling change) costs only the sessions in it: a warning, not a mismatch.
    Zones,
    /// `[timeouts]`.
    Timeouts,
    /// `[[members]]`.
    Members,
}

impl AgreedSection {
    pub const ALL: [AgreedSection; 4] = [
        AgreedSection::Cluster,
        AgreedSection::Zones,
        AgreedSection::Timeouts,
        AgreedSection::Members,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            AgreedSection::Cluster => "cluster settings",
            AgreedSection::Zones => "zone names",
            AgreedSection::Timeouts => "session timeouts",
            AgreedSection::Members => "member list",
        }
    }
}

/// `fingerprint` with the zone names' digest zeroed: what a mismatch is judged on (zones
/// only some members have are a warning).
pub fn without_zones(mut fingerprint: [u8; 32]) -> [u8; 32] {
    let zones = AgreedSection::ALL
        .iter()
        .position(|s| *s == AgreedSection::Zones)
        .unwrap_or(0);
    if let Some(digest) = fingerprint.chunks_exact_mut(8).nth(zones) {
        digest.fill(0);
    }
    fingerprint
}

/// The sections whose digests differ between two fingerprints.
pub fn differing_sections(a: &[u8; 32], b: &[u8; 32]) -> Vec<AgreedSection> {
    AgreedSection::ALL
        .into_iter()
        .zip(a.chunks_exact(8).zip(b.chunks_exact(8)))
        .filter(|(_, (x, y))| x != y)
        .map(|(section, _)| section)
        .collect()
}

impl Cluster {
    /// `[cluster]`: every setting in its range, and a key file that is safe to use.
    fn check(&self, p: &mut Vec<String>) {
        check_range(p, "cluster.id", u64::from(self.id.0), range::CLUSTER_ID);
        check_range(
            p,
            "cluster.keepalive_threshold_ms",
            self.keepalive_threshold_ms,
            range::KEEPALIVE_MS,
        );
        check_range(
            p,
            "cluster.sync_timeout_min",
            self.sync_timeout_min,
            range::SYNC_TIMEOUT_MIN,
        );
        check_range(
            p,
            "cluster.monitor_fail_hold_down_min",
            self.monitor_fail_hold_down_min,
            range::HOLD_DOWN_MIN,
        );
        if let Some(secs) = self.monitor_fail_hold_down_s {
            check_range(
                p,
                "cluster.monitor_fail_hold_down_s",
                secs,
                range::HOLD_DOWN_S,
            );
        }
        if self.tentative_hold_s != 0 {
            let (lo, hi) = range::TENTATIVE_S;
            if self.tentative_hold_s < lo || self.tentative_hold_s > hi {
                p.push(format!(
                    "cluster.tentative_hold_s = {} is out of range: 0, or {lo}–{hi}",
                    self.tentative_hold_s
                ));
            }
        }
        if self.sync_port == 0 {
            p.push("cluster.sync_port = 0 is out of range 1–65535".into());
        }
        check_key_file(p, &self.key_file);
    }
}

impl Local {
    /// `http` as a socket address; `None` when empty (disabled).
    pub fn http_addr(&self) -> Result<Option<std::net::SocketAddr>, String> {
        if self.http.is_empty() {
            return Ok(None);
        }
        self.http.parse().map(Some).map_err(|_| {
            format!(
                "local.http = \"{}\" is not an address with a port (e.g. \"{DEFAULT_HTTP}\", \"[::1]:9471\"; \"\" disables it)",
                self.http
            )
        })
    }
}

fn check_pin_dir(p: &mut Vec<String>, dir: &Path) {
    if dir.as_os_str().is_empty() {
        return;
    }
    let mount = Path::new(crate::datapath::pin::BPFFS_MOUNT);
    if !dir.is_absolute() {
        p.push(format!(
            "local.pin_dir = \"{}\" must be an absolute path to a directory on bpffs (e.g. \"{}\"), or \"\" for no pinning",
            dir.display(),
            crate::datapath::DEFAULT_PIN_DIR
        ));
    } else if dir.components().eq(mount.components()) {
        p.push(format!(
            "local.pin_dir = \"{}\" is the bpffs mount itself, shared with other programs: use a directory below it (e.g. \"{}\")",
            dir.display(),
            crate::datapath::DEFAULT_PIN_DIR
        ));
    } else if dir.strip_prefix(mount).is_ok_and(|below| {
        below
            .components()
            .any(|c| c.as_os_str().to_string_lossy().contains('.'))
    }) {
        p.push(format!(
            "local.pin_dir = \"{}\": bpffs does not allow dots in names",
            dir.display()
        ));
    }
}

/// Why `addr` is not a unicast address of another host that the agent can reach, if it is
/// not: no connection or echo goes to or from it (unspecified, multicast, broadcast), it is
/// this host's own (loopback), it needs a scope the configuration cannot give (IPv6
/// link-local; IPv4's 169.254/16, common on direct-cable HA links, needs none), or it is an
/// IPv4 address in IPv6 clothing that an IPv6 socket never reaches as such (IPv4-mapped).
/// Sync addresses and path monitor targets must be.
fn not_unicast_elsewhere(addr: IpAddr) -> Option<&'static str> {
    if addr.is_unspecified() {
        return Some("unspecified");
    }
    if addr.is_loopback() {
        return Some("loopback");
    }
    if addr.is_multicast() {
        return Some("multicast");
    }
    match addr {
        IpAddr::V4(a) if a.is_broadcast() => Some("broadcast"),
        IpAddr::V6(a) if a.is_unicast_link_local() => Some("link-local (it needs a scope)"),
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => Some("IPv4-mapped"),
        _ => None,
    }
}

/// A zone's, vwire's or monitor group's name, `{key}.name`: 1–31 bytes (the datapath's and
/// the metrics' room). Returns whether it fits.
fn check_name_length(p: &mut Vec<String>, key: &str, name: &str) -> bool {
    let fits = !name.is_empty() && name.len() <= 31;
    if !fits {
        p.push(format!(
            "{key}.name = \"{name}\" must be 1–31 bytes long (it is {})",
            name.len()
        ));
    }
    fits
}

/// An interface name by the kernel's rules, as the datapath checks it before attaching (an
/// alias label such as `eth0:1` names no interface).
fn check_ifname(p: &mut Vec<String>, key: &str, name: &str) {
    if let Err(e) = crate::datapath::attach::check_interface_name(name) {
        p.push(format!("{key}: {e}"));
    }
}

fn check_link(p: &mut Vec<String>, section: &str, link: &Link) {
    check_ifname(p, &format!("{section}.interface"), &link.interface);
    if let Err(e) = parse_cidr(&link.address) {
        p.push(format!("{section}.address: {e}"));
    }
}

/// `{section}.address` is the address `[[members]]` gives the local member's `{section}`.
fn check_own_address(
    p: &mut Vec<String>,
    section: &str,
    link: &Link,
    id: MemberId,
    listed: IpAddr,
) {
    if let Ok((addr, _)) = parse_cidr(&link.address) {
        if addr != listed {
            p.push(format!(
                "{section}.address = \"{}\" does not match members[id={id}].{section} = {listed}",
                link.address
            ));
        }
    }
}

/// A key file path that is not absolute, named: it would be read from wherever the agent
/// runs (systemd runs it from `/`), not beside the config.
pub fn relative_key_file(path: &Path) -> Option<String> {
    (!path.is_absolute()).then(|| {
        format!(
            "cluster.key_file = \"{}\" must be an absolute path (the service runs from /)",
            path.display()
        )
    })
}

fn check_key_file(p: &mut Vec<String>, path: &Path) {
    if let Some(problem) = relative_key_file(path) {
        p.push(problem);
        return;
    }
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            p.push(format!(
                "cluster.key_file = \"{}\": cannot read it: {e}",
                path.display()
            ));
            return;
        }
    };
    if !meta.is_file() {
        p.push(format!(
            "cluster.key_file = \"{}\" is not a regular file",
            path.display()
        ));
        return;
    }
    p.extend(key_owner_problem(path, meta.uid()));
    if meta.len() < MIN_KEY_BYTES as u64 {
        p.push(format!(
            "cluster.key_file = \"{}\" holds {} bytes; at least {MIN_KEY_BYTES} are required",
            path.display(),
            meta.len()
        ));
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        p.push(format!(
            "cluster.key_file = \"{}\" has mode {:04o}: it must not be readable by group or others (chmod 600)",
            path.display(),
            mode & 0o7777
        ));
    }
}

/// Why a cluster key owned by `uid` at `path` is refused, if it is: one that is neither root's
/// nor this user's.
pub fn key_owner_problem(path: &Path, uid: u32) -> Option<String> {
    (uid != 0 && uid != crate::dir_trust::euid()).then(|| {
        format!(
            "cluster.key_file = \"{}\" is owned by uid {uid}: its owner can read and replace the cluster key, and the service, which runs without CAP_DAC_OVERRIDE, may not read it (chown root:root)",
            path.display(),
        )
    })
}

/// Reads the cluster key and derives the 32-byte pre-shared key used by the sync links.
pub fn read_cluster_key(path: &Path) -> Result<[u8; 32], ConfigError> {
    use blake2::{Blake2s256, Digest};
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    if bytes.len() < MIN_KEY_BYTES {
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            problems: vec![format!(
                "the key holds {} bytes; at least {MIN_KEY_BYTES} are required",
                bytes.len()
            )],
        });
    }
    let mut h = Blake2s256::new();
    h.update(b"hasync cluster key v1");
    h.update(&bytes);
    Ok(h.finalize().into())
}

#[cfg(test)]
pub(crate) mod tests;
