//! The fault schedule: a plan built from a seed without any I/O (so it can be printed, tested
//! and replayed), executed step by step by [`super::run`].
//!
//! A step applies one fault, holds it while traffic keeps flowing, heals it, and then waits for
//! the cluster to converge. Short profiles run every kind once in a fixed order; long ones
//! repeat shuffled rounds of every kind until the duration is spent.

use std::{fmt, time::Duration};

/// One fault the harness can inject. Members are 1-based lab member ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Drop everything on member `k`'s HA4 and HA4 backup (nftables), past the keepalive
    /// threshold, then heal.
    PartitionOne { k: u8 },
    /// Member `k`'s sync traffic out is dropped, what comes in is not (its transmit side
    /// broken): the peers stop hearing it while it still hears them, until their connections
    /// stall and close; past the keepalive threshold, then heal.
    PartitionOneWay { k: u8 },
    /// Members `a` cannot reach members `b` on either sync link (and back); each side still
    /// reaches its own half.
    PartitionHalves { a: Vec<u8>, b: Vec<u8> },
    /// `numgen random mod 100 < percent` drop on every member's sync links.
    Loss { percent: u8 },
    /// SIGSTOP member `k`'s agent past the keepalive threshold (its lanes steered to `to`,
    /// which takes their sessions over), then SIGCONT.
    Stop { k: u8, to: u8 },
    /// SIGKILL member `k`'s agent and start it again (its datapath stays pinned).
    Kill { k: u8 },
    /// SIGTERM and restart every member in turn, each back to active before the next.
    RollingRestart,
    /// Every traffic lane steered to another member.
    Resteer { shift: u8 },
    /// Unauthenticated TCP connections to member `k`'s HA4 listener from a foreign address.
    ConnectionFlood { k: u8, connections: usize },
    /// An authenticated client (the cluster key) speaking the real protocol to member `k`:
    /// foreign owners, deletes of others' sessions, huge versions, replays.
    HostilePeer { k: u8 },
    /// `sessions` new UDP sessions created on member `k` at once (raw frames).
    TableFlood { k: u8, sessions: u32 },
}

impl Fault {
    /// The kind's name, for the report.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::PartitionOne { .. } => "partition-one",
            Fault::PartitionOneWay { .. } => "partition-one-way",
            Fault::PartitionHalves { .. } => "partition-halves",
            Fault::Loss { percent: 5 } => "loss-5%",
            Fault::Loss { .. } => "loss-30%",
            Fault::Stop { .. } => "sigstop",
            Fault::Kill { .. } => "kill-9",
            Fault::RollingRestart => "rolling-restart",
            Fault::Resteer { .. } => "resteer",
            Fault::ConnectionFlood { .. } => "connection-flood",
            Fault::HostilePeer { .. } => "hostile-peer",
            Fault::TableFlood { .. } => "table-flood",
        }
    }

    /// Members whose agents or links this fault disturbs (for the full-sync bound).
    pub fn disturbs(&self, members: u8) -> Vec<u8> {
        match self {
            Fault::PartitionOne { k }
            | Fault::PartitionOneWay { k }
            | Fault::Stop { k, .. }
            | Fault::Kill { k } => vec![*k],
            Fault::PartitionHalves { a, b } => a.iter().chain(b).copied().collect(),
            Fault::Loss { .. } | Fault::RollingRestart => (1..=members).collect(),
            Fault::HostilePeer { .. } => (1..=members).collect(),
            Fault::Resteer { .. } | Fault::ConnectionFlood { .. } | Fault::TableFlood { .. } => {
                Vec::new()
            }
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::PartitionOne { k } => write!(f, "partition fw{k} (HA4 and HA4 backup)"),
            Fault::PartitionOneWay { k } => {
                write!(f, "drop what fw{k} sends on HA4 and HA4 backup (one way)")
            }
            Fault::PartitionHalves { a, b } => write!(f, "partition {a:?} | {b:?}"),
            Fault::Loss { percent } => write!(f, "{percent} % loss on every sync link"),
            Fault::Stop { k, to } => write!(f, "SIGSTOP fw{k}, its lanes to fw{to}, SIGCONT"),
            Fault::Kill { k } => write!(f, "SIGKILL fw{k}, restart"),
            Fault::RollingRestart => write!(f, "rolling restart of every member"),
            Fault::Resteer { shift } => write!(f, "every lane moved {shift} members on"),
            Fault::ConnectionFlood { k, connections } => {
                write!(
                    f,
                    "{connections} unauthenticated connections to fw{k}'s HA4"
                )
            }
            Fault::HostilePeer { k } => write!(f, "hostile authenticated peer against fw{k}"),
            Fault::TableFlood { k, sessions } => write!(f, "{sessions} new sessions on fw{k}"),
        }
    }
}

/// A fault and how long it is held before healing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub fault: Fault,
    pub hold: Duration,
}

/// Deterministic pseudo-random numbers (xorshift64*), so a seed replays a schedule.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` ≥ 1).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A member in `1..=members`.
    pub fn member(&mut self, members: u8) -> u8 {
        1 + self.below(u64::from(members)) as u8
    }

    /// A member in `1..=members` other than `not` (`members` ≥ 2).
    pub fn other_member(&mut self, members: u8, not: u8) -> u8 {
        let pick = 1 + self.below(u64::from(members.saturating_sub(1))) as u8;
        if pick >= not {
            pick + 1
        } else {
            pick
        }
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// Sizes of a schedule's floods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FloodSizes {
    pub connections: usize,
    pub sessions: u32,
}

