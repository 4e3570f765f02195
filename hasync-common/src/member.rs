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
/// peers' records (`Session::in_replica_pool`), whoever owns them (this member's own sent back
/// into its fresh table too), so a failover between peers (an owner's copies handed to another)
/// moves nothing in or out.
///
/// The apply program refuses a record that would add to the pool, and a new embryonic copy
/// where the table holds none, while `held` is at `limit`; after each write and delete it
/// counts what entered or left the pool. The agent gives back what its sweep deletes and
/// counts the table again at load and periodically, beside its hold of the datapath: `held`
/// becomes what the walk found plus what the apply program added meanwhile (`added`), which
/// catches what the fast path changed (copies it took over or made assured, expired copies it
/// replaced).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ReplicaRoom {
    /// Copies in the pool.
    pub held: u64,
    /// `held` may not pass this (`[local] replica_limit`).
    pub limit: u64,
    /// Copies the apply program ever added to the pool (wrapping): what a walk beside the apply
    /// program may have missed.
    pub added: u64,
}
crate::assert_size!(ReplicaRoom, 24);
