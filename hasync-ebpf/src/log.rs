//! Rare datapath events, logged with aya-log and forwarded to the agent's log
//! (`[local] datapath_log`): a session taken over, a session this member owned replaced by a
//! peer's newer version, and malformed frames (sampled).
//!
//! The main program's frame is at the verifier's 512-byte stack limit, and an aya-log record
//! is built on the stack. So the programs only note an event where it happens, in the per-CPU
//! counters value they hold already ([`LogNote`]: a few stores), and the log program ([`run`]),
//! which the agent runs for each CPU and kind whose note changed, logs it. The level is a
//! read-only global that the agent sets before load (`AYA_LOG_LEVEL`): the verifier sees the
//! branches of the levels that are off as dead, and removes them.

use core::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ptr::{read_volatile, write_volatile},
    sync::atomic::{compiler_fence, Ordering},
};

use aya_ebpf::programs::XdpContext;
use aya_ebpf::{bindings::xdp_action, helpers::generated::bpf_map_lookup_percpu_elem};
use aya_log_ebpf::{
    debug, info,
    macro_support::{level_enabled, Level},
    warn,
};
use hasync_common::{
    flow::Family, Counter, Counters, FlowKey, LogNote, LogNoteKind, LogRequest, MemberId,
};

use crate::{
    maps::COUNTERS,
    table_programs::{load, store},
};

/// This member took `key` over from `from`; its version is now `version`.
#[inline(always)]
pub fn taken_over(counters: &mut Counters, key: &FlowKey, from: MemberId, version: u32) {
    let kind = LogNoteKind::TakenOver;
    note_session(counters, Level::Info, kind, key, from, version);
}

/// A session `key` this member owned was replaced by `by`'s newer `version`.
#[inline(always)]
pub fn superseded(counters: &mut Counters, key: &FlowKey, by: MemberId, version: u32) {
    let kind = LogNoteKind::Superseded;
    note_session(counters, Level::Warn, kind, key, by, version);
}

/// Notes an event of `kind` (logged at `level`) on session `key`, with the other `member` and
/// the session's `version`.
#[inline(always)]
fn note_session(
    counters: &mut Counters,
    level: Level,
    kind: LogNoteKind,
    key: &FlowKey,
    member: MemberId,
    version: u32,
) {
    if !level_enabled(level) {
        return;
    }
    if let Some(n) = counters.note_mut(kind) {
        write(n, |n| {
            n.member = member.0;
            n.version = version;
            n.key = *key;
        });
    }
}

/// A malformed frame (`why`).
#[inline(always)]
pub fn malformed(ctx: &XdpContext, counters: &mut Counters, why: Counter) {
    if level_enabled(Level::Debug) {
        // SAFETY: `ctx.ctx` is the program's valid `xdp_md`.
        let md = unsafe { &*ctx.ctx };
        if let Some(n) = counters.note_mut(LogNoteKind::Malformed) {
            write(n, |n| {
                n.reason = why as u32;
                n.ifindex = md.ingress_ifindex;
                n.len = md.data_end.wrapping_sub(md.data);
            });
        }
    }
}

/// Writes `n` with `f` between two bumps of its sequence, so that the log program, reading on
/// another CPU, can tell a note being written from a whole one. The fences order the compiler,
/// not the CPU: on x86 (stores in order, loads in order) that is enough; on a weaker memory
/// order a rare log line could mix two events' fields (only the line: nothing else reads it).
#[inline(always)]
fn write(n: &mut LogNote, f: impl FnOnce(&mut LogNote)) {
    let seq = n.seq.wrapping_add(1);
    // SAFETY: `n` is a valid, aligned note; volatile so the stores stay in this order.
    unsafe { write_volatile(&mut n.seq, seq) };
    compiler_fence(Ordering::SeqCst);
    f(n);
    compiler_fence(Ordering::SeqCst);
    // SAFETY: as above.
    unsafe { write_volatile(&mut n.seq, seq.wrapping_add(1)) };
}

