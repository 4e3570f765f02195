//! The EVENTS ring buffer, written: what the programs tell the agent about sessions.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    maps::ring_buf::RingBufEntry,
};
use hasync_common::{
    maps::{EVENTS_RECORD_BYTES, EVENTS_WAKEUP_BATCH_BYTES},
    Counter, Counters, Event, EventKind, FlowKey, Session,
};

use crate::maps::EVENTS;

// `prepare` writes `kind` and the padding after it, the record's last 8 bytes, as one aligned
// `u64`.
const _: () = assert!(
    core::mem::offset_of!(Event, kind) % 8 == 0
        && matches!(
            core::mem::offset_of!(Event, kind).checked_add(8),
            Some(end) if end == core::mem::size_of::<Event>()
        )
        && core::mem::align_of::<Event>() >= 8
);

/// Sends an event to userspace.
#[inline(always)]
pub fn emit(counters: &mut Counters, kind: EventKind, key: &FlowKey, s: &Session) {
    if let Some(entry) = prepare(counters, kind, key, s) {
        submit(counters, entry);
    }
}

/// Writes an event into the ring without sending it yet (`None`, counted, when the ring is
/// full): the caller [`submit`]s it once what it reports has happened, or discards it. Fields
/// are written in place, so no copy of the event takes stack space.
#[inline(always)]
pub fn prepare(
    counters: &mut Counters,
    kind: EventKind,
    key: &FlowKey,
    s: &Session,
) -> Option<RingBufEntry<Event>> {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        counters.inc(Counter::RingbufFull);
        return None;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at the reserved record, which is ours until submitted or discarded;
    // every field is written (an `Event` has no padding bytes).
    unsafe {
        (*e).key = *key;
        (*e).session = *s;
        // `kind` and the padding after it in one 8-byte store: written apart, the padding
        // became a call to the byte-by-byte `memset`, a loop the verifier walks on every path
        // through an event (8,000 of the main program's instructions verified, 41,000 of the
        // apply program's).
        core::ptr::addr_of_mut!((*e).kind)
            .cast::<u64>()
            .write(u64::from_ne_bytes([kind as u8, 0, 0, 0, 0, 0, 0, 0]));
    }
    Some(entry)
}

/// Sends a prepared event. Wake-ups are batched: the consumer is woken only once enough
/// events are queued (it also polls on a short timer).
#[inline(always)]
pub fn submit(counters: &mut Counters, entry: RingBufEntry<Event>) {
    let queued = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    // `queued` counts this event's reservation: it crossed the mark if the mark lies within it.
    let crossing = EVENTS_WAKEUP_BATCH_BYTES..EVENTS_WAKEUP_BATCH_BYTES + EVENTS_RECORD_BYTES;
    let flags = if crossing.contains(&queued) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags as u64);
    counters.inc(Counter::Events);
}
