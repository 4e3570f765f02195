use super::*;

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
    m.bulk(MemberId(2), false);
    m.bulk(MemberId(3), false);
    let c = m.evaluate(t0 + s(3));
    assert_eq!(c.liveness, vec![(MemberId(2), true), (MemberId(3), true)]);
    assert_eq!(m.state, MemberState::Initial);
    m.bulk(MemberId(2), true);
    m.heard(MemberId(2), MemberState::Active, 10, t0 + s(3));
    m.heard(MemberId(3), MemberState::Active, 10, t0 + s(3));
    m.evaluate(t0 + s(4));
    assert_eq!(m.state, MemberState::Initial, "member 3 is still sending");
    m.bulk(MemberId(3), true);
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
        m.bulk(MemberId(2), false);
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
    assert_eq!(m.peers[&MemberId(2)].state(), MemberState::Down);
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
    assert_eq!(m.flaps, 0, "reset when the hold time expired");
    assert_eq!(m.evaluate(t0 + s(209)).local_state, None);
    assert_eq!(
        m.evaluate(t0 + s(210)).local_state,
        Some(MemberState::Active)
    );
    // Failing again during a hold-down keeps the member down and counts nothing new.
    m.set_condition(uplinks.clone(), Some("out0 down".into()), t0 + s(300));
    m.evaluate(t0 + s(300));
    m.set_condition(uplinks.clone(), None, t0 + s(301));
    m.set_condition(uplinks, Some("out0 down".into()), t0 + s(302));
    assert_eq!(m.evaluate(t0 + s(500)).local_state, None);
    assert_eq!(m.state, MemberState::NonFunctional);
    assert_eq!(m.flaps, 1);
}

#[test]
fn a_member_that_disagrees_with_the_majority_is_non_functional_naming_the_mismatch() {
    let t0 = Instant::now();
    let mut m = cluster(t0);
    m.evaluate(t0 + s(2));
    assert_eq!(m.state, MemberState::Active);
    for id in [2, 3] {
        m.heard(MemberId(id), MemberState::Active, 0, t0 + s(3));
        m.peer_config(MemberId(id), Some("session timeouts differ".into()), None);
    }
    // Both peers agree with each other, not with us: we are the odd one, Active or not.
    assert_eq!(
        m.evaluate(t0 + s(3)).local_state,
        Some(MemberState::NonFunctional)
    );
    let (condition, cause) = m.faults().next().expect("a fault");
    assert_eq!(*condition, Condition::ConfigMismatch);
    assert!(
        cause.starts_with("session timeouts differ from member 2's; session timeouts differ from member 3's (agreeing: 1 of 3"),
        "{cause}"
    );
    // One peer is fixed: a tie, and we have been Active: we stay; the cause goes.
    m.peer_config(MemberId(3), None, None);
    assert_eq!(
        m.evaluate(t0 + s(4)).local_state,
        Some(MemberState::Tentative)
    );
    assert_eq!(m.faults().count(), 0);
    // A peer not heard any more does not count.
    m.peer_config(MemberId(3), Some("member list differ".into()), None);
    assert_eq!(
        m.evaluate(t0 + s(14)).local_state,
        None,
        "{:?}",
        m.faults().collect::<Vec<_>>()
    );
}

#[test]
fn on_a_tie_the_newcomer_is_non_functional() {
    let t0 = Instant::now();
    let two = |local: u8| {
        Membership::new(
            MemberId(local),
            timers(),
            vec![(MemberId(3 - local), "peer".into(), false)],
            t0,
        )
    };
    // Member 2 starts next to an Active member 1 that disagrees: member 2 is the newcomer.
    let mut newcomer = two(2);
    newcomer.heard(MemberId(1), MemberState::Active, 0, t0 + s(1));
    newcomer.peer_config(MemberId(1), Some("cluster settings differ".into()), None);
    newcomer.evaluate(t0 + s(1));
    assert_eq!(newcomer.state, MemberState::NonFunctional);
    // Member 1, Active, hears it (Non-functional now): it stays Active.
    let mut old = two(1);
    old.evaluate(t0 + s(2));
    old.heard(MemberId(2), MemberState::NonFunctional, 0, t0 + s(3));
    old.peer_config(MemberId(2), Some("cluster settings differ".into()), None);
    assert_eq!(old.evaluate(t0 + s(3)).local_state, None);
    assert_eq!(old.state, MemberState::Active);
    // Both start together: the higher id gives way, the lower does not.
    let (mut a, mut b) = (two(1), two(2));
    a.heard(MemberId(2), MemberState::Initial, 0, t0 + s(1));
    a.peer_config(MemberId(2), Some("member list differ".into()), None);
    b.heard(MemberId(1), MemberState::Initial, 0, t0 + s(1));
    b.peer_config(MemberId(1), Some("member list differ".into()), None);
    a.evaluate(t0 + s(2));
    b.evaluate(t0 + s(2));
    assert_eq!(
        (a.state, b.state),
        (MemberState::Active, MemberState::NonFunctional)
    );
    // Zones only one side has are a warning, never a fault.
    a.peer_config(MemberId(2), None, Some("only here: dmz".into()));
    a.evaluate(t0 + s(3));
    assert_eq!(a.state, MemberState::Active);
    assert_eq!(
        a.zone_warnings().collect::<Vec<_>>(),
        [(MemberId(2), "only here: dmz")]
    );
}
