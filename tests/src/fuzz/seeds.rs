//! Seed inputs for every fuzz target, built from real encodings: every sync message, the
//! example provisioning spec and the configs it yields, every control request, and frames
//! from the fixture builder. `tests/fuzz_corpus.rs` replays them with the corpora and writes
//! them into `fuzz/corpus/` on request.

use std::net::{IpAddr, SocketAddr};

use hasync_agent::{
    control::{Request, SessionFilter},
    forwarding::nlmsg,
    provision::{MemberFiles, Spec, EXAMPLE_SPEC},
    sync::wire::{
        Hello, Keepalive, LinkKind, Message, Record, RecordLayout, PROTO_MAJOR, PROTO_MINOR,
    },
};
use hasync_common::{Family, FlowKey, MemberId, Session, SessionFlags, State, ZoneId};

use super::xdp::{self, Setup};
use crate::frame::{Frame, Ipv6Ext, IPPROTO_GRE};

/// A named seed input.
pub type Seed = (String, Vec<u8>);

/// The seeds of `target` (none for an unknown name).
pub fn seeds(target: &str) -> Vec<Seed> {
    match target {
        "wire_message" | "channel_payload" => messages(),
        "config" => configs(),
        "control_request" => requests(),
        "provision_spec" => specs(),
        "backlog" => operations(),
        "kernel_netlink" => netlink_datagrams(),
        xdp::NAME => frames(),
        _ => Vec::new(),
    }
}

fn named(name: &str, bytes: Vec<u8>) -> Seed {
    (name.to_owned(), bytes)
}

fn record_key(i: u32) -> FlowKey {
    let a = [u32::from_ne_bytes([198, 18, 0, 10]), 0, 0, 0];
    let [.., hi, lo] = i.to_be_bytes();
    let b = [u32::from_ne_bytes([198, 19, hi, lo]), 0, 0, 0];
    FlowKey::canonical(Family::V4, 6, a, 40000u16.to_be(), b, 443u16.to_be()).0
}

fn record(i: u32) -> Record {
    let now = 100_000_000_000;
    let s = Session {
        created_ns: now - 5_000_000_000,
        last_seen_ns: now - 250_000_000,
        packets: [10, 9],
        bytes: [1000, 9000],
        version: 7,
        zone: ZoneId(u16::try_from(i % 3).unwrap_or(0)),
        flags: SessionFlags(SessionFlags::INITIATOR_HI),
        owner: MemberId(2),
        state: State::Established as u8,
        tcp_flags: [0x12, 0x12],
        ..Session::default()
    };
    Record::upsert(record_key(i), &s, now)
}

/// Records as real traffic makes them: one-way UDP over IPv4 (single-word addresses), and an
/// established TCP session with its sequence state.
fn traffic_records() -> Vec<Record> {
    let now = 100_000_000_000;
    let a = [u32::from_ne_bytes([198, 18, 0, 20]), 0, 0, 0];
    let b = [u32::from_ne_bytes([198, 18, 1, 20]), 0, 0, 0];
    let udp_key = FlowKey::canonical(Family::V4, 17, a, 1024u16.to_be(), b, 9u16.to_be()).0;
    let tcp_key = FlowKey::canonical(Family::V4, 6, a, 40000u16.to_be(), b, 443u16.to_be()).0;
    let udp = Session {
        created_ns: now - 5_000_000,
        last_seen_ns: now - 5_000_000,
        packets: [1, 0],
        bytes: [58, 0],
        version: 1,
        zone: ZoneId(1),
        owner: MemberId(1),
        state: State::UdpNew as u8,
        ..Session::default()
    };
    let tcp = Session {
        state: State::Established as u8,
        packets: [12, 10],
        bytes: [1_400, 90_000],
        tcp_flags: [0x1a, 0x1a],
        tcp_track: [0x87, 0x80],
        max_win: [502, 65_535],
        seq_end: [0xdead_0001, 77],
        ..udp
    };
    vec![
        Record::upsert(udp_key, &udp, now),
        Record::upsert(tcp_key, &tcp, now),
    ]
}

