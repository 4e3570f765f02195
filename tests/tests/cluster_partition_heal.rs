//! A partition heals: HA4 and HA4 backup between two members are cut (nftables drops
//! everything on fw2's sync interfaces) until each declares the other down; meanwhile each
//! member gains sessions of its own. When the links return, each full-syncs the other: every
//! member ends up holding the other's sessions, and no member is sent its own sessions back
//! (both started with empty tables, but their initial full syncs ended long ago: their own
//! tables are the authority now).

use std::time::{Duration, Instant};

use hasync_agent::lab::ClusterOptions;
use hasync_tests::cluster::Cluster;

/// Sessions each member gains while cut off.
const PER_MEMBER: u32 = 300_000;
/// Bound for convergence after the heal (an invariant, not a speed target: the figure is
/// printed; `cargo xtask chaos` reports its distribution).
const CONVERGE: Duration = Duration::from_secs(30);

#[test]
fn a_healed_partition_converges_without_echoing_sessions_to_their_owner() {
    let c = Cluster::start(
        "heal-",
        2,
        ClusterOptions {
            session_capacity: 1 << 20,
            keepalive_threshold_ms: Some(5000),
            timeouts: [("udp-replied".to_owned(), 600)].into(),
            ..ClusterOptions::default()
        },
    );
    for k in [1, 2] {
        c.wait_active(k, Duration::from_secs(20));
    }
    c.cut_sync_links(2, true);
    for (k, of) in [(1, 2), (2, 1)] {
        c.wait(
            &format!("fw{k} to declare fw{of} down"),
            Duration::from_secs(20),
            || {
                let m = c.try_member(k, of)?;
                (m.state == "down").then_some(()).ok_or(m.state)
            },
        );
    }
    for k in [1, 2] {
        c.fill_table(k, k, PER_MEMBER);
    }
    let healed = Instant::now();
    c.cut_sync_links(2, false);
    // Polled through the statistics, which cost the agents nothing (counting sessions by owner
    // walks the whole table); the tables are checked once after.
    let converged = c.wait("both full syncs after the heal to end", CONVERGE, || {
        let received = [(1, 2), (2, 1)]
            .iter()
            .map(|&(k, from)| {
                let s = c.try_statistics(k)?;
                let p = s
                    .peers
                    .iter()
                    .find(|p| p.id == from)
                    .ok_or("no such peer")?;
                Ok(p.full_syncs.received)
            })
            .collect::<Result<Vec<_>, String>>()?;
        received
            .iter()
            .all(|r| r.count >= 2 && !r.running)
            .then(|| healed.elapsed())
            .ok_or(format!("full syncs received: {received:?}"))
    });
    eprintln!(
        "full syncs ended {:.2} s after the links returned ({PER_MEMBER} sessions each side)",
        converged.as_secs_f64()
    );
    let held = [c.try_owned_by(1, 2), c.try_owned_by(2, 1)];
    for (k, n) in [(1, &held[0]), (2, &held[1])] {
        let n = n.clone().unwrap_or_else(|e| c.fail(&e));
        assert_eq!(
            n,
            u64::from(PER_MEMBER),
            "fw{k} holds {n} of its peer's sessions"
        );
    }
    // Each full sync after the heal carried the sender's sessions only.
    for (k, to) in [(1, 2), (2, 1)] {
        let sent = c.wait(
            &format!("fw{k}'s full sync to fw{to} to end"),
            CONVERGE,
            || {
                let s = c.try_statistics(k)?;
                let p = s.peers.iter().find(|p| p.id == to).ok_or("no such peer")?;
                let sent = p.full_syncs.sent;
                (sent.count >= 2 && !sent.running)
                    .then_some(sent.last_records)
                    .ok_or(format!("{sent:?}"))
            },
        );
        let own = c.try_owned_by(k, k).unwrap_or_else(|e| c.fail(&e));
        assert_eq!(
            sent,
            Some(own),
            "fw{k}'s full sync to fw{to} after the heal carried {sent:?} records; fw{k} owns {own}: \
             it echoed fw{to}'s own sessions back"
        );
    }
}
