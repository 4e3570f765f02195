//! Pinning: the datapath's maps and XDP links live in a directory on bpffs, so they outlive the
//! agent. A restart or an upgrade reuses them: the sessions stay in the table, and each XDP link
//! is switched atomically (`bpf_link_update`) to the newly loaded program, so traffic is never
//! interrupted nor seen by no program.
//!
//! Layout of a pin directory (`[local] pin_dir`, default [`DEFAULT_PIN_DIR`]):
//! - `maps/NAME`: the maps that carry state across a restart ([`MAPS`]; the others, such as the
//!   forwarding ports and the peers' pool, are made again at each load);
//! - `links/IF:MODE`: the XDP link of data interface IF, attached in MODE (`native`, `generic`).
//!   bpffs reserves names with dots, which interface names may have (`eth0.100`): a dot of IF
//!   is written as `:`, which interface names never have (`links/eth0:100:native`).
//!
//! A pinned map is reused only if its layout (type, key and value size, flags) is the one the new
//! program declares. SESSIONS is the only map whose content cannot be rebuilt: another layout is
//! an error telling the operator to run `hasync teardown`, never a silent loss of the sessions;
//! another capacity keeps the pinned table (resizing it needs a teardown). The other maps are
//! written at every start (CONFIG, ZONES, MEMBERS) or transient (COUNTERS, EVENTS): another
//! layout replaces them, with a warning.
//!
//! [`teardown`] removes a pin directory: the links first (which detaches XDP), then the maps.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fmt,
    fs::{self, DirBuilder},
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, OwnedFd},
        unix::{
            ffi::OsStrExt as _,
            fs::{DirBuilderExt as _, MetadataExt as _},
        },
    },
    path::{Path, PathBuf},
};

use hasync_common::maps as names;

use super::{
    attach::check_interface_name,
    sys::{
        self, bpf_link_info, bpf_link_type, bpf_map_info, bpf_map_type, map_type_u32, obj_get,
        obj_info,
    },
    AttachMode, DatapathError,
};
use crate::dir_trust::{dir_risk, euid, Policy, Risk};

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/hasync";
/// Where bpffs is mounted on a usual Linux host (systemd mounts it at boot).
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// `BPF_FS_MAGIC` (include/uapi/linux/magic.h): statfs' `f_type` on bpffs.
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// The program's maps, all pinned, in the order they are checked.
pub const MAPS: [&str; 11] = [
    names::SESSIONS,
    names::ZONE_NAMES,
    names::FRAGMENTS,
    names::EMBRYOS,
    names::EMBRYO_HEAD,
    names::REPLICA_EMBRYO_HEAD,
    names::CONFIG,
    names::ZONES,
    names::MEMBERS,
    names::COUNTERS,
    names::EVENTS,
];

const MAPS_DIR: &str = "maps";
const LINKS_DIR: &str = "links";

const BPF_MAP_TYPE_RINGBUF: u32 = map_type_u32(bpf_map_type::BPF_MAP_TYPE_RINGBUF);

/// A pin directory and its layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> PinDir {
        PinDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join(MAPS_DIR)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join(LINKS_DIR)
    }

    pub fn map_path(&self, map: &str) -> PathBuf {
        self.maps_dir().join(map)
    }

    pub fn link_path(&self, interface: &str, mode: AttachMode) -> PathBuf {
        self.links_dir()
            .join(format!("{}:{mode}", interface.replace('.', ":")))
    }

    /// Checks that the directory is below a bpffs mount (not its root, which other programs
    /// share) and creates it, with `maps/` and `links/`, mode 0700.
    pub fn prepare(&self) -> Result<(), DatapathError> {
        check_bpffs(&self.root)?;
        let dirs = [self.root.clone(), self.maps_dir(), self.links_dir()];
        create_dirs(&dirs)?;
        dirs.iter().try_for_each(|d| check_own_dir(d))
    }

    /// Takes the directory for this process, then readies it ([`PinDir::prepare`]): refused
    /// while another agent, or a teardown, holds it, before anything in it is made or changed.
    pub fn lock(&self) -> Result<PinLock, DatapathError> {
        check_bpffs(&self.root)?;
        create_dirs(std::slice::from_ref(&self.root))?;
        check_own_dir(&self.root)?;
        let held = PinLock::take(&self.root)?;
        self.prepare()?;
        Ok(held)
    }

    /// Every entry of `links/`, with the interface and mode its name gives (`None`: a name
    /// this layout does not use).
    pub fn pinned_links(&self) -> Result<Vec<(PathBuf, Option<LinkName>)>, DatapathError> {
        let dir = self.links_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(pin_io("reading", &dir)(e)),
        };
        let mut links = Vec::new();
        for entry in entries {
            let entry = entry.map_err(pin_io("reading", &dir))?;
            let parsed = entry.file_name().to_str().and_then(parse_link_name);
            links.push((entry.path(), parsed));
        }
        links.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(links)
    }

    /// The pinned link of `interface`, if any.
    pub fn find_link(
        &self,
        interface: &str,
    ) -> Result<Option<(PathBuf, AttachMode)>, DatapathError> {
        Ok(self
            .pinned_links()?
            .into_iter()
            .find_map(|(path, parsed)| match parsed {
                Some((name, mode)) if name == interface => Some((path, mode)),
                _ => None,
            }))
    }
}

/// The interface and mode a link pin's name gives.
pub type LinkName = (String, AttachMode);

/// `IF:MODE` → (IF, MODE), the dots of IF written as `:` (see [`PinDir::link_path`]).
pub fn parse_link_name(name: &str) -> Option<LinkName> {
    let (interface, mode) = name.rsplit_once(':')?;
    let mode = match mode {
        "native" => AttachMode::Native,
        "generic" => AttachMode::Generic,
        _ => return None,
    };
    let interface = interface.replace(':', ".");
    check_interface_name(&interface).ok()?;
    Some((interface, mode))
}

/// Checks that `dir` is a directory of this process's user that no one else may write to,
/// not a symbolic link: the agent reuses the maps it finds there, so a directory another user
/// made (on a bpffs mounted for others to write, or delegated) could hand it maps that user
/// can write, and a link could point it at another datapath's.
fn check_own_dir(dir: &Path) -> Result<(), DatapathError> {
    let meta = fs::symlink_metadata(dir).map_err(pin_io("inspecting", dir))?;
    let policy = Policy {
        root_may_own: false,
        closed: 0o022,
        sticky_may_be_open: false,
    };
    let why = match dir_risk(&meta, policy) {
        None => return Ok(()),
        Some(Risk::Symlink) => SYMLINK_DIR.to_string(),
        Some(Risk::NotDir) => "it is not a directory".to_string(),
        Some(Risk::OwnedBy(uid)) => format!(
            "it is owned by uid {uid}, not by this agent's ({}): remove it (`hasync teardown`) \
             and let the agent create it",
            euid()
        ),
        Some(Risk::Open(mode)) => format!("others may write to it (mode {mode:o}): `chmod 700` it"),
    };
    Err(pin_dir_error(dir, why))
}

/// Why a pin directory that is a symbolic link is refused.
const SYMLINK_DIR: &str = "it is a symbolic link: give the directory itself";

/// Creates each of `dirs` (and its parents), mode 0700.
fn create_dirs(dirs: &[PathBuf]) -> Result<(), DatapathError> {
    for dir in dirs {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(pin_io("creating", dir))?;
    }
    Ok(())
}

