//! The conflict rule: which of two copies of a session wins, and what a peer's record does to
//! the local copy. The apply program runs it in the kernel, next to the table (see
//! [`crate::table_programs`]); the agent's tests and fuzzers run the same code.

use crate::{
    config::DatapathConfig,
    ids::MemberId,
    session::{Session, SessionFlags},
    table_programs::{ApplyOp, ApplySource},
};

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
    /// The local copy stays: the record would hand it to another owner while its owner is
    /// alive here and it still sees traffic ([`claimable`]).
    RefuseClaim,
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
/// and wins whatever the versions say; so does the owner's own record over a copy another
/// member handed on ([`SessionFlags::HANDED_ON`]): the owner is the authority on its sessions,
/// and a relayed copy at a version far ahead would otherwise keep its records out for good.
/// Otherwise the later version (serial arithmetic), then the higher owner id. (Only the same
/// owner: another member cannot take a session over by claiming to have created it anew.)
///
/// `a_from_owner` is 1 if `a` came from its owner itself, else 0: its owner's records arrive
/// in the order it sent them, each with its latest state, so then `b` is never a flow created
/// after `a`, whatever their times say. A record's times are relative (ages) and anchored here
/// when it is applied, so a record delayed in transit (TCP retransmissions on a lossy link, a
/// full send queue) makes its copy look created later than it was: by more than a second, the
/// owner's next record of the same flow lost to that copy as "older than a re-created flow",
/// for good. A number, not a bool, so that it is used without a branch: the apply program's
/// verifier walks both sides of every branch for each record of a batch (a branch here took
/// it from 455,000 instructions verified to 965,000, of the kernel's 1,000,000).
#[inline(always)]
pub fn newer(a: &Session, b: &Session, a_from_owner: u64) -> bool {
    if a.owner.0 == b.owner.0 {
        // All ones when `a` is from its owner and `b` was handed on: then `a` wins.
        let handed_on = u64::from(b.flags.has(SessionFlags::HANDED_ON));
        let owner_over_relay = 0u64.wrapping_sub(a_from_owner & handed_on);
        if a.created_ns | owner_over_relay > b.last_seen_ns.saturating_add(RECREATED_AFTER_NS) {
            return true;
        }
        // All ones from the owner: no creation time is later than that.
        let never = 0u64.wrapping_sub(a_from_owner & 1);
        if b.created_ns > a.last_seen_ns.saturating_add(RECREATED_AFTER_NS) | never {
            return false;
        }
    }
    if a.version == b.version {
        a.owner.0 > b.owner.0
    } else {
        version_after(a.version, b.version)
    }
}

/// May a record hand the local copy `s` to another owner? Versions alone cannot say: any
/// authenticated peer can name itself the owner at a higher version, and a delete of its own
/// then removes the session everywhere, its owner's table included. A genuine takeover comes
/// from a member that saw the flow's packets after it found the owner dead, a keepalive
/// threshold after the owner last spoke; so the copy may change hands only when its owner is
/// not alive here (`owner_alive`: the local member always is), when the flow has been quiet
/// for [`DatapathConfig::claim_quiet_ms`], or while the copy is
/// [`SessionFlags::CONTESTABLE`] (just taken over: two members that both took the flow over,
/// its two directions crossing them, settle it by version). Quiet: no packet here, and, for
/// a peer's session, no refresh due from its owner either (an owner announces a flow that
/// still runs at least once per refresh interval, at most [`crate::config::REFRESH_MAX_NS`]
/// unless `refresh_interval_ns` is longer; until the next one is due, the flow may still be
/// running there).
///
/// While a peer is just back (after a partition, a stop or a restart), or this agent after a
/// stall its peers may have taken for its death (for
/// [`crate::config::CLAIMS_OPEN_AFTER_RETURN_MS`]), the agent sets
/// [`DatapathConfig::claims_open`], and the quiet time is not waited out:
/// what each side took over while the two could not see each other arrives then, both sides'
/// owners alive and their flows live, and the version settles them, as before.
#[inline(always)]
pub fn claimable(cfg: &DatapathConfig, s: &Session, owner_alive: bool, now_ns: u64) -> bool {
    // No wait while claims are open (without a branch: the apply program's verifier walks
    // both sides of every branch for each record of a batch).
    let waits = u64::from(cfg.claims_open == 0);
    let quiet_ns = cfg.claim_quiet_ns() * waits;
    // The longest any state's refresh interval is (one figure for all: the state's own took
    // the apply program's verification from 455,000 instructions to 807,000).
    let period = cfg.refresh_interval_ns.max(crate::config::REFRESH_MAX_NS);
    let refresh_due = s.last_event_ns.saturating_add(period);
    let heard = if s.owner.0 == cfg.local_member.0 || s.last_seen_ns > refresh_due {
        s.last_seen_ns
    } else {
        refresh_due
    };
    !owner_alive
        || s.flags.has(SessionFlags::CONTESTABLE)
        || now_ns.saturating_sub(heard) >= quiet_ns
}

