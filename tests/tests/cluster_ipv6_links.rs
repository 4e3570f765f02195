//! HA4 and HA4 backup over IPv6: the same cluster, its sync links addressed from fd00::/8,
//! links up and sessions replicated.

use std::{net::SocketAddr, time::Duration};

use hasync_agent::lab::{
    netns::ip,
    topology::SERVER_V4,
    traffic::{udp_echo_server, Bounds},
    ClusterOptions,
};
use hasync_tests::cluster::{udp_flows, Cluster};

/// The sync link networks of the lab (`198.18.<net>.<k>/24`) and their IPv6 counterparts
/// (`fd00:<net>::<k>/64`).
const LINKS: [(u8, &str); 2] = [(100, "ha4"), (101, "ha4b")];

#[test]
fn sync_links_work_over_ipv6() {
    let c = Cluster::new(
        "c6-",
        2,
        ClusterOptions {
            timeouts: [("udp-new".to_owned(), 600)].into(),
            ..ClusterOptions::default()
        },
    );
    let topo = c.topology();
    for k in topo.member_ids().collect::<Vec<_>>() {
        for (net, ifname) in LINKS {
            ip(
                topo.fw(k),
                &[
                    "addr",
                    "add",
                    &format!("fd00:{net}::{k}/64"),
                    "dev",
                    ifname,
                    "nodad",
                ],
            )
            .unwrap_or_else(|e| c.fail(&format!("adding IPv6 to fw{k} {ifname}: {e}")));
        }
        c.lab()
            .rewrite_config(k, |text| {
                let mut text = text;
                for j in topo.member_ids() {
                    for (net, _) in LINKS {
                        text = text
                            .replace(
                                &format!("198.18.{net}.{j}/24"),
                                &format!("fd00:{net}::{j}/64"),
                            )
                            .replace(
                                &format!("\"198.18.{net}.{j}\""),
                                &format!("\"fd00:{net}::{j}\""),
                            );
                    }
                }
                assert!(
                    !text.contains("198.18.100.") && !text.contains("198.18.101."),
                    "{text}"
                );
                text
            })
            .unwrap_or_else(|e| c.fail(&format!("rewriting fw{k}'s config: {e}")));
    }
    for k in topo.member_ids() {
        c.start_member(k);
    }
    c.wait(
        "both sync links up over IPv6",
        Duration::from_secs(20),
        || {
            let m = c.try_member(1, 2)?;
            (m.state == "active" && m.ha4 == "up" && m.ha4_backup == "up")
                .then_some(())
                .ok_or(format!(
                    "fw2 as fw1 sees it: {} ha4 {} ha4-backup {}",
                    m.state, m.ha4, m.ha4_backup
                ))
        },
    );

    let server: SocketAddr = (SERVER_V4, 7600).into();
    let _srv = udp_echo_server(
        topo.server(),
        server,
        Bounds::new(100, Duration::from_secs(30)),
    )
    .expect("UDP echo server");
    let ports = udp_flows(topo.client(), server, 5).unwrap_or_else(|e| c.fail(&e));
    c.wait("fw1's flows on fw2", Duration::from_secs(15), || {
        let t = c.try_table(2)?;
        let have = ports
            .iter()
            .filter(|p| {
                t.iter()
                    .any(|r| r.proto == "udp" && r.sport == **p && r.owner == 1)
            })
            .count();
        (have == ports.len())
            .then_some(())
            .ok_or(format!("{have} of {} flows", ports.len()))
    });
    let s = c.statistics(1);
    let to2 = s.peers.iter().find(|p| p.id == 2).expect("peer 2");
    assert!(
        to2.links.values().any(|l| l.records_sent > 0),
        "records went out over IPv6: {to2:?}"
    );
}
