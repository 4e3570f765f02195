//! One start-up path for both ways of running the agent, from flags (`hasync agent
//! --interface ...`) or from a configuration file: a [`StartPlan`] says what to load and which
//! interface goes into which zone, and [`bring_up`] brings the datapath up from it in one order:
//! resolve every interface (a typo fails fast and touches nothing), load, mark the local member
//! alive, record and bind the zones, open the events ring, prepare what must be in place before
//! traffic (the caller's step), attach, and drop what an earlier agent left attached.

use anyhow::Context as _;
use aya::util::KernelVersion;
use hasync_common::{maps as names, MemberId, Policy, ZoneBinding, ZoneId};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{info, warn};

use crate::{
    cli::AgentArgs,
    config::Config,
    datapath::{ifindex, pin, Datapath, DatapathError, DatapathOptions, EventStream},
    netlink,
    stacked::{self, ZoneInterfaces},
};

/// One interface to attach to, and its zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedInterface {
    pub name: String,
    /// Its zone's binding (`None`: attached in no zone).
    pub binding: Option<ZoneBinding>,
    /// Its zone's name, for the logs (`-`: none).
    pub zone: String,
}

/// What to bring up.
#[derive(Clone, Debug)]
pub struct StartPlan {
    /// What to load; its `zones` are the zone names in id order (id 1 first).
    pub opts: DatapathOptions,
    /// The interfaces, in attach order.
    pub interfaces: Vec<PlannedInterface>,
}

impl StartPlan {
    /// The plan a cluster member's configuration gives.
    pub fn from_config(config: &Config) -> StartPlan {
        let mut opts = DatapathOptions::new(config.local_member());
        opts.session_capacity = config.local.session_capacity;
        opts.embryonic_capacity = config.local.embryonic_capacity;
        opts.embryonic_share = config.embryonic_share();
        opts.replica_parts = config.replica_parts();
        opts.replica_limit = config.local.replica_limit;
        opts.cluster_members = config.members.iter().filter(|m| m.enabled).count();
        opts.config = config.datapath();
        opts.pin_dir = config.pin_dir().map(Into::into);
        opts.log = config.local.datapath_log;
        opts.zones = config.zone_names();
        let interfaces = config
            .interface_zones()
            .map(|(name, zone, binding)| PlannedInterface {
                name: name.to_owned(),
                binding: Some(binding),
                zone: zone.name.clone(),
            })
            .collect();
        StartPlan { opts, interfaces }
    }

    /// The plan the standalone agent's flags give: zones numbered in order of first
    /// appearance, nothing pinned.
    pub fn from_args(args: &AgentArgs) -> Result<StartPlan, String> {
        let plan = args.zone_plan()?;
        let mut opts = DatapathOptions::new(args.member);
        opts.session_capacity = args.session_capacity;
        opts.config.policy = Policy::from(args.policy) as u8;
        let zone_name = |id: ZoneId| {
            let named = plan.zones.iter().find(|(_, z)| *z == id);
            named.map_or("-".to_owned(), |(name, _)| name.clone())
        };
        let interfaces = plan
            .bindings
            .iter()
            .map(|b| PlannedInterface {
                name: b.interface.clone(),
                binding: (b.zone != ZoneId::NONE).then(|| ZoneBinding::new(b.zone)),
                zone: zone_name(b.zone),
            })
            .collect();
        opts.zones = plan.zones.into_iter().map(|(name, _)| name).collect();
        Ok(StartPlan { opts, interfaces })
    }

    /// The zone interfaces, by name, with their bindings.
    pub fn zone_interfaces(&self) -> ZoneInterfaces {
        self.interfaces
            .iter()
            .filter_map(|i| Some((i.name.clone(), i.binding?)))
            .collect()
    }

    /// The interfaces whose zones check new flows against the routing table.
    fn route_checking(&self) -> impl Iterator<Item = &PlannedInterface> {
        self.interfaces
            .iter()
            .filter(|i| i.binding.is_some_and(ZoneBinding::checks_routes))
    }

