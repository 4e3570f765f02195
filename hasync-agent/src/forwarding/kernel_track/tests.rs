use hasync_common::{flow::IPPROTO_UDP, session::tcp, Family, State};

use super::*;

/// The attributes in `attrs`, each as (type without flags, payload).
fn attrs(mut attrs: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & !NLA_F_NESTED;
        out.push((kind, attrs[4..len].to_vec()));
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    out
}

fn find(list: &[(u16, Vec<u8>)], kind: u16) -> Vec<u8> {
    list.iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no attribute {kind} in {list:?}"))
}

/// The key of TCP from `client` port 40000 to `server` port 8080.
fn key(family: Family, client: [u8; 16], server: [u8; 16]) -> FlowKey {
    let words = |b: [u8; 16]| {
        let mut w = [0u32; 4];
        for (i, c) in b.chunks_exact(4).enumerate() {
            w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
        }
        w
    };
    FlowKey::canonical(
        family,
        IPPROTO_TCP,
        words(client),
        40000u16.to_be(),
        words(server),
        8080u16.to_be(),
    )
    .0
}

/// The request gives the kernel's entry of the connection, named by its original direction
/// (from its initiator, whichever end of the key that is), the closed timeout: one message,
/// its length and type right, as `conntrack -U` sends it.
#[test]
fn the_update_names_the_original_direction_and_the_closed_timeout() {
    let mut v4 = [0u8; 16];
    v4[..4].copy_from_slice(&[198, 18, 0, 2]);
    let mut srv = [0u8; 16];
    srv[..4].copy_from_slice(&[198, 18, 1, 2]);
    let k = key(Family::V4, v4, srv);
    for initiator_hi in [false, true] {
        let mut out = Vec::new();
        encode_update(&mut out, 7, &k, initiator_hi, Change::Closed);
        let len = u32::from_ne_bytes([out[0], out[1], out[2], out[3]]) as usize;
        assert_eq!(len, out.len());
        assert_eq!(
            u16::from_ne_bytes([out[4], out[5]]),
            1 << 8,
            "IPCTNL_MSG_CT_NEW"
        );
        assert_eq!(
            u16::from_ne_bytes([out[6], out[7]]),
            NLM_F_REQUEST,
            "no create"
        );
        assert_eq!(out[16], libc::AF_INET as u8);
        let top = attrs(&out[20..]);
        assert_eq!(find(&top, CTA_TIMEOUT), 10u32.to_be_bytes());
        assert!(top.iter().all(|(k, _)| *k != CTA_PROTOINFO), "nothing else");
        let tuple = attrs(&find(&top, CTA_TUPLE_ORIG));
        let ip = attrs(&find(&tuple, CTA_TUPLE_IP));
        let proto = attrs(&find(&tuple, CTA_TUPLE_PROTO));
        assert_eq!(
            k.ip_lo(),
            std::net::IpAddr::from([198, 18, 0, 2]),
            "the client is lo"
        );
        let (client, server) = (([198, 18, 0, 2], 40000u16), ([198, 18, 1, 2], 8080u16));
        let ((src, sport), (dst, dport)) = if initiator_hi {
            (server, client)
        } else {
            (client, server)
        };
        assert_eq!(find(&ip, CTA_IP_V4_SRC), src, "initiator_hi {initiator_hi}");
        assert_eq!(find(&ip, CTA_IP_V4_DST), dst);
        assert_eq!(find(&proto, CTA_PROTO_NUM), [IPPROTO_TCP]);
        assert_eq!(find(&proto, CTA_PROTO_SRC_PORT), sport.to_be_bytes());
        assert_eq!(find(&proto, CTA_PROTO_DST_PORT), dport.to_be_bytes());
    }
}

#[test]
fn an_ipv6_connection_is_named_by_its_sixteen_byte_addresses() {
    let client: [u8; 16] = "fd00:18::2"
        .parse::<std::net::Ipv6Addr>()
        .expect("ip")
        .octets();
    let server: [u8; 16] = "fd00:18:1::2"
        .parse::<std::net::Ipv6Addr>()
        .expect("ip")
        .octets();
    let mut out = Vec::new();
    encode_update(
        &mut out,
        1,
        &key(Family::V6, client, server),
        false,
        Change::Closed,
    );
    assert_eq!(out[16], libc::AF_INET6 as u8);
    let top = attrs(&out[20..]);
    let ip = attrs(&find(&attrs(&find(&top, CTA_TUPLE_ORIG)), CTA_TUPLE_IP));
    assert_eq!(find(&ip, CTA_IP_V6_SRC), client);
    assert_eq!(find(&ip, CTA_IP_V6_DST), server);
}

