//! The last 15 minutes the dashboard graphs, kept in the agent: every [`SAMPLE_EVERY`] the
//! metrics server takes a [`Snapshot`] and [`History::observe`] turns it into one [`Sample`]
//! (sessions owned and cached, sync records per second and replication lag p99 per peer,
//! HA4 / HA4 backup errors in the interval), plus a [`Mark`] for every member whose state
//! changed. Memory is bounded: at most [`SAMPLES`] samples and [`MARKS`] marks, each of a
//! size bounded by the number of members (16).
//!
//! `/api/history` serves [`HistoryView`].

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{metrics::Snapshot, sync::wire::LinkKind};

/// How often a sample is taken.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// How far back the graphs reach.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Samples kept: [`WINDOW`] / [`SAMPLE_EVERY`].
pub const SAMPLES: usize = (WINDOW.as_secs() / SAMPLE_EVERY.as_secs()) as usize;
/// State changes kept.
pub const MARKS: usize = 64;

/// One point of every graph.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Wall-clock time, ms since the Unix epoch.
    pub t: u64,
    /// Sessions this member owns, and peers' copies held here.
    pub owned: u64,
    pub cached: u64,
    /// Session records sent and received per second since the last sample, by peer id.
    pub records_per_s: BTreeMap<u8, f64>,
    /// Replication lag p99 in ms, by peer id (peers with recent changes only).
    pub lag_p99_ms: BTreeMap<u8, f64>,
    /// Connections lost since the last sample, by link name (`ha4`, `ha4-backup`).
    pub errors: BTreeMap<String, u64>,
}

/// A member's state changed (as this member sees it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub t: u64,
    pub member: u8,
    pub state: String,
}

/// `/api/history`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HistoryView {
    pub sample_every_ms: u64,
    pub window_ms: u64,
    pub samples: Vec<Sample>,
    pub marks: Vec<Mark>,
}

/// Running totals from the last snapshot, to turn counters into rates.
#[derive(Clone, Debug, Default)]
struct Totals {
    t: u64,
    records: BTreeMap<u8, u64>,
    errors: BTreeMap<String, u64>,
}

/// The graphs' memory.
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
    marks: VecDeque<Mark>,
    last: Option<Totals>,
    states: BTreeMap<u8, String>,
}

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl History {
    /// Adds the sample `snapshot` gives at `t` (ms since the epoch), and a mark per member
    /// whose state differs from the last snapshot's (none for the first one).
    pub fn observe(&mut self, snapshot: &Snapshot, t: u64) {
        // The wall clock stepped back: what was sampled "after" `t` goes.
        while self.samples.back().is_some_and(|s| s.t > t) {
            self.samples.pop_back();
        }
        while self.marks.back().is_some_and(|m| m.t > t) {
            self.marks.pop_back();
        }
        let totals = totals(snapshot, t);
        let (owned, cached) = snapshot.sessions.owned_and_cached(snapshot.members.local);
        let mut sample = Sample {
            t,
            owned,
            cached,
            ..Sample::default()
        };
        if let Some(last) = self.last.as_ref().filter(|l| l.t < t) {
            let secs = (t - last.t) as f64 / 1000.0;
            for (peer, n) in &totals.records {
                let before = last.records.get(peer).copied().unwrap_or(0);
                sample
                    .records_per_s
                    .insert(*peer, n.saturating_sub(before) as f64 / secs);
            }
            for (link, n) in &totals.errors {
                let before = last.errors.get(link).copied().unwrap_or(0);
                sample.errors.insert(link.clone(), n.saturating_sub(before));
            }
        }
        for p in &snapshot.statistics.peers {
            if let Some(ms) = p.replication_lag.p99_ms {
                sample.lag_p99_ms.insert(p.id, ms);
            }
        }
        self.mark_changes(snapshot, t);
        push_bounded(&mut self.samples, sample, SAMPLES);
        self.last = Some(totals);
    }

    fn mark_changes(&mut self, snapshot: &Snapshot, t: u64) {
        let first = self.states.is_empty();
        for m in &snapshot.members.members {
            let was = self.states.insert(m.id, m.state.clone());
            if !first && was.as_ref() != Some(&m.state) {
                let mark = Mark {
                    t,
                    member: m.id,
                    state: m.state.clone(),
                };
                push_bounded(&mut self.marks, mark, MARKS);
            }
        }
    }

    /// What `/api/history` serves: the samples and marks of the last [`WINDOW`].
    pub fn view(&self) -> HistoryView {
        let since = self
            .samples
            .back()
            .map_or(0, |s| s.t.saturating_sub(WINDOW.as_millis() as u64));
        HistoryView {
            sample_every_ms: SAMPLE_EVERY.as_millis() as u64,
            window_ms: WINDOW.as_millis() as u64,
            samples: self
                .samples
                .iter()
                .filter(|s| s.t >= since)
                .cloned()
                .collect(),
            marks: self
                .marks
                .iter()
                .filter(|m| m.t >= since)
                .cloned()
                .collect(),
        }
    }
}

