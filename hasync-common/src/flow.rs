//! The flow key: a canonical 5-tuple, lower endpoint first, so both directions of a flow find
//! the same session.

/// Address family of a flow key.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4 = 4,
    /// IPv6.
    V6 = 6,
}

/// IP protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IP protocol number of ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;

/// Canonical flow key. Addresses are kept as the packet carries them (network byte order);
/// an IPv4 address uses `addr[0]` and leaves the other words zero. Ports are in network byte
/// order; for ICMP/ICMPv6 echo both ports hold the echo identifier.
///
/// "Lower" is decided on (address, port) compared numerically, so userspace and the XDP program
/// compute the same key with [`FlowKey::canonical`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FlowKey {
    /// Address of the lower endpoint, network byte order.
    pub addr_lo: [u32; 4],
    /// Address of the higher endpoint, network byte order.
    pub addr_hi: [u32; 4],
    /// Port of the lower endpoint, network byte order.
    pub port_lo: u16,
    /// Port of the higher endpoint, network byte order.
    pub port_hi: u16,
    /// IP protocol number (`IPPROTO_*`).
    pub proto: u8,
    /// 4 or 6 (see [`Family`]).
    pub family: u8,
    /// Padding; zero.
    pub _pad: [u8; 2],
}
crate::assert_size!(FlowKey, 40);

/// Key of the FRAGMENTS map: one fragmented datagram (source, destination, identification and
/// protocol, as IPv4 and IPv6 reassembly match fragments). Later fragments carry no ports, so
/// they pass only when their datagram's first fragment did.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FragmentKey {
    /// Source address, network byte order.
    pub src: [u32; 4],
    /// Destination address, network byte order.
    pub dst: [u32; 4],
    /// Identification (IPv4: 16 bits), as on the wire.
    pub id: u32,
    /// IP protocol number of the payload.
    pub proto: u8,
    /// 4 or 6 (see [`Family`]).
    pub family: u8,
    /// Padding; zero.
    pub _pad: [u8; 2],
}
crate::assert_size!(FragmentKey, 40);

/// Numeric comparison of two addresses held in network byte order: is `a` lower than `b`, or
/// equal?
#[inline(always)]
fn cmp_addr(a: &[u32; 4], b: &[u32; 4]) -> core::cmp::Ordering {
    // Unrolled on purpose: a fixed sequence of four compares keeps the verifier's job trivial.
    let (a0, b0) = (u32::from_be(a[0]), u32::from_be(b[0]));
    if a0 != b0 {
        return if a0 < b0 {
            core::cmp::Ordering::Less
        } else {
            core::cmp::Ordering::Greater
        };
    }
    let (a1, b1) = (u32::from_be(a[1]), u32::from_be(b[1]));
    if a1 != b1 {
        return if a1 < b1 {
            core::cmp::Ordering::Less
        } else {
            core::cmp::Ordering::Greater
        };
    }
    let (a2, b2) = (u32::from_be(a[2]), u32::from_be(b[2]));
    if a2 != b2 {
        return if a2 < b2 {
            core::cmp::Ordering::Less
        } else {
            core::cmp::Ordering::Greater
        };
    }
    let (a3, b3) = (u32::from_be(a[3]), u32::from_be(b[3]));
    if a3 != b3 {
        return if a3 < b3 {
            core::cmp::Ordering::Less
        } else {
            core::cmp::Ordering::Greater
        };
    }
    core::cmp::Ordering::Equal
}

impl FlowKey {
    /// Builds the canonical key of a packet going `src:sport → dst:dport`, and tells whether the
    /// sender is the higher endpoint (`true`) or the lower one.
    #[inline(always)]
    pub fn canonical(
        family: Family,
        proto: u8,
        src: [u32; 4],
        sport: u16,
        dst: [u32; 4],
        dport: u16,
    ) -> (FlowKey, bool) {
        let src_is_hi = match cmp_addr(&src, &dst) {
            core::cmp::Ordering::Less => false,
            core::cmp::Ordering::Greater => true,
            core::cmp::Ordering::Equal => u16::from_be(sport) > u16::from_be(dport),
        };
        let key = if src_is_hi {
            FlowKey {
                addr_lo: dst,
                addr_hi: src,
                port_lo: dport,
                port_hi: sport,
                proto,
                family: family as u8,
                _pad: [0; 2],
            }
        } else {
            FlowKey {
                addr_lo: src,
                addr_hi: dst,
                port_lo: sport,
                port_hi: dport,
                proto,
                family: family as u8,
                _pad: [0; 2],
            }
        };
        (key, src_is_hi)
    }
}

/// The name operators use for an IP protocol the datapath tracks, if it is one.
pub const fn proto_name(proto: u8) -> Option<&'static str> {
    match proto {
        IPPROTO_TCP => Some("tcp"),
        IPPROTO_UDP => Some("udp"),
        IPPROTO_ICMP => Some("icmp"),
        IPPROTO_ICMPV6 => Some("icmpv6"),
        _ => None,
    }
}

/// An address word array (network byte order in memory) as an IP address of `family`.
fn ip_of(family: u8, words: &[u32; 4]) -> core::net::IpAddr {
    if family == Family::V6 as u8 {
        let mut bytes = [0u8; 16];
        for (chunk, word) in bytes.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        core::net::IpAddr::V6(core::net::Ipv6Addr::from(bytes))
    } else {
        core::net::IpAddr::V4(core::net::Ipv4Addr::from(words[0].to_ne_bytes()))
    }
}

