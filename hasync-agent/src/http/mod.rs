//! The member's HTTP server (`[local] http`): `/metrics` for Prometheus, `/` the dashboard,
//! `/api/cluster` the JSON it polls and `/api/history` the last 15 minutes it graphs (sampled
//! here every [`SAMPLE_EVERY`] while the server runs).
//!
//! Read-only and small: GET and HEAD only, request heads of at most [`MAX_HEAD_BYTES`] read
//! within [`HEAD_TIMEOUT`], at most [`MAX_CONNECTIONS`] connections (the oldest closed for a
//! newcomer when all are taken), each closed after [`CONNECTION_LIFETIME`]; over a loopback
//! address, only requests addressed to it
//! ([`addressed_here`]). Like the control socket it owns none of the member's state: every
//! answer is gathered from the runtime through [`Source`].

use std::{
    collections::VecDeque,
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::{
    control::ControlSender,
    dashboard::{
        history::{now_ms, History, SAMPLE_EVERY},
        ClusterApi, INDEX_HTML,
    },
    lock::lock,
    metrics::{render, Source, CONTENT_TYPE},
    tasks::AbortOnDrop,
};

mod answers;
use answers::{AnswerBody, Answers, Tracked};

/// What the server answers from: the runtime, through [`Source`], and the graphs' memory.
#[derive(Clone, Debug)]
pub struct Backend {
    source: Source,
    history: Arc<Mutex<History>>,
}

impl From<Source> for Backend {
    fn from(source: Source) -> Backend {
        Backend {
            source,
            history: Arc::default(),
        }
    }
}

impl Backend {
    /// Takes one sample for the graphs (nothing when the runtime does not answer).
    pub async fn sample(&self) {
        if let Ok(snapshot) = self.source.gather().await {
            lock(&self.history).observe(&snapshot, now_ms());
        }
    }
}

/// Samples every [`SAMPLE_EVERY`] until the runtime's request channel closes.
async fn sample_loop(backend: Backend) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = backend.source.closed() => break,
            _ = tick.tick() => backend.sample().await,
        }
    }
}

/// Connections served at once; a newcomer beyond them closes the oldest ([`Room`]).
pub const MAX_CONNECTIONS: usize = 64;
/// Longest request head (request line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long a client may take to send a request head (also the keep-alive idle limit).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed after this long, whatever it does (an answer under way is finished).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// How long a connection closed for a newcomer ([`Served`]) may take to finish an answer under
/// way: the newcomer waits for it (a client that reads nothing holds it no longer than this;
/// one with no answer under way, half a head sent or idle, is closed at once).
pub const CLOSED_GRACE: Duration = Duration::from_secs(1);

/// The dashboard may run its own inline script and style, and talk to this server only.
const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// Errors starting the HTTP server.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr} for metrics and the dashboard ([local] http): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Listens on `addr` and serves until the runtime's request channel closes (or the task is
/// aborted). Returns the address it listens on (the port is chosen when `addr` has port 0).
pub async fn serve(
    addr: SocketAddr,
    source: Source,
) -> Result<(SocketAddr, JoinHandle<()>), HttpError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| HttpError::Bind { addr, source })?;
    info!(address = %local, "metrics and dashboard listening (http://{local}/)");
    let backend = Backend::from(source);
    let mut sampler = AbortOnDrop(tokio::spawn(sample_loop(backend.clone())));
    let server = tokio::spawn(async move {
        tokio::select! {
            () = accept_loop(listener, backend) => {}
            // The sampler ends with the runtime's channel, as the accept loop does, or by a
            // panic: the server's task panics with it (`crate::tasks` watches that one).
            Err(e) = &mut sampler.0 => if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            },
        }
    });
    Ok((local, server))
}

