//! The kernel's connection tracking beside forwarding in XDP. Of a TCP connection forwarded in
//! XDP the kernel sees only what the fast path hands it (`hasync_ebpf::forward`): the
//! handshake, and whatever it does not decide later (a neighbour not resolved yet, an egress
//! that no longer takes redirects, a packet over the egress MTU). The agent keeps the kernel's
//! entry fit for both, over ctnetlink, for this member's sessions:
//!
//! - When such a session becomes established, its entry is marked liberal in both directions
//!   (`IP_CT_TCP_FLAG_BE_LIBERAL`, as nf_flowtable marks the entries it offloads): a segment
//!   handed to the kernel mid-stream is past every window the kernel saw, and a stateful
//!   ruleset (`ct state invalid drop`) dropped it, and its retransmissions, until the fast path
//!   took the connection back (with the next hop's neighbour entry gone, never: the kernel
//!   dropped what it was handed before resolving the neighbour). The kernel then checks no
//!   window for these connections: the XDP program checks every segment first, and its
//!   strict policy still refuses a RST or FIN outside the window, but a data segment or ACK
//!   outside it, which the program passes for the kernel to decide, now reaches the endpoint
//!   (which drops it, as TCP does), where the ruleset dropped it as invalid. Every established
//!   session is marked, not only the ones XDP forwards: its event comes before its first
//!   packet is forwarded, so the agent cannot tell them apart then.
//! - When it closes or expires (one XDP forwarded here: `SessionFlags::FORWARDED_XDP`), its
//!   entry, which never saw the close, gets the timeout of a closed connection: it would stay
//!   established for `nf_conntrack_tcp_timeout_established` (5 days by default) and, with many
//!   short connections, fill the kernel's table (`nf_conntrack_max`), which then drops new
//!   flows. An update of the timeout, as `conntrack -U --timeout` does, not a removal: a new
//!   connection that reused the ports meanwhile keeps its entry, whose next packet the kernel
//!   sees sets its timeout again.
//!
//! Both are updates without `NLM_F_CREATE`: an entry the kernel does not hold is left absent.

use std::{io, net::IpAddr};

use hasync_common::{flow::IPPROTO_TCP, FlowKey, Session, SessionFlags, State};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};

use super::nlmsg::{self, NLMSG_ERROR, NLMSG_HDRLEN, NLM_F_REQUEST};

/// The timeout, in seconds, given to the kernel's entry of a forwarded connection that closed
/// (conntrack's own for a closed TCP connection is 10 s).
pub const CLOSED_TIMEOUT_S: u32 = 10;

/// A batch is sent once it holds this many bytes (a netlink datagram carries many requests).
const BATCH_BYTES: usize = 16 * 1024;

/// `(NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW`: without `NLM_F_CREATE`, an update of
/// an existing entry only.
const CT_UPDATE: u16 = 1 << 8;
const NFNETLINK_V0: u8 = 0;
const NLA_F_NESTED: u16 = 1 << 15;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TIMEOUT: u16 = 7;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: u16 = 4;
const CTA_PROTOINFO_TCP_FLAGS_REPLY: u16 = 5;
/// `IP_CT_TCP_FLAG_BE_LIBERAL`: the kernel checks no window for the direction.
const IP_CT_TCP_FLAG_BE_LIBERAL: u8 = 0x08;

/// What an update changes in the kernel's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    /// Both directions liberal: the connection is established, and XDP may forward it.
    Liberal,
    /// The closed timeout ([`CLOSED_TIMEOUT_S`]): the connection ended.
    Closed,
}

