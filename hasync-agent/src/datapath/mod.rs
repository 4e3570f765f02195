//! The datapath: loads the XDP program, fills its maps, reads its counters and sessions.
//!
//! The SESSIONS map is the session table; nothing here keeps a copy of it: whole-table work
//! (dumps, sweeps) walks it in bounded chunks with batch map operations ([`batch`]); peers'
//! records are applied, and sessions read for the sender, by the table programs, which
//! [`table_runner`] runs a batch at a time.

pub mod attach;
pub mod batch;
pub mod clock;
pub mod events;
pub mod health;
pub mod load_retry;
pub mod logger;
pub mod pin;
pub mod pod;
mod ports;
pub mod replica_room;
pub mod sweep;
pub mod sweep_table;
pub(crate) mod sys;
pub mod table_runner;
#[cfg(test)]
pub(crate) mod testing;

use std::{os::fd::AsFd as _, path::PathBuf, time::Instant};

use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues, RingBuf},
    programs::{ProgramError, Xdp},
    util::KernelVersion,
    Ebpf, EbpfError, EbpfLoader,
};
use hasync_common::{
    maps as names, ApplyOutcome, ApplyRecord, ApplySource, ClockSample, Counters, DatapathConfig,
    FlowKey, MemberEntry, MemberId, Session, ZoneBinding,
};

pub use attach::{check_interface_name, ifindex, AttachMode, Attachment};
pub use batch::{BatchError, BatchMap};
pub use clock::{ClockError, JiffyClock};
pub use events::{EventStats, EventStream, SessionEvent};
pub use logger::{DatapathLog, DatapathLogger};
pub use pin::{PinDir, PinReport, TeardownReport, DEFAULT_PIN_DIR};
pub use sweep::{RemoveReason, Removed, SweepReport};

/// Errors of the datapath module.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the XDP object failed: {0}")]
    Load(#[from] EbpfError),
    #[error("the XDP object has no program `{0}`")]
    NoProgram(&'static str),
    #[error("the XDP object has no map `{0}` (or it was already taken)")]
    NoMap(&'static str),
    #[error("map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("XDP program `{name}`: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(
        "loading the datapath failed on Linux {found}: hasync needs Linux {MIN_KERNEL} or later \
         (XDP fragments in test runs, bpf_loop): {source}"
    )]
    KernelTooOld {
        found: KernelVersion,
        #[source]
        source: Box<DatapathError>,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("program `{program}` refused a batch of {items} (verdict {verdict})")]
    BatchRejected {
        program: &'static str,
        items: usize,
        verdict: u32,
    },
    #[error("reading the datapath's log records: {0}")]
    Log(#[source] aya_log::Error),
    #[error("the datapath's log ring held a record aya-log could not read")]
    LogRecord,
    #[error("measuring the kernel's jiffies: {0}")]
    Clock(#[from] ClockError),
    #[error("member id {0} is out of range 1–16")]
    MemberOutOfRange(u8),
    #[error("session capacity {0} is out of range 1–{max}", max = MAX_SESSION_CAPACITY)]
    CapacityOutOfRange(u32),
    #[error(
        "embryonic capacity {embryonic} for each of {members} member ids is more than half the \
         session table ({table} sessions; a pinned table keeps its size): lower it, or leave it \
         out"
    )]
    EmbryonicCapacity {
        embryonic: u32,
        members: u8,
        table: u32,
    },
    #[error(
        "interface index {0} is too large to bind to a zone (limit {limit}): recreate the \
         interface, or move it to a namespace with fewer interfaces",
        limit = names::ZONE_IFINDEX_LIMIT
    )]
    IfindexTooLarge(u32),
    #[error(
        "zone {id} was `{was}` when the pinned sessions were made and is `{now}` now: sessions \
         record zones by position, so keep the zones in their order (new ones go at the end), \
         or run `hasync teardown` (it drops the sessions)"
    )]
    ZonesReordered { id: usize, was: String, now: String },
    #[error("{count} interfaces for {map} are more than the {max} it holds", max = names::PORTS_CAPACITY)]
    TooManyPorts { map: &'static str, count: usize },
    #[error("{map}: interface {key}: {source}")]
    Port {
        map: &'static str,
        key: u32,
        #[source]
        source: aya::maps::xdp::XdpMapError,
    },
    #[error("{0} zones are more than the {max} the datapath records", max = names::MAX_ZONES)]
    TooManyZones(usize),
    #[error("counting the possible CPUs: {0}")]
    PossibleCpus(#[source] std::io::Error),
    #[error("map `{map}`: {source}")]
    Batch {
        map: &'static str,
        #[source]
        source: BatchError,
    },
    #[error("interface name {name:?} is invalid: {why}")]
    InvalidInterfaceName { name: String, why: &'static str },
    #[error("unknown network interface `{0}`")]
    UnknownInterface(String),
    /// Both modes failed; `source` is the generic-mode error.
    #[error(
        "attaching XDP to `{interface}` failed in native mode ({}) and in generic mode",
        error_chain(.native)
    )]
    Attach {
        interface: String,
        native: Box<ProgramError>,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("detaching XDP from `{interface}`: {source}")]
    Detach {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("pin directory {}: {why}", path.display())]
    PinDir { path: PathBuf, why: String },
    #[error("{what} {}: {source}", path.display())]
    PinIo {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the pinned map `{map}` ({}) was made for another session layout: it is {pinned}; this \
         program needs {wanted}. Its sessions cannot be carried over: run `hasync teardown` \
         (this detaches XDP and drops the session table), then start the agent again",
        path.display()
    )]
    PinnedMapLayout {
        map: &'static str,
        path: PathBuf,
        pinned: pin::MapShape,
        wanted: pin::MapShape,
    },
    #[error("pinned XDP link {}: {source}", path.display())]
    PinnedLink {
        path: PathBuf,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning {}: {source}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error(
        "XDP on `{interface}` is attached through netlink, which cannot be pinned (the kernel has \
         no XDP links: Linux before 5.9): run without pinning (`pin_dir = \"\"`), and remove it \
         with `ip link set dev {interface} xdp off`"
    )]
    Unpinnable { interface: String },
    #[error("the table answered {got} of {asked} keys read")]
    ShortRead { asked: usize, got: usize },
}

/// `error` and its sources, joined by ": ", each source once: some errors (aya's
/// `SyscallError`) keep the errno only in their source, others (ours) repeat their source in
/// their own message.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let msg = e.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        source = e.source();
    }
    out
}

/// Sessions per batch call when a caller does not choose (about 14 KiB of keys and values).
pub const DEFAULT_CHUNK: u32 = 128;

/// The programs loaded: the XDP program, and the ones the agent runs with BPF_PROG_TEST_RUN.
const PROGRAMS: [&str; 5] = [
    names::PROGRAM,
    names::APPLY_PROGRAM,
    names::READ_PROGRAM,
    names::CLOCK_PROGRAM,
    names::LOG_PROGRAM,
];

