//! History in Redis, as herald reads it: the envelope `herald_publish` puts on a stored
//! notification (`\0h1 <epoch>:<offset>:<stored ms>\n<json>`), the entries `herald_history`
//! returns (`<offset>:<stored ms>\n<json>`), and the page a resume gets from them. The
//! functions themselves are in herald.lua; [`library`] fills in its settings.

use std::time::{Duration, Instant, SystemTime};

use crate::history::{Page, Settings, Since, StreamPos, parse_epoch};
use crate::message::{self, JsonScratch};

/// What marks a published notification as stored, with its position.
pub const ENVELOPE: &[u8] = b"\0h1 ";
/// A stream's hash outlives its entries by this much (at least), so a client that comes back
/// within it is told exactly what it missed, even if it is everything.
const META_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

const SOURCE: &str = include_str!("herald.lua");

/// herald.lua with this instance's settings; `publish` is the command that reaches a
/// channel's subscribers (`PUBLISH`, or `SPUBLISH` on a sharded cluster).
pub fn library(history: &Settings, publish: &str) -> String {
    let ttl = history.ttl.as_millis().max(1);
    SOURCE
        .replace("__HISTORY_SIZE__", &history.size.to_string())
        .replace("__HISTORY_TTL_MS__", &ttl.to_string())
        .replace("__META_TTL_MS__", &META_TTL.as_millis().max(ttl).to_string())
        .replace("__PUBLISH__", publish)
}

/// A stored notification's position and when Redis stored it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub pos: StreamPos,
    pub at: SystemTime,
}

/// Splits a published payload into its position and the notification, when it carries
/// `herald_publish`'s envelope.
pub fn open_envelope(payload: &[u8]) -> Option<(Stored, &[u8])> {
    let rest = payload.strip_prefix(ENVELOPE)?;
    let newline = rest.iter().position(|&b| b == b'\n')?;
    let head = std::str::from_utf8(&rest[..newline]).ok()?;
    let mut parts = head.splitn(3, ':');
    let epoch = parse_epoch(parts.next()?)?;
    let offset = parts.next()?.parse().ok()?;
    let at = millis(parts.next()?)?;
    Some((Stored { pos: StreamPos { epoch, offset }, at }, &rest[newline + 1..]))
}

/// Splits a stored entry (`<offset>:<ms>\n<json>`) of a stream of `epoch`.
pub fn open_entry(entry: &[u8], epoch: u64) -> Option<(Stored, &[u8])> {
    let newline = entry.iter().position(|&b| b == b'\n')?;
    let head = std::str::from_utf8(&entry[..newline]).ok()?;
    let (offset, at) = head.split_once(':')?;
    Some((Stored { pos: StreamPos { epoch, offset: offset.parse().ok()? }, at: millis(at)? }, &entry[newline + 1..]))
}

fn millis(text: &str) -> Option<SystemTime> {
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(text.parse().ok()?))
}

/// What `herald_history` answered, owned.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HistoryReply {
    /// None: the channel has no stream.
    pub epoch: Option<u64>,
    pub top: u64,
    pub oldest: u64,
    pub acked: u64,
    /// Newest first, as stored.
    pub entries: Vec<Vec<u8>>,
}

/// How a history reply becomes a page.
pub struct Reading<'a> {
    pub since: Since,
    pub ttl: Duration,
    pub max_bytes: usize,
    pub scratch: &'a mut JsonScratch,
}