/// Errors of the netfilter netlink socket.
#[derive(Debug, thiserror::Error)]
pub enum KernelTrackError {
    #[error("netfilter netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("sending to the kernel's connection tracking: {0}")]
    Send(#[source] io::Error),
    #[error("the kernel's connection tracking refused an update: {0}")]
    Refused(#[source] io::Error),
}

/// A netfilter netlink socket in the agent's network namespace, and the requests not sent yet.
pub struct KernelTrack {
    socket: Socket,
    batch: Vec<u8>,
    /// Where the kernel's answers are read (kept: a batch is sent per event batch).
    answers: Vec<u8>,
    seq: u32,
}

impl KernelTrack {
    /// Opens the socket (non-blocking: the kernel's answers are read after each batch, never
    /// waited for).
    pub fn open() -> Result<KernelTrack, KernelTrackError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(KernelTrackError::Socket)?;
        socket.bind_auto().map_err(KernelTrackError::Socket)?;
        socket
            .set_non_blocking(true)
            .map_err(KernelTrackError::Socket)?;
        Ok(KernelTrack {
            socket,
            batch: Vec::new(),
            answers: vec![0; 8192],
            seq: 0,
        })
    }

    /// Session `s` of flow `key` became established here: if it is a TCP connection, its
    /// kernel entry is marked liberal (sent at the next [`KernelTrack::flush`], or now if the
    /// batch is full).
    pub fn established(&mut self, key: &FlowKey, s: &Session) -> Result<(), KernelTrackError> {
        if !established_tcp(key, s) {
            return Ok(());
        }
        self.queue(key, s, Change::Liberal)
    }

    /// Session `s` of flow `key` closed or expired here: if it is a TCP connection forwarded
    /// in XDP, its kernel entry gets [`CLOSED_TIMEOUT_S`] (sent at the next
    /// [`KernelTrack::flush`], or now if the batch is full).
    pub fn closed(&mut self, key: &FlowKey, s: &Session) -> Result<(), KernelTrackError> {
        if !forwarded_tcp(key, s) {
            return Ok(());
        }
        self.queue(key, s, Change::Closed)
    }

    fn queue(
        &mut self,
        key: &FlowKey,
        s: &Session,
        change: Change,
    ) -> Result<(), KernelTrackError> {
        self.seq = self.seq.wrapping_add(1);
        let initiator_hi = s.flags.has(SessionFlags::INITIATOR_HI);
        encode_update(&mut self.batch, self.seq, key, initiator_hi, change);
        if self.batch.len() >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Sends the requests queued, then reads the kernel's answers waiting: an entry the kernel
    /// does not hold is answered ENOENT (the connection was never its, or went already); any
    /// other refusal is returned (the first one read).
    pub fn flush(&mut self) -> Result<(), KernelTrackError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let sent = self.socket.send(&self.batch, 0);
        self.batch.clear();
        let refused = self.drain();
        sent.map_err(KernelTrackError::Send)?;
        match refused {
            Some(errno) => Err(KernelTrackError::Refused(io::Error::from_raw_os_error(
                errno,
            ))),
            None => Ok(()),
        }
    }

    /// Reads what the kernel answered, without waiting; the first refusal but ENOENT.
    fn drain(&mut self) -> Option<i32> {
        let mut first = None;
        loop {
            let mut room = &mut self.answers[..];
            match self.socket.recv(&mut room, 0) {
                Ok(n) if n > 0 => {
                    let read = self.answers.get(..n).unwrap_or_default();
                    first = first.or_else(|| refusal(read));
                }
                _ => return first,
            }
        }
    }
}

/// [`KernelTrack`] for the agent's main loop: open while the configuration forwards in XDP.
/// A failure is logged once and the kernel's entries are left as the kernel keeps them.
#[derive(Default)]
pub struct KernelEntries {
    track: Option<KernelTrack>,
    failed: bool,
}

impl KernelEntries {
    /// Open when `forwarding` is XDP (a socket that cannot open is logged, and nothing done).
    pub fn new(xdp: bool) -> KernelEntries {
        let mut entries = KernelEntries::default();
        if xdp {
            match KernelTrack::open() {
                Ok(t) => entries.track = Some(t),
                Err(e) => entries.failed_once(&e),
            }
        }
        entries
    }

    /// See [`KernelTrack::established`].
    pub fn established(&mut self, key: &FlowKey, s: &Session) {
        if let Some(Err(e)) = self.track.as_mut().map(|t| t.established(key, s)) {
            self.failed_once(&e);
        }
    }

    /// See [`KernelTrack::closed`].
    pub fn closed(&mut self, key: &FlowKey, s: &Session) {
        if let Some(Err(e)) = self.track.as_mut().map(|t| t.closed(key, s)) {
            self.failed_once(&e);
        }
    }

    /// See [`KernelTrack::flush`].
    pub fn flush(&mut self) {
        if let Some(Err(e)) = self.track.as_mut().map(KernelTrack::flush) {
            self.failed_once(&e);
        }
    }

