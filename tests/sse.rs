//! `GET /sse` (SPEC §10): Server-Sent Events against the real binary, read by a raw TCP client
//! and an event-stream parser written here after the HTML standard's interpretation rules.

mod common;

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// an event-stream client
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct Event {
    /// The event type (`message` unless an `event:` field named another).
    kind: String,
    data: String,
    /// The last event id in force when the event was dispatched.
    id: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Item {
    Event(Event),
    /// A comment line's text (a client ignores it; the test wants to see keepalives).
    Comment(String),
    Retry(u64),
}

/// The event-stream interpretation (HTML Living Standard §9.2.6): lines end at CRLF, LF or
/// CR; a blank line dispatches the data buffer (nothing when it is empty); `:` starts a
/// comment; one space after the field's colon is dropped; `data` lines join with LF; an `id`
/// containing NUL is ignored; `retry` takes ASCII digits only.
#[derive(Default)]
struct Parser {
    line: Vec<u8>,
    after_cr: bool,
    data: String,
    kind: String,
    last_id: Option<String>,
    items: VecDeque<Item>,
}

impl Parser {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                continue;
            }
            match b {
                b'\r' => {
                    self.after_cr = true;
                    self.end_line();
                }
                b'\n' => self.end_line(),
                _ => self.line.push(b),
            }
        }
    }

    fn end_line(&mut self) {
        let line = String::from_utf8(std::mem::take(&mut self.line)).expect("the stream is UTF-8");
        if line.is_empty() {
            self.dispatch();
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            self.items.push_back(Item::Comment(comment.strip_prefix(' ').unwrap_or(comment).to_string()));
            return;
        }
        let (field, value) = line.split_once(':').unwrap_or((&line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.kind = value.to_string(),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            "id" if !value.contains('\0') => self.last_id = Some(value.to_string()),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.items.push_back(Item::Retry(value.parse().expect("digits")))
            }
            _ => {}
        }
    }

    fn dispatch(&mut self) {
        let kind = std::mem::take(&mut self.kind);
        if self.data.is_empty() {
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop();
        let kind = if kind.is_empty() { "message".to_string() } else { kind };
        self.items.push_back(Item::Event(Event { kind, data, id: self.last_id.clone() }));
    }
}

/// How reading a stream stopped.
#[derive(Debug, PartialEq)]
enum End {
    Timeout,
    /// The server ended the response (EOF or reset).
    Closed,
}

struct Sse {
    stream: TcpStream,
    head: HttpResponse,
    /// Every body byte received, in order.
    raw: Vec<u8>,
    parser: Parser,
}

fn request(port: u16, path: &str, headers: &[(&str, &str)]) -> String {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req
}

impl Sse {
    /// Opens `path` (e.g. `/sse?token=…`); a refusal comes back as the complete response.
    fn open(port: u16, path: &str, headers: &[(&str, &str)]) -> Result<Sse, HttpResponse> {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to herald");
        Sse::open_on(stream, port, path, headers)
    }

