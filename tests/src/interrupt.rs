//! Interruption for the benches (`hasync_agent::lab::interrupt`): a bench stopped by Ctrl-C or
//! `timeout` still unwinds and cleans its lab up.

use anyhow::{bail, Result};

/// Installs the handler for SIGINT, SIGTERM and SIGHUP.
pub fn catch_signals() -> Result<()> {
    Ok(hasync_agent::lab::interrupt::catch_signals()?)
}

/// Fails with "interrupted" once a signal came.
pub fn check_stop() -> Result<()> {
    if hasync_agent::lab::interrupt::stopped() {
        bail!("interrupted");
    }
    Ok(())
}
