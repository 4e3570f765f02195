//! The session table as the sync engine sees it: read what to send, walk it for a full sync,
//! apply what peers send, remove replicas. The datapath implements it with its table
//! programs and batch map calls; [`FakeTable`] implements it in memory with the same conflict
//! rule, so the engine's rules are unit-tested without root, and with a table that fails on
//! purpose.

use std::sync::Mutex;

use hasync_common::{
    conflict::unseen_replica, ApplyOutcome, ApplyRecord, ApplySource, FlowKey, MemberId, Session,
};

use crate::datapath::{batch::BatchCursor, Datapath, DatapathError};

/// What the engine needs of the session table.
pub trait SessionTable: Send + 'static {
    /// Where a walk resumes.
    type Cursor: Default + Send;

    /// The current state of `keys`, in order (`None`: not in the table).
    fn read(&self, keys: &[FlowKey], out: &mut Vec<Option<Session>>) -> Result<(), DatapathError>;

    /// The next chunk of at most `max` entries of a walk at `cursor`; whether more may follow.
    fn chunk(
        &self,
        cursor: &mut Self::Cursor,
        keys: &mut Vec<FlowKey>,
        values: &mut Vec<Session>,
        max: u32,
    ) -> Result<bool, DatapathError>;

    /// Applies records from `from` by the conflict rule (`hasync_common::conflict::resolve`).
    fn apply_records(
        &mut self,
        records: &[ApplyRecord],
        from: ApplySource,
        now_ns: u64,
    ) -> Result<ApplyOutcome, DatapathError>;

    /// Of `keys`, removes those that are still replicas of `owner`'s sessions that its full
    /// sync started at `mark_ns` neither wrote nor marked
    /// ([`hasync_common::conflict::unseen_replica`]: the owner no longer holds them), except
    /// those this member carries the flow of, which stay, orphaned.
    fn remove_if_unseen(
        &mut self,
        keys: &[FlowKey],
        owner: MemberId,
        mark_ns: u64,
    ) -> Result<Unseen, DatapathError>;
}

/// What became of the replicas a full sync found unseen.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Unseen {
    /// Removed.
    pub removed: usize,
    /// Kept, orphaned: this member carries their flows, to take them over.
    pub orphaned: usize,
}

impl Unseen {
    pub fn add(&mut self, o: Unseen) {
        self.removed += o.removed;
        self.orphaned += o.orphaned;
    }
}

impl SessionTable for Datapath {
    type Cursor = BatchCursor;

    fn read(&self, keys: &[FlowKey], out: &mut Vec<Option<Session>>) -> Result<(), DatapathError> {
        self.read_sessions(keys, out)
    }

    fn chunk(
        &self,
        cursor: &mut BatchCursor,
        keys: &mut Vec<FlowKey>,
        values: &mut Vec<Session>,
        max: u32,
    ) -> Result<bool, DatapathError> {
        self.session_chunk(cursor, keys, values, max)
    }

    fn apply_records(
        &mut self,
        records: &[ApplyRecord],
        from: ApplySource,
        now_ns: u64,
    ) -> Result<ApplyOutcome, DatapathError> {
        Datapath::apply_records(self, records, from, now_ns)
    }

    fn remove_if_unseen(
        &mut self,
        keys: &[FlowKey],
        owner: MemberId,
        mark_ns: u64,
    ) -> Result<Unseen, DatapathError> {
        let mut now = Vec::with_capacity(keys.len());
        self.read_sessions(keys, &mut now)?;
        // Read and removed under the caller's hold of the table: no apply comes between.
        // (The fast path may take one over in between; the window is the two calls.)
        let doomed: Vec<FlowKey> = keys
            .iter()
            .zip(&now)
            .filter(|(_, s)| s.is_some_and(|s| unseen_replica(&s, owner, mark_ns)))
            .map(|(k, _)| *k)
            .collect();
        // Removed as the owner's delete records are, by the apply program, so that a replica
        // this member carries the flow of stays, orphaned (`orphaned_by_removal`).
        let removals: Vec<ApplyRecord> = doomed
            .iter()
            .map(|k| ApplyRecord::removal(*k, owner, 0))
            .collect();
        let now = crate::datapath::monotonic_ns();
        let out = Datapath::apply_records(self, &removals, ApplySource::NONE, now)?;
        Ok(Unseen {
            removed: out.deleted as usize,
            orphaned: usize::from(out.orphaned),
        })
    }
}

