//! Bench-only XDP programs for `cargo xtask bench fastpath`. Not part of the product.
//!
//! Holds the product's logic with an iteration counter mixed into the flow key (program
//! `hasync`, same name and maps as the product so the agent's loader drives it), and the
//! baselines it is compared with, which parse the same headers and apply the identical mixing:
//! - `base_parse`: parse and pass;
//! - `base_lookup`: parse plus exactly one hash lookup (the product's table type);
//! - `base_insert`: parse plus exactly one LRU-hash insert: a table that makes room for new
//!   entries by itself, as the product's admission ring does for embryonic sessions.
//!
//! It also holds the product's clock program (`hasync_clock`), which the bench runs to set the
//! session clock up as the agent does.
#![no_std]
#![no_main]
#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::panic
)]

use aya_ebpf::{
    bindings::{xdp_action, BPF_ANY},
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use hasync_common::{maps::DEFAULT_SESSION_CAPACITY, FlowKey, Session};
use hasync_ebpf::{
    clock,
    parse::{parse, Parsed},
    session::{process, KeyMix},
};

/// Per-CPU iteration counter.
#[map]
static BENCH_ITER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `[modulo, offset]`: the mixed index is `offset + (iter % modulo)` (`modulo` 0: no modulo).
/// One entry, read with one lookup: two took the product program over BPF's 512 bytes of stack
/// in this bench's build.
#[map]
static BENCH_PARAMS: Array<[u64; 2]> = Array::with_max_entries(1, 0);

/// The lookup baseline's table: same type, key, value and size as SESSIONS.
#[map]
static BASE_TABLE: HashMap<FlowKey, Session> =
    HashMap::with_max_entries(DEFAULT_SESSION_CAPACITY, 0);

/// The insert baseline's table: same key, value and size, evicting by itself.
#[map]
static BASE_LRU: LruHashMap<FlowKey, Session> =
    LruHashMap::with_max_entries(DEFAULT_SESSION_CAPACITY, 0);

/// Writes the iteration's index into `addr_hi[2]`, a word IPv4 keys leave zero.
struct IterMix;

impl KeyMix for IterMix {
    #[inline(always)]
    fn mix(key: &mut FlowKey) {
        let Some(iter) = BENCH_ITER.get_ptr_mut(0) else {
            return;
        };
        // SAFETY: per-CPU slot, only this program writes it on this CPU.
        let n = unsafe {
            let n = *iter;
            *iter = n.wrapping_add(1);
            n
        };
        let [modulo, offset] = BENCH_PARAMS.get(0).copied().unwrap_or([0, 0]);
        let idx = n.checked_rem(modulo).unwrap_or(n);
        key.addr_hi[2] = offset.wrapping_add(idx) as u32;
    }
}

#[inline(always)]
fn parsed_key(ctx: &XdpContext) -> Option<FlowKey> {
    match parse(ctx) {
        Parsed::Track(pkt) => {
            let mut key = pkt.key;
            IterMix::mix(&mut key);
            Some(key)
        }
        _ => None,
    }
}

#[xdp]
pub fn hasync(ctx: XdpContext) -> u32 {
    process::<IterMix>(&ctx)
}

/// The product's clock program, so the bench configures the session clock as the agent does.
#[xdp]
pub fn hasync_clock(ctx: XdpContext) -> u32 {
    clock::sample(&ctx)
}

#[xdp]
pub fn base_parse(ctx: XdpContext) -> u32 {
    match parsed_key(&ctx) {
        Some(key) if key.proto != 0 => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_DROP,
    }
}

#[xdp]
pub fn base_lookup(ctx: XdpContext) -> u32 {
    let Some(key) = parsed_key(&ctx) else {
        return xdp_action::XDP_DROP;
    };
    match BASE_TABLE.get_ptr(key) {
        Some(_) => xdp_action::XDP_PASS,
        None => xdp_action::XDP_DROP,
    }
}

#[xdp]
pub fn base_insert(ctx: XdpContext) -> u32 {
    let Some(key) = parsed_key(&ctx) else {
        return xdp_action::XDP_DROP;
    };
    let value = Session {
        packets: [1, 0],
        version: 1,
        ..Session::default()
    };
    match BASE_LRU.insert(key, value, BPF_ANY as u64) {
        Ok(()) => xdp_action::XDP_PASS,
        Err(_) => xdp_action::XDP_DROP,
    }
}
