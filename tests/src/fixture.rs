//! The packet fixture runner: a [`Row`] is a setup, a sequence of frames with their expected
//! verdicts, and the expected effect on the session table, the counters and the event stream.
//!
//! Rows run one after the other on one loaded program; every row starts from a reset (empty
//! table, its own config, zone and member liveness, no queued events), and counters are
//! compared as deltas.

use std::fmt::Write as _;

use anyhow::{Context as _, Result};
use hasync_common::{
    session::tcp, tcp_window::track, Counter, EventKind, FlowKey, Forwarding, MalformedAction,
    MemberId, OtherProtocols, Policy, Session, SessionFlags, State, ZoneBinding, ZoneId,
};

use crate::{
    frame::Frame,
    testrun::{fixture_config, CounterDelta, TestDatapath, Verdict, LOCAL, TEST_IFINDEX},
};

/// One step of a row.
#[derive(Clone, Debug)]
enum Step {
    Frame(Box<Frame>, Verdict),
    /// Marks a member alive or dead between frames.
    MemberAlive(MemberId, bool),
    /// Binds the test-run ingress interface to another zone between frames: the next frames
    /// come in through that zone.
    Zone(ZoneBinding),
}

/// `zone` as the rows bind it unless told otherwise: without route checks (replies bound to
/// the zone of the first reply), the zone rules the rows are about. The table's namespace has
/// no routes to check against: see [`Row::route_checked_zone`].
fn learned(zone: ZoneId) -> ZoneBinding {
    ZoneBinding {
        flags: ZoneBinding::NO_ROUTE_CHECK,
        ..ZoneBinding::new(zone)
    }
}

/// A session that exists before the row's first frame, as if applied from a peer's sync.
#[derive(Clone, Debug)]
pub struct Existing {
    pub state: State,
    pub owner: MemberId,
    /// Whether the owner is alive (in the MEMBERS map).
    pub alive: bool,
    pub version: u32,
    pub zone: ZoneId,
    pub flags: u16,
    pub packets: [u64; 2],
    pub tcp_flags: [u8; 2],
    /// The initiator is the key's higher endpoint; `None`: the row's first frame's sender.
    pub initiator_hi: Option<bool>,
    /// `last_seen_ns` relative to the setup's clock reading (positive: in the future, as when
    /// another CPU stored a later time than a packet's own reading).
    pub last_seen_offset_ns: i64,
    /// `last_event_ns` relative to the setup's clock reading, like `last_seen_offset_ns`.
    pub last_event_offset_ns: i64,
    /// `created_ns` relative to the setup's clock reading (default: a second ago).
    pub created_offset_ns: i64,
    /// Bytes per direction (default: 100 per packet).
    pub bytes: Option<[u64; 2]>,
    /// TCP sequence state (`tcp_track`, `max_win`, `seq_end`); zero: none, as a replica from
    /// a protocol 1.0 peer.
    pub tcp_window: ([u8; 2], [u16; 2], [u32; 2]),
}

impl Existing {
    /// Defaults: version 7, zone 3, 5 and 4 packets, flags seen SYN|ACK both ways, applied
    /// from a peer when the owner is not the local member. The initiator is the row's first
    /// frame's sender unless told otherwise.
    pub fn new(state: State, owner: MemberId, alive: bool) -> Self {
        let flags = if owner == LOCAL {
            0
        } else {
            SessionFlags::FROM_PEER
        };
        Existing {
            state,
            owner,
            alive,
            version: 7,
            zone: ZoneId(3),
            flags,
            packets: [5, 4],
            tcp_flags: [tcp::SYN | tcp::ACK, tcp::SYN | tcp::ACK],
            initiator_hi: None,
            last_seen_offset_ns: 0,
            last_event_offset_ns: 0,
            created_offset_ns: -1_000_000_000,
            bytes: None,
            tcp_window: Default::default(),
        }
    }

