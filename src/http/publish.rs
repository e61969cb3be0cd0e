//! The publishing API: `/publish` (herald's own), `/notify` (seed 001), the seed-004
//! `/api/v1/realtime/events/*`, and `/api/disconnect`.
//!
//! Each handler authenticates the caller, validates the body, builds the notification the
//! seed promises, and returns a [`PendingPublish`]: the event loop hands it to the broker and
//! renders the answer with `respond` once the broker says whether anyone was addressed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use serde::Deserialize;
use serde_json::{Value, json, value::RawValue};

use super::routes::Outcome;
use super::{Request, Response, Status};
use crate::auth::MAX_USER_ID_BYTES;
use crate::frame::{self, SharedFrame};
use crate::message::{self, JsonScratch};
use crate::router::{Exclusion, Publication, Target};
use crate::shared::Shared;

/// How to answer once the broker reports whether anyone was addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Responder {
    /// `{"status":"success","sent":…}` (`/publish`, `/notify`).
    Sent,
    /// Seed 004's task event: `{"status":"notifications sent","recipient_count":N}`.
    TaskRecipients(u32),
    /// Seed 004's workspace event: `{"status":"workspace notification sent"}`.
    WorkspaceSent,
    /// Seed 004's system event: `{"status":"system notification sent"}`.
    SystemSent,
    /// `/api/disconnect`: `{"status":"success","closed":N}`.
    Closed,
}

impl Responder {
    /// `count`: loops or Redis receivers addressed (publishes), connections closed (disconnect).
    pub fn render(self, count: u64) -> Response {
        let body = match self {
            Responder::Sent => format!("{{\"status\":\"success\",\"sent\":{}}}", count > 0),
            Responder::Closed => format!("{{\"status\":\"success\",\"closed\":{count}}}"),
            Responder::TaskRecipients(n) => format!("{{\"status\":\"notifications sent\",\"recipient_count\":{n}}}"),
            Responder::WorkspaceSent => r#"{"status":"workspace notification sent"}"#.to_string(),
            Responder::SystemSent => r#"{"status":"system notification sent"}"#.to_string(),
        };
        Response::json(Status::OK, body)
    }
}

/// A validated publication waiting for the broker.
pub struct PendingPublish {
    /// Embedded mode: goes to the router.
    pub publication: Publication,
    /// Redis mode: (channel, payload) pairs for the publisher thread.
    pub redis_messages: Option<Vec<(String, Arc<[u8]>)>>,
    pub respond: Responder,
}

/// Who is calling.
enum Caller {
    /// HERALD_API_KEY: any target, no user of its own.
    ApiKey,
    /// A token with scope `publish`: any target; `user` is the caller for seed-004 defaults.
    Publisher { user: Arc<str> },
    /// A plain user token: its own user only.
    User { user: Arc<str> },
}

impl Caller {
    fn user(&self) -> Option<&Arc<str>> {
        match self {
            Caller::ApiKey => None,
            Caller::Publisher { user } | Caller::User { user } => Some(user),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Failed API authentications tolerated from one client address before it is refused…
const AUTH_FAILURE_BURST: f64 = 20.0;
/// …and how many more it may make per second after that.
const AUTH_FAILURE_REFILL_PER_SECOND: f64 = 5.0;
const AUTH_FAILURE_SHARDS: usize = 16;
/// Addresses tracked per shard; past it, fully refilled buckets are forgotten.
const AUTH_FAILURE_MAX_TRACKED: usize = 4096;

/// Token buckets of failed API authentications per client address, so the API key and
/// token signatures cannot be guessed at the speed of the network. Only failures take a
/// token; a caller whose credential is good never waits or counts. IPv6 clients are
/// bucketed per /64, the smallest block one subscriber usually holds.
#[derive(Default)]
pub struct AuthFailureLimit {
    shards: [Mutex<HashMap<IpAddr, (f64, Instant)>>; AUTH_FAILURE_SHARDS],
}

impl AuthFailureLimit {
    fn bucket_key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            },
        }
    }

    fn shard(&self, key: &IpAddr) -> &Mutex<HashMap<IpAddr, (f64, Instant)>> {
        use std::hash::BuildHasher;
        let hasher = std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
        &self.shards[(hasher.hash_one(key) as usize) % AUTH_FAILURE_SHARDS]
    }

    fn refilled(tokens: f64, since: Instant, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(since).as_secs_f64();
        (tokens + elapsed * AUTH_FAILURE_REFILL_PER_SECOND).min(AUTH_FAILURE_BURST)
    }

