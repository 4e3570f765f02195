//! Table pressure in a netns lab, as the issue reproduced it (issue 9 §1): members that hold
//! 1,024 sessions, one idle established TCP connection through fw1, then 4,096 new UDP flows
//! through fw1 that nothing answers, then data on the connection. The data must be echoed
//! within seconds. With the old LRU table the flood pushed the connection's session out, the
//! strict policy dropped its next segments and the client timed out.
//!
//! fw1 must also show how it coped: the oldest embryonic flows evicted (counted under
//! `evicted-udp-new`, each logged with `"reason":"evicted"` or counted in a line of the
//! unfinished sessions left out of the log, at most 100 a second), no more of them held than the
//! embryonic share of the table, the table never full, the connection still established.
//! `tests/table_pressure.rs` proves the same through `BPF_PROG_TEST_RUN`; this test goes
//! through running agents, veths and real sockets.

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use hasync_agent::{
    control::SessionFilter,
    lab::{
        netns::run_in,
        topology::{CLIENT_V4, SERVER_V4},
        traffic::{tcp_echo_server, Bounds},
        ClusterOptions,
    },
    traffic_log::{EndReason, TrafficRecord},
};
use hasync_common::Counter;
use hasync_tests::cluster::{Cluster, Row};

/// The issue's table: 1,024 sessions.
const SESSION_CAPACITY: u32 = 1024;
/// Embryonic sessions a member holds at most: `embryonic_capacity`'s default, an eighth of the
/// table (cut into one part per possible CPU, so at most this many up to 128 CPUs).
const EMBRYONIC: u64 = SESSION_CAPACITY as u64 / 8;
/// New UDP flows in the flood, one source port each, from `FIRST_PORT` on.
const FLOWS: u16 = 4096;
const FIRST_PORT: u16 = 20_000;
/// Datagrams sent back to back before the sink is read and the sender pauses, so the veth
/// queues on the way never overflow.
const BURST: u16 = 64;
/// The flood's time limit (it takes well under a second).
const FLOOD_LIMIT: Duration = Duration::from_secs(10);
/// The server's TCP echo port, and the port where the flood's datagrams are read (not answered).
const TCP_PORT: u16 = 7600;
const SINK_PORT: u16 = 7601;
/// How long an echo on the connection may take: a few retransmissions, not a stall.
const ECHO_WITHIN: Duration = Duration::from_secs(3);

/// Sends `msg` on `conn` and reads its echo within `within`; returns how long it took.
fn echo(conn: &mut TcpStream, msg: &[u8], within: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    conn.write_all(msg).map_err(|e| format!("sending: {e}"))?;
    let mut back = vec![0; msg.len()];
    let mut filled = 0;
    while filled < back.len() {
        let left = within.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(format!(
                "no echo within {within:?} ({filled} of {} bytes back)",
                msg.len()
            ));
        }
        conn.set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match conn.read(&mut back[filled..]) {
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(n) => filled += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the echo: {e}")),
        }
    }
    if back != msg {
        return Err(format!("the echo {back:?} differs from {msg:?}"));
    }
    Ok(start.elapsed())
}

/// Datagrams waiting on `sink` (non-blocking), read and dropped.
fn drain(sink: &UdpSocket, buf: &mut [u8]) -> Result<u32, String> {
    let mut n = 0;
    loop {
        match sink.recv(buf) {
            Ok(_) => n += 1,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the sink: {e}")),
        }
    }
}