    fn local(&self) -> MemberId {
        MemberId(self.opts.config.local_member.0)
    }
}

/// A datapath brought up and attached.
pub struct Started {
    pub dp: Datapath,
    pub events: EventStream,
    /// The session table was kept from an earlier agent (pinned): its sessions carry over.
    pub restarted: bool,
    /// The devices stacked on zone interfaces, bound to their zones (`stacked`).
    pub stacked: Vec<(u32, ZoneBinding)>,
}

/// Brings the datapath up as `plan` says. `before_attach` runs once the maps are filled and
/// before any interface is attached (a restart must not leave a map empty while the new
/// program runs); its result is handed back.
pub fn bring_up<T>(
    plan: &StartPlan,
    before_attach: impl FnOnce(&mut Datapath) -> anyhow::Result<T>,
) -> anyhow::Result<(Started, T)> {
    let resolved = resolve(plan)?;
    let mut dp = Datapath::load(&plan.opts).context("loading the XDP datapath")?;
    let restarted = dp.pin_report().is_some_and(|r| r.sessions_reused());
    let local = plan.local();
    dp.set_member_alive(local, true)
        .with_context(|| format!("marking the local member {} alive", local.0))?;
    let stacked = bind_zones(&mut dp, plan, &resolved)?;
    if let Some(note) = KernelVersion::current()
        .ok()
        .and_then(|running| unanswered_route_checks(running, plan))
    {
        warn!("{note}");
    }
    for note in unchecked_sources(plan, read_forwarding) {
        warn!("{note}");
    }
    let events = dp.take_events().context("opening the events ring buffer")?;
    let prepared = before_attach(&mut dp)?;
    for (i, &resolved_index) in plan.interfaces.iter().zip(&resolved.indexes) {
        let Some(resolved_index) = resolved_index else {
            dp.missing_at_start(&i.name);
            continue;
        };
        let mode = dp.attach(&i.name)?;
        let (index, reused) = dp
            .attachments()
            .last()
            .map_or((resolved_index, false), |a| (a.ifindex, a.reused));
        if index != resolved_index {
            rebind_recreated(&mut dp, plan, i, (resolved_index, index))?;
        }
        info!(interface = %i.name, zone = %i.zone, %mode, reused, "attached");
    }
    dp.release_stale_links()
        .context("detaching interfaces no longer configured")?;
    let started = Started {
        dp,
        events,
        restarted,
        stacked,
    };
    Ok((started, prepared))
}

/// What start-up learned of the interfaces before loading anything.
struct Resolved {
    /// Each planned interface's index, in order (`None`: it does not exist).
    indexes: Vec<Option<u32>>,
    /// The interface table, listed once for the checks and the stacked devices.
    listed: std::io::Result<netlink::Ifaces>,
}

/// Every interface's index, before anything is loaded; an interface without an Ethernet
/// header is refused ([`layer3_interfaces`]). One that does not exist is said and left out:
/// the datapath lists it as lost, and the member is Non-functional until it exists and XDP
/// is attached to it (as when it goes while the agent runs). Before, the start failed, and
/// after a restart the pinned program ran on with no agent: nothing swept its table or synced
/// its sessions, and no peer heard that it was Non-functional.
fn resolve(plan: &StartPlan) -> anyhow::Result<Resolved> {
    let indexes = plan
        .interfaces
        .iter()
        .map(|i| match ifindex(&i.name) {
            Ok(index) => Ok(Some(index)),
            Err(DatapathError::UnknownInterface(_)) => {
                warn!(
                    interface = %i.name,
                    zone = %i.zone,
                    "interface missing: the member is Non-functional until it exists (XDP is attached to it then)"
                );
                Ok(None)
            }
            Err(e) => Err(anyhow::Error::new(e).context(format!("zone `{}`", i.zone))),
        })
        .collect::<anyhow::Result<Vec<Option<u32>>>>()?;
    let listed = netlink::list_now();
    // Unlisted, nothing is refused: the attach still works on every Ethernet interface.
    let layer3 = listed
        .as_ref()
        .map(|l| layer3_interfaces(plan, l))
        .unwrap_or_default();
    if let Some(name) = layer3.first() {
        anyhow::bail!(
            "interface `{name}` has no Ethernet header (a layer-3 device: WireGuard, tun, PPP, \
             GRE, ...): XDP there sees bare IP packets, which the datapath cannot parse; put its \
             zone on the Ethernet interface it runs over"
        );
    }
    if let (Ok(ifaces), Some(pinned)) = (&listed, pinned_links(plan)) {
        if let Some(refusal) = foreign_xdp(plan, ifaces, &pinned) {
            anyhow::bail!(refusal);
        }
    }
    Ok(Resolved { indexes, listed })
}

