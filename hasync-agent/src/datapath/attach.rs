//! Attaching the XDP program to interfaces: native (driver) mode first, generic (skb) mode as
//! the fallback, and clean detaching. With a pin directory, each link is pinned, and a link an
//! earlier agent pinned is switched to this program instead of attaching anew (see [`super::pin`]).

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use aya::programs::{
    links::{FdLink, PinnedLink},
    xdp::{XdpLink, XdpLinkId},
    XdpMode,
};

use super::{error_chain, pin, Datapath, DatapathError, PinDir};

/// How the program runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (XdpMode::Driver): the fast path.
    Native,
    /// In the kernel stack after the skb is built (XdpMode::Skb): works everywhere, slower.
    Generic,
}

impl AttachMode {
    pub const fn name(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        }
    }
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One interface the program is attached to.
#[derive(Debug)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    pub mode: AttachMode,
    /// Where the link is pinned (with a pin directory).
    pub pin: Option<PathBuf>,
    /// The link was left pinned by an earlier agent and switched to this program.
    pub reused: bool,
    link: LinkHandle,
}

/// How the agent holds a link.
#[derive(Debug)]
enum LinkHandle {
    /// Owned by the program: detached when the program goes.
    Owned(XdpLinkId),
    /// Pinned: stays attached after the agent exits, until its pin is removed.
    Pinned(FdLink),
}

/// Longest interface name plus its NUL (IFNAMSIZ).
const IFNAMSIZ: usize = 16;

