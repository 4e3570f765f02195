//! Running hasync as a systemd service: `hasync install` and `hasync uninstall` (binary, unit,
//! example config, cluster key), `hasync teardown` (the pinned datapath a stopped agent leaves),
//! readiness and stop notifications ([`notify`]) and log lines for journald ([`journal`]).
//!
//! `install` never overwrites a config or a key: it writes them only where none is. The binary
//! and the unit are hasync's own and are replaced (atomically, by rename), so running `install`
//! from a new build is an upgrade.

pub mod journal;
pub mod notify;

use std::{
    fmt,
    fs::{self, DirBuilder},
    io::{self, Read as _},
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};

use crate::{
    config::{Config, DEFAULT_PATH, DEFAULT_STATE_DIR, MIN_KEY_BYTES},
    datapath::{pin, DEFAULT_PIN_DIR},
};

/// Where the unit goes (below the root).
pub const UNIT_PATH: &str = "/etc/systemd/system/hasync.service";
/// Where the cluster key goes (below the root).
pub const KEY_PATH: &str = "/etc/hasync/cluster.key";
/// Default directory of the binary.
pub const DEFAULT_BIN_DIR: &str = "/usr/local/sbin";
/// The unit's name.
pub const UNIT_NAME: &str = "hasync.service";

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Install below this directory instead of `/` (a staging or test root); the unit and the
    /// config still name their paths as seen from `/`.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub prefix: PathBuf,

    /// Directory of the `hasync` binary, as seen from the root.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BIN_DIR)]
    pub bin_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct TeardownArgs {
    /// Tear down the datapath of the agent configured in this file (its `[local] pin_dir`).
    /// Default: /etc/hasync/hasync.toml if it exists, else the default pin directory.
    #[arg(long, value_name = "FILE", conflicts_with = "pin_dir")]
    pub config: Option<PathBuf>,

    /// Tear down the datapath pinned in this directory.
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
}

/// The unit `hasync install` writes, running `bin` with `config`.
///
/// Every capability is explained next to the bounding set; `tests/tests/restart.rs` runs the
/// agent with exactly this set (it works, restart included) and with each one dropped (it fails).
pub fn unit_text(bin: &Path, config: &Path) -> String {
    [
        UNIT_HEADER,
        &unit_service(bin, config),
        UNIT_PRIVILEGES,
        UNIT_SANDBOX,
        UNIT_INSTALL,
    ]
    .concat()
}

/// The unit file's head: what it is, and `[Unit]`.
const UNIT_HEADER: &str = r#"# hasync: the session-sync agent of an XDP HA firewall cluster.
# Written by `hasync install`, which rewrites it: put local changes in a drop-in
# (`systemctl edit hasync`).

[Unit]
Description=hasync session-sync agent (XDP HA firewall cluster)
Wants=network-online.target
After=network-online.target
# An agent that keeps failing (10 starts in 10 minutes, at least 2 s apart) is left failed
# rather than restarted for good: each start asks every peer for its whole table. The
# datapath, pinned, forwards meanwhile; `systemctl reset-failed hasync` and a start bring it
# back. (systemd's default, 5 starts in 10 s, can never trigger at 2 s apart.)
StartLimitIntervalSec=600
StartLimitBurst=10

"#;

/// `[Service]`: how systemd runs `bin` with `config`, when it is ready, and how it restarts.
fn unit_service(bin: &Path, config: &Path) -> String {
    format!(
        r#"[Service]
# Ready (READY=1) once the XDP program is attached, its maps are filled and the control
# socket is up.
Type=notify
NotifyAccess=main
ExecStart={bin} agent --config {config}
# `systemctl reload hasync` (and logrotate's postrotate) sends SIGHUP: the agent reopens its
# traffic log at the configured path; nothing else is reloaded.
ExecReload=/bin/kill -HUP $MAINPID
# SIGTERM stops the agent; the datapath stays pinned and attached, so traffic and sessions
# survive a restart or an upgrade. `hasync teardown` removes it.
Restart=on-failure
RestartSec=2s
TimeoutStartSec=90s
TimeoutStopSec=20s
# The main loop pings the watchdog (WATCHDOG=1) every 15 s: an agent whose main loop stalls
# for 15 to 30 s (or that is stopped that long) is killed and restarted (its datapath,
# pinned, forwards meanwhile).
WatchdogSec=30s

"#,
        bin = bin.display(),
        config = config.display(),
    )
}

