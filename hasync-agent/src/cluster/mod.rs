//! Cluster membership: member states, liveness from keepalives, flaps, and the local member's
//! own state machine (Initial → Active, Tentative, Non-functional, Suspended).
//!
//! This module is pure logic over explicit timestamps (`Instant`s passed in), so it is tested
//! without sockets or timers. The sync module feeds it what it hears; the agent applies what it
//! decides (the XDP member map, state changes in `show`).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use hasync_common::MemberId;
use serde::Serialize;

use crate::ha_link::LinkKind;

/// A member's state, as the HA clustering model names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemberState {
    /// Booting and receiving the full sync.
    Initial = 0,
    Active = 1,
    /// Recovering: holding before taking traffic.
    Tentative = 2,
    /// Datapath failure or configuration mismatch.
    NonFunctional = 3,
    /// Suspended by the operator until `hasync functional`.
    Suspended = 4,
    /// A peer not heard within the keepalive threshold (only for peers).
    Down = 5,
    /// A peer never heard yet (only for peers).
    Unknown = 6,
}

impl MemberState {
    pub fn from_u8(v: u8) -> MemberState {
        match v {
            0 => MemberState::Initial,
            1 => MemberState::Active,
            2 => MemberState::Tentative,
            3 => MemberState::NonFunctional,
            4 => MemberState::Suspended,
            5 => MemberState::Down,
            _ => MemberState::Unknown,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            MemberState::Initial => "initial",
            MemberState::Active => "active",
            MemberState::Tentative => "tentative",
            MemberState::NonFunctional => "non-functional",
            MemberState::Suspended => "suspended",
            MemberState::Down => "down",
            MemberState::Unknown => "unknown",
        }
    }

    /// Is a member in this state in service (Active, or Tentative on its way there)?
    pub const fn in_service(self) -> bool {
        matches!(self, MemberState::Active | MemberState::Tentative)
    }

    /// May sessions owned by a member in this state stay with it? If not, the member that sees
    /// their traffic takes them over.
    pub const fn keeps_sessions(self) -> bool {
        matches!(
            self,
            MemberState::Initial | MemberState::Active | MemberState::Tentative
        )
    }
}

/// State of one sync link to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkState {
    Up,
    Down,
    NotConfigured,
}

impl LinkState {
    pub const fn name(self) -> &'static str {
        match self {
            LinkState::Up => "up",
            LinkState::Down => "down",
            LinkState::NotConfigured => "not-configured",
        }
    }
}

/// What can make the local member non-functional: each one failed or not, with its cause.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Condition {
    /// The datapath: XDP detached or replaced, an interface of a zone gone or re-created, an
    /// attachment that could not be made again.
    Datapath,
    /// The session table cannot be read (the sweep's walks fail).
    SessionTable,
    /// Settings members must agree on differ from the cluster's majority.
    ConfigMismatch,
    /// A monitored link group (`[[monitor.link_groups]]`), by name.
    LinkGroup(String),
    /// A monitored path group (`[[monitor.path_groups]]`), by name.
    PathGroup(String),
}

impl Condition {
    /// Link and path monitors: after they recover, the member stays non-functional for the
    /// monitor fail hold-down time.
    pub const fn is_monitor(&self) -> bool {
        matches!(self, Condition::LinkGroup(_) | Condition::PathGroup(_))
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Condition::Datapath => f.write_str("datapath"),
            Condition::SessionTable => f.write_str("session table"),
            Condition::ConfigMismatch => f.write_str("configuration mismatch"),
            Condition::LinkGroup(name) => write!(f, "link group `{name}`"),
            Condition::PathGroup(name) => write!(f, "path group `{name}`"),
        }
    }
}

