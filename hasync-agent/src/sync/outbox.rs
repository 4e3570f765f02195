//! What one peer still has to receive from us: a coalescing queue of session keys and the
//! frames sent but not yet acknowledged.
//!
//! The queue holds keys, not copies: a frame is built from the session's state at send time,
//! so many updates of one session coalesce into one record, and a resend carries the current
//! state. Memory is bounded: past `capacity` pending keys the outbox gives up on incremental
//! sync and asks for a full sync instead (`take_overflow`).

use std::{
    collections::{HashSet, VecDeque},
    time::Instant,
};

/// Keys come from traffic: a seeded hasher (not SipHash: this is the agent's hottest path).
type KeySet = HashSet<FlowKey, foldhash::quality::RandomState>;

use hasync_common::FlowKey;

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

#[derive(Debug)]
pub struct Outbox {
    pending: VecDeque<(FlowKey, Instant)>,
    queued: KeySet,
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
            queued: KeySet::default(),
            capacity,
            overflowed: false,
            in_flight: VecDeque::new(),
            max_in_flight,
            next_seq: 1,
        }
    }

    /// Queues `key` unless it is already queued (its latest state will be sent either way).
    pub fn enqueue(&mut self, key: FlowKey, now: Instant) {
        if self.overflowed {
            return;
        }
        if self.queued.len() >= self.capacity {
            if self.queued.contains(&key) {
                return;
            }
            // Too far behind to track sessions one by one: a full sync replaces the queue.
            self.overflowed = true;
            self.pending.clear();
            self.queued.clear();
            self.release_memory();
            return;
        }
        if self.queued.insert(key) {
            self.pending.push_back((key, now));
        }
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
        self.pending.clear();
        self.queued.clear();
        self.overflowed = false;
        self.release_memory();
    }

    /// Whether the queue overflowed since the last call (then a full sync is due).
    pub fn take_overflow(&mut self) -> bool {
        std::mem::take(&mut self.overflowed)
    }

    /// Takes up to `max` keys to send, with the time the oldest was queued.
    pub fn take(&mut self, max: usize) -> (Vec<FlowKey>, Option<Instant>) {
        let n = max.min(self.pending.len());
        let mut keys = Vec::with_capacity(n);
        let mut oldest = None;
        for (key, at) in self.pending.drain(..n) {
            self.queued.remove(&key);
            oldest = Some(oldest.map_or(at, |o: Instant| o.min(at)));
            keys.push(key);
        }
        if self.pending.is_empty() {
            self.release_memory();
        }
        (keys, oldest)
    }

    /// A drained queue gives back what a burst made it grow to, so an idle agent's memory does
    /// not stay at its high-water mark.
    fn release_memory(&mut self) {
        const KEEP: usize = 4096;
        if self.pending.capacity() > KEEP {
            self.pending.shrink_to(KEEP);
        }
        if self.queued.capacity() > KEEP {
            self.queued.shrink_to(KEEP);
        }
    }

    /// Allocates the sequence number of the next frame.
    pub fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Records that frame `seq` carrying `keys` was sent.
    pub fn sent(&mut self, seq: u64, keys: Vec<FlowKey>, oldest: Instant) {
        self.in_flight.push_back(InFlight {
            seq,
            keys,
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
    /// ones) so they are resent, with their current state, on whatever link comes next.
    /// Returns how many keys, and whether frames of a full sync were lost (then it must start
    /// over: they cannot be resent key by key).
    pub fn requeue_in_flight(&mut self) -> (usize, bool) {
        let mut n = 0;
        let bulk_lost = self.bulk_in_flight();
        while let Some(f) = self.in_flight.pop_back() {
            for key in f.keys.into_iter().rev() {
                if self.queued.insert(key) {
                    self.pending.push_front((key, f.oldest));
                    n += 1;
                }
            }
        }
        (n, bulk_lost)
    }
}

#[cfg(test)]
mod tests {
    use hasync_common::{flow::IPPROTO_UDP, Family};

    use super::*;

    fn key(i: u32) -> FlowKey {
        FlowKey::canonical(Family::V4, IPPROTO_UDP, [1, 0, i, 0], 1, [2, 0, 0, 0], 2).0
    }

    #[test]
    fn updates_of_one_session_coalesce() {
        let now = Instant::now();
        let mut o = Outbox::new(100, 4);
        for _ in 0..10 {
            o.enqueue(key(1), now);
        }
        o.enqueue(key(2), now);
        assert_eq!(o.pending(), 2);
        let (keys, _) = o.take(10);
        assert_eq!(keys, vec![key(1), key(2)]);
        o.enqueue(key(1), now);
        assert_eq!(o.pending(), 1, "a key sent already can be queued again");
    }

    #[test]
    fn acks_are_cumulative_and_unacked_frames_are_resent_first() {
        let now = Instant::now();
        let mut o = Outbox::new(100, 2);
        for i in 0..6 {
            o.enqueue(key(i), now);
        }
        let (a, _) = o.take(2);
        let s1 = o.next_seq();
        o.sent(s1, a, now);
        let (b, _) = o.take(2);
        let s2 = o.next_seq();
        o.sent(s2, b, now);
        assert!(!o.can_send(), "window of 2 frames is full");
        assert_eq!(o.ack(s1).len(), 1);
        assert!(o.can_send());
        o.enqueue(key(9), now);
        // The link fails: frame s2 (keys 2, 3) goes back ahead of 4, 5, 9.
        assert_eq!(o.requeue_in_flight(), (2, false));
        let (keys, _) = o.take(10);
        assert_eq!(keys, vec![key(2), key(3), key(4), key(5), key(9)]);
        assert_eq!(
            o.ack(s2).len(),
            0,
            "a late ack for a requeued frame releases nothing"
        );
    }

    #[test]
    fn a_requeued_key_already_pending_is_not_duplicated() {
        let now = Instant::now();
        let mut o = Outbox::new(100, 4);
        o.enqueue(key(1), now);
        let (k, _) = o.take(1);
        let s = o.next_seq();
        o.sent(s, k, now);
        o.enqueue(key(1), now);
        o.requeue_in_flight();
        assert_eq!(o.pending(), 1);
    }

    #[test]
    fn overflow_drops_the_queue_and_asks_for_a_full_sync() {
        let now = Instant::now();
        let mut o = Outbox::new(3, 4);
        for i in 0..4 {
            o.enqueue(key(i), now);
        }
        assert_eq!(o.pending(), 0);
        assert!(o.take_overflow());
        assert!(!o.take_overflow(), "reported once");
        o.enqueue(key(7), now);
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
