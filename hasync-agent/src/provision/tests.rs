use std::os::unix::fs::PermissionsExt as _;

use super::{diff::differences, *};
use crate::control::testing::TempDir;
use hasync_common::{ClusterId, MemberId};

/// The example spec with the key kept in `out` (so the configs load on this machine).
fn example_in(out: &Path) -> String {
    EXAMPLE_SPEC.replace(
        "# key_file = \"/etc/hasync/cluster.key\"",
        &format!("key_file = \"{}\"", out.join("cluster.key").display()),
    )
}

/// A temporary directory named after `name` holding the example spec (`cluster.toml`), its
/// key file to be written in `out` beside the configurations: the directory (kept while it
/// lives), `out` and the spec's path.
fn example_spec(name: &str) -> (TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = TempDir::new(name);
    let out = dir.path().join("out");
    let spec = dir.path().join("cluster.toml");
    std::fs::write(&spec, example_in(&out)).expect("write spec");
    (dir, out, spec)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn a_three_member_spec_provisions_configs_that_load_and_agree() {
    let (_dir, out, spec) = example_spec("provision");

    let done = provision(&spec, &out).expect("provision");
    assert!(done.new_key);
    let key = std::fs::read(out.join("cluster.key")).expect("key");
    assert_eq!(key.len(), 32);
    assert_eq!(mode(&out.join("cluster.key")), 0o600);

    let serials: Vec<&str> = done.members.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(serials, ["FW-A", "FW-B", "FW-C"]);
    let configs: Vec<Config> = serials
        .iter()
        .map(|s| Config::load(&out.join(s).join("hasync.toml")).expect("loads"))
        .collect();
    // What members must agree on is the same everywhere.
    assert!(configs.iter().all(|c| c.fingerprint() == done.fingerprint));
    for (i, c) in configs.iter().enumerate() {
        assert_eq!(c.local.member, MemberId(u8::try_from(i + 1).unwrap()));
        assert_eq!(c.cluster.id, ClusterId(7));
        assert_eq!(c.cluster.description, "edge cluster, site A");
        assert_eq!(c.zone_names(), ["trust", "untrust"]);
        assert_eq!(c.timeouts.get("established"), Some(&3600));
        assert_eq!(c.members.len(), 3);
        assert_eq!(c.local.policy, config::PolicyName::Strict);
        let serial = serials[i];
        // The key copy beside each config is the shared key.
        let copy = out.join(serial).join("cluster.key");
        assert_eq!(std::fs::read(&copy).expect("copy"), key);
        assert_eq!(mode(&copy), 0o600);
        assert_eq!(mode(&out.join(serial).join("setup-links.sh")), 0o755);
    }
    // Addresses and interfaces: common ones, and FW-C's own.
    let (a, c) = (&configs[0], &configs[2]);
    assert_eq!(
        (a.ha4.interface.as_str(), a.ha4.address.as_str()),
        ("ha4", "198.18.100.1/24")
    );
    let b = a.ha4_backup.as_ref().expect("backup");
    assert_eq!(
        (b.interface.as_str(), b.address.as_str()),
        ("ha4b", "198.18.101.1/24")
    );
    assert_eq!(
        (c.ha4.interface.as_str(), c.ha4.address.as_str()),
        ("eno3", "198.18.100.3/24")
    );
    assert_eq!(c.ha4_backup.as_ref().expect("backup").interface, "eno4");
    assert_eq!(a.zones[0].interfaces, ["eth1"]);
    assert_eq!(c.zones[0].interfaces, ["eno1"]);
    assert_eq!(c.zones[1].interfaces, ["eno2"]);
    assert_eq!(a.local.session_capacity, 1_048_576);
    assert_eq!(c.local.session_capacity, 4_194_304);
    assert_eq!(configs[1].members[2].ha4.to_string(), "198.18.100.3");
    assert_eq!(
        configs[1].members[0]
            .ha4_backup
            .map(|a| a.to_string())
            .as_deref(),
        Some("198.18.101.1")
    );
    assert_eq!(c.members[2].description, "other hardware");

    let script = std::fs::read_to_string(out.join("FW-C/setup-links.sh")).expect("script");
    assert!(script.starts_with("#!/bin/sh\n"), "{script}");
    for line in [
        "ip address replace 198.18.100.3/24 dev eno3",
        "ip link set dev eno3 up",
        "ip address replace 198.18.101.3/24 dev eno4",
        "ip link set dev eno4 up",
    ] {
        assert!(
            script.lines().any(|l| l == line),
            "no `{line}` in\n{script}"
        );
    }

    // Provisioning again keeps the key: a running cluster keeps working.
    let again = provision(&spec, &out).expect("again");
    assert!(!again.new_key);
    assert_eq!(std::fs::read(out.join("cluster.key")).expect("key"), key);
}

#[test]
fn spec_problems_are_all_reported_naming_the_member() {
    let dir = TempDir::new("provision-bad");
    let out = dir.path().join("out");
    let base = example_in(&out);
    // Each row: a replacement in the example, a fragment of the error.
    for (from, to, want) in [
        (
            "ha4_backup = \"198.18.101.2\"",
            "ha4_backup_interface = \"x\"",
            "members[1] (serial \"FW-B\"): ha4_backup_interface is set but ha4_backup",
        ),
        (
            "serial = \"FW-B\"",
            "serial = \"../etc\"",
            "members[1].serial = \"../etc\" names",
        ),
        (
            "serial = \"FW-B\"",
            "serial = \"FW-A\"",
            "\"FW-A\" is used by two members",
        ),
        (
            "serial = \"FW-B\"",
            "serial = \"fw-a\"",
            "members[1].serial = \"fw-a\" differs from member 1's \"FW-A\" only in case",
        ),
        (
            "serial = \"FW-B\"",
            "serial = \"FW-A.\"",
            "members[1].serial = \"FW-A.\" names",
        ),
        (
            "serial = \"FW-B\"",
            "serial = \"Cluster.Key\"",
            "members[1].serial = \"Cluster.Key\" names the cluster key's file",
        ),
        (
            "prefix = 24\n\n[ha4_backup]",
            "\n[ha4_backup]",
            "ha4 = \"198.18.100.1\" has no prefix length",
        ),
        (
            "trust = [\"eno1\"]",
            "dmz = [\"eno1\"]",
            "zones.dmz is not a zone of [[zones]] (known: trust, untrust)",
        ),
        (
            "ha4 = \"198.18.100.3/24\"",
            "ha4 = \"198.18.100.300/24\"",
            "\"198.18.100.300\" is not an IP address",
        ),
        (
            "id = 7\n",
            "id = 100\n",
            "cluster.id = 100 is out of range 1–99",
        ),
        (
            "session_capacity = 4194304",
            "session_capacity = 0",
            "member 3 (FW-C)",
        ),
        (
            "policy = \"strict\"",
            "polcy = \"strict\"",
            "unknown field `polcy`",
        ),
        (
            "[[members]]\nid = 1\n",
            "[[members]]\nid = 1\nsecret = 1\n",
            "unknown field `secret`",
        ),
        (
            "policy = \"strict\"",
            "policy = \"strict\"\nmember = 2",
            "[local].member = 2: each member's id is its [[members]] id; leave member out of the spec",
        ),
        (
            "session_capacity = 4194304",
            "session_capacity = 4194304\nmember = 1",
            "members[2].local.member = 1 (serial \"FW-C\"): each member's id is its [[members]] id",
        ),
        (
            "key_file = \"",
            "key_file = \"relative/",
            "/out/cluster.key\" must be an absolute path (the service runs from /)",
        ),
    ] {
        assert!(base.contains(from), "example lacks {from:?}");
        let spec = dir.path().join("bad.toml");
        std::fs::write(&spec, base.replacen(from, to, 1)).expect("write");
        let e = provision(&spec, &out).expect_err(to);
        let msg = crate::datapath::error_chain(e.as_ref());
        assert!(
            msg.contains(want),
            "row {to:?}:\n{msg}\ndoes not contain {want:?}"
        );
    }
    // Nothing was written by a failed run: not a member's directory, not even `out` or the
    // key (before, `out` and a fresh key were made before the configs were validated, and
    // the next run said it "kept the existing cluster key" the operator never had).
    assert!(!out.exists(), "a failed run created {}", out.display());
}

/// A spec whose name holds a newline provisions configs that load as validated: the name,
/// in a comment of each, ended the comment, and what followed became part of the config
/// (here a table that would not parse; a name could as well add settings never validated).
#[test]
fn a_spec_named_with_a_newline_provisions_configs_that_load() {
    let dir = TempDir::new("provision-newline");
    let out = dir.path().join("out");
    let spec = dir.path().join("spec\n[monitor]\nbogus = 1\n.toml");
    std::fs::write(&spec, example_in(&out)).expect("write spec");
    let done = provision(&spec, &out).expect("provision");
    for (serial, _) in &done.members {
        let path = out.join(serial).join("hasync.toml");
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{serial}: {e:#}"));
        assert_eq!(config.fingerprint(), done.fingerprint, "{serial}");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.contains("spec\\n[monitor]\\nbogus = 1\\n.toml"),
            "{text}"
        );
    }
}

/// A member the spec lists with `enabled = false` (as `hasync.toml` allows) is in every other
/// member's list and gets no directory of its own; the run says so. Before, its own config
/// (refused: the local member disabled) failed the whole run.
#[test]
fn a_disabled_member_is_listed_without_a_config_of_its_own() {
    let dir = TempDir::new("provision-disabled");
    let out = dir.path().join("out");
    let spec = dir.path().join("cluster.toml");
    let text = example_in(&out).replacen(
        "serial = \"FW-C\"\n",
        "serial = \"FW-C\"\nenabled = false\n",
        1,
    );
    std::fs::write(&spec, text).expect("write spec");
    let done = provision(&spec, &out).expect("provision");
    assert_eq!(done.disabled, ["FW-C"]);
    let serials: Vec<_> = done.members.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(serials, ["FW-A", "FW-B"]);
    assert!(!out.join("FW-C").exists());
    let a = Config::load(&out.join("FW-A").join("hasync.toml")).expect("FW-A loads");
    let c = a
        .members
        .iter()
        .find(|m| m.id == MemberId(3))
        .expect("FW-C listed");
    assert!(!c.enabled);
    // A spec with no member enabled has nothing to write: refused, nothing written.
    let nobody = dir.path().join("nobody.toml");
    let none_out = dir.path().join("none");
    let all_off = ["FW-A", "FW-B", "FW-C"]
        .iter()
        .fold(example_in(&none_out), |t, s| {
            let line = format!("serial = \"{s}\"\n");
            t.replacen(&line, &format!("{line}enabled = false\n"), 1)
        });
    std::fs::write(&nobody, all_off).expect("write spec");
    let e = provision(&nobody, &none_out).expect_err("nobody enabled");
    assert!(e.to_string().contains("no member is enabled"), "{e}");
    assert!(!none_out.exists());
    // A disabled member's own [local] is checked all the same: enabling it later must not be
    // the first time its typo is found (before, it was not read at all).
    let typo = dir.path().join("typo.toml");
    let typo_out = dir.path().join("typo");
    let text = example_in(&typo_out)
        .replacen(
            "serial = \"FW-C\"\n",
            "serial = \"FW-C\"\nenabled = false\n",
            1,
        )
        .replacen("session_capacity = 4194304", "sesion_capacity = 4194304", 1);
    std::fs::write(&typo, text).expect("write spec");
    let e = provision(&typo, &typo_out).expect_err("typo in a disabled member");
    let msg = crate::datapath::error_chain(e.as_ref());
    assert!(
        msg.contains(
            "[local] with members[2].local (serial \"FW-C\"): unknown field `sesion_capacity`"
        ),
        "{msg}"
    );
    assert!(!typo_out.exists());
}

#[test]
fn config_diff_shows_the_settings_members_disagree_on() {
    let (_dir, out, spec) = example_spec("diff");
    provision(&spec, &out).expect("provision");
    let load = |s: &str| Config::load(&out.join(s).join("hasync.toml")).expect("load");
    let (mut a, mut b) = (load("FW-A"), load("FW-B"));

    // Local settings differ (member, addresses), what must agree does not.
    assert_eq!(differences(&a, &b), []);
    let text = diff::report("a.toml", "b.toml", &[], a.agreed_lines().len());
    assert!(text.contains("a.toml and b.toml agree on all"), "{text}");

    b.zones[0].name = "inside".into();
    a.timeouts.insert("established".into(), 1800);
    b.timeouts.clear();
    b.members.pop();
    let d = differences(&a, &b);
    assert_eq!(
        d.iter().map(|d| d.key.as_str()).collect::<Vec<_>>(),
        ["zones", "timeouts.established", "members[id=3]"]
    );
    assert_eq!(d[0].a.as_deref(), Some("zones = [trust, untrust]"));
    assert_eq!(d[0].b.as_deref(), Some("zones = [inside, untrust]"));
    assert_eq!(d[1].b, None);
    let text = diff::report("a.toml", "b.toml", &d, a.agreed_lines().len());
    for line in [
        "--- A: a.toml",
        "+++ B: b.toml",
        "- zones = [trust, untrust]",
        "+ zones = [inside, untrust]",
        "- timeouts.established = 1800",
        "+ (timeouts.established not in B: its default, 3600)",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }
    assert!(text.contains("3 setting(s) differ"), "{text}");
    // Only in B.
    let d = differences(&b, &a);
    assert_eq!(
        d.last().map(|d| (d.a.is_none(), d.key.as_str())),
        Some((true, "members[id=3]"))
    );
}

#[test]
fn config_diff_exits_0_when_equal_1_when_different_2_on_error() {
    use std::process::ExitCode;

    use super::diff::{run, ConfigArgs, ConfigCommand};
    let (dir, out, spec) = example_spec("diff-exit");
    provision(&spec, &out).expect("provision");
    let a = out.join("FW-A/hasync.toml");
    let b = out.join("FW-B/hasync.toml");
    let changed = dir.path().join("changed.toml");
    let text = std::fs::read_to_string(&b).expect("read");
    assert!(text.contains("name = \"untrust\""));
    std::fs::write(
        &changed,
        text.replace("name = \"untrust\"", "name = \"dmz\""),
    )
    .expect("write");
    let diff = |a: &Path, b: &Path| {
        run(&ConfigArgs {
            command: ConfigCommand::Diff {
                a: a.to_owned(),
                b: b.to_owned(),
            },
        })
    };
    assert_eq!(diff(&a, &b), ExitCode::SUCCESS);
    assert_eq!(diff(&a, &changed), ExitCode::from(1));
    assert_eq!(
        diff(&a, &dir.path().join("missing.toml")),
        ExitCode::from(2)
    );
    let check = |files: Vec<PathBuf>| {
        run(&ConfigArgs {
            command: ConfigCommand::Check { files },
        })
    };
    assert_eq!(check(vec![a.clone(), b.clone()]), ExitCode::SUCCESS);
    assert_eq!(
        check(vec![a, dir.path().join("missing.toml")]),
        ExitCode::FAILURE
    );
}

#[test]
fn the_example_parses_and_interface_names_are_quoted_for_the_shell() {
    assert!(Spec::parse(Path::new("example.toml"), EXAMPLE_SPEC).is_ok());
    assert_eq!(shell_quote("eth0.100"), "eth0.100");
    assert_eq!(shell_quote("a b"), "'a b'");
    assert_eq!(shell_quote("x'$(id)"), r"'x'\''$(id)'");
    assert!(is_safe_dir_name("FW-A_1.2"));
    for bad in ["", ".", "..", "a/b", "a b"] {
        assert!(!is_safe_dir_name(bad), "{bad:?}");
    }
}

/// An output directory someone else could have filled is refused before anything is written
/// into it: one that others may write, one owned by another user, a member directory that is a
/// symbolic link (its files would land where the link points), a key that is not a plain file,
/// the output given as a link, or below a directory others may write.
#[test]
fn an_output_directory_others_could_fill_is_refused() {
    use std::os::unix::fs::{symlink, PermissionsExt as _};
    let (dir, out, spec) = example_spec("provision-unsafe");
    let refused = |why: &str| {
        let e = provision(&spec, &out).expect_err("refused").to_string();
        assert!(e.contains(why), "{e}");
    };

    std::fs::create_dir(&out).expect("mkdir");
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    refused("is writable by group or others (mode 0777)");
    assert!(!out.join("cluster.key").exists(), "nothing written");
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    std::os::unix::fs::chown(&out, Some(12345), None).expect("chown (tests run as root)");
    refused("is owned by uid 12345");
    std::os::unix::fs::chown(&out, Some(0), None).expect("chown");

    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("mkdir");
    symlink(&elsewhere, out.join("FW-B")).expect("symlink");
    refused("FW-B is a symbolic link");
    assert_eq!(std::fs::read_dir(&elsewhere).expect("list").count(), 0);
    std::fs::remove_file(out.join("FW-B")).expect("unlink");

    symlink(spec.as_path(), out.join("cluster.key")).expect("symlink");
    refused("cluster.key is not a regular file");
    std::fs::remove_file(out.join("cluster.key")).expect("unlink");
    assert_eq!(
        std::fs::read_dir(&out).expect("list").count(),
        0,
        "nothing written"
    );

    // The output given as a link, or below a directory others may write.
    let linked = dir.path().join("linked");
    symlink(&out, &linked).expect("symlink");
    let e = provision(&spec, &linked).expect_err("refused").to_string();
    assert!(e.contains("linked is a symbolic link"), "{e}");
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let e = provision(&spec, &shared.join("out"))
        .expect_err("refused")
        .to_string();
    assert!(e.contains("shared is writable by group or others"), "{e}");
    // Sticky, as /tmp is: only an entry's owner or the directory's may rename what is in it.
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    std::os::unix::fs::chown(&shared, Some(12345), None).expect("chown");
    let e = provision(&spec, &shared.join("out"))
        .expect_err("refused")
        .to_string();
    assert!(e.contains("shared is owned by uid 12345"), "{e}");
    std::os::unix::fs::chown(&shared, Some(0), None).expect("chown");
    provision(&spec, &shared.join("out")).expect("a sticky directory of root's");

    provision(&spec, &out).expect("a directory of our own");
}

/// A key that ends up readable by others (a file system without modes gives it the mount's)
/// is named with what to do; before, the run said nothing and the agent refused the key at
/// install.
#[test]
fn a_key_others_can_read_after_writing_is_warned_about() {
    let dir = TempDir::new("provision-key-mode");
    let key = dir.path().join("cluster.key");
    std::fs::write(&key, [7u8; 32]).expect("write");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    assert_eq!(super::loose_key_warning(&key), None);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let warning = super::loose_key_warning(&key).expect("a warning");
    assert!(
        warning.contains("has mode 0644") && warning.contains("install -m 0600"),
        "{warning}"
    );
}

/// Provisioning again into an output whose key others can read (on vfat every file has the
/// mount's mode) works, and warns: before, the second run was refused, the configs checked
/// against that key's mode.
#[test]
fn a_second_run_over_a_key_others_can_read_provisions() {
    let (_dir, out, spec) = example_spec("provision-rerun-loose");
    provision(&spec, &out).expect("first run");
    let key = out.join("cluster.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let again = provision(&spec, &out).expect("second run");
    assert!(!again.new_key, "the key is kept");
    assert!(super::loose_key_warning(&again.key).is_some());
}

/// The example provisioned in a directory named after `tag` (kept while it lives), and FW-A's
/// config as loaded, its zone interfaces on this host (loopback stands in for them).
fn provisioned_here(tag: &str) -> (TempDir, Config) {
    let (dir, out, spec) = example_spec(tag);
    provision(&spec, &out).expect("provision");
    let mut c = Config::load(&out.join("FW-A").join("hasync.toml")).expect("load");
    for zone in &mut c.zones {
        zone.interfaces = vec!["lo".into()];
    }
    (dir, c)
}

/// `hasync config check` names a `control_group` this host does not have (the start refuses
/// it), as a warning: the file may be for another host.
#[test]
fn config_check_warns_of_a_control_group_this_host_lacks() {
    let (_dir, mut c) = provisioned_here("check-group");
    assert_eq!(diff::host_warnings(&c), Vec::<String>::new());
    c.local.control_group = Some("root".into());
    assert_eq!(
        diff::host_warnings(&c),
        Vec::<String>::new(),
        "a group every host has"
    );
    c.local.control_group = Some("hasync-no-such-group".into());
    let warnings = diff::host_warnings(&c);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("\"hasync-no-such-group\": no such group on this host"),
        "{warnings:?}"
    );
}

/// `--out` given relative to the working directory provisions a second time (adding a member
/// is a second run): before, the existing key was checked by its relative path, which the
/// config check refuses ("must be an absolute path"; seen failing).
#[test]
fn a_second_run_into_a_relative_directory_provisions() {
    let (_dir, out, spec) = example_spec("provision-rerun-relative");
    let cwd = std::env::current_dir().expect("working directory");
    let up = cwd.components().count().saturating_sub(1);
    let relative: PathBuf = std::iter::repeat_n(Path::new(".."), up)
        .collect::<PathBuf>()
        .join(out.strip_prefix("/").expect("absolute"));
    assert!(relative.is_relative());
    provision(&spec, &relative).expect("first run");
    let again = provision(&spec, &relative).expect("second run");
    assert!(!again.new_key, "the key is kept");
    assert!(again.key.is_absolute(), "{}", again.key.display());
}

/// A member taken out of the spec leaves its directory from an earlier run, with an old
/// config and the cluster key: the run names it (before, it said nothing, as it does for a
/// disabled member's).
#[test]
fn a_member_taken_out_of_the_spec_is_named_as_left() {
    let (_dir, out, spec) = example_spec("provision-removed");
    provision(&spec, &out).expect("first run");
    let text = std::fs::read_to_string(&spec).expect("spec");
    let start = text.find("[[members]]\nid = 3").expect("FW-C");
    let end = text.find("[timeouts]").expect("timeouts");
    std::fs::write(&spec, format!("{}{}", &text[..start], &text[end..])).expect("write");
    std::fs::create_dir(out.join("notes")).expect("a directory of the operator's");
    let again = provision(&spec, &out).expect("second run");
    assert_eq!(again.left, [out.join("FW-C")]);
    assert!(again.disabled.is_empty());
}

/// `hasync config check` names a zone interface this host does not have: the agent starts
/// Non-functional until it exists, so a typo would go unnoticed there (before this stop's
/// change, the start failed; the check said nothing of it either way).
#[test]
fn config_check_warns_of_a_zone_interface_this_host_lacks() {
    let (_dir, mut c) = provisioned_here("check-iface");
    if let Some(zone) = c.zones.first_mut() {
        zone.interfaces.push("hsnoiface0".into());
    }
    let warnings = diff::host_warnings(&c);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("interface `hsnoiface0` does not exist on this host"),
        "{warnings:?}"
    );
}
