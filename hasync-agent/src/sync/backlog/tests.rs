use std::collections::HashSet;

use super::*;
use crate::{datapath::testing::udp_key as key, sync::window::Window};

/// The datapath's snapshot of a session at `version`.
fn snapshot(version: u32) -> Change {
    Change::Snapshot(Session {
        version,
        ..Session::default()
    })
}

fn keys(changes: &[(FlowKey, Change)]) -> Vec<FlowKey> {
    changes.iter().map(|(k, _)| *k).collect()
}

/// A backlog for one peer.
fn one(capacity: usize) -> Backlog {
    Backlog::new(capacity, &[true])
}

fn take(b: &mut Backlog, line: usize, max: usize) -> Vec<(FlowKey, Change)> {
    b.take(line, max, Instant::now()).0
}

#[test]
fn updates_of_one_session_coalesce() {
    let now = Instant::now();
    let mut b = one(100);
    for v in 1..=10 {
        b.enqueue(key(1), snapshot(v), now);
    }
    b.enqueue(key(2), Change::Read, now);
    assert_eq!(b.pending(0), 2);
    assert_eq!(
        take(&mut b, 0, 10),
        vec![(key(1), snapshot(10)), (key(2), Change::Read)]
    );
    b.enqueue(key(1), snapshot(11), now);
    assert_eq!(b.pending(0), 1, "a key sent already can be queued again");
}

#[test]
fn the_later_version_of_a_session_is_sent_whichever_event_came_last() {
    let now = Instant::now();
    let mut b = one(100);
    b.enqueue(key(1), snapshot(7), now);
    b.enqueue(key(1), snapshot(6), now);
    // Versions wrap: 0 follows u32::MAX.
    b.enqueue(key(2), snapshot(u32::MAX), now);
    b.enqueue(key(2), snapshot(0), now);
    assert_eq!(
        take(&mut b, 0, 10),
        vec![(key(1), snapshot(7)), (key(2), snapshot(0))]
    );
}

#[test]
fn two_snapshots_of_one_version_that_differ_are_read_at_send_time() {
    let now = Instant::now();
    let mut b = one(100);
    let Change::Snapshot(a) = snapshot(4) else {
        unreachable!("a snapshot")
    };
    let c = Session { state: 3, ..a };
    b.enqueue(key(1), Change::Snapshot(a), now);
    b.enqueue(key(1), Change::Snapshot(a), now);
    b.enqueue(key(2), Change::Snapshot(a), now);
    b.enqueue(key(2), Change::Snapshot(c), now);
    assert_eq!(
        take(&mut b, 0, 10),
        vec![(key(1), Change::Snapshot(a)), (key(2), Change::Read)]
    );
}

#[test]
fn a_queued_read_is_not_replaced_by_a_snapshot() {
    let now = Instant::now();
    let mut b = one(100);
    // Removed by the sweep, then an event of the session as it was drained late.
    b.enqueue(key(1), Change::Read, now);
    b.enqueue(key(1), snapshot(9), now);
    // A snapshot gives way to a read.
    b.enqueue(key(2), snapshot(3), now);
    b.enqueue(key(2), Change::Read, now);
    assert_eq!(
        take(&mut b, 0, 10),
        vec![(key(1), Change::Read), (key(2), Change::Read)]
    );
}

#[test]
fn keys_queued_beyond_the_snapshot_bound_are_read_at_send_time() {
    let now = Instant::now();
    let n = u32::try_from(MAX_SNAPSHOTS).expect("fits") + 2;
    let mut b = one(MAX_SNAPSHOTS * 2);
    for i in 0..n {
        b.enqueue(key(i), snapshot(1), now);
    }
    // A later snapshot of a key queued without one does not add one.
    b.enqueue(key(n - 1), snapshot(2), now);
    let changes = take(&mut b, 0, MAX_SNAPSHOTS * 2);
    let snapshots = changes
        .iter()
        .filter(|(_, c)| matches!(c, Change::Snapshot(_)))
        .count();
    assert_eq!(snapshots, MAX_SNAPSHOTS);
    assert_eq!(changes[MAX_SNAPSHOTS - 1].1, snapshot(1));
    assert_eq!(changes[MAX_SNAPSHOTS].1, Change::Read);
    assert_eq!(changes[MAX_SNAPSHOTS + 1].1, Change::Read);
}

