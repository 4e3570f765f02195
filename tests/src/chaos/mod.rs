//! Fault-injection runs (`cargo xtask chaos`, and a short profile in `cargo xtask test`): a
//! netns cluster with real TCP and UDP flows through several members ([`lanes`]), a fault
//! schedule built from a seed ([`schedule`]), and invariants checked the whole time
//! ([`invariants`]); attackers on the sync network live in [`hostile`], results in [`report`].
//!
//! Bounds the run holds the cluster to (stated in the report):
//! - convergence: after each fault heals, every replica equals its owner's table within
//!   [`Profile::convergence_bound`] (30 s);
//! - TCP: no lane's connection breaks, and none goes longer than [`Profile::stall_bound`]
//!   (10 s) without an echo, wherever it is steered;
//! - resources: agent RSS under [`Profile::rss_bound_kib`], open descriptors under
//!   [`Profile::fd_bound`], threads under [`Profile::thread_bound`];
//! - full syncs: see [`invariants::full_sync_bound`]; no panic, no agent exit it did not cause.

pub mod faults;
pub mod hostile;
pub mod invariants;
pub mod lanes;
pub mod report;
pub mod schedule;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use hasync_agent::{
    config::ForwardingName,
    lab::{cluster::AgentState, ClusterOptions},
    lock::lock,
};

use crate::cluster::Cluster;
use hostile::Intruder;
use lanes::Lanes;
use report::{Applied, Report};
use schedule::{FloodSizes, Step};

/// What a run does and the bounds it holds the cluster to.
#[derive(Clone, Debug)]
pub struct Profile {
    /// Namespace prefix tag (short, unique per caller).
    pub tag: String,
    pub members: u8,
    pub lanes: u8,
    pub seed: u64,
    /// Rounds of the schedule (every fault kind once per round).
    pub rounds: usize,
    /// No new step starts after this long.
    pub duration: Duration,
    /// Short UDP flows per lane during each fault.
    pub burst: usize,
    pub floods: FloodSizes,
    pub max_flooded: u32,
    pub keepalive: Duration,
    pub convergence_bound: Duration,
    pub stall_bound: Duration,
    pub rss_bound_kib: u64,
    pub fd_bound: u64,
    pub thread_bound: u64,
    /// The members' `[local] forwarding`.
    pub forwarding: ForwardingName,
    /// `udp-new` and `udp-replied`: an hour (nothing expires during a run) unless a run asks
    /// for expiry under the faults; then [`invariants::overdue`] is checked too.
    pub udp_timeout: Duration,
}

/// The UDP timeout of a run that checks no expiry: sessions outlive it, so tables move only
/// with the faults.
pub const NO_EXPIRY: Duration = Duration::from_secs(3600);

/// How long past the UDP timeout a session may stay in a table: the sweep's bound (see
/// `IncrementalSweep` in the agent) for one written after its pass went by, already idle (a
/// full sync's or a late record's copy), is a pass plus the shortest timeout, which is
/// `icmp-echo`'s 6 s in these runs; a pass over a run's table takes well under a second.
pub const EXPIRY_SLACK: Duration = Duration::from_secs(8);

/// How long a checkpoint waits for a member that holds expired sessions to sweep them: one
/// just back from SIGSTOP or a restart starts its first pass within a second.
const EXPIRY_WAIT: Duration = Duration::from_secs(2);

impl Profile {
    /// The profile `cargo xtask test` runs: 3 members, every fault kind once, a few minutes.
    pub fn short() -> Profile {
        Profile {
            tag: "chs-".into(),
            members: 3,
            lanes: 3,
            seed: 1,
            rounds: 1,
            duration: Duration::from_secs(600),
            burst: 4,
            floods: FloodSizes {
                connections: 600,
                sessions: 1_500,
            },
            max_flooded: 1_500,
            keepalive: Duration::from_secs(5),
            convergence_bound: Duration::from_secs(30),
            stall_bound: Duration::from_secs(10),
            rss_bound_kib: 256 * 1024,
            fd_bound: 0,
            thread_bound: 0,
            forwarding: ForwardingName::Kernel,
            // Bursts time out a few faults after they were made: expiry runs under the faults.
            udp_timeout: Duration::from_secs(20),
        }
        .with_resource_bounds()
    }

