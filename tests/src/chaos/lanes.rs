//! Traffic lanes: lane `i` is a client address `198.18.0.(100+i)` talking to a server address
//! `198.18.1.(100+i)` through one member, both directions pinned to it by /32 routes with a
//! source hint. Each lane carries a long-lived TCP echo connection and a long-lived UDP flow,
//! and takes bursts of short UDP flows; steering a lane moves both directions to another
//! member at once. The lanes start spread over the members, so flows run through several.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use hasync_agent::lab::{
    topology::Link,
    traffic::{
        tcp_client, tcp_echo_server, udp_client, udp_echo_server, Bounds, EchoServer,
        TcpClientOptions, TrafficClient, UdpClientOptions,
    },
    Topology,
};
use hasync_agent::lock::lock;

use crate::cluster::{udp_flows, Row};

/// The TCP echo port of every lane.
pub const TCP_PORT: u16 = 7600;
/// The UDP echo port of every lane (long-lived flow and bursts).
pub const UDP_PORT: u16 = 7601;
/// Most lanes: client and server addresses .101–.116.
pub const MAX_LANES: u8 = 16;

/// Lane `i`'s client address.
pub fn client_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 100 + i)
}

/// Lane `i`'s server address.
pub fn server_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, 100 + i)
}

struct Lane {
    index: u8,
    via: u8,
    tcp: TrafficClient,
    _udp: TrafficClient,
    /// Longest time seen without a TCP echo, once connected.
    longest_stall: Duration,
}

/// Every lane with its servers; stopped on drop.
pub struct Lanes {
    lanes: Mutex<Vec<Lane>>,
    _servers: [EchoServer; 2],
    started: Instant,
}

/// Routes lane `i` through member `k`, both ways.
fn route(topo: &Topology, i: u8, k: u8) -> Result<(), String> {
    let (c, s) = (client_addr(i), server_addr(i));
    let (gw_in, _) = Link::In.v4(k);
    let (gw_out, _) = Link::Out.v4(k);
    topo.ip(
        "client",
        &[
            "route",
            "replace",
            &format!("{s}/32"),
            "via",
            &gw_in.to_string(),
            "src",
            &c.to_string(),
        ],
    )
    .and_then(|_| {
        topo.ip(
            "server",
            &[
                "route",
                "replace",
                &format!("{c}/32"),
                "via",
                &gw_out.to_string(),
                "src",
                &s.to_string(),
            ],
        )
    })
    .map(drop)
    .map_err(|e| format!("routing lane {i} through fw{k}: {e}"))
}

impl Lanes {
    /// `count` lanes (1–16), lane `i` through member `(i-1) % members + 1`, for at most
    /// `duration`.
    pub fn start(topo: &Topology, count: u8, duration: Duration) -> Result<Lanes, String> {
        let count = count.clamp(1, MAX_LANES);
        let e = |e: hasync_agent::lab::LabError| e.to_string();
        let any = Ipv4Addr::UNSPECIFIED;
        let bounds = Bounds::new(1_000_000, duration);
        let servers = [
            tcp_echo_server(topo.server(), (any, TCP_PORT).into(), bounds).map_err(e)?,
            udp_echo_server(topo.server(), (any, UDP_PORT).into(), bounds).map_err(e)?,
        ];
        let mut lanes = Vec::new();
        for i in 1..=count {
            let via = (i - 1) % topo.members() + 1;
            for (ns, a) in [("client", client_addr(i)), ("server", server_addr(i))] {
                topo.ip(ns, &["addr", "add", &format!("{a}/32"), "dev", "eth0"])
                    .map_err(e)?;
            }
            route(topo, i, via)?;
            lanes.push(Self::lane(topo, i, via, duration)?);
        }
        Ok(Lanes {
            lanes: Mutex::new(lanes),
            _servers: servers,
            started: Instant::now(),
        })
    }

    fn lane(topo: &Topology, i: u8, via: u8, duration: Duration) -> Result<Lane, String> {
        let tcp = tcp_client(
            topo.client(),
            (server_addr(i), TCP_PORT).into(),
            TcpClientOptions {
                interval: Duration::from_millis(100),
                io_timeout: Duration::from_millis(200),
                bounds: Bounds::new(1_000_000, duration),
                ..TcpClientOptions::default()
            },
        )
        .map_err(|e| format!("lane {i}: TCP through fw{via}: {e}"))?;
        let udp = udp_client(
            topo.client(),
            (server_addr(i), UDP_PORT).into(),
            UdpClientOptions {
                interval: Duration::from_millis(250),
                bounds: Bounds::new(1_000_000, duration),
                ..UdpClientOptions::default()
            },
        )
        .map_err(|e| format!("lane {i}: UDP through fw{via}: {e}"))?;
        Ok(Lane {
            index: i,
            via,
            tcp,
            _udp: udp,
            longest_stall: Duration::ZERO,
        })
    }

    /// The members lanes run through, by lane.
    pub fn vias(&self) -> Vec<(u8, u8)> {
        lock(&self.lanes).iter().map(|l| (l.index, l.via)).collect()
    }

    /// Steers lane `i` through member `k`.
    pub fn steer(&self, topo: &Topology, i: u8, k: u8) -> Result<(), String> {
        route(topo, i, k)?;
        for l in lock(&self.lanes).iter_mut().filter(|l| l.index == i) {
            l.via = k;
        }
        Ok(())
    }

    /// Steers every lane through member `from` to member `to`.
    pub fn steer_away(&self, topo: &Topology, from: u8, to: u8) -> Result<(), String> {
        for (i, via) in self.vias() {
            if via == from {
                self.steer(topo, i, to)?;
            }
        }
        Ok(())
    }

    /// Updates each lane's longest stall (time since its last TCP echo); call often.
    pub fn sample(&self) {
        for l in lock(&self.lanes).iter_mut() {
            let p = l.tcp.progress();
            if p.connected && !p.done {
                l.longest_stall = l.longest_stall.max(p.since_ok(self.started));
            }
        }
    }

    /// The longest TCP stall of any lane so far.
    pub fn longest_stall(&self) -> Duration {
        lock(&self.lanes)
            .iter()
            .map(|l| l.longest_stall)
            .max()
            .unwrap_or_default()
    }

    /// Lanes whose TCP connection broke (reset, closed, corrupted): lane and reason.
    pub fn broken(&self) -> Vec<(u8, String)> {
        lock(&self.lanes)
            .iter()
            .filter_map(|l| l.tcp.progress().fatal.map(|f| (l.index, f)))
            .collect()
    }

    /// `per_lane` short UDP flows through each lane (new sessions on each lane's member).
    pub fn burst(&self, topo: &Topology, per_lane: usize) -> Result<usize, String> {
        let mut made = 0;
        for (i, via) in self.vias() {
            let server: SocketAddr = (server_addr(i), UDP_PORT).into();
            made += udp_flows(topo.client(), server, per_lane)
                .map_err(|e| format!("UDP burst on lane {i} through fw{via}: {e}"))?
                .len();
        }
        Ok(made)
    }
}

/// Is `row` lane `i`'s long-lived TCP connection?
pub fn is_lane_tcp(row: &Row, i: u8) -> bool {
    row.proto == "tcp"
        && row.src == std::net::IpAddr::V4(client_addr(i))
        && row.dst == std::net::IpAddr::V4(server_addr(i))
        && row.dport == TCP_PORT
}
