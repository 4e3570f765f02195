//! Who may start a handshake with the listener, decided before any allocation: only the
//! addresses the configuration gives the members that dial this one, and only a few
//! handshakes at a time per address and in all. Everything else is closed at once, so a host
//! without the key cannot hold the agent's descriptors or tasks.
//!
//! A slot is held for good once the peer's hello came ([`Ticket::spoke`]): it proves the key
//! and that the connection is fresh (it is encrypted to this side's ephemeral key; the
//! handshake's first message alone could be a replay). Before that, a new connection from the
//! same address, its slots all taken, takes the slot of the oldest one that has not spoken
//! ([`Ticket::evicted`] tells it to go): a process that can send from a member's address (any
//! local user on that member, a neighbour that spoofs it) and keeps idle connections open
//! would otherwise hold every slot for the hello's whole timeout, again and again, and lock
//! the member out of the link. Its own dial speaks within two round trips. (One that floods
//! connections from that address faster than the dial's handshake can still evict it: a
//! member keeps local users off the sync port with its own output rules.)

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use hasync_common::MemberId;
use tokio::sync::Notify;

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
    /// Too many handshakes under way from this address, all past their first message, or in
    /// all.
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
    /// The handshakes under way, oldest first per address.
    under_way: Mutex<HashMap<IpAddr, Vec<Slot>>>,
}

/// One handshake's slot, in the admission's lock: whether it spoke is read and written there
/// only, so a slot is never both kept and given away.
#[derive(Debug)]
struct Slot {
    /// What tells its handshake the slot was given to a newer connection from its address
    /// (also the slot's identity).
    evicted: Arc<Notify>,
    /// Its hello came: it keeps its slot.
    spoke: bool,
}

/// A handshake slot, given back on drop.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
    evicted: Arc<Notify>,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Vec<Slot>>> {
        self.under_way.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a handshake from `ip` (taken from the oldest of its handshakes that has not
    /// spoken, when all of its slots are taken), or why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refusal> {
        let ip = ip.to_canonical();
        let member = *self.members.get(&ip).ok_or(Refusal::UnknownAddress)?;
        let mut g = self.lock();
        let total: usize = g.values().map(Vec::len).sum();
        let mine = g.entry(ip).or_default();
        if mine.len() >= MAX_PER_SOURCE {
            let oldest = mine.iter().position(|s| !s.spoke).ok_or(Refusal::Busy)?;
            mine.remove(oldest).evicted.notify_one();
        } else if total >= MAX_TOTAL {
            return Err(Refusal::Busy);
        }
        let evicted = Arc::new(Notify::new());
        mine.push(Slot {
            evicted: evicted.clone(),
            spoke: false,
        });
        Ok(Ticket {
            admission: self.clone(),
            ip,
            evicted,
            member,
        })
    }
}

impl Ticket {
    /// The peer's hello came: the slot is no longer given away. False if it was given away
    /// already (the handshake must end).
    pub fn spoke(&self) -> bool {
        let mut g = self.admission.lock();
        let mut mine = g.get_mut(&self.ip).into_iter().flatten();
        let slot = mine.find(|s| Arc::ptr_eq(&s.evicted, &self.evicted));
        slot.map(|s| s.spoke = true).is_some()
    }

    /// Resolves once the slot was given to a newer connection from the same address (never
    /// after [`Ticket::spoke`]): the handshake must end.
    pub async fn evicted(&self) {
        self.evicted.notified().await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut g = self.admission.lock();
        let Some(mine) = g.get_mut(&self.ip) else {
            return;
        };
        // An evicted slot was taken out of the list when it was given away.
        mine.retain(|s| !Arc::ptr_eq(&s.evicted, &self.evicted));
        if mine.is_empty() {
            g.remove(&self.ip);
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
        assert!(t1.spoke() && t2.spoke());
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

    /// A new connection from an address whose slots are all taken takes the slot of its oldest
    /// handshake that has not spoken, which is told to go; a handshake that spoke keeps its
    /// slot. Before, idle connections from a member's address (a local user on that member
    /// can make them) held both slots for the hello's whole timeout, again and again, and
    /// the member's own dial was refused (`pre-auth-limit`).
    #[tokio::test]
    async fn a_silent_handshake_gives_its_slot_to_a_newer_one() {
        let a = admission();
        let member = ip("198.18.100.1");
        let idle_1 = a.admit(member).expect("first");
        let idle_2 = a.admit(member).expect("second");
        let dial = a.admit(member).expect("the oldest silent one's slot");
        tokio::time::timeout(std::time::Duration::from_secs(1), idle_1.evicted())
            .await
            .expect("the oldest was told to go");
        assert!(dial.spoke());
        assert!(!idle_1.spoke(), "a slot given away is not kept");
        let again = a.admit(member).expect("the other silent one's slot");
        tokio::time::timeout(std::time::Duration::from_secs(1), idle_2.evicted())
            .await
            .expect("the second was told to go");
        assert!(again.spoke());
        assert_eq!(
            a.admit(member).map(|t| t.member),
            Err(Refusal::Busy),
            "both slots spoke"
        );
        drop((idle_1, idle_2));
        let held = |a: &Admission| a.lock().values().map(Vec::len).sum::<usize>();
        assert_eq!(held(&a), 2, "the evicted ones gave back nothing twice");
        drop((dial, again));
        assert_eq!(held(&a), 0);
    }
}
