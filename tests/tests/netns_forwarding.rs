//! Real TCP and UDP through a forwarding namespace that runs the XDP program in native mode on
//! both of its interfaces (`hasync_tests::forwarder`):
//!
//! ```text
//!  cli [c0] ──veth── [fc0] fw [fs0] ──veth── [s0] srv
//!  198.18.0.2     198.18.0.1  198.18.1.1     198.18.1.2
//!  fd00:18::2     fd00:18::1  fd00:18:1::1   fd00:18:1::2
//!                 zone 1 "trust"  zone 2 "untrust"
//! ```
//!
//! Sockets are created on threads that joined a lab namespace, so they belong to it; every
//! exchange is bounded in count and time.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use hasync_agent::lab::traffic::{udp_echo_server, Bounds};
use hasync_common::{
    session::tcp::{ACK, FIN, RST, SYN},
    Counter, Event, EventKind, FlowKey, MemberId, Policy, Session, SessionFlags, State,
    ZoneBinding, ZoneId,
};
use hasync_tests::{
    cluster::{send_raw, udp_flows},
    fixture::show,
    forwarder::{
        sa, tcp_exchange, tcp_exchange_between, udp_exchange, Forwarder, CLI4, CLI6, IO_TIMEOUT,
        SRV4, SRV6, TRUST, UNTRUST,
    },
    frame::Frame,
    netns::{wait_for, Netns},
    testrun::{monotonic_ns, replied_session, CounterDelta, LOCAL},
};

/// Checks a TCP session that completed a handshake, carried data and closed with FINs.
fn check_closed_tcp(fwd: &Forwarder, client: SocketAddr, server: SocketAddr) -> Result<FlowKey> {
    let key = Frame::tcp(client, server).key();
    // The last ACK may still be on its way: wait for `closed` briefly.
    let s = wait_for(IO_TIMEOUT, || {
        fwd.session(&key)
            .ok()
            .flatten()
            .filter(|s| s.state == State::Closed as u8)
    });
    let s = match s {
        Some(s) => s,
        None => bail!(
            "tcp {client} → {server}: {:?}",
            fwd.session(&key)?.as_ref().map(show)
        ),
    };
    let Session {
        packets,
        tcp_flags,
        zone,
        owner,
        flags,
        version,
        bytes,
        ..
    } = s;
    let what = format!("tcp {client} → {server}: {}", show(&s));
    ensure!(
        zone == TRUST,
        "{what}: zone {} (created on the client side, zone 1)",
        zone.0
    );
    ensure!(owner == LOCAL, "{what}: owner");
    // Client addresses are below the server's: the initiator is the lower endpoint.
    ensure!(flags.0 == 0, "{what}: flags {:#x}", flags.0);
    ensure!(
        version >= 5,
        "{what}: version {version} (create, syn-recv, established, closing, closed)"
    );
    ensure!(
        packets[0] >= 4 && packets[1] >= 3,
        "{what}: packets per direction"
    );
    ensure!(bytes[0] > 0 && bytes[1] > 0, "{what}: bytes per direction");
    for (dir, f) in tcp_flags.iter().enumerate() {
        ensure!(
            f & (SYN | ACK | FIN) == SYN | ACK | FIN,
            "{what}: direction {dir} saw flags {f:#x}"
        );
        ensure!(f & RST == 0, "{what}: direction {dir} saw a RST");
    }
    Ok(key)
}

/// Checks a UDP session that saw one exchange, opened by `initiator` from `zone`.
fn check_replied_udp(
    fwd: &Forwarder,
    initiator: SocketAddr,
    responder: SocketAddr,
    zone: ZoneId,
) -> Result<FlowKey> {
    let (key, initiator_hi) = Frame::udp(initiator, responder).key_and_side();
    let s = fwd
        .session(&key)?
        .with_context(|| format!("no session for udp {initiator} → {responder}"))?;
    let what = format!("udp {initiator} → {responder}: {}", show(&s));
    ensure!(s.state == State::UdpReplied as u8, "{what}: state");
    ensure!(s.zone == zone, "{what}: zone (expected {})", zone.0);
    ensure!(s.owner == LOCAL, "{what}: owner");
    ensure!(
        s.packets[0] >= 1 && s.packets[1] == 1,
        "{what}: packets per direction"
    );
    ensure!(
        s.flags.has(SessionFlags::INITIATOR_HI) == initiator_hi,
        "{what}: initiator side"
    );
    Ok(key)
}

/// Counters every clean run must leave alone (but those `allowed`).
fn check_clean(delta: &CounterDelta, allowed: &[Counter]) -> Result<()> {
    for &c in Counter::ALL.iter().filter(|c| !allowed.contains(c)) {
        let bad = c.name().starts_with("err-")
            || matches!(
                c,
                Counter::DropMalformed
                    | Counter::PassMalformed
                    | Counter::DropNoSession
                    | Counter::CreateFailed
                    | Counter::RingbufFull
                    | Counter::PassUnconfigured
                    | Counter::Asymmetric
                    | Counter::Takeovers
                    | Counter::DropZoneMismatch
                    | Counter::DropReversePath
                    | Counter::DropHairpin
                    | Counter::ReplyZoneLearned
            );
        ensure!(
            !bad || delta.get(c) == 0,
            "counter {} moved: {delta}",
            c.name()
        );
    }
    Ok(())
}

fn check_events(events: &[Event], key: &FlowKey, want: &[EventKind]) -> Result<()> {
    let kinds: Vec<EventKind> = events
        .iter()
        .filter(|e| e.key == *key)
        .filter_map(|e| EventKind::from_u8(e.kind))
        .filter(|k| *k != EventKind::Refresh)
        .collect();
    ensure!(
        kinds == want,
        "events for {key:?}: {kinds:?}, expected {want:?}"
    );
    Ok(())
}

