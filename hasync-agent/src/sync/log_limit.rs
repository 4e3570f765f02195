//! Lines a peer can repeat as fast as it sends frames on one connection (full syncs started
//! and ended, stale replicas removed after them) are written a few at a time and then at most
//! one per interval, per key; the ones left out in between are counted and the next line
//! written says how many. The keys are per peer, so the map stays as small as the cluster.
//! State changes (a link going up or down, a member alive or not) are limited too, since a key
//! holder can repeat them as fast as handshakes complete; but the last line must say the
//! state: a key that left lines out is caught up ([`LogLimiter::catch_up`]) on a timer, with
//! one line saying the state as it is then.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use super::bucket::Bucket;
use crate::lock::lock;

/// Lines one key may write in a burst.
pub const BURST: u32 = 5;
/// One more line is allowed per this interval, up to [`BURST`].
pub const REFILL_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Limit {
    lines: Bucket,
    left_out: u64,
}

/// Per key: how many lines it may still write and how many it left out since the last.
#[derive(Debug, Default)]
pub struct LogLimiter {
    keys: Mutex<HashMap<String, Limit>>,
}

impl LogLimiter {
    /// `Some(left_out)` if `key` may log at `now` (`left_out`: the lines it left out since
    /// the last one written), else `None` (this one is counted as left out).
    pub fn allow(&self, key: &str, now: Instant) -> Option<u64> {
        let mut keys = lock(&self.keys);
        let limit = keys.entry(key.to_owned()).or_insert(Limit {
            lines: Bucket::new(BURST, REFILL_EVERY, now),
            left_out: 0,
        });
        if !limit.lines.take(now) {
            limit.left_out += 1;
            return None;
        }
        Some(std::mem::take(&mut limit.left_out))
    }

    /// `Some(left_out)` if `key` left lines out since its last one and may log again at `now`
    /// (which takes its allowance): the caller then writes one line saying the state now.
    pub fn catch_up(&self, key: &str, now: Instant) -> Option<u64> {
        let mut keys = lock(&self.keys);
        let limit = keys.get_mut(key).filter(|l| l.left_out > 0)?;
        if !limit.lines.take(now) {
            return None;
        }
        Some(std::mem::take(&mut limit.left_out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_logs_a_burst_then_one_per_interval_and_says_how_many_it_left_out() {
        let limiter = LogLimiter::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        for i in 0..u64::from(BURST) {
            assert_eq!(limiter.allow("peer-2", t0 + ms(i)), Some(0));
        }
        for i in 0..7 {
            assert_eq!(limiter.allow("peer-2", t0 + ms(10 + i)), None);
        }
        // Another key is not held back by the first.
        assert_eq!(limiter.allow("peer-3", t0), Some(0));
        // One interval earns one line, which says how many were left out.
        assert_eq!(limiter.allow("peer-2", t0 + REFILL_EVERY), Some(7));
        assert_eq!(limiter.allow("peer-2", t0 + REFILL_EVERY + ms(1)), None);
        assert_eq!(limiter.allow("peer-2", t0 + REFILL_EVERY * 2), Some(1));
        // A quiet key earns its whole burst back, no more.
        let later = t0 + REFILL_EVERY * 100;
        for _ in 0..BURST {
            assert!(limiter.allow("peer-2", later).is_some());
        }
        assert_eq!(limiter.allow("peer-2", later), None);
    }

    /// A key that left lines out is caught up once its allowance is back, once; one that left
    /// none out never is.
    #[test]
    fn a_key_that_left_lines_out_is_caught_up_once() {
        let limiter = LogLimiter::default();
        let t0 = Instant::now();
        assert_eq!(limiter.catch_up("link", t0), None, "unknown key");
        for _ in 0..BURST {
            assert!(limiter.allow("link", t0).is_some());
        }
        assert_eq!(limiter.catch_up("link", t0), None, "nothing left out");
        assert_eq!(limiter.allow("link", t0), None);
        assert_eq!(limiter.allow("link", t0), None);
        assert_eq!(limiter.catch_up("link", t0), None, "no allowance yet");
        assert_eq!(limiter.catch_up("link", t0 + REFILL_EVERY), Some(2));
        assert_eq!(
            limiter.catch_up("link", t0 + REFILL_EVERY * 9),
            None,
            "caught up"
        );
    }
}
