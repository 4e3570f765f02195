//! A fake kernel for unit tests. A test installs one for its thread ([`install`]); while the
//! returned guard lives, [`super::sys_bpf`] on that thread asks the fake instead of the kernel.
//! Other threads (the tests that need root and a real kernel) are not affected.
//!
//! [`FakeHash`] plays a `BPF_MAP_TYPE_HASH` the way `kernel/bpf/hashtab.c` and
//! `kernel/bpf/syscall.c` do: a lookup batch walks whole buckets and answers `ENOSPC` when the
//! next bucket alone does not fit, `ENOENT` at the end (with the last entries); update and
//! delete batches go element by element and report how many were processed when they stop.

use std::{
    cell::RefCell,
    collections::VecDeque,
    fs::File,
    io,
    mem::size_of,
    os::fd::{AsFd as _, BorrowedFd},
    rc::Rc,
};

use bytemuck::Pod;

use super::{
    bpf_attr, bpf_cmd, bpf_map_info, bpf_map_type, fd_u32, map_type_u32, zeroed_info, ObjInfo,
};

type Answer = Box<dyn FnMut(bpf_cmd, &mut bpf_attr) -> io::Result<i64>>;

thread_local! {
    static KERNEL: RefCell<Option<Answer>> = const { RefCell::new(None) };
}

/// The fake's answer to `cmd`, if this thread has one installed.
pub(crate) fn answer(cmd: bpf_cmd, attr: &mut bpf_attr) -> Option<io::Result<i64>> {
    KERNEL.with(|kernel| kernel.borrow_mut().as_mut().map(|f| f(cmd, attr)))
}

/// While this lives, this thread's bpf(2) calls go to the installed fake.
#[must_use = "the fake is removed when this is dropped"]
pub(crate) struct Installed(());

impl Drop for Installed {
    fn drop(&mut self) {
        KERNEL.with(|kernel| kernel.borrow_mut().take());
    }
}

/// Answers this thread's bpf(2) calls with `f` until the guard is dropped. `f` is called
/// only from `sys_bpf`, whose caller promised that the pointers in `attr` are valid for the
/// command: `f` may rely on that, as the kernel does.
pub(crate) fn install(
    f: impl FnMut(bpf_cmd, &mut bpf_attr) -> io::Result<i64> + 'static,
) -> Installed {
    KERNEL.with(|kernel| {
        let previous = kernel.borrow_mut().replace(Box::new(f));
        assert!(previous.is_none(), "a fake kernel is already installed");
    });
    Installed(())
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// Reads element `index` of the `T` array at user address `addr`.
///
/// # Safety
///
/// `addr` must point at an array of at least `index + 1` `T`s (what `sys_bpf`'s caller
/// promised for the command).
unsafe fn get<T: Pod>(addr: u64, index: usize) -> T {
    // SAFETY: this function's contract; unaligned reads, as the kernel copies bytes.
    unsafe { (addr as *const T).add(index).read_unaligned() }
}

/// Writes element `index` of the `T` array at user address `addr`.
///
/// # Safety
///
/// As [`get`], writable.
unsafe fn put<T: Pod>(addr: u64, index: usize, value: T) {
    // SAFETY: this function's contract.
    unsafe { (addr as *mut T).add(index).write_unaligned(value) }
}

/// Answers BPF_OBJ_GET_INFO_BY_FD with `info` as the kernel does: copies as much of it as
/// the caller's buffer holds, and says how much that was.
///
/// # Safety
///
/// `attr` must be a BPF_OBJ_GET_INFO_BY_FD attr as `sys_bpf`'s caller promised it: `info`
/// points at `info_len` writable bytes.
pub(crate) unsafe fn reply_info<T: ObjInfo>(attr: &mut bpf_attr, info: &T) -> io::Result<i64> {
    // SAFETY: `bpf_attr` is integers: reading any member is defined.
    let asked = unsafe { attr.info };
    let len = (asked.info_len as usize).min(size_of::<T>());
    // SAFETY: the caller's buffer holds `info_len` bytes (this function's contract); we
    // write at most that.
    unsafe {
        std::ptr::copy_nonoverlapping(
            std::ptr::from_ref(info).cast::<u8>(),
            asked.info as *mut u8,
            len,
        );
    }
    attr.info.info_len = len as u32;
    Ok(0)
}

/// The bucket index a hash map's lookup token at `in_batch` holds; `None` for no token.
///
/// # Safety
///
/// A non-zero `in_batch` points at a lookup batch's token buffer (at least a `u32`).
unsafe fn token(in_batch: u64) -> Option<u32> {
    // SAFETY: this function's contract.
    (in_batch != 0).then(|| unsafe { get::<u32>(in_batch, 0) })
}

/// One command the fake answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Call {
    pub cmd: bpf_cmd,
    /// The batch count asked for (0 for other commands).
    pub count: u32,
    /// The bucket a lookup batch resumed at (`None`: from the start).
    pub in_batch: Option<u32>,
}

