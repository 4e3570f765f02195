//! `cargo xtask bench sync [--json]`: session sync between two lab members, against raw batch
//! map operations measured in the same run.
//!
//! A two-member lab (namespaces `bsync<pid>-*`, see `hasync_agent::lab`) runs the release
//! `hasync` agent ($HASYNC_BIN, else built with `cargo build --release -p hasync-agent --bin
//! hasync`) with a 2^23-session table and one-hour UDP and ICMP timeouts. Every session is
//! created by fw1's own XDP program from a frame: a distinct UDP datagram (source
//! 198.18.0.20–220 except .100, source port from 1024 up) to a silent sink on the server. The
//! small and lag phases send real frames from the client's AF_PACKET socket to fw1's `in0` (a
//! static FDB entry keeps them off fw2's `in0`), which fw1 forwards to the server. The fill
//! runs the frames through fw1's attached program with BPF_PROG_TEST_RUN, ingress `in0` (same
//! program, maps, zone and events, twice the rate this host's veth path reaches); `--wire`
//! sends the fill as client frames too. fw1's agent streams the sessions to fw2. One run:
//! 1. 1,000 sessions, then each agent's peak RSS (VmHWM) as the small-table reference;
//! 2. replication lag at a fixed offered rate (20,000 sessions/s for 3 s): the p50/p99 that
//!    fw1's `show cluster statistics` reports for peer 2 (change queued → acknowledged, over
//!    its last 4,096 frames);
//! 3. replication throughput (the target's figure), in three rounds: fw2's agent is frozen
//!    (SIGSTOP) while fw1's program creates 200,000 sessions and fw1's agent queues their
//!    events as always; fw2 resumes and the rate is measured while the two agents stream and
//!    install the backlog with both CPUs to themselves, from 25 % installed to the last one
//!    (polled every 2 ms). Each round is paired with a baseline insert of the same keys, right
//!    before or after it (alternately); the ratio is the median of the rounds' ratios. On this
//!    2-CPU host the generator otherwise takes a CPU the agents need: phase 4 shows that
//!    figure;
//! 4. the table is filled to 1,000,000 sessions as fast as they can be created; its rate is
//!    the sessions created over the time from the first frame until fw2's statistics count the
//!    last one installed (end to end, generator included; fw2's table is then counted);
//! 5. full sync: fw2 is killed (SIGKILL), its pinned datapath removed, and restarted with an
//!    empty table; the time from the full sync's start to its end as fw2 reports them, polled
//!    every 10 ms;
//! 6. per phase, the agents' CPU seconds (utime + stime), what an idle full table costs them,
//!    and their peak RSS at 1k and at 1M;
//! 7. bytes on the sync link per replicated session in the lag, backlog and fill phases: fw1's
//!    authenticated frames to fw2 (length prefix and tag included, keepalives too) over the
//!    records fw1 sent (a session announced again after lost events counts again) and over
//!    the sessions fw2 installed. The bench's sessions are one-way UDP; for TCP, and for the 1.1
//!    layout against the current one, the encoder's figure for full frames is printed beside
//!    it (no lab: a record encoded [`MAX_RECORDS_PER_FRAME`] times, plus tag and prefix).
//!
//! Baselines: a BPF hash (the session table's type) of the same key, value and capacity,
//! created in this process and filled with the same number of entries by BPF_MAP_UPDATE_BATCH, then dumped whole by
//! BPF_MAP_LOOKUP_BATCH (8,192 per call), twice before the lab and twice after; the fastest
//! run of each is the baseline of the full sync (the strictest one). The backlog rounds'
//! baseline is a third hash of the same kind that holds what fw2's table holds: it takes each
//! round's keys by BPF_MAP_UPDATE_BATCH, timed from 25 % of them as the drain is, next to the
//! round, so a slow minute of the host weighs on both sides of that round's ratio. The
//! median round's rate over the fastest raw insert of 1M, the figure of the releases before,
//! is printed too.
//!
//! Targets: replication ≥ 0.6 × the paired raw insert rate; full sync ≤ 2 × (raw dump + raw insert);
//! each agent's peak RSS at 1M ≤ its peak at 1k + 64 MiB (and the restarted fw2's ≤ fw2's at
//! 1k + 64 MiB); at most 60 bytes on the sync link per replicated UDP session in every phase
//! (conntrackd: 80). A missed target is printed as such; the exit status is 0 unless the bench
//! itself failed.

use std::{
    io,
    mem::size_of,
    net::{Ipv4Addr, UdpSocket},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use hasync_agent::{
    control::{
        self,
        view::{CountersView, MembersView, PeerStatisticsView, SessionsView, StatisticsView},
        Request, SessionFilter,
    },
    datapath::{
        batch::{self, BatchCursor},
        monotonic_ns, BatchMap,
    },
    lab::{
        netns,
        topology::{test_prefix, SERVER_V4},
        ClusterOptions, LabCluster, Signal, Topology,
    },
    sync::{
        channel::FRAME_OVERHEAD,
        wire::{Message, Record, RecordLayout, MAX_RECORDS_PER_FRAME},
    },
};
use hasync_common::{
    flow::{IPPROTO_TCP, IPPROTO_UDP},
    tcp_window::track,
    Family, FlowKey, MemberId, Session, SessionFlags, State, ZoneId,
};
use hasync_tests::{
    build,
    interrupt::{catch_signals, check_stop},
    stats::{median, range},
};

/// Sessions in the table for the throughput, full-sync and RSS figures.
const SESSIONS: u64 = 1_000_000;
/// Sessions of the small-table phase (the RSS reference).
const SMALL: u64 = 1_000;
/// Sessions of the backlog phase: under the backlog's 262,144 keys, so it stays incremental.
const BACKLOG: u64 = 200_000;
/// Backlog rounds; the replication ratio is the median of theirs.
const DRAIN_ROUNDS: usize = 3;
/// The backlog rate counts from this share installed, so frames fw1 had in flight when fw2
/// froze (up to 64 frames of records encoded before the clock starts) do not flatter it.
const BACKLOG_FROM: f64 = 0.25;
/// How often the backlog phase polls fw2.
const BACKLOG_POLL: Duration = Duration::from_millis(2);
/// Offered rate and duration of the lag phase.
const LAG_RATE: u64 = 20_000;
const LAG_SECS: u64 = 3;
/// Session table capacity of the members and of the baseline map.
const CAPACITY: u32 = 1 << 23;
/// The bench's sessions are embryonic (one direction of UDP). A member's embryonic sessions
/// take at most half the table, shared with one replica part per member id
/// (`local.embryonic_capacity` ≤ capacity / 2 / 2 here): this is that most. The injector may
/// create every session on one CPU, so one CPU's part of the ring (this / CPUs) must hold them
/// all, or some would be evicted ([`check_embryonic_room`]).
const EMBRYONIC: u32 = CAPACITY / 4;
/// Entries per batch call of the baselines.
const RAW_CHUNK: usize = 8192;
/// Baseline runs before the lab and after it.
const RAW_RUNS: usize = 2;

const TARGET_REPLICATION: f64 = 0.6;
const TARGET_FULL_SYNC: f64 = 2.0;
const TARGET_RSS_GROWTH_MIB: f64 = 64.0;
/// Bytes on the sync link per replicated UDP session (conntrackd: 80).
const TARGET_WIRE_BYTES: f64 = 60.0;

/// Longest any single wait may take: a stuck agent fails the bench instead of hanging it.
const WAIT_LIMIT: Duration = Duration::from_secs(180);
/// How often replication progress is polled (fw2's statistics: atomics, no table walk).
const POLL: Duration = Duration::from_millis(10);
/// How long the agents are left alone with a full table, to see what an idle 1M costs.
const IDLE: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// Interruption: Ctrl-C ends every loop so the lab is cleaned up.

/// Sleeps `d` unless interrupted.
fn pause(d: Duration) -> Result<()> {
    check_stop()?;
    std::thread::sleep(d);
    check_stop()
}

/// Polls `f` every `every` until it returns `Some`, for at most [`WAIT_LIMIT`]; `what` names
/// the wait in the timeout error.
fn wait_for<T>(
    what: impl Fn() -> String,
    every: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {} s waiting for {}",
                WAIT_LIMIT.as_secs(),
                what()
            );
        }
        pause(every)?;
    }
}

// ---------------------------------------------------------------------------------------------
// The sessions: index → addresses, frames and keys.

/// Source hosts: 198.18.0.20–99 and .101–220 (not the members' .1–.16, not the client's .100).
const SRC_HOSTS: u64 = 200;
const FIRST_SPORT: u64 = 1024;
const MAX_SESSIONS: u64 = SRC_HOSTS * (65_536 - FIRST_SPORT);
/// The sink on the server: bound, never read, so datagrams are dropped without ICMP errors.
const SINK_PORT: u16 = 9;

