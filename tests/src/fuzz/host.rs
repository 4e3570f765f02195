//! The checks of the targets that parse a peer's frames, a file or a control line: pure
//! functions of the input.

use std::{path::Path, time::Instant};

use anyhow::{ensure, Context as _, Result};
use hasync_agent::{
    cluster::MemberState,
    config::Config,
    control::{
        view::{CountersView, SessionPage, SessionsView},
        Request, Response,
    },
    datapath::sweep::Tally,
    provision::{MemberFiles, Spec},
    sync::{
        apply::{decide, Applier, Decision, OwnerRefusal, ZoneMap},
        backlog::Change,
        window::Window,
        wire::{Hello, LinkKind, Message, Op, Record, RecordLayout, PROTO_MAJOR, PROTO_MINOR},
    },
};
use hasync_common::{
    conflict::{resolve, Resolution},
    ApplyOp, ApplySource, Counters, FlowKey, MemberId, Session, SessionFlags, ZoneId,
};

/// Zones of the receiving member in the checks below.
const OUR_ZONES: [&str; 3] = ["trust", "untrust", "dmz"];
/// Zones of the sending peer: one we lack, one in another position.
const PEER_ZONES: [&str; 3] = ["untrust", "lab", "trust"];
/// The receiving member, the sending peer (alive) and a member that is down.
const LOCAL: MemberId = MemberId(1);
const PEER: MemberId = MemberId(2);
const DEAD: MemberId = MemberId(3);

fn names(zones: &[&str]) -> Vec<String> {
    zones.iter().map(|z| (*z).to_owned()).collect()
}

/// Names the file in errors; nothing is read from it.
fn fuzz_path() -> &'static Path {
    Path::new("fuzz-input.toml")
}

/// `wire_message`: decoding never panics in any record layout, and what decodes is in one
/// canonical form: it encodes to as many bytes as it came in, which decode to the same message
/// and encode to the same bytes again.
pub fn wire_message(data: &[u8]) -> Result<()> {
    for layout in RecordLayout::ALL {
        canonical(data, layout).with_context(|| format!("records in the {layout:?} layout"))?;
    }
    Ok(())
}

fn canonical(data: &[u8], layout: RecordLayout) -> Result<()> {
    let Ok(msg) = Message::decode_as(data, layout) else {
        return Ok(());
    };
    let mut bytes = Vec::new();
    msg.encode_as(&mut bytes, layout)
        .context("a decoded message does not encode")?;
    ensure!(
        bytes.len() == data.len(),
        "{} bytes decoded but encode to {}: {msg:?}",
        data.len(),
        bytes.len()
    );
    let again =
        Message::decode_as(&bytes, layout).context("a re-encoded message does not decode")?;
    ensure!(again == msg, "round trip changed {msg:?} into {again:?}");
    let mut twice = Vec::new();
    again.encode_as(&mut twice, layout)?;
    ensure!(twice == bytes, "encoding is not canonical for {msg:?}");
    Ok(())
}

/// `channel_payload`: a decrypted frame as the receiver handles it, in every record layout
/// it decodes in: decode, then for a hello the version and zone checks, for session records
/// the apply decision (zone translation, ownership, clock re-anchoring) and the conflict
/// rule, for a keepalive the member state, for an ack the release of frames in flight.
pub fn channel_payload(data: &[u8]) -> Result<()> {
    for layout in RecordLayout::ALL {
        if let Ok(msg) = Message::decode_as(data, layout) {
            handle(msg).with_context(|| format!("records in the {layout:?} layout"))?;
        }
    }
    Ok(())
}

fn handle(msg: Message) -> Result<()> {
    match msg {
        Message::Hello(hello) => check_hello(&hello),
        Message::Sessions { records, bulk, .. } => check_records(&records, bulk),
        Message::Keepalive(k) => {
            ensure!(!MemberState::from_u8(k.state).name().is_empty());
            Ok(())
        }
        Message::Ack { seq } => check_ack(seq),
        Message::BulkStart { .. } | Message::BulkEnd { .. } => Ok(()),
    }
}

fn our_hello() -> Hello {
    Hello {
        major: PROTO_MAJOR,
        minor: PROTO_MINOR,
        cluster_id: hasync_common::ClusterId(7),
        member: LOCAL,
        link: LinkKind::Ha4,
        boot_id: 1,
        fingerprint: [0; 32],
        zones: names(&OUR_ZONES),
        wants_bulk: false,
        fresh_table: false,
    }
}

