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

    steps.run(
        "integration build",
        "the integration tests do not build (above)",
        &mut cmd::cargo(["test", "-p", "hasync-tests", "--no-run"]),
    )?;
    steps.run_lanes(args)
}

/// The side lane of the integration tests: the long fault run, which mostly waits on timers
/// and faults, then some of the longest others, which also wait on timers (a failover on the
/// keepalive threshold, expiry on session timeouts, monitors' hold-downs, restarts), so the two
/// lanes take about as long (a clean run on 2026-12-02: the side lane 335 s and the main one
/// 477 s with only the first five here; the last two took 70 s of the main one).
const SIDE_LANE: [&str; 7] = [
    "chaos_short",
    "cluster_failover",
    "cluster_expiry",
    "cluster_failure_conditions",
    "cluster_peer_restart",
    "table_pressure",
    "restart",
];

/// Where the side lane's output is kept (it is printed when the lane ends).
const SIDE_LANE_LOG: &str = "chaos_short.log";

/// The integration tests' two lanes: [`SIDE_LANE`], and every other test target. Each lane
/// runs one test at a time (they create namespaces, pins and agents); every test's names carry
/// its process id, so the lanes never share one.
fn integration_lanes(args: &[String]) -> Result<(Command, Command)> {
    let mut side = cmd::cargo(["test", "-p", "hasync-tests"]);
    for name in SIDE_LANE {
        side.args(["--test", name]);
    }
    let mut main = cmd::cargo(["test", "-p", "hasync-tests", "--lib", "--bins"]);
    for name in integration_targets()? {
        if !SIDE_LANE.contains(&name.as_str()) {
            main.args(["--test", &name]);
        }
    }
    for lane in [&mut side, &mut main] {
        lane.args(["--", "--test-threads=1"]).args(args);
    }
    Ok((side, main))
}

/// The names of `tests/tests/*.rs`.
fn integration_targets() -> Result<Vec<String>> {
    let dir = std::path::Path::new("tests/tests");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "rs") {
            if let Some(stem) = path.file_stem() {
                names.push(stem.to_string_lossy().into_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// `cargo xtask clippy-ebpf`.
pub fn clippy_ebpf() -> Result<()> {
    cmd::run(&mut clippy_ebpf_command()).context("clippy found problems in hasync-ebpf (above)")
}

/// Where hasync-agent's build script builds the XDP program (its `build.rs`, and aya-build's
/// `aya-build/target/<package>` inside): clippy runs there too, with the same (release)
/// profile, so it finds the build's host crates (the proc macros) fresh and checks only the
/// BPF target's.
const EBPF_TARGET_DIR: &str = "hasync-ebpf-build/aya-build/target/hasync-ebpf";

/// The XDP program is `no_std`/`no_main` for bpfel-unknown-none, a tier-3 target without a
/// shipped `core`: nightly builds one from rust-src.
fn clippy_ebpf_command() -> Command {
    let mut clippy = cmd::cargo([
        "+nightly",
        "clippy",
        "-p",
        "hasync-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ]);
    clippy
        .arg("--target-dir")
        .arg(cmd::target_dir().join(EBPF_TARGET_DIR))
        .args(["--", "-D", "warnings"]);
    clippy
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
        self.record(name, start, &result);
        result
    }

    fn record(&mut self, name: &str, start: Instant, result: &Result<()>) {
        let line = format!(
            "{:<18} {:<6} {:>7.1}s",
            name,
            if result.is_ok() { "ok" } else { "FAILED" },
            start.elapsed().as_secs_f64()
        );
        eprintln!("==> {line}");
        self.done.push(line);
    }

    /// The integration lanes side by side; the side lane's output is printed when it ends.
    fn run_lanes(&mut self, args: &[String]) -> Result<()> {
        let (mut side, mut main) = integration_lanes(args)?;
        let log = cmd::target_dir().join(SIDE_LANE_LOG);
        let start = Instant::now();
        let side_lane = cmd::spawn_logged(&mut side, &log)?;
        let main_result = cmd::run(&mut main).context("integration tests failed (above)");
        let side_result = side_lane
            .wait()
            .with_context(|| format!("{} failed (its output is above)", SIDE_LANE.join(", ")));
        let result = match (main_result, side_result) {
            (Err(main), Err(side)) => Err(anyhow::anyhow!("{main:#}; and {side:#}")),
            (main, side) => main.and(side),
        };
        self.record("integration tests", start, &result);
        result
    }

    fn print_summary(&self) {
        eprintln!("\nsummary:");
        for line in &self.done {
            eprintln!("  {line}");
        }
    }
}