    /// Whether `ip` has used up its failures: answer without looking at the credential.
    pub fn exhausted(&self, ip: IpAddr, now: Instant) -> bool {
        let key = Self::bucket_key(ip);
        let Ok(map) = self.shard(&key).lock() else { return false };
        map.get(&key).is_some_and(|&(tokens, since)| Self::refilled(tokens, since, now) < 1.0)
    }

    /// Counts one failed authentication from `ip`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let key = Self::bucket_key(ip);
        let Ok(mut map) = self.shard(&key).lock() else { return };
        if map.len() >= AUTH_FAILURE_MAX_TRACKED && !map.contains_key(&key) {
            // Full: forget the buckets that have refilled, they hold no information. If that
            // frees too little, forget them all: whoever fails from this many addresses has
            // this many budgets anyway, and clearing keeps the cost per failure O(1) amortized
            // instead of a scan of the shard for every new address.
            map.retain(|_, &mut (tokens, since)| Self::refilled(tokens, since, now) < AUTH_FAILURE_BURST);
            if map.len() > AUTH_FAILURE_MAX_TRACKED * 3 / 4 {
                map.clear();
            }
        }
        let (tokens, since) = map.entry(key).or_insert((AUTH_FAILURE_BURST, now));
        *tokens = (Self::refilled(*tokens, *since, now) - 1.0).max(0.0);
        *since = now;
    }
}

fn caller(req: &Request, peer: IpAddr, shared: &Shared) -> Result<Caller, Response> {
    let limit = &shared.auth_failures;
    let now = Instant::now();
    if limit.exhausted(peer, now) {
        shared.metrics.api_auth_rate_limited.fetch_add(1, Relaxed);
        return Err(Response::api_error(Status::TOO_MANY_REQUESTS, "too many failed authentications")
            .header("Retry-After", "1"));
    }
    let unauthorized = || {
        limit.failed(peer, now);
        shared.metrics.api_auth_failures.fetch_add(1, Relaxed);
        Response::api_error(Status::UNAUTHORIZED, "missing or invalid credentials")
    };
    let bearer = req.bearer().ok_or_else(unauthorized)?;
    if let Some(key) = &shared.config.api_key {
        if constant_time_eq(bearer.as_bytes(), key.as_bytes()) {
            return Ok(Caller::ApiKey);
        }
    }
    let identity = shared.verifier.verify(bearer).map_err(|_| unauthorized())?;
    Ok(if identity.can_publish {
        Caller::Publisher { user: identity.user }
    } else {
        Caller::User { user: identity.user }
    })
}

/// A plain user may address only its own user.
fn permitted(caller: &Caller, targets: &[Target]) -> Result<(), Response> {
    match caller {
        Caller::User { user } if targets.iter().any(|t| *t != Target::User(user.clone())) => {
            Err(Response::api_error(Status::FORBIDDEN, "a user token may publish to its own user only"))
        }
        _ => Ok(()),
    }
}

