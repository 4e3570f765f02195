//! The datapath: loads the XDP program, fills its maps, reads its counters and sessions.
//!
//! The SESSIONS map is the session table; nothing here keeps a copy of it.

use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, Xdp},
    Ebpf, EbpfError, EbpfLoader,
};
use hasync_common::{
    maps as names, Counters, DatapathConfig, FlowKey, MemberEntry, MemberId, Session, ZoneId,
};

/// Errors of the datapath module.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the XDP object failed: {0}")]
    Load(#[from] EbpfError),
    #[error("the XDP object has no program `{0}`")]
    NoProgram(&'static str),
    #[error("the XDP object has no map `{0}`")]
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
    #[error("member id {0} is out of range 1–16")]
    MemberOutOfRange(u8),
    #[error("session capacity {0} is out of range 1–{max}", max = MAX_SESSION_CAPACITY)]
    CapacityOutOfRange(u32),
}

/// Largest SESSIONS capacity accepted (64 Mi entries, about 9 GiB of kernel memory).
pub const MAX_SESSION_CAPACITY: u32 = 1 << 26;

/// What to load.
#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// Capacity of the SESSIONS LRU hash.
    pub session_capacity: u32,
    /// Written to CONFIG before the program can see traffic.
    pub config: DatapathConfig,
}

impl DatapathOptions {
    pub fn new(local: MemberId) -> Self {
        DatapathOptions {
            session_capacity: names::DEFAULT_SESSION_CAPACITY,
            config: DatapathConfig::with_defaults(local),
        }
    }
}

/// A loaded XDP program and its maps.
pub struct Datapath {
    ebpf: Ebpf,
    capacity: u32,
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

impl Datapath {
    /// Loads the embedded program, sizes its maps and writes the config. Not attached yet.
    pub fn load(opts: &DatapathOptions) -> Result<Self, DatapathError> {
        Self::load_object(crate::EBPF_OBJECT, opts)
    }

    /// Loads `object` (the product's or a bench build with the same maps).
    pub fn load_object(object: &[u8], opts: &DatapathOptions) -> Result<Self, DatapathError> {
        if opts.session_capacity == 0 || opts.session_capacity > MAX_SESSION_CAPACITY {
            return Err(DatapathError::CapacityOutOfRange(opts.session_capacity));
        }
        let ebpf = EbpfLoader::new()
            .map_max_entries(names::SESSIONS, opts.session_capacity)
            .load(object)?;
        let mut dp = Datapath {
            ebpf,
            capacity: opts.session_capacity,
        };
        dp.set_config(&opts.config)?;
        let prog = dp.program_mut()?;
        prog.load().map_err(|source| DatapathError::Program {
            name: names::PROGRAM,
            source,
        })?;
        Ok(dp)
    }

    /// Capacity of the session table.
    pub fn capacity(&self) -> u32 {
        self.capacity
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
        let prog = self
            .ebpf
            .program(names::PROGRAM)
            .ok_or(DatapathError::NoProgram(names::PROGRAM))?;
        prog.try_into().map_err(|source| DatapathError::Program {
            name: names::PROGRAM,
            source,
        })
    }

    pub fn program_mut(&mut self) -> Result<&mut Xdp, DatapathError> {
        let prog = self
            .ebpf
            .program_mut(names::PROGRAM)
            .ok_or(DatapathError::NoProgram(names::PROGRAM))?;
        prog.try_into().map_err(|source| DatapathError::Program {
            name: names::PROGRAM,
            source,
        })
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
            aya::maps::Map::LruHashMap(data) => Ok(data),
            _ => Err(DatapathError::NoMap(names::SESSIONS)),
        }
    }

    /// Replaces the datapath config (timeouts, policy, local member).
    pub fn set_config(&mut self, cfg: &DatapathConfig) -> Result<(), DatapathError> {
        let mut map: Array<_, DatapathConfig> =
            Array::try_from(self.map_mut(names::CONFIG)?).map_err(map_err(names::CONFIG))?;
        map.set(0, cfg, 0).map_err(map_err(names::CONFIG))
    }

    pub fn config(&self) -> Result<DatapathConfig, DatapathError> {
        let map: Array<_, DatapathConfig> =
            Array::try_from(self.map(names::CONFIG)?).map_err(map_err(names::CONFIG))?;
        map.get(&0, 0).map_err(map_err(names::CONFIG))
    }

    /// Binds ingress interface `ifindex` to `zone`.
    pub fn set_zone(&mut self, ifindex: u32, zone: ZoneId) -> Result<(), DatapathError> {
        let mut map: HashMap<_, u32, ZoneId> =
            HashMap::try_from(self.map_mut(names::ZONES)?).map_err(map_err(names::ZONES))?;
        map.insert(ifindex, zone, 0).map_err(map_err(names::ZONES))
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
        let map: PerCpuArray<_, Counters> =
            PerCpuArray::try_from(self.map(names::COUNTERS)?).map_err(map_err(names::COUNTERS))?;
        let per_cpu = map.get(&0, 0).map_err(map_err(names::COUNTERS))?;
        let mut total = Counters::default();
        for cpu in per_cpu.iter() {
            for (t, v) in total.values.iter_mut().zip(cpu.values.iter()) {
                *t = t.wrapping_add(*v);
            }
        }
        Ok(total)
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
}
