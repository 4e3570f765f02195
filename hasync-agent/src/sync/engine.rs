//! The sync engine: listens and dials on HA4 and HA4 backup, authenticates peers, streams
//! session changes to each peer over its active link, installs what peers send, and runs full
//! syncs.
//!
//! One TCP connection per peer and link; the member with the lower id dials. Session data
//! flows on HA4 while it is up and out of its hold-down, else on HA4 backup; keepalives flow
//! on both. When the link carrying data fails, the frames it had in flight are queued again
//! and resent, with the sessions' current state, on the other link.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use hasync_common::{FlowKey, MemberId, Session};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Notify,
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use super::{
    channel::{self, ChannelError, Receiver, Sender},
    install::{self, ZoneMap},
    outbox::Outbox,
    stats::{LinkStats, PeerStats, Rejections},
    wire::{
        Hello, Keepalive, LinkKind, Message, Record, MAX_RECORDS_PER_FRAME, PROTO_MAJOR,
        PROTO_MINOR,
    },
};
use crate::{
    cluster::{LinkState, MemberState, Membership},
    datapath::{batch::BatchCursor, monotonic_ns, Datapath, DatapathError},
};

/// Pending keys per peer before the outbox falls back to a full sync.
const OUTBOX_CAPACITY: usize = 262_144;
/// Frames per peer sent and not yet acknowledged.
const MAX_IN_FLIGHT: usize = 64;
/// How long a handshake plus hello may take.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a dialer retries a missing connection.
const REDIAL: Duration = Duration::from_millis(500);
/// How often a peer's sender looks for work when not woken.
const SEND_TICK: Duration = Duration::from_millis(20);
/// How often the local sync interfaces' state is read.
const LINK_POLL: Duration = Duration::from_millis(200);

/// One peer as configured.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    pub id: MemberId,
    pub serial: String,
    pub addrs: BTreeMap<LinkKind, IpAddr>,
    pub session_sync: bool,
    pub enabled: bool,
}

/// What the engine needs from the configuration.
#[derive(Clone, Debug)]
pub struct SyncConfig {
    pub cluster_id: u8,
    pub local: MemberId,
    pub local_session_sync: bool,
    pub psk: [u8; 32],
    pub zones: Vec<String>,
    pub fingerprint: [u8; 32],
    pub port: u16,
    /// Local address and interface per configured link.
    pub local_links: BTreeMap<LinkKind, (IpAddr, String)>,
    pub peers: Vec<PeerConfig>,
    pub keepalive_interval: Duration,
    pub keepalive_threshold: Duration,
    pub hold_down: Duration,
    pub boot_id: u64,
    /// The session table started empty: peers' full syncs should return our own sessions.
    pub fresh_table: bool,
}

/// A live connection on one link.
struct LinkConn {
    generation: u64,
    tx: Arc<tokio::sync::Mutex<Sender>>,
    last_rx: Instant,
    reader: JoinHandle<()>,
}

struct PeerInner {
    outbox: Outbox,
    links: BTreeMap<LinkKind, LinkConn>,
    /// HA4 failed since it last carried data: when it returns, it waits out the hold-down.
    ha4_failed: bool,
    ha4_usable_at: Option<Instant>,
    /// The link data went out on last; a change requeues what was in flight.
    data_link: Option<LinkKind>,
    bulk_wanted: bool,
    /// A full sync from this peer is being received and will reconcile its replicas: the
    /// session clock when it started.
    bulk_mark: Option<u64>,
    zones: ZoneMap,
    hello: Option<Hello>,
}

/// One peer at run time.
pub struct Peer {
    pub cfg: PeerConfig,
    inner: Mutex<PeerInner>,
    wake: Notify,
    pub stats: PeerStats,
}

impl Peer {
    fn lock(&self) -> MutexGuard<'_, PeerInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Is the link up (connected and hello exchanged)?
    pub fn link_up(&self, link: LinkKind) -> bool {
        self.lock().links.contains_key(&link)
    }

    /// The link session data currently goes out on.
    pub fn data_link(&self) -> Option<LinkKind> {
        self.lock().data_link
    }

    /// The peer's protocol version, once it said hello.
    pub fn version(&self) -> Option<(u8, u8)> {
        self.lock().hello.as_ref().map(|h| (h.major, h.minor))
    }

    /// Pending keys and frames in flight.
    pub fn backlog(&self) -> (usize, usize) {
        let g = self.lock();
        (g.outbox.pending(), g.outbox.in_flight())
    }

