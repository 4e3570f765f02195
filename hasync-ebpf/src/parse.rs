//! Header parsing: Ethernet (up to two VLAN tags), IPv4 (any IHL, fragments), IPv6 (bounded
//! extension headers, fragments), TCP, UDP, ICMP/ICMPv6 (by kind: [`IcmpKind`]), and the
//! packet an ICMP/ICMPv6 error quotes. Every read goes through [`Frame::read`], the one
//! bounds-checked accessor.

use crate::maps::{ICMP_QUERY_TYPE, IPV4_OPTIONS};
use aya_ebpf::programs::XdpContext;
use hasync_common::{
    flow::{Family, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
    session::tcp,
    Counter, FlowKey, FragmentKey, TcpSegment,
};

pub(crate) const ETH_HLEN: usize = 14;
pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_RARP: u16 = 0x8035;
const ETH_P_LLDP: u16 = 0x88cc;
/// Slow protocols: LACP, marker, OAM.
const ETH_P_SLOW: u16 = 0x8809;
/// Below this the field is an 802.3 length, and an LLC header follows.
const ETH_P_802_3_MIN: u16 = 0x0600;
/// The LLC service access point of the spanning tree protocol.
const LLC_SAP_BSPAN: u8 = 0x42;
const ETH_P_8021AD: u16 = 0x88a8;
const IPV6_HLEN: usize = 40;
/// IPv6 extension headers walked before giving up (counted as malformed).
const IPV6_MAX_EXT: usize = 4;
/// The 4-byte words of IPv4 options an IHL can announce (15 words of header, 5 fixed).
const IPV4_MAX_OPTION_WORDS: usize = 10;
/// The buffer IPv4 options are copied to: a power of two of bytes, so that a mask bounds
/// the copy's length where the verifier can see it.
const OPTION_BUFFER_WORDS: usize = 16;
const _: () = assert!(OPTION_BUFFER_WORDS >= IPV4_MAX_OPTION_WORDS);

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

/// Bytes of an ICMP/ICMPv6 header before the quoted packet.
const ICMP_HLEN: usize = 8;
const TCP_HLEN: usize = 20;
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_WSCALE: u8 = 3;
/// TCP options walked looking for the window scale: more than any stack's SYN carries
/// (Linux sends five, Windows six with its NOPs), few enough for the verifier.
const TCP_MAX_OPTIONS: usize = 10;

/// A parsed, trackable packet.
pub struct Packet {
    pub key: FlowKey,
    /// The sender is the key's higher endpoint.
    pub src_is_hi: bool,
    /// TCP flags (0 for UDP/ICMP).
    pub tcp_flags: u8,
    /// What the window check reads of a TCP segment (zero for UDP/ICMP).
    pub tcp: TcpSegment,
    /// Frame length in bytes.
    pub len: u64,
    /// The identification of the datagram, when this is its first fragment: once the packet
    /// passes, its later fragments may follow.
    pub first_fragment: Option<FirstFragment>,
}

impl Packet {
    /// The extra counter the packet bumps: a first fragment's.
    #[inline(always)]
    pub fn note(&self) -> Option<Counter> {
        let v4 = self.key.family == Family::V4 as u8;
        let counter = if v4 {
            Counter::Ipv4FirstFragment
        } else {
            Counter::Ipv6Fragment
        };
        self.first_fragment.map(|_| counter)
    }
}

/// Is the packet of flow `key` an ICMP query's reply? Its type is in [`ICMP_QUERY_TYPE`],
/// which the parser wrote in this run.
#[inline(always)]
pub fn is_icmp_reply(key: &FlowKey) -> bool {
    let v6 = key.proto == IPPROTO_ICMPV6;
    (v6 || key.proto == IPPROTO_ICMP)
        && ICMP_QUERY_TYPE
            .get(0)
            .is_some_and(|&ty| icmp_kind(v6, ty) == IcmpKind::Reply)
}

/// What identifies a datagram of which a packet is the first fragment, beside its addresses.
#[derive(Clone, Copy)]
pub struct FirstFragment {
    /// The identification field.
    pub id: u32,
    /// The protocol its fragments carry: IPv4's protocol field, or the next header of the IPv6
    /// Fragment header (what later fragments say too, whatever headers follow it).
    pub proto: u8,
}

/// Outcome of parsing one frame.
pub enum Parsed {
    Track(Packet),
    /// A later fragment (no transport header) of the datagram `FragmentKey`; `note` is an extra
    /// counter to bump.
    LaterFragment(FragmentKey, Option<Counter>),
    /// An IP protocol the datapath does not track (neither TCP, UDP, ICMP nor ICMPv6), or an
    /// ICMP type it does not ([`IcmpKind::Other`]): its zone's rule decides. When it is a
    /// first fragment, its datagram, whose later fragments may follow if it passes.
    OtherProtocol(Option<FragmentKey>),
    /// An ICMP/ICMPv6 error: the key of the flow whose packet it quotes, and whether that
    /// packet's sender is the key's higher endpoint, when the packet could be read and the error
    /// travels back to its sender (else `None`: related to nothing).
    IcmpError(Option<(FlowKey, bool)>),
    /// Not trackable but legitimate: pass, counting the reason.
    Pass(Counter),
    /// Truncated or malformed: counted by reason, passed or dropped by policy.
    Malformed(Counter),
}

/// Bounds-checked view of the frame.
///
/// Each header is read once, as a whole, through [`Frame::read`] and then decoded from the
/// copy. Reading fields through separately computed pointers lets LLVM merge bounds checks in
/// ways the verifier cannot follow ("invalid access to packet").
struct Frame {
    start: usize,
    end: usize,
    /// The program's context, for the helpers that copy bytes out of the frame.
    ctx: *mut aya_ebpf::bindings::xdp_md,
}

impl Frame {
    /// The `N` bytes at `off`, or `None` when they would run past the frame.
    #[inline(always)]
    fn read<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let at = self.start.wrapping_add(off);
        if at.wrapping_add(N) > self.end {
            return None;
        }
        // SAFETY: the N bytes at `at` lie inside the frame (checked above); unaligned read
        // because headers are not aligned.
        Some(unsafe { core::ptr::read_unaligned(at as *const [u8; N]) })
    }

    #[inline(always)]
    fn len(&self) -> u64 {
        self.end.wrapping_sub(self.start) as u64
    }
}

