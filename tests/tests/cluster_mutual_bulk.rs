//! Mutual full syncs over constrained links: both members own many sessions, both agents
//! restart together (pinned tables) and full-sync to each other at once, as after a partition
//! heals in an active/active cluster. With the members' TCP buffers at 64 KiB, each side's
//! stream fills the other's receive buffer; if reading ever waited on writing (an ack sent
//! under the lock a blocked bulk write holds), both would stop for good. Both full syncs must
//! end, and a new session must replicate afterwards.

use std::time::Duration;

use hasync_agent::{
    control::SessionFilter,
    lab::{
        netns,
        topology::SERVER_V4,
        traffic::{udp_echo_server, Bounds},
        ClusterOptions,
    },
};
use hasync_tests::cluster::{udp_flows, Cluster};

/// Sessions each member owns before the restart: 9.6 MB of records each way, far past the
/// ~2 MB in flight at which the old engine stopped (the issue measured with 300,000; the
/// constrained buffers make a larger run slow on a loaded 2-CPU CI machine).
const PER_MEMBER: u32 = 100_000;
const UDP_PORT: u16 = 7400;
/// Bound for both full syncs of `PER_MEMBER` sessions each way to end.
const BULKS_END: Duration = Duration::from_secs(60);

#[test]
fn mutual_full_syncs_end_over_64_kib_buffers() {
    let c = Cluster::start(
        "mbulk-",
        2,
        ClusterOptions {
            session_capacity: 1 << 20,
            timeouts: [("udp-replied".to_owned(), 600)].into(),
            // One link: both full syncs share its connection, each side's bulk writes and its
            // acks to the other's bulk on the same socket (with two links, the directions may
            // settle on different connections and never meet).
            backup_link: false,
            ..ClusterOptions::default()
        },
    );
    for k in [1, 2] {
        c.wait_active(k, Duration::from_secs(20));
    }
    for k in [1, 2] {
        c.stop_agent(k, Duration::from_secs(10))
            .unwrap_or_else(|e| c.fail(&format!("stopping fw{k}: {e}")));
        c.fill_table(k, k, PER_MEMBER);
        let ns = c.topology().fw(k).to_owned();
        for key in ["net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"] {
            netns::sysctl(&ns, key, "4096\t16384\t65536")
                .unwrap_or_else(|e| c.fail(&format!("{key} in {ns}: {e}")));
        }
    }
    for k in [1, 2] {
        c.start_agent(k)
            .unwrap_or_else(|e| c.fail(&format!("starting fw{k}: {e}")));
    }
    // Polled through the statistics, which cost the agents nothing: counting sessions by
    // owner walks the whole table under the datapath lock.
    c.wait("both mutual full syncs to end", BULKS_END, || {
        let ended = [1, 2]
            .iter()
            .map(|&k| c.try_statistics(k))
            .collect::<Result<Vec<_>, _>>()?
            .iter()
            .flat_map(|s| s.peers.iter().map(|p| p.full_syncs.received))
            .collect::<Vec<_>>();
        ended
            .iter()
            .all(|r| r.count >= 1 && !r.running)
            .then_some(())
            .ok_or(format!("full syncs received: {ended:?}"))
    });
    for (k, of) in [(1, 2), (2, 1), (1, 1), (2, 2)] {
        let n = c.try_owned_by(k, of).unwrap_or_else(|e| c.fail(&e));
        assert_eq!(
            n,
            u64::from(PER_MEMBER),
            "fw{k} holds {n} of fw{of}'s sessions"
        );
    }
    // The link still carries new changes.
    let topo = c.topology();
    let server = (SERVER_V4, UDP_PORT).into();
    let _echo = udp_echo_server(
        topo.server(),
        server,
        Bounds::new(100, Duration::from_secs(30)),
    )
    .unwrap_or_else(|e| c.fail(&format!("UDP echo server: {e}")));
    let installed = |c: &Cluster| -> Result<u64, String> {
        let s = c.try_statistics(2)?;
        Ok(s.peers.iter().map(|p| p.records_installed).sum())
    };
    let before = installed(&c).unwrap_or_else(|e| c.fail(&e));
    let ports = udp_flows(topo.client(), server, 5).unwrap_or_else(|e| c.fail(&e));
    // Cheap to poll (see above); the sessions themselves are checked once after.
    c.wait(
        "fw2 to install the new flows",
        Duration::from_secs(20),
        || {
            let n = installed(&c)? - before;
            (n >= ports.len() as u64)
                .then_some(())
                .ok_or(format!("{n} of {} installed", ports.len()))
        },
    );
    let filter = SessionFilter {
        port: Some(UDP_PORT),
        ..SessionFilter::default()
    };
    let n = c.try_count(2, filter).unwrap_or_else(|e| c.fail(&e)).total;
    assert!(
        n >= ports.len() as u64,
        "fw2 holds {n} of the {} new flows",
        ports.len()
    );
}
