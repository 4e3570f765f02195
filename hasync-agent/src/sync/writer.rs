//! The sending side of one live connection: a task that owns the channel's sending half, so
//! that nothing else ever waits on a socket write.
//!
//! Acks and keepalives are not queued: the latest of each is kept in a slot and goes out before
//! the next data frame, so the reader that asks for an ack never waits, and a data stream that
//! fills the socket cannot hold them back for more than one frame. Session frames queue in a
//! small bounded channel: the sender waits there (back-pressure), never on the socket.
//!
//! Every write has a deadline: a peer that stops reading (stalled, frozen, or itself blocked)
//! makes the write fail with [`ChannelError::Stalled`], and the engine closes the connection,
//! counts it and dials again.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::sync::{mpsc, Notify};

use super::{
    channel::{ChannelError, Sender},
    wire::{Keepalive, Message},
};

/// Data frames waiting for the writer, per connection.
const DATA_QUEUE: usize = 4;

/// What the writer sends ahead of data: the latest ack and keepalive asked for.
#[derive(Default)]
struct Urgent {
    /// Highest sequence number to acknowledge, 0 when none is due.
    ack: AtomicU64,
    keepalive: Mutex<KeepaliveSlot>,
    wake: Notify,
}

/// The keepalive to send next, and the highest number handed to this connection: one numbered
/// below it (taken before it, handed on after) is dropped, so the connection carries its
/// keepalives in their order (the receiver relies on it).
#[derive(Default)]
struct KeepaliveSlot {
    next: Option<Keepalive>,
    highest: u64,
}

impl Urgent {
    fn take(&self) -> Option<Message> {
        let seq = self.ack.swap(0, Relaxed);
        if seq != 0 {
            return Some(Message::Ack { seq });
        }
        let ka = self
            .keepalive
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next
            .take();
        ka.map(Message::Keepalive)
    }
}

/// The handle the engine keeps to a connection's writer. Cheap to clone.
#[derive(Clone)]
pub struct Writer {
    data: mpsc::Sender<Message>,
    urgent: Arc<Urgent>,
}

/// What the writer task runs on: build it with [`writer`], then `run` it in a task.
pub struct WriterTask {
    tx: Sender,
    data: mpsc::Receiver<Message>,
    urgent: Arc<Urgent>,
    deadline: Duration,
}

/// A writer for `tx` whose every write must finish within `deadline`.
pub fn writer(tx: Sender, deadline: Duration) -> (Writer, WriterTask) {
    let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
    let urgent = Arc::new(Urgent::default());
    (
        Writer {
            data: data_tx,
            urgent: urgent.clone(),
        },
        WriterTask {
            tx,
            data: data_rx,
            urgent,
            deadline,
        },
    )
}

impl Writer {
    /// Queues a data frame; waits only while the queue is full. Fails once the connection is
    /// gone.
    pub async fn send(&self, msg: Message) -> Result<(), ChannelError> {
        self.data.send(msg).await.map_err(|_| ChannelError::Closed)
    }

    /// Asks for an acknowledgement of everything up to `seq`; never waits.
    pub fn ack(&self, seq: u64) {
        self.urgent.ack.fetch_max(seq, Relaxed);
        self.urgent.wake.notify_one();
    }

    /// Asks for a keepalive (replacing one not yet sent; one numbered below one asked for
    /// before is dropped); never waits.
    pub fn keepalive(&self, ka: Keepalive) {
        {
            let mut slot = self
                .urgent
                .keepalive
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if ka.seq != 0 && ka.seq < slot.highest {
                return;
            }
            slot.highest = slot.highest.max(ka.seq);
            slot.next = Some(ka);
        }
        self.urgent.wake.notify_one();
    }

    /// A writer with no connection: what it is given to send arrives on the receiver.
    #[cfg(test)]
    pub fn detached() -> (Writer, mpsc::Receiver<Message>) {
        let (data, rx) = mpsc::channel(DATA_QUEUE);
        (
            Writer {
                data,
                urgent: Arc::new(Urgent::default()),
            },
            rx,
        )
    }

    /// The acknowledgement or keepalive waiting to jump the queue, taken (a detached writer's
    /// are never sent).
    #[cfg(test)]
    pub fn take_urgent(&self) -> Option<Message> {
        self.urgent.take()
    }

    /// Has the writer task ended (the connection is closed)?
    pub fn is_closed(&self) -> bool {
        self.data.is_closed()
    }
}

