//! Interface state from the kernel's routing netlink, in the agent's network namespace: one
//! RTM_GETLINK dump at start, then the RTM_NEWLINK / RTM_DELLINK notifications of the link
//! multicast group. A cable pull is seen as soon as the kernel sees it, and a failure to talk
//! to the kernel leaves the last known state in place: it never reads as "link down".

use std::{
    collections::BTreeMap,
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator, Parseable,
    ParseableParametrized, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_route::{
    link::{InfoKind, LinkAttribute, LinkFlags, LinkHeader, LinkInfo, LinkMessage, LinkXdp},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

/// The link multicast group (RTNLGRP_LINK).
const RTNLGRP_LINK: u32 = 1;
/// Receive buffer for notifications: a burst of changes on a busy host fits.
const RECV_BUFFER: usize = 1 << 20;
/// How long to wait before trying again after the socket failed (also the longest wait for
/// a message before looking at whether a dump is due).
const RETRY: Duration = Duration::from_secs(1);
/// A dump not ended after this long is given up and asked for again.
const DUMP_TIMEOUT: Duration = Duration::from_secs(5);
/// The shortest time between the starts of two dumps: a dump that came back dirty (an
/// overrun, a message that does not parse) is asked for again this long after the last one
/// began, not at once; each dirty one in a row doubles the gap, up to [`DUMP_GAP_MAX`] (a
/// message that never parses would otherwise have the whole table read five times a second).
const DUMP_GAP: Duration = Duration::from_millis(200);
/// The longest gap between dumps that keep coming back dirty.
const DUMP_GAP_MAX: Duration = Duration::from_secs(5);
/// Routing netlink message types (linux/rtnetlink.h).
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
/// A netlink message header's length, and a link message's (`struct ifinfomsg`).
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

/// One interface as the kernel last described it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Iface {
    pub index: u32,
    /// Administratively up with its carrier on (`IFF_UP` and `IFF_RUNNING`).
    pub up: bool,
    pub mtu: Option<u32>,
    /// Its Ethernet address (`None`: it has none, or not six bytes long).
    pub mac: Option<[u8; 6]>,
    /// The XDP programs attached to it, by mode.
    pub xdp: XdpPrograms,
    /// The interface it is stacked on, when it is a VLAN, macvlan, macvtap or ipvlan device
    /// whose lower device is in this namespace (IFLA_LINK): its frames cross that one.
    pub lower: Option<u32>,
    /// Times its carrier went down since it was made (IFLA_CARRIER_DOWN_COUNT; 0 where the
    /// kernel does not say): a loss so short that the kernel reported only its end (it
    /// coalesces link events within a second) still counts here.
    pub carrier_downs: u32,
}

/// The ids of the XDP programs attached to an interface (IFLA_XDP), by mode. Attaching or
/// detaching XDP sends no notification: only a fresh dump ([`list_now`]) has them right.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpPrograms {
    /// Native (driver) mode.
    pub native: Option<u32>,
    /// Generic (skb) mode.
    pub generic: Option<u32>,
}

/// Interfaces by name.
pub type Ifaces = BTreeMap<String, Iface>;

/// One message from the routing netlink socket, as far as interface state goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    /// The request it answers (0 for a notification).
    pub seq: u32,
    /// The kernel's `NLM_F_*` flags (`NLM_F_DUMP_INTR`: the dump changed under it).
    pub flags: u16,
    pub body: Body,
}

/// What a message says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// An interface exists with this state.
    Present(String, Iface),
    /// The interface at this index is gone.
    Gone(u32),
    /// A dump ended, with the kernel's code (0: complete).
    Done(i32),
    /// The request failed, with this code.
    Error(i32),
    /// A message that could not be parsed: its information is lost.
    Unparsed,
    /// Anything else (other families, other message types).
    Other,
}

/// Why the watcher could not start or stopped reading.
#[derive(Clone, Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("routing netlink socket: {0}")]
    Socket(#[source] Arc<io::Error>),
}

/// Splits one datagram into its messages. A link message with an attribute that does not
/// parse is read without it ([`link_in_part`]); any other message that does not parse becomes
/// [`Body::Unparsed`] (one odd message must not hide the others' news); a datagram whose
/// framing is broken ends there, with an [`Body::Unparsed`] for what was lost.
pub fn decode(mut buf: &[u8]) -> Vec<Msg> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let Ok(frame) = NetlinkBuffer::new_checked(buf) else {
            out.push(Msg {
                seq: 0,
                flags: 0,
                body: Body::Unparsed,
            });
            break;
        };
        let (len, seq, flags, kind) = (
            frame.length() as usize,
            frame.sequence_number(),
            frame.flags(),
            frame.message_type(),
        );
        let Some(one) = buf.get(..len) else { break };
        let body = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(one) {
            Ok(m) => body(m.payload),
            Err(_) => link_in_part(kind, one).unwrap_or(Body::Unparsed),
        };
        out.push(Msg { seq, flags, body });
        // Messages are 4-byte aligned; `new_checked` guarantees `len` ≥ a header.
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    out
}

