//! Batch map operations (`BPF_MAP_{LOOKUP,UPDATE,DELETE}_BATCH`), which aya 0.14 lacks, and
//! the single-element lookup that goes with them.
//!
//! A safe wrapper around the bpf(2) syscall on a bare map fd: the agent walks the session
//! table in bounded chunks with these, never keeping a copy of it.
//!
//! Semantics follow the kernel (`kernel/bpf/hashtab.c`, `kernel/bpf/syscall.c`):
//! - lookup: the kernel fills up to `count` entries and a resume token. `ENOENT` means the end
//!   of the map was reached (the entries returned with it are valid). A hash map is walked
//!   bucket by bucket and a bucket is never split: `ENOSPC` (with nothing returned) means the
//!   next bucket holds more entries than `count`; we then retry with a larger count.
//! - update/delete: element by element; on the first failure the kernel stops and reports how
//!   many elements it processed.
//!
//! Walking a hash map while the XDP program changes it is safe and sees each key at most once
//! (a key always hashes to the same bucket); keys inserted into buckets already walked are
//! missed, and keys removed from buckets not walked yet are not seen.
//!
//! [`BatchMap::new`] checks the map's key and value sizes against `K` and `V` first: the kernel
//! copies whole arrays of them. Per-CPU maps are refused (there a value is
//! `round_up(value_size, 8) * possible_cpus` bytes).

use std::{
    io,
    marker::PhantomData,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
};

use bytemuck::Pod;

/// Which map command failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchOp {
    Lookup,
    Update,
    Delete,
    /// The single-element lookup.
    LookupElem,
    /// BPF_OBJ_GET_INFO_BY_FD, to check the map's key and value sizes.
    Info,
}

impl BatchOp {
    pub const fn name(self) -> &'static str {
        match self {
            BatchOp::Lookup => "BPF_MAP_LOOKUP_BATCH",
            BatchOp::Update => "BPF_MAP_UPDATE_BATCH",
            BatchOp::Delete => "BPF_MAP_DELETE_BATCH",
            BatchOp::LookupElem => "BPF_MAP_LOOKUP_ELEM",
            BatchOp::Info => "BPF_OBJ_GET_INFO_BY_FD",
        }
    }

    const fn cmd(self) -> libc::c_long {
        // Values of `enum bpf_cmd` (include/uapi/linux/bpf.h).
        match self {
            BatchOp::LookupElem => 1,
            BatchOp::Info => 15,
            BatchOp::Lookup => 24,
            BatchOp::Update => 26,
            BatchOp::Delete => 27,
        }
    }
}

impl std::fmt::Display for BatchOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of batch map operations.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The syscall failed; `done` elements were processed before the failure (update/delete).
    #[error("{op} failed after {done} elements: {source}")]
    Syscall {
        op: BatchOp,
        done: usize,
        #[source]
        source: io::Error,
    },
    /// Keys and values of an update differ in number.
    #[error("{op}: {keys} keys but {values} values")]
    LengthMismatch {
        op: BatchOp,
        keys: usize,
        values: usize,
    },
    /// A request larger than the kernel's `u32` count.
    #[error("{op}: {len} elements is more than one call can carry")]
    TooLarge { op: BatchOp, len: usize },
    /// A chunk size of 0 cannot make progress.
    #[error("{op}: chunk size 0 is out of range 1–{max}", max = u32::MAX)]
    ZeroChunk { op: BatchOp },
    /// One hash bucket holds more entries than the largest request we make.
    #[error("{op}: a hash bucket holds more than {max} entries")]
    BucketTooLarge { op: BatchOp, max: u32 },
    /// The map's key or value size differs from the types used to read it.
    #[error(
        "the map holds {key_size}-byte keys and {value_size}-byte values, not {want_key} and \
         {want_value}"
    )]
    WrongSizes {
        key_size: u32,
        value_size: u32,
        want_key: usize,
        want_value: usize,
    },
    /// Per-CPU values are not supported.
    #[error("map type {map_type} has per-CPU values, which batch operations here do not read")]
    PerCpu { map_type: u32 },
    /// The kernel reported more entries than were asked for (never expected).
    #[error("{op}: kernel returned {got} entries for a request of {asked}")]
    Overrun { op: BatchOp, got: u32, asked: u32 },
}

