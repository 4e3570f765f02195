//! Expiry across a cluster, through partitions that heal. UDP sessions time out after a few
//! seconds; a long-lived UDP flow runs through fw1 the whole test and bursts of short flows
//! come and go. Both tables are sampled every 200 ms, and the test checks:
//! - a live flow's replica never lapses on fw2 (missing, or idle past the timeout) while the
//!   link works (refreshes reach it in time); it lapses during each cut, which is longer than
//!   the timeout, and is back, live, within a bound after each heal;
//! - a burst replicated before a cut expires on fw2 by fw2's own clock, as late as on its
//!   owner at most, without the owner's removal, and never comes back (neither the delayed
//!   removal nor the full sync brings it);
//! - a burst made during a cut leaves fw2 no later than a slack after records flow again (a
//!   record written before the heal may bring it back for the moment its removal follows);
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
/// `udp-new` and `udp-replied`: a refresh every second (the floor), well inside the timeout.
const TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE: Duration = Duration::from_secs(10);
/// Past the timeout, 3 s short of the keepalive threshold (checked: no member goes down).
const SHORT_CUT: Duration = Duration::from_secs(7);
/// How much later than its owner's copy (or than records flowing again) a replica may leave:
/// each member's sweep removes an expired session it has seen within a pass and a second.
const SLACK: Duration = Duration::from_millis(2_500);
/// After a heal: the stalled connection's retransmissions, or a new connection and a full
/// sync, bring the live flow's replica back.
const BACK: Duration = Duration::from_secs(20);
const SAMPLE: Duration = Duration::from_millis(200);
const BURST: usize = 8;

/// Member `k`'s UDP sessions to the echo port: source port and idle time.
fn udp_sessions(c: &Cluster, k: u8) -> BTreeMap<u16, Duration> {
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
        .map(|s| {
            let idle = s
                .idle_ms
                .unwrap_or_else(|| c.fail("a session without its idle time"));
            (s.sport, Duration::from_millis(idle))
        })
        .collect()
}

/// What the samples of one member's table showed of one UDP port.
#[derive(Default)]
struct Seen {
    /// Samples in which the port was missing after it had been listed.
    gaps: Vec<Instant>,
    /// The samples that listed it, with the idle time each showed.
    idle: Vec<(Instant, Duration)>,
}

impl Seen {
    /// The last sample that listed it.
    fn last(&self) -> Option<Instant> {
        self.idle.last().map(|&(at, _)| at)
    }
}

/// Each member's UDP sessions to the echo port in one sample: source port and idle time.
type Tables = [BTreeMap<u16, Duration>; 2];

/// Does `t` list every port of `ports`? None of them?
fn all_in(ports: &BTreeSet<u16>, t: &BTreeMap<u16, Duration>) -> bool {
    ports.iter().all(|p| t.contains_key(p))
}

