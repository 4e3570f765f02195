//! The datapath's own log (issue 11 §3, `[local] datapath_log`): the XDP programs note rare
//! events, the log program logs them with aya-log, and the agent forwards the records to
//! tracing at their level. Driven through BPF_PROG_TEST_RUN; what reaches tracing is captured.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use hasync_agent::datapath::DatapathLog;
use hasync_common::{ApplyOp, ApplyRecord, Counter, MemberId, Session};
use hasync_tests::{
    frame::Frame,
    testrun::{
        fixture_config, monotonic_ns, replied_session, stay_on_this_cpu, TestDatapath, Verdict,
        LOCAL,
    },
};

/// What tracing printed while `f` ran, and what `f` returned.
fn traced<T>(f: impl FnOnce() -> T) -> (String, T) {
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("capture").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&capture.0.lock().expect("capture")).into_owned();
    (text, out)
}

fn load(log: DatapathLog) -> TestDatapath {
    let tdp = TestDatapath::load_logging(fixture_config(), log).expect("load");
    // The notes are per CPU: every run on one, so the drain sees each kind's last note.
    stay_on_this_cpu().expect("pin the test to one CPU");
    tdp
}

/// A UDP flow from 198.18.0.21:`port` to 198.18.1.20:53 that `owner` answered.
fn flow(port: u16) -> Frame {
    let src = SocketAddr::new(IpAddr::from([198, 18, 0, 21]), port);
    Frame::udp(src, "198.18.1.20:53".parse().expect("address"))
}

fn replica(port: u16, owner: MemberId, version: u32) -> ApplyRecord {
    let session = Session {
        version,
        ..replied_session(monotonic_ns(), owner)
    };
    ApplyRecord::new(flow(port).key(), session, ApplyOp::Upsert, false)
}

/// Member 2 (not alive here) owns a flow; its next packet makes this member take it over.
fn take_over(tdp: &mut TestDatapath, port: u16) {
    let out = tdp
        .datapath_mut()
        .apply_records(
            &[replica(port, MemberId(2), 7)],
            hasync_common::ApplySource::NONE,
            monotonic_ns(),
        )
        .expect("install");
    assert_eq!(out.installed, 1, "{out:?}");
    assert_eq!(tdp.run(&flow(port).build()).expect("run"), Verdict::Pass);
    let held = tdp.session(&flow(port).key()).expect("read").expect("held");
    assert_eq!(held.owner, LOCAL, "taken over");
}

fn drain(tdp: &mut TestDatapath) -> (String, usize) {
    let (text, drained) = traced(|| tdp.datapath_mut().drain_log());
    (text, drained.expect("drain the datapath's log"))
}

#[test]
fn a_takeover_is_logged_at_info_with_its_flow_and_old_owner_once() {
    let mut tdp = load(DatapathLog::Info);
    take_over(&mut tdp, 3_000);
    let (text, logged) = drain(&mut tdp);
    assert_eq!(logged, 1, "{text}");
    assert!(
        text.contains("INFO hasync::datapath: took over session proto 17 198.18.0.21:3000 <-> 198.18.1.20:53 from member 2, now version 8"),
        "{text}"
    );
    let (again, logged) = drain(&mut tdp);
    assert_eq!((logged, again.as_str()), (0, ""), "logged twice");
}

#[test]
fn a_burst_is_sampled_one_line_per_kind_and_cpu_and_counted_in_full() {
    let mut tdp = load(DatapathLog::Debug);
    let before = tdp.counters().expect("counters");
    for n in 0..3 {
        let frame = flow(4_000 + n).truncate_l4(4).build();
        assert_eq!(tdp.run(&frame).expect("run"), Verdict::Drop);
    }
    let after = tdp.counters().expect("counters");
    let counted = after.get(Counter::ErrUdpTruncated) - before.get(Counter::ErrUdpTruncated);
    assert_eq!(counted, 3);
    let (text, logged) = drain(&mut tdp);
    assert_eq!(logged, 1, "{text}");
    let expected = format!(
        "DEBUG hasync::datapath: malformed frame on ifindex 1, {} bytes: counter {}",
        flow(4_002).truncate_l4(4).build().len(),
        Counter::ErrUdpTruncated as u32
    );
    assert!(text.contains(&expected), "{expected}\n{text}");
}

