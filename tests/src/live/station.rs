//! A station: the bench object `forward-bench` loaded for one namespace, with its generator
//! (BPF_PROG_TEST_RUN in live-frames mode, XDP_TX out of the run's ingress interface) and its
//! counter (attached to the namespace's interfaces: per-CPU count, XDP_DROP).

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{Array, DevMap, MapData, PerCpuArray, PerCpuValues},
    programs::{
        xdp::{XdpLinkId, XdpMode},
        TestRun, TestRunAttrs, TestRunOptions, Xdp,
    },
    Ebpf, EbpfLoader,
};

use super::stream::{Stream, FRAME_LEN};
use crate::{
    interrupt::check_stop,
    netns::{DropIsolated, Netns},
    testrun::{load_xdp_programs, stay_on_this_cpu, xdp_md},
};

static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("HASYNC_EBPF_OUT_DIR"), "/forward-bench"));

/// Live frames per batch (the kernel's default).
pub const BATCH: u32 = 64;
/// Bound of any send loop: a generator call that never returns fails the bench, not hangs it.
const MAX_CALLS: u32 = 100_000;

/// The bench object loaded for one namespace: its generator, its counter (attached to the
/// namespace's interfaces) and, in a member, the pass and redirect programs.
pub struct Station {
    ebpf: DropIsolated<Ebpf>,
    links: Vec<(&'static str, XdpLinkId)>,
}

impl Station {
    pub fn load() -> Result<Station> {
        Station::load_with_table(1)
    }

    /// [`Station::load`], with `redirect_lookup`'s table sized to `entries` (a member's: the
    /// agent's session capacity).
    pub fn load_with_table(entries: u32) -> Result<Station> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("LOOKUP_TABLE", entries)
            .load(OBJECT)
            .context("loading the forward-bench object")?;
        load_xdp_programs(
            &mut ebpf,
            &["generate", "count", "pass", "redirect", "redirect_lookup"],
        )?;
        Ok(Station {
            ebpf: DropIsolated::new(ebpf),
            links: Vec::new(),
        })
    }

    fn prog_mut(&mut self, name: &str) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("no program {name}"))?
            .try_into()?)
    }

    /// The generator program, for [`send_burst`].
    pub fn generator(&self) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program("generate")
            .ok_or_else(|| anyhow!("no program generate"))?
            .try_into()?)
    }

    /// Attaches program `name` to `ifname` in `ns` (native XDP).
    pub fn attach(&mut self, ns: &Netns, name: &'static str, ifname: &str) -> Result<()> {
        let prog = self.prog_mut(name)?;
        let id = ns
            .run(|| prog.attach(ifname, XdpMode::Driver))?
            .with_context(|| format!("attaching {name} to {ifname} in {}", ns.name()))?;
        self.links.push((name, id));
        Ok(())
    }

    /// Detaches every program this station attached.
    pub fn detach_all(&mut self) -> Result<()> {
        for (name, id) in std::mem::take(&mut self.links) {
            self.prog_mut(name)?
                .detach(id)
                .with_context(|| format!("detaching {name}"))?;
        }
        Ok(())
    }

    pub fn map(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("no map {name}"))
    }

    /// The sum over all CPUs of per-CPU counter `name`.
    fn per_cpu_sum(&self, name: &str) -> Result<u64> {
        let map = self
            .ebpf
            .map(name)
            .ok_or_else(|| anyhow!("no map {name}"))?;
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        Ok(map.get(&0, 0)?.iter().sum())
    }

    /// Whether `redirect_lookup` inserts the flows it does not find.
    pub fn set_learn(&mut self, learn: bool) -> Result<()> {
        let mut m: Array<_, u32> = Array::try_from(self.map("LOOKUP_LEARN")?)?;
        m.set(0, u32::from(learn), 0)?;
        Ok(())
    }

    /// Frames the counter counted, all CPUs.
    pub fn received(&self) -> Result<u64> {
        self.per_cpu_sum("RX_COUNT")
    }

    /// Frames the generator sent since the last [`Station::set_stream`], all CPUs.
    pub fn sent(&self) -> Result<u64> {
        self.per_cpu_sum("GEN_ITER")
    }

    /// Frames a paced generator did not send because they were due longer ago than its
    /// allowed lag, since the last [`Station::pace`].
    pub fn lagged(&self) -> Result<u64> {
        self.per_cpu_sum("GEN_LAGGED")
    }

    /// From now on the generator sends `pps` frames per second (on the CPU it runs on),
    /// skipping those due longer than `max_lag` ago, by redirect to the interface that
    /// [`Station::take_steering`]'s handle selects.
    pub fn pace(&mut self, pps: f64, max_lag: Duration) -> Result<()> {
        anyhow::ensure!(
            pps >= 1.0,
            "a paced generator needs a rate of at least 1 pps"
        );
        let interval = (1e9 / pps).round().max(1.0) as u64;
        let lag = u64::try_from(max_lag.as_nanos()).unwrap_or(u64::MAX);
        let mut pace: Array<_, [u64; 3]> = Array::try_from(self.map("GEN_PACE")?)?;
        pace.set(0, [interval, lag, 1], 0)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        for name in ["GEN_NEXT", "GEN_LAGGED"] {
            let mut m: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map(name)?)?;
            m.set(0, PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
        }
        Ok(())
    }

    /// The handle that says where a redirecting generator sends; it can be used while the
    /// generator runs. Once only.
    pub fn take_steering(&mut self) -> Result<Steering> {
        let mut take = |name: &str| {
            self.ebpf
                .take_map(name)
                .ok_or_else(|| anyhow!("no map {name} (taken already?)"))
        };
        Ok(Steering {
            egress: DevMap::try_from(take("GEN_EGRESS")?)?,
            slot: Array::try_from(take("GEN_SLOT")?)?,
        })
    }

    /// What the generator sends from now on, starting at flow 0 on every CPU.
    pub fn set_stream(&mut self, s: &Stream) -> Result<()> {
        let mut t: Array<_, [u64; FRAME_LEN / 8]> = Array::try_from(self.map("GEN_TEMPLATE")?)?;
        let mut words = [0u64; FRAME_LEN / 8];
        for (w, chunk) in words.iter_mut().zip(s.template.chunks_exact(8)) {
            *w = u64::from_ne_bytes(chunk.try_into()?);
        }
        t.set(0, words, 0)?;
        let mut p: Array<_, u32> = Array::try_from(self.map("GEN_PARAMS")?)?;
        for (i, v) in (0u32..).zip(s.params) {
            p.set(i, v, 0)?;
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let mut iter: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map("GEN_ITER")?)?;
        iter.set(0, PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
        Ok(())
    }

    /// Sends frames out of `ifindex` in `ns` (from a thread there, kept on one CPU): `chunk`
    /// per test run until `total` are sent or `time` has passed. Returns frames sent and the
    /// time the kernel's run loops took (BPF_PROG_TEST_RUN's duration: without each run's
    /// page-pool setup and teardown, nor time the thread was preempted).
    pub fn send(
        &self,
        ns: &Netns,
        ifindex: u32,
        chunk: u32,
        total: u64,
        time: Duration,
    ) -> Result<(u64, Duration)> {
        let prog = self.generator()?;
        ns.run(|| send_from_here(prog, ifindex, chunk, total, time))?
    }
}

