//! Building the `hasync` executable that the cluster tests and the sync bench run.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// The cargo profile to build with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

/// `$HASYNC_BIN` if set, else `cargo build [--release] -p hasync-agent --bin hasync` (cargo
/// from `$CARGO`, run in the workspace root) and the executable cargo reports.
///
/// The build runs without the variables cargo sets for the test or bench that calls this
/// (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...): ring's build script reruns when they change,
/// so with them every such build and every plain `cargo build` would rebuild ring and
/// everything above it in turn.
pub fn hasync(profile: Profile) -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("HASYNC_BIN").filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!("HASYNC_BIN={} is not a file", bin.display()))
        };
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("the tests crate has no parent directory")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root)
        .args(["build", "-p", "hasync-agent", "--bin", "hasync"])
        .arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null());
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    for (name, _) in std::env::vars_os() {
        if set_for_the_caller(&name) {
            cmd.env_remove(name);
        }
    }
    let shown = format!("cargo build -p hasync-agent --bin hasync ({profile:?})");
    let out = cmd.output().map_err(|e| format!("running {shown}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // The compiler-artifact message of the `hasync` binary names the executable.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "hasync")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .filter(|bin| bin.is_file())
        .ok_or_else(|| format!("{shown} reported no hasync executable (set HASYNC_BIN)"))
}

/// Is `name` a variable cargo sets for the crate it runs (not one the user set for cargo)?
fn set_for_the_caller(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    const EXACT: &[&str] = &[
        "CARGO_CRATE_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    const PREFIXES: &[&str] = &["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_"];
    EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::set_for_the_caller;

    #[test]
    fn only_the_callers_own_variables_are_left_out() {
        for ours in [
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "OUT_DIR",
            "CARGO_BIN_EXE_x",
        ] {
            assert!(set_for_the_caller(ours.as_ref()), "{ours}");
        }
        for users in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_JOBS",
            "PATH",
        ] {
            assert!(!set_for_the_caller(users.as_ref()), "{users}");
        }
    }
}