    /// TCP sequence state per direction (original, reply): `tcp_track` bits, the largest
    /// window advertised, the highest sequence end sent.
    pub fn tcp_window(mut self, track: [u8; 2], max_win: [u16; 2], seq_end: [u32; 2]) -> Self {
        self.tcp_window = (track, max_win, seq_end);
        self
    }

    /// Last seen `ns` away from now (negative: in the past).
    pub fn last_seen_offset_ns(mut self, ns: i64) -> Self {
        self.last_seen_offset_ns = ns;
        self
    }

    /// Last event (created, changed or refreshed) `ns` away from now (negative: in the past).
    pub fn last_event_offset_ns(mut self, ns: i64) -> Self {
        self.last_event_offset_ns = ns;
        self
    }

    /// Created `ns` away from now (negative: in the past).
    pub fn created_offset_ns(mut self, ns: i64) -> Self {
        self.created_offset_ns = ns;
        self
    }

    pub fn bytes(mut self, original: u64, reply: u64) -> Self {
        self.bytes = Some([original, reply]);
        self
    }

    pub fn initiator_hi(mut self, hi: bool) -> Self {
        self.initiator_hi = Some(hi);
        self
    }

    /// A session of member 2, alive or not.
    pub fn peer(state: State, alive: bool) -> Self {
        Self::new(state, MemberId(2), alive)
    }

    /// A session of the local member.
    pub fn local(state: State) -> Self {
        Self::new(state, LOCAL, true)
    }

    pub fn version(mut self, v: u32) -> Self {
        self.version = v;
        self
    }

    pub fn tcp_flags(mut self, original: u8, reply: u8) -> Self {
        self.tcp_flags = [original, reply];
        self
    }
}

/// The expected session after the row.
#[derive(Clone, Debug)]
pub struct Expect {
    pub state: State,
    pub owner: MemberId,
    /// `None`: the existing session's zone, else the row's zone (or no zone).
    pub zone: Option<ZoneId>,
    /// `None`: not checked.
    pub version: Option<u32>,
    pub flags: u16,
    pub packets: [u64; 2],
    pub bytes: Option<[u64; 2]>,
    pub tcp_flags: Option<[u8; 2]>,
    /// `None`: not checked.
    pub reply_zone: Option<ZoneId>,
    /// The highest sequence end per direction, and whether it is known (`None`: not checked).
    pub seq_end: Option<[Option<u32>; 2]>,
    /// Whether the row's packets refreshed the session (its last seen within the row's run)
    /// or not (its last seen still the existing session's).
    pub seen: bool,
}

impl Expect {
    /// Owned by the local member, version 1, no flags, one packet in the original direction.
    pub fn new(state: State) -> Self {
        Expect {
            state,
            owner: LOCAL,
            zone: None,
            version: Some(1),
            flags: 0,
            packets: [1, 0],
            bytes: None,
            tcp_flags: None,
            reply_zone: None,
            seq_end: None,
            seen: true,
        }
    }

    /// The row's packets must not have refreshed the session: its last seen is before the
    /// row ran.
    pub fn unseen(mut self) -> Self {
        self.seen = false;
        self
    }

    /// The zone the session's replies are bound to.
    pub fn reply_zone(mut self, z: ZoneId) -> Self {
        self.reply_zone = Some(z);
        self
    }

    pub fn owner(mut self, m: MemberId) -> Self {
        self.owner = m;
        self
    }

    pub fn zone(mut self, z: ZoneId) -> Self {
        self.zone = Some(z);
        self
    }

    pub fn version(mut self, v: u32) -> Self {
        self.version = Some(v);
        self
    }

    /// The version is not checked (see the row's note on why).
    pub fn any_version(mut self) -> Self {
        self.version = None;
        self
    }

    pub fn flags(mut self, f: u16) -> Self {
        self.flags = f;
        self
    }

    pub fn packets(mut self, original: u64, reply: u64) -> Self {
        self.packets = [original, reply];
        self
    }

    pub fn bytes(mut self, original: u64, reply: u64) -> Self {
        self.bytes = Some([original, reply]);
        self
    }

