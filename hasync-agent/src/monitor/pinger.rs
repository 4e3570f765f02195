//! The path groups' pingers: one task per group, its raw sockets opened at start, an echo to
//! every target each interval, the verdict recorded when it changes ([`super::path`] holds
//! the pure part).

use std::{
    mem::MaybeUninit,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use super::{path, record, MonitorError};
use crate::{
    cluster::{Condition, Membership},
    config::monitor::PathGroup,
};

/// What tells this agent's echoes apart: a random identifier and key per group, the key
/// mixed with each sequence number into the nonce a reply must carry back.
#[derive(Clone, Copy, Debug)]
struct EchoSecret {
    id: u16,
    key: u64,
}

impl EchoSecret {
    fn new() -> EchoSecret {
        let key = crate::random::random_u64();
        EchoSecret {
            id: (key >> 48) as u16,
            key,
        }
    }

    fn nonce(self, seq: u16) -> u64 {
        self.key ^ u64::from(seq).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

/// One path group's pinger: its sockets (one per family its targets use) and secret.
pub(super) struct Pinger {
    group: PathGroup,
    v4: Option<path::EchoSocket>,
    v6: Option<path::EchoSocket>,
    secret: EchoSecret,
}

impl Pinger {
    pub(super) fn open(group: PathGroup) -> Result<Pinger, MonitorError> {
        let secret = EchoSecret::new();
        let open = |v4: bool| {
            let wanted = group.targets.iter().any(|t| t.is_ipv4() == v4);
            wanted
                .then(|| path::EchoSocket::open(v4, secret.id))
                .transpose()
                .map_err(|source| MonitorError::RawSocket {
                    group: group.name.clone(),
                    v4,
                    source,
                })
        };
        let (v4, v6) = (open(true)?, open(false)?);
        Ok(Pinger {
            group,
            v4,
            v6,
            secret,
        })
    }

    /// The group's name.
    pub(super) fn group(&self) -> &str {
        &self.group.name
    }

    pub(super) async fn run(self, membership: Arc<Mutex<Membership>>) {
        let Pinger {
            group,
            v4,
            v6,
            secret,
        } = self;
        let condition = Condition::PathGroup(group.name.clone());
        let mut tally = path::Tally::new(&group);
        let mut tick = tokio::time::interval(group.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut buf4, mut buf6) = ([MaybeUninit::uninit(); 1500], [MaybeUninit::uninit(); 1500]);
        let mut seq: u16 = 0;
        let mut last_cause = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    seq = seq.wrapping_add(1);
                    tally.round(seq);
                    for &target in &group.targets {
                        let socket = if target.is_ipv4() { &v4 } else { &v6 };
                        if let Some(s) = socket {
                            let echo = path::echo_request(target, secret.id, seq, secret.nonce(seq));
                            // Not sent (no route, EPERM): an unanswered echo, and the cause says why.
                            tally.sent(target, s.send(target, &echo).err().map(|e| e.to_string()));
                        }
                    }
                }
                Some((n, from)) = recv(v4.as_ref(), &mut buf4) => answered(&mut tally, v4.as_ref(), &buf4, n, from, secret),
                Some((n, from)) = recv(v6.as_ref(), &mut buf6) => answered(&mut tally, v6.as_ref(), &buf6, n, from, secret),
            }
            let cause = tally.cause();
            if cause != last_cause {
                record(&membership, condition.clone(), cause.clone());
                last_cause = cause;
            }
        }
    }
}

async fn recv(
    socket: Option<&path::EchoSocket>,
    buf: &mut [MaybeUninit<u8>],
) -> Option<(usize, IpAddr)> {
    match socket {
        Some(s) => s.recv(buf).await.ok(),
        None => std::future::pending().await,
    }
}

fn answered(
    tally: &mut path::Tally,
    socket: Option<&path::EchoSocket>,
    buf: &[MaybeUninit<u8>],
    n: usize,
    from: IpAddr,
    secret: EchoSecret,
) {
    let Some(socket) = socket else { return };
    let got: Vec<u8> = buf
        .iter()
        .take(n)
        // SAFETY: recv_from initialised the first `n` bytes.
        .map(|b| unsafe { b.assume_init() })
        .collect();
    if let Some(seq) = path::reply_seq(&got, socket.is_v4(), secret.id, |s| secret.nonce(s)) {
        tally.answered(from, seq);
    }
}
