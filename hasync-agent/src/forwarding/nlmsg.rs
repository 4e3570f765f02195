//! The messages of a netlink datagram the kernel answered on a raw socket (the `netdev`
//! family's answers to [`super::features`], ctnetlink's to [`super::kernel_track`]): each
//! header's type and sequence number, and its body, every length checked against the buffer.

/// A netlink message header's length.
pub const NLMSG_HDRLEN: usize = 16;
/// The type of an error (or acknowledgement) message.
pub const NLMSG_ERROR: u16 = 2;

/// One message of a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: u16,
    pub seq: u32,
    /// What follows the header.
    pub body: &'a [u8],
}

/// A message whose length does not fit in what is left of the datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LengthLies;

/// The messages of datagram `buf`, in order; after a [`LengthLies`], nothing.
pub fn messages(buf: &[u8]) -> Messages<'_> {
    Messages { rest: buf }
}

/// See [`messages`].
pub struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, LengthLies>;

    fn next(&mut self) -> Option<Self::Item> {
        let buf = self.rest;
        let header = buf.get(..NLMSG_HDRLEN)?;
        let word = |at: usize| header.get(at..at + 4).and_then(|b| b.try_into().ok());
        let len = u32::from_ne_bytes(word(0)?) as usize;
        let kind = u16::from_ne_bytes(header.get(4..6)?.try_into().ok()?);
        let seq = u32::from_ne_bytes(word(8)?);
        // A length below the header's makes an empty range: `None` too.
        let Some(body) = buf.get(NLMSG_HDRLEN..len) else {
            self.rest = &[];
            return Some(Err(LengthLies));
        };
        self.rest = buf
            .get(len.next_multiple_of(4).min(buf.len())..)
            .unwrap_or_default();
        Some(Ok(Message { kind, seq, body }))
    }
}

/// The errno an [`NLMSG_ERROR`] message's body carries, positive (0: an acknowledgement);
/// `None` if the body is too short to say.
pub fn error_code(body: &[u8]) -> Option<i32> {
    let code = i32::from_ne_bytes(body.get(..4)?.try_into().ok()?);
    Some(code.saturating_neg())
}