/// Who the agent runs as: root with only the capabilities it needs (each explained), and
/// its limits.
const UNIT_PRIVILEGES: &str = r#"# Root (the pins live in root-owned /sys/fs/bpf), with only these capabilities; without any
# one of them the agent cannot load its program (the tests run it so):
# - CAP_BPF: bpf(2): create the maps and load the program (else EPERM).
# - CAP_NET_ADMIN: load a networking (XDP) program (else EPERM) and attach it to interfaces.
# - CAP_PERFMON: the verifier allows the program's pointer arithmetic only to a loader that
#   also has it ("pointer arithmetic with it prohibited for !root", EACCES).
# - CAP_NET_RAW: the raw ICMP / ICMPv6 sockets that ping [[monitor.path_groups]] targets (with
#   path groups and without it, the agent refuses to start, naming it).
# - CAP_CHOWN: gives the control socket to [local] control_group (root without it, in no
#   group but root, may not; with a control group and without it, the agent refuses to
#   start, naming it). Only the files under the paths writable below can be touched.
# Not needed: CAP_SYS_ADMIN (systemd mounts bpffs at boot; the agent never mounts it nor looks
# BPF objects up by id), CAP_NET_BIND_SERVICE (ports > 1024), CAP_SYS_RESOURCE (LimitMEMLOCK
# below covers old kernels), CAP_DAC_OVERRIDE (it owns its files as root).
CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON CAP_NET_RAW CAP_CHOWN
AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON CAP_NET_RAW CAP_CHOWN
NoNewPrivileges=yes
# Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
LimitMEMLOCK=infinity
# Descriptors: two connections per peer and link, the control socket, the dashboard, maps and
# links. The listener refuses unknown sources before their handshake, so a flood cannot hold
# many; this leaves room far above the systemd default soft limit of 1024.
LimitNOFILE=65536

"#;

/// The sandbox: a read-only system but for where the agent writes, and nothing it does not
/// use.
const UNIT_SANDBOX: &str = r#"# Read-only system, writable only where the agent writes: pins, control socket, traffic log,
# state (the suspend mark, kept across restarts and reboots).
ProtectSystem=strict
ReadWritePaths=/sys/fs/bpf /run/hasync /var/log/hasync
# /run/hasync holds only the control socket: its own mode (0660) and group ([local]
# control_group: read-only users) decide who may use it.
RuntimeDirectory=hasync
RuntimeDirectoryMode=0755
LogsDirectory=hasync
LogsDirectoryMode=0750
StateDirectory=hasync
StateDirectoryMode=0700
UMask=0077
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
# Unix: control socket, sd_notify. Inet: sync links, metrics, interface flags. Netlink: XDP
# attach on kernels without XDP links.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK

"#;

/// `[Install]`: started at boot once enabled.
const UNIT_INSTALL: &str = r#"[Install]
WantedBy=multi-user.target
"#;

/// The example config `hasync install` writes where none is: a valid two-member cluster to
/// edit.
pub fn example_config() -> String {
    format!(
        r#"# hasync member configuration. Written by `hasync install` as an example: edit it for this
# member (every member lists the same cluster, zones and members; only [local], [ha4] and
# [ha4_backup] differ), then `systemctl enable --now hasync`.

[cluster]
# 1–99, the same on every member.
id = 1
description = "example cluster"
# 32 random bytes, mode 0600, the same file on every member.
key_file = "{KEY_PATH}"
# keepalive_threshold_ms = 10000
# sync_port = 7471

[local]
# This member's id in [[members]].
member = 1
# control_socket = "/run/hasync/hasync.sock"
# traffic_log = "/var/log/hasync/traffic.jsonl"
# Maps and XDP links live here, so a restart or an upgrade keeps sessions and traffic;
# `hasync teardown` removes them. "" pins nothing.
pin_dir = "{DEFAULT_PIN_DIR}"
policy = "strict"
# session_capacity = 1048576
# Embryonic sessions (handshake not completed, UDP not yet a stream, ICMP echoes) held at
# most; past it the oldest is evicted for each new one. Assured sessions are never evicted.
# Default: 1/8 of session_capacity; each other member's get as many again, and all
# members' together take at most 1/2.
# embryonic_capacity = 131072
# Assured sessions peers' records may hold here, all peers together (default: 3/4 of
# session_capacity, or (n-1)/n of it in a cluster of n > 4 members), so peers' sessions
# never take the room this member's own need.
# replica_limit = 786432

# The sync link, and its backup on another interface.
[ha4]
interface = "eth2"
address = "198.18.100.1/24"

[ha4_backup]
interface = "eth3"
address = "198.18.101.1/24"

# The data interfaces XDP runs on, by zone.
[[zones]]
name = "trust"
interfaces = ["eth0"]

[[zones]]
name = "untrust"
interfaces = ["eth1"]

[[members]]
id = 1
serial = "fw1"
ha4 = "198.18.100.1"
ha4_backup = "198.18.101.1"

[[members]]
id = 2
serial = "fw2"
ha4 = "198.18.100.2"
ha4_backup = "198.18.101.2"
"#
    )
}

