//! The operator side of the control socket: one request, one answer, blocking (the CLI needs
//! no runtime).

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::de::DeserializeOwned;

use super::protocol::{Request, Response};

/// How long the CLI waits for an answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest answer line the CLI reads.
pub const MAX_RESPONSE_LINE: u64 = 256 << 20;

/// Errors reaching the agent, each saying what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "agent not running: socket {} not found; start it with systemctl start hasync",
        path.display()
    )]
    NotRunning { path: PathBuf },
    #[error(
        "agent not running: nothing answers on socket {} (a stale socket left by an agent that \
         stopped); start it with systemctl start hasync",
        path.display()
    )]
    Stale { path: PathBuf },
    #[error(
        "permission denied on socket {}: run as root (or as a member of the socket's group)",
        path.display()
    )]
    PermissionDenied { path: PathBuf },
    #[error("cannot connect to the agent on socket {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("talking to the agent on socket {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent on socket {} did not answer within {} s", path.display(), ANSWER_TIMEOUT.as_secs())]
    Timeout { path: PathBuf },
    #[error("the agent on socket {} closed the connection without answering", path.display())]
    NoAnswer { path: PathBuf },
    #[error("the agent on socket {} sent a malformed answer: {message}", path.display())]
    BadAnswer { path: PathBuf, message: String },
    /// The agent answered with an error.
    #[error("the agent refused the request: {0}")]
    Refused(String),
}

/// Sends `req` to the agent listening on `path` and returns its answer (which may be an
/// error answer: see [`call`]).
pub fn request(path: &Path, req: &Request) -> Result<Response, ControlError> {
    let stream = connect(path)?;
    let io_err = |source| exchange_error(path, source);
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(io_err)?;
    stream
        .set_write_timeout(Some(ANSWER_TIMEOUT))
        .map_err(io_err)?;

    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Io {
        path: path.to_owned(),
        source: io::Error::other(e),
    })?;
    line.push(b'\n');
    if let Err(e) = (&stream).write_all(&line) {
        // An agent that refuses the connection at once (too many readers) answers and hangs
        // up without reading: its answer may be waiting all the same.
        let hung_up = matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        );
        if hung_up {
            if let Ok(answer) = read_answer(path, &stream) {
                return Ok(answer);
            }
        }
        return Err(io_err(e));
    }
    read_answer(path, &stream)
}

/// Connects to the agent's socket at `path`, naming why that failed.
fn connect(path: &Path) -> Result<UnixStream, ControlError> {
    UnixStream::connect(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => ControlError::NotRunning {
            path: path.to_owned(),
        },
        io::ErrorKind::ConnectionRefused => ControlError::Stale {
            path: path.to_owned(),
        },
        io::ErrorKind::PermissionDenied => ControlError::PermissionDenied {
            path: path.to_owned(),
        },
        _ => ControlError::Connect {
            path: path.to_owned(),
            source,
        },
    })
}

/// What an I/O error while talking to the agent at `path` means.
fn exchange_error(path: &Path, source: io::Error) -> ControlError {
    match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ControlError::Timeout {
            path: path.to_owned(),
        },
        // The agent hung up before reading the request, or before answering.
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => ControlError::NoAnswer {
            path: path.to_owned(),
        },
        _ => ControlError::Io {
            path: path.to_owned(),
            source,
        },
    }
}

/// Reads the agent's one-line answer from `stream`.
fn read_answer(path: &Path, stream: &UnixStream) -> Result<Response, ControlError> {
    let mut answer = Vec::new();
    BufReader::new(stream)
        .take(MAX_RESPONSE_LINE)
        .read_until(b'\n', &mut answer)
        .map_err(|source| exchange_error(path, source))?;
    if answer.is_empty() {
        return Err(ControlError::NoAnswer {
            path: path.to_owned(),
        });
    }
    if answer.last() != Some(&b'\n') {
        return Err(ControlError::BadAnswer {
            path: path.to_owned(),
            message: if answer.len() as u64 >= MAX_RESPONSE_LINE {
                format!("longer than {MAX_RESPONSE_LINE} bytes")
            } else {
                "cut short".to_owned()
            },
        });
    }
    serde_json::from_slice(&answer).map_err(|e| ControlError::BadAnswer {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// [`request`], turning an error answer into [`ControlError::Refused`]: the answer's data.
pub fn call(path: &Path, req: &Request) -> Result<serde_json::Value, ControlError> {
    let response = request(path, req)?;
    if response.ok {
        response.view().map_err(|e| ControlError::BadAnswer {
            path: path.to_owned(),
            message: e.to_string(),
        })
    } else {
        Err(ControlError::Refused(
            response
                .error
                .unwrap_or_else(|| "no reason given".to_owned()),
        ))
    }
}

/// Reads a view out of an answer's data.
pub fn parse<T: DeserializeOwned>(path: &Path, data: serde_json::Value) -> Result<T, ControlError> {
    serde_json::from_value(data).map_err(|e| ControlError::BadAnswer {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::testing::TempDir;

    #[test]
    fn a_missing_socket_says_the_agent_is_not_running_and_how_to_start_it() {
        let dir = TempDir::new("control-missing");
        let path = dir.path().join("hasync.sock");
        let e = request(&path, &Request::ShowMembers {}).expect_err("no agent");
        assert_eq!(
            e.to_string(),
            format!(
                "agent not running: socket {} not found; start it with systemctl start hasync",
                path.display()
            )
        );
    }

    #[test]
    fn a_stale_socket_says_nothing_answers() {
        let dir = TempDir::new("control-stale");
        let path = dir.path().join("hasync.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let e = request(&path, &Request::ShowMembers {}).expect_err("no agent");
        assert!(matches!(e, ControlError::Stale { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("agent not running: nothing answers on socket"),
            "{msg}"
        );
        assert!(msg.contains("stale socket"), "{msg}");
    }

    #[test]
    fn an_agent_that_hangs_up_or_talks_nonsense_is_reported() {
        let dir = TempDir::new("control-nonsense");
        let path = dir.path().join("hasync.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            // First connection: hang up; second: answer garbage.
            let (a, _) = listener.accept().unwrap();
            drop(a);
            let (mut b, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&b).read_line(&mut line).unwrap();
            b.write_all(b"hello\n").unwrap();
        });
        let e = request(&path, &Request::ShowFlaps {}).expect_err("hung up");
        assert!(
            e.to_string()
                .contains("closed the connection without answering"),
            "{e}"
        );
        let e = request(&path, &Request::ShowFlaps {}).expect_err("garbage");
        assert!(e.to_string().contains("sent a malformed answer"), "{e}");
        server.join().unwrap();
    }

    #[test]
    fn an_error_answer_becomes_refused() {
        let dir = TempDir::new("control-refused");
        let path = dir.path().join("hasync.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            let mut answer = serde_json::to_vec(&Response::error("member is busy")).unwrap();
            answer.push(b'\n');
            s.write_all(&answer).unwrap();
        });
        let e = call(&path, &Request::Suspend {}).expect_err("refused");
        assert_eq!(
            e.to_string(),
            "the agent refused the request: member is busy"
        );
        server.join().unwrap();
    }
}
