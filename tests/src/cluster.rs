//! Cluster scenarios: real `hasync` agents in a netns lab ([`hasync_agent::lab`]), queried over
//! their control sockets, with traffic that goes through the members for real.
//!
//! - [`hasync_binary`]: the `hasync` executable the agents run (`$HASYNC_BIN`, or built once).
//! - [`Cluster`]: a [`LabCluster`] with a unique prefix, plus `show` queries that name the
//!   member and carry the agents' log tails when something fails.
//! - [`Row`] and [`Table`]: a member's session table as `show cluster sessions` lists it, to
//!   compare members.
//! - Traffic: [`udp_flows`] (many short UDP flows from real sockets) and [`UdpInjector`]
//!   (raw frames from the client namespace, for tables of 100,000 sessions).
//!
//! Every loop here is bounded in count and time; every packet stays inside lab namespaces.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use hasync_agent::{
    control::{
        client::{call, parse},
        view::{
            CountersView, LocalStateView, MemberView, MembersView, SessionView, SessionsView,
            StatisticsView,
        },
        Request, SessionFilter,
    },
    datapath::{batch::obj_get, monotonic_ns, BatchMap},
    lab::{
        netns::run_in,
        topology::{test_prefix, Link, Topology, CLIENT_V4, SERVER_V4},
        traffic::{tcp_client, Bounds, TcpClientOptions, TrafficClient},
        ClusterOptions, LabCluster,
    },
};

use hasync_common::{
    flow::IPPROTO_UDP, Family, FlowKey, MemberId, Session, SessionFlags, State, ZoneId,
};

use crate::{build::Profile, frame::Frame};

/// How long an agent may take to open its control socket.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines of each agent's log quoted when a check fails.
pub const LOG_LINES: usize = 40;

/// The `hasync` executable: [`crate::build::hasync`] in the debug profile, once per test
/// process.
///
/// # Panics
/// If the build fails (with cargo's output) or the executable is missing.
pub fn hasync_binary() -> &'static Path {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BINARY.get_or_init(|| crate::build::hasync(Profile::Debug)) {
        Ok(path) => path,
        Err(e) => panic!("{e}"),
    }
}

/// One session as `show cluster sessions` lists it: what members must agree on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Row {
    pub proto: String,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub state: String,
    pub owner: u8,
    pub zone: String,
}

impl From<&SessionView> for Row {
    fn from(v: &SessionView) -> Row {
        let SessionView {
            proto,
            src,
            sport,
            dst,
            dport,
            state,
            owner,
            zone,
            idle_ms: _,
        } = v;
        Row {
            proto: proto.clone(),
            src: *src,
            sport: *sport,
            dst: *dst,
            dport: *dport,
            state: state.clone(),
            owner: *owner,
            zone: zone.clone(),
        }
    }
}

impl fmt::Display for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} → {} {} owner {} zone {:?}",
            self.proto,
            SocketAddr::new(self.src, self.sport),
            SocketAddr::new(self.dst, self.dport),
            self.state,
            self.owner,
            self.zone
        )
    }
}

/// A member's session table.
pub type Table = BTreeSet<Row>;

/// What differs between two tables, at most `max` lines per side.
pub fn table_diff(a_name: &str, a: &Table, b_name: &str, b: &Table, max: usize) -> String {
    let mut out = String::new();
    for (name, only) in [
        (a_name, a.difference(b).collect::<Vec<_>>()),
        (b_name, b.difference(a).collect::<Vec<_>>()),
    ] {
        if only.is_empty() {
            continue;
        }
        out.push_str(&format!("  only on {name} ({}):\n", only.len()));
        for row in only.iter().take(max) {
            out.push_str(&format!("    {row}\n"));
        }
        if only.len() > max {
            out.push_str("    ...\n");
        }
    }
    out
}