    fn failed_once(&mut self, e: &KernelTrackError) {
        if !std::mem::replace(&mut self.failed, true) {
            tracing::warn!(
                error = %e,
                "the kernel's entries of TCP connections forwarded in XDP cannot be updated: \
                 segments handed to the kernel mid-stream may be invalid there, and closed \
                 connections' entries stay until nf_conntrack_tcp_timeout_established \
                 (further failures are not logged)"
            );
        }
    }
}

/// The first errno but ENOENT in the kernel's answers `buf` (NLMSG_ERROR messages).
fn refusal(buf: &[u8]) -> Option<i32> {
    nlmsg::messages(buf)
        .map_while(Result::ok)
        .filter(|m| m.kind == NLMSG_ERROR)
        .filter_map(|m| nlmsg::error_code(m.body))
        .find(|&errno| errno != 0 && errno != libc::ENOENT)
}

/// Is `s` an established TCP connection (whose kernel entry is marked liberal)?
fn established_tcp(key: &FlowKey, s: &Session) -> bool {
    key.proto == IPPROTO_TCP && s.state == State::Established as u8
}

/// Is `s` a TCP connection that XDP forwarded here ([`SessionFlags::FORWARDED_XDP`]), whose
/// close the kernel never saw? (One the kernel forwarded throughout, a virtual wire's, one to
/// this host itself, has an entry the kernel keeps right on its own.)
fn forwarded_tcp(key: &FlowKey, s: &Session) -> bool {
    key.proto == IPPROTO_TCP && s.flags.has(SessionFlags::FORWARDED_XDP)
}

/// Appends to `out` the update (request `seq`) that makes `change` to the kernel's entry of
/// `key`; its original direction starts at the initiator (the higher end when
/// `initiator_hi`).
fn encode_update(out: &mut Vec<u8>, seq: u32, key: &FlowKey, initiator_hi: bool, change: Change) {
    let (mut src, mut dst) = (key.ip_lo(), key.ip_hi());
    let (mut sport, mut dport) = (key.port_lo, key.port_hi);
    if initiator_hi {
        (src, dst) = (dst, src);
        (sport, dport) = (dport, sport);
    }
    let start = out.len();
    out.extend_from_slice(&[0; NLMSG_HDRLEN]);
    let family = if src.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    out.extend_from_slice(&[family as u8, NFNETLINK_V0, 0, 0]);
    let tuple = open_nested(out, CTA_TUPLE_ORIG);
    let ip = open_nested(out, CTA_TUPLE_IP);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            put(out, CTA_IP_V4_SRC, &s.octets());
            put(out, CTA_IP_V4_DST, &d.octets());
        }
        (s, d) => {
            put(out, CTA_IP_V6_SRC, &v6_octets(s));
            put(out, CTA_IP_V6_DST, &v6_octets(d));
        }
    }
    close_nested(out, ip);
    let proto = open_nested(out, CTA_TUPLE_PROTO);
    put(out, CTA_PROTO_NUM, &[key.proto]);
    // The key's ports are in network order already.
    put(out, CTA_PROTO_SRC_PORT, &sport.to_ne_bytes());
    put(out, CTA_PROTO_DST_PORT, &dport.to_ne_bytes());
    close_nested(out, proto);
    close_nested(out, tuple);
    match change {
        Change::Closed => put(out, CTA_TIMEOUT, &CLOSED_TIMEOUT_S.to_be_bytes()),
        Change::Liberal => {
            let info = open_nested(out, CTA_PROTOINFO);
            let tcp = open_nested(out, CTA_PROTOINFO_TCP);
            // `struct nf_ct_tcp_flags`: the flags, then the mask of those to change.
            let liberal = [IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_BE_LIBERAL];
            put(out, CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, &liberal);
            put(out, CTA_PROTOINFO_TCP_FLAGS_REPLY, &liberal);
            close_nested(out, tcp);
            close_nested(out, info);
        }
    }
    let header = nlmsg::header(out.len() - start, CT_UPDATE, NLM_F_REQUEST, seq);
    out[start..start + NLMSG_HDRLEN].copy_from_slice(&header);
}

/// An IPv6 address's octets (an IPv4 one mapped: never, both ends of a key share a family).
fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V6(v6) => v6.octets(),
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
    }
}

/// Appends attribute `kind` with `value`, padded to 4 bytes.
fn put(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// Opens nested attribute `kind`; returns where its header is, for [`close_nested`].
fn open_nested(out: &mut Vec<u8>, kind: u16) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    at
}

/// Writes the length of the nested attribute opened at `at`.
fn close_nested(out: &mut [u8], at: usize) {
    let len = (out.len() - at) as u16;
    if let Some(header) = out.get_mut(at..at + 2) {
        header.copy_from_slice(&len.to_ne_bytes());
    }
}

mod queue;
pub use queue::{KernelEntriesQueue, Update};

#[cfg(test)]
mod tests;
