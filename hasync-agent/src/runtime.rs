//! `hasync agent --config FILE`: a cluster member. Loads and attaches the datapath as the
//! configuration says, runs the sync engine and the membership rules, turns datapath events
//! and sweep removals into sync records and traffic-log lines, and serves the control socket.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _};
use hasync_common::{Counter, Event, EventKind, FlowKey, MemberId};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{
    cluster::{LinkState, Membership, Timers},
    config::{self, parse_cidr, Config, ForwardingName},
    control::ControlRequest,
    datapath::{
        error_chain,
        events::MAX_BATCH,
        replica_room::{recount_beside, recount_every},
        sweep_table::SweepBeside,
        Datapath, EventStream, RemoveReason, Removed, SessionReader,
    },
    forwarding::kernel_track::{KernelEntries, KernelEntriesQueue},
    lock::lock_on_worker,
    member::{lock, Member},
    netlink::{LinkWatch, NetlinkError},
    stall_watch::StallWatch,
    startup::{bring_up, Signalled, Signals, StartPlan, Started},
    suspend_mark,
    sync::{
        backlog::Change,
        backoff::Backoff,
        engine::{Engine, PeerConfig, SyncConfig},
        log_limit::LogLimiter,
        removals::RecentRemovals,
        wire::LinkKind,
    },
    tasks::Tasks,
    traffic_log::TrafficLog,
};

/// How often the expiry sweep takes a step, and how many sessions a step looks at at its base
/// pace: the table is never held for long (a few milliseconds a step), and a pass over a
/// million live sessions takes about 12 s (while it finds many expired, up to
/// [`crate::datapath::sweep::MAX_PACE`] times faster). A new pass waits until a session may have expired (see
/// `IncrementalSweep`). Expired sessions the sweep has not reached yet are already treated as
/// absent by the XDP program.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
const SWEEP_BUDGET: u64 = 8192;
/// How often liveness and the local state are evaluated.
const MEMBERSHIP_EVERY: Duration = Duration::from_millis(200);
/// How often the datapath's noted events are logged: each kind at most once per CPU per this.
const LOG_DRAIN_EVERY: Duration = Duration::from_secs(1);
/// The shortest and longest wait between two re-announcements after lost events.
const REANNOUNCE_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(64));
/// A starting member waits this long for peers to connect before deciding it is alone.
const DISCOVERY: Duration = Duration::from_secs(2);

/// Runs a cluster member from `path` until SIGINT or SIGTERM.
pub fn run(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = runtime.block_on(run_async(config));
    // Not dropped: a drop waits for a task inside `block_in_place` (the sweep's step, a wait
    // for a lock taken off the worker) to leave it, and that task then polls a timer of a
    // runtime shut down, which panics (tokio#2789: a 3-member fault run's restart hit it).
    // What the agent must leave in order, `shut_down` left; the process ends now.
    std::mem::forget(runtime);
    result
}

fn sync_config(config: &Config, psk: [u8; 32], fresh_table: bool) -> anyhow::Result<SyncConfig> {
    let mut local_links = BTreeMap::new();
    let (ha4, _) = parse_cidr(&config.ha4.address).map_err(|e| anyhow!("ha4.address: {e}"))?;
    local_links.insert(LinkKind::Ha4, (ha4, config.ha4.interface.clone()));
    if let Some(b) = &config.ha4_backup {
        let (addr, _) = parse_cidr(&b.address).map_err(|e| anyhow!("ha4_backup.address: {e}"))?;
        local_links.insert(LinkKind::Ha4Backup, (addr, b.interface.clone()));
    }
    let local = config.local_member();
    let peers = config
        .members
        .iter()
        .map(|m| {
            let mut addrs = BTreeMap::new();
            addrs.insert(LinkKind::Ha4, m.ha4);
            if let Some(b) = m.ha4_backup {
                addrs.insert(LinkKind::Ha4Backup, b);
            }
            PeerConfig {
                id: m.id,
                serial: m.serial.clone(),
                addrs,
                session_sync: m.session_sync,
                enabled: m.enabled,
            }
        })
        .collect::<Vec<_>>();
    let local_session_sync = peers
        .iter()
        .find(|p| p.id == local)
        .is_some_and(|p| p.session_sync);
    let threshold = Duration::from_millis(config.cluster.keepalive_threshold_ms);
    Ok(SyncConfig {
        cluster_id: config.cluster.id,
        local,
        local_session_sync,
        psk,
        zones: config.zone_names(),
        fingerprint: config.fingerprint(),
        port: config.cluster.sync_port,
        local_links,
        peers: peers.into_iter().filter(|p| p.id != local).collect(),
        keepalive_interval: keepalive_interval(threshold),
        keepalive_threshold: threshold,
        hold_down: config.monitor_hold_down(),
        boot_id: boot_id(),
        fresh_table,
        initial_sync_limit: config.initial_sync_limit(),
    })
}

/// A random id for this agent start, so peers notice a restart.
fn boot_id() -> u64 {
    let mut b = [0u8; 8];
    if getrandom_fill(&mut b).is_err() {
        // Fall back to the clock: unique enough across restarts of one member.
        return crate::datapath::monotonic_ns() ^ u64::from(std::process::id()) << 32;
    }
    u64::from_ne_bytes(b)
}