    pub fn tcp_flags(mut self, original: u8, reply: u8) -> Self {
        self.tcp_flags = Some([original, reply]);
        self
    }

    /// The highest sequence end each direction sent, or `None` where it must not be known.
    pub fn seq_end(mut self, original: Option<u32>, reply: Option<u32>) -> Self {
        self.seq_end = Some([original, reply]);
        self
    }
}

/// One fixture: setup, frames with verdicts, expected effect.
#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    policy: Policy,
    malformed: MalformedAction,
    forwarding: Forwarding,
    zone: Option<ZoneBinding>,
    local: MemberId,
    refresh_interval_ns: Option<u64>,
    timeouts: Vec<(State, u64)>,
    existing: Option<Existing>,
    steps: Vec<Step>,
    key: Option<FlowKey>,
    session: Option<Expect>,
    table_size: Option<usize>,
    counters: Vec<(Counter, u64)>,
    events: Vec<EventKind>,
    pending: Option<&'static str>,
}

impl Row {
    pub fn new(name: impl Into<String>) -> Self {
        Row {
            name: name.into(),
            policy: Policy::Strict,
            malformed: MalformedAction::Drop,
            forwarding: Forwarding::Kernel,
            zone: None,
            local: LOCAL,
            refresh_interval_ns: None,
            timeouts: Vec::new(),
            existing: None,
            steps: Vec::new(),
            key: None,
            session: None,
            table_size: None,
            counters: Vec::new(),
            events: Vec::new(),
            pending: None,
        }
    }

    // ----- setup -----

    pub fn policy(mut self, p: Policy) -> Self {
        self.policy = p;
        self
    }

    pub fn malformed(mut self, m: MalformedAction) -> Self {
        self.malformed = m;
        self
    }

    /// Who forwards established sessions. The table's rows stop before the FIB lookup (whose
    /// answer would be the test host's): the netns tests cover what follows it.
    pub fn forwarding(mut self, f: Forwarding) -> Self {
        self.forwarding = f;
        self
    }

    /// Binds the test-run ingress interface to `zone`, routes not checked.
    pub fn zone(mut self, zone: ZoneId) -> Self {
        self.zone = Some(learned(zone));
        self
    }

    /// Binds the test-run ingress interface to `zone`, routes checked: the fixtures run in a
    /// namespace of their own with forwarding off, where the kernel forwards nothing.
    pub fn route_checked_zone(mut self, zone: ZoneId) -> Self {
        self.zone = Some(ZoneBinding::new(zone));
        self
    }

    /// Binds the test-run ingress interface to zone 1 whose `other_protocols` rule is `rule`.
    pub fn other_protocols(mut self, rule: OtherProtocols) -> Self {
        self.zone = Some(ZoneBinding {
            other_protocols: rule as u8,
            ..learned(ZoneId(1))
        });
        self
    }

    /// Runs as `member` (`MemberId::NONE`: an unconfigured datapath).
    pub fn local_member(mut self, member: MemberId) -> Self {
        self.local = member;
        self
    }

    pub fn refresh_interval_ns(mut self, ns: u64) -> Self {
        self.refresh_interval_ns = Some(ns);
        self
    }

    /// Overrides the idle timeout of `state`.
    pub fn timeout_ns(mut self, state: State, ns: u64) -> Self {
        self.timeouts.push((state, ns));
        self
    }

    /// A session present before the first frame, keyed like the row.
    pub fn existing(mut self, e: Existing) -> Self {
        self.existing = Some(e);
        self
    }

    // ----- frames -----

    pub fn frame(mut self, f: Frame, verdict: Verdict) -> Self {
        self.steps.push(Step::Frame(Box::new(f), verdict));
        self
    }

    pub fn pass(self, f: Frame) -> Self {
        self.frame(f, Verdict::Pass)
    }

    pub fn drop(self, f: Frame) -> Self {
        self.frame(f, Verdict::Drop)
    }

