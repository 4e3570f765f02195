//! Does this host route by source address? A rule with a `from` prefix, an IPv6 route with a
//! source prefix (`ip -6 route add ... from ...`), or a multipath route (its leg is chosen by a
//! hash of the source and destination; a route through a next-hop object may be one) makes the
//! next hop depend on the source. Only then does the XDP FIB cache key on the source too, and
//! the lookup see the real source; otherwise one entry per destination (and ingress interface)
//! serves every source, so a million clients behind one route cost one lookup, not a million.
//!
//! The routes may be many (a full table): they are listed once at start. Afterwards a
//! notification that adds such a rule or route switches to keying on the source at once,
//! without a listing; one that removes a rule or such a route (or cannot be read, or was lost
//! in an overrun) lists them all again to see whether any is left, at a pace ([`Relist`]).

use std::{
    io,
    time::{Duration, Instant},
};

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::{
    route::{RouteAttribute, RouteMessage},
    rule::RuleMessage,
    RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};

/// How long one reply of a listing may take.
const REPLY_WITHIN: Duration = Duration::from_secs(2);

/// Does some rule or route select by source now? One listing of the rules and one of the
/// routes (both families, every table), on a socket of their own.
pub fn routes_by_source() -> io::Result<bool> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket2::SockRef::from(&socket).set_read_timeout(Some(REPLY_WITHIN))?;
    let rules = RouteNetlinkMessage::GetRule(RuleMessage::default());
    let routes = RouteNetlinkMessage::GetRoute(RouteMessage::default());
    for (seq, request) in [(1, rules), (2, routes)] {
        if list(&mut socket, seq, request)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Sends the dump `request` and reads its replies to the end: does any select by source?
fn list(socket: &mut Socket, seq: u32, request: RouteNetlinkMessage) -> io::Result<bool> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(request));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut found = false;
    loop {
        let (datagram, from) = socket.recv_from_full()?;
        if from.port_number() != 0 {
            continue;
        }
        for m in messages(&datagram) {
            let m = m.map_err(|e| io::Error::other(format!("a reply does not parse: {e}")))?;
            if m.header.sequence_number != seq {
                continue;
            }
            match m.payload {
                NetlinkPayload::Done(_) => return Ok(found),
                NetlinkPayload::Error(e) => {
                    let code = e.code.map_or(0, |c| c.get());
                    return Err(io::Error::from_raw_os_error(code.saturating_neg()));
                }
                NetlinkPayload::InnerMessage(inner) => found |= by_source(&inner),
                _ => {}
            }
        }
    }
}

/// The routing netlink messages of one datagram; a message that does not parse is an error,
/// and so is broken framing (which ends the datagram).
fn messages(
    mut datagram: &[u8],
) -> Vec<Result<NetlinkMessage<RouteNetlinkMessage>, netlink_packet_core::DecodeError>> {
    let mut out = Vec::new();
    while !datagram.is_empty() {
        let frame = match NetlinkBuffer::new_checked(datagram) {
            Ok(frame) => frame,
            Err(e) => {
                out.push(Err(e));
                break;
            }
        };
        let len = frame.length() as usize;
        let Some(one) = datagram.get(..len) else {
            break;
        };
        out.push(NetlinkMessage::deserialize(one));
        // Messages are 4-byte aligned; `new_checked` guarantees `len` ≥ a header.
        datagram = datagram.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    out
}

/// Does `m` select by source: a rule with a `from` prefix, or a route with a source prefix,
/// several next hops, or a next-hop object (which may be a group)?
fn by_source(m: &RouteNetlinkMessage) -> bool {
    match m {
        RouteNetlinkMessage::NewRule(r) => r.header.src_len > 0,
        RouteNetlinkMessage::NewRoute(r) => route_by_source(r),
        _ => false,
    }
}

fn route_by_source(r: &RouteMessage) -> bool {
    r.header.source_prefix_length > 0
        || r.attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::MultiPath(_) | RouteAttribute::NhId(_)))
}

/// What a datagram of notifications means for [`routes_by_source`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    /// Nothing it depends on.
    None,
    /// Something that selects by source was removed, or the datagram does not parse: list
    /// again.
    Recheck,
    /// Something that selects by source was added: key on the source now.
    BySource,
}

