//! The invariants a chaos run checks, and the measurements behind them.
//!
//! - Replicas: once faults stop, within [`super::Profile::convergence_bound`], every member's
//!   replicas of owner X equal X's own sessions: the same count and the same digest of the
//!   rows (`show cluster sessions`: 5-tuple, state, owner, zone).
//! - Resources: every agent's RSS and open file descriptors stay under a bound, sampled the
//!   whole run.
//! - Full syncs: the full syncs a member sends one peer stay under a bound set by the faults
//!   that touched either of them (a storm of them breaks it).
//! - No panic: no agent log says `panicked`, and no agent exits unless the harness ended it.
//! - Expiry (when UDP sessions time out within the run): no member holds a UDP session idle
//!   past the timeout and a slack for its sweep ([`overdue`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{DefaultHasher, Hash as _, Hasher as _},
    time::{Duration, Instant},
};

use hasync_agent::control::{view::SessionView, SessionFilter};

use crate::cluster::{Cluster, Row, Table};

/// Every running member's table, taken one after the other.
pub type Snapshot = BTreeMap<u8, Table>;

/// A digest of rows (sorted, as a `BTreeSet` iterates).
pub fn digest<'a>(rows: impl IntoIterator<Item = &'a Row>) -> u64 {
    let mut h = DefaultHasher::new();
    for row in rows {
        row.hash(&mut h);
    }
    h.finish()
}

/// How the replicas of one snapshot disagree with their owners.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mismatch {
    /// One line per (owner, replica) pair that differs.
    pub lines: Vec<String>,
    /// Sessions an owner has that a replica lacks.
    pub missing: u64,
    /// Distinct sessions compared.
    pub checked: u64,
    /// The members whose replicas differ from an owner's table.
    pub differing: BTreeSet<u8>,
}

