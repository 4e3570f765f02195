//! The encrypted, authenticated channel between two members: Noise (`NNpsk0`, X25519,
//! ChaCha20-Poly1305, BLAKE2s) keyed with the cluster key, over a TCP stream on HA4 or HA4
//! backup. Each Noise message travels with a two-byte length prefix.
//!
//! Only holders of the cluster key complete the handshake; a peer with another key fails it
//! (`ChannelError::BadKey`) before any message is accepted. Every later frame is authenticated,
//! so a tampered or replayed frame fails to decrypt and closes the channel.

use std::sync::Arc;

use snow::{Builder, HandshakeState, TransportState};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
    sync::Mutex,
};

use super::{
    stats::Rejection,
    wire::{Message, RecordLayout, WireError, MAX_PLAINTEXT},
};

const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
const MAX_NOISE_MESSAGE: usize = 65_535;
/// The length prefix of every frame on the stream.
const LENGTH_PREFIX: usize = 2;
/// Bytes a message takes on the stream beyond its plaintext: the Noise authentication tag and
/// the length prefix.
pub const FRAME_OVERHEAD: usize = MAX_NOISE_MESSAGE - MAX_PLAINTEXT + LENGTH_PREFIX;

/// Errors of a sync channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake failed: the peer does not hold the cluster key ({0})")]
    BadKey(snow::Error),
    /// The responder hung up on our first handshake message: it could not authenticate it.
    #[error("handshake failed: the peer closed the connection on our first message (it holds another cluster key, or does not take connections from this address: check the members' addresses; or its listener let a newer connection from this address take this one's place: a flood of connections in this address's name)")]
    HandshakeRefused,
    #[error("noise: {0}")]
    Noise(snow::Error),
    #[error("frame failed authentication: {0}")]
    Auth(snow::Error),
    #[error("malformed message: {0}")]
    Malformed(#[from] WireError),
    #[error("message of {0} bytes exceeds the frame limit")]
    TooLarge(usize),
    #[error("connection closed by peer")]
    Closed,
    /// A write made no progress for this long: the peer stopped reading.
    #[error("no write progress for {0:?}: the peer stopped reading")]
    Stalled(std::time::Duration),
}

impl ChannelError {
    /// The reason counters and logs give.
    pub fn reason(&self) -> Rejection {
        match self {
            ChannelError::Io(_) | ChannelError::Closed => Rejection::Connection,
            ChannelError::BadKey(_) | ChannelError::HandshakeRefused => Rejection::BadKey,
            ChannelError::Noise(_) | ChannelError::Auth(_) => Rejection::BadFrame,
            ChannelError::Malformed(_) | ChannelError::TooLarge(_) => Rejection::Malformed,
            ChannelError::Stalled(_) => Rejection::Stalled,
        }
    }
}

/// Makes a dead peer visible to the kernel too: TCP keepalive probes after `idle` of silence,
/// and `TCP_USER_TIMEOUT` so unacknowledged data fails the connection after `idle` rather than
/// after the kernel's default of about 15 minutes of retransmissions.
pub fn tune_socket(stream: &TcpStream, idle: std::time::Duration) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    stream.set_nodelay(true)?;
    let fd = stream.as_raw_fd();
    let secs = libc::c_int::try_from(idle.as_secs().max(1)).unwrap_or(libc::c_int::MAX);
    let ms = libc::c_uint::try_from(idle.as_millis()).unwrap_or(libc::c_uint::MAX);
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs)?;
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1)?;
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3)?;
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)
}

