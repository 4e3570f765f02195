//! A virtual wire: two interfaces of a member joined in XDP, with no address, no routing and no
//! MAC rewrite. What crosses is tracked under the strict policy; ARP and neighbour discovery
//! cross too (or are dropped when the wire says so); VLAN tags cross unchanged.
//!
//! ```text
//!  cli [c0] ──veth── [w0] fw [w1] ──veth── [s0] srv
//!  198.18.5.2        zone 1   zone 2       198.18.5.3
//!  fd00:18:5::2                            fd00:18:5::3
//! ```

use std::{
    os::fd::{AsRawFd as _, OwnedFd, RawFd},
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use hasync_agent::datapath::{Datapath, DatapathOptions};
use hasync_common::{Counter, DatapathConfig, Policy, State, ZoneBinding};
use hasync_tests::{
    forwarder::{sa, tcp_exchange_between, TRUST, UNTRUST},
    frame::Frame,
    netns::{veth, wait_for, DropIsolated, Lab, Netns},
    sockets::recv_with_control,
    testrun::{CounterDelta, LOCAL, TEST_CAPACITY},
};

const CLI4: &str = "198.18.5.2";
const SRV4: &str = "198.18.5.3";
const CLI6: &str = "fd00:18:5::2";
const SRV6: &str = "fd00:18:5::3";

/// The wire's namespaces and datapaths; fields drop in order, the datapaths first.
struct Wire {
    dp: DropIsolated<Datapath>,
    cli: Netns,
    fw: Netns,
    srv: Netns,
}

impl Wire {
    fn new(tag: &str) -> Result<Wire> {
        let lab = Lab::new(tag)?;
        let (cli, fw, srv) = (lab.netns("cli")?, lab.netns("fw")?, lab.netns("srv")?);
        veth(&cli, "c0", &fw, "w0")?;
        veth(&fw, "w1", &srv, "s0")?;
        for (ns, ifname, v4, v6) in [(&cli, "c0", CLI4, CLI6), (&srv, "s0", SRV4, SRV6)] {
            ns.addr(ifname, &format!("{v4}/24"))?;
            ns.addr(ifname, &format!("{v6}/64"))?;
            ns.xdp_endpoint(ifname)?;
        }
        let mut config = DatapathConfig::with_defaults(LOCAL);
        config.policy = Policy::Strict as u8;
        config.vwire = 1;
        let mut opts = DatapathOptions::new(LOCAL);
        opts.session_capacity = TEST_CAPACITY;
        opts.config = config;
        let mut dp = DropIsolated::new(Datapath::load(&opts)?);
        dp.set_member_alive(LOCAL, true)?;
        let (w0, w1) = (fw.ifindex("w0")?, fw.ifindex("w1")?);
        dp.set_zone(w0, wire_end(TRUST.0, 0))?;
        dp.set_zone(w1, wire_end(UNTRUST.0, 0))?;
        let dp_ref = &mut *dp;
        fw.run(|| -> Result<()> {
            dp_ref.attach("w0")?;
            dp_ref.attach("w1")?;
            // DEVMAP entries resolve in the writer's namespace.
            dp_ref.set_vwire_ports(&[(w0, w1)])?;
            Ok(())
        })??;
        Ok(Wire { dp, cli, fw, srv })
    }

    fn delta(&self, before: hasync_common::Counters) -> Result<CounterDelta> {
        Ok(CounterDelta {
            before,
            after: self.dp.counters()?,
        })
    }
}

fn wire_end(zone: u16, extra: u8) -> ZoneBinding {
    ZoneBinding {
        flags: ZoneBinding::VWIRE | extra,
        ..ZoneBinding::new(hasync_common::ZoneId(zone))
    }
}

/// The member's own stack's count of IP packets it received (it has no address on the wire:
/// nothing should reach it).
fn stack_received(ns: &Netns) -> Result<u64> {
    let text = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))??;
    let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().context("names")?, ip.next().context("values")?);
    let at = names
        .split_whitespace()
        .position(|n| n == "InReceives")
        .context("InReceives")?;
    Ok(values
        .split_whitespace()
        .nth(at)
        .context("value")?
        .parse()?)
}

