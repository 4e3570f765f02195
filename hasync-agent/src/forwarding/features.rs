//! A device's XDP features, from the kernel's `netdev` generic-netlink family: can XDP
//! redirect frames to it (`ndo_xdp_xmit`)? A redirect to a device that cannot take it is
//! dropped after the program returns, so only devices that can are offered to the program.

use std::{io, time::Duration};

use netlink_sys::{protocols::NETLINK_GENERIC, Socket};

use super::nlmsg::{self, NLMSG_ERROR, NLMSG_HDRLEN, NLM_F_REQUEST};

/// Errors of the feature query.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error("generic netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error(
        "the kernel has no `netdev` generic-netlink family (XDP features need Linux 6.3 or later)"
    )]
    NoFamily,
    #[error("the kernel refused the {what} request: {source}")]
    Refused {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel's answer to the {0} request does not parse")]
    Malformed(&'static str),
}

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
/// `NETDEV_XDP_ACT_NDO_XMIT`: the device implements `ndo_xdp_xmit`.
pub const XDP_ACT_NDO_XMIT: u64 = 1 << 2;
const GENL_HDRLEN: usize = 4;
/// Longest wait for an answer.
const TIMEOUT: Duration = Duration::from_secs(1);

/// A socket on the `netdev` family, in the caller's network namespace.
pub struct Features {
    socket: Socket,
    family: u16,
    seq: u32,
}

impl Features {
    /// Opens the socket and resolves the family.
    pub fn open() -> Result<Features, FeatureError> {
        let mut socket = Socket::new(NETLINK_GENERIC).map_err(FeatureError::Socket)?;
        socket.bind_auto().map_err(FeatureError::Socket)?;
        socket2::SockRef::from(&socket)
            .set_read_timeout(Some(TIMEOUT))
            .map_err(FeatureError::Socket)?;
        let mut f = Features {
            socket,
            family: GENL_ID_CTRL,
            seq: 0,
        };
        let name = b"netdev\0";
        let reply = f.ask(
            "family",
            GENL_ID_CTRL,
            CTRL_CMD_GETFAMILY,
            CTRL_ATTR_FAMILY_NAME,
            name,
        );
        let attrs = match reply {
            Err(FeatureError::Refused { source, .. })
                if source.raw_os_error() == Some(libc::ENOENT) =>
            {
                return Err(FeatureError::NoFamily)
            }
            r => r?,
        };
        let id = attr(&attrs, CTRL_ATTR_FAMILY_ID).ok_or(FeatureError::Malformed("family"))?;
        f.family = match id {
            [a, b] => u16::from_ne_bytes([*a, *b]),
            _ => return Err(FeatureError::Malformed("family")),
        };
        Ok(f)
    }

    /// The XDP features (`NETDEV_XDP_ACT_*` bits) of interface `ifindex`.
    pub fn xdp_features(&mut self, ifindex: u32) -> Result<u64, FeatureError> {
        let index = ifindex.to_ne_bytes();
        let attrs = self.ask(
            "device",
            self.family,
            NETDEV_CMD_DEV_GET,
            NETDEV_A_DEV_IFINDEX,
            &index,
        )?;
        match attr(&attrs, NETDEV_A_DEV_XDP_FEATURES) {
            Some(v) => v
                .try_into()
                .map(u64::from_ne_bytes)
                .map_err(|_| FeatureError::Malformed("device")),
            None => Ok(0),
        }
    }

    /// Can XDP redirect frames to `ifindex`?
    pub fn takes_redirects(&mut self, ifindex: u32) -> Result<bool, FeatureError> {
        Ok(self.xdp_features(ifindex)? & XDP_ACT_NDO_XMIT != 0)
    }

    /// Sends one request with one attribute and returns the attributes of its answer.
    fn ask(
        &mut self,
        what: &'static str,
        family: u16,
        cmd: u8,
        attr_type: u16,
        value: &[u8],
    ) -> Result<Vec<u8>, FeatureError> {
        self.seq = self.seq.wrapping_add(1);
        let request = encode(family, self.seq, cmd, attr_type, value);
        self.socket
            .send(&request, 0)
            .map_err(FeatureError::Socket)?;
        loop {
            let (buf, from) = self.socket.recv_from_full().map_err(FeatureError::Socket)?;
            if from.port_number() != 0 {
                continue;
            }
            match decode(&buf, self.seq) {
                Some(Answer::Attrs(attrs)) => return Ok(attrs),
                Some(Answer::Error(errno)) => {
                    return Err(FeatureError::Refused {
                        what,
                        source: io::Error::from_raw_os_error(errno),
                    })
                }
                Some(Answer::Malformed) => return Err(FeatureError::Malformed(what)),
                None => continue,
            }
        }
    }
}

/// A generic-netlink request with one attribute.
fn encode(family: u16, seq: u32, cmd: u8, attr_type: u16, value: &[u8]) -> Vec<u8> {
    let attr_len = 4 + value.len();
    let padded = attr_len.next_multiple_of(4);
    let len = NLMSG_HDRLEN + GENL_HDRLEN + padded;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&nlmsg::header(len, family, NLM_F_REQUEST, seq));
    m.extend_from_slice(&[cmd, 1, 0, 0]);
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&attr_type.to_ne_bytes());
    m.extend_from_slice(value);
    m.resize(len, 0);
    m
}

