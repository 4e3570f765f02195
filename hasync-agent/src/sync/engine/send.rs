//! Sending: queued changes while the window allows, full syncs (at most one per backoff step
//! per peer), keepalives. Everything goes through the connection's writer, so a peer that
//! stops reading stalls only its own connection, which the writer's deadline then closes.

use std::{
    collections::HashSet,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::{Duration, Instant},
};

use hasync_common::{FlowKey, MemberId, Session};
use tracing::{debug, info, warn};

use super::{lock, BulkSent, Engine, Peer, PeerInner, SessionTable, ACKS_MISSED};
use crate::lock::lock_on_worker;
use crate::{
    datapath::{error_chain, monotonic_ns, DatapathError},
    sync::{
        backlog::{Change, Taken},
        channel::ChannelError,
        stats::LinkStats,
        wire::{Keepalive, LinkKind, Message, Record, MAX_RECORDS_PER_FRAME},
        writer::Writer,
    },
};

/// How often a peer's sender looks for work when not woken.
const SEND_TICK: Duration = Duration::from_millis(20);
/// Session table entries read per chunk of a full sync.
const BULK_CHUNK: u32 = MAX_RECORDS_PER_FRAME as u32 * 8;

/// Why sending stopped.
#[derive(Debug, thiserror::Error)]
pub(super) enum SendError {
    /// The connection failed: it is closed and dialled again.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// Reading the session table failed: the connection is fine; the full sync is aborted
    /// (never ended: the peer would take what it did not get as removed) and tried again.
    #[error("reading the session table: {0}")]
    Table(#[from] DatapathError),
}

/// Is connection `(link, generation)` still the one `peer`'s data goes out on? A frame is put
/// in the window only if it is: the window of a failed connection was queued again already.
fn carries(g: &PeerInner, (link, generation): (LinkKind, u64)) -> bool {
    g.data_link == Some(link)
        && g.links
            .get(&link)
            .is_some_and(|c| c.generation == generation)
}

impl<T: SessionTable> Engine<T> {
    pub(super) async fn send_loop(self, peer: Arc<Peer>) {
        loop {
            tokio::select! {
                _ = peer.wake.notified() => {}
                _ = tokio::time::sleep(SEND_TICK) => {}
            }
            self.send_pending(&peer).await;
        }
    }

    /// The link, its writer and generation to send on now, and whether a full sync is due
    /// (and allowed by the backoff).
    pub(super) fn prepare_send(&self, peer: &Peer) -> Option<(LinkKind, Writer, u64, bool)> {
        let mut g = peer.lock();
        let now = Instant::now();
        let mut link = Self::pick_link(&g, now)?;
        if let Some(current) = g.data_link.filter(|l| *l != link) {
            if g.window.bulk_in_flight() && g.links.contains_key(&current) {
                // A full sync is unacknowledged on the current link: it ends there (its
                // frames, read after newer ones from the other link, would be dropped).
                link = current;
            } else {
                // Switching links: what the old one had in flight may be lost.
                let (n, bulk_lost) = self.requeue_unacked(peer, &mut g);
                g.bulk_wanted |= bulk_lost;
                LinkStats::add(&peer.stats.resends, n as u64);
                self.log_limited(format!("link-move-{}", peer.cfg.id.0), |skipped| {
                    info!(
                        peer = peer.cfg.id.0,
                        link = link.name(),
                        requeued = n,
                        skipped,
                        "sync data moves to another link"
                    )
                });
            }
        }
        g.data_link = Some(link);
        if lock(&self.inner.backlog).take_overflow(peer.line) {
            g.bulk_wanted = true;
        }
        let c = g.links.get(&link)?;
        let (writer, generation, sent_fresh) = (c.writer.clone(), c.generation, c.sent_fresh);
        // Not while the last one's end is unacknowledged: an ack confirms every end up to it,
        // and one full sync in the air at a time keeps each counted once.
        let bulk = g.bulk_wanted && g.bulk_unconfirmed.is_none() && g.bulk_backoff.try_start(now);
        if bulk {
            g.bulk_wanted = false;
            // The full sync reads the table after this point: it carries what is queued. Not
            // if our hello on this connection said our table was fresh: then the peer does not
            // reconcile our full sync, and a queued removal would be lost.
            if !sent_fresh {
                lock(&self.inner.backlog).clear_pending(peer.line);
            }
        }
        Some((link, writer, generation, bulk))
    }

    /// Tells the backlog whether `peer` is cut off on every link and not heard within the
    /// keepalive threshold (down, stopped, or never seen): what only such peers wait for is
    /// then read when they are back instead of holding the snapshots the others send from.
    fn mark_silent(&self, peer: &Peer) {
        let cut_off = peer.lock().links.is_empty();
        let silent = cut_off
            && lock(&self.inner.membership)
                .peers
                .get(&peer.cfg.id)
                .is_none_or(|p| !p.heard_recently);
        lock(&self.inner.backlog).set_silent(peer.line, silent);
    }

