//! What `show` answers: the JSON shapes of [`super::Response::data`], shared by the agent (which
//! builds them) and the CLI (which prints them as tables, or as-is with `--json`).
//!
//! Names (states, links, protocols) are strings, not enums, so a CLI talking to an agent one
//! version apart still reads an answer with a name it does not know.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use hasync_common::{
    ClusterId, Counter, Counters, FlowKey, MemberId, Session, SessionFlags, State, ZoneId,
};
use serde::{Deserialize, Serialize};

use super::protocol::{check_limit, proto_name, SessionFilter, MAX_SESSION_PAGE};
use crate::{
    cluster::{LinkState, MemberState, Membership, Peer},
    datapath::sweep::Tally,
    sync::{
        stats::{BulkStats, LinkStats, PeerStats, Rejections},
        wire::{LinkKind, PROTO_MAJOR, PROTO_MINOR},
    },
};

/// Whole seconds from `then` to `now`; `None` if it never happened.
pub fn seconds_ago(now: Instant, then: Option<Instant>) -> Option<u64> {
    then.map(|t| now.saturating_duration_since(t).as_secs())
}

/// `major.minor`, as members show a protocol version.
pub fn version_string(major: u8, minor: u8) -> String {
    format!("{major}.{minor}")
}

// ---------------------------------------------------------------------------------------------
// show cluster members

/// `show cluster members`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersView {
    #[serde(with = "crate::config::ids::cluster_id")]
    pub cluster_id: ClusterId,
    /// The local member's id.
    pub local: u8,
    /// Every configured member, the local one included, by id.
    pub members: Vec<MemberView>,
    /// Why the local member is out of service: each failed condition with its cause, a
    /// monitor's hold-down still running, and a suspend its flap limit made. Empty when
    /// nothing holds it down.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<String>,
    /// What does not stop the member but should be seen: zones only some members have.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// One member as `show cluster members` lists it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    pub id: u8,
    pub serial: String,
    /// [`MemberState::name`]: `initial`, `active`, `tentative`, `non-functional`, `suspended`,
    /// `down`, `unknown`.
    pub state: String,
    /// Sync link state: [`LinkState::name`] (`up`, `down`, `not-configured`).
    pub ha4: String,
    pub ha4_backup: String,
    pub sessions_owned: u64,
    pub flaps: u32,
    /// Sync protocol version it speaks (`1.0`); `None` for a peer never heard.
    pub version: Option<String>,
    /// Seconds since its state last changed; `None` if it never changed.
    pub last_change: Option<u64>,
}

impl MemberView {
    /// A peer as the membership knows it. `version` is what its hello said, if one arrived.
    /// A link the membership has no state for is `down` for HA4 (not connected yet) and
    /// `not-configured` for HA4 backup; the runtime sets the backup link `down` where it is
    /// configured.
    pub fn peer(p: &Peer, version: Option<(u8, u8)>, now: Instant) -> MemberView {
        let link = |kind: LinkKind, missing: LinkState| {
            p.links
                .get(&kind)
                .copied()
                .unwrap_or(missing)
                .name()
                .to_owned()
        };
        MemberView {
            id: p.id.0,
            serial: p.serial.clone(),
            state: p.state().name().to_owned(),
            ha4: link(LinkKind::Ha4, LinkState::Down),
            ha4_backup: link(LinkKind::Ha4Backup, LinkState::NotConfigured),
            sessions_owned: u64::from(p.sessions_owned),
            flaps: p.flaps,
            version: version.map(|(major, minor)| version_string(major, minor)),
            last_change: seconds_ago(now, p.last_change),
        }
    }

    /// The local member. Its links are the local sync interfaces' states.
    pub fn local(
        m: &Membership,
        serial: &str,
        sessions_owned: u64,
        ha4: LinkState,
        ha4_backup: LinkState,
        now: Instant,
    ) -> MemberView {
        MemberView {
            id: m.local.0,
            serial: serial.to_owned(),
            state: m.state.name().to_owned(),
            ha4: ha4.name().to_owned(),
            ha4_backup: ha4_backup.name().to_owned(),
            sessions_owned,
            flaps: m.flaps,
            version: Some(version_string(PROTO_MAJOR, PROTO_MINOR)),
            last_change: Some(now.saturating_duration_since(m.state_since).as_secs()),
        }
    }
}

