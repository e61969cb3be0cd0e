//! The client's side of WebSocket framing (RFC 6455 §5): encoding the frames a browser sends
//! (masked) and decoding the frames a server sends back.
//!
//! herald parses client frames and encodes server frames in its own code; this crate is the
//! other end, shared by everything that plays the client (integration tests, fuzz targets,
//! benches, the unit tests of herald's frame reader, and herald-load) so there is one encoder
//! to trust. It does no I/O and allocates only the frames it returns.
//!
//! Nothing here enforces protocol rules on decode (RSV bits, masking direction, control frame
//! size): [`Header`] reports what is on the wire and the caller decides what to reject, since
//! tests need to see exactly what a server sent and a load generator needs to stop on it.

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A fixed masking key for tests and benches, where reproducible bytes matter more than the
/// unpredictability RFC 6455 §10.3 asks of a real client (which draws a key per frame).
pub const FIXED_MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// The first byte of a frame with no RSV bits: FIN and the opcode's low four bits.
pub const fn first_byte(fin: bool, opcode: u8) -> u8 {
    (if fin { 0x80 } else { 0 }) | (opcode & 0x0F)
}

/// Appends one frame to `out`. `first_byte` goes on the wire as given (FIN, RSV and opcode
/// bits), so a test can send reserved bits or opcodes on purpose. The length takes its
/// shortest encoding (7, 16 or 64 bits). With `mask`, the mask bit is set and the payload is
/// masked with that key, as a client must send it; without, the frame is a server's.
pub fn encode_into(out: &mut Vec<u8>, first_byte: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    out.reserve(payload.len() + 14);
    out.push(first_byte);
    match payload.len() {
        n @ 0..=125 => out.push(mask_bit | n as u8),
        n @ 126..=0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            let start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[start..], key);
        }
        None => out.extend_from_slice(payload),
    }
}

/// One frame with FIN and `opcode` (see [`encode_into`]).
pub fn encode(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(&mut out, first_byte(fin, opcode), payload, mask);
    out
}

/// A final, masked text frame.
pub fn masked_text(text: &[u8], mask: [u8; 4]) -> Vec<u8> {
    encode(true, OP_TEXT, text, Some(mask))
}

/// A masked close frame carrying `code` and no reason.
pub fn masked_close(code: u16, mask: [u8; 4]) -> Vec<u8> {
    encode(true, OP_CLOSE, &code.to_be_bytes(), Some(mask))
}

/// A masked ping frame.
pub fn masked_ping(payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    encode(true, OP_PING, payload, Some(mask))
}

/// XORs `bytes` with `key` in place; masking and unmasking are the same operation.
pub fn apply_mask(bytes: &mut [u8], key: [u8; 4]) {
    for (i, b) in bytes.iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// A frame header exactly as it appeared on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    /// RSV1-3 in place (the first byte's 0x70 bits); non-zero only with an extension.
    pub rsv: u8,
    pub opcode: u8,
    /// The masking key, when the mask bit was set.
    pub mask: Option<[u8; 4]>,
    /// Bytes before the payload: 2, 4 or 10 by the length encoding, plus 4 with a mask.
    pub header_len: usize,
    /// The length the header declares; untrusted, so never allocate by it.
    pub payload_len: u64,
}

impl Header {
    /// Bytes the whole frame takes, or `None` when it cannot fit in memory (the declared
    /// length overflows `usize`): such a frame never completes.
    pub fn frame_len(&self) -> Option<usize> {
        usize::try_from(self.payload_len).ok()?.checked_add(self.header_len)
    }
}

/// Parses the header at the start of `buf`; `None` while its bytes have not all arrived.
/// Needs only the header, so a caller can reject a declared length before the payload comes.
pub fn parse_header(buf: &[u8]) -> Option<Header> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let (len_end, payload_len) = match b1 & 0x7F {
        126 => (4, u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?))),
        127 => (10, u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)),
        n => (2, u64::from(n)),
    };
    let (mask, header_len) = if b1 & 0x80 != 0 {
        (Some(buf.get(len_end..len_end + 4)?.try_into().ok()?), len_end + 4)
    } else {
        (None, len_end)
    };
    Some(Header { fin: b0 & 0x80 != 0, rsv: b0 & 0x70, opcode: b0 & 0x0F, mask, header_len, payload_len })
}

/// One complete frame at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub header: Header,
    /// The payload as sent: still masked when `header.mask` is set (see [`Frame::unmasked`]).
    pub payload: &'a [u8],
    /// Bytes the whole frame took in the buffer.
    pub len: usize,
}

