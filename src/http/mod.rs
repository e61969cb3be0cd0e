//! HTTP/1.1 on the WebSocket port: request heads parsed from a bounded buffer (httparse), and
//! responses rendered to bytes. No I/O here; the event loop feeds bytes in and writes bytes out.

pub mod access;
pub mod api;
pub mod demo;
pub mod history;
pub mod presence;
pub mod publish;
pub mod routes;
pub mod sse;

use std::fmt::Write as _;

/// Largest request head (request line + headers) accepted; more gets 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Largest request body accepted (publish calls); more gets 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest body of `POST /publish/batch` (up to 1,000 items).
pub const MAX_BATCH_BODY_BYTES: usize = 1024 * 1024;

/// The body limit of a request to `path`.
pub fn max_body_for(path: &str) -> usize {
    if path == "/publish/batch" { MAX_BATCH_BODY_BYTES } else { MAX_BODY_BYTES }
}
const MAX_HEADERS: usize = 48;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Options,
    Other,
}

/// The parts of a request herald acts on.
#[derive(Debug, Default, Clone)]
pub struct Request {
    pub method: Option<Method>,
    pub path: String,
    pub query: Option<String>,
    /// HTTP/1.1 keeps the connection open unless told otherwise; 1.0 closes unless told.
    pub keep_alive: bool,
    pub upgrade_websocket: bool,
    pub connection_upgrade: bool,
    pub ws_key: Option<String>,
    pub ws_version: Option<String>,
    pub origin: Option<String>,
    pub authorization: Option<String>,
    pub accept: Option<String>,
    pub host: Option<String>,
    /// An EventSource's reconnection names the last event it received (SSE resume).
    pub last_event_id: Option<String>,
    pub if_none_match: Option<String>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn method(&self) -> Method {
        self.method.unwrap_or(Method::Other)
    }

    /// The bearer credential of the `Authorization` header, if any.
    pub fn bearer(&self) -> Option<&str> {
        let value = self.authorization.as_deref()?.trim();
        let (scheme, rest) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim()).filter(|t| !t.is_empty())
    }

    /// A query parameter, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key)? == name).then(|| percent_decode(value)).flatten()
        })
    }
}

pub use crate::percent::percent_decode;

/// Outcome of looking at the bytes received so far.
#[derive(Debug)]
pub enum Parsed {
    /// Need more bytes.
    Partial,
    /// A whole request; `consumed` bytes of the buffer belong to it.
    Complete { request: Box<Request>, consumed: usize },
    /// The request cannot be served; answer with this status and close.
    Error(Status),
}

