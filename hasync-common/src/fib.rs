//! The forwarding cache of the XDP program (`Forwarding::Xdp`): what a FIB lookup found for a
//! destination, kept per ingress interface and destination, and valid while the agent's FIB
//! generation (bumped on every route or neighbour change) has not moved. Node-local: never
//! synced; a member that takes a session over fills its own.

/// The key of FIB_CACHE.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FibKey {
    /// Destination address in network byte order (IPv4: first word, the rest zero).
    pub dst: [u32; 4],
    /// The interface the packets come in on (the lookup's input interface).
    pub ifindex: u32,
    /// A [`crate::Family`] as `u8`.
    pub family: u8,
    /// Padding; zero.
    pub _pad: [u8; 3],
}
crate::assert_size!(FibKey, 24);

/// The value of FIB_CACHE: where packets to the key's destination leave, and how.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FibEntry {
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
    /// Padding; zero.
    pub _pad: [u8; 2],
}
crate::assert_size!(FibEntry, 24);
