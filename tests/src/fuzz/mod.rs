//! The checks behind `cargo xtask fuzz`: one function per fuzz target, called by the
//! cargo-fuzz targets in `fuzz/` and by the corpus replay (`tests/fuzz_corpus.rs`, run by
//! `cargo xtask test`), so what the fuzzer checks and what the replay checks are one code.
//!
//! Input a parser rejects is fine; a check returns `Err` when an invariant broke, and a panic
//! anywhere is a bug (libFuzzer reports both as crashes).

mod host;
pub mod seeds;
pub mod xdp;

use std::path::PathBuf;

use anyhow::Result;

pub use host::{
    backlog, channel_payload, config, control_request, kernel_netlink, provision_spec, wire_message,
};

/// A check over one fuzz input.
pub type Check = fn(&[u8]) -> Result<()>;

/// The targets that need nothing but the input, by their cargo-fuzz name.
pub const HOST_TARGETS: &[(&str, Check)] = &[
    ("wire_message", wire_message),
    ("channel_payload", channel_payload),
    ("config", config),
    ("control_request", control_request),
    ("provision_spec", provision_spec),
    ("backlog", backlog),
    ("kernel_netlink", kernel_netlink),
];

/// The corpus kept in the repository for `target`: `fuzz/corpus/<target>/`.
pub fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}
