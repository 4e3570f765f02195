//! The forwarding namespace of the netns tests: a client, a forwarder running the XDP program
//! in native mode on both of its interfaces, and a server, with real TCP and UDP exchanges.
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
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use hasync_agent::{
    datapath::{attach::AttachMode, Datapath, DatapathOptions},
    forwarding::features::Features,
};
use hasync_common::{
    DatapathConfig, Event, FlowKey, Forwarding, Policy, Session, ZoneBinding, ZoneId,
};

use crate::{
    netns::{veth, DropIsolated, Lab, Netns},
    testrun::{LOCAL, TEST_CAPACITY},
};

pub const TRUST: ZoneId = ZoneId(1);
pub const UNTRUST: ZoneId = ZoneId(2);
/// Bound of every socket operation.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub const CLI4: &str = "198.18.0.2";
pub const SRV4: &str = "198.18.1.2";
pub const CLI6: &str = "fd00:18::2";
pub const SRV6: &str = "fd00:18:1::2";

/// The three namespaces and the datapath attached in `fw`. Fields drop in order: the datapath
/// first (on an isolated thread), then the namespaces.
pub struct Forwarder {
    pub dp: DropIsolated<Datapath>,
    pub events: hasync_agent::datapath::events::EventStream,
    pub cli: Netns,
    pub fw: Netns,
    pub srv: Netns,
}

/// Makes `ports` (interfaces of `fw`) the ones XDP forwarding may send to. A DEVMAP resolves
/// the interface indexes it is given in the writer's network namespace: the update runs in
/// `fw`, never in the test's own (the host's) namespace.
pub fn set_ports(dp: &mut Datapath, fw: &Netns, ports: &[u32]) -> Result<()> {
    fw.run(|| dp.set_fwd_ports(ports))??;
    Ok(())
}

impl Forwarder {
    pub fn new(tag: &str, policy: Policy) -> Result<Self> {
        Self::with(tag, policy, Forwarding::Kernel)
    }

    /// As [`Forwarder::new`], with `forwarding` in the datapath config; with XDP forwarding,
    /// `fc0` and `fs0` are the ports XDP may redirect to.
    pub fn with(tag: &str, policy: Policy, forwarding: Forwarding) -> Result<Self> {
        let lab = Lab::new(tag)?;
        let cli = lab.netns("cli")?;
        let fw = lab.netns("fw")?;
        let srv = lab.netns("srv")?;
        veth(&cli, "c0", &fw, "fc0")?;
        veth(&fw, "fs0", &srv, "s0")?;
        cli.addr("c0", "198.18.0.2/24")?;
        cli.addr("c0", "fd00:18::2/64")?;
        fw.addr("fc0", "198.18.0.1/24")?;
        fw.addr("fc0", "fd00:18::1/64")?;
        fw.addr("fs0", "198.18.1.1/24")?;
        fw.addr("fs0", "fd00:18:1::1/64")?;
        srv.addr("s0", "198.18.1.2/24")?;
        srv.addr("s0", "fd00:18:1::2/64")?;
        fw.sysctl("net.ipv4.ip_forward", "1")?;
        fw.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        cli.default_route("198.18.0.1")?;
        cli.default_route("fd00:18::1")?;
        srv.default_route("198.18.1.1")?;
        srv.default_route("fd00:18:1::1")?;

        let mut config = DatapathConfig::with_defaults(LOCAL);
        config.policy = policy as u8;
        config.forwarding = forwarding as u8;
        let mut opts = DatapathOptions::new(LOCAL);
        opts.session_capacity = TEST_CAPACITY;
        opts.config = config;
        let mut dp = DropIsolated::new(Datapath::load(&opts).context("loading the XDP program")?);
        dp.set_member_alive(LOCAL, true)?;
        dp.set_zone(fw.ifindex("fc0")?, ZoneBinding::new(TRUST))?;
        dp.set_zone(fw.ifindex("fs0")?, ZoneBinding::new(UNTRUST))?;
        let events = dp.take_events()?;
        let dp_ref = &mut *dp;
        fw.run(move || -> Result<()> {
            for ifname in ["fc0", "fs0"] {
                let mode = dp_ref
                    .attach(ifname)
                    .with_context(|| format!("attaching to {ifname}"))?;
                ensure!(
                    mode == AttachMode::Native,
                    "{ifname}: attached in {mode} mode, not native"
                );
            }
            Ok(())
        })??;
        if forwarding == Forwarding::Xdp {
            xdp_ports(&mut dp, &cli, &fw, &srv)?;
        }
        Ok(Forwarder {
            dp,
            events,
            cli,
            fw,
            srv,
        })
    }

    /// As [`set_ports`], for this forwarder.
    pub fn set_ports(&mut self, ports: &[u32]) -> Result<()> {
        set_ports(&mut self.dp, &self.fw, ports)
    }

    pub fn session(&self, key: &FlowKey) -> Result<Option<Session>> {
        Ok(self.dp.session(key)?)
    }

    pub fn counters(&self) -> Result<hasync_common::Counters> {
        Ok(self.dp.counters()?)
    }

    pub fn events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        self.events.drain(&mut out);
        out
    }
}

