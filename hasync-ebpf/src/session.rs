//! Session table logic: look up, create, advance state, take over, emit events.

use aya_ebpf::{
    bindings::{xdp_action, BPF_ANY},
    helpers::bpf_ktime_get_coarse_ns,
    programs::XdpContext,
};
use hasync_common::{
    flow::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
    maps::FRAGMENT_WINDOW_NS,
    session::{expired, tcp, tcp_next, DIR_ORIGINAL, DIR_REPLY},
    Counter, Counters, DatapathConfig, EventKind, FlowKey, FragmentKey, MalformedAction,
    OtherProtocols, Policy, Session, SessionFlags, State, ZoneBinding, ZoneId,
};

use crate::{
    embryo,
    events::emit,
    maps::{CONFIG, COUNTERS, FRAGMENTS, MEMBERS, SESSIONS, ZONES},
    parse::{first_fragment_key, parse, Packet, Parsed},
};

/// `E2BIG`: what a full hash map answers to an insert.
pub(crate) const E2BIG: i32 = 7;

/// Changes the flow key before the table is touched. The product uses [`NoMix`]; the fastpath
/// benchmark mixes an iteration counter in so one test-run frame walks many sessions.
pub trait KeyMix {
    fn mix(key: &mut FlowKey);
}

/// The identity: what the product runs.
pub struct NoMix;

impl KeyMix for NoMix {
    #[inline(always)]
    fn mix(_key: &mut FlowKey) {}
}

/// The XDP entry logic: parse, then track. Returns an XDP action.
#[inline(always)]
pub fn process<M: KeyMix>(ctx: &XdpContext) -> u32 {
    // One lookup each for the config and the per-CPU counters (array lookups are inlined by
    // the verifier).
    let Some(counters) = COUNTERS.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: per-CPU value, this program is its only writer on this CPU.
    let counters = unsafe { &mut *counters };
    counters.inc(Counter::Packets);
    let Some(cfg) = CONFIG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    if !cfg.local_member.is_valid() {
        counters.inc(Counter::PassUnconfigured);
        return xdp_action::XDP_PASS;
    }
    match parse(ctx) {
        Parsed::Track(mut pkt) => {
            M::mix(&mut pkt.key);
            let verdict = track(ctx, cfg, counters, &pkt);
            if let (Some(id), xdp_action::XDP_PASS) = (pkt.first_fragment, verdict) {
                remember_datagram(&first_fragment_key(&pkt, id));
            }
            verdict
        }
        Parsed::LaterFragment(datagram, note) => later_fragment(cfg, counters, &datagram, note),
        Parsed::IcmpError(quoted) => icmp_error(cfg, counters, quoted),
        Parsed::OtherProtocol => other_protocol(ctx, cfg, counters),
        Parsed::Pass(reason) => {
            counters.inc(reason);
            xdp_action::XDP_PASS
        }
        Parsed::Malformed(reason) => {
            counters.inc(reason);
            // Passing malformed frames never lets one around the policy: a frame the parser
            // cannot place is unknown traffic, and goes where the ingress zone's rule for
            // untracked protocols sends it.
            let pass = cfg.malformed == MalformedAction::Pass as u8
                && (!unplaceable(reason) || unknown_traffic_passes(ctx, cfg));
            if pass {
                counters.inc(Counter::PassMalformed);
                xdp_action::XDP_PASS
            } else {
                counters.inc(Counter::DropMalformed);
                xdp_action::XDP_DROP
            }
        }
    }
}

/// The zone binding of the interface the packet came in on (zone 0: in no zone; `None`: an
/// ifindex past the array, which the agent never binds).
#[inline(always)]
fn ingress_zone(ctx: &XdpContext) -> Option<ZoneBinding> {
    ZONES.get(ctx.ingress_ifindex() as u32).copied()
}

