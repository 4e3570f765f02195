//! `hasync provision SPEC.toml --out DIR`: from one description of a whole cluster, a
//! consistent configuration for every member, the shared key, and the commands that set up
//! each member's sync interfaces. And `hasync config diff` / `hasync config check` ([`diff`]).
//!
//! # The spec
//!
//! One TOML file. Sections and keys are those of `hasync.toml` wherever they exist there, so
//! what a member's config says is what the spec said:
//!
//! ```toml
#![doc = include_str!("example.toml")]
//! ```
//!
//! - `[cluster]`: exactly the `[cluster]` of `hasync.toml` (id, description, timers,
//!   `sync_port`), with `key_file` optional: where every member keeps the key, default
//!   [`DEFAULT_KEY_FILE`].
//! - `[local]` (optional): the `[local]` every member gets (`policy`, `malformed`,
//!   `session_capacity`, `control_socket`, `traffic_log`, `http`); `member` is each member's
//!   id (refused in the spec). A member's own `[members.local]` overrides keys of it (parsed
//!   for a disabled member too: unknown keys and types).
//! - `[ha4]`, `[ha4_backup]` (optional): the common sync interface name and prefix length of
//!   the sync network. A member's `ha4_interface` / `ha4_backup_interface` override the name.
//! - `[[zones]]`: the zones, in order (a zone's id is its position): `name` and the common
//!   `interfaces`. A member whose interfaces differ lists them in `[members.zones]`, by zone
//!   name.
//! - `[[members]]`: `id`, `serial` (also the name of its output directory), `ha4` and
//!   optionally `ha4_backup` as `address` (with the section's `prefix`) or `address/prefix`,
//!   `session_sync`, `enabled`, `description` as in `hasync.toml`.
//! - `[timeouts]` (optional): as in `hasync.toml`.
//!
//! # The output
//!
//! ```text
//! DIR/cluster.key              the shared key: 32 random bytes, mode 0600; kept if it exists
//! DIR/<serial>/hasync.toml     the member's config (install as /etc/hasync/hasync.toml)
//! DIR/<serial>/cluster.key     a copy of the key, mode 0600 (install at [cluster].key_file)
//! DIR/<serial>/setup-links.sh  `ip` commands for its HA4 and HA4 backup interfaces
//! ```
//!
//! Every config is validated as `hasync agent` would (with the key it comes with) before
//! anything is written, and every member's config has the same fingerprint: what members must
//! agree on is identical by construction. An existing `DIR/cluster.key` is kept, so
//! re-provisioning after a change (a member added) does not change the key of a running
//! cluster. `setup-links.sh` is only written, never run by hasync.

pub mod diff;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs::DirBuilder,
    io::Read as _,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::Deserialize;

use crate::config::{
    self, parse_cidr, Cluster, Config, Link, Local, Member, OtherProtocolsName, Zone, MIN_KEY_BYTES,
};
use crate::dir_trust::{dir_risk, risk_above, Risk, OURS_OR_ROOTS};

/// Where members keep the cluster key unless the spec says otherwise.
pub const DEFAULT_KEY_FILE: &str = "/etc/hasync/cluster.key";

/// The cluster key's file name in the output directory and in each member's.
const KEY_FILE: &str = "cluster.key";
/// A complete spec: three members, two zones, both sync links.
pub const EXAMPLE_SPEC: &str = include_str!("example.toml");

/// `hasync provision`.
#[derive(Debug, clap::Args)]
pub struct ProvisionArgs {
    /// The cluster description (see `hasync provision --example`).
    #[arg(value_name = "SPEC.toml", required_unless_present = "example")]
    pub spec: Option<PathBuf>,

    /// Where to write the key and one directory per member (created if missing).
    #[arg(long, value_name = "DIR", required_unless_present = "example")]
    pub out: Option<PathBuf>,

    /// Print an example spec and exit.
    #[arg(long, conflicts_with_all = ["spec", "out"])]
    pub example: bool,
}

