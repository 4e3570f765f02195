//! Cluster session sync: the wire format, the encrypted channel, and per-peer streams.

pub mod channel;
pub mod wire;
