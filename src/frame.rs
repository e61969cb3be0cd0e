//! Outbound bytes, encoded once and shared.
//!
//! A notification becomes one [`Frame`] (WebSocket header + payload in one buffer) behind an
//! `Arc`; every recipient's send queue holds a clone of the pointer, never a copy of the bytes.
//! HTTP responses and control frames travel the same queues as `Frame`s too, so a
//! connection has exactly one ordered output stream.
//!
//! Server-Sent Events sessions need the same notification in another encoding: the first of
//! them to receive a frame builds that form and stores it in the frame, and every other one
//! (on any loop) shares it. A broadcast to N event streams encodes once, and a frame no event
//! stream receives pays one empty slot.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::ids::StreamPos;
use crate::sse;

/// Bytes ready for the socket.
#[derive(Debug)]
pub struct Frame {
    pub bytes: Box<[u8]>,
    /// When the notification entered herald; `None` for control frames and HTTP responses,
    /// which are not counted as deliveries.
    pub born: Option<Instant>,
    /// The notification's place in its stream, when history is on.
    pub stream: Option<StreamPos>,
    /// This notification as a Server-Sent Event, once an event stream has needed it: with its
    /// `id:` line, for streams it is the user's own stream position, and without, for streams
    /// that receive it as a topic's (see [`Frame::event_stream_form`]).
    event: OnceLock<SharedFrame>,
    event_without_id: OnceLock<SharedFrame>,
}

pub type SharedFrame = Arc<Frame>;

impl Frame {
    fn shared(bytes: Box<[u8]>, born: Option<Instant>, stream: Option<StreamPos>) -> SharedFrame {
        Arc::new(Frame { bytes, born, stream, event: OnceLock::new(), event_without_id: OnceLock::new() })
    }

    /// The payload of a frame this module encoded as a WebSocket frame.
    pub fn payload(&self) -> &[u8] {
        &self.bytes[header_len_of(&self.bytes).min(self.bytes.len())..]
    }

    /// The same notification as a Server-Sent Event (same `born`, so it counts as the same
    /// delivery), built on the first call and shared afterwards; the flag says whether this
    /// call built it. Only for notification frames: the payload is read past the WebSocket
    /// header.
    ///
    /// With `with_id`, the event carries an `id:` line with its stream id when history gave it
    /// one: what an EventSource sends back as `Last-Event-ID`, which resumes the user's stream.
    /// A stream receiving the notification as a topic's asks without: an event with no `id:`
    /// leaves the client's last event id as it was, so a topic's position can never be sent
    /// back as if it were one in the user's stream.
    pub fn event_stream_form(&self, with_id: bool) -> (&SharedFrame, bool) {
        let id = self.stream.filter(|_| with_id);
        let cache = if id.is_some() { &self.event } else { &self.event_without_id };
        let mut built = false;
        let event = cache.get_or_init(|| {
            built = true;
            let id = id.map(|pos| pos.render());
            let event = sse::encode_event(self.payload(), id.as_deref());
            Frame::shared(event.into_boxed_slice(), self.born, self.stream)
        });
        (event, built)
    }
}

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Length of the server-to-client (unmasked) header for a payload of `len` bytes.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// Header length of a frame this module encoded (server frames are never masked).
pub fn header_len_of(encoded: &[u8]) -> usize {
    match encoded.get(1).map(|b| b & 0x7F) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    }
}