/// Errors of provisioning.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("cannot read spec {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spec {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("spec {path} has {} problem(s):\n{}", problems.len(), bullets(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the existing key {path} holds {len} bytes; at least {MIN_KEY_BYTES} are required (remove it to get a new one)")]
    ShortKey { path: PathBuf, len: u64 },
    #[error("{path} {why}")]
    Unsafe { path: PathBuf, why: String },
}

fn bullets(problems: &[String]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The spec file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// `[cluster]` of `hasync.toml`, `key_file` optional.
    pub cluster: toml::Table,
    /// Defaults of every member's `[local]`.
    #[serde(default)]
    pub local: toml::Table,
    #[serde(default)]
    pub ha4: SpecLink,
    #[serde(default)]
    pub ha4_backup: Option<SpecLink>,
    #[serde(default)]
    pub zones: Vec<SpecZone>,
    pub members: Vec<SpecMember>,
    #[serde(default)]
    pub timeouts: BTreeMap<String, u64>,
}

/// The common settings of one sync link.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecLink {
    /// Interface name on every member that does not name its own.
    pub interface: Option<String>,
    /// Prefix length of the sync network, for member addresses given without one.
    pub prefix: Option<u8>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecZone {
    pub name: String,
    /// Interfaces on every member that does not list its own for this zone.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// The zone's `other_protocols` rule, on every member.
    #[serde(default)]
    pub other_protocols: Option<OtherProtocolsName>,
    /// The zone's `route_check`, on every member.
    #[serde(default)]
    pub route_check: Option<bool>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecMember {
    #[serde(with = "crate::config::ids::member_id")]
    pub id: hasync_common::MemberId,
    pub serial: String,
    #[serde(default)]
    pub description: String,
    /// `address` or `address/prefix`.
    pub ha4: String,
    #[serde(default)]
    pub ha4_backup: Option<String>,
    #[serde(default)]
    pub ha4_interface: Option<String>,
    #[serde(default)]
    pub ha4_backup_interface: Option<String>,
    #[serde(default = "yes")]
    pub session_sync: bool,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// This member's interfaces by zone name, where they differ from the common ones.
    #[serde(default)]
    pub zones: BTreeMap<String, Vec<String>>,
    /// Overrides of `[local]` for this member.
    #[serde(default)]
    pub local: toml::Table,
}

fn yes() -> bool {
    true
}

/// One member's provisioned files, before they are written.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberFiles {
    pub serial: String,
    pub config: Config,
    /// `hasync.toml`.
    pub config_text: String,
    /// `setup-links.sh`.
    pub setup_links: String,
}

