//! Bounded traffic drivers that run inside lab namespaces: TCP and UDP echo servers, a
//! long-lived TCP client that sends a chunk every interval and checks its echo, a UDP
//! request/response client, and `ping`. Every loop has a maximum count and a deadline; stopping
//! a driver (or dropping it) ends its threads within about 100 ms.
//!
//! ```no_run
//! # fn main() -> Result<(), hasync_agent::lab::LabError> {
//! use std::time::{Duration, Instant};
//! use hasync_agent::lab::{topology::SERVER_V4, traffic::*, Topology};
//!
//! let topo = Topology::create("doc-", 2)?;
//! let server = (SERVER_V4, 7000).into();
//! let _echo = tcp_echo_server(topo.server(), server, Bounds::new(4, Duration::from_secs(30)))?;
//! let client = tcp_client(topo.client(), server, TcpClientOptions::default())?;
//! let steered = Instant::now();
//! topo.steer(2)?;
//! assert!(client.wait_ok_after(steered, Duration::from_secs(5)).is_some());
//! # Ok(()) }
//! ```

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{netns, LabError, Result};

/// How often loops look at their stop flag.
const POLL: Duration = Duration::from_millis(100);

/// The limits of a traffic loop: at most `max_count` iterations (connections, datagrams,
/// chunks, requests) and at most `duration`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub max_count: u64,
    pub duration: Duration,
}

impl Bounds {
    pub const fn new(max_count: u64, duration: Duration) -> Bounds {
        Bounds {
            max_count,
            duration,
        }
    }
}

/// A loop's stop flag and deadline.
#[derive(Clone)]
struct Limit {
    stop: Arc<AtomicBool>,
    deadline: Instant,
}

impl Limit {
    fn new(stop: &Arc<AtomicBool>, duration: Duration) -> Limit {
        Limit {
            stop: Arc::clone(stop),
            deadline: Instant::now() + duration,
        }
    }

    fn over(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline
    }

    /// Sleeps `d`, or less if stopped or past the deadline; false when over.
    fn sleep(&self, d: Duration) -> bool {
        let until = (Instant::now() + d).min(self.deadline);
        while Instant::now() < until {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(until.saturating_duration_since(Instant::now()).min(POLL));
        }
        !self.over()
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Writes all of `buf`, retrying write timeouts until `limit` is over. False if it was.
fn write_fully(stream: &mut TcpStream, mut buf: &[u8], limit: &Limit) -> std::io::Result<bool> {
    while !buf.is_empty() {
        if limit.over() {
            return Ok(false);
        }
        match stream.write(buf) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Counters of an echo server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// TCP connections accepted, or UDP datagrams received.
    pub accepted: AtomicU64,
    /// Bytes echoed.
    pub bytes: AtomicU64,
    /// I/O errors.
    pub errors: AtomicU64,
}

/// A traffic thread and its stop flag: stopped and joined when dropped.
struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Worker {
    fn new(stop: Arc<AtomicBool>, thread: JoinHandle<Result<()>>) -> Worker {
        Worker {
            stop,
            thread: Some(thread),
        }
    }

    /// Raises the stop flag and waits for the thread.
    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.halt();
    }
}

/// A TCP or UDP echo server running in a namespace; stopped on drop.
pub struct EchoServer {
    addr: SocketAddr,
    stats: Arc<ServerStats>,
    worker: Worker,
}

impl EchoServer {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Stops it and waits for its threads.
    pub fn stop(mut self) {
        self.worker.halt();
    }
}

/// Starts a thread in `ns` that joins it, runs `setup` there and then `body`; returns once
/// `setup` has answered, with its error if it failed.
fn start_in<S, B>(
    ns: &str,
    what: String,
    setup: impl FnOnce() -> std::io::Result<S> + Send + 'static,
    body: B,
) -> Result<JoinHandle<Result<()>>>
where
    S: Send + 'static,
    B: FnOnce(S) + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<std::io::Result<()>>();
    let thread = netns::spawn_in(ns, move || match setup() {
        Ok(state) => {
            let _ = tx.send(Ok(()));
            body(state);
        }
        Err(e) => {
            let _ = tx.send(Err(e));
        }
    });
    match rx.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(LabError::io(what, e))
        }
        // The thread ended before answering: it could not enter the namespace.
        Err(_) => match thread.join() {
            Ok(Err(e)) => Err(e),
            _ => Err(LabError::io(what, std::io::Error::other("thread ended"))),
        },
    }
}

