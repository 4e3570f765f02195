//! The table programs' batches. The table programs are XDP programs that are never attached:
//! the agent runs them with BPF_PROG_TEST_RUN, one batch per run, to apply peers' records to
//! the session table (`hasync_apply`) and to read sessions from it (`hasync_read`).
//!
//! The agent hands records to the apply program as BPF_PROG_TEST_RUN data: an
//! [`ApplyHeader`] followed by up to [`APPLY_BATCH`] [`ApplyRecord`]s. For each record the
//! program looks the key up, applies the conflict rule ([`crate::conflict::resolve`]) against
//! the local copy and writes the outcome to the table, then writes what it did back into the
//! header. Deciding in the kernel, next to
//! the table, costs one hash walk per record instead of a lookup syscall plus a write, and
//! leaves no window between reading the local copy and replacing it.
//!
//! What does not depend on the local copy (zones, records naming this member) is decided by
//! the agent before a record gets here.
//!
//! The sending side reads sessions the same way: a [`ReadHeader`] and up to [`READ_BATCH`]
//! [`ReadSlot`]s holding keys, which the `hasync_read` program fills with the sessions' current
//! state: one program run per batch instead of one lookup syscall per session.

#[cfg(doc)]
use crate::conflict::Resolution;
use core::mem::size_of;

use crate::{ids::MemberId, session::Session, FlowKey};

/// What a record asks for.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyOp {
    /// Insert or update the session.
    Upsert = 1,
    /// The sender no longer holds the session.
    Delete = 2,
    /// One of this member's own sessions, handed back by a peer's full sync into a table that
    /// started empty: inserted where the table lacks it, never replacing a copy here (what
    /// this member made or took over since it started is the authority on it).
    Restore = 3,
}

/// One record for the apply program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ApplyRecord {
    /// Key of the session.
    pub key: FlowKey,
    /// The session as it would be written (zone and clock already local). For a delete,
    /// only `owner` counts: the member that no longer holds it.
    pub session: Session,
    /// An [`ApplyOp`] as `u8`.
    pub op: u8,
    /// 1: `session.ticket` is the owner's admission ticket (an embryonic session from a peer
    /// that sends them), which places the replica in the slot of the owner's part that mirrors
    /// the owner's own; 0: the owner's part hands out the next ticket.
    pub owner_ticket: u8,
    /// Padding; zero.
    pub _pad: [u8; 6],
}
crate::assert_size!(ApplyRecord, 136);

impl ApplyRecord {
    /// The record doing `op` with `session` under `key`: with the owner's admission ticket
    /// (in `session.ticket`) when `owner_ticket`.
    pub const fn new(key: FlowKey, session: Session, op: ApplyOp, owner_ticket: bool) -> Self {
        ApplyRecord {
            key,
            session,
            op: op as u8,
            owner_ticket: owner_ticket as u8,
            _pad: [0; 6],
        }
    }

    /// `owner`'s removal of the session under `key`, as its delete record says it (`version`:
    /// what it last held, 0 when it no longer knows).
    pub fn removal(key: FlowKey, owner: MemberId, version: u32) -> Self {
        let session = Session {
            owner,
            version,
            ..Session::default()
        };
        ApplyRecord::new(key, session, ApplyOp::Delete, false)
    }
}

/// The batch header: what the agent says, then what the program did.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ApplyHeader {
    /// Records that follow.
    pub count: u32,
    /// Who sent the records, and whose full sync is running.
    pub from: ApplySource,
    /// Padding; zero.
    pub _pad: [u8; 2],
    /// Now, on the session clock (the mark).
    pub now_ns: u64,
    /// What the program did, added to what the agent sends: zero (the program does not zero
    /// it itself, for the verifier's sake: see `apply_batch` in the eBPF crate).
    pub outcome: ApplyOutcome,
}
crate::assert_size!(ApplyHeader, 32);

