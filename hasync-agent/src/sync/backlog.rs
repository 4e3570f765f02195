//! What the peers still have to receive from us: one coalescing queue of session changes for
//! all of them. A change is held once, however many peers wait for it; each peer keeps only
//! its place in line (eight bytes a key), so a member of a sixteen-member cluster whose
//! peers all fall behind holds about what a member of a pair holds, not fifteen times it.
//!
//! A queued key's record is built from what its [`Change`] says: the session as the
//! datapath's event left it, so sending needs no table read; or, for a change no event
//! describes (a removal, a resend, a re-announcement), the table's state read at send time.
//! Many updates of one session coalesce into one record.
//!
//! Memory is bounded: at most `capacity` keys are held. When a new key finds every one of
//! them still wanted, the peer furthest behind gives up on incremental sync and gets a full
//! sync instead (`take_overflow`), which frees what only that peer waited for. At most
//! [`MAX_SNAPSHOTS`] of the keys keep a snapshot (under 9 MiB); the others are read at send
//! time. A snapshot is freed when the last peer waiting for its key takes it, so a peer far
//! behind keeps snapshots from the others, which then read more at send time: the cost of a
//! slow peer, until its line overflows. Not a peer cut off and not heard (`set_silent`): what
//! only such peers wait for keeps no snapshot.

use std::{
    collections::{hash_map, HashMap, VecDeque},
    time::{Duration, Instant},
};

use hasync_common::{conflict::version_after, FlowKey, Session};

/// Keys come from traffic: a seeded hasher (not SipHash: this is the agent's hottest path).
pub(super) type Hasher = foldhash::quality::RandomState;

/// How many queued keys may keep their event's snapshot of the session.
pub const MAX_SNAPSHOTS: usize = 100_000;

/// How many peers one backlog serves.
pub const MAX_PEERS: usize = 32;
const _: () = assert!(crate::config::range::MAX_MEMBERS - 1 <= MAX_PEERS);

/// What a change's record is built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The session as the datapath's event left it: sent as it is, without reading the table.
    Snapshot(Session),
    /// The session as the table holds it at send time (absent: a removal).
    Read,
}

/// Changes taken to send, with when the oldest of them was queued.
pub type Taken = (Vec<(FlowKey, Change)>, Option<Instant>);

/// A set of peers, one bit per peer's line.
type Peers = u32;

/// A held key.
#[derive(Clone, Copy, Debug)]
struct Entry {
    key: FlowKey,
    /// Its snapshot's slot in [`Snapshots`], or [`NO_SNAPSHOT`]: read at send time.
    snapshot: u32,
    /// The peers whose lines hold it. None: retired (sent to every peer that wanted it), kept
    /// under its key until it is freed, so that sending needs no hash operation.
    waiting: Peers,
}

const NO_SNAPSHOT: u32 = u32::MAX;

/// Bits of a [`Place`] that hold the entry's slot (so at most 2^24 keys are held).
const SLOT_BITS: u32 = 24;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
/// Queue times are microseconds since the backlog began, modulo 2^40 (12.7 days): a wait is
/// exact for any change that waited less than that.
const TIME_MASK: u64 = (1 << 40) - 1;

/// A peer's place in line: an entry's slot and when the change was queued for that peer.
#[derive(Clone, Copy, Debug)]
struct Place(u64);

impl Place {
    fn new(slot: u32, at_us: u64) -> Self {
        Place(((at_us & TIME_MASK) << SLOT_BITS) | (u64::from(slot) & SLOT_MASK))
    }

    fn slot(self) -> u32 {
        // Masked to 24 bits: it fits.
        u32::try_from(self.0 & SLOT_MASK).unwrap_or(u32::MAX)
    }

    /// Microseconds it waited by `now_us`.
    fn waited(self, now_us: u64) -> u64 {
        now_us.wrapping_sub(self.0 >> SLOT_BITS) & TIME_MASK
    }
}

