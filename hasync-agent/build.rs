//! Builds the XDP program (hasync-ebpf) for the BPF target with the nightly toolchain, so the
//! agent can embed it. The bench-only objects (`fastpath-bench`, `forward-bench`) are built
//! alongside; their directory is passed to dependants' build scripts as
//! `DEP_HASYNC_EBPF_OUT_DIR`.
//!
//! The eBPF build does not depend on how the agent is compiled (it is always a release build
//! for the BPF target), but cargo runs this script once per way the agent is compiled (clippy,
//! tests, the `hasync` executable), each with its own `OUT_DIR`. So the build runs in one
//! directory of the target directory, [`SHARED_DIR`], where the nightly cargo finds its previous
//! work fresh, and the objects are copied from there into `OUT_DIR`.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _};

/// The eBPF build's directory, under cargo's target directory.
const SHARED_DIR: &str = "hasync-ebpf-build";

/// The objects the eBPF crate's binaries become.
const OBJECTS: [&str; 3] = ["hasync", "fastpath-bench", "forward-bench"];

fn main() -> anyhow::Result<()> {
    // hasync-ebpf sits next to this crate: the workspace layout is fixed.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("hasync-agent has no parent directory"))?
        .join("hasync-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);
    let shared = shared_dir(&out_dir);
    fs::create_dir_all(&shared).with_context(|| format!("creating {}", shared.display()))?;
    // Two cargo processes on one target directory could run this script at once: one builds
    // and copies at a time.
    let lock = fs::File::create(shared.join(".lock"))
        .with_context(|| format!("creating {}/.lock", shared.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}/.lock", shared.display()))?;
    // The objects are copied anew by every build: none left from an earlier one (a renamed
    // program, or a build aya-build skipped) is taken for this one's.
    for object in OBJECTS {
        let stale = shared.join(object);
        match fs::remove_file(&stale) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", stale.display()));
            }
            _ => {}
        }
    }
    // aya-build builds in, and copies the objects to, the directory `OUT_DIR` names.
    std::env::set_var("OUT_DIR", &shared);
    let built = aya_build::build_ebpf(
        [aya_build::Package {
            name: "hasync-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    );
    std::env::set_var("OUT_DIR", &out_dir);
    built?;
    for object in OBJECTS.into_iter().filter(|_| shared != out_dir) {
        let (from, to) = (shared.join(object), out_dir.join(object));
        fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    println!("cargo:rerun-if-changed=../hasync-common");
    println!("cargo::metadata=out_dir={}", out_dir.display());
    Ok(())
}

/// `<target dir>/hasync-ebpf-build`: `OUT_DIR` is `<target dir>[/<triple>]/<profile>/build/
/// hasync-agent-<hash>/out`. Falls back to `OUT_DIR` itself (an unshared build) if it is not.
fn shared_dir(out_dir: &Path) -> PathBuf {
    let target = out_dir.ancestors().nth(4).filter(|_| {
        out_dir
            .parent()
            .and_then(|p| p.parent())
            .is_some_and(is_build)
    });
    match target {
        Some(target) => target.join(SHARED_DIR),
        None => out_dir.to_path_buf(),
    }
}

/// Is `dir` a profile's `build` directory?
fn is_build(dir: &Path) -> bool {
    dir.file_name().is_some_and(|n| n == "build")
}