fn getrandom_fill(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

async fn run_async(config: Config) -> anyhow::Result<()> {
    let psk = config::read_cluster_key(&config.cluster.key_file)?;
    let Preflight {
        mut log,
        pingers,
        suspended,
        access,
    } = preflight(&config)?;
    let mut signals = Signals::new()?;
    let plan = StartPlan::from_config(&config);
    let (started, forwarding) = bring_up(&plan, |dp| {
        crate::forwarding::prepare(&config, dp).context("starting forwarding in XDP")
    })?;
    let Started {
        dp,
        mut events,
        restarted,
        stacked,
    } = started;
    // One interface watcher (a netlink socket and its reader) for the sync links, the link
    // groups, the stacked devices and the forwarding ports.
    let (links, reader) = match LinkWatch::spawn() {
        Ok((watch, reader)) => (Ok(watch), Some(reader)),
        Err(e) => (Err(e), None),
    };
    let (member, mut tasks) = start_member(
        config,
        psk,
        dp,
        restarted,
        links.clone(),
        pingers,
        suspended,
    )?;
    if let Some(reader) = reader {
        tasks.add("interface watcher", reader);
    }
    let followers = InterfaceFollowers {
        zones: plan.zone_interfaces(),
        stacked,
        forwarding,
    };
    followers.start(&member, links, &mut tasks);
    let (control_tx, mut control_rx) = tokio::sync::mpsc::channel(64);
    if let Some(http) = crate::http::start(&member.config, control_tx.clone()).await {
        tasks.add("metrics and dashboard server", http);
    }
    let control = serve_control(&member.config, control_tx, access).await?;
    tasks.add("control socket", control);
    let attached = lock(&member.dp).attachments().len();
    announce_ready(&member, attached, restarted);
    if restarted && member.config.local.forwarding == ForwardingName::Xdp {
        mark_kept_kernel_entries(&member);
    }
    let inputs = Inputs {
        signals: &mut signals,
        events: &mut events,
        control: &mut control_rx,
        tasks: &mut tasks,
    };
    let result = main_loop(&member, restarted, inputs, &mut log).await;
    shut_down(tasks, &member, result)
}

/// The tasks that follow the interface table beside the member's own: the bindings of the
/// devices stacked on zone interfaces and, with forwarding in XDP, its ports and FIB.
struct InterfaceFollowers {
    zones: crate::stacked::ZoneInterfaces,
    /// What start-up bound.
    stacked: Vec<(u32, hasync_common::ZoneBinding)>,
    forwarding: Option<crate::forwarding::Prepared>,
}

impl InterfaceFollowers {
    fn start(self, member: &Member, links: Result<LinkWatch, NetlinkError>, tasks: &mut Tasks) {
        match &links {
            Ok(watch) => {
                let dp = member.dp.clone();
                let task = crate::stacked::spawn(dp, self.zones, watch.clone(), self.stacked);
                tasks.add("stacked devices", task);
            }
            Err(e) => {
                warn!(error = %e, "no interface notifications: devices stacked on zone interfaces keep the zones they had at start")
            }
        }
        if let Some(prepared) = self.forwarding {
            let dp = member.dp.clone();
            tasks.extend(crate::forwarding::spawn(
                &member.config,
                dp,
                prepared,
                links.ok(),
            ));
        }
    }
}

/// What [`preflight`] opened.
struct Preflight {
    log: TrafficLog,
    pingers: crate::monitor::Pingers,
    /// A suspend was in effect when an earlier agent stopped ([`suspend_mark`]): whose.
    suspended: Option<suspend_mark::MarkKind>,
    /// Who may use the control socket read-only (`[local] control_group`, looked up once).
    access: crate::control::server::Access,
}

/// Opens what the config names that can fail before the datapath is touched: the traffic
/// log, the path groups' raw sockets (CAP_NET_RAW), a check of the control socket (served
/// once the datapath is up), and the suspend mark. A start refused after the datapath was loaded would leave a
/// pinned datapath, whose program an earlier agent left running, with this config's maps, or
/// interfaces switched to this agent's program.
fn preflight(config: &Config) -> anyhow::Result<Preflight> {
    let log = open_traffic_log(config)?;
    let pingers = crate::monitor::open(config)?;
    let socket = &config.local.control_socket;
    let access = crate::control::server::Access::for_group(config.local.control_group.as_deref())?;
    crate::control::server::check(socket, access)
        .with_context(|| format!("checking the control socket {}", socket.display()))?;
    let suspended = kept_suspend(config)?;
    let state_dir = &config.local.state_dir;
    match suspend_mark::check_writable(state_dir) {
        Err(e @ suspend_mark::MarkError::Io { what, .. })
            if what == suspend_mark::PROBING || what == suspend_mark::CREATING =>
        {
            return Err(anyhow::Error::new(e).context(format!(
                "local.state_dir {} must be writable: `hasync suspend` keeps its mark there \
                 (under the systemd unit, add a state_dir other than /var/lib/hasync to \
                 ReadWritePaths)",
                state_dir.display()
            )))
        }
        checked => checked.context("checking the state directory")?,
    }
    Ok(Preflight {
        log,
        pingers,
        suspended,
        access,
    })
}

/// The suspend kept from an earlier start ([`suspend_mark`]), said. A flap limit's mark under
/// a config without one (`max_flaps` since set to 0) is stale: removed, and said.
fn kept_suspend(config: &Config) -> anyhow::Result<Option<suspend_mark::MarkKind>> {
    use suspend_mark::MarkKind;
    let state_dir = &config.local.state_dir;
    let kept = suspend_mark::read(state_dir).context("reading the suspend mark")?;
    let mark = suspend_mark::path(state_dir);
    match kept {
        Some(MarkKind::Operator) => warn!(
            mark = %mark.display(),
            "starting suspended: `hasync suspend` was in effect when the agent last stopped; \
             `hasync functional` brings this member back"
        ),
        Some(MarkKind::FlapLimit) if config.local.max_flaps == 0 => {
            warn!(
                mark = %mark.display(),
                "not suspended: the flap limit had suspended this member, but local.max_flaps \
                 is 0 now; its mark is removed"
            );
            if let Err(e) = suspend_mark::clear(state_dir) {
                warn!(error = %e, "the stale mark stays (it suspends nothing while local.max_flaps is 0)");
            }
            return Ok(None);
        }
        Some(MarkKind::FlapLimit) => warn!(
            mark = %mark.display(),
            "starting suspended: this member had reached its flap limit (local.max_flaps) when \
             the agent last stopped; it serves again if no other member is in service, or on \
             `hasync functional`"
        ),
        None => {}
    }
    Ok(kept)
}

/// How often keepalives go out, for a keepalive threshold of `threshold`.
fn keepalive_interval(threshold: Duration) -> Duration {
    (threshold / 5).min(Duration::from_secs(1))
}

/// What the main loop waits on.
struct Inputs<'a> {
    signals: &'a mut Signals,
    events: &'a mut EventStream,
    control: &'a mut tokio::sync::mpsc::Receiver<ControlRequest>,
    /// The long-lived tasks: the first to end ends the main loop, with an error.
    tasks: &'a mut Tasks,
}

/// Serves the datapath's events, the timers and the control requests until a signal comes,
/// or one of the long-lived tasks ends ([`crate::tasks`]: then with an error).
async fn main_loop(
    member: &Member,
    restarted: bool,
    inputs: Inputs<'_>,
    log: &mut TrafficLog,
) -> anyhow::Result<()> {
    let Inputs {
        signals,
        events,
        control,
        tasks,
    } = inputs;
    let mut main = MainLoop::new(member, restarted);
    loop {
        tokio::select! {
            signal = signals.recv() => match signal {
                Signalled::Stop(name) => {
                    info!(signal = name, "stopping");
                    // A flap limit's suspend made on a reader's worker since the last
                    // evaluation is kept too.
                    main.flap_mark.sync_now(&member.membership, &member.config.local.state_dir);
                    return Ok(());
                }
                Signalled::Reopen => reopen_traffic_log(log),
            },
            ended = tasks.ended() => {
                main.flap_mark.sync_now(&member.membership, &member.config.local.state_dir);
                return Err(ended.into());
            }
            batch = events.next_batch() => main.on_events(member, &batch, log),
            _ = main.sweep_tick.tick() => main.on_sweep(member, log),
            _ = main.membership_tick.tick() => main.on_membership(member),
            Some((request, level, reply)) = control.recv() => {
                crate::control::handler::answer(member, request, level, reply);
            }
        }
    }
}

