//! `hasync lab`: a whole cluster in network namespaces on this host, with traffic through it,
//! shown live until Ctrl-C or `--duration`.

use std::{
    io::{IsTerminal as _, Read as _},
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::{
    cluster::{AgentState, ClusterOptions, LabCluster},
    interrupt,
    netns::netns_exists,
    topology::{existing_namespaces, CLIENT_V4, SERVER_V4},
    traffic::{
        tcp_client, tcp_echo_server, udp_client, udp_echo_server, Bounds, EchoServer, Progress,
        TcpClientOptions, TrafficClient, UdpClientOptions,
    },
    Topology,
};

/// Ports of the lab's echo servers.
const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;
const TCP_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(SERVER_V4, TCP_PORT));
const UDP_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(SERVER_V4, UDP_PORT));
/// How long a `show` subprocess may take.
const SHOW_TIMEOUT: Duration = Duration::from_secs(2);
/// How long agents get to open their control socket before the lab goes on without them:
/// this, and [`READY_PER_MEMBER`] more for each member (they load their programs at once, and
/// the verifier's work is shared by the host's CPUs: 16 members took about 50 s on 2 CPUs).
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const READY_PER_MEMBER: Duration = Duration::from_secs(5);

#[derive(Debug, clap::Args)]
pub struct LabArgs {
    /// Cluster members, each in its own namespace fwK (2–16).
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u8).range(2..=16))]
    pub members: u8,

    /// Stop after this many seconds (Ctrl-C stops earlier); all traffic ends by then.
    #[arg(long, value_name = "SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub duration: u64,

    /// Prefix of the namespace names (`l2-` gives l2-client, l2-fw1, ...), to run two labs
    /// side by side: letters, digits and `-`.
    #[arg(long, value_name = "P", default_value = "")]
    pub prefix: String,

    /// Keep the lab directory (configs, agent logs, traffic logs) after exit.
    #[arg(long)]
    pub keep: bool,
}

/// Runs the lab until Ctrl-C or `--duration`, then removes it.
pub fn run(args: &LabArgs) -> anyhow::Result<()> {
    if crate::dir_trust::euid() != 0 {
        bail!("the lab creates network namespaces: run it as root");
    }
    interrupt::catch_signals()?;
    let duration = Duration::from_secs(args.duration);
    let start = Instant::now();
    let exe = std::env::current_exe().context("finding the hasync executable")?;

    let lab = start_lab(args, &exe)?;
    let left = duration.saturating_sub(start.elapsed());
    let _servers = start_echo_servers(lab.topology(), left)?;
    let traffic = LabTraffic::start(lab.topology(), left)?;
    show_until_stopped(&lab, &exe, start, duration, &traffic);

    println!(
        "\nstopping ({}) ...",
        if interrupt::stopped() {
            "signal"
        } else {
            "--duration reached"
        }
    );
    println!("{}", traffic.stop());
    remove_lab(lab, args.keep)
}

/// Creates the namespaces, writes the configs and starts every member's agent.
fn start_lab(args: &LabArgs, exe: &Path) -> anyhow::Result<LabCluster> {
    let existing = existing_namespaces(&args.prefix, args.members);
    let topology = Topology::create(&args.prefix, args.members).with_context(|| {
        if existing.is_empty() {
            "creating the lab's namespaces".to_owned()
        } else {
            format!(
                "a lab with prefix \"{}\" seems to exist already (try another --prefix)",
                args.prefix
            )
        }
    })?;
    let lab = LabCluster::new(
        topology,
        exe,
        ClusterOptions {
            keep_dir: args.keep,
            ..ClusterOptions::default()
        },
    )
    .context("writing the lab's configs")?;
    print_intro(&lab, exe);

    lab.start_all().context("starting the agents")?;
    wait_for_agents(&lab);
    Ok(lab)
}

/// The TCP and UDP echo servers in the server namespace, for `left` (and a little more).
fn start_echo_servers(topo: &Topology, left: Duration) -> anyhow::Result<[EchoServer; 2]> {
    let server_bounds = Bounds::new(1_000_000, left + Duration::from_secs(5));
    let tcp = tcp_echo_server(
        topo.server(),
        TCP_ADDR,
        Bounds::new(64, server_bounds.duration),
    )?;
    let udp = udp_echo_server(topo.server(), UDP_ADDR, server_bounds)?;
    Ok([tcp, udp])
}

