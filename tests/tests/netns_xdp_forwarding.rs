//! `forwarding = "xdp"` with real traffic: established TCP and UDP cross the forwarder in XDP
//! (the kernel forwards only their setup), the TTL or hop limit drops by one, and what the
//! fast path should not decide after its FIB lookup goes to the kernel, counted by reason.
//! Topology: `hasync_tests::forwarder` (cli ─ fw ─ srv). The agent bumps the FIB generation on
//! route, neighbour and link notifications; here the test bumps it where it changes them.

use std::{
    io::Write as _,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use hasync_agent::forwarding::{
    ipsec::{forwarding_policies, Policies, PolicyWatch},
    kernel_track::{KernelEntries, CLOSED_TIMEOUT_S},
};
use hasync_common::{
    fib, Counter, Counters, EventKind, FibKey, FlowKey, Forwarding, Policy, Session,
};
use hasync_tests::{
    cluster::send_raw,
    forwarder::{sa, stream_between, tcp_exchange, Forwarder, CLI4, CLI6, IO_TIMEOUT, SRV4, SRV6},
    frame::Frame,
    netns::{conntrack_timeouts, wait_for, Lab, Netns},
    sockets::recv_with_control,
    testrun::CounterDelta,
};

/// The kernel's count of datagrams it forwarded in `ns` (IPv4 or IPv6), from the
/// namespace's own /proc view (`thread-self`: the thread joined the namespace).
fn kernel_forwarded(ns: &Netns, v6: bool) -> Result<u64> {
    let (file, key) = if v6 {
        ("/proc/thread-self/net/snmp6", "Ip6OutForwDatagrams")
    } else {
        ("/proc/thread-self/net/snmp", "ForwDatagrams")
    };
    let text = ns.run(|| std::fs::read_to_string(file))??;
    if v6 {
        let line = text.lines().find(|l| l.starts_with(key));
        let value = line.and_then(|l| l.split_whitespace().nth(1));
        return value
            .context("no Ip6OutForwDatagrams")?
            .parse()
            .context(key);
    }
    // Two "Ip:" lines: the names, then the values.
    let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (
        ip.next().context("Ip names")?,
        ip.next().context("Ip values")?,
    );
    let at = names
        .split_whitespace()
        .position(|n| n == key)
        .context(key)?;
    values
        .split_whitespace()
        .nth(at)
        .context(key)?
        .parse()
        .context(key)
}

/// A UDP flow opened and answered, whose initiator then sends more.
struct Flow {
    initiator: UdpSocket,
    responder: UdpSocket,
    to: SocketAddr,
}

impl Flow {
    fn open(fwd: &Forwarder, client_ip: &str, server: SocketAddr) -> Result<Flow> {
        let from = SocketAddr::new(client_ip.parse()?, 0);
        let responder = fwd.srv.run(move || UdpSocket::bind(server))??;
        let initiator = fwd.cli.run(move || UdpSocket::bind(from))??;
        responder.set_read_timeout(Some(Duration::from_secs(1)))?;
        initiator.set_read_timeout(Some(IO_TIMEOUT))?;
        recv_ttl(&responder, server.is_ipv6())?;
        let flow = Flow {
            initiator,
            responder,
            to: server,
        };
        let mut buf = [0u8; 16];
        let mut peer = None;
        for _ in 0..5 {
            flow.initiator.send_to(b"open", server)?;
            if let Ok((_, from)) = flow.responder.recv_from(&mut buf) {
                peer = Some(from);
                break;
            }
        }
        flow.responder.send_to(
            b"answer",
            peer.context("the opening datagram never arrived")?,
        )?;
        let (n, _) = flow.initiator.recv_from(&mut buf).context("the answer")?;
        ensure!(&buf[..n] == b"answer", "initiator got {:?}", &buf[..n]);
        Ok(flow)
    }

    /// Sends `payload` until the responder has it (at most `attempts` times); returns the TTL or
    /// hop limit it arrived with.
    fn send(&self, payload: &[u8], attempts: usize) -> Result<u8> {
        for _ in 0..attempts {
            self.initiator.send_to(payload, self.to)?;
            if let Some(got) = recv_with_ttl(&self.responder, payload.len())? {
                return Ok(got);
            }
        }
        anyhow::bail!("{} bytes to {} never arrived", payload.len(), self.to)
    }
}

/// Asks for the TTL (IPv4) or hop limit (IPv6) of received datagrams.
fn recv_ttl(socket: &UdpSocket, v6: bool) -> Result<()> {
    let (level, name) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT)
    } else {
        (libc::IPPROTO_IP, libc::IP_RECVTTL)
    };
    let on: libc::c_int = 1;
    // SAFETY: `on` is a valid c_int for the option's length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    ensure!(rc == 0, "setsockopt: {}", std::io::Error::last_os_error());
    Ok(())
}

