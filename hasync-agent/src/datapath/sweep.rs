//! The expiry sweep: removes sessions idle past their state's timeout.
//!
//! The XDP program already treats an idle session as absent when a packet finds it; the sweep
//! frees the entry and turns it into a [`Removed`] "session ended" record for the rest of the
//! agent (sync, traffic log). It walks SESSIONS in chunks with batch lookups and deletes with
//! batch deletes, so memory stays at one chunk whatever the table size.
//!
//! # The race with the datapath
//!
//! There is no compare-and-delete for BPF maps. A session can change between our read and our
//! delete. A chunk's candidates are therefore read again just before the chunk's batch delete
//! (by the datapath's read program, a few hundred keys per run: [`SweptTable::settle`]), and
//! each is spared if it is no longer idle (a packet refreshed it, or recreated it after it had
//! expired). What remains is the window between that re-read and the delete (the re-reads of
//! the chunk's other candidates: microseconds, about a millisecond when a whole chunk expires
//! at once): a packet arriving then finds the old entry expired, the program replaces
//! it with a new session (UDP, ICMP, TCP SYN), and our delete removes that new session. The
//! next packet of a UDP/ICMP flow creates it again; a TCP handshake is delayed until the SYN
//! is retransmitted. We accept that: the entry was past its timeout anyway. For the program
//! to take it for expired too, the sweep judges expiry by its clock less the program's clock
//! lag ([`SweptTable::clock_lag_ns`], two ticks of the jiffies clock): judged by the agent's
//! clock alone, a session a few milliseconds past its timeout was still live to the program,
//! which refreshed it in place, and the delete then ended a running connection.
//!
//! Peers' records cannot come in that window: the agent applies them under its hold of the
//! datapath, which the sweep keeps from a chunk's re-read to its delete (a replica installed
//! and acknowledged in the window, then deleted, would be missing until the owner's next
//! refresh). The walk itself needs no hold: what it reads only picks the candidates.

use hasync_common::{DatapathConfig, FlowKey, MemberId, Session, State};

use super::batch::{BatchCursor, BatchError, BatchMap};

/// The session table a sweep works on.
pub trait SweptTable {
    type Error;

    /// Reads the next chunk at `cursor` (see [`BatchMap::lookup_batch`]); needs no hold of
    /// the table.
    fn walk(
        &self,
        cursor: &mut BatchCursor,
        keys: &mut Vec<FlowKey>,
        values: &mut Vec<Session>,
        chunk: u32,
    ) -> Result<bool, Self::Error>;

    /// Reads one key, whether the table holds it or not: a step between passes still finds
    /// out whether the table can be read.
    fn probe(&self) -> Result<(), Self::Error>;

    /// How far the clock the table's writer reads may run behind the sweep's (ns): a session
    /// is judged expired only that much later, so the writer takes it for expired too and
    /// never refreshes in place one the sweep then deletes.
    fn clock_lag_ns(&self) -> u64 {
        0
    }

    /// Holding the table (peers' records wait): reads `candidates` again into `fresh` (in
    /// order, one per candidate, `None` where the table has none), lets `pick` put the keys to
    /// delete in `doomed` (cleared first), and deletes them (keys gone meanwhile are skipped).
    /// On an error, `doomed` keeps the keys that were deleted before it (see
    /// [`delete_doomed`]).
    fn settle(
        &self,
        candidates: &[FlowKey],
        fresh: &mut Vec<Option<Session>>,
        doomed: &mut Vec<FlowKey>,
        pick: impl FnOnce(&[Option<Session>], &mut Vec<FlowKey>),
    ) -> Result<(), Self::Error>;
}

/// A plain map, which nothing else holds: one lookup syscall per candidate (tests).
impl SweptTable for BatchMap<'_, FlowKey, Session> {
    type Error = BatchError;

    fn walk(
        &self,
        cursor: &mut BatchCursor,
        keys: &mut Vec<FlowKey>,
        values: &mut Vec<Session>,
        chunk: u32,
    ) -> Result<bool, BatchError> {
        self.lookup_batch(cursor, keys, values, chunk)
    }

    fn probe(&self) -> Result<(), BatchError> {
        self.lookup(&FlowKey::default()).map(|_| ())
    }

    fn settle(
        &self,
        candidates: &[FlowKey],
        fresh: &mut Vec<Option<Session>>,
        doomed: &mut Vec<FlowKey>,
        pick: impl FnOnce(&[Option<Session>], &mut Vec<FlowKey>),
    ) -> Result<(), BatchError> {
        doomed.clear();
        reread_each(self, candidates, fresh)?;
        pick(fresh, doomed);
        delete_doomed(self, doomed)
    }
}

/// Reads `candidates` again into `fresh`, one lookup syscall each.
fn reread_each(
    map: &BatchMap<'_, FlowKey, Session>,
    candidates: &[FlowKey],
    fresh: &mut Vec<Option<Session>>,
) -> Result<(), BatchError> {
    fresh.clear();
    for key in candidates {
        fresh.push(map.lookup(key)?);
    }
    Ok(())
}

/// Deletes `doomed` from `map`; when that fails part way, `doomed` keeps only the keys handled
/// before the failure (deleted, or missing already), so that their removals are still told.
pub(super) fn delete_doomed(
    map: &BatchMap<'_, FlowKey, Session>,
    doomed: &mut Vec<FlowKey>,
) -> Result<(), BatchError> {
    if doomed.is_empty() {
        return Ok(());
    }
    map.delete_batch(doomed)
        .map(|_| ())
        .inspect_err(|e| match e {
            BatchError::Syscall { done, .. } => doomed.truncate(*done),
            _ => doomed.clear(),
        })
}