fn tcp_and_neighbours_cross(wire: &Wire, server: &str) -> Result<()> {
    let before = wire.dp.counters()?;
    let stack_before = stack_received(&wire.fw)?;
    let server = sa(server, 8080);
    tcp_exchange_between(&wire.cli, &wire.srv, server, 500, 50_000)?;
    // The last ACK, which closes the session after both FINs, may still be on its way.
    let closed = wait_for(Duration::from_secs(2), || {
        let sessions = wire.dp.sessions().ok()?;
        let tcp = sessions.into_iter().find(|(k, _)| k.proto == 6)?;
        (tcp.1.state == State::Closed as u8).then_some(tcp)
    });
    let d = wire.delta(before)?;
    let sessions = wire.dp.sessions()?;
    let tcp = match closed {
        Some(tcp) => tcp,
        None => *sessions
            .iter()
            .find(|(k, _)| k.proto == 6)
            .context("no TCP session on the wire")?,
    };
    ensure!(tcp.1.state == State::Closed as u8, "{:?}", tcp.1);
    ensure!(tcp.1.zone == TRUST, "created on the client's side");
    ensure!(d.get(Counter::VwireForwarded) >= 40, "{d}");
    ensure!(
        d.get(Counter::PassNonIp) + d.get(Counter::PassUntracked) >= 1,
        "ARP or neighbour discovery crossed: {d}"
    );
    ensure!(
        stack_received(&wire.fw)? == stack_before,
        "the member's own stack saw the traffic"
    );
    Ok(())
}

/// Sends `frame` raw on `ifname` of `ns` (AF_PACKET).
fn send_raw(ns: &Netns, ifname: &str, frame: Vec<u8>) -> Result<()> {
    let index = ns.ifindex(ifname)?;
    ns.run(move || -> Result<()> {
        let socket = packet_socket()?;
        // SAFETY: a zeroed sockaddr_ll is valid; its fields are set below.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = index as i32;
        to.sll_halen = 6;
        // SAFETY: `frame` and `to` are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        ensure!(
            sent == frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    })?
}

fn packet_socket() -> Result<OwnedFd> {
    Ok(hasync_tests::sockets::packet_socket(
        libc::ETH_P_ALL as u16,
    )?)
}

/// Waits (bounded) on `fd` for a frame whose bytes contain `marker`; returns its VLAN id
/// (the kernel hands tags over beside the frame, in PACKET_AUXDATA).
fn receive_tagged(fd: RawFd, marker: &[u8]) -> Result<Option<u16>> {
    let on: libc::c_int = 1;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: valid option values for their lengths.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_AUXDATA,
            (&on as *const i32).cast(),
            4,
        );
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as u32,
        );
    }
    for _ in 0..50 {
        let mut data = [0u8; 2048];
        let Some((n, controls)) = recv_with_control(fd, &mut data)? else {
            continue;
        };
        let frame = &data[..n];
        if !frame.windows(marker.len()).any(|w| w == marker) {
            continue;
        }
        // tpacket_auxdata: tp_status (u32) first, tp_vlan_tci (u16) at byte 16.
        let aux = controls
            .iter()
            .find(|c| c.level == libc::SOL_PACKET && c.kind == libc::PACKET_AUXDATA);
        let tag = aux.and_then(|a| {
            let status = u32::from_ne_bytes(a.data.get(..4)?.try_into().ok()?);
            let tci = u16::from_ne_bytes(a.data.get(16..18)?.try_into().ok()?);
            (status & libc::TP_STATUS_VLAN_VALID != 0).then_some(tci & 0x0fff)
        });
        return Ok(tag);
    }
    anyhow::bail!("the marked frame never arrived")
}

