//! Applying, holding and healing each fault. Every fault heals itself even when applying it
//! failed half-way, and every loop in here is bounded.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use hasync_agent::lab::{
    netns::command_in,
    topology::{Link, SERVER_V4},
    Signal,
};

use super::{
    hostile::{self, Claim, INTRUDER_V4, UNKNOWN_MEMBER},
    invariants, lanes, lock,
    schedule::{Fault, Step},
    Runner,
};
use crate::cluster::{Table, UdpInjector};

const SYNC_LINKS: [Link; 2] = [Link::Ha4, Link::Ha4Backup];
/// The most "full sync from peer started" lines a hostile peer's many starts may leave in
/// the log (the agent's burst, one more per 2 s, and the real member's own after it resumes).
const MAX_FULL_SYNC_LINES: usize = 20;
/// The nftables table a half-partition adds in a member.
const PARTITION_TABLE: &str = "hasync_chaos_partition";

/// Runs `nft -f -` with `script` inside member `k`'s namespace.
fn nft(c: &crate::cluster::Cluster, k: u8, script: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut cmd = command_in(c.topology().fw(k), "nft").map_err(|e| e.to_string())?;
    let mut child = cmd
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft in fw{k}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("nft in fw{k}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("nft in fw{k}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft in fw{k}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs every heal in `results` (it is evaluated to the end), keeping the first error.
fn every(results: impl Iterator<Item = Result<(), String>>) -> Result<(), String> {
    let mut first = Ok(());
    for r in results {
        if first.is_ok() {
            first = r;
        }
    }
    first
}

/// The nftables script that cuts member `k` off from the sync addresses of `others`: both
/// ways, or (`one_way`) only what it sends.
fn partition_script(others: &[u8], one_way: bool) -> String {
    let addrs: Vec<String> = others
        .iter()
        .flat_map(|&o| SYNC_LINKS.map(|l| l.v4(o).0.to_string()))
        .collect();
    let set = addrs.join(", ");
    let chain_in = if one_way {
        String::new()
    } else {
        format!(
            "\tchain in {{ type filter hook input priority raw; policy accept; ip saddr {{ {set} }} drop; }}\n"
        )
    };
    format!(
        "table ip {PARTITION_TABLE} {{\n{chain_in}\
         \tchain out {{ type filter hook output priority raw; policy accept; ip daddr {{ {set} }} drop; }}\n\
         }}\n"
    )
}

impl Runner<'_> {
    /// Applies `step`'s fault, holds it (with a burst of new flows), and heals it.
    pub(super) fn apply(&mut self, step: &Step) -> Result<(), String> {
        match &step.fault {
            Fault::PartitionOne { k } => self.partition_one(*k, step.hold),
            Fault::PartitionOneWay { k } => {
                let others: Vec<u8> = self.members().into_iter().filter(|o| o != k).collect();
                self.partition_from(&[*k], &others, true, step.hold)
            }
            Fault::PartitionHalves { a, b } => self.partition_from(a, b, false, step.hold),
            Fault::Loss { percent } => self.loss(*percent, step.hold),
            Fault::Stop { k, to } => self.stop(*k, *to, step.hold),
            Fault::Kill { k } => self.kill(*k, step.hold),
            Fault::RollingRestart => self.rolling_restart(),
            Fault::Resteer { shift } => self.resteer(*shift, step.hold),
            Fault::ConnectionFlood { k, connections } => {
                self.connection_flood(*k, *connections, step.hold)
            }
            Fault::HostilePeer { k } => self.hostile_peer(*k, step.hold),
            Fault::TableFlood { k, sessions } => self.table_flood(*k, *sessions, step.hold),
        }
    }

    /// A burst of new UDP flows through every lane, then the rest of `hold`.
    fn hold(&mut self, hold: Duration) -> Result<(), String> {
        let start = Instant::now();
        let burst = self.lanes.burst(self.c.topology(), self.p.burst);
        std::thread::sleep(hold.saturating_sub(start.elapsed()));
        burst.map(drop)
    }

    /// Runs `fault`, then `heal` whatever happened; the first error wins.
    fn with_heal(
        &mut self,
        fault: impl FnOnce(&mut Self) -> Result<(), String>,
        heal: impl FnOnce(&mut Self) -> Result<(), String>,
    ) -> Result<(), String> {
        let applied = fault(self);
        let healed = heal(self);
        applied.and(healed)
    }

    fn partition_one(&mut self, k: u8, hold: Duration) -> Result<(), String> {
        let topo = self.c.topology();
        self.with_heal(
            |r| {
                for l in SYNC_LINKS {
                    topo.drop_with_nft(k, l, 100).map_err(|e| e.to_string())?;
                }
                r.hold(hold)
            },
            |_| {
                every(
                    SYNC_LINKS
                        .iter()
                        .map(|&l| topo.undrop_nft(k, l).map_err(|e| e.to_string())),
                )
            },
        )
    }

    /// Members `a` cut off from members `b` for `hold`: both ways (the rules in `a`'s
    /// namespaces drop what comes in from `b` and what goes out to them), or with `one_way`
    /// only what `a` send.
    fn partition_from(
        &mut self,
        a: &[u8],
        b: &[u8],
        one_way: bool,
        hold: Duration,
    ) -> Result<(), String> {
        let c = self.c;
        self.with_heal(
            |r| {
                for &k in a {
                    nft(c, k, &partition_script(b, one_way))?;
                }
                r.hold(hold)
            },
            |_| {
                every(
                    a.iter()
                        .map(|&k| nft(c, k, &format!("delete table ip {PARTITION_TABLE}\n"))),
                )
            },
        )
    }

    fn loss(&mut self, percent: u8, hold: Duration) -> Result<(), String> {
        let topo = self.c.topology();
        let members = self.members();
        self.with_heal(
            |r| {
                for &k in &members {
                    for l in SYNC_LINKS {
                        topo.drop_with_nft(k, l, percent)
                            .map_err(|e| e.to_string())?;
                    }
                }
                r.hold(hold)
            },
            |_| {
                every(members.iter().flat_map(|&k| {
                    SYNC_LINKS.map(|l| topo.undrop_nft(k, l).map_err(|e| e.to_string()))
                }))
            },
        )
    }

    fn stop(&mut self, k: u8, to: u8, hold: Duration) -> Result<(), String> {
        let c = self.c;
        self.with_heal(
            |r| {
                c.kill_agent(k, Signal::Stop).map_err(|e| e.to_string())?;
                r.lanes.steer_away(c.topology(), k, to)?;
                r.hold(hold)
            },
            |_| c.kill_agent(k, Signal::Cont).map_err(|e| e.to_string()),
        )
    }

    fn kill(&mut self, k: u8, hold: Duration) -> Result<(), String> {
        let c = self.c;
        lock(&self.watch.ended).insert(k);
        let result = self.with_heal(
            |r| {
                c.kill_agent(k, Signal::Kill).map_err(|e| e.to_string())?;
                let exited = hasync_agent::lab::netns::wait_for(Duration::from_secs(5), || {
                    (!c.agent_running(k)).then_some(())
                });
                exited.ok_or(format!("fw{k}'s agent survived SIGKILL"))?;
                r.hold(hold)
            },
            |_| restart(c, k),
        );
        lock(&self.watch.ended).remove(&k);
        result
    }

    fn rolling_restart(&mut self) -> Result<(), String> {
        for k in self.members() {
            lock(&self.watch.ended).insert(k);
            let stopped = self
                .c
                .stop_agent(k, Duration::from_secs(10))
                .map_err(|e| e.to_string());
            let restarted = restart(self.c, k);
            lock(&self.watch.ended).remove(&k);
            stopped.and(restarted)?;
            let bound = self.p.convergence_bound;
            let active = hasync_agent::lab::netns::wait_for(bound, || {
                let m = self.c.try_member(k, k).ok()?;
                (m.state == "active").then_some(())
            });
            active.ok_or(format!("fw{k} not active {bound:?} after its restart"))?;
        }
        Ok(())
    }

    fn resteer(&mut self, shift: u8, hold: Duration) -> Result<(), String> {
        let n = self.p.members;
        for (i, via) in self.lanes.vias() {
            let to = (via - 1 + shift) % n + 1;
            self.lanes.steer(self.c.topology(), i, to)?;
        }
        self.hold(hold)
    }

    fn connection_flood(&mut self, k: u8, count: usize, hold: Duration) -> Result<(), String> {
        let target = hostile::ha4_listener(self.c, k)?;
        let ns = self.intruder.ns().to_owned();
        let connected = std::thread::scope(|s| {
            let flood = s.spawn(|| hostile::connection_flood(&ns, target, count, hold));
            let burst = self.hold(hold);
            (flood.join().unwrap_or(0), burst)
        });
        self.report.note(format!(
            "connection flood: {} of {count} connections to fw{k}'s HA4 got through",
            connected.0
        ));
        connected.1
    }

    /// The hostile peer, three ways: a foreign address claiming a member; an unknown member
    /// id; and a member's own address claiming that member (with that member's agent
    /// stopped until `k` holds it down, so the hostile connection is admitted and every
    /// record meets the per-record owner checks) writing others' sessions. No member's
    /// table may change, and the owner checks must have refused the records.
    fn hostile_peer(&mut self, k: u8, hold: Duration) -> Result<(), String> {
        let members = self.members();
        // Whole tables, converged or not: what matters is that the peer changes none of them.
        let started = Instant::now();
        let before = invariants::tables(self.c, &members)?;
        // With expiry on, what times out meanwhile is excused below.
        let idle = if self.p.expires() {
            Some(invariants::udp_idle(self.c, &members)?)
        } else {
            None
        };
        let table = before.get(&k).cloned().unwrap_or_default();
        let other = members.iter().copied().find(|&m| m != k).unwrap_or(k);
        // A member that dials fw`k` (a lower id): its address is admitted.
        let third = members.iter().copied().find(|&m| m < k).unwrap_or(other);
        self.foreign_claims(k, other, &table)?;
        let genuine = Claim {
            ns: self.c.topology().fw(third).to_owned(),
            from: IpAddr::V4(Link::Ha4.v4(third).0),
            member: third,
            genuine: true,
        };
        let log_from = self.log_len(k);
        let refused = self.impersonate(k, &genuine, &table);
        std::thread::sleep(hold);
        let after = invariants::tables(self.c, &members)?;
        let refused = refused?;
        self.full_sync_lines_bounded(k, third, log_from)?;
        self.report.note(format!(
            "fw{k} refusals while fw{third}'s address spoke: {refused:?}"
        ));
        // While fw`third` was down, the members its flows pass through took them over (a
        // takeover by traffic, as HA wants): at each member, the flows it held as fw`third`'s
        // may have changed owner, and so may a lane's flows, to the member the lane runs
        // through (it takes over a flow it carries once the old owner's copy expires); with
        // expiry on, UDP sessions that may have timed out may be gone, or held again as
        // fw`third`'s own (it may create the sessions it owns); everything else must be as it
        // was.
        let mut skip = invariants::keys_owned_by(&before, third);
        let via = self.lanes.vias().into_iter();
        let via = via
            .map(|(i, k)| (IpAddr::V4(lanes::client_addr(i)), k))
            .collect();
        for (m, keys) in invariants::taken_by_lanes(&before, &after, &via) {
            skip.entry(m).or_default().extend(keys);
        }
        if let Some(idle) = &idle {
            let (timeout, elapsed) = (self.p.udp_timeout, started.elapsed());
            // The claimed member may create its own sessions on 5-tuples that freed up.
            let gone = invariants::expired_meanwhile(idle, &after, timeout, elapsed, Some(third));
            let n: usize = gone.values().map(BTreeSet::len).sum();
            self.report.note(format!(
                "hostile peer against fw{k}: {n} sessions gone that may have timed out"
            ));
            for (m, keys) in gone {
                skip.entry(m).or_default().extend(keys);
            }
        }
        let changed = invariants::changes(
            &invariants::without(&before, &skip),
            &invariants::without(&after, &skip),
        );
        if !changed.is_empty() {
            return Err(format!("tables changed: {}", changed.join("; ")));
        }
        // Not `stale-frame`: the replays, and the frame after the one numbered `u64::MAX`, come
        // on one connection, so since stop 48 they show the far-ahead number false and are
        // taken (their records then meet the owner checks), not refused as late.
        let missing: Vec<&str> = ["foreign-owner", "unknown-owner", "malformed"]
            .into_iter()
            .filter(|r| !refused.contains_key(*r))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "fw{k} counted no {missing:?} while the impersonator spoke: checks not reached"
            ))
        }
    }

    /// The length of fw`k`'s agent log now.
    fn log_len(&self, k: u8) -> u64 {
        std::fs::metadata(self.c.log_path(k)).map_or(0, |m| m.len())
    }

    /// The hostile peer started [`hostile::BULK_STARTS`] full syncs: fw`k` must have logged
    /// a few of them ("full sync from peer started", a burst and then one per interval), not
    /// each.
    fn full_sync_lines_bounded(
        &mut self,
        k: u8,
        from_member: u8,
        since: u64,
    ) -> Result<(), String> {
        let log = std::fs::read(self.c.log_path(k)).map_err(|e| format!("fw{k}'s log: {e}"))?;
        let since = usize::try_from(since).unwrap_or(usize::MAX);
        let text = String::from_utf8_lossy(log.get(since..).unwrap_or_default());
        let peer = format!("peer={from_member} ");
        let lines = text
            .lines()
            .filter(|l| l.contains("full sync from peer started") && l.contains(&peer))
            .count();
        self.report.note(format!(
            "fw{k} logged {lines} full sync starts from fw{from_member}'s address while the hostile peer sent {}",
            hostile::BULK_STARTS
        ));
        if (1..=MAX_FULL_SYNC_LINES).contains(&lines) {
            Ok(())
        } else {
            Err(format!(
                "fw{k} logged {lines} full sync starts from fw{from_member}'s address (expected 1 to {MAX_FULL_SYNC_LINES}): \
                 a peer's repeated starts must be rate-limited in the log, and logged"
            ))
        }
    }

    /// The hostile peer from a foreign address, claiming member `other` and then an unknown
    /// member, sending records made from fw`k`'s `table`.
    fn foreign_claims(&mut self, k: u8, other: u8, table: &Table) -> Result<(), String> {
        let intruder = self.intruder.ns().to_owned();
        let foreign = |member| Claim {
            ns: intruder.clone(),
            from: IpAddr::V4(INTRUDER_V4),
            member,
            genuine: false,
        };
        for claim in [foreign(other), foreign(UNKNOWN_MEMBER)] {
            let frames = hostile::hostile_frames(table, claim.member, k, self.p.members, true);
            let out = hostile::hostile_peer(self.c, k, &claim, frames)?;
            self.note_hostile(k, &claim, &out);
        }
        Ok(())
    }

    /// Stops `claim.member`'s agent until fw`k` holds it down, speaks as it from its own
    /// address, then resumes it (whatever happened). The session must get past the hello.
    /// Returns the rejections fw`k` counted meanwhile.
    fn impersonate(
        &mut self,
        k: u8,
        claim: &Claim,
        table: &Table,
    ) -> Result<BTreeMap<String, u64>, String> {
        let c = self.c;
        let m = claim.member;
        let bound = self.p.keepalive * 3;
        let mut refused = BTreeMap::new();
        self.with_heal(
            |r| {
                // A down state left by an earlier fault (fw`m` partitioned just before) is not
                // this stop's: fw`m`'s own connection may be back already, and live. Nor is
                // "unknown" alive: fw`k` just restarted has not heard fw`m` yet, and a member
                // it never hears stays unknown, never down.
                let alive = hasync_agent::lab::netns::wait_for(bound, || {
                    let s = c.try_member(k, m).ok()?;
                    (s.state != "down" && s.state != "unknown").then_some(())
                });
                alive.ok_or(format!("fw{k} did not see fw{m} alive within {bound:?}"))?;
                c.kill_agent(m, Signal::Stop).map_err(|e| e.to_string())?;
                let down = hasync_agent::lab::netns::wait_for(bound, || {
                    let s = c.try_member(k, m).ok()?;
                    (s.state == "down").then_some(())
                });
                down.ok_or(format!(
                    "fw{k} did not hold stopped fw{m} down within {bound:?}"
                ))?;
                let before = invariants::rejections(c, k)?;
                // Nothing here is fw`m`'s to change, even for a client that truly is fw`m`.
                let frames = hostile::hostile_frames(table, m, k, r.p.members, false);
                let out = hostile::hostile_peer(c, k, claim, frames)?;
                r.note_hostile(k, claim, &out);
                for (why, n) in invariants::rejections(c, k)? {
                    let d = n - before.get(&why).copied().unwrap_or(0).min(n);
                    if d > 0 {
                        refused.insert(why, d);
                    }
                }
                if out.hello_answered {
                    Ok(())
                } else {
                    Err(format!(
                        "fw{k} refused fw{m}'s own address while fw{m} was down: {out:?}"
                    ))
                }
            },
            |_| c.kill_agent(m, Signal::Cont).map_err(|e| e.to_string()),
        )?;
        Ok(refused)
    }

    fn note_hostile(&mut self, k: u8, claim: &Claim, out: &hostile::HostileOutcome) {
        self.report.note(format!(
            "hostile peer from {} claiming member {} against fw{k}: {out:?}",
            claim.from, claim.member
        ));
    }

    fn table_flood(&mut self, k: u8, sessions: u32, hold: Duration) -> Result<(), String> {
        const SOURCES: u32 = 10;
        let per = u16::try_from(sessions.div_ceil(SOURCES)).map_err(|e| e.to_string())?;
        let base = u16::try_from(20_000 + self.flooded / SOURCES).map_err(|e| e.to_string())?;
        self.flooded += u32::from(per) * SOURCES;
        let sources = (0..SOURCES as u8)
            .map(|j| Ipv4Addr::new(198, 18, 0, 200 + j))
            .collect();
        let topo = self.c.topology();
        let inj = UdpInjector::to_member(
            topo,
            k,
            sources,
            base..base.saturating_add(per),
            SocketAddrV4::new(SERVER_V4, 9),
        )?;
        let sent = inj.send(topo.client(), Duration::from_secs(60))?;
        self.report
            .note(format!("table flood: {sent} new flows sent to fw{k}"));
        self.hold(hold)
    }
}

/// Starts member `k`'s agent again and waits for its control socket.
fn restart(c: &crate::cluster::Cluster, k: u8) -> Result<(), String> {
    c.start_agent(k)
        .map_err(|e| format!("restarting fw{k}: {e}"))?;
    c.wait_ready(k, crate::cluster::READY_TIMEOUT)
        .map_err(|e| format!("fw{k} after restart: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_half_partition_drops_both_sync_addresses_of_the_other_half() {
        let s = partition_script(&[3, 4], false);
        assert!(
            s.contains("ip saddr { 198.18.100.3, 198.18.101.3, 198.18.100.4, 198.18.101.4 } drop"),
            "{s}"
        );
        assert!(s.contains("ip daddr {"), "{s}");
    }

    #[test]
    fn a_one_way_partition_drops_only_what_goes_out() {
        let s = partition_script(&[2], true);
        assert!(!s.contains("saddr"), "{s}");
        assert!(
            s.contains("hook output priority raw; policy accept; ip daddr { 198.18.100.2, 198.18.101.2 } drop;"),
            "{s}"
        );
    }
}
