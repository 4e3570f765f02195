//! A token bucket: a burst, then one more per interval, for what a peer can make this member
//! do as fast as it sends frames (log lines, walks of the table).

use std::time::{Duration, Instant};

/// A burst of `burst`, then one more per `every`, up to `burst` again.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    burst: u32,
    every: Duration,
    /// What may still be taken now.
    allowance: u32,
    /// Where the allowance was last brought up to date.
    refilled: Instant,
}

impl Bucket {
    /// A full bucket at `now`.
    pub fn new(burst: u32, every: Duration, now: Instant) -> Bucket {
        Bucket {
            burst,
            every,
            allowance: burst,
            refilled: now,
        }
    }

    /// Takes one at `now` if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.allowance == 0 {
            return false;
        }
        self.allowance -= 1;
        true
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled);
        let earned = elapsed.as_nanos() / self.every.as_nanos().max(1);
        let earned = u32::try_from(earned).unwrap_or(u32::MAX);
        if self.allowance.saturating_add(earned) >= self.burst {
            self.allowance = self.burst;
            self.refilled = now;
        } else {
            self.allowance += earned;
            self.refilled += self.every * earned;
        }
    }
}