/// What is known of one peer.
#[derive(Clone, Debug)]
pub struct Peer {
    pub id: MemberId,
    pub serial: String,
    /// Its own state, as its last keepalive said.
    pub reported: MemberState,
    /// Its last keepalive (only keepalives say its state and keep it alive).
    pub last_heard: Option<Instant>,
    /// Its last authenticated hello on a sync link.
    pub last_hello: Option<Instant>,
    pub links: BTreeMap<LinkKind, LinkState>,
    /// Per link, the engine's word [`Membership::connection_link`] took last.
    link_word: BTreeMap<LinkKind, u64>,
    pub sessions_owned: u32,
    pub flaps: u32,
    pub last_change: Option<Instant>,
    /// Was it alive at the last evaluation (heard recently, in a state that keeps sessions)?
    pub alive: bool,
    /// Was it heard within the keepalive threshold at the last evaluation?
    pub heard_recently: bool,
    /// Did it say hello within the keepalive threshold at the last evaluation?
    pub greeted_recently: bool,
    /// What of the settings members must agree on differs from ours (cluster settings,
    /// timeouts, members), as its hello said.
    pub config_mismatch: Option<String>,
    /// Zones one of us has and the other lacks: their sessions are refused (a warning).
    pub zone_warning: Option<String>,
    /// Its agreed settings' digest, zones aside (from a hello that sections it).
    pub agreed: Option<[u8; 32]>,
    /// Its full sync to us.
    pub full_sync: FullSyncIn,
    pub session_sync: bool,
}

/// A full sync, as its sender names it: the sender's boot, and an id that grows within it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FullSyncId {
    pub boot: u64,
    pub id: u32,
}

/// Where a peer's full sync to this member stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FullSyncIn {
    /// None since the peer was last taken for gone (it sends one when back), or ever.
    #[default]
    NotStarted,
    /// Running, as [`Membership::bulk_started`] said.
    Running(FullSyncId),
    /// The last one ended (and its stale replicas' removal ran).
    Done,
}

impl Peer {
    /// The state shown for the peer: its own report while its keepalives are heard
    /// (non-functional and suspended included); `unknown` while it only says hello (a
    /// connection came up, its first keepalive has not) or if it was never heard; `down` once
    /// it fell silent.
    pub fn state(&self) -> MemberState {
        if self.heard_recently {
            self.reported
        } else if self.greeted_recently || (self.last_heard, self.last_hello) == (None, None) {
            MemberState::Unknown
        } else {
            MemberState::Down
        }
    }
}

/// Timers of the membership rules.
#[derive(Clone, Copy, Debug)]
pub struct Timers {
    pub keepalive_threshold: Duration,
    /// The longest a starting member waits for its reachable peers' full syncs
    /// (`Config::initial_sync_limit`; 0 here: as long as one is still running, for tests).
    pub sync_timeout: Duration,
    pub tentative_hold: Duration,
    /// How long a member stays non-functional after a failed link or path monitor recovered.
    pub monitor_hold_down: Duration,
    /// How long a starting member waits for peers to connect before deciding it is alone.
    pub discovery: Duration,
}

/// The local member and its view of the peers.
#[derive(Debug)]
pub struct Membership {
    pub local: MemberId,
    pub state: MemberState,
    pub started: Instant,
    pub state_since: Instant,
    /// Times the local member left Active for Non-functional; reset by the operator
    /// (`suspend`, `functional`) and once the member, Active again, stays so for a monitor
    /// hold-down time.
    pub flaps: u32,
    /// Failed conditions and their causes: any one makes the member non-functional.
    faults: BTreeMap<Condition, String>,
    /// A monitor recovered: non-functional until then all the same.
    hold_down_until: Option<Instant>,
    /// The full syncs the member waited for at start ended (or were given up on) once: a
    /// member that failed before that waits for them again when it recovers.
    synced_once: bool,
    /// Its agreed settings' digest, zones aside ([`Membership::set_agreed`]).
    agreed: [u8; 32],
    /// Back in Active after a fall, flaps start anew once the member has stayed so this long.
    quiet_until: Option<Instant>,
    pub suspended: bool,
    /// Flaps that suspend the member (`[local] max_flaps`); 0: no limit.
    max_flaps: u32,
    /// The member suspended itself at its flap limit (with this many flaps), apart from the
    /// operator's `suspended`: it serves again once no other member is in service.
    flap_suspended: Option<u32>,
    /// Since when no other member has been in service, while the flap limit's suspend lasts.
    unserved_since: Option<Instant>,
    /// Sessions this member owns, as last counted.
    pub local_sessions_owned: u32,
    tentative_until: Option<Instant>,
    timers: Timers,
    pub peers: BTreeMap<MemberId, Peer>,
}

/// What changed in one evaluation, for the agent to apply.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Peers whose liveness (as the XDP takeover rule sees it) changed: (id, alive).
    pub liveness: Vec<(MemberId, bool)>,
    /// The local state changed to this.
    pub local_state: Option<MemberState>,
    /// This evaluation suspended the member: its flaps (this many) reached `max_flaps`.
    pub flap_suspend: Option<u32>,
    /// This evaluation ended the flap limit's suspend: no other member is in service.
    pub flap_released: bool,
}

