//! A peer crashes and comes back: fw2's agent is killed with SIGKILL while traffic runs
//! through fw1; sessions are made and ended meanwhile; once fw2 is restarted it converges to
//! exactly fw1's table. fw2 keeps its pinned table across the crash, so what ended while it
//! was away must be deleted from it, not just what is new added.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use hasync_agent::lab::{
    cluster::AgentState,
    topology::SERVER_V4,
    traffic::{tcp_client, tcp_echo_server, udp_echo_server, Bounds, TcpClientOptions},
    ClusterOptions, Signal,
};
use hasync_common::{flow::IPPROTO_UDP, FlowKey, Session};
use hasync_tests::cluster::{udp_flows, Cluster, Table};

const TCP_PORT: u16 = 7300;
const UDP_PORT: u16 = 7301;
const FLOWS_PER_BATCH: usize = 10;
const CONVERGE: Duration = Duration::from_secs(20);

fn udp_ports(t: &Table) -> BTreeSet<u16> {
    t.iter()
        .filter(|r| r.proto == "udp" && r.dport == UDP_PORT)
        .map(|r| r.sport)
        .collect()
}

/// Source ports of the established TCP sessions to the echo port.
fn tcp_ports(t: &Table) -> BTreeSet<u16> {
    t.iter()
        .filter(|r| r.proto == "tcp" && r.dport == TCP_PORT && r.state == "established")
        .map(|r| r.sport)
        .collect()
}

#[test]
fn a_killed_peer_converges_again_after_restart() {
    killed_peer_converges("crst-", false);
}

/// The same, but fw1's agent is restarted too (an upgrade, say) while fw2 is away: fw1 keeps
/// its pinned table but loses what it had queued for fw2, so fw2 learns what changed only from
/// the full syncs.
#[test]
fn a_killed_peer_converges_again_after_restart_while_the_owner_restarted() {
    killed_peer_converges("crst2-", true);
}

