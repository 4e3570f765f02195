//! Finding the replicas a peer no longer holds, without a walk at the end of its full sync.
//!
//! When an authoritative full sync from owner X starts, a thread walks the table (a chunk per
//! hold of its lock, like every walk) and collects the keys of X's replicas held then. Each
//! frame of the full sync strikes the keys it carried. At the end, only the keys left are
//! looked at again, and those still unseen since the start ([`unseen_replica`]) are removed:
//! X closed or lost them while this member could not hear of it. The walk runs while the full
//! sync streams in, so the end costs a lookup of the few keys left, not a walk of the table.
//!
//! A key the walk adds after its frame went by stays a candidate; the look at the end keeps
//! it (the frame marked it seen). Memory: one key per replica of X, at most the table.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc, Mutex, Weak,
    },
    thread::JoinHandle,
};

use hasync_common::{FlowKey, MemberId, SessionFlags};

use super::table::{walk_while, SessionTable, Unseen};
use crate::{
    datapath::{DatapathError, DEFAULT_CHUNK},
    lock::lock,
};

type KeySet = HashSet<FlowKey, foldhash::quality::RandomState>;

/// The candidates of one running full sync.
pub struct StaleScan {
    owner: MemberId,
    keys: Arc<Mutex<KeySet>>,
    stop: Arc<AtomicBool>,
    walk: Option<JoinHandle<Result<(), DatapathError>>>,
    /// Held by the walk's thread alone: see [`Walking`].
    walking: Weak<()>,
}

/// Whether a walk's thread still runs, after its full sync was abandoned too (it stops at its
/// next chunk, which may wait for the table's lock).
#[derive(Clone, Debug, Default)]
pub struct Walking(Weak<()>);

impl Walking {
    pub fn running(&self) -> bool {
        self.0.strong_count() > 0
    }

    /// Running while `alive` is held.
    #[cfg(test)]
    pub fn of(alive: &Arc<()>) -> Walking {
        Walking(Arc::downgrade(alive))
    }
}

impl std::fmt::Debug for StaleScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaleScan")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl StaleScan {
    /// Starts collecting `owner`'s replicas held in `table` now.
    pub fn start<T: SessionTable>(table: Arc<Mutex<T>>, owner: MemberId) -> StaleScan {
        let keys = Arc::new(Mutex::new(KeySet::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (k, s) = (keys.clone(), stop.clone());
        let alive = Arc::new(());
        let walking = Arc::downgrade(&alive);
        let walk = std::thread::Builder::new()
            .name("hasync-stale".into())
            .spawn(move || {
                let _alive = alive;
                walk_while(&table, DEFAULT_CHUNK, |chunk, sessions| {
                    let mut set = lock(&k);
                    set.extend(chunk.iter().zip(sessions).filter_map(|(key, s)| {
                        (s.owner == owner && s.flags.has(SessionFlags::FROM_PEER)).then_some(*key)
                    }));
                    !s.load(Relaxed)
                })
            });
        let walk = match walk {
            Ok(handle) => Some(handle),
            // No thread: nothing is collected, so nothing will be removed (stale replicas stay
            // until they expire), never a live one.
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the stale-replica walk");
                None
            }
        };
        StaleScan {
            owner,
            keys,
            stop,
            walk,
            walking,
        }
    }

    /// Whether its walk's thread still runs (however its full sync ended).
    pub fn walking(&self) -> Walking {
        Walking(self.walking.clone())
    }

    /// The full sync carried `keys`: they are not stale.
    pub fn carried<'a>(&self, keys: impl IntoIterator<Item = &'a FlowKey>) {
        let mut set = lock(&self.keys);
        for k in keys {
            set.remove(k);
        }
    }

    /// The full sync started at `mark_ns` ended with every record applied: waits for the walk,
    /// then removes the candidates still unseen (those whose flows this member carries stay,
    /// orphaned).
    pub fn finish<T: SessionTable>(
        mut self,
        table: &Mutex<T>,
        mark_ns: u64,
    ) -> Result<Unseen, DatapathError> {
        let mut unseen = Unseen::default();
        if let Some(walk) = self.walk.take() {
            match walk.join() {
                Ok(r) => r?,
                Err(_) => return Ok(unseen),
            }
        }
        let left: Vec<FlowKey> = lock(&self.keys).drain().collect();
        for part in left.chunks(DEFAULT_CHUNK as usize) {
            unseen.add(lock(table).remove_if_unseen(part, self.owner, mark_ns)?);
        }
        Ok(unseen)
    }
}

