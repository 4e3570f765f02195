//! The agent side of the control socket: accepts connections, reads request lines, forwards
//! each request to the runtime over a channel and writes back its answer.
//!
//! Two access levels: a connection from root or from the agent's own user may do everything;
//! one from anyone else the socket lets in (the members of `[local] control_group`, whose
//! group the socket is given) may only `show`: a request that changes the member's state
//! (`suspend`, `functional`) is refused, naming the rule, and never reaches the runtime.

use std::{
    fs::Permissions,
    io,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{oneshot, Semaphore},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use super::{
    protocol::{Request, Response, MAX_REQUEST_LINE},
    ControlSender,
};
use crate::dir_trust::{dir_risk, risk_above, Risk, OURS_OR_ROOTS};

/// Mode of the socket file: root and the socket's group may use it.
pub const SOCKET_MODE: u32 = 0o660;
/// Mode of a socket directory the server creates.
pub const DIR_MODE: u32 = 0o755;
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 32;
/// Of those, read-only connections ([`Access::readers`]) served at once; more are refused
/// at once, so readers cannot take the slots an operator's `suspend` needs.
pub const MAX_READER_CONNECTIONS: usize = 4;
/// How long a request may wait for the runtime's answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection may wait with no request (or half of one) before it is closed: a
/// client that connects and says nothing holds one of the [`MAX_CONNECTIONS`] slots.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long writing one answer may take: a client that asks and never reads holds its
/// slot and the answer's memory.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection's two timeouts: [`IDLE_TIMEOUT`] and [`WRITE_TIMEOUT`] (tests shorten them).
#[derive(Clone, Copy, Debug)]
struct Timeouts {
    idle: Duration,
    write: Duration,
}

impl Timeouts {
    const DEFAULT: Timeouts = Timeouts {
        idle: IDLE_TIMEOUT,
        write: WRITE_TIMEOUT,
    };
}

/// Errors setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("control socket {path} has no parent directory")]
    NoParent { path: PathBuf },
    #[error("cannot create the control socket directory {dir}: {source}")]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the control socket's directory {dir} is not safe: {at} is {risk}, and whoever may \
         write there could put a listener of their own in the socket's place (answering \
         `hasync suspend` for the agent); keep the socket in a directory only root writes, as \
         /run/hasync"
    )]
    UnsafeDir {
        dir: PathBuf,
        at: PathBuf,
        risk: Risk,
    },
    #[error("cannot check the control socket directory {dir}: {source}")]
    CheckDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another agent is already listening on the control socket {path}: stop it first \
         (systemctl stop hasync), or give this one another [local].control_socket"
    )]
    InUse { path: PathBuf },
    #[error("control socket path {path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("cannot check the existing control socket {path}: {source}")]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the stale control socket {path}: {source}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the control socket {path}, bound to check it: {source}")]
    RemoveChecked {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on the control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set mode {mode:04o} on the control socket {path}: {source}")]
    Chmod {
        path: PathBuf,
        mode: u32,
        #[source]
        source: io::Error,
    },
    #[error("local.control_group = \"{group}\": no such group on this host")]
    NoGroup { group: String },
    #[error("local.control_group = \"{group}\": cannot look the group up: {source}")]
    GroupLookup {
        group: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot give the control socket {path} to group {gid} (local.control_group; the agent needs CAP_CHOWN for it): {source}"
    )]
    Chown {
        path: PathBuf,
        gid: u32,
        #[source]
        source: io::Error,
    },
}

/// Who besides root and the agent's own user may connect: the members of this group, which the
/// socket is given (`[local] control_group`), read-only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub readers: Option<u32>,
}

impl Access {
    /// The access `[local] control_group` names (looked up by name on this host).
    pub fn for_group(group: Option<&str>) -> Result<Access, ServerError> {
        let Some(group) = group else {
            return Ok(Access::default());
        };
        let gid = group_id(group).map_err(|source| ServerError::GroupLookup {
            group: group.to_owned(),
            source,
        })?;
        let gid = gid.ok_or_else(|| ServerError::NoGroup {
            group: group.to_owned(),
        })?;
        Ok(Access { readers: Some(gid) })
    }
}