/// Checks `name` against the kernel's rules for interface names (dev_valid_name()).
pub fn check_interface_name(name: &str) -> Result<(), DatapathError> {
    let invalid = |why| DatapathError::InvalidInterfaceName {
        name: name.to_owned(),
        why,
    };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.len() >= IFNAMSIZ {
        return Err(invalid("it is longer than 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(invalid("it is `.` or `..`"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        return Err(invalid("it contains `/`, `:`, NUL or white space"));
    }
    Ok(())
}

/// The ifindex of interface `name` in this network namespace.
pub fn ifindex(name: &str) -> Result<u32, DatapathError> {
    check_interface_name(name)?;
    let c_name = CString::new(name).map_err(|_| DatapathError::InvalidInterfaceName {
        name: name.to_owned(),
        why: "it contains NUL",
    })?;
    // SAFETY: `c_name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(DatapathError::UnknownInterface(name.to_owned()));
    }
    Ok(index)
}

impl Datapath {
    /// Attaches the program to `interface`: native mode, or generic mode when the driver
    /// refuses native XDP (logged as a warning with the native error).
    ///
    /// With a pin directory, a link pinned there for `interface` is reused: switched atomically
    /// to this program (its mode stays). Otherwise the new link is pinned.
    pub fn attach(&mut self, interface: &str) -> Result<AttachMode, DatapathError> {
        let index = ifindex(interface)?;
        if let Some(pins) = self.pin_dir().cloned() {
            if let Some(mode) = self.reattach_pinned(&pins, interface, index)? {
                return Ok(mode);
            }
        }
        let prog = self.program_mut()?;
        let (link, mode) = match prog.attach_to_if_index(index, XdpMode::Driver) {
            Ok(link) => (link, AttachMode::Native),
            Err(native) => {
                tracing::warn!(
                    interface,
                    error = %error_chain(&native),
                    "native XDP attach failed; falling back to generic (skb) mode"
                );
                match prog.attach_to_if_index(index, XdpMode::Skb) {
                    Ok(link) => (link, AttachMode::Generic),
                    Err(source) => {
                        return Err(DatapathError::Attach {
                            interface: interface.to_owned(),
                            native: Box::new(native),
                            source: Box::new(source),
                        })
                    }
                }
            }
        };
        let (link, pin) = match self.pin_dir().cloned() {
            None => (LinkHandle::Owned(link), None),
            Some(pins) => {
                let path = pins.link_path(interface, mode);
                let fd = self.pin_link(link, &path, interface)?;
                (LinkHandle::Pinned(fd), Some(path))
            }
        };
        self.attachments.push(Attachment {
            interface: interface.to_owned(),
            ifindex: index,
            mode,
            pin,
            reused: false,
            link,
        });
        Ok(mode)
    }

    /// Takes a fresh link from the program and pins it at `path`. If pinning fails the link is
    /// dropped, which detaches it.
    fn pin_link(
        &mut self,
        id: XdpLinkId,
        path: &Path,
        interface: &str,
    ) -> Result<FdLink, DatapathError> {
        let prog = self.program_mut()?;
        let link = prog.take_link(id).map_err(program_err)?;
        let fd = FdLink::try_from(link).map_err(|_| DatapathError::Unpinnable {
            interface: interface.to_owned(),
        })?;
        let pinned = fd.pin(path).map_err(|source| DatapathError::Pin {
            path: path.to_owned(),
            source,
        })?;
        Ok(FdLink::from(pinned))
    }

    /// Switches the link pinned for `interface`, if any, to this program. A pinned link whose
    /// interface is gone or is another one now (re-created under the same name) is removed
    /// instead; a link pinned under an old name of the interface is taken over
    /// ([`renamed_pinned_link`]). `None` when none is left: the caller attaches anew.
    fn reattach_pinned(
        &mut self,
        pins: &PinDir,
        interface: &str,
        index: u32,
    ) -> Result<Option<AttachMode>, DatapathError> {
        let kept = match pins.find_link(interface)? {
            Some((path, mode)) => {
                keep_or_remove_pinned_link(pins, (&path, mode), interface, index)?
                    .map(|program| (path, mode, program))
            }
            None => None,
        };
        let kept = match kept {
            Some(k) => Some(k),
            None => renamed_pinned_link(pins, interface, index)?,
        };
        let Some((path, mode, old_program)) = kept else {
            return Ok(None);
        };
        let link_err = |path: &Path| {
            let path = path.to_owned();
            move |source| DatapathError::PinnedLink { path, source }
        };
        let pinned = PinnedLink::from_pin(&path).map_err(link_err(&path))?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(link_err(&path))?;
        let prog = self.program_mut()?;
        let program = prog.info().map(|i| i.id()).ok();
        // bpf_link_update: the interface goes from the old program to this one atomically.
        let id = prog.attach_to_link(link).map_err(program_err)?;
        let link = prog.take_link(id).map_err(program_err)?;
        let fd = FdLink::try_from(link).map_err(link_err(&path))?;
        tracing::info!(
            interface,
            %mode,
            old_program,
            program = program.unwrap_or(0),
            "reusing the pinned XDP link: switched to this program"
        );
        self.attachments.push(Attachment {
            interface: interface.to_owned(),
            ifindex: index,
            mode,
            pin: Some(path),
            reused: true,
            link: LinkHandle::Pinned(fd),
        });
        Ok(Some(mode))
    }

    /// With a pin directory: removes the pinned links of interfaces this datapath is not
    /// attached to (an interface left the config), which detaches XDP from them. Call after
    /// attaching every interface. Returns the removed pins.
    pub fn release_stale_links(&mut self) -> Result<Vec<PathBuf>, DatapathError> {
        let Some(pins) = self.pin_dir() else {
            return Ok(Vec::new());
        };
        let mut removed = Vec::new();
        for (path, _) in pins.pinned_links()? {
            if self
                .attachments
                .iter()
                .any(|a| a.pin.as_ref() == Some(&path))
            {
                continue;
            }
            // A directory there is no link of ours (`hasync teardown` keeps it too): before,
            // removing it failed every start.
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                tracing::warn!(path = %path.display(), "a directory among the pinned links: left alone");
                continue;
            }
            pin::detach_pinned_link(&path)?;
            tracing::warn!(
                pin = %path.display(),
                "detached XDP from an interface no longer configured (removed its pinned link)"
            );
            removed.push(path);
        }
        Ok(removed)
    }

    /// Where the program is attached.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Detaches the program from every interface, pinned links included (their pins are
    /// removed). Tries them all; returns the first error.
    pub fn detach_all(&mut self) -> Result<(), DatapathError> {
        let attachments = std::mem::take(&mut self.attachments);
        let mut first_error = None;
        for a in attachments {
            let interface = a.interface.clone();
            if let Err(error) = self.release(a) {
                tracing::warn!(interface, error = %error_chain(&error), "detaching XDP failed");
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Attaches `interface` anew after its attachment broke (the interface was re-created,
    /// or someone detached XDP): the broken link is released first, errors ignored (a link
    /// whose interface is gone cannot be detached from it).
    ///
    /// An interface that could not be attached again stays the datapath's: it is listed as
    /// lost ([`Datapath::lost_attachments`]) until a later reattach succeeds.
    pub fn reattach(&mut self, interface: &str) -> Result<AttachMode, DatapathError> {
        if let Some(at) = self
            .attachments
            .iter()
            .position(|a| a.interface == interface)
        {
            let old = self.attachments.remove(at);
            self.lost
                .push((old.interface.clone(), old.ifindex, old.mode));
            if let Err(error) = self.release(old) {
                tracing::debug!(interface, error = %error_chain(&error), "releasing the broken XDP link");
            }
        }
        let mode = self.attach(interface)?;
        self.lost.retain(|(name, _, _)| name != interface);
        Ok(mode)
    }

    /// Lists `interface`, missing when the datapath started, as lost (at index 0, which no
    /// interface has): the health check finds it gone, then, once it exists, re-created, and
    /// attaches it ([`Datapath::reattach`]).
    pub fn missing_at_start(&mut self, interface: &str) {
        self.lost
            .push((interface.to_owned(), 0, AttachMode::Native));
    }

    /// Interfaces whose attachment broke and could not be made again: name, former index and
    /// mode.
    pub fn lost_attachments(&self) -> &[(String, u32, AttachMode)] {
        &self.lost
    }

    /// Detaches one attachment; a pinned link's pin is removed.
    fn release(&mut self, a: Attachment) -> Result<(), DatapathError> {
        match a.link {
            LinkHandle::Owned(id) => self
                .program_mut()
                .and_then(|prog| prog.detach(id).map_err(program_err)),
            LinkHandle::Pinned(fd) => {
                drop(fd);
                a.pin
                    .map_or(Ok(()), |path| pin::detach_pinned_link(&path).map(drop))
            }
        }
    }

    /// The kernel's id of the XDP program, if it can tell.
    pub fn program_id(&self) -> Option<u32> {
        self.program().ok()?.info().ok().map(|i| i.id())
    }
}

fn program_err(source: aya::programs::ProgramError) -> DatapathError {
    DatapathError::Program {
        name: hasync_common::maps::PROGRAM,
        source,
    }
}

/// A link pinned under another interface's name that is attached to `index`: the interface
/// was renamed (and the configuration with it) since it was pinned. Its pin moves to
/// `interface`'s name and the link is reused; before, attaching anew found the interface
/// busy with it at every start. Returns the new pin, the link's mode and its program.
fn renamed_pinned_link(
    pins: &PinDir,
    interface: &str,
    index: u32,
) -> Result<Option<(PathBuf, AttachMode, u32)>, DatapathError> {
    let found = pins.pinned_links()?.into_iter().find_map(|(path, name)| {
        let (_, mode) = name?;
        let info = pin::xdp_link_info(&path).ok()?;
        (info.ifindex == index).then_some((path, mode, info.program_id))
    });
    let Some((old, mode, program)) = found else {
        return Ok(None);
    };
    let new = pins.link_path(interface, mode);
    std::fs::rename(&old, &new).map_err(pin::pin_io("renaming", &old))?;
    tracing::info!(
        interface,
        old_pin = %old.display(),
        "the interface was renamed since its link was pinned: the pin follows the new name"
    );
    Ok(Some((new, mode, program)))
}

/// The program a link pinned at `path` (in `mode`) for `interface` runs, if the link can be
/// reused: it is still attached to `index`, or, the two interfaces having swapped names, the
/// pin under the other's name is (the two pins are exchanged). A link attached to another
/// live interface (renamed since) has its pin follow that one's name, and `None` is returned
/// (the caller looks for a link pinned under another name, then attaches anew); one whose
/// interface is gone or is another one now (re-created under the same name) is removed, with
/// a warning, and `None` returned.
fn keep_or_remove_pinned_link(
    pins: &PinDir,
    (path, mode): (&Path, AttachMode),
    interface: &str,
    index: u32,
) -> Result<Option<u32>, DatapathError> {
    let why = match pin::xdp_link_info(path) {
        Ok(info) if info.ifindex == index => return Ok(Some(info.program_id)),
        Ok(info) => {
            let renamed = pin::interface_name(info.ifindex).filter(|_| info.ifindex != 0);
            if let Some(now) = renamed.filter(|now| now != interface) {
                let theirs = pins.link_path(&now, mode);
                let swapped = pin::xdp_link_info(&theirs)
                    .ok()
                    .filter(|t| t.ifindex == index);
                if let Some(ours) = swapped {
                    pin::exchange(path, &theirs).map_err(pin::pin_io("exchanging", path))?;
                    tracing::info!(interface, other = %now, "the two interfaces swapped names since their links were pinned: their pins follow");
                    return Ok(Some(ours.program_id));
                }
                if std::fs::symlink_metadata(&theirs).is_err() {
                    std::fs::rename(path, &theirs).map_err(pin::pin_io("renaming", path))?;
                    tracing::info!(interface, other = %now, "a pinned link's interface was renamed: its pin follows the new name");
                    return Ok(None);
                }
            }
            format!(
                "it is attached to ifindex {} (0: gone), not to {interface}'s {index}",
                info.ifindex
            )
        }
        Err(e) => e.to_string(),
    };
    tracing::warn!(
        interface,
        pin = %path.display(),
        why = %why,
        "removing a stale pinned XDP link; attaching anew"
    );
    std::fs::remove_file(path).map_err(pin::pin_io("removing", path))?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use std::{fs, process::Command};

    use super::*;
    use crate::datapath::testing::datapath;

    #[test]
    fn interface_names_are_checked_before_the_kernel_sees_them() {
        for (name, why) in [
            ("", "empty"),
            ("abcdefghijklmnop", "longer than 15"),
            ("..", "`..`"),
            ("eth0:1", "contains"),
            ("a b", "contains"),
            ("a\0b", "contains"),
        ] {
            let err = ifindex(name).expect_err(name).to_string();
            assert!(
                err.contains(why) && err.contains(&format!("{name:?}")),
                "{name:?}: {err}"
            );
        }
        let err = ifindex("hsa-nope0")
            .expect_err("no such interface")
            .to_string();
        assert_eq!(err, "unknown network interface `hsa-nope0`");
    }

    fn netns_id() -> String {
        fs::read_link("/proc/thread-self/ns/net")
            .expect("read netns")
            .display()
            .to_string()
    }

    fn ip(args: &[&str]) {
        let status = Command::new("ip").args(args).status().expect("run ip");
        assert!(status.success(), "ip {args:?}");
    }

    /// Runs in a thread of its own moved into a fresh network namespace, so nothing here can
    /// touch the host's interfaces (a forked `ip` inherits the thread's namespace).
    #[test]
    fn native_first_generic_fallback_and_clean_detach() {
        std::thread::spawn(|| {
            let host = netns_id();
            // SAFETY: unshare with a valid flag; it affects only this thread.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            );
            assert_ne!(netns_id(), host, "still in the host's network namespace");

            ip(&[
                "link", "add", "hsa-t0", "type", "veth", "peer", "name", "hsa-t1",
            ]);
            ip(&["link", "set", "hsa-t0", "up"]);
            ip(&["link", "set", "hsa-t1", "up"]);
            ip(&["link", "set", "lo", "up"]);

            let mut dp = datapath();
            assert_eq!(dp.attach("hsa-t0").expect("veth"), AttachMode::Native);
            // The loopback device has no native XDP.
            assert_eq!(dp.attach("lo").expect("lo"), AttachMode::Generic);
            let err = dp.attach("hsa-none").expect_err("unknown").to_string();
            assert!(err.contains("`hsa-none`"), "{err}");
            let attached: Vec<_> = dp
                .attachments()
                .iter()
                .map(|a| (a.interface.as_str(), a.mode))
                .collect();
            assert_eq!(
                attached,
                [("hsa-t0", AttachMode::Native), ("lo", AttachMode::Generic)]
            );

            let shows_xdp = |dev: &str| {
                let out = Command::new("ip")
                    .args(["-d", "link", "show", dev])
                    .output()
                    .expect("ip");
                String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
            };
            assert!(shows_xdp("hsa-t0") && shows_xdp("lo"));
            dp.detach_all().expect("detach");
            assert!(dp.attachments().is_empty());
            assert!(!shows_xdp("hsa-t0") && !shows_xdp("lo"));
            // The namespace, and the veth pair with it, go away with this thread.
        })
        .join()
        .expect("netns test thread");
    }
}
