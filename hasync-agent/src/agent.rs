//! `hasync agent` without a configuration file: bring the datapath up from the flags
//! ([`crate::startup`]), then consume events and sweep expired sessions until SIGINT/SIGTERM.

use std::time::Duration;

use anyhow::{anyhow, Context as _};
use hasync_common::{Counter, Counters, Event, EventKind, State};
use tokio::time::{interval, interval_at, Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::{
    cli::AgentArgs,
    datapath::{
        error_chain, Datapath, EventStream, Removed, SessionEvent, SweepReport, DEFAULT_CHUNK,
    },
    startup::{bring_up, Signalled, Signals, StartPlan, Started},
};

/// How often the agent logs a summary.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// Runs the agent until SIGINT or SIGTERM; then detaches and returns.
pub fn run(args: &AgentArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.config {
        return crate::runtime::run(path);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: &AgentArgs) -> anyhow::Result<()> {
    // Signal handlers first, so a signal during start-up also ends in a clean detach.
    let signals = Signals::new()?;
    let plan = StartPlan::from_args(args).map_err(|e| anyhow!(e))?;
    let (started, ()) = bring_up(&plan, |_| Ok(()))?;
    let Started {
        mut dp, mut events, ..
    } = started;
    info!(
        member = args.member.0,
        capacity = dp.capacity(),
        sweep_interval_ms = args.sweep_interval_ms,
        "agent running"
    );
    let result = serve(&mut dp, &mut events, args.sweep_interval(), signals).await;
    let detached = dp.detach_all().context("detaching XDP");
    result?;
    detached?;
    info!("stopped");
    Ok(())
}

/// What the agent saw since the last summary.
#[derive(Debug, Default)]
struct Tally {
    /// Events per [`EventKind`] (index = kind as u8).
    events: [u64; 6],
    sweeps: u64,
    sweep_errors: u64,
    removed: SweepReport,
}

impl Tally {
    fn add_events(&mut self, batch: &[Event]) {
        for event in batch {
            let Some(SessionEvent::Datapath { kind, key, session }) =
                SessionEvent::from_event(event)
            else {
                continue;
            };
            if let Some(n) = self.events.get_mut(kind as usize) {
                *n += 1;
            }
            debug!(
                kind = kind.name(),
                flow = %key,
                state = state_name(session.state),
                owner = session.owner.0,
                version = session.version,
                "session event"
            );
        }
    }

    fn add_sweep(&mut self, report: &SweepReport) {
        let SweepReport {
            scanned,
            expired,
            closed,
            spared,
        } = *report;
        self.sweeps += 1;
        self.removed.scanned += scanned;
        self.removed.expired += expired;
        self.removed.closed += closed;
        self.removed.spared += spared;
    }

    fn event_count(&self, kind: EventKind) -> u64 {
        self.events.get(kind as usize).copied().unwrap_or(0)
    }
}

async fn serve(
    dp: &mut Datapath,
    events: &mut EventStream,
    sweep_every: Duration,
    mut signals: Signals,
) -> anyhow::Result<()> {
    let mut sweep_tick = interval(sweep_every);
    sweep_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut summary_tick = interval_at(Instant::now() + SUMMARY_INTERVAL, SUMMARY_INTERVAL);
    let mut tally = Tally::default();
    let mut last_counters = dp.counters().context("reading datapath counters")?;
    loop {
        tokio::select! {
            signal = signals.recv() => match signal {
                Signalled::Stop(name) => {
                    info!(signal = name, "stopping");
                    return Ok(());
                }
                Signalled::Reopen => info!("SIGHUP: without a config there is no traffic log to reopen"),
            },
            batch = events.next_batch() => tally.add_events(&batch),
            _ = sweep_tick.tick() => {
                // Synchronous: a sweep of a large table holds the loop for a while; the ring
                // buffer absorbs the events meanwhile.
                match dp.sweep(DEFAULT_CHUNK, log_removed) {
                    Ok(report) => {
                        if report.removed() > 0 || report.spared > 0 {
                            debug!(
                                scanned = report.scanned,
                                expired = report.expired,
                                closed = report.closed,
                                spared = report.spared,
                                "sweep"
                            );
                        }
                        tally.add_sweep(&report);
                    }
                    Err(error) => {
                        tally.sweep_errors += 1;
                        warn!(error = %error_chain(&error), "sweep failed");
                    }
                }
            }
            _ = summary_tick.tick() => {
                let counters = dp.counters().context("reading datapath counters")?;
                summarize(&tally, events, &counters, &last_counters);
                last_counters = counters;
                tally = Tally::default();
            }
        }
    }
}

fn log_removed(removed: &[Removed]) {
    for r in removed {
        debug!(
            reason = r.reason.name(),
            flow = %r.key,
            state = state_name(r.session.state),
            "session removed"
        );
    }
}

fn summarize(tally: &Tally, events: &EventStream, now: &Counters, before: &Counters) {
    let delta = |c: Counter| now.get(c).wrapping_sub(before.get(c));
    let stats = events.stats();
    info!(
        packets = delta(Counter::Packets),
        created = tally.event_count(EventKind::Created),
        state_changed = tally.event_count(EventKind::StateChanged),
        closed = tally.event_count(EventKind::Closed),
        taken_over = tally.event_count(EventKind::OwnershipTaken),
        refreshed = tally.event_count(EventKind::Refresh),
        evicted = tally.event_count(EventKind::Evicted),
        sweeps = tally.sweeps,
        expired = tally.removed.expired,
        removed_closed = tally.removed.closed,
        malformed_events_total = stats.malformed,
        "summary of the last minute"
    );
    let lost = delta(Counter::RingbufFull);
    if lost > 0 {
        warn!(
            lost,
            "events lost: the ring buffer was full (the sweep repairs expiry)"
        );
    }
    if tally.sweep_errors > 0 {
        warn!(
            errors = tally.sweep_errors,
            "sweeps failed in the last minute"
        );
    }
}

fn state_name(state: u8) -> &'static str {
    State::from_u8(state).map_or("unknown", State::name)
}
