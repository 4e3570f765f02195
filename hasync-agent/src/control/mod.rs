//! The control socket: how `hasync show ...`, `hasync suspend` and `hasync functional` reach a
//! running agent.
//!
//! A Unix socket (default [`DEFAULT_SOCKET`], mode 0660) carries newline-delimited JSON: one
//! [`Request`] per line, one [`Response`] per line ([`protocol`]). The [`server`] does no work
//! itself: it forwards each request to the agent's runtime as a [`ControlRequest`] and writes
//! back what the runtime answers, so the runtime keeps sole ownership of the datapath and the
//! membership, and [`handler`] builds each answer there. [`view`] holds the JSON shapes of the answers and builds them from the
//! agent's state, [`client`] is the operator side, and [`command`] the `hasync show ...`
//! subcommands with their tables.

pub mod client;
pub mod command;
pub mod handler;
pub mod protocol;
pub mod server;
pub mod view;

pub use client::{request, ControlError};
pub use protocol::{Request, Response, SessionFilter};
pub use server::{serve, Level};

/// Where the agent listens when the configuration does not say otherwise.
pub const DEFAULT_SOCKET: &str = "/run/hasync/hasync.sock";

/// One request for the agent's runtime: what is asked, who asks, where to send the answer.
pub type ControlRequest = (Request, Level, tokio::sync::oneshot::Sender<Response>);

/// The channel the server forwards requests on; the runtime holds the receiving end.
/// Dropping that receiver stops the server and removes the socket file.
pub type ControlSender = tokio::sync::mpsc::Sender<ControlRequest>;

#[cfg(test)]
pub(crate) mod testing;
