//! `xdp_parser`: frames through the product XDP program with `BPF_PROG_TEST_RUN` (needs
//! root). No frame may end in `XDP_ABORTED`, and the counters must stay consistent: every
//! frame counts one packet and exactly one outcome, every malformed reason comes with one
//! pass-or-drop, a drop verdict comes with a drop counter, and the events in the ring buffer
//! are the events counted.
//!
//! An input is a setup byte then up to [`MAX_FRAMES`] frames, each behind a two-byte
//! big-endian length. Each input starts from an empty session table, so a crash replays
//! alone; frames of one input share the table (a SYN, then its SYN-ACK hits the session).

use anyhow::{ensure, Context as _, Result};
use hasync_common::{Counter, MalformedAction, MemberId, Policy};

use crate::{
    frame::refill_frame_ipv4_checksum,
    testrun::{fixture_config, CounterDelta, TestDatapath, Verdict, LOCAL},
};

/// The target's cargo-fuzz name and corpus directory.
pub const NAME: &str = "xdp_parser";
/// Frames per input.
pub const MAX_FRAMES: usize = 8;
/// `BPF_PROG_TEST_RUN` refuses frames shorter than an Ethernet header. Inputs stay within what
/// fits in one page with XDP's head- and tailroom, as the fast path's frames do on links of the
/// usual MTUs: past it, kernels since 5.18 lay a frame out in page fragments.
const FRAME_LEN: std::ops::RangeInclusive<usize> = 14..=3_000;
/// The member that takes the sessions over in a hand-over input.
const OTHER: MemberId = MemberId(2);

/// Counters of which every frame moves exactly one.
const OUTCOMES: &[Counter] = &[
    Counter::Hits,
    Counter::Creates,
    Counter::CreateFailed,
    Counter::DropTableFull,
    Counter::PassTableFull,
    Counter::IcmpErrorRelated,
    Counter::DropIcmpErrorUnrelated,
    Counter::PassIcmpErrorUnrelated,
    Counter::PassNoSessionLoose,
    Counter::DropNoSession,
    Counter::PassToThisHost,
    Counter::PassUntracked,
    Counter::PassOtherProtocol,
    Counter::DropOtherProtocol,
    Counter::PassNonIp,
    Counter::PassOtherEthertype,
    Counter::PassFragment,
    Counter::DropFragmentUnseenFirst,
    Counter::PassFragmentUnseenFirst,
    Counter::PassMalformed,
    Counter::DropMalformed,
    Counter::PassUnconfigured,
    Counter::DropReversePath,
    Counter::PassReversePath,
    Counter::DropHairpin,
    Counter::PassHairpin,
];

/// What the first byte of an input selects.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    pub loose: bool,
    pub malformed_pass: bool,
    /// After the first frame, member 2 becomes the local member: later frames hit sessions
    /// member 1 owns (asymmetric while it is alive, taken over when not).
    pub hand_over: bool,
    /// Member 1 stays alive through a hand-over.
    pub owner_alive: bool,
    /// IPv4 header checksums stay as the input has them. Otherwise each frame's is computed
    /// again before it runs: the program drops a header that fails it, and libFuzzer, which
    /// sees no coverage inside the program, would never mend one after a mutation.
    pub raw_ipv4_checksum: bool,
}

impl Setup {
    pub fn from_byte(b: u8) -> Setup {
        Setup {
            loose: b & 1 != 0,
            malformed_pass: b & 2 != 0,
            hand_over: b & 4 != 0,
            owner_alive: b & 8 != 0,
            raw_ipv4_checksum: b & 16 != 0,
        }
    }

    pub fn to_byte(self) -> u8 {
        u8::from(self.loose)
            | u8::from(self.malformed_pass) << 1
            | u8::from(self.hand_over) << 2
            | u8::from(self.owner_alive) << 3
            | u8::from(self.raw_ipv4_checksum) << 4
    }
}

/// `setup` and `frames` as one input (the inverse of [`split`]).
pub fn input(setup: Setup, frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![setup.to_byte()];
    for f in frames {
        let len = u16::try_from(f.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&f[..usize::from(len)]);
    }
    out
}

/// The setup and frames of an input; a length running past the end takes what is left.
pub fn split(data: &[u8]) -> Option<(Setup, Vec<&[u8]>)> {
    let (&first, mut rest) = data.split_first()?;
    let mut frames = Vec::new();
    while frames.len() < MAX_FRAMES {
        let Some((len, tail)) = rest.split_first_chunk::<2>() else {
            break;
        };
        let n = usize::from(u16::from_be_bytes(*len)).min(tail.len());
        let (frame, tail) = tail.split_at(n);
        frames.push(frame);
        rest = tail;
    }
    Some((Setup::from_byte(first), frames))
}

/// A loaded datapath that inputs run through, one after the other.
pub struct XdpFuzz {
    tdp: TestDatapath,
}

impl XdpFuzz {
    pub fn load() -> Result<XdpFuzz> {
        Ok(XdpFuzz {
            tdp: TestDatapath::load()?,
        })
    }

    /// Runs one input and checks every frame's verdict and counters.
    pub fn check(&mut self, data: &[u8]) -> Result<()> {
        self.check_observed(data, |_, _| {})
    }