/// The id of the group named `name` on this host (`/etc/group`, NSS), `None` if there is none.
fn group_id(name: &str) -> io::Result<Option<u32>> {
    let c_name = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the name"))?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // SAFETY: all-zero bytes are a valid `group` (null pointers, zero id).
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: `c_name` NUL-terminated, `group` and
        // `found` writable, `buf` writable for its length; the result points into them.
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut group,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        match rc {
            0 if found.is_null() => return Ok(None),
            0 => return Ok(Some(group.gr_gid)),
            libc::ERANGE if buf.len() < 1 << 22 => buf.resize(buf.len() * 4, 0),
            // What getgrnam_r(3) lists as "not found" besides a null result.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// What a connection's user may do: everything (root, the agent's own user), or only `show`.
/// The runtime is told too: readers get a smaller share of what requests contend for (the
/// session walks: `handler::sessions_later`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Root or the agent's own user on the socket.
    Operator,
    /// Anyone else the socket lets in.
    Reader,
    /// The agent itself (its metrics and dashboard): never from the socket.
    Agent,
}

impl Level {
    /// The level of a connection from `uid` to an agent running as `euid`.
    fn of(uid: u32, euid: u32) -> Level {
        if uid == 0 || uid == euid {
            Level::Operator
        } else {
            Level::Reader
        }
    }

    /// `request` refused at this level, with why; `None` when it may be served.
    fn refuses(self, request: &Request, uid: u32) -> Option<Response> {
        (self == Level::Reader && request.changes_state()).then(|| {
            Response::error(format!(
                "{} changes this member's state: only root or the agent's own user may ask for \
                 it (this connection is uid {uid}, which may only show)",
                request.name()
            ))
        })
    }
}

/// [`serve`], with `access`'s readers let in (the socket given to their group).
pub async fn serve_for(
    path: &Path,
    requests: ControlSender,
    access: Access,
) -> Result<JoinHandle<()>, ServerError> {
    serve_with(path, requests, Timeouts::DEFAULT, access)
}

/// Listens on `path` and serves every connection, forwarding requests on `requests`.
///
/// Creates the parent directory (mode 0755) if missing; replaces a socket file nobody answers
/// on (left by an agent that died); fails if another agent answers on it. The socket gets mode
/// 0660. Returns once the socket listens (so a client may connect right away); the serving
/// runs in the returned task.
///
/// The server runs until the receiving end of `requests` is dropped (or the task is aborted);
/// it then removes the socket file, if it is still the one it created.
pub async fn serve(path: &Path, requests: ControlSender) -> Result<JoinHandle<()>, ServerError> {
    serve_with(path, requests, Timeouts::DEFAULT, Access::default())
}

/// Checks that the socket can be served at `path` as [`serve`] would (its directory made,
/// nobody else answering on it, a socket bound and its mode set), then removes it again: the
/// agent checks this before it touches the datapath, and listens only once that is up (a
/// client's connection is its sign that the agent is ready).
pub fn check(path: &Path, access: Access) -> Result<(), ServerError> {
    drop(bind(path, access)?);
    match std::fs::remove_file(path) {
        Err(source) if source.kind() != io::ErrorKind::NotFound => {
            Err(ServerError::RemoveChecked {
                path: path.to_owned(),
                source,
            })
        }
        _ => Ok(()),
    }
}

fn serve_with(
    path: &Path,
    requests: ControlSender,
    timeouts: Timeouts,
    access: Access,
) -> Result<JoinHandle<()>, ServerError> {
    let listener = bind(path, access)?;
    let file = SocketFile::new(path);
    info!(socket = %path.display(), "control socket listening");
    Ok(tokio::spawn(accept_loop(
        listener, requests, file, timeouts,
    )))
}

fn bind(path: &Path, access: Access) -> Result<UnixListener, ServerError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| ServerError::NoParent {
            path: path.to_owned(),
        })?;
    make_dirs(dir)?;
    check_dir(dir)?;
    remove_if_stale(path)?;
    let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
        path: path.to_owned(),
        source,
    })?;
    if let Some(gid) = access.readers {
        // Before the mode, which until then is the umask's (0700 under the unit's 0077).
        chown_here(path, gid).map_err(|source| ServerError::Chown {
            path: path.to_owned(),
            gid,
            source,
        })?;
    }
    chmod_here(path, SOCKET_MODE).map_err(|source| ServerError::Chmod {
        path: path.to_owned(),
        mode: SOCKET_MODE,
        source,
    })?;
    Ok(listener)
}

