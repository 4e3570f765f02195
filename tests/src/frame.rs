//! A small Ethernet frame builder for fixtures: `Frame::tcp(a, b).syn().vlan(10).build()`.
//!
//! Frames are correct unless damaged on purpose: lengths are right and checksums (IPv4 header,
//! TCP, UDP, ICMP/ICMPv6) are filled in, so a built packet can also be sent for real. The XDP
//! program checks the IPv4 header's checksum (options included), no other. Damage
//! is applied after the frame is laid out, by field (`.ihl(3)`, `.tcp_doff(4)`, ...) or by
//! byte, and leaves checksums as they were; `.ipv4_field` changes a byte of the IPv4 header
//! and its checksum with it (another valid header).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hasync_common::{
    flow::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
    session::tcp,
    Family, FlowKey,
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_GRE: u8 = 47;
pub const IPPROTO_ESP: u8 = 50;
pub const IPPROTO_SCTP: u8 = 132;

const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// An IPv6 extension header, inserted in the order the builder calls add them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv6Ext {
    HopByHop,
    Routing,
    DestOpts,
    /// Authentication header (its length counts 4-byte units, unlike the others).
    Auth,
    /// Fragment header of a first fragment: offset 0, more fragments.
    FragmentFirst,
    /// Fragment header of a later fragment: offset 1448, more fragments.
    FragmentLater,
}

impl Ipv6Ext {
    pub const fn next_header(self) -> u8 {
        match self {
            Ipv6Ext::HopByHop => 0,
            Ipv6Ext::Routing => 43,
            Ipv6Ext::FragmentFirst | Ipv6Ext::FragmentLater => 44,
            Ipv6Ext::Auth => 51,
            Ipv6Ext::DestOpts => 60,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum L4 {
    Tcp(TcpFields),
    Udp,
    Icmp { ty: u8, code: u8, id: u16 },
    Other(u8),
    Arp,
}

/// The TCP header fields a fixture may set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TcpFields {
    flags: u8,
    seq: u32,
    /// `None`: 2000 when the ACK flag is set, else 0.
    ack: Option<u32>,
    window: u16,
    /// A window scale option (shift), written after a NOP.
    wscale: Option<u8>,
}

/// A damage applied to the laid-out frame.
#[derive(Clone, Debug)]
enum Damage {
    Byte {
        off: usize,
        value: u8,
    },
    /// Byte relative to the network header.
    L3Byte {
        off: usize,
        value: u8,
    },
    /// Byte relative to the transport header.
    L4Byte {
        off: usize,
        value: u8,
    },
    /// Byte of the IPv4 header, its checksum computed again.
    Ipv4Field {
        off: usize,
        value: u8,
    },
    /// The IPv4 header checksum one off.
    Ipv4ChecksumOff,
    Ihl(u8),
    IpVersion(u8),
    TotalLen(u16),
    TcpDoff(u8),
}

/// Where the layers of a built frame start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub l3: usize,
    pub l4: usize,
    pub len: usize,
}

/// A frame under construction. See the module docs.
#[derive(Clone, Debug)]
pub struct Frame {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    l4: L4,
    vlans: Vec<u16>,
    payload: usize,
    /// Payload bytes instead of `payload` filler (an ICMP error's offending packet).
    embedded: Option<Vec<u8>>,
    ipv4_options: usize,
    ipv4_fragment: Option<(u16, bool)>,
    ipv6_exts: Vec<(Ipv6Ext, u8)>,
    l4_keep: Option<usize>,
    l4_outside: bool,
    pad_to: Option<usize>,
    damage: Vec<Damage>,
    truncate: Option<usize>,
    /// TTL / hop limit; `None`: what a stack sends ([`Frame::default_hops`]).
    hops: Option<u8>,
}

impl Frame {
    fn new(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, l4: L4) -> Self {
        assert_eq!(
            src.is_ipv4(),
            dst.is_ipv4(),
            "frame endpoints {src} and {dst} are of different families"
        );
        Frame {
            src,
            dst,
            sport,
            dport,
            l4,
            vlans: Vec::new(),
            payload: 0,
            embedded: None,
            ipv4_options: 0,
            ipv4_fragment: None,
            ipv6_exts: Vec::new(),
            l4_keep: None,
            l4_outside: false,
            pad_to: None,
            damage: Vec::new(),
            truncate: None,
            hops: None,
        }
    }

