//! The short chaos profile: a 3-member cluster with TCP and UDP lanes through every member
//! takes every fault kind once (partitions, loss, SIGSTOP, SIGKILL, a rolling restart,
//! re-steering, a connection flood, a hostile authenticated peer, a session flood) while UDP
//! sessions time out after 20 s, and every invariant holds: replicas converge to their
//! owners' tables within 30 s with nothing lost, no member holds an expired session,
//! the lanes' TCP connections survive every re-steer, agents stay within their memory and
//! descriptor bounds, full syncs stay under their bound, nothing panics.
//! `cargo xtask chaos` runs the long profile.

use hasync_tests::chaos::{run, Profile};

#[test]
fn a_short_chaos_run_holds_every_invariant() {
    let report = run(&Profile::short());
    eprintln!("{}", report.text());
    assert!(
        report.violations.is_empty(),
        "{} violations:\n{}",
        report.violations.len(),
        report.violations.join("\n")
    );
    assert_eq!(report.lost, 0);
    assert!(report.sessions_checked > 0 && !report.applied.is_empty());
}
