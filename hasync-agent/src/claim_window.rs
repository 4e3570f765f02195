//! When records may hand live sessions to another owner by version alone: for a while after a
//! peer became alive here (a partition healed, a stop or a restart ended, this agent started),
//! or after this agent ran again from a stall its peers may have taken for its death
//! ([`ClaimWindow::stalled`]).
//! Otherwise a record that names its sender the owner of a session a live member owns
//! replaces it only once the flow is quiet ([`hasync_common::conflict::claimable`]); but after
//! a partition both sides took over what moved to them, both sides' owners are alive and their
//! flows live, and only the version can settle them, as it did before the rule. The window is
//! [`hasync_common::DatapathConfig::claims_open`] set in the datapath's config. A
//! return cannot be told from a peer that reports itself gone and back (a death by its
//! reported state comes without a keepalive threshold of silence; one by silence is declared
//! only after it, so the silence before a partition's heal may be short of a second threshold):
//! such a peer opens the window too.

use std::time::{Duration, Instant};

use hasync_common::{config::CLAIMS_OPEN_AFTER_RETURN_MS, MemberId};

/// Whether the window is open, and until when.
#[derive(Debug, Default)]
pub struct ClaimWindow {
    open_until: Option<Instant>,
    /// What the datapath was last told (it starts closed: `claims_open` 0).
    open: bool,
}

impl ClaimWindow {
    /// Takes the liveness `changes` evaluated at `now` (a peer that became alive opens the
    /// window for a minute). Returns whether the window should be open when that differs from
    /// what the datapath was last told ([`ClaimWindow::written`]), else `None`.
    pub fn due(&mut self, changes: &[(MemberId, bool)], now: Instant) -> Option<bool> {
        if changes.iter().any(|&(_, alive)| alive) {
            self.open_from(now);
        }
        let open = self.open_until.is_some_and(|until| now < until);
        (open != self.open).then_some(open)
    }

    /// This agent did not run for about a keepalive threshold or longer (SIGSTOP, a paused VM;
    /// a keepalive interval short of it counts, the peers' silence being that much longer): its
    /// peers took it for dead and may have taken its sessions over, while here they stayed
    /// its own (the peers' silence over the stall is forgiven, so none comes back here).
    /// Their records of those sessions settle by version, as on their side, where this
    /// member's return opened the window; before, they were refused here as claims of live
    /// sessions, and both members owned the flow for as long as it lived. (Records applied
    /// before the evaluation that sees the stall are refused still; a live flow's next
    /// record, at its next refresh, settles it.)
    pub fn stalled(&mut self, now: Instant) {
        self.open_from(now);
    }

    fn open_from(&mut self, now: Instant) {
        self.open_until = Some(now + Duration::from_millis(CLAIMS_OPEN_AFTER_RETURN_MS));
    }

    /// The datapath now has the window `open` (a failed write is asked for again).
    pub fn written(&mut self, open: bool) {
        self.open = open;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A return opens the window for a minute; a second return keeps it open a minute from
    /// then; a death opens nothing; the window is asked for until it is written.
    #[test]
    fn a_return_opens_the_window_for_a_minute() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let (p, q) = (MemberId(2), MemberId(3));
        let mut w = ClaimWindow::default();
        assert_eq!(w.due(&[], at(0)), None, "closed at start");
        assert_eq!(w.due(&[(p, false)], at(1)), None, "a death opens nothing");
        assert_eq!(w.due(&[(p, true)], at(2)), Some(true));
        assert_eq!(w.due(&[], at(3)), Some(true), "asked again until written");
        w.written(true);
        assert_eq!(
            w.due(&[(q, true)], at(50)),
            None,
            "still open, a minute from now"
        );
        assert_eq!(w.due(&[], at(100)), None);
        assert_eq!(w.due(&[], at(110)), Some(false));
        w.written(false);
        assert_eq!(w.due(&[], at(200)), None);
    }
}
