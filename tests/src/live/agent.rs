//! hasync agents for a bench: configs written with the lab's writer into `/tmp/<prefix><pid>`,
//! each member's agent (the release binary) run inside its namespace; dropping [`Agents`] stops
//! them, removes their pinned datapaths and the directory.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use hasync_agent::{
    control::{self, view::MembersView, Request},
    datapath::pin,
    lab::{
        cluster::{config_path, log_path, pin_dir, socket_path},
        command_in,
        netns::{Processes, Signal},
        write_configs, ClusterOptions,
    },
};

use crate::{interrupt::check_stop, netns::Netns};

/// How long an agent may take to become active.
const AGENT_READY: Duration = Duration::from_secs(30);

/// Idle timeouts that outlive a bench: its UDP flows, answered or not, are never expired
/// while it measures.
pub fn bench_timeouts() -> BTreeMap<String, u64> {
    [("udp-new", 3600), ("udp-replied", 3600)]
        .into_iter()
        .map(|(s, t)| (s.to_owned(), t))
        .collect()
}

/// The agent binary: $HASYNC_BIN, else the release build in the target dir.
pub fn agent_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("HASYNC_BIN").filter(|b| !b.is_empty()) {
        return Some(PathBuf::from(bin));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Some(root.join(target).join("release/hasync")).filter(|p| p.is_file())
}

/// The agents of one bench setup, member 1 to `members`.
pub struct Agents {
    procs: Processes,
    /// Member → PID of its agent.
    pids: BTreeMap<u8, u32>,
    dir: PathBuf,
    members: u8,
}

impl Agents {
    /// Writes the configs of `members` members into `/tmp/<prefix><pid>` with the lab's config
    /// writer; `edit` then changes member K's text. Removes first the pins that earlier runs
    /// with this prefix, killed before they could clean up, left behind.
    pub fn configure(
        prefix: &str,
        members: u8,
        options: &ClusterOptions,
        edit: impl Fn(u8, &str) -> String,
    ) -> Result<Agents> {
        remove_stale_pins(prefix);
        let dir = std::env::temp_dir().join(format!("{prefix}{}", std::process::id()));
        hasync_agent::files::fresh_dir(&dir, 0o700)
            .with_context(|| format!("creating {}", dir.display()))?;
        let agents = Agents {
            procs: Processes::default(),
            pids: BTreeMap::new(),
            dir,
            members,
        };
        write_configs(&agents.dir, members, options).context("writing the agents' configs")?;
        for k in 1..=members {
            let path = config_path(&agents.dir, k);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            std::fs::write(&path, edit(k, &text))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(agents)
    }

    /// Starts member `k`'s agent (`binary`) in `ns` and waits until it says it is active.
    pub fn start(&mut self, k: u8, ns: &Netns, binary: &Path) -> Result<()> {
        ensure!((1..=self.members).contains(&k), "no member {k}");
        let log = std::fs::File::create(log_path(&self.dir, k))?;
        let mut cmd = command_in(ns.name(), binary)?;
        cmd.arg("agent")
            .arg("--config")
            .arg(config_path(&self.dir, k))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let pid = self.procs.spawn(&format!("hasync agent fw{k}"), cmd)?;
        self.pids.insert(k, pid);
        self.wait_active(k)
    }

    fn pid(&self, k: u8) -> Result<u32> {
        self.pids
            .get(&k)
            .copied()
            .ok_or_else(|| anyhow!("member {k}'s agent was not started"))
    }

    /// Member `k`'s answer to `req` (its `data`), or its error.
    pub fn request(&self, k: u8, req: &Request) -> Result<serde_json::Value> {
        let resp = control::request(&socket_path(&self.dir, k), req)
            .with_context(|| format!("asking member {k}'s agent"))?;
        match resp.error {
            Some(e) if !resp.ok => bail!("member {k}'s agent: {e}"),
            _ => Ok(resp.view()?),
        }
    }

    /// Member `k`'s own state, as it says.
    fn state(&self, k: u8) -> Result<String> {
        let view: MembersView = serde_json::from_value(self.request(k, &Request::ShowMembers {})?)?;
        view.members
            .into_iter()
            .find(|m| m.id == k)
            .map(|m| m.state)
            .ok_or_else(|| anyhow!("member {k} does not list itself"))
    }

    /// Waits until member `k`'s agent says it is active; fails with its log if it exits first.
    fn wait_active(&self, k: u8) -> Result<()> {
        let pid = self.pid(k)?;
        let deadline = Instant::now() + AGENT_READY;
        let mut state = String::from("not listening");
        while Instant::now() < deadline {
            check_stop()?;
            if let Some(status) = self.procs.exit_status(pid)? {
                bail!(
                    "member {k}'s agent exited ({status}); its log:\n{}",
                    self.log(k)
                );
            }
            if let Ok(s) = self.state(k) {
                state = s;
                if state == "active" {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "member {k}'s agent is not active after {} s (state: {state}); its log:\n{}",
            AGENT_READY.as_secs(),
            self.log(k)
        )
    }

    /// Member `k`'s agent log.
    pub fn log(&self, k: u8) -> String {
        std::fs::read_to_string(log_path(&self.dir, k)).unwrap_or_default()
    }

    /// Sends `signal` to member `k`'s agent (by its PID). `Kill` is a crash: its XDP programs
    /// stay attached (pinned) and keep forwarding.
    pub fn signal(&self, k: u8, signal: Signal) -> Result<()> {
        Ok(self.procs.signal(self.pid(k)?, signal)?)
    }

    /// Waits (at most 5 s) until member `k`'s agent has exited.
    pub fn wait_exit(&self, k: u8) -> Result<()> {
        let pid = self.pid(k)?;
        match self.procs.wait(pid, Duration::from_secs(5))? {
            Some(_) => Ok(()),
            None => bail!("member {k}'s agent (pid {pid}) still runs 5 s on"),
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.procs.stop_all(Duration::from_secs(5));
        // Stopped agents leave their datapath pinned: remove it while the interfaces exist.
        for k in 1..=self.members {
            let pins = pin_dir(&self.dir, k);
            if let Err(e) = pin::teardown(&pins) {
                eprintln!("cleanup: tearing down {}: {e}", pins.display());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes the pinned datapaths that earlier runs with `prefix`, killed before they could
/// clean up, left behind (their pid is gone, their namespaces with it).
fn remove_stale_pins(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(pin::BPFFS_MOUNT) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            if let Err(e) = pin::teardown(&entry.path()) {
                eprintln!("removing stale pins {name}: {e}");
            }
        }
    }
}