/// Parses one request from the start of `buf`.
pub fn parse_request(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > MAX_HEAD_BYTES { Parsed::Error(Status::HEADERS_TOO_LARGE) } else { Parsed::Partial };
        }
        Err(httparse::Error::TooManyHeaders) => return Parsed::Error(Status::HEADERS_TOO_LARGE),
        Err(_) => return Parsed::Error(Status::BAD_REQUEST),
    };
    if head_len > MAX_HEAD_BYTES {
        return Parsed::Error(Status::HEADERS_TOO_LARGE);
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Error(Status::BAD_REQUEST);
    };
    let mut request = Request {
        method: Some(match method {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "OPTIONS" => Method::Options,
            _ => Method::Other,
        }),
        keep_alive: version == 1,
        ..Request::default()
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (target, None),
    };
    request.path = path.to_owned();
    request.query = query;
    let mut content_length: Option<usize> = None;
    for header in req.headers.iter() {
        let Ok(value) = std::str::from_utf8(header.value) else {
            return Parsed::Error(Status::BAD_REQUEST);
        };
        let value = value.trim();
        let name = header.name;
        if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("upgrade") {
                    request.connection_upgrade = true;
                } else if token.eq_ignore_ascii_case("close") {
                    request.keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    request.keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            request.upgrade_websocket = value.split(',').any(|p| p.trim().eq_ignore_ascii_case("websocket"));
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            request.ws_key = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            request.ws_version = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("origin") {
            request.origin = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("authorization") {
            request.authorization = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("accept") {
            request.accept = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("host") {
            request.host = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("last-event-id") {
            request.last_event_id = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("if-none-match") {
            request.if_none_match = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("content-length") {
            // Digits only (RFC 9112 §6.3): usize::from_str would also take "+39".
            let Some(n) = value.bytes().all(|b| b.is_ascii_digit()).then(|| value.parse::<usize>().ok()).flatten()
            else {
                return Parsed::Error(Status::BAD_REQUEST);
            };
            if content_length.is_some_and(|seen| seen != n) {
                return Parsed::Error(Status::BAD_REQUEST);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Publishers send small JSON bodies with a length; chunked bodies are refused
            // rather than half-supported (and a request with both is a smuggling attempt).
            return Parsed::Error(Status::LENGTH_REQUIRED);
        }
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > max_body_for(&request.path) {
        return Parsed::Error(Status::PAYLOAD_TOO_LARGE);
    }
    if buf.len() < head_len + body_len {
        return Parsed::Partial;
    }
    request.body = buf[head_len..head_len + body_len].to_vec();
    Parsed::Complete { request: Box::new(request), consumed: head_len + body_len }
}

/// A status code with its reason phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u16, pub &'static str);

impl Status {
    pub const OK: Status = Status(200, "OK");
    pub const NO_CONTENT: Status = Status(204, "No Content");
    pub const NOT_MODIFIED: Status = Status(304, "Not Modified");
    pub const BAD_REQUEST: Status = Status(400, "Bad Request");
    pub const UNAUTHORIZED: Status = Status(401, "Unauthorized");
    pub const FORBIDDEN: Status = Status(403, "Forbidden");
    pub const NOT_FOUND: Status = Status(404, "Not Found");
    pub const METHOD_NOT_ALLOWED: Status = Status(405, "Method Not Allowed");
    pub const REQUEST_TIMEOUT: Status = Status(408, "Request Timeout");
    pub const LENGTH_REQUIRED: Status = Status(411, "Length Required");
    pub const PAYLOAD_TOO_LARGE: Status = Status(413, "Payload Too Large");
    pub const UPGRADE_REQUIRED: Status = Status(426, "Upgrade Required");
    pub const TOO_MANY_REQUESTS: Status = Status(429, "Too Many Requests");
    pub const HEADERS_TOO_LARGE: Status = Status(431, "Request Header Fields Too Large");
    pub const INTERNAL_ERROR: Status = Status(500, "Internal Server Error");
    pub const SERVICE_UNAVAILABLE: Status = Status(503, "Service Unavailable");
}

/// A response ready to render.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: Status,
    pub content_type: &'static str,
    pub extra_headers: Vec<(&'static str, String)>,
    /// `no-store` unless the response says otherwise: API answers are never cached.
    pub cache_control: &'static str,
    pub body: Vec<u8>,
    /// Close the connection after this response.
    pub close: bool,
}

impl Response {
    pub fn json(status: Status, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type: "application/json",
            extra_headers: Vec::new(),
            cache_control: "no-store",
            body: body.into(),
            close: false,
        }
    }

    /// `{"error": message}`, the shape seed 003 uses for handshake failures.
    pub fn error(status: Status, message: &str) -> Response {
        Response::json(status, serde_json::json!({ "error": message }).to_string())
    }

    /// `{"status":"error","error": message}`, the shape of the publish API's failures.
    pub fn api_error(status: Status, message: &str) -> Response {
        Response::json(status, serde_json::json!({ "status": "error", "error": message }).to_string())
    }

    pub fn text(status: Status, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            extra_headers: Vec::new(),
            cache_control: "no-store",
            body: body.into(),
            close: false,
        }
    }

    /// The same refusal with `context` before its message (`{"error":"item 3: …"}`).
    pub fn prefixed(self, context: &str) -> Response {
        let error = serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned));
        match error {
            Some(error) => {
                Response { body: Response::api_error(self.status, &format!("{context}: {error}")).body, ..self }
            }
            None => self,
        }
    }

    pub fn closing(mut self) -> Response {
        self.close = true;
        self
    }

    pub fn cache(mut self, cache_control: &'static str) -> Response {
        self.cache_control = cache_control;
        self
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.extra_headers.push((name, value.into()));
        self
    }

    /// The response as bytes; `head_only` omits the body (HEAD requests).
    pub fn render(&self, head_only: bool) -> Vec<u8> {
        let mut head = String::with_capacity(160);
        let _ = write!(head, "HTTP/1.1 {} {}\r\n", self.status.0, self.status.1);
        // A 204 and a 304 have no content; a 304's Content-Length would have to be the 200's
        // (RFC 9110 §8.6): neither field is sent.
        if self.status != Status::NO_CONTENT && self.status != Status::NOT_MODIFIED {
            let _ = write!(head, "Content-Type: {}\r\nContent-Length: {}\r\n", self.content_type, self.body.len());
        }
        let _ = write!(head, "Cache-Control: {}\r\n", self.cache_control);
        for (name, value) in &self.extra_headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        head.push_str(if self.close { "Connection: close\r\n\r\n" } else { "Connection: keep-alive\r\n\r\n" });
        let mut out = head.into_bytes();
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(raw: &str) -> Request {
        match parse_request(raw.as_bytes()) {
            Parsed::Complete { request, consumed } => {
                assert_eq!(consumed, raw.len());
                *request
            }
            other => panic!("expected a request, got {other:?}"),
        }
    }

    #[test]
    fn an_upgrade_request_is_understood() {
        let r = complete(
            "GET /ws?token=a%2Eb+c&x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: https://x\r\n\r\n",
        );
        assert_eq!(r.method(), Method::Get);
        assert_eq!(r.path, "/ws");
        assert!(r.upgrade_websocket && r.connection_upgrade && r.keep_alive);
        assert_eq!(r.query_param("token").as_deref(), Some("a.b c"));
        assert_eq!(r.query_param("nope"), None);
        assert_eq!(r.origin.as_deref(), Some("https://x"));
    }

    #[test]
    fn bodies_wait_for_their_length() {
        let raw = "POST /publish HTTP/1.1\r\nContent-Length: 5\r\nAuthorization: Bearer k\r\n\r\nab";
        assert!(matches!(parse_request(raw.as_bytes()), Parsed::Partial));
        let r = complete("POST /publish HTTP/1.1\r\nContent-Length: 5\r\nAuthorization: Bearer  k \r\n\r\nabcde");
        assert_eq!(r.body, b"abcde");
        assert_eq!(r.bearer(), Some("k"));
    }

    #[test]
    fn bad_requests_get_their_status() {
        assert!(matches!(parse_request(b"\x16\x03\x01garbage\r\n\r\n"), Parsed::Error(Status::BAD_REQUEST)));
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert!(matches!(parse_request(huge.as_bytes()), Parsed::Error(Status::HEADERS_TOO_LARGE)));
        let chunked = "POST /publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(parse_request(chunked.as_bytes()), Parsed::Error(Status::LENGTH_REQUIRED)));
        let big = format!("POST /publish HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY_BYTES + 1);
        assert!(matches!(parse_request(big.as_bytes()), Parsed::Error(Status::PAYLOAD_TOO_LARGE)));
        let two = "POST /p HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab";
        assert!(matches!(parse_request(two.as_bytes()), Parsed::Error(Status::BAD_REQUEST)));
    }
}
