//! Test builds count the heap bytes each thread holds, so that a test can measure what a
//! structure grows to: bytes allocated minus bytes freed, on the calling thread.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
};

thread_local! {
    static HELD: Cell<isize> = const { Cell::new(0) };
}

fn add(bytes: usize, sign: isize) {
    let n = isize::try_from(bytes).unwrap_or(isize::MAX) * sign;
    // Not during the thread's teardown: nothing is measured then.
    let _ = HELD.try_with(|h| h.set(h.get().saturating_add(n)));
}

struct Counting;

// SAFETY: every call goes to the system allocator unchanged; only a counter is kept beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size(), 1);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size(), 1);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) };
        add(layout.size(), -1);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            add(new_size, 1);
            add(layout.size(), -1);
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Heap bytes this thread allocated and has not freed.
pub fn held() -> isize {
    HELD.try_with(Cell::get).unwrap_or(0)
}
