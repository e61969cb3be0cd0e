//! The publishing API: `/publish` and `/publish/batch` (herald's own), `/notify` (seed 001),
//! the seed-004 `/api/v1/realtime/events/*`, and `/api/disconnect`.
//!
//! Each handler authenticates the caller, validates the body and builds the notifications the
//! seed promises, and returns a [`PublishRequest`]: validated [`Outgoing`] items for the
//! broker, and how to render the broker's [`Answer`]. Nothing here knows which broker runs.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::SystemTime;

use serde::Deserialize;
use serde_json::{Value, json, value::RawValue};

use super::api::{Caller, caller, id_from_json, parse};
use super::history::HistoryQuery;
use super::presence::PresenceQuery;
use super::{Request, Response, Status};
use crate::broker::Outgoing;
use crate::ids::{Answer, Exclusion, Target, id_as_json};
use crate::message::{self, JsonScratch};
use crate::shared::Shared;

/// Most items in one `/publish/batch`.
pub const MAX_BATCH_ITEMS: usize = 1000;

/// How to answer once the broker reports what was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Responder {
    /// `{"status":"success","sent":…}` (`/publish`, `/notify`).
    Sent,
    /// `{"status":"success","sent":[…]}` in item order (`/publish/batch`).
    SentEach,
    /// Seed 004's task event: `{"status":"notifications sent","recipient_count":N}`.
    TaskRecipients(u32),
    /// Seed 004's workspace event: `{"status":"workspace notification sent"}`.
    WorkspaceSent,
    /// Seed 004's system event: `{"status":"system notification sent"}`.
    SystemSent,
    /// `/api/disconnect`: `{"status":"success","closed":N}`.
    Closed,
    /// `/api/presence`: one user's presence, or a map of several.
    Presence(Arc<PresenceQuery>),
    /// `/api/history/{user}`.
    History(Arc<HistoryQuery>),
}

impl Responder {
    pub fn render(&self, answer: &Answer) -> Response {
        let receivers: &[u64] = match answer {
            Answer::Published(receivers) => receivers,
            Answer::Closed(_) => &[],
            Answer::Presence(counts) => match self {
                Responder::Presence(query) => return query.render(counts),
                _ => &[],
            },
            Answer::History(items) => match self {
                Responder::History(query) => return query.render(items),
                _ => &[],
            },
            Answer::Failed(why) => return Response::api_error(Status::SERVICE_UNAVAILABLE, why),
        };
        let body = match self {
            Responder::Sent => format!("{{\"status\":\"success\",\"sent\":{}}}", receivers.iter().any(|&r| r > 0)),
            Responder::SentEach => {
                let mut body = String::with_capacity(32 + 6 * receivers.len());
                body.push_str("{\"status\":\"success\",\"sent\":[");
                for (i, r) in receivers.iter().enumerate() {
                    if i > 0 {
                        body.push(',');
                    }
                    body.push_str(if *r > 0 { "true" } else { "false" });
                }
                body.push_str("]}");
                body
            }
            Responder::Closed => {
                let closed = if let Answer::Closed(n) = answer { *n } else { 0 };
                format!("{{\"status\":\"success\",\"closed\":{closed}}}")
            }
            Responder::TaskRecipients(n) => format!("{{\"status\":\"notifications sent\",\"recipient_count\":{n}}}"),
            Responder::WorkspaceSent => r#"{"status":"workspace notification sent"}"#.to_string(),
            Responder::SystemSent => r#"{"status":"system notification sent"}"#.to_string(),
            Responder::Presence(query) => return query.render(&[]),
            Responder::History(query) => return query.render(&Default::default()),
        };
        Response::json(Status::OK, body)
    }
}

/// Validated notifications waiting for the broker, and how to answer.
pub struct PublishRequest {
    pub items: Vec<Outgoing>,
    pub respond: Responder,
}

/// A plain user may address only its own user.
fn permitted(caller: &Caller, targets: &[Target]) -> Result<(), Response> {
    match caller {
        Caller::User { user } if targets.iter().any(|t| !t.is_user() || t.name() != &**user) => {
            Err(Response::api_error(Status::FORBIDDEN, "a user token may publish to its own user only"))
        }
        _ => Ok(()),
    }
}