impl Spec {
    pub fn load(path: &Path) -> Result<Spec, ProvisionError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProvisionError::Read {
            path: path.to_owned(),
            source,
        })?;
        Spec::parse(path, &text)
    }

    /// Parses `text`; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Spec, ProvisionError> {
        toml::from_str(text).map_err(|e| ProvisionError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Every member's config (unvalidated), or every problem with the spec. Problems a config
    /// check would find (ranges, duplicates) are left to [`Config::validate`].
    pub fn configs(&self, path: &Path) -> Result<Vec<Config>, ProvisionError> {
        let mut p = Vec::new();
        let cluster = self.cluster_section(&mut p);
        if self.members.is_empty() {
            p.push("no [[members]]: a cluster needs at least one".into());
        }
        let zone_names: BTreeSet<&str> = self.zones.iter().map(|z| z.name.as_str()).collect();
        let mut serials = BTreeMap::new();
        let mut links = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            let at = format!("members[{i}] (serial \"{}\")", m.serial);
            check_member_names(&mut p, i, m, &at, &zone_names, &mut serials);
            links.push(self.member_links(&mut p, &at, m));
        }
        let (Some(cluster), true) = (cluster, p.is_empty()) else {
            return Err(invalid(path, p));
        };

        let members = self.member_list(&links);
        let mut configs = Vec::new();
        for (i, (m, l)) in self.members.iter().zip(&links).enumerate() {
            // A disabled member's [local] is parsed too (unknown keys, types): enabling it later
            // must not be when such a mistake in it is found. Its values are checked then.
            let Some(local) = self.member_local(&mut p, i, m) else {
                continue;
            };
            if !m.enabled {
                // Listed in everyone's members; no config of its own until it is enabled.
                continue;
            }
            let Some(ha4) = link(&l.ha4_interface, &l.ha4) else {
                continue; // reported above
            };
            configs.push(Config {
                cluster: cluster.clone(),
                local,
                ha4,
                ha4_backup: link(&l.backup_interface, &l.ha4_backup),
                zones: self.member_zones(m),
                members: members.clone(),
                timeouts: self.timeouts.clone(),
                monitor: Default::default(),
                vwire: Vec::new(),
            });
        }
        if !p.is_empty() {
            return Err(invalid(path, p));
        }
        Ok(configs)
    }

    /// `[cluster]` with the default `key_file`; `None` (and a problem) if it does not parse.
    fn cluster_section(&self, p: &mut Vec<String>) -> Option<Cluster> {
        let mut cluster_table = self.cluster.clone();
        cluster_table
            .entry("key_file")
            .or_insert_with(|| toml::Value::String(DEFAULT_KEY_FILE.into()));
        match toml::Value::Table(cluster_table).try_into::<Cluster>() {
            Ok(c) => Some(c),
            Err(e) => {
                p.push(format!("[cluster]: {}", e.message()));
                None
            }
        }
    }

    /// Member `m`'s sync addresses and interfaces, its own or the common ones; `at` names it
    /// in problems.
    fn member_links(&self, p: &mut Vec<String>, at: &str, m: &SpecMember) -> MemberLinks {
        let ha4 = address(p, at, "ha4", &m.ha4, self.ha4.prefix);
        let ha4_backup = m.ha4_backup.as_ref().and_then(|a| {
            address(
                p,
                at,
                "ha4_backup",
                a,
                self.ha4_backup.as_ref().and_then(|l| l.prefix),
            )
        });
        let ha4_interface = m
            .ha4_interface
            .clone()
            .or_else(|| self.ha4.interface.clone());
        if ha4_interface.is_none() {
            p.push(format!(
                "{at}: no HA4 interface: set [ha4].interface, or ha4_interface for the member"
            ));
        }
        let backup_interface = m
            .ha4_backup_interface
            .clone()
            .or_else(|| self.ha4_backup.as_ref().and_then(|l| l.interface.clone()));
        if m.ha4_backup.is_some() && backup_interface.is_none() {
            p.push(format!(
                "{at}: ha4_backup is set but there is no HA4 backup interface: set [ha4_backup].interface, or ha4_backup_interface for the member"
            ));
        }
        if m.ha4_backup.is_none() && m.ha4_backup_interface.is_some() {
            p.push(format!(
                "{at}: ha4_backup_interface is set but ha4_backup (its address) is not"
            ));
        }
        MemberLinks {
            ha4,
            ha4_backup,
            ha4_interface,
            backup_interface,
        }
    }

    /// `[[members]]` of every member's config, with the addresses in `links`.
    fn member_list(&self, links: &[MemberLinks]) -> Vec<Member> {
        self.members
            .iter()
            .zip(links)
            .map(|(m, l)| Member {
                id: m.id,
                serial: m.serial.clone(),
                ha4: l.ha4.map_or(IpAddr::from([0, 0, 0, 0]), |(a, _)| a),
                ha4_backup: l.ha4_backup.map(|(a, _)| a),
                session_sync: m.session_sync,
                enabled: m.enabled,
                description: m.description.clone(),
            })
            .collect()
    }

    /// The `[local]` of member `m` (the `i`th): the common one with the member's overrides;
    /// `None` (and a problem) if it does not parse.
    fn member_local(&self, p: &mut Vec<String>, i: usize, m: &SpecMember) -> Option<Local> {
        const WHY: &str = "each member's id is its [[members]] id; leave member out of the spec";
        // Reported once, with the common [local] (not again for every member).
        if let (0, Some(v)) = (i, self.local.get("member")) {
            p.push(format!("[local].member = {v}: {WHY}"));
        }
        if let Some(v) = m.local.get("member") {
            p.push(format!(
                "members[{i}].local.member = {v} (serial \"{}\"): {WHY}",
                m.serial
            ));
        }
        let mut local_table = self.local.clone();
        for (k, v) in &m.local {
            local_table.insert(k.clone(), v.clone());
        }
        local_table.insert("member".into(), toml::Value::Integer(i64::from(m.id.0)));
        match toml::Value::Table(local_table).try_into::<Local>() {
            Ok(l) => Some(l),
            Err(e) => {
                p.push(format!(
                    "[local] with members[{i}].local (serial \"{}\"): {}",
                    m.serial,
                    e.message()
                ));
                None
            }
        }
    }

    /// The zones of member `m`: its own interfaces where it lists them, else the common ones.
    fn member_zones(&self, m: &SpecMember) -> Vec<Zone> {
        self.zones
            .iter()
            .map(|z| Zone {
                name: z.name.clone(),
                interfaces: m
                    .zones
                    .get(&z.name)
                    .cloned()
                    .unwrap_or_else(|| z.interfaces.clone()),
                other_protocols: z.other_protocols,
                route_check: z.route_check,
            })
            .collect()
    }
}

