//! Exposes the directory where hasync-agent's build script put the eBPF objects, so the
//! fastpath bench can load the bench-only object (`fastpath-bench`).
fn main() {
    match std::env::var("DEP_HASYNC_EBPF_OUT_DIR") {
        Ok(dir) => println!("cargo:rustc-env=HASYNC_EBPF_OUT_DIR={dir}"),
        Err(_) => println!("cargo:warning=DEP_HASYNC_EBPF_OUT_DIR not set: hasync-agent's build script did not run"),
    }
    println!("cargo:rerun-if-env-changed=DEP_HASYNC_EBPF_OUT_DIR");
}
