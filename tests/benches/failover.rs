//! `cargo xtask bench failover [--json] [--flows N] [--family ipv4|ipv6] [--rate MPPS]
//! [--series FILE]`: frames lost, and the time until the surviving member forwards at full
//! rate, when the member that carries the traffic dies.
//!
//! ```text
//!        ┌─ g1 ═══ in0 ── fw1 ── out0 ═══ r1 ─┐
//!   gen ─┤                ha4                 ├─ recv
//!        └─ g2 ═══ in0 ── fw2 ── out0 ═══ r2 ─┘
//! ```
//! Namespaces `hst-<pid>-bfo-{gen,fw1,fw2,recv}`, joined by veth pairs; fw1 and fw2 run the
//! release agent (`$HASYNC_BIN`, else `<target>/release/hasync`) as a two-member cluster with
//! session sync over `ha4`, `[local] forwarding = "xdp"`, the strict policy and the shortest
//! keepalive threshold (5 s). Both members have the same addresses and MAC addresses on their
//! own links (so do g1/g2 and r1/r2): a gateway whose addresses move with the traffic. The
//! generator and the receiver are those of `bench forward` (`hasync_tests::live`).
//!
//! 1. Every flow is established through fw1 (one pass each way); the bench waits until fw2
//!    holds all of them as replied sessions of fw1.
//! 2. fw1's XDP-forwarding capacity is measured as in `bench forward` (f). The generator then
//!    sends at half of it (or `--rate`), paced by the generator program itself (a frame when
//!    one is due by `bpf_ktime_get_ns`, the run's frame dropped otherwise; frames due more
//!    than 5 ms ago are not sent but counted), by redirect to g1, in one live-frames test run
//!    that a signal ends. gen's sent and recv's received counters are sampled every 2 ms.
//! 3. After 1.5 s, fw1's agent is killed (SIGKILL by PID; its pinned XDP programs stay), the
//!    generator is steered to g2 (one map update: the bench's reaction is not the cluster's
//!    to measure) and fw1's links are set down. fw2 passes fw1's sessions to its kernel
//!    (asymmetric) until it declares fw1 dead, then takes them over and forwards them in XDP.
//! 4. The generator stops 2 s after fw2's first XDP-forwarded frame (polled on its control
//!    socket; at most 20 s after the kill).
//!
//! Reported: frames sent, received, lost (sent, never received), not sent on schedule (the
//! generator shares its CPU with the whole path: a slower path holds it back, as a full queue
//! would drop frames of a real sender), and short of the rate before the kill between the kill
//! and full rate; the times from the kill to the steer, to fw2's first XDP-forwarded frame and
//! to full rate (recv's rate over 50 ms windows back at ≥ 95 % of the rate over the last second
//! before the kill, and holding for 1 s: on a busy host fw2's kernel path may do that before
//! the takeover); and every rate as a ratio of that rate through fw1 in the same run. `--series FILE` writes the samples as CSV. The
//! generator, both members and the receiver share this host's CPUs (2 on the CI machines),
//! with whatever else runs there.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use hasync_agent::{
    config::ForwardingName,
    control::{
        view::{CountersView, SessionsView},
        Request, SessionFilter,
    },
    lab::{cluster::LAB_SESSION_CAPACITY, ClusterOptions, Signal},
};
use hasync_tests::{
    interrupt::{catch_signals, check_stop},
    live::{
        agent::{agent_binary, bench_timeouts, Agents},
        member,
        series::{count_at, rate, Criteria, Recovery, Sample},
        station::{establish, End, LongRun, Station, Steering},
        stream::{size_label, stream, Direction, Family, Stream, FRAME_LEN},
    },
    netns::{veth, Lab, Netns},
};