    /// Between frames: marks `member` alive or dead.
    pub fn member_alive(mut self, member: MemberId, alive: bool) -> Self {
        self.steps.push(Step::MemberAlive(member, alive));
        self
    }

    /// The frames after this step come in through `zone` (its routes checked as the row's
    /// first zone's are).
    pub fn from_zone(mut self, zone: ZoneId) -> Self {
        let flags = self.zone.map_or(0, |z| z.flags);
        self.steps.push(Step::Zone(ZoneBinding {
            flags,
            ..ZoneBinding::new(zone)
        }));
        self
    }

    // ----- effect -----

    /// The key the row's expectations are about (default: the first frame's).
    pub fn key_of(mut self, f: &Frame) -> Self {
        self.key = Some(f.key());
        self
    }

    /// The session expected under the row's key afterwards.
    pub fn session(mut self, e: Expect) -> Self {
        self.session = Some(e);
        self
    }

    /// The number of sessions in the table afterwards (default: 1 with an expected session,
    /// else 0 — or 1 when an existing session was set up).
    pub fn table_size(mut self, n: usize) -> Self {
        self.table_size = Some(n);
        self
    }

    /// Expected counter deltas. Every counter not listed must not move, except `packets`,
    /// which defaults to the number of frames.
    pub fn counters(mut self, c: &[(Counter, u64)]) -> Self {
        self.counters.extend_from_slice(c);
        self
    }

    /// Expected events, in order, all about the row's key.
    pub fn events(mut self, e: &[EventKind]) -> Self {
        self.events.extend_from_slice(e);
        self
    }

    /// A known bug: the row is expected to fail until the XDP program is fixed, and fails the
    /// run once it passes (so the mark gets removed).
    pub fn pending(mut self, why: &'static str) -> Self {
        self.pending = Some(why);
        self
    }

    fn frames(&self) -> impl Iterator<Item = &Frame> {
        self.steps.iter().filter_map(|s| match s {
            Step::Frame(f, _) => Some(&**f),
            Step::MemberAlive(..) | Step::Zone(_) => None,
        })
    }

    fn row_key(&self) -> Option<FlowKey> {
        self.key
            .or_else(|| self.frames().find(|f| f.proto().is_some()).map(Frame::key))
    }
}

/// Runs every row and panics with a list of all that failed.
pub fn run_rows(rows: &[Row]) {
    let mut names = std::collections::HashSet::new();
    for row in rows {
        assert!(
            names.insert(row.name.as_str()),
            "two rows are named `{}`",
            row.name
        );
    }
    let mut tdp = TestDatapath::load().expect("loading the XDP program for the fixtures");
    let mut failures = Vec::new();
    let mut pending = 0;
    for row in rows {
        let outcome = run_row(&mut tdp, row);
        match (outcome, row.pending) {
            (Ok(()), None) => {}
            (Err(e), None) => failures.push(format!("{e:#}")),
            (Err(e), Some(why)) => {
                pending += 1;
                eprintln!("pending row fails as expected ({why}):\n  {e:#}");
            }
            (Ok(()), Some(why)) => failures.push(format!(
                "row `{}` is marked pending ({why}) but passes: remove the mark",
                row.name
            )),
        }
    }
    eprintln!(
        "{} fixture rows, {} pending, {} failed",
        rows.len(),
        pending,
        failures.len()
    );
    if !failures.is_empty() {
        panic!(
            "{} of {} fixture rows failed:\n\n{}",
            failures.len(),
            rows.len(),
            failures.join("\n\n")
        );
    }
}

fn reset(tdp: &mut TestDatapath, row: &Row) -> Result<()> {
    tdp.clear_sessions()?;
    tdp.clear_fragments()?;
    tdp.drain_events()?;
    let mut cfg = fixture_config();
    cfg.local_member = row.local;
    cfg.policy = row.policy as u8;
    cfg.malformed = row.malformed as u8;
    cfg.forwarding = row.forwarding as u8;
    if let Some(ns) = row.refresh_interval_ns {
        cfg.refresh_interval_ns = ns;
    }
    for &(state, ns) in &row.timeouts {
        cfg.timeouts_ns[state as usize] = ns;
    }
    let dp = tdp.datapath_mut();
    dp.set_config(&cfg)?;
    for m in 1..=MemberId::MAX {
        dp.set_member_alive(MemberId(m), MemberId(m) == row.local)?;
    }
    dp.set_zone(TEST_IFINDEX, row.zone.unwrap_or_default())?;
    Ok(())
}

