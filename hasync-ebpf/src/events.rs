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
        (*e).kind = kind as u8;
        (*e)._pad = [0; 7];
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
