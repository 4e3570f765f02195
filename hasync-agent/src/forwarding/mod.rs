//! Forwarding in XDP, the agent's side (the program's is `hasync_ebpf::forward`): which
//! interfaces the program may redirect to (FWD_PORTS: zone interfaces whose driver takes XDP
//! redirects; VWIRE_PORTS: the virtual wires' pairs), kept current every second, and the FIB
//! generation, bumped on every route, neighbour, address or link notification so no cached
//! next hop outlives a change.

pub mod features;
pub mod ipsec;
pub mod kernel_track;
pub mod nlmsg;
pub mod source;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use netlink_sys::{protocols::NETLINK_ROUTE, AsyncSocket, AsyncSocketExt, TokioSocket};

use crate::netlink::LinkWatch;
use source::{Change, Relist, Relisting};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{
    config::{Config, ForwardingName},
    datapath::{error_chain, Datapath},
    lock::lock_on_worker,
    netlink::{self, Ifaces},
};
use features::Features;
use hasync_common::{maps::ZONE_IFINDEX_LIMIT, ZoneBinding};

/// How often the ports are checked again (interfaces come and go, a veth's peer gains or
/// loses its XDP program).
const RECHECK: Duration = Duration::from_secs(1);
/// Routing netlink groups whose notifications change what a FIB lookup answers (RTNLGRP_*):
/// links, neighbours, IPv4 addresses, routes and rules, IPv6 addresses, routes and rules,
/// IPv4 and IPv6 per-interface settings (forwarding on or off), next-hop objects.
const FIB_GROUPS: [u32; 11] = [1, 3, 5, 7, 8, 9, 11, 19, 24, 25, 32];
/// Notifications come in bursts (a link going down withdraws its routes and neighbours): one
/// bump after the burst has been quiet this long (or [`BURST_MAX`] after it began).
const COALESCE: Duration = Duration::from_millis(20);
/// A burst that never pauses for [`COALESCE`] is cut this long after its first notification.
const BURST_MAX: Duration = Duration::from_millis(100);
/// Receive buffer for notifications.
const RECV_BUFFER: usize = 1 << 20;

/// Why forwarding could not start.
#[derive(Debug, thiserror::Error)]
pub enum ForwardingError {
    #[error("routing netlink socket for route and neighbour notifications: {0}")]
    Socket(#[source] std::io::Error),
    #[error("filling the forwarding maps: {0}")]
    Datapath(String),
}

/// What the forwarding maps should hold, given the interfaces as they are now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Ports {
    /// FWD_PORTS: the zone interfaces XDP forwarding may send to.
    pub forward: Vec<u32>,
    /// VWIRE_PORTS: the wires whose two ends exist and take redirects.
    pub wires: Vec<(u32, u32)>,
    /// INGRESS_MACS: the routed zone interfaces' addresses (XDP forwarding takes only frames
    /// sent to them).
    pub macs: Vec<(u32, [u8; 6])>,
    /// Why an interface or a wire is left out, one line each.
    pub left_out: Vec<String>,
}

/// The interfaces as the plan sees them.
pub trait Devices {
    /// The index of interface `name`, if it exists.
    fn index(&self, name: &str) -> Option<u32>;
    /// Can XDP redirect frames to `ifindex`? `Err`: the kernel could not tell.
    fn takes_redirects(&mut self, ifindex: u32) -> Result<bool, String>;
    /// The Ethernet address of interface `name`, if it exists and has one.
    fn mac(&self, name: &str) -> Option<[u8; 6]>;
    /// What of the IPsec policies may apply to routed traffic, said ([`ipsec`]); `None`:
    /// nothing does.
    fn ipsec_policies(&mut self) -> Result<Option<String>, String>;
}

/// What the kernel says of one interface as a redirect target.
enum Usable {
    /// It takes redirects.
    Yes(u32),
    /// It does not, or does not exist: why.
    No(String),
    /// It exists, and the kernel could not tell: why.
    Unknown(u32, String),
}

impl Usable {
    /// The interface's index, unless it is down.
    fn index(&self) -> Option<u32> {
        match self {
            Usable::Yes(index) | Usable::Unknown(index, _) => Some(*index),
            Usable::No(_) => None,
        }
    }