/// Stops `tasks`, tells systemd, and leaves the datapath (pinned, or detached); the main
/// loop's `result` first, then any failure to leave.
fn shut_down(tasks: Tasks, member: &Member, result: anyhow::Result<()>) -> anyhow::Result<()> {
    tasks.abort_all();
    crate::service::notify::stopping();
    let detached = leave_datapath(member);
    result?;
    detached?;
    info!("stopped");
    Ok(())
}

/// SIGHUP: the traffic log's path is opened again (logrotate renamed the file); on failure
/// the old file stays in use.
fn reopen_traffic_log(log: &mut TrafficLog) {
    match log.reopen() {
        Ok(()) => info!(path = %log.path().display(), "traffic log reopened (SIGHUP)"),
        Err(e) => {
            warn!(error = %error_chain(&e), "reopening the traffic log failed; writing on to the file open before")
        }
    }
}

fn open_traffic_log(config: &Config) -> anyhow::Result<TrafficLog> {
    let path = &config.local.traffic_log;
    TrafficLog::open(path).with_context(|| format!("opening the traffic log {}", path.display()))
}

/// The membership rules and the sync engine over `dp`, with the tasks they run (the engine's,
/// the monitors', the path groups' with `pingers`).
fn start_member(
    config: Config,
    psk: [u8; 32],
    dp: Datapath,
    restarted: bool,
    links: Result<LinkWatch, NetlinkError>,
    pingers: crate::monitor::Pingers,
    suspended: Option<suspend_mark::MarkKind>,
) -> anyhow::Result<(Arc<Member>, Tasks)> {
    let sync_cfg = sync_config(&config, psk, !restarted)?;
    let member = new_member(config, sync_cfg, dp, suspended)?;
    let mut tasks = Tasks::default();
    tasks.extend(member.engine.start(links.clone()));
    tasks.add("stall watch", StallWatch::spawn(member.stall.clone()));
    tasks.extend(crate::monitor::spawn(
        &member.config,
        member.dp.clone(),
        links,
        member.membership.clone(),
        pingers,
    ));
    Ok((member, tasks))
}

/// The member over `dp`, its engine not started yet: the membership rules (`suspended` as a
/// mark kept from an earlier start says: the first keepalive says so), the
/// sync engine and the hook by which the engine has the membership applied when a member
/// comes back.
fn new_member(
    config: Config,
    sync_cfg: SyncConfig,
    dp: Datapath,
    suspended: Option<suspend_mark::MarkKind>,
) -> anyhow::Result<Arc<Member>> {
    let bounds = dp.bounds();
    let counters = dp
        .counters_reader()
        .context("opening the datapath's counters")?;
    let dp = Arc::new(Mutex::new(dp));
    let mut rules = membership(&config, &sync_cfg);
    match suspended {
        Some(suspend_mark::MarkKind::Operator) => rules.suspend(),
        Some(suspend_mark::MarkKind::FlapLimit) => rules.restore_flap_suspend(),
        None => {}
    }
    let membership = Arc::new(Mutex::new(rules));
    let engine = Engine::new(sync_cfg, dp.clone(), membership.clone());
    let stall = engine.stall_watch();
    let member = Arc::new(Member {
        config,
        dp,
        membership,
        engine,
        started: Instant::now(),
        swept: Mutex::default(),
        bounds,
        counters,
        liveness_lines: LogLimiter::default(),
        claims: Mutex::default(),
        stall,
        member_map_retry: Mutex::default(),
    });
    apply_membership_on_return(&member);
    Ok(member)
}

/// Has the sync engine run [`apply_membership`] when a keepalive brings a member back
/// (`Engine::on_return`), for as long as `member` lives.
fn apply_membership_on_return(member: &Arc<Member>) {
    let weak = Arc::downgrade(member);
    member.engine.on_return(move || {
        if let Some(member) = weak.upgrade() {
            // On a reader's worker: a wait for the datapath's lock leaves the worker to the
            // other tasks.
            tokio::task::block_in_place(|| apply_membership(&member));
        }
    });
}

/// The membership rules' starting point: the peers (and whether each sends us a full sync),
/// the timers, the agreed settings, and the links, down where both ends have them and
/// not-configured elsewhere.
fn membership(config: &Config, sync_cfg: &SyncConfig) -> Membership {
    let timers = Timers {
        keepalive_threshold: Duration::from_millis(config.cluster.keepalive_threshold_ms),
        sync_timeout: config.initial_sync_limit(),
        tentative_hold: Duration::from_secs(config.cluster.tentative_hold_s),
        monitor_hold_down: config.monitor_hold_down(),
        discovery: DISCOVERY,
    };
    let peers = sync_cfg
        .peers
        .iter()
        // A peer sends us a full sync only if both of us sync sessions: a member without
        // session sync must not wait in `initial` for one that never comes.
        .map(|p| {
            let syncs = p.session_sync && p.enabled && sync_cfg.local_session_sync;
            (p.id, p.serial.clone(), syncs)
        })
        .collect();
    let mut m = Membership::new(sync_cfg.local, timers, peers, Instant::now());
    m.set_agreed(config::without_zones(config.fingerprint()));
    m.set_max_flaps(config.local.max_flaps);
    for p in &sync_cfg.peers {
        for link in [LinkKind::Ha4, LinkKind::Ha4Backup] {
            let both = p.addrs.contains_key(&link) && sync_cfg.local_links.contains_key(&link);
            let state = if both {
                LinkState::Down
            } else {
                LinkState::NotConfigured
            };
            m.set_link(p.id, link, state);
        }
    }
    m
}

/// Serves the control socket, its readers let in by `access`; requests come through
/// `control_tx` to the main loop.
async fn serve_control(
    config: &Config,
    control_tx: crate::control::ControlSender,
    access: crate::control::server::Access,
) -> anyhow::Result<JoinHandle<()>> {
    let path = &config.local.control_socket;
    crate::control::server::serve_for(path, control_tx, access)
        .await
        .with_context(|| format!("serving the control socket {}", path.display()))
}

/// Logs that the member runs and tells systemd it is ready (Type=notify): attached, maps
/// filled, control socket up. After a restart on a kept table, every peer is owed a full sync
/// of this member's sessions: the agent that stopped lost what it had queued, removals among
/// them, and the ring buffer may have filled while no agent read it (the pinned loss counter
/// cannot tell those losses from older ones). Only a full sync from a table kept (not fresh)
/// makes the peer remove the replicas this member no longer holds, and a peer that did not
/// see the agent gone (back within its keepalive threshold) asks for none.
fn announce_ready(member: &Member, interfaces: usize, restarted: bool) {
    let (local, cluster) = (member.config.local_member(), member.config.cluster.id);
    info!(
        member = local.0,
        cluster = cluster.0,
        restarted,
        "cluster member running"
    );
    let kept = if restarted {
        ", sessions kept from the previous run"
    } else {
        ""
    };
    crate::service::notify::ready(&format!(
        "member {} of cluster {cluster}: attached to {interfaces} interface(s){kept}",
        local.0
    ));
    if restarted {
        member.engine.request_bulk_all();
    }
}