fn messages() -> Vec<Seed> {
    let hello = Message::Hello(Hello {
        major: PROTO_MAJOR,
        minor: PROTO_MINOR,
        cluster_id: hasync_common::ClusterId(7),
        member: MemberId(2),
        link: LinkKind::Ha4Backup,
        boot_id: 0xdead_beef_0000_0001,
        fingerprint: [9; 32],
        zones: vec!["untrust".into(), "lab".into(), "trust".into()],
        wants_bulk: true,
        fresh_table: false,
    });
    let sessions = |bulk, records| Message::Sessions {
        seq: 42,
        bulk,
        records,
    };
    [
        ("hello", hello),
        (
            "keepalive",
            Message::Keepalive(Keepalive {
                state: 1,
                sessions_owned: 12345,
                flaps: 3,
                seq: 1,
            }),
        ),
        ("sessions", sessions(false, (0..3).map(record).collect())),
        ("sessions-traffic", sessions(false, traffic_records())),
        (
            "sessions-bulk-delete",
            sessions(
                true,
                vec![record(4), Record::delete(record_key(9), MemberId(1), 4)],
            ),
        ),
        ("ack", Message::Ack { seq: 2 }),
        ("bulk-start", Message::BulkStart { bulk_id: 5 }),
        (
            "bulk-end",
            Message::BulkEnd {
                bulk_id: 5,
                records: 1_000,
            },
        ),
    ]
    .into_iter()
    .flat_map(|(name, msg)| {
        // Session records in the current layout and in the 1.1 one (what a 1.1 peer sends);
        // keepalives in the current layout and the 1.3 one (without their number); the other
        // messages are the same in all.
        let layouts = match msg {
            Message::Sessions { .. } => &[RecordLayout::CURRENT, RecordLayout::V1_1][..],
            Message::Keepalive(_) => &[RecordLayout::CURRENT, RecordLayout::V1_3][..],
            _ => &[RecordLayout::CURRENT][..],
        };
        layouts.iter().filter_map(move |&layout| {
            let mut bytes = Vec::new();
            msg.encode_as(&mut bytes, layout).ok()?;
            let name = if layout == RecordLayout::CURRENT {
                name.to_owned()
            } else {
                format!("{name}-{layout:?}")
            };
            Some(named(&name, bytes))
        })
    })
    .collect()
}

/// A one-member spec without a backup link or zones.
const SMALL_SPEC: &str = r#"
[cluster]
id = 1
[ha4]
interface = "ha4"
[[members]]
id = 1
serial = "solo"
ha4 = "198.18.100.1/24"
"#;

fn specs() -> Vec<Seed> {
    vec![
        named("example-spec", EXAMPLE_SPEC.into()),
        named("small-spec", SMALL_SPEC.into()),
    ]
}

/// Every member's `hasync.toml` as `hasync provision` writes it from the example spec.
fn configs() -> Vec<Seed> {
    let path = std::path::Path::new("example.toml");
    let Ok(configs) = Spec::parse(path, EXAMPLE_SPEC).and_then(|s| s.configs(path)) else {
        return Vec::new();
    };
    configs
        .into_iter()
        .filter_map(|c| MemberFiles::new(c, path).ok())
        .map(|f| named(&format!("config-{}", f.serial), f.config_text.into_bytes()))
        .collect()
}

