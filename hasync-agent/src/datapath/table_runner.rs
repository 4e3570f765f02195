//! The table-program runner: runs the table programs over the session table, `hasync_apply`
//! over peers' records and `hasync_read` over keys the sender needs, one BPF_PROG_TEST_RUN per
//! batch (see `hasync_common::table_programs`); and the small programs that answer in place,
//! the clock and log programs, one struct in and one back ([`run_one`]).

use std::mem::size_of;

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use hasync_common::{
    maps as names,
    table_programs::{APPLY_BATCH, READ_BATCH, RUN_MAX_BYTES},
    ApplyHeader, ApplyOutcome, ApplyRecord, ApplySource, FlowKey, ReadHeader, ReadSlot, Session,
};

use super::{
    pod::{bytes_of, read_at},
    DatapathError,
};

/// XDP_PASS: the program read the whole batch.
const DONE: u32 = 2;

/// Reusable buffers for one program run's data.
#[derive(Default)]
struct Runner {
    data: Vec<u8>,
    out: Vec<u8>,
}

impl Runner {
    /// Runs `prog` (named `name`) once over `header` followed by `items`; returns the data as
    /// the program left it.
    fn once<H: bytemuck::Pod, T: bytemuck::Pod>(
        &mut self,
        prog: &Xdp,
        name: &'static str,
        header: &H,
        items: &[T],
    ) -> Result<&[u8], DatapathError> {
        self.data.clear();
        self.data.extend_from_slice(bytes_of(header));
        for item in items {
            self.data.extend_from_slice(bytes_of(item));
        }
        debug_assert!(
            self.data.len() <= RUN_MAX_BYTES,
            "a run past the programs' bound"
        );
        // The kernel writes the run's data back whole; into a shorter buffer it writes what
        // fits and fails the call, after the program has run (and written to the table).
        self.out.resize(self.data.len(), 0);
        let opts = TestRunOptions {
            data_in: Some(&self.data),
            data_out: Some(&mut self.out),
            ..TestRunOptions::default()
        };
        let result = prog
            .test_run(opts)
            .map_err(|source| DatapathError::Program { name, source })?;
        let size = (result.data_size_out as usize).min(self.out.len());
        if result.return_value != DONE || size < self.data.len() {
            return Err(DatapathError::BatchRejected {
                program: name,
                items: items.len(),
                verdict: result.return_value,
            });
        }
        Ok(&self.out[..size])
    }
}

/// Runs `prog` (named `name`) once over `input` at the start of a short frame, for the small
/// programs that answer in place (the clock and log programs): the verdict, and the `O` the
/// program left at the start of the data (`None` when the kernel wrote none back).
pub fn run_one<I: bytemuck::Pod, O: bytemuck::Pod>(
    prog: &Xdp,
    name: &'static str,
    input: &I,
) -> Result<(u32, Option<O>), DatapathError> {
    // XDP test runs take at least an Ethernet header's worth of data.
    const FRAME: usize = 32;
    const { assert!(size_of::<I>() <= FRAME, "the input must fit the frame") };
    let mut data = [0u8; FRAME];
    let bytes = bytes_of(input);
    if let Some(head) = data.get_mut(..bytes.len()) {
        head.copy_from_slice(bytes);
    }
    // The input again: a reply the kernel did not write back reads as none.
    let mut out = data;
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(&data),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .map_err(|source| DatapathError::Program { name, source })?;
    let written = (result.data_size_out as usize).min(FRAME);
    let answer = out.get(..written).and_then(|out| read_at::<O>(out, 0));
    Ok((result.return_value, answer))
}

/// Applies `records` from `from` (their sender, and the member whose full sync is running)
/// with the apply program; `now_ns` is the session clock's now.
pub fn apply(
    prog: &Xdp,
    records: &[ApplyRecord],
    from: ApplySource,
    now_ns: u64,
) -> Result<ApplyOutcome, DatapathError> {
    let mut total = ApplyOutcome::default();
    let mut run = Runner::default();
    for part in records.chunks(APPLY_BATCH) {
        let header = ApplyHeader {
            // At most APPLY_BATCH: fits.
            count: part.len() as u32,
            from,
            now_ns,
            ..ApplyHeader::default()
        };
        let out = run.once(prog, names::APPLY_PROGRAM, &header, part)?;
        let done: ApplyHeader = read_at(out, 0).unwrap_or_default();
        total.add(&done.outcome);
    }
    Ok(total)
}