/// The link attributes [`present`] reads (IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK,
/// IFLA_LINKINFO, IFLA_LINK_NETNSID, IFLA_XDP, IFLA_CARRIER_DOWN_COUNT): one of them lost
/// would read as a definite, wrong state (no XDP program: "detached"; no lower device: a VLAN
/// unbound), so a message that lost one is not used; of an IFLA_LINKINFO that does not parse,
/// its kind, when that parses, is enough.
const READ_KINDS: [u16; 8] = [1, 3, 4, 5, IFLA_LINKINFO, 37, 43, 48];
/// IFLA_LINKINFO, and the kind nested in it (IFLA_INFO_KIND).
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;

/// A link message that the netlink library could not parse whole, read attribute by
/// attribute: one it reads otherwise than this kernel writes it (rust-netlink/
/// netlink-packet-route#151 is such a case, for every message of one interface) is left out
/// when it is none the agent reads ([`READ_KINDS`]), the others are kept. Parsed whole or not
/// at all, that one interface hid every other's state: no dump ended clean, and link groups
/// were never judged. `None` (unparsed: the table is read again) when the header does not
/// parse, an attribute the agent reads is lost, the attributes' framing breaks, or it is no
/// link message; a DELLINK needs its header alone. Logged once per agent, with the
/// attributes left out.
fn link_in_part(kind: u16, message: &[u8]) -> Option<Body> {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    let payload = message.get(NLMSG_HDRLEN..)?;
    let mut m = LinkMessage::default();
    m.header = LinkHeader::parse(payload).ok()?;
    if kind == RTM_DELLINK {
        return Some(body(NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::DelLink(m),
        )));
    }
    if kind != RTM_NEWLINK {
        return None;
    }
    let family = m.header.interface_family;
    if family != AddressFamily::Unspec {
        return Some(Body::Other); // not an interface's state (`body`)
    }
    let mut left_out = Vec::new();
    for nla in NlasIterator::new(payload.get(IFINFOMSG_LEN..)?) {
        let nla = nla.ok()?;
        match LinkAttribute::parse_with_param(&nla, family) {
            Ok(a) => m.attributes.push(a),
            Err(_) if nla.kind() == IFLA_LINKINFO => {
                // Its kind is all `present` reads of it, and the kind's own data is what a
                // release of the library most often reads otherwise than the kernel writes.
                m.attributes
                    .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(info_kind(
                        nla.value(),
                    )?)]));
                left_out.push(IFLA_LINKINFO);
            }
            Err(_) if READ_KINDS.contains(&nla.kind()) => return None,
            Err(_) => left_out.push(nla.kind()),
        }
    }
    if !LOGGED.swap(true, Ordering::Relaxed) {
        warn!(
            interface = m.header.index,
            ?left_out,
            "a link message has attributes this release cannot read, none of them one the agent uses; the others are used (logged once)"
        );
    }
    Some(body(NetlinkPayload::InnerMessage(
        RouteNetlinkMessage::NewLink(m),
    )))
}

/// The kind (IFLA_INFO_KIND) among the attributes nested in an IFLA_LINKINFO.
fn info_kind(nested: &[u8]) -> Option<InfoKind> {
    NlasIterator::new(nested)
        .map_while(Result::ok)
        .find(|nla| nla.kind() == IFLA_INFO_KIND)
        .and_then(|nla| InfoKind::parse(&nla).ok())
}

fn body(payload: NetlinkPayload<RouteNetlinkMessage>) -> Body {
    // Only AF_UNSPEC link messages describe interfaces: a bridge port's AF_BRIDGE DELLINK
    // (leaving its bridge) does not mean the interface is gone.
    let link_family = |m: &LinkMessage| m.header.interface_family == AddressFamily::Unspec;
    match payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) if link_family(&m) => {
            present(&m).unwrap_or(Body::Other)
        }
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) if link_family(&m) => {
            Body::Gone(m.header.index)
        }
        NetlinkPayload::Done(d) => Body::Done(d.code),
        NetlinkPayload::Error(e) => Body::Error(e.code.map_or(0, |c| c.get())),
        _ => Body::Other,
    }
}