/// An exclusive hold of a pin directory for as long as it lives: `flock` on the directory
/// itself (bpffs holds no plain files), taken by every agent that loads a pinned datapath and
/// by `hasync teardown`. Without it a second agent started by hand while the service runs
/// rewrote the running one's config, zones and links before it found the control socket taken
/// and stopped, leaving the running member's interfaces on its own program.
#[derive(Debug)]
pub struct PinLock {
    _dir: fs::File,
}

impl PinLock {
    /// Takes `dir`, or says who holds it.
    fn take(dir: &Path) -> Result<PinLock, DatapathError> {
        let file = fs::File::open(dir).map_err(pin_io("opening", dir))?;
        // SAFETY: `file` is an open descriptor; flock(2) reads nothing from memory.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Self::still_named(dir, file);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(pin_io("locking", dir)(e));
        }
        let holder = file
            .metadata()
            .ok()
            .and_then(|m| flock_holder(&fs::read_to_string("/proc/locks").ok()?, m.dev(), m.ino()))
            .map_or_else(String::new, |pid| format!(" (process {pid})"));
        Err(pin_dir_error(
            dir,
            format!(
                "in use by another hasync agent or teardown{holder}: stop it first \
                 (`systemctl stop hasync`), or give this agent another `[local] pin_dir`"
            ),
        ))
    }

    /// The hold of `file`, locked, if `dir` still names it: a teardown that held the directory
    /// may have removed it between the open and the lock, leaving a hold of nothing.
    fn still_named(dir: &Path, file: fs::File) -> Result<PinLock, DatapathError> {
        let held = file.metadata().map_err(pin_io("reading", dir))?;
        let named = fs::metadata(dir).ok();
        if named.is_some_and(|m| (m.dev(), m.ino()) == (held.dev(), held.ino())) {
            Ok(PinLock { _dir: file })
        } else {
            Err(pin_dir_error(
                dir,
                "was removed while this agent took it (a teardown ran): start the agent again"
                    .to_owned(),
            ))
        }
    }
}

/// The process that holds a `flock` on the file `dev`/`ino`, as `/proc/locks` (`locks`) lists
/// it: `N: FLOCK ADVISORY WRITE PID MAJ:MIN:INO START END`, device numbers in hex.
fn flock_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let file = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, "FLOCK", _, _, pid, id, ..] if *id == file => pid.parse().ok(),
            _ => None,
        }
    })
}

pub(crate) fn pin_io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DatapathError {
    let path = path.to_owned();
    move |source| DatapathError::PinIo { what, path, source }
}

fn pin_dir_error(path: &Path, why: String) -> DatapathError {
    DatapathError::PinDir {
        path: path.to_owned(),
        why,
    }
}

/// Swaps the pins at `a` and `b` in one step (renameat2 with RENAME_EXCHANGE, which bpffs
/// supports): neither object is unpinned, so a pinned link stays attached.
pub(crate) fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    let c_path = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (ca, cb) = (c_path(a)?, c_path(b)?);
    // SAFETY: both are valid NUL-terminated paths, alive for the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// statfs(2)'s `f_type` of `path`.
fn fs_type(path: &Path) -> io::Result<u64> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: statfs only writes the struct we own; a zeroed statfs is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a valid out pointer.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // `f_type` is a signed long on most targets; the magic numbers are positive 32-bit values.
    #[expect(
        clippy::cast_sign_loss,
        reason = "filesystem magic numbers are positive"
    )]
    Ok(st.f_type as u64)
}

/// Whether `path` is on bpffs.
pub fn on_bpffs(path: &Path) -> bool {
    fs_type(path).is_ok_and(|t| t == BPF_FS_MAGIC)
}

/// Checks that `dir` is an absolute path below the root of a bpffs mount: its nearest existing
/// ancestor (or itself) is on bpffs, and it is not the mount's root.
fn check_bpffs(dir: &Path) -> Result<(), DatapathError> {
    if !dir.is_absolute() {
        return Err(pin_dir_error(dir, "it is not an absolute path".into()));
    }
    let mut existing = dir;
    while fs::symlink_metadata(existing).is_err() {
        match existing.parent() {
            Some(parent) => existing = parent,
            None => break,
        }
    }
    let fs = fs_type(existing).map_err(pin_io("inspecting", existing))?;
    if fs != BPF_FS_MAGIC {
        return Err(pin_dir_error(dir, not_on_bpffs(existing)));
    }
    // bpffs refuses names with a dot (reserved for its own files): say so before mkdir does.
    if let Ok(below) = dir.strip_prefix(existing) {
        if let Some(bad) = below
            .components()
            .find(|c| c.as_os_str().as_bytes().contains(&b'.'))
        {
            return Err(pin_dir_error(
                dir,
                format!(
                    "bpffs does not allow dots in names, and \"{}\" has one",
                    bad.as_os_str().to_string_lossy()
                ),
            ));
        }
    }
    if existing == dir && is_mount_root(dir).map_err(pin_io("inspecting", dir))? {
        return Err(pin_dir_error(
            dir,
            format!(
                "it is the root of a bpffs mount, which other programs share: use a directory \
                 below it, e.g. {}",
                dir.join("hasync").display()
            ),
        ));
    }
    Ok(())
}

/// Why `existing` (the nearest existing part of a pin directory, not on bpffs) will not do,
/// and what to do: pick a directory below the bpffs mount, or mount one there.
fn not_on_bpffs(existing: &Path) -> String {
    if on_bpffs(Path::new(BPFFS_MOUNT)) {
        format!(
            "{} is not on a BPF filesystem (bpffs); pinned objects must live on one: \
             set [local] pin_dir to a directory below {BPFFS_MOUNT}",
            existing.display()
        )
    } else {
        format!(
            "{} is not on a BPF filesystem (bpffs), and none is mounted at \
             {BPFFS_MOUNT}: mount it with `mount -t bpf bpf {BPFFS_MOUNT}` (systemd \
             does at boot; `cargo xtask setup` does for a lab)",
            existing.display()
        )
    }
}

fn is_mount_root(dir: &Path) -> io::Result<bool> {
    let Some(parent) = dir.parent() else {
        return Ok(true);
    };
    Ok(fs::metadata(dir)?.dev() != fs::metadata(parent)?.dev())
}

/// The layout of a map: what the kernel reports of a pinned one, or what the program declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapShape {
    /// Whether a program made for `other` can use a map of this shape: same type, key and value
    /// sizes, and flags (the capacity may differ).
    pub fn same_layout(&self, other: &MapShape) -> bool {
        let MapShape {
            map_type,
            key_size,
            value_size,
            max_entries: _,
            flags,
        } = *self;
        map_type == other.map_type
            && key_size == other.key_size
            && value_size == other.value_size
            && flags == other.flags
    }
}

