//! The failure conditions the running member watches, each a task that records its verdict in
//! the membership ([`Condition`]); the runtime's membership tick turns a failed condition into
//! the Non-functional state, which peers see in the keepalives and act on (they take this
//! member's sessions over when their traffic reaches them).
//!
//! - link groups: data interfaces down or missing (netlink notifications, at once);
//! - path groups: ping targets unanswered ([`path`]);
//! - the datapath: XDP detached or replaced, an interface of a zone gone or re-created
//!   (a fresh netlink dump every second), mended by attaching again where possible.

pub mod path;

use std::{
    mem::MaybeUninit,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use hasync_common::{ZoneBinding, ZoneId};
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

/// Starts a task per kind of condition the config asks for (the datapath always).
pub fn spawn(
    config: &Config,
    dp: Arc<Mutex<Datapath>>,
    membership: Arc<Mutex<Membership>>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    let groups = config.monitor.link_groups.clone();
    if !groups.is_empty() {
        let m = membership.clone();
        tasks.push(tokio::spawn(watch_link_groups(groups, m)));
    }
    for (index, group) in config.monitor.path_groups.iter().enumerate() {
        let id = echo_id(index);
        let m = membership.clone();
        tasks.push(tokio::spawn(ping_path_group(group.clone(), id, m)));
    }
    tasks.push(tokio::spawn(watch_datapath(config.clone(), dp, membership)));
    tasks
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

/// The echo identifier of path group `index`: this agent's own, so replies to another
/// program's (or another agent's) pings are told apart.
fn echo_id(index: usize) -> u16 {
    let pid = std::process::id() as u16;
    pid.wrapping_add((index as u16).wrapping_mul(0x0101))
}

async fn ping_path_group(group: PathGroup, id: u16, membership: Arc<Mutex<Membership>>) {
    let condition = Condition::PathGroup(group.name.clone());
    let open = |v4: bool| -> std::io::Result<Option<path::EchoSocket>> {
        let wanted = group.targets.iter().any(|t| t.is_ipv4() == v4);
        wanted.then(|| path::EchoSocket::open(v4)).transpose()
    };
    let (v4, v6) = match (open(true), open(false)) {
        (Ok(v4), Ok(v6)) => (v4, v6),
        (Err(e), _) | (_, Err(e)) => {
            let cause = format!("cannot open a raw ICMP socket to ping: {e}");
            record(&membership, condition, Some(cause));
            return;
        }
    };
    let mut tally = path::Tally::new(&group);
    let mut tick = tokio::time::interval(group.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut buf4, mut buf6) = ([MaybeUninit::uninit(); 1500], [MaybeUninit::uninit(); 1500]);
    let mut seq: u16 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                seq = seq.wrapping_add(1);
                tally.round(seq);
                for &target in &group.targets {
                    let socket = if target.is_ipv4() { &v4 } else { &v6 };
                    if let Some(s) = socket {
                        // Unreachable now (no route, no neighbour): an unanswered echo.
                        let _ = s.send(target, &path::echo_request(target, id, seq));
                    }
                }
            }
            Some((n, from)) = recv(v4.as_ref(), &mut buf4) => answered(&mut tally, v4.as_ref(), &buf4, n, from, id),
            Some((n, from)) = recv(v6.as_ref(), &mut buf6) => answered(&mut tally, v6.as_ref(), &buf6, n, from, id),
        }
        record(&membership, condition.clone(), tally.cause());
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
    id: u16,
) {
    let Some(socket) = socket else { return };
    let got: Vec<u8> = buf
        .iter()
        .take(n)
        // SAFETY: recv_from initialised the first `n` bytes.
        .map(|b| unsafe { b.assume_init() })
        .collect();
    if let Some(seq) = path::reply_seq(&got, socket.is_v4(), id) {
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
        let (config, dp) = (config.clone(), dp.clone());
        let checked = tokio::task::spawn_blocking(move || check_datapath(&config, &dp)).await;
        match checked {
            Ok(Some(cause)) => record(&membership, Condition::Datapath, cause),
            // Could not look (netlink failed): the last verdict stands.
            Ok(None) => {}
            Err(e) => warn!(error = %e, "the datapath check stopped"),
        }
    }
}

/// Checks the attachments; `Some(cause)` when something is broken (after trying to mend it:
/// the next check, a second later, sees whether that worked), `Some(None)` when all is well,
/// `None` when the kernel's list could not be read.
fn check_datapath(config: &Config, dp: &Mutex<Datapath>) -> Option<Option<String>> {
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
    let causes: Vec<String> = broken.iter().map(ToString::to_string).collect();
    for b in broken.iter().filter(|b| b.repairable()) {
        match repair(&mut dp, config, b) {
            Ok(()) => info!(interface = %b.interface, "XDP attached again"),
            Err(e) => warn!(interface = %b.interface, error = %e, "attaching XDP again failed"),
        }
    }
    Some(Some(causes.join("; ")))
}

/// Attaches `b`'s interface again; a re-created interface gets its zone binding at its new
/// index, and its old index none.
fn repair(dp: &mut Datapath, config: &Config, b: &BrokenAttachment) -> Result<(), String> {
    if let AttachmentFault::Recreated { index } = b.fault {
        let binding = config
            .zones
            .iter()
            .zip(1u16..)
            .find(|(z, _)| z.interfaces.contains(&b.interface))
            .map(|(z, id)| z.binding(ZoneId(id)));
        if let Some(binding) = binding {
            let rebind = dp
                .set_zone(b.ifindex, ZoneBinding::default())
                .and_then(|()| dp.set_zone(index, binding));
            rebind.map_err(|e| error_chain(&e))?;
        }
    }
    dp.reattach(&b.interface)
        .map(drop)
        .map_err(|e| error_chain(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::monitor::FailureCondition, netlink::Iface};

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
