//! When records may hand live sessions to another owner by version alone: for a while after a
//! peer that had been gone for a keepalive threshold or more became alive here again (a
//! partition healed, a stop or a restart ended), and after this agent's start. Otherwise a
//! record that names its sender the owner of a session a live member owns replaces it only
//! once the flow is quiet ([`hasync_common::conflict::claimable`]); but after a partition both
//! sides took over what moved to them, both sides' owners are alive and their flows live, and
//! only the version can settle them, as it did before the rule. The window is the datapath's
//! quiet time set to 0 ([`hasync_common::DatapathConfig::claim_quiet_ms`]). A peer that is
//! gone for less than the threshold (a flap of its reported state) opens nothing: a genuine
//! takeover of its sessions needed it gone that long.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use hasync_common::{config::CLAIMS_OPEN_AFTER_RETURN_MS, MemberId};

/// Whether the window is open, and until when.
#[derive(Debug, Default)]
pub struct ClaimWindow {
    open_until: Option<Instant>,
    /// What the datapath was last told (it starts closed: the configured quiet time).
    open: bool,
    /// When each peer was last seen to go (absent: not since this agent started).
    gone_at: BTreeMap<MemberId, Instant>,
}

impl ClaimWindow {
    /// Takes the liveness `changes` evaluated at `now` (a peer back after being gone for at
    /// least `threshold`, or for the first time since this agent started, opens the window for
    /// a minute). Returns whether the window should be open when that differs from what the
    /// datapath was last told ([`ClaimWindow::written`]), else `None`.
    pub fn due(
        &mut self,
        changes: &[(MemberId, bool)],
        threshold: Duration,
        now: Instant,
    ) -> Option<bool> {
        for &(id, alive) in changes {
            if !alive {
                self.gone_at.insert(id, now);
                continue;
            }
            let gone_at = self.gone_at.remove(&id);
            if gone_at.is_none_or(|at| now.saturating_duration_since(at) >= threshold) {
                self.open_until = Some(now + Duration::from_millis(CLAIMS_OPEN_AFTER_RETURN_MS));
            }
        }
        let open = self.open_until.is_some_and(|until| now < until);
        (open != self.open).then_some(open)
    }

    /// The datapath now has the window `open` (a failed write is asked for again).
    pub fn written(&mut self, open: bool) {
        self.open = open;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THRESHOLD: Duration = Duration::from_secs(10);

    /// A first return opens the window for a minute; a peer gone for the threshold or more
    /// opens it again, a minute from its return; one gone for less (a flap) opens nothing; the
    /// window is asked for until it is written.
    #[test]
    fn a_return_after_the_threshold_opens_the_window_for_a_minute() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let (p, q) = (MemberId(2), MemberId(3));
        let mut w = ClaimWindow::default();
        assert_eq!(w.due(&[], THRESHOLD, at(0)), None, "closed at start");
        assert_eq!(
            w.due(&[(p, true)], THRESHOLD, at(1)),
            Some(true),
            "first heard"
        );
        assert_eq!(
            w.due(&[], THRESHOLD, at(2)),
            Some(true),
            "asked again until written"
        );
        w.written(true);
        assert_eq!(w.due(&[], THRESHOLD, at(30)), None);
        assert_eq!(w.due(&[], THRESHOLD, at(61)), Some(false));
        w.written(false);
        assert_eq!(w.due(&[(q, true)], THRESHOLD, at(62)), Some(true));
        w.written(true);
        assert_eq!(w.due(&[], THRESHOLD, at(122)), Some(false));
        w.written(false);
        // A flap: gone for 5 s.
        assert_eq!(w.due(&[(p, false)], THRESHOLD, at(200)), None);
        assert_eq!(
            w.due(&[(p, true)], THRESHOLD, at(205)),
            None,
            "a flap opens nothing"
        );
        // A partition: gone for 12 s.
        assert_eq!(w.due(&[(p, false)], THRESHOLD, at(300)), None);
        assert_eq!(w.due(&[(p, true)], THRESHOLD, at(312)), Some(true));
    }
}
