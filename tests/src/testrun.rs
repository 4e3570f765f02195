//! Runs frames through the XDP program with `BPF_PROG_TEST_RUN`, and reads back what it did.

use std::{fmt, time::Instant};

use anyhow::{Context as _, Result};
use aya::{
    maps::MapError,
    programs::{TestRun, TestRunOptions},
};
use hasync_agent::datapath::{events::EventStream, Datapath, DatapathLog, DatapathOptions};
use hasync_common::{
    Counter, Counters, DatapathConfig, Event, FlowKey, MemberId, Session, SessionFlags, State,
    ZoneId,
};

/// The XDP verdict a test run returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Aborted,
    Drop,
    Pass,
    Tx,
    Redirect,
    Other(u32),
}

impl Verdict {
    pub fn from_raw(v: u32) -> Self {
        match v {
            0 => Verdict::Aborted,
            1 => Verdict::Drop,
            2 => Verdict::Pass,
            3 => Verdict::Tx,
            4 => Verdict::Redirect,
            other => Verdict::Other(other),
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Aborted => f.write_str("XDP_ABORTED"),
            Verdict::Drop => f.write_str("XDP_DROP"),
            Verdict::Pass => f.write_str("XDP_PASS"),
            Verdict::Tx => f.write_str("XDP_TX"),
            Verdict::Redirect => f.write_str("XDP_REDIRECT"),
            Verdict::Other(v) => write!(f, "XDP verdict {v}"),
        }
    }
}