/// Whether `buf` holds a well-formed answer to request `seq` (for the fuzz target): its
/// attributes, or an error; `None` if none is in it or it is malformed.
pub fn answer_in(buf: &[u8], seq: u32) -> Option<Result<Vec<u8>, i32>> {
    match decode(buf, seq)? {
        Answer::Attrs(attrs) => Some(Ok(attrs)),
        Answer::Error(errno) => Some(Err(errno)),
        Answer::Malformed => None,
    }
}

/// The kernel's answer to request `seq`.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// The attributes after the generic-netlink header.
    Attrs(Vec<u8>),
    /// NLMSG_ERROR with a non-zero errno (positive).
    Error(i32),
    Malformed,
}

/// The answer to `seq` in `buf` (`None`: none in it).
fn decode(buf: &[u8], seq: u32) -> Option<Answer> {
    for m in nlmsg::messages(buf) {
        let Ok(m) = m else {
            return Some(Answer::Malformed);
        };
        if m.seq != seq {
            continue;
        }
        return Some(match m.kind {
            NLMSG_ERROR => match nlmsg::error_code(m.body) {
                Some(0) | None => Answer::Malformed,
                Some(errno) => Answer::Error(errno),
            },
            _ => match m.body.get(GENL_HDRLEN..) {
                Some(attrs) => Answer::Attrs(attrs.to_vec()),
                None => Answer::Malformed,
            },
        });
    }
    None
}

/// The payload of the first attribute of type `want` in `attrs`.
fn attr(mut attrs: &[u8], want: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes(attrs.get(0..2)?.try_into().ok()?));
        // The top two bits of the type are flags (nested, byte order).
        let kind = u16::from_ne_bytes(attrs.get(2..4)?.try_into().ok()?) & 0x3fff;
        if len < 4 {
            return None;
        }
        let payload = attrs.get(4..len)?;
        if kind == want {
            return Some(payload);
        }
        attrs = attrs.get(len.next_multiple_of(4).min(attrs.len())..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(seq: u32, kind: u16, body: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn a_request_is_one_padded_attribute_after_the_headers() {
        let m = encode(
            0x1c,
            7,
            NETDEV_CMD_DEV_GET,
            NETDEV_A_DEV_IFINDEX,
            &5u32.to_ne_bytes(),
        );
        assert_eq!(m.len(), 16 + 4 + 8);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 28);
        assert_eq!(m[16], NETDEV_CMD_DEV_GET);
        let n = encode(
            GENL_ID_CTRL,
            1,
            CTRL_CMD_GETFAMILY,
            CTRL_ATTR_FAMILY_NAME,
            b"netdev\0",
        );
        assert_eq!(
            n.len(),
            16 + 4 + 12,
            "7 bytes of name pad to 8, after 4 of header"
        );
        assert_eq!(u16::from_ne_bytes(n[20..22].try_into().unwrap()), 11);
    }

    #[test]
    fn answers_are_matched_by_sequence_and_errors_kept() {
        let mut attrs = Vec::new();
        attrs.extend_from_slice(&12u16.to_ne_bytes());
        attrs.extend_from_slice(&NETDEV_A_DEV_XDP_FEATURES.to_ne_bytes());
        attrs.extend_from_slice(&(XDP_ACT_NDO_XMIT | 1).to_ne_bytes());
        let mut body = vec![1, 1, 0, 0];
        body.extend_from_slice(&attrs);
        let mut buf = reply(3, 0x1c, &[1, 1, 0, 0]);
        buf.extend(reply(4, 0x1c, &body));
        assert_eq!(decode(&buf, 4), Some(Answer::Attrs(attrs.clone())));
        assert_eq!(decode(&buf, 5), None);
        let v = attr(&attrs, NETDEV_A_DEV_XDP_FEATURES).unwrap();
        assert_eq!(
            u64::from_ne_bytes(v.try_into().unwrap()) & XDP_ACT_NDO_XMIT,
            XDP_ACT_NDO_XMIT
        );
        assert_eq!(attr(&attrs, 9), None);
        let err = reply(6, NLMSG_ERROR, &(-libc::ENODEV).to_ne_bytes());
        assert_eq!(decode(&err, 6), Some(Answer::Error(libc::ENODEV)));
    }

    #[test]
    fn lengths_that_lie_do_not_read_past_the_buffer() {
        let mut bad = reply(1, 0x1c, &[1, 1, 0, 0]);
        bad[0..4].copy_from_slice(&4096u32.to_ne_bytes());
        assert_eq!(decode(&bad, 1), Some(Answer::Malformed));
        assert_eq!(decode(&bad[..10], 1), None);
        assert_eq!(attr(&[200, 0, 3, 0, 1, 2], 3), None);
        assert_eq!(attr(&[2, 0, 3, 0], 3), None);
    }
}
