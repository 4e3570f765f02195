//! The MEMBERS map: what the XDP program knows about each cluster member.

/// Entry of the MEMBERS array, indexed by member id (0–16; index 0 is unused).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MemberEntry {
    /// 1 when the member is alive (keepalives arriving), 0 otherwise. A session whose owner is
    /// not alive is taken over by the member that sees its traffic.
    pub alive: u8,
    /// Padding; zero.
    pub _pad: [u8; 7],
}
crate::assert_size!(MemberEntry, 8);

/// Number of MEMBERS entries: member ids 1–16 index directly.
pub const MEMBER_SLOTS: u32 = crate::ids::MemberId::MAX as u32 + 1;

/// The one entry of the REPLICA_ROOM array: the peers' pool of the session table. Assured
/// sessions are never evicted, so without a bound what peers send (a lying peer's made-up
/// sessions, a peer with a larger table, a full sync bigger than this table) could fill it and
/// leave no room for this member's own flows. The pool holds the assured sessions written from
/// peers' records and not taken over since (`SessionFlags::FROM_PEER`): whoever owns them, so a
/// failover between peers (an owner's copies handed to another) moves nothing in or out.
///
/// The apply program takes room for every assured copy it writes where the table held none (a
/// new one, or over an embryonic copy or a session of this member's own), refuses such records
/// and new embryonic copies while `held` is at `limit`, and gives room back for each copy it
/// deletes. The agent gives back what its sweep deletes and counts the table again, under the
/// same hold, at start and then periodically: that catches what the fast path changes (copies
/// it takes over or makes assured, expired copies it replaces) and what a failed write took.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ReplicaRoom {
    /// Assured copies in the pool.
    pub held: u64,
    /// `held` may not pass this (`[local] replica_limit`).
    pub limit: u64,
}
crate::assert_size!(ReplicaRoom, 16);
