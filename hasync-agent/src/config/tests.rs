use std::{io::Write, os::unix::fs::PermissionsExt, path::Path};

use super::*;

/// A key file with `len` bytes and `mode`, removed when dropped.
struct KeyFile(tempdir::Dir);

mod tempdir {
    /// A directory under the system temp dir, removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir().join(format!(
                "hasync-config-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            crate::files::fresh_dir(&p, 0o755).expect("create temp dir");
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl KeyFile {
    fn new(tag: &str, len: usize, mode: u32) -> KeyFile {
        let dir = tempdir::Dir::new(tag);
        let path = dir.0.join("cluster.key");
        let mut f = std::fs::File::create(&path).expect("create key");
        f.write_all(&vec![0x5a; len]).expect("write key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        KeyFile(dir)
    }
    fn path(&self) -> std::path::PathBuf {
        self.0 .0.join("cluster.key")
    }
}

/// A valid configuration of member 1 of two (`sync_timeout_min = 0`), its key file at `key`.
pub(crate) fn sample(key: &Path) -> String {
    format!(
        r#"
[cluster]
id = 7
description = "edge cluster"
key_file = "{}"
keepalive_threshold_ms = 10000
sync_timeout_min = 0
monitor_fail_hold_down_min = 1
tentative_hold_s = 60

[local]
member = 1
control_socket = "/run/hasync/hasync.sock"
traffic_log = "/var/log/hasync/traffic.jsonl"
policy = "strict"

[ha4]
interface = "ha4"
address = "198.18.100.1/24"
[ha4_backup]
interface = "ha4b"
address = "198.18.101.1/24"

[[zones]]
name = "trust"
interfaces = ["veth-in"]
[[zones]]
name = "untrust"
interfaces = ["veth-out"]

[[members]]
id = 1
serial = "fw1"
ha4 = "198.18.100.1"
ha4_backup = "198.18.101.1"
session_sync = true
enabled = true
description = "rack 1"

[[members]]
id = 2
serial = "fw2"
ha4 = "198.18.100.2"
ha4_backup = "198.18.101.2"
"#,
        key.display()
    )
}

fn check(text: &str) -> Result<Config, String> {
    let path = Path::new("test.toml");
    let c = Config::from_toml(path, text).map_err(|e| e.to_string())?;
    c.validate(path).map_err(|e| e.to_string())?;
    Ok(c)
}

/// A zone's `other_protocols` becomes its interfaces' binding; a misspelt value is refused
/// with the key and the accepted values named.
#[test]
fn a_zone_rule_for_other_protocols_reaches_the_datapath() {
    use hasync_common::{OtherProtocols, ZoneBinding, ZoneId};
    let key = KeyFile::new("zone-rule", 32, 0o600);
    let with = |rule: &str| {
        sample(&key.path()).replace(
            "interfaces = [\"veth-out\"]",
            &format!("interfaces = [\"veth-out\"]\nother_protocols = \"{rule}\""),
        )
    };
    let c = check(&with("pass")).expect("valid");
    assert_eq!(c.zones[0].binding(ZoneId(1)), ZoneBinding::new(ZoneId(1)));
    assert_eq!(
        c.zones[1].binding(ZoneId(2)).other_protocols,
        OtherProtocols::Pass as u8
    );
    let c = check(&with("drop")).expect("valid");
    assert_eq!(
        c.zones[1].binding(ZoneId(2)).other_protocols,
        OtherProtocols::Drop as u8
    );
    let e = check(&with("allow")).expect_err("misspelt");
    assert!(e.contains("other_protocols") && e.contains("`drop`"), "{e}");
}

/// A zone's `route_check = false` reaches its interfaces' bindings (and only that zone's),
/// beside a virtual wire's flags on the same interface; `true` is the default; a value of
/// another type is refused with the key named.
#[test]
fn a_zone_may_turn_its_route_check_off() {
    use hasync_common::ZoneBinding;
    let key = KeyFile::new("zone-route", 32, 0o600);
    let with = |rule: &str| {
        sample(&key.path()).replace(
            "interfaces = [\"veth-out\"]",
            &format!("interfaces = [\"veth-out\"]\nroute_check = {rule}"),
        )
    };
    let flags = |c: &Config, ifname: &str| {
        let (_, _, b) = c
            .interface_zones()
            .find(|(i, _, _)| *i == ifname)
            .expect("a zone interface");
        b.flags
    };
    let c = check(&with("false")).expect("valid");
    assert_eq!(flags(&c, "veth-out"), ZoneBinding::NO_ROUTE_CHECK);
    assert_eq!(flags(&c, "veth-in"), 0);
    let c = check(&with("true")).expect("valid");
    assert_eq!(flags(&c, "veth-out"), 0);
    let wired = format!(
        "{}\n[[vwire]]\nname = \"vw\"\ninterfaces = [\"veth-in\", \"veth-out\"]\n",
        with("false")
    );
    let c = check(&wired).expect("valid");
    assert_eq!(
        flags(&c, "veth-out"),
        ZoneBinding::NO_ROUTE_CHECK | ZoneBinding::VWIRE
    );
    assert_eq!(flags(&c, "veth-in"), ZoneBinding::VWIRE);
    let e = check(&with("\"off\"")).expect_err("a string");
    assert!(e.contains("route_check"), "{e}");
}

#[test]
fn the_documented_example_is_valid() {
    let key = KeyFile::new("ok", 32, 0o600);
    let c = check(&sample(&key.path())).expect("valid");
    assert_eq!(c.cluster.id, ClusterId(7));
    assert_eq!(c.local_member(), MemberId(1));
    assert_eq!(c.zone_names(), vec!["trust", "untrust"]);
    assert_eq!(c.datapath().policy, Policy::Strict as u8);
    // The metrics and dashboard server listens on loopback unless told otherwise.
    assert_eq!(c.http_addr(), Some(DEFAULT_HTTP.parse().unwrap()));
    let c =
        check(&sample(&key.path()).replace("policy = \"strict\"", "http = \"\"")).expect("valid");
    assert_eq!(c.http_addr(), None, "empty disables it");
    let c =
        check(&sample(&key.path()).replace("policy = \"strict\"", "http = \"[fd00:100::1]:8080\""))
            .expect("valid");
    assert_eq!(c.http_addr(), Some("[fd00:100::1]:8080".parse().unwrap()));
}

/// Each row: a replacement applied to the valid sample, and a fragment the error must contain.
#[test]
fn invalid_values_are_named_with_their_range() {
    let key = KeyFile::new("rows", 32, 0o600);
    let base = sample(&key.path());
    let rows: &[(&str, &str, &str)] = &[
        (
            "id = 7\n",
            "id = 0\n",
            "cluster.id = 0 is out of range 1–99",
        ),
        (
            "id = 7\n",
            "id = 100\n",
            "cluster.id = 100 is out of range 1–99",
        ),
        // Past an id's byte: refused while parsing, named the same way.
        (
            "id = 7\n",
            "id = 300\n",
            "cluster id 300 is out of range 1–99",
        ),
        (
            "id = 7\n",
            "id = -1\n",
            "cluster id -1 is out of range 1–99",
        ),
        (
            "member = 1\n",
            "member = 256\n",
            "member id 256 is out of range 1–16",
        ),
        (
            "id = 2\nserial",
            "id = 1000\nserial",
            "member id 1000 is out of range 1–16",
        ),
        (
            "member = 1\n",
            "member = \"fw1\"\n",
            "invalid type: string \"fw1\", expected a member id, an integer 1–16",
        ),
        (
            "keepalive_threshold_ms = 10000",
            "keepalive_threshold_ms = 4999",
            "cluster.keepalive_threshold_ms = 4999 is out of range 5000–60000",
        ),
        (
            "sync_timeout_min = 0",
            "sync_timeout_min = 31",
            "cluster.sync_timeout_min = 31 is out of range 0–30",
        ),
        (
            "monitor_fail_hold_down_min = 1",
            "monitor_fail_hold_down_min = 0",
            "cluster.monitor_fail_hold_down_min = 0 is out of range 1–60",
        ),
        (
            "tentative_hold_s = 60",
            "tentative_hold_s = 5",
            "cluster.tentative_hold_s = 5 is out of range: 0, or 10–600",
        ),
        (
            "member = 1\n",
            "member = 17\n",
            "local.member = 17 is out of range 1–16",
        ),
        (
            "member = 1\n",
            "member = 1\nsession_capacity = 1024\nembryonic_capacity = 257\n",
            "local.embryonic_capacity = 257 is out of range 1–256",
        ),
        (
            "member = 1\n",
            "member = 1\nsession_capacity = 3\nembryonic_capacity = 1\n",
            "local.embryonic_capacity = 1 does not fit: local.session_capacity = 3 leaves no room",
        ),
        (
            "name = \"trust\"",
            "name = \"éééééééééééééééé\"",
            "zones[0].name = \"éééééééééééééééé\" must be 1–31 bytes long (it is 32)",
        ),
        (
            "interfaces = [\"veth-in\"]",
            "interfaces = [\"veth-in\", \"veth-in\"]",
            "zones[0].interfaces lists \"veth-in\" twice",
        ),
        (
            "member = 1\n",
            "member = 1\nsession_capacity = 1024\nreplica_limit = 1025\n",
            "local.replica_limit = 1025 is out of range 1–1024",
        ),
        (
            "member = 1\n",
            "member = 1\nreplica_limit = 0\n",
            "local.replica_limit = 0 is out of range 1–1048576",
        ),
        (
            "member = 1\n",
            "member = 3\n",
            "local.member = 3 is missing from [[members]]",
        ),
        (
            "member = 1\n",
            "member = 1\nmax_flaps = 17\n",
            "local.max_flaps = 17 is out of range 0–16",
        ),
        (
            "id = 2\nserial",
            "id = 1\nserial",
            "members[1].id = 1 is used by two members",
        ),
        (
            "serial = \"fw2\"",
            "serial = \"fw1\"",
            "members[1].serial = \"fw1\" is used by two members",
        ),
        (
            "serial = \"fw2\"",
            "serial = \"fw2\\nrm -rf /\"",
            "members[1].serial = \"fw2\\nrm -rf /\" holds a control character",
        ),
        (
            "interfaces = [\"veth-out\"]",
            "interfaces = [\"veth-in\"]",
            "interface \"veth-in\" is in two zones: \"trust\" and \"untrust\"",
        ),
        (
            "name = \"untrust\"",
            "name = \"trust\"",
            "zones[1].name = \"trust\" is defined twice",
        ),
        (
            "address = \"198.18.100.1/24\"",
            "address = \"198.18.100.1\"",
            "ha4.address: \"198.18.100.1\" has no prefix length",
        ),
        (
            "address = \"198.18.100.1/24\"",
            "address = \"198.18.100.9/24\"",
            "ha4.address = \"198.18.100.9/24\" does not match members[id=1].ha4 = 198.18.100.1",
        ),
        (
            "address = \"198.18.101.1/24\"",
            "address = \"198.18.101.9/24\"",
            "ha4_backup.address = \"198.18.101.9/24\" does not match members[id=1].ha4_backup = 198.18.101.1",
        ),
        (
            "enabled = true",
            "enabled = false",
            "members[id=1] is the local member but enabled = false",
        ),
        (
            "policy = \"strict\"",
            "policy = \"lenient\"",
            "unknown variant `lenient`",
        ),
        (
            "interfaces = [\"veth-out\"]",
            "interfaces = [\"ha4b\"]",
            "\"ha4b\" is a sync interface",
        ),
        (
            "policy = \"strict\"",
            "policy = \"strict\"\npin_dir = \"bpf/hasync\"",
            "local.pin_dir = \"bpf/hasync\" must be an absolute path",
        ),
        (
            "policy = \"strict\"",
            "policy = \"strict\"\npin_dir = \"/sys/fs/bpf/\"",
            "local.pin_dir = \"/sys/fs/bpf/\" is the bpffs mount itself",
        ),
        (
            "policy = \"strict\"",
            "policy = \"strict\"\npin_dir = \"/sys/fs/bpf/hasync.v2\"",
            "bpffs does not allow dots in names",
        ),
        (
            "policy = \"strict\"",
            "policy = \"strict\"\nhttp = \"localhost\"",
            "local.http = \"localhost\" is not an address with a port",
        ),
        (
            "address = \"198.18.101.1/24\"",
            "address = \"198.18.100.1/24\"",
            "ha4_backup.address = \"198.18.100.1/24\" is ha4's address",
        ),
        (
            "interfaces = [\"veth-out\"]",
            "interfaces = [\"eth0:1\"]",
            "zones[1].interfaces: interface name \"eth0:1\" is invalid: it contains `/`, `:`",
        ),
        (
            "control_socket = \"/run/hasync/hasync.sock\"",
            "control_socket = \"hasync.sock\"",
            "local.control_socket = \"hasync.sock\" must be an absolute path",
        ),
        (
            "traffic_log = \"/var/log/hasync/traffic.jsonl\"",
            "traffic_log = \"traffic.jsonl\"",
            "local.traffic_log = \"traffic.jsonl\" must be an absolute path",
        ),
    ];
    for (from, to, expect) in rows {
        assert!(base.contains(from), "row {to:?}: sample lacks {from:?}");
        let text = base.replacen(from, to, 1);
        match check(&text) {
            Ok(_) => panic!("row {to:?}: accepted, expected an error containing {expect:?}"),
            Err(e) => assert!(
                e.contains(expect),
                "row {to:?}: error\n{e}\ndoes not contain {expect:?}"
            ),
        }
    }
}

/// More routed interfaces than XDP forwarding can send to, or more wires than the datapath
/// holds, are refused by the check, not at start (found by a review: the start failed, or
/// the port check failed every second once the interfaces existed).
#[test]
fn more_ports_than_the_forwarding_maps_hold_are_refused() {
    let key = KeyFile::new("ports", 32, 0o600);
    let max = hasync_common::maps::PORTS_CAPACITY as usize;
    let interfaces: Vec<String> = (0..=max).map(|i| format!("\"p{i}\"")).collect();
    let wires: String = (0..=max / 2)
        .map(|i| format!("[[vwire]]\nname = \"w{i}\"\ninterfaces = [\"wa{i}\", \"wb{i}\"]\n"))
        .collect();
    let ends: Vec<String> = (0..=max / 2)
        .flat_map(|i| [format!("\"wa{i}\""), format!("\"wb{i}\"")])
        .collect();
    let zones = format!(
        "[[zones]]\nname = \"many\"\ninterfaces = [{}]\n[[zones]]\nname = \"wires\"\ninterfaces = [{}]\n{wires}",
        interfaces.join(", "),
        ends.join(", ")
    );
    let text = sample(&key.path())
        .replace(
            "[[members]]\nid = 1",
            &format!("{zones}[[members]]\nid = 1"),
        )
        .replace("[local]\n", "[local]\nforwarding = \"xdp\"\n");
    let e = check(&text).expect_err("too many ports");
    assert!(
        e.contains(&format!(
            "routed zone interfaces are more than the {max} forwarding in XDP can send to"
        )),
        "{e}"
    );
    assert!(
        e.contains(&format!(
            "{} virtual wires are more than the {} the datapath holds",
            max / 2 + 1,
            max / 2
        )),
        "{e}"
    );
}

/// More zones than the datapath records are refused by the check, not at start.
#[test]
fn more_zones_than_the_datapath_records_are_refused() {
    let key = KeyFile::new("zones", 32, 0o600);
    let max = hasync_common::maps::MAX_ZONES;
    let extra: String = (0..max)
        .map(|i| format!("[[zones]]\nname = \"z{i}\"\ninterfaces = [\"zif{i}\"]\n"))
        .collect();
    let text = sample(&key.path()).replace(
        "[[members]]\nid = 1",
        &format!("{extra}[[members]]\nid = 1"),
    );
    let e = check(&text).expect_err("too many zones");
    assert!(
        e.contains(&format!(
            "{} zones are more than the {max} the datapath records",
            max + 2
        )),
        "{e}"
    );
}

/// A key file another user owns (its owner can read and replace the key; the service, without
/// CAP_DAC_OVERRIDE, may not read it) or that is no regular file is refused by name.
#[test]
fn a_key_file_owned_by_another_user_is_refused() {
    use std::os::unix::fs::MetadataExt as _;
    let key = KeyFile::new("owner", 32, 0o600);
    let ours = std::fs::metadata(key.path()).expect("stat").uid();
    let other = if ours == 4242 { 4243 } else { 4242 };
    std::os::unix::fs::chown(key.path(), Some(other), None).expect("chown (tests run as root)");
    let e = check(&sample(&key.path())).expect_err("another owner");
    assert!(e.contains(&format!("is owned by uid {other}")), "{e}");
    let dir = key.0 .0.clone();
    let e = check(&sample(&dir)).expect_err("a directory");
    assert!(e.contains("is not a regular file"), "{e}");
}

#[test]
fn the_datapath_is_pinned_unless_pin_dir_is_empty() {
    let key = KeyFile::new("pin", 32, 0o600);
    let c = check(&sample(&key.path())).expect("valid");
    assert_eq!(c.pin_dir(), Some(Path::new("/sys/fs/bpf/hasync")));
    let text = sample(&key.path()).replace("policy = \"strict\"", "pin_dir = \"\"");
    assert_eq!(check(&text).expect("valid").pin_dir(), None);
    let text = sample(&key.path()).replace("policy = \"strict\"", "pin_dir = \"/sys/fs/bpf/fw1\"");
    assert_eq!(
        check(&text).expect("valid").pin_dir(),
        Some(Path::new("/sys/fs/bpf/fw1"))
    );
}

#[test]
fn ipv6_sync_addresses_work() {
    let key = KeyFile::new("v6", 32, 0o600);
    let text = sample(&key.path())
        .replace("198.18.100.1/24", "fd00:100::1/64")
        .replace("ha4 = \"198.18.100.1\"", "ha4 = \"fd00:100::1\"")
        .replace("198.18.100.2", "fd00:100::2");
    let c = check(&text).expect("IPv6 HA4 is valid");
    assert!(c.members[0].ha4.is_ipv6());
}

#[test]
fn short_or_exposed_key_files_are_refused() {
    let short = KeyFile::new("short", 31, 0o600);
    let e = check(&sample(&short.path())).expect_err("short key");
    assert!(
        e.contains("holds 31 bytes; at least 32 are required"),
        "{e}"
    );
    let exposed = KeyFile::new("exposed", 32, 0o644);
    let e = check(&sample(&exposed.path())).expect_err("world-readable key");
    assert!(
        e.contains("mode 0644: it must not be readable by group or others"),
        "{e}"
    );
    let e = check(&sample(Path::new("/nonexistent/hasync.key"))).expect_err("missing key");
    assert!(e.contains("cannot read it"), "{e}");
}

/// A relative key file is refused, even one found from where the check runs: the service
/// runs from `/`, and would not find it.
#[test]
fn a_relative_key_file_is_refused() {
    let key = KeyFile::new("relative", 32, 0o600);
    let cwd = std::env::current_dir().expect("cwd");
    let up = "../".repeat(cwd.components().count().saturating_sub(1));
    let relative = format!(
        "{up}{}",
        key.path().display().to_string().trim_start_matches('/')
    );
    assert!(
        Path::new(&relative).is_file(),
        "{relative} reaches the key from here"
    );
    let e = check(&sample(Path::new(&relative))).expect_err("relative key");
    assert!(
        e.contains(&format!(
            "cluster.key_file = \"{relative}\" must be an absolute path"
        )),
        "{e}"
    );
}

#[test]
fn more_than_sixteen_members_is_refused() {
    let key = KeyFile::new("many", 32, 0o600);
    let mut text = sample(&key.path());
    for id in 3..=17 {
        text.push_str(&format!(
            "\n[[members]]\nid = {id}\nserial = \"fw{id}\"\nha4 = \"198.18.100.{id}\"\n"
        ));
    }
    let e = check(&text).expect_err("17 members");
    assert!(
        e.contains("17 [[members]] is more than the maximum of 16"),
        "{e}"
    );
    assert!(
        e.contains("members[16].id = 17 is out of range 1–16"),
        "{e}"
    );
}

/// The datapath's peers' pool learns the cluster's size, its enabled members (its default
/// limit follows it).
#[test]
fn the_start_plan_counts_the_members() {
    let key = KeyFile::new("size", 32, 0o600);
    let mut text = sample(&key.path());
    let plan = crate::startup::StartPlan::from_config(&check(&text).expect("valid"));
    assert_eq!(plan.opts.cluster_members, 2);
    for id in 3..=16 {
        text.push_str(&format!(
            "\n[[members]]\nid = {id}\nserial = \"fw{id}\"\nha4 = \"198.18.100.{id}\"\n"
        ));
    }
    let plan = crate::startup::StartPlan::from_config(&check(&text).expect("16 members"));
    assert_eq!(plan.opts.cluster_members, 16);
    let text = text.replace("serial = \"fw16\"", "serial = \"fw16\"\nenabled = false");
    let plan = crate::startup::StartPlan::from_config(&check(&text).expect("one disabled"));
    assert_eq!(
        plan.opts.cluster_members, 15,
        "disabled members hold nothing here"
    );
}

#[test]
fn unknown_keys_and_timeouts_are_named() {
    let key = KeyFile::new("unknown", 32, 0o600);
    let e = check(&sample(&key.path()).replace("policy = \"strict\"", "polcy = \"strict\""))
        .expect_err("typo");
    assert!(e.contains("unknown field `polcy`"), "{e}");
    let e = check(&format!(
        "{}\n[timeouts]\nestablised = 10\n",
        sample(&key.path())
    ))
    .expect_err("bad state");
    assert!(
        e.contains("timeouts.establised is not a session state"),
        "{e}"
    );
    let c = check(&format!(
        "{}\n[timeouts]\nestablished = 10\n",
        sample(&key.path())
    ))
    .expect("good state");
    assert_eq!(
        c.datapath().timeouts_ns[State::Established as usize],
        10_000_000_000
    );
}

/// A timeout written at its default stays in what members compare, as in every earlier
/// release: members of those hash the lines as written (the provisioning example writes
/// `established = 3600`), so leaving it out made an upgraded member a configuration mismatch.
#[test]
fn a_timeout_written_at_its_default_is_compared_as_written() {
    let key = KeyFile::new("fp-timeouts", 32, 0o600);
    let base = sample(&key.path());
    let plain = check(&base).expect("valid");
    let spelled = check(&format!("{base}\n[timeouts]\nestablished = 3600\n")).expect("valid");
    assert!(spelled
        .agreed_lines()
        .contains(&"timeouts.established = 3600".to_string()));
    assert_eq!(
        differing_sections(&plain.fingerprint(), &spelled.fingerprint()),
        vec![AgreedSection::Timeouts]
    );
}

#[test]
fn fingerprint_follows_what_members_must_agree_on() {
    let key = KeyFile::new("fp", 32, 0o600);
    let a = check(&sample(&key.path())).expect("valid");
    let mut b = a.clone();
    b.local.member = MemberId(2);
    b.ha4.address = "198.18.100.2/24".into();
    assert_eq!(
        a.fingerprint(),
        b.fingerprint(),
        "local settings do not change the fingerprint"
    );
    b.zones[1].name = "dmz".into();
    assert_ne!(a.fingerprint(), b.fingerprint(), "zone names do");
}

#[test]
fn monitor_groups_are_checked_and_their_hold_down_may_be_seconds() {
    let key = KeyFile::new("monitor", 32, 0o600);
    let base = sample(&key.path());
    let good = "\n[[monitor.link_groups]]\nname = \"uplinks\"\nfailure_condition = \"all\"\n\
                interfaces = [\"veth-in\", \"veth-out\"]\n\n[[monitor.path_groups]]\n\
                name = \"gateway\"\ntargets = [\"198.18.1.1\", \"fd00:18:1::1\"]\n";
    let c = check(&format!("{base}{good}")).expect("valid");
    assert_eq!(c.monitor.link_groups[0].interfaces.len(), 2);
    let path = &c.monitor.path_groups[0];
    assert_eq!((path.interval_ms, path.failures), (200, 10), "defaults");
    assert!(path.failure_condition.fails(1, 2), "any is the default");
    assert!(!c.monitor.link_groups[0].failure_condition.fails(1, 2));
    assert!(c.monitor.link_groups[0].failure_condition.fails(2, 2));
    assert_eq!(c.monitor_hold_down(), std::time::Duration::from_secs(60));
    // Seconds take the place of minutes, and only then enter the fingerprint.
    let secs = base.replace(
        "monitor_fail_hold_down_min = 1",
        "monitor_fail_hold_down_min = 1\nmonitor_fail_hold_down_s = 3",
    );
    let s = check(&secs).expect("valid");
    assert_eq!(s.monitor_hold_down(), std::time::Duration::from_secs(3));
    assert_ne!(s.fingerprint(), c.fingerprint());
    assert_eq!(c.fingerprint(), check(&base).expect("valid").fingerprint());

    for (text, problem) in [
        (
            good.replace("gateway", "uplinks"),
            "monitor.path_groups[0].name = \"uplinks\" is used by two monitor groups",
        ),
        (
            good.replace("\"198.18.1.1\"", "\"224.0.0.1\""),
            "monitor.path_groups[0].targets: 224.0.0.1 cannot test a path: it is multicast",
        ),
        (
            good.replace("\"fd00:18:1::1\"", "\"fe80::1\""),
            "monitor.path_groups[0].targets: fe80::1 cannot test a path: it is link-local",
        ),
        (
            good.replace("\"198.18.1.1\"", "\"255.255.255.255\""),
            "monitor.path_groups[0].targets: 255.255.255.255 cannot test a path: it is broadcast",
        ),
        (
            good.replace("\"198.18.1.1\"", "\"127.0.0.1\""),
            "monitor.path_groups[0].targets: 127.0.0.1 cannot test a path: it is loopback",
        ),
        (
            good.replace("\"veth-in\"", "\"veth-out\""),
            "monitor.link_groups[0].interfaces lists \"veth-out\" twice",
        ),
        (
            good.replace(
                "targets = [\"198.18.1.1\", \"fd00:18:1::1\"]",
                "targets = []",
            ),
            "monitor.path_groups[0] \"gateway\" monitors nothing",
        ),
        (
            format!("{good}interval_ms = 10\n"),
            "monitor.path_groups[0].interval_ms = 10 is out of range 50–60000",
        ),
        (
            format!("{good}failures = 0\n"),
            "monitor.path_groups[0].failures = 0 is out of range 1–100",
        ),
        (good.replace("\"all\"", "\"most\""), "failure_condition"),
    ] {
        let e = check(&format!("{base}{text}")).expect_err(problem);
        assert!(e.contains(problem), "{e}\nshould say: {problem}");
    }
    let e = check(&secs.replace("_s = 3", "_s = 0")).expect_err("zero");
    assert!(
        e.contains("cluster.monitor_fail_hold_down_s = 0 is out of range 1–3600"),
        "{e}"
    );
}

/// `[local] forwarding` and `[[vwire]]` reach the datapath: its mode, and the wire bits of the
/// wire's ends' bindings.
#[test]
fn forwarding_and_wires_reach_the_datapath() {
    use hasync_common::{Forwarding, ZoneBinding};
    let key = KeyFile::new("vwire", 32, 0o600);
    let text = sample(&key.path()).replace("policy = \"strict\"", "forwarding = \"xdp\"")
        + "\n[[vwire]]\nname = \"vw0\"\ninterfaces = [\"veth-in\", \"veth-out\"]\nnon_ip = \"drop\"\n";
    let c = check(&text).expect("valid");
    let dp = c.datapath();
    assert_eq!(dp.forwarding, Forwarding::Xdp as u8);
    assert_eq!(dp.vwire, 1);
    let wire = ZoneBinding::VWIRE | ZoneBinding::NON_IP_DROP;
    for (name, _, binding) in c.interface_zones() {
        assert_eq!(binding.flags, wire, "{name}");
    }
    let c = check(&sample(&key.path())).expect("valid");
    assert_eq!(
        c.datapath().forwarding,
        Forwarding::Kernel as u8,
        "the default"
    );
    assert_eq!(c.datapath().vwire, 0);
    assert_eq!(
        u64::from(c.datapath().claim_quiet_ms),
        c.cluster.keepalive_threshold_ms,
        "a peer's claim waits out the keepalive threshold"
    );
    assert!(c.interface_zones().all(|(_, _, b)| b.flags == 0));
    let e = check(&sample(&key.path()).replace("policy = \"strict\"", "forwarding = \"fast\""))
        .expect_err("unknown mode");
    assert!(e.contains("fast") && e.contains("`kernel`"), "{e}");
}

/// Every way a wire can be wrong is named, all at once.
#[test]
fn bad_wires_are_named() {
    let key = KeyFile::new("vwire-bad", 32, 0o600);
    let text = sample(&key.path())
        + "\n[[vwire]]\nname = \"a\"\ninterfaces = [\"veth-in\"]\n\
           [[vwire]]\nname = \"b\"\ninterfaces = [\"veth-in\", \"nozone0\"]\n\
           [[vwire]]\nname = \"b\"\ninterfaces = [\"veth-out\", \"veth-out\"]\n";
    let e = check(&text).expect_err("invalid");
    for want in [
        "vwire[0].interfaces has 1 interface(s): a virtual wire joins exactly two",
        "vwire[1].interfaces: \"nozone0\" is in no zone",
        "interface \"veth-in\" is in two virtual wires: \"a\" and \"b\"",
        "vwire[2].name = \"b\" is defined twice",
        "vwire[2].interfaces: \"veth-out\" is both ends of the wire",
    ] {
        assert!(e.contains(want), "missing {want:?} in {e}");
    }
}

/// `[local] datapath_log`: the default is `warn`, and a level that does not exist is named
/// with the ones that do. (The failover test checks that `info` reaches the datapath.)
#[test]
fn datapath_log_levels_are_read_and_unknown_ones_named() {
    use crate::datapath::DatapathLog;
    let key = KeyFile::new("datapath-log", 32, 0o600);
    let c = check(&sample(&key.path())).expect("valid");
    assert_eq!(c.local.datapath_log, DatapathLog::Warn);
    let text = sample(&key.path()).replace("policy = \"strict\"", "datapath_log = \"debug\"");
    let c = check(&text).expect("valid");
    assert_eq!(c.local.datapath_log, DatapathLog::Debug);
    let e = check(&sample(&key.path()).replace("policy = \"strict\"", "datapath_log = \"loud\""))
        .expect_err("unknown level");
    assert!(e.contains("loud") && e.contains("`debug`"), "{e}");
    assert_eq!("info".parse(), Ok(DatapathLog::Info));
    assert!("loud"
        .parse::<DatapathLog>()
        .unwrap_err()
        .contains("off, error, warn"));
}

/// Sync addresses that could never connect are named, not accepted: a peer of the other family
/// than its link, two enabled members at one address, a backup link the local member has no
/// address for. Seen failing (all three accepted) before these checks.
#[test]
fn unusable_sync_addresses_are_refused_and_named() {
    let key = KeyFile::new("sync-addrs", 32, 0o600);
    let base = sample(&key.path());
    let cases = [
        (
            base.replace("ha4 = \"198.18.100.2\"", "ha4 = \"fd00:100::2\""),
            "members[1].ha4 = fd00:100::2 is not of the family",
        ),
        (
            base.replace("ha4 = \"198.18.100.2\"", "ha4 = \"198.18.100.1\""),
            "members[1].ha4 = 198.18.100.1 is also member 1's",
        ),
        (
            base.replacen("ha4_backup = \"198.18.101.1\"\n", "", 1),
            "has no ha4_backup address",
        ),
    ];
    // Addresses a member can be neither dialled at nor admitted from.
    let unusable = [
        ("fe80::2", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("224.0.0.2", "multicast"),
        ("ff02::2", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("::ffff:198.18.100.2", "IPv4-mapped"),
    ];
    let cases = cases.into_iter().chain(unusable.map(|(addr, why)| {
        (
            base.replace("ha4 = \"198.18.100.2\"", &format!("ha4 = \"{addr}\"")),
            format!("members[1].ha4 = {addr} is {why}").leak() as &str,
        )
    }));
    for (text, named) in cases {
        let err = check(&text).expect_err(named);
        assert!(err.contains(named), "{named:?} not in: {err}");
    }
    // Still valid: a disabled member at another's address (an old entry whose address a
    // replacement took), and this member without its [ha4_backup] link (taken out here alone).
    let disabled = base.replacen(
        "ha4 = \"198.18.100.2\"",
        "ha4 = \"198.18.100.1\"\nenabled = false",
        1,
    );
    let no_link = base.replace(
        "[ha4_backup]\ninterface = \"ha4b\"\naddress = \"198.18.101.1/24\"\n",
        "",
    );
    for text in [disabled, no_link] {
        check(&text).unwrap_or_else(|e| panic!("refused: {e}\n{text}"));
    }
}