/// One member's sync addresses and interfaces, as the spec gives them (`None` where it does
/// not, reported as a problem).
struct MemberLinks {
    ha4: Option<(IpAddr, u8)>,
    ha4_backup: Option<(IpAddr, u8)>,
    ha4_interface: Option<String>,
    backup_interface: Option<String>,
}

/// A config's sync link, if the spec gives both its interface and its address.
fn link(interface: &Option<String>, address: &Option<(IpAddr, u8)>) -> Option<Link> {
    Some(Link {
        interface: interface.clone()?,
        address: address.map(|(a, len)| format!("{a}/{len}"))?,
    })
}

/// The problems of `problems` with the spec at `path`.
fn invalid(path: &Path, problems: Vec<String>) -> ProvisionError {
    ProvisionError::Invalid {
        path: path.to_owned(),
        problems,
    }
}

/// Member `m` (the `i`th, `at` in problems): a serial usable as a directory and unique (also
/// ignoring case: the output may go to a FAT-formatted stick, where `fw1` and `FW1` are one
/// directory), zones that `[[zones]]` defines. `serials` maps each serial seen, lowercased,
/// to its member's id and serial.
fn check_member_names<'a>(
    p: &mut Vec<String>,
    i: usize,
    m: &'a SpecMember,
    at: &str,
    zone_names: &BTreeSet<&str>,
    serials: &mut BTreeMap<String, (u8, &'a str)>,
) {
    let folded = m.serial.to_ascii_lowercase();
    if !is_safe_dir_name(&m.serial) {
        p.push(format!(
            "members[{i}].serial = \"{}\" names the member's output directory: use 1–64 of A–Z, a–z, 0–9, `.`, `_`, `-`, not ending in a dot",
            m.serial
        ));
    } else if folded == KEY_FILE {
        p.push(format!(
            "members[{i}].serial = \"{}\" names the cluster key's file ({KEY_FILE}) in the output: choose another",
            m.serial
        ));
    } else if let Some(&(id, other)) = serials.get(&folded) {
        p.push(if other == m.serial {
            format!("members[{i}].serial = \"{}\" is used by two members", m.serial)
        } else {
            format!(
                "members[{i}].serial = \"{}\" differs from member {id}'s \"{other}\" only in case: one directory on a case-insensitive file system",
                m.serial
            )
        });
    } else {
        serials.insert(folded, (m.id.0, m.serial.as_str()));
    }
    for zone in m.zones.keys() {
        if !zone_names.contains(zone.as_str()) {
            p.push(format!(
                "{at}: zones.{zone} is not a zone of [[zones]] (known: {})",
                zone_names.iter().copied().collect::<Vec<_>>().join(", ")
            ));
        }
    }
}

