//! The failure conditions the running member watches, each a task that records its verdict in
//! the membership ([`Condition`]); the runtime's membership tick turns a failed condition into
//! the Non-functional state, which peers see in the keepalives and act on (they take this
//! member's sessions over when their traffic reaches them).
//!
//! - link groups: data interfaces down or missing (netlink notifications, at once);
//! - path groups: ping targets unanswered ([`path`]);
//! - the datapath: XDP detached or replaced, an interface of a zone gone or re-created
//!   (a fresh netlink dump every second), mended by attaching again where possible;
//! - the session table: the runtime's sweep reports each step ([`TableAccess`]).

pub mod path;

use std::{
    mem::MaybeUninit,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use hasync_common::ZoneBinding;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{
    cluster::{Condition, Membership},
    config::{
        monitor::{LinkGroup, PathGroup},
        Config,
    },
    datapath::{
        error_chain,
        health::{AttachmentFault, BrokenAttachment},
        Datapath,
    },
    lock::lock,
    netlink::{list_now, Ifaces, LinkWatch},
};

/// How often the datapath's attachments are checked against the kernel's list.
const DATAPATH_EVERY: Duration = Duration::from_secs(1);
/// Sweep steps failing in a row that make the session table count as unreadable (about a
/// second of steps): one failure may be a passing ENOMEM.
pub const SWEEP_FAILURES: u32 = 10;

/// Whether the session table can be read, from the sweep's steps.
#[derive(Debug, Default)]
pub struct TableAccess {
    failed_in_row: u32,
}

impl TableAccess {
    /// One sweep step ended: `error` is why it failed, `None` when it did not.
    pub fn step(&mut self, membership: &Mutex<Membership>, error: Option<String>) {
        let Some(error) = error else {
            if self.failed_in_row >= SWEEP_FAILURES {
                record(membership, Condition::SessionTable, None);
            }
            self.failed_in_row = 0;
            return;
        };
        self.failed_in_row = self.failed_in_row.saturating_add(1);
        if self.failed_in_row == SWEEP_FAILURES {
            let cause = format!("{SWEEP_FAILURES} sweep steps in a row failed: {error}");
            record(membership, Condition::SessionTable, Some(cause));
        }
    }
}

/// Why the monitors could not start.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(
        "path group `{group}`: cannot open a raw ICMP{} socket to ping its targets (the agent needs CAP_NET_RAW for [[monitor.path_groups]]): {source}",
        if *.v4 { "" } else { "v6" }
    )]
    RawSocket {
        group: String,
        v4: bool,
        #[source]
        source: std::io::Error,
    },
}

/// Starts a task per kind of condition the config asks for (the datapath always). The path
/// groups' sockets are opened first: a member that cannot ping does not start.
pub fn spawn(
    config: &Config,
    dp: Arc<Mutex<Datapath>>,
    membership: Arc<Mutex<Membership>>,
) -> Result<Vec<JoinHandle<()>>, MonitorError> {
    let mut pingers = Vec::new();
    for group in &config.monitor.path_groups {
        pingers.push(Pinger::open(group.clone())?);
    }
    let mut tasks = Vec::new();
    let groups = config.monitor.link_groups.clone();
    if !groups.is_empty() {
        let m = membership.clone();
        tasks.push(tokio::spawn(watch_link_groups(groups, m)));
    }
    for pinger in pingers {
        tasks.push(tokio::spawn(pinger.run(membership.clone())));
    }
    tasks.push(tokio::spawn(watch_datapath(config.clone(), dp, membership)));
    Ok(tasks)
}

/// Records `condition`'s verdict, logging when it changes.
fn record(membership: &Mutex<Membership>, condition: Condition, cause: Option<String>) {
    let mut m = lock(membership);
    let was = m
        .faults()
        .find(|(c, _)| **c == condition)
        .map(|(_, c)| c.to_owned());
    if was == cause {
        return;
    }
    match &cause {
        Some(cause) => {
            warn!(%condition, %cause, "failure condition: this member is non-functional")
        }
        None => info!(%condition, "failure condition cleared"),
    }
    m.set_condition(condition, cause, std::time::Instant::now());
}

// --- link groups ------------------------------------------------------------------------------

/// Why `group` fails with the interfaces as `ifaces` lists them, if it does.
pub fn link_group_cause(group: &LinkGroup, ifaces: &Ifaces) -> Option<String> {
    let failed: Vec<String> = group
        .interfaces
        .iter()
        .filter_map(|name| match ifaces.get(name) {
            None => Some(format!("{name} missing")),
            Some(i) if !i.up => Some(format!("{name} down")),
            Some(_) => None,
        })
        .collect();
    group
        .failure_condition
        .fails(failed.len(), group.interfaces.len())
        .then(|| failed.join(", "))
}

