//! Runs the install program (`hasync_install`) over peers' records: one BPF_PROG_TEST_RUN per
//! [`INSTALL_BATCH`] records, each applied in the kernel by the conflict rule of
//! `hasync_common::install`.

use std::mem::size_of;

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use hasync_common::{
    install::{INSTALL_BATCH, INSTALL_MAX_BYTES},
    InstallHeader, InstallOutcome, InstallRecord, MemberId,
};

use super::DatapathError;

/// XDP_PASS: the program read the whole batch.
const DONE: u32 = 2;

/// The bytes of a plain-data shared type.
fn bytes_of<T: aya::Pod>(v: &T) -> &[u8] {
    // SAFETY: `T: Pod` has no padding and no invalid bit patterns; the slice borrows `v`.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

/// Applies `records` with `prog`; `reconciling` is the member whose full sync is running (or
/// [`MemberId::NONE`]), `now_ns` the session clock's now.
pub fn run(
    prog: &Xdp,
    records: &[InstallRecord],
    reconciling: MemberId,
    now_ns: u64,
) -> Result<InstallOutcome, DatapathError> {
    let mut total = InstallOutcome::default();
    let mut data = Vec::with_capacity(INSTALL_MAX_BYTES);
    let mut out = vec![0u8; INSTALL_MAX_BYTES];
    for part in records.chunks(INSTALL_BATCH) {
        let header = InstallHeader {
            // At most INSTALL_BATCH: fits.
            count: part.len() as u32,
            reconciling,
            now_ns,
            ..InstallHeader::default()
        };
        data.clear();
        data.extend_from_slice(bytes_of(&header));
        for r in part {
            data.extend_from_slice(bytes_of(r));
        }
        let opts = TestRunOptions {
            data_in: Some(&data),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let result = prog
            .test_run(opts)
            .map_err(|source| DatapathError::Program {
                name: hasync_common::maps::INSTALL_PROGRAM,
                source,
            })?;
        if result.return_value != DONE
            || (result.data_size_out as usize) < size_of::<InstallHeader>()
        {
            return Err(DatapathError::InstallRejected {
                records: part.len(),
                verdict: result.return_value,
            });
        }
        // SAFETY: `out` holds at least a header's bytes (checked above), written by the
        // program from a header; any bytes are a valid `InstallHeader`.
        let done: InstallHeader = unsafe { std::ptr::read_unaligned(out.as_ptr().cast()) };
        total.add(&done.outcome);
    }
    Ok(total)
}
