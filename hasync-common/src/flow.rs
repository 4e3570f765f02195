//! The flow key: a canonical 5-tuple, lower endpoint first, so both directions of a flow find
//! the same session.

/// Address family of a flow key.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4 = 4,
    V6 = 6,
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Canonical flow key. Addresses are kept as the packet carries them (network byte order);
/// an IPv4 address uses `addr[0]` and leaves the other words zero. Ports are in network byte
/// order; for ICMP/ICMPv6 echo both ports hold the echo identifier.
///
/// "Lower" is decided on (address, port) compared numerically, so userspace and the XDP program
/// compute the same key with [`FlowKey::canonical`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub addr_lo: [u32; 4],
    pub addr_hi: [u32; 4],
    pub port_lo: u16,
    pub port_hi: u16,
    pub proto: u8,
    /// 4 or 6 (see [`Family`]).
    pub family: u8,
    pub _pad: [u8; 2],
}
crate::assert_size!(FlowKey, 40);

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
