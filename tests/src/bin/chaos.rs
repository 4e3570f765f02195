//! `cargo xtask chaos`: the long fault-injection run (needs root). Prints the report and
//! writes its Markdown table to `--out` (default `target/chaos-report.md`); exits non-zero when
//! an invariant broke.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use hasync_agent::config::ForwardingName;
use hasync_tests::chaos::{run, Profile, NO_EXPIRY};

#[derive(Parser)]
#[command(
    name = "hasync-chaos",
    about = "Fault-injection run against a netns cluster"
)]
struct Args {
    /// Cluster members, 3–16.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(3..=16))]
    members: u8,
    /// Seconds after which no new fault starts, 1–86400.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    duration: u64,
    /// Seed of the fault schedule (the same seed replays the same schedule).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the Markdown table.
    #[arg(long, default_value = "target/chaos-report.md")]
    out: PathBuf,
    /// The members' `[local] forwarding`.
    #[arg(long, value_enum, default_value_t = Forwarding::Kernel)]
    forwarding: Forwarding,
    /// UDP session timeout in seconds (`udp-new`, `udp-replied`), 5–3600: below an hour,
    /// sessions expire during the faults and the run also checks that none is held past it.
    #[arg(long, default_value_t = NO_EXPIRY.as_secs(),
          value_parser = clap::value_parser!(u64).range(5..=NO_EXPIRY.as_secs()))]
    udp_timeout: u64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Forwarding {
    Kernel,
    Xdp,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut profile = Profile::long(args.members, Duration::from_secs(args.duration), args.seed);
    profile.forwarding = match args.forwarding {
        Forwarding::Kernel => ForwardingName::Kernel,
        Forwarding::Xdp => ForwardingName::Xdp,
    };
    profile.udp_timeout = Duration::from_secs(args.udp_timeout);
    let report = run(&profile);
    println!("{}", report.text());
    if let Err(e) = std::fs::write(&args.out, report.markdown()) {
        eprintln!("error: writing {}: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    eprintln!("table written to {}", args.out.display());
    if report.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
