//! `cargo xtask chaos`: the long fault-injection run (`hasync-chaos` in hasync-tests) against
//! release agents, writing its table for the README.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::{build_release_agent, cmd, release_binary};

/// What `cargo xtask chaos` passes on.
pub struct ChaosArgs {
    pub members: u8,
    pub duration: u64,
    pub seed: u64,
    pub out: PathBuf,
    pub forwarding: String,
}

/// Builds the agent (release: 16 debug agents would starve a small host) and runs the long
/// profile with it.
pub fn chaos(root: &Path, args: &ChaosArgs) -> Result<()> {
    build_release_agent()?;
    let mut run = cmd::cargo(["run", "-p", "hasync-tests", "--bin", "hasync-chaos", "--"]);
    run.env("HASYNC_BIN", release_binary(root))
        .args(["--members", &args.members.to_string()])
        .args(["--duration", &args.duration.to_string()])
        .args(["--seed", &args.seed.to_string()])
        .args(["--forwarding", &args.forwarding])
        .arg("--out")
        .arg(&args.out);
    cmd::run(&mut run)
}