    /// `cargo xtask chaos`: rounds until `duration` is spent.
    pub fn long(members: u8, duration: Duration, seed: u64) -> Profile {
        Profile {
            tag: "chl-".into(),
            members,
            lanes: members.min(lanes::MAX_LANES),
            seed,
            rounds: 1_000,
            duration,
            burst: 5,
            floods: FloodSizes {
                connections: 2_000,
                sessions: 10_000,
            },
            max_flooded: 30_000,
            udp_timeout: NO_EXPIRY,
            ..Profile::short()
        }
        .with_resource_bounds()
    }

    /// Descriptors an agent may hold: its files and sockets, per peer two links, each
    /// dialled and accepted, with a connection being replaced, and room for a bounded number
    /// of handshakes in progress. The connection floods are larger than this. Threads: its
    /// two workers and its own threads (event reader, sweep, walks), and per peer a stale
    /// replicas' walk and its removal at most (a hostile peer starts full syncs by the
    /// hundred), with room for the blocking pool's idle threads.
    fn with_resource_bounds(mut self) -> Profile {
        self.fd_bound = 256 + 8 * u64::from(self.members);
        self.thread_bound = 32 + 4 * u64::from(self.members);
        self
    }

    fn options(&self) -> ClusterOptions {
        let ms = u64::try_from(self.keepalive.as_millis()).unwrap_or(u64::MAX);
        let udp = self.udp_timeout.as_secs();
        ClusterOptions {
            forwarding: self.forwarding,
            keepalive_threshold_ms: Some(ms),
            tentative_hold_s: Some(0),
            timeouts: [("udp-new".to_owned(), udp), ("udp-replied".to_owned(), udp)].into(),
            ..ClusterOptions::default()
        }
    }

    /// Whether UDP sessions expire during the run (the lanes' own flows do not: they send
    /// every 250 ms).
    pub fn expires(&self) -> bool {
        self.udp_timeout < NO_EXPIRY
    }
}

/// What the monitor thread finds, shared with the runner.
#[derive(Default)]
struct Watch {
    peak_rss: Mutex<BTreeMap<u8, u64>>,
    peak_fds: Mutex<BTreeMap<u8, u64>>,
    peak_threads: Mutex<BTreeMap<u8, u64>>,
    violations: Mutex<Vec<String>>,
    /// Members whose agent the harness has ended on purpose (killed, restarting).
    ended: Mutex<BTreeSet<u8>>,
    reported: Mutex<BTreeSet<String>>,
}

impl Watch {
    /// Records `v` once per `key`.
    fn once(&self, key: String, v: String) {
        if lock(&self.reported).insert(key) {
            eprintln!("chaos: VIOLATION {v}");
            lock(&self.violations).push(v);
        }
    }
}

/// A run in progress.
pub struct Runner<'a> {
    c: &'a Cluster,
    p: &'a Profile,
    lanes: &'a Lanes,
    intruder: &'a Intruder,
    watch: &'a Watch,
    report: Report,
    /// Faults that disturbed each member (for the full-sync bound).
    disturbed: BTreeMap<u8, u64>,
    flooded: u32,
    started: Instant,
}

