//! What a notification must be, and what clients may say.
//!
//! A notification is a JSON object with a string `type`, at most `max_bytes` as published.
//! It is delivered byte for byte as published, with `"timestamp"` appended when it has none;
//! the result is encoded straight into its shared WebSocket frame. Client messages are parsed
//! into [`ClientMessage`]. Both use simd-json on a reused scratch copy (simd-json parses in
//! place), so validation allocates nothing but the frame it produces.

use std::time::{Instant, SystemTime};

use std::sync::Arc;

use simd_json::prelude::*;

use crate::ids::{ConnRef, Exclusion, Origin, StreamPos};

use crate::frame::{self, SharedFrame};

/// Why a published message was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    TooLarge,
    NotJson,
    NotAnObject,
    NoType,
}

impl Invalid {
    pub fn describe(self) -> &'static str {
        match self {
            Invalid::TooLarge => "message larger than HERALD_MAX_MESSAGE_BYTES",
            Invalid::NotJson => "message is not valid JSON",
            Invalid::NotAnObject => "message is not a JSON object",
            Invalid::NoType => "message has no string \"type\"",
        }
    }
}

/// Reusable parse state; one per thread that validates messages.
pub struct JsonScratch {
    copy: Vec<u8>,
    buffers: simd_json::Buffers,
}

impl Default for JsonScratch {
    fn default() -> Self {
        JsonScratch { copy: Vec::with_capacity(1024), buffers: simd_json::Buffers::new(1024) }
    }
}

impl JsonScratch {
    /// Parses a copy of `raw` and hands the tape's root to `inspect`.
    fn with_value<R>(&mut self, raw: &[u8], inspect: impl FnOnce(simd_json::tape::Value<'_, '_>) -> R) -> Option<R> {
        self.copy.clear();
        self.copy.extend_from_slice(raw);
        let tape = simd_json::to_tape_with_buffers(&mut self.copy, &mut self.buffers).ok()?;
        Some(inspect(tape.as_value()))
    }
}

/// `2025-01-21T10:30:00.123Z`: RFC 3339, UTC, milliseconds.
pub fn rfc3339_millis(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// A published message that passed validation: the bytes as published (trailing whitespace
/// cut), and whether it already has a `timestamp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Valid<'a> {
    pub raw: &'a [u8],
    pub has_timestamp: bool,
}

/// Checks a published notification: at most `max_bytes` as published, a JSON object with a
/// string `type`. herald's own additions (the timestamp) come after this check, so they can
/// never be what makes a message too large.
pub fn validate_notification<'a>(
    raw: &'a [u8],
    max_bytes: usize,
    scratch: &mut JsonScratch,
) -> Result<Valid<'a>, Invalid> {
    let end = trimmed_end(raw);
    let raw = &raw[..end];
    if raw.len() > max_bytes {
        return Err(Invalid::TooLarge);
    }
    let has_timestamp = scratch
        .with_value(raw, |value| {
            let object = value.as_object().ok_or(Invalid::NotAnObject)?;
            if object.get("type").is_none_or(|t| t.as_str().is_none()) {
                return Err(Invalid::NoType);
            }
            Ok(object.get("timestamp").is_some())
        })
        .ok_or(Invalid::NotJson)??;
    Ok(Valid { raw, has_timestamp })
}

/// Validates a published notification and encodes its frame, adding `timestamp` if absent.
pub fn encode_notification(
    raw: &[u8],
    max_bytes: usize,
    scratch: &mut JsonScratch,
    wall_clock: SystemTime,
    born: Instant,
) -> Result<SharedFrame, Invalid> {
    Ok(frame_valid(validate_notification(raw, max_bytes, scratch)?, wall_clock, born))
}

/// Encodes a validated notification's frame, adding `timestamp` if it has none.
pub fn frame_valid(valid: Valid<'_>, wall_clock: SystemTime, born: Instant) -> SharedFrame {
    if valid.has_timestamp {
        return frame::notification(valid.raw, born);
    }
    frame::notification(&payload_with(valid, wall_clock, None), born)
}

/// Encodes a notification that has a place in its stream (history on): `stream_id` is added,
/// and `timestamp` when absent, stamped with `stored_at` so that live and replayed copies are
/// the same bytes.
pub fn frame_in_stream(valid: Valid<'_>, stored_at: SystemTime, born: Instant, pos: StreamPos) -> SharedFrame {
    frame::notification_in_stream(&payload_with(valid, stored_at, Some(pos)), born, Some(pos))
}