/// The `N` bytes at `off` of the frame, writable, or `None` when they would run past it: the
/// forwarding's one accessor for the headers it rewrites.
#[inline(always)]
pub(crate) fn frame_mut<const N: usize>(ctx: &XdpContext, off: usize) -> Option<*mut [u8; N]> {
    let at = ctx.data().wrapping_add(off);
    if at.wrapping_add(N) > ctx.data_end() {
        return None;
    }
    Some(at as *mut [u8; N])
}

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    u16::from_be_bytes([b0, b1])
}

/// A 16-bit field kept in network byte order.
#[inline(always)]
fn raw16(b0: u8, b1: u8) -> u16 {
    u16::from_ne_bytes([b0, b1])
}

/// A 32-bit field kept in network byte order.
#[inline(always)]
pub(crate) fn raw32(b: &[u8], at: usize) -> u32 {
    match b.get(at..at.wrapping_add(4)) {
        Some(&[a, b, c, d]) => u32::from_ne_bytes([a, b, c, d]),
        _ => 0,
    }
}

/// Network-layer facts needed to finish the key.
struct L3 {
    family: Family,
    proto: u8,
    /// Offset of the IP header.
    ip: usize,
    src: [u32; 4],
    dst: [u32; 4],
    /// Offset of the transport header.
    l4: usize,
    /// End of the IP packet (from its length field); the transport header must fit before
    /// it: bytes past it are an Ethernet trailer the stack trims away.
    end: usize,
    /// Carried to [`Packet::first_fragment`].
    first_fragment: Option<FirstFragment>,
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let frame = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
        ctx: ctx.ctx,
    };
    let Some(eth) = frame.read::<ETH_HLEN>(0) else {
        return Parsed::Malformed(Counter::ErrEthTruncated);
    };
    let mut ethertype = be16(eth[12], eth[13]);
    let mut l3 = ETH_HLEN;
    // Up to two VLAN tags (802.1Q / 802.1ad QinQ); unrolled for the verifier.
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let Some(tag) = frame.read::<4>(l3) else {
            return Parsed::Malformed(Counter::ErrVlanTruncated);
        };
        ethertype = be16(tag[2], tag[3]);
        l3 = l3.wrapping_add(4);
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            let Some(tag) = frame.read::<4>(l3) else {
                return Parsed::Malformed(Counter::ErrVlanTruncated);
            };
            ethertype = be16(tag[2], tag[3]);
            l3 = l3.wrapping_add(4);
            if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
                return Parsed::Malformed(Counter::ErrVlanTooDeep);
            }
        }
    }
    let l3 = match ethertype {
        ETH_P_IP => parse_ipv4(&frame, l3),
        ETH_P_IPV6 => parse_ipv6(&frame, l3),
        other => return Parsed::Pass(link_layer(&frame, l3, other)),
    };
    match l3 {
        Ok(l3) => parse_l4(&frame, l3),
        Err(parsed) => parsed,
    }
}

