//! Table pressure through `BPF_PROG_TEST_RUN` (issue 9 §1): a flood of new flows, or of
//! peers' replicas, into a small session table must not push out replied sessions; unreplied
//! ones are evicted oldest first, counted by state and reported; a table full of replied
//! sessions refuses new flows (strict: dropped) instead of dropping old ones.

use std::net::{IpAddr, SocketAddr};

use hasync_common::{
    Counter, EventKind, FlowKey, InstallOp, InstallRecord, MemberId, Policy, Session, SessionFlags,
    State, ZoneId,
};
use hasync_tests::{
    frame::Frame,
    testrun::{fixture_config, monotonic_ns, stay_on_this_cpu, with_delta, TestDatapath, Verdict},
};

const CAPACITY: u32 = 1024;
const FLOOD: u16 = 4096;

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn load(policy: Policy) -> (TestDatapath, u32) {
    let mut cfg = fixture_config();
    cfg.policy = policy as u8;
    let tdp = TestDatapath::load_sized(cfg, CAPACITY).expect("load");
    // Test runs all happen on one CPU: that CPU's part of the ring is what they can use.
    stay_on_this_cpu().expect("pin the test to one CPU");
    let per_cpu = tdp.datapath().config().expect("config").embryo_slots;
    assert!(per_cpu > 0, "the agent sized the ring");
    (tdp, per_cpu)
}

/// A client and server with an established connection between them.
fn establish(tdp: &TestDatapath) -> (SocketAddr, SocketAddr) {
    let (c, s) = (sa("198.18.0.10:40000"), sa("198.18.1.20:443"));
    for f in [
        Frame::tcp(c, s).syn(),
        Frame::tcp(s, c).syn_ack(),
        Frame::tcp(c, s).ack(),
    ] {
        assert_eq!(tdp.run(&f.build()).expect("run"), Verdict::Pass);
    }
    (c, s)
}

/// UDP flow `i` of a flood from one host: a new source port each.
fn flood_flow(i: u16) -> Frame {
    let src = SocketAddr::new("198.18.0.11".parse().expect("ip"), 10_000 + i);
    Frame::udp(src, sa("198.18.1.20:53"))
}

fn kinds(events: &[hasync_common::Event], kind: EventKind) -> usize {
    events.iter().filter(|e| e.kind == kind as u8).count()
}

/// One established TCP connection, then 4,096 new UDP flows of two unanswered datagrams each
/// (the second a hit, as a real flow's would be), then data on the connection: the data
/// passes. Before the fix (an LRU table) the connection's entry was evicted and the data
/// dropped by the strict policy.
#[test]
fn a_flood_of_new_flows_does_not_evict_an_established_connection() {
    let (mut tdp, per_cpu) = load(Policy::Strict);
    let (c, s) = establish(&tdp);
    tdp.drain_events().expect("events");
    let ((), delta) = with_delta(&mut tdp, |tdp| {
        for i in 0..FLOOD {
            let f = flood_flow(i).build();
            assert_eq!(tdp.run(&f)?, Verdict::Pass);
            assert_eq!(tdp.run(&f)?, Verdict::Pass);
        }
        Ok(())
    })
    .expect("flood");
    let data = Frame::tcp(c, s).ack().payload(100);
    assert_eq!(
        tdp.run(&data.build()).expect("run"),
        Verdict::Pass,
        "data on the established connection after the flood ({delta})"
    );
    let session = tdp.session(&data.key()).expect("read").expect("kept");
    assert_eq!(session.state, State::Established as u8);

    // The oldest unreplied flows made room for the newer ones, and each eviction was counted
    // and reported with the session as it was.
    let evicted = u64::from(FLOOD) - u64::from(per_cpu);
    assert_eq!(delta.get(Counter::Creates), u64::from(FLOOD));
    assert_eq!(delta.get(Counter::EvictedUdpNew), evicted, "{delta}");
    assert_eq!(delta.get(Counter::DropTableFull), 0);
    let events = tdp.drain_events().expect("events");
    assert_eq!(kinds(&events, EventKind::Evicted) as u64, evicted);
    let first = events
        .iter()
        .find(|e| e.kind == EventKind::Evicted as u8)
        .expect("an eviction event");
    assert_eq!(first.key, flood_flow(0).key(), "the oldest goes first");
    assert_eq!(first.session.state, State::UdpNew as u8);
    assert_eq!(first.session.packets, [2, 0]);
    // The newest flows are still there; the table holds one part of the ring, plus the
    // connection.
    assert!(tdp
        .session(&flood_flow(FLOOD - 1).key())
        .expect("read")
        .is_some());
    let held = tdp.sessions().expect("sessions").len();
    assert_eq!(held, per_cpu as usize + 1);
}