/// Raises this process's soft descriptor limit to its hard limit (floods open many sockets;
/// agents started afterwards inherit it, so a leak shows as a count, not as EMFILE).
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max.min(1 << 20);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Runs profile `p`: builds the lab, runs the schedule, checks everything, tears down.
///
/// # Panics
/// If the lab cannot be built or started (not a finding: the environment is broken).
pub fn run(p: &Profile) -> Report {
    raise_nofile();
    let start = Instant::now();
    let c = Cluster::start(&p.tag, p.members, p.options());
    let members: Vec<u8> = c.topology().member_ids().collect();
    for &k in &members {
        c.wait_active(k, Duration::from_secs(60));
    }
    let life = p.duration + Duration::from_secs(600);
    let lanes = Lanes::start(c.topology(), p.lanes, life).unwrap_or_else(|e| c.fail(&e));
    let intruder = Intruder::plug(&c).unwrap_or_else(|e| c.fail(&e));
    let watch = Watch::default();
    let plan = schedule::plan(
        p.seed,
        p.members,
        p.keepalive,
        p.floods,
        p.rounds,
        p.max_flooded,
    );
    let done = AtomicBool::new(false);
    let mut report = std::thread::scope(|s| {
        s.spawn(|| monitor(&c, &lanes, &watch, &done));
        let mut r = Runner {
            c: &c,
            p,
            lanes: &lanes,
            intruder: &intruder,
            watch: &watch,
            report: Report::default(),
            disturbed: BTreeMap::new(),
            flooded: 0,
            started: start,
        };
        r.checkpoint("start");
        for step in plan {
            if start.elapsed() >= p.duration {
                break;
            }
            r.step(&step);
        }
        r.finish();
        done.store(true, Ordering::Relaxed);
        r.report
    });
    report.violations.extend(lock(&watch.violations).drain(..));
    report.peak_rss_kib = lock(&watch.peak_rss).values().copied().max().unwrap_or(0);
    report.peak_fds = lock(&watch.peak_fds).values().copied().max().unwrap_or(0);
    report.peak_threads = lock(&watch.peak_threads)
        .values()
        .copied()
        .max()
        .unwrap_or(0);
    report.wall = start.elapsed();
    if !report.violations.is_empty() {
        eprintln!("{}", c.logs());
    }
    report
}

