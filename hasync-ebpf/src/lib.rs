//! hasync's XDP fast path as a library, so the product program (`main.rs`) and the bench-only
//! program (`bin/fastpath-bench.rs`) run exactly the same code.
#![no_std]
// The verifier refuses a reachable panic, and overflow checks are off in this crate's
// profiles: indexing, arithmetic and panics are ruled out here instead, by the linter.
#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::panic
)]

pub mod clock;
pub mod embryo;
pub mod events;
pub mod forward;
pub mod log;
pub mod maps;
pub mod parse;
pub mod policy;
pub mod replica_room;
pub mod route;
pub mod session;
pub mod table_programs;

/// Unreachable: the crate has no panicking paths, and the verifier rejects any it finds.
/// Defined once here for every program binary of the crate.
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The programs' license: GPL-compatible, so they may call GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
