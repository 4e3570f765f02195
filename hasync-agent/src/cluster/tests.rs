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