    /// The peer's zone names we do not have (from its hello).
    pub fn missing_zones(&self, ours: &[String]) -> Vec<String> {
        let g = self.lock();
        match &g.hello {
            Some(h) => ZoneMap::new(ours, &h.zones)
                .missing(&h.zones)
                .into_iter()
                .map(String::from)
                .collect(),
            None => Vec::new(),
        }
    }
}

/// The running engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    cfg: SyncConfig,
    dp: Arc<Mutex<Datapath>>,
    membership: Arc<Mutex<Membership>>,
    peers: BTreeMap<MemberId, Arc<Peer>>,
    pub rejections: Rejections,
    generation: AtomicU64,
    logged: Mutex<HashSet<String>>,
    /// Local interface state per link, as last read.
    local_up: Mutex<BTreeMap<LinkKind, bool>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Engine {
    pub fn new(
        cfg: SyncConfig,
        dp: Arc<Mutex<Datapath>>,
        membership: Arc<Mutex<Membership>>,
    ) -> Self {
        let peers = cfg
            .peers
            .iter()
            .filter(|p| p.id != cfg.local)
            .map(|p| {
                let peer = Peer {
                    cfg: p.clone(),
                    inner: Mutex::new(PeerInner {
                        outbox: Outbox::new(OUTBOX_CAPACITY, MAX_IN_FLIGHT),
                        links: BTreeMap::new(),
                        ha4_failed: false,
                        ha4_usable_at: None,
                        data_link: None,
                        bulk_wanted: false,
                        bulk_mark: None,
                        zones: ZoneMap::default(),
                        hello: None,
                    }),
                    wake: Notify::new(),
                    stats: PeerStats::default(),
                };
                (p.id, Arc::new(peer))
            })
            .collect();
        Engine {
            inner: Arc::new(EngineInner {
                cfg,
                dp,
                membership,
                peers,
                rejections: Rejections::default(),
                generation: AtomicU64::new(1),
                logged: Mutex::new(HashSet::new()),
                local_up: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    pub fn peers(&self) -> impl Iterator<Item = &Arc<Peer>> {
        self.inner.peers.values()
    }

    pub fn rejections(&self) -> &Rejections {
        &self.inner.rejections
    }

    /// The local sync interface's state for `link`.
    pub fn local_link_state(&self, link: LinkKind) -> LinkState {
        let Some((_, ifname)) = self.inner.cfg.local_links.get(&link) else {
            return LinkState::NotConfigured;
        };
        let known = lock(&self.inner.local_up).get(&link).copied();
        if known.unwrap_or_else(|| interface_up(ifname)) {
            LinkState::Up
        } else {
            LinkState::Down
        }
    }

    /// Starts listeners, dialers, senders, keepalives and the link monitor.
    pub fn start(&self) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        for (&link, (addr, _)) in &self.inner.cfg.local_links {
            let e = self.clone();
            let addr = SocketAddr::new(*addr, self.inner.cfg.port);
            tasks.push(tokio::spawn(async move { e.listen(link, addr).await }));
        }
        for peer in self.inner.peers.values() {
            if !peer.cfg.enabled {
                continue;
            }
            if self.inner.cfg.local < peer.cfg.id {
                for &link in self.inner.cfg.local_links.keys() {
                    if peer.cfg.addrs.contains_key(&link) {
                        let (e, p) = (self.clone(), peer.clone());
                        tasks.push(tokio::spawn(async move { e.dial(p, link).await }));
                    }
                }
            }
            let (e, p) = (self.clone(), peer.clone());
            tasks.push(tokio::spawn(async move { e.send_loop(p).await }));
            let (e, p) = (self.clone(), peer.clone());
            tasks.push(tokio::spawn(async move { e.keepalive_loop(p).await }));
        }
        let e = self.clone();
        tasks.push(tokio::spawn(async move { e.monitor_links().await }));
        tasks
    }

    /// Locally owned sessions changed (or were removed): queue them for every syncing peer.
    pub fn enqueue(&self, keys: &[FlowKey]) {
        if !self.inner.cfg.local_session_sync || keys.is_empty() {
            return;
        }
        let now = Instant::now();
        for peer in self.inner.peers.values() {
            if peer.cfg.session_sync && peer.cfg.enabled {
                let mut g = peer.lock();
                for key in keys {
                    g.outbox.enqueue(*key, now);
                }
            }
        }
    }

    /// Wakes every sender (after a burst of `enqueue`s).
    pub fn flush(&self) {
        for peer in self.inner.peers.values() {
            peer.wake.notify_one();
        }
    }

    /// Asks for a full sync to every peer (after lost events).
    pub fn request_bulk_all(&self) {
        for peer in self.inner.peers.values() {
            peer.lock().bulk_wanted = true;
            peer.wake.notify_one();
        }
    }

    fn log_once(&self, key: String, f: impl FnOnce()) {
        if lock(&self.inner.logged).insert(key) {
            f();
        }
    }

    fn hello(&self, link: LinkKind, peer: MemberId) -> Hello {
        let wants_bulk = lock(&self.inner.membership)
            .peers
            .get(&peer)
            .is_none_or(|p| p.bulk_done != Some(true));
        Hello {
            major: PROTO_MAJOR,
            minor: PROTO_MINOR,
            cluster_id: self.inner.cfg.cluster_id,
            member: self.inner.cfg.local,
            link,
            boot_id: self.inner.cfg.boot_id,
            fingerprint: self.inner.cfg.fingerprint,
            zones: self.inner.cfg.zones.clone(),
            wants_bulk,
            fresh_table: self.inner.cfg.fresh_table,
        }
    }

    /// Checks a peer's hello; on refusal, counts and logs the reason once.
    fn check_hello(&self, h: &Hello, link: LinkKind, from: SocketAddr) -> Option<Arc<Peer>> {
        let ours = self.hello(link, h.member);
        let reason = if !ours.compatible(h) {
            Some("version")
        } else if h.cluster_id != self.inner.cfg.cluster_id {
            Some("wrong-cluster")
        } else if h.link != link {
            Some("malformed")
        } else {
            match self.inner.peers.get(&h.member) {
                None => Some("unknown-member"),
                Some(p) if !p.cfg.enabled => Some("disabled-member"),
                Some(_) => None,
            }
        };
        if let Some(reason) = reason {
            let first = self.inner.rejections.count(reason);
            if first {
                warn!(
                    peer = %from, link = link.name(), reason,
                    cluster_id = h.cluster_id, member = h.member.0,
                    version = %format!("{}.{}", h.major, h.minor),
                    "sync connection rejected (further rejections are counted, not logged)"
                );
            }
            return None;
        }
        let peer = self.inner.peers.get(&h.member)?.clone();
        if h.fingerprint != self.inner.cfg.fingerprint {
            self.log_once(format!("fingerprint-{}", h.member.0), || {
                warn!(
                    peer = h.member.0,
                    "peer's configuration differs in what members must agree on (cluster, members, zones, timers); compare with `hasync config diff`"
                )
            });
        }
        let missing = ZoneMap::new(&self.inner.cfg.zones, &h.zones)
            .missing(&h.zones)
            .join(", ");
        if !missing.is_empty() {
            self.log_once(format!("zones-{}", h.member.0), || {
                warn!(peer = h.member.0, zones = %missing, "peer has zones this member lacks: their sessions will be refused")
            });
        }
        Some(peer)
    }

    async fn listen(self, link: LinkKind, addr: SocketAddr) {
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) => {
                    self.log_once(format!("bind-{addr}"), || {
                        warn!(link = link.name(), %addr, error = %e, "cannot listen on the sync address yet; retrying")
                    });
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        info!(link = link.name(), %addr, "listening for peers");
        loop {
            match listener.accept().await {
                Ok((stream, from)) => {
                    let e = self.clone();
                    tokio::spawn(async move { e.accept(stream, from, link).await });
                }
                Err(e) => {
                    warn!(link = link.name(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn accept(self, stream: TcpStream, from: SocketAddr, link: LinkKind) {
        let _ = stream.set_nodelay(true);
        let psk = self.inner.cfg.psk;
        let result = tokio::time::timeout(HELLO_TIMEOUT, async {
            let (mut tx, mut rx) = channel::respond(stream, &psk).await?;
            let (msg, _) = rx.recv().await?;
            let Message::Hello(h) = msg else {
                return Err(ChannelError::Malformed(
                    super::wire::WireError::UnknownType(0),
                ));
            };
            let Some(peer) = self.check_hello(&h, link, from) else {
                // A peer of another cluster, or of an incompatible version, refuses us as well
                // once it reads our hello: send it, so the dialing side counts and logs the
                // reason too instead of seeing a bare close. (Not for one-sided refusals, such
                // as an unknown member: that peer would accept and then see the link drop.)
                let ours = self.hello(link, h.member);
                if h.cluster_id != self.inner.cfg.cluster_id || !ours.compatible(&h) {
                    let _ = tx.send(&Message::Hello(ours)).await;
                }
                return Ok(None);
            };
            tx.send(&Message::Hello(self.hello(link, h.member))).await?;
            Ok(Some((peer, h, tx, rx)))
        })
        .await;
        match result {
            Ok(Ok(Some((peer, h, tx, rx)))) => self.attach(peer, link, h, tx, rx),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => self.reject(from, link, &e),
            Err(_) => {
                if self.inner.rejections.count("timeout") {
                    warn!(peer = %from, link = link.name(), "sync handshake timed out");
                }
            }
        }
    }

    fn reject(&self, from: SocketAddr, link: LinkKind, e: &ChannelError) {
        let reason = e.reason();
        if reason == "connection" {
            debug!(peer = %from, link = link.name(), error = %e, "sync connection failed");
            return;
        }
        if self.inner.rejections.count(reason) {
            warn!(peer = %from, link = link.name(), reason, error = %e, "sync connection rejected (further rejections are counted, not logged)");
        }
    }

    async fn dial(self, peer: Arc<Peer>, link: LinkKind) {
        let Some(&remote) = peer.cfg.addrs.get(&link) else {
            return;
        };
        let Some(&(local, _)) = self.inner.cfg.local_links.get(&link) else {
            return;
        };
        let remote = SocketAddr::new(remote, self.inner.cfg.port);
        loop {
            let up = lock(&self.inner.local_up)
                .get(&link)
                .copied()
                .unwrap_or(true);
            if up && !peer.link_up(link) {
                match self.connect(local, remote, link, peer.cfg.id).await {
                    Ok((h, tx, rx)) => {
                        if self
                            .check_hello(&h, link, remote)
                            .is_some_and(|p| p.cfg.id == peer.cfg.id)
                        {
                            self.attach(peer.clone(), link, h, tx, rx);
                        }
                    }
                    Err(e) => self.reject(remote, link, &e),
                }
            }
            tokio::time::sleep(REDIAL).await;
        }
    }

    async fn connect(
        &self,
        local: IpAddr,
        remote: SocketAddr,
        link: LinkKind,
        peer: MemberId,
    ) -> Result<(Hello, Sender, Receiver), ChannelError> {
        let psk = self.inner.cfg.psk;
        let hello = self.hello(link, peer);
        let fut = async move {
            let socket = if remote.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            // Bind to this link's address so the connection leaves through this link.
            socket.bind(SocketAddr::new(local, 0))?;
            let stream = socket.connect(remote).await?;
            let _ = stream.set_nodelay(true);
            let (mut tx, mut rx) = channel::initiate(stream, &psk).await?;
            tx.send(&Message::Hello(hello)).await?;
            match rx.recv().await? {
                (Message::Hello(h), _) => Ok((h, tx, rx)),
                _ => Err(ChannelError::Malformed(
                    super::wire::WireError::UnknownType(0),
                )),
            }
        };
        tokio::time::timeout(HELLO_TIMEOUT, fut)
            .await
            .unwrap_or_else(|_| Err(ChannelError::Io(std::io::ErrorKind::TimedOut.into())))
    }

    /// Registers an authenticated connection and starts reading from it.
    fn attach(&self, peer: Arc<Peer>, link: LinkKind, hello: Hello, tx: Sender, rx: Receiver) {
        let generation = self.inner.generation.fetch_add(1, Relaxed);
        let tx = Arc::new(tokio::sync::Mutex::new(tx));
        let reader = {
            let (e, p, tx) = (self.clone(), peer.clone(), tx.clone());
            tokio::spawn(async move { e.read_loop(p, link, generation, rx, tx).await })
        };
        let now = Instant::now();
        {
            let mut g = peer.lock();
            if let Some(old) = g.links.remove(&link) {
                old.reader.abort();
            }
            if link == LinkKind::Ha4 && g.ha4_failed {
                g.ha4_failed = false;
                g.ha4_usable_at = Some(now + self.inner.cfg.hold_down);
            }
            // The same boot asking again on its second link is the same request.
            let asked_already = g.links.keys().any(|l| *l != link)
                && g.hello.as_ref().is_some_and(|h| h.boot_id == hello.boot_id);
            if hello.wants_bulk
                && !asked_already
                && peer.cfg.session_sync
                && self.inner.cfg.local_session_sync
            {
                g.bulk_wanted = true;
            }
            g.zones = ZoneMap::new(&self.inner.cfg.zones, &hello.zones);
            g.links.insert(
                link,
                LinkConn {
                    generation,
                    tx,
                    last_rx: now,
                    reader,
                },
            );
            g.hello = Some(hello);
        }
        lock(&self.inner.membership).set_link(peer.cfg.id, link, LinkState::Up);
        info!(peer = peer.cfg.id.0, link = link.name(), "sync link up");
        peer.wake.notify_one();
    }

    /// Drops a connection (if it is still the current one for its link).
    fn detach(&self, peer: &Peer, link: LinkKind, generation: Option<u64>, why: &str) {
        let removed = {
            let mut g = peer.lock();
            match g.links.get(&link) {
                Some(c) if generation.is_none_or(|gen| gen == c.generation) => {
                    let c = g.links.remove(&link);
                    if link == LinkKind::Ha4 {
                        g.ha4_failed = true;
                        g.ha4_usable_at = None;
                    }
                    if g.data_link == Some(link) {
                        let n = g.outbox.requeue_in_flight();
                        LinkStats::add(&peer.stats.resends, n as u64);
                        g.data_link = None;
                    }
                    c
                }
                _ => None,
            }
        };
        if let Some(c) = removed {
            c.reader.abort();
            LinkStats::add(&peer.stats.link(link).failures, 1);
            lock(&self.inner.membership).set_link(peer.cfg.id, link, LinkState::Down);
            warn!(
                peer = peer.cfg.id.0,
                link = link.name(),
                reason = why,
                "sync link down"
            );
            peer.wake.notify_one();
        }
    }

    async fn read_loop(
        self,
        peer: Arc<Peer>,
        link: LinkKind,
        generation: u64,
        mut rx: Receiver,
        tx: Arc<tokio::sync::Mutex<Sender>>,
    ) {
        let stats = peer.stats.link(link);
        loop {
            let (msg, bytes) = match rx.recv().await {
                Ok(m) => m,
                Err(e) => {
                    if e.reason() != "connection" && self.inner.rejections.count(e.reason()) {
                        warn!(peer = peer.cfg.id.0, link = link.name(), error = %e, "bad frame from peer");
                    }
                    self.detach(&peer, link, Some(generation), e.reason());
                    return;
                }
            };
            LinkStats::add(&stats.bytes_received, bytes as u64);
            LinkStats::add(&stats.frames_received, 1);
            if let Some(c) = peer.lock().links.get_mut(&link) {
                c.last_rx = Instant::now();
            }
            let reply = match msg {
                Message::Keepalive(Keepalive {
                    state,
                    sessions_owned,
                    flaps: _,
                }) => {
                    LinkStats::add(&stats.keepalives_received, 1);
                    lock(&self.inner.membership).heard(
                        peer.cfg.id,
                        MemberState::from_u8(state),
                        sessions_owned,
                        Instant::now(),
                    );
                    None
                }
                Message::Sessions { seq, bulk, records } => {
                    LinkStats::add(&stats.records_received, records.len() as u64);
                    self.install(&peer, &records, bulk);
                    Some(Message::Ack { seq })
                }
                Message::Ack { seq } => {
                    LinkStats::add(&stats.acks_received, 1);
                    let released = peer.lock().outbox.ack(seq);
                    let now = Instant::now();
                    let mut lag = lock(&peer.stats.lag);
                    for oldest in released {
                        lag.record(now.duration_since(oldest));
                    }
                    drop(lag);
                    peer.wake.notify_one();
                    None
                }
                Message::BulkStart { bulk_id } => {
                    info!(peer = peer.cfg.id.0, bulk_id, "full sync from peer started");
                    lock(&self.inner.membership).bulk(peer.cfg.id, false);
                    {
                        // A peer with its table intact is the authority on its sessions:
                        // its full sync also removes the replicas it no longer holds.
                        let mut g = peer.lock();
                        let authoritative = g.hello.as_ref().is_some_and(|h| !h.fresh_table);
                        g.bulk_mark = authoritative.then(monotonic_ns);
                    }
                    let mut b = lock(&peer.stats.bulk_received);
                    b.running = true;
                    b.started_ms = monotonic_ns() / 1_000_000;
                    None
                }
                Message::BulkEnd { bulk_id, records } => {
                    let mark = peer.lock().bulk_mark.take();
                    if let Some(mark) = mark {
                        self.remove_stale_replicas(&peer, mark);
                    }
                    lock(&self.inner.membership).bulk(peer.cfg.id, true);
                    let mut b = lock(&peer.stats.bulk_received);
                    b.running = false;
                    b.count += 1;
                    b.last_records = records;
                    b.last_duration_ms = (monotonic_ns() / 1_000_000).saturating_sub(b.started_ms);
                    info!(
                        peer = peer.cfg.id.0,
                        bulk_id,
                        records,
                        ms = b.last_duration_ms,
                        "full sync from peer ended"
                    );
                    None
                }
                Message::Hello(_) => {
                    if self.inner.rejections.count("malformed") {
                        warn!(peer = peer.cfg.id.0, "unexpected second hello");
                    }
                    None
                }
            };
            if let Some(reply) = reply {
                let sent = tx.lock().await.send(&reply).await;
                match sent {
                    Ok(n) => {
                        LinkStats::add(&stats.acks_sent, 1);
                        LinkStats::add(&stats.bytes_sent, n as u64);
                    }
                    Err(e) => {
                        self.detach(&peer, link, Some(generation), e.reason());
                        return;
                    }
                }
            }
        }
    }

    /// Installs a frame's records into the session table.
    fn install(&self, peer: &Peer, records: &[Record], bulk: bool) {
        if !peer.cfg.session_sync || !self.inner.cfg.local_session_sync {
            return;
        }
        let (zones, reconciling) = {
            let g = peer.lock();
            (
                g.zones.clone(),
                (bulk && g.bulk_mark.is_some()).then_some(peer.cfg.id),
            )
        };
        let who = install::Installer {
            local: self.inner.cfg.local,
            fresh_table: self.inner.cfg.fresh_table,
            reconciling,
        };
        let result = tokio::task::block_in_place(|| {
            let mut dp = lock(&self.inner.dp);
            install::apply(&mut dp, records, &zones, monotonic_ns(), &who)
        });
        match result {
            Ok(r) => {
                LinkStats::add(&peer.stats.installed, r.installed);
                LinkStats::add(&peer.stats.deleted, r.deleted);
                LinkStats::add(&peer.stats.kept, r.kept);
                if r.refused_zone > 0 {
                    LinkStats::add(&peer.stats.refused_zone, r.refused_zone);
                    for _ in 0..r.refused_zone {
                        self.inner.rejections.count("zone-unknown");
                    }
                }
            }
            Err(e) => {
                warn!(peer = peer.cfg.id.0, error = %crate::datapath::error_chain(&e), "installing sessions failed")
            }
        }
    }

    /// After an authoritative full sync from `peer`: drops our replicas of its sessions that it
    /// did not send (it closed or expired them while we could not hear of it).
    fn remove_stale_replicas(&self, peer: &Peer, mark: u64) {
        if !peer.cfg.session_sync || !self.inner.cfg.local_session_sync {
            return;
        }
        let removed = tokio::task::block_in_place(|| {
            let mut dp = lock(&self.inner.dp);
            install::remove_unseen(&mut dp, peer.cfg.id, mark)
        });
        match removed {
            Ok(0) => {}
            Ok(n) => {
                LinkStats::add(&peer.stats.deleted, n as u64);
                info!(
                    peer = peer.cfg.id.0,
                    removed = n,
                    "stale replicas the peer no longer holds removed after its full sync"
                );
            }
            Err(e) => {
                warn!(peer = peer.cfg.id.0, error = %crate::datapath::error_chain(&e), "removing stale replicas failed")
            }
        }
    }

    /// The link data should go out on now, if any.
    fn pick_link(&self, g: &PeerInner, now: Instant) -> Option<LinkKind> {
        let ha4 = g.links.contains_key(&LinkKind::Ha4);
        let backup = g.links.contains_key(&LinkKind::Ha4Backup);
        let held = g.ha4_usable_at.is_some_and(|t| now < t);
        match (ha4, backup) {
            (true, true) if held => Some(LinkKind::Ha4Backup),
            (true, _) => Some(LinkKind::Ha4),
            (false, true) => Some(LinkKind::Ha4Backup),
            (false, false) => None,
        }
    }

    async fn send_loop(self, peer: Arc<Peer>) {
        loop {
            tokio::select! {
                _ = peer.wake.notified() => {}
                _ = tokio::time::sleep(SEND_TICK) => {}
            }
            if let Err(e) = self.send_pending(&peer).await {
                debug!(peer = peer.cfg.id.0, error = %e, "send failed");
            }
        }
    }

    /// Sends what is due to `peer` on its data link: a full sync if one is wanted, then queued
    /// changes while the window allows.
    async fn send_pending(&self, peer: &Arc<Peer>) -> Result<(), ChannelError> {
        let (link, tx, generation, bulk) = {
            let mut g = peer.lock();
            let now = Instant::now();
            let Some(link) = self.pick_link(&g, now) else {
                return Ok(());
            };
            if g.data_link.is_some_and(|l| l != link) {
                // Switching links: what the old one had in flight may be lost.
                let n = g.outbox.requeue_in_flight();
                LinkStats::add(&peer.stats.resends, n as u64);
                info!(
                    peer = peer.cfg.id.0,
                    link = link.name(),
                    requeued = n,
                    "sync data moves to another link"
                );
            }
            g.data_link = Some(link);
            let overflow = g.outbox.take_overflow();
            let bulk = std::mem::take(&mut g.bulk_wanted) || overflow;
            let Some(c) = g.links.get(&link) else {
                return Ok(());
            };
            (link, c.tx.clone(), c.generation, bulk)
        };
        let result: Result<(), ChannelError> = async {
            if bulk {
                self.send_bulk(peer, link, &tx).await?;
            }
            loop {
                let (keys, oldest) = {
                    let mut g = peer.lock();
                    if !g.outbox.can_send() || g.outbox.pending() == 0 {
                        return Ok(());
                    }
                    g.outbox.take(MAX_RECORDS_PER_FRAME)
                };
                let records = match self.records_for(&keys) {
                    Ok(r) => r,
                    Err(e) => {
                        // The keys are out of the queue: a full sync carries them instead.
                        warn!(peer = peer.cfg.id.0, error = %crate::datapath::error_chain(&e), "reading sessions to sync failed; a full sync follows");
                        peer.lock().bulk_wanted = true;
                        peer.wake.notify_one();
                        return Ok(());
                    }
                };
                let seq = {
                    let mut g = peer.lock();
                    let seq = g.outbox.next_seq();
                    g.outbox
                        .sent(seq, keys, oldest.unwrap_or_else(Instant::now));
                    seq
                };
                let n = records.len() as u64;
                let bytes = tx
                    .lock()
                    .await
                    .send(&Message::Sessions {
                        seq,
                        bulk: false,
                        records,
                    })
                    .await?;
                let stats = peer.stats.link(link);
                LinkStats::add(&stats.frames_sent, 1);
                LinkStats::add(&stats.records_sent, n);
                LinkStats::add(&stats.bytes_sent, bytes as u64);
            }
        }
        .await;
        if let Err(e) = &result {
            if bulk {
                peer.lock().bulk_wanted = true;
            }
            self.detach(peer, link, Some(generation), e.reason());
        }
        result
    }

    /// Records for queued keys, with each session's current state. Sessions no longer ours are
    /// skipped; sessions gone from the table are announced as deleted.
    fn records_for(&self, keys: &[FlowKey]) -> Result<Vec<Record>, DatapathError> {
        let local = self.inner.cfg.local;
        let now = monotonic_ns();
        let mut sessions = Vec::with_capacity(keys.len());
        tokio::task::block_in_place(|| lock(&self.inner.dp).read_sessions(keys, &mut sessions))?;
        Ok(keys
            .iter()
            .zip(sessions)
            .filter_map(|(key, s)| match s {
                Some(s) if s.owner == local => Some(Record::upsert(*key, &s, now)),
                Some(_) => None,
                None => Some(Record::delete(*key, local, 0)),
            })
            .collect())
    }

    /// Sends the whole session table to `peer`, a chunk at a time.
    async fn send_bulk(
        &self,
        peer: &Arc<Peer>,
        link: LinkKind,
        tx: &tokio::sync::Mutex<Sender>,
    ) -> Result<(), ChannelError> {
        let started = Instant::now();
        let bulk_id =
            u32::try_from(self.inner.generation.fetch_add(1, Relaxed) & 0xffff_ffff).unwrap_or(0);
        lock(&peer.stats.bulk_sent).running = true;
        info!(
            peer = peer.cfg.id.0,
            link = link.name(),
            bulk_id,
            "full sync to peer started"
        );
        let stats = peer.stats.link(link);
        tx.lock()
            .await
            .send(&Message::BulkStart { bulk_id })
            .await?;
        // What this member is the authority on: its own sessions and those of members no longer
        // alive (someone must hand them on). Live third members send their own. The peer's
        // own sessions go back to it only if its table started empty; otherwise it knows them
        // better than our replicas do.
        let local = self.inner.cfg.local;
        let alive: HashSet<MemberId> = lock(&self.inner.membership)
            .peers
            .values()
            .filter(|p| p.alive)
            .map(|p| p.id)
            .collect();
        let peer_fresh = peer.lock().hello.as_ref().is_some_and(|h| h.fresh_table);
        let carries = |owner: MemberId| {
            if owner == peer.cfg.id {
                peer_fresh
            } else {
                owner == local || !alive.contains(&owner)
            }
        };
        let mut cursor = BatchCursor::new();
        let mut keys: Vec<FlowKey> = Vec::new();
        let mut values: Vec<Session> = Vec::new();
        let mut total = 0u64;
        loop {
            let more = tokio::task::block_in_place(|| {
                let dp = lock(&self.inner.dp);
                dp.session_chunk(
                    &mut cursor,
                    &mut keys,
                    &mut values,
                    MAX_RECORDS_PER_FRAME as u32 * 8,
                )
            });
            let more = match more {
                Ok(m) => m,
                Err(e) => {
                    warn!(error = %crate::datapath::error_chain(&e), "reading the session table for a full sync failed");
                    false
                }
            };
            let now = monotonic_ns();
            let carried: Vec<Record> = keys
                .iter()
                .zip(&values)
                .filter(|(_, s)| carries(s.owner))
                .map(|(k, s)| Record::upsert(*k, s, now))
                .collect();
            for frame in carried.chunks(MAX_RECORDS_PER_FRAME) {
                let records = frame.to_vec();
                let n = records.len() as u64;
                let seq = {
                    let mut g = peer.lock();
                    let seq = g.outbox.next_seq();
                    // Bulk frames are not resent key by key: a broken full sync starts over.
                    g.outbox.sent(seq, Vec::new(), Instant::now());
                    seq
                };
                let bytes = tx
                    .lock()
                    .await
                    .send(&Message::Sessions {
                        seq,
                        bulk: true,
                        records,
                    })
                    .await?;
                total += n;
                LinkStats::add(&stats.frames_sent, 1);
                LinkStats::add(&stats.records_sent, n);
                LinkStats::add(&stats.bytes_sent, bytes as u64);
            }
            if !more {
                break;
            }
        }
        tx.lock()
            .await
            .send(&Message::BulkEnd {
                bulk_id,
                records: total,
            })
            .await?;
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        {
            let mut b = lock(&peer.stats.bulk_sent);
            b.running = false;
            b.count += 1;
            b.last_records = total;
            b.last_duration_ms = ms;
        }
        info!(
            peer = peer.cfg.id.0,
            link = link.name(),
            bulk_id,
            records = total,
            ms,
            "full sync to peer ended"
        );
        Ok(())
    }

    /// Sends keepalives on every link to `peer` and drops links that went silent.
    async fn keepalive_loop(self, peer: Arc<Peer>) {
        let mut tick = tokio::time::interval(self.inner.cfg.keepalive_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (state, owned, flaps) = {
                let m = lock(&self.inner.membership);
                (m.state as u8, m.local_sessions_owned, m.flaps)
            };
            let ka = Message::Keepalive(Keepalive {
                state,
                sessions_owned: owned,
                flaps,
            });
            let now = Instant::now();
            let links: Vec<(LinkKind, u64, Arc<tokio::sync::Mutex<Sender>>, Instant)> = peer
                .lock()
                .links
                .iter()
                .map(|(l, c)| (*l, c.generation, c.tx.clone(), c.last_rx))
                .collect();
            for (link, generation, tx, last_rx) in links {
                if now.duration_since(last_rx) > self.inner.cfg.keepalive_threshold {
                    self.detach(&peer, link, Some(generation), "keepalives missed");
                    continue;
                }
                // A peer that stopped reading must not stall the keepalives of the other link.
                let sent = tokio::time::timeout(self.inner.cfg.keepalive_interval, async {
                    tx.lock().await.send(&ka).await
                })
                .await;
                match sent {
                    Ok(Ok(n)) => {
                        let stats = peer.stats.link(link);
                        LinkStats::add(&stats.keepalives_sent, 1);
                        LinkStats::add(&stats.bytes_sent, n as u64);
                    }
                    Ok(Err(e)) => self.detach(&peer, link, Some(generation), e.reason()),
                    Err(_) => {}
                }
            }
        }
    }

    /// Watches the local sync interfaces: when one goes down, its connections are dropped at
    /// once (rather than after the keepalive threshold) and data moves to the other link.
    async fn monitor_links(self) {
        loop {
            for (&link, (_, ifname)) in &self.inner.cfg.local_links {
                let up = interface_up(ifname);
                let was = lock(&self.inner.local_up).insert(link, up);
                if was != Some(up) {
                    if was.is_some() {
                        info!(link = link.name(), interface = %ifname, up, "sync interface state changed");
                    }
                    if !up {
                        for peer in self.inner.peers.values() {
                            self.detach(peer, link, None, "local interface down");
                        }
                    }
                }
            }
            tokio::time::sleep(LINK_POLL).await;
        }
    }
}

/// Is the interface administratively up with its carrier on (`IFF_UP | IFF_RUNNING`)? Asked
/// with `SIOCGIFFLAGS` on a socket, so the answer is about the agent's own network namespace
/// whatever `/sys` shows.
fn interface_up(ifname: &str) -> bool {
    let name = ifname.as_bytes();
    // SAFETY: an all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= req.ifr_name.len() {
        return false;
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket creation; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: SIOCGIFFLAGS reads the NUL-terminated name and writes the flags into `req`.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) };
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return false;
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
    let want = libc::IFF_UP | libc::IFF_RUNNING;
    flags & want == want
}
