//! What the routing table says about a flow's first packet in a zone that checks routes (the
//! default: `route_check`): the zone its replies must come in through (the zone of the
//! interface its destination is routed out of), whether its source is routed back into the
//! zone it came in from (a reverse-path check), and whether it would leave through the
//! interface it came in on (a hairpin).
//!
//! Without this the reply zone was learned from the first reply, wherever it came from: a host
//! in one zone that forged both ends of a handshake got an established, assured session (never
//! evicted, synced to every peer) for three frames. Now its forged answer must come in through
//! the zone the destination is routed to, and its forged source must be routed back to its own
//! zone: both ends in its own zone, behind another of the zone's interfaces than its own.
//!
//! A destination the kernel would not forward (local to this host, a broadcast or multicast
//! address, no route, a discarding route, forwarding disabled on the interface) gets replies
//! bound to no zone: none can come in through XDP. Virtual wires do not route (their ends are
//! bound as before), nor do zones with `route_check = false`; what the lookup cannot answer (a
//! helper error: a kernel older than 6.3; a lightweight tunnel) keeps the reply zone learned
//! from the first reply.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FWD_DISABLED,
        BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LKUP_RET_UNREACHABLE, BPF_FIB_LOOKUP_SKIP_NEIGH,
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use hasync_common::{flow::Family, Counter, Counters, FlowKey, ZoneBinding, ZoneId};

use crate::maps::{FIB_SCRATCH, VWIRE_PORTS, ZONES};
use crate::parse::is_icmp_reply;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// `lo`: the input interface of the reverse-path lookup, as the kernel's own check
/// (`fib_validate_source`) uses, so rules that select by input interface do not apply to it.
const LOOPBACK_IFINDEX: u32 = 1;

/// Why a flow's first packet makes no session: the counters the policy picks from.
pub struct Refused {
    pub pass: Counter,
    pub drop: Counter,
}

impl Refused {
    /// An ICMP query's reply with no session, on its way through this member: its request
    /// never crossed here. (One to this host itself makes a session as a request does: the
    /// host's own requests, path monitoring's too, leave without crossing XDP; so does one in a
    /// zone with `route_check = false`. Across a virtual wire every one is on its way through.)
    const STRAY_REPLY: Refused = Refused {
        pass: Counter::PassNoSessionLoose,
        drop: Counter::DropNoSession,
    };
    /// A packet that came in through another zone than its session allows.
    pub const ZONE_MISMATCH: Refused = Refused {
        pass: Counter::PassZoneMismatch,
        drop: Counter::DropZoneMismatch,
    };
}

/// What one lookup answered.
enum Route {
    /// Forwarded out of this interface.
    Out(u32),
    /// Not forwarded: for this host itself, a broadcast or multicast address, or no route.
    NotForwarded,
    /// A discarding route (blackhole, unreachable, prohibit).
    Nowhere,
    /// Forwarding is disabled on the lookup's input interface.
    Disabled,
    /// No answer (a helper error, a lightweight tunnel).
    Unknown,
}

/// A flow's first packet: its key, and which end of it sent the packet.
pub struct First<'a> {
    pub key: &'a FlowKey,
    /// The sender is the key's higher endpoint.
    pub src_is_hi: bool,
    /// The packet would open a session here (not a reply to a peer's copy or to a session
    /// taken over, looked up again): an ICMP query's reply on its way through is refused.
    pub opening: bool,
}

impl<'a> First<'a> {
    /// The lookup of the packet's own route: from its source to its destination, as it came
    /// in on `ifindex`.
    #[inline(always)]
    fn query(&self, ifindex: u32) -> Query<'a> {
        let key = self.key;
        let (src, dst, ports) = if self.src_is_hi {
            (&key.addr_hi, &key.addr_lo, (key.port_hi, key.port_lo))
        } else {
            (&key.addr_lo, &key.addr_hi, (key.port_lo, key.port_hi))
        };
        Query {
            family: key.family,
            proto: key.proto,
            src,
            dst,
            ports,
            ifindex,
        }
    }
}

