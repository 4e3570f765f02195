//! The hasync XDP programs: entry points only; the logic lives in the library modules.
#![no_std]
#![no_main]
#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::panic
)]

use aya_ebpf::{macros::xdp, programs::XdpContext};
use hasync_ebpf::{
    clock, log,
    session::{process, NoMix},
    table_programs,
};

#[xdp]
pub fn hasync(ctx: XdpContext) -> u32 {
    process::<NoMix>(&ctx)
}

/// Applies peers' records to the session table: run by the agent with BPF_PROG_TEST_RUN, never
/// attached. Not pinned, so free to be renamed (it was `hasync_install`). Fragments allowed: a
/// run's records fill several pages (`hasync_common::table_programs::RUN_MAX_BYTES`), read
/// with `bpf_xdp_load_bytes`.
#[xdp(frags)]
pub fn hasync_apply(ctx: XdpContext) -> u32 {
    table_programs::apply_batch(&ctx)
}

/// Reads sessions for the sync sender: run by the agent with BPF_PROG_TEST_RUN, never attached.
/// Fragments allowed, as the apply program.
#[xdp(frags)]
pub fn hasync_read(ctx: XdpContext) -> u32 {
    table_programs::read_batch(&ctx)
}

/// Samples the kernel's clocks for the agent: run with BPF_PROG_TEST_RUN, never attached.
#[xdp]
pub fn hasync_clock(ctx: XdpContext) -> u32 {
    clock::sample(&ctx)
}

/// Logs the rare events the other programs noted: run by the agent with BPF_PROG_TEST_RUN,
/// never attached.
#[xdp]
pub fn hasync_log(ctx: XdpContext) -> u32 {
    log::run(&ctx)
}
