//! Receiving: one reader per connection. It never waits on writing (acks and nothing else go
//! back, through the connection's writer, which takes them at once). A peer's session frames
//! are applied one at a time in the peer's sequence order, whichever link carried them; a
//! frame is acknowledged only once applied. Reading, authenticating and decoding run a few
//! frames ahead of the apply, on a task of their own ([`read_ahead`]): on two CPUs the next
//! frame's decryption overlaps this one's apply.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{info, warn};

use super::{
    full_sync_rx::{Ended, Start},
    lock, Engine, Peer, PeerInner, Placed, SessionTable,
};
use crate::lock::lock_on_worker;
use crate::sync::stats::Rejection;
use crate::tasks::AbortOnDrop;
use crate::{
    cluster::{FullSyncId, MemberState},
    datapath::{error_chain, monotonic_ns, DatapathError},
    stall_watch::StallWatch,
    sync::{
        apply::{self, Applier, MemberSet, RecordCounts},
        channel::{ChannelError, Receiver},
        stale::StaleScan,
        stats::{LinkStats, PeerStats},
        table::Unseen,
        wire::{Hello, Keepalive, LinkKind, Message, Record},
        writer::Writer,
    },
};

/// Frames read and decoded ahead of the one being applied: the reader stops reading the
/// connection when they wait (the peer's sends then wait too), so a connection holds at most
/// this many decoded frames, one more in the reader's hands and the one being applied.
const READ_AHEAD: usize = 2;

/// A frame as [`Receiver::recv`] gives it.
pub(super) type Read = Result<(Message, usize), ChannelError>;

/// Reads frames from `rx` on a task of its own, up to [`READ_AHEAD`] ahead of the caller,
/// until the first error (passed on as the last item) or until the returned guard is
/// dropped.
pub(super) fn read_ahead(mut rx: Receiver) -> (mpsc::Receiver<Read>, AbortOnDrop) {
    let (tx, frames) = mpsc::channel(READ_AHEAD);
    let task = tokio::spawn(async move {
        loop {
            let read = rx.recv().await;
            let failed = read.is_err();
            if tx.send(read).await.is_err() || failed {
                return;
            }
        }
    });
    (frames, AbortOnDrop(task))
}

/// What became of a session frame.
pub(super) enum Applied {
    /// Applied: acknowledge it.
    Done,
    /// Older than a frame already applied (it came late on another link, and what it carried
    /// was queued again by the sender): dropped, not acknowledged.
    Stale,
    /// A full sync's frame from a connection that carries no running full sync (one aborted
    /// or superseded): dropped, not acknowledged. Applying it could bring back a session
    /// removed since, and mark it as seen by the newer full sync.
    Superseded,
}