fn killed_peer_converges(tag: &str, owner_restarts: bool) {
    let c = Cluster::start(
        tag,
        2,
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
    for k in [1, 2] {
        c.wait_active(k, Duration::from_secs(20));
    }

    let tcp_addr: SocketAddr = (SERVER_V4, TCP_PORT).into();
    let udp_addr: SocketAddr = (SERVER_V4, UDP_PORT).into();
    let bounds = Bounds::new(2_000, Duration::from_secs(60));
    let _tcp_server = tcp_echo_server(topo.server(), tcp_addr, Bounds::new(4, bounds.duration))
        .expect("TCP echo server");
    let _udp_server = udp_echo_server(topo.server(), udp_addr, bounds).expect("UDP echo server");
    let options = TcpClientOptions {
        bounds,
        ..TcpClientOptions::default()
    };
    let tcp1 = tcp_client(topo.client(), tcp_addr, options)
        .unwrap_or_else(|e| c.fail(&format!("TCP through fw1: {e}")));
    let batch1: BTreeSet<u16> = udp_flows(topo.client(), udp_addr, FLOWS_PER_BATCH)
        .unwrap_or_else(|e| c.fail(&e))
        .into_iter()
        .collect();
    let before = c.wait_same_tables(&[1, 2], CONVERGE, |t| {
        (udp_ports(t) == batch1 && tcp_ports(t).len() == 1)
            .then_some(())
            .ok_or("the first batch and the first TCP connection".into())
    });
    let tcp1_port = *tcp_ports(&before).first().expect("one TCP session");

    // fw2 crashes.
    c.kill_agent(2, Signal::Kill)
        .unwrap_or_else(|e| c.fail(&format!("SIGKILL fw2: {e}")));
    c.wait("fw2's agent to die", Duration::from_secs(5), || {
        match c.agent_state(2) {
            AgentState::Exited { status } => Ok(status),
            other => Err(format!("{other:?}")),
        }
    });
    // Without its agent, is fw2's XDP program still attached (pinned links) or gone?
    let xdp_left = topo
        .ip("fw2", &["-d", "link", "show", "in0"])
        .map(|s| s.contains("prog/xdp"))
        .unwrap_or(false);
    eprintln!("after SIGKILL, fw2's in0 has an XDP program attached: {xdp_left}");

    // Meanwhile on fw1: new sessions, and the first TCP connection ends (and is removed).
    let tcp2 = tcp_client(topo.client(), tcp_addr, options)
        .unwrap_or_else(|e| c.fail(&format!("second TCP connection through fw1: {e}")));
    let batch2: BTreeSet<u16> = udp_flows(topo.client(), udp_addr, FLOWS_PER_BATCH)
        .unwrap_or_else(|e| c.fail(&e))
        .into_iter()
        .collect();
    let p = tcp1.stop();
    assert!(p.fatal.is_none(), "the first TCP connection broke: {p:?}");
    let every: BTreeSet<u16> = batch1.union(&batch2).copied().collect();
    let fw1_now = c.wait("fw1 to drop the ended connection", CONVERGE, || {
        let t = c.try_table(1)?;
        let gone = !t.iter().any(|r| r.proto == "tcp" && r.sport == tcp1_port);
        (gone && udp_ports(&t) == every && tcp_ports(&t).len() == 1)
            .then_some(t)
            .ok_or("fw1's table".to_owned())
    });
    assert!(fw1_now.iter().all(|r| r.owner == 1));
    if owner_restarts {
        c.stop_agent(1, Duration::from_secs(5))
            .unwrap_or_else(|e| c.fail(&format!("stopping fw1: {e}")));
        c.start_member(1);
    }

    // fw2 comes back and converges to fw1's table.
    let restarted = Instant::now();
    c.start_member(2);
    let table = c.wait_same_tables(&[1, 2], CONVERGE, |t| {
        let tcp = tcp_ports(t);
        (udp_ports(t) == every && tcp.len() == 1 && !tcp.contains(&tcp1_port))
            .then_some(())
            .ok_or("both batches, the second TCP connection only".into())
    });
    eprintln!(
        "fw2 converged to {} sessions {:.1} s after its restart",
        table.len(),
        restarted.elapsed().as_secs_f64()
    );
    c.wait_active(2, Duration::from_secs(20));
    let s1 = c.statistics(1);
    let to2 = s1.peers.iter().find(|p| p.id == 2).expect("peer 2");
    // One full sync to each start of fw2 that fw1's agent saw (its counters start afresh
    // when fw1's agent restarts).
    let expected = if owner_restarts { 1 } else { 2 };
    assert!(
        to2.full_syncs.sent.count >= expected,
        "fw1 should have sent fw2 a full sync at each of its starts: {:?}",
        to2.full_syncs
    );
    tcp2.wait_ok_after(Instant::now(), Duration::from_secs(5))
        .unwrap_or_else(|| c.fail(&format!("TCP stalled: {:?}", tcp2.progress())));
    let p = tcp2.stop();
    assert!(p.fatal.is_none(), "the second TCP connection broke: {p:?}");
}

/// The owner's agent restarts faster than the keepalive threshold (an upgrade, a watchdog's
/// restart, a crash and `RestartSec=2s`): its peer never sees it gone, so nothing on the
/// peer's side asks for a full sync, yet the agent that stopped lost what it had queued,
/// removals among them. Here a removal is lost for certain: one of fw1's sessions is deleted
/// from its pinned table while its agent is stopped. Once fw1's agent is back, fw2 must drop
/// its replica too (before, it kept it until its idle timeout, here 600 s).
#[test]
fn an_owner_restarted_within_the_keepalive_threshold_reconciles_its_peer() {
    let threshold = Duration::from_secs(30);
    let c = Cluster::start(
        "crst3-",
        2,
        ClusterOptions {
            timeouts: [("udp-replied".to_owned(), 600), ("udp-new".to_owned(), 600)].into(),
            keepalive_threshold_ms: Some(threshold.as_millis() as u64),
            ..ClusterOptions::default()
        },
    );
    let topo = c.topology();
    for k in [1, 2] {
        c.wait_active(k, Duration::from_secs(20));
    }
    let udp_addr: SocketAddr = (SERVER_V4, UDP_PORT).into();
    let bounds = Bounds::new(2_000, Duration::from_secs(60));
    let _udp_server = udp_echo_server(topo.server(), udp_addr, bounds).expect("UDP echo server");
    let flows: BTreeSet<u16> = udp_flows(topo.client(), udp_addr, FLOWS_PER_BATCH)
        .unwrap_or_else(|e| c.fail(&e))
        .into_iter()
        .collect();
    c.wait_same_tables(&[1, 2], CONVERGE, |t| {
        (udp_ports(t) == flows)
            .then_some(())
            .ok_or("the flows on both".into())
    });

    let stopped = Instant::now();
    c.stop_agent(1, Duration::from_secs(5))
        .unwrap_or_else(|e| c.fail(&format!("stopping fw1: {e}")));
    let victim = *flows.first().expect("a flow");
    delete_pinned_udp(&c, 1, victim);
    c.start_member(1);
    let back = stopped.elapsed();
    assert!(
        back < threshold / 2,
        "fw1's agent took {back:?} to come back: fw2 may have seen it gone, which is not \
         what this test is about"
    );
    let rest: BTreeSet<u16> = flows.iter().copied().filter(|&p| p != victim).collect();
    c.wait_same_tables(&[1, 2], CONVERGE, |t| {
        (udp_ports(t) == rest)
            .then_some(())
            .ok_or(format!("every flow but port {victim}"))
    });
    eprintln!("fw1 back after {:.1} s; fw2 reconciled", back.as_secs_f64());
}

/// Deletes the UDP session of client port `sport` from member `k`'s pinned table (its agent
/// stopped), as a removal lost with the agent's queue would leave it.
fn delete_pinned_udp(c: &Cluster, k: u8, sport: u16) {
    let path = c.lab().pin_dir(k).join("maps/SESSIONS");
    let map = MapData::from_pin(&path).unwrap_or_else(|e| c.fail(&format!("{path:?}: {e}")));
    let mut map: BpfHashMap<_, FlowKey, Session> =
        BpfHashMap::try_from(Map::LruHashMap(map)).expect("SESSIONS is FlowKey → Session");
    let key = map
        .keys()
        .filter_map(Result::ok)
        .find(|key| {
            let ports = [u16::from_be(key.port_lo), u16::from_be(key.port_hi)];
            key.proto == IPPROTO_UDP && ports.contains(&sport) && ports.contains(&UDP_PORT)
        })
        .unwrap_or_else(|| c.fail(&format!("fw{k} holds no session of port {sport}")));
    map.remove(&key)
        .unwrap_or_else(|e| c.fail(&format!("deleting port {sport}'s session: {e}")));
}