/// Why a frame of ethertype `ethertype` (its payload at `at`) passes: one of the link layer's
/// own protocols, or another ethertype.
#[inline(always)]
fn link_layer(frame: &Frame, at: usize, ethertype: u16) -> Counter {
    match ethertype {
        ETH_P_ARP | ETH_P_RARP | ETH_P_LLDP | ETH_P_SLOW => Counter::PassNonIp,
        // An 802.3 length field: STP's LLC header has both service access points 0x42.
        len if len < ETH_P_802_3_MIN => match frame.read::<2>(at) {
            Some([LLC_SAP_BSPAN, LLC_SAP_BSPAN]) => Counter::PassNonIp,
            _ => Counter::PassOtherEthertype,
        },
        _ => Counter::PassOtherEthertype,
    }
}

/// Does the IPv4 header at `off`, `h` its first 20 bytes and `hlen` bytes long in all, carry
/// its checksum? The ones'-complement sum of its 16-bit words, the checksum among them, is
/// all ones. The kernel drops a packet whose header fails it before routing or connection
/// tracking see it (`ip_rcv`), so such a packet must not write a session either: a forged
/// RST or FIN that the endpoint never gets would close the flow here alone, and XDP
/// forwarding would carry what a router drops. Options (at most [`IPV4_MAX_OPTION_WORDS`]
/// words, what an IHL can announce) are copied out and summed with the rest; the caller
/// checked that the header lies inside the frame.
#[inline(always)]
fn ipv4_checksum_ok(frame: &Frame, off: usize, h: &[u8; 20], hlen: usize) -> bool {
    let mut sum = 0u32;
    for word in h.chunks_exact(2) {
        if let &[hi, lo] = word {
            sum = sum.wrapping_add(u32::from(be16(hi, lo)));
        }
    }
    if hlen == 20 {
        return fold_is_all_ones(sum);
    }
    // The options are copied out by the kernel (`bpf_xdp_load_bytes` checks the bounds at
    // run time): reads of the frame at offsets the IHL decides would each give the verifier
    // another view of the frame's checked length to carry through the rest of the program
    // (+120,000 instructions verified). Words past the options stay zero.
    // hlen - 20 for every IHL past 5, and 1 to 64 whatever the verifier knows of `hlen`: a
    // helper's size must be provably non-zero, and older verifiers (before 6.8) learn
    // nothing from a test against zero. Behind `black_box`, so LLVM, which knows as much
    // of `hlen` as this comment, does not fold the mask away.
    let len = (core::hint::black_box(hlen).wrapping_sub(21) & (OPTION_BUFFER_WORDS * 4 - 1))
        .wrapping_add(1);
    // Neither the buffer's lookup nor the copy fails for a header inside the frame; were
    // one to, the header would count as failing its checksum (not tracked).
    let Some(options) = IPV4_OPTIONS.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a per-CPU value, this run's alone; the kernel writes at most `len` bytes of
    // it, `OPTION_BUFFER_WORDS * 4` the most `len` can be.
    let options = unsafe {
        *options = [0; OPTION_BUFFER_WORDS];
        let copied = aya_ebpf::helpers::bpf_xdp_load_bytes(
            frame.ctx,
            off.wrapping_add(20) as u32,
            options.cast(),
            len as u32,
        );
        if copied != 0 {
            return false;
        }
        &*options
    };
    for &word in options {
        // As the frame has them: big-endian 16-bit words, like the header's above.
        let word = u32::from_be(word);
        sum = sum.wrapping_add(word >> 16).wrapping_add(word & 0xffff);
    }
    fold_is_all_ones(sum)
}