/// Is the packet for this host itself, as far as a zone that checks routes (`ingress`) can
/// tell: the FIB lookup answers "not forwarded" (a local destination; also one with no route,
/// which the kernel drops). Forwarding off on the ingress interface leaves the lookup unable
/// to tell: no. Elsewhere always no: across a virtual wire every packet passed crosses to the
/// other end, and a zone with `route_check = false` says the lookup does not see how the
/// kernel routes (marks, VRFs).
#[inline(always)]
pub fn for_this_host(ctx: &XdpContext, packet: &First, ingress: Option<ZoneBinding>) -> bool {
    // (Testing the zone id as well, as `ZoneBinding::checks_routes` does, made LLVM emit code
    // the verifier refuses; an interface in no zone has no XDP program.)
    let unchecked = ZoneBinding::VWIRE | ZoneBinding::NO_ROUTE_CHECK;
    if ingress.is_some_and(|b| b.flags & unchecked != 0) {
        return false;
    }
    let query = packet.query(ctx.ingress_ifindex() as u32);
    // A multicast destination (or the limited broadcast) is nobody's own: the local table's
    // routes for them answer "not forwarded" too.
    !not_unicast(packet.key.family, query.dst) && matches!(lookup(ctx, &query), Route::NotForwarded)
}

/// The reply zone of a new session whose first packet came in through `ingress`, or why it
/// makes none. Counts the binding.
#[inline(always)]
pub fn reply_zone(
    ctx: &XdpContext,
    counters: &mut Counters,
    first: &First,
    ingress: Option<ZoneBinding>,
) -> Result<ZoneId, Refused> {
    // Across a virtual wire every packet is on its way through, and every reply comes back
    // in through the wire's other end: a new session's replies are bound to that end's zone
    // at once, so one forged from the first packet's side is a zone mismatch (before, it was
    // learned as the first reply, and a handshake forged from one side made an assured
    // session); a reply looked up again (`session::route_again`) must have come from the far
    // end of the session's own zone. Ends in one zone bind nothing tighter than that zone.
    if ingress.is_some_and(|b| b.has(ZoneBinding::VWIRE)) {
        if first.opening && is_icmp_reply(first.key) {
            return Err(Refused::STRAY_REPLY);
        }
        let far_end = VWIRE_PORTS.get_ifindex(ctx.ingress_ifindex() as u32);
        return Ok(far_end.map_or(ZoneId::NONE, zone_of));
    }
    let Some(ingress) = ingress.filter(|b| b.checks_routes()) else {
        return Ok(ZoneId::NONE);
    };
    let key = first.key;
    let ifindex = ctx.ingress_ifindex() as u32;
    let mut query = first.query(ifindex);
    if not_unicast(key.family, query.dst) {
        counters.inc(Counter::ReplyZoneRouted);
        return Ok(ZoneId::UNZONED);
    }
    let egress = match lookup(ctx, &query) {
        Route::Out(_) if first.opening && is_icmp_reply(key) => return Err(Refused::STRAY_REPLY),
        Route::Out(egress) => egress,
        Route::NotForwarded | Route::Nowhere | Route::Disabled => {
            counters.inc(Counter::ReplyZoneRouted);
            return Ok(ZoneId::UNZONED);
        }
        Route::Unknown => {
            counters.inc(Counter::ReplyZoneLearned);
            return Ok(ZoneId::NONE);
        }
    };
    if egress == ifindex {
        return Err(Refused {
            pass: Counter::PassHairpin,
            drop: Counter::DropHairpin,
        });
    }
    // A tagged frame's source is routed through its VLAN device, which the agent binds to the
    // zone of the interface it sits on.
    query = Query {
        src: query.dst,
        dst: query.src,
        ports: (query.ports.1, query.ports.0),
        ifindex: LOOPBACK_IFINDEX,
        ..query
    };
    let back = match lookup(ctx, &query) {
        Route::Out(back) => zone_of(back) == ingress.zone,
        // `lo` may forward nothing where forwarding is set per interface: no answer.
        Route::Unknown | Route::Disabled => true,
        Route::NotForwarded | Route::Nowhere => false,
    };
    if !back {
        return Err(Refused {
            pass: Counter::PassReversePath,
            drop: Counter::DropReversePath,
        });
    }
    counters.inc(Counter::ReplyZoneRouted);
    Ok(match zone_of(egress) {
        ZoneId::NONE => ZoneId::UNZONED,
        zone => zone,
    })
}