/// Makes `fc0` and `fs0` ports XDP may redirect to: the outer ends `c0` and `s0` become XDP
/// endpoints (see [`Netns::xdp_endpoint`]), the kernel must then say `fc0` and `fs0` take
/// redirects, and FWD_PORTS gets them; INGRESS_MACS gets their addresses, as the agent writes
/// them.
fn xdp_ports(dp: &mut Datapath, cli: &Netns, fw: &Netns, srv: &Netns) -> Result<()> {
    cli.xdp_endpoint("c0")?;
    srv.xdp_endpoint("s0")?;
    let ports = [fw.ifindex("fc0")?, fw.ifindex("fs0")?];
    fw.run(|| -> Result<()> {
        let mut features = Features::open()?;
        for index in ports {
            ensure!(
                features.takes_redirects(index)?,
                "interface {index} takes no XDP redirects although its peer runs XDP"
            );
        }
        Ok(())
    })??;
    set_ports(dp, fw, &ports)?;
    let macs = [(ports[0], fw.mac("fc0")?), (ports[1], fw.mac("fs0")?)];
    dp.set_ingress_macs(&macs)?;
    Ok(())
}

/// A request of `up` bytes, a response of `down` bytes, then an orderly close (client FIN
/// first). Returns the client's address as the server saw it.
pub fn tcp_exchange(
    fwd: &Forwarder,
    server: SocketAddr,
    up: usize,
    down: usize,
) -> Result<SocketAddr> {
    tcp_exchange_between(&fwd.cli, &fwd.srv, server, up, down)
}

/// As [`tcp_exchange`], from namespace `cli` to a server in `srv`.
pub fn tcp_exchange_between(
    cli: &Netns,
    srv: &Netns,
    server: SocketAddr,
    up: usize,
    down: usize,
) -> Result<SocketAddr> {
    let listener = srv.run(move || TcpListener::bind(server))??;
    listener.set_nonblocking(true)?;
    let srv = std::thread::spawn(move || -> Result<(SocketAddr, usize)> {
        let deadline = Instant::now() + IO_TIMEOUT;
        let (mut stream, peer) = loop {
            match listener.accept() {
                Ok(conn) => break conn,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        bail!("no connection within {IO_TIMEOUT:?}");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e.into()),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut request = Vec::new();
        stream
            .read_to_end(&mut request)
            .context("server reading the request")?;
        stream
            .write_all(&vec![0x5a; down])
            .context("server writing the response")?;
        // Closing with nothing unread sends a FIN, not a RST.
        drop(stream);
        Ok((peer, request.len()))
    });
    let mut client = cli.run(move || TcpStream::connect_timeout(&server, IO_TIMEOUT))??;
    client.set_read_timeout(Some(IO_TIMEOUT))?;
    client.set_write_timeout(Some(IO_TIMEOUT))?;
    let local = client.local_addr()?;
    client
        .write_all(&vec![0xa5; up])
        .context("client writing the request")?;
    client.shutdown(std::net::Shutdown::Write)?;
    let mut response = Vec::new();
    client
        .read_to_end(&mut response)
        .context("client reading the response")?;
    drop(client);
    let (peer, got_up) = srv.join().expect("server thread")?;
    ensure!(peer == local, "server saw {peer}, client is {local}");
    ensure!(got_up == up, "server got {got_up} of {up} bytes");
    ensure!(
        response.len() == down,
        "client got {} of {down} bytes",
        response.len()
    );
    Ok(local)
}

/// A TCP connection from namespace `client_ns` to a listener on `server` in `server_ns` (any
/// lab namespace, by name), for a test to write into: the client's end, and a thread that
/// reads the server's end to its end and returns how many bytes came (each read and write
/// bounded by [`IO_TIMEOUT`]).
pub fn stream_between(
    client_ns: &str,
    server_ns: &str,
    server: SocketAddr,
) -> Result<(TcpStream, std::thread::JoinHandle<std::io::Result<usize>>)> {
    use hasync_agent::lab::netns::run_in;
    let listener = run_in(server_ns, move || TcpListener::bind(server))??;
    let client = run_in(client_ns, move || {
        TcpStream::connect_timeout(&server, IO_TIMEOUT)
    })??;
    client.set_write_timeout(Some(IO_TIMEOUT))?;
    let (mut accepted, _) = listener.accept()?;
    accepted.set_read_timeout(Some(IO_TIMEOUT))?;
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        accepted.read_to_end(&mut got).map(|_| got.len())
    });
    Ok((client, reader))
}

/// A datagram from a socket on `from_ip` in `from` to `to_addr` in `to` (retried up to 5
/// times), and one back. Returns the initiator's address.
pub fn udp_exchange(
    from: &Netns,
    from_ip: IpAddr,
    to: &Netns,
    to_addr: SocketAddr,
) -> Result<SocketAddr> {
    let responder = to.run(move || UdpSocket::bind(to_addr))??;
    let initiator = from.run(move || UdpSocket::bind(SocketAddr::new(from_ip, 0)))??;
    responder.set_read_timeout(Some(Duration::from_secs(1)))?;
    initiator.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 64];
    let mut from_addr = None;
    for _attempt in 0..5 {
        initiator.send_to(b"request", to_addr)?;
        if let Ok((n, peer)) = responder.recv_from(&mut buf) {
            ensure!(&buf[..n] == b"request", "responder got {:?}", &buf[..n]);
            from_addr = Some(peer);
            break;
        }
    }
    let peer = from_addr.context("no request arrived in 5 attempts")?;
    responder.send_to(b"reply", peer)?;
    let (n, replier) = initiator
        .recv_from(&mut buf)
        .context("waiting for the reply")?;
    ensure!(
        &buf[..n] == b"reply" && replier == to_addr,
        "initiator got {:?} from {replier}",
        &buf[..n]
    );
    Ok(initiator.local_addr()?)
}

pub fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("lab address"), port)
}