/// The source of session `i`.
fn source(i: u64) -> (Ipv4Addr, u16) {
    let o = (i % SRC_HOSTS) as u8;
    let host = if o < 80 { 20 + o } else { 21 + o };
    let sport = u16::try_from(FIRST_SPORT + i / SRC_HOSTS).unwrap_or(u16::MAX);
    (Ipv4Addr::new(198, 18, 0, host), sport)
}

fn v4_words(a: Ipv4Addr) -> [u32; 4] {
    [u32::from_ne_bytes(a.octets()), 0, 0, 0]
}

/// The key fw1's XDP program gives session `i`.
fn key(i: u64) -> FlowKey {
    let (src, sport) = source(i);
    FlowKey::canonical(
        Family::V4,
        IPPROTO_UDP,
        v4_words(src),
        sport.to_be(),
        v4_words(SERVER_V4),
        SINK_PORT.to_be(),
    )
    .0
}

/// A value like the one fw1's XDP program writes for a new UDP session.
fn value(key: &FlowKey, now: u64) -> Session {
    let src_is_hi = key.addr_lo[0] == u32::from_ne_bytes(SERVER_V4.octets());
    Session {
        created_ns: now,
        last_seen_ns: now,
        last_event_ns: now,
        packets: [1, 0],
        bytes: [FRAME_LEN as u64, 0],
        version: 1,
        zone: ZoneId(1),
        flags: SessionFlags(if src_is_hi {
            SessionFlags::INITIATOR_HI
        } else {
            0
        }),
        owner: MemberId(1),
        state: State::UdpNew as u8,
        ..Session::default()
    }
}

/// Ethernet + IPv4 + UDP + 8 bytes of payload.
const FRAME_LEN: usize = 14 + 20 + 8 + 8;

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The frame of session `i` from `template` (addresses and MACs filled in, source left blank).
fn fill_frame(frame: &mut [u8; FRAME_LEN], template: &[u8; FRAME_LEN], i: u64) {
    let (src, sport) = source(i);
    *frame = *template;
    frame[26..30].copy_from_slice(&src.octets());
    let csum = ipv4_checksum(&frame[14..34]);
    frame[24..26].copy_from_slice(&csum.to_be_bytes());
    frame[34..36].copy_from_slice(&sport.to_be_bytes());
}

fn template(dst_mac: [u8; 6], src_mac: [u8; 6]) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + 8 + 8) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    ip[16..20].copy_from_slice(&SERVER_V4.octets());
    let udp = &mut f[34..42];
    udp[2..4].copy_from_slice(&SINK_PORT.to_be_bytes());
    udp[4..6].copy_from_slice(&16u16.to_be_bytes());
    // UDP checksum 0: none (allowed over IPv4).
    f[42..50].copy_from_slice(b"hasync!!");
    f
}

// ---------------------------------------------------------------------------------------------
// Baselines: the same map type, key, value and capacity, no network.

#[derive(Clone, Copy, Debug)]
struct Raw {
    insert: Duration,
    dump: Duration,
}

/// The baselines' entries: the sessions `keys` names, as the bench creates them.
fn entries(keys: std::ops::Range<u64>) -> (Vec<FlowKey>, Vec<Session>) {
    let now = monotonic_ns();
    let keys: Vec<FlowKey> = keys.map(key).collect();
    let values = keys.iter().map(|k| value(k, now)).collect();
    (keys, values)
}

/// Batch-inserts `keys` and `values` into `map`, [`RAW_CHUNK`] at a time; how long it took.
fn insert_timed(
    map: &BatchMap<'_, FlowKey, Session>,
    keys: &[FlowKey],
    values: &[Session],
) -> Result<Duration> {
    let t = Instant::now();
    for (k, v) in keys.chunks(RAW_CHUNK).zip(values.chunks(RAW_CHUNK)) {
        map.update_batch(k, v, 0)?;
    }
    Ok(t.elapsed())
}

fn raw_once(keys: &[FlowKey], values: &[Session]) -> Result<Raw> {
    let fd = batch::create_map::<FlowKey, Session>(batch::BPF_MAP_TYPE_HASH, CAPACITY)
        .context("BPF_MAP_CREATE of the baseline hash")?;
    let map = BatchMap::<FlowKey, Session>::new(fd.as_fd())?;
    let insert = insert_timed(&map, keys, values)?;
    let mut cursor = BatchCursor::new();
    let mut kb = Vec::with_capacity(RAW_CHUNK);
    let mut vb = Vec::with_capacity(RAW_CHUNK);
    let mut seen = 0;
    let t = Instant::now();
    loop {
        let more = map.lookup_batch(&mut cursor, &mut kb, &mut vb, RAW_CHUNK as u32)?;
        seen += kb.len();
        if !more {
            break;
        }
    }
    let dump = t.elapsed();
    ensure!(
        seen == keys.len(),
        "the baseline dump saw {seen} entries of {} inserted",
        keys.len()
    );
    Ok(Raw { insert, dump })
}

/// `RAW_RUNS` baseline runs of `n` entries, logged to stderr.
fn raw_runs(n: u64, when: &str) -> Result<Vec<Raw>> {
    let (keys, values) = entries(0..n);
    let mut runs = Vec::new();
    for _ in 0..RAW_RUNS {
        check_stop()?;
        let r = raw_once(&keys, &values)?;
        eprintln!(
            "baseline ({when}): batch insert {n} in {:.3} s, batch dump in {:.3} s",
            r.insert.as_secs_f64(),
            r.dump.as_secs_f64()
        );
        runs.push(r);
    }
    Ok(runs)
}

/// The baseline paired with the backlog rounds: a hash like the raw runs' that takes, in
/// each round, the very keys that round's backlog created, right before or after the drain,
/// so a slow minute of the host falls on both sides of the round's ratio. It holds the
/// sessions of the lab's earlier phases too (inserted untimed), as fw2's table does.
struct PairedBaseline {
    fd: OwnedFd,
}

impl PairedBaseline {
    fn open() -> Result<PairedBaseline> {
        let fd = batch::create_map::<FlowKey, Session>(batch::BPF_MAP_TYPE_HASH, CAPACITY)
            .context("BPF_MAP_CREATE of the paired baseline hash")?;
        Ok(PairedBaseline { fd })
    }

    /// Inserts the sessions `keys` names; only the batch updates are timed.
    fn insert(&self, keys: std::ops::Range<u64>) -> Result<Duration> {
        let map = BatchMap::<FlowKey, Session>::new(self.fd.as_fd())?;
        let (keys, values) = entries(keys);
        insert_timed(&map, &keys, &values)
    }

    /// Inserts `n` keys from `first` and returns the rate measured as a drain's is: over
    /// the keys past [`BACKLOG_FROM`] of them (the first part inserted untimed).
    fn steady_rate(&self, first: u64, n: u64) -> Result<f64> {
        let from = first + (n as f64 * BACKLOG_FROM) as u64;
        self.insert(first..from)?;
        let took = self.insert(from..first + n)?;
        ensure!(
            !took.is_zero() && from < first + n,
            "the paired baseline's {n} inserts took no measurable time"
        );
        Ok((first + n - from) as f64 / took.as_secs_f64())
    }
}

// ---------------------------------------------------------------------------------------------
// Bytes per session on the sync link, as the encoder makes them (no lab).

/// An established TCP session over IPv4 as fw1 would announce it: a minute old, a few kB each
/// way, with its TCP flags and sequence state.
fn tcp_record(now: u64) -> Record {
    let (src, sport) = source(7);
    let (key, _) = FlowKey::canonical(
        Family::V4,
        IPPROTO_TCP,
        v4_words(src),
        sport.to_be(),
        v4_words(SERVER_V4),
        443u16.to_be(),
    );
    let s = Session {
        created_ns: now - 60_000_000_000,
        last_seen_ns: now - 40_000_000,
        packets: [14, 12],
        bytes: [2_300, 11_800],
        version: 6,
        tcp_flags: [0x1b, 0x1b],
        state: State::Established as u8,
        tcp_track: [
            track::KNOWN | track::WSCALE | 7,
            track::KNOWN | track::WSCALE | 9,
        ],
        max_win: [502, 509],
        seq_end: [0x6b3a_09f1, 0x1c0f_77e2],
        ..value(&key, now)
    };
    Record::upsert(key, &s, now)
}

/// Bytes per record on the sync link when frames are full: a frame's plaintext, Noise tag and
/// length prefix over the records it carries.
fn encoded_bytes(rec: Record, layout: RecordLayout) -> Result<f64> {
    let frame = Message::Sessions {
        seq: 1,
        bulk: false,
        records: vec![rec; MAX_RECORDS_PER_FRAME],
    };
    let mut bytes = Vec::new();
    frame.encode_as(&mut bytes, layout)?;
    Ok((bytes.len() + FRAME_OVERHEAD) as f64 / MAX_RECORDS_PER_FRAME as f64)
}

/// The encoder's bytes per session, in the 1.1 layout and the current one.
#[derive(Clone, Copy, Debug)]
struct Encoded {
    udp: [f64; 2],
    tcp: [f64; 2],
}