/// What the main loop keeps between its events.
struct MainLoop {
    sweep_tick: tokio::time::Interval,
    membership_tick: tokio::time::Interval,
    sweep: SweepBeside,
    table_access: crate::monitor::TableAccess,
    /// The datapath's count of lost events when they were last made up for.
    lost_events: u64,
    reannounce_backoff: Backoff,
    /// After a restart, the takeover rule's reused MEMBERS map still says who was alive
    /// before; once a keepalive threshold has passed, the membership knows better.
    members_unsettled: Option<Instant>,
    owned: Vec<(FlowKey, Change)>,
    /// Keys removed from the table whose earlier events may still be in the ring buffer.
    removals: RecentRemovals,
    /// When the datapath's log is drained next.
    next_log_drain: Instant,
    /// When the peers' pool of the table is counted again next, and the count under way.
    next_recount: Instant,
    recounting: Option<tokio::task::JoinHandle<()>>,
    /// How often the service manager's watchdog is pinged, and when next (`None`: no
    /// watchdog).
    watchdog: Option<(Duration, Instant)>,
    /// The flap limit's suspend, kept in the state directory as the membership decides it.
    flap_mark: suspend_mark::FlapMarkSync,
    /// The kernel's entries of this member's TCP connections, with XDP forwarding: marked
    /// liberal when established, closed when they end.
    kernel_entries: KernelEntriesQueue,
}

impl MainLoop {
    fn new(member: &Member, restarted: bool) -> MainLoop {
        let threshold = Duration::from_millis(member.config.cluster.keepalive_threshold_ms);
        let mut sweep_tick = tokio::time::interval(SWEEP_EVERY);
        let mut membership_tick = tokio::time::interval(MEMBERSHIP_EVERY);
        for t in [&mut sweep_tick, &mut membership_tick] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        MainLoop {
            sweep_tick,
            membership_tick,
            sweep: Default::default(),
            table_access: Default::default(),
            lost_events: lost_events(member).unwrap_or(0),
            reannounce_backoff: Backoff::new(REANNOUNCE_BACKOFF.0, REANNOUNCE_BACKOFF.1),
            members_unsettled: restarted.then(|| Instant::now() + threshold),
            owned: Vec::new(),
            removals: RecentRemovals::default(),
            next_log_drain: Instant::now() + LOG_DRAIN_EVERY,
            next_recount: Instant::now() + recount_every(member.bounds.capacity),
            recounting: None,
            watchdog: crate::service::notify::watchdog_every().map(|every| (every, Instant::now())),
            flap_mark: suspend_mark::FlapMarkSync::new(&lock(&member.membership)),
            kernel_entries: KernelEntriesQueue::new(
                member.config.local.forwarding == ForwardingName::Xdp,
            ),
        }
    }

    /// Pings the service manager's watchdog when due: from the main loop, so a loop that hangs
    /// (a lock never released, a wait that never ends) stops the pings and gets the agent
    /// restarted.
    fn ping_watchdog(&mut self) {
        let Some((every, next)) = &mut self.watchdog else {
            return;
        };
        let now = Instant::now();
        if now >= *next {
            crate::service::notify::watchdog();
            *next = now + *every;
        }
    }

    /// Datapath events: this member's sessions go to the sync, each with the event's snapshot
    /// of it unless the session was removed since (`RecentRemovals`); an evicted one of ours
    /// ended (its log line; the sync reads it gone and sends its removal).
    fn on_events(&mut self, member: &Member, batch: &[Event], log: &mut TrafficLog) {
        let local = member.config.local_member();
        self.owned.clear();
        for e in batch.iter().filter(|e| e.session.owner == local) {
            if e.kind == EventKind::StateChanged as u8 {
                self.kernel_entries.established(&e.key, &e.session);
            }
            if e.kind == EventKind::Closed as u8 {
                self.kernel_entries.closed(&e.key, &e.session);
            }
            if e.kind == EventKind::Evicted as u8 {
                self.removals.removed(e.key);
                log.write_removed(
                    &Removed {
                        key: e.key,
                        session: e.session,
                        reason: RemoveReason::Evicted,
                    },
                    &member.config,
                );
            }
            let change = self.removals.change(&e.key, &e.session);
            self.owned.push((e.key, change));
        }
        if batch.len() < MAX_BATCH {
            self.removals.drained();
        }
        if !self.owned.is_empty() {
            member.engine.enqueue_changes(self.owned.iter().copied());
        }
        member.engine.flush();
        self.flush_kernel_entries(member);
        log.flush();
    }

    /// Sends the kernel-entry updates queued; after some were dropped (the kernel long slow to
    /// take them), marks the established connections again once it takes them.
    fn flush_kernel_entries(&mut self, member: &Member) {
        if self.kernel_entries.flush() {
            mark_kept_kernel_entries(member);
        }
    }

    /// One step of the expiry sweep: this member's removed sessions are logged and synced;
    /// a pass over the whole table also counts the sessions each member owns. Then events
    /// lost to a full ring buffer are made up for.
    fn on_sweep(&mut self, member: &Member, log: &mut TrafficLog) {
        let local = member.config.local_member();
        let engine = member.engine.clone();
        let swept = tokio::task::block_in_place(|| {
            self.sweep
                .step(&member.dp, SWEEP_BUDGET, |removed: &[Removed]| {
                    let mut gone = Vec::new();
                    for r in removed.iter().filter(|r| r.session.owner == local) {
                        self.kernel_entries.closed(&r.key, &r.session);
                        log.write_removed(r, &member.config);
                        self.removals.removed(r.key);
                        gone.push(r.key);
                    }
                    engine.enqueue(&gone);
                })
        });
        let error = swept.as_ref().err().map(|e| error_chain(e));
        self.table_access.step(&member.membership, error);
        match swept {
            Ok(Some(pass)) => {
                let owned = pass.kept.by_owner.get(usize::from(local.0)).copied();
                lock(&member.membership).local_sessions_owned =
                    u32::try_from(owned.unwrap_or(0)).unwrap_or(u32::MAX);
                // Counted from the pass's start on: as old as its start.
                let took = Duration::from_nanos(pass.took_ns);
                let at = Instant::now()
                    .checked_sub(took)
                    .unwrap_or_else(Instant::now);
                *lock(&member.swept) = Some((at, pass.kept));
            }
            Ok(None) => {}
            Err(e) => warn!(error = %error_chain(&e), "sweep failed"),
        }
        member.engine.flush();
        self.flush_kernel_entries(member);
        log.flush();
        self.make_up_for_lost_events(member);
        self.drain_datapath_log(member);
        self.recount_replicas(member);
    }

    /// Counts the peers' pool of the table again, every `recount_every` (see
    /// `datapath::replica_room`), on a thread of its own: the walk holds nothing.
    fn recount_replicas(&mut self, member: &Member) {
        let running = self.recounting.as_ref().is_some_and(|h| !h.is_finished());
        if running || Instant::now() < self.next_recount {
            return;
        }
        let dp = member.dp.clone();
        self.next_recount = Instant::now() + recount_every(member.bounds.capacity);
        self.recounting = Some(tokio::task::spawn_blocking(move || {
            if let Err(e) = recount_beside(&dp) {
                warn!(error = %error_chain(&e), "counting peers' sessions in the table failed");
            }
        }));
    }

