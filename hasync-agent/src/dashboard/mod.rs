//! The dashboard: one self-contained page (`index.html`, embedded in the binary, no external
//! resources) served at `/` by the metrics server, the HA cluster widget. It polls
//! `/api/cluster` every second; [`ClusterApi`] is that JSON, built from the same views as
//! `hasync show` and `/metrics` ([`crate::metrics::Snapshot`]).
//!
//! What the widget shows, and how it is decided here (so the page only draws):
//! - the cluster state ([`ClusterSummary::state`]): `healthy` when every member is active,
//!   `degraded` when some are, `down` when none is;
//! - one indicator per sync link ([`LinkSummary::status`]): `up` (green) when the link is up
//!   to every peer, `down` (red) when it is down to all, `partial` (yellow) in between,
//!   `not-configured` (grey) when this member or no peer has it;
//! - communication errors per link (connections lost, [`LinkSummary::errors`]) and sync
//!   connections or frames refused ([`ClusterSummary::rejected`]);
//! - the session table's fill against its capacity: sessions owned here (the session table)
//!   and peers' copies (the session cache), which share it, and the embryonic ones against
//!   their own bound; a warning from [`FILL_WARNING_PERCENT`] on;
//! - every member with its state and link states.
//!
//! Elements carry `data-test` attributes (and indicators `data-status` / `data-color`) so a
//! test reading the rendered page sees what a person sees.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    cluster::{LinkState, MemberState},
    control::view::{MembersView, SessionsView, StatisticsView},
    metrics::Snapshot,
    sync::wire::LinkKind,
};

pub mod history;

/// The page, served as is.
pub const INDEX_HTML: &str = include_str!("index.html");

/// `/api/cluster`: what the widget draws.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterApi {
    pub cluster: ClusterSummary,
    /// By link name: `ha4`, `ha4-backup`.
    pub links: BTreeMap<String, LinkSummary>,
    pub sessions: SessionSummary,
    /// `show cluster members`.
    pub members: MembersView,
    /// `show cluster statistics`.
    pub statistics: StatisticsView,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSummary {
    pub id: u8,
    pub description: String,
    /// The member answering.
    pub local: u8,
    /// Its own state ([`MemberState::name`]).
    pub local_state: String,
    /// `healthy`, `degraded` or `down`.
    pub state: String,
    /// Members configured, the local one included.
    pub members: usize,
    /// Members active.
    pub active: usize,
    /// Sync connections and frames refused, all reasons.
    pub rejected: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkSummary {
    /// `up`, `partial`, `down` or `not-configured`.
    pub status: String,
    /// Peers the link is up to.
    pub up: usize,
    /// Peers the link is configured to but not up.
    pub down: usize,
    /// Connections lost on this link, all peers.
    pub errors: u64,
}

/// Fill of the session table (or of its embryonic share) from which the dashboard warns.
pub const FILL_WARNING_PERCENT: f64 = 90.0;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionSummary {
    /// Sessions in the local table.
    pub total: u64,
    pub capacity: u64,
    /// `total` as a percentage of `capacity`.
    pub fill_percent: f64,
    /// Sessions this member owns (the session table).
    pub owned: u64,
    /// Peers' sessions held here (the session cache); shares `capacity` with `owned`.
    pub cached: u64,
    /// Sessions with no reply yet, and the most the table holds (past it, the oldest is
    /// evicted for each new one).
    pub embryonic: u64,
    pub embryonic_capacity: u64,
    /// Why the table needs attention (fill at or above [`FILL_WARNING_PERCENT`]), if it does.
    pub warning: Option<String>,
    /// By owner member id.
    pub by_owner: BTreeMap<u8, u64>,
    /// How old the counts were when they were sampled, in ms, when they are the expiry
    /// sweep's (from the start of its last pass); `None` when a walk counted them then.
    #[serde(default)]
    pub counted_ms_ago: Option<u64>,
}

fn percent(n: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        n as f64 * 100.0 / of as f64
    }
}