/// A flow answered before the ring came round to it is not evicted: only unreplied sessions
/// are.
#[test]
fn a_replied_flow_is_never_evicted() {
    let (mut tdp, per_cpu) = load(Policy::Strict);
    let (c, s) = (sa("198.18.0.12:5000"), sa("198.18.1.20:53"));
    tdp.run(&Frame::udp(c, s).build()).expect("request");
    tdp.run(&Frame::udp(s, c).build()).expect("reply");
    let ((), delta) = with_delta(&mut tdp, |tdp| {
        for i in 0..(per_cpu as u16).saturating_mul(3) {
            tdp.run(&flood_flow(i).build())?;
        }
        Ok(())
    })
    .expect("flood");
    let kept = tdp
        .session(&Frame::udp(c, s).key())
        .expect("read")
        .expect("kept");
    assert_eq!(kept.state, State::UdpReplied as u8);
    assert_eq!(
        delta.get(Counter::EvictedUdpNew),
        u64::from(per_cpu) * 2,
        "{delta}"
    );
}

/// Unreplied sessions of each kind are counted under their own state.
#[test]
fn evictions_are_counted_by_state() {
    let (mut tdp, per_cpu) = load(Policy::Strict);
    let server: IpAddr = "198.18.1.20".parse().expect("ip");
    let ((), delta) = with_delta(&mut tdp, |tdp| {
        for i in 0..per_cpu as u16 {
            let src = SocketAddr::new("198.18.0.13".parse()?, 20_000 + i);
            tdp.run(&Frame::tcp(src, sa("198.18.1.20:80")).syn().build())?;
        }
        for id in 0..per_cpu as u16 {
            tdp.run(&Frame::icmp_echo("198.18.0.14".parse()?, server, id, true).build())?;
        }
        for i in 0..per_cpu as u16 {
            tdp.run(&flood_flow(i).build())?;
        }
        Ok(())
    })
    .expect("flood");
    assert_eq!(delta.get(Counter::EvictedSynSent), u64::from(per_cpu));
    assert_eq!(delta.get(Counter::EvictedIcmpEcho), u64::from(per_cpu));
    assert_eq!(delta.get(Counter::EvictedUdpNew), 0);
}

/// A table full of replied sessions takes no new flow: the strict policy drops it (counted),
/// the loose one passes it untracked; no replied session is lost either way.
#[test]
fn a_full_table_refuses_new_flows_and_keeps_what_it_holds() {
    for (policy, verdict, counter) in [
        (Policy::Strict, Verdict::Drop, Counter::DropTableFull),
        (Policy::Loose, Verdict::Pass, Counter::PassTableFull),
    ] {
        let (mut tdp, _) = load(policy);
        fill_with_replied(&mut tdp);
        let ((), delta) = with_delta(&mut tdp, |tdp| {
            assert_eq!(tdp.run(&flood_flow(0).build())?, verdict);
            Ok(())
        })
        .expect("new flow");
        assert_eq!(delta.get(counter), 1, "{policy:?}: {delta}");
        assert_eq!(delta.get(Counter::Creates), 0);
        assert_eq!(tdp.sessions().expect("sessions").len(), CAPACITY as usize);
    }
}