    /// Logs what the datapath noted (`[local] datapath_log`), once every [`LOG_DRAIN_EVERY`].
    fn drain_datapath_log(&mut self, member: &Member) {
        if Instant::now() < self.next_log_drain {
            return;
        }
        self.next_log_drain = Instant::now() + LOG_DRAIN_EVERY;
        let drained = tokio::task::block_in_place(|| lock(&member.dp).drain_log());
        if let Err(e) = drained {
            warn!(error = %error_chain(&e), "reading the datapath's log failed");
        }
    }

    /// Events lost to a full ring buffer: announces every owned session again, at most once
    /// per backoff step (losses meanwhile wait for the next).
    fn make_up_for_lost_events(&mut self, member: &Member) {
        let lost = lost_events(member).unwrap_or(self.lost_events);
        // While a walk runs, losses wait: the first check after it ends makes up for them.
        if lost != self.lost_events
            && !member.engine.reannouncing()
            && self.reannounce_backoff.try_start(Instant::now())
        {
            let n = lost.wrapping_sub(self.lost_events);
            warn!(
                lost = n,
                "datapath events were lost; re-announcing owned sessions"
            );
            self.lost_events = lost;
            reannounce(member);
        }
    }

    /// Liveness and the local state, evaluated ([`apply_membership`]).
    fn on_membership(&mut self, member: &Member) {
        self.ping_watchdog();
        apply_membership(member);
        let state_dir = &member.config.local.state_dir;
        self.flap_mark.sync(&member.membership, state_dir);
        if self
            .members_unsettled
            .is_some_and(|at| Instant::now() >= at)
        {
            self.members_unsettled = None;
            write_all_liveness(member);
        }
    }
}

/// The datapath's count of events lost to a full ring buffer.
fn lost_events(member: &Member) -> Option<u64> {
    let counters = member.counters.counters().ok()?;
    Some(counters.get(Counter::RingbufFull))
}

/// Leaves a pinned datapath attached, with its table, for the next agent; detaches one that
/// is not pinned.
fn leave_datapath(member: &Member) -> anyhow::Result<()> {
    let mut dp = lock(&member.dp);
    match dp.pin_dir() {
        Some(pins) => {
            info!(
                pin_dir = %pins.root().display(),
                "datapath left running and pinned; `hasync teardown` removes it"
            );
            Ok(())
        }
        None => dp.detach_all().context("detaching XDP"),
    }
}

/// How long this agent's async workers, which read the keepalives, did not run since the
/// last evaluation ([`StallWatch`]), when that is more than [`crate::stall_watch::STALL`]: the
/// peers' silence over it is forgiven. Not the time since the last evaluation: one that waited for the
/// datapath's lock while keepalives could be read would forgive a dead peer's silence.
fn stall_to_forgive(watch: &StallWatch, now: Instant) -> Option<Duration> {
    let gap = watch.take(now);
    (gap > crate::stall_watch::STALL).then_some(gap)
}

/// Writes every member slot of the takeover rule's map from the membership's view, both
/// locks held as [`apply_membership`] holds them.
fn write_all_liveness(member: &Member) {
    let local = member.config.local_member();
    let mut dp = lock_on_worker(&member.dp);
    let m = lock(&member.membership);
    let alive = (1..=MemberId::MAX)
        .map(MemberId)
        .map(|id| (id, id == local || m.peers.get(&id).is_some_and(|p| p.alive)));
    write_liveness(member, &mut dp, alive);
}

/// Writes `writes` (member, alive) into the takeover rule's map; a write the kernel refuses
/// is logged and kept for the next evaluation ([`Member::member_map_retry`]): until stop 45 it
/// was only logged, and the slot stayed wrong until that member's liveness changed again (a
/// dead peer's sessions never taken over).
fn write_liveness(
    member: &Member,
    dp: &mut Datapath,
    writes: impl IntoIterator<Item = (MemberId, bool)>,
) {
    for (id, alive) in writes {
        if let Err(e) = dp.set_member_alive(id, alive) {
            lock(&member.member_map_retry).insert(id);
            // One key for every slot: a map that refuses every write logs as one slot does.
            if let Some(skipped) = member.liveness_lines.allow("member-map", Instant::now()) {
                warn!(peer = id.0, skipped, error = %error_chain(&e), "updating the member map failed; tried again at every evaluation");
            }
        }
    }
}

/// Opens or closes the window in which records settle claims by version alone
/// ([`crate::claim_window`]) as the liveness `changes` say: the datapath config's
/// `claims_open`.
fn update_claim_window(
    member: &Member,
    dp: &mut Datapath,
    changes: &[(MemberId, bool)],
    now: Instant,
) {
    let mut window = lock(&member.claims);
    let Some(open) = window.due(changes, now) else {
        return;
    };
    match dp.set_claims_open(open) {
        Ok(()) => {
            window.written(open);
            info!(
                open,
                "claims of live sessions settled by version alone: {}",
                if open {
                    "a peer is back, or this agent after a stall"
                } else {
                    "no longer"
                }
            );
        }
        Err(e) => warn!(error = %error_chain(&e), "setting the claim window failed"),
    }
}