/// The agents' lab directory: this prefix and the bench's pid.
const AGENT_DIR: &str = "hasync-bench-fo-";
/// fw2 declares fw1 dead this long after its last keepalive (the shortest allowed).
const KEEPALIVE_THRESHOLD_MS: u64 = 5_000;
const FLOWS: u32 = 1_000;
const MAX_FLOWS: u32 = 1 << 20;
/// Share of fw1's measured capacity the generator sends at, unless `--rate` says: what the
/// paced generator keeps up with on a busy 2-CPU host.
const LOAD: f64 = 0.5;
/// Capacity measurement: frames per test run, and sending time.
const CHUNK: u32 = 1 << 18;
const CAPACITY_TIME: Duration = Duration::from_millis(500);
/// Pacing: frames due longer ago than this are not sent.
const MAX_LAG: Duration = Duration::from_millis(5);
const SAMPLE_EVERY: Duration = Duration::from_millis(2);
/// Traffic through fw1 before the kill; after fw2's first XDP-forwarded frame; most time from
/// the kill to that frame.
const BEFORE: Duration = Duration::from_millis(1_500);
const AFTER: Duration = Duration::from_millis(2_000);
const TAKEOVER_LIMIT: Duration = Duration::from_secs(20);
/// Time for frames in flight to arrive.
const DRAIN: Duration = Duration::from_millis(50);
/// Waiting for fw2 to hold every flow.
const SYNC_LIMIT: Duration = Duration::from_secs(30);

/// How recv's rate is judged: the baseline over 1 s before the kill, 50 ms windows every 2 ms,
/// full rate at 95 % held for 1 s.
const CRITERIA: Criteria = Criteria {
    baseline: Duration::from_secs(1),
    window: Duration::from_millis(50),
    step: Duration::from_millis(2),
    hold: Duration::from_secs(1),
    threshold: 0.95,
};

// ---------------------------------------------------------------------------------------------
// The lab.

/// Interface indexes the bench sends out of.
struct Ports {
    g1: u32,
    g2: u32,
    r1: u32,
}

/// The MAC addresses of gen (g1 = g2), recv (r1 = r2), and the members' in0 and out0.
struct Macs {
    gen: [u8; 6],
    recv: [u8; 6],
    member_in: [u8; 6],
    member_out: [u8; 6],
}

struct Bench {
    // Stations first: their programs detach before the namespaces go.
    gen_st: Station,
    recv_st: Station,
    gen: Netns,
    fw1: Netns,
    fw2: Netns,
    recv: Netns,
    ports: Ports,
    macs: Macs,
    family: Family,
    flows: u32,
}

impl Bench {
    fn create(family: Family, flows: u32) -> Result<Bench> {
        let lab = Lab::new("bfo")?;
        let gen = lab.netns("gen")?;
        let fw1 = lab.netns("fw1")?;
        let fw2 = lab.netns("fw2")?;
        let recv = lab.netns("recv")?;
        let macs = cable([&gen, &fw1, &fw2, &recv])?;
        for (k, fw) in [(1, &fw1), (2, &fw2)] {
            member::configure(fw)?;
            fw.addr("ha4", &format!("198.18.100.{k}/24"))?;
            member::add_neighbours(fw, macs.gen, macs.recv, flows)?;
        }
        let ports = Ports {
            g1: gen.ifindex("g1")?,
            g2: gen.ifindex("g2")?,
            r1: recv.ifindex("r1")?,
        };
        Ok(Bench {
            gen_st: station(&gen, ["g1", "g2"])?,
            recv_st: station(&recv, ["r1", "r2"])?,
            gen,
            fw1,
            fw2,
            recv,
            ports,
            macs,
            family,
            flows,
        })
    }
}

/// The veth pairs; fw2's in0 and out0, g2 and r2 get the MAC addresses of fw1's in0 and out0,
/// g1 and r1.
fn cable([gen, fw1, fw2, recv]: [&Netns; 4]) -> Result<Macs> {
    veth(gen, "g1", fw1, "in0")?;
    veth(gen, "g2", fw2, "in0")?;
    veth(fw1, "out0", recv, "r1")?;
    veth(fw2, "out0", recv, "r2")?;
    veth(fw1, "ha4", fw2, "ha4")?;
    let macs = Macs {
        gen: gen.mac("g1")?,
        recv: recv.mac("r1")?,
        member_in: fw1.mac("in0")?,
        member_out: fw1.mac("out0")?,
    };
    set_mac(gen, "g2", macs.gen)?;
    set_mac(recv, "r2", macs.recv)?;
    set_mac(fw2, "in0", macs.member_in)?;
    set_mac(fw2, "out0", macs.member_out)?;
    Ok(macs)
}

