//! Attackers on the sync network: an intruder namespace plugged into the HA4 bridge at an
//! address no member has, from which come an unauthenticated connection flood and a hostile
//! authenticated peer. The hostile peer holds the cluster key and speaks the real protocol
//! (`hasync_agent::sync::{channel, wire}`), from the intruder's address or from a member's.

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use hasync_agent::{
    config::{read_cluster_key, Config},
    lab::{netns::run_in, topology::Link, LabCluster},
    sync::{
        channel,
        wire::{Hello, LinkKind, Message, Op, Record, TcpState, PROTO_MAJOR, PROTO_MINOR},
    },
};
use hasync_common::{FlowKey, MemberId, State, ZoneId};

use crate::{
    cluster::{Row, Table},
    frame::Frame,
    netns::{Lab, Netns},
};

/// The intruder's address on HA4: in the members' subnet, but no member's.
pub const INTRUDER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 200);
/// A member id no config lists.
pub const UNKNOWN_MEMBER: u8 = 99;

/// A namespace on the HA4 bridge at [`INTRUDER_V4`]; deleted (with its link) on drop.
pub struct Intruder {
    ns: Netns,
    _lab: Lab,
}

impl Intruder {
    pub fn plug(lab: &LabCluster) -> Result<Intruder, String> {
        let e = |e: anyhow::Error| format!("intruder namespace: {e:#}");
        let tag = lab.topology().prefix().trim_end_matches('-').to_owned();
        let l = Lab::new(&format!("{tag}-x")).map_err(e)?;
        let ns = l.netns("intr").map_err(e)?;
        lab.topology()
            .plug(
                ns.name(),
                "ha4",
                Link::Ha4,
                "intr-ha4",
                &format!("{INTRUDER_V4}/24"),
            )
            .map_err(|e| format!("plugging the intruder into HA4: {e}"))?;
        Ok(Intruder { ns, _lab: l })
    }

    pub fn ns(&self) -> &str {
        self.ns.name()
    }
}

/// Member `k`'s sync listener on HA4.
pub fn ha4_listener(lab: &LabCluster, k: u8) -> Result<SocketAddr, String> {
    let cfg = Config::load(&lab.config_path(k)).map_err(|e| e.to_string())?;
    Ok(SocketAddr::new(
        IpAddr::V4(Link::Ha4.v4(k).0),
        cfg.cluster.sync_port,
    ))
}

/// Opens up to `count` TCP connections from `ns` to `target` within 10 s; half of them send
/// a frame header announcing 65,535 bytes and then a few, the others nothing. Holds them
/// `hold`, then closes them all. Returns how many connected.
pub fn connection_flood(ns: &str, target: SocketAddr, count: usize, hold: Duration) -> usize {
    let run = run_in(ns, move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut open = Vec::new();
        for i in 0..count {
            if Instant::now() >= deadline {
                break;
            }
            let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_millis(200)) else {
                continue;
            };
            if i % 2 == 0 {
                let _ = s.write_all(&[0xff, 0xff, 1, 2, 3, 4]);
            }
            open.push(s);
        }
        let n = open.len();
        std::thread::sleep(hold);
        n
    });
    run.unwrap_or(0)
}

/// How a hostile session went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostileOutcome {
    /// The Noise handshake completed (the key was accepted).
    pub handshake: bool,
    /// The target answered our hello (it took us for the member we claimed).
    pub hello_answered: bool,
    pub frames_sent: usize,
    /// Acks the target sent for our frames.
    pub acks: Vec<u64>,
    /// Why it ended early, if it did.
    pub ended: Option<String>,
}

/// Who the hostile client claims to be and where it connects from.
#[derive(Clone, Debug)]
pub struct Claim {
    /// The namespace it runs in (the intruder's, or a member's).
    pub ns: String,
    /// The local address it binds.
    pub from: IpAddr,
    /// The member id its hello claims.
    pub member: u8,
    /// Whether `from` is the claimed member's own address (then it may change the claimed
    /// member's sessions, so it sends nothing that would).
    pub genuine: bool,
}

fn key_of(row: &Row) -> Option<FlowKey> {
    let (a, b) = (
        SocketAddr::new(row.src, row.sport),
        SocketAddr::new(row.dst, row.dport),
    );
    match row.proto.as_str() {
        "tcp" => Some(Frame::tcp(a, b).key()),
        "udp" => Some(Frame::udp(a, b).key()),
        _ => None,
    }
}