/// `path` (absolute, as seen from `/`) below `prefix`.
fn under(prefix: &Path, path: &Path) -> PathBuf {
    prefix.join(path.strip_prefix("/").unwrap_or(path))
}

/// What `install` or `uninstall` did to one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Done {
    /// Written where nothing was.
    Wrote,
    /// Written over an older one.
    Replaced,
    /// Already as it should be.
    Unchanged,
    /// Left as it was: never overwritten.
    Kept,
    Removed,
    /// Nothing there to remove.
    Absent,
}

/// One step of `install` or `uninstall`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub what: &'static str,
    /// The path below the prefix.
    pub path: PathBuf,
    pub done: Done,
    /// Anything the operator should know.
    pub note: Option<String>,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = match self.done {
            Done::Wrote => "wrote",
            Done::Replaced => "replaced",
            Done::Unchanged => "unchanged",
            Done::Kept => "kept existing",
            Done::Removed => "removed",
            Done::Absent => "not found",
        };
        write!(f, "{verb} {} {}", self.what, self.path.display())?;
        if let Some(note) = &self.note {
            write!(f, " ({note})")?;
        }
        Ok(())
    }
}

fn mkdirs(dir: &Path, mode: u32) -> anyhow::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Writes `bytes` to `path` with `mode` through a temporary file and a rename, so a reader
/// (or a running binary) never sees half a file. Returns whether `path` existed.
fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<bool> {
    let existed = fs::symlink_metadata(path).is_ok();
    crate::files::replace(path, bytes, mode)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(existed)
}

/// Writes `bytes` to `path` only if nothing is there: never overwrites, and never leaves a
/// part of the file (a later install would keep a short key for good).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<bool> {
    crate::files::create_new(path, bytes, mode)
        .with_context(|| format!("creating {}", path.display()))
}

fn random_key() -> anyhow::Result<Vec<u8>> {
    let mut key = vec![0; MIN_KEY_BYTES];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .context("reading 32 bytes from /dev/urandom")?;
    Ok(key)
}

fn check_bin_dir(bin_dir: &Path) -> anyhow::Result<()> {
    if !bin_dir.is_absolute() {
        bail!(
            "--bin-dir {} must be an absolute path (as seen from the root)",
            bin_dir.display()
        );
    }
    // The unit's ExecStart takes the path as it is: systemd splits it at white space and
    // expands `%` and `$`.
    let text = bin_dir.to_string_lossy();
    if let Some(c) = text
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '%' | '$' | '"' | '\'' | '\\'))
    {
        bail!(
            "--bin-dir {} holds {c:?}, which the unit's ExecStart would not keep: choose a path \
             without white space, quotes, backslashes, % or $",
            bin_dir.display()
        );
    }
    Ok(())
}

fn check_root(prefix: &Path) -> anyhow::Result<()> {
    if prefix == Path::new("/") && crate::dir_trust::euid() != 0 {
        bail!("installing into / needs root (or give --prefix DIR to stage it elsewhere)");
    }
    Ok(())
}

/// The `hasync` binary in `bin_dir`.
fn binary_path(bin_dir: &Path) -> PathBuf {
    bin_dir.join("hasync")
}

