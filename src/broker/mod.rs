//! Where notifications come from and, for HTTP publishes, where they go.
//!
//! Embedded mode needs no code of its own: the router is the broker, and HTTP handlers hand
//! it [`crate::router::Publication`]s directly. Redis mode ([`redis`]) runs a subscriber
//! thread that feeds the router and a publisher thread that takes [`PublishJob`]s from
//! HTTP handlers, so no event loop ever waits on Redis.

pub mod redis;
pub mod redis_url;
pub mod resp;

use std::sync::Arc;

use crate::event_loop::ConnRef;

/// Channels to PUBLISH to, on behalf of one HTTP request.
#[derive(Debug)]
pub struct PublishJob {
    /// (channel, payload) pairs; payloads are validated and already carry their timestamp.
    pub messages: Vec<(String, Arc<[u8]>)>,
    /// Which loop and connection wait for the answer (none for relayed client messages).
    pub reply: Option<(usize, ConnRef)>,
}
