//! Whether a connection has an answer under way: from the moment its request's head was read
//! until hyper has taken the whole answer's body (and dropped it), and written what it took to
//! the socket (hyper drops a body once its last bytes are in its own buffer, which a client
//! that reads slowly keeps from the socket: [`Tracked`]). A connection closed for a newcomer
//! finishes such an answer first; one with none (idle between requests, or half a head sent)
//! is closed at once, so clients that send half heads cannot hold slots for a close's grace
//! each.

use std::{
    convert::Infallible,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use http_body_util::Full;
use hyper::{
    body::{Body, Bytes, Frame, SizeHint},
    rt::{Read, ReadBufCursor, Write},
};

/// A connection's answers under way.
#[derive(Clone, Debug, Default)]
pub struct Answers(Arc<State>);

#[derive(Debug, Default)]
struct State {
    /// Bodies hyper has not dropped yet.
    bodies: AtomicUsize,
    /// Written since the last flush that completed.
    unflushed: AtomicBool,
}

impl Answers {
    /// Is an answer under way?
    pub fn under_way(&self) -> bool {
        self.0.bodies.load(Ordering::Acquire) != 0 || self.0.unflushed.load(Ordering::Acquire)
    }

    /// An answer begins; it is over when the mark returned is dropped (with its body) and what
    /// hyper wrote of it is flushed.
    pub fn begin(&self) -> Answering {
        self.0.bodies.fetch_add(1, Ordering::AcqRel);
        Answering(self.0.clone())
    }
}

/// One answer under way ([`Answers::begin`]).
#[derive(Debug)]
pub struct Answering(Arc<State>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.bodies.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's IO that tells [`Answers`] what hyper wrote and has not flushed yet (hyper
/// writes its buffer out, then flushes: a write it could not finish keeps the flush away).
pub struct Tracked<T> {
    io: T,
    answers: Answers,
}

impl<T> Tracked<T> {
    pub fn new(io: T, answers: Answers) -> Tracked<T> {
        Tracked { io, answers }
    }

    fn writing(&self) {
        self.answers.0.unflushed.store(true, Ordering::Release);
    }
}

impl<T: Read + Unpin> Read for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.writing();
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.io).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(()))) {
            this.answers.0.unflushed.store(false, Ordering::Release);
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.writing();
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }
}

/// An answer's body, which keeps its answer under way until hyper drops it.
#[derive(Debug)]
pub struct AnswerBody {
    body: Full<Bytes>,
    _answering: Answering,
}

impl AnswerBody {
    pub fn new(body: Full<Bytes>, answering: Answering) -> AnswerBody {
        AnswerBody {
            body,
            _answering: answering,
        }
    }
}

impl Body for AnswerBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_under_way_until_its_body_is_dropped() {
        let answers = Answers::default();
        assert!(!answers.under_way());
        let body = AnswerBody::new(Full::new(Bytes::from_static(b"x")), answers.begin());
        let other = answers.begin();
        drop(body);
        assert!(answers.under_way(), "the other answer is still under way");
        drop(other);
        assert!(!answers.under_way());
    }
}
