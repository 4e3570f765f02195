//! The kernel's connection tracking beside forwarding in XDP. Of a TCP connection forwarded in
//! XDP the kernel sees only the handshake (`hasync_ebpf::forward`), never the close: its entry
//! would stay established for `nf_conntrack_tcp_timeout_established` (5 days by default) after
//! the connection ended, and with many short connections fill the kernel's table
//! (`nf_conntrack_max`), which then drops new flows. So when such a session of this member's
//! closes or expires (one XDP forwarded here: `SessionFlags::FORWARDED_XDP`), the agent gives
//! the kernel's entry the timeout of a closed connection (ctnetlink: an update of the entry's
//! timeout, as `conntrack -U --timeout` does): it goes within seconds. An update, not a
//! removal: a new connection that reused the ports meanwhile keeps its entry, whose next
//! packet the kernel sees sets its timeout again.

use std::{io, net::IpAddr};

use hasync_common::{flow::IPPROTO_TCP, FlowKey, Session, SessionFlags};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};

use super::nlmsg::{self, NLMSG_ERROR, NLMSG_HDRLEN};

/// The timeout, in seconds, given to the kernel's entry of a forwarded connection that closed
/// (conntrack's own for a closed TCP connection is 10 s).
pub const CLOSED_TIMEOUT_S: u32 = 10;

/// A batch is sent once it holds this many bytes (a netlink datagram carries many requests).
const BATCH_BYTES: usize = 16 * 1024;

const NLM_F_REQUEST: u16 = 1;
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

    /// Session `s` of flow `key` closed or expired here: if it is a TCP connection forwarded
    /// in XDP, its kernel entry gets [`CLOSED_TIMEOUT_S`] (sent at the next
    /// [`KernelTrack::flush`], or now if the batch is full).
    pub fn closed(&mut self, key: &FlowKey, s: &Session) -> Result<(), KernelTrackError> {
        if !forwarded_tcp(key, s) {
            return Ok(());
        }
        self.seq = self.seq.wrapping_add(1);
        let initiator_hi = s.flags.has(SessionFlags::INITIATOR_HI);
        encode_update(&mut self.batch, self.seq, key, initiator_hi);
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
/// A failure is logged once and the kernel's entries are left to their own timeouts.
#[derive(Default)]
pub struct ClosedEntries {
    track: Option<KernelTrack>,
    failed: bool,
}

impl ClosedEntries {
    /// Open when `forwarding` is XDP (a socket that cannot open is logged, and nothing done).
    pub fn new(xdp: bool) -> ClosedEntries {
        let mut entries = ClosedEntries::default();
        if xdp {
            match KernelTrack::open() {
                Ok(t) => entries.track = Some(t),
                Err(e) => entries.failed_once(&e),
            }
        }
        entries
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
                "the kernel's entries of TCP connections forwarded in XDP cannot be closed: \
                 they stay until nf_conntrack_tcp_timeout_established (further failures are \
                 not logged)"
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

/// Is `s` a TCP connection that XDP forwarded here ([`SessionFlags::FORWARDED_XDP`]), whose
/// close the kernel never saw? (One the kernel forwarded throughout, a virtual wire's, one to
/// this host itself, has an entry the kernel keeps right on its own.)
fn forwarded_tcp(key: &FlowKey, s: &Session) -> bool {
    key.proto == IPPROTO_TCP && s.flags.has(SessionFlags::FORWARDED_XDP)
}

/// Appends to `out` the update (request `seq`) that gives the kernel's entry of `key`
/// [`CLOSED_TIMEOUT_S`]; its original direction starts at the initiator (the higher end when
/// `initiator_hi`).
fn encode_update(out: &mut Vec<u8>, seq: u32, key: &FlowKey, initiator_hi: bool) {
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
    put(out, CTA_TIMEOUT, &CLOSED_TIMEOUT_S.to_be_bytes());
    let len = (out.len() - start) as u32;
    let mut header = Vec::with_capacity(NLMSG_HDRLEN);
    header.extend_from_slice(&len.to_ne_bytes());
    header.extend_from_slice(&CT_UPDATE.to_ne_bytes());
    header.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    header.extend_from_slice(&seq.to_ne_bytes());
    header.extend_from_slice(&0u32.to_ne_bytes());
    out.splice(start..start + NLMSG_HDRLEN, header);
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

#[cfg(test)]
mod tests;
