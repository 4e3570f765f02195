//! Answers control-socket requests from the running member's state.
//!
//! Most answers are read at once on the runtime's main loop. `show sessions` walks the whole
//! session table (hundreds of milliseconds for a large one, even to count it): it runs on a
//! thread of its own at a lower priority, one walk at a time, with a reader of the table that
//! takes no lock of the agent's, and answers from there. The main loop goes on draining the
//! datapath's events meanwhile (a walk on it once stalled them long enough for a flood of new
//! sessions to fill the ring buffer and lose events), and the agent's busier threads keep
//! their CPU (a walk beside them halved the replication rate of a bench round).

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use tokio::sync::{oneshot, Semaphore};

use crate::{
    control::{
        protocol::{Request, Response, SessionFilter},
        view::{
            CountersView, FlapsView, LocalStateView, MemberView, MembersView, SessionPage,
            SessionsView, StatisticsView,
        },
        Level,
    },
    datapath::{sweep::Tally, Datapath, TableBounds, DEFAULT_CHUNK},
    member::{lock, Member},
    sync::wire::LinkKind,
};

/// Session walks that may run at once; more wait their turn.
static WALKS: Semaphore = Semaphore::const_new(1);
/// Walks asked for and not finished; past [`MAX_WALKS`] a request is refused at once.
static WALKS_ASKED: AtomicUsize = AtomicUsize::new(0);
/// The most walks that may be asked for at a time (running and waiting): a walk of a large
/// table takes a CPU for a fraction of a second, and callers that give up do not cancel it.
const MAX_WALKS: usize = 4;
/// Walks asked for by readers ([`Level::Reader`]) and not finished.
static READER_WALKS_ASKED: AtomicUsize = AtomicUsize::new(0);
/// The most of [`MAX_WALKS`] readers may hold: the rest stays free for operators. A reader
/// that hangs up does not cancel its walk (one running runs to its end; one waiting holds its
/// place until its turn), so without a share of its own one reconnecting in a loop held every
/// walk and the operator's `show sessions` was refused as busy.
const MAX_READER_WALKS: usize = 2;
/// Walks asked for by the agent's own metrics ([`Level::Agent`]) and not finished.
static AGENT_WALKS_ASKED: AtomicUsize = AtomicUsize::new(0);
/// The most of [`MAX_WALKS`] the metrics may hold (they count by a walk only until the
/// sweep's first pass; a scrape that gave up leaves its walk waiting, and the next asks
/// again).
const MAX_AGENT_WALKS: usize = 1;

/// The most sessions a page answering a reader ([`Level::Reader`]) lists. A page is held
/// whole in memory while it is built and written (about 150 bytes a session), and readers'
/// connections are not the operator's to budget: at the general bound
/// ([`super::protocol::MAX_SESSION_PAGE`]) their 4 connections held about 120 MB of answers.
pub const MAX_READER_PAGE: u64 = 10_000;

/// The page size a `show-sessions` request asked at `level` gets: a reader's listing is at
/// most [`MAX_READER_PAGE`] sessions (that many when it names no `limit`; a larger one is
/// refused, naming the bound); counts list nothing, whatever they ask.
fn page_limit(level: Level, count_only: bool, limit: Option<u64>) -> Result<Option<u64>, String> {
    if level != Level::Reader || count_only {
        return Ok(limit);
    }
    match limit {
        None => Ok(Some(MAX_READER_PAGE)),
        Some(n) if n > MAX_READER_PAGE => Err(format!(
            "limit {n} is more than read-only users may ask for ({MAX_READER_PAGE} sessions a \
             page): page with --offset and --limit"
        )),
        Some(n) => Ok(Some(n)),
    }
}

