//! Metrics: what `/metrics` exposes to Prometheus, gathered from the running member on each
//! scrape.
//!
//! The HTTP server ([`http`], `[local] http` in the config, `127.0.0.1:9471` by default) owns
//! nothing of the member: like the control socket it asks the runtime, over the same channel,
//! for the views `hasync show` prints ([`crate::control::view`]), and renders them. One
//! gathering gives a [`Snapshot`]; [`render`] turns it into the OpenMetrics text exposition
//! (which Prometheus scrapes natively) with the `prometheus-client` crate, and the dashboard's
//! `/api/cluster` ([`crate::dashboard`]) is built from the same snapshot.
//!
//! Session counts are those of the expiry sweep's last pass over the table (it counts what it
//! keeps as it goes: `show-session-counts`), no walk of their own, so as old as that pass's
//! start (`sessions_counted_age_seconds`: a new pass starts at the latest the shortest timeout
//! after the last one started, 6 s with the defaults, or when the last one ends if that is
//! later; at the sweep's base pace, about 80,000 sessions a second, a pass over a million
//! takes some 12 s). Until the first pass completes they are counted by a walk. A count is
//! reused for [`SESSIONS_CACHE`]; everything else is gathered at most once per
//! [`SNAPSHOT_CACHE`], whatever the number of scrapes (they share one gather).
//!
//! Names (all prefixed `hasync_`; labels in braces):
//!
//! | metric | type | what |
//! | --- | --- | --- |
//! | `cluster_info{cluster_id, local_member, description}` | info | this member and its cluster |
//! | `member_state{member, serial, state}` | gauge | 1 for the member's state, 0 for the others |
//! | `member_state_age_seconds{member}` | gauge | since the member's state last changed |
//! | `member_flaps{member}` | gauge | its flap count (falls from Active since the count last started anew) |
//! | `member_sessions_owned{member}` | gauge | sessions it owns, as it reports them |
//! | `link_state{member, link, state}` | gauge | 1 for the HA4 / HA4 backup link's state (`up`, `down`, `not-configured`) to a peer; for the local member, its own interface |
//! | `sessions` | gauge | entries in the local session table |
//! | `sessions_by_owner{owner}` | gauge | entries in the local table by owner member |
//! | `sessions_held{kind}` | gauge | `owned` (this member's: the session table) and `cached` (peers': the session cache) |
//! | `session_capacity` | gauge | capacity of the session table (owned and cached share it) |
//! | `sessions_embryonic`, `sessions_embryonic_capacity` | gauge | sessions with no reply yet (the evictable ones), and their bound |
//! | `sessions_counted_age_seconds` | gauge | how old the session counts are (the expiry sweep's last complete pass) |
//! | `replica_pool_sessions`, `replica_pool_limit` | gauge | assured copies of other members' sessions in the peers' pool, and `[local] replica_limit` |
//! | `sync_records_sent_total{peer, link}`, `..._received_total` | counter | session records |
//! | `sync_frames_sent_total{peer, link}`, `..._received_total` | counter | sync frames |
//! | `sync_sent_bytes_total{peer, link}`, `sync_received_bytes_total` | counter | sync bytes |
//! | `sync_acks_sent_total{peer, link}`, `..._received_total` | counter | acknowledgements |
//! | `sync_keepalives_sent_total{peer, link}`, `..._received_total` | counter | keepalives |
//! | `sync_keepalives_late_total{peer, link}` | counter | of those received, read after a later one: not taken |
//! | `sync_link_failures_total{peer, link}` | counter | connections lost on the link |
//! | `sync_link_stalls_total{peer, link}` | counter | of those, closed because writes made no progress |
//! | `sync_resends_total{peer}` | counter | records sent again |
//! | `sync_records_installed_total{peer}`, `_deleted_`, `_kept_`, `_orphaned_`, `_refused_zone_`, `_refused_owner_` | counter | what became of the peer's records |
//! | `sync_rejections_total{reason}` | counter | connections and frames refused |
//! | `full_syncs_total{peer, direction}` | counter | full syncs completed (`sent`, `received`) |
//! | `full_sync_running{peer, direction}` | gauge | 1 while one is under way |
//! | `full_sync_last_duration_seconds{peer, direction}`, `full_sync_last_records{...}` | gauge | the last completed one |
//! | `replication_lag_seconds{peer, quantile}` | gauge | p50 and p99 of recent changes, queued → acknowledged |
//! | `sync_records_pending{peer}` | gauge | records queued for the peer or in flight, not acknowledged |
//! | `datapath_<counter>_total` | counter | every datapath counter (`show counters`), `-` as `_` |

