//! Room for peers' replicas: one peer's assured sessions may take at most
//! `[local] replica_limit` entries of this member's table (three quarters of it by default), so
//! that what a peer sends (a lying peer's made-up sessions, or a peer with a larger table)
//! never takes the room this member's own flows and the other peers' need. Replicas are never
//! evicted, and without a bound the table filled and every new flow here was refused.
//!
//! The apply program keeps the count and refuses past the limit
//! (`hasync_common::ReplicaRoom`, counter `replicas-over-limit`); the agent renews each
//! member's limit after every pass of its sweep from what the pass counted
//! ([`Datapath::renew_replica_room`]). A restarted agent that kept its table starts each limit
//! whole: until its first pass ends (about 12 s for a million sessions) a peer may add up to the
//! limit again.

use aya::maps::Array;
use hasync_common::{maps as names, member::MEMBER_SLOTS, ReplicaRoom};

use super::{map_err, sweep::OWNER_SLOTS, Datapath, DatapathError};

/// The apply program's count of copies made, per member id.
pub type Added = [u64; OWNER_SLOTS];

/// The default limit: three quarters of a table of `capacity` entries.
pub fn default_limit(capacity: u32) -> u32 {
    capacity / 4 * 3
}

impl Datapath {
    fn replica_room(
        &mut self,
    ) -> Result<Array<&mut aya::maps::MapData, ReplicaRoom>, DatapathError> {
        Array::try_from(self.map_mut(names::REPLICA_ROOM)?).map_err(map_err(names::REPLICA_ROOM))
    }

    /// Gives every member its whole limit (at load: nothing counted yet).
    pub(super) fn open_replica_room(&mut self) -> Result<(), DatapathError> {
        let limit = self.replica_limit;
        let mut map = self.replica_room()?;
        for id in 0..MEMBER_SLOTS {
            let room = ReplicaRoom { added: 0, limit };
            map.set(id, room, 0).map_err(map_err(names::REPLICA_ROOM))?;
        }
        Ok(())
    }

    /// The apply program's count of copies made, per member id.
    pub fn replicas_added(&mut self) -> Result<Added, DatapathError> {
        let map = self.replica_room()?;
        let mut added = [0; OWNER_SLOTS];
        for (id, n) in (0..).zip(added.iter_mut()) {
            *n = map.get(&id, 0).map_err(map_err(names::REPLICA_ROOM))?.added;
        }
        Ok(added)
    }