impl Membership {
    pub fn new(
        local: MemberId,
        timers: Timers,
        peers: Vec<(MemberId, String, bool)>,
        now: Instant,
    ) -> Self {
        let peers = peers
            .into_iter()
            .map(|(id, serial, session_sync)| {
                (
                    id,
                    Peer {
                        id,
                        serial,
                        reported: MemberState::Unknown,
                        last_heard: None,
                        last_hello: None,
                        links: BTreeMap::new(),
                        link_word: BTreeMap::new(),
                        sessions_owned: 0,
                        flaps: 0,
                        last_change: None,
                        alive: false,
                        heard_recently: false,
                        greeted_recently: false,
                        config_mismatch: None,
                        zone_warning: None,
                        agreed: None,
                        full_sync: FullSyncIn::NotStarted,
                        session_sync,
                    },
                )
            })
            .collect();
        Membership {
            local,
            state: MemberState::Initial,
            started: now,
            state_since: now,
            flaps: 0,
            faults: BTreeMap::new(),
            hold_down_until: None,
            synced_once: false,
            agreed: [0; 32],
            quiet_until: None,
            suspended: false,
            max_flaps: 0,
            flap_suspended: None,
            unserved_since: None,
            local_sessions_owned: 0,
            tentative_until: None,
            timers,
            peers,
        }
    }

    /// This agent did not run for `gap` (stopped, a paused VM, starved), and `now` it runs
    /// again: the peers' silence over that gap is not theirs, since nothing could be read. Their
    /// last-heard times move forward by it, so a member that resumes does not take every
    /// peer for dead (and their sessions over) before it has read what they sent meanwhile.
    pub fn forgive_stall(&mut self, gap: Duration, now: Instant) {
        for p in self.peers.values_mut() {
            for t in [&mut p.last_heard, &mut p.last_hello].into_iter().flatten() {
                *t = t.checked_add(gap).map_or(now, |t| t.min(now));
            }
        }
    }

    /// How long a peer may be silent before it is taken for gone.
    pub fn keepalive_threshold(&self) -> Duration {
        self.timers.keepalive_threshold
    }

    /// A keepalive from `id`. Returns whether it brings back a member not alive here (the
    /// next [`Membership::evaluate`] makes it alive): what it sends next may settle claims
    /// only once that evaluation opened the claim window (`crate::claim_window`).
    pub fn heard(
        &mut self,
        id: MemberId,
        state: MemberState,
        sessions_owned: u32,
        now: Instant,
    ) -> bool {
        let Some(p) = self.peers.get_mut(&id) else {
            return false;
        };
        p.last_heard = Some(now);
        if p.reported != state {
            p.last_change = Some(now);
        }
        p.reported = state;
        p.sessions_owned = sessions_owned;
        !p.alive && state.keeps_sessions()
    }

    /// A keepalive from `id` read after a later one (it came late on the other link): the
    /// member is heard from, and keeps the state the later one said. Returns what
    /// [`Membership::heard`] does.
    pub fn heard_late(&mut self, id: MemberId, now: Instant) -> bool {
        let Some(p) = self.peers.get_mut(&id) else {
            return false;
        };
        p.last_heard = Some(now);
        !p.alive && p.reported.keeps_sessions()
    }

    /// An authenticated hello from `id`. It shows the member as `unknown` rather than `down`
    /// until its first keepalive, and `down` once it falls silent even if no keepalive ever
    /// came; it does not make the member alive, nor count in the configuration vote (hellos
    /// of a member that restarts in a loop say nothing of its state).
    pub fn greeted(&mut self, id: MemberId, now: Instant) {
        if let Some(p) = self.peers.get_mut(&id) {
            let shown = p.state();
            p.last_hello = Some(now);
            // Shown `unknown` from now on, not `down` until the next evaluation.
            p.greeted_recently = true;
            if p.state() != shown {
                p.last_change = Some(now);
            }
        }
    }

    pub fn set_link(&mut self, id: MemberId, link: LinkKind, state: LinkState) {
        if let Some(p) = self.peers.get_mut(&id) {
            p.links.insert(link, state);
        }
    }