async fn accept_loop(listener: TcpListener, backend: Backend) {
    let source = &backend.source;
    let room = Room::default();
    loop {
        let (stream, peer) = tokio::select! {
            _ = source.closed() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and the like: wait a little rather than spin.
                    warn!(%error, "metrics server accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        match room.ask() {
            Some(asked) => {
                tokio::spawn(serve_one(
                    stream,
                    peer,
                    backend.clone(),
                    room.clone(),
                    asked,
                ));
            }
            // Dropped: closed at once.
            None => debug!(%peer, "metrics connection closed: every slot taken, as many waiting"),
        }
    }
    debug!("metrics server stopped");
}

/// Serves one connection once it has a slot (`asked`).
async fn serve_one(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    backend: Backend,
    room: Room,
    asked: Asked,
) {
    let Some((permit, entry)) = room.slot(asked).await else {
        debug!(%peer, "metrics connection closed: no slot came free");
        return;
    };
    // Came in on a loopback address (also through a listener on every address): answered
    // only when addressed to it ([`addressed_here`]).
    let loopback = stream
        .local_addr()
        .is_ok_and(|a| a.ip().to_canonical().is_loopback());
    let answers = Answers::default();
    let service = service_fn({
        let answers = answers.clone();
        move |request| {
            let backend = backend.clone();
            let answering = answers.begin();
            async move {
                let answer = handle(request, &backend, loopback).await;
                Ok::<_, Infallible>(answer.map(|body| AnswerBody::new(body, answering)))
            }
        }
    });
    let close = entry.close.clone();
    let ends = Ends {
        lifetime: CONNECTION_LIFETIME,
        close: &close,
        answers: &answers,
    };
    if let Err(error) = run_connection(stream, service, &ends).await {
        debug!(%peer, %error, "metrics connection ended");
    }
    // The slot first (a newcomer then takes it, closing no one); the place also when the task
    // panics: a dead entry, the oldest, would be told to close in a live one's place.
    drop(permit);
    drop(entry);
}

/// Where connections are served: [`MAX_CONNECTIONS`] slots, the connections in them
/// ([`Served`]), and at most as many more waiting for one, each having closed the oldest.
/// The accept loop never waits: before, it waited for each newcomer's slot in turn, and
/// connections queued ahead of a scrape held it a close's grace each.
#[derive(Clone)]
struct Room {
    slots: Arc<Semaphore>,
    waiting: Arc<Semaphore>,
    served: Arc<Mutex<Served>>,
}

impl Default for Room {
    fn default() -> Room {
        Room {
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            waiting: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            served: Arc::default(),
        }
    }
}

/// A newcomer's claim on a slot: one free, or a place among those waiting.
enum Asked {
    Free(OwnedSemaphorePermit),
    Waiting(OwnedSemaphorePermit),
}

impl Room {
    /// A slot for a newcomer: a free one, else a place in the wait (the oldest connection told
    /// to close for it); `None` when as many wait as are served.
    fn ask(&self) -> Option<Asked> {
        if let Ok(free) = self.slots.clone().try_acquire_owned() {
            return Some(Asked::Free(free));
        }
        let waiting = self.waiting.clone().try_acquire_owned().ok()?;
        lock(&self.served).close_oldest();
        Some(Asked::Waiting(waiting))
    }

    /// The slot `asked` for, and the connection's place among those served; `None` when none
    /// came free within [`HEAD_TIMEOUT`].
    async fn slot(&self, asked: Asked) -> Option<(OwnedSemaphorePermit, ServedEntry)> {
        let permit = match asked {
            Asked::Free(permit) => permit,
            Asked::Waiting(waiting) => {
                let free = self.slots.clone().acquire_owned();
                let permit = tokio::time::timeout(HEAD_TIMEOUT, free).await.ok()?.ok()?;
                drop(waiting);
                permit
            }
        };
        Some((permit, Served::open(&self.served)))
    }
}

/// The connections served, oldest first. When every slot is taken, the oldest is told to
/// close for a newcomer (an answer under way is sent whole first): clients that hold every
/// slot, with requests kept within the idle limit, cannot keep scrapes and the dashboard out
/// (they waited in the listen backlog for a connection's lifetime), and a scrape, whose
/// connection is the newest, is answered long before it is the oldest.
#[derive(Debug, Default)]
struct Served {
    /// What tells each connection to close (each its own: it names the connection too).
    open: VecDeque<Arc<Notify>>,
}

/// A connection's place in [`Served`], given up when dropped.
struct ServedEntry {
    served: Arc<Mutex<Served>>,
    close: Arc<Notify>,
}

impl Drop for ServedEntry {
    fn drop(&mut self) {
        lock(&self.served)
            .open
            .retain(|open| !Arc::ptr_eq(open, &self.close));
    }
}

impl Served {
    /// A new connection's place, with what tells it to close.
    fn open(served: &Arc<Mutex<Served>>) -> ServedEntry {
        let close = Arc::new(Notify::new());
        lock(served).open.push_back(close.clone());
        ServedEntry {
            served: served.clone(),
            close,
        }
    }

    fn close_oldest(&mut self) {
        if let Some(close) = self.open.pop_front() {
            close.notify_one();
        }
    }
}

/// What ends a connection: its `lifetime`, a `close` for a newcomer, and what says whether it
/// has `answers` under way then.
struct Ends<'a> {
    lifetime: Duration,
    close: &'a Notify,
    answers: &'a Answers,
}