use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, info::Info, MetricType},
    registry::{Registry, Unit},
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::{
    cluster::{LinkState, MemberState},
    config::Config,
    control::{
        protocol::Request,
        view::{
            CountersView, FullSyncView, LinkStatisticsView, MembersView, PeerStatisticsView,
            SessionsView, StatisticsView,
        },
        ControlSender, Level,
    },
    sync::wire::LinkKind,
};

/// How long a session count is reused (one asked for before the sweep's first pass walks the
/// whole table).
pub const SESSIONS_CACHE: Duration = Duration::from_secs(5);
/// How long a whole snapshot answers scrapes (the dashboard polls once a second).
pub const SNAPSHOT_CACHE: Duration = Duration::from_millis(900);
/// How long a scrape waits for each of the runtime's answers.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every member state, in the order `member_state` lists them.
const MEMBER_STATES: [MemberState; 7] = [
    MemberState::Initial,
    MemberState::Active,
    MemberState::Tentative,
    MemberState::NonFunctional,
    MemberState::Suspended,
    MemberState::Down,
    MemberState::Unknown,
];

/// Every link state, in the order `link_state` lists them.
const LINK_STATES: [LinkState; 3] = [LinkState::Up, LinkState::Down, LinkState::NotConfigured];

/// Errors gathering a [`Snapshot`] from the runtime.
#[derive(Clone, Debug, thiserror::Error)]
pub enum GatherError {
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error("the agent did not answer the {request} request within {} s", ANSWER_TIMEOUT.as_secs())]
    Timeout { request: &'static str },
    #[error("the agent dropped the {request} request without answering")]
    Dropped { request: &'static str },
    #[error("the {request} request failed: {message}")]
    Failed {
        request: &'static str,
        message: String,
    },
    #[error("the answer to the {request} request is not what this agent expects: {message}")]
    Malformed {
        request: &'static str,
        message: String,
    },
}

/// What one gather of a [`Snapshot`] gave.
type Gathered = Result<Snapshot, GatherError>;

/// Everything one scrape shows, as the views of `hasync show` hold it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// `show cluster members`.
    pub members: MembersView,
    /// `show cluster statistics`.
    pub statistics: StatisticsView,
    /// `show counters`.
    pub counters: CountersView,
    /// `show cluster sessions --count`: totals only.
    pub sessions: SessionsView,
    /// Capacity of the session table.
    pub capacity: u64,
    /// `cluster.description` of the config.
    pub description: String,
}

/// What gathers snapshots: the runtime's request channel, what the config says, and the
/// cached session count.
#[derive(Clone, Debug)]
pub struct Source {
    requests: ControlSender,
    capacity: u64,
    description: String,
    sessions: Arc<tokio::sync::Mutex<Option<(Instant, SessionsView)>>>,
    /// The last gather's result, and when: scrapes within [`SNAPSHOT_CACHE`] of it (or
    /// waiting for one under way) are answered from it, a failure too.
    latest: Arc<tokio::sync::Mutex<Option<(Instant, Gathered)>>>,
}

impl Source {
    /// Asks the runtime behind `requests`; `config` gives the table's capacity and the
    /// cluster's description.
    pub fn new(requests: ControlSender, config: &Config) -> Source {
        Source {
            requests,
            capacity: u64::from(config.local.session_capacity),
            description: config.cluster.description.clone(),
            sessions: Arc::default(),
            latest: Arc::default(),
        }
    }

