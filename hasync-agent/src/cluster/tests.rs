use super::*;

/// A peer's full sync (its boot and id).
const BULK: FullSyncId = FullSyncId { boot: 1, id: 1 };

fn timers() -> Timers {
    Timers {
        keepalive_threshold: Duration::from_secs(10),
        sync_timeout: Duration::ZERO,
        tentative_hold: Duration::from_secs(60),
        monitor_hold_down: Duration::from_secs(120),
        discovery: Duration::from_secs(2),
    }
}

fn cluster(t0: Instant) -> Membership {
    Membership::new(
        MemberId(1),
        timers(),
        vec![
            (MemberId(2), "fw2".into(), true),
            (MemberId(3), "fw3".into(), true),
        ],
        t0,
    )
}

fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn a_lone_member_becomes_active_after_discovery() {
    let t0 = Instant::now();
    let mut m = cluster(t0);
    assert_eq!(m.evaluate(t0 + s(1)).local_state, None);
    assert_eq!(m.state, MemberState::Initial);
    assert_eq!(m.evaluate(t0 + s(2)).local_state, Some(MemberState::Active));
}

#[test]
fn initial_until_every_reachable_peer_finished_its_full_sync() {
    let t0 = Instant::now();
    let mut m = cluster(t0);
    m.heard(MemberId(2), MemberState::Active, 10, t0 + s(1));
    m.heard(MemberId(3), MemberState::Active, 10, t0 + s(1));
    m.bulk_started(MemberId(2), BULK);
    m.bulk_started(MemberId(3), BULK);
    let c = m.evaluate(t0 + s(3));
    assert_eq!(c.liveness, vec![(MemberId(2), true), (MemberId(3), true)]);
    assert_eq!(m.state, MemberState::Initial);
    assert!(m.bulk_ended(MemberId(2), BULK));
    m.heard(MemberId(2), MemberState::Active, 10, t0 + s(3));
    m.heard(MemberId(3), MemberState::Active, 10, t0 + s(3));
    m.evaluate(t0 + s(4));
    assert_eq!(m.state, MemberState::Initial, "member 3 is still sending");
    assert!(m.bulk_ended(MemberId(3), BULK));
    assert_eq!(m.evaluate(t0 + s(5)).local_state, Some(MemberState::Active));
}

#[test]
fn sync_timeout_bounds_the_wait() {
    let t0 = Instant::now();
    let mut m = Membership::new(
        MemberId(1),
        Timers {
            sync_timeout: s(60),
            ..timers()
        },
        vec![(MemberId(2), "fw2".into(), true)],
        t0,
    );
    for i in 0..6 {
        m.heard(MemberId(2), MemberState::Active, 1, t0 + s(i * 10));
        m.bulk_started(MemberId(2), BULK);
        m.evaluate(t0 + s(i * 10 + 1));
        assert_eq!(m.state, MemberState::Initial);
    }
    m.heard(MemberId(2), MemberState::Active, 1, t0 + s(59));
    assert_eq!(
        m.evaluate(t0 + s(60)).local_state,
        Some(MemberState::Active)
    );
}

#[test]
fn a_silent_peer_goes_down_and_its_return_counts_a_flap() {
    let t0 = Instant::now();
    let mut m = cluster(t0);
    m.heard(MemberId(2), MemberState::Active, 5, t0);
    assert_eq!(m.evaluate(t0 + s(1)).liveness, vec![(MemberId(2), true)]);
    assert_eq!(
        m.evaluate(t0 + s(10)).liveness,
        vec![],
        "exactly at the threshold it is alive"
    );
    assert_eq!(m.evaluate(t0 + s(11)).liveness, vec![(MemberId(2), false)]);
    assert_eq!(m.peers[&MemberId(2)].state(), MemberState::Down);
    assert_eq!(m.peers[&MemberId(2)].flaps, 1);
    m.heard(MemberId(2), MemberState::Initial, 0, t0 + s(20));
    assert_eq!(m.evaluate(t0 + s(20)).liveness, vec![(MemberId(2), true)]);
    assert_eq!(m.peers[&MemberId(3)].state(), MemberState::Unknown);
}