    /// Opens over a socket whose receive buffer is `rcvbuf` bytes from before the handshake
    /// (a client that can hold almost nothing it does not read).
    fn open_small_window(port: u16, path: &str, rcvbuf: usize) -> Sse {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
        socket.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into()).expect("connect to herald");
        Sse::open_on(socket.into(), port, path, &[]).unwrap_or_else(|r| panic!("refused: {} {}", r.status, r.text()))
    }

    fn open_on(mut stream: TcpStream, port: u16, path: &str, headers: &[(&str, &str)]) -> Result<Sse, HttpResponse> {
        stream.set_write_timeout(Some(T)).unwrap();
        stream.write_all(request(port, path, headers).as_bytes()).expect("write request");
        let deadline = Instant::now() + T;
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let n = read_some(&mut stream, &mut buf, deadline);
            assert!(
                n.is_ok_and(|n| n > 0),
                "no complete response head for {path}: {:?}",
                String::from_utf8_lossy(&buf)
            );
        };
        let head_text = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        if !head_text.starts_with("http/1.1 200 ") {
            let length: usize = head_text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("a refusal's length");
            while buf.len() < head_end + length {
                let n = read_some(&mut stream, &mut buf, deadline);
                assert!(n.is_ok_and(|n| n > 0), "refusal body incomplete");
            }
            return Err(parse_http_response(&buf[..head_end + length]).expect("a refusal"));
        }
        let head = parse_http_response(&buf[..head_end]).expect("a response head");
        let mut sse = Sse { stream, head, raw: Vec::new(), parser: Parser::default() };
        sse.take(&buf[head_end..]);
        Ok(sse)
    }

    fn take(&mut self, bytes: &[u8]) {
        self.raw.extend_from_slice(bytes);
        self.parser.feed(bytes);
    }

    /// The next event, comment or retry field.
    fn next_item(&mut self, deadline: Instant) -> Result<Item, End> {
        loop {
            if let Some(item) = self.parser.items.pop_front() {
                return Ok(item);
            }
            let mut buf = Vec::new();
            match read_some(&mut self.stream, &mut buf, deadline) {
                Ok(0) => return Err(End::Closed),
                Ok(_) => self.take(&buf),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Err(End::Timeout),
                Err(_) => return Err(End::Closed),
            }
        }
    }

    /// The next event (comments and retry fields skipped); panics if none comes in time.
    fn next_event(&mut self, timeout: Duration) -> Event {
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_item(deadline) {
                Ok(Item::Event(event)) => return event,
                Ok(_) => {}
                Err(end) => panic!("no event within {timeout:?}: {end:?}; received {:?}", self.tail()),
            }
        }
    }

    fn next_json(&mut self, timeout: Duration) -> Value {
        let event = self.next_event(timeout);
        serde_json::from_str(&event.data).unwrap_or_else(|e| panic!("event data is not JSON ({e}): {event:?}"))
    }

    /// Reads until the server ends the stream; the items seen on the way, or None on timeout.
    fn wait_end(&mut self, timeout: Duration) -> Option<Vec<Item>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            match self.next_item(deadline) {
                Ok(item) => seen.push(item),
                Err(End::Closed) => return Some(seen),
                Err(End::Timeout) => return None,
            }
        }
    }

    /// No event arrives for `wait` (comments may).
    fn assert_no_event(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            match self.next_item(deadline) {
                Ok(Item::Event(e)) => panic!("unexpected event {e:?}"),
                Ok(_) => {}
                Err(End::Timeout) => return,
                Err(End::Closed) => panic!("the stream ended"),
            }
        }
    }

    fn tail(&self) -> String {
        String::from_utf8_lossy(&self.raw[self.raw.len().saturating_sub(300)..]).to_string()
    }
}

fn read_some(stream: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant) -> std::io::Result<usize> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(ErrorKind::TimedOut.into());
    }
    stream.set_read_timeout(Some(remaining)).unwrap();
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk)?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

fn open(h: &Herald, token: &str) -> Sse {
    open_path(h, &format!("/sse?token={token}"))
}

fn open_path(h: &Herald, path: &str) -> Sse {
    Sse::open(h.port, path, &[]).unwrap_or_else(|r| panic!("GET {path} refused: {} {}", r.status, r.text()))
}

fn refused(h: &Herald, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    match Sse::open(h.port, path, headers) {
        Ok(sse) => panic!("GET {path} was not refused: {:?}", sse.head.headers),
        Err(response) => response,
    }
}

fn topics_token(sub: &str, topics: &[&str]) -> String {
    token_claims(json!({"sub": sub, "exp": now_secs() + 3600, "topics": topics}))
}

fn publish(h: &Herald, body: &Value) {
    let r = h.publish(Some(API_KEY), body);
    assert_eq!(r.status, 200, "publish: {}", r.text());
}

fn metric(h: &Herald, section: &str, name: &str) -> i64 {
    let m = h.metrics();
    m[section][name].as_i64().unwrap_or_else(|| panic!("no {section}.{name} in {m}"))
}

fn wait_metric(h: &Herald, section: &str, name: &str, want: i64) {
    let mut last = 0;
    let ok = wait_until(T, || {
        last = metric(h, section, name);
        last == want
    });
    assert!(ok, "{section}.{name} did not become {want} (last {last})");
}

// ---------------------------------------------------------------------------------------
// delivery
// ---------------------------------------------------------------------------------------