fn setsockopt<T: Copy>(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: T,
) -> std::io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(0);
    // SAFETY: `value` lives for the call and `len` is its size; the kernel only reads it.
    let rc = unsafe { libc::setsockopt(fd, level, name, (&raw const value).cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn builder(psk: &[u8; 32]) -> Result<Builder<'_>, ChannelError> {
    let params = NOISE_PARAMS.parse().map_err(ChannelError::Noise)?;
    Builder::new(params)
        .psk(0, psk)
        .map_err(ChannelError::Noise)
}

async fn write_frame(w: &mut OwnedWriteHalf, bytes: &[u8]) -> Result<(), ChannelError> {
    let len = u16::try_from(bytes.len()).map_err(|_| ChannelError::TooLarge(bytes.len()))?;
    let mut out = Vec::with_capacity(bytes.len() + LENGTH_PREFIX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    w.write_all(&out).await?;
    Ok(())
}

async fn read_frame(r: &mut OwnedReadHalf, buf: &mut Vec<u8>) -> Result<(), ChannelError> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ChannelError::Closed)
        }
        Err(e) => return Err(e.into()),
    }
    buf.resize(usize::from(u16::from_be_bytes(len)), 0);
    r.read_exact(buf).await?;
    Ok(())
}

/// Sending half of a channel.
pub struct Sender {
    w: OwnedWriteHalf,
    noise: Arc<Mutex<TransportState>>,
    plain: Vec<u8>,
    cipher: Vec<u8>,
    /// Session records' layout: the current one until the hellos agree on another.
    layout: RecordLayout,
}

/// Receiving half of a channel.
pub struct Receiver {
    r: OwnedReadHalf,
    noise: Arc<Mutex<TransportState>>,
    cipher: Vec<u8>,
    plain: Vec<u8>,
    /// As the sender's.
    layout: RecordLayout,
}

/// Runs the initiator side of the handshake on `stream`.
pub async fn initiate(
    stream: TcpStream,
    psk: &[u8; 32],
) -> Result<(Sender, Receiver), ChannelError> {
    let mut hs = builder(psk)?
        .build_initiator()
        .map_err(ChannelError::Noise)?;
    let (mut r, mut w) = stream.into_split();
    let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
    let n = hs
        .write_message(&[], &mut buf)
        .map_err(ChannelError::Noise)?;
    write_frame(&mut w, &buf[..n]).await?;
    let mut msg = Vec::new();
    // A responder that cannot authenticate our message (another key) closes the connection
    // without a word: with NNpsk0 it has nothing it could say that we could trust.
    read_frame(&mut r, &mut msg).await.map_err(|e| match e {
        ChannelError::Closed => ChannelError::HandshakeRefused,
        ChannelError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionReset => {
            ChannelError::HandshakeRefused
        }
        other => other,
    })?;
    hs.read_message(&msg, &mut buf)
        .map_err(ChannelError::BadKey)?;
    finish(hs, r, w)
}

/// Runs the responder side of the handshake on `stream`.
pub async fn respond(
    stream: TcpStream,
    psk: &[u8; 32],
) -> Result<(Sender, Receiver), ChannelError> {
    let mut hs = builder(psk)?
        .build_responder()
        .map_err(ChannelError::Noise)?;
    let (mut r, mut w) = stream.into_split();
    let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
    let mut msg = Vec::new();
    read_frame(&mut r, &mut msg).await?;
    hs.read_message(&msg, &mut buf)
        .map_err(ChannelError::BadKey)?;
    let n = hs
        .write_message(&[], &mut buf)
        .map_err(ChannelError::Noise)?;
    write_frame(&mut w, &buf[..n]).await?;
    finish(hs, r, w)
}

fn finish(
    hs: HandshakeState,
    r: OwnedReadHalf,
    w: OwnedWriteHalf,
) -> Result<(Sender, Receiver), ChannelError> {
    let noise = Arc::new(Mutex::new(
        hs.into_transport_mode().map_err(ChannelError::Noise)?,
    ));
    Ok((
        Sender {
            w,
            noise: noise.clone(),
            plain: Vec::new(),
            cipher: vec![0; MAX_NOISE_MESSAGE],
            layout: RecordLayout::CURRENT,
        },
        Receiver {
            r,
            noise,
            cipher: Vec::new(),
            plain: vec![0; MAX_NOISE_MESSAGE],
            layout: RecordLayout::CURRENT,
        },
    ))
}

