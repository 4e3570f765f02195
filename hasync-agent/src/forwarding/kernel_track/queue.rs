//! [`KernelEntries`] kept from a thread of its own: the main loop only queues the updates.
//! The kernel handles a ctnetlink update inside `sendmsg`, under a lock every namespace
//! shares, which `conntrack -F` (or `-D` with a filter) holds for its whole walk of the
//! kernel's table: the main loop waited as long, draining no events meanwhile (its ring
//! filled, and the walk that makes up for lost events followed).

use std::sync::mpsc::{self, SyncSender, TrySendError};

use hasync_common::{FlowKey, Session};

use super::{established_tcp, forwarded_tcp, KernelEntries};

/// Batches the thread may have waiting; more are held here.
const WAITING: usize = 16;
/// Updates held here at most while the thread is behind (past it, marks go first, then the
/// oldest): what waits for the kernel is [`WAITING`] batches of about as many at most (136
/// bytes an update: some 20 MB).
const HELD_MAX: usize = 8_192;

/// One update of the kernel's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    /// [`KernelEntries::established`].
    Established(FlowKey, Session),
    /// [`KernelEntries::closed`].
    Closed(FlowKey, Session),
}

/// The updates of one main-loop turn, sent at [`KernelEntriesQueue::flush`] to the thread
/// that applies them.
pub struct KernelEntriesQueue {
    batch: Vec<Update>,
    to_thread: Option<SyncSender<Vec<Update>>>,
    dropped: bool,
}

impl KernelEntriesQueue {
    /// Updates the kernel's entries (from a thread of its own) when `forwarding` is XDP;
    /// nothing otherwise.
    pub fn new(xdp: bool) -> KernelEntriesQueue {
        if !xdp {
            return KernelEntriesQueue::off();
        }
        KernelEntriesQueue::with_sink(|| {
            let mut entries = KernelEntries::new(true);
            move |batch: Vec<Update>| {
                for update in &batch {
                    match update {
                        Update::Established(k, s) => entries.established(k, s),
                        Update::Closed(k, s) => entries.closed(k, s),
                    }
                }
                entries.flush();
            }
        })
    }

    fn off() -> KernelEntriesQueue {
        KernelEntriesQueue {
            batch: Vec::new(),
            to_thread: None,
            dropped: false,
        }
    }

    /// Hands every batch to the sink `make` makes, on a thread of its own.
    pub fn with_sink<S: FnMut(Vec<Update>)>(
        make: impl FnOnce() -> S + Send + 'static,
    ) -> KernelEntriesQueue {
        let (to_thread, batches) = mpsc::sync_channel::<Vec<Update>>(WAITING);
        let started = std::thread::Builder::new()
            .name("kernel-entries".into())
            .spawn(move || {
                let mut sink = make();
                for batch in batches {
                    sink(batch);
                }
            });
        match started {
            Ok(_) => KernelEntriesQueue {
                to_thread: Some(to_thread),
                ..KernelEntriesQueue::off()
            },
            Err(e) => {
                tracing::warn!(error = %e, "the kernel's entries of TCP connections forwarded in XDP cannot be updated: starting their thread failed");
                KernelEntriesQueue::off()
            }
        }
    }

    /// See [`KernelEntries::established`].
    pub fn established(&mut self, key: &FlowKey, s: &Session) {
        if self.to_thread.is_some() && established_tcp(key, s) {
            self.batch.push(Update::Established(*key, *s));
        }
    }

    /// See [`KernelEntries::closed`].
    pub fn closed(&mut self, key: &FlowKey, s: &Session) {
        if self.to_thread.is_some() && forwarded_tcp(key, s) {
            self.batch.push(Update::Closed(*key, *s));
        }
    }

    /// Sends the updates queued to the thread, never waiting: while it has [`WAITING`] batches
    /// not done (the kernel slow to take them), they are held here for the next flush, up to
    /// [`HELD_MAX`] (past it marks are dropped first, then the oldest; said once an episode).
    /// True when this flush sent the first batch after some were dropped: the caller marks the
    /// established connections again (`runtime`'s walk).
    pub fn flush(&mut self) -> bool {
        let Some(to_thread) = &self.to_thread else {
            return false;
        };
        if self.batch.is_empty() {
            return false;
        }
        match to_thread.try_send(std::mem::take(&mut self.batch)) {
            Ok(()) => std::mem::replace(&mut self.dropped, false),
            Err(TrySendError::Full(held)) => {
                self.hold(held);
                false
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::warn!("the thread that updates the kernel's entries of connections forwarded in XDP ended: they are left as the kernel keeps them");
                self.to_thread = None;
                false
            }
        }
    }