/// What a [`FakeHash`] holds, and what it was asked. Tests read and change it between calls.
pub(crate) struct HashState<K, V> {
    pub map_type: u32,
    pub capacity: usize,
    /// The hash table, bucket by bucket, as the kernel walks it.
    pub buckets: Vec<Vec<(K, V)>>,
    /// Commands answered, in order.
    pub calls: Vec<Call>,
    /// The next command of each listed kind fails with the errno, processing nothing.
    pub faults: VecDeque<(bpf_cmd, i32)>,
    /// A key that deleting fails on, with this errno (a bucket the kernel could not lock).
    pub stuck: Option<(K, i32)>,
    fd: u32,
}

impl<K: Pod, V: Pod> HashState<K, V> {
    pub fn len(&self) -> usize {
        self.buckets.iter().map(Vec::len).sum()
    }

    pub fn contains(&self, key: &K) -> bool {
        self.find(key).is_some()
    }

    fn find(&self, key: &K) -> Option<(usize, usize)> {
        let key = bytemuck::bytes_of(key);
        self.buckets.iter().enumerate().find_map(|(b, entries)| {
            let i = entries
                .iter()
                .position(|(k, _)| bytemuck::bytes_of(k) == key)?;
            Some((b, i))
        })
    }

    fn answer(&mut self, cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
        // SAFETY: every member of `bpf_attr` is integers: reading any is defined.
        let (batch, map_fd) = unsafe { (attr.batch, attr.__bindgen_anon_2.map_fd) };
        let batch_cmd = matches!(
            cmd,
            bpf_cmd::BPF_MAP_LOOKUP_BATCH
                | bpf_cmd::BPF_MAP_UPDATE_BATCH
                | bpf_cmd::BPF_MAP_DELETE_BATCH
        );
        let in_batch = if cmd == bpf_cmd::BPF_MAP_LOOKUP_BATCH {
            // SAFETY: a lookup batch's token, as `sys_bpf`'s caller promised.
            unsafe { token(batch.in_batch) }
        } else {
            None
        };
        self.calls.push(Call {
            cmd,
            count: if batch_cmd { batch.count } else { 0 },
            in_batch,
        });
        let fd = if cmd == bpf_cmd::BPF_OBJ_GET_INFO_BY_FD {
            // SAFETY: as above.
            unsafe { attr.info.bpf_fd }
        } else if batch_cmd {
            batch.map_fd
        } else {
            map_fd
        };
        if fd != self.fd {
            return Err(errno(libc::EBADF));
        }
        if let Some(at) = self.faults.iter().position(|(c, _)| *c == cmd) {
            let (_, e) = self.faults.remove(at).unwrap_or((cmd, libc::EIO));
            if batch_cmd {
                attr.batch.count = 0;
            }
            return Err(errno(e));
        }
        match cmd {
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD => self.info(attr),
            bpf_cmd::BPF_MAP_LOOKUP_BATCH => self.lookup_batch(attr),
            bpf_cmd::BPF_MAP_UPDATE_BATCH => self.update_batch(attr),
            bpf_cmd::BPF_MAP_DELETE_BATCH => self.delete_batch(attr),
            bpf_cmd::BPF_MAP_LOOKUP_ELEM => self.lookup_elem(attr),
            _ => Err(errno(libc::EINVAL)),
        }
    }

    fn info(&self, attr: &mut bpf_attr) -> io::Result<i64> {
        let mut info: bpf_map_info = zeroed_info();
        info.type_ = self.map_type;
        info.key_size = size_of::<K>() as u32;
        info.value_size = size_of::<V>() as u32;
        info.max_entries = self.capacity as u32;
        // SAFETY: `attr` came through `sys_bpf` for BPF_OBJ_GET_INFO_BY_FD.
        unsafe { reply_info(attr, &info) }
    }

    /// `__htab_map_lookup_and_delete_batch` without the delete.
    fn lookup_batch(&mut self, attr: &mut bpf_attr) -> io::Result<i64> {
        // SAFETY: integers.
        let batch = unsafe { attr.batch };
        // SAFETY: as in `answer`.
        let start = unsafe { token(batch.in_batch) }.unwrap_or(0) as usize;
        if start >= self.buckets.len() {
            return Err(errno(libc::ENOENT));
        }
        let (mut bucket, mut total, mut result) = (start, 0usize, Ok(0));
        while let Some(entries) = self.buckets.get(bucket) {
            if entries.len() > batch.count as usize - total {
                if total == 0 {
                    result = Err(errno(libc::ENOSPC));
                }
                break;
            }
            for (i, (k, v)) in entries.iter().enumerate() {
                // SAFETY: the caller's arrays hold `count` keys and values, and
                // `total + i < count` (checked above).
                unsafe {
                    put(batch.keys, total + i, *k);
                    put(batch.values, total + i, *v);
                }
            }
            total += entries.len();
            bucket += 1;
            if bucket == self.buckets.len() {
                result = Err(errno(libc::ENOENT));
            }
        }
        // SAFETY: the token buffer holds a `u32` at least.
        unsafe { put(batch.out_batch, 0, bucket as u32) };
        attr.batch.count = total as u32;
        result
    }

