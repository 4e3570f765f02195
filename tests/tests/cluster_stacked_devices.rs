//! A device stacked on a zone interface is in that interface's zone: fw1's `out0` (zone
//! untrust) gets a macvlan device `out0mv` with a subnet of its own while the agent runs, the
//! server an address in that subnet, and a TCP connection from the client to that address
//! works through the strict policy with route checks on (the default). The routing table sends
//! the server's new address out of `out0mv`; before the agent bound stacked devices to their
//! zones, that device was in no zone, the connection's replies were bound to no zone, and every
//! answer was dropped as a zone mismatch. (A VLAN device is the same case, but this kernel has
//! no 802.1Q support: the netlink and plan unit tests cover it.)

use std::{net::SocketAddr, time::Duration};

use hasync_agent::lab::{
    traffic::{tcp_echo_server, Bounds},
    ClusterOptions,
};
use hasync_tests::cluster::Cluster;

const PORT: u16 = 7610;
const FW1_STACKED: &str = "198.18.20.1/24";
const SERVER_STACKED: &str = "198.18.20.100";

/// `ip` in namespace `name` of `c`'s lab, failing the test with the agents' logs.
fn ip(c: &Cluster, name: &str, args: &[&str]) {
    if let Err(e) = c.topology().ip(name, args) {
        c.fail(&format!("ip -n {name} {}: {e}", args.join(" ")));
    }
}

/// How often fw1's log says `what`.
fn logged(c: &Cluster, what: &str) -> usize {
    c.log_tail(1, 5_000).matches(what).count()
}

/// Waits until fw1 has said `what` more than `before` times.
fn wait_logged(c: &Cluster, what: &str, before: usize) {
    c.wait(
        &format!("fw1 to log {what:?}"),
        Duration::from_secs(10),
        || {
            let n = logged(c, what);
            (n > before)
                .then_some(())
                .ok_or_else(|| format!("{n} times"))
        },
    );
}

const BOUND: &str = "stacked device bound to its zone";

#[test]
fn a_server_behind_a_macvlan_device_on_a_zone_interface_answers_through_the_strict_policy() {
    let c = Cluster::start("stk-", 1, ClusterOptions::default());
    let add = [
        "link", "add", "link", "out0", "name", "out0mv", "type", "macvlan",
    ];
    ip(&c, "fw1", &add);
    ip(&c, "fw1", &["addr", "add", FW1_STACKED, "dev", "out0mv"]);
    ip(&c, "fw1", &["link", "set", "out0mv", "up"]);
    let cidr = format!("{SERVER_STACKED}/24");
    ip(&c, "server", &["addr", "add", &cidr, "dev", "eth0"]);
    wait_logged(&c, BOUND, 0);
    let server: SocketAddr = format!("{SERVER_STACKED}:{PORT}")
        .parse()
        .unwrap_or_else(|e| c.fail(&format!("{e}")));
    let _echo = tcp_echo_server(
        c.topology().server(),
        server,
        Bounds::new(4, Duration::from_secs(60)),
    )
    .unwrap_or_else(|e| c.fail(&format!("TCP echo server: {e}")));
    let client = c.echo_client(server, "to the server's address behind out0mv");
    drop(client);
    let counters = c.try_counters(1).unwrap_or_else(|e| c.fail(&e));
    let mismatches = counters.get("drop-zone-mismatch").copied().unwrap_or(0);
    assert_eq!(mismatches, 0, "fw1 dropped replies as zone mismatches");

    // A restarted agent binds the device at start, before it attaches.
    let before = logged(&c, BOUND);
    if let Err(e) = c.stop_agent(1, Duration::from_secs(10)) {
        c.fail(&format!("stopping fw1's agent: {e}"));
    }
    c.start_member(1);
    wait_logged(&c, BOUND, before);
    let log = c.log_tail(1, 5_000);
    let run = &log[log.rfind("zone zone=trust").unwrap_or(0)..];
    let (bound, attached) = (run.find(BOUND), run.find("attached"));
    assert!(
        matches!((bound, attached), (Some(b), Some(a)) if b < a),
        "the restarted agent did not bind out0mv before attaching:\n{run}"
    );
    let client = c.echo_client(server, "behind out0mv, after a restart");
    drop(client);

    ip(&c, "fw1", &["link", "del", "out0mv"]);
    wait_logged(&c, "stacked device gone from its zone", 0);
}
