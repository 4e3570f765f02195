//! The hasync XDP program: entry point only; the logic lives in the library modules.
#![no_std]
#![no_main]

use aya_ebpf::{macros::xdp, programs::XdpContext};
use hasync_ebpf::session::{process, NoMix};

#[xdp]
pub fn hasync(ctx: XdpContext) -> u32 {
    process::<NoMix>(&ctx)
}
