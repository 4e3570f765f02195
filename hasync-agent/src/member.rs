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
    datapath::{sweep::Tally, CountersReader, Datapath, TableBounds},
    sync::{engine::Engine, log_limit::LogLimiter},
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
    /// The session table's bounds, fixed when the datapath was loaded (a pinned table's own):
    /// read without the datapath's lock, which the sync engine holds for each apply, each
    /// batch of the sender's reads and the end of a full sync.
    pub bounds: TableBounds,
    /// The datapath's counters, read without the datapath's lock.
    pub counters: CountersReader,
    /// The "member alive" and "no longer alive" lines: a key holder can flip a member's
    /// liveness as fast as the membership is evaluated.
    pub liveness_lines: LogLimiter,
    /// When records settle claims of live sessions by version alone.
    pub claims: Mutex<crate::claim_window::ClaimWindow>,
    /// How long the async workers did not run, for the membership to forgive.
    pub stall: Arc<crate::stall_watch::StallWatch>,
    /// Members whose slot in the takeover rule's map a write failed to set (the kernel
    /// refused it): written again at every evaluation until one succeeds. Touched only with
    /// the datapath's lock held (and the membership's), so evaluations do not race on it.
    pub member_map_retry: Mutex<std::collections::BTreeSet<hasync_common::MemberId>>,
}
