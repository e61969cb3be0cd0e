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

/// Whom a message is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    User(Arc<str>),
    Topic(Arc<str>),
}

impl Target {
    pub fn is_user(&self) -> bool {
        matches!(self, Target::User(_))
    }

    /// The user id or topic name.
    pub fn name(&self) -> &Arc<str> {
        match self {
            Target::User(name) | Target::Topic(name) => name,
        }
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
    /// It could not be done; the reason is for the client.
    Failed(String),
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
