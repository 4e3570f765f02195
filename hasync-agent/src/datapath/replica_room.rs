//! The peers' pool of the session table (`[local] replica_limit`, by default three quarters of
//! the table or the other members' share of a larger cluster, see [`default_limit`]; and
//! `hasync_common::ReplicaRoom`): the assured sessions peers' records wrote
//! here, whoever owns them, may take at most that many entries, so what peers send (a
//! lying peer's made-up sessions, a peer with a larger table) cannot take all the room this
//! member's own flows need. Assured sessions are never evicted: before the pool, one peer could
//! fill the table and every new flow here was refused.
//!
//! The apply program keeps the count as it writes and deletes copies; the sweep gives back
//! what it deletes ([`pooled`]); the agent counts the table again at load
//! ([`Datapath::recount_replicas`], holding it) and then every [`recount_every`] beside its
//! hold ([`recount_beside`]), for what the fast path changed meanwhile.

use std::{
    os::fd::{AsFd, BorrowedFd},
    sync::Mutex,
    time::Duration,
};

use hasync_common::{maps as names, FlowKey, ReplicaRoom, Session};

use super::{batch::BatchMap, batch_err, Datapath, DatapathError, SessionReader, DEFAULT_CHUNK};
use crate::lock::lock;

/// Sessions a count reads per batch lookup.
const COUNT_CHUNK: u32 = DEFAULT_CHUNK * 8;

/// How often the agent counts the pool again in a table of `capacity` entries: every 30 s,
/// and less often in large tables, so the walk (about 0.35 s per million entries of one CPU)
/// takes at most 1 % of one.
pub fn recount_every(capacity: u32) -> Duration {
    Duration::from_secs(30).max(Duration::from_micros(35) * capacity)
}

/// The default limit for a table of `capacity` entries in a cluster of `members` (this one
/// included): what the other members' sessions take when every member holds as many, (n−1)/n
/// of the table, and at least three quarters of it (an active/passive pair fails over to one
/// member holding most of them); at least one.
pub fn default_limit(capacity: u32, members: usize) -> u32 {
    let members = u32::try_from(members.max(4)).unwrap_or(u32::MAX);
    (capacity - capacity / members).max(1)
}

/// Of the `doomed` keys (some of `candidates`, in their order), how many had a copy in the
/// pool (`fresh`: the candidates' copies as read before the delete).
pub(super) fn pooled(candidates: &[FlowKey], fresh: &[Option<Session>], doomed: &[FlowKey]) -> u64 {
    let mut doomed = doomed.iter().peekable();
    let mut n = 0;
    for (key, s) in candidates.iter().zip(fresh) {
        if doomed.peek() == Some(&key) {
            doomed.next();
            n += u64::from(s.is_some_and(|s| s.in_replica_pool()));
        }
    }
    n
}

/// How many of `values` are in the pool.
fn count(values: &[Session]) -> u64 {
    values.iter().filter(|s| s.in_replica_pool()).count() as u64
}

/// Counts the pool of the datapath behind `dp` again, walking the table through a descriptor
/// of its own while records are applied (the lock is taken only to read and to write the
/// pool): the pool's count becomes what the walk found plus what the apply program added
/// meanwhile, which may count a copy added during the walk twice, never one not at all (what
/// the fast path changes during the walk waits for the next count). Copies removed during the
/// walk (the sweep's, a peer's deletes, a full sync's stale ones), which the walk may have
/// counted, make that too high by as many: when they are more than 1 % of it, the table is
/// walked again, up to [`WALKS`] times, and the last walk's count is held between itself less
/// them and itself, by the count kept.
/// Before, a mass removal left the pool counted full for up to a recount interval (minutes
/// on large tables), refusing peers' new copies. Returns the count set.
pub fn recount_beside(dp: &Mutex<Datapath>) -> Result<u64, DatapathError> {
    recount_beside_then(dp, |_| {})
}

/// Walks of one count at most ([`recount_beside`]).
const WALKS: u32 = 3;

