//! `backlog`: see `hasync_tests::fuzz::backlog` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = hasync_tests::fuzz::backlog(data) {
        panic!("{e:#}");
    }
});