fn present(m: &LinkMessage) -> Option<Body> {
    let mut name = None;
    let mut mtu = None;
    let mut mac = None;
    let mut xdp = XdpPrograms::default();
    let (mut link, mut other_netns, mut stacked) = (None, false, false);
    let mut carrier_downs = 0;
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Mtu(v) => mtu = Some(*v),
            LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::Xdp(nlas) => xdp = xdp_programs(nlas),
            LinkAttribute::Link(index) => link = Some(*index),
            LinkAttribute::LinkNetNsId(_) => other_netns = true,
            LinkAttribute::LinkInfo(infos) => stacked = is_stacked(infos),
            LinkAttribute::CarrierDownCount(n) => carrier_downs = *n,
            _ => {}
        }
    }
    let want = LinkFlags::Up | LinkFlags::Running;
    let iface = Iface {
        index: m.header.index,
        up: m.header.flags.contains(want),
        mtu,
        mac,
        xdp,
        lower: link.filter(|_| stacked && !other_netns),
        carrier_downs,
    };
    Some(Body::Present(name?, iface))
}

/// Is the device one whose frames cross its lower device's receive path (where XDP sees
/// them), as a VLAN's tagged frames do? (A veth's IFLA_LINK names its peer: not stacked.)
fn is_stacked(infos: &[LinkInfo]) -> bool {
    infos.iter().any(|i| {
        matches!(
            i,
            LinkInfo::Kind(
                InfoKind::Vlan | InfoKind::MacVlan | InfoKind::MacVtap | InfoKind::IpVlan
            )
        )
    })
}

fn xdp_programs(nlas: &[LinkXdp]) -> XdpPrograms {
    let mut xdp = XdpPrograms::default();
    for nla in nlas {
        match nla {
            LinkXdp::DrvProgId(id) => xdp.native = Some(*id),
            LinkXdp::SkbProgId(id) => xdp.generic = Some(*id),
            _ => {}
        }
    }
    xdp
}

/// A dump in flight: what it listed so far.
#[derive(Debug)]
struct Dump {
    seq: u32,
    started: Instant,
    table: Ifaces,
    /// Something was lost or changed under it: it cannot stand for the whole set.
    dirty: bool,
}

/// The interface table that the messages build. One dump at a time; a dump becomes the
/// whole table only if it ended clean (nothing lost, not interrupted), otherwise another is
/// asked for and the table stays as notifications left it.
#[derive(Debug)]
pub struct Tracker {
    current: Ifaces,
    dump: Option<Dump>,
    need_dump: bool,
    /// When the last dump was asked for ([`DUMP_GAP`]).
    last_dump: Option<Instant>,
    /// Dumps that ended dirty since the last clean one.
    dirty_in_a_row: u32,
    /// At least one clean dump has ended: the table is known.
    known: bool,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            current: Ifaces::new(),
            dump: None,
            need_dump: true,
            last_dump: None,
            dirty_in_a_row: 0,
            known: false,
        }
    }
}

impl Tracker {
    /// Should a dump be asked for now (one is needed, none is in flight and the last began
    /// [`Tracker::gap`] ago or more)? A dump whose end never came (lost in an overflow) is
    /// given up after [`DUMP_TIMEOUT`].
    pub fn wants_dump(&mut self) -> bool {
        if self
            .dump
            .as_ref()
            .is_some_and(|d| d.started.elapsed() > DUMP_TIMEOUT)
        {
            self.dump = None;
            self.ended_dirty();
        }
        let paced = self.last_dump.is_none_or(|t| t.elapsed() >= self.gap());
        self.need_dump && self.dump.is_none() && paced
    }

    /// The gap between the starts of two dumps now ([`DUMP_GAP`], doubled per dirty dump in
    /// a row after the first).
    fn gap(&self) -> Duration {
        let doubled = DUMP_GAP.saturating_mul(1 << self.dirty_in_a_row.saturating_sub(1).min(8));
        doubled.min(DUMP_GAP_MAX)
    }

    /// A dump ended without becoming the table: another is needed.
    fn ended_dirty(&mut self) {
        self.need_dump = true;
        self.dirty_in_a_row = self.dirty_in_a_row.saturating_add(1);
    }

    /// How long to wait for a message before asking [`Tracker::wants_dump`] again.
    fn wait(&self) -> Duration {
        if self.need_dump {
            self.gap()
        } else {
            RETRY
        }
    }

