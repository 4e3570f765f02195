//! `xdp_parser`: see `hasync_tests::fuzz::xdp` for the input format and what it checks. Loads
//! the XDP program once (needs root) and runs every input through it.
#![no_main]

use std::sync::{LazyLock, Mutex};

use hasync_tests::fuzz::xdp::XdpFuzz;

static XDP: LazyLock<Mutex<XdpFuzz>> = LazyLock::new(|| {
    let fuzz = XdpFuzz::load().unwrap_or_else(|e| panic!("loading the XDP program: {e:#}"));
    Mutex::new(fuzz)
});

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut fuzz = XDP.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Err(e) = fuzz.check(data) {
        panic!("{e:#}");
    }
});