    /// Sets the TTL (IPv4) or hop limit (IPv6).
    pub fn hops(mut self, n: u8) -> Self {
        self.hops = Some(n);
        self
    }

    /// The TTL or hop limit stacks send the frame with: 255 for neighbour discovery, inverse
    /// neighbour discovery and SEND, 1 for MLD, multicast and ICMPv4 router discovery, 64
    /// otherwise.
    fn default_hops(&self) -> u8 {
        match (self.is_ipv4(), &self.l4) {
            (
                false,
                L4::Icmp {
                    ty: 133..=137 | 141 | 142 | 148 | 149,
                    ..
                },
            ) => 255,
            (
                false,
                L4::Icmp {
                    ty: 130..=132 | 143 | 151..=153,
                    ..
                },
            ) => 1,
            (true, L4::Icmp { ty: 9 | 10, .. }) => 1,
            _ => 64,
        }
    }

    /// A TCP segment `a → b`, flags ACK until told otherwise.
    pub fn tcp(a: SocketAddr, b: SocketAddr) -> Self {
        Self::new(
            a.ip(),
            b.ip(),
            a.port(),
            b.port(),
            L4::Tcp(TcpFields {
                flags: tcp::ACK,
                seq: 1000,
                ack: None,
                window: 65535,
                wscale: None,
            }),
        )
    }

    /// A UDP datagram `a → b`.
    pub fn udp(a: SocketAddr, b: SocketAddr) -> Self {
        Self::new(a.ip(), b.ip(), a.port(), b.port(), L4::Udp)
    }

    /// An ICMP (IPv4) or ICMPv6 (IPv6) echo request or reply `a → b` with identifier `id`.
    pub fn icmp_echo(a: IpAddr, b: IpAddr, id: u16, request: bool) -> Self {
        let ty = match (a.is_ipv4(), request) {
            (true, true) => 8,
            (true, false) => 0,
            (false, true) => 128,
            (false, false) => 129,
        };
        Self::icmp_query(a, b, ty, id)
    }

    /// An ICMP/ICMPv6 query message `a → b` of type `ty` (a timestamp request, ...) with
    /// identifier `id`.
    pub fn icmp_query(a: IpAddr, b: IpAddr, ty: u8, id: u16) -> Self {
        Self::new(a, b, id, id, L4::Icmp { ty, code: 0, id })
    }

    /// Any ICMP/ICMPv6 message `a → b` (errors, neighbour discovery, ...), 8-byte header
    /// (identifier field zero).
    pub fn icmp(a: IpAddr, b: IpAddr, ty: u8, code: u8) -> Self {
        Self::new(a, b, 0, 0, L4::Icmp { ty, code, id: 0 })
    }

    /// An ICMP/ICMPv6 error `a → b` (type `ty`, code `code`) quoting `offending` as routers do:
    /// its IP header and the first 8 bytes of what follows.
    pub fn icmp_error(a: IpAddr, b: IpAddr, ty: u8, code: u8, offending: &Frame) -> Self {
        let (bytes, layout) = offending.build_with_layout();
        let end = (layout.l4 + 8).min(bytes.len());
        let mut f = Self::icmp(a, b, ty, code);
        f.embedded = Some(bytes[layout.l3..end].to_vec());
        f
    }

    /// An IP packet `a → b` of protocol `proto` with an 8-byte opaque header.
    pub fn other_proto(a: IpAddr, b: IpAddr, proto: u8) -> Self {
        Self::new(a, b, 0, 0, L4::Other(proto))
    }

    /// An ARP request (not IP).
    pub fn arp() -> Self {
        let a = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
        let b = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
        Self::new(a, b, 0, 0, L4::Arp)
    }

    /// Changes the TCP header fields.
    fn tcp_fields(mut self, f: impl FnOnce(&mut TcpFields)) -> Self {
        match &mut self.l4 {
            L4::Tcp(t) => f(t),
            other => panic!("TCP fields on a non-TCP frame ({other:?})"),
        }
        self
    }

