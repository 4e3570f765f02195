//! Installing sessions received from peers.
//!
//! The agent hands records to the `hasync_install` program as BPF_PROG_TEST_RUN data: an
//! [`InstallHeader`] followed by up to [`INSTALL_BATCH`] [`InstallRecord`]s. For each record the
//! program looks the key up, applies [`resolve`] against the local copy and writes the outcome
//! to the table, then writes what it did back into the header. Deciding in the kernel, next to
//! the table, costs one hash walk per record instead of a lookup syscall plus a write, and
//! leaves no window between reading the local copy and replacing it.
//!
//! What does not depend on the local copy (zones, records naming this member) is decided by
//! the agent before a record gets here.
//!
//! The sending side reads sessions the same way: a [`ReadHeader`] and up to [`READ_BATCH`]
//! [`ReadSlot`]s holding keys, which the `hasync_read` program fills with the sessions' current
//! state: one program run per batch instead of one lookup syscall per session.

use crate::{ids::MemberId, session::Session, FlowKey};

/// What a record asks for.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstallOp {
    /// Install or update the session.
    Upsert = 1,
    /// The sender no longer holds the session.
    Delete = 2,
}

/// One record for the install program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct InstallRecord {
    /// Key of the session.
    pub key: FlowKey,
    /// The session as it would be installed (zone and clock already local). For a delete,
    /// only `owner` counts: the member that no longer holds it.
    pub session: Session,
    /// An [`InstallOp`] as `u8`.
    pub op: u8,
    /// 1: `session.ticket` is the owner's admission ticket (an embryonic session from a peer
    /// that sends them), which places the replica in the slot of the owner's part that mirrors
    /// the owner's own; 0: the owner's part hands out the next ticket.
    pub owner_ticket: u8,
    /// Padding; zero.
    pub _pad: [u8; 6],
}
crate::assert_size!(InstallRecord, 136);

impl InstallRecord {
    /// The record doing `op` with `session` under `key`: with the owner's admission ticket
    /// (in `session.ticket`) when `owner_ticket`.
    pub const fn new(key: FlowKey, session: Session, op: InstallOp, owner_ticket: bool) -> Self {
        InstallRecord {
            key,
            session,
            op: op as u8,
            owner_ticket: owner_ticket as u8,
            _pad: [0; 6],
        }
    }
}

/// The batch header: what the agent says, then what the program did.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct InstallHeader {
    /// Records that follow.
    pub count: u32,
    /// A full sync from this member is running ([`MemberId::NONE`] otherwise): its replicas
    /// kept as they are get marked as seen (see [`Resolution::Mark`]).
    pub reconciling: MemberId,
    /// Padding; zero.
    pub _pad: [u8; 3],
    /// Now, on the session clock (the mark).
    pub now_ns: u64,
    /// Written by the program.
    pub outcome: InstallOutcome,
}
crate::assert_size!(InstallHeader, 32);

/// What the program did with a batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct InstallOutcome {
    /// Sessions inserted or replaced.
    pub installed: u32,
    /// Sessions removed by a delete.
    pub deleted: u32,
    /// Records that lost to the local copy (including deletes of sessions not held by the
    /// sender, and replicas marked as seen by a full sync).
    pub kept: u32,
    /// Records refused because the session table was full (nothing was evicted for them).
    pub full: u32,
}
crate::assert_size!(InstallOutcome, 16);

impl InstallOutcome {
    /// Adds the counts of `o` (one batch) to these.
    pub fn add(&mut self, o: &InstallOutcome) {
        self.installed += o.installed;
        self.deleted += o.deleted;
        self.kept += o.kept;
        self.full += o.full;
    }
}

/// Bytes of test-run data a batch program takes: what fits the linear part of one page
/// beside the kernel's XDP headroom and shared info, with room to spare.
pub const INSTALL_MAX_BYTES: usize = 3072;
/// Records per install program run.
pub const INSTALL_BATCH: usize = (INSTALL_MAX_BYTES - core::mem::size_of::<InstallHeader>())
    / core::mem::size_of::<InstallRecord>();
const _: () = assert!(INSTALL_BATCH >= 16);

/// The header of a read batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ReadHeader {
    /// Slots that follow.
    pub count: u32,
    /// Written by the program: slots found in the table.
    pub found: u32,
}
crate::assert_size!(ReadHeader, 8);

