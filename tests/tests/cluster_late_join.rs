//! A member that joins late receives the whole table: fw1 holds 100,000 sessions made by its
//! XDP program from real frames; fw2 starts only then, and ends up with all of them, owned by
//! fw1, passing from `initial` to `active` once its full sync has ended.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use hasync_agent::{
    control::SessionFilter,
    lab::{topology::SERVER_V4, ClusterOptions},
};
use hasync_tests::cluster::{Cluster, UdpInjector};

/// Sessions fw1 holds before fw2 joins.
const SESSIONS: u64 = 100_000;
/// Source addresses (unused on the client side: .1–.16 are members, .100 the client).
const SOURCES: [Ipv4Addr; 4] = [
    Ipv4Addr::new(198, 18, 0, 200),
    Ipv4Addr::new(198, 18, 0, 201),
    Ipv4Addr::new(198, 18, 0, 202),
    Ipv4Addr::new(198, 18, 0, 203),
];
const FIRST_PORT: u16 = 20_000;
/// The server's discard-like port: nothing listens, the frames only need to pass fw1.
const DST_PORT: u16 = 9;

#[test]
fn a_late_member_receives_100k_sessions_and_becomes_active() {
    let c = Cluster::new(
        "clate-",
        2,
        ClusterOptions {
            session_capacity: 1 << 20,
            // The injected flows are never answered: all of them fit in one CPU's part of the
            // embryonic share (each member's a quarter of the table in a 2-member cluster, cut
            // per CPU), here and in the late member's part for fw1's copies.
            embryonic_capacity: Some(262_144),
            // The injected flows are never answered: udp-new must outlive the test.
            timeouts: [("udp-new".to_owned(), 600)].into(),
            ..ClusterOptions::default()
        },
    );
    c.start_member(1);
    let per_source = u16::try_from(SESSIONS / SOURCES.len() as u64).expect("ports per source");
    let injector = UdpInjector::to_member(
        c.topology(),
        1,
        SOURCES.to_vec(),
        FIRST_PORT..FIRST_PORT + per_source,
        SocketAddrV4::new(SERVER_V4, DST_PORT),
    )
    .unwrap_or_else(|e| c.fail(&e));
    assert_eq!(injector.flows() as u64, SESSIONS);
    let trust_udp = SessionFilter {
        proto: Some("udp".into()),
        zone: Some("trust".into()),
        port: Some(DST_PORT),
        ..SessionFilter::default()
    };
    let owned_by_1 = SessionFilter {
        owner: Some(1),
        ..trust_udp.clone()
    };

    // Frames through fw1's XDP program; sent again (at most 4 rounds) if the veth queues
    // dropped some: every round refreshes what exists and creates what is missing.
    let started = Instant::now();
    let mut held = 0;
    for round in 1..=4 {
        let sent = injector
            .send(c.topology().client(), Duration::from_secs(30))
            .unwrap_or_else(|e| c.fail(&format!("injecting round {round}: {e}")));
        assert_eq!(sent, SESSIONS);
        held = c.wait("fw1 to count its sessions", Duration::from_secs(5), || {
            c.try_count(1, owned_by_1.clone()).map(|v| v.total)
        });
        eprintln!(
            "round {round}: fw1 holds {held} of {SESSIONS} after {:.1} s",
            started.elapsed().as_secs_f64()
        );
        if held >= SESSIONS {
            break;
        }
    }
    assert_eq!(
        held,
        SESSIONS,
        "fw1 did not make every session\n{}",
        c.logs_of([1])
    );

    // fw2 joins now.
    let joined = Instant::now();
    c.start_member(2);
    let mut states = Vec::new();
    let note_state = |states: &mut Vec<String>| {
        if let Ok(m) = c.try_member(2, 2) {
            if states.last() != Some(&m.state) {
                states.push(m.state);
            }
        }
    };
    note_state(&mut states);
    let received = c.wait(
        "fw2 to hold fw1's 100,000 sessions",
        Duration::from_secs(60),
        || {
            note_state(&mut states);
            let v = c.try_count(2, trust_udp.clone())?;
            let by_1 = v.by_owner.get(&1).copied().unwrap_or(0);
            if by_1 == SESSIONS && v.total == SESSIONS {
                Ok(v)
            } else {
                Err(format!("fw2 holds {} ({by_1} owned by fw1)", v.total))
            }
        },
    );
    let synced = joined.elapsed();
    c.wait("fw2 to become active", Duration::from_secs(30), || {
        note_state(&mut states);
        (states.last().map(String::as_str) == Some("active"))
            .then_some(())
            .ok_or_else(|| format!("states so far {states:?}"))
    });
    eprintln!(
        "fw2 held {} sessions {:.1} s after it started; states {states:?}",
        received.total,
        synced.as_secs_f64()
    );
    assert_eq!(
        states.first().map(String::as_str),
        Some("initial"),
        "fw2 should start initial: {states:?}"
    );
    assert_eq!(
        states,
        ["initial", "active"],
        "fw2 went initial → active only"
    );

    // fw1 sent it as a full sync; fw2 counts it as received.
    let s1 = c.statistics(1);
    let to2 = s1
        .peers
        .iter()
        .find(|p| p.id == 2)
        .expect("fw1 lists peer 2");
    assert!(
        to2.full_syncs.sent.count >= 1 && to2.full_syncs.sent.last_records.unwrap_or(0) >= SESSIONS,
        "fw1's full syncs to fw2: {:?}",
        to2.full_syncs
    );
    let s2 = c.statistics(2);
    let from1 = s2
        .peers
        .iter()
        .find(|p| p.id == 1)
        .expect("fw2 lists peer 1");
    assert!(
        from1.full_syncs.received.count >= 1 && from1.records_installed >= SESSIONS,
        "fw2's view of fw1: {from1:?}"
    );
    // fw2 never owns any of them.
    let owned_by_2 = c
        .try_count(
            2,
            SessionFilter {
                owner: Some(2),
                ..SessionFilter::default()
            },
        )
        .unwrap_or_else(|e| c.fail(&e));
    assert_eq!(owned_by_2.total, 0);
}
