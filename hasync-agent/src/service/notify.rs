//! sd_notify(3) without libsystemd: one datagram to the socket in `$NOTIFY_SOCKET`, a path or
//! an abstract socket (`@name`). A `Type=notify` unit is "started" once the agent sends
//! `READY=1`; `STOPPING=1` tells the manager a stop is under way; `WATCHDOG=1`, sent by the
//! main loop while the unit's `WatchdogSec=` asks for it, tells it the agent still runs (a
//! hung agent is killed and restarted).

use std::{
    ffi::OsStr,
    io,
    os::unix::{ffi::OsStrExt as _, net::UnixDatagram},
    path::Path,
    time::Duration,
};

/// The environment variable the service manager sets.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to the service manager. `Ok(false)`
/// when not run by one (`$NOTIFY_SOCKET` unset or empty).
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(socket) if !socket.is_empty() => send(&socket, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` to `socket`: `@name` is an abstract socket, `/path` a socket file.
pub fn send(socket: &OsStr, state: &str) -> io::Result<()> {
    let bytes = socket.as_bytes();
    let sock = UnixDatagram::unbound()?;
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else if bytes.starts_with(b"/") {
        sock.send_to(state.as_bytes(), Path::new(socket))?;
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{NOTIFY_SOCKET}={} is neither a socket path nor an abstract socket (@name)",
                socket.to_string_lossy()
            ),
        ));
    }
    Ok(())
}

/// `READY=1` with a status line for `systemctl status`; a failure is logged, not fatal (the
/// manager then times the start out, which says more than an agent that refuses to run).
pub fn ready(status: &str) {
    report(&format!("READY=1\nSTATUS={status}"));
}

/// `STOPPING=1`.
pub fn stopping() {
    report("STOPPING=1\nSTATUS=stopping");
}

/// How often to send `WATCHDOG=1`: half the interval the manager set (`$WATCHDOG_USEC`, for
/// this process when `$WATCHDOG_PID` names it); `None` without a watchdog.
pub fn watchdog_every() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// [`watchdog_every`] from the variables' values and this process's id.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own: u32) -> Option<Duration> {
    if pid.is_some_and(|p| p.parse::<u32>().ok() != Some(own)) {
        return None;
    }
    let usec: u64 = usec?.parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

/// `WATCHDOG=1`; a failure is logged.
pub fn watchdog() {
    if let Err(e) = notify("WATCHDOG=1") {
        tracing::warn!(error = %e, "pinging the service manager's watchdog failed");
    }
}

fn report(state: &str) {
    match notify(state) {
        Ok(true) => {
            tracing::debug!(state = %state.replace('\n', " "), "notified the service manager")
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(
            error = %e,
            state = %state.replace('\n', " "),
            "notifying the service manager failed"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::net::UnixDatagram, time::Duration};

    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut buf = [0; 512];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn the_watchdog_is_pinged_at_half_its_interval_for_this_process_only() {
        let half = Some(Duration::from_secs(15));
        assert_eq!(watchdog_interval(Some("30000000"), None, 7), half);
        assert_eq!(watchdog_interval(Some("30000000"), Some("7"), 7), half);
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("8"), 7),
            None,
            "another's"
        );
        assert_eq!(watchdog_interval(None, None, 7), None, "no watchdog");
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("x"), None, 7), None);
    }

    #[test]
    fn ready_reaches_a_socket_path_and_an_abstract_socket() {
        let dir = std::env::temp_dir().join(format!("hasync-notify-{}", std::process::id()));
        crate::files::fresh_dir(&dir, 0o755).expect("dir");
        let path = dir.join("notify.sock");
        let listener = UnixDatagram::bind(&path).expect("bind");
        send(path.as_os_str(), "READY=1\nSTATUS=up").expect("send to a path");
        assert_eq!(recv(&listener), "READY=1\nSTATUS=up");

        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("hasync-notify-test-{}", std::process::id());
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let abstract_listener = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        send(OsStr::new(&format!("@{name}")), "STOPPING=1").expect("send abstract");
        assert_eq!(recv(&abstract_listener), "STOPPING=1");

        let e = send(OsStr::new("relative.sock"), "READY=1").expect_err("refused");
        assert!(e.to_string().contains("neither a socket path"), "{e}");
        let e = send(dir.join("nobody.sock").as_os_str(), "READY=1").expect_err("no listener");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
