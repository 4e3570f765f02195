//! IPsec policies (XFRM). The kernel encrypts forwarded traffic that an outbound policy
//! selects, and refuses forwarded traffic that a forward policy wants to have come through a
//! tunnel (or that a blocking default policy refuses); a packet XDP forwards meets neither
//! (`bpf_fib_lookup` consults no policy), so an established flow that a policy should carry
//! through a tunnel would leave in the clear. While any outbound or forward policy exists,
//! whatever it selects (a route-based tunnel's and a host-to-host one's too), or a default
//! policy blocks either direction, the routed ports are left out and the kernel forwards every
//! routed packet ([`super::plan`]); a notification of a policy change makes the ports be
//! checked at once ([`PolicyWatch`]). Virtual wires are bridged, not routed: no policy
//! applies.

use std::{io, path::Path, time::Duration};

use netlink_sys::{protocols::NETLINK_XFRM, AsyncSocket, AsyncSocketExt, Socket, TokioSocket};

use super::nlmsg::{self, NLMSG_DONE, NLMSG_ERROR, NLM_F_DUMP, NLM_F_REQUEST};

/// `XFRM_MSG_NEWPOLICY`: one policy of a listing (or a notification of one added).
const XFRM_MSG_NEWPOLICY: u16 = 19;
/// `XFRM_MSG_GETPOLICY`: the listing's request.
const XFRM_MSG_GETPOLICY: u16 = 21;
/// `XFRM_MSG_GETDEFAULT` (Linux 5.15): the default policies' request and answer.
const XFRM_MSG_GETDEFAULT: u16 = 40;
/// `XFRM_USERPOLICY_BLOCK`: a default policy that refuses what no policy selects.
const DEFAULT_BLOCK: u8 = 1;
/// `XFRMNLGRP_POLICY`: notifications of policies (and defaults) added, changed, removed or
/// flushed.
const XFRMNLGRP_POLICY: u32 = 4;
/// Where `struct xfrm_userpolicy_info` keeps the policy's direction (after its selector, 56
/// bytes, its lifetime settings, 64, its lifetime counters, 32, its priority and its index).
const DIR_AT: usize = 160;
/// `XFRM_POLICY_OUT` and `XFRM_POLICY_FWD` (`XFRM_POLICY_IN`, 0, selects traffic to this
/// host alone).
const DIR_OUT: u8 = 1;
const DIR_FWD: u8 = 2;
/// Longest wait for one datagram of an answer.
const REPLY_WITHIN: Duration = Duration::from_secs(1);
/// Reads of the policies tried before the kernel's silence or a signal counts as an answer
/// that they cannot be read (which leaves the routed ports to the kernel).
const ATTEMPTS: u32 = 3;
/// Receive buffer for notifications (an overrun only means a check).
const RECV_BUFFER: usize = 1 << 18;

/// Why the policies could not be read.
#[derive(Debug, thiserror::Error)]
pub enum IpsecError {
    #[error("XFRM netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("the kernel refused to list the IPsec policies: {0}")]
    Refused(#[source] io::Error),
    #[error("the kernel's list of IPsec policies does not parse")]
    Malformed,
    #[error("the kernel has PF_KEY but no XFRM netlink interface (xfrm_user): its IPsec policies cannot be read")]
    PfKeyOnly,
}

/// What of this network namespace's IPsec configuration may apply to routed traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policies {
    /// Outbound and forward policies.
    pub selecting: u32,
    /// A default policy (`ip xfrm policy setdefault`) blocks outbound or forwarded traffic.
    pub default_blocks: bool,
}

impl Policies {
    /// What keeps routed traffic to the kernel, said; `None` when nothing does.
    pub fn why(&self) -> Option<String> {
        match (self.selecting, self.default_blocks) {
            (0, false) => None,
            (0, true) => Some("a default IPsec policy blocks forwarded or sent traffic".into()),
            (n, _) => Some(format!(
                "{n} IPsec policies select forwarded or sent traffic (`ip xfrm policy`)"
            )),
        }
    }
}