impl SessionSummary {
    /// The summary of `sessions` in a table of `capacity`, `local` being this member.
    pub fn new(sessions: &SessionsView, capacity: u64, local: u8) -> SessionSummary {
        let (owned, cached) = sessions.owned_and_cached(local);
        let fill_percent = percent(sessions.total, capacity);
        let embryonic_percent = percent(sessions.embryonic, sessions.embryonic_capacity);
        let warning = if fill_percent >= FILL_WARNING_PERCENT {
            Some(format!(
                "session table {fill_percent:.0} % full: new flows are refused when it is full"
            ))
        } else if embryonic_percent >= FILL_WARNING_PERCENT {
            Some(format!(
                "embryonic sessions at {embryonic_percent:.0} % of their bound: the oldest are \
                 being evicted (a flood or a scan?)"
            ))
        } else {
            None
        };
        SessionSummary {
            total: sessions.total,
            capacity,
            fill_percent,
            owned,
            cached,
            embryonic: sessions.embryonic,
            embryonic_capacity: sessions.embryonic_capacity,
            warning,
            by_owner: sessions.by_owner.clone(),
            counted_ms_ago: sessions.counted_ms_ago,
        }
    }
}

/// Where a link stands across the peers (see the module doc).
pub fn link_summary(
    members: &MembersView,
    statistics: &StatisticsView,
    link: LinkKind,
) -> LinkSummary {
    let state_of = |m: &crate::control::view::MemberView| match link {
        LinkKind::Ha4 => m.ha4.clone(),
        LinkKind::Ha4Backup => m.ha4_backup.clone(),
    };
    let not_configured = LinkState::NotConfigured.name();
    let up_name = LinkState::Up.name();
    let local = members
        .members
        .iter()
        .find(|m| m.id == members.local)
        .map_or_else(|| not_configured.to_owned(), state_of);
    let peers: Vec<String> = members
        .members
        .iter()
        .filter(|m| m.id != members.local)
        .map(state_of)
        .filter(|s| s != not_configured)
        .collect();
    let up = peers.iter().filter(|s| *s == up_name).count();
    let down = peers.len() - up;
    let errors = statistics
        .peers
        .iter()
        .filter_map(|p| p.links.get(link.name()))
        .fold(0u64, |sum, l| sum.saturating_add(l.failures));
    let has_peers = members.members.iter().any(|m| m.id != members.local);
    let status = if local == not_configured || (has_peers && peers.is_empty()) {
        "not-configured"
    } else if local != up_name || (has_peers && up == 0) {
        "down"
    } else if down == 0 {
        "up"
    } else {
        "partial"
    };
    LinkSummary {
        status: status.to_owned(),
        up,
        down,
        errors,
    }
}

impl ClusterApi {
    pub fn new(s: &Snapshot) -> ClusterApi {
        let Snapshot {
            members,
            statistics,
            counters: _,
            sessions,
            capacity,
            description,
        } = s;
        let active_name = MemberState::Active.name();
        let active = members
            .members
            .iter()
            .filter(|m| m.state == active_name)
            .count();
        let state = match active {
            0 => "down",
            n if n == members.members.len() => "healthy",
            _ => "degraded",
        };
        let local_state = members
            .members
            .iter()
            .find(|m| m.id == members.local)
            .map_or_else(
                || MemberState::Unknown.name().to_owned(),
                |m| m.state.clone(),
            );
        let links = [LinkKind::Ha4, LinkKind::Ha4Backup]
            .into_iter()
            .map(|l| (l.name().to_owned(), link_summary(members, statistics, l)))
            .collect();
        ClusterApi {
            cluster: ClusterSummary {
                id: members.cluster_id.0,
                description: description.clone(),
                local: members.local,
                local_state,
                state: state.to_owned(),
                members: members.members.len(),
                active,
                rejected: statistics
                    .rejected
                    .values()
                    .fold(0u64, |sum, n| sum.saturating_add(*n)),
            },
            links,
            sessions: SessionSummary::new(sessions, *capacity, members.local),
            members: members.clone(),
            statistics: statistics.clone(),
        }
    }
}

#[cfg(test)]
mod tests;
