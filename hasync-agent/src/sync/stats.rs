//! Sync counters: per peer and link, rejections by reason, full syncs, replication lag.
//! Atomics and small bounded structures only; read by `show cluster statistics` and metrics.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Mutex,
    },
    time::Duration,
};

use super::wire::LinkKind;

/// Counters of one link to one peer.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub records_sent: AtomicU64,
    pub records_received: AtomicU64,
    pub frames_sent: AtomicU64,
    pub frames_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub acks_sent: AtomicU64,
    pub acks_received: AtomicU64,
    pub keepalives_sent: AtomicU64,
    pub keepalives_received: AtomicU64,
    /// Of those, read after a later one of the peer (a copy late on this link): not taken.
    pub keepalives_late: AtomicU64,
    /// Connections lost on this link (errors, silence, interface down).
    pub failures: AtomicU64,
    /// Of those, connections closed because a write made no progress (the peer stopped
    /// reading) or a frame waited longer than the keepalive threshold for its
    /// acknowledgement (the peer reads and does not apply).
    pub stalls: AtomicU64,
}

impl LinkStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}

/// Samples of the replication lag (change queued → acknowledged by the peer).
#[derive(Debug, Default)]
pub struct Lag {
    samples: VecDeque<u32>,
}

impl Lag {
    const KEEP: usize = 4096;

    pub fn record(&mut self, lag: Duration) {
        if self.samples.len() == Self::KEEP {
            self.samples.pop_front();
        }
        self.samples
            .push_back(u32::try_from(lag.as_micros()).unwrap_or(u32::MAX));
    }

    /// The `q` quantile (0–1) of the recent samples, in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.samples.is_empty() {
            return None;
        }
        let mut v: Vec<u32> = self.samples.iter().copied().collect();
        v.sort_unstable();
        let idx = ((v.len() - 1) as f64 * q).round() as usize;
        v.get(idx).map(|us| f64::from(*us) / 1000.0)
    }
}

/// Full syncs with one peer, in one direction.
#[derive(Debug, Default, Clone, Copy)]
pub struct BulkStats {
    pub count: u64,
    pub last_records: u64,
    pub last_duration_ms: u64,
    pub running: bool,
    /// When the running full sync started (session clock, ms).
    pub started_ms: u64,
}

/// Everything counted about one peer.
#[derive(Debug, Default)]
pub struct PeerStats {
    pub ha4: LinkStats,
    pub ha4_backup: LinkStats,
    /// Records sent again after a link failure or switch.
    pub resends: AtomicU64,
    /// Records refused: zone unknown here.
    pub refused_zone: AtomicU64,
    /// Records refused: the peer may not speak for their owner.
    pub refused_owner: AtomicU64,
    pub installed: AtomicU64,
    pub deleted: AtomicU64,
    pub kept: AtomicU64,
    /// Removals of a replica this member carries the flow of (kept, orphaned, to take over).
    pub orphaned: AtomicU64,
    pub lag: Mutex<Lag>,
    pub bulk_sent: Mutex<BulkStats>,
    pub bulk_received: Mutex<BulkStats>,
}

impl PeerStats {
    pub fn link(&self, link: LinkKind) -> &LinkStats {
        match link {
            LinkKind::Ha4 => &self.ha4,
            LinkKind::Ha4Backup => &self.ha4_backup,
        }
    }
}

/// Why a connection, a frame or a record was turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejection {
    /// Before the handshake: the source is no member's address on this link.
    UnknownAddress,
    /// Before the handshake: too many handshakes under way from the source, or in all.
    PreAuthLimit,
    /// The connection failed (not counted: the link's failures are).
    Connection,
    /// The handshake failed: another cluster key.
    BadKey,
    /// A frame failed authentication or decryption.
    BadFrame,
    /// A message does not decode, or says what it may not.
    Malformed,
    /// A write made no progress: the peer stopped reading.
    Stalled,
    /// The handshake and hello took too long.
    Timeout,
    /// The hello's protocol version is too far from ours.
    Version,
    /// The hello names another cluster.
    WrongCluster,
    /// The hello names a member the configuration lacks.
    UnknownMember,
    /// The hello names a member the configuration disables.
    DisabledMember,
    /// The hello names another member than the one configured at its address.
    WrongMember,
    /// The peer already has a live connection on this link.
    DuplicateLink,
    /// The peer has a live connection of another boot (on the other link).
    OtherBoot,
    /// A frame of a connection or a boot that was replaced.
    StaleFrame,
    /// A full sync ended without all its records.
    BulkIncomplete,
    /// Records of a zone this member lacks.
    ZoneUnknown,
    /// Records the session table had no room for: the table full, or the peers' pool of it
    /// (`[local] replica_limit`; the datapath counter `replicas-over-limit` tells which).
    TableFull,
    /// Records naming an owner the sender may not speak for: unknown to the configuration.
    UnknownOwner,
    /// Records naming another live member as owner.
    ForeignOwner,
    /// Records whose key no packet makes (a protocol the datapath does not track, another
    /// family's ICMP, addresses or ports out of order): they name no flow.
    UntrackableKey,
    /// Records whose state no session of their key's protocol has (an unknown state, a UDP
    /// state for a TCP key, ...).
    InvalidState,
}

