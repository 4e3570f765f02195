//! Developer tasks for hasync, run as `cargo xtask <task>` from anywhere in the workspace.

mod chaos;
mod cmd;
mod fuzz;
mod setup;
mod test;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

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
    /// llvm-22-dev, nightly rust-src, bpf-linker, bpffs, iproute2, nftables, ping.
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
    /// Setup, build (release), then run a lab: a whole cluster in network namespaces with
    /// traffic through it, shown live until Ctrl-C (`hasync lab`).
    #[command(after_help = "\
Modes:
  cargo xtask run [--members N] [--duration SECS]   a lab: `hasync lab` (namespaces client,
                                                    fw1..fwN, server, hasw; needs root)
  cargo xtask run --config FILE                     this host as a member: `hasync agent --config FILE`
  cargo xtask run -- ARGS...                        `hasync agent ARGS...`, verbatim")]
    Run(RunArgs),
    /// Setup, then run a benchmark from hasync-tests.
    Bench(BenchArgs),
    /// Setup, then a fault-injection run against a netns cluster (needs root): partitions,
    /// loss, stopped, killed and restarted agents, floods, a hostile peer; invariants checked
    /// throughout. Writes a Markdown table of the results.
    Chaos(chaos::ChaosArgs),
    /// Lint the XDP program (hasync-ebpf) for bpfel-unknown-none with nightly clippy.
    ClippyEbpf,
    /// Setup (and cargo-fuzz), then run the fuzz targets in fuzz/ (libFuzzer, nightly) one at
    /// a time, growing the corpora in fuzz/corpus/; prints executions and crashes per target.
    Fuzz(fuzz::Options),
}

/// `cargo xtask run`'s arguments.
#[derive(Args)]
struct RunArgs {
    /// Members of the lab, 2–16 (`hasync lab` defaults to 2; checked here, before any build,
    /// and again by the lab).
    #[arg(long, value_name = "N", conflicts_with = "config",
          value_parser = clap::value_parser!(u8).range(2..=16))]
    members: Option<u8>,
    /// Stop the lab after SECS seconds, 1–86400 (`hasync lab` defaults to 3600).
    #[arg(long, value_name = "SECS", conflicts_with = "config",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    duration: Option<u64>,
    /// Prefix for the lab's namespace names (`hasync lab --prefix`; default none: `fw1`,
    /// `client`, ...), for a host where another tool uses those names, or a second lab.
    #[arg(long, value_name = "PREFIX", conflicts_with = "config")]
    prefix: Option<String>,
    /// Run the agent on this host with this config file instead of a lab.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Arguments for `hasync agent`, after `--`, instead of a lab.
    #[arg(
        last = true,
        value_name = "ARGS",
        conflicts_with_all = ["members", "duration", "prefix", "config"]
    )]
    args: Vec<OsString>,
}

/// `cargo xtask bench`'s arguments.
#[derive(Args)]
struct BenchArgs {
    bench: Bench,
    /// Ask the bench for JSON output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    options: BenchOptions,
}

/// `cargo xtask bench`'s options that only some benches take.
#[derive(Args)]
struct BenchOptions {
    /// `forward` only: the cases to run, e.g. `a,b,c,d,e` (default: all, a–h).
    #[arg(long, value_name = "LIST")]
    cases: Option<String>,
    /// `forward`: the numbers of flows to measure, e.g. `1000,1000000` (the default);
    /// `failover`: the number of flows (default 1000).
    #[arg(long, value_name = "LIST")]
    flows: Option<String>,
    /// `forward` only: how many times the cases run, alternating their order; each ratio is
    /// the median of the rounds' (default 3, at most 20: checked here, before any build,
    /// and again by the bench).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: Option<u32>,
    /// `failover` only: `ipv4` (the default) or `ipv6`.
    #[arg(long, value_name = "FAMILY")]
    family: Option<String>,
    /// `failover` only: the generator's rate in Mpps (default: half of fw1's capacity
    /// measured in the same run).
    #[arg(long, value_name = "MPPS")]
    rate: Option<String>,
    /// `failover` only: write the run's time series (sent, received every 2 ms) as CSV (a
    /// relative path is taken from where the command runs).
    #[arg(long, value_name = "FILE")]
    series: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Bench {
    /// XDP fast path (the `fastpath` bench in hasync-tests).
    Fastpath,
    /// Session sync between lab members: replication, lag, full sync, agent CPU and memory
    /// (the `sync` bench in hasync-tests).
    Sync,
    /// Live frames through a member in a netns lab: XDP redirect, kernel forwarding with and
    /// without conntrack, and hasync (the `forward` bench in hasync-tests; builds the release
    /// agent).
    Forward,
    /// Live frames through fw1 of a two-member cluster forwarding in XDP; fw1 killed and the
    /// traffic steered to fw2: frames lost, time until fw2 forwards at full rate (the
    /// `failover` bench in hasync-tests; builds the release agent).
    Failover,
}

impl Bench {
    fn name(self) -> &'static str {
        match self {
            Self::Fastpath => "fastpath",
            Self::Sync => "sync",
            Self::Forward => "forward",
            Self::Failover => "failover",
        }
    }
}

