//! A chaos run's results: what was applied, what was measured, what broke, and the table the
//! README shows.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

/// One applied step.
#[derive(Clone, Debug)]
pub struct Applied {
    pub kind: &'static str,
    pub what: String,
    /// Time from healing to equal replicas; `None` if not within the bound.
    pub convergence: Option<Duration>,
}

/// Everything a run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub members: u8,
    pub lanes: u8,
    pub seed: u64,
    /// The UDP timeout, when sessions expired during the run.
    pub udp_timeout: Option<Duration>,
    /// With expiry: the longest a UDP session any checkpoint found had been idle (its bound:
    /// the timeout and [`super::EXPIRY_SLACK`]).
    pub oldest_udp: Option<Duration>,
    pub wall: Duration,
    pub convergence_bound: Duration,
    pub stall_bound: Duration,
    pub rss_bound_kib: u64,
    pub fd_bound: u64,
    pub thread_bound: u64,
    pub applied: Vec<Applied>,
    /// Distinct sessions compared across all members, summed over checkpoints.
    pub sessions_checked: u64,
    /// Sessions an owner had that a replica still lacked at the bound, plus lane connections
    /// missing from a member.
    pub lost: u64,
    pub peak_rss_kib: u64,
    pub peak_fds: u64,
    pub peak_threads: u64,
    pub longest_stall: Duration,
    /// Most full syncs one member sent one peer, and that pair's bound.
    pub most_full_syncs: (u64, u64),
    pub violations: Vec<String>,
    /// Facts worth reading that are not invariants (refusals counted, flood sizes...).
    pub notes: Vec<String>,
}

/// The `q` quantile (0–1) of `values`, nearest rank.
pub fn quantile(values: &[Duration], q: f64) -> Option<Duration> {
    let mut v = values.to_vec();
    v.sort_unstable();
    let last = v.len().checked_sub(1)?;
    let rank = ((q * v.len() as f64).ceil() as usize)
        .saturating_sub(1)
        .min(last);
    v.get(rank).copied()
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "–".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
}

impl Report {
    pub fn convergence_times(&self) -> Vec<Duration> {
        self.applied.iter().filter_map(|a| a.convergence).collect()
    }

    pub fn violation(&mut self, v: String) {
        eprintln!("chaos: VIOLATION {v}");
        self.violations.push(v);
    }

    pub fn note(&mut self, n: String) {
        eprintln!("chaos: {n}");
        self.notes.push(n);
    }

    /// The summary table (Markdown), then one row per fault kind.
    pub fn markdown(&self) -> String {
        let mut t = String::new();
        let expiry = self.udp_timeout.map_or_else(String::new, |d| {
            format!(", UDP sessions expiring after {} s", d.as_secs())
        });
        let _ = writeln!(
            t,
            "Chaos run: {} members, {} lanes, seed {}, {:.0} s wall time{expiry}.\n",
            self.members,
            self.lanes,
            self.seed,
            self.wall.as_secs_f64()
        );
        let _ = writeln!(t, "| figure | value | bound |\n|---|---|---|");
        for (name, value, bound) in self.summary_rows() {
            let _ = writeln!(t, "| {name} | {value} | {bound} |");
        }
        let _ = writeln!(
            t,
            "\n| fault | applied | converged | p50 | max |\n|---|---|---|---|---|"
        );
        let mut kinds: BTreeMap<&str, Vec<&Applied>> = BTreeMap::new();
        for a in &self.applied {
            kinds.entry(a.kind).or_default().push(a);
        }
        for (kind, list) in &kinds {
            let times: Vec<Duration> = list.iter().filter_map(|a| a.convergence).collect();
            let _ = writeln!(
                t,
                "| {kind} | {} | {} | {} | {} |",
                list.len(),
                times.len(),
                secs(quantile(&times, 0.5)),
                secs(times.iter().max().copied())
            );
        }
        t
    }

    /// The summary table's rows: figure, value, bound.
    fn summary_rows(&self) -> Vec<(&'static str, String, String)> {
        let times = self.convergence_times();
        let mut rows = vec![
            (
                "faults applied",
                self.applied.len().to_string(),
                String::new(),
            ),
            (
                "sessions checked",
                self.sessions_checked.to_string(),
                String::new(),
            ),
            ("sessions lost", self.lost.to_string(), "0".into()),
            (
                "convergence p50 / p99",
                format!(
                    "{} / {}",
                    secs(quantile(&times, 0.5)),
                    secs(quantile(&times, 0.99))
                ),
                secs(Some(self.convergence_bound)),
            ),
            (
                "longest TCP stall",
                secs(Some(self.longest_stall)),
                secs(Some(self.stall_bound)),
            ),
            (
                "peak agent RSS",
                format!("{:.1} MiB", self.peak_rss_kib as f64 / 1024.0),
                format!("{} MiB", self.rss_bound_kib / 1024),
            ),
            (
                "peak agent fds",
                self.peak_fds.to_string(),
                self.fd_bound.to_string(),
            ),
            (
                "peak agent threads",
                self.peak_threads.to_string(),
                self.thread_bound.to_string(),
            ),
            (
                "most full syncs to one peer",
                self.most_full_syncs.0.to_string(),
                self.most_full_syncs.1.to_string(),
            ),
        ];
        if let (Some(oldest), Some(timeout)) = (self.oldest_udp, self.udp_timeout) {
            let bound = secs(Some(timeout + super::EXPIRY_SLACK));
            rows.push(("oldest UDP session held", secs(Some(oldest)), bound));
        }
        rows.push(("violations", self.violations.len().to_string(), "0".into()));
        rows
    }

    /// The table, then the violations and notes, for a terminal.
    pub fn text(&self) -> String {
        let mut t = self.markdown();
        for (title, lines) in [("violations", &self.violations), ("notes", &self.notes)] {
            if !lines.is_empty() {
                let _ = writeln!(t, "\n{title}:");
                for l in lines {
                    let _ = writeln!(t, "  - {l}");
                }
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let ms = |v: u64| Duration::from_millis(v);
        let v: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(quantile(&v, 0.5), Some(ms(50)));
        assert_eq!(quantile(&v, 0.99), Some(ms(99)));
        assert_eq!(quantile(&[ms(7)], 0.99), Some(ms(7)));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn the_table_names_every_fault_kind_once() {
        let mut r = Report::default();
        for (kind, c) in [("kill-9", Some(2)), ("kill-9", None), ("loss-5%", Some(1))] {
            r.applied.push(Applied {
                kind,
                what: String::new(),
                convergence: c.map(Duration::from_secs),
            });
        }
        let md = r.markdown();
        assert!(md.contains("| kill-9 | 2 | 1 | 2.0 s | 2.0 s |"), "{md}");
        assert!(md.contains("| loss-5% | 1 | 1 |"), "{md}");
        assert!(md.contains("| faults applied | 3 |"), "{md}");
    }
}