fn requests() -> Vec<Seed> {
    let filter = SessionFilter {
        owner: Some(2),
        zone: Some("trust".into()),
        proto: Some("tcp".into()),
        address: "198.18.0.10".parse().ok(),
        port: Some(443),
        state: Some("established".into()),
    };
    let requests = [
        Request::ShowMembers {},
        Request::ShowSessions {
            count_only: false,
            filter,
            offset: 1,
            limit: Some(1000),
        },
        Request::ShowSessions {
            count_only: true,
            filter: SessionFilter::default(),
            offset: 0,
            limit: None,
        },
        Request::ShowSessionCounts {},
        Request::ShowStatistics {},
        Request::ShowCounters {
            prefix: Some("err-".into()),
        },
        Request::ShowFlaps {},
        Request::Suspend {},
        Request::Functional {},
    ];
    requests
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let mut line = serde_json::to_vec(r).ok()?;
            line.push(b'\n');
            Some(named(&format!("{}-{i}", r.name()), line))
        })
        .collect()
}

fn sa(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| SocketAddr::from(([198, 18, 0, 1], 1)))
}

fn ip(s: &str) -> IpAddr {
    sa(s).ip()
}

const C4: &str = "198.18.0.10:40000";
const S4: &str = "198.18.1.20:80";
const C6: &str = "[fd00::10]:40000";
const S6: &str = "[fd00:1::20]:443";

fn setup(bits: u8) -> Setup {
    Setup::from_byte(bits)
}

/// A TCP connection from `c` to `s`, opened and closed.
fn tcp_life(c: &str, s: &str) -> Vec<Frame> {
    let (c, s) = (sa(c), sa(s));
    vec![
        Frame::tcp(c, s).syn(),
        Frame::tcp(s, c).syn_ack(),
        Frame::tcp(c, s).ack().payload(100),
        Frame::tcp(c, s).fin(),
        Frame::tcp(s, c).fin(),
        Frame::tcp(c, s).ack(),
    ]
}

fn frames() -> Vec<Seed> {
    let (c4, s4) = (sa(C4), sa(S4));
    let (c6, s6) = (sa(C6), sa(S6));
    let udp = vec![Frame::udp(c4, s4), Frame::udp(s4, c4), Frame::udp(c6, s6)];
    let icmp = vec![
        Frame::icmp_echo(ip(C4), ip(S4), 7, true),
        Frame::icmp_echo(ip(S4), ip(C4), 7, false),
        Frame::icmp_echo(ip(C6), ip(S6), 8, true),
        Frame::icmp(ip(C4), ip(S4), 3, 1),
        Frame::icmp_query(ip(C4), ip(S4), 13, 7),
        Frame::icmp_query(ip(S6), ip(C6), 161, 8),
        Frame::icmp(ip(C4), ip(S4), 37, 0),
        Frame::other_proto(ip(C4), ip(S4), IPPROTO_GRE),
        Frame::arp(),
    ];
    let layers = vec![
        Frame::tcp(c4, s4).syn().vlan(10).vlan(20),
        Frame::tcp(c4, s4).syn().vlan(10).vlan(20).vlan(30),
        Frame::udp(c4, s4).ipv4_options(8),
        Frame::udp(c4, s4).ipv4_fragment(0, true),
        Frame::udp(c4, s4).ipv4_fragment(1480, false),
        Frame::tcp(c6, s6)
            .syn()
            .ipv6_ext(Ipv6Ext::HopByHop)
            .ipv6_ext(Ipv6Ext::Auth),
        Frame::udp(c6, s6).ipv6_ext(Ipv6Ext::FragmentFirst),
        Frame::udp(c6, s6).ipv6_ext(Ipv6Ext::FragmentLater),
    ];
    let malformed = vec![
        Frame::tcp(c4, s4).syn().ihl(4),
        Frame::tcp(c4, s4).syn().ip_version(5),
        Frame::tcp(c4, s4).syn().total_len(10),
        Frame::tcp(c4, s4).syn().tcp_doff(3),
        Frame::tcp(c4, s4).flags(0x01),
        Frame::tcp(c4, s4).syn().truncate_l4(4),
        Frame::udp(c4, s4).transport_past_ip_length(),
        Frame::udp(c6, s6).truncate_l4(3),
    ];
    let bad_checksum = vec![
        Frame::tcp(c4, s4).syn().bad_ipv4_checksum(),
        Frame::udp(c4, s4).ipv4_options(8).bad_ipv4_checksum(),
    ];
    let no_session = vec![Frame::tcp(c4, s4).ack(), Frame::tcp(c6, s6).rst()];
    [
        ("tcp-v4", setup(0), tcp_life(C4, S4)),
        ("tcp-v6-loose", setup(1), tcp_life(C6, S6)),
        ("tcp-asymmetric", setup(4 | 8), tcp_life(C4, S4)),
        ("tcp-takeover", setup(4), tcp_life(C4, S4)),
        ("udp", setup(0), udp),
        ("icmp-and-untracked", setup(0), icmp),
        ("layers", setup(0), layers),
        ("malformed-drop", setup(0), malformed.clone()),
        ("malformed-pass", setup(2), malformed),
        ("ipv4-checksum-raw", setup(16), bad_checksum),
        ("no-session-strict", setup(0), no_session.clone()),
        ("no-session-loose", setup(1), no_session),
    ]
    .into_iter()
    .map(|(name, setup, frames)| {
        let built: Vec<Vec<u8>> = frames.iter().map(Frame::build).collect();
        named(name, xdp::input(setup, &built))
    })
    .collect()
}

