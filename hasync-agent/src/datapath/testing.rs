//! Test helpers: maps created directly with BPF_MAP_CREATE, frames run through the loaded
//! program with BPF_PROG_TEST_RUN. Tests need root (CAP_BPF).

use std::{io, os::fd::OwnedFd};

use hasync_common::{flow::IPPROTO_UDP, DatapathConfig, Family, FlowKey, MemberId};

use super::{Datapath, DatapathOptions};

pub use super::sys::{BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH};

/// A UDP flow key numbered `i` (distinct for every `i`).
pub fn udp_key(i: u32) -> FlowKey {
    FlowKey::canonical(Family::V4, IPPROTO_UDP, [1, 0, i, 0], 1, [2, 0, 0, 0], 2).0
}

/// Creates a map of `map_type` for `K → V` with room for `max_entries` (tests need root).
pub fn create_map<K, V>(map_type: u32, max_entries: u32) -> OwnedFd {
    super::sys::create_map::<K, V>(map_type, max_entries)
        .unwrap_or_else(|e| panic!("BPF_MAP_CREATE (tests need root): {e}"))
}

/// A datapath loaded for member 1, not attached, with a small session table.
pub fn datapath() -> Datapath {
    let mut opts = DatapathOptions::new(MemberId(1));
    opts.session_capacity = 4096;
    opts.config = DatapathConfig::with_defaults(MemberId(1));
    Datapath::load(&opts).expect("load the XDP program (tests need root)")
}

/// Runs `frame` through the program once (BPF_PROG_TEST_RUN); returns the XDP verdict.
pub fn test_run(dp: &Datapath, frame: &[u8]) -> u32 {
    use aya::programs::{TestRun as _, TestRunOptions};
    let prog = dp.program().expect("program");
    let opts = TestRunOptions {
        data_in: Some(frame),
        ..TestRunOptions::default()
    };
    prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
}

/// An Ethernet + IPv4 + UDP frame `src:sport → dst:dport` with 8 bytes of payload.
pub fn udp_frame(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(50);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
    let total: u16 = 20 + 8 + 8;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let mut sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&16u16.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(b"hasync!!");
    f
}

/// Runs `f` in a thread of its own moved into a fresh network namespace, so nothing it does
/// touches the host's interfaces (a forked `ip` inherits the thread's namespace). The namespace,
/// and the interfaces made in it, go away with the thread.
pub fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare with a valid flag; it affects only this thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            io::Error::last_os_error()
        );
        f()
    })
    .join()
    .expect("netns test thread")
}

/// `ip ARGS...` in the calling thread's namespace; panics on failure.
pub fn ip(args: &[&str]) {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("run ip");
    assert!(status.success(), "ip {args:?}");
}

/// Whether `ip` shows an XDP program on `dev`.
pub fn shows_xdp(dev: &str) -> bool {
    let out = std::process::Command::new("ip")
        .args(["-d", "link", "show", dev])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}
