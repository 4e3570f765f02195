//! Forwarding in XDP: Layer 3 (`forwarding = "xdp"`: a FIB lookup cached per CPU, source and
//! destination, MAC rewrite, TTL or hop-limit decrement, DEVMAP redirect) and virtual wires
//! (redirect to the wire's other end). What the fast path should not decide goes to the
//! kernel, counted.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    programs::XdpContext,
};
use hasync_common::{
    fib::{self, FIB_ENTRY_LIFETIME_NS},
    flow::Family,
    session::DIR_ORIGINAL,
    Counter, Counters, DatapathConfig, FibEntry, FibKey, Forwarding, Session, State, ZoneBinding,
    ZoneId,
};

use crate::{
    maps::{FIB_CACHE, FIB_GENERATION, FIB_SCRATCH, FWD_PORTS, INGRESS_MACS, VWIRE_PORTS, ZONES},
    parse::{frame_mut, raw32, ETH_HLEN, ETH_P_IP, ETH_P_IPV6},
    route::{fib_lookup, Query},
};

/// Offset of the IPv4 TTL in an untagged frame: what `ip_decrease_ttl` rewrites starts here.
const IPV4_TTL_AT: usize = 22;
/// The MTU of a device that takes the largest IP packets.
const MAX_IP_LEN: u16 = u16::MAX;
/// IPv6 next header: hop-by-hop options.
const NEXTHDR_HOP: u8 = 0;

/// What the forwarding reads of the IP header of an untagged frame.
struct Ip {
    family: Family,
    /// The IP packet's length as it would leave (the frame past its Ethernet header).
    len: u64,
}

/// This CPU's working space for a lookup, off the 512-byte stack: the cache key (addresses
/// and ingress), the kernel's lookup parameters, and the entry a miss builds.
pub struct FibScratch {
    pub key: FibKey,
    pub params: FibParams,
    pub entry: FibEntry,
}

/// What the forwarding needs of a FIB_CACHE entry: copied out small, the entry stays in the
/// map (the program's stack is 512 bytes).
struct Hop {
    ifindex: u32,
    mtu: u16,
    zone: ZoneId,
    smac: [u8; 6],
    dmac: [u8; 6],
}

impl Hop {
    #[inline(always)]
    fn of(e: &FibEntry) -> Hop {
        Hop {
            ifindex: e.ifindex,
            mtu: e.mtu,
            zone: e.zone,
            smac: e.smac,
            dmac: e.dmac,
        }
    }
}

/// Did the frame come in on a virtual wire whose other end is not in the map (down)? Then it
/// is dropped before its parse (`session::process`), and it changes no session.
#[inline(always)]
pub fn on_wire_down(ctx: &XdpContext, cfg: &DatapathConfig) -> bool {
    if cfg.vwire == 0 {
        return false;
    }
    // Read once: the verifier refuses a load through a context pointer moved to the field,
    // which two reads may be compiled into.
    let ifindex = ctx.ingress_ifindex() as u32;
    ZONES
        .get(ifindex)
        .is_some_and(|b| b.has(ZoneBinding::VWIRE))
        && VWIRE_PORTS.get_ifindex(ifindex).is_none()
}

/// The ingress binding of a frame, when virtual wires are configured.
#[inline(always)]
fn wire_end(ctx: &XdpContext, cfg: &DatapathConfig) -> Option<ZoneBinding> {
    if cfg.vwire == 0 {
        return None;
    }
    ZONES
        .get(ctx.ingress_ifindex() as u32)
        .copied()
        .filter(|b| b.has(ZoneBinding::VWIRE))
}

/// The last step of every frame: on a virtual-wire end, what passes crosses to the other end;
/// elsewhere `verdict` stands. `link_layer` is why a non-IP frame passed: the link layer's own
/// protocols cross unless the wire drops them, other ethertypes (which may carry IP the
/// program cannot see) never cross.
#[inline(always)]
pub fn wire(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    counters: &mut Counters,
    verdict: u32,
    link_layer: Option<Counter>,
) -> u32 {
    if verdict != xdp_action::XDP_PASS {
        return verdict;
    }
    let Some(end) = wire_end(ctx, cfg) else {
        return verdict;
    };
    let refused = match link_layer {
        Some(Counter::PassOtherEthertype) => true,
        Some(Counter::PassNonIp) => end.has(ZoneBinding::NON_IP_DROP),
        _ => false,
    };
    if refused {
        counters.inc(Counter::DropVwireNonIp);
        return xdp_action::XDP_DROP;
    }
    // A wire end with no other end in the map (the wire is down, or the agent is changing it)
    // drops the frame: the kernel would route one sent to the end's own address (until stop
    // 39 it was passed), and nothing on a wire is for this host.
    match VWIRE_PORTS.redirect(ctx.ingress_ifindex() as u32, xdp_action::XDP_DROP as u64) {
        Ok(action) => {
            counters.inc(Counter::VwireForwarded);
            action
        }
        Err(action) => {
            counters.inc(Counter::DropVwireDown);
            action
        }
    }
}

