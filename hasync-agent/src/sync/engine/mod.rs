//! The sync engine: listens and dials on HA4 and HA4 backup, authenticates peers, streams
//! session changes to each peer over its active link, applies what peers send, and runs full
//! syncs.
//!
//! One TCP connection per peer and link; the member with the lower id dials. Session data
//! flows on HA4 while it is up and out of its hold-down, else on HA4 backup; keepalives flow
//! on both. When the link carrying data fails, the frames it had in flight are queued again
//! and resent, with the sessions' current state, on the other link.
//!
//! The parts: [`connect`] (listening with admission before any handshake, dialing, hellos,
//! attaching and detaching connections), [`receive`] (one reader per connection, a peer's
//! frames applied in its sequence order whichever link carried them), [`send`] (queued changes,
//! full syncs with backoff, keepalives). Each connection's writes go through its own writer
//! task ([`super::writer`]), so reading never waits on writing.

mod connect;
mod full_sync_rx;
mod receive;
mod send;

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex, MutexGuard, OnceLock,
    },
    time::{Duration, Instant},
};

use hasync_common::{ClusterId, FlowKey, MemberId, Session};
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{info, warn};

use self::full_sync_rx::FullSyncRx;
use super::{
    admission::Admission,
    apply::ZoneMap,
    backlog::{Backlog, Change},
    backoff::Backoff,
    log_limit::LogLimiter,
    stats::{LinkStats, PeerStats, Rejections},
    table::SessionTable,
    window::Window,
    wire::{Hello, LinkKind},
    writer::Writer,
};
use crate::{
    cluster::{FullSyncIn, LinkState, Membership},
    datapath::{Datapath, DatapathError, SessionReader, DEFAULT_CHUNK},
    netlink::{LinkWatch, NetlinkError},
    stall_watch::StallWatch,
};

/// Keys held for the peers, all of them together, before the peer furthest behind falls back
/// to a full sync.
const BACKLOG_CAPACITY: usize = 262_144;
/// Changes queued per hold of the backlog's lock: every peer's sender may be waiting for it.
const ENQUEUE_RUN: usize = 256;
/// Frames per peer sent and not yet acknowledged.
const MAX_IN_FLIGHT: usize = 64;
/// Why a data link whose oldest frame waited longer than the keepalive threshold for its
/// acknowledgement was closed (a peer that reads and never acknowledges): counted as a stall.
const ACKS_MISSED: &str = "acks missed";
/// The shortest wait between two full syncs to one peer, and the longest.
const BULK_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(64));

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
    pub cluster_id: ClusterId,
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
    /// How long after the first full sync from a peer started peers may still return our own
    /// sessions into a fresh table, whatever their full syncs do
    /// (`Config::initial_sync_limit`).
    pub initial_sync_limit: Duration,
}

/// A live connection on one link.
struct LinkConn {
    generation: u64,
    /// Our hello on this connection said our table was fresh: the peer then does not
    /// reconcile our full syncs on it.
    sent_fresh: bool,
    /// The peer's hello on this connection said its table was fresh: its full syncs on it
    /// do not reconcile our replicas of its sessions.
    peer_fresh: bool,
    writer: Writer,
    last_rx: Instant,
    reader: JoinHandle<()>,
    writer_task: JoinHandle<()>,
}

impl LinkConn {
    fn close(&self) {
        self.reader.abort();
        self.writer_task.abort();
    }
}

/// A full sync sent to its end, which the ack of the empty frame after it confirms.
#[derive(Debug)]
struct BulkSent {
    link: LinkKind,
    bulk_id: u32,
    records: u64,
    started: Instant,
}

/// The order of a peer's numbered messages (its data frames, its keepalives): its sequence
/// numbers, per boot of the peer.
#[derive(Debug, Default)]
struct SeqOrder {
    boot_id: u64,
    last_seq: u64,
}

