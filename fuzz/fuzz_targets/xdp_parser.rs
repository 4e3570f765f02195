//! `xdp_parser`: see `hasync_tests::fuzz::xdp` for the input format and what it checks. Loads
//! the XDP program once (needs root) and runs every input through it.
#![no_main]

use std::sync::{
    atomic::{AtomicU8, Ordering},
    LazyLock, Mutex,
};

use hasync_common::COUNTER_COUNT;
use hasync_tests::fuzz::xdp::{XdpFuzz, MAX_FRAMES};

static XDP: LazyLock<Mutex<XdpFuzz>> = LazyLock::new(|| {
    let fuzz = XdpFuzz::load().unwrap_or_else(|e| panic!("loading the XDP program: {e:#}"));
    Mutex::new(fuzz)
});

/// Coverage of the XDP program, which libFuzzer's instrumentation cannot see: one cell per
/// (frame position, counter that moved). libFuzzer reads this section as extra counters, so an
/// input that makes a counter move at a new position is kept.
#[used]
#[link_section = "__libfuzzer_extra_counters"]
static PATHS: [AtomicU8; MAX_FRAMES * COUNTER_COUNT] =
    [const { AtomicU8::new(0) }; MAX_FRAMES * COUNTER_COUNT];

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut fuzz = XDP.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let result = fuzz.check_observed(data, |frame, delta| {
        for (counter, _) in delta.nonzero() {
            if let Some(cell) = PATHS.get(frame * COUNTER_COUNT + counter as usize) {
                cell.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    if let Err(e) = result {
        panic!("{e:#}");
    }
});