/// Why the sweep removed a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RemoveReason {
    /// Idle past the timeout of its state.
    Expired,
    /// TCP session in `closed`, kept for the closed timeout, now gone.
    Closed,
    /// Embryonic, evicted by the XDP program to admit a newer embryonic session (reported by
    /// an `Evicted` event, not found by the sweep).
    Evicted,
}

impl RemoveReason {
    pub const fn name(self) -> &'static str {
        match self {
            RemoveReason::Expired => "expired",
            RemoveReason::Closed => "closed",
            RemoveReason::Evicted => "evicted",
        }
    }
}

/// A session the sweep removed, as it was last seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Removed {
    pub key: FlowKey,
    pub session: Session,
    pub reason: RemoveReason,
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Sessions looked at.
    pub scanned: u64,
    /// Sessions removed for being idle past their state's timeout.
    pub expired: u64,
    /// Closed TCP sessions removed after the closed timeout.
    pub closed: u64,
    /// Candidates that were refreshed, recreated or evicted before we deleted them.
    pub spared: u64,
}

impl SweepReport {
    /// Sessions removed.
    pub fn removed(&self) -> u64 {
        self.expired + self.closed
    }
}

/// Whether `session` should be removed at `now` (session clock ns), and why.
///
/// Same rule as the XDP program ([`hasync_common::session::expired`]; an unknown state has
/// timeout 0), and a `last_seen_ns` after `now` counts as not idle at all.
pub fn verdict(cfg: &DatapathConfig, session: &Session, now: u64) -> Option<RemoveReason> {
    let timeout = cfg.timeout_ns(session.state);
    if !hasync_common::session::expired(now, session.last_seen_ns, timeout) {
        return None;
    }
    Some(if session.state == State::Closed as u8 {
        RemoveReason::Closed
    } else {
        RemoveReason::Expired
    })
}

/// Sweeps the session `table` with `cfg`'s timeouts, `chunk` entries at a time.
/// `on_removed` gets each chunk's removed sessions right after they were deleted.
pub fn sweep<T: SweptTable>(
    table: &T,
    cfg: &DatapathConfig,
    chunk: u32,
    on_removed: impl FnMut(&[Removed]),
) -> Result<SweepReport, T::Error> {
    sweep_with_clock(table, cfg, chunk, super::monotonic_ns, on_removed)
}

/// [`sweep`] reading the time from `clock` (session clock ns; tests use their own).
fn sweep_with_clock<T: SweptTable>(
    table: &T,
    cfg: &DatapathConfig,
    chunk: u32,
    clock: impl Fn() -> u64,
    mut on_removed: impl FnMut(&[Removed]),
) -> Result<SweepReport, T::Error> {
    let mut pass = Pass::default();
    let mut cursor = BatchCursor::new();
    while pass.chunk(table, cfg, chunk, &clock, &mut cursor, &mut on_removed)? {}
    Ok(pass.count.report)
}

/// Owner slots counted by a sweep: member ids 0–16.
pub const OWNER_SLOTS: usize = MemberId::MAX as usize + 1;

/// The work of one pass over the table, chunk by chunk.
#[derive(Default)]
struct Pass {
    count: Count,
    keys: Vec<FlowKey>,
    values: Vec<Session>,
    /// The chunk's sessions found expired, and what their re-read found.
    candidates: Vec<FlowKey>,
    fresh: Vec<Option<Session>>,
    removed: Vec<Removed>,
    doomed: Vec<FlowKey>,
}

/// What a pass has counted so far.
#[derive(Default)]
struct Count {
    report: SweepReport,
    /// The sessions kept.
    kept: Tally,
    /// The earliest time a session the pass kept expires (session clock ns).
    earliest_expiry: Option<u64>,
}

impl Count {
    /// Counts `session`, which the pass leaves in the table, and notes when it expires.
    fn keep(&mut self, cfg: &DatapathConfig, session: &Session) {
        self.kept.add(session);
        let expiry = session
            .last_seen_ns
            .saturating_add(cfg.timeout_ns(session.state));
        self.earliest_expiry = Some(self.earliest_expiry.map_or(expiry, |e| e.min(expiry)));
    }

    fn count_removed(&mut self, removed: &[Removed]) {
        for r in removed {
            match r.reason {
                RemoveReason::Expired => self.report.expired += 1,
                RemoveReason::Closed => self.report.closed += 1,
                // Evictions are the XDP program's, reported by events.
                RemoveReason::Evicted => {}
            }
        }
    }
}

impl Pass {
    /// Looks at the next chunk at `cursor`, removes what expired and counts the rest by owner.
    /// Returns whether more may follow.
    fn chunk<T: SweptTable>(
        &mut self,
        table: &T,
        cfg: &DatapathConfig,
        chunk: u32,
        clock: &impl Fn() -> u64,
        cursor: &mut BatchCursor,
        on_removed: &mut impl FnMut(&[Removed]),
    ) -> Result<bool, T::Error> {
        let more = table.walk(cursor, &mut self.keys, &mut self.values, chunk)?;
        self.count.report.scanned += self.keys.len() as u64;
        // Read the clock after the lookup: nothing we saw is newer than `now`.
        let lag = table.clock_lag_ns();
        self.pick_candidates(cfg, clock().saturating_sub(lag));
        if self.candidates.is_empty() {
            return Ok(more);
        }
        // Re-read right before deleting (see the module docs for the window left), and judge
        // what was read by a clock read after it.
        let Pass {
            count,
            candidates,
            fresh,
            removed,
            doomed,
            ..
        } = self;
        removed.clear();
        let settled = table.settle(candidates, fresh, doomed, |fresh, doomed| {
            debug_assert_eq!(fresh.len(), candidates.len(), "one re-read per candidate");
            let now = clock().saturating_sub(lag);
            for (key, fresh) in candidates.iter().zip(fresh) {
                judge(count, cfg, now, *key, *fresh, removed, doomed);
            }
        });
        // `removed` and `doomed` are filled in step; after a failure, what was deleted before
        // it is still told.
        removed.truncate(doomed.len());
        if !removed.is_empty() {
            count.count_removed(removed);
            on_removed(removed);
        }
        settled?;
        Ok(more)
    }