/// What the XDP links pinned in `plan`'s pin directory run, and where (none without one);
/// `None` when it cannot be read (loading reports that, and nothing is taken for foreign).
fn pinned_links(plan: &StartPlan) -> Option<Vec<pin::XdpLinkInfo>> {
    let Some(dir) = &plan.opts.pin_dir else {
        return Some(Vec::new());
    };
    let links = pin::PinDir::new(dir).pinned_links().ok()?;
    let infos = links
        .iter()
        .filter_map(|(path, _)| pin::xdp_link_info(path).ok());
    Some(infos.collect())
}

/// The refusal of the first planned interface that runs an XDP program other than through
/// one of `pinned` (this member's own links, left by an earlier agent): another tool's, or
/// an agent's that is still running or did not pin. Attaching there fails (the kernel keeps
/// one program per interface), so the start is refused before anything is loaded.
fn foreign_xdp(
    plan: &StartPlan,
    ifaces: &netlink::Ifaces,
    pinned: &[pin::XdpLinkInfo],
) -> Option<String> {
    plan.interfaces.iter().find_map(|i| {
        let iface = ifaces.get(&i.name)?;
        let modes = [("native", iface.xdp.native), ("generic", iface.xdp.generic)];
        let ours = |id: u32| {
            pinned
                .iter()
                .any(|l| l.program_id == id && l.ifindex == iface.index)
        };
        let (mode, id) = modes
            .into_iter()
            .find_map(|(mode, id)| id.filter(|&id| !ours(id)).map(|id| (mode, id)))?;
        Some(format!(
            "interface `{}` (zone `{}`) already runs XDP program {id} in {mode} mode, which is \
             not through this member's pinned link: detach it (attached through netlink: `ip \
             link set dev {} {} off`; through a pinned link: remove its pin, with `hasync \
             teardown` for another hasync pin directory; or stop the tool or agent that holds \
             it) or take the interface out of its zone",
            i.name,
            i.zone,
            i.name,
            if mode == "generic" {
                "xdpgeneric"
            } else {
                "xdp"
            },
        ))
    })
}

/// The planned interfaces that `ifaces` lists with no six-byte link address: layer-3 devices,
/// whose frames start at the IP header (loopback has an all-zero Ethernet address).
fn layer3_interfaces<'a>(plan: &'a StartPlan, ifaces: &netlink::Ifaces) -> Vec<&'a str> {
    plan.interfaces
        .iter()
        .filter(|i| ifaces.get(&i.name).is_some_and(|f| f.mac.is_none()))
        .map(|i| i.name.as_str())
        .collect()
}

/// Warns of each zone interface configured on top of another ([`stacked::nested`]).
fn warn_nested(plan: &StartPlan, ifaces: &netlink::Ifaces) {
    let names: Vec<String> = plan.interfaces.iter().map(|i| i.name.clone()).collect();
    for (upper, lower) in stacked::nested(&names, ifaces) {
        warn!(
            interface = upper,
            lower,
            "a zone interface sits on another configured interface: XDP sees its frames first on the lower one, in that one's zone, and the strict policy then drops them on this one as zone mismatches (a zone per VLAN of one trunk is not supported); configure only the lower one, whose stacked devices are in its zone"
        );
    }
}

