//! The expiry sweep against sessions the XDP program created: what idles past its state's
//! timeout goes (with a report naming why), what is fresh or long-lived stays.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use aya::maps::Array;
use hasync_agent::datapath::sweep::{RemoveReason, Removed, SweptTable};
use hasync_common::{
    maps as names,
    session::tcp::{ACK, RST},
    DatapathConfig, FlowKey, State,
};
use hasync_tests::{
    fixture::show,
    frame::Frame,
    testrun::{fixture_config, monotonic_ns, TestDatapath, Verdict},
};

const SECOND: u64 = 1_000_000_000;

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

fn run(tdp: &TestDatapath, f: &Frame) {
    let verdict = tdp.run(&f.build()).expect("test run");
    assert_eq!(verdict, Verdict::Pass, "{f:?}");
}

/// Runs a sweep and returns its removals by key.
fn sweep(
    tdp: &mut TestDatapath,
    chunk: u32,
) -> (
    hasync_agent::datapath::sweep::SweepReport,
    HashMap<FlowKey, Removed>,
) {
    let mut removed = HashMap::new();
    let report = tdp
        .datapath_mut()
        .sweep(chunk, |chunk| {
            for r in chunk {
                assert!(
                    removed.insert(r.key, *r).is_none(),
                    "{:?} reported twice",
                    r.key
                );
            }
        })
        .expect("sweep");
    (report, removed)
}

#[test]
fn sweep_removes_what_idled_past_its_timeout_and_keeps_the_rest() {
    let mut cfg = fixture_config();
    cfg.timeouts_ns[State::UdpNew as usize] = SECOND;
    cfg.timeouts_ns[State::IcmpEcho as usize] = SECOND;
    cfg.timeouts_ns[State::Closed as usize] = SECOND;
    cfg.timeouts_ns[State::Established as usize] = 3600 * SECOND;
    let mut tdp = TestDatapath::load_with(cfg).expect("load");

    let (c, s) = (sa("198.18.0.10:40000"), sa("198.18.1.20:53"));
    let udp_idle = Frame::udp(c, s);
    let udp_busy = Frame::udp(sa("198.18.0.10:40001"), s);
    let ping = Frame::icmp_echo(c.ip(), s.ip(), 99, true);
    let (tc, ts) = (sa("[fd00::10]:40000"), sa("[fd00:1::20]:443"));
    let established = [
        Frame::tcp(tc, ts).syn(),
        Frame::tcp(ts, tc).syn_ack(),
        Frame::tcp(tc, ts).ack(),
    ];
    let (rc, rs) = (sa("198.18.0.10:40002"), sa("198.18.1.20:80"));
    let closed = [
        Frame::tcp(rc, rs).syn(),
        Frame::tcp(rs, rc).flags(RST | ACK),
    ];
    for f in [&udp_idle, &udp_busy, &ping]
        .into_iter()
        .chain(&established)
        .chain(&closed)
    {
        run(&tdp, f);
    }
    let state = |f: &Frame| tdp.session(&f.key()).expect("lookup").map(|s| s.state);
    assert_eq!(state(&established[0]), Some(State::Established as u8));
    assert_eq!(state(&closed[0]), Some(State::Closed as u8));

    // Nothing has idled yet.
    let (report, removed) = sweep(&mut tdp, 128);
    assert_eq!((report.scanned, report.removed()), (5, 0), "{report:?}");
    assert!(removed.is_empty());

    // Past the 1 s timeouts; one UDP flow keeps talking.
    std::thread::sleep(Duration::from_millis(1300));
    run(&tdp, &udp_busy);
    let before: HashMap<FlowKey, _> = tdp.sessions().expect("dump").into_iter().collect();
    let (report, removed) = sweep(&mut tdp, 128);
    assert_eq!(
        (report.scanned, report.expired, report.closed),
        (5, 2, 1),
        "{report:?}"
    );

    let reason = |f: &Frame| removed.get(&f.key()).map(|r| r.reason);
    assert_eq!(reason(&udp_idle), Some(RemoveReason::Expired));
    assert_eq!(reason(&ping), Some(RemoveReason::Expired));
    assert_eq!(reason(&closed[0]), Some(RemoveReason::Closed));
    assert_eq!(
        reason(&udp_busy),
        None,
        "a session seen just now was removed"
    );
    assert_eq!(
        reason(&established[0]),
        None,
        "an established session (1 h timeout) was removed"
    );
    for (key, r) in &removed {
        assert_eq!(
            Some(&r.session),
            before.get(key),
            "removal report of {}",
            show(&r.session)
        );
    }

    let left: Vec<FlowKey> = tdp
        .sessions()
        .expect("dump")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(left.len(), 2, "left: {left:?}");
    assert!(left.contains(&udp_busy.key()) && left.contains(&established[0].key()));

    // The removed flows start afresh: a new datagram creates a new session.
    run(&tdp, &udp_idle);
    let again = tdp
        .session(&udp_idle.key())
        .expect("lookup")
        .expect("recreated");
    assert_eq!(
        (again.state, again.version, again.packets),
        (State::UdpNew as u8, 1, [1, 0])
    );
}

