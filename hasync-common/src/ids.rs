//! Small identifier types, so a member id is never mistaken for a zone id or a cluster id.

/// A cluster member, 1–16. 0 means "none" (an unconfigured datapath).
#[repr(transparent)]
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    bytemuck::Pod,
    bytemuck::Zeroable,
)]
pub struct MemberId(pub u8);

impl MemberId {
    /// No member (an unconfigured datapath).
    pub const NONE: MemberId = MemberId(0);
    /// Highest member id a cluster may use.
    pub const MAX: u8 = 16;

    /// Is this an id a cluster may use (1–[`MAX`](Self::MAX))?
    #[inline(always)]
    pub const fn is_valid(self) -> bool {
        self.0 >= 1 && self.0 <= Self::MAX
    }
}

/// A security zone, as agreed by name between members. 0 means "no zone" (the ingress interface
/// is not in any zone).
#[repr(transparent)]
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    bytemuck::Pod,
    bytemuck::Zeroable,
)]
pub struct ZoneId(pub u16);

impl ZoneId {
    /// No zone.
    pub const NONE: ZoneId = ZoneId(0);
    /// A session's reply zone when the routing table says its replies never come in through a
    /// zone: its destination is routed out of an interface in no zone, or is local to this
    /// host (whose answers it sends itself, never through XDP). A reply that comes in through
    /// a zone then does not match. Never a configured zone's id (there are at most
    /// `maps::MAX_ZONES`), never synced.
    pub const UNZONED: ZoneId = ZoneId(u16::MAX);
}

/// A cluster, 1–99. Every hello names it, and a member refuses a peer of another cluster; the
/// datapath never sees it.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterId(pub u8);

impl ClusterId {
    /// Lowest cluster id.
    pub const MIN: u8 = 1;
    /// Highest cluster id.
    pub const MAX: u8 = 99;

    /// Is this an id a cluster may use ([`MIN`](Self::MIN)–[`MAX`](Self::MAX))?
    pub const fn is_valid(self) -> bool {
        self.0 >= Self::MIN && self.0 <= Self::MAX
    }
}

impl core::fmt::Display for ClusterId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl core::fmt::Display for MemberId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.0)
    }
}

crate::assert_size!(ClusterId, 1);
crate::assert_size!(MemberId, 1);
crate::assert_size!(ZoneId, 2);