/// This host's CLOCK_MONOTONIC_COARSE in nanoseconds: the agent's clock, and the clock of
/// every timestamp in a [`Session`]: the XDP program reads `jiffies` converted to it (see
/// [`clock`]; or the coarse clock itself, `bpf_ktime_get_coarse_ns`, when that cannot be
/// measured). Both advance once per tick (a few milliseconds), far below any session timeout.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

/// This host's clock `clock` (a valid clock id) in nanoseconds.
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    // A valid clock id and pointer cannot fail; 0 would make nothing look idle.
    debug_assert_eq!(rc, 0, "clock_gettime({clock})");
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Largest SESSIONS capacity accepted (64 Mi entries, about 9 GiB of kernel memory).
pub const MAX_SESSION_CAPACITY: u32 = 1 << 26;

/// Replica parts of a datapath whose cluster is not known (tests, benches, the standalone
/// agent): members 1 to 4.
pub const DEFAULT_REPLICA_PARTS: u8 = 4;

/// What to load.
#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// Capacity of the SESSIONS hash.
    pub session_capacity: u32,
    /// Embryonic sessions the table holds at most (the EMBRYOS ring): past this, each new one
    /// evicts the oldest. `None`: the table's capacity divided by `embryonic_share`.
    pub embryonic_capacity: Option<u32>,
    /// See `embryonic_capacity` (default 8: one eighth of the table).
    pub embryonic_share: u32,
    /// Member ids (1 to this) whose embryonic sessions get a replica part in the EMBRYOS ring:
    /// the highest member id of the cluster (replicas of a member past it are refused while
    /// embryonic).
    pub replica_parts: u8,
    /// The most assured sessions peers' records may hold in the table (see [`replica_room`]);
    /// `None`: [`replica_room::default_limit`] of the table and `cluster_members`. At most the
    /// table's capacity.
    pub replica_limit: Option<u32>,
    /// Enabled members of the cluster, this one included (the peers' pool's default limit).
    pub cluster_members: usize,
    /// Written to CONFIG before the program can see traffic.
    pub config: DatapathConfig,
    /// Pin the maps and XDP links here (on bpffs) and reuse what an earlier agent pinned there
    /// (see [`pin`]): the datapath then outlives the agent. `None`: nothing is pinned, and the
    /// datapath goes away with the [`Datapath`] (tests, benches, the standalone agent).
    pub pin_dir: Option<PathBuf>,
    /// The least severe datapath event logged (`[local] datapath_log`).
    pub log: DatapathLog,
    /// The zone names in id order (id 1 first), which [`Datapath::record_zones`] records: a
    /// pinned table's sessions name zones by id, so a list that renumbers them is refused
    /// before the load writes anything pinned (a running datapath keeps its config).
    pub zones: Vec<String>,
}

/// The tracing directive that lets every datapath record through: `[local] datapath_log`
/// filters them already.
pub const LOG_DIRECTIVE: &str = "hasync::datapath=trace";

impl DatapathOptions {
    pub fn new(local: MemberId) -> Self {
        DatapathOptions {
            session_capacity: names::DEFAULT_SESSION_CAPACITY,
            embryonic_capacity: None,
            embryonic_share: names::EMBRYONIC_SHARE,
            replica_parts: DEFAULT_REPLICA_PARTS,
            replica_limit: None,
            cluster_members: 2,
            config: DatapathConfig::with_defaults(local),
            pin_dir: None,
            log: DatapathLog::default(),
            zones: Vec::new(),
        }
    }
}

/// How the EMBRYOS ring is cut: one replica part per member id up to `replica_parts`, each as
/// large as this member's own parts together (so a peer with the same geometry is mirrored
/// slot for slot), then `per_cpu` slots for each of `cpus` possible CPUs (this member's own
/// embryonic sessions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbryoRing {
    pub per_cpu: u32,
    pub cpus: u32,
    pub replica_parts: u8,
}

impl EmbryoRing {
    /// The ring for at most `capacity` embryonic sessions of this member's own (default: the
    /// table's `share`-th part) in a table of `table` entries, on `cpus` possible CPUs (at
    /// least one slot per CPU), with a replica part for each member id up to
    /// `replica_parts`. `None` when every member's own (as many as the member ids) could take
    /// more than half the table.
    /// (How many members' embryonic sessions the table can hold together is the
    /// configuration's check: see `Config::embryonic_share`.)
    pub fn new(
        capacity: Option<u32>,
        share: u32,
        table: u32,
        cpus: u32,
        replica_parts: u8,
    ) -> Option<EmbryoRing> {
        let capacity = capacity.unwrap_or(table / share.max(2));
        // This member's own and each other member's take as many: together half the table
        // at most (a pinned table kept smaller than the configured one included).
        let members = u32::from(replica_parts.clamp(1, MemberId::MAX));
        if capacity.saturating_mul(members) > table / 2 {
            return None;
        }
        let cpus = cpus.max(1);
        Some(EmbryoRing {
            per_cpu: (capacity / cpus).max(1),
            cpus,
            replica_parts: replica_parts.min(MemberId::MAX),
        })
    }

    /// Slots of the parts for this member's own sessions, together; as many in each replica
    /// part.
    pub fn local_slots(&self) -> u32 {
        self.per_cpu.saturating_mul(self.cpus)
    }

    /// Slots in the EMBRYOS map: the replica parts, then the CPUs' parts.
    pub fn slots(&self) -> u32 {
        self.local_slots()
            .saturating_mul(u32::from(self.replica_parts) + 1)
    }
}

/// The session table's own descriptor, for walks that take no lock of the agent's (see
/// [`Datapath::session_reader`]).
#[derive(Debug)]
pub struct SessionReader {
    fd: std::os::fd::OwnedFd,
}

impl SessionReader {
    /// As [`Datapath::sessions_chunked`] (the map's key and value types checked each walk).
    pub fn chunked(
        &self,
        chunk: u32,
        f: impl FnMut(&[FlowKey], &[Session]),
    ) -> Result<u64, DatapathError> {
        self.map()?
            .for_each_chunk(chunk, f)
            .map_err(batch_err(names::SESSIONS))
    }

    /// Calls `f` with each session `owner` owns, in one walk of the table.
    pub fn each_owned_by(
        &self,
        owner: MemberId,
        mut f: impl FnMut(&FlowKey, &Session),
    ) -> Result<u64, DatapathError> {
        self.chunked(DEFAULT_CHUNK, |keys, values| {
            for (k, s) in keys.iter().zip(values).filter(|(_, s)| s.owner == owner) {
                f(k, s);
            }
        })
    }

    /// The map, its key and value types checked.
    fn map(&self) -> Result<BatchMap<'_, FlowKey, Session>, DatapathError> {
        BatchMap::new(self.fd.as_fd()).map_err(batch_err(names::SESSIONS))
    }
}

