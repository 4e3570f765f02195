//! The session table as the expiry sweep works on it ([`SweptTable`]): the datapath itself,
//! or, for the agent's incremental sweep, a walk through a descriptor of its own beside the
//! agent's lock of the datapath, which is taken only to re-read and delete a chunk's
//! candidates ([`SweepBeside`]).

use std::sync::Mutex;

use hasync_common::{maps as names, FlowKey, Session};

use super::{
    batch::{BatchCursor, BatchMap},
    batch_err, replica_room,
    sweep::{delete_doomed, IncrementalSweep, PassSummary, Removed, SweptTable},
    Datapath, DatapathError, JiffyClock, SessionReader, DEFAULT_CHUNK,
};
use crate::lock::lock;

/// Sessions a sweep step walks per batch lookup.
const STEP_CHUNK: u32 = DEFAULT_CHUNK * 8;

/// The datapath, held by its caller for the whole sweep ([`Datapath::sweep`]): candidates are
/// re-read by the read program, a batch of keys per run.
impl SweptTable for Datapath {
    type Error = DatapathError;

    fn walk(
        &self,
        cursor: &mut BatchCursor,
        keys: &mut Vec<FlowKey>,
        values: &mut Vec<Session>,
        chunk: u32,
    ) -> Result<bool, DatapathError> {
        self.session_chunk(cursor, keys, values, chunk)
    }

    fn probe(&self) -> Result<(), DatapathError> {
        self.session(&FlowKey::default()).map(|_| ())
    }

    fn settle(
        &self,
        candidates: &[FlowKey],
        fresh: &mut Vec<Option<Session>>,
        doomed: &mut Vec<FlowKey>,
        pick: impl FnOnce(&[Option<Session>], &mut Vec<FlowKey>),
    ) -> Result<(), DatapathError> {
        doomed.clear();
        let map = self.sessions_batch()?;
        self.read_sessions(candidates, fresh)?;
        pick(fresh, doomed);
        let deleted = delete_doomed(&map, doomed).map_err(batch_err(names::SESSIONS));
        // What was deleted, also before a failure (which a failed release does not hide: the
        // next count of the pool makes up for that).
        let released = self.release_replicas(replica_room::pooled(candidates, fresh, doomed));
        deleted.and(released)
    }

    fn clock_lag_ns(&self) -> u64 {
        clock_lag_ns(self.clock())
    }
}

/// How far the session clock the XDP program reads may run behind the agent's: two ticks of
/// the jiffies clock (its margin, a tick handler's latency, and a sample between the kernel's
/// two updates: `JiffyClock::drifted` allows as much before the clock is measured again);
/// nothing on the coarse clock helper, the agent's own clock.
fn clock_lag_ns(clock: Option<JiffyClock>) -> u64 {
    clock.map_or(0, |c| 2 * u64::from(c.ns_per_jiffy))
}

/// The table walked through `map`, a descriptor of its own (a [`SessionReader`]'s), with no
/// lock; `dp` is locked only to settle a chunk's candidates, so peers' records wait for that
/// alone.
struct Beside<'a> {
    map: BatchMap<'a, FlowKey, Session>,
    dp: &'a Mutex<Datapath>,
    /// [`SweptTable::clock_lag_ns`], as of the step's start.
    lag: u64,
}

impl<'a> Beside<'a> {
    fn new(
        reader: &'a SessionReader,
        dp: &'a Mutex<Datapath>,
        clock: Option<JiffyClock>,
    ) -> Result<Self, DatapathError> {
        Ok(Beside {
            map: reader.map()?,
            dp,
            lag: clock_lag_ns(clock),
        })
    }
}

impl SweptTable for Beside<'_> {
    type Error = DatapathError;

    fn walk(
        &self,
        cursor: &mut BatchCursor,
        keys: &mut Vec<FlowKey>,
        values: &mut Vec<Session>,
        chunk: u32,
    ) -> Result<bool, DatapathError> {
        self.map
            .lookup_batch(cursor, keys, values, chunk)
            .map_err(batch_err(names::SESSIONS))
    }

    fn probe(&self) -> Result<(), DatapathError> {
        self.map
            .lookup(&FlowKey::default())
            .map(|_| ())
            .map_err(batch_err(names::SESSIONS))
    }

    fn settle(
        &self,
        candidates: &[FlowKey],
        fresh: &mut Vec<Option<Session>>,
        doomed: &mut Vec<FlowKey>,
        pick: impl FnOnce(&[Option<Session>], &mut Vec<FlowKey>),
    ) -> Result<(), DatapathError> {
        lock(self.dp).settle(candidates, fresh, doomed, pick)
    }

    fn clock_lag_ns(&self) -> u64 {
        self.lag
    }
}

