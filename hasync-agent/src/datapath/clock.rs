//! The session clock. The XDP program reads the kernel's `jiffies` (inlined by the verifier,
//! where the coarse clock is a helper call per packet) and converts it with a tick length and
//! an offset measured here (`DatapathConfig::ns_per_jiffy`), so every session time stays in the
//! agent's clock ([`super::monotonic_ns`], CLOCK_MONOTONIC_COARSE) and the sweep, the sync's
//! ages and the apply program need no conversion.
//!
//! The kernel advances `jiffies` from its monotonic clock, whole ticks at a time, and the
//! coarse clock in the same tick handler: `coarse - jiffies × tick` stays within a tick of a
//! constant (the handler's latency above it). A sample taken between the two updates reads the
//! coarse clock a tick early (the clock program reads it first so that no other race exists).
//! So the tick length is the candidate for which a hundred milliseconds of samples stay that
//! close, and the offset the lowest sample once the early ones are set aside (less a margin):
//! the jiffies clock then reads the start of the current tick, never ahead of the agent's.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::programs::Xdp;
use hasync_common::{clock::jiffies_ns, maps as names, ClockSample, DatapathConfig};

use super::{table_runner::run_one, DatapathError};

/// Tick lengths of the HZ values the kernel can be built with (x86 and arm64 offer 100, 250,
/// 300 and 1000), rounded as the kernel's `TICK_NSEC` is.
pub const TICKS_NS: [u32; 4] = [10_000_000, 4_000_000, 3_333_333, 1_000_000];
/// How long the samples of a measurement span: enough for a wrong candidate tick (the closest
/// pair, 250 and 300 Hz, differ by a sixth) to drift several ticks away from the samples.
pub const MEASURE_SPAN: Duration = Duration::from_millis(120);
/// Time between two samples of a measurement.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(2);
/// A measurement gives up after this long (a host too loaded to sample).
pub const MEASURE_LIMIT: Duration = Duration::from_secs(2);
/// How often a running agent checks the clock against one sample (see
/// `sweep_table::SweepBeside::step`).
pub const CHECK_EVERY: Duration = Duration::from_secs(10);
/// The offset is set this fraction of a tick below the lowest sample: tick handlers run
/// microseconds after the tick starts, and one may run sooner than any the samples caught.
/// The jiffies clock then never reads ahead of the agent's (a session seen by the program
/// "after" the agent's now would not look idle to the sweep).
const MARGIN_TICKS: u32 = 8;
/// Samples a measurement needs at least.
const MIN_SAMPLES: usize = 16;

/// Why the jiffies clock could not be measured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    #[error("{got} clock samples over {span_ms} ms are too few (need {MIN_SAMPLES} over {} ms)", MEASURE_SPAN.as_millis())]
    TooFewSamples { got: usize, span_ms: u64 },
    #[error(
        "jiffies do not follow any known tick (100, 250, 300, 1000 Hz): the closest, \
         {hz} Hz, strays {spread_us} µs over the samples"
    )]
    UnknownTick { hz: u32, spread_us: u64 },
}

/// The jiffies clock: `jiffies × ns_per_jiffy + offset_ns` is the agent's monotonic clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JiffyClock {
    pub ns_per_jiffy: u32,
    pub offset_ns: u64,
}

impl JiffyClock {
    /// The kernel's HZ.
    pub fn hz(&self) -> u32 {
        (1_000_000_000 + self.ns_per_jiffy / 2) / self.ns_per_jiffy.max(1)
    }

    /// The session clock at `jiffies`.
    pub fn ns(&self, jiffies: u64) -> u64 {
        jiffies_ns(jiffies, self.ns_per_jiffy, self.offset_ns)
    }

    /// How far the agent's clock in `sample` is past this clock's reading of its jiffies:
    /// within about a tick either way while the clock holds (the margin and the tick
    /// handler's latency above, a sample caught between the kernel's two updates below).
    pub fn deviation_ns(&self, sample: &ClockSample) -> i64 {
        sample.coarse_ns.wrapping_sub(self.ns(sample.jiffies)) as i64
    }

    /// Has the clock drifted: is `sample` more than a tick outside what it allows?
    pub fn drifted(&self, sample: &ClockSample) -> bool {
        let tick = i64::from(self.ns_per_jiffy);
        !(-2 * tick..2 * tick).contains(&self.deviation_ns(sample))
    }

    /// `cfg` with this clock (`None`: the program's fallback, the coarse clock helper).
    pub fn configure(clock: Option<JiffyClock>, cfg: &DatapathConfig) -> DatapathConfig {
        let (ns_per_jiffy, jiffies_offset_ns) =
            clock.map_or((0, 0), |c| (c.ns_per_jiffy, c.offset_ns));
        DatapathConfig {
            ns_per_jiffy,
            jiffies_offset_ns,
            ..*cfg
        }
    }
}