impl Mismatch {
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

/// ` (e.g. ROW)` for the first of `rows`, if any.
fn example(rows: &[&&Row]) -> String {
    rows.first()
        .map(|r| format!(" (e.g. {r})"))
        .unwrap_or_default()
}

fn owned_by(table: &Table, owner: u8) -> BTreeSet<&Row> {
    table.iter().filter(|r| r.owner == owner).collect()
}

/// Compares, for every owner X in `snap`, X's own sessions with every other member's replicas
/// of X; rows whose owner is no member of `snap` are reported too.
pub fn compare(snap: &Snapshot) -> Mismatch {
    let mut m = Mismatch::default();
    let all: BTreeSet<&Row> = snap.values().flatten().collect();
    m.checked = all.len() as u64;
    for (&x, table) in snap {
        let owned = owned_by(table, x);
        let d = digest(owned.iter().copied());
        for (&y, other) in snap.iter().filter(|(&y, _)| y != x) {
            let replicas = owned_by(other, x);
            if replicas.len() == owned.len() && digest(replicas.iter().copied()) == d {
                continue;
            }
            let lacks: Vec<&&Row> = owned.difference(&replicas).collect();
            let extra: Vec<&&Row> = replicas.difference(&owned).collect();
            m.missing += lacks.len() as u64;
            m.differing.insert(y);
            m.lines.push(format!(
                "fw{y}'s replicas of fw{x}: {} vs {} owned ({} missing{}, {} extra{})",
                replicas.len(),
                owned.len(),
                lacks.len(),
                example(&lacks),
                extra.len(),
                example(&extra),
            ));
        }
    }
    for (&y, table) in snap {
        let foreign = table
            .iter()
            .filter(|r| !snap.contains_key(&r.owner))
            .count();
        if foreign > 0 {
            m.lines.push(format!(
                "fw{y} lists {foreign} sessions of owners that are no member"
            ));
        }
    }
    m
}

/// Member `k`'s session counts by owner (cheap; checked before fetching whole tables).
fn counts(c: &Cluster, k: u8) -> Result<BTreeMap<u8, u64>, String> {
    c.try_count(k, SessionFilter::default()).map(|v| v.by_owner)
}

/// Takes a snapshot of `members`, or says why not.
pub fn snapshot(c: &Cluster, members: &[u8]) -> Result<Snapshot, String> {
    // Counts first: while they differ, whole tables are not worth fetching.
    let mut first: Option<(u8, BTreeMap<u8, u64>)> = None;
    for &k in members {
        let n = counts(c, k)?;
        match &first {
            Some((f, fc)) if *fc != n => {
                return Err(format!("counts by owner differ: fw{f} {fc:?}, fw{k} {n:?}"))
            }
            Some(_) => {}
            None => first = Some((k, n)),
        }
    }
    tables(c, members)
}

/// Every table of `members`, whatever they hold.
pub fn tables(c: &Cluster, members: &[u8]) -> Result<Snapshot, String> {
    members
        .iter()
        .map(|&k| c.try_table(k).map(|t| (k, t)))
        .collect()
}

/// The outcome of waiting for convergence.
#[derive(Clone, Debug)]
pub struct Convergence {
    /// How long it took, if it happened within the bound.
    pub took: Option<Duration>,
    /// The last comparison (empty when converged).
    pub mismatch: Mismatch,
    /// The last snapshot taken.
    pub snapshot: Snapshot,
}

/// How long a convergence may take before the run says once what still differs (a slow one
/// within the bound is otherwise only a figure).
const SAY_WHAT_DIFFERS_AFTER: Duration = Duration::from_secs(10);

/// Polls every 250 ms, for at most `bound`, until every replica equals its owner's table.
pub fn converge(c: &Cluster, members: &[u8], bound: Duration) -> Convergence {
    let start = Instant::now();
    let mut last = Mismatch::default();
    let mut snap = Snapshot::new();
    let mut said = false;
    loop {
        if !said && start.elapsed() >= SAY_WHAT_DIFFERS_AFTER {
            said = true;
            say_what_differs(c, members);
        }
        match snapshot(c, members) {
            Ok(s) => {
                last = compare(&s);
                snap = s;
                if last.is_empty() {
                    return Convergence {
                        took: Some(start.elapsed()),
                        mismatch: last,
                        snapshot: snap,
                    };
                }
            }
            Err(e) => last.lines = vec![e],
        }
        if start.elapsed() >= bound {
            // Counts that still differ say little: compare the whole tables to name what is
            // missing where.
            if let Ok(s) = tables(c, members) {
                last = compare(&s);
                snap = s;
            }
            return Convergence {
                took: None,
                mismatch: last,
                snapshot: snap,
            };
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Says once what differs: the first lines of the comparison, and the refusals counted so
/// far by the members whose replicas differ (a record refused there names its reason; a
/// claim of a live session refused is counted by the datapath).
fn say_what_differs(c: &Cluster, members: &[u8]) {
    let m = match tables(c, members) {
        Ok(s) => compare(&s),
        Err(e) => Mismatch {
            lines: vec![e],
            ..Mismatch::default()
        },
    };
    let shown: Vec<&str> = m.lines.iter().take(8).map(String::as_str).collect();
    eprintln!(
        "chaos: still differ after {SAY_WHAT_DIFFERS_AFTER:?} ({} lines): {}",
        m.lines.len(),
        shown.join("; ")
    );
    for &k in m.differing.iter().take(4) {
        let refused = rejections(c, k).map(|r| r.into_iter().filter(|(_, n)| *n > 0).collect());
        let refused: Result<BTreeMap<String, u64>, String> = refused;
        let claims = c
            .try_counters(k)
            .map(|n| n.get("claims-refused").copied().unwrap_or(0));
        eprintln!("chaos:   fw{k}'s refusals so far: {refused:?}, claims refused: {claims:?}");
    }
}

/// A session's 5-tuple as a row shows it.
pub type RowKey = (String, std::net::IpAddr, u16, std::net::IpAddr, u16);

fn row_key(r: &Row) -> RowKey {
    (r.proto.clone(), r.src, r.sport, r.dst, r.dport)
}

/// Per member of `snap`: the 5-tuples it holds as owned by `owner`.
pub fn keys_owned_by(snap: &Snapshot, owner: u8) -> BTreeMap<u8, BTreeSet<RowKey>> {
    snap.iter()
        .map(|(&k, t)| {
            let keys = t.iter().filter(|r| r.owner == owner).map(row_key);
            (k, keys.collect())
        })
        .collect()
}

/// `snap` without, in each member's table, the sessions whose 5-tuple `keys` lists for that
/// member.
pub fn without(snap: &Snapshot, keys: &BTreeMap<u8, BTreeSet<RowKey>>) -> Snapshot {
    snap.iter()
        .map(|(&k, t)| {
            let skip = keys.get(&k);
            let kept = t
                .iter()
                .filter(|r| !skip.is_some_and(|s| s.contains(&row_key(r))));
            (k, kept.cloned().collect())
        })
        .collect()
}

/// What changed between two snapshots of the same members: one line per member that differs.
pub fn changes(before: &Snapshot, after: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (k, b) in before {
        let Some(a) = after.get(k) else {
            out.push(format!("fw{k}: no table after"));
            continue;
        };
        if a == b {
            continue;
        }
        let gone: Vec<&Row> = b.difference(a).collect();
        let new: Vec<&Row> = a.difference(b).collect();
        out.push(format!(
            "fw{k}: {} sessions gone or changed{}, {} new or changed{}",
            gone.len(),
            gone.first()
                .map(|r| format!(" (e.g. {r})"))
                .unwrap_or_default(),
            new.len(),
            new.first()
                .map(|r| format!(" (e.g. {r})"))
                .unwrap_or_default(),
        ));
    }
    out
}

/// How long `v` had been idle when its table was read ([`udp_views`] has every one).
fn idle(v: &SessionView) -> Duration {
    Duration::from_millis(v.idle_ms.unwrap_or_default())
}

/// The sessions of `views` that are UDP and idle longer than `timeout + slack`: the datapath
/// has taken them for absent since `timeout`, and the sweep should have freed them.
pub fn overdue_in(views: &[SessionView], timeout: Duration, slack: Duration) -> Vec<&SessionView> {
    let bound = timeout + slack;
    views
        .iter()
        .filter(|v| v.proto == "udp" && idle(v) > bound)
        .collect()
}

/// Member `k`'s UDP sessions, with their idle times.
fn udp_views(c: &Cluster, k: u8) -> Result<Vec<SessionView>, String> {
    let udp = SessionFilter {
        proto: Some("udp".into()),
        ..SessionFilter::default()
    };
    let views = c.try_sessions(k, udp)?.sessions.unwrap_or_default();
    match views.iter().find(|v| v.idle_ms.is_none()) {
        Some(v) => Err(format!(
            "fw{k} lists {} without its idle time",
            Row::from(v)
        )),
        None => Ok(views),
    }
}

/// One line per member of `members` that holds UDP sessions [`overdue_in`], with an example;
/// and the longest idle time of all the members' UDP sessions.
pub fn overdue(
    c: &Cluster,
    members: &[u8],
    timeout: Duration,
    slack: Duration,
) -> Result<(Vec<String>, Duration), String> {
    let mut lines = Vec::new();
    let mut oldest = Duration::ZERO;
    for &k in members {
        let views = udp_views(c, k)?;
        oldest = oldest.max(views.iter().map(idle).max().unwrap_or_default());
        let late = overdue_in(&views, timeout, slack);
        if let Some(v) = late.first() {
            lines.push(format!(
                "fw{k} holds {} UDP sessions idle past {timeout:?} + {slack:?} (e.g. {}, idle \
                 {:.1} s)",
                late.len(),
                Row::from(*v),
                idle(v).as_secs_f64()
            ));
        }
    }
    Ok((lines, oldest))
}

/// Per member, each UDP session's 5-tuple and idle time.
pub type Idle = BTreeMap<u8, BTreeMap<RowKey, Duration>>;

/// [`Idle`] of `members`, read now.
pub fn udp_idle(c: &Cluster, members: &[u8]) -> Result<Idle, String> {
    members
        .iter()
        .map(|&k| {
            let views = udp_views(c, k)?;
            let idle = views
                .iter()
                .map(|v| (row_key(&Row::from(v)), idle(v)))
                .collect();
            Ok((k, idle))
        })
        .collect()
}

/// Per member, the lanes' sessions that passed, between `before` and `after`, to the member
/// their lane runs through (`via`: lane client address → member), in the same zone: a takeover
/// by traffic gives it a flow it carries once the old owner's copy expires, at any time after
/// the lane was steered there.
pub fn taken_by_lanes(
    before: &Snapshot,
    after: &Snapshot,
    via: &BTreeMap<std::net::IpAddr, u8>,
) -> BTreeMap<u8, BTreeSet<RowKey>> {
    let mut taken = BTreeMap::new();
    for (&k, t) in after {
        let was: BTreeMap<RowKey, &Row> = before
            .get(&k)
            .into_iter()
            .flatten()
            .map(|r| (row_key(r), r))
            .collect();
        let moved = t.iter().filter(|r| {
            let old = was.get(&row_key(r));
            let to_via = via.get(&r.src) == Some(&r.owner);
            to_via && old.is_some_and(|o| o.owner != r.owner && o.zone == r.zone)
        });
        taken.insert(k, moved.map(row_key).collect());
    }
    taken
}

/// Per member, the sessions `idle` listed that `after` (taken `elapsed` later) no longer has
/// and that may have expired meanwhile under `timeout` (with a second's margin for the reads):
/// they may have left the table without anything being wrong. Nor is it wrong that member
/// `creator`, if given, created its own session on such a 5-tuple once it was free (a peer may
/// create sessions it owns): those count as gone too. A session still listed otherwise is not
/// excused, however close to its timeout.
pub fn expired_meanwhile(
    idle: &Idle,
    after: &Snapshot,
    timeout: Duration,
    elapsed: Duration,
    creator: Option<u8>,
) -> BTreeMap<u8, BTreeSet<RowKey>> {
    let margin = Duration::from_secs(1);
    let mut gone = BTreeMap::new();
    for (&k, sessions) in idle {
        let still: BTreeSet<RowKey> = after
            .get(&k)
            .into_iter()
            .flatten()
            .filter(|r| Some(r.owner) != creator)
            .map(row_key)
            .collect();
        let expired = sessions
            .iter()
            .filter(|&(key, &i)| i + elapsed + margin >= timeout && !still.contains(key))
            .map(|(key, _)| key.clone());
        gone.insert(k, expired.collect());
    }
    gone
}

/// One agent's resident memory (KiB), open descriptors and threads, from /proc.
pub fn resources(pid: u32) -> Option<(u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find_map(|l| l.strip_prefix(name))?;
        line.split_whitespace().next()?.parse().ok()
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((field("VmRSS:")?, fds, field("Threads:")?))
}

/// Full syncs member `k` sent to each peer.
pub fn full_syncs_sent(c: &Cluster, k: u8) -> Result<BTreeMap<u8, u64>, String> {
    Ok(c.try_statistics(k)?
        .peers
        .iter()
        .map(|p| (p.id, p.full_syncs.sent.count))
        .collect())
}

/// Refusals member `k` counted, by reason.
pub fn rejections(c: &Cluster, k: u8) -> Result<BTreeMap<String, u64>, String> {
    Ok(c.try_statistics(k)?.rejected)
}

/// The bound on full syncs one member sends one peer over a run: a full sync per link for
/// each fault that disturbed either end, twice over for retries under backoff, plus the
/// start-up ones and one a minute.
pub fn full_sync_bound(disturbances: u64, run: Duration) -> u64 {
    4 + 4 * disturbances + run.as_secs() / 60
}

/// Lines of member logs that report a panic.
pub fn panics(c: &Cluster) -> Vec<String> {
    let mut out = Vec::new();
    for k in c.topology().member_ids() {
        let text = std::fs::read(c.log_path(k)).unwrap_or_default();
        for line in String::from_utf8_lossy(&text).lines() {
            if line.contains("panicked") {
                out.push(format!("fw{k}: {line}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(port: u16, owner: u8) -> Row {
        Row {
            proto: "udp".into(),
            src: "198.18.0.101".parse().expect("ip"),
            sport: port,
            dst: "198.18.1.101".parse().expect("ip"),
            dport: 7601,
            state: "udp-replied".into(),
            owner,
            zone: "trust".into(),
        }
    }

    #[test]
    fn equal_replicas_compare_clean_and_a_missing_one_is_counted() {
        let t: Table = [row(1, 1), row(2, 1), row(3, 2)].into();
        let mut snap: Snapshot = [(1, t.clone()), (2, t.clone()), (3, t)].into();
        let m = compare(&snap);
        assert!(m.is_empty(), "{m:?}");
        assert_eq!(m.checked, 3);
        snap.get_mut(&3).expect("fw3").remove(&row(2, 1));
        let m = compare(&snap);
        assert_eq!(m.missing, 1);
        assert_eq!(m.lines.len(), 1, "{m:?}");
        assert!(m.lines[0].starts_with("fw3's replicas of fw1"), "{m:?}");
    }

    #[test]
    fn only_udp_sessions_idle_past_the_timeout_and_slack_are_overdue() {
        let view = |proto: &str, idle_ms: u64| SessionView {
            proto: proto.into(),
            src: "198.18.0.101".parse().expect("ip"),
            sport: 1,
            dst: "198.18.1.101".parse().expect("ip"),
            dport: 7601,
            state: "udp-replied".into(),
            owner: 1,
            zone: "trust".into(),
            idle_ms: Some(idle_ms),
        };
        let views = [
            view("udp", 12_000),
            view("udp", 12_001),
            view("tcp", 60_000),
        ];
        let (t, slack) = (Duration::from_secs(10), Duration::from_secs(2));
        let late = overdue_in(&views, t, slack);
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].idle_ms, Some(12_001));
    }

    #[test]
    fn only_sessions_gone_that_may_have_expired_are_excused() {
        let key = |port: u16| row_key(&row(port, 1));
        let s = Duration::from_secs;
        let idle: Idle = [(
            1,
            [
                (key(1), s(3)),
                (key(2), s(8)),
                (key(3), s(9)),
                (key(4), s(9)),
            ]
            .into(),
        )]
        .into();
        // 1 is gone too early to have expired; 4 is old enough but still there.
        let after: Snapshot = [(1, [row(4, 1)].into())].into();
        let gone = expired_meanwhile(&idle, &after, s(15), s(6), None);
        assert_eq!(gone[&1], BTreeSet::from([key(2), key(3)]));
        // 3, old enough, and 1, too young, held again as member 2's own: only 3 is excused.
        let after: Snapshot = [(1, [row(4, 1), row(3, 2), row(1, 2)].into())].into();
        let gone = expired_meanwhile(&idle, &after, s(15), s(6), Some(2));
        assert_eq!(gone[&1], BTreeSet::from([key(2), key(3)]));
    }

    #[test]
    fn a_changed_state_or_a_foreign_owner_is_a_mismatch() {
        let t: Table = [row(1, 1)].into();
        let mut other = row(1, 1);
        other.state = "closed".into();
        let snap: Snapshot = [(1, t.clone()), (2, [other].into())].into();
        assert_eq!(compare(&snap).lines.len(), 1);
        let snap: Snapshot = [(1, t.clone()), (2, [row(1, 1), row(9, 77)].into())].into();
        let m = compare(&snap);
        assert!(m.lines.iter().any(|l| l.contains("no member")), "{m:?}");
        assert_eq!(changes(&snap, &snap), Vec::<String>::new());
        let after: Snapshot = [(1, t.clone()), (2, t)].into();
        assert_eq!(changes(&snap, &after).len(), 1);
    }
}