/// [`Station::send`] on the calling thread.
fn send_from_here(
    prog: &Xdp,
    ifindex: u32,
    chunk: u32,
    total: u64,
    time: Duration,
) -> Result<(u64, Duration)> {
    stay_on_this_cpu()?;
    let start = Instant::now();
    let (mut sent, mut running) = (0u64, Duration::ZERO);
    for _ in 0..MAX_CALLS {
        if sent >= total || start.elapsed() >= time {
            break;
        }
        check_stop()?;
        let repeat = u32::try_from((total - sent).min(u64::from(chunk))).unwrap_or(chunk);
        running += send_burst(prog, ifindex, repeat)?;
        sent += u64::from(repeat);
    }
    Ok((sent, running))
}

/// One live-frames test run of the generator `prog`: `frames` frames out of `ifindex` (in the
/// calling thread's namespace). Returns the time the kernel's run loop took.
pub fn send_burst(prog: &Xdp, ifindex: u32, frames: u32) -> Result<Duration> {
    crate::netns::refuse_host_namespace()?;
    test_run_live(prog, ifindex, frames).map_err(live_frames_error)
}

fn test_run_live(
    prog: &Xdp,
    ifindex: u32,
    frames: u32,
) -> Result<Duration, aya::programs::ProgramError> {
    let frame = [0u8; FRAME_LEN];
    let ctx = xdp_md(FRAME_LEN, ifindex);
    let out = prog.test_run(TestRunOptions {
        data_in: Some(&frame),
        ctx_in: Some(&ctx),
        repeat: frames,
        attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
        ..TestRunOptions::new()
    })?;
    // The kernel reports the mean time per frame of its run loop, in whole ns.
    Ok(out.duration * frames)
}

/// Where a redirecting generator sends ([`Station::take_steering`]): one of two interfaces.
pub struct Steering {
    egress: DevMap<MapData>,
    slot: Array<MapData, u32>,
}

impl Steering {
    /// Makes `ifindex` in `ns` the interface of slot `slot` (0 or 1).
    pub fn connect(&mut self, ns: &Netns, slot: u32, ifindex: u32) -> Result<()> {
        // The kernel resolves a DEVMAP's ifindex in the caller's namespace.
        let map = &mut self.egress;
        ns.run(|| map.set(slot, ifindex, None, 0))?
            .with_context(|| {
                format!(
                    "GEN_EGRESS slot {slot} → ifindex {ifindex} in {}",
                    ns.name()
                )
            })
    }

    /// Sends the generator's frames to the interface of slot `slot` from now on: one map
    /// update, from any thread.
    pub fn select(&mut self, slot: u32) -> Result<()> {
        self.slot
            .set(0, slot, 0)
            .with_context(|| format!("GEN_SLOT → {slot}"))
    }
}

