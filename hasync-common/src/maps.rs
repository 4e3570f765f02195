//! Names and sizes of the maps the XDP program declares, so the agent uses the same ones.

/// LRU hash: `FlowKey` → `Session`.
pub const SESSIONS: &str = "SESSIONS";
/// Array of one `DatapathConfig`.
pub const CONFIG: &str = "CONFIG";
/// Array indexed by ingress ifindex → `ZoneBinding` (zone 0: the interface is in no zone): an
/// array, so the lookup every packet makes is inlined by the verifier.
pub const ZONES: &str = "ZONES";
/// Array indexed by member id → `MemberEntry`.
pub const MEMBERS: &str = "MEMBERS";
/// Per-CPU array of one `Counters`.
pub const COUNTERS: &str = "COUNTERS";
/// Ring buffer of `Event`s.
pub const EVENTS: &str = "EVENTS";
/// Array of `EmbryoSlot`: the admission ring of embryonic sessions (see
/// [`crate::session::EmbryoSlot`]): first one part of `DatapathConfig::embryo_replica_slots`
/// per member id (`DatapathConfig::embryo_replica_parts`, member 1 first) for peers'
/// replicas, so one member's flood can evict only its own replicas; then one part of
/// `DatapathConfig::embryo_slots` per possible CPU for the sessions traffic creates here. The
/// agent sizes it at load time.
pub const EMBRYOS: &str = "EMBRYOS";
/// Per-CPU array of one `u64`: the tickets each CPU's part of the EMBRYOS ring handed out.
pub const EMBRYO_HEAD: &str = "EMBRYO_HEAD";
/// Array of one `u64` per member id: the tickets each replica part of the EMBRYOS ring handed
/// out to records that came without their owner's ticket (only the apply program writes it,
/// and the agent runs it one batch at a time).
pub const REPLICA_EMBRYO_HEAD: &str = "REPLICA_EMBRYO_HEAD";
/// Array of one `ReplicaRoom`: the peers' pool of the session table (written by the apply
/// program and by the agent, both under the agent's hold of the datapath). Not pinned: an
/// agent counts the table at start.
pub const REPLICA_ROOM: &str = "REPLICA_ROOM";
/// LRU hash: `FragmentKey` → when its first fragment passed (`u64`, session clock ns).
pub const FRAGMENTS: &str = "FRAGMENTS";
/// Fragmented datagrams remembered at once (the oldest is forgotten first).
pub const FRAGMENTS_CAPACITY: u32 = 8192;
/// How long after its first fragment a datagram's later fragments pass (reassembly gives up
/// after 30 s by default; fragments of one datagram arrive within milliseconds).
pub const FRAGMENT_WINDOW_NS: u64 = 10_000_000_000;
/// Array of the zone names (`[u8; ZONE_NAME_BYTES]`, zero-padded) in id order, id 1 first:
/// sessions record zones by id, so an agent that reuses a pinned table checks that every zone
/// keeps its id. The program does not read it.
pub const ZONE_NAMES: &str = "ZONE_NAMES";
/// Bytes a zone name takes in ZONE_NAMES (names are 1–31 characters).
pub const ZONE_NAME_BYTES: usize = 32;
/// Zones ZONE_NAMES holds, as many as a hello may name.
pub const MAX_ZONES: u32 = 1024;
/// DEVMAP_HASH: egress ifindex → the same interface, for the interfaces of the zones that
/// take XDP redirects (the agent checks each device's XDP features): where `Forwarding::Xdp`
/// may send a packet. An egress missing here goes to the kernel.
pub const FWD_PORTS: &str = "FWD_PORTS";
/// DEVMAP_HASH: ingress ifindex of a virtual-wire end → the other end.
pub const VWIRE_PORTS: &str = "VWIRE_PORTS";
/// Array indexed by ingress ifindex → `IngressMac`: the addresses of the routed zone
/// interfaces, which XDP forwarding compares a frame's destination with.
pub const INGRESS_MACS: &str = "INGRESS_MACS";
/// Interfaces FWD_PORTS and VWIRE_PORTS hold at most.
pub const PORTS_CAPACITY: u32 = 256;
/// Per-CPU array of `FibEntry`, the XDP forwarding's FIB cache (node-local): direct-mapped,
/// each key in the slot [`crate::fib::slot`] names, which it shares with the keys that hash
/// there (the last one looked up holds it).
pub const FIB_CACHE: &str = "FIB_CACHE";
/// Slots of FIB_CACHE, per CPU; a power of two.
pub const FIB_CACHE_SLOTS: u32 = 4096;
/// Array of one `u32`: the FIB generation, bumped by the agent on every route or neighbour
/// change; a FIB_CACHE entry of another generation is looked up again.
pub const FIB_GENERATION: &str = "FIB_GENERATION";
/// Name of the XDP program in the object.
pub const PROGRAM: &str = "hasync";
/// Name of the table program that applies peers' records to the session table (run by
/// BPF_PROG_TEST_RUN, never attached; see `crate::table_programs`). Programs are not pinned:
/// every agent loads them anew from its own object, so this name may change between versions
/// (it was `hasync_install`).
pub const APPLY_PROGRAM: &str = "hasync_apply";
/// Name of the table program that reads sessions for the sender (run like the apply program).
pub const READ_PROGRAM: &str = "hasync_read";
/// Name of the program that samples the kernel's clocks for the agent (run like the table
/// programs; see `crate::ClockSample`).
pub const CLOCK_PROGRAM: &str = "hasync_clock";
/// Logs the rare events the other programs noted (see [`crate::LogNote`]): run by the agent
/// with BPF_PROG_TEST_RUN, never attached.
pub const LOG_PROGRAM: &str = "hasync_log";
/// The ring buffer aya-log's records go through (aya-log's own name for it).
pub const AYA_LOGS: &str = "AYA_LOGS";
/// The global that sets the programs' log level (aya-log's own name for it), written before
/// load.
pub const AYA_LOG_LEVEL: &str = "AYA_LOG_LEVEL";

/// Default capacity of SESSIONS; the agent may resize it at load time.
pub const DEFAULT_SESSION_CAPACITY: u32 = 1 << 20;
/// Default share of the session table that embryonic sessions may take: one eighth.
pub const EMBRYONIC_SHARE: u32 = 8;
/// Size of the EVENTS ring buffer in bytes (a power of two, multiple of the page size).
pub const EVENTS_BYTES: u32 = 8 << 20;
/// Interfaces with an ifindex below this can be bound to a zone (the size of ZONES).
pub const ZONE_IFINDEX_LIMIT: u32 = 1 << 16;
/// Ring-buffer bytes one event takes: the record and its 8-byte header.
pub const EVENTS_RECORD_BYTES: u64 = core::mem::size_of::<crate::Event>() as u64 + 8;
/// Bytes queued at which the program wakes the consumer: only the event that crosses this
/// mark forces a wake-up, so wake-ups come in batches of 64 events and a consumer that falls
/// behind is not woken once per packet (the agent also polls on a short timer).
pub const EVENTS_WAKEUP_BATCH_BYTES: u64 = 64 * EVENTS_RECORD_BYTES;
