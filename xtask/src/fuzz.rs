//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `fuzz/` (libFuzzer, nightly) one at a
//! time, each for a while, growing the corpora kept in `fuzz/corpus/<target>/`, and prints
//! executions and crashes per target. What each target checks lives in `hasync_tests::fuzz`;
//! `cargo xtask test` replays the corpora through the same checks.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::cmd;

/// Every target, in the order they run (`xdp_parser` needs root: it loads the XDP program).
pub const TARGETS: &[&str] = &[
    "wire_message",
    "channel_payload",
    "config",
    "control_request",
    "provision_spec",
    "backlog",
    "kernel_netlink",
    "xdp_parser",
];

/// Files libFuzzer leaves in `fuzz/artifacts/<target>/` for a failing input.
const FINDING_PREFIXES: &[&str] = &["crash-", "oom-", "timeout-", "leak-"];

/// What `cargo xtask fuzz` takes.
#[derive(clap::Args)]
pub struct Options {
    /// Seconds per target.
    #[arg(long = "time", value_name = "S", default_value_t = 60)]
    pub seconds: u64,
    /// Only this target.
    #[arg(long, value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub target: Option<String>,
    /// Minimise each corpus after its run (`cargo fuzz cmin`).
    #[arg(long)]
    pub cmin: bool,
}

/// One target's run, for the table.
struct Outcome {
    target: &'static str,
    executions: u64,
    crashes: usize,
    seconds: f64,
    corpus: usize,
}

pub fn fuzz(opts: &Options) -> Result<()> {
    let targets: Vec<&'static str> = match &opts.target {
        Some(name) => TARGETS.iter().copied().filter(|t| t == name).collect(),
        None => TARGETS.to_vec(),
    };
    // No sanitizer: the parsers are safe Rust; what the fuzzer looks for are panics and broken
    // invariants (overflow checks and debug assertions are on). Twice the executions per second.
    cmd::run(&mut cargo_fuzz("build", &[]))?;
    let mut outcomes = Vec::new();
    for target in targets {
        outcomes.push(run_target(target, opts.seconds)?);
        if opts.cmin {
            let corpus = corpus_dir(target);
            cmd::run(&mut cargo_fuzz(
                "cmin",
                &[target.as_ref(), corpus.as_os_str()],
            ))?;
        }
    }
    print_table(&outcomes);
    let crashed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.crashes > 0)
        .map(|o| o.target)
        .collect();
    if !crashed.is_empty() {
        bail!(
            "crashes in {}: inputs in fuzz/artifacts/<target>/; replay one with \
             `cargo +nightly fuzz run -s none <target> <file>`",
            crashed.join(", ")
        );
    }
    Ok(())
}

/// `cargo +nightly fuzz <sub> -s none <args>`.
fn cargo_fuzz(sub: &str, args: &[&std::ffi::OsStr]) -> Command {
    let mut cargo = cmd::cargo(["+nightly", "fuzz", sub, "-s", "none"]);
    cargo.args(args);
    cargo
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new("fuzz/corpus").join(target)
}

/// Runs `target` for `seconds` on its corpus, libFuzzer's output going to a log file.
fn run_target(target: &'static str, seconds: u64) -> Result<Outcome> {
    let corpus = corpus_dir(target);
    fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let artifacts = Path::new("fuzz/artifacts").join(target);
    let findings_before = findings(&artifacts);
    let log_path = log_dir()?.join(format!("{target}.log"));
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut run = cargo_fuzz("run", &[target.as_ref(), corpus.as_os_str()]);
    run.arg("--").args([
        format!("-max_total_time={seconds}"),
        "-print_final_stats=1".into(),
        "-timeout=10".into(),
    ]);
    eprintln!("$ {} 2> {}", cmd::display(&run), log_path.display());
    let start = Instant::now();
    let status = run
        .stderr(Stdio::from(log))
        .status()
        .with_context(|| format!("could not start `{}`", cmd::display(&run)))?;
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    let crashes = findings(&artifacts).difference(&findings_before).count();
    if !status.success() && crashes == 0 {
        bail!(
            "fuzzing {target} failed ({status}) without a finding; see {}",
            log_path.display()
        );
    }
    Ok(Outcome {
        target,
        executions: executions(&text),
        crashes,
        seconds: start.elapsed().as_secs_f64(),
        corpus: fs::read_dir(&corpus).map_or(0, |d| d.count()),
    })
}

/// `target/fuzz-logs`, honouring `CARGO_TARGET_DIR`.
fn log_dir() -> Result<PathBuf> {
    let dir = cmd::target_dir().join("fuzz-logs");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The failing inputs libFuzzer saved for a target so far.
fn findings(artifacts: &Path) -> BTreeSet<String> {
    let Ok(dir) = fs::read_dir(artifacts) else {
        return BTreeSet::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| FINDING_PREFIXES.iter().any(|p| name.starts_with(p)))
        .collect()
}

/// Executions from libFuzzer's final statistics (`stat::number_of_executed_units: N`), else its
/// last progress line (`#N ...`).
fn executions(log: &str) -> u64 {
    let stat = log.lines().rev().find_map(|line| {
        line.strip_prefix("stat::number_of_executed_units:")?
            .trim()
            .parse()
            .ok()
    });
    let progress = || {
        log.lines().rev().find_map(|line| {
            let count = line.strip_prefix('#')?.split_whitespace().next()?;
            count.parse().ok()
        })
    };
    stat.or_else(progress).unwrap_or(0)
}

fn print_table(outcomes: &[Outcome]) {
    eprintln!(
        "\n{:<16} {:>14} {:>8} {:>10} {:>8} {:>7}",
        "target", "executions", "crashes", "exec/s", "corpus", "time"
    );
    for o in outcomes {
        eprintln!(
            "{:<16} {:>14} {:>8} {:>10.0} {:>8} {:>6.0}s",
            o.target,
            o.executions,
            o.crashes,
            o.executions as f64 / o.seconds.max(1.0),
            o.corpus,
            o.seconds
        );
    }
}

#[cfg(test)]
mod tests {
    use super::executions;

    #[test]
    fn executions_come_from_the_final_stats_else_the_last_progress_line() {
        let log = "#2\tINITED cov: 10\n#4096\tpulse  cov: 12\n#9000\tDONE   cov: 12\n\
                   stat::number_of_executed_units: 9001\nstat::average_exec_per_sec:     150\n";
        assert_eq!(executions(log), 9001);
        assert_eq!(
            executions("#2\tINITED\n#512\tpulse cov: 3\n==1== ERROR"),
            512
        );
        assert_eq!(executions("nothing ran"), 0);
    }
}