/// Where a batch of records comes from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ApplySource {
    /// The peer that sent them ([`MemberId::NONE`]: unknown): its own sessions' records come
    /// in the order it sent them (see [`crate::conflict::newer`]).
    pub sender: MemberId,
    /// A full sync from this member is running ([`MemberId::NONE`] otherwise): its replicas
    /// kept as they are get marked as seen (see [`Resolution::Mark`]).
    pub reconciling: MemberId,
}
crate::assert_size!(ApplySource, 2);

impl ApplySource {
    /// No sender known, no full sync running.
    pub const NONE: ApplySource = ApplySource {
        sender: MemberId::NONE,
        reconciling: MemberId::NONE,
    };
}

/// What the program did with a batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ApplyOutcome {
    /// Sessions inserted or replaced (named like the `sync_records_installed` metric it feeds).
    pub installed: u32,
    /// Sessions removed by a delete.
    pub deleted: u32,
    /// Records that lost to the local copy (including deletes of sessions not held by the
    /// sender, and replicas marked as seen by a full sync).
    pub kept: u32,
    /// Records refused because the session table was full (nothing was evicted for them; at
    /// most a batch, [`APPLY_BATCH`]).
    pub full: u16,
    /// Removals of a replica this member carries the flow of: kept here, orphaned, for this
    /// member to take over ([`crate::conflict::orphaned_by_removal`]; at most a batch).
    pub orphaned: u16,
}
crate::assert_size!(ApplyOutcome, 16);
const _: () = assert!(APPLY_BATCH <= u16::MAX as usize);

impl ApplyOutcome {
    /// Adds the counts of `o` (one batch) to these.
    pub fn add(&mut self, o: &ApplyOutcome) {
        self.installed += o.installed;
        self.deleted += o.deleted;
        self.kept += o.kept;
        // At most a batch each per run; a call's runs cover a frame or a chunk of keys, far
        // from 65,535 of them (saturating rather than wrapping, were one ever larger).
        self.full = self.full.saturating_add(o.full);
        self.orphaned = self.orphaned.saturating_add(o.orphaned);
    }
}

/// Records per apply program run. A run's fixed cost (the syscall and the kernel's set-up of
/// the test run, 2–2.5 µs here) is spread over its records: per record kept (applied again)
/// in a 2^23-bucket table of 200,000 sessions, medians of 8 alternated runs, 768 ns at 22
/// records per run, 715 at 128, 669 at 256, 673 at 481. A run keeps its CPU (no migration; on
/// recent kernels softirqs are off for it, so the fast path's packets on that CPU wait) for
/// about 0.2 ms at 256 records: where the gain stops.
pub const APPLY_BATCH: usize = 256;

/// Bytes of one run's test-run data at most (the larger of the two programs' batches). Past
/// the linear part of the first page (about 3.5 KiB) the kernel lays the data out in page
/// fragments, which both programs are loaded to accept (`xdp.frags`) and read and write
/// through `bpf_xdp_load_bytes` / `bpf_xdp_store_bytes`: 9 pages here, within the kernel's
/// 17 fragments; those helpers take offsets up to 0xffff.
pub const RUN_MAX_BYTES: usize = {
    let apply = size_of::<ApplyHeader>() + APPLY_BATCH * size_of::<ApplyRecord>();
    let read = size_of::<ReadHeader>() + READ_BATCH * size_of::<ReadSlot>();
    if apply > read {
        apply
    } else {
        read
    }
};
const _: () = assert!(RUN_MAX_BYTES <= 16 * 4096 && RUN_MAX_BYTES <= 0xffff);

/// The header of a read batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ReadHeader {
    /// Slots that follow.
    pub count: u32,
    /// Written by the program: slots found in the table.
    pub found: u32,
}
crate::assert_size!(ReadHeader, 8);

/// One key to read; the program fills `session` and sets `found` when the table holds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ReadSlot {
    /// Key to look up.
    pub key: FlowKey,
    /// Written by the program: the session, when found.
    pub session: Session,
    /// Written by the program: 1 when the table holds the key.
    pub found: u8,
    /// Padding; zero.
    pub _pad: [u8; 7],
}
crate::assert_size!(ReadSlot, 136);

/// Slots per read program run (a lookup and a copy each: cheaper than a record's apply).
pub const READ_BATCH: usize = 256;
