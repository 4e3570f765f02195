//! The operator commands: `hasync show ...`, `hasync suspend`, `hasync functional`. Each sends
//! one request to the agent and prints the answer as aligned tables, or as-is with `--json`.

use std::{io::Write, net::IpAddr, path::PathBuf};

use anyhow::Context as _;
use clap::{builder::PossibleValuesParser, Args, Subcommand};
use hasync_common::{Counter, MemberId, State};

use super::{
    client,
    protocol::{check_limit, Request, SessionFilter, MAX_SESSION_PAGE, PROTOCOLS},
    view::{
        CountersView, FlapsView, LinkStatisticsView, LocalStateView, MembersView, SessionView,
        SessionsView, StatisticsView,
    },
    DEFAULT_SOCKET,
};
use crate::config::Config;

/// Sessions listed when `--limit` is not given.
pub const DEFAULT_LIMIT: u64 = 1000;

/// How to reach the agent.
#[derive(Clone, Debug, Default, Args)]
pub struct ConnectArgs {
    /// The agent's control socket [default: /run/hasync/hasync.sock].
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    pub socket: Option<PathBuf>,
    /// Take the control socket from this configuration file (`[local].control_socket`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ConnectArgs {
    /// `--socket`, else the configuration's `[local].control_socket`, else the default.
    pub fn socket_path(&self) -> anyhow::Result<PathBuf> {
        if let Some(socket) = &self.socket {
            return Ok(socket.clone());
        }
        let Some(file) = &self.config else {
            return Ok(DEFAULT_SOCKET.into());
        };
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read config file {}", file.display()))?;
        // Only the socket path is needed: parse, but do not validate (the key file may be
        // unreadable to an operator who can still use the socket).
        let config = Config::from_toml(file, &text)?;
        Ok(config.local.control_socket)
    }
}

/// `--json`.
#[derive(Clone, Debug, Default, Args)]
pub struct OutputArgs {
    /// Print the agent's answer as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// `hasync show ...`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(subcommand)]
    pub what: ShowCommand,
}

#[derive(Debug, Subcommand)]
pub enum ShowCommand {
    /// The cluster: members, sync statistics, sessions, flaps.
    Cluster(ShowClusterArgs),
    /// Datapath counters.
    Counters(ShowCountersArgs),
}

#[derive(Debug, Args)]
pub struct ShowClusterArgs {
    #[command(subcommand)]
    pub what: ClusterCommand,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Members, their states, sync links and sessions owned.
    Members(PlainShowArgs),
    /// Sync traffic per peer and link, rejected frames, full syncs, replication lag.
    Statistics(PlainShowArgs),
    /// The session table, filtered and paged.
    Sessions(ShowSessionsArgs),
    /// State changes (flaps) per member.
    Flaps(PlainShowArgs),
}