/// The clock that `samples` (in time order, over at least [`MEASURE_SPAN`]) follow.
pub fn fit(samples: &[ClockSample]) -> Result<JiffyClock, ClockError> {
    let span = match samples {
        [first, .., last] => last.coarse_ns.saturating_sub(first.coarse_ns),
        _ => 0,
    };
    if samples.len() < MIN_SAMPLES || span < MEASURE_SPAN.as_nanos() as u64 {
        return Err(ClockError::TooFewSamples {
            got: samples.len(),
            span_ms: span / 1_000_000,
        });
    }
    // The candidate whose offsets stray least, counted in its own ticks.
    let mut best = (TICKS_NS[0], u64::MAX);
    for tick in TICKS_NS {
        let spread = spread(&offsets(samples, tick));
        if u128::from(spread) * u128::from(best.0) < u128::from(best.1) * u128::from(tick) {
            best = (tick, spread);
        }
    }
    let (tick, spread) = best;
    // Early samples sit a tick below the rest, latency spreads the rest over less than a tick.
    if spread >= 2 * u64::from(tick) {
        let hz = JiffyClock {
            ns_per_jiffy: tick,
            offset_ns: 0,
        }
        .hz();
        return Err(ClockError::UnknownTick {
            hz,
            spread_us: spread / 1000,
        });
    }
    Ok(JiffyClock {
        ns_per_jiffy: tick,
        offset_ns: base_offset(&offsets(samples, tick), tick),
    })
}

/// `coarse - jiffies × tick` of each sample.
fn offsets(samples: &[ClockSample], tick: u32) -> Vec<u64> {
    samples
        .iter()
        .map(|s| s.coarse_ns.wrapping_sub(jiffies_ns(s.jiffies, tick, 0)))
        .collect()
}

/// How far apart the (wrapping) offsets are, measured from the first, one in twenty at either
/// end set aside (a sample whose thread was taken off its CPU between its two reads: one such
/// made the whole measurement fail, and the program read the clock helper for the agent's
/// life).
fn spread(offsets: &[u64]) -> u64 {
    let first = offsets.first().copied().unwrap_or(0);
    let mut rel: Vec<i64> = offsets
        .iter()
        .map(|o| o.wrapping_sub(first) as i64)
        .collect();
    rel.sort_unstable();
    // At least one (a measurement has MIN_SAMPLES): a loaded host, where such a read comes
    // from, takes the fewest.
    let trim = (rel.len() / 20).max(1).min(rel.len() / 2);
    let kept = rel.get(trim..rel.len() - trim).unwrap_or_default();
    match (kept.first(), kept.last()) {
        (Some(lo), Some(hi)) => hi.abs_diff(*lo),
        _ => 0,
    }
}

/// The lowest offset once the early samples (more than half a tick below the median) are set
/// aside, less [`MARGIN_TICKS`]: the start of the tick in the agent's clock.
fn base_offset(offsets: &[u64], tick: u32) -> u64 {
    let first = offsets.first().copied().unwrap_or(0);
    let mut rel: Vec<i64> = offsets
        .iter()
        .map(|o| o.wrapping_sub(first) as i64)
        .collect();
    rel.sort_unstable();
    let median = rel.get(rel.len() / 2).copied().unwrap_or(0);
    let floor = median - i64::from(tick / 2);
    let base = rel.iter().copied().find(|&d| d >= floor).unwrap_or(median);
    first
        .wrapping_add(base as u64)
        .wrapping_sub(u64::from(tick / MARGIN_TICKS))
}

/// One sample from the clock program.
pub fn sample(prog: &Xdp) -> Result<ClockSample, DatapathError> {
    const DONE: u32 = 2;
    // The program writes its sample over a zeroed frame.
    let (verdict, sample) = run_one(prog, names::CLOCK_PROGRAM, &ClockSample::default())?;
    sample
        .filter(|_| verdict == DONE)
        .ok_or(DatapathError::BatchRejected {
            program: names::CLOCK_PROGRAM,
            items: 1,
            verdict,
        })
}

/// Do `samples` (in time order) span enough for [`fit`]: [`MIN_SAMPLES`] over
/// [`MEASURE_SPAN`]?
pub fn spans_enough(samples: &[ClockSample]) -> bool {
    let span = match samples {
        [first, .., last] => last.coarse_ns.saturating_sub(first.coarse_ns),
        _ => 0,
    };
    samples.len() >= MIN_SAMPLES && span >= MEASURE_SPAN.as_nanos() as u64
}

