//! The dashboard and `/metrics` of a running member, as a person and Prometheus see them: a lab
//! of two members, Debian's headless Chromium inside fw1's namespace loading fw1's dashboard
//! (`[local] http`, loopback by default: each namespace has its own), the rendered DOM read
//! back, and a screenshot kept as a test artifact.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use hasync_agent::{
    config::DEFAULT_HTTP,
    lab::{netns::run_in, topology::SERVER_V4, traffic::ping, ClusterOptions},
};
use hasync_tests::cluster::Cluster;

/// How long one Chromium run may take before it is killed.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(90);

/// Chromium's flags for one headless page load: no sandbox (root), nothing fetched from
/// anywhere but the page, a fresh profile, and 5 s of page time to poll `/api/cluster`.
fn chromium_flags(profile: &Path) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--virtual-time-budget=5000",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect()
}

/// Kills Chromium's process group (it was made the group leader) and reaps it.
fn kill_group(child: &mut Child) {
    if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill has no memory preconditions; the group is the one this child leads, and
        // the child is not reaped yet, so its id cannot have been reused.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    let _ = child.wait();
}

/// Runs Chromium in `c`'s member `fw1` with `args`, stdout to `out`; kills it (its whole
/// process group) after [`CHROMIUM_TIMEOUT`]. Returns its stderr on failure.
fn chromium(c: &Cluster, args: &[String], out: &Path) -> Result<(), String> {
    let profile = c.dir().join(format!(
        "chromium-profile-{}",
        out.file_name().map_or("x".into(), |n| n.to_string_lossy())
    ));
    std::fs::create_dir_all(&profile).map_err(|e| format!("profile dir: {e}"))?;
    let err_path = out.with_extension("stderr");
    let stdout = std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let stderr =
        std::fs::File::create(&err_path).map_err(|e| format!("{}: {e}", err_path.display()))?;
    let mut cmd = c
        .topology()
        .command("fw1", "chromium")
        .map_err(|e| e.to_string())?;
    cmd.args(chromium_flags(&profile))
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        // Its own process group, so a timeout ends the renderer and helpers too.
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting chromium (is Debian's `chromium` installed? `cargo xtask setup` installs it): {e}"))?;
    let deadline = Instant::now() + CHROMIUM_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                kill_group(&mut child);
                return Err(format!(
                    "chromium did not finish within {} s (killed)",
                    CHROMIUM_TIMEOUT.as_secs()
                ));
            }
            Err(e) => {
                kill_group(&mut child);
                return Err(format!("waiting for chromium: {e}"));
            }
        }
    };
    // Helpers it left behind, if any.
    kill_group(&mut child);
    let _ = std::fs::remove_dir_all(&profile);
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "chromium exited with {status}:\n{}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        ))
    }
}

/// The opening tag and the text right after it of the element with `data-test="name"`.
fn element<'a>(dom: &'a str, name: &str) -> Option<(&'a str, &'a str)> {
    let at = dom.find(&format!("data-test=\"{name}\""))?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    let text = &dom[end + 1..];
    let text = &text[..text.find('<').unwrap_or(text.len())];
    Some((&dom[start..=end], text))
}

/// Attribute `attr` of an opening tag.
fn attribute<'a>(tag: &'a str, attr: &str) -> Option<&'a str> {
    let at = tag.find(&format!(" {attr}=\""))? + attr.len() + 3;
    let len = tag[at..].find('"')?;
    Some(&tag[at..at + len])
}

/// The workspace's target directory (`$CARGO_TARGET_DIR` or `<root>/target`).
fn target_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned();
    match std::env::var_os("CARGO_TARGET_DIR").filter(|t| !t.is_empty()) {
        Some(t) if Path::new(&t).is_absolute() => PathBuf::from(t),
        Some(t) => root.join(t),
        None => root.join("target"),
    }
}