#[derive(Debug, Args)]
pub struct PlainShowArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct ShowCountersArgs {
    /// Only counters whose name starts with this (e.g. `err-`).
    #[arg(long, value_name = "P")]
    pub prefix: Option<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct ShowSessionsArgs {
    /// Only the number of sessions, in total and per owner.
    #[arg(long)]
    pub count: bool,
    /// With `--count`: the counts of the expiry sweep's last pass, at once and as old as that
    /// pass (the answer says how old), instead of a walk of the whole table now.
    #[arg(long, requires = "count", conflicts_with_all = ["owner", "zone", "proto", "address", "port", "state"])]
    pub swept: bool,
    /// Only sessions owned by this member.
    #[arg(long, value_name = "N", value_parser = parse_owner)]
    pub owner: Option<u8>,
    /// Only sessions of this zone.
    #[arg(long, value_name = "NAME")]
    pub zone: Option<String>,
    /// Only sessions of this protocol.
    #[arg(long, value_name = "P", value_parser = PossibleValuesParser::new(PROTOCOLS.map(|(name, _)| name)))]
    pub proto: Option<String>,
    /// Only sessions with this address at either end.
    #[arg(long, value_name = "IP")]
    pub address: Option<IpAddr>,
    /// Only TCP/UDP sessions with this port at either end.
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// Only sessions in this state.
    #[arg(long, value_name = "S", value_parser = PossibleValuesParser::new(State::ALL.map(State::name)))]
    pub state: Option<String>,
    /// Matching sessions to skip.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub offset: u64,
    /// Most sessions to list (1–100000).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LIMIT, value_parser = parse_limit)]
    pub limit: u64,
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

impl ShowSessionsArgs {
    pub fn request(&self) -> Request {
        if self.swept {
            return Request::ShowSessionCounts {};
        }
        Request::ShowSessions {
            count_only: self.count,
            filter: SessionFilter {
                owner: self.owner,
                zone: self.zone.clone(),
                proto: self.proto.clone(),
                address: self.address,
                port: self.port,
                state: self.state.clone(),
            },
            offset: self.offset,
            limit: Some(self.limit),
        }
    }
}

fn parse_owner(s: &str) -> Result<u8, String> {
    let range = format!("1–{}", MemberId::MAX);
    let n: u64 = s
        .parse()
        .map_err(|_| format!("owner `{s}` is not a member id in {range}"))?;
    match u8::try_from(n) {
        Ok(id) if MemberId(id).is_valid() => Ok(id),
        _ => Err(format!("owner {n} is out of range {range}")),
    }
}

fn parse_limit(s: &str) -> Result<u64, String> {
    let range = format!("1–{MAX_SESSION_PAGE}");
    let n: u64 = s
        .parse()
        .map_err(|_| format!("limit `{s}` is not a number in {range}"))?;
    check_limit(n)
}

/// Runs `hasync show ...`, printing to stdout.
pub fn show(args: &ShowArgs) -> anyhow::Result<()> {
    show_to(args, &mut std::io::stdout().lock())
}

/// Runs `hasync show ...`, printing to `out`.
pub fn show_to(args: &ShowArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let (connect, json, request) = match &args.what {
        ShowCommand::Cluster(ShowClusterArgs { what }) => match what {
            ClusterCommand::Members(a) => (&a.connect, a.output.json, Request::ShowMembers {}),
            ClusterCommand::Statistics(a) => {
                (&a.connect, a.output.json, Request::ShowStatistics {})
            }
            ClusterCommand::Flaps(a) => (&a.connect, a.output.json, Request::ShowFlaps {}),
            ClusterCommand::Sessions(a) => (&a.connect, a.output.json, a.request()),
        },
        ShowCommand::Counters(a) => (
            &a.connect,
            a.output.json,
            Request::ShowCounters {
                prefix: a.prefix.clone(),
            },
        ),
    };
    let socket = connect.socket_path()?;
    let data = client::call(&socket, &request)?;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&data)?)?;
        return Ok(());
    }
    match request {
        Request::ShowMembers {} => render_members(&client::parse(&socket, data)?, out)?,
        Request::ShowStatistics {} => render_statistics(&client::parse(&socket, data)?, out)?,
        Request::ShowFlaps {} => render_flaps(&client::parse(&socket, data)?, out)?,
        Request::ShowCounters { .. } => render_counters(&client::parse(&socket, data)?, out)?,
        Request::ShowSessions { offset, filter, .. } => {
            render_sessions(&client::parse(&socket, data)?, offset, &filter, out)?
        }
        Request::ShowSessionCounts {} => {
            let filter = SessionFilter::default();
            render_sessions(&client::parse(&socket, data)?, 0, &filter, out)?
        }
        Request::Suspend {} | Request::Functional {} => unreachable!("not a show request"),
    }
    Ok(())
}

/// `hasync suspend`.
pub fn suspend(args: &ConnectArgs) -> anyhow::Result<()> {
    change_state(args, Request::Suspend {}, &mut std::io::stdout().lock())
}

/// `hasync functional`.
pub fn functional(args: &ConnectArgs) -> anyhow::Result<()> {
    change_state(args, Request::Functional {}, &mut std::io::stdout().lock())
}

