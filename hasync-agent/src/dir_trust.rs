//! Whether a directory another user could have filled may be trusted: the owner, mode and
//! symbolic-link checks that the pin directory, provisioning's output, the state directory,
//! the control socket's directory (and the directories above those three) and the lab's
//! directory share. Each caller words its own refusal from the [`Risk`] found (the risk
//! itself said by its `Display`).

use std::{
    fs::Metadata,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid(2) has no preconditions, cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// What a directory must be to be trusted.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Root may own it too (not only this process's user).
    pub root_may_own: bool,
    /// Mode bits no one but the owner may have (`0o022`: no one else writes; `0o077`: no one
    /// else even reads).
    pub closed: u32,
    /// A sticky directory (`/tmp`) may be open to others: there only an entry's owner, or the
    /// directory's, may rename or remove it.
    pub sticky_may_be_open: bool,
}

/// A directory of this user's or root's that no one else may write to (not even a sticky one).
pub const OURS_OR_ROOTS: Policy = Policy {
    root_may_own: true,
    closed: 0o022,
    sticky_may_be_open: false,
};

/// A directory above a trusted one: this user's or root's, and no one else may write to it
/// unless it is sticky (`/tmp`: there only an entry's owner, or the directory's, may rename or
/// remove it).
pub const ABOVE: Policy = Policy {
    sticky_may_be_open: true,
    ..OURS_OR_ROOTS
};

/// The first directory above `path` under which someone else could replace what follows, with
/// why ([`ABOVE`]); `None` when there is none. Both the path as written (a symbolic link on it
/// is not refused, but the directory that holds the link is checked) and where its links lead
/// are walked. Only directories that exist are looked at: `path` may be made later. An error
/// names the path it came from.
pub fn risk_above(path: &Path) -> Result<Option<(PathBuf, Risk)>, (PathBuf, std::io::Error)> {
    risk_above_under(path, ABOVE)
}

/// [`risk_above`] under `policy`.
pub fn risk_above_under(
    path: &Path,
    policy: Policy,
) -> Result<Option<(PathBuf, Risk)>, (PathBuf, std::io::Error)> {
    let at = |p: &Path| {
        let p = p.to_owned();
        move |e| (p, e)
    };
    let absolute = std::path::absolute(path).map_err(at(path))?;
    let Some(existing) = absolute.ancestors().skip(1).find(|p| p.exists()) else {
        return Ok(None);
    };
    let real = existing.canonicalize().map_err(at(existing))?;
    for above in existing.ancestors().chain(real.ancestors()) {
        let meta = std::fs::symlink_metadata(above).map_err(at(above))?;
        if meta.file_type().is_symlink() {
            continue;
        }
        if let Some(risk) = dir_risk(&meta, policy) {
            return Ok(Some((above.to_owned(), risk)));
        }
    }
    Ok(None)
}

/// Why a directory is not to be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Risk {
    /// It is a symbolic link: where it leads is someone's choice.
    Symlink,
    /// It is not a directory.
    NotDir,
    /// Another user owns it (the uid).
    OwnedBy(u32),
    /// Others have the policy's closed bits on it (the mode, `0o7777` bits).
    Open(u32),
}

/// The risk said plainly, after "it is" (callers that have more to say word their own).
impl std::fmt::Display for Risk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Risk::Symlink => f.write_str("a symbolic link"),
            Risk::NotDir => f.write_str("not a directory"),
            Risk::OwnedBy(uid) => write!(f, "owned by uid {uid}"),
            Risk::Open(mode) => write!(f, "writable by group or others (mode {mode:04o})"),
        }
    }
}