/// Interface index the test runs claim as ingress: `lo`, which exists in every namespace, so
/// the zone map can be exercised.
pub const TEST_IFINDEX: u32 = 1;
/// Moves the calling thread into a network namespace of its own, with forwarding off: test
/// runs on [`TEST_IFINDEX`] then come in on that namespace's `lo`, and the program's FIB
/// lookups answer "forwarding disabled" whatever the host's routes and sysctls are (a new
/// namespace inherits the host's IPv4 settings). Nothing is added to it; it goes with the
/// thread.
pub fn isolate_thread() -> Result<()> {
    // SAFETY: plain unshare(2); it changes only the calling thread's network namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    anyhow::ensure!(
        rc == 0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    // /proc/sys/net shows the namespace of the thread that opens it.
    for path in [
        "/proc/sys/net/ipv4/conf/all/forwarding",
        "/proc/sys/net/ipv4/conf/lo/forwarding",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ] {
        std::fs::write(path, "0").with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}

/// Capacity of the SESSIONS map in tests: small, so loading is cheap.
pub const TEST_CAPACITY: u32 = 4096;
/// The member the test datapath runs as.
pub const LOCAL: MemberId = MemberId(1);

pub use hasync_agent::datapath::monotonic_ns;

/// The config fixtures start from: the firewall defaults for member 1, but a refresh floor of a
/// minute (a state's interval is then a minute, or half its timeout when that is shorter), so
/// a row's frames never race the refresh interval.
pub fn fixture_config() -> DatapathConfig {
    let mut cfg = DatapathConfig::with_defaults(LOCAL);
    cfg.refresh_interval_ns = 60_000_000_000;
    cfg
}

/// A loaded (not attached) datapath driven by test runs.
pub struct TestDatapath {
    dp: Datapath,
    events: EventStream,
}

impl TestDatapath {
    /// Loads the product program with [`fixture_config`], member 1 alive.
    pub fn load() -> Result<Self> {
        Self::load_with(fixture_config())
    }

    /// Loads the product program with `config`; the local member (if valid) is marked alive.
    pub fn load_with(config: DatapathConfig) -> Result<Self> {
        Self::load_sized(config, TEST_CAPACITY)
    }

    /// Like [`Self::load_with`], with a session table of `capacity` entries, as much of which
    /// embryonic sessions may take as there can be (half the table for every member id's
    /// together: this member's own and each peer's copies in their own part; however many CPUs
    /// share the ring, test runs on one CPU see only its part: `DatapathConfig::embryo_slots`).
    pub fn load_sized(config: DatapathConfig, capacity: u32) -> Result<Self> {
        Self::load_options(Self::options(config, capacity))
    }

    /// Like [`Self::load_with`], with the datapath's log at `log`.
    pub fn load_logging(config: DatapathConfig, log: DatapathLog) -> Result<Self> {
        let mut opts = Self::options(config, TEST_CAPACITY);
        opts.log = log;
        Self::load_options(opts)
    }

    fn options(config: DatapathConfig, capacity: u32) -> DatapathOptions {
        let mut opts = DatapathOptions::new(config.local_member);
        opts.session_capacity = capacity;
        opts.embryonic_capacity = Some(capacity / 2 / u32::from(opts.replica_parts.max(1)));
        opts.config = config;
        opts
    }

    fn load_options(opts: DatapathOptions) -> Result<Self> {
        let config = opts.config;
        let mut dp = Datapath::load(&opts).context("loading the XDP program")?;
        if config.local_member.is_valid() {
            dp.set_member_alive(config.local_member, true)?;
        }
        let events = dp.take_events()?;
        Ok(TestDatapath { dp, events })
    }

    pub fn datapath(&self) -> &Datapath {
        &self.dp
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.dp
    }

    /// Runs one frame arriving on [`TEST_IFINDEX`].
    pub fn run(&self, frame: &[u8]) -> Result<Verdict> {
        self.run_on(frame, TEST_IFINDEX)
    }

    /// Runs one frame arriving on `ifindex` (an interface of the caller's network namespace).
    pub fn run_on(&self, frame: &[u8], ifindex: u32) -> Result<Verdict> {
        let ctx = xdp_md(frame.len(), ifindex);
        let prog = self.dp.program()?;
        let out = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of a {}-byte frame", frame.len()))?;
        Ok(Verdict::from_raw(out.return_value))
    }

    pub fn counters(&self) -> Result<Counters> {
        Ok(self.dp.counters()?)
    }

    pub fn session(&self, key: &FlowKey) -> Result<Option<Session>> {
        Ok(self.dp.session(key)?)
    }

    /// Every session in the table.
    pub fn sessions(&self) -> Result<Vec<(FlowKey, Session)>> {
        Ok(self.dp.sessions()?)
    }

    /// Writes sessions into the table, as a peer's sync or a test setup would.
    pub fn insert_sessions(&mut self, entries: &[(FlowKey, Session)]) -> Result<()> {
        Ok(self.dp.insert_sessions(entries)?)
    }

    /// Empties the session table.
    pub fn clear_sessions(&mut self) -> Result<()> {
        let keys: Vec<FlowKey> = self.sessions()?.into_iter().map(|(k, _)| k).collect();
        self.dp.delete_sessions(&keys)?;
        Ok(())
    }

    /// Forgets every fragmented datagram the program remembered.
    pub fn clear_fragments(&mut self) -> Result<()> {
        let map = self
            .dp
            .ebpf_mut()
            .map_mut(hasync_common::maps::FRAGMENTS)
            .context("no FRAGMENTS map")?;
        let mut map: aya::maps::HashMap<_, hasync_common::FragmentKey, u64> =
            aya::maps::HashMap::try_from(map)?;
        let keys: Vec<_> = map.keys().collect::<Result<_, _>>()?;
        for k in keys {
            ignore_not_found(map.remove(&k))?;
        }
        Ok(())
    }

    /// Takes every event queued in the EVENTS ring buffer (through the agent's reader).
    pub fn drain_events(&mut self) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        self.events.drain(&mut out);
        let malformed = self.events.stats().malformed;
        anyhow::ensure!(malformed == 0, "{malformed} malformed event records");
        Ok(out)
    }
}

