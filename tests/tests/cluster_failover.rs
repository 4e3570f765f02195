//! Failover of a live TCP connection. A long-lived echo connection runs through fw1 (strict
//! policy); fw1 dies (agent killed with SIGKILL, every link down) and traffic is steered to
//! fw2. With session sync, fw2 already holds the session: the connection keeps working both
//! ways, fw2 takes the session over once fw1 is declared dead, and fw2 — not fw1 — writes the
//! traffic-log record when the connection ends. Without session sync the same steer breaks
//! the connection: fw2 drops mid-stream TCP it has no session for. That second run shows the
//! first one can fail.

use std::time::{Duration, Instant};

use hasync_agent::{
    config::ForwardingName,
    control::SessionFilter,
    datapath::DatapathLog,
    lab::{
        cluster::AgentState,
        topology::SERVER_V4,
        traffic::{tcp_echo_server, Bounds},
        ClusterOptions, Link, Signal,
    },
    traffic_log::TrafficRecord,
};
use hasync_tests::cluster::{show, Cluster, Row};

/// fw2 declares fw1 dead this long after its last keepalive.
const KEEPALIVE_THRESHOLD_MS: u64 = 5_000;

fn options(sync: bool) -> ClusterOptions {
    ClusterOptions {
        forwarding: ForwardingName::Kernel,
        keepalive_threshold_ms: Some(KEEPALIVE_THRESHOLD_MS),
        timeouts: [("closed".to_owned(), 1)].into(),
        session_sync: if sync {
            Default::default()
        } else {
            [(2, false)].into()
        },
        ..ClusterOptions::default()
    }
}

/// fw1 dies: its agent is killed and all its links go down; the client and the server are
/// steered to fw2. Returns when the steer happened.
fn fw1_dies(c: &Cluster) -> Instant {
    c.kill_agent(1, Signal::Kill)
        .unwrap_or_else(|e| c.fail(&format!("SIGKILL fw1: {e}")));
    c.wait("fw1's agent to die", Duration::from_secs(5), || {
        match c.agent_state(1) {
            AgentState::Exited { status } => Ok(status),
            other => Err(format!("{other:?}")),
        }
    });
    let topo = c.topology();
    let xdp_left = topo
        .ip("fw1", &["-d", "link", "show", "in0"])
        .map(|s| s.contains("prog/xdp"))
        .unwrap_or(false);
    eprintln!("after SIGKILL, fw1's in0 still has an XDP program attached: {xdp_left}");
    for link in Link::ALL {
        topo.link_down(1, link)
            .unwrap_or_else(|e| c.fail(&format!("fw1 {link} down: {e}")));
    }
    topo.steer(2)
        .unwrap_or_else(|e| c.fail(&format!("steering to fw2: {e}")));
    Instant::now()
}

/// The traffic-log records of member `k` for the connection `row`.
fn log_records(c: &Cluster, k: u8, row: &Row) -> Vec<TrafficRecord> {
    let text = std::fs::read_to_string(c.traffic_log_path(k)).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<TrafficRecord>(l).ok())
        .filter(|r| {
            r.proto == row.proto
                && (r.src, r.sport, r.dst, r.dport) == (row.src, row.sport, row.dst, row.dport)
        })
        .collect()
}

/// Rotates member `k`'s traffic log as logrotate would: renames the file, then sends the agent
/// SIGHUP, which must reopen the path (a new file) and leave the agent running.
fn rotate_traffic_log(c: &Cluster, k: u8) {
    let path = c.traffic_log_path(k);
    let rotated = path.with_extension("rotated");
    std::fs::rename(&path, &rotated)
        .unwrap_or_else(|e| c.fail(&format!("renaming {}: {e}", path.display())));
    c.kill_agent(k, Signal::Hup)
        .unwrap_or_else(|e| c.fail(&format!("SIGHUP to fw{k}: {e}")));
    c.wait(
        &format!("fw{k} to reopen its traffic log after SIGHUP"),
        Duration::from_secs(5),
        || {
            path.exists()
                .then_some(())
                .ok_or_else(|| format!("no {} yet", path.display()))
        },
    );
}