/// The delivered JSON: the object as published with herald's members appended.
fn payload_with(valid: Valid<'_>, wall_clock: SystemTime, pos: Option<StreamPos>) -> Vec<u8> {
    let Valid { raw, has_timestamp } = valid;
    // The object is valid and non-empty (it has "type"), so its last byte is `}` and members
    // can be appended right before it.
    let mut payload = Vec::with_capacity(raw.len() + 64);
    payload.extend_from_slice(&raw[..raw.len() - 1]);
    if !has_timestamp {
        payload.extend_from_slice(b",\"timestamp\":\"");
        payload.extend_from_slice(rfc3339_millis(wall_clock).as_bytes());
        payload.push(b'"');
    }
    if let Some(pos) = pos {
        payload.extend_from_slice(b",\"stream_id\":\"");
        payload.extend_from_slice(pos.render().as_bytes());
        payload.push(b'"');
    }
    payload.push(b'}');
    payload
}

fn trimmed_end(raw: &[u8]) -> usize {
    raw.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1)
}

/// Key under which an [`Exclusion`] travels inside a message through Redis; stripped by
/// every receiving instance before delivery.
const EXCLUSION_KEY: &str = "_herald";

/// Appends `exclusion` to a stamped payload (an object ending in `}`), for Redis transport.
pub fn embed_exclusion(payload: &[u8], exclusion: &Exclusion) -> Vec<u8> {
    if exclusion.is_empty() || payload.last() != Some(&b'}') {
        return payload.to_vec();
    }
    let mut meta = serde_json::Map::new();
    if let Some(users) = &exclusion.users {
        meta.insert("exclude_users".into(), users.iter().map(|u| serde_json::Value::from(&**u)).collect());
    }
    if let Some(Origin { instance, loop_id, conn }) = exclusion.origin {
        meta.insert("origin".into(), format!("{instance:x}:{loop_id}:{}:{}", conn.key, conn.id).into());
    }
    let mut out = Vec::with_capacity(payload.len() + 64);
    out.extend_from_slice(&payload[..payload.len() - 1]);
    out.extend_from_slice(format!(",\"{EXCLUSION_KEY}\":").as_bytes());
    out.extend_from_slice(serde_json::Value::Object(meta).to_string().as_bytes());
    out.push(b'}');
    out
}

/// Takes an embedded exclusion back out of a message from Redis. `None` when there is none
/// (the common case, decided by a byte search without parsing). herald appends the
/// exclusion as the object's last member, so it is cut off byte for byte and the rest of
/// the message stays exactly as published (no re-serialization, no number reformatting).
pub fn strip_exclusion(raw: &[u8]) -> Option<(Vec<u8>, Exclusion)> {
    let marker = format!(",\"{EXCLUSION_KEY}\":");
    let marker = marker.as_bytes();
    let end = raw.iter().rposition(|b| !b.is_ascii_whitespace())?;
    if raw[end] != b'}' {
        return None;
    }
    let start = raw[..end].windows(marker.len()).rposition(|w| w == marker)?;
    let meta: serde_json::Value = serde_json::from_slice(&raw[start + marker.len()..end]).ok()?;
    let users: Option<Arc<[Arc<str>]>> = meta
        .get("exclude_users")
        .and_then(|u| u.as_array())
        .map(|list| list.iter().filter_map(|u| u.as_str().map(Arc::from)).collect());
    let origin = meta.get("origin").and_then(|o| o.as_str()).and_then(|o| {
        let mut parts = o.split(':');
        let instance = u64::from_str_radix(parts.next()?, 16).ok()?;
        let loop_id = parts.next()?.parse().ok()?;
        let key = parts.next()?.parse().ok()?;
        let id = parts.next()?.parse().ok()?;
        Some(Origin { instance, loop_id, conn: ConnRef { key, id } })
    });
    let mut stripped = Vec::with_capacity(start + 1);
    stripped.extend_from_slice(&raw[..start]);
    stripped.push(b'}');
    // Only what herald itself embedded is cut: the remainder must still be a JSON object.
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&stripped).ok()?;
    Some((stripped, Exclusion { users, origin }))
}

/// How a client asked for a pong, so the answer matches the question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PingStyle {
    /// text `ping` → text `pong`
    Text,
    /// `{"action":"ping"}` → `{"action":"pong"}`
    Action,
    /// `{"type":"ping"}` → `{"type":"pong"}`
    Type,
}