#[test]
fn sweep_in_small_chunks_removes_every_expired_session() {
    // A table whose admission ring holds every one of the embryonic sessions made here on one
    // CPU (an eighth of it for this member's own, cut per possible CPU).
    let mut tdp = TestDatapath::load_sized(fixture_config(), 65_536).expect("load");
    const N: u16 = 600;
    for port in 0..N {
        run(
            &tdp,
            &Frame::udp(
                sa("198.18.0.10:1"),
                SocketAddr::new(sa("198.18.1.20:0").ip(), 10_000 + port),
            ),
        );
    }
    let sessions = tdp.sessions().expect("dump");
    assert_eq!(sessions.len(), usize::from(N));
    // A stamp from jiffies may lead the agent's clock by under a tick (see the stamps test
    // below), a session seen after the sweep's now is not idle, and the sweep judges expiry
    // as of its clock less the datapath clock's lag: wait until that has passed every stamp
    // (at most a second).
    let lag = SweptTable::clock_lag_ns(tdp.datapath());
    let newest = sessions
        .iter()
        .map(|(_, s)| s.last_seen_ns)
        .max()
        .unwrap_or(0)
        + lag;
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while monotonic_ns() <= newest && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    // The sweep reads the live config: make every udp-new session overdue.
    let mut cfg = fixture_config();
    cfg.timeouts_ns[State::UdpNew as usize] = 0;
    tdp.datapath_mut().set_config(&cfg).expect("config");
    let (report, removed) = sweep(&mut tdp, 16);
    assert_eq!(
        (report.scanned, report.expired, report.closed),
        (u64::from(N), u64::from(N), 0),
        "{report:?}"
    );
    assert_eq!(removed.len(), usize::from(N));
    assert!(removed.values().all(|r| r.reason == RemoveReason::Expired));
    assert!(tdp.sessions().expect("dump").is_empty());
}

/// Creates sessions over about 300 ms and returns, for each, how far its creation time is past
/// the agent's clock read just before (negative: behind) and how far it is past the agent's
/// clock read just after.
fn stamps(tdp: &TestDatapath) -> Vec<(i64, i64)> {
    (0..60u16)
        .map(|port| {
            let server = SocketAddr::new(sa("198.18.1.20:0").ip(), 20_000 + port);
            let f = Frame::udp(sa("198.18.0.10:1"), server);
            let before = monotonic_ns();
            run(tdp, &f);
            let after = monotonic_ns();
            let s = tdp.session(&f.key()).expect("lookup").expect("created");
            std::thread::sleep(Duration::from_millis(5));
            (
                s.created_ns.wrapping_sub(before) as i64,
                s.created_ns.wrapping_sub(after) as i64,
            )
        })
        .collect()
}

/// The program reads jiffies and stamps sessions in the agent's clock (the sweep compares the
/// two): never ahead of it (but for a sample caught between the kernel's updates of jiffies
/// and of the coarse clock, by less than a tick), and behind it by at most a tick and the
/// clock's margin.
#[test]
fn sessions_are_stamped_in_the_agents_clock_from_jiffies() {
    let tdp = TestDatapath::load().expect("load");
    let clock = tdp
        .datapath()
        .clock()
        .expect("this kernel's jiffies follow a known tick");
    let cfg = tdp.datapath().config().expect("config");
    assert_eq!(
        (cfg.ns_per_jiffy, cfg.jiffies_offset_ns),
        (clock.ns_per_jiffy, clock.offset_ns)
    );
    let tick = i64::from(clock.ns_per_jiffy);
    for (past_before, past_after) in stamps(&tdp) {
        assert!(
            past_before >= -2 * tick && past_after < tick,
            "stamped {past_before} ns past the agent's clock before, {past_after} after \
             ({} Hz)",
            clock.hz()
        );
    }
}

/// A config without the clock (an agent that predates it, or one that could not measure it):
/// the program reads the coarse clock itself, the agent's, exactly.
#[test]
fn without_the_jiffies_clock_the_program_reads_the_coarse_clock() {
    let mut tdp = TestDatapath::load().expect("load");
    let cfg = DatapathConfig {
        ns_per_jiffy: 0,
        jiffies_offset_ns: 0,
        ..tdp.datapath().config().expect("config")
    };
    let map = tdp
        .datapath_mut()
        .ebpf_mut()
        .map_mut(names::CONFIG)
        .expect("CONFIG");
    Array::<_, DatapathConfig>::try_from(map)
        .expect("array")
        .set(0, cfg, 0)
        .expect("write");
    for (past_before, past_after) in stamps(&tdp) {
        assert!(
            past_before >= 0 && past_after <= 0,
            "stamped {past_before} ns past the agent's clock before, {past_after} after"
        );
    }
}