/// The counters map's own descriptor, for reads that take no lock of the agent's (see
/// [`Datapath::counters_reader`]).
pub struct CountersReader {
    map: PerCpuArray<MapData, Counters>,
    /// REPLICA_ROOM's own descriptor.
    pool: std::os::fd::OwnedFd,
}

impl CountersReader {
    /// As [`Datapath::counters`].
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        let per_cpu = self.map.get(&0, 0).map_err(map_err(names::COUNTERS))?;
        Ok(sum_counters(&per_cpu))
    }

    /// As [`Datapath::replica_pool`]: (held, limit).
    pub fn replica_pool(&self) -> Result<(u64, u64), DatapathError> {
        let room = replica_room::read(self.pool.as_fd())?;
        Ok((room.held, room.limit))
    }
}

/// A descriptor of `map`'s own (duplicated), for a reader that outlives any hold of the
/// [`Datapath`]; `what` names the step in the error.
fn own_fd(map: &MapData, what: &'static str) -> Result<std::os::fd::OwnedFd, DatapathError> {
    map.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| DatapathError::Io { what, source })
}

/// How many sessions the table holds at most, in all and embryonic (fixed at load).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableBounds {
    pub capacity: u32,
    pub embryonic_slots: u32,
}

/// The counters of all CPUs added up.
fn sum_counters(per_cpu: &PerCpuValues<Counters>) -> Counters {
    let mut total = Counters::default();
    for cpu in per_cpu.iter() {
        for (t, v) in total.values.iter_mut().zip(cpu.values.iter()) {
            *t = t.wrapping_add(*v);
        }
    }
    total
}

/// A loaded XDP program and its maps.
pub struct Datapath {
    ebpf: Ebpf,
    capacity: u32,
    embryos: EmbryoRing,
    /// Interfaces the program is attached to, in attach order.
    attachments: Vec<Attachment>,
    /// Interfaces whose broken attachment could not be made again (by name, with the index
    /// and mode they had): still the datapath's, still broken, until a reattach succeeds.
    lost: Vec<(String, u32, AttachMode)>,
    /// Where the maps and links are pinned, and what was found there.
    pins: Option<(PinDir, PinReport)>,
    /// This agent's hold of the pin directory, released when the datapath is dropped.
    _pin_lock: Option<pin::PinLock>,
    /// The session clock written into CONFIG (`None`: the program reads the coarse clock).
    clock: Option<JiffyClock>,
    /// When the clock is checked next.
    clock_check: Instant,
    /// The samples of a measurement under way (the clock drifted): one per check, so no check
    /// holds the datapath longer than one run of the clock program.
    remeasuring: Vec<ClockSample>,
    /// `DatapathConfig::fib_by_source`, as the agent last found the rules and routes (`None`:
    /// not looked yet, the config's own value holds).
    fib_by_source: Option<bool>,
    /// What INGRESS_MACS holds (the map starts empty with each load).
    ingress_macs: std::collections::BTreeMap<u32, [u8; 6]>,
    /// `DatapathConfig::fib_seed`: random, chosen at load.
    fib_seed: u32,
    /// Forwards the log program's records (`None`: `[local] datapath_log = "off"`).
    logger: Option<DatapathLogger>,
    /// The most assured sessions peers' records may hold in the table ([`replica_room`]).
    replica_limit: u64,
}

/// A zone name as ZONE_NAMES holds it (config names are at most 31 bytes; longer ones are cut).
fn zone_name_bytes(name: &str) -> [u8; names::ZONE_NAME_BYTES] {
    let mut out = [0; names::ZONE_NAME_BYTES];
    for (o, b) in out.iter_mut().zip(name.bytes()) {
        *o = b;
    }
    out
}

/// The EMBRYOS ring `opts` ask for, sized after the table that will be used: a pinned one keeps
/// its size.
fn embryo_ring(opts: &DatapathOptions, pins: Option<&PinDir>) -> Result<EmbryoRing, DatapathError> {
    let table = pins
        .and_then(pin::pinned_capacity)
        .unwrap_or(opts.session_capacity);
    EmbryoRing::new(
        opts.embryonic_capacity,
        opts.embryonic_share,
        table,
        possible_cpus()?,
        opts.replica_parts,
    )
    .ok_or(DatapathError::EmbryonicCapacity {
        embryonic: opts.embryonic_capacity.unwrap_or(0),
        members: opts.replica_parts.max(1),
        table,
    })
}

/// Checks the maps pinned in `pins` (readied and locked) against those `object` declares (with
/// `capacity` sessions and `embryos`); has `loader` reuse them, or create and pin them there.
/// Returns what was found and the capacity of the table that will be used (a pinned one keeps
/// its size).
fn use_pins(
    loader: &mut EbpfLoader<'_>,
    pins: &PinDir,
    object: &[u8],
    capacity: u32,
    embryos: &EmbryoRing,
) -> Result<(PinReport, u32), DatapathError> {
    let sizes = [
        (names::SESSIONS, capacity),
        (names::EMBRYOS, embryos.slots()),
    ];
    let declared = pin::declared_shapes(object, &sizes)?;
    let (report, kept) = pin::check_pinned_maps(pins, &declared, capacity)?;
    for name in pin::MAPS {
        loader.map_pin_path(name, pins.map_path(name));
    }
    Ok((report, kept))
}

/// How many CPUs per-CPU maps have values for.
fn possible_cpus() -> Result<u32, DatapathError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::PossibleCpus(e))?;
    Ok(u32::try_from(cpus).unwrap_or(u32::MAX))
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

impl Datapath {
    /// Loads the embedded program, sizes its maps and writes the config. Not attached yet.
    pub fn load(opts: &DatapathOptions) -> Result<Self, DatapathError> {
        Self::load_object(crate::EBPF_OBJECT, opts)
    }

    /// Loads `object` (the product's or a bench build with the same maps). On a kernel older
    /// than [`MIN_KERNEL`] a failure says so.
    pub fn load_object(object: &[u8], opts: &DatapathOptions) -> Result<Self, DatapathError> {
        Self::load_unchecked(object, opts).map_err(|e| match KernelVersion::current() {
            Ok(running) => kernel_hint(e, running),
            Err(_) => e,
        })
    }