    /// Why the kernel could not tell, if it could not.
    fn unknown(&self) -> Option<&str> {
        match self {
            Usable::Unknown(_, why) => Some(why),
            _ => None,
        }
    }
}

/// Whether `name` can take redirects.
fn usable(devices: &mut impl Devices, name: &str) -> Usable {
    let Some(index) = devices.index(name) else {
        return Usable::No(format!("{name}: no such interface"));
    };
    match devices.takes_redirects(index) {
        Ok(true) => Usable::Yes(index),
        Ok(false) => Usable::No(format!(
            "{name}: its driver takes no XDP redirects (no ndo_xdp_xmit; a veth needs an XDP program or GRO on its peer)"
        )),
        Err(e) => Usable::Unknown(index, format!("{name}: its XDP features are unknown: {e}")),
    }
}

/// The ports `config` asks for on `devices`. A wire with an end the kernel cannot tell about
/// is kept (a redirect the end cannot take is dropped, as a wire that is down drops: leaving
/// it out would only make sure of the drop); a routed port stays what the last check found
/// (`forwarding`, that check's ports): a query that timed out must not send the port's
/// flows to the kernel and back a second later, and a new port waits for an answer.
pub fn plan(config: &Config, devices: &mut impl Devices, forwarding: &[u32]) -> Ports {
    let mut ports = Ports::default();
    for w in &config.vwire {
        let Some((a, b)) = w.ends() else { continue };
        match (usable(devices, a), usable(devices, b)) {
            (Usable::No(e), _) | (_, Usable::No(e)) => ports
                .left_out
                .push(format!("virtual wire {} is down: {e}", w.name)),
            (a, b) => {
                for e in [&a, &b].into_iter().filter_map(|u| u.unknown()) {
                    let kept = format!("virtual wire {}: {e}; kept", w.name);
                    ports.left_out.push(kept);
                }
                ports.wires.extend(a.index().zip(b.index()));
            }
        }
    }
    if config.local.forwarding == ForwardingName::Xdp && !under_ipsec(devices, &mut ports) {
        for (name, _, binding) in config.interface_zones() {
            if binding.has(ZoneBinding::VWIRE) {
                continue; // a wire's end: never a routed egress
            }
            if let Some(index) = devices.index(name).filter(|i| *i >= ZONE_IFINDEX_LIMIT) {
                ports.left_out.push(format!(
                    "forwarding to {name}: its ifindex {index} is above the largest a zone can bind ({}): the kernel forwards its traffic",
                    ZONE_IFINDEX_LIMIT - 1
                ));
                continue;
            }
            // An ingress too, whether or not it takes redirects.
            if let (Some(index), Some(mac)) = (devices.index(name), devices.mac(name)) {
                ports.macs.push((index, mac));
            }
            match usable(devices, name) {
                Usable::Yes(index) => ports.forward.push(index),
                Usable::Unknown(index, e) if forwarding.contains(&index) => {
                    ports.forward.push(index);
                    ports.left_out.push(format!("forwarding to {e}; kept"));
                }
                Usable::No(e) | Usable::Unknown(_, e) => {
                    ports.left_out.push(format!("forwarding to {e}"))
                }
            }
        }
    }
    ports
}

/// Whether IPsec policies may select routed traffic (or the kernel could not say), which XDP
/// would forward past them ([`ipsec`]): then no routed port is offered, said in `ports`.
fn under_ipsec(devices: &mut impl Devices, ports: &mut Ports) -> bool {
    let why = match devices.ipsec_policies() {
        Ok(None) => return false,
        Ok(Some(why)) => why,
        Err(e) => format!("whether IPsec policies apply to routed traffic is unknown: {e}"),
    };
    ports.left_out.push(format!(
        "forwarding in XDP: {why}; the kernel forwards every routed packet (and applies them)"
    ));
    true
}

/// The running system's interfaces: the interface table and the `netdev` family's answers.
struct System {
    ifaces: Arc<Ifaces>,
    features: Result<Features, String>,
}

impl System {
    /// The `netdev` socket, unless it failed (then the next check opens another).
    fn sound_features(self) -> Option<Features> {
        self.features.ok()
    }
}

