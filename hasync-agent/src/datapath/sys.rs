//! The bpf(2) syscall: every command hasync issues itself (the batch map operations, object
//! info, pinned objects, link detach, map creation for tests) goes through [`sys_bpf`], with
//! `union bpf_attr`, `enum bpf_cmd` and the `bpf_*_info` structs from aya-obj's generated
//! bindings (include/uapi/linux/bpf.h), never hand-written copies.
//!
//! [`sys_bpf`] is the seam where unit tests play the kernel: a test thread installs a fake
//! (`fake::install`, test builds only) that answers the commands of that thread, so the logic
//! around a syscall (retries, end of a walk, partial progress, errors) is tested without root.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

pub(crate) use aya_obj::generated::{
    bpf_attr, bpf_cmd, bpf_link_info, bpf_link_type, bpf_map_info, bpf_map_type,
};

#[cfg(test)]
pub(crate) mod fake;

/// A `bpf_attr` of zeroes, as every command expects in the fields it does not use.
pub(crate) fn zeroed_attr() -> bpf_attr {
    // SAFETY: `bpf_attr` is a union of structs of integers (and unions and arrays of them):
    // all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// The bpf(2) syscall with the whole `bpf_attr` (the kernel accepts a larger one if its tail
/// is zero, and checks that unused fields are). Returns the kernel's non-negative result.
///
/// # Safety
///
/// `attr` must be set up for `cmd`, and every pointer it holds valid for what `cmd` does with
/// it (read or write, of the sizes the command implies).
pub(crate) unsafe fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    #[cfg(test)]
    if let Some(result) = fake::answer(cmd, attr) {
        return result;
    }
    // SAFETY: `attr` is a valid, initialised `bpf_attr` of the size we pass; the pointers it
    // holds are valid per this function's contract.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Takes ownership of the fd a bpf(2) command returned.
fn owned_fd(rc: i64) -> io::Result<OwnedFd> {
    let fd = i32::try_from(rc).map_err(io::Error::other)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An fd as the kernel's `__u32` fields hold it.
pub(crate) fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    // A valid fd is non-negative, so this never wraps.
    fd.as_raw_fd() as u32
}

/// Opens a pinned object (BPF_OBJ_GET).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_4.pathname = c_path.as_ptr() as u64;
    // SAFETY: a BPF_OBJ_GET attr whose path outlives the call.
    owned_fd(unsafe { sys_bpf(bpf_cmd::BPF_OBJ_GET, &mut attr) }?)
}

/// Detaches a link from its hook now (BPF_LINK_DETACH); the link object lives on, defunct,
/// until its last reference goes.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = zeroed_attr();
    attr.link_detach.link_fd = fd_u32(link);
    // SAFETY: a BPF_LINK_DETACH attr; it holds no pointers.
    unsafe { sys_bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr) }.map(drop)
}

/// A `struct bpf_*_info` of the generated bindings, which BPF_OBJ_GET_INFO_BY_FD fills.
///
/// # Safety
///
/// The type is `#[repr(C)]` integers (and arrays and unions of them): all-zero, and whatever
/// bytes the kernel writes, are valid values; its pointer fields, zero, ask for nothing.
pub(crate) unsafe trait ObjInfo: Copy {}

// SAFETY: integers and a `c_char` array (include/uapi/linux/bpf.h `struct bpf_map_info`).
unsafe impl ObjInfo for bpf_map_info {}
// SAFETY: integers and a union of integer structs; zero pointers and lengths ask the kernel
// for no buffers (`struct bpf_link_info`).
unsafe impl ObjInfo for bpf_link_info {}

/// A `T` of zeroes.
pub(crate) fn zeroed_info<T: ObjInfo>() -> T {
    // SAFETY: all-zero is a valid `T` (`ObjInfo`'s contract).
    unsafe { std::mem::zeroed() }
}

/// BPF_OBJ_GET_INFO_BY_FD: what the kernel says of the object `fd` (it fills what it knows
/// of `T` and leaves the rest zero).
pub(crate) fn obj_info<T: ObjInfo>(fd: BorrowedFd<'_>) -> io::Result<T> {
    let mut info: T = zeroed_info();
    let mut attr = zeroed_attr();
    attr.info.bpf_fd = fd_u32(fd);
    attr.info.info_len = size_of::<T>() as u32;
    attr.info.info = std::ptr::from_mut(&mut info) as u64;
    // SAFETY: `attr.info` points at `info`, writable for `info_len` bytes, and any bytes the
    // kernel writes there are a valid `T`.
    unsafe { sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info)
}

/// `enum bpf_map_type` as the kernel's `__u32` fields hold it.
pub const fn map_type_u32(map_type: bpf_map_type) -> u32 {
    map_type as u32
}

pub const BPF_MAP_TYPE_HASH: u32 = map_type_u32(bpf_map_type::BPF_MAP_TYPE_HASH);
pub const BPF_MAP_TYPE_LRU_HASH: u32 = map_type_u32(bpf_map_type::BPF_MAP_TYPE_LRU_HASH);

/// Creates a map of `map_type` for `K → V` with room for `max_entries` and no flags (as the
/// product's SESSIONS map): for tests and benchmark baselines that need a map of the same
/// shape without loading a program.
pub fn create_map<K, V>(map_type: u32, max_entries: u32) -> io::Result<OwnedFd> {
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_1.map_type = map_type;
    attr.__bindgen_anon_1.key_size = size_of::<K>() as u32;
    attr.__bindgen_anon_1.value_size = size_of::<V>() as u32;
    attr.__bindgen_anon_1.max_entries = max_entries;
    // SAFETY: a BPF_MAP_CREATE attr holding no pointers.
    owned_fd(unsafe { sys_bpf(bpf_cmd::BPF_MAP_CREATE, &mut attr) }?)
}
