use super::*;
use crate::control::{
    testing::fake_runtime,
    view::{LinkStatisticsView, MemberView, PeerStatisticsView},
};

fn member(id: u8, state: &str, ha4: &str, ha4_backup: &str) -> MemberView {
    MemberView {
        id,
        serial: format!("fw{id}"),
        state: state.into(),
        ha4: ha4.into(),
        ha4_backup: ha4_backup.into(),
        sessions_owned: 0,
        flaps: 0,
        version: None,
        last_change: None,
    }
}

/// Members 1 (local) … n with these HA4 link states, all active.
fn cluster(local_ha4: &str, peers: &[&str]) -> MembersView {
    let mut members = vec![member(1, "active", local_ha4, "not-configured")];
    for (i, state) in peers.iter().enumerate() {
        let id = u8::try_from(i + 2).unwrap();
        members.push(member(id, "active", state, "not-configured"));
    }
    MembersView {
        cluster_id: hasync_common::ClusterId(7),
        local: 1,
        members,
        faults: Vec::new(),
        warnings: Vec::new(),
    }
}

#[test]
fn link_indicators_follow_the_links_to_every_peer() {
    let none = StatisticsView::default();
    // Each row: the local interface, the link to each peer, the indicator.
    for (local, peers, want) in [
        ("up", &["up", "up"][..], "up"),
        ("up", &["up", "down"], "partial"),
        ("up", &["down", "down"], "down"),
        ("up", &["up", "not-configured"], "up"),
        ("up", &["up", "unknown-future-state"], "partial"),
        ("down", &["up"], "down"),
        ("not-configured", &["up"], "not-configured"),
        (
            "up",
            &["not-configured", "not-configured"],
            "not-configured",
        ),
        // Alone: the local interface decides.
        ("up", &[], "up"),
        ("down", &[], "down"),
    ] {
        let s = link_summary(&cluster(local, peers), &none, LinkKind::Ha4);
        assert_eq!(s.status, want, "local {local}, peers {peers:?}");
        assert_eq!(
            s.up + s.down,
            peers.iter().filter(|p| **p != "not-configured").count()
        );
    }
    let s = link_summary(&cluster("up", &["up", "down", "up"]), &none, LinkKind::Ha4);
    assert_eq!((s.up, s.down), (2, 1));
    // The backup link is configured nowhere here.
    let s = link_summary(&cluster("up", &["up"]), &none, LinkKind::Ha4Backup);
    assert_eq!(s.status, "not-configured");
}

#[test]
fn link_errors_add_up_the_failures_to_every_peer() {
    let link = |failures| LinkStatisticsView {
        failures,
        ..LinkStatisticsView::default()
    };
    let peer = |id, ha4, backup: Option<u64>| PeerStatisticsView {
        id,
        links: [("ha4".to_owned(), link(ha4))]
            .into_iter()
            .chain(backup.map(|b| ("ha4-backup".to_owned(), link(b))))
            .collect(),
        ..PeerStatisticsView::default()
    };
    let stats = StatisticsView {
        peers: vec![peer(2, 3, Some(1)), peer(3, 4, None)],
        rejected: BTreeMap::new(),
    };
    let members = cluster("up", &["up", "up"]);
    assert_eq!(link_summary(&members, &stats, LinkKind::Ha4).errors, 7);
    assert_eq!(
        link_summary(&members, &stats, LinkKind::Ha4Backup).errors,
        1
    );
}