/// Sends up to `max` of peer `line`'s changes in one frame of `w`.
fn send(b: &mut Backlog, w: &mut Window, line: usize, max: usize) -> u64 {
    let (changes, oldest) = b.take(line, max, Instant::now());
    let seq = w.next_seq();
    w.sent(seq, &changes, oldest.unwrap_or_else(Instant::now));
    seq
}

/// The link failed: what peer `line` had in flight goes back in front.
fn fail(b: &mut Backlog, w: &mut Window, line: usize) -> (usize, bool) {
    let (unacked, bulk_lost) = w.unacked();
    (b.requeue(line, &unacked), bulk_lost)
}

#[test]
fn acks_are_cumulative_and_unacked_frames_are_resent_first() {
    let now = Instant::now();
    let (mut b, mut w) = (one(100), Window::new(2));
    for i in 0..6 {
        b.enqueue(key(i), snapshot(1), now);
    }
    let s1 = send(&mut b, &mut w, 0, 2);
    let s2 = send(&mut b, &mut w, 0, 2);
    assert!(!w.can_send(), "window of 2 frames is full");
    assert_eq!(w.ack(s1).len(), 1);
    assert!(w.can_send());
    b.enqueue(key(9), snapshot(1), now);
    // The link fails: frame s2 (keys 2, 3) goes back ahead of 4, 5, 9, to be read again.
    assert_eq!(fail(&mut b, &mut w, 0), (2, false));
    let changes = take(&mut b, 0, 10);
    assert_eq!(keys(&changes), vec![key(2), key(3), key(4), key(5), key(9)]);
    assert_eq!(changes[0].1, Change::Read);
    assert_eq!(changes[2].1, snapshot(1));
    assert_eq!(
        w.ack(s2).len(),
        0,
        "a late ack for a requeued frame releases nothing"
    );
}

#[test]
fn a_requeued_key_already_pending_keeps_its_newer_change() {
    let now = Instant::now();
    let (mut b, mut w) = (one(100), Window::new(4));
    b.enqueue(key(1), snapshot(1), now);
    send(&mut b, &mut w, 0, 1);
    b.enqueue(key(1), snapshot(2), now);
    assert_eq!(fail(&mut b, &mut w, 0), (0, false));
    assert_eq!(take(&mut b, 0, 10), vec![(key(1), snapshot(2))]);
}

#[test]
fn keys_requeued_in_front_coalesce_like_any_other() {
    let now = Instant::now();
    let (mut b, mut w) = (one(100), Window::new(4));
    for i in 0..5 {
        b.enqueue(key(i), snapshot(1), now);
    }
    send(&mut b, &mut w, 0, 2);
    b.enqueue(key(5), snapshot(1), now);
    assert_eq!(fail(&mut b, &mut w, 0), (2, false));
    // Keys 0 and 1 now sit in front of those queued before them.
    b.enqueue(key(1), snapshot(2), now);
    b.enqueue(key(3), Change::Read, now);
    b.enqueue(key(4), snapshot(2), now);
    b.enqueue(key(5), snapshot(3), now);
    assert_eq!(b.pending(0), 6);
    assert_eq!(
        take(&mut b, 0, 3),
        vec![
            (key(0), Change::Read),
            (key(1), Change::Read),
            (key(2), snapshot(1)),
        ]
    );
    b.enqueue(key(4), snapshot(4), now);
    b.enqueue(key(0), snapshot(5), now);
    assert_eq!(
        take(&mut b, 0, 10),
        vec![
            (key(3), Change::Read),
            (key(4), snapshot(4)),
            (key(5), snapshot(3)),
            (key(0), snapshot(5)),
        ]
    );
}

