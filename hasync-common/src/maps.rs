//! Names and sizes of the maps the XDP program declares, so the agent uses the same ones.

/// LRU hash: `FlowKey` → `Session`.
pub const SESSIONS: &str = "SESSIONS";
/// Array of one `DatapathConfig`.
pub const CONFIG: &str = "CONFIG";
/// Hash: ingress ifindex (`u32`) → `ZoneId`.
pub const ZONES: &str = "ZONES";
/// Array indexed by member id → `MemberEntry`.
pub const MEMBERS: &str = "MEMBERS";
/// Per-CPU array of one `Counters`.
pub const COUNTERS: &str = "COUNTERS";
/// Ring buffer of `Event`s.
pub const EVENTS: &str = "EVENTS";
/// Name of the XDP program in the object.
pub const PROGRAM: &str = "hasync";

/// Default capacity of SESSIONS; the agent may resize it at load time.
pub const DEFAULT_SESSION_CAPACITY: u32 = 1 << 20;
/// Size of the EVENTS ring buffer in bytes (a power of two, multiple of the page size).
pub const EVENTS_BYTES: u32 = 8 << 20;
/// Maximum number of zone-bound interfaces.
pub const MAX_ZONE_INTERFACES: u32 = 256;
/// Bytes queued (each record has an 8-byte header) at which the program asks the kernel to wake the consumer; below
/// it, wake-ups are batched (the agent also polls on a short timer).
pub const EVENTS_WAKEUP_BATCH_BYTES: u64 = 64 * (core::mem::size_of::<crate::Event>() as u64 + 8);