/// A full sync counts as done only if it was running: a peer that went silent since it
/// started must send a new one (its next hello asks for it), not have the old one's end count.
#[test]
fn the_end_of_a_full_sync_from_a_peer_gone_silent_meanwhile_does_not_count() {
    let t0 = Instant::now();
    let mut m = cluster(t0);
    m.heard(MemberId(2), MemberState::Active, 0, t0);
    m.evaluate(t0);
    let bulk = BULK;
    m.bulk_started(MemberId(2), bulk);
    m.evaluate(t0 + s(11));
    assert!(
        !m.bulk_ended(MemberId(2), bulk),
        "counted after the peer went silent"
    );
    assert_eq!(m.peers[&MemberId(2)].full_sync, FullSyncIn::NotStarted);
    m.bulk_started(MemberId(2), bulk);
    assert!(
        !m.bulk_ended(MemberId(2), FullSyncId { boot: 1, id: 2 }),
        "another full sync's end counted"
    );
    assert!(m.bulk_ended(MemberId(2), bulk));
    assert_eq!(m.peers[&MemberId(2)].full_sync, FullSyncIn::Done);
}

/// A member's first hello shows it `unknown` at once (not `down` until the next
/// evaluation), with no change of state to date; silent past the threshold, it goes `down`.
#[test]
fn a_first_hello_shows_unknown_then_down_when_silent() {
    let t0 = Instant::now();
    let mut m = cluster(t0);
    m.evaluate(t0);
    m.greeted(MemberId(3), t0 + s(1));
    assert_eq!(m.peers[&MemberId(3)].state(), MemberState::Unknown);
    assert_eq!(m.peers[&MemberId(3)].last_change, None);
    m.evaluate(t0 + s(11));
    assert_eq!(m.peers[&MemberId(3)].state(), MemberState::Unknown);
    m.evaluate(t0 + s(12));
    assert_eq!(m.peers[&MemberId(3)].state(), MemberState::Down);
    assert_eq!(m.peers[&MemberId(3)].last_change, Some(t0 + s(12)));
    // Back with a hello: `unknown` at once, a change.
    m.greeted(MemberId(3), t0 + s(13));
    assert_eq!(m.peers[&MemberId(3)].state(), MemberState::Unknown);
    assert_eq!(m.peers[&MemberId(3)].last_change, Some(t0 + s(13)));
}

/// Hellos alone do not keep a member alive: one that restarts in a loop faster than the
/// keepalive threshold, saying hello each time and dying before its first keepalive, goes
/// (its sessions are taken over), shown `unknown` while its hellos come and `down` once they
/// stop; what it reported before is not taken for its state. A keepalive makes it alive again.
#[test]
fn hellos_without_keepalives_do_not_keep_a_member_alive() {
    let t0 = Instant::now();
    let mut m = cluster(t0);
    m.heard(MemberId(2), MemberState::Active, 5, t0);
    assert_eq!(m.evaluate(t0 + s(1)).liveness, vec![(MemberId(2), true)]);
    for at in (2..=12).step_by(2) {
        m.greeted(MemberId(2), t0 + s(at));
        let changes = m.evaluate(t0 + s(at)).liveness;
        let gone = at > 10;
        assert_eq!(changes.is_empty(), at != 12, "at {at} s: {changes:?}");
        assert_eq!(m.peers[&MemberId(2)].alive, !gone, "at {at} s");
        let shown = if gone {
            MemberState::Unknown
        } else {
            MemberState::Active
        };
        assert_eq!(m.peers[&MemberId(2)].state(), shown, "at {at} s");
    }
    m.evaluate(t0 + s(23));
    assert_eq!(m.peers[&MemberId(2)].state(), MemberState::Down);
    assert_eq!(m.peers[&MemberId(2)].last_change, Some(t0 + s(23)));
    m.heard(MemberId(2), MemberState::Initial, 0, t0 + s(24));
    assert_eq!(m.evaluate(t0 + s(24)).liveness, vec![(MemberId(2), true)]);
    assert_eq!(m.peers[&MemberId(2)].state(), MemberState::Initial);
}

/// A member whose agent was stopped for 30 s does not take its peers for dead when it runs
/// again: their silence over the stall is forgiven; silence after it still counts.
#[test]
fn a_stall_of_this_agent_is_not_the_peers_silence() {
    let t0 = Instant::now();
    let mut m = cluster(t0);
    m.heard(MemberId(2), MemberState::Active, 5, t0);
    assert_eq!(m.evaluate(t0 + s(1)).liveness, vec![(MemberId(2), true)]);
    // Stopped from t0+1 to t0+31.
    m.forgive_stall(s(30), t0 + s(31));
    assert_eq!(
        m.evaluate(t0 + s(31)).liveness,
        vec![],
        "taken for dead after a stall"
    );
    // Still silent: down once the threshold has passed in time this agent ran.
    assert_eq!(m.evaluate(t0 + s(40)).liveness, vec![]);
    assert_eq!(m.evaluate(t0 + s(42)).liveness, vec![(MemberId(2), false)]);
}

