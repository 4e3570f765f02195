//! What one peer still has to receive from us: a coalescing queue of session changes and the
//! frames sent but not yet acknowledged.
//!
//! A queued key's record is built from what its [`Change`] says: the session as the
//! datapath's event left it, so sending needs no table read; or, for a change no event
//! describes (a removal, a resend, a re-announcement), the table's state read at send time.
//! Many updates of one session coalesce into one record.
//!
//! Memory is bounded: past `capacity` pending keys the outbox gives up on incremental sync and
//! asks for a full sync instead (`take_overflow`); and at most [`MAX_SNAPSHOTS`] of the keys
//! keep a snapshot (under 9 MiB per peer); the keys queued beyond it are read at send time.

use std::{
    collections::{HashMap, VecDeque},
    time::Instant,
};

use hasync_common::{conflict::version_after, FlowKey, Session};

/// Keys come from traffic: a seeded hasher (not SipHash: this is the agent's hottest path).
pub(super) type Hasher = foldhash::quality::RandomState;

/// How many queued keys may keep their event's snapshot of the session.
pub const MAX_SNAPSHOTS: usize = 100_000;

/// What a change's record is built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The session as the datapath's event left it: sent as it is, without reading the table.
    Snapshot(Session),
    /// The session as the table holds it at send time (absent: a removal).
    Read,
}

/// A frame sent and not yet acknowledged.
#[derive(Debug)]
struct InFlight {
    seq: u64,
    keys: Vec<FlowKey>,
    /// When the oldest change in the frame was queued (for the replication lag).
    oldest: Instant,
    /// A full sync's frame: not resent key by key (a broken full sync starts over).
    bulk: bool,
}

/// A queued key, in queue order.
#[derive(Clone, Copy, Debug)]
struct Queued {
    key: FlowKey,
    /// When it was first queued (for the replication lag).
    at: Instant,
    /// Its snapshot's slot in [`Snapshots`], or [`NO_SNAPSHOT`]: read at send time.
    snapshot: u32,
}

const NO_SNAPSHOT: u32 = u32::MAX;

/// Entries a drained queue keeps room for (and stale positions a queue may hold beyond half
/// its keys).
const KEEP: usize = 4096;

/// A position no queued key has.
const NOWHERE: u64 = u64::MAX;

/// Where the queue's positions start: far from both ends of `u64`, since keys requeued
/// after a link failure go in front.
const ORIGIN: u64 = 1 << 62;

/// The queued keys' snapshots, in slots (at most [`MAX_SNAPSHOTS`]): no hash operation, and a
/// queue filled from empty reads its snapshots back in sequence.
#[derive(Debug, Default)]
struct Snapshots {
    slots: Vec<Session>,
    free: Vec<u32>,
}

impl Snapshots {
    /// A slot holding `s`; [`NO_SNAPSHOT`] when all are taken.
    fn put(&mut self, s: Session) -> u32 {
        if let Some(i) = self.free.pop() {
            if let Some(slot) = self.slots.get_mut(i as usize) {
                *slot = s;
                return i;
            }
        }
        if self.slots.len() >= MAX_SNAPSHOTS {
            return NO_SNAPSHOT;
        }
        self.slots.push(s);
        u32::try_from(self.slots.len() - 1).unwrap_or(NO_SNAPSHOT)
    }

    fn get_mut(&mut self, i: u32) -> Option<&mut Session> {
        self.slots.get_mut(i as usize)
    }

    /// Frees slot `i`, returning what it held.
    fn take(&mut self, i: u32) -> Option<Session> {
        let s = *self.slots.get(i as usize)?;
        self.free.push(i);
        Some(s)
    }

    fn clear(&mut self) {
        self.slots.clear();
        self.free.clear();
    }
}

