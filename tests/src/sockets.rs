//! Socket helpers the netns tests share: the raw packet socket, opened only inside a lab's
//! namespace, and `recvmsg(2)` with the control messages the kernel attaches (a datagram's
//! TTL, a packet socket's VLAN tag).

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd, RawFd},
};

/// An `AF_PACKET` socket in the calling thread's namespace, for `protocol` (in host order; 0:
/// it only sends, it receives nothing). Refused in the host's namespace
/// ([`crate::netns::refuse_host_namespace`]): what sends test frames opens it here, so none can
/// reach the host's own interfaces.
pub fn packet_socket(protocol: u16) -> io::Result<OwnedFd> {
    crate::netns::refuse_host_namespace().map_err(|e| io::Error::other(format!("{e:#}")))?;
    let protocol = i32::from(protocol.to_be());
    // SAFETY: plain socket creation.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just opened, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One control message: its level, its type and its data.
pub struct Control {
    pub level: i32,
    pub kind: i32,
    pub data: Vec<u8>,
}

/// Receives one message on `fd` into `data`; `None` when the socket's receive timeout passed.
/// Returns its length and its control messages.
pub fn recv_with_control(fd: RawFd, data: &mut [u8]) -> io::Result<Option<(usize, Vec<Control>)>> {
    let mut control = [0u64; 32];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is valid; its pointers are set below to live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: every buffer `msg` points at outlives the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Ok(None),
            _ => Err(e),
        };
    }
    let mut out = Vec::new();
    // SAFETY: the CMSG macros walk the control buffer the kernel filled, within its length;
    // each message's data lies inside it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let h = &*c;
            let header = libc::CMSG_LEN(0) as usize;
            let len = (h.cmsg_len as usize).saturating_sub(header);
            let bytes = std::slice::from_raw_parts(libc::CMSG_DATA(c), len);
            out.push(Control {
                level: h.cmsg_level,
                kind: h.cmsg_type,
                data: bytes.to_vec(),
            });
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Some((n as usize, out)))
}