/// The risk of trusting the directory whose own metadata (`symlink_metadata`, not its
/// target's) is `meta`, under `policy`; `None` when there is none.
pub fn dir_risk(meta: &Metadata, policy: Policy) -> Option<Risk> {
    let mode = meta.mode() & 0o7777;
    let uid = meta.uid();
    if meta.file_type().is_symlink() {
        Some(Risk::Symlink)
    } else if !meta.is_dir() {
        Some(Risk::NotDir)
    } else if uid != euid() && !(policy.root_may_own && uid == 0) {
        Some(Risk::OwnedBy(uid))
    } else if mode & policy.closed != 0 && !(policy.sticky_may_be_open && mode & 0o1000 != 0) {
        Some(Risk::Open(mode))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::control::testing::TempDir;

    const STRICT: Policy = Policy {
        root_may_own: false,
        closed: 0o022,
        sticky_may_be_open: false,
    };

    fn risk_of(path: &std::path::Path, policy: Policy) -> Option<Risk> {
        dir_risk(&std::fs::symlink_metadata(path).expect("metadata"), policy)
    }

    fn chmod(path: &std::path::Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn each_risk_is_named_and_the_policy_decides() {
        let tmp = TempDir::new("dir-trust");
        let dir = tmp.path().join("d");
        std::fs::create_dir(&dir).expect("mkdir");
        chmod(&dir, 0o700);
        assert_eq!(risk_of(&dir, STRICT), None);
        chmod(&dir, 0o770);
        assert_eq!(risk_of(&dir, STRICT), Some(Risk::Open(0o770)));
        chmod(&dir, 0o750);
        assert_eq!(risk_of(&dir, STRICT), None, "others may read");
        let private = Policy {
            closed: 0o077,
            ..STRICT
        };
        assert_eq!(risk_of(&dir, private), Some(Risk::Open(0o750)));
        chmod(&dir, 0o1777);
        assert_eq!(risk_of(&dir, STRICT), Some(Risk::Open(0o1777)));
        let sticky = Policy {
            sticky_may_be_open: true,
            ..STRICT
        };
        assert_eq!(risk_of(&dir, sticky), None);
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).expect("symlink");
        assert_eq!(risk_of(&link, sticky), Some(Risk::Symlink));
        let file = tmp.path().join("f");
        std::fs::write(&file, b"").expect("write");
        assert_eq!(risk_of(&file, STRICT), Some(Risk::NotDir));
        // Another user's: a directory handed to uid 65534 (only root may give it away).
        chmod(&dir, 0o700);
        if euid() == 0 {
            std::os::unix::fs::chown(&dir, Some(65_534), None).expect("chown");
            assert_eq!(risk_of(&dir, STRICT), Some(Risk::OwnedBy(65_534)));
        }
        let root = std::path::Path::new("/");
        let root_ok = Policy {
            root_may_own: true,
            ..STRICT
        };
        assert_eq!(risk_of(root, root_ok), None);
    }

    /// The directories above a path: a sticky `/tmp` passes, one that others may write does
    /// not, also when a symbolic link leads through it; what does not exist yet is skipped.
    #[test]
    fn the_first_directory_above_that_others_may_write_is_found() {
        let tmp = TempDir::new("dir-above");
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        let below = open.join("state");
        assert_eq!(risk_above(&below.join("not/yet")).expect("walk"), None);
        chmod(&open, 0o777);
        let found = risk_above(&below.join("not/yet")).expect("walk");
        assert_eq!(found, Some((open.clone(), Risk::Open(0o777))));
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&open, &link).expect("symlink");
        let through = risk_above(&link.join("state")).expect("walk");
        assert_eq!(through, Some((open.clone(), Risk::Open(0o777))));
        // A link in a directory others may write, to a directory that is fine: whoever writes
        // there could point the link elsewhere.
        let fine = tmp.path().join("fine");
        std::fs::create_dir(&fine).expect("mkdir");
        std::os::unix::fs::symlink(&fine, open.join("to-fine")).expect("symlink");
        assert_eq!(risk_above(&fine.join("state")).expect("walk"), None);
        let held = risk_above(&open.join("to-fine").join("state")).expect("walk");
        assert_eq!(held, Some((open.clone(), Risk::Open(0o777))));
    }
}