#[test]
fn snapshots_sent_make_room_for_keys_queued_later() {
    let now = Instant::now();
    let n = u32::try_from(MAX_SNAPSHOTS).expect("fits");
    let mut b = one(MAX_SNAPSHOTS * 2);
    for i in 0..n {
        b.enqueue(key(i), snapshot(1), now);
    }
    take(&mut b, 0, 10);
    for i in n..n + 11 {
        b.enqueue(key(i), snapshot(2), now);
    }
    let changes = take(&mut b, 0, MAX_SNAPSHOTS * 2);
    let tail: Vec<Change> = changes.iter().rev().take(11).map(|(_, c)| *c).collect();
    assert_eq!(&tail[..1], &[Change::Read], "the bound holds");
    assert!(
        tail[1..].iter().all(|c| *c == snapshot(2)),
        "the 10 slots sent were given to later keys"
    );
}

#[test]
fn a_backlog_that_never_drains_forgets_the_keys_it_sent() {
    let now = Instant::now();
    let mut b = one(1 << 20);
    let (mut queued, mut sent) = (0u32, Vec::new());
    for round in 0..20_000u32 {
        // Two new keys and one sent before (queued anew), two taken.
        for k in [queued, queued + 1] {
            b.enqueue(key(k), snapshot(1), now);
        }
        queued += 2;
        if round % 3 == 0 {
            b.enqueue(key(round / 2), snapshot(2), now);
        }
        sent.extend(keys(&take(&mut b, 0, 2)));
        assert!(b.held() <= b.live + b.live / 2 + KEEP, "round {round}");
        assert_eq!(b.live, b.pending(0), "round {round}");
    }
    assert!(b.pending(0) > 0, "it never drained");
    sent.extend(keys(&take(&mut b, 0, usize::MAX)));
    assert_eq!(b.held(), 0, "a drained backlog holds nothing");
    let fresh: HashSet<FlowKey> = (0..queued).map(key).collect();
    assert_eq!(sent.iter().copied().collect::<HashSet<_>>(), fresh);
    // Round 0's key 0 was still queued: it coalesced.
    let again = (1..20_000).filter(|r| r % 3 == 0).count();
    assert_eq!(sent.len(), fresh.len() + again);
}

#[test]
fn overflow_drops_the_queue_and_asks_for_a_full_sync() {
    let now = Instant::now();
    let mut b = one(3);
    for i in 0..3 {
        b.enqueue(key(i), Change::Read, now);
    }
    b.enqueue(key(0), snapshot(1), now);
    assert_eq!(b.pending(0), 3, "a key already queued does not overflow");
    b.enqueue(key(3), Change::Read, now);
    assert_eq!(b.pending(0), 0);
    assert_eq!(b.held(), 0);
    b.enqueue(key(4), Change::Read, now);
    assert_eq!(
        b.pending(0),
        0,
        "nothing is queued until the overflow is taken"
    );
    assert!(b.take_overflow(0));
    assert!(!b.take_overflow(0), "reported once");
    b.enqueue(key(7), Change::Read, now);
    assert_eq!(b.pending(0), 1);
}

#[test]
fn a_change_is_held_once_and_sent_to_every_peer() {
    let now = Instant::now();
    let mut b = Backlog::new(100, &[true, true, true]);
    b.enqueue(key(1), snapshot(1), now);
    b.enqueue(key(2), Change::Read, now);
    assert_eq!(b.held(), 2);
    assert_eq!([b.pending(0), b.pending(1), b.pending(2)], [2, 2, 2]);
    let all = vec![(key(1), snapshot(1)), (key(2), Change::Read)];
    assert_eq!(take(&mut b, 0, 10), all);
    assert_eq!(take(&mut b, 2, 10), all);
    assert_eq!(b.held(), 2, "peer 1 still waits");
    assert_eq!(take(&mut b, 1, 10), all);
    assert_eq!(b.held(), 0, "the last peer's take frees them");
}

