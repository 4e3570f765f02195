use std::{os::unix::fs::PermissionsExt as _, process::Command};

use super::*;
use crate::control::testing::TempDir;

fn done(steps: &[Step]) -> Vec<(&'static str, Done)> {
    steps.iter().map(|s| (s.what, s.done)).collect()
}

/// A stand-in for the hasync binary.
fn fake_exe(root: &TempDir, content: &[u8]) -> PathBuf {
    let exe = root.path().join("build/hasync");
    fs::create_dir_all(exe.parent().expect("parent")).expect("mkdir");
    fs::write(&exe, content).expect("write exe");
    exe
}

/// A scratch root named after `tag`, the prefix inside it to install into, and a stand-in
/// binary to install.
fn staged(tag: &str) -> (TempDir, PathBuf, PathBuf) {
    let root = TempDir::new(&format!("install-{tag}"));
    let prefix = root.path().join("root");
    let exe = fake_exe(&root, b"#!/bin/sh\nexit 0\n");
    (root, prefix, exe)
}

#[test]
fn install_twice_overwrites_no_config_and_no_key() {
    let (root, prefix, exe) = staged("twice");
    let bin_dir = Path::new(DEFAULT_BIN_DIR);

    let first = install_files(&prefix, bin_dir, &exe).expect("first install");
    assert_eq!(
        done(&first),
        [
            ("binary", Done::Wrote),
            ("unit", Done::Wrote),
            ("config", Done::Wrote),
            ("cluster key", Done::Wrote),
        ]
    );
    let bin = prefix.join("usr/local/sbin/hasync");
    let unit = prefix.join("etc/systemd/system/hasync.service");
    let config = prefix.join("etc/hasync/hasync.toml");
    let key = prefix.join("etc/hasync/cluster.key");
    let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(mode(&unit), 0o644);
    assert_eq!(mode(&key), 0o600);
    let key_bytes = fs::read(&key).expect("key");
    assert_eq!(key_bytes.len(), 32);
    assert_ne!(key_bytes, [0; 32]);
    let unit_text_written = fs::read_to_string(&unit).expect("unit");
    assert!(unit_text_written
        .contains("\nExecStart=/usr/local/sbin/hasync agent --config /etc/hasync/hasync.toml\n"));
    assert!(unit_text_written.contains("\nType=notify\n"));

    // The operator edits the config; a new build is installed.
    fs::write(&config, "# edited by the operator\n").expect("edit");
    let exe = fake_exe(&root, b"#!/bin/sh\nexit 1\n");
    let second = install_files(&prefix, bin_dir, &exe).expect("second install");
    assert_eq!(
        done(&second),
        [
            ("binary", Done::Replaced),
            ("unit", Done::Unchanged),
            ("config", Done::Kept),
            ("cluster key", Done::Kept),
        ]
    );
    assert_eq!(
        fs::read_to_string(&config).expect("config"),
        "# edited by the operator\n"
    );
    assert_eq!(fs::read(&key).expect("key"), key_bytes, "the key is kept");
    assert_eq!(fs::read(&bin).expect("bin"), b"#!/bin/sh\nexit 1\n");
    let lines: Vec<String> = second.iter().map(ToString::to_string).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("kept existing config")
                && l.contains("hasync.toml (not overwritten)")),
        "{lines:#?}"
    );

    // An exposed key is kept, and said to be exposed.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
    let third = install_files(&prefix, bin_dir, &exe).expect("third install");
    let note = third[3].note.clone().unwrap_or_default();
    assert!(note.contains("mode 0644 exposes it: chmod 600"), "{note}");

    let removed = uninstall_files(&prefix, bin_dir).expect("uninstall");
    assert_eq!(
        done(&removed),
        [
            ("binary", Done::Removed),
            ("unit", Done::Removed),
            ("config", Done::Kept),
            ("cluster key", Done::Kept),
        ]
    );
    assert!(!bin.exists() && !unit.exists() && config.exists() && key.exists());
    let again = uninstall_files(&prefix, bin_dir).expect("uninstall again");
    assert_eq!(again[0].done, Done::Absent);
    assert!(install_files(&prefix, Path::new("usr/bin"), &exe)
        .expect_err("relative bin dir")
        .to_string()
        .contains("must be an absolute path"));
}