/// Answers `request`, asked at `level`, on `reply`: at once, or from a walk of the session
/// table that runs off the caller's thread (see the module's note). Call it on a Tokio
/// runtime.
pub fn answer(member: &Member, request: Request, level: Level, reply: oneshot::Sender<Response>) {
    let zones = member.config.zone_names();
    let page = match request {
        Request::ShowSessions {
            count_only,
            filter,
            offset,
            limit,
        } => page_limit(level, count_only, limit)
            .and_then(|limit| SessionPage::new(count_only, filter, offset, limit, &zones)),
        Request::ShowSessionCounts {} => {
            return session_counts(&member.swept, member.bounds, &member.dp, level, reply)
        }
        _ => {
            let _ = reply.send(handle(member, request));
            return;
        }
    };
    match page {
        Ok(page) => sessions_later(member.dp.clone(), page, level, reply),
        Err(e) => {
            let _ = reply.send(Response::error(e));
        }
    }
}

/// `show-session-counts`: what the expiry sweep's last complete pass counted (`swept`), at
/// once; before the first pass completes, the counts of a walk, as `show-sessions` has them.
/// The table's `bounds` come from the member, not from `dp`: its lock may be held a while.
fn session_counts(
    swept: &Mutex<Option<(Instant, Tally)>>,
    bounds: TableBounds,
    dp: &Arc<Mutex<Datapath>>,
    level: Level,
    reply: oneshot::Sender<Response>,
) {
    let Some((at, tally)) = *lock(swept) else {
        match SessionPage::new(true, SessionFilter::default(), 0, None, &[]) {
            Ok(page) => sessions_later(dp.clone(), page, level, reply),
            Err(e) => drop(reply.send(Response::error(e))),
        }
        return;
    };
    let TableBounds {
        capacity,
        embryonic_slots,
    } = bounds;
    let view = SessionsView::tallied(&tally, at.elapsed(), capacity, embryonic_slots);
    let _ = reply.send(Response::ok(view));
}

/// Fills `page` from a walk of `dp` on a thread of its own, after the walks before it, and
/// sends the answer on `reply`; a caller gone by its turn costs no walk. Returns at once;
/// refuses when [`MAX_WALKS`] walks are asked for already, or its asker's share
/// ([`MAX_READER_WALKS`], [`MAX_AGENT_WALKS`]) is.
pub fn sessions_later(
    dp: Arc<Mutex<Datapath>>,
    page: SessionPage,
    level: Level,
    reply: oneshot::Sender<Response>,
) {
    let asked = match Asked::new(level) {
        Ok(asked) => asked,
        Err(busy) => {
            let _ = reply.send(Response::error(busy));
            return;
        }
    };
    tokio::spawn(async move {
        let response = match WALKS.acquire().await {
            Ok(_) if reply.is_closed() => None,
            Ok(_turn) => Some(walk_aside(dp, page).await),
            Err(e) => Some(Response::error(format!("no session walk possible: {e}"))),
        };
        drop(asked);
        if let Some(response) = response {
            let _ = reply.send(response);
        }
    });
}

/// A walk asked for, counted in [`WALKS_ASKED`] and in its asker's share until it is dropped.
struct Asked {
    share: Option<&'static AtomicUsize>,
}

/// The share of [`MAX_WALKS`] walks that `level` may hold: its count, its bound and whose it
/// is; operators have none of their own (they get what the others leave).
fn share(level: Level) -> Option<(&'static AtomicUsize, usize, &'static str)> {
    match level {
        Level::Operator => None,
        Level::Reader => Some((&READER_WALKS_ASKED, MAX_READER_WALKS, "read-only users")),
        Level::Agent => Some((&AGENT_WALKS_ASKED, MAX_AGENT_WALKS, "the agent's metrics")),
    }
}

impl Asked {
    /// Counts a walk asked for at `level`; the refusal that says why when a bound is reached.
    fn new(level: Level) -> Result<Asked, String> {
        let share = share(level);
        if let Some((count, max, whose)) = share {
            if !take_one(count, max) {
                return Err(format!(
                    "busy: {max} walks of the session table asked by {whose} are running or \
                     waiting; ask again later"
                ));
            }
        }
        if !take_one(&WALKS_ASKED, MAX_WALKS) {
            if let Some((count, ..)) = share {
                count.fetch_sub(1, Ordering::AcqRel);
            }
            return Err(format!(
                "busy: {MAX_WALKS} walks of the session table are running or waiting; ask again \
                 later"
            ));
        }
        Ok(Asked {
            share: share.map(|(count, ..)| count),
        })
    }
}