/// `address` or `address/prefix` (with the link's `prefix` for the former).
fn address(
    p: &mut Vec<String>,
    at: &str,
    key: &str,
    text: &str,
    prefix: Option<u8>,
) -> Option<(IpAddr, u8)> {
    let cidr = match (text.contains('/'), prefix) {
        (true, _) => text.to_owned(),
        (false, Some(len)) => format!("{text}/{len}"),
        (false, None) => {
            p.push(format!(
                "{at}: {key} = \"{text}\" has no prefix length: write it as address/prefix, or set [{key}].prefix"
            ));
            return None;
        }
    };
    match parse_cidr(&cidr) {
        Ok(a) => Some(a),
        Err(e) => {
            p.push(format!("{at}: {key}: {e}"));
            None
        }
    }
}

/// A serial usable as a directory name, also on a FAT-formatted stick (which drops a trailing
/// dot: `fw1.` would be `fw1`'s directory).
fn is_safe_dir_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !s.ends_with('.')
}

/// Single-quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':'))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `setup-links.sh` for `config`'s member.
pub fn setup_links_script(config: &Config) -> String {
    let me = config.local.member;
    let serial = config
        .members
        .iter()
        .find(|m| m.id == me)
        .map_or("", |m| m.serial.as_str());
    let mut s = String::new();
    let _ = writeln!(s, "#!/bin/sh");
    let _ = writeln!(
        s,
        "# hasync sync interfaces of member {me} ({serial}), cluster {}.",
        config.cluster.id
    );
    let _ = writeln!(
        s,
        "# Written by `hasync provision`, never run by hasync: review it, then run it as root on\n\
         # {serial} (or put the same settings in its network configuration). `ip address replace`\n\
         # makes it safe to run again."
    );
    let _ = writeln!(s, "set -eu");
    for (name, link) in [
        ("HA4", Some(&config.ha4)),
        ("HA4 backup", config.ha4_backup.as_ref()),
    ] {
        let Some(link) = link else { continue };
        let dev = shell_quote(&link.interface);
        let _ = writeln!(s, "# {name}");
        let _ = writeln!(
            s,
            "ip address replace {} dev {dev}",
            shell_quote(&link.address)
        );
        let _ = writeln!(s, "ip link set dev {dev} up");
    }
    s
}

impl MemberFiles {
    /// The files of `config`'s member; `spec` names the spec in the header.
    pub fn new(config: Config, spec: &Path) -> anyhow::Result<MemberFiles> {
        let me = config.local.member;
        let serial = config
            .members
            .iter()
            .find(|m| m.id == me)
            .map(|m| m.serial.clone())
            .unwrap_or_default();
        let body = toml::to_string(&config).context("rendering the config as TOML")?;
        // A control character of the spec's name (a newline) would end the comment.
        let spec: String = spec
            .display()
            .to_string()
            .chars()
            .flat_map(|c| match c.is_control() {
                true => c.escape_default().collect::<Vec<_>>(),
                false => vec![c],
            })
            .collect();
        let config_text = format!(
            "# hasync configuration of member {me} ({serial}), cluster {}.\n\
             # Written by `hasync provision` from {spec}: change the spec and provision again rather\n\
             # than editing one member (`hasync config diff` shows what members disagree on).\n\n{body}",
            config.cluster.id,
        );
        Ok(MemberFiles {
            serial,
            setup_links: setup_links_script(&config),
            config,
            config_text,
        })
    }
}

/// What [`provision`] wrote.
#[derive(Debug)]
pub struct Provisioned {
    pub key: PathBuf,
    /// Whether the key was created now (else an existing one was kept).
    pub new_key: bool,
    /// Per member: serial and directory.
    pub members: Vec<(String, PathBuf)>,
    /// The serials of the members the spec lists with `enabled = false`: in every config's
    /// members, with no directory of their own.
    pub disabled: Vec<String>,
    /// Directories in `out` that hold a member's config but name no member of the spec: left
    /// from an earlier run (a member taken out since), with an old config and the key.
    pub left: Vec<PathBuf>,
    /// The fingerprint all members share.
    pub fingerprint: [u8; 32],
}