fn record(op: Op, key: FlowKey, owner: u8, version: u32, state: State) -> Record {
    Record {
        op,
        key,
        state: state as u8,
        owner: MemberId(owner),
        flags: 0,
        zone: ZoneId(1),
        tcp_flags: [0; 2],
        version,
        age_ms: 1_000,
        idle_ms: 0,
        packets: [1; 2],
        bytes: [100; 2],
        tcp: TcpState::default(),
        // The largest ticket: a slot of the claimed member's own part, whatever it says.
        ticket: Some(u32::MAX),
    }
}

/// How many full syncs the hostile peer starts, one after the other, without ending any.
pub const BULK_STARTS: u32 = 200;

/// The hostile frames for member `target`, whose table is `table`, claiming `claimed`: new
/// sessions of a third member (neither `claimed` nor `target`: refused as foreign whatever the
/// table holds) and of unknown owners, deletes and huge-version rewrites (state closed,
/// ownership stolen) of other owners' sessions, and replays; with `bulk`, the same in a full
/// sync too.
///
/// Without `bulk` nothing here is the claimed member's to change, even for a client that
/// truly is that member. A full sync is left out then: its end legitimately drops the
/// receiver's replicas of the claimed member's sessions that it did not carry.
pub fn hostile_frames(
    table: &Table,
    claimed: u8,
    target: u8,
    members: u8,
    bulk: bool,
) -> Vec<Message> {
    let victims: Vec<(FlowKey, u8)> = table
        .iter()
        .filter(|r| r.owner != claimed)
        .filter_map(|r| key_of(r).map(|k| (k, r.owner)))
        .take(60)
        .collect();
    // A chaos run has 3 members or more; with 2 there is no third.
    let other = (1..=members)
        .find(|&m| m != claimed && m != target)
        .unwrap_or(UNKNOWN_MEMBER);
    let fresh = |i: u16| {
        Frame::udp(
            SocketAddr::from(([198, 18, 0, 250], 40_000 + i)),
            SocketAddr::from(([198, 18, 1, 250], 9)),
        )
        .key()
    };
    let new: Vec<Record> = (0..40)
        .map(|i| {
            let owner = [other, UNKNOWN_MEMBER, 0, 255][usize::from(i % 4)];
            record(Op::Upsert, fresh(i), owner, 1, State::UdpReplied)
        })
        .collect();
    let deletes: Vec<Record> = victims
        .iter()
        .map(|&(k, o)| record(Op::Delete, k, o, u32::MAX - 7, State::Closed))
        .collect();
    let rewrites: Vec<Record> = victims
        .iter()
        .enumerate()
        .map(|(i, &(k, o))| {
            let owner = if i % 2 == 0 { o } else { claimed };
            record(Op::Upsert, k, owner, 0xFFFF_FFF0, State::Closed)
        })
        .collect();
    let sessions = |seq, bulk, records: &Vec<Record>| Message::Sessions {
        seq,
        bulk,
        records: records.clone(),
    };
    let mut frames = vec![
        sessions(1, false, &new),
        sessions(2, false, &rewrites),
        sessions(3, false, &deletes),
        // Replays: the same sequence numbers again, then an old one after a newer (on this one
        // connection each shows the last one's number false, and is taken: its records meet
        // the owner checks again).
        sessions(1, false, &new),
        sessions(3, false, &deletes),
        sessions(2, false, &rewrites),
    ];
    if bulk {
        // A full sync carrying other members' sessions (all of them alive).
        frames.extend([
            Message::BulkStart { bulk_id: 9 },
            sessions(4, true, &rewrites),
            sessions(5, true, &new),
            Message::BulkEnd {
                bulk_id: 9,
                records: (rewrites.len() + new.len()) as u64,
            },
        ]);
    }
    // A sequence number far ahead of everything, then wrapped around.
    frames.extend([
        sessions(u64::MAX, false, &rewrites),
        sessions(6, false, &deletes),
    ]);
    // Full syncs started by the hundred and never ended (each abandons the last, and its
    // walk of the table), and an ack of a frame never sent.
    frames.extend((100..100 + BULK_STARTS).map(|bulk_id| Message::BulkStart { bulk_id }));
    frames.push(Message::Ack { seq: u64::MAX });
    frames
}

fn hello(cfg: &Config, claimed: u8) -> Hello {
    let boot_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    Hello {
        major: PROTO_MAJOR,
        minor: PROTO_MINOR,
        cluster_id: cfg.cluster.id,
        member: MemberId(claimed),
        link: LinkKind::Ha4,
        boot_id,
        fingerprint: cfg.fingerprint(),
        zones: cfg.zone_names(),
        wants_bulk: false,
        fresh_table: false,
    }
}