/// Puts `exe` (the running binary), the unit, an example config (if none) and a new cluster key
/// (if none) in place below `prefix`.
pub fn install_files(prefix: &Path, bin_dir: &Path, exe: &Path) -> anyhow::Result<Vec<Step>> {
    check_bin_dir(bin_dir)?;
    for warning in check_install_paths(prefix, bin_dir)? {
        eprintln!("warning: {warning}");
    }
    Ok(vec![
        install_binary(prefix, bin_dir, exe)?,
        install_unit(prefix, &binary_path(bin_dir))?,
        install_example_config(prefix)?,
        install_key(prefix)?,
    ])
}

/// Refuses to install if a directory above a file it writes (as written, or where links on it
/// lead) is another user's or open to others: they could have planted a key or a config that
/// would be kept, or swap the binary root's unit runs, or a link that sends what root writes
/// elsewhere. Into the host's own tree (`/`), a directory of root's that its group may write to
/// is only warned of (some hosts keep /usr/local group-writable by `staff`, as older Debian
/// did: a group as good as root); into a staging `--prefix`, refused too. Returns the warnings.
fn check_install_paths(prefix: &Path, bin_dir: &Path) -> anyhow::Result<Vec<String>> {
    use crate::dir_trust::{risk_above_under, Policy, ABOVE};
    // On the host not even a sticky directory may be open to others: a file root's unit runs
    // from /tmp is gone after a reboot, and anyone may put one in its place.
    let host = Policy {
        closed: 0o002,
        sticky_may_be_open: false,
        ..ABOVE
    };
    let policy = if prefix == Path::new("/") {
        host
    } else {
        ABOVE
    };
    let mut warnings = Vec::new();
    for path in [
        binary_path(bin_dir),
        PathBuf::from(UNIT_PATH),
        PathBuf::from(DEFAULT_PATH),
        PathBuf::from(KEY_PATH),
    ] {
        let path = under(prefix, &path);
        let risk = |policy| {
            risk_above_under(&path, policy).map_err(|(at, e)| {
                anyhow::Error::new(e).context(format!("checking {}", at.display()))
            })
        };
        if let Some((dir, risk)) = risk(policy)? {
            bail!(
                "refusing to install {}: {} is {risk}, so another user could replace what is \
                 written there (use a directory of root's, mode go-w; --bin-dir chooses the \
                 binary's)",
                path.display(),
                dir.display()
            );
        }
        if let Some((dir, risk @ crate::dir_trust::Risk::Open(_))) = risk(ABOVE)? {
            let warning = format!(
                "{} is {risk}: its group could replace {}",
                dir.display(),
                path.display()
            );
            if !warnings.contains(&warning) {
                warnings.push(warning);
            }
        }
    }
    Ok(warnings)
}

/// `exe` copied into `bin_dir` (as seen from the root) below `prefix`, unless it is already
/// there.
fn install_binary(prefix: &Path, bin_dir: &Path, exe: &Path) -> anyhow::Result<Step> {
    let bin_at = under(prefix, &binary_path(bin_dir));
    mkdirs(&under(prefix, bin_dir), 0o755)?;
    let same = matches!(
        (fs::canonicalize(exe), fs::canonicalize(&bin_at)),
        (Ok(a), Ok(b)) if a == b
    );
    if same {
        return Ok(Step {
            what: "binary",
            path: bin_at,
            done: Done::Unchanged,
            note: Some("it is the running executable".into()),
        });
    }
    let bytes = fs::read(exe).with_context(|| format!("reading {}", exe.display()))?;
    let existed = replace_file(&bin_at, &bytes, 0o755)?;
    Ok(Step {
        what: "binary",
        path: bin_at,
        done: if existed { Done::Replaced } else { Done::Wrote },
        note: None,
    })
}

/// The unit running `bin`, written unless it already says the same.
fn install_unit(prefix: &Path, bin: &Path) -> anyhow::Result<Step> {
    let unit_at = under(prefix, Path::new(UNIT_PATH));
    mkdirs(unit_at.parent().unwrap_or(prefix), 0o755)?;
    let unit = unit_text(bin, Path::new(DEFAULT_PATH));
    let done = if fs::read(&unit_at).is_ok_and(|old| old == unit.as_bytes()) {
        Done::Unchanged
    } else if replace_file(&unit_at, unit.as_bytes(), 0o644)? {
        Done::Replaced
    } else {
        Done::Wrote
    };
    Ok(Step {
        what: "unit",
        path: unit_at,
        done,
        note: None,
    })
}