/// One key to read; the program fills `session` and sets `found` when the table holds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ReadSlot {
    /// Key to look up.
    pub key: FlowKey,
    /// Written by the program: the session, when found.
    pub session: Session,
    /// Written by the program: 1 when the table holds the key.
    pub found: u8,
    /// Padding; zero.
    pub _pad: [u8; 7],
}
crate::assert_size!(ReadSlot, 136);

/// Slots per read program run.
pub const READ_BATCH: usize =
    (INSTALL_MAX_BYTES - core::mem::size_of::<ReadHeader>()) / core::mem::size_of::<ReadSlot>();

/// What to do with one record, given the local copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Not held here: insert it.
    Insert,
    /// The record wins over the local copy: replace it.
    Replace,
    /// Remove the local copy.
    Delete,
    /// The local copy stays.
    Keep,
    /// The local copy stays and is marked as seen by the running full sync from its owner
    /// (its node-local `last_event_ns` set to now), so the end of that full sync does not
    /// remove it.
    Mark,
}

/// How much later than the local copy was last seen a record's session must have been created
/// to count as a new flow on the same 5-tuple, whatever the versions say (the clocks are both
/// local here; the margin covers transmission and millisecond rounding).
pub const RECREATED_AFTER_NS: u64 = 1_000_000_000;

/// Is version `a` later than `b` in serial-number arithmetic (RFC 1982): the versions of one
/// session keep increasing and wrap, so `u32::MAX` is older than 1, not newer than everything.
#[inline(always)]
pub const fn version_after(a: u32, b: u32) -> bool {
    a != b && (a.wrapping_sub(b) as i32) > 0
}

/// Does `a` win over `b`? Of one owner, a session created after the other was last seen is a
/// new flow on the same 5-tuple (the owner lost the old one, and its removal did not reach us)
/// and wins whatever the versions say. Otherwise the later version (serial arithmetic), then
/// the higher owner id. (Only the same owner: another member cannot take a session over by
/// claiming to have created it anew.)
#[inline(always)]
pub fn newer(a: &Session, b: &Session) -> bool {
    if a.owner.0 == b.owner.0 {
        if a.created_ns > b.last_seen_ns.saturating_add(RECREATED_AFTER_NS) {
            return true;
        }
        if b.created_ns > a.last_seen_ns.saturating_add(RECREATED_AFTER_NS) {
            return false;
        }
    }
    if a.version == b.version {
        a.owner.0 > b.owner.0
    } else {
        version_after(a.version, b.version)
    }
}

/// The conflict rule: the newer session wins ([`newer`]); a delete applies only to a session
/// still held by the member that sent it, and not to a later version of it (a delete's
/// version 0 means "whatever version the sender had"). `reconciling` is the member whose
/// full sync is running, or [`MemberId::NONE`].
#[inline(always)]
pub fn resolve(
    op: u8,
    incoming: &Session,
    existing: Option<&Session>,
    reconciling: MemberId,
) -> Resolution {
    let Some(s) = existing else {
        return if op == InstallOp::Upsert as u8 {
            Resolution::Insert
        } else {
            Resolution::Keep
        };
    };
    if op == InstallOp::Delete as u8 {
        let stale = incoming.version != 0 && version_after(s.version, incoming.version);
        return if s.owner.0 == incoming.owner.0 && !stale {
            Resolution::Delete
        } else {
            Resolution::Keep
        };
    }
    if newer(incoming, s) {
        return Resolution::Replace;
    }
    if reconciling.0 != 0 && s.owner.0 == reconciling.0 && incoming.owner.0 == reconciling.0 {
        return Resolution::Mark;
    }
    Resolution::Keep
}