/// Builds `hasync` in release (the lab and the chaos run use it).
fn build_release_agent() -> Result<()> {
    cmd::run(&mut cmd::cargo([
        "build",
        "--release",
        "-p",
        "hasync-agent",
        "--bin",
        "hasync",
    ]))
}

/// `target/release/hasync`, honouring `CARGO_TARGET_DIR`.
fn release_binary(root: &Path) -> PathBuf {
    root.join(cmd::target_dir()).join("release/hasync")
}

extern "C" fn on_interrupt(_: libc::c_int) {}

/// Catches SIGINT and SIGTERM with a handler that does nothing, so xtask outlives a child that
/// handles them itself; unlike `SIG_IGN` the handler is not inherited across exec.
fn ignore_interrupts_while_children_run() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid; the handler does nothing.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("installing a signal handler");
        }
    }
    Ok(())
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
    let root = workspace_root()?;
    let task = with_config_from_here(cli.task)?;
    std::env::set_current_dir(root)
        .with_context(|| format!("cannot change to the workspace root {}", root.display()))?;
    match task {
        Task::Setup { check } => setup::setup(Mode::check_only_if(check), Report::Full),
        Task::Test { args } => {
            setup::setup(Mode::Install, Report::Summary)?;
            test::test(&args)
        }
        Task::Run(args) => run_hasync(root, args),
        Task::Bench(args) => run_bench(root, args),
        Task::Chaos(args) => {
            setup::setup(Mode::Install, Report::Summary)?;
            chaos::chaos(root, &args)
        }
        Task::ClippyEbpf => test::clippy_ebpf(),
        Task::Fuzz(options) => {
            setup::setup_fuzz(Mode::Install, Report::Summary)?;
            fuzz::fuzz(&options)
        }
    }
}

/// The workspace root: xtask lives at <root>/xtask, and every command runs from the root.
fn workspace_root() -> Result<&'static Path> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask's manifest directory has no parent")
}

/// `task`, where a relative `run --config FILE` or `bench --series FILE` becomes absolute: it
/// names a file where the user is, not at the workspace root (nor in `tests/`, where benches
/// run).
fn with_config_from_here(mut task: Task) -> Result<Task> {
    let path = match &mut task {
        Task::Run(RunArgs {
            config: Some(path), ..
        }) => path,
        Task::Bench(BenchArgs {
            options: BenchOptions {
                series: Some(path), ..
            },
            ..
        }) => path,
        _ => return Ok(task),
    };
    if path.is_relative() {
        let here = std::env::current_dir().context("cannot read the current directory")?;
        *path = here.join(&*path);
    }
    Ok(task)
}

/// `run`: the release `hasync` as an agent (with `args`, or `config`), else as a lab.
fn run_hasync(root: &Path, run: RunArgs) -> Result<()> {
    let RunArgs {
        members,
        duration,
        prefix,
        config,
        args,
    } = run;
    // On a real host (a config or arguments) only what building and running the agent needs
    // is installed; the lab gets everything its checks use too.
    match config.is_some() || !args.is_empty() {
        true => setup::setup_to_run_an_agent(Mode::Install, Report::Summary)?,
        false => setup::setup(Mode::Install, Report::Summary)?,
    }
    build_release_agent()?;
    let mut hasync = Command::new(release_binary(root));
    if !args.is_empty() {
        hasync.arg("agent").args(args);
    } else if let Some(config) = config {
        hasync.args(["agent", "--config"]).arg(config);
    } else {
        hasync.arg("lab");
        if let Some(n) = members {
            hasync.args(["--members", &n.to_string()]);
        }
        if let Some(secs) = duration {
            hasync.args(["--duration", &secs.to_string()]);
        }
        if let Some(prefix) = prefix {
            hasync.args(["--prefix", &prefix]);
        }
    }
    // Ctrl-C reaches hasync too: let it clean its lab up, then report how it ended.
    ignore_interrupts_while_children_run()?;
    cmd::run(&mut hasync)
}