#[derive(Debug)]
pub struct Outbox {
    /// The queued keys, oldest first; `pending[0]` is at position `front`.
    pending: VecDeque<Queued>,
    front: u64,
    /// Each queued key's position in `pending` (and, until they are dropped, those of keys
    /// taken since): one hash operation per key queued or coalesced.
    queued: HashMap<FlowKey, u64, Hasher>,
    /// Of the queued keys, those whose latest change is an event's snapshot keep it here. A
    /// key queued without one is read at send time, whatever snapshot comes for it later: that
    /// snapshot may be older than what the table holds (an event drained after the sweep
    /// removed its session).
    snapshots: Snapshots,
    capacity: usize,
    overflowed: bool,
    in_flight: VecDeque<InFlight>,
    max_in_flight: usize,
    next_seq: u64,
}

impl Outbox {
    /// An outbox holding at most `capacity` pending keys and `max_in_flight` unacknowledged
    /// frames.
    pub fn new(capacity: usize, max_in_flight: usize) -> Self {
        Outbox {
            pending: VecDeque::new(),
            front: ORIGIN,
            queued: HashMap::default(),
            snapshots: Snapshots::default(),
            capacity,
            overflowed: false,
            in_flight: VecDeque::new(),
            max_in_flight,
            next_seq: 1,
        }
    }