/// The lab's traffic: a TCP and a UDP client in the client namespace, through the cluster to
/// the echo servers.
struct LabTraffic {
    start: Instant,
    /// `None` when the client could not connect.
    tcp: Option<TrafficClient>,
    udp: TrafficClient,
}

impl LabTraffic {
    /// Starts both clients for `left`.
    fn start(topo: &Topology, left: Duration) -> anyhow::Result<LabTraffic> {
        let start = Instant::now();
        let tcp = tcp_client(
            topo.client(),
            TCP_ADDR,
            TcpClientOptions {
                bounds: Bounds::new(left.as_secs() * 20 + 20, left),
                ..TcpClientOptions::default()
            },
        );
        let tcp = match tcp {
            Ok(c) => Some(c),
            Err(e) => {
                println!("TCP client could not connect: {e}");
                None
            }
        };
        let udp = udp_client(
            topo.client(),
            UDP_ADDR,
            UdpClientOptions {
                bounds: Bounds::new(left.as_secs() * 10 + 10, left),
                ..UdpClientOptions::default()
            },
        )?;
        Ok(LabTraffic { start, tcp, udp })
    }

    /// Stops both clients; what they did.
    fn stop(self) -> String {
        let tcp = self.tcp.map(|c| c.stop());
        let udp = self.udp.stop();
        traffic_lines(self.start, tcp.as_ref(), &udp)
    }
}

