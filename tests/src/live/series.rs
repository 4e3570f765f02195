//! Time series of a failover run: cumulative frame counts sampled over time (the generator's
//! after each send, the receiver's every few ms), and what they say — the rate before the
//! failure, when the rate came back, the frames short of the old rate meanwhile.

use std::time::Duration;

/// A cumulative count at a time since the run's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub at: Duration,
    pub count: u64,
}

/// The count at `t`: that of the last sample at or before `t` (0 before the first).
pub fn count_at(samples: &[Sample], t: Duration) -> u64 {
    let i = samples.partition_point(|s| s.at <= t);
    i.checked_sub(1)
        .and_then(|i| samples.get(i))
        .map_or(0, |s| s.count)
}

/// Frames per second over `[from, to]` (0 for an empty interval).
pub fn rate(samples: &[Sample], from: Duration, to: Duration) -> f64 {
    let secs = to.saturating_sub(from).as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    count_at(samples, to).saturating_sub(count_at(samples, from)) as f64 / secs
}

/// How the receiver's rate is judged after the failure.
#[derive(Clone, Copy, Debug)]
pub struct Criteria {
    /// The baseline is the rate over this long before the failure.
    pub baseline: Duration,
    /// Rates are measured over windows this wide...
    pub window: Duration,
    /// ...whose starts are this far apart (the resolution of the recovery time).
    pub step: Duration,
    /// Recovered: every window in this long from then on is at or above `threshold`.
    pub hold: Duration,
    /// Share of the baseline rate that counts as full rate (0.95).
    pub threshold: f64,
}

/// What the receiver's samples say about a failure at `failure`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Recovery {
    /// Frames per second over [`Criteria::baseline`] before the failure.
    pub baseline_pps: f64,
    /// When the rate first fell under the threshold after the failure (since the failure).
    pub dip: Option<Duration>,
    /// Since the failure, until the rate is back at the threshold and holds: the start of the
    /// first window, at or after the dip, from which every window over [`Criteria::hold`] is at
    /// or above it. Zero if it never fell; `None` if it did not come back.
    pub recovered: Option<Duration>,
    /// Frames per second from the recovery to the end of the samples.
    pub recovered_pps: Option<f64>,
    /// Frames short of the baseline rate from the failure to the recovery (or the end).
    pub short: u64,
}

impl Criteria {
    /// Whether the window starting at `t` has at least the threshold rate.
    fn full(&self, samples: &[Sample], t: Duration, floor: f64) -> bool {
        rate(samples, t, t + self.window) >= floor
    }

    /// Whether every window from `t` over `hold` is full.
    fn holds(&self, samples: &[Sample], t: Duration, floor: f64) -> bool {
        let mut s = t;
        while s + self.window <= t + self.hold {
            if !self.full(samples, s, floor) {
                return false;
            }
            s += self.window;
        }
        true
    }

