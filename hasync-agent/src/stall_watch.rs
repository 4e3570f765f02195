//! Did this agent stop running for a while (stopped, a paused VM, its workers starved)? A task
//! on the async workers, which also read the peers' keepalives, ticks every [`TICK`]; the
//! longest gap between two ticks since the membership last asked is how long keepalives could
//! not have been read. A peer's silence over such a gap is not held against it
//! (`Membership::forgive_stall`). The time between two evaluations of the membership is not
//! that measure: an evaluation that waited for the datapath's lock (a reattach) while the
//! workers ran and read nothing from a dead peer would forgive that peer's silence, again
//! after every such wait, and the peer might never be declared dead.
//!
//! The sync engine asks too, without taking ([`StallWatch::stalled_within`]): how much of a
//! span of time this agent did not run, so that the order of a peer's keepalives does not
//! lapse over this agent's own stall.
//!
//! A suspend of the host (S3, s2idle) is a stall too, of its whole length: `Instant`
//! (CLOCK_MONOTONIC) stops while the host sleeps, so the gap between two ticks around it
//! looked like 100 ms, and the peers that took this member's sessions over meanwhile had their
//! claims refused as claims of live sessions. The sleep is read as CLOCK_BOOTTIME's lead over
//! CLOCK_MONOTONIC growing between two readings. ([`StallWatch::stalled_within`] answers in
//! `Instant`'s time, in which a suspend takes none: the peers' keepalive order, kept in it
//! too, did not lapse over it.)

