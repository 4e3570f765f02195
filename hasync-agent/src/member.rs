//! The running member: what its tasks (the runtime's loops, the control handler, the metrics
//! and dashboard server) share.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

pub use crate::lock::lock;
use crate::{cluster::Membership, config::Config, datapath::Datapath, sync::engine::Engine};

/// Everything the running member shares between its tasks.
pub struct Member {
    pub config: Config,
    pub dp: Arc<Mutex<Datapath>>,
    pub membership: Arc<Mutex<Membership>>,
    pub engine: Engine,
    pub started: Instant,
}
