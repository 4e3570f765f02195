//! Entering lab namespaces: `ip` commands, threads and child processes that run inside one, and
//! the children a lab started, ended by PID.

use std::{
    ffi::{CString, OsStr},
    fs::File,
    io::Write as _,
    net::IpAddr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::Mutex,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{LabError, Result};

/// Where `ip netns add` puts its namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The bind mount of namespace `ns`.
pub fn netns_path(ns: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(ns)
}

/// Whether namespace `ns` exists: a named one (a name that is a path, which iproute2 would
/// open as it is, never is).
pub fn netns_exists(ns: &str) -> bool {
    check_ns_name(ns).is_ok() && netns_path(ns).exists()
}

fn check_ns_name(ns: &str) -> Result<()> {
    if ns.is_empty() || ns.contains('/') || ns.starts_with('.') {
        return Err(LabError::NoSuchNamespace {
            name: ns.into(),
            known: "names without `/`".into(),
        });
    }
    Ok(())
}

/// Whether `addr` is in a range labs may use: 198.18.0.0/15 or fd00::/8.
pub fn is_lab_address(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            o[0] == 198 && (o[1] == 18 || o[1] == 19)
        }
        IpAddr::V6(a) => a.octets()[0] == 0xfd,
    }
}

/// `cmd` as a user would type it.
pub(crate) fn display(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `cmd` to completion with `stdin` as its input, returning its stdout; a failure names
/// the command and carries its stderr.
pub(crate) fn output(cmd: &mut Command, stdin: Option<&str>) -> Result<String> {
    let line = display(cmd);
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn {
            command: line.clone(),
            source,
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| LabError::io(format!("writing the input of `{line}`"), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| LabError::io(format!("waiting for `{line}`"), e))?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: line,
            status: out.status,
            // Some tools (ping) tell why on stdout.
            stderr: [&out.stderr, &out.stdout]
                .iter()
                .map(|o| String::from_utf8_lossy(o).trim().to_owned())
                .find(|o| !o.is_empty())
                .unwrap_or_default(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n NS ARGS...`.
pub fn ip(ns: &str, args: &[&str]) -> Result<String> {
    check_ns_name(ns)?;
    output(Command::new("ip").arg("-n").arg(ns).args(args), None)
}

/// `ip ARGS...` in the caller's namespace: only for `ip netns add|del`.
pub(crate) fn ip_netns(args: &[&str]) -> Result<String> {
    debug_assert_eq!(args.first(), Some(&"netns"));
    output(Command::new("ip").args(args), None)
}

/// Runs many `ip` commands in namespace `ns` through one `ip -batch`; a failure names the
/// failing line.
pub fn ip_batch(ns: &str, lines: &[String]) -> Result<()> {
    check_ns_name(ns)?;
    batch(&["-n", ns, "-batch", "-"], lines, &format!("ip -n {ns}"))
}

/// Adds namespaces `names` in order through one `ip -batch` in the caller's namespace,
/// stopping at the first failure; returns how many were added (the first ones of `names`),
/// and the failure. When `ip` does not say which line failed, none is counted as added:
/// better to leave a namespace behind than to delete one we did not create.
pub(crate) fn add_namespaces(names: &[String]) -> (usize, Result<()>) {
    match netns_batch("add", names) {
        Ok(()) => (names.len(), Ok(())),
        Err(e) => {
            let added = match &e {
                LabError::Command { stderr, .. } => failed_line(stderr).map_or(0, |n| n - 1),
                _ => 0,
            };
            (added, Err(e))
        }
    }
}

/// Deletes namespaces `names` through one `ip -batch` in the caller's namespace. It goes on
/// past a failure, so one namespace that cannot go does not leave the others behind; the
/// error names the last line that failed.
pub(crate) fn del_namespaces(names: &[String]) -> Result<()> {
    netns_batch("del", names)
}

/// `ip netns VERB NAME` for each of `names`, in one batch (`-force` for `del`).
fn netns_batch(verb: &str, names: &[String]) -> Result<()> {
    for name in names {
        check_ns_name(name)?;
    }
    let args: &[&str] = if verb == "del" {
        &["-force", "-batch", "-"]
    } else {
        &["-batch", "-"]
    };
    let lines: Vec<String> = names.iter().map(|n| format!("netns {verb} {n}")).collect();
    batch(args, &lines, "ip")
}

/// The line (1-based) that `ip -batch` says failed last: "Command failed -:3".
fn failed_line(stderr: &str) -> Option<usize> {
    let (_, n) = stderr.rsplit_once("-:")?;
    n.trim().parse().ok().filter(|&n| n > 0)
}

/// Feeds `lines` to `ip ARGS` (a `-batch -`); a failure is reported as `{prefix} {line}` for
/// the line `ip` names ("Command failed -:3").
fn batch(args: &[&str], lines: &[String], prefix: &str) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let script = lines.join("\n") + "\n";
    output(Command::new("ip").args(args), Some(&script))
        .map(drop)
        .map_err(|e| match e {
            LabError::Command {
                command,
                status,
                stderr,
            } => {
                let failed = failed_line(&stderr).and_then(|n| lines.get(n - 1));
                LabError::Command {
                    command: match failed {
                        Some(line) => format!("{prefix} {line}"),
                        None => command,
                    },
                    status,
                    stderr,
                }
            }
            other => other,
        })
}

/// Moves the calling thread into namespace `ns`.
fn enter(ns: &str) -> Result<()> {
    check_ns_name(ns)?;
    let path = netns_path(ns);
    let file =
        File::open(&path).map_err(|e| LabError::io(format!("opening {}", path.display()), e))?;
    // SAFETY: a valid namespace fd; CLONE_NEWNET only changes this thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(LabError::io(
            format!("setns({})", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Runs `f` on a thread that joined namespace `ns` (so `std::net` sockets it opens live
/// there), and waits for it. A panic in `f` propagates.
pub fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            enter(ns)?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Starts `f` on a thread that joined namespace `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<Result<T>> {
    let ns = ns.to_owned();
    std::thread::spawn(move || -> Result<T> {
        enter(&ns)?;
        Ok(f())
    })
}

/// Writes sysctl `key` (dotted, `net.` only) in namespace `ns` and checks it took.
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    if !key.starts_with("net.") || key.contains('/') {
        return Err(LabError::io(
            format!("sysctl {key}"),
            std::io::Error::other("only per-namespace `net.` sysctls"),
        ));
    }
    let read = run_in(ns, || -> std::io::Result<String> {
        std::fs::write(&path, value)?;
        Ok(std::fs::read_to_string(&path)?.trim().to_owned())
    })?
    .map_err(|e| LabError::io(format!("writing {path} in namespace {ns}"), e))?;
    if read != value {
        return Err(LabError::io(
            format!("sysctl {key} in namespace {ns}"),
            std::io::Error::other(format!("reads {read} after writing {value}")),
        ));
    }
    Ok(())
}

/// An offload the lab switches on a veth, with the legacy ethtool ioctl (no `ethtool` binary
/// needed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offload {
    /// Transmit checksum offload. A veth hands its peer packets whose TCP/UDP checksum is
    /// left for "the hardware" to finish; the kernel's stack tolerates that, but a frame that
    /// XDP redirects leaves as it is, with the checksum unfinished. Endpoints whose traffic a
    /// member forwards in XDP turn it off, as a real NIC's peer computes its checksums.
    TxChecksum,
    /// Generic receive offload. A veth takes XDP redirects (`ndo_xdp_xmit`) only while its
    /// peer runs XDP or has GRO on: switch ports and endpoints facing a member that forwards
    /// in XDP turn it on.
    Gro,
}

impl Offload {
    /// `ETHTOOL_S*` of linux/ethtool.h.
    fn command(self) -> u32 {
        match self {
            Offload::TxChecksum => 0x17,
            Offload::Gro => 0x2c,
        }
    }
}

/// Turns `offload` on or off on `ifname` in namespace `ns`.
pub fn set_offload(ns: &str, ifname: &str, offload: Offload, on: bool) -> Result<()> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let what = || format!("setting {offload:?} to {on} on {ifname} in namespace {ns}");
    let name = std::ffi::CString::new(ifname).map_err(|e| LabError::io(what(), e.into()))?;
    let done = run_in(ns, || -> std::io::Result<()> {
        let mut value = EthtoolValue {
            cmd: offload.command(),
            data: u32::from(on),
        };
        // SAFETY: a zeroed ifreq is valid; the name (checked to fit) is copied in.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        let bytes = name.as_bytes_with_nul();
        if bytes.len() > req.ifr_name.len() {
            return Err(std::io::Error::other("interface name too long"));
        }
        for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
        // SAFETY: plain socket(2); closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `req` points at `value`, both live across the call.
        let rc = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &mut req) };
        let err = std::io::Error::last_os_error();
        // SAFETY: closing the socket opened above.
        unsafe { libc::close(fd) };
        if rc < 0 {
            return Err(err);
        }
        Ok(())
    })?;
    done.map_err(|e| LabError::io(what(), e))
}

