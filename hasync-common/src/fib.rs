//! The forwarding cache of the XDP program (`Forwarding::Xdp`): what a FIB lookup found for a
//! source and destination coming in on an interface. An entry holds while the agent's FIB
//! generation (bumped on route, rule, neighbour, address and link changes) has not moved and
//! for at most [`FIB_ENTRY_LIFETIME_NS`], so it stays right when the agent is not there to
//! bump. Node-local: never synced; a member that takes a session over fills its own.

use crate::ids::ZoneId;

/// The longest an entry is used without a new lookup.
pub const FIB_ENTRY_LIFETIME_NS: u64 = 2_000_000_000;

/// The key of FIB_CACHE. The source is part of it because the lookup uses it (policy routing,
/// multipath hashing on addresses).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FibKey {
    /// Destination address in network byte order (IPv4: first word, the rest zero).
    pub dst: [u32; 4],
    /// Source address, the same way; zero when nothing here routes by source
    /// (`DatapathConfig::fib_by_source`).
    pub src: [u32; 4],
    /// The interface the packets come in on (the lookup's input interface).
    pub ifindex: u32,
    /// A [`crate::Family`] as `u8`.
    pub family: u8,
    /// Padding; zero.
    pub _pad: [u8; 3],
}
crate::assert_size!(FibKey, 40);

/// The value of FIB_CACHE: where packets of the key leave, and how.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FibEntry {
    /// The key again: an LRU map reuses an element at once, so a reader checks that the copy
    /// it took is the one it asked for.
    pub key: FibKey,
    /// Session clock: after this the entry is looked up again.
    pub expires_ns: u64,
    /// The FIB generation the entry was looked up in; stale when FIB_GENERATION differs.
    pub generation: u32,
    /// Egress interface.
    pub ifindex: u32,
    /// The largest IP packet the route takes (the route's MTU, else the device's).
    pub mtu: u16,
    /// Source MAC: the egress interface's.
    pub smac: [u8; 6],
    /// Destination MAC: the next hop's.
    pub dmac: [u8; 6],
    /// The zone of the egress interface ([`ZoneId::NONE`]: in none).
    pub zone: ZoneId,
}
crate::assert_size!(FibEntry, 72);