/// Version compatibility is symmetric; every peer zone is either missing here or maps to our
/// zone of the same name.
fn check_hello(h: &Hello) -> Result<()> {
    let ours = our_hello();
    ensure!(
        ours.compatible(h) == h.compatible(&ours),
        "compatibility of {}.{} is not symmetric",
        h.major,
        h.minor
    );
    let map = ZoneMap::new(&ours.zones, &h.zones);
    let missing = map.missing(&h.zones);
    let mut mapped = 0;
    for (i, name) in h.zones.iter().enumerate() {
        let Ok(id) = u16::try_from(i + 1) else { break };
        match map.translate(ZoneId(id)) {
            Some(local) => {
                let ours_name = ours.zones.get(usize::from(local.0).wrapping_sub(1));
                ensure!(
                    ours_name == Some(name),
                    "peer zone {id} \"{name}\" maps to our zone {}",
                    local.0
                );
                mapped += 1;
            }
            None => ensure!(missing.contains(&name.as_str()), "zone \"{name}\" lost"),
        }
    }
    ensure!(mapped + missing.len() == h.zones.len(), "zones miscounted");
    Ok(())
}

/// Every record through the apply decision, as a full sync and as an update, into a fresh
/// table and an old one, at two clock readings (early after boot, and late), then through the
/// conflict rule.
fn check_records(records: &[Record], bulk: bool) -> Result<()> {
    let zones = ZoneMap::new(&names(&OUR_ZONES), &names(&PEER_ZONES));
    for fresh_table in [false, true] {
        let who = Applier {
            local: LOCAL,
            sender: PEER,
            bulk,
            members: [LOCAL, PEER, DEAD].into_iter().collect(),
            alive: [LOCAL, PEER].into_iter().collect(),
            fresh_table,
            reconciling: bulk.then_some(PEER),
        };
        for now_ns in [1_000_000_000, u64::MAX / 2] {
            for rec in records {
                let decision = decide(rec, &zones, now_ns, &who);
                check_decision(rec, &decision, &zones, now_ns, &who)
                    .with_context(|| format!("{rec:?} at {now_ns} ns: {decision:?}"))?;
            }
        }
    }
    Ok(())
}

fn check_decision(
    rec: &Record,
    decision: &Decision,
    zones: &ZoneMap,
    now_ns: u64,
    who: &Applier,
) -> Result<()> {
    let r = match decision {
        Decision::RefuseOwner(why) => {
            let unknown = !who.members.contains(rec.owner);
            ensure!(
                (*why == OwnerRefusal::Unknown) == unknown && rec.owner != who.sender,
                "refused the owner ({why:?})"
            );
            return Ok(());
        }
        Decision::Keep => {
            ensure!(rec.owner == who.local, "kept a record of another owner");
            return Ok(());
        }
        Decision::RefuseKey => {
            ensure!(!rec.key.is_trackable(), "refused a key a packet makes");
            return Ok(());
        }
        Decision::RefuseState => {
            ensure!(
                !state_of_protocol(rec),
                "refused a state its key's protocol has"
            );
            return Ok(());
        }
        Decision::RefuseZone => {
            let refusable = rec.op == Op::Upsert && zones.translate(rec.zone).is_none();
            ensure!(refusable, "refused a record whose zone we have");
            return Ok(());
        }
        Decision::Forward(r) => r,
    };
    ensure!(
        who.members.contains(rec.owner),
        "forwarded an unknown owner"
    );
    ensure!(r.key == rec.key, "the key changed");
    ensure!(r.key.is_trackable(), "forwarded a key no packet makes");
    let s = &r.session;
    let restore = r.op == ApplyOp::Restore as u8;
    ensure!(
        restore == (rec.owner == who.local),
        "ours back as another op, or another's as ours"
    );
    if r.op == ApplyOp::Upsert as u8 || restore {
        ensure!(
            state_of_protocol(rec),
            "forwarded a state its key's protocol lacks"
        );
        ensure!(
            !restore || !s.flags.has(SessionFlags::CONTESTABLE),
            "ours back contestable"
        );
        ensure!(
            s.created_ns <= now_ns && s.last_seen_ns <= now_ns,
            "session in the future"
        );
        ensure!(s.flags.has(SessionFlags::FROM_PEER), "not marked from peer");
        ensure!(
            usize::from(s.zone.0) <= OUR_ZONES.len(),
            "zone {} is not ours",
            s.zone.0
        );
    }
    check_resolution(r.op, s, who)
}