    /// Keeps `held`, which the thread could not take, for the next flush: at most
    /// [`HELD_MAX`], marks dropped first (the walk after the catch-up makes them again; a
    /// close's update, once dropped, is not made again: its entry would stay established for
    /// the kernel's own timeout, 5 days by default), then the oldest.
    fn hold(&mut self, held: Vec<Update>) {
        self.batch = held;
        let mut over = self.batch.len().saturating_sub(HELD_MAX);
        if over == 0 {
            return;
        }
        self.batch.retain(|u| {
            let drop = over > 0 && matches!(u, Update::Established(..));
            over -= usize::from(drop);
            !drop
        });
        self.batch.drain(..over);
        if !std::mem::replace(&mut self.dropped, true) {
            tracing::warn!("the kernel's connection tracking is slow to take updates: some of its entries of connections forwarded in XDP are left as they are until it catches up (the established ones are marked again then)");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hasync_common::{SessionFlags, State};

    use super::*;
    use crate::control::testing::Flow;

    /// A flush returns while the thread that talks to the kernel is held (seen failing with
    /// the sink called in `flush`: the flush waited); the updates arrive in order, only those
    /// the kernel's entries need.
    #[test]
    fn updates_are_sent_from_a_thread_of_their_own() {
        let (release, released) = mpsc::channel::<()>();
        let (got, arrived) = mpsc::channel::<Vec<Update>>();
        let mut queue = KernelEntriesQueue::with_sink(move || {
            move |batch: Vec<Update>| {
                let _ = released.recv();
                let _ = got.send(batch);
            }
        });
        let (tcp, mut forwarded) = (
            Flow::tcp("198.18.0.10", 40_000, "198.18.1.10", 443)
                .state(State::Established)
                .entry(),
            Flow::tcp("198.18.0.10", 40_001, "198.18.1.10", 443)
                .state(State::Closed)
                .entry(),
        );
        forwarded.1.flags = SessionFlags(SessionFlags::FORWARDED_XDP);
        let udp = Flow::udp("198.18.0.10", 40_002, "198.18.1.10", 53).entry();
        let (done, flushed) = mpsc::channel();
        std::thread::spawn(move || {
            queue.established(&tcp.0, &tcp.1);
            queue.established(&udp.0, &udp.1);
            queue.closed(&tcp.0, &tcp.1);
            queue.flush();
            queue.closed(&forwarded.0, &forwarded.1);
            queue.flush();
            let _ = done.send(queue);
        });
        let queue = flushed
            .recv_timeout(Duration::from_secs(5))
            .expect("the flushes returned while the thread was held");
        for _ in 0..2 {
            release.send(()).expect("release");
        }
        let wait = || {
            arrived
                .recv_timeout(Duration::from_secs(5))
                .expect("a batch")
        };
        assert_eq!(wait(), [Update::Established(tcp.0, tcp.1)]);
        assert_eq!(wait(), [Update::Closed(forwarded.0, forwarded.1)]);
        drop(queue);
    }

    /// While the thread is behind (the kernel's lock held by `conntrack -F`), updates wait
    /// here, not dropped (the first form dropped a batch once 16 waited: seen failing); past
    /// [`HELD_MAX`] marks go first, closes are kept, and the flush that catches up says so,
    /// for the caller to mark the established connections again.
    #[test]
    fn updates_wait_while_the_thread_is_behind() {
        let (release, released) = mpsc::channel::<()>();
        let (got, arrived) = mpsc::channel::<usize>();
        let mut queue = KernelEntriesQueue::with_sink(move || {
            move |batch: Vec<Update>| {
                let _ = released.recv();
                let _ = got.send(batch.len());
            }
        });
        let tcp = Flow::tcp("198.18.0.10", 40_000, "198.18.1.10", 443)
            .state(State::Established)
            .entry();
        let flush_one = |queue: &mut KernelEntriesQueue| {
            queue.established(&tcp.0, &tcp.1);
            queue.flush()
        };
        // One taken by the thread (held), 16 waiting, then 4 more held here.
        let caught_up: Vec<bool> = (0..21).map(|_| flush_one(&mut queue)).collect();
        assert!(caught_up.iter().all(|c| !c));
        for _ in 0..21 {
            release.send(()).expect("release");
        }
        let mut total = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while total < 21 && std::time::Instant::now() < deadline {
            queue.flush();
            total += arrived
                .recv_timeout(Duration::from_millis(100))
                .unwrap_or(0);
        }
        assert_eq!(total, 21, "updates lost");
        // Past HELD_MAX, the oldest go; the flush that catches up says so.
        let (release, released) = mpsc::channel::<()>();
        let (took, taken) = mpsc::channel::<()>();
        let mut queue = KernelEntriesQueue::with_sink(move || {
            move |_batch: Vec<Update>| {
                let _ = took.send(());
                let _ = released.recv();
            }
        });
        assert!(!flush_one(&mut queue));
        taken
            .recv_timeout(Duration::from_secs(5))
            .expect("the thread took the first batch");
        for _ in 0..WAITING {
            assert!(!flush_one(&mut queue));
        }
        let mut closed = Flow::tcp("198.18.0.10", 40_001, "198.18.1.10", 443)
            .state(State::Closed)
            .entry();
        closed.1.flags = SessionFlags(SessionFlags::FORWARDED_XDP);
        queue.closed(&closed.0, &closed.1);
        for _ in 0..HELD_MAX + 10 {
            queue.established(&tcp.0, &tcp.1);
        }
        assert!(!queue.flush());
        assert_eq!(queue.batch.len(), HELD_MAX);
        assert_eq!(
            queue.batch.first(),
            Some(&Update::Closed(closed.0, closed.1)),
            "the oldest, a close, kept"
        );
        for _ in 0..=WAITING {
            release.send(()).expect("release");
        }
        let caught_up = (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            queue.flush()
        });
        drop(release);
        assert!(caught_up, "the catch-up after a drop is said");
    }
}
