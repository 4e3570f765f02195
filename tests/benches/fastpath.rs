//! `cargo xtask bench fastpath [--json]`: the XDP fast path's cost per packet through
//! BPF_PROG_TEST_RUN, against baselines measured in the same run.
//!
//! For 1,000 and 1,000,000 pre-filled sessions it measures, in ns/packet (median of several
//! interleaved runs, each a large repeat with the flow key varied per iteration):
//! (a) a bare program that parses the same headers and passes; (b) (a) plus exactly one hash
//! lookup; (c) hasync on an established session; (d) hasync creating a session (embryonic: past
//! the admission ring's bound each one evicts the oldest, event included); (e) (a) plus exactly
//! one LRU-hash insert (a table that makes room by itself). It reports c/b and d/e: the target
//! is ≤ 1.25 at both sizes.
//! The programs come from hasync-ebpf's bench-only object; baselines and the product variant
//! mix the iteration counter into the key identically.

use std::{net::SocketAddr, time::Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use hasync_agent::datapath::{clock, monotonic_ns, DatapathLog, JiffyClock};
use hasync_common::{
    maps as names, member::MEMBER_SLOTS, session::tcp, DatapathConfig, FlowKey, MemberEntry,
    MemberId, Session, SessionFlags, State,
};
use hasync_tests::{frame::Frame, stats::median, testrun::load_xdp_programs};

static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("HASYNC_EBPF_OUT_DIR"), "/fastpath-bench"));

const RUNS: usize = 7;
const XDP_PASS: u32 = 2;
const TARGET: f64 = 1.25;

struct Size {
    label: &'static str,
    sessions: u32,
    /// Packets per test run.
    repeat: u32,
}

const SIZES: [Size; 2] = [
    Size {
        label: "1k",
        sessions: 1_000,
        repeat: 1_000_000,
    },
    Size {
        label: "1m",
        sessions: 1_000_000,
        repeat: 200_000,
    },
];

#[derive(Clone, Copy, Default)]
struct Figures {
    parse: f64,
    lookup: f64,
    hit: f64,
    insert: f64,
    create: f64,
}

impl Figures {
    fn hit_ratio(&self) -> f64 {
        self.hit / self.lookup
    }
    fn create_ratio(&self) -> f64 {
        self.create / self.insert
    }
}

fn client() -> SocketAddr {
    SocketAddr::from(([198, 18, 0, 10], 40_000))
}

fn server() -> SocketAddr {
    SocketAddr::from(([198, 19, 0, 10], 443))
}

/// The canonical key of the bench flow with the bench index mixed in (as `IterMix` does).
fn key_for(idx: u32) -> FlowKey {
    let ip = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => [u32::from_ne_bytes(v4.ip().octets()), 0, 0, 0],
        SocketAddr::V6(_) => [0; 4],
    };
    let (mut key, _) = FlowKey::canonical(
        hasync_common::Family::V4,
        hasync_common::flow::IPPROTO_TCP,
        ip(client()),
        client().port().to_be(),
        ip(server()),
        server().port().to_be(),
    );
    key.addr_hi[2] = idx;
    key
}

fn established(now: u64) -> Session {
    Session {
        created_ns: now,
        last_seen_ns: now,
        last_event_ns: now,
        packets: [3, 2],
        bytes: [200, 150],
        version: 3,
        owner: MemberId(1),
        state: State::Established as u8,
        tcp_flags: [tcp::SYN | tcp::ACK, tcp::SYN | tcp::ACK],
        flags: SessionFlags(0),
        ..Session::default()
    }
}

struct Bench {
    ebpf: Ebpf,
}

impl Bench {
    fn load(capacity: u32, log: DatapathLog) -> Result<Self> {
        let cpus = u32::try_from(aya::util::nr_cpus().map_err(|(_, e)| e)?)?;
        // The agent's default: one eighth of the table for embryonic sessions.
        let embryo_slots = (capacity / names::EMBRYONIC_SHARE / cpus).max(1);
        let mut ebpf = EbpfLoader::new()
            .override_global(names::AYA_LOG_LEVEL, &log.aya_level(), true)
            .map_max_entries(names::SESSIONS, capacity)
            .map_max_entries(names::EMBRYOS, 2 * embryo_slots * cpus)
            .map_max_entries("BASE_TABLE", capacity)
            .map_max_entries("BASE_LRU", capacity)
            .load(BENCH_OBJECT)
            .context("loading the fastpath-bench object")?;
        load_xdp_programs(
            &mut ebpf,
            &[
                names::PROGRAM,
                names::CLOCK_PROGRAM,
                "base_parse",
                "base_lookup",
                "base_insert",
            ],
        )?;
        // The session clock as the agent sets it up: the product's jiffies path is measured.
        let clock_prog: &Xdp = ebpf
            .program(names::CLOCK_PROGRAM)
            .ok_or_else(|| anyhow!("no program {}", names::CLOCK_PROGRAM))?
            .try_into()?;
        let clock = clock::measure(clock_prog).context("measuring the session clock")?;
        let mut bench = Bench { ebpf };
        let mut cfg: Array<_, DatapathConfig> = Array::try_from(bench.map(names::CONFIG)?)?;
        let config = DatapathConfig {
            embryo_slots,
            embryo_replica_slots: embryo_slots * cpus,
            ..JiffyClock::configure(Some(clock), &DatapathConfig::with_defaults(MemberId(1)))
        };
        cfg.set(0, config, 0)?;
        let mut members: Array<_, MemberEntry> = Array::try_from(bench.map(names::MEMBERS)?)?;
        for id in 1..MEMBER_SLOTS {
            members.set(
                id,
                MemberEntry {
                    alive: 1,
                    _pad: [0; 7],
                },
                0,
            )?;
        }
        Ok(bench)
    }