/// Entries a drained backlog keeps room for (and retired entries it may hold beyond half its
/// live ones).
const KEEP: usize = 4096;

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

    fn get(&self, i: u32) -> Option<Session> {
        self.slots.get(i as usize).copied()
    }

    fn get_mut(&mut self, i: u32) -> Option<&mut Session> {
        self.slots.get_mut(i as usize)
    }

    /// Frees slot `i`.
    fn free(&mut self, i: u32) {
        if (i as usize) < self.slots.len() {
            self.free.push(i);
        }
    }

    fn clear(&mut self) {
        self.slots.clear();
        self.free.clear();
    }
}

#[derive(Debug)]
pub struct Backlog {
    /// Held keys by slot; a slot is either in `index` or in `free`.
    entries: Vec<Entry>,
    free: Vec<u32>,
    /// Slots that may be retired: each whose last waiter took it, and each held anew and left
    /// without a waiter. A retired slot stays in `index` until it is freed; a slot may be
    /// listed more than once (retired, queued again, retired again), and is freed only if it
    /// is retired when its turn comes.
    retired: Vec<u32>,
    /// Each held key's slot: one hash operation per key queued, none per key sent.
    index: HashMap<FlowKey, u32, Hasher>,
    snapshots: Snapshots,
    /// Each peer's line, oldest first.
    lines: Vec<VecDeque<Place>>,
    /// The peers changes are queued for.
    targets: Peers,
    /// Peers whose line overflowed: nothing is queued for them until `take_overflow`.
    overflowed: Peers,
    /// Peers cut off and not heard: see [`Backlog::set_silent`].
    silent: Peers,
    /// Entries some peer waits for (the others are retired).
    live: usize,
    capacity: usize,
    epoch: Instant,
}

impl Backlog {
    /// A backlog holding at most `capacity` keys for one line per entry of `targets` (true:
    /// changes are queued for that peer). Peers past [`MAX_PEERS`] get nothing queued.
    pub fn new(capacity: usize, targets: &[bool]) -> Self {
        let lines = targets.len().min(MAX_PEERS);
        let targets = targets
            .iter()
            .take(MAX_PEERS)
            .enumerate()
            .filter(|(_, t)| **t)
            .fold(0, |set, (i, _)| set | 1 << i);
        Backlog {
            entries: Vec::new(),
            free: Vec::new(),
            retired: Vec::new(),
            index: HashMap::default(),
            snapshots: Snapshots::default(),
            lines: vec![VecDeque::new(); lines],
            targets,
            overflowed: 0,
            silent: 0,
            live: 0,
            capacity: capacity.clamp(1, 1 << SLOT_BITS),
            epoch: Instant::now(),
        }
    }

    /// Queues `change` of `key` for every peer, coalesced with what is still queued for it: a
    /// read wins over a snapshot, and of two snapshots the later version.
    pub fn enqueue(&mut self, key: FlowKey, change: Change, now: Instant) {
        if self.wanted() == 0 {
            return;
        }
        let Some(slot) = self.slot_of(key) else {
            self.overflow_all();
            return;
        };
        // Making room may have overflowed every line.
        let wanted = self.wanted();
        if wanted == 0 {
            self.abandon(slot);
            self.settle();
            return;
        }
        let Some(e) = self.entries.get_mut(slot as usize) else {
            return;
        };
        if e.waiting == 0 {
            e.snapshot = match change {
                // Not for silent peers alone: see `set_silent`.
                Change::Snapshot(s) if wanted & !self.silent != 0 => self.snapshots.put(s),
                _ => NO_SNAPSHOT,
            };
            self.live += 1;
        } else {
            coalesce(e, change, &mut self.snapshots);
        }
        let newly = wanted & !e.waiting;
        e.waiting |= newly;
        let place = Place::new(slot, self.micros(now));
        for (i, line) in self.lines.iter_mut().enumerate() {
            if newly & 1 << i != 0 {
                line.push_back(place);
            }
        }
    }

    /// Keys queued for peer `line`.
    pub fn pending(&self, line: usize) -> usize {
        self.lines.get(line).map_or(0, VecDeque::len)
    }

