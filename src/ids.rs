//! Leaf types every layer shares: who a message is for, which connection asked, who must not
//! receive it, and the typed answer that goes back. Nothing here imports another herald module,
//! so every other module can import this one without a cycle.

use std::sync::Arc;

/// Index of an event-loop thread.
pub type LoopId = usize;

/// Identifies a connection across threads: its slab key on its loop, and an id that tells it
/// apart from later connections reusing the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    pub key: u32,
    pub id: u32,
}

/// Most topics one connection may hold: WebSocket subscriptions, or an event stream's
/// `topics`.
pub const MAX_TOPICS_PER_CONNECTION: usize = 128;

/// Whom a message is for: a user or a topic, by name.
///
/// One shared string whose first byte says which (`u` or `t`): 16 bytes wherever it is
/// stored (an index key, a session's user, a topic membership), and one allocation that all
/// of them share.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target(Arc<str>);

const USER: char = 'u';
const TOPIC: char = 't';

impl Target {
    pub fn user(name: &str) -> Target {
        Target::tagged(USER, name)
    }

    pub fn topic(name: &str) -> Target {
        Target::tagged(TOPIC, name)
    }

    fn tagged(tag: char, name: &str) -> Target {
        let mut key = String::with_capacity(1 + name.len());
        key.push(tag);
        key.push_str(name);
        Target(Arc::from(key))
    }

    pub fn is_user(&self) -> bool {
        self.0.starts_with(USER)
    }

    /// The user id or topic name.
    pub fn name(&self) -> &str {
        // The tag is one ASCII byte, so the name starts on a character boundary.
        &self.0[1..]
    }

    /// The tagged form, unique per target (for interning and hashing).
    pub fn key(&self) -> &str {
        &self.0
    }

    /// The tagged form of a user or topic, for looking a target up without building one.
    pub fn key_of(is_user: bool, name: &str, out: &mut String) {
        out.clear();
        out.push(if is_user { USER } else { TOPIC });
        out.push_str(name);
    }
}

impl std::borrow::Borrow<str> for Target {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_user() { "User" } else { "Topic" };
        write!(f, "{kind}({:?})", self.name())
    }
}

/// The connection waiting for an answer: a request parked on `loop_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    pub loop_id: LoopId,
    pub conn: ConnRef,
}

/// What a parked request is told when the work it handed off is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Per published item, how many receivers it reached: loops holding a target (embedded)
    /// or Redis subscribers.
    Published(Box<[u64]>),
    /// Connections closed (`/api/disconnect`).
    Closed(u64),
    /// Fleet-wide connections of each user asked about (`/api/presence`).
    Presence(Box<[u64]>),
    /// A user's stored notifications (`/api/history`).
    History(Box<HistoryItems>),
    /// It could not be done; the reason is for the client.
    Failed(String),
}

/// What a history store answered for the history API.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HistoryItems {
    /// The user's read marker.
    pub acked: Option<StreamPos>,
    /// The notifications as delivered, oldest first, as the elements of a JSON array
    /// (without the brackets).
    pub items: String,
    pub complete: bool,
}

/// The connection a relayed message came from, on which instance: it never gets its own relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub instance: u64,
    pub loop_id: LoopId,
    pub conn: ConnRef,
}

/// Connections that must not receive a message although they hold one of its targets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exclusion {
    /// Every connection of these users (seed 004 `exclude_user_ids`).
    pub users: Option<Arc<[Arc<str>]>>,
    /// The connection a relayed message came from.
    pub origin: Option<Origin>,
}

impl Exclusion {
    pub fn is_empty(&self) -> bool {
        self.users.is_none() && self.origin.is_none()
    }

    /// Whether every connection of `user` is excluded.
    pub fn excludes_user(&self, user: &str) -> bool {
        self.users.as_ref().is_some_and(|users| users.iter().any(|u| **u == *user))
    }
}

/// The targets of one delivery on one loop.
#[derive(Debug, Clone)]
pub enum DeliverTo {
    One(Target),
    Many(Box<[Target]>),
}

impl DeliverTo {
    pub fn as_slice(&self) -> &[Target] {
        match self {
            DeliverTo::One(t) => std::slice::from_ref(t),
            DeliverTo::Many(ts) => ts,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stream positions (history)
// ---------------------------------------------------------------------------------------------

/// Lowercase RFC 4648 base32: ids stay URL- and header-safe.
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
/// An epoch is 40 bits: 8 base32 characters.
const EPOCH_CHARS: usize = 8;
pub const EPOCH_BITS: u32 = 40;

/// A position in a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamPos {
    pub epoch: u64,
    pub offset: u64,
}

impl StreamPos {
    /// `q7kz2m4t:42`.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(EPOCH_CHARS + 21);
        out.push_str(&epoch_text(self.epoch));
        out.push(':');
        out.push_str(&self.offset.to_string());
        out
    }

    pub fn parse(text: &str) -> Option<StreamPos> {
        let (epoch, offset) = text.split_once(':')?;
        let epoch = parse_epoch(epoch)?;
        let offset = offset.parse::<u64>().ok().filter(|_| !offset.starts_with('+'))?;
        Some(StreamPos { epoch, offset })
    }

    /// Whether this position comes after `other` in the same stream (a different epoch is a
    /// different stream: everything in it is new).
    pub fn is_after(&self, other: &StreamPos) -> bool {
        self.epoch != other.epoch || self.offset > other.offset
    }
}

pub fn epoch_text(epoch: u64) -> String {
    (0..EPOCH_CHARS).rev().map(|i| ALPHABET[((epoch >> (5 * i)) & 31) as usize] as char).collect()
}

pub fn parse_epoch(text: &str) -> Option<u64> {
    if text.len() != EPOCH_CHARS {
        return None;
    }
    text.bytes().try_fold(0u64, |acc, c| {
        let digit = ALPHABET.iter().position(|&a| a == c)? as u64;
        Some(acc << 5 | digit)
    })
}

/// An id as JSON: seed 004's ids are integers, so an id that is the canonical decimal form
/// of an `i64` becomes that number; any other id stays the string it is. Canonical means
/// what `i64::to_string` writes: no `+`, no leading zeros (`"0"` itself is fine), and a `-`
/// only on a non-zero number, so `"-7"` is the number -7 (an integer `sub` claim of -7 is
/// the user `"-7"`, and must come back as -7) while `"0042"`, `"+42"`, `"-0"` and
/// `"9223372036854775808"` stay strings. Every id thus maps to exactly one JSON value and
/// back: two users can never be rendered as the same sender (or presence subject).
pub fn id_as_json(id: &str) -> serde_json::Value {
    match id.parse::<i64>() {
        Ok(n) if n.to_string() == id => serde_json::Value::from(n),
        _ => serde_json::Value::String(id.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_topics_of_one_name_are_distinct_targets() {
        let (user, topic) = (Target::user("a:b"), Target::topic("a:b"));
        assert_ne!(user, topic);
        assert!(user.is_user() && !topic.is_user());
        assert_eq!((user.name(), topic.name()), ("a:b", "a:b"));
        assert_eq!(size_of::<Target>(), 16);
        let mut key = String::new();
        Target::key_of(true, "a:b", &mut key);
        assert_eq!(key, user.key());
        assert_eq!(format!("{user:?} {:?}", Target::topic("é")), r#"User("a:b") Topic("é")"#);
    }
}