/// A tagged datagram crosses with its tag, tracked; the strict policy drops a stray ACK; a
/// wire that drops non-IP frames drops ARP.
fn tags_policy_and_non_ip(wire: &mut Wire) -> Result<()> {
    // The ports, 4000 → 4001, mark the frame.
    let marker = [0x0f, 0xa0, 0x0f, 0xa1];
    let frame = Frame::udp(sa(CLI4, 4000), sa(SRV4, 4001)).vlan(100);
    let listen = wire.srv.run(packet_socket)??;
    let before = wire.dp.counters()?;
    send_raw(&wire.cli, "c0", frame.build())?;
    let tag = receive_tagged(listen.as_raw_fd(), &marker);
    drop(listen);
    ensure!(tag? == Some(100), "the tag did not cross unchanged");
    let key = frame.key();
    ensure!(
        wire.dp.session(&key)?.is_some(),
        "the tagged flow is tracked"
    );

    send_raw(
        &wire.cli,
        "c0",
        Frame::tcp(sa(CLI4, 4002), sa(SRV4, 80)).ack().build(),
    )?;
    let dropped = wait_for(Duration::from_secs(2), || {
        let d = wire.delta(before).ok()?;
        (d.get(Counter::DropNoSession) == 1).then_some(d)
    });
    dropped.context("the stray ACK was not dropped")?;
    // Nothing across a wire is for this host: a stray ACK to one of its addresses is dropped
    // too (it would cross, passed to the other end), and so is an echo reply nobody asked for
    // (until stop 38 it made a session and crossed).
    wire.fw.addr("lo", "198.18.5.99/32")?;
    send_raw(
        &wire.cli,
        "c0",
        Frame::tcp(sa(CLI4, 4003), sa("198.18.5.99", 80))
            .ack()
            .build(),
    )?;
    let stray = Frame::icmp_echo(CLI4.parse()?, SRV4.parse()?, 9, false);
    send_raw(&wire.cli, "c0", stray.build())?;
    let dropped = wait_for(Duration::from_secs(2), || {
        let d = wire.delta(before).ok()?;
        (d.get(Counter::DropNoSession) == 3).then_some(d)
    });
    let d = dropped.context("the stray ACK to this host or the stray echo reply crossed")?;
    ensure!(d.get(Counter::PassToThisHost) == 0, "{d}");
    ensure!(
        wire.dp.session(&stray.key())?.is_none(),
        "a session for the reply"
    );

    let w0 = wire.fw.ifindex("w0")?;
    wire.dp
        .set_zone(w0, wire_end(TRUST.0, ZoneBinding::NON_IP_DROP))?;
    send_raw(&wire.cli, "c0", Frame::arp().build())?;
    let arp = wait_for(Duration::from_secs(2), || {
        let d = wire.delta(before).ok()?;
        (d.get(Counter::DropVwireNonIp) == 1).then_some(d)
    });
    arp.context("ARP crossed a wire with non_ip = drop")?;
    Ok(())
}

/// A handshake forged from one side of the wire (its answer sent in through the end the SYN
/// came in by) stays embryonic: the session's replies are bound to the other end's zone when
/// it is made, so the forged answer is a zone mismatch, dropped by the strict policy, and the
/// ACK after it completes nothing. Before, the answer was learned as the first reply and three
/// frames made an assured session, never evicted: a table filled from one host.
fn a_handshake_forged_from_one_side_stays_embryonic(wire: &Wire) -> Result<()> {
    let before = wire.dp.counters()?;
    let (cli, srv) = (sa(CLI4, 4020), sa(SRV4, 80));
    let syn = Frame::tcp(cli, srv).syn().seq(1000);
    send_raw(&wire.cli, "c0", syn.build())?;
    let forged = Frame::tcp(srv, cli).syn_ack().seq(5000).ack_number(1001);
    send_raw(&wire.cli, "c0", forged.build())?;
    let ack = Frame::tcp(cli, srv).ack().seq(1001).ack_number(5001);
    send_raw(&wire.cli, "c0", ack.build())?;
    let seen = wait_for(Duration::from_secs(2), || {
        let d = wire.delta(before).ok()?;
        (d.get(Counter::Creates) + d.get(Counter::Hits) >= 3).then_some(d)
    });
    let d = seen.context("the three frames did not all reach the program")?;
    ensure!(d.get(Counter::DropZoneMismatch) == 1, "{d}");
    let s = wire
        .dp
        .session(&syn.key())?
        .context("the SYN made no session")?;
    ensure!(
        s.reply_zone == UNTRUST,
        "replies bound to the far end: {s:?}"
    );
    ensure!(s.state == State::SynSent as u8 && !s.is_assured(), "{s:?}");
    Ok(())
}

