//! The datapath's own log (`[local] datapath_log`): rare events the XDP programs note (a
//! session taken over, a session of ours replaced by a peer's newer version, malformed frames),
//! logged with aya-log by the log program and forwarded to tracing under the target
//! `hasync::datapath`.
//!
//! The programs only note an event (`hasync_common::LogNote`, one per CPU and kind, in the
//! per-CPU counters value); [`DatapathLogger::drain`] runs the log program for each note that
//! changed since the last drain and forwards the records it wrote. So each kind is logged at
//! most once per CPU per drain; its counter counts every one.

use aya::{maps::PerCpuValues, programs::Xdp, Ebpf};
use aya_log::EbpfLogger;
use hasync_common::{maps as names, Counters, LogRequest, LOG_NOTE_KINDS};
use serde::{Deserialize, Serialize};

use super::{table_runner::run_one, DatapathError};

/// `[local] datapath_log`: the least severe datapath event that is logged.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DatapathLog {
    /// Nothing: the programs' log branches are removed by the verifier.
    Off,
    Error,
    /// Sessions of ours replaced by a peer's newer version (the default).
    #[default]
    Warn,
    /// Also sessions taken over.
    Info,
    /// Also malformed frames (sampled).
    Debug,
}

impl DatapathLog {
    /// Every level, in the order of the config's values.
    pub const ALL: [DatapathLog; 5] = [
        DatapathLog::Off,
        DatapathLog::Error,
        DatapathLog::Warn,
        DatapathLog::Info,
        DatapathLog::Debug,
    ];

    /// The config's name of the level.
    pub fn name(self) -> &'static str {
        match self {
            DatapathLog::Off => "off",
            DatapathLog::Error => "error",
            DatapathLog::Warn => "warn",
            DatapathLog::Info => "info",
            DatapathLog::Debug => "debug",
        }
    }

    /// The value of the programs' `AYA_LOG_LEVEL` (aya-log's levels: error 1 to trace 5).
    pub fn aya_level(self) -> u8 {
        match self {
            DatapathLog::Off => 0,
            DatapathLog::Error => 1,
            DatapathLog::Warn => 2,
            DatapathLog::Info => 3,
            DatapathLog::Debug => 4,
        }
    }
}

impl std::str::FromStr for DatapathLog {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        DatapathLog::ALL
            .into_iter()
            .find(|l| l.name() == s)
            .ok_or_else(|| {
                format!("unknown datapath log level `{s}`: off, error, warn, info or debug")
            })
    }
}

/// The log program's answer when it logged a note (or had nothing new).
const LOGGED: u32 = 2; // XDP_PASS
/// The log program's answer when the note was being written: asked again next drain.
const BUSY: u32 = 1; // XDP_DROP

/// Reads the records the log program writes, and remembers which notes it has logged.
pub struct DatapathLogger {
    records: EbpfLogger<ToTracing>,
    /// The id of the CPU of each per-CPU value, in the kernel's order (the possible CPUs).
    cpu_ids: Vec<u32>,
    /// Per CPU, the sequence of each kind's note when it was last logged.
    seen: Vec<[u32; LOG_NOTE_KINDS]>,
}

impl DatapathLogger {
    /// Takes aya-log's ring out of `ebpf`. Notes already in `counters` (a pinned map's, from an
    /// earlier agent) count as logged.
    pub fn new(ebpf: &mut Ebpf, counters: &PerCpuValues<Counters>) -> Result<Self, DatapathError> {
        let records = EbpfLogger::init_with_logger(ebpf, ToTracing).map_err(DatapathError::Log)?;
        Ok(DatapathLogger {
            records,
            cpu_ids: possible_cpu_ids().map_err(DatapathError::PossibleCpus)?,
            seen: counters.iter().map(sequences).collect(),
        })
    }