impl Sender {
    /// Session records go out in `layout` from now on (the hellos were exchanged).
    pub fn set_layout(&mut self, layout: RecordLayout) {
        self.layout = layout;
    }

    /// Encrypts and sends one message; returns the bytes put on the wire.
    pub async fn send(&mut self, msg: &Message) -> Result<usize, ChannelError> {
        // Cancel-safe only between messages: a send interrupted mid-write leaves the stream
        // unusable, and the connection is dropped (see `writer`).
        self.plain.clear();
        msg.encode_as(&mut self.plain, self.layout)?;
        if self.plain.len() > MAX_PLAINTEXT {
            return Err(ChannelError::TooLarge(self.plain.len()));
        }
        let n = {
            let mut noise = self.noise.lock().await;
            noise
                .write_message(&self.plain, &mut self.cipher)
                .map_err(ChannelError::Noise)?
        };
        write_frame(&mut self.w, &self.cipher[..n]).await?;
        Ok(n + LENGTH_PREFIX)
    }
}

impl Receiver {
    /// Session records come in `layout` from now on (the hellos were exchanged).
    pub fn set_layout(&mut self, layout: RecordLayout) {
        self.layout = layout;
    }

    /// Receives, authenticates and decodes one message; also returns its size on the wire.
    pub async fn recv(&mut self) -> Result<(Message, usize), ChannelError> {
        read_frame(&mut self.r, &mut self.cipher).await?;
        let n = {
            let mut noise = self.noise.lock().await;
            noise
                .read_message(&self.cipher, &mut self.plain)
                .map_err(ChannelError::Auth)?
        };
        let plain = self.plain.get(..n).ok_or(ChannelError::TooLarge(n))?;
        Ok((
            Message::decode_as(plain, self.layout)?,
            self.cipher.len() + LENGTH_PREFIX,
        ))
    }
}

/// Both ends of a channel over loopback TCP, the initiator's with key `a` and the
/// responder's with key `b` (for tests).
#[cfg(test)]
pub(crate) async fn pair(
    a: [u8; 32],
    b: [u8; 32],
) -> (
    Result<(Sender, Receiver), ChannelError>,
    Result<(Sender, Receiver), ChannelError>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.expect("accept");
        respond(s, &b).await
    });
    let client = initiate(TcpStream::connect(addr).await.expect("connect"), &a).await;
    (client, server.await.expect("join"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::wire::Keepalive;

    #[tokio::test]
    async fn same_key_talks_both_ways() {
        let (c, s) = pair([1; 32], [1; 32]).await;
        let ((mut ctx, mut crx), (mut stx, mut srx)) = (c.expect("client"), s.expect("server"));
        let ka = Message::Keepalive(Keepalive {
            state: 1,
            sessions_owned: 5,
            flaps: 0,
            seq: 1,
        });
        ctx.send(&ka).await.expect("send");
        assert_eq!(srx.recv().await.expect("recv").0, ka);
        stx.send(&Message::Ack { seq: 9 }).await.expect("send");
        assert_eq!(crx.recv().await.expect("recv").0, Message::Ack { seq: 9 });
    }

    #[tokio::test]
    async fn another_key_is_rejected_in_the_handshake() {
        let (c, s) = pair([1; 32], [2; 32]).await;
        match s {
            Err(e) => assert_eq!(e.reason(), Rejection::BadKey, "{e}"),
            Ok(_) => panic!("responder accepted a peer with another key"),
        }
        // The initiator learns it too: the responder hung up on its first message.
        match c {
            Err(e) => assert_eq!(e.reason(), Rejection::BadKey, "{e}"),
            Ok(_) => panic!("initiator completed a handshake with another key"),
        }
    }
}
