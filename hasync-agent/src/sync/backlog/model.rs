//! A model of what each peer must still get, run op by op against a [`Backlog`] read from
//! bytes: the backlog's random-operations test and the `backlog` fuzz target
//! (`hasync_tests::fuzz::backlog`) drive it, so both check one set of rules.
//!
//! After every op: the backlog's own bookkeeping holds ([`audit`]); each peer has exactly the
//! keys the model owes it queued; a line overflows only when a new key finds every slot held
//! for some peer (then a full sync carries what it was owed). Each change a peer takes was owed
//! to it and is no older than what was queued for it: a read if a read was queued (a removal
//! must never go out as an older snapshot), else a snapshot of the latest version queued (the
//! same session, when two snapshots of one version were queued that agree) or a read.

use std::collections::{hash_map::Entry, HashMap, HashSet};

use hasync_common::{conflict::version_after, Family, FlowKey, Session};

use super::{bit, Backlog, Change, NO_SNAPSHOT};
use crate::sync::window::Window;

/// Frames a peer may have unacknowledged in the model (the engine's window is larger: a small
/// one reaches its limit in a short input).
const WINDOW: usize = 8;

/// What a peer is owed of one key.
#[derive(Clone, Copy, Debug, Default)]
struct Owed {
    /// A read was queued: only a read will do.
    read: bool,
    /// The latest snapshot queued, by version (serial-number order).
    latest: Option<Session>,
    /// Another snapshot of the latest's version that differs was queued too: neither is known
    /// to be the latest, so a snapshot of that version will not do (a newer one will).
    conflict: bool,
}

impl Owed {
    fn queue(&mut self, change: Change) {
        let Change::Snapshot(s) = change else {
            self.read = true;
            return;
        };
        match self.latest {
            Some(held) if s.version == held.version => self.conflict |= s != held,
            Some(held) if !version_after(s.version, held.version) => {}
            _ => (self.latest, self.conflict) = (Some(s), false),
        }
    }

    /// Whether `change` satisfies what was owed.
    fn satisfied_by(&self, change: &Change) -> Result<(), String> {
        let Change::Snapshot(s) = change else {
            return Ok(());
        };
        if self.read {
            return Err("a snapshot where a read was queued".into());
        }
        let Some(latest) = self.latest else {
            return Ok(());
        };
        if version_after(latest.version, s.version) {
            return Err(format!(
                "snapshot version {} sent, {} was queued",
                s.version, latest.version
            ));
        }
        if s.version == latest.version && (self.conflict || *s != latest) {
            return Err(format!(
                "a snapshot of version {} sent, of which differing ones were queued",
                s.version
            ));
        }
        Ok(())
    }
}

/// One operation, read from two bytes.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// A change of key `key` queued for every peer: a read, a newer snapshot, an older one
    /// (out of order), another of the version last queued, or one far ahead.
    Enqueue { key: u32, how: u8 },
    /// Peer `peer` takes up to `max` changes into a frame (if its window has room).
    Take { peer: usize, max: usize },
    /// Peer `peer`'s link fails: what it had unacknowledged is queued again.
    LinkFails { peer: usize },
    /// Peer `peer` acknowledges the frames sent but the last `unacked` of them.
    Ack { peer: usize, unacked: u64 },
    /// Peer `peer` falls silent or is heard again.
    Silent { peer: usize, silent: bool },
    /// Peer `peer`'s sender starts a full sync if its line overflowed, or if `anyway` (the
    /// peer asked for one): what was queued for it is forgotten.
    FullSync { peer: usize, anyway: bool },
}

impl Op {
    fn read(b: [u8; 2], peers: usize, keys: u32) -> Op {
        let peer = usize::from(b[0] >> 3) % peers;
        let flag = b[0] >> 5;
        match b[0] % 8 {
            0..=2 => Op::Enqueue {
                key: u32::from(b[1]) % keys,
                how: flag,
            },
            3 => Op::Take {
                peer,
                max: usize::from(b[1] % 8) + 1,
            },
            4 => Op::LinkFails { peer },
            5 => Op::Ack {
                peer,
                unacked: u64::from(b[1] % 4),
            },
            6 => Op::Silent {
                peer,
                silent: flag & 1 == 0,
            },
            _ => Op::FullSync {
                peer,
                anyway: flag & 1 == 1,
            },
        }
    }
}

