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
use hasync_common::{Counter, EventKind, MemberId};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::{
    cluster::{LinkState, Membership, Timers},
    config::{self, parse_cidr, Config},
    datapath::{
        error_chain, ifindex, Datapath, DatapathOptions, RemoveReason, Removed, DEFAULT_CHUNK,
    },
    member::{lock, Member},
    sync::{
        backoff::Backoff,
        engine::{Engine, PeerConfig, SyncConfig},
        wire::LinkKind,
    },
};

/// How often the expiry sweep takes a step, and how many sessions a step looks at: the table
/// is never held for long (a few milliseconds a step), and a pass over a million sessions
/// takes about 12 s. Expired sessions the sweep has not reached yet are already treated as
/// absent by the XDP program.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
const SWEEP_BUDGET: u64 = 8192;
/// How often liveness and the local state are evaluated.
const MEMBERSHIP_EVERY: Duration = Duration::from_millis(200);
/// A gap this long between two evaluations means this agent itself did not run: the peers'
/// silence over it is forgiven (`Membership::forgive_stall`).
const STALL_GAP: Duration = Duration::from_secs(1);
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
    runtime.block_on(run_async(config))
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
        .filter_map(|m| {
            let id = MemberId(u8::try_from(m.id).ok()?);
            let mut addrs = BTreeMap::new();
            addrs.insert(LinkKind::Ha4, m.ha4);
            if let Some(b) = m.ha4_backup {
                addrs.insert(LinkKind::Ha4Backup, b);
            }
            Some(PeerConfig {
                id,
                serial: m.serial.clone(),
                addrs,
                session_sync: m.session_sync,
                enabled: m.enabled,
            })
        })
        .collect::<Vec<_>>();
    let local_session_sync = peers
        .iter()
        .find(|p| p.id == local)
        .is_some_and(|p| p.session_sync);
    let threshold = Duration::from_millis(config.cluster.keepalive_threshold_ms);
    Ok(SyncConfig {
        cluster_id: u8::try_from(config.cluster.id).context("cluster id")?,
        local,
        local_session_sync,
        psk,
        zones: config.zone_names(),
        fingerprint: config.fingerprint(),
        port: config.cluster.sync_port,
        local_links,
        peers: peers.into_iter().filter(|p| p.id != local).collect(),
        keepalive_interval: (threshold / 5).min(Duration::from_secs(1)),
        keepalive_threshold: threshold,
        hold_down: config.monitor_hold_down(),
        boot_id: boot_id(),
        fresh_table,
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
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let psk = config::read_cluster_key(&config.cluster.key_file)?;
    let local = config.local_member();

    // Resolve every data interface before loading anything: a typo fails fast.
    let mut bindings = Vec::new();
    for (ifname, zone, binding) in config.interface_zones() {
        let index = ifindex(ifname).with_context(|| format!("zone `{}`", zone.name))?;
        bindings.push((ifname.to_owned(), index, binding, zone.name.clone()));
    }
    let mut opts = DatapathOptions::new(local);
    opts.session_capacity = config.local.session_capacity;
    opts.embryonic_capacity = Some(config.embryonic_capacity());
    opts.replica_parts = config.replica_parts();
    opts.config = config.datapath();
    opts.pin_dir = config.pin_dir().map(Path::to_owned);
    let mut dp = Datapath::load(&opts).context("loading the XDP datapath")?;
    // Pinned maps from an earlier agent: its sessions (and events) carry over.
    let restarted = dp.pin_report().is_some_and(|r| r.sessions_reused());
    dp.set_member_alive(local, true)
        .context("marking the local member alive")?;
    dp.record_zones(&config.zone_names())
        .context("checking the zones against the pinned sessions")?;
    for (ifname, index, zone, name) in &bindings {
        dp.set_zone(*index, *zone)
            .with_context(|| format!("binding `{ifname}` to zone `{name}`"))?;
    }
    let indexes: Vec<u32> = bindings.iter().map(|b| b.1).collect();
    dp.retain_zones(&indexes)
        .context("unbinding interfaces no longer in a zone")?;
    let mut events = dp.take_events().context("opening the events ring buffer")?;
    let forwarding =
        crate::forwarding::prepare(&config, &mut dp).context("starting forwarding in XDP")?;
    for (ifname, _, _, zone) in &bindings {
        let mode = dp.attach(ifname)?;
        let reused = dp.attachments().last().is_some_and(|a| a.reused);
        info!(interface = %ifname, zone = %zone, %mode, reused, "attached");
    }
    dp.release_stale_links()
        .context("detaching interfaces no longer configured")?;
    let dp = Arc::new(Mutex::new(dp));

    let threshold = Duration::from_millis(config.cluster.keepalive_threshold_ms);
    let timers = Timers {
        keepalive_threshold: threshold,
        sync_timeout: Duration::from_secs(config.cluster.sync_timeout_min * 60),
        tentative_hold: Duration::from_secs(config.cluster.tentative_hold_s),
        monitor_hold_down: config.monitor_hold_down(),
        discovery: DISCOVERY,
    };
    let sync_cfg = sync_config(&config, psk, !restarted)?;
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
    let mut m = Membership::new(local, timers, peers, Instant::now());
    m.set_agreed(config::without_zones(config.fingerprint()));
    // Links start down where both ends have them, not-configured elsewhere.
    for p in &sync_cfg.peers {
        for link in [LinkKind::Ha4, LinkKind::Ha4Backup] {
            let both = p.addrs.contains_key(&link) && sync_cfg.local_links.contains_key(&link);
            m.set_link(
                p.id,
                link,
                if both {
                    LinkState::Down
                } else {
                    LinkState::NotConfigured
                },
            );
        }
    }
    let membership = Arc::new(Mutex::new(m));
    let engine = Engine::new(sync_cfg, dp.clone(), membership.clone());
    let mut tasks = engine.start();
    tasks.extend(crate::monitor::spawn(
        &config,
        dp.clone(),
        membership.clone(),
    )?);
    if let Some(prepared) = forwarding {
        tasks.extend(crate::forwarding::spawn(&config, dp.clone(), prepared));
    }
    let member = Arc::new(Member {
        config,
        dp,
        membership,
        engine,
        started: Instant::now(),
    });
    let mut log = crate::traffic_log::TrafficLog::open(&member.config.local.traffic_log)
        .with_context(|| {
            format!(
                "opening the traffic log {}",
                member.config.local.traffic_log.display()
            )
        })?;
    let (control_tx, mut control_rx) = tokio::sync::mpsc::channel(64);
    let http = crate::http::start(&member.config, control_tx.clone()).await;
    let control = crate::control::serve(&member.config.local.control_socket, control_tx)
        .await
        .with_context(|| {
            format!(
                "serving the control socket {}",
                member.config.local.control_socket.display()
            )
        })?;
    info!(
        member = local.0,
        cluster = member.config.cluster.id,
        restarted,
        "cluster member running"
    );
    // Attached, maps filled, control socket up: ready for systemd (Type=notify).
    crate::service::notify::ready(&format!(
        "member {} of cluster {}: attached to {} interface(s){}",
        local.0,
        member.config.cluster.id,
        bindings.len(),
        if restarted {
            ", sessions kept from the previous run"
        } else {
            ""
        }
    ));
    if restarted {
        // The ring buffer may have filled while no agent read it, and the pinned loss counter
        // cannot tell those losses from older ones: announce every owned session once (peers
        // coalesce what they already have).
        reannounce(&member);
    }
    // The takeover rule's MEMBERS map, reused, still says who was alive before the restart.
    // Once a keepalive threshold has passed, the membership knows better: write it all.
    let mut members_unsettled = restarted.then(|| Instant::now() + threshold);

    let mut sweep_tick = tokio::time::interval(SWEEP_EVERY);
    let mut membership_tick = tokio::time::interval(MEMBERSHIP_EVERY);
    let mut last_membership = Instant::now();
    let mut sweep = crate::datapath::sweep::IncrementalSweep::default();
    let mut table_access = crate::monitor::TableAccess::default();
    for t in [&mut sweep_tick, &mut membership_tick] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let mut lost_events = lock(&member.dp)
        .counters()
        .map(|c| c.get(Counter::RingbufFull))
        .unwrap_or(0);
    let mut owned = Vec::new();
    let mut reannounce_backoff = Backoff::new(REANNOUNCE_BACKOFF.0, REANNOUNCE_BACKOFF.1);
    let result: anyhow::Result<()> = loop {
        tokio::select! {
            _ = interrupt.recv() => { info!(signal = "SIGINT", "stopping"); break Ok(()); }
            _ = terminate.recv() => { info!(signal = "SIGTERM", "stopping"); break Ok(()); }
            batch = events.next_batch() => {
                owned.clear();
                owned.extend(batch.iter().filter(|e| e.session.owner == local).map(|e| e.key));
                // An evicted session of ours ended: its log line; the sync sends its removal.
                for e in batch.iter().filter(|e| e.session.owner == local && e.kind == EventKind::Evicted as u8) {
                    log.write_removed(&Removed { key: e.key, session: e.session, reason: RemoveReason::Evicted }, &member.config);
                }
                member.engine.enqueue(&owned);
                member.engine.flush();
            }
            _ = sweep_tick.tick() => {
                let engine = member.engine.clone();
                let swept = tokio::task::block_in_place(|| {
                    lock(&member.dp).sweep_step(&mut sweep, SWEEP_BUDGET, |removed: &[Removed]| {
                        let mut gone = Vec::new();
                        for r in removed.iter().filter(|r| r.session.owner == local) {
                            log.write_removed(r, &member.config);
                            gone.push(r.key);
                        }
                        engine.enqueue(&gone);
                    })
                });
                let error = swept.as_ref().err().map(|e| error_chain(e));
                table_access.step(&member.membership, error);
                match swept {
                    Ok(Some(pass)) => {
                        // A pass over the whole table also counted the sessions each member owns.
                        let owned = pass.owners.get(usize::from(local.0)).copied().unwrap_or(0);
                        lock(&member.membership).local_sessions_owned = u32::try_from(owned).unwrap_or(u32::MAX);
                    }
                    Ok(None) => {}
                    Err(e) => warn!(error = %error_chain(&e), "sweep failed"),
                }
                member.engine.flush();
                // Events lost to a full ring buffer: announce every owned session again, at
                // most once per backoff step (losses meanwhile wait for the next).
                let lost = lock(&member.dp).counters().map(|c| c.get(Counter::RingbufFull)).unwrap_or(lost_events);
                if lost != lost_events && reannounce_backoff.try_start(Instant::now()) {
                    warn!(lost = lost - lost_events, "datapath events were lost; re-announcing owned sessions");
                    lost_events = lost;
                    reannounce(&member);
                }
            }
            _ = membership_tick.tick() => {
                let now = Instant::now();
                let gap = now.saturating_duration_since(last_membership);
                last_membership = now;
                if gap > STALL_GAP {
                    warn!(stalled_ms = gap.as_millis() as u64, "this agent did not run for a while: peers' silence over it is not held against them");
                    lock(&member.membership).forgive_stall(gap, now);
                }
                apply_membership(&member);
                if members_unsettled.is_some_and(|at| Instant::now() >= at) {
                    members_unsettled = None;
                    write_all_liveness(&member);
                }
            }
            Some((request, reply)) = control_rx.recv() => {
                let response = crate::control::handler::handle(&member, request);
                let _ = reply.send(response);
            }
        }
    };
    for t in tasks {
        t.abort();
    }
    control.abort();
    if let Some(http) = http {
        http.abort();
    }
    crate::service::notify::stopping();
    let detached = {
        let mut dp = lock(&member.dp);
        match dp.pin_dir() {
            // Pinned: XDP stays attached and the table stays, for the next agent.
            Some(pins) => {
                info!(
                    pin_dir = %pins.root().display(),
                    "datapath left running and pinned; `hasync teardown` removes it"
                );
                Ok(())
            }
            None => dp.detach_all().context("detaching XDP"),
        }
    };
    result?;
    detached?;
    info!("stopped");
    Ok(())
}

/// Writes every member slot of the takeover rule's map from the membership's view.
fn write_all_liveness(member: &Member) {
    let local = member.config.local_member();
    let alive: Vec<(MemberId, bool)> = {
        let m = lock(&member.membership);
        (1..=MemberId::MAX)
            .map(MemberId)
            .map(|id| (id, id == local || m.peers.get(&id).is_some_and(|p| p.alive)))
            .collect()
    };
    let mut dp = lock(&member.dp);
    for (id, alive) in alive {
        if let Err(e) = dp.set_member_alive(id, alive) {
            warn!(peer = id.0, error = %error_chain(&e), "updating the member map failed");
        }
    }
}

/// Applies what the membership rules decided: the XDP member map (takeover) and logs.
fn apply_membership(member: &Member) {
    let changes = lock(&member.membership).evaluate(Instant::now());
    for (id, alive) in changes.liveness {
        if alive {
            info!(peer = id.0, "member alive");
        } else {
            warn!(peer = id.0, "member no longer alive: its sessions are taken over when their traffic arrives here");
        }
        if let Err(e) = lock(&member.dp).set_member_alive(id, alive) {
            warn!(peer = id.0, error = %error_chain(&e), "updating the member map failed");
        }
    }
    if let Some(state) = changes.local_state {
        info!(state = state.name(), "local member state changed");
    }
}

/// Queues every owned session for every peer (the outboxes fall back to a full sync if that is
/// too many, which each peer's full-sync backoff then paces). The table is read a chunk per
/// hold of the datapath lock, so installs and the fast path's event reader go on meanwhile.
fn reannounce(member: &Member) {
    let local = member.config.local_member();
    let walked = tokio::task::block_in_place(|| {
        let mut owned = Vec::new();
        crate::sync::table::walk(&*member.dp, DEFAULT_CHUNK, |keys, values| {
            owned.clear();
            owned.extend(
                keys.iter()
                    .zip(values)
                    .filter(|(_, s)| s.owner == local)
                    .map(|(k, _)| *k),
            );
            member.engine.enqueue(&owned);
        })
    });
    if let Err(e) = walked {
        warn!(error = %error_chain(&e), "re-announcing sessions failed; asking for full syncs");
        member.engine.request_bulk_all();
    }
    member.engine.flush();
}