    /// A source with explicit settings (tests and tools).
    pub fn with_settings(requests: ControlSender, capacity: u64, description: &str) -> Source {
        Source {
            requests,
            capacity,
            description: description.to_owned(),
            sessions: Arc::default(),
            latest: Arc::default(),
        }
    }

    /// Resolves when the runtime has stopped taking requests.
    pub async fn closed(&self) {
        self.requests.closed().await;
    }

    /// The views as of at most [`SNAPSHOT_CACHE`] ago: scrapes at the same moment share one
    /// gather, so however many clients there are, the runtime is asked once per view and
    /// period.
    pub async fn snapshot(&self) -> Result<Snapshot, GatherError> {
        let mut latest = self.latest.lock().await;
        if let Some((at, result)) = latest
            .as_ref()
            .filter(|(at, _)| at.elapsed() < SNAPSHOT_CACHE)
        {
            // The session count's age goes on (as for a count reused on its own).
            return result.clone().map(|snapshot| Snapshot {
                sessions: aged(&snapshot.sessions, at.elapsed()),
                ..snapshot
            });
        }
        let result = self.gather().await;
        *latest = Some((Instant::now(), result.clone()));
        result
    }

    /// Gathers the views from the runtime now (the graphs' sampler: its own pace, and it does
    /// not answer scrapes); the session count comes from the cache while it is fresh
    /// (concurrent scrapes share one count).
    pub async fn gather(&self) -> Result<Snapshot, GatherError> {
        // One deadline for the whole gather: a scrape waits at most one answer timeout.
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        let members = self.ask(Request::ShowMembers {}, deadline).await?;
        let statistics = self.ask(Request::ShowStatistics {}, deadline).await?;
        let counters = self
            .ask(Request::ShowCounters { prefix: None }, deadline)
            .await?;
        let sessions = {
            let mut cached = self.sessions.lock().await;
            match &*cached {
                Some((at, view)) if at.elapsed() < SESSIONS_CACHE => aged(view, at.elapsed()),
                _ => {
                    let view: SessionsView =
                        self.ask(Request::ShowSessionCounts {}, deadline).await?;
                    *cached = Some((Instant::now(), view.clone()));
                    view
                }
            }
        };
        // The table's own capacity (a pinned table keeps its size) unless the agent is too old
        // to say it.
        let capacity = match sessions.capacity {
            0 => self.capacity,
            n => n,
        };
        Ok(Snapshot {
            members,
            statistics,
            counters,
            sessions,
            capacity,
            description: self.description.clone(),
        })
    }

    /// Sends `request` to the runtime and reads its answer as a `T`.
    async fn ask<T: DeserializeOwned>(
        &self,
        request: Request,
        deadline: tokio::time::Instant,
    ) -> Result<T, GatherError> {
        let name = request.name();
        let (tx, rx) = oneshot::channel();
        match tokio::time::timeout_at(deadline, self.requests.send((request, Level::Agent, tx)))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(GatherError::ShuttingDown),
            Err(_) => return Err(GatherError::Timeout { request: name }),
        }
        let response = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(response)) => response,
            Ok(Err(_)) => return Err(GatherError::Dropped { request: name }),
            Err(_) => return Err(GatherError::Timeout { request: name }),
        };
        if !response.ok {
            return Err(GatherError::Failed {
                request: name,
                message: response.error.unwrap_or_default(),
            });
        }
        response.view().map_err(|e| GatherError::Malformed {
            request: name,
            message: e.to_string(),
        })
    }
}

/// The OpenMetrics text exposition of `snapshot` (serve it as [`CONTENT_TYPE`]).
pub fn render(snapshot: &Snapshot) -> String {
    let mut registry = Registry::with_prefix("hasync");
    registry.register_collector(Box::new(SnapshotCollector(snapshot.clone())));
    let mut out = String::new();
    // Writing to a String cannot fail, and the collector only fails when its writer does.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        out = format!("# rendering the metrics failed: {e}\n# EOF\n");
    }
    out
}

/// The metric name of a datapath counter: `session-hits` → `datapath_session_hits` (the
/// exposition adds the `hasync_` prefix and the `_total` suffix).
pub fn datapath_metric(counter: &str) -> String {
    let name: String = counter
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("datapath_{name}")
}