    fn set_tcp_flags(self, flags: u8) -> Self {
        self.tcp_fields(|t| t.flags = flags)
    }

    /// The sequence number (default 1000, whichever the direction).
    pub fn seq(self, seq: u32) -> Self {
        self.tcp_fields(|t| t.seq = seq)
    }

    /// The acknowledgment number (default 2000 when the ACK flag is set, else 0).
    pub fn ack_number(self, ack: u32) -> Self {
        self.tcp_fields(|t| t.ack = Some(ack))
    }

    /// The window field (default 65535).
    pub fn window(self, window: u16) -> Self {
        self.tcp_fields(|t| t.window = window)
    }

    /// A window scale option with `shift` (RFC 7323), as SYNs carry it.
    pub fn wscale(self, shift: u8) -> Self {
        self.tcp_fields(|t| t.wscale = Some(shift))
    }

    pub fn syn(self) -> Self {
        self.set_tcp_flags(tcp::SYN)
    }

    pub fn syn_ack(self) -> Self {
        self.set_tcp_flags(tcp::SYN | tcp::ACK)
    }

    pub fn ack(self) -> Self {
        self.set_tcp_flags(tcp::ACK)
    }

    /// FIN with ACK, as every stack sends it.
    pub fn fin(self) -> Self {
        self.set_tcp_flags(tcp::FIN | tcp::ACK)
    }

    pub fn rst(self) -> Self {
        self.set_tcp_flags(tcp::RST)
    }

    /// Exactly these TCP flags.
    pub fn flags(self, flags: u8) -> Self {
        self.set_tcp_flags(flags)
    }

    /// `n` bytes of transport payload.
    pub fn payload(mut self, n: usize) -> Self {
        self.payload = n;
        self
    }

    /// Adds a VLAN tag; the first call is the outer tag. With two or more tags the outer one is
    /// 802.1ad (0x88a8), the inner ones 802.1Q (0x8100).
    pub fn vlan(mut self, id: u16) -> Self {
        self.vlans.push(id & 0x0fff);
        self
    }

    /// `n` bytes of IPv4 options (NOPs); a multiple of 4, at most 40.
    pub fn ipv4_options(mut self, n: usize) -> Self {
        assert!(self.src.is_ipv4(), "IPv4 options on an IPv6 frame");
        assert!(
            n.is_multiple_of(4) && n <= 40,
            "IPv4 options of {n} bytes: must be a multiple of 4, ≤ 40"
        );
        self.ipv4_options = n;
        self
    }

    /// Makes this an IPv4 fragment at byte `offset` (a multiple of 8) with the MF bit `more`.
    pub fn ipv4_fragment(mut self, offset: u16, more: bool) -> Self {
        assert!(self.src.is_ipv4(), "IPv4 fragment on an IPv6 frame");
        assert!(
            offset.is_multiple_of(8),
            "fragment offset {offset} is not a multiple of 8"
        );
        self.ipv4_fragment = Some((offset, more));
        self
    }

    /// Appends an IPv6 extension header of the smallest size (8 bytes; 24 for AH).
    pub fn ipv6_ext(self, kind: Ipv6Ext) -> Self {
        let len = if kind == Ipv6Ext::Auth { 4 } else { 0 };
        self.ipv6_ext_len(kind, len)
    }

    /// Appends an IPv6 extension header whose length field is `len` (8-byte units beyond the
    /// first 8 bytes; for AH, 4-byte units minus 2). Ignored for fragment headers (always 8).
    pub fn ipv6_ext_len(mut self, kind: Ipv6Ext, len: u8) -> Self {
        assert!(self.src.is_ipv6(), "IPv6 extension header on an IPv4 frame");
        self.ipv6_exts.push((kind, len));
        self
    }

    // ----- damage -----

    /// Cuts the transport header (and payload) to its first `n` bytes, keeping the IP length
    /// fields consistent: a well-formed IP packet carrying a truncated transport header.
    pub fn truncate_l4(mut self, n: usize) -> Self {
        self.l4_keep = Some(n);
        self
    }

    /// Leaves the transport header (and payload) out of the IP length fields: it follows the
    /// IP packet as an Ethernet trailer, which the stack trims away.
    pub fn transport_past_ip_length(mut self) -> Self {
        self.l4_outside = true;
        self
    }

