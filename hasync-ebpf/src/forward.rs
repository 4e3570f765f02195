//! Forwarding in XDP: Layer 3 (`forwarding = "xdp"`: a FIB lookup cached per destination, MAC
//! rewrite, TTL or hop-limit decrement, DEVMAP redirect) and virtual wires (redirect to the
//! wire's other end). What the fast path should not decide goes to the kernel, counted.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_ANY, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use hasync_common::{
    flow::Family, Counter, Counters, DatapathConfig, FibEntry, FibKey, Forwarding, Session, State,
    ZoneBinding,
};

use crate::{
    maps::{FIB_CACHE, FIB_GENERATION, FWD_PORTS, VWIRE_PORTS, ZONES},
    parse::{frame_mut, raw32, ETH_HLEN, ETH_P_IP, ETH_P_IPV6},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// Offset of the IPv4 TTL in an untagged frame: what `ip_decrease_ttl` rewrites starts here.
const IPV4_TTL_AT: usize = 22;
/// The largest IP packet: the MTU asked of a lookup that should report the route's MTU.
const MAX_IP_LEN: u16 = u16::MAX;

/// What the forwarding reads of the IP header of an untagged frame.
struct Ip {
    family: Family,
    src: [u32; 4],
    dst: [u32; 4],
    /// The IP packet's length (IPv6: header included).
    len: u16,
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

/// The last step of every frame: on a virtual-wire end, what passes crosses to the other end
/// (non-IP frames too, unless the wire drops them); elsewhere `verdict` stands.
#[inline(always)]
pub fn wire(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    counters: &mut Counters,
    verdict: u32,
    non_ip: bool,
) -> u32 {
    if verdict != xdp_action::XDP_PASS {
        return verdict;
    }
    let Some(end) = wire_end(ctx, cfg) else {
        return verdict;
    };
    if non_ip && end.has(ZoneBinding::NON_IP_DROP) {
        counters.inc(Counter::DropVwireNonIp);
        return xdp_action::XDP_DROP;
    }
    // A wire end with no other end in the map (the agent is changing it) hands the frame to
    // the kernel, which has no address on a wire and drops what is not for it.
    match VWIRE_PORTS.redirect(ctx.ingress_ifindex() as u32, xdp_action::XDP_PASS as u64) {
        Ok(action) => {
            counters.inc(Counter::VwireForwarded);
            action
        }
        Err(action) => action,
    }
}

/// A packet of an owned session that the table accepted: forward it in XDP when the
/// configuration asks for it and nothing unusual is about it; else pass it to the kernel,
/// counted by reason.
#[inline(always)]
pub fn routed(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    counters: &mut Counters,
    s: &Session,
    fragment: bool,
) -> u32 {
    if cfg.forwarding != Forwarding::Xdp as u8 || wire_end(ctx, cfg).is_some() {
        return xdp_action::XDP_PASS;
    }
    match try_route(ctx, s, fragment) {
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
/// connection half-closed after its handshake still carries data; ICMP echoes stay with the
/// kernel.
#[inline(always)]
fn both_ways(s: &Session) -> bool {
    s.state == State::Established as u8
        || s.state == State::UdpReplied as u8
        || (s.state == State::Closing as u8 && s.handshake_completed())
}

#[inline(always)]
fn try_route(ctx: &XdpContext, s: &Session, fragment: bool) -> Result<u32, Counter> {
    if !both_ways(s) {
        return Err(Counter::PassFwdNotEstablished);
    }
    if fragment {
        return Err(Counter::PassFwdFragment);
    }
    let ip = ip_header(ctx)?;
    let ingress = ctx.ingress_ifindex() as u32;
    let hop = next_hop(ctx, &ip, ingress)?;
    if ip.len > hop.mtu {
        return Err(Counter::PassFwdMtu);
    }
    let action = FWD_PORTS
        .redirect(hop.ifindex, xdp_action::XDP_PASS as u64)
        .map_err(|_| Counter::PassFwdEgress)?;
    // The redirect happens after the program returns, so rewriting now is safe.
    rewrite(ctx, ip.family, &hop)?;
    Ok(action)
}

/// Reads the IP header of an untagged frame, refusing what the fast path leaves to the kernel.
#[inline(always)]
fn ip_header(ctx: &XdpContext) -> Result<Ip, Counter> {
    let eth = frame_mut::<ETH_HLEN>(ctx, 0).ok_or(Counter::PassFwdVlan)?;
    // SAFETY: `frame_mut` checked the bytes lie inside the frame.
    let eth = unsafe { *eth };
    match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => {
            let h = frame_mut::<20>(ctx, ETH_HLEN).ok_or(Counter::PassFwdVlan)?;
            // SAFETY: as above.
            let h = unsafe { *h };
            if h[0] != 0x45 {
                return Err(Counter::PassFwdIpOptions);
            }
            if h[8] <= 1 {
                return Err(Counter::PassFwdTtl);
            }
            Ok(Ip {
                family: Family::V4,
                src: [raw32(&h, 12), 0, 0, 0],
                dst: [raw32(&h, 16), 0, 0, 0],
                len: u16::from_be_bytes([h[2], h[3]]),
            })
        }
        ETH_P_IPV6 => {
            let h = frame_mut::<40>(ctx, ETH_HLEN).ok_or(Counter::PassFwdVlan)?;
            // SAFETY: as above.
            let h = unsafe { *h };
            if h[7] <= 1 {
                return Err(Counter::PassFwdTtl);
            }
            let word = |at: usize| raw32(&h, at);
            Ok(Ip {
                family: Family::V6,
                src: [word(8), word(12), word(16), word(20)],
                dst: [word(24), word(28), word(32), word(36)],
                len: u16::from_be_bytes([h[4], h[5]]).saturating_add(40),
            })
        }
        // 802.1Q / 802.1ad: the kernel owns the VLAN devices and their routes.
        _ => Err(Counter::PassFwdVlan),
    }
}

/// Where packets to `ip.dst` leave: the cached lookup while the FIB generation holds, else a
/// new lookup, cached.
#[inline(always)]
fn next_hop(ctx: &XdpContext, ip: &Ip, ingress: u32) -> Result<FibEntry, Counter> {
    let generation = FIB_GENERATION.get(0).copied().unwrap_or(0);
    let key = FibKey {
        dst: ip.dst,
        ifindex: ingress,
        family: ip.family as u8,
        _pad: [0; 3],
    };
    if let Some(hop) = FIB_CACHE.get_ptr(key) {
        // SAFETY: a map value stays valid while the program runs; a torn read of an entry
        // being replaced on another CPU is caught by its generation or by the next lookup.
        let hop = unsafe { *hop };
        if hop.generation == generation {
            return Ok(hop);
        }
    }
    let mut hop = lookup(ctx, ip, ingress)?;
    hop.generation = generation;
    // A full cache evicts its least recently used entry; an insert error only costs a lookup.
    let _ = FIB_CACHE.insert(key, hop, BPF_ANY as u64);
    Ok(hop)
}

/// The kernel's FIB lookup for `ip`, as the kernel would forward it: egress, MACs, and the
/// route's MTU (asked with a second lookup for the largest packet, which the kernel answers
/// with the MTU it would allow).
#[inline(always)]
fn lookup(ctx: &XdpContext, ip: &Ip, ingress: u32) -> Result<FibEntry, Counter> {
    let mut params = fib_params(ip, ingress, 0);
    match fib(ctx, &mut params) {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_NO_NEIGH => return Err(Counter::PassFwdNoNeighbour),
        _ => return Err(Counter::PassFwdNoRoute),
    }
    let mut probe = fib_params(ip, ingress, MAX_IP_LEN);
    let mtu = match fib(ctx, &mut probe) {
        // SAFETY: on FRAG_NEEDED the kernel wrote the MTU into the union.
        BPF_FIB_LKUP_RET_FRAG_NEEDED => unsafe { probe.__bindgen_anon_1.mtu_result },
        _ => MAX_IP_LEN,
    };
    Ok(FibEntry {
        generation: 0,
        ifindex: params.ifindex,
        mtu,
        smac: params.smac,
        dmac: params.dmac,
        _pad: [0; 2],
    })
}

#[inline(always)]
fn fib_params(ip: &Ip, ingress: u32, tot_len: u16) -> FibParams {
    // SAFETY: the struct is plain integers and unions of integers; all zero is valid.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.ifindex = ingress;
    p.__bindgen_anon_1.tot_len = tot_len;
    match ip.family {
        Family::V4 => {
            p.family = AF_INET;
            p.__bindgen_anon_3.ipv4_src = ip.src[0];
            p.__bindgen_anon_4.ipv4_dst = ip.dst[0];
        }
        Family::V6 => {
            p.family = AF_INET6;
            p.__bindgen_anon_3.ipv6_src = ip.src;
            p.__bindgen_anon_4.ipv6_dst = ip.dst;
        }
    }
    p
}

#[inline(always)]
fn fib(ctx: &XdpContext, params: &mut FibParams) -> u32 {
    // SAFETY: `params` is a valid, writable `bpf_fib_lookup` of the size passed; the helper
    // writes only inside it.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    rc as u32
}

/// Rewrites the Ethernet addresses and decrements the TTL (IPv4, with the checksum updated
/// incrementally as RFC 1624 does) or the hop limit (IPv6).
#[inline(always)]
fn rewrite(ctx: &XdpContext, family: Family, hop: &FibEntry) -> Result<(), Counter> {
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