    fn load_unchecked(object: &[u8], opts: &DatapathOptions) -> Result<Self, DatapathError> {
        if opts.session_capacity == 0 || opts.session_capacity > MAX_SESSION_CAPACITY {
            return Err(DatapathError::CapacityOutOfRange(opts.session_capacity));
        }
        let mut loader = EbpfLoader::new();
        let pins = opts.pin_dir.as_ref().map(PinDir::new);
        let pin_lock = pins.as_ref().map(PinDir::lock).transpose()?;
        let embryos = embryo_ring(opts, pins.as_ref())?;
        let (pins, capacity) = match pins {
            None => (None, opts.session_capacity),
            Some(pins) => {
                let (report, capacity) =
                    use_pins(&mut loader, &pins, object, opts.session_capacity, &embryos)?;
                (Some((pins, report)), capacity)
            }
        };
        let level = opts.log.aya_level();
        let ebpf = loader
            .override_global(names::AYA_LOG_LEVEL, &level, true)
            .map_max_entries(names::SESSIONS, capacity)
            .map_max_entries(names::EMBRYOS, embryos.slots())
            .load(object)?;
        if let Some((pins, report)) = &pins {
            log_pin_report(pins, report, opts.session_capacity);
        }
        let mut dp = Datapath {
            ebpf,
            capacity,
            embryos,
            attachments: Vec::new(),
            lost: Vec::new(),
            pins,
            _pin_lock: pin_lock,
            clock: None,
            clock_check: Instant::now() + clock::CHECK_EVERY,
            remeasuring: Vec::new(),
            fib_by_source: None,
            ingress_macs: Default::default(),
            fib_seed: crate::random::random_u64() as u32,
            logger: None,
            replica_limit: u64::from(
                opts.replica_limit
                    .unwrap_or_else(|| replica_room::default_limit(capacity, opts.cluster_members))
                    .min(capacity),
            ),
        };
        dp.load_programs()?;
        // Before the first write to a map an earlier agent pinned: its program still runs.
        dp.check_zones(&opts.zones)?;
        // Measured by every agent, a restarted one too: it rewrites the whole config.
        dp.clock = clock::find(dp.xdp(names::CLOCK_PROGRAM)?)?;
        dp.set_config(&opts.config)?;
        // A reused table may hold copies already (counted for this config's member).
        dp.recount_replicas()?;
        if opts.log != DatapathLog::Off {
            let counters = dp.per_cpu_counters()?;
            dp.logger = Some(DatapathLogger::new(&mut dp.ebpf, &counters)?);
        }
        Ok(dp)
    }