/// Writes the row's existing session; returns it as written.
fn write_existing(tdp: &mut TestDatapath, key: &FlowKey, e: &Existing) -> Result<Session> {
    let now = tdp.datapath().now_ns()?;
    let Existing {
        state,
        owner,
        alive,
        version,
        zone,
        flags,
        packets,
        tcp_flags,
        initiator_hi,
        last_seen_offset_ns,
        last_event_offset_ns,
        created_offset_ns,
        bytes,
        tcp_window: (tcp_track, max_win, seq_end),
    } = e.clone();
    if owner.is_valid() && owner != LOCAL {
        tdp.datapath_mut().set_member_alive(owner, alive)?;
    }
    let session = Session {
        created_ns: now.saturating_add_signed(created_offset_ns),
        last_seen_ns: now.saturating_add_signed(last_seen_offset_ns),
        last_event_ns: now.saturating_add_signed(last_event_offset_ns),
        packets,
        bytes: bytes.unwrap_or([packets[0] * 100, packets[1] * 100]),
        version,
        zone,
        flags: SessionFlags(
            flags
                | if initiator_hi == Some(true) {
                    SessionFlags::INITIATOR_HI
                } else {
                    0
                },
        ),
        owner,
        state: state as u8,
        tcp_flags,
        ticket: 0,
        reply_zone: ZoneId::NONE,
        tcp_track,
        max_win,
        seq_end,
    };
    tdp.insert_sessions(&[(*key, session)])?;
    Ok(session)
}

fn run_row(tdp: &mut TestDatapath, row: &Row) -> Result<()> {
    let name = &row.name;
    reset(tdp, row).with_context(|| format!("row `{name}`: reset"))?;
    // The session clock as the program reads it: rows compare its times exactly.
    let start = tdp.datapath().now_ns()?;
    let key = row.row_key();
    let mut written = None;
    if let Some(e) = &row.existing {
        let key = key.with_context(|| format!("row `{name}`: an existing session needs a key"))?;
        let mut e = e.clone();
        if e.initiator_hi.is_none() {
            e.initiator_hi = row.frames().next().map(|f| f.key_and_side().1);
        }
        let s = write_existing(tdp, &key, &e).with_context(|| format!("row `{name}`: setup"))?;
        written = Some(s);
    }
    let before = tdp.counters()?;
    let mut errors = Vec::new();
    let mut index = 0;
    let mut frames = 0u64;
    for step in &row.steps {
        match step {
            Step::MemberAlive(m, alive) => tdp.datapath_mut().set_member_alive(*m, *alive)?,
            Step::Zone(z) => tdp.datapath_mut().set_zone(TEST_IFINDEX, *z)?,
            Step::Frame(f, want) => {
                let bytes = f.build();
                let got = tdp
                    .run(&bytes)
                    .with_context(|| format!("row `{name}`, frame #{index}: test run"))?;
                if got != *want {
                    errors.push(format!("frame #{index}: verdict {got}, expected {want}"));
                }
                index += 1;
                frames += 1;
            }
        }
    }
    let end = tdp.datapath().now_ns()?;
    let delta = CounterDelta {
        before,
        after: tdp.counters()?,
    };
    check_counters(row, frames, &delta, &mut errors);
    check_table(tdp, row, key, written, (start, end), &mut errors)?;
    check_events(tdp, row, key, &mut errors)?;
    if errors.is_empty() {
        return Ok(());
    }
    let mut msg = format!("row `{name}` ({frames} frames):");
    for e in errors {
        let _ = write!(msg, "\n  - {e}");
    }
    let _ = write!(msg, "\n  counters moved: {delta}");
    Err(anyhow::anyhow!(msg))
}