/// A peer's copy of a session on the wire, its owner dead, is bound by its first reply only
/// where that reply comes in at the far end from the session's own zone: one forged from the
/// first packet's side is a zone mismatch and binds nothing (before, the first reply bound the
/// replies to whatever side it came from, and every genuine reply was then dropped); the
/// genuine one binds them and takes the session over. One of ours written back from a peer's
/// full sync after a restart (`RESTORED`, no reply zone either) is bound the same way (before
/// stop 42, by its first reply from anywhere: seen failing).
fn a_peers_copy_is_bound_by_a_reply_from_the_far_end_only(wire: &mut Wire) -> Result<()> {
    use hasync_common::{MemberId, SessionFlags};
    let peer = MemberId(2);
    wire.dp.set_member_alive(peer, false)?;
    let cases = [
        ("a dead peer's copy", 4030, peer, SessionFlags::FROM_PEER),
        (
            "ours restored",
            4031,
            LOCAL,
            SessionFlags::FROM_PEER | SessionFlags::RESTORED,
        ),
    ];
    for (what, port, owner, flags) in cases {
        bound_by_the_far_end(wire, port, owner, flags).context(what)?;
    }
    Ok(())
}

/// One case of [`a_peers_copy_is_bound_by_a_reply_from_the_far_end_only`].
fn bound_by_the_far_end(
    wire: &mut Wire,
    port: u16,
    owner: hasync_common::MemberId,
    flags: u16,
) -> Result<()> {
    use hasync_common::ZoneId;
    let (key, reply) = insert_copy(wire, port, owner, flags)?;
    let before = wire.dp.counters()?;
    send_raw(&wire.cli, "c0", reply.build())?;
    let d = wait_for(Duration::from_secs(2), || {
        let d = wire.delta(before).ok()?;
        (d.get(Counter::DropZoneMismatch) == 1).then_some(d)
    });
    d.context("a reply forged from the first packet's side was not refused")?;
    let s = wire.dp.session(&key)?.context("the copy is gone")?;
    ensure!(s.reply_zone == ZoneId::NONE && s.owner == owner, "{s:?}");
    send_raw(&wire.srv, "s0", reply.build())?;
    let bound = wait_for(Duration::from_secs(2), || {
        let s = wire.dp.session(&key).ok()??;
        (s.reply_zone == UNTRUST).then_some(s)
    });
    let s = bound.context("the genuine reply did not bind the replies")?;
    ensure!(s.owner == LOCAL, "ours, or taken over: {s:?}");
    Ok(())
}

/// Inserts an established TCP copy of `CLI4:port → SRV4:80` in zone TRUST, its replies
/// unbound, owned by `owner`, with `flags`; returns its key and a reply in its window.
fn insert_copy(
    wire: &mut Wire,
    port: u16,
    owner: hasync_common::MemberId,
    flags: u16,
) -> Result<(hasync_common::FlowKey, Frame)> {
    use hasync_common::{Session, SessionFlags, ZoneId};
    let (cli, srv) = (sa(CLI4, port), sa(SRV4, 80));
    let (key, initiator_hi) = Frame::tcp(cli, srv).key_and_side();
    let now = wire.dp.now_ns()?;
    let side = if initiator_hi {
        SessionFlags::INITIATOR_HI
    } else {
        0
    };
    let copy = Session {
        created_ns: now,
        last_seen_ns: now,
        last_event_ns: now,
        packets: [5, 5],
        bytes: [500, 500],
        version: 4,
        zone: TRUST,
        flags: SessionFlags(flags | side),
        owner,
        state: State::Established as u8,
        reply_zone: ZoneId::NONE,
        ..Session::default()
    };
    wire.dp.insert_sessions(&[(key, copy)])?;
    Ok((key, Frame::tcp(srv, cli).ack().seq(9000).ack_number(7000)))
}