/// Validates the spec's configs and writes every file into `out`: nothing, not `out` nor the
/// key, before every config is valid.
pub fn provision(spec_path: &Path, out: &Path) -> anyhow::Result<Provisioned> {
    let spec = Spec::load(spec_path)?;
    let configs = spec.configs(spec_path)?;
    if configs.is_empty() {
        return Err(invalid(
            spec_path,
            vec!["no member is enabled: there is no config to write".to_owned()],
        )
        .into());
    }
    // The key is checked by its path, which the config check wants absolute.
    let out = &std::path::absolute(out).map_err(|source| ProvisionError::Io {
        what: "making the output directory's path absolute",
        path: out.to_owned(),
        source,
    })?;
    let key = out.join(KEY_FILE);
    let files = with_check_key(&key, |k| member_files(spec_path, configs, k))?;
    check_output(out, &files)?;
    let new_key = ensure_key(&key)?;
    let key_bytes = std::fs::read(&key).map_err(|source| ProvisionError::Io {
        what: "reading the key",
        path: key.clone(),
        source,
    })?;
    let fingerprint = files
        .first()
        .map(|f| f.config.fingerprint())
        .unwrap_or_default();
    anyhow::ensure!(
        files.iter().all(|f| f.config.fingerprint() == fingerprint),
        "internal error: the provisioned configs disagree"
    );
    let members = write_members(out, &files, &key_bytes)?;
    let disabled = spec
        .members
        .iter()
        .filter(|m| !m.enabled)
        .map(|m| m.serial.clone())
        .collect();
    let named: Vec<&str> = spec.members.iter().map(|m| m.serial.as_str()).collect();
    Ok(Provisioned {
        key,
        new_key,
        members,
        disabled,
        left: left_from_earlier_runs(out, &named),
        fingerprint,
    })
}

/// The directories in `out` that hold a member's config (`hasync.toml`) and are not named in
/// `named`, sorted.
fn left_from_earlier_runs(out: &Path, named: &[&str]) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Vec::new();
    };
    let mut left: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| !named.iter().any(|n| e.file_name() == **n))
        .map(|e| e.path())
        .filter(|dir| dir.join("hasync.toml").is_file())
        .collect();
    left.sort();
    left
}

