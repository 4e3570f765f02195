//! `cargo xtask setup`: checks what building and testing hasync needs, and installs what is
//! missing. Every check is cheap (a file, a mount, at most one `--version`), so a machine that is
//! already set up pays well under a second.

use std::{
    env, fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::cmd;

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
const BPFFS: &str = "/sys/fs/bpf";

/// How much `setup` prints about requirements that are already met.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// One line per requirement (`cargo xtask setup`).
    Full,
    /// One summary line (setup run before `test`, `run`, `bench`).
    Summary,
}

/// What setup may do.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Install,
    /// Only report; fail if something is missing.
    CheckOnly,
}

impl Mode {
    /// `CheckOnly` when `check` (`cargo xtask setup --check`), else `Install`.
    pub const fn check_only_if(check: bool) -> Mode {
        if check {
            Mode::CheckOnly
        } else {
            Mode::Install
        }
    }
}

struct Requirement {
    name: &'static str,
    check: fn() -> Result<Status>,
}

impl Requirement {
    const fn new(name: &'static str, check: fn() -> Result<Status>) -> Self {
        Self { name, check }
    }
}

#[derive(Debug)]
enum Status {
    /// Met; the detail says how we know.
    Present(String),
    Missing {
        why: String,
        fix: Fix,
    },
}