/// A staging prefix another user owns, or may write into, is refused before anything is
/// written: root would keep a key and a config planted there, and write the unit and the
/// binary wherever links put there lead (before, it installed; seen failing).
#[test]
fn a_prefix_others_could_fill_is_refused() {
    let root = TempDir::new("install-prefix");
    let exe = fake_exe(&root, b"#!/bin/sh\nexit 0\n");
    let bin_dir = Path::new(DEFAULT_BIN_DIR);
    let prefix = root.path().join("root");
    fs::create_dir(&prefix).expect("prefix");
    fs::set_permissions(&prefix, fs::Permissions::from_mode(0o777)).expect("chmod");
    let e = install_files(&prefix, bin_dir, &exe).expect_err("an open prefix");
    let msg = format!("{e:#}");
    assert!(
        msg.contains(&prefix.display().to_string()) && msg.contains("mode 0777"),
        "{msg}"
    );
    fs::set_permissions(&prefix, fs::Permissions::from_mode(0o755)).expect("chmod");
    std::os::unix::fs::chown(&prefix, Some(65_534), None).expect("chown (root)");
    let e = install_files(&prefix, bin_dir, &exe).expect_err("another user's prefix");
    assert!(format!("{e:#}").contains("uid 65534"), "{e:#}");
    assert_eq!(fs::read_dir(&prefix).expect("list").count(), 0, "written");
    std::os::unix::fs::chown(&prefix, Some(0), None).expect("chown back");
    install_files(&prefix, bin_dir, &exe).expect("a prefix of root's");
}

/// Into the host's own tree, a binary directory another user owns, or others may write to,
/// is refused too (the last review: the first form checked only a staging prefix, and root
/// wrote a binary its unit runs where another user could swap it; seen failing); one of
/// root's that its group may write to is warned of. Only the check runs here: nothing is
/// written to the host.
#[test]
fn a_binary_directory_others_could_fill_is_refused_on_the_host() {
    // Not below /tmp, which is refused on the host itself (sticky, but open to others).
    let sticky = TempDir::new("install-hostbin");
    let e = check_install_paths(Path::new("/"), sticky.path()).expect_err("below /tmp");
    assert!(format!("{e:#}").contains("mode 1777"), "{e:#}");
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let root = TempDir::within(&target, "install-hostbin");
    let bin_dir = root.path().join("bin");
    fs::create_dir(&bin_dir).expect("bin dir");
    std::os::unix::fs::chown(&bin_dir, Some(65_534), None).expect("chown (root)");
    let e = check_install_paths(Path::new("/"), &bin_dir).expect_err("another user's");
    assert!(format!("{e:#}").contains("uid 65534"), "{e:#}");
    std::os::unix::fs::chown(&bin_dir, Some(0), None).expect("chown back");
    fs::set_permissions(&bin_dir, fs::Permissions::from_mode(0o777)).expect("chmod");
    let e = check_install_paths(Path::new("/"), &bin_dir).expect_err("open to others");
    assert!(format!("{e:#}").contains("mode 0777"), "{e:#}");
    fs::set_permissions(&bin_dir, fs::Permissions::from_mode(0o775)).expect("chmod");
    let warnings = check_install_paths(Path::new("/"), &bin_dir).expect("its group's");
    assert!(
        warnings.iter().any(|w| w.contains("mode 0775")),
        "{warnings:?}"
    );
}