    /// Keeps the chunk's sessions still live at `now` and makes the others candidates.
    fn pick_candidates(&mut self, cfg: &DatapathConfig, now: u64) {
        self.candidates.clear();
        for (key, session) in self.keys.iter().zip(&self.values) {
            if verdict(cfg, session, now).is_none() {
                self.count.keep(cfg, session);
            } else {
                self.candidates.push(*key);
            }
        }
    }
}

/// Dooms candidate `key` if its re-read copy `fresh` is still expired at `now`; spares it
/// otherwise.
fn judge(
    count: &mut Count,
    cfg: &DatapathConfig,
    now: u64,
    key: FlowKey,
    fresh: Option<Session>,
    removed: &mut Vec<Removed>,
    doomed: &mut Vec<FlowKey>,
) {
    match fresh.map(|s| (s, verdict(cfg, &s, now))) {
        Some((session, Some(reason))) => {
            removed.push(Removed {
                key,
                session,
                reason,
            });
            doomed.push(key);
        }
        Some((session, None)) => {
            count.report.spared += 1;
            count.keep(cfg, &session);
        }
        None => count.report.spared += 1,
    }
}

/// What a pass counted of the sessions it left in the table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Sessions in all.
    pub total: u64,
    /// Of them, sessions with no reply yet.
    pub embryonic: u64,
    /// Per owner id (index = member id); an owner past [`MemberId::MAX`] counts in `total`
    /// only.
    pub by_owner: [u64; OWNER_SLOTS],
}

impl Tally {
    /// Counts `session`.
    pub fn add(&mut self, session: &Session) {
        self.total += 1;
        self.embryonic += u64::from(session.is_embryonic());
        if let Some(n) = self.by_owner.get_mut(usize::from(session.owner.0)) {
            *n += 1;
        }
    }
}

/// A completed pass of an [`IncrementalSweep`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassSummary {
    pub report: SweepReport,
    /// The sessions it left in the table.
    pub kept: Tally,
    /// How long the pass took, from its start to its end (session clock ns): its first
    /// chunks' counts are that much older than its end.
    pub took_ns: u64,
}

/// A sweep spread over many short steps, so the agent never holds the table for long: each
/// step looks at a bounded number of sessions and the next one resumes where it stopped.
/// A pass that completes also tells what it left in the table: sessions in all, embryonic,
/// and by owner ([`Tally`]).
///
/// A new pass starts only when a session may have expired since the last one started: at the
/// earliest expiry among the sessions that pass kept, but no sooner than [`MIN_REST`] after
/// it started, and at the latest the shortest timeout after it started (a session created or
/// changed since expires no sooner). The cost of a pass is the map's size, not the table's: a
/// small table in a large map was walked whole ten times a second, and is now walked at most
/// once a second, and less often when nothing expires sooner. An expired session leaves the
/// table at most a pass plus [`MIN_REST`] after it expired, or, for one written after its pass
/// went by (a peer's replica carries its owner's idle time; a chunk that failed), at most a
/// pass plus the shortest timeout after it was written; the XDP program treats it as absent
/// from the moment it expires. Its counts are as old as the last pass. A step between
/// passes reads one key, so its result still says whether the table can be read (the
/// session-table condition counts on it).
#[derive(Default)]
pub struct IncrementalSweep {
    cursor: BatchCursor,
    pass: Pass,
    /// When the pass under way started (session clock ns); `None` between passes.
    started: Option<u64>,
    /// When the next pass is due (session clock ns).
    next_pass_at: u64,
    /// How many times the caller's budget a step looks at: doubled after a step that found
    /// at least one in [`BUSY_SHARE`] expired, up to [`MAX_PACE`], halved after one that did
    /// not (0 reads as 1).
    pace: u64,
}

/// Most times the caller's budget a step looks at: a table that churns short connections
/// faster than the base pace removes them would otherwise fill with expired ones (which no
/// new flow can take the place of: only the sweep removes them).
pub const MAX_PACE: u64 = 8;
/// A step that found at least one in this many sessions expired speeds the next one up.
const BUSY_SHARE: u64 = 8;
/// How long a sped-up step goes on past its base budget (the chunk under way is finished): it
/// runs on the agent's main loop, which drains the datapath's events meanwhile (every removal
/// of this member's own sessions also writes a traffic-log line and queues a record).
pub const STEP_TIME: std::time::Duration = std::time::Duration::from_millis(25);

/// The least time between the starts of two passes.
pub const MIN_REST: u64 = 1_000_000_000;

/// The shortest timeout of `cfg`'s states.
fn shortest_timeout(cfg: &DatapathConfig) -> u64 {
    cfg.timeouts_ns.iter().copied().min().unwrap_or(0)
}

impl IncrementalSweep {
    /// Looks at up to about `budget` sessions (in chunks of `chunk`); returns the summary when
    /// this step completed a pass over the table (a later step starts a new one when one is
    /// due).
    pub fn step<T: SweptTable>(
        &mut self,
        table: &T,
        cfg: &DatapathConfig,
        chunk: u32,
        budget: u64,
        on_removed: impl FnMut(&[Removed]),
    ) -> Result<Option<PassSummary>, T::Error> {
        self.step_with_clock(table, cfg, chunk, budget, &super::monotonic_ns, on_removed)
    }