/// One datagram of `len` bytes with its TTL or hop limit; `None` on timeout.
fn recv_with_ttl(socket: &UdpSocket, len: usize) -> Result<Option<u8>> {
    let mut data = vec![0u8; len.max(1) + 1];
    let Some((n, controls)) = recv_with_control(socket.as_raw_fd(), &mut data)? else {
        return Ok(None);
    };
    ensure!(n == len, "received {n} bytes, expected {len}");
    let ttl = controls.iter().find_map(|c| {
        let ours = (c.level == libc::IPPROTO_IP && c.kind == libc::IP_TTL)
            || (c.level == libc::IPPROTO_IPV6 && c.kind == libc::IPV6_HOPLIMIT);
        let value: [u8; 4] = c.data.get(..4)?.try_into().ok()?;
        ours.then(|| i32::from_ne_bytes(value) as u8)
    });
    Ok(Some(ttl.context("no TTL / hop limit control message")?))
}

fn delta(fwd: &Forwarder, before: Counters) -> Result<CounterDelta> {
    Ok(CounterDelta {
        before,
        after: fwd.counters()?,
    })
}

/// Established TCP (a 200 kB answer) and UDP cross in XDP: the kernel forwards only the
/// packets of their setup and close, the receiver sees the TTL or hop limit one lower, and
/// the sessions are tracked as always.
fn established_flows_cross_in_xdp(tag: &str, client_ip: &str, server_ip: &str) -> Result<()> {
    let v6 = server_ip.contains(':');
    let fwd = Forwarder::with(tag, Policy::Strict, Forwarding::Xdp)?;
    let kernel_before = kernel_forwarded(&fwd.fw, v6)?;
    let before = fwd.counters()?;
    tcp_exchange(&fwd, sa(server_ip, 8080), 1000, 200_000)?;
    let flow = Flow::open(&fwd, client_ip, sa(server_ip, 5353))?;
    for i in 0..20u8 {
        let ttl = flow.send(&[i; 100], 5)?;
        ensure!(
            ttl == 63,
            "datagram {i} arrived with TTL / hop limit {ttl}, expected 64 - 1"
        );
    }
    let d = delta(&fwd, before)?;
    let kernel = kernel_forwarded(&fwd.fw, v6)? - kernel_before;
    eprintln!("{tag}: kernel forwarded {kernel}; {d}");
    let xdp = d.get(Counter::ForwardedXdp);
    ensure!(
        xdp >= 120,
        "TCP data and 20 datagrams forwarded in XDP: {d}"
    );
    ensure!(
        kernel <= 20 && kernel < xdp / 5,
        "the kernel forwarded {kernel} packets, XDP {xdp}: only setup and close should reach it"
    );
    ensure!(
        d.get(Counter::PassFwdNotEstablished) >= 3,
        "the handshakes went to the kernel: {d}"
    );
    for c in [
        Counter::PassFwdNoRoute,
        Counter::PassFwdEgress,
        Counter::PassFwdMtu,
    ] {
        ensure!(d.get(c) == 0, "{} moved: {d}", c.name());
    }
    Ok(())
}