/// Serves one connection for its lifetime, whatever it does, or until it is told to close;
/// then an answer under way is still sent whole (with `connection: close`), within
/// [`HEAD_TIMEOUT`] more ([`CLOSED_GRACE`] when closed for a newcomer, who waits for it). A
/// connection told to close with no answer under way is closed at once.
async fn run_connection<I, S, F, B>(
    stream: I,
    service: S,
    ends: &Ends<'_>,
) -> Result<(), hyper::Error>
where
    S: hyper::service::Service<
        Request<Incoming>,
        Response = Response<B>,
        Error = Infallible,
        Future = F,
    >,
    F: std::future::Future<Output = Result<Response<B>, Infallible>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let io = Tracked::new(TokioIo::new(stream), ends.answers.clone());
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(64)
        .serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);
    let grace = tokio::select! {
        ended = connection.as_mut() => return ended,
        () = tokio::time::sleep(ends.lifetime) => HEAD_TIMEOUT,
        () = ends.close.notified() => CLOSED_GRACE,
    };
    if grace == CLOSED_GRACE && !ends.answers.under_way() {
        return Ok(());
    }
    connection.as_mut().graceful_shutdown();
    // A close for a newcomer during a lifetime's grace shortens it (ends it, with no answer
    // under way).
    let mut deadline = tokio::time::Instant::now() + grace;
    let mut watching = grace > CLOSED_GRACE;
    loop {
        tokio::select! {
            ended = connection.as_mut() => return ended,
            () = tokio::time::sleep_until(deadline) => return Ok(()),
            () = ends.close.notified(), if watching => {
                if !ends.answers.under_way() {
                    return Ok(());
                }
                watching = false;
                deadline = deadline.min(tokio::time::Instant::now() + CLOSED_GRACE);
            }
        }
    }
}

async fn handle(
    request: Request<Incoming>,
    backend: &Backend,
    loopback: bool,
) -> Response<Full<Bytes>> {
    if loopback {
        if let Some(host) = request.headers().get(header::HOST) {
            if !addressed_here(host.as_bytes()) {
                return misdirected(host);
            }
        }
    }
    respond(request.method(), request.uri().path(), backend).await
}

/// Is `host` (a request's `Host`) a name a server on a loopback address answers to: an IP
/// address, `localhost` or a name under it (which browsers resolve to loopback themselves),
/// with or without a port? Any other name is a web page's whose own DNS name was made to point
/// here (DNS rebinding): answered, the page would read the dashboard and the metrics across the
/// browser's same-origin rule.
pub fn addressed_here(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((inside, _)) => inside,
            None => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name.parse::<std::net::IpAddr>().is_ok() || name == "localhost" || name.ends_with(".localhost")
}

