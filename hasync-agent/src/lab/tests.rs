//! Lab tests: they build real namespaces, so they run as root (as CI does).

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    time::{Duration, Instant},
};

use super::{
    cluster::AgentState,
    netns::netns_exists,
    topology::{CLIENT_V4, SERVER_V4, SERVER_V6},
    traffic::{
        ping, tcp_client, tcp_echo_server, udp_client, udp_echo_server, Bounds, TcpClientOptions,
        UdpClientOptions,
    },
    ClusterOptions, LabCluster, LabError, Link, Signal, Topology,
};

/// A prefix no other test (or concurrent run) uses.
fn prefix(tag: &str) -> String {
    super::topology::test_prefix(tag).expect("test prefix")
}

/// Packets member `k` received on `link`.
fn rx_packets(topo: &Topology, k: u8, link: Link) -> u64 {
    let json = topo
        .ip(
            &format!("fw{k}"),
            &["-j", "-s", "link", "show", link.ifname()],
        )
        .expect("ip -s link");
    let v: serde_json::Value = serde_json::from_str(&json).expect("ip -j output");
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .expect("rx packets")
}

#[test]
fn bad_arguments_are_refused_before_anything_is_created() {
    for (prefix, members, want) in [
        ("a/b-", 2, "lab prefix \"a/b-\""),
        ("x-", 0, "0 members is out of range 1–16"),
        ("x-", 17, "17 members is out of range 1–16"),
    ] {
        let e = Topology::create(prefix, members).expect_err("refused");
        assert!(e.to_string().contains(want), "{e}");
    }
}