impl PingStyle {
    pub fn answer(self) -> &'static [u8] {
        match self {
            PingStyle::Text => b"pong",
            PingStyle::Action => br#"{"action":"pong"}"#,
            PingStyle::Type => br#"{"type":"pong"}"#,
        }
    }

    /// The answer as a frame built once per process: a flood of pings allocates nothing.
    pub fn answer_frame(self) -> SharedFrame {
        static FRAMES: std::sync::OnceLock<[SharedFrame; 3]> = std::sync::OnceLock::new();
        let frames = FRAMES.get_or_init(|| {
            [PingStyle::Text, PingStyle::Action, PingStyle::Type].map(|style| frame::reply_text(style.answer()))
        });
        frames[self as usize].clone()
    }
}

/// A text message from a client, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    Ping(PingStyle),
    /// `{"action":"ack","stream_id":…}` (or seed 001's `notification_id`): the id, as given.
    Ack(Option<String>),
    /// `{"type":"subscribe","topic":…,"since":…}`.
    Subscribe {
        topic: String,
        since: Option<String>,
    },
    Unsubscribe(String),
    SubscribeProject(String),
    UnsubscribeProject(String),
    /// Any other JSON object (relayed on focus-session connections, ignored elsewhere).
    OtherObject,
    /// Not JSON, or JSON that is not an object.
    Unrecognized,
}