impl<T: SessionTable> Engine<T> {
    #[expect(
        clippy::too_many_arguments,
        reason = "the connection's identity, in its parts"
    )]
    pub(super) async fn read_loop(
        self,
        peer: Arc<Peer>,
        link: LinkKind,
        generation: u64,
        boot_id: u64,
        registered: tokio::sync::oneshot::Receiver<()>,
        rx: Receiver,
        writer: Writer,
    ) {
        // Nothing is read before the connection is registered (its hello, zones and link).
        if registered.await.is_err() {
            return;
        }
        let stats = peer.stats.link(link);
        let from = FrameFrom {
            peer: &peer,
            link,
            boot_id,
            generation,
        };
        let (mut frames, _reading) = read_ahead(rx);
        loop {
            let read = frames.recv().await.unwrap_or(Err(ChannelError::Closed));
            let (msg, bytes) = match read {
                Ok(m) => m,
                Err(e) => {
                    if e.reason() != Rejection::Connection
                        && self.inner.rejections.count(e.reason())
                    {
                        warn!(peer = peer.cfg.id.0, link = link.name(), error = %e, "bad frame from peer");
                    }
                    self.detach(&peer, link, Some(generation), e.reason().name());
                    return;
                }
            };
            LinkStats::add(&stats.bytes_received, bytes as u64);
            LinkStats::add(&stats.frames_received, 1);
            let applies = matches!(msg, Message::Sessions { .. });
            if let Err(why) = self.handle(&from, msg, &writer) {
                self.detach(&peer, link, Some(generation), why);
                return;
            }
            if applies {
                // The frame was applied on this worker: other tasks get their turn now, not
                // after the next frames too.
                tokio::task::yield_now().await;
            }
        }
    }

    /// Is the frame of the peer's current boot? If so, its connection (if still the link's
    /// current one) was heard from now.
    fn heard_on(&self, f: &FrameFrom<'_>) -> bool {
        let mut g = f.peer.lock();
        if g.hello.as_ref().map(|h| h.boot_id) != Some(f.boot_id) {
            return false;
        }
        if let Some(c) = g.links.get_mut(&f.link) {
            if c.generation == f.generation {
                c.last_rx = Instant::now();
            }
        }
        true
    }

    /// Handles one message; an error closes the connection, with the reason. Messages from a
    /// connection of an earlier boot of the peer (still draining while the new boot's hello
    /// came on the other link) are dropped, whatever they are, and do not keep their
    /// connection alive: only a frame of the current boot on the link's current connection
    /// counts as heard from it (so a connection whose frames are all dropped falls silent and
    /// is replaced).
    pub(super) fn handle(
        &self,
        f: &FrameFrom<'_>,
        msg: Message,
        writer: &Writer,
    ) -> Result<(), &'static str> {
        let stats = f.peer.stats.link(f.link);
        if !self.heard_on(f) {
            self.inner.rejections.count(Rejection::StaleFrame);
            return Ok(());
        }
        match msg {
            Message::Keepalive(ka) => self.on_keepalive(f, stats, ka),
            Message::Sessions { seq, bulk, records } => {
                LinkStats::add(&stats.records_received, records.len() as u64);
                // The table work runs on this worker: one frame, at most a few hundred records
                // (a few hundred µs). Handing the worker to another thread for every frame
                // (`block_in_place`) cost more CPU than the apply itself; only a wait for a
                // lock that another holder has (the other link's reader, the sender, the sweep
                // settling a chunk) is taken off the worker (`lock_on_worker`).
                let applied = self.apply_in_order(f, seq, &records, bulk)?;
                match applied {
                    Applied::Done => writer.ack(seq),
                    Applied::Stale | Applied::Superseded => {
                        if self.inner.rejections.count(Rejection::StaleFrame) {
                            info!(
                                peer = f.peer.cfg.id.0,
                                link = f.link.name(),
                                seq,
                                "frame read late (sent before one applied, or of a full sync replaced since) dropped (further ones are counted as stale-frame)"
                            );
                        }
                    }
                }
            }
            Message::Ack { seq } => self.on_ack(f.peer, stats, seq),
            Message::BulkStart { bulk_id } => self.on_bulk_start(f, bulk_id),
            Message::BulkEnd { bulk_id, records } => {
                // The stale replicas' removal runs on its own; this reader goes on reading.
                let _removal = self.on_bulk_end(f, bulk_id, records);
            }
            Message::Hello(hello) => self.on_hello_again(f, &hello),
        }
        Ok(())
    }

    /// A second hello on a connection: taken once, on a connection whose hello said the
    /// peer's table was fresh, when it repeats the peer's first saying it no longer is (its
    /// fresh-table window ended: its full syncs on this connection reconcile from now on, and
    /// ours stop handing its sessions back); anything else is malformed and changes nothing.
    /// (A release without it counts ours as malformed and goes on.)
    fn on_hello_again(&self, f: &FrameFrom<'_>, hello: &Hello) {
        let renewed = {
            let mut g = f.peer.lock();
            let repeats = g
                .hello
                .as_ref()
                .is_some_and(|first| hello.repeats(first) && f.boot_id == first.boot_id);
            // Once per connection whose hello said fresh: a repeat changes nothing.
            let told_fresh = g
                .links
                .get(&f.link)
                .is_some_and(|c| c.generation == f.generation && c.peer_fresh);
            let renewed = repeats && !hello.fresh_table && told_fresh;
            if renewed {
                if let Some(c) = g.links.get_mut(&f.link) {
                    c.peer_fresh = false;
                }
                if let Some(first) = g.hello.as_mut() {
                    first.fresh_table = false;
                }
            }
            renewed
        };
        if renewed {
            // Limited: a holder of the key at the peer's address can renew a connection's
            // hello, close it and connect again as fast as handshakes go.
            self.log_limited(format!("fresh-over-{}", f.peer.cfg.id.0), |skipped| {
                info!(
                    peer = f.peer.cfg.id.0,
                    link = f.link.name(),
                    skipped,
                    "peer's table is no longer fresh: its full syncs reconcile again"
                );
            });
        } else if self.inner.rejections.count(Rejection::Malformed) {
            warn!(peer = f.peer.cfg.id.0, "unexpected second hello");
        }
    }

    /// A keepalive: the peer is heard from, and its state is what it says, unless a later
    /// keepalive was taken already (this one came late on the other link: the later one's
    /// state stands; [`keepalive_order`] says when the order is taken back).
    fn on_keepalive(&self, f: &FrameFrom<'_>, stats: &LinkStats, ka: Keepalive) {
        let Keepalive {
            state,
            sessions_owned,
            flaps: _,
            seq,
        } = ka;
        let peer = f.peer;
        LinkStats::add(&stats.keepalives_received, 1);
        // The membership's lock first (before the peer's, as everywhere), held from the order
        // check to the update: a keepalive read at the same time on the other link cannot
        // slip between them.
        let mut membership = lock(&self.inner.membership);
        let now = Instant::now();
        let lapse = Lapse {
            after: self.inner.cfg.keepalive_threshold,
            stalls: &self.inner.stall,
        };
        let order = keepalive_order(&mut peer.lock(), f, seq, now, &lapse);
        let back = match order {
            KeepaliveOrder::Take => membership.heard(
                peer.cfg.id,
                MemberState::from_u8(state),
                sessions_owned,
                now,
            ),
            KeepaliveOrder::Copy => membership.heard_late(peer.cfg.id, now),
            KeepaliveOrder::Late => {
                LinkStats::add(&stats.keepalives_late, 1);
                membership.heard_late(peer.cfg.id, now)
            }
            KeepaliveOrder::OldBoot => false,
        };
        drop(membership);
        if back {
            self.member_returned();
        }
    }

    pub(super) fn on_ack(&self, peer: &Peer, stats: &LinkStats, seq: u64) {
        LinkStats::add(&stats.acks_received, 1);
        let (released, confirmed) = {
            let mut g = peer.lock();
            if seq >= g.window.next_unsent() {
                drop(g);
                // A lie (or a bug): it would release frames the peer never read.
                self.inner.rejections.count(Rejection::Malformed);
                self.log_once(format!("ack-unsent-{}", peer.cfg.id.0), || {
                    warn!(
                        peer = peer.cfg.id.0,
                        seq,
                        "ack of a frame never sent refused (further ones are counted as malformed)"
                    );
                });
                return;
            }
            let released = g.window.ack(seq);
            let confirmed = g.bulk_unconfirmed.take_if(|(end, _)| *end <= seq);
            (released, confirmed)
        };
        if let Some((_, sent)) = confirmed {
            self.bulk_confirmed(peer, sent);
        }
        let now = Instant::now();
        let mut lag = lock(&peer.stats.lag);
        for oldest in released {
            lag.record(now.duration_since(oldest));
        }
        drop(lag);
        peer.wake.notify_one();
    }

    /// A full sync starts on this connection. One with an id not above the last this boot
    /// of the peer started is an old one read late from another connection: ignored.
    pub(super) fn on_bulk_start(&self, f: &FrameFrom<'_>, bulk_id: u32) {
        let peer = f.peer;
        let bulk = FullSyncId {
            boot: f.boot_id,
            id: bulk_id,
        };
        {
            let mut g = peer.lock();
            // A peer with its table intact (as its hello on this connection said) is the
            // authority on its sessions: its full sync also removes the replicas it no longer
            // holds.
            let authoritative = g
                .links
                .get(&f.link)
                .is_some_and(|c| c.generation == f.generation && !c.peer_fresh);
            let walk = || {
                self.reconciles(peer)
                    .then(|| StaleScan::start(self.inner.dp.clone(), peer.cfg.id))
            };
            let mark = authoritative.then(monotonic_ns);
            let start = g.full_sync_rx.start(
                bulk,
                self.taken_on(f.generation),
                mark,
                Instant::now(),
                walk,
            );
            if start != Start::Ignored {
                // Under the peer's lock, as its loss with the link (`detach`).
                let mut b = lock(&peer.stats.bulk_received);
                b.running = true;
                b.started_ms = monotonic_ns() / 1_000_000;
            }
            drop(g);
            // Logged once per peer: a peer can send these as fast as it likes.
            match start {
                Start::Ignored => {
                    self.inner.rejections.count(Rejection::StaleFrame);
                    self.log_once(format!("late-bulk-start-{}", peer.cfg.id.0), || {
                        info!(
                            peer = peer.cfg.id.0,
                            bulk_id, "start of an older full sync ignored (further ones are counted as stale-frame)"
                        );
                    });
                    return;
                }
                Start::Unwalked => self.log_once(format!("unwalked-{}", peer.cfg.id.0), || {
                    info!(
                        peer = peer.cfg.id.0,
                        bulk_id, "full sync from peer started without a walk of the table (earlier ones' walks or removal still run, or full syncs started faster than one a second): the replicas it does not carry stay until a later full sync or their timeout (logged once)"
                    );
                }),
                Start::Started => {}
            }
            // The fresh table's window runs from the first full sync that started.
            let limit = self.inner.cfg.initial_sync_limit;
            self.inner
                .fresh_until
                .get_or_init(|| Instant::now() + limit);
        }
        // After the peer's lock (the membership's is never taken under a peer's): a removal
        // ending meanwhile counts its own full sync, by id, not this one.
        lock(&self.inner.membership).bulk_started(peer.cfg.id, bulk);
        self.log_limited(format!("bulk-rx-start-{}", peer.cfg.id.0), |skipped| {
            info!(
                peer = peer.cfg.id.0,
                bulk_id, skipped, "full sync from peer started"
            )
        });
    }

    /// A full sync ends. Only the running one's end, from its connection, counts, and only if
    /// every record it announced was applied: then it removes the replicas the peer no longer
    /// holds, and counts as done (for this member's initial state, and what the next hello
    /// asks for) at once if no removal of stale replicas runs for the peer, else when that
    /// removal is over. One incomplete closes its connection. Returns the removal it
    /// started, if any.
    pub(super) fn on_bulk_end(
        &self,
        f: &FrameFrom<'_>,
        bulk_id: u32,
        records: u64,
    ) -> Option<JoinHandle<()>> {
        let peer = f.peer;
        let bulk = FullSyncId {
            boot: f.boot_id,
            id: bulk_id,
        };
        let ended = peer.lock().full_sync_rx.end(bulk, f.generation, records);
        let Some(Ended {
            applied,
            removal,
            done_now,
        }) = ended
        else {
            self.inner.rejections.count(Rejection::StaleFrame);
            self.log_once(format!("late-bulk-end-{}", peer.cfg.id.0), || {
                info!(
                    peer = peer.cfg.id.0,
                    bulk_id, "end of a full sync that is not running here ignored (further ones are counted as stale-frame)"
                );
            });
            return None;
        };
        if applied != records {
            self.inner.rejections.count(Rejection::BulkIncomplete);
            self.log_limited(format!("bulk-rx-incomplete-{}", peer.cfg.id.0), |skipped| {
                warn!(
                    peer = peer.cfg.id.0,
                    bulk_id,
                    announced = records,
                    applied,
                    skipped,
                    "full sync from peer ended incomplete: its replicas are not reconciled, and the connection closes (the next one's hello asks for another)"
                )
            });
            lock(&peer.stats.bulk_received).running = false;
            self.detach(peer, f.link, Some(f.generation), "full sync incomplete");
            return None;
        }
        let counted = done_now && self.count_bulk_done(peer, bulk);
        self.bulk_received(peer, bulk_id, records);
        if counted {
            self.settle_fresh_table();
        }
        removal.map(|(mark, scan)| self.remove_stale_replicas(peer.clone(), scan, mark))
    }

    /// The removal of `peer`'s stale replicas is over (done, failed, or its thread gone): the
    /// latest full sync ended counts as done, unless another one is running (its end counts).
    fn removal_over(&self, peer: &Peer) {
        let ended = peer.lock().full_sync_rx.removal_over();
        if ended.is_some_and(|bulk| self.count_bulk_done(peer, bulk)) {
            self.settle_fresh_table();
        }
    }

    /// Full sync `bulk` (its sender's boot and id) from `peer` is done, if it is still the one
    /// the membership knows as running. Takes the membership's lock: never under a peer's
    /// (`show cluster members` takes a peer's under the membership's).
    fn count_bulk_done(&self, peer: &Peer, bulk: FullSyncId) -> bool {
        lock(&self.inner.membership).bulk_ended(peer.cfg.id, bulk)
    }

    fn bulk_received(&self, peer: &Peer, bulk_id: u32, records: u64) {
        let mut b = lock(&peer.stats.bulk_received);
        b.running = false;
        b.count += 1;
        b.last_records = records;
        b.last_duration_ms = (monotonic_ns() / 1_000_000).saturating_sub(b.started_ms);
        let ms = b.last_duration_ms;
        drop(b);
        self.log_limited(format!("bulk-rx-end-{}", peer.cfg.id.0), |skipped| {
            info!(
                peer = peer.cfg.id.0,
                bulk_id, records, ms, skipped, "full sync from peer ended"
            )
        });
    }

    /// Applies a session frame if it is the peer's next in sequence (any gap was queued
    /// again by the sender), or shows the last one's number false ([`super::TakenOn`]), and,
    /// for a full sync's frame, if it belongs to the full sync running on its connection. A
    /// frame that fails to apply is not acknowledged: the connection closes and the peer sends
    /// the frame's sessions again.
    pub(super) fn apply_in_order(
        &self,
        f: &FrameFrom<'_>,
        seq: u64,
        records: &[Record],
        bulk: bool,
    ) -> Result<Applied, &'static str> {
        let mut order = lock_on_worker(&f.peer.applied);
        match order.place(f.boot_id, seq, f.generation) {
            Placed::Next => {}
            Placed::Late => return Ok(Applied::Stale),
            Placed::TakenBack => self.log_once(format!("seq-back-{}", f.peer.cfg.id.0), || {
                warn!(
                    peer = f.peer.cfg.id.0,
                    link = f.link.name(),
                    seq,
                    last = order.seq.last(),
                    "the peer's frame numbers went back: the last one taken was numbered far ahead (by a holder of the cluster key); the order starts again from this frame (logged once)"
                );
            }),
        }
        if bulk
            && f.peer
                .lock()
                .full_sync_rx
                .running_on(f.generation)
                .is_none()
        {
            return Ok(Applied::Superseded);
        }
        if let Err(e) = self.apply_records(f.peer, records, bulk) {
            warn!(peer = f.peer.cfg.id.0, seq, error = %error_chain(&e), "applying sessions failed; the peer will send them again");
            // The reason keeps its old name: operators and dashboards count it by that name.
            return Err("install-failed");
        }
        order.taken(seq, self.taken_on(f.generation));
        if bulk {
            let keys = records.iter().map(|r| &r.key);
            f.peer.lock().full_sync_rx.carried(f.generation, keys);
        }
        Ok(Applied::Done)
    }

    /// Applies a frame's records to the session table.
    fn apply_records(
        &self,
        peer: &Peer,
        records: &[Record],
        bulk: bool,
    ) -> Result<(), DatapathError> {
        if !self.reconciles(peer) {
            return Ok(());
        }
        let (zones, reconciling) = {
            let g = peer.lock();
            (
                g.zones.clone(),
                (bulk && g.full_sync_rx.reconciling()).then_some(peer.cfg.id),
            )
        };
        let who = self.applier(peer, bulk, reconciling);
        let r = {
            let mut dp = lock_on_worker(&self.inner.dp);
            apply::apply(&mut *dp, records, &zones, monotonic_ns(), &who)?
        };
        self.count_applied(&peer.stats, &r);
        Ok(())
    }

    fn applier(
        &self,
        peer: &Peer,
        bulk: bool,
        reconciling: Option<hasync_common::MemberId>,
    ) -> Applier {
        let local = self.inner.cfg.local;
        let alive: MemberSet = {
            let m = lock(&self.inner.membership);
            m.peers
                .values()
                .filter(|p| p.alive)
                .map(|p| p.id)
                .chain([local])
                .collect()
        };
        Applier {
            local,
            sender: peer.cfg.id,
            bulk,
            members: self
                .inner
                .cfg
                .peers
                .iter()
                .map(|p| p.id)
                .chain([local])
                .collect(),
            alive,
            fresh_table: self.fresh_table(),
            reconciling,
        }
    }

    fn count_applied(&self, stats: &PeerStats, r: &RecordCounts) {
        LinkStats::add(&stats.installed, r.installed);
        LinkStats::add(&stats.deleted, r.deleted);
        LinkStats::add(&stats.kept, r.kept);
        LinkStats::add(&stats.orphaned, r.orphaned);
        LinkStats::add(&stats.refused_zone, r.refused_zone);
        self.inner
            .rejections
            .count_n(Rejection::ZoneUnknown, r.refused_zone);
        self.inner
            .rejections
            .count_n(Rejection::TableFull, r.refused_full);
        self.inner
            .rejections
            .count_n(Rejection::UntrackableKey, r.refused_key);
        self.inner
            .rejections
            .count_n(Rejection::InvalidState, r.refused_state);
        for (why, n) in r.refused_owner {
            LinkStats::add(&stats.refused_owner, n);
            self.inner.rejections.count_n(why.reason(), n);
        }
    }

    /// Do replicas of `peer`'s sessions live in this member's table at all (both sides sync
    /// sessions)?
    fn reconciles(&self, peer: &Peer) -> bool {
        peer.cfg.session_sync && self.inner.cfg.local_session_sync
    }

    /// After an authoritative full sync from `peer`: drops our replicas of its sessions that
    /// it did not send (it closed or expired them while we could not hear of it), those still
    /// unseen since `mark` once `scan`'s walk of the table ended; then the full sync is done
    /// ([`Self::removal_over`], however the removal ends). On a thread of the blocking pool:
    /// the walk grows with the table and waits for its lock between chunks, and a reader
    /// waiting for it would read neither the peer's keepalives (after the keepalive threshold
    /// this member would take the peer for dead, and drop the link) nor its next frames.
    /// Records applied meanwhile were seen after `mark`: they stay.
    fn remove_stale_replicas(&self, peer: Arc<Peer>, scan: StaleScan, mark: u64) -> JoinHandle<()> {
        let over = RemovalOver {
            engine: self.clone(),
            peer,
        };
        tokio::task::spawn_blocking(move || {
            let unseen = scan.finish(&over.engine.inner.dp, mark);
            over.engine.stale_removed(&over.peer, unseen);
        })
    }

    fn stale_removed(&self, peer: &Peer, unseen: Result<Unseen, DatapathError>) {
        match unseen {
            Ok(Unseen {
                removed: 0,
                orphaned: 0,
            }) => {}
            Ok(Unseen { removed, orphaned }) => {
                LinkStats::add(&peer.stats.deleted, removed as u64);
                LinkStats::add(&peer.stats.orphaned, orphaned as u64);
                self.log_limited(format!("stale-removed-{}", peer.cfg.id.0), |skipped| {
                    info!(
                        peer = peer.cfg.id.0,
                        removed,
                        orphaned,
                        skipped,
                        "stale replicas the peer no longer holds removed after its full sync (those whose flows come through here kept, orphaned)"
                    )
                });
            }
            Err(e) => {
                warn!(peer = peer.cfg.id.0, error = %error_chain(&e), "removing stale replicas failed")
            }
        }
    }
}

