//! The messages of a netlink datagram the kernel answered on a raw socket (the `netdev`
//! family's answers to [`super::features`], ctnetlink's to [`super::kernel_track`], XFRM's to
//! [`super::ipsec`]): each header's type and sequence number, and its body, every length
//! checked against the buffer; and the header of a request.

/// A netlink message header's length.
pub const NLMSG_HDRLEN: usize = 16;
/// The type of an error (or acknowledgement) message.
pub const NLMSG_ERROR: u16 = 2;
/// The type of the message that ends a dump.
pub const NLMSG_DONE: u16 = 3;
/// A request's flag.
pub const NLM_F_REQUEST: u16 = 1;
/// A dump's flags (`NLM_F_ROOT | NLM_F_MATCH`).
pub const NLM_F_DUMP: u16 = 0x300;

/// A message of `kind` with `flags`, sequence number `seq` and `body`, padded to 4 bytes.
pub fn message(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + body.len();
    let mut m = header(len, kind, flags, seq).to_vec();
    m.extend_from_slice(body);
    m.resize(len.next_multiple_of(4), 0);
    m
}

/// A message header: the message's whole length (header included), type, flags and sequence
/// number (port 0: the kernel fills it in).
pub fn header(len: usize, kind: u16, flags: u16, seq: u32) -> [u8; NLMSG_HDRLEN] {
    let mut h = [0; NLMSG_HDRLEN];
    h[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    h[4..6].copy_from_slice(&kind.to_ne_bytes());
    h[6..8].copy_from_slice(&flags.to_ne_bytes());
    h[8..12].copy_from_slice(&seq.to_ne_bytes());
    h
}

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