/// Samples lanes every 100 ms and agents every second until `done`.
fn monitor(c: &Cluster, lanes: &Lanes, watch: &Watch, done: &AtomicBool) {
    let mut tick = 0u64;
    while !done.load(Ordering::Relaxed) {
        lanes.sample();
        if tick.is_multiple_of(10) {
            for k in c.topology().member_ids() {
                sample_agent(c, k, watch);
            }
        }
        tick += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sample_agent(c: &Cluster, k: u8, watch: &Watch) {
    match c.agent_state(k) {
        AgentState::Running { pid } => {
            let Some((rss, fds, threads)) = invariants::resources(pid) else {
                return;
            };
            let peak = |m: &Mutex<BTreeMap<u8, u64>>, v: u64| {
                let mut g = lock(m);
                let e = g.entry(k).or_default();
                *e = (*e).max(v);
            };
            peak(&watch.peak_rss, rss);
            peak(&watch.peak_fds, fds);
            peak(&watch.peak_threads, threads);
        }
        AgentState::Exited { status } if !lock(&watch.ended).contains(&k) => watch.once(
            format!("exit-{k}"),
            format!("fw{k}'s agent exited on its own ({status})"),
        ),
        _ => {}
    }
}

impl Runner<'_> {
    fn members(&self) -> Vec<u8> {
        self.c.topology().member_ids().collect()
    }

    fn violation(&mut self, v: String) {
        self.report.violation(v);
    }

    /// Applies one step, then waits for the replicas to converge.
    fn step(&mut self, step: &Step) {
        eprintln!("chaos: {} (hold {:?})", step.fault, step.hold);
        for k in step.fault.disturbs(self.p.members) {
            *self.disturbed.entry(k).or_default() += 1;
        }
        if let Err(e) = self.apply(step) {
            self.violation(format!("{}: {e}", step.fault));
            // The run goes on; what the agents said is kept with it (the lab goes at the end).
            eprintln!("{}", self.c.logs());
        }
        let took = self.checkpoint(&step.fault.to_string());
        self.report.applied.push(Applied {
            kind: step.fault.kind(),
            what: step.fault.to_string(),
            convergence: took,
        });
    }

    /// Waits for convergence within the bound and checks the lanes' sessions; returns how long
    /// it took.
    fn checkpoint(&mut self, after: &str) -> Option<Duration> {
        let conv = invariants::converge(self.c, &self.members(), self.p.convergence_bound);
        self.report.sessions_checked += conv.mismatch.checked;
        match conv.took {
            Some(t) => eprintln!("chaos: converged {:.1} s after {after}", t.as_secs_f64()),
            None => {
                self.report.lost += conv.mismatch.missing;
                let lines = conv.mismatch.lines.join("; ");
                self.violation(format!(
                    "after {after}: replicas still differ {:?} later: {lines}",
                    self.p.convergence_bound
                ));
            }
        }
        if self.p.expires() {
            self.check_expiry(after);
        }
        for (k, table) in &conv.snapshot {
            for (i, _) in self.lanes.vias() {
                if !table.iter().any(|r| lanes::is_lane_tcp(r, i)) {
                    self.report.lost += 1;
                    self.report
                        .violation(format!("after {after}: fw{k} lacks lane {i}'s TCP session"));
                }
            }
        }
        conv.took
    }

    /// No member holds a UDP session past the timeout and [`EXPIRY_SLACK`], polled for
    /// [`EXPIRY_WAIT`]; the report keeps the oldest idle time of the last poll.
    fn check_expiry(&mut self, after: &str) {
        let (members, timeout) = (self.members(), self.p.udp_timeout);
        let start = Instant::now();
        let found = loop {
            let found = invariants::overdue(self.c, &members, timeout, EXPIRY_SLACK);
            let settled = matches!(&found, Ok((lines, _)) if lines.is_empty());
            if settled || start.elapsed() >= EXPIRY_WAIT {
                break found;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        match found {
            Ok((lines, oldest)) => {
                let seen = self.report.oldest_udp.map_or(oldest, |o| o.max(oldest));
                self.report.oldest_udp = Some(seen);
                if !lines.is_empty() {
                    let lines = lines.join("; ");
                    self.violation(format!("after {after}: expired sessions held: {lines}"));
                }
            }
            Err(e) => self.violation(format!("after {after}: reading the idle times: {e}")),
        }
    }

    /// End-of-run checks: panics, broken lanes, stalls, full syncs.
    fn finish(&mut self) {
        for line in invariants::panics(self.c) {
            self.violation(format!("panic: {line}"));
        }
        for (i, why) in self.lanes.broken() {
            self.violation(format!("lane {i}'s TCP connection broke: {why}"));
        }
        self.lanes.sample();
        let stall = self.lanes.longest_stall();
        self.report.longest_stall = stall;
        if stall > self.p.stall_bound {
            self.violation(format!(
                "a lane's TCP connection stalled {:.1} s (bound {:?})",
                stall.as_secs_f64(),
                self.p.stall_bound
            ));
        }
        self.check_full_syncs();
        let p = self.p;
        self.report.members = p.members;
        self.report.lanes = p.lanes;
        self.report.seed = p.seed;
        self.report.udp_timeout = p.expires().then_some(p.udp_timeout);
        self.report.convergence_bound = p.convergence_bound;
        self.report.stall_bound = p.stall_bound;
        self.report.rss_bound_kib = p.rss_bound_kib;
        self.report.fd_bound = p.fd_bound;
        self.report.thread_bound = p.thread_bound;
        let peaks = [
            (
                "RSS (KiB)",
                lock(&self.watch.peak_rss).clone(),
                p.rss_bound_kib,
            ),
            ("open fds", lock(&self.watch.peak_fds).clone(), p.fd_bound),
            (
                "threads",
                lock(&self.watch.peak_threads).clone(),
                p.thread_bound,
            ),
        ];
        for (what, peaks, bound) in peaks {
            for (k, v) in peaks.into_iter().filter(|(_, v)| *v > bound) {
                self.violation(format!("fw{k}'s agent peaked at {v} {what}, bound {bound}"));
            }
        }
    }

    fn check_full_syncs(&mut self) {
        let elapsed = self.started.elapsed();
        for m in self.members() {
            let sent = match invariants::full_syncs_sent(self.c, m) {
                Ok(s) => s,
                Err(e) => {
                    self.violation(format!("statistics of fw{m}: {e}"));
                    continue;
                }
            };
            for (peer, n) in sent {
                let d = self.disturbed.get(&m).copied().unwrap_or(0)
                    + self.disturbed.get(&peer).copied().unwrap_or(0);
                let bound = invariants::full_sync_bound(d, elapsed);
                if n > self.report.most_full_syncs.0 {
                    self.report.most_full_syncs = (n, bound);
                }
                if n > bound {
                    self.violation(format!(
                        "fw{m} sent fw{peer} {n} full syncs, bound {bound} ({d} disturbances)"
                    ));
                }
            }
        }
    }
}
