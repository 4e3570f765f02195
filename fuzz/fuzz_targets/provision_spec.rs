//! `provision_spec`: see `hasync_tests::fuzz::provision_spec` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = hasync_tests::fuzz::provision_spec(data) {
        panic!("{e:#}");
    }
});
