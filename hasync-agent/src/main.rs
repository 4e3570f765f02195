//! `hasync`: the session-sync agent and its operator commands.

use std::{io::IsTerminal as _, process::ExitCode};

use clap::Parser as _;
use hasync_agent::{
    cli::{Cli, Command},
    datapath::error_chain,
};
use tracing_subscriber::{filter::LevelFilter, EnvFilter};

/// Large blocks (the sync's backlog) on transparent huge pages: see `huge_pages`.
#[global_allocator]
static ALLOCATOR: hasync_agent::huge_pages::LargeOnHugePages =
    hasync_agent::huge_pages::LargeOnHugePages;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy();
    // The datapath's records are filtered by `[local] datapath_log` already, unless RUST_LOG
    // says otherwise of them.
    let named = std::env::var("RUST_LOG").is_ok_and(|v| v.contains("hasync::datapath"));
    if let (false, Ok(all)) = (named, hasync_agent::datapath::LOG_DIRECTIVE.parse()) {
        filter = filter.add_directive(all);
    }
    if hasync_agent::service::journal::stderr_is_journal() {
        // Under systemd: journald adds the time; lines carry a priority and key=value fields.
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(hasync_agent::service::journal::JournalFormat)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init();
    }
    let result = match cli.command {
        Command::Agent(args) => hasync_agent::agent::run(&args),
        Command::Lab(args) => hasync_agent::lab::run(&args),
        Command::Show(args) => hasync_agent::control::command::show(&args),
        Command::Suspend(args) => hasync_agent::control::command::suspend(&args),
        Command::Functional(args) => hasync_agent::control::command::functional(&args),
        Command::Provision(args) => hasync_agent::provision::run(&args),
        Command::Teardown(args) => hasync_agent::service::teardown(&args),
        Command::Install(args) => hasync_agent::service::install(&args),
        Command::Uninstall(args) => hasync_agent::service::uninstall(&args),
        // Its own exit statuses (`config diff`: 1 when the configs differ, 2 on error).
        Command::Config(args) => return hasync_agent::provision::diff::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line with the context chain; no backtrace for an operator's mistake.
            let journal = hasync_agent::service::journal::stderr_is_journal();
            let message = error_chain(error.as_ref());
            eprintln!(
                "{}",
                hasync_agent::service::journal::fatal_line(&message, journal)
            );
            ExitCode::FAILURE
        }
    }
}