/// A user id given as a JSON string or integer.
fn id_from_json(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.is_empty() && s.len() <= MAX_USER_ID_BYTES => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// An id as JSON: seed 004's ids are integers, so an id that is the canonical decimal form
/// of an `i64` becomes that number; any other id stays the string it is. Canonical means
/// what `i64::to_string` writes: no `+`, no leading zeros (`"0"` itself is fine), and a `-`
/// only on a non-zero number, so `"-7"` is the number -7 (an integer `sub` claim of -7 is
/// the user `"-7"`, and must come back as -7) while `"0042"`, `"+42"`, `"-0"` and
/// `"9223372036854775808"` stay strings. Every id thus maps to exactly one JSON value and
/// back: two users can never be rendered as the same sender.
pub fn id_as_json(id: &str) -> Value {
    match id.parse::<i64>() {
        Ok(n) if n.to_string() == id => Value::from(n),
        _ => Value::String(id.to_owned()),
    }
}

fn bad_request(message: &str) -> Response {
    Response::api_error(Status::BAD_REQUEST, message)
}

fn sort_dedup(targets: &mut Vec<Target>) {
    fn key(target: &Target) -> (u8, &str) {
        match target {
            Target::User(u) => (0, u),
            Target::Topic(t) => (1, t),
        }
    }
    targets.sort_by(|a, b| key(a).cmp(&key(b)));
    targets.dedup();
}

/// Validates `message`, frames it, and packages it for whichever broker runs.
fn prepare(
    shared: &Shared,
    scratch: &mut JsonScratch,
    mut targets: Vec<Target>,
    message: &[u8],
    exclusion: Exclusion,
    respond: Responder,
) -> Result<PendingPublish, Response> {
    sort_dedup(&mut targets);
    let frame = message::encode_notification(
        message,
        shared.config.max_message_bytes,
        scratch,
        SystemTime::now(),
        Instant::now(),
    )
    .map_err(|why| bad_request(why.describe()))?;
    shared.metrics.received_from_http.fetch_add(1, Relaxed);
    Ok(package(shared, targets, frame, exclusion, respond))
}

/// Packages a framed message: for the router itself (embedded), or for Redis (the payload,
/// with any exclusion embedded so that every instance honours it).
pub fn package(
    shared: &Shared,
    targets: Vec<Target>,
    frame: SharedFrame,
    exclusion: Exclusion,
    respond: Responder,
) -> PendingPublish {
    let redis_messages = shared.publisher.as_ref().map(|_| {
        let payload = &frame.bytes[frame::header_len_of(&frame.bytes)..];
        let payload: Arc<[u8]> = Arc::from(crate::message::embed_exclusion(payload, &exclusion));
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
    PendingPublish { publication: Publication { targets, frame, exclusion, reply: None }, redis_messages, respond }
}

fn finish(result: Result<PendingPublish, Response>) -> Outcome {
    match result {
        Ok(pending) => Outcome::Publish(Box::new(pending)),
        Err(response) => Outcome::Respond(response),
    }
}

/// `POST /publish` body. `message` stays raw so its bytes reach clients unchanged.
#[derive(Deserialize)]
struct PublishBody<'a> {
    user_id: Option<Value>,
    user_ids: Option<Vec<Value>>,
    topic: Option<Value>,
    #[serde(borrow)]
    message: Option<&'a RawValue>,
}

/// `POST /publish` `{"user_id"|"user_ids"|"topic", "message":{…}}`.
pub fn publish(req: &Request, peer: IpAddr, shared: &Shared, scratch: &mut JsonScratch) -> Outcome {
    finish((|| {
        let caller = caller(req, peer, shared)?;
        let body: PublishBody<'_> = serde_json::from_slice(&req.body)
            .map_err(|_| bad_request("body must be a JSON object with user_id, user_ids or topic, and message"))?;
        let mut targets = Vec::new();
        if let Some(user) = &body.user_id {
            let user = id_from_json(user).ok_or_else(|| bad_request("user_id must be a string or integer"))?;
            targets.push(Target::User(Arc::from(user)));
        }
        for user in body.user_ids.iter().flatten() {
            let user = id_from_json(user).ok_or_else(|| bad_request("user_ids must hold strings or integers"))?;
            targets.push(Target::User(Arc::from(user)));
        }
        if let Some(topic) = &body.topic {
            let topic = topic
                .as_str()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| bad_request("topic must be a non-empty string"))?;
            targets.push(Target::Topic(Arc::from(topic)));
        }
        if targets.is_empty() {
            return Err(bad_request("missing user_id, user_ids or topic"));
        }
        let message = body.message.ok_or_else(|| bad_request("missing message"))?;
        permitted(&caller, &targets)?;
        prepare(shared, scratch, targets, message.get().as_bytes(), Exclusion::default(), Responder::Sent)
    })())
}

#[derive(Deserialize)]
struct NotifyBody {
    user_id: Option<Value>,
    title: Option<String>,
    message: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// `POST /notify` (seed 001): `{"user_id","title","message","type"}`.
pub fn notify(req: &Request, peer: IpAddr, shared: &Shared, scratch: &mut JsonScratch) -> Outcome {
    finish((|| {
        let caller = caller(req, peer, shared)?;
        let body: NotifyBody =
            serde_json::from_slice(&req.body).map_err(|_| bad_request("body must be a JSON object"))?;
        let user = body
            .user_id
            .as_ref()
            .and_then(id_from_json)
            .ok_or_else(|| bad_request("missing user_id (a string or integer)"))?;
        let title = body.title.ok_or_else(|| bad_request("missing title"))?;
        let text = body.message.ok_or_else(|| bad_request("missing message"))?;
        let kind = body.kind.unwrap_or_else(|| "info".into());
        let targets = vec![Target::User(Arc::from(user))];
        permitted(&caller, &targets)?;
        let message = json!({"channel": "notifications", "title": title, "message": text, "type": kind});
        prepare(shared, scratch, targets, message.to_string().as_bytes(), Exclusion::default(), Responder::Sent)
    })())
}

/// The seed-004 notification object.
struct Seed004<'a> {
    title: &'a str,
    content: &'a str,
    notification_type: &'a str,
    related_entity_type: Value,
    related_entity_id: Value,
    data: Value,
}

fn seed004_message(shared: &Shared, n: Seed004<'_>) -> String {
    json!({
        "type": "notification",
        "notification_id": shared.next_notification_id.fetch_add(1, Relaxed) + 1,
        "title": n.title,
        "content": n.content,
        "notification_type": n.notification_type,
        "related_entity_type": n.related_entity_type,
        "related_entity_id": n.related_entity_id,
        "created_at": message::rfc3339_millis(SystemTime::now()),
        "data": n.data,
    })
    .to_string()
}

#[derive(Deserialize)]
struct TaskEvent {
    task_id: Value,
    title: String,
    action: String,
    workspace_id: Option<Value>,
    target_user_ids: Option<Vec<Value>>,
}

#[derive(Deserialize)]
struct WorkspaceEvent {
    workspace_id: Value,
    title: String,
    content: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    related_entity_type: Option<Value>,
    related_entity_id: Option<Value>,
    data: Option<Value>,
    exclude_user_ids: Option<Vec<Value>>,
}

#[derive(Deserialize)]
struct SystemEvent {
    title: String,
    content: String,
    user_id: Option<Value>,
    data: Option<Value>,
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| bad_request(&format!("invalid body: {e}")))
}

