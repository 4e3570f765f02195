//! `hasync config diff A.toml B.toml`: what two members' configs disagree on among the settings
//! members must agree on ([`Config::agreed_lines`]: cluster id, timers, zones, timeouts,
//! members). Exit status 0 when they agree, 1 when they differ, 2 on error. And
//! `hasync config check FILE...`: each file loaded as the agent would.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use crate::{
    config::{default_timeout_s, Config, DEFAULT_PATH},
    datapath::{error_chain, DatapathError},
};

/// `hasync config`.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Show what two members' configs disagree on in what members must agree on (cluster id,
    /// timers, zones, timeouts, members). Exit status: 0 they agree, 1 they differ, 2 error.
    Diff {
        /// One member's config.
        #[arg(value_name = "A.toml")]
        a: PathBuf,
        /// Another member's config.
        #[arg(value_name = "B.toml")]
        b: PathBuf,
    },
    /// Load config files as the agent would (key file included) and report every problem.
    /// Exit status: 0 all valid, 1 otherwise.
    Check {
        #[arg(value_name = "FILE", default_value = DEFAULT_PATH)]
        files: Vec<PathBuf>,
    },
}

/// One setting the two configs disagree on: its line in each (`None` where absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    /// The setting: `cluster.id`, `zones`, `members[id=3]`, `timeouts.established`.
    pub key: String,
    pub a: Option<String>,
    pub b: Option<String>,
}

fn key(line: &str) -> &str {
    line.split_once(" = ").map_or(line, |(k, _)| k)
}

/// The settings `a` and `b` disagree on, in `a`'s order, then those only `b` has.
pub fn differences(a: &Config, b: &Config) -> Vec<Difference> {
    let (la, lb) = (a.agreed_lines(), b.agreed_lines());
    let find = |lines: &[String], k: &str| lines.iter().find(|l| key(l) == k).cloned();
    let mut out = Vec::new();
    for line in &la {
        let k = key(line);
        let other = find(&lb, k);
        if other.as_deref() != Some(line.as_str()) {
            out.push(Difference {
                key: k.to_owned(),
                a: Some(line.clone()),
                b: other,
            });
        }
    }
    for line in &lb {
        let k = key(line);
        if find(&la, k).is_none() {
            out.push(Difference {
                key: k.to_owned(),
                a: None,
                b: Some(line.clone()),
            });
        }
    }
    out
}

/// The report `config diff` prints; `a` and `b` name the files.
pub fn report(a: &str, b: &str, diffs: &[Difference], settings: usize) -> String {
    if diffs.is_empty() {
        return format!("{a} and {b} agree on all {settings} settings members must agree on\n");
    }
    let mut s = format!("--- A: {a}\n+++ B: {b}\n");
    for d in diffs {
        s.push_str(&side('-', 'A', &d.key, d.a.as_deref()));
        s.push_str(&side('+', 'B', &d.key, d.b.as_deref()));
    }
    s.push_str(&format!(
        "{} setting(s) differ in what members must agree on: these members would refuse each \
         other as a config mismatch\n",
        diffs.len()
    ));
    s
}

/// One side of a difference: its line, or that the file leaves the setting out (a timeout
/// left out is its state's default, which the line says).
fn side(sign: char, file: char, key: &str, line: Option<&str>) -> String {
    match (
        line,
        key.strip_prefix("timeouts.").and_then(default_timeout_s),
    ) {
        (Some(line), _) => format!("{sign} {line}\n"),
        (None, Some(secs)) => format!("{sign} ({key} not in {file}: its default, {secs})\n"),
        (None, None) => format!("{sign} ({key} not in {file})\n"),
    }
}

/// `hasync config ...`: the exit status as documented on [`ConfigCommand`].
pub fn run(args: &ConfigArgs) -> ExitCode {
    match &args.command {
        ConfigCommand::Diff { a, b } => diff(a, b),
        ConfigCommand::Check { files } => check(files),
    }
}

/// `hasync config diff A B`: 0 when they agree, 1 when they differ, 2 when one does not load.
fn diff(a: &Path, b: &Path) -> ExitCode {
    let load = |path: &Path| {
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))
            .and_then(|text| Config::from_toml(path, &text).map_err(|e| error_chain(&e)))
    };
    match (load(a), load(b)) {
        (Ok(ca), Ok(cb)) => {
            let diffs = differences(&ca, &cb);
            print!(
                "{}",
                report(
                    &a.display().to_string(),
                    &b.display().to_string(),
                    &diffs,
                    ca.agreed_lines().len()
                )
            );
            if diffs.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// What a start of `c` on this host would refuse, or start without, that the file itself
/// cannot tell: a `control_group` this host does not have; a zone interface it does not have
/// (the agent starts Non-functional until it exists: a typo would stay unnoticed there).
/// Warnings, not errors: the check may run on another host than the member's (a provisioning
/// host).
pub(super) fn host_warnings(c: &Config) -> Vec<String> {
    let group = c.local.control_group.as_deref();
    let mut warnings: Vec<String> = crate::control::server::Access::for_group(group)
        .err()
        .map(|e| format!("{e}: an agent started with it on this host refuses to start"))
        .into_iter()
        .collect();
    for (name, zone, _) in c.interface_zones() {
        if let Err(DatapathError::UnknownInterface(_)) = crate::datapath::ifindex(name) {
            warnings.push(format!(
                "zone `{}`: interface `{name}` does not exist on this host: an agent started \
                 with it is Non-functional until it does",
                zone.name
            ));
        }
    }
    warnings
}

/// `hasync config check FILE...`: each file's member, cluster and fingerprint, or its
/// problems (and what this host would refuse: [`host_warnings`]); fails if any file does.
fn check(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for path in files {
        match Config::load(path) {
            Ok(c) => {
                let hex: String = c.fingerprint()[..8]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                println!(
                    "ok: {} (member {}, cluster {}, fingerprint {hex})",
                    path.display(),
                    c.local.member,
                    c.cluster.id
                );
                for warning in host_warnings(&c) {
                    eprintln!("warning: {}: {warning}", path.display());
                }
            }
            Err(e) => {
                ok = false;
                eprintln!("error: {e}");
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