/// What the session table knows of a packet it accepted, for the forwarding decision.
pub struct Accepted {
    /// The session had seen both directions before this packet ([`both_ways`]).
    pub both_ways: bool,
    /// The session's zone (its initiator's side) and reply zone.
    pub zone: ZoneId,
    pub reply_zone: ZoneId,
    /// `DIR_ORIGINAL` or `DIR_REPLY`.
    pub dir: usize,
    /// A first fragment.
    pub fragment: bool,
    /// TCP: the segment counts in its session's window (UDP: always); one kept alive without
    /// counting goes to the kernel.
    pub counted: bool,
    /// The packet carried a refresh event, and is not a TCP segment ([`kernel_refresh_due`]).
    pub refreshed: bool,
    /// Session clock.
    pub now: u64,
}

/// A packet of an owned session that the table accepted: forward it in XDP when the
/// configuration asks for it and nothing unusual is about it; else pass it to the kernel,
/// counted by reason.
#[inline(always)]
pub fn routed(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    counters: &mut Counters,
    pkt: &Accepted,
) -> u32 {
    if cfg.forwarding != Forwarding::Xdp as u8 || wire_end(ctx, cfg).is_some() {
        return xdp_action::XDP_PASS;
    }
    match try_route(ctx, cfg, pkt) {
        Ok(action) => {
            counters.inc(Counter::ForwardedXdp);
            action
        }
        Err(reason) => {
            counters.inc(reason);
            xdp_action::XDP_PASS
        }
    }
}

/// Sessions that have seen both directions: the kernel's policy saw their setup. A TCP
/// connection half-closed after its handshake still carries data, and one closed after it
/// still has segments of its own in flight (a FIN sent again, its ACK); ICMP echoes stay with
/// the kernel.
#[inline(always)]
pub fn both_ways(s: &Session) -> bool {
    s.state == State::Established as u8
        || s.state == State::UdpReplied as u8
        || ((s.state == State::Closing as u8 || s.state == State::Closed as u8)
            && s.handshake_completed())
}

/// A UDP packet that carries a refresh goes to the kernel: its connection tracking, which saw
/// the session's setup (see `both_ways` in `session::hit`), then sees a packet of the flow at
/// least every refresh interval (at most 30 s) plus the gap between two of its packets. It
/// forgets a UDP stream after 120 s without one, and a packet the fast path later hands it
/// mid-flow would then be new or invalid there. Not a TCP segment (`session::hit` leaves
/// those out of [`Accepted::refreshed`]): the kernel saw only the handshake, so one carrying
/// data it never saw is out of its window (invalid, and dropped by a ruleset's `ct state
/// invalid drop`: until stop 48 one segment per refresh was, and sent again); its entry holds
/// an established connection for days without them.
#[inline(always)]
fn kernel_refresh_due(pkt: &Accepted) -> bool {
    pkt.refreshed
}

#[inline(always)]
fn try_route(ctx: &XdpContext, cfg: &DatapathConfig, pkt: &Accepted) -> Result<u32, Counter> {
    if !pkt.both_ways {
        return Err(Counter::PassFwdNotEstablished);
    }
    if !pkt.counted {
        return Err(Counter::PassFwdUnacknowledged);
    }
    if pkt.fragment {
        return Err(Counter::PassFwdFragment);
    }
    if kernel_refresh_due(pkt) {
        return Err(Counter::PassFwdRefresh);
    }
    let scratch = FIB_SCRATCH.get_ptr_mut(0).ok_or(Counter::PassFwdNoRoute)?;
    // SAFETY: this CPU's scratch slot; only this program run uses it.
    let scratch = unsafe { &mut *scratch };
    let ip = ip_header(ctx, &mut scratch.key, cfg.fib_by_source != 0)?;
    if !sent_here(ctx) {
        return Err(Counter::PassFwdOtherHost);
    }
    let hop = next_hop(ctx, scratch, pkt.now, cfg.fib_seed)?;
    // Out through the session's other side only: a route into a third zone is the kernel's
    // (and its policy's) to decide. The reply side is bound when the session is made (see
    // `route`) or learned from its first reply; a member that took the session over learns it
    // again, until then any other zone will do.
    let other_side = if pkt.dir == DIR_ORIGINAL {
        pkt.reply_zone
    } else {
        pkt.zone
    };
    let zone_ok = if other_side == ZoneId::NONE {
        hop.zone != ZoneId::NONE && hop.zone != pkt.zone
    } else {
        hop.zone == other_side
    };
    if !zone_ok {
        return Err(Counter::PassFwdZone);
    }
    if ip.len > u64::from(hop.mtu) {
        return Err(Counter::PassFwdMtu);
    }
    let action = FWD_PORTS
        .redirect(hop.ifindex, xdp_action::XDP_PASS as u64)
        .map_err(|_| Counter::PassFwdEgress)?;
    // The redirect happens after the program returns, so rewriting now is safe.
    rewrite(ctx, ip.family, &hop)?;
    Ok(action)
}