/// What `datagram` (notifications) changes.
pub fn change(datagram: &[u8]) -> Change {
    let one = |m: &Result<NetlinkMessage<RouteNetlinkMessage>, _>| match m {
        Ok(m) => match &m.payload {
            NetlinkPayload::InnerMessage(inner @ RouteNetlinkMessage::NewRule(_)) => {
                if by_source(inner) {
                    Change::BySource
                } else {
                    Change::None
                }
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRule(_)) => Change::Recheck,
            NetlinkPayload::InnerMessage(inner @ RouteNetlinkMessage::NewRoute(_)) => {
                if by_source(inner) {
                    Change::BySource
                } else {
                    Change::None
                }
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRoute(r)) => {
                if route_by_source(r) {
                    Change::Recheck
                } else {
                    Change::None
                }
            }
            _ => Change::None,
        },
        Err(_) => Change::Recheck,
    };
    messages(datagram)
        .iter()
        .map(one)
        .max()
        .unwrap_or(Change::None)
}

/// The shortest time between two listings ([`Relist`]).
pub const RELIST_GAP: Duration = Duration::from_secs(5);
/// A listing may take at most this share of the time (one in ten): the gap after one that
/// took longer than a tenth of [`RELIST_GAP`] grows with it.
const RELIST_SHARE: u32 = 10;

/// What to do about the FIB cache's key after a burst of notifications.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relisting {
    /// Nothing changed that the key depends on.
    Keep,
    /// Key on the source (correct whatever the routes are, only slower), without a listing.
    BySource,
    /// List the rules and routes now, and key as they say.
    List,
}

/// Paces the listings of every rule and route. A full table's listing is long (205,000 routes:
/// 0.3 s of `ip route show` alone; a million, several times that), and in a routing storm (a
/// BGP session flapping, a million routes withdrawn and learned again) every burst overran the
/// notification socket and asked for another: listings back to back for as long as the storm
/// lasted. Now one waits [`RELIST_GAP`] after the last one ended, or ten times the last one's
/// time if that is longer; meanwhile the cache keys on the source, and the listing that was
/// asked for (or one that failed) runs when its time comes ([`Relist::due`]), notifications or
/// not.
#[derive(Debug, Default)]
pub struct Relist {
    /// When the last listing started, and how long it took.
    last: Option<(Instant, Duration)>,
    /// A listing was asked for and waits for its time.
    pending: bool,
}

impl Relist {
    /// When a listing that waits may run (`None`: none waits).
    pub fn due(&self) -> Option<Instant> {
        if !self.pending {
            return None;
        }
        Some(self.next_allowed().unwrap_or_else(Instant::now))
    }

    /// The earliest a listing may start, after the last one.
    fn next_allowed(&self) -> Option<Instant> {
        let (started, took) = self.last?;
        Some(started + took + RELIST_GAP.max(took * RELIST_SHARE))
    }

    /// What a burst that brought `change` (at `now`) asks for.
    pub fn on(&mut self, change: Change, now: Instant) -> Relisting {
        let asked = change == Change::Recheck || self.pending;
        if change == Change::BySource {
            return Relisting::BySource;
        }
        if !asked {
            return Relisting::Keep;
        }
        if self.next_allowed().is_some_and(|at| now < at) {
            self.pending = true;
            return Relisting::BySource;
        }
        Relisting::List
    }

