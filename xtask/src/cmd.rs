//! The one place xtask starts child processes, so every failure names its command.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// Cargo's target directory: `$CARGO_TARGET_DIR`, else `target` (xtask runs from the
/// workspace root).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| "target".into(), PathBuf::from)
}

/// `cmd` as the line a user would type: `LLVM_PREFIX=/usr/lib/llvm-22 cargo install ...`.
pub fn display(cmd: &Command) -> String {
    let mut line = String::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            line.push_str(&format!(
                "{}={} ",
                key.to_string_lossy(),
                value.to_string_lossy()
            ));
        }
    }
    line.push_str(&cmd.get_program().to_string_lossy());
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Echoes `cmd`, then runs it attached to the terminal.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    eprintln!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// A child started by [`spawn_logged`].
pub struct Logged {
    child: Child,
    line: String,
    log: PathBuf,
}

/// Echoes `cmd`, then starts it with its output going to `log` (created or truncated).
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Logged> {
    let line = display(cmd);
    eprintln!("$ {line} > {}", log.display());
    let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = file
        .try_clone()
        .with_context(|| format!("opening {} twice", log.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .with_context(|| format!("could not start `{line}`"))?;
    Ok(Logged {
        child,
        line,
        log: log.to_owned(),
    })
}

impl Logged {
    /// Waits for the child, copies its log to stderr, and fails if the child did.
    pub fn wait(mut self) -> Result<()> {
        let status = self
            .child
            .wait()
            .with_context(|| format!("waiting for `{}`", self.line))?;
        eprintln!("==> output of `{}`:", self.line);
        match std::fs::read_to_string(&self.log) {
            Ok(text) => eprint!("{text}"),
            Err(e) => eprintln!("(could not read {}: {e})", self.log.display()),
        }
        if !status.success() {
            bail!("`{}` failed ({status})", self.line);
        }
        Ok(())
    }
}

/// Runs `cmd` quietly and returns its trimmed stdout; a failure carries its stderr.
pub fn capture(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8(output.stdout)
        .with_context(|| format!("`{line}` printed non-UTF-8 output"))?;
    Ok(stdout.trim().to_owned())
}

/// `cargo` through the rustup proxy (not `$CARGO`), so that `+nightly` works.
pub fn cargo<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new("cargo");
    cmd.args(args);
    cmd
}
