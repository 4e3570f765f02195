//! A virtual wire deployment in a cluster (issue 10 §2): each member bridges the client's
//! segment and the server's through a `[[vwire]]` (`in0` ↔ `out0`), with no routing. Only
//! fw1's wire is plugged in at first (two plugged wires between the same two segments would
//! make a loop). A TCP echo connection crosses fw1's wire and its session syncs to fw2; then
//! fw1 dies, its cables are pulled and fw2's plugged in: the connection keeps working through
//! fw2's wire (strict policy: fw2 drops mid-stream segments it has no session for), and fw2
//! takes the session over. Before that, fw1's client-side end leaves its namespace and comes
//! back with its index: the kernel deletes a device's DEVMAP entries when it unregisters, and
//! the agent writes the wire again (before stop 51 the plan did not change, nothing was
//! written, and the wire dropped everything until a restart).

use std::time::{Duration, Instant};

use hasync_agent::{
    control::SessionFilter,
    lab::{
        traffic::{tcp_echo_server, Bounds},
        ClusterOptions, Link, Signal,
    },
};
use hasync_tests::{cluster::Cluster, netns::Lab};

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

/// Member `k`'s index of its interface on `link`.
fn ifindex(c: &Cluster, k: u8, link: Link) -> u32 {
    let shown = c
        .topology()
        .ip(&format!("fw{k}"), &["-o", "link", "show", link.ifname()])
        .unwrap_or_else(|e| c.fail(&format!("fw{k} {link}: {e}")));
    let index = shown.split(':').next().and_then(|i| i.trim().parse().ok());
    index.unwrap_or_else(|| c.fail(&format!("fw{k} {link}: no index in {shown:?}")))
}

/// Moves member 1's client-side wire end into another namespace and back (it keeps its
/// index), and sets it up again.
fn move_out_and_back(c: &Cluster) {
    let lab = Lab::new("cvw").unwrap_or_else(|e| c.fail(&format!("lab: {e}")));
    let park = lab
        .netns("park")
        .unwrap_or_else(|e| c.fail(&format!("a namespace: {e}")));
    let (topo, end) = (c.topology(), Link::In.ifname());
    let before = ifindex(c, 1, Link::In);
    let failed = |e: &dyn std::fmt::Display| c.fail(&format!("moving fw1's {end}: {e}"));
    topo.ip("fw1", &["link", "set", end, "netns", park.name()])
        .unwrap_or_else(|e| failed(&e));
    park.ip(&["link", "set", end, "netns", topo.fw(1)])
        .unwrap_or_else(|e| failed(&e));
    topo.ip("fw1", &["link", "set", end, "up"])
        .unwrap_or_else(|e| failed(&e));
    assert_eq!(
        ifindex(c, 1, Link::In),
        before,
        "the end came back with its index"
    );
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
    c.wait_pair_active();
    let server_addr = (SERVER.parse::<std::net::IpAddr>().expect("ip"), PORT).into();
    let _server = tcp_echo_server(
        topo.server(),
        server_addr,
        Bounds::new(4, Duration::from_secs(60)),
    )
    .expect("TCP echo server");
    let client = c.echo_client(server_addr, "across fw1's wire");
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
        let row = c.wait_owned(k, &filter, 1, Duration::from_secs(10));
        assert_eq!(row.state, "established", "fw{k}");
    }

    // fw1's end leaves and comes back: the wire carries the connection again.
    let before = client.progress();
    move_out_and_back(&c);
    client
        .wait_until(Duration::from_secs(10), |p| p.ok >= before.ok + 20)
        .unwrap_or_else(|| {
            c.fail(&format!(
                "no echo after fw1's end came back: {:?}; fw1's counters {:?}",
                client.progress(),
                c.try_counters(1)
            ))
        });

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
    let timeout = Duration::from_secs(KEEPALIVE_THRESHOLD_MS / 1000 + 10);
    let taken = c.wait_owned(2, &filter, 2, timeout);
    assert_eq!(taken.state, "established");
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
