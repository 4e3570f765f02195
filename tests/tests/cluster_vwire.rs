//! A virtual wire deployment in a cluster (issue 10 §2): each member bridges the client's
//! segment and the server's through a `[[vwire]]` (`in0` ↔ `out0`), with no routing. Only
//! fw1's wire is plugged in at first (two plugged wires between the same two segments would
//! make a loop). A TCP echo connection crosses fw1's wire and its session syncs to fw2; then
//! fw1 dies, its cables are pulled and fw2's plugged in: the connection keeps working through
//! fw2's wire (strict policy: fw2 drops mid-stream segments it has no session for), and fw2
//! takes the session over.

use std::time::{Duration, Instant};

use hasync_agent::{
    control::SessionFilter,
    lab::{
        traffic::{tcp_client, tcp_echo_server, Bounds, TcpClientOptions},
        ClusterOptions, Link, Signal,
    },
};
use hasync_tests::cluster::Cluster;

/// fw2 declares fw1 dead this long after its last keepalive.
const KEEPALIVE_THRESHOLD_MS: u64 = 5_000;
/// The client's and the server's addresses on the wire's segment (a network of their own:
/// the lab's routed networks stay as they are).
const CLIENT: &str = "198.19.5.1";
const SERVER: &str = "198.19.5.2";
const PORT: u16 = 7530;

/// Member `k`'s count of `name`.
fn counter(c: &Cluster, k: u8, name: &str) -> u64 {
    let counters = c.try_counters(k).unwrap_or_else(|e| c.fail(&e));
    counters.get(name).copied().unwrap_or(0)
}

/// Plugs member `k`'s wire in (both cables) or pulls it out.
fn plug(c: &Cluster, k: u8, plugged: bool) {
    let topo = c.topology();
    for link in [Link::In, Link::Out] {
        let done = if plugged {
            topo.cable_up(k, link)
        } else {
            topo.cable_down(k, link)
        };
        done.unwrap_or_else(|e| c.fail(&format!("fw{k} {link} plugged={plugged}: {e}")));
    }
}

#[test]
fn a_peers_virtual_wire_takes_a_connection_over() {
    let c = Cluster::new(
        "cvw-",
        2,
        ClusterOptions {
            vwire: true,
            keepalive_threshold_ms: Some(KEEPALIVE_THRESHOLD_MS),
            ..ClusterOptions::default()
        },
    );
    let topo = c.topology();
    for (ns, addr) in [("client", CLIENT), ("server", SERVER)] {
        topo.ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])
            .unwrap_or_else(|e| c.fail(&format!("{ns} {addr}: {e}")));
    }
    plug(&c, 2, false);
    for k in [1, 2] {
        c.start_member(k);
    }
    for (k, of) in [(1, 1), (2, 2), (2, 1)] {
        c.wait(
            &format!("fw{k} to see fw{of} active"),
            Duration::from_secs(20),
            || {
                let m = c.try_member(k, of)?;
                (m.state == "active" && m.ha4 == "up")
                    .then_some(())
                    .ok_or(format!("{m:?}"))
            },
        );
    }
    let server_addr = (SERVER.parse::<std::net::IpAddr>().expect("ip"), PORT).into();
    let _server = tcp_echo_server(
        topo.server(),
        server_addr,
        Bounds::new(4, Duration::from_secs(60)),
    )
    .expect("TCP echo server");
    let client = tcp_client(
        topo.client(),
        server_addr,
        TcpClientOptions {
            interval: Duration::from_millis(50),
            io_timeout: Duration::from_millis(200),
            bounds: Bounds::new(2_000, Duration::from_secs(60)),
            ..TcpClientOptions::default()
        },
    )
    .unwrap_or_else(|e| c.fail(&format!("TCP across fw1's wire: {e}")));
    client
        .wait_until(Duration::from_secs(5), |p| p.ok >= 5)
        .unwrap_or_else(|| {
            c.fail(&format!(
                "no echoes across fw1's wire: {:?}",
                client.progress()
            ))
        });
    assert!(
        counter(&c, 1, "vwire-forwarded") > 0,
        "fw1's wire carried it"
    );

    // fw1 tracked the connection and fw2 holds its copy.
    let filter = SessionFilter {
        proto: Some("tcp".into()),
        port: Some(PORT),
        ..SessionFilter::default()
    };
    for k in [1, 2] {
        c.wait(
            &format!("fw{k} to hold the connection"),
            Duration::from_secs(10),
            || {
                let v = c.try_sessions(k, filter.clone())?;
                match v.sessions.as_deref() {
                    Some([s]) if s.owner == 1 && s.state == "established" => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        );
    }

    // fw1 dies; its wire is pulled out and fw2's plugged in.
    c.kill_agent(1, Signal::Kill)
        .unwrap_or_else(|e| c.fail(&format!("SIGKILL fw1: {e}")));
    plug(&c, 1, false);
    plug(&c, 2, true);
    let steered = Instant::now();
    let fw2_before = counter(&c, 2, "vwire-forwarded");
    let before = client.progress();
    // (A lost segment waits for TCP's retransmission backoff: a few seconds at most.)
    client
        .wait_ok_after(steered, Duration::from_secs(10))
        .unwrap_or_else(|| {
            c.fail(&format!(
                "no echo across fw2's wire: {:?}; fw2's counters {:?}",
                client.progress(),
                c.try_counters(2)
            ))
        });
    let taken = c.wait(
        "fw2 to take the connection over",
        Duration::from_secs(KEEPALIVE_THRESHOLD_MS / 1000 + 10),
        || {
            let v = c.try_sessions(2, filter.clone())?;
            match v.sessions.as_deref() {
                Some([s]) if s.owner == 2 => Ok(s.state.clone()),
                other => Err(format!("{other:?}")),
            }
        },
    );
    assert_eq!(taken, "established");
    let p = client
        .wait_until(Duration::from_secs(5), |p| p.ok >= before.ok + 20)
        .unwrap_or_else(|| {
            c.fail(&format!(
                "stalled after the takeover: {:?}",
                client.progress()
            ))
        });
    assert!(p.fatal.is_none(), "{p:?}");
    let fw2 = counter(&c, 2, "vwire-forwarded") - fw2_before;
    assert!(fw2 >= 20, "fw2's wire carried {fw2} frames since the steer");
    let end = client.stop();
    assert!(end.fatal.is_none(), "the connection broke: {end:?}");
}