/// Is `s` a replica of `owner`'s session that the full sync started at `mark_ns` neither
/// installed nor marked (so `owner` no longer holds it)?
#[inline(always)]
pub fn unseen_replica(s: &Session, owner: MemberId, mark_ns: u64) -> bool {
    s.owner.0 == owner.0 && s.flags.has(crate::SessionFlags::FROM_PEER) && s.last_event_ns < mark_ns
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(version: u32, owner: u8) -> Session {
        Session {
            version,
            owner: MemberId(owner),
            ..Session::default()
        }
    }

    const UP: u8 = InstallOp::Upsert as u8;
    const DEL: u8 = InstallOp::Delete as u8;

    #[test]
    fn higher_version_then_higher_owner_wins() {
        let none = MemberId::NONE;
        assert_eq!(resolve(UP, &s(3, 2), None, none), Resolution::Insert);
        assert_eq!(
            resolve(UP, &s(3, 2), Some(&s(2, 3)), none),
            Resolution::Replace
        );
        assert_eq!(
            resolve(UP, &s(3, 2), Some(&s(3, 1)), none),
            Resolution::Replace
        );
        assert_eq!(
            resolve(UP, &s(3, 2), Some(&s(3, 2)), none),
            Resolution::Keep
        );
        assert_eq!(
            resolve(UP, &s(3, 2), Some(&s(3, 3)), none),
            Resolution::Keep
        );
        assert_eq!(
            resolve(UP, &s(3, 2), Some(&s(4, 1)), none),
            Resolution::Keep
        );
    }

    #[test]
    fn a_delete_applies_only_to_the_senders_session() {
        let none = MemberId::NONE;
        assert_eq!(resolve(DEL, &s(0, 2), None, none), Resolution::Keep);
        assert_eq!(
            resolve(DEL, &s(0, 2), Some(&s(9, 2)), none),
            Resolution::Delete
        );
        assert_eq!(
            resolve(DEL, &s(0, 2), Some(&s(1, 3)), none),
            Resolution::Keep
        );
    }

    #[test]
    fn versions_compare_with_wrap_around() {
        let none = MemberId::NONE;
        // u32::MAX does not win every later conflict: 1 came after it.
        assert_eq!(
            resolve(UP, &s(1, 2), Some(&s(u32::MAX, 2)), none),
            Resolution::Replace
        );
        assert_eq!(
            resolve(UP, &s(u32::MAX, 2), Some(&s(1, 2)), none),
            Resolution::Keep
        );
        // A version half the space ahead is not "newer" forever either.
        assert!(version_after(5, 3));
        assert!(!version_after(3, 5));
        assert!(!version_after(7, 7));
        assert!(version_after(0x8000_0000, 1));
        assert!(!version_after(0x8000_0001, 1));
    }

    #[test]
    fn a_recreated_flow_is_newer_than_the_expired_copy() {
        let none = MemberId::NONE;
        let sec = 1_000_000_000u64;
        let old = Session {
            created_ns: 10 * sec,
            last_seen_ns: 20 * sec,
            ..s(500, 2)
        };
        let recreated = Session {
            created_ns: 60 * sec,
            last_seen_ns: 61 * sec,
            ..s(1, 2)
        };
        assert_eq!(
            resolve(UP, &recreated, Some(&old), none),
            Resolution::Replace
        );
        assert_eq!(resolve(UP, &old, Some(&recreated), none), Resolution::Keep);
        // Overlapping lifetimes: the versions decide.
        let overlapping = Session {
            created_ns: 20 * sec,
            ..recreated
        };
        assert_eq!(
            resolve(UP, &overlapping, Some(&old), none),
            Resolution::Keep
        );
        // Another member cannot take the session over by claiming a new flow.
        let claimed = Session {
            owner: MemberId(3),
            ..recreated
        };
        assert_eq!(resolve(UP, &claimed, Some(&old), none), Resolution::Keep);
    }

    #[test]
    fn a_delete_does_not_remove_a_later_version() {
        let none = MemberId::NONE;
        assert_eq!(
            resolve(DEL, &s(4, 2), Some(&s(5, 2)), none),
            Resolution::Keep
        );
        assert_eq!(
            resolve(DEL, &s(5, 2), Some(&s(5, 2)), none),
            Resolution::Delete
        );
        assert_eq!(
            resolve(DEL, &s(0, 2), Some(&s(5, 2)), none),
            Resolution::Delete
        );
    }

    #[test]
    fn a_full_sync_marks_the_senders_replicas_it_keeps() {
        let two = MemberId(2);
        assert_eq!(resolve(UP, &s(3, 2), Some(&s(3, 2)), two), Resolution::Mark);
        // Someone else's copy, or a record for someone else: not the sender's replica.
        assert_eq!(resolve(UP, &s(3, 2), Some(&s(4, 3)), two), Resolution::Keep);
        assert_eq!(resolve(UP, &s(3, 3), Some(&s(3, 3)), two), Resolution::Keep);
        // A newer record is installed (which marks it too: it is fresh).
        assert_eq!(
            resolve(UP, &s(4, 2), Some(&s(3, 2)), two),
            Resolution::Replace
        );
    }
}
