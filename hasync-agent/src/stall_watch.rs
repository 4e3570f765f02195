//! Did this agent stop running for a while (stopped, a paused VM, its workers starved)? A task
//! on the async workers, which also read the peers' keepalives, ticks every [`TICK`]; the
//! longest gap between two ticks since the membership last asked is how long keepalives could
//! not have been read. A peer's silence over such a gap is not held against it
//! (`Membership::forgive_stall`). The time between two evaluations of the membership is not
//! that measure: an evaluation that waited for the datapath's lock (a reattach) while the
//! workers ran and read nothing from a dead peer would forgive that peer's silence, again
//! after every such wait, and the peer might never be declared dead.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::task::JoinHandle;

use crate::lock::lock;

/// How often the watch ticks.
pub const TICK: Duration = Duration::from_millis(100);

/// The longest gap between two ticks since it was last taken.
#[derive(Debug)]
pub struct StallWatch {
    last_tick: Mutex<Option<Instant>>,
    longest_ns: AtomicU64,
}

impl Default for StallWatch {
    fn default() -> Self {
        StallWatch::new()
    }
}

impl StallWatch {
    pub fn new() -> StallWatch {
        StallWatch {
            last_tick: Mutex::new(None),
            longest_ns: AtomicU64::new(0),
        }
    }

    /// A tick at `now`: the gap since the previous one counts.
    pub fn tick(&self, now: Instant) {
        let mut last = lock(&self.last_tick);
        if let Some(prev) = *last {
            let gap = now.saturating_duration_since(prev);
            let ns = u64::try_from(gap.as_nanos()).unwrap_or(u64::MAX);
            self.longest_ns.fetch_max(ns, Ordering::Relaxed);
        }
        *last = Some(now.max(last.unwrap_or(now)));
    }

    /// The longest gap between two ticks since the last call; zero when they kept coming.
    pub fn take(&self) -> Duration {
        Duration::from_nanos(self.longest_ns.swap(0, Ordering::Relaxed))
    }

    /// Ticks `watch` every [`TICK`] on the async workers until the task is stopped.
    pub fn spawn(watch: Arc<StallWatch>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(TICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                watch.tick(Instant::now());
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_since_the_last_take_is_the_stall() {
        let w = StallWatch::new();
        let t0 = Instant::now();
        assert_eq!(w.take(), Duration::ZERO, "no ticks yet");
        w.tick(t0);
        w.tick(t0 + Duration::from_millis(100));
        w.tick(t0 + Duration::from_secs(30));
        w.tick(t0 + Duration::from_millis(30_100));
        assert_eq!(w.take(), Duration::from_millis(29_900));
        assert_eq!(w.take(), Duration::ZERO, "taken");
        w.tick(t0 + Duration::from_millis(30_200));
        assert_eq!(w.take(), Duration::from_millis(100));
    }
}