impl Frame<'_> {
    /// The payload with the mask, if any, removed.
    pub fn unmasked(&self) -> Vec<u8> {
        let mut bytes = self.payload.to_vec();
        if let Some(key) = self.header.mask {
            apply_mask(&mut bytes, key);
        }
        bytes
    }
}

/// Decodes the frame at the start of `buf`; `None` until all of it has arrived.
pub fn decode(buf: &[u8]) -> Option<Frame<'_>> {
    let header = parse_header(buf)?;
    let len = header.frame_len()?;
    let payload = buf.get(header.header_len..len)?;
    Some(Frame { header, payload, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_take_their_shortest_encoding() {
        assert_eq!(encode(true, OP_TEXT, b"hi", None), [0x81, 2, b'h', b'i']);
        assert_eq!(encode(true, OP_TEXT, &[b'x'; 125], None)[..2], [0x81, 125]);
        assert_eq!(encode(true, OP_TEXT, &[b'x'; 126], None)[..4], [0x81, 126, 0, 126]);
        assert_eq!(encode(false, OP_BINARY, &[0; 0xFFFF], None)[..4], [0x02, 126, 0xFF, 0xFF]);
        let big = encode(true, OP_TEXT, &[0; 0x10000], Some(FIXED_MASK));
        assert_eq!(big[..10], [0x81, 0x80 | 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(big.len(), 14 + 0x10000);
    }

    #[test]
    fn masked_frames_carry_key_and_masked_payload() {
        let frame = masked_text(b"hello", [1, 2, 3, 4]);
        assert_eq!(frame[..6], [0x81, 0x85, 1, 2, 3, 4]);
        assert_eq!(frame[6..], [b'h' ^ 1, b'e' ^ 2, b'l' ^ 3, b'l' ^ 4, b'o' ^ 1]);
        assert_eq!(masked_close(1000, [0; 4]), [0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8]);
        assert_eq!(masked_ping(b"", [9; 4]), [0x89, 0x80, 9, 9, 9, 9]);
    }

    #[test]
    fn first_byte_is_sent_as_given() {
        let mut out = Vec::new();
        encode_into(&mut out, 0xC1, b"rsv", None);
        assert_eq!(out[..2], [0xC1, 3]);
        assert_eq!(first_byte(false, 0x1F), 0x0F);
    }

    #[test]
    fn decode_round_trips_every_length_encoding() {
        for len in [0, 1, 125, 126, 0xFFFF, 0x10000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            for mask in [None, Some(FIXED_MASK)] {
                let bytes = encode(len % 2 == 0, OP_BINARY, &payload, mask);
                let frame = decode(&bytes).expect("complete frame");
                assert_eq!(frame.len, bytes.len());
                assert_eq!(frame.header.mask, mask);
                assert_eq!(frame.header.fin, len % 2 == 0);
                assert_eq!(frame.header.opcode, OP_BINARY);
                assert_eq!(frame.header.payload_len, len as u64);
                assert_eq!(frame.unmasked(), payload);
            }
        }
    }

    #[test]
    fn decode_waits_for_every_byte() {
        let bytes = encode(true, OP_PING, &[7; 130], Some(FIXED_MASK));
        for end in 0..bytes.len() {
            assert_eq!(decode(&bytes[..end]), None, "{end} of {} bytes", bytes.len());
        }
        let header = parse_header(&bytes[..8]).expect("header complete at 8 bytes");
        assert_eq!((header.header_len, header.payload_len), (8, 130));
        assert_eq!(parse_header(&bytes[..7]), None);
    }

    #[test]
    fn decode_reports_the_wire_as_is() {
        let mut two = vec![0xC9, 1, b'a'];
        two.extend(encode(true, OP_TEXT, b"next", None));
        let frame = decode(&two).expect("first frame");
        assert_eq!((frame.header.rsv, frame.header.opcode, frame.payload, frame.len), (0x40, OP_PING, &b"a"[..], 3));
        let next = decode(&two[frame.len..]).expect("second frame");
        assert_eq!(next.payload, b"next");
    }

    #[test]
    fn absurd_lengths_never_complete() {
        let huge = [0x82, 127, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0];
        let header = parse_header(&huge).expect("header");
        assert_eq!(header.payload_len, u64::MAX);
        assert_eq!(header.frame_len(), None);
        assert_eq!(decode(&huge), None);
    }
}