    fn step_with_clock<T: SweptTable>(
        &mut self,
        table: &T,
        cfg: &DatapathConfig,
        chunk: u32,
        budget: u64,
        clock: &impl Fn() -> u64,
        mut on_removed: impl FnMut(&[Removed]),
    ) -> Result<Option<PassSummary>, T::Error> {
        if self.started.is_none() {
            let now = clock();
            if now < self.next_pass_at {
                // Resting, the step still reads the table once, so a table that cannot be
                // read shows in its result as it did in every walk's.
                table.probe()?;
                return Ok(None);
            }
            self.started = Some(now);
        }
        let report = |pass: &Pass| (pass.count.report.scanned, pass.count.report.removed());
        let (scanned, removed) = report(&self.pass);
        let started = std::time::Instant::now();
        let base = budget;
        let budget = budget.saturating_mul(self.pace.max(1));
        // The base budget whatever the time; a sped-up step only while it is under STEP_TIME.
        let in_time = |done: u64| done < base || started.elapsed() < STEP_TIME;
        let mut more = true;
        while more
            && self.pass.count.report.scanned - scanned < budget
            && in_time(self.pass.count.report.scanned - scanned)
        {
            more = self
                .pass
                .chunk(table, cfg, chunk, clock, &mut self.cursor, &mut on_removed)?;
        }
        let (scanned_now, removed_now) = report(&self.pass);
        self.pace_after(scanned_now - scanned, removed_now - removed);
        Ok((!more).then(|| self.finish_pass(cfg, clock)))
    }

    /// Sets the next step's pace from what this one found.
    fn pace_after(&mut self, scanned: u64, removed: u64) {
        let pace = self.pace.max(1);
        self.pace = if scanned > 0 && removed.saturating_mul(BUSY_SHARE) >= scanned {
            pace.saturating_mul(2).min(MAX_PACE)
        } else {
            (pace / 2).max(1)
        };
    }