/// Makes `dir` and the directories above it that are missing, each with [`DIR_MODE`] set
/// after, not only asked for: the umask (0077 under the unit) would keep the socket's group
/// from reaching the socket.
fn make_dirs(dir: &Path) -> Result<(), ServerError> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.is_dir()).collect();
    for d in missing.into_iter().rev() {
        let made = match std::fs::DirBuilder::new().mode(DIR_MODE).create(d) {
            Ok(()) => std::fs::set_permissions(d, Permissions::from_mode(DIR_MODE)),
            // Made meanwhile by someone else: not ours to change (check_dir judges it).
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => Ok(()),
            Err(e) => Err(e),
        };
        made.map_err(|source| ServerError::CreateDir {
            dir: d.to_owned(),
            source,
        })?;
    }
    Ok(())
}

/// The socket's directory and those above it: each root's or this user's, and no one else
/// may write to it; a directory above it may be sticky (`/tmp`: there no one else may
/// remove or rename what is below), the socket's own may not (while the agent is down,
/// anyone could bind the socket's path there). A directory that is a symbolic link
/// (`/var/run`) is judged where it leads, with the directories above both the link and that.
fn check_dir(dir: &Path) -> Result<(), ServerError> {
    let checking = |dir: &Path| {
        let dir = dir.to_owned();
        move |source| ServerError::CheckDir { dir, source }
    };
    let real = dir.canonicalize().map_err(checking(dir))?;
    let meta = std::fs::metadata(&real).map_err(checking(&real))?;
    let above = |d: &Path| risk_above(d).map_err(|(at, source)| checking(&at)(source));
    let risk = match dir_risk(&meta, OURS_OR_ROOTS) {
        Some(risk) => Some((real.clone(), risk)),
        None => above(dir)?.or(above(&real)?),
    };
    match risk {
        Some((at, risk)) => Err(ServerError::UnsafeDir {
            dir: dir.to_owned(),
            at,
            risk,
        }),
        None => Ok(()),
    }
}

/// Gives `path` itself (never a symlink there) to group `gid`.
fn chown_here(path: &Path, gid: u32) -> io::Result<()> {
    let c_path = c_path(path)?;
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call; -1 (as
    // uid_t) keeps the owner.
    let rc = unsafe {
        libc::fchownat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            libc::uid_t::MAX,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    os_result(rc)
}

/// A libc call's result: 0 is success, anything else the error in errno.
fn os_result(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt as _;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))
}

/// Sets `mode` on `path` itself: a symlink there (swapped in after the bind, in a directory
/// another user can write) is an error, never followed.
fn chmod_here(path: &Path, mode: u32) -> io::Result<()> {
    let c_path = c_path(path)?;
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::fchmodat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            mode,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    os_result(rc)
}