    /// Queues `change` of `key`, coalesced with what is still queued for it: a read wins over
    /// a snapshot, and of two snapshots the later version.
    pub fn enqueue(&mut self, key: FlowKey, change: Change, now: Instant) {
        if self.overflowed {
            return;
        }
        let back = self.front + self.pending.len() as u64;
        let pos = self.queued.entry(key).or_insert(back);
        if let Some(q) = queued_at(&mut self.pending, self.front, *pos, &key) {
            coalesce(q, change, &mut self.snapshots);
            return;
        }
        // Not queued, or sent since it was.
        *pos = back;
        if self.pending.len() >= self.capacity {
            // Too far behind to track sessions one by one: a full sync replaces the queue.
            self.overflowed = true;
            self.forget_pending();
            return;
        }
        let snapshot = match change {
            Change::Snapshot(s) => self.snapshots.put(s),
            Change::Read => NO_SNAPSHOT,
        };
        self.pending.push_back(Queued {
            key,
            at: now,
            snapshot,
        });
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// May another frame be sent before acknowledgements arrive?
    pub fn can_send(&self) -> bool {
        self.in_flight.len() < self.max_in_flight
    }

    /// Forgets the queued keys and any overflow: a full sync that starts now carries their
    /// sessions' current state (or their absence, which its end reconciles).
    pub fn clear_pending(&mut self) {
        self.forget_pending();
        self.overflowed = false;
    }

    fn forget_pending(&mut self) {
        self.pending.clear();
        self.front = ORIGIN;
        self.queued.clear();
        self.snapshots.clear();
        self.release_memory();
    }

    /// Whether the queue overflowed since the last call (then a full sync is due).
    pub fn take_overflow(&mut self) -> bool {
        std::mem::take(&mut self.overflowed)
    }

    /// Takes up to `max` changes to send, with the time the oldest was queued. Their keys'
    /// positions stay in `queued`, out of the queue's range (a hash operation per key, a cache
    /// miss in a large queue, saved): a drained queue clears them, and a queue that never
    /// drains drops them once they are half as many as the keys queued (so the map holds at
    /// most 1.5 times the queue's capacity, about the old key set's memory).
    pub fn take(&mut self, max: usize) -> (Vec<(FlowKey, Change)>, Option<Instant>) {
        let n = max.min(self.pending.len());
        let mut changes = Vec::with_capacity(n);
        let mut oldest = None;
        for q in self.pending.drain(..n) {
            let change = self
                .snapshots
                .take(q.snapshot)
                .map_or(Change::Read, Change::Snapshot);
            oldest = Some(oldest.map_or(q.at, |o: Instant| o.min(q.at)));
            changes.push((q.key, change));
        }
        self.front += n as u64;
        if self.pending.is_empty() {
            self.forget_pending();
        } else if self.queued.len() > self.pending.len() + self.pending.len() / 2 + KEEP {
            let (pending, front) = (&mut self.pending, self.front);
            self.queued
                .retain(|key, pos| queued_at(pending, front, *pos, key).is_some());
        }
        (changes, oldest)
    }

    /// A drained queue gives back what a burst made it grow to, so an idle agent's memory does
    /// not stay at its high-water mark.
    fn release_memory(&mut self) {
        if self.pending.capacity() > KEEP {
            self.pending.shrink_to(KEEP);
        }
        if self.queued.capacity() > KEEP {
            self.queued.shrink_to(KEEP);
        }
        if self.snapshots.slots.capacity() > KEEP {
            self.snapshots.slots.shrink_to(KEEP);
            self.snapshots.free.shrink_to(KEEP);
        }
    }

    /// Allocates the sequence number of the next frame.
    pub fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Records that frame `seq` carrying `changes` was sent.
    pub fn sent(&mut self, seq: u64, changes: &[(FlowKey, Change)], oldest: Instant) {
        self.in_flight.push_back(InFlight {
            seq,
            keys: changes.iter().map(|(key, _)| *key).collect(),
            oldest,
            bulk: false,
        });
    }

    /// Records that frame `seq` of a full sync was sent.
    pub fn sent_bulk(&mut self, seq: u64, now: Instant) {
        self.in_flight.push_back(InFlight {
            seq,
            keys: Vec::new(),
            oldest: now,
            bulk: true,
        });
    }

    /// Is a frame of a full sync still unacknowledged?
    pub fn bulk_in_flight(&self) -> bool {
        self.in_flight.iter().any(|f| f.bulk)
    }

    /// A cumulative acknowledgement: every frame up to `seq` arrived. Returns, for each frame
    /// released, when its oldest change was queued (to measure the replication lag).
    pub fn ack(&mut self, seq: u64) -> Vec<Instant> {
        let mut released = Vec::new();
        while self.in_flight.front().is_some_and(|f| f.seq <= seq) {
            if let Some(f) = self.in_flight.pop_front() {
                released.push(f.oldest);
            }
        }
        released
    }

    /// The link carrying the frames in flight failed: queue their keys again (ahead of newer
    /// ones) so they are resent, with their current state read at send time (a change queued
    /// since is newer and stays), on whatever link comes next.
    /// Returns how many keys, and whether frames of a full sync were lost (then it must start
    /// over: they cannot be resent key by key).
    pub fn requeue_in_flight(&mut self) -> (usize, bool) {
        let mut n = 0;
        let bulk_lost = self.bulk_in_flight();
        while let Some(f) = self.in_flight.pop_back() {
            for key in f.keys.into_iter().rev() {
                let pos = self.queued.entry(key).or_insert(NOWHERE);
                if queued_at(&mut self.pending, self.front, *pos, &key).is_none() {
                    self.front -= 1;
                    *pos = self.front;
                    self.pending.push_front(Queued {
                        key,
                        at: f.oldest,
                        snapshot: NO_SNAPSHOT,
                    });
                    n += 1;
                }
            }
        }
        (n, bulk_lost)
    }
}

/// The queue's entry of `key` if it is at `pos`: a key's position in `queued` is out of date
/// once the key was taken (sent), and then points outside the queue or at another key.
fn queued_at<'a>(
    pending: &'a mut VecDeque<Queued>,
    front: u64,
    pos: u64,
    key: &FlowKey,
) -> Option<&'a mut Queued> {
    let i = usize::try_from(pos.checked_sub(front)?).ok()?;
    pending.get_mut(i).filter(|q| q.key == *key)
}

