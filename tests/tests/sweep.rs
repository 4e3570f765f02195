//! The expiry sweep against sessions the XDP program created: what idles past its state's
//! timeout goes (with a report naming why), what is fresh or long-lived stays.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use hasync_agent::datapath::sweep::{RemoveReason, Removed};
use hasync_common::{
    session::tcp::{ACK, RST},
    FlowKey, State,
};
use hasync_tests::{
    fixture::show,
    frame::Frame,
    testrun::{fixture_config, TestDatapath, Verdict},
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
    let mut tdp = TestDatapath::load().expect("load");
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
    assert_eq!(tdp.sessions().expect("dump").len(), usize::from(N));
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