/// Measures the jiffies clock with the clock program: samples over [`MEASURE_SPAN`] (sleeps
/// meanwhile).
pub fn measure(prog: &Xdp) -> Result<JiffyClock, DatapathError> {
    let start = Instant::now();
    let mut samples = vec![sample(prog)?];
    while start.elapsed() < MEASURE_LIMIT && !spans_enough(&samples) {
        std::thread::sleep(SAMPLE_EVERY);
        samples.push(sample(prog)?);
    }
    fit(&samples).map_err(DatapathError::Clock)
}

/// `clock` was measured again (it drifted): datapaths loaded later check it first.
pub fn remember(clock: JiffyClock) {
    *MEASURED.lock().unwrap_or_else(|e| e.into_inner()) = Some(clock);
}

/// The clock this process measured last: the kernel's tick and offset hold for the whole boot,
/// so a datapath loaded again (tests load many) checks it with one sample instead of measuring.
static MEASURED: Mutex<Option<JiffyClock>> = Mutex::new(None);

/// The clock for a datapath whose clock program is `prog`: the one this process measured if a
/// sample still agrees with it, else a new measurement. `None` (logged) when the jiffies do not
/// follow a known tick: the program then reads the coarse clock helper.
pub fn find(prog: &Xdp) -> Result<Option<JiffyClock>, DatapathError> {
    let known = *MEASURED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(clock) = known {
        if !clock.drifted(&sample(prog)?) {
            return Ok(Some(clock));
        }
    }
    let found = match measure(prog) {
        Ok(clock) => {
            tracing::debug!(hz = clock.hz(), "session clock: jiffies");
            Some(clock)
        }
        Err(DatapathError::Clock(error)) => {
            tracing::warn!(
                error = %error,
                "the datapath reads the kernel's coarse clock instead of jiffies (a helper call \
                 per packet)"
            );
            None
        }
        Err(e) => return Err(e),
    };
    *MEASURED.lock().unwrap_or_else(|e| e.into_inner()) = found;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples every 2 ms over `span_ms` of a kernel with ticks of `tick` ns, jiffies starting
    /// near 2^32 as the kernel's do. The handler of tick `k` runs `handler(k).0` ns after the
    /// tick starts: it advances jiffies, then the coarse clock `handler(k).1` ns later. Returns
    /// the samples and the true offset (the start of a tick, minus jiffies × tick).
    fn samples(
        tick: u32,
        span_ms: u64,
        handler: impl Fn(u64) -> (u64, u64),
    ) -> (Vec<ClockSample>, u64) {
        let tick = u64::from(tick);
        let jiffies0 = (1u64 << 32) - 300 * (1_000_000_000 / tick);
        let boot_ns: u64 = 7_654_321_000; // the start of jiffies0's tick
        let truth = boot_ns.wrapping_sub(jiffies0.wrapping_mul(tick));
        let done = |k: u64| boot_ns + k * tick + handler(k).0; // coarse clock after tick k
        let out = (0..=span_ms / 2)
            .map(|i| {
                let t = boot_ns + 10 * tick + i * 2_000_000 + 1_234_567;
                let k = (t - boot_ns) / tick;
                let (latency, window) = handler(k);
                let start = boot_ns + k * tick;
                let (jiffies, coarse_ns) = if t < start + latency {
                    (k - 1, done(k - 1))
                } else if t < start + latency + window {
                    (k, done(k - 1)) // between the two updates
                } else {
                    (k, done(k))
                };
                ClockSample {
                    jiffies: jiffies0 + jiffies,
                    coarse_ns,
                }
            })
            .collect();
        (out, truth)
    }

    #[test]
    fn every_known_tick_is_recognised_and_its_offset_is_the_tick_start() {
        for tick in TICKS_NS {
            let (s, truth) = samples(tick, 130, |k| (3_000 + (k % 7) * 500, 100));
            let clock = fit(&s).unwrap_or_else(|e| panic!("{tick} ns: {e}"));
            assert_eq!(clock.ns_per_jiffy, tick);
            // The lowest handler latency seen (3 µs) past the start of the tick, less the margin.
            let margin = u64::from(tick / 8);
            assert_eq!(
                clock.offset_ns,
                truth.wrapping_add(3_000).wrapping_sub(margin),
                "{tick} ns"
            );
            // Never ahead of the agent's clock, at most the margin and the latencies' spread
            // behind it.
            for x in &s {
                let d = clock.deviation_ns(x) - margin as i64;
                assert!(
                    (0..=3_000).contains(&d),
                    "{tick} ns: deviation {d} past the margin"
                );
                assert!(!clock.drifted(x));
            }
        }
        let hz = TICKS_NS.map(|t| {
            JiffyClock {
                ns_per_jiffy: t,
                offset_ns: 0,
            }
            .hz()
        });
        assert_eq!(hz, [100, 250, 300, 1000]);
    }

    #[test]
    fn samples_caught_between_the_kernels_two_updates_are_set_aside() {
        // Every fifth tick's handler runs 1.2 ms late and takes 0.1 ms between its updates:
        // the samples 1.23 ms into those ticks read the coarse clock a tick early.
        let (s, truth) = samples(4_000_000, 130, |k| {
            if k % 5 == 0 {
                (1_200_000, 100_000)
            } else {
                (2_000, 100)
            }
        });
        let early = s
            .iter()
            .filter(|x| x.coarse_ns < truth.wrapping_add(x.jiffies.wrapping_mul(4_000_000)))
            .count();
        assert!(early > 0, "the fixture makes no early sample");
        let clock = fit(&s).expect("fit");
        assert_eq!(
            clock,
            JiffyClock {
                ns_per_jiffy: 4_000_000,
                offset_ns: truth.wrapping_add(2_000).wrapping_sub(500_000)
            }
        );
    }

    /// One sample read three ticks off (its thread taken off the CPU between its two reads)
    /// does not make the measurement fail (seen failing: UnknownTick, and the program read the
    /// clock helper for the agent's life).
    #[test]
    fn one_sample_read_apart_does_not_fail_the_measurement() {
        let (all, truth) = samples(1_000_000, 130, |_| (2_000, 100));
        // Every sample, and the fewest a measurement takes (a loaded host's).
        let fewest: Vec<ClockSample> = all.iter().step_by(4).copied().collect();
        assert_eq!(fewest.len(), 17);
        for mut s in [all, fewest] {
            if let Some(odd) = s.get_mut(5) {
                odd.jiffies += 3;
            }
            let clock = fit(&s).expect("fit");
            assert_eq!(clock.ns_per_jiffy, 1_000_000);
            assert_eq!(
                clock.offset_ns,
                truth.wrapping_add(2_000).wrapping_sub(125_000)
            );
        }
    }

    #[test]
    fn a_measurement_too_short_or_of_an_unknown_tick_is_refused() {
        let (s, _) = samples(4_000_000, 60, |_| (1_000, 100));
        assert_eq!(
            fit(&s),
            Err(ClockError::TooFewSamples {
                got: 31,
                span_ms: 60
            })
        );
        assert!(matches!(
            fit(&[]),
            Err(ClockError::TooFewSamples { got: 0, .. })
        ));
        // HZ = 200 (5 ms ticks), which x86 and arm64 do not offer: no candidate fits.
        let (s, _) = samples(5_000_000, 130, |_| (1_000, 100));
        let e = fit(&s);
        assert!(matches!(e, Err(ClockError::UnknownTick { .. })), "{e:?}");
    }

    #[test]
    fn drift_is_more_than_a_tick_outside_what_the_clock_allows() {
        let j = 1u64 << 32;
        let clock = JiffyClock {
            ns_per_jiffy: 4_000_000,
            offset_ns: 5_000_000_000u64.wrapping_sub(j * 4_000_000),
        };
        assert_eq!(clock.ns(j), 5_000_000_000);
        assert_eq!(clock.ns(j + 250), 6_000_000_000);
        let at = |dev: i64| ClockSample {
            jiffies: j,
            coarse_ns: clock.ns(j).wrapping_add_signed(dev),
        };
        for dev in [0, 3_999_999, -4_000_000, 7_999_999, -8_000_000] {
            assert_eq!(clock.deviation_ns(&at(dev)), dev);
            assert!(!clock.drifted(&at(dev)), "{dev}");
        }
        for dev in [8_000_000, -8_000_001, 1_000_000_000] {
            assert!(clock.drifted(&at(dev)), "{dev}");
        }
    }

    #[test]
    fn the_config_carries_the_clock_or_the_helper_fallback() {
        let base = DatapathConfig::with_defaults(hasync_common::MemberId(1));
        let clock = JiffyClock {
            ns_per_jiffy: 4_000_000,
            offset_ns: 42,
        };
        let cfg = JiffyClock::configure(Some(clock), &base);
        assert_eq!((cfg.ns_per_jiffy, cfg.jiffies_offset_ns), (4_000_000, 42));
        assert_eq!(cfg.jiffies_ns(10), 40_000_042);
        assert_eq!(cfg.jiffies_ns(10), clock.ns(10));
        assert_eq!(JiffyClock::configure(None, &cfg), base);
    }
}