    /// Judges `samples` (the receiver's, in time order) for a failure at `failure`, up to
    /// `end` (when the sender stopped); a recovery is seen only [`Criteria::hold`] before it.
    pub fn judge(&self, samples: &[Sample], failure: Duration, end: Duration) -> Recovery {
        let baseline_pps = rate(samples, failure.saturating_sub(self.baseline), failure);
        let floor = baseline_pps * self.threshold;
        let end = samples.last().map_or(failure, |s| s.at.min(end));
        let starts = || {
            let step = self.step.max(Duration::from_micros(1));
            std::iter::successors(Some(failure), move |t| Some(*t + step))
                .take_while(|t| *t + self.window <= end)
        };
        let dip = starts().find(|&t| !self.full(samples, t, floor));
        let recovered = match dip {
            None => Some(failure),
            Some(d) => starts()
                .filter(|&t| t >= d && t + self.hold <= end)
                .find(|&t| self.holds(samples, t, floor)),
        };
        let until = recovered.unwrap_or(end);
        let got = count_at(samples, until).saturating_sub(count_at(samples, failure));
        let expected = baseline_pps * until.saturating_sub(failure).as_secs_f64();
        Recovery {
            baseline_pps,
            dip: dip.map(|d| d - failure),
            recovered: recovered.map(|r| r - failure),
            recovered_pps: recovered.map(|r| rate(samples, r, end)),
            short: (expected - got as f64).max(0.0).round() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Samples every ms for `total_ms`, at `per_ms(t)` frames in the ms ending at t.
    fn series(total_ms: u64, per_ms: impl Fn(u64) -> u64) -> Vec<Sample> {
        let mut count = 0;
        (0..=total_ms)
            .map(|t| {
                if t > 0 {
                    count += per_ms(t);
                }
                Sample {
                    at: MS * t as u32,
                    count,
                }
            })
            .collect()
    }

    fn criteria() -> Criteria {
        Criteria {
            baseline: MS * 500,
            window: MS * 10,
            step: MS,
            hold: MS * 100,
            threshold: 0.95,
        }
    }

    #[test]
    fn counts_and_rates_read_between_samples() {
        let s = [
            Sample {
                at: MS * 10,
                count: 5,
            },
            Sample {
                at: MS * 20,
                count: 25,
            },
        ];
        assert_eq!(count_at(&s, MS * 5), 0);
        assert_eq!(count_at(&s, MS * 15), 5);
        assert_eq!(count_at(&s, MS * 20), 25);
        assert_eq!(count_at(&s, MS * 99), 25);
        assert!((rate(&s, MS * 10, MS * 20) - 2_000.0).abs() < 1e-6);
        assert_eq!(rate(&s, MS * 20, MS * 20), 0.0);
    }

    /// 100 frames/ms; nothing from 1000 to 1050 ms; 40 % of the rate until 1400; full rate
    /// after.
    #[test]
    fn an_outage_then_a_slow_path_then_full_rate() {
        let s = series(2_000, |t| match t {
            0..=1_000 => 100,
            1_001..=1_050 => 0,
            1_051..=1_400 => 40,
            _ => 100,
        });
        let r = criteria().judge(&s, MS * 1_000, MS * 2_000);
        assert!((r.baseline_pps - 100_000.0).abs() < 1.0, "{r:?}");
        assert_eq!(r.dip, Some(Duration::ZERO));
        assert_eq!(r.recovered, Some(MS * 400));
        assert!((r.recovered_pps.unwrap() - 100_000.0).abs() < 1.0, "{r:?}");
        // 400 ms at 100/ms expected; 350 ms at 40/ms arrived.
        assert_eq!(r.short, 40_000 - 14_000);
    }

    /// A short stall after the failure, then dips a while later while the rate is back:
    /// recovery is only where the rate then holds (100 ms here).
    #[test]
    fn recovery_needs_the_rate_to_hold() {
        let dips = |last: u64| {
            series(2_000, move |t| match t {
                1_021..=1_030 => 0,
                1_081..=1_090 => 0,
                t if t == last => 0,
                _ => 100,
            })
        };
        let r = criteria().judge(&dips(0), MS * 1_000, MS * 2_000);
        assert_eq!(r.dip, Some(MS * 11), "the first window under 95 %");
        assert_eq!(r.recovered, Some(MS * 90));
        assert_eq!(r.short, 2_000);
        // One ms without frames at 1.15 s: 90 % in the windows over it.
        let r = criteria().judge(&dips(1_150), MS * 1_000, MS * 2_000);
        assert_eq!(r.recovered, Some(MS * 150));
        // A dip after the rate held does not matter.
        let r = criteria().judge(&dips(1_500), MS * 1_000, MS * 2_000);
        assert_eq!(r.recovered, Some(MS * 90));
        // Too close to the end to see it hold.
        let r = criteria().judge(&dips(0), MS * 1_000, MS * 1_150);
        assert_eq!(r.recovered, None);
    }

    #[test]
    fn no_dip_is_recovered_at_once_and_no_return_is_none() {
        let steady = series(1_500, |_| 100);
        let r = criteria().judge(&steady, MS * 1_000, MS * 1_500);
        assert_eq!(
            (r.dip, r.recovered, r.short),
            (None, Some(Duration::ZERO), 0)
        );
        let dead = series(1_500, |t| if t > 1_000 { 0 } else { 100 });
        let r = criteria().judge(&dead, MS * 1_000, MS * 1_500);
        assert_eq!(
            (r.dip, r.recovered, r.recovered_pps),
            (Some(Duration::ZERO), None, None)
        );
        assert_eq!(r.short, 50_000, "500 ms at 100/ms");
    }
}
