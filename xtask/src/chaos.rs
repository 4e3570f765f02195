//! `cargo xtask chaos`: the long fault-injection run (`hasync-chaos` in hasync-tests) against
//! release agents, writing its table for the README.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::{build_release_agent, cmd, release_binary};

/// What `cargo xtask chaos` takes and passes on.
#[derive(clap::Args)]
pub struct ChaosArgs {
    /// Cluster members, 3–16.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(3..=16))]
    pub members: u8,
    /// Seconds after which no new fault starts, 1–86400.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub duration: u64,
    /// Seed of the fault schedule (the same seed replays it).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where the table goes.
    #[arg(long, default_value = "target/chaos-report.md")]
    pub out: PathBuf,
    /// The members' `[local] forwarding`: `kernel` or `xdp`.
    #[arg(long, default_value = "kernel")]
    pub forwarding: String,
    /// UDP session timeout in seconds, 5–3600: below an hour, sessions expire during the
    /// faults and the run checks that none is held past it.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(5..=3600))]
    pub udp_timeout: u64,
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
        .args(["--udp-timeout", &args.udp_timeout.to_string()])
        .arg("--out")
        .arg(&args.out);
    cmd::run(&mut run)
}