#[test]
fn a_stream_starts_with_retry_and_carries_each_notification_as_its_websocket_json() {
    let h = herald().api_key().start();
    let mut sse = Sse::open(h.port, &format!("/sse?token={}", token("u1")), &[("Last-Event-ID", "q7kz2m4t:42")])
        .unwrap_or_else(|r| panic!("refused: {} {}", r.status, r.text()));
    assert_eq!(sse.head.status, 200);
    assert_eq!(sse.head.header("content-type"), Some("text/event-stream"));
    assert_eq!(sse.head.header("cache-control"), Some("no-cache"));
    assert_eq!(sse.head.header("x-accel-buffering"), Some("no"));
    assert_eq!(sse.head.header("content-length"), None, "the body streams: no length");
    assert_eq!(sse.head.header("transfer-encoding"), None);
    assert_eq!(sse.next_item(Instant::now() + T), Ok(Item::Retry(2000)), "the stream starts with retry");
    assert_eq!(sse.raw, b"retry: 2000\n\n", "the first bytes");

    // An SSE stream is a connection like any other: /health counts it, /metrics names it.
    let mut ws = h.ws(&token("u1"));
    h.wait_active_connections(2, T);
    assert_eq!(metric(&h, "connections", "sse"), 1);
    let health = h.health_json();
    assert_eq!(health["websocket"]["total_unique_users"], 1, "{health}");

    let message = json!({"type": "notification", "payload": {"title": "line\nbreak \"quoted\" é"}});
    publish(&h, &json!({"user_id": "u1", "message": message}));
    let from_ws = recv_text(&mut ws, T);
    let event = sse.next_event(T);
    assert_eq!(event.data, from_ws, "the event's data is the WebSocket frame's JSON, byte for byte");
    assert_eq!(event.kind, "message");
    assert_eq!(event.id, None, "no history, no id");
    let delivered: Value = serde_json::from_str(&event.data).unwrap();
    assert_eq!(strip_timestamp(delivered), message);
    let expected_wire = format!("data: {from_ws}\n\n");
    assert!(sse.raw.ends_with(expected_wire.as_bytes()), "wire form: {:?}", sse.tail());

    // Only its own user's notifications.
    publish(&h, &json!({"user_id": "u2", "message": notification("not yours")}));
    publish(&h, &json!({"user_id": "u1", "message": notification("second")}));
    assert_eq!(sse.next_json(T)["payload"]["title"], "second");
}

#[test]
fn notifications_published_to_redis_reach_streams_by_user_and_topic() {
    let redis = Redis::start();
    let h = herald().redis(&redis).start();
    redis.wait_subscribers(1, Duration::from_secs(10));
    let mut sse = open_path(&h, &format!("/sse?token={}&topics=news", topics_token("r1", &["news"])));
    // The head came after Redis confirmed the subscriptions: a publish now reaches it.
    let n = redis.publish("user_noti:r1", r#"{"type":"personal","payload":{"n":1}}"#);
    assert_eq!(n, 1, "herald was not subscribed to the user's channel when the stream started");
    let m = sse.next_json(T);
    assert_eq!(m["type"], "personal");
    assert_timestamp_is_now(m["timestamp"].as_str().expect("a timestamp was added"), 30.0);
    assert_eq!(redis.publish("topic_noti:news", r#"{"type":"headline"}"#), 1);
    assert_eq!(sse.next_json(T)["type"], "headline");
    wait_metric(&h, "redis", "subscriptions", 2);
    drop(sse);
    let ok = wait_until(T, || metric(&h, "redis", "subscriptions") == 0);
    assert!(ok, "the stream's channels were not unsubscribed after it closed");
}

#[test]
fn topics_are_received_when_the_token_allows_them_and_refused_before_streaming_otherwise() {
    let h = herald().api_key().start();
    let t = topics_token("u1", &["project:*", "news"]);
    let mut sse = open_path(&h, &format!("/sse?token={t}&topics=project%3A7,news"));
    let mut other = open(&h, &token("u2"));
    publish(&h, &json!({"topic": "project:7", "message": notification("p7")}));
    assert_eq!(sse.next_json(T)["payload"]["title"], "p7");
    publish(&h, &json!({"topic": "news", "message": notification("n")}));
    assert_eq!(sse.next_json(T)["payload"]["title"], "n");
    publish(&h, &json!({"topic": "project:8", "message": notification("p8, not held")}));
    publish(&h, &json!({"user_id": "u1", "message": notification("personal too")}));
    assert_eq!(sse.next_json(T)["payload"]["title"], "personal too");
    // A message for two targets the stream holds arrives once.
    let r = h.publish_batch(&[json!({"user_ids": ["u1", "u2"], "message": notification("both")})]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sse.next_json(T)["payload"]["title"], "both");
    assert_eq!(other.next_json(T)["payload"]["title"], "both");
    sse.assert_no_event(Duration::from_millis(300));

    let r = refused(&h, &format!("/sse?token={t}&topics=news,secret"), &[]);
    assert_eq!((r.status, r.json()), (403, json!({"error": "token does not allow topic secret"})));
    let r = refused(&h, &format!("/sse?token={}&topics=news", token("plain")), &[]);
    assert_eq!(r.status, 403, "a token without a topics claim allows no topic: {}", r.text());
    h.wait_active_connections(2, T);
}

// ---------------------------------------------------------------------------------------
// auth, limits, CORS
// ---------------------------------------------------------------------------------------

#[test]
fn auth_failures_are_seed_003_json_and_a_bearer_header_works() {
    let h = herald().start();
    let r = refused(&h, "/sse", &[]);
    assert_eq!((r.status, r.json()), (401, json!({"error": "missing token parameter"})));
    let r = refused(&h, "/sse?token=not.a.jwt", &[]);
    assert_eq!((r.status, r.json()), (401, json!({"error": "invalid or expired token"})));
    let expired = token_claims(json!({"sub": "u", "exp": now_secs() - 10}));
    let r = refused(&h, &format!("/sse?token={expired}"), &[]);
    assert_eq!((r.status, r.json()), (401, json!({"error": "invalid or expired token"})));
    let bearer = format!("Bearer {}", token("u"));
    let sse = Sse::open(h.port, "/sse", &[("Authorization", &bearer)]);
    assert_eq!(sse.map(|s| s.head.status).map_err(|r| r.status), Ok(200));
    let r = h.http("POST", "/sse", &[], b"");
    assert_eq!(r.status, 405);
    assert_eq!(metric(&h, "errors", "rejected_upgrades"), 4, "three refusals and the 405");
}

#[test]
fn streams_count_against_the_per_user_cap_with_websockets() {
    let h = herald().env("HERALD_MAX_CONNECTIONS_PER_USER", "2").start();
    let t = token("capped");
    let _ws = h.ws(&t);
    let first = open(&h, &t);
    let r = refused(&h, &format!("/sse?token={t}"), &[]);
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "per-user connection limit reached");
    drop(first);
    h.wait_active_connections(1, T);
    let _again = open(&h, &t);
    let _someone_else = open(&h, &token("other"));
    h.wait_active_connections(3, T);
}

#[test]
fn cors_follows_the_allowed_origins() {
    let h = herald().env("HERALD_ALLOWED_ORIGINS", "https://app.example").start();
    let path = format!("/sse?token={}", token("u"));
    let sse = Sse::open(h.port, &path, &[("Origin", "https://app.example")]).map_err(|r| r.status).unwrap();
    assert_eq!(sse.head.header("access-control-allow-origin"), Some("https://app.example"));
    assert_eq!(sse.head.header("vary"), Some("Origin"));
    let r = refused(&h, &path, &[("Origin", "https://evil.example")]);
    assert_eq!((r.status, r.json()), (403, json!({"error": "origin not allowed"})));
    let no_origin = Sse::open(h.port, &path, &[]).map_err(|r| r.status).unwrap();
    assert_eq!(no_origin.head.header("access-control-allow-origin"), None, "no Origin, no CORS");
    // A refusal a script can read.
    let r = refused(&h, "/sse", &[("Origin", "https://app.example")]);
    assert_eq!((r.status, r.header("access-control-allow-origin")), (401, Some("https://app.example")));

    let preflight = h.http(
        "OPTIONS",
        "/sse",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "GET"),
            ("Access-Control-Request-Headers", "authorization,last-event-id"),
        ],
        b"",
    );
    assert_eq!(preflight.status, 204);
    assert_eq!(preflight.header("access-control-allow-origin"), Some("https://app.example"));
    assert_eq!(preflight.header("access-control-allow-methods"), Some("GET"));
    assert_eq!(preflight.header("access-control-allow-headers"), Some("Authorization, Last-Event-ID"));
    assert!(preflight.header("access-control-max-age").is_some_and(|v| v.parse::<u32>().is_ok()));
    assert_eq!(preflight.header("content-length"), None, "a 204 has no length");
    let bad = h.http("OPTIONS", "/sse", &[("Origin", "https://evil.example")], b"");
    assert_eq!(bad.status, 403);

    let open_to_all = herald().start();
    let sse =
        Sse::open(open_to_all.port, &path, &[("Origin", "https://anywhere.example")]).map_err(|r| r.status).unwrap();
    assert_eq!(sse.head.header("access-control-allow-origin"), Some("*"));
}

