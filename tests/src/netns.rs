//! Network-namespace labs: namespaces, veth pairs and addresses, torn down when dropped (also
//! on panic), and a way to run code inside a namespace from a thread that joined it with
//! `setns`, so `std::net` sockets live there.
//!
//! Rules this module enforces, so a test cannot hurt the host:
//! - every `ip` command runs with `-n <lab namespace>`: nothing is added to the root namespace
//!   and no host interface is touched;
//! - addresses come from 198.18.0.0/15 (benchmarking) and fd00::/8 (unique local) only;
//! - namespaces are named `hst-<pid>-<test>-<name>`, so a later run can remove what a killed
//!   run left behind (only when that pid is gone).

use std::{
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd as _,
    process::Command,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};

/// Prefix of every namespace the tests create.
pub const PREFIX: &str = "hst-";

/// Longest interface name the kernel accepts.
pub const IFNAME_MAX: usize = 15;

/// A lab: the namespaces of one test share its prefix.
pub struct Lab {
    prefix: String,
}

impl Lab {
    /// A lab for test `test` (a short tag, used in namespace names). Needs root. Removes
    /// namespaces left behind by earlier runs whose process is gone.
    pub fn new(test: &str) -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        ensure!(
            unsafe { libc::geteuid() } == 0,
            "network-namespace labs need root"
        );
        ensure!(
            !test.is_empty() && test.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "lab tag `{test}`: use letters, digits and `-`"
        );
        remove_stale_namespaces();
        Ok(Lab {
            prefix: format!("{PREFIX}{}-{test}-", std::process::id()),
        })
    }

    /// Creates namespace `<prefix><name>`, with its loopback up.
    pub fn netns(&self, name: &str) -> Result<Netns> {
        let full = format!("{}{name}", self.prefix);
        run_ip(&["netns", "add", &full])?;
        let ns = Netns { name: full };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

/// Deletes `hst-<pid>-...` namespaces whose pid no longer runs.
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run_ip(&["netns", "del", &name]);
        }
    }
}

/// Runs `ip` with `args`, returning its stdout.
fn run_ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip`")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `addr` is in one of the ranges labs may use.
pub fn is_lab_address(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            o[0] == 198 && (o[1] == 18 || o[1] == 19)
        }
        IpAddr::V6(a) => a.octets()[0] == 0xfd,
    }
}

/// A network namespace, deleted (with its interfaces) when dropped.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <this namespace> args...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run_ip(&all)
    }

    /// Adds `cidr` (e.g. "198.18.0.1/24", "fd00:18::1/64") to `ifname`; IPv6 without DAD.
    pub fn addr(&self, ifname: &str, cidr: &str) -> Result<()> {
        let ip: IpAddr = cidr
            .split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("lab address `{cidr}`"))?;
        ensure!(
            is_lab_address(ip),
            "{cidr} is outside 198.18.0.0/15 and fd00::/8"
        );
        if ip.is_ipv6() {
            self.ip(&["addr", "add", cidr, "dev", ifname, "nodad"])?;
        } else {
            self.ip(&["addr", "add", cidr, "dev", ifname])?;
        }
        Ok(())
    }

    pub fn up(&self, ifname: &str) -> Result<()> {
        self.ip(&["link", "set", ifname, "up"]).map(drop)
    }

    /// Default route via `gateway` (a lab address).
    pub fn default_route(&self, gateway: &str) -> Result<()> {
        let ip: IpAddr = gateway
            .parse()
            .with_context(|| format!("gateway `{gateway}`"))?;
        ensure!(is_lab_address(ip), "gateway {gateway} is not a lab address");
        let family = if ip.is_ipv6() { "-6" } else { "-4" };
        self.ip(&[family, "route", "add", "default", "via", gateway])
            .map(drop)
    }

    /// Runs `f` on a thread that joined this namespace, and waits for it. A panic in `f`
    /// propagates.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || -> Result<T> {
                enter(&path)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Starts `f` on a thread that joined this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<Result<T>> {
        let path = self.path();
        std::thread::spawn(move || -> Result<T> {
            enter(&path)?;
            Ok(f())
        })
    }

    /// Writes sysctl `key` (dotted, e.g. "net.ipv4.ip_forward") inside this namespace and
    /// checks it took.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        ensure!(
            key.starts_with("net."),
            "only per-namespace `net.` sysctls: {key}"
        );
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let read = self.run(|| -> Result<String> {
            std::fs::write(&path, value).with_context(|| format!("writing {path}"))?;
            Ok(std::fs::read_to_string(&path)?.trim().to_string())
        })??;
        ensure!(read == value, "{key} reads {read} after writing {value}");
        Ok(())
    }

    /// The index of interface `ifname` in this namespace.
    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        let name = std::ffi::CString::new(ifname)?;
        // SAFETY: `name` is a valid NUL-terminated string.
        let index = self.run(|| unsafe { libc::if_nametoindex(name.as_ptr()) })?;
        ensure!(index != 0, "no interface {ifname} in {}", self.name);
        Ok(index)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// Moves the calling thread into the namespace at `path`.
fn enter(path: &str) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: a valid namespace fd; CLONE_NEWNET only changes this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns({path}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Connects interface `a_if` in `a` to `b_if` in `b` with a veth pair, both up. The pair is
/// created inside `a` and its peer moved straight to `b`: it never exists in the root
/// namespace.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    for n in [a_if, b_if] {
        ensure!(
            !n.is_empty() && n.len() <= IFNAME_MAX,
            "interface name `{n}` is not 1–15 bytes"
        );
    }
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.up(a_if)?;
    b.up(b_if)
}

/// A value dropped on a thread in a fresh, empty network namespace. For a datapath attached
/// inside a lab: should an XDP program have been attached through netlink (kernels without
/// XDP bpf_link), its detach would act on an ifindex of the dropping thread's namespace — never
/// the root's.
pub struct DropIsolated<T: Send + 'static> {
    value: Option<T>,
}

impl<T: Send + 'static> DropIsolated<T> {
    pub fn new(value: T) -> Self {
        DropIsolated { value: Some(value) }
    }
}

impl<T: Send + 'static> std::ops::Deref for DropIsolated<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value.as_ref().expect("present until dropped")
    }
}

impl<T: Send + 'static> std::ops::DerefMut for DropIsolated<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value.as_mut().expect("present until dropped")
    }
}

impl<T: Send + 'static> Drop for DropIsolated<T> {
    fn drop(&mut self) {
        let Some(value) = self.value.take() else {
            return;
        };
        let done = std::thread::spawn(move || {
            // SAFETY: unshare(CLONE_NEWNET) only affects this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                // Could not isolate: leak rather than drop in the caller's namespace.
                std::mem::forget(value);
                return;
            }
            drop(value);
        })
        .join();
        if done.is_err() {
            eprintln!("cleanup: dropping an isolated value panicked");
        }
    }
}

/// Polls `check` every 10 ms until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
