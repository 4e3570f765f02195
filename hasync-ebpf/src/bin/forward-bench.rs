//! Bench-only XDP programs for `cargo xtask bench forward`. Not part of the product.
//!
//! - `generate`: a traffic generator, run with BPF_PROG_TEST_RUN in live-frames mode
//!   (BPF_F_TEST_XDP_LIVE_FRAMES). The kernel recycles the frame pages with whatever the
//!   receivers wrote into them, so every frame is rewritten whole from `GEN_TEMPLATE`; then one
//!   address word and one port of the template are offset by the flow (a per-CPU counter modulo
//!   the number of flows) and the checksums adjusted incrementally. Returns XDP_TX: the frame
//!   leaves through the test run's ingress interface; or, when `GEN_PACE` says so, a redirect
//!   to the interface in the `GEN_EGRESS` slot that `GEN_SLOT` names (userspace switches
//!   slots while the run goes on).
//!   Paced (`GEN_PACE`), it sends a frame only when its schedule says one is due and drops the
//!   run's frame otherwise (a live-frames test run cannot be slowed down, only made to send
//!   less).
//! - `count`: the receiver: counts frames per CPU and drops them.
//! - `pass`: XDP_PASS, so a veth takes XDP frames (its peer's `ndo_xdp_xmit` needs a program
//!   on this end) while the kernel stack does the work.
//! - `redirect`: the XDP floor of a forwarding member: a fixed egress per ingress interface
//!   (`REDIRECT_PORTS`, a DEVMAP), MAC rewrite (`REDIRECT_MACS`), no parsing beyond Ethernet
//!   and no session logic.
//! - `redirect_lookup`: `redirect` after exactly one lookup of the frame's flow key (the
//!   product's parser) in `LOOKUP_TABLE`, a hash of the session table's key, value and
//!   capacity: the most any design that keeps a session per flow in that table can forward.
//!   While `LOOKUP_LEARN` is 1 a missing flow is inserted; otherwise it is dropped.
#![no_std]
#![no_main]
#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::panic
)]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{Array, DevMap, DevMapHash, HashMap, PerCpuArray},
    programs::XdpContext,
};
use hasync_common::{FlowKey, Session};
use hasync_ebpf::parse::{parse, Parsed};

/// Bytes of every generated frame (without FCS): the template's size.
const FRAME_LEN: usize = 64;
/// Words of the template.
const FRAME_WORDS: usize = FRAME_LEN / 8;
/// Ports per source address: flow `i` uses port `base + i % PORTS` and address word
/// `base + i / PORTS`.
const PORT_BITS: u32 = 14;
const PORT_MASK: u32 = (1 << PORT_BITS) - 1;

/// The frame every generated frame starts as.
#[map]
static GEN_TEMPLATE: Array<[u64; FRAME_WORDS]> = Array::with_max_entries(1, 0);

/// Generator parameters, by index (offsets are bytes from the frame's start, each pointing at
/// a big-endian 16-bit word; an offset of 0 means "none"):
/// 0 flows; 1 the address word varied (the last 16 bits of the source or destination
/// address); 2 the port varied; 3 the IPv4 header checksum; 4 the transport checksum.
#[map]
static GEN_PARAMS: Array<u32> = Array::with_max_entries(5, 0);

/// Frames generated, per CPU: the flow index is this modulo the flows.
#[map]
static GEN_ITER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Pacing: the interval between frames in ns (0: no pacing, every run of the program sends);
/// the most a paced generator may lag behind its schedule, in ns (frames due longer ago are
/// not sent, and counted in `GEN_LAGGED`); non-zero to send by redirect to `GEN_EGRESS`
/// instead of XDP_TX.
#[map]
static GEN_PACE: Array<[u64; 3]> = Array::with_max_entries(1, 0);

