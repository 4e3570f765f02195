//! The policy for what the session table cannot decide alone: traffic it does not track (other
//! protocols, ICMP errors, later fragments, frames the parser cannot place), which zone a
//! session's packets may come in through, and what the strict and loose policies do with
//! traffic that matches nothing.

use aya_ebpf::{
    bindings::{xdp_action, BPF_ANY},
    helpers::bpf_ktime_get_coarse_ns,
    programs::XdpContext,
};
use hasync_common::{
    maps::FRAGMENT_WINDOW_NS,
    session::{expired, DIR_ORIGINAL, DIR_REPLY},
    Counter, Counters, DatapathConfig, FlowKey, FragmentKey, OtherProtocols, Policy, Session,
    ZoneBinding, ZoneId,
};

use crate::{
    clock,
    maps::{FRAGMENTS, SESSIONS, ZONES},
    route,
};

/// The zone binding of the interface the packet came in on (zone 0: in no zone; `None`: an
/// ifindex past the array, which the agent never binds).
#[inline(always)]
pub fn ingress_zone(ctx: &XdpContext) -> Option<ZoneBinding> {
    ZONES.get(ctx.ingress_ifindex() as u32).copied()
}

/// Malformed frames whose traffic the parser cannot even place (a third VLAN tag, more IPv6
/// extension headers than it walks, a TCP flag combination no stack sends, an IPv4 header
/// that fails its checksum, so none of its fields can be trusted), unlike truncated ones,
/// which the kernel drops anyway (a virtual wire carries those across as they are).
#[inline(always)]
pub fn unplaceable(reason: Counter) -> bool {
    matches!(
        reason,
        Counter::ErrVlanTooDeep
            | Counter::ErrIpv6TooManyExt
            | Counter::ErrTcpFlags
            | Counter::ErrIpv4Checksum
    )
}

/// Does traffic the datapath does not track pass, by the ingress zone's rule or the policy?
#[inline(always)]
pub fn unknown_traffic_passes(ctx: &XdpContext, cfg: &DatapathConfig) -> bool {
    let rule = match ingress_zone(ctx) {
        Some(z) => z.other_protocols,
        None => OtherProtocols::ByPolicy as u8,
    };
    match rule {
        r if r == OtherProtocols::Pass as u8 => true,
        r if r == OtherProtocols::Drop as u8 => false,
        _ => cfg.policy == Policy::Loose as u8,
    }
}

/// An IP protocol the datapath does not track: the ingress zone's rule, or the policy, says
/// whether it passes; counted either way.
#[inline(always)]
pub fn other_protocol(ctx: &XdpContext, cfg: &DatapathConfig, counters: &mut Counters) -> u32 {
    if unknown_traffic_passes(ctx, cfg) {
        counters.inc(Counter::PassOtherProtocol);
        xdp_action::XDP_PASS
    } else {
        counters.inc(Counter::DropOtherProtocol);
        xdp_action::XDP_DROP
    }
}

/// The zone of the interface the packet came in on ([`ZoneId::NONE`]: in no zone).
#[inline(always)]
pub fn ingress_zone_id(ctx: &XdpContext) -> ZoneId {
    match ingress_zone(ctx) {
        Some(z) => z.zone,
        None => ZoneId::NONE,
    }
}

/// Returns `verdict`; when it passes the first fragment of `datagram`, the datagram's later
/// fragments may follow for a while.
#[inline(always)]
pub fn open_datagram(verdict: u32, datagram: Option<FragmentKey>) -> u32 {
    if let (Some(d), xdp_action::XDP_PASS) = (datagram, verdict) {
        remember_datagram(&d);
    }
    verdict
}

/// A first fragment passed: its datagram's later fragments may follow for a while.
#[inline(always)]
fn remember_datagram(datagram: &FragmentKey) {
    // The kernel's coarse clock (the agent's), not the jiffies one: fragments are rare, and
    // only `later_fragment` compares these times.
    // SAFETY: the helper takes no arguments and only reads the clock.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // A full table forgets its oldest datagram; a failed insert leaves the later fragments to
    // the policy, as an unseen first fragment would.
    let _ = FRAGMENTS.insert(datagram, now, BPF_ANY as u64);
}

/// A later fragment (no ports to track) passes when its datagram's first fragment passed in
/// the last [`FRAGMENT_WINDOW_NS`]; otherwise the strict policy drops it and the loose one
/// passes it, counted either way.
#[inline(always)]
pub fn later_fragment(
    cfg: &DatapathConfig,
    counters: &mut Counters,
    datagram: &FragmentKey,
    note: Option<Counter>,
) -> u32 {
    if let Some(note) = note {
        counters.inc(note);
    }
    // SAFETY: plain-data value read by copy.
    if let Some(&first) = unsafe { FRAGMENTS.get(datagram) } {
        // SAFETY: the helper takes no arguments and only reads the clock.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        if !expired(now, first, FRAGMENT_WINDOW_NS) {
            counters.inc(Counter::PassFragment);
            return xdp_action::XDP_PASS;
        }
    }
    by_policy(
        cfg,
        counters,
        Counter::PassFragmentUnseenFirst,
        Counter::DropFragmentUnseenFirst,
    )
}