impl fmt::Display for MapShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use bpf_map_type as T;
        let kind = match bpf_map_type::try_from(self.map_type) {
            Ok(T::BPF_MAP_TYPE_HASH) => Some("hash"),
            Ok(T::BPF_MAP_TYPE_ARRAY) => Some("array"),
            Ok(T::BPF_MAP_TYPE_PERCPU_HASH) => Some("percpu_hash"),
            Ok(T::BPF_MAP_TYPE_PERCPU_ARRAY) => Some("percpu_array"),
            Ok(T::BPF_MAP_TYPE_LRU_HASH) => Some("lru_hash"),
            Ok(T::BPF_MAP_TYPE_LRU_PERCPU_HASH) => Some("lru_percpu_hash"),
            Ok(T::BPF_MAP_TYPE_RINGBUF) => Some("ringbuf"),
            _ => None,
        };
        match kind {
            Some(kind) => f.write_str(kind)?,
            None => write!(f, "map type {}", self.map_type)?,
        }
        write!(
            f,
            ", key {} B, value {} B, {} entries",
            self.key_size, self.value_size, self.max_entries
        )?;
        if self.flags != 0 {
            write!(f, ", flags {:#x}", self.flags)?;
        }
        Ok(())
    }
}

/// The ring buffer size aya creates for a declared one: a power-of-two number of pages.
fn ringbuf_bytes(declared: u32) -> u32 {
    // SAFETY: sysconf has no preconditions.
    let page = u32::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    if declared == 0 || page == 0 {
        return declared;
    }
    declared
        .div_ceil(page)
        .checked_next_power_of_two()
        .and_then(|pages| pages.checked_mul(page))
        .unwrap_or(declared)
}

/// The shapes the program in `object` declares for [`MAPS`], as aya creates them: SESSIONS
/// with `capacity` entries, the ring buffer rounded to pages.
/// The shapes of the object's maps as they will be created, with `sizes` (map name, entries)
/// for the maps the loader resizes.
pub fn declared_shapes(
    object: &[u8],
    sizes: &[(&str, u32)],
) -> Result<BTreeMap<&'static str, MapShape>, DatapathError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| DatapathError::Load(e.into()))?;
    let mut shapes = BTreeMap::new();
    for name in MAPS {
        let map = obj.maps.get(name).ok_or(DatapathError::NoMap(name))?;
        let mut shape = MapShape {
            map_type: map.map_type(),
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: map.max_entries(),
            flags: map.map_flags(),
        };
        if let Some((_, entries)) = sizes.iter().find(|(n, _)| *n == name) {
            shape.max_entries = *entries;
        }
        if shape.map_type == BPF_MAP_TYPE_RINGBUF {
            // aya creates ring buffers with a value size of 0 and a page-rounded size.
            shape.value_size = 0;
            shape.max_entries = ringbuf_bytes(shape.max_entries);
        }
        shapes.insert(name, shape);
    }
    Ok(shapes)
}

/// What became of each map at load, with a pin directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinReport {
    pub dir: PathBuf,
    /// Found pinned and reused (with their content).
    pub reused: Vec<&'static str>,
    /// Found pinned with another layout, replaced by new empty ones: (map, why).
    pub replaced: Vec<(&'static str, String)>,
    /// Not pinned before: created and pinned.
    pub created: Vec<&'static str>,
    /// SESSIONS' capacity, when the pinned table's differs from the one asked for (kept).
    pub kept_capacity: Option<u32>,
}

impl PinReport {
    /// Whether the session table survived from an earlier agent.
    pub fn sessions_reused(&self) -> bool {
        self.reused.contains(&names::SESSIONS)
    }

    /// Whether the session table was kept but the zone names its sessions were made with were
    /// not (replaced by another layout, or their pin removed): the order of the zones can then
    /// not be checked against the sessions, which name zones by position.
    pub fn zone_order_unchecked(&self) -> bool {
        self.sessions_reused() && !self.reused.contains(&names::ZONE_NAMES)
    }
}

/// Compares the maps pinned in `pins` with `declared`: keeps the compatible ones, removes the
/// pins of incompatible rebuildable ones (so the loader creates them anew) and refuses an
/// incompatible SESSIONS. Returns the report and the session capacity to load with.
pub fn check_pinned_maps(
    pins: &PinDir,
    declared: &BTreeMap<&'static str, MapShape>,
    capacity: u32,
) -> Result<(PinReport, u32), DatapathError> {
    let mut report = PinReport {
        dir: pins.root().to_owned(),
        ..PinReport::default()
    };
    let mut capacity = capacity;
    // Everything is checked before anything is removed: a refusal leaves the directory as is.
    let mut replace = Vec::new();
    for (&name, wanted) in declared {
        let path = pins.map_path(name);
        if fs::symlink_metadata(&path).is_err() {
            report.created.push(name);
            continue;
        }
        let pinned = obj_get(&path)
            .and_then(|fd| map_shape(&fd))
            .map_err(pin_io("opening the pinned map", &path))?;
        if pinned.same_layout(wanted) && (name == names::SESSIONS || pinned == *wanted) {
            if name == names::SESSIONS && pinned.max_entries != capacity {
                report.kept_capacity = Some(pinned.max_entries);
                capacity = pinned.max_entries;
            }
            report.reused.push(name);
        } else if name == names::SESSIONS {
            return Err(DatapathError::PinnedMapLayout {
                map: name,
                path,
                pinned,
                wanted: *wanted,
            });
        } else {
            replace.push((name, path, format!("pinned: {pinned}; needed: {wanted}")));
        }
    }
    for (name, path, why) in replace {
        fs::remove_file(&path).map_err(pin_io("removing", &path))?;
        report.replaced.push((name, why));
    }
    Ok((report, capacity))
}

/// The capacity of the session table pinned in `pins`, if one is (and can be read): a pinned
/// table keeps its capacity, and what is sized after it follows.
pub fn pinned_capacity(pins: &PinDir) -> Option<u32> {
    let path = pins.map_path(names::SESSIONS);
    fs::symlink_metadata(&path).ok()?;
    let shape = obj_get(&path).and_then(|fd| map_shape(&fd)).ok()?;
    Some(shape.max_entries)
}

/// The shape of a map fd (from `struct bpf_map_info`).
fn map_shape(fd: &OwnedFd) -> io::Result<MapShape> {
    use std::os::fd::AsFd as _;
    let info: bpf_map_info = obj_info(fd.as_fd())?;
    Ok(MapShape {
        map_type: info.type_,
        key_size: info.key_size,
        value_size: info.value_size,
        max_entries: info.max_entries,
        flags: info.map_flags,
    })
}

/// What the kernel says of a pinned XDP link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpLinkInfo {
    /// The program it runs.
    pub program_id: u32,
    /// The interface it is attached to; 0 once that interface is gone (a defunct link).
    pub ifindex: u32,
}

/// Reads the XDP link pinned at `path`; an error if it is not an XDP link.
pub fn xdp_link_info(path: &Path) -> io::Result<XdpLinkInfo> {
    use std::os::fd::AsFd as _;
    xdp_link_info_of(obj_get(path)?.as_fd())
}

/// Detaches the XDP link pinned at `path` from its interface, then removes the pin. Removing
/// the pin alone would free the link, and detach XDP, only later (the kernel puts an unpinned
/// link from a work queue after an RCU grace period); a caller that reports "detached" must
/// mean it. Returns what the link was attached to, if it was an XDP link.
pub(crate) fn detach_pinned_link(path: &Path) -> Result<Option<XdpLinkInfo>, DatapathError> {
    use std::os::fd::AsFd as _;
    let info = match obj_get(path) {
        Ok(fd) => {
            let info = xdp_link_info_of(fd.as_fd()).ok();
            if info.is_some() {
                sys::link_detach(fd.as_fd()).map_err(pin_io("detaching", path))?;
            }
            info
        }
        Err(_) => None,
    };
    fs::remove_file(path).map_err(pin_io("removing", path))?;
    Ok(info)
}