impl Encoded {
    fn measure() -> Result<Encoded> {
        let now = 1_000_000_000_000;
        let udp = Record::upsert(key(7), &value(&key(7), now - 5_000_000), now);
        let tcp = tcp_record(now);
        let both = |r| -> Result<[f64; 2]> {
            Ok([
                encoded_bytes(r, RecordLayout::V1_1)?,
                encoded_bytes(r, RecordLayout::CURRENT)?,
            ])
        };
        Ok(Encoded {
            udp: both(udp)?,
            tcp: both(tcp)?,
        })
    }

    fn json(&self) -> serde_json::Value {
        let one = |v: [f64; 2]| serde_json::json!({ "v1_1": v[0], "current": v[1], "ratio": v[1] / v[0] });
        serde_json::json!({ "udp": one(self.udp), "tcp": one(self.tcp) })
    }
}

// ---------------------------------------------------------------------------------------------
// The agents' processes.

#[derive(Clone, Copy, Debug, Default)]
struct ProcSample {
    cpu_s: f64,
    hwm_mib: f64,
}

fn proc_sample(pid: u32) -> Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which may hold spaces: state is field 3, utime 14,
    // stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("/proc/{pid}/stat has no command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| anyhow!("/proc/{pid}/stat field {n} unreadable"))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu_s = (field(14)? + field(15)?) as f64 / hz;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("/proc/{pid}/status has no VmHWM"))?;
    Ok(ProcSample {
        cpu_s,
        hwm_mib: hwm_kib as f64 / 1024.0,
    })
}

// ---------------------------------------------------------------------------------------------
// The client's raw socket.

/// Frames per sendmmsg call.
const SEND_BATCH: usize = 256;

/// An AF_PACKET socket on the client's `eth0`, sending session frames to fw1's `in0`.
struct Injector {
    fd: OwnedFd,
    ifindex: i32,
    dst_mac: [u8; 6],
    template: [u8; FRAME_LEN],
}

impl Injector {
    fn open(client_ns: &str, dst_mac: [u8; 6], src_mac: [u8; 6]) -> Result<Injector> {
        let (fd, ifindex) = netns::run_in(client_ns, || -> io::Result<(OwnedFd, i32)> {
            // Protocol 0: this socket only sends, it receives nothing.
            let fd = hasync_tests::sockets::packet_socket(0)?;
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
            if ifindex == 0 {
                return Err(io::Error::last_os_error());
            }
            let one: libc::c_int = 1;
            // SAFETY: an int option of the size passed.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_QDISC_BYPASS,
                    std::ptr::from_ref(&one).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok((fd, ifindex as i32))
        })?
        .context("opening an AF_PACKET socket on the client's eth0")?;
        Ok(Injector {
            fd,
            ifindex,
            dst_mac,
            template: template(dst_mac, src_mac),
        })
    }

    /// Sends the frames of sessions `first..first + count`, at `rate` frames/s if given, else
    /// as fast as the socket takes them. Bounded by [`WAIT_LIMIT`].
    fn send(&self, first: u64, count: u64, rate: Option<u64>) -> Result<()> {
        // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&self.dst_mac);
        let mut frames = vec![[0u8; FRAME_LEN]; SEND_BATCH];
        let start = Instant::now();
        let deadline = start + WAIT_LIMIT;
        let mut sent = 0u64;
        while sent < count {
            check_stop()?;
            ensure!(
                Instant::now() < deadline,
                "sending {count} frames took more than {} s",
                WAIT_LIMIT.as_secs()
            );
            let room = (count - sent).min(SEND_BATCH as u64);
            let n = match rate {
                Some(rate) => {
                    let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                    if due <= sent {
                        std::thread::sleep(Duration::from_micros(500));
                        continue;
                    }
                    (due - sent).min(room)
                }
                None => room,
            } as usize;
            for (j, frame) in frames[..n].iter_mut().enumerate() {
                fill_frame(frame, &self.template, first + sent + j as u64);
            }
            self.send_frames(&mut frames[..n], &addr, deadline)?;
            sent += n as u64;
        }
        Ok(())
    }