#[test]
fn a_synced_connection_survives_fw1s_death_and_fw2_logs_it() {
    synced_failover("cfo-", 7500, ForwardingName::Kernel);
}

/// The same with `forwarding = "xdp"`: fw1 forwards the established connection in XDP, and
/// fw2, once it has taken the session over, forwards it in XDP too (after its own FIB lookup).
#[test]
fn an_xdp_forwarded_connection_survives_fw1s_death() {
    synced_failover("cfox-", 7520, ForwardingName::Xdp);
}

fn synced_failover(tag: &str, port: u16, forwarding: ForwardingName) {
    let xdp = forwarding == ForwardingName::Xdp;
    let c = Cluster::start(
        tag,
        2,
        ClusterOptions {
            forwarding,
            datapath_log: DatapathLog::Info,
            ..options(true)
        },
    );
    let _server = tcp_echo_server(
        c.topology().server(),
        (SERVER_V4, port).into(),
        Bounds::new(4, Duration::from_secs(60)),
    )
    .expect("TCP echo server");
    let (client, row) = c.tcp_connection_through_fw1(port);
    // fw2 holds the session before anything fails.
    let filter = SessionFilter {
        proto: Some("tcp".into()),
        port: Some(port),
        ..SessionFilter::default()
    };
    c.wait(
        "fw2 to hold the connection",
        Duration::from_secs(10),
        || {
            let v = c.try_sessions(2, filter.clone())?;
            let rows: Vec<Row> = v.sessions.iter().flatten().map(Row::from).collect();
            (rows == [row.clone()])
                .then_some(())
                .ok_or(format!("{rows:?}"))
        },
    );

    if xdp {
        c.wait_forwarded_xdp(1, 0);
    }
    let steered = fw1_dies(&c);
    let before = client.progress();
    let p = client
        .wait_ok_after(steered, Duration::from_secs(5))
        .unwrap_or_else(|| {
            c.fail(&format!(
                "no echo through fw2 after the steer: {:?}",
                client.progress()
            ))
        });
    eprintln!(
        "first echo through fw2 {:.2} s after the steer",
        p.last_ok
            .map_or(0.0, |t| t.duration_since(steered).as_secs_f64())
    );
    // fw2 declares fw1 dead and takes the session over on its next packet.
    let taken = c.wait_owned(
        2,
        &filter,
        2,
        Duration::from_secs(KEEPALIVE_THRESHOLD_MS / 1000 + 10),
    );
    assert_eq!(
        (taken.sport, taken.state.as_str(), taken.zone.as_str()),
        (row.sport, "established", "trust")
    );
    assert_eq!(
        c.try_member(2, 1).map(|m| m.state),
        Ok("down".to_owned()),
        "fw2's view of fw1"
    );
    // Still working after the takeover, both ways: chunks go out and come back intact.
    let after_takeover = Instant::now();
    let fw2_xdp = c.forwarded_xdp(2);
    let p = client
        .wait_until(Duration::from_secs(5), |p| {
            p.last_ok.is_some_and(|t| t > after_takeover) && p.ok >= before.ok + 20
        })
        .unwrap_or_else(|| {
            c.fail(&format!(
                "stalled after the takeover: {:?}",
                client.progress()
            ))
        });
    assert!(p.fatal.is_none(), "{p:?}");
    if xdp {
        // Echoes every 50 ms, both ways: fw2 forwards them in XDP now that it owns the session.
        c.wait(
            "fw2 to forward the connection in XDP",
            Duration::from_secs(5),
            || {
                let n = c.forwarded_xdp(2) - fw2_xdp;
                (n >= 20)
                    .then_some(())
                    .ok_or(format!("{n} forwarded in XDP since the takeover"))
            },
        );
    }
    let counters = c.try_counters(2).unwrap_or_else(|e| c.fail(&e));
    assert!(
        counters.get("takeovers").copied().unwrap_or(0) >= 1,
        "fw2's counters: {counters:?}"
    );
    // ... and its datapath logs it (`datapath_log = "info"`), within a drain.
    let server_end = format!(":{port} from member 1, now version");
    c.wait(
        "fw2's datapath to log the takeover",
        Duration::from_secs(5),
        || {
            let text = std::fs::read_to_string(c.log_path(2)).unwrap_or_default();
            let logged = text.lines().any(|l| {
                l.contains("INFO hasync::datapath: took over session proto 6")
                    && l.contains(&server_end)
            });
            logged
                .then_some(())
                .ok_or("no takeover line yet".to_owned())
        },
    );

    rotate_traffic_log(&c, 2);
    // The connection ends (FINs through fw2): fw2 logs it once, as its owner; fw1 never does.
    let end = client.stop();
    assert!(end.fatal.is_none(), "the connection broke: {end:?}");
    let records = c.wait(
        "fw2's traffic-log record of the connection",
        Duration::from_secs(15),
        || {
            let r = log_records(&c, 2, &row);
            (!r.is_empty()).then_some(r).ok_or_else(|| {
                let now = c.try_sessions(2, filter.clone()).ok();
                format!("no record yet; fw2 lists {now:?}")
            })
        },
    );
    // Give a duplicate the time to show up (two sweeps), then count again.
    std::thread::sleep(Duration::from_millis(2_500));
    let again = log_records(&c, 2, &row);
    assert_eq!(again, records, "fw2 logged the connection again");
    assert_eq!(records.len(), 1, "fw2's records: {records:#?}");
    let r = &records[0];
    assert_eq!((r.owner, r.zone.as_str()), (2, "trust"), "{r:?}");
    assert!(
        r.packets_orig > 0 && r.packets_reply > 0 && r.bytes_reply > 0,
        "both directions counted: {r:?}"
    );
    let fw1 = log_records(&c, 1, &row);
    assert!(fw1.is_empty(), "fw1 logged the connection: {fw1:?}");
    let left = c.try_sessions(2, filter).unwrap_or_else(|e| c.fail(&e));
    assert_eq!(left.total, 0, "fw2 still lists it: {left:?}");
}

