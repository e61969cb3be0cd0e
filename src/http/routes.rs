//! What each request gets: upgrades on the dialect paths, health, metrics, and the publish
//! API. Decisions only; the event loop carries them out.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Instant, SystemTime};

use serde_json::Value;

use super::{Method, Request, Response, Status};
use crate::auth::{Identity, MAX_USER_ID_BYTES};
use crate::dialect::{self, AuthFailure, Dialect, Stream};
use crate::frame;
use crate::message::{self, JsonScratch};
use crate::metrics;
use crate::router::{Publication, Target};
use crate::shared::Shared;

/// What the event loop should do with a request.
pub enum Outcome {
    Respond(Response),
    Upgrade(Box<Upgrade>),
    /// Hand the publication to the broker and answer when it reports back.
    Publish(Box<PendingPublish>),
}

/// An accepted upgrade. When `identity` is `Err`, the dialect wants the failure reported
/// after the handshake: open, then close with `close_code`.
pub struct Upgrade {
    pub dialect: &'static Dialect,
    pub stream: Stream,
    pub identity: Result<Identity, u16>,
    /// The complete 101 response.
    pub response: Vec<u8>,
}

/// A validated publish awaiting the broker.
pub struct PendingPublish {
    /// Embedded mode: goes to the router.
    pub publication: Publication,
    /// Redis mode: (channel, payload) pairs for the publisher thread.
    pub redis_messages: Option<Vec<(String, Arc<[u8]>)>>,
}

/// Routes one request.
pub fn handle(req: &Request, peer: IpAddr, shared: &Shared, scratch: &mut JsonScratch) -> Outcome {
    if let Some((dialect, stream)) = dialect::for_path(&req.path) {
        return upgrade(req, dialect, stream, peer, shared);
    }
    let respond = Outcome::Respond;
    match (req.method(), req.path.as_str()) {
        (Method::Get | Method::Head, "/health") => respond(health(shared)),
        (Method::Get | Method::Head, "/metrics") => respond(metrics(req, shared)),
        (Method::Post, "/publish") => publish(req, shared, scratch),
        (_, "/health" | "/metrics" | "/publish") => {
            respond(Response::error(Status::METHOD_NOT_ALLOWED, "method not allowed"))
        }
        _ => respond(Response::error(Status::NOT_FOUND, "not found")),
    }
}

fn upgrade(req: &Request, dialect: &'static Dialect, stream: Stream, peer: IpAddr, shared: &Shared) -> Outcome {
    let config = &shared.config;
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
    if let (Some(allowed), Some(origin)) = (&config.allowed_origins, req.origin.as_deref()) {
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if !allowed.contains(&origin) {
            return refuse(Response::error(Status::FORBIDDEN, "origin not allowed").closing());
        }
    }
    if !shared.connect_rate.admit(peer, config.connect_rate_per_ip, Instant::now()) {
        return refuse(Response::error(Status::TOO_MANY_REQUESTS, "too many connections from this address").closing());
    }
    let response = switching_protocols(key);
    let token = req.query_param("token").filter(|t| !t.is_empty()).or_else(|| req.bearer().map(str::to_owned));
    let verified = match token.as_deref() {
        None => Err("missing token parameter"),
        Some(token) => shared.verifier.verify(token).map_err(|_| "invalid or expired token"),
    };
    let verified = verified.and_then(|identity| match &stream {
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
                    Outcome::Upgrade(Box::new(Upgrade { dialect, stream, identity: Err(code), response }))
                }
            };
        }
    };
    if shared.shutting_down.load(Relaxed) {
        return refuse(Response::error(Status::SERVICE_UNAVAILABLE, "shutting down").closing());
    }
    if !shared.try_reserve_websocket() {
        return refuse(Response::error(Status::SERVICE_UNAVAILABLE, "connection limit reached").closing());
    }
    let cap = config.max_connections_per_user;
    if cap != 0 && !shared.per_user.try_acquire(&identity.user, cap) {
        shared.release_websocket();
        return refuse(Response::error(Status::SERVICE_UNAVAILABLE, "per-user connection limit reached").closing());
    }
    Outcome::Upgrade(Box::new(Upgrade { dialect, stream, identity: Ok(identity), response }))
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

fn health(shared: &Shared) -> Response {
    let snapshot = shared.metrics.snapshot();
    let redis = &shared.metrics.redis;
    let (healthy, redis_json) = if !redis.configured {
        (true, serde_json::json!({ "status": "embedded" }))
    } else if redis.is_up() {
        let ping_ms = redis.ping_micros.load(Relaxed) as f64 / 1000.0;
        (true, serde_json::json!({ "status": "connected", "ping_ms": (ping_ms * 100.0).round() / 100.0 }))
    } else {
        let error = redis.last_error.lock().map(|e| e.clone()).unwrap_or_default();
        let error = if error.is_empty() { "not connected yet".to_string() } else { error };
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
    });
    Response::json(if healthy { Status::OK } else { Status::SERVICE_UNAVAILABLE }, body.to_string())
}