impl Drop for Asked {
    fn drop(&mut self) {
        if let Some(count) = self.share {
            count.fetch_sub(1, Ordering::AcqRel);
        }
        WALKS_ASKED.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts one more in `count` unless it holds `max` already; whether it did.
fn take_one(count: &AtomicUsize, max: usize) -> bool {
    if count.fetch_add(1, Ordering::AcqRel) >= max {
        count.fetch_sub(1, Ordering::AcqRel);
        return false;
    }
    true
}

/// The nice value of a walk's thread: it yields the CPUs to the agent's own work (draining
/// events, applying peers' records) and to the fast path's softirqs when they need them, and
/// still finishes on a busy host (a tenth of a CPU against one busy thread).
const WALK_NICE: i32 = 10;

/// Runs [`show_sessions`] on a thread of its own at [`WALK_NICE`], with a reader of the table
/// of its own: the walk takes no lock of the agent's, so a walk slowed down by busier threads
/// holds nothing up.
async fn walk_aside(dp: Arc<Mutex<Datapath>>, page: SessionPage) -> Response {
    let (tx, rx) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("session-walk".into())
        .spawn(move || {
            lower_priority(WALK_NICE);
            let _ = tx.send(show_sessions(&dp, page));
        });
    if let Err(e) = spawned {
        return Response::error(format!("starting the session walk: {e}"));
    }
    rx.await
        .unwrap_or_else(|_| Response::error("the session walk failed (see the agent's log)"))
}

/// Lowers the calling thread's priority to nice `nice` (Linux: per thread), never raises it.
/// Best effort: a walk at the normal priority is still right, only less polite.
fn lower_priority(nice: i32) {
    // SAFETY: gettid, getpriority and setpriority take and return plain integers.
    let rc = unsafe {
        let tid = libc::gettid() as libc::id_t;
        if libc::getpriority(libc::PRIO_PROCESS, tid) >= nice {
            return;
        }
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "the session walk keeps the normal priority"
        );
    }
}

/// The calling thread's nice value.
#[cfg(test)]
fn priority() -> i32 {
    // SAFETY: as in `lower_priority`.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
}

/// Builds the answer to any request but `show sessions`, which [`answer`] walks elsewhere.
fn handle(member: &Member, request: Request) -> Response {
    let now = Instant::now();
    match request {
        Request::ShowMembers {} => show_members(member, now),
        Request::ShowSessions { .. } | Request::ShowSessionCounts {} => Response::error(
            "the session table's counts and pages are answered by `answer`, off the main loop",
        ),
        Request::ShowStatistics {} => Response::ok(statistics(member)),
        Request::ShowCounters { prefix } => match member.counters.counters() {
            Ok(c) => {
                let pool = prefix
                    .is_none()
                    .then(|| member.counters.replica_pool().ok());
                Response::ok(CountersView::new(&c, prefix.as_deref()).with_pool(pool.flatten()))
            }
            Err(e) => Response::error(crate::datapath::error_chain(&e)),
        },
        Request::ShowFlaps {} => {
            Response::ok(FlapsView::from_membership(&lock(&member.membership), now))
        }
        Request::Suspend {} | Request::Functional {} => {
            let suspend = matches!(request, Request::Suspend {});
            let state_dir = &member.config.local.state_dir;
            // The mark first for a suspend, last for its end: a crash between the two errs
            // on the side of staying out of service.
            let marked = if suspend {
                keep_suspend(state_dir, true)
            } else {
                Ok(())
            };
            {
                let mut m = lock(&member.membership);
                if suspend {
                    m.suspend();
                } else {
                    m.functional(now);
                }
            }
            // The main loop's own step: the changes an evaluation reports (once) reach the
            // XDP member map, the claim window and the logs. (Dropped here, a peer's death
            // due at that moment never reached the member map.)
            crate::runtime::apply_membership(member);
            let kept = if suspend {
                marked
            } else {
                keep_suspend(state_dir, false)
            };
            let m = lock(&member.membership);
            let mut view = LocalStateView::new(m.local, m.state);
            view.not_kept = kept.err();
            Response::ok(view)
        }
    }
}

/// Keeps the operator's suspend (`suspend`) or its end across restarts
/// ([`crate::suspend_mark`]). The state changes either way: an error says what a restart would
/// do instead (the answer carries it, and the command fails with it).
fn keep_suspend(state_dir: &std::path::Path, suspend: bool) -> Result<(), String> {
    use crate::suspend_mark;
    let (kept, then) = if suspend {
        (
            suspend_mark::mark(state_dir, suspend_mark::MarkKind::Operator),
            "this member is suspended now, but a restart would bring it back into service",
        )
    } else {
        (
            suspend_mark::clear(state_dir),
            "this member is functional now, but a restart would suspend it again",
        )
    };
    kept.map_err(|e| {
        // A directory the start refuses: the next start fails until it is fixed.
        let then = match e {
            suspend_mark::MarkError::Untrusted { .. } => {
                "the state changed, but the next start is refused until the state directory is fixed"
            }
            suspend_mark::MarkError::Io { .. } => then,
        };
        tracing::warn!(error = %e, "{then}");
        format!("{then}: {e}")
    })
}

/// `show cluster members`: every member as this one sees it, this one included.
fn show_members(member: &Member, now: Instant) -> Response {
    let m = lock(&member.membership);
    let serial = member
        .config
        .members
        .iter()
        .find(|c| c.id == m.local)
        .map_or("", |c| c.serial.as_str());
    let local = MemberView::local(
        &m,
        serial,
        u64::from(m.local_sessions_owned),
        member.engine.local_link_state(LinkKind::Ha4),
        member.engine.local_link_state(LinkKind::Ha4Backup),
        now,
    );
    let engine = &member.engine;
    let version = |id| {
        engine
            .peers()
            .find(|p| p.cfg.id == id)
            .and_then(|p| p.version())
    };
    Response::ok(MembersView::new(
        member.config.cluster.id,
        &m,
        local,
        version,
        now,
    ))
}

/// `show cluster sessions`: `page` filled from a walk of the session table, with a reader of
/// its own (the agent's lock is taken only to open it).
fn show_sessions(dp: &Mutex<Datapath>, mut page: SessionPage) -> Response {
    let opened = {
        let dp = lock(dp);
        dp.session_reader().map(|r| (r, dp.bounds()))
    };
    let walked = opened.and_then(|(reader, bounds)| {
        reader
            .chunked(DEFAULT_CHUNK, |k, v| page.add_chunk(k, v))
            .map(|_| bounds)
    });
    match walked {
        Ok(b) => Response::ok(page.finish(b.capacity, b.embryonic_slots)),
        Err(e) => Response::error(crate::datapath::error_chain(&e)),
    }
}

/// `show cluster statistics`: every peer's sync statistics, with the records still pending.
fn statistics(member: &Member) -> StatisticsView {
    let peers = member.engine.peers().map(|p| {
        (
            p.cfg.id,
            &p.stats,
            p.cfg.addrs.contains_key(&LinkKind::Ha4Backup),
        )
    });
    let mut view = StatisticsView::from_stats(peers, member.engine.rejections());
    for p in member.engine.peers() {
        let (queued, in_flight) = member.engine.backlog_of(p);
        if let Some(v) = view.peers.iter_mut().find(|v| v.id == p.cfg.id.0) {
            v.records_pending = (queued + in_flight) as u64;
        }
    }
    view
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        control::{protocol::SessionFilter, view::SessionsView},
        datapath::testing::{datapath, test_run, udp_frame},
    };