#[tokio::test]
async fn the_api_summarises_the_views() {
    let (tx, _runtime) = fake_runtime();
    let snapshot = crate::metrics::Source::with_settings(tx, 300, "edge")
        .snapshot()
        .await
        .expect("snapshot");
    let api = ClusterApi::new(&snapshot);
    let json = serde_json::to_value(&api).expect("JSON");
    // FW-A (local) is active, member 12 down: degraded, HA4 down to the only peer.
    assert_eq!(
        json["cluster"],
        serde_json::json!({
            "id": 7, "description": "edge", "local": 1, "local_state": "active",
            "state": "degraded", "members": 2, "active": 1, "rejected": 1
        })
    );
    assert_eq!(
        json["links"]["ha4"],
        serde_json::json!({"status": "down", "up": 0, "down": 1, "errors": 0})
    );
    assert_eq!(json["links"]["ha4-backup"]["status"], "not-configured");
    // The table's own capacity (65,536 in the fake runtime's answer) wins over the config's.
    assert_eq!(
        json["sessions"],
        serde_json::json!({
            "total": 3, "capacity": 65536, "fill_percent": 3.0 * 100.0 / 65536.0,
            "owned": 2, "cached": 1, "embryonic": 2, "embryonic_capacity": 8192,
            "warning": null, "by_owner": {"1": 2, "2": 1},
            // The fake's counts are the sweep's, 2 s old.
            "counted_ms_ago": 2000
        })
    );
    // The views as `show` has them.
    assert_eq!(json["members"]["members"][1]["serial"], "FW-LONG-SERIAL");
    assert_eq!(
        json["statistics"]["peers"][0]["links"]["ha4"]["records_sent"],
        120
    );
    let back: ClusterApi = serde_json::from_value(json).expect("round trip");
    assert_eq!(back, api);

    // Every member active: healthy; none: down.
    let mut all = snapshot.clone();
    for m in &mut all.members.members {
        m.state = "active".into();
    }
    assert_eq!(ClusterApi::new(&all).cluster.state, "healthy");
    for m in &mut all.members.members {
        m.state = "initial".into();
    }
    assert_eq!(ClusterApi::new(&all).cluster.state, "down");
    all.capacity = 0;
    assert_eq!(ClusterApi::new(&all).sessions.fill_percent, 0.0);
}

/// The table warns from 90 % full, of all sessions or of the embryonic ones' bound.
#[test]
fn the_session_table_warns_from_ninety_percent() {
    let view = |total: u64, embryonic: u64| SessionsView {
        total,
        by_owner: BTreeMap::from([(1, total)]),
        embryonic,
        capacity: 1000,
        embryonic_capacity: 100,
        sessions: None,
        counted_ms_ago: None,
    };
    let warning = |v: &SessionsView| SessionSummary::new(v, 1000, 1).warning;
    assert_eq!(warning(&view(899, 0)), None);
    let full = warning(&view(900, 0)).expect("90 % full");
    assert!(full.contains("session table 90 % full"), "{full}");
    assert_eq!(warning(&view(500, 89)), None);
    let flood = warning(&view(500, 95)).expect("embryonic bound");
    assert!(flood.contains("embryonic sessions at 95 %"), "{flood}");
    let s = SessionSummary::new(&view(500, 95), 1000, 1);
    assert_eq!((s.owned, s.cached), (500, 0));
    assert_eq!(s.counted_ms_ago, None, "a walk's counts");
    let swept = SessionsView {
        counted_ms_ago: Some(2_500),
        ..view(500, 0)
    };
    assert_eq!(
        SessionSummary::new(&swept, 1000, 1).counted_ms_ago,
        Some(2_500),
        "the sweep's counts keep their age"
    );
}

#[test]
fn the_page_is_self_contained_and_has_what_the_script_fills() {
    // The SVG namespace is a name, not something fetched.
    let page = &INDEX_HTML.replace("\"http://www.w3.org/2000/svg\"", "SVG_NAMESPACE");
    // Nothing from elsewhere: no absolute URLs, no external scripts, styles or images.
    for needle in [
        "http://",
        "https://",
        "//cdn",
        "<script src",
        "<link rel=\"stylesheet\"",
        "@import",
        "url(",
    ] {
        assert!(!page.contains(needle), "the page refers to {needle}");
    }
    assert!(page.contains("fetch(\"/api/cluster\""));
    assert!(page.contains("fetch(\"/api/history\""));
    for id in [
        "cluster-id",
        "cluster-state",
        "members-active",
        "member-count",
        "ha4-indicator",
        "ha4-status",
        "ha4-detail",
        "ha4-errors",
        "ha4-backup-indicator",
        "ha4-backup-status",
        "ha4-backup-detail",
        "ha4-backup-errors",
        "sessions-owned",
        "sessions-cached",
        "sessions-embryonic",
        "sessions-embryonic-capacity",
        "sessions-warning",
        "rejected",
        "sessions-total",
        "sessions-capacity",
        "sessions-fill",
        "sessions-bar",
        "sessions-owners",
        "members",
        "updated",
        "error",
        "description",
        "member-faults",
        "member-warnings",
        "graph-sessions",
        "graph-records",
        "graph-lag",
        "graph-errors",
    ] {
        assert!(page.contains(&format!("id=\"{id}\"")), "no element #{id}");
    }
}