    /// Runs `prog` (the log program) for every note in `counters` that changed since it was
    /// last logged, forwarding each record at once (the ring stays small however many CPUs
    /// there are). Returns how many notes were logged.
    pub fn drain(
        &mut self,
        prog: &Xdp,
        counters: &PerCpuValues<Counters>,
    ) -> Result<usize, DatapathError> {
        let mut logged = 0;
        let cpus = self.cpu_ids.iter().zip(self.seen.iter_mut());
        for ((&cpu, seen), values) in cpus.zip(counters.iter()) {
            for (kind, (&now, last)) in sequences(values).iter().zip(seen.iter_mut()).enumerate() {
                // A note being written when the counters were read (odd) is asked for too:
                // the program reads it as it is now.
                if now == *last {
                    continue;
                }
                if let Some(seq) = run(prog, cpu, kind, *last)? {
                    if seq != *last {
                        *last = seq;
                        logged += 1;
                    }
                }
                forward(&mut self.records)?;
            }
        }
        Ok(logged)
    }
}

/// Forwards the records in the ring to tracing. aya-log panics on a record it cannot read:
/// only the log program writes the ring, but that panic must not stop the agent.
fn forward(records: &mut EbpfLogger<ToTracing>) -> Result<(), DatapathError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| records.flush()))
        .map_err(|_| DatapathError::LogRecord)
}

/// The ids of the possible CPUs (`/sys/devices/system/cpu/possible`, e.g. `0-3,8-11`): the
/// order of a per-CPU map's values.
fn possible_cpu_ids() -> std::io::Result<Vec<u32>> {
    const POSSIBLE: &str = "/sys/devices/system/cpu/possible";
    let text = std::fs::read_to_string(POSSIBLE)?;
    parse_cpu_ids(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{POSSIBLE}: not a CPU list: {text:?}"),
        )
    })
}

/// `0-3,8-11` → 0, 1, 2, 3, 8, 9, 10, 11.
fn parse_cpu_ids(text: &str) -> Option<Vec<u32>> {
    let mut ids = Vec::new();
    for part in text.trim().split(',') {
        let (first, last): (u32, u32) = match part.split_once('-') {
            Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
            None => (part.parse().ok()?, part.parse().ok()?),
        };
        if first > last {
            return None;
        }
        ids.extend(first..=last);
    }
    Some(ids)
}

/// Each kind's note sequence in one CPU's counters value.
fn sequences(values: &Counters) -> [u32; LOG_NOTE_KINDS] {
    values.notes.map(|n| n.seq)
}

/// Runs the log program for CPU `cpu`'s note of `kind`, the last logged being numbered
/// `last`: the sequence of the note it logged (`last` again when nothing was new), or `None`
/// when the note was being written.
fn run(prog: &Xdp, cpu: u32, kind: usize, last: u32) -> Result<Option<u32>, DatapathError> {
    let request = LogRequest {
        cpu,
        // Fits: kinds are a handful.
        kind: kind as u32,
        seq: last,
    };
    match run_one::<_, LogRequest>(prog, names::LOG_PROGRAM, &request)? {
        (LOGGED, Some(answer)) => Ok(Some(answer.seq)),
        (BUSY, _) => Ok(None),
        (verdict, _) => Err(DatapathError::BatchRejected {
            program: names::LOG_PROGRAM,
            items: 1,
            verdict,
        }),
    }
}

/// aya-log's records, forwarded to tracing at their level.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "hasync::datapath", "{message}"),
            log::Level::Warn => tracing::warn!(target: "hasync::datapath", "{message}"),
            log::Level::Info => tracing::info!(target: "hasync::datapath", "{message}"),
            log::Level::Debug => tracing::debug!(target: "hasync::datapath", "{message}"),
            log::Level::Trace => tracing::trace!(target: "hasync::datapath", "{message}"),
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_are_read_as_the_kernel_writes_them() {
        assert_eq!(parse_cpu_ids("0-1\n"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_ids("0-3,8-9"), Some(vec![0, 1, 2, 3, 8, 9]));
        assert_eq!(parse_cpu_ids("0,2"), Some(vec![0, 2]));
        assert_eq!(parse_cpu_ids("3-1"), None);
        assert_eq!(parse_cpu_ids("a-b"), None);
    }
}