/// Is `sum`, a sum of at most 2^16 16-bit words, all ones once its carries are folded back in
/// (a correct Internet checksum)?
#[inline(always)]
fn fold_is_all_ones(sum: u32) -> bool {
    // Two folds carry everything back in.
    let sum = (sum & 0xffff).wrapping_add(sum >> 16);
    let sum = (sum & 0xffff).wrapping_add(sum >> 16);
    sum == 0xffff
}

#[inline(always)]
fn parse_ipv4(frame: &Frame, off: usize) -> Result<L3, Parsed> {
    let Some(h) = frame.read::<20>(off) else {
        return Err(Parsed::Malformed(Counter::ErrIpv4Truncated));
    };
    if h[0] >> 4 != 4 {
        return Err(Parsed::Malformed(Counter::ErrIpv4Version));
    }
    let hlen = ((h[0] & 0x0f) as usize).wrapping_mul(4);
    if hlen < 20 {
        return Err(Parsed::Malformed(Counter::ErrIpv4Ihl));
    }
    let total = be16(h[2], h[3]) as usize;
    if total < hlen || off.wrapping_add(total) as u64 > frame.len() {
        return Err(Parsed::Malformed(Counter::ErrIpv4TotalLen));
    }
    if !ipv4_checksum_ok(frame, off, &h, hlen) {
        return Err(Parsed::Malformed(Counter::ErrIpv4Checksum));
    }
    let frag = be16(h[6], h[7]);
    let src = [raw32(&h, 12), 0, 0, 0];
    let dst = [raw32(&h, 16), 0, 0, 0];
    let id = u32::from(raw16(h[4], h[5]));
    if frag & 0x1fff != 0 {
        // A later fragment: no transport header to read.
        return Err(Parsed::LaterFragment(
            fragment_key(Family::V4, h[9], src, dst, id),
            None,
        ));
    }
    let first_fragment = (frag & 0x2000 != 0).then_some(FirstFragment { id, proto: h[9] });
    Ok(L3 {
        family: Family::V4,
        proto: h[9],
        ip: off,
        src,
        dst,
        l4: off.wrapping_add(hlen),
        end: off.wrapping_add(total),
        first_fragment,
    })
}