    /// Loads the XDP program and the ones the agent runs with BPF_PROG_TEST_RUN into the
    /// kernel (again when a signal interrupted the verifier).
    fn load_programs(&mut self) -> Result<(), DatapathError> {
        for name in PROGRAMS {
            let program = self.xdp_mut(name)?;
            load_retry::retrying(|| program.load())
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(())
    }

    /// Capacity of the session table.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The table's capacity and embryonic slots together.
    pub fn bounds(&self) -> TableBounds {
        TableBounds {
            capacity: self.capacity(),
            embryonic_slots: self.embryonic_slots(),
        }
    }

    /// Embryonic sessions the table holds at most: this member's own (all CPUs' parts of the
    /// EMBRYOS ring) and as many replicas of each other member's (the replica part of this
    /// member's own id stays empty).
    pub fn embryonic_slots(&self) -> u32 {
        self.embryos
            .local_slots()
            .saturating_mul(u32::from(self.embryos.replica_parts).max(1))
    }

    /// The pin directory, when the datapath is pinned (it then outlives this value: dropping it
    /// leaves the program attached and the maps in place).
    pub fn pin_dir(&self) -> Option<&PinDir> {
        self.pins.as_ref().map(|(dir, _)| dir)
    }

    /// What loading found in the pin directory.
    pub fn pin_report(&self) -> Option<&PinReport> {
        self.pins.as_ref().map(|(_, report)| report)
    }

    /// The underlying loaded object, for the bench and tests that need extra maps/programs.
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The XDP program (for attaching and BPF_PROG_TEST_RUN).
    pub fn program(&self) -> Result<&Xdp, DatapathError> {
        self.xdp(names::PROGRAM)
    }

    pub fn program_mut(&mut self) -> Result<&mut Xdp, DatapathError> {
        self.xdp_mut(names::PROGRAM)
    }

    fn xdp(&self, name: &'static str) -> Result<&Xdp, DatapathError> {
        let prog = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::NoProgram(name))?;
        prog.try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    fn xdp_mut(&mut self, name: &'static str) -> Result<&mut Xdp, DatapathError> {
        let prog = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::NoProgram(name))?;
        prog.try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    /// Applies peers' records to the session table with the apply program (see
    /// [`table_runner`]): each against the local copy by the conflict rule, in the kernel.
    pub fn apply_records(
        &mut self,
        records: &[ApplyRecord],
        from: ApplySource,
        now_ns: u64,
    ) -> Result<ApplyOutcome, DatapathError> {
        table_runner::apply(self.xdp(names::APPLY_PROGRAM)?, records, from, now_ns)
    }

    /// The sessions of `keys`, in order (`None` where the table has none), read by the read
    /// program a batch per run: for many keys, far cheaper than [`Datapath::session`] each.
    pub fn read_sessions(
        &self,
        keys: &[FlowKey],
        out: &mut Vec<Option<Session>>,
    ) -> Result<(), DatapathError> {
        table_runner::read(self.xdp(names::READ_PROGRAM)?, keys, out)
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, DatapathError> {
        self.ebpf.map(name).ok_or(DatapathError::NoMap(name))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DatapathError> {
        self.ebpf.map_mut(name).ok_or(DatapathError::NoMap(name))
    }

    /// The SESSIONS map's data, for batch operations.
    pub fn sessions_map(&self) -> Result<&MapData, DatapathError> {
        match self.map(names::SESSIONS)? {
            aya::maps::Map::HashMap(data) => Ok(data),
            _ => Err(DatapathError::NoMap(names::SESSIONS)),
        }
    }

    /// Replaces the datapath config (timeouts, policy, local member); the EMBRYOS ring's
    /// size is the loaded map's and the session clock the measured one, whatever `cfg` says.
    pub fn set_config(&mut self, cfg: &DatapathConfig) -> Result<(), DatapathError> {
        let cfg = DatapathConfig {
            embryo_slots: self.embryos.per_cpu,
            embryo_replica_slots: self.embryos.local_slots(),
            embryo_replica_parts: self.embryos.replica_parts,
            embryo_cpus: self.embryos.cpus,
            fib_by_source: self.fib_by_source.map_or(cfg.fib_by_source, u8::from),
            fib_seed: self.fib_seed,
            ..JiffyClock::configure(self.clock, cfg)
        };
        let mut map: Array<_, DatapathConfig> =
            Array::try_from(self.map_mut(names::CONFIG)?).map_err(map_err(names::CONFIG))?;
        map.set(0, cfg, 0).map_err(map_err(names::CONFIG))?;
        Ok(())
    }

    /// Sets the config's [`DatapathConfig::claims_open`] (see `crate::claim_window`).
    pub fn set_claims_open(&mut self, open: bool) -> Result<(), DatapathError> {
        let cfg = DatapathConfig {
            claims_open: u8::from(open),
            ..self.config()?
        };
        self.set_config(&cfg)
    }

    pub fn config(&self) -> Result<DatapathConfig, DatapathError> {
        let map: Array<_, DatapathConfig> =
            Array::try_from(self.map(names::CONFIG)?).map_err(map_err(names::CONFIG))?;
        map.get(&0, 0).map_err(map_err(names::CONFIG))
    }

    /// The session clock the program reads (`None`: the coarse clock helper).
    pub fn clock(&self) -> Option<JiffyClock> {
        self.clock
    }

    /// Now, on the session clock as the program reads it (one run of the clock program).
    pub fn now_ns(&self) -> Result<u64, DatapathError> {
        let s = clock::sample(self.xdp(names::CLOCK_PROGRAM)?)?;
        Ok(self.clock.map_or(s.coarse_ns, |c| c.ns(s.jiffies)))
    }

    /// Checks the session clock against the kernel's, every [`clock::CHECK_EVERY`] at most
    /// (the sweep calls it, every step, holding the datapath: it compares the program's times
    /// with the agent's clock). A clock that drifted is measured again a sample per call, and
    /// the config rewritten once the samples span enough (before, the whole measurement, 120
    /// ms to 2 s, ran at once while the sweep held the datapath: no record was applied, no
    /// session read meanwhile; with NTP slewing the clock, about once a minute). Errors are
    /// logged: the clock is checked again next time.
    fn keep_clock(&mut self) {
        if !self.remeasuring.is_empty() {
            if let Err(error) = self.measure_on() {
                self.remeasuring.clear();
                tracing::warn!(error = %error_chain(&error), "measuring the session clock again failed");
            }
            return;
        }
        let now = Instant::now();
        let Some(clock) = self.clock.filter(|_| now >= self.clock_check) else {
            return;
        };
        self.clock_check = now + clock::CHECK_EVERY;
        if let Err(error) = self.recheck_clock(clock) {
            tracing::warn!(error = %error_chain(&error), "checking the session clock failed");
        }
    }

    /// [`Datapath::keep_clock`], a drifted clock measured at once, as at load: for a sweep
    /// nothing else waits on (the standalone agent's, whose sweeps may be minutes apart).
    fn keep_clock_at_once(&mut self) {
        self.keep_clock();
        for _ in 0..clock::MEASURE_LIMIT.as_millis() / clock::SAMPLE_EVERY.as_millis() {
            if self.remeasuring.is_empty() {
                break;
            }
            std::thread::sleep(clock::SAMPLE_EVERY);
            self.keep_clock();
        }
    }

    fn recheck_clock(&mut self, clock: JiffyClock) -> Result<(), DatapathError> {
        let prog = self.xdp(names::CLOCK_PROGRAM)?;
        let s = clock::sample(prog)?;
        if !clock.drifted(&s) {
            return Ok(());
        }
        tracing::warn!(
            deviation_us = clock.deviation_ns(&s) / 1000,
            "the kernel's jiffies drifted from the session clock: measuring it again"
        );
        self.remeasuring.push(s);
        Ok(())
    }

    /// One more sample of the measurement under way; once they span enough, the clock they
    /// fit is the program's (its config written first: the agent's changes only once the
    /// program reads it too) and then the agent's. Samples that fit no clock leave the one in
    /// use, checked again at the next check.
    fn measure_on(&mut self) -> Result<(), DatapathError> {
        // At a random point of the tick: steps come on a grid of whole ticks, and samples all
        // taken at one point of theirs could all fall between the kernel's two updates.
        if let Some(tick) = self
            .clock
            .map(|c| u64::from(c.ns_per_jiffy))
            .filter(|t| *t > 0)
        {
            std::thread::sleep(std::time::Duration::from_nanos(
                crate::random::random_u64() % tick,
            ));
        }
        let prog = self.xdp(names::CLOCK_PROGRAM)?;
        self.remeasuring.push(clock::sample(prog)?);
        if !clock::spans_enough(&self.remeasuring) {
            return Ok(());
        }
        let found = match clock::fit(&std::mem::take(&mut self.remeasuring)) {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(%error, "the session clock could not be measured again; the one in use stays");
                return Ok(());
            }
        };
        let cfg = self.config()?;
        let old = self.clock.replace(found);
        if let Err(e) = self.set_config(&cfg) {
            self.clock = old;
            return Err(e);
        }
        clock::remember(found);
        Ok(())
    }

    fn zones_map(&mut self) -> Result<Array<&mut MapData, ZoneBinding>, DatapathError> {
        Array::try_from(self.map_mut(names::ZONES)?).map_err(map_err(names::ZONES))
    }

    /// Binds ingress interface `ifindex` to a zone, with the zone's rules.
    pub fn set_zone(&mut self, ifindex: u32, zone: ZoneBinding) -> Result<(), DatapathError> {
        if ifindex >= names::ZONE_IFINDEX_LIMIT {
            return Err(DatapathError::IfindexTooLarge(ifindex));
        }
        self.zones_map()?
            .set(ifindex, zone, 0)
            .map_err(map_err(names::ZONES))
    }

    /// The zone binding of ingress interface `ifindex` (the default: none).
    pub fn zone_of(&mut self, ifindex: u32) -> Result<ZoneBinding, DatapathError> {
        self.zones_map()?
            .get(&ifindex, 0)
            .map_err(map_err(names::ZONES))
    }

    /// Unbinds every interface not in `keep` (left in a reused ZONES by an earlier config).
    /// Returns how many were unbound.
    pub fn retain_zones(&mut self, keep: &[u32]) -> Result<usize, DatapathError> {
        let mut map = self.zones_map()?;
        let mut unbound = 0;
        for ifindex in 0..names::ZONE_IFINDEX_LIMIT {
            let bound = map.get(&ifindex, 0).map_err(map_err(names::ZONES))?;
            if bound != ZoneBinding::default() && !keep.contains(&ifindex) {
                map.set(ifindex, ZoneBinding::default(), 0)
                    .map_err(map_err(names::ZONES))?;
                unbound += 1;
            }
        }
        Ok(unbound)
    }

    /// Records `zones` (names in id order) with the datapath. When it kept a pinned table,
    /// every zone the table's sessions may name must keep its id: a zone list that renames or
    /// reorders what was there is refused (one that adds zones at the end, or drops some from
    /// it, is not).
    pub fn record_zones(&mut self, zones: &[String]) -> Result<(), DatapathError> {
        self.check_zones(zones)?;
        let mut map: Array<_, [u8; names::ZONE_NAME_BYTES]> =
            Array::try_from(self.map_mut(names::ZONE_NAMES)?)
                .map_err(map_err(names::ZONE_NAMES))?;
        // Every entry, so nothing of a longer earlier list stays behind.
        for id in 0..names::MAX_ZONES {
            let now = zones
                .get(id as usize)
                .map_or([0; names::ZONE_NAME_BYTES], |z| zone_name_bytes(z));
            map.set(id, now, 0).map_err(map_err(names::ZONE_NAMES))?;
        }
        Ok(())
    }

    /// Refuses `zones` where they would renumber the zones a kept (pinned) table's sessions
    /// name by id: a zone recorded by the last agent must keep its id (zones may be added or
    /// dropped at the end). Reads only.
    fn check_zones(&self, zones: &[String]) -> Result<(), DatapathError> {
        if zones.len() > names::MAX_ZONES as usize {
            return Err(DatapathError::TooManyZones(zones.len()));
        }
        if !self.pin_report().is_some_and(|r| r.sessions_reused()) {
            return Ok(());
        }
        let map: Array<_, [u8; names::ZONE_NAME_BYTES]> =
            Array::try_from(self.map(names::ZONE_NAMES)?).map_err(map_err(names::ZONE_NAMES))?;
        for (id, now) in (0..names::MAX_ZONES).zip(zones) {
            let was = map.get(&id, 0).map_err(map_err(names::ZONE_NAMES))?;
            if was != [0; names::ZONE_NAME_BYTES] && was != zone_name_bytes(now) {
                return Err(DatapathError::ZonesReordered {
                    id: id as usize + 1,
                    was: String::from_utf8_lossy(&was)
                        .trim_end_matches('\0')
                        .to_owned(),
                    now: now.clone(),
                });
            }
        }
        Ok(())
    }

    /// Whether the takeover rule sees `member` alive.
    pub fn member_alive(&self, member: MemberId) -> Result<bool, DatapathError> {
        let map: Array<_, MemberEntry> =
            Array::try_from(self.map(names::MEMBERS)?).map_err(map_err(names::MEMBERS))?;
        let entry = map
            .get(&u32::from(member.0), 0)
            .map_err(map_err(names::MEMBERS))?;
        Ok(entry.alive != 0)
    }

    /// Marks `member` alive or not, as seen by the takeover rule.
    pub fn set_member_alive(&mut self, member: MemberId, alive: bool) -> Result<(), DatapathError> {
        if !member.is_valid() {
            return Err(DatapathError::MemberOutOfRange(member.0));
        }
        let mut map: Array<_, MemberEntry> =
            Array::try_from(self.map_mut(names::MEMBERS)?).map_err(map_err(names::MEMBERS))?;
        let entry = MemberEntry {
            alive: u8::from(alive),
            _pad: [0; 7],
        };
        map.set(u32::from(member.0), entry, 0)
            .map_err(map_err(names::MEMBERS))
    }

    /// The datapath counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        Ok(sum_counters(&self.per_cpu_counters()?))
    }

    /// A reader of the counters with a descriptor of its own: its reads need no hold of this
    /// value (which the sync engine keeps for each apply and each of the sender's reads).
    pub fn counters_reader(&self) -> Result<CountersReader, DatapathError> {
        let aya::maps::Map::PerCpuArray(data) = self.map(names::COUNTERS)? else {
            return Err(DatapathError::NoMap(names::COUNTERS));
        };
        let fd = own_fd(data, "duplicating the counters map's descriptor")?;
        let data = MapData::from_fd(fd).map_err(map_err(names::COUNTERS))?;
        let map = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
            .map_err(map_err(names::COUNTERS))?;
        let aya::maps::Map::Array(room) = self.map(names::REPLICA_ROOM)? else {
            return Err(DatapathError::NoMap(names::REPLICA_ROOM));
        };
        let pool = own_fd(room, "duplicating the peers' pool map's descriptor")?;
        Ok(CountersReader { map, pool })
    }

    /// Each CPU's counters value.
    pub fn per_cpu_counters(&self) -> Result<PerCpuValues<Counters>, DatapathError> {
        let map: PerCpuArray<_, Counters> =
            PerCpuArray::try_from(self.map(names::COUNTERS)?).map_err(map_err(names::COUNTERS))?;
        map.get(&0, 0).map_err(map_err(names::COUNTERS))
    }

    /// Logs the rare events the programs noted since the last call (see [`logger`]); returns
    /// how many. Nothing when `[local] datapath_log = "off"`.
    pub fn drain_log(&mut self) -> Result<usize, DatapathError> {
        if self.logger.is_none() {
            return Ok(0);
        }
        let counters = self.per_cpu_counters()?;
        self.drain_log_as_read(&counters)
    }

    /// [`Datapath::drain_log`] for the notes as they were in `counters`, read earlier: the
    /// programs may have noted newer events since, and those are what is logged.
    pub fn drain_log_as_read(
        &mut self,
        counters: &PerCpuValues<Counters>,
    ) -> Result<usize, DatapathError> {
        let prog: &Xdp = self
            .ebpf
            .program(names::LOG_PROGRAM)
            .ok_or(DatapathError::NoProgram(names::LOG_PROGRAM))?
            .try_into()
            .map_err(|source| DatapathError::Program {
                name: names::LOG_PROGRAM,
                source,
            })?;
        match self.logger.as_mut() {
            Some(logger) => logger.drain(prog, counters),
            None => Ok(0),
        }
    }

    /// One session by key.
    pub fn session(&self, key: &FlowKey) -> Result<Option<Session>, DatapathError> {
        let map: HashMap<_, FlowKey, Session> =
            HashMap::try_from(self.map(names::SESSIONS)?).map_err(map_err(names::SESSIONS))?;
        match map.get(key, 0) {
            Ok(s) => Ok(Some(s)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(names::SESSIONS)(e)),
        }
    }

    /// SESSIONS, checked for batch operations.
    fn sessions_batch(&self) -> Result<BatchMap<'_, FlowKey, Session>, DatapathError> {
        BatchMap::new(self.sessions_map()?.fd().as_fd()).map_err(batch_err(names::SESSIONS))
    }

