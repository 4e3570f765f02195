use std::sync::{
    atomic::{AtomicU32, Ordering},
    Arc,
};

use hasync_common::Counter;
use tokio::sync::mpsc;

use super::*;
use crate::control::{
    protocol::Response,
    testing::{answer, fake_runtime},
    ControlRequest,
};

/// The fake runtime's snapshot, with a table of 65,536.
async fn snapshot() -> Snapshot {
    let (tx, _runtime) = fake_runtime();
    Source::with_settings(tx, 65_536, "edge \"A\"")
        .snapshot()
        .await
        .expect("snapshot")
}

/// A fake runtime that counts the session counts it is asked for.
fn counting_runtime() -> (ControlSender, Arc<AtomicU32>) {
    let (tx, mut rx) = mpsc::channel::<ControlRequest>(8);
    let walks = Arc::new(AtomicU32::new(0));
    let counted = walks.clone();
    tokio::spawn(async move {
        while let Some((request, _, reply)) = rx.recv().await {
            if matches!(request, Request::ShowSessionCounts {}) {
                counted.fetch_add(1, Ordering::Relaxed);
            }
            let _ = reply.send(answer(request));
        }
    });
    (tx, walks)
}

#[tokio::test]
async fn the_exposition_names_every_metric_with_its_values() {
    let text = render(&snapshot().await);
    for line in [
        r#"hasync_cluster_info{cluster_id="7",local_member="1",description="edge \"A\""} 1"#,
        // Members: one line per state, 1 for the current one.
        r#"hasync_member_state{member="1",serial="FW-A",state="active"} 1"#,
        r#"hasync_member_state{member="1",serial="FW-A",state="initial"} 0"#,
        r#"hasync_member_state{member="12",serial="FW-LONG-SERIAL",state="down"} 1"#,
        r#"hasync_member_state{member="12",serial="FW-LONG-SERIAL",state="active"} 0"#,
        r#"hasync_member_state_age_seconds{member="1"} 3725"#,
        r#"hasync_member_flaps{member="12"} 3"#,
        r#"hasync_member_sessions_owned{member="1"} 2"#,
        r#"hasync_link_state{member="1",link="ha4",state="up"} 1"#,
        r#"hasync_link_state{member="12",link="ha4",state="down"} 1"#,
        r#"hasync_link_state{member="12",link="ha4-backup",state="not-configured"} 1"#,
        // The table.
        "hasync_sessions 3",
        r#"hasync_sessions_by_owner{owner="1"} 2"#,
        r#"hasync_sessions_by_owner{owner="2"} 1"#,
        "hasync_session_capacity 65536",
        r#"hasync_sessions_held{kind="owned"} 2"#,
        r#"hasync_sessions_held{kind="cached"} 1"#,
        "hasync_sessions_embryonic 2",
        "hasync_sessions_counted_age_seconds 2.0",
        "hasync_sessions_embryonic_capacity 8192",
        "hasync_replica_pool_sessions 3",
        "hasync_replica_pool_limit 49152",
        // Sync.
        r#"hasync_sync_records_sent_total{peer="2",link="ha4"} 120"#,
        r#"hasync_sync_frames_sent_total{peer="2",link="ha4"} 2"#,
        r#"hasync_sync_sent_bytes_total{peer="2",link="ha4"} 11000"#,
        r#"hasync_sync_acks_received_total{peer="2",link="ha4"} 1"#,
        r#"hasync_sync_link_failures_total{peer="2",link="ha4-backup"} 0"#,
        r#"hasync_sync_resends_total{peer="2"} 0"#,
        r#"hasync_sync_rejections_total{reason="bad-key"} 1"#,
        r#"hasync_sync_rejections_total{reason="wrong-cluster"} 0"#,
        r#"hasync_full_syncs_total{peer="2",direction="sent"} 1"#,
        r#"hasync_full_syncs_total{peer="2",direction="received"} 0"#,
        r#"hasync_full_sync_running{peer="2",direction="sent"} 0"#,
        r#"hasync_full_sync_last_duration_seconds{peer="2",direction="sent"} 0.812"#,
        r#"hasync_full_sync_last_records{peer="2",direction="sent"} 120"#,
        r#"hasync_replication_lag_seconds{peer="2",quantile="0.5"} 0.00425"#,
        r#"hasync_replication_lag_seconds{peer="2",quantile="0.99"} 0.00425"#,
        // The datapath.
        "hasync_datapath_packets_total 123456",
        "hasync_datapath_err_tcp_flags_total 2",
        "hasync_datapath_session_hits_total 0",
        // Types and units.
        "# TYPE hasync_sync_sent_bytes counter",
        "# UNIT hasync_sync_sent_bytes bytes",
        "# TYPE hasync_member_state gauge",
        "# TYPE hasync_cluster info",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing line {line}\n{text}"
        );
    }
    for c in Counter::ALL {
        let name = format!("hasync_{}_total ", datapath_metric(c.name()));
        assert!(text.contains(&name), "no {name}");
    }
    // No lag line before any sample, no duration before a completed full sync.
    assert!(!text.contains(r#"full_sync_last_duration_seconds{peer="2",direction="received"}"#));
    assert!(text.ends_with("# EOF\n"), "{text}");
    // Every sample line is `name{labels} value` with a number as value.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').expect(line);
        assert!(name.starts_with("hasync_"), "{line}");
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
}

#[test]
fn datapath_counter_names_become_metric_names() {
    assert_eq!(datapath_metric("session-hits"), "datapath_session_hits");
    assert_eq!(
        datapath_metric("pass-untracked-protocol"),
        "datapath_pass_untracked_protocol"
    );
}

#[tokio::test]
async fn the_session_count_is_cached_and_shared() {
    let (tx, walks) = counting_runtime();
    let source = Source::with_settings(tx, 1024, "");
    let (a, b) = tokio::join!(source.snapshot(), source.snapshot());
    assert_eq!(a.expect("a").sessions.total, 3);
    assert_eq!(b.expect("b").sessions.total, 3);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let c = source.snapshot().await.expect("c");
    assert!(
        c.sessions.counted_ms_ago.is_some_and(|ms| ms >= 2020),
        "a reused count is as old as it was, plus its time in the cache: {:?}",
        c.sessions.counted_ms_ago
    );
    assert_eq!(
        walks.load(Ordering::Relaxed),
        1,
        "one count for three scrapes"
    );
}

#[tokio::test]
async fn a_runtime_that_fails_or_stops_is_reported() {
    let (tx, mut rx) = mpsc::channel::<ControlRequest>(8);
    tokio::spawn(async move {
        while let Some((_, _, reply)) = rx.recv().await {
            let _ = reply.send(Response::error("reading the counters failed"));
        }
    });
    let e = Source::with_settings(tx, 1, "")
        .snapshot()
        .await
        .expect_err("fails");
    assert_eq!(
        e.to_string(),
        "the show-members request failed: reading the counters failed"
    );

    let (tx, rx) = mpsc::channel::<ControlRequest>(8);
    drop(rx);
    let e = Source::with_settings(tx, 1, "")
        .snapshot()
        .await
        .expect_err("stopped");
    assert!(matches!(e, GatherError::ShuttingDown), "{e}");
}

/// The alert rules and the Grafana dashboard shipped in `monitoring/` name only metrics an
/// agent exposes (a renamed metric would silence an alert), the dashboard is well formed, and
/// promtool (which `cargo xtask setup` installs) accepts the rules.
#[tokio::test]
async fn shipped_rules_and_dashboard_use_only_exposed_metrics() {
    const RULES: &str = include_str!("../../monitoring/prometheus-rules.yml");
    const DASHBOARD: &str = include_str!("../../monitoring/grafana-dashboard.json");
    let exposed = render(&snapshot().await);
    let families: std::collections::BTreeSet<&str> = exposed
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let known = |name: &str| {
        families.contains(name)
            || ["_total", "_info"]
                .iter()
                .any(|s| name.strip_suffix(s).is_some_and(|f| families.contains(f)))
    };
    let named = |text: &str| -> Vec<String> {
        let mut out = Vec::new();
        for (i, _) in text.match_indices("hasync_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            out.push(name);
        }
        out
    };
    let unknown: Vec<String> = named(RULES)
        .into_iter()
        .chain(named(DASHBOARD))
        .filter(|n| !known(n))
        .collect();
    assert!(unknown.is_empty(), "not exposed: {unknown:?}\n{exposed}");
    assert_eq!(RULES.matches("- alert: ").count(), 5);

    let d: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboard JSON");
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = std::collections::BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "duplicate id: {p}"
        );
        assert!(p["gridPos"]["w"].as_u64().is_some(), "{p}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(
            !targets.is_empty() && targets.iter().all(|t| t["expr"].is_string()),
            "{p}"
        );
    }

    let dir = std::env::temp_dir().join(format!("hasync-rules-{}", std::process::id()));
    crate::files::fresh_dir(&dir, 0o755).expect("temp dir");
    let file = dir.join("rules.yml");
    std::fs::write(&file, RULES).expect("write rules");
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.expect("promtool (`cargo xtask setup` installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("SUCCESS: 5 rules found"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Scrapes at the same moment (many clients of a non-loopback `[local] http`, a dashboard in
/// many tabs) share one gather: the runtime, whose loop also drains the datapath's events, is
/// asked once per view (before stop 42, three or four times per scrape: seen failing, 97).
#[tokio::test]
async fn concurrent_scrapes_share_one_gather() {
    let (tx, mut rx) = mpsc::channel::<ControlRequest>(64);
    let asked = Arc::new(AtomicU32::new(0));
    let counted = asked.clone();
    tokio::spawn(async move {
        while let Some((request, _, reply)) = rx.recv().await {
            counted.fetch_add(1, Ordering::Relaxed);
            let _ = reply.send(answer(request));
        }
    });
    let source = Source::with_settings(tx, 65_536, "");
    let scrapes: Vec<_> = (0..32)
        .map(|_| {
            let source = source.clone();
            tokio::spawn(async move { source.snapshot().await })
        })
        .collect();
    for scrape in scrapes {
        scrape.await.expect("join").expect("snapshot");
    }
    let asked = asked.load(Ordering::Relaxed);
    assert!(asked <= 4, "the runtime was asked {asked} times");
}

/// A runtime that takes requests and never answers: scrapes waiting for the one gather under
/// way get its failure, not one gather of their own each, one after the other (before the
/// review of stop 42's change the fourth waited four answer timeouts: seen failing).
#[tokio::test]
async fn scrapes_waiting_for_a_failing_gather_share_its_failure() {
    let (tx, mut rx) = mpsc::channel::<ControlRequest>(64);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(request) = rx.recv().await {
            held.push(request);
        }
    });
    let source = Source::with_settings(tx, 65_536, "");
    let started = tokio::time::Instant::now();
    let scrapes: Vec<_> = (0..4)
        .map(|_| {
            let source = source.clone();
            tokio::spawn(async move { source.snapshot().await })
        })
        .collect();
    for scrape in scrapes {
        let e = scrape.await.expect("join").expect_err("no answer");
        assert!(matches!(e, GatherError::Timeout { .. }), "{e}");
    }
    let took = started.elapsed();
    assert!(
        took < ANSWER_TIMEOUT + Duration::from_secs(2),
        "four scrapes took {took:?}"
    );
}

/// A runtime that answers each request just under the answer timeout: a scrape ends within
/// one timeout, not one per view (before: about four, past Prometheus's scrape timeout;
/// seen failing).
#[tokio::test]
async fn a_slow_runtime_costs_a_scrape_one_answer_timeout() {
    let (tx, mut rx) = mpsc::channel::<ControlRequest>(64);
    tokio::spawn(async move {
        while let Some((request, _, reply)) = rx.recv().await {
            tokio::spawn(async move {
                tokio::time::sleep(ANSWER_TIMEOUT - Duration::from_millis(800)).await;
                let _ = reply.send(answer(request));
            });
        }
    });
    let source = Source::with_settings(tx, 65_536, "");
    let started = tokio::time::Instant::now();
    let e = source.snapshot().await.expect_err("too slow");
    assert!(matches!(e, GatherError::Timeout { .. }), "{e}");
    let took = started.elapsed();
    assert!(took < ANSWER_TIMEOUT + Duration::from_secs(1), "{took:?}");
}
