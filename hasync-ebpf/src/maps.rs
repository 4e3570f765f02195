//! The maps of the product program. Names match `hasync_common::maps`; sizes are defaults the
//! agent may change at load time.

use crate::forward::FibScratch;
use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use hasync_common::{
    maps::{
        DEFAULT_SESSION_CAPACITY, EMBRYONIC_SHARE, EVENTS_BYTES, FIB_CACHE_SLOTS,
        FRAGMENTS_CAPACITY, MAX_ZONES, PORTS_CAPACITY, ZONE_IFINDEX_LIMIT, ZONE_NAME_BYTES,
    },
    member::MEMBER_SLOTS,
    Counters, DatapathConfig, EmbryoSlot, FibEntry, FlowKey, FragmentKey, IngressMac, MemberEntry,
    ReplicaRoom, Session, ZoneBinding,
};

/// A plain hash, not an LRU: nothing leaves it silently. Embryonic sessions are bounded and
/// evicted by the EMBRYOS ring (see `crate::embryo`); the others leave by expiry or close.
#[map]
pub static SESSIONS: HashMap<FlowKey, Session> =
    HashMap::with_max_entries(DEFAULT_SESSION_CAPACITY, 0);

#[map]
pub static EMBRYOS: Array<EmbryoSlot> =
    Array::with_max_entries(DEFAULT_SESSION_CAPACITY / EMBRYONIC_SHARE, 0);

#[map]
pub static EMBRYO_HEAD: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static REPLICA_EMBRYO_HEAD: Array<u64> = Array::with_max_entries(MEMBER_SLOTS, 0);

#[map]
pub static REPLICA_ROOM: Array<ReplicaRoom> = Array::with_max_entries(1, 0);

#[map]
pub static FRAGMENTS: LruHashMap<FragmentKey, u64> =
    LruHashMap::with_max_entries(FRAGMENTS_CAPACITY, 0);

#[map]
pub static CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

#[map]
pub static ZONES: Array<ZoneBinding> = Array::with_max_entries(ZONE_IFINDEX_LIMIT, 0);

#[map]
pub static ZONE_NAMES: Array<[u8; ZONE_NAME_BYTES]> = Array::with_max_entries(MAX_ZONES, 0);

#[map]
pub static MEMBERS: Array<MemberEntry> = Array::with_max_entries(MEMBER_SLOTS, 0);

#[map]
pub static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
pub static FWD_PORTS: DevMapHash = DevMapHash::with_max_entries(PORTS_CAPACITY, 0);

#[map]
pub static INGRESS_MACS: Array<IngressMac> = Array::with_max_entries(ZONE_IFINDEX_LIMIT, 0);

#[map]
pub static VWIRE_PORTS: DevMapHash = DevMapHash::with_max_entries(PORTS_CAPACITY, 0);

#[map]
pub static FIB_CACHE: PerCpuArray<FibEntry> = PerCpuArray::with_max_entries(FIB_CACHE_SLOTS, 0);

#[map]
pub static FIB_GENERATION: Array<u32> = Array::with_max_entries(1, 0);

/// Where a FIB_CACHE entry is built before it is stored: off the 512-byte stack.
#[map]
pub static FIB_SCRATCH: PerCpuArray<FibScratch> = PerCpuArray::with_max_entries(1, 0);

/// Where an IPv4 header's options are copied to have their checksum summed
/// (`crate::parse`): off the 512-byte stack.
#[map]
pub static IPV4_OPTIONS: PerCpuArray<[u32; 16]> = PerCpuArray::with_max_entries(1, 0);

/// The type of the ICMP query being handled on this CPU: the parser writes it, the new
/// session's route check reads it in the same run ([`crate::parse::is_icmp_reply`]). Kept
/// out of the packet's stack copy: a value there that TCP and UDP packets lack keeps the
/// verifier from merging their paths (+160,000 instructions verified).
#[map]
pub static ICMP_QUERY_TYPE: PerCpuArray<u8> = PerCpuArray::with_max_entries(1, 0);
