//! Network-namespace labs: a whole cluster on one host, for `hasync lab` (what `cargo xtask run`
//! starts) and for the cluster integration tests.
//!
//! - [`Topology`]: the namespaces (`client`, `fw1`..`fwN`, `server`, and `hasw` holding the
//!   bridges), the veth pairs between them, addresses and routes; faults (links down, nftables
//!   drops) and steering traffic to a member. Dropping it kills the processes it started and
//!   deletes every namespace it created.
//! - [`LabCluster`]: a lab directory with the cluster key and one config file per member, and
//!   the agents running in the member namespaces.
//! - [`traffic`]: bounded TCP and UDP drivers that run inside lab namespaces.
//!
//! Safety rules, enforced here so a lab cannot hurt the host:
//! - every `ip` command runs inside a lab namespace (`ip -n NS`); veth pairs are created inside
//!   a lab namespace with their peer placed straight into another, so nothing exists in the root
//!   namespace, not even transiently, and no host interface is touched;
//! - addresses come from 198.18.0.0/15 and fd00::/8 only;
//! - processes are started by the lab and ended by their PID, never by name;
//! - every traffic loop has a maximum count and a deadline.

pub mod cluster;
mod command;
pub mod interrupt;
mod lifeline;
pub mod netns;
pub mod topology;
pub mod traffic;

#[cfg(test)]
mod tests;

use std::{path::PathBuf, process::ExitStatus};

pub use cluster::{write_configs, ClusterOptions, LabCluster, MemberOverride};
pub use command::{run, LabArgs};
pub use netns::{command_in, run_in, spawn_in, Signal};
pub use topology::{Link, Topology, MAX_MEMBERS};

/// Errors of the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("cannot start `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "network namespace(s) already exist: {}. Another tool may use these names: give this \
         lab a prefix of its own (`--prefix NAME-`, `cargo xtask run --prefix NAME-`). If they \
         are a lab's that was killed before it could clean up (see what runs in them: `ip \
         netns pids NAME`), stop that and remove them: {}",
        names.join(", "),
        names.iter().map(|n| format!("`ip netns del {n}`")).collect::<Vec<_>>().join(", ")
    )]
    NamespacesExist { names: Vec<String> },
    #[error("lab prefix \"{0}\" must be at most 24 of A–Z, a–z, 0–9 and `-`")]
    Prefix(String),
    #[error("{0} members is out of range 1–16")]
    Members(usize),
    #[error("member {member} is not in this lab (members 1–{members})")]
    NoSuchMember { member: u8, members: u8 },
    #[error("no namespace \"{name}\" in this lab (it has {known})")]
    NoSuchNamespace { name: String, known: String },
    #[error("lab address {0} is outside 198.18.0.0/15 and fd00::/8")]
    NotLabAddress(String),
    #[error("the config written for member {member} is invalid: {source}")]
    Config {
        member: u8,
        #[source]
        source: crate::config::ConfigError,
    },
    #[error("the agent of member {member} is already running (pid {pid})")]
    AgentRunning { member: u8, pid: u32 },
    #[error("the agent of member {member} is not running")]
    AgentNotRunning { member: u8 },
    #[error(
        "the agent of member {member} exited ({status}); last lines of {}:\n{tail}",
        log.display()
    )]
    AgentExited {
        member: u8,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error("timed out after {secs:.1}s waiting for {what}")]
    Timeout { what: String, secs: f64 },
    #[error("process {pid} was not started by this lab, or has been reaped")]
    NotOurProcess { pid: u32 },
}

impl LabError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> LabError {
        LabError::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = LabError> = std::result::Result<T, E>;
