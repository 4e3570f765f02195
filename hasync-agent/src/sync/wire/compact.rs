//! The 1.2 session record ([`RecordLayout::V1_2`](super::RecordLayout::V1_2)): variable
//! length, only what the peer needs. A first byte says what follows: IPv4 addresses take 4
//! bytes, the TCP flags and sequence state appear only when known, and the numbers are LEB128
//! varints (a one-way UDP session takes 26 to 30 bytes, against 112 in 1.1). The 1.3 record
//! ([`RecordLayout::V1_3`](super::RecordLayout::V1_3)) is the same, with the owner's admission
//! ticket last when the session is embryonic (one more bit in the first byte).
//!
//! Decoding is strict: a record has exactly one encoding (minimal varints, the short form
//! whenever it fits, unknown bits refused), so what decodes encodes to the same bytes again.

use hasync_common::{FlowKey, MemberId, ZoneId};

use super::{Op, Reader, Record, TcpState, WireError};

/// Bits of a record's first byte.
mod bits {
    /// The owner removed the session (else: insert or update it).
    pub const DELETE: u8 = 1 << 0;
    /// Both addresses are a single word (IPv4): 4 bytes each instead of 16.
    pub const SHORT_ADDRESSES: u8 = 1 << 1;
    /// The TCP flags seen per direction follow (2 bytes).
    pub const TCP_FLAGS: u8 = 1 << 2;
    /// The TCP sequence state follows.
    pub const TCP_STATE: u8 = 1 << 3;
    /// The owner's admission ticket follows, last (1.3 on; an embryonic session's).
    pub const TICKET: u8 = 1 << 4;
    /// The bits of 1.2.
    pub const V1_2: u8 = DELETE | SHORT_ADDRESSES | TCP_FLAGS | TCP_STATE;
    /// The bits of 1.3.
    pub const V1_3: u8 = V1_2 | TICKET;
}

/// Bytes of a varint of a `bits`-bit number, at most.
const fn varint_max(bits: usize) -> usize {
    bits.div_ceil(7)
}

/// Largest encoding of one record: first byte, family and protocol, long addresses, ports,
/// state and owner, TCP flags, the varints (flags, zone, version, age, idle, 4 counters) and
/// the TCP sequence state (track bytes, two window varints, two sequence numbers): a 1.2
/// record. A 1.2 peer fills its frames by this bound, so it must stay as it is.
pub const MAX_BYTES_V1_2: usize = 1
    + 2
    + 32
    + 4
    + 2
    + 2
    + 2 * varint_max(16)
    + 3 * varint_max(32)
    + 4 * varint_max(64)
    + 2
    + 2 * varint_max(16)
    + 8;

/// Largest encoding of one 1.3 record: a 1.2 record and the ticket.
pub const MAX_BYTES: usize = MAX_BYTES_V1_2 + varint_max(32);

/// Smallest encoding of one record (an IPv4 delete with every number zero).
pub const MIN_BYTES: usize = 1 + 2 + 8 + 4 + 2 + 5 + 4;

/// The addresses fit one word each (the other three are zero in both).
fn short_addresses(key: &FlowKey) -> bool {
    let rest = |a: &[u32; 4]| a[1..].iter().all(|w| *w == 0);
    rest(&key.addr_lo) && rest(&key.addr_hi)
}

fn put_varint(w: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        w.push((v as u8) | 0x80);
        v >>= 7;
    }
    w.push(v as u8);
}

/// Appends the compact encoding of `rec` to `w`: 1.3, or 1.2 when `rec` has no ticket.
pub fn encode(rec: &Record, w: &mut Vec<u8>) {
    let Record {
        op,
        key,
        state,
        owner,
        flags,
        zone,
        tcp_flags,
        version,
        age_ms,
        idle_ms,
        packets,
        bytes,
        tcp,
        ticket,
    } = *rec;
    let short = short_addresses(&key);
    let with_tcp = tcp != TcpState::default();
    let with_flags = tcp_flags != [0; 2];
    let bit = |on: bool, b: u8| if on { b } else { 0 };
    let head = bit(op == Op::Delete, bits::DELETE)
        | bit(short, bits::SHORT_ADDRESSES)
        | bit(with_flags, bits::TCP_FLAGS)
        | bit(with_tcp, bits::TCP_STATE)
        | bit(ticket.is_some(), bits::TICKET);
    w.extend_from_slice(&[head, key.family, key.proto]);
    let words = if short { 1 } else { 4 };
    for addr in [&key.addr_lo, &key.addr_hi] {
        for word in &addr[..words] {
            // Addresses are kept in network byte order in memory already.
            w.extend_from_slice(&word.to_ne_bytes());
        }
    }
    w.extend_from_slice(&key.port_lo.to_ne_bytes());
    w.extend_from_slice(&key.port_hi.to_ne_bytes());
    w.extend_from_slice(&[state, owner.0]);
    if with_flags {
        w.extend_from_slice(&tcp_flags);
    }
    let numbers = [flags.into(), zone.0.into(), version.into()];
    let times = [age_ms.into(), idle_ms.into()];
    for v in numbers.into_iter().chain(times).chain(packets).chain(bytes) {
        put_varint(w, v);
    }
    if with_tcp {
        w.extend_from_slice(&tcp.track);
        for v in tcp.max_win {
            put_varint(w, v.into());
        }
        for v in tcp.seq_end {
            w.extend_from_slice(&v.to_be_bytes());
        }
    }
    if let Some(t) = ticket {
        put_varint(w, t.into());
    }
}