/// A backlog and what its peers are owed.
struct Model {
    b: Backlog,
    /// The peers changes are queued for.
    targets: Vec<bool>,
    windows: Vec<Window>,
    owed: Vec<HashMap<FlowKey, Owed>>,
    /// The last version queued, and the session it went with.
    last: Session,
}

/// Runs the operations `data` describes: its first three bytes are the capacity (1–64
/// keys), the peers (1–4 in the low bits; a bit set above them for each of peers 2–4 that
/// gets nothing queued, as one that does not sync sessions) and the keys used (1–256), then
/// two bytes an operation. Returns the first rule broken, naming the operation.
pub fn run(data: &[u8]) -> Result<(), String> {
    let [capacity, peers_byte, keys, ops @ ..] = data else {
        return Ok(());
    };
    let capacity = usize::from(capacity % 64) + 1;
    let peers = usize::from(peers_byte % 4) + 1;
    let targets: Vec<bool> = (0..peers)
        .map(|i| i == 0 || (peers_byte >> (1 + i)) & 1 == 0)
        .collect();
    let keys = u32::from(*keys) + 1;
    let mut m = Model {
        b: Backlog::new(capacity, &targets),
        targets,
        windows: (0..peers).map(|_| Window::new(WINDOW)).collect(),
        owed: vec![HashMap::new(); peers],
        // Versions wrap around within a long input.
        last: Session {
            version: u32::MAX - 10_000,
            ..Session::default()
        },
    };
    for (step, pair) in ops.chunks_exact(2).enumerate() {
        let op = Op::read([pair[0], pair[1]], peers, keys);
        m.step(op)
            .and_then(|()| m.settle())
            .map_err(|e| format!("operation {step} ({op:?}): {e}"))?;
    }
    Ok(())
}

impl Model {
    fn step(&mut self, op: Op) -> Result<(), String> {
        let now = std::time::Instant::now();
        match op {
            Op::Enqueue { key, how } => self.enqueue(key_of(key), how, now)?,
            Op::Take { peer, max } if self.windows[peer].can_send() => {
                let (changes, oldest) = self.b.take(peer, max, now);
                for (k, change) in &changes {
                    let owed = self.owed[peer].remove(k).ok_or("a key not owed taken")?;
                    owed.satisfied_by(change)?;
                }
                let seq = self.windows[peer].next_seq();
                self.windows[peer].sent(seq, &changes, oldest.unwrap_or(now));
            }
            Op::Take { .. } => {}
            Op::LinkFails { peer } => self.link_fails(peer)?,
            Op::Ack { peer, unacked } => {
                let sent = self.windows[peer].next_unsent().saturating_sub(1);
                self.windows[peer].ack(sent.saturating_sub(unacked));
            }
            Op::Silent { peer, silent } => self.b.set_silent(peer, silent),
            Op::FullSync { peer, anyway } => {
                if self.b.take_overflow(peer) || anyway {
                    self.b.clear_pending(peer);
                    self.owed[peer].clear();
                }
            }
        }
        Ok(())
    }

    fn enqueue(&mut self, key: FlowKey, how: u8, now: std::time::Instant) -> Result<(), String> {
        let change = self.change(how);
        let (held, live, overflowed) = (self.b.held(), self.b.live, self.b.overflowed);
        self.b.enqueue(key, change, now);
        if self.b.overflowed != overflowed && !(held == self.b.capacity && live == held) {
            return Err(format!(
                "a line overflowed with room left ({held} held, {live} live)"
            ));
        }
        for (i, owed) in self.owed.iter_mut().enumerate() {
            if self.targets[i] && self.b.overflowed & bit(i) == 0 {
                owed.entry(key).or_default().queue(change);
            }
        }
        Ok(())
    }