#[test]
fn without_session_sync_the_same_failover_breaks_the_connection() {
    const PORT: u16 = 7510;
    let c = Cluster::start("cfon-", 2, options(false));
    let _server = tcp_echo_server(
        c.topology().server(),
        (SERVER_V4, PORT).into(),
        Bounds::new(4, Duration::from_secs(60)),
    )
    .expect("TCP echo server");
    let (client, row) = c.tcp_connection_through_fw1(PORT);
    // fw2 does not hold it, even given time.
    std::thread::sleep(Duration::from_secs(1));
    let t2 = c.try_table(2).unwrap_or_else(|e| c.fail(&e));
    assert!(
        !t2.iter()
            .any(|r| r.sport == row.sport && r.dport == row.dport),
        "fw2 holds the connection without session sync:{}",
        show(&t2, 10)
    );
    let drops_before = c
        .try_counters(2)
        .map(|m| m.get("drop-no-session").copied().unwrap_or(0))
        .unwrap_or_else(|e| c.fail(&e));

    let steered = fw1_dies(&c);
    let stalled = client.wait_ok_after(steered, Duration::from_secs(3));
    let p = client.progress();
    assert!(
        stalled.is_none(),
        "an echo came back through fw2, which has no session for it: {p:?}"
    );
    assert!(
        p.timeouts > 0 && p.last_ok.is_some_and(|t| t < steered),
        "the client should be stalled: {p:?}"
    );
    let drops = c
        .try_counters(2)
        .map(|m| m.get("drop-no-session").copied().unwrap_or(0))
        .unwrap_or_else(|e| c.fail(&e));
    assert!(
        drops > drops_before,
        "fw2 should drop the connection's segments (strict policy): {drops_before} → {drops}"
    );
    drop(client);
}
