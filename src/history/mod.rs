//! History: every notification published through herald is kept in its target's stream (a
//! user's or a topic's), so a client that reconnects can ask for what it missed.
//!
//! A position in a stream is a [`StreamPos`]: an epoch (new whenever a stream's store was lost
//! or reset, so an old position is recognised as foreign instead of misread) and an offset that
//! grows by one per notification. Clients see it as `stream_id`, e.g. `q7kz2m4t:42`.
//!
//! The stores: [`ring::Rings`] in memory (embedded broker), and Redis lists kept by herald's
//! function library (see `broker::redis`). Both answer a [`Page`] for "what came after this
//! position", which the event loops replay ([`crate::event_loop`]'s replay).

pub mod ring;

use std::time::Duration;

use crate::frame::SharedFrame;

/// Most notifications one stream may keep (HERALD_HISTORY_SIZE).
pub const MAX_SIZE: usize = 100_000;
/// Notifications fetched per replay page.
pub const PAGE: usize = 64;

pub use crate::ids::{EPOCH_BITS, StreamPos, epoch_text, parse_epoch};

/// Where a client asks to resume from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// `since=0`: everything retained.
    Beginning,
    /// A position this herald handed out (it may still be foreign to the stream asked).
    After(StreamPos),
    /// Malformed or from elsewhere: everything retained, never complete.
    Unknown,
}

impl Since {
    pub fn parse(text: &str) -> Since {
        if text == "0" {
            return Since::Beginning;
        }
        StreamPos::parse(text).map_or(Since::Unknown, Since::After)
    }
}

/// One page of a stream after a position, oldest first.
#[derive(Debug, Default)]
pub struct Page {
    /// Framed exactly as delivered live (with `stream_id`).
    pub entries: Vec<SharedFrame>,
    /// Nothing after the position asked for was dropped (size, age, eviction, a reset store)
    /// before this page's first entry, and the position belongs to the stream.
    pub complete: bool,
    /// More entries follow this page.
    pub more: bool,
}

/// History settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Entries kept per stream; 0 = history off.
    pub size: usize,
    pub ttl: Duration,
    /// Embedded mode: bytes all streams may hold together.
    pub memory: usize,
}

impl Settings {
    pub fn enabled(&self) -> bool {
        self.size > 0
    }
}

/// Delivered notifications as the elements of a JSON array.
pub fn items_json(entries: &[SharedFrame]) -> String {
    let mut items = String::with_capacity(entries.iter().map(|f| f.bytes.len() + 1).sum());
    for (i, frame) in entries.iter().enumerate() {
        if i > 0 {
            items.push(',');
        }
        // Frames hold JSON herald validated and built: UTF-8.
        items.push_str(&String::from_utf8_lossy(&frame.bytes[crate::frame::header_len_of(&frame.bytes)..]));
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_reject_what_is_not_theirs() {
        let pos = StreamPos { epoch: (1 << 40) - 1, offset: 42 };
        assert_eq!(pos.render(), "77777777:42");
        assert_eq!(StreamPos::parse("77777777:42"), Some(pos));
        let zero = StreamPos { epoch: 0, offset: 1 };
        assert_eq!(StreamPos::parse(&zero.render()), Some(zero));
        for foreign in
            ["", "0", ":1", "abc:1", "aaaaaaaa", "aaaaaaaa:", "aaaaaaaa:x", "AAAAAAAA:1", "aaaaaaaa:+1", "aaaaaaa1:1"]
        {
            assert_eq!(StreamPos::parse(foreign), None, "{foreign:?}");
        }
        assert_eq!(Since::parse("0"), Since::Beginning);
        assert_eq!(Since::parse("nonsense"), Since::Unknown);
        assert_eq!(Since::parse("77777777:42"), Since::After(pos));
    }

    #[test]
    fn a_new_epoch_is_always_after() {
        let a = StreamPos { epoch: 5, offset: 10 };
        assert!(StreamPos { epoch: 5, offset: 11 }.is_after(&a));
        assert!(!StreamPos { epoch: 5, offset: 10 }.is_after(&a));
        assert!(StreamPos { epoch: 6, offset: 1 }.is_after(&a));
    }
}