/// Shows the lab's status every second (redrawn on a terminal) until a signal or `duration`
/// since `start`.
fn show_until_stopped(
    lab: &LabCluster,
    exe: &Path,
    start: Instant,
    duration: Duration,
    traffic: &LabTraffic,
) {
    let tty = std::io::stdout().is_terminal();
    let mut next = Instant::now();
    while !interrupt::stopped() && start.elapsed() < duration {
        if Instant::now() >= next {
            let frame = status(lab, exe, start, duration, traffic);
            if tty {
                print!("\x1b[H\x1b[2J{frame}");
            } else {
                println!("{frame}");
            }
            next += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes the lab (its directory too, unless `keep`) and checks its namespaces are gone.
fn remove_lab(lab: LabCluster, keep: bool) -> anyhow::Result<()> {
    let dir = lab.dir().to_owned();
    let names: Vec<String> = lab.topology().namespaces().map(str::to_owned).collect();
    drop(lab);
    let left: Vec<&String> = names.iter().filter(|n| netns_exists(n)).collect();
    if !left.is_empty() {
        bail!("could not remove namespaces {left:?}: see the messages above");
    }
    println!("removed namespaces {}", names.join(", "));
    if keep {
        println!("kept {}", dir.display());
    }
    Ok(())
}

fn print_intro(lab: &LabCluster, exe: &Path) {
    let t = lab.topology();
    let fw = |k| t.fw(k);
    println!(
        "hasync lab: {} members, namespaces {}",
        t.members(),
        t.namespaces().collect::<Vec<_>>().join(", ")
    );
    println!(
        "lab dir {} (configs, agent logs fwK.log)",
        lab.dir().display()
    );
    println!("try, from another terminal:");
    println!("  ip netns exec {} ping -c 3 {SERVER_V4}", t.client());
    println!(
        "  ip -n {} link set ha4 down           # sync link down",
        fw(1)
    );
    println!(
        "  {} show cluster members --socket {}",
        exe.display(),
        lab.socket_path(1).display()
    );
    println!("Ctrl-C stops the lab and removes it.\n");
}

/// How long `members` agents get to start, together.
fn ready_timeout(members: usize) -> Duration {
    READY_TIMEOUT + READY_PER_MEMBER * u32::try_from(members).unwrap_or(u32::MAX)
}

/// Waits until every agent listens or has exited, at most [`ready_timeout`]; reports each.
fn wait_for_agents(lab: &LabCluster) {
    let members = lab.topology().member_ids();
    let deadline = Instant::now() + ready_timeout(members.len());
    for k in members {
        if interrupt::stopped() {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match lab.wait_ready(k, left) {
            Ok(()) => println!("fw{k}: agent ready"),
            Err(e) => println!("fw{k}: {e}"),
        }
    }
}

/// One frame of the live view: the agents, the traffic, and the cluster as the first running
/// agent sees it.
fn status(
    lab: &LabCluster,
    exe: &Path,
    start: Instant,
    duration: Duration,
    traffic: &LabTraffic,
) -> String {
    let t = lab.topology();
    let mut out = format!(
        "hasync lab — {} members — {} s of {} (Ctrl-C stops) — {}\n\nagents:\n",
        t.members(),
        start.elapsed().as_secs(),
        duration.as_secs(),
        lab.dir().display()
    );
    let mut running = None;
    for k in t.member_ids() {
        let state = lab.agent_state(k);
        if matches!(state, AgentState::Running { .. }) {
            running.get_or_insert(k);
        }
        out.push_str(&format!("  fw{k}: {}\n", agent_line(lab, k, state)));
    }
    let tcp = traffic.tcp.as_ref().map(TrafficClient::progress);
    out.push_str(&format!(
        "\ntraffic {CLIENT_V4} → {SERVER_V4} through fw1:\n{}\n",
        traffic_lines(traffic.start, tcp.as_ref(), &traffic.udp.progress())
    ));
    match running {
        None => out.push_str("\nno agent is running: no cluster view\n"),
        Some(k) => out.push_str(&cluster_view(lab, exe, k)),
    }
    out
}

/// Member `k`'s agent in `state`; when it exited, why (from its log).
fn agent_line(lab: &LabCluster, k: u8, state: AgentState) -> String {
    match state {
        AgentState::NotStarted => "not started".to_owned(),
        AgentState::Running { pid } => format!("running (pid {pid})"),
        AgentState::Exited { status } => {
            let tail = lab.log_tail(k, 20);
            let why = tail
                .lines()
                .find(|l| l.contains("error"))
                .or_else(|| tail.lines().rev().find(|l| !l.trim().is_empty()))
                .unwrap_or("");
            format!(
                "exited ({status}): {} (see {})",
                why.trim(),
                lab.log_path(k).display()
            )
        }
    }
}

/// The members and the session count as member `k` shows them, indented.
fn cluster_view(lab: &LabCluster, exe: &Path, k: u8) -> String {
    let socket = lab.socket_path(k);
    let mut out = String::new();
    for (title, args) in [
        ("cluster members", &["show", "cluster", "members"][..]),
        ("sessions", &["show", "cluster", "sessions", "--count"][..]),
    ] {
        out.push_str(&format!("\n{title} (as fw{k} sees them):\n"));
        let shown = show(exe, args, &socket);
        for line in shown.lines() {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn traffic_lines(traffic_start: Instant, tcp: Option<&Progress>, udp: &Progress) -> String {
    let ago = |p: &Progress| match p.last_ok {
        Some(t) => format!("last {:.1} s ago", t.elapsed().as_secs_f64()),
        None => format!("none yet in {:.0} s", traffic_start.elapsed().as_secs_f64()),
    };
    let tcp = match tcp {
        None => "  tcp :7000  not connected".to_owned(),
        Some(p) => format!(
            "  tcp :{TCP_PORT}  {} chunks echoed ({} KiB), {}, {} stalls{}",
            p.ok,
            p.bytes / 1024,
            ago(p),
            p.timeouts,
            p.fatal
                .as_ref()
                .map(|f| format!(", ENDED: {f}"))
                .unwrap_or_default()
        ),
    };
    let udp = format!(
        "  udp :{UDP_PORT}  {}/{} replies, {} lost, {}{}",
        udp.ok,
        udp.sent,
        udp.timeouts,
        ago(udp),
        udp.last_error
            .as_ref()
            .map(|e| format!(", last error: {e}"))
            .unwrap_or_default()
    );
    format!("{tcp}\n{udp}")
}

/// Runs `hasync ARGS --socket SOCKET`, at most [`SHOW_TIMEOUT`]; its output, or why there is
/// none.
fn show(exe: &Path, args: &[&str], socket: &Path) -> String {
    let mut child = match Command::new(exe)
        .args(args)
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return format!("cannot run {}: {e}", exe.display()),
    };
    let deadline = Instant::now() + SHOW_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                // Our own unreaped child: its PID cannot have been reused.
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut stdout);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut stderr);
    }
    match status {
        None => format!(
            "`hasync {}` took more than {} s",
            args.join(" "),
            SHOW_TIMEOUT.as_secs()
        ),
        Some(s) if s.success() => stdout.trim_end().to_owned(),
        Some(s) => format!(
            "`hasync {}` failed ({s}): {}",
            args.join(" "),
            stderr
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 16 members took about 50 s to start on a 2-CPU host; the lab gave them 10 s, and
    /// reported every one as timed out.
    #[test]
    fn agents_get_more_time_to_start_in_a_bigger_lab() {
        assert_eq!(ready_timeout(2), Duration::from_secs(20));
        assert!(
            ready_timeout(16) >= Duration::from_secs(60),
            "{:?}",
            ready_timeout(16)
        );
    }
}
