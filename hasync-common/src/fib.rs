//! The forwarding cache of the XDP program (`Forwarding::Xdp`): what a FIB lookup found for a
//! source and destination coming in on an interface. An entry holds while the agent's FIB
//! generation (bumped on route, rule, neighbour, address and link changes) has not moved and
//! for at most [`FIB_ENTRY_LIFETIME_NS`], so it stays right when the agent is not there to
//! bump. Node-local: never synced; a member that takes a session over fills its own.
//!
//! The cache is a per-CPU array, direct-mapped: a key lives in the slot [`slot`] names, an
//! index computed from its words, read and written in place (no hash-table walk, no lock; a
//! CPU reads only the entries it wrote, so never a half-written one: this relies, as the
//! program's per-CPU scratch slot does, on two runs of the XDP program not interleaving on one
//! CPU; the agent reads slots only for diagnostics). Two keys that share a slot take turns:
//! each miss costs one `bpf_fib_lookup`, never a wrong answer.

use crate::{ids::ZoneId, maps::FIB_CACHE_SLOTS};

/// The longest an entry is used without a new lookup.
pub const FIB_ENTRY_LIFETIME_NS: u64 = 2_000_000_000;

/// The key of FIB_CACHE. The source is part of it because the lookup uses it (policy routing,
/// multipath hashing on addresses).
#[repr(C)]
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    bytemuck::Pod,
    bytemuck::Zeroable,
)]
pub struct FibKey {
    /// Destination address in network byte order (IPv4: first word, the rest zero).
    pub dst: [u32; 4],
    /// Source address, the same way; zero when nothing here routes by source
    /// (`DatapathConfig::fib_by_source`).
    pub src: [u32; 4],
    /// The interface the packets come in on (the lookup's input interface).
    pub ifindex: u32,
    /// A [`crate::Family`] as `u8`.
    pub family: u8,
    /// Padding; zero.
    pub _pad: [u8; 3],
}
crate::assert_size!(FibKey, 40);

/// The value of FIB_CACHE: where packets of the key leave, and how.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FibEntry {
    /// Whose entry this is: a slot serves every key that hashes to it.
    pub key: FibKey,
    /// Session clock: after this the entry is looked up again.
    pub expires_ns: u64,
    /// The FIB generation the entry was looked up in; stale when FIB_GENERATION differs.
    pub generation: u32,
    /// Egress interface.
    pub ifindex: u32,
    /// The largest IP packet the route takes (the route's MTU, else the device's).
    pub mtu: u16,
    /// Source MAC: the egress interface's.
    pub smac: [u8; 6],
    /// Destination MAC: the next hop's.
    pub dmac: [u8; 6],
    /// The zone of the egress interface ([`ZoneId::NONE`]: in none).
    pub zone: ZoneId,
}
crate::assert_size!(FibEntry, 72);

/// The value of INGRESS_MACS: the MAC address of a routed zone interface as the agent last
/// read it. XDP forwarding takes only frames sent to it, as the kernel forwards only those (it
/// drops the others, PACKET_OTHERHOST): a frame a switch floods to every member, or one a
/// promiscuous interface picks up (a capture running on it), is forwarded once, by the member
/// it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct IngressMac {
    /// The interface's Ethernet address.
    pub mac: [u8; 6],
    /// 1: `mac` is the interface's; 0: not known (its frames go to the kernel).
    pub known: u8,
    /// Padding; zero.
    pub _pad: u8,
}
crate::assert_size!(IngressMac, 8);