#[test]
fn established_flows_cross_in_xdp_ipv4() {
    established_flows_cross_in_xdp("xfw4", CLI4, SRV4).unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn established_flows_cross_in_xdp_ipv6() {
    established_flows_cross_in_xdp("xfw6", CLI6, SRV6).unwrap_or_else(|e| panic!("{e:#}"));
}

/// Sends `payload` on `flow` after `change`, and checks that counter `c` moved by one and
/// nothing was forwarded in XDP; `arrives` says whether the kernel delivers it.
fn left_to_kernel(
    fwd: &mut Forwarder,
    flow: &Flow,
    payload: &[u8],
    c: Counter,
    arrives: bool,
) -> Result<()> {
    fwd.dp.bump_fib_generation()?;
    let before = fwd.counters()?;
    if arrives {
        flow.send(payload, 1).with_context(|| c.name())?;
    } else {
        flow.initiator.send_to(payload, flow.to)?;
        let what = wait_for(IO_TIMEOUT, || {
            let d = delta(fwd, before).ok()?;
            (d.get(c) >= 1).then_some(())
        });
        what.with_context(|| format!("{} did not move", c.name()))?;
    }
    let d = delta(fwd, before)?;
    ensure!(
        d.get(c) == 1 && d.get(Counter::ForwardedXdp) == 0,
        "{}: {d}",
        c.name()
    );
    Ok(())
}

/// After the FIB lookup: no neighbour yet, larger than the egress MTU, an egress that takes no
/// redirects, no forwarding route, TTL 1. Each goes to the kernel, counted; XDP forwarding
/// resumes after each.
fn after_the_lookup(fwd: &mut Forwarder, flow: &Flow) -> Result<()> {
    let resumes = |fwd: &mut Forwarder| -> Result<()> {
        fwd.dp.bump_fib_generation()?;
        let before = fwd.counters()?;
        // The kernel may still be resolving a neighbour: a few tries.
        for _ in 0..20 {
            flow.send(b"again", 5)?;
            if delta(fwd, before)?.get(Counter::ForwardedXdp) > 0 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        anyhow::bail!("XDP forwarding did not resume: {}", delta(fwd, before)?)
    };
    fwd.fw.ip(&["neigh", "flush", "dev", "fs0"])?;
    left_to_kernel(
        fwd,
        flow,
        b"no neighbour",
        Counter::PassFwdNoNeighbour,
        true,
    )?;
    resumes(fwd)?;

    fwd.fw.ip(&["link", "set", "fs0", "mtu", "1280"])?;
    left_to_kernel(fwd, flow, &[7; 1300], Counter::PassFwdMtu, false)?;
    resumes(fwd)?;
    fwd.fw.ip(&["link", "set", "fs0", "mtu", "1500"])?;

    // A route's own MTU counts too, where the kernel's forwarding honours it (locked). The
    // client learned a path MTU of 1280 above: this datagram stays under it.
    let host = format!("{SRV4}/32");
    fwd.fw
        .ip(&["route", "add", &host, "dev", "fs0", "mtu", "lock", "1200"])?;
    left_to_kernel(fwd, flow, &[7; 1240], Counter::PassFwdMtu, false)?;
    fwd.fw.ip(&["route", "del", &host])?;
    resumes(fwd)?;

    // A route that leads back into the session's own zone is the kernel's to decide.
    fwd.fw
        .ip(&["route", "add", &host, "via", CLI4, "dev", "fc0"])?;
    left_to_kernel(fwd, flow, b"third zone", Counter::PassFwdZone, false)?;
    fwd.fw.ip(&["route", "del", &host])?;
    resumes(fwd)?;

    let fc0 = fwd.fw.ifindex("fc0")?;
    let fs0 = fwd.fw.ifindex("fs0")?;
    fwd.set_ports(&[fc0])?;
    left_to_kernel(fwd, flow, b"no port", Counter::PassFwdEgress, true)?;
    // A port the kernel refuses (an interface gone since it was looked up) does not keep the
    // others out (before stop 51 the write stopped at it: the diff review).
    let refused = fwd.set_ports(&[fc0, 65_000, fs0]);
    ensure!(refused.is_err(), "interface 65000 was taken as a port");
    resumes(fwd)?;
    fwd.set_ports(&[fc0, fs0])?;

    fwd.fw
        .ip(&["route", "add", "prohibit", &format!("{SRV4}/32")])?;
    left_to_kernel(fwd, flow, b"prohibited", Counter::PassFwdNoRoute, false)?;
    fwd.fw
        .ip(&["route", "del", "prohibit", &format!("{SRV4}/32")])?;
    resumes(fwd)?;

    flow.initiator.set_ttl(1)?;
    left_to_kernel(fwd, flow, b"ttl 1", Counter::PassFwdTtl, false)?;
    flow.initiator.set_ttl(64)?;
    resumes(fwd)?;

    // An interface whose address the agent has not written: its frames are the kernel's.
    fwd.dp.set_ingress_macs(&[])?;
    left_to_kernel(fwd, flow, b"unknown mac", Counter::PassFwdOtherHost, true)?;
    let macs = [(fc0, fwd.fw.mac("fc0")?), (fs0, fwd.fw.mac("fs0")?)];
    fwd.dp.set_ingress_macs(&macs)?;
    resumes(fwd)?;
    sent_elsewhere(fwd, flow)?;
    resumes(fwd)
}

/// A frame of the flow sent to another host's MAC address (a switch floods it to every member,
/// or a capture made the interface promiscuous): not forwarded in XDP, and the kernel drops it
/// as not its own, so it never arrives.
fn sent_elsewhere(fwd: &mut Forwarder, flow: &Flow) -> Result<()> {
    let from = flow.initiator.local_addr()?;
    let mut frame = Frame::udp(from, flow.to).payload(8).build();
    frame[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 0x99]);
    frame[6..12].copy_from_slice(&fwd.cli.mac("c0")?);
    let before = fwd.counters()?;
    fwd.cli
        .run(move || send_raw("c0", [0; 6], &[frame], IO_TIMEOUT))?
        .map_err(anyhow::Error::msg)?;
    let d = wait_for(IO_TIMEOUT, || {
        let d = delta(fwd, before).ok()?;
        (d.get(Counter::PassFwdOtherHost) >= 1).then_some(d)
    })
    .context("pass-fwd-other-host did not move")?;
    ensure!(
        d.get(Counter::PassFwdOtherHost) == 1 && d.get(Counter::ForwardedXdp) == 0,
        "another host's frame: {d}"
    );
    let mut buf = [0u8; 64];
    ensure!(
        flow.responder.recv_from(&mut buf).is_err(),
        "the frame sent to another host arrived"
    );
    Ok(())
}

#[test]
fn what_xdp_leaves_to_the_kernel_after_its_lookup_is_counted() {
    let run = || -> Result<()> {
        let mut fwd = Forwarder::with("xfwk", Policy::Strict, Forwarding::Xdp)?;
        let flow = Flow::open(&fwd, CLI4, sa(SRV4, 5354))?;
        after_the_lookup(&mut fwd, &flow)
    };
    run().unwrap_or_else(|e| panic!("{e:#}"));
}

/// The agent keys the FIB cache on the destination alone unless something routes by source:
/// it lists the rules and routes of its namespace, and a `from` rule, an IPv6 route with a
/// source prefix or a route through a next-hop object each make it keep the source.
#[test]
fn a_from_rule_or_a_source_route_keeps_the_source_in_the_fib_key() -> Result<()> {
    use hasync_agent::forwarding::source::routes_by_source;
    let lab = hasync_tests::netns::Lab::new("srcrt")?;
    let ns = lab.netns("r")?;
    let look = || -> Result<bool> { Ok(ns.run(routes_by_source)??) };
    ensure!(!look()?, "a fresh namespace routes by destination only");
    let rule = ["rule", "add", "from", "198.18.7.0/24", "table", "100"];
    ns.ip(&rule)?;
    ensure!(look()?, "a `from` rule");
    ns.ip(&["rule", "del", "from", "198.18.7.0/24", "table", "100"])?;
    ensure!(!look()?, "the rule is gone");
    ns.ip(&["rule", "add", "to", "198.18.8.0/24", "table", "100"])?;
    ensure!(!look()?, "a `to` rule selects by destination");
    let route = ["unreachable", "fd00:9::/64", "from", "fd00:8::/64"];
    ns.ip(&[&["-6", "route", "add"][..], &route].concat())?;
    ensure!(look()?, "an IPv6 route with a source prefix");
    ns.ip(&[&["-6", "route", "del"][..], &route].concat())?;
    ensure!(!look()?, "the source route is gone");
    // A route through a next-hop object, which may be a group (multipath: the leg is chosen
    // by a hash of the source).
    ns.ip(&["nexthop", "add", "id", "7", "blackhole"])?;
    ns.ip(&["route", "add", "198.18.9.0/24", "nhid", "7"])?;
    ensure!(look()?, "a route through a next-hop object");
    Ok(())
}

/// Where nothing routes by source, one cached next hop serves every source of a destination;
/// where something does, each source has its own.
#[test]
fn without_source_routing_one_fib_entry_serves_every_source() {
    let run = || -> Result<()> {
        let mut fwd = Forwarder::with("xfws", Policy::Strict, Forwarding::Xdp)?;
        fwd.cli.addr("c0", "198.18.0.3/24")?;
        let flows = [
            Flow::open(&fwd, CLI4, sa(SRV4, 5390))?,
            Flow::open(&fwd, "198.18.0.3", sa(SRV4, 5391))?,
        ];
        let word = |a: &str| -> Result<u32> {
            let a: std::net::Ipv4Addr = a.parse()?;
            Ok(u32::from_ne_bytes(a.octets()))
        };
        let srv = word(SRV4)?;
        let sources = [word(CLI4)?, word("198.18.0.3")?];
        let seed = fwd.dp.config()?.fib_seed;
        for by_source in [false, true] {
            fwd.dp.set_fib_by_source(by_source)?;
            let before = fwd.counters()?;
            for f in &flows {
                f.send(b"keyed", 5)?;
            }
            ensure!(
                delta(&fwd, before)?.get(Counter::ForwardedXdp) >= 2,
                "forwarded in XDP"
            );
            let keys = fwd.dp.fib_cache_keys()?;
            let keyed = |k: &&FibKey| k.dst[0] == srv && (k.src[0] != 0) == by_source;
            let to_srv: Vec<_> = keys.iter().filter(keyed).collect();
            // Two keys that share a slot on one CPU take turns (one in 4,096 seeds).
            let share = |k: &FibKey| {
                let slots = sources.map(|s| {
                    fib::slot(
                        &FibKey {
                            src: [s, 0, 0, 0],
                            ..*k
                        },
                        seed,
                    )
                });
                slots[0] == slots[1]
            };
            let ok = match (by_source, to_srv.as_slice()) {
                (false, [_]) | (true, [_, _]) => true,
                (true, [k]) => share(k),
                _ => false,
            };
            ensure!(ok, "by source {by_source}: {keys:?}");
        }
        Ok(())
    };
    run().unwrap_or_else(|e| panic!("{e:#}"));
}

/// The TCP sockets of `ns` on `port` in state `state` (as /proc/net/tcp writes it, in hex).
fn sockets_in_state(ns: &Netns, port: u16, state: &str) -> Result<usize> {
    let text = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/tcp"))??;
    let local = format!(":{port:04X}");
    Ok(text
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1).is_some_and(|a| a.ends_with(&local)) && f.get(3) == Some(&state)
        })
        .count())
}

