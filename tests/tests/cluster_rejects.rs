//! A member with another cluster key, or another cluster id, is refused: both ends count the
//! refusal by reason in `show cluster statistics`, the link stays down, and no session made
//! through fw1 is installed on it.

use std::{net::SocketAddr, time::Duration};

use hasync_agent::{
    control::SessionFilter,
    lab::{
        cluster::MemberOverride,
        topology::SERVER_V4,
        traffic::{udp_echo_server, Bounds},
        ClusterOptions,
    },
};
use hasync_tests::cluster::{udp_flows, Cluster};

/// fw2 differs from fw1 by `over`; fw1 and fw2 must both refuse each other for `reason`.
fn fw2_is_refused(tag: &str, over: MemberOverride, reason: &str, port: u16) {
    let c = Cluster::start(
        tag,
        2,
        ClusterOptions {
            overrides: [(2, over)].into(),
            ..ClusterOptions::default()
        },
    );
    let topo = c.topology();
    let rejected = |k: u8| -> Result<u64, String> {
        let s = c.try_statistics(k)?;
        Ok(s.rejected.get(reason).copied().unwrap_or(0))
    };
    // fw1 dials fw2 on both links every 500 ms: both ends count each refusal.
    for k in [1, 2] {
        c.wait(
            &format!("fw{k} to count {reason} refusals"),
            Duration::from_secs(10),
            || {
                let n = rejected(k)?;
                (n > 0).then_some(n).ok_or(format!("{reason} = {n}"))
            },
        );
    }

    // Sessions through fw1.
    let addr: SocketAddr = (SERVER_V4, port).into();
    let _udp = udp_echo_server(
        topo.server(),
        addr,
        Bounds::new(100, Duration::from_secs(30)),
    )
    .expect("UDP echo server");
    udp_flows(topo.client(), addr, 5).unwrap_or_else(|e| c.fail(&e));
    let made = c
        .try_count(1, SessionFilter::default())
        .unwrap_or_else(|e| c.fail(&e));
    assert_eq!(made.by_owner.get(&1), Some(&5), "fw1 made the sessions");
    // Let fw1 try fw2 a few more times with its sessions queued: every try is refused.
    let after = rejected(1).unwrap_or_else(|e| c.fail(&e));
    c.wait(
        &format!("fw1 to be refused again ({reason})"),
        Duration::from_secs(10),
        || {
            let n = rejected(1)?;
            (n >= after + 4).then_some(()).ok_or(format!("{n}"))
        },
    );

    let on2 = c
        .try_count(2, SessionFilter::default())
        .unwrap_or_else(|e| c.fail(&e));
    assert_eq!(
        on2.total,
        0,
        "fw2 ({reason}) installed sessions: {on2:?}\n{}",
        c.logs()
    );
    let fw2_seen = c.try_member(1, 2).unwrap_or_else(|e| c.fail(&e));
    assert_eq!(
        (fw2_seen.ha4.as_str(), fw2_seen.ha4_backup.as_str()),
        ("down", "down"),
        "fw1's links to fw2: {fw2_seen:?}"
    );
    assert_ne!(fw2_seen.state, "active", "{fw2_seen:?}");
    let s1 = c.statistics(1);
    let to2 = s1.peers.iter().find(|p| p.id == 2).expect("peer 2");
    let sent: u64 = to2.links.values().map(|l| l.records_sent).sum();
    assert_eq!(sent, 0, "fw1 sent records to fw2: {to2:?}");
    let s2 = c.statistics(2);
    let from1 = s2.peers.iter().find(|p| p.id == 1).expect("peer 1");
    assert_eq!(from1.records_installed, 0, "{from1:?}");
    for (k, s) in [(1, &s1), (2, &s2)] {
        assert!(
            s.rejected.get(reason).copied().unwrap_or(0) > 0,
            "fw{k} counts no {reason}: {:?}",
            s.rejected
        );
    }
}

#[test]
fn a_member_with_another_key_is_refused() {
    fw2_is_refused(
        "crjk-",
        MemberOverride {
            key: Some(vec![0x42; 32]),
            ..MemberOverride::default()
        },
        "bad-key",
        7400,
    );
}

#[test]
fn a_member_of_another_cluster_is_refused() {
    fw2_is_refused(
        "crjc-",
        MemberOverride {
            cluster_id: Some(hasync_common::ClusterId(8)),
            ..MemberOverride::default()
        },
        "wrong-cluster",
        7401,
    );
}
