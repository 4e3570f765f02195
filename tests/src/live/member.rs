//! A namespace set up as a forwarding member between the generator (behind `in0`) and the
//! receiver (behind `out0`).

use anyhow::Result;

use super::stream::{hosts, Family};
use crate::netns::Netns;

/// Forwarding on, reverse-path filtering off, and the addresses of `in0` (198.18.0.1,
/// fd00:18::1) and `out0` (198.18.1.1, fd00:18:1::1). Every member of a bench gets the same:
/// each sits on its own links, so the generator and the receiver see one gateway whichever
/// member they are cabled to.
pub fn configure(m: &Netns) -> Result<()> {
    for (key, value) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        ("net.ipv6.conf.all.forwarding", "1"),
    ] {
        m.sysctl(key, value)?;
    }
    for (ifname, v4, v6) in [
        ("in0", "198.18.0.1/24", "fd00:18::1/64"),
        ("out0", "198.18.1.1/24", "fd00:18:1::1/64"),
    ] {
        m.addr(ifname, v4)?;
        m.addr(ifname, v6)?;
        m.sysctl(&format!("net.ipv4.conf.{ifname}.rp_filter"), "0")?;
    }
    Ok(())
}

/// Static neighbours on member `m`, both families: recv (at `recv_mac`) behind out0, and the
/// generator hosts that `flows` flows use (at `gen_mac`) behind in0.
pub fn add_neighbours(m: &Netns, gen_mac: [u8; 6], recv_mac: [u8; 6], flows: u32) -> Result<()> {
    let (gen_mac, recv_mac) = (mac_text(gen_mac), mac_text(recv_mac));
    for family in Family::ALL {
        permanent_neighbour(m, &family.recv_host(false).to_string(), &recv_mac, "out0")?;
        for n in 0..hosts(flows) {
            permanent_neighbour(m, &family.nth_gen_host(n).to_string(), &gen_mac, "in0")?;
        }
    }
    Ok(())
}

fn permanent_neighbour(m: &Netns, addr: &str, mac: &str, dev: &str) -> Result<()> {
    m.ip(&[
        "neigh",
        "replace",
        addr,
        "lladdr",
        mac,
        "dev",
        dev,
        "nud",
        "permanent",
    ])
    .map(drop)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