fn check_counters(row: &Row, frames: u64, delta: &CounterDelta, errors: &mut Vec<String>) {
    for &c in Counter::ALL {
        let listed = row.counters.iter().find(|(k, _)| *k == c).map(|&(_, v)| v);
        let want = match (c, listed) {
            (_, Some(v)) => v,
            (Counter::Packets, None) => frames,
            (_, None) => 0,
        };
        let got = delta.get(c);
        if got != want {
            errors.push(format!("counter {}: +{got}, expected +{want}", c.name()));
        }
    }
}

fn check_table(
    tdp: &mut TestDatapath,
    row: &Row,
    key: Option<FlowKey>,
    written: Option<Session>,
    run: (u64, u64),
    errors: &mut Vec<String>,
) -> Result<()> {
    let held = tdp.sessions()?.len();
    let want_size = row
        .table_size
        .unwrap_or(usize::from(row.session.is_some() || row.existing.is_some()));
    if held != want_size {
        errors.push(format!("table holds {held} sessions, expected {want_size}"));
    }
    let Some(key) = key else {
        return Ok(());
    };
    let got = tdp.session(&key)?;
    if let Some((want, got)) = session_to_compare(row, got, written, errors) {
        check_session(row, want, &got, run, errors);
    }
    Ok(())
}

/// The row's expected session and the one under its key, when there are both; otherwise
/// records what is wrong with what is there (or is not): a row without an expected session
/// must leave its existing one untouched, and create none.
fn session_to_compare<'r>(
    row: &'r Row,
    got: Option<Session>,
    written: Option<Session>,
    errors: &mut Vec<String>,
) -> Option<(&'r Expect, Session)> {
    match (&row.session, got) {
        (None, None) => {}
        (None, Some(s)) if written.is_some() => {
            if Some(s) != written {
                errors.push(format!(
                    "the existing session changed: {} (was {})",
                    show(&s),
                    written.as_ref().map(show).unwrap_or_default()
                ));
            }
        }
        (None, Some(s)) => errors.push(format!("a session exists: {}", show(&s))),
        (Some(_), None) => errors.push("no session under the row's key".to_string()),
        (Some(want), Some(got)) => return Some((want, got)),
    }
    None
}

/// Records "session WHAT: GOT, expected WANT" unless `got == want`, both shown by `show`.
fn same<T: PartialEq>(
    errors: &mut Vec<String>,
    what: &str,
    (got, want): (T, T),
    show: impl Fn(&T) -> String,
) {
    if got != want {
        errors.push(format!(
            "session {what}: {}, expected {}",
            show(&got),
            show(&want)
        ));
    }
}

fn debug<T: std::fmt::Debug>(v: &T) -> String {
    format!("{v:?}")
}