    fn send_frames(
        &self,
        frames: &mut [[u8; FRAME_LEN]],
        addr: &libc::sockaddr_ll,
        deadline: Instant,
    ) -> Result<()> {
        let mut iov: Vec<libc::iovec> = frames
            .iter_mut()
            .map(|f| libc::iovec {
                iov_base: f.as_mut_ptr().cast(),
                iov_len: FRAME_LEN,
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: an all-zero mmsghdr is valid; the fields are set below.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = std::ptr::from_ref(addr).cast_mut().cast();
                m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                m.msg_hdr.msg_iov = v;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let mut done = 0;
        while done < msgs.len() {
            let rest = &mut msgs[done..];
            // SAFETY: every message points at a live frame buffer and at `addr`, all of which
            // outlive the call.
            let rc = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    rest.as_mut_ptr(),
                    rest.len() as libc::c_uint,
                    0,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                let busy = matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN));
                if busy && Instant::now() < deadline {
                    check_stop()?;
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                return Err(e).context("sendmmsg on the client's AF_PACKET socket");
            }
            done += rc as usize;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// BPF_PROG_TEST_RUN of fw1's own XDP program.

/// fw1's attached XDP program, run on session frames with BPF_PROG_TEST_RUN from a thread in
/// fw1's namespace that claims `in0` as the ingress interface: the same program, maps, zone
/// and events as for traffic on the wire, without the client → bridge → veth path.
struct TestRunner {
    prog: OwnedFd,
    ifindex: u32,
    template: [u8; FRAME_LEN],
}

/// `struct xdp_md`, the context a test run may pass.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// `union bpf_attr`'s `test` member.
#[repr(C)]
#[derive(Default)]
struct TestAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

impl TestRunner {
    fn open(topo: &Topology, template: [u8; FRAME_LEN]) -> Result<TestRunner> {
        let json = topo.ip("fw1", &["-j", "link", "show", "in0"])?;
        let v: serde_json::Value = serde_json::from_str(&json).context("`ip -j link` output")?;
        let id = v[0]["xdp"]["prog"]["id"]
            .as_u64()
            .ok_or_else(|| anyhow!("no XDP program on fw1's in0: {json}"))?;
        let ifindex = v[0]["ifindex"]
            .as_u64()
            .ok_or_else(|| anyhow!("no ifindex for fw1's in0: {json}"))?;
        #[repr(C)]
        struct GetFdAttr {
            prog_id: u32,
            next_id: u32,
            open_flags: u32,
        }
        const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
        let mut attr = GetFdAttr {
            prog_id: id as u32,
            next_id: 0,
            open_flags: 0,
        };
        // SAFETY: a valid attr of the size passed, holding no pointers.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_GET_FD_BY_ID,
                std::ptr::from_mut(&mut attr),
                size_of::<GetFdAttr>() as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("BPF_PROG_GET_FD_BY_ID {id} (fw1's XDP program)"));
        }
        Ok(TestRunner {
            // SAFETY: a fresh fd that nothing else owns.
            prog: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            ifindex: ifindex as u32,
            template,
        })
    }

    /// Runs the frames of sessions `first..first + count` through the program, at `rate`/s
    /// if given. Must run on a thread in fw1's namespace.
    fn run(&self, first: u64, count: u64, rate: Option<u64>) -> Result<()> {
        const BPF_PROG_TEST_RUN: libc::c_long = 10;
        const XDP_PASS: u32 = 2;
        let mut frame = [0u8; FRAME_LEN];
        let mut ctx = XdpMd {
            data_end: FRAME_LEN as u32,
            ingress_ifindex: self.ifindex,
            ..XdpMd::default()
        };
        let start = Instant::now();
        let deadline = start + WAIT_LIMIT;
        for j in 0..count {
            if j % 1024 == 0 {
                check_stop()?;
                ensure!(
                    Instant::now() < deadline,
                    "test runs took more than {} s",
                    WAIT_LIMIT.as_secs()
                );
            }
            if let Some(rate) = rate {
                while ((start.elapsed().as_secs_f64() * rate as f64) as u64) <= j {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            fill_frame(&mut frame, &self.template, first + j);
            let mut attr = TestAttr {
                prog_fd: self.prog.as_raw_fd() as u32,
                data_size_in: FRAME_LEN as u32,
                data_in: frame.as_ptr() as u64,
                repeat: 1,
                ctx_size_in: size_of::<XdpMd>() as u32,
                ctx_in: std::ptr::from_mut(&mut ctx) as u64,
                ..TestAttr::default()
            };
            // SAFETY: the attr points at the frame and context, both alive for the call; no
            // output buffers are passed.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_PROG_TEST_RUN,
                    std::ptr::from_mut(&mut attr),
                    size_of::<TestAttr>() as libc::c_uint,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error())
                    .context("BPF_PROG_TEST_RUN of fw1's program");
            }
            ensure!(
                attr.retval == XDP_PASS,
                "fw1's program returned {} for a new UDP session",
                attr.retval
            );
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The lab.

struct Lab {
    // Sockets and the program fd first: they close before the lab's namespaces go.
    injector: Injector,
    runner: TestRunner,
    _sink: UdpSocket,
    cluster: LabCluster,
    /// Index of the next session: every frame is a new session.
    next: u64,
}

/// How sessions reach fw1's XDP program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inject {
    /// Frames from the client's AF_PACKET socket, through the switch to fw1's in0.
    Wire,
    /// BPF_PROG_TEST_RUN of fw1's attached program, ingress in0.
    TestRun,
}

impl Inject {
    fn name(self) -> &'static str {
        match self {
            Inject::Wire => "client frames",
            Inject::TestRun => "BPF_PROG_TEST_RUN",
        }
    }
}

/// The MAC address of `ifname` in lab namespace `ns` (short name).
fn mac(topo: &Topology, ns: &str, ifname: &str) -> Result<[u8; 6]> {
    let json = topo.ip(ns, &["-j", "link", "show", ifname])?;
    let v: serde_json::Value = serde_json::from_str(&json).context("`ip -j link` output")?;
    let text = v[0]["address"]
        .as_str()
        .ok_or_else(|| anyhow!("no MAC address for {ifname} in {ns}: {json}"))?;
    let mut out = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    ensure!(parts.len() == 6, "MAC address {text:?} of {ifname} in {ns}");
    for (o, p) in out.iter_mut().zip(parts) {
        *o = u8::from_str_radix(p, 16).with_context(|| format!("MAC address {text:?}"))?;
    }
    Ok(out)
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The `hasync` executable: $HASYNC_BIN, else built in release by cargo.
fn hasync_binary() -> Result<PathBuf> {
    eprintln!("building the agent: cargo build --release -p hasync-agent --bin hasync");
    build::hasync(build::Profile::Release).map_err(|e| anyhow!(e))
}

/// The answer of member `k` to `req`, as JSON.
fn ask(cluster: &LabCluster, k: u8, req: &Request) -> Result<serde_json::Value> {
    let resp = control::request(&cluster.socket_path(k), req)
        .with_context(|| format!("asking fw{k} for {}", req.name()))?;
    if !resp.ok {
        bail!(
            "fw{k} refused {}: {}",
            req.name(),
            resp.error.unwrap_or_default()
        );
    }
    Ok(resp.view()?)
}

impl Lab {
    fn start(binary: &std::path::Path) -> Result<Lab> {
        let prefix = test_prefix("bsync")?;
        let topo = Topology::create(&prefix, 2).context("creating the lab's namespaces")?;
        let options = ClusterOptions {
            session_capacity: CAPACITY,
            embryonic_capacity: Some(EMBRYONIC),
            timeouts: [("udp-new", 3600), ("icmp-echo", 3600)]
                .into_iter()
                .map(|(s, t)| (s.to_owned(), t))
                .collect(),
            ..ClusterOptions::default()
        };
        let cluster = LabCluster::new(topo, binary, options).context("writing the lab")?;
        let topo = cluster.topology();
        let fw1_in = mac(topo, "fw1", "in0")?;
        let client = mac(topo, "client", "eth0")?;
        // The switch learns fw1's in0 only when fw1 sends; a static entry keeps the flood
        // from reaching fw2's in0 (where its XDP would create sessions of its own).
        let mut fdb = netns::command_in(topo.hasw(), "bridge")?;
        fdb.args([
            "fdb",
            "replace",
            &mac_text(fw1_in),
            "dev",
            "fw1-in",
            "master",
            "static",
        ]);
        let out = fdb.output().context("running `bridge fdb replace`")?;
        ensure!(
            out.status.success(),
            "`bridge fdb replace` in {} failed: {}",
            topo.hasw(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        // Where the host has br_netfilter loaded, bridged frames go through the iptables
        // hooks: a cost of this host's setup, not of hasync, which would slow the client.
        if std::path::Path::new("/proc/sys/net/bridge").exists() {
            for family in ["iptables", "ip6tables", "arptables"] {
                let key = format!("net.bridge.bridge-nf-call-{family}");
                netns::sysctl(topo.hasw(), &key, "0")
                    .with_context(|| format!("{key} = 0 in {}", topo.hasw()))?;
            }
        }
        let sink = netns::run_in(topo.server(), || {
            UdpSocket::bind((SERVER_V4, SINK_PORT)).and_then(|s| {
                s.set_nonblocking(true)?;
                Ok(s)
            })
        })?
        .context("binding the sink on the server")?;
        let injector = Injector::open(topo.client(), fw1_in, client)?;
        cluster.start_all().context("starting the agents")?;
        for k in [1, 2] {
            cluster.wait_ready(k, Duration::from_secs(30))?;
        }
        let runner = TestRunner::open(cluster.topology(), template(fw1_in, client))?;
        let lab = Lab {
            injector,
            runner,
            _sink: sink,
            cluster,
            next: 0,
        };
        lab.wait_active()?;
        Ok(lab)
    }

    /// Waits until both members are active and linked on HA4, and fw2's full sync from fw1
    /// has ended.
    fn wait_active(&self) -> Result<()> {
        wait_for(
            || format!("both members to be active\n{}", self.log_tails()),
            Duration::from_millis(50),
            || {
                for k in [1, 2] {
                    let m: MembersView =
                        serde_json::from_value(ask(&self.cluster, k, &Request::ShowMembers {})?)?;
                    let linked = m
                        .members
                        .iter()
                        .all(|v| v.state == "active" && (v.id == k || v.ha4 == "up"));
                    if !linked {
                        return Ok(None);
                    }
                }
                let synced = self.peer_stats(2, 1)?.full_syncs.received.count > 0;
                Ok(synced.then_some(()))
            },
        )
    }

    fn log_tails(&self) -> String {
        [1, 2]
            .iter()
            .map(|&k| format!("fw{k}.log:\n{}", self.cluster.log_tail(k, 15)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn pid(&self, k: u8) -> Result<u32> {
        self.cluster.agent_pid(k).ok_or_else(|| {
            anyhow!(
                "the agent of fw{k} is not running; its log:\n{}",
                self.cluster.log_tail(k, 20)
            )
        })
    }

    fn sample(&self, k: u8) -> Result<ProcSample> {
        proc_sample(self.pid(k)?)
    }

    /// Member `k`'s statistics about `peer`.
    fn peer_stats(&self, k: u8, peer: u8) -> Result<PeerStatisticsView> {
        let s: StatisticsView =
            serde_json::from_value(ask(&self.cluster, k, &Request::ShowStatistics {})?)?;
        s.peers
            .into_iter()
            .find(|p| p.id == peer)
            .ok_or_else(|| anyhow!("fw{k}'s statistics list no peer {peer}"))
    }

    fn counter(&self, k: u8, name: &str) -> Result<u64> {
        let c: CountersView = serde_json::from_value(ask(
            &self.cluster,
            k,
            &Request::ShowCounters {
                prefix: Some(name.to_owned()),
            },
        )?)?;
        c.counters
            .get(name)
            .copied()
            .ok_or_else(|| anyhow!("fw{k} has no counter {name}"))
    }

    /// Member `k`'s session table, counted (one walk of the table).
    fn count(&self, k: u8) -> Result<SessionsView> {
        Ok(serde_json::from_value(ask(
            &self.cluster,
            k,
            &Request::ShowSessions {
                count_only: true,
                filter: SessionFilter::default(),
                offset: 0,
                limit: None,
            },
        )?)?)
    }

    /// What fw1 sent fw2 and fw2 installed, as counters to take differences of.
    fn sync_counters(&self) -> Result<SyncCounters> {
        let fw1 = self.peer_stats(1, 2)?;
        let fw2 = self.peer_stats(2, 1)?;
        Ok(SyncCounters {
            creates: self.counter(1, "session-creates")?,
            ringbuf_full: self.counter(1, "ringbuf-full")?,
            records_sent: fw1.links.values().map(|l| l.records_sent).sum(),
            bytes_sent: fw1.links.values().map(|l| l.bytes_sent).sum(),
            frames_sent: fw1.links.values().map(|l| l.frames_sent).sum(),
            frames_acked: fw1.links.values().map(|l| l.acks_received).sum(),
            full_syncs_sent: fw1.full_syncs.sent.count,
            resends: fw1.resends,
            installed: fw2.records_installed,
            kept: fw2.records_kept,
        })
    }

    /// Creates `target` new sessions on fw1 with frames from the client (at `rate`/s, or as
    /// fast as it sends), then waits until fw2 has installed every one.
    fn replicate(&mut self, how: Inject, target: u64, rate: Option<u64>) -> Result<Replication> {
        let before = self.sync_counters()?;
        let start = Instant::now();
        self.inject(how, target, rate)?;
        // Top up for frames lost on the way (none expected: the socket's sends are processed
        // before sendmmsg returns), as counted by fw1's session-creates.
        let mut created = 0;
        for _ in 0..5 {
            created = self.settled_creates(before.creates)?;
            if created >= target {
                break;
            }
            self.inject(how, target - created, None)?;
        }
        let sent_for = start.elapsed();
        let at_send_end = self.sync_counters()?;
        let installed = wait_for(
            || {
                format!(
                    "fw2 to install {created} sessions from fw1 (installed so far: {:?})",
                    self.sync_counters()
                        .map(|c| c.installed.saturating_sub(before.installed))
                )
            },
            POLL,
            || {
                let c = self.peer_stats(2, 1)?.records_installed - before.installed;
                Ok((c >= created).then_some(c))
            },
        )?;
        let took = start.elapsed();
        let after = self.sync_counters()?;
        Ok(Replication {
            how,
            created,
            installed,
            sent_for,
            took,
            backlog_at_send_end: created.saturating_sub(at_send_end.installed - before.installed),
            delta: after.minus(&before),
        })
    }

    /// Replication throughput with the generator out of the way: fw2's agent is frozen
    /// (SIGSTOP) while fw1's program creates `n` sessions and fw1's agent takes their events
    /// into its backlog as always; then fw2 resumes and both agents stream and install the
    /// backlog, with the two CPUs to themselves. The rate counts from the poll that first
    /// sees [`BACKLOG_FROM`] of them installed to the poll that sees the last.
    fn drain(&mut self, n: u64) -> Result<Drain> {
        let before = self.sync_counters()?;
        self.cluster.kill_agent(2, Signal::Stop)?;
        let frozen_at = Instant::now();
        let created = self
            .inject(Inject::TestRun, n, None)
            .and_then(|()| self.settled_creates(before.creates));
        // Resume fw2 whatever happened, before anything asks it something.
        let resumed = self.cluster.kill_agent(2, Signal::Cont);
        let frozen = frozen_at.elapsed();
        let created = created?;
        resumed?;
        let cpu_from = [self.sample(1)?.cpu_s, self.sample(2)?.cpu_s];
        let start = Instant::now();
        let from = (created as f64 * BACKLOG_FROM) as u64;
        let mut first: Option<(Instant, u64)> = None;
        let (end, last) = wait_for(
            || {
                format!(
                    "fw2 to install the backlog of {created} sessions\n{}",
                    self.log_tails()
                )
            },
            BACKLOG_POLL,
            || {
                let c = self.peer_stats(2, 1)?.records_installed - before.installed;
                let now = Instant::now();
                if first.is_none() && c >= from {
                    first = Some((now, c));
                }
                Ok((c >= created).then_some((now, c)))
            },
        )?;
        let (t0, c0) = first.unwrap_or((start, 0));
        ensure!(
            last > c0 && end > t0,
            "fw2 installed the backlog of {created} sessions between two polls: no steady rate to measure"
        );
        let cpu = [
            self.sample(1)?.cpu_s - cpu_from[0],
            self.sample(2)?.cpu_s - cpu_from[1],
        ];
        let after = self.sync_counters()?;
        Ok(Drain {
            cpu,
            created,
            frozen,
            took: end.duration_since(start),
            steady_sessions: last - c0,
            steady: end.duration_since(t0),
            delta: after.minus(&before),
        })
    }

    /// A backlog round: [`Lab::drain`] of [`BACKLOG`] sessions and `paired`'s insert of the
    /// same keys, the baseline first if `raw_first`.
    fn drain_round(&mut self, paired: &PairedBaseline, raw_first: bool) -> Result<DrainRound> {
        let first = self.next;
        let mut raw_rate = None;
        if raw_first {
            raw_rate = Some(paired.steady_rate(first, BACKLOG)?);
        }
        let drain = self.drain(BACKLOG)?;
        let raw_rate = match raw_rate {
            Some(r) => r,
            None => paired.steady_rate(first, BACKLOG)?,
        };
        Ok(DrainRound {
            drain,
            raw_rate,
            raw_first,
        })
    }

    /// Creates `count` new sessions on fw1, `how`.
    fn inject(&mut self, how: Inject, count: u64, rate: Option<u64>) -> Result<()> {
        ensure!(
            self.next + count <= MAX_SESSIONS,
            "more than {MAX_SESSIONS} sessions asked of the injector"
        );
        let first = self.next;
        self.next += count;
        match how {
            Inject::Wire => self.injector.send(first, count, rate),
            Inject::TestRun => {
                let runner = &self.runner;
                netns::run_in(self.cluster.topology().fw(1), || {
                    runner.run(first, count, rate)
                })?
            }
        }
    }

    /// fw1's session-creates since `base`, once two readings 30 ms apart agree.
    fn settled_creates(&self, base: u64) -> Result<u64> {
        let mut last = self.counter(1, "session-creates")?;
        wait_for(
            || "fw1's session-creates to settle".to_owned(),
            Duration::from_millis(30),
            || {
                let now = self.counter(1, "session-creates")?;
                let settled = now == last;
                last = now;
                Ok(settled.then_some(now - base))
            },
        )
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct SyncCounters {
    creates: u64,
    ringbuf_full: u64,
    records_sent: u64,
    /// Bytes of fw1's authenticated frames to fw2 (length prefixes included), all links.
    bytes_sent: u64,
    frames_sent: u64,
    frames_acked: u64,
    full_syncs_sent: u64,
    resends: u64,
    installed: u64,
    kept: u64,
}

impl SyncCounters {
    /// Bytes on the sync link per session fw2 installed.
    fn wire_bytes_per_session(&self) -> f64 {
        self.bytes_sent as f64 / self.installed.max(1) as f64
    }

    /// Bytes on the sync link per record fw1 sent: per session replicated, counting a
    /// session announced again (after lost events: `ringbuf-full`) once more.
    fn wire_bytes_per_record(&self) -> f64 {
        self.bytes_sent as f64 / self.records_sent.max(1) as f64
    }

    fn minus(&self, b: &SyncCounters) -> SyncCounters {
        SyncCounters {
            creates: self.creates - b.creates,
            ringbuf_full: self.ringbuf_full - b.ringbuf_full,
            records_sent: self.records_sent - b.records_sent,
            bytes_sent: self.bytes_sent - b.bytes_sent,
            frames_sent: self.frames_sent - b.frames_sent,
            frames_acked: self.frames_acked - b.frames_acked,
            full_syncs_sent: self.full_syncs_sent - b.full_syncs_sent,
            resends: self.resends - b.resends,
            installed: self.installed - b.installed,
            kept: self.kept - b.kept,
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "fw1_session_creates": self.creates,
            "fw1_ringbuf_full": self.ringbuf_full,
            "fw1_records_sent": self.records_sent,
            "fw1_bytes_sent": self.bytes_sent,
            "fw1_frames_sent": self.frames_sent,
            "wire_bytes_per_session": self.wire_bytes_per_session(),
            "wire_bytes_per_record": self.wire_bytes_per_record(),
            "fw1_frames_acked": self.frames_acked,
            "fw1_full_syncs_sent": self.full_syncs_sent,
            "fw1_resends": self.resends,
            "fw2_installed": self.installed,
            "fw2_kept": self.kept,
        })
    }
}

#[derive(Clone, Copy, Debug)]
struct Replication {
    how: Inject,
    created: u64,
    installed: u64,
    /// From the first frame to the last (top-ups included).
    sent_for: Duration,
    /// From the first frame until fw2 had installed them all.
    took: Duration,
    /// Sessions created on fw1 but not yet installed on fw2 when the client stopped.
    backlog_at_send_end: u64,
    delta: SyncCounters,
}

impl Replication {
    fn rate(&self) -> f64 {
        self.created as f64 / self.took.as_secs_f64()
    }

    fn offered(&self) -> f64 {
        self.created as f64 / self.sent_for.as_secs_f64()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "created_by": self.how.name(),
            "sessions": self.created,
            "installed_on_fw2": self.installed,
            "seconds": self.took.as_secs_f64(),
            "sessions_per_s": self.rate(),
            "send_seconds": self.sent_for.as_secs_f64(),
            "offered_per_s": self.offered(),
            "backlog_at_send_end": self.backlog_at_send_end,
            "counters": self.delta.json(),
        })
    }
}

/// One backlog round: the drain and the paired baseline's insert of the same keys.
struct DrainRound {
    drain: Drain,
    /// The paired baseline's rate (see [`PairedBaseline::steady_rate`]).
    raw_rate: f64,
    /// The baseline ran before the drain (the rounds alternate).
    raw_first: bool,
}

impl DrainRound {
    fn ratio(&self) -> f64 {
        self.drain.rate() / self.raw_rate
    }

    fn json(&self) -> serde_json::Value {
        let mut v = self.drain.json();
        v["paired_raw_insert_per_s"] = self.raw_rate.into();
        v["paired_raw_first"] = self.raw_first.into();
        v["ratio"] = self.ratio().into();
        v
    }
}

/// Replication from a backlog: see [`Lab::drain`].
#[derive(Clone, Copy, Debug)]
struct Drain {
    created: u64,
    /// How long fw2 was frozen while fw1 created and queued the sessions.
    frozen: Duration,
    /// From fw2's resumption until it had installed them all.
    took: Duration,
    /// Installed between the first poll past [`BACKLOG_FROM`] and the end, and how long that
    /// took: the steady rate.
    steady_sessions: u64,
    steady: Duration,
    /// CPU seconds of fw1's and fw2's agents from the resumption to the end: against `took`,
    /// how much of the drain the agents spent running.
    cpu: [f64; 2],
    delta: SyncCounters,
}

impl Drain {
    fn rate(&self) -> f64 {
        self.steady_sessions as f64 / self.steady.as_secs_f64()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "created_by": Inject::TestRun.name(),
            "sessions": self.created,
            "fw2_frozen_s": self.frozen.as_secs_f64(),
            "seconds_from_resume": self.took.as_secs_f64(),
            "steady_sessions": self.steady_sessions,
            "steady_seconds": self.steady.as_secs_f64(),
            "sessions_per_s": self.rate(),
            "agents_cpu_s": { "fw1": r2(self.cpu[0]), "fw2": r2(self.cpu[1]) },
            "counters": self.delta.json(),
        })
    }
}

#[derive(Clone, Copy, Debug)]
struct FullSync {
    sessions: u64,
    /// From the full sync's start to its end, as polled from fw2's statistics.
    took: Duration,
    /// From fw2's restart to the end of its full sync.
    from_restart: Duration,
    /// The agents' own figures: fw2's receive and fw1's send durations.
    fw2_received_ms: Option<u64>,
    fw1_sent_ms: Option<u64>,
    records: Option<u64>,
    fw2_table: u64,
}

/// CPU seconds of both agents per phase.
#[derive(Clone, Debug, Default)]
struct Cpu {
    phases: Vec<(&'static str, f64, f64)>,
}

struct Figures {
    raw: Raw,
    raw_runs: Vec<Raw>,
    small: Replication,
    lag: Replication,
    lag_p50_ms: Option<f64>,
    lag_p99_ms: Option<f64>,
    lag_frames_in_window: u64,
    drains: Vec<DrainRound>,
    fill: Replication,
    fw1_table: u64,
    full: FullSync,
    hwm_1k: [f64; 2],
    hwm_1m: [f64; 2],
    /// fw2 after its restart and the full sync of 1M.
    hwm_rejoined: f64,
    cpu: Cpu,
    /// CPU seconds per second of fw1 and fw2 left idle with the full table.
    idle_cpu: [f64; 2],
    fw2_own_sessions: u64,
    encoded: Encoded,
}

impl Figures {
    fn raw_insert_rate(&self) -> f64 {
        SESSIONS as f64 / self.raw.insert.as_secs_f64()
    }

    fn raw_dump_rate(&self) -> f64 {
        SESSIONS as f64 / self.raw.dump.as_secs_f64()
    }

    /// The replication rate from a backlog (the agents alone on the CPUs) over the paired
    /// baseline's insert rate: the median of the rounds' ratios.
    fn replication_ratio(&self) -> f64 {
        median(self.drains.iter().map(DrainRound::ratio).collect()).unwrap_or(0.0)
    }

    /// The lowest and highest of the rounds' ratios.
    fn replication_range(&self) -> (f64, f64) {
        let ratios: Vec<f64> = self.drains.iter().map(DrainRound::ratio).collect();
        range(&ratios).unwrap_or((0.0, 0.0))
    }

    /// The median round's drain rate over the fastest raw insert of 1M: the figure of the
    /// releases before the paired rounds.
    fn replication_vs_fastest(&self) -> f64 {
        let rates = self.drains.iter().map(|d| d.drain.rate()).collect();
        median(rates).unwrap_or(0.0) / self.raw_insert_rate()
    }

    /// Full sync time over (raw dump + raw insert), both scaled to the sessions synced.
    fn full_sync_ratio(&self) -> f64 {
        let scale = self.full.sessions as f64 / SESSIONS as f64;
        self.full.took.as_secs_f64() / ((self.raw.insert + self.raw.dump).as_secs_f64() * scale)
    }

    fn rss_growth(&self) -> [f64; 2] {
        [
            self.hwm_1m[0] - self.hwm_1k[0],
            self.hwm_1m[1] - self.hwm_1k[1],
        ]
    }

    fn rejoined_growth(&self) -> f64 {
        self.hwm_rejoined - self.hwm_1k[1]
    }

    /// Bytes on the sync link per replicated session (record sent), in the phase where they
    /// were most.
    fn wire_bytes(&self) -> f64 {
        [&self.lag.delta, &self.fill.delta]
            .into_iter()
            .chain(self.drains.iter().map(|d| &d.drain.delta))
            .map(|d| d.wire_bytes_per_record())
            .fold(0.0, f64::max)
    }
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// Fails, naming the figures, when one CPU's part of fw1's embryonic ring cannot hold every
/// session the bench creates.
fn check_embryonic_room() -> Result<()> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    let per_cpu = u64::from(EMBRYONIC) / cpus as u64;
    ensure!(
        per_cpu >= SESSIONS,
        "one CPU's part of the embryonic ring holds {per_cpu} sessions ({EMBRYONIC} over {cpus} CPUs), fewer than the bench's {SESSIONS}: raise CAPACITY for this host"
    );
    Ok(())
}

fn run(binary: &std::path::Path, fill_how: Inject) -> Result<Figures> {
    check_embryonic_room()?;
    let mut raw_all = raw_runs(SESSIONS, "before the lab")?;

    eprintln!("starting a 2-member lab (session capacity {CAPACITY})");
    let mut lab = Lab::start(binary)?;
    let mut phases = Phases::start(&lab)?;
    phases.mark(&lab, "start and first sync")?;

    eprintln!("phase 1: {SMALL} sessions");
    let small = lab.replicate(Inject::Wire, SMALL, None)?;
    let s = phases.mark(&lab, "1k sessions")?;
    let hwm_1k = [s[0].hwm_mib, s[1].hwm_mib];

    eprintln!("phase 2: {LAG_RATE} sessions/s for {LAG_SECS} s");
    let lag = lab.replicate(Inject::Wire, LAG_RATE * LAG_SECS, Some(LAG_RATE))?;
    let lag_stats = lab.peer_stats(1, 2)?.replication_lag;
    phases.mark(&lab, "lag at fixed rate")?;

    let drains = drain_rounds(&mut lab)?;
    phases.mark(&lab, "backlogs (fw2 frozen, then draining)")?;
    let filled = fill_to_full(&mut lab, fill_how, &mut phases)?;
    let (full, rejoined) = full_sync_to_restarted(&mut lab, filled.fw1_table, &mut phases)?;
    eprintln!("stopping the lab");
    drop(lab);

    raw_all.extend(raw_runs(SESSIONS, "after the lab")?);
    let raw = Raw {
        insert: raw_all.iter().map(|r| r.insert).min().unwrap_or_default(),
        dump: raw_all.iter().map(|r| r.dump).min().unwrap_or_default(),
    };
    Ok(Figures {
        raw,
        raw_runs: raw_all,
        small,
        lag,
        lag_p50_ms: lag_stats.p50_ms,
        lag_p99_ms: lag_stats.p99_ms,
        lag_frames_in_window: lag.delta.frames_acked,
        drains,
        fill: filled.fill,
        fw1_table: filled.fw1_table,
        full,
        hwm_1k,
        hwm_1m: filled.hwm_1m,
        hwm_rejoined: rejoined.hwm_mib,
        cpu: phases.cpu,
        idle_cpu: filled.idle_cpu,
        fw2_own_sessions: filled.fw2_own_sessions,
        encoded: Encoded::measure()?,
    })
}

/// The agents' CPU per phase of the run.
struct Phases {
    cpu: Cpu,
    /// Both agents' samples at the end of the last phase.
    last: [ProcSample; 2],
}

impl Phases {
    fn start(lab: &Lab) -> Result<Phases> {
        Ok(Phases {
            cpu: Cpu::default(),
            last: [lab.sample(1)?, lab.sample(2)?],
        })
    }

    /// Ends phase `name`: records each agent's CPU since the last phase ended; returns their
    /// samples.
    fn mark(&mut self, lab: &Lab, name: &'static str) -> Result<[ProcSample; 2]> {
        let now = [lab.sample(1)?, lab.sample(2)?];
        self.cpu.phases.push((
            name,
            now[0].cpu_s - self.last[0].cpu_s,
            now[1].cpu_s - self.last[1].cpu_s,
        ));
        self.last = now;
        Ok(now)
    }
}

/// Phase 3: the backlog rounds, each paired with a baseline insert of its keys.
fn drain_rounds(lab: &mut Lab) -> Result<Vec<DrainRound>> {
    eprintln!("phase 3: {DRAIN_ROUNDS} backlogs of {BACKLOG} sessions queued on fw1 while fw2 is frozen, each paired with a baseline insert of its keys");
    let paired = PairedBaseline::open()?;
    paired.insert(0..lab.next)?;
    let mut drains = Vec::with_capacity(DRAIN_ROUNDS);
    for round in 0..DRAIN_ROUNDS {
        check_stop()?;
        let r = lab.drain_round(&paired, round % 2 == 1)?;
        eprintln!(
            "backlog round {}: {:.0} sessions/s, paired baseline {:.0}/s: {:.3}",
            round + 1,
            r.drain.rate(),
            r.raw_rate,
            r.ratio()
        );
        drains.push(r);
    }
    Ok(drains)
}

/// What phase 4 measured.
struct Filled {
    fill: Replication,
    fw1_table: u64,
    fw2_own_sessions: u64,
    /// CPU seconds per second of fw1 and fw2 left idle with the full table.
    idle_cpu: [f64; 2],
    hwm_1m: [f64; 2],
}

/// Phase 4: the table filled to [`SESSIONS`] by `fill_how`, counted on both members, then
/// left idle a while.
fn fill_to_full(lab: &mut Lab, fill_how: Inject, phases: &mut Phases) -> Result<Filled> {
    let have = lab.count(1)?.total;
    let fill_n = SESSIONS.saturating_sub(have);
    eprintln!(
        "phase 4: {fill_n} sessions by {} as fast as it goes ({have} in the table)",
        fill_how.name()
    );
    let fill = lab.replicate(fill_how, fill_n, None)?;
    let s = phases.mark(lab, "fill to 1M")?;
    let fw1_table = lab.count(1)?.total;
    let fw2_count = lab.count(2)?;
    ensure!(
        fw2_count.total >= fw1_table,
        "fw2 holds {} sessions, fw1 {fw1_table}",
        fw2_count.total
    );
    let fw2_own_sessions = fw2_count.by_owner.get(&2).copied().unwrap_or(0);
    let s1 = phases.mark(lab, "the bench's table counts at 1M")?;
    // A settled table: the agents' peaks at 1M include their own walks of a full table, and
    // the idle cost of a full table shows.
    let idle_from = Instant::now();
    pause(IDLE)?;
    let s2 = phases.mark(lab, "idle at 1M")?;
    let idle_s = idle_from.elapsed().as_secs_f64();
    let idle_cpu = phases
        .cpu
        .phases
        .last()
        .map_or([0.0; 2], |(_, a, b)| [a / idle_s, b / idle_s]);
    Ok(Filled {
        fill,
        fw1_table,
        fw2_own_sessions,
        idle_cpu,
        hwm_1m: [0, 1].map(|i| s[i].hwm_mib.max(s1[i].hwm_mib).max(s2[i].hwm_mib)),
    })
}

/// Phase 5: fw2 killed, its pinned table removed, and started again: the full sync of fw1's
/// `fw1_table` sessions it receives, and fw2's sample after it.
fn full_sync_to_restarted(
    lab: &mut Lab,
    fw1_table: u64,
    phases: &mut Phases,
) -> Result<(FullSync, ProcSample)> {
    eprintln!("phase 5: full sync of {fw1_table} sessions to a restarted fw2");
    let sent_before = lab.peer_stats(1, 2)?.full_syncs.sent.count;
    let restarted = restart_empty(lab)?;
    let mut started: Option<Instant> = None;
    let ended = wait_for(
        || format!("fw2's full sync from fw1 to end\n{}", lab.log_tails()),
        POLL,
        || {
            let r = lab.peer_stats(2, 1)?.full_syncs.received;
            if r.running && started.is_none() {
                started = Some(Instant::now());
            }
            Ok((r.count > 0 && !r.running).then(Instant::now))
        },
    )?;
    let fw2_view = lab.peer_stats(2, 1)?.full_syncs.received;
    let fw1_view = lab.peer_stats(1, 2)?.full_syncs.sent;
    ensure!(
        fw1_view.count > sent_before,
        "fw1 reports no new full sync sent to fw2"
    );
    // A full sync too quick to be seen running (it is not, at 1M) counts from the restart.
    let took = ended.duration_since(started.unwrap_or(restarted));
    let fw2_table = lab.count(2)?.total;
    let rejoined = lab.sample(2)?;
    // fw1's CPU through the full sync; the restarted fw2's whole life.
    let fw1_now = lab.sample(1)?;
    phases.cpu.phases.push((
        "full sync (fw2: restarted agent)",
        fw1_now.cpu_s - phases.last[0].cpu_s,
        rejoined.cpu_s,
    ));
    ensure!(
        fw2_table >= fw1_table,
        "after its full sync fw2 holds {fw2_table} sessions, fw1 {fw1_table}"
    );
    let full = FullSync {
        sessions: fw1_table,
        took,
        from_restart: ended.duration_since(restarted),
        fw2_received_ms: fw2_view.last_duration_ms,
        fw1_sent_ms: fw1_view.last_duration_ms,
        records: fw2_view.last_records,
        fw2_table,
    };
    Ok((full, rejoined))
}

/// Kills fw2's agent, removes its pinned datapath (so it comes back empty, as a new member
/// would) and starts it again; returns when it was started.
fn restart_empty(lab: &mut Lab) -> Result<Instant> {
    let pid2 = lab.pid(2)?;
    lab.cluster.kill_agent(2, Signal::Kill)?;
    lab.cluster
        .topology()
        .processes()
        .wait(pid2, Duration::from_secs(10))?
        .ok_or_else(|| anyhow!("fw2's agent outlived SIGKILL for 10 s"))?;
    lab.cluster.teardown(2)?;
    let restarted = Instant::now();
    lab.cluster.start_agent(2)?;
    lab.cluster.wait_ready(2, Duration::from_secs(30))?;
    Ok(restarted)
}

/// The backlog rounds, one row each, and their ratio.
fn print_drains(f: &Figures) {
    println!(
        "replication from a backlog, {DRAIN_ROUNDS} rounds: each time {BACKLOG} sessions queued on fw1 while fw2 was frozen; the steady rate from {:.0} % installed to the last; the paired baseline inserted the same keys into a hash of its own just before or after",
        BACKLOG_FROM * 100.0
    );
    println!();
    println!("| round | fw2 frozen, s | installed in, s | steady sessions/s | paired raw insert/s | ratio | agents' CPU in the drain fw1 / fw2, s | fw1 ringbuf-full | full syncs sent |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (i, r) in f.drains.iter().enumerate() {
        let d = &r.drain;
        println!(
            "| {}{} | {:.3} | {:.3} | {:.0} | {:.0} | {:.3} | {:.2} / {:.2} | {} | {} |",
            i + 1,
            if r.raw_first { " (baseline first)" } else { "" },
            d.frozen.as_secs_f64(),
            d.took.as_secs_f64(),
            d.rate(),
            r.raw_rate,
            r.ratio(),
            d.cpu[0],
            d.cpu[1],
            d.delta.ringbuf_full,
            d.delta.full_syncs_sent
        );
    }
    let (lo, hi) = f.replication_range();
    println!();
    println!(
        "replication / paired raw insert: {:.3} (median; rounds {lo:.3}–{hi:.3}); the median round's rate over the fastest raw insert of {SESSIONS}: {:.3}",
        f.replication_ratio(),
        f.replication_vs_fastest()
    );
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

fn print_table(f: &Figures) {
    print_replication(f);
    print_wire(f);
    print_usage(f);
    print_targets(f);
}

/// The baselines, the phases' replication, the backlog rounds, the lag and the full sync.
fn print_replication(f: &Figures) {
    println!(
        "sync: 2 members, {SESSIONS} sessions, each created by fw1's XDP program (1k and lag phases from client frames, the fill by {})",
        f.fill.how.name()
    );
    println!();
    println!("| baseline (no network, hash of {CAPACITY}) | seconds | sessions/s |");
    println!("|---|---|---|");
    println!(
        "| batch insert {SESSIONS} | {:.3} | {:.0} |",
        f.raw.insert.as_secs_f64(),
        f.raw_insert_rate()
    );
    println!(
        "| batch dump {SESSIONS} | {:.3} | {:.0} |",
        f.raw.dump.as_secs_f64(),
        f.raw_dump_rate()
    );
    println!();
    println!("| replication fw1→fw2 | created by | sessions | offered/s | installed/s | seconds | backlog when sending ended | fw1 ringbuf-full | fw1 full syncs sent |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, r) in [
        ("1k", &f.small),
        ("lag phase", &f.lag),
        ("fill to 1M", &f.fill),
    ] {
        println!(
            "| {name} | {} | {} | {:.0} | {:.0} | {:.3} | {} | {} | {} |",
            r.how.name(),
            r.created,
            r.offered(),
            r.rate(),
            r.took.as_secs_f64(),
            r.backlog_at_send_end,
            r.delta.ringbuf_full,
            r.delta.full_syncs_sent
        );
    }
    println!();
    print_drains(f);
    println!(
        "replication lag at {LAG_RATE}/s for {LAG_SECS} s (fw1's statistics, peer 2; {} frames acked in the phase, window 4096): p50 {} ms, p99 {} ms",
        f.lag_frames_in_window,
        opt_ms(f.lag_p50_ms),
        opt_ms(f.lag_p99_ms)
    );
    println!(
        "full sync of {} sessions to a restarted fw2: {:.3} s (fw2's own figure {} ms, fw1's send {} ms, {} records; {:.3} s from the restart; fw2 then holds {})",
        f.full.sessions,
        f.full.took.as_secs_f64(),
        f.full.fw2_received_ms.map_or("-".into(), |v| v.to_string()),
        f.full.fw1_sent_ms.map_or("-".into(), |v| v.to_string()),
        f.full.records.map_or("-".into(), |v| v.to_string()),
        f.full.from_restart.as_secs_f64(),
        f.full.fw2_table
    );
    println!();
}

/// What the sync link carried per session, and the encoder's figure for full frames.
fn print_wire(f: &Figures) {
    println!("| sync link fw1 → fw2 (authenticated frames, keepalives included) | sessions installed | records sent | frames | bytes | per session installed | per record sent |");
    println!("|---|---|---|---|---|---|---|");
    let backlogs = f.drains.iter().enumerate();
    let backlogs = backlogs.map(|(i, d)| (format!("backlog {}", i + 1), &d.drain.delta));
    for (name, d) in [("lag phase".to_owned(), &f.lag.delta)]
        .into_iter()
        .chain(backlogs)
        .chain([("fill to 1M".to_owned(), &f.fill.delta)])
    {
        println!(
            "| {name} | {} | {} | {} | {} | {:.1} | {:.1} |",
            d.installed,
            d.records_sent,
            d.frames_sent,
            d.bytes_sent,
            d.wire_bytes_per_session(),
            d.wire_bytes_per_record()
        );
    }
    println!();
    println!(
        "| encoder, full frames of {MAX_RECORDS_PER_FRAME} records (bytes per session) | 1.1 layout | current | current / 1.1 |"
    );
    println!("|---|---|---|---|");
    for (name, v) in [
        ("UDP one-way (the bench's sessions)", f.encoded.udp),
        ("TCP established, with sequence state", f.encoded.tcp),
    ] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.2} |",
            v[0],
            v[1],
            v[1] / v[0]
        );
    }
    println!();
}

/// The agents' CPU per phase and their peak RSS.
fn print_usage(f: &Figures) {
    let growth = f.rss_growth();
    println!("| agent CPU seconds | fw1 | fw2 |");
    println!("|---|---|---|");
    for (name, a, b) in &f.cpu.phases {
        println!("| {name} | {a:.2} | {b:.2} |");
    }
    println!(
        "| per second, idle with the full table | {:.2} | {:.2} |",
        f.idle_cpu[0], f.idle_cpu[1]
    );
    println!();
    println!("| agent peak RSS (VmHWM, MiB) | fw1 | fw2 |");
    println!("|---|---|---|");
    println!("| at 1k | {:.1} | {:.1} |", f.hwm_1k[0], f.hwm_1k[1]);
    println!("| at 1M | {:.1} | {:.1} |", f.hwm_1m[0], f.hwm_1m[1]);
    println!("| growth | {:.1} | {:.1} |", growth[0], growth[1]);
    println!(
        "| fw2 restarted, after the full sync | | {:.1} (+{:.1} over fw2 at 1k) |",
        f.hwm_rejoined,
        f.rejoined_growth()
    );
    println!();
}

/// The targets, each met or missed.
fn print_targets(f: &Figures) {
    let growth = f.rss_growth();
    let rep = f.replication_ratio();
    let full = f.full_sync_ratio();
    let worst = growth[0].max(growth[1]).max(f.rejoined_growth());
    println!("| target | value | limit | |");
    println!("|---|---|---|---|");
    println!(
        "| replication / paired raw insert rate (median of {DRAIN_ROUNDS} rounds) | {rep:.3} | ≥ {TARGET_REPLICATION} | {} |",
        met(rep >= TARGET_REPLICATION)
    );
    println!(
        "| full sync / (raw dump + raw insert) | {full:.2} | ≤ {TARGET_FULL_SYNC} | {} |",
        met(full <= TARGET_FULL_SYNC)
    );
    let wire = f.wire_bytes();
    println!(
        "| sync link bytes per replicated UDP session (worst phase) | {wire:.1} | ≤ {TARGET_WIRE_BYTES} | {} |",
        met(wire <= TARGET_WIRE_BYTES)
    );
    println!(
        "| RSS growth 1k → 1M, MiB (worst agent) | {worst:.1} | ≤ {TARGET_RSS_GROWTH_MIB} | {} |",
        met(worst <= TARGET_RSS_GROWTH_MIB)
    );
    if f.fw2_own_sessions > 0 {
        println!(
            "warning: fw2 created {} sessions of its own: client frames reached its in0",
            f.fw2_own_sessions
        );
    }
}

/// `v` rounded to hundredths: CPU time comes in clock ticks, RSS in KiB.
fn r2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn print_json(f: &Figures) {
    let growth = f.rss_growth();
    let rep = f.replication_ratio();
    let full = f.full_sync_ratio();
    let worst = growth[0].max(growth[1]).max(f.rejoined_growth());
    let out = serde_json::json!({
        "bench": "sync",
        "members": 2,
        "sessions": SESSIONS,
        "capacity": CAPACITY,
        "raw": {
            "insert_s": f.raw.insert.as_secs_f64(),
            "insert_per_s": f.raw_insert_rate(),
            "dump_s": f.raw.dump.as_secs_f64(),
            "dump_per_s": f.raw_dump_rate(),
            "chunk": RAW_CHUNK,
            "runs": f.raw_runs.iter().map(|r| serde_json::json!({
                "insert_s": r.insert.as_secs_f64(), "dump_s": r.dump.as_secs_f64(),
            })).collect::<Vec<_>>(),
        },
        "replication": {
            "rounds": f.drains.iter().map(DrainRound::json).collect::<Vec<_>>(),
            "ratio_median": rep,
            "ratio_range": <[f64; 2]>::from(f.replication_range()),
            "median_rate_vs_fastest_raw_insert": f.replication_vs_fastest(),
        },
        "fill": f.fill.json(),
        "small": f.small.json(),
        "lag": {
            "rate_per_s": LAG_RATE,
            "seconds": LAG_SECS,
            "p50_ms": f.lag_p50_ms,
            "p99_ms": f.lag_p99_ms,
            "frames_acked_in_phase": f.lag_frames_in_window,
            "phase": f.lag.json(),
        },
        "full_sync": {
            "sessions": f.full.sessions,
            "seconds": f.full.took.as_secs_f64(),
            "from_restart_s": f.full.from_restart.as_secs_f64(),
            "fw2_reported_ms": f.full.fw2_received_ms,
            "fw1_reported_send_ms": f.full.fw1_sent_ms,
            "records": f.full.records,
            "fw2_sessions_after": f.full.fw2_table,
        },
        "fw1_sessions": f.fw1_table,
        "fw2_own_sessions": f.fw2_own_sessions,
        "agents": {
            "cpu_s": f.cpu.phases.iter().map(|(name, a, b)| serde_json::json!({
                "phase": name, "fw1": r2(*a), "fw2": r2(*b),
            })).collect::<Vec<_>>(),
            "idle_cpu_s_per_s_at_1m": { "fw1": r2(f.idle_cpu[0]), "fw2": r2(f.idle_cpu[1]) },
            "rss_mib": {
                "fw1_1k": r2(f.hwm_1k[0]), "fw1_1m": r2(f.hwm_1m[0]),
                "fw2_1k": r2(f.hwm_1k[1]), "fw2_1m": r2(f.hwm_1m[1]),
                "fw2_rejoined_1m": r2(f.hwm_rejoined),
                "growth_worst": r2(worst),
            },
        },
        "encoded_bytes_per_session": f.encoded.json(),
        "ratios": {
            "replication_vs_paired_raw_insert": rep,
            "full_sync_vs_raw": full,
        },
        "wire_bytes_per_session_worst": f.wire_bytes(),
        "targets": {
            "replication_vs_paired_raw_insert_min": TARGET_REPLICATION,
            "full_sync_vs_raw_max": TARGET_FULL_SYNC,
            "rss_growth_mib_max": TARGET_RSS_GROWTH_MIB,
            "wire_bytes_per_session_max": TARGET_WIRE_BYTES,
        },
        "met": {
            "replication_vs_paired_raw_insert": rep >= TARGET_REPLICATION,
            "full_sync_vs_raw": full <= TARGET_FULL_SYNC,
            "rss_growth": worst <= TARGET_RSS_GROWTH_MIB,
            "wire_bytes_per_session": f.wire_bytes() <= TARGET_WIRE_BYTES,
        },
    });
    println!("{out}");
}

fn main() -> Result<()> {
    let json = std::env::args().any(|a| a == "--json");
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "the sync bench builds network namespaces and loads XDP: run it as root"
    );
    catch_signals()?;
    let binary = hasync_binary()?;
    eprintln!("agent: {}", binary.display());
    let fill_how = if std::env::args().any(|a| a == "--wire") {
        Inject::Wire
    } else {
        Inject::TestRun
    };
    let figures = run(&binary, fill_how)?;
    if json {
        print_json(&figures);
    } else {
        print_table(&figures);
    }
    Ok(())
}
