//! `GET /sse`: who may open a Server-Sent Events stream, with which topics, and the response
//! head that starts it; `OPTIONS /sse`: the CORS preflight. Decisions only: the event loop
//! opens the stream (`event_loop::sse`).
//!
//! The checks are the WebSocket upgrade's, in its order: Origin, token (401 JSON as `/ws`),
//! topic claims (403 JSON), shutdown and admission (503) last, since admission reserves the
//! connection's slot.

use super::access;
use super::{Method, Request, Response, Status};
use crate::auth::Identity;
use crate::ids::MAX_TOPICS_PER_CONNECTION;
use crate::shared::Shared;

/// How long a browser may cache the preflight's answer.
const PREFLIGHT_MAX_AGE_SECS: u32 = 3600;

/// An admitted event stream, for the event loop to open.
pub struct Open {
    pub identity: Identity,
    /// Topics it receives besides the user's own notifications (each allowed by the token).
    pub topics: Vec<String>,
    /// Where to resume from: the `Last-Event-ID` header, else the `since` query parameter.
    /// Carried for history; ignored while history is off.
    pub since: Option<String>,
    /// The response head and the stream's first bytes.
    pub head: Vec<u8>,
}

/// Routes a request on `/sse`: the stream to open, or the response that answers it.
pub fn route(req: &Request, shared: &Shared) -> Result<Box<Open>, Response> {
    match req.method() {
        Method::Get => open(req, shared),
        Method::Options => Err(preflight(req, shared)),
        _ => Err(Response::error(Status::METHOD_NOT_ALLOWED, "method not allowed").header("Allow", "GET, OPTIONS")),
    }
}

fn open(req: &Request, shared: &Shared) -> Result<Box<Open>, Response> {
    let Some(cors) = cors(req, shared) else {
        return Err(Response::error(Status::FORBIDDEN, "origin not allowed").closing());
    };
    // Refusals carry the CORS headers too, so a script (fetch-based clients) can read why.
    let refuse = |response: Response| Err(with_cors(response, cors.as_deref()));
    let identity = match access::authenticate(req, shared) {
        Ok(identity) => identity,
        Err(message) => return refuse(Response::error(Status::UNAUTHORIZED, message)),
    };
    let topics = match requested_topics(req) {
        Ok(topics) => topics,
        Err(message) => return refuse(Response::error(Status::BAD_REQUEST, &message)),
    };
    if let Some(denied) = topics.iter().find(|t| !identity.allows_topic(t)) {
        return refuse(Response::error(Status::FORBIDDEN, &format!("token does not allow topic {denied}")));
    }
    if let Err(refusal) = access::admit(&identity, shared) {
        return refuse(refusal);
    }
    let since = [req.last_event_id.clone(), req.query_param("since")].into_iter().flatten().find(|s| !s.is_empty());
    Ok(Box::new(Open { identity, topics, since, head: head(cors.as_deref()) }))
}

/// The `topics` query parameter: a comma list, blanks and repeats dropped.
fn requested_topics(req: &Request) -> Result<Vec<String>, String> {
    let mut topics: Vec<String> = Vec::new();
    let Some(list) = req.query_param("topics") else { return Ok(topics) };
    for topic in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if !topics.iter().any(|t| t == topic) {
            topics.push(topic.to_owned());
        }
        if topics.len() > MAX_TOPICS_PER_CONNECTION {
            return Err(format!("at most {MAX_TOPICS_PER_CONNECTION} topics per connection"));
        }
    }
    Ok(topics)
}

/// The `Access-Control-Allow-Origin` value for this request: `Some(None)` when it sent no
/// Origin (no CORS), `Some(Some(v))` to send, `None` when its Origin is not allowed.
fn cors(req: &Request, shared: &Shared) -> Option<Option<String>> {
    let Some(origin) = req.origin.as_deref() else { return Some(None) };
    if !access::origin_allowed(req, shared) {
        return None;
    }
    // With every origin allowed, `*` (the token travels in the URL or a header, never in a
    // cookie, so no credentialed request needs the origin echoed).
    let value = if shared.config.allowed_origins.is_none() { "*" } else { origin };
    Some(Some(value.to_owned()))
}

fn with_cors(response: Response, allow_origin: Option<&str>) -> Response {
    let response = response.header("Vary", "Origin");
    match allow_origin {
        Some(origin) => response.header("Access-Control-Allow-Origin", origin),
        None => response,
    }
}

fn preflight(req: &Request, shared: &Shared) -> Response {
    let Some(cors) = cors(req, shared) else {
        return Response::error(Status::FORBIDDEN, "origin not allowed").closing();
    };
    with_cors(Response::text(Status::NO_CONTENT, "text/plain", Vec::new()), cors.as_deref())
        .header("Access-Control-Allow-Methods", "GET")
        .header("Access-Control-Allow-Headers", "Authorization, Last-Event-ID")
        .header("Access-Control-Max-Age", PREFLIGHT_MAX_AGE_SECS.to_string())
}

/// The 200 that starts the stream, and its first bytes. No Content-Length and no chunking:
/// the body runs until either side closes the connection (RFC 9112 §6.3), which is also how
/// the stream ends. `X-Accel-Buffering: no` keeps nginx from holding events back.
fn head(allow_origin: Option<&str>) -> Vec<u8> {
    let mut head = String::from(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
         X-Accel-Buffering: no\r\nConnection: close\r\nVary: Origin\r\n",
    );
    if let Some(origin) = allow_origin {
        head.push_str("Access-Control-Allow-Origin: ");
        head.push_str(origin);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&crate::sse::preamble());
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Parsed, parse_request};

    fn request(raw: &str) -> Request {
        match parse_request(raw.as_bytes()) {
            Parsed::Complete { request, .. } => *request,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn topics_are_a_deduplicated_comma_list() {
        let r = request("GET /sse?topics=a,%20b,,a,project%3A7 HTTP/1.1\r\n\r\n");
        assert_eq!(requested_topics(&r).unwrap(), ["a", "b", "project:7"]);
        assert!(requested_topics(&request("GET /sse HTTP/1.1\r\n\r\n")).unwrap().is_empty());
        let many: Vec<String> = (0..=MAX_TOPICS_PER_CONNECTION).map(|i| format!("t{i}")).collect();
        let r = request(&format!("GET /sse?topics={} HTTP/1.1\r\n\r\n", many.join(",")));
        assert!(requested_topics(&r).is_err());
    }

    #[test]
    fn the_head_streams_without_a_length() {
        let head = String::from_utf8(head(Some("https://app.example"))).unwrap();
        let (fields, body) = head.split_once("\r\n\r\n").unwrap();
        assert!(fields.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(fields.contains("Content-Type: text/event-stream\r\n"));
        assert!(fields.contains("Access-Control-Allow-Origin: https://app.example"));
        assert!(!fields.to_ascii_lowercase().contains("content-length"));
        assert!(!fields.to_ascii_lowercase().contains("transfer-encoding"));
        assert_eq!(body, "retry: 2000\n\n");
    }
}