#[test]
fn a_change_after_one_peer_took_the_key_is_queued_again_for_it_and_coalesced_for_the_other() {
    let now = Instant::now();
    let mut b = Backlog::new(100, &[true, true]);
    b.enqueue(key(1), snapshot(1), now);
    b.enqueue(key(2), snapshot(1), now);
    assert_eq!(keys(&take(&mut b, 0, 1)), vec![key(1)]);
    b.enqueue(key(1), snapshot(2), now);
    assert_eq!(
        take(&mut b, 0, 10),
        vec![(key(2), snapshot(1)), (key(1), snapshot(2))],
        "peer 0 gets key 1 again, after key 2"
    );
    assert_eq!(
        take(&mut b, 1, 10),
        vec![(key(1), snapshot(2)), (key(2), snapshot(1))],
        "peer 1 gets key 1 once, in its place, at its latest version"
    );
    assert_eq!(b.held(), 0);
}

#[test]
fn a_full_backlog_overflows_the_peer_furthest_behind_only() {
    let now = Instant::now();
    let mut b = Backlog::new(4, &[true, true, true]);
    for i in 0..4 {
        b.enqueue(key(i), snapshot(1), now);
        // Peer 0 keeps up; peer 1 takes every other key; peer 2 never takes.
        take(&mut b, 0, 10);
        if i % 2 == 0 {
            take(&mut b, 1, 1);
        }
    }
    assert_eq!([b.pending(0), b.pending(1), b.pending(2)], [0, 2, 4]);
    assert_eq!(b.overflowed, 0);
    b.enqueue(key(4), snapshot(1), now);
    assert_eq!(b.overflowed, 1 << 2, "only peer 2, furthest behind");
    assert_eq!([b.pending(0), b.pending(1), b.pending(2)], [1, 3, 0]);
    assert_eq!(b.held(), 3, "what only peer 2 waited for is freed");
    assert_eq!(keys(&take(&mut b, 1, 10)), vec![key(2), key(3), key(4)]);
    assert!(b.take_overflow(2));
    b.enqueue(key(5), snapshot(1), now);
    assert_eq!(
        b.pending(2),
        1,
        "queued for again once it took its overflow"
    );
}

#[test]
fn a_full_sync_starting_for_one_peer_leaves_the_others_their_changes() {
    let now = Instant::now();
    let mut b = Backlog::new(100, &[true, true]);
    for i in 0..3 {
        b.enqueue(key(i), snapshot(1), now);
    }
    b.clear_pending(0);
    assert_eq!((b.pending(0), b.pending(1)), (0, 3));
    assert_eq!(
        take(&mut b, 1, 10),
        vec![
            (key(0), snapshot(1)),
            (key(1), snapshot(1)),
            (key(2), snapshot(1))
        ]
    );
    assert_eq!(b.held(), 0);
}

#[test]
fn keys_requeued_into_a_full_backlog_are_counted_only_if_queued() {
    let now = Instant::now();
    let (mut b, mut w) = (Backlog::new(2, &[true, true]), Window::new(4));
    b.enqueue(key(0), snapshot(1), now);
    b.enqueue(key(1), snapshot(1), now);
    send(&mut b, &mut w, 0, 2);
    take(&mut b, 1, 2);
    b.enqueue(key(2), snapshot(1), now);
    b.enqueue(key(3), snapshot(1), now);
    take(&mut b, 1, 1);
    // Peer 0's link fails: its two keys need slots, both slots are held (key 2 for peer 0,
    // key 3 for both), and peer 0's line is the longest.
    assert_eq!(fail(&mut b, &mut w, 0), (0, false));
    assert!(b.take_overflow(0), "a full sync carries them");
    assert!(!b.take_overflow(1));
    assert_eq!(keys(&take(&mut b, 1, 10)), vec![key(3)]);
}