    /// `generic_map_update_batch`: element by element, `E2BIG` when full.
    fn update_batch(&mut self, attr: &mut bpf_attr) -> io::Result<i64> {
        // SAFETY: integers.
        let batch = unsafe { attr.batch };
        let mut done = 0;
        let result = loop {
            if done == batch.count {
                break Ok(0);
            }
            // SAFETY: the caller's arrays hold `count` keys and values.
            let (k, v) = unsafe {
                (
                    get::<K>(batch.keys, done as usize),
                    get::<V>(batch.values, done as usize),
                )
            };
            match self.find(&k) {
                Some((b, i)) => self.buckets[b][i].1 = v,
                None if self.len() >= self.capacity => break Err(errno(libc::E2BIG)),
                None => {
                    let n = self.buckets.len().max(1);
                    let bucket = bytemuck::bytes_of(&k)
                        .iter()
                        .map(|&b| usize::from(b))
                        .sum::<usize>()
                        % n;
                    self.buckets.resize_with(n, Vec::new);
                    self.buckets[bucket].push((k, v));
                }
            }
            done += 1;
        };
        attr.batch.count = done;
        result
    }

    /// `generic_map_delete_batch`: element by element; stops at the first key it cannot
    /// delete (`ENOENT` for a missing one).
    fn delete_batch(&mut self, attr: &mut bpf_attr) -> io::Result<i64> {
        // SAFETY: integers.
        let batch = unsafe { attr.batch };
        let mut done = 0;
        let result = loop {
            if done == batch.count {
                break Ok(0);
            }
            // SAFETY: the caller's array holds `count` keys.
            let k = unsafe { get::<K>(batch.keys, done as usize) };
            if let Some((stuck, e)) = self.stuck {
                if bytemuck::bytes_of(&stuck) == bytemuck::bytes_of(&k) {
                    break Err(errno(e));
                }
            }
            let Some((b, i)) = self.find(&k) else {
                break Err(errno(libc::ENOENT));
            };
            self.buckets[b].remove(i);
            done += 1;
        };
        attr.batch.count = done;
        result
    }

    fn lookup_elem(&self, attr: &mut bpf_attr) -> io::Result<i64> {
        // SAFETY: integers.
        let elem = unsafe { attr.__bindgen_anon_2 };
        // SAFETY: the caller's key and value point at one `K` and one `V`.
        let k = unsafe { get::<K>(elem.key, 0) };
        let (b, i) = self.find(&k).ok_or_else(|| errno(libc::ENOENT))?;
        // SAFETY: as above; `value` is the member of the elem attr's union we mean.
        unsafe { put(elem.__bindgen_anon_1.value, 0, self.buckets[b][i].1) };
        Ok(0)
    }
}

/// A fake `BPF_MAP_TYPE_HASH` of `K → V` answering this thread's bpf(2) calls on its fd.
pub(crate) struct FakeHash<K, V> {
    state: Rc<RefCell<HashState<K, V>>>,
    /// A real fd, so the code under test has one to pass (the fake checks it is this one).
    file: File,
    _installed: Installed,
}

impl<K: Pod, V: Pod> FakeHash<K, V> {
    /// A hash map laid out in `buckets` (the kernel's walk order), with room for `capacity`.
    pub fn new(buckets: Vec<Vec<(K, V)>>, capacity: usize) -> Self {
        let file = File::open("/dev/null").unwrap_or_else(|e| panic!("/dev/null: {e}"));
        let state = Rc::new(RefCell::new(HashState {
            map_type: map_type_u32(bpf_map_type::BPF_MAP_TYPE_HASH),
            capacity,
            buckets,
            calls: Vec::new(),
            faults: VecDeque::new(),
            stuck: None,
            fd: fd_u32(file.as_fd()),
        }));
        let kernel = Rc::clone(&state);
        let installed = install(move |cmd, attr| kernel.borrow_mut().answer(cmd, attr));
        FakeHash {
            state,
            file,
            _installed: installed,
        }
    }

    /// The map's fd, as the code under test gets it.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The map's content and the calls it answered.
    pub fn state(&self) -> std::cell::RefMut<'_, HashState<K, V>> {
        self.state.borrow_mut()
    }

    /// The calls answered so far, forgetting them.
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.state().calls)
    }
}
