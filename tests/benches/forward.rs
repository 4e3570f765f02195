//! `cargo xtask bench forward [--json] [--cases a,b,...]`: frames per second through a member,
//! pushed with live frames through real veth interfaces, against baselines of the same run.
//!
//! ```text
//!  gen ── g0 ═══ in0 ── member (device under test) ── out0 ═══ r0 ── recv
//!   └──── g1 ═════════════════════════════════════════════ r1 ───┘
//! ```
//! Namespaces `bfwd<pid>-{gen,member,recv}`, joined by veth pairs. The traffic generator is an
//! XDP program of the bench-only object `forward-bench`, run with BPF_PROG_TEST_RUN in
//! live-frames mode from a thread in `gen` (or `recv`, for replies): it rewrites a 64-byte UDP
//! frame template into every frame, varies source (replies: destination) address and port
//! over the flows, and returns XDP_TX, so the frames leave through the test run's ingress
//! veth. The far end counts them with an XDP program (per-CPU counter, XDP_DROP); the rate is
//! what it counted over the time the generator's run loops took as the kernel reports it
//! (median of several runs). The receivers' NAPI runs on the generator's CPU inside that loop
//! (bottom halves are enabled after every batch), so the figure is the pipeline's rate on one
//! CPU; the per-call setup of the live-frames page pool and time the generator thread was
//! preempted by other work on the host are left out.
//!
//! Cases, IPv4 and IPv6, 1,000 and 1,000,000 flows:
//! (a) gen → recv directly (g1 → r1): the floor of this host;
//! (b) a bare XDP redirect on the member (DEVMAP to out0, MAC rewrite): the XDP floor;
//! (c) kernel forwarding, no conntrack (an XDP_PASS program on in0/out0, so the veths take
//!     XDP frames);
//! (d) kernel forwarding with nftables conntrack and a stateful ruleset;
//! (e) the hasync agent (release binary: $HASYNC_BIN, else `<target>/release/hasync`),
//!     `forwarding = "kernel"` (the default);
//! (f) hasync, `[local] forwarding = "xdp"`;
//! (g) hasync virtual wire `[[vwire]] interfaces = ["in0", "out0"]` (gen and recv in one
//!     subnet, frames addressed to recv's MAC);
//! (h) (b) after exactly one lookup of the frame's flow key (the product's parser) in a hash of
//!     the agent's table's key, value and capacity, holding every flow (a learning pass
//!     inserts them first): the ceiling of any design that keeps a session per flow in that
//!     table, so h/b bounds what f/b and g/b can reach on this host.
//! In (d)–(g) every flow is established first: one pass of frames in the original direction,
//! then one of replies from recv, then the measurement.
//!
//! The cases run in rounds (`--rounds N`, default 3), in the order above in the first round,
//! reversed in the second, and so on: on a shared VM the rates drift by tens of percent over
//! minutes, more than the differences between cases. A ratio is taken within each round (its
//! two cases at most a round, about two minutes, apart; a forward and a reversed round
//! together cancel a steady drift, an odd count leaves one round's), and the median of the
//! rounds' ratios is reported with their range; a case's rate is the median of its rounds'.
//!
//! Targets: f/b ≥ 0.8, f/d ≥ 3, g/b ≥ 0.85 (h/b is reported beside them, not a target). The
//! generator and the device under test share this host's CPUs (2 on the CI machines): every
//! figure is a same-run ratio. CPU per packet is the system + irq + softirq time of all CPUs
//! (/proc/stat) over the sending time, per frame received: the generator's share included.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure, Context as _, Result};
use aya::maps::HashMap;
use hasync_agent::lab::ClusterOptions;
use hasync_tests::{
    interrupt::{catch_signals, check_stop},
    live::{
        agent::{agent_binary, bench_timeouts, Agents},
        member,
        station::{establish, one_pass, End, Station},
        stream::{size_label, stream, Direction, Family, FRAME_LEN},
    },
    netns::{veth, Lab, Netns},
    stats::{median, range},
};