#[test]
fn a_suspended_peer_loses_its_sessions_to_takeover() {
    let t0 = Instant::now();
    let mut m = cluster(t0);
    m.heard(MemberId(2), MemberState::Active, 5, t0);
    m.evaluate(t0);
    m.heard(MemberId(2), MemberState::Suspended, 5, t0 + s(1));
    assert_eq!(m.evaluate(t0 + s(1)).liveness, vec![(MemberId(2), false)]);
    // Not alive for the takeover rule, but heard: shown as what it says it is.
    assert_eq!(m.peers[&MemberId(2)].state(), MemberState::Suspended);
    assert_eq!(m.evaluate(t0 + s(12)).liveness, vec![]);
    assert_eq!(
        m.peers[&MemberId(2)].state(),
        MemberState::Down,
        "no longer heard"
    );
}

#[test]
fn suspend_then_functional_goes_through_tentative() {
    let t0 = Instant::now();
    let mut m = cluster(t0);
    m.evaluate(t0 + s(2));
    assert_eq!(m.state, MemberState::Active);
    m.suspend();
    assert_eq!(
        m.evaluate(t0 + s(3)).local_state,
        Some(MemberState::Suspended)
    );
    assert_eq!(m.flaps, 0, "the operator's suspend is not a flap");
    m.functional(t0 + s(4));
    assert_eq!(
        m.evaluate(t0 + s(4)).local_state,
        Some(MemberState::Tentative)
    );
    assert_eq!(m.evaluate(t0 + s(63)).local_state, None);
    assert_eq!(
        m.evaluate(t0 + s(64)).local_state,
        Some(MemberState::Active)
    );
}

#[test]
fn a_datapath_fault_makes_the_member_non_functional_until_repaired() {
    let t0 = Instant::now();
    let mut m = cluster(t0);
    m.evaluate(t0 + s(2));
    let cause = "XDP detached from in0";
    m.set_condition(Condition::Datapath, Some(cause.into()), t0 + s(3));
    assert_eq!(
        m.evaluate(t0 + s(3)).local_state,
        Some(MemberState::NonFunctional)
    );
    assert_eq!(
        m.faults().collect::<Vec<_>>(),
        [(&Condition::Datapath, cause)]
    );
    assert_eq!(m.flaps, 1);
    m.set_condition(Condition::Datapath, None, t0 + s(4));
    assert_eq!(m.faults().count(), 0);
    // No monitor hold-down for a repaired datapath: Tentative at once, then Active.
    assert_eq!(
        m.evaluate(t0 + s(4)).local_state,
        Some(MemberState::Tentative)
    );
    assert_eq!(
        m.evaluate(t0 + s(64)).local_state,
        Some(MemberState::Active)
    );
}

#[test]
fn a_recovered_monitor_holds_the_member_down_then_tentative_then_active() {
    let t0 = Instant::now();
    let mut m = cluster(t0);
    m.evaluate(t0 + s(2));
    let uplinks = Condition::LinkGroup("uplinks".into());
    let gateway = Condition::PathGroup("gateway".into());
    m.set_condition(uplinks.clone(), Some("out0 down".into()), t0 + s(10));
    m.set_condition(
        gateway.clone(),
        Some("198.18.1.1 unanswered".into()),
        t0 + s(11),
    );
    assert_eq!(
        m.evaluate(t0 + s(11)).local_state,
        Some(MemberState::NonFunctional)
    );
    assert_eq!(m.flaps, 1);
    // One recovers: the other still fails.
    m.set_condition(uplinks.clone(), None, t0 + s(20));
    assert_eq!(m.evaluate(t0 + s(200)).local_state, None);
    // The last recovers at 30 s: held down for 120 s (the first's hold-down ended at 140 s).
    m.set_condition(gateway, None, t0 + s(30));
    assert_eq!(m.hold_down_until(), Some(t0 + s(150)));
    assert_eq!(m.evaluate(t0 + s(149)).local_state, None);
    assert_eq!(m.flaps, 1, "counted while held down");
    assert_eq!(
        m.evaluate(t0 + s(150)).local_state,
        Some(MemberState::Tentative)
    );
    assert_eq!(m.evaluate(t0 + s(209)).local_state, None);
    assert_eq!(
        m.evaluate(t0 + s(210)).local_state,
        Some(MemberState::Active)
    );
    assert_eq!(
        m.flaps, 1,
        "counted until the member stays Active a hold time"
    );
    m.evaluate(t0 + s(329));
    assert_eq!(m.flaps, 1, "Tentative is not in service yet");
    m.evaluate(t0 + s(330));
    assert_eq!(
        m.flaps, 0,
        "Active a hold time since 210 s: flaps start anew"
    );
    // Failing again during a hold-down keeps the member down and counts nothing new.
    m.set_condition(uplinks.clone(), Some("out0 down".into()), t0 + s(400));
    m.evaluate(t0 + s(400));
    m.set_condition(uplinks.clone(), None, t0 + s(401));
    m.set_condition(uplinks, Some("out0 down".into()), t0 + s(402));
    assert_eq!(m.evaluate(t0 + s(600)).local_state, None);
    assert_eq!(m.state, MemberState::NonFunctional);
    assert_eq!(m.flaps, 1);
}