#[inline(always)]
fn parse_ipv6(frame: &Frame, off: usize) -> Result<L3, Parsed> {
    let Some(h) = frame.read::<IPV6_HLEN>(off) else {
        return Err(Parsed::Malformed(Counter::ErrIpv6Truncated));
    };
    if h[0] >> 4 != 6 {
        return Err(Parsed::Malformed(Counter::ErrIpv6Version));
    }
    let end = off
        .wrapping_add(IPV6_HLEN)
        .wrapping_add(be16(h[4], h[5]) as usize);
    if end as u64 > frame.len() {
        return Err(Parsed::Malformed(Counter::ErrIpv6PayloadLen));
    }
    let mut next = h[6];
    let src = [raw32(&h, 8), raw32(&h, 12), raw32(&h, 16), raw32(&h, 20)];
    let dst = [raw32(&h, 24), raw32(&h, 28), raw32(&h, 32), raw32(&h, 36)];
    let mut l4 = off.wrapping_add(IPV6_HLEN);
    let mut first_fragment = None;
    let mut i = 0;
    while i < IPV6_MAX_EXT {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH => {
                let Some(e) = frame.read::<2>(l4) else {
                    return Err(Parsed::Malformed(Counter::ErrIpv6ExtTruncated));
                };
                // AH counts its length in 4-byte units minus 2; the others in 8-byte units
                // minus 1.
                let size = if next == NEXTHDR_AUTH {
                    (e[1] as usize).wrapping_add(2).wrapping_mul(4)
                } else {
                    (e[1] as usize).wrapping_add(1).wrapping_mul(8)
                };
                if l4.wrapping_add(size) > end {
                    return Err(Parsed::Malformed(Counter::ErrIpv6ExtTruncated));
                }
                next = e[0];
                l4 = l4.wrapping_add(size);
            }
            NEXTHDR_FRAGMENT => {
                let Some(e) = frame.read::<8>(l4) else {
                    return Err(Parsed::Malformed(Counter::ErrIpv6ExtTruncated));
                };
                if l4.wrapping_add(8) > end {
                    return Err(Parsed::Malformed(Counter::ErrIpv6ExtTruncated));
                }
                let id = raw32(&e, 4);
                if be16(e[2], e[3]) & 0xfff8 != 0 {
                    // A later fragment: no transport header to read.
                    let key = fragment_key(Family::V6, e[0], src, dst, id);
                    return Err(Parsed::LaterFragment(key, Some(Counter::Ipv6Fragment)));
                }
                first_fragment = Some(FirstFragment { id, proto: e[0] });
                next = e[0];
                l4 = l4.wrapping_add(8);
            }
            _ => {
                return Ok(L3 {
                    family: Family::V6,
                    proto: next,
                    ip: off,
                    src,
                    dst,
                    l4,
                    end,
                    first_fragment,
                })
            }
        }
        i = i.wrapping_add(1);
    }
    match next {
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT => {
            Err(Parsed::Malformed(Counter::ErrIpv6TooManyExt))
        }
        _ => Ok(L3 {
            family: Family::V6,
            proto: next,
            ip: off,
            src,
            dst,
            l4,
            end,
            first_fragment,
        }),
    }
}

/// Rejects flag combinations no legitimate stack sends (conntrack's `tcp_valid_flags` refuses
/// them too): SYN with FIN or RST, FIN with RST, and none of SYN, ACK and RST.
#[inline(always)]
fn tcp_flags_valid(f: u8) -> bool {
    let syn = f & tcp::SYN != 0;
    if syn && f & (tcp::FIN | tcp::RST) != 0 {
        return false;
    }
    if f & (tcp::FIN | tcp::RST) == tcp::FIN | tcp::RST {
        return false;
    }
    // Every segment carries at least one of SYN, ACK, RST (a "null" or FIN/URG/PSH-only
    // "xmas" segment is a scan).
    f & (tcp::SYN | tcp::ACK | tcp::RST) != 0
}

/// What an ICMP or ICMPv6 message is, by its type.
#[derive(Clone, Copy, PartialEq, Eq)]
enum IcmpKind {
    /// A query's request: echo, timestamp (ICMPv4), node information (ICMPv6), extended echo
    /// (RFC 8335). It opens a session, its identifier standing for both ports.
    Request,
    /// A query's reply: it needs its request's session when it is on its way through this
    /// member (see `session::miss`).
    Reply,
    /// An error, quoting the packet it answers: destination unreachable, source quench,
    /// redirect, time exceeded, parameter problem; in ICMPv6 every type below 128 (RFC 4443
    /// §2.1: the high bit clear), the four named ones and any other a sender may use.
    Error,
    /// A link-scope control message, for this host or its link: router discovery (ICMPv4);
    /// MLD, neighbour discovery, inverse neighbour discovery, SEND, multicast router discovery
    /// (ICMPv6). Not a session of its own; passed untracked when its TTL or hop limit is the
    /// one its protocol sends and its receivers require ([`link_scope_hops`]). (A TTL of 1 is
    /// never forwarded; Linux does forward ND messages with hop limit 255 addressed beyond the
    /// link.)
    LinkScope,
    /// Anything else (deprecated, unassigned, experimental, mobility types): not tracked, so
    /// the ingress zone's rule for untracked protocols decides.
    Other,
}

