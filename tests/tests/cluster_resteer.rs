//! A connection re-steered to a live peer. A TCP echo connection runs through fw1; then routing
//! moves both its directions to fw2 while fw1 stays up (a route change, ECMP rehashing, an
//! operator's move). fw2 passes the flow as asymmetric (its owner is alive); fw1 sees no more
//! of it, so its copy idles out (the timeout is short here) and fw1 sends its removal. That
//! removal must not delete fw2's copy, which carries the traffic: fw2 keeps it, orphaned, and
//! takes it over on its next packet, so the connection outlives fw1's timeout.

use std::time::{Duration, Instant};

use hasync_agent::{
    control::SessionFilter,
    lab::{
        topology::SERVER_V4,
        traffic::{tcp_echo_server, Bounds},
        ClusterOptions,
    },
};
use hasync_tests::cluster::Cluster;

const PORT: u16 = 7820;
/// `established`: fw1's copy expires this long after the steer took the flow away.
const TIMEOUT_S: u64 = 8;

#[test]
fn a_connection_steered_to_a_live_peer_outlives_its_first_owners_timeout() {
    let c = Cluster::start(
        "rst-",
        2,
        ClusterOptions {
            timeouts: [("established".to_owned(), TIMEOUT_S)].into(),
            ..ClusterOptions::default()
        },
    );
    let _server = tcp_echo_server(
        c.topology().server(),
        (SERVER_V4, PORT).into(),
        Bounds::new(4, Duration::from_secs(120)),
    )
    .unwrap_or_else(|e| c.fail(&format!("TCP echo server: {e}")));
    let (client, _) = c.tcp_connection_through_fw1(PORT);
    let filter = SessionFilter {
        proto: Some("tcp".into()),
        port: Some(PORT),
        ..SessionFilter::default()
    };
    c.wait_owned(2, &filter, 1, Duration::from_secs(10));

    c.topology()
        .steer(2)
        .unwrap_or_else(|e| c.fail(&format!("steering to fw2: {e}")));
    let steered = Instant::now();
    // Well past fw1's timeout, the connection still echoes through fw2, every second.
    let until = steered + Duration::from_secs(3 * TIMEOUT_S);
    while Instant::now() < until {
        let at = Instant::now();
        client
            .wait_ok_after(at, Duration::from_secs(2))
            .unwrap_or_else(|| {
                c.fail(&format!(
                    "no echo through fw2 {:.1} s after the steer: {:?}",
                    at.duration_since(steered).as_secs_f64(),
                    client.progress()
                ))
            });
        std::thread::sleep(Duration::from_secs(1));
    }
    // fw2 took the flow over while fw1 was up, and both agree.
    for k in [2, 1] {
        c.wait_owned(k, &filter, 2, Duration::from_secs(1));
    }
    let p = client.stop();
    assert!(p.fatal.is_none(), "the connection broke: {p:?}");
    // fw2 counted fw1's removal as what it was: an orphan, not a record that lost.
    let stats = c.statistics(2);
    let from_fw1 = stats.peers.iter().find(|p| p.id == 1);
    assert!(
        from_fw1.is_some_and(|p| p.records_orphaned >= 1),
        "fw2's statistics for fw1: {from_fw1:?}"
    );
}