/// Reads the sessions of `keys` with the read program into `out` (cleared first), in order:
/// `None` for a key the table does not hold.
pub fn read(
    prog: &Xdp,
    keys: &[FlowKey],
    out: &mut Vec<Option<Session>>,
) -> Result<(), DatapathError> {
    out.clear();
    let mut run = Runner::default();
    let mut slots = Vec::with_capacity(READ_BATCH);
    for part in keys.chunks(READ_BATCH) {
        slots.clear();
        slots.extend(part.iter().map(|key| ReadSlot {
            key: *key,
            ..ReadSlot::default()
        }));
        let header = ReadHeader {
            // At most READ_BATCH: fits.
            count: part.len() as u32,
            found: 0,
        };
        let data = run.once(prog, names::READ_PROGRAM, &header, &slots)?;
        for i in 0..part.len() {
            let slot: Option<ReadSlot> =
                read_at(data, size_of::<ReadHeader>() + i * size_of::<ReadSlot>());
            out.push(slot.filter(|s| s.found != 0).map(|s| s.session));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use hasync_common::{flow::IPPROTO_UDP, Family, MemberId, Session};

    use super::*;
    use crate::datapath::testing::datapath;

    fn key(i: u32) -> FlowKey {
        FlowKey::canonical(Family::V4, IPPROTO_UDP, [10, 0, i, 0], 1, [2, 0, 0, 0], 2).0
    }

    /// Keys present and absent, over several program runs, come back in order, each with
    /// exactly what a single lookup sees.
    #[test]
    fn read_returns_each_keys_session_in_order() {
        let mut dp = datapath();
        let n = READ_BATCH as u32 * 2 + 3;
        let held: Vec<(FlowKey, Session)> = (0..n)
            .filter(|i| i % 3 != 0)
            .map(|i| {
                let s = Session {
                    version: i + 1,
                    owner: MemberId(2),
                    packets: [u64::from(i), 7],
                    ..Session::default()
                };
                (key(i), s)
            })
            .collect();
        dp.insert_sessions(&held).expect("insert");
        let keys: Vec<FlowKey> = (0..n).map(key).collect();
        let mut out = Vec::new();
        dp.read_sessions(&keys, &mut out).expect("read");
        assert_eq!(out.len(), keys.len());
        for (i, (k, got)) in keys.iter().zip(&out).enumerate() {
            assert_eq!(*got, dp.session(k).expect("lookup"), "key {i}");
            assert_eq!(got.is_some(), i % 3 != 0, "key {i}");
        }
    }

    /// `incoming`, a peer's record of key 1 (its reply zone unbound, as records carry none),
    /// applied over `local`: the session then held.
    fn applied_over(local: Session, incoming: Session) -> Session {
        let mut dp = datapath();
        dp.insert_sessions(&[(key(1), local)]).expect("insert");
        let mut update = ApplyRecord::new(key(1), incoming, hasync_common::ApplyOp::Upsert, false);
        update.session.reply_zone = hasync_common::ZoneId::NONE;
        let out = dp
            .apply_records(&[update], hasync_common::ApplySource::NONE, 0)
            .expect("apply");
        assert_eq!(out.installed, 1);
        dp.session(&key(1)).expect("lookup").expect("held")
    }

    /// A peer's update replaces the session but not what only this member knows: the zone its
    /// replies are bound to here (and the admission ticket).
    #[test]
    fn an_update_keeps_the_local_reply_zone() {
        let local = Session {
            version: 1,
            owner: MemberId(2),
            packets: [3, 2],
            state: hasync_common::State::UdpReplied as u8,
            reply_zone: hasync_common::ZoneId(4),
            ..Session::default()
        };
        let now = applied_over(
            local,
            Session {
                version: 2,
                ..local
            },
        );
        assert_eq!(now.version, 2);
        assert_eq!(now.reply_zone, hasync_common::ZoneId(4));
    }

    /// A local copy made from the flow's other end (its first packet here was the reply) bound
    /// the other direction: the peer's copy does not take that zone as its replies'.
    #[test]
    fn an_update_from_the_other_end_drops_the_local_reply_zone() {
        let local = Session {
            version: 1,
            owner: MemberId(2),
            packets: [1, 0],
            state: hasync_common::State::UdpNew as u8,
            flags: hasync_common::SessionFlags(hasync_common::SessionFlags::INITIATOR_HI),
            reply_zone: hasync_common::ZoneId(4),
            ..Session::default()
        };
        let incoming = Session {
            version: 2,
            flags: hasync_common::SessionFlags(0),
            ..local
        };
        let now = applied_over(local, incoming);
        assert_eq!(now.version, 2);
        assert_eq!(now.reply_zone, hasync_common::ZoneId::NONE);
    }

    /// A local "no zone" (this member's routing table had no zone for the flow's replies when
    /// it owned it) is not kept by a peer's copy, which asks again at its first reply here; kept,
    /// every reply here was a zone mismatch for the session's life.
    #[test]
    fn a_peers_update_does_not_keep_a_local_no_zone() {
        let local = Session {
            version: 1,
            owner: MemberId(1),
            packets: [3, 0],
            state: hasync_common::State::UdpNew as u8,
            reply_zone: hasync_common::ZoneId::UNZONED,
            ..Session::default()
        };
        let peers = Session {
            version: 2,
            owner: MemberId(2),
            ..local
        };
        assert_eq!(
            applied_over(local, peers).reply_zone,
            hasync_common::ZoneId::NONE
        );
    }

    /// A peer that names itself the owner of a session at a higher version takes it only where
    /// a takeover could be genuine: the owner not alive here, or the flow quiet for the
    /// keepalive threshold (10 s by default). Before, any authenticated peer took this member's
    /// own live sessions, and a third member's, that way, and its delete then removed them.
    #[test]
    fn a_peer_claims_a_live_owners_session_only_once_its_flow_is_quiet() {
        use hasync_common::{ApplyOp, Counter, State};
        let mut dp = datapath();
        for member in [1, 3] {
            dp.set_member_alive(MemberId(member), true).expect("alive");
        }
        let sec = 1_000_000_000u64;
        let now = 100 * sec;
        let from_2 = ApplySource {
            sender: MemberId(2),
            reconciling: MemberId::NONE,
        };
        for (owner, waits) in [(1, true), (3, true), (4, false)] {
            let k = key(u32::from(owner));
            let held = Session {
                version: 5,
                owner: MemberId(owner),
                created_ns: now - 20 * sec,
                last_seen_ns: now - sec,
                state: State::UdpReplied as u8,
                ..Session::default()
            };
            let claim = Session {
                version: 6,
                owner: MemberId(2),
                ..held
            };
            let up = ApplyRecord::new(k, claim, ApplyOp::Upsert, false);
            let del = ApplyRecord::removal(k, MemberId(2), 0);
            dp.insert_sessions(&[(k, held)]).expect("insert");
            let refused = |dp: &crate::datapath::Datapath| {
                dp.counters().expect("counters").get(Counter::ClaimsRefused)
            };
            let before = refused(&dp);
            let out = dp.apply_records(&[up, del], from_2, now).expect("apply");
            let got = dp.session(&k).expect("lookup");
            if waits {
                assert_eq!((out.installed, out.deleted), (0, 0), "owner {owner}");
                assert_eq!(
                    got.map(|s| (s.owner, s.version)),
                    Some((MemberId(owner), 5))
                );
                assert_eq!(refused(&dp), before + 1, "owner {owner}");
                let later = now + 9 * sec;
                let out = dp.apply_records(&[up], from_2, later).expect("apply");
                assert_eq!(out.installed, 1, "quiet for 10 s: owner {owner}");
            } else {
                assert_eq!(
                    (out.installed, out.deleted),
                    (1, 1),
                    "owner {owner} is not alive"
                );
            }
        }
    }

    /// A third member's copy whose owner sent a record a second ago may still be running
    /// there, however old its last packet: it changes hands only once the owner's refresh is
    /// overdue by the quiet time; a copy just taken over is contestable at once.
    #[test]
    fn a_replica_is_claimed_only_once_its_owners_refresh_is_overdue() {
        use hasync_common::{config::REFRESH_MAX_NS, ApplyOp, SessionFlags, State};
        let mut dp = datapath();
        dp.set_member_alive(MemberId(3), true).expect("alive");
        let sec = 1_000_000_000u64;
        let now = 200 * sec;
        let from_2 = ApplySource {
            sender: MemberId(2),
            reconciling: MemberId::NONE,
        };
        let held = Session {
            version: 5,
            owner: MemberId(3),
            created_ns: now - 100 * sec,
            last_seen_ns: now - 60 * sec,
            last_event_ns: now - sec,
            state: State::Established as u8,
            ..Session::default()
        };
        let claim = ApplyRecord::new(
            key(7),
            Session {
                version: 6,
                owner: MemberId(2),
                ..held
            },
            ApplyOp::Upsert,
            false,
        );
        dp.insert_sessions(&[(key(7), held)]).expect("insert");
        let out = dp.apply_records(&[claim], from_2, now).expect("apply");
        assert_eq!(out.installed, 0, "the owner's refresh is not overdue");
        let overdue = now - sec + REFRESH_MAX_NS + 10 * sec;
        let out = dp.apply_records(&[claim], from_2, overdue).expect("apply");
        assert_eq!(out.installed, 1, "overdue by the quiet time");
        let contested = Session {
            flags: SessionFlags(SessionFlags::TAKEN_OVER | SessionFlags::CONTESTABLE),
            ..held
        };
        dp.insert_sessions(&[(key(7), contested)]).expect("insert");
        let out = dp.apply_records(&[claim], from_2, now).expect("apply");
        assert_eq!(out.installed, 1, "just taken over: contestable");
    }

    /// In the kernel as in the rule's own tests: the owner's next record of a flow replaces a
    /// copy whose record was delayed in transit (its times anchored here two seconds late);
    /// from an unknown sender the times still say "a re-created flow" and the copy stays.
    #[test]
    fn the_owners_record_replaces_a_copy_its_delayed_record_made() {
        let mut dp = datapath();
        let sec = 1_000_000_000u64;
        let delayed = Session {
            version: 7,
            owner: MemberId(2),
            created_ns: 102 * sec,
            last_seen_ns: 102 * sec,
            state: hasync_common::State::UdpNew as u8,
            ..Session::default()
        };
        let replied = Session {
            version: 8,
            created_ns: 100 * sec,
            last_seen_ns: 100 * sec + sec / 5,
            state: hasync_common::State::UdpReplied as u8,
            ..delayed
        };
        let record = ApplyRecord::new(key(1), replied, hasync_common::ApplyOp::Upsert, false);
        let from = |sender| ApplySource {
            sender: MemberId(sender),
            reconciling: MemberId::NONE,
        };
        for (sender, installed, version) in [(0, 0, 7), (3, 0, 7), (2, 1, 8)] {
            dp.insert_sessions(&[(key(1), delayed)]).expect("insert");
            let out = dp
                .apply_records(&[record], from(sender), 103 * sec)
                .expect("apply");
            assert_eq!(out.installed, installed, "sender {sender}");
            let held = dp.session(&key(1)).expect("lookup").expect("held");
            assert_eq!(held.version, version, "sender {sender}");
        }
    }

    /// The owner's removal of a replica this member carries the flow of (asymmetric, assured,
    /// live here) leaves it, orphaned, for the next packet to take over; every other replica
    /// goes, as the owner decided. The same whether the removal is a delete record or the end
    /// of a full sync that no longer carried the session.
    #[test]
    fn a_removal_orphans_only_a_live_assured_flow_carried_here() {
        use crate::sync::table::SessionTable as _;
        use hasync_common::{session::tcp, SessionFlags as F, State};
        let mut dp = datapath();
        // Times on the host's clock, which the full sync's removal reads: a host up for less
        // than the default established timeout (an hour) had the times below overflow, so the
        // timeout is made a minute.
        let mut cfg = dp.config().expect("config");
        cfg.timeouts_ns[State::Established as usize] = 60_000_000_000;
        dp.set_config(&cfg).expect("config");
        let now = crate::datapath::monotonic_ns();
        let s = |state: State, flags: u16, idle_s: u64| Session {
            version: 7,
            owner: MemberId(2),
            state: state as u8,
            flags: F(F::FROM_PEER | flags),
            tcp_flags: [tcp::SYN | tcp::ACK, tcp::SYN | tcp::ACK],
            created_ns: now.saturating_sub(100_000_000_000),
            last_seen_ns: now.saturating_sub(idle_s * 1_000_000_000),
            ..Session::default()
        };
        let cases = [
            (
                "carried here",
                s(State::Established, F::ASYMMETRIC, 1),
                true,
            ),
            ("never seen here", s(State::Established, 0, 1), false),
            ("embryonic", s(State::SynSent, F::ASYMMETRIC, 1), false),
            (
                "idle past its timeout here",
                s(State::Established, F::ASYMMETRIC, 61),
                false,
            ),
            ("closed", s(State::Closed, F::ASYMMETRIC, 1), false),
        ];
        // Delete records as the owner sends them (version 0: whatever it had), then the same
        // sessions under other keys left out by a full sync from the owner.
        let by_record: Vec<(FlowKey, Session)> = (0..).map(key).zip(cases.map(|c| c.1)).collect();
        let by_sync: Vec<(FlowKey, Session)> = (100..).map(key).zip(cases.map(|c| c.1)).collect();
        dp.insert_sessions(&by_record).expect("insert");
        dp.insert_sessions(&by_sync).expect("insert");
        let removals: Vec<ApplyRecord> = by_record
            .iter()
            .map(|(k, _)| ApplyRecord::removal(*k, MemberId(2), 0))
            .collect();
        let out = dp
            .apply_records(&removals, hasync_common::ApplySource::NONE, now)
            .expect("apply");
        assert_eq!((out.deleted, out.kept, out.orphaned), (4, 0, 1));
        let keys: Vec<FlowKey> = by_sync.iter().map(|(k, _)| *k).collect();
        let removed = dp
            .remove_if_unseen(&keys, MemberId(2), now)
            .expect("remove");
        assert_eq!(
            removed,
            crate::sync::table::Unseen {
                removed: 4,
                orphaned: 1
            }
        );
        for held in [&by_record, &by_sync] {
            for ((what, _, orphaned), (k, _)) in cases.iter().zip(held) {
                let left = dp.session(k).expect("lookup");
                assert_eq!(left.is_some(), *orphaned, "{what}");
                if let Some(left) = left {
                    assert!(left.flags.has(F::ORPHANED), "{what}: {left:?}");
                }
            }
        }
    }

    /// A run as large as one may be lays its data out over page fragments: every record in it
    /// is applied and counted. A header claiming more records than the data carries is
    /// refused at the first one missing, the records before it applied (the agent then fails
    /// the frame and the peer sends it again: applying a record twice changes nothing).
    #[test]
    fn a_full_run_spans_page_fragments() {
        let dp = datapath();
        let prog = dp.xdp(names::APPLY_PROGRAM).expect("program");
        let session = Session {
            version: 1,
            owner: MemberId(2),
            state: hasync_common::State::Established as u8,
            ..Session::default()
        };
        let records: Vec<ApplyRecord> = (0..APPLY_BATCH as u32 * 2)
            .map(|i| ApplyRecord::new(key(i), session, hasync_common::ApplyOp::Upsert, false))
            .collect();
        let (full, short) = records.split_at(APPLY_BATCH);
        assert!(size_of::<ApplyHeader>() + std::mem::size_of_val(full) > 4096 * 8);
        let header = ApplyHeader {
            count: APPLY_BATCH as u32,
            ..ApplyHeader::default()
        };
        let mut run = Runner::default();
        let out = run
            .once(prog, names::APPLY_PROGRAM, &header, full)
            .expect("one run");
        let done: ApplyHeader = read_at(out, 0).expect("header");
        assert_eq!(done.outcome.installed, APPLY_BATCH as u32);
        for r in full {
            assert_eq!(dp.session(&r.key).expect("lookup"), Some(session));
        }
        let applied = APPLY_BATCH - 3;
        let err = run
            .once(prog, names::APPLY_PROGRAM, &header, &short[..applied])
            .expect_err("refused");
        assert!(
            matches!(err, DatapathError::BatchRejected { verdict: 0, .. }),
            "{err}"
        );
        for r in &short[..applied] {
            assert_eq!(dp.session(&r.key).expect("lookup"), Some(session));
        }
        assert_eq!(dp.session(&short[applied].key).expect("lookup"), None);
    }

    /// A header claiming more records than a run takes is refused, and nothing is written.
    #[test]
    fn an_oversized_batch_is_refused() {
        let dp = datapath();
        let prog = dp.xdp(names::APPLY_PROGRAM).expect("program");
        let header = ApplyHeader {
            count: APPLY_BATCH as u32 + 1,
            ..ApplyHeader::default()
        };
        let rec = ApplyRecord::new(
            key(1),
            Session::default(),
            hasync_common::ApplyOp::Upsert,
            false,
        );
        let err = Runner::default()
            .once(prog, names::APPLY_PROGRAM, &header, &[rec])
            .expect_err("refused");
        assert!(
            matches!(err, DatapathError::BatchRejected { verdict: 0, .. }),
            "{err}"
        );
        assert_eq!(dp.session(&key(1)).expect("lookup"), None);
    }
}
