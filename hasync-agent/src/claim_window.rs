//! When records may hand live sessions to another owner by version alone: for a while after a
//! peer became alive here (a partition healed, a stop or a restart ended). Otherwise a record
//! that names its sender the owner of a session a live member owns replaces it only once the
//! flow is quiet ([`hasync_common::conflict::claimable`]); but after a partition both sides
//! took over what moved to them, both sides' owners are alive and their flows live, and only
//! the version can settle them, as it did before the rule. The window is the datapath's quiet
//! time set to 0 ([`hasync_common::DatapathConfig::claim_quiet_ms`]).

use std::time::{Duration, Instant};

use hasync_common::config::CLAIMS_OPEN_AFTER_RETURN_MS;

/// Whether the window is open, and until when.
#[derive(Debug, Default)]
pub struct ClaimWindow {
    open_until: Option<Instant>,
    /// What the datapath was last told (it starts closed: the configured quiet time).
    open: bool,
}

impl ClaimWindow {
    /// `returned`: some peer became alive here at `now`. Returns whether the window is open
    /// when that changed (the datapath's quiet time is to be written), else `None`.
    pub fn update(&mut self, returned: bool, now: Instant) -> Option<bool> {
        if returned {
            self.open_until = Some(now + Duration::from_millis(CLAIMS_OPEN_AFTER_RETURN_MS));
        }
        let open = self.open_until.is_some_and(|until| now < until);
        (open != self.open).then(|| {
            self.open = open;
            open
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A return opens the window for a minute; a second return keeps it open a minute from
    /// then; it closes once, and says each change once.
    #[test]
    fn a_return_opens_the_window_for_a_minute() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = ClaimWindow::default();
        assert_eq!(w.update(false, at(0)), None, "closed at start");
        assert_eq!(w.update(true, at(1)), Some(true));
        assert_eq!(w.update(false, at(30)), None);
        assert_eq!(
            w.update(true, at(50)),
            None,
            "still open, a minute from now"
        );
        assert_eq!(w.update(false, at(100)), None);
        assert_eq!(w.update(false, at(110)), Some(false));
        assert_eq!(w.update(false, at(200)), None);
    }
}
