//! The hasync XDP program: entry point only; the logic lives in the library modules.
#![no_std]
#![no_main]

use aya_ebpf::{macros::xdp, programs::XdpContext};
use hasync_ebpf::session::{process, NoMix};

#[xdp]
pub fn hasync(ctx: XdpContext) -> u32 {
    process::<NoMix>(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: the crate has no panicking paths, and the verifier rejects any it finds.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