/// Appends an unmasked, final frame header to `out`.
pub fn write_header(out: &mut Vec<u8>, opcode: u8, len: usize) {
    out.push(0x80 | opcode);
    match len {
        0..=125 => out.push(len as u8),
        126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

fn control(opcode: u8, payload: &[u8]) -> SharedFrame {
    debug_assert!(payload.len() <= 125, "control frames carry at most 125 bytes");
    let mut out = Vec::with_capacity(2 + payload.len());
    write_header(&mut out, opcode, payload.len());
    out.extend_from_slice(payload);
    Frame::shared(out.into_boxed_slice(), None, None)
}

/// A text frame for a notification; `born` feeds the delivery-latency histogram.
pub fn notification(payload: &[u8], born: Instant) -> SharedFrame {
    notification_in_stream(payload, born, None)
}

/// A notification's frame that knows its place in its stream (history on).
pub fn notification_in_stream(payload: &[u8], born: Instant, stream: Option<StreamPos>) -> SharedFrame {
    let mut out = Vec::with_capacity(header_len(payload.len()) + payload.len());
    write_header(&mut out, OP_TEXT, payload.len());
    out.extend_from_slice(payload);
    Frame::shared(out.into_boxed_slice(), Some(born), stream)
}

/// A text frame that is a reply to one client (pong, error), not a delivery.
pub fn reply_text(payload: &[u8]) -> SharedFrame {
    let mut out = Vec::with_capacity(header_len(payload.len()) + payload.len());
    write_header(&mut out, OP_TEXT, payload.len());
    out.extend_from_slice(payload);
    Frame::shared(out.into_boxed_slice(), None, None)
}

pub fn ping() -> SharedFrame {
    control(OP_PING, b"")
}

/// Echoes a client's ping payload (at most 125 bytes, checked by the inbound parser).
pub fn pong(payload: &[u8]) -> SharedFrame {
    control(OP_PONG, &payload[..payload.len().min(125)])
}

/// A close frame with `code` and a short reason (truncated to fit the 125-byte limit on a
/// character boundary).
pub fn close(code: u16, reason: &str) -> SharedFrame {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    control(OP_CLOSE, &payload)
}

/// Raw bytes (an HTTP response) wrapped for the send queue.
pub fn raw(bytes: Vec<u8>) -> SharedFrame {
    Frame::shared(bytes.into_boxed_slice(), None, None)
}

/// The event-stream keepalive comment (one shared buffer for every stream).
pub fn event_stream_ping() -> SharedFrame {
    static PING: OnceLock<SharedFrame> = OnceLock::new();
    PING.get_or_init(|| raw(sse::PING.to_vec())).clone()
}

/// An event stream's last words: a comment with the reason it ends (an event stream has no
/// close frame; the end of the response body is the close).
pub fn event_stream_close(reason: &str) -> SharedFrame {
    raw(sse::comment(&format!("close {reason}")))
}

/// Close codes herald sends (RFC 6455 §7.4.1 and the registry).
pub mod code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    /// Seed 000's "unauthorized".
    pub const UNAUTHORIZED_4401: u16 = 4401;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_stream_form_is_built_once_and_shared() {
        let born = Instant::now();
        let json = br#"{"type":"t","payload":{"n":1}}"#;
        let f = notification(json, born);
        let (first, built) = f.event_stream_form(true);
        assert!(built);
        assert_eq!(&first.bytes[..], &sse::encode_event(json, None)[..]);
        assert_eq!(first.born, Some(born), "an event is the same delivery as its frame");
        for _ in 0..1000 {
            let (again, built) = f.event_stream_form(true);
            assert!(!built);
            assert!(Arc::ptr_eq(first, again));
        }
        // Frames cloned to other loops share the cache: built once across threads.
        let g = notification(&[b'x'; 300], born);
        let built_total: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4).map(|_| s.spawn(|| usize::from(g.event_stream_form(true).1))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(built_total, 1);
        let long = notification(&[b'y'; 70_000], born);
        assert_eq!(long.payload().len(), 70_000);
        assert_eq!(long.event_stream_form(true).0.bytes.len(), 70_000 + 8);
    }

    #[test]
    fn a_notification_with_a_stream_position_has_it_as_its_event_id() {
        let pos = StreamPos { epoch: 5, offset: 42 };
        let f = notification_in_stream(b"{}", Instant::now(), Some(pos));
        let (event, _) = f.event_stream_form(true);
        assert_eq!(&event.bytes[..], format!("id: {}\ndata: {{}}\n\n", pos.render()).as_bytes());
        assert_eq!(event.stream, Some(pos));
        // As a topic's notification, the same frame is an event without an id.
        let (anonymous, built) = f.event_stream_form(false);
        assert!(built);
        assert_eq!(&anonymous.bytes[..], b"data: {}\n\n");
        assert!(Arc::ptr_eq(event, f.event_stream_form(true).0));
    }

    #[test]
    fn headers_use_the_shortest_length_form() {
        let f = notification(&[b'x'; 125], Instant::now());
        assert_eq!(&f.bytes[..2], &[0x81, 125]);
        let f = notification(&[b'x'; 126], Instant::now());
        assert_eq!(&f.bytes[..4], &[0x81, 126, 0, 126]);
        let f = notification(&vec![b'x'; 70_000], Instant::now());
        assert_eq!(f.bytes[1], 127);
        assert_eq!(u64::from_be_bytes(f.bytes[2..10].try_into().unwrap()), 70_000);
        assert_eq!(f.bytes.len(), 10 + 70_000);
    }

    #[test]
    fn close_frames_carry_code_and_bounded_reason() {
        let f = close(1008, "slow consumer");
        assert_eq!(f.bytes[0], 0x88);
        assert_eq!(&f.bytes[2..4], &1008u16.to_be_bytes());
        assert_eq!(&f.bytes[4..], b"slow consumer");
        let long = "é".repeat(100);
        let f = close(1000, &long);
        assert!(f.bytes.len() <= 127);
        assert!(std::str::from_utf8(&f.bytes[4..]).is_ok());
    }
}
