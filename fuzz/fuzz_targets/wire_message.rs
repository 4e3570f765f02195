//! `wire_message`: see `hasync_tests::fuzz::wire_message` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = hasync_tests::fuzz::wire_message(data) {
        panic!("{e:#}");
    }
});