/// A stateful nftables ruleset in the forwarder, the kernel's connection tracking at its
/// defaults: invalid packets counted (`xct` counter `invalid`) and dropped, new ones counted
/// (`new`).
fn stateful_ruleset(fwd: &Forwarder) -> Result<()> {
    fwd.fw.nft(
        "table inet xct {
            counter invalid {}
            counter new {}
            chain forward_ct {
                type filter hook forward priority 0; policy accept;
                ct state invalid counter name invalid drop
                ct state new counter name new
            }
        }",
    )
}

/// The agent's step on the forwarder's events of `kind`, done here by the test: each handed
/// to `KernelEntries` with `step`, in the forwarder's namespace, then flushed.
fn agents_step(
    fwd: &mut Forwarder,
    kind: EventKind,
    step: fn(&mut KernelEntries, &FlowKey, &Session),
) -> Result<()> {
    let events = fwd.events();
    fwd.fw.run(|| {
        let mut entries = KernelEntries::new(true);
        for e in events.iter().filter(|e| e.kind == kind as u8) {
            step(&mut entries, &e.key, &e.session);
        }
        entries.flush();
    })
}

/// Beside a stateful nftables ruleset in the forwarder (the kernel's connection tracking at
/// its defaults, invalid packets dropped), a connection forwarded in XDP closes: the kernel saw
/// only its handshake, so a segment after its data is out of the kernel's window, and the
/// segments that close it stay in XDP. Seen failing: the last ACK went to the kernel and was
/// dropped as invalid, and so were two more (the answers to the FIN the server, left in
/// LAST_ACK, sent again): three segments invalid. The
/// kernel's entry, which never sees the close, gets the closed timeout from the agent's
/// `KernelEntries` when the session's close event comes (seen failing: 431,999 s left, as the
/// established timeout of 5 days leaves it).
#[test]
fn a_forwarded_connection_closes_beside_a_stateful_ruleset() -> Result<()> {
    let mut fwd = Forwarder::with("xct4", Policy::Strict, Forwarding::Xdp)?;
    stateful_ruleset(&fwd)?;
    let before = fwd.counters()?;
    tcp_exchange(&fwd, sa(SRV4, 8080), 1000, 2_000_000)?;
    // The server's FIN is answered at once; a dropped answer leaves it in LAST_ACK (09).
    std::thread::sleep(Duration::from_millis(300));
    let d = delta(&fwd, before)?;
    eprintln!("{d}");
    ensure!(
        fwd.fw.nft_counter("xct", "new")? == 1,
        "the SYN was not the kernel's: {d}"
    );
    let invalid = fwd.fw.nft_counter("xct", "invalid")?;
    ensure!(
        invalid == 0,
        "{invalid} segments invalid in the kernel: {d}"
    );
    ensure!(
        sockets_in_state(&fwd.srv, 8080, "09")? == 0,
        "the server waits in LAST_ACK for the last ACK"
    );
    ensure!(
        d.get(Counter::ForwardedXdp) > 1000,
        "not forwarded in XDP: {d}"
    );
    agents_step(&mut fwd, EventKind::Closed, KernelEntries::closed)?;
    let left = conntrack_timeouts(fwd.fw.name(), 8080)?;
    ensure!(
        !left.is_empty() && left.iter().all(|s| *s <= u64::from(CLOSED_TIMEOUT_S)),
        "the kernel's entry for the closed connection has {left:?} s left"
    );
    Ok(())
}

