//! Path monitoring: the agent pings each target of a `[[monitor.path_groups]]` entry (ICMP or
//! ICMPv6 echo from a raw socket) every interval; a target that leaves `failures` echoes in a
//! row unanswered has failed, one answer restores it. Whether the group fails follows its
//! `failure_condition`.
//!
//! Echo replies come back through the data interfaces like any traffic: the datapath tracks
//! them as ICMP echo sessions of this member.

use std::{
    collections::BTreeMap,
    io,
    mem::MaybeUninit,
    net::{IpAddr, SocketAddr},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;

use crate::config::monitor::{FailureCondition, PathGroup};

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// Payload after the 8-byte echo header: enough to tell our echoes from others'.
const PAYLOAD: &[u8] = b"hasync path monitor";

/// One target's record: the last sequence number sent, whether a recent echo was answered
/// since, the unanswered rounds in a row, and why the last echo could not be sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Target {
    pending: Option<u16>,
    answered: bool,
    misses: u32,
    send_error: Option<String>,
}

/// The pure part of a path group: what was sent and answered, and what follows from it.
#[derive(Debug)]
pub struct Tally {
    targets: BTreeMap<IpAddr, Target>,
    failures: u32,
    condition: FailureCondition,
}

impl Tally {
    pub fn new(group: &PathGroup) -> Tally {
        Tally {
            targets: group
                .targets
                .iter()
                .map(|&t| (t, Target::default()))
                .collect(),
            failures: group.failures,
            condition: group.failure_condition,
        }
    }

    /// A new round of echoes numbered `seq` is about to go out: a target that answered none
    /// of the recent echoes since the last round misses one more.
    pub fn round(&mut self, seq: u16) {
        for t in self.targets.values_mut() {
            if t.pending.is_some() {
                t.misses = if t.answered {
                    0
                } else {
                    t.misses.saturating_add(1)
                };
            }
            t.pending = Some(seq);
            t.answered = false;
        }
    }

    /// Sending the echo to `target` failed (`None`: it went out).
    pub fn sent(&mut self, target: IpAddr, error: Option<String>) {
        if let Some(t) = self.targets.get_mut(&target) {
            t.send_error = error;
        }
    }

    /// An echo reply from `from` numbered `seq`. An answer to one of the last `failures`
    /// echoes counts (a round trip may be longer than the interval); older or foreign ones
    /// change nothing.
    pub fn answered(&mut self, from: IpAddr, seq: u16) {
        let window = u16::try_from(self.failures).unwrap_or(u16::MAX);
        if let Some(t) = self.targets.get_mut(&from) {
            if t.pending.is_some_and(|p| p.wrapping_sub(seq) < window) {
                t.answered = true;
                t.misses = 0;
            }
        }
    }

    /// The targets that failed, and whether the group has.
    pub fn failed(&self) -> (Vec<IpAddr>, bool) {
        let failed: Vec<IpAddr> = self
            .targets
            .iter()
            .filter(|(_, t)| t.misses >= self.failures)
            .map(|(&a, _)| a)
            .collect();
        let group = self.condition.fails(failed.len(), self.targets.len());
        (failed, group)
    }

    /// The cause to report while the group fails.
    pub fn cause(&self) -> Option<String> {
        let (failed, group) = self.failed();
        group.then(|| {
            let list: Vec<String> = failed
                .iter()
                .map(
                    |a| match self.targets.get(a).and_then(|t| t.send_error.as_ref()) {
                        Some(e) => format!("{a} (sending fails: {e})"),
                        None => a.to_string(),
                    },
                )
                .collect();
            format!(
                "no answer from {} ({} echoes in a row)",
                list.join(", "),
                self.failures
            )
        })
    }
}

