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
//! apply program writes (the agent runs it one batch at a time, on whatever CPU). A bound is
//! per part: a flood that one CPU receives evicts that CPU's embryonic sessions only.
//!
//! There is no compare-and-delete for BPF hash maps: a packet on another CPU that assures the
//! oldest embryonic session between the check and the delete (a window of nanoseconds) is lost
//! with it: a UDP flow starts again with its next datagram, a TCP handshake caught at that
//! moment fails and is retried by the client.

use aya_ebpf::helpers::bpf_get_smp_processor_id;
use hasync_common::{
    Counter, Counters, DatapathConfig, EventKind, FlowKey, MemberId, Session, State,
};

use crate::{
    events::{prepare, submit},
    maps::{EMBRYOS, EMBRYO_HEAD, REPLICA_EMBRYO_HEAD, SESSIONS},
};

/// The first slot and slot count of `owner`'s replica part, if it has one.
#[inline(always)]
fn replica_part(cfg: &DatapathConfig, owner: MemberId) -> Option<(u32, u32)> {
    let index = u32::from(owner.0).checked_sub(1)?;
    if index >= u32::from(cfg.embryo_replica_parts) {
        return None;
    }
    Some((
        index.wrapping_mul(cfg.embryo_replica_slots),
        cfg.embryo_replica_slots,
    ))
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

/// Whose part of the ring a slot is in.
#[derive(Clone, Copy)]
enum Part {
    /// This member's own: a session evicted from it is reported (its log line, its removal
    /// sent to the peers).
    Own(MemberId),
    /// A peer's replicas: one evicted is not reported (the agent has nothing to do with it,
    /// and a peer's records must not fill the events ring this member's fast path writes).
    Replica(MemberId),
}

impl Part {
    #[inline(always)]
    fn owner(self) -> MemberId {
        match self {
            Part::Own(owner) | Part::Replica(owner) => owner,
        }
    }
}

/// Removes `held` (the session of `key`, in the table), reporting it if it is this member's
/// own. The event is written first, straight from the table, and sent only if the removal was
/// ours.
#[inline(always)]
fn evict(counters: &mut Counters, key: &FlowKey, held: &Session, part: Part) {
    let counter = evicted_counter(held.state);
    let event = match part {
        Part::Own(_) => prepare(counters, EventKind::Evicted, key, held),
        Part::Replica(_) => None,
    };
    if SESSIONS.remove(key).is_ok() {
        counters.inc(counter);
        if let Some(e) = event {
            submit(counters, e);
        }
    } else if let Some(e) = event {
        e.discard(0);
    }
}

/// Gives `session`, about to enter the table under `key` embryonic, the next ticket of this
/// CPU's part, evicting the slot's previous holder if it is still embryonic (an `Evicted`
/// event carries it to the agent). The ticket is `counter * cpus + cpu`, the counter taken
/// modulo the largest multiple of the part's size that keeps the ticket within 32 bits: a peer
/// that copies the session places it by the ticket alone, `ticket % (cpus * slots)` being this
/// CPU's slot in every lap (see [`admit_replica`]).
#[inline(always)]
pub fn admit_own(
    cfg: &DatapathConfig,
    counters: &mut Counters,
    key: &FlowKey,
    session: &mut Session,
) {
    let slots = cfg.embryo_slots;
    if slots == 0 {
        return;
    }
    let Some(head) = EMBRYO_HEAD.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU value of this CPU, valid for the program's run; one writer.
    let head = unsafe { &mut *head };
    let counter = *head;
    *head = counter.wrapping_add(1);
    // SAFETY: the helper takes no arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let replicas = u32::from(cfg.embryo_replica_parts).wrapping_mul(cfg.embryo_replica_slots);
    let first = replicas.wrapping_add(cpu.wrapping_mul(slots));
    let offset = counter.checked_rem(u64::from(slots)).unwrap_or(0) as u32;
    let cpus = u64::from(cfg.embryo_cpus.max(1));
    let ring = u64::from(slots).wrapping_mul(cpus);
    // Laps of the ring that fit in 32 bits (at least one: a ring is at most 2^32 slots).
    let laps = (1u64 << 32).checked_div(ring).unwrap_or(1).max(1);
    let lapped = counter
        .checked_rem(laps.wrapping_mul(u64::from(slots)))
        .unwrap_or(counter);
    let ticket = lapped.wrapping_mul(cpus).wrapping_add(u64::from(cpu)) as u32;
    take_slot(
        counters,
        first.wrapping_add(offset),
        Part::Own(cfg.local_member),
        key,
        session,
        ticket,
    );
}

/// Gives `session`, a peer's embryonic session about to enter the table under `key`, its slot
/// in its owner's replica part: the one `owner_ticket` (the owner's own ticket) names, which
/// mirrors the owner's slot when both members have the same geometry, so the replica is
/// evicted when the owner evicts the session; without it, the part's next ticket. A flood
/// copied from one member evicts only that member's replicas. False when the owner has no
/// part (the replica is refused).
#[inline(always)]
pub fn admit_replica(
    cfg: &DatapathConfig,
    counters: &mut Counters,
    key: &FlowKey,
    session: &mut Session,
    owner_ticket: Option<u32>,
) -> bool {
    let Some((first, slots)) = replica_part(cfg, session.owner) else {
        return cfg.embryo_replica_parts == 0;
    };
    let ticket = match owner_ticket {
        Some(t) => t,
        None => {
            let Some(head) = REPLICA_EMBRYO_HEAD.get_ptr_mut(u32::from(session.owner.0)) else {
                return false;
            };
            // SAFETY: a map value valid for the program's run; only the (serialized) apply
            // program writes it.
            let head = unsafe { &mut *head };
            let t = *head as u32;
            *head = head.wrapping_add(1);
            t
        }
    };
    let Some(offset) = ticket.checked_rem(slots) else {
        return true;
    };
    let owner = session.owner;
    take_slot(
        counters,
        first.wrapping_add(offset),
        Part::Replica(owner),
        key,
        session,
        ticket,
    );
    true
}

/// `key` (with `session`) takes slot `index` of `part` under `ticket`, evicting the slot's
/// previous holder if that is another session, still the part's owner's, still embryonic and
/// still holding the slot's ticket (a session taken over since keeps its old ticket, and is
/// no longer its old owner's to evict).
#[inline(always)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "keys and values passed by value are copied to the stack, which this program has \
              no room left for"
)]
fn take_slot(
    counters: &mut Counters,
    index: u32,
    part: Part,
    key: &FlowKey,
    session: &mut Session,
    ticket: u32,
) {
    let Some(slot) = EMBRYOS.get_ptr_mut(index) else {
        return;
    };
    // SAFETY: array value valid for the program's run; the part has one writer (this CPU's
    // program, or the serialized apply program).
    let slot = unsafe { &mut *slot };
    // A slot never used holds a zero key (no flow has protocol 0): nothing to look up.
    let used = slot.key.proto != 0 && slot.key != *key;
    if let Some(held) = used.then(|| SESSIONS.get_ptr_mut(&slot.key)).flatten() {
        // SAFETY: the value stays valid for the program's run.
        let held = unsafe { &*held };
        if held.ticket == slot.ticket && held.owner == part.owner() && held.is_embryonic() {
            evict(counters, &slot.key, held, part);
        }
    }
    slot.key = *key;
    slot.ticket = ticket;
    session.ticket = ticket;
}