/// A connection forwarded in XDP that the fast path hands to the kernel mid-stream (here its
/// egress stops taking redirects; a neighbour not resolved yet or a packet over the MTU do the
/// same) keeps flowing beside a stateful ruleset: its kernel entry, marked liberal when the
/// session became established (`KernelEntries::established`, the agent's step on the event,
/// done here by the test), takes segments past every window the kernel saw. Seen failing with
/// the mark left out: the segments were invalid there and dropped, retransmissions too, and
/// the transfer stalled.
#[test]
fn a_forwarded_connection_handed_to_the_kernel_mid_stream_goes_on() -> Result<()> {
    let mut fwd = Forwarder::with("xlb4", Policy::Strict, Forwarding::Xdp)?;
    stateful_ruleset(&fwd)?;
    let (mut client, reader) = stream_between(fwd.cli.name(), fwd.srv.name(), sa(SRV4, 8081))?;
    let (first, second) = (2_000_000, 1_000_000);
    let start = fwd.counters()?;
    client.write_all(&vec![0xa5; first])?;
    // Its events reach the ring; the first part crosses in XDP (the kernel's window is then
    // the handshake's).
    std::thread::sleep(Duration::from_millis(200));
    let d = delta(&fwd, start)?;
    ensure!(
        d.get(Counter::ForwardedXdp) > 100,
        "the first part was not forwarded in XDP: {d}"
    );
    agents_step(
        &mut fwd,
        EventKind::StateChanged,
        KernelEntries::established,
    )?;
    let before = fwd.counters()?;
    let fc0 = fwd.fw.ifindex("fc0")?;
    fwd.set_ports(&[fc0])?;
    let sent = client.write_all(&vec![0xa5; second]);
    client.shutdown(std::net::Shutdown::Write)?;
    let got = reader.join().expect("reader thread");
    let d = delta(&fwd, before)?;
    let invalid = fwd.fw.nft_counter("xct", "invalid")?;
    eprintln!("{d}");
    ensure!(
        d.get(Counter::PassFwdEgress) > 0,
        "nothing was handed to the kernel: {d}"
    );
    ensure!(
        invalid == 0,
        "{invalid} segments invalid in the kernel (sent: {sent:?}, received: {got:?})"
    );
    sent.context("the client's second write")?;
    let got = got.context("the server's read")?;
    ensure!(got == first + second, "the server got {got} bytes");
    Ok(())
}

