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

/// Entry of the REPLICA_ROOM array, indexed by member id: how many of that member's sessions
/// this member may still make assured copies of. Peers' assured replicas are never evicted, so
/// without a bound one peer (a lying one, or one with a larger table) could fill the whole
/// table and leave no room for this member's own flows.
///
/// The apply program counts in `added` every record that makes an assured copy of the
/// member's session where the table held none (new, embryonic, or another owner's), and
/// refuses such records once `added` reaches `limit`. The agent sets `limit` after each pass
/// of its sweep over the table: `added` as the pass started, plus the member's limit less the
/// assured copies the pass counted. Copies made during the pass are counted in `added` from
/// its start, whether or not the walk saw them, so the table never holds more than the limit
/// (copies that left it meanwhile give their room back at the next pass).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ReplicaRoom {
    /// Assured copies made by the apply program since the datapath was loaded.
    pub added: u64,
    /// `added` may not reach this.
    pub limit: u64,
}
crate::assert_size!(ReplicaRoom, 16);