/// Parses a client's text message (already UTF-8 checked and size bounded by the frame layer).
pub fn parse_client_message(text: &str, scratch: &mut JsonScratch) -> ClientMessage {
    // ASCII whitespace only: JSON allows no other, and "ping" is a JSON-free word.
    let trimmed = text.trim_matches(|c: char| c.is_ascii_whitespace());
    if trimmed == "ping" {
        return ClientMessage::Ping(PingStyle::Text);
    }
    if !trimmed.starts_with('{') {
        return ClientMessage::Unrecognized;
    }
    scratch
        .with_value(trimmed.as_bytes(), |value| {
            let Some(object) = value.as_object() else {
                return ClientMessage::Unrecognized;
            };
            let field = |name: &str| object.get(name).and_then(|v| v.as_str().map(str::to_owned));
            let id_field = |name: &str| {
                object
                    .get(name)
                    .and_then(|v| v.as_str().map(str::to_owned).or_else(|| v.as_i64().map(|n| n.to_string())))
            };
            let is = |name: &str, expected: &str| object.get(name).is_some_and(|v| v.as_str() == Some(expected));
            if is("action", "ping") {
                ClientMessage::Ping(PingStyle::Action)
            } else if is("action", "ack") {
                ClientMessage::Ack(field("stream_id").or_else(|| id_field("notification_id")))
            } else if is("type", "ping") {
                ClientMessage::Ping(PingStyle::Type)
            } else if is("type", "subscribe") {
                let since = id_field("since");
                field("topic").map_or(ClientMessage::OtherObject, |topic| ClientMessage::Subscribe { topic, since })
            } else if is("type", "unsubscribe") {
                field("topic").map_or(ClientMessage::OtherObject, ClientMessage::Unsubscribe)
            } else if is("type", "subscribe_project") {
                id_field("project_id").map_or(ClientMessage::OtherObject, ClientMessage::SubscribeProject)
            } else if is("type", "unsubscribe_project") {
                id_field("project_id").map_or(ClientMessage::OtherObject, ClientMessage::UnsubscribeProject)
            } else {
                ClientMessage::OtherObject
            }
        })
        .unwrap_or(ClientMessage::Unrecognized)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(raw: &str) -> Result<String, Invalid> {
        let mut scratch = JsonScratch::default();
        let frame = encode_notification(raw.as_bytes(), 512, &mut scratch, SystemTime::UNIX_EPOCH, Instant::now())?;
        let header = crate::frame::header_len(frame.bytes.len() - 2);
        Ok(String::from_utf8(frame.bytes[header..].to_vec()).unwrap())
    }

    #[test]
    fn timestamp_is_appended_when_absent() {
        assert_eq!(
            encode(r#"{"type":"notification","payload":{"title":"hi"}}  "#).unwrap(),
            r#"{"type":"notification","payload":{"title":"hi"},"timestamp":"1970-01-01T00:00:00.000Z"}"#
        );
    }

    #[test]
    fn a_message_with_a_timestamp_is_delivered_byte_for_byte() {
        let raw = r#"{ "type" : "x", "timestamp": "2020-01-01T00:00:00.000Z" }"#;
        assert_eq!(encode(raw).unwrap(), raw);
    }

    #[test]
    fn invalid_messages_are_named() {
        assert_eq!(encode("not json"), Err(Invalid::NotJson));
        assert_eq!(encode(r#"["type"]"#), Err(Invalid::NotAnObject));
        assert_eq!(encode(r#"{"type":7}"#), Err(Invalid::NoType));
        assert_eq!(encode(r#"{"payload":{}}"#), Err(Invalid::NoType));
        assert_eq!(encode(r#"{"type":"x""#), Err(Invalid::NotJson));
        assert_eq!(encode(""), Err(Invalid::NotJson));
        let big = format!(r#"{{"type":"x","p":"{}"}}"#, "a".repeat(600));
        assert_eq!(encode(&big), Err(Invalid::TooLarge));
    }

    #[test]
    fn integers_beyond_64_bits_are_valid_json() {
        // fuzz/regressions/notification/strict-big-integer-refused
        assert!(encode(r#"{"type":"","":{"":66666666666666666666}}"#).is_ok());
        let mut s = JsonScratch::default();
        assert_eq!(parse_client_message(r#"{"":100000000000000000000}"#, &mut s), ClientMessage::OtherObject);
        assert_eq!(parse_client_message("\u{a0}ping", &mut s), ClientMessage::Unrecognized);
    }

    #[test]
    fn a_nested_timestamp_does_not_count() {
        let out = encode(r#"{"type":"x","payload":{"timestamp":1}}"#).unwrap();
        assert!(out.ends_with(r#","timestamp":"1970-01-01T00:00:00.000Z"}"#));
    }

    #[test]
    fn exclusions_survive_the_trip_through_redis() {
        let exclusion = Exclusion {
            users: Some(vec![Arc::from("u1"), Arc::from("7")].into()),
            origin: Some(Origin { instance: 0xabc, loop_id: 1, conn: ConnRef { key: 5, id: 9 } }),
        };
        let payload = br#"{"type":"x","timestamp":"t"}"#;
        let carried = embed_exclusion(payload, &exclusion);
        let (stripped, back) = strip_exclusion(&carried).unwrap();
        assert_eq!(stripped, payload.to_vec());
        assert_eq!(back, exclusion);
        assert!(strip_exclusion(payload).is_none());
        // Numbers survive the trip byte for byte (fuzz/regressions/notification/strict-exclusion-float-changed).
        let float = br#"{"type":"","":5e32}"#;
        let (back, _) = strip_exclusion(&embed_exclusion(float, &exclusion)).unwrap();
        assert_eq!(back, float.to_vec());
        // Not an object once cut: left alone (fuzz/regressions/notification/strip-leaves-non-json).
        assert!(strip_exclusion(b"\t\t}y,\"_herald\":{}}").is_none());
        assert_eq!(embed_exclusion(payload, &Exclusion::default()), payload.to_vec());
    }

    #[test]
    fn client_messages_are_recognized() {
        let mut s = JsonScratch::default();
        assert_eq!(parse_client_message("ping", &mut s), ClientMessage::Ping(PingStyle::Text));
        assert_eq!(parse_client_message(r#"{"action":"ping"}"#, &mut s), ClientMessage::Ping(PingStyle::Action));
        assert_eq!(parse_client_message(r#"{"type":"ping"}"#, &mut s), ClientMessage::Ping(PingStyle::Type));
        assert_eq!(
            parse_client_message(r#"{"action":"ack","notification_id":3}"#, &mut s),
            ClientMessage::Ack(Some("3".into()))
        );
        assert_eq!(
            parse_client_message(r#"{"action":"ack","stream_id":"aaaaaaab:3"}"#, &mut s),
            ClientMessage::Ack(Some("aaaaaaab:3".into()))
        );
        assert_eq!(parse_client_message(r#"{"action":"ack"}"#, &mut s), ClientMessage::Ack(None));
        assert_eq!(
            parse_client_message(r#"{"type":"subscribe","topic":"project:1"}"#, &mut s),
            ClientMessage::Subscribe { topic: "project:1".into(), since: None }
        );
        assert_eq!(
            parse_client_message(r#"{"type":"subscribe","topic":"t","since":"aaaaaaab:3"}"#, &mut s),
            ClientMessage::Subscribe { topic: "t".into(), since: Some("aaaaaaab:3".into()) }
        );
        assert_eq!(
            parse_client_message(r#"{"type":"subscribe_project","project_id":7}"#, &mut s),
            ClientMessage::SubscribeProject("7".into())
        );
        assert_eq!(parse_client_message(r#"{"cursor":1}"#, &mut s), ClientMessage::OtherObject);
        assert_eq!(parse_client_message("hello", &mut s), ClientMessage::Unrecognized);
        assert_eq!(parse_client_message("{broken", &mut s), ClientMessage::Unrecognized);
    }
}
