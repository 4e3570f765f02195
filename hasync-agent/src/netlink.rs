//! Interface state from the kernel's routing netlink, in the agent's network namespace: one
//! RTM_GETLINK dump at start, then the RTM_NEWLINK / RTM_DELLINK notifications of the link
//! multicast group. A cable pull is seen as soon as the kernel sees it, and a failure to talk
//! to the kernel leaves the last known state in place: it never reads as "link down".

use std::{collections::BTreeMap, io, sync::Arc, time::Duration};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::{
    link::{LinkAttribute, LinkFlags, LinkMessage},
    RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};
use tokio::sync::watch;
use tracing::{info, warn};

/// The link multicast group (RTNLGRP_LINK).
const RTNLGRP_LINK: u32 = 1;
/// Receive buffer for notifications: a burst of changes on a busy host fits.
const RECV_BUFFER: usize = 1 << 20;
/// How long to wait before trying again after the socket failed.
const RETRY: Duration = Duration::from_secs(1);

/// One interface as the kernel last described it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Iface {
    pub index: u32,
    /// Administratively up with its carrier on (`IFF_UP` and `IFF_RUNNING`).
    pub up: bool,
    pub mtu: Option<u32>,
}

/// Interfaces by name.
pub type Ifaces = BTreeMap<String, Iface>;

/// What one netlink message says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// An interface exists with this state.
    Present(String, Iface),
    /// The interface at this index is gone.
    Gone(u32),
    /// A dump ended: what it listed is the whole set.
    DumpDone,
}

/// Why the watcher could not start or stopped reading.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("routing netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("malformed netlink message: {0}")]
    Decode(String),
}

/// Decodes one datagram from the routing netlink socket into the changes it carries
/// (messages of other kinds are skipped).
pub fn decode(mut buf: &[u8]) -> Result<Vec<Change>, NetlinkError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(buf)
            .map_err(|e| NetlinkError::Decode(e.to_string()))?;
        let len = msg.header.length as usize;
        if len == 0 || len > buf.len() {
            return Err(NetlinkError::Decode(format!(
                "message length {len} with {} bytes left",
                buf.len()
            )));
        }
        match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                if let Some(change) = present(&m) {
                    out.push(change);
                }
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => {
                out.push(Change::Gone(m.header.index));
            }
            NetlinkPayload::Done(_) => out.push(Change::DumpDone),
            _ => {}
        }
        // Messages are 4-byte aligned.
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    Ok(out)
}

fn present(m: &LinkMessage) -> Option<Change> {
    let mut name = None;
    let mut mtu = None;
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Mtu(v) => mtu = Some(*v),
            _ => {}
        }
    }
    let want = LinkFlags::Up | LinkFlags::Running;
    let iface = Iface {
        index: m.header.index,
        up: m.header.flags.contains(want),
        mtu,
    };
    Some(Change::Present(name?, iface))
}

/// The interface table a sequence of changes builds. A dump in progress collects into a
/// fresh table that replaces the old one at its end (so interfaces removed while
/// notifications were lost disappear too).
#[derive(Debug, Default)]
pub struct Tracker {
    current: Ifaces,
    dumping: Option<Ifaces>,
    /// At least one dump has ended: the table is known.
    known: bool,
}

impl Tracker {
    /// A dump starts: what follows until its end is the whole set.
    pub fn start_dump(&mut self) {
        self.dumping = Some(Ifaces::new());
    }

    /// Applies `changes`; true when the known table changed.
    pub fn apply(&mut self, changes: Vec<Change>) -> bool {
        let before = self.known().cloned();
        for c in changes {
            match c {
                Change::Present(name, iface) => {
                    if let Some(d) = self.dumping.as_mut() {
                        d.insert(name.clone(), iface);
                    }
                    // A rename: the old name no longer exists.
                    self.current.retain(|_, i| i.index != iface.index);
                    self.current.insert(name, iface);
                }
                Change::Gone(index) => {
                    self.current.retain(|_, i| i.index != index);
                    if let Some(d) = self.dumping.as_mut() {
                        d.retain(|_, i| i.index != index);
                    }
                }
                Change::DumpDone => {
                    if let Some(d) = self.dumping.take() {
                        self.current = d;
                        self.known = true;
                    }
                }
            }
        }
        before.as_ref() != self.known()
    }