/// The bench object for `ns`, counting on `interfaces`.
fn station(ns: &Netns, interfaces: [&str; 2]) -> Result<Station> {
    let mut st = Station::load()?;
    for ifname in interfaces {
        st.attach(ns, "count", ifname)?;
    }
    Ok(st)
}

/// Gives `ifname` in `ns` the MAC address `mac`.
fn set_mac(ns: &Netns, ifname: &str, mac: [u8; 6]) -> Result<()> {
    ns.ip(&["link", "set", ifname, "down"])?;
    ns.ip(&["link", "set", ifname, "address", &member::mac_text(mac)])?;
    ns.up(ifname)
}

/// fw1 and fw2: a cluster with session sync over ha4, forwarding in XDP, both active.
fn start_agents(b: &Bench) -> Result<Agents> {
    let binary = agent_binary().ok_or_else(|| {
        anyhow!("the failover bench needs the release agent: build it, or set HASYNC_BIN")
    })?;
    let capacity = (b.flows * 4).next_power_of_two().max(LAB_SESSION_CAPACITY);
    let options = ClusterOptions {
        forwarding: ForwardingName::Xdp,
        keepalive_threshold_ms: Some(KEEPALIVE_THRESHOLD_MS),
        session_capacity: capacity,
        // The most two members may have: a quarter of the table.
        embryonic_capacity: Some(capacity / 4),
        backup_link: false,
        timeouts: bench_timeouts(),
        ..ClusterOptions::default()
    };
    let mut agents = Agents::configure(AGENT_DIR, 2, &options, |_, text| text.to_owned())?;
    agents.start(1, &b.fw1, &binary)?;
    agents.start(2, &b.fw2, &binary)?;
    Ok(agents)
}

// ---------------------------------------------------------------------------------------------
// Before the run: flows through fw1, synced to fw2; fw1's capacity.

