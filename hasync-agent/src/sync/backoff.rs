//! Rate limit with exponential backoff, as pure logic over `Instant`s: how often a full sync
//! may go to one peer, and how often lost datapath events may trigger a re-announcement.
//!
//! The first start is immediate; each later one within the backoff waits until it has passed,
//! and the backoff doubles up to its ceiling. After a quiet time of twice the ceiling it falls
//! back to its floor.

use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Backoff {
    floor: Duration,
    ceiling: Duration,
    current: Duration,
    last: Option<Instant>,
}

impl Backoff {
    pub fn new(floor: Duration, ceiling: Duration) -> Self {
        Backoff {
            floor,
            ceiling,
            current: floor,
            last: None,
        }
    }

    /// Starts one now if the backoff allows it; returns whether it did.
    pub fn try_start(&mut self, now: Instant) -> bool {
        let Some(last) = self.last else {
            self.last = Some(now);
            return true;
        };
        let since = now.saturating_duration_since(last);
        if since < self.current {
            return false;
        }
        self.current = if since >= self.ceiling * 2 {
            self.floor
        } else {
            (self.current * 2).min(self.ceiling)
        };
        self.last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn first_is_immediate_then_the_wait_doubles_up_to_the_ceiling() {
        let t0 = Instant::now();
        let mut b = Backoff::new(S, 8 * S);
        assert!(b.try_start(t0));
        assert!(!b.try_start(t0 + S / 2), "within the floor");
        assert!(b.try_start(t0 + S));
        // Now 2 s.
        assert!(!b.try_start(t0 + S + S));
        assert!(b.try_start(t0 + 3 * S));
        // 4 s, then 8 s, and no more.
        assert!(b.try_start(t0 + 7 * S));
        assert!(!b.try_start(t0 + 14 * S));
        assert!(b.try_start(t0 + 15 * S));
        assert!(!b.try_start(t0 + 22 * S));
        assert!(b.try_start(t0 + 23 * S), "the ceiling holds at 8 s");
    }

    #[test]
    fn a_quiet_time_resets_to_the_floor() {
        let t0 = Instant::now();
        let mut b = Backoff::new(S, 4 * S);
        for k in 0..4 {
            assert!(b.try_start(t0 + k * 4 * S));
        }
        let later = t0 + 12 * S + 8 * S;
        assert!(b.try_start(later));
        assert!(
            b.try_start(later + S),
            "back to the floor after 2 × ceiling of quiet"
        );
    }

    #[test]
    fn bounded_starts_under_a_storm() {
        // Asked every 100 ms for ten minutes: at most one start per backoff step.
        let t0 = Instant::now();
        let mut b = Backoff::new(S, 64 * S);
        let starts = (0..6000)
            .filter(|i| b.try_start(t0 + Duration::from_millis(100 * i)))
            .count();
        assert!(starts <= 16, "{starts} starts in 10 minutes");
        assert!(
            !b.clone().try_start(t0 + Duration::from_secs(600)),
            "still backing off at the end"
        );
    }
}