    /// Appends zero bytes after the IP packet (Ethernet padding) up to `len` bytes of frame.
    pub fn pad_to(mut self, len: usize) -> Self {
        self.pad_to = Some(len);
        self
    }

    /// Cuts the built frame to `n` bytes, lengths left as they were.
    pub fn truncate_to(mut self, n: usize) -> Self {
        self.truncate = Some(n);
        self
    }

    /// Overwrites frame byte `off`.
    pub fn set_byte(mut self, off: usize, value: u8) -> Self {
        self.damage.push(Damage::Byte { off, value });
        self
    }

    /// Overwrites byte `off` of the network header.
    pub fn set_l3_byte(mut self, off: usize, value: u8) -> Self {
        self.damage.push(Damage::L3Byte { off, value });
        self
    }

    /// Overwrites byte `off` of the transport header.
    pub fn set_l4_byte(mut self, off: usize, value: u8) -> Self {
        self.damage.push(Damage::L4Byte { off, value });
        self
    }

    /// Overwrites byte `off` of the IPv4 header and computes its checksum again: a valid
    /// header with another protocol, identification, TTL, ...
    pub fn ipv4_field(mut self, off: usize, value: u8) -> Self {
        self.damage.push(Damage::Ipv4Field { off, value });
        self
    }

    /// Makes the IPv4 header checksum wrong (one off), nothing else moves.
    pub fn bad_ipv4_checksum(mut self) -> Self {
        self.damage.push(Damage::Ipv4ChecksumOff);
        self
    }

    /// Sets the IPv4 IHL field (4-byte units), nothing else moves.
    pub fn ihl(mut self, n: u8) -> Self {
        self.damage.push(Damage::Ihl(n));
        self
    }

    /// Sets the IP version nibble.
    pub fn ip_version(mut self, n: u8) -> Self {
        self.damage.push(Damage::IpVersion(n));
        self
    }

    /// Sets the IPv4 total length (IPv6: payload length) field.
    pub fn total_len(mut self, n: u16) -> Self {
        self.damage.push(Damage::TotalLen(n));
        self
    }

    /// Sets the TCP data offset field (4-byte units).
    pub fn tcp_doff(mut self, n: u8) -> Self {
        self.damage.push(Damage::TcpDoff(n));
        self
    }

    // ----- reading -----

    pub fn is_ipv4(&self) -> bool {
        self.src.is_ipv4()
    }

    /// The IP protocol of the transport header (`None` for ARP).
    pub fn proto(&self) -> Option<u8> {
        Some(match self.l4 {
            L4::Tcp(_) => IPPROTO_TCP,
            L4::Udp => IPPROTO_UDP,
            L4::Icmp { .. } if self.is_ipv4() => IPPROTO_ICMP,
            L4::Icmp { .. } => IPPROTO_ICMPV6,
            L4::Other(p) => p,
            L4::Arp => return None,
        })
    }

    /// TCP flags of the segment (0 for other protocols).
    pub fn tcp_flags(&self) -> u8 {
        match self.l4 {
            L4::Tcp(t) => t.flags,
            _ => 0,
        }
    }

    /// The canonical session key of this frame, and whether the sender is the higher endpoint.
    pub fn key_and_side(&self) -> (FlowKey, bool) {
        let proto = self.proto().expect("an ARP frame has no flow key");
        let (family, src, dst) = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => (Family::V4, v4_words(s), v4_words(d)),
            (IpAddr::V6(s), IpAddr::V6(d)) => (Family::V6, v6_words(s), v6_words(d)),
            _ => unreachable!("checked in Frame::new"),
        };
        FlowKey::canonical(
            family,
            proto,
            src,
            self.sport.to_be(),
            dst,
            self.dport.to_be(),
        )
    }

    /// The canonical session key of this frame.
    pub fn key(&self) -> FlowKey {
        self.key_and_side().0
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        self.build_with_layout().0
    }

