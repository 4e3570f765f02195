//! Batch map operations (`BPF_MAP_{LOOKUP,UPDATE,DELETE}_BATCH`), which aya 0.14 lacks, and
//! the single-element lookup that goes with them.
//!
//! A safe wrapper around the bpf(2) syscall ([`super::sys`]) on a bare map fd: the agent walks
//! the session table in bounded chunks with these, never keeping a copy of it. The unit tests
//! play the kernel with a fake (`sys::fake`) for the edge cases below; the ones that need root
//! check them against the real one.
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

use std::{io, marker::PhantomData, mem::size_of, os::fd::BorrowedFd};

use bytemuck::Pod;

use super::sys::{
    bpf_attr, bpf_cmd, bpf_map_info, bpf_map_type, fd_u32, map_type_u32, obj_info, sys_bpf,
    zeroed_attr,
};

// Kept at this path for the callers outside the datapath (tests, benches).
pub use super::sys::{create_map, link_detach, obj_get, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH};

/// What one lookup call read.
enum Lookup {
    /// `got` entries; `more`: the end of the map is not reached yet.
    Read { got: u32, more: bool },
    /// Nothing: the next bucket holds more entries than were asked for.
    BucketTooLarge,
}

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

    const fn cmd(self) -> bpf_cmd {
        match self {
            BatchOp::LookupElem => bpf_cmd::BPF_MAP_LOOKUP_ELEM,
            BatchOp::Info => bpf_cmd::BPF_OBJ_GET_INFO_BY_FD,
            BatchOp::Lookup => bpf_cmd::BPF_MAP_LOOKUP_BATCH,
            BatchOp::Update => bpf_cmd::BPF_MAP_UPDATE_BATCH,
            BatchOp::Delete => bpf_cmd::BPF_MAP_DELETE_BATCH,
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
    /// The syscall failed; `done` elements were processed before the failure (update/delete;
    /// a delete counts the keys it skipped as missing among them).
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

/// A `bpf_attr` for a batch command on `fd`: `count` keys and values at `keys` and `values`.
fn batch_attr(fd: BorrowedFd<'_>, keys: u64, values: u64, count: u32) -> bpf_attr {
    let mut attr = zeroed_attr();
    attr.batch.map_fd = fd_u32(fd);
    attr.batch.keys = keys;
    attr.batch.values = values;
    attr.batch.count = count;
    attr
}

/// The batch `count` the kernel wrote back: how many elements it returned or processed.
fn batch_count(attr: &bpf_attr) -> u32 {
    // SAFETY: `bpf_attr` is a union of integer structs: reading any member is defined.
    unsafe { attr.batch.count }
}

/// Issues one map command on `attr` (its member for `op`), which the kernel updates in place
/// (batch `count`, tokens).
///
/// # Safety
///
/// Every non-zero pointer in `attr` must be valid for what the command does with it: `keys`
/// and `values` for `count` elements of the map's key and value size (written by lookup, read
/// by update/delete), `in_batch`/`out_batch` for a token of the map's token size, `key`/`value`
/// for one key and value.
unsafe fn sys_batch(op: BatchOp, attr: &mut bpf_attr) -> io::Result<()> {
    // SAFETY: this function's contract.
    unsafe { sys_bpf(op.cmd(), attr) }.map(drop)
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

/// Map types whose values are per CPU.
const PER_CPU_MAP_TYPES: [bpf_map_type; 4] = [
    bpf_map_type::BPF_MAP_TYPE_PERCPU_HASH,
    bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY,
    bpf_map_type::BPF_MAP_TYPE_LRU_PERCPU_HASH,
    bpf_map_type::BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE,
];

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
        let info: bpf_map_info = obj_info(fd).map_err(|source| BatchError::Syscall {
            op: OP,
            done: 0,
            source,
        })?;
        let (map_type, key_size, value_size) = (info.type_, info.key_size, info.value_size);
        let (want_key, want_value) = (size_of::<K>(), size_of::<V>());
        if key_size as usize != want_key || value_size as usize != want_value {
            return Err(BatchError::WrongSizes {
                key_size,
                value_size,
                want_key,
                want_value,
            });
        }
        if PER_CPU_MAP_TYPES.map(map_type_u32).contains(&map_type) {
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
            let (got, more) = match self.lookup_once(cursor, keys, values, asked)? {
                Lookup::Read { got, more } => (got, more),
                Lookup::BucketTooLarge => {
                    // The next bucket alone does not fit: ask again for more, in that place.
                    if asked >= MAX_BUCKET_RETRY {
                        return Err(BatchError::BucketTooLarge { op: OP, max: asked });
                    }
                    // The kernel wrote that bucket's token: resume there, not at the start.
                    cursor.started = true;
                    asked = asked.saturating_mul(2).min(MAX_BUCKET_RETRY);
                    continue;
                }
            };
            if got > asked {
                return Err(BatchError::Overrun { op: OP, got, asked });
            }
            keys.truncate(got as usize);
            values.truncate(got as usize);
            cursor.started = true;
            cursor.done = !more;
            return Ok(more);
        }
    }

    /// One BPF_MAP_LOOKUP_BATCH of up to `asked` entries at `cursor` into `keys` and `values`
    /// (resized to `asked`, zeroed; the caller cuts them to what was read).
    fn lookup_once(
        &self,
        cursor: &mut BatchCursor,
        keys: &mut Vec<K>,
        values: &mut Vec<V>,
        asked: u32,
    ) -> Result<Lookup, BatchError> {
        // Zeroed room for `asked` of each (plain data: zero is a valid value).
        keys.resize(asked as usize, K::zeroed());
        values.resize(asked as usize, V::zeroed());
        // The kernel reads the token from `in_batch` and writes the next one to `out_batch`;
        // both may point at the same buffer (it reads before it writes).
        let token = cursor.token.as_mut_ptr() as u64;
        let (k, v) = (keys.as_mut_ptr() as u64, values.as_mut_ptr() as u64);
        let mut attr = batch_attr(self.fd, k, v, asked);
        attr.batch.in_batch = if cursor.started { token } else { 0 };
        attr.batch.out_batch = token;
        // SAFETY: the map holds `K → V` (checked in `new`) and `keys`/`values` hold `asked` of
        // them; the token buffer holds max(8, size_of::<K>()) bytes, which covers both token
        // kinds.
        let res = unsafe { sys_batch(BatchOp::Lookup, &mut attr) };
        let got = batch_count(&attr);
        match res {
            Ok(()) => Ok(Lookup::Read { got, more: true }),
            Err(e) => match e.raw_os_error() {
                Some(libc::ENOENT) => Ok(Lookup::Read { got, more: false }),
                Some(libc::ENOSPC) if got == 0 => Ok(Lookup::BucketTooLarge),
                _ => Err(BatchError::Syscall {
                    op: BatchOp::Lookup,
                    done: 0,
                    source: e,
                }),
            },
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
        let mut attr = batch_attr(self.fd, keys.as_ptr() as u64, values.as_ptr() as u64, count);
        attr.batch.elem_flags = flags;
        // SAFETY: the map holds `K → V`; the kernel reads `count` of each, which the slices
        // hold.
        unsafe { sys_batch(OP, &mut attr) }.map_err(|source| BatchError::Syscall {
            op: OP,
            done: batch_count(&attr) as usize,
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
            let mut attr = batch_attr(self.fd, rest.as_ptr() as u64, 0, count);
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
                    let done = (batch_count(&attr) as usize).min(rest.len());
                    deleted += done;
                    rest = rest.get(done + 1..).unwrap_or_default();
                }
                Err(source) => {
                    let done = (batch_count(&attr) as usize).min(rest.len());
                    return Err(BatchError::Syscall {
                        op: OP,
                        done: keys.len() - rest.len() + done,
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
        let mut attr = zeroed_attr();
        attr.__bindgen_anon_2.map_fd = fd_u32(self.fd);
        attr.__bindgen_anon_2.key = std::ptr::from_ref(key) as u64;
        attr.__bindgen_anon_2.__bindgen_anon_1.value = std::ptr::from_mut(&mut value) as u64;
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
        let lru_percpu_hash = map_type_u32(bpf_map_type::BPF_MAP_TYPE_LRU_PERCPU_HASH);
        let per_cpu = create_map::<Key, Value>(lru_percpu_hash, 8);
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

    /// The batch logic against a fake kernel (`sys::fake`), which plays a hash map bucket by
    /// bucket as `kernel/bpf/hashtab.c` does: no root needed.
    mod fake_kernel {
        use super::{key, value, Key, Value};
        use crate::datapath::{
            batch::{BatchCursor, BatchError, BatchMap, BatchOp},
            sys::{
                bpf_cmd, bpf_map_type,
                fake::{Call, FakeHash},
                map_type_u32,
            },
        };

        /// The entries `ids` as one bucket.
        fn bucket(ids: impl IntoIterator<Item = u64>) -> Vec<(Key, Value)> {
            ids.into_iter().map(|i| (key(i), value(i))).collect()
        }

        fn ids(keys: &[Key]) -> Vec<u64> {
            keys.iter().map(|k| k.0[0]).collect()
        }

        fn lookup(in_batch: Option<u32>, count: u32) -> Call {
            Call {
                cmd: bpf_cmd::BPF_MAP_LOOKUP_BATCH,
                count,
                in_batch,
            }
        }

        fn delete(count: u32) -> Call {
            Call {
                cmd: bpf_cmd::BPF_MAP_DELETE_BATCH,
                count,
                in_batch: None,
            }
        }

        /// A fake hash map of `buckets`, with room for 64.
        fn fake(buckets: Vec<Vec<(Key, Value)>>) -> FakeHash<Key, Value> {
            FakeHash::new(buckets, 64)
        }

        /// The fake as a `BatchMap`, the calls of its check forgotten.
        fn map_of(fake: &FakeHash<Key, Value>) -> BatchMap<'_, Key, Value> {
            let map = BatchMap::new(fake.fd()).expect("a Key → Value map");
            fake.take_calls();
            map
        }

        /// Walks the map chunk by chunk with `lookup_batch` (at most 20 chunks): the ids of
        /// each chunk, checking every value goes with its key.
        fn walk(map: &BatchMap<'_, Key, Value>, max: u32) -> Vec<Vec<u64>> {
            let (mut cursor, mut chunks) = (BatchCursor::new(), Vec::new());
            let (mut k, mut v) = (Vec::new(), Vec::new());
            for _ in 0..20 {
                let more = map
                    .lookup_batch(&mut cursor, &mut k, &mut v, max)
                    .expect("chunk");
                let values: Vec<Value> = k.iter().map(|k| value(k.0[0])).collect();
                assert_eq!(v, values, "values of {:?}", ids(&k));
                chunks.push(ids(&k));
                if !more {
                    assert!(cursor.is_done());
                    return chunks;
                }
            }
            panic!("no end of the map after 20 chunks: {chunks:?}");
        }

        /// Chunks never split a bucket: one larger than the chunk is asked for again (ENOSPC)
        /// with twice the count, at that bucket, until it fits; the end of the map comes with
        /// the last entries (ENOENT), and a finished cursor asks the kernel nothing more.
        #[test]
        fn walks_retry_enospc_at_the_bucket_and_end_at_enoent() {
            struct Row {
                buckets: Vec<Vec<u64>>,
                max: u32,
                chunks: Vec<Vec<u64>>,
                calls: Vec<Call>,
            }
            let rows = [
                // A bucket of five after a chunk of one: 2 and 4 do not fit, 8 does (and
                // takes the last bucket, and the end, with it).
                Row {
                    buckets: vec![vec![0], vec![1, 2, 3, 4, 5], vec![], vec![6]],
                    max: 2,
                    chunks: vec![vec![0], vec![1, 2, 3, 4, 5, 6]],
                    calls: vec![
                        lookup(None, 2),
                        lookup(Some(1), 2),
                        lookup(Some(1), 4),
                        lookup(Some(1), 8),
                    ],
                },
                // The very first bucket with entries is too large: the retry resumes at the
                // bucket the kernel named, not at the start.
                Row {
                    buckets: vec![vec![], vec![], vec![0, 1, 2], vec![3]],
                    max: 1,
                    chunks: vec![vec![0, 1, 2, 3]],
                    calls: vec![lookup(None, 1), lookup(Some(2), 2), lookup(Some(2), 4)],
                },
                // A chunk stops before a bucket that does not fit in what is left of it.
                Row {
                    buckets: vec![vec![0], vec![1], vec![2, 3]],
                    max: 3,
                    chunks: vec![vec![0, 1], vec![2, 3]],
                    calls: vec![lookup(None, 3), lookup(Some(2), 3)],
                },
                // The last entries come with ENOENT.
                Row {
                    buckets: vec![vec![0, 1]],
                    max: 2,
                    chunks: vec![vec![0, 1]],
                    calls: vec![lookup(None, 2)],
                },
                // An empty map: one call, nothing.
                Row {
                    buckets: vec![vec![], vec![]],
                    max: 4,
                    chunks: vec![vec![]],
                    calls: vec![lookup(None, 4)],
                },
            ];
            for (i, row) in rows.into_iter().enumerate() {
                let fake = fake(row.buckets.into_iter().map(bucket).collect());
                let map = map_of(&fake);
                assert_eq!(walk(&map, row.max), row.chunks, "row {i}");
                assert_eq!(fake.take_calls(), row.calls, "row {i}");
            }
        }

        #[test]
        fn a_finished_walk_asks_the_kernel_nothing() {
            let fake = fake(vec![bucket([0])]);
            let map = map_of(&fake);
            let mut cursor = BatchCursor::new();
            let (mut k, mut v) = (Vec::new(), Vec::new());
            assert!(!map
                .lookup_batch(&mut cursor, &mut k, &mut v, 8)
                .expect("all"));
            fake.take_calls();
            assert!(!map
                .lookup_batch(&mut cursor, &mut k, &mut v, 8)
                .expect("again"));
            assert!(k.is_empty() && v.is_empty());
            assert_eq!(fake.take_calls(), []);
        }

        /// A bucket larger than the largest count we ask for is an error naming the command,
        /// after doubling up to that count.
        #[test]
        fn a_bucket_too_large_for_any_request_is_an_error() {
            let fake = fake(vec![bucket(0..=65_536)]);
            let map = map_of(&fake);
            let mut cursor = BatchCursor::new();
            let (mut k, mut v) = (vec![key(9)], vec![value(9)]);
            let err = map
                .lookup_batch(&mut cursor, &mut k, &mut v, 1)
                .expect_err("65537 entries in one bucket");
            assert!(
                matches!(err, BatchError::BucketTooLarge { max: 65_536, .. }),
                "{err:?}"
            );
            assert_eq!(
                err.to_string(),
                "BPF_MAP_LOOKUP_BATCH: a hash bucket holds more than 65536 entries"
            );
            let asked: Vec<u32> = fake.take_calls().iter().map(|c| c.count).collect();
            assert_eq!(asked, (0..=16).map(|p| 1 << p).collect::<Vec<u32>>());
            assert!(k.is_empty() && v.is_empty(), "nothing half-read is left");
        }

        /// An error the walk does not expect is passed up naming the command and the errno;
        /// nothing of the failed chunk is left, and the walk can go on from where it was.
        #[test]
        fn a_lookup_error_is_passed_up_and_the_walk_can_go_on() {
            let fake = fake(vec![bucket([0]), bucket([1]), bucket([2])]);
            let map = map_of(&fake);
            let mut cursor = BatchCursor::new();
            let (mut k, mut v) = (Vec::new(), Vec::new());
            assert!(map
                .lookup_batch(&mut cursor, &mut k, &mut v, 1)
                .expect("first"));
            assert_eq!(ids(&k), [0]);
            fake.state()
                .faults
                .push_back((bpf_cmd::BPF_MAP_LOOKUP_BATCH, libc::EBUSY));
            let err = map
                .lookup_batch(&mut cursor, &mut k, &mut v, 1)
                .expect_err("EBUSY");
            assert_eq!(err.errno(), Some(libc::EBUSY));
            assert!(
                err.to_string().starts_with(
                    "BPF_MAP_LOOKUP_BATCH failed after 0 elements: Device or resource busy"
                ),
                "{err}"
            );
            assert!(k.is_empty() && v.is_empty(), "nothing half-read is left");
            assert!(!cursor.is_done());
            assert!(map
                .lookup_batch(&mut cursor, &mut k, &mut v, 1)
                .expect("on"));
            assert_eq!(ids(&k), [1]);
            let calls = fake.take_calls();
            assert_eq!(calls[1..], [lookup(Some(1), 1), lookup(Some(1), 1)]);
        }

        /// A delete batch stops at a missing key (ENOENT, with the count done before it): the
        /// rest is deleted in the next call, past that key.
        #[test]
        fn deletes_skip_missing_keys_and_count_what_went() {
            let fake = fake(vec![bucket(0..6)]);
            let map = map_of(&fake);
            let doomed = [1, 100, 3, 101, 102, 5].map(key);
            assert_eq!(map.delete_batch(&doomed).expect("delete"), 3);
            assert_eq!(
                fake.take_calls(),
                [delete(6), delete(4), delete(2), delete(1)]
            );
            let state = fake.state();
            let left: Vec<bool> = (0..6).map(|i| state.contains(&key(i))).collect();
            assert_eq!(left, [true, false, true, false, true, false]);
        }

        /// A delete that fails for another reason says how far it got, over all the calls it
        /// made: the keys before the failing one, deleted or skipped as missing.
        #[test]
        fn a_failed_delete_reports_how_many_went_before() {
            let fake = fake(vec![bucket(0..6)]);
            fake.state().stuck = Some((key(4), libc::EBUSY));
            let map = map_of(&fake);
            let doomed = [1, 100, 2, 3, 4, 5].map(key);
            let err = map.delete_batch(&doomed).expect_err("key 4 is stuck");
            assert!(
                matches!(
                    err,
                    BatchError::Syscall {
                        op: BatchOp::Delete,
                        done: 4,
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(
                err.to_string().starts_with(
                    "BPF_MAP_DELETE_BATCH failed after 4 elements: Device or resource busy"
                ),
                "{err}"
            );
            assert_eq!(fake.take_calls(), [delete(6), delete(4)]);
            assert_eq!(fake.state().len(), 3, "0, 4 and 5 are left");
        }

        /// An update stops where the kernel stopped (the map is full) and says so.
        #[test]
        fn an_update_into_a_full_map_reports_how_many_went_in() {
            let fake = FakeHash::<Key, Value>::new(vec![vec![]; 4], 4);
            let map = map_of(&fake);
            let keys: Vec<Key> = (0..6).map(key).collect();
            let values: Vec<Value> = (0..6).map(value).collect();
            let err = map.update_batch(&keys, &values, 0).expect_err("full");
            assert_eq!(err.errno(), Some(libc::E2BIG));
            assert!(
                err.to_string()
                    .starts_with("BPF_MAP_UPDATE_BATCH failed after 4 elements"),
                "{err}"
            );
            assert_eq!(map.lookup(&key(3)).expect("lookup"), Some(value(3)));
            assert_eq!(map.lookup(&key(4)).expect("lookup"), None);
        }

        /// `BatchMap::new` reads the map's info and refuses other sizes and per-CPU values.
        #[test]
        fn maps_of_other_shapes_are_refused() {
            let fake = FakeHash::<Key, Value>::new(Vec::new(), 4);
            let err = BatchMap::<Key, [u8; 8]>::new(fake.fd()).expect_err("value size");
            assert_eq!(
                err.to_string(),
                "the map holds 40-byte keys and 72-byte values, not 40 and 8"
            );
            fake.state().map_type = map_type_u32(bpf_map_type::BPF_MAP_TYPE_LRU_PERCPU_HASH);
            assert!(matches!(
                BatchMap::<Key, Value>::new(fake.fd()),
                Err(BatchError::PerCpu { map_type: 10 })
            ));
        }
    }
}