/// A paced generator's next send time (`bpf_ktime_get_ns`; 0: the next run), per CPU.
#[map]
static GEN_NEXT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Frames a paced generator did not send because they were due too long ago, per CPU.
#[map]
static GEN_LAGGED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Where a redirecting generator may send...
#[map]
static GEN_EGRESS: DevMap = DevMap::with_max_entries(2, 0);

/// ...and the slot of `GEN_EGRESS` it sends to.
#[map]
static GEN_SLOT: Array<u32> = Array::with_max_entries(1, 0);

/// Frames received, per CPU.
#[map]
static RX_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Ingress ifindex → egress interface.
#[map]
static REDIRECT_PORTS: DevMapHash = DevMapHash::with_max_entries(8, 0);

/// Ingress ifindex → the egress frame's destination and source MAC addresses.
#[map]
static REDIRECT_MACS: HashMap<u32, [u8; 12]> = HashMap::with_max_entries(8, 0);

/// The session table's stand-in for `redirect_lookup`; userspace sizes it at load time as the
/// agent sizes its table (one entry unless it says otherwise).
#[map]
static LOOKUP_TABLE: HashMap<FlowKey, Session> = HashMap::with_max_entries(1, 0);

/// 1: `redirect_lookup` inserts the flows it does not find (the learning pass).
#[map]
static LOOKUP_LEARN: Array<u32> = Array::with_max_entries(1, 0);

#[inline(always)]
fn param(i: u32) -> u32 {
    GEN_PARAMS.get(i).copied().unwrap_or(0)
}

/// The big-endian 16-bit word at byte `off` (taken modulo 64: the template's size) of the
/// frame, if `off` is not 0 and the word is inside the frame. The mask bounds the offset for the
/// verifier, which only carries a packet range over a bounded variable offset; the check
/// against `data_end` is then one it follows.
#[inline(always)]
fn word(ctx: &XdpContext, off: u32) -> Option<*mut u16> {
    let off = (off as usize) & (FRAME_LEN - 1);
    if off == 0 {
        return None;
    }
    let p = ctx.data().wrapping_add(off);
    if p.wrapping_add(2) > ctx.data_end() {
        return None;
    }
    Some(p as *mut u16)
}

/// Adds `delta` to the word at `off`.
#[inline(always)]
fn add_word(ctx: &XdpContext, off: u32, delta: u32) {
    if let Some(p) = word(ctx, off) {
        // SAFETY: `word` checked the two bytes are inside the frame.
        unsafe {
            let v = u16::from_be(p.read_unaligned());
            p.write_unaligned(v.wrapping_add(delta as u16).to_be());
        }
    }
}

/// Adds `delta` to the ones'-complement sum the checksum at `off` covers (RFC 1624). `udp`: a
/// result of 0 is sent as 0xffff (0 means "no checksum").
#[inline(always)]
fn adjust_checksum(ctx: &XdpContext, off: u32, delta: u32, udp: bool) {
    let Some(p) = word(ctx, off) else {
        return;
    };
    // SAFETY: `word` checked the two bytes are inside the frame.
    unsafe {
        let old = u16::from_be(p.read_unaligned());
        let mut sum = u32::from(!old).wrapping_add(delta);
        sum = (sum & 0xffff).wrapping_add(sum >> 16);
        sum = (sum & 0xffff).wrapping_add(sum >> 16);
        let mut new = !(sum as u16);
        if udp && new == 0 {
            new = 0xffff;
        }
        p.write_unaligned(new.to_be());
    }
}

/// Whether a paced generator sends a frame now (an unpaced one always does): advances the
/// schedule by one interval, after skipping the frames due more than the lag allowed ago.
#[inline(always)]
fn due(interval: u64, max_lag: u64) -> bool {
    if interval == 0 {
        return true;
    }
    let Some(next) = GEN_NEXT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: per-CPU slot, only this program writes it on this CPU.
    let mut n = unsafe { *next };
    if n == 0 {
        n = now;
    }
    if now < n {
        return false;
    }
    let oldest = now.saturating_sub(max_lag);
    if n < oldest {
        let behind = oldest.wrapping_sub(n).checked_div(interval).unwrap_or(0);
        if let Some(lagged) = GEN_LAGGED.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, only this program writes it on this CPU.
            unsafe { *lagged = (*lagged).wrapping_add(behind) };
        }
        n = n.wrapping_add(behind.wrapping_mul(interval));
    }
    // SAFETY: as above.
    unsafe { *next = n.wrapping_add(interval) };
    true
}

