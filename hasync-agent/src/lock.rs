//! The one way the agent takes a mutex: a task that panicked while holding one leaves the value
//! usable (every holder keeps it consistent between statements), so a poisoned lock is taken
//! as it is rather than spreading the panic.

use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};

/// Locks `m`, taking the value even if a task panicked while holding it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Locks `m` from an async task: at once if it is free; if another holder has it, the wait
/// happens off the async worker (`block_in_place`), so a long hold elsewhere (the sweep
/// settling a chunk of expired sessions, a reattach) stalls this task only, not the other
/// tasks of the worker. Taking a free lock costs no hand-off. Outside a runtime it is [`lock`]; on a current-thread runtime a
/// contended lock panics, as `block_in_place` does.
pub fn lock_on_worker<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.try_lock() {
        Ok(guard) => guard,
        Err(TryLockError::Poisoned(e)) => e.into_inner(),
        Err(TryLockError::WouldBlock) => tokio::task::block_in_place(|| lock(m)),
    }
}

/// Test helper: does a timer task of a 2-worker runtime run while a thread holds `m` and two
/// tasks run `wait` (which takes `m`)? The holder lets go when the timer has run, or after
/// 5 s; so `false` means both workers were stuck in `wait` until then.
#[cfg(test)]
pub(crate) fn timer_runs_while_held<T: Send + 'static>(
    m: &std::sync::Arc<Mutex<T>>,
    wait: impl Fn() + Clone + Send + 'static,
) -> bool {
    use std::{
        sync::{
            atomic::{AtomicBool, Ordering},
            Arc,
        },
        time::{Duration, Instant},
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let ticked = Arc::new(AtomicBool::new(false));
    let guard_held = Arc::new(AtomicBool::new(false));
    let holder = {
        let (m, ticked, held) = (Arc::clone(m), Arc::clone(&ticked), Arc::clone(&guard_held));
        std::thread::spawn(move || {
            let _g = lock(&m);
            held.store(true, Ordering::SeqCst);
            let until = Instant::now() + Duration::from_secs(5);
            while !ticked.load(Ordering::SeqCst) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            ticked.load(Ordering::SeqCst)
        })
    };
    while !guard_held.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(1));
    }
    rt.block_on(async {
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let wait = wait.clone();
                tokio::spawn(async move { wait() })
            })
            .collect();
        let ticked = Arc::clone(&ticked);
        let timer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            ticked.store(true, Ordering::SeqCst);
        });
        for w in waiters {
            w.await.expect("waiter");
        }
        timer.await.expect("timer");
    });
    holder.join().expect("holder")
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::{lock, lock_on_worker, timer_runs_while_held};

    /// Both workers of a 2-worker runtime wait for a mutex that a thread holds; a timer task
    /// must still run meanwhile.
    #[test]
    fn waiting_for_a_held_lock_leaves_the_workers_to_other_tasks() {
        let m = Arc::new(Mutex::new(0u32));
        let waiting = Arc::clone(&m);
        let ran = timer_runs_while_held(&m, move || *lock_on_worker(&waiting) += 1);
        assert!(ran, "the timer waited for the lock's holder");
        assert_eq!(*lock(&m), 2);
    }
}