    /// Walks the session table in chunks of at most `chunk` sessions (a hash bucket is never
    /// split, so rarely a few more), calling `f` with each. Returns the number of sessions seen.
    /// Sessions created or removed during the walk may or may not be seen; none is seen twice.
    pub fn sessions_chunked(
        &self,
        chunk: u32,
        f: impl FnMut(&[FlowKey], &[Session]),
    ) -> Result<u64, DatapathError> {
        self.sessions_batch()?
            .for_each_chunk(chunk, f)
            .map_err(batch_err(names::SESSIONS))
    }

    /// A reader of the session table of its own (the map's file descriptor, duplicated): it
    /// walks the table without this `Datapath`, so a long walk holds no lock of the agent's.
    pub fn session_reader(&self) -> Result<SessionReader, DatapathError> {
        let fd = own_fd(
            self.sessions_map()?,
            "duplicating the session table's descriptor",
        )?;
        Ok(SessionReader { fd })
    }

    /// Reads the next chunk of the session table at `cursor` into `keys`/`values` (see
    /// [`BatchMap::lookup_batch`]); returns whether more may follow. Lets a caller walk the
    /// table without holding anything across chunks (a full sync sends each chunk before
    /// reading the next).
    pub fn session_chunk(
        &self,
        cursor: &mut batch::BatchCursor,
        keys: &mut Vec<FlowKey>,
        values: &mut Vec<Session>,
        max: u32,
    ) -> Result<bool, DatapathError> {
        self.sessions_batch()?
            .lookup_batch(cursor, keys, values, max)
            .map_err(batch_err(names::SESSIONS))
    }