/// Walks the whole table a chunk at a time, taking `table`'s lock for each chunk only, so
/// applies, sends and the event reader go on between chunks (a walk of a million sessions
/// under one hold would stall them), stopping early when `f` returns false.
pub fn walk_while<T: SessionTable>(
    table: &Mutex<T>,
    chunk: u32,
    mut f: impl FnMut(&[FlowKey], &[Session]) -> bool,
) -> Result<(), DatapathError> {
    let mut cursor = T::Cursor::default();
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    loop {
        let more = crate::lock::lock(table).chunk(&mut cursor, &mut keys, &mut values, chunk)?;
        if !f(&keys, &values) || !more {
            return Ok(());
        }
    }
}

/// An in-memory table with the datapath's conflict rule, for tests.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FakeTable {
    pub entries: Vec<(FlowKey, Session)>,
    /// Chunks a walk may read before the next one fails (`None`: never).
    pub chunks_before_failure: Option<usize>,
    /// Applying records fails.
    pub fail_applies: bool,
    /// Removing unseen replicas panics.
    pub panics_removing: bool,
    /// Keys asked for by `read` so far.
    pub keys_read: std::sync::atomic::AtomicUsize,
}

#[cfg(test)]
fn fake_failure(items: usize) -> DatapathError {
    DatapathError::BatchRejected {
        program: "fake",
        items,
        verdict: 0,
    }
}

#[cfg(test)]
impl FakeTable {
    pub fn get(&self, key: &FlowKey) -> Option<Session> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, s)| *s)
    }

    fn put(&mut self, key: FlowKey, s: Session) {
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some(e) => e.1 = s,
            None => self.entries.push((key, s)),
        }
    }
}

#[cfg(test)]
impl SessionTable for FakeTable {
    /// The index of the next entry.
    type Cursor = usize;

    fn read(&self, keys: &[FlowKey], out: &mut Vec<Option<Session>>) -> Result<(), DatapathError> {
        self.keys_read
            .fetch_add(keys.len(), std::sync::atomic::Ordering::Relaxed);
        out.clear();
        out.extend(keys.iter().map(|k| self.get(k)));
        Ok(())
    }

    fn chunk(
        &self,
        cursor: &mut usize,
        keys: &mut Vec<FlowKey>,
        values: &mut Vec<Session>,
        max: u32,
    ) -> Result<bool, DatapathError> {
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        let chunk_no = cursor.div_ceil(max.max(1));
        if self.chunks_before_failure.is_some_and(|n| chunk_no >= n) {
            return Err(fake_failure(max));
        }
        let part = self.entries.get(*cursor..).unwrap_or_default();
        let part = part.get(..max.min(part.len())).unwrap_or_default();
        keys.clear();
        values.clear();
        keys.extend(part.iter().map(|(k, _)| *k));
        values.extend(part.iter().map(|(_, s)| *s));
        *cursor += part.len();
        Ok(*cursor < self.entries.len())
    }

    fn apply_records(
        &mut self,
        records: &[ApplyRecord],
        from: ApplySource,
        now_ns: u64,
    ) -> Result<ApplyOutcome, DatapathError> {
        use hasync_common::conflict::{resolve, Resolution};
        if self.fail_applies {
            return Err(fake_failure(records.len()));
        }
        let mut out = ApplyOutcome::default();
        for r in records {
            let existing = self.get(&r.key);
            // Every copy may change hands here: this table knows no member's liveness.
            match resolve(r.op, &r.session, existing.as_ref(), from, true) {
                Resolution::Insert | Resolution::Replace => {
                    self.put(r.key, r.session);
                    out.installed += 1;
                }
                Resolution::Delete => {
                    self.entries.retain(|(k, _)| *k != r.key);
                    out.deleted += 1;
                }
                Resolution::Keep | Resolution::RefuseClaim => out.kept += 1,
                Resolution::Mark => {
                    if let Some(mut s) = existing {
                        s.last_event_ns = now_ns;
                        self.put(r.key, s);
                    }
                    out.kept += 1;
                }
            }
        }
        Ok(out)
    }

    fn remove_if_unseen(
        &mut self,
        keys: &[FlowKey],
        owner: MemberId,
        mark_ns: u64,
    ) -> Result<Unseen, DatapathError> {
        assert!(
            !self.panics_removing,
            "removing unseen replicas: a panic, as told"
        );
        let before = self.entries.len();
        self.entries
            .retain(|(k, s)| !(keys.contains(k) && unseen_replica(s, owner, mark_ns)));
        Ok(Unseen {
            removed: before - self.entries.len(),
            orphaned: 0,
        })
    }
}