/// `hasync functional` while a recovered monitor still holds the member down: it is
/// Tentative for the tentative hold after the hold-down, as a recovery without the operator
/// would be (before stop 42 the hold started at the command, ran out under the hold-down, and
/// the member went from Non-functional straight to Active: seen failing).
#[test]
fn functional_during_a_hold_down_is_tentative_after_it() {
    let t0 = Instant::now();
    let mut m = cluster(t0);
    m.evaluate(t0 + s(2));
    let uplinks = Condition::LinkGroup("uplinks".into());
    m.set_condition(uplinks.clone(), Some("out0 down".into()), t0 + s(10));
    m.evaluate(t0 + s(10));
    m.set_condition(uplinks, None, t0 + s(20));
    m.suspend();
    m.evaluate(t0 + s(21));
    m.functional(t0 + s(22));
    assert_eq!(m.hold_down_until(), Some(t0 + s(140)));
    assert_eq!(
        m.evaluate(t0 + s(23)).local_state,
        Some(MemberState::NonFunctional)
    );
    assert_eq!(
        m.evaluate(t0 + s(140)).local_state,
        Some(MemberState::Tentative)
    );
    assert_eq!(m.evaluate(t0 + s(199)).local_state, None);
    assert_eq!(
        m.evaluate(t0 + s(200)).local_state,
        Some(MemberState::Active)
    );
}

/// A member that falls again from Tentative is not "in service a hold time": the quiet time
/// its earlier recovery started no longer resets the flap count (before stop 42 it did, while
/// the member was Non-functional again: seen failing, 0 flaps).
#[test]
fn a_fall_from_tentative_cancels_the_quiet_time() {
    let t0 = Instant::now();
    let mut m = cluster(t0);
    m.evaluate(t0 + s(2));
    let uplinks = Condition::LinkGroup("uplinks".into());
    m.set_condition(uplinks.clone(), Some("out0 down".into()), t0 + s(10));
    m.evaluate(t0 + s(10));
    m.set_condition(uplinks.clone(), None, t0 + s(20));
    assert_eq!(
        m.evaluate(t0 + s(140)).local_state,
        Some(MemberState::Tentative)
    );
    m.set_condition(uplinks, Some("out0 down".into()), t0 + s(150));
    assert_eq!(
        m.evaluate(t0 + s(150)).local_state,
        Some(MemberState::NonFunctional)
    );
    m.evaluate(t0 + s(261));
    assert_eq!(m.state, MemberState::NonFunctional);
    assert_eq!(m.flaps, 1, "reset while the member was down");
}

const X: [u8; 32] = [1; 32];
const Y: [u8; 32] = [2; 32];
const Z: [u8; 32] = [3; 32];

/// Member `local` of three with agreed digest `mine`, Active (discovery passed, alone).
fn member_of_three(local: u8, mine: [u8; 32], t0: Instant) -> Membership {
    let peers = (1..=3u8)
        .filter(|&id| id != local)
        .map(|id| (MemberId(id), format!("fw{id}"), false))
        .collect();
    let mut m = Membership::new(MemberId(local), timers(), peers, t0);
    m.set_agreed(mine);
    m.evaluate(t0 + s(2));
    m
}

fn hear(m: &mut Membership, id: u8, state: MemberState, agreed: [u8; 32], at: Instant) {
    m.heard(MemberId(id), state, 0, at);
    let differs = (agreed != m.agreed).then(|| "session timeouts differ".to_owned());
    m.peer_config(MemberId(id), Some(agreed), differs, None);
}