/// `GET path` on fw1's HTTP server, from inside fw1.
fn http_get(c: &Cluster, path: &str) -> Result<String, String> {
    let addr: SocketAddr = DEFAULT_HTTP.parse().expect("default address");
    assert_eq!(addr.ip(), Ipv4Addr::LOCALHOST);
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    run_in(c.topology().fw(1), move || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request.as_bytes())?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        Ok(raw)
    })
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("GET {path} on fw1: {e}"))
}

#[test]
fn the_dashboard_shows_a_healthy_two_member_cluster() {
    // The ping's session outlives the checks below (its default timeout is 6 s).
    let c = Cluster::start(
        "dash",
        2,
        ClusterOptions {
            timeouts: [("icmp-echo".to_owned(), 300)].into(),
            ..ClusterOptions::default()
        },
    );
    // Both members active, and fw1's sync links up to fw2.
    c.wait(
        "fw1 to see both members active with HA4 and HA4 backup up",
        Duration::from_secs(30),
        || {
            let m = c.try_members(1)?;
            let ok = m.members.len() == 2
                && m.members
                    .iter()
                    .all(|v| v.state == "active" && v.ha4 == "up" && v.ha4_backup == "up");
            ok.then_some(()).ok_or_else(|| format!("{m:?}"))
        },
    );
    // A session to show in the table.
    ping(c.topology().client(), SERVER_V4.into(), 2)
        .unwrap_or_else(|e| c.fail(&format!("ping through fw1: {e}")));

    // Prometheus' view first: plain HTTP inside fw1.
    let metrics = http_get(&c, "/metrics").unwrap_or_else(|e| c.fail(&e));
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for line in [
        r#"hasync_member_state{member="1",serial="fw1",state="active"} 1"#,
        r#"hasync_member_state{member="2",serial="fw2",state="active"} 1"#,
        r#"hasync_link_state{member="2",link="ha4",state="up"} 1"#,
        r#"hasync_link_state{member="2",link="ha4-backup",state="up"} 1"#,
        "hasync_session_capacity 65536",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in /metrics:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("\nhasync_datapath_packets_total "),
        "{metrics}"
    );
    assert!(metrics.trim_end().ends_with("# EOF"), "{metrics}");

    // A few samples for the graphs (one every 2 s since the agent started).
    c.wait(
        "three samples in /api/history",
        Duration::from_secs(15),
        || {
            let raw = http_get(&c, "/api/history")?;
            let n = raw.matches("\"owned\":").count();
            (n >= 3).then_some(()).ok_or(format!("{n} samples"))
        },
    );

    // Session counts are those of the expiry sweep's last pass (a pass at the latest the
    // shortest timeout after the last one started: 10 s with this lab's timeouts), reused for
    // 5 s: one from before the ping may still be served. Wait until the count includes the
    // ping's session.
    c.wait(
        "fw1's session count to include the ping's session",
        Duration::from_secs(30),
        || {
            let raw = http_get(&c, "/api/cluster")?;
            let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            let api: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
            let total = api["sessions"]["total"].as_u64().unwrap_or(0);
            (total >= 1)
                .then_some(())
                .ok_or(format!("{total} sessions"))
        },
    );

    // The page as Chromium renders it, after 5 s of polling.
    let url = format!("http://{DEFAULT_HTTP}/");
    let dom_path = c.dir().join("dashboard-dom.html");
    chromium(&c, &["--dump-dom".into(), url.clone()], &dom_path)
        .unwrap_or_else(|e| c.fail(&format!("dumping the dashboard's DOM: {e}")));
    let dom = std::fs::read_to_string(&dom_path).expect("the dumped DOM");
    let get = |name: &str| {
        element(&dom, name).unwrap_or_else(|| panic!("no data-test={name} in the DOM:\n{dom}"))
    };
    let (tag, text) = get("updated");
    assert_eq!(attribute(tag, "data-live"), Some("true"), "{text}\n{dom}");
    let (tag, text) = get("cluster-state");
    assert_eq!(
        (text, attribute(tag, "data-state")),
        ("healthy", Some("healthy")),
        "{dom}"
    );
    assert_eq!(get("member-count").1, "2");
    assert_eq!(get("members-active").1, "2");
    assert_eq!(get("cluster-id").1, "7");
    for link in ["ha4", "ha4-backup"] {
        let (tag, _) = get(&format!("{link}-indicator"));
        assert_eq!(attribute(tag, "data-status"), Some("up"), "{link}: {tag}");
        assert_eq!(attribute(tag, "data-color"), Some("green"), "{link}: {tag}");
        assert_eq!(get(&format!("{link}-status")).1, "Up");
        assert_eq!(get(&format!("{link}-errors")).1, "0");
    }
    assert_eq!(get("sessions-capacity").1, "65,536");
    let total: u64 = get("sessions-total")
        .1
        .replace(',', "")
        .parse()
        .expect("a session count");
    assert!(total >= 1, "the ping's session: {total}");
    let number = |name: &str| -> u64 {
        let text = get(name).1;
        text.replace(',', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}: `{text}` is not a number"))
    };
    // Owned here and peers' copies make the total (both counted in one walk).
    assert_eq!(number("sessions-owned") + number("sessions-cached"), total);
    assert!(number("sessions-embryonic-capacity") > 0);
    // The sweep's counts or a walk's, and the page says which.
    let age = get("sessions-age").1;
    assert!(age.starts_with("counted by "), "sessions-age: `{age}`");
    let (tag, _) = get("sessions-warning");
    assert!(tag.contains(" hidden"), "no warning below 90 %: {tag}");
    let (tag, _) = get("member-faults");
    assert!(
        tag.contains(" hidden"),
        "a healthy member shows no fault: {tag}"
    );
    let rows: Vec<&str> = dom
        .match_indices("data-test=\"member\"")
        .map(|(i, _)| {
            let start = dom[..i].rfind('<').expect("tag start");
            &dom[start..i + dom[i..].find('>').expect("tag end")]
        })
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (row, id) in rows.iter().zip(["1", "2"]) {
        assert_eq!(attribute(row, "data-member-id"), Some(id), "{row}");
        assert_eq!(attribute(row, "data-state"), Some("active"), "{row}");
    }

    // The last 15 minutes, graphed: a line per series, drawn from the agent's samples.
    let series = |graph: &str| -> Vec<(String, usize)> {
        let (_, _) = get(graph);
        let at = dom.find(&format!("data-test=\"{graph}\"")).expect("graph");
        let svg = &dom[at..at + dom[at..].find("</svg>").expect("svg end")];
        svg.match_indices("<polyline")
            .map(|(i, _)| {
                let tag = &svg[i..i + svg[i..].find('>').expect("tag end")];
                let name = attribute(tag, "data-series").unwrap_or_default().to_owned();
                let points = attribute(tag, "data-points").and_then(|p| p.parse().ok());
                (name, points.unwrap_or(0))
            })
            .collect()
    };
    let sessions = series("graph-sessions");
    let names: Vec<&str> = sessions.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["owned", "cached"], "{sessions:?}");
    assert!(sessions.iter().all(|(_, p)| *p >= 2), "{sessions:?}");
    let records = series("graph-records");
    assert!(
        records.iter().any(|(n, p)| n == "member 2" && *p >= 1),
        "{records:?}"
    );
    let errors = series("graph-errors");
    let names: Vec<&str> = errors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["ha4", "ha4-backup"], "{errors:?}");

    // And a picture of it, kept.
    let artifacts = target_dir().join("test-artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let png = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    chromium(
        &c,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1200,1500".into(),
            "--hide-scrollbars".into(),
            url,
        ],
        &c.dir().join("dashboard-screenshot.out"),
    )
    .unwrap_or_else(|e| c.fail(&format!("taking the dashboard's screenshot: {e}")));
    let bytes = std::fs::read(&png).expect("the screenshot");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(bytes.len() > 10_000, "a {} byte screenshot", bytes.len());
    println!("dashboard screenshot: {}", png.display());
}
