//! The running member: what its tasks (the runtime's loops, the control handler, the metrics
//! and dashboard server) share.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

pub use crate::lock::lock;
use crate::{
    cluster::Membership,
    config::Config,
    datapath::{sweep::Tally, Datapath},
    sync::engine::Engine,
};

/// Everything the running member shares between its tasks.
pub struct Member {
    pub config: Config,
    pub dp: Arc<Mutex<Datapath>>,
    pub membership: Arc<Mutex<Membership>>,
    pub engine: Engine,
    pub started: Instant,
    /// What the expiry sweep's last complete pass counted of the table, and when that pass
    /// started (`None` until one completes): the session counts the metrics and the
    /// dashboard show, at no walk of their own.
    pub swept: Mutex<Option<(Instant, Tally)>>,
}
