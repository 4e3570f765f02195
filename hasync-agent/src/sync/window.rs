//! The frames sent to one peer and not yet acknowledged: at most `max` of them, released by
//! the peer's cumulative acknowledgements, and handed back to the backlog when their link
//! fails.

use std::{collections::VecDeque, time::Instant};

use hasync_common::FlowKey;

use super::backlog::Change;

/// A frame sent and not yet acknowledged.
#[derive(Debug)]
struct InFlight {
    seq: u64,
    keys: Vec<FlowKey>,
    /// When the oldest change in the frame was queued (for the replication lag).
    oldest: Instant,
    /// A full sync's frame: not resent key by key (a broken full sync starts over).
    bulk: bool,
    /// When it was handed to the link.
    sent_at: Instant,
}

#[derive(Debug)]
pub struct Window {
    in_flight: VecDeque<InFlight>,
    max: usize,
    next_seq: u64,
}

impl Window {
    /// A window of at most `max` unacknowledged frames.
    pub fn new(max: usize) -> Self {
        Window {
            in_flight: VecDeque::new(),
            max,
            next_seq: 1,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// May another frame be sent before acknowledgements arrive?
    pub fn can_send(&self) -> bool {
        self.in_flight.len() < self.max
    }

    /// The sequence number the next frame will get: every one below it was sent.
    pub fn next_unsent(&self) -> u64 {
        self.next_seq
    }

    /// Allocates the sequence number of the next frame.
    pub fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Records that frame `seq` carrying `changes` was sent.
    pub fn sent(&mut self, seq: u64, changes: &[(FlowKey, Change)], oldest: Instant) {
        self.in_flight.push_back(InFlight {
            seq,
            keys: changes.iter().map(|(key, _)| *key).collect(),
            oldest,
            bulk: false,
            sent_at: Instant::now(),
        });
    }

    /// Records that frame `seq` of a full sync was sent.
    pub fn sent_bulk(&mut self, seq: u64, now: Instant) {
        self.in_flight.push_back(InFlight {
            seq,
            keys: Vec::new(),
            oldest: now,
            bulk: true,
            sent_at: now,
        });
    }

    /// Since when the oldest frame in flight has waited for its acknowledgement.
    pub fn waiting_since(&self) -> Option<Instant> {
        self.in_flight.front().map(|f| f.sent_at)
    }

    /// Is a frame of a full sync still unacknowledged?
    pub fn bulk_in_flight(&self) -> bool {
        self.in_flight.iter().any(|f| f.bulk)
    }

    /// A cumulative acknowledgement: every frame up to `seq` arrived. Returns, for each frame
    /// of changes released (not a full sync's), when its oldest change was queued (to measure
    /// the replication lag).
    pub fn ack(&mut self, seq: u64) -> Vec<Instant> {
        let mut released = Vec::new();
        while self.in_flight.front().is_some_and(|f| f.seq <= seq) {
            if let Some(f) = self.in_flight.pop_front().filter(|f| !f.bulk) {
                released.push(f.oldest);
            }
        }
        released
    }

    /// The link carrying the frames in flight failed: empties the window. Returns their keys in
    /// the order they were sent, each with when its frame's oldest change was queued (to queue
    /// them again: [`super::backlog::Backlog::requeue`]), and whether frames of a full sync
    /// were among them (then it must start over: they cannot be resent key by key).
    pub fn unacked(&mut self) -> (Vec<(FlowKey, Instant)>, bool) {
        let bulk_lost = self.bulk_in_flight();
        let keys = self
            .in_flight
            .drain(..)
            .flat_map(|f| f.keys.into_iter().map(move |key| (key, f.oldest)))
            .collect();
        (keys, bulk_lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The replication lag is measured on the frames of changes only: a full sync's frames
    /// (thousands for a large table) pushed the real samples out of the lag's memory and
    /// showed milliseconds while the changes held back behind the full sync waited seconds
    /// (seen failing: both frames gave a sample).
    #[test]
    fn a_full_syncs_frames_give_no_lag_samples() {
        let mut w = Window::new(4);
        let now = Instant::now();
        let bulk = w.next_seq();
        w.sent_bulk(bulk, now);
        let change = w.next_seq();
        w.sent(change, &[(FlowKey::default(), Change::Read)], now);
        assert_eq!(w.ack(change), [now]);
        assert_eq!(w.in_flight(), 0);
    }
}