fn scalar_id(value: &Value, field: &str) -> Result<String, Response> {
    id_from_json(value).ok_or_else(|| bad_request(&format!("{field} must be a string or integer")))
}

/// The caller's own user, for seed-004 defaults; the API key has none.
fn default_user(caller: &Caller, field: &str) -> Result<Arc<str>, Response> {
    caller.user().cloned().ok_or_else(|| bad_request(&format!("{field} is required when calling with the API key")))
}

/// `POST /api/v1/realtime/events/{task|workspace|system}` (seed 004).
pub fn event(kind: &str, req: &Request, peer: IpAddr, shared: &Shared, scratch: &mut JsonScratch) -> Outcome {
    finish((|| {
        let caller = caller(req, peer, shared)?;
        match kind {
            "task" => {
                let event: TaskEvent = parse(&req.body)?;
                let task_id = scalar_id(&event.task_id, "task_id")?;
                let mut targets = Vec::new();
                for user in event.target_user_ids.iter().flatten() {
                    targets.push(Target::User(Arc::from(scalar_id(user, "target_user_ids")?)));
                }
                if targets.is_empty() {
                    targets.push(Target::User(default_user(&caller, "target_user_ids")?));
                }
                let recipients = targets.len();
                let workspace = event.workspace_id.as_ref().map(|w| scalar_id(w, "workspace_id")).transpose()?;
                if let Some(workspace) = &workspace {
                    targets.push(Target::Topic(Arc::from(format!("workspace:{workspace}"))));
                }
                permitted(&caller, &targets)?;
                let content = format!("Task '{}' was {}", event.title, event.action);
                let message = seed004_message(
                    shared,
                    Seed004 {
                        title: &event.title,
                        content: &content,
                        notification_type: "task",
                        related_entity_type: json!("task"),
                        related_entity_id: id_as_json(&task_id),
                        data: json!({
                            "task_id": id_as_json(&task_id),
                            "action": event.action,
                            "workspace_id": workspace.as_deref().map(id_as_json),
                            "actor_id": caller.user().map(|u| id_as_json(u)),
                        }),
                    },
                );
                let respond = Responder::TaskRecipients(recipients as u32);
                prepare(shared, scratch, targets, message.as_bytes(), Exclusion::default(), respond)
            }
            "workspace" => {
                let event: WorkspaceEvent = parse(&req.body)?;
                let workspace = scalar_id(&event.workspace_id, "workspace_id")?;
                let mut excluded = Vec::new();
                for user in event.exclude_user_ids.iter().flatten() {
                    excluded.push(Arc::<str>::from(scalar_id(user, "exclude_user_ids")?));
                }
                let targets = vec![Target::Topic(Arc::from(format!("workspace:{workspace}")))];
                permitted(&caller, &targets)?;
                let kind = event.kind.unwrap_or_else(|| "workspace".into());
                let message = seed004_message(
                    shared,
                    Seed004 {
                        title: &event.title,
                        content: &event.content,
                        notification_type: &kind,
                        related_entity_type: event.related_entity_type.unwrap_or_else(|| json!("workspace")),
                        related_entity_id: event.related_entity_id.unwrap_or_else(|| id_as_json(&workspace)),
                        data: event.data.unwrap_or_else(|| json!({})),
                    },
                );
                let exclusion =
                    Exclusion { users: (!excluded.is_empty()).then(|| excluded.into()), ..Exclusion::default() };
                let respond = Responder::WorkspaceSent;
                prepare(shared, scratch, targets, message.as_bytes(), exclusion, respond)
            }
            "system" => {
                let event: SystemEvent = parse(&req.body)?;
                let user = match &event.user_id {
                    Some(user) => Arc::from(scalar_id(user, "user_id")?),
                    None => default_user(&caller, "user_id")?,
                };
                let targets = vec![Target::User(user)];
                permitted(&caller, &targets)?;
                let message = seed004_message(
                    shared,
                    Seed004 {
                        title: &event.title,
                        content: &event.content,
                        notification_type: "system",
                        related_entity_type: Value::Null,
                        related_entity_id: Value::Null,
                        data: event.data.unwrap_or_else(|| json!({})),
                    },
                );
                let respond = Responder::SystemSent;
                prepare(shared, scratch, targets, message.as_bytes(), Exclusion::default(), respond)
            }
            _ => Err(Response::error(Status::NOT_FOUND, "not found")),
        }
    })())
}

