//! Mutual full syncs over constrained links: both members own many sessions, both agents
//! restart together (pinned tables) and full-sync to each other at once, as after a partition
//! heals in an active/active cluster. With the members' TCP buffers at 64 KiB, each side's
//! stream fills the other's receive buffer; if reading ever waited on writing (an ack sent
//! under the lock a blocked bulk write holds), both would stop for good. Both full syncs must
//! end, and a new session must replicate afterwards.

use std::{os::fd::AsFd, time::Duration};

use hasync_agent::{
    control::SessionFilter,
    datapath::{batch::obj_get, monotonic_ns, BatchMap},
    lab::{netns, topology::SERVER_V4, ClusterOptions},
};
use hasync_common::{
    flow::IPPROTO_UDP, Family, FlowKey, MemberId, Session, SessionFlags, State, ZoneId,
};
use hasync_tests::cluster::{udp_flows, Cluster};

/// Sessions each member owns before the restart.
const PER_MEMBER: u32 = 300_000;
const UDP_PORT: u16 = 7400;
/// Bound for both full syncs of `PER_MEMBER` sessions each way to end.
const BULKS_END: Duration = Duration::from_secs(60);

/// Session `i` owned by member `k`: a UDP flow between two benchmarking addresses that no
/// traffic of the lab uses.
fn entry(k: u8, i: u32, now: u64) -> (FlowKey, Session) {
    let a = u32::from_be_bytes([198, 19, k, 1]).to_be();
    let b = (u32::from_be_bytes([198, 19, 200, 0]) + (i >> 16)).to_be();
    let (key, _) = FlowKey::canonical(
        Family::V4,
        IPPROTO_UDP,
        [a, 0, 0, 0],
        (i & 0xffff) as u16,
        [b, 0, 0, 0],
        53,
    );
    let session = Session {
        created_ns: now,
        last_seen_ns: now,
        last_event_ns: now,
        version: 1,
        zone: ZoneId(1),
        owner: MemberId(k),
        state: State::UdpReplied as u8,
        flags: SessionFlags(0),
        ..Session::default()
    };
    (key, session)
}

/// Writes member `k`'s sessions straight into its pinned table (its agent is stopped).
fn fill_pinned_table(c: &Cluster, k: u8) {
    let path = c
        .pin_dir(k)
        .join("maps")
        .join(hasync_common::maps::SESSIONS);
    let fd = obj_get(&path).unwrap_or_else(|e| c.fail(&format!("{}: {e}", path.display())));
    let map = BatchMap::<FlowKey, Session>::new(fd.as_fd())
        .unwrap_or_else(|e| c.fail(&format!("fw{k}'s pinned table: {e}")));
    let now = monotonic_ns();
    let (keys, values): (Vec<FlowKey>, Vec<Session>) =
        (0..PER_MEMBER).map(|i| entry(k, i, now)).unzip();
    for (ks, vs) in keys.chunks(4096).zip(values.chunks(4096)) {
        map.update_batch(ks, vs, 0)
            .unwrap_or_else(|e| c.fail(&format!("filling fw{k}'s pinned table: {e}")));
    }
}

fn owned_by(c: &Cluster, at: u8, owner: u8) -> Result<u64, String> {
    let filter = SessionFilter {
        owner: Some(owner),
        ..SessionFilter::default()
    };
    Ok(c.try_count(at, filter)?.total)
}

#[test]
fn mutual_full_syncs_end_over_64_kib_buffers() {
    let c = Cluster::start(
        "mbulk-",
        2,
        ClusterOptions {
            session_capacity: 1 << 20,
            timeouts: [("udp-replied".to_owned(), 600)].into(),
            ..ClusterOptions::default()
        },
    );
    for k in [1, 2] {
        c.wait_active(k, Duration::from_secs(20));
    }
    for k in [1, 2] {
        c.stop_agent(k, Duration::from_secs(10))
            .unwrap_or_else(|e| c.fail(&format!("stopping fw{k}: {e}")));
        fill_pinned_table(&c, k);
        let ns = c.topology().fw(k).to_owned();
        for key in ["net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"] {
            netns::sysctl(&ns, key, "4096 16384 65536")
                .unwrap_or_else(|e| c.fail(&format!("{key} in {ns}: {e}")));
        }
    }
    for k in [1, 2] {
        c.start_agent(k)
            .unwrap_or_else(|e| c.fail(&format!("starting fw{k}: {e}")));
    }
    c.wait(
        "both members to hold both tables (mutual full syncs ended)",
        BULKS_END,
        || {
            let seen = [
                owned_by(&c, 1, 2)?,
                owned_by(&c, 2, 1)?,
                owned_by(&c, 1, 1)?,
                owned_by(&c, 2, 2)?,
            ];
            let done = [1, 2]
                .iter()
                .map(|&k| c.try_statistics(k))
                .collect::<Result<Vec<_>, _>>()?
                .iter()
                .all(|s| s.peers.iter().all(|p| p.full_syncs.received.count >= 1));
            (seen.iter().all(|&n| n >= u64::from(PER_MEMBER)) && done)
                .then_some(())
                .ok_or(format!(
                    "fw1 holds of fw2 / fw2 of fw1 / own: {seen:?}, full syncs received: {done}"
                ))
        },
    );
    // The links still carry new changes both ways.
    let topo = c.topology();
    let ports =
        udp_flows(topo.client(), (SERVER_V4, UDP_PORT).into(), 5).unwrap_or_else(|e| c.fail(&e));
    c.wait("the new flows on fw2", Duration::from_secs(10), || {
        let filter = SessionFilter {
            port: Some(UDP_PORT),
            ..SessionFilter::default()
        };
        let n = c.try_count(2, filter)?.total;
        (n >= ports.len() as u64)
            .then_some(())
            .ok_or(format!("{n} of {} new flows", ports.len()))
    });
}
