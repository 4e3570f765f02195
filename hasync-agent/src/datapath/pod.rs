//! The shared plain-data types (`aya::Pod`) as bytes and back: how ring-buffer records and
//! the batch programs' test-run data are read and written.

use std::mem::size_of;

/// The bytes of `v`.
pub fn bytes_of<T: aya::Pod>(v: &T) -> &[u8] {
    // SAFETY: `T: Pod` has no padding and no invalid bit patterns; the slice borrows `v`.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
}

/// The `T` at `offset` of `data`, or `None` past its end.
pub fn read_at<T: aya::Pod>(data: &[u8], offset: usize) -> Option<T> {
    let bytes = data.get(offset..offset.checked_add(size_of::<T>())?)?;
    // SAFETY: `bytes` holds `size_of::<T>()` bytes and any bytes are a valid `T: Pod`; the
    // read is unaligned-safe.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}
