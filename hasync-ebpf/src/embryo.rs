//! Admission of embryonic sessions: the ones not assured yet (see `Session::is_assured`: a TCP
//! handshake not completed, a UDP flow not yet a stream, any ICMP echo). They are cheap to
//! create in bulk (a flood, a scan, spoofed sources drawing answers), so they are bounded
//! apart from the rest: each takes a ticket in the EMBRYOS ring, and the ring's slot for that
//! ticket evicts its previous holder if that session is still embryonic. Assured sessions are
//! never evicted: the table never drops an established connection to make room (see
//! `hasync_common::EmbryoSlot`).
//!
//! The ring is cut into parts, each with its own ticket counter and a single writer: one per
//! CPU for the sessions traffic creates (no atomic operation and no cache line shared between
//! CPUs on the path a flood takes: the BPF target has no atomic read-modify-write in Rust's
//! core, and a shared counter would bounce), and one for peers' replicas, which only the
//! install program writes (the agent runs it one batch at a time, on whatever CPU). A bound is
//! per part: a flood that one CPU receives evicts that CPU's embryonic sessions only.
//!
//! There is no compare-and-delete for BPF hash maps: a packet on another CPU that assures the
//! oldest embryonic session between the check and the delete (a window of nanoseconds) is lost
//! with it: a UDP flow starts again with its next datagram, a TCP handshake caught at that
//! moment fails and is retried by the client.

use aya_ebpf::helpers::bpf_get_smp_processor_id;
use hasync_common::{Counter, Counters, DatapathConfig, EventKind, FlowKey, Session, State};

use crate::{
    events::{prepare, submit},
    maps::{EMBRYOS, EMBRYO_HEAD, REPLICA_EMBRYO_HEAD, SESSIONS},
};

/// Which part of the ring a session is admitted to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The part of the CPU the program runs on: sessions created by traffic here.
    ThisCpu,
    /// The replicas' part: sessions installed from peers.
    Replicas,
}

/// The head (ticket counter), slot count and first slot of `part`.
#[inline(always)]
fn part(cfg: &DatapathConfig, part: Part) -> Option<(*mut u64, u32, u32)> {
    match part {
        Part::Replicas => Some((
            REPLICA_EMBRYO_HEAD.get_ptr_mut(0)?,
            cfg.embryo_replica_slots,
            0,
        )),
        Part::ThisCpu => {
            // SAFETY: the helper takes no arguments.
            let cpu = unsafe { bpf_get_smp_processor_id() };
            let first = cpu
                .wrapping_mul(cfg.embryo_slots)
                .wrapping_add(cfg.embryo_replica_slots);
            Some((EMBRYO_HEAD.get_ptr_mut(0)?, cfg.embryo_slots, first))
        }
    }
}

/// The eviction counter of a session last in `state`.
#[inline(always)]
fn evicted_counter(state: u8) -> Counter {
    match State::from_u8(state) {
        Some(State::SynSent) => Counter::EvictedSynSent,
        Some(State::SynRecv) => Counter::EvictedSynRecv,
        Some(State::UdpNew) => Counter::EvictedUdpNew,
        Some(State::UdpReplied) => Counter::EvictedUdpReplied,
        Some(State::IcmpEcho) => Counter::EvictedIcmpEcho,
        _ => Counter::EvictedOther,
    }
}

/// Removes `held` (the session of `key`, in the table) and reports it. The event is written
/// first, straight from the table, and sent only if the removal was ours.
#[inline(always)]
fn evict(counters: &mut Counters, key: &FlowKey, held: &Session) {
    let counter = evicted_counter(held.state);
    let event = prepare(counters, EventKind::Evicted, key, held);
    if SESSIONS.remove(key).is_ok() {
        counters.inc(counter);
        if let Some(e) = event {
            submit(counters, e);
        }
    } else if let Some(e) = event {
        e.discard(0);
    }
}

/// Gives `session`, about to enter the table under `key` embryonic, the next ticket of `to`,
/// evicting the slot's previous holder if it is still embryonic (an `Evicted` event carries it
/// to the agent). Without slots in that part nothing is evicted.
#[inline(always)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "keys and values passed by value are copied to the stack, which this program has \
              no room left for"
)]
pub fn admit(
    cfg: &DatapathConfig,
    counters: &mut Counters,
    key: &FlowKey,
    session: &mut Session,
    to: Part,
) {
    let Some((head, slots, first)) = part(cfg, to) else {
        return;
    };
    // SAFETY: a map value valid for the program's run, with one writer: a per-CPU value of
    // this CPU, or the replicas' head, which only the (serialized) install program writes.
    let head = unsafe { &mut *head };
    let ticket = *head as u32;
    *head = head.wrapping_add(1);
    // No slots in that part: nothing is admitted, nothing evicted.
    let Some(offset) = ticket.checked_rem(slots) else {
        return;
    };
    let Some(slot) = EMBRYOS.get_ptr_mut(first.wrapping_add(offset)) else {
        return;
    };
    // SAFETY: array value valid for the program's run; the part has this one writer.
    let slot = unsafe { &mut *slot };
    // A slot never used holds a zero key (no flow has protocol 0): nothing to look up.
    let used = slot.key.proto != 0;
    if let Some(held) = used.then(|| SESSIONS.get_ptr_mut(&slot.key)).flatten() {
        // SAFETY: the value stays valid for the program's run.
        let held = unsafe { &*held };
        if held.ticket == slot.ticket && held.is_embryonic() {
            evict(counters, &slot.key, held);
        }
    }
    slot.key = *key;
    slot.ticket = ticket;
    session.ticket = ticket;
}