impl Reader<'_> {
    /// A minimal LEB128 varint of at most `bits` bits.
    fn varint(&mut self, bits: u32, what: &'static str) -> Result<u64, WireError> {
        let mut v = 0u64;
        for i in 0..bits.div_ceil(7) {
            let [b] = self.array(what)?;
            let shift = 7 * i;
            // The last byte a `bits`-bit number may take holds only its top bits.
            if bits - shift < 8 && u32::from(b) >> (bits - shift) != 0 {
                return Err(WireError::VarintOverflow(what));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(WireError::VarintNotMinimal(what));
                }
                return Ok(v);
            }
        }
        Err(WireError::VarintOverflow(what))
    }

    fn var_u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        // At most 16 bits: checked by `varint`.
        Ok(self.varint(16, what)? as u16)
    }

    fn var_u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        // At most 32 bits: checked by `varint`.
        Ok(self.varint(32, what)? as u32)
    }

    fn var_u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        self.varint(64, what)
    }
}

fn decode_key(r: &mut Reader<'_>, short: bool) -> Result<FlowKey, WireError> {
    let [family, proto] = r.array("record family and protocol")?;
    let mut key = FlowKey {
        family,
        proto,
        ..FlowKey::default()
    };
    let words = if short { 1 } else { 4 };
    for addr in [&mut key.addr_lo, &mut key.addr_hi] {
        for word in &mut addr[..words] {
            *word = u32::from_ne_bytes(r.array("address")?);
        }
    }
    if !short && short_addresses(&key) {
        return Err(WireError::NotCanonical(
            "single-word addresses in the long form",
        ));
    }
    key.port_lo = u16::from_ne_bytes(r.array("port")?);
    key.port_hi = u16::from_ne_bytes(r.array("port")?);
    Ok(key)
}

fn decode_tcp(r: &mut Reader<'_>) -> Result<TcpState, WireError> {
    let tcp = TcpState {
        track: r.array("tcp track")?,
        max_win: [r.var_u16("tcp window")?, r.var_u16("tcp window")?],
        seq_end: [r.u32("tcp sequence")?, r.u32("tcp sequence")?],
    };
    if tcp == TcpState::default() {
        return Err(WireError::NotCanonical("an empty TCP sequence state sent"));
    }
    Ok(tcp)
}

/// Decodes one record: 1.3 when `tickets`, else 1.2.
pub fn decode(r: &mut Reader<'_>, tickets: bool) -> Result<Record, WireError> {
    let [head] = r.array("record header")?;
    let known = if tickets { bits::V1_3 } else { bits::V1_2 };
    if head & !known != 0 {
        return Err(WireError::UnknownRecordBits(head & !known));
    }
    let key = decode_key(r, head & bits::SHORT_ADDRESSES != 0)?;
    let [state, owner] = r.array("record state and owner")?;
    let tcp_flags = if head & bits::TCP_FLAGS != 0 {
        let f = r.array("tcp flags")?;
        if f == [0; 2] {
            return Err(WireError::NotCanonical("empty TCP flags sent"));
        }
        f
    } else {
        [0; 2]
    };
    Ok(Record {
        op: if head & bits::DELETE != 0 {
            Op::Delete
        } else {
            Op::Upsert
        },
        key,
        state,
        owner: MemberId(owner),
        tcp_flags,
        flags: r.var_u16("flags")?,
        zone: ZoneId(r.var_u16("zone")?),
        version: r.var_u32("version")?,
        age_ms: r.var_u32("age")?,
        idle_ms: r.var_u32("idle")?,
        packets: [r.var_u64("packets")?, r.var_u64("packets")?],
        bytes: [r.var_u64("bytes")?, r.var_u64("bytes")?],
        tcp: if head & bits::TCP_STATE != 0 {
            decode_tcp(r)?
        } else {
            TcpState::default()
        },
        ticket: if head & bits::TICKET != 0 {
            Some(r.var_u32("ticket")?)
        } else {
            None
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint_of(bytes: &[u8], bits: u32) -> Result<u64, WireError> {
        let mut r = Reader(bytes);
        let v = r.varint(bits, "v")?;
        assert!(r.0.is_empty(), "{bytes:?} left {:?}", r.0);
        Ok(v)
    }

    #[test]
    fn varints_round_trip_at_every_width_edge() {
        for (bits, max) in [
            (16, u64::from(u16::MAX)),
            (32, u32::MAX.into()),
            (64, u64::MAX),
        ] {
            for v in [0, 1, 127, 128, 16_383, 16_384, max - 1, max] {
                let mut w = Vec::new();
                put_varint(&mut w, v);
                assert!(w.len() <= varint_max(bits as usize), "{v}: {w:?}");
                assert_eq!(varint_of(&w, bits), Ok(v), "{v} in {bits} bits");
            }
        }
    }

    #[test]
    fn varints_that_overflow_or_are_not_minimal_are_refused() {
        let over = WireError::VarintOverflow("v");
        let long = WireError::VarintNotMinimal("v");
        for (bytes, bits, err) in [
            // 65,536 does not fit 16 bits.
            (&[0x80, 0x80, 0x04][..], 16, over.clone()),
            // A continuation past the last byte a u32 may take.
            (&[0xff, 0xff, 0xff, 0xff, 0x8f, 0x01][..], 32, over.clone()),
            (&[0xff; 11][..], 64, over.clone()),
            (&[0x80, 0x00][..], 32, long.clone()),
            (&[0x81, 0x80, 0x00][..], 64, long),
            (&[0x80][..], 32, WireError::Truncated("v")),
        ] {
            assert_eq!(varint_of(bytes, bits), Err(err), "{bytes:?}");
        }
    }
}