    /// A dump was asked for with `seq`.
    pub fn dump_started(&mut self, seq: u32) {
        self.need_dump = false;
        self.last_dump = Some(Instant::now());
        self.dump = Some(Dump {
            seq,
            started: Instant::now(),
            table: Ifaces::new(),
            dirty: false,
        });
    }

    /// Messages were lost (the socket overflowed, or could not be read): the table must be
    /// read again whole.
    pub fn lost(&mut self) {
        self.need_dump = true;
        if let Some(d) = self.dump.as_mut() {
            d.dirty = true;
        }
    }

    /// Applies `msgs`; true when the known table changed.
    pub fn apply(&mut self, msgs: Vec<Msg>) -> bool {
        let before = self.known().cloned();
        for m in msgs {
            self.apply_one(m);
        }
        before.as_ref() != self.known()
    }

    fn apply_one(&mut self, m: Msg) {
        let ours = self
            .dump
            .as_ref()
            .is_some_and(|d| d.seq == m.seq && m.seq != 0);
        if ours && m.flags & NLM_F_DUMP_INTR != 0 {
            self.lost();
        }
        match m.body {
            Body::Present(name, iface) => {
                // A notification read while a dump runs is newer than what the dump listed
                // of that interface before it (an up or down does not interrupt a dump): the
                // dump's table takes it too, or its end would bring the older state back.
                if let Some(d) = self.dump.as_mut() {
                    d.table.retain(|_, i| i.index != iface.index);
                    d.table.insert(name.clone(), iface);
                }
                // A rename: the old name no longer exists.
                self.current.retain(|_, i| i.index != iface.index);
                self.current.insert(name, iface);
            }
            Body::Gone(index) => {
                self.current.retain(|_, i| i.index != index);
                if let Some(d) = self.dump.as_mut() {
                    d.table.retain(|_, i| i.index != index);
                }
            }
            Body::Done(code) if ours => {
                if let Some(d) = self.dump.take() {
                    if code == 0 && !d.dirty {
                        self.current = d.table;
                        self.known = true;
                        self.dirty_in_a_row = 0;
                    } else {
                        self.ended_dirty();
                    }
                }
            }
            Body::Error(code) if ours && code != 0 => {
                self.dump = None;
                self.ended_dirty();
            }
            Body::Unparsed => self.lost(),
            Body::Done(_) | Body::Error(_) | Body::Other => {}
        }
    }

    /// The table, once a clean dump has ended.
    pub fn known(&self) -> Option<&Ifaces> {
        self.known.then_some(&self.current)
    }
}

/// The interface table, kept current by a task reading netlink.
#[derive(Clone, Debug)]
pub struct LinkWatch {
    rx: watch::Receiver<Option<Arc<Ifaces>>>,
}

impl LinkWatch {
    /// Opens the socket, asks for a dump and starts the reading task (inside a tokio
    /// runtime), which runs until every watch is dropped: its handle, to see it end.
    pub fn spawn() -> Result<(LinkWatch, JoinHandle<()>), NetlinkError> {
        let socket = open().map_err(|e| NetlinkError::Socket(Arc::new(e)))?;
        let (tx, rx) = watch::channel(None);
        let reader = tokio::spawn(read_loop(socket, tx));
        Ok((LinkWatch { rx }, reader))
    }

    /// The table now (`None` until the first dump has ended).
    pub fn now(&self) -> Option<Arc<Ifaces>> {
        self.rx.borrow().clone()
    }

    /// Waits for the next change of the table; `None` when the reading task is gone.
    pub async fn changed(&mut self) -> Option<Arc<Ifaces>> {
        self.rx.changed().await.ok()?;
        self.rx.borrow_and_update().clone()
    }
}

/// Lists the interfaces now, XDP programs included: one dump on a socket of its own, waiting
/// at most [`RETRY`] for each reply. A dump that changed under it is asked for again, a few
/// times.
pub fn list_now() -> io::Result<Ifaces> {
    let mut socket = netlink_sys::Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket2::SockRef::from(&socket).set_read_timeout(Some(RETRY))?;
    let mut tracker = Tracker::default();
    for seq in 1..=3 {
        socket.send(&dump_request(seq), 0)?;
        tracker.dump_started(seq);
        while tracker.dump.is_some() {
            let (buf, from) = socket.recv_from_full()?;
            if from.port_number() != 0 {
                continue;
            }
            let msgs = decode(&buf);
            for m in &msgs {
                match m.body {
                    Body::Error(code) if code != 0 => {
                        return Err(io::Error::from_raw_os_error(code.saturating_neg()))
                    }
                    Body::Unparsed => {
                        return Err(io::Error::other(
                            "the kernel sent a link message that does not parse",
                        ))
                    }
                    _ => {}
                }
            }
            tracker.apply(msgs);
        }
        if let Some(table) = tracker.known() {
            return Ok(table.clone());
        }
    }
    Err(io::Error::other(
        "the interface dump kept changing under it",
    ))
}

