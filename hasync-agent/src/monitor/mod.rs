//! The failure conditions the running member watches, each a task that records its verdict in
//! the membership ([`Condition`]); the runtime's membership tick turns a failed condition into
//! the Non-functional state, which peers see in the keepalives and act on (they take this
//! member's sessions over when their traffic reaches them).
//!
//! - link groups: data interfaces down or missing (netlink notifications, at once);
//! - path groups: ping targets unanswered ([`pinger`], the pure part in [`path`]);
//! - the datapath: XDP detached or replaced, an interface of a zone gone or re-created
//!   (a fresh netlink dump every second), mended by attaching again where possible;
//! - the session table: the runtime's sweep reports each step ([`TableAccess`]).

mod datapath;
mod links;
pub mod path;
mod pinger;

use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{
    cluster::{Condition, Membership},
    config::Config,
    datapath::Datapath,
    lock::lock,
    netlink::{LinkWatch, NetlinkError},
};
pub use links::link_group_cause;

/// Sweep steps failing in a row that make the session table count as unreadable (about a
/// second of steps): one failure may be a passing ENOMEM.
pub const SWEEP_FAILURES: u32 = 10;

/// Whether the session table can be read, from the sweep's steps.
#[derive(Debug, Default)]
pub struct TableAccess {
    failed_in_row: u32,
}

impl TableAccess {
    /// One sweep step ended: `error` is why it failed, `None` when it did not.
    pub fn step(&mut self, membership: &Mutex<Membership>, error: Option<String>) {
        let Some(error) = error else {
            if self.failed_in_row >= SWEEP_FAILURES {
                record(membership, Condition::SessionTable, None);
            }
            self.failed_in_row = 0;
            return;
        };
        self.failed_in_row = self.failed_in_row.saturating_add(1);
        if self.failed_in_row == SWEEP_FAILURES {
            let cause = format!("{SWEEP_FAILURES} sweep steps in a row failed: {error}");
            record(membership, Condition::SessionTable, Some(cause));
        }
    }
}

/// Why the monitors could not start.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(
        "path group `{group}`: cannot open a raw ICMP{} socket to ping its targets (the agent needs CAP_NET_RAW for [[monitor.path_groups]]): {source}",
        if *.v4 { "" } else { "v6" }
    )]
    RawSocket {
        group: String,
        v4: bool,
        #[source]
        source: std::io::Error,
    },
}

/// The path groups' sockets, opened before anything else starts ([`open`]).
pub struct Pingers(Vec<pinger::Pinger>);

/// Opens the sockets of the path groups the config names: a member that cannot ping does not
/// start (the agent opens them before it touches the datapath).
pub fn open(config: &Config) -> Result<Pingers, MonitorError> {
    let pingers = config
        .monitor
        .path_groups
        .iter()
        .cloned()
        .map(pinger::Pinger::open);
    Ok(Pingers(pingers.collect::<Result<_, _>>()?))
}

/// Starts a task per kind of condition the config asks for (the datapath always), the path
/// groups' with `pingers`.
pub fn spawn(
    config: &Config,
    dp: Arc<Mutex<Datapath>>,
    links: Result<LinkWatch, NetlinkError>,
    membership: Arc<Mutex<Membership>>,
    Pingers(pingers): Pingers,
) -> Vec<(String, JoinHandle<()>)> {
    let mut tasks = Vec::new();
    let groups = config.monitor.link_groups.clone();
    match links {
        _ if groups.is_empty() => {}
        Ok(watch) => {
            let m = membership.clone();
            let task = tokio::spawn(links::watch_link_groups(groups, watch, m));
            tasks.push(("link groups".to_owned(), task));
        }
        Err(e) => links::fail_unwatched_groups(&groups, &e, &membership),
    }
    for pinger in pingers {
        let name = format!("path group {}", pinger.group());
        tasks.push((name, tokio::spawn(pinger.run(membership.clone()))));
    }
    let checks = datapath::watch_datapath(config.clone(), dp, membership);
    tasks.push(("datapath checks".to_owned(), tokio::spawn(checks)));
    tasks
}

/// Records `condition`'s verdict, logging when it changes.
fn record(membership: &Mutex<Membership>, condition: Condition, cause: Option<String>) {
    let mut m = lock(membership);
    let was = m
        .faults()
        .find(|(c, _)| **c == condition)
        .map(|(_, c)| c.to_owned());
    if was == cause {
        return;
    }
    match &cause {
        Some(cause) => {
            warn!(%condition, %cause, "failure condition: this member is non-functional")
        }
        None => info!(%condition, "failure condition cleared"),
    }
    m.set_condition(condition, cause, std::time::Instant::now());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::cluster::Timers;

    /// Member 1 alone: no discovery wait, no tentative hold, a minute's monitor hold-down.
    pub(super) fn lone_member(now: std::time::Instant) -> Membership {
        let timers = Timers {
            keepalive_threshold: Duration::from_secs(10),
            sync_timeout: Duration::ZERO,
            tentative_hold: Duration::ZERO,
            monitor_hold_down: Duration::from_secs(60),
            discovery: Duration::ZERO,
        };
        Membership::new(hasync_common::MemberId(1), timers, vec![], now)
    }

    #[test]
    fn a_session_table_the_sweep_cannot_walk_fails_the_member_until_it_can() {
        let m = Mutex::new(lone_member(std::time::Instant::now()));
        let mut access = TableAccess::default();
        let faults = |m: &Mutex<Membership>| -> Vec<String> {
            lock(m).faults().map(|(c, e)| format!("{c}: {e}")).collect()
        };
        for _ in 1..SWEEP_FAILURES {
            access.step(&m, Some("Cannot allocate memory".into()));
        }
        assert!(faults(&m).is_empty(), "one bad second is not a failure yet");
        access.step(&m, None);
        for _ in 0..SWEEP_FAILURES {
            access.step(&m, Some("Bad file descriptor".into()));
        }
        assert_eq!(
            faults(&m),
            ["session table: 10 sweep steps in a row failed: Bad file descriptor"]
        );
        access.step(&m, None);
        assert!(faults(&m).is_empty());
    }
}