    /// Ends the pass under way and schedules the next one (see [`IncrementalSweep`]).
    fn finish_pass(&mut self, cfg: &DatapathConfig, clock: &impl Fn() -> u64) -> PassSummary {
        let done = std::mem::take(&mut self.pass).count;
        self.cursor = BatchCursor::new();
        let started = self.started.take().unwrap_or_else(clock);
        let latest = started.saturating_add(shortest_timeout(cfg));
        let soonest = started.saturating_add(MIN_REST);
        self.next_pass_at = done
            .earliest_expiry
            .map_or(latest, |e| e.max(soonest).min(latest));
        PassSummary {
            report: done.report,
            kept: done.kept,
            took_ns: clock().saturating_sub(started),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, os::fd::AsFd as _};

    use crate::datapath::batch::BatchMap;

    use hasync_common::{MemberId, ZoneId};

    use super::*;
    use crate::datapath::{
        monotonic_ns,
        testing::{create_map, datapath, BPF_MAP_TYPE_LRU_HASH},
    };

    const S: u64 = 1_000_000_000;

    fn key(i: u32) -> FlowKey {
        FlowKey {
            addr_lo: [i, 0, 0, 0],
            addr_hi: [!i, 0, 0, 0],
            port_lo: 1,
            port_hi: 2,
            proto: 17,
            family: 4,
            _pad: [0; 2],
        }
    }

    /// A session last seen `idle_s` seconds before `now`. Callers keep `now` larger than any
    /// idle time: CLOCK_MONOTONIC starts near boot, so a young host has small values.
    fn session(state: State, idle_s: u64, now: u64) -> Session {
        Session {
            created_ns: now.saturating_sub(7200 * S),
            last_seen_ns: now - idle_s * S,
            last_event_ns: now - idle_s * S,
            packets: [1, 1],
            bytes: [60, 60],
            version: 3,
            zone: ZoneId(1),
            flags: Default::default(),
            owner: MemberId(1),
            state: state as u8,
            tcp_flags: [0, 0],
            ticket: 0,
            reply_zone: ZoneId::NONE,
            tcp_track: [0; 2],
            max_win: [0; 2],
            seq_end: [0; 2],
        }
    }

    /// (state, idle seconds, expected verdict) with the default timeouts.
    const TABLE: &[(State, u64, Option<RemoveReason>)] = &[
        (State::Established, 3599, None),
        (State::Established, 3601, Some(RemoveReason::Expired)),
        (State::SynSent, 10, None),
        (State::SynSent, 21, Some(RemoveReason::Expired)),
        (State::Closing, 121, Some(RemoveReason::Expired)),
        (State::Closed, 9, None),
        (State::Closed, 11, Some(RemoveReason::Closed)),
        (State::UdpNew, 29, None),
        (State::UdpNew, 31, Some(RemoveReason::Expired)),
        (State::UdpReplied, 119, None),
        (State::IcmpEcho, 7, Some(RemoveReason::Expired)),
    ];

    #[test]
    fn verdicts_follow_the_timeout_of_each_state() {
        let cfg = DatapathConfig::with_defaults(MemberId(1));
        let now = NOW;
        for &(state, idle, want) in TABLE {
            assert_eq!(
                verdict(&cfg, &session(state, idle, now), now),
                want,
                "{state:?} idle {idle}s"
            );
        }
        // Seen after `now` (another CPU updated it meanwhile): not idle.
        let mut s = session(State::IcmpEcho, 0, now);
        s.last_seen_ns = now + S;
        assert_eq!(verdict(&cfg, &s, now), None);
        // An unknown state has no timeout, as in the XDP program.
        s.state = 200;
        s.last_seen_ns = now - 1;
        assert_eq!(verdict(&cfg, &s, now), Some(RemoveReason::Expired));
    }

    /// A fixed point on a fake CLOCK_MONOTONIC, later than every idle time in [`TABLE`].
    const NOW: u64 = 10_000 * S;

    /// Fills a map with `copies` sessions of each table row as of [`NOW`]; returns the
    /// expectation per key.
    fn fill(
        map: &BatchMap<'_, FlowKey, Session>,
        copies: u32,
    ) -> HashMap<FlowKey, Option<RemoveReason>> {
        let now = NOW;
        let mut want = HashMap::new();
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for c in 0..copies {
            for (i, &(state, idle, reason)) in TABLE.iter().enumerate() {
                let k = key(c * TABLE.len() as u32 + i as u32);
                keys.push(k);
                values.push(session(state, idle, now));
                want.insert(k, reason);
            }
        }
        map.update_batch(&keys, &values, 0).expect("fill");
        want
    }

    #[test]
    fn an_incremental_sweep_covers_the_table_in_bounded_steps_and_counts_what_it_keeps() {
        let owned = create_map::<FlowKey, Session>(BPF_MAP_TYPE_LRU_HASH, 8192);
        let map = BatchMap::new(owned.as_fd()).expect("FlowKey → Session map");
        let want = fill(&map, 200);
        let live = want.values().filter(|r| r.is_none()).count() as u64;
        let cfg = DatapathConfig::with_defaults(MemberId(1));
        let mut sweep = IncrementalSweep::default();
        let mut removed = 0;
        let mut steps = 0;
        let summary = loop {
            steps += 1;
            assert!(steps < 100, "no pass completed");
            let done = sweep
                .step_with_clock(&map, &cfg, 64, 500, &|| NOW, |r| removed += r.len())
                .expect("step");
            if let Some(done) = done {
                break done;
            }
        };
        // About half are expired: the steps speed up (500, 1,000, 2,000 ...).
        assert!(
            steps >= 3,
            "{} sessions in steps of about 500 and more took {steps} steps",
            want.len()
        );
        assert_eq!(summary.report.scanned, want.len() as u64);
        assert_eq!(removed as u64, summary.report.removed());
        assert_eq!(
            summary.kept.by_owner[1], live,
            "every kept session is member 1's"
        );
        assert_eq!(summary.kept.by_owner.iter().sum::<u64>(), live);
        assert_eq!(summary.kept.total, live);
        let embryonic_rows = TABLE
            .iter()
            .filter(|(state, idle, reason)| {
                reason.is_none() && session(*state, *idle, NOW).is_embryonic()
            })
            .count() as u64;
        assert!(embryonic_rows > 0 && embryonic_rows * 200 < live);
        assert_eq!(summary.kept.embryonic, embryonic_rows * 200);
        // A new pass over what is left starts when the first kept session may expire: in 1 s.
        let mut step_at =
            |now: u64| step_once(&mut sweep, &map, &cfg, now).map(|p| p.report.scanned);
        assert_eq!(
            step_at(NOW + S - 1),
            None,
            "no session may have expired yet"
        );
        assert_eq!(step_at(NOW + S), Some(live));
    }

    /// A sweep that finds much expired speeds up, a step at a time, and slows down again over
    /// live sessions: 20,000 closed sessions among 20,000 live ones are gone in one pass of
    /// steps of a base of 500 that grow (13 of them when each fits its time; before stop 42
    /// every step took 500, whatever it found, and a churn of short connections faster than
    /// that pace filled the table; seen failing, 3,300 gone in 13 steps).
    #[test]
    fn a_sweep_that_finds_much_expired_speeds_up_and_slows_down_over_live_sessions() {
        let owned = create_map::<FlowKey, Session>(BPF_MAP_TYPE_LRU_HASH, 65_536);
        let map = BatchMap::new(owned.as_fd()).expect("FlowKey → Session map");
        let fill_with = |from: u32, n: u32, state: State, idle: u64| {
            let keys: Vec<_> = (from..from + n).map(key).collect();
            let values = vec![session(state, idle, NOW); keys.len()];
            map.update_batch(&keys, &values, 0).expect("fill");
        };
        fill_with(0, 20_000, State::Closed, 11);
        fill_with(20_000, 20_000, State::Established, 0);
        let cfg = DatapathConfig::with_defaults(MemberId(1));
        let mut sweep = IncrementalSweep::default();
        let mut removed = 0;
        // Each step's sessions looked at, until a pass ends (or 60 steps).
        let pass_at = |sweep: &mut IncrementalSweep, now: u64, removed: &mut usize| {
            let mut scanned = Vec::new();
            while scanned.len() < 60 {
                let before = sweep.pass.count.report.scanned;
                let done = sweep
                    .step_with_clock(&map, &cfg, 64, 500, &|| now, |r| *removed += r.len())
                    .expect("step");
                let n = done.map_or(sweep.pass.count.report.scanned, |d| d.report.scanned);
                scanned.push(n - before);
                if done.is_some() {
                    break;
                }
            }
            scanned
        };
        let first = pass_at(&mut sweep, NOW, &mut removed);
        let fastest = first.iter().copied().max().unwrap_or(0);
        assert!(
            removed == 20_000 && fastest >= 2 * 500,
            "{removed} removed in steps of {first:?}"
        );
        let next = sweep.next_pass_at;
        let second = pass_at(&mut sweep, next, &mut removed);
        assert_eq!(second.iter().sum::<u64>(), 20_000, "{second:?}");
        assert!(
            second.get(4).is_some_and(|&n| n <= 500 + 64),
            "over live sessions the steps slow to their base again: {second:?}"
        );
    }

    /// A sped-up step ends at its time limit past its base budget: here chunks of 64 that
    /// take 5 ms each stop a step of 8 × 64 after about five (before the review of stop 42's
    /// pace, a step ran through its whole budget on the agent's main loop: seen failing, the
    /// whole pass in one step).
    #[test]
    fn a_step_ends_at_its_time_limit() {
        let owned = create_map::<FlowKey, Session>(BPF_MAP_TYPE_LRU_HASH, 32_768);
        let map = BatchMap::new(owned.as_fd()).expect("FlowKey → Session map");
        let keys: Vec<_> = (0..20_000).map(key).collect();
        let values = vec![session(State::Closed, 11, NOW); keys.len()];
        map.update_batch(&keys, &values, 0).expect("fill");
        let cfg = DatapathConfig::with_defaults(MemberId(1));
        let slow = Odd {
            pause: std::time::Duration::from_millis(5),
            ..Odd::of(&map)
        };
        let mut sweep = IncrementalSweep {
            pace: MAX_PACE,
            ..IncrementalSweep::default()
        };
        let done = sweep
            .step_with_clock(&slow, &cfg, 64, 64, &|| NOW, |_| {})
            .expect("step");
        let scanned = sweep.pass.count.report.scanned;
        assert!(
            done.is_none() && (64..8 * 64).contains(&scanned),
            "{scanned} scanned, the pass ended: {}",
            done.is_some()
        );
    }

    /// One step of `sweep` at `now`, with a budget larger than the tests' tables.
    fn step_once(
        sweep: &mut IncrementalSweep,
        map: &BatchMap<'_, FlowKey, Session>,
        cfg: &DatapathConfig,
        now: u64,
    ) -> Option<PassSummary> {
        sweep
            .step_with_clock(map, cfg, 64, 1 << 20, &|| now, |_| {})
            .expect("step")
    }

    #[test]
    fn a_new_pass_waits_for_the_shortest_timeout_when_nothing_expires_sooner() {
        let owned = create_map::<FlowKey, Session>(BPF_MAP_TYPE_LRU_HASH, 64);
        let map = BatchMap::new(owned.as_fd()).expect("FlowKey → Session map");
        map.update_batch(&[key(1)], &[session(State::Established, 0, NOW)], 0)
            .expect("fill");
        let cfg = DatapathConfig::with_defaults(MemberId(1));
        let shortest = State::ALL
            .iter()
            .map(|s| s.default_timeout_s() * S)
            .min()
            .expect("states");
        let mut sweep = IncrementalSweep::default();
        let mut step_at =
            |now: u64| step_once(&mut sweep, &map, &cfg, now).map(|p| p.report.scanned);
        assert_eq!(step_at(NOW), Some(1));
        assert_eq!(step_at(NOW + S), None);
        assert_eq!(step_at(NOW + shortest - 1), None);
        assert_eq!(step_at(NOW + shortest), Some(1));
        // An empty table too: a session created after a pass started expires no sooner.
        map.delete_batch(&[key(1)]).expect("empty");
        assert_eq!(step_at(NOW + 2 * shortest), Some(0));
        assert_eq!(step_at(NOW + 3 * shortest - 1), None);
        assert_eq!(step_at(NOW + 3 * shortest), Some(0));
    }

    #[test]
    fn passes_start_at_most_once_per_minimum_rest() {
        let owned = create_map::<FlowKey, Session>(BPF_MAP_TYPE_LRU_HASH, 64);
        let map = BatchMap::new(owned.as_fd()).expect("FlowKey → Session map");
        // Expires half a second after the pass that keeps it starts.
        let mut soon = session(State::UdpNew, 0, NOW);
        soon.last_seen_ns = NOW + S / 2 - State::UdpNew.default_timeout_s() * S;
        map.update_batch(&[key(1)], &[soon], 0).expect("fill");
        let cfg = DatapathConfig::with_defaults(MemberId(1));
        let mut sweep = IncrementalSweep::default();
        let mut step_at =
            |now: u64| step_once(&mut sweep, &map, &cfg, now).map(|p| p.report.removed());
        assert_eq!(step_at(NOW), Some(0));
        assert_eq!(
            step_at(NOW + S / 2),
            None,
            "expired, but the rest is not over"
        );
        assert_eq!(step_at(NOW + MIN_REST - 1), None);
        assert_eq!(step_at(NOW + MIN_REST), Some(1));
    }

    #[test]
    fn sweep_removes_idle_sessions_chunk_by_chunk() {
        let owned = create_map::<FlowKey, Session>(BPF_MAP_TYPE_LRU_HASH, 8192);
        let map = BatchMap::new(owned.as_fd()).expect("FlowKey → Session map");
        let want = fill(&map, 200);
        let cfg = DatapathConfig::with_defaults(MemberId(1));
        let mut seen = Vec::new();
        let mut largest = 0;
        let report = sweep_with_clock(
            &map,
            &cfg,
            64,
            || NOW,
            |removed| {
                largest = largest.max(removed.len());
                seen.extend(removed.iter().map(|r| (r.key, r.reason)));
            },
        )
        .expect("sweep");

        let expected: Vec<_> = want
            .iter()
            .filter_map(|(k, r)| r.map(|r| (*k, r)))
            .collect();
        assert_eq!(report.scanned, want.len() as u64);
        assert_eq!(report.removed() as usize, expected.len());
        assert_eq!(report.closed, 200);
        assert_eq!(report.spared, 0);
        assert!(
            largest <= 64,
            "a callback got {largest} removals for a chunk of 64"
        );
        let seen: HashMap<_, _> = seen.into_iter().collect();
        assert_eq!(seen, expected.into_iter().collect());
        // What is left is exactly the live sessions.
        let left = map.for_each_chunk(100, |k, _| {
            assert!(k.iter().all(|k| want[k].is_none()));
        });
        assert_eq!(
            left.expect("walk"),
            want.values().filter(|r| r.is_none()).count() as u64
        );
    }

    /// A candidate refreshed between the scan and its re-read is spared: left in the table,
    /// and counted among the sessions the pass kept.
    #[test]
    fn a_session_refreshed_after_the_scan_is_spared_and_counted() {
        let owned = create_map::<FlowKey, Session>(BPF_MAP_TYPE_LRU_HASH, 64);
        let map = BatchMap::new(owned.as_fd()).expect("FlowKey → Session map");
        let (stale, refreshed) = (key(1), key(2));
        let old = session(State::UdpNew, 60, NOW);
        map.update_batch(&[stale, refreshed], &[old, old], 0)
            .expect("fill");
        // Read 1 starts the pass, read 2 follows the chunk's scan: a packet for `refreshed`
        // "arrives" then, before the sweep re-reads its candidates.
        let reads = std::cell::Cell::new(0);
        let clock = || {
            reads.set(reads.get() + 1);
            if reads.get() == 2 {
                // Taken over by member 2 meanwhile: the count is of the session re-read.
                let mut fresh = old;
                fresh.last_seen_ns = NOW;
                fresh.owner = MemberId(2);
                map.update_batch(&[refreshed], &[fresh], 0)
                    .expect("refresh");
            }
            NOW
        };
        let cfg = DatapathConfig::with_defaults(MemberId(1));
        let mut removed = Vec::new();
        let pass = IncrementalSweep::default()
            .step_with_clock(&map, &cfg, 64, 100, &clock, |r| {
                removed.extend(r.iter().map(|r| r.key))
            })
            .expect("a step")
            .expect("the whole table in one step");
        let report = pass.report;
        assert_eq!((report.scanned, report.expired, report.spared), (2, 1, 1));
        assert_eq!(removed, [stale]);
        assert!(map.lookup(&refreshed).expect("lookup").is_some());
        assert_eq!((pass.kept.total, pass.kept.by_owner[2]), (1, 1));
    }

    /// A session expired by less than the writer's clock lags is kept: the XDP program, whose
    /// jiffies clock runs up to two ticks behind the agent's, still takes it for live and
    /// refreshes it in place, and a delete then would end a running connection (before stop
    /// 42: seen failing, both removed). One expired by more goes.
    #[test]
    fn a_session_expired_by_less_than_the_writers_clock_lag_is_kept() {
        let owned = create_map::<FlowKey, Session>(BPF_MAP_TYPE_LRU_HASH, 64);
        let map = BatchMap::new(owned.as_fd()).expect("FlowKey → Session map");
        let timeout = State::Established.default_timeout_s() * S;
        let expired_by = |ns: u64| {
            let mut s = session(State::Established, 0, NOW);
            s.last_seen_ns = NOW - timeout - ns;
            s
        };
        let (barely, long) = (key(1), key(2));
        map.update_batch(&[barely, long], &[expired_by(3_000_000), expired_by(S)], 0)
            .expect("fill");
        let cfg = DatapathConfig::with_defaults(MemberId(1));
        let table = Odd {
            lag: 8_000_000,
            ..Odd::of(&map)
        };
        let mut removed = Vec::new();
        IncrementalSweep::default()
            .step_with_clock(&table, &cfg, 64, 64, &|| NOW, |r| {
                removed.extend(r.iter().map(|r| r.key))
            })
            .expect("step");
        assert_eq!(removed, [long]);
        assert!(map.lookup(&barely).expect("lookup").is_some());
    }

    /// A map as a test needs it: each chunk's walk takes `pause`, its writer's clock runs
    /// `lag` ns behind the sweep's, and with `ok_deletes` a batch delete fails after its first
    /// keys, as a kernel error part way would.
    struct Odd<'m> {
        map: &'m BatchMap<'m, FlowKey, Session>,
        pause: std::time::Duration,
        lag: u64,
        ok_deletes: Option<usize>,
    }

