//! `control_request`: see `hasync_tests::fuzz::control_request` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = hasync_tests::fuzz::control_request(data) {
        panic!("{e:#}");
    }
});
