//! What each request gets: upgrades on the dialect paths, health, metrics, and the publish
//! API. Decisions only; the event loop carries them out.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::SystemTime;

use super::access::{admit, authenticate, origin_allowed};
use super::history::{self, HistoryQuery};
use super::presence::{self, PresenceQuery};
use super::publish::{self, PublishRequest};
use super::{Method, Request, Response, Status};
use crate::auth::Identity;
use crate::dialect::{self, AuthFailure, Dialect, Stream};
use crate::message::{self, JsonScratch};
use crate::metrics;
use crate::shared::Shared;

/// What the event loop should do with a request.
pub enum Outcome {
    Respond(Response),
    Upgrade(Box<Upgrade>),
    /// Hand the notifications to the broker; answer with what it reached.
    Publish(Box<PublishRequest>),
    /// Close every connection of this user on every loop, then answer with the count.
    Disconnect(Arc<str>),
    /// Answer with these users' connections (fleet-wide with Redis).
    Presence(PresenceQuery),
    /// Start a Server-Sent Events stream (admitted: its connection slot is reserved).
    EventStream(Box<super::sse::Open>),
    /// Answer with a user's stored notifications.
    History(HistoryQuery),
}

/// An accepted upgrade. When `identity` is `Err`, the dialect wants the failure reported
/// after the handshake: open, then close with `close_code`.
pub struct Upgrade {
    pub dialect: &'static Dialect,
    pub stream: Stream,
    pub identity: Result<Identity, u16>,
    /// The complete 101 response.
    pub response: Vec<u8>,
    /// `since=<stream_id>`: replay what came after it (history on).
    pub since: Option<String>,
}

const EVENTS: &str = "/api/v1/realtime/events/";
const PRESENCE: &str = "/api/presence/";
const HISTORY: &str = "/api/history/";

/// Routes one request.
pub fn handle(req: &Request, peer: IpAddr, shared: &Shared, scratch: &mut JsonScratch) -> Outcome {
    if let Some((dialect, stream)) = dialect::for_path(&req.path) {
        return upgrade(req, dialect, stream, shared);
    }
    let respond = Outcome::Respond;
    if req.path == crate::sse::PATH {
        return match super::sse::route(req, shared) {
            Ok(open) => Outcome::EventStream(open),
            Err(response) => Outcome::Respond(response),
        };
    }
    match (req.method(), req.path.as_str()) {
        (Method::Get | Method::Head, "/health") => respond(health(shared)),
        (Method::Get | Method::Head, "/ready") => respond(ready(shared)),
        (Method::Get | Method::Head, "/metrics") => respond(metrics(req, shared)),
        (Method::Get | Method::Head, "/") => respond(super::demo::page()),
        (Method::Get | Method::Head, "/herald.js") => respond(super::demo::herald_js(req)),
        (Method::Get | Method::Head, "/favicon.ico") => respond(super::demo::favicon(req)),
        (Method::Post, "/publish") => publishing(publish::publish(req, peer, shared, scratch)),
        (Method::Post, "/publish/batch") => publishing(publish::publish_batch(req, peer, shared, scratch)),
        (Method::Post, "/notify") => publishing(publish::notify(req, peer, shared, scratch)),
        (Method::Post, "/api/disconnect") => match publish::disconnect_target(req, peer, shared) {
            Ok(user) => Outcome::Disconnect(user),
            Err(response) => respond(response),
        },
        (Method::Get, path) if path.starts_with(PRESENCE) => {
            match presence::one(&path[PRESENCE.len()..], req, peer, shared) {
                Ok(query) => Outcome::Presence(query),
                Err(response) => respond(response),
            }
        }
        (Method::Get, path) if path.starts_with(HISTORY) => {
            match history::query(&path[HISTORY.len()..], req, peer, shared) {
                Ok(query) => Outcome::History(query),
                Err(response) => respond(response),
            }
        }
        (Method::Post, "/api/presence") => match presence::many(req, peer, shared) {
            Ok(query) => Outcome::Presence(query),
            Err(response) => respond(response),
        },
        (Method::Post, path) if path.starts_with(EVENTS) => {
            publishing(publish::event(&path[EVENTS.len()..], req, peer, shared, scratch))
        }
        (
            _,
            "/" | "/herald.js" | "/favicon.ico" | "/health" | "/ready" | "/metrics" | "/publish" | "/publish/batch"
            | "/notify" | "/api/disconnect" | "/api/presence",
        ) => respond(Response::error(Status::METHOD_NOT_ALLOWED, "method not allowed")),
        _ => respond(Response::error(Status::NOT_FOUND, "not found")),
    }
}

fn publishing(accepted: publish::Accepted) -> Outcome {
    match accepted {
        Ok(request) => Outcome::Publish(Box::new(request)),
        Err(refusal) => Outcome::Respond(refusal),
    }
}

