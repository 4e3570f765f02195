//! Cluster session sync: the wire format, the encrypted channel, the changes queued for the
//! peers and each peer's frames in flight, applying what peers send, and the engine that runs
//! the links.

pub mod admission;
pub mod apply;
pub mod backlog;
pub mod backoff;
pub mod bucket;
pub mod channel;
pub mod engine;
pub mod log_limit;
pub mod removals;
pub mod stale;
pub mod stats;
pub mod table;
pub mod window;
pub mod wire;
pub mod writer;
