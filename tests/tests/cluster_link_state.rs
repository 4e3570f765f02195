//! The local sync interfaces' state comes from netlink notifications: when fw1's HA4 cable is
//! pulled (the switch port goes down, so fw1's interface loses its carrier), fw1 drops its HA4
//! connection at once, long before the keepalive threshold (set to 20 s here, so only the
//! interface state can explain it), and dials again as soon as the cable is back.

use std::time::{Duration, Instant};

use hasync_agent::lab::{ClusterOptions, Link};
use hasync_tests::cluster::Cluster;

/// Far beyond what the test waits for: a link seen down within [`SEEN`] was not seen by
/// missed keepalives.
const KEEPALIVE_MS: u64 = 20_000;
const SEEN: Duration = Duration::from_secs(5);

/// fw1's view of its HA4 link to fw2.
fn ha4_to_fw2(c: &Cluster) -> Result<String, String> {
    let m = c.try_members(1)?;
    m.members
        .iter()
        .find(|v| v.id == 2)
        .map(|v| v.ha4.clone())
        .ok_or_else(|| format!("no fw2 in {:?}", m.members))
}

#[test]
fn a_pulled_sync_cable_is_seen_from_the_interface_state_not_from_keepalives() {
    let c = Cluster::start(
        "lnk-",
        2,
        ClusterOptions {
            keepalive_threshold_ms: Some(KEEPALIVE_MS),
            ..ClusterOptions::default()
        },
    );
    c.wait("fw1's HA4 to fw2 up", Duration::from_secs(20), || {
        let s = ha4_to_fw2(&c)?;
        (s == "up").then_some(()).ok_or(s)
    });
    let pulled = Instant::now();
    c.topology()
        .cable_down(1, Link::Ha4)
        .unwrap_or_else(|e| c.fail(&format!("pulling fw1's HA4 cable: {e}")));
    let seen = c.wait("fw1 to see its HA4 down", SEEN, || {
        let s = ha4_to_fw2(&c)?;
        (s == "down").then(|| pulled.elapsed()).ok_or(s)
    });
    eprintln!(
        "fw1 saw its HA4 cable pulled after {:.0} ms",
        seen.as_secs_f64() * 1e3
    );
    let log = c.log_tail(1, 200);
    assert!(
        log.contains("sync interface state changed") && log.contains("local interface down"),
        "fw1 did not log the interface going down:\n{log}"
    );
    c.topology()
        .cable_up(1, Link::Ha4)
        .unwrap_or_else(|e| c.fail(&format!("plugging fw1's HA4 cable: {e}")));
    c.wait("fw1's HA4 to fw2 up again", SEEN, || {
        let s = ha4_to_fw2(&c)?;
        (s == "up").then_some(()).ok_or(s)
    });
}
