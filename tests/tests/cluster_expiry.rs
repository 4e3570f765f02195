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

use hasync_agent::control::SessionFilter;
use hasync_agent::lab::{
    topology::SERVER_V4,
    traffic::{udp_client, udp_echo_server, Bounds, EchoServer, TrafficClient, UdpClientOptions},
    ClusterOptions,
};
use hasync_tests::cluster::{udp_flows, Cluster};

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

/// Member `k`'s UDP sessions to the echo port: source port and idle time.
fn udp_idle(c: &Cluster, k: u8) -> BTreeMap<u16, Duration> {
    let filter = SessionFilter {
        proto: Some("udp".into()),
        port: Some(UDP_PORT),
        ..SessionFilter::default()
    };
    let v = c.try_sessions(k, filter).unwrap_or_else(|e| c.fail(&e));
    v.sessions
        .iter()
        .flatten()
        .filter(|s| s.dport == UDP_PORT)
        .map(|s| (s.sport, Duration::from_millis(s.idle_ms)))
        .collect()
}

/// What the samples of one member's table showed of one UDP port.
#[derive(Default)]
struct Seen {
    /// The last sample that listed it.
    last: Option<Instant>,
    /// Samples in which the port was missing after it had been listed.
    gaps: Vec<Instant>,
    /// The idle time each sample listed.
    idle: Vec<(Instant, Duration)>,
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