use std::{
    collections::VecDeque,
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

/// A gap between ticks this long is a stall: [`StallWatch::stalled_within`] counts it, and the
/// runtime forgives the peers' silence over a longer one (`Membership::forgive_stall`);
/// shorter ones are the workers' ordinary delays.
pub const STALL: Duration = Duration::from_secs(1);

/// The stalls [`StallWatch::stalled_within`] remembers, the latest ones.
const REMEMBERED: usize = 4;

/// A lead of CLOCK_BOOTTIME over CLOCK_MONOTONIC that grew by less than this is the two
/// clocks read apart, not a sleep.
const SLEPT_MIN: Duration = Duration::from_millis(10);

/// How long the host has slept since it booted: CLOCK_BOOTTIME's lead over CLOCK_MONOTONIC.
pub fn slept_since_boot() -> Duration {
    use crate::datapath::clock_ns;
    Duration::from_nanos(
        clock_ns(libc::CLOCK_BOOTTIME).saturating_sub(clock_ns(libc::CLOCK_MONOTONIC)),
    )
}

/// The sleep between two readings of [`slept_since_boot`] (none below [`SLEPT_MIN`]).
fn asleep(before: Duration, after: Duration) -> Duration {
    Some(after.saturating_sub(before))
        .filter(|d| *d >= SLEPT_MIN)
        .unwrap_or_default()
}

/// The longest gap between two ticks since it was last taken, and the latest stalls (for
/// [`StallWatch::stalled_within`]).
#[derive(Debug)]
pub struct StallWatch {
    /// The last tick (only ticks move it), and the host's sleep counted up to then.
    last_tick: Mutex<Option<(Instant, Duration)>>,
    /// How long the host has slept ([`slept_since_boot`]; the tests' own).
    slept: fn() -> Duration,
    /// The last take: a gap is not returned by two takes.
    taken: Mutex<Option<Instant>>,
    longest_ns: AtomicU64,
    /// The latest stalls, as (start, end): gaps of at least [`STALL`].
    stalls: Mutex<VecDeque<(Instant, Instant)>>,
}

impl Default for StallWatch {
    fn default() -> Self {
        StallWatch::new()
    }
}

/// Where a gap that ends a tick at `prev` starts counting for the next take: after the last
/// take, `taken`, if that came later (a gap is returned by one take only).
fn since_take(prev: Instant, taken: Option<Instant>) -> Instant {
    taken.map_or(prev, |t| t.max(prev))
}

impl StallWatch {
    pub fn new() -> StallWatch {
        StallWatch::with_sleep_clock(slept_since_boot)
    }

    /// A watch that reads the host's sleep from `slept`.
    pub fn with_sleep_clock(slept: fn() -> Duration) -> StallWatch {
        StallWatch {
            last_tick: Mutex::new(None),
            slept,
            taken: Mutex::new(None),
            longest_ns: AtomicU64::new(0),
            stalls: Mutex::new(VecDeque::with_capacity(REMEMBERED)),
        }
    }

    /// A tick at `now`: the gap since the previous one counts (for the next take, the part
    /// after the last take).
    /// The host's sleep since then counts in the gap.
    pub fn tick(&self, now: Instant) {
        let slept = (self.slept)();
        let mut last = lock(&self.last_tick);
        if let Some((prev, prev_slept)) = *last {
            let gap = now.saturating_duration_since(since_take(prev, *lock(&self.taken)))
                + asleep(prev_slept, slept);
            let ns = u64::try_from(gap.as_nanos()).unwrap_or(u64::MAX);
            self.longest_ns.fetch_max(ns, Ordering::Relaxed);
            self.remember(prev, now);
        }
        // The sleep read never goes back (another thread may have stored a later reading).
        *last = Some(match *last {
            Some((prev, prev_slept)) => (prev.max(now), prev_slept.max(slept)),
            None => (now, slept),
        });
    }

    /// The longest gap between two ticks since the last call, or since the last tick to
    /// `now` if that is longer (the workers may not have ticked yet after a stall when this
    /// is asked); zero when they kept coming. A gap is returned by one take only, but
    /// [`StallWatch::stalled_within`] sees all of it.
    pub fn take(&self, now: Instant) -> Duration {
        let slept = (self.slept)();
        let mut last = lock(&self.last_tick);
        let mut taken = lock(&self.taken);
        let mut running = Duration::ZERO;
        if let Some((prev, prev_slept)) = *last {
            running =
                now.saturating_duration_since(since_take(prev, *taken)) + asleep(prev_slept, slept);
            self.remember(prev, now);
            // The sleep is taken: the next tick does not count it again.
            *last = Some((prev, prev_slept.max(slept)));
        }
        *taken = Some((*taken).map_or(now, |t| t.max(now)));
        let longest = Duration::from_nanos(self.longest_ns.swap(0, Ordering::Relaxed));
        longest.max(running)
    }

    /// Keeps the gap from the tick at `prev` to `now` among the latest stalls if it is one; a
    /// gap already kept from that tick (a take's, while it still ran) is extended. Called with
    /// `last_tick`'s lock held (the lock order: `last_tick`, `taken`, `stalls`).
    fn remember(&self, prev: Instant, now: Instant) {
        if now.saturating_duration_since(prev) < STALL {
            return;
        }
        let mut stalls = lock(&self.stalls);
        if let Some(last) = stalls.back_mut().filter(|(start, _)| *start == prev) {
            last.1 = last.1.max(now);
            return;
        }
        if stalls.len() == REMEMBERED {
            stalls.pop_front();
        }
        stalls.push_back((prev, now));
    }

    /// How long this agent did not run between `since` and `now`: the stalls' overlap with that
    /// span, the gap still running (the workers not ticked again yet) included. Only the
    /// latest few stalls are remembered: spans of a keepalive threshold hold one or two.
    pub fn stalled_within(&self, since: Instant, now: Instant) -> Duration {
        // The locks held together, as a tick takes them: a tick between reading the running
        // gap and the stalls would have one gap counted twice.
        let last = lock(&self.last_tick);
        let stalls = lock(&self.stalls);
        let running = (*last)
            .map(|(t, _)| t)
            .filter(|&t| now.saturating_duration_since(t) >= STALL)
            .map(|t| (t, now));
        // A running gap a take kept already is that one, up to now.
        let kept = stalls
            .iter()
            .copied()
            .filter(|s| running.is_none_or(|r| s.0 != r.0));
        (kept.chain(running))
            .map(|(start, end)| end.min(now).saturating_duration_since(start.max(since)))
            .sum()
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

    /// The host's sleep, as [`a_host_suspend_is_a_stall_of_its_length`] sets it.
    static SLEPT_MS: AtomicU64 = AtomicU64::new(0);

    fn test_sleep() -> Duration {
        ms(SLEPT_MS.load(Ordering::Relaxed))
    }

    /// A suspend of the host between two ticks is a stall of its length, not of the 100 ms
    /// the monotonic clock saw (seen failing: 100 ms, so a peer's takeover meanwhile was
    /// refused as a claim of a live session), taken once; one seen first by a take too.
    #[test]
    fn a_host_suspend_is_a_stall_of_its_length() {
        let w = StallWatch::with_sleep_clock(test_sleep);
        let t0 = Instant::now();
        w.tick(t0);
        SLEPT_MS.store(30_000, Ordering::Relaxed);
        w.tick(t0 + ms(100));
        assert_eq!(w.take(t0 + ms(150)), ms(30_100));
        assert_eq!(w.take(t0 + ms(160)), ms(10), "taken once");
        SLEPT_MS.store(60_000, Ordering::Relaxed);
        assert_eq!(w.take(t0 + ms(170)), ms(30_010), "seen by a take first");
        w.tick(t0 + ms(200));
        assert_eq!(w.take(t0 + ms(210)), ms(30), "and not by the tick after it");
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

    /// What the sync engine asks: the stalls within a span, whether taken by the membership
    /// or not, the one still running included, the workers' ordinary delays not.
    #[test]
    fn the_stalls_within_a_span_are_counted_without_taking_them() {
        let w = StallWatch::new();
        let t0 = Instant::now();
        w.tick(t0);
        w.tick(t0 + ms(900));
        assert_eq!(w.stalled_within(t0, t0 + ms(950)), Duration::ZERO);
        w.tick(t0 + ms(5_900));
        w.take(t0 + ms(5_950));
        assert_eq!(w.stalled_within(t0, t0 + ms(6_000)), ms(5_000));
        assert_eq!(w.stalled_within(t0 + ms(3_900), t0 + ms(6_000)), ms(2_000));
        assert_eq!(
            w.stalled_within(t0 + ms(5_900), t0 + ms(6_000)),
            Duration::ZERO
        );
        // Asked before the workers ticked again: the running gap counts (from the last tick,
        // at 5.9 s: a take is no tick).
        assert_eq!(
            w.stalled_within(t0 + ms(3_900), t0 + ms(8_000)),
            ms(2_000 + 2_100)
        );
    }

    /// The membership's take may come first after a stall, before the workers tick again: the
    /// stall it takes is still there for the sync engine, whole, also when takes come every
    /// 200 ms while the workers do not run. Seen failing (zero) when only ticks kept stalls,
    /// and when each take cut the stall into pieces too short to keep.
    #[test]
    fn a_stall_the_membership_took_first_is_still_seen() {
        let w = StallWatch::new();
        let t0 = Instant::now();
        w.tick(t0);
        assert_eq!(w.take(t0 + ms(30_000)), ms(30_000));
        w.tick(t0 + ms(30_050));
        assert_eq!(w.stalled_within(t0, t0 + ms(30_060)), ms(30_050));
        for t in (30_250..=32_050).step_by(200) {
            assert!(w.take(t0 + ms(t)) <= ms(200));
        }
        w.tick(t0 + ms(32_100));
        assert_eq!(
            w.stalled_within(t0 + ms(30_060), t0 + ms(32_100)),
            ms(2_040)
        );
    }
}
