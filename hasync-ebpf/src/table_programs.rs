//! The table programs' logic (XDP programs the agent runs with BPF_PROG_TEST_RUN, never
//! attached): the apply program writes a batch of peers' records into the session table, the
//! read program reads a batch of sessions for the sender (see `hasync_common::table_programs`
//! for the batch layouts, `hasync_common::conflict` for the rule that decides each record).

use core::mem::{size_of, MaybeUninit};

use aya_ebpf::{
    bindings::{xdp_action, xdp_md, BPF_EXIST, BPF_NOEXIST},
    cty::{c_long, c_void},
    helpers::generated::{bpf_loop, bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    programs::XdpContext,
};
use hasync_common::{
    conflict::{claimable, orphaned_by_removal, resolve, Resolution},
    table_programs::{APPLY_BATCH, READ_BATCH},
    ApplyHeader, ApplyOutcome, ApplyRecord, ApplySource, Counter, Counters, DatapathConfig,
    ReadHeader, ReadSlot, Session, SessionFlags, ZoneId,
};

use crate::{
    embryo, log,
    maps::{CONFIG, COUNTERS, SESSIONS},
    replica_room,
    session::{owner_alive, E2BIG},
};

/// Copies a `T` out of the test-run data at `offset`.
#[inline(always)]
pub(crate) fn load<T>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let mut v = MaybeUninit::<T>::uninit();
    // SAFETY: the helper checks `offset + size` against the data and fills all of `v` or
    // fails; `T` is plain data, valid for any bytes.
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            offset as u32,
            v.as_mut_ptr().cast(),
            size_of::<T>() as u32,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: filled by the helper above.
    Some(unsafe { v.assume_init() })
}

/// Writes `v` over the test-run data at `offset` (which holds a `T` already).
#[inline(always)]
pub(crate) fn store<T>(ctx: &XdpContext, offset: usize, v: &mut T) -> bool {
    // SAFETY: the helper checks `offset + size` against the data and copies from `v`.
    let rc = unsafe {
        bpf_xdp_store_bytes(
            ctx.ctx,
            offset as u32,
            (v as *mut T).cast(),
            size_of::<T>() as u32,
        )
    };
    rc == 0
}

/// A table program's batch: a header `Self` followed by `count` items.
trait Batch: Sized {
    /// What follows the header.
    type Item;
    /// Items a run may hold.
    const MAX: usize;
    /// Items the header says follow.
    fn count(&self) -> u32;
    /// Does the work of `item` (read from `offset`, where it may be written back). False
    /// when it could not be done (the batch is then malformed).
    fn each(&mut self, ctx: &XdpContext, offset: usize, item: Self::Item) -> bool;
}

/// A run's state, on the program's stack: its context, its header (which the items' work
/// writes to) and whether an item could not be read or written.
struct Run<H> {
    ctx: *mut xdp_md,
    header: H,
    malformed: bool,
}

/// Runs the batch in the test-run data, its header's `each` once per item, and writes the
/// header back. `prepare` readies the header first; false refuses the batch before any item.
/// The items are walked with `bpf_loop`: a run holds hundreds, more than the verifier would
/// follow an unrolled loop through.
#[inline(always)]
fn run_batch<H: Batch>(ctx: &XdpContext, prepare: impl FnOnce(&mut H) -> bool) -> u32 {
    let Some(mut header) = load::<H>(ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    let count = header.count();
    if count as usize > H::MAX || !prepare(&mut header) {
        return xdp_action::XDP_ABORTED;
    }
    let mut run = Run {
        ctx: ctx.ctx,
        header,
        malformed: false,
    };
    // SAFETY: the callback has the signature bpf_loop calls, and `run` outlives the call.
    let rc = unsafe {
        bpf_loop(
            count,
            each_item::<H> as *mut c_void,
            core::ptr::addr_of_mut!(run).cast(),
            0,
        )
    };
    let done = rc == c_long::from(count) && !run.malformed;
    if done && store(ctx, 0, &mut run.header) {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_ABORTED
    }
}

/// Item `index` of a run: 0 to go on, 1 to stop (the batch is malformed).
#[inline(never)]
extern "C" fn each_item<H: Batch>(index: u64, run: *mut Run<H>) -> c_long {
    // SAFETY: bpf_loop passes the caller's `Run`, valid and not otherwise borrowed for the
    // call.
    let run = unsafe { &mut *run };
    let ctx = XdpContext::new(run.ctx);
    let offset = (index as usize)
        .wrapping_mul(size_of::<H::Item>())
        .wrapping_add(size_of::<H>());
    let done =
        load::<H::Item>(&ctx, offset).is_some_and(|item| run.header.each(&ctx, offset, item));
    if done {
        0
    } else {
        run.malformed = true;
        1
    }
}

/// Fills the read batch in the test-run data with the sessions the table holds.
#[inline(always)]
pub fn read_batch(ctx: &XdpContext) -> u32 {
    run_batch::<ReadHeader>(ctx, |h| {
        h.found = 0;
        true
    })
}

impl Batch for ReadHeader {
    type Item = ReadSlot;
    const MAX: usize = READ_BATCH;

    fn count(&self) -> u32 {
        self.count
    }

    #[inline(always)]
    #[allow(
        clippy::needless_borrows_for_generic_args,
        reason = "keys and values passed by value are copied to the stack, which this program \
                  has no room left for"
    )]
    fn each(&mut self, ctx: &XdpContext, offset: usize, mut slot: ReadSlot) -> bool {
        let Some(s) = SESSIONS.get_ptr_mut(&slot.key) else {
            return true;
        };
        // SAFETY: the value stays valid for the program's run; a concurrent update on another
        // CPU can at worst make this copy a mix of two states, as any reader of the map sees.
        slot.session = unsafe { *s };
        slot.found = 1;
        self.found = self.found.wrapping_add(1);
        store(ctx, offset, &mut slot)
    }
}