async fn watch_link_groups(groups: Vec<LinkGroup>, membership: Arc<Mutex<Membership>>) {
    let mut watch = match LinkWatch::spawn() {
        Ok(w) => w,
        Err(e) => {
            // Not knowing is not "up": the groups fail, naming why.
            for g in &groups {
                let cause = format!("interface state cannot be watched: {e}");
                record(
                    &membership,
                    Condition::LinkGroup(g.name.clone()),
                    Some(cause),
                );
            }
            return;
        }
    };
    let mut table = watch.now();
    loop {
        if let Some(t) = &table {
            for g in &groups {
                let cause = link_group_cause(g, t);
                record(&membership, Condition::LinkGroup(g.name.clone()), cause);
            }
        }
        table = match watch.changed().await {
            Some(t) => Some(t),
            None => {
                warn!("interface state is no longer watched; link groups keep their last verdict");
                return;
            }
        };
    }
}

// --- path groups ------------------------------------------------------------------------------

/// What tells this agent's echoes apart: a random identifier and key per group, the key
/// mixed with each sequence number into the nonce a reply must carry back.
#[derive(Clone, Copy, Debug)]
struct EchoSecret {
    id: u16,
    key: u64,
}

impl EchoSecret {
    fn new() -> EchoSecret {
        use std::hash::{BuildHasher as _, Hasher as _};
        // The standard library seeds RandomState from the OS's randomness.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let key = h.finish();
        EchoSecret {
            id: (key >> 48) as u16,
            key,
        }
    }

    fn nonce(self, seq: u16) -> u64 {
        self.key ^ u64::from(seq).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

/// One path group's pinger: its sockets (one per family its targets use) and secret.
struct Pinger {
    group: PathGroup,
    v4: Option<path::EchoSocket>,
    v6: Option<path::EchoSocket>,
    secret: EchoSecret,
}

impl Pinger {
    fn open(group: PathGroup) -> Result<Pinger, MonitorError> {
        let open = |v4: bool| {
            let wanted = group.targets.iter().any(|t| t.is_ipv4() == v4);
            wanted
                .then(|| path::EchoSocket::open(v4))
                .transpose()
                .map_err(|source| MonitorError::RawSocket {
                    group: group.name.clone(),
                    v4,
                    source,
                })
        };
        let (v4, v6) = (open(true)?, open(false)?);
        Ok(Pinger {
            group,
            v4,
            v6,
            secret: EchoSecret::new(),
        })
    }

    async fn run(self, membership: Arc<Mutex<Membership>>) {
        let Pinger {
            group,
            v4,
            v6,
            secret,
        } = self;
        let condition = Condition::PathGroup(group.name.clone());
        let mut tally = path::Tally::new(&group);
        let mut tick = tokio::time::interval(group.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut buf4, mut buf6) = ([MaybeUninit::uninit(); 1500], [MaybeUninit::uninit(); 1500]);
        let mut seq: u16 = 0;
        let mut last_cause = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    seq = seq.wrapping_add(1);
                    tally.round(seq);
                    for &target in &group.targets {
                        let socket = if target.is_ipv4() { &v4 } else { &v6 };
                        if let Some(s) = socket {
                            let echo = path::echo_request(target, secret.id, seq, secret.nonce(seq));
                            // Not sent (no route, EPERM): an unanswered echo, and the cause says why.
                            tally.sent(target, s.send(target, &echo).err().map(|e| e.to_string()));
                        }
                    }
                }
                Some((n, from)) = recv(v4.as_ref(), &mut buf4) => answered(&mut tally, v4.as_ref(), &buf4, n, from, secret),
                Some((n, from)) = recv(v6.as_ref(), &mut buf6) => answered(&mut tally, v6.as_ref(), &buf6, n, from, secret),
            }
            let cause = tally.cause();
            if cause != last_cause {
                record(&membership, condition.clone(), cause.clone());
                last_cause = cause;
            }
        }
    }
}

async fn recv(
    socket: Option<&path::EchoSocket>,
    buf: &mut [MaybeUninit<u8>],
) -> Option<(usize, IpAddr)> {
    match socket {
        Some(s) => s.recv(buf).await.ok(),
        None => std::future::pending().await,
    }
}

fn answered(
    tally: &mut path::Tally,
    socket: Option<&path::EchoSocket>,
    buf: &[MaybeUninit<u8>],
    n: usize,
    from: IpAddr,
    secret: EchoSecret,
) {
    let Some(socket) = socket else { return };
    let got: Vec<u8> = buf
        .iter()
        .take(n)
        // SAFETY: recv_from initialised the first `n` bytes.
        .map(|b| unsafe { b.assume_init() })
        .collect();
    if let Some(seq) = path::reply_seq(&got, socket.is_v4(), secret.id, |s| secret.nonce(s)) {
        tally.answered(from, seq);
    }
}

// --- the datapath ------------------------------------------------------------------------------

