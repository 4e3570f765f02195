//! A host without the key floods a member's HA4 listener with idle connections while the
//! member runs under systemd's default soft limit of 1024 descriptors, and its peer has to
//! reconnect meanwhile. The member must keep its descriptors bounded, never mistake a failure
//! to open a socket for its link going down, and let the real peer back in.

use std::{
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use hasync_agent::{
    config::DEFAULT_SYNC_PORT,
    lab::{netns, topology::Link, ClusterOptions, Signal},
};
use hasync_tests::cluster::Cluster;

/// Connections the flood holds at once, as in the measurement.
const HELD: usize = 1500;
/// How long the flood lasts (rounds of `HELD` connections, each held `ROUND`).
const FLOOD: Duration = Duration::from_secs(15);
const ROUND: Duration = Duration::from_secs(4);
/// The most descriptors the flooded agent may hold.
const MAX_FDS: usize = 256;
/// An address on the HA4 segment that no member has.
const ATTACKER: &str = "198.18.100.250";

/// Opens up to `HELD` connections to `to`, holds them for `ROUND`, drops them, again until
/// `FLOOD` has passed. Returns how many connections were opened in all.
fn flood(to: SocketAddr) -> usize {
    let end = Instant::now() + FLOOD;
    let mut opened = 0;
    while Instant::now() < end {
        let round_end = (Instant::now() + ROUND).min(end);
        let mut held = Vec::with_capacity(HELD);
        while held.len() < HELD && Instant::now() < round_end {
            match TcpStream::connect_timeout(&to, Duration::from_millis(500)) {
                Ok(s) => held.push(s),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        opened += held.len();
        std::thread::sleep(round_end.saturating_duration_since(Instant::now()));
    }
    opened
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn an_unauthenticated_flood_neither_exhausts_descriptors_nor_splits_the_cluster() {
    let c = Cluster::start("flood-", 2, ClusterOptions::default());
    for k in [1, 2] {
        c.wait_active(k, Duration::from_secs(20));
    }
    let topo = c.topology();
    let pid2 = c
        .agent_pid(2)
        .unwrap_or_else(|| c.fail("fw2's agent has no pid"));
    let limit = Command::new("prlimit")
        .args(["--pid", &pid2.to_string(), "--nofile=1024:4096"])
        .status()
        .unwrap_or_else(|e| c.fail(&format!("prlimit: {e}")));
    assert!(limit.success(), "prlimit failed");
    topo.ip(
        "hasw",
        &[
            "addr",
            "add",
            &format!("{ATTACKER}/24"),
            "dev",
            Link::Ha4.bridge(),
        ],
    )
    .unwrap_or_else(|e| c.fail(&format!("the attacker's address: {e}")));

    let (fw2_ha4, _) = Link::Ha4.v4(2);
    let target = SocketAddr::new(fw2_ha4.into(), DEFAULT_SYNC_PORT);
    let flooder = netns::spawn_in(topo.hasw(), move || flood(target));

    // fw1 restarts during the flood: it must get its connections to fw2 back.
    std::thread::sleep(Duration::from_secs(2));
    c.kill_agent(1, Signal::Kill)
        .unwrap_or_else(|e| c.fail(&format!("SIGKILL fw1: {e}")));
    std::thread::sleep(Duration::from_millis(500));
    c.start_member(1);
    let mut max_fds = 0;
    c.wait(
        "fw2 to see fw1's links up again during the flood",
        Duration::from_secs(10),
        || {
            max_fds = max_fds.max(open_fds(pid2));
            let m = c.try_member(2, 1)?;
            (m.ha4 == "up" && m.ha4_backup == "up")
                .then_some(())
                .ok_or(format!("ha4 {}, ha4 backup {}", m.ha4, m.ha4_backup))
        },
    );
    while !flooder.is_finished() {
        max_fds = max_fds.max(open_fds(pid2));
        std::thread::sleep(Duration::from_millis(100));
    }
    let opened = flooder
        .join()
        .unwrap_or_else(|_| c.fail("the flood thread panicked"))
        .unwrap_or_else(|e| c.fail(&format!("the flood: {e}")));
    eprintln!("flood: {opened} connections opened; fw2 held at most {max_fds} descriptors");
    assert!(opened >= HELD, "the flood opened only {opened} connections");
    assert!(
        max_fds < MAX_FDS,
        "fw2 held {max_fds} descriptors under the flood{}",
        c.logs_of([2])
    );
    let log = c.log_tail(2, 10_000);
    for bad in ["Too many open files", "local interface down"] {
        assert!(
            !log.contains(bad),
            "fw2's log says {bad:?}{}",
            c.logs_of([2])
        );
    }
    let refused = c.statistics(2).rejected.get("unknown-address").copied();
    assert!(
        refused.is_some_and(|n| n > 0),
        "fw2 counted no unknown-address refusals: {refused:?}"
    );
    // And the cluster still syncs: fw2 stays active with fw1 alive.
    let m = c.try_member(2, 1).unwrap_or_else(|e| c.fail(&e));
    assert_eq!(m.ha4, "up", "{m:?}");
}