/// Frames per test run while measuring: large, since each live-frames run sets up and tears
/// down its page pool (tens of ms here).
const CHUNK: u32 = 1 << 18;
/// Sending time of one run, and runs per figure.
const RUN_TIME: Duration = Duration::from_millis(500);
const RUNS: usize = 3;
/// Rounds of all the cases, unless `--rounds` says otherwise, and the most it takes.
const ROUNDS: usize = 3;
const MAX_ROUNDS: usize = 20;
/// Flows per figure, unless `--flows` says otherwise.
const SIZES: [u32; 2] = [1_000, 1_000_000];
/// Most flows `--flows` takes: 2^14 ports times 64 hosts; the agent's table holds them all
/// embryonic on one CPU.
const MAX_FLOWS: u32 = 1 << 20;
/// The agent's session table: room for 1M flows before any is replied to.
const CAPACITY: u32 = 1 << 22;
const EMBRYONIC: u32 = CAPACITY / 2;

// ---------------------------------------------------------------------------------------------
// Cases and families.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Case {
    Floor,
    Redirect,
    Kernel,
    Conntrack,
    HasyncKernel,
    HasyncXdp,
    Vwire,
    Lookup,
}

impl Case {
    const ALL: [Case; 8] = [
        Case::Floor,
        Case::Redirect,
        Case::Kernel,
        Case::Conntrack,
        Case::HasyncKernel,
        Case::HasyncXdp,
        Case::Vwire,
        Case::Lookup,
    ];

    fn letter(self) -> char {
        match self {
            Case::Floor => 'a',
            Case::Redirect => 'b',
            Case::Kernel => 'c',
            Case::Conntrack => 'd',
            Case::HasyncKernel => 'e',
            Case::HasyncXdp => 'f',
            Case::Vwire => 'g',
            Case::Lookup => 'h',
        }
    }