impl Rejection {
    pub const ALL: [Rejection; 23] = [
        Rejection::UnknownAddress,
        Rejection::PreAuthLimit,
        Rejection::Connection,
        Rejection::BadKey,
        Rejection::BadFrame,
        Rejection::Malformed,
        Rejection::Stalled,
        Rejection::Timeout,
        Rejection::Version,
        Rejection::WrongCluster,
        Rejection::UnknownMember,
        Rejection::DisabledMember,
        Rejection::WrongMember,
        Rejection::DuplicateLink,
        Rejection::OtherBoot,
        Rejection::StaleFrame,
        Rejection::BulkIncomplete,
        Rejection::ZoneUnknown,
        Rejection::TableFull,
        Rejection::UnknownOwner,
        Rejection::ForeignOwner,
        Rejection::UntrackableKey,
        Rejection::InvalidState,
    ];

    /// The name counters, logs and `show cluster statistics` use.
    pub const fn name(self) -> &'static str {
        match self {
            Rejection::UnknownAddress => "unknown-address",
            Rejection::PreAuthLimit => "pre-auth-limit",
            Rejection::Connection => "connection",
            Rejection::BadKey => "bad-key",
            Rejection::BadFrame => "bad-frame",
            Rejection::Malformed => "malformed",
            Rejection::Stalled => "stalled",
            Rejection::Timeout => "timeout",
            Rejection::Version => "version",
            Rejection::WrongCluster => "wrong-cluster",
            Rejection::UnknownMember => "unknown-member",
            Rejection::DisabledMember => "disabled-member",
            Rejection::WrongMember => "wrong-member",
            Rejection::DuplicateLink => "duplicate-link",
            Rejection::OtherBoot => "other-boot",
            Rejection::StaleFrame => "stale-frame",
            Rejection::BulkIncomplete => "bulk-incomplete",
            Rejection::ZoneUnknown => "zone-unknown",
            Rejection::TableFull => "table-full",
            Rejection::UnknownOwner => "unknown-owner",
            Rejection::ForeignOwner => "foreign-owner",
            Rejection::UntrackableKey => "untrackable-key",
            Rejection::InvalidState => "invalid-state",
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Connections, frames and records turned away, by [`Rejection`].
#[derive(Debug, Default)]
pub struct Rejections {
    by_reason: [AtomicU64; Rejection::ALL.len()],
}

impl Rejections {
    /// Counts one; returns true the first time this reason is seen (to log it once).
    pub fn count(&self, reason: Rejection) -> bool {
        self.count_n(reason, 1)
    }

    /// Counts `n` at once; true if they are the first of their reason.
    pub fn count_n(&self, reason: Rejection, n: u64) -> bool {
        if n == 0 {
            return false;
        }
        let Some(counter) = self.by_reason.get(reason as usize) else {
            return false;
        };
        counter.fetch_add(n, Relaxed) == 0
    }

    /// The reasons seen so far, by name, with their counts.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        Rejection::ALL
            .iter()
            .zip(&self.by_reason)
            .map(|(r, n)| (r.name(), n.load(Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    pub fn total(&self) -> u64 {
        self.by_reason.iter().map(|n| n.load(Relaxed)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_quantiles_come_from_recent_samples() {
        let mut lag = Lag::default();
        assert_eq!(lag.quantile_ms(0.5), None);
        for ms in 1..=100 {
            lag.record(Duration::from_millis(ms));
        }
        assert_eq!(lag.quantile_ms(0.5), Some(51.0));
        assert_eq!(lag.quantile_ms(0.99), Some(99.0));
        for _ in 0..Lag::KEEP {
            lag.record(Duration::from_millis(7));
        }
        assert_eq!(lag.quantile_ms(0.99), Some(7.0), "old samples age out");
    }

    #[test]
    fn rejections_count_by_reason_and_report_first_sight() {
        let r = Rejections::default();
        assert!(r.count(Rejection::BadKey));
        assert!(!r.count(Rejection::BadKey));
        assert!(r.count(Rejection::WrongCluster));
        assert!(!r.count_n(Rejection::TableFull, 0), "nothing counted");
        assert_eq!(r.snapshot().get("bad-key"), Some(&2));
        assert_eq!(r.snapshot().len(), 2);
        assert_eq!(r.total(), 3);
    }

    #[test]
    fn every_rejection_has_its_own_slot_and_name() {
        for (i, r) in Rejection::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r}: ALL is in declaration order");
        }
        let names: std::collections::BTreeSet<_> =
            Rejection::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), Rejection::ALL.len(), "names are unique");
    }
}
