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
    clock, install, log,
    session::{process, NoMix},
};

#[xdp]
pub fn hasync(ctx: XdpContext) -> u32 {
    process::<NoMix>(&ctx)
}

/// Installs peers' sessions: run by the agent with BPF_PROG_TEST_RUN, never attached.
#[xdp]
pub fn hasync_install(ctx: XdpContext) -> u32 {
    install::run(&ctx)
}

/// Reads sessions for the sync sender: run by the agent with BPF_PROG_TEST_RUN, never attached.
#[xdp]
pub fn hasync_read(ctx: XdpContext) -> u32 {
    install::read(&ctx)
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