fn none_in(ports: &BTreeSet<u16>, t: &BTreeMap<u16, Duration>) -> bool {
    !ports.iter().any(|p| t.contains_key(p))
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
    fn until(&mut self, what: &str, bound: Duration, done: impl Fn(&Tables) -> bool) {
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

    /// Each member's UDP sessions to the echo port, each stamped when its read returned.
    fn sample(&mut self) -> Tables {
        let tables = [1, 2].map(|k| (udp_sessions(self.c, k), Instant::now()));
        for (k, (listed, at)) in [(1u8, &tables[0]), (2, &tables[1])] {
            let at = *at;
            for (&p, &idle) in listed {
                let s = self.seen.entry((k, p)).or_default();
                s.idle.push((at, idle));
            }
            for ((_, p), s) in self.seen.range_mut((k, 0)..=(k, u16::MAX)) {
                if !listed.contains_key(p) {
                    s.gaps.push(at);
                }
            }
        }
        tables.map(|(t, _)| t)
    }

    fn last(&self, k: u8, port: u16) -> Option<Instant> {
        self.seen.get(&(k, port)).and_then(Seen::last)
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
            t[0].len() == 1 && t[0].keys().eq(t[1].keys())
        });
        let c = self.c;
        *self.sample()[0]
            .keys()
            .next()
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
    // A packet every 300 ms: a refresh is due half a second after the last one and goes with
    // the packet at 0.6 s (at 1.2 s with the old floor of a second).
    let flow = live_flow(&c, server(), Duration::from_millis(300));
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

/// A cut of both sync links: from when it began until records flowed again (the live flow's
/// replica back and live on fw2); the burst replicated just before it, and the one made at its
/// start.
struct Dark {
    from: Instant,
    until: Instant,
    before: BTreeSet<u16>,
    during: BTreeSet<u16>,
}

/// Links up: a burst replicates and expires on both members; the live flow's replica stays.
fn steady(w: &mut Watch, live: u16) -> BTreeSet<u16> {
    let from = Instant::now();
    let burst = replicated_burst(w);
    w.until("the first burst to expire on both", TIMEOUT * 4, |t| {
        t.iter().all(|t| none_in(&burst, t))
    });
    let lapses = w.replica_lapses(live, from, TIMEOUT);
    assert!(
        lapses.is_empty(),
        "the live flow's replica on fw2 lapsed while the links worked ({lapses:?}): \
         refreshes did not keep it"
    );
    burst
}

/// A burst through fw1, once fw2 holds it too.
fn replicated_burst(w: &mut Watch) -> BTreeSet<u16> {
    let burst = short_flows(w.c, server());
    w.until("a burst on both members", BACK, |t| {
        all_in(&burst, &t[0]) && all_in(&burst, &t[1])
    });
    burst
}

/// Makes a burst and waits for its replicas; cuts both sync links, makes another burst, holds
/// the cut until `hold` returns (sampling), heals it and waits until records flow again.
fn dark(w: &mut Watch, live: u16, what: &str, hold: impl FnOnce(&mut Watch)) -> Dark {
    let before = replicated_burst(w);
    w.c.cut_sync_links(2, true);
    let from = Instant::now();
    let during = short_flows(w.c, server());
    hold(w);
    let lapses = w.replica_lapses(live, from, TIMEOUT);
    assert!(
        !lapses.is_empty(),
        "the live flow's replica on fw2 did not lapse during the {what}: the cut did not hold"
    );
    w.c.cut_sync_links(2, false);
    let healed = Instant::now();
    w.until(
        &format!("the live flow's replica back and live on fw2 after the {what}"),
        BACK,
        |t| t[1].get(&live).is_some_and(|&idle| idle < TIMEOUT),
    );
    eprintln!(
        "{what}: {:.1} s, the live flow's replica back {:.1} s after the heal",
        healed.duration_since(from).as_secs_f64(),
        healed.elapsed().as_secs_f64()
    );
    Dark {
        from,
        until: Instant::now(),
        before,
        during,
    }
}

/// No replica of a port in `ports` outlived its owner's copy by more than the slack; a removal
/// made while the link was `dark` is due from the end of that. Replicas `fw2` must have held
/// (`required`) are checked to have been there.
fn no_late_replica(w: &Watch, ports: &BTreeSet<u16>, dark: &[&Dark], required: bool) {
    for &port in ports {
        let Some(on2) = w.last(2, port) else {
            assert!(!required, "fw2 never listed port {port}'s replica");
            continue;
        };
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
            !s.gaps.iter().any(|&g| Some(g) < s.last()),
            "port {port} came back on fw{k} after it had gone"
        );
    }
}

/// Holds a cut past the timeout and checks, at its end, that it stayed short of the keepalive
/// threshold.
fn short_hold(w: &mut Watch) {
    w.run(SHORT_CUT);
    for (k, of) in [(1, 2), (2, 1)] {
        let m = w.c.try_member(k, of).unwrap_or_else(|e| w.c.fail(&e));
        assert_ne!(
            m.state, "down",
            "fw{k} declared fw{of} down: the short cut became long"
        );
    }
}

/// Holds a cut until each member declared the other down, then the timeout.
fn long_hold(w: &mut Watch) {
    let c = w.c;
    let down = |k: u8, of: u8| c.try_member(k, of).is_ok_and(|m| m.state == "down");
    w.until("each member to declare the other down", BACK, |_| {
        down(1, 2) && down(2, 1)
    });
    w.run(TIMEOUT);
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
    let steady_burst = steady(&mut w, live);
    let short = dark(&mut w, live, "short cut", short_hold);
    let long = dark(&mut w, live, "long cut", long_hold);
    let before: BTreeSet<u16> = steady_burst
        .iter()
        .chain(&short.before)
        .chain(&long.before)
        .copied()
        .collect();
    let during: BTreeSet<u16> = short.during.union(&long.during).copied().collect();
    w.until("no short flow left on either member", TIMEOUT * 4, |t| {
        t.iter().all(|t| none_in(&before, t) && none_in(&during, t))
    });
    w.run(TIMEOUT);
    let lapses = w.replica_lapses(live, long.until, TIMEOUT);
    assert!(
        lapses.is_empty(),
        "the live flow's replica lapsed after the heals: {lapses:?}"
    );
    let p = flow.stop();
    assert!(p.fatal.is_none(), "the live flow: {p:?}");

    // Replicated before a cut: gone from fw2 by fw2's own clock, with its owner's copy.
    no_late_replica(&w, &before, &[], true);
    no_late_replica(&w, &during, &[&short, &long], false);
    // On fw1, the owner, no short flow came back; on fw2 none of those it held before a cut.
    let owned = before.iter().chain(&during).map(|&p| (1, p));
    nothing_came_back(&w, owned.chain(before.iter().map(|&p| (2, p))));
    let final_tables = [1, 2].map(|k| udp_sessions(&c, k).into_keys().collect::<BTreeSet<_>>());
    assert_eq!(
        final_tables,
        [BTreeSet::from([live]), BTreeSet::from([live])],
        "at the end each member holds the live flow only"
    );
}
