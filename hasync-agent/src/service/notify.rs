//! sd_notify(3) without libsystemd: one datagram to the socket in `$NOTIFY_SOCKET`, a path or
//! an abstract socket (`@name`). A `Type=notify` unit is "started" once the agent sends
//! `READY=1`; `STOPPING=1` tells the manager a stop is under way.

use std::{
    ffi::OsStr,
    io,
    os::unix::{ffi::OsStrExt as _, net::UnixDatagram},
    path::Path,
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
    fn ready_reaches_a_socket_path_and_an_abstract_socket() {
        let dir = std::env::temp_dir().join(format!("hasync-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
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