/// Loads (verifies) the XDP programs `names` of a bench object, naming the one the verifier
/// refuses (a load a signal interrupted is tried again, as the agent's are).
pub fn load_xdp_programs(ebpf: &mut aya::Ebpf, names: &[&str]) -> Result<()> {
    for &name in names {
        let prog: &mut aya::programs::Xdp = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow::anyhow!("no program {name}"))?
            .try_into()?;
        hasync_agent::datapath::load_retry::retrying(|| prog.load())
            .with_context(|| format!("verifier rejected {name}"))?;
    }
    Ok(())
}

/// A map removal that found nothing is not an error (aya reports ENOENT as a syscall error).
pub fn ignore_not_found(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// The `struct xdp_md` a test run takes as context: data = 0, data_end = frame length,
/// data_meta = 0, ingress_ifindex, rx_queue_index = 0, egress_ifindex = 0.
pub fn xdp_md(len: usize, ifindex: u32) -> [u8; 24] {
    let fields = [0u32, len as u32, 0, ifindex, 0, 0];
    let mut out = [0u8; 24];
    for (chunk, v) in out.chunks_exact_mut(4).zip(fields) {
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    out
}

/// Keeps the calling thread on the CPU it runs on now, so every test run it makes uses that
/// CPU's per-CPU state (such as its part of the EMBRYOS ring).
pub fn stay_on_this_cpu() -> Result<()> {
    // SAFETY: no arguments; returns the CPU or -1.
    let cpu = unsafe { libc::sched_getcpu() };
    stay_on_cpu(usize::try_from(cpu).context("sched_getcpu")?)
}

/// The CPUs the calling thread may run on.
pub fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size given; 0 is the calling thread.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    anyhow::ensure!(
        rc == 0,
        "sched_getaffinity: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `cpu` is below CPU_SETSIZE; CPU_ISSET only reads the set.
    let on = |cpu: usize| unsafe { libc::CPU_ISSET(cpu, &set) };
    Ok((0..libc::CPU_SETSIZE as usize).filter(|&c| on(c)).collect())
}

/// Moves the calling thread to CPU `cpu` and keeps it there.
pub fn stay_on_cpu(cpu: usize) -> Result<()> {
    anyhow::ensure!(cpu < libc::CPU_SETSIZE as usize, "no CPU {cpu}");
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size given; 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    anyhow::ensure!(
        rc == 0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// The change of every datapath counter between two snapshots.
#[derive(Clone, Debug)]
pub struct CounterDelta {
    pub before: Counters,
    pub after: Counters,
}

impl CounterDelta {
    pub fn get(&self, c: Counter) -> u64 {
        self.after.get(c).wrapping_sub(self.before.get(c))
    }

    /// The counters that moved, with their deltas.
    pub fn nonzero(&self) -> Vec<(Counter, u64)> {
        Counter::ALL
            .iter()
            .map(|&c| (c, self.get(c)))
            .filter(|&(_, d)| d != 0)
            .collect()
    }
}

impl fmt::Display for CounterDelta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let moved = self.nonzero();
        if moved.is_empty() {
            return f.write_str("(no counter moved)");
        }
        for (i, (c, d)) in moved.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} +{d}", c.name())?;
        }
        Ok(())
    }
}

/// Snapshots the counters, runs `f`, and returns its result with the counter delta.
pub fn with_delta<T>(
    tdp: &mut TestDatapath,
    f: impl FnOnce(&mut TestDatapath) -> Result<T>,
) -> Result<(T, CounterDelta)> {
    let before = tdp.counters()?;
    let out = f(tdp)?;
    let after = tdp.counters()?;
    Ok((out, CounterDelta { before, after }))
}

/// How long `f` took, for the odd timing note in a test's output.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, std::time::Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

/// An assured UDP session (answered, a stream for 3 s) owned by `owner`, as of `now`.
pub fn replied_session(now: u64, owner: MemberId) -> Session {
    Session {
        created_ns: now.saturating_sub(3_000_000_000),
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
        tcp_track: [0; 2],
        max_win: [0; 2],
        seq_end: [0; 2],
    }
}