    /// A listing started at `started` took `took`; one that failed (`ok` false: a reply
    /// that never came, one that does not parse) is asked for again when its time comes.
    pub fn listed(&mut self, started: Instant, took: Duration, ok: bool) {
        self.last = Some((started, took));
        self.pending = !ok;
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::AddressFamily;

    use super::*;

    fn datagram(msgs: Vec<RouteNetlinkMessage>) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            let mut msg = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(m));
            msg.finalize();
            let mut buf = vec![0; msg.buffer_len()];
            msg.serialize(&mut buf);
            out.extend_from_slice(&buf);
            out.resize(out.len().next_multiple_of(4), 0);
        }
        out
    }

    fn route(source_prefix: u8) -> RouteMessage {
        let mut r = RouteMessage::default();
        r.header.address_family = AddressFamily::Inet6;
        r.header.destination_prefix_length = 64;
        r.header.source_prefix_length = source_prefix;
        r
    }

    /// The first listing runs at once; another asked for within [`RELIST_GAP`] waits (the
    /// cache keys on the source meanwhile) and runs when its time comes, without another
    /// notification; a listing that took long spaces the next ten times as far. Seen failing:
    /// every removal or overrun listed again at once.
    #[test]
    fn listings_are_paced() {
        let t0 = Instant::now();
        let mut r = Relist::default();
        assert_eq!(r.on(Change::None, t0), Relisting::Keep);
        assert_eq!(r.on(Change::Recheck, t0), Relisting::List);
        r.listed(t0, Duration::from_millis(100), true);
        let soon = t0 + Duration::from_secs(1);
        assert_eq!(r.on(Change::Recheck, soon), Relisting::BySource);
        let due = r.due().expect("a listing waits");
        assert_eq!(due, t0 + Duration::from_millis(100) + RELIST_GAP);
        assert_eq!(
            r.on(Change::None, soon),
            Relisting::BySource,
            "still waiting"
        );
        assert_eq!(r.on(Change::None, due), Relisting::List, "its time came");
        r.listed(due, Duration::from_secs(2), true);
        assert_eq!(r.due(), None);
        assert_eq!(r.on(Change::BySource, due), Relisting::BySource);
        let after = due + Duration::from_secs(2) + RELIST_GAP;
        assert_eq!(
            r.on(Change::Recheck, after),
            Relisting::BySource,
            "10 × 2 s apart"
        );
        let later = due + Duration::from_secs(22);
        assert_eq!(r.due(), Some(later));
        assert_eq!(r.on(Change::None, later), Relisting::List);
        // A listing that failed is asked for again at the pace, notifications or not.
        r.listed(later, Duration::from_millis(10), false);
        assert_eq!(
            r.due(),
            Some(later + Duration::from_millis(10) + RELIST_GAP)
        );
    }

    #[test]
    fn additions_switch_at_once_and_removals_list_again() {
        let plain = datagram(vec![
            RouteNetlinkMessage::NewRoute(route(0)),
            RouteNetlinkMessage::DelRoute(route(0)),
        ]);
        assert_eq!(change(&plain), Change::None, "ordinary routes come and go");
        let gone = datagram(vec![
            RouteNetlinkMessage::NewRoute(route(0)),
            RouteNetlinkMessage::DelRoute(route(48)),
        ]);
        assert_eq!(change(&gone), Change::Recheck, "a source route went away");
        let added = datagram(vec![
            RouteNetlinkMessage::DelRoute(route(48)),
            RouteNetlinkMessage::NewRoute(route(48)),
        ]);
        assert_eq!(change(&added), Change::BySource, "a source route came");
        let mut multipath = route(0);
        multipath
            .attributes
            .push(RouteAttribute::MultiPath(Vec::new()));
        let ecmp = datagram(vec![RouteNetlinkMessage::NewRoute(multipath)]);
        assert_eq!(change(&ecmp), Change::BySource, "a multipath route came");
        let rule = datagram(vec![RouteNetlinkMessage::DelRule(RuleMessage::default())]);
        assert_eq!(change(&rule), Change::Recheck, "a rule went");
        let to_rule = datagram(vec![RouteNetlinkMessage::NewRule(RuleMessage::default())]);
        assert_eq!(change(&to_rule), Change::None, "a rule without `from`");
        assert_eq!(change(&[0xff; 20]), Change::Recheck, "what does not parse");
        assert_eq!(change(&[]), Change::None);
    }

    #[test]
    fn a_from_rule_or_a_source_route_selects_by_source() {
        let mut rule = RuleMessage::default();
        assert!(!by_source(&RouteNetlinkMessage::NewRule(rule.clone())));
        rule.header.src_len = 24;
        assert!(by_source(&RouteNetlinkMessage::NewRule(rule)));
        assert!(!by_source(&RouteNetlinkMessage::NewRoute(route(0))));
        assert!(by_source(&RouteNetlinkMessage::NewRoute(route(56))));
        let mut via_object = route(0);
        via_object.attributes.push(RouteAttribute::NhId(7));
        assert!(by_source(&RouteNetlinkMessage::NewRoute(via_object)));
    }
}