/// `POST /api/disconnect` `{"user_id"}`: the user to disconnect, once authorized.
pub fn disconnect_target(req: &Request, peer: IpAddr, shared: &Shared) -> Result<Arc<str>, Response> {
    #[derive(Deserialize)]
    struct Body {
        user_id: Option<Value>,
    }
    let caller = caller(req, peer, shared)?;
    let body: Body = parse(&req.body)?;
    let user: Arc<str> = Arc::from(
        body.user_id
            .as_ref()
            .and_then(id_from_json)
            .ok_or_else(|| bad_request("missing user_id (a string or integer)"))?,
    );
    permitted(&caller, &[Target::User(user.clone())])?;
    Ok(user)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_render_as_numbers_only_in_canonical_form() {
        assert_eq!(id_as_json("42"), json!(42));
        assert_eq!(id_as_json("0"), json!(0));
        assert_eq!(id_as_json("-7"), json!(-7));
        assert_eq!(id_as_json("9223372036854775807"), json!(i64::MAX));
        for id in ["0042", "+42", "-0", "00", " 42", "42 ", "9223372036854775808", "u42", "", "1e3", "٤٢"] {
            assert_eq!(id_as_json(id), json!(id), "{id:?}");
        }
        assert_eq!(id_from_json(&json!(7)), Some("7".into()));
        assert_eq!(id_from_json(&json!(1.5)), None);
        assert_eq!(id_from_json(&json!("")), None);
    }

    #[test]
    fn failed_authentications_are_limited_per_address_and_refill() {
        let limit = AuthFailureLimit::default();
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..20 {
            assert!(!limit.exhausted(a, t0));
            limit.failed(a, t0);
        }
        assert!(limit.exhausted(a, t0));
        assert!(!limit.exhausted(b, t0), "another address is not affected");
        // 5 per second: one more failure allowed after 200 ms.
        let later = t0 + std::time::Duration::from_millis(200);
        assert!(!limit.exhausted(a, later));
        limit.failed(a, later);
        assert!(limit.exhausted(a, later));
        assert!(!limit.exhausted(a, later + std::time::Duration::from_secs(4)));
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_64() {
        let limit = AuthFailureLimit::default();
        let t0 = Instant::now();
        for i in 0..20u16 {
            limit.failed(format!("2001:db8:1:2::{i:x}").parse().unwrap(), t0);
        }
        assert!(limit.exhausted("2001:db8:1:2:ffff::1".parse().unwrap(), t0));
        assert!(!limit.exhausted("2001:db8:1:3::1".parse().unwrap(), t0));
        for _ in 0..20 {
            limit.failed("::ffff:192.0.2.9".parse().unwrap(), t0);
        }
        assert!(limit.exhausted("192.0.2.9".parse().unwrap(), t0), "v4-mapped is the v4 address");
    }

    #[test]
    fn tracking_is_bounded() {
        let limit = AuthFailureLimit::default();
        let t0 = Instant::now();
        for i in 0..(AUTH_FAILURE_MAX_TRACKED * AUTH_FAILURE_SHARDS * 2) as u32 {
            limit.failed(IpAddr::V4(i.into()), t0);
        }
        let tracked: usize = limit.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(tracked <= AUTH_FAILURE_MAX_TRACKED * AUTH_FAILURE_SHARDS, "{tracked}");
    }
}