    fn what(self) -> &'static str {
        match self {
            Case::Floor => "gen → recv XDP_DROP",
            Case::Redirect => "bare XDP redirect",
            Case::Kernel => "kernel forwarding",
            Case::Conntrack => "kernel + nft conntrack",
            Case::HasyncKernel => "hasync, kernel forwarding",
            Case::HasyncXdp => "hasync, XDP forwarding",
            Case::Vwire => "hasync vwire",
            Case::Lookup => "(b) + one session lookup",
        }
    }

    /// `a,b,c` → those cases, in the bench's order.
    fn parse_list(text: &str) -> Result<Vec<Case>> {
        let mut out = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let case = Case::ALL
                .into_iter()
                .find(|c| part.len() == 1 && part.starts_with(c.letter()))
                .ok_or_else(|| anyhow!("--cases: unknown case `{part}` (known: a–h)"))?;
            out.push(case);
        }
        ensure!(!out.is_empty(), "--cases: no case given (known: a–h)");
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Frames go to recv's MAC in one subnet (no routing): the floor and the virtual wire.
    fn bridged(self) -> bool {
        matches!(self, Case::Floor | Case::Vwire)
    }

    /// Stateful: every flow is established (a reply seen) before the measurement.
    fn stateful(self) -> bool {
        matches!(
            self,
            Case::Conntrack | Case::HasyncKernel | Case::HasyncXdp | Case::Vwire
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The lab.

/// Interface indexes and MAC addresses the cases need.
struct Ports {
    g0: u32,
    g1: u32,
    r0: u32,
    in0: u32,
    out0: u32,
    mac: BTreeMap<&'static str, [u8; 6]>,
}

struct Bench {
    // Stations first: their programs detach before the namespaces go.
    gen_st: Station,
    recv_st: Station,
    member_st: Station,
    gen: Netns,
    member: Netns,
    recv: Netns,
    ports: Ports,
    binary: Option<PathBuf>,
}

impl Bench {
    fn create() -> Result<Bench> {
        let lab = Lab::new("bfwd")?;
        let gen = lab.netns("gen")?;
        let member = lab.netns("member")?;
        let recv = lab.netns("recv")?;
        veth(&gen, "g0", &member, "in0")?;
        veth(&member, "out0", &recv, "r0")?;
        veth(&gen, "g1", &recv, "r1")?;
        configure_member(&member)?;
        let mut mac = BTreeMap::new();
        for (ns, ifname) in [
            (&gen, "g0"),
            (&gen, "g1"),
            (&recv, "r0"),
            (&recv, "r1"),
            (&member, "in0"),
            (&member, "out0"),
        ] {
            mac.insert(ifname, ns.mac(ifname)?);
        }
        let ports = Ports {
            g0: gen.ifindex("g0")?,
            g1: gen.ifindex("g1")?,
            r0: recv.ifindex("r0")?,
            in0: member.ifindex("in0")?,
            out0: member.ifindex("out0")?,
            mac,
        };
        let mut gen_st = Station::load()?;
        let mut recv_st = Station::load()?;
        gen_st.attach(&gen, "count", "g0")?;
        gen_st.attach(&gen, "count", "g1")?;
        recv_st.attach(&recv, "count", "r0")?;
        recv_st.attach(&recv, "count", "r1")?;
        Ok(Bench {
            gen_st,
            recv_st,
            member_st: Station::load_with_table(CAPACITY)?,
            gen,
            member,
            recv,
            ports,
            binary: None,
        })
    }

    fn mac(&self, ifname: &str) -> [u8; 6] {
        self.ports.mac.get(ifname).copied().unwrap_or_default()
    }
}

/// The member's forwarding setup ([`member::configure`]) and a sync interface for the agent
/// (one member has no peer).
fn configure_member(m: &Netns) -> Result<()> {
    member::configure(m)?;
    // A veth pair inside the member (this kernel may lack the dummy driver).
    veth(m, "ha4", m, "ha4-peer")?;
    m.addr("ha4", "198.18.100.1/24")
}

// ---------------------------------------------------------------------------------------------
// The device under test, per case.

/// The agents' lab directory: this prefix and the bench's pid.
const AGENT_DIR: &str = "hasync-bench-fwd-";

/// The lab config text with what `case` adds: `[local] forwarding = "xdp"` for (f), a
/// `[[vwire]]` of in0 and out0 for (g).
fn case_config(case: Case, text: &str) -> String {
    match case {
        Case::HasyncXdp => text.replacen("[local]\n", "[local]\nforwarding = \"xdp\"\n", 1),
        Case::Vwire => {
            format!("{text}\n[[vwire]]\nname = \"vw0\"\ninterfaces = [\"in0\", \"out0\"]\n")
        }
        _ => text.to_owned(),
    }
}

/// The stateful ruleset of (d): replies and established flows pass, new flows only from the
/// generator's side, everything else is dropped.
const CONNTRACK_RULES: &str = "table inet bench {
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname \"in0\" ct state new accept
    }
}
";

/// What is set up on the member for one case; undone when dropped or by [`Dut::teardown`].
enum Dut {
    Nothing,
    Programs,
    Nft,
    Agent(Agents),
}

impl Bench {
    fn setup(&mut self, case: Case) -> Result<Dut> {
        match case {
            Case::Floor => Ok(Dut::Nothing),
            Case::Redirect => {
                self.setup_redirect("redirect")?;
                Ok(Dut::Programs)
            }
            Case::Lookup => {
                self.setup_redirect("redirect_lookup")?;
                Ok(Dut::Programs)
            }
            Case::Kernel => {
                self.attach_pass()?;
                Ok(Dut::Programs)
            }
            Case::Conntrack => {
                self.attach_pass()?;
                self.member.nft(CONNTRACK_RULES)?;
                Ok(Dut::Nft)
            }
            Case::HasyncKernel | Case::HasyncXdp | Case::Vwire => {
                Ok(Dut::Agent(self.start_agent(case)?))
            }
        }
    }