/// Runs `check` with a key file as the one at `key` will be: that one where it exists with
/// mode 0600 or stricter, else a temporary 32-byte one, mode 0600 (removed after; an existing
/// key others can read has its owner checked here), so the configs are validated with their
/// key before anything is written.
fn with_check_key<T>(
    key: &Path,
    check: impl FnOnce(&Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    match std::fs::symlink_metadata(key) {
        Ok(meta) if !meta.is_file() => return Err(not_plain(key).into()),
        // A key others can read (a file system without modes, vfat) is checked through the
        // stand-in: the run warns of its mode ([`loose_key_warning`]), the mode is the
        // installer's to set. Its owner is checked here, as the config check would.
        Ok(meta) if meta.mode() & 0o077 == 0 => return check(key),
        Ok(meta) => {
            if let Some(problem) = config::key_owner_problem(key, meta.uid()) {
                return Err(anyhow::anyhow!(problem));
            }
        }
        Err(_) => {}
    }
    let stand_in = std::env::temp_dir().join(format!(
        "hasync-provision-key-{}-{:016x}",
        std::process::id(),
        crate::random::random_u64()
    ));
    let _ = std::fs::remove_file(&stand_in);
    crate::files::create_new(&stand_in, &[0; MIN_KEY_BYTES], 0o600).map_err(|source| {
        ProvisionError::Io {
            what: "writing a stand-in key to check the configs with",
            path: stand_in.clone(),
            source,
        }
    })?;
    let checked = check(&stand_in);
    let _ = std::fs::remove_file(&stand_in);
    checked
}

/// Every member's files, once every config is valid with the key at `key` (all problems of
/// all members at once otherwise): nothing is written before.
fn member_files(
    spec_path: &Path,
    configs: Vec<Config>,
    key: &Path,
) -> anyhow::Result<Vec<MemberFiles>> {
    let mut files = Vec::new();
    // The key is checked where it is written, not where the members will read it (the same
    // `[cluster]` for all): only that its path can be read from anywhere.
    let mut problems: Vec<String> = (configs.first())
        .and_then(|c| config::relative_key_file(&c.cluster.key_file))
        .into_iter()
        .collect();
    for config in configs {
        let mut check = config.clone();
        check.cluster.key_file = key.to_owned();
        if let Err(e) = check.validate(Path::new("hasync.toml")) {
            let serial = check
                .members
                .iter()
                .find(|m| m.id == check.local.member)
                .map_or_else(String::new, |m| m.serial.clone());
            problems.push(format!("member {} ({serial}): {e}", check.local.member));
            continue;
        }
        files.push(MemberFiles::new(config, spec_path)?);
    }
    if !problems.is_empty() {
        return Err(invalid(spec_path, problems).into());
    }
    Ok(files)
}

/// Writes each member's directory under `out`: its config, the key, its link setup script.
/// Returns each member's serial and directory.
fn write_members(
    out: &Path,
    files: &[MemberFiles],
    key_bytes: &[u8],
) -> Result<Vec<(String, PathBuf)>, ProvisionError> {
    let mut members = Vec::new();
    for f in files {
        let dir = out.join(&f.serial);
        mkdir(&dir, 0o755)?;
        check_own_dir(&dir, &unfollowed(&dir)?)?;
        write_file(&dir.join("hasync.toml"), f.config_text.as_bytes(), 0o644)?;
        write_file(&dir.join(KEY_FILE), key_bytes, 0o600)?;
        write_file(&dir.join("setup-links.sh"), f.setup_links.as_bytes(), 0o755)?;
        members.push((f.serial.clone(), dir));
    }
    Ok(members)
}

/// Readies `out` before anything is written into it: the directories above it must be ones
/// no one else can replace (each this user's or root's, and not writable by group or others
/// unless sticky, as `/tmp` is; checked where symbolic links lead), `out` itself a directory of
/// this user's (created if missing), and what already sits where the members' directories and
/// the key go must be directories and a plain file.
fn check_output(out: &Path, files: &[MemberFiles]) -> Result<(), ProvisionError> {
    let above = risk_above(out).map_err(|(path, source)| ProvisionError::Io {
        what: "checking",
        path,
        source,
    })?;
    if let Some((above, risk)) = above {
        return Err(refusal(&above, risk));
    }
    mkdir(out, 0o755)?;
    check_own_dir(out, &unfollowed(out)?)?;
    for f in files {
        let dir = out.join(&f.serial);
        if let Ok(meta) = std::fs::symlink_metadata(&dir) {
            check_own_dir(&dir, &meta)?;
        }
    }
    let key = out.join(KEY_FILE);
    match std::fs::symlink_metadata(&key) {
        Ok(meta) if !meta.is_file() => Err(not_plain(&key)),
        _ => Ok(()),
    }
}

fn not_plain(path: &Path) -> ProvisionError {
    ProvisionError::Unsafe {
        path: path.to_owned(),
        why: "is not a regular file (a symbolic link or other): remove it, or put the cluster's \
              key there"
            .into(),
    }
}

/// `path`'s own metadata (a symbolic link's, not its target's).
fn unfollowed(path: &Path) -> Result<std::fs::Metadata, ProvisionError> {
    std::fs::symlink_metadata(path).map_err(|source| ProvisionError::Io {
        what: "checking",
        path: path.to_owned(),
        source,
    })
}

/// Refuses a directory to write the key and member files into that someone else could have
/// filled (a planted key, a member directory linked elsewhere): `meta` (the directory's) must
/// be a real directory, this user's or root's, that no group or other user may write.
fn check_own_dir(path: &Path, meta: &std::fs::Metadata) -> Result<(), ProvisionError> {
    dir_risk(meta, OURS_OR_ROOTS).map_or(Ok(()), |risk| Err(refusal(path, risk)))
}

/// The refusal of `path`, the output or a directory above it, for `risk`.
fn refusal(path: &Path, risk: Risk) -> ProvisionError {
    let why = match risk {
        Risk::Symlink => "is a symbolic link: member files are written only into directories of \
                          their own (remove the link)"
            .to_string(),
        Risk::NotDir => "is not a directory".to_string(),
        Risk::OwnedBy(uid) => format!(
            "is owned by uid {uid}: its owner could plant a key or a member directory in it \
             (use a directory of your own)"
        ),
        Risk::Open(mode) => format!(
            "is writable by group or others (mode {mode:04o}): any of them could plant a key or \
             a member directory in it (chmod go-w)"
        ),
    };
    ProvisionError::Unsafe {
        path: path.to_owned(),
        why,
    }
}

fn mkdir(dir: &Path, mode: u32) -> Result<(), ProvisionError> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|source| ProvisionError::Io {
            what: "creating directory",
            path: dir.to_owned(),
            source,
        })
}

