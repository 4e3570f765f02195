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
    /// Connections lost on this link (errors, silence, interface down).
    pub failures: AtomicU64,
    /// Of those, connections closed because a write made no progress (the peer stopped
    /// reading).
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

/// Connections and frames rejected, by reason ("bad-key", "wrong-cluster", ...).
#[derive(Debug, Default)]
pub struct Rejections {
    by_reason: Mutex<BTreeMap<&'static str, u64>>,
}

impl Rejections {
    /// Counts one; returns true the first time this reason is seen (to log it once).
    pub fn count(&self, reason: &'static str) -> bool {
        self.count_n(reason, 1)
    }

    /// Counts `n` refusals for `reason` at once; true if they are the first.
    pub fn count_n(&self, reason: &'static str, n: u64) -> bool {
        if n == 0 {
            return false;
        }
        let mut m = self.by_reason.lock().unwrap_or_else(|e| e.into_inner());
        let total = m.entry(reason).or_insert(0);
        let first = *total == 0;
        *total += n;
        first
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.by_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn total(&self) -> u64 {
        self.snapshot().values().sum()
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
        assert!(r.count("bad-key"));
        assert!(!r.count("bad-key"));
        assert!(r.count("wrong-cluster"));
        assert_eq!(r.snapshot().get("bad-key"), Some(&2));
        assert_eq!(r.total(), 3);
    }
}