#[derive(Debug)]
struct SnapshotCollector(Snapshot);

type Labels = Vec<(&'static str, String)>;

/// One metric family: its descriptor, then one sample per row.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric_type: MetricType,
    rows: impl IntoIterator<Item = (Labels, M)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, unit, metric_type)?;
    let mut rows = rows.into_iter().peekable();
    if let Some((labels, _)) = rows.peek() {
        if labels.is_empty() {
            // A metric without labels: one sample, written as `name value` (not `name{} value`).
            if let Some((_, value)) = rows.next() {
                return value.encode(metric);
            }
        }
    }
    for (labels, value) in rows {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauges<N: prometheus_client::encoding::EncodeGaugeValue + fmt::Debug>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (Labels, N)>,
) -> fmt::Result {
    family(
        encoder,
        name,
        help,
        unit,
        MetricType::Gauge,
        rows.into_iter().map(|(l, v)| (l, ConstGauge::new(v))),
    )
}

fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    family(
        encoder,
        name,
        help,
        unit,
        MetricType::Counter,
        rows.into_iter().map(|(l, v)| (l, ConstCounter::new(v))),
    )
}

/// 1 for `current`, 0 for every other of `known` (and `current` listed even if unknown).
fn state_rows(base: &Labels, known: &[&'static str], current: &str) -> Vec<(Labels, i64)> {
    let mut rows: Vec<(Labels, i64)> = known
        .iter()
        .map(|s| {
            let l = with_label(base.clone(), "state", (*s).to_owned());
            (l, i64::from(*s == current))
        })
        .collect();
    if !known.contains(&current) {
        rows.push((with_label(base.clone(), "state", current.to_owned()), 1));
    }
    rows
}

/// `view`, reused `reused` after it was answered: its counts that much older.
fn aged(view: &SessionsView, reused: Duration) -> SessionsView {
    let reused = u64::try_from(reused.as_millis()).unwrap_or(u64::MAX);
    SessionsView {
        counted_ms_ago: Some(view.counted_ms_ago.unwrap_or(0).saturating_add(reused)),
        ..view.clone()
    }
}

/// The session table: what it holds (owned here, peers' copies, embryonic) against its
/// capacities.
fn encode_sessions(
    e: &mut DescriptorEncoder,
    sessions: &SessionsView,
    capacity: u64,
    local: u8,
) -> fmt::Result {
    let (owned, cached) = sessions.owned_and_cached(local);
    gauges(
        e,
        "sessions",
        "Sessions in the local session table.",
        None,
        [(Labels::new(), sessions.total)],
    )?;
    gauges(
        e,
        "sessions_by_owner",
        "Sessions in the local session table, by owner member.",
        None,
        sessions
            .by_owner
            .iter()
            .map(|(owner, n)| (vec![("owner", owner.to_string())], *n)),
    )?;
    gauges(
        e,
        "sessions_held",
        "Sessions in the local table by kind: `owned` (this member's, the session table) and \
         `cached` (peers' copies, the session cache); both share `session_capacity`.",
        None,
        [
            (vec![("kind", "owned".to_owned())], owned),
            (vec![("kind", "cached".to_owned())], cached),
        ],
    )?;
    gauges(
        e,
        "session_capacity",
        "Capacity of the local session table.",
        None,
        [(Labels::new(), capacity)],
    )?;
    gauges(
        e,
        "sessions_embryonic",
        "Embryonic sessions (not assured: a handshake not completed, UDP not yet a stream, \
         ICMP echoes): past `sessions_embryonic_capacity` (per CPU), each new one evicts the \
         oldest (assured sessions are never evicted).",
        None,
        [(Labels::new(), sessions.embryonic)],
    )?;
    gauges(
        e,
        "sessions_embryonic_capacity",
        "Embryonic sessions the table holds at most (this member's and peers' parts).",
        None,
        [(Labels::new(), sessions.embryonic_capacity)],
    )?;
    let age_ms = sessions.counted_ms_ago.unwrap_or(0);
    gauges(
        e,
        "sessions_counted_age",
        "How old the session counts above are: those of the expiry sweep's last complete pass \
         over the table, from the pass's start (a count walked for the answer, before the \
         first pass, from the answer), plus the time the scrape reused it.",
        Some(&Unit::Seconds),
        [(Labels::new(), age_ms as f64 / 1000.0)],
    )
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let Snapshot {
            members,
            statistics,
            counters: datapath,
            sessions,
            capacity,
            description,
        } = &self.0;
        encode_cluster_info(&mut e, members, description)?;
        encode_members(&mut e, members)?;
        encode_link_states(&mut e, members)?;
        encode_sessions(&mut e, sessions, *capacity, members.local)?;
        encode_link_statistics(&mut e, statistics)?;
        encode_peer_statistics(&mut e, statistics)?;
        encode_full_syncs(&mut e, statistics)?;
        encode_replication(&mut e, statistics)?;
        encode_datapath_counters(&mut e, datapath)
    }
}