/// Evaluates the membership and applies what its rules decided: the XDP member map
/// (takeover), the claim window and logs (a burst per member, then one line per interval,
/// and the state once more after lines were left out: [`LogLimiter`]). Every evaluation of
/// the membership goes through it: a change is reported once. The main loop calls it every
/// [`MEMBERSHIP_EVERY`], the sync engine when a keepalive brings a member back
/// (`Engine::on_return`), the control socket after `suspend` and `functional`.
///
/// The evaluation and the datapath's writes happen under the membership's lock: a reader
/// that finds a member alive finds the member map and the claim window already told, and two
/// callers' writes cannot land out of order. The datapath's lock is taken first (its holder
/// may keep it a while: a reattach; it is waited for off the async worker), so that the
/// membership's, which keepalives, appliers and senders take on the async workers, is held
/// only for the evaluation and its writes; nothing takes the datapath's lock while it holds
/// the membership's. A stall of the async workers
/// longer than [`crate::stall_watch::STALL`] since the last evaluation ([`stall_to_forgive`])
/// means this agent did not run: the peers' silence over it is forgiven first, whoever
/// evaluates.
pub(crate) fn apply_membership(member: &Member) {
    let mut dp = lock_on_worker(&member.dp);
    let mut m = lock(&member.membership);
    // Read under the lock: an evaluation that waited for it must not go back in time.
    let now = Instant::now();
    if let Some(gap) = stall_to_forgive(&member.stall, now) {
        warn!(
            stalled_ms = gap.as_millis() as u64,
            "this agent did not run for a while: peers' silence over it is not held against them"
        );
        m.forgive_stall(gap, now);
        // Peers hear nothing for the stall, up to a keepalive interval before it and a tick
        // of the watch: they may take this member for gone a little short of a threshold.
        let threshold = m.keepalive_threshold();
        let slack = keepalive_interval(threshold) + crate::stall_watch::TICK;
        if gap + slack >= threshold {
            lock(&member.claims).stalled(now);
        }
    }
    let changes = m.evaluate(now);
    update_claim_window(member, &mut dp, &changes.liveness, now);
    for &(id, alive) in &changes.liveness {
        if let Some(skipped) = member.liveness_lines.allow(&liveness_key(id), now) {
            log_liveness(id, alive, skipped);
        }
    }
    let peers: Vec<(MemberId, bool)> = m.peers.iter().map(|(id, p)| (*id, p.alive)).collect();
    let retry = std::mem::take(&mut *lock(&member.member_map_retry));
    let local = member.config.local_member();
    let ids: std::collections::BTreeSet<MemberId> = (changes.liveness.iter().map(|(id, _)| *id))
        .chain(retry)
        .collect();
    let writes: Vec<(MemberId, bool)> = ids
        .into_iter()
        .map(|id| (id, id == local || m.peers.get(&id).is_some_and(|p| p.alive)))
        .collect();
    write_liveness(member, &mut dp, writes);
    drop(m);
    drop(dp);
    for (id, alive) in peers {
        if let Some(skipped) = member.liveness_lines.catch_up(&liveness_key(id), now) {
            info!(
                peer = id.0,
                alive, skipped, "member state (after alive and not-alive lines left out)"
            );
        }
    }
    if let Some(state) = changes.local_state {
        info!(state = state.name(), "local member state changed");
        member.engine.announce_state();
    }
    if let Some(flaps) = changes.flap_suspend {
        warn!(
            flaps,
            max_flaps = member.config.local.max_flaps,
            "this member flapped too often: suspended (its traffic moves to the members in \
             service) until `hasync functional`, or until no other member is in service"
        );
    }
    if changes.flap_released {
        warn!(
            "no other member is in service: this member, suspended at its flap limit, serves again"
        );
    }
}

/// The log limiter's key of member `id`'s liveness lines.
fn liveness_key(id: MemberId) -> String {
    format!("member-{}", id.0)
}

fn log_liveness(id: MemberId, alive: bool, skipped: u64) {
    if alive {
        info!(peer = id.0, skipped, "member alive");
    } else {
        warn!(
            peer = id.0,
            skipped,
            "member no longer alive: its sessions are taken over when their traffic arrives here"
        );
    }
}

/// Queues every owned session for every peer (the backlog falls back to full syncs if that is
/// too many, which each peer's full-sync backoff then paces), from a walk of the table on a
/// thread of its own with a reader of its own: the main loop goes on draining events (a walk
/// on it stopped the event reader just when events were being lost), and applies and sends
/// take the table's lock as usual.
fn reannounce(member: &Member) {
    let engine = member.engine.clone();
    let xdp = member.config.local.forwarding == ForwardingName::Xdp;
    let started = walk_on_thread(member, "reannounce", move |reader| {
        // The kernel entries of connections whose establishment was among the lost events are
        // marked liberal too (marking one again changes nothing).
        let mut entries = KernelEntries::new(xdp);
        let walked = engine.reannounce_from(&reader, |k, s| entries.established(k, s));
        entries.flush();
        if let Err(e) = walked {
            warn!(error = %error_chain(&e), "re-announcing sessions failed; asking for full syncs");
            engine.request_bulk_all();
        }
    });
    if let Err(e) = started {
        warn!(error = %e, "re-announcing sessions failed; asking for full syncs");
        member.engine.request_bulk_all();
    }
}

/// Runs `walk` on a thread named `name` with a reader of the session table of its own (the
/// walk holds no lock of the agent's).
fn walk_on_thread(
    member: &Member,
    name: &str,
    walk: impl FnOnce(SessionReader) + Send + 'static,
) -> Result<(), String> {
    let reader = lock(&member.dp)
        .session_reader()
        .map_err(|e| error_chain(&e))?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || walk(reader))
        .map(drop)
        .map_err(|e| format!("starting its thread: {e}"))
}