// ---------------------------------------------------------------------------------------
// keepalive, expiry, slow consumers, admin, shutdown
// ---------------------------------------------------------------------------------------

#[test]
fn pings_are_comments_and_a_reading_stream_outlives_the_idle_timeout() {
    // An event-stream client never writes: the idle timeout must not close it.
    let h = herald().env("HERALD_PING_INTERVAL", "200ms").env("HERALD_IDLE_TIMEOUT", "600ms").start();
    let mut sse = open(&h, &token("u"));
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut pings = 0;
    loop {
        match sse.next_item(deadline) {
            Ok(Item::Comment(text)) => {
                assert_eq!(text, "ping");
                pings += 1;
            }
            Ok(Item::Retry(_)) => {}
            Ok(Item::Event(e)) => panic!("unexpected event {e:?}"),
            Err(End::Timeout) => break,
            Err(End::Closed) => panic!("the stream was closed after {pings} pings: {:?}", sse.tail()),
        }
    }
    assert!(pings >= 4, "{pings} pings in 2 s at a 200 ms interval");
    assert!(sse.raw.windows(8).any(|w| w == b": ping\n\n"));
    assert_eq!(metric(&h, "errors", "idle_closes"), 0);
    assert_eq!(h.active_connections(), 1);
}

#[test]
fn the_stream_ends_when_its_token_expires() {
    let h = herald().start();
    let t = token_claims(json!({"sub": "u", "exp": now_secs() + 2}));
    let mut sse = open(&h, &t);
    let started = Instant::now();
    let seen = sse.wait_end(Duration::from_secs(6)).expect("the stream did not end at the token's expiry");
    assert!(started.elapsed() > Duration::from_millis(500), "ended too early");
    assert!(seen.contains(&Item::Comment("close token expired".into())), "{seen:?}");
    assert_eq!(metric(&h, "errors", "token_expired_closes"), 1);
    h.wait_active_connections(0, T);
    assert_eq!(metric(&h, "connections", "sse"), 0);
}