/// The example config, where there is no config yet.
fn install_example_config(prefix: &Path) -> anyhow::Result<Step> {
    let config_at = under(prefix, Path::new(DEFAULT_PATH));
    mkdirs(config_at.parent().unwrap_or(prefix), 0o755)?;
    let wrote = write_new(&config_at, example_config().as_bytes(), 0o644)?;
    Ok(Step {
        what: "config",
        path: config_at,
        done: if wrote { Done::Wrote } else { Done::Kept },
        note: Some(if wrote {
            "an example: edit it for this member".into()
        } else {
            "not overwritten".into()
        }),
    })
}

/// A new cluster key, where there is none yet; an existing one others can read is flagged.
fn install_key(prefix: &Path) -> anyhow::Result<Step> {
    let key_at = under(prefix, Path::new(KEY_PATH));
    let wrote = write_new(&key_at, &random_key()?, 0o600)?;
    let note = if wrote {
        "32 random bytes, mode 0600: copy this same file to every member".to_owned()
    } else {
        match fs::metadata(&key_at).map(|m| (m.permissions().mode() & 0o777, m.len())) {
            Ok((_, len)) if len < MIN_KEY_BYTES as u64 => format!(
                "not overwritten; it holds {len} bytes, fewer than the {MIN_KEY_BYTES} the agent \
                 needs: replace it with the cluster's key"
            ),
            Ok((mode, _)) if mode & 0o077 != 0 => {
                format!("not overwritten; its mode {mode:04o} exposes it: chmod 600 it")
            }
            _ => "not overwritten".to_owned(),
        }
    };
    Ok(Step {
        what: "cluster key",
        path: key_at,
        done: if wrote { Done::Wrote } else { Done::Kept },
        note: Some(note),
    })
}

/// Removes the binary and the unit below `prefix`; the config and the key stay (reported as
/// kept).
pub fn uninstall_files(prefix: &Path, bin_dir: &Path) -> anyhow::Result<Vec<Step>> {
    check_bin_dir(bin_dir)?;
    let mut steps = Vec::new();
    let wants = Path::new(UNIT_PATH)
        .with_file_name("multi-user.target.wants")
        .join(UNIT_NAME);
    for (what, path) in [
        ("binary", binary_path(bin_dir)),
        ("unit", PathBuf::from(UNIT_PATH)),
        // What `systemctl enable` made, which would dangle.
        ("enablement link", wants),
    ] {
        let at = under(prefix, &path);
        let done = match fs::remove_file(&at) {
            Ok(()) => Done::Removed,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Done::Absent,
            Err(e) => return Err(e).with_context(|| format!("removing {}", at.display())),
        };
        if what != "enablement link" || done == Done::Removed {
            steps.push(Step {
                what,
                path: at,
                done,
                note: None,
            });
        }
    }
    for (what, path) in [("config", DEFAULT_PATH), ("cluster key", KEY_PATH)] {
        let at = under(prefix, Path::new(path));
        if fs::symlink_metadata(&at).is_ok() {
            steps.push(Step {
                what,
                path: at,
                done: Done::Kept,
                note: Some(
                    "uninstall keeps it; remove it by hand if this host leaves the cluster".into(),
                ),
            });
        }
    }
    let config = installed_config(prefix);
    let state_dir = config.as_ref().map_or_else(
        || PathBuf::from(DEFAULT_STATE_DIR),
        |c| c.local.state_dir.clone(),
    );
    let at = under(prefix, &state_dir);
    if at.is_dir() {
        let note = if crate::suspend_mark::path(&at).exists() {
            "a suspend mark is left in it: a later install starts Suspended until `hasync \
             functional`; remove it by hand if this host leaves the cluster"
        } else {
            "uninstall keeps it; remove it by hand if this host leaves the cluster"
        };
        steps.push(Step {
            what: "state",
            path: at,
            done: Done::Kept,
            note: Some(note.into()),
        });
    }
    Ok(steps)
}

/// The config installed under `prefix`, parsed (not validated), if one is there and parses.
fn installed_config(prefix: &Path) -> Option<Config> {
    let path = under(prefix, Path::new(DEFAULT_PATH));
    let text = fs::read_to_string(&path).ok()?;
    Config::from_toml(&path, &text).ok()
}