    /// The frame's bytes and where its layers start.
    pub fn build_with_layout(&self) -> (Vec<u8>, Layout) {
        let mut l4 = self.transport();
        if let Some(n) = self.l4_keep {
            l4.truncate(n);
        }
        self.fill_transport_checksum(&mut l4);
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&DST_MAC);
        out.extend_from_slice(&SRC_MAC);
        for (i, id) in self.vlans.iter().enumerate() {
            let tpid = if i == 0 && self.vlans.len() > 1 {
                ETH_P_8021AD
            } else {
                ETH_P_8021Q
            };
            out.extend_from_slice(&tpid.to_be_bytes());
            out.extend_from_slice(&id.to_be_bytes());
        }
        let ethertype = match (&self.l4, self.src) {
            (L4::Arp, _) => ETH_P_ARP,
            (_, IpAddr::V4(_)) => ETH_P_IP,
            (_, IpAddr::V6(_)) => ETH_P_IPV6,
        };
        out.extend_from_slice(&ethertype.to_be_bytes());
        let l3 = out.len();
        let ip_l4_len = if self.l4_outside { 0 } else { l4.len() };
        match (&self.l4, self.src, self.dst) {
            (L4::Arp, _, _) => out.extend_from_slice(&arp_request()),
            (_, IpAddr::V4(s), IpAddr::V4(d)) => self.ipv4_header(&mut out, s, d, ip_l4_len),
            (_, IpAddr::V6(s), IpAddr::V6(d)) => self.ipv6_headers(&mut out, s, d, ip_l4_len),
            _ => unreachable!("checked in Frame::new"),
        }
        let l4_off = out.len();
        if self.l4 != L4::Arp {
            out.extend_from_slice(&l4);
        }
        if let Some(n) = self.pad_to {
            if out.len() < n {
                out.resize(n, 0);
            }
        }
        for d in &self.damage {
            match *d {
                Damage::Byte { off, value } => edit(&mut out, off, |_| value),
                Damage::L3Byte { off, value } => edit(&mut out, l3 + off, |_| value),
                Damage::L4Byte { off, value } => edit(&mut out, l4_off + off, |_| value),
                Damage::Ipv4Field { off, value } => {
                    edit(&mut out, l3 + off, |_| value);
                    refill_ipv4_checksum(&mut out, l3);
                }
                Damage::Ipv4ChecksumOff => edit(&mut out, l3 + 11, |b| b.wrapping_add(1)),
                Damage::Ihl(n) => edit(&mut out, l3, |b| (b & 0xf0) | (n & 0x0f)),
                Damage::IpVersion(n) => edit(&mut out, l3, |b| (b & 0x0f) | (n << 4)),
                Damage::TotalLen(n) => {
                    let at = if self.is_ipv4() { l3 + 2 } else { l3 + 4 };
                    out[at..at + 2].copy_from_slice(&n.to_be_bytes());
                }
                Damage::TcpDoff(n) => edit(&mut out, l4_off + 12, |b| (b & 0x0f) | (n << 4)),
            }
        }
        if let Some(n) = self.truncate {
            out.truncate(n);
        }
        let len = out.len();
        (
            out,
            Layout {
                l3,
                l4: l4_off,
                len,
            },
        )
    }

    /// Transport header and payload.
    fn transport(&self) -> Vec<u8> {
        let payload = (0..self.payload).map(|i| (i % 251) as u8);
        let mut h = Vec::new();
        match self.l4 {
            L4::Tcp(t) => {
                h.extend_from_slice(&self.sport.to_be_bytes());
                h.extend_from_slice(&self.dport.to_be_bytes());
                h.extend_from_slice(&t.seq.to_be_bytes());
                let default_ack = if t.flags & tcp::ACK != 0 { 2000 } else { 0 };
                h.extend_from_slice(&t.ack.unwrap_or(default_ack).to_be_bytes());
                // Data offset: 5 words, one more for a NOP and the window scale option.
                h.push(if t.wscale.is_some() { 6 << 4 } else { 5 << 4 });
                h.push(t.flags);
                h.extend_from_slice(&t.window.to_be_bytes());
                h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                if let Some(shift) = t.wscale {
                    h.extend_from_slice(&[1, 3, 3, shift]);
                }
            }
            L4::Udp => {
                h.extend_from_slice(&self.sport.to_be_bytes());
                h.extend_from_slice(&self.dport.to_be_bytes());
                h.extend_from_slice(&((8 + self.payload) as u16).to_be_bytes());
                h.extend_from_slice(&[0, 0]); // checksum
            }
            L4::Icmp { ty, code, id } => {
                h.extend_from_slice(&[ty, code, 0, 0]);
                h.extend_from_slice(&id.to_be_bytes());
                h.extend_from_slice(&1u16.to_be_bytes()); // sequence
            }
            L4::Other(_) => h.extend_from_slice(&[0; 8]),
            L4::Arp => {}
        }
        match &self.embedded {
            Some(bytes) => h.extend_from_slice(bytes),
            None => h.extend(payload),
        }
        h
    }

    /// Fills the TCP/UDP/ICMP checksum of `l4` (when its header is complete), so a frame sent
    /// for real is accepted by the receiving stack.
    fn fill_transport_checksum(&self, l4: &mut [u8]) {
        let Some(proto) = self.proto() else {
            return;
        };
        let at = match self.l4 {
            L4::Tcp(_) if l4.len() >= 20 => 16,
            L4::Udp if l4.len() >= 8 => 6,
            L4::Icmp { .. } if l4.len() >= 8 => 2,
            _ => return,
        };
        let mut data = Vec::with_capacity(40 + l4.len());
        match (self.src, self.dst, &self.l4) {
            // ICMPv4 has no pseudo-header.
            (IpAddr::V4(_), _, L4::Icmp { .. }) => {}
            (IpAddr::V4(s), IpAddr::V4(d), _) => {
                data.extend_from_slice(&s.octets());
                data.extend_from_slice(&d.octets());
                data.extend_from_slice(&[0, proto]);
                data.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d), _) => {
                data.extend_from_slice(&s.octets());
                data.extend_from_slice(&d.octets());
                data.extend_from_slice(&(l4.len() as u32).to_be_bytes());
                data.extend_from_slice(&[0, 0, 0, proto]);
            }
            _ => return,
        }
        data.extend_from_slice(l4);
        let mut sum = checksum(&data);
        if sum == 0 && proto == IPPROTO_UDP {
            sum = 0xffff;
        }
        l4[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }

    fn ipv4_header(&self, out: &mut Vec<u8>, src: Ipv4Addr, dst: Ipv4Addr, l4_len: usize) {
        let start = out.len();
        let hlen = 20 + self.ipv4_options;
        out.push(0x40 | (hlen / 4) as u8);
        out.push(0); // DSCP/ECN
        out.extend_from_slice(&((hlen + l4_len) as u16).to_be_bytes());
        out.extend_from_slice(&0x1234u16.to_be_bytes()); // identification
        let frag = match self.ipv4_fragment {
            Some((offset, more)) => (offset / 8) | if more { 0x2000 } else { 0 },
            None => 0x4000, // DF
        };
        out.extend_from_slice(&frag.to_be_bytes());
        out.push(self.hops.unwrap_or(self.default_hops())); // TTL
        out.push(self.proto().expect("IPv4 frame has a protocol"));
        out.extend_from_slice(&[0, 0]); // checksum, below
        out.extend_from_slice(&src.octets());
        out.extend_from_slice(&dst.octets());
        out.extend(std::iter::repeat_n(1u8, self.ipv4_options)); // NOP options
        refill_ipv4_checksum(out, start);
    }

    fn ipv6_headers(&self, out: &mut Vec<u8>, src: Ipv6Addr, dst: Ipv6Addr, l4_len: usize) {
        let proto = self.proto().expect("IPv6 frame has a protocol");
        let mut exts = Vec::new();
        for (i, &(kind, len)) in self.ipv6_exts.iter().enumerate() {
            let next = match self.ipv6_exts.get(i + 1) {
                Some(&(k, _)) => k.next_header(),
                None => proto,
            };
            match kind {
                Ipv6Ext::FragmentFirst | Ipv6Ext::FragmentLater => {
                    let offset: u16 = if kind == Ipv6Ext::FragmentFirst {
                        0
                    } else {
                        1448
                    };
                    exts.extend_from_slice(&[next, 0]);
                    exts.extend_from_slice(&(offset | 1).to_be_bytes()); // offset, M = 1
                    exts.extend_from_slice(&0xabcd_0001u32.to_be_bytes()); // identification
                }
                Ipv6Ext::Auth => {
                    let size = (len as usize + 2) * 4;
                    exts.extend_from_slice(&[next, len, 0, 0]);
                    exts.extend(std::iter::repeat_n(0u8, size - 4));
                }
                Ipv6Ext::HopByHop | Ipv6Ext::Routing | Ipv6Ext::DestOpts => {
                    let size = (len as usize + 1) * 8;
                    // Routing: type 0, segments left 0; options: Pad1s. Zeros either way.
                    exts.extend_from_slice(&[next, len]);
                    exts.extend(std::iter::repeat_n(0u8, size - 2));
                }
            }
        }
        let first = match self.ipv6_exts.first() {
            Some(&(k, _)) => k.next_header(),
            None => proto,
        };
        out.extend_from_slice(&[0x60, 0, 0, 0]); // version, traffic class, flow label
        out.extend_from_slice(&((exts.len() + l4_len) as u16).to_be_bytes());
        out.push(first);
        out.push(self.hops.unwrap_or(self.default_hops())); // hop limit
        out.extend_from_slice(&src.octets());
        out.extend_from_slice(&dst.octets());
        out.extend_from_slice(&exts);
    }
}

