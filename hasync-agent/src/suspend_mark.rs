//! A suspend kept across restarts: a file `suspended` in `[local].state_dir`. `hasync suspend`
//! writes it, and so does a member that suspends itself at its flap limit (`[local]
//! max_flaps`: the mark says which); `hasync functional` removes it, and so does the end of a
//! flap limit's suspend. An agent that starts while it is there starts Suspended. Without it,
//! an agent restarted during a maintenance window (by hand, by the systemd watchdog, after a
//! crash, an upgrade or a reboot) took traffic back before the operator said `hasync
//! functional`.

use std::{
    io,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use tracing::warn;

use crate::{
    cluster::Membership,
    dir_trust::{dir_risk, risk_above, Policy, Risk, OURS_OR_ROOTS},
    lock::lock,
};

/// The mark's file name in the state directory.
const FILE: &str = "suspended";
/// The first line of a mark the flap limit wrote; any other content is the operator's.
const FLAP_LIMIT_LINE: &str = "suspended by its flap limit (local.max_flaps)";
/// The most of a mark read: its first line says whose it is.
const READ_LIMIT: u64 = 4096;

/// After a failed write or removal of the flap limit's mark, the wait before the next try (on
/// the main loop: each try may wait for the disk).
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Who suspended the member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkKind {
    /// `hasync suspend`: until `hasync functional`.
    Operator,
    /// The flap limit: until `hasync functional`, or until no other member is in service.
    FlapLimit,
}

/// Who may own the state directory, and that no one else may write to it: anyone who could
/// would decide whether this member takes traffic after its next start.
const POLICY: Policy = OURS_OR_ROOTS;

/// Reading, writing or removing the mark failed.
#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    /// (The error is said in the message, not as a source: a chain would say it twice.)
    #[error("{what} {path}: {error}")]
    Io {
        what: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("the state directory {path} {why}")]
    Untrusted { path: PathBuf, why: String },
}

/// What a failed write of [`check_writable`]'s probe says it was doing.
pub const PROBING: &str = "writing a probe file";
/// What a failure to make the state directory says it was doing.
pub const CREATING: &str = "creating";

/// The mark's path in `state_dir`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The mark in `state_dir`, if there is one (a missing directory holds none). Anything at its
/// path that is not a file the flap limit wrote counts as the operator's.
pub fn read(state_dir: &Path) -> Result<Option<MarkKind>, MarkError> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    match std::fs::symlink_metadata(state_dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io_error("inspecting", state_dir, source)),
        Ok(meta) => check_trusted(state_dir, &meta)?,
    }
    let mark = path(state_dir);
    if !exists(&mark)? {
        return Ok(None);
    }
    let mut text = String::new();
    // Not through a link, nor waiting on a FIFO: such a mark is the operator's.
    let flap_limit = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&mark)
        .and_then(|f| f.take(READ_LIMIT).read_to_string(&mut text))
        .is_ok_and(|_| text.lines().next() == Some(FLAP_LIMIT_LINE));
    Ok(Some(if flap_limit {
        MarkKind::FlapLimit
    } else {
        MarkKind::Operator
    }))
}

/// Whether something is at `mark` (a link, a directory too: not followed).
fn exists(mark: &Path) -> Result<bool, MarkError> {
    match std::fs::symlink_metadata(mark) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(io_error("inspecting", mark, source)),
    }
}

/// Creates `state_dir` (mode 0700) if it is missing, and checks that it can be trusted.
fn prepare(state_dir: &Path) -> Result<(), MarkError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(|e| io_error(CREATING, state_dir, e))?;
    let meta =
        std::fs::symlink_metadata(state_dir).map_err(|e| io_error("inspecting", state_dir, e))?;
    check_trusted(state_dir, &meta)
}

/// Checks at start that a mark can be written in `state_dir` (creating it if it is missing):
/// a directory the agent cannot write (outside the unit's writable paths: read-only under
/// `ProtectSystem=strict`) started the agent, whose first `hasync suspend` then suspended the
/// member without keeping the mark, and a restart put it back in service.
pub fn check_writable(state_dir: &Path) -> Result<(), MarkError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    prepare(state_dir)?;
    let probe = state_dir.join(format!(".{FILE}.probe"));
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&probe)
    };
    create()
        .or_else(|e| match e.kind() {
            // Whatever an agent that died between these lines left (unlink follows nothing).
            io::ErrorKind::AlreadyExists => std::fs::remove_file(&probe).and_then(|()| create()),
            _ => Err(e),
        })
        .and_then(|_| match std::fs::remove_file(&probe) {
            // Another start's check removed it first.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            removed => removed,
        })
        .map_err(|e| io_error(PROBING, &probe, e))
}