#[test]
fn a_stream_that_is_not_read_is_cut_while_others_keep_receiving() {
    let h = herald().api_key().env("HERALD_SEND_QUEUE", "8").start();
    let mut slow = Sse::open_small_window(h.port, &format!("/sse?token={}", token("slow")), 4096);
    let fast = open(&h, &token("fast"));
    h.wait_active_connections(2, T);
    let reader = thread::spawn(move || {
        let mut fast = fast;
        let mut got = Vec::new();
        loop {
            let m = fast.next_json(Duration::from_secs(20));
            if m["type"] == "done" {
                return (got, fast);
            }
            got.push(m["n"].as_i64().unwrap());
        }
    });
    let filler = "p".repeat(340);
    for round in 0..20 {
        let items: Vec<Value> = (0..999)
            .map(|i| json!({"user_id": "slow", "message": {"type": "flood", "n": i, "payload": {"body": filler}}}))
            .chain([json!({"user_id": "fast", "message": {"type": "tick", "n": round}})])
            .collect();
        let r = h.publish_batch(&items);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    publish(&h, &json!({"user_id": "fast", "message": {"type": "done"}}));
    let (got, mut fast) = reader.join().expect("the reading stream must receive everything addressed to it");
    assert_eq!(got, (0..20).collect::<Vec<i64>>());

    let seen = slow.wait_end(Duration::from_secs(15)).expect("the slow stream was not ended");
    let events = seen.iter().filter(|i| matches!(i, Item::Event(_))).count();
    assert!(events < 20_000, "the slow stream got all {events} events: never treated as slow");
    assert!(metric(&h, "messages", "slow_consumers") >= 1);
    assert!(metric(&h, "messages", "failed") >= 1);
    h.wait_active_connections(1, T);
    publish(&h, &json!({"user_id": "fast", "message": {"type": "later"}}));
    assert_eq!(fast.next_json(T)["type"], "later");
}

#[test]
fn a_stream_whose_output_stays_stuck_is_closed_after_the_idle_timeout() {
    // Fewer notifications than the send queue holds, but more bytes than the sockets do: not a
    // slow consumer by the queue, yet it never takes its output. Its peer could as well be gone.
    let h = herald()
        .api_key()
        .env("HERALD_MAX_MESSAGE_BYTES", "65536")
        .env("HERALD_PING_INTERVAL", "1s")
        .env("HERALD_IDLE_TIMEOUT", "1s")
        .start();
    let _stuck = Sse::open_small_window(h.port, &format!("/sse?token={}", token("stuck")), 4096);
    let filler = "s".repeat(60_000);
    for _ in 0..10 {
        let items: Vec<Value> =
            (0..15).map(|_| json!({"user_id": "stuck", "message": {"type": "big", "body": filler}})).collect();
        let r = h.publish_batch(&items);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let ok = wait_until(Duration::from_secs(8), || metric(&h, "errors", "output_stalled") == 1);
    assert!(ok, "the stuck stream was not closed: {}", h.metrics());
    assert_eq!(metric(&h, "messages", "slow_consumers"), 0, "150 notifications fit the queue of 256");
    h.wait_active_connections(0, Duration::from_secs(8));
}

#[test]
fn api_disconnect_closes_streams_too() {
    let h = herald().api_key().start();
    let mut sse = open(&h, &token("gone"));
    let mut ws = h.ws(&token("gone"));
    let mut stays = open(&h, &token("stays"));
    h.wait_active_connections(3, T);
    let r = h.http(
        "POST",
        "/api/disconnect",
        &[("Authorization", &format!("Bearer {API_KEY}")), ("Content-Type", "application/json")],
        json!({"user_id": "gone"}).to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["closed"], 2, "the stream and the WebSocket");
    let seen = sse.wait_end(T).expect("the stream was not ended");
    assert!(seen.contains(&Item::Comment("close disconnected by the server".into())), "{seen:?}");
    expect_close_code(&mut ws, 1008, T);
    h.wait_active_connections(1, T);
    publish(&h, &json!({"user_id": "stays", "message": notification("still here")}));
    assert_eq!(stays.next_json(T)["payload"]["title"], "still here");
}

#[test]
fn shutdown_ends_streams_after_their_queued_events() {
    let mut h = herald().api_key().env("HERALD_SHUTDOWN_GRACE", "3s").start();
    let mut sse = open(&h, &token("u"));
    publish(&h, &json!({"user_id": "u", "message": notification("before shutdown")}));
    h.sigterm();
    let seen = sse.wait_end(T).expect("the stream did not end at shutdown");
    let titles: Vec<Value> = seen
        .iter()
        .filter_map(|i| match i {
            Item::Event(e) => serde_json::from_str::<Value>(&e.data).ok().map(|v| v["payload"]["title"].clone()),
            _ => None,
        })
        .collect();
    assert_eq!(titles, [json!("before shutdown")]);
    assert!(seen.contains(&Item::Comment("close server shutdown".into())), "{seen:?}");
    assert!(h.wait_exit(T).is_some(), "herald did not exit");
}

// ---------------------------------------------------------------------------------------
// encode once
// ---------------------------------------------------------------------------------------

#[test]
fn a_broadcast_to_many_streams_is_encoded_once() {
    const STREAMS: usize = 40;
    let h = herald().api_key().env("HERALD_THREADS", "4").start();
    let mut streams: Vec<Sse> = (0..STREAMS)
        .map(|i| open_path(&h, &format!("/sse?token={}&topics=news", topics_token(&format!("u{i}"), &["news"]))))
        .collect();
    let mut ws = h.ws(&topics_token("w", &["news"]));
    ws.send(tungstenite::Message::text(json!({"type": "subscribe", "topic": "news"}).to_string())).unwrap();
    assert_eq!(recv_json(&mut ws, T)["type"], "subscribed");
    h.wait_active_connections(STREAMS as i64 + 1, T);
    assert_eq!(metric(&h, "connections", "sse"), STREAMS as i64);
    assert_eq!(metric(&h, "messages", "sse_encoded"), 0);
    for round in 1..=3 {
        publish(&h, &json!({"topic": "news", "message": {"type": "headline", "n": round}}));
        for sse in &mut streams {
            assert_eq!(sse.next_json(T)["n"], round);
        }
        assert_eq!(recv_json(&mut ws, T)["n"], round);
        wait_metric(&h, "messages", "sse_encoded", round);
    }
    // Unicasts are encoded once each as well, and a message no stream receives not at all.
    publish(&h, &json!({"user_id": "w", "message": {"type": "ws only"}}));
    assert_eq!(recv_json(&mut ws, T)["type"], "ws only");
    publish(&h, &json!({"user_id": "u0", "message": {"type": "one"}}));
    assert_eq!(streams[0].next_json(T)["type"], "one");
    wait_metric(&h, "messages", "sse_encoded", 4);
    let prometheus = h.http("GET", "/metrics", &[("Accept", "text/plain")], b"").text();
    assert!(prometheus.contains(&format!("herald_connections_sse {STREAMS}\n")), "{prometheus}");
    assert!(prometheus.contains("herald_sse_events_encoded_total 4\n"), "{prometheus}");
}

// ---------------------------------------------------------------------------------------
// resume (history on): Last-Event-ID / since through the WebSocket's replay
// ---------------------------------------------------------------------------------------

fn note(user: &str, n: u64) -> Value {
    json!({"user_id": user, "message": {"type": "n", "n": n}})
}

/// A notification event: its `n`, after checking that its `id:` line is its `stream_id`.
fn numbered(event: &Event) -> u64 {
    let m: Value = serde_json::from_str(&event.data).unwrap_or_else(|e| panic!("not JSON ({e}): {event:?}"));
    let stream_id = m["stream_id"].as_str().unwrap_or_else(|| panic!("no stream_id with history on: {m}"));
    assert_eq!(event.id.as_deref(), Some(stream_id), "the event's id is its stream_id: {event:?}");
    m["n"].as_u64().unwrap_or_else(|| panic!("{m}"))
}

/// Reads events until `resumed`: the replayed `n`s and the `resumed` object.
fn replayed(sse: &mut Sse) -> (Vec<u64>, Value) {
    let mut ns = Vec::new();
    loop {
        let event = sse.next_event(T);
        let m: Value = serde_json::from_str(&event.data).unwrap_or_else(|e| panic!("not JSON ({e}): {event:?}"));
        if m["type"] == "resumed" {
            return (ns, m);
        }
        ns.push(numbered(&event));
    }
}

/// Offsets of `id`s (`epoch:offset`) of one stream: one epoch, each offset one more.
fn assert_consecutive(ids: &[String]) {
    let parsed: Vec<(&str, u64)> = ids
        .iter()
        .map(|id| {
            let (epoch, offset) = id.split_once(':').unwrap_or_else(|| panic!("not epoch:offset: {id}"));
            (epoch, offset.parse().unwrap_or_else(|_| panic!("offset of {id}")))
        })
        .collect();
    for pair in parsed.windows(2) {
        assert_eq!(pair[0].0, pair[1].0, "one epoch: {ids:?}");
        assert_eq!(pair[0].1 + 1, pair[1].1, "consecutive offsets: {ids:?}");
    }
}

/// Connect, receive some, go away; N are published while away and more while the stream comes
/// back (`resume` opens it, with `Last-Event-ID` or `since=`): the client sees exactly the
/// missed ones in order, `resumed`, then the live ones, each once.
fn resume_scenario(h: &Herald, user: &str, resume: impl FnOnce(&Herald, &str) -> Sse) {
    let mut sse = open(h, &token(user));
    publish(h, &note(user, 1));
    publish(h, &note(user, 2));
    let first = sse.next_event(T);
    let second = sse.next_event(T);
    assert_eq!((numbered(&first), numbered(&second)), (1, 2));
    let last_seen = second.id.clone().expect("an id");
    assert!(sse.raw.windows(4).any(|w| w == b"id: "), "id: lines on the wire: {:?}", sse.tail());
    drop(sse);
    h.wait_active_connections(0, T);

    // Missed while away: enough for several replay pages.
    const AWAY: u64 = 300;
    const LIVE: u64 = 200;
    let r = h.publish_batch(&(3..3 + AWAY).map(|n| note(user, n)).collect::<Vec<_>>());
    assert_eq!(r.status, 200, "publish/batch: {}", r.text());
    // …and a publisher that keeps going while the stream comes back and replays.
    let (port, owner) = (h.port, user.to_string());
    let publisher = thread::spawn(move || {
        for n in 3 + AWAY..3 + AWAY + LIVE {
            let body = note(&owner, n).to_string();
            let r = http(port, "POST", "/publish", &[("Authorization", &format!("Bearer {API_KEY}"))], body.as_bytes());
            assert_eq!(r.status, 200, "{}", r.text());
        }
    });
    thread::sleep(Duration::from_millis(20));
    let mut sse = resume(h, &last_seen);
    let (mut ns, resumed) = replayed(&mut sse);
    assert_eq!(resumed["complete"], true, "{resumed}");
    assert_eq!(resumed["replayed"].as_u64(), Some(ns.len() as u64), "{resumed}");
    assert!(ns.len() as u64 >= AWAY, "at least what was published while away was replayed: {}", ns.len());
    let mut ids = Vec::new();
    publisher.join().expect("publisher");
    let last = 2 + AWAY + LIVE;
    while ns.last() != Some(&last) {
        let event = sse.next_event(T);
        ns.push(numbered(&event));
        ids.push(event.id.expect("an id"));
    }
    assert_eq!(ns, (3..=last).collect::<Vec<_>>(), "every missed and live notification once, in order");
    assert_consecutive(&ids);
    sse.assert_no_event(Duration::from_millis(300));
}

#[test]
fn last_event_id_resumes_what_was_missed_then_live_with_embedded_history() {
    let h = herald().api_key().env("HERALD_HISTORY_SIZE", "1000").start();
    resume_scenario(&h, "back", |h, last| {
        Sse::open(h.port, &format!("/sse?token={}", token("back")), &[("Last-Event-ID", last)])
            .unwrap_or_else(|r| panic!("refused: {} {}", r.status, r.text()))
    });
    assert!(h.metrics()["history"]["resumes"].as_u64() >= Some(1));
}

#[test]
fn since_and_last_event_id_resume_with_redis_history() {
    let redis = Redis::start();
    let h = herald().api_key().redis(&redis).env("HERALD_HISTORY_SIZE", "1000").start();
    redis.wait_subscribers(1, Duration::from_secs(10));
    resume_scenario(&h, "rq", |h, last| open_path(h, &format!("/sse?token={}&since={last}", token("rq"))));
    // The header wins over the query (an EventSource's reconnection keeps its first URL).
    resume_scenario(&h, "rh", |h, last| {
        Sse::open(h.port, &format!("/sse?token={}&since=0", token("rh")), &[("Last-Event-ID", last)])
            .unwrap_or_else(|r| panic!("refused: {} {}", r.status, r.text()))
    });
}

#[test]
fn id_lines_come_with_history_and_not_without() {
    let with = herald().api_key().env("HERALD_HISTORY_SIZE", "10").start();
    let without = herald().api_key().start();
    for (h, history) in [(&with, true), (&without, false)] {
        // A resume position is ignored without history: no replay, no `resumed`.
        let mut sse = Sse::open(h.port, &format!("/sse?token={}&since=0", token("i")), &[("Last-Event-ID", "0")])
            .unwrap_or_else(|r| panic!("refused: {} {}", r.status, r.text()));
        if history {
            let (ns, resumed) = replayed(&mut sse);
            assert_eq!((ns.len(), resumed), (0, json!({"type": "resumed", "replayed": 0, "complete": true})));
        }
        publish(h, &note("i", 1));
        let event = sse.next_event(T);
        let m: Value = serde_json::from_str(&event.data).unwrap();
        assert_eq!(m["n"], 1, "{m}");
        let has_id_line = sse.raw.split(|&b| b == b'\n').any(|line| line.starts_with(b"id:"));
        if history {
            assert_eq!(numbered(&event), 1);
            assert!(has_id_line, "{:?}", sse.tail());
        } else {
            assert!(m.get("stream_id").is_none(), "{m}");
            assert_eq!(event.id, None);
            assert!(!has_id_line, "an id: line without history: {:?}", sse.tail());
            sse.assert_no_event(Duration::from_millis(200));
        }
    }
}

#[test]
fn a_malformed_or_foreign_last_event_id_replays_everything_retained_as_incomplete() {
    let h = herald().api_key().env("HERALD_HISTORY_SIZE", "10").start();
    let mut first = open(&h, &token("g0"));
    publish(&h, &note("g0", 1));
    let real = first.next_event(T).id.expect("an id");
    drop(first);
    let (epoch, _) = real.split_once(':').expect("epoch:offset");
    let other_epoch: String =
        epoch.chars().enumerate().map(|(i, c)| if i == 0 { if c == 'a' { 'b' } else { 'a' } } else { c }).collect();
    let foreign = format!("{other_epoch}:1");
    let future = format!("{epoch}:999");
    for (i, garbage) in ["garbage", "12:34:56", "-1", foreign.as_str(), future.as_str()].into_iter().enumerate() {
        let user = format!("g{}", i + 1);
        for n in 1..=3 {
            publish(&h, &note(&user, n));
        }
        let mut sse = Sse::open(h.port, &format!("/sse?token={}", token(&user)), &[("Last-Event-ID", garbage)])
            .unwrap_or_else(|r| panic!("Last-Event-ID {garbage:?} refused: {} {}", r.status, r.text()));
        let (ns, resumed) = replayed(&mut sse);
        assert_eq!(ns, vec![1, 2, 3], "Last-Event-ID {garbage:?}");
        assert_eq!(resumed, json!({"type": "resumed", "replayed": 3, "complete": false}), "{garbage:?}");
        publish(&h, &note(&user, 4));
        assert_eq!(numbered(&sse.next_event(T)), 4, "live after the replay ({garbage:?})");
    }
}

#[test]
fn topic_events_carry_no_id_so_last_event_id_always_places_the_users_stream() {
    let h = herald().api_key().env("HERALD_HISTORY_SIZE", "100").start();
    let tok = topics_token("mixed", &["news"]);
    let mut sse = open_path(&h, &format!("/sse?token={tok}&topics=news"));
    publish(&h, &note("mixed", 1));
    let personal = sse.next_event(T);
    assert_eq!(numbered(&personal), 1);
    let personal_id = personal.id.clone().expect("a personal event has an id");
    // Topic notifications in between: many, so their own stream's offsets run past the user's.
    for n in 0..5 {
        publish(&h, &json!({"topic": "news", "message": {"type": "t", "n": n}}));
    }
    for _ in 0..5 {
        let event = sse.next_event(T);
        let m: Value = serde_json::from_str(&event.data).unwrap();
        assert_eq!(m["type"], "t", "{m}");
        assert!(m["stream_id"].is_string(), "the topic notification keeps its stream_id: {m}");
        assert_eq!(event.id.as_deref(), Some(personal_id.as_str()), "a topic event leaves the last id as it was");
    }
    assert!(
        !sse.raw
            .split(|&b| b == b'\n')
            .filter(|l| l.starts_with(b"id:"))
            .any(|l| l != format!("id: {personal_id}").as_bytes()),
        "only the personal event has an id: line: {:?}",
        sse.tail()
    );
    drop(sse);
    h.wait_active_connections(0, T);
    publish(&h, &note("mixed", 2));
    publish(&h, &note("mixed", 3));
    // What an EventSource sends back: the last id in force, the personal one.
    let mut back = Sse::open(h.port, &format!("/sse?token={tok}&topics=news"), &[("Last-Event-ID", &personal_id)])
        .unwrap_or_else(|r| panic!("refused: {} {}", r.status, r.text()));
    let (ns, resumed) = replayed(&mut back);
    assert_eq!(ns, vec![2, 3], "exactly the missed personal notifications: {resumed}");
    assert_eq!(resumed["complete"], true, "{resumed}");
}
