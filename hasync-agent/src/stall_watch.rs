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

    /// The longest gap between two ticks since the last call, or since the last tick to
    /// `now` if that is longer (the workers may not have ticked yet after a stall when this
    /// is asked); zero when they kept coming. A gap counted here is not counted again by the
    /// next tick.
    pub fn take(&self, now: Instant) -> Duration {
        let mut last = lock(&self.last_tick);
        let running = last.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        if last.is_some() {
            *last = Some(now.max(last.unwrap_or(now)));
        }
        let longest = Duration::from_nanos(self.longest_ns.swap(0, Ordering::Relaxed));
        longest.max(running)
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

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_longest_gap_since_the_last_take_is_the_stall() {
        let w = StallWatch::new();
        let t0 = Instant::now();
        assert_eq!(w.take(t0), Duration::ZERO, "no ticks yet");
        w.tick(t0);
        w.tick(t0 + ms(100));
        w.tick(t0 + ms(30_000));
        w.tick(t0 + ms(30_100));
        assert_eq!(w.take(t0 + ms(30_150)), ms(29_900));
        assert_eq!(
            w.take(t0 + ms(30_160)),
            ms(10),
            "taken: the running gap only"
        );
        w.tick(t0 + ms(30_200));
        assert_eq!(w.take(t0 + ms(30_210)), ms(40));
    }

    /// Asked right after a stall, before the workers ticked again: the gap still running is
    /// the stall, and the tick that follows does not count it again. Seen failing (zero: the
    /// peers taken for dead) when only finished gaps counted.
    #[test]
    fn a_stall_is_seen_before_the_next_tick() {
        let w = StallWatch::new();
        let t0 = Instant::now();
        w.tick(t0);
        assert_eq!(w.take(t0 + ms(30_000)), ms(30_000));
        w.tick(t0 + ms(30_050));
        assert_eq!(w.take(t0 + ms(30_100)), ms(50));
    }
}
