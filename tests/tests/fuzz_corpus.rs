//! Replays the fuzz corpora kept in `fuzz/corpus/<target>/`, and the seeds they grew from,
//! through the same checks the fuzz targets run (`hasync_tests::fuzz`), on the stable
//! toolchain and without libFuzzer. `xdp_parser` loads the XDP program: root, as every test
//! here under `cargo xtask test`.
//!
//! `cargo test -p hasync-tests --test fuzz_corpus -- --ignored write_seeds` writes the seeds
//! into the corpora (then minimise them: `cargo xtask fuzz --cmin`).

use std::{
    fs,
    panic::{catch_unwind, AssertUnwindSafe},
    path::PathBuf,
};

use anyhow::Result;
use hasync_tests::fuzz::{
    corpus_dir,
    seeds::{seeds, Seed},
    xdp::{self, XdpFuzz},
    HOST_TARGETS,
};

/// The corpus files of `target` (sorted, for a stable report) and its seeds.
fn inputs(target: &str) -> Vec<Seed> {
    let mut files: Vec<PathBuf> = fs::read_dir(corpus_dir(target))
        .map(|dir| dir.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    files.sort();
    let mut out: Vec<Seed> = files
        .into_iter()
        .map(|path| {
            let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path.display().to_string(), bytes)
        })
        .collect();
    out.extend(
        seeds(target)
            .into_iter()
            .map(|(name, b)| (format!("seed {name}"), b)),
    );
    out
}

/// Runs `check` on every input of `target`; returns one line per failure (error or panic).
fn replay(target: &str, mut check: impl FnMut(&[u8]) -> Result<()>) -> (usize, Vec<String>) {
    let inputs = inputs(target);
    let failures = inputs
        .iter()
        .filter_map(
            |(name, bytes)| match catch_unwind(AssertUnwindSafe(|| check(bytes))) {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{target}: {name}: {e:#}")),
                Err(_) => Some(format!("{target}: {name}: panicked (above)")),
            },
        )
        .collect();
    (inputs.len(), failures)
}

#[test]
fn host_corpora_replay_clean() {
    let mut failures = Vec::new();
    for &(target, check) in HOST_TARGETS {
        let (n, failed) = replay(target, check);
        assert!(n > 0, "{target}: no corpus and no seeds");
        eprintln!("{target}: {n} inputs, {} failed", failed.len());
        failures.extend(failed);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn xdp_corpus_replays_clean() {
    let mut fuzz = XdpFuzz::load().expect("loading the XDP program (needs root)");
    let (n, failures) = replay(xdp::NAME, |data| fuzz.check(data));
    eprintln!("{}: {n} inputs, {} failed", xdp::NAME, failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Not a test: writes every target's seeds into its corpus directory.
#[test]
#[ignore = "writes into fuzz/corpus/"]
fn write_seeds() {
    let targets = HOST_TARGETS.iter().map(|(t, _)| *t).chain([xdp::NAME]);
    for target in targets {
        let dir = corpus_dir(target);
        fs::create_dir_all(&dir).expect("creating the corpus directory");
        for (name, bytes) in seeds(target) {
            fs::write(dir.join(format!("seed-{name}")), bytes).expect("writing a seed");
        }
    }
}