/// Is `dst` an address no reply ever comes from: IPv4 multicast, reserved or the limited
/// broadcast (the lookup would route them by the default route), IPv6 multicast?
#[inline(always)]
fn not_unicast(family: u8, dst: &[u32; 4]) -> bool {
    // Network byte order: the first octet is the word's lowest byte in memory.
    let first = dst[0].to_ne_bytes()[0];
    if family == Family::V4 as u8 {
        first >= 224
    } else {
        first == 0xff
    }
}

/// The zone of interface `ifindex` ([`ZoneId::NONE`]: in none).
#[inline(always)]
fn zone_of(ifindex: u32) -> ZoneId {
    ZONES.get(ifindex).map_or(ZoneId::NONE, |b| b.zone)
}

/// The kernel's FIB lookup of `query`, as the kernel would forward it; neighbours are not
/// looked at (the answer is the route's, not whether its next hop is resolved).
#[inline(always)]
fn lookup(ctx: &XdpContext, query: &Query) -> Route {
    let Some(scratch) = FIB_SCRATCH.get_ptr_mut(0) else {
        return Route::Unknown;
    };
    // SAFETY: this CPU's scratch slot; only this program run uses it, and the forwarding,
    // which uses it too, runs for packets of existing sessions only.
    let p = unsafe { &mut (*scratch).params };
    match fib_lookup(ctx, p, query, BPF_FIB_LOOKUP_SKIP_NEIGH) {
        BPF_FIB_LKUP_RET_SUCCESS => Route::Out(p.ifindex),
        BPF_FIB_LKUP_RET_FWD_DISABLED => Route::Disabled,
        BPF_FIB_LKUP_RET_NOT_FWDED => Route::NotForwarded,
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            Route::Nowhere
        }
        _ => Route::Unknown,
    }
}

/// What a FIB lookup is asked: a packet from `src` to `dst` (`family`'s addresses in network
/// byte order, IPv4 in the first word) coming in on `ifindex`; its protocol and ports (source,
/// destination; network byte order), which multipath routes may hash on (zero: not given).
#[derive(Clone, Copy)]
pub struct Query<'a> {
    pub family: u8,
    pub proto: u8,
    pub src: &'a [u32; 4],
    pub dst: &'a [u32; 4],
    pub ports: (u16, u16),
    pub ifindex: u32,
}

/// The kernel's FIB lookup of `query` into `p` (which it overwrites): a
/// `BPF_FIB_LKUP_RET_*` code (a helper error reads as a large value, no code).
#[inline(always)]
pub fn fib_lookup(ctx: &XdpContext, p: &mut FibParams, query: &Query, flags: u32) -> u32 {
    // SAFETY: the struct is plain integers and unions of integers; all zero is valid.
    *p = unsafe { core::mem::zeroed() };
    p.ifindex = query.ifindex;
    p.l4_protocol = query.proto;
    (p.sport, p.dport) = query.ports;
    if query.family == Family::V4 as u8 {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = query.src[0];
        p.__bindgen_anon_4.ipv4_dst = query.dst[0];
    } else {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = *query.src;
        p.__bindgen_anon_4.ipv6_dst = *query.dst;
    }
    // SAFETY: `p` is a valid, writable `bpf_fib_lookup` of the size passed; the helper writes
    // only inside it.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            p,
            core::mem::size_of::<FibParams>() as i32,
            flags,
        )
    };
    rc as u32
}