/// How long a fault that must outlast the keepalive threshold is held.
pub fn past_threshold(keepalive: Duration) -> Duration {
    keepalive + Duration::from_secs(2)
}

/// One round: every fault kind once, members and parameters drawn from `rng`.
pub fn round(rng: &mut Rng, members: u8, keepalive: Duration, floods: FloodSizes) -> Vec<Step> {
    let long = past_threshold(keepalive);
    let short = Duration::from_secs(6);
    let mut halves: Vec<u8> = (1..=members).collect();
    rng.shuffle(&mut halves);
    let b = halves.split_off(halves.len() / 2);
    let stopped = rng.member(members);
    let mut steps = vec![
        Step {
            fault: Fault::PartitionOne {
                k: rng.member(members),
            },
            hold: long,
        },
        Step {
            fault: Fault::PartitionOneWay {
                k: rng.member(members),
            },
            hold: long,
        },
        Step {
            fault: Fault::PartitionHalves { a: halves, b },
            hold: long,
        },
        Step {
            fault: Fault::Loss { percent: 5 },
            hold: short,
        },
        Step {
            fault: Fault::Loss { percent: 30 },
            hold: short,
        },
        Step {
            fault: Fault::Stop {
                k: stopped,
                to: rng.other_member(members, stopped),
            },
            hold: long,
        },
        Step {
            fault: Fault::Kill {
                k: rng.member(members),
            },
            hold: Duration::from_secs(2),
        },
        Step {
            fault: Fault::Resteer {
                shift: 1 + rng.below(u64::from(members - 1)) as u8,
            },
            hold: Duration::from_secs(3),
        },
        Step {
            fault: Fault::ConnectionFlood {
                k: rng.member(members),
                connections: floods.connections,
            },
            hold: short,
        },
        Step {
            // Not fw1: the hostile peer also speaks from the address of a member that dials its
            // target, and only lower ids dial.
            fault: Fault::HostilePeer {
                k: rng.other_member(members, 1),
            },
            hold: Duration::from_secs(3),
        },
        Step {
            fault: Fault::TableFlood {
                k: rng.member(members),
                sessions: floods.sessions,
            },
            hold: Duration::from_secs(1),
        },
        Step {
            fault: Fault::RollingRestart,
            hold: Duration::ZERO,
        },
    ];
    rng.shuffle(&mut steps);
    // Whatever a hostile peer manages to do lasts: last in its round, so it cannot mask
    // what the other faults of the round do.
    steps.sort_by_key(|s| matches!(s.fault, Fault::HostilePeer { .. }));
    steps
}

/// The schedule of a run: `rounds` shuffled rounds (the last table floods capped so the lab
/// tables never fill: at most `max_flooded` sessions flooded in all).
pub fn plan(
    seed: u64,
    members: u8,
    keepalive: Duration,
    floods: FloodSizes,
    rounds: usize,
    max_flooded: u32,
) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    let mut steps = Vec::new();
    let mut flooded = 0u32;
    for _ in 0..rounds {
        for step in round(&mut rng, members, keepalive, floods) {
            if let Fault::TableFlood { sessions, .. } = step.fault {
                if flooded + sessions > max_flooded {
                    continue;
                }
                flooded += sessions;
            }
            steps.push(step);
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOODS: FloodSizes = FloodSizes {
        connections: 100,
        sessions: 1000,
    };

    #[test]
    fn a_seed_replays_the_same_schedule_and_every_kind_appears() {
        let ka = Duration::from_secs(5);
        let a = plan(7, 4, ka, FLOODS, 2, 10_000);
        assert_eq!(a, plan(7, 4, ka, FLOODS, 2, 10_000));
        assert_ne!(a, plan(8, 4, ka, FLOODS, 2, 10_000));
        let mut kinds: Vec<&str> = a.iter().map(|s| s.fault.kind()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), 12, "{kinds:?}");
        assert!(matches!(a[11].fault, Fault::HostilePeer { .. }), "{a:?}");
    }

    #[test]
    fn members_are_in_range_and_halves_split_the_cluster() {
        for seed in 0..50 {
            for step in plan(seed, 16, Duration::from_secs(5), FLOODS, 1, 10_000) {
                match step.fault {
                    Fault::PartitionHalves { a, b } => {
                        let mut all: Vec<u8> = a.iter().chain(&b).copied().collect();
                        all.sort_unstable();
                        assert_eq!(all, (1..=16).collect::<Vec<_>>());
                        assert_eq!((a.len(), b.len()), (8, 8));
                    }
                    Fault::Stop { k, to } => assert!(k != to && (1..=16).contains(&to)),
                    Fault::Resteer { shift } => assert!((1..16).contains(&shift)),
                    f => assert!(f.disturbs(16).iter().all(|k| (1..=16).contains(k))),
                }
            }
        }
    }

    #[test]
    fn table_floods_stop_at_the_cap() {
        let steps = plan(1, 3, Duration::from_secs(5), FLOODS, 5, 2_500);
        let floods = steps
            .iter()
            .filter(|s| matches!(s.fault, Fault::TableFlood { .. }))
            .count();
        assert_eq!(floods, 2);
    }
}
