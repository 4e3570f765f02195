//! Test helpers: a temporary directory and a fake agent runtime answering from fixed data.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use hasync_common::{
    flow::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
    Counter, Counters, Family, FlowKey, MemberId, Session, SessionFlags, State, ZoneId,
};
use tokio::sync::mpsc;

use super::{
    protocol::{Request, Response, SessionFilter},
    view::{
        CountersView, FlapView, FlapsView, LocalStateView, MemberView, MembersView, SessionPage,
        SessionsView, StatisticsView,
    },
    ControlRequest, ControlSender,
};
use crate::{
    cluster::MemberState,
    datapath::sweep::Tally,
    sync::stats::{BulkStats, LinkStats, PeerStats, Rejections},
};

/// A scratch directory, under the system temp dir unless made [`TempDir::within`] another,
/// removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        TempDir::within(&std::env::temp_dir(), tag)
    }

    /// A new directory in `dir` (not the system's temp dir: one open to others).
    pub fn within(dir: &Path, tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let p = dir.join(format!(
            "hasync-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        // 0755 whatever the umask: the checks of directories above a path refuse one others
        // may write, and a test's other user must be able to reach what is inside.
        crate::files::fresh_dir(&p, 0o755).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A session as the XDP program stores it after the packet `src:sport → dst:dport`:
/// `Flow::tcp("198.18.0.10", 40000, "198.18.1.10", 443).owner(2).zone(1).entry()`.
#[derive(Clone, Debug)]
pub struct Flow {
    proto: u8,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    session: Session,
}

/// An address as a flow key holds it: network byte order in memory, IPv4 in word 0.
fn words(a: IpAddr) -> [u32; 4] {
    match a {
        IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        IpAddr::V6(a) => {
            let b = a.octets();
            let mut w = [0u32; 4];
            for (w, c) in w.iter_mut().zip(b.chunks_exact(4)) {
                *w = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            }
            w
        }
    }
}

impl Flow {
    /// A flow of `proto` in `state`, owner 1, no zone.
    pub fn new(proto: u8, src: &str, sport: u16, dst: &str, dport: u16, state: State) -> Flow {
        Flow {
            proto,
            src: src.parse().expect("source address"),
            sport,
            dst: dst.parse().expect("destination address"),
            dport,
            session: Session {
                state: state as u8,
                owner: MemberId(1),
                ..Session::default()
            },
        }
    }

    /// An established TCP connection.
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Flow {
        Flow::new(IPPROTO_TCP, src, sport, dst, dport, State::Established)
    }

    /// A UDP flow seen one way.
    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Flow {
        Flow::new(IPPROTO_UDP, src, sport, dst, dport, State::UdpNew)
    }

    /// An ICMP echo with identifier `id` (both "ports").
    pub fn icmp(src: &str, dst: &str, id: u16) -> Flow {
        Flow::new(IPPROTO_ICMP, src, id, dst, id, State::IcmpEcho)
    }

    pub fn state(mut self, state: State) -> Flow {
        self.session.state = state as u8;
        self
    }

    pub fn owner(mut self, owner: u8) -> Flow {
        self.session.owner = MemberId(owner);
        self
    }

    pub fn zone(mut self, zone: u16) -> Flow {
        self.session.zone = ZoneId(zone);
        self
    }

    /// Created at `created_ns`, last seen at `last_seen_ns` (monotonic nanoseconds).
    pub fn times(mut self, created_ns: u64, last_seen_ns: u64) -> Flow {
        self.session.created_ns = created_ns;
        self.session.last_seen_ns = last_seen_ns;
        self
    }

    /// Packets and bytes, original direction then reply.
    pub fn traffic(mut self, packets: [u64; 2], bytes: [u64; 2]) -> Flow {
        self.session.packets = packets;
        self.session.bytes = bytes;
        self
    }

    /// TCP flags seen, original direction then reply.
    pub fn tcp_flags(mut self, flags: [u8; 2]) -> Flow {
        self.session.tcp_flags = flags;
        self
    }

    /// The SESSIONS key and value.
    pub fn entry(&self) -> (FlowKey, Session) {
        let family = if self.src.is_ipv6() {
            Family::V6
        } else {
            Family::V4
        };
        let (key, src_is_hi) = FlowKey::canonical(
            family,
            self.proto,
            words(self.src),
            self.sport.to_be(),
            words(self.dst),
            self.dport.to_be(),
        );
        let mut session = self.session;
        if src_is_hi {
            session.flags.0 |= SessionFlags::INITIATOR_HI;
        }
        (key, session)
    }
}

/// The fake agent's session table.
pub fn sample_sessions() -> Vec<(FlowKey, Session)> {
    vec![
        Flow::tcp("198.18.0.10", 40000, "198.18.1.10", 443)
            .owner(1)
            .zone(1)
            .entry(),
        Flow::udp("198.18.1.10", 5353, "198.18.0.255", 53)
            .state(State::UdpReplied)
            .owner(2)
            .zone(2)
            .entry(),
        Flow::tcp("198.18.0.11", 40001, "198.18.1.10", 22)
            .state(State::SynSent)
            .owner(1)
            .entry(),
    ]
}

/// What the fake agent answers.
pub fn answer(request: Request) -> Response {
    match request {
        Request::ShowMembers {} => Response::ok(members()),
        Request::ShowSessions {
            count_only,
            filter,
            offset,
            limit,
        } => sessions(count_only, filter, offset, limit),
        Request::ShowSessionCounts {} => session_counts(),
        Request::ShowStatistics {} => statistics(),
        Request::ShowCounters { prefix } => {
            let mut c = Counters::default();
            c.add(Counter::Packets, 123_456);
            c.add(Counter::ErrTcpFlags, 2);
            let pool = prefix.is_none().then_some((3, 49_152));
            Response::ok(CountersView::new(&c, prefix.as_deref()).with_pool(pool))
        }
        Request::ShowFlaps {} => Response::ok(flaps()),
        Request::Suspend {} => {
            Response::ok(LocalStateView::new(MemberId(1), MemberState::Suspended))
        }
        Request::Functional {} => {
            Response::ok(LocalStateView::new(MemberId(1), MemberState::Tentative))
        }
    }
}

/// The fake's `show cluster members`: two members, a fault and a warning.
fn members() -> MembersView {
    MembersView {
        cluster_id: hasync_common::ClusterId(7),
        local: 1,
        members: vec![
            MemberView {
                id: 1,
                serial: "FW-A".into(),
                state: MemberState::Active.name().into(),
                ha4: "up".into(),
                ha4_backup: "not-configured".into(),
                sessions_owned: 2,
                flaps: 0,
                version: Some("1.0".into()),
                last_change: Some(3725),
            },
            MemberView {
                id: 12,
                serial: "FW-LONG-SERIAL".into(),
                state: MemberState::Down.name().into(),
                ha4: "down".into(),
                ha4_backup: "not-configured".into(),
                sessions_owned: 1,
                flaps: 3,
                version: None,
                last_change: None,
            },
        ],
        faults: vec!["link group `uplinks`: out0 down".into()],
        warnings: vec!["zones differ from member 12's (only here: dmz)".into()],
    }
}

/// The fake's `show cluster sessions`: [`sample_sessions`] through the real filter and pager.
fn sessions(count_only: bool, filter: SessionFilter, offset: u64, limit: Option<u64>) -> Response {
    let zones = ["trust".to_string(), "untrust".to_string()];
    Response::from_result(
        SessionPage::new(count_only, filter, offset, limit, &zones).map(|mut page| {
            for (k, s) in sample_sessions() {
                page.add(&k, &s, s.last_seen_ns + 2_000_000_000);
            }
            page.finish(65536, 8192)
        }),
    )
}

/// The fake's `show-session-counts`: [`sample_sessions`] as the sweep counts them, 2 s ago.
fn session_counts() -> Response {
    let mut tally = Tally::default();
    for (_, s) in sample_sessions() {
        tally.add(&s);
    }
    let age = std::time::Duration::from_secs(2);
    Response::ok(SessionsView::tallied(&tally, age, 65536, 8192))
}

/// The fake's `show cluster statistics`: one peer with some traffic, a full sync, a rejection.
fn statistics() -> Response {
    let stats = PeerStats::default();
    LinkStats::add(&stats.ha4.frames_sent, 2);
    LinkStats::add(&stats.ha4.records_sent, 120);
    LinkStats::add(&stats.ha4.bytes_sent, 11_000);
    LinkStats::add(&stats.ha4.acks_received, 1);
    *stats.bulk_sent.lock().unwrap() = BulkStats {
        count: 1,
        last_records: 120,
        last_duration_ms: 812,
        running: false,
        started_ms: 0,
    };
    stats
        .lag
        .lock()
        .unwrap()
        .record(Duration::from_micros(4_250));
    let rejections = Rejections::default();
    rejections.count(crate::sync::stats::Rejection::BadKey);
    Response::ok(StatisticsView::from_stats(
        [(MemberId(2), &stats, true)],
        &rejections,
    ))
}

/// The fake's `show cluster flaps`.
fn flaps() -> FlapsView {
    FlapsView {
        members: vec![
            FlapView {
                id: 1,
                flaps: 0,
                last_change: Some(59),
            },
            FlapView {
                id: 2,
                flaps: 4,
                last_change: Some(90_061),
            },
        ],
    }
}

/// Spawns a fake runtime serving [`answer`]; it stops when the returned sender and its clones
/// are dropped. Must be called within a tokio runtime.
pub fn fake_runtime() -> (ControlSender, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<ControlRequest>(8);
    let task = tokio::spawn(async move {
        while let Some((request, _, reply)) = rx.recv().await {
            let _ = reply.send(answer(request));
        }
    });
    (tx, task)
}
