//! The one way the agent takes a mutex: a task that panicked while holding one leaves the value
//! usable (every holder keeps it consistent between statements), so a poisoned lock is taken
//! as it is rather than spreading the panic.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, taking the value even if a task panicked while holding it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