/// The oldest kernel whose FIB lookup helper answers the route checks (it takes
/// `BPF_FIB_LOOKUP_SKIP_NEIGH` from 6.3 on; before, every check's lookup fails).
pub const ROUTE_CHECK_KERNEL: KernelVersion = KernelVersion::new(6, 3, 0);

/// What to tell the operator when zones check routes (`route_check`, the default) on a kernel
/// too old to answer: the checks then learn each reply zone from the first reply and check no
/// source, as `route_check = false` does. `None` when nothing is lost.
pub fn unanswered_route_checks(running: KernelVersion, plan: &StartPlan) -> Option<String> {
    let zones = distinct_zones(plan.route_checking());
    if running >= ROUTE_CHECK_KERNEL || zones.is_empty() {
        return None;
    }
    Some(format!(
        "Linux {running} cannot answer the route checks of zones {} (they need \
         {ROUTE_CHECK_KERNEL} or later): their new flows' sources go unchecked and their \
         replies are bound to the zone of the first reply, as with route_check = false",
        zones.join(", ")
    ))
}

/// The zones of `interfaces`, each named once, in order.
fn distinct_zones<'a>(interfaces: impl Iterator<Item = &'a PlannedInterface>) -> Vec<&'a str> {
    let mut zones: Vec<&str> = Vec::new();
    for i in interfaces {
        if !zones.contains(&i.zone.as_str()) {
            zones.push(&i.zone);
        }
    }
    zones
}

/// The sysctl that says whether `family` (`"ipv4"` or `"ipv6"`) forwards on `iface` (a dot
/// in an interface name is written `/` there: `net.ipv4.conf.eth0/100.forwarding`).
fn forwarding_sysctl(family: &str, iface: &str) -> String {
    format!("net.{family}.conf.{}.forwarding", iface.replace('.', "/"))
}

/// Reads a forwarding sysctl of this network namespace (`None`: unreadable, no such device).
fn read_forwarding(family: &str, iface: &str) -> Option<bool> {
    let path = format!("/proc/sys/net/{family}/conf/{iface}/forwarding");
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.trim() != "0")
}

/// What to tell the operator when a family's forwarding is on for a zone interface that
/// checks routes but off for `lo`: the reverse-path check looks the source up from `lo`, as
/// the kernel's `rp_filter` does, and the lookup then answers "forwarding disabled", which
/// passes every source. One message per family; `forwards(family, iface)` reads the sysctl.
pub fn unchecked_sources(
    plan: &StartPlan,
    forwards: impl Fn(&str, &str) -> Option<bool>,
) -> Vec<String> {
    let mut said = Vec::new();
    for family in ["ipv4", "ipv6"] {
        if forwards(family, "lo") != Some(false) {
            continue;
        }
        let on: Vec<&PlannedInterface> = plan
            .route_checking()
            .filter(|i| forwards(family, &i.name) == Some(true))
            .collect();
        let Some(first) = on.first() else {
            continue;
        };
        said.push(format!(
            "{} is 1 but {} is 0: the reverse-path checks of zones {} look sources up from lo \
             and pass every {family} source unchecked; set {} = 1",
            forwarding_sysctl(family, &first.name),
            forwarding_sysctl(family, "lo"),
            distinct_zones(on.iter().copied()).join(", "),
            forwarding_sysctl(family, "lo"),
        ));
    }
    said
}