impl WriterTask {
    /// Sends until the connection fails or every [`Writer`] is dropped; `sent` is told of
    /// each message put on the wire and its size there.
    pub async fn run(mut self, mut sent: impl FnMut(&Message, usize)) -> Result<(), ChannelError> {
        loop {
            while let Some(msg) = self.urgent.take() {
                self.write(&msg, &mut sent).await?;
            }
            tokio::select! {
                biased;
                _ = self.urgent.wake.notified() => {}
                msg = self.data.recv() => match msg {
                    Some(msg) => self.write(&msg, &mut sent).await?,
                    None => return Ok(()),
                },
            }
        }
    }

    async fn write(
        &mut self,
        msg: &Message,
        sent: &mut impl FnMut(&Message, usize),
    ) -> Result<(), ChannelError> {
        let n = tokio::time::timeout(self.deadline, self.tx.send(msg))
            .await
            .map_err(|_| ChannelError::Stalled(self.deadline))??;
        sent(msg, n);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::sync::{channel, wire::Record};

    async fn pair() -> ((Sender, channel::Receiver), (Sender, channel::Receiver)) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.expect("accept");
            channel::respond(s, &[7; 32]).await.expect("respond")
        });
        let stream = TcpStream::connect(addr).await.expect("connect");
        let client = channel::initiate(stream, &[7; 32]).await.expect("initiate");
        (client, server.await.expect("join"))
    }

    fn full_frame(seq: u64) -> Message {
        let rec = Record::delete(hasync_common::FlowKey::default(), Default::default(), 0);
        Message::Sessions {
            seq,
            bulk: true,
            records: vec![rec; super::super::wire::MAX_RECORDS_PER_FRAME],
        }
    }

    /// A peer that never reads: the writer's blocked write ends at the deadline with
    /// `Stalled`, and an ack asked for meanwhile never blocked the caller.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_stops_reading_stalls_the_writer_not_the_reader() {
        let ((tx, _rx), (_peer_tx, _peer_rx)) = pair().await;
        let (w, task) = writer(tx, Duration::from_millis(300));
        let run = tokio::spawn(task.run(|_, _| {}));
        let feeder = {
            let w = w.clone();
            tokio::spawn(async move {
                for seq in 1.. {
                    if w.send(full_frame(seq)).await.is_err() {
                        return seq;
                    }
                }
                0
            })
        };
        // The socket buffers fill; acks are still accepted at once.
        for seq in 1..1000 {
            w.ack(seq);
        }
        let result = tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .expect("the writer gave up within its deadline")
            .expect("join");
        assert!(
            matches!(result, Err(ChannelError::Stalled(_))),
            "{result:?}"
        );
        let stopped_at = tokio::time::timeout(Duration::from_secs(5), feeder)
            .await
            .expect("the feeder learnt the connection is gone")
            .expect("join");
        assert!(stopped_at > 1, "some frames went out before the stall");
        assert!(w.is_closed());
    }

    /// Acks jump the data queue and coalesce to the latest.
    #[tokio::test]
    async fn acks_go_first_and_coalesce() {
        let ((tx, _rx), (_ptx, mut prx)) = pair().await;
        let (w, task) = writer(tx, Duration::from_secs(5));
        w.ack(3);
        w.ack(9);
        w.ack(5);
        let run = tokio::spawn(task.run(|_, _| {}));
        assert_eq!(prx.recv().await.expect("recv").0, Message::Ack { seq: 9 });
        w.send(Message::BulkStart { bulk_id: 1 })
            .await
            .expect("send");
        assert_eq!(
            prx.recv().await.expect("recv").0,
            Message::BulkStart { bulk_id: 1 }
        );
        drop(w);
        assert!(run.await.expect("join").is_ok());
    }
    /// A connection carries its keepalives in their order: one numbered below one already
    /// handed to it (a keepalive loop's, made before another path's and handed on after it)
    /// is dropped, so the receiver may read a lower number on one connection as a sign that
    /// the higher one was false.
    #[test]
    fn a_keepalive_numbered_below_one_handed_on_before_is_dropped() {
        let (w, _rx) = Writer::detached();
        let ka = |seq| Keepalive {
            state: 1,
            sessions_owned: 0,
            flaps: 0,
            seq,
        };
        w.keepalive(ka(5));
        assert_eq!(w.take_urgent(), Some(Message::Keepalive(ka(5))));
        w.keepalive(ka(4));
        assert_eq!(w.take_urgent(), None, "below one sent");
        w.keepalive(ka(6));
        w.keepalive(ka(5));
        assert_eq!(w.take_urgent(), Some(Message::Keepalive(ka(6))));
    }
}