#[test]
fn a_member_that_disagrees_with_the_majority_is_non_functional_naming_the_mismatch() {
    let t0 = Instant::now();
    let mut m = member_of_three(1, X, t0);
    assert_eq!(m.state, MemberState::Active);
    hear(&mut m, 2, MemberState::Active, Y, t0 + s(3));
    hear(&mut m, 3, MemberState::Active, Y, t0 + s(3));
    assert_eq!(
        m.evaluate(t0 + s(3)).local_state,
        Some(MemberState::NonFunctional)
    );
    let (condition, cause) = m.faults().next().expect("a fault");
    assert_eq!(*condition, Condition::ConfigMismatch);
    assert_eq!(
        cause,
        "session timeouts differ from member 2's; session timeouts differ from member 3's \
         (2 of 3 members heard agree with each other, not with this one; compare with \
         `hasync config diff`)"
    );
    // Member 3 now agrees with us: a tie, and we are the lower id; resolved, no recovery hold.
    hear(&mut m, 3, MemberState::Active, X, t0 + s(4));
    assert_eq!(m.evaluate(t0 + s(4)).local_state, Some(MemberState::Active));
    assert_eq!(m.faults().count(), 0);
    // Peers not heard any more do not count.
    hear(&mut m, 3, MemberState::Active, Y, t0 + s(5));
    assert_eq!(m.evaluate(t0 + s(20)).local_state, None);
    assert_eq!(m.state, MemberState::Active);
}

#[test]
fn three_configurations_leave_one_member_in_service_and_none_gives_way_to_nobody() {
    let t0 = Instant::now();
    // Three members, three configurations, all in service: the lowest id's stays.
    let mut ms = [(1, X), (2, Y), (3, Z)].map(|(id, d)| member_of_three(id, d, t0));
    for (i, m) in ms.iter_mut().enumerate() {
        for (id, d) in [(1u8, X), (2, Y), (3, Z)] {
            if usize::from(id) != i + 1 {
                hear(m, id, MemberState::Active, d, t0 + s(3));
            }
        }
        m.evaluate(t0 + s(3));
    }
    let states = ms.each_ref().map(|m| m.state);
    assert_eq!(
        states,
        [
            MemberState::Active,
            MemberState::NonFunctional,
            MemberState::NonFunctional
        ]
    );
    // The one in service fails (a link group): nobody of its configuration serves any more,
    // so the others keep traffic flowing rather than give way to nobody.
    let [_, fw2, fw3] = &mut ms;
    for m in [&mut *fw2, &mut *fw3] {
        hear(m, 1, MemberState::NonFunctional, X, t0 + s(4));
    }
    hear(fw2, 3, MemberState::NonFunctional, Z, t0 + s(4));
    hear(fw3, 2, MemberState::NonFunctional, Y, t0 + s(4));
    fw2.evaluate(t0 + s(4));
    fw3.evaluate(t0 + s(4));
    assert_eq!(
        fw2.faults().count(),
        0,
        "{:?}",
        fw2.faults().collect::<Vec<_>>()
    );
    assert_eq!(fw3.faults().count(), 0);
    // Both back in service: the lower id's configuration stays, the other gives way again.
    hear(fw2, 3, fw3.state, Z, t0 + s(5));
    hear(fw3, 2, fw2.state, Y, t0 + s(5));
    fw2.evaluate(t0 + s(5));
    fw3.evaluate(t0 + s(5));
    assert_ne!(fw2.state, MemberState::NonFunctional);
    assert_eq!(fw3.state, MemberState::NonFunctional);
}

