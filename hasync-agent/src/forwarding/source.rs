//! Does this host route by source address? A rule with a `from` prefix, or an IPv6 route with
//! a source prefix (`ip -6 route add ... from ...`), makes the next hop depend on the source.
//! Only then does the XDP FIB cache key on the source too; otherwise one entry per destination
//! (and ingress interface) serves every source, so a million clients behind one route cost one
//! lookup, not a million.
//!
//! Rules are few: they are listed again after any rule notification. IPv6 routes may be
//! many (a full table): they are listed once at start, and afterwards only a notification of
//! a route with a source prefix lists them again.

use std::{io, time::Duration};

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::{
    route::RouteMessage, rule::RuleMessage, AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};

/// How long one reply of a listing may take.
const REPLY_WITHIN: Duration = Duration::from_secs(2);

/// Does some rule or IPv6 route select by source now? One listing of the rules (both
/// families) and one of the IPv6 routes (every table), on a socket of their own.
pub fn routes_by_source() -> io::Result<bool> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket2::SockRef::from(&socket).set_read_timeout(Some(REPLY_WITHIN))?;
    let rules = RouteNetlinkMessage::GetRule(RuleMessage::default());
    let mut routes = RouteMessage::default();
    routes.header.address_family = AddressFamily::Inet6;
    let routes = RouteNetlinkMessage::GetRoute(routes);
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

/// Does `m` select by source: a rule with a `from` prefix, or a route with a source prefix?
fn by_source(m: &RouteNetlinkMessage) -> bool {
    match m {
        RouteNetlinkMessage::NewRule(r) => r.header.src_len > 0,
        RouteNetlinkMessage::NewRoute(r) => r.header.source_prefix_length > 0,
        _ => false,
    }
}

/// Might `datagram` (notifications) change the answer of [`routes_by_source`]: a rule added
/// or removed, or a route with a source prefix? A datagram that does not parse might.
pub fn may_change(datagram: &[u8]) -> bool {
    messages(datagram).iter().any(|m| match m {
        Ok(m) => match &m.payload {
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewRule(_) | RouteNetlinkMessage::DelRule(_),
            ) => true,
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r),
            ) => r.header.source_prefix_length > 0,
            _ => false,
        },
        Err(_) => true,
    })
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn only_rules_and_source_routes_make_the_answer_change() {
        let plain = datagram(vec![
            RouteNetlinkMessage::NewRoute(route(0)),
            RouteNetlinkMessage::DelRoute(route(0)),
        ]);
        assert!(!may_change(&plain), "ordinary routes come and go");
        let sourced = datagram(vec![
            RouteNetlinkMessage::NewRoute(route(0)),
            RouteNetlinkMessage::DelRoute(route(48)),
        ]);
        assert!(may_change(&sourced), "a source route went away");
        let rule = datagram(vec![RouteNetlinkMessage::DelRule(RuleMessage::default())]);
        assert!(may_change(&rule), "any rule change");
        assert!(may_change(&[0xff; 20]), "what does not parse might");
        assert!(!may_change(&[]));
    }

    #[test]
    fn a_from_rule_or_a_source_route_selects_by_source() {
        let mut rule = RuleMessage::default();
        assert!(!by_source(&RouteNetlinkMessage::NewRule(rule.clone())));
        rule.header.src_len = 24;
        assert!(by_source(&RouteNetlinkMessage::NewRule(rule)));
        assert!(!by_source(&RouteNetlinkMessage::NewRoute(route(0))));
        assert!(by_source(&RouteNetlinkMessage::NewRoute(route(56))));
    }
}