/// After a restart on a kept table, with forwarding in XDP (or once the kernel takes updates
/// again after some were dropped): marks liberal the kernel entries of this member's
/// established TCP connections, on a thread of its own. Their established events
/// came before this agent read the ring (the last agent read them, the ring filled while no
/// agent read it: losses the pinned loss counter cannot tell from older ones), or under a
/// configuration that forwarded in the kernel, so none would be marked until it changed state
/// again; one handed to the kernel mid-stream beside `ct state invalid drop` died. (Marking
/// one twice changes nothing.)
fn mark_kept_kernel_entries(member: &Member) {
    const FAILED: &str = "marking the kernel's entries of kept connections failed: one handed \
                          to the kernel mid-stream may be invalid there";
    let local = member.config.local_member();
    let started = walk_on_thread(member, "kernel-entries", move |reader| {
        let mut entries = KernelEntries::new(true);
        let walked = reader.each_owned_by(local, |k, s| entries.established(k, s));
        entries.flush();
        if let Err(e) = walked {
            warn!(error = %error_chain(&e), "{FAILED}");
        }
    });
    if let Err(e) = started {
        warn!(error = %e, "{FAILED}");
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::cluster::{FullSyncId, MemberState};

    /// The config tests' sample: member 1 of two, `sync_timeout_min = 0` (the default).
    fn config() -> Config {
        let text = crate::config::tests::sample(Path::new("/nonexistent/cluster.key"));
        Config::from_toml(Path::new("test.toml"), &text).expect("config")
    }

    /// The sample config with its key at `key`, its control socket at `socket` and its
    /// traffic log in `dir`: what a start opens, where a test may open it.
    fn config_with_files(key: &Path, socket: &Path, dir: &Path) -> Config {
        let text = crate::config::tests::sample(key)
            .replace("/run/hasync/hasync.sock", &socket.display().to_string())
            .replace(
                "/var/log/hasync/traffic.jsonl",
                &dir.join("traffic.jsonl").display().to_string(),
            );
        Config::from_toml(Path::new("test.toml"), &text).expect("config")
    }

    /// A member of `config` over a fresh test datapath (`suspended` as a kept mark says).
    fn member_of(config: &Config, suspended: Option<suspend_mark::MarkKind>) -> Arc<Member> {
        let sync_cfg = sync_config(config, [0; 32], true).expect("sync config");
        let dp = crate::datapath::testing::datapath();
        new_member(config.clone(), sync_cfg, dp, suspended).expect("member")
    }

    /// A peer that keeps its keepalives coming but never ends its full sync to a starting
    /// member (stalled, or lying) holds it in `initial` at most the initial sync limit, also
    /// with `sync_timeout_min = 0`: before, it waited for good, and its fresh table took the
    /// peer's records of the sessions it owns for as long.
    #[test]
    fn a_full_sync_that_never_ends_holds_a_starting_member_for_a_bounded_time() {
        let config = config();
        let sync_cfg = sync_config(&config, [0; 32], true).expect("sync config");
        let mut m = membership(&config, &sync_cfg);
        let t0 = Instant::now();
        let peer = MemberId(2);
        let keepalive = |m: &mut Membership, t| m.heard(peer, MemberState::Active, 10, t);
        keepalive(&mut m, t0);
        m.bulk_started(peer, FullSyncId { boot: 9, id: 1 });
        let mut at = |secs: u64| {
            let t = t0 + Duration::from_secs(secs);
            keepalive(&mut m, t);
            m.evaluate(t);
            m.state
        };
        assert_eq!(at(60), MemberState::Initial, "still waiting");
        let limit = config.initial_sync_limit().as_secs();
        assert_eq!(limit, 300);
        assert_ne!(at(limit + 1), MemberState::Initial, "given up on");
    }

    /// An evaluation that waited 3 s for the datapath's lock (a reattach), while the async
    /// workers ran on (the watch kept ticking) and read nothing from a dead peer, forgives
    /// nothing: the peer is declared dead on time. A stall of the workers themselves is still
    /// forgiven. Seen failing (3 s forgiven) when the gap between evaluations was taken
    /// (`Membership::since_evaluated`, since removed).
    #[test]
    fn a_wait_for_the_datapath_is_not_a_stall() {
        let watch = StallWatch::new();
        let t0 = Instant::now();
        let mut t = t0;
        while t < t0 + Duration::from_secs(3) {
            t += crate::stall_watch::TICK;
            watch.tick(t);
        }
        assert_eq!(stall_to_forgive(&watch, t), None);
        watch.tick(t + Duration::from_secs(30));
        let later = t + Duration::from_secs(30);
        assert_eq!(
            stall_to_forgive(&watch, later),
            Some(Duration::from_secs(30))
        );
    }

    /// A control socket that cannot be served (here under a regular file; a read-only path
    /// under the unit's sandbox fails the same way) refuses the start before the datapath is
    /// touched: before its interfaces are even looked up (this host has no `veth-in`), with
    /// an error that names the socket. Before, the agent loaded and attached first (a pinned
    /// datapath then ran with the refused config's maps). Seen failing (the interface's
    /// error) on the old order.
    #[test]
    fn a_control_socket_that_cannot_be_served_refuses_the_start_before_the_datapath() {
        let dir = std::env::temp_dir().join(format!("hasync-preflight-{}", std::process::id()));
        crate::files::fresh_dir(&dir, 0o755).expect("temp dir");
        let key = dir.join("cluster.key");
        std::fs::write(&key, [7u8; 32]).expect("key");
        let blocker = dir.join("not-a-dir");
        std::fs::write(&blocker, b"x").expect("blocker");
        let socket = blocker.join("hasync.sock");
        let config = config_with_files(&key, &socket, &dir);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let e = runtime.block_on(run_async(config)).expect_err("refused");
        let said = format!("{e:#}");
        std::fs::remove_dir_all(&dir).expect("clean up");
        assert!(
            said.starts_with(&format!("checking the control socket {}", socket.display())),
            "{said}"
        );
    }

    /// `hasync suspend` outlives the agent: it leaves its mark in the state directory, and a
    /// member started with it (as the next start's preflight finds it) is suspended from its
    /// first evaluation; `hasync functional` removes the mark. Before, a restart (the
    /// watchdog's, an upgrade's, a crash's) brought a suspended member back into service.
    /// Seen failing: no mark was written.
    #[test]
    fn a_suspend_is_kept_across_a_restart_until_functional() {
        use crate::control::{handler::answer, protocol::Request};
        let tmp = crate::control::testing::TempDir::new("suspend-kept");
        let state_dir = tmp.path().join("state");
        let mut config = config();
        config.local.state_dir = state_dir.clone();
        let start = |suspended| member_of(&config, suspended);
        let ask = |member: &Member, request| {
            let (tx, mut rx) = tokio::sync::oneshot::channel();
            answer(member, request, crate::control::Level::Operator, tx);
            let response = rx.try_recv().expect("answered at once");
            let view: crate::control::view::LocalStateView = response.view().expect("a state");
            assert_eq!(view.not_kept, None);
        };
        let first = start(None);
        ask(&first, Request::Suspend {});
        drop(first);
        let suspended = suspend_mark::read(&state_dir).expect("read the mark");
        assert_eq!(
            suspended,
            Some(suspend_mark::MarkKind::Operator),
            "no mark kept"
        );
        let second = start(suspended);
        let state = lock(&second.membership)
            .evaluate(Instant::now())
            .local_state;
        assert_eq!(state, Some(MemberState::Suspended));
        ask(&second, Request::Functional {});
        assert_eq!(suspend_mark::read(&state_dir).expect("read the mark"), None);
    }

    /// `[local] max_flaps` reaches the membership, and the suspend its limit makes is kept
    /// across restarts as the operator's is: the main loop's mark follows the evaluation that
    /// suspended the member, a start with that mark is suspended by the flap limit again, and
    /// `show cluster members` names it.
    #[test]
    fn a_suspend_at_the_flap_limit_is_kept_and_shown() {
        use suspend_mark::{FlapMarkSync, MarkKind};
        let tmp = crate::control::testing::TempDir::new("flap-limit");
        let state_dir = tmp.path().join("state");
        let mut config = config();
        config.local.state_dir = state_dir.clone();
        config.local.max_flaps = 1;
        let member = member_of(&config, None);
        let mut kept = FlapMarkSync::new(&lock(&member.membership));
        let peer = MemberId(2);
        let now = Instant::now();
        {
            // Active, with peer 2 Active (its full sync done); evaluated ahead of the real
            // clock, past the discovery time, so that the runtime's own evaluation follows.
            let mut m = lock(&member.membership);
            m.heard(peer, MemberState::Active, 0, now);
            m.bulk_started(peer, FullSyncId { boot: 1, id: 1 });
            m.bulk_ended(peer, FullSyncId { boot: 1, id: 1 });
            m.evaluate(now + DISCOVERY);
            assert_eq!(m.state, MemberState::Active);
            m.set_condition(
                crate::cluster::Condition::LinkGroup("uplinks".into()),
                Some("out0 down".into()),
                now,
            );
        }
        apply_membership(&member);
        assert_eq!(lock(&member.membership).state, MemberState::Suspended);
        assert_eq!(suspend_mark::read(&state_dir).expect("read the mark"), None);
        kept.sync(&member.membership, &state_dir);
        let mark = suspend_mark::read(&state_dir).expect("read the mark");
        assert_eq!(mark, Some(MarkKind::FlapLimit));
        drop(member);
        let again = member_of(&config, mark);
        let m = lock(&again.membership);
        let local = crate::control::view::MemberView::local(
            &m,
            "fw1",
            0,
            LinkState::Up,
            LinkState::Up,
            now,
        );
        let view =
            crate::control::view::MembersView::new(config.cluster.id, &m, local, |_| None, now);
        let said =
            "suspended at its flap limit (flap count 1, local.max_flaps = 1): it serves again \
                    when no other member is in service, or on `hasync functional`";
        assert_eq!(view.faults, [said]);
    }

    /// The start reads the suspend mark before the datapath is touched: a member suspended
    /// when its last agent stopped starts suspended, and a state directory others may write
    /// (whose mark anyone could plant or remove) refuses the start, naming it.
    #[tokio::test]
    async fn the_start_reads_the_suspend_mark_and_refuses_an_open_state_directory() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = crate::control::testing::TempDir::new("preflight-mark");
        let state_dir = tmp.path().join("state");
        let key = Path::new("/nonexistent/cluster.key");
        let socket = tmp.path().join("hasync.sock");
        let mut config = config_with_files(key, &socket, tmp.path());
        config.local.state_dir = state_dir.clone();
        assert_eq!(preflight(&config).expect("preflight").suspended, None);
        suspend_mark::mark(&state_dir, suspend_mark::MarkKind::Operator).expect("mark");
        let kept = preflight(&config).expect("preflight").suspended;
        assert_eq!(kept, Some(suspend_mark::MarkKind::Operator));
        let open = std::fs::Permissions::from_mode(0o777);
        std::fs::set_permissions(&state_dir, open).expect("chmod");
        let e = preflight(&config).err().expect("refused");
        let said = format!("{e:#}");
        assert!(
            said.starts_with("reading the suspend mark: the state directory")
                && said.contains("writable by group or others"),
            "{said}"
        );
        // One the agent cannot write in (here procfs; under the unit, a path outside its
        // writable ones) refuses the start too, naming it. Before, it started, and the first
        // `hasync suspend` could not keep its mark.
        config.local.state_dir = "/proc/1".into();
        let e = preflight(&config).err().expect("refused");
        let said = format!("{e:#}");
        assert!(
            said.starts_with("local.state_dir /proc/1 must be writable")
                && said.contains("ReadWritePaths): writing a probe file /proc/1/"),
            "{said}"
        );
    }

    /// A slot of the takeover rule's map that a write failed to set is written again at the
    /// next evaluation from the membership's view. Before, the failure was only logged and
    /// the slot stayed wrong until that member's liveness changed again (here: peer 2, never
    /// heard, left marked alive). Seen failing (still alive).
    #[test]
    fn a_member_map_write_that_failed_is_tried_again() {
        let member = member_of(&config(), None);
        let peer = MemberId(2);
        apply_membership(&member);
        // What a refused write leaves: the slot says alive, the membership does not.
        lock(&member.dp)
            .set_member_alive(peer, true)
            .expect("write");
        lock(&member.member_map_retry).insert(peer);
        // And a slot no write can set (no member 0): refused again, kept for the next one.
        lock(&member.member_map_retry).insert(MemberId(0));
        apply_membership(&member);
        let alive = lock(&member.dp).member_alive(peer).expect("read");
        assert!(!alive, "the slot was not written again");
        let kept: Vec<MemberId> = lock(&member.member_map_retry).iter().copied().collect();
        assert_eq!(kept, [MemberId(0)], "a refused write is tried again later");
    }

    /// The membership's evaluation waits for the datapath's lock off the async workers: a
    /// holder that keeps it a while (a reattach of XDP, which a re-created interface brings)
    /// must not stop the other tasks, keepalives among them. Seen failing: with both workers
    /// in the evaluation (the main loop's, a keepalive's `on_return`), a timer waited for the
    /// holder.
    #[test]
    fn evaluating_the_membership_leaves_the_workers_free_while_the_datapath_is_held() {
        let member = member_of(&config(), None);
        let evaluating = Arc::clone(&member);
        let ran = crate::lock::timer_runs_while_held(&member.dp, move || {
            apply_membership(&evaluating);
            write_all_liveness(&evaluating);
        });
        assert!(ran, "a timer task waited for the datapath's holder");
    }

    /// An agent that did not run for a keepalive threshold (its peers took it for dead and
    /// may have taken its sessions over) opens its claim window when it runs again, as its
    /// peers did on its return. Before, it never did: none of its peers came back in its own
    /// view (their silence forgiven), and their records of the sessions they took over were
    /// refused as claims of live sessions (seen failing: still closed).
    #[test]
    fn a_stall_past_the_keepalive_threshold_opens_the_claim_window() {
        let claims_open = |m: &Member| lock(&m.dp).config().expect("config").claims_open;
        // A member whose workers last ran `ago`, evaluated now.
        let stalled_for = |ago: Duration| {
            let member = member_of(&config(), None);
            let threshold = lock(&member.membership).keepalive_threshold();
            let ago = ago.min(threshold * 2);
            let before = Instant::now().checked_sub(ago).expect("up that long");
            member.stall.tick(before);
            apply_membership(&member);
            (member, threshold)
        };
        let (member, threshold) = stalled_for(Duration::from_secs(3600));
        assert_eq!(claims_open(&member), 1, "the claim window is still closed");
        // Just short of the threshold: the peers' silence was the stall and a keepalive
        // interval before it (the review of the first form, which waited for the threshold).
        let (member, _) = stalled_for(threshold - Duration::from_millis(500));
        assert_eq!(
            claims_open(&member),
            1,
            "closed just short of the threshold"
        );
        // A short stall (forgiven all the same) opens nothing.
        let (member, _) = stalled_for((threshold / 2).max(crate::stall_watch::STALL * 2));
        assert_eq!(claims_open(&member), 0, "opened by a short stall");
    }

    /// A keepalive that brings a member back has the engine run the runtime's
    /// `apply_membership` at once (not at the main loop's next evaluation): the member map
    /// says the member is alive and the claim window is open before the reader reads on
    /// (the engine's test of the same drives a copy of the window's logic). Once the member
    /// is gone, the hook holds nothing of it and does nothing.
    #[test]
    fn a_member_back_has_the_membership_applied_at_once() {
        let member = member_of(&config(), None);
        let peer = MemberId(2);
        let claims_open = |m: &Member| lock(&m.dp).config().expect("config").claims_open;
        let alive_here = |m: &Member| lock(&m.membership).peers[&peer].alive;
        assert_eq!(claims_open(&member), 0, "closed at start");
        let back = lock(&member.membership).heard(peer, MemberState::Active, 1, Instant::now());
        assert!(back, "not alive before its first keepalive");
        member.engine.member_returned();
        assert!(alive_here(&member), "the membership was not evaluated");
        assert_eq!(claims_open(&member), 1, "the claim window is still closed");
        let (engine, dp) = (member.engine.clone(), member.dp.clone());
        drop(member);
        assert_eq!(
            Arc::strong_count(&dp),
            2,
            "the member outlived its last holder: the hook holds it (a cycle through its engine)"
        );
        engine.member_returned();
    }
}