/// Writes the mark of `kind` (creating `state_dir`, mode 0700, if it is missing).
pub fn mark(state_dir: &Path, kind: MarkKind) -> Result<(), MarkError> {
    prepare(state_dir)?;
    let mark = path(state_dir);
    let text = match kind {
        MarkKind::Operator => {
            "suspended by `hasync suspend`; `hasync functional` removes this file\n".to_owned()
        }
        MarkKind::FlapLimit => format!(
            "{FLAP_LIMIT_LINE}\nit serves again when no other member is in service; \
             `hasync functional` removes this file\n"
        ),
    };
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

/// Keeps the flap limit's suspend in the state directory as the membership decides it: written
/// when the member suspends itself, removed when it serves again on its own. Run on the main
/// loop after each evaluation, where the control handler writes and removes the operator's
/// mark too: one writer at a time. (An evaluation on a reader's worker may suspend the member
/// first; its mark follows at the main loop's next evaluation.)
#[derive(Debug)]
pub struct FlapMarkSync {
    /// The flap limit's mark is in the state directory, as far as this agent knows.
    marked: bool,
    /// The last write or removal failed (said once until one succeeds); not tried again
    /// before this.
    failing: Option<Instant>,
}

impl FlapMarkSync {
    /// As `m` starts: marked if it was suspended by a flap limit's mark.
    pub fn new(m: &Membership) -> FlapMarkSync {
        FlapMarkSync {
            marked: m.flap_suspended().is_some(),
            failing: None,
        }
    }

    /// [`FlapMarkSync::sync`], tried now even if a failure asked to wait (the agent stops).
    pub fn sync_now(&mut self, membership: &Mutex<Membership>, state_dir: &Path) {
        self.failing = None;
        self.sync(membership, state_dir);
    }

    /// Writes or removes the mark in `state_dir` if the membership's flap limit suspend changed.
    /// The operator's suspend leaves it alone: its mark is the control handler's.
    pub fn sync(&mut self, membership: &Mutex<Membership>, state_dir: &Path) {
        let (operator, flap) = {
            let m = lock(membership);
            (m.suspended, m.flap_suspended().is_some())
        };
        if operator {
            self.marked = false;
            return;
        }
        if flap == self.marked || self.failing.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let done = if flap {
            mark(state_dir, MarkKind::FlapLimit)
        } else {
            clear(state_dir)
        };
        let retry = Some(Instant::now() + RETRY_AFTER);
        match done {
            Ok(()) => (self.marked, self.failing) = (flap, None),
            Err(e) if self.failing.is_none() => {
                self.failing = retry;
                let then = if flap {
                    "the flap limit's suspend is not kept: a restart would bring this member back into service"
                } else {
                    "the flap limit's suspend ended, but its mark stays: a restart would suspend this member again"
                };
                warn!(error = %e, "{then} (tried again every {} s)", RETRY_AFTER.as_secs());
            }
            Err(_) => self.failing = retry,
        }
    }
}

/// The state directory (`meta`, its own metadata) and the directories above it: refused when
/// someone else could write the mark, or replace the directory that holds it.
fn check_trusted(dir: &Path, meta: &std::fs::Metadata) -> Result<(), MarkError> {
    let above = risk_above(dir).map_err(|(at, e)| io_error("inspecting", &at, e))?;
    if let Some((above, risk)) = above {
        return Err(MarkError::Untrusted {
            path: dir.to_owned(),
            why: format!(
                "lies under {}, {risk}: whoever may write there could replace the state \
                 directory and decide whether this member starts suspended (keep it under \
                 directories only root writes, as /var/lib)",
                above.display()
            ),
        });
    }
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

fn io_error(what: &'static str, path: &Path, error: io::Error) -> MarkError {
    MarkError::Io {
        what,
        path: path.to_owned(),
        error,
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
        assert_eq!(read(&dir).expect("no directory: no mark"), None);
        mark(&dir, MarkKind::Operator).expect("mark");
        assert_eq!(read(&dir).expect("read"), Some(MarkKind::Operator));
        let mode = std::fs::metadata(&dir).expect("dir").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        mark(&dir, MarkKind::FlapLimit).expect("marked twice");
        assert_eq!(read(&dir).expect("read"), Some(MarkKind::FlapLimit));
        clear(&dir).expect("clear");
        assert_eq!(read(&dir).expect("read"), None);
        clear(&dir).expect("cleared twice");
        // Anything else there (an older release's mark, a hand-made one) is the operator's.
        std::fs::create_dir(path(&dir)).expect("a directory at the mark's path");
        assert_eq!(read(&dir).expect("read"), Some(MarkKind::Operator));
    }

    /// A state directory the agent cannot write in is found at start, naming it (before, the
    /// start only read it, and the first `hasync suspend` could not keep its mark); one that
    /// is missing is made.
    #[test]
    fn a_state_directory_that_cannot_be_written_is_found_at_start() {
        let tmp = TempDir::new("suspend-writable");
        let dir = tmp.path().join("state");
        check_writable(&dir).expect("made and writable");
        assert!(dir.is_dir());
        assert_eq!(
            std::fs::read_dir(&dir).expect("list").count(),
            0,
            "probe left"
        );
        // A probe left behind (here a symbolic link to a file that must stay) is replaced.
        let kept = tmp.path().join("kept");
        std::fs::write(&kept, b"kept").expect("write");
        std::os::unix::fs::symlink(&kept, dir.join(".suspended.probe")).expect("symlink");
        check_writable(&dir).expect("a leftover probe replaced");
        assert_eq!(std::fs::read(&kept).expect("kept"), b"kept");
        assert_eq!(
            std::fs::read_dir(&dir).expect("list").count(),
            0,
            "probe left"
        );
        // procfs: a root-owned directory no one may create files in, root included.
        let e = check_writable(Path::new("/proc/1")).expect_err("not writable");
        let said = e.to_string();
        assert!(
            said.starts_with("writing a probe file /proc/1/.suspended.probe: "),
            "{said}"
        );
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
            read(&dir).map(drop).expect_err("untrusted"),
            mark(&dir, MarkKind::Operator).expect_err("untrusted"),
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

    /// A state directory under one that others may write (who could rename it away and put
    /// their own in its place) is refused too, naming that one.
    #[test]
    fn a_state_directory_under_one_others_may_write_is_refused() {
        let tmp = TempDir::new("suspend-above");
        let open = tmp.path().join("shared");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let dir = open.join("state");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let e = read(&dir).map(drop).expect_err("untrusted").to_string();
        assert!(
            e.contains(&format!(
                "lies under {}, writable by group or others (mode 0777)",
                open.display()
            )),
            "{e}"
        );
        mark(&dir, MarkKind::Operator).expect_err("untrusted");
        assert!(!path(&dir).exists(), "nothing written");
    }
}