/// A generator run without an end of its own, for a paced generator: live-frames test runs of
/// `u32::MAX` frames one after the other on one thread (each run's page-pool setup and
/// teardown, tens of ms here, would otherwise be a gap in the traffic every run), until
/// [`LongRun::stop`] ends them with a signal: the kernel ends a test run early, with EINTR,
/// when one is pending.
pub struct LongRun {
    /// The sending thread while it runs, so a signal reaches only it, and only while it lives.
    thread: Mutex<Option<libc::pthread_t>>,
    stopping: AtomicBool,
}

extern "C" fn on_wake(_: libc::c_int) {}

/// The signal that ends a [`LongRun`]'s test run.
const WAKE: libc::c_int = libc::SIGUSR1;

impl LongRun {
    /// Installs the (empty) handler of the signal that ends test runs.
    pub fn new() -> Result<LongRun> {
        // SAFETY: a zeroed sigaction is valid; the handler does nothing. No SA_RESTART: the
        // test run is not restarted.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_wake as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(WAKE, &sa, std::ptr::null_mut())
        };
        anyhow::ensure!(
            rc == 0,
            "installing the SIGUSR1 handler: {}",
            std::io::Error::last_os_error()
        );
        Ok(LongRun {
            thread: Mutex::new(None),
            stopping: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<libc::pthread_t>> {
        self.thread.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs the generator `prog` (ingress `ifindex`, in the calling thread's namespace) on
    /// the calling thread, kept on its CPU, until [`LongRun::stop`].
    pub fn run(&self, prog: &Xdp, ifindex: u32) -> Result<()> {
        crate::netns::refuse_host_namespace()?;
        stay_on_this_cpu()?;
        // SAFETY: no preconditions.
        *self.lock() = Some(unsafe { libc::pthread_self() });
        let out = self.run_until_stopped(prog, ifindex);
        *self.lock() = None;
        out
    }

    fn run_until_stopped(&self, prog: &Xdp, ifindex: u32) -> Result<()> {
        for _ in 0..MAX_CALLS {
            if self.stopping.load(Ordering::SeqCst) {
                return Ok(());
            }
            check_stop()?;
            match test_run_live(prog, ifindex, u32::MAX) {
                Ok(_) => {}
                Err(aya::programs::ProgramError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(live_frames_error(e)),
            }
        }
        anyhow::bail!("the generator made {MAX_CALLS} test runs without being stopped")
    }

    /// Ends the run: signals its thread until it has left (at most 5 s).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for _ in 0..500 {
            {
                let thread = self.lock();
                let Some(t) = *thread else {
                    return;
                };
                // SAFETY: `t` runs: it clears the slot, under this lock, before it ends.
                unsafe { libc::pthread_kill(t, WAKE) };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("the generator thread did not stop within 5 s");
    }
}

/// A failed live-frames test run, saying what the kernel lacks when that is the cause.
fn live_frames_error(e: aya::programs::ProgramError) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("Invalid argument") || text.contains("not supported") {
        anyhow!(
            "BPF_PROG_TEST_RUN in live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES, Linux ≥ 5.18) \
             failed: {text}. This kernel does not support it, or refuses the generator's \
             frame; the live-frame benches need it"
        )
    } else {
        anyhow!("live-frames test run of the generator: {text}")
    }
}

/// One end of a live-frames path: a station in its namespace, sending out of `ifindex`.
pub struct End<'a> {
    pub station: &'a mut Station,
    pub ns: &'a Netns,
    pub ifindex: u32,
}

/// Frames per test run while establishing flows.
const SETUP_CHUNK: u32 = 1 << 16;

/// Establishes `flows` flows through a member: one pass of `orig` from `gen`, counted at
/// `recv`, then one of `reply` from `recv`, counted at `gen`, so the member has seen both
/// directions of each; then `gen` is left sending `orig` again. Says on stderr (after
/// `label`) how many arrived and how long it took; returns (forwarded, replies).
pub fn establish(
    mut gen: End<'_>,
    mut recv: End<'_>,
    (orig, reply): (&Stream, &Stream),
    flows: u32,
    label: &str,
) -> Result<(u64, u64)> {
    let started = Instant::now();
    let forward = one_pass(&mut gen, recv.station, orig, flows)?;
    let forward_took = started.elapsed();
    let replies = one_pass(&mut recv, gen.station, reply, flows)?;
    eprintln!(
        "  {label} {flows} flows established: {forward} forwarded in {forward_took:.1?}, \
         {replies} replies through in {:.1?}",
        started.elapsed() - forward_took
    );
    gen.station.set_stream(orig)?;
    Ok((forward, replies))
}

/// Sends one pass of `stream` (`flows` frames, one per flow) from `from`; returns how many
/// `to` counted meanwhile (and in the 50 ms after, for frames still in flight).
pub fn one_pass(from: &mut End<'_>, to: &Station, stream: &Stream, flows: u32) -> Result<u64> {
    from.station.set_stream(stream)?;
    let before = to.received()?;
    from.station.send(
        from.ns,
        from.ifindex,
        SETUP_CHUNK,
        flows.into(),
        Duration::from_secs(60),
    )?;
    std::thread::sleep(Duration::from_millis(50));
    Ok(to.received()? - before)
}