/// The echo request `id`/`seq` for `target`'s family (the kernel sums ICMPv6 itself). Its
/// payload is [`PAYLOAD`] and `nonce`, which a reply must carry back: an echo reply forged
/// without seeing the request does not count.
pub fn echo_request(target: IpAddr, id: u16, seq: u16, nonce: u64) -> Vec<u8> {
    let kind = if target.is_ipv4() {
        ICMP_ECHO_REQUEST
    } else {
        ICMPV6_ECHO_REQUEST
    };
    let mut m = vec![kind, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(PAYLOAD);
    m.extend_from_slice(&nonce.to_be_bytes());
    if target.is_ipv4() {
        let sum = checksum(&m);
        m[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    m
}

/// The internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The sequence number of an echo reply to us (`id`, carrying `nonce(seq)`), from what a raw
/// socket of `v4`'s family received (an IPv4 raw socket hands over the IP header too).
pub fn reply_seq(packet: &[u8], v4: bool, id: u16, nonce: impl Fn(u16) -> u64) -> Option<u16> {
    let icmp = if v4 {
        let ihl = usize::from(packet.first()? & 0x0f) * 4;
        packet.get(ihl..)?
    } else {
        packet
    };
    let want = if v4 {
        ICMP_ECHO_REPLY
    } else {
        ICMPV6_ECHO_REPLY
    };
    let h = icmp.get(..8)?;
    if h[0] != want || h[1] != 0 || u16::from_be_bytes([h[4], h[5]]) != id {
        return None;
    }
    let seq = u16::from_be_bytes([h[6], h[7]]);
    let payload = icmp.get(8..)?;
    let (text, rest) = payload.split_at_checked(PAYLOAD.len())?;
    let carried = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    (text == PAYLOAD && carried == nonce(seq)).then_some(seq)
}

/// Lets only echo replies reach `socket` (ICMP_FILTER, ICMP6_FILTER): the rest of the host's
/// ICMP traffic (neighbour discovery, others' errors, a flood) never wakes the pinger.
fn only_echo_replies(socket: &Socket, v4: bool) -> io::Result<()> {
    /// `ICMP_FILTER` (linux/icmp.h), at level SOL_RAW: a bit set drops that type.
    const ICMP_FILTER: libc::c_int = 1;
    /// `ICMPV6_FILTER` (linux/icmpv6.h), at level IPPROTO_ICMPV6: 256 bits, a bit set blocks
    /// that type.
    const ICMPV6_FILTER: libc::c_int = 1;
    if v4 {
        let mask: u32 = !(1u32 << ICMP_ECHO_REPLY);
        return set_option(socket, libc::SOL_RAW, ICMP_FILTER, &mask);
    }
    let mut mask = [u32::MAX; 8];
    let reply = usize::from(ICMPV6_ECHO_REPLY);
    if let Some(word) = mask.get_mut(reply / 32) {
        *word &= !(1u32 << (reply % 32));
    }
    set_option(socket, libc::IPPROTO_ICMPV6, ICMPV6_FILTER, &mask)
}

/// Lets only echo replies carrying identifier `id` be queued on `socket` (a classic BPF
/// socket filter, run before the socket's buffer): a flood of echo replies to the host, which
/// anyone can send, would otherwise fill the buffer and crowd out the genuine replies, and
/// the paths would be declared failed. An IPv4 raw socket sees the IP header first, an
/// ICMPv6 one the ICMPv6 header; the identifier is the header's bytes 4 and 5.
fn only_identifier(socket: &Socket, v4: bool, id: u16) -> io::Result<()> {
    use libc::{
        sock_filter, BPF_ABS, BPF_B, BPF_H, BPF_IND, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_LDX,
        BPF_MSH, BPF_RET,
    };
    let op = |code: u32, jt: u8, jf: u8, k: u32| sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let check = [
        op(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, u32::from(id)),
        op(BPF_RET | BPF_K, 0, 0, u32::MAX),
        op(BPF_RET | BPF_K, 0, 0, 0),
    ];
    let mut program = if v4 {
        // X = the IP header's length; A = the half-word at X + 4.
        vec![
            op(BPF_LDX | BPF_B | BPF_MSH, 0, 0, 0),
            op(BPF_LD | BPF_H | BPF_IND, 0, 0, 4),
        ]
    } else {
        vec![op(BPF_LD | BPF_H | BPF_ABS, 0, 0, 4)]
    };
    program.extend(check);
    let prog = libc::sock_fprog {
        len: program.len() as libc::c_ushort,
        filter: program.as_mut_ptr(),
    };
    // The kernel copies the program during the call; `program` outlives it.
    set_option(socket, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog)
}

/// setsockopt(2) with `value` as the option: a plain integer, an array of integers, or a
/// `sock_fprog` (whose program the kernel copies during the call).
fn set_option<T: Copy>(
    socket: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: `value` is valid for reads of its size, which is the length passed; the fd is the
    // socket's, open while borrowed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A raw ICMP or ICMPv6 socket, non-blocking, for tokio.
pub struct EchoSocket {
    fd: AsyncFd<Socket>,
    v4: bool,
}

impl EchoSocket {
    /// A socket of `v4`'s family that queues only echo replies carrying identifier `id`.
    pub fn open(v4: bool, id: u16) -> io::Result<EchoSocket> {
        let (domain, protocol) = if v4 {
            (Domain::IPV4, Protocol::ICMPV4)
        } else {
            (Domain::IPV6, Protocol::ICMPV6)
        };
        let socket = Socket::new(domain, Type::RAW, Some(protocol))?;
        socket.set_nonblocking(true)?;
        only_echo_replies(&socket, v4)?;
        only_identifier(&socket, v4, id)?;
        // SAFETY: a socket2::Socket owns its fd: it stays open, the same, until dropped with
        // the AsyncFd.
        let fd = unsafe { AsyncFd::register(socket) }?;
        Ok(EchoSocket { fd, v4 })
    }

    pub fn send(&self, target: IpAddr, message: &[u8]) -> io::Result<()> {
        let to = SocketAddr::new(target, 0);
        self.fd.get_ref().send_to(message, &to.into()).map(drop)
    }

    /// The next packet and its sender.
    pub async fn recv(&self, buf: &mut [MaybeUninit<u8>]) -> io::Result<(usize, IpAddr)> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|s| s.get_ref().recv_from(buf)) {
                Ok(Ok((n, from))) => {
                    let from = from
                        .as_socket()
                        .map(|a| a.ip())
                        .ok_or_else(|| io::Error::other("a reply without an IP source"))?;
                    return Ok((n, from));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
    }

    pub fn is_v4(&self) -> bool {
        self.v4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(condition: FailureCondition, failures: u32) -> PathGroup {
        PathGroup {
            name: "gw".into(),
            failure_condition: condition,
            targets: vec![
                "198.18.1.1".parse().unwrap(),
                "fd00:18:1::1".parse().unwrap(),
            ],
            interval_ms: 200,
            failures,
        }
    }

    #[test]
    fn a_target_fails_after_failures_unanswered_echoes_in_a_row_and_one_answer_restores_it() {
        let a: IpAddr = "198.18.1.1".parse().unwrap();
        let b: IpAddr = "fd00:18:1::1".parse().unwrap();
        let mut t = Tally::new(&group(FailureCondition::Any, 3));
        for seq in 1..=3 {
            t.round(seq);
            t.answered(b, seq);
        }
        assert_eq!(
            t.failed(),
            (vec![], false),
            "the third round is still pending"
        );
        t.round(4);
        assert_eq!(t.failed(), (vec![a], true));
        assert_eq!(
            t.cause().as_deref(),
            Some("no answer from 198.18.1.1 (3 echoes in a row)")
        );
        // An answer to an echo older than the last `failures` does not count; a recent one does.
        t.answered(a, 1);
        assert!(t.failed().1);
        t.answered(a, 4);
        assert_eq!(t.failed(), (vec![], false));
        assert_eq!(t.cause(), None);
    }

    #[test]
    fn all_fails_only_when_every_target_has() {
        let b: IpAddr = "fd00:18:1::1".parse().unwrap();
        let mut t = Tally::new(&group(FailureCondition::All, 1));
        t.round(1);
        t.answered(b, 1);
        t.round(2);
        assert_eq!(t.failed().0.len(), 1);
        assert!(!t.failed().1);
        t.round(3);
        assert!(t.failed().1, "neither answered echo 2");
    }

    #[test]
    fn late_answers_to_recent_echoes_count_and_send_errors_are_named() {
        let a: IpAddr = "198.18.1.1".parse().unwrap();
        let mut t = Tally::new(&group(FailureCondition::Any, 3));
        // Each answer arrives a round late (a round trip longer than the interval).
        t.round(1);
        for seq in 2..=6 {
            t.round(seq);
            t.answered(a, seq - 1);
        }
        t.round(7);
        assert!(!t.failed().0.contains(&a), "late answers kept it up");
        t.answered(a, 3);
        for seq in 8..=11 {
            t.round(seq);
        }
        t.sent(a, Some("Operation not permitted".into()));
        assert_eq!(
            t.cause().as_deref(),
            Some(
                "no answer from 198.18.1.1 (sending fails: Operation not permitted), \
                 fd00:18:1::1 (3 echoes in a row)"
            )
        );
    }

    /// The echo reply `id`/`seq` to `to`, as a target would send it.
    fn reply_to(to: IpAddr, id: u16, seq: u16) -> Vec<u8> {
        let mut m = echo_request(to, id, seq, 0);
        if to.is_ipv4() {
            m[0] = ICMP_ECHO_REPLY;
            m[2..4].fill(0);
            let sum = checksum(&m);
            m[2..4].copy_from_slice(&sum.to_be_bytes());
        } else {
            m[0] = ICMPV6_ECHO_REPLY;
        }
        m
    }

    /// A flood of echo replies to the host (anyone can send them) must not fill the pinger's
    /// socket: only replies carrying its identifier are queued, so the genuine one is the
    /// first it reads. Seen failing (a flood reply read first) without the socket filter.
    #[test]
    fn only_replies_with_our_identifier_are_queued() {
        crate::datapath::testing::in_fresh_netns(|| {
            crate::datapath::testing::ip(&["link", "set", "lo", "up"]);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                for to in ["127.0.0.1", "::1"] {
                    let to: IpAddr = to.parse().expect("address");
                    let ours = EchoSocket::open(to.is_ipv4(), 0x1234).expect("our socket");
                    let flood = EchoSocket::open(to.is_ipv4(), 0x4321).expect("flood socket");
                    for seq in 0..64 {
                        flood.send(to, &reply_to(to, 0x4321, seq)).expect("flood");
                    }
                    flood.send(to, &reply_to(to, 0x1234, 99)).expect("genuine");
                    let mut buf = [MaybeUninit::uninit(); 1500];
                    let wait = std::time::Duration::from_secs(2);
                    let (n, _) = tokio::time::timeout(wait, ours.recv(&mut buf))
                        .await
                        .expect("a reply within 2 s")
                        .expect("recv");
                    // SAFETY: recv_from initialised the first `n` bytes.
                    let got: Vec<u8> = buf[..n]
                        .iter()
                        .map(|b| unsafe { b.assume_init() })
                        .collect();
                    assert_eq!(
                        reply_seq(&got, to.is_ipv4(), 0x1234, |_| 0),
                        Some(99),
                        "{to}: the first reply read is ours"
                    );
                }
            });
        });
    }

    #[test]
    fn echoes_are_built_and_replies_recognised_by_id_and_nonce() {
        let nonce = |seq: u16| 0xfeed_0000 + u64::from(seq);
        let v4 = echo_request("198.18.1.1".parse().unwrap(), 0x1234, 7, nonce(7));
        assert_eq!(&v4[..2], &[ICMP_ECHO_REQUEST, 0]);
        assert_eq!(checksum(&v4), 0, "a valid checksum sums to zero");
        // The reply as an IPv4 raw socket delivers it: a 20-byte IP header first.
        let mut reply = vec![0x45; 1];
        reply.resize(20, 0);
        let mut icmp = v4.clone();
        icmp[0] = ICMP_ECHO_REPLY;
        reply.extend_from_slice(&icmp);
        assert_eq!(reply_seq(&reply, true, 0x1234, nonce), Some(7));
        assert_eq!(reply_seq(&reply, true, 0x1235, nonce), None, "another id");
        assert_eq!(
            reply_seq(&reply, true, 0x1234, |s| nonce(s) + 1),
            None,
            "forged"
        );
        assert_eq!(
            reply_seq(&reply[..40], true, 0x1234, nonce),
            None,
            "truncated"
        );
        let v6 = echo_request("fd00::1".parse().unwrap(), 9, 1, nonce(1));
        assert_eq!(v6[0], ICMPV6_ECHO_REQUEST);
        let mut r6 = v6.clone();
        r6[0] = ICMPV6_ECHO_REPLY;
        assert_eq!(reply_seq(&r6, false, 9, nonce), Some(1));
        assert_eq!(
            reply_seq(&v6, false, 9, nonce),
            None,
            "a request is not a reply"
        );
    }
}