/// Copies removed during a count's walk that never make it walk again (besides 1 % of it).
const MAX_REMOVED_WHILE_COUNTING: u64 = 64;

/// [`recount_beside`], with `after_walk` run between each walk and the pool's read after it
/// (the tests' removals "during" a walk).
fn recount_beside_then(
    dp: &Mutex<Datapath>,
    mut after_walk: impl FnMut(&Mutex<Datapath>),
) -> Result<u64, DatapathError> {
    let mut walk = 1;
    loop {
        let (reader, before): (SessionReader, ReplicaRoom) = {
            let dp = lock(dp);
            (dp.session_reader()?, dp.replica_pool()?)
        };
        let mut walked = 0;
        reader.chunked(COUNT_CHUNK, |_, values| walked += count(values))?;
        after_walk(dp);
        let dp = lock(dp);
        let now = dp.replica_pool()?;
        let added = now.added.wrapping_sub(before.added);
        // `held` moved by what was added and what was removed (by the apply program and the
        // agent's releases alike).
        let removed = before.held.saturating_add(added).saturating_sub(now.held);
        let many = removed > MAX_REMOVED_WHILE_COUNTING.max(walked / 100);
        if many && walk < WALKS {
            tracing::debug!(
                removed,
                walked,
                "copies removed while counting the pool: counting again"
            );
            walk += 1;
            continue;
        }
        // Too high by the removed copies the walk had counted, and with a subtraction too low
        // by those it had not reached yet: the kept count, exact for records and the sweep,
        // held within those bounds (a lying peer that deletes its copies before the walk
        // reaches them and adds them back after cannot have the pool read empty).
        let upper = walked.saturating_add(added);
        let lower = upper.saturating_sub(if many { removed } else { 0 });
        let held = now.held.clamp(lower, upper);
        dp.set_replica_pool(ReplicaRoom { held, ..now })?;
        return Ok(held);
    }
}

/// The pool in REPLICA_ROOM behind `fd`, as the apply program sees it.
pub(super) fn read(fd: BorrowedFd<'_>) -> Result<ReplicaRoom, DatapathError> {
    let map: BatchMap<'_, u32, ReplicaRoom> =
        BatchMap::new(fd).map_err(batch_err(names::REPLICA_ROOM))?;
    let room = map.lookup(&0).map_err(batch_err(names::REPLICA_ROOM))?;
    Ok(room.unwrap_or_default())
}