/// Malformed frames whose traffic the parser cannot even place (a third VLAN tag, more IPv6
/// extension headers than it walks, a TCP flag combination no stack sends), unlike truncated
/// ones, which the kernel drops anyway.
#[inline(always)]
fn unplaceable(reason: Counter) -> bool {
    matches!(
        reason,
        Counter::ErrVlanTooDeep | Counter::ErrIpv6TooManyExt | Counter::ErrTcpFlags
    )
}

/// Does traffic the datapath does not track pass, by the ingress zone's rule or the policy?
#[inline(always)]
fn unknown_traffic_passes(ctx: &XdpContext, cfg: &DatapathConfig) -> bool {
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
fn other_protocol(ctx: &XdpContext, cfg: &DatapathConfig, counters: &mut Counters) -> u32 {
    if unknown_traffic_passes(ctx, cfg) {
        counters.inc(Counter::PassOtherProtocol);
        xdp_action::XDP_PASS
    } else {
        counters.inc(Counter::DropOtherProtocol);
        xdp_action::XDP_DROP
    }
}

/// A first fragment passed: its datagram's later fragments may follow for a while.
#[inline(always)]
fn remember_datagram(datagram: &FragmentKey) {
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
fn later_fragment(
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
    if cfg.policy == Policy::Loose as u8 {
        counters.inc(Counter::PassFragmentUnseenFirst);
        xdp_action::XDP_PASS
    } else {
        counters.inc(Counter::DropFragmentUnseenFirst);
        xdp_action::XDP_DROP
    }
}

/// An ICMP/ICMPv6 error passes when the flow it quotes has a live session (conntrack's
/// RELATED); otherwise the strict policy drops it, the loose one passes it, counted either way.
/// It changes nothing in the session.
#[inline(always)]
fn icmp_error(cfg: &DatapathConfig, counters: &mut Counters, quoted: Option<FlowKey>) -> u32 {
    if let Some(key) = quoted {
        // SAFETY: plain-data value, read by copy of the fields needed.
        if let Some(s) = unsafe { SESSIONS.get(key) } {
            // SAFETY: the helper takes no arguments and only reads the clock.
            let now = unsafe { bpf_ktime_get_coarse_ns() };
            if !expired(now, s.last_seen_ns, timeout_ns(cfg, s.state)) {
                counters.inc(Counter::IcmpErrorRelated);
                return xdp_action::XDP_PASS;
            }
        }
    }
    if cfg.policy == Policy::Loose as u8 {
        counters.inc(Counter::PassIcmpErrorUnrelated);
        xdp_action::XDP_PASS
    } else {
        counters.inc(Counter::DropIcmpErrorUnrelated);
        xdp_action::XDP_DROP
    }
}

#[inline(always)]
fn timeout_ns(cfg: &DatapathConfig, state: u8) -> u64 {
    match cfg.timeouts_ns.get(state as usize) {
        Some(t) => *t,
        None => 0,
    }
}

#[inline(always)]
fn track(ctx: &XdpContext, cfg: &DatapathConfig, counters: &mut Counters, pkt: &Packet) -> u32 {
    if let Some(note) = pkt.note {
        counters.inc(note);
    }
    // SAFETY: the helper takes no arguments and only reads the clock.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let is_syn = pkt.tcp_flags & (tcp::SYN | tcp::ACK) == tcp::SYN;
    // Version of a stale entry this packet replaces: the new session continues past it, so a
    // peer still holding the old one takes the new one by (version, owner).
    let mut replaced_version = 0;
    if let Some(s) = SESSIONS.get_ptr_mut(pkt.key) {
        // SAFETY: the value stays valid for the program's run; concurrent writers on other
        // CPUs can only make counters approximate, never unsafe.
        let s = unsafe { &mut *s };
        let expired = expired(now, s.last_seen_ns, timeout_ns(cfg, s.state));
        // A fresh SYN on a closed session is a new connection reusing the ports.
        let reopened = is_syn && s.state == State::Closed as u8;
        if !expired && !reopened {
            counters.inc(Counter::Hits);
            let ingress = match ingress_zone(ctx) {
                Some(z) => z.zone,
                None => ZoneId::NONE,
            };
            return hit(cfg, counters, pkt, s, now, ingress);
        }
        if expired {
            counters.inc(Counter::Expired);
        }
        replaced_version = s.version;
    }
    miss(ctx, cfg, counters, pkt, now, is_syn, replaced_version)
}

/// Is a packet of `s` travelling in `dir` that came in through zone `ingress` where the
/// session is bound? The original direction is bound to the zone the session was created in,
/// the reply direction to the zone its first reply came in through (learned here). A session
/// of no zone is not bound, and an interface in no zone (the agent attaches to zones' only,
/// unless run without a config) binds nothing. A packet from elsewhere is dropped by the strict
/// policy (passed by the loose one), counted either way, and does not touch the session.
#[inline(always)]
fn zone_allows(
    cfg: &DatapathConfig,
    counters: &mut Counters,
    s: &mut Session,
    dir: usize,
    ingress: ZoneId,
) -> bool {
    let bound = if dir == DIR_ORIGINAL {
        s.zone
    } else {
        s.reply_zone
    };
    if bound == ingress || ingress == ZoneId::NONE {
        return true;
    }
    if bound == ZoneId::NONE {
        if dir == DIR_REPLY {
            s.reply_zone = ingress;
        }
        return true;
    }
    if cfg.policy == Policy::Loose as u8 {
        counters.inc(Counter::PassZoneMismatch);
        true
    } else {
        counters.inc(Counter::DropZoneMismatch);
        false
    }
}

/// The packet found its session.
#[inline(always)]
fn hit(
    cfg: &DatapathConfig,
    counters: &mut Counters,
    pkt: &Packet,
    s: &mut Session,
    now: u64,
    ingress: ZoneId,
) -> u32 {
    let dir = if pkt.src_is_hi ^ s.flags.has(SessionFlags::INITIATOR_HI) {
        DIR_REPLY
    } else {
        DIR_ORIGINAL
    };
    if !zone_allows(cfg, counters, s, dir, ingress) {
        return xdp_action::XDP_DROP;
    }
    if s.owner != cfg.local_member {
        let owner_alive = match MEMBERS.get(s.owner.0 as u32) {
            Some(m) => m.alive != 0,
            None => false,
        };
        if owner_alive {
            // The owner writes the session; we only keep our replica from idling out.
            counters.inc(Counter::Asymmetric);
            s.last_seen_ns = now;
            if !s.flags.has(SessionFlags::ASYMMETRIC) {
                s.flags.0 |= SessionFlags::ASYMMETRIC;
            }
            return xdp_action::XDP_PASS;
        }
        // The owner is gone: this member takes the session over, then handles the packet
        // as the owner would.
        s.owner = cfg.local_member;
        s.version = s.version.wrapping_add(1);
        s.flags.0 = (s.flags.0 | SessionFlags::TAKEN_OVER) & !SessionFlags::FROM_PEER;
        counters.inc(Counter::Takeovers);
        account(s, dir, pkt, now);
        advance(counters, pkt, s, dir);
        s.last_event_ns = now;
        // One event carries both the new owner and any state change.
        emit(counters, EventKind::OwnershipTaken, &pkt.key, s);
        return xdp_action::XDP_PASS;
    }
    account(s, dir, pkt, now);
    if let Some(kind) = advance(counters, pkt, s, dir) {
        s.last_event_ns = now;
        emit(counters, kind, &pkt.key, s);
    } else if now.saturating_sub(s.last_event_ns) >= cfg.refresh_interval_ns {
        s.version = s.version.wrapping_add(1);
        s.last_event_ns = now;
        emit(counters, EventKind::Refresh, &pkt.key, s);
    }
    xdp_action::XDP_PASS
}

/// Runs the state machine for the packet; on a change, bumps the version and returns the event
/// to announce it.
#[inline(always)]
fn advance(
    counters: &mut Counters,
    pkt: &Packet,
    s: &mut Session,
    dir: usize,
) -> Option<EventKind> {
    let old = s.state;
    let new = match State::from_u8(old) {
        Some(state) if pkt.key.proto == IPPROTO_TCP => {
            tcp_next(state, dir, pkt.tcp_flags, s.tcp_flags) as u8
        }
        Some(State::UdpNew) if dir == DIR_REPLY => State::UdpReplied as u8,
        _ => old,
    };
    if new == old {
        return None;
    }
    s.state = new;
    s.version = s.version.wrapping_add(1);
    counters.inc(Counter::StateChanges);
    if new == State::Closed as u8 {
        counters.inc(Counter::Closed);
        Some(EventKind::Closed)
    } else {
        Some(EventKind::StateChanged)
    }
}

/// Counts the packet on the session.
#[inline(always)]
fn account(s: &mut Session, dir: usize, pkt: &Packet, now: u64) {
    s.last_seen_ns = now;
    if let Some(p) = s.packets.get_mut(dir) {
        *p = p.wrapping_add(1);
    }
    if let Some(b) = s.bytes.get_mut(dir) {
        *b = b.wrapping_add(pkt.len);
    }
    if let Some(f) = s.tcp_flags.get_mut(dir) {
        *f |= pkt.tcp_flags;
    }
}

/// The packet has no (live) session: create one, or apply the policy.
#[inline(always)]
fn miss(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    counters: &mut Counters,
    pkt: &Packet,
    now: u64,
    is_syn: bool,
    replaced_version: u32,
) -> u32 {
    let state = match pkt.key.proto {
        IPPROTO_TCP if is_syn => State::SynSent,
        IPPROTO_TCP => {
            if cfg.policy == Policy::Loose as u8 {
                counters.inc(Counter::PassNoSessionLoose);
                return xdp_action::XDP_PASS;
            }
            counters.inc(Counter::DropNoSession);
            return xdp_action::XDP_DROP;
        }
        IPPROTO_UDP => State::UdpNew,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => State::IcmpEcho,
        _ => {
            counters.inc(Counter::PassUntracked);
            return xdp_action::XDP_PASS;
        }
    };
    let zone = match ingress_zone(ctx) {
        Some(z) => z.zone,
        None => ZoneId::NONE,
    };
    let mut session = Session {
        created_ns: now,
        last_seen_ns: now,
        last_event_ns: now,
        packets: [1, 0],
        bytes: [pkt.len, 0],
        version: replaced_version.wrapping_add(1),
        zone,
        flags: SessionFlags(if pkt.src_is_hi {
            SessionFlags::INITIATOR_HI
        } else {
            0
        }),
        owner: cfg.local_member,
        state: state as u8,
        tcp_flags: [pkt.tcp_flags, 0],
        ticket: 0,
        reply_zone: ZoneId::NONE,
        _pad: [0; 6],
    };
    // A new session is unreplied: it may evict the oldest unreplied one, never anything else.
    embryo::admit(cfg, counters, &pkt.key, &mut session, embryo::Part::ThisCpu);
    if let Err(e) = SESSIONS.insert(pkt.key, session, BPF_ANY as u64) {
        return not_tracked(cfg, counters, e);
    }
    counters.inc(Counter::Creates);
    emit(counters, EventKind::Created, &pkt.key, &session);
    xdp_action::XDP_PASS
}

/// A new flow the table could not take (full: every slot holds a replied session or an
/// unreplied one not yet due for eviction): the strict policy drops it, as it would drop the
/// reply of a flow it does not track; the loose policy passes it untracked.
#[inline(always)]
fn not_tracked(cfg: &DatapathConfig, counters: &mut Counters, error: i32) -> u32 {
    let strict = cfg.policy != Policy::Loose as u8;
    counters.inc(match (error == -E2BIG, strict) {
        (true, true) => Counter::DropTableFull,
        (true, false) => Counter::PassTableFull,
        (false, _) => Counter::CreateFailed,
    });
    if strict {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}
