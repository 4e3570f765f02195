//! `cargo xtask test` and `cargo xtask clippy-ebpf`: lints first (cheap, fail early), then unit
//! tests, then the netns integration tests.

use std::{process::Command, time::Instant};

use anyhow::{Context as _, Result};

use crate::cmd;

/// `cargo xtask test`. `args` go to both `cargo test` runs, after `--` (e.g. a name filter).
pub fn test(args: &[String]) -> Result<()> {
    let mut steps = Steps::default();
    let result = run_steps(&mut steps, args);
    steps.print_summary();
    result
}

fn run_steps(steps: &mut Steps, args: &[String]) -> Result<()> {
    steps.run(
        "rustfmt",
        "formatting differs: run `cargo fmt --all`",
        &mut cmd::cargo(["fmt", "--all", "--check"]),
    )?;
    // hasync-ebpf is only ever built for bpfel-unknown-none (see the workspace Cargo.toml):
    // clippy-ebpf covers it.
    steps.run(
        "clippy (host)",
        "clippy found problems (above)",
        &mut cmd::cargo([
            "clippy",
            "--workspace",
            "--exclude",
            "hasync-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    steps.run(
        "clippy (eBPF)",
        "clippy found problems in hasync-ebpf (above)",
        &mut clippy_ebpf_command(),
    )?;

    let mut unit = cmd::cargo([
        "test",
        "--workspace",
        "--exclude",
        "hasync-ebpf",
        "--exclude",
        "hasync-tests",
    ]);
    if !args.is_empty() {
        unit.arg("--").args(args);
    }
    steps.run("unit tests", "unit tests failed (above)", &mut unit)?;

    // The integration tests share the kernel (network namespaces, bpffs): one at a time.
    let mut integration = cmd::cargo(["test", "-p", "hasync-tests", "--", "--test-threads=1"]);
    integration.args(args);
    steps.run(
        "integration tests",
        "integration tests failed (above)",
        &mut integration,
    )
}

/// `cargo xtask clippy-ebpf`.
pub fn clippy_ebpf() -> Result<()> {
    cmd::run(&mut clippy_ebpf_command()).context("clippy found problems in hasync-ebpf (above)")
}

/// The XDP program is `no_std`/`no_main` for bpfel-unknown-none, a tier-3 target without a
/// shipped `core`: nightly builds one from rust-src.
fn clippy_ebpf_command() -> Command {
    cmd::cargo([
        "+nightly",
        "clippy",
        "-p",
        "hasync-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ])
}

/// Runs steps in order, timing each, and keeps a line per step for the summary.
#[derive(Default)]
struct Steps {
    done: Vec<String>,
}

impl Steps {
    fn run(&mut self, name: &str, on_failure: &str, cmd: &mut Command) -> Result<()> {
        let start = Instant::now();
        let result = cmd::run(cmd).context(on_failure.to_owned());
        let line = format!(
            "{:<18} {:<6} {:>7.1}s",
            name,
            if result.is_ok() { "ok" } else { "FAILED" },
            start.elapsed().as_secs_f64()
        );
        eprintln!("==> {line}");
        self.done.push(line);
        result
    }

    fn print_summary(&self) {
        eprintln!("\nsummary:");
        for line in &self.done {
            eprintln!("  {line}");
        }
    }
}
