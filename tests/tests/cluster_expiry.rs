//! Expiry across a cluster, through partitions that heal. UDP sessions time out after a few
//! seconds; a long-lived UDP flow runs through fw1 the whole test and bursts of short flows
//! come and go. Both tables are sampled every 200 ms, and the test checks:
//! - a live flow's replica never expires on fw2 while the link works (refreshes reach it in
//!   time), and comes back within a bound after each heal (it expires during a cut longer than
//!   the timeout);
//! - a short flow leaves fw2's table no later than a slack after it left its owner's, or after
//!   the heal of a cut that held its removal back: a replica never outlives its owner's copy
//!   (no resurrection by a late record, a resend or a full sync);
//! - at the end no member holds a short flow.
//!
//! Two cuts of both sync links (nftables drops everything on fw2's): one shorter than the
//! keepalive threshold (the connections stall and resume: records written before the heal
//! arrive late), one longer (each member declares the other down; the heal brings full
//! syncs).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::{Duration, Instant},
};

use hasync_agent::lab::{
    topology::{Link, SERVER_V4},
    traffic::{udp_client, udp_echo_server, Bounds, TrafficClient, UdpClientOptions},
    ClusterOptions,
};
use hasync_tests::cluster::{udp_flows, Cluster, Table};

const UDP_PORT: u16 = 7801;
/// `udp-new` and `udp-replied`: a refresh every second (the shortest interval), well inside
/// the timeout.
const TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE: Duration = Duration::from_secs(10);
/// Below the keepalive threshold; long enough for a burst made at its start to expire on fw1
/// (the timeout, and a second or so for the sweep to find it).
const SHORT_CUT: Duration = Duration::from_secs(8);
/// How much later than its owner's copy (or than a heal) a replica may leave: each member's
/// sweep finds an expired session within a second or so of its expiry.
const SLACK: Duration = Duration::from_millis(2_500);
/// After a heal: the stalled connection's retransmissions, or a new connection and a full
/// sync, bring the live flow's replica back.
const BACK: Duration = Duration::from_secs(20);
const SAMPLE: Duration = Duration::from_millis(200);
const BURST: usize = 8;

/// The source ports of `t`'s UDP sessions to the echo port.
fn udp_ports(t: &Table) -> BTreeSet<u16> {
    t.iter()
        .filter(|r| r.proto == "udp" && r.dport == UDP_PORT)
        .map(|r| r.sport)
        .collect()
}

fn cut(c: &Cluster, on: bool) {
    for link in [Link::Ha4, Link::Ha4Backup] {
        let done = if on {
            c.topology().drop_with_nft(2, link, 100)
        } else {
            c.topology().undrop_nft(2, link)
        };
        done.unwrap_or_else(|e| c.fail(&format!("{link} on fw2: {e}")));
    }
}

/// When each member held each UDP port: the first and last sample that listed it, and the
/// first sample that listed it again after a gap (if any).
#[derive(Default)]
struct Seen {
    first: Option<Instant>,
    last: Option<Instant>,
    /// Samples in which the port was missing after it had been listed.
    gaps: Vec<Instant>,
}

/// Both members' tables, sampled.
struct Watch<'a> {
    c: &'a Cluster,
    seen: BTreeMap<(u8, u16), Seen>,
}

impl Watch<'_> {
    /// Samples both tables every [`SAMPLE`] for `d`.
    fn run(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.sample();
            std::thread::sleep(SAMPLE);
        }
    }

    /// Samples until `done` holds for the latest tables, for at most `bound`.
    fn until(&mut self, what: &str, bound: Duration, done: impl Fn(&[BTreeSet<u16>; 2]) -> bool) {
        let start = Instant::now();
        loop {
            let now = self.sample();
            if done(&now) {
                return;
            }
            if start.elapsed() > bound {
                self.c.fail(&format!(
                    "{what}: not within {bound:?}; fw1 {:?}, fw2 {:?}",
                    now[0], now[1]
                ));
            }
            std::thread::sleep(SAMPLE);
        }
    }

    fn sample(&mut self) -> [BTreeSet<u16>; 2] {
        let ports = [1, 2].map(|k| udp_ports(&self.c.table(k)));
        let at = Instant::now();
        for (k, listed) in [(1u8, &ports[0]), (2, &ports[1])] {
            for &p in listed {
                let s = self.seen.entry((k, p)).or_default();
                s.first.get_or_insert(at);
                s.last = Some(at);
            }
            for ((_, p), s) in self.seen.range_mut((k, 0)..=(k, u16::MAX)) {
                if !listed.contains(p) && s.last.is_some() {
                    s.gaps.push(at);
                }
            }
        }
        ports
    }

    fn last(&self, k: u8, port: u16) -> Option<Instant> {
        self.seen.get(&(k, port)).and_then(|s| s.last)
    }
}

fn short_flows(c: &Cluster, server: SocketAddr) -> BTreeSet<u16> {
    udp_flows(c.topology().client(), server, BURST)
        .unwrap_or_else(|e| c.fail(&e))
        .into_iter()
        .collect()
}

fn live_flow(c: &Cluster, server: SocketAddr) -> TrafficClient {
    udp_client(
        c.topology().client(),
        server,
        UdpClientOptions {
            interval: Duration::from_millis(200),
            bounds: Bounds::new(2_000, Duration::from_secs(240)),
            ..UdpClientOptions::default()
        },
    )
    .unwrap_or_else(|e| c.fail(&format!("UDP flow through fw1: {e}")))
}