/// Reads the policies that may apply to routed traffic, trying again when the kernel was
/// silent or a signal cut a read short. A kernel without XFRM's netlink interface (no
/// `xfrm_user`) and without PF_KEY has no policies.
pub fn forwarding_policies() -> Result<Policies, IpsecError> {
    let mut tried = 1;
    loop {
        match read_policies() {
            Err(IpsecError::Socket(e)) if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) => {
                return match Path::new("/proc/net/pfkey").exists() {
                    true => Err(IpsecError::PfKeyOnly),
                    false => Ok(Policies::default()),
                }
            }
            Err(IpsecError::Socket(_)) if tried < ATTEMPTS => tried += 1,
            done => return done,
        }
    }
}

/// One read: the listing of every policy, and the default policies.
fn read_policies() -> Result<Policies, IpsecError> {
    let mut socket = Socket::new(NETLINK_XFRM).map_err(IpsecError::Socket)?;
    socket.bind_auto().map_err(IpsecError::Socket)?;
    socket2::SockRef::from(&socket)
        .set_read_timeout(Some(REPLY_WITHIN))
        .map_err(IpsecError::Socket)?;
    let selecting = ask(
        &mut socket,
        &request(XFRM_MSG_GETPOLICY, NLM_F_DUMP, 1),
        1,
        false,
    )?;
    let default_blocks = ask(&mut socket, &request(XFRM_MSG_GETDEFAULT, 0, 2), 2, true)? != 0;
    Ok(Policies {
        selecting,
        default_blocks,
    })
}

/// Sends `request` (sequence number `seq`) and reads its answer to the end: the outbound and
/// forward policies it lists, or 1 for a default that blocks either direction (`default`: the
/// request is the defaults'; a kernel before 5.15 does not know it, EINVAL, and has none).
fn ask(socket: &mut Socket, request: &[u8], seq: u32, default: bool) -> Result<u32, IpsecError> {
    socket.send(request, 0).map_err(IpsecError::Socket)?;
    let mut found = 0u32;
    loop {
        let (datagram, from) = socket.recv_from_full().map_err(IpsecError::Socket)?;
        if from.port_number() != 0 {
            continue;
        }
        match read(&datagram, seq) {
            Ok(Answer::More(n)) => found = found.saturating_add(n),
            Ok(Answer::Done(n)) => return Ok(found.saturating_add(n)),
            Err(IpsecError::Refused(e)) if default && e.raw_os_error() == Some(libc::EINVAL) => {
                return Ok(0)
            }
            Err(e) => return Err(e),
        }
    }
}

/// What [`read`] makes of `datagram` as the answer `seq`: what it counts and whether the
/// answer ended there; `None` if it is refused or malformed (for the fuzz target).
pub fn read_answer(datagram: &[u8], seq: u32) -> Option<(u32, bool)> {
    match read(datagram, seq).ok()? {
        Answer::More(n) => Some((n, false)),
        Answer::Done(n) => Some((n, true)),
    }
}

/// An answer's datagram read: what it counts, and whether the answer ended there.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    More(u32),
    Done(u32),
}

/// Counts, in the answer `seq` in `datagram`, the outbound and forward policies of a listing,
/// or a default that blocks either direction (a default's answer is one message: it ends
/// there). An acknowledgement is skipped; an error, in NLMSG_ERROR or in the listing's end, is
/// the kernel's refusal.
fn read(datagram: &[u8], seq: u32) -> Result<Answer, IpsecError> {
    let mut found = 0u32;
    for m in nlmsg::messages(datagram) {
        let m = m.map_err(|_| IpsecError::Malformed)?;
        if m.seq != seq {
            continue;
        }
        match m.kind {
            NLMSG_DONE | NLMSG_ERROR => match nlmsg::error_code(m.body) {
                Some(0) if m.kind == NLMSG_ERROR => {}
                Some(0) => return Ok(Answer::Done(found)),
                Some(errno) => {
                    return Err(IpsecError::Refused(io::Error::from_raw_os_error(errno)))
                }
                None => return Err(IpsecError::Malformed),
            },
            XFRM_MSG_NEWPOLICY => {
                let dir = *m.body.get(DIR_AT).ok_or(IpsecError::Malformed)?;
                found += u32::from(dir == DIR_OUT || dir == DIR_FWD);
            }
            XFRM_MSG_GETDEFAULT => {
                // `struct xfrm_userpolicy_default`: in, fwd, out.
                let [_, fwd, out] = m.body.get(..3).ok_or(IpsecError::Malformed)? else {
                    return Err(IpsecError::Malformed);
                };
                let blocks = *fwd == DEFAULT_BLOCK || *out == DEFAULT_BLOCK;
                return Ok(Answer::Done(found + u32::from(blocks)));
            }
            _ => {}
        }
    }
    Ok(Answer::More(found))
}

