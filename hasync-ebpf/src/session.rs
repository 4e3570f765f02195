//! Session table logic: look up, create, advance state, take over, emit events.

use aya_ebpf::{
    bindings::{xdp_action, BPF_ANY},
    programs::XdpContext,
};
use hasync_common::{
    config::REFRESH_BYTES_SHIFT,
    flow::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
    session::{expired, tcp, tcp_next, DIR_ORIGINAL, DIR_REPLY},
    tcp_window::{self, Fit},
    Counter, Counters, DatapathConfig, EventKind, FlowKey, MalformedAction, Session, SessionFlags,
    State, ZoneBinding, ZoneId,
};

use crate::{
    clock, embryo,
    events::emit,
    forward, log,
    maps::{CONFIG, COUNTERS, MEMBERS, SESSIONS},
    parse::{first_fragment_key, parse, Packet, Parsed},
    policy::{
        by_policy, icmp_error, ingress_zone, ingress_zone_id, later_fragment, learn_reply_zone,
        open_datagram, other_protocol, unknown_traffic_passes, unplaceable, zone_mismatch,
    },
    route,
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
    // A wire that is down drops everything, and nothing on it makes or changes a session or
    // opens a datagram's later fragments: before stop 42 a reply forged from the wrong side
    // bound a dead peer's copy's replies to its side and took the copy over (the genuine
    // replies were then refused once the wire was back). Dropped here, not by
    // `forward::wire`'s redirect: the agent may put the wire back meanwhile, and the frame,
    // never checked, would cross. (One call of `forward::wire`: two made the verifier refuse
    // a context pointer they shared.)
    if forward::on_wire_down(ctx, cfg) {
        counters.inc(Counter::DropVwireDown);
        return xdp_action::XDP_DROP;
    }
    let mut link_layer = None;
    let verdict = verdict_of::<M>(ctx, cfg, counters, &mut link_layer);
    forward::wire(ctx, cfg, counters, verdict, link_layer)
}