/// Uninstall names the state directory it keeps, and a suspend mark left in it, which would
/// start a later install Suspended (before, it said nothing of it; seen failing).
#[test]
fn uninstall_names_the_state_it_keeps() {
    let (_root, prefix, exe) = staged("state");
    let bin_dir = Path::new(DEFAULT_BIN_DIR);
    install_files(&prefix, bin_dir, &exe).expect("install");
    let state = prefix.join("var/lib/hasync");
    fs::create_dir_all(&state).expect("state dir");
    let kept = |steps: &[Step]| {
        steps
            .iter()
            .find(|s| s.what == "state")
            .map(|s| (s.done, s.path.clone(), s.note.clone().unwrap_or_default()))
    };
    let (done, path, note) = kept(&uninstall_files(&prefix, bin_dir).expect("uninstall"))
        .expect("the state directory is named");
    assert_eq!((done, path), (Done::Kept, state.clone()));
    assert!(!note.contains("suspend mark"), "{note}");
    fs::write(crate::suspend_mark::path(&state), "by the operator\n").expect("mark");
    let (_, _, note) = kept(&uninstall_files(&prefix, bin_dir).expect("uninstall"))
        .expect("the state directory is named");
    assert!(note.contains("suspend mark"), "{note}");
}

#[test]
fn the_example_config_is_valid_once_the_key_exists() {
    let (_root, prefix, exe) = staged("example");
    install_files(&prefix, Path::new(DEFAULT_BIN_DIR), &exe).expect("install");
    let path = prefix.join("etc/hasync/hasync.toml");
    let key = prefix.join("etc/hasync/cluster.key");
    let text = fs::read_to_string(&path)
        .expect("config")
        .replace(KEY_PATH, &key.to_string_lossy());
    let config = Config::from_toml(&path, &text).expect("parses");
    config.validate(&path).expect("valid");
    assert_eq!(config.pin_dir(), Some(Path::new(DEFAULT_PIN_DIR)));
    assert_eq!(config.members.len(), 2);
}

/// A key left short by an earlier install (a full disk, a crash) is kept, as any key is, but
/// the install says it is too short to use (before: a plain "not overwritten", and the agent
/// refused to start); a --bin-dir the unit's ExecStart would split or expand is refused.
#[test]
fn a_short_key_is_named_and_an_unquotable_bin_dir_refused() {
    let (_root, prefix, exe) = staged("shortkey");
    let key = prefix.join("etc/hasync/cluster.key");
    fs::create_dir_all(key.parent().expect("parent")).expect("mkdir");
    fs::write(&key, b"").expect("empty key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod");
    let steps = install_files(&prefix, Path::new(DEFAULT_BIN_DIR), &exe).expect("install");
    let step = steps
        .iter()
        .find(|s| s.what == "cluster key")
        .expect("key step");
    assert_eq!(step.done, Done::Kept);
    let note = step.note.as_deref().unwrap_or_default();
    assert!(note.contains("holds 0 bytes"), "{note}");
    for bad in ["/opt/ha sync", "/opt/%h", "/opt/$X"] {
        let e = install_files(&prefix, Path::new(bad), &exe).expect_err(bad);
        assert!(e.to_string().contains("would not keep"), "{bad}: {e}");
    }
}

/// `systemd-analyze verify` checks the unit's syntax, every directive, and that ExecStart's
/// binary exists: the unit is written pointing at a binary installed into the scratch root.
#[test]
fn systemd_analyze_verify_passes_on_the_unit() {
    let (root, prefix, exe) = staged("verify");
    install_files(&prefix, Path::new(DEFAULT_BIN_DIR), &exe).expect("install");
    let bin = prefix.join("usr/local/sbin/hasync");
    let units = root.path().join("units");
    fs::create_dir_all(&units).expect("mkdir");

    let verify = |text: &str| {
        let unit = units.join(UNIT_NAME);
        fs::write(&unit, text).expect("write unit");
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .expect(
                "run systemd-analyze (Debian package systemd; `cargo xtask setup` installs it)",
            );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let good = unit_text(&bin, Path::new(DEFAULT_PATH));
    let (ok, text) = verify(&good);
    // Warnings (an unknown directive, a bad value) do not fail verify: no output at all does.
    let about_unit: Vec<&str> = text.lines().filter(|l| l.contains(UNIT_NAME)).collect();
    assert!(
        ok && about_unit.is_empty(),
        "systemd-analyze verify:\n{text}"
    );

    // The check is real: a misspelt directive and a missing binary are reported.
    let (_, text) = verify(&good.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"));
    assert!(text.contains("Unknown key"), "{text}");
    let (ok, text) = verify(&unit_text(
        &root.path().join("nope/hasync"),
        Path::new(DEFAULT_PATH),
    ));
    assert!(!ok && text.contains("is not executable"), "{text}");
}

#[test]
fn the_unit_grants_only_the_capabilities_it_explains() {
    let unit = unit_text(Path::new("/usr/local/sbin/hasync"), Path::new(DEFAULT_PATH));
    let caps = [
        "CAP_BPF",
        "CAP_NET_ADMIN",
        "CAP_PERFMON",
        "CAP_NET_RAW",
        "CAP_CHOWN",
    ];
    for key in ["CapabilityBoundingSet=", "AmbientCapabilities="] {
        let line = unit
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key}"));
        let granted: Vec<&str> = line[key.len()..].split_whitespace().collect();
        assert_eq!(granted, caps, "{line}");
    }
    for cap in caps {
        assert!(
            unit.contains(&format!("# - {cap}: ")),
            "{cap} is not explained"
        );
    }
    for line in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/sys/fs/bpf /run/hasync /var/log/hasync",
        "RuntimeDirectory=hasync",
        "LogsDirectory=hasync",
        "StateDirectory=hasync",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "LimitMEMLOCK=infinity",
        "LimitNOFILE=65536",
        "Restart=on-failure",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing {line}");
    }
}