    fn map(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("no map {name}"))
    }

    fn prefill(&mut self, n: u32) -> Result<()> {
        let now = monotonic_ns();
        let value = established(now);
        for table in [names::SESSIONS, "BASE_TABLE", "BASE_LRU"] {
            let mut map: HashMap<&mut MapData, FlowKey, Session> =
                HashMap::try_from(self.map(table)?)?;
            for idx in 0..n {
                map.insert(key_for(idx), value, 0)
                    .with_context(|| format!("prefill {table}"))?;
            }
        }
        Ok(())
    }

    /// Key index = offset + (iteration % modulo), or offset + iteration when `modulo` is 0.
    fn set_mix(&mut self, modulo: u64, offset: u64) -> Result<()> {
        let mut params: Array<_, [u64; 2]> = Array::try_from(self.map("BENCH_PARAMS")?)?;
        params.set(0, [modulo, offset], 0)?;
        Ok(())
    }

    /// Average ns per packet of one test run of `prog`.
    fn run(&self, prog: &str, frame: &[u8], repeat: u32) -> Result<f64> {
        let p: &Xdp = self
            .ebpf
            .program(prog)
            .ok_or_else(|| anyhow!("no program {prog}"))?
            .try_into()?;
        let out = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat,
                ..TestRunOptions::new()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {prog}"))?;
        // Baselines return XDP_DROP when their one map operation misses or fails, so a wrong
        // key mix shows up here rather than as a flattering figure.
        if out.return_value != XDP_PASS {
            bail!("{prog} returned {} instead of XDP_PASS", out.return_value);
        }
        Ok(out.duration.as_nanos() as f64)
    }
}

fn measure(size: &Size, log: DatapathLog) -> Result<Figures> {
    let capacity = (size.sessions * 2).max(4096);
    let mut bench = Bench::load(capacity, log)?;
    let t = Instant::now();
    bench.prefill(size.sessions)?;
    eprintln!(
        "{}: prefilled {} sessions in {:.1?}",
        size.label,
        size.sessions,
        t.elapsed()
    );

    let ack = Frame::tcp(client(), server()).ack().payload(64).build();
    let syn = Frame::tcp(client(), server()).syn().build();
    let mut samples: [Vec<f64>; 5] = Default::default();

    // Hits: every iteration's key is one of the pre-filled sessions.
    bench.set_mix(u64::from(size.sessions), 0)?;
    for _ in 0..RUNS {
        for (slot, prog) in [(0, "base_parse"), (1, "base_lookup"), (2, names::PROGRAM)] {
            samples[slot].push(bench.run(prog, &ack, size.repeat)?);
        }
    }
    // Creates: every iteration's key is new (offset past the pre-filled range, counter grows).
    bench.set_mix(0, u64::from(size.sessions))?;
    for _ in 0..RUNS {
        for (slot, prog) in [(3, "base_insert"), (4, names::PROGRAM)] {
            samples[slot].push(bench.run(prog, &syn, size.repeat)?);
        }
    }
    // RUNS ≥ 1 samples each: never empty.
    let [parse, lookup, hit, insert, create] = samples.map(|v| median(v).unwrap_or(f64::NAN));
    Ok(Figures {
        parse,
        lookup,
        hit,
        insert,
        create,
    })
}

/// The datapath log level the hasync program runs at: `HASYNC_DATAPATH_LOG` (as in `[local]
/// datapath_log`), default the product's.
fn log_level() -> Result<DatapathLog> {
    match std::env::var("HASYNC_DATAPATH_LOG") {
        Ok(name) => name.parse().map_err(|e: String| anyhow!(e)),
        Err(_) => Ok(DatapathLog::default()),
    }
}

fn main() -> Result<()> {
    let json = std::env::args().any(|a| a == "--json");
    let log = log_level()?;
    let mut results = Vec::new();
    for size in &SIZES {
        results.push((size.label, measure(size, log)?));
    }
    if json {
        let mut figures = serde_json::Map::new();
        let mut ratios = serde_json::Map::new();
        for (label, f) in &results {
            figures.insert(
                label.to_string(),
                serde_json::json!({
                    "parse": f.parse, "lookup": f.lookup, "hasync_hit": f.hit,
                    "insert": f.insert, "hasync_create": f.create,
                }),
            );
            ratios.insert(format!("hit_{label}"), f.hit_ratio().into());
            ratios.insert(format!("create_{label}"), f.create_ratio().into());
        }
        let out = serde_json::json!({
            "bench": "fastpath",
            "unit": "ns_per_packet",
            "runs": RUNS,
            "datapath_log": log.name(),
            "target": TARGET,
            "figures": figures,
            "ratios": ratios,
        });
        println!("{out}");
    } else {
        println!("fastpath: ns/packet through BPF_PROG_TEST_RUN, median of {RUNS} runs, datapath_log = {} (target: c/b and d/e <= {TARGET})", log.name());
        println!(
            "| sessions | (a) parse | (b) +lookup | (c) hasync hit | c/b | (e) +insert | (d) hasync create | d/e |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for (label, f) in &results {
            println!(
                "| {label} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {:.2} |",
                f.parse,
                f.lookup,
                f.hit,
                f.hit_ratio(),
                f.insert,
                f.create,
                f.create_ratio()
            );
        }
    }
    Ok(())
}