impl BatchError {
    /// The errno of a failed syscall, if that is what this is.
    pub fn errno(&self) -> Option<i32> {
        match self {
            BatchError::Syscall { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// `union bpf_attr`'s `batch` member (include/uapi/linux/bpf.h):
/// ```c
/// struct { /* struct used by BPF_MAP_*_BATCH commands */
///     __aligned_u64 in_batch;  /* start batch, NULL to start from beginning */
///     __aligned_u64 out_batch; /* output: next start batch */
///     __aligned_u64 keys;
///     __aligned_u64 values;
///     __u32 count;             /* input/output */
///     __u32 map_fd;
///     __u64 elem_flags;
///     __u64 flags;
/// } batch;
/// ```
/// We pass only this member's size: the kernel zero-fills the rest of `bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}
const _: () = assert!(size_of::<BatchAttr>() == 56);

/// `union bpf_attr`'s member for `BPF_MAP_*_ELEM` commands:
/// `{ __u32 map_fd; __aligned_u64 key; __aligned_u64 value; __u64 flags; }`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}
const _: () = assert!(size_of::<ElemAttr>() == 32);

/// Issues one map command (`BatchAttr`, `ElemAttr` or `InfoAttr`, as `op` requires). The kernel updates
/// `attr` in place (batch `count`, tokens).
///
/// # Safety
///
/// `A` must be the attr layout of `op`, and every non-zero pointer in `attr` must be valid for
/// what the command does with it: `keys` and `values` for `count` elements of the map's key
/// and value size (written by lookup, read by update/delete), `in_batch`/`out_batch` for a
/// token of the map's token size, `key`/`value` for one key and value.
unsafe fn sys_batch<A>(op: BatchOp, attr: &mut A) -> io::Result<()> {
    // SAFETY: this function's contract.
    unsafe { sys_bpf(op.cmd(), attr) }.map(drop)
}

/// The bpf(2) syscall: every command hasync issues itself goes through here.
///
/// # Safety
///
/// `A` must be the `union bpf_attr` member of `cmd`, and every pointer in `attr` valid for
/// what the command does with it.
unsafe fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised attr of the size we pass; the pointers it holds
    // are valid per this function's contract.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<A>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Takes ownership of the fd a bpf(2) command returned.
fn owned_fd(rc: libc::c_long) -> io::Result<std::os::fd::OwnedFd> {
    let fd = i32::try_from(rc).map_err(io::Error::other)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// Opens a pinned object (BPF_OBJ_GET).
pub fn obj_get(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    /// `union bpf_attr`'s member for BPF_OBJ_*: `{ __aligned_u64 pathname; __u32 bpf_fd;
    /// __u32 file_flags; }`.
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `attr` is a valid BPF_OBJ_GET attr whose path outlives the call.
    owned_fd(unsafe { sys_bpf(BPF_OBJ_GET, &mut attr) }?)
}

/// Detaches a link from its hook now (BPF_LINK_DETACH); the link object lives on, defunct,
/// until its last reference goes.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    use aya_obj::generated::{bpf_attr, bpf_cmd};
    // SAFETY: all-zero is a valid `bpf_attr` (a union of integer structs).
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.link_detach.link_fd = fd_u32(link);
    // SAFETY: `attr` is a BPF_LINK_DETACH attr; it holds no pointers.
    unsafe { sys_bpf(bpf_cmd::BPF_LINK_DETACH as libc::c_long, &mut attr) }.map(drop)
}

/// BPF_OBJ_GET_INFO_BY_FD into `info`, the head of a `bpf_*_info` struct (the kernel fills
/// only what fits). `T` must be a `#[repr(C)]` struct of integers.
pub(crate) fn obj_info<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<()> {
    let mut attr = InfoAttr {
        bpf_fd: fd_u32(fd),
        info_len: size_of::<T>() as u32,
        info: std::ptr::from_mut(info) as u64,
    };
    // SAFETY: `attr` points at `info`, writable for `info_len` bytes.
    unsafe { sys_batch(BatchOp::Info, &mut attr) }
}

fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    // A valid fd is non-negative, so this never wraps.
    fd.as_raw_fd() as u32
}

/// Where a chunked lookup resumes. Start with [`BatchCursor::new`]; reuse for every chunk of
/// one walk.
#[derive(Debug, Default)]
pub struct BatchCursor {
    /// The kernel's resume token: a bucket index (`u32`) for hash maps, a key for the generic
    /// implementation (arrays). Kept as `u64`s for alignment, at least 8 bytes.
    token: Vec<u64>,
    started: bool,
    done: bool,
}

impl BatchCursor {
    pub fn new() -> Self {
        Self::default()
    }

    /// True once the walk has reached the end of the map.
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn ensure_token_len(&mut self, key_size: usize) {
        let words = key_size.div_ceil(8).max(1);
        if self.token.len() < words {
            self.token.resize(words, 0);
        }
    }
}

/// `union bpf_attr`'s member for BPF_OBJ_GET_INFO_BY_FD: `{ __u32 bpf_fd; __u32 info_len;
/// __aligned_u64 info; }`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_map_info`: all we check. The kernel fills only `info_len` bytes.
#[repr(C)]
#[derive(Default)]
struct MapInfoHead {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
}

pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// Creates a map of `map_type` for `K → V` with room for `max_entries` and no flags (as the
/// product's SESSIONS map): for tests and benchmark baselines that need a map of the same
/// shape without loading a program.
pub fn create_map<K, V>(map_type: u32, max_entries: u32) -> io::Result<std::os::fd::OwnedFd> {
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
    // SAFETY: a valid, initialised attr holding no pointers.
    owned_fd(unsafe { sys_bpf(BPF_MAP_CREATE, &mut attr) }?)
}

/// Map types whose values are per CPU (`BPF_MAP_TYPE_PERCPU_HASH`, `_PERCPU_ARRAY`,
/// `_LRU_PERCPU_HASH`, `_PERCPU_CGROUP_STORAGE`).
const PER_CPU_MAP_TYPES: [u32; 4] = [5, 6, 10, 21];

/// A map fd checked to hold `K → V`: the key and value sizes match, and values are not per
/// CPU. The kernel copies `count × key_size` and `count × value_size` bytes to and from our
/// buffers, so this check is what makes the operations below memory-safe.
#[derive(Clone, Copy, Debug)]
pub struct BatchMap<'fd, K, V> {
    fd: BorrowedFd<'fd>,
    _types: PhantomData<(K, V)>,
}

/// Largest count we ask for when one bucket does not fit the caller's chunk.
const MAX_BUCKET_RETRY: u32 = 1 << 16;

impl<'fd, K: Pod, V: Pod> BatchMap<'fd, K, V> {
    /// Checks that the map behind `fd` holds `K → V`.
    pub fn new(fd: BorrowedFd<'fd>) -> Result<Self, BatchError> {
        const OP: BatchOp = BatchOp::Info;
        let mut info = MapInfoHead::default();
        obj_info(fd, &mut info).map_err(|source| BatchError::Syscall {
            op: OP,
            done: 0,
            source,
        })?;
        let MapInfoHead {
            map_type,
            id: _,
            key_size,
            value_size,
        } = info;
        let (want_key, want_value) = (size_of::<K>(), size_of::<V>());
        if key_size as usize != want_key || value_size as usize != want_value {
            return Err(BatchError::WrongSizes {
                key_size,
                value_size,
                want_key,
                want_value,
            });
        }
        if PER_CPU_MAP_TYPES.contains(&map_type) {
            return Err(BatchError::PerCpu { map_type });
        }
        Ok(BatchMap {
            fd,
            _types: PhantomData,
        })
    }

    /// Reads the next chunk of the map into `keys` and `values` (cleared first), at most
    /// `max` entries unless one hash bucket alone holds more (then that bucket, whole).
    /// Returns whether more may follow; after `false`, the cursor is done and further calls
    /// return nothing.
    pub fn lookup_batch(
        &self,
        cursor: &mut BatchCursor,
        keys: &mut Vec<K>,
        values: &mut Vec<V>,
        max: u32,
    ) -> Result<bool, BatchError> {
        let r = self.fill_batch(cursor, keys, values, max);
        if r.is_err() {
            // Nothing half-read is left for a caller to take as sessions.
            keys.clear();
            values.clear();
        }
        r
    }

    /// [`Self::lookup_batch`], leaving `keys`/`values` as they are on error.
    fn fill_batch(
        &self,
        cursor: &mut BatchCursor,
        keys: &mut Vec<K>,
        values: &mut Vec<V>,
        max: u32,
    ) -> Result<bool, BatchError> {
        const OP: BatchOp = BatchOp::Lookup;
        keys.clear();
        values.clear();
        if max == 0 {
            return Err(BatchError::ZeroChunk { op: OP });
        }
        if cursor.done {
            return Ok(false);
        }
        cursor.ensure_token_len(size_of::<K>());
        let mut asked = max;
        loop {
            // Zeroed room for `asked` of each (plain data: zero is a valid value), cut to
            // what the kernel wrote below.
            keys.resize(asked as usize, K::zeroed());
            values.resize(asked as usize, V::zeroed());
            // The kernel reads the token from `in_batch` and writes the next one to
            // `out_batch`; both may point at the same buffer (it reads before it writes).
            let token = cursor.token.as_mut_ptr() as u64;
            let mut attr = BatchAttr {
                in_batch: if cursor.started { token } else { 0 },
                out_batch: token,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: asked,
                map_fd: fd_u32(self.fd),
                ..Default::default()
            };
            // SAFETY: the map holds `K → V` (checked in `new`) and `keys`/`values` hold
            // `asked` of them; the token buffer holds max(8, size_of::<K>())
            // bytes, which covers both token kinds.
            let res = unsafe { sys_batch(OP, &mut attr) };
            let errno = res.as_ref().err().and_then(io::Error::raw_os_error);
            let more = match res {
                Ok(()) => true,
                Err(_) if errno == Some(libc::ENOENT) => false,
                Err(_) if errno == Some(libc::ENOSPC) && attr.count == 0 => {
                    // The next bucket alone does not fit: ask again for more, in that place.
                    if asked >= MAX_BUCKET_RETRY {
                        return Err(BatchError::BucketTooLarge { op: OP, max: asked });
                    }
                    // The kernel wrote that bucket's token: resume there, not at the start.
                    cursor.started = true;
                    asked = asked.saturating_mul(2).min(MAX_BUCKET_RETRY);
                    continue;
                }
                Err(source) => {
                    return Err(BatchError::Syscall {
                        op: OP,
                        done: 0,
                        source,
                    });
                }
            };
            if attr.count > asked {
                return Err(BatchError::Overrun {
                    op: OP,
                    got: attr.count,
                    asked,
                });
            }
            keys.truncate(attr.count as usize);
            values.truncate(attr.count as usize);
            cursor.started = true;
            cursor.done = !more;
            return Ok(more);
        }
    }

    /// Inserts or replaces `keys[i] → values[i]` with `flags` (`BPF_ANY`, `BPF_NOEXIST`,
    /// `BPF_EXIST`) for each element.
    pub fn update_batch(&self, keys: &[K], values: &[V], flags: u64) -> Result<(), BatchError> {
        const OP: BatchOp = BatchOp::Update;
        if keys.len() != values.len() {
            return Err(BatchError::LengthMismatch {
                op: OP,
                keys: keys.len(),
                values: values.len(),
            });
        }
        if keys.is_empty() {
            return Ok(());
        }
        let count = u32::try_from(keys.len()).map_err(|_| BatchError::TooLarge {
            op: OP,
            len: keys.len(),
        })?;
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count,
            map_fd: fd_u32(self.fd),
            elem_flags: flags,
            ..Default::default()
        };
        // SAFETY: the map holds `K → V`; the kernel reads `count` of each, which the slices
        // hold.
        unsafe { sys_batch(OP, &mut attr) }.map_err(|source| BatchError::Syscall {
            op: OP,
            done: attr.count as usize,
            source,
        })
    }

    /// Deletes `keys`. Keys that are not in the map (evicted, or deleted meanwhile) are
    /// skipped. Returns how many entries were deleted.
    pub fn delete_batch(&self, keys: &[K]) -> Result<usize, BatchError> {
        const OP: BatchOp = BatchOp::Delete;
        let mut deleted = 0;
        let mut rest = keys;
        while !rest.is_empty() {
            let count = u32::try_from(rest.len()).unwrap_or(u32::MAX);
            let mut attr = BatchAttr {
                keys: rest.as_ptr() as u64,
                count,
                map_fd: fd_u32(self.fd),
                ..Default::default()
            };
            // SAFETY: the map's keys are `K`; the kernel reads `count` of them, which `rest`
            // holds.
            let res = unsafe { sys_batch(OP, &mut attr) };
            match res {
                Ok(()) => {
                    // Success means all `count` keys were deleted.
                    deleted += count as usize;
                    rest = rest.get(count as usize..).unwrap_or_default();
                }
                // The kernel stopped at `rest[attr.count]`, which is missing: skip it.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    let done = (attr.count as usize).min(rest.len());
                    deleted += done;
                    rest = rest.get(done + 1..).unwrap_or_default();
                }
                Err(source) => {
                    let done = (attr.count as usize).min(rest.len());
                    return Err(BatchError::Syscall {
                        op: OP,
                        done: deleted + done,
                        source,
                    });
                }
            }
        }
        Ok(deleted)
    }