/// Removes `path` if it is a socket nobody listens on; fails if someone does.
fn remove_if_stale(path: &Path) -> Result<(), ServerError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServerError::Probe {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket {
            path: path.to_owned(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ServerError::InUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            warn!(socket = %path.display(), "removing a stale control socket (no agent answers on it)");
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ServerError::RemoveStale {
                    path: path.to_owned(),
                    source: e,
                }),
                _ => Ok(()),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ServerError::Probe {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The socket file this server created; removed on drop if it is still that file (another
/// agent may have replaced it meanwhile).
struct SocketFile {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl SocketFile {
    fn new(path: &Path) -> SocketFile {
        SocketFile {
            path: path.to_owned(),
            id: std::fs::symlink_metadata(path)
                .ok()
                .map(|m| (m.dev(), m.ino())),
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let current = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if self.id.is_some() && current == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn accept_loop(
    listener: UnixListener,
    requests: ControlSender,
    file: SocketFile,
    timeouts: Timeouts,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let reader_slots = Arc::new(Semaphore::new(MAX_READER_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = requests.closed() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // never closed
            },
        };
        let stream = tokio::select! {
            _ = requests.closed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // EMFILE and the like: wait a little rather than spin.
                    warn!(socket = %file.path.display(), %error, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let requests = requests.clone();
        // Who connected, from the kernel (SO_PEERCRED): unknown counts as a reader.
        let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
        let client = (Level::of(uid, crate::dir_trust::euid()), uid);
        let reader_permit = match client.0 {
            Level::Operator | Level::Agent => None,
            Level::Reader => match reader_slots.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    tokio::spawn(refuse_busy(stream, timeouts.write, permit));
                    continue;
                }
            },
        };
        tokio::spawn(async move {
            if let Err(error) = connection(stream, requests, timeouts, client).await {
                debug!(%error, "control connection ended");
            }
            drop((permit, reader_permit));
        });
    }
    debug!(socket = %file.path.display(), "control socket closed");
    drop(file);
}

/// Answers a reader's connection past [`MAX_READER_CONNECTIONS`] with why, and closes it
/// (then gives its slot, `permit`, back).
async fn refuse_busy(
    stream: UnixStream,
    timeout: Duration,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (_, mut write) = stream.into_split();
    let response = Response::error(format!(
        "too many read-only connections ({MAX_READER_CONNECTIONS} at once): try again later"
    ));
    let _ = write_response(&mut write, &response, timeout).await;
    drop(permit);
}

/// Serves one connection from `client` (its level and uid): request lines in, response lines
/// out, until EOF.
async fn connection(
    stream: UnixStream,
    requests: ControlSender,
    timeouts: Timeouts,
    (level, uid): (Level, u32),
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut read).take(MAX_REQUEST_LINE as u64 + 1);
        let reading = limited.read_until(b'\n', &mut line);
        let Ok(n) = tokio::time::timeout(timeouts.idle, reading).await else {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no request within {:?}", timeouts.idle),
            ));
        };
        if n? == 0 {
            return Ok(());
        }
        let complete = line.last() == Some(&b'\n');
        if !complete && line.len() > MAX_REQUEST_LINE {
            // No way to find the next request without reading the rest: answer and hang up.
            let response = Response::error(format!(
                "request line longer than {MAX_REQUEST_LINE} bytes; closing the connection"
            ));
            return write_response(&mut write, &response, timeouts.write).await;
        }
        if let Some(parsed) = Request::parse_line(&line) {
            let response = match parsed {
                Ok(request) => match level.refuses(&request, uid) {
                    Some(refused) => refused,
                    None => forward(request, level, &requests, ANSWER_TIMEOUT).await,
                },
                Err(malformed) => malformed,
            };
            write_response(&mut write, &response, timeouts.write).await?;
        }
        if !complete {
            // EOF after a last line without a newline.
            return Ok(());
        }
    }
}

/// Hands `request` to the runtime and waits for its answer, both within `wait`. An error
/// says what became of a request not answered in time: not taken (nothing was done), or taken
/// and unanswered (one that changes the member's state may still be carried out).
async fn forward(
    request: Request,
    level: Level,
    requests: &ControlSender,
    wait: Duration,
) -> Response {
    let name = request.name();
    let changes_state = request.changes_state();
    let deadline = tokio::time::Instant::now() + wait;
    let (tx, rx) = oneshot::channel();
    match tokio::time::timeout_at(deadline, requests.send((request, level, tx))).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Response::error("the agent is shutting down"),
        Err(_) => {
            return Response::error(format!(
                "the agent took no {name} request within {} s (busy); nothing was done",
                wait.as_secs()
            ))
        }
    }
    match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(response)) => {
            debug!(request = name, ok = response.ok, "control request");
            response
        }
        Ok(Err(_)) => Response::error(format!(
            "the agent dropped the {name} request without answering"
        )),
        Err(_) => Response::error(format!(
            "the agent did not answer the {name} request within {} s{}",
            wait.as_secs(),
            if changes_state {
                "; it may still be carried out: see `hasync show cluster members`"
            } else {
                ""
            }
        )),
    }
}