/// A wire whose other end is not in the map (down: an end takes no XDP redirects) passes
/// nothing to the member's own stack, not even a frame sent to the end's own address, which
/// the kernel would route (until stop 39 it was passed to it). What comes in on it changes no
/// session: a reply forged from the wrong side while the wire is down neither binds a dead
/// peer's copy's replies nor takes it over (until stop 42 it did both: seen failing).
fn a_wire_that_is_down_passes_nothing(wire: &mut Wire) -> Result<()> {
    use hasync_common::{MemberId, SessionFlags, ZoneId};
    let dp = &mut *wire.dp;
    wire.fw.run(|| dp.set_vwire_ports(&[]))??;
    let (key, reply) = insert_copy(wire, 4032, MemberId(2), SessionFlags::FROM_PEER)?;
    let before = wire.dp.counters()?;
    send_raw(&wire.cli, "c0", reply.build())?;
    wait_for(Duration::from_secs(2), || {
        let d = wire.delta(before).ok()?;
        (d.get(Counter::DropVwireDown) == 1).then_some(d)
    })
    .context("the forged reply was not dropped at the wire that is down")?;
    let s = wire.dp.session(&key)?.context("the copy is gone")?;
    ensure!(
        s.reply_zone == ZoneId::NONE && s.owner == MemberId(2),
        "a frame on a wire that is down changed its session: {s:?}"
    );
    let before = wire.dp.counters()?;
    let stack_before = stack_received(&wire.fw)?;
    let mut frame = Frame::udp(sa(CLI4, 4010), sa("198.18.5.99", 4011)).build();
    frame[..6].copy_from_slice(&wire.fw.mac("w0")?);
    send_raw(&wire.cli, "c0", frame)?;
    let dropped = wait_for(Duration::from_secs(2), || {
        let d = wire.delta(before).ok()?;
        (d.get(Counter::DropVwireDown) == 1).then_some(d)
    });
    let d = dropped.context("not dropped at the wire that is down")?;
    ensure!(d.get(Counter::VwireForwarded) == 0, "{d}");
    ensure!(
        stack_received(&wire.fw)? == stack_before,
        "the member's own stack received the frame"
    );
    a_first_fragment_on_a_wire_that_is_down_opens_nothing(wire)
}

/// A first fragment that came in while the wire was down opened nothing for its datagram:
/// once the wire is back, the later fragment finds no first one (before the review of stop
/// 42's change, the first fragment was recorded, past the policy, and the later one crossed:
/// seen failing).
fn a_first_fragment_on_a_wire_that_is_down_opens_nothing(wire: &mut Wire) -> Result<()> {
    use hasync_tests::frame::Ipv6Ext;
    let udp = Frame::udp(sa(CLI6, 4040), sa(SRV6, 4041));
    send_raw(
        &wire.cli,
        "c0",
        udp.clone().ipv6_ext(Ipv6Ext::FragmentFirst).build(),
    )?;
    let (w0, w1) = (wire.fw.ifindex("w0")?, wire.fw.ifindex("w1")?);
    let dp = &mut *wire.dp;
    wire.fw.run(|| dp.set_vwire_ports(&[(w0, w1)]))??;
    let before = wire.dp.counters()?;
    send_raw(
        &wire.cli,
        "c0",
        udp.ipv6_ext(Ipv6Ext::FragmentLater).payload(64).build(),
    )?;
    let d = wait_for(Duration::from_secs(2), || {
        let d = wire.delta(before).ok()?;
        (d.get(Counter::Ipv6Fragment) == 1).then_some(d)
    })
    .context("the later fragment did not reach the program")?;
    ensure!(
        d.get(Counter::DropFragmentUnseenFirst) == 1 && d.get(Counter::PassFragment) == 0,
        "{d}"
    );
    Ok(())
}

#[test]
fn a_virtual_wire_tracks_what_crosses_it() {
    let run = || -> Result<()> {
        let mut wire = Wire::new("vw")?;
        tcp_and_neighbours_cross(&wire, SRV4).context("ipv4")?;
        let keys: Vec<_> = wire.dp.sessions()?.iter().map(|s| s.0).collect();
        wire.dp.delete_sessions(&keys)?;
        tcp_and_neighbours_cross(&wire, SRV6).context("ipv6")?;
        tags_policy_and_non_ip(&mut wire)?;
        a_handshake_forged_from_one_side_stays_embryonic(&wire)?;
        a_peers_copy_is_bound_by_a_reply_from_the_far_end_only(&mut wire)?;
        a_wire_that_is_down_passes_nothing(&mut wire)
    };
    run().unwrap_or_else(|e| panic!("{e:#}"));
}
