//! A member that forwards in XDP beside the kernel's own connection tracking (a stateful
//! nftables table in its namespace): the kernel sees only a TCP connection's handshake, never
//! its close, so its entry would stay established for days. When the connection ends, the
//! agent gives that entry the closed timeout (`hasync_agent::forwarding::kernel_track`, wired
//! into the agent's main loop: this test runs real agents).

use std::time::Duration;

use hasync_agent::{
    config::ForwardingName,
    forwarding::kernel_track::CLOSED_TIMEOUT_S,
    lab::{
        topology::SERVER_V4,
        traffic::{tcp_echo_server, Bounds},
        ClusterOptions,
    },
};
use hasync_tests::{
    cluster::Cluster,
    netns::{conntrack_timeouts, nft_in},
};

/// Connection tracking on in the forward path, invalid packets dropped, as a stateful ruleset
/// has it.
const RULESET: &str = "table inet kct {
    chain forward_ct {
        type filter hook forward priority 0; policy accept;
        ct state invalid drop
    }
}";

/// Seen failing with the main loop's hand-off to `ClosedEntries` left out: the entry kept its
/// established timeout (days) after the connection ended.
#[test]
fn an_xdp_forwarded_connections_kernel_entry_ends_with_it() {
    let port = 7540;
    let c = Cluster::start(
        "ckct-",
        2,
        ClusterOptions {
            forwarding: ForwardingName::Xdp,
            timeouts: [("closed".to_owned(), 1)].into(),
            ..ClusterOptions::default()
        },
    );
    let fw1 = c.topology().fw(1).to_owned();
    nft_in(&fw1, RULESET).unwrap_or_else(|e| c.fail(&format!("{e:#}")));
    let _server = tcp_echo_server(
        c.topology().server(),
        (SERVER_V4, port).into(),
        Bounds::new(2, Duration::from_secs(60)),
    )
    .expect("TCP echo server");
    let (client, _row) = c.tcp_connection_through_fw1(port);
    c.wait(
        "fw1 to forward the connection in XDP",
        Duration::from_secs(10),
        || {
            let n = c.forwarded_xdp(1);
            (n > 0).then_some(()).ok_or(format!("forwarded-xdp = {n}"))
        },
    );
    let open = conntrack_timeouts(&fw1, port).unwrap_or_else(|e| c.fail(&format!("{e:#}")));
    assert!(
        open.len() == 1 && open[0] > 3600,
        "the kernel's entry of the open connection: {open:?} s left"
    );
    let end = client.stop();
    assert!(end.fatal.is_none(), "the connection broke: {end:?}");
    c.wait(
        "the kernel's entry to get the closed timeout",
        Duration::from_secs(10),
        || {
            let left = conntrack_timeouts(&fw1, port).map_err(|e| format!("{e:#}"))?;
            let closed = left.iter().all(|s| *s <= u64::from(CLOSED_TIMEOUT_S));
            (!left.is_empty() && closed)
                .then_some(())
                .ok_or(format!("{left:?} s left"))
        },
    );
}