impl MembersView {
    /// The local member and every peer, by id. `version(id)` is the protocol version a peer's
    /// hello announced.
    pub fn new(
        cluster_id: ClusterId,
        m: &Membership,
        local: MemberView,
        version: impl Fn(MemberId) -> Option<(u8, u8)>,
        now: Instant,
    ) -> MembersView {
        let mut members: Vec<MemberView> = m
            .peers
            .values()
            .map(|p| MemberView::peer(p, version(p.id), now))
            .collect();
        members.push(local);
        members.sort_by_key(|v| v.id);
        let mut faults: Vec<String> = m
            .faults()
            .map(|(c, cause)| format!("{c}: {cause}"))
            .collect();
        if let Some(until) = m.hold_down_until() {
            let left = until.saturating_duration_since(now).as_secs();
            faults.push(format!("monitor fail hold-down: {left} s left"));
        }
        if let Some(flaps) = m.flap_suspended() {
            faults.push(format!(
                "suspended at its flap limit (flap count {flaps}, local.max_flaps = {}): it serves again \
                 when no other member is in service, or on `hasync functional`",
                m.max_flaps()
            ));
        }
        let warnings = m
            .zone_warnings()
            .map(|(id, w)| {
                format!(
                    "zones differ from member {}'s ({w}): sessions in those zones are refused",
                    id.0
                )
            })
            .collect();
        MembersView {
            cluster_id,
            local: m.local.0,
            members,
            faults,
            warnings,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// show cluster flaps

/// `show cluster flaps`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlapsView {
    pub members: Vec<FlapView>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlapView {
    pub id: u8,
    /// Times it left a state that keeps sessions (for the local member: left `active`).
    pub flaps: u32,
    /// Seconds since its state last changed; `None` if it never changed.
    pub last_change: Option<u64>,
}

impl FlapsView {
    pub fn from_membership(m: &Membership, now: Instant) -> FlapsView {
        let mut members: Vec<FlapView> = m
            .peers
            .values()
            .map(|p| FlapView {
                id: p.id.0,
                flaps: p.flaps,
                last_change: seconds_ago(now, p.last_change),
            })
            .collect();
        members.push(FlapView {
            id: m.local.0,
            flaps: m.flaps,
            last_change: Some(now.saturating_duration_since(m.state_since).as_secs()),
        });
        members.sort_by_key(|v| v.id);
        FlapsView { members }
    }
}

/// The answer to `suspend` and `functional`: the local member's state after the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalStateView {
    pub member: u8,
    /// [`MemberState::name`].
    pub state: String,
    /// The state changed, but not what a restart finds (`hasync suspend`'s mark could not be
    /// written or removed): what a restart would do, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_kept: Option<String>,
}

impl LocalStateView {
    pub fn new(member: MemberId, state: MemberState) -> LocalStateView {
        LocalStateView {
            member: member.0,
            state: state.name().to_owned(),
            not_kept: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// show cluster sessions

/// `show cluster sessions`: totals over the sessions matching the filter, and one page of them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionsView {
    /// Sessions matching the filter.
    pub total: u64,
    /// Matching sessions per owner member id (JSON keys are the ids as strings).
    pub by_owner: BTreeMap<u8, u64>,
    /// Matching sessions that saw no reply yet (the ones the table may evict).
    #[serde(default)]
    pub embryonic: u64,
    /// Capacity of the session table (0 from an agent that did not say).
    #[serde(default)]
    pub capacity: u64,
    /// Embryonic sessions the table holds at most.
    #[serde(default)]
    pub embryonic_capacity: u64,
    /// The requested page; absent when only counts were asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<Vec<SessionView>>,
    /// How old the counts are, in ms, when they are the expiry sweep's
    /// (`show-session-counts`: since the start of the pass that counted them); absent when
    /// this answer's walk counted them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted_ms_ago: Option<u64>,
}

/// One session, initiator first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    /// `tcp`, `udp`, `icmp`, `icmpv6` (`proto-N` otherwise).
    pub proto: String,
    /// The initiator.
    pub src: IpAddr,
    /// Ports in host order; for ICMP echo both hold the identifier.
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    /// [`State::name`] (`state-N` for a value this agent does not know).
    pub state: String,
    pub owner: u8,
    /// Zone name; empty when the ingress interface is in no zone.
    pub zone: String,
    /// Time since the session's last packet when the table was read, in ms (in a replica, since
    /// the last packet its owner reported, less the record's time in flight); none from an
    /// agent too old to send it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
}

/// The name of `zone`: its configured name (`zones` in id order, id 1 first), empty for
/// [`ZoneId::NONE`], `zone-N` for an id this member does not know.
pub fn zone_name(zones: &[String], zone: ZoneId) -> String {
    if zone == ZoneId::NONE {
        return String::new();
    }
    zones
        .get(usize::from(zone.0) - 1)
        .cloned()
        .unwrap_or_else(|| format!("zone-{}", zone.0))
}

impl SessionView {
    /// Renders a SESSIONS entry: addresses and ports as people read them, the initiator as
    /// `src`; no idle time ([`Self::read_at`] adds it).
    pub fn from(key: &FlowKey, s: &Session, zone_name: &str) -> SessionView {
        let FlowKey {
            addr_lo: _,
            addr_hi: _,
            port_lo,
            port_hi,
            proto,
            family: _,
            _pad,
        } = key;
        let lo = (key.ip_lo(), u16::from_be(*port_lo));
        let hi = (key.ip_hi(), u16::from_be(*port_hi));
        let ((src, sport), (dst, dport)) = if s.flags.has(SessionFlags::INITIATOR_HI) {
            (hi, lo)
        } else {
            (lo, hi)
        };
        SessionView {
            proto: proto_name(*proto),
            src,
            sport,
            dst,
            dport,
            state: State::from_u8(s.state)
                .map_or_else(|| format!("state-{}", s.state), |st| st.name().to_owned()),
            owner: s.owner.0,
            zone: zone_name.to_owned(),
            idle_ms: None,
        }
    }

    /// The view with its idle time, for `s` read from the table at `now_ns` (session clock);
    /// a session seen after the clock was read is not idle at all.
    pub fn read_at(mut self, s: &Session, now_ns: u64) -> SessionView {
        self.idle_ms = Some(now_ns.saturating_sub(s.last_seen_ns) / 1_000_000);
        self
    }
}

impl SessionsView {
    /// The counts of `tally` (the expiry sweep's, taken `age` ago), in a table of `capacity`
    /// holding at most `embryonic_capacity` embryonic sessions; no page.
    pub fn tallied(
        tally: &Tally,
        age: Duration,
        capacity: u32,
        embryonic_capacity: u32,
    ) -> SessionsView {
        let owners = (0..=MemberId::MAX).zip(tally.by_owner);
        SessionsView {
            total: tally.total,
            by_owner: owners.filter(|(_, n)| *n > 0).collect(),
            embryonic: tally.embryonic,
            capacity: u64::from(capacity),
            embryonic_capacity: u64::from(embryonic_capacity),
            sessions: None,
            counted_ms_ago: Some(u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// The sessions `local` owns (the session table) and the peers' copies (the session
    /// cache) among those counted.
    pub fn owned_and_cached(&self, local: u8) -> (u64, u64) {
        let owned = self.by_owner.get(&local).copied().unwrap_or(0);
        (owned, self.total.saturating_sub(owned))
    }
}

/// Builds a [`SessionsView`] from the session table read in chunks: memory stays at one page
/// whatever the table size.
///
/// ```ignore
/// let mut page = SessionPage::new(count_only, filter, offset, limit, &zone_names)?;
/// dp.sessions_chunked(DEFAULT_CHUNK, |keys, values| page.add_chunk(keys, values))?;
/// Response::ok(page.finish(dp.capacity(), dp.embryonic_slots()))
/// ```
///
/// The order is the map's iteration order, so pages of a changing table may overlap or miss a
/// session.
#[derive(Debug)]
pub struct SessionPage {
    filter: SessionFilter,
    zones: Vec<String>,
    offset: u64,
    limit: u64,
    view: SessionsView,
}

impl SessionPage {
    /// Checks the filter (zones included) and prepares an empty page. `zones` are the zone
    /// names in id order. No `limit` lists up to [`MAX_SESSION_PAGE`]; one of 0 or above it
    /// is refused ([`check_limit`]).
    pub fn new(
        count_only: bool,
        filter: SessionFilter,
        offset: u64,
        limit: Option<u64>,
        zones: &[String],
    ) -> Result<SessionPage, String> {
        filter.check(Some(zones))?;
        let limit = limit.map_or(Ok(MAX_SESSION_PAGE), check_limit)?;
        Ok(SessionPage {
            filter,
            zones: zones.to_vec(),
            offset,
            limit,
            view: SessionsView {
                total: 0,
                by_owner: BTreeMap::new(),
                embryonic: 0,
                capacity: 0,
                embryonic_capacity: 0,
                sessions: (!count_only).then(Vec::new),
                counted_ms_ago: None,
            },
        })
    }

    /// Counts `s`, read at `now_ns` (session clock), if it matches, and lists it if it falls
    /// in the page.
    pub fn add(&mut self, key: &FlowKey, s: &Session, now_ns: u64) {
        let zone = zone_name(&self.zones, s.zone);
        let view = SessionView::from(key, s, &zone).read_at(s, now_ns);
        if !self.filter.matches(&view) {
            return;
        }
        let index = self.view.total;
        self.view.total += 1;
        *self.view.by_owner.entry(view.owner).or_insert(0) += 1;
        self.view.embryonic += u64::from(s.is_embryonic());
        if let Some(list) = &mut self.view.sessions {
            if index >= self.offset && (list.len() as u64) < self.limit {
                list.push(view);
            }
        }
    }

    /// [`Self::add`] for each key and value of a chunk.
    pub fn add_chunk(&mut self, keys: &[FlowKey], values: &[Session]) {
        // Read after the chunk: nothing in it is newer.
        let now = crate::datapath::monotonic_ns();
        for (key, s) in keys.iter().zip(values) {
            self.add(key, s, now);
        }
    }

    /// The view, with the table's capacities (`capacity`, `embryonic_capacity`).
    pub fn finish(self, capacity: u32, embryonic_capacity: u32) -> SessionsView {
        SessionsView {
            capacity: u64::from(capacity),
            embryonic_capacity: u64::from(embryonic_capacity),
            ..self.view
        }
    }
}

// ---------------------------------------------------------------------------------------------
// show counters

/// `show counters`: datapath counters by [`Counter::name`], and the peers' pool of the table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersView {
    pub counters: BTreeMap<String, u64>,
    /// The peers' pool (absent from an agent that did not say, or when a prefix was asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_pool: Option<PoolView>,
}

/// The peers' pool of the session table (`[local] replica_limit`; see
/// `hasync_common::ReplicaRoom`): assured copies of other members' sessions held, and the
/// limit past which peers' records that would add one are refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolView {
    pub held: u64,
    pub limit: u64,
}

impl CountersView {
    /// Every counter, or those whose name starts with `prefix`.
    pub fn new(values: &Counters, prefix: Option<&str>) -> CountersView {
        CountersView {
            counters: Counter::ALL
                .iter()
                .filter(|c| prefix.is_none_or(|p| c.name().starts_with(p)))
                .map(|&c| (c.name().to_owned(), values.get(c)))
                .collect(),
            replica_pool: None,
        }
    }

    /// With the peers' pool `held` of `limit`.
    pub fn with_pool(self, pool: Option<(u64, u64)>) -> CountersView {
        let replica_pool = pool.map(|(held, limit)| PoolView { held, limit });
        CountersView {
            replica_pool,
            ..self
        }
    }
}

// ---------------------------------------------------------------------------------------------
// show cluster statistics

/// Reasons a sync connection or frame is rejected, always listed (zeros included).
pub const REJECT_REASONS: [&str; 20] = [
    "bad-key",
    "wrong-cluster",
    "unknown-member",
    "disabled-member",
    "version",
    "malformed",
    "bad-frame",
    "zone-unknown",
    "unknown-address",
    "pre-auth-limit",
    "wrong-member",
    "duplicate-link",
    "other-boot",
    "unknown-owner",
    "foreign-owner",
    "stalled",
    "install-failed",
    "stale-frame",
    "bulk-incomplete",
    "table-full",
];

/// `show cluster statistics`: sync traffic per peer and link, full syncs, replication lag,
/// rejections.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatisticsView {
    pub peers: Vec<PeerStatisticsView>,
    /// Connections and frames refused, by reason: every one of [`REJECT_REASONS`] (zeros
    /// included) and any other reason counted.
    pub rejected: BTreeMap<String, u64>,
}

/// Sync statistics of one peer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerStatisticsView {
    pub id: u8,
    /// By link name (`ha4`, `ha4-backup`); HA4 backup only where it is configured.
    pub links: BTreeMap<String, LinkStatisticsView>,
    /// Records sent again (after a link failure or switch, or unacknowledged).
    pub resends: u64,
    /// Records from the peer installed in the session table.
    pub records_installed: u64,
    /// Delete records from the peer applied.
    pub records_deleted: u64,
    /// Records from the peer not applied because the local copy wins (version, owner).
    pub records_kept: u64,
    /// Removals of a replica this member carries the flow of: kept, orphaned, for this member
    /// to take over (counted as kept before stop 30).
    #[serde(default)]
    pub records_orphaned: u64,
    /// Records from the peer refused: their zone does not exist here.
    pub records_refused_zone: u64,
    /// Records from the peer refused: it may not speak for their owner (another live
    /// member's session outside a full sync, or an owner that is no configured member).
    #[serde(default)]
    pub records_refused_owner: u64,
    pub full_syncs: FullSyncsView,
    pub replication_lag: LagView,
    /// Records queued for the peer or sent and not acknowledged yet (filled by the agent from
    /// its backlog and window; 0 in views built from counters alone).
    #[serde(default)]
    pub records_pending: u64,
}

/// Traffic on one sync link to one peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatisticsView {
    pub records_sent: u64,
    pub records_received: u64,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub acks_sent: u64,
    pub acks_received: u64,
    pub keepalives_sent: u64,
    pub keepalives_received: u64,
    /// Of those, read after a later one of the peer (late on this link): not taken.
    #[serde(default)]
    pub keepalives_late: u64,
    /// Connections lost on this link (errors, silence, interface down).
    pub failures: u64,
    /// Of those, closed because writes to the peer made no progress (it stopped reading).
    #[serde(default)]
    pub stalls: u64,
}

/// Full syncs with one peer, both ways.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullSyncsView {
    /// Full syncs this member sent to the peer: each counts once the peer acknowledged the
    /// frame after its end (it read the end); a duration runs from its start to that ack.
    pub sent: FullSyncView,
    /// Full syncs the peer sent to this member.
    pub received: FullSyncView,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullSyncView {
    /// Full syncs completed.
    pub count: u64,
    /// Duration of the last completed one, in milliseconds; `None` before the first.
    pub last_duration_ms: Option<u64>,
    /// Session records of the last completed one; `None` before the first.
    pub last_records: Option<u64>,
    /// One is under way.
    pub running: bool,
}

/// Replication lag over recent changes (change queued → acknowledged by the peer), in
/// milliseconds; `None` before any sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LagView {
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl LinkStatisticsView {
    pub fn from_stats(link: &LinkStats) -> LinkStatisticsView {
        let LinkStats {
            records_sent,
            records_received,
            frames_sent,
            frames_received,
            bytes_sent,
            bytes_received,
            acks_sent,
            acks_received,
            keepalives_sent,
            keepalives_received,
            keepalives_late,
            failures,
            stalls,
        } = link;
        LinkStatisticsView {
            records_sent: LinkStats::get(records_sent),
            records_received: LinkStats::get(records_received),
            frames_sent: LinkStats::get(frames_sent),
            frames_received: LinkStats::get(frames_received),
            bytes_sent: LinkStats::get(bytes_sent),
            bytes_received: LinkStats::get(bytes_received),
            acks_sent: LinkStats::get(acks_sent),
            acks_received: LinkStats::get(acks_received),
            keepalives_sent: LinkStats::get(keepalives_sent),
            keepalives_received: LinkStats::get(keepalives_received),
            keepalives_late: LinkStats::get(keepalives_late),
            failures: LinkStats::get(failures),
            stalls: LinkStats::get(stalls),
        }
    }
}

impl From<BulkStats> for FullSyncView {
    fn from(b: BulkStats) -> FullSyncView {
        let BulkStats {
            count,
            last_records,
            last_duration_ms,
            running,
            started_ms: _,
        } = b;
        let done = count > 0;
        FullSyncView {
            count,
            last_duration_ms: done.then_some(last_duration_ms),
            last_records: done.then_some(last_records),
            running,
        }
    }
}

impl PeerStatisticsView {
    /// Peer `id`'s counters; the HA4-backup link is listed if `backup` (configured).
    pub fn from_stats(id: MemberId, stats: &PeerStats, backup: bool) -> PeerStatisticsView {
        use crate::lock::lock;
        let PeerStats {
            ha4,
            ha4_backup,
            resends,
            refused_zone,
            refused_owner,
            installed,
            deleted,
            kept,
            orphaned,
            lag,
            bulk_sent,
            bulk_received,
        } = stats;
        let mut links = BTreeMap::new();
        links.insert(
            LinkKind::Ha4.name().to_owned(),
            LinkStatisticsView::from_stats(ha4),
        );
        if backup {
            links.insert(
                LinkKind::Ha4Backup.name().to_owned(),
                LinkStatisticsView::from_stats(ha4_backup),
            );
        }
        let lag = lock(lag);
        PeerStatisticsView {
            id: id.0,
            links,
            resends: LinkStats::get(resends),
            records_installed: LinkStats::get(installed),
            records_deleted: LinkStats::get(deleted),
            records_kept: LinkStats::get(kept),
            records_orphaned: LinkStats::get(orphaned),
            records_refused_zone: LinkStats::get(refused_zone),
            records_refused_owner: LinkStats::get(refused_owner),
            full_syncs: FullSyncsView {
                sent: (*lock(bulk_sent)).into(),
                received: (*lock(bulk_received)).into(),
            },
            replication_lag: LagView {
                p50_ms: lag.quantile_ms(0.5),
                p99_ms: lag.quantile_ms(0.99),
            },
            records_pending: 0,
        }
    }
}

impl StatisticsView {
    /// The view of the sync engine's counters: `peers` yields each peer's id, counters and
    /// whether its HA4-backup link is configured.
    ///
    /// ```ignore
    /// StatisticsView::from_stats(
    ///     engine.peers().map(|p| (p.cfg.id, &p.stats, p.cfg.addrs.contains_key(&LinkKind::Ha4Backup))),
    ///     engine.rejections(),
    /// )
    /// ```
    pub fn from_stats<'a>(
        peers: impl IntoIterator<Item = (MemberId, &'a PeerStats, bool)>,
        rejections: &Rejections,
    ) -> StatisticsView {
        let mut peers: Vec<PeerStatisticsView> = peers
            .into_iter()
            .map(|(id, stats, backup)| PeerStatisticsView::from_stats(id, stats, backup))
            .collect();
        peers.sort_by_key(|p| p.id);
        let mut rejected: BTreeMap<String, u64> = REJECT_REASONS
            .iter()
            .map(|r| ((*r).to_owned(), 0))
            .collect();
        for (reason, n) in rejections.snapshot() {
            *rejected.entry(reason.to_owned()).or_insert(0) += n;
        }
        StatisticsView { peers, rejected }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{cluster::Timers, control::testing::Flow};

    fn zones() -> Vec<String> {
        vec!["trust".into(), "untrust".into()]
    }

    #[test]
    fn the_initiator_is_shown_as_source_whichever_endpoint_is_lower() {
        // Initiator is the lower endpoint.
        let (k, s) = Flow::tcp("198.18.0.10", 40000, "198.18.1.10", 80)
            .zone(1)
            .times(1_000_000_000, 5_000_000_000)
            .entry();
        assert!(!s.flags.has(SessionFlags::INITIATOR_HI));
        let v = SessionView::from(&k, &s, "trust").read_at(&s, s.last_seen_ns + 1_500_999_999);
        assert_eq!(
            serde_json::to_value(&v).unwrap(),
            serde_json::json!({
                "proto": "tcp", "src": "198.18.0.10", "sport": 40000,
                "dst": "198.18.1.10", "dport": 80, "state": "established",
                "owner": 1, "zone": "trust", "idle_ms": 1500
            })
        );
        // Seen after the clock was read (a packet during the walk): not idle at all.
        let v = SessionView::from(&k, &s, "trust").read_at(&s, s.last_seen_ns - 1);
        assert_eq!(v.idle_ms, Some(0));
        // An agent too old to send it: none, not 0.
        let mut old = serde_json::to_value(&v).unwrap();
        old.as_object_mut().unwrap().remove("idle_ms");
        let parsed: SessionView = serde_json::from_value(old).unwrap();
        assert_eq!(parsed.idle_ms, None);
        // Initiator is the higher endpoint: a reply-side address compares lower.
        let (k, s) = Flow::udp("198.18.1.10", 5353, "198.18.0.255", 53)
            .owner(2)
            .entry();
        assert!(s.flags.has(SessionFlags::INITIATOR_HI));
        let v = SessionView::from(&k, &s, "");
        assert_eq!(
            (v.src.to_string(), v.sport, v.dst.to_string(), v.dport),
            ("198.18.1.10".into(), 5353, "198.18.0.255".into(), 53)
        );
        assert_eq!(
            (v.proto.as_str(), v.state.as_str(), v.owner),
            ("udp", "udp-new", 2)
        );
    }

    #[test]
    fn ipv6_icmp_and_unknown_values_render() {
        let (k, s) = Flow::tcp("2001:db8::2", 50000, "2001:db8::1", 443)
            .state(State::SynSent)
            .owner(3)
            .entry();
        let v = SessionView::from(&k, &s, "untrust");
        assert_eq!(v.src, "2001:db8::2".parse::<IpAddr>().unwrap());
        assert_eq!(v.dst, "2001:db8::1".parse::<IpAddr>().unwrap());
        assert_eq!(
            (v.sport, v.dport, v.state.as_str()),
            (50000, 443, "syn-sent")
        );

        let (k, s) = Flow::icmp("10.0.0.1", "10.0.0.2", 77).entry();
        let v = SessionView::from(&k, &s, "trust");
        assert_eq!((v.proto.as_str(), v.sport, v.dport), ("icmp", 77, 77));

        let (mut k, mut s) = (k, s);
        k.proto = 132;
        s.state = 42;
        let v = SessionView::from(&k, &s, "trust");
        assert_eq!(
            (v.proto.as_str(), v.state.as_str()),
            ("proto-132", "state-42")
        );
    }

    #[test]
    fn zone_names_come_from_the_configured_order() {
        let z = zones();
        assert_eq!(zone_name(&z, ZoneId::NONE), "");
        assert_eq!(zone_name(&z, ZoneId(1)), "trust");
        assert_eq!(zone_name(&z, ZoneId(2)), "untrust");
        assert_eq!(zone_name(&z, ZoneId(9)), "zone-9");
    }

    fn table() -> Vec<(FlowKey, Session)> {
        let (a, b, c) = ("198.18.0.10", "198.18.1.10", "198.18.1.20");
        vec![
            Flow::tcp(a, 40000, b, 443).owner(1).zone(1).entry(),
            Flow::tcp(a, 40001, c, 443)
                .state(State::SynSent)
                .owner(2)
                .zone(1)
                .entry(),
            Flow::udp(b, 5353, a, 53)
                .state(State::UdpReplied)
                .traffic([3, 2], [300, 200])
                .owner(1)
                .zone(2)
                .entry(),
            Flow::icmp(a, c, 443).owner(2).zone(2).entry(),
            Flow::tcp("2001:db8::1", 1234, "2001:db8::2", 22)
                .owner(3)
                .entry(),
        ]
    }

    fn page(filter: SessionFilter, offset: u64, limit: Option<u64>) -> SessionsView {
        let t = table();
        let (keys, values): (Vec<_>, Vec<_>) = t.into_iter().unzip();
        let mut p = SessionPage::new(false, filter, offset, limit, &zones()).expect("filter");
        p.add_chunk(&keys[..2], &values[..2]);
        p.add_chunk(&keys[2..], &values[2..]);
        p.finish(1024, 128)
    }

    fn sports(v: &SessionsView) -> Vec<u16> {
        v.sessions
            .as_ref()
            .unwrap()
            .iter()
            .map(|s| s.sport)
            .collect()
    }

    #[test]
    fn filters_select_sessions_and_totals_count_the_matches() {
        // Each row: a filter, the matching sessions' source ports.
        let addr = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        for (filter, want) in [
            (
                SessionFilter::default(),
                vec![40000, 40001, 5353, 443, 1234],
            ),
            (
                SessionFilter {
                    owner: Some(2),
                    ..Default::default()
                },
                vec![40001, 443],
            ),
            (
                SessionFilter {
                    zone: Some("untrust".into()),
                    ..Default::default()
                },
                vec![5353, 443],
            ),
            (
                SessionFilter {
                    proto: Some("tcp".into()),
                    ..Default::default()
                },
                vec![40000, 40001, 1234],
            ),
            // Either endpoint.
            (
                SessionFilter {
                    address: addr("198.18.1.10"),
                    ..Default::default()
                },
                vec![40000, 5353],
            ),
            (
                SessionFilter {
                    address: addr("2001:db8::2"),
                    ..Default::default()
                },
                vec![1234],
            ),
            // Either port; the ICMP echo id 443 is not a port.
            (
                SessionFilter {
                    port: Some(443),
                    ..Default::default()
                },
                vec![40000, 40001],
            ),
            (
                SessionFilter {
                    port: Some(53),
                    ..Default::default()
                },
                vec![5353],
            ),
            (
                SessionFilter {
                    state: Some("established".into()),
                    ..Default::default()
                },
                vec![40000, 1234],
            ),
            // Conditions combine.
            (
                SessionFilter {
                    proto: Some("tcp".into()),
                    owner: Some(1),
                    port: Some(443),
                    ..Default::default()
                },
                vec![40000],
            ),
        ] {
            let v = page(filter.clone(), 0, None);
            assert_eq!(sports(&v), want, "{filter:?}");
            assert_eq!(v.total, want.len() as u64, "{filter:?}");
            assert_eq!(v.by_owner.values().sum::<u64>(), v.total, "{filter:?}");
        }
    }

    #[test]
    fn pages_skip_offset_and_stop_at_limit_but_totals_count_all() {
        let v = page(SessionFilter::default(), 1, Some(2));
        assert_eq!(sports(&v), [40001, 5353]);
        assert_eq!(v.total, 5);
        assert_eq!(v.by_owner, BTreeMap::from([(1, 2), (2, 2), (3, 1)]));
        let v = page(SessionFilter::default(), 10, Some(2));
        assert_eq!(sports(&v), Vec::<u16>::new());
        assert_eq!(v.total, 5);

        let mut count =
            SessionPage::new(true, SessionFilter::default(), 0, None, &zones()).unwrap();
        for (k, s) in table() {
            count.add(&k, &s, 0);
        }
        let v = count.finish(1024, 128);
        assert_eq!(v.sessions, None);
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"total": 5, "by_owner": {"1": 2, "2": 2, "3": 1},
                "embryonic": 3, "capacity": 1024, "embryonic_capacity": 128})
        );
        // An older agent's answer lacks the capacities and the embryonic count.
        let old: SessionsView =
            serde_json::from_value(serde_json::json!({"total": 5, "by_owner": {}})).unwrap();
        assert_eq!((old.embryonic, old.capacity), (0, 0));
        let back: SessionsView = serde_json::from_value(json).unwrap();
        assert_eq!(back, v);