async fn watch_datapath(
    config: Config,
    dp: Arc<Mutex<Datapath>>,
    membership: Arc<Mutex<Membership>>,
) {
    let mut tick = tokio::time::interval(DATAPATH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let config = Arc::new(config);
    loop {
        tick.tick().await;
        // A suspended member's datapath is the operator's to take apart: seen, not mended.
        let mend = !lock(&membership).suspended;
        let (config, dp) = (config.clone(), dp.clone());
        let checked = tokio::task::spawn_blocking(move || check_datapath(&config, &dp, mend)).await;
        match checked {
            Ok(Some(cause)) => record(&membership, Condition::Datapath, cause),
            // Could not look (netlink failed): the last verdict stands.
            Ok(None) => {}
            Err(e) => warn!(error = %e, "one datapath check failed; checking again next second"),
        }
    }
}

/// Checks the attachments; `Some(cause)` when something is broken (after trying to mend it
/// when `mend`: the next check, a second later, sees whether that worked), `Some(None)` when
/// all is well, `None` when the kernel's list could not be read.
fn check_datapath(config: &Config, dp: &Mutex<Datapath>, mend: bool) -> Option<Option<String>> {
    let ifaces = match list_now() {
        Ok(t) => t,
        Err(e) => {
            warn!(error = %e, "cannot list the interfaces to check the datapath");
            return None;
        }
    };
    let mut dp = lock(dp);
    let broken = dp.broken_attachments(&ifaces);
    if broken.is_empty() {
        return Some(None);
    }
    let mut causes: Vec<String> = broken.iter().map(ToString::to_string).collect();
    for b in broken.iter().filter(|b| mend && b.repairable()) {
        match repair(&mut dp, config, b, &ifaces) {
            Ok(()) => info!(interface = %b.interface, "XDP attached again"),
            Err(e) => causes.push(format!("attaching {} again failed: {e}", b.interface)),
        }
    }
    Some(Some(causes.join("; ")))
}

/// Attaches `b`'s interface again; a re-created interface gets its zone binding at its new
/// index, and its old index none (unless another configured interface has it now).
fn repair(
    dp: &mut Datapath,
    config: &Config,
    b: &BrokenAttachment,
    ifaces: &Ifaces,
) -> Result<(), String> {
    if let AttachmentFault::Recreated { index } = b.fault {
        let binding = config
            .interface_zones()
            .find(|(name, _, _)| *name == b.interface)
            .map(|(_, _, binding)| binding);
        if let Some(binding) = binding {
            let taken = config
                .interface_zones()
                .any(|(name, _, _)| ifaces.get(name).is_some_and(|i| i.index == b.ifindex));
            if !taken {
                dp.set_zone(b.ifindex, ZoneBinding::default())
                    .map_err(|e| error_chain(&e))?;
            }
            dp.set_zone(index, binding).map_err(|e| error_chain(&e))?;
        }
    }
    dp.reattach(&b.interface)
        .map(drop)
        .map_err(|e| error_chain(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cluster::Timers, config::monitor::FailureCondition, netlink::Iface};

    #[test]
    fn a_session_table_the_sweep_cannot_walk_fails_the_member_until_it_can() {
        let timers = Timers {
            keepalive_threshold: Duration::from_secs(10),
            sync_timeout: Duration::ZERO,
            tentative_hold: Duration::ZERO,
            monitor_hold_down: Duration::from_secs(60),
            discovery: Duration::ZERO,
        };
        let m = Mutex::new(Membership::new(
            hasync_common::MemberId(1),
            timers,
            vec![],
            std::time::Instant::now(),
        ));
        let mut access = TableAccess::default();
        let faults = |m: &Mutex<Membership>| -> Vec<String> {
            lock(m).faults().map(|(c, e)| format!("{c}: {e}")).collect()
        };
        for _ in 1..SWEEP_FAILURES {
            access.step(&m, Some("Cannot allocate memory".into()));
        }
        assert!(faults(&m).is_empty(), "one bad second is not a failure yet");
        access.step(&m, None);
        for _ in 0..SWEEP_FAILURES {
            access.step(&m, Some("Bad file descriptor".into()));
        }
        assert_eq!(
            faults(&m),
            ["session table: 10 sweep steps in a row failed: Bad file descriptor"]
        );
        access.step(&m, None);
        assert!(faults(&m).is_empty());
    }

    #[test]
    fn a_link_group_fails_by_its_condition_naming_the_interfaces() {
        let iface = |index, up| Iface {
            index,
            up,
            mtu: Some(1500),
            xdp: Default::default(),
        };
        let mut ifaces = Ifaces::new();
        ifaces.insert("in0".into(), iface(2, true));
        ifaces.insert("out0".into(), iface(3, false));
        let mut g = LinkGroup {
            name: "data".into(),
            failure_condition: FailureCondition::Any,
            interfaces: vec!["in0".into(), "out0".into(), "out1".into()],
        };
        assert_eq!(
            link_group_cause(&g, &ifaces).as_deref(),
            Some("out0 down, out1 missing")
        );
        g.failure_condition = FailureCondition::All;
        assert_eq!(link_group_cause(&g, &ifaces), None, "in0 is up");
        ifaces.insert("in0".into(), iface(2, false));
        assert_eq!(
            link_group_cause(&g, &ifaces).as_deref(),
            Some("in0 down, out0 down, out1 missing")
        );
    }
}