    impl<'m> Odd<'m> {
        fn of(map: &'m BatchMap<'m, FlowKey, Session>) -> Self {
            Odd {
                map,
                pause: std::time::Duration::ZERO,
                lag: 0,
                ok_deletes: None,
            }
        }
    }

    impl SweptTable for Odd<'_> {
        type Error = BatchError;

        fn walk(
            &self,
            cursor: &mut BatchCursor,
            keys: &mut Vec<FlowKey>,
            values: &mut Vec<Session>,
            chunk: u32,
        ) -> Result<bool, BatchError> {
            std::thread::sleep(self.pause);
            self.map.walk(cursor, keys, values, chunk)
        }

        fn probe(&self) -> Result<(), BatchError> {
            self.map.probe()
        }

        fn settle(
            &self,
            candidates: &[FlowKey],
            fresh: &mut Vec<Option<Session>>,
            doomed: &mut Vec<FlowKey>,
            pick: impl FnOnce(&[Option<Session>], &mut Vec<FlowKey>),
        ) -> Result<(), BatchError> {
            let Some(ok) = self.ok_deletes else {
                return self.map.settle(candidates, fresh, doomed, pick);
            };
            doomed.clear();
            reread_each(self.map, candidates, fresh)?;
            pick(fresh, doomed);
            let ok = ok.min(doomed.len());
            self.map.delete_batch(&doomed[..ok])?;
            doomed.truncate(ok);
            Err(BatchError::Syscall {
                op: super::super::batch::BatchOp::Delete,
                done: ok,
                source: std::io::Error::from_raw_os_error(libc::EIO),
            })
        }

