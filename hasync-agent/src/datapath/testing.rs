//! Test helpers: maps created directly with BPF_MAP_CREATE, frames run through the loaded
//! program with BPF_PROG_TEST_RUN. Tests need root (CAP_BPF).

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
};

use hasync_common::{DatapathConfig, MemberId};

use super::{Datapath, DatapathOptions};

pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised attr of the size passed; callers put only valid
    // pointers in it.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>() as libc::c_uint)
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Creates a map of `map_type` for `K → V` with room for `max_entries`.
pub fn create_map<K, V>(map_type: u32, max_entries: u32) -> OwnedFd {
    /// The first fields of `bpf_attr` for BPF_MAP_CREATE; the kernel zero-fills the rest.
    #[repr(C)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    let mut attr = CreateAttr {
        map_type,
        key_size: size_of::<K>() as u32,
        value_size: size_of::<V>() as u32,
        max_entries,
        map_flags: 0,
    };
    let fd = sys_bpf(BPF_MAP_CREATE, &mut attr).expect("BPF_MAP_CREATE (tests need root)");
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// A datapath loaded for member 1, not attached, with a small session table.
pub fn datapath() -> Datapath {
    let mut opts = DatapathOptions::new(MemberId(1));
    opts.session_capacity = 4096;
    opts.config = DatapathConfig::with_defaults(MemberId(1));
    Datapath::load(&opts).expect("load the XDP program (tests need root)")
}

/// Runs `frame` through the program once; returns the XDP verdict.
pub fn test_run(dp: &Datapath, frame: &[u8]) -> u32 {
    /// `bpf_attr`'s `test` member, up to `ctx_out`.
    #[repr(C)]
    #[derive(Default)]
    struct TestAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
    }
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    let prog = dp.program().expect("program");
    let fd = prog.fd().expect("program fd");
    let mut attr = TestAttr {
        prog_fd: fd.as_fd().as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    sys_bpf(BPF_PROG_TEST_RUN, &mut attr).expect("BPF_PROG_TEST_RUN");
    attr.retval
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
    let mut sum: u32 = ip.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
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