    /// Peer `id`'s `link` is up (a connection attached) or down (detached), as the engine's
    /// `word`, numbered in the order the engine attached and detached its connections, says;
    /// a word older than the last one taken is stale. The attach and the detach of one
    /// connection race to this lock (its writer may fail before the attach says "up"): a late
    /// "up" showed a link up with no connection until its next change.
    pub fn connection_link(&mut self, id: MemberId, link: LinkKind, word: u64, up: bool) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        if p.link_word.get(&link).is_some_and(|&last| word <= last) {
            return;
        }
        p.link_word.insert(link, word);
        let state = if up { LinkState::Up } else { LinkState::Down };
        p.links.insert(link, state);
    }

    /// A peer started full sync `bulk` to us.
    pub fn bulk_started(&mut self, id: MemberId, bulk: FullSyncId) {
        if let Some(p) = self.peers.get_mut(&id) {
            p.full_sync = FullSyncIn::Running(bulk);
        }
    }

    /// A peer's full sync `bulk` to us is done. Not if it is not the one running: a newer one
    /// started since, or the peer went silent since (it sends a new one when back). Callers
    /// need not hold the peer's lock (the membership's is taken before a peer's, never after).
    /// Returns whether it counted.
    pub fn bulk_ended(&mut self, id: MemberId, bulk: FullSyncId) -> bool {
        match self.peers.get_mut(&id) {
            Some(p) if p.full_sync == FullSyncIn::Running(bulk) => {
                p.full_sync = FullSyncIn::Done;
                true
            }
            _ => false,
        }
    }

    /// This member's agreed settings' digest, zones aside.
    pub fn set_agreed(&mut self, agreed: [u8; 32]) {
        self.agreed = agreed;
    }

    /// What peer `id`'s hello said of its configuration: its agreed digest (zones aside; `None`
    /// from a release that does not section it), what differs from ours, and zones only one
    /// of us has.
    pub fn peer_config(
        &mut self,
        id: MemberId,
        agreed: Option<[u8; 32]>,
        mismatch: Option<String>,
        zones: Option<String>,
    ) {
        if let Some(p) = self.peers.get_mut(&id) {
            p.agreed = agreed;
            p.config_mismatch = mismatch;
            p.zone_warning = zones;
        }
    }

    /// Is the local member's configuration the one that must give way? The members heard
    /// recently (this one included) are grouped by their agreed settings; the largest group
    /// wins, then the one with a member in service (Active or Tentative), then the one with the
    /// lowest member id. A member outside the winning group gives way — unless no member of
    /// that group is in service: then keeping traffic flowing comes first.
    /// Reads `heard_recently` as this evaluation's liveness pass left it.
    fn config_mismatch(&self) -> Option<String> {
        let heard = self.peers.values().filter(|p| p.heard_recently);
        // By digest: (members, one in service, lowest id).
        let mut groups: BTreeMap<[u8; 32], (usize, bool, std::cmp::Reverse<MemberId>)> =
            BTreeMap::new();
        let members = heard
            .filter_map(|p| Some((p.agreed?, p.reported.in_service(), p.id)))
            .chain([(self.agreed, self.state.in_service(), self.local)]);
        for (digest, up, id) in members {
            let g = groups
                .entry(digest)
                .or_insert((0, false, std::cmp::Reverse(id)));
            g.0 += 1;
            g.1 |= up;
            g.2 = g.2.max(std::cmp::Reverse(id));
        }
        let (winner, (size, up, _)) = groups.iter().max_by_key(|(_, g)| **g)?;
        if *winner == self.agreed || !up {
            return None;
        }
        let differing: Vec<String> = self
            .peers
            .values()
            .filter(|p| p.agreed.as_ref() == Some(winner))
            .filter_map(|p| {
                Some(format!(
                    "{} from member {}'s",
                    p.config_mismatch.as_deref()?,
                    p.id.0
                ))
            })
            .collect();
        Some(format!(
            "{} ({size} of {} members heard agree with each other, not with this one; compare with `hasync config diff`)",
            differing.join("; "),
            groups.values().map(|g| g.0).sum::<usize>()
        ))
    }

    /// Zones that only this member or only a peer has, per peer (warnings).
    pub fn zone_warnings(&self) -> impl Iterator<Item = (MemberId, &str)> {
        self.peers
            .values()
            .filter_map(|p| Some((p.id, p.zone_warning.as_deref()?)))
    }

    /// `hasync suspend`: the operator's change is not a flap, and starts the count anew.
    pub fn suspend(&mut self) {
        self.suspended = true;
        self.flap_suspended = None;
        self.flaps = 0;
    }

    /// `[local] max_flaps`: the flap that brings the count to `max` suspends the member (0: no
    /// limit), as long as another member is Active to take its traffic.
    pub fn set_max_flaps(&mut self, max: u32) {
        self.max_flaps = max;
    }

    pub fn max_flaps(&self) -> u32 {
        self.max_flaps
    }

    /// The flaps that suspended the member, if its flap limit did (not the operator).
    pub fn flap_suspended(&self) -> Option<u32> {
        self.flap_suspended
    }

    /// A start with the flap limit's mark: suspended by it again (at the limit: the count
    /// itself is not kept), until no other member is in service or `hasync functional`.
    pub fn restore_flap_suspend(&mut self) {
        self.flaps = self.max_flaps;
        self.flap_suspended = Some(self.max_flaps);
    }

    /// `hasync functional`: leave Suspended (the operator's or the flap limit's) through
    /// Tentative (after a monitor's hold-down still running, as a recovery would).
    pub fn functional(&mut self, now: Instant) {
        if self.suspended || self.flap_suspended.is_some() {
            self.suspended = false;
            self.flap_suspended = None;
            self.flaps = 0;
            let back = self.hold_down_until.map_or(now, |t| t.max(now));
            self.tentative_until = Some(back + self.timers.tentative_hold);
        }
    }

    /// Records whether `condition` failed now (`Some(cause)`) or holds (`None`). The member
    /// leaves Non-functional once no condition has failed: a monitor's recovery holds it down
    /// for the monitor fail hold-down time first; then it is Tentative for the tentative hold.
    pub fn set_condition(&mut self, condition: Condition, failed: Option<String>, now: Instant) {
        let Some(cause) = failed else {
            // A resolved mismatch (the other members changed) needs no recovery hold.
            let recovers = condition != Condition::ConfigMismatch;
            if self.faults.remove(&condition).is_some() && recovers {
                if condition.is_monitor() {
                    let until = now + self.timers.monitor_hold_down;
                    self.hold_down_until =
                        Some(self.hold_down_until.map_or(until, |t| t.max(until)));
                }
                let back = self.hold_down_until.map_or(now, |t| t.max(now));
                self.tentative_until = Some(back + self.timers.tentative_hold);
            }
            return;
        };
        self.faults.insert(condition, cause);
    }

    /// The failed conditions and their causes, in a stable order.
    pub fn faults(&self) -> impl Iterator<Item = (&Condition, &str)> {
        self.faults.iter().map(|(c, cause)| (c, cause.as_str()))
    }

    /// Until when a recovered monitor still holds the member down, if it does.
    pub fn hold_down_until(&self) -> Option<Instant> {
        self.hold_down_until
    }

    /// Is the initial full sync finished (or given up on)?
    fn synced(&self, now: Instant) -> bool {
        let waited = now.duration_since(self.started);
        if waited < self.timers.discovery {
            return false;
        }
        if !self.timers.sync_timeout.is_zero() && waited >= self.timers.sync_timeout {
            return true;
        }
        self.full_syncs_done()
    }

    /// Has every reachable peer that syncs sessions finished its full sync to us?
    pub fn full_syncs_done(&self) -> bool {
        self.peers
            .values()
            .filter(|p| p.alive && p.session_sync)
            .all(|p| p.full_sync == FullSyncIn::Done)
    }

    /// Re-evaluates liveness and the local state at `now`.
    pub fn evaluate(&mut self, now: Instant) -> Changes {
        let liveness = self.evaluate_peers(now);
        let mismatch = self.config_mismatch();
        self.set_condition(Condition::ConfigMismatch, mismatch, now);
        self.end_hold_times(now);
        self.synced_once = self.synced_once || self.synced(now);
        let flap_released = self.release_flap_suspend(now);
        let before = self.flap_suspended;
        let local_state = self.enter(self.next_state(now), now);
        Changes {
            liveness,
            local_state,
            flap_suspend: self.flap_suspended.filter(|_| before.is_none()),
            flap_released,
        }
    }

    /// Ends the flap limit's suspend when no other member is in service (Active or Tentative),
    /// the start's full syncs over, and nothing else holds this member down: a flapping member
    /// serves rather than nobody (both members of a pair that flapped together, a peer that
    /// failed or was suspended since, a start after the site lost power). At once when every
    /// peer is heard and says it is out of service; with a peer silent, after a keepalive
    /// threshold and a tentative hold (time for a peer that restarts to come back). Returns
    /// whether it ended it.
    fn release_flap_suspend(&mut self, now: Instant) -> bool {
        let in_service = |p: &Peer| p.alive && p.reported.in_service();
        if self.flap_suspended.is_none() || self.peers.values().any(in_service) {
            self.unserved_since = None;
            return false;
        }
        let since = *self.unserved_since.get_or_insert(now);
        let wait = if self.peers.values().all(|p| p.heard_recently) {
            Duration::ZERO
        } else {
            self.timers.keepalive_threshold + self.timers.tentative_hold
        };
        let healthy = self.faults.is_empty() && self.hold_down_until.is_none();
        if !self.synced_once || !healthy || now.saturating_duration_since(since) < wait {
            return false;
        }
        (self.flap_suspended, self.unserved_since) = (None, None);
        true
    }

    /// Which peers are alive at `now` (heard within the keepalive threshold, and keeping
    /// sessions); returns those that changed.
    fn evaluate_peers(&mut self, now: Instant) -> Vec<(MemberId, bool)> {
        let mut changed = Vec::new();
        let threshold = self.timers.keepalive_threshold;
        let recent = |t: Option<Instant>| t.is_some_and(|t| now.duration_since(t) <= threshold);
        for p in self.peers.values_mut() {
            let shown = p.state();
            let heard_recently = recent(p.last_heard);
            p.heard_recently = heard_recently;
            p.greeted_recently = recent(p.last_hello);
            if p.state() != shown {
                p.last_change = Some(now);
            }
            let alive = heard_recently && p.reported.keeps_sessions();
            if alive != p.alive {
                if p.alive {
                    p.flaps += 1;
                }
                p.alive = alive;
                p.last_change = Some(now);
                if !heard_recently {
                    // A peer that comes back will send a new full sync.
                    p.full_sync = FullSyncIn::NotStarted;
                }
                changed.push((p.id, alive));
            }
        }
        changed
    }

    /// Ends the monitor hold-down and the quiet time that resets the flap count, when due.
    fn end_hold_times(&mut self, now: Instant) {
        if self.hold_down_until.is_some_and(|t| now >= t) {
            self.hold_down_until = None;
        }
        if self.quiet_until.is_some_and(|t| now >= t) {
            self.quiet_until = None;
            self.flaps = 0;
        }
    }

    /// Has the flap count reached `max_flaps` with another member Active to take the traffic
    /// (suspending the last member in service would stop it all), in a fall that is not only a
    /// configuration mismatch (the other members' change, not this member's failing)?
    fn flap_limit_reached(&self) -> bool {
        let peer_serves =
            || (self.peers.values()).any(|p| p.alive && p.reported == MemberState::Active);
        let failing = self.hold_down_until.is_some()
            || self.faults.keys().any(|c| *c != Condition::ConfigMismatch);
        self.max_flaps != 0 && self.flaps >= self.max_flaps && failing && peer_serves()
    }

    /// The local state the conditions call for at `now`.
    fn next_state(&self, now: Instant) -> MemberState {
        if self.suspended || self.flap_suspended.is_some() {
            MemberState::Suspended
        } else if !self.faults.is_empty() || self.hold_down_until.is_some() {
            MemberState::NonFunctional
        } else if !self.synced_once {
            MemberState::Initial
        } else if self.tentative_until.is_some_and(|t| now < t) {
            MemberState::Tentative
        } else {
            MemberState::Active
        }
    }

    /// Moves to `next` at `now` (a fall from Active counts as a flap, and the one that reaches
    /// the limit suspends the member instead); the new state, if it changed.
    fn enter(&mut self, mut next: MemberState, now: Instant) -> Option<MemberState> {
        if next == self.state {
            return None;
        }
        if next == MemberState::NonFunctional {
            // Down again (from Tentative too): not in service a hold time.
            self.quiet_until = None;
            if self.state == MemberState::Active {
                self.flaps += 1;
                if self.flap_limit_reached() {
                    self.flap_suspended = Some(self.flaps);
                    next = MemberState::Suspended;
                }
            }
        }
        if next == MemberState::Active && self.flaps > 0 {
            // Back in service: if it stays so for a hold-down time, flaps start anew (counted
            // from here, not from the hold-down's end: a tentative hold as long as the
            // hold-down would have used the time up before the member served again).
            self.quiet_until = Some(now + self.timers.monitor_hold_down);
        }
        self.state = next;
        self.state_since = now;
        Some(next)
    }
}

#[cfg(test)]
mod tests;
