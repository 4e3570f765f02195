//! Builds the XDP program (hasync-ebpf) for the BPF target with the nightly toolchain, so the
//! agent can embed it. The bench-only objects (`fastpath-bench`, `forward-bench`) are built
//! alongside; their directory is passed to dependants' build scripts as
//! `DEP_HASYNC_EBPF_OUT_DIR`.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    // hasync-ebpf sits next to this crate: the workspace layout is fixed.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("hasync-agent has no parent directory"))?
        .join("hasync-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "hasync-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;
    println!("cargo:rerun-if-changed=../hasync-common");
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
    println!("cargo::metadata=out_dir={out_dir}");
    Ok(())
}