fn bad_request(message: &str) -> Response {
    Response::api_error(Status::BAD_REQUEST, message)
}

fn sort_dedup(targets: &mut Vec<Target>) {
    targets.sort();
    targets.dedup();
}

/// Validates `message` for `targets`. What herald will not deliver is refused here (an
/// oversized message is 413), so `sent:true` is never answered for a message some instance
/// would drop.
fn prepare(
    shared: &Shared,
    scratch: &mut JsonScratch,
    mut targets: Vec<Target>,
    message: &[u8],
    exclusion: Exclusion,
) -> Result<Outgoing, Response> {
    sort_dedup(&mut targets);
    let valid =
        message::validate_notification(message, shared.config.max_message_bytes, scratch).map_err(|why| match why {
            message::Invalid::TooLarge => Response::api_error(Status::PAYLOAD_TOO_LARGE, why.describe()),
            _ => bad_request(why.describe()),
        })?;
    Ok(Outgoing::new(targets, valid, exclusion))
}

/// A publish request the caller may make, or the refusal to answer with.
pub type Accepted = Result<PublishRequest, Response>;

fn finish(result: Result<(Vec<Outgoing>, Responder), Response>, shared: &Shared) -> Accepted {
    let (items, respond) = result?;
    shared.metrics.received_from_http.fetch_add(items.len() as u64, Relaxed);
    Ok(PublishRequest { items, respond })
}

/// `POST /publish` body (also one `/publish/batch` item). `message` stays raw so its bytes
/// reach clients unchanged.
#[derive(Deserialize)]
struct PublishBody<'a> {
    user_id: Option<Value>,
    user_ids: Option<Vec<Value>>,
    topic: Option<Value>,
    #[serde(borrow)]
    message: Option<&'a RawValue>,
}

/// `{"items":[…]}` of `/publish/batch`.
#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    items: Option<Vec<PublishBody<'a>>>,
}

/// Validates one `/publish` body for `caller`.
fn publish_item(
    body: PublishBody<'_>,
    caller: &Caller,
    shared: &Shared,
    scratch: &mut JsonScratch,
) -> Result<Outgoing, Response> {
    let mut targets = Vec::new();
    if let Some(user) = &body.user_id {
        let user = id_from_json(user).ok_or_else(|| bad_request("user_id must be a string or integer"))?;
        targets.push(Target::user(&user));
    }
    for user in body.user_ids.iter().flatten() {
        let user = id_from_json(user).ok_or_else(|| bad_request("user_ids must hold strings or integers"))?;
        targets.push(Target::user(&user));
    }
    if let Some(topic) = &body.topic {
        let topic =
            topic.as_str().filter(|t| !t.is_empty()).ok_or_else(|| bad_request("topic must be a non-empty string"))?;
        targets.push(Target::topic(topic));
    }
    if targets.is_empty() {
        return Err(bad_request("missing user_id, user_ids or topic"));
    }
    let message = body.message.ok_or_else(|| bad_request("missing message"))?;
    permitted(caller, &targets)?;
    prepare(shared, scratch, targets, message.get().as_bytes(), Exclusion::default())
}

/// `POST /publish` `{"user_id"|"user_ids"|"topic", "message":{…}}`.
pub fn publish(req: &Request, peer: IpAddr, shared: &Shared, scratch: &mut JsonScratch) -> Accepted {
    let result = (|| {
        let caller = caller(req, peer, shared)?;
        let body: PublishBody<'_> = serde_json::from_slice(&req.body)
            .map_err(|_| bad_request("body must be a JSON object with user_id, user_ids or topic, and message"))?;
        Ok((vec![publish_item(body, &caller, shared, scratch)?], Responder::Sent))
    })();
    finish(result, shared)
}