impl SeqOrder {
    /// Whether `seq` of boot `boot_id` comes after the last one taken (a new boot starts
    /// the order anew).
    fn is_new(&mut self, boot_id: u64, seq: u64) -> bool {
        if self.boot_id != boot_id {
            self.boot_id = boot_id;
            self.last_seq = 0;
        }
        seq > self.last_seq
    }

    /// `seq` was taken (after [`SeqOrder::is_new`] said it was new).
    fn taken(&mut self, seq: u64) {
        self.last_seq = seq;
    }

    /// The last sequence number taken.
    fn last(&self) -> u64 {
        self.last_seq
    }
}

/// The connection a peer's numbered message (a data frame, a full sync's start) was taken
/// from: its generation, and the generation the next connection set up would get then.
///
/// A peer numbers its messages upwards within a boot, so one numbered not above the last
/// taken, read on that same connection (a connection delivers in order) or on one set up since
/// (its generation is taken before this member's hello goes out on it, and a peer sends
/// nothing before reading that hello: all it carries was sent after the last one taken was
/// read), shows that the last one's number was false: a holder of the cluster key (the peer
/// itself, buggy or not) sent it far ahead. Taken back there, or every later message of that
/// boot would be refused as late. Read on another connection, it is late: sent before the
/// last one taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct TakenOn {
    generation: u64,
    next_attached: u64,
}

impl TakenOn {
    /// Does a message numbered not above this one's, read on connection `generation`, show
    /// this one's number false?
    pub(super) fn undone_by(self, generation: u64) -> bool {
        generation == self.generation || generation >= self.next_attached
    }
}

/// Where a peer's data frames stand: the last one's number and where it was read.
#[derive(Debug, Default)]
struct FrameOrder {
    seq: SeqOrder,
    taken_on: TakenOn,
}

/// Where a data frame goes in its peer's order ([`FrameOrder::place`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placed {
    /// After the last one taken.
    Next,
    /// Sent before the last one taken, read late (on another link, or from a connection
    /// replaced since).
    Late,
    /// Not after the last one taken, whose number it shows false ([`TakenOn`]).
    TakenBack,
}

impl FrameOrder {
    /// Where frame `seq` of boot `boot_id`, read on connection `generation`, goes.
    fn place(&mut self, boot_id: u64, seq: u64, generation: u64) -> Placed {
        if self.seq.is_new(boot_id, seq) {
            Placed::Next
        } else if self.taken_on.undone_by(generation) {
            Placed::TakenBack
        } else {
            Placed::Late
        }
    }

    /// Frame `seq` was applied, read on connection `taken_on`.
    fn taken(&mut self, seq: u64, taken_on: TakenOn) {
        self.seq.taken(seq);
        self.taken_on = taken_on;
    }
}

struct PeerInner {
    window: Window,
    links: BTreeMap<LinkKind, LinkConn>,
    /// Counts the links' attaches and detaches, under this lock: the order in which the
    /// membership takes their word ([`crate::cluster::Membership::connection_link`]).
    link_word: u64,
    /// HA4 failed since it last carried data: when it returns, it waits out the hold-down.
    ha4_failed: bool,
    ha4_usable_at: Option<Instant>,
    /// The link data went out on last; a change requeues what was in flight.
    data_link: Option<LinkKind>,
    bulk_wanted: bool,
    /// The full sync whose end was sent and not yet confirmed, with the sequence number of the
    /// empty frame after it (in the window until acknowledged): it counts as sent when it is.
    bulk_unconfirmed: Option<(u64, BulkSent)>,
    /// Full syncs to this peer: at most one per backoff step.
    bulk_backoff: Backoff,
    /// The peer boot whose request for a full sync was honoured last.
    bulk_granted_boot: Option<u64>,
    /// When a new boot of the peer last started the backoff over.
    bulk_backoff_reset: Option<Instant>,
    /// The full syncs received from this peer.
    full_sync_rx: FullSyncRx,
    zones: ZoneMap,
    hello: Option<Hello>,
    /// The peer's keepalives taken (from 1.4 on they are numbered, the same on both links),
    /// and when and on which connection the last one was.
    keepalives: SeqOrder,
    keepalive_anchor: Option<KeepaliveAnchor>,
}

