//! The agent's allocator: the system's, asking for transparent huge pages for large blocks.
//!
//! The sync's hottest structures are large and read at random: the sync's backlog (a hash map
//! of up to 262,144 keys queued for the peers, tens of MiB while they catch up) and the batches around
//! it. With 4 KiB pages every random access there is a TLB miss as well as a cache miss, and
//! under virtualisation a TLB miss walks two page tables. Many hosts give transparent huge
//! pages only on request (`madvise`, Debian's default), and glibc does not request them. So blocks of [`ADVISE_FROM`] and more are advised `MADV_HUGEPAGE`, their
//! whole mapping: the kernel backs its 2 MiB-aligned part with huge pages where it can.
//! Smaller blocks, and hosts with huge pages off, are left as they are; the advice changes no
//! contents and failing is harmless.

use std::alloc::{GlobalAlloc, Layout, System};

/// The base page size of x86-64 and arm64's usual configuration; a larger one only makes
/// the advised span start and end inside the block's own pages.
const PAGE: usize = 4096;
/// The size of a transparent huge page with 4 KiB base pages.
const HUGE_PAGE: usize = 2 << 20;
/// The smallest block that is advised: one that holds a whole aligned huge page or more.
pub const ADVISE_FROM: usize = 2 * HUGE_PAGE;

/// [`System`], with large blocks advised to use transparent huge pages.
pub struct LargeOnHugePages;

// SAFETY: every call is passed to `System` unchanged; `advise` only gives advice on the pages
// that hold the block `System` returned, and never reads or writes them.
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

/// Advises the pages of `block` (`size` bytes) to be huge, if it is large.
fn advise(block: *mut u8, size: usize) {
    if block.is_null() || size < ADVISE_FROM {
        return;
    }
    let Some((start, len)) = page_span(block as usize, size) else {
        return;
    };
    let errno = std::io::Error::last_os_error().raw_os_error();
    // SAFETY: `start..start + len` is the block's own pages: glibc gives a block this large a
    // mapping of its own, and this is all of it, so the mapping stays one region and glibc can
    // still grow it in place (`mremap` refuses a range split by advice on part of it). Were
    // the block in a heap instead, its first and last pages may hold a neighbour's bytes too:
    // `MADV_HUGEPAGE` changes how pages are backed, never what they hold. An error (huge pages
    // not built in) leaves everything as it was.
    let failed = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    if failed != 0 {
        if let Some(errno) = errno {
            // The allocator must not change what a caller reads from errno after a call that
            // failed before it allocated.
            // SAFETY: this thread's errno slot, always valid.
            unsafe { *libc::__errno_location() = errno };
        }
    }
}

/// The start and length of the whole pages that hold `addr..addr + size`.
fn page_span(addr: usize, size: usize) -> Option<(usize, usize)> {
    let start = addr / PAGE * PAGE;
    let end = addr.checked_add(size)?.checked_next_multiple_of(PAGE)?;
    Some((start, end - start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_span_is_the_whole_pages_of_the_block() {
        assert_eq!(page_span(PAGE + 16, 3 * PAGE), Some((PAGE, 4 * PAGE)));
        assert_eq!(page_span(2 * PAGE, PAGE), Some((2 * PAGE, PAGE)));
        assert_eq!(page_span(usize::MAX - 10, 4 * PAGE), None);
    }

    /// Kernels built without transparent huge pages refuse the advice: nothing to check there.
    fn huge_pages_built_in() -> bool {
        std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists()
    }

    /// The mapping that holds `addr`, from /proc/self/smaps: its range and `VmFlags`.
    fn mapping(addr: usize) -> ((usize, usize), String) {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut inside = None;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = (a..b).contains(&addr).then_some((a, b));
                    continue;
                }
            }
            if let (Some(range), Some(flags)) = (inside, line.strip_prefix("VmFlags:")) {
                return (range, flags.trim().to_owned());
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    fn advised(flags: &str) -> bool {
        flags.split(' ').any(|f| f == "hg")
    }

    /// A large block is advised whole: one mapping, so glibc can still grow it in place.
    #[test]
    fn a_large_block_is_advised_whole_and_keeps_its_contents_when_grown() {
        if !huge_pages_built_in() {
            eprintln!("skipped: this kernel has no transparent huge pages");
            return;
        }
        let alloc = LargeOnHugePages;
        let large = Layout::from_size_align(8 * HUGE_PAGE, 8).expect("layout");
        let grown_size = 16 * HUGE_PAGE;
        // SAFETY: a valid, non-zero layout; the block is freed with the layout it has.
        unsafe {
            let block = alloc.alloc(large);
            assert!(!block.is_null());
            let (range, flags) = mapping(block as usize);
            assert!(advised(&flags), "not advised: {flags}");
            let end = block as usize + large.size();
            assert!(
                range.1 >= end,
                "the block spans mappings: {range:x?}, ends at {end:#x}"
            );
            block.write_bytes(0xa5, large.size());
            let grown = alloc.realloc(block, large, grown_size);
            assert!(!grown.is_null());
            assert!(std::slice::from_raw_parts(grown, large.size())
                .iter()
                .all(|b| *b == 0xa5));
            let (range, flags) = mapping(grown as usize);
            assert!(advised(&flags), "grown: {flags}");
            assert!(range.1 >= grown as usize + grown_size, "grown: {range:x?}");
            alloc.dealloc(
                grown,
                Layout::from_size_align(grown_size, 8).expect("layout"),
            );
        }
    }

    #[test]
    fn a_failed_advice_leaves_errno_as_it_was() {
        // SAFETY: this thread's errno slot.
        unsafe { *libc::__errno_location() = libc::ENOENT };
        // Not mapped: the advice fails (ENOMEM).
        advise(HUGE_PAGE as *mut u8, ADVISE_FROM);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOENT)
        );
    }
}