#[test]
fn on_a_tie_the_member_in_service_stays_and_the_newcomer_gives_way() {
    let t0 = Instant::now();
    let two = |local: u8, mine| {
        let mut m = Membership::new(
            MemberId(local),
            timers(),
            vec![(MemberId(3 - local), "peer".into(), false)],
            t0,
        );
        m.set_agreed(mine);
        m
    };
    // Member 1 starts next to an Active member 2 that disagrees: member 1 is the newcomer,
    // whatever its id.
    let mut newcomer = two(1, X);
    hear(&mut newcomer, 2, MemberState::Active, Y, t0 + s(1));
    newcomer.evaluate(t0 + s(1));
    assert_eq!(newcomer.state, MemberState::NonFunctional);
    let mut old = two(2, Y);
    old.evaluate(t0 + s(2));
    hear(&mut old, 1, MemberState::NonFunctional, X, t0 + s(3));
    assert_eq!(old.evaluate(t0 + s(3)).local_state, None);
    assert_eq!(old.state, MemberState::Active);
    // Both start together: the lower id's configuration wins.
    let (mut a, mut b) = (two(1, X), two(2, Y));
    hear(&mut a, 2, MemberState::Initial, Y, t0 + s(1));
    hear(&mut b, 1, MemberState::Initial, X, t0 + s(1));
    a.evaluate(t0 + s(2));
    b.evaluate(t0 + s(2));
    // Neither was in service yet, so neither gave way; once a is, b does.
    hear(&mut b, 1, a.state, X, t0 + s(3));
    b.evaluate(t0 + s(3));
    assert_eq!(
        (a.state, b.state),
        (MemberState::Active, MemberState::NonFunctional)
    );
    // Zones only one side has are a warning, never a fault.
    a.peer_config(MemberId(2), Some(X), None, Some("only here: dmz".into()));
    a.evaluate(t0 + s(3));
    assert_eq!(a.state, MemberState::Active);
    assert_eq!(
        a.zone_warnings().collect::<Vec<_>>(),
        [(MemberId(2), "only here: dmz")]
    );
}

#[test]
fn a_member_that_fails_before_its_full_syncs_ended_waits_for_them_after_recovering() {
    let t0 = Instant::now();
    let mut m = cluster(t0);
    m.heard(MemberId(2), MemberState::Active, 0, t0 + s(1));
    m.evaluate(t0 + s(1));
    m.set_condition(
        Condition::LinkGroup("up".into()),
        Some("in0 down".into()),
        t0 + s(1),
    );
    m.evaluate(t0 + s(1));
    assert_eq!(m.state, MemberState::NonFunctional);
    m.set_condition(Condition::LinkGroup("up".into()), None, t0 + s(2));
    m.heard(MemberId(2), MemberState::Active, 0, t0 + s(130));
    m.evaluate(t0 + s(130));
    assert_eq!(
        m.state,
        MemberState::Initial,
        "member 2's full sync has not ended"
    );
    m.bulk_started(MemberId(2), BULK);
    assert!(m.bulk_ended(MemberId(2), BULK));
    m.evaluate(t0 + s(131));
    assert_eq!(m.state, MemberState::Tentative);
}

/// `[local] max_flaps`: the flap that brings the count to the limit suspends the member, as
/// `hasync suspend` would (until `hasync functional`), while another member is Active to take
/// its traffic; a member with no peer in service stays Non-functional and keeps counting.
#[test]
fn the_flap_that_reaches_the_limit_suspends_the_member_while_a_peer_serves() {
    let t0 = Instant::now();
    let mut m = cluster(t0);
    m.set_max_flaps(2);
    m.heard(MemberId(2), MemberState::Active, 0, t0 + s(1));
    m.bulk_started(MemberId(2), BULK);
    m.bulk_ended(MemberId(2), BULK);
    // Peer 2 Active and heard at every evaluation.
    let tick = |m: &mut Membership, at: u64| {
        m.heard(MemberId(2), MemberState::Active, 0, t0 + s(at));
        m.evaluate(t0 + s(at))
    };
    assert_eq!(tick(&mut m, 2).local_state, Some(MemberState::Active));
    let uplinks = Condition::LinkGroup("uplinks".into());
    let flap = |m: &mut Membership, at: u64| {
        m.set_condition(uplinks.clone(), Some("out0 down".into()), t0 + s(at));
        let changes = tick(m, at);
        m.set_condition(uplinks.clone(), None, t0 + s(at + 1));
        changes
    };
    let first = flap(&mut m, 10);
    assert_eq!(first.local_state, Some(MemberState::NonFunctional));
    assert_eq!(first.flap_suspend, None);
    // Held down until 131 s, Tentative until 191 s, Active then; the quiet time runs to 311 s.
    assert_eq!(tick(&mut m, 191).local_state, Some(MemberState::Active));
    let second = flap(&mut m, 200);
    assert_eq!(second.local_state, Some(MemberState::Suspended));
    assert_eq!(second.flap_suspend, Some(2));
    assert_eq!(m.flaps, 2, "the count that suspended it is kept for `show`");
    assert_eq!(m.flap_suspended(), Some(2));
    assert!(!m.suspended, "not the operator's suspend");
    // The monitor recovered: the member stays suspended.
    assert_eq!(tick(&mut m, 1000).local_state, None);
    assert_eq!(m.state, MemberState::Suspended);
    m.functional(t0 + s(1001));
    assert_eq!(m.flap_suspended(), None);
    assert_eq!(m.flaps, 0);
    assert_eq!(tick(&mut m, 1001).local_state, Some(MemberState::Tentative));
    assert_eq!(tick(&mut m, 1061).local_state, Some(MemberState::Active));

    // Peer 2 falls silent: the last member in service is not suspended for flapping.
    let mut lone = cluster(t0);
    lone.set_max_flaps(1);
    assert_eq!(
        lone.evaluate(t0 + s(2)).local_state,
        Some(MemberState::Active)
    );
    lone.set_condition(uplinks.clone(), Some("out0 down".into()), t0 + s(10));
    let changes = lone.evaluate(t0 + s(10));
    assert_eq!(changes.local_state, Some(MemberState::NonFunctional));
    assert_eq!(changes.flap_suspend, None);
    assert_eq!(lone.flaps, 1);
}

