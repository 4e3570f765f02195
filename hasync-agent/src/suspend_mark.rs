//! The operator's `hasync suspend`, kept across restarts: a file `suspended` in
//! `[local].state_dir`. `hasync suspend` writes it (and so does a member that suspends itself at
//! its flap limit, `[local] max_flaps`) and `hasync functional` removes it; an agent that starts
//! while it is there starts Suspended. Without it, an agent restarted during a
//! maintenance window (by hand, by the systemd watchdog, after a crash, an upgrade or a
//! reboot) took traffic back before the operator said `hasync functional`.

use std::{
    io,
    path::{Path, PathBuf},
};

use crate::dir_trust::{dir_risk, Policy, Risk, OURS_OR_ROOTS};

/// The mark's file name in the state directory.
const FILE: &str = "suspended";

/// Who may own the state directory, and that no one else may write to it: anyone who could
/// would decide whether this member takes traffic after its next start.
const POLICY: Policy = OURS_OR_ROOTS;

/// Reading, writing or removing the mark failed.
#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("the state directory {path} {why}")]
    Untrusted { path: PathBuf, why: String },
}

/// The mark's path in `state_dir`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Whether the mark is in `state_dir` (a missing directory holds none).
pub fn is_marked(state_dir: &Path) -> Result<bool, MarkError> {
    match std::fs::symlink_metadata(state_dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => return Err(io_error("inspecting", state_dir, source)),
        Ok(meta) => check_trusted(state_dir, &meta)?,
    }
    exists(&path(state_dir))
}

/// Whether something is at `mark` (a link, a directory too: not followed).
fn exists(mark: &Path) -> Result<bool, MarkError> {
    match std::fs::symlink_metadata(mark) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(io_error("inspecting", mark, source)),
    }
}

/// Writes the mark (creating `state_dir`, mode 0700, if it is missing); `why` names who
/// suspended the member (`hasync suspend`, its flap limit), for whoever reads the file.
pub fn mark(state_dir: &Path, why: &str) -> Result<(), MarkError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(|e| io_error("creating", state_dir, e))?;
    let meta =
        std::fs::symlink_metadata(state_dir).map_err(|e| io_error("inspecting", state_dir, e))?;
    check_trusted(state_dir, &meta)?;
    let mark = path(state_dir);
    let text = format!("suspended by {why}; `hasync functional` removes this file\n");
    crate::files::replace(&mark, text.as_bytes(), 0o600).map_err(|e| io_error("writing", &mark, e))
}

/// Removes the mark, if it is there (looked for first: a state directory this agent cannot
/// write, read-only under the unit's sandbox, holds no mark to remove).
pub fn clear(state_dir: &Path) -> Result<(), MarkError> {
    let mark = path(state_dir);
    if !exists(&mark)? {
        return Ok(());
    }
    match std::fs::remove_file(&mark) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error("removing", &mark, e)),
        _ => Ok(()),
    }
}

fn check_trusted(dir: &Path, meta: &std::fs::Metadata) -> Result<(), MarkError> {
    let why = match dir_risk(meta, POLICY) {
        None => return Ok(()),
        Some(Risk::Symlink) => "is a symbolic link: give the directory itself".to_string(),
        Some(Risk::NotDir) => "is not a directory".to_string(),
        Some(Risk::OwnedBy(uid)) => {
            format!("is owned by uid {uid}: its owner decides whether this member starts suspended")
        }
        Some(Risk::Open(mode)) => format!(
            "is writable by group or others (mode {mode:04o}): any of them decides whether this \
             member starts suspended (chmod go-w)"
        ),
    };
    Err(MarkError::Untrusted {
        path: dir.to_owned(),
        why,
    })
}

fn io_error(what: &'static str, path: &Path, source: io::Error) -> MarkError {
    MarkError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::control::testing::TempDir;

    #[test]
    fn the_mark_is_written_found_and_removed() {
        let tmp = TempDir::new("suspend-mark");
        let dir = tmp.path().join("state");
        assert!(!is_marked(&dir).expect("no directory: no mark"));
        mark(&dir, "a test").expect("mark");
        assert!(is_marked(&dir).expect("read"));
        let mode = std::fs::metadata(&dir).expect("dir").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        mark(&dir, "a test").expect("marked twice");
        clear(&dir).expect("clear");
        assert!(!is_marked(&dir).expect("read"));
        clear(&dir).expect("cleared twice");
    }

    /// A state directory others may write to is refused, naming it: its mark decides whether
    /// the member takes traffic after a start.
    #[test]
    fn a_state_directory_others_may_write_is_refused() {
        let tmp = TempDir::new("suspend-open");
        let dir = tmp.path().join("state");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        for e in [
            is_marked(&dir).expect_err("untrusted"),
            mark(&dir, "a test").expect_err("untrusted"),
        ] {
            let msg = e.to_string();
            assert!(
                msg.contains("writable by group or others (mode 0777)")
                    && msg.contains(&dir.display().to_string()),
                "{msg}"
            );
        }
        assert!(!path(&dir).exists(), "nothing written");
    }
}
