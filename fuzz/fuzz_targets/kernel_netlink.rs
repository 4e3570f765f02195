//! `kernel_netlink`: see `hasync_tests::fuzz::kernel_netlink` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = hasync_tests::fuzz::kernel_netlink(data) {
        panic!("{e:#}");
    }
});