/// The programs keep noting while the agent drains: a note that changed after the agent read
/// the counters is logged as it is now (before, it waited for a second in which that CPU
/// noted nothing of its kind, so a steady flood was never logged).
#[test]
fn a_note_that_changed_since_the_agent_read_it_is_logged_as_it_is_now() {
    let mut tdp = load(DatapathLog::Debug);
    let short = |port: u16, cut: usize| flow(port).truncate_l4(cut).build();
    assert_eq!(tdp.run(&short(4_100, 4)).expect("run"), Verdict::Drop);
    let read = tdp.datapath_mut().per_cpu_counters().expect("counters");
    assert_eq!(tdp.run(&short(4_101, 2)).expect("run"), Verdict::Drop);
    let (text, drained) = traced(|| tdp.datapath_mut().drain_log_as_read(&read));
    assert_eq!(drained.expect("drain"), 1, "{text}");
    let expected = format!(
        "DEBUG hasync::datapath: malformed frame on ifindex 1, {} bytes",
        short(4_101, 2).len()
    );
    assert!(text.contains(&expected), "{expected}\n{text}");
    let (again, logged) = drain(&mut tdp);
    assert_eq!((logged, again.as_str()), (0, ""), "logged twice");
}

#[test]
fn a_session_of_ours_replaced_by_a_peers_newer_version_is_a_warning() {
    let mut tdp = load(DatapathLog::Warn);
    assert_eq!(tdp.run(&flow(5_000).build()).expect("run"), Verdict::Pass);
    let ours = tdp
        .session(&flow(5_000).key())
        .expect("read")
        .expect("created");
    assert_eq!(ours.owner, LOCAL);
    let newer = replica(5_000, MemberId(3), ours.version + 5);
    // Quiet here for the keepalive threshold, as a flow another member took over is (and a
    // second more: the datapath's clock, jiffies converted, may read a few ticks ahead of the
    // agent's monotonic one, and a claim exactly at the threshold then waited).
    let quiet =
        u64::from(hasync_common::config::DEFAULT_CLAIM_QUIET_MS) * 1_000_000 + 1_000_000_000;
    let out = tdp
        .datapath_mut()
        .apply_records(
            &[newer],
            hasync_common::ApplySource::NONE,
            monotonic_ns() + quiet,
        )
        .expect("install");
    assert_eq!(out.installed, 1, "{out:?}");
    let (text, logged) = drain(&mut tdp);
    assert_eq!(logged, 1, "{text}");
    let expected = format!(
        "WARN hasync::datapath: session proto 17 198.18.0.21:5000 <-> 198.18.1.20:53 owned here was replaced by member 3's version {}",
        ours.version + 5
    );
    assert!(text.contains(&expected), "{expected}\n{text}");
}

/// Below the level, or off, nothing is logged, and the programs work the same.
#[test]
fn below_the_level_or_off_nothing_is_logged() {
    for level in [DatapathLog::Warn, DatapathLog::Off] {
        let mut tdp = load(level);
        take_over(&mut tdp, 6_000);
        let frame = flow(6_001).truncate_l4(4).build();
        assert_eq!(tdp.run(&frame).expect("run"), Verdict::Drop);
        let counters = tdp.counters().expect("counters");
        assert_eq!(counters.get(Counter::Takeovers), 1, "{level:?}");
        let (text, logged) = drain(&mut tdp);
        assert_eq!((logged, text.as_str()), (0, ""), "{level:?}");
    }
}
