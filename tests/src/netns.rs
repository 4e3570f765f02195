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

use std::{net::IpAddr, process::Command, thread::JoinHandle};

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
        let euid = unsafe { libc::geteuid() };
        ensure!(euid == 0, "network-namespace labs need root");
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

/// Fails unless the calling thread is in another network namespace than the process's main
/// thread, which stays in the host's (the tests, benches and fault runs enter a lab's
/// namespace on a thread of their own): what sends raw frames calls it first, so a call from
/// the wrong thread cannot put test traffic on the host's own interfaces. (A thread that
/// joined another namespace may not look at init's.)
pub fn refuse_host_namespace() -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let inode = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    let here = inode("/proc/thread-self/ns/net").context("this thread's network namespace")?;
    let host = inode("/proc/self/ns/net").context("the host's network namespace")?;
    ensure!(
        here != host,
        "refusing to send test traffic from the host's network namespace (enter a lab namespace first)"
    );
    Ok(())
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

use hasync_agent::lab::netns as lab;
/// Address ranges, namespace entry, `ip -n`, sysctls and polling come from the lab library
/// that `hasync lab` uses, so the rules are enforced in one place.
pub use hasync_agent::lab::netns::{is_lab_address, wait_for};

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
        Ok(lab::ip(&self.name, args)?)
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
        Ok(lab::run_in(&self.name, f)?)
    }

    /// Starts `f` on a thread that joined this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<Result<T, hasync_agent::lab::LabError>> {
        lab::spawn_in(&self.name, f)
    }

    /// Writes sysctl `key` (dotted, `net.` only) inside this namespace and checks it took.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        Ok(lab::sysctl(&self.name, key, value)?)
    }

    /// Makes `ifname`, an endpoint facing a member that forwards in XDP, take XDP redirects
    /// (GRO on) and send finished checksums (transmit checksum offload off); see
    /// `hasync_agent::lab::netns::Offload`.
    pub fn xdp_endpoint(&self, ifname: &str) -> Result<()> {
        lab::set_offload(&self.name, ifname, lab::Offload::Gro, true)?;
        lab::set_offload(&self.name, ifname, lab::Offload::TxChecksum, false)?;
        Ok(())
    }

    /// The MAC address of `ifname` in this namespace.
    pub fn mac(&self, ifname: &str) -> Result<[u8; 6]> {
        let json = self.ip(&["-j", "link", "show", ifname])?;
        let v: serde_json::Value = serde_json::from_str(&json).context("`ip -j link` output")?;
        let text = v[0]["address"]
            .as_str()
            .with_context(|| format!("no MAC address for {ifname} in {}: {json}", self.name))?;
        let mut out = [0u8; 6];
        let parts: Vec<&str> = text.split(':').collect();
        ensure!(parts.len() == 6, "MAC address {text:?} of {ifname}");
        for (o, p) in out.iter_mut().zip(parts) {
            *o = u8::from_str_radix(p, 16).with_context(|| format!("MAC address {text:?}"))?;
        }
        Ok(out)
    }

    /// Loads nftables `script` (`nft -f -`) in this namespace ([`nft_in`]).
    pub fn nft(&self, script: &str) -> Result<()> {
        nft_in(&self.name, script)
    }

    /// The packets named counter `counter` of nftables table `table` (`inet`) counted
    /// ([`nft_counter_in`]).
    pub fn nft_counter(&self, table: &str, counter: &str) -> Result<u64> {
        nft_counter_in(&self.name, table, counter)
    }

    /// The index of interface `ifname` in this namespace.
    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        let name = std::ffi::CString::new(ifname)?;
        // SAFETY: `name` is a valid NUL-terminated string.
        let index = self.run(|| unsafe { libc::if_nametoindex(name.as_ptr()) })?;
        ensure!(index != 0, "no interface {ifname} in {}", self.name);
        Ok(index)
    }
}

/// The packets named counter `counter` of nftables table `table` (`inet`) in namespace `ns`
/// counted.
pub fn nft_counter_in(ns: &str, table: &str, counter: &str) -> Result<u64> {
    let out = lab::command_in(ns, "nft")?
        .args(["list", "counter", "inet", table, counter])
        .output()
        .context("running `nft`")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "nft in {ns}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let packets = text
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1);
    packets
        .with_context(|| format!("no packets in counter {counter}: {text}"))?
        .parse()
        .with_context(|| format!("counter {counter}: {text}"))
}

/// Loads nftables `script` (`nft -f -`) in namespace `ns` (one of a test's own: a lab
/// cluster's members too).
pub fn nft_in(ns: &str, script: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = lab::command_in(ns, "nft")?
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running `nft`")?;
    child
        .stdin
        .take()
        .context("nft's stdin")?
        .write_all(script.as_bytes())
        .context("writing to nft")?;
    let out = child.wait_with_output().context("waiting for nft")?;
    ensure!(
        out.status.success(),
        "nft in {ns} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The seconds left to the kernel's connection-tracking entries, in namespace `ns`, of TCP
/// connections to `port`.
pub fn conntrack_timeouts(ns: &str, port: u16) -> Result<Vec<u64>> {
    let read = || std::fs::read_to_string("/proc/thread-self/net/nf_conntrack");
    let text = lab::run_in(ns, read)?.context("reading the connection-tracking table")?;
    let dport = format!("dport={port}");
    text.lines()
        .filter(|l| l.contains(" tcp ") && l.contains(&dport))
        .map(|l| {
            let timeout = l.split_whitespace().nth(4);
            timeout
                .with_context(|| format!("conntrack line {l:?}"))?
                .parse()
                .with_context(|| format!("conntrack line {l:?}"))
        })
        .collect()
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e:#}");
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The guard of what sends raw frames, and the raw socket they open, refuse the host's
    /// namespace and let a lab's pass (root: a lab namespace).
    #[test]
    fn test_traffic_is_refused_in_the_hosts_namespace() {
        let e = refuse_host_namespace().expect_err("the test runs in the host's namespace");
        assert!(e.to_string().contains("host's network namespace"), "{e}");
        let lab = Lab::new("guard").expect("lab (root)");
        let ns = lab.netns("a").expect("namespace");
        ns.run(refuse_host_namespace)
            .expect("joined")
            .expect("a lab namespace passes");
        let e = crate::sockets::packet_socket(0).expect_err("a raw socket on the host");
        assert!(e.to_string().contains("host's network namespace"), "{e}");
        ns.run(|| crate::sockets::packet_socket(0))
            .expect("joined")
            .expect("a raw socket in a lab namespace");
    }
}
