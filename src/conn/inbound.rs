//! Client-to-server WebSocket frames: bytes in, [`Inbound`] events out, no I/O.
//!
//! Clients of a notification gateway send little (pings, acks, subscriptions), so the parser
//! keeps nothing per connection until a frame arrives split across reads; only then are
//! the bytes of that one frame kept, never more than `max_message + 14`. Every frame header is
//! checked before its payload is buffered: a declared size over the limit closes with 1009
//! without reading it, so a client-supplied length is never trusted with memory.

use crate::frame::code;

/// A complete client message or control frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    Text(&'a str),
    Ping(&'a [u8]),
    Pong,
    /// The client's close frame: its code, if it sent one.
    Close(Option<u16>),
}

/// A protocol violation, with the close code that answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

impl Violation {
    const fn new(code: u16, reason: &'static str) -> Violation {
        Violation { code, reason }
    }
}

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Longest frame header a client can send: 2 + 8 (length) + 4 (mask).
const MAX_HEADER: usize = 14;

/// What the caller wants after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop parsing (the connection is closing); remaining bytes are discarded.
    Stop,
}

/// Per-connection parser state: one pointer, null unless a frame or message is in flight.
#[derive(Debug, Default)]
pub struct FrameReader {
    carry: Option<Box<Carry>>,
}

/// What a connection carries between reads, allocated only while it carries something.
#[derive(Debug, Default)]
struct Carry {
    /// Bytes of one incomplete frame, carried to the next read.
    partial: Vec<u8>,
    /// Payload of a fragmented text message still being assembled.
    fragments: Vec<u8>,
    /// True between a non-final text frame and the final continuation.
    in_fragmented: bool,
}

struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

impl FrameReader {
    /// Bytes held for an incomplete frame or message (for memory accounting).
    pub fn buffered(&self) -> usize {
        self.carry.as_ref().map_or(0, |c| c.partial.capacity() + c.fragments.capacity())
    }

    fn carry(&mut self) -> &mut Carry {
        self.carry.get_or_insert_with(Box::default)
    }

    fn in_fragmented(&self) -> bool {
        self.carry.as_ref().is_some_and(|c| c.in_fragmented)
    }

    /// Frees the carry once nothing is in flight, so idle connections hold no buffer.
    fn release_if_idle(&mut self) {
        if self.carry.as_ref().is_some_and(|c| c.partial.is_empty() && !c.in_fragmented) {
            self.carry = None;
        }
    }