impl Datapath {
    fn replica_room_fd(&self) -> Result<BorrowedFd<'_>, DatapathError> {
        match self.map(names::REPLICA_ROOM)? {
            aya::maps::Map::Array(data) => Ok(data.fd().as_fd()),
            _ => Err(DatapathError::NoMap(names::REPLICA_ROOM)),
        }
    }

    /// The pool as the apply program sees it.
    pub fn replica_pool(&self) -> Result<ReplicaRoom, DatapathError> {
        read(self.replica_room_fd()?)
    }

    fn set_replica_pool(&self, room: ReplicaRoom) -> Result<(), DatapathError> {
        let map: BatchMap<'_, u32, ReplicaRoom> =
            BatchMap::new(self.replica_room_fd()?).map_err(batch_err(names::REPLICA_ROOM))?;
        map.update_batch(&[0], &[room], 0)
            .map_err(batch_err(names::REPLICA_ROOM))
    }

    /// Counts the pool's copies in the table, holding it (no record is applied meanwhile), and
    /// sets the pool to that count and the limit; returns the count. At load, and in tests; the
    /// running agent counts beside its hold ([`recount_beside`]).
    pub fn recount_replicas(&self) -> Result<u64, DatapathError> {
        let mut held = 0u64;
        self.sessions_chunked(COUNT_CHUNK, |_, values| held += count(values))?;
        let room = ReplicaRoom {
            held,
            limit: self.replica_limit,
            ..self.replica_pool()?
        };
        self.set_replica_pool(room)?;
        Ok(held)
    }

    /// Gives back the room of `n` copies of the pool the agent deleted (holding the datapath).
    pub(super) fn release_replicas(&self, n: u64) -> Result<(), DatapathError> {
        if n == 0 {
            return Ok(());
        }
        let room = self.replica_pool()?;
        let held = room.held.saturating_sub(n);
        self.set_replica_pool(ReplicaRoom { held, ..room })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use hasync_common::{
        ApplyOp, ApplyRecord, ApplySource, Counter, MemberId, SessionFlags, State,
    };

    use super::*;
    use crate::datapath::{
        monotonic_ns,
        sweep_table::SweepBeside,
        testing::{datapath, test_run, udp_frame, udp_key},
    };

    const XDP_PASS: u32 = 2;
    const SEC: u64 = 1_000_000_000;

    /// A peer's copy as the wire decodes it: `owner`'s, at `version`, last seen `idle` ago.
    fn copy(owner: u8, version: u32, state: State, idle: u64) -> Session {
        let now = monotonic_ns();
        Session {
            version,
            owner: MemberId(owner),
            state: state as u8,
            flags: SessionFlags(SessionFlags::FROM_PEER),
            created_ns: now - idle,
            last_seen_ns: now - idle,
            ..Session::default()
        }
    }

    fn copies(owner: u8, version: u32, keys: std::ops::Range<u32>) -> Vec<ApplyRecord> {
        let s = copy(owner, version, State::Established, 0);
        keys.map(|i| ApplyRecord::new(udp_key(i), s, ApplyOp::Upsert, false))
            .collect()
    }

    /// (installed, refused for want of room) of applying `records` from `sender`.
    fn apply(dp: &mut Datapath, records: &[ApplyRecord], sender: u8) -> (u32, u32) {
        let from = ApplySource {
            sender: MemberId(sender),
            reconciling: MemberId::NONE,
        };
        let out = dp
            .apply_records(records, from, monotonic_ns())
            .expect("apply");
        (out.installed, u32::from(out.full))
    }

    fn held(dp: &Datapath) -> u64 {
        dp.replica_pool().expect("pool").held
    }

    /// Peers' established sessions cannot take the whole table: past the pool's limit (three
    /// quarters of the table by default) new ones are refused, embryonic ones too, so this
    /// member's own new flows still find room. Before, a peer's made-up sessions filled the
    /// table and every new flow here was dropped (`drop-table-full`). Copies held still take
    /// their owners' updates.
    #[test]
    fn peers_copies_leave_room_for_this_members_own_flows() {
        let mut dp = datapath();
        let capacity = dp.capacity();
        let limit = default_limit(capacity, 2);
        let flood = copies(2, 1, 0..capacity);
        assert_eq!(apply(&mut dp, &flood, 2), (limit, capacity - limit));
        assert_eq!(held(&dp), u64::from(limit));
        let reader = dp.counters_reader().expect("reader");
        let limits = (u64::from(limit), u64::from(limit));
        assert_eq!(
            reader.replica_pool().expect("pool"),
            limits,
            "as show counters reads it"
        );
        let counters = dp.counters().expect("counters");
        let refused = u64::from(capacity - limit);
        assert_eq!(counters.get(Counter::ReplicasOverLimit), refused);

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
        assert_eq!(apply(&mut dp, &third, 3), (0, 10), "one pool for all peers");
        let embryonic = copy(3, 1, State::UdpNew, 0);
        let embryonic = ApplyRecord::new(udp_key(capacity), embryonic, ApplyOp::Upsert, false);
        assert_eq!(apply(&mut dp, &[embryonic], 3), (0, 1), "embryonic too");
        assert_eq!(held(&dp), u64::from(limit));
    }

    /// A failover between peers moves copies from one owner to another: nothing enters the
    /// pool, and a full pool takes the new owner's records.
    #[test]
    fn a_failover_between_peers_takes_no_room() {
        let mut dp = datapath();
        let limit = default_limit(dp.capacity(), 2);
        assert_eq!(apply(&mut dp, &copies(2, 1, 0..limit), 2), (limit, 0));
        // Member 2 is not alive here: member 3 took its flows over.
        assert_eq!(apply(&mut dp, &copies(3, 2, 0..100), 3), (100, 0));
        assert_eq!(held(&dp), u64::from(limit));
    }

    /// Copies the apply program or the sweep deletes give their room back at once.
    #[test]
    fn deleted_copies_give_their_room_back() {
        let mut dp = datapath();
        let limit = default_limit(dp.capacity(), 2);
        assert_eq!(apply(&mut dp, &copies(2, 1, 0..limit), 2), (limit, 0));
        let gone: Vec<_> = (0..10)
            .map(|i| ApplyRecord::removal(udp_key(i), MemberId(2), 1))
            .collect();
        let from_2 = ApplySource {
            sender: MemberId(2),
            reconciling: MemberId::NONE,
        };
        let out = dp
            .apply_records(&gone, from_2, monotonic_ns())
            .expect("apply");
        assert_eq!(out.deleted, 10);
        let more = copies(2, 1, limit..limit + 11);
        assert_eq!(apply(&mut dp, &more, 2), (10, 1));

        // 100 copies idle for 10 s, expired with a 5 s timeout: the sweep removes them.
        let idle = copy(2, 1, State::Established, 10 * SEC);
        let idle: Vec<_> = (20_000..20_100).map(|i| (udp_key(i), idle)).collect();
        dp.insert_sessions(&idle).expect("insert");
        assert_eq!(
            dp.recount_replicas().expect("recount"),
            u64::from(limit) + 100
        );
        let mut cfg = dp.config().expect("config");
        cfg.timeouts_ns[State::Established as usize] = 5 * SEC;
        dp.set_config(&cfg).expect("config");
        let dp = Mutex::new(dp);
        let pass = SweepBeside::default().step(&dp, 1 << 20, |_| {});
        assert!(pass.expect("step").is_some(), "a whole pass");
        let dp = dp.into_inner().expect("lock");
        assert_eq!(
            held(&dp),
            u64::from(limit),
            "the 100 expired copies' room is back"
        );
    }

    /// What the fast path changed (a copy taken over, one it made assured) and what the
    /// apply program did not see is found by the next count.
    #[test]
    fn a_recount_finds_what_the_apply_program_did_not_see() {
        let mut dp = datapath();
        let limit = default_limit(dp.capacity(), 2);
        let pooled = copy(2, 1, State::Established, 0);
        let entries: Vec<_> = (0..100).map(|i| (udp_key(i), pooled)).collect();
        dp.insert_sessions(&entries).expect("insert");
        let taken = Session {
            owner: MemberId(1),
            flags: SessionFlags(SessionFlags::TAKEN_OVER),
            ..pooled
        };
        let embryonic = copy(2, 1, State::UdpNew, 0);
        dp.insert_sessions(&[(udp_key(0), taken), (udp_key(1), embryonic)])
            .expect("insert");
        assert_eq!(held(&dp), 0);
        assert_eq!(dp.recount_replicas().expect("recount"), 98);
        let more = copies(2, 1, 1000..1000 + limit);
        assert_eq!(apply(&mut dp, &more, 2), (limit - 98, 98));
    }

    /// This member's own sessions that peers' full syncs send back into its fresh table after
    /// a restart are peers' records too: they take room in the pool, and past its limit they
    /// are refused, so this member's own new flows still find room. Before, they were not
    /// counted and a lying peer could fill a restarting member's table with "its own" made-up
    /// sessions.
    #[test]
    fn our_own_sessions_sent_back_take_room_in_the_pool() {
        let mut dp = datapath();
        let capacity = dp.capacity();
        let limit = default_limit(capacity, 2);
        let ours = copies(1, 1, 0..capacity);
        assert_eq!(apply(&mut dp, &ours, 2), (limit, capacity - limit));
        assert_eq!(held(&dp), u64::from(limit));
        assert_eq!(dp.recount_replicas().expect("recount"), u64::from(limit));
        let frame = udp_frame([198, 18, 0, 1], 40000, [198, 18, 0, 2], 53);
        assert_eq!(test_run(&dp, &frame), XDP_PASS);
        let counters = dp.counters().expect("counters");
        assert_eq!(counters.get(Counter::Creates), 1, "a new flow here");
        assert_eq!(counters.get(Counter::DropTableFull), 0);
    }

    /// Only what enters or leaves the pool moves its count: a write the table has no room for
    /// takes nothing, and a copy that goes embryonic and assured again is counted once.
    #[test]
    fn the_count_follows_what_the_table_holds() {
        let mut opts = crate::datapath::DatapathOptions::new(MemberId(1));
        opts.session_capacity = 4096;
        opts.replica_limit = Some(4096);
        let mut dp = Datapath::load(&opts).expect("load (tests need root)");
        // 100 sessions of this member's own, which traffic made: not in the pool.
        let own = Session {
            owner: MemberId(1),
            flags: SessionFlags(0),
            ..copy(1, 1, State::Established, 0)
        };
        let own: Vec<_> = (0..100).map(|i| (udp_key(i), own)).collect();
        dp.insert_sessions(&own).expect("insert");
        assert_eq!(apply(&mut dp, &copies(2, 1, 100..4096), 2), (3996, 0));
        assert_eq!(
            apply(&mut dp, &copies(2, 1, 5000..5001), 2),
            (0, 1),
            "the table is full"
        );
        assert_eq!(held(&dp), 3996);
        let embryonic = copy(2, 2, State::UdpNew, 0);
        let flip = [
            ApplyRecord::new(udp_key(100), embryonic, ApplyOp::Upsert, false),
            copies(2, 3, 100..101)[0],
        ];
        for _ in 0..5 {
            apply(&mut dp, &flip, 2);
        }
        assert_eq!(held(&dp), 3996);
        assert_eq!(dp.recount_replicas().expect("count"), 3996);
    }

    /// The running agent's count walks beside its hold and reaches what the table holds.
    #[test]
    fn a_count_beside_the_hold_finds_what_the_table_holds() {
        let mut dp = datapath();
        let pooled = copy(2, 1, State::Established, 0);
        let entries: Vec<_> = (0..100).map(|i| (udp_key(i), pooled)).collect();
        dp.insert_sessions(&entries).expect("insert");
        assert_eq!(apply(&mut dp, &copies(3, 1, 200..210), 3), (10, 0));
        assert_eq!(held(&dp), 10);
        let dp = Mutex::new(dp);
        assert_eq!(recount_beside(&dp).expect("count"), 110);
        assert_eq!(held(&dp.into_inner().expect("lock")), 110);
    }

    /// Copies removed in bulk while a count walks (a full sync's stale ones, the sweep's) make
    /// it walk again: before, the walk's count, which had them, replaced the kept one, and the
    /// pool read full for a recount interval (seen failing: 200 held of 100 copies). Removals
    /// during every walk (steady churn on a large table) still end in a count: the last
    /// walk's, held by the count kept between itself less what was removed during it and
    /// itself (the first form skipped the count then, and could skip every one; the second
    /// took the lower bound, which a peer deleting its copies ahead of the walk could drive
    /// to zero). A few removed are the count's to carry.
    #[test]
    fn copies_removed_during_a_count_do_not_stay_counted() {
        let mut dp = datapath();
        assert_eq!(apply(&mut dp, &copies(2, 1, 0..700), 2), (700, 0));
        let dp = Mutex::new(dp);
        let delete = |dp: &Mutex<Datapath>, keys: std::ops::Range<u32>| {
            let mut dp = lock(dp);
            let gone = copies(2, 1, keys)
                .into_iter()
                .map(|r| ApplyRecord::new(r.key, r.session, ApplyOp::Delete, false))
                .collect::<Vec<_>>();
            apply(&mut dp, &gone, 2);
        };
        let mut walks = 0;
        let counted = recount_beside_then(&dp, |dp| {
            walks += 1;
            if walks == 1 {
                delete(dp, 0..100);
            }
        });
        assert_eq!((counted.expect("count"), walks), (600, 2), "walked again");
        let mut walks = 0u32;
        let counted = recount_beside_then(&dp, |dp| {
            let from = 100 + 100 * walks;
            walks += 1;
            delete(dp, from..from + 100);
        });
        assert_eq!(
            (counted.expect("count"), walks),
            (300, 3),
            "the last walk's, less"
        );
        assert_eq!(held(&lock(&dp)), 300);
        let counted = recount_beside_then(&dp, |dp| delete(dp, 400..410));
        assert_eq!(counted.expect("count"), 300, "ten removed: carried");
    }

    /// Packets through this member never make a live owner's embryonic UDP copy assured (only
    /// the owner's record may, which the pool counts): a lying peer's copies stay embryonic,
    /// evictable in its part, whatever traffic it sends through here.
    #[test]
    fn traffic_here_does_not_make_a_peers_copy_assured() {
        let mut dp = datapath();
        dp.set_member_alive(MemberId(2), true).expect("alive");
        let frame = udp_frame([198, 18, 0, 1], 40000, [198, 18, 0, 2], 53);
        assert_eq!(test_run(&dp, &frame), XDP_PASS);
        let (key, own) = dp.sessions().expect("dump")[0];
        let now = dp.now_ns().expect("clock");
        let copy = Session {
            owner: MemberId(2),
            flags: SessionFlags(own.flags.0 | SessionFlags::FROM_PEER),
            state: State::UdpReplied as u8,
            created_ns: now - 3 * SEC,
            last_seen_ns: now - 5 * SEC / 2,
            ..own
        };
        assert!(copy.is_embryonic());
        dp.insert_sessions(&[(key, copy)]).expect("insert");
        assert_eq!(test_run(&dp, &frame), XDP_PASS);
        let counters = dp.counters().expect("counters");
        assert_eq!(counters.get(Counter::Asymmetric), 1);
        let after = dp.session(&key).expect("lookup").expect("kept");
        assert!(after.last_seen_ns > copy.last_seen_ns, "kept alive");
        assert!(after.is_embryonic(), "not made assured: {after:?}");
    }

    /// Our own sessions sent back by a peer become traffic's once traffic here carries them:
    /// they leave the pool (the next count gives their room back), and one sent back
    /// embryonic, which the pool never counted, does not enter it when that traffic makes it
    /// assured. Before, such a copy was in the pool uncounted: a lying peer that sent our
    /// "own" embryonic sessions back and packets for them through here passed the bound.
    #[test]
    fn traffic_here_makes_our_own_sessions_sent_back_ours() {
        let mut dp = datapath();
        let frame = udp_frame([198, 18, 0, 1], 40000, [198, 18, 0, 2], 53);
        assert_eq!(test_run(&dp, &frame), XDP_PASS);
        let (key, own) = dp.sessions().expect("dump")[0];
        let now = dp.now_ns().expect("clock");
        let back = Session {
            flags: SessionFlags(own.flags.0 | SessionFlags::FROM_PEER),
            state: State::UdpReplied as u8,
            created_ns: now - 5 * SEC,
            last_seen_ns: now - 4 * SEC,
            ..own
        };
        assert!(back.is_embryonic());
        dp.insert_sessions(&[(key, back)]).expect("insert");
        assert_eq!(test_run(&dp, &frame), XDP_PASS);
        let after = dp.session(&key).expect("lookup").expect("kept");
        assert!(after.is_assured(), "traffic here made it assured");
        assert!(!after.in_replica_pool(), "{after:?}");
        assert_eq!(dp.recount_replicas().expect("count"), 0);
    }

    /// A copy its owner orphaned (removed while this member carried the flow) and that traffic
    /// here then took over stays in the pool: a lying peer cannot make room again by orphaning
    /// its copies and sending their packets here (before, the next count gave their room back,
    /// and the peer filled it again). A copy taken over from an owner that died leaves the
    /// pool: a failover.
    #[test]
    fn an_orphaned_copy_taken_over_stays_in_the_pool() {
        let mut opts = crate::datapath::DatapathOptions::new(MemberId(1));
        opts.session_capacity = 4096;
        opts.replica_limit = Some(2);
        let mut dp = Datapath::load(&opts).expect("load (tests need root)");
        dp.set_member_alive(MemberId(2), true).expect("alive");
        let flow = |port| udp_frame([198, 18, 0, 1], port, [198, 18, 0, 2], 53);
        let (orphan, dead) = (flow(40000), flow(40001));
        assert_eq!(test_run(&dp, &orphan), XDP_PASS);
        assert_eq!(test_run(&dp, &dead), XDP_PASS);
        let now = dp.now_ns().expect("clock");
        let taken: Vec<_> = dp.sessions().expect("dump");
        let held: Vec<_> = taken
            .iter()
            .map(|&(key, own)| {
                let flags = SessionFlags::FROM_PEER | SessionFlags::ASYMMETRIC;
                let orphaned = key.port_lo == 40000u16.to_be() || key.port_hi == 40000u16.to_be();
                let owner = if orphaned { 2 } else { 3 };
                let copy = Session {
                    owner: MemberId(owner),
                    state: State::UdpReplied as u8,
                    flags: SessionFlags(flags | if orphaned { SessionFlags::ORPHANED } else { 0 }),
                    created_ns: now - 10 * SEC,
                    last_seen_ns: now - SEC,
                    packets: [5, 5],
                    ..own
                };
                assert!(copy.in_replica_pool());
                (key, copy)
            })
            .collect();
        dp.insert_sessions(&held).expect("insert");
        assert_eq!(dp.recount_replicas().expect("count"), 2);
        assert_eq!(test_run(&dp, &orphan), XDP_PASS);
        assert_eq!(test_run(&dp, &dead), XDP_PASS);
        let counters = dp.counters().expect("counters");
        assert_eq!(counters.get(Counter::Takeovers), 2);
        assert_eq!(
            dp.recount_replicas().expect("count"),
            1,
            "the orphan's stays"
        );
        assert_eq!(apply(&mut dp, &copies(2, 1, 0..2), 2), (1, 1));
    }

    /// `[local] replica_limit` sets the limit, at most the table; without it the limit leaves
    /// this member a quarter of the table, or its own share in a cluster of more than four.
    #[test]
    fn the_limit_is_the_configured_one_and_at_most_the_table() {
        let cases = [
            (Some(100), 2, 100),
            (Some(1 << 30), 2, 4096),
            (None, 2, 3072),
            (None, 16, 3840),
        ];
        for (asked, members, got) in cases {
            let mut opts = crate::datapath::DatapathOptions::new(MemberId(1));
            opts.session_capacity = 4096;
            opts.replica_limit = asked;
            opts.cluster_members = members;
            let mut dp = Datapath::load(&opts).expect("load (tests need root)");
            let (installed, _) = apply(&mut dp, &copies(2, 1, 0..4096), 2);
            assert_eq!(installed, got, "{asked:?}, {members} members");
        }
    }

    /// Each member of a cluster of five or more holds the others' (n−1)/n of the sessions:
    /// the default leaves that room (before, three quarters in any cluster refused a
    /// 16-member cluster's copies once its table was four fifths full).
    #[test]
    fn the_default_limit_fits_the_clusters_copies() {
        for (members, limit) in [(1, 768), (2, 768), (4, 768), (5, 820), (16, 960)] {
            assert_eq!(default_limit(1024, members), limit, "{members} members");
        }
        assert_eq!(default_limit(1, 16), 1);
        assert_eq!(default_limit(u32::MAX, 16), u32::MAX - u32::MAX / 16);
    }
}
