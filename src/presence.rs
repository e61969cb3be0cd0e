//! Presence events: a user's first connection opening fleet-wide (`online`) and their last
//! one closing (`offline`). Who decides a transition depends on the broker: with Redis,
//! herald's presence function (exactly one call sees each transition); embedded, the route
//! table's per-user count. Either way the event reads the same, on the Redis presence channel
//! and in webhook posts.

use std::time::SystemTime;

use crate::ids::id_as_json;
use crate::message::rfc3339_millis;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Online,
    Offline,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Online => "online",
            Status::Offline => "offline",
        }
    }

    /// The transition a connection count change makes on one instance, if any.
    pub fn of_change(opened: bool, connections_after: u32) -> Option<Status> {
        match (opened, connections_after) {
            (true, 1) => Some(Status::Online),
            (false, 0) => Some(Status::Offline),
            _ => None,
        }
    }
}

/// `{"type":"presence","user_id":U,"status":…,"connections":N,"timestamp":…}`; the same
/// bytes herald's Redis function publishes.
pub fn event_json(user: &str, status: Status, connections: u64, at: SystemTime) -> String {
    format!(
        r#"{{"type":"presence","user_id":{},"status":"{}","connections":{connections},"timestamp":"{}"}}"#,
        id_as_json(user),
        status.as_str(),
        rfc3339_millis(at)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_name_the_user_as_ids_are_named_elsewhere() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        let event: serde_json::Value = serde_json::from_str(&event_json("42", Status::Online, 1, at)).unwrap();
        assert_eq!(
            event,
            serde_json::json!({"type":"presence","user_id":42,"status":"online","connections":1,
                "timestamp":"2023-11-14T22:13:20.123Z"})
        );
        let event: serde_json::Value = serde_json::from_str(&event_json("a\"b", Status::Offline, 0, at)).unwrap();
        assert_eq!(event["user_id"], "a\"b");
    }

    #[test]
    fn only_first_and_last_connections_are_transitions() {
        assert_eq!(Status::of_change(true, 1), Some(Status::Online));
        assert_eq!(Status::of_change(true, 2), None);
        assert_eq!(Status::of_change(false, 1), None);
        assert_eq!(Status::of_change(false, 0), Some(Status::Offline));
    }
}
