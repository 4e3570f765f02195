//! Restart without loss (issue 4 §3) and the service's capabilities (§2), with real `hasync`
//! agents in a netns lab (root).
//!
//! - An agent stopped with SIGTERM leaves its datapath pinned and attached: a long-lived TCP
//!   connection through it goes on, counted by the XDP program in the pinned session table;
//!   a connection opened meanwhile gets its session from the datapath alone. Started again,
//!   the agent reuses the table and the links (same session, counters continued), tells
//!   systemd it is ready only once attached, and sync resumes: both the session made while it
//!   was down and one made after reach the peer. `hasync teardown` then leaves nothing.
//! - The agent runs with exactly the capabilities the systemd unit grants, and fails to start
//!   without any one of them, leaving the pinned datapath untouched.

use std::{
    net::SocketAddr,
    os::unix::{fs::PermissionsExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use hasync_agent::{
    config::monitor::{FailureCondition, Monitor, PathGroup},
    control::{
        client::{call, parse},
        view::{SessionView, SessionsView},
        Request, SessionFilter,
    },
    lab::{
        cluster::{AgentState, MemberOverride},
        netns::wait_for,
        topology::{test_prefix, SERVER_V4},
        traffic::{tcp_client, tcp_echo_server, Bounds, TcpClientOptions, TrafficClient},
        ClusterOptions, LabCluster, Link, Topology,
    },
    service::{notify::NOTIFY_SOCKET, unit_text},
};
use hasync_common::{FlowKey, Session};
use hasync_tests::cluster::hasync_binary;

const PORT: u16 = 7000;
const READY: Duration = Duration::from_secs(20);
const IPPROTO_TCP: u8 = 6;

/// A datagram socket standing in for systemd's notify socket.
struct NotifySocket {
    path: PathBuf,
    sock: UnixDatagram,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        NotifySocket { path, sock }
    }

    /// The next notification holding `line`, within `timeout`.
    fn wait(&self, line: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0; 1024];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if text.lines().any(|l| l == line) {
                    return Some(text);
                }
            }
        }
        None
    }
}

fn start(lab: &LabCluster, k: u8, notify: Option<&NotifySocket>) {
    lab.start_agent_with(k, |cmd| {
        if let Some(n) = notify {
            cmd.env(NOTIFY_SOCKET, &n.path);
        }
    })
    .unwrap_or_else(|e| panic!("starting fw{k}: {e}"));
}

fn fail(lab: &LabCluster, msg: &str) -> ! {
    let mut logs = String::new();
    for k in lab.topology().member_ids() {
        logs.push_str(&format!(
            "\n----- fw{k} agent log -----\n{}\n",
            lab.log_tail(k, 40)
        ));
    }
    panic!("{msg}{logs}")
}

/// Member `k`'s TCP sessions to the echo server, through its control socket.
fn tcp_sessions(lab: &LabCluster, k: u8) -> Result<Vec<SessionView>, String> {
    let path = lab.socket_path(k);
    let req = Request::ShowSessions {
        count_only: false,
        filter: SessionFilter {
            proto: Some("tcp".into()),
            port: Some(PORT),
            ..SessionFilter::default()
        },
        offset: 0,
        limit: None,
    };
    let view: SessionsView = call(&path, &req)
        .and_then(|data| parse(&path, data))
        .map_err(|e| format!("fw{k}: {e}"))?;
    Ok(view.sessions.unwrap_or_default())
}