    fn teardown(&mut self, dut: Dut) -> Result<()> {
        match dut {
            Dut::Nothing => Ok(()),
            // Stopped, its datapath torn down.
            Dut::Agent(agent) => {
                drop(agent);
                Ok(())
            }
            Dut::Programs => self.member_st.detach_all(),
            Dut::Nft => {
                self.member.nft("delete table inet bench\n")?;
                self.member_st.detach_all()
            }
        }
    }

    /// XDP_PASS on both member interfaces: the veths then take XDP frames (from the generator
    /// and from redirects), and the kernel forwards.
    fn attach_pass(&mut self) -> Result<()> {
        let Bench {
            member_st, member, ..
        } = self;
        member_st.attach(member, "pass", "in0")?;
        member_st.attach(member, "pass", "out0")
    }

    /// The hasync agent (release binary) in the member for `case`, active.
    fn start_agent(&self, case: Case) -> Result<Agents> {
        let binary = self.binary.as_deref().ok_or_else(|| {
            anyhow!(
                "case ({}) needs the release agent: set HASYNC_BIN",
                case.letter()
            )
        })?;
        let options = ClusterOptions {
            session_capacity: CAPACITY,
            embryonic_capacity: Some(EMBRYONIC),
            backup_link: false,
            timeouts: bench_timeouts(),
            ..ClusterOptions::default()
        };
        let mut agents =
            Agents::configure(AGENT_DIR, 1, &options, |_, text| case_config(case, text))?;
        agents.start(1, &self.member, binary)?;
        Ok(agents)
    }

    /// `prog` (`redirect` or `redirect_lookup`) on in0, sending to out0.
    fn setup_redirect(&mut self, prog: &'static str) -> Result<()> {
        let (in0, out0) = (self.ports.in0, self.ports.out0);
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&self.mac("r0"));
        macs[6..].copy_from_slice(&self.mac("out0"));
        let Bench {
            member_st, member, ..
        } = self;
        let mut devs: aya::maps::DevMapHash<_> =
            aya::maps::DevMapHash::try_from(member_st.map("REDIRECT_PORTS")?)?;
        // The kernel resolves a DEVMAP's ifindex in the caller's namespace: insert from the
        // member's, never this process's.
        member
            .run(|| devs.insert(in0, out0, None, 0))?
            .context("REDIRECT_PORTS: in0 → out0")?;
        let mut m: HashMap<_, u32, [u8; 12]> = HashMap::try_from(member_st.map("REDIRECT_MACS")?)?;
        m.insert(in0, macs, 0)?;
        member_st.attach(member, prog, "in0")
    }
}

// ---------------------------------------------------------------------------------------------
// Measuring.

/// One figure: frames per second received, and CPU time per frame received.
#[derive(Clone, Copy, Default)]
struct Figure {
    mpps: f64,
    cpu_ns: Option<f64>,
}

/// One round's figures: (family, flows) → case → figure.
type Results = BTreeMap<(Family, u32), BTreeMap<Case, Figure>>;

/// System, irq and softirq time of all CPUs so far, in ns (/proc/stat counts in USER_HZ, 100).
fn kernel_cpu_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let ticks = fields.get(2)? + fields.get(5)? + fields.get(6)?;
    Some(ticks * 10_000_000)
}

/// Where the generator sends for `case`: its ingress interface and the frame's MACs.
fn original_path(b: &Bench, case: Case) -> (u32, [[u8; 6]; 2]) {
    match case {
        Case::Floor => (b.ports.g1, [b.mac("r1"), b.mac("g1")]),
        Case::Vwire => (b.ports.g0, [b.mac("r0"), b.mac("g0")]),
        _ => (b.ports.g0, [b.mac("in0"), b.mac("g0")]),
    }
}

