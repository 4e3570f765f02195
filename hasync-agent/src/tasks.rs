//! The agent's long-lived tasks, watched. Each runs for as long as the agent does (a sync
//! link's listener, dialler, sender and keepalives, the monitors, the interface watcher, the
//! control and HTTP servers), so one that ends, returned or panicked, is a fault: before,
//! nothing looked at them, and a member whose sender had panicked went on sending keepalives,
//! its peers believing it in sync while none of its changes reached them. The main loop ends
//! on the first such end ([`Tasks::ended`]): the agent stops, its datapath left pinned and
//! forwarding, and exits non-zero, for systemd to start it again (`Restart=on-failure`) in a
//! whole state (a datapath not pinned, `pin_dir = ""`, is detached, as at any stop). A
//! panic stays caught (unwinding, not `panic = "abort"`): code that recovers
//! from one where it can (the datapath log's reader, a walk's thread) goes on doing so.

use std::{
    future::{poll_fn, Future},
    task::Poll,
};

use tokio::task::{JoinError, JoinHandle};

/// A task ended when its handle is dropped (with whatever holds it: a task aborted itself, a
/// connection's guard).
#[derive(Debug)]
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Tasks that run until the agent stops, each with its name.
#[derive(Debug, Default)]
pub struct Tasks {
    running: Vec<(String, JoinHandle<()>)>,
    /// Ends seen together with one already said, said next.
    seen: Vec<TaskEnded>,
}

/// How a task ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// It returned.
    Returned,
    /// It panicked, with this message.
    Panicked(String),
    /// It was cancelled (only an abort from outside does this).
    Cancelled,
}

/// A task that ended while the agent ran.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the agent's task `{name}` {}; stopping, for the service manager to start the agent again",
    match .end {
        End::Returned => "ended".to_owned(),
        End::Panicked(message) => format!("panicked: {message}"),
        End::Cancelled => "was cancelled".to_owned(),
    })]
pub struct TaskEnded {
    pub name: String,
    pub end: End,
}

impl Tasks {
    /// Watches `handle` as `name`.
    pub fn add(&mut self, name: impl Into<String>, handle: JoinHandle<()>) {
        self.running.push((name.into(), handle));
    }

    /// Watches each of `named`.
    pub fn extend<N: Into<String>>(
        &mut self,
        named: impl IntoIterator<Item = (N, JoinHandle<()>)>,
    ) {
        for (name, handle) in named {
            self.add(name, handle);
        }
    }

    /// How many are watched.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Is none watched?
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Waits for the first task to end (for ever if none does), and stops watching it. Of
    /// ends seen together, a panic is said first: tasks that end because another panicked
    /// (the interface watcher's followers, when it is gone) say less.
    pub async fn ended(&mut self) -> TaskEnded {
        if !self.seen.is_empty() {
            return self.seen.remove(0);
        }
        poll_fn(|cx| {
            let mut ended = Vec::new();
            let mut index = 0;
            while let Some((_, handle)) = self.running.get_mut(index) {
                match std::pin::Pin::new(handle).poll(cx) {
                    Poll::Ready(joined) => {
                        let (name, _) = self.running.swap_remove(index);
                        let end = end_of(joined);
                        ended.push(TaskEnded { name, end });
                    }
                    Poll::Pending => index += 1,
                }
            }
            ended.sort_by_key(|e| !matches!(e.end, End::Panicked(_)));
            let mut ended = ended.into_iter();
            match ended.next() {
                Some(first) => {
                    self.seen.extend(ended);
                    Poll::Ready(first)
                }
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Aborts them all.
    pub fn abort_all(self) {
        for (_, handle) in self.running {
            handle.abort();
        }
    }
}

fn end_of(joined: Result<(), JoinError>) -> End {
    match joined {
        Ok(()) => End::Returned,
        Err(e) if e.is_panic() => {
            let payload = e.into_panic();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(a payload that is not text)".to_owned());
            End::Panicked(message)
        }
        Err(_) => End::Cancelled,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn forever() -> JoinHandle<()> {
        tokio::spawn(std::future::pending())
    }

    /// The next end, waited for at most 5 s.
    async fn next_end(tasks: &mut Tasks) -> TaskEnded {
        tokio::time::timeout(Duration::from_secs(5), tasks.ended())
            .await
            .expect("an end within 5 s")
    }

    /// The first task to end is named, with its panic's message, however many run beside it;
    /// the others stay watched.
    #[tokio::test]
    async fn a_task_that_panics_is_named_with_its_message() {
        let mut tasks = Tasks::default();
        tasks.add("keepalives to member 2", forever());
        tasks.add(
            "sender to member 2",
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                panic!("index out of bounds");
            }),
        );
        tasks.add("control socket", forever());
        let ended = next_end(&mut tasks).await;
        assert_eq!(
            ended,
            TaskEnded {
                name: "sender to member 2".into(),
                end: End::Panicked("index out of bounds".into()),
            }
        );
        assert!(ended.to_string().contains("panicked: index out of bounds"));
        assert_eq!(tasks.len(), 2);
        tasks.abort_all();
    }

    /// A task that returns is an end too (each runs for as long as the agent), and a
    /// formatted panic's message is kept.
    #[tokio::test]
    async fn a_task_that_returns_or_panics_with_a_formatted_message_is_an_end() {
        let mut tasks = Tasks::default();
        tasks.add("interface watcher", tokio::spawn(async {}));
        let ended = next_end(&mut tasks).await;
        assert_eq!(ended.end, End::Returned);
        assert_eq!(ended.name, "interface watcher");
        tasks.add("link groups", tokio::spawn(async { panic!("peer {}", 3) }));
        let ended = next_end(&mut tasks).await;
        assert_eq!(ended.end, End::Panicked("peer 3".into()));
        assert!(tasks.is_empty());
    }

    /// Of tasks that ended together, the one that panicked is said first (here a follower,
    /// watched before it, returned when the panicking task's channel closed).
    #[tokio::test]
    async fn a_panic_is_said_before_the_ends_it_brought() {
        let mut tasks = Tasks::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.add(
            "follower",
            tokio::spawn(async { rx.await.ok().unwrap_or(()) }),
        );
        tasks.add(
            "watcher",
            tokio::spawn(async move {
                let _held = tx;
                panic!("gone");
            }),
        );
        // Both over before the first look.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let first = next_end(&mut tasks).await;
        assert_eq!(
            (first.name.as_str(), first.end),
            ("watcher", End::Panicked("gone".into()))
        );
        let second = next_end(&mut tasks).await;
        assert_eq!(
            (second.name.as_str(), second.end),
            ("follower", End::Returned)
        );
    }

    /// Tasks that keep running are no end: the wait goes on (and with none at all).
    #[tokio::test]
    async fn running_tasks_are_no_end() {
        let mut tasks = Tasks::default();
        let waited = tokio::time::timeout(Duration::from_millis(100), tasks.ended()).await;
        assert!(waited.is_err(), "no task, no end");
        tasks.extend([("a", forever()), ("b", forever())]);
        let waited = tokio::time::timeout(Duration::from_millis(100), tasks.ended()).await;
        assert!(waited.is_err(), "ended: {waited:?}");
        assert_eq!(tasks.len(), 2);
        tasks.abort_all();
    }
}