impl System {
    /// The interfaces as `watch` knows them (a dump of its own when it does not), asking
    /// `features` (opened here when `None`) about each.
    fn now(watch: Option<&LinkWatch>, features: Option<Features>) -> Result<System, String> {
        let ifaces = match watch.and_then(LinkWatch::now) {
            Some(table) => table,
            None => {
                Arc::new(netlink::list_now().map_err(|e| format!("listing the interfaces: {e}"))?)
            }
        };
        let features = match features {
            Some(f) => Ok(f),
            None => Features::open().map_err(|e| e.to_string()),
        };
        Ok(System { ifaces, features })
    }
}

impl Devices for System {
    fn index(&self, name: &str) -> Option<u32> {
        self.ifaces.get(name).map(|i| i.index)
    }

    fn mac(&self, name: &str) -> Option<[u8; 6]> {
        self.ifaces.get(name).and_then(|i| i.mac)
    }

    fn ipsec_policies(&mut self) -> Result<Option<String>, String> {
        let policies = ipsec::forwarding_policies().map_err(|e| e.to_string())?;
        Ok(policies.why())
    }

    fn takes_redirects(&mut self, ifindex: u32) -> Result<bool, String> {
        let asked = match &mut self.features {
            Ok(f) => f.takes_redirects(ifindex),
            Err(e) => return Err(e.clone()),
        };
        match asked {
            Ok(takes) => Ok(takes),
            // The kernel's answer for this device alone (gone since the table was read).
            Err(e @ features::FeatureError::Refused { .. }) => Err(e.to_string()),
            Err(e) => {
                // The socket is not trusted again: the next check opens another.
                self.features = Err(e.to_string());
                Err(e.to_string())
            }
        }
    }
}

/// Writes `ports` into the datapath, each map whatever became of the others (a port the
/// kernel refuses must not keep a wire down). Returns whether a map changed, or what failed.
fn apply(dp: &mut Datapath, ports: &Ports) -> Result<bool, String> {
    let written = [
        dp.set_fwd_ports(&ports.forward),
        dp.set_vwire_ports(&ports.wires),
        dp.set_ingress_macs(&ports.macs),
    ];
    let mut changed = false;
    let mut failed = Vec::new();
    for w in written {
        match w {
            Ok(c) => changed |= c,
            Err(e) => failed.push(error_chain(&e)),
        }
    }
    match failed.is_empty() {
        true => Ok(changed),
        false => Err(failed.join("; ")),
    }
}

/// Writes the check's plan `next` into the datapath whether or not it differs from `ports`
/// (what was last written), and keeps it: the kernel deletes an interface's entries from
/// the DEVMAPs when it unregisters, also when it only moves to another namespace, and one
/// moved back keeps its index, so the plan alone does not change (before stop 51 nothing was
/// written then, and the wire dropped everything until a restart). A write that fails is
/// tried at the next check.
fn follow(dp: &Mutex<Datapath>, ports: &mut Ports, next: Ports) {
    let applied = apply(&mut lock_on_worker(dp), &next);
    match applied {
        Err(e) => warn!(error = %e, "updating the forwarding ports failed"),
        Ok(true) if next == *ports => warn!(
            "forwarding in XDP: the maps had lost ports or wires the plan still holds (an interface that left the namespace and came back, or a write that failed); written again"
        ),
        Ok(_) => {
            report(&ports.left_out, &next);
            *ports = next;
        }
    }
}

/// What [`spawn`] needs from before the datapath was attached.
pub struct Prepared {
    socket: Option<TokioSocket>,
    ports: Ports,
}

