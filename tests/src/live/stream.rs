//! What the generator sends: a 64-byte UDP frame template and the fields it varies per flow.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::frame::Frame;

/// Bytes per frame (the generator's template size).
pub const FRAME_LEN: usize = 64;
/// Flow `i` uses port `BASE_PORT + i % 2^14` and address `base + i / 2^14` (as the program).
pub const PORT_BITS: u32 = 14;
pub const BASE_PORT: u16 = 10_000;
/// The receiver's port.
pub const DST_PORT: u16 = 9;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// The first generator host; flow `i` uses this + `i / 2^14` in the last 16 bits.
    pub fn gen_host(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(198, 18, 0, 10).into(),
            Family::V6 => Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 10).into(),
        }
    }

    /// The receiver: behind the member (routed), or in the generator's subnet.
    pub fn recv_host(self, bridged: bool) -> IpAddr {
        match (self, bridged) {
            (Family::V4, false) => Ipv4Addr::new(198, 18, 1, 2).into(),
            (Family::V4, true) => Ipv4Addr::new(198, 18, 0, 200).into(),
            (Family::V6, false) => Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 2).into(),
            (Family::V6, true) => Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x200).into(),
        }
    }

    /// The `n`th generator host.
    pub fn nth_gen_host(self, n: u16) -> IpAddr {
        match self.gen_host() {
            IpAddr::V4(a) => Ipv4Addr::from(u32::from(a) + u32::from(n)).into(),
            IpAddr::V6(a) => Ipv6Addr::from(u128::from(a) + u128::from(n)).into(),
        }
    }
}

/// Generator hosts `flows` flows need.
pub fn hosts(flows: u32) -> u16 {
    u16::try_from(flows.div_ceil(1 << PORT_BITS)).unwrap_or(u16::MAX)
}

/// What a generator sends: the frame template and the values of its GEN_PARAMS slots.
pub struct Stream {
    pub template: [u8; FRAME_LEN],
    /// flows, address word, port, IPv4 header checksum, transport checksum (offsets; 0 none).
    pub params: [u32; 5],
}

/// Whether a stream goes gen → recv (varying its source) or back (varying its destination).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Original,
    Reply,
}

/// The stream of `flows` UDP flows of `family` between the gen hosts and recv, in `dir`,
/// with the given Ethernet addresses (destination, source).
pub fn stream(
    family: Family,
    bridged: bool,
    dir: Direction,
    macs: [[u8; 6]; 2],
    flows: u32,
) -> Stream {
    let gen = SocketAddr::new(family.gen_host(), BASE_PORT);
    let recv = SocketAddr::new(family.recv_host(bridged), DST_PORT);
    let (src, dst) = match dir {
        Direction::Original => (gen, recv),
        Direction::Reply => (recv, gen),
    };
    let (bare, _) = Frame::udp(src, dst).build_with_layout();
    let (bytes, layout) = Frame::udp(src, dst)
        .payload(FRAME_LEN - bare.len())
        .build_with_layout();
    let mut template = [0u8; FRAME_LEN];
    template.copy_from_slice(&bytes);
    template[..6].copy_from_slice(&macs[0]);
    template[6..12].copy_from_slice(&macs[1]);
    let (l3, l4) = (layout.l3 as u32, layout.l4 as u32);
    // The last 16 bits of the source or destination address, the port, the checksums.
    let (addr, port) = match (family, dir) {
        (Family::V4, Direction::Original) => (l3 + 14, l4),
        (Family::V4, Direction::Reply) => (l3 + 18, l4 + 2),
        (Family::V6, Direction::Original) => (l3 + 22, l4),
        (Family::V6, Direction::Reply) => (l3 + 38, l4 + 2),
    };
    let ip_csum = if family == Family::V4 { l3 + 10 } else { 0 };
    Stream {
        template,
        params: [flows, addr, port, ip_csum, l4 + 6],
    }
}

/// `1k`, `1m`, or the number.
pub fn size_label(flows: u32) -> String {
    match flows {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}m", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}