/// The conflict rule against no local copy, a copy equal to the record (never newer than
/// itself), for a delete, a copy of another owner (never deleted), and an older copy of
/// another owner that may not change hands (never replaced).
fn check_resolution(op: u8, incoming: &Session, who: &Applier) -> Result<()> {
    let reconciling = ApplySource {
        sender: who.sender,
        reconciling: who.reconciling.unwrap_or(MemberId::NONE),
    };
    let upsert = op == ApplyOp::Upsert as u8 || op == ApplyOp::Restore as u8;
    let absent = resolve(op, incoming, None, reconciling, true);
    let expected = if upsert {
        Resolution::Insert
    } else {
        Resolution::Keep
    };
    ensure!(absent == expected, "with no local copy: {absent:?}");
    let same = resolve(op, incoming, Some(incoming), reconciling, true);
    let ok = if upsert {
        matches!(same, Resolution::Keep | Resolution::Mark)
    } else {
        same == Resolution::Delete
    };
    ensure!(ok, "against a local copy equal to it: {same:?}");
    if !upsert {
        let other = Session {
            owner: MemberId(incoming.owner.0.wrapping_add(1)),
            ..*incoming
        };
        let got = resolve(op, incoming, Some(&other), reconciling, true);
        ensure!(
            got == Resolution::Keep,
            "deleted another owner's copy: {got:?}"
        );
    }
    if op == ApplyOp::Restore as u8 {
        let older = Session {
            version: incoming.version.wrapping_sub(1),
            ..*incoming
        };
        let got = resolve(op, incoming, Some(&older), reconciling, true);
        ensure!(
            got == Resolution::Keep,
            "ours back replaced a copy: {got:?}"
        );
    }
    let held = Session {
        owner: MemberId(incoming.owner.0.wrapping_add(1)),
        version: incoming.version.wrapping_sub(1),
        ..*incoming
    };
    let got = resolve(op, incoming, Some(&held), reconciling, false);
    ensure!(
        got != Resolution::Replace,
        "handed a copy that may not change hands to another owner: {got:?}"
    );
    Ok(())
}

/// Is the record's state one of its key's protocol's sessions (written out here, apart from the
/// rule the agent applies): TCP 0–4, UDP 5–6, the echo 7 for ICMP and ICMPv6.
fn state_of_protocol(rec: &Record) -> bool {
    match rec.key.proto {
        6 => rec.state <= 4,
        17 => (5..=6).contains(&rec.state),
        1 | 58 => rec.state == 7,
        _ => false,
    }
}

/// An ack releases exactly the frames in flight up to its sequence number.
fn check_ack(seq: u64) -> Result<()> {
    let mut window = Window::new(4);
    let now = Instant::now();
    for _ in 0..3 {
        let s = window.next_seq();
        window.sent(s, &[(FlowKey::default(), Change::Read)], now);
    }
    let released = window.ack(seq).len();
    let expected = usize::try_from(seq.min(3)).unwrap_or(3);
    ensure!(released == expected, "ack {seq} released {released} frames");
    ensure!(window.in_flight() == 3 - expected, "frames left in flight");
    Ok(())
}

/// `config`: TOML text through `Config::from_toml` and `validate`. A config that parses
/// renders back to TOML that parses to the same config; a valid one yields its datapath
/// config, fingerprint and addresses without panicking.
pub fn config(data: &[u8]) -> Result<()> {
    let Ok(text) = std::str::from_utf8(data) else {
        return Ok(());
    };
    let Ok(config) = Config::from_toml(fuzz_path(), text) else {
        return Ok(());
    };
    check_renders(&config)?;
    if config.validate(fuzz_path()).is_err() {
        return Ok(());
    }
    let local = config.local_member();
    ensure!(
        local.is_valid(),
        "valid config with local member {}",
        local.0
    );
    ensure!(config.datapath().local_member == local);
    ensure!(config.fingerprint() == config.fingerprint());
    let _ = (config.http_addr(), config.pin_dir(), config.agreed_lines());
    Ok(())
}

/// `config` renders to TOML that parses back to it.
fn check_renders(config: &Config) -> Result<()> {
    let text = toml::to_string(config).context("a parsed config does not render as TOML")?;
    let back = Config::from_toml(fuzz_path(), &text)
        .with_context(|| format!("the rendered config does not parse:\n{text}"))?;
    ensure!(
        back == *config,
        "the rendered config parses differently:\n{text}"
    );
    Ok(())
}

/// `control_request`: a control-socket line through `Request::parse_line`, then what the
/// agent does with it short of its datapath: the session filter and page over a few sessions,
/// the counters view, and the JSON answer. A request serialises to a line that parses back to
/// it.
pub fn control_request(data: &[u8]) -> Result<()> {
    let Some(Ok(request)) = Request::parse_line(data) else {
        return Ok(());
    };
    let line = serde_json::to_vec(&request)?;
    let back = Request::parse_line(&line).context("a serialised request is blank")?;
    ensure!(
        back.as_ref() == Ok(&request),
        "{request:?} round trips to {back:?}"
    );
    let response = answer(request);
    serde_json::to_vec(&response).context("the answer does not serialise")?;
    Ok(())
}

