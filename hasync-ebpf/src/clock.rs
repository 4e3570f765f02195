//! The session clock: `jiffies` read in the agent's monotonic clock. `bpf_jiffies64` is
//! inlined by the verifier (a load of `jiffies_64` on 64-bit JITs), where the coarse clock
//! helper is a call per packet; the agent measures the tick and the offset and writes them into
//! the config (see `DatapathConfig::ns_per_jiffy`). Both clocks advance once per tick.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    programs::XdpContext,
};
use hasync_common::{ClockSample, DatapathConfig};

use crate::table_programs::store;

/// Now, in the session clock's nanoseconds.
#[inline(always)]
pub fn now(cfg: &DatapathConfig) -> u64 {
    if cfg.ns_per_jiffy == 0 {
        // Not measured: the coarse clock is the agent's, read by a helper call.
        // SAFETY: the helper takes no arguments and only reads the clock.
        return unsafe { bpf_ktime_get_coarse_ns() };
    }
    // SAFETY: the helper takes no arguments and only reads `jiffies_64`.
    cfg.jiffies_ns(unsafe { bpf_jiffies64() })
}

/// The clock program: writes a [`ClockSample`] over the start of the frame. XDP_PASS when it
/// did, XDP_ABORTED when the frame is too short.
#[inline(always)]
pub fn sample(ctx: &XdpContext) -> u32 {
    // The coarse clock first: a tick that lands between the two reads (or the kernel's own
    // window between advancing jiffies and the clocks) can then only make a sample's coarse
    // reading a tick early, never late; the agent sets such samples aside.
    // SAFETY: as in `now`.
    let coarse_ns = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: as in `now`.
    let jiffies = unsafe { bpf_jiffies64() };
    let mut sample = ClockSample { jiffies, coarse_ns };
    if store(ctx, 0, &mut sample) {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_ABORTED
    }
}
