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

// Compiled in every build, not behind a feature: the agent's tests, the integration tests and
// the executable then share one compiled agent library (`cargo xtask test` builds it once).
pub mod model;
#[cfg(test)]
mod tests;