/// Runs of backlog operations: tight (2 slots, 3 keys, every line overflowing) to roomy (64
/// slots, 40 keys), one to four peers, each a few hundred pseudo-random operations.
fn operations() -> Vec<Seed> {
    let shapes: [(&str, [u8; 3]); 4] = [
        ("tight", [1, 2, 2]),
        ("one-peer", [15, 0, 20]),
        ("four-peers", [31, 3, 40]),
        ("roomy", [63, 2, 39]),
    ];
    shapes
        .into_iter()
        .map(|(name, head)| {
            let mut seed = 0x2545_f491_4f6c_dd1d_u64 ^ u64::from(head[0]);
            let ops = (0..600).map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed.to_le_bytes()[0]
            });
            named(name, head.into_iter().chain(ops).collect())
        })
        .collect()
}

/// A netlink message of `kind` with sequence number `seq` and `body`, padded.
fn netlink(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    nlmsg::message(kind, 0, seq, body)
}

/// A netlink attribute of `kind` holding `value`, padded.
fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut a = Vec::with_capacity(len.next_multiple_of(4));
    a.extend_from_slice(&(len as u16).to_ne_bytes());
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(value);
    a.resize(len.next_multiple_of(4), 0);
    a
}

/// Datagrams as the kernel sends them to the agent's netlink sockets: an XFRM policy listing
/// and the default policies' answer, a refusal, a `netdev` family's answer, a link and a
/// route notification.
fn netlink_datagrams() -> Vec<Seed> {
    let policy = |dir: u8| {
        let mut body = vec![0u8; 168];
        body[160] = dir;
        netlink(19, 1, &body)
    };
    let mut listing = policy(1);
    listing.extend(policy(2));
    listing.extend(policy(0));
    listing.extend(netlink(3, 1, &0i32.to_ne_bytes()));
    let mut device = vec![1, 1, 0, 0];
    device.extend(attribute(1, &7u32.to_ne_bytes()));
    device.extend(attribute(3, &4u64.to_ne_bytes()));
    let mut link = vec![0u8; 16];
    link[4..8].copy_from_slice(&7i32.to_ne_bytes());
    link.extend(attribute(3, b"eth1\0"));
    let mut route = vec![2, 24, 0, 0, 254, 3, 0, 1, 0, 0, 0, 0];
    route.extend(attribute(1, &[198, 18, 1, 0]));
    vec![
        named("xfrm-policies", listing),
        named("xfrm-default", netlink(40, 1, &[2, 1, 2, 0])),
        named("refused", netlink(2, 1, &(-1i32).to_ne_bytes())),
        named("netdev-device", netlink(0x20, 1, &device)),
        named("link", netlink(16, 1, &link)),
        named("route", netlink(24, 1, &route)),
    ]
}