/// Fills the forwarding maps, before the program is attached (a restart must not leave a
/// wire or a port empty while the new program runs), and opens the notification socket;
/// `None` when the config forwards nothing in XDP.
pub fn prepare(config: &Config, dp: &mut Datapath) -> Result<Option<Prepared>, ForwardingError> {
    let routed = config.local.forwarding == ForwardingName::Xdp;
    if !routed && config.vwire.is_empty() {
        return Ok(None);
    }
    let socket = if routed {
        // Subscribed before the first look at the rules: a change in between is not missed.
        let socket = fib_socket().map_err(ForwardingError::Socket)?;
        key_fib_cache(dp, source::routes_by_source());
        Some(socket)
    } else {
        None
    };
    let mut system = System::now(None, None).map_err(ForwardingError::Datapath)?;
    let ports = plan(config, &mut system, &[]);
    // A port the kernel refuses (an interface gone since it was listed) does not stop the
    // start: the rest is written, and the next check writes the plan again.
    if let Err(e) = apply(dp, &ports) {
        warn!(error = %e, "filling the forwarding maps failed in part; tried again every second");
    }
    report(&[], &ports);
    Ok(Some(Prepared { socket, ports }))
}

/// Keeps the ports current (every second, from the interface table `links` keeps, and at once
/// when an IPsec policy changes) and the
/// FIB generation moving with every route, rule, neighbour, address and link change: two
/// tasks, so a slow port check never holds a notification back.
pub fn spawn(
    config: &Config,
    dp: Arc<Mutex<Datapath>>,
    prepared: Prepared,
    links: Option<LinkWatch>,
) -> Vec<(&'static str, JoinHandle<()>)> {
    let config = Arc::new(config.clone());
    let ports = keep_ports(config, dp.clone(), prepared.ports, links);
    let mut tasks = vec![("forwarding ports", tokio::spawn(ports))];
    if let Some(socket) = prepared.socket {
        tasks.push(("FIB notifications", tokio::spawn(follow_fib(socket, dp))));
    }
    tasks
}

fn fib_socket() -> std::io::Result<TokioSocket> {
    let mut socket = TokioSocket::new(NETLINK_ROUTE)?;
    socket.socket_mut().bind_auto()?;
    for group in FIB_GROUPS {
        socket.socket_mut().add_membership(group)?;
    }
    // Best effort: a small buffer only means an overrun, which bumps the generation too.
    let _ = socket.socket_ref().set_rx_buf_sz(RECV_BUFFER);
    Ok(socket)
}

/// Logs what is left out now that was not before.
fn report(before: &[String], ports: &Ports) {
    for line in ports.left_out.iter().filter(|l| !before.contains(l)) {
        warn!(cause = %line, "forwarding in XDP: a port or wire left out or unchecked");
    }
    if !before.is_empty() && ports.left_out.is_empty() {
        info!("forwarding in XDP: every configured port takes redirects again");
    }
}

async fn keep_ports(
    config: Arc<Config>,
    dp: Arc<Mutex<Datapath>>,
    mut ports: Ports,
    links: Option<LinkWatch>,
) {
    let mut tick = tokio::time::interval(RECHECK);
    let routed = config.local.forwarding == ForwardingName::Xdp;
    let mut policies = routed.then(ipsec::PolicyWatch::open).flatten();
    // The `netdev` family's socket, kept between checks (opened again after a failure).
    let mut features = None;
    loop {
        if let Err(e) = next_check(&mut tick, policies.as_ref()).await {
            warn!(error = %e, "IPsec policy notifications failed; the forwarding ports follow policy changes within a second only");
            policies = None;
        }
        let (cfg, watch, kept) = (config.clone(), links.clone(), features.take());
        let forwarding = ports.forward.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let mut sys = System::now(watch.as_ref(), kept)?;
            let next = plan(&cfg, &mut sys, &forwarding);
            Ok((next, sys.sound_features()))
        })
        .await
        .unwrap_or_else(|e| Err(format!("the check stopped: {e}")));
        let next = checked.map(|(next, kept)| {
            features = kept;
            next
        });
        match next {
            Ok(next) => follow(&dp, &mut ports, next),
            Err(e) => warn!(error = %e, "checking the forwarding ports failed"),
        }
    }
}

/// Waits for the next port check: the tick, or a change of the IPsec policies (the burst of a
/// daemon's policies checked once). An error of the policies' notifications is returned, for
/// the caller to give them up (else a broken socket would make a check at every read).
async fn next_check(
    tick: &mut tokio::time::Interval,
    policies: Option<&ipsec::PolicyWatch>,
) -> std::io::Result<()> {
    let Some(watch) = policies else {
        tick.tick().await;
        return Ok(());
    };
    tokio::select! {
        _ = tick.tick() => Ok(()),
        changed = watch.changed() => {
            changed?;
            // A read that fails ends the burst (not read again at once: it would spin); the
            // next wait gives the watch up.
            rest_of_burst(true, || async {
                if watch.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                true
            })
            .await;
            Ok(())
        }
    }
}