/// `labels` and one more label.
fn with_label(mut labels: Labels, name: &'static str, value: String) -> Labels {
    labels.push((name, value));
    labels
}

fn member_labels(id: u8) -> Labels {
    vec![("member", id.to_string())]
}

fn peer_labels(id: u8) -> Labels {
    vec![("peer", id.to_string())]
}

/// `cluster_info`: this member and its cluster.
fn encode_cluster_info(
    e: &mut DescriptorEncoder,
    members: &MembersView,
    description: &str,
) -> fmt::Result {
    let info = Info::new(vec![
        ("cluster_id", members.cluster_id.to_string()),
        ("local_member", members.local.to_string()),
        ("description", description.to_owned()),
    ]);
    info.encode(e.encode_descriptor(
        "cluster",
        "This member and its cluster.",
        None,
        info.metric_type(),
    )?)
}

/// Each member's state, its age, flaps and the sessions the member owns.
fn encode_members(e: &mut DescriptorEncoder, members: &MembersView) -> fmt::Result {
    let member_states: Vec<&'static str> = MEMBER_STATES.iter().map(|s| s.name()).collect();
    let members = &members.members;
    gauges(
        e,
        "member_state",
        "State of each member, as this member sees it: 1 for its state, 0 for the others.",
        None,
        members.iter().flat_map(|m| {
            let base = with_label(member_labels(m.id), "serial", m.serial.clone());
            state_rows(&base, &member_states, &m.state)
        }),
    )?;
    gauges(
        e,
        "member_state_age",
        "Time since the member's state last changed.",
        Some(&Unit::Seconds),
        members
            .iter()
            .filter_map(|m| Some((member_labels(m.id), m.last_change?))),
    )?;
    // A gauge: the count starts anew (`hasync functional`, a hold-down time Active), which a
    // counter must never do (it was `member_flaps_total` until stop 47).
    gauges(
        e,
        "member_flaps",
        "The member's flap count: falls from Active since the count last started anew.",
        None,
        members
            .iter()
            .map(|m| (member_labels(m.id), u64::from(m.flaps))),
    )?;
    gauges(
        e,
        "member_sessions_owned",
        "Sessions the member owns, as it reports them.",
        None,
        members
            .iter()
            .map(|m| (member_labels(m.id), m.sessions_owned)),
    )
}

/// `link_state`: the HA4 and HA4 backup links to each peer.
fn encode_link_states(e: &mut DescriptorEncoder, members: &MembersView) -> fmt::Result {
    let link_states: Vec<&'static str> = LINK_STATES.iter().map(|s| s.name()).collect();
    gauges(
        e,
        "link_state",
        "State of the HA4 and HA4 backup sync links to each peer (for the local member: \
         its own interface): 1 for the state, 0 for the others.",
        None,
        members.members.iter().flat_map(|m| {
            [
                (LinkKind::Ha4.name(), &m.ha4),
                (LinkKind::Ha4Backup.name(), &m.ha4_backup),
            ]
            .into_iter()
            .flat_map(|(link, state)| {
                let base = with_label(member_labels(m.id), "link", link.to_owned());
                state_rows(&base, &link_states, state)
            })
            .collect::<Vec<_>>()
        }),
    )
}

