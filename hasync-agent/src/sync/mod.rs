//! Cluster session sync: the wire format, the encrypted channel, per-peer outboxes, installing
//! what peers send, and the engine that runs the links.

pub mod channel;
pub mod install;
pub mod outbox;
pub mod wire;