fn tcp_and_udp(tag: &str, client_ip: &str, server_ip: &str) -> Result<()> {
    let mut fwd = Forwarder::new(tag, Policy::Strict)?;
    let before = fwd.counters()?;
    let tcp_server = sa(server_ip, 8080);
    let tcp_client = tcp_exchange(&fwd, tcp_server, 1000, 20_000)?;
    let udp_server = sa(server_ip, 5353);
    let udp_client = udp_exchange(&fwd.cli, client_ip.parse()?, &fwd.srv, udp_server)?;
    // The server side opens a flow too: that session belongs to the untrust zone.
    let back_to = sa(client_ip, 6000);
    let back_from = udp_exchange(&fwd.srv, server_ip.parse()?, &fwd.cli, back_to)?;
    let tcp_key = check_closed_tcp(&fwd, tcp_client, tcp_server)?;
    let udp_key = check_replied_udp(&fwd, udp_client, udp_server, TRUST)?;
    let back_key = check_replied_udp(&fwd, back_from, back_to, UNTRUST)?;

    let delta = CounterDelta {
        before,
        after: fwd.counters()?,
    };
    eprintln!("{tag}: {delta}");
    check_clean(&delta, &[])?;
    ensure!(
        delta.get(Counter::Creates) == 3,
        "three sessions created: {delta}"
    );
    ensure!(
        delta.get(Counter::Closed) == 1,
        "one tcp session closed: {delta}"
    );
    ensure!(
        delta.get(Counter::StateChanges) >= 6,
        "tcp and udp state changes: {delta}"
    );
    let tcp = fwd.session(&tcp_key)?.expect("checked above");
    let udp = fwd.session(&udp_key)?.expect("checked above");
    let back = fwd.session(&back_key)?.expect("checked above");
    let on_sessions: u64 = [tcp, udp, back].iter().flat_map(|s| s.packets).sum();
    ensure!(
        delta.get(Counter::Hits) + delta.get(Counter::Creates) >= on_sessions,
        "{delta}"
    );
    ensure!(delta.get(Counter::Packets) >= on_sessions, "{delta}");
    ensure!(
        fwd.dp.sessions()?.len() == 3,
        "the table holds only the three sessions"
    );

    let events = fwd.events();
    use EventKind::*;
    check_events(
        &events,
        &tcp_key,
        &[Created, StateChanged, StateChanged, StateChanged, Closed],
    )?;
    check_events(&events, &udp_key, &[Created, StateChanged])?;
    check_events(&events, &back_key, &[Created, StateChanged])?;
    Ok(())
}

#[test]
fn tcp_and_udp_through_the_forwarder_ipv4() {
    tcp_and_udp("fwd4", CLI4, SRV4).unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn tcp_and_udp_through_the_forwarder_ipv6() {
    tcp_and_udp("fwd6", CLI6, SRV6).unwrap_or_else(|e| panic!("{e:#}"));
}

/// Sends one bare TCP ACK of a flow nobody opened, from the client namespace with a raw
/// socket. Returns its key.
fn send_stray_ack(fwd: &Forwarder, client: SocketAddr, server: SocketAddr) -> Result<FlowKey> {
    let frame = Frame::tcp(client, server).ack().payload(8);
    send_ip(&fwd.cli, &frame, server.ip())?;
    Ok(frame.key())
}

/// Sends `frame`'s IPv4 packet to `dst` from namespace `ns` with a raw socket.
fn send_ip(ns: &Netns, frame: &Frame, dst: IpAddr) -> Result<()> {
    let packet = frame.build()[14..].to_vec();
    let IpAddr::V4(dst) = dst else {
        bail!("raw IPv4 only");
    };
    ns.run(move || -> Result<()> {
        // SAFETY: plain socket(2); the fd is closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: `packet` and `addr` are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        let err = std::io::Error::last_os_error();
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(fd) };
        ensure!(sent == packet.len() as isize, "raw sendto: {err}");
        Ok(())
    })?
}

/// Makes sure the client has resolved its gateway, so a raw packet leaves at once.
fn warm_up(fwd: &Forwarder) -> Result<()> {
    udp_exchange(&fwd.cli, CLI4.parse()?, &fwd.srv, sa(SRV4, 7)).map(drop)
}

/// Waits until counter `c` moved by at least `n` since `before`; returns the delta then.
fn wait_counter(
    fwd: &Forwarder,
    before: hasync_common::Counters,
    c: Counter,
    n: u64,
) -> Option<CounterDelta> {
    wait_for(IO_TIMEOUT, || {
        let d = CounterDelta {
            before,
            after: fwd.counters().ok()?,
        };
        (d.get(c) >= n).then_some(d)
    })
}