async fn write_response(
    w: &mut (impl AsyncWrite + Unpin),
    response: &Response,
    timeout: Duration,
) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(response).map_err(io::Error::other)?;
    bytes.push(b'\n');
    let writing = async {
        w.write_all(&bytes).await?;
        w.flush().await
    };
    tokio::time::timeout(timeout, writing)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read no answer within {timeout:?}"),
            ))
        })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

    use super::*;
    use crate::control::{
        client,
        protocol::SessionFilter,
        testing::{fake_runtime, TempDir},
        view::SessionsView,
    };

    /// Sends raw `input` on a fresh connection, half-closes, and returns the answer lines.
    async fn exchange(path: &Path, input: &[u8]) -> Vec<Response> {
        let stream = UnixStream::connect(path).await.expect("connect");
        let (read, mut write) = stream.into_split();
        // The server may hang up before reading everything (an overlong line).
        let _ = write.write_all(input).await;
        let _ = write.shutdown().await;
        let mut lines = BufReader::new(read).lines();
        let mut out = Vec::new();
        while let Some(line) = lines.next_line().await.expect("read") {
            out.push(serde_json::from_str(&line).expect("a response line is JSON"));
        }
        out
    }

    /// Runs `f` on a thread of its own whose credentials (the kernel keeps them per thread;
    /// the raw calls change only that thread's, unlike libc's wrappers) are uid and gid
    /// `id` with no supplementary groups: a user the socket's group lets in.
    fn as_user<T: Send + 'static>(id: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            // SAFETY: raw setgroups / setresgid / setresuid with valid arguments (an empty
            // list); they change this thread's credentials only, and the thread ends after
            // `f`.
            unsafe {
                assert_eq!(
                    libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<u32>()),
                    0
                );
                assert_eq!(libc::syscall(libc::SYS_setresgid, id, id, id), 0);
                assert_eq!(libc::syscall(libc::SYS_setresuid, id, id, id), 0);
            }
            f()
        })
        .join()
        .expect("the thread as another user")
    }

    /// A connection the server serves (one `show` answered on it), kept open; tried again
    /// (at most 100 times, 10 ms apart) while all reader slots are still taken.
    fn served(path: &Path) -> std::os::unix::net::UnixStream {
        use std::io::{BufRead as _, Write as _};
        for _ in 0..100 {
            let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect");
            let mut ask = serde_json::to_vec(&Request::ShowFlaps {}).expect("json");
            ask.push(b'\n');
            s.write_all(&ask).expect("ask");
            let mut line = String::new();
            std::io::BufReader::new(&s)
                .read_line(&mut line)
                .expect("answer");
            if !line.contains("too many read-only connections") {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("no reader slot came free");
    }

    /// `[local] control_group`: the socket is given to the group, whose members may show but
    /// not change the member's state (refused before the runtime, naming the rule); root may.
    /// Before, anyone who could connect could suspend the member.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_control_group_may_show_but_not_change_the_state() {
        use std::os::unix::fs::MetadataExt as _;
        const NOBODY: u32 = 65_534;
        let dir = TempDir::new("control-group");
        let path = dir.path().join("hasync.sock");
        let (tx, _runtime) = fake_runtime();
        let access = Access {
            readers: Some(NOBODY),
        };
        let _server = serve_for(&path, tx, access).await.expect("serve");
        assert_eq!(std::fs::metadata(&path).expect("socket").gid(), NOBODY);
        let p = path.clone();
        let (shown, suspend, busy, idle) = tokio::task::spawn_blocking(move || {
            as_user(NOBODY, move || {
                let shown = client::request(&p, &Request::ShowFlaps {}).expect("show");
                let suspend = client::request(&p, &Request::Suspend {}).expect("suspend");
                // Readers hold every slot they may have (each shown to be served: the slots of
                // the connections above come back once the server sees them closed): the next
                // one is refused at once.
                let idle: Vec<_> = (0..MAX_READER_CONNECTIONS).map(|_| served(&p)).collect();
                let busy = client::request(&p, &Request::ShowFlaps {}).expect("busy");
                (shown, suspend, busy, idle)
            })
        })
        .await
        .expect("client");
        assert_eq!(
            busy.error.as_deref(),
            Some("too many read-only connections (4 at once): try again later")
        );
        assert!(shown.ok, "{shown:?}");
        assert!(!suspend.ok);
        assert_eq!(
            suspend.error.as_deref(),
            Some(
                "suspend changes this member's state: only root or the agent's own user may ask \
                 for it (this connection is uid 65534, which may only show)"
            )
        );
        // Root is served while the readers hold theirs.
        let p = path.clone();
        let as_root =
            tokio::task::spawn_blocking(move || client::request(&p, &Request::Suspend {}))
                .await
                .expect("client")
                .expect("suspend");
        assert!(as_root.ok, "{as_root:?}");
        drop(idle);
    }

    /// Who may do what, whatever user runs the tests: root and the agent's own user
    /// everything, anyone else only what changes nothing.
    #[test]
    fn readers_may_ask_only_for_what_changes_nothing() {
        assert_eq!(Level::of(0, 1000), Level::Operator);
        assert_eq!(Level::of(1000, 1000), Level::Operator);
        assert_eq!(Level::of(1001, 1000), Level::Reader);
        for request in [Request::Suspend {}, Request::Functional {}] {
            assert!(Level::Reader.refuses(&request, 1001).is_some());
            assert!(Level::Operator.refuses(&request, 0).is_none());
        }
        let show = Request::ShowCounters { prefix: None };
        assert!(Level::Reader.refuses(&show, 1001).is_none());
    }

    #[test]
    fn a_control_group_that_does_not_exist_is_named() {
        let e = Access::for_group(Some("no-such-group-hasync")).expect_err("refused");
        assert_eq!(
            e.to_string(),
            "local.control_group = \"no-such-group-hasync\": no such group on this host"
        );
        assert_eq!(
            Access::for_group(Some("root")).expect("root"),
            Access { readers: Some(0) }
        );
    }

    #[tokio::test]
    async fn requests_reach_the_runtime_and_answers_come_back() {
        let dir = TempDir::new("control-serve");
        // The parent directory does not exist yet: the server creates it, 0755.
        let path = dir.path().join("run/hasync/hasync.sock");
        let (tx, runtime) = fake_runtime();
        let server = serve(&path, tx).await.expect("serve");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o660);
        assert_eq!(mode(path.parent().unwrap()), 0o755);

        let p = path.clone();
        let answer = tokio::task::spawn_blocking(move || {
            client::request(
                &p,
                &Request::ShowSessions {
                    count_only: false,
                    filter: SessionFilter {
                        proto: Some("tcp".into()),
                        ..Default::default()
                    },
                    offset: 0,
                    limit: Some(1),
                },
            )
        })
        .await
        .unwrap()
        .expect("request");
        assert!(answer.ok, "{answer:?}");
        let view: SessionsView = answer.view().unwrap();
        assert_eq!(view.total, 2);
        assert_eq!(view.sessions.unwrap().len(), 1);

        // The runtime goes away: the server stops and removes its socket.
        runtime.abort();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server stops")
            .expect("server task");
        assert!(!path.exists(), "socket removed");
    }

    #[tokio::test]
    async fn one_connection_carries_many_requests_and_bad_lines_get_error_answers() {
        let dir = TempDir::new("control-lines");
        let path = dir.path().join("hasync.sock");
        let (tx, _runtime) = fake_runtime();
        let _server = serve(&path, tx).await.expect("serve");
        let input = concat!(
            "{\"request\":\"show-counters\",\"prefix\":\"packets\"}\n",
            "\n",
            "this is not json\n",
            "{\"request\":\"show-sessions\",\"filter\":{\"prot\":\"tcp\"}}\n",
            "{\"request\":\"reboot\"}\n",
            "{\"request\":\"show-sessions\",\"filter\":{\"zone\":\"dmz\"}}\n",
            // The last line may lack its newline.
            "{\"request\":\"suspend\"}",
        );
        let answers = exchange(&path, input.as_bytes()).await;
        assert_eq!(answers.len(), 6, "{answers:?}");
        assert!(answers[0].ok);
        assert_eq!(
            answers[0].view::<serde_json::Value>().unwrap()["counters"]["packets"],
            123_456
        );
        for (answer, want) in [
            (
                &answers[1],
                "malformed request: expected ident at line 1 column 2",
            ),
            (&answers[2], "malformed request: unknown field `prot`"),
            (&answers[3], "malformed request: unknown variant `reboot`"),
            (
                &answers[4],
                "zone \"dmz\" is not configured (known: trust, untrust)",
            ),
        ] {
            assert!(!answer.ok);
            let e = answer.error.as_deref().unwrap();
            assert!(e.contains(want), "{e}");
        }
        assert_eq!(
            answers[5].view::<serde_json::Value>().unwrap()["state"],
            "suspended"
        );
    }

    #[tokio::test]
    async fn an_overlong_line_is_refused_and_the_connection_closed() {
        let dir = TempDir::new("control-long");
        let path = dir.path().join("hasync.sock");
        let (tx, _runtime) = fake_runtime();
        let _server = serve(&path, tx).await.expect("serve");
        let mut input = vec![b' '; MAX_REQUEST_LINE + 10];
        input.extend_from_slice(b"\n{\"request\":\"show-flaps\"}\n");
        let answers = exchange(&path, &input).await;
        assert_eq!(answers.len(), 1, "{answers:?}");
        assert!(answers[0]
            .error
            .as_deref()
            .unwrap()
            .contains("request line longer than 65536 bytes"));

        // A line of exactly the limit is fine.
        let mut input = br#"{"request":"show-flaps"}"#.to_vec();
        input.resize(MAX_REQUEST_LINE, b' ');
        input.push(b'\n');
        let answers = exchange(&path, &input).await;
        assert!(answers[0].ok, "{answers:?}");
    }

    /// Clients that connect and say nothing hold a slot each only until the idle timeout
    /// (shortened here): with every slot held, a request is answered once it passed. Seen
    /// failing (never answered) before the timeout.
    #[tokio::test]
    async fn idle_connections_do_not_lock_the_operator_out() {
        const IDLE: Duration = Duration::from_millis(300);
        let dir = TempDir::new("control-idle");
        let path = dir.path().join("hasync.sock");
        let (tx, _runtime) = fake_runtime();
        let timeouts = Timeouts {
            idle: IDLE,
            ..Timeouts::DEFAULT
        };
        let _server = serve_with(&path, tx, timeouts, Access::default()).expect("serve");
        // Before the idle clients connect: the first slot frees an idle timeout after that.
        let asked = tokio::time::Instant::now();
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(UnixStream::connect(&path).await.expect("connect"));
        }
        let answer = exchange(&path, b"{\"request\":\"show-flaps\"}\n");
        let answers = tokio::time::timeout(IDLE * 10, answer).await;
        let answers = answers.expect("no answer while idle clients held every slot");
        assert!(answers[0].ok, "{answers:?}");
        assert!(asked.elapsed() >= IDLE, "answered before a slot was free");
    }

    #[tokio::test]
    async fn a_runtime_that_drops_the_request_yields_an_error_answer() {
        let dir = TempDir::new("control-drop");
        let path = dir.path().join("hasync.sock");
        let (tx, mut rx) = tokio::sync::mpsc::channel::<crate::control::ControlRequest>(1);
        tokio::spawn(async move {
            while let Some((_request, _, reply)) = rx.recv().await {
                drop(reply);
            }
        });
        let _server = serve(&path, tx).await.expect("serve");
        let answers = exchange(&path, b"{\"request\":\"show-members\"}\n").await;
        assert_eq!(
            answers[0].error.as_deref(),
            Some("the agent dropped the show-members request without answering")
        );
    }

    /// A request the runtime neither takes nor answers in time gets an error that says what
    /// became of it: one never queued was not carried out (before, its send waited without
    /// end); one queued and unanswered may still be, which for `suspend` matters (before,
    /// the answer read as a plain failure, and the member was suspended later: seen failing).
    #[tokio::test]
    async fn a_late_answer_says_whether_the_request_may_still_be_carried_out() {
        let wait = Duration::from_millis(50);
        // A runtime that takes requests and never answers them.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<crate::control::ControlRequest>(4);
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(request) = rx.recv().await {
                held.push(request);
            }
        });
        let e = forward(Request::Suspend {}, Level::Operator, &tx, wait)
            .await
            .error;
        let e = e.expect("an error");
        assert!(
            e.contains("did not answer the suspend request within")
                && e.contains("it may still be carried out"),
            "{e}"
        );
        let e = forward(Request::ShowMembers {}, Level::Operator, &tx, wait)
            .await
            .error;
        let e = e.expect("an error");
        assert!(!e.contains("carried out"), "{e}");
        holder.abort();
        // A runtime whose queue is full: the request is never taken.
        let (tx, _rx) = tokio::sync::mpsc::channel::<crate::control::ControlRequest>(1);
        let (reply, _answer) = oneshot::channel();
        tx.send((Request::ShowFlaps {}, Level::Operator, reply))
            .await
            .expect("queued");
        let e = forward(Request::Functional {}, Level::Operator, &tx, wait)
            .await
            .error;
        let e = e.expect("an error");
        assert!(
            e.contains("took no functional request within") && e.contains("nothing was done"),
            "{e}"
        );
    }

    /// The socket's mode is set on the path itself, never through a symlink: one swapped in
    /// between the bind and the chmod (in a directory another user can write) would have had
    /// root set 0660 on its target (seen failing: the target's mode changed).
    #[test]
    fn the_sockets_mode_is_never_set_through_a_symlink() {
        let dir = TempDir::new("control-chmod");
        let target = dir.path().join("target");
        std::fs::write(&target, b"").expect("target");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).expect("0600");
        let link = dir.path().join("hasync.sock");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let e = chmod_here(&link, SOCKET_MODE).expect_err("through a symlink");
        let mode = std::fs::metadata(&target)
            .expect("target")
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o600, "{e}");
        let file = dir.path().join("plain");
        std::fs::write(&file, b"").expect("file");
        chmod_here(&file, SOCKET_MODE).expect("a file of its own");
        let mode = std::fs::metadata(&file).expect("file").permissions().mode() & 0o7777;
        assert_eq!(mode, SOCKET_MODE);
    }

    /// The socket's directory must be one no one else may write to (root's or ours, not
    /// sticky; one above it may be sticky): in another's, its writer could put a listener of
    /// their own in the socket's place and answer `hasync suspend` for the agent. Before, any
    /// existing directory was taken. One the server makes gets its mode whatever the umask: under the
    /// unit's 0077 it was 0700, and the socket's group could not reach the socket.
    #[tokio::test]
    async fn the_sockets_directory_is_checked_and_one_made_gets_its_mode() {
        let tmp = TempDir::new("control-dir");
        let (tx, _runtime) = fake_runtime();
        let theirs = tmp.path().join("theirs");
        std::fs::create_dir(&theirs).expect("mkdir");
        std::os::unix::fs::chown(&theirs, Some(65_534), Some(65_534)).expect("chown");
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let sticky = tmp.path().join("sticky");
        std::fs::create_dir(&sticky).expect("mkdir");
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        for (dir, risk) in [
            (&theirs, "owned by uid 65534"),
            (&open, "(mode 0777)"),
            (&sticky, "(mode 1777)"),
        ] {
            let path = dir.join("hasync.sock");
            let e = serve(&path, tx.clone())
                .await
                .expect_err("refused")
                .to_string();
            let named = format!(
                "the control socket's directory {} is not safe",
                dir.display()
            );
            assert!(e.starts_with(&named) && e.contains(risk), "{e}");
            assert!(!path.exists(), "bound in {}", dir.display());
            // Below it too (below a sticky one, a directory of ours is fine).
            let below = dir.join("sub");
            std::fs::create_dir(&below).expect("mkdir");
            let served = serve(&below.join("hasync.sock"), tx.clone()).await;
            if *dir == sticky {
                drop(served.expect("below a sticky directory"));
                continue;
            }
            let e = served.expect_err("below");
            assert!(
                e.to_string().contains(&format!("{} is ", dir.display())),
                "{e}"
            );
        }
        // Under the unit's umask, on a thread with a umask of its own (the other tests' files
        // keep theirs).
        let made = tmp.path().join("made").join("run");
        let socket = made.join("hasync.sock");
        let above = tmp.path().join("made");
        std::thread::spawn(move || {
            // SAFETY: unshare(CLONE_FS) gives this thread its own umask, cwd and root;
            // umask(2) cannot fail.
            unsafe {
                assert_eq!(libc::unshare(libc::CLONE_FS), 0);
                libc::umask(0o077);
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let _server = serve(&socket, tx).await.expect("a directory made here");
            });
        })
        .join()
        .expect("the thread with umask 0077");
        for d in [&made, &above] {
            let mode = std::fs::metadata(d).expect("made").permissions().mode() & 0o7777;
            assert_eq!(mode, DIR_MODE, "{}", d.display());
        }
        // A directory given through a link is judged where it leads (`/var/run` → `/run`).
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&made, &link).expect("symlink");
        let (tx, _runtime) = fake_runtime();
        let _server = serve(&link.join("other.sock"), tx)
            .await
            .expect("through a link");
    }

    #[tokio::test]
    async fn a_live_socket_is_never_taken_over_and_a_stale_one_is_replaced() {
        let dir = TempDir::new("control-inuse");
        let path = dir.path().join("hasync.sock");
        let (tx, _runtime) = fake_runtime();
        let _first = serve(&path, tx.clone()).await.expect("serve");
        let e = serve(&path, tx.clone())
            .await
            .expect_err("in use")
            .to_string();
        assert!(
            e.contains(&format!(
                "another agent is already listening on the control socket {}",
                path.display()
            )),
            "{e}"
        );

        // A socket file nobody listens on, as a killed agent leaves it.
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let _second = serve(&stale, tx.clone())
            .await
            .expect("replaces the stale socket");
        let answers = exchange(&stale, b"{\"request\":\"functional\"}\n").await;
        assert_eq!(
            answers[0].view::<serde_json::Value>().unwrap()["state"],
            "tentative"
        );

        // Never remove something that is not a socket.
        let file = dir.path().join("file");
        std::fs::write(&file, b"keep me").unwrap();
        let e = serve(&file, tx)
            .await
            .expect_err("not a socket")
            .to_string();
        assert!(e.contains("exists and is not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }
}
