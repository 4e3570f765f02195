//! `hasync agent`: load the datapath, attach it, then consume events and sweep expired
//! sessions until SIGINT/SIGTERM.

use std::time::Duration;

use anyhow::{anyhow, Context as _};
use hasync_common::{Counter, Counters, Event, EventKind, State, ZoneBinding, ZoneId};
use tokio::{
    signal::unix::{signal, SignalKind},
    time::{interval, interval_at, Instant, MissedTickBehavior},
};
use tracing::{debug, info, warn};

use crate::{
    cli::AgentArgs,
    datapath::{
        error_chain, Datapath, DatapathOptions, EventStream, Removed, SessionEvent, SweepReport,
        DEFAULT_CHUNK,
    },
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
    let plan = args.zone_plan().map_err(|e| anyhow!(e))?;
    // Resolve every interface before loading anything: a typo fails fast and touches nothing.
    let indexes = plan
        .bindings
        .iter()
        .map(|b| crate::datapath::ifindex(&b.interface))
        .collect::<Result<Vec<u32>, _>>()?;

    let mut opts = DatapathOptions::new(args.member);
    opts.session_capacity = args.session_capacity;
    opts.config.policy = hasync_common::Policy::from(args.policy) as u8;
    let mut dp = Datapath::load(&opts).context("loading the XDP datapath")?;
    dp.set_member_alive(args.member, true)
        .with_context(|| format!("marking member {} alive", args.member.0))?;
    for (name, id) in &plan.zones {
        info!(zone = %name, id = id.0, "zone");
    }
    for (b, &index) in plan.bindings.iter().zip(&indexes) {
        if b.zone != ZoneId::NONE {
            dp.set_zone(index, ZoneBinding::new(b.zone))
                .with_context(|| {
                    format!("binding interface `{}` to zone {}", b.interface, b.zone.0)
                })?;
        }
    }
    let mut events = dp.take_events().context("opening the events ring buffer")?;

    let result = attach_and_serve(&mut dp, &mut events, args, signals).await;
    let detached = dp.detach_all().context("detaching XDP");
    result?;
    detached?;
    info!("stopped");
    Ok(())
}

async fn attach_and_serve(
    dp: &mut Datapath,
    events: &mut EventStream,
    args: &AgentArgs,
    signals: Signals,
) -> anyhow::Result<()> {
    for arg in &args.interfaces {
        let mode = dp.attach(&arg.name)?;
        info!(interface = %arg.name, zone = arg.zone.as_deref().unwrap_or("-"), %mode, "attached");
    }
    info!(
        member = args.member.0,
        capacity = dp.capacity(),
        sweep_interval_ms = args.sweep_interval_ms,
        "agent running"
    );
    serve(dp, events, args.sweep_interval(), signals).await
}

struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }
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
            _ = signals.interrupt.recv() => {
                info!(signal = "SIGINT", "stopping");
                return Ok(());
            }
            _ = signals.terminate.recv() => {
                info!(signal = "SIGTERM", "stopping");
                return Ok(());
            }
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
