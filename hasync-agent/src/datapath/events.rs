//! The EVENTS ring buffer: what the XDP program reports about sessions.
//!
//! The program wakes the consumer only once about [`hasync_common::maps::EVENTS_WAKEUP_BATCH_BYTES`]
//! are queued, so [`EventStream::next_batch`] waits for readiness *or* a short timer.

use std::{os::fd::OwnedFd, time::Duration};

use aya::maps::{MapData, RingBuf};
use hasync_common::{Event, EventKind, FlowKey, Session};
use tokio::io::unix::AsyncFd;

use super::sweep::Removed;

/// How often [`EventStream::next_batch`] looks at the ring without a wake-up.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Most events [`EventStream::next_batch`] returns at once, so memory stays bounded.
pub const MAX_BATCH: usize = 4096;

/// Counts of what the stream has read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventStats {
    /// Well-formed events returned.
    pub received: u64,
    /// Records dropped: wrong size or unknown kind (a program/agent mismatch).
    pub malformed: u64,
}

/// Decodes one ring-buffer record, or `None` when it is not a well-formed [`Event`].
pub fn decode(record: &[u8]) -> Option<Event> {
    if record.len() != size_of::<Event>() {
        return None;
    }
    let event: Event = super::pod::read_at(record, 0)?;
    EventKind::from_u8(event.kind)?;
    Some(event)
}

/// Reader of the EVENTS ring buffer, taken out of the datapath with
/// [`super::Datapath::take_events`].
pub struct EventStream {
    ring: RingBuf<MapData>,
    /// The ring's fd (a duplicate), registered with the tokio reactor on first async use.
    notify: Notify,
    stats: EventStats,
}

enum Notify {
    Unregistered,
    Registered(AsyncFd<OwnedFd>),
    /// Registration failed: poll on the timer alone.
    TimerOnly,
}

impl EventStream {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Self {
        EventStream {
            ring,
            notify: Notify::Unregistered,
            stats: EventStats::default(),
        }
    }

    pub fn stats(&self) -> EventStats {
        self.stats
    }

    /// Appends every queued event to `out`; returns how many were appended.
    pub fn drain(&mut self, out: &mut Vec<Event>) -> usize {
        self.drain_up_to(out, usize::MAX)
    }

    /// Appends up to `max` queued events to `out`; returns how many were appended.
    pub fn drain_up_to(&mut self, out: &mut Vec<Event>, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let Some(record) = self.ring.next() else {
                break;
            };
            match decode(&record) {
                Some(event) => {
                    out.push(event);
                    n += 1;
                }
                None => self.stats.malformed += 1,
            }
        }
        self.stats.received += n as u64;
        n
    }

    /// The next non-empty batch of at most [`MAX_BATCH`] events. Waits for a wake-up from the
    /// kernel or [`POLL_INTERVAL`], whichever comes first, while the ring is empty.
    ///
    /// Cancel-safe: no event is taken from the ring before the last await point.
    pub async fn next_batch(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        loop {
            if self.drain_up_to(&mut out, MAX_BATCH) > 0 {
                return out;
            }
            self.wait().await;
        }
    }

    async fn wait(&mut self) {
        if let Notify::Unregistered = self.notify {
            self.notify = match self.register() {
                Ok(fd) => Notify::Registered(fd),
                Err(error) => {
                    tracing::warn!(%error, "cannot watch the events ring buffer; polling it every {POLL_INTERVAL:?}");
                    Notify::TimerOnly
                }
            };
        }
        let Notify::Registered(fd) = &self.notify else {
            tokio::time::sleep(POLL_INTERVAL).await;
            return;
        };
        // Clear readiness before the caller drains, so a wake-up that comes during the drain
        // is not lost.
        let readable = async { fd.readable().await.map(|mut guard| guard.clear_ready()) };
        let result = tokio::select! {
            r = readable => r,
            () = tokio::time::sleep(POLL_INTERVAL) => Ok(()),
        };
        if let Err(error) = result {
            tracing::warn!(%error, "watching the events ring buffer failed; polling it every {POLL_INTERVAL:?}");
            self.notify = Notify::TimerOnly;
        }
    }

    fn register(&self) -> std::io::Result<AsyncFd<OwnedFd>> {
        use std::os::fd::AsFd as _;
        let fd = self.ring.as_fd().try_clone_to_owned()?;
        // SAFETY: the `OwnedFd` is a valid descriptor that the `AsyncFd` owns: nothing closes
        // or replaces it while it is registered.
        Ok(unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?)
    }
}

