//! The full syncs this member receives from one peer, kept under the peer's lock: the one
//! running, the last one started and the last one ended, and whether the removal of the
//! replicas an earlier one did not carry still runs. Which start, frame and end counts is
//! decided here, without I/O; the engine does the applying, the walking and the removing.

use std::time::{Duration, Instant};

use hasync_common::FlowKey;

use super::TakenOn;
use crate::{
    cluster::FullSyncId,
    sync::{
        bucket::Bucket,
        stale::{StaleScan, Walking},
    },
};

/// A full sync being received. All of it travels on one connection (the sender does not
/// move data to another link while a full sync is unacknowledged): its frames and its end
/// count only from that connection.
#[derive(Debug)]
pub(super) struct BulkRx {
    /// Its sender's boot and id: only its own end ends it.
    pub(super) id: FullSyncId,
    /// The connection it runs on.
    pub(super) generation: u64,
    /// It will reconcile the peer's replicas (the peer's table is intact, so it is the
    /// authority on its sessions): the session clock when it started.
    pub(super) mark: Option<u64>,
    /// Records of its frames applied so far: its end reconciles only if they are all of them.
    pub(super) applied: u64,
    /// With a mark: the peer's replicas it has not carried yet (dropped with the full sync).
    pub(super) stale: Option<StaleScan>,
}

/// A full sync that ended on its own connection.
#[derive(Debug)]
pub(super) struct Ended {
    /// Records of its frames applied.
    pub(super) applied: u64,
    /// The replicas to remove (every record it announced was applied, and it walked the
    /// table): its mark and the keys it did not carry.
    pub(super) removal: Option<(u64, StaleScan)>,
    /// It counts as done now; else when the removal running (its own or an earlier one's)
    /// is over ([`FullSyncRx::removal_over`]).
    pub(super) done_now: bool,
}

/// See the module's documentation.
#[derive(Debug, Default)]
pub(super) struct FullSyncRx {
    running: Option<BulkRx>,
    /// Ids grow within a boot of the peer: a start not above this one's is an old start read
    /// late from another connection, unless it shows this one's id false ([`TakenOn`]).
    last_started: Option<(FullSyncId, TakenOn)>,
    /// Counts as done when the removal running is over.
    last_ended: Option<FullSyncId>,
    /// A removal of stale replicas runs: a full sync that starts meanwhile does not walk the
    /// table for its own (however fast a peer starts and ends full syncs, a removal's walk is
    /// the only one), and one that ends meanwhile counts as done when that removal is over.
    removing: bool,
    /// The threads of walks abandoned (their full sync replaced by a newer one, lost with its
    /// connection, or ended without a removal), which stop at their next chunk: a full sync
    /// that starts while [`MAX_ABANDONED`] of them run walks nothing (a peer starting full
    /// syncs faster than abandoned walks stop would otherwise pile up a thread per start, each
    /// waiting for the table's lock). One may run: a peer that starts over at once after its
    /// connection was dropped here (or on the other link, replacing the full sync running)
    /// still reconciles. A peer has at most three walk threads.
    abandoned: Vec<Walking>,
    /// Walks started: [`WALK_BURST`], then one per [`WALK_EVERY`] (created with the first).
    walks: Option<Bucket>,
}

/// Abandoned walks still running that keep a new full sync from walking.
const MAX_ABANDONED: usize = 2;

/// Walks a peer's full syncs may start at once: as many as may run at once (the running full
/// sync's and [`MAX_ABANDONED`] abandoned ones), so that a peer starting over at once after
/// its connection dropped still reconciles.
const WALK_BURST: u32 = MAX_ABANDONED as u32 + 1;
/// Then one more per this interval: a peer sending starts as fast as it likes otherwise had a
/// thread started per start (each abandoned at its next chunk, so [`MAX_ABANDONED`] held only
/// how many ran at once), each taking the table's lock. The peers' own full syncs are paced
/// by their backoff, which starts at a second.
const WALK_EVERY: Duration = Duration::from_secs(1);

/// What [`FullSyncRx::start`] made of a start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Start {
    /// An old start read late: ignored.
    Ignored,
    /// Started; it walks the table if it reconciles.
    Started,
    /// Started to reconcile, but without a walk (a removal, or abandoned walks, still run):
    /// the replicas it leaves unseen stay, until a later full sync or their timeout.
    Unwalked,
}