/// `kernel_netlink`: a datagram as the kernel's netlink sockets deliver it, through every
/// parser the agent has for them: link notifications and dumps, route and rule notifications,
/// the `netdev` family's answers, the XFRM policies' listing. None may panic or read past the
/// datagram; each reads at most a message per header it holds.
pub fn kernel_netlink(data: &[u8]) -> Result<()> {
    let seq = data
        .get(8..12)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_ne_bytes);
    // A message per header at most, and one more for broken framing at the end.
    let links = hasync_agent::netlink::decode(data);
    ensure!(
        links.len() <= data.len() / 16 + 1,
        "{} link messages",
        links.len()
    );
    let _ = hasync_agent::forwarding::source::change(data);
    if let Some(Ok(attrs)) = hasync_agent::forwarding::features::answer_in(data, seq) {
        ensure!(
            attrs.len() <= data.len(),
            "attributes longer than the datagram"
        );
    }
    if let Some((counted, _)) = hasync_agent::forwarding::ipsec::read_answer(data, seq) {
        ensure!(
            counted as usize <= data.len() / 16,
            "{counted} policies in {} bytes",
            data.len()
        );
    }
    Ok(())
}

/// The answer the agent would give with an empty datapath and a handful of sessions.
fn answer(request: Request) -> Response {
    match request {
        Request::ShowSessions {
            count_only,
            filter,
            offset,
            limit,
        } => {
            let zones = names(&OUR_ZONES);
            let page = SessionPage::new(count_only, filter, offset, limit, &zones);
            Response::from_result(page.map(|mut page| {
                for (key, session) in sample_sessions() {
                    page.add(&key, &session, session.last_seen_ns);
                }
                page.finish(65536, 8192)
            }))
        }
        Request::ShowSessionCounts {} => {
            let mut tally = Tally::default();
            for (_, session) in sample_sessions() {
                tally.add(&session);
            }
            let age = std::time::Duration::from_secs(2);
            Response::ok(SessionsView::tallied(&tally, age, 65536, 8192))
        }
        Request::ShowCounters { prefix } => {
            Response::ok(CountersView::new(&Counters::default(), prefix.as_deref()))
        }
        other => Response::error(other.name()),
    }
}

/// A TCP, a UDP and an ICMP session, in and out of zones.
fn sample_sessions() -> Vec<(FlowKey, Session)> {
    [(6, 443, 1), (17, 53, 3), (1, 7, 0)]
        .into_iter()
        .map(|(proto, port, zone)| {
            let key = FlowKey {
                addr_lo: [u32::from_ne_bytes([198, 18, 0, 10]), 0, 0, 0],
                addr_hi: [u32::from_ne_bytes([198, 18, 1, 20]), 0, 0, 0],
                port_lo: 40000u16.to_be(),
                port_hi: u16::to_be(port),
                proto,
                family: hasync_common::Family::V4 as u8,
                ..FlowKey::default()
            };
            let session = Session {
                owner: MemberId(zone as u8 + 1),
                zone: ZoneId(zone),
                ..Session::default()
            };
            (key, session)
        })
        .collect()
}

/// `provision_spec`: spec text through `Spec::parse` and `configs`. Every member's config
/// renders (`MemberFiles`, as `hasync provision` writes it) to TOML that parses back to that
/// config, and all members share one fingerprint.
pub fn provision_spec(data: &[u8]) -> Result<()> {
    let Ok(text) = std::str::from_utf8(data) else {
        return Ok(());
    };
    let Ok(spec) = Spec::parse(fuzz_path(), text) else {
        return Ok(());
    };
    let Ok(configs) = spec.configs(fuzz_path()) else {
        return Ok(());
    };
    let mut fingerprints = Vec::new();
    for config in configs {
        let _ = config.validate(fuzz_path());
        fingerprints.push(config.fingerprint());
        let files = MemberFiles::new(config.clone(), fuzz_path())
            .context("a provisioned config does not render")?;
        let back = Config::from_toml(fuzz_path(), &files.config_text).with_context(|| {
            format!(
                "a provisioned config does not parse:\n{}",
                files.config_text
            )
        })?;
        ensure!(
            back == config,
            "a provisioned config parses differently:\n{}",
            files.config_text
        );
    }
    ensure!(
        fingerprints.windows(2).all(|w| w[0] == w[1]),
        "members of one spec disagree on the fingerprint"
    );
    Ok(())
}

/// `backlog`: operations on the queue of what the peers still have to receive (session
/// changes of a few keys, frames taken, links failing, acks, peers falling silent, full
/// syncs), checked op by op against the model of what each peer is owed
/// (`hasync_agent::sync::backlog::model`, which the agent's own random-operations test runs
/// too).
pub fn backlog(data: &[u8]) -> Result<()> {
    hasync_agent::sync::backlog::model::run(data).map_err(anyhow::Error::msg)
}