    /// Sends what is due to `peer` on its data link: a full sync if one is wanted, then queued
    /// changes while the window allows.
    pub(super) async fn send_pending(&self, peer: &Arc<Peer>) {
        self.mark_silent(peer);
        let Some((link, writer, generation, bulk)) = self.prepare_send(peer) else {
            return;
        };
        // A full sync that failed starts over; one sent to its end is over (its end's ack,
        // or its link's failure, decides: see `on_ack` and `requeue_unacked`).
        let mut bulk_failed = bulk;
        let result = async {
            if bulk {
                self.send_bulk(peer, (link, generation), &writer).await?;
                bulk_failed = false;
            }
            self.send_queued(peer, (link, generation), &writer).await
        }
        .await;
        let Err(e) = result else {
            return;
        };
        if bulk_failed {
            lock(&peer.stats.bulk_sent).running = false;
        }
        match e {
            SendError::Channel(e) => {
                if bulk_failed {
                    peer.lock().bulk_wanted = true;
                }
                debug!(peer = peer.cfg.id.0, error = %e, "send failed");
                self.detach(peer, link, Some(generation), e.reason().name());
            }
            SendError::Table(e) => {
                warn!(peer = peer.cfg.id.0, error = %error_chain(&e), "reading the session table failed; the full sync to this peer is aborted and tried again");
                peer.lock().bulk_wanted = true;
            }
        }
    }

    /// Sends `peer`'s queued changes on connection `conn` (its link and generation) while
    /// the window allows.
    pub(super) async fn send_queued(
        &self,
        peer: &Peer,
        conn: (LinkKind, u64),
        writer: &Writer,
    ) -> Result<(), SendError> {
        loop {
            let Some((changes, oldest)) = self.take_frame(peer) else {
                return Ok(());
            };
            let records = match self.records_for(&changes) {
                Ok(r) => r,
                Err(e) => {
                    // The keys are out of the queue: a full sync carries them instead.
                    warn!(peer = peer.cfg.id.0, error = %error_chain(&e), "reading sessions to sync failed; a full sync follows");
                    peer.lock().bulk_wanted = true;
                    peer.wake.notify_one();
                    return Ok(());
                }
            };
            let Some(seq) = self.record_frame(peer, conn, &changes, oldest) else {
                return Ok(());
            };
            writer
                .send(Message::Sessions {
                    seq,
                    bulk: false,
                    records,
                })
                .await?;
        }
    }

    /// Up to a frame's worth of `peer`'s queued changes, with when the oldest was queued, if
    /// its window has room.
    pub(super) fn take_frame(&self, peer: &Peer) -> Option<Taken> {
        let g = peer.lock();
        if !g.window.can_send() {
            return None;
        }
        let mut backlog = lock(&self.inner.backlog);
        if backlog.pending(peer.line) == 0 {
            return None;
        }
        Some(backlog.take(peer.line, MAX_RECORDS_PER_FRAME, Instant::now()))
    }

    /// Puts a frame of `changes` in `peer`'s window, to go out on connection `conn`: its
    /// sequence number. None if that connection failed since the changes were taken (its
    /// failure queued again only what the window held, and an ack on the next connection would
    /// release this frame unsent): they are queued again, in front.
    pub(super) fn record_frame(
        &self,
        peer: &Peer,
        conn: (LinkKind, u64),
        changes: &[(FlowKey, Change)],
        oldest: Option<Instant>,
    ) -> Option<u64> {
        let oldest = oldest.unwrap_or_else(Instant::now);
        let mut g = peer.lock();
        if !carries(&g, conn) {
            let keys: Vec<(FlowKey, Instant)> = changes.iter().map(|(k, _)| (*k, oldest)).collect();
            let n = lock(&self.inner.backlog).requeue(peer.line, &keys);
            drop(g);
            LinkStats::add(&peer.stats.resends, n as u64);
            peer.wake.notify_one();
            return None;
        }
        let seq = g.window.next_seq();
        g.window.sent(seq, changes, oldest);
        Some(seq)
    }