/// Member `k`'s pinned session table, read straight from bpffs: the TCP sessions to the echo
/// server, by client port.
fn pinned_sessions(lab: &LabCluster, k: u8) -> Vec<(u16, Session)> {
    let path = lab.pin_dir(k).join("maps/SESSIONS");
    let Ok(map) = MapData::from_pin(&path) else {
        return Vec::new();
    };
    let map: BpfHashMap<_, FlowKey, Session> =
        BpfHashMap::try_from(Map::LruHashMap(map)).expect("SESSIONS is FlowKey → Session");
    map.iter()
        .filter_map(Result::ok)
        .filter(|(key, _)| key.proto == IPPROTO_TCP)
        .filter_map(|(key, s)| {
            let (lo, hi) = (u16::from_be(key.port_lo), u16::from_be(key.port_hi));
            match (lo, hi) {
                (PORT, client) | (client, PORT) => Some((client, s)),
                _ => None,
            }
        })
        .collect()
}

fn pinned_session(lab: &LabCluster, k: u8, sport: u16) -> Option<Session> {
    pinned_sessions(lab, k)
        .into_iter()
        .find(|(p, _)| *p == sport)
        .map(|(_, s)| s)
}

fn xdp_on(lab: &LabCluster, k: u8, link: Link) -> bool {
    lab.topology()
        .ip(&format!("fw{k}"), &["-d", "link", "show", link.ifname()])
        .is_ok_and(|out| out.contains("prog/xdp"))
}

/// `hasync ARGS` inside member `k`'s namespace.
fn hasync_in(lab: &LabCluster, k: u8, args: &[&str]) -> Output {
    lab.topology()
        .command(&format!("fw{k}"), hasync_binary())
        .expect("command in fwK")
        .args(args)
        .output()
        .expect("run hasync")
}

fn client(lab: &LabCluster) -> TrafficClient {
    let server: SocketAddr = (SERVER_V4, PORT).into();
    let c = tcp_client(
        lab.topology().client(),
        server,
        TcpClientOptions {
            interval: Duration::from_millis(20),
            io_timeout: Duration::from_millis(200),
            bounds: Bounds::new(100_000, Duration::from_secs(180)),
            ..TcpClientOptions::default()
        },
    )
    .unwrap_or_else(|e| fail(lab, &format!("connecting through fw1: {e}")));
    if c.wait_until(Duration::from_secs(5), |p| p.ok >= 3)
        .is_none()
    {
        fail(lab, &format!("no echoes through fw1: {:?}", c.progress()));
    }
    c
}

/// The client port of the one session to the echo server that `known` does not list.
fn new_session(lab: &LabCluster, known: &[u16]) -> u16 {
    wait_for(Duration::from_secs(5), || {
        let ports: Vec<u16> = pinned_sessions(lab, 1)
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| !known.contains(p))
            .collect();
        (ports.len() == 1).then(|| ports[0])
    })
    .unwrap_or_else(|| fail(lab, "the new connection has no session in fw1's table"))
}