/// A counter of one sync link: name, help, unit and where its value is.
type LinkCounter = (
    &'static str,
    &'static str,
    Option<Unit>,
    fn(&LinkStatisticsView) -> u64,
);

/// The counters kept per peer and link, in the order they are exposed.
const LINK_COUNTERS: [LinkCounter; 13] = [
    ("sync_records_sent", "Session records sent.", None, |s| {
        s.records_sent
    }),
    (
        "sync_records_received",
        "Session records received.",
        None,
        |s| s.records_received,
    ),
    ("sync_frames_sent", "Sync frames sent.", None, |s| {
        s.frames_sent
    }),
    ("sync_frames_received", "Sync frames received.", None, |s| {
        s.frames_received
    }),
    ("sync_sent", "Sync bytes sent.", Some(Unit::Bytes), |s| {
        s.bytes_sent
    }),
    (
        "sync_received",
        "Sync bytes received.",
        Some(Unit::Bytes),
        |s| s.bytes_received,
    ),
    ("sync_acks_sent", "Acknowledgements sent.", None, |s| {
        s.acks_sent
    }),
    (
        "sync_acks_received",
        "Acknowledgements received.",
        None,
        |s| s.acks_received,
    ),
    ("sync_keepalives_sent", "Keepalives sent.", None, |s| {
        s.keepalives_sent
    }),
    (
        "sync_keepalives_received",
        "Keepalives received.",
        None,
        |s| s.keepalives_received,
    ),
    (
        "sync_keepalives_late",
        "Keepalives read after a later one of the peer (late on this link), not taken.",
        None,
        |s| s.keepalives_late,
    ),
    (
        "sync_link_failures",
        "Sync connections lost on the link (errors, silence, interface down).",
        None,
        |s| s.failures,
    ),
    (
        "sync_link_stalls",
        "Sync connections closed because writes to the peer made no progress.",
        None,
        |s| s.stalls,
    ),
];

/// A counter of one peer: name, help and where its value is.
type PeerCounter = (&'static str, &'static str, fn(&PeerStatisticsView) -> u64);

/// The counters kept per peer, in the order they are exposed.
const PEER_COUNTERS: [PeerCounter; 7] = [
    (
        "sync_resends",
        "Records sent again (link failure or switch, or unacknowledged).",
        |p| p.resends,
    ),
    (
        "sync_records_installed",
        "Records from the peer installed in the session table.",
        |p| p.records_installed,
    ),
    (
        "sync_records_deleted",
        "Delete records from the peer applied.",
        |p| p.records_deleted,
    ),
    (
        "sync_records_kept",
        "Records from the peer not applied: the local copy wins.",
        |p| p.records_kept,
    ),
    (
        "sync_records_orphaned",
        "Removals from the peer of a session this member carries the flow of: kept, \
         orphaned, to take over.",
        |p| p.records_orphaned,
    ),
    (
        "sync_records_refused_zone",
        "Records from the peer refused: their zone does not exist here.",
        |p| p.records_refused_zone,
    ),
    (
        "sync_records_refused_owner",
        "Records from the peer refused: it may not speak for their owner.",
        |p| p.records_refused_owner,
    ),
];

/// Sync traffic per peer and link ([`LINK_COUNTERS`]).
fn encode_link_statistics(e: &mut DescriptorEncoder, statistics: &StatisticsView) -> fmt::Result {
    let links: Vec<(Labels, &LinkStatisticsView)> = statistics
        .peers
        .iter()
        .flat_map(|p| {
            p.links
                .iter()
                .map(|(link, s)| (with_label(peer_labels(p.id), "link", link.clone()), s))
        })
        .collect();
    for (name, help, unit, field) in LINK_COUNTERS {
        counters(
            e,
            name,
            help,
            unit.as_ref(),
            links.iter().map(|(l, s)| (l.clone(), field(s))),
        )?;
    }
    Ok(())
}