#[test]
fn a_silent_peer_keeps_its_changes_but_not_the_snapshots_the_others_send_from() {
    let now = Instant::now();
    let mut b = Backlog::new(100, &[true, true]);
    b.enqueue(key(1), snapshot(1), now);
    b.enqueue(key(2), snapshot(1), now);
    take(&mut b, 1, 1);
    b.set_silent(0, true);
    assert_eq!(
        b.snapshots.slots.len() - b.snapshots.free.len(),
        1,
        "key 2's: peer 1 waits"
    );
    b.enqueue(key(3), snapshot(1), now);
    assert_eq!(
        take(&mut b, 1, 10),
        vec![(key(2), snapshot(1)), (key(3), snapshot(1))]
    );
    assert_eq!(
        b.snapshots.slots.len() - b.snapshots.free.len(),
        0,
        "peer 0 alone waits"
    );
    b.set_silent(0, false);
    b.enqueue(key(4), snapshot(1), now);
    assert_eq!(
        take(&mut b, 0, 10),
        vec![
            (key(1), Change::Read),
            (key(2), Change::Read),
            (key(3), Change::Read),
            (key(4), snapshot(1)),
        ],
        "back: every change it missed, read from the table"
    );
}

#[test]
fn a_peer_without_session_sync_gets_nothing() {
    let now = Instant::now();
    let mut b = Backlog::new(100, &[false, true]);
    b.enqueue(key(1), snapshot(1), now);
    assert_eq!((b.pending(0), b.pending(1)), (0, 1));
    assert_eq!(b.requeue(0, &[(key(2), now)]), 0);
    assert_eq!(b.pending(0), 0);
    assert_eq!(b.pending(7), 0, "no such peer");
}

#[test]
fn a_key_requeued_for_one_peer_goes_out_as_queued_for_the_others() {
    let now = Instant::now();
    let (mut b, mut w) = (Backlog::new(100, &[true, true]), Window::new(4));
    b.enqueue(key(1), snapshot(1), now);
    b.enqueue(key(2), snapshot(1), now);
    send(&mut b, &mut w, 0, 2);
    b.enqueue(key(1), snapshot(2), now);
    // Peer 0's link fails: key 1 is queued for it again (since its send), key 2 only for
    // peer 1: both go back to peer 0 in front, key 2 as peer 1 has it queued.
    assert_eq!(fail(&mut b, &mut w, 0), (1, false));
    assert_eq!(
        take(&mut b, 0, 10),
        vec![(key(2), snapshot(1)), (key(1), snapshot(2))]
    );
    assert_eq!(
        take(&mut b, 1, 10),
        vec![(key(1), snapshot(2)), (key(2), snapshot(1))]
    );
    assert_eq!(b.held(), 0);
}

#[test]
fn the_oldest_wait_of_a_take_comes_back_as_an_instant() {
    let mut b = one(100);
    let t0 = Instant::now();
    b.enqueue(key(1), snapshot(1), t0);
    b.enqueue(key(2), snapshot(1), t0 + Duration::from_millis(5));
    let (_, oldest) = b.take(0, 10, t0 + Duration::from_millis(9));
    let oldest = oldest.expect("two keys taken");
    let error = oldest.max(t0) - oldest.min(t0);
    assert!(error <= Duration::from_micros(1), "{error:?}");
}

/// Random operations against the model of what each peer must still get
/// ([`super::model`], which the `backlog` fuzz target runs too): every key a peer takes was
/// queued for it and is no older than what was queued, none is lost unless its line
/// overflowed (a full sync then carries it), and a line overflows only when a new key finds
/// every slot held for some peer. Small (10 keys, 6 slots: overflows all the time) and larger
/// (200 keys, 64 slots: room made from the list of retired slots), three peers; and four
/// peers of which one gets nothing queued (it does not sync sessions).
#[test]
fn random_operations_keep_the_backlog_whole() {
    for (capacity, peers, keys) in [(6, 2, 10), (64, 2, 200), (16, 0b1011, 40)] {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut input = vec![capacity - 1, peers, keys - 1];
        input.extend((0..40_000).map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed.to_le_bytes()[0]
        }));
        if let Err(e) = super::model::run(&input) {
            panic!("{capacity} slots, peers {peers:#b}, {keys} keys: {e}");
        }
    }
}
