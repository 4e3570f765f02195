//! hasync agent library: everything the `hasync` binary does, testable without it.

pub mod agent;
#[cfg(test)]
mod alloc_count;
pub mod claim_window;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod dashboard;
pub mod datapath;
pub mod dir_trust;
pub mod files;
pub mod forwarding;
pub mod ha_link;
pub mod http;
pub mod huge_pages;
pub mod lab;
pub mod lock;
#[cfg(test)]
mod log_capture;
pub mod member;
pub mod metrics;
pub mod monitor;
pub mod netlink;
pub mod provision;
pub mod random;
pub mod runtime;
pub mod service;
pub mod stacked;
pub mod stall_watch;
pub mod startup;
pub mod suspend_mark;
pub mod sync;
pub mod tasks;
pub mod traffic_log;

/// The XDP program object, built by build.rs from hasync-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hasync"));