    /// Each member's UDP sessions to the echo port: source port and idle time.
    fn sample(&mut self) -> [BTreeSet<u16>; 2] {
        let tables = [1, 2].map(|k| udp_idle(self.c, k));
        let at = Instant::now();
        for (k, listed) in [(1u8, &tables[0]), (2, &tables[1])] {
            for (&p, &idle) in listed {
                let s = self.seen.entry((k, p)).or_default();
                s.last = Some(at);
                s.idle.push((at, idle));
            }
            for ((_, p), s) in self.seen.range_mut((k, 0)..=(k, u16::MAX)) {
                if !listed.contains_key(p) {
                    s.gaps.push(at);
                }
            }
        }
        tables.map(|t| t.into_keys().collect())
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

fn live_flow(c: &Cluster, server: SocketAddr, interval: Duration) -> TrafficClient {
    udp_client(
        c.topology().client(),
        server,
        UdpClientOptions {
            interval,
            bounds: Bounds::new(3_000, Duration::from_secs(240)),
            ..UdpClientOptions::default()
        },
    )
    .unwrap_or_else(|e| c.fail(&format!("UDP flow through fw1: {e}")))
}

/// Two members whose UDP sessions time out after `timeout_s`, with a UDP echo server.
fn lab(tag: &str, timeout_s: u64) -> (Cluster, EchoServer) {
    let c = Cluster::start(
        tag,
        2,
        ClusterOptions {
            keepalive_threshold_ms: Some(KEEPALIVE.as_millis() as u64),
            timeouts: [
                ("udp-new".to_owned(), timeout_s),
                ("udp-replied".to_owned(), timeout_s),
            ]
            .into(),
            ..ClusterOptions::default()
        },
    );
    c.wait_pair_active();
    let bounds = Bounds::new(100_000, Duration::from_secs(240));
    let echo = udp_echo_server(c.topology().server(), server(), bounds)
        .unwrap_or_else(|e| c.fail(&format!("UDP echo server: {e}")));
    (c, echo)
}

fn server() -> SocketAddr {
    (SERVER_V4, UDP_PORT).into()
}

impl Watch<'_> {
    /// Waits for the live flow, the one UDP session on both members before any burst; its port.
    fn live(&mut self) -> u16 {
        self.until("the live flow on both members", BACK, |t| {
            t[0].len() == 1 && t[0] == t[1]
        });
        let c = self.c;
        *self.sample()[0]
            .first()
            .unwrap_or_else(|| c.fail("no live flow"))
    }

    /// When, counted from `from`, samples missed `port` on member `k` after it had been listed.
    fn gaps_since(&self, k: u8, port: u16, from: Instant) -> Vec<Duration> {
        let gaps = self.seen.get(&(k, port)).map(|s| s.gaps.as_slice());
        gaps.unwrap_or_default()
            .iter()
            .filter(|&&g| g >= from)
            .map(|g| g.duration_since(from))
            .collect()
    }

    /// The samples since `from` that listed `port` on member `k` idle longer than `timeout`,
    /// counted from `from`, with that idle time: the datapath took it for absent then.
    fn expired_since(&self, k: u8, port: u16, from: Instant, timeout: Duration) -> Vec<String> {
        let idle = self.seen.get(&(k, port)).map(|s| s.idle.as_slice());
        idle.unwrap_or_default()
            .iter()
            .filter(|&&(at, idle)| at >= from && idle > timeout)
            .map(|(at, idle)| format!("at {:?}: idle {idle:?}", at.duration_since(from)))
            .collect()
    }

    /// What a live flow's replica on fw2 should never show while the links work: a gap, or an
    /// idle time past the timeout (the datapath takes such a session for absent).
    fn replica_lapses(&self, port: u16, from: Instant, timeout: Duration) -> Vec<String> {
        let gaps = self.gaps_since(2, port, from);
        let gaps = gaps.iter().map(|g| format!("at {g:?}: missing"));
        gaps.chain(self.expired_since(2, port, from, timeout))
            .collect()
    }
}

/// A timeout as short as the refresh interval's floor (a second): a live flow's replica must
/// still not expire between two refreshes.
#[test]
fn a_live_flows_replica_outlasts_a_one_second_timeout() {
    let (c, _echo) = lab("exp1-", 1);
    // A packet every 400 ms: a refresh a second after the last one comes up to 0.4 s late.
    let flow = live_flow(&c, server(), Duration::from_millis(400));
    let mut w = Watch {
        c: &c,
        seen: BTreeMap::new(),
    };
    let live = w.live();
    let from = Instant::now();
    w.run(Duration::from_secs(8));
    let p = flow.stop();
    assert!(p.fatal.is_none() && p.timeouts == 0, "the live flow: {p:?}");
    assert!(
        w.expired_since(1, live, from, Duration::from_secs(1))
            .is_empty(),
        "the live flow went idle on fw1 itself"
    );
    let lapses = w.replica_lapses(live, from, Duration::from_secs(1));
    assert!(
        lapses.is_empty(),
        "the live flow's replica on fw2 lapsed while its owner kept it ({lapses:?}): \
         refreshes came too late for a one-second timeout"
    );
}

/// A cut of both sync links: from when it began until the link carried records again (the
/// live flow's replica back on fw2), and the burst made at its start.
struct Dark {
    from: Instant,
    until: Instant,
    burst: BTreeSet<u16>,
}

/// Links up: a burst replicates and expires on both members; the live flow's replica stays.
fn steady(w: &mut Watch, live: u16) -> BTreeSet<u16> {
    let from = Instant::now();
    let burst = short_flows(w.c, server());
    w.until("the first burst on both members", BACK, |t| {
        burst.is_subset(&t[0]) && burst.is_subset(&t[1])
    });
    w.until("the first burst to expire on both", TIMEOUT * 4, |t| {
        t.iter().all(|t| t.is_disjoint(&burst))
    });
    let lapses = w.replica_lapses(live, from, TIMEOUT);
    assert!(
        lapses.is_empty(),
        "the live flow's replica on fw2 lapsed while the links worked ({lapses:?}): \
         refreshes did not keep it"
    );
    burst
}

/// Cuts both sync links, makes a burst, holds the cut until `hold` says so (sampling), heals
/// it and waits for the live flow's replica on fw2.
fn dark(w: &mut Watch, live: u16, what: &str, hold: impl FnOnce(&mut Watch)) -> Dark {
    w.c.cut_sync_links(2, true);
    let from = Instant::now();
    let burst = short_flows(w.c, server());
    hold(w);
    w.c.cut_sync_links(2, false);
    let healed = Instant::now();
    w.until(
        &format!("the live flow's replica back on fw2 after the {what}"),
        BACK,
        |t| t[1].contains(&live),
    );
    eprintln!(
        "{what}: {:.1} s, the live flow's replica back {:.1} s after the heal",
        healed.duration_since(from).as_secs_f64(),
        healed.elapsed().as_secs_f64()
    );
    Dark {
        from,
        until: Instant::now(),
        burst,
    }
}

/// No replica of a port in `ports` outlived its owner's copy by more than the slack; a removal
/// made while the link was dark is due from the end of that.
fn no_late_replica(w: &Watch, ports: &BTreeSet<u16>, dark: &[Dark]) {
    for &port in ports {
        let Some(on2) = w.last(2, port) else { continue };
        let on1 = w
            .last(1, port)
            .unwrap_or_else(|| w.c.fail(&format!("port {port} never on fw1")));
        let due = dark
            .iter()
            .find(|d| (d.from..=d.until).contains(&on1))
            .map_or(on1, |d| d.until);
        let late = on2.saturating_duration_since(due);
        assert!(
            late <= SLACK,
            "the replica of port {port} stayed on fw2 {:.1} s after its removal was due; slack \
             {SLACK:?}",
            late.as_secs_f64()
        );
    }
}

/// Nothing in `seen` (member, port) came back to a member's table after it had left it.
fn nothing_came_back(w: &Watch, seen: impl IntoIterator<Item = (u8, u16)>) {
    for (k, port) in seen {
        let s = w
            .seen
            .get(&(k, port))
            .unwrap_or_else(|| w.c.fail(&format!("no sample listed port {port} on fw{k}")));
        assert!(
            !s.gaps.iter().any(|&g| Some(g) < s.last),
            "port {port} came back on fw{k} after it had gone"
        );
    }
}

#[test]
fn replicas_expire_with_their_owners_copy_through_partitions_that_heal() {
    let (c, _echo) = lab("exp-", TIMEOUT.as_secs());
    let flow = live_flow(&c, server(), Duration::from_millis(200));
    let mut w = Watch {
        c: &c,
        seen: BTreeMap::new(),
    };
    let live = w.live();
    let b1 = steady(&mut w, live);
    // Shorter than the keepalive threshold: the burst expires on fw1 during it, as does the
    // live flow's replica on fw2.
    let short = dark(&mut w, live, "short cut", |w| w.run(SHORT_CUT));
    // Past the keepalive threshold: each member declares the other down; a full sync follows.
    let long = dark(&mut w, live, "long cut", |w| {
        let c = w.c;
        let down = |k: u8, of: u8| c.try_member(k, of).is_ok_and(|m| m.state == "down");
        w.until("each member to declare the other down", BACK, |_| {
            down(1, 2) && down(2, 1)
        });
        w.run(TIMEOUT);
    });
    let every: BTreeSet<u16> = [&b1, &short.burst, &long.burst]
        .into_iter()
        .flatten()
        .copied()
        .collect();
    w.until("no short flow left on either member", TIMEOUT * 4, |t| {
        t.iter().all(|t| t.is_disjoint(&every))
    });
    w.run(TIMEOUT);
    let p = flow.stop();
    assert!(p.fatal.is_none(), "the live flow: {p:?}");

    no_late_replica(&w, &every, &[short, long]);
    // On fw1, the owner, no short flow came back; on fw2 none of the burst made while the
    // links worked (a record delayed by a cut may bring one back until its removal follows).
    nothing_came_back(
        &w,
        every
            .iter()
            .map(|&p| (1, p))
            .chain(b1.iter().map(|&p| (2, p))),
    );
    let final_tables = [1, 2].map(|k| udp_idle(&c, k).into_keys().collect::<BTreeSet<_>>());
    assert_eq!(
        final_tables,
        [BTreeSet::from([live]), BTreeSet::from([live])],
        "at the end each member holds the live flow only"
    );
}
