//! HA4 fails mid-stream: fw1's HA4 cable is pulled while traffic runs through fw1. Sync moves
//! to HA4 backup: sessions made afterwards still reach fw2 and fw3 (counted on the ha4-backup
//! link), the running connection is unaffected, and in the end all three tables are equal.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use hasync_agent::{
    control::view::{LinkStatisticsView, StatisticsView},
    lab::{
        topology::SERVER_V4,
        traffic::{tcp_client, tcp_echo_server, udp_echo_server, Bounds, TcpClientOptions},
        ClusterOptions, Link,
    },
};
use hasync_tests::cluster::{udp_flows, Cluster, Table};

const TCP_PORT: u16 = 7200;
const UDP_PORT: u16 = 7201;
const FLOWS_PER_BATCH: usize = 10;
const REPLICATION: Duration = Duration::from_secs(15);

/// fw`k`'s counters for its link `link` to `peer`.
fn link_stats(s: &StatisticsView, peer: u8, link: &str) -> LinkStatisticsView {
    s.peers
        .iter()
        .find(|p| p.id == peer)
        .and_then(|p| p.links.get(link))
        .copied()
        .unwrap_or_else(|| panic!("no {link} statistics for peer {peer} in {s:?}"))
}

/// The UDP sessions from the client to the echo port, by source port.
fn udp_ports(t: &Table) -> BTreeSet<u16> {
    t.iter()
        .filter(|r| r.proto == "udp" && r.dport == UDP_PORT)
        .map(|r| r.sport)
        .collect()
}

#[test]
fn sessions_replicate_over_ha4_backup_when_ha4_fails() {
    let c = Cluster::start(
        "cha4-",
        3,
        ClusterOptions {
            timeouts: [
                ("udp-replied".to_owned(), 600),
                ("udp-new".to_owned(), 600),
                ("closed".to_owned(), 1),
            ]
            .into(),
            ..ClusterOptions::default()
        },
    );
    let topo = c.topology();
    let all = [1, 2, 3];
    // Wait until fw1 syncs with both peers over HA4.
    c.wait("fw1's HA4 links up", Duration::from_secs(20), || {
        let m = c.try_members(1)?;
        let ok = m
            .members
            .iter()
            .filter(|v| v.id != 1)
            .all(|v| v.ha4 == "up" && v.ha4_backup == "up");
        ok.then_some(()).ok_or(format!("{:?}", m.members))
    });

    let tcp_addr: SocketAddr = (SERVER_V4, TCP_PORT).into();
    let udp_addr: SocketAddr = (SERVER_V4, UDP_PORT).into();
    let bounds = Bounds::new(2_000, Duration::from_secs(60));
    let _tcp_server = tcp_echo_server(topo.server(), tcp_addr, Bounds::new(4, bounds.duration))
        .expect("TCP echo server");
    let _udp_server = udp_echo_server(topo.server(), udp_addr, bounds).expect("UDP echo server");
    let options = TcpClientOptions {
        interval: Duration::from_millis(50),
        bounds,
        ..TcpClientOptions::default()
    };
    let tcp = tcp_client(topo.client(), tcp_addr, options)
        .unwrap_or_else(|e| c.fail(&format!("TCP through fw1: {e}")));
    let before: BTreeSet<u16> = udp_flows(topo.client(), udp_addr, FLOWS_PER_BATCH)
        .unwrap_or_else(|e| c.fail(&e))
        .into_iter()
        .collect();
    c.wait_same_tables(&all, REPLICATION, |t| {
        (udp_ports(t) == before)
            .then_some(())
            .ok_or("first batch".into())
    });
    let s_before = c.statistics(1);

    // Pull fw1's HA4 cable; traffic goes on.
    topo.cable_down(1, Link::Ha4).expect("HA4 cable down");
    let pulled = Instant::now();
    c.wait("fw1 to see HA4 down", Duration::from_secs(5), || {
        let m = c.try_members(1)?;
        let ok = m
            .members
            .iter()
            .filter(|v| v.id != 1)
            .all(|v| v.ha4 == "down" && v.ha4_backup == "up");
        ok.then_some(()).ok_or(format!("{:?}", m.members))
    });
    let tcp2 = tcp_client(topo.client(), tcp_addr, options)
        .unwrap_or_else(|e| c.fail(&format!("second TCP connection through fw1: {e}")));
    let after: BTreeSet<u16> = udp_flows(topo.client(), udp_addr, FLOWS_PER_BATCH)
        .unwrap_or_else(|e| c.fail(&e))
        .into_iter()
        .collect();
    let every: BTreeSet<u16> = before.union(&after).copied().collect();
    let running = c.wait_same_tables(&all, REPLICATION, |t| {
        let tcp_sessions = t
            .iter()
            .filter(|r| r.dport == TCP_PORT && r.state == "established")
            .count();
        (udp_ports(t) == every && tcp_sessions == 2)
            .then_some(())
            .ok_or("both batches and both TCP connections".into())
    });
    assert!(
        running.iter().all(|r| r.owner == 1),
        "fw1 made every session"
    );
    for p in [&tcp, &tcp2] {
        p.wait_ok_after(Instant::now(), Duration::from_secs(5))
            .unwrap_or_else(|| c.fail(&format!("TCP stalled: {:?}", p.progress())));
    }
    eprintln!(
        "second batch on every member {:.1} s after HA4 was pulled",
        pulled.elapsed().as_secs_f64()
    );

    // The second batch went over HA4 backup, to both peers; fw2 and fw3 received it there.
    let s_after = c.statistics(1);
    for peer in [2, 3] {
        let b0 = link_stats(&s_before, peer, "ha4-backup");
        let b1 = link_stats(&s_after, peer, "ha4-backup");
        assert!(
            b1.records_sent >= b0.records_sent + FLOWS_PER_BATCH as u64,
            "fw1 → fw{peer} on ha4-backup: {} records before, {} after\n{}",
            b0.records_sent,
            b1.records_sent,
            c.logs()
        );
        let h = link_stats(&s_after, peer, "ha4");
        assert!(h.failures >= 1, "fw1's HA4 link to fw{peer}: {h:?}");
        let received = link_stats(&c.statistics(peer), 1, "ha4-backup");
        assert!(
            received.records_received >= FLOWS_PER_BATCH as u64,
            "fw{peer} from fw1 on ha4-backup: {received:?}"
        );
    }

    // The traffic ends (TCP closes with FINs); after it settles, all tables are equal.
    for p in [tcp.stop(), tcp2.stop()] {
        assert!(p.fatal.is_none(), "a TCP connection broke: {p:?}");
    }
    // Closed TCP sessions leave every table after the closed timeout (1 s).
    let settled = c.wait_same_tables(&all, REPLICATION, |t| {
        let tcp_left = t.iter().filter(|r| r.dport == TCP_PORT).count();
        (udp_ports(t) == every && tcp_left == 0)
            .then_some(())
            .ok_or("the UDP flows, and no TCP session left".into())
    });
    // Equal twice in a row a second apart: settled, not passing each other.
    std::thread::sleep(Duration::from_secs(1));
    c.wait_same_tables(&all, Duration::from_secs(5), |t| {
        (*t == settled).then_some(()).ok_or("unchanged".into())
    });
}