    /// The whole session table. Memory grows with the table: for tests and `show`, not for the
    /// agent's own work (use [`Self::sessions_chunked`]).
    pub fn sessions(&self) -> Result<Vec<(FlowKey, Session)>, DatapathError> {
        let mut all = Vec::new();
        self.sessions_chunked(DEFAULT_CHUNK, |keys, values| {
            all.extend(keys.iter().copied().zip(values.iter().copied()));
        })?;
        Ok(all)
    }

    /// Inserts or replaces sessions with batch updates.
    pub fn insert_sessions(&mut self, entries: &[(FlowKey, Session)]) -> Result<(), DatapathError> {
        let map = self.sessions_batch()?;
        // Split into key and value arrays a chunk at a time, so memory stays bounded.
        let mut keys = Vec::with_capacity(entries.len().min(DEFAULT_CHUNK as usize));
        let mut values = Vec::with_capacity(keys.capacity());
        for part in entries.chunks(DEFAULT_CHUNK as usize) {
            keys.clear();
            values.clear();
            for (k, v) in part {
                keys.push(*k);
                values.push(*v);
            }
            map.update_batch(&keys, &values, 0)
                .map_err(batch_err(names::SESSIONS))?;
        }
        Ok(())
    }

    /// Deletes sessions with batch deletes; keys not in the table are skipped. Returns how many
    /// were deleted.
    pub fn delete_sessions(&mut self, keys: &[FlowKey]) -> Result<usize, DatapathError> {
        self.sessions_batch()?
            .delete_batch(keys)
            .map_err(batch_err(names::SESSIONS))
    }

    /// Removes sessions idle past their state's timeout (from the live CONFIG), `chunk` at a
    /// time; `on_removed` gets each chunk's removals (see [`sweep`]). Checks the session clock
    /// first, at most every [`clock::CHECK_EVERY`].
    pub fn sweep(
        &mut self,
        chunk: u32,
        on_removed: impl FnMut(&[Removed]),
    ) -> Result<SweepReport, DatapathError> {
        self.keep_clock_at_once();
        let cfg = self.config()?;
        sweep::sweep(&*self, &cfg, chunk, on_removed)
    }

    /// Takes the EVENTS ring buffer out of the program's maps. Only once: a second call fails
    /// with [`DatapathError::NoMap`].
    pub fn take_events(&mut self) -> Result<EventStream, DatapathError> {
        let map = self
            .ebpf
            .take_map(names::EVENTS)
            .ok_or(DatapathError::NoMap(names::EVENTS))?;
        let ring = RingBuf::try_from(map).map_err(map_err(names::EVENTS))?;
        Ok(EventStream::new(ring))
    }
}

/// One line for what the pin directory held, and a warning per replaced map.
fn log_pin_report(pins: &PinDir, report: &PinReport, asked_capacity: u32) {
    let PinReport {
        dir: _,
        reused,
        replaced,
        created,
        kept_capacity,
    } = report;
    for (map, why) in replaced {
        tracing::warn!(
            map,
            why = %why,
            "a pinned map had another layout (an upgrade changed it); replaced by an empty one"
        );
    }
    if report.zone_order_unchecked() {
        tracing::warn!(
            "the session table was kept but not the zone names its sessions were made with: \
             the order of [[zones]] cannot be checked against them (sessions name zones by \
             position); if it changed since, run `hasync teardown` (it drops the sessions)"
        );
    }
    if let Some(kept) = kept_capacity {
        tracing::warn!(
            pinned = kept,
            configured = asked_capacity,
            "the pinned session table keeps its capacity; `hasync teardown` (which drops the \
             sessions) is needed to resize it"
        );
    }
    tracing::info!(
        dir = %pins.root().display(),
        reused = %reused.join(","),
        created = %created.join(","),
        "datapath maps pinned"
    );
}

/// The oldest kernel the programs load on: the table programs are loaded with XDP fragments
/// allowed (5.18) and walk their items with `bpf_loop` (5.17).
pub const MIN_KERNEL: KernelVersion = KernelVersion::new(5, 18, 0);

/// `e`, a failure to load the datapath, said to be the kernel's age's where it may be: the
/// kernel refused the object or a program and `running` is older than [`MIN_KERNEL`].
fn kernel_hint(e: DatapathError, running: KernelVersion) -> DatapathError {
    let kernels = matches!(e, DatapathError::Load(_) | DatapathError::Program { .. });
    if kernels && running < MIN_KERNEL {
        DatapathError::KernelTooOld {
            found: running,
            source: Box::new(e),
        }
    } else {
        e
    }
}