/// A monitor that keeps failing counts a flap at each fall from Active, with the shipped
/// timers too (tentative hold = monitor hold-down): the count starts anew only once the
/// member has been Active a hold-down time. Before, the quiet time began at the hold-down's
/// end, ran out while the member was still Tentative, and the count never passed 1 for a
/// flapping link: seen failing (1 flap after the second fall).
#[test]
fn a_link_that_keeps_failing_counts_every_fall_from_active() {
    let t0 = Instant::now();
    let mut m = Membership::new(
        MemberId(1),
        Timers {
            tentative_hold: s(60),
            monitor_hold_down: s(60),
            ..timers()
        },
        vec![],
        t0,
    );
    assert_eq!(m.evaluate(t0 + s(2)).local_state, Some(MemberState::Active));
    let uplinks = Condition::LinkGroup("uplinks".into());
    let mut at = 10;
    for fall in 1..=3 {
        m.set_condition(uplinks.clone(), Some("out0 down".into()), t0 + s(at));
        m.evaluate(t0 + s(at));
        assert_eq!(m.flaps, fall);
        m.set_condition(uplinks.clone(), None, t0 + s(at + 1));
        // Held down 60 s, Tentative 60 s, then Active for 30 s before the next fall; evaluated
        // every second, as the runtime does.
        for t in at + 1..at + 151 {
            m.evaluate(t0 + s(t));
        }
        assert_eq!(m.state, MemberState::Active);
        assert_eq!(m.state_since, t0 + s(at + 121));
        at += 151;
    }
    // Active a whole hold-down time: the count starts anew.
    for t in at..at + 29 {
        m.evaluate(t0 + s(t));
    }
    assert_eq!(m.flaps, 3);
    m.evaluate(t0 + s(at + 30));
    assert_eq!(m.flaps, 0);
}

