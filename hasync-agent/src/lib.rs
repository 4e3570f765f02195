//! hasync agent library: everything the `hasync` binary does, testable without it.

pub mod agent;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod datapath;
pub mod sync;

/// The XDP program object, built by build.rs from hasync-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hasync"));
