//! IPsec policies (XFRM). The kernel encrypts forwarded traffic that an outbound policy
//! selects, and refuses forwarded traffic that a forward policy wants to have come through a
//! tunnel; a packet XDP forwards meets neither (`bpf_fib_lookup` consults no policy), so an
//! established flow that a policy should carry through a tunnel would leave in the clear. While
//! any outbound or forward policy exists, the routed ports are left out and the kernel forwards
//! every routed packet ([`super::plan`]); a notification of a policy change makes the ports be
//! checked at once ([`PolicyWatch`]). Virtual wires are bridged, not routed: no policy applies.

use std::{io, time::Duration};

use netlink_sys::{protocols::NETLINK_XFRM, AsyncSocket, AsyncSocketExt, Socket, TokioSocket};

use super::nlmsg::{self, NLMSG_ERROR};

/// `XFRM_MSG_NEWPOLICY`: one policy of a listing (or a notification of one added).
const XFRM_MSG_NEWPOLICY: u16 = 19;
/// `XFRM_MSG_GETPOLICY`: the listing's request.
const XFRM_MSG_GETPOLICY: u16 = 21;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
/// `XFRMNLGRP_POLICY`: notifications of policies added, changed, removed or flushed.
const XFRMNLGRP_POLICY: u32 = 4;
/// Where `struct xfrm_userpolicy_info` keeps the policy's direction (after its selector, 56
/// bytes, its lifetime settings, 64, its lifetime counters, 32, its priority and its index).
const DIR_AT: usize = 160;
/// `XFRM_POLICY_OUT` and `XFRM_POLICY_FWD` (`XFRM_POLICY_IN`, 0, selects traffic to this
/// host alone).
const DIR_OUT: u8 = 1;
const DIR_FWD: u8 = 2;
/// Longest wait for one datagram of the listing.
const REPLY_WITHIN: Duration = Duration::from_secs(1);
/// Receive buffer for notifications (an overrun only means a check).
const RECV_BUFFER: usize = 1 << 18;

/// Why the policies could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum IpsecError {
    #[error("XFRM netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("the kernel refused to list the IPsec policies: {0}")]
    Refused(#[source] io::Error),
    #[error("the kernel's list of IPsec policies does not parse")]
    Malformed,
}

/// How many IPsec policies of this network namespace select forwarded or sent traffic
/// (outbound and forward ones). A kernel without XFRM's netlink interface (`xfrm_user`) has
/// none made through it: 0.
pub fn forwarding_policies() -> Result<u32, IpsecError> {
    let mut socket = match Socket::new(NETLINK_XFRM) {
        Err(e) if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) => return Ok(0),
        other => other.map_err(IpsecError::Socket)?,
    };
    socket.bind_auto().map_err(IpsecError::Socket)?;
    socket2::SockRef::from(&socket)
        .set_read_timeout(Some(REPLY_WITHIN))
        .map_err(IpsecError::Socket)?;
    let seq = 1;
    socket
        .send(&dump_request(seq), 0)
        .map_err(IpsecError::Socket)?;
    let mut found = 0u32;
    loop {
        let (datagram, from) = socket.recv_from_full().map_err(IpsecError::Socket)?;
        if from.port_number() != 0 {
            continue;
        }
        match count(&datagram, seq)? {
            Listed::More(n) => found = found.saturating_add(n),
            Listed::Done(n) => return Ok(found.saturating_add(n)),
        }
    }
}

/// A listing's datagram read: policies counted in it, and whether the listing ended there.
#[derive(Debug, PartialEq, Eq)]
enum Listed {
    More(u32),
    Done(u32),
}

/// Counts the outbound and forward policies of the listing `seq` in `datagram`.
fn count(datagram: &[u8], seq: u32) -> Result<Listed, IpsecError> {
    let mut found = 0u32;
    for m in nlmsg::messages(datagram) {
        let m = m.map_err(|_| IpsecError::Malformed)?;
        if m.seq != seq {
            continue;
        }
        match m.kind {
            NLMSG_DONE => return Ok(Listed::Done(found)),
            NLMSG_ERROR => {
                let errno = nlmsg::error_code(m.body).ok_or(IpsecError::Malformed)?;
                return Err(IpsecError::Refused(io::Error::from_raw_os_error(errno)));
            }
            XFRM_MSG_NEWPOLICY => {
                let dir = *m.body.get(DIR_AT).ok_or(IpsecError::Malformed)?;
                found += u32::from(dir == DIR_OUT || dir == DIR_FWD);
            }
            _ => {}
        }
    }
    Ok(Listed::More(found))
}

/// The listing's request: a bare header (the kernel walks every policy of both types).
fn dump_request(seq: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(nlmsg::NLMSG_HDRLEN);
    m.extend_from_slice(&(nlmsg::NLMSG_HDRLEN as u32).to_ne_bytes());
    m.extend_from_slice(&XFRM_MSG_GETPOLICY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m
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
    /// error is waited out a little, so a broken socket cannot spin.
    pub async fn changed(&self) {
        match self.socket.recv_from_full().await {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message of `kind` for listing `seq` with `body`.
    fn message(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let len = nlmsg::NLMSG_HDRLEN + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m.resize(len.next_multiple_of(4), 0);
        m
    }

    fn policy(dir: u8) -> Vec<u8> {
        let mut body = vec![0; 168];
        body[DIR_AT] = dir;
        body
    }

    /// Outbound and forward policies count, inbound ones do not; other listings' messages
    /// are skipped; the end and a refusal are told; a policy cut short is malformed.
    #[test]
    fn outbound_and_forward_policies_are_counted() {
        let mut datagram = Vec::new();
        for (dir, seq) in [(0, 1), (1, 1), (2, 1), (1, 9)] {
            datagram.extend(message(XFRM_MSG_NEWPOLICY, seq, &policy(dir)));
        }
        assert_eq!(count(&datagram, 1).expect("parses"), Listed::More(2));
        datagram.extend(message(NLMSG_DONE, 1, &[0; 4]));
        assert_eq!(count(&datagram, 1).expect("parses"), Listed::Done(2));
        let refused = message(NLMSG_ERROR, 1, &(-libc::EPERM).to_ne_bytes());
        assert!(matches!(count(&refused, 1), Err(IpsecError::Refused(e))
            if e.raw_os_error() == Some(libc::EPERM)));
        let short = message(XFRM_MSG_NEWPOLICY, 1, &[0; 100]);
        assert!(matches!(count(&short, 1), Err(IpsecError::Malformed)));
    }
}
