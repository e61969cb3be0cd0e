//! Per-path behaviour: the one table that says how each seed's clients are treated.
//!
//! Every difference between the five services herald replaces lives here as data, so the
//! event loop asks "what does this connection's dialect say" instead of testing paths.

use crate::frame::code;

/// How a failed token is reported to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// HTTP 401 with `{"error": ...}` (seed 003).
    Http401Json,
    /// HTTP 403 (seed 002).
    Http403,
    /// Complete the upgrade, then close with this code (seeds 000, 001, 004).
    CloseAfterOpen(u16),
}

/// What a connection receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stream {
    /// The token's user's notifications (plus topics subscribed at runtime).
    Personal,
    /// Exactly one topic, fixed by the path.
    Topic(String),
}

/// The behaviour of one family of paths.
#[derive(Debug, PartialEq, Eq)]
pub struct Dialect {
    /// Its index in [`ALL`]: a session stores this byte instead of a pointer.
    pub id: u8,
    /// Which seed document this dialect follows.
    pub seed: &'static str,
    pub auth_failure: AuthFailure,
    /// Close code on token expiry and on `/api/disconnect`.
    pub auth_close_code: u16,
    /// Send `{"type":"connected","timestamp":…}` right after the upgrade (seed 000).
    pub greets: bool,
    /// Send a JSON heartbeat after HERALD_HEARTBEAT_INTERVAL of outbound silence (seed 000).
    pub json_heartbeat: bool,
    /// `subscribe_project` / `unsubscribe_project` are understood (seed 002).
    pub project_subscriptions: bool,
    /// Relay other JSON objects to the topic's other members (seed 004 focus sessions).
    pub relays: bool,
    /// Not a WebSocket: a Server-Sent Events response (`GET /sse`). Notifications go out in
    /// their event-stream form, keepalives are comments, the end of the body is the close,
    /// and nothing the client sends is read as a message.
    pub event_stream: bool,
}

pub static SEED_003: Dialect = Dialect {
    id: 0,
    seed: "003",
    auth_failure: AuthFailure::Http401Json,
    auth_close_code: code::POLICY_VIOLATION,
    greets: false,
    json_heartbeat: false,
    project_subscriptions: false,
    relays: false,
    event_stream: false,
};

pub static SEED_000: Dialect = Dialect {
    id: 1,
    seed: "000",
    auth_failure: AuthFailure::CloseAfterOpen(code::UNAUTHORIZED_4401),
    auth_close_code: code::UNAUTHORIZED_4401,
    greets: true,
    json_heartbeat: true,
    project_subscriptions: false,
    relays: false,
    event_stream: false,
};

pub static SEED_001: Dialect = Dialect {
    id: 2,
    seed: "001/004",
    auth_failure: AuthFailure::CloseAfterOpen(code::POLICY_VIOLATION),
    auth_close_code: code::POLICY_VIOLATION,
    greets: false,
    json_heartbeat: false,
    project_subscriptions: false,
    relays: false,
    event_stream: false,
};

pub static SEED_002: Dialect = Dialect {
    id: 3,
    seed: "002",
    auth_failure: AuthFailure::Http403,
    auth_close_code: code::POLICY_VIOLATION,
    greets: false,
    json_heartbeat: false,
    project_subscriptions: true,
    relays: false,
    event_stream: false,
};

pub static FOCUS_SESSION: Dialect = Dialect {
    id: 4,
    seed: "004",
    auth_failure: AuthFailure::CloseAfterOpen(code::POLICY_VIOLATION),
    auth_close_code: code::POLICY_VIOLATION,
    greets: false,
    json_heartbeat: false,
    project_subscriptions: false,
    relays: true,
    event_stream: false,
};

/// `GET /sse` (SPEC §10): seed 003's auth failures, answered before the stream starts.
pub static EVENT_STREAM: Dialect = Dialect {
    id: 5,
    seed: "sse",
    auth_failure: AuthFailure::Http401Json,
    // An event stream has no close code: its end is the close. Kept for the table's shape.
    auth_close_code: code::POLICY_VIOLATION,
    greets: false,
    json_heartbeat: false,
    project_subscriptions: false,
    relays: false,
    event_stream: true,
};

/// Every dialect, indexed by its `id`.
pub static ALL: [&Dialect; 6] = [&SEED_003, &SEED_000, &SEED_001, &SEED_002, &FOCUS_SESSION, &EVENT_STREAM];

impl Dialect {
    /// The dialect with index `id` (an id a `Dialect` gave out; anything else is seed 003's).
    pub fn by_id(id: u8) -> &'static Dialect {
        ALL.get(usize::from(id)).copied().unwrap_or(&SEED_003)
    }
}

/// Longest id accepted in a topic path segment.
const MAX_PATH_ID: usize = 128;

/// Finds the dialect for a WebSocket path, and the topic the path fixes, if any. (`/sse` is
/// no WebSocket path: it has its own route.)
pub fn for_path(path: &str) -> Option<(&'static Dialect, Stream)> {
    match path {
        "/ws" => return Some((&SEED_003, Stream::Personal)),
        "/v1/notifications/ws/notifications" => return Some((&SEED_000, Stream::Personal)),
        "/ws/notifications" => return Some((&SEED_001, Stream::Personal)),
        "/ws/notifications/" => return Some((&SEED_002, Stream::Personal)),
        _ => {}
    }
    let rest = path.strip_prefix("/ws/")?;
    let (kind, id) = rest.split_once('/')?;
    let id = crate::percent::percent_decode(id)?;
    if id.is_empty() || id.len() > MAX_PATH_ID || id.contains('/') {
        return None;
    }
    let (dialect, topic_kind) = match kind {
        "tenant" | "device" | "project" => (&SEED_001, kind),
        "tasks" => (&SEED_001, "workspace"),
        "focus-session" => (&FOCUS_SESSION, kind),
        _ => return None,
    };
    Some((dialect, Stream::Topic(format!("{topic_kind}:{id}"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_index_the_table() {
        for (i, dialect) in ALL.iter().enumerate() {
            assert_eq!(usize::from(dialect.id), i);
            assert!(std::ptr::eq(Dialect::by_id(dialect.id), *dialect));
        }
    }

    #[test]
    fn every_seed_path_has_its_dialect() {
        assert_eq!(for_path("/ws"), Some((&SEED_003, Stream::Personal)));
        assert_eq!(for_path("/ws/notifications").unwrap().0.auth_close_code, 1008);
        assert_eq!(for_path("/ws/notifications/").unwrap().0.auth_failure, AuthFailure::Http403);
        assert!(for_path("/v1/notifications/ws/notifications").unwrap().0.greets);
        assert_eq!(for_path("/ws/tasks/12").unwrap().1, Stream::Topic("workspace:12".into()));
        assert_eq!(for_path("/ws/project/7").unwrap().1, Stream::Topic("project:7".into()));
        assert!(for_path("/ws/focus-session/s1").unwrap().0.relays);
        assert_eq!(for_path("/ws/unknown/1"), None);
        assert_eq!(for_path("/ws/project/"), None);
        assert_eq!(for_path("/ws/project/a/b"), None);
        assert_eq!(for_path("/other"), None);
        assert_eq!(for_path("/sse"), None);
        assert!(EVENT_STREAM.event_stream && ALL.iter().filter(|d| d.event_stream).count() == 1);
    }
}