fn misdirected(host: &HeaderValue) -> Response<Full<Bytes>> {
    text(
        StatusCode::MISDIRECTED_REQUEST,
        format!(
            "Host {host:?} is not a name of this server: over a loopback address it answers \
             requests for localhost or an IP address only (a DNS name made to point here is a \
             web page's, refused; a reverse proxy in front must pass Host as localhost or an \
             address)\n"
        ),
    )
}

/// The answer to `method path`: the routing, without sockets (tests call it directly).
pub async fn respond(method: &Method, path: &str, backend: &Backend) -> Response<Full<Bytes>> {
    let source = &backend.source;
    if method != Method::GET && method != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed: this server is read-only (GET, HEAD)\n"),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/" | "/index.html" => {
            let mut r = body(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML);
            r.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(DASHBOARD_CSP),
            );
            r
        }
        "/metrics" => match source.snapshot().await {
            Ok(snapshot) => body(StatusCode::OK, CONTENT_TYPE, render(&snapshot)),
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        },
        "/api/cluster" => match source.snapshot().await {
            Ok(snapshot) => json(StatusCode::OK, &ClusterApi::new(&snapshot)),
            Err(e) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({ "error": e.to_string() }),
            ),
        },
        "/api/history" => json(StatusCode::OK, &lock(&backend.history).view()),
        _ => text(
            StatusCode::NOT_FOUND,
            format!(
                "{path} not found: try / (dashboard), /metrics, /api/cluster or /api/history\n"
            ),
        ),
    }
}

fn body(
    status: StatusCode,
    content_type: &'static str,
    b: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(b.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn text(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    body(status, "text/plain; charset=utf-8", message)
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(bytes) => body(status, "application/json", bytes),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering the answer failed: {e}\n"),
        ),
    }
}

/// How often an address the server could not listen on is tried again.
pub const LISTEN_RETRY: Duration = Duration::from_secs(5);
/// How often a server still unable to listen says so again.
const LISTEN_WARN_EVERY: Duration = Duration::from_secs(60);

/// Starts the server where `config` says (`[local] http`), answering from the runtime behind
/// `requests`. Metrics are not worth stopping a cluster member for: an address it cannot
/// listen on is tried again ([`listen`]). `None` when disabled.
pub async fn start(
    config: &crate::config::Config,
    requests: ControlSender,
) -> Option<JoinHandle<()>> {
    let addr = config.http_addr()?;
    Some(listen(addr, Source::new(requests, config), LISTEN_RETRY).await)
}

/// Serves on `addr` as [`serve`] does. While it cannot listen there (the port taken, by
/// another local user too, who would answer in the member's place; the address not up yet at
/// boot), it says so and tries again every `every` until the runtime's request channel closes.
pub async fn listen(addr: SocketAddr, source: Source, every: Duration) -> JoinHandle<()> {
    match serve(addr, source.clone()).await {
        Ok((_, task)) => task,
        Err(e) => {
            warn!(
                error = %crate::datapath::error_chain(&e),
                retry_s = every.as_secs_f64(),
                "metrics and dashboard are off until the server can listen"
            );
            tokio::spawn(listen_later(addr, source, every))
        }
    }
}

async fn listen_later(addr: SocketAddr, source: Source, every: Duration) {
    let mut warned = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = source.closed() => return,
            () = tokio::time::sleep(every) => {}
        }
        match serve(addr, source.clone()).await {
            Ok((_, task)) => {
                // Aborted with this task (the agent's shutdown aborts it).
                let mut server = AbortOnDrop(task);
                if let Err(e) = (&mut server.0).await {
                    if e.is_panic() {
                        std::panic::resume_unwind(e.into_panic());
                    }
                }
                return;
            }
            Err(e) if warned.elapsed() >= LISTEN_WARN_EVERY => {
                warn!(error = %crate::datapath::error_chain(&e), "metrics and dashboard still off");
                warned = tokio::time::Instant::now();
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests;