/// A member suspended at its flap limit serves again, on its own, once no other member is in
/// service and it is healthy itself (at once if every peer is heard saying so, else after a
/// keepalive threshold and a tentative hold): the peer that was Active fails (or both members
/// of a pair flapped together and each sees the other suspended). A peer that is only
/// Tentative does not suspend it at its next fall. A start with the flap limit's mark is
/// suspended the same way, and released alike. A fall that is only a configuration mismatch
/// (the other members changed) never suspends.
#[test]
fn a_member_suspended_at_its_flap_limit_serves_again_when_no_other_member_does() {
    let t0 = Instant::now();
    let mut m = cluster(t0);
    m.set_max_flaps(1);
    let hear_2 = |m: &mut Membership, state, at: u64| {
        m.heard(MemberId(2), state, 0, t0 + s(at));
    };
    hear_2(&mut m, MemberState::Active, 1);
    m.bulk_started(MemberId(2), BULK);
    m.bulk_ended(MemberId(2), BULK);
    assert_eq!(m.evaluate(t0 + s(2)).local_state, Some(MemberState::Active));
    let uplinks = Condition::LinkGroup("uplinks".into());
    m.set_condition(uplinks.clone(), Some("out0 down".into()), t0 + s(3));
    hear_2(&mut m, MemberState::Active, 3);
    assert_eq!(m.evaluate(t0 + s(3)).flap_suspend, Some(1));
    m.set_condition(uplinks.clone(), None, t0 + s(4));
    // The peer reports itself suspended too (it flapped as well): nobody serves from 5 s.
    // Released once that has lasted 70 s and this member's hold-down (to 124 s) is over.
    for at in 5..124 {
        hear_2(&mut m, MemberState::Suspended, at);
        assert!(!m.evaluate(t0 + s(at)).flap_released, "at {at} s");
    }
    let back = m.evaluate(t0 + s(124));
    assert!(back.flap_released);
    assert_eq!(back.local_state, Some(MemberState::Tentative));
    assert_eq!(m.flap_suspended(), None);
    assert_eq!(
        m.evaluate(t0 + s(184)).local_state,
        Some(MemberState::Active)
    );
    // The peer returns, Tentative: this member's next fall is a flap, not a suspend.
    hear_2(&mut m, MemberState::Tentative, 190);
    m.set_condition(uplinks, Some("out0 down".into()), t0 + s(190));
    let fall = m.evaluate(t0 + s(190));
    assert_eq!(fall.local_state, Some(MemberState::NonFunctional));
    assert_eq!(fall.flap_suspend, None);

    // A pair: its only peer, heard, suspended by its operator: released at once (nothing to
    // wait for), here at the end of a datapath fault (no hold-down).
    let mut pair = Membership::new(
        MemberId(1),
        timers(),
        vec![(MemberId(2), "fw2".into(), true)],
        t0,
    );
    pair.set_max_flaps(1);
    hear_2(&mut pair, MemberState::Active, 1);
    pair.bulk_started(MemberId(2), BULK);
    pair.bulk_ended(MemberId(2), BULK);
    pair.evaluate(t0 + s(2));
    pair.set_condition(Condition::Datapath, Some("XDP detached".into()), t0 + s(3));
    hear_2(&mut pair, MemberState::Active, 3);
    assert_eq!(pair.evaluate(t0 + s(3)).flap_suspend, Some(1));
    pair.set_condition(Condition::Datapath, None, t0 + s(4));
    hear_2(&mut pair, MemberState::Suspended, 4);
    let at_once = pair.evaluate(t0 + s(4));
    assert!(at_once.flap_released);
    assert_eq!(at_once.local_state, Some(MemberState::Tentative));

    // A start with the flap limit's mark: suspended, and released 70 s after its first
    // evaluation (the peers stay silent; its discovery ended at 2 s).
    let mut restarted = cluster(t0);
    restarted.set_max_flaps(3);
    restarted.restore_flap_suspend();
    assert_eq!(restarted.flap_suspended(), Some(3));
    let first = restarted.evaluate(t0 + s(1));
    assert_eq!(first.local_state, Some(MemberState::Suspended));
    for at in 2..71 {
        assert!(!restarted.evaluate(t0 + s(at)).flap_released, "at {at} s");
    }
    let later = restarted.evaluate(t0 + s(71));
    assert!(later.flap_released);
    assert_eq!(later.local_state, Some(MemberState::Active));

    // Outvoted by the other members' configuration: a flap, not a suspend.
    let mut outvoted = member_of_three(1, X, t0);
    outvoted.set_max_flaps(1);
    for id in [2, 3] {
        hear(&mut outvoted, id, MemberState::Active, Y, t0 + s(10));
    }
    let changes = outvoted.evaluate(t0 + s(10));
    assert_eq!(changes.local_state, Some(MemberState::NonFunctional));
    assert_eq!((outvoted.flaps, changes.flap_suspend), (1, None));
}

/// A link's state follows the engine's attaches and detaches in the engine's order, whatever
/// the order their words reach the membership in. Before, the last call won: an attach's "up"
/// that came after its own connection's detach showed the link up with no connection until
/// its next change.
#[test]
fn a_link_shows_the_engines_latest_word() {
    let mut m = cluster(Instant::now());
    let (peer, link) = (MemberId(2), LinkKind::Ha4);
    let shown = |m: &Membership| m.peers[&peer].links.get(&link).copied();
    m.connection_link(peer, link, 1, true);
    assert_eq!(shown(&m), Some(LinkState::Up));
    // A connection attached (word 2), and its writer failed at once (word 3): the detach's
    // word reached the membership first.
    m.connection_link(peer, link, 3, false);
    m.connection_link(peer, link, 2, true);
    assert_eq!(shown(&m), Some(LinkState::Down), "a late up");
    m.connection_link(peer, link, 4, true);
    assert_eq!(shown(&m), Some(LinkState::Up));
    m.connection_link(peer, link, 5, false);
    assert_eq!(shown(&m), Some(LinkState::Down));
}