/// Runs one hostile session against member `target`: handshake with the cluster key, a hello
/// claiming `claim.member`, then `frames`, reading whatever comes back for a second.
pub fn hostile_peer(
    lab: &LabCluster,
    target: u8,
    claim: &Claim,
    frames: Vec<Message>,
) -> Result<HostileOutcome, String> {
    let cfg = Config::load(&lab.config_path(target)).map_err(|e| e.to_string())?;
    let psk = read_cluster_key(&cfg.cluster.key_file).map_err(|e| e.to_string())?;
    let to = ha4_listener(lab, target)?;
    let hello = hello(&cfg, claim.member);
    let from = claim.from;
    run_in(&claim.ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        rt.block_on(session(from, to, psk, hello, frames))
    })
    .map_err(|e| e.to_string())?
}

async fn session(
    from: IpAddr,
    to: SocketAddr,
    psk: [u8; 32],
    hello: Hello,
    frames: Vec<Message>,
) -> Result<HostileOutcome, String> {
    let step = Duration::from_secs(3);
    let mut out = HostileOutcome::default();
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .bind(SocketAddr::new(from, 0))
        .map_err(|e| format!("bind {from}: {e}"))?;
    let stream = tokio::time::timeout(step, socket.connect(to))
        .await
        .map_err(|_| format!("connecting to {to} timed out"))?
        .map_err(|e| format!("connecting to {to}: {e}"))?;
    let (mut tx, mut rx) = match tokio::time::timeout(step, channel::initiate(stream, &psk)).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Ok(ended(out, format!("handshake: {e}"))),
        Err(_) => return Ok(ended(out, "handshake timed out".into())),
    };
    out.handshake = true;
    match tokio::time::timeout(step, tx.send(&Message::Hello(hello))).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Ok(ended(out, format!("sending hello: {e}"))),
        Err(_) => return Ok(ended(out, "the target stopped reading (hello)".into())),
    }
    match tokio::time::timeout(step, rx.recv()).await {
        Ok(Ok((Message::Hello(_), _))) => out.hello_answered = true,
        Ok(Ok((m, _))) => return Ok(ended(out, format!("answered {m:?}"))),
        Ok(Err(e)) => return Ok(ended(out, format!("refused: {e}"))),
        Err(_) => return Ok(ended(out, "no hello back".into())),
    }
    // Bounded: a target that stops reading must not hang the run.
    for f in &frames {
        match tokio::time::timeout(step, tx.send(f)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Ok(ended(out, format!("sending: {e}"))),
            Err(_) => return Ok(ended(out, "the target stopped reading".into())),
        }
        out.frames_sent += 1;
    }
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Ok((m, _))) = tokio::time::timeout_at(until, rx.recv()).await {
        if let Message::Ack { seq } = m {
            out.acks.push(seq);
        }
    }
    Ok(out)
}

fn ended(mut out: HostileOutcome, why: String) -> HostileOutcome {
    out.ended = Some(why);
    out
}

#[cfg(test)]
mod tests {
    use hasync_agent::sync::apply::{decide, Applier, Decision, MemberSet, OwnerRefusal, ZoneMap};

    use super::*;

    /// What the target's owner check makes of each record the impersonator sends, all members
    /// alive, outside a full sync.
    fn refusals(frames: &[Message], claimed: u8, target: u8, members: u8) -> Vec<Decision> {
        let all: MemberSet = (1..=members).map(MemberId).collect();
        let who = Applier {
            local: MemberId(target),
            sender: MemberId(claimed),
            bulk: false,
            members: all,
            alive: all,
            fresh_table: false,
            reconciling: None,
        };
        let zones = ZoneMap::new(&["z".into()], &["z".into()]);
        frames
            .iter()
            .filter_map(|m| match m {
                Message::Sessions { records, .. } => Some(records),
                _ => None,
            })
            .flatten()
            .map(|r| decide(r, &zones, 0, &who))
            .collect()
    }

    /// Whatever the target's table holds (here nothing), the impersonator's frames reach every
    /// owner check the chaos run asks for: a record of another live member's session, refused
    /// as foreign, and records of unknown owners. (The seed-31 run met a table with none of a
    /// third member's sessions, and no foreign-owner refusal was counted.)
    #[test]
    fn the_impersonators_frames_reach_the_owner_checks_on_an_empty_table() {
        for (claimed, target, members) in [(1, 2, 3), (1, 3, 3), (2, 3, 3), (1, 2, 16)] {
            let frames = hostile_frames(&Table::new(), claimed, target, members, false);
            let said = refusals(&frames, claimed, target, members);
            for want in [OwnerRefusal::Foreign, OwnerRefusal::Unknown] {
                assert!(
                    said.contains(&Decision::RefuseOwner(want)),
                    "fw{claimed} speaking to fw{target} of {members}: no {want:?} refusal"
                );
            }
        }
    }
}