        fn clock_lag_ns(&self) -> u64 {
            self.lag
        }
    }

    /// A delete that fails part way still has the removals it made told (logged, and sent to
    /// peers by the caller), and only those: the next pass removes and tells the rest.
    #[test]
    fn removals_before_a_failed_delete_are_still_told() {
        let owned = create_map::<FlowKey, Session>(BPF_MAP_TYPE_LRU_HASH, 64);
        let map = BatchMap::new(owned.as_fd()).expect("FlowKey → Session map");
        let expired: Vec<FlowKey> = (0..10).map(key).collect();
        map.update_batch(&expired, &[session(State::UdpNew, 60, NOW); 10], 0)
            .expect("fill");
        let cfg = DatapathConfig::with_defaults(MemberId(1));
        let mut told = Vec::new();
        let failing = Odd {
            ok_deletes: Some(4),
            ..Odd::of(&map)
        };
        let failed = sweep_with_clock(
            &failing,
            &cfg,
            64,
            || NOW,
            |r| told.extend(r.iter().map(|r| r.key)),
        );
        assert!(failed.is_err(), "{failed:?}");
        assert_eq!(told.len(), 4, "the deletes made before the failure");
        assert!(told
            .iter()
            .all(|k| map.lookup(k).expect("lookup").is_none()));
        let report = sweep_with_clock(
            &map,
            &cfg,
            64,
            || NOW,
            |r| told.extend(r.iter().map(|r| r.key)),
        )
        .expect("sweep");
        assert_eq!(report.expired, 6);
        told.sort_by_key(|k| k.addr_lo[0]);
        assert_eq!(told, expired, "each removal told once");
    }

    /// The datapath re-reads a chunk's candidates with its read program, several runs of keys
    /// for a large chunk: each candidate is judged by its own fresh copy, in order.
    #[test]
    fn the_datapath_rereads_a_chunks_candidates_by_program_runs() {
        let dp = datapath();
        let map = dp.sessions_batch().expect("SESSIONS");
        let n = 3 * hasync_common::table_programs::READ_BATCH as u32 + 5;
        let keys: Vec<FlowKey> = (0..n).map(key).collect();
        let mut values = vec![session(State::UdpNew, 60, NOW); keys.len()];
        // One live session in every ten.
        let live = |i: usize| i.is_multiple_of(10);
        for v in values.iter_mut().step_by(10) {
            *v = session(State::UdpNew, 1, NOW);
        }
        map.update_batch(&keys, &values, 0).expect("fill");
        // After the scan, before the re-read: every seventh key refreshed (taken over by member
        // 2), every eleventh gone.
        let refreshed = |i: usize| !live(i) && i.is_multiple_of(7);
        let changed = |i: usize| refreshed(i) || (!live(i) && i.is_multiple_of(11));
        let reads = std::cell::Cell::new(0);
        let clock = || {
            reads.set(reads.get() + 1);
            if reads.get() == 1 {
                for (i, k) in keys.iter().enumerate().filter(|&(i, _)| changed(i)) {
                    if refreshed(i) {
                        let mut fresh = session(State::UdpNew, 0, NOW);
                        fresh.owner = MemberId(2);
                        map.update_batch(&[*k], &[fresh], 0).expect("refresh");
                    } else {
                        map.delete_batch(&[*k]).expect("delete");
                    }
                }
            }
            NOW
        };
        let cfg = DatapathConfig::with_defaults(MemberId(1));
        let mut removed = Vec::new();
        // Removed sessions by key index (`key(i)`), checked against the key each came from.
        let report = sweep_with_clock(&dp, &cfg, 2 * n, clock, |r| {
            removed.extend(r.iter().map(|r| {
                let i = r.key.addr_lo[0];
                assert_eq!(r.key, key(i));
                (i as usize, r.session.owner)
            }))
        })
        .expect("sweep");
        assert_eq!(reads.get(), 2, "the whole table in one chunk");
        let doomed: Vec<(usize, MemberId)> = (0..keys.len())
            .filter(|&i| !live(i) && !changed(i))
            .map(|i| (i, MemberId(1)))
            .collect();
        removed.sort_unstable();
        assert_eq!(removed, doomed);
        let spared = (0..keys.len()).filter(|&i| changed(i)).count() as u64;
        assert_eq!(
            (report.scanned, report.expired, report.spared),
            (n.into(), doomed.len() as u64, spared)
        );
        for (i, k) in keys.iter().enumerate() {
            let left = map.lookup(k).expect("lookup");
            let want = live(i) || refreshed(i);
            assert_eq!(left.is_some(), want, "key {i}");
        }
    }

    #[test]
    fn datapath_sweep_uses_the_live_config() {
        let mut dp = datapath();
        // The real clock here: this needs a host up for more than 40 s.
        let now = monotonic_ns();
        assert!(now > 40 * S, "host up for less than 40 s");
        let live = (key(1), session(State::UdpNew, 5, now));
        let old = (key(2), session(State::UdpNew, 40, now));
        dp.insert_sessions(&[live, old]).expect("insert");
        assert_eq!(dp.sessions().expect("dump").len(), 2);

        let mut removed = Vec::new();
        let report = dp
            .sweep(16, |r| removed.extend_from_slice(r))
            .expect("sweep");
        assert_eq!((report.scanned, report.expired), (2, 1));
        assert_eq!(
            removed,
            vec![Removed {
                key: old.0,
                session: old.1,
                reason: RemoveReason::Expired
            }]
        );
        assert_eq!(dp.session(&old.0).expect("lookup"), None);

        // Shorter timeout for udp-new: the other one goes too.
        let mut cfg = dp.config().expect("config");
        cfg.timeouts_ns[State::UdpNew as usize] = S;
        dp.set_config(&cfg).expect("set config");
        let report = dp.sweep(16, |_| {}).expect("sweep");
        assert_eq!((report.scanned, report.expired), (1, 1));
        assert!(dp.sessions().expect("dump").is_empty());
    }
}
