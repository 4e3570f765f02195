//! Loading a program without the verifier giving up because a signal arrived.
//!
//! The kernel's verifier stops with EAGAIN when a signal is pending on the loading thread
//! (a child's SIGCHLD under tokio's handler, the service manager's SIGHUP): the program is
//! fine, the load was only interrupted. The loading thread blocks every signal it may while
//! it loads (one sent to the process goes to another thread, or waits), and an interrupted
//! load is tried again all the same, as libbpf does (aya does not; a failed load leaves the
//! program unloaded, so it may be loaded again).

use aya::programs::ProgramError;

/// Loads tried in all before an interrupted load is reported.
pub const ATTEMPTS: u32 = 5;

/// Runs `load` with the thread's signals blocked until it succeeds, fails for another reason
/// than an interruption, or has been interrupted [`ATTEMPTS`] times (the last error is
/// returned).
pub fn retrying<T>(mut load: impl FnMut() -> Result<T, ProgramError>) -> Result<T, ProgramError> {
    let _held = SignalsHeld::new();
    let mut tried = 1;
    loop {
        match load() {
            Err(e) if interrupted(&e) && tried < ATTEMPTS => tried += 1,
            done => return done,
        }
    }
}

/// Signals a thread raises itself on a fault: never blocked (the kernel would kill the process
/// with no word, past Rust's own handler for a stack overflow).
const FAULTS: [libc::c_int; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGFPE,
    libc::SIGILL,
    libc::SIGTRAP,
];

/// The calling thread's signals blocked (all it may block but [`FAULTS`]) until dropped, when
/// its own mask is put back; a signal that came meanwhile is delivered then.
struct SignalsHeld {
    old: Option<libc::sigset_t>,
}

impl SignalsHeld {
    fn new() -> SignalsHeld {
        // SAFETY: sigfillset and pthread_sigmask write only the sets given, which live here;
        // a zeroed sigset_t is a valid value to start from.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            for fault in FAULTS {
                libc::sigdelset(&mut all, fault);
            }
            let held = libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old) == 0;
            SignalsHeld {
                old: held.then_some(old),
            }
        }
    }
}

impl Drop for SignalsHeld {
    fn drop(&mut self) {
        if let Some(old) = &self.old {
            // SAFETY: `old` is the mask pthread_sigmask returned for this thread.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
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

    /// The datapath loads while its thread is sent a signal every 100 µs (a handler
    /// installed, as tokio's is for SIGCHLD): each pending signal made the verifier give up
    /// with EAGAIN (seen failing with the signals left unblocked: "Resource temporarily
    /// unavailable" after five loads). Needs root, as every test that loads the datapath.
    #[test]
    fn the_datapath_loads_under_a_storm_of_signals() {
        use std::sync::{
            atomic::{AtomicBool, Ordering::Relaxed},
            Arc,
        };

        use crate::datapath::{Datapath, DatapathOptions};
        use hasync_common::{DatapathConfig, MemberId};

        extern "C" fn ignore(_: libc::c_int) {}
        // SAFETY: installs a handler that does nothing for SIGUSR2, which nothing else in the
        // tests uses; the sigaction struct is fully initialised.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            assert_eq!(
                libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut()),
                0
            );
        }
        /// Stops the sender and waits for it, also when the load panics: it must never signal
        /// this thread's `pthread_t` after the thread is gone (another may have it then).
        struct Sender {
            done: Arc<AtomicBool>,
            thread: Option<std::thread::JoinHandle<u64>>,
        }
        impl Sender {
            fn stop(&mut self) -> u64 {
                self.done.store(true, Relaxed);
                self.thread
                    .take()
                    .map_or(0, |t| t.join().expect("the sender"))
            }
        }
        impl Drop for Sender {
            fn drop(&mut self) {
                self.stop();
            }
        }
        let done = Arc::new(AtomicBool::new(false));
        // SAFETY: pthread_self has no preconditions.
        let loader = unsafe { libc::pthread_self() };
        let stop = done.clone();
        let mut sender = Sender {
            done,
            thread: Some(std::thread::spawn(move || {
                let mut sent = 0u64;
                while !stop.load(Relaxed) && sent < 1_000_000 {
                    // SAFETY: `loader` is this test's thread, alive until the sender is
                    // stopped (by `Sender`'s drop at the latest).
                    unsafe { libc::pthread_kill(loader, libc::SIGUSR2) };
                    sent += 1;
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
                sent
            })),
        };
        let mut opts = DatapathOptions::new(MemberId(1));
        opts.session_capacity = 4096;
        opts.config = DatapathConfig::with_defaults(MemberId(1));
        let loaded = Datapath::load(&opts).map(drop);
        let sent = sender.stop();
        assert!(sent > 10, "only {sent} signals sent");
        loaded.expect("loaded while signals arrived");
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