/// Reads the XDP link `fd`; an error if it is not an XDP link.
pub(crate) fn xdp_link_info_of(fd: BorrowedFd<'_>) -> io::Result<XdpLinkInfo> {
    let info: bpf_link_info = obj_info(fd)?;
    if info.type_ != bpf_link_type::BPF_LINK_TYPE_XDP as u32 {
        return Err(io::Error::other(format!(
            "it is not an XDP link (link type {})",
            info.type_
        )));
    }
    // SAFETY: the union is integer structs (any bytes are valid); the kernel filled its `xdp`
    // member for an XDP link.
    let ifindex = unsafe { info.__bindgen_anon_1.xdp.ifindex };
    Ok(XdpLinkInfo {
        program_id: info.prog_id,
        ifindex,
    })
}

/// The name of interface `ifindex`, if it exists.
pub(crate) fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// One XDP link [`teardown`] removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemovedLink {
    pub path: PathBuf,
    /// Interface and mode, from the pin's name.
    pub named: Option<LinkName>,
    /// What the kernel said of it before removal (`None`: unreadable).
    pub info: Option<XdpLinkInfo>,
    /// The name of the interface it was attached to, seen from this network namespace.
    pub attached_to: Option<String>,
}

impl fmt::Display for RemovedLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        let named = self.named.as_ref().map(|(interface, _)| interface.as_str());
        match self.info {
            None => write!(f, "removed {path} (not a readable XDP link)"),
            Some(XdpLinkInfo { ifindex: 0, .. }) => write!(
                f,
                "removed {path}: its XDP link was already detached (the interface is gone)"
            ),
            Some(XdpLinkInfo { ifindex, .. }) => {
                let name = named.unwrap_or("an interface");
                // The link may belong to another network namespace (a lab member's), where
                // the ifindex means another interface than here.
                let elsewhere = match (&self.attached_to, named) {
                    (Some(here), Some(named)) if here == named => "",
                    _ => ", in another network namespace",
                };
                write!(
                    f,
                    "detached XDP from {name} (ifindex {ifindex}{elsewhere}): removed {path}"
                )
            }
        }
    }
}

/// What [`teardown`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TeardownReport {
    pub dir: PathBuf,
    /// Whether the directory existed.
    pub existed: bool,
    pub links: Vec<RemovedLink>,
    /// Pinned maps removed.
    pub maps: Vec<PathBuf>,
    /// Directories removed.
    pub dirs: Vec<PathBuf>,
    /// Entries that are not in hasync's layout, left in place (so the directory stays).
    pub kept: Vec<PathBuf>,
}

impl TeardownReport {
    /// Whether nothing was there to remove.
    pub fn was_empty(&self) -> bool {
        self.links.is_empty() && self.maps.is_empty() && self.dirs.is_empty()
    }
}

/// Removes the pin directory `dir`: every pinned XDP link (which detaches XDP), every pinned
/// map, then the directories; refused while an agent holds the directory ([`PinLock`]). Idempotent: a missing
/// directory is reported, not an error. Refuses a directory that is not below a bpffs mount.
/// Entries outside hasync's layout are left in place and reported.
pub fn teardown(dir: &Path) -> Result<TeardownReport, DatapathError> {
    let mut report = TeardownReport {
        dir: dir.to_owned(),
        ..TeardownReport::default()
    };
    if fs::symlink_metadata(dir).is_err() {
        return Ok(report);
    }
    report.existed = true;
    check_bpffs(dir)?;
    let pins = PinDir::new(dir);
    // Through a symbolic link it would take another datapath's links and maps down.
    for d in [dir.to_owned(), pins.links_dir(), pins.maps_dir()] {
        if fs::symlink_metadata(&d).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(pin_dir_error(&d, SYMLINK_DIR.into()));
        }
    }
    let _held = PinLock::take(dir)?;
    remove_links(&pins, &mut report)?;
    remove_maps(&pins, &mut report)?;
    for sub in [pins.links_dir(), pins.maps_dir()] {
        if fs::symlink_metadata(&sub).is_ok() && !report.kept.iter().any(|k| k.starts_with(&sub)) {
            fs::remove_dir(&sub).map_err(pin_io("removing", &sub))?;
            report.dirs.push(sub);
        }
    }
    let others = sorted_entries(dir)?;
    if others.is_empty() {
        fs::remove_dir(dir).map_err(pin_io("removing", dir))?;
        report.dirs.push(dir.to_owned());
    } else {
        report.kept.extend(others);
    }
    Ok(report)
}

/// Detaches and removes every pinned link of `pins` (a directory in their place is kept).
fn remove_links(pins: &PinDir, report: &mut TeardownReport) -> Result<(), DatapathError> {
    for (path, named) in pins.pinned_links()? {
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            report.kept.push(path);
            continue;
        }
        let info = detach_pinned_link(&path)?;
        let attached_to = info.and_then(|i| interface_name(i.ifindex).filter(|_| i.ifindex != 0));
        report.links.push(RemovedLink {
            path,
            named,
            info,
            attached_to,
        });
    }
    Ok(())
}

/// Removes every pinned map of `pins` (a directory in their place is kept); no `maps/` is
/// nothing to do.
fn remove_maps(pins: &PinDir, report: &mut TeardownReport) -> Result<(), DatapathError> {
    let maps_dir = pins.maps_dir();
    let entries = match fs::read_dir(&maps_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(pin_io("reading", &maps_dir)(e)),
    };
    for path in sort_entries(&maps_dir, entries)? {
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            report.kept.push(path);
            continue;
        }
        fs::remove_file(&path).map_err(pin_io("removing", &path))?;
        report.maps.push(path);
    }
    Ok(())
}

/// The entries of directory `dir`, sorted.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    sort_entries(dir, fs::read_dir(dir).map_err(pin_io("reading", dir))?)
}

