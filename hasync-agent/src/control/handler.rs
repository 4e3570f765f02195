//! Answers control-socket requests from the running member's state.

use std::time::Instant;

use crate::{
    control::{
        protocol::{Request, Response},
        view::{
            CountersView, FlapsView, LocalStateView, MemberView, MembersView, SessionPage,
            StatisticsView,
        },
    },
    datapath::DEFAULT_CHUNK,
    member::{lock, Member},
    sync::{table::walk, wire::LinkKind},
};

/// Builds the answer to one request.
pub fn handle(member: &Member, request: Request) -> Response {
    let now = Instant::now();
    match request {
        Request::ShowMembers => show_members(member, now),
        Request::ShowSessions {
            count_only,
            filter,
            offset,
            limit,
        } => match SessionPage::new(
            count_only,
            filter,
            offset,
            limit,
            &member.config.zone_names(),
        ) {
            Ok(page) => show_sessions(member, page),
            Err(e) => Response::error(e),
        },
        Request::ShowStatistics => Response::ok(statistics(member)),
        Request::ShowCounters { prefix } => match lock(&member.dp).counters() {
            Ok(c) => Response::ok(CountersView::new(&c, prefix.as_deref())),
            Err(e) => Response::error(crate::datapath::error_chain(&e)),
        },
        Request::ShowFlaps => {
            Response::ok(FlapsView::from_membership(&lock(&member.membership), now))
        }
        Request::Suspend | Request::Functional => {
            let mut m = lock(&member.membership);
            if matches!(request, Request::Suspend) {
                m.suspend();
            } else {
                m.functional(now);
            }
            m.evaluate(now);
            Response::ok(LocalStateView::new(m.local, m.state))
        }
    }
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

/// `show cluster sessions`: `page` filled from a walk of the session table.
fn show_sessions(member: &Member, mut page: SessionPage) -> Response {
    let walked = tokio::task::block_in_place(|| {
        walk(&*member.dp, DEFAULT_CHUNK, |k, v| page.add_chunk(k, v))
    });
    let (capacity, embryonic) = {
        let dp = lock(&member.dp);
        (dp.capacity(), dp.embryonic_slots())
    };
    match walked {
        Ok(_) => Response::ok(page.finish(capacity, embryonic)),
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
        let (queued, in_flight) = p.backlog();
        if let Some(v) = view.peers.iter_mut().find(|v| v.id == p.cfg.id.0) {
            v.records_pending = (queued + in_flight) as u64;
        }
    }
    view
}