/// `bench`: `cargo bench` of hasync-tests' `bench`, with the release agent for `forward` and
/// `failover`.
fn run_bench(root: &Path, args: BenchArgs) -> Result<()> {
    let BenchArgs {
        bench,
        json,
        options,
    } = args;
    setup::setup(Mode::Install, Report::Summary)?;
    let mut cargo = cmd::cargo(["bench", "-p", "hasync-tests", "--bench", bench.name(), "--"]);
    let live = matches!(bench, Bench::Forward | Bench::Failover);
    if live && std::env::var_os("HASYNC_BIN").is_none() {
        build_release_agent()?;
        cargo.env("HASYNC_BIN", release_binary(root));
    }
    if json {
        cargo.arg("--json");
    }
    let forward = matches!(bench, Bench::Forward);
    let failover = matches!(bench, Bench::Failover);
    let BenchOptions {
        cases,
        flows,
        rounds,
        family,
        rate,
        series,
    } = options;
    for (flag, value, ok, only) in [
        ("--cases", cases, forward, "forward"),
        ("--flows", flows, live, "forward` and `bench failover"),
        (
            "--rounds",
            rounds.map(|n| n.to_string()),
            forward,
            "forward",
        ),
        ("--family", family, failover, "failover"),
        ("--rate", rate, failover, "failover"),
        (
            "--series",
            series.map(|p| p.to_string_lossy().into_owned()),
            failover,
            "failover",
        ),
    ] {
        if let Some(value) = value {
            anyhow::ensure!(ok, "{flag} is for `bench {only}` only");
            cargo.args([flag, value.as_str()]);
        }
    }
    cmd::run(&mut cargo)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lab size or duration out of the lab's range is refused as the command is parsed,
    /// before setup and a release build (before: after both, by the lab itself).
    #[test]
    fn a_lab_out_of_range_is_refused_before_any_build() {
        for bad in [["run", "--members", "1"], ["run", "--members", "17"]] {
            let e = Cli::try_parse_from(std::iter::once("xtask").chain(bad)).err();
            assert!(
                e.is_some_and(|e| e.to_string().contains("2..=16")),
                "{bad:?}"
            );
        }
        let e = Cli::try_parse_from(["xtask", "run", "--duration", "0"]).err();
        assert!(e.is_some_and(|e| e.to_string().contains("1..=86400")));
        assert!(Cli::try_parse_from(["xtask", "run", "--members", "16"]).is_ok());
    }

    /// The lab's namespace prefix can be given through `cargo xtask run` (before stop 42 only
    /// `hasync lab` took it: on a host where another tool has `fw1`, the README's command
    /// could not start a lab).
    #[test]
    fn the_lab_prefix_passes_through_run() {
        let cli = Cli::try_parse_from(["xtask", "run", "--prefix", "x-"]).expect("parses");
        let Task::Run(run) = cli.task else {
            panic!("not run");
        };
        assert_eq!(run.prefix.as_deref(), Some("x-"));
    }

    /// A relative `bench --series FILE` names a file where the user is: benches run in
    /// `tests/`, where it landed before (or failed, after the whole run, when its directory
    /// was only where the user is).
    #[test]
    fn a_relative_series_file_is_taken_from_where_the_command_runs() {
        let cli = Cli::try_parse_from(["xtask", "bench", "failover", "--series", "out.csv"])
            .expect("parse");
        let task = with_config_from_here(cli.task).expect("task");
        let here = std::env::current_dir().expect("cwd");
        let Task::Bench(BenchArgs { options, .. }) = task else {
            panic!("not a bench");
        };
        assert_eq!(options.series, Some(here.join("out.csv")));
    }
}