/// Establishes every flow through fw1 and waits until fw2 holds them all, replied, as fw1's.
fn establish_through_fw1(b: &mut Bench, agents: &Agents) -> Result<()> {
    let (family, flows) = (b.family, b.flows);
    let orig = original(b);
    let reply = stream(
        family,
        false,
        Direction::Reply,
        [b.macs.member_out, b.macs.recv],
        flows,
    );
    let gen = End {
        station: &mut b.gen_st,
        ns: &b.gen,
        ifindex: b.ports.g1,
    };
    let recv = End {
        station: &mut b.recv_st,
        ns: &b.recv,
        ifindex: b.ports.r1,
    };
    establish(gen, recv, (&orig, &reply), flows, family.label())?;
    let filter = SessionFilter {
        owner: Some(1),
        state: Some("udp-replied".into()),
        ..SessionFilter::default()
    };
    let started = Instant::now();
    let mut held = 0;
    while started.elapsed() < SYNC_LIMIT {
        check_stop()?;
        held = count(agents, 2, &filter)?;
        if held >= u64::from(flows) {
            eprintln!(
                "  fw2 holds all {flows} flows {:.1?} later",
                started.elapsed()
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "fw2 holds {held} of {flows} flows as fw1's replied sessions after {} s; fw1 holds {}",
        SYNC_LIMIT.as_secs(),
        count(agents, 1, &filter)?
    )
}

/// The stream gen sends: every flow to recv, through the members' in0.
fn original(b: &Bench) -> Stream {
    stream(
        b.family,
        false,
        Direction::Original,
        [b.macs.member_in, b.macs.gen],
        b.flows,
    )
}

/// Sessions matching `filter` on member `k`.
fn count(agents: &Agents, k: u8, filter: &SessionFilter) -> Result<u64> {
    let req = Request::ShowSessions {
        count_only: true,
        filter: filter.clone(),
        offset: 0,
        limit: None,
    };
    let view: SessionsView = serde_json::from_value(agents.request(k, &req)?)?;
    Ok(view.total)
}

/// Member `k`'s count of frames forwarded in XDP.
fn forwarded_xdp(agents: &Agents, k: u8) -> Result<u64> {
    let req = Request::ShowCounters {
        prefix: Some("forwarded-xdp".into()),
    };
    let view: CountersView = serde_json::from_value(agents.request(k, &req)?)?;
    Ok(view.counters.get("forwarded-xdp").copied().unwrap_or(0))
}

/// Frames per second through fw1 with the generator unpaced, as `bench forward` measures (f).
fn capacity(b: &Bench) -> Result<f64> {
    let before = b.recv_st.received()?;
    let (_, took) = b
        .gen_st
        .send(&b.gen, b.ports.g1, CHUNK, u64::MAX, CAPACITY_TIME)?;
    std::thread::sleep(DRAIN);
    let got = b.recv_st.received()? - before;
    ensure!(got > 0, "nothing arrived at recv through fw1");
    Ok(got as f64 / took.as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// The run.

/// When things happened, since the run's start.
struct Events {
    kill: Duration,
    steer: Duration,
    /// fw2's first frame forwarded in XDP, as seen by polling its counters.
    takeover: Option<Duration>,
    /// The generator was told to stop.
    end: Duration,
}

/// Everything a run recorded.
struct Run {
    /// gen's frames sent and recv's frames received, and the frames gen did not send because
    /// they were due more than [`MAX_LAG`] ago, sampled every [`SAMPLE_EVERY`].
    series: Series,
    events: Events,
}

/// What the threads of a run share.
struct Control {
    start: Instant,
    generator: LongRun,
    stop_sampling: AtomicBool,
}

impl Control {
    /// Stops the generator and the sampler.
    fn stop(&self) {
        self.generator.stop();
        self.stop_sampling.store(true, Ordering::SeqCst);
    }
}

/// Stops a run's threads when dropped: also when the run fails or panics half-way, so the
/// scope that joins them ends.
struct StopOnDrop<'a>(&'a Control);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// What the sampler records.
#[derive(Default)]
struct Series {
    sent: Vec<Sample>,
    received: Vec<Sample>,
    lagged: Vec<Sample>,
}

/// gen's sent and lagged counts and recv's received count (from `base`), every
/// [`SAMPLE_EVERY`] until told to stop.
fn sample(b: &Bench, base: u64, control: &Control) -> Result<Series> {
    let longest = BEFORE + TAKEOVER_LIMIT + AFTER + DRAIN;
    let most = 2 * longest.as_millis() / SAMPLE_EVERY.as_millis().max(1);
    let mut out = Series::default();
    for i in 0..most {
        if control.stop_sampling.load(Ordering::SeqCst) {
            break;
        }
        let due = control.start + SAMPLE_EVERY * u32::try_from(i).unwrap_or(u32::MAX);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let at = control.start.elapsed();
        let count = b.recv_st.received()?.saturating_sub(base);
        out.received.push(Sample { at, count });
        let count = b.gen_st.sent()?;
        out.sent.push(Sample { at, count });
        let count = b.gen_st.lagged()?;
        out.lagged.push(Sample { at, count });
    }
    Ok(out)
}

/// Sleeps until `at` after the run's start, checking for interruption.
fn sleep_until(control: &Control, at: Duration) -> Result<()> {
    while control.start.elapsed() < at {
        check_stop()?;
        let left = at.saturating_sub(control.start.elapsed());
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
    Ok(())
}

/// The failover, while the generator and the sampler run: fw1 killed and its links down,
/// the generator steered to g2, until fw2 forwards in XDP and [`AFTER`] more.
fn fail_over(
    b: &Bench,
    agents: &Agents,
    steering: &mut Steering,
    control: &Control,
) -> Result<Events> {
    sleep_until(control, BEFORE)?;
    let fw2_before = forwarded_xdp(agents, 2)?;
    let kill = control.start.elapsed();
    agents.signal(1, Signal::Kill)?;
    // The steer is the bench's own reaction time, not the cluster's: as close to the kill as
    // it gets, before fw1's links go down (frames still sent to fw1 cross its orphaned XDP
    // program meanwhile).
    steering.select(1)?;
    let steer = control.start.elapsed();
    hasync_agent::lab::netns::ip_batch(
        b.fw1.name(),
        &["in0", "out0", "ha4"].map(|i| format!("link set {i} down")),
    )?;
    agents.wait_exit(1)?;
    let mut takeover = None;
    while control.start.elapsed() < kill + TAKEOVER_LIMIT {
        check_stop()?;
        if forwarded_xdp(agents, 2)? > fw2_before {
            takeover = Some(control.start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    sleep_until(control, control.start.elapsed() + AFTER)?;
    Ok(Events {
        kill,
        steer,
        takeover,
        end: control.start.elapsed(),
    })
}

/// Runs the generator at `pps` through fw1, fails over to fw2, and records it all.
fn run(b: &mut Bench, agents: &Agents, pps: f64) -> Result<Run> {
    let mut steering = b.gen_st.take_steering()?;
    steering.connect(&b.gen, 0, b.ports.g1)?;
    steering.connect(&b.gen, 1, b.ports.g2)?;
    steering.select(0)?;
    b.gen_st.set_stream(&original(b))?;
    b.gen_st.pace(pps, MAX_LAG)?;
    let b = &*b;
    let base = b.recv_st.received()?;
    let prog = b.gen_st.generator()?;
    let control = Control {
        start: Instant::now(),
        generator: LongRun::new()?,
        stop_sampling: AtomicBool::new(false),
    };
    let (events, sending, sampled) = std::thread::scope(|s| {
        let _stop = StopOnDrop(&control);
        let sender = s.spawn(|| {
            let out = b.gen.run(|| control.generator.run(prog, b.ports.g1));
            control.stop();
            out
        });
        let sampler = s.spawn(|| {
            let out = sample(b, base, &control);
            control.stop();
            out
        });
        let events = fail_over(b, agents, &mut steering, &control);
        control.generator.stop();
        let sending = sender.join();
        std::thread::sleep(DRAIN);
        control.stop();
        (events, sending, sampler.join())
    });
    sending
        .map_err(|_| anyhow!("the generator thread panicked"))?
        .context("the generator")??;
    Ok(Run {
        series: sampled.map_err(|_| anyhow!("the sampler thread panicked"))??,
        events: events?,
    })
}

// ---------------------------------------------------------------------------------------------
// Figures and output.

/// A run's figures: counts, times since the kill, rates in frames per second.
struct Figures {
    family: Family,
    flows: u32,
    capacity_pps: f64,
    offered_pps: f64,
    sent: u64,
    received: u64,
    /// Frames the generator did not send on schedule, before the kill and in all.
    lagged: (u64, u64),
    steer: Duration,
    takeover: Option<Duration>,
    recovery: Recovery,
    /// recv's rate between the steer and fw2's first XDP-forwarded frame (fw2 passing fw1's
    /// sessions to its kernel), and from then on (fw2 forwarding them in XDP).
    interim_pps: Option<f64>,
    after_pps: Option<f64>,
    /// Sessions fw2 owns after the run.
    taken_over: u64,
}

impl Figures {
    fn new(b: &Bench, run: &Run, (capacity_pps, offered_pps): (f64, f64)) -> Self {
        let Events {
            kill,
            steer,
            takeover,
            end,
        } = run.events;
        let Series {
            sent,
            received,
            lagged,
        } = &run.series;
        let last = |s: &[Sample]| s.last().map_or(0, |s| s.count);
        let interim_pps = takeover
            .filter(|t| *t > steer)
            .map(|t| rate(received, steer, t));
        let after_pps = takeover
            .filter(|t| *t < end)
            .map(|t| rate(received, t, end));
        Figures {
            family: b.family,
            flows: b.flows,
            capacity_pps,
            offered_pps,
            sent: last(sent),
            received: last(received),
            lagged: (count_at(lagged, kill), last(lagged)),
            steer: steer - kill,
            takeover: takeover.map(|t| t - kill),
            recovery: CRITERIA.judge(received, kill, end),
            interim_pps,
            after_pps,
            taken_over: 0,
        }
    }

    fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }

    /// `rate` as a share of the rate before the kill.
    fn of_before(&self, rate: f64) -> f64 {
        rate / self.recovery.baseline_pps
    }
}

fn mpps(pps: f64) -> String {
    format!("{:.3}", pps / 1e6)
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("–".into(), |d| format!("{:.0}", d.as_secs_f64() * 1e3))
}

fn print_table(f: &Figures) {
    let r = &f.recovery;
    println!(
        "failover: {} {} flows, {FRAME_LEN}-byte live frames paced at {} Mpps ({:.2} of {} \
         Mpps, fw1's XDP-forwarding capacity in this run); keepalive threshold \
         {KEEPALIVE_THRESHOLD_MS} ms. The generator, both members and the receiver share this \
         host's {} CPUs.",
        f.family.label(),
        size_label(f.flows),
        mpps(f.offered_pps),
        f.offered_pps / f.capacity_pps,
        mpps(f.capacity_pps),
        aya::util::nr_cpus().unwrap_or(0)
    );
    println!("| figure | value |\n|---|---|");
    println!("| frames sent | {} |", f.sent);
    println!("| frames received | {} |", f.received);
    println!(
        "| frames lost (sent, never received) | {} ({:.2} % of sent) |",
        f.lost(),
        100.0 * f.lost() as f64 / f.sent.max(1) as f64
    );
    println!(
        "| frames short of the rate before, from the kill to full rate | {} |",
        r.short
    );
    println!(
        "| frames the generator could not send on schedule (before the kill) | {} ({}) |",
        f.lagged.1, f.lagged.0
    );
    println!("| kill → steer to fw2 (ms) | {} |", ms(Some(f.steer)));
    println!(
        "| kill → fw2's first frame forwarded in XDP (ms) | {} |",
        ms(f.takeover)
    );
    println!(
        "| kill → fw2 at ≥ {:.0} % of the rate before (ms) | {} |",
        CRITERIA.threshold * 100.0,
        ms(r.recovered)
    );
    println!(
        "| rate before the kill, through fw1 (Mpps; of offered) | {} ({:.2}) |",
        mpps(r.baseline_pps),
        r.baseline_pps / f.offered_pps
    );
    for (what, pps) in [
        ("via fw2 before its takeover, kernel path", f.interim_pps),
        ("via fw2 after its takeover, XDP", f.after_pps),
        ("via fw2 from full rate on", r.recovered_pps),
    ] {
        if let Some(p) = pps {
            println!(
                "| rate {what} (Mpps; of before) | {} ({:.2}) |",
                mpps(p),
                f.of_before(p)
            );
        }
    }
    println!(
        "| sessions fw2 owns afterwards (of {}) | {} |",
        f.flows, f.taken_over
    );
}

/// The time series as CSV: ms since the run's start, frames sent, received, not sent on
/// schedule; then the events.
fn write_series(path: &std::path::Path, run: &Run) -> Result<()> {
    use std::fmt::Write as _;
    let Series {
        sent,
        received,
        lagged,
    } = &run.series;
    let mut text = String::from("ms,sent,received,not_sent\n");
    for ((s, r), l) in sent.iter().zip(received).zip(lagged) {
        let ms = s.at.as_secs_f64() * 1e3;
        writeln!(text, "{ms:.3},{},{},{}", s.count, r.count, l.count)?;
    }
    let e = &run.events;
    for (name, at) in [
        ("kill", Some(e.kill)),
        ("steer", Some(e.steer)),
        ("fw2_first_xdp_forward", e.takeover),
        ("end", Some(e.end)),
    ] {
        if let Some(at) = at {
            writeln!(text, "# {name} {:.3}", at.as_secs_f64() * 1e3)?;
        }
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn print_json(f: &Figures) {
    let r = &f.recovery;
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    let out = serde_json::json!({
        "bench": "failover",
        "note": "the generator, both members and the receiver share this host's CPUs",
        "cpus": aya::util::nr_cpus().ok(),
        "family": f.family.label().to_lowercase(),
        "flows": f.flows,
        "frame_bytes": FRAME_LEN,
        "keepalive_threshold_ms": KEEPALIVE_THRESHOLD_MS,
        "full_rate_threshold": CRITERIA.threshold,
        "capacity_mpps": f.capacity_pps / 1e6,
        "offered_mpps": f.offered_pps / 1e6,
        "frames": {
            "sent": f.sent,
            "received": f.received,
            "lost": f.lost(),
            "short_of_rate_before": r.short,
            "not_sent_on_schedule": f.lagged.1,
            "not_sent_on_schedule_before_kill": f.lagged.0,
        },
        "ms_after_kill": {
            "steer": secs(Some(f.steer)),
            "fw2_first_xdp_forward": secs(f.takeover),
            "full_rate": secs(r.recovered),
        },
        "mpps": {
            "before_fw1": r.baseline_pps / 1e6,
            "fw2_before_takeover": f.interim_pps.map(|p| p / 1e6),
            "fw2_after_takeover": f.after_pps.map(|p| p / 1e6),
            "fw2_from_full_rate": r.recovered_pps.map(|p| p / 1e6),
        },
        "ratios": {
            "before_vs_offered": r.baseline_pps / f.offered_pps,
            "fw2_before_takeover_vs_before": f.interim_pps.map(|p| f.of_before(p)),
            "fw2_after_takeover_vs_before": f.after_pps.map(|p| f.of_before(p)),
            "fw2_from_full_rate_vs_before": r.recovered_pps.map(|p| f.of_before(p)),
        },
        "sessions_owned_by_fw2": f.taken_over,
    });
    println!("{out}");
}

// ---------------------------------------------------------------------------------------------
// Arguments and main.

struct Args {
    json: bool,
    flows: u32,
    family: Family,
    /// Frames per second, else [`LOAD`] of the measured capacity.
    rate: Option<f64>,
    /// Where to write the time series as CSV.
    series: Option<std::path::PathBuf>,
}

/// The value after `flag`, if the flag is given.
fn value<'a>(args: &'a [String], flag: &str) -> Result<Option<&'a str>> {
    match args.iter().position(|a| a == flag) {
        None => Ok(None),
        Some(i) => args
            .get(i + 1)
            .map(|v| Some(v.as_str()))
            .ok_or_else(|| anyhow!("{flag}: no value given")),
    }
}

fn parse_args() -> Result<Args> {
    let args: Vec<String> = std::env::args().collect();
    let flows = match value(&args, "--flows")? {
        None => FLOWS,
        Some(v) => v
            .parse()
            .ok()
            .filter(|n| (1..=MAX_FLOWS).contains(n))
            .ok_or_else(|| anyhow!("--flows: `{v}` is not a number in 1–{MAX_FLOWS}"))?,
    };
    let family = match value(&args, "--family")? {
        None | Some("ipv4") => Family::V4,
        Some("ipv6") => Family::V6,
        Some(v) => bail!("--family: `{v}` is neither ipv4 nor ipv6"),
    };
    let rate = match value(&args, "--rate")? {
        None => None,
        Some(v) => Some(
            v.parse::<f64>()
                .ok()
                .filter(|r| (0.001..=100.0).contains(r))
                .ok_or_else(|| anyhow!("--rate: `{v}` is not a rate in 0.001–100 Mpps"))?
                * 1e6,
        ),
    };
    Ok(Args {
        series: value(&args, "--series")?.map(Into::into),
        json: args.iter().any(|a| a == "--json"),
        flows,
        family,
        rate,
    })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    catch_signals()?;
    let started = Instant::now();
    let mut bench = Bench::create(args.family, args.flows)?;
    let agents = start_agents(&bench)?;
    eprintln!("failover: fw1 and fw2 active in {:.1?}", started.elapsed());
    establish_through_fw1(&mut bench, &agents)?;
    let capacity_pps = capacity(&bench)?;
    let offered_pps = args.rate.unwrap_or(capacity_pps * LOAD);
    eprintln!(
        "  fw1 forwards {} Mpps unpaced; sending {} Mpps",
        mpps(capacity_pps),
        mpps(offered_pps)
    );
    let run = run(&mut bench, &agents, offered_pps).context("the failover run")?;
    let mut figures = Figures::new(&bench, &run, (capacity_pps, offered_pps));
    figures.taken_over = count(
        &agents,
        2,
        &SessionFilter {
            owner: Some(2),
            ..SessionFilter::default()
        },
    )?;
    let counters: CountersView =
        serde_json::from_value(agents.request(2, &Request::ShowCounters { prefix: None })?)?;
    let moved: Vec<String> = counters
        .counters
        .iter()
        .filter(|(_, v)| **v != 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    eprintln!("  fw2's counters: {}", moved.join(", "));
    if let Some(path) = &args.series {
        write_series(path, &run)?;
    }
    eprintln!("failover bench took {:.0?}", started.elapsed());
    if args.json {
        print_json(&figures);
    } else {
        print_table(&figures);
    }
    Ok(())
}