/// The paths of `entries` (of directory `dir`), sorted.
fn sort_entries(dir: &Path, entries: fs::ReadDir) -> Result<Vec<PathBuf>, DatapathError> {
    let mut paths = Vec::new();
    for entry in entries {
        paths.push(entry.map_err(pin_io("reading", dir))?.path());
    }
    paths.sort();
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_carry_interface_and_mode() {
        let pins = PinDir::new("/sys/fs/bpf/hasync");
        for (interface, mode, name) in [
            ("in0", AttachMode::Native, "in0:native"),
            ("eth0.100", AttachMode::Generic, "eth0:100:generic"),
        ] {
            let path = pins.link_path(interface, mode);
            assert_eq!(path, Path::new("/sys/fs/bpf/hasync/links").join(name));
            assert_eq!(parse_link_name(name), Some((interface.to_owned(), mode)));
        }
        for bad in ["eth0", "eth0:skb", ":native", "eth0.native", "a b:native"] {
            assert_eq!(parse_link_name(bad), None, "{bad}");
        }
        assert_eq!(
            pins.map_path("SESSIONS"),
            Path::new("/sys/fs/bpf/hasync/maps/SESSIONS")
        );
    }

    /// A link's info is read from `struct bpf_link_info` as the kernel fills it: an XDP link's
    /// program and interface; another kind of link is refused naming its type (a fake kernel
    /// answers: no root needed).
    #[test]
    fn xdp_link_info_is_read_from_the_kernel_struct() {
        use crate::datapath::sys::{bpf_cmd, fake, zeroed_info};
        use std::{cell::Cell, os::fd::AsFd as _, rc::Rc};
        let link_type = Rc::new(Cell::new(bpf_link_type::BPF_LINK_TYPE_XDP));
        let kernel_link_type = Rc::clone(&link_type);
        let _fake = fake::install(move |cmd, attr| {
            assert_eq!(cmd, bpf_cmd::BPF_OBJ_GET_INFO_BY_FD);
            let mut info: bpf_link_info = zeroed_info();
            info.type_ = kernel_link_type.get() as u32;
            info.prog_id = 42;
            info.__bindgen_anon_1.xdp.ifindex = 7;
            // SAFETY: `attr` came through `sys_bpf` for BPF_OBJ_GET_INFO_BY_FD.
            unsafe { fake::reply_info(attr, &info) }
        });
        let link = fs::File::open("/dev/null").expect("/dev/null");
        assert_eq!(
            xdp_link_info_of(link.as_fd()).expect("an XDP link"),
            XdpLinkInfo {
                program_id: 42,
                ifindex: 7
            }
        );
        link_type.set(bpf_link_type::BPF_LINK_TYPE_TCX);
        let e = xdp_link_info_of(link.as_fd()).expect_err("a tcx link");
        assert_eq!(e.to_string(), "it is not an XDP link (link type 11)");
    }

    #[test]
    fn shapes_compare_layout_apart_from_capacity() {
        let a = MapShape {
            map_type: 9,
            key_size: 40,
            value_size: 88,
            max_entries: 1024,
            flags: 0,
        };
        let bigger = MapShape {
            max_entries: 4096,
            ..a
        };
        assert!(a.same_layout(&bigger));
        assert!(!a.same_layout(&MapShape {
            value_size: 96,
            ..a
        }));
        assert!(!a.same_layout(&MapShape { map_type: 1, ..a }));
        assert_eq!(
            a.to_string(),
            "lru_hash, key 40 B, value 88 B, 1024 entries"
        );
    }

    #[test]
    fn the_declared_shapes_are_the_shared_types() {
        use hasync_common::{
            Counters, DatapathConfig, EmbryoSlot, FlowKey, MemberEntry, Session, ZoneBinding,
        };
        let sizes = [(names::SESSIONS, 1000), (names::EMBRYOS, 64)];
        let shapes = declared_shapes(crate::EBPF_OBJECT, &sizes).expect("parse");
        let size = |n: usize| u32::try_from(n).expect("size");
        let s = shapes[names::SESSIONS];
        assert_eq!(
            (s.key_size, s.value_size, s.max_entries),
            (size(size_of::<FlowKey>()), size(size_of::<Session>()), 1000)
        );
        let e = shapes[names::EMBRYOS];
        assert_eq!(
            (e.value_size, e.max_entries),
            (size(size_of::<EmbryoSlot>()), 64)
        );
        assert_eq!(
            shapes[names::CONFIG].value_size,
            size(size_of::<DatapathConfig>())
        );
        assert_eq!(
            shapes[names::ZONES].value_size,
            size(size_of::<ZoneBinding>())
        );
        assert_eq!(
            shapes[names::MEMBERS].value_size,
            size(size_of::<MemberEntry>())
        );
        assert_eq!(
            shapes[names::COUNTERS].value_size,
            size(size_of::<Counters>())
        );
        assert_eq!(
            shapes[names::EVENTS].max_entries,
            names::EVENTS_BYTES,
            "8 MiB is already a power-of-two number of pages"
        );
    }

    #[test]
    fn a_pin_dir_off_bpffs_is_refused_saying_how_to_fix_it() {
        let e = PinDir::new("relative/dir").prepare().expect_err("relative");
        assert!(e.to_string().contains("not an absolute path"), "{e}");
        let tmp = std::env::temp_dir().join(format!("hasync-pin-offfs-{}", std::process::id()));
        let e = PinDir::new(&tmp)
            .prepare()
            .expect_err("not bpffs")
            .to_string();
        assert!(e.contains("is not on a BPF filesystem (bpffs)"), "{e}");
        assert!(!tmp.exists(), "created {}", tmp.display());
        // teardown refuses to remove anything off bpffs.
        crate::files::fresh_dir(&tmp, 0o700).expect("mkdir");
        std::fs::create_dir(tmp.join("maps")).expect("mkdir");
        std::fs::write(tmp.join("maps/SESSIONS"), b"not a map").expect("write");
        let e = teardown(&tmp).expect_err("not bpffs").to_string();
        assert!(e.contains("not on a BPF filesystem"), "{e}");
        assert!(tmp.join("maps/SESSIONS").exists());
        std::fs::remove_dir_all(&tmp).expect("cleanup");
        let e = PinDir::new("/sys/fs/bpf/hasync.v2")
            .prepare()
            .expect_err("dot");
        assert!(e.to_string().contains("does not allow dots"), "{e}");
        let missing = teardown(Path::new("/sys/fs/bpf/hasync-never-created")).expect("missing");
        assert!(!missing.existed && missing.was_empty());
    }

    use crate::datapath::{
        testing::{create_map, in_fresh_netns, ip, shows_xdp, test_run, udp_frame},
        Datapath, DatapathOptions,
    };
    use hasync_common::{Counter, DatapathConfig, FlowKey, MemberId};

    /// A pin directory of this test process on the host's bpffs, torn down on drop.
    struct TestPins(PathBuf);

    impl TestPins {
        fn new(tag: &str) -> TestPins {
            let dir =
                Path::new(BPFFS_MOUNT).join(format!("hasync-test-{}-{tag}", std::process::id()));
            let _ = teardown(&dir);
            TestPins(dir)
        }

        fn options(&self, capacity: u32) -> DatapathOptions {
            let mut opts = DatapathOptions::new(MemberId(1));
            opts.session_capacity = capacity;
            opts.pin_dir = Some(self.0.clone());
            opts
        }
    }

    impl Drop for TestPins {
        fn drop(&mut self) {
            if let Err(e) = teardown(&self.0) {
                eprintln!("removing test pins {}: {e}", self.0.display());
            }
        }
    }

    fn frame() -> Vec<u8> {
        udp_frame([198, 18, 0, 1], 4000, [198, 18, 0, 2], 53)
    }

    /// The agent's life across a restart: the first load creates and pins everything; dropping
    /// the datapath (the agent exits) leaves XDP attached and the table in place; the next load
    /// reuses the maps with their sessions and switches the pinned link to the new program; an
    /// interface no longer attached loses its link; teardown removes everything, twice.
    #[test]
    fn zones_keep_their_ids_while_pinned_sessions_live() {
        let pins = TestPins::new("zones");
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut dp = Datapath::load(&pins.options(1024)).expect("first load");
        dp.record_zones(&names(&["trust", "untrust"]))
            .expect("fresh table");
        drop(dp);
        // The next agent reuses the table: its sessions name zone 1 and 2 by id.
        let mut dp = Datapath::load(&pins.options(1024)).expect("second load");
        let e = dp
            .record_zones(&names(&["untrust", "trust"]))
            .expect_err("reordered");
        assert!(
            e.to_string().starts_with(
                "zone 1 was `trust` when the pinned sessions were made and is `untrust` now"
            ),
            "{e}"
        );
        dp.record_zones(&names(&["trust", "untrust", "dmz"]))
            .expect("a zone added at the end");
        dp.record_zones(&names(&["trust"]))
            .expect("a zone dropped from the end");
        drop(dp);
        let mut dp = Datapath::load(&pins.options(1024)).expect("third load");
        // What the last agent recorded counts, nothing of the longer list before it.
        dp.record_zones(&names(&["trust", "dmz2"]))
            .expect("zone 2 was dropped, so it may be another zone now");
        assert!(!dp.pin_report().expect("pinned").zone_order_unchecked());
        drop(dp);
        // The zone names lost (their pin removed, or replaced by an upgrade's layout) while
        // the sessions stay: nothing to check against, and the report says so (logged as a
        // warning; before, nothing told the operator the order went unchecked).
        fs::remove_file(pins.0.join("maps").join(names::ZONE_NAMES)).expect("unpin");
        let mut dp = Datapath::load(&pins.options(1024)).expect("fourth load");
        assert!(dp.pin_report().expect("pinned").zone_order_unchecked());
        dp.record_zones(&names(&["dmz2", "trust"]))
            .expect("unchecked: nothing recorded");
    }

    /// A zone list that renumbers the zones a kept table's sessions name is refused by the
    /// load itself, before anything pinned is written: the earlier agent's program, still
    /// attached, keeps its config (policy and all). Before, the load wrote the new config and
    /// only the zones' record refused it after. Seen failing (the policy became loose).
    #[test]
    fn renumbered_zones_are_refused_before_the_pinned_config_is_written() {
        let pins = TestPins::new("zones-first");
        let zones = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut first = pins.options(1024);
        first.config.policy = hasync_common::Policy::Strict as u8;
        first.zones = zones(&["trust", "untrust"]);
        let mut dp = Datapath::load(&first).expect("first load");
        dp.record_zones(&first.zones).expect("fresh table");
        drop(dp);
        let mut second = first.clone();
        second.config.policy = hasync_common::Policy::Loose as u8;
        second.zones = zones(&["untrust", "trust"]);
        let e = Datapath::load(&second).err().expect("renumbered zones");
        assert!(e.to_string().starts_with("zone 1 was `trust`"), "{e}");
        let pinned = aya::maps::MapData::from_pin(pins.0.join("maps").join(names::CONFIG))
            .expect("the pinned config");
        let config: aya::maps::Array<_, DatapathConfig> =
            aya::maps::Array::try_from(aya::maps::Map::Array(pinned)).expect("an array");
        let kept = config.get(&0, 0).expect("read");
        assert_eq!(
            kept.policy,
            hasync_common::Policy::Strict as u8,
            "rewritten"
        );
    }

    /// While one agent holds a pinned datapath, a second load of the same directory and a
    /// teardown are refused before they touch it, naming the holder; once the first is gone the
    /// directory is free again.
    #[test]
    fn a_held_pin_directory_is_refused_to_a_second_agent_and_to_teardown() {
        let pins = TestPins::new("held");
        let dp = Datapath::load(&pins.options(1024)).expect("first load");
        let before = dp.config().expect("config");
        let mut other = pins.options(2048);
        other.config.local_member = MemberId(9);
        let e = Datapath::load(&other).err().expect("a second agent");
        let holder = format!("(process {})", std::process::id());
        for said in [
            e.to_string(),
            teardown(&pins.0).expect_err("teardown").to_string(),
        ] {
            assert!(
                said.contains("in use by another hasync agent or teardown"),
                "{said}"
            );
            assert!(said.contains(&holder), "{said}");
        }
        assert_eq!(
            dp.config().expect("config"),
            before,
            "the running one's config"
        );
        assert!(pins.0.join("maps").join(names::SESSIONS).exists());
        drop(dp);
        Datapath::load(&other).expect("the directory is free once the first agent is gone");
    }

    /// Paths on the host's bpffs this test process made, removed on drop.
    struct Scratch(Vec<PathBuf>);

    impl Drop for Scratch {
        fn drop(&mut self) {
            for p in self.0.iter().rev() {
                let _ = fs::remove_file(p).or_else(|_| fs::remove_dir_all(p));
            }
        }
    }

    /// A pin directory another user owns, one others may write to, and a symbolic link are
    /// refused before anything is made or reused in them, each named. Seen failing (all three
    /// accepted) before the check.
    #[test]
    fn a_pin_directory_not_this_agents_own_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let at = |tag: &str| {
            Path::new(BPFFS_MOUNT).join(format!("hasync-test-{}-{tag}", std::process::id()))
        };
        let (other, open, link) = (at("uid"), at("open"), at("link"));
        let _scratch = Scratch(vec![other.clone(), open.clone(), link.clone()]);
        fs::create_dir(&other).expect("mkdir");
        std::os::unix::fs::chown(&other, Some(65534), None).expect("chown");
        fs::create_dir(&open).expect("mkdir");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).expect("chmod");
        std::os::unix::fs::symlink(&open, &link).expect("symlink");
        for (dir, why) in [
            (&other, "it is owned by uid 65534"),
            (&open, "others may write to it (mode 777)"),
            (&link, "it is a symbolic link"),
        ] {
            let e = PinDir::new(dir).lock().err().map(|e| e.to_string());
            let e = e.unwrap_or_else(|| panic!("{} accepted", dir.display()));
            assert!(e.contains(why), "{why:?} not in: {e}");
            assert!(
                !dir.join("maps").exists(),
                "nothing made in {}",
                dir.display()
            );
        }
        // Teardown does not follow the link either.
        let e = teardown(&link).expect_err("teardown through a link");
        assert!(e.to_string().contains("it is a symbolic link"), "{e}");
        assert!(open.exists(), "what the link points at is left alone");
    }

    /// A zone interface renamed between two starts (its configuration with it): the link
    /// pinned under the old name is taken over under the new one, switched to the new program
    /// and left in place. Seen failing (the attach found the interface busy, EBUSY) before.
    #[test]
    fn a_renamed_interface_keeps_its_pinned_link() {
        let pins = TestPins::new("rename");
        let dir = pins.0.clone();
        in_fresh_netns(move || {
            ip(&[
                "link", "add", "hsr-a0", "type", "veth", "peer", "name", "hsr-a1",
            ]);
            let mut dp = Datapath::load(&pins.options(4096)).expect("first load");
            dp.attach("hsr-a0").expect("attach");
            drop(dp);
            ip(&["link", "set", "dev", "hsr-a0", "name", "hsr-b0"]);
            let mut dp = Datapath::load(&pins.options(4096)).expect("second load");
            let mode = dp.attach("hsr-b0").expect("the renamed interface attached");
            assert_eq!(mode, AttachMode::Native);
            assert!(dp.attachments()[0].reused, "the pinned link reused");
            assert!(dir.join("links/hsr-b0:native").exists());
            assert!(!dir.join("links/hsr-a0:native").exists());
            assert_eq!(
                dp.release_stale_links().expect("release"),
                Vec::<PathBuf>::new()
            );
            assert!(shows_xdp("hsr-b0"));
            drop(dp);
            drop(pins);
        });
    }

    /// Two zone interfaces that swapped names between two starts: each keeps its link (the
    /// pins are exchanged), nothing is detached or attached anew. Seen failing (the first
    /// attach removed the other's pin, detaching it, and the second found its interface
    /// busy) before.
    #[test]
    fn two_interfaces_that_swapped_names_keep_their_links() {
        let pins = TestPins::new("swap");
        let dir = pins.0.clone();
        in_fresh_netns(move || {
            for (a, b) in [("hsw-a0", "hsw-a1"), ("hsw-b0", "hsw-b1")] {
                ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
            }
            let mut dp = Datapath::load(&pins.options(4096)).expect("first load");
            dp.attach("hsw-a0").expect("attach a");
            dp.attach("hsw-b0").expect("attach b");
            drop(dp);
            ip(&["link", "set", "dev", "hsw-a0", "name", "hsw-t0"]);
            ip(&["link", "set", "dev", "hsw-b0", "name", "hsw-a0"]);
            ip(&["link", "set", "dev", "hsw-t0", "name", "hsw-b0"]);
            let mut dp = Datapath::load(&pins.options(4096)).expect("second load");
            dp.attach("hsw-a0").expect("attach a again");
            dp.attach("hsw-b0").expect("attach b again");
            assert!(
                dp.attachments().iter().all(|a| a.reused),
                "both links reused"
            );
            for name in ["hsw-a0", "hsw-b0"] {
                let info = xdp_link_info(&dir.join(format!("links/{name}:native"))).expect("pin");
                assert_eq!(
                    Some(info.ifindex),
                    crate::datapath::ifindex(name).ok(),
                    "{name}"
                );
            }
            assert_eq!(
                dp.release_stale_links().expect("release"),
                Vec::<PathBuf>::new()
            );
            drop(dp);
            drop(pins);
        });
    }

    #[test]
    fn the_holder_of_a_flock_is_read_from_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 77 00:19:4242 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 1234 00:1f:4242 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 99 103:02:4242 0 EOF\n";
        let dev = |major, minor| libc::makedev(major, minor);
        assert_eq!(flock_holder(locks, dev(0, 0x1f), 4242), Some(1234));
        assert_eq!(flock_holder(locks, dev(0x103, 2), 4242), Some(99));
        assert_eq!(
            flock_holder(locks, dev(0, 0x19), 4242),
            None,
            "a POSIX lock"
        );
        assert_eq!(flock_holder(locks, dev(0, 0x1f), 4243), None);
    }

    #[test]
    fn a_pinned_datapath_outlives_the_agent_and_teardown_removes_it() {
        let pins = TestPins::new("life");
        let dir = pins.0.clone();
        let first_program = in_fresh_netns(move || {
            ip(&[
                "link", "add", "hsp-t0", "type", "veth", "peer", "name", "hsp-t1",
            ]);
            ip(&["link", "set", "hsp-t0", "up"]);
            ip(&["link", "set", "hsp-t1", "up"]);
            ip(&["link", "set", "lo", "up"]);

            let mut dp = Datapath::load(&pins.options(4096)).expect("first load");
            let report = dp.pin_report().expect("pinned").clone();
            assert!(report.reused.is_empty(), "{report:?}");
            assert_eq!(report.created.len(), MAPS.len(), "{report:?}");
            assert_eq!(dp.attach("hsp-t0").expect("veth"), AttachMode::Native);
            assert_eq!(dp.attach("lo").expect("lo"), AttachMode::Generic);
            let a = &dp.attachments()[0];
            assert_eq!(
                a.pin.as_deref(),
                Some(dir.join("links/hsp-t0:native").as_path())
            );
            assert!(!a.reused);
            assert_eq!(test_run(&dp, &frame()), 2, "XDP_PASS");
            assert_eq!(dp.sessions().expect("sessions").len(), 1);
            let first = xdp_link_info(&dir.join("links/hsp-t0:native")).expect("link");
            // A clock the next agent must not trust: it measures its own.
            let stale = DatapathConfig {
                ns_per_jiffy: 1,
                jiffies_offset_ns: 42,
                ..dp.config().expect("config")
            };
            aya::maps::Array::<_, DatapathConfig>::try_from(
                dp.ebpf_mut().map_mut(names::CONFIG).expect("CONFIG"),
            )
            .expect("array")
            .set(0, stale, 0)
            .expect("write");
            drop(dp); // the agent exits without detaching

            assert!(shows_xdp("hsp-t0") && shows_xdp("lo"), "detached on exit");
            for map in MAPS {
                assert!(dir.join("maps").join(map).exists(), "{map} not pinned");
            }

            // The next agent asks for a bigger table: the pinned one, with its session, stays.
            let mut dp = Datapath::load(&pins.options(8192)).expect("second load");
            let report = dp.pin_report().expect("pinned").clone();
            assert!(report.sessions_reused(), "{report:?}");
            assert_eq!(report.reused.len(), MAPS.len(), "{report:?}");
            assert_eq!(report.kept_capacity, Some(4096));
            assert_eq!(dp.capacity(), 4096);
            let (cfg, clock) = (dp.config().expect("config"), dp.clock().expect("clock"));
            assert_eq!(
                (cfg.ns_per_jiffy, cfg.jiffies_offset_ns),
                (clock.ns_per_jiffy, clock.offset_ns),
                "the session clock in the reused CONFIG"
            );
            let sessions = dp.sessions().expect("sessions");
            assert_eq!(sessions.len(), 1, "the session survived the restart");
            let (key, before): (FlowKey, _) = sessions[0];
            assert_eq!(dp.attach("hsp-t0").expect("veth again"), AttachMode::Native);
            assert!(dp.attachments()[0].reused);
            let now = xdp_link_info(&dir.join("links/hsp-t0:native")).expect("link");
            assert_eq!(now.ifindex, first.ifindex);
            assert_ne!(
                now.program_id, first.program_id,
                "switched to the new program"
            );
            // `lo` left the config: its link goes, and XDP with it.
            let released = dp.release_stale_links().expect("release");
            assert_eq!(released, [dir.join("links/lo:generic")]);
            assert!(!shows_xdp("lo") && shows_xdp("hsp-t0"));
            // The new program runs on the reused table: the same session, counters continued.
            let packets = dp.counters().expect("counters").get(Counter::Packets);
            assert_eq!(test_run(&dp, &frame()), 2);
            let after = dp.session(&key).expect("lookup").expect("still there");
            assert_eq!(after.packets[0], before.packets[0] + 1, "counted on");
            assert_eq!(
                dp.counters().expect("counters").get(Counter::Packets),
                packets + 1
            );
            drop(dp);

            // The interface is re-created under the same name: its pinned link is defunct, so
            // the next agent replaces it with a new one.
            ip(&["link", "del", "hsp-t0"]);
            ip(&[
                "link", "add", "hsp-t0", "type", "veth", "peer", "name", "hsp-t1",
            ]);
            ip(&["link", "set", "hsp-t0", "up"]);
            ip(&["link", "set", "hsp-t1", "up"]);
            let mut dp = Datapath::load(&pins.options(4096)).expect("third load");
            assert_eq!(dp.attach("hsp-t0").expect("new veth"), AttachMode::Native);
            assert!(!dp.attachments()[0].reused, "a defunct link was reused");
            assert!(shows_xdp("hsp-t0"));
            drop(dp);

            let report = teardown(&dir).expect("teardown");
            assert!(report.existed && report.kept.is_empty(), "{report:?}");
            assert_eq!(report.links.len(), 1, "{report:?}");
            let line = report.links[0].to_string();
            assert!(
                line.starts_with("detached XDP from hsp-t0 (ifindex "),
                "{line}"
            );
            assert_eq!(report.maps.len(), MAPS.len(), "{report:?}");
            assert!(!dir.exists() && !shows_xdp("hsp-t0"));
            let again = teardown(&dir).expect("idempotent");
            assert!(!again.existed && again.was_empty());
            first.program_id
        });
        assert_ne!(first_program, 0);
    }

    /// Teardown and releasing a stale link detach XDP before they return. Removing the pin
    /// alone drops the link's last reference, but the kernel detaches and frees it later, from
    /// a work queue: under CI's load `teardown` returned with XDP still on the interface.
    #[test]
    fn teardown_and_release_detach_before_returning() {
        let pins = TestPins::new("detach");
        let dir = pins.0.clone();
        in_fresh_netns(move || {
            ip(&[
                "link", "add", "hsp-d0", "type", "veth", "peer", "name", "hsp-d1",
            ]);
            ip(&["link", "set", "hsp-d0", "up"]);
            for round in 0..6 {
                let mut dp = Datapath::load(&pins.options(1024)).expect("load");
                dp.attach("hsp-d0").expect("veth");
                drop(dp);
                if round % 2 == 0 {
                    let report = teardown(&dir).expect("teardown");
                    assert_eq!(report.links.len(), 1, "{report:?}");
                } else {
                    let mut dp = Datapath::load(&pins.options(1024)).expect("load again");
                    assert_eq!(dp.release_stale_links().expect("release").len(), 1);
                }
                assert!(!shows_xdp("hsp-d0"), "round {round}: XDP still attached");
            }
        });
    }

    /// A directory among the pinned links (someone's, or left by a tool) is left alone when
    /// stale links are released, as teardown leaves it: before, removing it failed with
    /// EISDIR, and with it every start (seen failing).
    #[test]
    fn a_directory_among_the_links_is_left_alone() {
        let pins = TestPins::new("linkdir");
        in_fresh_netns(move || {
            ip(&[
                "link", "add", "hsp-e0", "type", "veth", "peer", "name", "hsp-e1",
            ]);
            let mut dp = Datapath::load(&pins.options(1024)).expect("load");
            let stray = PinDir::new(&pins.0).links_dir().join("x");
            fs::create_dir(&stray).expect("a directory among the links");
            dp.attach("hsp-e0").expect("veth");
            let released = dp.release_stale_links();
            let left = stray.is_dir();
            let _ = fs::remove_dir(&stray);
            assert_eq!(released.expect("release"), Vec::<PathBuf>::new());
            assert!(left, "left alone");
        });
    }

    /// Someone detaches our pinned link (`bpftool link detach`): the interface runs no XDP,
    /// the health check says so, and attaching again mends it.
    #[test]
    fn a_detached_link_is_seen_and_reattached() {
        use std::os::fd::AsFd as _;
        let pins = TestPins::new("health");
        let dir = pins.0.clone();
        in_fresh_netns(move || {
            ip(&[
                "link", "add", "hsp-h0", "type", "veth", "peer", "name", "hsp-h1",
            ]);
            ip(&["link", "set", "hsp-h0", "up"]);
            let mut dp = Datapath::load(&pins.options(1024)).expect("load");
            dp.attach("hsp-h0").expect("veth");
            let link = obj_get(&dir.join("links/hsp-h0:native")).expect("pinned link");
            sys::link_detach(link.as_fd()).expect("detach");
            let broken = dp.broken_attachments(&crate::netlink::list_now().expect("dump"));
            assert_eq!(broken.len(), 1, "{broken:?}");
            assert_eq!(
                broken[0].to_string(),
                "XDP (native) was detached from hsp-h0"
            );
            dp.reattach("hsp-h0").expect("reattach");
            assert!(shows_xdp("hsp-h0"));
            assert_eq!(
                dp.broken_attachments(&crate::netlink::list_now().expect("dump")),
                []
            );
            // Detached again, and another program takes the interface: attaching again fails,
            // and the interface stays broken (never forgotten, so never healthy by omission).
            let link = obj_get(&dir.join("links/hsp-h0:native")).expect("pinned link");
            sys::link_detach(link.as_fd()).expect("detach");
            let mut other = crate::datapath::testing::datapath();
            other.attach("hsp-h0").expect("the other program");
            let now = crate::netlink::list_now().expect("dump");
            let broken = dp.broken_attachments(&now);
            assert!(
                broken[0]
                    .to_string()
                    .starts_with("another XDP program (id "),
                "{broken:?}"
            );
            dp.reattach("hsp-h0").expect_err("the interface is taken");
            let broken = dp.broken_attachments(&now);
            assert_eq!(broken.len(), 1, "{broken:?}");
            assert_eq!(
                broken[0].to_string(),
                "XDP could not be attached to hsp-h0 again"
            );
            drop(other);
            // The kernel lets go of the other link when its last file reference goes, which
            // under load can come a little after the drop: wait (bounded) until the interface
            // runs no XDP, as the health check's next round would.
            let freed = std::time::Instant::now();
            while shows_xdp("hsp-h0") {
                assert!(
                    freed.elapsed() < std::time::Duration::from_secs(5),
                    "the other program still holds hsp-h0 5 s after it was dropped"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            dp.reattach("hsp-h0").expect("free again");
            assert_eq!(
                dp.broken_attachments(&crate::netlink::list_now().expect("dump")),
                []
            );
        });
    }

    /// A pinned SESSIONS of another layout is refused naming `hasync teardown`, and nothing is
    /// lost; another layout of a rebuildable map replaces it.
    #[test]
    fn a_pinned_map_of_another_layout_is_refused_or_replaced() {
        use aya::maps::MapData;
        let pins = TestPins::new("layout");
        let dir = PinDir::new(&pins.0);
        dir.prepare().expect("prepare");
        let pin = |fd, name: &str| {
            MapData::from_fd(fd)
                .expect("map")
                .pin(dir.map_path(name))
                .expect("pin");
        };
        // An older SESSIONS: same key, a 16-byte value.
        let lru_hash = map_type_u32(bpf_map_type::BPF_MAP_TYPE_LRU_HASH);
        let percpu_array = map_type_u32(bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY);
        pin(
            create_map::<FlowKey, [u8; 16]>(lru_hash, 64),
            names::SESSIONS,
        );
        pin(create_map::<u32, u64>(percpu_array, 1), names::COUNTERS);
        let e = Datapath::load(&pins.options(64)).err().expect("refused");
        let msg = e.to_string();
        for want in [
            "pinned map `SESSIONS`",
            "value 16 B",
            "run `hasync teardown`",
            "lru_hash",
        ] {
            assert!(msg.contains(want), "{want:?} not in: {msg}");
        }
        assert!(
            dir.map_path(names::SESSIONS).exists(),
            "kept for the operator"
        );
        assert!(dir.map_path(names::COUNTERS).exists(), "nothing touched");

        fs::remove_file(dir.map_path(names::SESSIONS)).expect("rm");
        let dp = Datapath::load(&pins.options(64)).expect("load");
        let report = dp.pin_report().expect("pinned");
        assert_eq!(
            report.replaced.iter().map(|(m, _)| *m).collect::<Vec<_>>(),
            [names::COUNTERS]
        );
        assert!(report.created.contains(&names::SESSIONS));
        assert_eq!(dp.counters().expect("counters").get(Counter::Packets), 0);

        // The root of the bpffs mount is never a pin directory.
        let e = teardown(Path::new(BPFFS_MOUNT)).expect_err("mount root");
        assert!(e.to_string().contains("root of a bpffs mount"), "{e}");
    }
}