/// The whole path: ping and a long-lived TCP connection through fw1; steered to fw2 the same
/// connection goes on through fw2; an nftables drop on fw2 stalls it and lifting the drop
/// resumes it; every namespace is gone afterwards.
#[test]
fn traffic_goes_through_the_member_it_is_steered_to() {
    let prefix = prefix("lt");
    let topo = Topology::create(&prefix, 2).expect("create the lab");
    let names: Vec<String> = topo.namespaces().map(str::to_owned).collect();
    assert_eq!(names.len(), 5);
    assert!(names.iter().all(|n| netns_exists(n)));
    assert_eq!(topo.ns("fw2"), format!("{prefix}fw2"));

    // A second lab with the same names is refused, naming them.
    match Topology::create(&prefix, 2) {
        Err(LabError::NamespacesExist { names: existing }) => {
            assert_eq!(existing.len(), 5, "{existing:?}");
            let msg = LabError::NamespacesExist { names: existing }.to_string();
            assert!(msg.contains(&format!("ip netns del {prefix}hasw")), "{msg}");
        }
        other => panic!("expected NamespacesExist, got {other:?}"),
    }

    ping(topo.client(), IpAddr::V4(SERVER_V4), 2).expect("ping through fw1");
    ping(topo.client(), IpAddr::V6(SERVER_V6), 2).expect("ping6 through fw1");

    let tcp_addr: SocketAddr = (SERVER_V4, 7000).into();
    let udp_addr: SocketAddr = (SERVER_V4, 7001).into();
    let bounds = Bounds::new(1000, Duration::from_secs(60));
    let _tcp_server = tcp_echo_server(topo.server(), tcp_addr, Bounds::new(4, bounds.duration))
        .expect("TCP echo server");
    let _udp_server = udp_echo_server(topo.server(), udp_addr, bounds).expect("UDP echo server");
    let fw1_before = rx_packets(&topo, 1, Link::In);
    let tcp = tcp_client(
        topo.client(),
        tcp_addr,
        TcpClientOptions {
            interval: Duration::from_millis(20),
            io_timeout: Duration::from_millis(100),
            bounds,
            ..TcpClientOptions::default()
        },
    )
    .expect("connect through fw1");
    let udp = udp_client(
        topo.client(),
        udp_addr,
        UdpClientOptions {
            interval: Duration::from_millis(20),
            bounds,
            ..UdpClientOptions::default()
        },
    )
    .expect("UDP client");
    tcp.wait_until(Duration::from_secs(5), |p| p.ok >= 5)
        .expect("echoes through fw1");
    udp.wait_until(Duration::from_secs(5), |p| p.ok >= 5)
        .expect("UDP replies through fw1");
    assert!(rx_packets(&topo, 1, Link::In) >= fw1_before + 10);

    // Steered to fw2: the same connection goes on, and fw2 carries it.
    topo.steer(2).expect("steer to fw2");
    let steered = Instant::now();
    let fw2_before = rx_packets(&topo, 2, Link::In);
    tcp.wait_ok_after(steered, Duration::from_secs(5))
        .expect("echoes through fw2");
    udp.wait_ok_after(steered, Duration::from_secs(5))
        .expect("UDP replies through fw2");
    let p = tcp
        .wait_until(Duration::from_secs(5), |p| {
            p.last_ok.is_some_and(|t| t > steered) && p.ok >= 15
        })
        .expect("more echoes through fw2");
    assert!(p.fatal.is_none(), "{p:?}");
    assert!(rx_packets(&topo, 2, Link::In) >= fw2_before + 5);

    // A fresh connection, plain std::net in a thread inside the client namespace.
    let hello = super::run_in(topo.client(), move || -> std::io::Result<Vec<u8>> {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect_timeout(&tcp_addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(b"hello")?;
        let mut buf = [0; 5];
        s.read_exact(&mut buf)?;
        Ok(buf.to_vec())
    })
    .expect("enter client")
    .expect("echo over a new connection");
    assert_eq!(hello, b"hello");

    // Faults: fw2 drops everything on in0 → the connection stalls; lifted → it resumes.
    topo.drop_with_nft(2, Link::In, 100).expect("nft drop");
    std::thread::sleep(Duration::from_millis(300));
    let dropped = Instant::now();
    let stalled = tcp.progress();
    std::thread::sleep(Duration::from_millis(500));
    let still = tcp.progress();
    assert_eq!(still.ok, stalled.ok, "echoes while fw2 drops: {still:?}");
    assert!(still.timeouts > stalled.timeouts, "{still:?}");
    topo.undrop_nft(2, Link::In).expect("nft undrop");
    tcp.wait_ok_after(dropped, Duration::from_secs(10))
        .expect("the connection resumes once the drop is lifted");

    // Link down and up on a member: visible with ip.
    topo.link_down(2, Link::Ha4).expect("ha4 down");
    let shown = topo
        .ip("fw2", &["-o", "link", "show", "ha4"])
        .expect("show");
    assert!(!shown.contains(",UP"), "{shown}");
    topo.link_up(2, Link::Ha4).expect("ha4 up");
    topo.cable_down(1, Link::Ha4Backup).expect("cable down");
    let shown = topo
        .ip("fw1", &["-o", "link", "show", "ha4b"])
        .expect("show");
    assert!(shown.contains("NO-CARRIER"), "{shown}");
    topo.cable_up(1, Link::Ha4Backup).expect("cable up");

    let tcp = tcp.stop();
    let udp = udp.stop();
    assert!(tcp.done && tcp.fatal.is_none(), "{tcp:?}");
    assert!(udp.ok >= 10, "{udp:?}");

    drop(topo);
    let left: Vec<_> = names.iter().filter(|n| netns_exists(n)).collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

/// Agents run inside their member's namespace (and see bpffs), are signalled by PID, and are
/// stopped with the lab. The "agent" is a script standing in for hasync.
#[test]
fn agents_run_in_their_namespace_and_stop_with_the_lab() {
    let prefix = prefix("la");
    let topo = Topology::create(&prefix, 2).expect("create the lab");
    let names: Vec<String> = topo.namespaces().map(str::to_owned).collect();
    let scripts = std::env::temp_dir().join(format!("hasync-lab-fake-{}", std::process::id()));
    crate::files::fresh_dir(&scripts, 0o755).expect("script dir");
    let fake = scripts.join("fake-hasync");
    // $1 = agent, $2 = --config, $3 = the config file.
    std::fs::write(
        &fake,
        "#!/bin/sh\n\
         ip -o addr show dev ha4 > \"$3.where\"\n\
         grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts && echo bpffs >> \"$3.where\"\n\
         echo lab-script-done >> \"$3.where\"\n\
         echo started\n\
         exec sleep 30\n",
    )
    .expect("write script");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    let lab = LabCluster::new(topo, &fake, ClusterOptions::default()).expect("lab cluster");
    let dir = lab.dir().to_owned();
    assert!(lab.config_path(2).exists());
    assert_eq!(lab.agent_state(1), AgentState::NotStarted);
    lab.start_all().expect("start");
    assert!(matches!(
        lab.start_agent(1),
        Err(LabError::AgentRunning { member: 1, .. })
    ));
    let where1 = lab.config_path(1).with_extension("toml.where");
    let text = super::netns::wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(&where1)
            .ok()
            .filter(|t| t.contains("lab-script-done"))
    })
    .expect("the fake agent reports where it runs");
    assert!(text.contains("198.18.100.1/24"), "{text}");
    let host_has_bpffs = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .contains(" /sys/fs/bpf bpf ");
    if host_has_bpffs {
        assert!(
            text.contains("bpffs"),
            "bpffs hidden from the agent: {text}"
        );
    }
    super::netns::wait_for(Duration::from_secs(5), || {
        lab.log_tail(1, 5).contains("started").then_some(())
    })
    .expect("stdout goes to fw1.log");

    // Hang and resume, then crash.
    lab.kill_agent(2, Signal::Stop).expect("SIGSTOP");
    lab.kill_agent(2, Signal::Cont).expect("SIGCONT");
    lab.kill_agent(2, Signal::Kill).expect("SIGKILL");
    super::netns::wait_for(Duration::from_secs(5), || {
        matches!(lab.agent_state(2), AgentState::Exited { .. }).then_some(())
    })
    .expect("killed");
    assert!(!lab.agent_running(2));
    assert!(matches!(
        lab.kill_agent(2, Signal::Term),
        Err(LabError::AgentNotRunning { member: 2 })
    ));
    // Restarted.
    let pid = lab.start_agent(2).expect("restart");
    assert_eq!(lab.agent_pid(2), Some(pid));
    let pid1 = lab.agent_pid(1).expect("fw1 runs");

    drop(lab);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid1}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid1}/cmdline"))
                .map(|c| !c.contains("sleep"))
                .unwrap_or(true),
        "agent {pid1} still runs"
    );
    assert!(!dir.exists(), "lab dir {} left behind", dir.display());
    let left: Vec<_> = names.iter().filter(|n| netns_exists(n)).collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&scripts);
}

#[test]
fn client_and_server_addresses_are_lab_addresses() {
    for ip in [
        IpAddr::V4(CLIENT_V4),
        IpAddr::V4(SERVER_V4),
        IpAddr::V6(SERVER_V6),
    ] {
        assert!(super::netns::is_lab_address(ip), "{ip}");
    }
    for k in 1..=16 {
        for link in Link::ALL {
            assert!(super::netns::is_lab_address(link.v4(k).0.into()));
            if let Some((a, _)) = link.v6(k) {
                assert!(super::netns::is_lab_address(a.into()));
            }
        }
    }
}
