//! Records the XDP program sends to userspace through the EVENTS ring buffer.

use crate::{flow::FlowKey, session::Session};

/// What happened to a session.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A packet without a live session created one.
    Created = 1,
    /// The session's state changed (other than to `Closed`).
    StateChanged = 2,
    /// TCP reached `Closed` (both FINs and the ACK after them, or a RST).
    Closed = 3,
    /// This member took over a session whose owner was no longer alive.
    OwnershipTaken = 4,
    /// The session saw traffic (at most once per refresh interval per session).
    Refresh = 5,
    /// An embryonic session was evicted to admit a newer one (the session as it was).
    Evicted = 6,
}

impl EventKind {
    /// The kind whose `u8` value is `v`, if any.
    pub const fn from_u8(v: u8) -> Option<EventKind> {
        Some(match v {
            1 => EventKind::Created,
            2 => EventKind::StateChanged,
            3 => EventKind::Closed,
            4 => EventKind::OwnershipTaken,
            5 => EventKind::Refresh,
            6 => EventKind::Evicted,
            _ => return None,
        })
    }

    /// Name used in logs.
    pub const fn name(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::StateChanged => "state-changed",
            EventKind::Closed => "closed",
            EventKind::OwnershipTaken => "ownership-taken",
            EventKind::Refresh => "refresh",
            EventKind::Evicted => "evicted",
        }
    }
}

/// One ring-buffer record: the key and a snapshot of the session after the change.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Event {
    /// Key of the session.
    pub key: FlowKey,
    /// The session after the change.
    pub session: Session,
    /// An [`EventKind`] as `u8`.
    pub kind: u8,
    /// Padding; zero.
    pub _pad: [u8; 7],
}
crate::assert_size!(Event, 136);
