//! The session clock: how the agent learns the kernel's jiffies in its own monotonic clock
//! (see [`crate::DatapathConfig::ns_per_jiffy`]).

/// What the clock program (run by the agent with `BPF_PROG_TEST_RUN`, never attached) writes
/// over the start of the frame it is given: two clock readings taken together in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ClockSample {
    /// `jiffies_64`.
    pub jiffies: u64,
    /// The coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`, the agent's), in nanoseconds.
    pub coarse_ns: u64,
}
crate::assert_size!(ClockSample, 16);

/// The session clock's nanoseconds at `jiffies`, for a tick of `ns_per_jiffy` and an
/// `offset_ns` the agent measured (wrapping: the offset is usually "negative", since 64-bit
/// jiffies start near 2^32, so that their low half wraps 5 minutes after boot).
#[inline(always)]
pub const fn jiffies_ns(jiffies: u64, ns_per_jiffy: u32, offset_ns: u64) -> u64 {
    jiffies
        .wrapping_mul(ns_per_jiffy as u64)
        .wrapping_add(offset_ns)
}