/// The start limit can trigger: enough starts, `RestartSec` apart, fit in its interval, and
/// it stands in `[Unit]` (systemd ignores it under `[Service]`). Before, the unit kept
/// systemd's default, 5 starts in 10 s, which starts 2 s apart never reach: a failing agent
/// was restarted for good, each start asking every peer for its whole table (seen failing).
#[test]
fn the_units_start_limit_can_trigger() {
    let unit = unit_text(Path::new("/usr/local/sbin/hasync"), Path::new(DEFAULT_PATH));
    let mut section = "";
    let mut settings = std::collections::HashMap::new();
    for line in unit.lines().filter(|l| !l.starts_with('#')) {
        if line.starts_with('[') {
            section = line;
        } else if let Some((key, value)) = line.split_once('=') {
            settings.insert(key, (section, value));
        }
    }
    let number = |key: &str| -> u64 {
        let (_, value) = settings.get(key).unwrap_or_else(|| panic!("no {key}="));
        (value.trim_end_matches('s').parse()).unwrap_or_else(|_| panic!("{key}={value}"))
    };
    let (interval, burst, restart) = (
        number("StartLimitIntervalSec"),
        number("StartLimitBurst"),
        number("RestartSec"),
    );
    assert!(
        burst * restart < interval,
        "{burst} starts {restart} s apart never fit in {interval} s"
    );
    for key in ["StartLimitIntervalSec", "StartLimitBurst"] {
        assert_eq!(settings.get(key).map(|(s, _)| *s), Some("[Unit]"), "{key}");
    }
}

#[test]
fn teardown_output_names_what_it_removed() {
    let report = pin::TeardownReport {
        dir: "/sys/fs/bpf/hasync".into(),
        existed: true,
        links: vec![pin::RemovedLink {
            path: "/sys/fs/bpf/hasync/links/in0:native".into(),
            named: Some(("in0".into(), crate::datapath::AttachMode::Native)),
            info: Some(pin::XdpLinkInfo {
                program_id: 7,
                ifindex: 4,
            }),
            attached_to: Some("in0".into()),
        }],
        maps: vec!["/sys/fs/bpf/hasync/maps/SESSIONS".into()],
        dirs: vec!["/sys/fs/bpf/hasync".into()],
        kept: vec![],
    };
    assert_eq!(
        teardown_text(&report),
        "detached XDP from in0 (ifindex 4): removed /sys/fs/bpf/hasync/links/in0:native\n\
         removed map /sys/fs/bpf/hasync/maps/SESSIONS\n\
         removed directory /sys/fs/bpf/hasync\n"
    );
    let nothing = pin::TeardownReport {
        dir: "/sys/fs/bpf/hasync".into(),
        ..pin::TeardownReport::default()
    };
    assert_eq!(
        teardown_text(&nothing),
        "nothing to tear down: /sys/fs/bpf/hasync does not exist\n"
    );
}