/// Records the zone names (checked against a pinned table's sessions) and binds each
/// interface, and each device stacked on one, to its zone; a reused pinned zone map loses the
/// bindings of interfaces no longer in a zone. Returns the stacked devices' bindings.
fn bind_zones(
    dp: &mut Datapath,
    plan: &StartPlan,
    resolved: &Resolved,
) -> anyhow::Result<Vec<(u32, ZoneBinding)>> {
    for (id, name) in (1..).zip(&plan.opts.zones) {
        info!(zone = %name, id, "zone");
    }
    dp.record_zones(&plan.opts.zones)
        .context("checking the zones against the pinned sessions")?;
    let mut bound = Vec::new();
    for (i, &index) in plan.interfaces.iter().zip(&resolved.indexes) {
        let (Some(binding), Some(index)) = (i.binding, index) else {
            continue;
        };
        dp.set_zone(index, binding)
            .with_context(|| format!("binding `{}` to zone `{}`", i.name, i.zone))?;
        bound.push(index);
    }
    let stacked = bind_stacked(dp, plan, &resolved.listed);
    bound.extend(stacked.iter().map(|(index, _)| *index));
    let zones_reused = dp
        .pin_report()
        .is_some_and(|r| r.reused.contains(&names::ZONES));
    if zones_reused {
        dp.retain_zones(&bound)
            .context("unbinding interfaces no longer in a zone")?;
    }
    Ok(stacked)
}

/// Interface `i` was re-created between its resolution (`old` index, which its zone was bound
/// to) and its attach (`new`): its zone moves to the new index, and the old one, unless another
/// planned interface holds it now, is unbound. Before, the zone stayed at the old index and
/// the interface's traffic went unzoned until the next start.
fn rebind_recreated(
    dp: &mut Datapath,
    plan: &StartPlan,
    i: &PlannedInterface,
    (old, new): (u32, u32),
) -> anyhow::Result<()> {
    warn!(
        interface = %i.name,
        old,
        new,
        "the interface was re-created during start-up: its zone follows its new index"
    );
    let Some(binding) = i.binding else {
        return Ok(());
    };
    let taken = plan
        .interfaces
        .iter()
        .any(|p| ifindex(&p.name).is_ok_and(|x| x == old));
    if !taken {
        dp.set_zone(old, ZoneBinding::default())
            .with_context(|| format!("unbinding `{}`'s former index {old}", i.name))?;
    }
    dp.set_zone(new, binding)
        .with_context(|| format!("binding `{}` to zone `{}`", i.name, i.zone))
}

/// Binds the devices stacked on zone interfaces to their zones (`stacked`), warning of zone
/// interfaces configured on top of others. Returns what it bound: what it could not (an
/// interface table that could not be read, an index too large) is left to the task that
/// follows the interfaces, and never stops the start.
fn bind_stacked(
    dp: &mut Datapath,
    plan: &StartPlan,
    listed: &std::io::Result<netlink::Ifaces>,
) -> Vec<(u32, ZoneBinding)> {
    let ifaces = match listed {
        Ok(ifaces) => ifaces,
        Err(e) => {
            warn!(error = %e, "listing the interfaces for devices stacked on zone interfaces failed; they are bound once the interface table is read");
            return Vec::new();
        }
    };
    warn_nested(plan, ifaces);
    let zones = plan.zone_interfaces();
    for index in stacked::unbindable(&zones, ifaces) {
        stacked::say_unbindable(index);
    }
    stacked::apply(dp, &[], &stacked::bindings(&zones, ifaces), &[])
}

/// SIGINT and SIGTERM, installed first thing, so a signal during start-up also ends in a
/// clean stop; and SIGHUP, which reopens the traffic log (after a rotation renamed it) rather
/// than ending the agent as its default action would.
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

/// What a signal asks of the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signalled {
    /// Stop (the signal's name).
    Stop(&'static str),
    /// Reopen the traffic log.
    Reopen,
}

