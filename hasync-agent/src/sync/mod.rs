//! Cluster session sync: the wire format, the encrypted channel, per-peer outboxes, applying
//! what peers send, and the engine that runs the links.

pub mod admission;
pub mod apply;
pub mod backoff;
pub mod channel;
pub mod engine;
pub mod outbox;
pub mod removals;
pub mod stale;
pub mod stats;
pub mod table;
pub mod wire;
pub mod writer;