/// One pass of every flow in the original direction, then one of replies from recv, so the
/// member has seen both directions of each ([`establish`]).
fn establish_flows(b: &mut Bench, case: Case, family: Family, flows: u32) -> Result<()> {
    let (ingress, macs) = original_path(b, case);
    let reply_macs = if case.bridged() {
        [b.mac("g0"), b.mac("r0")]
    } else {
        [b.mac("out0"), b.mac("r0")]
    };
    let orig = stream(family, case.bridged(), Direction::Original, macs, flows);
    let reply = stream(family, case.bridged(), Direction::Reply, reply_macs, flows);
    let Bench {
        gen_st,
        recv_st,
        gen,
        recv,
        ports,
        ..
    } = b;
    let gen = End {
        station: gen_st,
        ns: gen,
        ifindex: ingress,
    };
    let recv = End {
        station: recv_st,
        ns: recv,
        ifindex: ports.r0,
    };
    establish(gen, recv, (&orig, &reply), flows, family.label()).map(drop)
}

/// One pass of every flow through `redirect_lookup` while it learns, so the measured runs find
/// each in its table.
fn learn_flows(b: &mut Bench, family: Family, flows: u32) -> Result<()> {
    let (ifindex, macs) = original_path(b, Case::Lookup);
    let orig = stream(family, false, Direction::Original, macs, flows);
    let mut gen = End {
        station: &mut b.gen_st,
        ns: &b.gen,
        ifindex,
    };
    b.member_st.set_learn(true)?;
    let through = one_pass(&mut gen, &b.recv_st, &orig, flows);
    b.member_st.set_learn(false)?;
    let through = through?;
    eprintln!(
        "  {} {flows} flows learnt: {through} through",
        family.label()
    );
    Ok(())
}

/// The rate of `case` for `family` and `flows`: the median of [`RUNS`] runs.
fn measure(b: &mut Bench, case: Case, family: Family, flows: u32) -> Result<Figure> {
    let (ingress, macs) = original_path(b, case);
    if case.stateful() {
        establish_flows(b, case, family, flows)?;
    } else if case == Case::Lookup {
        learn_flows(b, family, flows)?;
    } else {
        b.gen_st.set_stream(&stream(
            family,
            case.bridged(),
            Direction::Original,
            macs,
            flows,
        ))?;
    }
    let (mut rates, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let before = b.recv_st.received()?;
        let cpu_before = kernel_cpu_ns();
        let (_, took) = b.gen_st.send(&b.gen, ingress, CHUNK, u64::MAX, RUN_TIME)?;
        let cpu_after = kernel_cpu_ns();
        // Frames still in flight arrive within a few ms.
        std::thread::sleep(Duration::from_millis(20));
        let got = b.recv_st.received()? - before;
        ensure!(
            got > 0,
            "({}) {} {flows} flows: nothing arrived at recv",
            case.letter(),
            family.label()
        );
        rates.push(got as f64 / took.as_secs_f64() / 1e6);
        if let (Some(a), Some(z)) = (cpu_before, cpu_after) {
            cpu.push(z.saturating_sub(a) as f64 / got as f64);
        }
    }
    Ok(Figure {
        mpps: median(rates).unwrap_or(0.0),
        cpu_ns: median(cpu),
    })
}

fn run_case(b: &mut Bench, case: Case, sizes: &[u32], results: &mut Results) -> Result<()> {
    eprintln!("({}) {}", case.letter(), case.what());
    let started = Instant::now();
    let dut = b.setup(case)?;
    eprintln!("  set up in {:.1?}", started.elapsed());
    for family in Family::ALL {
        for &flows in sizes {
            let f = measure(b, case, family, flows)?;
            eprintln!(
                "  {} {}: {:.3} Mpps, {} ns CPU/frame",
                family.label(),
                size_label(flows),
                f.mpps,
                f.cpu_ns.map_or("–".into(), |c| format!("{c:.0}"))
            );
            results.entry((family, flows)).or_default().insert(case, f);
        }
    }
    b.teardown(dut)
}

