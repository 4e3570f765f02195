//! Developer tasks for hasync, run as `cargo xtask <task>` from anywhere in the workspace.

mod cmd;
mod setup;
mod test;

use std::{ffi::OsString, path::Path, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};

use setup::{Mode, Report};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for hasync"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check, and install when missing, what building and testing hasync needs (run as root):
    /// llvm-22-dev, nightly rust-src, bpf-linker, bpffs, iproute2, nftables.
    Setup {
        /// Only report; exit non-zero if anything is missing.
        #[arg(long)]
        check: bool,
    },
    /// Setup, rustfmt, clippy (host and eBPF), unit tests, then the netns integration tests.
    Test {
        /// Passed to both `cargo test` runs after `--`, e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, then build (release) and run the agent: `hasync agent ARGS...`.
    #[command(
        after_help = "Until the lab arrives, ARGS are the agent's own, forwarded verbatim \
                            after `agent`, e.g. `cargo xtask run --interface eth1`."
    )]
    Run {
        /// Arguments for `hasync agent`.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
    /// Setup, then run a benchmark from hasync-tests.
    Bench {
        bench: Bench,
        /// Ask the bench for JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Lint the XDP program (hasync-ebpf) for bpfel-unknown-none with nightly clippy.
    ClippyEbpf,
}

#[derive(Clone, Copy, ValueEnum)]
enum Bench {
    /// XDP fast path (the `fastpath` bench in hasync-tests).
    Fastpath,
}

impl Bench {
    fn name(self) -> &'static str {
        match self {
            Self::Fastpath => "fastpath",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The context chain on one line, without the backtrace $RUST_BACKTRACE would add.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    // xtask lives at <root>/xtask; every command runs from the workspace root.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask's manifest directory has no parent")?;
    std::env::set_current_dir(root)
        .with_context(|| format!("cannot change to the workspace root {}", root.display()))?;

    match cli.task {
        Task::Setup { check } => setup::setup(
            if check {
                Mode::CheckOnly
            } else {
                Mode::Install
            },
            Report::Full,
        ),
        Task::Test { args } => {
            setup::setup(Mode::Install, Report::Summary)?;
            test::test(&args)
        }
        Task::Run { args } => {
            setup::setup(Mode::Install, Report::Summary)?;
            cmd::run(
                cmd::cargo([
                    "run",
                    "--release",
                    "-p",
                    "hasync-agent",
                    "--bin",
                    "hasync",
                    "--",
                    "agent",
                ])
                .args(args),
            )
        }
        Task::Bench { bench, json } => {
            setup::setup(Mode::Install, Report::Summary)?;
            let mut cargo =
                cmd::cargo(["bench", "-p", "hasync-tests", "--bench", bench.name(), "--"]);
            if json {
                cargo.arg("--json");
            }
            cmd::run(&mut cargo)
        }
        Task::ClippyEbpf => test::clippy_ebpf(),
    }
}