/// A command that runs `program` inside namespace `ns`: the child joins it with `setns(2)`
/// between fork and exec.
///
/// Not `ip netns exec`: that also gives the child a mount namespace with a fresh /sys, which
/// hides bpffs at /sys/fs/bpf where the agent pins its maps.
pub fn command_in(ns: &str, program: impl AsRef<OsStr>) -> Result<Command> {
    check_ns_name(ns)?;
    let path = netns_path(ns);
    if !path.exists() {
        return Err(LabError::io(
            format!("namespace {ns}"),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| LabError::io(format!("namespace {ns}"), std::io::Error::other(e)))?;
    let mut cmd = Command::new(program);
    // SAFETY: between fork and exec the closure only calls open, setns and close, which are
    // async-signal-safe, on a path allocated before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(c_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let rc = libc::setns(fd, libc::CLONE_NEWNET);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if rc != 0 {
                return Err(err);
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Signals the lab sends to its own processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: a clean stop.
    Term,
    /// SIGINT.
    Int,
    /// SIGKILL: no chance to clean up (a crash).
    Kill,
    /// SIGSTOP: frozen, sockets open but silent (a hung agent).
    Stop,
    /// SIGCONT: resumes a stopped process.
    Cont,
    /// SIGHUP: the agent reopens its traffic log (after a rotation).
    Hup,
}

impl Signal {
    fn raw(self) -> libc::c_int {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Int => libc::SIGINT,
            Signal::Kill => libc::SIGKILL,
            Signal::Stop => libc::SIGSTOP,
            Signal::Cont => libc::SIGCONT,
            Signal::Hup => libc::SIGHUP,
        }
    }
}

struct Proc {
    label: String,
    child: Child,
    /// Set once reaped: the PID may then belong to someone else and is never signalled again.
    status: Option<ExitStatus>,
}

/// The processes a lab started. Signals go only to children that have not been reaped, so a
/// PID is never reused under us.
#[derive(Default)]
pub struct Processes {
    procs: Mutex<Vec<Proc>>,
}

impl Processes {
    /// Starts `cmd`, keeping it for [`Processes::stop_all`]. The child gets SIGTERM if this
    /// process dies before it stops the child ([`super::lifeline`]).
    pub fn spawn(&self, label: &str, cmd: Command) -> Result<u32> {
        let command = display(&cmd);
        let child =
            super::lifeline::spawn(cmd).map_err(|source| LabError::Spawn { command, source })?;
        let pid = child.id();
        let mut procs = self.lock();
        // One reaped before with the same PID (they come round) is gone for good: the PID
        // names this child from now on.
        procs.retain(|p| p.child.id() != pid);
        procs.push(Proc {
            label: label.to_owned(),
            child,
            status: None,
        });
        Ok(pid)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Proc>> {
        // A panic while holding the lock leaves the list consistent: keep using it.
        self.procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn with<T>(&self, pid: u32, f: impl FnOnce(&mut Proc) -> T) -> Result<T> {
        let mut procs = self.lock();
        let p = procs
            .iter_mut()
            .find(|p| p.child.id() == pid)
            .ok_or(LabError::NotOurProcess { pid })?;
        Ok(f(p))
    }

    /// The exit status of `pid` if it has exited (reaping it), `None` while it runs.
    pub fn exit_status(&self, pid: u32) -> Result<Option<ExitStatus>> {
        self.with(pid, reap)
    }

    /// Whether `pid` (one of ours) still runs.
    pub fn running(&self, pid: u32) -> bool {
        matches!(self.exit_status(pid), Ok(None))
    }

    /// Sends `signal` to `pid` if it is one of ours and still runs.
    pub fn signal(&self, pid: u32, signal: Signal) -> Result<()> {
        self.with(pid, |p| {
            if reap(p).is_some() {
                return Err(LabError::NotOurProcess { pid });
            }
            send(p, signal)
        })?
    }

    /// Waits up to `timeout` for `pid` to exit.
    pub fn wait(&self, pid: u32, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status(pid)? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGCONT and SIGTERM, `grace` to exit, then SIGKILL; returns the exit status.
    pub fn stop(&self, pid: u32, grace: Duration) -> Result<ExitStatus> {
        for signal in [Signal::Cont, Signal::Term] {
            if self.signal(pid, signal).is_err() {
                break;
            }
        }
        if let Some(status) = self.wait(pid, grace)? {
            return Ok(status);
        }
        let _ = self.signal(pid, Signal::Kill);
        self.with(pid, |p| {
            p.child
                .wait()
                .map_err(|e| LabError::io(format!("waiting for {} (pid {pid})", p.label), e))
                .inspect(|status| p.status = Some(*status))
        })?
    }

    /// Stops every process still running: SIGTERM to all, `grace` for all, then SIGKILL.
    pub fn stop_all(&self, grace: Duration) {
        let pids: Vec<u32> = self
            .lock()
            .iter_mut()
            .filter_map(|p| reap(p).is_none().then(|| p.child.id()))
            .collect();
        for &pid in &pids {
            let _ = self.signal(pid, Signal::Cont);
            let _ = self.signal(pid, Signal::Term);
        }
        let deadline = Instant::now() + grace;
        for &pid in &pids {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(e) = self.stop(pid, left) {
                eprintln!("lab cleanup: {e}");
            }
        }
    }
}

fn reap(p: &mut Proc) -> Option<ExitStatus> {
    if p.status.is_none() {
        if let Ok(Some(status)) = p.child.try_wait() {
            p.status = Some(status);
        }
    }
    p.status
}

fn send(p: &Proc, signal: Signal) -> Result<()> {
    let pid = p.child.id();
    let raw = libc::pid_t::try_from(pid).map_err(|_| LabError::NotOurProcess { pid })?;
    // SAFETY: kill has no memory preconditions; `raw` is our unreaped child, so it cannot have
    // been reused by another process.
    if unsafe { libc::kill(raw, signal.raw()) } != 0 {
        return Err(LabError::io(
            format!("kill({pid}, {signal:?}) for {}", p.label),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.stop_all(Duration::from_secs(3));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root, as the lab does. A namespace that exists already stops the batch: only
    /// those added before it count as ours, the other one is left alone and the error names
    /// its line; deleting goes on past a namespace that is not there and removes the rest.
    #[test]
    fn namespaces_are_added_and_deleted_in_one_batch() {
        let tag = format!("nsb{}-", std::process::id());
        let names: Vec<String> = ["a", "b", "c"]
            .iter()
            .map(|n| format!("{tag}{n}"))
            .collect();
        ip_netns(&["netns", "add", &names[1]]).expect("add the other namespace");
        let (added, result) = add_namespaces(&names);
        let error = result.expect_err("b exists").to_string();
        let existed: Vec<bool> = names.iter().map(|n| netns_exists(n)).collect();
        let deleted = del_namespaces(&[names[0].clone(), names[2].clone(), names[1].clone()]);
        let left: Vec<&String> = names.iter().filter(|n| netns_exists(n)).collect();
        assert_eq!(added, 1);
        assert!(
            error.contains(&format!("ip netns add {}", names[1])),
            "{error}"
        );
        assert_eq!(existed, [true, true, false]);
        let deleted = deleted.expect_err("c was never added").to_string();
        assert!(
            deleted.contains(&format!("netns del {}", names[2])),
            "{deleted}"
        );
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    /// A child that gets the PID of one reaped before (PIDs wrap; the fault runs restart
    /// agents by the hundred) is the one that PID names: before stop 42 the reaped one was
    /// found first, so the live child was never signalled and `stop_all` left it running
    /// (seen failing). The PID is made to come round by `ns_last_pid` (root), a few tries.
    #[test]
    fn a_pid_that_comes_round_names_the_live_child() {
        let procs = Processes::default();
        let mut reused = None;
        for _ in 0..50 {
            let first = procs.spawn("first", Command::new("true")).expect("spawn");
            let ended = procs.wait(first, Duration::from_secs(5)).expect("ours");
            assert!(ended.is_some(), "`true` did not end");
            std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", first - 1))
                .expect("ns_last_pid (root)");
            let mut sleep = Command::new("sleep");
            sleep.arg("60");
            let second = procs.spawn("second", sleep).expect("spawn");
            if second == first {
                reused = Some(second);
                break;
            }
            procs.stop(second, Duration::from_secs(1)).expect("stop");
        }
        let pid = reused.expect("the PID never came round in 50 tries");
        assert!(procs.running(pid), "the live child reads as exited");
        procs.stop_all(Duration::from_secs(2));
        assert!(!procs.running(pid), "stop_all left the live child running");
    }

    #[test]
    fn the_failed_line_is_read_from_ip() {
        let stderr = "Error: x\nCommand failed -:2\nError: y\nCommand failed -:17";
        assert_eq!(failed_line(stderr), Some(17));
        assert_eq!(failed_line("Command failed -:0"), None);
        assert_eq!(failed_line("Error: no line"), None);
    }
}