/// The log program: logs the note the [`LogRequest`] at the start of the test-run data names,
/// unless it is still the one the agent logged last (`seq`), and writes the sequence of the
/// note it logged back into the request. XDP_PASS when it logged one, or had nothing new (or
/// the request names no note); XDP_DROP when the note was being written (the agent asks again
/// at its next drain); XDP_ABORTED when the data holds no request.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let Some(mut req) = load::<LogRequest>(ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    let key = 0u32;
    // SAFETY: COUNTERS is a per-CPU array map (the helper's map argument is the map's
    // definition, which `PerCpuArray` wraps transparently); the key is a valid u32; the helper
    // returns null for a CPU past the possible ones.
    let counters = unsafe {
        bpf_map_lookup_percpu_elem(
            (&raw const COUNTERS).cast_mut().cast(),
            (&raw const key).cast(),
            req.cpu,
        )
    }
    .cast::<Counters>();
    // SAFETY: null, or the CPU's value, valid for the program's run.
    let Some(counters) = (unsafe { counters.as_ref() }) else {
        return xdp_action::XDP_PASS;
    };
    let Some(note) = counters.notes.get(req.kind as usize) else {
        return xdp_action::XDP_PASS;
    };
    // Being written: the agent asks again at its next drain.
    let Some(n) = read(note) else {
        return xdp_action::XDP_DROP;
    };
    if n.seq == req.seq {
        return xdp_action::XDP_PASS;
    }
    req.seq = n.seq;
    if !store(ctx, 0, &mut req) {
        return xdp_action::XDP_ABORTED;
    }
    if req.kind == LogNoteKind::TakenOver as u32 {
        let (proto, lo, plo, hi, phi) = endpoints(&n.key);
        info!(
            ctx,
            "took over session proto {} {:i}:{} <-> {:i}:{} from member {}, now version {}",
            proto,
            lo,
            plo,
            hi,
            phi,
            n.member,
            n.version
        );
    } else if req.kind == LogNoteKind::Superseded as u32 {
        let (proto, lo, plo, hi, phi) = endpoints(&n.key);
        warn!(
            ctx,
            "session proto {} {:i}:{} <-> {:i}:{} owned here was replaced by member {}'s version {}",
            proto,
            lo,
            plo,
            hi,
            phi,
            n.member,
            n.version
        );
    } else if req.kind == LogNoteKind::Malformed as u32 {
        debug!(
            ctx,
            "malformed frame on ifindex {}, {} bytes: counter {}", n.ifindex, n.len, n.reason
        );
    }
    xdp_action::XDP_PASS
}

/// A copy of `note`, unless it is being written.
#[inline(always)]
fn read(note: &LogNote) -> Option<LogNote> {
    // SAFETY: `note` is valid and aligned; volatile so the loads stay in this order.
    let before = unsafe { read_volatile(&note.seq) };
    compiler_fence(Ordering::SeqCst);
    let copy = *note;
    compiler_fence(Ordering::SeqCst);
    // SAFETY: as above.
    let after = unsafe { read_volatile(&note.seq) };
    (before == after && before & 1 == 0).then_some(copy)
}

/// `key`'s protocol, lower address and port, higher address and port.
#[inline(always)]
fn endpoints(key: &FlowKey) -> (u8, IpAddr, u16, IpAddr, u16) {
    (
        key.proto,
        addr(key.family, key.addr_lo),
        u16::from_be(key.port_lo),
        addr(key.family, key.addr_hi),
        u16::from_be(key.port_hi),
    )
}

#[inline(always)]
fn addr(family: u8, words: [u32; 4]) -> IpAddr {
    let [first, ..] = words;
    if family == Family::V4 as u8 {
        return IpAddr::V4(Ipv4Addr::from(first.to_ne_bytes()));
    }
    let mut bytes = [0u8; 16];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    IpAddr::V6(Ipv6Addr::from(bytes))
}