    /// The table, once a dump has ended.
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
    /// runtime).
    pub fn spawn() -> Result<LinkWatch, NetlinkError> {
        let socket = open().map_err(NetlinkError::Socket)?;
        let (tx, rx) = watch::channel(None);
        tokio::spawn(read_loop(socket, tx));
        Ok(LinkWatch { rx })
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

async fn request_dump(socket: &mut TokioSocket, tracker: &mut Tracker, seq: u32) -> io::Result<()> {
    tracker.start_dump();
    let kernel = SocketAddr::new(0, 0);
    socket
        .send_to(&dump_request(seq), &kernel)
        .await
        .map(|_| ())
}

async fn read_loop(mut socket: TokioSocket, tx: watch::Sender<Option<Arc<Ifaces>>>) {
    let mut tracker = Tracker::default();
    let mut seq = 1;
    let mut need_dump = true;
    let mut failing = false;
    loop {
        if need_dump {
            match request_dump(&mut socket, &mut tracker, seq).await {
                Ok(()) => need_dump = false,
                Err(e) => {
                    warn!(error = %e, "asking the kernel for the interfaces failed; keeping the last known state");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            }
            seq = seq.wrapping_add(1);
        }
        let changes = match socket.recv_from_full().await {
            Ok((buf, _)) => decode(&buf),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                // Notifications were lost: the state is read again whole.
                info!("interface notifications overflowed; reading the interfaces again");
                need_dump = true;
                continue;
            }
            Err(e) => Err(NetlinkError::Socket(e)),
        };
        match changes {
            Ok(changes) => {
                failing = false;
                if tracker.apply(changes) {
                    let table = tracker.known().map(|t| Arc::new(t.clone()));
                    if tx.send(table).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "reading interface state failed; keeping the last known state");
                }
                failing = true;
                need_dump = true;
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

    /// A datagram with several messages decodes to each one's change, in order; "up" needs
    /// both the administrative flag and the carrier.
    #[test]
    fn a_datagram_decodes_to_its_changes() {
        let mut gone = LinkMessage::default();
        gone.header.index = 7;
        let buf = bytes(vec![
            NetlinkPayload::from(link(3, "ha4", up())),
            NetlinkPayload::from(link(4, "ha4b", LinkFlags::Up)),
            NetlinkPayload::from(RouteNetlinkMessage::DelLink(gone)),
        ]);
        let changes = decode(&buf).expect("decode");
        assert_eq!(
            changes,
            vec![
                Change::Present(
                    "ha4".into(),
                    Iface {
                        index: 3,
                        up: true,
                        mtu: Some(1500)
                    }
                ),
                Change::Present(
                    "ha4b".into(),
                    Iface {
                        index: 4,
                        up: false,
                        mtu: Some(1500)
                    }
                ),
                Change::Gone(7),
            ]
        );
    }

    /// Truncated or garbage input is an error naming the problem, never a panic or an empty
    /// (all-down) table.
    #[test]
    fn garbage_is_an_error() {
        let buf = bytes(vec![NetlinkPayload::from(link(3, "ha4", up()))]);
        for cut in [1, 8, 15, buf.len() - 1] {
            let r = decode(&buf[..cut]);
            assert!(r.is_err(), "{cut} bytes: {r:?}");
        }
        assert!(decode(&[0xff; 64]).is_err());
    }

    /// Nothing is known before the first dump ends; notifications then change the table; a
    /// later dump drops what it no longer lists; a rename drops the old name.
    #[test]
    fn the_tracker_follows_dumps_and_notifications() {
        let iface = |index, up| Iface {
            index,
            up,
            mtu: Some(1500),
        };
        let mut t = Tracker::default();
        t.start_dump();
        assert!(!t.apply(vec![Change::Present("a".into(), iface(1, true))]));
        assert_eq!(t.known(), None, "no table before the dump ends");
        assert!(t.apply(vec![
            Change::Present("b".into(), iface(2, true)),
            Change::DumpDone
        ]));
        assert_eq!(t.known().map(|k| k.len()), Some(2));
        assert!(t.apply(vec![Change::Present("b".into(), iface(2, false))]));
        assert_eq!(
            t.known().and_then(|k| k.get("b")).map(|i| i.up),
            Some(false)
        );
        assert!(!t.apply(vec![Change::Present("b".into(), iface(2, false))]));
        assert!(t.apply(vec![Change::Present("c".into(), iface(2, true))]));
        assert!(t.known().is_some_and(|k| !k.contains_key("b")), "renamed");
        t.start_dump();
        assert!(t.apply(vec![
            Change::Present("c".into(), iface(2, true)),
            Change::DumpDone
        ]));
        assert_eq!(
            t.known().map(|k| k.keys().cloned().collect::<Vec<_>>()),
            Some(vec!["c".to_owned()]),
            "a dropped from the table by the new dump"
        );
        assert!(t.apply(vec![Change::Gone(2)]));
        assert_eq!(t.known().map(|k| k.len()), Some(0));
    }

    /// Against the kernel: the loopback interface is listed, up, with its index.
    #[tokio::test]
    async fn the_kernel_lists_the_loopback_interface() {
        let mut w = LinkWatch::spawn().expect("netlink socket");
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