/// Writes `bytes` to `path` with `mode`, whole or not at all, replacing what was there (a
/// symbolic link there is replaced, never followed).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ProvisionError> {
    crate::files::replace(path, bytes, mode).map_err(|source| ProvisionError::Io {
        what: "writing",
        path: path.to_owned(),
        source,
    })
}

/// Creates `path` with 32 random bytes (mode 0600) unless it exists; true if it was created.
fn ensure_key(path: &Path) -> Result<bool, ProvisionError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.is_file() => Err(not_plain(path)),
        Ok(meta) => {
            if meta.len() < MIN_KEY_BYTES as u64 {
                return Err(ProvisionError::ShortKey {
                    path: path.to_owned(),
                    len: meta.len(),
                });
            }
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; MIN_KEY_BYTES];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut key))
                .map_err(|source| ProvisionError::Io {
                    what: "reading random bytes from",
                    path: "/dev/urandom".into(),
                    source,
                })?;
            // Never over a key that appeared meanwhile.
            crate::files::create_new(path, &key, 0o600).map_err(|source| ProvisionError::Io {
                what: "writing",
                path: path.to_owned(),
                source,
            })
        }
        Err(source) => Err(ProvisionError::Io {
            what: "checking the key",
            path: path.to_owned(),
            source,
        }),
    }
}

/// `hasync provision`.
pub fn run(args: &ProvisionArgs) -> anyhow::Result<()> {
    if args.example {
        print!("{EXAMPLE_SPEC}");
        return Ok(());
    }
    let (Some(spec), Some(out)) = (&args.spec, &args.out) else {
        anyhow::bail!("give the spec and --out DIR (or --example)");
    };
    let done = provision(spec, out)?;
    println!(
        "{} {}",
        if done.new_key {
            "new cluster key:"
        } else {
            "kept the existing cluster key:"
        },
        done.key.display()
    );
    for (serial, dir) in &done.members {
        println!(
            "{serial}: {}/{{hasync.toml, cluster.key, setup-links.sh}}",
            dir.display()
        );
    }
    for serial in &done.disabled {
        let stale = out.join(serial).exists();
        println!(
            "{serial}: enabled = false, no config of its own (in every other member's list; set \
             enabled = true and provision again to bring it in){}",
            if stale {
                format!(
                    "; {} is left from an earlier run, with an old config: remove it",
                    out.join(serial).display()
                )
            } else {
                String::new()
            }
        );
    }
    for dir in &done.left {
        println!(
            "{}: left from an earlier run (no member of the spec has its serial), with an old \
             config and the cluster key: remove it",
            dir.display()
        );
    }
    if let Some(warning) = loose_key_warning(&done.key) {
        eprintln!("warning: {warning}");
    }
    let hex: String = done.fingerprint[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    println!(
        "{} member(s), config fingerprint {hex} on every one. On each member: install hasync.toml \
         as {}, the key at its [cluster].key_file, and run setup-links.sh (review it first).",
        done.members.len(),
        config::DEFAULT_PATH
    );
    Ok(())
}

/// A warning when the key written at `key` is readable by others all the same: a file system
/// that keeps no modes (vfat) gives every file the mount's; the agent refuses such a key, so
/// it must be installed with mode 0600. `None` when its mode is 0600 or stricter.
fn loose_key_warning(key: &Path) -> Option<String> {
    let mode = std::fs::metadata(key).ok()?.mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "{} has mode {mode:04o} (the file system there keeps no modes): install the keys \
             with mode 0600, e.g. `install -m 0600`; the agent refuses a key others can read",
            key.display()
        )
    })
}

#[cfg(test)]
mod tests;