    /// After a pass of the sweep that started when the counts were `added_at_start` and found
    /// `assured` copies of each member's sessions: each member may add its limit less those
    /// (see `hasync_common::ReplicaRoom`). Under the hold the apply program runs with.
    pub fn renew_replica_room(
        &mut self,
        added_at_start: &Added,
        assured: &Added,
    ) -> Result<(), DatapathError> {
        let limit = self.replica_limit;
        let mut map = self.replica_room()?;
        for ((id, start), held) in (0..).zip(added_at_start).zip(assured) {
            let mut room = map.get(&id, 0).map_err(map_err(names::REPLICA_ROOM))?;
            room.limit = start.saturating_add(limit.saturating_sub(*held));
            map.set(id, room, 0).map_err(map_err(names::REPLICA_ROOM))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use hasync_common::{ApplyOp, ApplyRecord, ApplySource, Counter, MemberId, Session, State};

    use super::*;
    use crate::datapath::{
        monotonic_ns,
        sweep_table::SweepBeside,
        testing::{datapath, test_run, udp_frame, udp_key},
    };

    const XDP_PASS: u32 = 2;

    fn established(owner: u8, version: u32, now: u64) -> Session {
        Session {
            version,
            owner: MemberId(owner),
            state: State::Established as u8,
            created_ns: now,
            last_seen_ns: now,
            ..Session::default()
        }
    }

    fn copies(owner: u8, version: u32, keys: std::ops::Range<u32>) -> Vec<ApplyRecord> {
        let now = monotonic_ns();
        keys.map(|i| {
            let s = established(owner, version, now);
            ApplyRecord::new(udp_key(i), s, ApplyOp::Upsert, false)
        })
        .collect()
    }

    fn from(sender: u8) -> ApplySource {
        ApplySource {
            sender: MemberId(sender),
            reconciling: MemberId::NONE,
        }
    }

    /// (installed, refused for want of room) of applying `records` from `sender`.
    fn apply(dp: &mut Datapath, records: &[ApplyRecord], sender: u8) -> (u32, u32) {
        let out = dp
            .apply_records(records, from(sender), monotonic_ns())
            .expect("apply");
        (out.installed, u32::from(out.full))
    }

    /// One peer's established sessions cannot take the whole table: past its limit (three
    /// quarters of the table by default) its new ones are refused, so this member's own new
    /// flows still find room. Before, a peer's made-up sessions filled the table and every new
    /// flow here was dropped (`drop-table-full`). Copies it holds still take its updates, and
    /// another member's copies have a limit of their own.
    #[test]
    fn a_peers_replicas_leave_room_for_this_members_own_flows() {
        let mut dp = datapath();
        let capacity = dp.capacity();
        let limit = default_limit(capacity);
        let flood = copies(2, 1, 0..capacity);
        assert_eq!(apply(&mut dp, &flood, 2), (limit, capacity - limit));
        let counters = dp.counters().expect("counters");
        assert_eq!(
            counters.get(Counter::ReplicasOverLimit),
            u64::from(capacity - limit)
        );

        let frame = udp_frame([198, 18, 0, 1], 40000, [198, 18, 0, 2], 53);
        assert_eq!(test_run(&dp, &frame), XDP_PASS);
        let counters = dp.counters().expect("counters");
        assert_eq!(
            counters.get(Counter::Creates),
            1,
            "a flow of this member's own"
        );
        assert_eq!(counters.get(Counter::DropTableFull), 0);

        assert_eq!(apply(&mut dp, &copies(2, 2, 0..10), 2), (10, 0), "updates");
        let third = copies(3, 1, capacity..capacity + 10);
        assert_eq!(
            apply(&mut dp, &third, 3),
            (10, 0),
            "another member's copies"
        );
    }

    /// A pass of the sweep gives back the room of copies that left the table.
    #[test]
    fn each_sweep_pass_renews_a_peers_room() {
        let mut dp = datapath();
        let limit = default_limit(dp.capacity());
        assert_eq!(apply(&mut dp, &copies(2, 1, 0..limit), 2), (limit, 0));
        let gone: Vec<_> = (0..1000)
            .map(|i| ApplyRecord::removal(udp_key(i), MemberId(2), 1))
            .collect();
        let out = dp
            .apply_records(&gone, from(2), monotonic_ns())
            .expect("apply");
        assert_eq!(out.deleted, 1000);
        let more = copies(2, 1, limit..limit + 1001);
        assert_eq!(apply(&mut dp, &more, 2), (0, 1001), "no pass yet");

        let dp = Mutex::new(dp);
        let pass = SweepBeside::default().step(&dp, 1 << 20, |_| {});
        assert!(pass.expect("step").is_some(), "a whole pass");
        let mut dp = dp.into_inner().expect("lock");
        assert_eq!(apply(&mut dp, &more, 2), (1000, 1));
    }

    /// Copies made while a pass walked count against the room it renews, whether the walk saw
    /// them or not.
    #[test]
    fn copies_made_during_a_pass_count_against_its_renewal() {
        let mut dp = datapath();
        let limit = default_limit(dp.capacity());
        // A pass that started before these 10 were made and did not see them.
        let at_start = dp.replicas_added().expect("read");
        let during = copies(3, 1, 10_000..10_010);
        assert_eq!(apply(&mut dp, &during, 3), (10, 0));
        dp.renew_replica_room(&at_start, &[0; OWNER_SLOTS])
            .expect("renew");
        let after = copies(3, 1, 20_000..20_000 + limit);
        assert_eq!(apply(&mut dp, &after, 3), (limit - 10, 10));
    }

    /// `[local] replica_limit` sets the limit, at most the table.
    #[test]
    fn the_limit_is_the_configured_one_and_at_most_the_table() {
        for (asked, got) in [(Some(100), 100), (Some(1 << 30), 4096), (None, 3072)] {
            let mut opts = crate::datapath::DatapathOptions::new(MemberId(1));
            opts.session_capacity = 4096;
            opts.replica_limit = asked;
            let mut dp = Datapath::load(&opts).expect("load (tests need root)");
            let (installed, _) = apply(&mut dp, &copies(2, 1, 0..4096), 2);
            assert_eq!(installed, got, "{asked:?}");
        }
    }
}
