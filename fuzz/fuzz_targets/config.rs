//! `config`: see `hasync_tests::fuzz::config` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = hasync_tests::fuzz::config(data) {
        panic!("{e:#}");
    }
});