fn upgrade(req: &Request, dialect: &'static Dialect, stream: Stream, shared: &Shared) -> Outcome {
    let refuse = Outcome::Respond;
    if !(req.upgrade_websocket && req.connection_upgrade) || req.method() != Method::Get {
        return refuse(
            Response::error(Status::UPGRADE_REQUIRED, "this endpoint only speaks WebSocket")
                .header("Upgrade", "websocket")
                .header("Sec-WebSocket-Version", "13"),
        );
    }
    if req.ws_version.as_deref() != Some("13") {
        return refuse(
            Response::error(Status::UPGRADE_REQUIRED, "unsupported Sec-WebSocket-Version")
                .header("Sec-WebSocket-Version", "13"),
        );
    }
    let Some(key) = req.ws_key.as_deref().filter(|k| is_valid_ws_key(k)) else {
        return refuse(Response::error(Status::BAD_REQUEST, "missing or invalid Sec-WebSocket-Key").closing());
    };
    if !origin_allowed(req, shared) {
        return refuse(Response::error(Status::FORBIDDEN, "origin not allowed").closing());
    }
    let response = switching_protocols(key);
    let verified = authenticate(req, shared).and_then(|identity| match &stream {
        Stream::Topic(topic) if !identity.allows_topic(topic) => Err("token does not allow this topic"),
        _ => Ok(identity),
    });
    let identity = match verified {
        Ok(identity) => identity,
        Err(message) => {
            return match dialect.auth_failure {
                AuthFailure::Http401Json => refuse(Response::error(Status::UNAUTHORIZED, message)),
                AuthFailure::Http403 => refuse(Response::error(Status::FORBIDDEN, message)),
                AuthFailure::CloseAfterOpen(code) => {
                    Outcome::Upgrade(Box::new(Upgrade { dialect, stream, identity: Err(code), response, since: None }))
                }
            };
        }
    };
    if let Err(refusal) = admit(&identity, shared) {
        return refuse(refusal);
    }
    let since = req.query_param("since").filter(|s| !s.is_empty());
    Outcome::Upgrade(Box::new(Upgrade { dialect, stream, identity: Ok(identity), response, since }))
}

/// A key is the base64 encoding of 16 bytes: 22 characters and `==`.
fn is_valid_ws_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24 && b[22..] == *b"==" && b[..22].iter().all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

fn switching_protocols(key: &str) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

fn now_rfc3339() -> String {
    message::rfc3339_millis(SystemTime::now())
}

/// Every counter, with the gauges that live outside the metrics.
fn snapshot(shared: &Shared) -> metrics::Snapshot {
    shared.metrics.snapshot(shared.routing.table.user_count(), shared.routing.table.topic_count())
}

fn health(shared: &Shared) -> Response {
    let snapshot = snapshot(shared);
    let redis = &shared.metrics.redis;
    let (healthy, redis_json) = if !redis.configured {
        (true, serde_json::json!({ "status": "embedded" }))
    } else if redis.is_up() {
        let ping_ms = redis.ping_micros.load(Relaxed) as f64 / 1000.0;
        (true, serde_json::json!({ "status": "connected", "ping_ms": (ping_ms * 100.0).round() / 100.0 }))
    } else {
        let error = redis.last_error.lock().map(|e| *e).unwrap_or_default();
        let error = if error.is_empty() { "not connected yet" } else { error };
        (false, serde_json::json!({ "status": "disconnected", "error": error }))
    };
    let body = serde_json::json!({
        "status": if healthy { "healthy" } else { "degraded" },
        "timestamp": now_rfc3339(),
        "redis": redis_json,
        "websocket": {
            "active_connections": snapshot.active_connections,
            "total_unique_users": snapshot.unique_users,
        },
        "uptime_seconds": snapshot.uptime_seconds,
        "instance": crate::shared::instance_name(shared.instance_id),
    });
    Response::json(if healthy { Status::OK } else { Status::SERVICE_UNAVAILABLE }, body.to_string())
}

/// Whether a load balancer should send new connections here: not while shutting down or
/// draining, and in Redis mode not before Redis was first reached (a client connected before
/// then could not receive anything published).
fn ready(shared: &Shared) -> Response {
    let redis = &shared.metrics.redis;
    let (status, why) = if shared.shutting_down.load(Relaxed) {
        (Status::SERVICE_UNAVAILABLE, Some("draining"))
    } else if redis.configured && !redis.ever_up.load(Relaxed) {
        (Status::SERVICE_UNAVAILABLE, Some("waiting for redis"))
    } else {
        (Status::OK, None)
    };
    let body = match why {
        None => serde_json::json!({"status": "ready"}),
        Some(why) => serde_json::json!({"status": "not ready", "reason": why}),
    };
    Response::json(status, body.to_string())
}

fn metrics(req: &Request, shared: &Shared) -> Response {
    let snapshot = snapshot(shared);
    if metrics::prefers_prometheus(req.accept.as_deref()) {
        Response::text(Status::OK, "text/plain; version=0.0.4; charset=utf-8", snapshot.to_prometheus())
    } else {
        Response::json(Status::OK, snapshot.to_json(&now_rfc3339()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_keys_are_checked() {
        assert!(is_valid_ws_key("dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!is_valid_ws_key("dGhlIHNhbXBsZSBub25jZQ"));
        assert!(!is_valid_ws_key("dGhlIHNhbXBsZSBub25j!Q=="));
    }

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        let response = String::from_utf8(switching_protocols("dGhlIHNhbXBsZSBub25jZQ==")).unwrap();
        assert!(response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }
}