fn metrics(req: &Request, shared: &Shared) -> Response {
    let snapshot = shared.metrics.snapshot();
    if metrics::prefers_prometheus(req.accept.as_deref()) {
        Response::text(Status::OK, "text/plain; version=0.0.4; charset=utf-8", snapshot.to_prometheus())
    } else {
        Response::json(Status::OK, snapshot.to_json(&now_rfc3339()))
    }
}

/// Who is calling the publish API.
enum Caller {
    /// HERALD_API_KEY, or a token with scope `publish`: any target.
    Publisher,
    /// A plain user token: its own user only.
    User(Arc<str>),
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn caller(req: &Request, shared: &Shared) -> Result<Caller, Response> {
    let unauthorized = || Response::api_error(Status::UNAUTHORIZED, "missing or invalid credentials");
    let bearer = req.bearer().ok_or_else(unauthorized)?;
    if let Some(key) = &shared.config.api_key {
        if constant_time_eq(bearer.as_bytes(), key.as_bytes()) {
            return Ok(Caller::Publisher);
        }
    }
    let identity = shared.verifier.verify(bearer).map_err(|_| unauthorized())?;
    Ok(if identity.can_publish { Caller::Publisher } else { Caller::User(identity.user) })
}

/// A user id given as a JSON string or integer.
fn id_from_json(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.is_empty() && s.len() <= MAX_USER_ID_BYTES => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// `POST /publish` body. `message` stays raw so its bytes reach clients unchanged.
#[derive(serde::Deserialize)]
struct PublishBody<'a> {
    user_id: Option<Value>,
    user_ids: Option<Vec<Value>>,
    topic: Option<Value>,
    #[serde(borrow)]
    message: Option<&'a serde_json::value::RawValue>,
}

fn bad_request(message: &str) -> Outcome {
    Outcome::Respond(Response::api_error(Status::BAD_REQUEST, message))
}

fn publish(req: &Request, shared: &Shared, scratch: &mut JsonScratch) -> Outcome {
    let caller = match caller(req, shared) {
        Ok(caller) => caller,
        Err(response) => return Outcome::Respond(response),
    };
    let Ok(body) = serde_json::from_slice::<PublishBody<'_>>(&req.body) else {
        return bad_request("body must be a JSON object with user_id, user_ids or topic, and message");
    };
    let mut targets = Vec::new();
    if let Some(user) = &body.user_id {
        let Some(user) = id_from_json(user) else { return bad_request("user_id must be a string or integer") };
        targets.push(Target::User(Arc::from(user)));
    }
    for user in body.user_ids.iter().flatten() {
        let Some(user) = id_from_json(user) else { return bad_request("user_ids must hold strings or integers") };
        targets.push(Target::User(Arc::from(user)));
    }
    if let Some(topic) = &body.topic {
        let Some(topic) = topic.as_str().filter(|t| !t.is_empty()) else {
            return bad_request("topic must be a non-empty string");
        };
        targets.push(Target::Topic(Arc::from(topic)));
    }
    if targets.is_empty() {
        return bad_request("missing user_id, user_ids or topic");
    }
    targets.sort_by(|a, b| target_key(a).cmp(&target_key(b)));
    targets.dedup();
    let Some(message) = body.message else { return bad_request("missing message") };
    if let Caller::User(own) = &caller {
        if targets.iter().any(|t| *t != Target::User(own.clone())) {
            return Outcome::Respond(Response::api_error(
                Status::FORBIDDEN,
                "a user token may publish to its own user only",
            ));
        }
    }
    // The message's own bytes, as the publisher wrote them: delivered as is.
    let frame = match message::encode_notification(
        message.get().as_bytes(),
        shared.config.max_message_bytes,
        scratch,
        SystemTime::now(),
        Instant::now(),
    ) {
        Ok(frame) => frame,
        Err(why) => return bad_request(why.describe()),
    };
    shared.metrics.received_from_http.fetch_add(1, Relaxed);
    Outcome::Publish(Box::new(pending(shared, targets, frame, None)))
}

fn target_key(target: &Target) -> (u8, &str) {
    match target {
        Target::User(u) => (0, u),
        Target::Topic(t) => (1, t),
    }
}

/// Packages a validated message for whichever broker runs: the router itself (embedded)
/// or Redis (the payload without its frame header, for every instance to frame).
fn pending(
    shared: &Shared,
    targets: Vec<Target>,
    frame: frame::SharedFrame,
    exclude_users: Option<Arc<[Arc<str>]>>,
) -> PendingPublish {
    let redis_messages = shared.publisher.as_ref().map(|_| {
        let payload: Arc<[u8]> = Arc::from(&frame.bytes[frame::header_len_of(&frame.bytes)..]);
        targets
            .iter()
            .map(|t| {
                let channel = match t {
                    Target::User(u) => format!("{}{u}", shared.config.user_channel_prefix),
                    Target::Topic(topic) => format!("{}{topic}", shared.config.topic_channel_prefix),
                };
                (channel, payload.clone())
            })
            .collect()
    });
    PendingPublish { publication: Publication { targets, frame, exclude_users, reply: None }, redis_messages }
}

/// The body of a successful publish response.
pub fn publish_result(sent: bool) -> Response {
    Response::json(Status::OK, format!("{{\"status\":\"success\",\"sent\":{sent}}}"))
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