/// A request of `kind` with `flags` and sequence number `seq`: a bare header for the listing
/// (the kernel walks every policy of both types); the default's carries a zeroed
/// `struct xfrm_userpolicy_default`, padded.
fn request(kind: u16, flags: u16, seq: u32) -> Vec<u8> {
    let body: &[u8] = if kind == XFRM_MSG_GETDEFAULT {
        &[0; 4]
    } else {
        &[]
    };
    nlmsg::message(kind, NLM_F_REQUEST | flags, seq, body)
}

/// Notifications of policy changes.
pub struct PolicyWatch {
    socket: TokioSocket,
}

impl PolicyWatch {
    /// Subscribes; `None` where the kernel has no XFRM netlink interface (no policy can be
    /// made through it) or the subscription failed (said; the ports are still checked every
    /// second).
    pub fn open() -> Option<PolicyWatch> {
        let opened = TokioSocket::new(NETLINK_XFRM).and_then(|mut socket| {
            socket.socket_mut().bind_auto()?;
            socket.socket_mut().add_membership(XFRMNLGRP_POLICY)?;
            Ok(socket)
        });
        match opened {
            Ok(socket) => {
                let _ = socket.socket_ref().set_rx_buf_sz(RECV_BUFFER);
                Some(PolicyWatch { socket })
            }
            Err(e) if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) => None,
            Err(e) => {
                tracing::warn!(error = %e, "IPsec policy notifications: the forwarding ports follow policy changes within a second only");
                None
            }
        }
    }

    /// Waits for the next notification (or an overrun, which may have lost some). Any other
    /// error is returned: the caller gives the watch up.
    pub async fn changed(&self) -> io::Result<()> {
        match self.socket.recv_from_full().await {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message of `kind` for answer `seq` with `body`.
    fn message(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        nlmsg::message(kind, 0, seq, body)
    }

    fn policy(dir: u8) -> Vec<u8> {
        let mut body = vec![0; 168];
        body[DIR_AT] = dir;
        body
    }

    /// Outbound and forward policies count, inbound ones do not; other answers' messages are
    /// skipped; the end and a refusal are told, an error in the end too, an acknowledgement
    /// is not one; a policy cut short is malformed.
    #[test]
    fn outbound_and_forward_policies_are_counted() {
        let mut datagram = Vec::new();
        for (dir, seq) in [(0, 1), (1, 1), (2, 1), (1, 9)] {
            datagram.extend(message(XFRM_MSG_NEWPOLICY, seq, &policy(dir)));
        }
        datagram.extend(message(NLMSG_ERROR, 1, &0i32.to_ne_bytes()));
        assert_eq!(read(&datagram, 1).expect("parses"), Answer::More(2));
        datagram.extend(message(NLMSG_DONE, 1, &[0; 4]));
        assert_eq!(read(&datagram, 1).expect("parses"), Answer::Done(2));
        let refused = message(NLMSG_ERROR, 1, &(-libc::EPERM).to_ne_bytes());
        assert!(matches!(read(&refused, 1), Err(IpsecError::Refused(e))
            if e.raw_os_error() == Some(libc::EPERM)));
        let cut = message(NLMSG_DONE, 1, &(-libc::EINTR).to_ne_bytes());
        assert!(matches!(read(&cut, 1), Err(IpsecError::Refused(_))));
        let short = message(XFRM_MSG_NEWPOLICY, 1, &[0; 100]);
        assert!(matches!(read(&short, 1), Err(IpsecError::Malformed)));
    }

    /// A default that blocks forwarded or sent traffic counts; one blocking only what comes
    /// in to the host does not.
    #[test]
    fn a_blocking_default_counts_for_forwarded_or_sent_traffic() {
        let default =
            |d: [u8; 3]| read(&message(XFRM_MSG_GETDEFAULT, 2, &[d[0], d[1], d[2], 0]), 2);
        assert_eq!(default([2, 1, 2]).expect("fwd"), Answer::Done(1));
        assert_eq!(default([2, 2, 1]).expect("out"), Answer::Done(1));
        assert_eq!(default([1, 2, 2]).expect("in"), Answer::Done(0));
        assert_eq!(default([0, 0, 0]).expect("unset"), Answer::Done(0));
    }
}
