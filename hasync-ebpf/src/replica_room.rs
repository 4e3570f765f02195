//! The peers' pool of the session table (`hasync_common::ReplicaRoom`): how many assured
//! sessions peers' records may hold here. The apply program refuses what would pass the limit
//! and counts what its writes and deletes moved in and out; the agent gives back what its
//! sweep deletes and counts the table again now and then (what the fast path changes:
//! takeovers, copies it made assured, expired copies it replaced).

use hasync_common::{Counter, Counters};

use crate::maps::REPLICA_ROOM;

/// Is there room for one more copy in the pool (counted when there is not)?
#[inline(always)]
pub fn has_room(counters: &mut Counters) -> bool {
    let room = REPLICA_ROOM
        .get(0)
        .is_some_and(|room| room.held < room.limit);
    if !room {
        counters.inc(Counter::ReplicasOverLimit);
    }
    room
}

/// Counts a write or delete that took an entry from in the pool (`was`) to `now`.
#[inline(always)]
pub fn account(was: bool, now: bool) {
    if was == now {
        return;
    }
    let Some(room) = REPLICA_ROOM.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a map value valid for the program's run; the apply program and the agent write
    // it only under the agent's hold of the datapath, one at a time.
    let room = unsafe { &mut *room };
    if now {
        room.held = room.held.wrapping_add(1);
        room.added = room.added.wrapping_add(1);
    } else {
        room.held = room.held.saturating_sub(1);
    }
}
