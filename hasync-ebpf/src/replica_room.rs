//! The peers' pool of the session table (`hasync_common::ReplicaRoom`): how many assured
//! sessions peers' records may hold here. The apply program takes room for each assured copy
//! it writes where the table held none, and gives it back when it deletes one; the agent
//! gives back what its sweep deletes and counts the table again now and then (what the fast
//! path changes: takeovers, copies it made assured, expired copies it replaced).

use hasync_common::{Counter, Counters};

use crate::maps::REPLICA_ROOM;

/// Takes room for one more assured copy; false, and counted, when the pool is full.
#[inline(always)]
pub fn take(counters: &mut Counters) -> bool {
    let Some(room) = REPLICA_ROOM.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a map value valid for the program's run; the apply program and the agent write
    // it only under the agent's hold of the datapath, one at a time.
    let room = unsafe { &mut *room };
    if room.held >= room.limit {
        counters.inc(Counter::ReplicasOverLimit);
        return false;
    }
    room.held = room.held.wrapping_add(1);
    true
}

/// Is the pool full (counted when it is)?
#[inline(always)]
pub fn full(counters: &mut Counters) -> bool {
    let full = REPLICA_ROOM
        .get(0)
        .is_none_or(|room| room.held >= room.limit);
    if full {
        counters.inc(Counter::ReplicasOverLimit);
    }
    full
}

/// Gives back the room of an assured copy the apply program deleted.
#[inline(always)]
pub fn release() {
    if let Some(room) = REPLICA_ROOM.get_ptr_mut(0) {
        // SAFETY: as in `take`.
        let room = unsafe { &mut *room };
        room.held = room.held.saturating_sub(1);
    }
}