    /// Looks up one key; `None` when it is not in the map.
    pub fn lookup(&self, key: &K) -> Result<Option<V>, BatchError> {
        const OP: BatchOp = BatchOp::LookupElem;
        let mut value = V::zeroed();
        let mut attr = ElemAttr {
            map_fd: fd_u32(self.fd),
            key: std::ptr::from_ref(key) as u64,
            value: std::ptr::from_mut(&mut value) as u64,
            ..Default::default()
        };
        // SAFETY: the map holds `K → V`; the kernel reads one key and writes one value.
        match unsafe { sys_batch(OP, &mut attr) } {
            Ok(()) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(source) => Err(BatchError::Syscall {
                op: OP,
                done: 0,
                source,
            }),
        }
    }

    /// Walks the whole map in chunks of at most `chunk` entries (see [`Self::lookup_batch`]),
    /// calling `f` with each non-empty chunk. Memory stays at one chunk. Returns the number of
    /// entries seen.
    pub fn for_each_chunk(
        &self,
        chunk: u32,
        mut f: impl FnMut(&[K], &[V]),
    ) -> Result<u64, BatchError> {
        let mut cursor = BatchCursor::new();
        let mut keys = Vec::with_capacity(chunk as usize);
        let mut values = Vec::with_capacity(chunk as usize);
        let mut seen = 0u64;
        loop {
            let more = self.lookup_batch(&mut cursor, &mut keys, &mut values, chunk)?;
            if !keys.is_empty() {
                seen += keys.len() as u64;
                f(&keys, &values);
            }
            if !more {
                return Ok(seen);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        os::fd::{AsFd, OwnedFd},
    };

    use super::*;
    use crate::datapath::testing::{create_map, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH};

    /// A 40-byte key and 72-byte value, like the session table's.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
    struct Key([u64; 5]);
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
    struct Value([u64; 9]);

    fn key(i: u64) -> Key {
        Key([i, i.rotate_left(17), 3, 4, 5])
    }

    fn value(i: u64) -> Value {
        Value([i; 9])
    }

    /// A map of `map_type` for `max_entries` holding entries `range`.
    fn filled(map_type: u32, max_entries: u32, range: std::ops::Range<u64>) -> OwnedFd {
        let fd = create_map::<Key, Value>(map_type, max_entries);
        let keys: Vec<Key> = range.clone().map(key).collect();
        let values: Vec<Value> = range.map(value).collect();
        let map = BatchMap::new(fd.as_fd()).expect("Key → Value map");
        map.update_batch(&keys, &values, 0).expect("update");
        fd
    }

    fn dump(map: &BatchMap<'_, Key, Value>, chunk: u32) -> HashMap<Key, Value> {
        let mut all = HashMap::new();
        let seen = map
            .for_each_chunk(chunk, |k, v| {
                assert!(k.len() == v.len());
                for (k, v) in k.iter().zip(v) {
                    assert!(all.insert(*k, *v).is_none(), "key {k:?} seen twice");
                }
            })
            .expect("walk");
        assert_eq!(seen as usize, all.len());
        all
    }

    #[test]
    fn ten_thousand_entries_round_trip_and_half_are_deleted() {
        for map_type in [BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH] {
            // Room to spare: an LRU hash may evict before it is full.
            let fd = filled(map_type, 40_000, 0..10_000);
            let map = BatchMap::new(fd.as_fd()).expect("map");
            let all = dump(&map, 1000);
            assert_eq!(all.len(), 10_000, "map type {map_type}");
            for i in 0..10_000 {
                assert_eq!(all.get(&key(i)), Some(&value(i)));
            }

            let even: Vec<Key> = (0..10_000).step_by(2).map(key).collect();
            assert_eq!(map.delete_batch(&even).expect("delete"), 5_000);
            let left = dump(&map, 777);
            assert_eq!(left.len(), 5_000);
            assert!(left.keys().all(|k| k.0[0] % 2 == 1));
            assert_eq!(map.lookup(&key(7)).expect("lookup"), Some(value(7)));
            assert_eq!(map.lookup(&key(8)).expect("lookup"), None);
        }
    }

    #[test]
    fn delete_skips_missing_keys() {
        let fd = filled(BPF_MAP_TYPE_HASH, 64, 0..10);
        let map = BatchMap::new(fd.as_fd()).expect("map");
        // 100 and 101 were never there; 3 is listed twice.
        let doomed = [key(100), key(1), key(3), key(3), key(101), key(5)];
        assert_eq!(map.delete_batch(&doomed).expect("delete"), 3);
        assert_eq!(dump(&map, 4).len(), 7);
        assert_eq!(map.delete_batch(&[]).expect("nothing"), 0);
    }

    #[test]
    fn tiny_chunks_never_split_a_bucket_and_never_fail() {
        // 1000 keys in 1024 buckets: hundreds of buckets hold two or more, so a chunk of 1
        // meets ENOSPC, and the whole bucket comes back in one chunk.
        let fd = filled(BPF_MAP_TYPE_HASH, 1000, 0..1000);
        let map = BatchMap::<Key, Value>::new(fd.as_fd()).expect("map");
        let mut largest = 0;
        let seen = map.for_each_chunk(1, |k, _| largest = largest.max(k.len()));
        assert_eq!(seen.expect("walk"), 1000);
        assert!(largest > 1, "no bucket held two keys");
        assert_eq!(dump(&map, 1).len(), 1000);
    }

    #[test]
    fn empty_map_and_finished_cursor_yield_nothing() {
        let fd = create_map::<Key, Value>(BPF_MAP_TYPE_LRU_HASH, 128);
        let map = BatchMap::<Key, Value>::new(fd.as_fd()).expect("map");
        let mut cursor = BatchCursor::new();
        let (mut k, mut v) = (Vec::new(), Vec::new());
        assert!(!map
            .lookup_batch(&mut cursor, &mut k, &mut v, 16)
            .expect("lookup"));
        assert!(cursor.is_done() && k.is_empty());
        assert!(!map
            .lookup_batch(&mut cursor, &mut k, &mut v, 16)
            .expect("lookup again"));
        assert!(matches!(
            map.lookup_batch(&mut BatchCursor::new(), &mut k, &mut v, 0),
            Err(BatchError::ZeroChunk { .. })
        ));
    }

    #[test]
    fn maps_of_other_types_are_refused() {
        let fd = create_map::<Key, Value>(BPF_MAP_TYPE_HASH, 8);
        let err = BatchMap::<Key, [u8; 8]>::new(fd.as_fd()).expect_err("wrong value size");
        assert_eq!(
            err.to_string(),
            "the map holds 40-byte keys and 72-byte values, not 40 and 8"
        );
        assert!(BatchMap::<u32, Value>::new(fd.as_fd()).is_err());
        const BPF_MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;
        let per_cpu = create_map::<Key, Value>(BPF_MAP_TYPE_LRU_PERCPU_HASH, 8);
        assert!(matches!(
            BatchMap::<Key, Value>::new(per_cpu.as_fd()),
            Err(BatchError::PerCpu { map_type: 10 })
        ));
    }

    #[test]
    fn update_errors_name_the_operation_and_progress() {
        let fd = create_map::<Key, Value>(BPF_MAP_TYPE_HASH, 4);
        let map = BatchMap::new(fd.as_fd()).expect("map");
        let keys: Vec<Key> = (0..6).map(key).collect();
        let values: Vec<Value> = (0..6).map(value).collect();
        let err = map
            .update_batch(&keys, &values, 0)
            .expect_err("a hash map of 4 cannot hold 6");
        assert_eq!(err.errno(), Some(libc::E2BIG));
        assert!(
            matches!(
                err,
                BatchError::Syscall {
                    op: BatchOp::Update,
                    done: 4,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("BPF_MAP_UPDATE_BATCH failed after 4 elements"),
            "{err}"
        );
        assert!(matches!(
            map.update_batch(&keys, &values[..2], 0),
            Err(BatchError::LengthMismatch {
                keys: 6,
                values: 2,
                ..
            })
        ));
    }
}