#[inline(always)]
fn icmp_kind(v6: bool, ty: u8) -> IcmpKind {
    if v6 {
        match ty {
            0..=127 => IcmpKind::Error,
            128 | 139 | 160 => IcmpKind::Request,
            129 | 140 | 161 => IcmpKind::Reply,
            130..=137 | 141..=143 | 148 | 149 | 151..=153 => IcmpKind::LinkScope,
            _ => IcmpKind::Other,
        }
    } else {
        // Information (15, 16) and address mask (17, 18) are deprecated (RFC 6918): Other.
        match ty {
            3 | 4 | 5 | 11 | 12 => IcmpKind::Error,
            8 | 13 | 42 => IcmpKind::Request,
            0 | 14 | 43 => IcmpKind::Reply,
            9 | 10 => IcmpKind::LinkScope,
            _ => IcmpKind::Other,
        }
    }
}

/// The TTL or hop limit of the IP header at `ip`, read again: carried from the IP header's
/// parse it would stay live through every packet's path (+160,000 instructions verified).
#[inline(always)]
fn hops(frame: &Frame, ip: usize, v6: bool) -> Option<u8> {
    let h = frame.read::<12>(ip)?;
    Some(if v6 { h[7] } else { h[8] })
}

/// The TTL or hop limit a link-scope message of type `ty` is sent with: 255 for neighbour
/// discovery, inverse neighbour discovery and SEND (RFC 4861, 3122, 3971: receivers discard
/// any other), 1 for MLD, multicast router discovery (RFC 3810, 4286) and ICMPv4 router
/// discovery (RFC 1256).
#[inline(always)]
fn link_scope_hops(v6: bool, ty: u8) -> u8 {
    if v6 && matches!(ty, 133..=137 | 141 | 142 | 148 | 149) {
        255
    } else {
        1
    }
}

#[inline(always)]
fn parse_l4(frame: &Frame, l3: L3) -> Parsed {
    let L3 {
        family,
        proto,
        ip,
        src,
        dst,
        l4,
        end,
        first_fragment,
    } = l3;
    let mut segment = TcpSegment::default();
    // Not tracked (another protocol, an ICMP type of no session's): the zone's rule decides; a
    // first fragment's datagram may follow if it passes.
    let untracked = || {
        Parsed::OtherProtocol(first_fragment.map(|f| fragment_key(family, f.proto, src, dst, f.id)))
    };
    let (sport, dport, flags) = match proto {
        IPPROTO_TCP => {
            let Some(h) = frame.read::<TCP_HLEN>(l4) else {
                return Parsed::Malformed(Counter::ErrTcpTruncated);
            };
            if l4.wrapping_add(TCP_HLEN) > end {
                return Parsed::Malformed(Counter::ErrTcpTruncated);
            }
            let doff = ((h[12] >> 4) as usize).wrapping_mul(4);
            if doff < TCP_HLEN || l4.wrapping_add(doff) > end {
                return Parsed::Malformed(Counter::ErrTcpDataOffset);
            }
            if !tcp_flags_valid(h[13]) {
                return Parsed::Malformed(Counter::ErrTcpFlags);
            }
            segment = tcp_segment(frame, &h, l4, doff, end);
            (raw16(h[0], h[1]), raw16(h[2], h[3]), h[13])
        }
        IPPROTO_UDP => {
            let Some(h) = frame.read::<8>(l4) else {
                return Parsed::Malformed(Counter::ErrUdpTruncated);
            };
            if l4.wrapping_add(8) > end {
                return Parsed::Malformed(Counter::ErrUdpTruncated);
            }
            // The length covers the whole datagram: past a fragment's end is expected there.
            let len = usize::from(be16(h[4], h[5]));
            if len < 8 || (first_fragment.is_none() && l4.wrapping_add(len) > end) {
                return Parsed::Malformed(Counter::ErrUdpLength);
            }
            (raw16(h[0], h[1]), raw16(h[2], h[3]), 0)
        }
        // ICMP only over IPv4 and ICMPv6 only over IPv6: the other pairing is a protocol
        // like any unknown one (no stack sends it), not an echo or a neighbour discovery.
        IPPROTO_ICMP | IPPROTO_ICMPV6 if (proto == IPPROTO_ICMPV6) == (family == Family::V6) => {
            let Some(h) = frame.read::<8>(l4) else {
                return Parsed::Malformed(Counter::ErrIcmpTruncated);
            };
            if l4.wrapping_add(8) > end {
                return Parsed::Malformed(Counter::ErrIcmpTruncated);
            }
            let v6 = proto == IPPROTO_ICMPV6;
            match icmp_kind(v6, h[0]) {
                IcmpKind::Error => {
                    let quoted = l4.wrapping_add(ICMP_HLEN);
                    return Parsed::IcmpError(quoted_flow(frame, family, dst, quoted));
                }
                IcmpKind::LinkScope if hops(frame, ip, v6) == Some(link_scope_hops(v6, h[0])) => {
                    return Parsed::Pass(Counter::PassUntracked)
                }
                IcmpKind::LinkScope | IcmpKind::Other => return untracked(),
                IcmpKind::Request | IcmpKind::Reply => {
                    if let Some(ty) = ICMP_QUERY_TYPE.get_ptr_mut(0) {
                        // SAFETY: this CPU's value, valid for the program's run, which alone
                        // uses it.
                        unsafe { *ty = h[0] };
                    }
                }
            }
            // The query's identifier stands for both ports.
            let id = raw16(h[4], h[5]);
            (id, id, 0)
        }
        _ => return untracked(),
    };
    let (key, src_is_hi) = FlowKey::canonical(family, proto, src, sport, dst, dport);
    Parsed::Track(Packet {
        key,
        src_is_hi,
        tcp_flags: flags,
        tcp: segment,
        len: frame.len(),
        first_fragment,
    })
}