/// The flood, from the client namespace `ns`: one datagram from each of `FLOWS` source ports
/// (a socket bound per flow, closed after its datagram) to `sink`, a socket in the server
/// namespace that reads them and never answers. Bursts of `BURST`, at most `FLOOD_LIMIT`.
/// Returns the datagrams sent and those that reached the server (each made a session on its
/// way through fw1).
fn flood(ns: &str, sink: &UdpSocket) -> Result<(u32, u32), String> {
    let to = sink.local_addr().map_err(|e| e.to_string())?;
    sink.set_nonblocking(true).map_err(|e| e.to_string())?;
    let run = run_in(ns, || -> Result<(u32, u32), String> {
        let deadline = Instant::now() + FLOOD_LIMIT;
        let (mut sent, mut delivered) = (0u32, 0u32);
        let mut buf = [0u8; 64];
        for i in 0..FLOWS {
            if Instant::now() >= deadline {
                return Err(format!(
                    "only {sent} of {FLOWS} flows sent within {FLOOD_LIMIT:?}"
                ));
            }
            let from = SocketAddr::from((CLIENT_V4, FIRST_PORT + i));
            let s = UdpSocket::bind(from).map_err(|e| format!("binding {from}: {e}"))?;
            s.send_to(format!("flow {i}").as_bytes(), to)
                .map_err(|e| format!("flow {i} from {from}: {e}"))?;
            sent += 1;
            if (i + 1) % BURST == 0 {
                delivered += drain(sink, &mut buf)?;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // The last datagrams on their way: read until 200 ms pass quietly.
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_millis(200) && Instant::now() < deadline {
            let n = drain(sink, &mut buf)?;
            if n > 0 {
                delivered += n;
                quiet_since = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok((sent, delivered))
    });
    run.map_err(|e| e.to_string())?
}

/// Member `k`'s traffic-log records.
fn log_records(c: &Cluster, k: u8) -> Vec<TrafficRecord> {
    let text = std::fs::read_to_string(c.traffic_log_path(k)).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<TrafficRecord>(l).ok())
        .collect()
}

/// Member `k`'s count of unfinished sessions its traffic log left out (the lines that count
/// them: at most 100 get a line of their own a second).
fn not_logged(c: &Cluster, k: u8) -> u64 {
    let text = std::fs::read_to_string(c.traffic_log_path(k)).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["not_logged"] == "unfinished")
        .filter_map(|v| v["sessions"].as_u64())
        .sum()
}

/// fw1's counters this test reads.
const WATCHED: [Counter; 7] = [
    Counter::Creates,
    Counter::EvictedUdpNew,
    Counter::EvictedOther,
    Counter::DropTableFull,
    Counter::DropNoSession,
    Counter::CreateFailed,
    Counter::RingbufFull,
];

/// How far each of the [`WATCHED`] counters went from `before` to `after`.
fn delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<&'static str, u64> {
    let get = |m: &BTreeMap<String, u64>, n: &str| m.get(n).copied().unwrap_or(0);
    WATCHED
        .iter()
        .map(|c| {
            (
                c.name(),
                get(after, c.name()).saturating_sub(get(before, c.name())),
            )
        })
        .collect()
}

#[test]
fn an_idle_connection_survives_a_flood_of_new_flows_in_a_small_table() {
    let test_start = Instant::now();
    let c = Cluster::start(
        "ctp-",
        2,
        ClusterOptions {
            session_capacity: SESSION_CAPACITY,
            ..ClusterOptions::default()
        },
    );
    for k in [1, 2] {
        c.wait_active(k, Duration::from_secs(20));
    }
    let topo = c.topology();
    let server: SocketAddr = (SERVER_V4, TCP_PORT).into();
    let _echo = tcp_echo_server(
        topo.server(),
        server,
        Bounds::new(1, Duration::from_secs(60)),
    )
    .unwrap_or_else(|e| c.fail(&format!("TCP echo server: {e}")));
    let sink = run_in(topo.server(), || UdpSocket::bind((SERVER_V4, SINK_PORT)))
        .map_err(|e| e.to_string())
        .and_then(|s| s.map_err(|e| e.to_string()))
        .unwrap_or_else(|e| c.fail(&format!("the sink on {SERVER_V4}:{SINK_PORT}: {e}")));

    // The connection: through fw1, data echoed, established on fw1. Then it idles.
    let mut conn = run_in(topo.client(), || {
        TcpStream::connect_timeout(&server, Duration::from_secs(3))
    })
    .map_err(|e| e.to_string())
    .and_then(|s| s.map_err(|e| e.to_string()))
    .unwrap_or_else(|e| c.fail(&format!("connecting to {server} through fw1: {e}")));
    conn.set_nodelay(true)
        .unwrap_or_else(|e| c.fail(&format!("TCP_NODELAY: {e}")));
    echo(&mut conn, b"before the flood", ECHO_WITHIN)
        .unwrap_or_else(|e| c.fail(&format!("the connection before the flood: {e}")));
    let tcp = SessionFilter {
        proto: Some("tcp".into()),
        port: Some(TCP_PORT),
        ..SessionFilter::default()
    };
    let row = c.wait(
        "fw1 to list the connection, established",
        Duration::from_secs(5),
        || {
            let v = c.try_sessions(1, tcp.clone())?;
            match v.sessions.as_deref() {
                Some([s]) if s.state == "established" && s.owner == 1 => Ok(Row::from(s)),
                other => Err(format!("{other:?}")),
            }
        },
    );
    let idle_since = Instant::now();
    let before = c.try_counters(1).unwrap_or_else(|e| c.fail(&e));

    // The flood, while the connection idles.
    let flood_start = Instant::now();
    let (sent, delivered) =
        flood(topo.client(), &sink).unwrap_or_else(|e| c.fail(&format!("the flood: {e}")));
    let flood_took = flood_start.elapsed();
    let after_flood = c.try_counters(1).unwrap_or_else(|e| c.fail(&e));

    // Data on the connection: echoed, within seconds.
    let idle = idle_since.elapsed();
    let took = echo(&mut conn, b"after the flood", ECHO_WITHIN);
    let after = c.try_counters(1).unwrap_or_else(|e| c.fail(&e));
    let flood_delta = delta(&before, &after_flood);
    let d = |c: Counter| flood_delta.get(c.name()).copied().unwrap_or(0);
    eprintln!(
        "flood: {sent} flows sent, {delivered} reached the server, in {:.2} s; \
         connection idle {:.2} s; fw1's counters over the flood: {flood_delta:?}",
        flood_took.as_secs_f64(),
        idle.as_secs_f64(),
    );
    let took = took.unwrap_or_else(|e| {
        c.fail(&format!(
            "data on the idle connection after the flood: {e}; fw1's counters over the flood \
             and the data: {:?}",
            delta(&before, &after)
        ))
    });
    eprintln!(
        "the connection's data was echoed {:.1} ms after it was sent",
        took.as_secs_f64() * 1e3
    );

    // The flood was real: more new flows reached the server through fw1 than its table holds.
    assert_eq!(sent, u32::from(FLOWS));
    assert!(
        delivered > SESSION_CAPACITY,
        "only {delivered} of {sent} flows reached the server: the flood did not exceed the table"
    );
    assert!(
        d(Counter::Creates) >= u64::from(delivered),
        "fw1 made fewer sessions than flows reached the server: {flood_delta:?}"
    );
    // fw1 evicted the embryonic flows beyond its embryonic share, and nothing else: the table
    // never filled, no segment of the connection was dropped.
    assert!(
        d(Counter::EvictedUdpNew) >= u64::from(delivered) - EMBRYONIC,
        "fw1 evicted too few of {delivered} embryonic flows: {flood_delta:?}"
    );
    for name in [
        Counter::EvictedOther,
        Counter::DropTableFull,
        Counter::CreateFailed,
    ] {
        assert_eq!(d(name), 0, "{}: {flood_delta:?}", name.name());
    }
    let dropped = delta(&before, &after)[Counter::DropNoSession.name()];
    assert_eq!(dropped, 0, "fw1 dropped segments of the connection");

    // What fw1 holds now: the connection, established, and at most its embryonic share of the
    // flood.
    let now = c.try_sessions(1, tcp).unwrap_or_else(|e| c.fail(&e));
    let rows: Vec<Row> = now.sessions.iter().flatten().map(Row::from).collect();
    assert_eq!(
        rows,
        std::slice::from_ref(&row),
        "fw1's sessions of the connection"
    );
    let held = c
        .try_count(
            1,
            SessionFilter {
                proto: Some("udp".into()),
                port: Some(SINK_PORT),
                ..SessionFilter::default()
            },
        )
        .unwrap_or_else(|e| c.fail(&e));
    eprintln!(
        "fw1 holds {} of the flood's flows ({} embryonic at most)",
        held.total, EMBRYONIC
    );
    assert!(
        held.total <= EMBRYONIC,
        "fw1 holds {} of the flood's flows, more than its embryonic share {EMBRYONIC}",
        held.total
    );
    assert!(
        d(Counter::EvictedUdpNew) + held.total >= u64::from(delivered),
        "of {delivered} flows, fw1 holds {} and evicted {}: some vanished uncounted",
        held.total,
        d(Counter::EvictedUdpNew)
    );

    // fw1, the flows' owner, logged each eviction as such or counted it among those left out
    // (all of them, unless the event ring overflowed), and did not log the connection.
    let is_flood = |r: &TrafficRecord| {
        r.proto == "udp"
            && r.src == CLIENT_V4
            && r.dport == SINK_PORT
            && (FIRST_PORT..FIRST_PORT + FLOWS).contains(&r.sport)
    };
    let expected = if d(Counter::RingbufFull) == 0 {
        d(Counter::EvictedUdpNew)
    } else {
        1
    };
    let evicted = c.wait("fw1 to log evicted flows", Duration::from_secs(5), || {
        let records = log_records(&c, 1);
        let n = records
            .iter()
            .filter(|r| is_flood(r) && r.reason == EndReason::Evicted)
            .count() as u64;
        let left_out = not_logged(&c, 1);
        (n + left_out >= expected).then_some(records).ok_or_else(|| {
            format!("{n} records with \"reason\":\"evicted\" and {left_out} counted, expected {expected}")
        })
    });
    let flood_records: Vec<&TrafficRecord> = evicted.iter().filter(|r| is_flood(r)).collect();
    assert!(
        flood_records
            .iter()
            .all(|r| r.reason == EndReason::Evicted && r.owner == 1 && r.packets_reply == 0),
        "records of the flood's flows: {:#?}",
        &flood_records[..flood_records.len().min(5)]
    );
    let text = std::fs::read_to_string(c.traffic_log_path(1)).unwrap_or_default();
    assert!(
        text.contains(r#""reason":"evicted""#),
        "fw1's traffic log has no \"reason\":\"evicted\" line"
    );
    let ended: Vec<&TrafficRecord> = evicted
        .iter()
        .filter(|r| r.proto == "tcp" && r.sport == row.sport && r.dport == TCP_PORT)
        .collect();
    assert!(
        ended.is_empty(),
        "fw1 logged the connection as ended: {ended:?}"
    );
    let fw2_rejected = c
        .try_statistics(2)
        .map(|s| s.rejected.get("table-full").copied().unwrap_or(0));
    eprintln!(
        "fw1 logged {} of the flood's flows as evicted (counter: {}); fw2 lists {:?} sessions, \
         refused {fw2_rejected:?} records as table-full; test took {:.1} s",
        flood_records.len(),
        d(Counter::EvictedUdpNew),
        c.try_count(2, SessionFilter::default()).map(|v| v.total),
        test_start.elapsed().as_secs_f64()
    );
}
