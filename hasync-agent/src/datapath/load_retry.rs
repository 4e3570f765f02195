//! Loading a program again when the verifier gave up because a signal arrived.
//!
//! The kernel's verifier stops with EAGAIN when a signal is pending on the loading thread
//! (a child's SIGCHLD under tokio's handler, the service manager's SIGHUP): the program is
//! fine, the load was only interrupted. libbpf loads again in that case; aya does not, and
//! a failed load leaves the program unloaded, so it may be loaded again.

use aya::programs::ProgramError;

/// Loads tried in all before an interrupted load is reported: a signal storm that outlasts
/// them is not a verifier's passing interruption.
pub const ATTEMPTS: u32 = 5;

/// Runs `load` until it succeeds, fails for another reason than an interruption, or has
/// been interrupted [`ATTEMPTS`] times (the last error is returned).
pub fn retrying<T>(mut load: impl FnMut() -> Result<T, ProgramError>) -> Result<T, ProgramError> {
    let mut tried = 1;
    loop {
        match load() {
            Err(e) if interrupted(&e) && tried < ATTEMPTS => tried += 1,
            done => return done,
        }
    }
}

/// Whether the verifier gave up because a signal was pending.
fn interrupted(e: &ProgramError) -> bool {
    matches!(e, ProgramError::LoadError { io_error, .. }
        if io_error.raw_os_error() == Some(libc::EAGAIN))
}

#[cfg(test)]
mod tests {
    use std::io;

    use aya_obj::VerifierLog;

    use super::*;

    fn load_error(errno: i32) -> ProgramError {
        ProgramError::LoadError {
            io_error: io::Error::from_raw_os_error(errno),
            verifier_log: VerifierLog::new(String::new()),
        }
    }

    /// An interrupted load is tried again and its success returned.
    #[test]
    fn an_interrupted_load_is_tried_again() {
        let mut calls = 0;
        let loaded = retrying(|| {
            calls += 1;
            if calls < 3 {
                Err(load_error(libc::EAGAIN))
            } else {
                Ok(calls)
            }
        });
        assert_eq!(loaded.expect("loaded on the third try"), 3);
    }

    /// A verifier's refusal is reported at once; interruptions only up to the bound.
    #[test]
    fn a_refusal_is_reported_at_once_and_interruptions_are_bounded() {
        let mut calls = 0;
        let refused = retrying::<()>(|| {
            calls += 1;
            Err(load_error(libc::EACCES))
        });
        assert!(matches!(refused, Err(ProgramError::LoadError { .. })));
        assert_eq!(calls, 1);
        calls = 0;
        let interrupted = retrying::<()>(|| {
            calls += 1;
            Err(load_error(libc::EAGAIN))
        });
        assert!(
            matches!(interrupted, Err(ProgramError::LoadError { io_error, .. })
            if io_error.raw_os_error() == Some(libc::EAGAIN))
        );
        assert_eq!(calls, ATTEMPTS);
    }
}
