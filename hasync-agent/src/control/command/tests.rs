use std::path::Path;

use clap::Parser as _;

use super::*;
use crate::{
    cli::{Cli, Command},
    control::{
        serve,
        testing::{fake_runtime, TempDir},
    },
};

fn parse(args: &[&str]) -> Result<Command, clap::Error> {
    Cli::try_parse_from(["hasync"].iter().chain(args).copied()).map(|cli| cli.command)
}

fn show_args(args: &[&str]) -> ShowArgs {
    match parse(args).expect("parse") {
        Command::Show(a) => a,
        other => panic!("not a show command: {other:?}"),
    }
}

#[test]
fn session_options_become_a_filtered_paged_request() {
    let a = show_args(&[
        "show",
        "cluster",
        "sessions",
        "--count",
        "--owner",
        "2",
        "--zone",
        "trust",
        "--proto",
        "udp",
        "--address",
        "2001:db8::1",
        "--port",
        "53",
        "--state",
        "udp-replied",
        "--offset",
        "5",
        "--limit",
        "10",
        "--socket",
        "/tmp/x.sock",
    ]);
    let ShowCommand::Cluster(ShowClusterArgs {
        what: ClusterCommand::Sessions(s),
    }) = a.what
    else {
        panic!("sessions");
    };
    assert_eq!(s.connect.socket.as_deref(), Some(Path::new("/tmp/x.sock")));
    assert_eq!(
        s.request(),
        Request::ShowSessions {
            count_only: true,
            filter: SessionFilter {
                owner: Some(2),
                zone: Some("trust".into()),
                proto: Some("udp".into()),
                address: Some("2001:db8::1".parse().unwrap()),
                port: Some(53),
                state: Some("udp-replied".into()),
            },
            offset: 5,
            limit: Some(10),
        }
    );
    // Defaults: the first 1000, no filter.
    let a = show_args(&["show", "cluster", "sessions"]);
    let ShowCommand::Cluster(ShowClusterArgs {
        what: ClusterCommand::Sessions(s),
    }) = a.what
    else {
        panic!("sessions");
    };
    assert_eq!(
        s.request(),
        Request::ShowSessions {
            count_only: false,
            filter: SessionFilter::default(),
            offset: 0,
            limit: Some(1000),
        }
    );
    assert_eq!(s.connect.socket_path().unwrap(), Path::new(DEFAULT_SOCKET));
}

#[test]
fn bad_options_are_refused_naming_the_value() {
    for (args, want) in [
        (
            &["show", "cluster", "sessions", "--owner", "17"][..],
            "owner 17 is out of range 1–16",
        ),
        (
            &["show", "cluster", "sessions", "--proto", "sctp"],
            "invalid value 'sctp'",
        ),
        (
            &["show", "cluster", "sessions", "--state", "open"],
            "invalid value 'open'",
        ),
        (
            &["show", "cluster", "sessions", "--limit", "0"],
            "limit 0 is out of range 1–100000",
        ),
        (
            &["show", "cluster", "sessions", "--address", "1.2.3"],
            "invalid IP address",
        ),
        (&["show", "cluster", "sessions", "--port", "65536"], "65536"),
        (
            &["show", "cluster", "sessions", "--swept"],
            "the following required arguments were not provided",
        ),
        (
            &[
                "show", "cluster", "sessions", "--count", "--swept", "--owner", "1",
            ],
            "cannot be used with",
        ),
        (
            &[
                "show", "cluster", "members", "--socket", "a", "--config", "b",
            ],
            "cannot be used with",
        ),
        (
            &["show", "cluster", "everything"],
            "unrecognized subcommand",
        ),
    ] {
        let e = parse(args).expect_err("refused").to_string();
        assert!(e.contains(want), "{args:?}: {e}");
    }
    for args in [
        &["show", "cluster", "members", "--json"][..],
        &["show", "cluster", "statistics"],
        &[
            "show",
            "cluster",
            "flaps",
            "--config",
            "/etc/hasync/hasync.toml",
        ],
        &["show", "counters", "--prefix", "err-", "--json"],
        &["suspend"],
        &["functional", "--socket", "/tmp/s"],
    ] {
        parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }
}

