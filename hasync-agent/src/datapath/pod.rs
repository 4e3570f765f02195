//! The shared plain-data types as bytes and back: how ring-buffer records and the batch
//! programs' test-run data are read and written. Safe: `bytemuck` checks the types (its
//! `Pod` derive) and the lengths.

use std::mem::size_of;

pub use bytemuck::bytes_of;

/// The `T` at `offset` of `data`, or `None` past its end.
pub fn read_at<T: bytemuck::Pod>(data: &[u8], offset: usize) -> Option<T> {
    let bytes = data.get(offset..offset.checked_add(size_of::<T>())?)?;
    bytemuck::try_pod_read_unaligned(bytes).ok()
}