#[xdp]
pub fn generate(ctx: XdpContext) -> u32 {
    let data = ctx.data();
    if data.wrapping_add(FRAME_LEN) > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let [interval, max_lag, redirect] = GEN_PACE.get(0).copied().unwrap_or([0; 3]);
    if !due(interval, max_lag) {
        return xdp_action::XDP_DROP;
    }
    let Some(template) = GEN_TEMPLATE.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let dst = data as *mut u64;
    for (i, word) in template.iter().enumerate() {
        // SAFETY: FRAME_LEN bytes from `data` are in the frame (checked above); the packet
        // start is 8-byte aligned in live-frames pages, and x86 takes unaligned stores anyway.
        unsafe { dst.wrapping_add(i).write_unaligned(*word) };
    }
    let Some(iter) = GEN_ITER.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: per-CPU slot, only this program writes it on this CPU.
    let n = unsafe {
        let n = *iter;
        *iter = n.wrapping_add(1);
        n
    };
    let flows = u64::from(param(0));
    let flow = n.checked_rem(flows).unwrap_or(0) as u32;
    let host = flow >> PORT_BITS;
    let port = flow & PORT_MASK;
    add_word(&ctx, param(1), host);
    add_word(&ctx, param(2), port);
    adjust_checksum(&ctx, param(3), host, false);
    adjust_checksum(&ctx, param(4), host.wrapping_add(port), true);
    if redirect == 0 {
        return xdp_action::XDP_TX;
    }
    let slot = GEN_SLOT.get(0).copied().unwrap_or(0);
    GEN_EGRESS
        .redirect(slot, 0)
        .unwrap_or(xdp_action::XDP_ABORTED)
}

#[xdp]
pub fn count(_ctx: XdpContext) -> u32 {
    if let Some(n) = RX_COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, only this program writes it on this CPU.
        unsafe { *n = (*n).wrapping_add(1) };
    }
    xdp_action::XDP_DROP
}

#[xdp]
pub fn pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn redirect(ctx: XdpContext) -> u32 {
    redirect_frame(&ctx)
}

#[xdp]
pub fn redirect_lookup(ctx: XdpContext) -> u32 {
    let Parsed::Track(pkt) = parse(&ctx) else {
        return xdp_action::XDP_DROP;
    };
    if LOOKUP_TABLE.get_ptr(pkt.key).is_none() {
        let learn = LOOKUP_LEARN.get(0).copied().unwrap_or(0) == 1;
        let session = Session::default();
        if !learn || LOOKUP_TABLE.insert(pkt.key, session, 0).is_err() {
            return xdp_action::XDP_DROP;
        }
    }
    redirect_frame(&ctx)
}

/// Rewrites the MACs and redirects to the ingress interface's egress.
#[inline(always)]
fn redirect_frame(ctx: &XdpContext) -> u32 {
    let data = ctx.data();
    if data.wrapping_add(12) > ctx.data_end() {
        return xdp_action::XDP_DROP;
    }
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: a plain read of a map value; the agent side writes it before traffic starts.
    let Some(macs) = (unsafe { REDIRECT_MACS.get(ingress) }) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: 12 bytes from `data` are in the frame (checked above).
    unsafe { (data as *mut [u8; 12]).write_unaligned(*macs) };
    REDIRECT_PORTS
        .redirect(ingress, 0)
        .unwrap_or(xdp_action::XDP_DROP)
}