/// The session key of `frame`.
pub fn key_of(frame: &Frame) -> FlowKey {
    frame.key()
}

/// Rewrites byte `off` of `out` through `f`.
fn edit(out: &mut [u8], off: usize, f: impl FnOnce(u8) -> u8) {
    let len = out.len();
    let b = out
        .get_mut(off)
        .unwrap_or_else(|| panic!("damage at byte {off} of a {len}-byte frame"));
    *b = f(*b);
}

fn v4_words(a: Ipv4Addr) -> [u32; 4] {
    [u32::from_ne_bytes(a.octets()), 0, 0, 0]
}

fn v6_words(a: Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

fn arp_request() -> [u8; 28] {
    let mut a = [0u8; 28];
    a[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    a[2..4].copy_from_slice(&ETH_P_IP.to_be_bytes());
    a[4] = 6;
    a[5] = 4;
    a[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    a[8..14].copy_from_slice(&SRC_MAC);
    a[14..18].copy_from_slice(&[198, 18, 0, 1]);
    a[24..28].copy_from_slice(&[198, 18, 0, 2]);
    a
}

/// Computes the IPv4 header checksum of `frame` again where it carries one (behind at most
/// two VLAN tags, version 4, at least 20 bytes, inside the frame); anything else is left as
/// it is.
pub fn refill_frame_ipv4_checksum(frame: &mut [u8]) {
    let mut at = 12;
    for _ in 0..3 {
        let ethertype = frame
            .get(at..at + 2)
            .map(|t| u16::from_be_bytes([t[0], t[1]]));
        match ethertype {
            Some(ETH_P_8021Q | ETH_P_8021AD) => at += 4,
            Some(ETH_P_IP) => {
                if frame.get(at + 2).is_some_and(|b| b >> 4 == 4) {
                    refill_ipv4_checksum(frame, at + 2);
                }
                return;
            }
            _ => return,
        }
    }
}

/// Computes the checksum of the IPv4 header at `l3` of `out` again (a header cut off is left
/// as it is).
fn refill_ipv4_checksum(out: &mut [u8], l3: usize) {
    let hlen = out.get(l3).map_or(0, |b| usize::from(b & 0x0f) * 4);
    let Some(header) = out.get_mut(l3..l3 + hlen).filter(|h| h.len() >= 20) else {
        return;
    };
    header[10..12].fill(0);
    let csum = checksum(header);
    header[10..12].copy_from_slice(&csum.to_be_bytes());
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_tcp_lengths_and_checksum() {
        let f = Frame::tcp(sa("198.18.0.10:40000"), sa("198.18.1.20:80"))
            .syn()
            .payload(5);
        let (b, l) = f.build_with_layout();
        assert_eq!(
            l,
            Layout {
                l3: 14,
                l4: 34,
                len: 14 + 20 + 20 + 5
            }
        );
        assert_eq!(&b[12..14], &[0x08, 0x00]);
        assert_eq!(b[14], 0x45);
        assert_eq!(u16::from_be_bytes([b[16], b[17]]), 45);
        assert_eq!(checksum(&b[14..34]), 0, "IPv4 header checksum verifies");
        assert_eq!(b[34 + 13], tcp::SYN);
        assert_eq!(u16::from_be_bytes([b[34], b[35]]), 40000);
    }

    #[test]
    fn transport_checksums_verify() {
        for f in [
            Frame::tcp(sa("198.18.0.10:1"), sa("198.18.1.20:2")).payload(7),
            Frame::udp(sa("[fd00::1]:53"), sa("[fd00::2]:5353")).payload(3),
        ] {
            let (b, l) = f.build_with_layout();
            let l4 = &b[l.l4..];
            let mut pseudo = Vec::new();
            if f.is_ipv4() {
                pseudo.extend_from_slice(&b[l.l3 + 12..l.l3 + 20]);
                pseudo.extend_from_slice(&[0, f.proto().unwrap()]);
                pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            } else {
                pseudo.extend_from_slice(&b[l.l3 + 8..l.l3 + 40]);
                pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, f.proto().unwrap()]);
            }
            pseudo.extend_from_slice(l4);
            assert_eq!(checksum(&pseudo), 0, "{f:?}");
        }
        let (b, l) = Frame::icmp_echo(
            "198.18.0.1".parse().unwrap(),
            "198.18.0.2".parse().unwrap(),
            1,
            true,
        )
        .build_with_layout();
        assert_eq!(checksum(&b[l.l4..]), 0);
    }

    #[test]
    fn qinq_tags_and_ipv4_options() {
        let f = Frame::udp(sa("198.18.0.10:5000"), sa("198.18.1.20:53"))
            .vlan(10)
            .vlan(20)
            .ipv4_options(8);
        let (b, l) = f.build_with_layout();
        assert_eq!(&b[12..14], &ETH_P_8021AD.to_be_bytes());
        assert_eq!(&b[16..18], &ETH_P_8021Q.to_be_bytes());
        assert_eq!(&b[20..22], &ETH_P_IP.to_be_bytes());
        assert_eq!(l.l3, 22);
        assert_eq!(b[22], 0x47);
        assert_eq!(l.l4, 22 + 28);
        assert_eq!(u16::from_be_bytes([b[l.l4 + 4], b[l.l4 + 5]]), 8);
    }

    #[test]
    fn ipv6_extension_chain() {
        let f = Frame::tcp(sa("[fd00::1]:1000"), sa("[fd00::2]:443"))
            .ipv6_ext(Ipv6Ext::HopByHop)
            .ipv6_ext(Ipv6Ext::Auth)
            .ipv6_ext(Ipv6Ext::FragmentFirst);
        let (b, l) = f.build_with_layout();
        assert_eq!(b[14 + 6], 0, "first next header: hop-by-hop");
        assert_eq!(b[54], 51, "hop-by-hop → AH");
        assert_eq!(b[62], 44, "AH → fragment");
        assert_eq!(b[62 + 24], IPPROTO_TCP, "fragment → TCP");
        assert_eq!(l.l4, 54 + 8 + 24 + 8);
        assert_eq!(u16::from_be_bytes([b[18], b[19]]) as usize, l.len - 54);
    }

    #[test]
    fn truncated_transport_keeps_ip_lengths_consistent() {
        let f = Frame::tcp(sa("198.18.0.10:1"), sa("198.18.1.20:2")).truncate_l4(19);
        let (b, l) = f.build_with_layout();
        assert_eq!(l.len, 14 + 20 + 19);
        assert_eq!(u16::from_be_bytes([b[16], b[17]]), 39);
    }

    #[test]
    fn keys_are_canonical() {
        let a = sa("198.18.1.20:80");
        let b = sa("198.18.0.10:40000");
        let (k1, hi1) = Frame::tcp(a, b).key_and_side();
        let (k2, hi2) = Frame::tcp(b, a).key_and_side();
        assert_eq!(k1, k2);
        assert!(hi1 && !hi2);
        let ping = Frame::icmp_echo(a.ip(), b.ip(), 7, true).key();
        assert_eq!((ping.port_lo, ping.port_hi), (7u16.to_be(), 7u16.to_be()));
    }
}
