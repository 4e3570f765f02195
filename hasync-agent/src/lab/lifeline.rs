//! Children that end with the process that started them: a lab's agents and helpers get
//! SIGKILL when the test, bench or fault run that started them dies, even by SIGKILL (a CI
//! timeout, `kill -9`), so none is left running in a namespace nobody will remove, holding its
//! XDP programs. SIGKILL, not SIGTERM: a fault run freezes agents (SIGSTOP), and a frozen one
//! would keep a SIGTERM pending for good; an agent's pins stay on SIGTERM too.
//!
//! The kernel sends a child its parent-death signal (`PR_SET_PDEATHSIG`) when the *thread*
//! that forked it exits, not the process: a child started from a test's helper thread would be
//! stopped as soon as that thread ended. So every child is forked by one thread that lives as
//! long as the process.

use std::{
    io,
    os::unix::process::CommandExt as _,
    process::{Child, Command},
    sync::{mpsc, Mutex},
};

type Request = (Command, mpsc::Sender<io::Result<Child>>);

/// The spawning thread's queue, started at the first spawn.
static SPAWNER: Mutex<Option<mpsc::Sender<Request>>> = Mutex::new(None);

/// Starts `cmd` as a child that gets SIGKILL when this process dies.
pub fn spawn(mut cmd: Command) -> io::Result<Child> {
    let parent = std::process::id();
    // SAFETY: between fork and exec the closure calls only prctl and getppid, which are
    // async-signal-safe, and allocates nothing (the error is a raw OS error).
    unsafe {
        cmd.pre_exec(move || die_with(parent));
    }
    let (answer, answered) = mpsc::channel();
    // The thread does not end (it catches a panic of the spawn); were it gone, nothing starts
    // another: its children would have been killed with it.
    spawner()?
        .send((cmd, answer))
        .map_err(|_| io::Error::other("the lab's spawning thread is gone"))?;
    answered
        .recv()
        .map_err(|_| io::Error::other("the lab's spawning thread is gone"))?
}

/// In the child, before exec: SIGKILL when the parent goes; an error if it is gone already
/// (the child was then adopted before the setting took).
fn die_with(parent: u32) -> io::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and changes nothing else.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: getppid has no preconditions.
    let now = unsafe { libc::getppid() };
    if u32::try_from(now).ok() != Some(parent) {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

/// The spawning thread's queue, starting the thread if it is not running.
fn spawner() -> io::Result<mpsc::Sender<Request>> {
    let mut slot = SPAWNER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(queue) = slot.as_ref() {
        return Ok(queue.clone());
    }
    let (queue, requests) = mpsc::channel::<Request>();
    std::thread::Builder::new()
        .name("lab-spawner".into())
        .spawn(move || {
            // The queue in SPAWNER is never dropped: this thread lives as long as the process
            // (its end would kill every child it forked). A spawn that panics is an error.
            for (mut cmd, answer) in requests {
                let spawned =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cmd.spawn()))
                        .unwrap_or_else(|_| Err(io::Error::other("starting the child panicked")));
                let _ = answer.send(spawned);
            }
        })?;
    *slot = Some(queue.clone());
    Ok(queue)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A child started from a thread that then ends keeps running (the parent-death signal
    /// follows the forking thread: seen failing with the fork done on the caller's thread,
    /// `sleep` ended with the thread).
    #[test]
    fn a_child_outlives_the_thread_that_asked_for_it() {
        let mut child = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            spawn(cmd).expect("spawn")
        })
        .join()
        .expect("the asking thread");
        std::thread::sleep(Duration::from_millis(300));
        let status = child.try_wait().expect("try_wait");
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            status, None,
            "the child ended with the thread that asked for it"
        );
    }

    /// A child of a process killed with SIGKILL ends too, also while it is frozen (SIGSTOP,
    /// as the fault runs freeze agents): this test runs itself as that process
    /// (`a_child_dies_with_its_process_helper`), which starts `sleep 30` through [`spawn`],
    /// prints its PID and waits to be killed (seen failing with the pre-exec step taken out:
    /// `sleep` was adopted and ran on; and with SIGTERM for the signal: it stayed, frozen).
    #[test]
    fn a_child_dies_with_its_process() {
        use std::io::BufRead as _;
        let exe = std::env::current_exe().expect("test binary");
        let mut helper = Command::new(exe)
            .args([
                "--exact",
                "lab::lifeline::tests::a_child_dies_with_its_process_helper",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("HASYNC_LIFELINE_HELPER", "1")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the helper");
        let out = helper.stdout.take().expect("stdout");
        let pid = io::BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                l.split_once("lifeline-child=")?
                    .1
                    .trim()
                    .parse::<u32>()
                    .ok()
            });
        if let Some(pid) = pid.and_then(|p| libc::pid_t::try_from(p).ok()) {
            // SAFETY: kill(2) on the helper's child, which runs until the helper dies.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        let _ = helper.kill();
        let _ = helper.wait();
        let pid = pid.expect("the helper printed its child's PID");
        let gone =
            crate::lab::netns::wait_for(Duration::from_secs(5), || (!runs(pid)).then_some(()));
        if gone.is_none() {
            if let Ok(raw) = libc::pid_t::try_from(pid) {
                // SAFETY: kill(2) on the sleep this test started (it holds the test's output).
                unsafe { libc::kill(raw, libc::SIGKILL) };
            }
        }
        assert!(
            gone.is_some(),
            "sleep (pid {pid}) outlived its killed parent"
        );
    }

    /// Whether `pid` runs (a zombie waiting for its new parent to reap it does not).
    fn runs(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z')),
            Err(_) => false,
        }
    }

    /// Run by `a_child_dies_with_its_process` only.
    #[test]
    #[ignore = "the helper process of a_child_dies_with_its_process"]
    fn a_child_dies_with_its_process_helper() {
        if std::env::var_os("HASYNC_LIFELINE_HELPER").is_none() {
            return;
        }
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut child = spawn(cmd).expect("spawn");
        println!("lifeline-child={}", child.id());
        // Killed long before this ends (then `sleep` gets its SIGTERM from the kernel).
        std::thread::sleep(Duration::from_secs(20));
        let _ = child.kill();
        let _ = child.wait();
    }
}