/// Keys the FIB cache on the source too when `found` says something routes by source, or
/// could not tell (then the source is kept: correct, only slower).
fn key_fib_cache(dp: &mut Datapath, found: std::io::Result<bool>) {
    let by_source = found.unwrap_or_else(|e| {
        warn!(error = %e, "listing the rules and IPv6 routes failed; the FIB cache keys on the source too");
        true
    });
    match dp.set_fib_by_source(by_source) {
        Ok(true) if by_source => info!("FIB cache keyed on the destination and the source"),
        Ok(true) => info!("FIB cache keyed on the destination alone: nothing routes by source"),
        Ok(false) => {}
        Err(e) => warn!(error = %error_chain(&e), "setting the FIB cache key failed"),
    }
}

/// One read of notifications: what it changes for the FIB cache's key (an overrun lost some,
/// which might have). Any other error is waited out a little, so a broken socket cannot spin.
async fn read_notifications(socket: &TokioSocket) -> Change {
    match socket.recv_from_full().await {
        Ok((datagram, _)) => source::change(&datagram),
        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Change::Recheck,
        Err(e) => {
            warn!(error = %e, "reading route and neighbour notifications failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
            Change::None
        }
    }
}

/// What the burst that started with `first` changes: `next` read until it pauses for
/// [`COALESCE`], or for [`BURST_MAX`] at most.
async fn rest_of_burst<T: Ord, F: std::future::Future<Output = T>>(
    first: T,
    mut next: impl FnMut() -> F,
) -> T {
    let cut = tokio::time::Instant::now() + BURST_MAX;
    let mut change = first;
    loop {
        let wait = COALESCE.min(cut.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(wait, next()).await {
            Ok(more) => change = change.max(more),
            Err(_) => return change,
        }
        if wait.is_zero() {
            return change;
        }
    }
}

/// Bumps the FIB generation after every burst of notifications (an overrun lost some: the
/// generation moves anyway). A rule or route that selects by source, added, keys the cache on
/// the source at once; one removed (or notifications lost) makes the agent list them again,
/// at a pace ([`Relist`]: meanwhile the cache keys on the source).
async fn follow_fib(socket: TokioSocket, dp: Arc<Mutex<Datapath>>) {
    let mut relist = Relist::default();
    loop {
        let first = match relist.due() {
            Some(at) => tokio::select! {
                change = read_notifications(&socket) => change,
                () = tokio::time::sleep_until(at.into()) => Change::None,
            },
            None => read_notifications(&socket).await,
        };
        let change = rest_of_burst(first, || read_notifications(&socket)).await;
        let found = match relist.on(change, std::time::Instant::now()) {
            Relisting::Keep => None,
            Relisting::BySource => Some(Ok(true)),
            Relisting::List => {
                // The burst reaches XDP now, keyed on the source until the listing says.
                after_burst(&dp, Some(Ok(true)));
                let started = std::time::Instant::now();
                let found = tokio::task::spawn_blocking(source::routes_by_source)
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                relist.listed(started, started.elapsed(), found.is_ok());
                Some(found)
            }
        };
        after_burst(&dp, found);
    }
}

/// After a burst of notifications: keys the FIB cache as `found` says, when the burst may
/// have changed that, and bumps the generation. The datapath's lock is waited for off the
/// async worker: its holder may keep it a while (a reattach).
fn after_burst(dp: &Mutex<Datapath>, found: Option<std::io::Result<bool>>) {
    let mut dp = lock_on_worker(dp);
    if let Some(found) = found {
        key_fib_cache(&mut dp, found);
    }
    if let Err(e) = dp.bump_fib_generation() {
        warn!(error = %error_chain(&e), "invalidating the FIB cache failed");
    }
}

#[cfg(test)]
mod tests;