#[derive(Debug)]
enum Fix {
    /// Setup cannot do it; the text tells the user what to do.
    Manual(String),
    Apt(&'static str),
    Rustup {
        toolchain: Option<&'static str>,
        components: Vec<&'static str>,
    },
    BpfLinker,
    CargoFuzz,
    MountBpffs,
    /// promtool alone, out of Debian's prometheus package (installing the package would start
    /// a Prometheus server).
    Promtool,
}

/// In the order they are checked. The ones setup cannot fix come first.
const REQUIREMENTS: &[Requirement] = &[
    Requirement::new("root", root),
    Requirement::new("kernel BTF", kernel_btf),
    Requirement::new("kernel BPF JIT", bpf_jit),
    Requirement::new("llvm-22-dev", llvm),
    Requirement::new("iproute2", iproute2),
    Requirement::new("nftables", nftables),
    Requirement::new("iputils-ping", ping),
    Requirement::new("systemd-analyze, setpriv", service_tools),
    Requirement::new("chromium", chromium),
    Requirement::new("promtool", promtool),
    Requirement::new("host toolchain clippy, rustfmt", host_components),
    Requirement::new("nightly rust-src, clippy", nightly_components),
    Requirement::new("bpf-linker 0.13.0", bpf_linker),
    Requirement::new("bpffs at /sys/fs/bpf", bpffs),
];

/// What `cargo xtask fuzz` needs on top of [`REQUIREMENTS`].
const FUZZ_REQUIREMENTS: &[Requirement] = &[Requirement::new("cargo-fuzz 0.13.2", cargo_fuzz)];

pub fn setup(mode: Mode, report: Report) -> Result<()> {
    check_and_install(&REQUIREMENTS.iter().collect::<Vec<_>>(), mode, report)
}

/// What building and running the agent on a host needs, of [`REQUIREMENTS`] (`cargo xtask run`
/// with a config or arguments): not what the tests and the lab use (Chromium, promtool,
/// nftables, the service tools, the host toolchain's clippy and rustfmt), which a production
/// firewall did not ask for. (The nightly's clippy comes with its rust-src, one requirement.)
const TO_RUN_AN_AGENT: &[&str] = &[
    "root",
    "kernel BTF",
    "kernel BPF JIT",
    "llvm-22-dev",
    "nightly rust-src, clippy",
    "bpf-linker 0.13.0",
    "bpffs at /sys/fs/bpf",
];

/// [`setup`] for building and running the agent alone ([`TO_RUN_AN_AGENT`]).
pub fn setup_to_run_an_agent(mode: Mode, report: Report) -> Result<()> {
    let requirements: Vec<&Requirement> = REQUIREMENTS
        .iter()
        .filter(|r| TO_RUN_AN_AGENT.contains(&r.name))
        .collect();
    check_and_install(&requirements, mode, report)
}

/// [`setup`] and cargo-fuzz, for `cargo xtask fuzz`.
pub fn setup_fuzz(mode: Mode, report: Report) -> Result<()> {
    let requirements: Vec<&Requirement> = REQUIREMENTS.iter().chain(FUZZ_REQUIREMENTS).collect();
    check_and_install(&requirements, mode, report)
}

fn check_and_install(requirements: &[&Requirement], mode: Mode, report: Report) -> Result<()> {
    let start = Instant::now();
    if mode == Mode::Install {
        ensure_root()?;
    }
    let missing = find_missing(requirements, report)?;
    if missing.is_empty() {
        if report == Report::Summary {
            eprintln!(
                "setup: all {} requirements present ({:.2}s)",
                requirements.len(),
                start.elapsed().as_secs_f64()
            );
        }
        return Ok(());
    }
    if mode == Mode::CheckOnly {
        bail!(
            "{} of {} requirements missing; run `cargo xtask setup` as root to install them",
            missing.len(),
            requirements.len()
        );
    }
    refuse_manual_fixes(&missing)?;
    install(&missing)?;
    check_installed(&missing)?;
    eprintln!("setup: done ({:.1}s)", start.elapsed().as_secs_f64());
    Ok(())
}

/// Installing needs root: says so, with what to do, when this is not root.
fn ensure_root() -> Result<()> {
    if let Status::Missing {
        why,
        fix: Fix::Manual(what_to_do),
    } = root()?
    {
        bail!("{why}: {what_to_do}");
    }
    Ok(())
}

/// Checks every requirement, reporting each missing one (and with [`Report::Full`] each
/// present one); returns the missing ones with their fixes.
fn find_missing<'r>(
    requirements: &[&'r Requirement],
    report: Report,
) -> Result<Vec<(&'r Requirement, Fix)>> {
    let mut missing = Vec::new();
    for &requirement in requirements {
        match (requirement.check)().with_context(|| format!("checking {}", requirement.name))? {
            Status::Present(detail) => {
                if report == Report::Full {
                    eprintln!("ok: {} present ({detail})", requirement.name);
                }
            }
            Status::Missing { why, fix } => {
                eprintln!("missing: {}: {why}", requirement.name);
                missing.push((requirement, fix));
            }
        }
    }
    Ok(missing)
}

/// Fails, naming each, when some missing requirements need a hand.
fn refuse_manual_fixes(missing: &[(&Requirement, Fix)]) -> Result<()> {
    let manual: Vec<String> = missing
        .iter()
        .filter_map(|(requirement, fix)| match fix {
            Fix::Manual(what_to_do) => Some(format!("{}: {what_to_do}", requirement.name)),
            _ => None,
        })
        .collect();
    if !manual.is_empty() {
        bail!("setup cannot fix these itself:\n  {}", manual.join("\n  "));
    }
    Ok(())
}

/// Checks again, so that an install which "worked" but left the thing unusable (say, a binary
/// off PATH) is caught here rather than in the middle of a build.
fn check_installed(missing: &[(&Requirement, Fix)]) -> Result<()> {
    for (requirement, _) in missing {
        match (requirement.check)()? {
            Status::Present(detail) => eprintln!("installed {} ({detail})", requirement.name),
            Status::Missing { why, .. } => {
                bail!(
                    "{} is still missing after installing it: {why}",
                    requirement.name
                )
            }
        }
    }
    Ok(())
}

/// Applies the fixes: apt packages first, in one `apt-get install` (bpf-linker needs LLVM).
fn install(missing: &[(&Requirement, Fix)]) -> Result<()> {
    let apt: Vec<&str> = missing
        .iter()
        .filter_map(|(_, fix)| match fix {
            Fix::Apt(package) => Some(*package),
            _ => None,
        })
        .collect();
    if !apt.is_empty() {
        cmd::run(Command::new("apt-get").arg("update"))?;
        cmd::run(
            Command::new("apt-get")
                .args(["install", "-y"])
                .args(&apt)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    for (_, fix) in missing {
        match fix {
            Fix::Manual(_) | Fix::Apt(_) => {}
            Fix::Rustup {
                toolchain,
                components,
            } => {
                let mut rustup = Command::new("rustup");
                rustup.args(["component", "add"]).args(components);
                if let Some(toolchain) = toolchain {
                    rustup.args(["--toolchain", toolchain]);
                }
                cmd::run(&mut rustup)?;
            }
            Fix::BpfLinker => cmd::run(
                cmd::cargo(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                    .args(["--locked", "--no-default-features", "--features", "llvm-22"])
                    // /usr/bin/llvm-config is LLVM 14; bpf-linker must link LLVM 22.
                    .env("LLVM_PREFIX", LLVM_PREFIX),
            )?,
            Fix::CargoFuzz => cmd::run(&mut cmd::cargo([
                "install",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
                "--locked",
            ]))?,
            Fix::MountBpffs => cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?,
            Fix::Promtool => install_promtool()?,
        }
    }
    Ok(())
}

fn root() -> Result<Status> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    Ok(if euid == 0 {
        Status::Present("euid 0".into())
    } else {
        Status::Missing {
            why: format!("running as euid {euid}"),
            fix: Fix::Manual(
                "setup installs packages and mounts bpffs, and the tests create network \
                 namespaces: run as root, e.g. `sudo -E env \"PATH=$PATH\" cargo xtask setup`"
                    .into(),
            ),
        }
    })
}

fn kernel_btf() -> Result<Status> {
    Ok(file_exists(
        "/sys/kernel/btf/vmlinux",
        "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y (aya needs its BTF)",
    ))
}

fn bpf_jit() -> Result<Status> {
    Ok(file_exists(
        "/proc/sys/net/core/bpf_jit_enable",
        "the kernel lacks BPF (CONFIG_BPF_SYSCALL, CONFIG_BPF_JIT); boot one that has BPF and XDP",
    ))
}

fn file_exists(path: &'static str, what_to_do: &str) -> Status {
    if Path::new(path).exists() {
        Status::Present(path.into())
    } else {
        Status::Missing {
            why: format!("{path} does not exist"),
            fix: Fix::Manual(what_to_do.into()),
        }
    }
}

/// What bpf-linker's build needs of LLVM 22: `llvm-config` (package llvm-22), and the shared
/// library's link name and the C headers (llvm-22-dev only: `-lLLVM` fails without them).
fn llvm() -> Result<Status> {
    Ok(llvm_at(Path::new(LLVM_PREFIX)))
}

fn llvm_at(prefix: &Path) -> Status {
    let needed = ["bin/llvm-config", "lib/libLLVM.so", "include/llvm-c/Core.h"];
    let missing: Vec<String> = needed
        .iter()
        .map(|p| prefix.join(p))
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        Status::Present(format!(
            "{} (llvm-config, libLLVM.so, llvm-c headers)",
            prefix.display()
        ))
    } else {
        Status::Missing {
            why: format!("missing {}", missing.join(", ")),
            fix: Fix::Apt("llvm-22-dev"),
        }
    }
}

fn iproute2() -> Result<Status> {
    Ok(program_on_path("ip", "iproute2"))
}

fn nftables() -> Result<Status> {
    Ok(program_on_path("nft", "nftables"))
}

/// The labs and tests ping through the members.
fn ping() -> Result<Status> {
    Ok(program_on_path("ping", "iputils-ping"))
}

/// The dashboard test renders the page in Debian's headless Chromium.
fn chromium() -> Result<Status> {
    Ok(program_on_path("chromium", "chromium"))
}

/// The monitoring test checks the shipped alert rules with `promtool check rules`.
fn promtool() -> Result<Status> {
    Ok(match find_on_path("promtool") {
        Some(path) => Status::Present(path.display().to_string()),
        None => Status::Missing {
            why: "no `promtool` on PATH".into(),
            fix: Fix::Promtool,
        },
    })
}

/// Downloads Debian's prometheus package and takes promtool out of it, into /usr/local/bin.
/// The package is unpacked in the build's own target directory, never under /tmp, where a
/// directory another user made ahead at a guessed name would hand them what root installs.
fn install_promtool() -> Result<()> {
    let dir = cmd::target_dir().join("hasync-setup-promtool");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = (|| {
        cmd::run(
            Command::new("apt-get")
                .args(["download", "prometheus"])
                .current_dir(&dir),
        )?;
        let deb = fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download left no .deb")?;
        let root = dir.join("root");
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        let target = Path::new("/usr/local/bin/promtool");
        fs::copy(root.join("usr/bin/promtool"), target)
            .with_context(|| format!("installing {}", target.display()))?;
        fs::set_permissions(target, fs::Permissions::from_mode(0o755))?;
        anyhow::Ok(())
    })();
    let _ = fs::remove_dir_all(&dir);
    result
}

/// The service tests verify the unit with `systemd-analyze verify` and run the agent with the
/// unit's capabilities only through `setpriv` (util-linux).
fn service_tools() -> Result<Status> {
    if let Status::Missing { why, fix } = program_on_path("setpriv", "util-linux") {
        return Ok(Status::Missing { why, fix });
    }
    Ok(program_on_path("systemd-analyze", "systemd"))
}

fn program_on_path(program: &str, package: &'static str) -> Status {
    if let Some(path) = find_on_path(program) {
        return Status::Present(path.display().to_string());
    }
    let why = format!("no `{program}` on PATH");
    // Installed but invisible (a PATH without sbin): reinstalling would not help.
    match ["/usr/sbin", "/sbin"]
        .into_iter()
        .find(|dir| is_executable(&Path::new(dir).join(program)))
    {
        Some(dir) => Status::Missing {
            why,
            fix: Fix::Manual(format!(
                "`{program}` is in {dir}: add {dir} to PATH (tests run it by name)"
            )),
        },
        None => Status::Missing {
            why,
            fix: Fix::Apt(package),
        },
    }
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// clippy and rustfmt of the toolchain running xtask (`cargo fmt`, `cargo clippy` in `test`).
fn host_components() -> Result<Status> {
    // Cargo sets $CARGO to <sysroot>/bin/cargo for `cargo run`: no need to spawn rustc.
    let from_cargo = env::var_os("CARGO")
        .map(PathBuf::from)
        .and_then(|cargo| Some(cargo.parent()?.parent()?.to_owned()));
    let sysroot = match from_cargo {
        Some(sysroot) => sysroot,
        None => match toolchain_sysroot(
            Command::new("rustc").args(["--print", "sysroot"]),
            "install Rust with rustup (https://rustup.rs)",
        ) {
            Ok(sysroot) => sysroot,
            Err(missing) => return Ok(missing),
        },
    };
    Ok(components(
        &sysroot,
        None,
        &[("clippy", "bin/cargo-clippy"), ("rustfmt", "bin/rustfmt")],
    ))
}

/// rust-src (for `-Z build-std=core`) and clippy (`clippy-ebpf`) of the nightly toolchain.
fn nightly_components() -> Result<Status> {
    let sysroot = match toolchain_sysroot(
        Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]),
        "install the nightly toolchain: `rustup toolchain install nightly --component rust-src,clippy`",
    ) {
        Ok(sysroot) => sysroot,
        Err(missing) => return Ok(missing),
    };
    Ok(components(
        &sysroot,
        Some("nightly"),
        &[
            ("rust-src", "lib/rustlib/src/rust/library/core"),
            ("clippy", "bin/cargo-clippy"),
        ],
    ))
}

/// Asks `rustc` for its sysroot; a toolchain that does not answer is missing, for the user to
/// install (setup never installs or updates toolchains).
fn toolchain_sysroot(rustc: &mut Command, what_to_do: &str) -> Result<PathBuf, Status> {
    cmd::capture(rustc)
        .map(PathBuf::from)
        .map_err(|err| Status::Missing {
            why: format!("{err:#}"),
            fix: Fix::Manual(what_to_do.into()),
        })
}

/// Checks rustup components by a file each installs under `sysroot`.
fn components(
    sysroot: &Path,
    toolchain: Option<&'static str>,
    expected: &[(&'static str, &str)],
) -> Status {
    let missing: Vec<&'static str> = expected
        .iter()
        .filter(|(_, file)| !sysroot.join(file).exists())
        .map(|(component, _)| *component)
        .collect();
    if missing.is_empty() {
        Status::Present(sysroot.display().to_string())
    } else {
        Status::Missing {
            why: format!("{} not in {}", missing.join(", "), sysroot.display()),
            fix: Fix::Rustup {
                toolchain,
                components: missing,
            },
        }
    }
}

fn bpf_linker() -> Result<Status> {
    let why = match cmd::capture(Command::new("bpf-linker").arg("--version")) {
        // "bpf-linker 0.13.0"
        Ok(version) if version.split_whitespace().nth(1) == Some(BPF_LINKER_VERSION) => {
            let path = find_on_path("bpf-linker").unwrap_or_default();
            return Ok(Status::Present(path.display().to_string()));
        }
        Ok(version) => format!("found `{version}`"),
        Err(err) => format!("{err:#} (is ~/.cargo/bin on PATH?)"),
    };
    Ok(Status::Missing {
        why,
        fix: Fix::BpfLinker,
    })
}

/// `cargo fuzz` (it builds with the nightly toolchain, checked above).
fn cargo_fuzz() -> Result<Status> {
    let why = match cmd::capture(&mut cmd::cargo(["fuzz", "--version"])) {
        // "cargo-fuzz 0.13.2"
        Ok(version) if version.split_whitespace().nth(1) == Some(CARGO_FUZZ_VERSION) => {
            let path = find_on_path("cargo-fuzz").unwrap_or_default();
            return Ok(Status::Present(path.display().to_string()));
        }
        Ok(version) => format!("found `{version}`"),
        Err(err) => format!("{err:#} (is ~/.cargo/bin on PATH?)"),
    };
    Ok(Status::Missing {
        why,
        fix: Fix::CargoFuzz,
    })
}

fn bpffs() -> Result<Status> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    // "bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0"
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
    });
    Ok(if mounted {
        Status::Present("/proc/mounts".into())
    } else {
        Status::Missing {
            why: format!("no bpf filesystem mounted at {BPFFS}"),
            fix: Fix::MountBpffs,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every requirement named for running an agent is one of the requirements (a renamed
    /// one would silently drop out of `cargo xtask run --config`'s set-up).
    #[test]
    fn running_an_agent_names_only_known_requirements() {
        for name in TO_RUN_AN_AGENT {
            assert!(REQUIREMENTS.iter().any(|r| r.name == *name), "{name}");
        }
    }

    /// The runtime package alone (llvm-config, no link name, no headers) is not enough: setup
    /// installs llvm-22-dev. With all three files, LLVM counts as present.
    #[test]
    fn llvm_config_alone_does_not_count_as_llvm_dev() {
        let dir = std::env::temp_dir().join(format!("hasync-llvm-check-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // Made here, never taken as found (another user may have made one at the guessed name).
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(&dir)
            .expect("a new directory");
        let touch = |p: &str| {
            let p = dir.join(p);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, b"").expect("touch");
        };
        touch("bin/llvm-config");
        match llvm_at(&dir) {
            Status::Missing { why, fix } => {
                assert!(
                    why.contains("libLLVM.so") && why.contains("Core.h"),
                    "{why}"
                );
                assert!(matches!(fix, Fix::Apt("llvm-22-dev")));
            }
            other => panic!("llvm-config alone counted: {other:?}"),
        }
        touch("lib/libLLVM.so");
        touch("include/llvm-c/Core.h");
        let present = matches!(llvm_at(&dir), Status::Present(_));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(present, "all three files present");
    }
}