/// The conflict rule: the newer session wins ([`newer`]), but a record that would hand the
/// local copy to another owner only when `claimable` ([`claimable`]); a delete applies only
/// to a session still held by the member that sent it, and not to a later version of it (a
/// delete's version 0 means "whatever version the sender had"); a restore
/// ([`ApplyOp::Restore`]) only fills a gap. `from` names the sender and the member whose full
/// sync is running.
#[inline(always)]
pub fn resolve(
    op: u8,
    incoming: &Session,
    existing: Option<&Session>,
    from: ApplySource,
    claimable: bool,
) -> Resolution {
    let ApplySource {
        sender,
        reconciling,
    } = from;
    let Some(s) = existing else {
        return if op == ApplyOp::Upsert as u8 || op == ApplyOp::Restore as u8 {
            Resolution::Insert
        } else {
            Resolution::Keep
        };
    };
    if op == ApplyOp::Restore as u8 {
        return Resolution::Keep;
    }
    // 1 if the sender is known and owns the session, else 0, without a branch.
    let from_owner = (1 ^ nonzero(sender.0 ^ incoming.owner.0)) & nonzero(sender.0);
    if op == ApplyOp::Delete as u8 {
        // A later version here is kept, unless it was handed on and the owner deletes.
        let over_relay = from_owner & u64::from(s.flags.has(SessionFlags::HANDED_ON)) != 0;
        let stale = incoming.version != 0 && version_after(s.version, incoming.version);
        return if s.owner.0 == incoming.owner.0 && (!stale || over_relay) {
            Resolution::Delete
        } else {
            Resolution::Keep
        };
    }
    if newer(incoming, s, from_owner) {
        return if claimable || incoming.owner.0 == s.owner.0 {
            Resolution::Replace
        } else {
            Resolution::RefuseClaim
        };
    }
    if reconciling.0 != 0 && s.owner.0 == reconciling.0 && incoming.owner.0 == reconciling.0 {
        return Resolution::Mark;
    }
    Resolution::Keep
}

/// 1 if `x` is not 0, else 0, without a branch.
#[inline(always)]
const fn nonzero(x: u8) -> u64 {
    (x as u64 + 0xff) >> 8
}

/// Does the owner's removal of `s` (a delete record, or a full sync that no longer carries it)
/// leave it here, orphaned ([`crate::SessionFlags::ORPHANED`]), for this member to take over on
/// its next packet? When this member carries the flow: `s` is a replica it saw packets of while
/// the owner was alive (asymmetric), assured, not closed, and live here at `now_ns` (its last
/// packet here within its timeout). The owner then saw none of it for a whole timeout: the flow
/// moved here. Anything else goes, as the owner decided.
#[inline(always)]
pub fn orphaned_by_removal(cfg: &DatapathConfig, s: &Session, now_ns: u64) -> bool {
    s.owner.0 != cfg.local_member.0
        && s.flags.has(crate::SessionFlags::ASYMMETRIC)
        && s.is_assured()
        && s.state != crate::State::Closed as u8
        && !crate::session::expired(now_ns, s.last_seen_ns, cfg.timeout_ns(s.state))
}