    /// Keys held for all peers (retired ones included).
    pub fn held(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    /// Whether peer `line`'s queue overflowed since the last call (then a full sync is due).
    /// Changes are queued for it again from now on.
    pub fn take_overflow(&mut self, line: usize) -> bool {
        let bit = bit(line);
        let was = self.overflowed & bit != 0;
        self.overflowed &= !bit;
        was
    }

    /// Peer `line` is cut off and not heard (down, or stopped), or is heard again. While it
    /// is, what only such peers wait for keeps no snapshot: it is read from the table when they
    /// are back, and the snapshots stay for the peers that send now (a member down would
    /// otherwise hold them all until its line overflowed).
    pub fn set_silent(&mut self, line: usize, silent: bool) {
        let bit = bit(line);
        if !silent {
            self.silent &= !bit;
            return;
        }
        if self.silent & bit != 0 {
            return;
        }
        self.silent |= bit;
        let Some(places) = self.lines.get(line) else {
            return;
        };
        for place in places {
            if let Some(e) = self.entries.get_mut(place.slot() as usize) {
                drop_snapshot_if_silent(e, self.silent, &mut self.snapshots);
            }
        }
    }

    /// Forgets what is queued for peer `line`, and any overflow: a full sync that starts now
    /// carries their sessions' current state (or their absence, which its end reconciles).
    pub fn clear_pending(&mut self, line: usize) {
        self.forget_line(line);
        self.overflowed &= !bit(line);
        self.settle();
    }

    /// Takes up to `max` changes to send to peer `line`, with the time the oldest was queued.
    pub fn take(&mut self, line: usize, max: usize, now: Instant) -> Taken {
        let now_us = self.micros(now);
        let n = max.min(self.pending(line));
        let mut changes = Vec::with_capacity(n);
        let mut waited = None;
        for _ in 0..n {
            let Some(place) = self.lines.get_mut(line).and_then(VecDeque::pop_front) else {
                break;
            };
            waited = waited.max(Some(place.waited(now_us)));
            if let Some(change) = self.release(place.slot(), bit(line)) {
                changes.push(change);
            }
        }
        self.settle();
        let oldest = waited.map(|us| now.checked_sub(Duration::from_micros(us)).unwrap_or(now));
        (changes, oldest)
    }

    /// The link that carried `unacked` (keys sent to peer `line` and not acknowledged, in the
    /// order they were sent, each with when its frame's oldest change was queued) failed:
    /// queue them again ahead of newer ones, so they are resent on whatever link comes next.
    /// A key still queued for the peer keeps its place and change (queued since: newer); one
    /// queued for other peers only is sent as it is queued for them (a change queued after it
    /// was taken); any other is read at send time. Returns how many keys were queued.
    pub fn requeue(&mut self, line: usize, unacked: &[(FlowKey, Instant)]) -> usize {
        let bit = bit(line);
        let mut n = 0;
        if self.wanted() & bit == 0 {
            return 0;
        }
        for (key, at) in unacked.iter().rev() {
            // Its line may overflow while room is made: a full sync carries the rest.
            let Some(slot) = self.slot_of(*key) else {
                self.overflow_all();
                return 0;
            };
            let (at_us, wanted) = (self.micros(*at), self.wanted());
            if wanted & bit == 0 {
                self.abandon(slot);
                break;
            }
            let Some(e) = self.entries.get_mut(slot as usize) else {
                break;
            };
            if e.waiting & bit != 0 {
                continue;
            }
            if e.waiting == 0 {
                e.snapshot = NO_SNAPSHOT;
                self.live += 1;
            }
            e.waiting |= bit;
            if let Some(l) = self.lines.get_mut(line) {
                l.push_front(Place::new(slot, at_us));
                n += 1;
            }
        }
        if self.wanted() & bit == 0 {
            // Its line overflowed while room was made: none of them is queued.
            return 0;
        }
        n
    }

    /// The peers changes are queued for now.
    fn wanted(&self) -> Peers {
        self.targets & !self.overflowed
    }

    fn micros(&self, t: Instant) -> u64 {
        let us = t.saturating_duration_since(self.epoch).as_micros();
        u64::try_from(us & u128::from(TIME_MASK)).unwrap_or(0)
    }

    /// `key`'s slot, held anew if it is not; None when no room could be made (which the
    /// listing of retired entries rules out: the caller then overflows every line, so that a
    /// full sync carries what could not be queued). A caller that leaves the slot without a
    /// waiter lists it as retired ([`Self::abandon`]).
    fn slot_of(&mut self, key: FlowKey) -> Option<u32> {
        match self.index.entry(key) {
            hash_map::Entry::Occupied(o) => return Some(*o.get()),
            hash_map::Entry::Vacant(v) => {
                if let Some(slot) = hold(&mut self.entries, &mut self.free, self.capacity, key) {
                    v.insert(slot);
                    return Some(slot);
                }
            }
        }
        loop {
            if !self.make_room() {
                return None;
            }
            if let Some(slot) = hold(&mut self.entries, &mut self.free, self.capacity, key) {
                self.index.insert(key, slot);
                return Some(slot);
            }
        }
    }

    /// Every slot is taken: frees the retired entries, after overflowing the line furthest
    /// behind if none is retired. False when that changed nothing.
    fn make_room(&mut self) -> bool {
        let mut overflowed = false;
        if self.live == self.held() {
            let longest = (0..self.lines.len())
                .filter(|i| self.pending(*i) > 0)
                .max_by_key(|i| self.pending(*i));
            let Some(line) = longest else {
                return false;
            };
            self.forget_line(line);
            self.overflowed |= bit(line);
            overflowed = true;
        }
        let free = self.free.len();
        self.free_listed();
        if self.free.len() == free && self.live < self.held() {
            debug_assert!(false, "a retired entry was not listed");
            self.sweep();
        }
        overflowed || self.free.len() > free
    }

    /// Every line overflows: each peer gets a full sync.
    fn overflow_all(&mut self) {
        debug_assert!(false, "no room could be made in the backlog");
        for line in 0..self.lines.len() {
            self.forget_line(line);
        }
        self.overflowed = self.targets;
        self.settle();
    }

    /// Empties peer `line`'s queue.
    fn forget_line(&mut self, line: usize) {
        let Some(places) = self.lines.get_mut(line).map(std::mem::take) else {
            return;
        };
        for place in places {
            self.release(place.slot(), bit(line));
        }
    }

    /// Lists `slot` as retired if nobody waits for it (held anew and left so).
    fn abandon(&mut self, slot: u32) {
        if self
            .entries
            .get(slot as usize)
            .is_some_and(|e| e.waiting == 0)
        {
            self.retired.push(slot);
        }
    }

    /// Takes the entry in `slot` off the line of `peer`: its change, and the entry retired if
    /// no other peer waits for it.
    fn release(&mut self, slot: u32, peer: Peers) -> Option<(FlowKey, Change)> {
        let e = self.entries.get_mut(slot as usize)?;
        let change = self
            .snapshots
            .get(e.snapshot)
            .map_or(Change::Read, Change::Snapshot);
        if e.waiting & peer == 0 {
            return None;
        }
        e.waiting &= !peer;
        drop_snapshot_if_silent(e, self.silent, &mut self.snapshots);
        if e.waiting == 0 {
            self.live -= 1;
            self.retired.push(slot);
        }
        Some((e.key, change))
    }

    /// After keys left the lines: a drained backlog starts over (and gives back what a burst
    /// made it grow to); one that never drains frees its retired entries once they are listed
    /// half as many times as there are live ones.
    fn settle(&mut self) {
        if self.live == 0 {
            self.entries.clear();
            self.free.clear();
            self.retired.clear();
            self.index.clear();
            self.snapshots.clear();
            self.release_memory();
        } else if self.retired.len() > self.live / 2 + KEEP {
            self.sweep();
        }
    }

    /// Frees every retired entry's slot in one pass over the index, removing them in place.
    fn sweep(&mut self) {
        self.retired.clear();
        let (entries, free) = (&self.entries, &mut self.free);
        self.index.retain(|_, slot| {
            let live = entries.get(*slot as usize).is_some_and(|e| e.waiting != 0);
            if !live {
                free.push(*slot);
            }
            live
        });
    }

    /// Frees the slots listed as retired that still are, two hash operations each: what a
    /// full backlog makes room with, a frame's worth at a time, without a pass over the index.
    /// When the list is a quarter of the index or more, a [`Self::sweep`] is cheaper.
    fn free_listed(&mut self) {
        if self.retired.len() >= self.index.len() / 4 {
            self.sweep();
            return;
        }
        let mut listed = std::mem::take(&mut self.retired);
        for slot in listed.drain(..) {
            let Some(e) = self.entries.get(slot as usize) else {
                continue;
            };
            if e.waiting == 0 && self.index.get(&e.key) == Some(&slot) {
                self.index.remove(&e.key);
                self.free.push(slot);
            }
        }
        // Keeps the list's room.
        self.retired = listed;
    }

    /// A drained backlog gives back what a burst made it grow to, so an idle agent's memory
    /// does not stay at its high-water mark.
    fn release_memory(&mut self) {
        self.entries.shrink_to(KEEP);
        self.free.shrink_to(KEEP);
        self.retired.shrink_to(KEEP);
        self.index.shrink_to(KEEP);
        self.snapshots.slots.shrink_to(KEEP);
        self.snapshots.free.shrink_to(KEEP);
        for line in &mut self.lines {
            line.shrink_to(KEEP);
        }
    }
}

/// Frees `e`'s snapshot if only `silent` peers (or none) wait for it: it is read at send time.
fn drop_snapshot_if_silent(e: &mut Entry, silent: Peers, snapshots: &mut Snapshots) {
    if e.waiting & !silent == 0 && e.snapshot != NO_SNAPSHOT {
        snapshots.free(e.snapshot);
        e.snapshot = NO_SNAPSHOT;
    }
}

fn bit(line: usize) -> Peers {
    if line < MAX_PEERS {
        1 << line
    } else {
        0
    }
}

/// A free slot holding `key`, none waiting for it yet; None when `capacity` are taken.
fn hold(
    entries: &mut Vec<Entry>,
    free: &mut Vec<u32>,
    capacity: usize,
    key: FlowKey,
) -> Option<u32> {
    let fresh = Entry {
        key,
        snapshot: NO_SNAPSHOT,
        waiting: 0,
    };
    if let Some(slot) = free.pop() {
        *entries.get_mut(slot as usize)? = fresh;
        return Some(slot);
    }
    if entries.len() >= capacity {
        return None;
    }
    entries.push(fresh);
    u32::try_from(entries.len() - 1).ok()
}

/// Coalesces `change` into the queued entry `e`: a read replaces a snapshot; of two snapshots
/// the later version is kept. Two CPUs' events of one session can reach the ring buffer in
/// the other order, and can even carry the same version (its increments are not atomic):
/// then neither is known to be the latest, and the table is read at send time.
fn coalesce(e: &mut Entry, change: Change, snapshots: &mut Snapshots) {
    let held = snapshots.get_mut(e.snapshot);
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
        snapshots.free(e.snapshot);
        e.snapshot = NO_SNAPSHOT;
    }
}