/// What happened to a session, as the rest of the agent (sync, traffic log) sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// Reported by the XDP program through the ring buffer.
    Datapath {
        kind: EventKind,
        key: FlowKey,
        session: Session,
    },
    /// Removed from the table by the expiry sweep: the session's end.
    Removed(Removed),
}

impl SessionEvent {
    /// The agent-level view of a ring-buffer event; `None` for an unknown kind.
    pub fn from_event(event: &Event) -> Option<Self> {
        let Event {
            key,
            session,
            kind,
            _pad,
        } = *event;
        Some(SessionEvent::Datapath {
            kind: EventKind::from_u8(kind)?,
            key,
            session,
        })
    }

    pub fn key(&self) -> &FlowKey {
        match self {
            SessionEvent::Datapath { key, .. } => key,
            SessionEvent::Removed(removed) => &removed.key,
        }
    }

    /// The session after the change (for a removal, as it was last seen).
    pub fn session(&self) -> &Session {
        match self {
            SessionEvent::Datapath { session, .. } => session,
            SessionEvent::Removed(removed) => &removed.session,
        }
    }
}

#[cfg(test)]
mod tests {
    use hasync_common::{session::State, MemberId};

    use super::*;
    use crate::datapath::testing::{datapath, test_run, udp_frame};

    const XDP_PASS: u32 = 2;

    fn event(kind: u8) -> Event {
        Event {
            kind,
            ..Event::default()
        }
    }

    fn bytes(e: &Event) -> Vec<u8> {
        crate::datapath::pod::bytes_of(e).to_vec()
    }

    #[test]
    fn records_of_the_wrong_size_or_kind_are_rejected() {
        let good = event(EventKind::Closed as u8);
        assert_eq!(decode(&bytes(&good)), Some(good));
        let b = bytes(&good);
        assert_eq!(decode(&b[..b.len() - 1]), None);
        let mut long = b.clone();
        long.push(0);
        assert_eq!(decode(&long), None);
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&bytes(&event(0))), None);
        assert_eq!(decode(&bytes(&event(99))), None);
        assert_eq!(SessionEvent::from_event(&event(42)), None);
    }

    #[test]
    fn traffic_produces_created_then_state_changed_events() {
        let mut dp = datapath();
        let mut events = dp.take_events().expect("take events");
        assert!(
            dp.take_events().is_err(),
            "the ring buffer can be taken only once"
        );

        let out = udp_frame([198, 18, 0, 1], 40000, [198, 18, 0, 2], 53);
        assert_eq!(test_run(&dp, &out), XDP_PASS);
        let mut got = Vec::new();
        assert_eq!(events.drain(&mut got), 1);
        let created = SessionEvent::from_event(&got[0]).expect("known kind");
        let SessionEvent::Datapath { kind, key, session } = created else {
            panic!("{created:?}")
        };
        assert_eq!(kind, EventKind::Created);
        assert_eq!(session.state, State::UdpNew as u8);
        assert_eq!(session.owner, MemberId(1));
        assert_eq!(dp.session(&key).expect("lookup"), Some(session));

        // The reply advances the state: one more event.
        let back = udp_frame([198, 18, 0, 2], 53, [198, 18, 0, 1], 40000);
        assert_eq!(test_run(&dp, &back), XDP_PASS);
        got.clear();
        assert_eq!(events.drain(&mut got), 1);
        assert_eq!(got[0].kind, EventKind::StateChanged as u8);
        assert_eq!(got[0].session.state, State::UdpReplied as u8);
        assert_eq!(
            events.stats(),
            EventStats {
                received: 2,
                malformed: 0
            }
        );
    }

    #[tokio::test]
    async fn next_batch_sees_events_without_a_kernel_wake_up() {
        let mut dp = datapath();
        let mut events = dp.take_events().expect("take events");
        // Fewer than the wake-up batch: the program asks the kernel not to wake us.
        for port in 1..=5 {
            test_run(&dp, &udp_frame([198, 18, 0, 1], port, [198, 18, 0, 2], 53));
        }
        let batch = tokio::time::timeout(Duration::from_secs(2), events.next_batch())
            .await
            .expect("the timer finds the events");
        assert_eq!(batch.len(), 5);
        assert!(batch.iter().all(|e| e.kind == EventKind::Created as u8));
        // Nothing more queued: next_batch keeps waiting.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), events.next_batch())
                .await
                .is_err()
        );
    }
}
