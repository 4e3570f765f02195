//! Keys this member removed from its session table whose earlier events may still be in the
//! ring buffer: the runtime queues such events to be read at send time, not as snapshots.

use std::collections::HashSet;

use hasync_common::{FlowKey, Session};

use super::backlog::{Change, Hasher};

/// Keys this member removed from its table (the sweep, an eviction) whose earlier events may
/// still wait in the ring buffer: the session such an event shows is gone, so events of these
/// keys are queued as [`Change::Read`]. A key is remembered until two drains that emptied the
/// ring have passed (the program commits an event in the run that wrote it, so by then every
/// event from before the removal was drained). Past [`MAX_REMOVALS`] keys in a generation,
/// every event is read until that generation is forgotten.
#[derive(Debug, Default)]
pub struct RecentRemovals {
    newer: Removals,
    older: Removals,
}

/// How many removed keys one generation of [`RecentRemovals`] holds.
pub const MAX_REMOVALS: usize = 65_536;

#[derive(Debug, Default)]
struct Removals {
    keys: HashSet<FlowKey, Hasher>,
    overflowed: bool,
}

impl Removals {
    fn covers(&self, key: &FlowKey) -> bool {
        self.overflowed || self.keys.contains(key)
    }
}

impl RecentRemovals {
    /// `key` was removed from the table.
    pub fn removed(&mut self, key: FlowKey) {
        if self.newer.keys.len() < MAX_REMOVALS {
            self.newer.keys.insert(key);
        } else {
            self.newer.overflowed = true;
        }
    }

    /// The change that an event's snapshot `session` of `key` stands for.
    pub fn change(&self, key: &FlowKey, session: &Session) -> Change {
        if self.newer.covers(key) || self.older.covers(key) {
            Change::Read
        } else {
            Change::Snapshot(*session)
        }
    }

    /// A drain of the ring buffer emptied it.
    pub fn drained(&mut self) {
        self.older = std::mem::take(&mut self.newer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::testing::udp_key as key;

    #[test]
    fn events_of_a_removed_key_are_read_until_two_drains_emptied_the_ring() {
        let mut r = RecentRemovals::default();
        let s = Session::default();
        r.removed(key(1));
        assert_eq!(r.change(&key(1), &s), Change::Read);
        assert_eq!(r.change(&key(2), &s), Change::Snapshot(s));
        r.drained();
        assert_eq!(
            r.change(&key(1), &s),
            Change::Read,
            "one drain is not enough"
        );
        r.drained();
        assert_eq!(r.change(&key(1), &s), Change::Snapshot(s));
        // Too many removals at once: every event is read until they are forgotten.
        for i in 0..=u32::try_from(MAX_REMOVALS).expect("fits") {
            r.removed(key(i + 10));
        }
        assert_eq!(r.change(&key(2), &s), Change::Read);
        r.drained();
        r.drained();
        assert_eq!(r.change(&key(2), &s), Change::Snapshot(s));
    }
}
