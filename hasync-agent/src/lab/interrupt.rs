//! Interruption of a lab run: SIGINT, SIGTERM and SIGHUP set a flag that every loop checks,
//! so a run stopped by Ctrl-C or `timeout` still unwinds and removes its lab (agents stopped,
//! pins and namespaces removed). `hasync lab` and the benches share it.

use std::sync::atomic::{AtomicBool, Ordering};

use super::{LabError, Result};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Installs the handler for SIGINT, SIGTERM and SIGHUP.
pub fn catch_signals() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic, which is
        // async-signal-safe.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(LabError::io(
                "installing a signal handler",
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// Has a signal come?
pub fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}