/// An NLMSG_ERROR answer carrying `errno` (0: an acknowledgement).
fn error_answer(errno: i32) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&36u32.to_ne_bytes());
    m.extend_from_slice(&2u16.to_ne_bytes());
    m.extend_from_slice(&[0; 10]);
    m.extend_from_slice(&(-errno).to_ne_bytes());
    m.extend_from_slice(&[0; 16]);
    m
}

/// The kernel's answers are read, not dropped unread: ENOENT (no entry: never the kernel's,
/// or gone) is expected; another refusal (a zone the update does not name finds nothing
/// either, but EPERM, EINVAL say the agent cannot do its part) is told once. A review found
/// every answer dropped unread.
#[test]
fn a_refusal_but_enoent_is_found_among_the_answers() {
    let mut answers = error_answer(libc::ENOENT);
    assert_eq!(refusal(&answers), None);
    answers.extend(error_answer(libc::EPERM));
    answers.extend(error_answer(libc::EINVAL));
    assert_eq!(refusal(&answers), Some(libc::EPERM));
    assert_eq!(refusal(&[1, 2, 3]), None, "too short to be an answer");
    assert_eq!(refusal(&error_answer(0)), None, "an acknowledgement");
}

/// Only a TCP connection that XDP forwarded here left the kernel an entry that never saw the
/// close: one the kernel forwarded throughout (a virtual wire's, a VLAN's, one to this host)
/// keeps its entry right, and an idle one's must not be cut short (a review found the first
/// version closing every established connection's); a UDP flow's refreshes reach the kernel.
#[test]
fn only_a_tcp_connection_forwarded_in_xdp_needs_its_kernel_entry_closed() {
    let k = key(Family::V4, [1; 16], [2; 16]);
    let established = Session {
        state: State::Established as u8,
        tcp_flags: [tcp::SYN | tcp::ACK, tcp::SYN | tcp::ACK],
        ..Session::default()
    };
    assert!(!forwarded_tcp(&k, &established), "the kernel forwarded it");
    let forwarded = Session {
        flags: SessionFlags(SessionFlags::FORWARDED_XDP),
        ..established
    };
    assert!(forwarded_tcp(&k, &forwarded));
    let udp = FlowKey {
        proto: IPPROTO_UDP,
        ..k
    };
    assert!(!forwarded_tcp(&udp, &forwarded));
}

/// An established connection's update marks both directions of the kernel's entry liberal
/// (`struct nf_ct_tcp_flags`: flags, then mask, the liberal bit in both) and changes nothing
/// else: no timeout, no state.
#[test]
fn the_liberal_update_sets_the_liberal_flag_in_both_directions_and_nothing_else() {
    let k = key(Family::V4, [1; 16], [2; 16]);
    let mut out = Vec::new();
    encode_update(&mut out, 3, &k, false, Change::Liberal);
    let len = u32::from_ne_bytes([out[0], out[1], out[2], out[3]]) as usize;
    assert_eq!(len, out.len());
    let top = attrs(&out[20..]);
    let kinds: Vec<u16> = top.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds, [CTA_TUPLE_ORIG, CTA_PROTOINFO]);
    let tcp = attrs(&find(&attrs(&find(&top, CTA_PROTOINFO)), CTA_PROTOINFO_TCP));
    let kinds: Vec<u16> = tcp.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        kinds,
        [
            CTA_PROTOINFO_TCP_FLAGS_ORIGINAL,
            CTA_PROTOINFO_TCP_FLAGS_REPLY
        ]
    );
    for (_, flags) in &tcp {
        assert_eq!(
            flags,
            &[0x08, 0x08],
            "IP_CT_TCP_FLAG_BE_LIBERAL, and only it in the mask"
        );
    }
}

/// Only an established TCP session's event marks its entry: a UDP flow has no window, and a
/// state change to anything else (closing) is not the connection's start.
#[test]
fn only_an_established_tcp_connection_is_marked_liberal() {
    let mut track = KernelTrack::open().expect("netfilter netlink socket (tests need root)");
    let k = key(Family::V4, [1; 16], [2; 16]);
    let established = Session {
        state: State::Established as u8,
        ..Session::default()
    };
    let closing = Session {
        state: State::Closing as u8,
        ..established
    };
    let udp = FlowKey {
        proto: IPPROTO_UDP,
        ..k
    };
    for (key, s) in [(&udp, &established), (&k, &closing)] {
        track.established(key, s).expect("queued");
        assert!(track.batch.is_empty(), "{s:?}");
    }
    track.established(&k, &established).expect("queued");
    assert!(!track.batch.is_empty());
}