/// A removal of stale replicas under way: when it is dropped (the removal over, a panic in it,
/// or its task dropped unrun at shutdown), the peer's next full sync may walk again, and the
/// latest one ended counts as done.
struct RemovalOver<T: SessionTable> {
    engine: Engine<T>,
    peer: Arc<Peer>,
}

impl<T: SessionTable> Drop for RemovalOver<T> {
    fn drop(&mut self) {
        self.engine.removal_over(&self.peer);
    }
}

/// Where a keepalive falls in the order of its peer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum KeepaliveOrder {
    /// The latest, or the first after the order was taken back (shown false, or lapsed), or
    /// unnumbered (a 1.3 peer's): its state is taken.
    Take,
    /// The copy of the latest, read on the other link.
    Copy,
    /// Older than one taken: read late on the other link.
    Late,
    /// Of a boot of the peer's that a new hello replaced meanwhile: nothing.
    OldBoot,
}

/// When the order of a peer's keepalives lapses: `after` this long (the keepalive threshold)
/// without one taken, this agent's own stalls left out.
pub(super) struct Lapse<'a> {
    pub(super) after: Duration,
    pub(super) stalls: &'a StallWatch,
}

impl Lapse<'_> {
    /// Has the order taken at `at` lapsed by `now`? Time this agent did not run does not count:
    /// after a stall of its own both links hold keepalives it could not read, and the first
    /// read, perhaps an older one the lagging link held, must not be taken over the newer one
    /// the other link delivered before the stall.
    fn lapsed(&self, at: Instant, now: Instant) -> bool {
        let stalled = self.stalls.stalled_within(at, now);
        now.saturating_duration_since(at).saturating_sub(stalled) > self.after
    }
}