// ---------------------------------------------------------------------------------------------
// Ratios and output.

/// Every (family, size) some round measured.
fn sizes_measured(rounds: &[Results]) -> BTreeSet<(Family, u32)> {
    rounds.iter().flat_map(|r| r.keys().copied()).collect()
}

/// `case`'s figure at `key`: the median rate and CPU of the rounds that measured it.
fn median_figure(rounds: &[Results], key: (Family, u32), case: Case) -> Option<Figure> {
    let figures: Vec<Figure> = rounds
        .iter()
        .filter_map(|r| r.get(&key)?.get(&case).copied())
        .collect();
    Some(Figure {
        mpps: median(figures.iter().map(|f| f.mpps).collect())?,
        cpu_ns: median(figures.iter().filter_map(|f| f.cpu_ns).collect()),
    })
}

/// The host's conntrack table limit (a root-namespace setting the bench leaves alone).
fn conntrack_max() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Sizes whose flows the host's conntrack table cannot hold: f/d is not meaningful there.
fn over_conntrack(flows: u32) -> bool {
    conntrack_max().is_some_and(|max| flows > max)
}

/// A ratio the table and the JSON report: `num`'s rate over `den`'s.
struct Ratio {
    num: Case,
    den: Case,
    /// Its key in the JSON's `ratios`, `targets` and `ratios_by_round`.
    name: &'static str,
    /// The issue's target for its worst value (`None`: reported, not a target).
    target: Option<f64>,
    /// Sizes left out of it (with the reason printed beside the table).
    skip: fn(u32) -> bool,
}

fn no_size(_flows: u32) -> bool {
    false
}

const RATIOS: [Ratio; 4] = [
    Ratio {
        num: Case::HasyncXdp,
        den: Case::Redirect,
        name: "xdp_vs_redirect",
        target: Some(0.8),
        skip: no_size,
    },
    Ratio {
        num: Case::HasyncXdp,
        den: Case::Conntrack,
        name: "xdp_vs_kernel_conntrack",
        target: Some(3.0),
        skip: over_conntrack,
    },
    Ratio {
        num: Case::Vwire,
        den: Case::Redirect,
        name: "vwire_vs_redirect",
        target: Some(0.85),
        skip: no_size,
    },
    Ratio {
        num: Case::Lookup,
        den: Case::Redirect,
        name: "lookup_vs_redirect",
        target: None,
        skip: no_size,
    },
];

impl Ratio {
    /// Its column in the table: the cases' letters (`f/b`).
    fn label(&self) -> String {
        format!("{}/{}", self.num.letter(), self.den.letter())
    }

    /// `num` over `den` at `key`, in each round that measured both.
    fn by_round(&self, rounds: &[Results], key: (Family, u32)) -> Vec<f64> {
        rounds
            .iter()
            .filter_map(|r| {
                let cases = r.get(&key)?;
                Some(cases.get(&self.num)?.mpps / cases.get(&self.den)?.mpps)
            })
            .collect()
    }

    /// The worst over families and sizes (those not skipped) of the rounds' median.
    fn worst(&self, rounds: &[Results]) -> Option<f64> {
        sizes_measured(rounds)
            .into_iter()
            .filter(|(_, flows)| !(self.skip)(*flows))
            .filter_map(|key| median(self.by_round(rounds, key)))
            .min_by(f64::total_cmp)
    }

    /// The median of the rounds' ratios at `key`, and their range when there were several.
    fn cell(&self, rounds: &[Results], key: (Family, u32)) -> String {
        let all = self.by_round(rounds, key);
        match range(&all) {
            Some((lo, hi)) if all.len() > 1 => {
                let m = median(all).unwrap_or(lo);
                format!("{m:.2} ({lo:.2}–{hi:.2})")
            }
            _ => cell(median(all), 2),
        }
    }