/// What the frame's parse and its session decide; `link_layer` is set to why a non-IP frame
/// passed.
#[inline(always)]
fn verdict_of<M: KeyMix>(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    counters: &mut Counters,
    link_layer: &mut Option<Counter>,
) -> u32 {
    match parse(ctx) {
        Parsed::Track(mut pkt) => {
            M::mix(&mut pkt.key);
            let verdict = track(ctx, cfg, counters, &pkt);
            let datagram = pkt.first_fragment.map(|f| first_fragment_key(&pkt, f));
            open_datagram(verdict, datagram)
        }
        Parsed::LaterFragment(datagram, note) => later_fragment(cfg, counters, &datagram, note),
        Parsed::IcmpError(quoted) => icmp_error(ctx, cfg, counters, quoted),
        Parsed::OtherProtocol(datagram) => {
            open_datagram(other_protocol(ctx, cfg, counters), datagram)
        }
        Parsed::Pass(reason) => {
            counters.inc(reason);
            *link_layer = Some(reason);
            xdp_action::XDP_PASS
        }
        Parsed::Malformed(reason) => {
            counters.inc(reason);
            log::malformed(ctx, counters, reason);
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

#[inline(always)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "a key or session passed by value is copied to the stack, which this program has \
              no room left for"
)]
fn track(ctx: &XdpContext, cfg: &DatapathConfig, counters: &mut Counters, pkt: &Packet) -> u32 {
    if let Some(note) = pkt.note() {
        counters.inc(note);
    }
    let now = clock::now(cfg);
    let is_syn = pkt.tcp_flags & (tcp::SYN | tcp::ACK) == tcp::SYN;
    // Version of a stale entry this packet replaces: the new session continues past it, so a
    // peer still holding the old one takes the new one by (version, owner).
    let mut replaced_version = 0;
    if let Some(s) = SESSIONS.get_ptr_mut(&pkt.key) {
        // SAFETY: the value stays valid for the program's run; concurrent writers on other
        // CPUs can only make counters approximate, never unsafe.
        let s = unsafe { &mut *s };
        let expired = expired(now, s.last_seen_ns, cfg.timeout_ns(s.state));
        // A fresh SYN on a closed session is a new connection reusing the ports.
        let reopened = is_syn && s.state == State::Closed as u8;
        if !expired && !reopened {
            counters.inc(Counter::Hits);
            return hit(ctx, cfg, counters, pkt, s, now);
        }
        if expired {
            counters.inc(Counter::Expired);
        }
        replaced_version = s.version;
    }
    miss(ctx, cfg, counters, pkt, now, is_syn, replaced_version)
}

/// The packet found its session.
#[inline(always)]
fn hit(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    counters: &mut Counters,
    pkt: &Packet,
    s: &mut Session,
    now: u64,
) -> u32 {
    let ingress = ingress_zone_id(ctx);
    let dir = if pkt.src_is_hi ^ s.flags.has(SessionFlags::INITIATOR_HI) {
        DIR_REPLY
    } else {
        DIR_ORIGINAL
    };
    if let Some(verdict) = zone_mismatch(cfg, counters, s, dir, ingress) {
        return verdict;
    }
    let owned = s.owner == cfg.local_member;
    if unbound(s, dir, owned, ingress) {
        if let Err(r) = route_again(ctx, counters, pkt, s, dir) {
            return by_policy(cfg, counters, r.pass, r.drop);
        }
    }
    if !owned && owner_alive(s) && !s.flags.has(SessionFlags::ORPHANED) {
        // The owner writes the session (and checks its window); we only keep our replica
        // from idling out.
        counters.inc(Counter::Asymmetric);
        s.last_seen_ns = s.replica_seen_at(now);
        if !s.flags.has(SessionFlags::ASYMMETRIC) {
            s.flags.0 |= SessionFlags::ASYMMETRIC;
        }
        return xdp_action::XDP_PASS;
    }
    let fit = if pkt.key.proto == IPPROTO_TCP {
        tcp_window::classify(s, dir, pkt.tcp_flags, &pkt.tcp).zoned(s, ingress)
    } else {
        Fit::InWindow
    };
    if tcp_window::refused(fit, pkt.tcp_flags) {
        // A blind RST or FIN: the session stays exactly as it was.
        return by_policy(
            cfg,
            counters,
            Counter::PassTcpOutOfWindow,
            Counter::DropTcpOutOfWindow,
        );
    }
    if let Some(passed) = fit.passed_unchanged() {
        // Passed on (for the endpoint's challenge ACK, whatever the policy) and, like a blind
        // RST outside the window, not the session's: it stays exactly as it was, but for a
        // new SYN's end, kept for the answer that would restart it (`record` keeps nothing
        // of the others).
        tcp_window::record(s, dir, pkt.tcp_flags, &pkt.tcp, fit);
        counters.inc(passed);
        return xdp_action::XDP_PASS;
    }
    if !fit.counts() && !(owned && kept_alive(s, dir, fit)) {
        // Outside the window (conntrack: invalid): the kernel decides, and the session stays
        // exactly as it was: a blind ACK refreshed it, announced it to the peers and took a
        // dead owner's session over.
        counters.inc(Counter::PassTcpOutsideWindow);
        return xdp_action::XDP_PASS;
    }
    if fit.counts() {
        learn_reply_zone(s, dir, ingress);
    }
    let was = Before::of(s, dir);
    account(s, dir, pkt, now, fit);
    // The state's interval, read before `advance`: a packet that changes the state sends an
    // event of its own, never a refresh.
    let refresh_ns = cfg.refresh_ns(s.state);
    let refreshed = if !owned {
        take_over(cfg, counters, pkt, s, (dir, fit), now);
        false
    } else if let Some(kind) = advance(counters, pkt, s, dir, fit) {
        announce(counters, &pkt.key, s, kind, now);
        false
    } else if refresh_due(cfg, s, &was, (dir, now), refresh_ns) {
        s.version = s.version.wrapping_add(1);
        announce(counters, &pkt.key, s, EventKind::Refresh, now);
        true
    } else {
        false
    };
    // One call site: the forwarding path is inlined once.
    let accepted = forward::Accepted {
        // The packet that completes a session's setup (the first reply, the handshake's last
        // ACK) goes to the kernel too, so its connection tracking sees both directions.
        // So does the answer that restarts one on a new connection over its ports: the
        // kernel's own tracking re-syncs from it. Not one that closes a forwarded session
        // (the last ACK, a RST): the kernel never saw the data before it, so the segment is
        // out of its window (invalid; until stop 48 a ruleset's `ct state invalid drop`
        // dropped every connection's last ACK and RST).
        both_ways: was.both_ways && fit != Fit::Restart,
        zone: s.zone,
        reply_zone: s.reply_zone,
        dir,
        fragment: pkt.first_fragment.is_some(),
        counted: fit.counts(),
        refreshed: refreshed && pkt.key.proto != IPPROTO_TCP,
        now,
    };
    let action = forward::routed(ctx, cfg, counters, &accepted);
    if action == xdp_action::XDP_REDIRECT && !s.flags.has(SessionFlags::FORWARDED_XDP) {
        s.flags.0 |= SessionFlags::FORWARDED_XDP;
    }
    action
}

/// Does a segment of an owned session that does not count (at `fit`, travelling in `dir`)
/// still keep it alive? One inside the window by its sequence number whose ACK acknowledges
/// nothing this member saw ([`Fit::keeps_alive`]: the other direction moved to another
/// member), and the initiator's segments of a half-open session (outside until an answer
/// comes: to this host itself, or routed back another way).
#[inline(always)]
fn kept_alive(s: &Session, dir: usize, fit: Fit) -> bool {
    fit.keeps_alive() || (dir == DIR_ORIGINAL && s.state == State::SynSent as u8)
}

/// Does the routing table bind `s`'s replies before its packet in `dir`, which came in through
/// zone `ingress`, is checked against its zones? Yes, for
/// - a session of ours that it gave no zone when it was made (no route yet: a flap, a boot),
///   while it has had no reply: asked again with its original direction's first packets and
///   every 64th after them, so the flow is not blackholed for as long as it keeps sending
///   (and a flow whose replies never come through XDP, to this host itself, does not pay a
///   lookup per packet);
/// - a peer's session, whose replica came with its replies unbound (a record does not carry
///   them: the owner's zones' interfaces are its own), at a reply here, and a session taken
///   over from a peer until it is bound: before, such a reply passed from any zone while the
///   owner lived, and after a failover the first one bound the replies to its zone, wherever
///   a forger sent it from; and one of ours written back from a peer's full sync after a
///   restart ([`SessionFlags::RESTORED`]), likewise.
#[inline(always)]
fn unbound(s: &Session, dir: usize, owned: bool, ingress: ZoneId) -> bool {
    let sent = s.packets[DIR_ORIGINAL];
    if dir == DIR_ORIGINAL {
        owned
            && s.reply_zone == ZoneId::UNZONED
            && s.packets[DIR_REPLY] == 0
            && ingress == s.zone
            && (sent < ASK_FIRST || sent.is_multiple_of(ASK_EVERY))
    } else {
        let rebound = SessionFlags::TAKEN_OVER | SessionFlags::RESTORED;
        s.reply_zone == ZoneId::NONE && (!owned || s.flags.0 & rebound != 0)
    }
}

/// An unrouted flow's first packets that ask the routing table again, each.
const ASK_FIRST: u64 = 16;
/// After them, one packet in this many asks.
const ASK_EVERY: u64 = 64;

/// Binds `s`'s replies as [`unbound`] says. The packet is asked about as a first packet is
/// (`route::reply_zone`). One of the original direction: its destination's zone binds the
/// replies; a refusal changes nothing (the session exists). A reply: its source must be
/// routed back into the zone it came in through (the reverse path), which then binds the
/// replies; a refusal refuses the packet and leaves the session unbound; a lookup that names
/// no zone leaves it to learn the zone from its first accepted reply, as before.
#[inline(always)]
fn route_again(
    ctx: &XdpContext,
    counters: &mut Counters,
    pkt: &Packet,
    s: &mut Session,
    dir: usize,
) -> Result<(), route::Refused> {
    let first = route::First {
        key: &pkt.key,
        src_is_hi: pkt.src_is_hi,
        opening: false,
    };
    let ingress = ingress_zone(ctx);
    let wire = ingress.is_some_and(|b| b.has(ZoneBinding::VWIRE));
    match route::reply_zone(ctx, counters, &first, ingress) {
        Ok(zone) if dir == DIR_ORIGINAL => s.reply_zone = zone,
        Err(_) if dir == DIR_ORIGINAL => {}
        Ok(ZoneId::NONE | ZoneId::UNZONED) => {}
        // Across a wire a reply comes in at the far end from the session's own zone (a peer's
        // copy, or one taken over, is first bound so: before, whatever side its first reply
        // came from, a forger's included).
        Ok(zone) if wire && zone != s.zone => return Err(route::Refused::ZONE_MISMATCH),
        Ok(_) => s.reply_zone = ingress.map_or(ZoneId::NONE, |b| b.zone),
        Err(refused) => return Err(refused),
    }
    Ok(())
}

/// What a packet may change about its session that decides its refresh and its forwarding.
struct Before {
    assured: bool,
    both_ways: bool,
    /// Bytes of the packet's direction.
    bytes: u64,
}

impl Before {
    #[inline(always)]
    fn of(s: &Session, dir: usize) -> Self {
        Before {
            assured: s.is_assured(),
            both_ways: forward::both_ways(s),
            bytes: s.bytes.get(dir).copied().unwrap_or(0),
        }
    }
}

/// Whether the packet of an owned session that announces nothing else sends a refresh: when
/// the state's interval has passed since the last event; when this packet made the session
/// assured (a UDP stream two seconds old: a peer's replica stops being evictable only when a
/// record says so); when the direction's byte count crossed a multiple of
/// 2^[`REFRESH_BYTES_SHIFT`] (the sequence numbers a replica holds then stay less than 2^31
/// behind, which a member taking the connection over needs to re-learn them); or when the
/// session was taken over ([`SessionFlags::CONTESTABLE`]: nothing announced since) the claim
/// rule's quiet time ago (`claim_quiet_ms`, the keepalive threshold, whether claims are open
/// or not: so long the copies stay contestable, for crossing takeovers to settle). Members
/// find a dead member dead up to a keepalive interval apart: one that still took the old
/// owner for alive when the takeover came refused it as a claim of a live session
/// (`hasync_common::conflict::claimable`), and takes it now, not a whole
/// refresh interval later.
#[inline(always)]
fn refresh_due(
    cfg: &DatapathConfig,
    s: &Session,
    was: &Before,
    (dir, now): (usize, u64),
    refresh_ns: u64,
) -> bool {
    let bytes = s.bytes.get(dir).copied().unwrap_or(0);
    let since = now.saturating_sub(s.last_event_ns);
    // Without a branch: the rest of the program would be walked once per outcome.
    let contest_over = u64::from(s.flags.has(SessionFlags::CONTESTABLE))
        & u64::from(since >= cfg.claim_quiet_ns())
        != 0;
    since >= refresh_ns
        || contest_over
        || (!was.assured && s.is_assured())
        || (bytes ^ was.bytes) >> REFRESH_BYTES_SHIFT != 0
}

/// Announces an owned session's event `kind` at `now`: from then on it is no longer just
/// taken over ([`SessionFlags::CONTESTABLE`]).
#[inline(always)]
fn announce(counters: &mut Counters, key: &FlowKey, s: &mut Session, kind: EventKind, now: u64) {
    s.flags.0 &= !SessionFlags::CONTESTABLE;
    s.last_event_ns = now;
    emit(counters, kind, key, s);
}

/// Is the member that owns `s` alive?
#[inline(always)]
pub(crate) fn owner_alive(s: &Session) -> bool {
    match MEMBERS.get(s.owner.0 as u32) {
        Some(m) => m.alive != 0,
        None => false,
    }
}

/// How far [`SessionFlags::ORPHANED`]'s bit moves to [`SessionFlags::FROM_ORPHAN`]'s.
const ORPHAN_TO_POOL: u32 =
    SessionFlags::FROM_ORPHAN.trailing_zeros() - SessionFlags::ORPHANED.trailing_zeros();

/// The owner is gone, or removed the session while this member carried its flow
/// ([`SessionFlags::ORPHANED`]): this member takes the session over, then handles the packet
/// (already accounted) as the owner would.
#[inline(always)]
fn take_over(
    cfg: &DatapathConfig,
    counters: &mut Counters,
    pkt: &Packet,
    s: &mut Session,
    (dir, fit): (usize, Fit),
    now: u64,
) {
    let from = s.owner;
    s.owner = cfg.local_member;
    s.version = s.version.wrapping_add(1);
    let replica = SessionFlags::FROM_PEER | SessionFlags::ORPHANED | SessionFlags::HANDED_ON;
    // An orphaned copy stays in the peers' pool: ORPHANED becomes FROM_ORPHAN, bit for bit
    // (no branch: the rest of the program would be walked once per outcome).
    let from_orphan = (s.flags.0 & SessionFlags::ORPHANED).wrapping_shl(ORPHAN_TO_POOL);
    let taken = SessionFlags::TAKEN_OVER | SessionFlags::CONTESTABLE | from_orphan;
    s.flags.0 = (s.flags.0 | taken) & !replica;
    counters.inc(Counter::Takeovers);
    advance(counters, pkt, s, dir, fit);
    s.last_event_ns = now;
    // One event carries both the new owner and any state change.
    emit(counters, EventKind::OwnershipTaken, &pkt.key, s);
    log::taken_over(counters, &pkt.key, from, s.version);
}

/// Runs the state machine for the packet; on a change, bumps the version and returns the event
/// to announce it.
#[inline(always)]
fn advance(
    counters: &mut Counters,
    pkt: &Packet,
    s: &mut Session,
    dir: usize,
    fit: Fit,
) -> Option<EventKind> {
    let old = s.state;
    let restarted = fit == Fit::Restart;
    let new = match State::from_u8(old) {
        // A segment outside the window moves nothing (a blind ACK would establish).
        Some(_) if !fit.counts() => old,
        // A new connection over the ports: announced even where the state stays, so the
        // peers hold its numbers.
        Some(_) if restarted => State::Established as u8,
        Some(state) if pkt.key.proto == IPPROTO_TCP => {
            tcp_next(state, dir, pkt.tcp_flags, s.tcp_flags) as u8
        }
        Some(State::UdpNew) if dir == DIR_REPLY => State::UdpReplied as u8,
        _ => old,
    };
    if new == old && !restarted {
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

/// Counts the packet on the session, and records what a TCP segment that `fit` the window
/// tells about its direction's sequence. The session is this member's to write from here on
/// (its own, or taken over): no longer a peer's record, so it leaves the peers' pool (the
/// next count gives the room back) — one of ours sent back embryonic by a peer, never
/// counted there, must not enter it uncounted when this packet makes it assured.
#[inline(always)]
fn account(s: &mut Session, dir: usize, pkt: &Packet, now: u64, fit: Fit) {
    s.flags.0 &= !SessionFlags::FROM_PEER;
    if pkt.key.proto == IPPROTO_TCP {
        tcp_window::record(s, dir, pkt.tcp_flags, &pkt.tcp, fit);
    }
    s.last_seen_ns = now;
    if let Some(p) = s.packets.get_mut(dir) {
        *p = p.wrapping_add(1);
    }
    if let Some(b) = s.bytes.get_mut(dir) {
        *b = b.wrapping_add(pkt.len);
    }
    if !fit.counts() {
        // Its flags are not the direction's: the state machine reads them.
        return;
    }
    if let Some(f) = s.tcp_flags.get_mut(dir) {
        *f |= pkt.tcp_flags;
    }
}

/// The packet has no (live) session: create one, or apply the policy.
#[inline(always)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "a key or session passed by value is copied to the stack, which this program has \
              no room left for"
)]
fn miss(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    counters: &mut Counters,
    pkt: &Packet,
    now: u64,
    is_syn: bool,
    replaced_version: u32,
) -> u32 {
    let first = route::First {
        key: &pkt.key,
        src_is_hi: pkt.src_is_hi,
        opening: true,
    };
    let ingress = ingress_zone(ctx);
    let state = match pkt.key.proto {
        IPPROTO_TCP if is_syn => State::SynSent,
        // Mid-flow TCP for this host itself: its own connections open without crossing XDP
        // (their SYNs leave through the stack), and its own firewall decides what reaches it.
        IPPROTO_TCP if route::for_this_host(ctx, &first, ingress) => {
            counters.inc(Counter::PassToThisHost);
            return xdp_action::XDP_PASS;
        }
        IPPROTO_TCP => {
            return by_policy(
                cfg,
                counters,
                Counter::PassNoSessionLoose,
                Counter::DropNoSession,
            );
        }
        IPPROTO_UDP => State::UdpNew,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => State::IcmpEcho,
        _ => {
            counters.inc(Counter::PassUntracked);
            return xdp_action::XDP_PASS;
        }
    };
    let reply_zone = match route::reply_zone(ctx, counters, &first, ingress) {
        Ok(zone) => zone,
        Err(refused) => return by_policy(cfg, counters, refused.pass, refused.drop),
    };
    let zone = ingress.map_or(ZoneId::NONE, |b| b.zone);
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
        reply_zone,
        tcp_track: [0; 2],
        max_win: [0; 2],
        seq_end: [0; 2],
    };
    if pkt.key.proto == IPPROTO_TCP {
        tcp_window::record(
            &mut session,
            DIR_ORIGINAL,
            pkt.tcp_flags,
            &pkt.tcp,
            Fit::Learn,
        );
    }
    // A new session is embryonic: it may evict the oldest embryonic one, never anything else.
    embryo::admit_own(cfg, counters, &pkt.key, &mut session);
    if let Err(e) = SESSIONS.insert(&pkt.key, &session, BPF_ANY as u64) {
        return not_tracked(cfg, counters, e);
    }
    counters.inc(Counter::Creates);
    emit(counters, EventKind::Created, &pkt.key, &session);
    xdp_action::XDP_PASS
}

/// A new flow the table could not take (full: every slot holds an assured session or an
/// embryonic one not yet due for eviction): the strict policy drops it, as it would drop the
/// reply of a flow it does not track; the loose policy passes it untracked.
#[inline(always)]
fn not_tracked(cfg: &DatapathConfig, counters: &mut Counters, error: i32) -> u32 {
    if error == -E2BIG {
        return by_policy(
            cfg,
            counters,
            Counter::PassTableFull,
            Counter::DropTableFull,
        );
    }
    by_policy(cfg, counters, Counter::CreateFailed, Counter::CreateFailed)
}
