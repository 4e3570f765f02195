//! Who may start a handshake with the listener, decided before any allocation: only the
//! addresses the configuration gives the members that dial this one, and only a few
//! handshakes at a time per address and in all. Everything else is closed at once, so a host
//! without the key cannot hold the agent's descriptors or tasks.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use hasync_common::MemberId;

use super::stats::Rejection;

/// Handshakes under way from one address.
pub const MAX_PER_SOURCE: usize = 2;
/// Handshakes under way in all, per listener.
pub const MAX_TOTAL: usize = 32;

/// Why a connection was refused before its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The source is not the address of a member that dials this one on this link.
    UnknownAddress,
    /// Too many handshakes under way from this address, or in all.
    Busy,
}

impl Refusal {
    /// The reason counters give.
    pub const fn reason(self) -> Rejection {
        match self {
            Refusal::UnknownAddress => Rejection::UnknownAddress,
            Refusal::Busy => Rejection::PreAuthLimit,
        }
    }
}

/// The admission state of one listener.
#[derive(Debug)]
pub struct Admission {
    /// Configured address → the member there.
    members: BTreeMap<IpAddr, MemberId>,
    under_way: Mutex<HashMap<IpAddr, usize>>,
}

/// A handshake slot, given back on drop.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
    /// The member the configuration places at the source address.
    pub member: MemberId,
}

impl Admission {
    /// `members`: the configured address of every member that dials this listener.
    pub fn new(members: BTreeMap<IpAddr, MemberId>) -> Arc<Self> {
        Arc::new(Admission {
            members,
            under_way: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.under_way.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a handshake from `ip`, or why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refusal> {
        let ip = ip.to_canonical();
        let member = *self.members.get(&ip).ok_or(Refusal::UnknownAddress)?;
        let mut g = self.lock();
        let total: usize = g.values().sum();
        let mine = g.entry(ip).or_default();
        if *mine >= MAX_PER_SOURCE || total >= MAX_TOTAL {
            return Err(Refusal::Busy);
        }
        *mine += 1;
        Ok(Ticket {
            admission: self.clone(),
            ip,
            member,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut g = self.admission.lock();
        if let Some(n) = g.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    fn admission() -> Arc<Admission> {
        Admission::new(
            [
                (ip("198.18.100.1"), MemberId(1)),
                (ip("fd00::1"), MemberId(2)),
            ]
            .into(),
        )
    }

    #[test]
    fn only_configured_addresses_and_a_few_at_a_time() {
        let a = admission();
        assert_eq!(
            a.admit(ip("198.18.100.9")).map(|t| t.member),
            Err(Refusal::UnknownAddress)
        );
        let t1 = a.admit(ip("198.18.100.1")).expect("first");
        assert_eq!(t1.member, MemberId(1));
        let t2 = a.admit(ip("198.18.100.1")).expect("second");
        assert_eq!(
            a.admit(ip("198.18.100.1")).map(|t| t.member),
            Err(Refusal::Busy)
        );
        // Another source is not starved by the first.
        let t3 = a.admit(ip("fd00::1")).expect("other member");
        assert_eq!(t3.member, MemberId(2));
        drop(t1);
        assert!(a.admit(ip("198.18.100.1")).is_ok(), "slot given back");
        drop((t2, t3));
        assert!(a.lock().is_empty());
    }

    #[test]
    fn a_v4_mapped_source_is_the_v4_address() {
        let a = admission();
        let t = a.admit(ip("::ffff:198.18.100.1")).expect("mapped");
        assert_eq!(t.member, MemberId(1));
    }
}
