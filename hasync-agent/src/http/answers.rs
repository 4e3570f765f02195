//! Whether a connection has an answer under way: from the moment its request's head was read
//! until hyper has taken the whole answer's body (and dropped it). A connection closed for a
//! newcomer finishes such an answer first; one with none (idle between requests, or half a
//! head sent) is closed at once, so clients that send half heads cannot hold slots for a
//! close's grace each.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use http_body_util::Full;
use hyper::body::{Body, Bytes, Frame, SizeHint};

/// A connection's answers under way.
#[derive(Clone, Debug, Default)]
pub struct Answers(Arc<AtomicUsize>);

impl Answers {
    /// Is an answer under way?
    pub fn under_way(&self) -> bool {
        self.0.load(Ordering::Acquire) != 0
    }

    /// An answer begins; it is over when the mark returned is dropped (with its body).
    pub fn begin(&self) -> Answering {
        self.0.fetch_add(1, Ordering::AcqRel);
        Answering(self.0.clone())
    }
}

/// One answer under way ([`Answers::begin`]).
#[derive(Debug)]
pub struct Answering(Arc<AtomicUsize>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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