/// Applies the batch of records in the test-run data; the outcome goes back into its header.
#[inline(always)]
pub fn apply_batch(ctx: &XdpContext) -> u32 {
    run_batch::<ApplyHeader>(ctx, |_| {
        // The outcome is not zeroed here: the agent sends it zeroed. Counts that start from
        // known constants differ after every record, and the verifier, which follows the
        // callback until its states repeat, then walked it once per count (past the kernel's
        // limit on 6.18.44); counts read from the batch are unknown to it.
        // One-entry arrays, looked up again per record: checked here too so that, were they
        // ever missing, a batch would be refused whole. (A malformed batch still stops at its
        // first unreadable record, the ones before it applied.)
        CONFIG.get(0).is_some() && COUNTERS.get_ptr_mut(0).is_some()
    })
}

impl Batch for ApplyHeader {
    type Item = ApplyRecord;
    const MAX: usize = APPLY_BATCH;

    fn count(&self) -> u32 {
        self.count
    }

    #[inline(always)]
    fn each(&mut self, _: &XdpContext, _: usize, mut rec: ApplyRecord) -> bool {
        let (Some(cfg), Some(counters)) = (CONFIG.get(0), COUNTERS.get_ptr_mut(0)) else {
            return false;
        };
        // SAFETY: per-CPU value, valid for the program's run. Where the kernel leaves softirqs
        // on during a test run, the fast path may interrupt this program on its CPU: a counter
        // it bumps meanwhile may then be lost, nothing worse.
        let counters = unsafe { &mut *counters };
        let (from, now_ns) = (self.from, self.now_ns);
        apply_record(&mut rec, from, now_ns, cfg, counters, &mut self.outcome);
        true
    }
}

/// Readies a peer's `incoming` session to be written over `local`: it keeps the local copy's
/// node-local facts (the zone its replies are bound to here, when both copies have the same
/// initiator and zone), and an embryonic replica takes
/// its slot in its owner's part of the EMBRYOS ring, unless the local copy holds that slot
/// already (which may evict the owner's oldest embryonic replica; never an assured session,
/// never another member's), and an assured copy where the table held none takes room from the
/// peers' pool ([`replica_room`]). False when the replica is refused (its owner has no part, or
/// the pool is full).
#[inline(always)]
fn admit(
    cfg: &DatapathConfig,
    counters: &mut Counters,
    rec: &mut ApplyRecord,
    local: Option<&Session>,
) -> bool {
    let owner_ticket = (rec.owner_ticket != 0).then_some(rec.session.ticket);
    let incoming = &mut rec.session;
    incoming.ticket = 0;
    // Only for the same two sides: a local copy created from the other end (its first packet
    // was the flow's reply here) bound the other direction.
    let same_sides = |l: &&Session| {
        l.zone == incoming.zone
            && l.flags.has(SessionFlags::INITIATOR_HI)
                == incoming.flags.has(SessionFlags::INITIATOR_HI)
    };
    // A local "no zone" is this member's own answer for its own session: a peer's copy asks
    // the routing table again at its first reply here (`session::unbound`).
    let bound =
        |l: &&Session| l.reply_zone != ZoneId::UNZONED || incoming.owner == cfg.local_member;
    if let Some(l) = local.filter(same_sides).filter(bound) {
        incoming.reply_zone = l.reply_zone;
    }
    let pooled = |s: &Session| s.in_replica_pool();
    if !incoming.is_embryonic() {
        return local.is_some_and(pooled) || !pooled(incoming) || replica_room::has_room(counters);
    }
    if let Some(l) = local.filter(|l| l.is_embryonic() && l.owner == incoming.owner) {
        if owner_ticket.is_none_or(|t| t == l.ticket) {
            incoming.ticket = l.ticket;
            return true;
        }
    }
    // A full pool takes no new embryonic copies either: traffic here could make them assured.
    if local.is_none() && !replica_room::has_room(counters) {
        return false;
    }
    embryo::admit_replica(cfg, counters, &rec.key, incoming, owner_ticket)
}