/// A TCP echo server on `addr` inside `ns`: at most `bounds.max_count` connections, each echoed
/// on its own thread, everything ending after `bounds.duration`.
pub fn tcp_echo_server(ns: &str, addr: SocketAddr, bounds: Bounds) -> Result<EchoServer> {
    check_addr(addr.ip())?;
    let stats = Arc::new(ServerStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let limit = Limit::new(&stop, bounds.duration);
    let st = Arc::clone(&stats);
    let thread = start_in(
        ns,
        format!("TCP echo server on {addr} in {ns}"),
        move || {
            let l = TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        },
        move |listener| {
            let mut conns = Vec::new();
            while !limit.over() && st.accepted.load(Ordering::Relaxed) < bounds.max_count {
                match listener.accept() {
                    Ok((stream, _)) => {
                        st.accepted.fetch_add(1, Ordering::Relaxed);
                        let (limit, st) = (limit.clone(), Arc::clone(&st));
                        conns.push(std::thread::spawn(move || echo_tcp(stream, &limit, &st)));
                    }
                    Err(e) if is_timeout(&e) => std::thread::sleep(Duration::from_millis(10)),
                    Err(_) => {
                        st.errors.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            drop(listener);
            for c in conns {
                let _ = c.join();
            }
        },
    )?;
    Ok(EchoServer {
        addr,
        stats,
        worker: Worker::new(stop, thread),
    })
}

fn echo_tcp(mut stream: TcpStream, limit: &Limit, stats: &ServerStats) {
    let ready = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(POLL)))
        .and_then(|()| stream.set_write_timeout(Some(POLL)));
    if ready.is_err() {
        stats.errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut buf = vec![0; 64 * 1024];
    while !limit.over() {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => match write_fully(&mut stream, &buf[..n], limit) {
                Ok(true) => {
                    stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Ok(false) => break,
                Err(_) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            },
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
}

/// A UDP echo server on `addr` inside `ns`: at most `bounds.max_count` datagrams, for at most
/// `bounds.duration`.
pub fn udp_echo_server(ns: &str, addr: SocketAddr, bounds: Bounds) -> Result<EchoServer> {
    check_addr(addr.ip())?;
    let stats = Arc::new(ServerStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let limit = Limit::new(&stop, bounds.duration);
    let st = Arc::clone(&stats);
    let thread = start_in(
        ns,
        format!("UDP echo server on {addr} in {ns}"),
        move || {
            let s = UdpSocket::bind(addr)?;
            s.set_read_timeout(Some(POLL))?;
            Ok(s)
        },
        move |socket| {
            let mut buf = vec![0; 64 * 1024];
            while !limit.over() && st.accepted.load(Ordering::Relaxed) < bounds.max_count {
                match socket.recv_from(&mut buf) {
                    Ok((n, peer)) => {
                        st.accepted.fetch_add(1, Ordering::Relaxed);
                        match socket.send_to(&buf[..n], peer) {
                            Ok(_) => st.bytes.fetch_add(n as u64, Ordering::Relaxed),
                            Err(_) => st.errors.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                    Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        st.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        },
    )?;
    Ok(EchoServer {
        addr,
        stats,
        worker: Worker::new(stop, thread),
    })
}

fn check_addr(ip: IpAddr) -> Result<()> {
    if ip.is_unspecified() || netns::is_lab_address(ip) {
        Ok(())
    } else {
        Err(LabError::NotLabAddress(ip.to_string()))
    }
}

/// What a client has achieved so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// TCP: connected. UDP: the socket is ready.
    pub connected: bool,
    /// Chunks (TCP) or requests (UDP) sent.
    pub sent: u64,
    /// Chunks echoed back intact, or replies received.
    pub ok: u64,
    /// Bytes echoed back intact.
    pub bytes: u64,
    /// TCP: reads that waited a whole I/O timeout for the echo (a stall). UDP: requests left
    /// without a reply.
    pub timeouts: u64,
    /// When the last echo or reply arrived.
    pub last_ok: Option<Instant>,
    /// Errors that did not end the client (UDP: e.g. ICMP unreachable).
    pub errors: u64,
    pub last_error: Option<String>,
    /// The loop has ended.
    pub done: bool,
    /// Why it ended early: reset, closed, corrupted echo.
    pub fatal: Option<String>,
}

impl Progress {
    /// Time since the last echo or reply (since `start` if none yet).
    pub fn since_ok(&self, start: Instant) -> Duration {
        self.last_ok.unwrap_or(start).elapsed()
    }
}

/// A client running in a namespace; stopped on drop.
pub struct TrafficClient {
    progress: Arc<Mutex<Progress>>,
    worker: Worker,
}

impl TrafficClient {
    /// A copy of its progress.
    pub fn progress(&self) -> Progress {
        lock(&self.progress).clone()
    }

    /// Polls its progress every 10 ms until `done(progress)`, for at most `timeout`; returns
    /// the progress that satisfied it.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&Progress) -> bool,
    ) -> Option<Progress> {
        let deadline = Instant::now() + timeout;
        loop {
            let p = self.progress();
            if done(&p) {
                return Some(p);
            }
            if p.done || Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until an echo or reply arrives after `since` (say, a failover), for at most
    /// `timeout`.
    pub fn wait_ok_after(&self, since: Instant, timeout: Duration) -> Option<Progress> {
        self.wait_until(timeout, |p| p.last_ok.is_some_and(|t| t > since))
    }

    /// Stops it, waits for its thread, and returns its final progress.
    pub fn stop(mut self) -> Progress {
        self.worker.halt();
        self.progress()
    }
}

fn lock(p: &Mutex<Progress>) -> std::sync::MutexGuard<'_, Progress> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The TCP client's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpClientOptions {
    /// Bytes per chunk.
    pub chunk_bytes: usize,
    /// Pause between an echo and the next chunk.
    pub interval: Duration,
    /// Read and write timeout: one stall counted per timeout while waiting for the echo.
    pub io_timeout: Duration,
    pub connect_timeout: Duration,
    /// At most `max_count` chunks, for at most `duration`.
    pub bounds: Bounds,
}

impl Default for TcpClientOptions {
    fn default() -> Self {
        TcpClientOptions {
            chunk_bytes: 1024,
            interval: Duration::from_millis(100),
            io_timeout: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(3),
            bounds: Bounds::new(100_000, Duration::from_secs(60)),
        }
    }
}

/// The bytes of chunk `i`: distinct per chunk, so a misplaced echo is caught.
fn pattern(i: u64, buf: &mut [u8]) {
    for (j, b) in buf.iter_mut().enumerate() {
        *b = (i.wrapping_mul(31).wrapping_add(j as u64) % 251) as u8;
    }
}

/// A long-lived TCP connection from `ns` to `server`: a chunk every `interval`, each echo read
/// back and checked. Returns once connected (or with the connect error).
pub fn tcp_client(ns: &str, server: SocketAddr, opts: TcpClientOptions) -> Result<TrafficClient> {
    check_addr(server.ip())?;
    let progress = Arc::new(Mutex::new(Progress::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let limit = Limit::new(&stop, opts.bounds.duration);
    let pr = Arc::clone(&progress);
    let thread = start_in(
        ns,
        format!("TCP client in {ns} connecting to {server}"),
        move || {
            let s = TcpStream::connect_timeout(&server, opts.connect_timeout)?;
            s.set_read_timeout(Some(opts.io_timeout))?;
            s.set_write_timeout(Some(opts.io_timeout))?;
            s.set_nodelay(true)?;
            Ok(s)
        },
        move |stream| {
            lock(&pr).connected = true;
            let fatal = drive_tcp(stream, &opts, &limit, &pr).err();
            let mut p = lock(&pr);
            p.fatal = fatal;
            p.done = true;
        },
    )?;
    Ok(TrafficClient {
        progress,
        worker: Worker::new(stop, thread),
    })
}

fn drive_tcp(
    mut stream: TcpStream,
    opts: &TcpClientOptions,
    limit: &Limit,
    progress: &Mutex<Progress>,
) -> Result<(), String> {
    let mut chunk = vec![0; opts.chunk_bytes.max(1)];
    let mut echo = vec![0; chunk.len()];
    for i in 0..opts.bounds.max_count {
        if limit.over() {
            break;
        }
        pattern(i, &mut chunk);
        match write_fully(&mut stream, &chunk, limit) {
            Ok(true) => lock(progress).sent += 1,
            Ok(false) => break,
            Err(e) => return Err(format!("sending chunk {i}: {e}")),
        }
        let mut filled = 0;
        while filled < echo.len() {
            if limit.over() {
                return Ok(());
            }
            match stream.read(&mut echo[filled..]) {
                Ok(0) => return Err(format!("the server closed the connection (chunk {i})")),
                Ok(n) => filled += n,
                Err(e) if is_timeout(&e) => lock(progress).timeouts += 1,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("reading the echo of chunk {i}: {e}")),
            }
        }
        if echo != chunk {
            return Err(format!("the echo of chunk {i} differs from what was sent"));
        }
        {
            let mut p = lock(progress);
            p.ok += 1;
            p.bytes += chunk.len() as u64;
            p.last_ok = Some(Instant::now());
        }
        if !limit.sleep(opts.interval) {
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    Ok(())
}

/// The UDP client's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpClientOptions {
    /// Bytes per request (at least 8: a sequence number leads).
    pub payload_bytes: usize,
    /// Pause between requests.
    pub interval: Duration,
    /// How long a request waits for its reply before it counts as lost.
    pub reply_timeout: Duration,
    /// At most `max_count` requests, for at most `duration`.
    pub bounds: Bounds,
}

impl Default for UdpClientOptions {
    fn default() -> Self {
        UdpClientOptions {
            payload_bytes: 64,
            interval: Duration::from_millis(200),
            reply_timeout: Duration::from_millis(500),
            bounds: Bounds::new(100_000, Duration::from_secs(60)),
        }
    }
}

/// UDP requests from `ns` to `server`, one socket (one flow) for all: a request every
/// `interval`, each waiting up to `reply_timeout` for its echo.
pub fn udp_client(ns: &str, server: SocketAddr, opts: UdpClientOptions) -> Result<TrafficClient> {
    check_addr(server.ip())?;
    let progress = Arc::new(Mutex::new(Progress::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let limit = Limit::new(&stop, opts.bounds.duration);
    let pr = Arc::clone(&progress);
    let thread = start_in(
        ns,
        format!("UDP client in {ns} for {server}"),
        move || {
            let any: SocketAddr = match server {
                SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let s = UdpSocket::bind(any)?;
            s.connect(server)?;
            Ok(s)
        },
        move |socket| {
            lock(&pr).connected = true;
            drive_udp(&socket, &opts, &limit, &pr);
            lock(&pr).done = true;
        },
    )?;
    Ok(TrafficClient {
        progress,
        worker: Worker::new(stop, thread),
    })
}

fn drive_udp(
    socket: &UdpSocket,
    opts: &UdpClientOptions,
    limit: &Limit,
    progress: &Mutex<Progress>,
) {
    let error = |e: String| {
        let mut p = lock(progress);
        p.errors += 1;
        p.last_error = Some(e);
    };
    let mut request = vec![0; opts.payload_bytes.max(8)];
    let mut reply = vec![0; request.len() + 1];
    for seq in 0..opts.bounds.max_count {
        if limit.over() {
            break;
        }
        pattern(seq, &mut request[8..]);
        request[..8].copy_from_slice(&seq.to_be_bytes());
        if let Err(e) = socket.send(&request) {
            error(format!("sending request {seq}: {e}"));
        } else {
            lock(progress).sent += 1;
            let wait_until = Instant::now() + opts.reply_timeout;
            let mut answered = false;
            while !answered && !limit.over() {
                let left = wait_until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                if socket.set_read_timeout(Some(left.min(POLL))).is_err() {
                    break;
                }
                match socket.recv(&mut reply) {
                    // A late reply to an earlier request is skipped.
                    Ok(n) if n == request.len() && reply[..n] == request[..] => answered = true,
                    Ok(_) => {}
                    Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
                    // ICMP unreachable on a connected socket: count it, keep going.
                    Err(e) => {
                        error(format!("request {seq}: {e}"));
                        break;
                    }
                }
            }
            let mut p = lock(progress);
            if answered {
                p.ok += 1;
                p.bytes += request.len() as u64;
                p.last_ok = Some(Instant::now());
            } else {
                p.timeouts += 1;
            }
        }
        if !limit.sleep(opts.interval) {
            break;
        }
    }
}

/// `ping -c count` from namespace `ns` to `dst`, one second per reply at most; Ok when every
/// reply came back.
pub fn ping(ns: &str, dst: IpAddr, count: u32) -> Result<()> {
    check_addr(dst)?;
    let count = count.clamp(1, 100);
    let mut cmd = netns::command_in(ns, "ping")?;
    cmd.args([
        "-n",
        "-q",
        "-c",
        &count.to_string(),
        "-i",
        "0.2",
        "-W",
        "1",
        "-w",
        &(count + 2).to_string(),
        &dst.to_string(),
    ]);
    netns::output(&mut cmd, None).map(drop)
}
