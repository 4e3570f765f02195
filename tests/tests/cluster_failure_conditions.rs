//! Failure conditions in a live cluster of two, one after the other on one TCP echo
//! connection: each makes the member that carries the connection Non-functional (naming the
//! cause), the traffic is steered to the peer, which takes the connection over without a
//! break, and the member comes back through Tentative to Active:
//!
//! 1. a link group on fw1 (`out0`, its cable pulled), held down after it recovers;
//! 2. a path group on fw2 (the server stops answering fw2's pings), held down likewise;
//! 3. fw1's datapath (its XDP link detached behind its back): fw1 attaches again by itself;
//! 4. a configuration mismatch: fw2 restarts with other session timeouts and, being the
//!    newcomer, stays Non-functional (the connection stays on fw1); restarted with an agreeing
//!    configuration, it is active again.
//!
//! And a member that reaches its flap limit (`[local] max_flaps`) suspends itself.

use std::{
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

use hasync_agent::{
    config::monitor::{FailureCondition, LinkGroup, Monitor, PathGroup},
    control::SessionFilter,
    datapath::batch::{link_detach, obj_get},
    lab::{
        cluster::{state_dir, MemberOverride},
        topology::SERVER_V4,
        traffic::{tcp_echo_server, Bounds, TrafficClient},
        ClusterOptions, LabError, Link,
    },
    suspend_mark,
};
use hasync_tests::cluster::Cluster;

const PORT: u16 = 7600;
/// fw2's source address towards the server (its `out0`).
const FW2_OUT: &str = "198.18.1.2";
/// Long enough to see Tentative (the shortest allowed tentative hold is 10 s).
const TENTATIVE_S: u64 = 10;
/// The monitor fail hold-down.
const HOLD_DOWN_MS: u64 = 2_000;

/// fw1's monitor: a link group `uplink` of its `out0`.
fn uplink_monitor() -> Monitor {
    Monitor {
        link_groups: vec![LinkGroup {
            name: "uplink".into(),
            failure_condition: FailureCondition::Any,
            interfaces: vec![Link::Out.ifname().into()],
        }],
        ..Monitor::default()
    }
}

fn options() -> ClusterOptions {
    let fw1 = uplink_monitor();
    let fw2 = Monitor {
        path_groups: vec![PathGroup {
            name: "server".into(),
            failure_condition: FailureCondition::Any,
            targets: vec![SERVER_V4.into()],
            interval_ms: 100,
            failures: 3,
        }],
        ..Monitor::default()
    };
    let over = |monitor| MemberOverride {
        monitor: Some(monitor),
        ..MemberOverride::default()
    };
    ClusterOptions {
        keepalive_threshold_ms: Some(5_000),
        tentative_hold_s: Some(TENTATIVE_S),
        monitor_fail_hold_down_s: Some(HOLD_DOWN_MS / 1000),
        overrides: [(1, over(fw1)), (2, over(fw2))].into(),
        ..ClusterOptions::default()
    }
}

/// Waits until member `k` says it is non-functional and names `cause`; then until its peer
/// sees it so.
fn wait_non_functional(c: &Cluster, k: u8, cause: &str) {
    c.wait(
        &format!("fw{k} to be non-functional: {cause}"),
        Duration::from_secs(10),
        || {
            let v = c.try_members(k)?;
            let state = &v.members.iter().find(|m| m.id == k).ok_or("no self")?.state;
            let named = v.faults.iter().any(|f| f.contains(cause));
            (state == "non-functional" && named)
                .then_some(())
                .ok_or(format!("{state}, {:?}", v.faults))
        },
    );
}

/// The states member `k` reports for itself, each once in order with when it was first seen,
/// until it is back in service (Tentative; Active if it skipped that).
fn states_until_back(c: &Cluster, k: u8) -> Vec<(String, Instant)> {
    let mut seen: Vec<(String, Instant)> = Vec::new();
    c.wait(
        &format!("fw{k} to be back in service"),
        Duration::from_secs(15),
        || {
            let state = c.try_member(k, k)?.state;
            if seen.last().map(|(s, _)| s) != Some(&state) {
                seen.push((state.clone(), Instant::now()));
            }
            let names: Vec<&str> = seen.iter().map(|(s, _)| s.as_str()).collect();
            let back = state == "tentative" || state == "active";
            back.then_some(()).ok_or(format!("{names:?}"))
        },
    );
    seen
}

/// Waits until member `k` owns the connection on `port`.
fn wait_owner(c: &Cluster, k: u8) {
    let filter = SessionFilter {
        proto: Some("tcp".into()),
        port: Some(PORT),
        ..SessionFilter::default()
    };
    c.wait(
        &format!("fw{k} to own the connection"),
        Duration::from_secs(10),
        || {
            let v = c.try_sessions(k, filter.clone())?;
            match v.sessions.as_deref() {
                Some([s]) if s.owner == k && s.state == "established" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    );
}

/// The connection keeps echoing: 10 more echoes after `since`, and nothing fatal.
fn still_echoing(c: &Cluster, client: &TrafficClient, since: Instant, what: &str) {
    let before = client.progress().ok;
    let p = client
        .wait_until(Duration::from_secs(10), |p| {
            p.last_ok.is_some_and(|t| t > since) && p.ok >= before + 10
        })
        .unwrap_or_else(|| c.fail(&format!("{what}: stalled: {:?}", client.progress())));
    assert!(p.fatal.is_none(), "{what}: {p:?}");
}

/// Back in service through Tentative (it turns Active after the tentative hold, while the
/// next phase runs); with `held_since` (a monitor recovered then), not before the monitor fail
/// hold-down has passed.
fn comes_back(c: &Cluster, k: u8, held_since: Option<Instant>) {
    let seen = states_until_back(c, k);
    let names: Vec<&str> = seen.iter().map(|(s, _)| s.as_str()).collect();
    let want: &[&str] = if held_since.is_some() {
        &["non-functional", "tentative"]
    } else {
        &["tentative"]
    };
    assert_eq!(
        &names[names.len().saturating_sub(want.len())..],
        want,
        "fw{k}: {names:?}"
    );
    if let (Some(since), Some((_, tentative))) =
        (held_since, seen.iter().find(|(s, _)| s == "tentative"))
    {
        let held = tentative.duration_since(since);
        assert!(
            held >= Duration::from_millis(HOLD_DOWN_MS - 200),
            "held {held:?}"
        );
    }
    let v = c.try_members(k).unwrap_or_else(|e| c.fail(&e));
    assert!(v.faults.is_empty(), "{:?}", v.faults);
}

/// A drop of fw2's echo requests at the server (nftables in the server's namespace).
fn server_ignores_fw2(c: &Cluster, on: bool) {
    let topo = c.topology();
    let script = if on {
        format!(
            "table inet hasync_test_pm {{\n\
             \tchain in {{ type filter hook input priority raw; policy accept; \
             ip saddr {FW2_OUT} icmp type echo-request drop; }}\n}}\n"
        )
    } else {
        "delete table inet hasync_test_pm\n".to_owned()
    };
    ok(c, topo.nft("server", &script));
}

/// `r`'s value, or the test fails with the error and the agents' logs.
fn ok<T>(c: &Cluster, r: Result<T, LabError>) -> T {
    r.unwrap_or_else(|e| c.fail(&e.to_string()))
}

#[test]
fn each_failure_condition_moves_the_connection_and_the_member_comes_back_through_tentative() {
    let c = Cluster::start("cfc-", 2, options());
    let topo = c.topology();
    let _server = tcp_echo_server(
        topo.server(),
        (SERVER_V4, PORT).into(),
        Bounds::new(4, Duration::from_secs(120)),
    )
    .expect("TCP echo server");
    let (client, _row) = c.tcp_connection_through_fw1(PORT);

    // 1. fw1's uplink loses its carrier: fw1 leaves, fw2 takes the connection over.
    ok(&c, topo.cable_down(1, Link::Out));
    wait_non_functional(&c, 1, "link group `uplink`: out0 down");
    assert_eq!(c.try_member(1, 1).map(|m| m.flaps), Ok(1));
    ok(&c, topo.steer(2));
    wait_owner(&c, 2);
    still_echoing(&c, &client, Instant::now(), "through fw2");
    ok(&c, topo.cable_up(1, Link::Out));
    comes_back(&c, 1, Some(Instant::now()));

    // 2. The server stops answering fw2's pings: fw2 leaves, fw1 takes the connection back.
    server_ignores_fw2(&c, true);
    wait_non_functional(&c, 2, "path group `server`: no answer from 198.18.1.100");
    ok(&c, topo.steer(1));
    wait_owner(&c, 1);
    still_echoing(&c, &client, Instant::now(), "back through fw1");
    server_ignores_fw2(&c, false);
    comes_back(&c, 2, Some(Instant::now()));

    // 3. Someone detaches fw1's XDP from in0: fw1 says so, attaches again, comes back.
    let pinned = c.pin_dir(1).join("links/in0:native");
    let link = obj_get(&pinned).unwrap_or_else(|e| c.fail(&format!("{}: {e}", pinned.display())));
    link_detach(link.as_fd()).unwrap_or_else(|e| c.fail(&format!("detaching: {e}")));
    wait_non_functional(&c, 1, "XDP (native) was detached from in0");
    ok(&c, topo.steer(2));
    still_echoing(
        &c,
        &client,
        Instant::now(),
        "through fw2 after fw1's datapath failed",
    );
    comes_back(&c, 1, None);
    let shown = ok(&c, topo.ip("fw1", &["-d", "link", "show", "in0"]));
    assert!(
        shown.contains("prog/xdp"),
        "fw1 attached XDP again: {shown}"
    );

    // 4. fw2 restarts with other session timeouts: the newcomer is the odd one out.
    ok(&c, topo.steer(1));
    ok(&c, c.stop_agent(2, Duration::from_secs(5)));
    let mismatched = |text: String| format!("{text}\n[timeouts]\nestablished = 600\n");
    ok(&c, c.lab().rewrite_config(2, mismatched));
    c.start_member(2);
    wait_non_functional(
        &c,
        2,
        "configuration mismatch: session timeouts differ from member 1's",
    );
    c.wait(
        "fw1 to see fw2 non-functional",
        Duration::from_secs(10),
        || {
            let m = c.try_member(1, 2)?;
            (m.state == "non-functional").then_some(()).ok_or(m.state)
        },
    );
    c.wait_active(1, Duration::from_secs(TENTATIVE_S + 5));
    still_echoing(
        &c,
        &client,
        Instant::now(),
        "through fw1 with fw2 mismatched",
    );
    // Its configuration agrees again: it starts and becomes active.
    ok(&c, c.stop_agent(2, Duration::from_secs(5)));
    let agreeing = |text: String| text.replace("\n[timeouts]\nestablished = 600\n", "");
    ok(&c, c.lab().rewrite_config(2, agreeing));
    c.start_member(2);
    c.wait_active(2, Duration::from_secs(20));
    let end = client.stop();
    assert!(end.fatal.is_none(), "the connection broke: {end:?}");
}

/// `[local] max_flaps`: fw1's uplink fails again soon after fw1 came back, a blip of its
/// cable this time, its second flap, and fw1 suspends itself (fw2 is active to take its
/// traffic), names why, stays suspended after its monitor recovered and the hold-down passed
/// and across a restart (its state directory keeps the mark), until `hasync functional`.
#[test]
fn a_member_that_reaches_its_flap_limit_suspends_itself_until_functional() {
    /// Long enough for the second flap to fall within it on a loaded runner.
    const HOLD_S: u64 = 6;
    let over = MemberOverride {
        monitor: Some(uplink_monitor()),
        max_flaps: Some(2),
        ..MemberOverride::default()
    };
    let options = ClusterOptions {
        keepalive_threshold_ms: Some(5_000),
        tentative_hold_s: Some(0),
        monitor_fail_hold_down_s: Some(HOLD_S),
        overrides: [(1, over)].into(),
        ..ClusterOptions::default()
    };
    let c = Cluster::start("cfl-", 2, options);
    let topo = c.topology();
    c.wait_pair_active();
    // The first flap; back to Active after the hold-down (no tentative hold here).
    ok(&c, topo.cable_down(1, Link::Out));
    wait_non_functional(&c, 1, "link group `uplink`: out0 down");
    ok(&c, topo.cable_up(1, Link::Out));
    c.wait_active(1, Duration::from_secs(HOLD_S + 5));
    assert_eq!(c.try_member(1, 1).map(|m| m.flaps), Ok(1));
    // The second, within a hold-down time of being Active again: a blip, the cable out and
    // in at once (veth reports both changes; a NIC's coalesced ones the carrier-down count
    // shows, as the unit test in monitor/links.rs checks).
    ok(&c, topo.cable_down(1, Link::Out));
    ok(&c, topo.cable_up(1, Link::Out));
    let suspended_at_limit = |what: &str| {
        c.wait(what, Duration::from_secs(10), || {
            let v = c.try_members(1)?;
            let state = &v.members.iter().find(|m| m.id == 1).ok_or("no self")?.state;
            let named = v.faults.iter().any(|f| f.contains("at its flap limit"));
            (state == "suspended" && named)
                .then_some(())
                .ok_or(format!("{state}, {:?}", v.faults))
        });
    };
    suspended_at_limit("fw1 to suspend itself");
    c.wait("fw2 to see fw1 suspended", Duration::from_secs(10), || {
        let m = c.try_member(2, 1)?;
        (m.state == "suspended").then_some(()).ok_or(m.state)
    });
    let state_dir = state_dir(c.dir(), 1);
    c.wait(
        "the mark to be kept",
        Duration::from_secs(5),
        || match suspend_mark::read(&state_dir).map_err(|e| e.to_string())? {
            Some(suspend_mark::MarkKind::FlapLimit) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    // The hold-down passes: still suspended.
    std::thread::sleep(Duration::from_secs(HOLD_S + 1));
    let m = c.try_member(1, 1).unwrap_or_else(|e| c.fail(&e));
    assert_eq!((m.state.as_str(), m.flaps), ("suspended", 2));
    // Restarted (fw2 still active): suspended again.
    ok(&c, c.stop_agent(1, Duration::from_secs(5)).map(drop));
    c.start_member(1);
    suspended_at_limit("fw1 to be suspended after its restart");
    std::thread::sleep(Duration::from_secs(3));
    suspended_at_limit("fw1 to stay suspended while fw2 serves");
    let back = c.try_functional(1).unwrap_or_else(|e| c.fail(&e));
    assert_eq!(back.not_kept, None);
    c.wait_active(1, Duration::from_secs(5));
    let mark = suspend_mark::read(&state_dir).unwrap_or_else(|e| c.fail(&e.to_string()));
    assert_eq!(mark, None, "`hasync functional` removed the mark");
}