impl FullSyncRx {
    /// Full sync `id` starts, read on connection `on` at `now`, reconciling the peer's
    /// replicas from `mark` if set; `walk` starts the walk of the table that collects them.
    /// While an earlier removal, or [`MAX_ABANDONED`] abandoned walks, run, or when walks
    /// started faster than [`WALK_EVERY`] used up their burst, it walks nothing.
    pub(super) fn start(
        &mut self,
        id: FullSyncId,
        on: TakenOn,
        mark: Option<u64>,
        now: Instant,
        walk: impl FnOnce() -> Option<StaleScan>,
    ) -> Start {
        let late = self.last_started.is_some_and(|(last, last_on)| {
            // Serial arithmetic: the ids wrap.
            last.boot == id.boot
                && !hasync_common::conflict::version_after(id.id, last.id)
                && !last_on.undone_by(on.generation)
        });
        if late {
            return Start::Ignored;
        }
        self.last_started = Some((id, on));
        self.abandoned.retain(Walking::running);
        let may_walk = mark.is_some()
            && !self.removing
            && self.abandoned.len() < MAX_ABANDONED
            && self
                .walks
                .get_or_insert_with(|| Bucket::new(WALK_BURST, WALK_EVERY, now))
                .take(now);
        let stale = if may_walk { walk() } else { None };
        let replaced = self.running.replace(BulkRx {
            id,
            generation: on.generation,
            mark,
            applied: 0,
            stale,
        });
        self.abandon(replaced.and_then(|b| b.stale));
        if mark.is_some() && !may_walk {
            Start::Unwalked
        } else {
            Start::Started
        }
    }

    /// `scan`'s full sync is over without a removal: its walk stops at its next chunk.
    fn abandon(&mut self, scan: Option<StaleScan>) {
        if let Some(scan) = scan {
            self.abandoned.push(scan.walking());
        }
    }

    /// The full sync running on connection `generation`, if any.
    pub(super) fn running_on(&mut self, generation: u64) -> Option<&mut BulkRx> {
        self.running.as_mut().filter(|b| b.generation == generation)
    }

    /// Whether the running full sync reconciles the peer's replicas.
    pub(super) fn reconciling(&self) -> bool {
        self.running.as_ref().is_some_and(|b| b.mark.is_some())
    }