/// Is `s` a replica of `owner`'s session that the full sync started at `mark_ns` neither
/// wrote nor marked (so `owner` no longer holds it)?
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

    const UP: u8 = ApplyOp::Upsert as u8;
    const DEL: u8 = ApplyOp::Delete as u8;

    #[test]
    fn higher_version_then_higher_owner_wins() {
        let none = ApplySource::NONE;
        assert_eq!(resolve(UP, &s(3, 2), None, none, true), Resolution::Insert);
        assert_eq!(
            resolve(UP, &s(3, 2), Some(&s(2, 3)), none, true),
            Resolution::Replace
        );
        assert_eq!(
            resolve(UP, &s(3, 2), Some(&s(3, 1)), none, true),
            Resolution::Replace
        );
        assert_eq!(
            resolve(UP, &s(3, 2), Some(&s(3, 2)), none, true),
            Resolution::Keep
        );
        assert_eq!(
            resolve(UP, &s(3, 2), Some(&s(3, 3)), none, true),
            Resolution::Keep
        );
        assert_eq!(
            resolve(UP, &s(3, 2), Some(&s(4, 1)), none, true),
            Resolution::Keep
        );
    }

    /// A session of ours handed back by a peer fills a gap only: whatever copy is here (ours,
    /// made since a restart, or another owner's) stays, however new the record. Before, it
    /// was an upsert whose owner matched ours, and a key holder's full sync into a fresh table
    /// rewrote this member's live sessions (and, marked contestable, then claimed them).
    #[test]
    fn a_restore_fills_a_gap_only() {
        let none = ApplySource::NONE;
        let restore = ApplyOp::Restore as u8;
        assert_eq!(
            resolve(restore, &s(9, 1), None, none, true),
            Resolution::Insert
        );
        for here in [s(3, 1), s(3, 2), s(12, 1)] {
            assert_eq!(
                resolve(restore, &s(9, 1), Some(&here), none, true),
                Resolution::Keep,
                "{here:?}"
            );
        }
    }

    /// A newer record of another owner replaces the local copy only when the copy may change
    /// hands; of the same owner, it does whatever the copy.
    #[test]
    fn a_copy_changes_hands_only_when_claimable() {
        let none = ApplySource::NONE;
        let claimed = |ok| resolve(UP, &s(9, 2), Some(&s(3, 1)), none, ok);
        assert_eq!(claimed(true), Resolution::Replace);
        assert_eq!(claimed(false), Resolution::RefuseClaim);
        assert_eq!(
            resolve(UP, &s(9, 1), Some(&s(3, 1)), none, false),
            Resolution::Replace
        );
        assert_eq!(
            resolve(UP, &s(2, 2), Some(&s(3, 1)), none, false),
            Resolution::Keep,
            "older: kept anyway"
        );
    }

    /// The owner alive here, a copy that saw a packet within the quiet time and was not just
    /// taken over cannot change hands; its owner dead here, a quiet copy, or one just taken
    /// over can; a peer's copy is quiet only once its owner's refresh is overdue; a config
    /// from before the field (0) never waits.
    #[test]
    fn a_claim_waits_for_a_dead_owner_or_a_quiet_flow() {
        let cfg = DatapathConfig {
            claim_quiet_ms: 10_000,
            ..DatapathConfig::with_defaults(MemberId(1))
        };
        let now = 100_000_000_000;
        let copy = |seen_ms_ago: u64, flags: u16| Session {
            last_seen_ns: now - seen_ms_ago * 1_000_000,
            flags: SessionFlags(flags),
            ..s(3, 2)
        };
        assert!(!claimable(&cfg, &copy(9_999, 0), true, now));
        assert!(
            claimable(&cfg, &copy(9_999, 0), false, now),
            "owner dead here"
        );
        assert!(claimable(&cfg, &copy(10_000, 0), true, now), "quiet");
        let contested = SessionFlags::CONTESTABLE;
        assert!(
            claimable(&cfg, &copy(0, contested), true, now),
            "just taken over"
        );
        let taken = SessionFlags::TAKEN_OVER;
        assert!(
            !claimable(&cfg, &copy(0, taken), true, now),
            "taken over long ago"
        );
        // A peer's copy: quiet only once its owner's next refresh is overdue by the quiet time.
        let replica = |record_ms_ago: u64| Session {
            last_event_ns: now - record_ms_ago * 1_000_000,
            state: crate::State::Established as u8,
            ..copy(60_000, 0)
        };
        let refresh_ms = crate::config::REFRESH_MAX_NS / 1_000_000;
        assert!(!claimable(&cfg, &replica(refresh_ms + 9_999), true, now));
        assert!(claimable(&cfg, &replica(refresh_ms + 10_000), true, now));
        let older = DatapathConfig {
            claim_quiet_ms: 0,
            ..cfg
        };
        assert!(claimable(&older, &copy(0, 0), true, now));
        let open = DatapathConfig {
            claims_open: 1,
            ..cfg
        };
        assert!(
            claimable(&open, &copy(0, 0), true, now),
            "claims open: no wait"
        );
    }

    #[test]
    fn a_delete_applies_only_to_the_senders_session() {
        let none = ApplySource::NONE;
        assert_eq!(resolve(DEL, &s(0, 2), None, none, true), Resolution::Keep);
        assert_eq!(
            resolve(DEL, &s(0, 2), Some(&s(9, 2)), none, true),
            Resolution::Delete
        );
        assert_eq!(
            resolve(DEL, &s(0, 2), Some(&s(1, 3)), none, true),
            Resolution::Keep
        );
    }

    /// A copy another member handed on gives way to its owner's own records, session or
    /// removal, whatever its version; against anyone else's it is an ordinary copy.
    #[test]
    fn a_handed_on_copy_gives_way_to_its_owner_only() {
        let from = |id| ApplySource {
            sender: MemberId(id),
            reconciling: MemberId::NONE,
        };
        let ahead = 5u32.wrapping_add(0x7fff_ffff);
        let mut handed = s(ahead, 3);
        handed.flags.0 |= SessionFlags::HANDED_ON;
        let h = Some(&handed);
        assert_eq!(resolve(UP, &s(6, 3), h, from(3), true), Resolution::Replace);
        assert_eq!(resolve(UP, &s(6, 3), h, from(2), true), Resolution::Keep);
        assert_eq!(resolve(DEL, &s(6, 3), h, from(3), true), Resolution::Delete);
        assert_eq!(resolve(DEL, &s(6, 3), h, from(2), true), Resolution::Keep);
        let plain = s(ahead, 3);
        assert_eq!(
            resolve(UP, &s(6, 3), Some(&plain), from(3), true),
            Resolution::Keep
        );
        assert_eq!(
            resolve(DEL, &s(6, 3), Some(&plain), from(3), true),
            Resolution::Keep
        );
    }

    #[test]
    fn versions_compare_with_wrap_around() {
        let none = ApplySource::NONE;
        // u32::MAX does not win every later conflict: 1 came after it.
        assert_eq!(
            resolve(UP, &s(1, 2), Some(&s(u32::MAX, 2)), none, true),
            Resolution::Replace
        );
        assert_eq!(
            resolve(UP, &s(u32::MAX, 2), Some(&s(1, 2)), none, true),
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
        let none = ApplySource::NONE;
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
            resolve(UP, &recreated, Some(&old), none, true),
            Resolution::Replace
        );
        assert_eq!(
            resolve(UP, &old, Some(&recreated), none, true),
            Resolution::Keep
        );
        // Overlapping lifetimes: the versions decide.
        let overlapping = Session {
            created_ns: 20 * sec,
            ..recreated
        };
        assert_eq!(
            resolve(UP, &overlapping, Some(&old), none, true),
            Resolution::Keep
        );
        // Another member cannot take the session over by claiming a new flow.
        let claimed = Session {
            owner: MemberId(3),
            ..recreated
        };
        assert_eq!(
            resolve(UP, &claimed, Some(&old), none, true),
            Resolution::Keep
        );
    }

    /// The owner's next record of a flow wins over a copy written from a record delayed in
    /// transit (TCP retransmissions on a lossy link: its times anchored here two seconds
    /// late, so the copy looks created after the flow's reply). A 16-member fault run at 30 %
    /// loss kept one replica `udp-new` for good while its owner had it `udp-replied`. From
    /// another sender (a full sync handing on a member's sessions) the times still decide.
    #[test]
    fn the_owners_next_record_wins_over_a_copy_its_delayed_record_made() {
        let sec = 1_000_000_000u64;
        // Created at 100 s, its reply at 100.2 s; the first record arrived 2 s late.
        let delayed = Session {
            created_ns: 102 * sec,
            last_seen_ns: 102 * sec,
            ..s(7, 2)
        };
        let replied = Session {
            created_ns: 100 * sec,
            last_seen_ns: 100 * sec + sec / 5,
            ..s(8, 2)
        };
        let from = |sender| ApplySource {
            sender: MemberId(sender),
            reconciling: MemberId::NONE,
        };
        assert_eq!(
            resolve(UP, &replied, Some(&delayed), from(2), true),
            Resolution::Replace
        );
        assert_eq!(
            resolve(UP, &replied, Some(&delayed), from(3), true),
            Resolution::Keep
        );
        assert_eq!(
            resolve(UP, &replied, Some(&delayed), ApplySource::NONE, true),
            Resolution::Keep
        );
    }

    #[test]
    fn a_delete_does_not_remove_a_later_version() {
        let none = ApplySource::NONE;
        assert_eq!(
            resolve(DEL, &s(4, 2), Some(&s(5, 2)), none, true),
            Resolution::Keep
        );
        assert_eq!(
            resolve(DEL, &s(5, 2), Some(&s(5, 2)), none, true),
            Resolution::Delete
        );
        assert_eq!(
            resolve(DEL, &s(0, 2), Some(&s(5, 2)), none, true),
            Resolution::Delete
        );
    }

    #[test]
    fn a_full_sync_marks_the_senders_replicas_it_keeps() {
        let two = ApplySource {
            sender: MemberId(2),
            reconciling: MemberId(2),
        };
        assert_eq!(
            resolve(UP, &s(3, 2), Some(&s(3, 2)), two, true),
            Resolution::Mark
        );
        // Someone else's copy, or a record for someone else: not the sender's replica.
        assert_eq!(
            resolve(UP, &s(3, 2), Some(&s(4, 3)), two, true),
            Resolution::Keep
        );
        assert_eq!(
            resolve(UP, &s(3, 3), Some(&s(3, 3)), two, true),
            Resolution::Keep
        );
        // A newer record replaces the copy (which marks it too: it is fresh).
        assert_eq!(
            resolve(UP, &s(4, 2), Some(&s(3, 2)), two, true),
            Resolution::Replace
        );
    }
}