    /// `f/b 0.81 (target ≥ 0.8)`, of the worst value.
    fn summary(&self, rounds: &[Results]) -> String {
        let value = cell(self.worst(rounds), 2);
        match self.target {
            Some(t) => format!("{} {value} (target ≥ {t})", self.label()),
            None => format!(
                "{} {value} (not a target: the ceiling of f/b and g/b with a session per flow \
                 in this table)",
                self.label()
            ),
        }
    }
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn print_table(rounds: &[Results]) {
    println!(
        "forward: Mpps received at recv, median of {RUNS} runs of {} ms, then of {} rounds (the \
         cases' order alternating); each ratio is the median of the rounds' ratios, their range \
         in brackets. Live frames of {FRAME_LEN} bytes. The generator and the device under test \
         share this host's {} CPUs.",
        RUN_TIME.as_millis(),
        rounds.len(),
        aya::util::nr_cpus().unwrap_or(0)
    );
    let columns: Vec<String> = Case::ALL
        .iter()
        .map(|c| format!("({}) {}", c.letter(), c.what()))
        .chain(RATIOS.iter().map(Ratio::label))
        .collect();
    println!("| family | flows | {} |", columns.join(" | "));
    println!("|---|---|{}", "---|".repeat(columns.len()));
    for key in sizes_measured(rounds) {
        let cells: Vec<String> = Case::ALL
            .iter()
            .map(|&c| cell(median_figure(rounds, key, c).map(|f| f.mpps), 3))
            .chain(RATIOS.iter().map(|r| r.cell(rounds, key)))
            .collect();
        let (family, flows) = (key.0.label(), size_label(key.1));
        println!("| {family} | {flows} | {} |", cells.join(" | "));
    }
    print_cpu(rounds);
    let worst: Vec<String> = RATIOS.iter().map(|r| r.summary(rounds)).collect();
    println!("\nworst over families and sizes: {}", worst.join(", "));
    if let Some(max) = conntrack_max() {
        println!(
            "(d) at sizes over this host's nf_conntrack_max ({max}) overflows the conntrack \
             table; f/d leaves those sizes out."
        );
    }
}

/// CPU per frame of every case, by family and size.
fn print_cpu(rounds: &[Results]) {
    println!("\nCPU ns per frame received (system + irq + softirq, generator included):");
    for key in sizes_measured(rounds) {
        let cpu: Vec<String> = Case::ALL
            .iter()
            .map(|&c| {
                let ns = median_figure(rounds, key, c).and_then(|f| f.cpu_ns);
                format!("({}) {}", c.letter(), cell(ns, 0))
            })
            .collect();
        let (family, flows) = (key.0.label(), size_label(key.1));
        println!("  {family} {flows}: {}", cpu.join(", "));
    }
}

fn print_json(rounds: &[Results]) {
    let mut figures = serde_json::Map::new();
    let mut by_round = serde_json::Map::new();
    for key in sizes_measured(rounds) {
        let label = format!("{}_{}", key.0.label().to_lowercase(), size_label(key.1));
        let mut row = serde_json::Map::new();
        for case in Case::ALL {
            if let Some(f) = median_figure(rounds, key, case) {
                row.insert(
                    case.letter().to_string(),
                    serde_json::json!({ "mpps": f.mpps, "cpu_ns_per_frame": f.cpu_ns }),
                );
            }
        }
        figures.insert(label.clone(), row.into());
        let per_round: serde_json::Map<_, _> = RATIOS
            .iter()
            .map(|r| (r.name.to_owned(), r.by_round(rounds, key).into()))
            .collect();
        by_round.insert(label, per_round.into());
    }
    let worst: serde_json::Map<_, _> = RATIOS
        .iter()
        .map(|r| (r.name.to_owned(), r.worst(rounds).into()))
        .collect();
    let targets: serde_json::Map<_, _> = RATIOS
        .iter()
        .filter_map(|r| Some((r.name.to_owned(), r.target?.into())))
        .collect();
    let out = serde_json::json!({
        "bench": "forward",
        "unit": "Mpps",
        "note": "the generator and the device under test share this host's CPUs",
        "cpus": aya::util::nr_cpus().ok(),
        "runs": RUNS,
        "rounds": rounds.len(),
        "frame_bytes": FRAME_LEN,
        "nf_conntrack_max": conntrack_max(),
        "figures": figures,
        "ratios": worst,
        "ratios_by_round": by_round,
        "targets": targets,
    });
    println!("{out}");
}

/// `--flows 1000,1000000`: the sizes to measure.
fn parse_flows(text: &str) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let n: u32 = part
            .parse()
            .with_context(|| format!("--flows: `{part}` is not a number"))?;
        ensure!(
            (1..=MAX_FLOWS).contains(&n),
            "--flows: {n} is out of range 1–{MAX_FLOWS}"
        );
        out.push(n);
    }
    ensure!(!out.is_empty(), "--flows: no number given");
    Ok(out)
}