/// Compares every field of `got` that `want` has an expectation for; `start..=end` is when
/// the row ran.
fn check_session(
    row: &Row,
    want: &Expect,
    got: &Session,
    (start, end): (u64, u64),
    errors: &mut Vec<String>,
) {
    let Session {
        created_ns,
        last_seen_ns,
        last_event_ns: _,
        packets,
        bytes,
        version,
        zone,
        flags,
        owner,
        state,
        tcp_flags,
        ticket: _,
        reply_zone,
        tcp_track,
        max_win: _,
        seq_end,
    } = *got;
    let Expect {
        state: want_state,
        owner: want_owner,
        zone: want_zone,
        version: want_version,
        flags: want_flags,
        packets: want_packets,
        bytes: want_bytes,
        tcp_flags: want_tcp_flags,
        reply_zone: want_reply_zone,
        seq_end: want_seq_end,
        seen,
    } = want.clone();
    let want_zone = want_zone.unwrap_or(match &row.existing {
        Some(e) => e.zone,
        None => row.zone.map_or(ZoneId::NONE, |z| z.zone),
    });
    let state_name =
        |s: &u8| State::from_u8(*s).map_or(format!("invalid state {s}"), |s| s.name().to_string());
    same(errors, "state", (state, want_state as u8), state_name);
    same(errors, "owner", (owner.0, want_owner.0), u8::to_string);
    same(errors, "zone", (zone.0, want_zone.0), u16::to_string);
    if let Some(v) = want_version {
        same(errors, "version", (version, v), u32::to_string);
    }
    same(errors, "flags", (flags.0, want_flags), |f| {
        format!("{f:#06x}")
    });
    same(errors, "packets", (packets, want_packets), debug);
    if let Some(b) = want_bytes {
        same(errors, "bytes", (bytes, b), debug);
    }
    for d in 0..2 {
        if (packets[d] == 0) != (bytes[d] == 0) {
            errors.push(format!(
                "session bytes/packets: {packets:?} packets, {bytes:?} bytes, expected bytes exactly where packets were counted"
            ));
        }
    }
    if let Some(f) = want_tcp_flags {
        same(errors, "tcp flags", (tcp_flags, f), |f| hex2(*f));
    }
    if let Some(z) = want_reply_zone {
        same(errors, "reply zone", (reply_zone.0, z.0), u16::to_string);
    }
    if let Some(want) = want_seq_end {
        let got = [0, 1].map(|d| (tcp_track[d] & track::KNOWN != 0).then_some(seq_end[d]));
        same(errors, "seq end", (got, want), debug);
    }
    if !seen {
        if last_seen_ns >= start {
            errors.push(format!(
                "session last seen {last_seen_ns}, expected it unchanged (before the row's run from {start})"
            ));
        }
    } else if !(start..=end).contains(&last_seen_ns) || created_ns > last_seen_ns {
        errors.push(format!(
            "session last seen: created {created_ns}, last seen {last_seen_ns}, expected last seen within the row's run {start}..={end}"
        ));
    }
}

fn check_events(
    tdp: &mut TestDatapath,
    row: &Row,
    key: Option<FlowKey>,
    errors: &mut Vec<String>,
) -> Result<()> {
    let events = tdp.drain_events()?;
    let kinds: Vec<_> = events.iter().map(|e| EventKind::from_u8(e.kind)).collect();
    let want: Vec<_> = row.events.iter().copied().map(Some).collect();
    if kinds != want {
        let name = |k: &Option<EventKind>| k.map_or("invalid", EventKind::name);
        errors.push(format!(
            "events [{}], expected [{}]",
            kinds.iter().map(name).collect::<Vec<_>>().join(", "),
            want.iter().map(name).collect::<Vec<_>>().join(", ")
        ));
    }
    // Rows about several sessions (table size > 1) have events about several keys.
    let one_key = row.table_size.unwrap_or(1) <= 1;
    if let (Some(key), true) = (key, one_key) {
        for (i, e) in events.iter().enumerate() {
            if e.key != key {
                errors.push(format!("event #{i} is about another key: {:?}", e.key));
            }
        }
    }
    // The last event carries the session as it is now, unless a later packet changed it
    // silently (asymmetric or plain hits).
    if let (Some(last), Some(key), true) = (events.last(), key, one_key) {
        if let Some(now) = tdp.session(&key)? {
            if last.session.state != now.state || last.session.owner != now.owner {
                errors.push(format!(
                    "last event's snapshot ({}) disagrees with the table ({})",
                    show(&last.session),
                    show(&now)
                ));
            }
        }
    }
    Ok(())
}

/// A one-line summary of a session.
pub fn show(s: &Session) -> String {
    let state = State::from_u8(s.state).map_or("invalid", State::name);
    format!(
        "{state} owner {} zone {} version {} flags {:#06x} packets {:?} tcp flags {}",
        s.owner.0,
        s.zone.0,
        s.version,
        s.flags.0,
        s.packets,
        hex2(s.tcp_flags)
    )
}

fn hex2([a, b]: [u8; 2]) -> String {
    format!("[{a:#04x}, {b:#04x}]")
}
