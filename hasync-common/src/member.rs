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