#[test]
fn the_socket_can_come_from_the_configuration_file() {
    let dir = TempDir::new("control-config");
    let file = dir.path().join("hasync.toml");
    // The key file does not exist: `show` does not need it.
    std::fs::write(
        &file,
        r#"
[cluster]
id = 7
key_file = "/nonexistent/cluster.key"

[local]
member = 1
control_socket = "/run/hasync-lab/m1.sock"

[ha4]
interface = "ha0"
address = "198.18.100.1/24"
"#,
    )
    .unwrap();
    let connect = ConnectArgs {
        socket: None,
        config: Some(file.clone()),
    };
    assert_eq!(
        connect.socket_path().unwrap(),
        Path::new("/run/hasync-lab/m1.sock")
    );
    let missing = ConnectArgs {
        socket: None,
        config: Some(dir.path().join("nope.toml")),
    };
    let e = format!("{:#}", missing.socket_path().unwrap_err());
    assert!(
        e.contains("cannot read config file") && e.contains("nope.toml"),
        "{e}"
    );
}

/// Runs `hasync ARGS` (a show command) against the fake agent listening on `socket`.
async fn run(socket: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut argv: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    argv.push("--socket".into());
    argv.push(socket.display().to_string());
    tokio::task::spawn_blocking(move || {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut out = Vec::new();
        match parse(&argv).expect("parse") {
            Command::Show(a) => show_to(&a, &mut out)?,
            Command::Suspend(c) => change_state(&c, Request::Suspend {}, &mut out)?,
            Command::Functional(c) => change_state(&c, Request::Functional {}, &mut out)?,
            other => panic!("{other:?}"),
        }
        Ok(String::from_utf8(out).unwrap())
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn show_prints_aligned_tables_from_the_agent() {
    let dir = TempDir::new("control-show");
    let socket = dir.path().join("hasync.sock");
    let (tx, _runtime) = fake_runtime();
    let _server = serve(&socket, tx).await.unwrap();

    assert_eq!(
        run(&socket, &["show", "cluster", "members"]).await.unwrap(),
        "\
Cluster 7, local member 1

ID  Serial          State   HA4   HA4 backup      Sessions  Flaps  Version  Last change
*1  FW-A            active  up    not-configured         2      0  1.0      1h 2m ago
12  FW-LONG-SERIAL  down    down  not-configured         1      3  -        never
(* this member)

This member is non-functional:
  - link group `uplinks`: out0 down
warning: zones differ from member 12's (only here: dmz)
"
    );

    assert_eq!(
        run(&socket, &["show", "cluster", "sessions"])
            .await
            .unwrap(),
        "\
Proto  Source       Sport  Destination   Dport  State        Owner  Zone      Idle
tcp    198.18.0.10  40000  198.18.1.10     443  established      1  trust    2.0 s
udp    198.18.1.10   5353  198.18.0.255     53  udp-replied      2  untrust  2.0 s
tcp    198.18.0.11  40001  198.18.1.10      22  syn-sent         1  -        2.0 s

3 sessions (member 1: 2, member 2: 1)
"
    );

    assert_eq!(
        run(
            &socket,
            &["show", "cluster", "sessions", "--limit", "1", "--offset", "1"]
        )
        .await
        .unwrap(),
        "\
Proto  Source       Sport  Destination   Dport  State        Owner  Zone      Idle
udp    198.18.1.10   5353  198.18.0.255     53  udp-replied      2  untrust  2.0 s

3 sessions (member 1: 2, member 2: 1)
showing 2–2 of 3; use --offset/--limit
"
    );

    assert_eq!(
        run(
            &socket,
            &["show", "cluster", "sessions", "--count", "--proto", "tcp"]
        )
        .await
        .unwrap(),
        "\
2 matching sessions
Owner  Sessions
    1         2
"
    );

    assert_eq!(
        run(
            &socket,
            &["show", "cluster", "sessions", "--count", "--swept"]
        )
        .await
        .unwrap(),
        "\
3 sessions, as the expiry sweep counted them 2.0 s ago
Owner  Sessions
    1         2
    2         1
"
    );

    assert_eq!(
        run(
            &socket,
            &["show", "cluster", "sessions", "--address", "10.9.9.9"]
        )
        .await
        .unwrap(),
        "no matching sessions\n"
    );

    assert_eq!(
        run(&socket, &["show", "counters", "--prefix", "err-tcp"])
            .await
            .unwrap(),
        "\
Counter              Value
err-tcp-truncated        0
err-tcp-data-offset      0
err-tcp-flags            2
"
    );

    assert_eq!(
        run(&socket, &["show", "cluster", "flaps"]).await.unwrap(),
        "\
Member  Flaps  Last change
     1      0  59s ago
     2      4  1d 1h ago
"
    );

    let stats = run(&socket, &["show", "cluster", "statistics"])
        .await
        .unwrap();
    for want in [
        "Peer  Link        Records sent  Records recv  Frames sent",
        "   2  ha4                  120             0            2",
        "   2  ha4-backup             0             0            0",
        "Peer  Resent  Installed  Deleted  Kept (local)  Orphaned  Refused (zone)  Refused (owner)  Lag p50 (ms)  Lag p99 (ms)",
        "   2       0          0        0             0         0               0                0           4.2           4.2",
        "   2     1        812           120         0          -             -  -",
        "bad-key              1",
        "zone-unknown         0",
    ] {
        assert!(stats.contains(want), "missing {want:?} in\n{stats}");
    }

    assert_eq!(
        run(&socket, &["suspend"]).await.unwrap(),
        "member 1 is suspended\n"
    );
    assert_eq!(
        run(&socket, &["functional"]).await.unwrap(),
        "member 1 is tentative\n"
    );
}

#[tokio::test]
async fn json_prints_the_answer_as_is_and_errors_name_the_problem() {
    let dir = TempDir::new("control-json");
    let socket = dir.path().join("hasync.sock");
    let (tx, _runtime) = fake_runtime();
    let _server = serve(&socket, tx).await.unwrap();

    let out = run(
        &socket,
        &["show", "cluster", "sessions", "--count", "--json"],
    )
    .await
    .unwrap();
    let data: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        data,
        serde_json::json!({"total": 3, "by_owner": {"1": 2, "2": 1}, "embryonic": 2,
            "capacity": 65536, "embryonic_capacity": 8192})
    );

    let out = run(&socket, &["show", "cluster", "members", "--json"])
        .await
        .unwrap();
    let data: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(data["members"][1]["serial"], "FW-LONG-SERIAL");
    assert_eq!(data["members"][1]["last_change"], serde_json::Value::Null);

    let e = run(&socket, &["show", "cluster", "sessions", "--zone", "dmz"])
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "the agent refused the request: zone \"dmz\" is not configured (known: trust, untrust)"
    );

    let gone = dir.path().join("gone.sock");
    let e = run(&gone, &["show", "cluster", "members"])
        .await
        .unwrap_err();
    assert!(
        e.to_string().starts_with("agent not running: socket"),
        "{e}"
    );
}

#[test]
fn counters_show_the_peers_pool_under_the_table() {
    let mut c = hasync_common::Counters::default();
    c.add(hasync_common::Counter::ReplicasOverLimit, 4);
    let v = CountersView::new(&c, None).with_pool(Some((3, 49_152)));
    let mut out = Vec::new();
    render_counters(&v, &mut out).expect("render");
    let text = String::from_utf8(out).expect("utf-8");
    assert!(text.contains("replicas-over-limit"), "{text}");
    let pool = "Peers' pool: 3 of 49152 sessions ([local] replica_limit)\n";
    assert!(text.ends_with(pool), "{text}");
}

/// A state change the agent could not keep across restarts (`hasync suspend`'s mark not
/// written) prints the state it reached and fails with what a restart would do.
#[test]
fn a_state_change_not_kept_prints_the_state_and_fails() {
    let mut out = Vec::new();
    let kept = serde_json::json!({ "member": 1, "state": "suspended" });
    super::report_state(kept, &mut out).expect("kept");
    let not_kept = serde_json::json!({
        "member": 1,
        "state": "suspended",
        "not_kept": "a restart would bring it back into service: disk full",
    });
    let e = super::report_state(not_kept, &mut out).expect_err("not kept");
    assert!(
        e.to_string().contains("a restart would bring it back"),
        "{e}"
    );
    let printed = String::from_utf8(out).expect("utf-8");
    assert_eq!(printed, "member 1 is suspended\nmember 1 is suspended\n");
}