/// The agent's incremental sweep (see [`IncrementalSweep`]), walking beside its lock of the
/// datapath through a descriptor of its own (opened at the first step and kept).
#[derive(Default)]
pub struct SweepBeside {
    state: IncrementalSweep,
    reader: Option<SessionReader>,
}

impl SweepBeside {
    /// One step: about `budget` sessions, with the live CONFIG's timeouts, the session clock
    /// checked first (as [`Datapath::sweep`] does). `dp` is locked briefly to set the step up
    /// and then for each chunk's re-read and delete only. Every step also runs the read
    /// program once and reads the table through its descriptor, so its result says whether
    /// both ways of reading the table work, whether or not anything expired.
    pub fn step(
        &mut self,
        dp: &Mutex<Datapath>,
        budget: u64,
        on_removed: impl FnMut(&[Removed]),
    ) -> Result<Option<PassSummary>, DatapathError> {
        let (cfg, reader, clock) = {
            let mut dp = lock(dp);
            dp.keep_clock();
            dp.read_sessions(&[FlowKey::default()], &mut Vec::new())?;
            let reader = match self.reader.take() {
                Some(reader) => reader,
                None => dp.session_reader()?,
            };
            (dp.config()?, reader, dp.clock())
        };
        let table = Beside::new(self.reader.insert(reader), dp, clock)?;
        self.state
            .step(&table, &cfg, STEP_CHUNK, budget, on_removed)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::mpsc::{self, RecvTimeoutError},
        thread,
        time::Duration,
    };

    use hasync_common::{DatapathConfig, MemberId, State};

    use super::*;
    use crate::datapath::{
        monotonic_ns,
        sweep::SweepReport,
        testing::{datapath, udp_key},
    };

    const S: u64 = 1_000_000_000;

    fn udp(last_seen_ns: u64) -> Session {
        Session {
            state: State::UdpNew as u8,
            last_seen_ns,
            owner: MemberId(1),
            ..Session::default()
        }
    }

    /// Runs one whole pass beside `dp` on another thread; the report comes back on the
    /// returned channel.
    fn pass_beside<'s>(
        scope: &'s thread::Scope<'s, '_>,
        reader: &'s SessionReader,
        dp: &'s Mutex<Datapath>,
        cfg: &'s DatapathConfig,
    ) -> mpsc::Receiver<Result<Option<SweepReport>, DatapathError>> {
        let (tx, rx) = mpsc::channel();
        scope.spawn(move || {
            // Steps until the pass ends (a step that waited for the lock may end at its time
            // limit before).
            let step = Beside::new(reader, dp, None).and_then(|table| {
                let mut sweep = IncrementalSweep::default();
                for _ in 0..100 {
                    if let Some(pass) = sweep.step(&table, cfg, 64, 1 << 20, |_| {})? {
                        return Ok(Some(pass));
                    }
                }
                Ok(None)
            });
            tx.send(step.map(|p| p.map(|p| p.report)))
        });
        rx
    }

    /// The walk takes no lock: a pass over live sessions ends while another holder keeps the
    /// datapath; a pass that found expired sessions waits for the datapath to re-read and
    /// delete them, and removes them once it is free.
    #[test]
    fn a_step_walks_beside_the_datapaths_lock() {
        let mut dp = datapath();
        let now = monotonic_ns();
        assert!(now > 100 * S, "host up for less than 100 s");
        let live: Vec<_> = (0..300).map(|i| (udp_key(i), udp(now))).collect();
        dp.insert_sessions(&live).expect("insert");
        let reader = dp.session_reader().expect("reader");
        let cfg = dp.config().expect("config");
        let dp = Mutex::new(dp);
        thread::scope(|s| {
            let held = lock(&dp);
            let rx = pass_beside(s, &reader, &dp, &cfg);
            let walked = rx.recv_timeout(Duration::from_secs(5));
            drop(held);
            let report = walked.expect("the walk waited for the lock").expect("step");
            assert_eq!(report.map(|r| (r.scanned, r.removed())), Some((300, 0)));
        });

        let expired: Vec<_> = (300..600)
            .map(|i| (udp_key(i), udp(now - 100 * S)))
            .collect();
        lock(&dp).insert_sessions(&expired).expect("insert");
        thread::scope(|s| {
            let held = lock(&dp);
            let rx = pass_beside(s, &reader, &dp, &cfg);
            let early = rx.recv_timeout(Duration::from_millis(300));
            drop(held);
            assert!(
                matches!(early, Err(RecvTimeoutError::Timeout)),
                "the candidates were settled while another held the datapath: {early:?}"
            );
            let report = rx.recv_timeout(Duration::from_secs(5)).expect("no pass");
            let report = report.expect("step").expect("a whole pass");
            assert_eq!((report.scanned, report.expired), (600, 300));
        });
        let left = lock(&dp).sessions().expect("dump");
        assert_eq!(left.len(), 300);
        assert!(left.iter().all(|(_, s)| s.last_seen_ns == now));
    }
}