    /// [`Self::check`], showing `observe` each frame's position and counter changes (the fuzz
    /// target turns them into coverage: libFuzzer cannot see inside the XDP program).
    pub fn check_observed(
        &mut self,
        data: &[u8],
        mut observe: impl FnMut(usize, &CounterDelta),
    ) -> Result<()> {
        let Some((setup, frames)) = split(data) else {
            return Ok(());
        };
        self.reset(setup)?;
        let mut before = self.tdp.counters()?;
        let mut events = 0;
        let runnable = frames.iter().filter(|f| FRAME_LEN.contains(&f.len()));
        for (i, frame) in runnable.enumerate() {
            if i == 1 && setup.hand_over {
                self.hand_over(setup)?;
            }
            let mut frame = frame.to_vec();
            if !setup.raw_ipv4_checksum {
                refill_frame_ipv4_checksum(&mut frame);
            }
            let verdict = self.tdp.run(&frame)?;
            let after = self.tdp.counters()?;
            let delta = CounterDelta { before, after };
            check_frame(verdict, &delta).with_context(|| {
                format!(
                    "frame {i} ({} bytes, {setup:?}): {verdict}, {delta}",
                    frame.len()
                )
            })?;
            observe(i, &delta);
            events += delta.get(Counter::Events);
            before = delta.after;
        }
        let drained = self.tdp.drain_events()?.len() as u64;
        ensure!(
            drained == events,
            "{events} events counted, {drained} queued"
        );
        Ok(())
    }

    /// An empty table, no queued events, the setup's policy, member 1 local and alive.
    fn reset(&mut self, setup: Setup) -> Result<()> {
        self.tdp.clear_sessions()?;
        self.tdp.clear_fragments()?;
        self.tdp.drain_events()?;
        let mut cfg = fixture_config();
        let policy = if setup.loose {
            Policy::Loose
        } else {
            Policy::Strict
        };
        let malformed = if setup.malformed_pass {
            MalformedAction::Pass
        } else {
            MalformedAction::Drop
        };
        cfg.policy = policy as u8;
        cfg.malformed = malformed as u8;
        let dp = self.tdp.datapath_mut();
        dp.set_config(&cfg)?;
        dp.set_member_alive(LOCAL, true)?;
        dp.set_member_alive(OTHER, true)?;
        Ok(())
    }

    /// Member 2 becomes the local member; member 1 lives on or not.
    fn hand_over(&mut self, setup: Setup) -> Result<()> {
        let dp = self.tdp.datapath_mut();
        let mut cfg = dp.config()?;
        cfg.local_member = OTHER;
        dp.set_config(&cfg)?;
        dp.set_member_alive(LOCAL, setup.owner_alive)?;
        Ok(())
    }
}

/// The invariants of one frame's verdict and counter changes.
pub fn check_frame(verdict: Verdict, d: &CounterDelta) -> Result<()> {
    ensure!(verdict != Verdict::Aborted, "XDP_ABORTED");
    ensure!(
        matches!(verdict, Verdict::Pass | Verdict::Drop),
        "the program only passes or drops"
    );
    for (c, n) in d.nonzero() {
        ensure!(n == 1, "{} moved by {n} for one frame", c.name());
    }
    ensure!(d.get(Counter::Packets) == 1, "packets did not count it");
    let outcomes: u64 = OUTCOMES.iter().map(|&c| d.get(c)).sum();
    ensure!(outcomes == 1, "{outcomes} outcome counters moved");
    let malformed = d.get(Counter::PassMalformed) + d.get(Counter::DropMalformed);
    let reasons: u64 = Counter::ALL
        .iter()
        .filter(|c| c.name().starts_with("err-"))
        .map(|&c| d.get(c))
        .sum();
    ensure!(
        reasons == malformed,
        "{reasons} malformed reasons, {malformed} pass/drop"
    );
    let drops = [
        Counter::DropMalformed,
        Counter::DropNoSession,
        Counter::DropTableFull,
        Counter::DropIcmpErrorUnrelated,
        Counter::DropFragmentUnseenFirst,
        Counter::DropOtherProtocol,
        Counter::DropZoneMismatch,
        Counter::DropTcpOutOfWindow,
        Counter::DropReversePath,
        Counter::DropHairpin,
    ]
    .iter()
    .map(|&c| d.get(c))
    .sum::<u64>();
    // A failed insert (other than a full table) is passed or dropped by the policy.
    let create_failed = d.get(Counter::CreateFailed) == 1;
    ensure!(
        create_failed || (verdict == Verdict::Drop) == (drops == 1),
        "{drops} drop counters for {verdict}"
    );
    check_session_counters(d)
}

/// Session-level counters follow the outcome: creates and take-overs are announced, events
/// come only from sessions, state changes only from hits.
fn check_session_counters(d: &CounterDelta) -> Result<()> {
    let hits = d.get(Counter::Hits);
    let creates = d.get(Counter::Creates);
    let emitted = d.get(Counter::Events) + d.get(Counter::RingbufFull);
    ensure!(
        creates + d.get(Counter::Takeovers) <= emitted,
        "a create or take-over went unannounced"
    );
    ensure!(emitted <= creates + hits, "an event without a session");
    ensure!(
        d.get(Counter::Asymmetric) + d.get(Counter::Takeovers) <= hits,
        "asymmetric or take-over without a hit"
    );
    ensure!(
        d.get(Counter::Closed) <= d.get(Counter::StateChanges)
            && d.get(Counter::StateChanges) <= hits,
        "a state change without a hit"
    );
    ensure!(
        d.get(Counter::Expired) + hits <= 1,
        "a session both expired and hit"
    );
    Ok(())
}