/// Fills the whole table with replied UDP sessions owned here.
fn fill_with_replied(tdp: &mut TestDatapath) {
    let now = monotonic_ns();
    let entries: Vec<(FlowKey, Session)> = (0..CAPACITY)
        .map(|i| {
            let port = u16::try_from(i).expect("port");
            let src = SocketAddr::new("198.18.0.15".parse().expect("ip"), 30_000 + port);
            let key = Frame::udp(src, sa("198.18.1.20:53")).key();
            (key, replied(now, MemberId(1)))
        })
        .collect();
    tdp.insert_sessions(&entries).expect("fill");
}

fn replied(now: u64, owner: MemberId) -> Session {
    Session {
        created_ns: now,
        last_seen_ns: now,
        last_event_ns: now,
        packets: [1, 1],
        bytes: [100, 100],
        version: 1,
        zone: ZoneId::NONE,
        flags: SessionFlags::default(),
        owner,
        state: State::UdpReplied as u8,
        tcp_flags: [0, 0],
        ticket: 0,
        reply_zone: ZoneId::NONE,
        _pad: [0; 6],
    }
}

/// Peers' records go through the same admission: a flood of unreplied replicas evicts only
/// unreplied sessions (never the local established connection), and replied replicas that
/// find the table full are refused and counted, not installed over anything.
#[test]
fn replicas_never_evict_replied_sessions() {
    let (mut tdp, _) = load(Policy::Strict);
    let replica_slots = tdp
        .datapath()
        .config()
        .expect("config")
        .embryo_replica_slots;
    let (c, s) = establish(&tdp);
    let peer = MemberId(2);
    let now = monotonic_ns();
    let record = |i: u32, packets: [u64; 2]| {
        let port = u16::try_from(i % 60_000).expect("port");
        let src = SocketAddr::new("198.18.0.16".parse().expect("ip"), 1_000 + port);
        let mut session = replied(now, peer);
        session.packets = packets;
        session.state = if packets[1] == 0 {
            State::UdpNew as u8
        } else {
            State::UdpReplied as u8
        };
        InstallRecord {
            key: Frame::udp(src, sa("198.18.1.20:53")).key(),
            session,
            op: InstallOp::Upsert as u8,
            _pad: [0; 7],
        }
    };
    let flood: Vec<InstallRecord> = (0..u32::from(FLOOD)).map(|i| record(i, [1, 0])).collect();
    let dp = tdp.datapath_mut();
    let out = dp.install(&flood, MemberId::NONE, now).expect("install");
    assert_eq!(out.installed, u32::from(FLOOD));
    let counters = tdp.counters().expect("counters");
    assert_eq!(
        counters.get(Counter::EvictedUdpNew),
        u64::from(FLOOD) - u64::from(replica_slots),
        "replicas have their own part of the ring, whatever CPU installs them"
    );
    let data = Frame::tcp(c, s).ack().payload(10);
    assert_eq!(tdp.run(&data.build()).expect("run"), Verdict::Pass);

    // Replied replicas fill what is left of the table, then are refused.
    let held = tdp.sessions().expect("sessions").len() as u32;
    let room = CAPACITY - held;
    let replied_records: Vec<InstallRecord> = (0..room + 10)
        .map(|i| record(u32::from(FLOOD) + i, [1, 1]))
        .collect();
    let out = tdp
        .datapath_mut()
        .install(&replied_records, MemberId::NONE, now)
        .expect("install");
    // The unreplied replicas stay too: a replied record takes no ticket and evicts nothing.
    assert_eq!((out.installed, out.full), (room, 10), "{out:?}");
    assert_eq!(tdp.sessions().expect("sessions").len(), CAPACITY as usize);
    assert_eq!(tdp.run(&data.build()).expect("run"), Verdict::Pass);
}