fn push_bounded<T>(queue: &mut VecDeque<T>, item: T, bound: usize) {
    while queue.len() >= bound {
        queue.pop_front();
    }
    queue.push_back(item);
}

/// The counters a sample takes differences of: records sent and received by peer, and
/// connections lost by link.
fn totals(snapshot: &Snapshot, t: u64) -> Totals {
    let mut totals = Totals {
        t,
        ..Totals::default()
    };
    for p in &snapshot.statistics.peers {
        let records = p.links.values().fold(0u64, |sum, l| {
            sum.saturating_add(l.records_sent)
                .saturating_add(l.records_received)
        });
        totals.records.insert(p.id, records);
        for (link, l) in &p.links {
            let errors = totals.errors.entry(link.clone()).or_insert(0);
            *errors = errors.saturating_add(l.failures);
        }
    }
    for link in [LinkKind::Ha4, LinkKind::Ha4Backup] {
        totals.errors.entry(link.name().to_owned()).or_insert(0);
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::view::{LinkStatisticsView, MemberView, PeerStatisticsView};

    fn snapshot(records: u64, failures: u64, fw2: &str) -> Snapshot {
        let mut s = Snapshot::default();
        s.members.local = 1;
        for (id, state) in [(1, "active"), (2, fw2)] {
            s.members.members.push(MemberView {
                id,
                state: state.into(),
                ..MemberView::default()
            });
        }
        let link = LinkStatisticsView {
            records_sent: records,
            records_received: records,
            failures,
            ..LinkStatisticsView::default()
        };
        let mut peer = PeerStatisticsView {
            id: 2,
            ..PeerStatisticsView::default()
        };
        peer.links.insert("ha4".into(), link);
        peer.replication_lag.p99_ms = Some(1.5);
        s.statistics.peers.push(peer);
        s.sessions.total = 30;
        s.sessions.by_owner = [(1, 10), (2, 20)].into();
        s
    }

    #[test]
    fn samples_are_rates_and_deltas_and_state_changes_are_marked() {
        let mut h = History::default();
        h.observe(&snapshot(100, 1, "active"), 10_000);
        h.observe(&snapshot(300, 3, "down"), 12_000);
        let v = h.view();
        assert_eq!(v.samples.len(), 2);
        let s = &v.samples[1];
        assert_eq!((s.owned, s.cached), (10, 20));
        assert_eq!(s.records_per_s.get(&2), Some(&200.0), "400 records in 2 s");
        assert_eq!(s.errors.get("ha4"), Some(&2));
        assert_eq!(s.errors.get("ha4-backup"), Some(&0));
        assert_eq!(s.lag_p99_ms.get(&2), Some(&1.5));
        assert!(
            v.samples[0].records_per_s.is_empty(),
            "no rate from one sample"
        );
        assert_eq!(
            v.marks,
            [Mark {
                t: 12_000,
                member: 2,
                state: "down".into()
            }]
        );
    }

    /// The wall clock stepped back (NTP, an operator): samples and marks from the "future"
    /// are dropped, not drawn past the graph's right edge (before stop 42 they stayed: seen
    /// failing); counters near the top of their range are summed without a panic.
    #[test]
    fn a_clock_stepped_back_drops_the_later_samples() {
        let mut h = History::default();
        h.observe(&snapshot(100, 1, "active"), 10_000);
        h.observe(&snapshot(200, 1, "down"), 12_000);
        h.observe(&snapshot(u64::MAX, 1, "active"), 11_000);
        let v = h.view();
        let times: Vec<u64> = v.samples.iter().map(|s| s.t).collect();
        assert_eq!(times, [10_000, 11_000]);
        assert!(v.marks.iter().all(|m| m.t <= 11_000), "{:?}", v.marks);
    }

    #[test]
    fn memory_is_bounded_to_the_window() {
        let mut h = History::default();
        let step = SAMPLE_EVERY.as_millis() as u64;
        for i in 0..(SAMPLES as u64 * 3) {
            let state = if i % 2 == 0 { "active" } else { "down" };
            h.observe(&snapshot(i, 0, state), 1_000_000 + i * step);
        }
        assert_eq!(h.samples.len(), SAMPLES);
        assert_eq!(h.marks.len(), MARKS);
        let v = h.view();
        let span = v.samples.last().unwrap().t - v.samples[0].t;
        assert!(span <= WINDOW.as_millis() as u64, "{span}");
    }
}