/// Sends a request to member `k`'s control socket and reads the answer as the view `$view`
/// (a macro: the views' `Deserialize` bound cannot be named without serde).
macro_rules! query {
    ($cluster:expr, $k:expr, $req:expr, $view:ty) => {{
        let path = $cluster.socket_path($k);
        call(&path, $req)
            .and_then(|data| parse::<$view>(&path, data))
            .map_err(|e| format!("fw{}: {e}", $k))
    }};
}

/// A lab cluster for one test: its own namespaces (`<tag><pid>-...`), lab directory, pin
/// directories and agents, all removed on drop (the lab directory is kept when a check
/// failed).
pub struct Cluster {
    lab: LabCluster,
}

impl std::ops::Deref for Cluster {
    type Target = LabCluster;
    fn deref(&self) -> &LabCluster {
        &self.lab
    }
}

impl Cluster {
    /// Creates the lab (namespaces, links, configs) without starting agents. `tag` is short
    /// and unique per test: `c1-`, `late-`, ...
    ///
    /// # Panics
    /// If the lab cannot be built.
    pub fn new(tag: &str, members: u8, options: ClusterOptions) -> Cluster {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "cluster labs need root");
        let binary = hasync_binary();
        let prefix = test_prefix(tag).unwrap_or_else(|e| panic!("test prefix {tag}: {e}"));
        let topology = Topology::create(&prefix, members)
            .unwrap_or_else(|e| panic!("creating the lab {prefix}: {e}"));
        let lab = LabCluster::new(topology, binary, options)
            .unwrap_or_else(|e| panic!("writing the lab's configs: {e}"));
        Cluster { lab }
    }

    /// [`Cluster::new`], then every agent started and listening.
    pub fn start(tag: &str, members: u8, options: ClusterOptions) -> Cluster {
        let c = Cluster::new(tag, members, options);
        for k in c.topology().member_ids() {
            c.start_member(k);
        }
        c
    }

    pub fn lab(&self) -> &LabCluster {
        &self.lab
    }

    /// Starts member `k`'s agent and waits for its control socket.
    pub fn start_member(&self, k: u8) {
        if let Err(e) = self.lab.start_agent(k) {
            self.fail(&format!("starting fw{k}'s agent: {e}"));
        }
        if let Err(e) = self.lab.wait_ready(k, READY_TIMEOUT) {
            self.fail(&format!("fw{k}'s agent is not ready: {e}"));
        }
    }

    /// Waits until member `k` reports itself active (its first full syncs ended).
    pub fn wait_active(&self, k: u8, timeout: Duration) {
        self.wait(&format!("fw{k} to be active"), timeout, || {
            let m = self.try_member(k, k)?;
            (m.state == "active").then_some(()).ok_or(m.state)
        });
    }

    /// In a cluster of two (or more), a TCP echo connection through fw1 (the server must
    /// listen on `port`) once fw1 and fw2 are active; returns the connection's session as fw1
    /// lists it.
    pub fn tcp_connection_through_fw1(&self, port: u16) -> (TrafficClient, Row) {
        let c = self;
        c.wait_pair_active();
        let client = c.echo_client((SERVER_V4, port).into(), "through fw1");
        let filter = SessionFilter {
            proto: Some("tcp".into()),
            port: Some(port),
            ..SessionFilter::default()
        };
        let row = c.wait("fw1 to list the connection", Duration::from_secs(5), || {
            let v = c.try_sessions(1, filter.clone())?;
            match v.sessions.as_deref() {
                Some([s]) if s.state == "established" => Ok(Row::from(s)),
                other => Err(format!("{other:?}")),
            }
        });
        assert_eq!(
            (row.src, row.dst, row.owner, row.zone.as_str()),
            (IpAddr::V4(CLIENT_V4), IpAddr::V4(SERVER_V4), 1, "trust")
        );
        (client, row)
    }

    /// Waits until fw1 and fw2 are active (with or without session sync) and fw2 hears fw1.
    pub fn wait_pair_active(&self) {
        for (k, of) in [(1, 1), (2, 2), (2, 1)] {
            self.wait(
                &format!("fw{k} to see fw{of} active"),
                Duration::from_secs(20),
                || {
                    let m = self.try_member(k, of)?;
                    (m.state == "active" && m.ha4 == "up")
                        .then_some(())
                        .ok_or(format!("{m:?}"))
                },
            );
        }
    }

    /// A TCP echo client in the client namespace, a chunk every 50 ms to `server` (which must
    /// listen), once 5 echoes came back; `path` names the way it goes, for failures.
    pub fn echo_client(&self, server: SocketAddr, path: &str) -> TrafficClient {
        let client = tcp_client(
            self.topology().client(),
            server,
            TcpClientOptions {
                interval: Duration::from_millis(50),
                io_timeout: Duration::from_millis(200),
                bounds: Bounds::new(2_000, Duration::from_secs(60)),
                ..TcpClientOptions::default()
            },
        )
        .unwrap_or_else(|e| self.fail(&format!("TCP {path}: {e}")));
        client
            .wait_until(Duration::from_secs(5), |p| p.ok >= 5)
            .unwrap_or_else(|| self.fail(&format!("no echoes {path}: {:?}", client.progress())));
        client
    }

    /// Waits until member `k` lists exactly one session that `filter` selects, owned by
    /// `owner`, and returns it.
    pub fn wait_owned(&self, k: u8, filter: &SessionFilter, owner: u8, timeout: Duration) -> Row {
        self.wait(
            &format!("fw{k} to list the connection, owned by fw{owner}"),
            timeout,
            || {
                let v = self.try_sessions(k, filter.clone())?;
                match v.sessions.as_deref() {
                    Some([s]) if s.owner == owner => Ok(Row::from(s)),
                    other => Err(format!("{other:?}")),
                }
            },
        )
    }

    /// The last [`LOG_LINES`] lines of every member's agent log.
    pub fn logs(&self) -> String {
        self.logs_of(self.topology().member_ids())
    }

    /// The last [`LOG_LINES`] lines of the given members' agent logs.
    pub fn logs_of(&self, members: impl IntoIterator<Item = u8>) -> String {
        let mut out = String::new();
        for k in members {
            out.push_str(&format!(
                "\n----- fw{k} agent log ({}), last {LOG_LINES} lines -----\n{}\n",
                self.log_path(k).display(),
                self.log_tail(k, LOG_LINES)
            ));
        }
        out
    }

    /// Panics with `msg` and every agent's log tail.
    pub fn fail(&self, msg: &str) -> ! {
        panic!("{msg}\n{}", self.logs())
    }

    /// Polls `check` every 100 ms until it gives `Ok`, for at most `timeout`; on timeout fails
    /// naming `what`, with the last `Err` (what was seen instead) and the agents' logs.
    pub fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Result<T, String>,
    ) -> T {
        let start = Instant::now();
        loop {
            let last = match check() {
                Ok(v) => return v,
                Err(e) => e,
            };
            if start.elapsed() >= timeout {
                self.fail(&format!(
                    "timed out after {:.1} s waiting for {what}; last seen: {last}",
                    timeout.as_secs_f64()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `show cluster sessions` on member `k` (one page of up to 100,000).
    pub fn try_sessions(&self, k: u8, filter: SessionFilter) -> Result<SessionsView, String> {
        let req = Request::ShowSessions {
            count_only: false,
            filter,
            offset: 0,
            limit: None,
        };
        query!(self, k, &req, SessionsView)
    }

    /// `show cluster sessions --count` on member `k`: totals only.
    pub fn try_count(&self, k: u8, filter: SessionFilter) -> Result<SessionsView, String> {
        let req = Request::ShowSessions {
            count_only: true,
            filter,
            offset: 0,
            limit: None,
        };
        query!(self, k, &req, SessionsView)
    }

    /// Member `k`'s whole session table (at most 100,000 sessions).
    pub fn try_table(&self, k: u8) -> Result<Table, String> {
        let view = self.try_sessions(k, SessionFilter::default())?;
        let rows: Table = view.sessions.iter().flatten().map(Row::from).collect();
        if rows.len() as u64 != view.total {
            return Err(format!(
                "fw{k} lists {} of {} sessions: too many for one page",
                rows.len(),
                view.total
            ));
        }
        Ok(rows)
    }

    pub fn table(&self, k: u8) -> Table {
        self.try_table(k).unwrap_or_else(|e| self.fail(&e))
    }

    /// `show cluster members` on member `k`.
    pub fn try_members(&self, k: u8) -> Result<MembersView, String> {
        query!(self, k, &Request::ShowMembers {}, MembersView)
    }

    /// `hasync functional` on member `k`.
    pub fn try_functional(&self, k: u8) -> Result<LocalStateView, String> {
        query!(self, k, &Request::Functional {}, LocalStateView)
    }

    /// How member `k` sees member `of` (itself included).
    pub fn try_member(&self, k: u8, of: u8) -> Result<MemberView, String> {
        self.try_members(k)?
            .members
            .into_iter()
            .find(|m| m.id == of)
            .ok_or_else(|| format!("fw{k} does not list member {of}"))
    }

    /// How many sessions of `owner` member `k` holds.
    pub fn try_owned_by(&self, k: u8, owner: u8) -> Result<u64, String> {
        let filter = SessionFilter {
            owner: Some(owner),
            ..SessionFilter::default()
        };
        Ok(self.try_count(k, filter)?.total)
    }

    /// Writes `n` UDP sessions owned by `owner` straight into member `k`'s pinned table (no
    /// event: its agent learns of them only by reading the table, as a full sync does). The
    /// flows use addresses no lab traffic uses, distinct per owner.
    pub fn fill_table(&self, k: u8, owner: u8, n: u32) {
        let path = self
            .pin_dir(k)
            .join("maps")
            .join(hasync_common::maps::SESSIONS);
        let fd = obj_get(&path).unwrap_or_else(|e| self.fail(&format!("{}: {e}", path.display())));
        let map = BatchMap::<FlowKey, Session>::new(fd.as_fd())
            .unwrap_or_else(|e| self.fail(&format!("fw{k}'s pinned table: {e}")));
        let now = monotonic_ns();
        let (keys, values): (Vec<FlowKey>, Vec<Session>) =
            (0..n).map(|i| synthetic_session(owner, i, now)).unzip();
        for (ks, vs) in keys.chunks(4096).zip(values.chunks(4096)) {
            map.update_batch(ks, vs, 0)
                .unwrap_or_else(|e| self.fail(&format!("filling fw{k}'s table: {e}")));
        }
    }

    /// Cuts (`on`) or restores member `k`'s HA4 and HA4 backup: nftables inside the member
    /// drops everything on both, the links stay up.
    pub fn cut_sync_links(&self, k: u8, on: bool) {
        for link in [Link::Ha4, Link::Ha4Backup] {
            let done = if on {
                self.topology().drop_with_nft(k, link, 100)
            } else {
                self.topology().undrop_nft(k, link)
            };
            done.unwrap_or_else(|e| self.fail(&format!("{link} on fw{k}: {e}")));
        }
    }

    /// `show cluster statistics` on member `k`.
    pub fn try_statistics(&self, k: u8) -> Result<StatisticsView, String> {
        query!(self, k, &Request::ShowStatistics {}, StatisticsView)
    }

    pub fn statistics(&self, k: u8) -> StatisticsView {
        self.try_statistics(k).unwrap_or_else(|e| self.fail(&e))
    }

    /// `show counters` on member `k`.
    pub fn try_counters(&self, k: u8) -> Result<BTreeMap<String, u64>, String> {
        query!(
            self,
            k,
            &Request::ShowCounters { prefix: None },
            CountersView
        )
        .map(|c| c.counters)
    }

    /// Member `k`'s datapath counter `name` (the test fails if it cannot ask).
    pub fn counter(&self, k: u8, name: &str) -> u64 {
        let counters = self.try_counters(k).unwrap_or_else(|e| self.fail(&e));
        counters.get(name).copied().unwrap_or(0)
    }

    /// Member `k`'s count of packets it forwarded in XDP (the test fails if it cannot ask).
    pub fn forwarded_xdp(&self, k: u8) -> u64 {
        self.counter(k, "forwarded-xdp")
    }

    /// Waits (10 s at most) until member `k` forwarded more than `more_than` packets in XDP.
    pub fn wait_forwarded_xdp(&self, k: u8, more_than: u64) {
        self.wait(
            &format!("fw{k} to forward the connection in XDP"),
            Duration::from_secs(10),
            || {
                let n = self.forwarded_xdp(k);
                (n > more_than)
                    .then_some(())
                    .ok_or(format!("forwarded-xdp = {n}"))
            },
        );
    }

    /// Waits until every member in `members` lists the same table and `accept` finds in it
    /// what it expects (else it says what it expected); returns it. On timeout the failure
    /// shows how the tables differ, or the agreed table.
    pub fn wait_same_tables(
        &self,
        members: &[u8],
        timeout: Duration,
        mut accept: impl FnMut(&Table) -> Result<(), String>,
    ) -> Table {
        self.wait("the members' session tables to agree", timeout, || {
            let (&first, rest) = members.split_first().ok_or("no members")?;
            let table = self.try_table(first)?;
            for &k in rest {
                let other = self.try_table(k)?;
                if other != table {
                    return Err(format!(
                        "fw{first} and fw{k} differ:\n{}",
                        table_diff(&format!("fw{first}"), &table, &format!("fw{k}"), &other, 8)
                    ));
                }
            }
            accept(&table).map_err(|e| {
                format!(
                    "the tables agree, but lack what is expected ({e}); the table ({} sessions):{}",
                    table.len(),
                    show(&table, 8)
                )
            })?;
            Ok(table)
        })
    }
}

/// Session `i` owned by member `owner`: an established UDP flow from 198.19.`owner`.1 to one
/// of 198.19.200.0/21, in zone 1, seen at `now`.
pub fn synthetic_session(owner: u8, i: u32, now: u64) -> (FlowKey, Session) {
    let a = u32::from_be_bytes([198, 19, owner, 1]).to_be();
    let b = (u32::from_be_bytes([198, 19, 200, 0]) + (i >> 16)).to_be();
    let (key, _) = FlowKey::canonical(
        Family::V4,
        IPPROTO_UDP,
        [a, 0, 0, 0],
        (i & 0xffff) as u16,
        [b, 0, 0, 0],
        53,
    );
    // An assured UDP stream (answered, alive for 3 s), as a table under load holds: never
    // evicted for newer flows, here or on the peers it is synced to.
    let session = Session {
        created_ns: now.saturating_sub(3_000_000_000),
        last_seen_ns: now,
        last_event_ns: now,
        packets: [2, 1],
        version: 1,
        zone: ZoneId(1),
        owner: MemberId(owner),
        state: State::UdpReplied as u8,
        flags: SessionFlags(0),
        ..Session::default()
    };
    (key, session)
}

/// The first `max` rows of `table`, one per line.
pub fn show(table: &Table, max: usize) -> String {
    let mut out = String::new();
    for row in table.iter().take(max) {
        out.push_str(&format!("\n    {row}"));
    }
    if table.len() > max {
        out.push_str(&format!("\n    ... ({} more)", table.len() - max));
    }
    out
}

/// `count` short UDP flows from namespace `ns` to the echo server at `server`, one datagram
/// each answered by its echo (resent up to 3 times, 500 ms each). Each flow has a source
/// port that no recent flow from `ns` to `server` had ([`fresh_socket`]), so each is a new
/// session. Returns the source ports, in order. Fails if a flow got no echo.
pub fn udp_flows(ns: &str, server: SocketAddr, count: usize) -> Result<Vec<u16>, String> {
    let name = ns.to_owned();
    let run = run_in(ns, move || -> Result<Vec<u16>, String> {
        let mut ports = Vec::with_capacity(count);
        let mut buf = [0u8; 64];
        for i in 0..count {
            let (s, port) = fresh_socket(&name, server)?;
            s.connect(server).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .map_err(|e| e.to_string())?;
            let msg = format!("flow {i} from port {port}");
            let mut answered = false;
            for _ in 0..3 {
                s.send(msg.as_bytes())
                    .map_err(|e| format!("flow {i}: send: {e}"))?;
                if matches!(s.recv(&mut buf), Ok(n) if &buf[..n] == msg.as_bytes()) {
                    answered = true;
                    break;
                }
            }
            if !answered {
                return Err(format!(
                    "UDP flow {i} (port {port}) got no echo from {server}"
                ));
            }
            ports.push(port);
        }
        Ok(ports)
    });
    run.map_err(|e| e.to_string())?
}

/// How long a source port [`udp_flows`] used stays out of its draws: five times the default
/// timeout of an answered UDP session (120 s), after which the session it made is gone.
const PORT_MEMORY: Duration = Duration::from_secs(600);

/// A UDP socket bound to a port the kernel chose and that [`udp_flows`] did not use toward
/// `server` from namespace `ns` in this process within [`PORT_MEMORY`]. The kernel picks
/// ports at random and may hand a closed socket's port out again, which would make a "new"
/// flow an old session; a port seen before is held while the next is drawn (at most 64
/// draws).
fn fresh_socket(ns: &str, server: SocketAddr) -> Result<(UdpSocket, u16), String> {
    type Used = BTreeMap<(String, SocketAddr), BTreeMap<u16, Instant>>;
    static USED: Mutex<Used> = Mutex::new(BTreeMap::new());
    let mut all = USED.lock().unwrap_or_else(|e| e.into_inner());
    let used = all.entry((ns.to_owned(), server)).or_default();
    let now = Instant::now();
    used.retain(|_, at| now.duration_since(*at) < PORT_MEMORY);
    let mut held = Vec::new();
    for _ in 0..64 {
        let any: SocketAddr = (Ipv4Addr::UNSPECIFIED, 0).into();
        let s = UdpSocket::bind(any).map_err(|e| format!("bind: {e}"))?;
        let port = s.local_addr().map_err(|e| e.to_string())?.port();
        if let std::collections::btree_map::Entry::Vacant(e) = used.entry(port) {
            e.insert(now);
            return Ok((s, port));
        }
        held.push(s);
    }
    Err(format!(
        "no unused UDP source port toward {server} in {ns} after 64 draws ({} used in the last {PORT_MEMORY:?})",
        used.len()
    ))
}

/// The MAC address of `ifname` in the lab namespace `name` (short name: `fw1`, `client`).
pub fn mac_address(topo: &Topology, name: &str, ifname: &str) -> Result<[u8; 6], String> {
    let text = topo
        .ip(name, &["-o", "link", "show", ifname])
        .map_err(|e| e.to_string())?;
    let hex = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .ok_or_else(|| format!("no link/ether in `{}`", text.trim()))?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = hex.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("malformed MAC {hex}"));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|e| format!("MAC {hex}: {e}"))?;
    }
    Ok(mac)
}

/// UDP frames sent from the client namespace's `eth0` straight to a member's `in0` MAC with an
/// `AF_PACKET` socket: many distinct flows fast, each creating a session in that member's XDP
/// program as any datagram would. The destination should be the server (it discards them);
/// sources must be unused lab addresses on the client side.
pub struct UdpInjector {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub sources: Vec<Ipv4Addr>,
    /// Source ports, per source address.
    pub ports: std::ops::Range<u16>,
    pub dst: SocketAddrV4,
}

/// Frames sent back to back before a pause, so the veth and backlog queues never overflow.
const INJECT_BURST: usize = 64;

impl UdpInjector {
    /// Flows from the client (`eth0`) to member `k`'s `in0`.
    pub fn to_member(
        topo: &Topology,
        k: u8,
        sources: Vec<Ipv4Addr>,
        ports: std::ops::Range<u16>,
        dst: SocketAddrV4,
    ) -> Result<UdpInjector, String> {
        for a in &sources {
            if !hasync_agent::lab::netns::is_lab_address(IpAddr::V4(*a)) {
                return Err(format!("{a} is not a lab address"));
            }
        }
        if !hasync_agent::lab::netns::is_lab_address(IpAddr::V4(*dst.ip())) {
            return Err(format!("{dst} is not a lab address"));
        }
        Ok(UdpInjector {
            src_mac: mac_address(topo, "client", "eth0")?,
            dst_mac: mac_address(topo, &format!("fw{k}"), "in0")?,
            sources,
            ports,
            dst,
        })
    }

    /// Flows in all: sources × ports.
    pub fn flows(&self) -> usize {
        self.sources.len() * self.ports.len()
    }

    /// Sends one datagram per flow, within `limit`, from inside the client namespace `ns`.
    /// Returns the frames sent.
    pub fn send(&self, ns: &str, limit: Duration) -> Result<u64, String> {
        let frames: Vec<Vec<u8>> = self
            .sources
            .iter()
            .flat_map(|&src| {
                self.ports.clone().map(move |port| {
                    let mut f = Frame::udp(SocketAddr::from((src, port)), SocketAddr::V4(self.dst))
                        .payload(16)
                        .build();
                    f[0..6].copy_from_slice(&self.dst_mac);
                    f[6..12].copy_from_slice(&self.src_mac);
                    f
                })
            })
            .collect();
        let dst_mac = self.dst_mac;
        run_in(ns, move || send_raw("eth0", dst_mac, &frames, limit)).map_err(|e| e.to_string())?
    }
}

/// Sends `frames` on `ifname` of the calling thread's namespace with an `AF_PACKET` socket,
/// in bursts, for at most `limit`. Each frame leaves as it is: its Ethernet header names the
/// receiver.
pub fn send_raw(
    ifname: &str,
    dst_mac: [u8; 6],
    frames: &[Vec<u8>],
    limit: Duration,
) -> Result<u64, String> {
    let deadline = Instant::now() + limit;
    let addr = link_addr(ifname, dst_mac)?;
    let fd = crate::sockets::packet_socket(0).map_err(|e| format!("socket(AF_PACKET): {e}"))?;
    let mut sent = 0u64;
    for burst in frames.chunks(INJECT_BURST) {
        if Instant::now() >= deadline {
            return Err(format!(
                "only {sent} of {} frames sent within {limit:?}",
                frames.len()
            ));
        }
        for frame in burst {
            send_frame(&fd, &addr, frame, deadline)
                .map_err(|e| format!("sendto on {ifname}: {e}"))?;
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(sent)
}

/// The link-layer address of `dst_mac` through interface `ifname`, for IPv4 frames.
fn link_addr(ifname: &str, dst_mac: [u8; 6]) -> Result<libc::sockaddr_ll, String> {
    let c_name = std::ffi::CString::new(ifname).map_err(|e| e.to_string())?;
    // SAFETY: a valid NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(format!("no interface {ifname} here"));
    }
    // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    addr.sll_ifindex = index as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&dst_mac);
    Ok(addr)
}

/// Sends `frame` to `addr`, waiting a moment while the queue is full (until `deadline`).
fn send_frame(
    fd: &std::os::fd::OwnedFd,
    addr: &libc::sockaddr_ll,
    frame: &[u8],
    deadline: Instant,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    loop {
        // SAFETY: `frame` and `addr` are valid for the lengths given.
        let rc = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        // A full queue: give it a moment (bounded by the deadline).
        if e.raw_os_error() == Some(libc::ENOBUFS) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        return Err(e);
    }
}