/// Adds an IPsec tunnel policy of direction `dir` between two of the benchmarking range's
/// networks in `ns`.
fn xfrm_policy(ns: &Netns, dir: &str) -> Result<()> {
    let selector = ["src", "198.18.1.0/24", "dst", "198.18.2.0/24"];
    let template = [
        "tmpl",
        "src",
        "198.18.0.1",
        "dst",
        "198.18.0.2",
        "proto",
        "esp",
        "mode",
        "tunnel",
    ];
    let mut args = vec!["xfrm", "policy", "add"];
    args.extend(selector);
    args.extend(["dir", dir]);
    args.extend(template);
    ns.ip(&args).map(drop)
}

/// The count that keeps every routed port to the kernel while IPsec policies could select
/// routed traffic (XDP would forward it past them, in the clear) reads the namespace's
/// policies: forward and outbound ones count, inbound ones (traffic to the host) do not; a
/// default policy that blocks forwarded traffic counts too (the diff review: it was not read).
/// A flush is notified at once, and leaves none.
#[test]
fn ipsec_policies_are_counted_and_their_changes_notified() -> Result<()> {
    let lab = Lab::new("xfrm")?;
    let ns = lab.netns("fw")?;
    let read = || -> Result<Policies> { Ok(ns.run(forwarding_policies)??) };
    ensure!(
        read()? == Policies::default(),
        "policies in a new namespace"
    );
    xfrm_policy(&ns, "in")?;
    ensure!(read()?.selecting == 0, "an inbound policy counted");
    xfrm_policy(&ns, "fwd")?;
    ensure!(read()?.selecting == 1, "the forward policy");
    xfrm_policy(&ns, "out")?;
    ensure!(read()?.selecting == 2, "the outbound policy");
    let notified = ns.run(|| -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let watch = PolicyWatch::open().context("no policy notifications")?;
            ns.ip(&["xfrm", "policy", "flush"])?;
            let changed = tokio::time::timeout(Duration::from_secs(2), watch.changed()).await;
            Ok(changed.context("the flush was not notified")??)
        })
    })?;
    notified?;
    ensure!(
        read()? == Policies::default(),
        "policies left after the flush"
    );
    ns.ip(&["xfrm", "policy", "setdefault", "fwd", "block"])?;
    ensure!(read()?.default_blocks, "a blocking forward default");
    ns.ip(&[
        "xfrm",
        "policy",
        "setdefault",
        "fwd",
        "accept",
        "in",
        "block",
    ])?;
    ensure!(!read()?.default_blocks, "only the inbound default blocks");
    Ok(())
}