#[cfg(test)]
mod tests {
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

    /// Checks that every place in a line is its entry's, once, and the counts agree.
    fn check(b: &Backlog) {
        let mut places = HashMap::new();
        for (i, line) in b.lines.iter().enumerate() {
            for p in line {
                *places.entry((i, p.slot())).or_insert(0) += 1;
            }
        }
        let mut live = 0;
        let mut snapshots = HashSet::new();
        let listed: HashSet<u32> = b.retired.iter().copied().collect();
        let free: HashSet<u32> = b.free.iter().copied().collect();
        assert_eq!(free.len(), b.free.len(), "a slot freed twice");
        for (key, slot) in &b.index {
            let e = b.entries[*slot as usize];
            assert_eq!(e.key, *key);
            assert!(!b.free.contains(slot), "slot {slot} both free and held");
            for i in 0..b.lines.len() {
                let listed = places.get(&(i, *slot)).copied().unwrap_or(0);
                let waits = e.waiting & bit(i) != 0;
                assert_eq!(listed, usize::from(waits), "slot {slot} on line {i}");
            }
            if e.waiting != 0 {
                live += 1;
            } else {
                assert!(listed.contains(slot), "retired slot {slot} not listed");
            }
            if e.snapshot != NO_SNAPSHOT {
                assert!(
                    e.waiting & !b.silent != 0,
                    "an entry retired or only for silent peers keeps no snapshot"
                );
                assert!(snapshots.insert(e.snapshot), "snapshot slot shared");
            }
        }
        assert_eq!(live, b.live);
        assert_eq!(b.index.len(), b.held());
        assert!(b.held() <= b.capacity);
    }

