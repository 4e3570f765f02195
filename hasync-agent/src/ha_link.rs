//! The two sync links a member has to each peer: HA4 and HA4 backup. Named here, apart from
//! the wire format and the membership rules, because both speak of them.

/// Which sync link a connection runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinkKind {
    Ha4 = 0,
    Ha4Backup = 1,
}

impl LinkKind {
    pub const fn name(self) -> &'static str {
        match self {
            LinkKind::Ha4 => "ha4",
            LinkKind::Ha4Backup => "ha4-backup",
        }
    }

    /// The link with this wire number, if any.
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(LinkKind::Ha4),
            1 => Some(LinkKind::Ha4Backup),
            _ => None,
        }
    }
}
