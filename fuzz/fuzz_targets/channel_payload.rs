//! `channel_payload`: see `hasync_tests::fuzz::channel_payload` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = hasync_tests::fuzz::channel_payload(data) {
        panic!("{e:#}");
    }
});
