//! Sessions made by real traffic through fw1 appear on every other member, owned by fw1, with
//! their state and zone: in a cluster of two and of three.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hasync_agent::{
    control::SessionFilter,
    lab::{
        topology::{CLIENT_V4, SERVER_V4},
        traffic::{tcp_client, tcp_echo_server, udp_echo_server, Bounds, TcpClientOptions},
        ClusterOptions,
    },
};
use hasync_tests::cluster::{show, udp_flows, Cluster, Row, Table};

/// UDP flows made for the check.
const UDP_FLOWS: usize = 3;
/// How long replication may take once the traffic is there.
const REPLICATION: Duration = Duration::from_secs(15);

fn every_member_holds_fw1s_sessions(tag: &str, members: u8, tcp_port: u16, udp_port: u16) {
    let c = Cluster::start(
        tag,
        members,
        ClusterOptions {
            // Nothing expires during the test.
            timeouts: [("udp-replied".to_owned(), 600), ("udp-new".to_owned(), 600)].into(),
            ..ClusterOptions::default()
        },
    );
    let topo = c.topology();
    let ids: Vec<u8> = topo.member_ids().collect();
    for &k in &ids {
        c.wait_active(k, Duration::from_secs(20));
    }

    let tcp_addr: SocketAddr = (SERVER_V4, tcp_port).into();
    let udp_addr: SocketAddr = (SERVER_V4, udp_port).into();
    let bounds = Bounds::new(1_000, Duration::from_secs(60));
    let _tcp_server = tcp_echo_server(topo.server(), tcp_addr, Bounds::new(4, bounds.duration))
        .expect("TCP echo server");
    let _udp_server = udp_echo_server(topo.server(), udp_addr, bounds).expect("UDP echo server");
    let tcp = tcp_client(
        topo.client(),
        tcp_addr,
        TcpClientOptions {
            bounds,
            ..TcpClientOptions::default()
        },
    )
    .unwrap_or_else(|e| c.fail(&format!("TCP through fw1: {e}")));
    tcp.wait_until(Duration::from_secs(5), |p| p.ok >= 3)
        .unwrap_or_else(|| c.fail(&format!("no TCP echoes through fw1: {:?}", tcp.progress())));
    let udp_ports = udp_flows(topo.client(), udp_addr, UDP_FLOWS)
        .unwrap_or_else(|e| c.fail(&format!("UDP through fw1: {e}")));

    // fw1 made them: one TCP session (established), UDP_FLOWS answered UDP sessions.
    let fw1 = c.wait("fw1 to list the sessions", Duration::from_secs(5), || {
        let t = c.try_table(1)?;
        let tcp: Vec<&Row> = t.iter().filter(|r| r.dport == tcp_port).collect();
        let udp = t.iter().filter(|r| r.dport == udp_port).count();
        (tcp.len() == 1 && tcp[0].state == "established" && udp == UDP_FLOWS)
            .then_some(t.clone())
            .ok_or_else(|| format!("fw1's table:{}", show(&t, 20)))
    });
    let tcp_row = fw1
        .iter()
        .find(|r| r.dport == tcp_port)
        .expect("found above")
        .clone();
    let mut expected: Table = udp_ports
        .iter()
        .map(|&sport| Row {
            proto: "udp".into(),
            src: IpAddr::V4(CLIENT_V4),
            sport,
            dst: IpAddr::V4(SERVER_V4),
            dport: udp_port,
            state: "udp-replied".into(),
            owner: 1,
            zone: "trust".into(),
        })
        .collect();
    expected.insert(Row {
        proto: "tcp".into(),
        src: IpAddr::V4(CLIENT_V4),
        sport: tcp_row.sport,
        dst: IpAddr::V4(SERVER_V4),
        dport: tcp_port,
        state: "established".into(),
        owner: 1,
        zone: "trust".into(),
    });
    let missing: Vec<&Row> = expected.difference(&fw1).collect();
    assert!(
        missing.is_empty(),
        "fw1 lacks {missing:?}; it lists:{}",
        show(&fw1, 20)
    );

    // Every other member lists them, as fw1 does.
    for &k in &ids[1..] {
        c.wait(
            &format!("fw{k} to list fw1's sessions"),
            REPLICATION,
            || {
                let t = c.try_table(k)?;
                let missing: Vec<String> =
                    expected.difference(&t).map(ToString::to_string).collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "missing {missing:#?}; fw{k} lists:{}",
                        show(&t, 20)
                    ))
                }
            },
        );
        let owned = c
            .try_count(
                k,
                SessionFilter {
                    owner: Some(k),
                    ..SessionFilter::default()
                },
            )
            .unwrap_or_else(|e| c.fail(&e));
        assert_eq!(
            owned.total, 0,
            "fw{k} owns sessions it never saw traffic for"
        );
    }
    // And, with the traffic still running, all tables end up the same.
    c.wait_same_tables(&ids, REPLICATION, |t| {
        if expected.is_subset(t) {
            Ok(())
        } else {
            Err("the sessions made through fw1 are missing".into())
        }
    });
    let p = tcp.stop();
    assert!(p.fatal.is_none(), "the TCP connection broke: {p:?}");
}

#[test]
fn two_members_hold_the_sessions_made_through_fw1() {
    every_member_holds_fw1s_sessions("crep2-", 2, 7100, 7101);
}

#[test]
fn three_members_hold_the_sessions_made_through_fw1() {
    every_member_holds_fw1s_sessions("crep3-", 3, 7110, 7111);
}