/// Where the last keepalive taken from a peer came from.
#[derive(Clone, Copy, Debug)]
struct KeepaliveAnchor {
    at: Instant,
    link: LinkKind,
    generation: u64,
}

/// One peer at run time.
pub struct Peer {
    pub cfg: PeerConfig,
    /// Its line in the engine's [`Backlog`].
    line: usize,
    inner: Mutex<PeerInner>,
    /// Held while a frame from this peer is applied: one at a time, in sequence order.
    applied: Mutex<FrameOrder>,
    wake: Notify,
    /// This member's state changed: its keepalive loop sends at once.
    state_changed: Notify,
    pub stats: PeerStats,
}

impl Peer {
    fn new(cfg: PeerConfig, line: usize) -> Self {
        Peer {
            cfg,
            line,
            inner: Mutex::new(PeerInner {
                window: Window::new(MAX_IN_FLIGHT),
                links: BTreeMap::new(),
                ha4_failed: false,
                ha4_usable_at: None,
                data_link: None,
                bulk_wanted: false,
                link_word: 0,
                bulk_unconfirmed: None,
                bulk_backoff: Backoff::new(BULK_BACKOFF.0, BULK_BACKOFF.1),
                bulk_granted_boot: None,
                bulk_backoff_reset: None,
                full_sync_rx: FullSyncRx::default(),
                zones: ZoneMap::default(),
                hello: None,
                keepalives: SeqOrder::default(),
                keepalive_anchor: None,
            }),
            applied: Mutex::new(FrameOrder::default()),
            wake: Notify::new(),
            state_changed: Notify::new(),
            stats: PeerStats::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PeerInner> {
        lock(&self.inner)
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

/// The running engine over session table `T` (the datapath; a fake in tests); cheap to clone.
pub struct Engine<T = Datapath> {
    inner: Arc<EngineInner<T>>,
}

impl<T> Clone for Engine<T> {
    fn clone(&self) -> Self {
        Engine {
            inner: self.inner.clone(),
        }
    }
}

struct EngineInner<T> {
    cfg: SyncConfig,
    dp: Arc<Mutex<T>>,
    /// Taken before a peer's lock, never under it (`show cluster members` reads peers under
    /// it).
    membership: Arc<Mutex<Membership>>,
    peers: BTreeMap<MemberId, Arc<Peer>>,
    rejections: Rejections,
    generation: AtomicU64,
    logged: Mutex<HashSet<String>>,
    /// Lines a peer can repeat by what it sends: per key, a burst, then one per interval.
    log_limits: LogLimiter,
    /// Local interface state per link, as last read.
    local_up: Mutex<BTreeMap<LinkKind, bool>>,
    /// This member's table started empty and it has not yet had every reachable peer's full
    /// sync: peers send its own sessions back to it ([`SyncConfig::fresh_table`], cleared once
    /// the initial full syncs ended).
    fresh_table: AtomicBool,
    /// When [`Self::fresh_table`] ends at the latest: the initial sync limit after the first
    /// full sync from any peer started (set then). A peer whose full sync never ends (stalled,
    /// or lying) must not keep the sessions this member owns writable for good; a member
    /// alone keeps the window until a peer arrives.
    fresh_until: OnceLock<Instant>,
    /// Per listening link: who may start a handshake.
    admission: BTreeMap<LinkKind, Arc<Admission>>,
    /// When this agent did not run (ticked by the runtime's task; [`Engine::stall_watch`]):
    /// the order of a peer's keepalives does not lapse over it.
    stall: Arc<StallWatch>,
    /// A re-announcement walk is running ([`Engine::reannounce_from`]).
    reannouncing: AtomicBool,
    /// Keepalives made so far ([`Keepalive::seq`](super::wire::Keepalive::seq) of the last),
    /// counted under the membership's lock so their order is that of the states they carry.
    keepalive_seq: AtomicU64,
    /// The changes queued for the peers. Taken after a peer's lock, never before it.
    backlog: Mutex<Backlog>,
    /// Evaluates the membership and applies what changed ([`Engine::on_return`]).
    on_return: OnceLock<ReturnHook>,
}

/// What the engine calls when a keepalive brings a member back ([`Engine::on_return`]).
type ReturnHook = Box<dyn Fn() + Send + Sync>;

use crate::lock::lock;

impl<T: SessionTable> Engine<T> {
    pub fn new(cfg: SyncConfig, dp: Arc<Mutex<T>>, membership: Arc<Mutex<Membership>>) -> Self {
        let peers: BTreeMap<MemberId, Arc<Peer>> = cfg
            .peers
            .iter()
            .filter(|p| p.id != cfg.local)
            .enumerate()
            .map(|(line, p)| (p.id, Arc::new(Peer::new(p.clone(), line))))
            .collect();
        let mut targets = vec![false; peers.len()];
        for p in peers.values() {
            if let Some(t) = targets.get_mut(p.line) {
                *t = cfg.local_session_sync && p.cfg.session_sync && p.cfg.enabled;
            }
        }
        let backlog = Mutex::new(Backlog::new(BACKLOG_CAPACITY, &targets));
        let admission = connect::admissions(&cfg);
        Engine {
            inner: Arc::new(EngineInner {
                fresh_table: AtomicBool::new(cfg.fresh_table),
                fresh_until: OnceLock::new(),
                cfg,
                dp,
                membership,
                peers,
                rejections: Rejections::default(),
                generation: AtomicU64::new(1),
                logged: Mutex::new(HashSet::new()),
                log_limits: LogLimiter::default(),
                local_up: Mutex::new(BTreeMap::new()),
                admission,
                stall: Arc::default(),
                reannouncing: AtomicBool::new(false),
                keepalive_seq: AtomicU64::new(0),
                backlog,
                on_return: OnceLock::new(),
            }),
        }
    }

    /// The watch of this agent's stalls the engine reads: the runtime ticks it and takes the
    /// stalls the membership forgives from it.
    pub fn stall_watch(&self) -> Arc<StallWatch> {
        self.inner.stall.clone()
    }

    /// Sets what evaluates the membership and applies its changes (the XDP member map, the
    /// claim window: `crate::runtime::apply_membership`) when a keepalive brings back a member
    /// not alive here. The reader calls it before it reads on: whatever the member sends
    /// after that keepalive (what it took over while the two could not see each other) is
    /// then applied with the member alive here and the claim window open, not refused as a
    /// claim of live sessions because the runtime's next evaluation had not run yet. Set once;
    /// later calls are ignored.
    pub fn on_return(&self, hook: impl Fn() + Send + Sync + 'static) {
        let _ = self.inner.on_return.set(Box::new(hook));
    }

    /// Runs the hook [`Engine::on_return`] set (nothing if none was): a keepalive brought a
    /// member back.
    pub(crate) fn member_returned(&self) {
        if let Some(evaluate) = self.inner.on_return.get() {
            evaluate();
        }
    }

    /// Queues every session this member owns for every syncing peer, from a walk of `reader`
    /// (after events lost to a full ring buffer): each is read when sent, so peers coalesce
    /// what they have; `each` sees every one as the walk read it (what else the lost events
    /// would have done). The walk takes no lock of the table, so it can run on a thread of its
    /// own while the event reader goes on. False when another re-announcement is still running
    /// (losses since it started wait for the next one).
    pub fn reannounce_from(
        &self,
        reader: &SessionReader,
        mut each: impl FnMut(&FlowKey, &Session),
    ) -> Result<bool, DatapathError> {
        if self.inner.reannouncing.swap(true, Relaxed) {
            return Ok(false);
        }
        /// Ends the walk's mark, also when the walk panics (else no walk would run again).
        struct Walking<'a>(&'a AtomicBool);
        impl Drop for Walking<'_> {
            fn drop(&mut self) {
                self.0.store(false, Relaxed);
            }
        }
        let walking = Walking(&self.inner.reannouncing);
        let local = self.inner.cfg.local;
        let mut owned = Vec::with_capacity(DEFAULT_CHUNK as usize);
        let walked = reader.each_owned_by(local, |k, s| {
            owned.push(*k);
            each(k, s);
            if owned.len() >= DEFAULT_CHUNK as usize {
                self.enqueue(&owned);
                owned.clear();
            }
        });
        self.enqueue(&owned);
        drop(walking);
        self.flush();
        walked.map(|_| true)
    }

    /// Is a re-announcement walk running?
    pub fn reannouncing(&self) -> bool {
        self.inner.reannouncing.load(Relaxed)
    }

    pub fn peers(&self) -> impl Iterator<Item = &Arc<Peer>> {
        self.inner.peers.values()
    }

    pub fn rejections(&self) -> &Rejections {
        &self.inner.rejections
    }

    /// Does this member still take its own sessions back from peers' full syncs? Not past
    /// [`SyncConfig::initial_sync_limit`] after the first one started, whatever they did.
    pub fn fresh_table(&self) -> bool {
        if !self.inner.fresh_table.load(Relaxed) {
            return false;
        }
        if self
            .inner
            .fresh_until
            .get()
            .is_none_or(|&until| Instant::now() < until)
        {
            return true;
        }
        if self.inner.fresh_table.swap(false, Relaxed) {
            warn!(
                limit_s = self.inner.cfg.initial_sync_limit.as_secs(),
                "initial full syncs not all ended within the limit: this member's table is the \
                 authority on its sessions again"
            );
        }
        false
    }

    /// The local sync interface's state for `link`.
    pub fn local_link_state(&self, link: LinkKind) -> LinkState {
        if !self.inner.cfg.local_links.contains_key(&link) {
            return LinkState::NotConfigured;
        }
        match lock(&self.inner.local_up).get(&link) {
            Some(false) => LinkState::Down,
            // Not known yet (or not watched): not reported as down.
            Some(true) | None => LinkState::Up,
        }
    }

    /// Starts listeners, dialers, senders, keepalives and the link monitor, which follows
    /// the local sync interfaces in `links` (the agent's one interface watcher).
    pub fn start(&self, links: Result<LinkWatch, NetlinkError>) -> Vec<(String, JoinHandle<()>)> {
        let mut tasks = Vec::new();
        for (&link, (addr, _)) in &self.inner.cfg.local_links {
            let e = self.clone();
            let addr = std::net::SocketAddr::new(*addr, self.inner.cfg.port);
            let name = format!("sync listener on {}", link.name());
            tasks.push((
                name,
                tokio::spawn(async move { e.listen(link, addr).await }),
            ));
        }
        for peer in self.inner.peers.values() {
            if !peer.cfg.enabled {
                continue;
            }
            let id = peer.cfg.id.0;
            if self.inner.cfg.local < peer.cfg.id {
                for &link in self.inner.cfg.local_links.keys() {
                    if peer.cfg.addrs.contains_key(&link) {
                        let (e, p) = (self.clone(), peer.clone());
                        let name = format!("dialler to member {id} on {}", link.name());
                        tasks.push((name, tokio::spawn(async move { e.dial(p, link).await })));
                    }
                }
            }
            let (e, p) = (self.clone(), peer.clone());
            let name = format!("sender to member {id}");
            tasks.push((name, tokio::spawn(async move { e.send_loop(p).await })));
            let (e, p) = (self.clone(), peer.clone());
            let name = format!("keepalives to member {id}");
            tasks.push((name, tokio::spawn(async move { e.keepalive_loop(p).await })));
        }
        match links {
            Ok(watch) => {
                let e = self.clone();
                let name = "sync interfaces' state".to_owned();
                tasks.push((
                    name,
                    tokio::spawn(async move { e.monitor_links(watch).await }),
                ));
            }
            Err(e) => {
                warn!(error = %e, "cannot watch the sync interfaces' state; sync links are judged by keepalives alone");
            }
        }
        tasks
    }

    /// Locally owned sessions changed (or were removed): queue them for every syncing peer,
    /// each to be read from the table when it is sent.
    pub fn enqueue(&self, keys: &[FlowKey]) {
        self.enqueue_changes(keys.iter().map(|key| (*key, Change::Read)));
    }

    /// Locally owned sessions changed: queue each with what its record is built from
    /// ([`Change`]) for every syncing peer.
    pub fn enqueue_changes<I>(&self, changes: I)
    where
        I: IntoIterator<Item = (FlowKey, Change)>,
    {
        if !self.inner.cfg.local_session_sync {
            return;
        }
        let now = Instant::now();
        let mut changes = changes.into_iter().peekable();
        while changes.peek().is_some() {
            let mut backlog = lock(&self.inner.backlog);
            for (key, change) in changes.by_ref().take(ENQUEUE_RUN) {
                backlog.enqueue(key, change, now);
            }
        }
    }

    /// The generation of a connection being set up (taken before our hello goes out on it).
    fn next_generation(&self) -> u64 {
        self.inner.generation.fetch_add(1, Relaxed)
    }

    /// A message read now on connection `generation` ([`TakenOn`]).
    fn taken_on(&self, generation: u64) -> TakenOn {
        TakenOn {
            generation,
            next_attached: self.inner.generation.load(Relaxed),
        }
    }

    /// `peer`'s keys queued and frames in flight.
    pub fn backlog_of(&self, peer: &Peer) -> (usize, usize) {
        let in_flight = peer.lock().window.in_flight();
        (lock(&self.inner.backlog).pending(peer.line), in_flight)
    }

    /// The link `peer`'s data went out on failed: what it had in flight is queued again, in
    /// front. Returns how many keys, and whether frames of a full sync were lost (then it must
    /// start over: they cannot be resent key by key).
    fn requeue_unacked(&self, peer: &Peer, g: &mut PeerInner) -> (usize, bool) {
        let (unacked, bulk_lost) = g.window.unacked();
        let n = lock(&self.inner.backlog).requeue(peer.line, &unacked);
        if bulk_lost {
            // Its end, if sent, was not confirmed: it starts over.
            g.bulk_unconfirmed = None;
            lock(&peer.stats.bulk_sent).running = false;
        }
        (n, bulk_lost)
    }

    /// Wakes every sender (after a burst of `enqueue`s).
    pub fn flush(&self) {
        for peer in self.inner.peers.values() {
            peer.wake.notify_one();
        }
    }

    /// Asks for a full sync to every syncing peer (after lost events). Each goes out when that
    /// peer's full-sync backoff allows.
    pub fn request_bulk_all(&self) {
        if !self.inner.cfg.local_session_sync {
            return;
        }
        for peer in self.inner.peers.values().filter(|p| p.cfg.session_sync) {
            peer.lock().bulk_wanted = true;
            peer.wake.notify_one();
        }
    }

    fn log_once(&self, key: String, f: impl FnOnce()) {
        if lock(&self.inner.logged).insert(key) {
            f();
        }
    }

    /// Logs through `f` unless `key` used up its lines for now ([`LogLimiter`]: a burst, then
    /// one per interval); `f` gets how many lines of `key` were left out since the last one.
    fn log_limited(&self, key: String, f: impl FnOnce(u64)) {
        if let Some(skipped) = self.inner.log_limits.allow(&key, Instant::now()) {
            f(skipped);
        }
    }

    /// Writes the state of `peer`'s links whose up/down lines were left out ([`LogLimiter::
    /// catch_up`]): the last line about a link says its state.
    fn catch_up_link_lines(&self, peer: &Peer, now: Instant) {
        for link in [LinkKind::Ha4, LinkKind::Ha4Backup] {
            let key = link_state_key(peer, link);
            if let Some(skipped) = self.inner.log_limits.catch_up(&key, now) {
                let up = peer.lock().links.contains_key(&link);
                info!(
                    peer = peer.cfg.id.0,
                    link = link.name(),
                    state = if up { "up" } else { "down" },
                    skipped,
                    "sync link state (after up and down lines left out)"
                );
            }
        }
    }

    /// The link data should go out on now, if any.
    fn pick_link(g: &PeerInner, now: Instant) -> Option<LinkKind> {
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

    /// Takes `link`'s connection out of `g`: what it had in flight as the data link is queued
    /// again (a full sync's frames cannot be resent key by key: it starts over), and a full
    /// sync it carried in never ends. The caller closes it.
    fn unlink(&self, peer: &Peer, g: &mut PeerInner, link: LinkKind) -> Option<LinkConn> {
        let c = g.links.remove(&link)?;
        if g.data_link == Some(link) {
            let (n, bulk_lost) = self.requeue_unacked(peer, g);
            LinkStats::add(&peer.stats.resends, n as u64);
            g.data_link = None;
            g.bulk_wanted |= bulk_lost;
        }
        if g.full_sync_rx.link_lost(c.generation) {
            lock(&peer.stats.bulk_received).running = false;
        }
        Some(c)
    }

    /// Drops a connection (if it is still the current one for its link): both of its tasks
    /// end, which closes the socket.
    fn detach(&self, peer: &Peer, link: LinkKind, generation: Option<u64>, why: &str) {
        let removed = {
            let mut g = peer.lock();
            match g.links.get(&link) {
                Some(c) if generation.is_none_or(|gen| gen == c.generation) => {
                    if link == LinkKind::Ha4 {
                        g.ha4_failed = true;
                        g.ha4_usable_at = None;
                    }
                    g.link_word += 1;
                    let word = g.link_word;
                    self.unlink(peer, &mut g, link).map(|c| (c, word))
                }
                _ => None,
            }
        };
        if let Some((c, word)) = removed {
            c.close();
            let stats = peer.stats.link(link);
            LinkStats::add(&stats.failures, 1);
            if why == "stalled" || why == ACKS_MISSED {
                LinkStats::add(&stats.stalls, 1);
            }
            lock(&self.inner.membership).connection_link(peer.cfg.id, link, word, false);
            self.log_limited(link_state_key(peer, link), |skipped| {
                warn!(
                    peer = peer.cfg.id.0,
                    link = link.name(),
                    reason = why,
                    skipped,
                    "sync link down"
                );
            });
            peer.wake.notify_one();
        }
    }

    /// Clears the fresh-table flag once this member left its initial state (every reachable
    /// peer's full sync ended) and either a peer whose own table is intact finished its full
    /// sync, which handed back what it held of ours, or every configured peer did (a whole
    /// cluster starting empty): from then on our table is the authority on our sessions. A
    /// member that stays alone keeps the flag until a peer arrives.
    fn settle_fresh_table(&self) {
        if !self.inner.fresh_table.load(Relaxed) {
            return;
        }
        let intact: Vec<MemberId> = self
            .inner
            .peers
            .values()
            .filter(|p| p.lock().hello.as_ref().is_some_and(|h| !h.fresh_table))
            .map(|p| p.cfg.id)
            .collect();
        let settled = {
            let m = lock(&self.inner.membership);
            let done = |p: &crate::cluster::Peer| p.full_sync == FullSyncIn::Done;
            let intact_done = intact.iter().any(|id| m.peers.get(id).is_some_and(done));
            let syncing = || m.peers.values().filter(|p| p.session_sync);
            let all_done = syncing().next().is_some() && syncing().all(done);
            m.state != crate::cluster::MemberState::Initial && (intact_done || all_done)
        };
        if settled {
            self.inner.fresh_table.store(false, Relaxed);
            info!("initial full syncs ended: this member's table is the authority on its sessions again");
        }
    }
}

/// The log limiter's key of `peer`'s up and down lines on `link`.
fn link_state_key(peer: &Peer, link: LinkKind) -> String {
    format!("link-state-{}-{}", peer.cfg.id.0, link.name())
}

#[cfg(test)]
mod tests;
