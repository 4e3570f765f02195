//! Attaching the XDP program to interfaces: native (driver) mode first, generic (skb) mode as
//! the fallback, and clean detaching.

use std::ffi::CString;

use aya::programs::{xdp::XdpLinkId, XdpMode};

use super::{error_chain, Datapath, DatapathError};

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
    link: XdpLinkId,
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
    pub fn attach(&mut self, interface: &str) -> Result<AttachMode, DatapathError> {
        let index = ifindex(interface)?;
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
        self.attachments.push(Attachment {
            interface: interface.to_owned(),
            ifindex: index,
            mode,
            link,
        });
        Ok(mode)
    }

    /// Where the program is attached.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Detaches the program from every interface. Tries them all; returns the first error.
    pub fn detach_all(&mut self) -> Result<(), DatapathError> {
        let attachments = std::mem::take(&mut self.attachments);
        if attachments.is_empty() {
            return Ok(());
        }
        let prog = self.program_mut()?;
        let mut first_error = None;
        for Attachment {
            interface,
            ifindex: _,
            mode: _,
            link,
        } in attachments
        {
            if let Err(source) = prog.detach(link) {
                tracing::warn!(interface, error = %error_chain(&source), "detaching XDP failed");
                first_error.get_or_insert(DatapathError::Detach { interface, source });
            }
        }
        first_error.map_or(Ok(()), Err)
    }
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