/// What the policy does with traffic it cannot match to anything: the loose policy passes it
/// (counted as `pass`), the strict one drops it (counted as `drop`).
#[inline(always)]
pub fn by_policy(
    cfg: &DatapathConfig,
    counters: &mut Counters,
    pass: Counter,
    drop: Counter,
) -> u32 {
    if cfg.policy == Policy::Loose as u8 {
        counters.inc(pass);
        xdp_action::XDP_PASS
    } else {
        counters.inc(drop);
        xdp_action::XDP_DROP
    }
}

/// An ICMP/ICMPv6 error passes when the flow it quotes has a live session (conntrack's
/// RELATED), or when it is for this host itself, as far as a zone that checks routes can tell
/// (`route::for_this_host`: its quoted packet's sender, the error's destination, is local): the
/// host's own connections open through the stack, unseen by XDP, and its own firewall decides
/// (`pass-to-this-host`; before, a "fragmentation needed" for the firewall's own TCP was
/// dropped: a path-MTU black hole). Otherwise the strict policy drops it, the loose one passes
/// it, counted either way. It changes nothing in the session.
#[inline(always)]
pub fn icmp_error(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    counters: &mut Counters,
    quoted: Option<(FlowKey, bool)>,
) -> u32 {
    if let Some((key, sender_is_hi)) = quoted {
        // SAFETY: plain-data value, read by copy of the fields needed.
        if let Some(s) = unsafe { SESSIONS.get(key) } {
            if !expired(clock::now(cfg), s.last_seen_ns, cfg.timeout_ns(s.state)) {
                counters.inc(Counter::IcmpErrorRelated);
                return xdp_action::XDP_PASS;
            }
        }
        // Asked as the quoted packet's answer would be: from its destination to its sender.
        let answer = route::First {
            key: &key,
            src_is_hi: !sender_is_hi,
            opening: false,
        };
        if route::for_this_host(ctx, &answer, ingress_zone(ctx)) {
            counters.inc(Counter::PassToThisHost);
            return xdp_action::XDP_PASS;
        }
    }
    by_policy(
        cfg,
        counters,
        Counter::PassIcmpErrorUnrelated,
        Counter::DropIcmpErrorUnrelated,
    )
}

/// Is a packet of `s` travelling in `dir` that came in through zone `ingress` where the
/// session is bound? The original direction is bound to the zone the session was created in,
/// the reply direction to the zone its destination is routed to (`route::reply_zone`; or, when
/// the routing table could not tell, the zone its first valid reply came in through:
/// [`learn_reply_zone`]). A session of no zone is not bound, and an interface in no zone (the
/// agent attaches to zones' only, unless run without a config) binds nothing. A packet from
/// elsewhere is dropped by the strict policy (passed by the loose one), counted either way,
/// and does not touch the session: `Some` is its verdict, `None` lets it on to the session.
/// (Before stop 51 the loose policy's went on and changed the session: a handshake forged
/// from one side alone became assured.)
#[inline(always)]
pub fn zone_mismatch(
    cfg: &DatapathConfig,
    counters: &mut Counters,
    s: &Session,
    dir: usize,
    ingress: ZoneId,
) -> Option<u32> {
    let bound = if dir == DIR_ORIGINAL {
        s.zone
    } else {
        s.reply_zone
    };
    if bound == ingress || ingress == ZoneId::NONE || bound == ZoneId::NONE {
        return None;
    }
    Some(by_policy(
        cfg,
        counters,
        Counter::PassZoneMismatch,
        Counter::DropZoneMismatch,
    ))
}

/// Binds the reply direction, when its creation left it unbound, to the zone of a reply the
/// session accepted (its owner's, inside the TCP window): learned before those checks, one
/// spoofed packet from a third zone (a blind RST during the handshake, any reply to a replica
/// whose owner lives) would bind it there and make the strict policy drop every genuine
/// reply. (A replica's, or a taken-over session's, reply is first checked against the routing
/// table, `session::route_again`, which binds it where it names a zone; otherwise a
/// taken-over session's first reply ahead of the replica's sequence is accepted unchecked,
/// and binds: the price of not cutting taken-over connections, `hasync_common::tcp_window`.)
#[inline(always)]
pub fn learn_reply_zone(s: &mut Session, dir: usize, ingress: ZoneId) {
    if dir == DIR_REPLY && s.reply_zone == ZoneId::NONE {
        s.reply_zone = ingress;
    }
}