#[test]
fn strict_policy_drops_mid_stream_tcp_of_an_unknown_flow() {
    let run = || -> Result<()> {
        let fwd = Forwarder::new("strict", Policy::Strict)?;
        warm_up(&fwd)?;
        let before = fwd.counters()?;
        let key = send_stray_ack(&fwd, sa(CLI4, 41000), sa(SRV4, 8081))?;
        let delta = wait_counter(&fwd, before, Counter::DropNoSession, 1)
            .context("drop-no-session never moved")?;
        // Anything else in flight would have shown by now.
        std::thread::sleep(Duration::from_millis(200));
        let delta = CounterDelta {
            before: delta.before,
            after: fwd.counters()?,
        };
        ensure!(delta.get(Counter::DropNoSession) == 1, "{delta}");
        ensure!(delta.get(Counter::Creates) == 0, "{delta}");
        ensure!(
            fwd.session(&key)?.is_none(),
            "a session was created for the stray ack"
        );
        check_clean(&delta, &[Counter::DropNoSession])
    };
    run().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn loose_policy_passes_mid_stream_tcp_of_an_unknown_flow() {
    let run = || -> Result<()> {
        let fwd = Forwarder::new("loose", Policy::Loose)?;
        warm_up(&fwd)?;
        let before = fwd.counters()?;
        let key = send_stray_ack(&fwd, sa(CLI4, 41000), sa(SRV4, 8081))?;
        // The ACK reaches the server, whose stack answers with a RST: both pass untracked.
        let delta = wait_counter(&fwd, before, Counter::PassNoSessionLoose, 2)
            .context("the stray ack and the server's rst did not both pass")?;
        ensure!(delta.get(Counter::Creates) == 0, "{delta}");
        ensure!(
            fwd.session(&key)?.is_none(),
            "a session was created for the stray ack"
        );
        check_clean(&delta, &[])
    };
    run().unwrap_or_else(|e| panic!("{e:#}"));
}

/// An echo reply nobody asked for, on its way through the firewall, is dropped like a stray
/// ACK (until stop 38 it made a session and passed); the firewall's own ping, whose request
/// leaves without crossing XDP, still gets its reply (path monitoring pings so).
#[test]
fn strict_policy_drops_a_stray_echo_reply_but_not_the_hosts_own() {
    let run = || -> Result<()> {
        let fwd = Forwarder::new("icmprep", Policy::Strict)?;
        warm_up(&fwd)?;
        let before = fwd.counters()?;
        let stray = Frame::icmp_echo(CLI4.parse()?, SRV4.parse()?, 77, false);
        send_ip(&fwd.cli, &stray, SRV4.parse()?)?;
        let delta = wait_counter(&fwd, before, Counter::DropNoSession, 1)
            .context("drop-no-session never moved for the stray echo reply")?;
        ensure!(delta.get(Counter::Creates) == 0, "{delta}");
        ensure!(fwd.session(&stray.key())?.is_none(), "a session for it");

        let before = fwd.counters()?;
        let ping = fwd.fw.run(|| {
            std::process::Command::new("ping")
                .args(["-n", "-c", "1", "-W", "2", SRV4])
                .output()
        })??;
        ensure!(
            ping.status.success(),
            "the firewall's own ping got no reply: {}",
            String::from_utf8_lossy(&ping.stdout)
        );
        let delta = CounterDelta {
            before,
            after: fwd.counters()?,
        };
        ensure!(delta.get(Counter::DropNoSession) == 0, "{delta}");
        ensure!(
            delta.get(Counter::Creates) == 1,
            "the reply's session: {delta}"
        );
        Ok(())
    };
    run().unwrap_or_else(|e| panic!("{e:#}"));
}

/// The firewall's own TCP connection through a zone interface works under the strict policy:
/// its SYN leaves through the stack, unseen by XDP, and the SYN-ACK and what follows, for this
/// host itself, pass (`pass-to-this-host`), as do ICMP errors answering its own traffic. Before, they had no session and were dropped: the
/// firewall could not open a connection through a zone (a package download, an API call).
#[test]
fn the_firewalls_own_tcp_connections_work_under_the_strict_policy() {
    let run = || -> Result<()> {
        let fwd = Forwarder::new("owntcp", Policy::Strict)?;
        let before = fwd.counters()?;
        tcp_exchange_between(&fwd.fw, &fwd.srv, sa(SRV4, 8090), 2_000, 20_000)
            .context("the firewall's own connection to the server")?;
        let d = CounterDelta {
            before,
            after: fwd.counters()?,
        };
        ensure!(d.get(Counter::DropNoSession) == 0, "{d}");
        ensure!(d.get(Counter::PassToThisHost) >= 2, "{d}");
        ensure!(d.get(Counter::Creates) == 0, "nothing tracked: {d}");

        // An ICMP error for the firewall's own traffic reaches it: a port unreachable
        // answering its own UDP datagram (no session: it left through the stack) makes its
        // connected socket see the refusal (before, dropped as unrelated; for its TCP, a
        // "fragmentation needed" dropped so was a path-MTU black hole).
        let before = fwd.counters()?;
        let refused = fwd.fw.run(|| -> Result<std::io::ErrorKind> {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(sa(SRV4, 9))?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            socket.send(b"anyone?")?;
            let mut buf = [0u8; 16];
            Ok(socket
                .recv(&mut buf)
                .map_or_else(|e| e.kind(), |_| std::io::ErrorKind::Other))
        })??;
        let d = CounterDelta {
            before,
            after: fwd.counters()?,
        };
        ensure!(
            refused == std::io::ErrorKind::ConnectionRefused,
            "the port unreachable did not reach the socket ({refused:?}): {d}"
        );
        ensure!(d.get(Counter::DropIcmpErrorUnrelated) == 0, "{d}");
        ensure!(d.get(Counter::PassToThisHost) == 1, "{d}");

        // A "fragmentation needed" quoting the firewall's own ESP (a tunnel it terminates)
        // passes as well; one quoting another host's packet, with no session, is still
        // dropped, and so is one to a multicast address (the local table's route for it says
        // "not forwarded" too).
        let (fw4, srv4): (IpAddr, IpAddr) = ("198.18.1.1".parse()?, SRV4.parse()?);
        let own_esp = Frame::other_proto(fw4, srv4, 50);
        let others = Frame::udp(sa(CLI4, 5000), sa(SRV4, 53));
        let multicast = Frame::udp(sa("224.0.0.9", 520), sa(SRV4, 520));
        let fs0 = fwd.fw.mac("fs0")?;
        let outcome = |to: IpAddr, quoted: &Frame| -> Result<Counter> {
            let error = vec![Frame::icmp_error(srv4, to, 3, 4, quoted).build()];
            let before = fwd.counters()?;
            fwd.srv
                .run(move || hasync_tests::cluster::send_raw("s0", fs0, &error, IO_TIMEOUT))?
                .map_err(anyhow::Error::msg)?;
            wait_for(IO_TIMEOUT, || {
                let d = CounterDelta {
                    before,
                    after: fwd.counters().ok()?,
                };
                [Counter::PassToThisHost, Counter::DropIcmpErrorUnrelated]
                    .into_iter()
                    .find(|&c| d.get(c) > 0)
            })
            .context("the error did not reach the program")
        };
        let cases = [
            (
                "the firewall's own ESP",
                fw4,
                &own_esp,
                Counter::PassToThisHost,
            ),
            (
                "another host's UDP",
                CLI4.parse()?,
                &others,
                Counter::DropIcmpErrorUnrelated,
            ),
            (
                "a multicast sender",
                "224.0.0.9".parse()?,
                &multicast,
                Counter::DropIcmpErrorUnrelated,
            ),
        ];
        for (what, to, quoted, want) in cases {
            let got = outcome(to, quoted)?;
            ensure!(got == want, "{what}: {got:?}, expected {want:?}");
        }

        // A zone that checks no routes says the lookup does not see how the kernel routes
        // (marks, VRFs): there, mid-flow TCP is dropped as before.
        let mut fwd = fwd;
        let fs0 = fwd.fw.ifindex("fs0")?;
        let unchecked = ZoneBinding {
            flags: ZoneBinding::NO_ROUTE_CHECK,
            ..ZoneBinding::new(UNTRUST)
        };
        fwd.dp.set_zone(fs0, unchecked)?;
        let before = fwd.counters()?;
        let refused = tcp_exchange_between(&fwd.fw, &fwd.srv, sa(SRV4, 8091), 10, 10);
        ensure!(
            refused.is_err(),
            "connected through a zone without route checks"
        );
        let d = CounterDelta {
            before,
            after: fwd.counters()?,
        };
        ensure!(d.get(Counter::PassToThisHost) == 0, "{d}");
        ensure!(d.get(Counter::DropNoSession) >= 1, "{d}");
        Ok(())
    };
    run().unwrap_or_else(|e| panic!("{e:#}"));
}

/// What a lab must never change in the root namespace.
fn root_namespace_view() -> String {
    let mut view = String::new();
    for args in [
        &["-br", "link"][..],
        &["-br", "addr"],
        &["route"],
        &["-6", "route"],
    ] {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("ip");
        view.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    for key in ["ipv4/ip_forward", "ipv6/conf/all/forwarding"] {
        view.push_str(&std::fs::read_to_string(format!("/proc/sys/net/{key}")).unwrap_or_default());
    }
    view
}

/// The lab leaves nothing behind: its namespaces are gone once the forwarder is dropped, and
/// the root namespace (links, addresses, routes, forwarding) is as it was.
#[test]
fn lab_leaves_the_root_namespace_alone() {
    let root_before = root_namespace_view();
    let names: Vec<String> = {
        let fwd = Forwarder::new("cleanup", Policy::Strict).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(
            root_namespace_view(),
            root_before,
            "the lab changed the root namespace"
        );
        [&fwd.cli, &fwd.fw, &fwd.srv]
            .iter()
            .map(|n| n.name().to_string())
            .collect()
    };
    for name in names {
        assert!(
            !std::path::Path::new("/run/netns").join(&name).exists(),
            "namespace {name} survived"
        );
    }
    assert_eq!(
        root_namespace_view(),
        root_before,
        "the root namespace changed"
    );
}

/// `hasync_tests::cluster::udp_flows`, which many cluster tests count sessions with, gives
/// every flow a source port of its own: in one call and across calls in one namespace, so
/// two batches of flows create as many sessions as they have flows.
#[test]
fn every_udp_flow_of_the_test_helper_is_its_own_session() {
    const BATCH: usize = 400;
    let run = || -> Result<()> {
        let fwd = Forwarder::new("fwdport", Policy::Strict)?;
        let server = sa(SRV4, 7402);
        let _echo = udp_echo_server(
            fwd.srv.name(),
            server,
            Bounds::new(4 * BATCH as u64, Duration::from_secs(60)),
        )?;
        let before = fwd.counters()?;
        let mut ports = udp_flows(fwd.cli.name(), server, BATCH).map_err(anyhow::Error::msg)?;
        ports.extend(udp_flows(fwd.cli.name(), server, BATCH).map_err(anyhow::Error::msg)?);
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        ensure!(
            distinct.len() == 2 * BATCH,
            "{} flows used only {} source ports",
            2 * BATCH,
            distinct.len()
        );
        // Each flow made a session; the embryo ring (256 slots per CPU here) evicted the
        // oldest unassured ones to admit newer ones, so the table holds the rest.
        let delta = CounterDelta {
            before,
            after: fwd.counters()?,
        };
        let flows = 2 * BATCH as u64;
        ensure!(
            delta.get(Counter::Creates) == flows,
            "{flows} flows: {delta}"
        );
        let evicted = delta.get(Counter::EvictedUdpReplied) + delta.get(Counter::EvictedUdpNew);
        let held = fwd.dp.sessions()?.len() as u64;
        ensure!(
            held + evicted == flows,
            "{flows} flows: {held} sessions held, {evicted} evicted"
        );
        Ok(())
    };
    run().unwrap_or_else(|e| panic!("{e:#}"));
}

/// What a host in the trust zone forges, sent raw from `c0` to `fc0`'s MAC (or, made `at_server`,
/// a host in the untrust zone, from `s0` to `fs0`'s): frames of flows between addresses that
/// are not its own.
struct Forger {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    at_server: bool,
}

impl Forger {
    fn new(fwd: &Forwarder) -> Result<Self> {
        Ok(Forger {
            src_mac: fwd.cli.mac("c0")?,
            dst_mac: fwd.fw.mac("fc0")?,
            at_server: false,
        })
    }

    fn at_server(fwd: &Forwarder) -> Result<Self> {
        Ok(Forger {
            src_mac: fwd.srv.mac("s0")?,
            dst_mac: fwd.fw.mac("fs0")?,
            at_server: true,
        })
    }

    /// Sends `frames` into the trust zone and waits until the program counted them all.
    fn send(&self, fwd: &Forwarder, frames: &[Frame]) -> Result<CounterDelta> {
        let before = fwd.counters()?;
        let raw: Vec<Vec<u8>> = frames
            .iter()
            .map(|f| {
                let mut b = f.build();
                b[0..6].copy_from_slice(&self.dst_mac);
                b[6..12].copy_from_slice(&self.src_mac);
                b
            })
            .collect();
        let n = raw.len() as u64;
        let (ns, ifname) = if self.at_server {
            (&fwd.srv, "s0")
        } else {
            (&fwd.cli, "c0")
        };
        ns.run(move || send_raw(ifname, [0; 6], &raw, IO_TIMEOUT))?
            .map_err(anyhow::Error::msg)?;
        // Other traffic (neighbour discovery) may come in too: at least these frames.
        wait_for(IO_TIMEOUT, || {
            let d = CounterDelta {
                before,
                after: fwd.counters().ok()?,
            };
            (d.get(Counter::Packets) >= n).then_some(d)
        })
        .context("the program did not see the forged frames")
    }
}

/// The three frames of a handshake between `x` and `y`, all forged by one host.
fn forged_handshake(x: SocketAddr, y: SocketAddr) -> [Frame; 3] {
    [
        Frame::tcp(x, y).syn(),
        Frame::tcp(y, x).syn_ack(),
        Frame::tcp(x, y).ack(),
    ]
}

/// A host in one zone forges both ends of handshakes. Its answer in the name of a server in
/// another zone comes in through the wrong zone (the reply zone is the one the destination is
/// routed to, bound when the session is made), a source routed into another zone makes no
/// session (reverse path), nor does a flow between two addresses of its own link (hairpin):
/// no assured session, which the admission ring could never evict, comes of any of them.
/// Before, the reply zone was learned from the forged answer and every such handshake made an
/// established session.
fn forged_handshakes(tag: &str, x: &str, y: &str, spoofed: &str, neighbour: &str) -> Result<()> {
    let mut fwd = Forwarder::new(tag, Policy::Strict)?;
    let forger = Forger::new(&fwd)?;
    let (x, y) = (sa(x, 40001), sa(y, 80));
    let d = forger.send(&fwd, &forged_handshake(x, y))?;
    let key = Frame::tcp(x, y).key();
    let s = fwd.session(&key)?.context("the SYN made no session")?;
    ensure!(
        s.state == State::SynSent as u8 && !s.is_assured(),
        "{tag}: forged handshake {x} ↔ {y}: {} ({d})",
        show(&s)
    );
    ensure!(
        s.reply_zone == UNTRUST && d.get(Counter::DropZoneMismatch) >= 1,
        "{tag}: reply zone {} ({d})",
        s.reply_zone.0
    );
    ensure!(d.get(Counter::ReplyZoneRouted) == 1, "{tag}: {d}");

    // Tagged frames (no VLAN device here: the kernel drops them after the program tracked
    // them) have their destination routed too.
    let tx = SocketAddr::new(x.ip(), 40006);
    let tagged = forged_handshake(tx, y).map(|f| f.vlan(10));
    let d = forger.send(&fwd, &tagged)?;
    let s = fwd.session(&Frame::tcp(tx, y).key())?;
    ensure!(
        s.is_some_and(|s| s.reply_zone == UNTRUST && !s.is_assured())
            && d.get(Counter::DropZoneMismatch) >= 1,
        "{tag}: tagged: {:?} ({d})",
        s.as_ref().map(show)
    );

    let (from, to) = (sa(spoofed, 40002), y);
    let d = forger.send(&fwd, &forged_handshake(from, to))?;
    ensure!(
        fwd.session(&Frame::tcp(from, to).key())?.is_none() && d.get(Counter::DropReversePath) == 1,
        "{tag}: a source of the untrust zone came in through trust: {d}"
    );
    // Tagged too: its source is looked up as an untagged one's (a VLAN device is in the zone
    // of the interface it sits on).
    let (from, to) = (sa(spoofed, 40008), y);
    let d = forger.send(&fwd, &forged_handshake(from, to).map(|f| f.vlan(10)))?;
    ensure!(
        fwd.session(&Frame::tcp(from, to).key())?.is_none() && d.get(Counter::DropReversePath) == 1,
        "{tag}: a tagged source of the untrust zone came in through trust: {d}"
    );
    let (a, b) = (sa(neighbour, 40003), x);
    let d = forger.send(&fwd, &forged_handshake(a, b))?;
    ensure!(
        fwd.session(&Frame::tcp(a, b).key())?.is_none() && d.get(Counter::DropHairpin) >= 1,
        "{tag}: a flow within the trust link: {d}"
    );
    // A destination local to the member: its answers never come in through XDP, so the
    // replies are bound to no zone and the forged answer in its name is a mismatch.
    let local = sa(
        if x.is_ipv4() {
            "198.18.0.1"
        } else {
            "fd00:18::1"
        },
        22,
    );
    let d = forger.send(&fwd, &forged_handshake(x, local))?;
    let s = fwd.session(&Frame::tcp(x, local).key())?;
    ensure!(
        s.is_some_and(|s| s.reply_zone == ZoneId::UNZONED && !s.is_assured())
            && d.get(Counter::DropZoneMismatch) >= 1,
        "{tag}: to the member itself: {:?} ({d})",
        s.as_ref().map(show)
    );
    // A destination with no route yet (a flap, a boot): bound to no zone, and bound again by
    // the flow's next packet once the route is there, so the flow is not blackholed.
    let (net, via, later) = if x.is_ipv4() {
        ("198.18.5.0/24", SRV4, "198.18.5.5")
    } else {
        ("fd00:18:5::/64", SRV6, "fd00:18:5::5")
    };
    let (from, to) = (SocketAddr::new(x.ip(), 40007), sa(later, 53));
    forger.send(&fwd, &[Frame::udp(from, to)])?;
    let bound = |fwd: &Forwarder| -> Result<ZoneId> {
        let s = fwd.session(&Frame::udp(from, to).key())?;
        Ok(s.context("no session for the unrouted flow")?.reply_zone)
    };
    ensure!(bound(&fwd)? == ZoneId::UNZONED, "{tag}: no route yet");
    fwd.fw.ip(&["route", "add", net, "via", via])?;
    forger.send(&fwd, &[Frame::udp(from, to)])?;
    ensure!(bound(&fwd)? == UNTRUST, "{tag}: the route came");
    // DHCP and the like: a broadcast or multicast destination is never a hairpin or a forged
    // source; nothing answers from it.
    let (client, group) = if x.is_ipv4() {
        (sa("0.0.0.0", 68), sa("255.255.255.255", 67))
    } else {
        (sa("fe80::50", 546), sa("ff02::1:2", 547))
    };
    forger.send(&fwd, &[Frame::udp(client, group)])?;
    let s = fwd.session(&Frame::udp(client, group).key())?;
    ensure!(
        s.is_some_and(|s| s.reply_zone == ZoneId::UNZONED),
        "{tag}: {client} → {group}: {:?}",
        s.as_ref().map(show)
    );
    ensure!(
        fwd.dp.sessions()?.iter().all(|(_, s)| !s.is_assured()),
        "{tag}: an assured session came of forged frames"
    );
    // The loose policy passes what it refuses, untracked.
    let mut cfg = fwd.dp.config()?;
    cfg.policy = Policy::Loose as u8;
    fwd.dp.set_config(&cfg)?;
    let (from, to) = (sa(spoofed, 40004), y);
    let d = forger.send(&fwd, &[Frame::tcp(from, to).syn()])?;
    ensure!(
        fwd.session(&Frame::tcp(from, to).key())?.is_none() && d.get(Counter::PassReversePath) == 1,
        "{tag}: loose: {d}"
    );
    // A zone may turn the check off (asymmetric routing, policy routing by mark, ...): the
    // spoofed source then makes a session whose replies are bound by the first one.
    cfg.policy = Policy::Strict as u8;
    fwd.dp.set_config(&cfg)?;
    let fc0 = fwd.fw.ifindex("fc0")?;
    let mut binding = ZoneBinding::new(TRUST);
    binding.flags |= ZoneBinding::NO_ROUTE_CHECK;
    fwd.dp.set_zone(fc0, binding)?;
    let (from, to) = (sa(spoofed, 40005), y);
    let d = forger.send(&fwd, &[Frame::tcp(from, to).syn()])?;
    let s = fwd.session(&Frame::tcp(from, to).key())?;
    ensure!(
        s.is_some_and(|s| s.reply_zone == ZoneId::NONE) && d.get(Counter::ReplyZoneRouted) == 0,
        "{tag}: route_check = false: {:?} ({d})",
        s.as_ref().map(show)
    );
    fwd.dp.set_zone(fc0, ZoneBinding::new(TRUST))?;
    // And a real connection still completes, its replies bound to the server's zone.
    let server = sa(if x.is_ipv4() { SRV4 } else { SRV6 }, 8080);
    let client = tcp_exchange(&fwd, server, 100, 100)?;
    let key = check_closed_tcp(&fwd, client, server)?;
    let s = fwd
        .session(&key)?
        .context("the real connection's session")?;
    ensure!(s.reply_zone == UNTRUST, "{tag}: {}", show(&s));
    drop(fwd.events());
    Ok(())
}

#[test]
fn forged_handshakes_from_one_zone_make_no_assured_session_ipv4() {
    forged_handshakes(
        "forge4",
        "198.18.0.50",
        "198.18.1.60",
        "198.18.1.77",
        "198.18.0.51",
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn forged_handshakes_from_one_zone_make_no_assured_session_ipv6() {
    forged_handshakes(
        "forge6",
        "fd00:18::50",
        "fd00:18:1::60",
        "fd00:18:1::77",
        "fd00:18::51",
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
}

/// A peer's session from `x` (trust) to `y` (untrust), as its replica here holds it: owned by
/// member 2, replies bound to no zone (records do not carry the owner's binding).
fn install_replica(fwd: &mut Forwarder, x: SocketAddr, y: SocketAddr) -> Result<FlowKey> {
    install_replica_of(fwd, &Frame::udp(x, y), State::UdpReplied)
}

/// Installs member 2's copy of the flow `first` opened, in `state`; returns its key.
fn install_replica_of(fwd: &mut Forwarder, first: &Frame, state: State) -> Result<FlowKey> {
    let (key, x_is_hi) = first.key_and_side();
    let mut flags = SessionFlags::FROM_PEER;
    if x_is_hi {
        flags |= SessionFlags::INITIATOR_HI;
    }
    let s = Session {
        zone: TRUST,
        flags: SessionFlags(flags),
        state: state as u8,
        ..replied_session(monotonic_ns(), PEER)
    };
    fwd.dp.insert_sessions(&[(key, s)])?;
    Ok(key)
}

const PEER: MemberId = MemberId(2);

/// A reply to a replica must come from a source the routing table routes back into the zone it
/// came in through, which then binds the replica's replies, before it may pass (its owner
/// alive) or take the session over (its owner dead). Before, a replica's replies were bound to
/// no zone: a host in the trust zone passed its forged replies through the strict policy while
/// the owner lived, and after a failover its first forged reply took the session over and bound
/// its replies to the trust zone, so the server's genuine ones were dropped from then on.
fn replica_replies(tag: &str, x: &str, y: &str) -> Result<()> {
    let mut fwd = Forwarder::new(tag, Policy::Strict)?;
    fwd.dp.set_member_alive(PEER, true)?;
    let forger = Forger::new(&fwd)?;
    let server = Forger::at_server(&fwd)?;
    let (x, y) = (sa(x, 40010), sa(y, 53));
    let key = install_replica(&mut fwd, x, y)?;
    // Refused as a first packet would be: its destination is routed back out of the interface
    // it came in on (a hairpin; with two zones every forged reply is one: the reverse path's
    // refusal is the first packets' test's).
    let refused = |d: &CounterDelta| d.get(Counter::DropHairpin) + d.get(Counter::DropReversePath);
    let d = forger.send(&fwd, &[Frame::udp(y, x)])?;
    let s = fwd.session(&key)?.context("the replica is gone")?;
    ensure!(
        refused(&d) == 1 && d.get(Counter::Asymmetric) == 0 && s.reply_zone == ZoneId::NONE,
        "{tag}: a forged reply to a live owner's replica: {} ({d})",
        show(&s)
    );
    let d = server.send(&fwd, &[Frame::udp(y, x)])?;
    let s = fwd.session(&key)?.context("the replica is gone")?;
    ensure!(
        d.get(Counter::Asymmetric) == 1 && s.reply_zone == UNTRUST,
        "{tag}: the server's reply to a live owner's replica: {} ({d})",
        show(&s)
    );
    let d = forger.send(&fwd, &[Frame::udp(y, x)])?;
    ensure!(
        d.get(Counter::DropZoneMismatch) == 1 && d.get(Counter::Asymmetric) == 0,
        "{tag}: a forged reply once the replica is bound: {d}"
    );

    // The owner dies: a forged reply does not take the session over, the server's does.
    fwd.dp.set_member_alive(PEER, false)?;
    let (x, y) = (SocketAddr::new(x.ip(), 40011), y);
    let key = install_replica(&mut fwd, x, y)?;
    let d = forger.send(&fwd, &[Frame::udp(y, x)])?;
    let s = fwd.session(&key)?.context("the replica is gone")?;
    ensure!(
        refused(&d) == 1 && s.owner == PEER && s.reply_zone == ZoneId::NONE,
        "{tag}: a forged reply to a dead owner's replica: {} ({d})",
        show(&s)
    );
    let d = server.send(&fwd, &[Frame::udp(y, x)])?;
    let s = fwd.session(&key)?.context("the replica is gone")?;
    ensure!(
        d.get(Counter::Takeovers) == 1 && s.owner == LOCAL && s.reply_zone == UNTRUST,
        "{tag}: the server's reply after the failover: {} ({d})",
        show(&s)
    );

    // The client's packet takes the session over: its replies are still checked until bound.
    let (x, y) = (SocketAddr::new(x.ip(), 40012), y);
    let key = install_replica(&mut fwd, x, y)?;
    let d = forger.send(&fwd, &[Frame::udp(x, y)])?;
    ensure!(
        d.get(Counter::Takeovers) == 1,
        "{tag}: the client's takeover: {d}"
    );
    let d = forger.send(&fwd, &[Frame::udp(y, x)])?;
    let s = fwd.session(&key)?.context("the session is gone")?;
    ensure!(
        refused(&d) == 1 && s.reply_zone == ZoneId::NONE,
        "{tag}: a forged reply after the client's takeover: {} ({d})",
        show(&s)
    );
    server.send(&fwd, &[Frame::udp(y, x)])?;
    let s = fwd.session(&key)?.context("the session is gone")?;
    ensure!(
        s.reply_zone == UNTRUST,
        "{tag}: the server's reply after the client's takeover: {}",
        show(&s)
    );
    drop(fwd.events());
    Ok(())
}

/// The server's echo reply to a peer's copy of a ping passes (its owner alive) or takes the
/// session over (its owner dead): only a reply that would open a session is a stray one. (The
/// first version of stop 38's stray-reply rule refused these too: a ping through another
/// member, or taken over, lost every reply.)
#[test]
fn echo_replies_to_a_peers_copy_pass_or_take_it_over() {
    let run = || -> Result<()> {
        let mut fwd = Forwarder::new("icmprepl", Policy::Strict)?;
        let server = Forger::at_server(&fwd)?;
        let (cli, srv) = (CLI4.parse()?, SRV4.parse()?);
        fwd.dp.set_member_alive(PEER, true)?;
        let request = Frame::icmp_echo(cli, srv, 501, true);
        let key = install_replica_of(&mut fwd, &request, State::IcmpEcho)?;
        let d = server.send(&fwd, &[Frame::icmp_echo(srv, cli, 501, false)])?;
        let s = fwd.session(&key)?.context("the copy is gone")?;
        ensure!(
            d.get(Counter::Asymmetric) == 1 && d.get(Counter::DropNoSession) == 0,
            "the reply to a live owner's copy: {} ({d})",
            show(&s)
        );
        fwd.dp.set_member_alive(PEER, false)?;
        let request = Frame::icmp_echo(cli, srv, 502, true);
        let key = install_replica_of(&mut fwd, &request, State::IcmpEcho)?;
        let d = server.send(&fwd, &[Frame::icmp_echo(srv, cli, 502, false)])?;
        let s = fwd.session(&key)?.context("the copy is gone")?;
        ensure!(
            d.get(Counter::Takeovers) == 1 && s.owner == LOCAL,
            "the reply after the owner died: {} ({d})",
            show(&s)
        );
        drop(fwd.events());
        Ok(())
    };
    run().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn a_replica_binds_its_replies_by_the_routing_table_ipv4() {
    replica_replies("repl4", "198.18.0.50", "198.18.1.60").unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn a_replica_binds_its_replies_by_the_routing_table_ipv6() {
    replica_replies("repl6", "fd00:18::50", "fd00:18:1::60").unwrap_or_else(|e| panic!("{e:#}"));
}

/// A TCP socket of `ns` bound to `local` (`SO_REUSEADDR`: a client reconnecting from its
/// port) and connected to `server`, each wait bounded by [`IO_TIMEOUT`].
fn connect_from(ns: &Netns, local: SocketAddr, server: SocketAddr) -> Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    fn sockaddr(a: SocketAddr) -> Result<libc::sockaddr_in> {
        let SocketAddr::V4(a) = a else {
            bail!("{a}: IPv4 only")
        };
        Ok(libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        })
    }
    let (from, to) = (sockaddr(local)?, sockaddr(server)?);
    ns.run(move || -> Result<TcpStream> {
        // SAFETY: socket() takes and returns plain integers.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a new socket nothing else owns; the stream closes it.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        stream.set_write_timeout(Some(IO_TIMEOUT))?; // bounds connect() too (SO_SNDTIMEO)
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        set_option(
            &stream,
            libc::SO_REUSEADDR,
            &(1 as libc::c_int),
            "SO_REUSEADDR",
        )?;
        let size = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: the addresses are plain values of the size given.
        let rc = unsafe { libc::bind(fd, (&raw const from).cast(), size) };
        checked(rc, "bind")?;
        // SAFETY: as for bind.
        let rc = unsafe { libc::connect(fd, (&raw const to).cast(), size) };
        checked(rc, "connect")?;
        Ok(stream)
    })?
}

/// `rc` of a libc call named `what`: its error when it failed.
fn checked(rc: libc::c_int, what: &str) -> Result<()> {
    ensure!(rc == 0, "{what}: {}", std::io::Error::last_os_error());
    Ok(())
}

/// Sets socket option `name` (at `SOL_SOCKET`) of `stream` to `value`.
fn set_option<T>(stream: &TcpStream, name: libc::c_int, value: &T, what: &str) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let size = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a plain value of the size given, on a descriptor `stream` owns.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (value as *const T).cast(),
            size,
        )
    };
    checked(rc, what)
}

/// Drops `stream` with a RST (SO_LINGER 0), as a process that dies does.
fn abort(stream: TcpStream) -> Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_option(&stream, libc::SO_LINGER, &linger, "SO_LINGER")
}

/// Both ends of a connection through the forwarder lose it without a FIN or RST crossing it
/// (each end's own nftables drops them: a crash, a reboot), and the client connects again from
/// the same port. The server, which has no connection left, answers the SYN with a SYN-ACK:
/// the forwarder's session, still established, restarts on the new connection, whose data and
/// orderly close then go through and close the session. (Before, the new connection's FIN fell
/// outside the old one's window and was dropped as a blind close: seen failing, the server's
/// read of the request timed out.)
#[test]
fn a_connection_from_the_port_of_a_lost_one_is_followed() {
    reconnect_from_the_same_port("reuse4").unwrap_or_else(|e| panic!("{e:#}"));
}

fn reconnect_from_the_same_port(tag: &str) -> Result<()> {
    let fwd = Forwarder::new(tag, Policy::Strict)?;
    let (client, server) = (sa(CLI4, 40_123), sa(SRV4, 8090));
    let listener = fwd.srv.run(move || TcpListener::bind(server))??;
    let key = Frame::tcp(client, server).key();
    // The first connection: established, data both ways.
    let mut first = connect_from(&fwd.cli, client, server)?;
    let (mut accepted, _) = listener.accept()?;
    first.write_all(b"hello")?;
    let mut got = [0u8; 5];
    accepted.read_exact(&mut got)?;
    accepted.write_all(b"world")?;
    first.read_exact(&mut got)?;
    let quiet = "table inet reuse {\n chain out {\n type filter hook output priority 0;\n \
                 tcp flags & (fin | rst) != 0 drop\n }\n}\n";
    fwd.cli.nft(quiet)?;
    fwd.srv.nft(quiet)?;
    abort(first)?;
    abort(accepted)?;
    fwd.cli.nft("delete table inet reuse")?;
    fwd.srv.nft("delete table inet reuse")?;
    let s = fwd
        .session(&key)?
        .context("the first connection's session")?;
    ensure!(s.state == State::Established as u8, "{}", show(&s));
    let before = fwd.counters()?;

    // The second, from the same port: a request, a response, FINs both ways.
    let mut second = connect_from(&fwd.cli, client, server)?;
    let (mut accepted, _) = listener.accept()?;
    accepted.set_read_timeout(Some(IO_TIMEOUT))?;
    second.write_all(&[0xa5; 1000])?;
    second.shutdown(std::net::Shutdown::Write)?;
    let mut request = Vec::new();
    accepted
        .read_to_end(&mut request)
        .context("server reading the request to its FIN")?;
    accepted.write_all(&[0x5a; 20_000])?;
    drop(accepted);
    let mut response = Vec::new();
    second
        .read_to_end(&mut response)
        .context("client reading the response to its FIN")?;
    ensure!((request.len(), response.len()) == (1000, 20_000));
    drop(second);
    let closed = wait_for(IO_TIMEOUT, || {
        fwd.session(&key)
            .ok()
            .flatten()
            .filter(|s| s.state == State::Closed as u8)
    });
    ensure!(
        closed.is_some(),
        "{:?}",
        fwd.session(&key)?.as_ref().map(show)
    );
    let delta = CounterDelta {
        before,
        after: fwd.counters()?,
    };
    ensure!(delta.get(Counter::PassTcpNewSyn) == 1, "{delta}");
    ensure!(delta.get(Counter::DropTcpOutOfWindow) == 0, "{delta}");
    check_clean(&delta, &[])?;
    Ok(())
}