        let bad = SessionFilter {
            zone: Some("dmz".into()),
            ..Default::default()
        };
        let e = SessionPage::new(false, bad, 0, None, &zones()).expect_err("unknown zone");
        assert!(e.contains("zone \"dmz\" is not configured"), "{e}");
        // A page of 0 or of more than the most was quietly made something else (an empty
        // page, which the CLI took for an offset past the end; a cut one): seen failing.
        for limit in [0, MAX_SESSION_PAGE + 1] {
            let any = SessionFilter::default();
            let e = SessionPage::new(false, any, 0, Some(limit), &zones()).expect_err("limit");
            assert!(
                e.contains(&format!("limit {limit} is out of range 1–")),
                "{e}"
            );
        }
    }

    #[test]
    fn counters_are_named_and_filtered_by_prefix() {
        let mut c = Counters::default();
        c.add(Counter::Packets, 10);
        c.add(Counter::ErrTcpFlags, 3);
        let all = CountersView::new(&c, None);
        assert_eq!(all.counters.len(), Counter::ALL.len());
        assert_eq!(all.counters["packets"], 10);
        let errs = CountersView::new(&c, Some("err-tcp"));
        assert_eq!(
            serde_json::to_value(&errs).unwrap(),
            serde_json::json!({"counters": {"err-tcp-data-offset": 0, "err-tcp-flags": 3, "err-tcp-truncated": 0}})
        );
    }

    #[test]
    fn statistics_come_from_the_sync_counters() {
        use crate::sync::stats::{BulkStats, LinkStats, PeerStats, Rejections};
        let a = PeerStats::default();
        LinkStats::add(&a.ha4.records_sent, 10);
        LinkStats::add(&a.ha4_backup.failures, 1);
        LinkStats::add(&a.resends, 3);
        *a.bulk_received.lock().unwrap() = BulkStats {
            count: 2,
            last_records: 500,
            last_duration_ms: 40,
            running: true,
            started_ms: 0,
        };
        a.lag.lock().unwrap().record(Duration::from_millis(2));
        let b = PeerStats::default();
        let r = Rejections::default();
        r.count(crate::sync::stats::Rejection::WrongCluster);
        r.count(crate::sync::stats::Rejection::Connection);
        let v = StatisticsView::from_stats([(MemberId(3), &b, false), (MemberId(2), &a, true)], &r);
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["peers"][0]["id"], 2, "by id");
        assert_eq!(json["peers"][0]["links"]["ha4"]["records_sent"], 10);
        assert_eq!(json["peers"][0]["links"]["ha4-backup"]["failures"], 1);
        assert_eq!(json["peers"][0]["resends"], 3);
        assert_eq!(
            json["peers"][0]["full_syncs"],
            serde_json::json!({
                "sent": {"count": 0, "last_duration_ms": null, "last_records": null, "running": false},
                "received": {"count": 2, "last_duration_ms": 40, "last_records": 500, "running": true},
            })
        );
        assert_eq!(
            json["peers"][0]["replication_lag"],
            serde_json::json!({"p50_ms": 2.0, "p99_ms": 2.0})
        );
        assert_eq!(
            json["peers"][1]["links"].as_object().unwrap().len(),
            1,
            "no backup link"
        );
        assert_eq!(
            json["peers"][1]["replication_lag"]["p50_ms"],
            serde_json::Value::Null
        );
        // Every known reason, zeros included, and any other reason counted.
        assert_eq!(v.rejected.len(), REJECT_REASONS.len() + 1);
        assert_eq!(
            (v.rejected["wrong-cluster"], v.rejected["connection"]),
            (1, 1)
        );
        assert_eq!(v.rejected["bad-key"], 0);
        let back: StatisticsView = serde_json::from_value(json).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn members_and_flaps_views_come_from_the_membership() {
        let t0 = Instant::now();
        let timers = Timers {
            keepalive_threshold: Duration::from_secs(10),
            sync_timeout: Duration::ZERO,
            tentative_hold: Duration::from_secs(60),
            monitor_hold_down: Duration::from_secs(60),
            discovery: Duration::from_secs(1),
        };
        let mut m = Membership::new(
            MemberId(1),
            timers,
            vec![
                (MemberId(2), "FW-B".into(), true),
                (MemberId(3), "FW-C".into(), true),
            ],
            t0,
        );
        m.heard(
            MemberId(2),
            MemberState::Active,
            42,
            t0 + Duration::from_secs(1),
        );
        m.set_link(MemberId(2), LinkKind::Ha4, LinkState::Up);
        m.set_link(MemberId(2), LinkKind::Ha4Backup, LinkState::Down);
        let bulk = crate::cluster::FullSyncId { boot: 1, id: 1 };
        m.bulk_started(MemberId(2), bulk);
        m.bulk_ended(MemberId(2), bulk);
        m.evaluate(t0 + Duration::from_secs(2));
        let now = t0 + Duration::from_secs(32);
        // Not heard for 31 s: down, one flap.
        m.evaluate(now);
        let local = MemberView::local(&m, "FW-A", 7, LinkState::Up, LinkState::NotConfigured, now);
        let view = MembersView::new(
            ClusterId(7),
            &m,
            local,
            |id| (id == MemberId(2)).then_some((1, 0)),
            now,
        );
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["cluster_id"], 7);
        assert_eq!(json["local"], 1);
        let ids: Vec<_> = view.members.iter().map(|m| m.id).collect();
        assert_eq!(ids, [1, 2, 3]);
        assert_eq!(
            json["members"][1],
            serde_json::json!({
                "id": 2, "serial": "FW-B", "state": "down", "ha4": "up", "ha4_backup": "down",
                "sessions_owned": 42, "flaps": 1, "version": "1.0", "last_change": 0
            }),
            "{json:#}"
        );
        let c = &view.members[2];
        assert_eq!(
            (
                c.state.as_str(),
                c.ha4.as_str(),
                c.ha4_backup.as_str(),
                c.version.as_deref(),
                c.last_change
            ),
            ("unknown", "down", "not-configured", None, None)
        );
        assert_eq!(
            view.members[0].version,
            Some(version_string(PROTO_MAJOR, PROTO_MINOR)),
            "the local member shows its own version"
        );
        let back: MembersView = serde_json::from_value(json).unwrap();
        assert_eq!(back, view);

        let flaps = FlapsView::from_membership(&m, now);
        assert_eq!(
            serde_json::to_value(&flaps).unwrap()["members"][1],
            serde_json::json!({"id": 2, "flaps": 1, "last_change": 0})
        );
    }

    /// A full session page (100,000 sessions) is rendered straight to the text it is sent
    /// as, never through a tree of JSON values: the answer holds its text and little more.
    /// (Through a tree, the answer to such a page took 69 MiB for its 13 MB of text.)
    #[test]
    fn a_full_session_page_is_rendered_straight_to_text() {
        use crate::{alloc_count::held, control::protocol::Response};
        let keys: Vec<FlowKey> = (0..100_000)
            .map(crate::datapath::testing::udp_key)
            .collect();
        let values = vec![Session::default(); keys.len()];
        let mut page =
            SessionPage::new(false, SessionFilter::default(), 0, None, &[]).expect("a page");
        for (k, v) in keys.chunks(128).zip(values.chunks(128)) {
            page.add_chunk(k, v);
        }
        let view = page.finish(1 << 20, 1 << 17);
        assert_eq!(view.sessions.as_ref().map(Vec::len), Some(keys.len()));
        let before = held();
        let response = Response::ok(&view);
        let grew = held() - before;
        let text = isize::try_from(response.data.get().len()).expect("fits");
        assert!(
            grew <= text + text / 4,
            "the answer holds {grew} bytes for {text} bytes of text"
        );
    }
}