    /// A datapath whose table holds 3 UDP sessions, made by frames through the program.
    fn three_sessions() -> Datapath {
        let dp = datapath();
        for port in 1..=3 {
            test_run(&dp, &udp_frame([198, 18, 0, 1], port, [198, 18, 0, 2], 53));
        }
        dp
    }

    /// Session counts come from the sweep's tally once a pass completed: no walk (the table
    /// holds 3 sessions, the tally says otherwise, and the answer is the tally's), and no wait
    /// for the datapath (held here by another holder: the table's bounds are the member's).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[expect(
        clippy::await_holding_lock,
        reason = "the test holds the table as a busy holder would, while the count is asked for"
    )]
    async fn session_counts_are_the_sweeps_once_it_counted() {
        let dp = Arc::new(Mutex::new(three_sessions()));
        let mut by_owner = [0; crate::datapath::sweep::OWNER_SLOTS];
        (by_owner[1], by_owner[2]) = (30, 12);
        let at = Instant::now() - Duration::from_secs(3);
        let swept = Mutex::new(Some((
            at,
            Tally {
                total: 42,
                embryonic: 5,
                by_owner,
            },
        )));
        let bounds = TableBounds {
            capacity: 1_000,
            embryonic_slots: 100,
        };
        let (tx, rx) = oneshot::channel();
        let held = lock(&dp);
        let asker = {
            let dp = dp.clone();
            tokio::task::spawn_blocking(move || {
                session_counts(&swept, bounds, &dp, Level::Operator, tx)
            })
        };
        let response = tokio::time::timeout(Duration::from_secs(2), rx).await;
        drop(held);
        asker.await.expect("the asker ends");
        let response = response
            .expect("an answer while the datapath is held")
            .expect("an answer");
        let view: SessionsView = response.view().expect("a sessions view");
        assert_eq!((view.total, view.embryonic), (42, 5));
        assert_eq!(
            view.by_owner.clone().into_iter().collect::<Vec<_>>(),
            [(1, 30), (2, 12)]
        );
        assert_eq!((view.capacity, view.embryonic_capacity), (1_000, 100));
        assert!(view.sessions.is_none());
        assert!(view.counted_ms_ago.is_some_and(|ms| ms >= 3000), "{view:?}");
    }

    /// The walk waits for the table, its caller does not: `sessions_later` returns while
    /// another holder keeps the table, and the count comes once it lets go. (Before, the main
    /// loop walked the table itself and its events waited for the walk.) Past `MAX_WALKS`
    /// asked for, a request is refused at once; readers past `MAX_READER_WALKS` and the
    /// agent's metrics past `MAX_AGENT_WALKS`, while operators still get the rest (seen
    /// failing: the readers took every walk). One test: the bounds are process-wide.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[expect(
        clippy::await_holding_lock,
        reason = "the test holds the table as a busy holder would, while the walks wait"
    )]
    async fn session_walks_leave_their_callers_free_and_are_bounded() {
        let dp = Arc::new(Mutex::new(three_sessions()));
        let held = lock(&dp);
        let ask = |level| {
            let (tx, rx) = oneshot::channel();
            let page =
                SessionPage::new(true, SessionFilter::default(), 0, None, &[]).expect("a page");
            sessions_later(dp.clone(), page, level, tx);
            rx
        };
        let refused = |mut rx: oneshot::Receiver<Response>, why: &str| {
            let busy = rx.try_recv().expect("refused at once");
            assert!(!busy.ok);
            assert!(
                busy.error.as_deref().is_some_and(|e| e.starts_with(why)),
                "{busy:?}"
            );
        };
        let readers =
            format!("busy: {MAX_READER_WALKS} walks of the session table asked by read-only");
        let agent =
            format!("busy: {MAX_AGENT_WALKS} walks of the session table asked by the agent");
        let all = format!("busy: {MAX_WALKS} walks");
        // Readers and the agent's metrics within their shares, operators in the rest.
        let mut replies: Vec<_> = (0..MAX_READER_WALKS).map(|_| ask(Level::Reader)).collect();
        refused(ask(Level::Reader), &readers);
        replies.extend((0..MAX_AGENT_WALKS).map(|_| ask(Level::Agent)));
        refused(ask(Level::Agent), &agent);
        let rest = MAX_WALKS - MAX_READER_WALKS - MAX_AGENT_WALKS;
        replies.extend((0..rest).map(|_| ask(Level::Operator)));
        refused(ask(Level::Operator), &all);
        refused(ask(Level::Reader), &readers);
        tokio::time::sleep(Duration::from_millis(100)).await;
        for rx in &mut replies {
            assert!(rx.try_recv().is_err(), "no answer while the table is held");
        }
        drop(held);
        for rx in replies {
            let response = tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .expect("the answer once the table is free")
                .expect("an answer");
            assert!(response.ok, "{response:?}");
            let view: SessionsView = response.view().expect("a sessions view");
            assert_eq!(view.total, 3);
        }
        assert_eq!(WALKS_ASKED.load(Ordering::Acquire), 0, "all walks done");
        assert_eq!(READER_WALKS_ASKED.load(Ordering::Acquire), 0);
        assert_eq!(AGENT_WALKS_ASKED.load(Ordering::Acquire), 0);
        // A reader within its share refused because all walks are asked for gives its share
        // back.
        let held = lock(&dp);
        let operators: Vec<_> = (0..MAX_WALKS).map(|_| ask(Level::Operator)).collect();
        refused(ask(Level::Reader), &all);
        assert_eq!(READER_WALKS_ASKED.load(Ordering::Acquire), 0);
        drop(held);
        for rx in operators {
            let response = tokio::time::timeout(Duration::from_secs(10), rx).await;
            assert!(response.is_ok_and(|r| r.is_ok_and(|r| r.ok)));
        }
        assert_eq!(WALKS_ASKED.load(Ordering::Acquire), 0);
    }

    /// Readers' pages are at most `MAX_READER_PAGE` sessions: by default, and a larger limit
    /// is refused naming the bound; operators' and counts are as asked.
    #[test]
    fn readers_pages_are_bounded() {
        assert_eq!(
            page_limit(Level::Reader, false, None),
            Ok(Some(MAX_READER_PAGE))
        );
        assert_eq!(page_limit(Level::Reader, false, Some(500)), Ok(Some(500)));
        let refused = page_limit(Level::Reader, false, Some(MAX_READER_PAGE + 1));
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.contains("(10000 sessions a page)")),
            "{refused:?}"
        );
        assert_eq!(
            page_limit(Level::Reader, true, Some(100_000)),
            Ok(Some(100_000))
        );
        for level in [Level::Operator, Level::Agent] {
            assert_eq!(page_limit(level, false, None), Ok(None));
            assert_eq!(page_limit(level, false, Some(100_000)), Ok(Some(100_000)));
        }
    }

    /// The walk's thread, and only it, runs at the lower priority.
    #[test]
    fn a_walks_priority_is_its_threads_own() {
        let before = priority();
        let (walk, after) = std::thread::spawn(|| {
            lower_priority(WALK_NICE);
            priority()
        })
        .join()
        .map(|walk| (walk, priority()))
        .expect("the thread");
        assert_eq!(walk, WALK_NICE.max(before));
        assert_eq!(after, before, "the caller's priority is left alone");
    }

    /// A reader walks the table while the agent's lock is held by someone else.
    #[test]
    fn a_session_reader_needs_no_lock() {
        let dp = Mutex::new(three_sessions());
        let reader = lock(&dp).session_reader().expect("a reader");
        let _held = lock(&dp);
        let mut seen = 0;
        let counted = reader
            .chunked(2, |keys, _| seen += keys.len())
            .expect("a walk");
        assert_eq!((counted, seen), (3, 3));
    }
}