fn change_state(args: &ConnectArgs, request: Request, out: &mut dyn Write) -> anyhow::Result<()> {
    let socket = args.socket_path()?;
    let data = client::call(&socket, &request)?;
    report_state(data, out)
}

/// Prints the state a `suspend` or `functional` answer gives; fails with what a restart would
/// do when the answer says the change was not kept ([`LocalStateView::not_kept`]).
fn report_state(data: serde_json::Value, out: &mut dyn Write) -> anyhow::Result<()> {
    match serde_json::from_value::<LocalStateView>(data) {
        Ok(LocalStateView {
            member,
            state,
            not_kept,
        }) => {
            writeln!(out, "member {member} is {state}")?;
            if let Some(why) = not_kept {
                anyhow::bail!("{why}");
            }
        }
        Err(_) => writeln!(out, "ok")?,
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tables

/// Columns aligned on the widest cell; numbers right-aligned.
struct Table {
    header: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns named `header`; a name starting with `>` is right-aligned (the `>` is dropped).
    fn new(header: &[&'static str]) -> Table {
        Table {
            header: header.iter().map(|h| h.trim_start_matches('>')).collect(),
            right: header.iter().map(|h| h.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn write(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.header.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let line = |out: &mut dyn Write, cells: &mut dyn Iterator<Item = &str>| {
            let mut text = String::new();
            for (i, cell) in cells.enumerate() {
                let w = widths.get(i).copied().unwrap_or(0);
                let pad = " ".repeat(w.saturating_sub(width(cell)));
                if i > 0 {
                    text.push_str("  ");
                }
                if self.right.get(i).copied().unwrap_or(false) {
                    text.push_str(&pad);
                    text.push_str(cell);
                } else {
                    text.push_str(cell);
                    text.push_str(&pad);
                }
            }
            writeln!(out, "{}", text.trim_end())
        };
        line(out, &mut self.header.iter().copied())?;
        for row in &self.rows {
            line(out, &mut row.iter().map(String::as_str))?;
        }
        Ok(())
    }
}

/// `12s`, `5m 3s`, `2h 7m`, `3d 4h`.
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

fn ago(secs: Option<u64>) -> String {
    secs.map_or_else(|| "never".to_owned(), |s| format!("{} ago", duration(s)))
}

fn or_dash(v: Option<impl ToString>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

pub fn render_members(v: &MembersView, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "Cluster {}, local member {}", v.cluster_id, v.local)?;
    writeln!(out)?;
    let mut t = Table::new(&[
        ">ID",
        "Serial",
        "State",
        "HA4",
        "HA4 backup",
        ">Sessions",
        ">Flaps",
        "Version",
        "Last change",
    ]);
    for m in &v.members {
        let id = if m.id == v.local {
            format!("*{}", m.id)
        } else {
            m.id.to_string()
        };
        t.row(vec![
            id,
            m.serial.clone(),
            m.state.clone(),
            m.ha4.clone(),
            m.ha4_backup.clone(),
            m.sessions_owned.to_string(),
            m.flaps.to_string(),
            or_dash(m.version.as_ref()),
            ago(m.last_change),
        ]);
    }
    t.write(out)?;
    writeln!(out, "(* this member)")?;
    if !v.faults.is_empty() {
        writeln!(out)?;
        writeln!(out, "This member is non-functional:")?;
        for f in &v.faults {
            writeln!(out, "  - {f}")?;
        }
    }
    for w in &v.warnings {
        writeln!(out, "warning: {w}")?;
    }
    Ok(())
}

pub fn render_flaps(v: &FlapsView, out: &mut dyn Write) -> std::io::Result<()> {
    let mut t = Table::new(&[">Member", ">Flaps", "Last change"]);
    for m in &v.members {
        t.row(vec![
            m.id.to_string(),
            m.flaps.to_string(),
            ago(m.last_change),
        ]);
    }
    t.write(out)
}

pub fn render_counters(v: &CountersView, out: &mut dyn Write) -> std::io::Result<()> {
    // In the datapath's order (related counters together), names this CLI does not know last.
    let mut names: Vec<&String> = v.counters.keys().collect();
    let position = |name: &str| {
        Counter::ALL
            .iter()
            .position(|c| c.name() == name)
            .unwrap_or(usize::MAX)
    };
    names.sort_by_key(|n| position(n));
    let mut t = Table::new(&["Counter", ">Value"]);
    for name in names {
        t.row(vec![name.clone(), v.counters[name].to_string()]);
    }
    if t.rows.is_empty() {
        return writeln!(out, "no counter matches");
    }
    t.write(out)?;
    if let Some(pool) = v.replica_pool {
        let (held, limit) = (pool.held, pool.limit);
        writeln!(
            out,
            "\nPeers' pool: {held} of {limit} sessions ([local] replica_limit)"
        )?;
    }
    Ok(())
}

pub fn render_statistics(v: &StatisticsView, out: &mut dyn Write) -> std::io::Result<()> {
    if v.peers.is_empty() {
        writeln!(out, "No peers configured.")?;
    } else {
        for (title, table) in [
            ("Sync traffic", sync_traffic_table(v)),
            ("Link health", link_health_table(v)),
            ("Records", records_table(v)),
            ("Full syncs", full_syncs_table(v)),
        ] {
            writeln!(out, "{title}")?;
            table.write(out)?;
            writeln!(out)?;
        }
    }

    writeln!(out, "Rejected")?;
    let mut t = Table::new(&["Reason", ">Count"]);
    for (reason, n) in &v.rejected {
        t.row(vec![reason.clone(), n.to_string()]);
    }
    t.write(out)
}

/// A row per peer and link: the peer, the link, and the `columns` that `values` reads.
fn link_table<const N: usize>(
    v: &StatisticsView,
    columns: [&'static str; N],
    values: fn(&LinkStatisticsView) -> [u64; N],
) -> Table {
    let mut header = vec![">Peer", "Link"];
    header.extend(columns);
    let mut t = Table::new(&header);
    for p in &v.peers {
        for (link, s) in &p.links {
            let mut row = vec![p.id.to_string(), link.clone()];
            row.extend(values(s).iter().map(u64::to_string));
            t.row(row);
        }
    }
    t
}

/// Records, frames and bytes each way, per peer and link.
fn sync_traffic_table(v: &StatisticsView) -> Table {
    let columns = [
        ">Records sent",
        ">Records recv",
        ">Frames sent",
        ">Frames recv",
        ">Bytes sent",
        ">Bytes recv",
    ];
    link_table(v, columns, |s| {
        [
            s.records_sent,
            s.records_received,
            s.frames_sent,
            s.frames_received,
            s.bytes_sent,
            s.bytes_received,
        ]
    })
}

/// Acknowledgements, keepalives, failures and stalls, per peer and link.
fn link_health_table(v: &StatisticsView) -> Table {
    let columns = [
        ">Acks sent",
        ">Acks recv",
        ">Keepalives sent",
        ">Keepalives recv",
        ">Late",
        ">Failures",
        ">Stalled",
    ];
    link_table(v, columns, |s| {
        [
            s.acks_sent,
            s.acks_received,
            s.keepalives_sent,
            s.keepalives_received,
            s.keepalives_late,
            s.failures,
            s.stalls,
        ]
    })
}

/// What became of each peer's records, and the replication lag.
fn records_table(v: &StatisticsView) -> Table {
    let mut t = Table::new(&[
        ">Peer",
        ">Resent",
        ">Installed",
        ">Deleted",
        ">Kept (local)",
        ">Orphaned",
        ">Refused (zone)",
        ">Refused (owner)",
        ">Lag p50 (ms)",
        ">Lag p99 (ms)",
    ]);
    let ms = |v: Option<f64>| or_dash(v.map(|ms| format!("{ms:.1}")));
    for p in &v.peers {
        t.row(vec![
            p.id.to_string(),
            p.resends.to_string(),
            p.records_installed.to_string(),
            p.records_deleted.to_string(),
            p.records_kept.to_string(),
            p.records_orphaned.to_string(),
            p.records_refused_zone.to_string(),
            p.records_refused_owner.to_string(),
            ms(p.replication_lag.p50_ms),
            ms(p.replication_lag.p99_ms),
        ]);
    }
    t
}

/// Full syncs with each peer, sent and received.
fn full_syncs_table(v: &StatisticsView) -> Table {
    let mut t = Table::new(&[
        ">Peer",
        ">Sent",
        ">Last (ms)",
        ">Last records",
        ">Received",
        ">Last (ms)",
        ">Last records",
        "Running",
    ]);
    for p in &v.peers {
        let (s, r) = (&p.full_syncs.sent, &p.full_syncs.received);
        let running = match (s.running, r.running) {
            (true, true) => "both ways",
            (true, false) => "sending",
            (false, true) => "receiving",
            (false, false) => "-",
        };
        t.row(vec![
            p.id.to_string(),
            s.count.to_string(),
            or_dash(s.last_duration_ms),
            or_dash(s.last_records),
            r.count.to_string(),
            or_dash(r.last_duration_ms),
            or_dash(r.last_records),
            running.to_owned(),
        ]);
    }
    t
}

/// The session table, its totals and, when it is a part of the matches, which part.
pub fn render_sessions(
    v: &SessionsView,
    offset: u64,
    filter: &SessionFilter,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let matching = if filter.is_empty() { "" } else { " matching" };
    let Some(sessions) = &v.sessions else {
        return render_session_count(v, matching, out);
    };
    if v.total == 0 {
        return writeln!(out, "no{matching} sessions");
    }
    if !sessions.is_empty() {
        session_table(sessions).write(out)?;
        writeln!(out)?;
    }
    let owners = v
        .by_owner
        .iter()
        .map(|(owner, n)| format!("member {owner}: {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    writeln!(out, "{}{matching} sessions ({owners})", v.total)?;
    render_page(v.total, offset, sessions.len() as u64, out)
}

/// `--count`: the number of sessions, and by owner.
fn render_session_count(
    v: &SessionsView,
    matching: &str,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    match v.counted_ms_ago {
        Some(ms) => writeln!(
            out,
            "{}{matching} sessions, as the expiry sweep counted them {:.1} s ago",
            v.total,
            ms as f64 / 1000.0
        )?,
        None => writeln!(out, "{}{matching} sessions", v.total)?,
    }
    if !v.by_owner.is_empty() {
        let mut t = Table::new(&[">Owner", ">Sessions"]);
        for (owner, n) in &v.by_owner {
            t.row(vec![owner.to_string(), n.to_string()]);
        }
        t.write(out)?;
    }
    Ok(())
}

/// A row per session.
fn session_table(sessions: &[SessionView]) -> Table {
    let mut t = Table::new(&[
        "Proto",
        "Source",
        ">Sport",
        "Destination",
        ">Dport",
        "State",
        ">Owner",
        "Zone",
        ">Idle",
    ]);
    for s in sessions {
        t.row(vec![
            s.proto.clone(),
            s.src.to_string(),
            s.sport.to_string(),
            s.dst.to_string(),
            s.dport.to_string(),
            s.state.clone(),
            s.owner.to_string(),
            if s.zone.is_empty() {
                "-".to_owned()
            } else {
                s.zone.clone()
            },
            s.idle_ms.map_or_else(
                || "-".to_owned(),
                |ms| format!("{:.1} s", ms as f64 / 1000.0),
            ),
        ]);
    }
    t
}

/// Which part of the `total` matches the `shown` sessions from `offset` are, when they are
/// not all of them.
fn render_page(total: u64, offset: u64, shown: u64, out: &mut dyn Write) -> std::io::Result<()> {
    if shown == 0 {
        writeln!(
            out,
            "showing none of {total}: --offset {offset} is past the end"
        )?;
    } else if offset > 0 || offset + shown < total {
        writeln!(
            out,
            "showing {}–{} of {total}; use --offset/--limit",
            offset + 1,
            offset + shown
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