impl FlowKey {
    /// Could the XDP program have made this key? A protocol it tracks, of its family (TCP,
    /// UDP; ICMP over IPv4, ICMPv6 over IPv6), an IPv4 address in its first word only, the
    /// identifier in both ports for ICMP, the lower endpoint first, the padding zero. A peer's
    /// record with any other key names no flow: it could only take room in the table.
    pub fn is_trackable(&self) -> bool {
        let family = match self.family {
            4 => Family::V4,
            6 => Family::V6,
            _ => return false,
        };
        let icmp = matches!(self.proto, IPPROTO_ICMP | IPPROTO_ICMPV6);
        let proto_fits = match self.proto {
            IPPROTO_TCP | IPPROTO_UDP => true,
            IPPROTO_ICMP => family == Family::V4,
            IPPROTO_ICMPV6 => family == Family::V6,
            _ => false,
        };
        let words_fit = |a: &[u32; 4]| family == Family::V6 || a[1..] == [0; 3];
        let (lo, hi) = (self.addr_lo, self.addr_hi);
        let (canonical, _) =
            FlowKey::canonical(family, self.proto, lo, self.port_lo, hi, self.port_hi);
        proto_fits
            && words_fit(&lo)
            && words_fit(&hi)
            && (!icmp || self.port_lo == self.port_hi)
            && canonical == *self
    }

    /// The lower endpoint's address.
    pub fn ip_lo(&self) -> core::net::IpAddr {
        ip_of(self.family, &self.addr_lo)
    }

    /// The higher endpoint's address.
    pub fn ip_hi(&self) -> core::net::IpAddr {
        ip_of(self.family, &self.addr_hi)
    }
}

/// `proto lo-addr:port <-> hi-addr:port` (ICMP: `icmp lo <-> hi id N`), for logs.
impl core::fmt::Display for FlowKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match proto_name(self.proto) {
            Some(name) => write!(f, "{name} ")?,
            None => write!(f, "proto-{} ", self.proto)?,
        }
        let addr = |f: &mut core::fmt::Formatter<'_>, ip: core::net::IpAddr| match ip {
            core::net::IpAddr::V6(v6) => write!(f, "[{v6}]"),
            core::net::IpAddr::V4(v4) => write!(f, "{v4}"),
        };
        if self.proto == IPPROTO_ICMP || self.proto == IPPROTO_ICMPV6 {
            // Both "ports" hold the echo identifier.
            addr(f, self.ip_lo())?;
            f.write_str(" <-> ")?;
            addr(f, self.ip_hi())?;
            return write!(f, " id {}", u16::from_be(self.port_lo));
        }
        addr(f, self.ip_lo())?;
        write!(f, ":{} <-> ", u16::from_be(self.port_lo))?;
        addr(f, self.ip_hi())?;
        write!(f, ":{}", u16::from_be(self.port_hi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> [u32; 4] {
        [u32::from_ne_bytes(a), 0, 0, 0]
    }

    #[test]
    fn both_directions_share_one_key() {
        let a = v4([198, 18, 0, 10]);
        let b = v4([198, 18, 1, 10]);
        let (k1, hi1) = FlowKey::canonical(
            Family::V4,
            IPPROTO_TCP,
            a,
            40000u16.to_be(),
            b,
            80u16.to_be(),
        );
        let (k2, hi2) = FlowKey::canonical(
            Family::V4,
            IPPROTO_TCP,
            b,
            80u16.to_be(),
            a,
            40000u16.to_be(),
        );
        assert_eq!(k1, k2);
        assert!(!hi1);
        assert!(hi2);
        assert_eq!(k1.addr_lo, a);
        assert_eq!(u16::from_be(k1.port_lo), 40000);
    }

    #[test]
    fn order_is_numeric_not_bytewise_native() {
        // 198.18.0.255 < 198.18.1.0 numerically, although the little-endian u32 of the
        // first is larger.
        let a = v4([198, 18, 0, 255]);
        let b = v4([198, 18, 1, 0]);
        let (k, src_is_hi) =
            FlowKey::canonical(Family::V4, IPPROTO_UDP, b, 1u16.to_be(), a, 2u16.to_be());
        assert!(src_is_hi);
        assert_eq!(k.addr_lo, a);
    }

    #[test]
    fn flows_print_as_operators_read_them() {
        extern crate std;
        use std::string::ToString;
        let (key, _) = FlowKey::canonical(
            Family::V4,
            IPPROTO_UDP,
            v4([198, 18, 0, 1]),
            40000u16.to_be(),
            v4([198, 18, 1, 1]),
            53u16.to_be(),
        );
        assert_eq!(key.to_string(), "udp 198.18.0.1:40000 <-> 198.18.1.1:53");
        let v6 = |last: u8| {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
            b[15] = last;
            let mut w = [0u32; 4];
            for (w, c) in w.iter_mut().zip(b.chunks_exact(4)) {
                *w = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            }
            w
        };
        let (key, _) = FlowKey::canonical(
            Family::V6,
            IPPROTO_TCP,
            v6(2),
            443u16.to_be(),
            v6(1),
            50000u16.to_be(),
        );
        assert_eq!(
            key.to_string(),
            "tcp [2001:db8::1]:50000 <-> [2001:db8::2]:443"
        );
        let (key, _) = FlowKey::canonical(
            Family::V4,
            IPPROTO_ICMP,
            v4([198, 18, 0, 1]),
            7u16.to_be(),
            v4([198, 18, 1, 1]),
            7u16.to_be(),
        );
        assert_eq!(key.to_string(), "icmp 198.18.0.1 <-> 198.18.1.1 id 7");
    }

    #[test]
    fn same_address_orders_by_port() {
        let a = v4([198, 18, 0, 1]);
        let (k, src_is_hi) = FlowKey::canonical(
            Family::V4,
            IPPROTO_UDP,
            a,
            9000u16.to_be(),
            a,
            53u16.to_be(),
        );
        assert!(src_is_hi);
        assert_eq!(u16::from_be(k.port_lo), 53);
    }
}