    /// Random operations against a model of what each peer must still get: every key a peer
    /// takes was queued for it, at the latest version queued (or read), none is lost unless its
    /// line overflowed (a full sync then carries it), and a line overflows only when a new key
    /// finds every slot held for some peer. Small (10 keys, 6 slots: overflows all the time)
    /// and larger (200 keys, 64 slots: room made from the list of retired slots).
    #[test]
    fn random_operations_keep_the_backlog_whole() {
        run_model(6, 10, 50_000);
        run_model(64, 200, 50_000);
    }

    fn run_model(capacity: usize, keys: u64, steps: usize) {
        let now = Instant::now();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let peers = 3;
        let mut b = Backlog::new(capacity, &[true, true, true]);
        let mut windows: Vec<Window> = (0..peers).map(|_| Window::new(8)).collect();
        // Per peer: keys it must still get, with the latest version queued.
        let mut owed: Vec<HashMap<FlowKey, u32>> = vec![HashMap::new(); peers];
        let mut version = 0;
        for step in 0..steps {
            let peer = usize::try_from(next(3)).expect("small");
            match next(10) {
                0..=4 => {
                    version += 1;
                    let k = key(u32::try_from(next(keys)).expect("small"));
                    let (held, live, overflowed) = (b.held(), b.live, b.overflowed);
                    b.enqueue(k, snapshot(version), now);
                    if b.overflowed != overflowed {
                        assert!(
                            held == capacity && live == held,
                            "step {step}: room was left"
                        );
                    }
                    for (i, o) in owed.iter_mut().enumerate() {
                        if b.overflowed & bit(i) == 0 {
                            o.insert(k, version);
                        }
                    }
                }
                5..=6 if windows[peer].can_send() => {
                    let max = usize::try_from(next(4)).expect("small") + 1;
                    let (changes, oldest) = b.take(peer, max, now);
                    for (k, change) in &changes {
                        let want = owed[peer].remove(k).expect("a key it was owed");
                        if let Change::Snapshot(s) = change {
                            assert!(s.version >= want, "step {step}: stale snapshot");
                        }
                    }
                    let seq = windows[peer].next_seq();
                    windows[peer].sent(seq, &changes, oldest.unwrap_or(now));
                }
                7 => {
                    let (unacked, _) = windows[peer].unacked();
                    let n = b.requeue(peer, &unacked);
                    let mut newly = 0;
                    if b.overflowed & bit(peer) == 0 {
                        for (k, _) in unacked {
                            if let hash_map::Entry::Vacant(v) = owed[peer].entry(k) {
                                v.insert(0);
                                newly += 1;
                            }
                        }
                    }
                    assert_eq!(n, newly, "step {step}: requeued count");
                }
                8 => {
                    let seq = windows[peer].next_seq();
                    windows[peer].ack(seq);
                    b.set_silent(peer, next(2) == 0);
                }
                5..=6 => {}
                _ => {
                    if b.take_overflow(peer) {
                        b.clear_pending(peer);
                    }
                }
            }
            for (i, o) in owed.iter_mut().enumerate() {
                if b.overflowed & bit(i) != 0 {
                    // A full sync carries what it was owed.
                    o.clear();
                }
                assert_eq!(b.pending(i), o.len(), "step {step}: peer {i}");
            }
            check(&b);
        }
    }
}