/// What became of each peer's records ([`PEER_COUNTERS`]), and the rejections by reason.
fn encode_peer_statistics(e: &mut DescriptorEncoder, statistics: &StatisticsView) -> fmt::Result {
    for (name, help, field) in PEER_COUNTERS {
        counters(
            e,
            name,
            help,
            None,
            statistics
                .peers
                .iter()
                .map(|p| (peer_labels(p.id), field(p))),
        )?;
    }
    counters(
        e,
        "sync_rejections",
        "Sync connections and frames refused, by reason.",
        None,
        statistics
            .rejected
            .iter()
            .map(|(reason, n)| (vec![("reason", reason.clone())], *n)),
    )
}

/// Full syncs with each peer, sent and received: completed, running, the last one.
fn encode_full_syncs(e: &mut DescriptorEncoder, statistics: &StatisticsView) -> fmt::Result {
    let full_syncs: Vec<(Labels, FullSyncView)> = statistics
        .peers
        .iter()
        .flat_map(|p| {
            [
                ("sent", p.full_syncs.sent),
                ("received", p.full_syncs.received),
            ]
            .map(|(direction, f)| {
                (
                    with_label(peer_labels(p.id), "direction", direction.into()),
                    f,
                )
            })
        })
        .collect();
    counters(
        e,
        "full_syncs",
        "Full syncs completed with the peer (sent to it, received from it).",
        None,
        full_syncs.iter().map(|(l, f)| (l.clone(), f.count)),
    )?;
    gauges(
        e,
        "full_sync_running",
        "1 while a full sync with the peer is under way.",
        None,
        full_syncs
            .iter()
            .map(|(l, f)| (l.clone(), i64::from(f.running))),
    )?;
    gauges(
        e,
        "full_sync_last_duration",
        "Duration of the last completed full sync.",
        Some(&Unit::Seconds),
        full_syncs
            .iter()
            .filter_map(|(l, f)| Some((l.clone(), f.last_duration_ms? as f64 / 1000.0))),
    )?;
    gauges(
        e,
        "full_sync_last_records",
        "Session records of the last completed full sync.",
        None,
        full_syncs
            .iter()
            .filter_map(|(l, f)| Some((l.clone(), f.last_records?))),
    )
}

/// Records waiting for each peer, and the replication lag's quantiles.
fn encode_replication(e: &mut DescriptorEncoder, statistics: &StatisticsView) -> fmt::Result {
    gauges(
        e,
        "sync_records_pending",
        "Records queued for the peer or sent and not acknowledged yet.",
        None,
        statistics
            .peers
            .iter()
            .map(|p| (peer_labels(p.id), p.records_pending)),
    )?;
    gauges(
        e,
        "replication_lag",
        "Replication lag of recent changes (queued to acknowledged by the peer), by quantile.",
        Some(&Unit::Seconds),
        statistics.peers.iter().flat_map(|p| {
            [
                ("0.5", p.replication_lag.p50_ms),
                ("0.99", p.replication_lag.p99_ms),
            ]
            .into_iter()
            .filter_map(|(q, ms)| {
                Some((
                    with_label(peer_labels(p.id), "quantile", q.to_owned()),
                    ms? / 1000.0,
                ))
            })
            .collect::<Vec<_>>()
        }),
    )
}

/// Every datapath counter, one metric each, and the peers' pool.
fn encode_datapath_counters(e: &mut DescriptorEncoder, datapath: &CountersView) -> fmt::Result {
    for (name, value) in &datapath.counters {
        counters(
            e,
            &datapath_metric(name),
            &format!("Datapath counter `{name}` (see `hasync show counters`)."),
            None,
            [(Labels::new(), *value)],
        )?;
    }
    let Some(pool) = datapath.replica_pool else {
        return Ok(());
    };
    gauges(
        e,
        "replica_pool_sessions",
        "Assured copies of other members' sessions in the peers' pool of the table.",
        None,
        [(Labels::new(), pool.held)],
    )?;
    gauges(
        e,
        "replica_pool_limit",
        "The peers' pool's limit ([local] replica_limit): past it, peers' records that would \
         add a copy are refused (replicas-over-limit).",
        None,
        [(Labels::new(), pool.limit)],
    )
}

#[cfg(test)]
mod tests;