/// `hasync install`.
pub fn install(args: &InstallArgs) -> anyhow::Result<()> {
    check_root(&args.prefix)?;
    let exe = std::env::current_exe().context("finding the running hasync executable")?;
    let steps = install_files(&args.prefix, &args.bin_dir, &exe)?;
    for step in &steps {
        println!("{step}");
    }
    println!(
        "next: edit {DEFAULT_PATH} for this member, give every member the same {KEY_PATH}, then \
         `systemctl daemon-reload && systemctl enable --now hasync`"
    );
    Ok(())
}

/// `hasync uninstall`.
pub fn uninstall(args: &InstallArgs) -> anyhow::Result<()> {
    check_root(&args.prefix)?;
    let pin_dir = installed_config(&args.prefix).map_or_else(
        || Some(PathBuf::from(DEFAULT_PIN_DIR)),
        |c| c.pin_dir().map(Path::to_path_buf),
    );
    let pinned = pin_dir.map(|dir| under(&args.prefix, &dir));
    if let Some(pinned) = pinned.filter(|p| args.prefix == Path::new("/") && p.exists()) {
        // `rm -r` is said only of the default directory: a config's own is not checked here.
        let by_hand = if pinned == Path::new(DEFAULT_PIN_DIR) {
            format!(
                "; without the binary, `rm -r {}` does the same",
                pinned.display()
            )
        } else {
            String::new()
        };
        println!(
            "note: a datapath is still pinned at {} (XDP attached, sessions kept): `hasync \
             teardown` removes it{by_hand}",
            pinned.display(),
        );
    }
    for step in uninstall_files(&args.prefix, &args.bin_dir)? {
        println!("{step}");
    }
    println!("next: `systemctl daemon-reload` (stop the service first if it still runs)");
    Ok(())
}

/// The pin directory `hasync teardown` works on, and the control socket of the agent that
/// would use it (to refuse while it runs).
fn teardown_target(args: &TeardownArgs) -> anyhow::Result<Option<(PathBuf, Option<PathBuf>)>> {
    if let Some(dir) = &args.pin_dir {
        return Ok(Some((dir.clone(), None)));
    }
    let default = Path::new(DEFAULT_PATH);
    let path = match &args.config {
        Some(path) => path.as_path(),
        None if default.exists() => default,
        None => return Ok(Some((DEFAULT_PIN_DIR.into(), None))),
    };
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    // Parsed, not validated: a missing key file must not stand in the way of a teardown.
    let config = Config::from_toml(path, &text)?;
    Ok(config
        .pin_dir()
        .map(|dir| (dir.to_owned(), Some(config.local.control_socket.clone()))))
}

/// `hasync teardown`.
pub fn teardown(args: &TeardownArgs) -> anyhow::Result<()> {
    let Some((dir, socket)) = teardown_target(args)? else {
        println!(
            "nothing to tear down: pin_dir is empty in {}, so the agent pins nothing (its \
             datapath goes away with it)",
            args.config
                .as_deref()
                .unwrap_or(Path::new(DEFAULT_PATH))
                .display()
        );
        return Ok(());
    };
    if let Some(socket) = socket {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            bail!(
                "the agent is running (its control socket {} answers): stop it first \
                 (`systemctl stop hasync`); a running agent holds its XDP links",
                socket.display()
            );
        }
    }
    let report = pin::teardown(&dir)?;
    print!("{}", teardown_text(&report));
    Ok(())
}

/// What `hasync teardown` prints for `report`.
pub fn teardown_text(report: &pin::TeardownReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if !report.existed {
        let _ = writeln!(
            out,
            "nothing to tear down: {} does not exist",
            report.dir.display()
        );
        return out;
    }
    if report.links.is_empty() {
        let _ = writeln!(out, "no XDP link was pinned: nothing to detach");
    }
    for link in &report.links {
        let _ = writeln!(out, "{link}");
    }
    for map in &report.maps {
        let _ = writeln!(out, "removed map {}", map.display());
    }
    for dir in &report.dirs {
        let _ = writeln!(out, "removed directory {}", dir.display());
    }
    for kept in &report.kept {
        let _ = writeln!(out, "left {} (not in hasync's layout)", kept.display());
    }
    out
}

#[cfg(test)]
mod tests;