#[test]
fn an_agent_restart_loses_no_session_and_no_traffic() {
    let prefix = test_prefix("rs-").expect("prefix");
    let topo = Topology::create(&prefix, 2).expect("create the lab");
    let options = ClusterOptions {
        keepalive_threshold_ms: Some(5_000),
        ..ClusterOptions::default()
    };
    let lab = LabCluster::new(topo, hasync_binary(), options).expect("lab");
    let notify = NotifySocket::bind(lab.dir());

    // READY=1 comes once the program is attached and the control socket is up.
    start(&lab, 1, Some(&notify));
    let ready = notify
        .wait("READY=1", READY)
        .unwrap_or_else(|| fail(&lab, "fw1 never sent READY=1"));
    assert!(ready.contains("STATUS=member 1 of cluster 7"), "{ready}");
    assert!(
        std::os::unix::net::UnixStream::connect(lab.socket_path(1)).is_ok(),
        "READY=1 before the control socket is up"
    );
    assert!(xdp_on(&lab, 1, Link::In) && xdp_on(&lab, 1, Link::Out));
    start(&lab, 2, None);
    for k in [1, 2] {
        lab.wait_ready(k, READY)
            .unwrap_or_else(|e| fail(&lab, &format!("fw{k}: {e}")));
    }

    // A long-lived connection through fw1 (strict policy: no session, no passage).
    let topo = lab.topology();
    let _server = tcp_echo_server(
        topo.server(),
        (SERVER_V4, PORT).into(),
        Bounds::new(8, Duration::from_secs(180)),
    )
    .expect("echo server");
    let long = client(&lab);
    let sport = new_session(&lab, &[]);
    let seen_on_fw2 =
        || tcp_sessions(&lab, 2).is_ok_and(|s| s.iter().any(|v| v.sport == sport && v.owner == 1));
    if wait_for(Duration::from_secs(15), || seen_on_fw2().then_some(())).is_none() {
        fail(&lab, "the connection's session never reached fw2");
    }
    let before = pinned_session(&lab, 1, sport).expect("pinned session");

    // SIGTERM: the agent goes, the datapath stays.
    let status = lab
        .stop_agent(1, Duration::from_secs(10))
        .expect("stop fw1's agent");
    assert!(status.success(), "fw1's agent exited with {status}");
    assert!(
        notify.wait("STOPPING=1", Duration::from_secs(2)).is_some(),
        "no STOPPING=1"
    );
    assert!(lab
        .log_tail(1, 5)
        .contains("datapath left running and pinned"));
    assert!(
        xdp_on(&lab, 1, Link::In) && xdp_on(&lab, 1, Link::Out),
        "XDP detached with the agent"
    );

    // Traffic goes on, through the XDP program: the session counts it.
    let p0 = long.progress();
    let p1 = long
        .wait_until(Duration::from_secs(10), |p| p.ok >= p0.ok + 50)
        .unwrap_or_else(|| {
            fail(
                &lab,
                &format!("echoes stopped with the agent: {:?}", long.progress()),
            )
        });
    let during = pinned_session(&lab, 1, sport).expect("the session while the agent is down");
    assert_eq!(during.created_ns, before.created_ns, "the same session");
    for dir in 0..2 {
        assert!(
            during.packets[dir] >= before.packets[dir] + 50,
            "direction {dir}: {} → {} packets: not counted by XDP while the agent was down",
            before.packets[dir],
            during.packets[dir]
        );
    }
    assert_eq!(
        p1.timeouts, p0.timeouts,
        "the connection stalled while the agent was down"
    );
    // A connection opened meanwhile: the datapath makes its session alone.
    let opened_while_down = client(&lab);
    let down_sport = new_session(&lab, &[sport]);

    // Started again: the same table and links; ready once attached.
    start(&lab, 1, Some(&notify));
    let ready = notify
        .wait("READY=1", READY)
        .unwrap_or_else(|| fail(&lab, "fw1 never sent READY=1 after the restart"));
    assert!(
        ready.contains("sessions kept from the previous run"),
        "{ready}"
    );
    lab.wait_ready(1, READY)
        .unwrap_or_else(|e| fail(&lab, &format!("fw1 after the restart: {e}")));
    let log = lab.log_tail(1, 40);
    for want in [
        "reused=CONFIG,COUNTERS,EMBRYOS,EMBRYO_HEAD,EVENTS,FRAGMENTS,MEMBERS,REPLICA_EMBRYO_HEAD,SESSIONS,ZONES,ZONE_NAMES",
        "reusing the pinned XDP link",
        "restarted=true",
    ] {
        assert!(log.contains(want), "{want:?} not in fw1's log:\n{log}");
    }
    let after = pinned_session(&lab, 1, sport).expect("the session after the restart");
    assert_eq!(after.created_ns, before.created_ns, "the same session");
    assert!(after.packets[0] >= during.packets[0] && after.packets[1] >= during.packets[1]);
    let listed = tcp_sessions(&lab, 1).unwrap_or_else(|e| fail(&lab, &e));
    assert!(
        listed.iter().any(|v| v.sport == sport && v.owner == 1),
        "fw1 does not list the long-lived session: {listed:?}"
    );

    // Sync resumes: the session made while fw1's agent was down, and one made after, reach fw2.
    let opened_after = client(&lab);
    let after_sport = new_session(&lab, &[sport, down_sport]);
    let synced = wait_for(Duration::from_secs(20), || {
        let s = tcp_sessions(&lab, 2).ok()?;
        let has = |p: u16| s.iter().any(|v| v.sport == p && v.owner == 1);
        (has(down_sport) && has(after_sport)).then_some(())
    });
    if synced.is_none() {
        fail(
            &lab,
            &format!(
                "fw2 lacks the sessions of ports {down_sport} (opened while fw1's agent was down) \
                 or {after_sport} (after its restart): {:?}",
                tcp_sessions(&lab, 2)
            ),
        );
    }
    for (name, c) in [
        ("long-lived", long),
        ("opened while down", opened_while_down),
        ("opened after", opened_after),
    ] {
        let p = c.stop();
        assert!(p.fatal.is_none(), "{name} connection broke: {p:?}");
    }

    // Teardown: refused while the agent runs; then it leaves nothing.
    let config = lab.config_path(1);
    let config = config.to_str().expect("utf-8 path");
    let out = hasync_in(&lab, 1, &["teardown", "--config", config]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("the agent is running"),
        "{stderr}"
    );
    lab.stop_agent(1, Duration::from_secs(10))
        .expect("stop fw1's agent");
    let out = hasync_in(&lab, 1, &["teardown", "--config", config]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "teardown: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "detached XDP from in0 (ifindex ",
        "detached XDP from out0 (ifindex ",
        "removed map ",
        "maps/SESSIONS",
    ] {
        assert!(stdout.contains(want), "{want:?} not in:\n{stdout}");
    }
    assert!(!stdout.contains("another network namespace"), "{stdout}");
    assert!(!lab.pin_dir(1).exists(), "pins left behind");
    assert!(!xdp_on(&lab, 1, Link::In) && !xdp_on(&lab, 1, Link::Out));
    let out = hasync_in(&lab, 1, &["teardown", "--config", config]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("nothing to tear down"));
}

/// The bounding set of the unit, as setpriv spells it: `,+bpf,+net_admin,...`.
fn unit_capabilities() -> Vec<String> {
    let unit = unit_text(
        Path::new("/usr/local/sbin/hasync"),
        Path::new("/etc/hasync/hasync.toml"),
    );
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet");
    line.split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect()
}

/// CapEff of process `pid`, as capability numbers.
fn effective_caps(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff")
        .trim();
    let mask = u64::from_str_radix(hex, 16).expect("hex");
    (0..64).filter(|bit| mask & (1 << bit) != 0).collect()
}

#[test]
fn the_agent_needs_exactly_the_capabilities_the_unit_grants() {
    let caps = unit_capabilities();
    assert_eq!(caps, ["bpf", "net_admin", "perfmon", "net_raw", "chown"]);
    let prefix = test_prefix("cap-").expect("prefix");
    // fw2 joins at the end, to sync with fw1 under the same restrictions.
    let topo = Topology::create(&prefix, 2).expect("create the lab");
    // The agent as systemd runs it: root, no new privileges, a bounding set of $CAPS only.
    let scripts = std::env::temp_dir().join(format!("hasync-caps-{}", std::process::id()));
    hasync_agent::files::fresh_dir(&scripts, 0o755).expect("script dir");
    let wrapper = scripts.join("hasync-with-caps");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec setpriv --no-new-privs --inh-caps=-all --bounding-set=-all$CAPS -- {} \"$@\"\n",
            hasync_binary().display()
        ),
    )
    .expect("write wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // fw1 pings the server (a path group): that is what needs CAP_NET_RAW; and gives its
    // control socket to a group (`control_group`): CAP_CHOWN (root without it, and in no
    // group but its own, may not give a file to another group).
    let pings = MemberOverride {
        control_group: Some("nogroup".into()),
        monitor: Some(Monitor {
            path_groups: vec![PathGroup {
                name: "server".into(),
                failure_condition: FailureCondition::Any,
                targets: vec![SERVER_V4.into()],
                interval_ms: 200,
                failures: 10,
            }],
            ..Monitor::default()
        }),
        ..MemberOverride::default()
    };
    let options = ClusterOptions {
        overrides: [(1, pings)].into(),
        ..ClusterOptions::default()
    };
    let lab = LabCluster::new(topo, &wrapper, options).expect("lab");
    let run_member_with = |k: u8, granted: &[&String]| {
        let set: String = granted.iter().map(|c| format!(",+{c}")).collect();
        lab.start_agent_with(k, |cmd| {
            cmd.env("CAPS", &set);
        })
        .expect("start")
    };
    let run_with = |granted: &[&String]| run_member_with(1, granted);

    // All of them: it runs, pins and attaches, with nothing more in its effective set.
    let all: Vec<&String> = caps.iter().collect();
    let pid = run_with(&all);
    lab.wait_ready(1, READY)
        .unwrap_or_else(|e| fail(&lab, &format!("with {caps:?}: {e}")));
    // CAP_CHOWN 0, CAP_NET_ADMIN 12, CAP_NET_RAW 13, CAP_PERFMON 38, CAP_BPF 39.
    assert_eq!(effective_caps(pid), [0, 12, 13, 38, 39]);
    assert!(xdp_on(&lab, 1, Link::In) && lab.pin_dir(1).join("maps/SESSIONS").exists());
    lab.stop_agent(1, Duration::from_secs(10)).expect("stop");

    // Without any one of them it fails to start, and the pinned datapath stays as it was.
    for missing in &caps {
        let granted: Vec<&String> = caps.iter().filter(|c| *c != missing).collect();
        run_with(&granted);
        let status = wait_for(Duration::from_secs(20), || match lab.agent_state(1) {
            AgentState::Exited { status } => Some(status),
            _ => None,
        })
        .unwrap_or_else(|| fail(&lab, &format!("without {missing} the agent keeps running")));
        assert!(!status.success(), "without {missing}: {status}");
        let log = lab.log_tail(1, 400);
        let last_error = log
            .lines()
            .rev()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_default()
            .to_owned();
        assert!(
            last_error.contains("Operation not permitted")
                || last_error.contains("Permission denied"),
            "without {missing}: {last_error}"
        );
        eprintln!(
            "without CAP_{}: {}",
            missing.to_ascii_uppercase(),
            &last_error[..last_error.len().min(160)]
        );
        assert!(xdp_on(&lab, 1, Link::In), "a failed start detached XDP");
    }

    // And all of them again: the pinned datapath is reused.
    run_with(&all);
    lab.wait_ready(1, READY)
        .unwrap_or_else(|e| fail(&lab, &format!("restart with {caps:?}: {e}")));
    assert!(lab.log_tail(1, 20).contains("restarted=true"));

    // Sync works within them too: fw1 reads the sessions it sends with its read program, fw2
    // applies them with its apply program (both BPF_PROG_TEST_RUN).
    run_member_with(2, &all);
    lab.wait_ready(2, READY)
        .unwrap_or_else(|e| fail(&lab, &format!("fw2 with {caps:?}: {e}")));
    let _server = tcp_echo_server(
        lab.topology().server(),
        (SERVER_V4, PORT).into(),
        Bounds::new(2, Duration::from_secs(60)),
    )
    .expect("echo server");
    let _client = client(&lab);
    wait_for(Duration::from_secs(20), || {
        tcp_sessions(&lab, 2)
            .ok()
            .filter(|s| s.iter().any(|v| v.owner == 1))
    })
    .unwrap_or_else(|| {
        fail(
            &lab,
            "fw1's session never reached fw2 with the unit's capabilities",
        )
    });
    drop(lab);
    let _ = std::fs::remove_dir_all(&scripts);
}
