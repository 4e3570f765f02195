//! A member that forwards in XDP beside the kernel's own connection tracking (a stateful
//! nftables table in its namespace): the kernel sees only a TCP connection's handshake and
//! what the fast path hands it, never its close. The agent marks that entry liberal when the
//! connection is established, so a segment handed to the kernel mid-stream is valid there, and
//! gives it the closed timeout when the connection ends, or it would stay established for days
//! (`hasync_agent::forwarding::kernel_track`, wired into the agent's main loop: these tests run
//! real agents).

use std::{io::Write as _, net::SocketAddr, time::Duration};

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
    forwarder::stream_between,
    netns::{conntrack_timeouts, nft_counter_in, nft_in},
};

/// Connection tracking on in the forward path, invalid packets dropped (and counted: `kct`
/// counter `invalid`), as a stateful ruleset has it.
const RULESET: &str = "table inet kct {
    counter invalid {}
    chain forward_ct {
        type filter hook forward priority 0; policy accept;
        ct state invalid counter name invalid drop
    }
}";

/// Seen failing with the main loop's hand-off to `KernelEntries` left out: the entry kept its
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
    c.wait_forwarded_xdp(1, 0);
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

/// fw1's agent marks the kernel's entry of a connection liberal once it is established (the
/// main loop hands the session's state change to `KernelEntries`): a segment XDP hands the
/// kernel mid-stream (here the next hop's neighbour entry is flushed, so XDP's lookup finds
/// none until the kernel has resolved it again) is valid there, though past every window the
/// kernel saw. Seen failing with that hand-off left out: 421 segments invalid, and the
/// connection broke (a broken pipe): the kernel dropped what it was handed before resolving
/// the neighbour again, so it never did, and XDP kept handing it the connection.
#[test]
fn an_xdp_forwarded_connection_handed_to_the_kernel_mid_stream_is_valid_there() {
    let port = 7541;
    let c = Cluster::start(
        "cklb-",
        2,
        ClusterOptions {
            forwarding: ForwardingName::Xdp,
            ..ClusterOptions::default()
        },
    );
    let fail = |e: anyhow::Error| -> ! { c.fail(&format!("{e:#}")) };
    let fw1 = c.topology().fw(1).to_owned();
    nft_in(&fw1, RULESET).unwrap_or_else(|e| fail(e));
    c.wait_pair_active();
    let server = SocketAddr::from((SERVER_V4, port));
    let (mut client, reader) = stream_between(c.topology().client(), c.topology().server(), server)
        .unwrap_or_else(|e| fail(e));
    let chunk = vec![0xa5; 2_000_000];
    client.write_all(&chunk).expect("the first 2 MB");
    c.wait_forwarded_xdp(1, 100);
    let handed = |c: &Cluster| c.counter(1, "pass-fwd-no-neighbour");
    let before = handed(&c);
    c.topology()
        .ip("fw1", &["neigh", "flush", "dev", "out0"])
        .unwrap_or_else(|e| fail(e.into()));
    // Data keeps flowing while the agent bumps the FIB generation and XDP looks again (a
    // cached next hop lives up to 2 s): 40 writes of 100 kB, 20 ms apart.
    let piece = &chunk[..100_000];
    let sent = (0..40).try_for_each(|_| {
        std::thread::sleep(Duration::from_millis(20));
        client.write_all(piece)
    });
    let _ = client.shutdown(std::net::Shutdown::Write);
    let got = reader.join().expect("reader thread");
    let invalid = nft_counter_in(&fw1, "kct", "invalid").unwrap_or_else(|e| fail(e));
    assert!(
        handed(&c) > before,
        "nothing was handed to the kernel for want of a neighbour"
    );
    assert_eq!(
        invalid, 0,
        "segments invalid in the kernel (sent: {sent:?}, received: {got:?})"
    );
    assert_eq!(
        got.ok(),
        Some(chunk.len() + 40 * piece.len()),
        "the server's read"
    );
}
