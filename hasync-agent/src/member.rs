//! The running member: what its tasks (the runtime's loops, the control handler, the metrics
//! and dashboard server) share.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use crate::{cluster::Membership, config::Config, datapath::Datapath, sync::engine::Engine};

/// Everything the running member shares between its tasks.
pub struct Member {
    pub config: Config,
    pub dp: Arc<Mutex<Datapath>>,
    pub membership: Arc<Mutex<Membership>>,
    pub engine: Engine,
    pub started: Instant,
}

/// Locks `m`, taking the value even if a task panicked while holding it (the state stays
/// usable: every holder leaves it consistent between statements).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