/// `--rounds 5`: how many rounds of the cases.
fn parse_rounds(text: &str) -> Result<usize> {
    let n: usize = text
        .trim()
        .parse()
        .with_context(|| format!("--rounds: `{text}` is not a number"))?;
    ensure!(
        (1..=MAX_ROUNDS).contains(&n),
        "--rounds: {n} is out of range 1–{MAX_ROUNDS}"
    );
    Ok(n)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let cases = match args.iter().position(|a| a == "--cases") {
        Some(i) => Case::parse_list(args.get(i + 1).map_or("", String::as_str))?,
        None => Case::ALL.to_vec(),
    };
    let sizes = match args.iter().position(|a| a == "--flows") {
        Some(i) => parse_flows(args.get(i + 1).map_or("", String::as_str))?,
        None => SIZES.to_vec(),
    };
    let rounds = match args.iter().position(|a| a == "--rounds") {
        Some(i) => parse_rounds(args.get(i + 1).map_or("", String::as_str))?,
        None => ROUNDS,
    };
    catch_signals()?;
    let mut bench = Bench::create()?;
    bench.binary = agent_binary();
    member::add_neighbours(
        &bench.member,
        bench.mac("g0"),
        bench.mac("r0"),
        sizes.iter().copied().max().unwrap_or(0),
    )?;
    let started = Instant::now();
    let mut all = Vec::with_capacity(rounds);
    let outcome = run_rounds(&mut bench, &cases, &sizes, rounds, &mut all);
    eprintln!("forward bench took {:.0?}", started.elapsed());
    if let Err(e) = &outcome {
        // What was measured before the failure is still worth a table (never a JSON that
        // would pass for a whole run).
        if all.iter().any(|r| !r.is_empty()) {
            eprintln!(
                "stopped in round {} of {rounds}: {e:#}; measured so far:",
                all.len()
            );
            print_table(&all);
        }
    } else if json {
        print_json(&all);
    } else {
        print_table(&all);
    }
    outcome
}

/// Runs `cases` over `sizes` `rounds` times, every other round in reverse order, into `all`
/// (a round that fails is kept as far as it got).
fn run_rounds(
    bench: &mut Bench,
    cases: &[Case],
    sizes: &[u32],
    rounds: usize,
    all: &mut Vec<Results>,
) -> Result<()> {
    for round in 0..rounds {
        eprintln!("round {} of {rounds}", round + 1);
        all.push(Results::new());
        let mut order = cases.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        for case in order {
            check_stop()?;
            let results = all.last_mut().context("the round's results")?;
            run_case(bench, case, sizes, results)?;
        }
    }
    Ok(())
}