/// The FIB_CACHE slot of `key` under `seed` (`DatapathConfig::fib_seed`): its words folded
/// and multiplied (Fibonacci hashing), the seed mixed in before the first and the last
/// multiplication, the top bits kept. Cheap enough for every packet; any key may land
/// anywhere, and a collision costs only a lookup. Not a keyed cryptographic hash: the seed
/// only keeps a sender from choosing addresses that share a slot offline.
#[inline(always)]
pub const fn slot(key: &FibKey, seed: u32) -> u32 {
    const BITS: u32 = FIB_CACHE_SLOTS.trailing_zeros();
    let [d0, d1, d2, d3] = key.dst;
    let [s0, s1, s2, s3] = key.src;
    let mut h = seed ^ d0 ^ d1.rotate_left(5) ^ d2.rotate_left(10) ^ d3.rotate_left(15);
    h = h.wrapping_mul(0x9e37_79b1) ^ s0 ^ s1.rotate_left(7) ^ s2.rotate_left(13);
    h = h.wrapping_mul(0x9e37_79b1) ^ s3.rotate_left(19) ^ key.ifindex ^ (key.family as u32);
    h = (h ^ seed.rotate_left(16)).wrapping_mul(0x9e37_79b1);
    h >> (32 - BITS)
}

const _: () = assert!(FIB_CACHE_SLOTS.is_power_of_two() && FIB_CACHE_SLOTS >= 2);

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(dst: [u8; 4], src: [u8; 4], ifindex: u32) -> FibKey {
        FibKey {
            dst: [u32::from_ne_bytes(dst), 0, 0, 0],
            src: [u32::from_ne_bytes(src), 0, 0, 0],
            ifindex,
            family: 2,
            _pad: [0; 3],
        }
    }

    /// Neighbouring destinations, sources and interfaces, 3,072 keys.
    fn neighbours() -> impl Iterator<Item = FibKey> {
        (0..1024u32).flat_map(|i| {
            let [_, _, c, d] = i.to_be_bytes();
            [
                v4([198, 18, c, d], [0; 4], 2),
                v4([198, 19, 0, 1], [198, 18, c, d], 2),
                v4([198, 18, 0, 1], [0; 4], 3 + i),
            ]
        })
    }

    /// Every slot is in range, and neighbouring keys spread over the slots instead of piling
    /// into a few (each pile-up would cost lookups), whatever the seed.
    #[test]
    fn keys_spread_over_the_slots() {
        for seed in [0, 1, 0x8000_0000, 0xdead_beef] {
            let mut used = [false; FIB_CACHE_SLOTS as usize];
            let mut n = 0;
            for key in neighbours() {
                let s = slot(&key, seed);
                assert!(s < FIB_CACHE_SLOTS, "{key:?} → {s}");
                used[s as usize] = true;
                n += 1;
            }
            // 3,072 random keys would take about 2,160 of 4,096 slots.
            let taken = used.iter().filter(|u| **u).count();
            assert!(
                taken >= n * 6 / 10,
                "seed {seed:#x}: {taken} slots for {n} keys"
            );
        }
    }

    /// Keys that share a slot under one seed mostly do not under another: which keys collide
    /// cannot be known without the seed.
    #[test]
    fn the_seed_decides_which_keys_share_a_slot() {
        extern crate std;
        use std::{collections::HashMap, vec::Vec};
        let keys: Vec<FibKey> = neighbours().collect();
        let mut first = HashMap::new();
        let mut colliding = Vec::new();
        for key in &keys {
            if let Some(other) = first.insert(slot(key, 7), *key) {
                colliding.push((other, *key));
            }
        }
        assert!(colliding.len() > 100, "{} pairs", colliding.len());
        for seed in [8, 0x7000_0000, 0xdead_beef] {
            let still = colliding
                .iter()
                .filter(|(a, b)| slot(a, seed) == slot(b, seed))
                .count();
            assert!(
                still * 20 < colliding.len(),
                "seed {seed:#x}: {still} of {} pairs still share a slot",
                colliding.len()
            );
        }
    }

    /// The two keys of one destination that only the source tells apart (routing by source)
    /// get different slots, as do the same addresses over IPv4 and IPv6 layouts.
    #[test]
    fn keys_that_differ_in_source_or_family_differ_in_slot() {
        let a = v4([198, 18, 1, 2], [198, 18, 0, 2], 2);
        let b = v4([198, 18, 1, 2], [198, 18, 0, 3], 2);
        assert_ne!(slot(&a, 0), slot(&b, 0));
        let mut six = a;
        six.family = 10;
        assert_ne!(slot(&a, 0), slot(&six, 0));
    }
}