    /// The change `how` names, after the last one queued.
    fn change(&mut self, how: u8) -> Change {
        let last = self.last;
        let version = match how {
            0 => return Change::Read,
            1..=4 => last.version.wrapping_add(1),
            5 => last.version.wrapping_sub(3),
            6 => last.version,
            _ => last.version.wrapping_add(1000),
        };
        // The same version as the last, as another CPU's event may carry: other counters.
        let packets = if how == 6 {
            last.packets[0].wrapping_add(1)
        } else {
            0
        };
        let s = Session {
            version,
            packets: [packets, 0],
            ..Session::default()
        };
        if how != 5 {
            self.last = s;
        }
        Change::Snapshot(s)
    }

    fn link_fails(&mut self, peer: usize) -> Result<(), String> {
        let (unacked, _) = self.windows[peer].unacked();
        let n = self.b.requeue(peer, &unacked);
        let mut newly = 0;
        if self.targets[peer] && self.b.overflowed & bit(peer) == 0 {
            let fresh: HashSet<FlowKey> = unacked.iter().map(|(k, _)| *k).collect();
            for k in fresh {
                // Sent once: what it is sent as now is whatever the others get, or a read.
                if let Entry::Vacant(v) = self.owed[peer].entry(k) {
                    v.insert(Owed::default());
                    newly += 1;
                }
            }
        }
        if n != newly {
            return Err(format!("{n} keys requeued, {newly} were not queued"));
        }
        Ok(())
    }

    /// After an operation: a line that overflowed is owed nothing (a full sync carries it), and
    /// every line holds what is owed.
    fn settle(&mut self) -> Result<(), String> {
        for (i, owed) in self.owed.iter_mut().enumerate() {
            if self.b.overflowed & bit(i) != 0 {
                owed.clear();
            }
            if self.b.pending(i) != owed.len() {
                return Err(format!(
                    "peer {i} has {} queued, is owed {}",
                    self.b.pending(i),
                    owed.len()
                ));
            }
        }
        audit(&self.b)
    }
}

/// Key number `i`.
fn key_of(i: u32) -> FlowKey {
    FlowKey::canonical(Family::V4, 17, [1, 0, i, 0], 1, [2, 0, 0, 0], 2).0
}

/// The backlog's own bookkeeping: every place in a line is its entry's, once; each held key's
/// entry is in the index, live or listed as retired; no slot is free and held or freed twice;
/// a snapshot only for an entry some peer that is not silent waits for, in a slot of its own;
/// the counts agree, and no more than the capacity is held.
pub fn audit(b: &Backlog) -> Result<(), String> {
    let mut places = HashMap::new();
    for (i, line) in b.lines.iter().enumerate() {
        for p in line {
            *places.entry((i, p.slot())).or_insert(0) += 1;
        }
    }
    let listed: HashSet<u32> = b.retired.iter().copied().collect();
    let free: HashSet<u32> = b.free.iter().copied().collect();
    if free.len() != b.free.len() {
        return Err("a slot freed twice".into());
    }
    let (mut live, mut snapshots) = (0, HashSet::new());
    for (key, slot) in &b.index {
        let e = b
            .entries
            .get(*slot as usize)
            .ok_or(format!("slot {slot} indexed past the entries"))?;
        if e.key != *key {
            return Err(format!("slot {slot} holds another key than its index says"));
        }
        if free.contains(slot) {
            return Err(format!("slot {slot} both free and held"));
        }
        for i in 0..b.lines.len() {
            let placed = places.get(&(i, *slot)).copied().unwrap_or(0);
            if placed != usize::from(e.waiting & bit(i) != 0) {
                return Err(format!("slot {slot} is {placed} times on line {i}"));
            }
        }
        if e.waiting != 0 {
            live += 1;
        } else if !listed.contains(slot) {
            return Err(format!("retired slot {slot} not listed"));
        }
        if e.snapshot != NO_SNAPSHOT {
            if e.waiting & !b.silent == 0 {
                return Err(format!(
                    "slot {slot} keeps a snapshot, retired or only for silent peers"
                ));
            }
            if !snapshots.insert(e.snapshot) {
                return Err(format!("snapshot slot {} shared", e.snapshot));
            }
        }
    }
    if live != b.live || b.index.len() != b.held() || b.held() > b.capacity {
        return Err(format!(
            "counts disagree: {live} live (counted {}), {} indexed, {} held, capacity {}",
            b.live,
            b.index.len(),
            b.held(),
            b.capacity
        ));
    }
    Ok(())
}