/// Places keepalive `seq`, read from connection `f`, in `g`'s order at `now`, taking it if it
/// is the latest. A peer that sent one numbered far ahead (a forged or corrupt one, by a holder
/// of the cluster key) would have every later one refused for the rest of its boot, and its
/// state frozen; so a lower number read on the connection that carried the last one taken
/// (a connection delivers in order, and its writer never sends a number below one it sent)
/// takes the order back at once, and any keepalive does once the order lapsed by `lapse` (the
/// keepalive threshold since the last one taken, this agent's own stalls left out: a
/// connection whose writes lag longer is closed).
pub(super) fn keepalive_order(
    g: &mut PeerInner,
    f: &FrameFrom<'_>,
    seq: u64,
    now: Instant,
    lapse: &Lapse<'_>,
) -> KeepaliveOrder {
    if g.hello.as_ref().map(|h| h.boot_id) != Some(f.boot_id) {
        return KeepaliveOrder::OldBoot;
    }
    if seq == 0 {
        return KeepaliveOrder::Take;
    }
    if !g.keepalives.is_new(f.boot_id, seq) {
        if seq == g.keepalives.last() {
            return KeepaliveOrder::Copy;
        }
        let anchor = g.keepalive_anchor;
        let same_connection =
            anchor.is_some_and(|a| (a.link, a.generation) == (f.link, f.generation));
        // Only from a link's current connection: what a closed one still had buffered may
        // be older than anything taken.
        let current = g
            .links
            .get(&f.link)
            .is_some_and(|c| c.generation == f.generation);
        let expired = current && anchor.is_some_and(|a| lapse.lapsed(a.at, now));
        if !same_connection && !expired {
            return KeepaliveOrder::Late;
        }
    }
    g.keepalives.taken(seq);
    g.keepalive_anchor = Some(super::KeepaliveAnchor {
        at: now,
        link: f.link,
        generation: f.generation,
    });
    KeepaliveOrder::Take
}

/// Where a message came from.
pub(super) struct FrameFrom<'a> {
    pub(super) peer: &'a Arc<Peer>,
    pub(super) link: LinkKind,
    /// The peer's boot, from this connection's hello.
    pub(super) boot_id: u64,
    /// The connection.
    pub(super) generation: u64,
}