/// Was the frame sent to the ingress interface's own MAC address (as far as the agent has told)?
#[inline(always)]
fn sent_here(ctx: &XdpContext) -> bool {
    let Some(dst) = frame_mut::<6>(ctx, 0) else {
        return false;
    };
    // SAFETY: `frame_mut` checked the bytes lie inside the frame.
    let dst = unsafe { *dst };
    INGRESS_MACS
        .get(ctx.ingress_ifindex() as u32)
        .is_some_and(|m| m.known != 0 && m.mac == dst)
}

/// Reads the IP header of an untagged frame, refusing what the fast path leaves to the kernel,
/// into the cache key: the source only `by_source` (some rule or route here selects by it;
/// otherwise zero, so one entry serves every source).
#[inline(always)]
fn ip_header(ctx: &XdpContext, key: &mut FibKey, by_source: bool) -> Result<Ip, Counter> {
    // Written word by word whatever `by_source` says: a constant zero source would be stored
    // through a byte-wise memset call.
    let src = |word: u32| if by_source { word } else { 0 };
    let eth = frame_mut::<ETH_HLEN>(ctx, 0).ok_or(Counter::PassFwdVlan)?;
    // SAFETY: `frame_mut` checked the bytes lie inside the frame. The headers are read in
    // place, not copied: the program's stack is small.
    let eth = unsafe { &*eth };
    if eth[0] & 1 != 0 {
        // Ethernet broadcast or multicast: never forwarded as unicast.
        return Err(Counter::PassFwdNotUnicast);
    }
    // What leaves is the whole frame past the Ethernet header.
    let len = (ctx.data_end().wrapping_sub(ctx.data()) as u64).saturating_sub(ETH_HLEN as u64);
    match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => {
            let h = frame_mut::<20>(ctx, ETH_HLEN).ok_or(Counter::PassFwdVlan)?;
            // SAFETY: as above.
            let h = unsafe { &*h };
            if h[0] != 0x45 {
                return Err(Counter::PassFwdIpOptions);
            }
            if h[8] <= 1 {
                return Err(Counter::PassFwdTtl);
            }
            // 224/4 multicast, 240/4 reserved and the limited broadcast.
            if h[16] >= 224 {
                return Err(Counter::PassFwdNotUnicast);
            }
            key.src = [src(raw32(h, 12)), 0, 0, 0];
            key.dst = [raw32(h, 16), 0, 0, 0];
            key.family = Family::V4 as u8;
            key.ifindex = ctx.ingress_ifindex() as u32;
            Ok(Ip {
                family: Family::V4,
                len,
            })
        }
        ETH_P_IPV6 => {
            let h = frame_mut::<40>(ctx, ETH_HLEN).ok_or(Counter::PassFwdVlan)?;
            // SAFETY: as above.
            let h = unsafe { &*h };
            if h[7] <= 1 {
                return Err(Counter::PassFwdTtl);
            }
            if h[6] == NEXTHDR_HOP {
                return Err(Counter::PassFwdIpOptions);
            }
            // Multicast (ff00::/8) and link-local (fe80::/10) stay on their link.
            let link_local = |hi: u8, lo: u8| hi == 0xfe && lo & 0xc0 == 0x80;
            if h[24] == 0xff || link_local(h[24], h[25]) || link_local(h[8], h[9]) {
                return Err(Counter::PassFwdNotUnicast);
            }
            let word = |at: usize| raw32(h, at);
            key.src = [src(word(8)), src(word(12)), src(word(16)), src(word(20))];
            key.dst = [word(24), word(28), word(32), word(36)];
            key.family = Family::V6 as u8;
            key.ifindex = ctx.ingress_ifindex() as u32;
            Ok(Ip {
                family: Family::V6,
                len,
            })
        }
        // 802.1Q / 802.1ad: the kernel owns the VLAN devices and their routes.
        _ => Err(Counter::PassFwdVlan),
    }
}