/// The sequence numbers, window and payload length of the TCP header `h` at `l4` (`doff`
/// bytes long, checked to end by `end`), and a SYN's window scale.
#[inline(always)]
fn tcp_segment(
    frame: &Frame,
    h: &[u8; TCP_HLEN],
    l4: usize,
    doff: usize,
    end: usize,
) -> TcpSegment {
    let be32 = |at: usize| u32::from_be(raw32(h, at));
    let wscale = if h[13] & tcp::SYN != 0 {
        wscale_option(frame, l4, doff)
    } else {
        None
    };
    TcpSegment {
        seq: be32(4),
        ack: be32(8),
        window: be16(h[14], h[15]),
        len: end.wrapping_sub(l4).wrapping_sub(doff) as u32,
        wscale,
    }
}

/// The shift of the window scale option among the TCP options at `l4 + 20 .. l4 + doff`, if
/// any, whole inside them. A bounded walk: the verifier follows each step. Every step reads three bytes (an
/// option's kind, length and, for the window scale, shift) in one read: fewer than three
/// left cannot hold the option anyway, and reads of one byte at a variable offset compile to a
/// bounds check the verifier does not accept (`at >= end`).
#[inline(always)]
fn wscale_option(frame: &Frame, l4: usize, doff: usize) -> Option<u8> {
    let mut off = TCP_HLEN;
    for _ in 0..TCP_MAX_OPTIONS {
        if off >= doff {
            return None;
        }
        let [kind, len, shift] = frame.read::<3>(l4.wrapping_add(off))?;
        match kind {
            TCPOPT_EOL => return None,
            TCPOPT_NOP => off = off.wrapping_add(1),
            // Inside the header only (the endpoint ignores an option cut by the data offset;
            // its shift would come from the payload).
            TCPOPT_WSCALE if len == 3 => return (off.wrapping_add(3) <= doff).then_some(shift),
            _ if len < 2 => return None,
            _ => off = off.wrapping_add(len as usize),
        }
    }
    None
}