    /// Parses `input` (a fresh read; unmasked in place), calling `on_event` for each complete
    /// event. Returns a violation when the client broke the protocol; the caller closes with
    /// its code.
    pub fn feed(
        &mut self,
        input: &mut [u8],
        max_message: usize,
        mut on_event: impl FnMut(Inbound<'_>) -> Flow,
    ) -> Result<Flow, Violation> {
        let result = self.feed_inner(input, max_message, &mut on_event);
        self.release_if_idle();
        result
    }

    fn feed_inner(
        &mut self,
        input: &mut [u8],
        max_message: usize,
        on_event: &mut impl FnMut(Inbound<'_>) -> Flow,
    ) -> Result<Flow, Violation> {
        if self.carry.as_ref().is_none_or(|c| c.partial.is_empty()) {
            let (consumed, flow) = self.parse(input, max_message, on_event)?;
            if flow == Flow::Continue && consumed < input.len() {
                self.carry().partial.extend_from_slice(&input[consumed..]);
            }
            return Ok(flow);
        }
        let mut carried = std::mem::take(&mut self.carry().partial);
        carried.extend_from_slice(input);
        let (consumed, flow) = self.parse(&mut carried, max_message, on_event)?;
        if flow == Flow::Continue && consumed < carried.len() {
            carried.drain(..consumed);
            // A burst appended to a partial frame can leave a large buffer behind.
            if carried.capacity() > 4 * (max_message + MAX_HEADER) {
                carried.shrink_to_fit();
            }
            self.carry().partial = carried;
        }
        Ok(flow)
    }

    /// Parses as many whole frames from `buf` as it holds; returns bytes consumed.
    fn parse(
        &mut self,
        buf: &mut [u8],
        max_message: usize,
        on_event: &mut impl FnMut(Inbound<'_>) -> Flow,
    ) -> Result<(usize, Flow), Violation> {
        let mut pos = 0;
        while pos < buf.len() {
            let Some(header) = parse_header(&buf[pos..], max_message)? else {
                break;
            };
            let frame_len = header.header_len + header.payload_len;
            if buf.len() - pos < frame_len {
                break;
            }
            let payload = &mut buf[pos + header.header_len..pos + frame_len];
            unmask(payload, header.mask);
            pos += frame_len;
            if self.frame(&header, payload, max_message, on_event)? == Flow::Stop {
                return Ok((pos, Flow::Stop));
            }
        }
        Ok((pos, Flow::Continue))
    }

    fn frame(
        &mut self,
        header: &Header,
        payload: &[u8],
        max_message: usize,
        on_event: &mut impl FnMut(Inbound<'_>) -> Flow,
    ) -> Result<Flow, Violation> {
        match header.opcode {
            OP_PING => Ok(on_event(Inbound::Ping(payload))),
            OP_PONG => Ok(on_event(Inbound::Pong)),
            OP_CLOSE => Ok(on_event(Inbound::Close(parse_close(payload)?))),
            OP_TEXT if self.in_fragmented() => {
                Err(Violation::new(code::PROTOCOL_ERROR, "new message inside a fragmented one"))
            }
            OP_TEXT if header.fin => Ok(on_event(Inbound::Text(as_utf8(payload)?))),
            OP_TEXT => {
                let carry = self.carry();
                carry.in_fragmented = true;
                carry.fragments.clear();
                carry.fragments.extend_from_slice(payload);
                Ok(Flow::Continue)
            }
            OP_CONTINUATION if !self.in_fragmented() => {
                Err(Violation::new(code::PROTOCOL_ERROR, "continuation without a message"))
            }
            OP_CONTINUATION => {
                let carry = self.carry();
                if carry.fragments.len() + payload.len() > max_message {
                    return Err(Violation::new(code::TOO_BIG, "message too big"));
                }
                carry.fragments.extend_from_slice(payload);
                if !header.fin {
                    return Ok(Flow::Continue);
                }
                carry.in_fragmented = false;
                let message = std::mem::take(&mut carry.fragments);
                Ok(on_event(Inbound::Text(as_utf8(&message)?)))
            }
            // Binary is rejected at the header; anything else is a reserved opcode.
            _ => Err(Violation::new(code::PROTOCOL_ERROR, "reserved opcode")),
        }
    }
}

fn as_utf8(payload: &[u8]) -> Result<&str, Violation> {
    std::str::from_utf8(payload).map_err(|_| Violation::new(code::INVALID_PAYLOAD, "text is not UTF-8"))
}

/// Validates a close frame's payload (RFC 6455 §5.5.1, §7.4).
fn parse_close(payload: &[u8]) -> Result<Option<u16>, Violation> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(Violation::new(code::PROTOCOL_ERROR, "close payload of one byte")),
        _ => {
            let status = u16::from_be_bytes([payload[0], payload[1]]);
            let valid = matches!(status, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(Violation::new(code::PROTOCOL_ERROR, "invalid close code"));
            }
            as_utf8(&payload[2..])?;
            Ok(Some(status))
        }
    }
}

/// Reads a frame header, or `None` when more bytes are needed. Everything the header alone
/// can condemn is condemned here, before any payload is buffered.
fn parse_header(buf: &[u8], max_message: usize) -> Result<Option<Header>, Violation> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    if b0 & 0x70 != 0 {
        return Err(Violation::new(code::PROTOCOL_ERROR, "reserved bits set"));
    }
    if b1 & 0x80 == 0 {
        return Err(Violation::new(code::PROTOCOL_ERROR, "client frames must be masked"));
    }
    let is_control = opcode & 0x08 != 0;
    match opcode {
        OP_BINARY => return Err(Violation::new(code::UNSUPPORTED_DATA, "binary messages are not accepted")),
        OP_CONTINUATION | OP_TEXT | OP_CLOSE | OP_PING | OP_PONG => {}
        _ => return Err(Violation::new(code::PROTOCOL_ERROR, "reserved opcode")),
    }
    let short_len = (b1 & 0x7F) as usize;
    if is_control && (!fin || short_len > 125) {
        return Err(Violation::new(code::PROTOCOL_ERROR, "invalid control frame"));
    }
    let (payload_len, len_bytes) = match short_len {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 2)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut len = [0u8; 8];
            len.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(len), 8)
        }
        n => (n as u64, 0),
    };
    if payload_len > max_message as u64 {
        return Err(Violation::new(code::TOO_BIG, "message too big"));
    }
    let header_len = 2 + len_bytes + 4;
    if buf.len() < header_len {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[2 + len_bytes..header_len]);
    Ok(Some(Header { fin, opcode, mask, header_len, payload_len: payload_len as usize }))
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A masked client frame, as a browser would send it.
    pub(crate) fn client_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        wsframe::encode_into(&mut out, first_byte, payload, Some(wsframe::FIXED_MASK));
        out
    }

    #[derive(Debug, PartialEq)]
    enum Owned {
        Text(String),
        Ping(Vec<u8>),
        Pong,
        Close(Option<u16>),
    }

    fn feed_all(reader: &mut FrameReader, bytes: &[u8], chunk: usize) -> Result<Vec<Owned>, Violation> {
        let mut events = Vec::new();
        for piece in bytes.chunks(chunk.max(1)) {
            let mut piece = piece.to_vec();
            reader.feed(&mut piece, 512, |event| {
                events.push(match event {
                    Inbound::Text(t) => Owned::Text(t.to_string()),
                    Inbound::Ping(p) => Owned::Ping(p.to_vec()),
                    Inbound::Pong => Owned::Pong,
                    Inbound::Close(c) => Owned::Close(c),
                });
                Flow::Continue
            })?;
        }
        Ok(events)
    }

    #[test]
    fn frames_split_at_every_byte_still_parse() {
        let mut bytes = client_frame(0x81, b"hello");
        bytes.extend(client_frame(0x89, b"p"));
        bytes.extend(client_frame(0x01, b"fra"));
        bytes.extend(client_frame(0x80, "gmént".as_bytes()));
        bytes.extend(client_frame(0x88, &1000u16.to_be_bytes()));
        for chunk in [1, 2, 3, 7, 100] {
            let mut reader = FrameReader::default();
            let events = feed_all(&mut reader, &bytes, chunk).unwrap();
            assert_eq!(reader.buffered(), 0, "an idle reader holds no buffer");
            assert_eq!(
                events,
                vec![
                    Owned::Text("hello".into()),
                    Owned::Ping(b"p".to_vec()),
                    Owned::Text("fragmént".into()),
                    Owned::Close(Some(1000))
                ]
            );
        }
    }

    fn violation(bytes: &[u8]) -> u16 {
        feed_all(&mut FrameReader::default(), bytes, 64).unwrap_err().code
    }

    #[test]
    fn violations_map_to_their_close_codes() {
        let mut unmasked = client_frame(0x81, b"hi");
        unmasked[1] &= 0x7F;
        assert_eq!(violation(&unmasked), 1002);
        assert_eq!(violation(&client_frame(0x82, b"bin")), 1003);
        assert_eq!(violation(&client_frame(0x81, &[0xff, 0xfe])), 1007);
        assert_eq!(violation(&client_frame(0x81, &[b'a'; 513])), 1009);
        assert_eq!(violation(&client_frame(0xC1, b"rsv")), 1002);
        assert_eq!(violation(&client_frame(0x83, b"")), 1002);
        assert_eq!(violation(&client_frame(0x80, b"cont")), 1002);
        assert_eq!(violation(&client_frame(0x09, b"")), 1002);
        assert_eq!(violation(&client_frame(0x88, &[3])), 1002);
        assert_eq!(violation(&client_frame(0x88, &999u16.to_be_bytes())), 1002);
        let mut two_starts = client_frame(0x01, b"a");
        two_starts.extend(client_frame(0x81, b"b"));
        assert_eq!(violation(&two_starts), 1002);
        let mut too_long_fragments = client_frame(0x01, &[b'a'; 300]);
        too_long_fragments.extend(client_frame(0x80, &[b'a'; 300]));
        assert_eq!(violation(&too_long_fragments), 1009);
    }

    #[test]
    fn an_oversized_length_is_refused_from_the_header_alone() {
        // Only the header of a frame claiming 2^62 bytes: refused without waiting for payload.
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 62).to_be_bytes());
        assert_eq!(violation(&header), 1009);
    }

    #[test]
    fn stop_discards_the_rest() {
        let mut bytes = client_frame(0x88, b"");
        bytes.extend(client_frame(0x81, b"after close"));
        let mut reader = FrameReader::default();
        let mut seen = 0;
        let flow = reader.feed(&mut bytes, 512, |_| {
            seen += 1;
            Flow::Stop
        });
        assert_eq!(flow, Ok(Flow::Stop));
        assert_eq!(seen, 1);
        assert_eq!(reader.buffered(), 0);
    }
}