#[test]
fn replicas_expire_with_their_owners_copy_through_partitions_that_heal() {
    let secs = TIMEOUT.as_secs();
    let c = Cluster::start(
        "exp-",
        2,
        ClusterOptions {
            keepalive_threshold_ms: Some(KEEPALIVE.as_millis() as u64),
            timeouts: [
                ("udp-new".to_owned(), secs),
                ("udp-replied".to_owned(), secs),
            ]
            .into(),
            ..ClusterOptions::default()
        },
    );
    c.wait_pair_active();
    let server: SocketAddr = (SERVER_V4, UDP_PORT).into();
    let bounds = Bounds::new(100_000, Duration::from_secs(240));
    let _echo = udp_echo_server(c.topology().server(), server, bounds).expect("UDP echo server");
    let flow = live_flow(&c, server);
    let mut w = Watch {
        c: &c,
        seen: BTreeMap::new(),
    };
    // The live flow is the one port on both members before any burst.
    w.until("the live flow on both members", BACK, |t| {
        t[0].len() == 1 && t[0] == t[1]
    });
    let live = *w.sample()[0]
        .first()
        .unwrap_or_else(|| c.fail("no live flow"));
    let steady_from = Instant::now();

    // 1. Links up: a burst replicates and expires on both; the live flow's replica stays.
    let b1 = short_flows(&c, server);
    w.until("the first burst on both members", BACK, |t| {
        b1.is_subset(&t[0]) && b1.is_subset(&t[1])
    });
    w.until("the first burst to expire on both", TIMEOUT * 4, |t| {
        t.iter().all(|t| t.is_disjoint(&b1))
    });
    let steady_gaps: Vec<Duration> = w.seen[&(2, live)]
        .gaps
        .iter()
        .filter(|&&g| g >= steady_from)
        .map(|g| g.duration_since(steady_from))
        .collect();
    assert!(
        steady_gaps.is_empty(),
        "the live flow's replica left fw2 while the links worked (at {steady_gaps:?} after \
         the steady phase began): refreshes did not keep it"
    );

    // 2. A cut shorter than the keepalive threshold: a burst made at its start expires on fw1
    //    during it, as does the live flow's replica on fw2.
    cut(&c, true);
    let cut1 = Instant::now();
    let b2 = short_flows(&c, server);
    w.run(SHORT_CUT);
    cut(&c, false);
    let heal1 = Instant::now();
    w.until(
        "the live flow's replica back on fw2 after the short cut",
        BACK,
        |t| t[1].contains(&live),
    );
    let back1 = heal1.elapsed();

    // 3. A cut past the keepalive threshold: each member declares the other down.
    cut(&c, true);
    let cut2 = Instant::now();
    let b3 = short_flows(&c, server);
    let down = |k: u8, of: u8| c.try_member(k, of).is_ok_and(|m| m.state == "down");
    w.until("each member to declare the other down", BACK, |_| {
        down(1, 2) && down(2, 1)
    });
    w.run(TIMEOUT);
    cut(&c, false);
    let heal2 = Instant::now();
    w.until(
        "the live flow's replica back on fw2 after the long cut",
        BACK,
        |t| t[1].contains(&live),
    );
    let back2 = heal2.elapsed();
    let every: BTreeSet<u16> = b1.iter().chain(&b2).chain(&b3).copied().collect();
    w.until("no short flow left on either member", TIMEOUT * 4, |t| {
        t.iter().all(|t| t.is_disjoint(&every))
    });
    w.run(TIMEOUT);
    let p = flow.stop();
    eprintln!(
        "short cut: {:.1} s, live replica back {:.1} s after the heal; long cut: back {:.1} s \
         after the heal; live flow {p:?}",
        heal1.duration_since(cut1).as_secs_f64(),
        back1.as_secs_f64(),
        back2.as_secs_f64(),
    );

    // No replica outlived its owner's copy by more than the slack. A removal made while the
    // link was dark (from a cut until the live flow's replica came back) is due from then.
    let dark = [(cut1, heal1 + back1), (cut2, heal2 + back2)];
    for &port in &every {
        let Some(on2) = w.last(2, port) else { continue };
        let on1 = w
            .last(1, port)
            .unwrap_or_else(|| c.fail(&format!("port {port} never on fw1")));
        let due = dark
            .iter()
            .find(|(from, to)| (*from..=*to).contains(&on1))
            .map_or(on1, |&(_, to)| to);
        let late = on2.saturating_duration_since(due);
        assert!(
            late <= SLACK,
            "the replica of port {port} stayed on fw2 {:.1} s after its removal was due; slack \
             {SLACK:?}",
            late.as_secs_f64()
        );
    }
    // Nothing that left came back: on fw1 (the owner) no short flow, on fw2 none of the burst
    // made while the links worked.
    let steady = b1.iter().map(|&p| (2, p));
    for (k, port) in every.iter().map(|&p| (1, p)).chain(steady) {
        let s = w
            .seen
            .get(&(k, port))
            .unwrap_or_else(|| c.fail(&format!("no sample listed port {port} on fw{k}")));
        assert!(
            !s.gaps.iter().any(|&g| Some(g) < s.last),
            "port {port} came back on fw{k} after it had gone"
        );
    }
    let final_tables = [c.table(1), c.table(2)].map(|t| udp_ports(&t));
    assert_eq!(
        final_tables,
        [BTreeSet::from([live]), BTreeSet::from([live])],
        "at the end each member holds the live flow only"
    );
}