    /// A full sync frame's `keys` were applied on connection `generation`.
    pub(super) fn carried<'a>(
        &mut self,
        generation: u64,
        keys: impl ExactSizeIterator<Item = &'a FlowKey>,
    ) {
        if let Some(b) = self.running_on(generation) {
            b.applied += keys.len() as u64;
            if let Some(scan) = &b.stale {
                scan.carried(keys);
            }
        }
    }

    /// Full sync `id`'s end, announcing `records`, came on connection `generation`: None
    /// unless that full sync runs there. A removal it starts runs until
    /// [`Self::removal_over`].
    pub(super) fn end(&mut self, id: FullSyncId, generation: u64, records: u64) -> Option<Ended> {
        let ended = self
            .running
            .take_if(|b| b.id == id && b.generation == generation)?;
        let removal = match (ended.applied == records, ended.mark, ended.stale) {
            (true, Some(mark), Some(scan)) => Some((mark, scan)),
            (_, _, scan) => {
                self.abandon(scan);
                None
            }
        };
        self.removing |= removal.is_some();
        if ended.applied == records {
            // An incomplete one never counts as done.
            self.last_ended = Some(id);
        }
        Some(Ended {
            applied: ended.applied,
            removal,
            done_now: !self.removing,
        })
    }

    /// The removal of stale replicas is over (done, failed, or its thread gone): returns the
    /// last full sync ended, which counts as done now, unless another one runs (its own end
    /// counts).
    pub(super) fn removal_over(&mut self) -> Option<FullSyncId> {
        self.removing = false;
        self.last_ended.filter(|_| self.running.is_none())
    }

    /// Connection `generation` is gone: the full sync it carried never ends here (the peer
    /// starts it over). Returns whether it carried one.
    pub(super) fn link_lost(&mut self, generation: u64) -> bool {
        let lost = self.running.take_if(|b| b.generation == generation);
        let carried = lost.is_some();
        self.abandon(lost.and_then(|b| b.stale));
        carried
    }

    #[cfg(test)]
    pub(super) fn running(&self) -> Option<&BulkRx> {
        self.running.as_ref()
    }

    #[cfg(test)]
    pub(super) fn removing(&self) -> bool {
        self.removing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn bulk(boot: u64, id: u32) -> FullSyncId {
        FullSyncId { boot, id }
    }

    /// Starts `id` read on connection 1, reconciling (a mark), with a walk if one may start:
    /// returns whether it walks (None: ignored). The walk's scan stands for any: these rules
    /// never read it.
    fn start(rx: &mut FullSyncRx, id: FullSyncId) -> Option<bool> {
        start_at(rx, id, later())
    }

    /// A start read on connection `generation`, of the nine attached so far.
    const fn on(generation: u64) -> TakenOn {
        TakenOn {
            generation,
            next_attached: 10,
        }
    }

    /// An instant a long while after the last one this gave: walks are never paced.
    fn later() -> Instant {
        thread_local!(static LAST: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) });
        LAST.with(|last| {
            let t = last.get().unwrap_or_else(Instant::now) + WALK_EVERY * 100;
            last.set(Some(t));
            t
        })
    }

    /// [`start`] at `now`.
    fn start_at(rx: &mut FullSyncRx, id: FullSyncId, now: Instant) -> Option<bool> {
        start_on(rx, id, on(1), now)
    }

    /// [`start_at`] read on connection `on`.
    fn start_on(rx: &mut FullSyncRx, id: FullSyncId, on: TakenOn, now: Instant) -> Option<bool> {
        let mut walked = false;
        let started = rx.start(id, on, Some(5), now, || {
            walked = true;
            None
        });
        assert_eq!(
            started == Start::Unwalked,
            started != Start::Ignored && !walked
        );
        (started != Start::Ignored).then_some(walked)
    }

    /// Full sync ids wrap (they are the low 32 bits of a counter every dial attempt takes
    /// from too): the first past the wrap, read on another connection attached before the last
    /// start's, starts. Before, it was taken for an older start read late, its frames were
    /// refused as superseded and never acknowledged, and the link went down for missed acks
    /// (seen failing).
    #[test]
    fn a_start_numbered_past_the_wrap_starts() {
        let mut rx = FullSyncRx::default();
        assert_eq!(start(&mut rx, bulk(1, u32::MAX)), Some(true));
        assert_eq!(
            start_on(&mut rx, bulk(1, 0), on(2), later()),
            Some(true),
            "the next id, 0"
        );
        assert_eq!(
            start_on(&mut rx, bulk(1, u32::MAX), on(1), later()),
            None,
            "the one before the wrap, read late on the first connection"
        );
    }

    #[test]
    fn an_older_start_read_late_is_ignored_and_a_new_boot_starts_over() {
        let mut rx = FullSyncRx::default();
        assert_eq!(start(&mut rx, bulk(1, 3)), Some(true));
        let late = |rx: &mut FullSyncRx, id| start_on(rx, id, on(2), later());
        assert_eq!(late(&mut rx, bulk(1, 3)), None, "the same start again");
        assert_eq!(late(&mut rx, bulk(1, 2)), None, "an older start");
        assert_eq!(rx.running().map(|b| b.id), Some(bulk(1, 3)));
        assert_eq!(late(&mut rx, bulk(2, 1)), Some(true), "a new boot's first");
    }

    /// A start numbered far ahead (by a holder of the cluster key) had every later start of
    /// the peer's boot ignored, its frames then refused as superseded and never acknowledged,
    /// until the peer restarted. Seen failing so. A lower id read on the same connection, or
    /// on one attached since, starts; one read late on another connection still does not.
    #[test]
    fn a_start_numbered_far_ahead_is_taken_back_by_the_next_one() {
        let mut rx = FullSyncRx::default();
        assert_eq!(start(&mut rx, bulk(1, u32::MAX)), Some(true));
        assert_eq!(start(&mut rx, bulk(1, 4)), Some(true), "same connection");
        assert_eq!(rx.running().map(|b| b.id), Some(bulk(1, 4)));
        assert_eq!(start(&mut rx, bulk(1, u32::MAX)), Some(true));
        let attached_since = on(10);
        assert_eq!(
            start_on(&mut rx, bulk(1, 5), attached_since, later()),
            Some(true),
            "a connection attached since"
        );
        assert_eq!(
            start_on(&mut rx, bulk(1, 4), on(1), later()),
            None,
            "read late on a connection attached before"
        );
        assert_eq!(
            rx.running().map(|b| (b.id, b.generation)),
            Some((bulk(1, 5), 10))
        );
    }

    #[test]
    fn only_the_running_full_syncs_end_on_its_own_connection_ends_it() {
        let mut rx = FullSyncRx::default();
        start(&mut rx, bulk(1, 3));
        assert!(rx.end(bulk(1, 2), 1, 0).is_none(), "another id");
        assert!(rx.end(bulk(2, 3), 1, 0).is_none(), "another boot");
        assert!(rx.end(bulk(1, 3), 2, 0).is_none(), "another connection");
        let ended = rx.end(bulk(1, 3), 1, 0).expect("its own end");
        assert!(ended.done_now, "no removal without a walk");
        assert!(rx.end(bulk(1, 3), 1, 0).is_none(), "ended twice");
    }

    #[test]
    fn frames_count_on_the_full_syncs_connection_only() {
        let keys = [FlowKey::default(); 3];
        let mut rx = FullSyncRx::default();
        start(&mut rx, bulk(1, 3));
        rx.carried(2, keys.iter());
        rx.carried(1, keys.iter());
        let ended = rx.end(bulk(1, 3), 1, 6).expect("ended");
        assert_eq!(ended.applied, 3);
    }

    #[test]
    fn a_lost_connection_ends_its_full_sync_unended() {
        let mut rx = FullSyncRx::default();
        start(&mut rx, bulk(1, 3));
        rx.link_lost(2);
        assert!(rx.running().is_some(), "another connection's loss");
        rx.link_lost(1);
        assert!(rx.running().is_none());
        assert!(rx.end(bulk(1, 3), 1, 0).is_none());
        assert_eq!(rx.removal_over(), None, "nothing ended");
    }

    /// While a removal runs: a full sync that starts walks nothing, one that ends counts when
    /// the removal is over; the next full sync after it walks again.
    #[test]
    fn one_removal_at_a_time_and_the_last_end_counts_after_it() {
        // An earlier full sync's removal runs.
        let mut rx = FullSyncRx {
            removing: true,
            ..FullSyncRx::default()
        };
        assert_eq!(
            start(&mut rx, bulk(1, 4)),
            Some(false),
            "walked during a removal"
        );
        let ended = rx.end(bulk(1, 4), 1, 0).expect("ended");
        assert!(!ended.done_now, "done while the last removal runs");
        assert!(ended.removal.is_none());
        assert_eq!(rx.removal_over(), Some(bulk(1, 4)));
        assert_eq!(start(&mut rx, bulk(1, 5)), Some(true));
        assert_eq!(
            rx.removal_over(),
            None,
            "an ended one counted while another runs"
        );
    }

    /// A full sync replaced by a newer start never ends; one lost with its connection during
    /// a removal leaves the last one ended to count when the removal is over; an abandoned
    /// walk still running keeps the next start from walking.
    #[test]
    fn a_replaced_or_lost_full_sync_leaves_the_last_ended_to_count() {
        let mut rx = FullSyncRx::default();
        start(&mut rx, bulk(1, 3));
        assert!(rx.end(bulk(1, 3), 1, 0).is_some());
        rx.removing = true;
        start(&mut rx, bulk(1, 4));
        start(&mut rx, bulk(1, 5));
        assert!(rx.end(bulk(1, 4), 1, 0).is_none(), "a replaced one ended");
        rx.link_lost(1);
        assert_eq!(rx.removal_over(), Some(bulk(1, 3)));
        let alive = std::sync::Arc::new(());
        rx.abandoned.push(Walking::of(&alive));
        assert_eq!(
            start(&mut rx, bulk(1, 6)),
            Some(true),
            "one abandoned walk blocked"
        );
        rx.abandoned.push(Walking::of(&alive));
        assert_eq!(start(&mut rx, bulk(1, 7)), Some(false), "walked beside two");
        drop(alive);
        assert_eq!(start(&mut rx, bulk(1, 8)), Some(true));
        assert!(rx.abandoned.is_empty(), "walks over are still listed");
    }

    /// A peer starting full syncs as fast as it sends frames: their walks (a thread each)
    /// start a burst at once, then one per interval. Seen failing (100 walks) before.
    #[test]
    fn walks_start_at_a_bounded_pace() {
        let mut rx = FullSyncRx::default();
        let t0 = Instant::now();
        let walks = (1..=100)
            .filter(|&id| start_at(&mut rx, bulk(1, id), t0) == Some(true))
            .count();
        assert_eq!(walks, WALK_BURST as usize, "walks started in one instant");
        assert_eq!(start_at(&mut rx, bulk(1, 101), t0 + WALK_EVERY), Some(true));
        assert_eq!(
            start_at(&mut rx, bulk(1, 102), t0 + WALK_EVERY),
            Some(false)
        );
        assert_eq!(
            rx.running().map(|b| b.id),
            Some(bulk(1, 102)),
            "still started"
        );
    }

    /// A full sync without a mark (the peer's table is not intact) walks nothing.
    #[test]
    fn a_full_sync_that_does_not_reconcile_walks_nothing() {
        let mut rx = FullSyncRx::default();
        assert_eq!(
            rx.start(bulk(1, 1), on(1), None, Instant::now(), || panic!("walked")),
            Start::Started
        );
        assert!(!rx.reconciling());
    }
}