impl Signals {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            hangup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    /// What the next signal that arrives asks.
    pub async fn recv(&mut self) -> Signalled {
        tokio::select! {
            _ = self.interrupt.recv() => Signalled::Stop("SIGINT"),
            _ = self.terminate.recv() => Signalled::Stop("SIGTERM"),
            _ = self.hangup.recv() => Signalled::Reopen,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn flags_and_a_config_make_the_same_kind_of_plan() {
        let args = crate::cli::Cli::try_parse_from([
            "hasync",
            "agent",
            "--member",
            "2",
            "--interface",
            "lan0=trust",
            "--interface",
            "mgmt0",
            "--interface",
            "wan0=untrust",
        ])
        .expect("flags");
        let crate::cli::Command::Agent(args) = args.command else {
            panic!("not the agent command")
        };
        let plan = StartPlan::from_args(&args).expect("plan");
        assert_eq!(plan.opts.zones, ["trust", "untrust"]);
        let got: Vec<(&str, Option<u16>, &str)> = plan
            .interfaces
            .iter()
            .map(|i| {
                (
                    i.name.as_str(),
                    i.binding.map(|b| b.zone.0),
                    i.zone.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("lan0", Some(1), "trust"),
                ("mgmt0", None, "-"),
                ("wan0", Some(2), "untrust")
            ]
        );
        assert_eq!(plan.local(), MemberId(2));
        assert_eq!(plan.opts.pin_dir, None, "the standalone agent pins nothing");
    }

    fn planned(name: &str, zone: &str, flags: u8) -> PlannedInterface {
        let mut binding = ZoneBinding::new(ZoneId(1));
        binding.flags = flags;
        PlannedInterface {
            name: name.into(),
            binding: Some(binding),
            zone: zone.into(),
        }
    }

    /// An XDP program on a zone interface that is not hasync's pinned link (another tool's, an
    /// unpinned agent's) refuses the start before anything is loaded or filled: before, it was
    /// found only at the attach, after the maps (a pinned datapath's CONFIG among them) had
    /// been written. Seen failing (the caller's preparation ran first) on the old order.
    #[test]
    fn a_foreign_xdp_program_refuses_the_start_before_anything_is_loaded() {
        use crate::datapath::testing::{datapath, in_fresh_netns, ip};
        let (err, prepared) = in_fresh_netns(|| {
            ip(&[
                "link", "add", "hsf-a0", "type", "veth", "peer", "name", "hsf-a1",
            ]);
            let mut foreign = datapath();
            foreign
                .attach("hsf-a0")
                .expect("the foreign program attached");
            let mut opts = DatapathOptions::new(MemberId(1));
            opts.zones = vec!["trust".into()];
            let plan = StartPlan {
                opts,
                interfaces: vec![planned("hsf-a0", "trust", 0)],
            };
            let mut prepared = false;
            let result = bring_up(&plan, |_| {
                prepared = true;
                Ok(())
            });
            let err = result.err().map(|e| format!("{e:#}"));
            drop(foreign);
            (err, prepared)
        });
        let err = err.expect("the start refused");
        assert!(
            err.contains("`hsf-a0` (zone `trust`) already runs XDP program"),
            "{err}"
        );
        assert!(!prepared, "refused before the maps were filled: {err}");
    }

    /// An interface re-created after its zone was bound and before the attach (here in the
    /// caller's step between the two) gets its zone at its new index, and the old index is
    /// unbound. Seen failing (the new index unzoned) before.
    #[test]
    fn an_interface_recreated_during_start_up_keeps_its_zone() {
        use crate::datapath::testing::{in_fresh_netns, ip};
        let (old, new, zones) = in_fresh_netns(|| {
            let veth = [
                "link", "add", "hsz-a0", "type", "veth", "peer", "name", "hsz-a1",
            ];
            ip(&veth);
            let old = ifindex("hsz-a0").expect("index");
            let mut opts = DatapathOptions::new(MemberId(1));
            opts.zones = vec!["trust".into()];
            let plan = StartPlan {
                opts,
                interfaces: vec![planned("hsz-a0", "trust", 0)],
            };
            let (mut started, ()) = bring_up(&plan, |_| {
                ip(&["link", "del", "hsz-a0"]);
                ip(&veth);
                Ok(())
            })
            .expect("started");
            let new = ifindex("hsz-a0").expect("index");
            let zones = [old, new].map(|x| started.dp.zone_of(x).expect("zone").zone);
            (old, new, zones)
        });
        assert_ne!(old, new, "re-created");
        assert_eq!(zones, [ZoneId::NONE, ZoneId(1)], "old {old}, new {new}");
    }

    /// A planned interface that does not exist does not stop the start: it is listed as lost
    /// (gone, so the member is Non-functional), and attached once it exists; the others are
    /// attached and zoned. Before, the start failed (seen failing), and after a restart the
    /// pinned program ran on with no agent.
    #[test]
    fn a_missing_interface_is_lost_until_it_exists() {
        use crate::datapath::{
            health::AttachmentFault,
            testing::{in_fresh_netns, ip},
        };
        let (lost, faults, zone, mended) = in_fresh_netns(|| {
            let veth =
                |a: &str, b: &str| ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
            veth("hsm-a0", "hsm-a1");
            let mut opts = DatapathOptions::new(MemberId(1));
            opts.zones = vec!["trust".into(), "untrust".into()];
            let plan = StartPlan {
                opts,
                interfaces: vec![
                    planned("hsm-b0", "untrust", 0),
                    planned("hsm-a0", "trust", 0),
                ],
            };
            let (mut started, ()) = bring_up(&plan, |_| Ok(())).expect("started");
            let dp = &mut started.dp;
            let lost: Vec<String> = dp.lost_attachments().iter().map(|l| l.0.clone()).collect();
            let faults = |dp: &Datapath| {
                let now = netlink::list_now().expect("list");
                let broken = dp.broken_attachments(&now);
                broken
                    .into_iter()
                    .map(|b| (b.interface, b.fault))
                    .collect::<Vec<_>>()
            };
            let at_start = faults(dp);
            let zone = dp
                .zone_of(ifindex("hsm-a0").expect("index"))
                .expect("zone")
                .zone;
            veth("hsm-b0", "hsm-b1");
            let appeared = faults(dp);
            dp.reattach("hsm-b0").expect("attached once it exists");
            (lost, [at_start, appeared], zone, faults(dp))
        });
        assert_eq!(lost, ["hsm-b0"]);
        assert_eq!(faults[0], [("hsm-b0".to_string(), AttachmentFault::Gone)]);
        assert!(
            matches!(faults[1][..], [(ref name, AttachmentFault::Recreated { .. })] if name == "hsm-b0"),
            "{:?}",
            faults[1]
        );
        assert_eq!(zone, ZoneId(1), "the existing interface is zoned");
        assert_eq!(mended, []);
    }

    /// This member's own pinned link (same program, same interface) is no foreign program;
    /// the same program pinned for another interface index (re-created since) is.
    #[test]
    fn only_this_members_pinned_links_are_its_own() {
        let iface = |native| netlink::Iface {
            index: 7,
            up: true,
            mtu: None,
            mac: Some([2, 0, 0, 0, 0, 1]),
            xdp: netlink::XdpPrograms {
                native,
                generic: None,
            },
            lower: None,
            carrier_downs: 0,
        };
        let plan = StartPlan {
            opts: DatapathOptions::new(MemberId(1)),
            interfaces: vec![planned("in0", "trust", 0)],
        };
        let link = |ifindex| pin::XdpLinkInfo {
            program_id: 42,
            ifindex,
        };
        let ifaces = |native| netlink::Ifaces::from([("in0".to_string(), iface(native))]);
        assert_eq!(foreign_xdp(&plan, &ifaces(None), &[]), None);
        assert_eq!(foreign_xdp(&plan, &ifaces(Some(42)), &[link(7)]), None);
        let refused = foreign_xdp(&plan, &ifaces(Some(42)), &[link(8)]).expect("refused");
        assert!(
            refused.contains("XDP program 42 in native mode"),
            "{refused}"
        );
        // Ours in native mode, another's in generic mode beside it.
        let mut both = ifaces(Some(42));
        if let Some(i) = both.get_mut("in0") {
            i.xdp.generic = Some(43);
        }
        let refused = foreign_xdp(&plan, &both, &[link(7)]).expect("refused");
        assert!(
            refused.contains("XDP program 43 in generic mode"),
            "{refused}"
        );
    }

    /// Zones that check routes on a kernel older than 6.3 are named in a warning; wires and
    /// zones without the check are not, and a kernel that answers says nothing.
    #[test]
    fn route_checks_a_kernel_cannot_answer_are_named() {
        let mut plan = StartPlan {
            opts: DatapathOptions::new(MemberId(1)),
            interfaces: vec![
                planned("in0", "trust", 0),
                planned("in1", "trust", 0),
                planned("out0", "untrust", ZoneBinding::NO_ROUTE_CHECK),
                planned("vw0", "wire", ZoneBinding::VWIRE),
            ],
        };
        let old = KernelVersion::new(6, 1, 0);
        let said = unanswered_route_checks(old, &plan).expect("a warning");
        assert!(
            said.starts_with("Linux 6.1.0 cannot answer the route checks of zones trust (they"),
            "{said}"
        );
        assert_eq!(unanswered_route_checks(ROUTE_CHECK_KERNEL, &plan), None);
        plan.interfaces.truncate(0);
        plan.interfaces
            .push(planned("out0", "untrust", ZoneBinding::NO_ROUTE_CHECK));
        assert_eq!(unanswered_route_checks(old, &plan), None);
    }

    /// A tun device (no Ethernet header) is found among the planned interfaces by its missing
    /// link address; a veth and loopback are not.
    #[test]
    fn a_layer3_interface_is_found_by_its_missing_ethernet_address() {
        use crate::datapath::testing::{in_fresh_netns, ip};
        let found = in_fresh_netns(|| {
            ip(&[
                "link", "add", "hsl-e0", "type", "veth", "peer", "name", "hsl-e1",
            ]);
            ip(&["tuntap", "add", "dev", "hsl-t0", "mode", "tun"]);
            let listed = netlink::list_now().expect("listing");
            let plan = StartPlan {
                opts: DatapathOptions::new(MemberId(1)),
                interfaces: vec![
                    planned("hsl-e0", "trust", 0),
                    planned("hsl-t0", "untrust", 0),
                    planned("lo", "dmz", 0),
                ],
            };
            let found: Vec<String> = layer3_interfaces(&plan, &listed)
                .into_iter()
                .map(str::to_owned)
                .collect();
            found
        });
        assert_eq!(found, ["hsl-t0"]);
    }

    /// Forwarding on for a zone interface that checks routes but off for `lo` is named, per
    /// family, with the zones whose reverse-path checks it turns off; `lo` forwarding, or no
    /// route-checking interface that forwards, says nothing.
    #[test]
    fn sources_left_unchecked_by_lo_are_named() {
        let plan = StartPlan {
            opts: DatapathOptions::new(MemberId(1)),
            interfaces: vec![
                planned("in0.7", "trust", 0),
                planned("in1", "trust", 0),
                planned("dmz0", "dmz", 0),
                planned("out0", "untrust", ZoneBinding::NO_ROUTE_CHECK),
            ],
        };
        let per_interface = |family: &str, iface: &str| match (family, iface) {
            ("ipv4", "lo") => Some(false),
            ("ipv4", _) => Some(true),
            (_, "lo") => Some(false),
            (_, "out0") => Some(true),
            _ => Some(false),
        };
        let said = unchecked_sources(&plan, per_interface);
        assert_eq!(
            said,
            [
                "net.ipv4.conf.in0/7.forwarding is 1 but net.ipv4.conf.lo.forwarding is 0: the \
              reverse-path checks of zones trust, dmz look sources up from lo and pass every \
              ipv4 source unchecked; set net.ipv4.conf.lo.forwarding = 1"
            ]
        );
        assert!(unchecked_sources(&plan, |_, _| Some(true)).is_empty());
        assert!(unchecked_sources(&plan, |_, i| (i != "lo").then_some(true)).is_empty());
    }
}