/// The key of the flow whose packet an ICMP error quotes at `at`, and whether that packet's
/// sender is the key's higher endpoint, if the quoted IP header and the 8 bytes after it can be
/// read, are not a later fragment nor an ICMP message other than an echo's, and the error goes
/// back to that packet's sender (`outer_dst`). A protocol no session tracks (ESP, GRE, ...)
/// gets a key of its addresses alone, ports 0: asked about only as this host's own.
#[inline(always)]
fn quoted_flow(
    frame: &Frame,
    family: Family,
    outer_dst: [u32; 4],
    at: usize,
) -> Option<(FlowKey, bool)> {
    let (proto, src, dst, l4) = match family {
        Family::V4 => {
            let h = frame.read::<20>(at)?;
            let hlen = ((h[0] & 0x0f) as usize).wrapping_mul(4);
            let later_fragment = be16(h[6], h[7]) & 0x1fff != 0;
            if h[0] >> 4 != 4 || hlen < 20 || later_fragment {
                return None;
            }
            let src = [raw32(&h, 12), 0, 0, 0];
            (h[9], src, [raw32(&h, 16), 0, 0, 0], at.wrapping_add(hlen))
        }
        Family::V6 => {
            let h = frame.read::<IPV6_HLEN>(at)?;
            if h[0] >> 4 != 6 {
                return None;
            }
            let src = [raw32(&h, 8), raw32(&h, 12), raw32(&h, 16), raw32(&h, 20)];
            let dst = [raw32(&h, 24), raw32(&h, 28), raw32(&h, 32), raw32(&h, 36)];
            let (proto, l4) = quoted_v6_fragment(frame, h[6], at.wrapping_add(IPV6_HLEN))?;
            (proto, src, dst, l4)
        }
    };
    if src != outer_dst {
        return None;
    }
    let q = frame.read::<8>(l4)?;
    let (sport, dport) = match proto {
        IPPROTO_TCP | IPPROTO_UDP => (raw16(q[0], q[1]), raw16(q[2], q[3])),
        IPPROTO_ICMP | IPPROTO_ICMPV6
            if (proto == IPPROTO_ICMPV6) == (family == Family::V6)
                && matches!(
                    icmp_kind(proto == IPPROTO_ICMPV6, q[0]),
                    IcmpKind::Request | IcmpKind::Reply
                ) =>
        {
            (raw16(q[4], q[5]), raw16(q[4], q[5]))
        }
        // No session has such a key (ESP, GRE, ...: the addresses alone): it is asked about
        // only as this host's own (a tunnel it terminates needs its path-MTU errors).
        IPPROTO_ICMP | IPPROTO_ICMPV6 => return None,
        _ => (0, 0),
    };
    Some(FlowKey::canonical(family, proto, src, sport, dst, dport))
}

/// The protocol and the offset of the transport header of a quoted IPv6 packet whose header
/// names `next` at `at`: past a fragment header, when the packet is a first fragment (a
/// source-fragmented datagram's, whose path-MTU error quotes it so). A later fragment, and
/// other extension headers, are not walked: the fragment header's own protocol then names
/// no session, and the error is asked about only as this host's own, as before.
#[inline(always)]
fn quoted_v6_fragment(frame: &Frame, next: u8, at: usize) -> Option<(u8, usize)> {
    if next != NEXTHDR_FRAGMENT {
        return Some((next, at));
    }
    let f = frame.read::<8>(at)?;
    if be16(f[2], f[3]) & 0xfff8 != 0 {
        return Some((next, at));
    }
    Some((f[0], at.wrapping_add(8)))
}

#[inline(always)]
fn fragment_key(family: Family, proto: u8, src: [u32; 4], dst: [u32; 4], id: u32) -> FragmentKey {
    FragmentKey {
        src,
        dst,
        id,
        proto,
        family: family as u8,
        _pad: [0; 2],
    }
}

/// The datagram `pkt` is the first fragment of.
#[inline(always)]
pub fn first_fragment_key(pkt: &Packet, first: FirstFragment) -> FragmentKey {
    let k = &pkt.key;
    let (src, dst) = if pkt.src_is_hi {
        (k.addr_hi, k.addr_lo)
    } else {
        (k.addr_lo, k.addr_hi)
    };
    let family = if k.family == Family::V6 as u8 {
        Family::V6
    } else {
        Family::V4
    };
    fragment_key(family, first.proto, src, dst, first.id)
}