    /// Records for queued changes: a snapshot as it is, a read change with the session's
    /// current state. Read sessions no longer ours are skipped (a snapshot is always of our
    /// own: if a peer's record replaced it since, the peer's copy wins by (version, owner));
    /// sessions gone from the table are announced as deleted.
    fn records_for(&self, changes: &[(FlowKey, Change)]) -> Result<Vec<Record>, DatapathError> {
        let local = self.inner.cfg.local;
        let to_read: Vec<FlowKey> = changes
            .iter()
            .filter(|(_, c)| *c == Change::Read)
            .map(|(key, _)| *key)
            .collect();
        let mut read = Vec::with_capacity(to_read.len());
        if !to_read.is_empty() {
            // At most a frame's keys, on this worker (as a frame is applied: see `handle`).
            lock_on_worker(&self.inner.dp).read(&to_read, &mut read)?;
        }
        if read.len() != to_read.len() {
            return Err(DatapathError::ShortRead {
                asked: to_read.len(),
                got: read.len(),
            });
        }
        let mut read = read.into_iter();
        let now = monotonic_ns();
        Ok(changes
            .iter()
            .filter_map(|(key, change)| {
                let session = match change {
                    Change::Snapshot(s) => Some(*s),
                    Change::Read => read.next().flatten(),
                };
                match session {
                    Some(s) if s.owner == local => Some(Record::upsert(*key, &s, now)),
                    Some(_) => None,
                    None => Some(Record::delete(*key, local, 0)),
                }
            })
            .collect())
    }

    /// Which owners' sessions a full sync to `peer` carries: this member's own and those of
    /// members no longer alive (someone must hand them on); live third members send their
    /// own. The peer's own sessions go back to it only if its table started empty; otherwise
    /// it knows them better than our replicas do.
    fn bulk_carries(&self, peer: &Peer) -> impl Fn(MemberId) -> bool {
        let local = self.inner.cfg.local;
        let alive: HashSet<MemberId> = lock(&self.inner.membership)
            .peers
            .values()
            .filter(|p| p.alive)
            .map(|p| p.id)
            .collect();
        let peer_id = peer.cfg.id;
        let peer_fresh = peer.lock().hello.as_ref().is_some_and(|h| h.fresh_table);
        move |owner| {
            if owner == peer_id {
                peer_fresh
            } else {
                owner == local || !alive.contains(&owner)
            }
        }
    }

    /// Does connection `conn` to `peer` need a hello again before a full sync: its first one
    /// said our table was fresh, and the fresh-table window has ended since? Without it the
    /// peer would go on taking our full syncs for a fresh table's and reconcile none (and a
    /// removal lost from an overflowing line, which is what starts such a full sync, would
    /// never be made up for). Marks the connection as told.
    fn renew_fresh_hello(&self, peer: &Peer, (link, generation): (LinkKind, u64)) -> bool {
        if self.fresh_table() {
            return false;
        }
        let mut g = peer.lock();
        match g.links.get_mut(&link) {
            Some(c) if c.generation == generation && c.sent_fresh => {
                c.sent_fresh = false;
                true
            }
            _ => false,
        }
    }

    /// Sends the whole session table to `peer`, a chunk at a time.
    pub(super) async fn send_bulk(
        &self,
        peer: &Arc<Peer>,
        conn: (LinkKind, u64),
        writer: &Writer,
    ) -> Result<(), SendError> {
        let link = conn.0;
        let started = Instant::now();
        let bulk_id =
            u32::try_from(self.inner.generation.fetch_add(1, Relaxed) & 0xffff_ffff).unwrap_or(0);
        lock(&peer.stats.bulk_sent).running = true;
        self.log_limited(format!("bulk-tx-start-{}", peer.cfg.id.0), |skipped| {
            info!(
                peer = peer.cfg.id.0,
                link = link.name(),
                bulk_id,
                skipped,
                "full sync to peer started"
            )
        });
        if self.renew_fresh_hello(peer, conn) {
            let hello = self.hello(link, peer.cfg.id);
            writer.send(Message::Hello(hello)).await?;
        }
        writer.send(Message::BulkStart { bulk_id }).await?;
        let carries = self.bulk_carries(peer);
        let mut cursor = T::Cursor::default();
        let (mut keys, mut values): (Vec<FlowKey>, Vec<Session>) = (Vec::new(), Vec::new());
        let mut total = 0u64;
        loop {
            let more = tokio::task::block_in_place(|| {
                lock(&self.inner.dp).chunk(&mut cursor, &mut keys, &mut values, BULK_CHUNK)
            })?;
            let now = monotonic_ns();
            let carried: Vec<Record> = keys
                .iter()
                .zip(&values)
                .filter(|(_, s)| carries(s.owner))
                .map(|(k, s)| Record::upsert(*k, s, now))
                .collect();
            for frame in carried.chunks(MAX_RECORDS_PER_FRAME) {
                total += frame.len() as u64;
                self.send_bulk_frame(peer, conn, writer, frame.to_vec(), None)
                    .await?;
            }
            if !more {
                break;
            }
        }
        writer
            .send(Message::BulkEnd {
                bulk_id,
                records: total,
            })
            .await?;
        // The end has no sequence number of its own: an empty frame after it, part of the
        // full sync in the window, is acknowledged only once the end was read (one connection
        // keeps order). If the link fails before, the full sync starts over, as it does for a
        // frame lost: a peer that never read the end has not reconciled it, nor left its
        // initial state for it.
        let end = BulkSent {
            link,
            bulk_id,
            records: total,
            started,
        };
        self.send_bulk_frame(peer, conn, writer, Vec::new(), Some(end))
            .await
    }