fn batch_err(map: &'static str) -> impl FnOnce(BatchError) -> DatapathError {
    move |source| DatapathError::Batch { map, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock that drifted is measured again a sample per check (each a run of the clock
    /// program under the caller's hold), not all at once: before, the first check measured for
    /// 120 ms to 2 s while the sweep held the datapath (seen failing: corrected in one call).
    /// Once the samples span enough, the program's config and the agent carry the clock again.
    #[test]
    fn a_drifted_clock_is_measured_again_a_sample_per_check() {
        let mut dp = testing::datapath();
        let Some(right) = dp.clock() else {
            eprintln!("skipped: this kernel's jiffies follow no known tick");
            return;
        };
        let wrong = JiffyClock {
            offset_ns: right
                .offset_ns
                .wrapping_add(10 * u64::from(right.ns_per_jiffy)),
            ..right
        };
        dp.clock = Some(wrong);
        dp.clock_check = Instant::now();
        dp.keep_clock();
        assert_eq!(
            (dp.clock(), dp.remeasuring.len()),
            (Some(wrong), 1),
            "the first check takes one sample"
        );
        let mut checks = 1;
        while dp.clock() == Some(wrong) && checks < 500 {
            std::thread::sleep(std::time::Duration::from_millis(10));
            dp.keep_clock();
            checks += 1;
            assert!(dp.remeasuring.len() <= checks, "more than a sample a check");
        }
        let found = dp.clock().expect("a clock");
        assert_eq!(found.ns_per_jiffy, right.ns_per_jiffy);
        assert!(
            found.offset_ns.abs_diff(right.offset_ns) <= u64::from(right.ns_per_jiffy),
            "{found:?} against {right:?}"
        );
        let cfg = dp.config().expect("config");
        assert_eq!(cfg.jiffies_offset_ns, found.offset_ns);
        // A sweep nothing else waits on (the standalone agent's) measures it at once.
        dp.clock = Some(wrong);
        dp.clock_check = Instant::now();
        dp.keep_clock_at_once();
        assert_ne!(dp.clock(), Some(wrong), "measured in one call");
        assert!(dp.remeasuring.is_empty());
    }

    /// A walk of one member's sessions sees all of them, and no one else's.
    #[test]
    fn a_walk_of_one_members_sessions_sees_those_only() {
        use crate::control::testing::Flow;
        let mut dp = testing::datapath();
        let flows = [(1, 40_000), (2, 40_001), (1, 40_002)]
            .map(|(owner, port)| Flow::tcp("198.18.0.10", port, "198.18.1.10", 443).owner(owner));
        let entries: Vec<(FlowKey, Session)> = flows.iter().map(Flow::entry).collect();
        dp.insert_sessions(&entries).expect("insert");
        let reader = dp.session_reader().expect("reader");
        let mut seen = Vec::new();
        reader
            .each_owned_by(MemberId(1), |k, s| seen.push((*k, s.owner)))
            .expect("walk");
        seen.sort_by_key(|(k, _)| (k.port_lo, k.port_hi));
        let mut want: Vec<(FlowKey, MemberId)> = [&entries[0], &entries[2]]
            .iter()
            .map(|(k, s)| (*k, s.owner))
            .collect();
        want.sort_by_key(|(k, _)| (k.port_lo, k.port_hi));
        assert_eq!(seen, want);
    }

    /// A program the kernel refused is said to be the kernel's age's on kernels older than
    /// 5.18, and only there; a config error stays what it is.
    #[test]
    fn a_refused_program_on_an_old_kernel_names_the_kernel() {
        let refused = || DatapathError::Program {
            name: names::APPLY_PROGRAM,
            source: ProgramError::NotLoaded,
        };
        let said = kernel_hint(refused(), KernelVersion::new(5, 17, 9)).to_string();
        assert!(
            said.starts_with(
                "loading the datapath failed on Linux 5.17.9: hasync needs Linux 5.18.0 or later"
            ) && said.contains(names::APPLY_PROGRAM),
            "{said}"
        );
        for running in [KernelVersion::new(5, 18, 0), KernelVersion::new(6, 18, 0)] {
            assert!(matches!(
                kernel_hint(refused(), running),
                DatapathError::Program { .. }
            ));
        }
        let config = kernel_hint(
            DatapathError::CapacityOutOfRange(0),
            KernelVersion::new(5, 10, 0),
        );
        assert!(matches!(config, DatapathError::CapacityOutOfRange(0)));
    }

    /// The counters reader has a descriptor of its own on the same map: frames run after it
    /// was opened show in its reads exactly as in the datapath's own.
    #[test]
    fn a_counters_reader_reads_the_live_counters() {
        use hasync_common::Counter;
        let dp = testing::datapath();
        let reader = dp.counters_reader().expect("a reader");
        let before = reader.counters().expect("read").get(Counter::Packets);
        for port in 0..3 {
            let frame = testing::udp_frame([198, 18, 0, 1], 1000 + port, [198, 18, 0, 2], 53);
            testing::test_run(&dp, &frame);
        }
        let after = reader.counters().expect("read");
        assert_eq!(after.get(Counter::Packets), before + 3);
        assert_eq!(after.values, dp.counters().expect("counters").values);
    }

    #[test]
    fn the_embryo_ring_is_cut_per_cpu_with_a_replica_part_per_member() {
        let ring = EmbryoRing::new(None, 8, 1024, 2, 3).expect("default share");
        assert_eq!(
            (ring.per_cpu, ring.local_slots(), ring.slots()),
            (64, 128, 512)
        );
        // Every CPU gets a slot, whatever the share.
        let ring = EmbryoRing::new(Some(1), 8, 1024, 4, 1).expect("tiny");
        assert_eq!((ring.per_cpu, ring.slots()), (1, 8));
        // This member's own may take half the table, not more.
        assert!(EmbryoRing::new(Some(512), 8, 1024, 2, 1).is_some());
        assert_eq!(EmbryoRing::new(Some(513), 8, 1024, 2, 1), None);
        // Every member's own (one part per member id) take half the table at most: a pinned
        // table kept smaller than the configured one must not hold more. Seen failing (a ring
        // of three 256-slot parts in a 1024-session table) before.
        assert_eq!(EmbryoRing::new(Some(256), 8, 1024, 2, 3), None);
        assert!(EmbryoRing::new(Some(170), 8, 1024, 2, 3).is_some());
        // No more parts than member ids.
        let ring = EmbryoRing::new(None, 32, 1024, 1, 200).expect("parts");
        assert_eq!(ring.replica_parts, MemberId::MAX);
    }

    #[test]
    fn error_chains_show_the_errno_once() {
        let errno = |e| std::io::Error::from_raw_os_error(e);
        let batch = DatapathError::Batch {
            map: names::SESSIONS,
            source: BatchError::Syscall {
                op: batch::BatchOp::Delete,
                done: 3,
                source: errno(libc::EPERM),
            },
        };
        let text = error_chain(&batch);
        assert!(text.starts_with("map `SESSIONS`: BPF_MAP_DELETE_BATCH failed after 3 elements: "));
        assert_eq!(text.matches("(os error 1)").count(), 1, "{text}");

        let aya = ProgramError::SyscallError(aya::sys::SyscallError {
            call: "bpf_link_create",
            io_error: errno(libc::EOPNOTSUPP),
        });
        assert!(
            error_chain(&aya).ends_with("(os error 95)"),
            "{}",
            error_chain(&aya)
        );
    }
}

#[cfg(test)]
mod verifier_tests {
    use super::*;

    /// The kernel's limit on instructions processed while verifying one program.
    const KERNEL_LIMIT: u32 = 1_000_000;

    /// Every program verifies at every log level with a quarter of the kernel's limit to
    /// spare: a small change can multiply the verifier's states (a 40-byte apply header
    /// instead of 32 took the apply program from 455,000 instructions past the limit), and a
    /// program past it does not load at all. The figures are printed.
    #[test]
    fn every_program_verifies_well_under_the_kernels_limit() {
        for log in DatapathLog::ALL {
            let mut opts = DatapathOptions::new(MemberId(1));
            opts.session_capacity = 4096;
            opts.config = DatapathConfig::with_defaults(MemberId(1));
            opts.log = log;
            let dp = Datapath::load(&opts).expect("load (tests need root)");
            for name in PROGRAMS {
                let info = dp.xdp(name).and_then(|p| {
                    p.info()
                        .map_err(|source| DatapathError::Program { name, source })
                });
                let verified = info
                    .expect("program info")
                    .verified_instruction_count()
                    .expect("the kernel says how many instructions it verified");
                eprintln!("{name} at {log:?}: {verified} instructions verified");
                assert!(
                    verified <= KERNEL_LIMIT / 4 * 3,
                    "{name} at {log:?}: {verified} instructions verified, near the kernel's limit of {KERNEL_LIMIT}"
                );
            }
        }
    }
}