/// Applies one record. An insert that races a session the fast path just created is resolved
/// again against it. A full table refuses the record: nothing is evicted for a replica but
/// the oldest embryonic session.
#[inline(always)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "keys and values passed by value are copied to the stack, which this program has \
              no room left for"
)]
fn apply_record(
    rec: &mut ApplyRecord,
    from: ApplySource,
    now_ns: u64,
    cfg: &DatapathConfig,
    counters: &mut Counters,
    out: &mut ApplyOutcome,
) {
    // Admitted once: a retry must not take a second ticket (and evict one more replica).
    let mut admitted = false;
    for _attempt in 0..2 {
        let existing = SESSIONS.get_ptr_mut(&rec.key);
        // SAFETY: the value stays valid for the program's run.
        let local = existing.map(|p| unsafe { &*p });
        let may_move = local.is_none_or(|l| claimable(cfg, l, owner_alive(l), now_ns));
        match resolve(rec.op, &rec.session, local, from, may_move) {
            how @ (Resolution::Insert | Resolution::Replace) => {
                // Only if still absent (insert) or still there (replace); otherwise the fast
                // path changed it meanwhile: look again. A replace is a whole-value update,
                // never a write in place: the fast path may be reading it on another CPU.
                let flag = if how == Resolution::Insert {
                    BPF_NOEXIST
                } else {
                    BPF_EXIST
                };
                // A replica refused for want of a part (its owner's id is past the configured
                // ones, which the agent's owner check already refuses) or of room in the peers'
                // pool counts as no room.
                if !admitted && !admit(cfg, counters, rec, local) {
                    out.full = out.full.wrapping_add(1);
                    return;
                }
                admitted = true;
                let was_ours = local.is_some_and(|l| l.owner == cfg.local_member);
                // Read before the write: the old value's memory may be reused after it.
                let was_pooled = local.is_some_and(|l| l.in_replica_pool());
                match SESSIONS.insert(&rec.key, &rec.session, flag as u64) {
                    Ok(()) => {
                        let pooled = rec.session.in_replica_pool();
                        replica_room::account(was_pooled, pooled);
                        out.installed = out.installed.wrapping_add(1);
                        if was_ours && rec.session.owner != cfg.local_member {
                            let (by, version) = (rec.session.owner, rec.session.version);
                            log::superseded(counters, &rec.key, by, version);
                        }
                        return;
                    }
                    Err(e) if e == -E2BIG => {
                        out.full = out.full.wrapping_add(1);
                        return;
                    }
                    Err(_) => {}
                }
            }
            Resolution::Delete => {
                let orphaned = local.is_some_and(|l| orphaned_by_removal(cfg, l, now_ns));
                if let Some(p) = existing.filter(|_| orphaned) {
                    // SAFETY: as for `Mark` below; `flags` is written in place, and the
                    // orphan bit is node-local. (A take-over on another CPU at this instant,
                    // were this member to take the owner for dead meanwhile, could get back
                    // the replica's flags from this write: an owned session ignores them.)
                    unsafe { (*p).flags.0 |= SessionFlags::ORPHANED };
                    out.orphaned = out.orphaned.wrapping_add(1);
                    return;
                }
                let was_pooled = local.is_some_and(|l| l.in_replica_pool());
                if SESSIONS.remove(&rec.key).is_ok() {
                    replica_room::account(was_pooled, false);
                    out.deleted = out.deleted.wrapping_add(1);
                } else {
                    out.kept = out.kept.wrapping_add(1);
                }
                return;
            }
            Resolution::Keep => {
                out.kept = out.kept.wrapping_add(1);
                return;
            }
            Resolution::RefuseClaim => {
                counters.inc(Counter::ClaimsRefused);
                out.kept = out.kept.wrapping_add(1);
                return;
            }
            Resolution::Mark => {
                if let Some(p) = existing {
                    // SAFETY: as above; `last_event_ns` is node-local and only this member's
                    // agent and fast path write it.
                    unsafe { (*p).last_event_ns = now_ns };
                }
                out.kept = out.kept.wrapping_add(1);
                return;
            }
        }
    }
    // Twice raced, or the table refused the entry: the local copy stays.
    out.kept = out.kept.wrapping_add(1);
}