/// `POST /publish/batch` `{"items":[<a /publish body>, …]}`: every item is validated before
/// any is published (all or nothing); a bad item fails the batch, naming its index.
pub fn publish_batch(req: &Request, peer: IpAddr, shared: &Shared, scratch: &mut JsonScratch) -> Accepted {
    let result = (|| {
        let caller = caller(req, peer, shared)?;
        let body: BatchBody<'_> = serde_json::from_slice(&req.body)
            .map_err(|_| bad_request("body must be a JSON object with an items array of /publish bodies"))?;
        let bodies = body.items.ok_or_else(|| bad_request("missing items"))?;
        if bodies.is_empty() || bodies.len() > MAX_BATCH_ITEMS {
            return Err(bad_request(&format!("items must hold 1 to {MAX_BATCH_ITEMS} entries")));
        }
        let mut items = Vec::with_capacity(bodies.len());
        for (i, body) in bodies.into_iter().enumerate() {
            let item = publish_item(body, &caller, shared, scratch)
                .map_err(|refusal| refusal.prefixed(&format!("item {i}")))?;
            items.push(item);
        }
        Ok((items, Responder::SentEach))
    })();
    finish(result, shared)
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
pub fn notify(req: &Request, peer: IpAddr, shared: &Shared, scratch: &mut JsonScratch) -> Accepted {
    let result = (|| {
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
        let targets = vec![Target::user(&user)];
        permitted(&caller, &targets)?;
        let message = json!({"channel": "notifications", "title": title, "message": text, "type": kind});
        let item = prepare(shared, scratch, targets, message.to_string().as_bytes(), Exclusion::default())?;
        Ok((vec![item], Responder::Sent))
    })();
    finish(result, shared)
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

fn scalar_id(value: &Value, field: &str) -> Result<String, Response> {
    id_from_json(value).ok_or_else(|| bad_request(&format!("{field} must be a string or integer")))
}

/// The caller's own user, for seed-004 defaults; the API key has none.
fn default_user(caller: &Caller, field: &str) -> Result<Arc<str>, Response> {
    caller.user().cloned().ok_or_else(|| bad_request(&format!("{field} is required when calling with the API key")))
}

/// `POST /api/v1/realtime/events/{task|workspace|system}` (seed 004).
pub fn event(kind: &str, req: &Request, peer: IpAddr, shared: &Shared, scratch: &mut JsonScratch) -> Accepted {
    let result = (|| {
        let caller = caller(req, peer, shared)?;
        match kind {
            "task" => {
                let event: TaskEvent = parse(&req.body)?;
                let task_id = scalar_id(&event.task_id, "task_id")?;
                let mut targets = Vec::new();
                for user in event.target_user_ids.iter().flatten() {
                    targets.push(Target::user(&scalar_id(user, "target_user_ids")?));
                }
                if targets.is_empty() {
                    targets.push(Target::user(&default_user(&caller, "target_user_ids")?));
                }
                let recipients = targets.len();
                let workspace = event.workspace_id.as_ref().map(|w| scalar_id(w, "workspace_id")).transpose()?;
                if let Some(workspace) = &workspace {
                    targets.push(Target::topic(&format!("workspace:{workspace}")));
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
                Ok((vec![prepare(shared, scratch, targets, message.as_bytes(), Exclusion::default())?], respond))
            }
            "workspace" => {
                let event: WorkspaceEvent = parse(&req.body)?;
                let workspace = scalar_id(&event.workspace_id, "workspace_id")?;
                let mut excluded = Vec::new();
                for user in event.exclude_user_ids.iter().flatten() {
                    excluded.push(Arc::<str>::from(scalar_id(user, "exclude_user_ids")?));
                }
                let targets = vec![Target::topic(&format!("workspace:{workspace}"))];
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
                Ok((vec![prepare(shared, scratch, targets, message.as_bytes(), exclusion)?], respond))
            }
            "system" => {
                let event: SystemEvent = parse(&req.body)?;
                let user = match &event.user_id {
                    Some(user) => Arc::from(scalar_id(user, "user_id")?),
                    None => default_user(&caller, "user_id")?,
                };
                let targets = vec![Target::user(&user)];
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
                Ok((vec![prepare(shared, scratch, targets, message.as_bytes(), Exclusion::default())?], respond))
            }
            _ => Err(Response::error(Status::NOT_FOUND, "not found")),
        }
    })();
    finish(result, shared)
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
    permitted(&caller, &[Target::user(&user)])?;
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
}