/// Coalesces `change` into the queued key `q`: a read replaces a snapshot; of two snapshots
/// the later version is kept. Two CPUs' events of one session can reach the ring buffer in
/// the other order, and can even carry the same version (its increments are not atomic):
/// then neither is known to be the latest, and the table is read at send time.
fn coalesce(q: &mut Queued, change: Change, snapshots: &mut Snapshots) {
    let held = snapshots.get_mut(q.snapshot);
    let read = match (change, held) {
        // Queued to be read: it stays so.
        (_, None) => false,
        (Change::Read, Some(_)) => true,
        (Change::Snapshot(s), Some(held)) => {
            if held.version == s.version && *held != s {
                true
            } else {
                if !version_after(held.version, s.version) {
                    *held = s;
                }
                false
            }
        }
    };
    if read {
        snapshots.take(q.snapshot);
        q.snapshot = NO_SNAPSHOT;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::datapath::testing::udp_key as key;

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

    #[test]
    fn updates_of_one_session_coalesce() {
        let now = Instant::now();
        let mut o = Outbox::new(100, 4);
        for v in 1..=10 {
            o.enqueue(key(1), snapshot(v), now);
        }
        o.enqueue(key(2), Change::Read, now);
        assert_eq!(o.pending(), 2);
        let (changes, _) = o.take(10);
        assert_eq!(
            changes,
            vec![(key(1), snapshot(10)), (key(2), Change::Read)]
        );
        o.enqueue(key(1), snapshot(11), now);
        assert_eq!(o.pending(), 1, "a key sent already can be queued again");
    }

    #[test]
    fn the_later_version_of_a_session_is_sent_whichever_event_came_last() {
        let now = Instant::now();
        let mut o = Outbox::new(100, 4);
        o.enqueue(key(1), snapshot(7), now);
        o.enqueue(key(1), snapshot(6), now);
        // Versions wrap: 0 follows u32::MAX.
        o.enqueue(key(2), snapshot(u32::MAX), now);
        o.enqueue(key(2), snapshot(0), now);
        let (changes, _) = o.take(10);
        assert_eq!(changes, vec![(key(1), snapshot(7)), (key(2), snapshot(0))]);
    }

    #[test]
    fn two_snapshots_of_one_version_that_differ_are_read_at_send_time() {
        let now = Instant::now();
        let mut o = Outbox::new(100, 4);
        let Change::Snapshot(a) = snapshot(4) else {
            unreachable!("a snapshot")
        };
        let b = Session { state: 3, ..a };
        o.enqueue(key(1), Change::Snapshot(a), now);
        o.enqueue(key(1), Change::Snapshot(a), now);
        o.enqueue(key(2), Change::Snapshot(a), now);
        o.enqueue(key(2), Change::Snapshot(b), now);
        let (changes, _) = o.take(10);
        assert_eq!(
            changes,
            vec![(key(1), Change::Snapshot(a)), (key(2), Change::Read)]
        );
    }

    #[test]
    fn a_queued_read_is_not_replaced_by_a_snapshot() {
        let now = Instant::now();
        let mut o = Outbox::new(100, 4);
        // Removed by the sweep, then an event of the session as it was drained late.
        o.enqueue(key(1), Change::Read, now);
        o.enqueue(key(1), snapshot(9), now);
        // A snapshot gives way to a read.
        o.enqueue(key(2), snapshot(3), now);
        o.enqueue(key(2), Change::Read, now);
        let (changes, _) = o.take(10);
        assert_eq!(
            changes,
            vec![(key(1), Change::Read), (key(2), Change::Read)]
        );
    }

    #[test]
    fn keys_queued_beyond_the_snapshot_bound_are_read_at_send_time() {
        let now = Instant::now();
        let n = u32::try_from(MAX_SNAPSHOTS).expect("fits") + 2;
        let mut o = Outbox::new(MAX_SNAPSHOTS * 2, 4);
        for i in 0..n {
            o.enqueue(key(i), snapshot(1), now);
        }
        // A later snapshot of a key queued without one does not add one.
        o.enqueue(key(n - 1), snapshot(2), now);
        let (changes, _) = o.take(MAX_SNAPSHOTS * 2);
        let snapshots = changes
            .iter()
            .filter(|(_, c)| matches!(c, Change::Snapshot(_)))
            .count();
        assert_eq!(snapshots, MAX_SNAPSHOTS);
        assert_eq!(changes[MAX_SNAPSHOTS - 1].1, snapshot(1));
        assert_eq!(changes[MAX_SNAPSHOTS].1, Change::Read);
        assert_eq!(changes[MAX_SNAPSHOTS + 1].1, Change::Read);
    }

    #[test]
    fn acks_are_cumulative_and_unacked_frames_are_resent_first() {
        let now = Instant::now();
        let mut o = Outbox::new(100, 2);
        for i in 0..6 {
            o.enqueue(key(i), snapshot(1), now);
        }
        let (a, _) = o.take(2);
        let s1 = o.next_seq();
        o.sent(s1, &a, now);
        let (b, _) = o.take(2);
        let s2 = o.next_seq();
        o.sent(s2, &b, now);
        assert!(!o.can_send(), "window of 2 frames is full");
        assert_eq!(o.ack(s1).len(), 1);
        assert!(o.can_send());
        o.enqueue(key(9), snapshot(1), now);
        // The link fails: frame s2 (keys 2, 3) goes back ahead of 4, 5, 9, to be read again.
        assert_eq!(o.requeue_in_flight(), (2, false));
        let (changes, _) = o.take(10);
        assert_eq!(keys(&changes), vec![key(2), key(3), key(4), key(5), key(9)]);
        assert_eq!(changes[0].1, Change::Read);
        assert_eq!(changes[2].1, snapshot(1));
        assert_eq!(
            o.ack(s2).len(),
            0,
            "a late ack for a requeued frame releases nothing"
        );
    }

    #[test]
    fn a_requeued_key_already_pending_keeps_its_newer_change() {
        let now = Instant::now();
        let mut o = Outbox::new(100, 4);
        o.enqueue(key(1), snapshot(1), now);
        let (k, _) = o.take(1);
        let s = o.next_seq();
        o.sent(s, &k, now);
        o.enqueue(key(1), snapshot(2), now);
        o.requeue_in_flight();
        assert_eq!(o.take(10).0, vec![(key(1), snapshot(2))]);
    }

    #[test]
    fn keys_requeued_in_front_coalesce_like_any_other() {
        let now = Instant::now();
        let mut o = Outbox::new(100, 4);
        for i in 0..5 {
            o.enqueue(key(i), snapshot(1), now);
        }
        let (a, _) = o.take(2);
        let s = o.next_seq();
        o.sent(s, &a, now);
        o.enqueue(key(5), snapshot(1), now);
        assert_eq!(o.requeue_in_flight(), (2, false));
        // Keys 0 and 1 now sit in front of those queued before them.
        o.enqueue(key(1), snapshot(2), now);
        o.enqueue(key(3), Change::Read, now);
        o.enqueue(key(4), snapshot(2), now);
        o.enqueue(key(5), snapshot(3), now);
        assert_eq!(o.pending(), 6);
        let (changes, _) = o.take(3);
        assert_eq!(
            changes,
            vec![
                (key(0), Change::Read),
                (key(1), Change::Read),
                (key(2), snapshot(1)),
            ]
        );
        o.enqueue(key(4), snapshot(4), now);
        o.enqueue(key(0), snapshot(5), now);
        let (changes, _) = o.take(10);
        assert_eq!(
            changes,
            vec![
                (key(3), Change::Read),
                (key(4), snapshot(4)),
                (key(5), snapshot(3)),
                (key(0), snapshot(5)),
            ]
        );
    }

    /// A key requeued in front can take the position a key sent since had: that key, queued
    /// again, is a new entry, not a change of the requeued one.
    #[test]
    fn a_stale_position_under_another_key_is_not_that_keys() {
        let now = Instant::now();
        let (a, b, c) = (key(1), key(2), key(3));
        let mut o = Outbox::new(100, 4);
        for k in [a, b, c] {
            o.enqueue(k, snapshot(1), now);
        }
        let (sent, _) = o.take(1);
        let s = o.next_seq();
        o.sent(s, &sent, now);
        // B is taken and never sent (a read that failed: a full sync carries it instead).
        assert_eq!(keys(&o.take(1).0), vec![b]);
        assert_eq!(o.requeue_in_flight(), (1, false));
        o.enqueue(b, snapshot(2), now);
        let (changes, _) = o.take(10);
        assert_eq!(
            changes,
            vec![(a, Change::Read), (c, snapshot(1)), (b, snapshot(2))]
        );
    }

    #[test]
    fn snapshots_sent_make_room_for_keys_queued_later() {
        let now = Instant::now();
        let n = u32::try_from(MAX_SNAPSHOTS).expect("fits");
        let mut o = Outbox::new(MAX_SNAPSHOTS * 2, 4);
        for i in 0..n {
            o.enqueue(key(i), snapshot(1), now);
        }
        o.take(10);
        for i in n..n + 11 {
            o.enqueue(key(i), snapshot(2), now);
        }
        let (changes, _) = o.take(MAX_SNAPSHOTS * 2);
        let tail: Vec<Change> = changes.iter().rev().take(11).map(|(_, c)| *c).collect();
        assert_eq!(&tail[..1], &[Change::Read], "the bound holds");
        assert!(
            tail[1..].iter().all(|c| *c == snapshot(2)),
            "the 10 slots sent were given to later keys"
        );
    }

    #[test]
    fn a_queue_that_never_drains_forgets_the_keys_it_sent() {
        let now = Instant::now();
        let mut o = Outbox::new(1 << 20, 4);
        let (mut queued, mut sent) = (0u32, Vec::new());
        for round in 0..20_000u32 {
            // Two new keys and one sent before (queued anew), two taken.
            for k in [queued, queued + 1] {
                o.enqueue(key(k), snapshot(1), now);
            }
            queued += 2;
            if round % 3 == 0 {
                o.enqueue(key(round / 2), snapshot(2), now);
            }
            sent.extend(keys(&o.take(2).0));
            assert!(
                o.queued.len() <= o.pending() + o.pending() / 2 + KEEP,
                "round {round}"
            );
        }
        assert!(o.pending() > 0, "it never drained");
        sent.extend(keys(&o.take(usize::MAX).0));
        let fresh: HashSet<FlowKey> = (0..queued).map(key).collect();
        assert_eq!(sent.iter().copied().collect::<HashSet<_>>(), fresh);
        // Round 0's key 0 was still queued: it coalesced.
        let again = (1..20_000).filter(|r| r % 3 == 0).count();
        assert_eq!(sent.len(), fresh.len() + again);
    }

    #[test]
    fn overflow_drops_the_queue_and_asks_for_a_full_sync() {
        let now = Instant::now();
        let mut o = Outbox::new(3, 4);
        for i in 0..3 {
            o.enqueue(key(i), Change::Read, now);
        }
        o.enqueue(key(0), snapshot(1), now);
        assert_eq!(o.pending(), 3, "a key already queued does not overflow");
        o.enqueue(key(3), Change::Read, now);
        assert_eq!(o.pending(), 0);
        assert!(o.take_overflow());
        assert!(!o.take_overflow(), "reported once");
        o.enqueue(key(7), Change::Read, now);
        assert_eq!(o.pending(), 1);
    }

    #[test]
    fn sequence_numbers_increase() {
        let mut o = Outbox::new(1, 1);
        let a = o.next_seq();
        let b = o.next_seq();
        assert!(b > a);
    }
}
