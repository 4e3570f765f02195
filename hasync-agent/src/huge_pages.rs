//! The agent's allocator: the system's, asking for transparent huge pages for large blocks.
//!
//! The sync's hottest structures are large and read at random: a peer's outbox (a hash set of
//! up to 262,144 pending keys, tens of MiB while a peer catches up) and the batches around
//! it. With 4 KiB pages every random access there is a TLB miss as well as a cache miss, and
//! under virtualisation a TLB miss walks two page tables. Hosts default to transparent huge
//! pages "on request" (`madvise`), and glibc does not request them. So blocks of
//! [`ADVISE_FROM`] and more are advised `MADV_HUGEPAGE`: the kernel backs their 2 MiB-aligned
//! part with huge pages where it can. Smaller blocks, and hosts with huge pages off, are left
//! as they are; the advice changes no contents and failing is harmless.

use std::alloc::{GlobalAlloc, Layout, System};

/// The size of a transparent huge page on x86-64 and arm64 (4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;
/// The smallest block that is advised: one that can hold a whole aligned huge page or more.
pub const ADVISE_FROM: usize = 2 * HUGE_PAGE;

/// [`System`], with large blocks advised to use transparent huge pages.
pub struct LargeOnHugePages;

// SAFETY: every call is passed to `System` unchanged; `advise` only gives advice on memory
// inside the block `System` returned, and never reads or writes it.
unsafe impl GlobalAlloc for LargeOnHugePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc`, passed on.
        let block = unsafe { System.alloc(layout) };
        advise(block, layout.size());
        block
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
        let block = unsafe { System.alloc_zeroed(layout) };
        advise(block, layout.size());
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(block, layout) }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc`, passed on.
        let moved = unsafe { System.realloc(block, layout, new_size) };
        advise(moved, new_size);
        moved
    }
}

/// Advises the whole huge pages inside `block` (`size` bytes) to be huge, if it is large.
fn advise(block: *mut u8, size: usize) {
    if block.is_null() || size < ADVISE_FROM {
        return;
    }
    let Some((start, len)) = huge_span(block as usize, size) else {
        return;
    };
    // SAFETY: `start..start + len` lies inside the block just allocated, which this process
    // owns; `MADV_HUGEPAGE` changes how it is backed, not what it holds. An error (huge pages
    // not built in) leaves the block as it was.
    unsafe {
        libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
}

/// The start and length of the huge-page-aligned part of `addr..addr + size`, if any.
fn huge_span(addr: usize, size: usize) -> Option<(usize, usize)> {
    let start = addr.checked_next_multiple_of(HUGE_PAGE)?;
    let end = addr.checked_add(size)? / HUGE_PAGE * HUGE_PAGE;
    (end > start).then(|| (start, end - start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_aligned_huge_pages_are_advised() {
        const H: usize = HUGE_PAGE;
        assert_eq!(huge_span(H, 2 * H), Some((H, 2 * H)));
        assert_eq!(huge_span(H + 16, 2 * H), Some((2 * H, H)));
        assert_eq!(huge_span(H + 16, H), None);
        assert_eq!(huge_span(usize::MAX - 10, 4 * H), None);
    }

    /// The `VmFlags` of the mapping that holds `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = (a..b).contains(&addr);
                    continue;
                }
            }
            if let Some(flags) = line.strip_prefix("VmFlags:").filter(|_| inside) {
                return flags.trim().to_owned();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn a_large_block_is_advised_huge_and_keeps_its_contents_when_grown() {
        let alloc = LargeOnHugePages;
        let small = Layout::from_size_align(4096, 8).expect("layout");
        let large = Layout::from_size_align(8 * HUGE_PAGE, 8).expect("layout");
        // SAFETY: valid, non-zero layouts; each block is freed with the layout it has.
        unsafe {
            let s = alloc.alloc(small);
            assert!(!s.is_null());
            let block = alloc.alloc(large);
            assert!(!block.is_null());
            let inner = (block as usize).next_multiple_of(HUGE_PAGE);
            let flags = vm_flags(inner);
            assert!(flags.split(' ').any(|f| f == "hg"), "not advised: {flags}");
            block.write_bytes(0xa5, large.size());
            let grown = alloc.realloc(block, large, 16 * HUGE_PAGE);
            assert!(!grown.is_null());
            assert!(std::slice::from_raw_parts(grown, large.size())
                .iter()
                .all(|b| *b == 0xa5));
            let inner = (grown as usize).next_multiple_of(HUGE_PAGE);
            let flags = vm_flags(inner + 8 * HUGE_PAGE);
            assert!(flags.split(' ').any(|f| f == "hg"), "grown part: {flags}");
            alloc.dealloc(
                grown,
                Layout::from_size_align(16 * HUGE_PAGE, 8).expect("layout"),
            );
            alloc.dealloc(s, small);
        }
    }
}