/// Where packets of `scratch.key` leave: this CPU's cached lookup while the FIB generation
/// holds and the entry has not expired, else a new lookup, cached in the key's slot.
#[inline(always)]
fn next_hop(
    ctx: &XdpContext,
    scratch: &mut FibScratch,
    now: u64,
    seed: u32,
) -> Result<Hop, Counter> {
    let generation = FIB_GENERATION.get(0).copied().unwrap_or(0);
    let cached = FIB_CACHE.get_ptr_mut(fib::slot(&scratch.key, seed));
    if let Some(hop) = cached {
        // SAFETY: this CPU's slot: only this program run reads or writes it now.
        let hop = unsafe { &*hop };
        if hop.key == scratch.key && hop.generation == generation && now < hop.expires_ns {
            return Ok(Hop::of(hop));
        }
    }
    lookup(ctx, scratch)?;
    let entry = &mut scratch.entry;
    entry.key = scratch.key;
    entry.generation = generation;
    entry.expires_ns = now.wrapping_add(FIB_ENTRY_LIFETIME_NS);
    if let Some(hop) = cached {
        // SAFETY: as above; the slot's previous key is forgotten.
        unsafe { *hop = scratch.entry };
    }
    Ok(Hop::of(&scratch.entry))
}

/// The kernel's FIB lookup for `scratch.key`, as the kernel would forward it, into
/// `scratch.entry`: egress, MACs, its zone, and the MTU it would allow (a successful lookup
/// reports it since Linux 5.12).
#[inline(always)]
fn lookup(ctx: &XdpContext, scratch: &mut FibScratch) -> Result<(), Counter> {
    let key = &scratch.key;
    let p = &mut scratch.params;
    let query = Query {
        family: key.family,
        proto: 0,
        src: &key.src,
        dst: &key.dst,
        ports: (0, 0),
        ifindex: key.ifindex,
    };
    match fib_lookup(ctx, p, &query, 0) {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_NO_NEIGH => return Err(Counter::PassFwdNoNeighbour),
        _ => return Err(Counter::PassFwdNoRoute),
    }
    let entry = &mut scratch.entry;
    // SAFETY: after a successful lookup the union holds the MTU (0: 65,536 truncated).
    entry.mtu = match unsafe { p.__bindgen_anon_1.mtu_result } {
        0 => MAX_IP_LEN,
        mtu => mtu,
    };
    entry.ifindex = p.ifindex;
    entry.smac = p.smac;
    entry.dmac = p.dmac;
    entry.zone = ZONES.get(p.ifindex).map_or(ZoneId::NONE, |b| b.zone);
    Ok(())
}

/// Rewrites the Ethernet addresses and decrements the TTL (IPv4, with the checksum updated
/// incrementally as RFC 1624 does) or the hop limit (IPv6).
#[inline(always)]
fn rewrite(ctx: &XdpContext, family: Family, hop: &Hop) -> Result<(), Counter> {
    let eth = frame_mut::<12>(ctx, 0).ok_or(Counter::PassFwdVlan)?;
    let [d0, d1, d2, d3, d4, d5] = hop.dmac;
    let [s0, s1, s2, s3, s4, s5] = hop.smac;
    // SAFETY: `frame_mut` checked the 12 bytes lie inside the frame.
    unsafe { *eth = [d0, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5] };
    match family {
        Family::V4 => {
            // TTL and protocol, then the header checksum: bytes 8..12 of the header.
            let h = frame_mut::<4>(ctx, IPV4_TTL_AT).ok_or(Counter::PassFwdVlan)?;
            // SAFETY: as above.
            let [ttl, proto, c0, c1] = unsafe { *h };
            // The 16-bit word (ttl, proto) drops by 0x0100: the one's-complement sum rises by
            // as much (the kernel's `ip_decrease_ttl`).
            let check = u32::from(u16::from_be_bytes([c0, c1])).wrapping_add(0x0100);
            let check = (check.wrapping_add(check >> 16) & 0xffff) as u16;
            let [c0, c1] = check.to_be_bytes();
            // SAFETY: as above.
            unsafe { *h = [ttl.wrapping_sub(1), proto, c0, c1] };
        }
        Family::V6 => {
            let h = frame_mut::<8>(ctx, ETH_HLEN).ok_or(Counter::PassFwdVlan)?;
            // SAFETY: as above.
            let mut h8 = unsafe { *h };
            h8[7] = h8[7].wrapping_sub(1);
            // SAFETY: as above.
            unsafe { *h = h8 };
        }
    }
    Ok(())
}