impl HistoryReply {
    /// Frames the entries (oldest first) exactly as they were delivered live, and judges
    /// whether the reader missed anything after `since`.
    pub fn page(&self, reading: Reading<'_>) -> Page {
        let Some(epoch) = self.epoch else {
            // No stream (never written, or expired whole): nothing is kept, and a position
            // that pointed into one is past recovery.
            let complete = match reading.since {
                Since::Beginning => true,
                Since::After(pos) => pos.offset == 0,
                Since::Unknown => false,
            };
            return Page { entries: Vec::new(), complete, more: false };
        };
        let mut complete = match reading.since {
            Since::Beginning => self.oldest <= 1,
            Since::After(pos) => pos.epoch == epoch && pos.offset <= self.top && pos.offset + 1 >= self.oldest,
            Since::Unknown => false,
        };
        let now = SystemTime::now();
        let born = Instant::now();
        let mut entries = Vec::with_capacity(self.entries.len());
        let mut last = None;
        for raw in self.entries.iter().rev() {
            let Some((stored, json)) = open_entry(raw, epoch) else { continue };
            // herald's own routing metadata (an exclusion) is not part of what is delivered.
            let stripped = message::strip_exclusion(json);
            let json = stripped.as_ref().map_or(json, |(bytes, _)| bytes.as_slice());
            last = Some(stored.pos.offset);
            if now.duration_since(stored.at).is_ok_and(|age| age > reading.ttl) {
                // Past its age, waiting for the next publish to remove it.
                complete = false;
                continue;
            }
            match message::validate_notification(json, reading.max_bytes, reading.scratch) {
                Ok(valid) => entries.push(message::frame_in_stream(valid, stored.at, born, stored.pos)),
                Err(_) => continue,
            }
        }
        let more = last.is_some_and(|offset| offset < self.top);
        Page { entries, complete, more }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::epoch_text;

    const EPOCH: u64 = 0x12_3456_789a;

    #[test]
    fn envelopes_and_entries_open_and_others_do_not() {
        let payload = format!("\0h1 {}:42:1700000000123\n{{\"type\":\"x\"}}", epoch_text(EPOCH));
        let (stored, json) = open_envelope(payload.as_bytes()).unwrap();
        assert_eq!(stored.pos, StreamPos { epoch: EPOCH, offset: 42 });
        assert_eq!(stored.at, SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123));
        assert_eq!(json, br#"{"type":"x"}"#);
        for foreign in [&b"{\"type\":\"x\"}"[..], b"\0h1 nope\n{}", b"\0h1 aaaaaaaa:1\n{}", b"\0h1 aaaaaaaa:1:2"] {
            assert!(open_envelope(foreign).is_none(), "{foreign:?}");
        }
        let (stored, json) = open_entry(b"7:1000\n{\"type\":\"y\"}", EPOCH).unwrap();
        assert_eq!((stored.pos.offset, json), (7, &br#"{"type":"y"}"#[..]));
    }

    fn reply(top: u64, oldest: u64, offsets: &[u64]) -> HistoryReply {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis();
        HistoryReply {
            epoch: Some(EPOCH),
            top,
            oldest,
            acked: 0,
            entries: offsets.iter().rev().map(|o| format!("{o}:{now}\n{{\"type\":\"n{o}\"}}").into_bytes()).collect(),
        }
    }

    fn page(reply: &HistoryReply, since: Since) -> Page {
        let mut scratch = JsonScratch::default();
        reply.page(Reading { since, ttl: Duration::from_secs(60), max_bytes: 512, scratch: &mut scratch })
    }

    #[test]
    fn pages_are_framed_as_delivered_and_judged_complete_or_not() {
        let at = |offset| Since::After(StreamPos { epoch: EPOCH, offset });
        let p = page(&reply(5, 3, &[4, 5]), at(3));
        assert!(p.complete && !p.more);
        let first = &p.entries[0];
        assert_eq!(first.stream, Some(StreamPos { epoch: EPOCH, offset: 4 }));
        let json: serde_json::Value = serde_json::from_str(&crate::history::items_json(&p.entries[..1])).unwrap();
        assert_eq!(json["stream_id"], format!("{}:4", epoch_text(EPOCH)));
        assert!(json["timestamp"].is_string());
        assert!(!page(&reply(5, 3, &[3, 4, 5]), at(1)).complete, "1 and 2 are gone");
        assert!(!page(&reply(5, 3, &[3, 4, 5]), Since::After(StreamPos { epoch: 1, offset: 3 })).complete);
        assert!(!page(&reply(5, 3, &[3, 4, 5]), Since::Unknown).complete);
        assert!(page(&reply(5, 1, &[1, 2, 3, 4, 5]), Since::Beginning).complete);
        assert!(page(&HistoryReply::default(), Since::Beginning).complete);
        assert!(!page(&HistoryReply::default(), at(4)).complete, "the stream expired whole");
    }

    #[test]
    fn the_library_gets_this_instances_settings() {
        let settings = Settings { size: 100, ttl: Duration::from_secs(60), memory: 0 };
        let lib = library(&settings, "SPUBLISH");
        assert!(lib.starts_with("#!lua name=herald"));
        assert!(lib.contains("local HISTORY_SIZE = 100\n") && lib.contains("local PUBLISH = 'SPUBLISH'"));
        assert!(lib.contains("local HISTORY_TTL_MS = 60000\n") && lib.contains("local META_TTL_MS = 604800000\n"));
        assert!(!lib.contains("__"), "every setting is filled in");
    }
}