fn open() -> io::Result<TokioSocket> {
    let mut socket = TokioSocket::new(NETLINK_ROUTE)?;
    socket.socket_mut().bind_auto()?;
    socket.socket_mut().add_membership(RTNLGRP_LINK)?;
    // Best effort: a small buffer only means a resync after a burst.
    let _ = socket.socket_ref().set_rx_buf_sz(RECV_BUFFER);
    Ok(socket)
}

/// An RTM_GETLINK dump request.
fn dump_request(seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(LinkMessage::default())),
    );
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

async fn request_dump(socket: &TokioSocket, seq: u32) -> io::Result<()> {
    let kernel = SocketAddr::new(0, 0);
    socket
        .send_to(&dump_request(seq), &kernel)
        .await
        .map(|_| ())
}

async fn read_loop(socket: TokioSocket, tx: watch::Sender<Option<Arc<Ifaces>>>) {
    let mut tracker = Tracker::default();
    let mut seq: u32 = 0;
    let mut failing = false;
    loop {
        if tracker.wants_dump() {
            seq = seq.wrapping_add(1).max(1);
            if let Err(e) = request_dump(&socket, seq).await {
                warn!(error = %e, "asking the kernel for the interfaces failed; keeping the last known state");
                tokio::time::sleep(RETRY).await;
                continue;
            }
            tracker.dump_started(seq);
        }
        let Ok(received) = tokio::time::timeout(tracker.wait(), socket.recv_from_full()).await
        else {
            continue;
        };
        match received {
            // Only the kernel (port 0) speaks for the interfaces.
            Ok((_, from)) if from.port_number() != 0 => continue,
            Ok((buf, _)) => {
                failing = false;
                if tracker.apply(decode(&buf)) {
                    let table = tracker.known().map(|t| Arc::new(t.clone()));
                    if tx.send(table).is_err() {
                        return;
                    }
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                info!("interface notifications overflowed; reading the interfaces again");
                tracker.lost();
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "reading interface state failed; keeping the last known state");
                }
                failing = true;
                tracker.lost();
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, flags: LinkFlags) -> RouteNetlinkMessage {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = flags;
        m.attributes = vec![
            LinkAttribute::IfName(name.to_owned()),
            LinkAttribute::Mtu(1500),
        ];
        RouteNetlinkMessage::NewLink(m)
    }

    /// The lower device of `kind` linked to interface 2, as `present` reads it.
    fn lower_of(kind: InfoKind, other_netns: bool) -> Option<u32> {
        let RouteNetlinkMessage::NewLink(mut m) = link(7, "x", up()) else {
            unreachable!("link() makes a NewLink");
        };
        m.attributes.push(LinkAttribute::Link(2));
        m.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(kind)]));
        if other_netns {
            m.attributes.push(LinkAttribute::LinkNetNsId(0));
        }
        match present(&m) {
            Some(Body::Present(_, iface)) => iface.lower,
            _ => panic!("not read as an interface"),
        }
    }

    #[test]
    fn vlan_and_macvlan_devices_name_the_device_they_are_stacked_on() {
        assert_eq!(lower_of(InfoKind::Vlan, false), Some(2));
        assert_eq!(lower_of(InfoKind::MacVlan, false), Some(2));
        assert_eq!(lower_of(InfoKind::IpVlan, false), Some(2));
        // A veth's link is its peer; a lower device in another namespace is not ours.
        assert_eq!(lower_of(InfoKind::Veth, false), None);
        assert_eq!(lower_of(InfoKind::Vlan, true), None);
    }

    fn bytes(msgs: Vec<NetlinkPayload<RouteNetlinkMessage>>) -> Vec<u8> {
        let mut out = Vec::new();
        for p in msgs {
            let mut msg = NetlinkMessage::new(NetlinkHeader::default(), p);
            msg.finalize();
            let mut buf = vec![0; msg.buffer_len()];
            msg.serialize(&mut buf);
            buf.resize(buf.len().next_multiple_of(4), 0);
            out.extend(buf);
        }
        out
    }

    fn up() -> LinkFlags {
        LinkFlags::Up | LinkFlags::Running
    }

    fn iface(index: u32, up: bool) -> Iface {
        Iface {
            index,
            up,
            mtu: Some(1500),
            mac: None,
            xdp: XdpPrograms::default(),
            lower: None,
            carrier_downs: 0,
        }
    }

    /// A datagram with several messages decodes to each one's body, in order; "up" needs
    /// both the administrative flag and the carrier; a bridge-family DELLINK (a port leaving
    /// its bridge) is not an interface going away.
    #[test]
    fn a_datagram_decodes_to_its_messages() {
        let mut gone = LinkMessage::default();
        gone.header.index = 7;
        let mut bridge = LinkMessage::default();
        bridge.header.index = 3;
        bridge.header.interface_family = AddressFamily::Bridge;
        let buf = bytes(vec![
            NetlinkPayload::from(link(3, "ha4", up())),
            NetlinkPayload::from(link(4, "ha4b", LinkFlags::Up)),
            NetlinkPayload::from(RouteNetlinkMessage::DelLink(gone)),
            NetlinkPayload::from(RouteNetlinkMessage::DelLink(bridge)),
        ]);
        let bodies: Vec<Body> = decode(&buf).into_iter().map(|m| m.body).collect();
        assert_eq!(
            bodies,
            vec![
                Body::Present("ha4".into(), iface(3, true)),
                Body::Present("ha4b".into(), iface(4, false)),
                Body::Gone(7),
                Body::Other,
            ]
        );
    }

    /// Truncated or garbage input decodes to "something was lost", never a panic, an empty
    /// (all-down) table or a made-up interface.
    #[test]
    fn garbage_is_unparsed() {
        let buf = bytes(vec![NetlinkPayload::from(link(3, "ha4", up()))]);
        for cut in [1, 8, 15, buf.len() - 1] {
            let msgs = decode(&buf[..cut]);
            assert!(
                msgs.iter().all(|m| m.body == Body::Unparsed) && !msgs.is_empty(),
                "{cut} bytes: {msgs:?}"
            );
        }
        assert!(decode(&[0xff; 64]).iter().all(|m| m.body == Body::Unparsed));
    }

    /// `message` (one whole netlink message) with a raw attribute of `kind` holding `value`
    /// appended, its length fixed up.
    fn with_attribute(mut message: Vec<u8>, kind: u16, value: &[u8]) -> Vec<u8> {
        let nla_len = 4 + value.len();
        message.extend((nla_len as u16).to_ne_bytes());
        message.extend(kind.to_ne_bytes());
        message.extend(value);
        message.resize(message.len().next_multiple_of(4), 0);
        let len = message.len() as u32;
        message[..4].copy_from_slice(&len.to_ne_bytes());
        message
    }

    /// A link message with one attribute the library cannot read (IFLA_TXQLEN two bytes
    /// long) is read without it: seen failing, the whole message was unparsed, and one such
    /// interface kept every dump dirty (no table, link groups never judged). One that lost an
    /// attribute the agent reads, whose attributes' framing breaks, or whose header is cut, is
    /// still unparsed.
    #[test]
    fn a_link_message_with_an_attribute_that_does_not_parse_keeps_the_others() {
        const IFLA_TXQLEN: u16 = 13;
        let good = bytes(vec![NetlinkPayload::from(link(3, "ha4", up()))]);
        let odd = with_attribute(good, IFLA_TXQLEN, &[1, 0]);
        let bodies: Vec<Body> = decode(&odd).into_iter().map(|m| m.body).collect();
        assert_eq!(bodies, vec![Body::Present("ha4".into(), iface(3, true))]);

        let mut gone = LinkMessage::default();
        gone.header.index = 7;
        let gone = bytes(vec![NetlinkPayload::from(RouteNetlinkMessage::DelLink(
            gone,
        ))]);
        let odd = with_attribute(gone, IFLA_TXQLEN, &[1, 0]);
        assert_eq!(decode(&odd)[0].body, Body::Gone(7));

        // An IFLA_LINKINFO whose kind's data does not parse (a VLAN id one byte long): its
        // kind is kept, and the VLAN still names its lower device.
        let mut vlan = LinkMessage::default();
        vlan.header.index = 8;
        vlan.header.flags = up();
        vlan.attributes = vec![
            LinkAttribute::IfName("in0.7".to_owned()),
            LinkAttribute::Link(2),
        ];
        let vlan = bytes(vec![NetlinkPayload::from(RouteNetlinkMessage::NewLink(
            vlan,
        ))]);
        let mut info = Vec::new();
        for (kind, value) in [
            (1u16, &b"vlan\0"[..]),
            (2 | 0x8000, &[5, 0, 1, 0, 7, 0, 0, 0][..]),
        ] {
            info.extend(((4 + value.len()) as u16).to_ne_bytes());
            info.extend(kind.to_ne_bytes());
            info.extend(value);
            info.resize(info.len().next_multiple_of(4), 0);
        }
        let odd = with_attribute(vlan, IFLA_LINKINFO | 0x8000, &info);
        match &decode(&odd)[0].body {
            Body::Present(name, i) => assert_eq!((name.as_str(), i.lower), ("in0.7", Some(2))),
            other => panic!("{other:?}"),
        }

        // A bridge port's message is no interface's state, whatever it lost.
        let mut port = LinkMessage::default();
        port.header.index = 5;
        port.header.interface_family = AddressFamily::Bridge;
        let port = bytes(vec![NetlinkPayload::from(RouteNetlinkMessage::NewLink(
            port,
        ))]);
        let odd = with_attribute(port, 4, &[1, 0]);
        assert_eq!(decode(&odd)[0].body, Body::Other);

        // Lost, an attribute the agent reads would read as a definite, wrong state.
        const IFLA_MTU: u16 = 4;
        const IFLA_XDP: u16 = 43;
        for read in [IFLA_MTU, IFLA_XDP] {
            let good = bytes(vec![NetlinkPayload::from(link(3, "ha4", up()))]);
            let odd = with_attribute(good, read, &[1, 0]);
            assert_eq!(decode(&odd)[0].body, Body::Unparsed, "attribute {read}");
        }
        // The attributes' framing broken (a length past the message's end).
        let good = bytes(vec![NetlinkPayload::from(link(3, "ha4", up()))]);
        let mut odd = with_attribute(good, IFLA_TXQLEN, &[1, 0, 0, 0]);
        let at = odd.len() - 8;
        odd[at..at + 2].copy_from_slice(&64u16.to_ne_bytes());
        assert_eq!(decode(&odd)[0].body, Body::Unparsed);

        // The header alone, cut short: 16 bytes of netlink header and 8 of `ifinfomsg`.
        let good = bytes(vec![NetlinkPayload::from(link(3, "ha4", up()))]);
        let mut cut = good[..24].to_vec();
        cut[..4].copy_from_slice(&24u32.to_ne_bytes());
        assert_eq!(decode(&cut)[0].body, Body::Unparsed);
    }

    /// A dump that keeps ending dirty is asked for again after a gap that doubles per dirty
    /// dump in a row, up to [`DUMP_GAP_MAX`], not at once in a loop (seen failing: at once,
    /// every time); a clean one starts the gap over.
    #[test]
    fn dirty_dumps_are_asked_for_again_at_a_pace() {
        let mut t = Tracker::default();
        assert!(t.wants_dump(), "the first at once");
        t.dump_started(1);
        t.apply(vec![msg(1, Body::Unparsed), msg(1, Body::Done(0))]);
        assert_eq!(t.known(), None);
        assert!(!t.wants_dump(), "again at once");
        assert_eq!(t.wait(), DUMP_GAP);
        std::thread::sleep(DUMP_GAP);
        assert!(t.wants_dump(), "again after the gap");
        for seq in 2..10 {
            t.dump_started(seq);
            t.apply(vec![msg(seq, Body::Unparsed), msg(seq, Body::Done(0))]);
        }
        assert_eq!(t.wait(), DUMP_GAP_MAX);
        t.last_dump = None;
        assert!(t.wants_dump());
        t.dump_started(10);
        t.apply(vec![msg(10, Body::Done(0))]);
        assert!(t.known().is_some());
        t.lost();
        assert_eq!(t.wait(), DUMP_GAP, "a clean dump starts the gap over");
    }

    fn msg(seq: u32, body: Body) -> Msg {
        Msg {
            seq,
            flags: 0,
            body,
        }
    }

    /// Nothing is known before the first clean dump ends; notifications then change the
    /// table; a later dump drops what it no longer lists; a rename drops the old name.
    #[test]
    fn the_tracker_follows_dumps_and_notifications() {
        let mut t = Tracker::default();
        assert!(t.wants_dump());
        t.dump_started(1);
        assert!(!t.wants_dump(), "one dump at a time");
        assert!(!t.apply(vec![msg(1, Body::Present("a".into(), iface(1, true)))]));
        assert_eq!(t.known(), None, "no table before the dump ends");
        assert!(t.apply(vec![
            msg(1, Body::Present("b".into(), iface(2, true))),
            msg(1, Body::Done(0))
        ]));
        assert_eq!(t.known().map(|k| k.len()), Some(2));
        assert!(t.apply(vec![msg(0, Body::Present("b".into(), iface(2, false)))]));
        assert_eq!(
            t.known().and_then(|k| k.get("b")).map(|i| i.up),
            Some(false)
        );
        assert!(!t.apply(vec![msg(0, Body::Present("b".into(), iface(2, false)))]));
        assert!(t.apply(vec![msg(0, Body::Present("c".into(), iface(2, true)))]));
        assert!(t.known().is_some_and(|k| !k.contains_key("b")), "renamed");
        t.lost();
        t.last_dump = None; // past the pace
        assert!(t.wants_dump());
        t.dump_started(2);
        assert!(t.apply(vec![
            msg(2, Body::Present("c".into(), iface(2, true))),
            msg(2, Body::Done(0))
        ]));
        assert_eq!(
            t.known().map(|k| k.keys().cloned().collect::<Vec<_>>()),
            Some(vec!["c".to_owned()]),
            "a dropped from the table by the new dump"
        );
        assert!(t.apply(vec![msg(0, Body::Gone(2))]));
        assert_eq!(t.known().map(|k| k.len()), Some(0));
    }

    /// A dump that lost something (overflow while it ran, an interrupted dump, a message that
    /// did not parse, an error at its end) never becomes the table: the table keeps what it
    /// had and another dump is asked for once this one is over.
    #[test]
    fn a_dirty_dump_is_not_taken_for_the_whole_table() {
        let known = |t: &Tracker| t.known().map(|k| k.keys().cloned().collect::<Vec<_>>());
        let mut t = Tracker::default();
        t.dump_started(1);
        t.apply(vec![
            msg(1, Body::Present("ha4".into(), iface(1, true))),
            msg(1, Body::Present("ha4b".into(), iface(2, true))),
            msg(1, Body::Done(0)),
        ]);
        let whole = Some(vec!["ha4".to_owned(), "ha4b".to_owned()]);
        assert_eq!(known(&t), whole);
        let dirty: [&dyn Fn(&mut Tracker); 4] = [
            &|t| t.lost(),
            &|t| {
                t.apply(vec![Msg {
                    seq: 2,
                    flags: NLM_F_DUMP_INTR,
                    body: Body::Other,
                }]);
            },
            &|t| {
                t.apply(vec![msg(2, Body::Unparsed)]);
            },
            &|_| {},
        ];
        // Another dump asked for (once the pace allows).
        let due = |t: &Tracker| t.need_dump && t.dump.is_none();
        for (i, spoil) in dirty.iter().enumerate() {
            assert!(due(&t) || i == 0, "case {i}");
            t.need_dump = true;
            t.dump_started(2);
            t.apply(vec![msg(2, Body::Present("ha4".into(), iface(1, true)))]);
            spoil(&mut t);
            let code = if i == 3 { -16 } else { 0 };
            t.apply(vec![msg(2, Body::Done(code))]);
            assert_eq!(
                known(&t),
                whole,
                "case {i}: a partial dump became the table"
            );
            assert!(due(&t), "case {i}: no new dump asked for");
        }
        // An error answer to the request ends it; another is asked for.
        t.dump_started(3);
        t.apply(vec![msg(3, Body::Error(-16))]);
        assert!(due(&t));
        assert_eq!(known(&t), whole);
    }

    /// A link that goes down while a dump is being read (after the dump listed it up) reads
    /// down after the dump's end. Seen failing (up again) when notifications only went to
    /// the current table.
    #[test]
    fn a_notification_during_a_dump_is_not_undone_by_its_end() {
        let mut t = Tracker::default();
        t.dump_started(1);
        t.apply(vec![msg(1, Body::Present("in0".into(), iface(2, true)))]);
        t.apply(vec![msg(0, Body::Present("in0".into(), iface(2, false)))]);
        t.apply(vec![
            msg(1, Body::Present("out0".into(), iface(3, true))),
            msg(1, Body::Done(0)),
        ]);
        let up = |name: &str| t.known().and_then(|k| k.get(name)).map(|i| i.up);
        assert_eq!(up("in0"), Some(false), "in0 reads up again after the dump");
        assert_eq!(up("out0"), Some(true));
    }

    /// Against the kernel: the loopback interface is listed, up, with its index.
    #[tokio::test]
    async fn the_kernel_lists_the_loopback_interface() {
        let (mut w, _reader) = LinkWatch::spawn().expect("netlink socket");
        let table = match w.now() {
            Some(t) => t,
            None => tokio::time::timeout(Duration::from_secs(5), w.changed())
                .await
                .expect("a dump within 5 s")
                .expect("table"),
        };
        let lo = table.get("lo").expect("lo listed");
        assert_eq!(lo.index, 1);
        assert!(lo.up);
    }
}