impl Drop for StaleScan {
    /// An abandoned full sync (its connection lost, a newer one started): the walk stops at
    /// its next chunk.
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use hasync_common::{flow::IPPROTO_UDP, Family, Session};

    use super::*;
    use crate::sync::table::FakeTable;

    fn key(i: u32) -> FlowKey {
        FlowKey::canonical(Family::V4, IPPROTO_UDP, [10, 0, 0, i], 1, [2, 0, 0, 0], 2).0
    }

    fn replica(owner: u8, seen: u64) -> Session {
        Session {
            owner: MemberId(owner),
            flags: SessionFlags(SessionFlags::FROM_PEER),
            last_event_ns: seen,
            ..Session::default()
        }
    }

    /// Of owner 2's replicas held at the start, those the full sync carried or marked stay;
    /// the others go. Other owners' replicas and local sessions are never candidates.
    #[test]
    fn only_uncarried_unmarked_replicas_of_the_owner_go() {
        let mark = 100;
        let mut entries: Vec<(FlowKey, Session)> = (0..500)
            .map(|i| (key(i), replica(if i % 5 == 0 { 3 } else { 2 }, 10)))
            .collect();
        entries.push((key(900), Session::default()));
        let table = Arc::new(Mutex::new(FakeTable {
            entries,
            ..FakeTable::default()
        }));
        let scan = StaleScan::start(table.clone(), MemberId(2));
        // The full sync carries keys 0..200, which marks them seen.
        let carried: Vec<FlowKey> = (0..200).map(key).collect();
        for (k, s) in lock(&table).entries.iter_mut() {
            if carried.contains(k) {
                s.last_event_ns = mark + 1;
            }
        }
        scan.carried(&carried);
        let removed = scan.finish(&table, mark).expect("finish");
        let held: Vec<u32> = (0..500)
            .filter(|&i| lock(&table).get(&key(i)).is_some())
            .collect();
        let expected: Vec<u32> = (0..500).filter(|&i| i < 200 || i % 5 == 0).collect();
        assert_eq!(held, expected);
        assert_eq!(removed.removed, 500 - expected.len());
        assert!(lock(&table).get(&key(900)).is_some(), "local session kept");
    }

    /// Dropping a scan (its full sync abandoned) stops the walk and removes nothing.
    #[test]
    fn an_abandoned_scan_removes_nothing() {
        let entries = (0..300).map(|i| (key(i), replica(2, 10))).collect();
        let table = Arc::new(Mutex::new(FakeTable {
            entries,
            ..FakeTable::default()
        }));
        drop(StaleScan::start(table.clone(), MemberId(2)));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(lock(&table).entries.len(), 300);
    }

    /// A walk that fails is an error at the end (and removes nothing), never an empty result
    /// that would pass for "nothing stale" or a partial one that would remove live replicas.
    #[test]
    fn a_failed_walk_is_an_error() {
        let entries = (0..600).map(|i| (key(i), replica(2, 10))).collect();
        let table = Arc::new(Mutex::new(FakeTable {
            entries,
            chunks_before_failure: Some(2),
            ..FakeTable::default()
        }));
        let scan = StaleScan::start(table.clone(), MemberId(2));
        assert!(scan.finish(&table, 100).is_err());
        assert_eq!(lock(&table).entries.len(), 600);
    }
}
