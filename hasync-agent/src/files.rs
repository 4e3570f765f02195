//! Files written whole or not at all: through a temporary file beside the target, synced, then
//! renamed (or linked) into place, so a failure (a full disk, a crash) never leaves a config
//! or a key half written where a reader looks, or an old one gone. (A new file on a file
//! system without hard links is created in place: a crash there can leave part of it.)

use std::{
    fs::{self, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

/// Makes `dir` a new, empty directory of this process's with `mode` (whatever the umask): what
/// was there is removed first (a symbolic link itself, never what it leads to), and the
/// directory is made afresh, never taken as found. Under a directory others may write (/tmp),
/// one made there by another user between the removal and the creation makes this fail: a
/// name guessed ahead (a pid) must not hand them the files root writes in it.
pub fn fresh_dir(dir: &Path, mode: u32) -> io::Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(dir)?,
        Ok(_) => fs::remove_file(dir)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    fs::DirBuilder::new().mode(mode).create(dir)?;
    // Through the directory itself, never a link put in its place since (a directory others
    // may write without the sticky bit).
    let made = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)?;
    made.set_permissions(fs::Permissions::from_mode(mode))
}

/// Writes `bytes` to `path` with `mode`, replacing what was there (a symbolic link there is
/// replaced, never followed).
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = write_temp(path, bytes, mode)?;
    let placed = fs::rename(&tmp, path);
    finish(path, &tmp, placed)
}

/// Writes `bytes` to `path` with `mode` only if nothing is there: false, and `path` untouched,
/// if something is.
pub fn create_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<bool> {
    let tmp = write_temp(path, bytes, mode)?;
    // A hard link fails where the name exists, as `O_EXCL` does, but only ever shows the whole
    // file.
    match fs::hard_link(&tmp, path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let _ = fs::remove_file(&tmp);
            Ok(false)
        }
        // A file system without hard links (vfat, many FUSE ones): created in place, never
        // over what is there.
        Err(e) if no_hard_links(&e) => {
            let _ = fs::remove_file(&tmp);
            create_in_place(path, bytes, mode)
        }
        linked => finish(path, &tmp, linked.and_then(|()| fs::remove_file(&tmp))).map(|()| true),
    }
}

/// Does `e`, from a hard link, say the file system has none?
fn no_hard_links(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPERM | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

/// `O_EXCL` and a write: false if something is at `path`; a failed write removes the part.
fn create_in_place(path: &Path, bytes: &[u8], mode: u32) -> io::Result<bool> {
    let mut f = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
    {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        opened => opened?,
    };
    let written = f
        .write_all(bytes)
        .and_then(|()| f.set_permissions(fs::Permissions::from_mode(mode)))
        .and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(true)
}

/// The whole of `bytes` in a new temporary file beside `path`, synced, with `mode` (which the
/// umask may have narrowed at its creation).
fn write_temp(path: &Path, bytes: &[u8], mode: u32) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .map_or_else(|| "hasync".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.new-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()
    };
    match write() {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// After the step that put the file in place: on failure the temporary file goes; on success
/// the directory's entry is synced too (best effort: a file system that cannot sync a
/// directory still has the file whole).
fn finish(path: &Path, tmp: &Path, placed: io::Result<()>) -> io::Result<()> {
    if let Err(e) = placed {
        let _ = fs::remove_file(tmp);
        return Err(e);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hasync-files-{}-{tag}", std::process::id()));
        fresh_dir(&d, 0o755).expect("temp dir");
        d
    }

    /// A directory made fresh is this process's, with the mode asked whatever the umask and
    /// whatever was at the path: another user's directory there (its files with it) is
    /// removed, not taken; a symbolic link there is removed, not followed (before stop 51 the
    /// tests' and benches' directories under /tmp were taken as found: the lab review).
    #[test]
    fn a_fresh_directory_is_ours_and_new() {
        use std::os::unix::fs::{symlink, PermissionsExt as _};
        let base = dir("fresh");
        let theirs = base.join("theirs");
        fs::create_dir(&theirs).expect("mkdir");
        fs::write(theirs.join("planted"), b"x").expect("plant");
        std::os::unix::fs::chown(&theirs, Some(65_534), Some(65_534)).expect("chown (root)");
        fresh_dir(&theirs, 0o700).expect("made fresh");
        let meta = fs::symlink_metadata(&theirs).expect("stat");
        assert_eq!(meta.uid(), crate::dir_trust::euid());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
        assert!(
            !theirs.join("planted").exists(),
            "the planted file is still there"
        );
        let target = base.join("target");
        fs::create_dir(&target).expect("mkdir");
        let link = base.join("link");
        symlink(&target, &link).expect("symlink");
        fresh_dir(&link, 0o755).expect("made fresh");
        assert!(
            fs::symlink_metadata(&link).expect("stat").is_dir(),
            "still a link"
        );
        assert!(target.is_dir(), "the link's target was removed");
        fs::remove_dir_all(&base).expect("cleanup");
    }

    /// A replace puts the whole new file in place with its mode; a failed one (here: the
    /// target is a directory) leaves what was there and no temporary file.
    #[test]
    fn a_replace_is_whole_or_not_at_all() {
        let d = dir("replace");
        let f = d.join("hasync.toml");
        fs::write(&f, b"old").expect("old");
        replace(&f, b"new config", 0o600).expect("replace");
        assert_eq!(fs::read(&f).expect("read"), b"new config");
        assert_eq!(fs::metadata(&f).expect("meta").mode() & 0o777, 0o600);
        let blocked = d.join("sub");
        fs::create_dir_all(blocked.join("inside")).expect("dir");
        replace(&blocked, b"x", 0o644).expect_err("a directory with entries is not replaced");
        assert!(blocked.join("inside").is_dir());
        let left: Vec<_> = fs::read_dir(&d).expect("list").collect();
        assert_eq!(left.len(), 2, "a temporary file was left: {left:?}");
        fs::remove_dir_all(&d).expect("clean up");
    }

    /// A create_new never overwrites: what is there stays, and no temporary file is left.
    #[test]
    fn a_create_new_never_overwrites() {
        let d = dir("create");
        let key = d.join("cluster.key");
        assert!(create_new(&key, &[1; 32], 0o600).expect("created"));
        assert!(!create_new(&key, &[2; 32], 0o600).expect("kept"));
        assert_eq!(fs::read(&key).expect("read"), [1; 32]);
        assert_eq!(fs::read_dir(&d).expect("list").count(), 1);
        // The way taken on a file system without hard links: the same rule.
        let other = d.join("other.key");
        assert!(create_in_place(&other, &[3; 32], 0o600).expect("created"));
        assert!(!create_in_place(&other, &[4; 32], 0o600).expect("kept"));
        assert_eq!(fs::read(&other).expect("read"), [3; 32]);
        assert_eq!(fs::metadata(&other).expect("meta").mode() & 0o777, 0o600);
        fs::remove_dir_all(&d).expect("clean up");
    }
}