    /// Sends a frame of a full sync on connection `conn`: its records, or, with `end`, the
    /// empty frame after its end (not marked as the full sync's: the peer applies it after the
    /// full sync ended), whose ack confirms the end; an error if that connection failed (the
    /// full sync then starts over).
    async fn send_bulk_frame(
        &self,
        peer: &Peer,
        conn: (LinkKind, u64),
        writer: &Writer,
        records: Vec<Record>,
        end: Option<BulkSent>,
    ) -> Result<(), SendError> {
        let bulk = end.is_none();
        let seq = {
            let mut g = peer.lock();
            if !carries(&g, conn) {
                return Err(ChannelError::Closed.into());
            }
            let seq = g.window.next_seq();
            // Bulk frames are not resent key by key: a broken full sync starts over.
            g.window.sent_bulk(seq, Instant::now());
            // Under the lock that put the frame in the window: its ack, or its link's failure,
            // may come before the write returns.
            if let Some(end) = end {
                g.bulk_unconfirmed = Some((seq, end));
            }
            seq
        };
        writer
            .send(Message::Sessions { seq, bulk, records })
            .await?;
        Ok(())
    }

    /// A full sync's end was confirmed (the peer read it): it counts as sent.
    pub(super) fn bulk_confirmed(&self, peer: &Peer, sent: BulkSent) {
        let BulkSent {
            link,
            bulk_id,
            records,
            started,
        } = sent;
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        {
            let mut b = lock(&peer.stats.bulk_sent);
            b.running = false;
            b.count += 1;
            b.last_records = records;
            b.last_duration_ms = ms;
        }
        self.log_limited(format!("bulk-tx-end-{}", peer.cfg.id.0), |skipped| {
            info!(
                peer = peer.cfg.id.0,
                link = link.name(),
                bulk_id,
                records,
                ms,
                skipped,
                "full sync to peer ended (its end acknowledged)"
            )
        });
    }

    /// This member's state changed: every peer gets a keepalive now, not at its next tick.
    pub fn announce_state(&self) {
        for peer in self.inner.peers.values() {
            peer.state_changed.notify_one();
        }
    }

    /// This member's keepalive as of now, numbered after the last one taken.
    pub(super) fn keepalive(&self) -> Keepalive {
        let m = lock(&self.inner.membership);
        Keepalive {
            state: m.state as u8,
            sessions_owned: m.local_sessions_owned,
            flaps: m.flaps,
            seq: self.inner.keepalive_seq.fetch_add(1, Relaxed) + 1,
        }
    }

    /// Closes `peer`'s data link, as a stall, when its oldest frame in flight has waited for
    /// its acknowledgement longer than the keepalive threshold at `now`.
    pub(super) fn check_acks(&self, peer: &Peer, now: Instant) {
        let threshold = self.inner.cfg.keepalive_threshold;
        let late = {
            let g = peer.lock();
            let waited = g
                .window
                .waiting_since()
                .map(|t| now.saturating_duration_since(t));
            match (g.data_link, waited) {
                (Some(link), Some(waited)) if waited > threshold => {
                    g.links.get(&link).map(|c| (link, c.generation))
                }
                _ => None,
            }
        };
        if let Some((link, generation)) = late {
            self.detach(peer, link, Some(generation), ACKS_MISSED);
        }
    }

    /// Sends keepalives on every link to `peer`, every interval and at once when this
    /// member's state changed ([`Engine::announce_state`]), and drops links that went silent.
    pub(super) async fn keepalive_loop(self, peer: Arc<Peer>) {
        let mut tick = tokio::time::interval(self.inner.cfg.keepalive_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = peer.state_changed.notified() => {}
            }
            self.settle_fresh_table();
            let ka = self.keepalive();
            let now = Instant::now();
            self.catch_up_link_lines(&peer, now);
            let links: Vec<(LinkKind, u64, Writer, Instant)> = peer
                .lock()
                .links
                .iter()
                .map(|(l, c)| (*l, c.generation, c.writer.clone(), c.last_rx))
                .collect();
            for (link, generation, writer, last_rx) in links {
                if now.duration_since(last_rx) > self.inner.cfg.keepalive_threshold {
                    self.detach(&peer, link, Some(generation), "keepalives missed");
                } else {
                    // Never waits: the writer sends it ahead of queued data.
                    writer.keepalive(ka);
                }
            }
            self.check_acks(&peer, now);
        }
    }
}
