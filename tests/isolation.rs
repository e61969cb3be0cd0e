//! Property: every message reaches exactly the connections entitled to it — no cross-user
//! leakage, no duplicates, nothing missing — through the real router, loops and sockets.
//!
//! Each case draws users, connections, topic grants, subscriptions and messages from a seeded
//! generator (set HERALD_ISOLATION_SEED to replay a failure), runs them against an
//! in-process herald with several event loops, and compares what each socket received with
//! what it was owed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use herald::config::Cli;
use herald::server::{self, Running};

const SECRET: &str = "isolation-secret";
const API_KEY: &str = "isolation-api-key";

/// xorshift64*: small, seedable, good enough to pick test shapes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn start_herald() -> Running {
    use clap::Parser;
    let cli = Cli::try_parse_from([
        "herald",
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "3",
        "--jwt-secret",
        SECRET,
        "--api-key",
        API_KEY,
        "--max-connections-per-user",
        "0",
        "--log",
        "warn",
    ])
    .expect("flags parse");
    let config = cli.server.into_config().expect("valid config");
    server::start(config).expect("herald starts")
}

/// A minimal client: raw upgrade, masked text frames out, unmasked frames in.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(port: u16, token: &str) -> Client {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        let request = format!(
            "GET /ws?token={token} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).expect("write upgrade");
        let mut client = Client { stream, buf: Vec::new() };
        let head = client.read_until_head();
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        client
    }

    fn read_until_head(&mut self) -> String {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                return head;
            }
            let n = self.stream.read(&mut chunk).expect("read head");
            assert!(n > 0, "closed during upgrade");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn send_text(&mut self, text: &str) {
        self.stream.write_all(&wsframe::masked_text(text.as_bytes(), [7, 1, 9, 3])).expect("send");
    }

    /// Text messages up to and including the first one for which `last` holds.
    fn read_texts_until(&mut self, mut last: impl FnMut(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut texts = Vec::new();
        let mut chunk = [0u8; 16384];
        loop {
            while let Some((opcode, payload, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                if opcode == 1 {
                    let text = String::from_utf8(payload).expect("utf-8");
                    let done = last(&text);
                    texts.push(text);
                    if done {
                        return texts;
                    }
                }
            }
            assert!(Instant::now() < deadline, "timed out waiting for messages; got {texts:?}");
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("connection closed; got {texts:?}"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }
}

fn parse_server_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (len, start) = match buf[1] & 0x7F {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    let payload = buf.get(start..start + len)?;
    Some((buf[0] & 0x0F, payload.to_vec(), start + len))
}

fn http_post(port: u16, path: &str, body: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    stream.set_nodelay(true).expect("nodelay");
    // One write: a request split over several small writes waits on delayed ACKs.
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("write");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

/// One connection's entitlements.
struct Subscriber {
    user: usize,
    topics: BTreeSet<usize>,
    /// Subscribe requests sent; each gets one reply (subscribed or error).
    requests: usize,
    client: Client,
}

fn run_case(seed: u64) {
    let mut rng = Rng(seed | 1);
    let herald = start_herald();
    let port = herald.local_addr.port();
    let users = 3 + rng.below(10);
    let topics = 1 + rng.below(5);
    // Grants per user: which topics its token allows.
    let grants: Vec<BTreeSet<usize>> = (0..users).map(|_| (0..topics).filter(|_| rng.chance(50)).collect()).collect();
    let mut subscribers = Vec::new();
    for (user, granted) in grants.iter().enumerate() {
        for _ in 0..1 + rng.below(3) {
            let claims: Vec<String> = granted.iter().map(|t| format!("t{t}")).collect();
            let token =
                herald::auth::mint(SECRET.as_bytes(), &format!("u{user}"), Duration::from_secs(600), &claims, None);
            let mut client = Client::connect(port, &token);
            let mut subscribed = BTreeSet::new();
            let mut requests = 0;
            for topic in 0..topics {
                if rng.chance(60) {
                    requests += 1;
                    client.send_text(&format!(r#"{{"type":"subscribe","topic":"t{topic}"}}"#));
                    if granted.contains(&topic) {
                        subscribed.insert(topic);
                    }
                }
            }
            subscribers.push(Subscriber { user, topics: subscribed, requests, client });
        }
    }
    // Subscription replies (subscribed / error) are read and set aside before publishing.
    for s in &mut subscribers {
        let mut left = s.requests;
        let replies = if left == 0 {
            Vec::new()
        } else {
            s.client.read_texts_until(|_| {
                left -= 1;
                left == 0
            })
        };
        let confirmed = replies.iter().filter(|r| r.contains("\"subscribed\"")).count();
        assert_eq!(confirmed, s.topics.len(), "seed {seed}: confirmations {replies:?}");
    }
    let messages = 20 + rng.below(60);
    let mut owed: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); subscribers.len()];
    for m in 0..messages {
        // Any users plus at most one topic (what one /publish call can address); a connection
        // that is both a target user and a topic subscriber is owed the message once.
        let mut target_users = BTreeSet::new();
        for _ in 0..rng.below(3) {
            target_users.insert(rng.below(users + 2)); // sometimes a user nobody is
        }
        let target_topic = (target_users.is_empty() || rng.chance(50)).then(|| rng.below(topics + 1));
        for (i, s) in subscribers.iter().enumerate() {
            if target_users.contains(&s.user) || target_topic.is_some_and(|t| s.topics.contains(&t)) {
                owed[i].insert(m);
            }
        }
        let user_ids: Vec<String> = target_users.iter().map(|u| format!("\"u{u}\"")).collect();
        let mut body = format!(r#"{{"message":{{"type":"iso","m":{m}}},"user_ids":[{}]"#, user_ids.join(","));
        if let Some(t) = target_topic {
            body.push_str(&format!(r#","topic":"t{t}""#));
        }
        body.push('}');
        let response = http_post(port, "/publish", &body);
        assert!(response.starts_with("HTTP/1.1 200"), "seed {seed}: publish failed: {response}");
    }
    // A last message to every user marks the end: each connection's stream is ordered, so
    // everything published before it has arrived by the time it does.
    let everyone: Vec<String> = (0..users).map(|u| format!("\"u{u}\"")).collect();
    let end = format!(r#"{{"message":{{"type":"end"}},"user_ids":[{}]}}"#, everyone.join(","));
    assert!(http_post(port, "/publish", &end).starts_with("HTTP/1.1 200"));
    for (i, s) in subscribers.iter_mut().enumerate() {
        let mut received = s.client.read_texts_until(|text| text.contains("\"end\""));
        received.pop();
        let mut got: BTreeMap<usize, usize> = BTreeMap::new();
        for text in &received {
            let value: serde_json::Value = serde_json::from_str(text).expect("json");
            assert_eq!(value["type"], "iso", "seed {seed}: unexpected message {text}");
            *got.entry(value["m"].as_u64().expect("m") as usize).or_default() += 1;
        }
        let duplicated: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
        assert!(duplicated.is_empty(), "seed {seed}: conn {i} got duplicates {duplicated:?}");
        let got_set: BTreeSet<usize> = got.keys().copied().collect();
        let missing: Vec<_> = owed[i].difference(&got_set).collect();
        let leaked: Vec<_> = got_set.difference(&owed[i]).collect();
        assert!(missing.is_empty(), "seed {seed}: conn {i} (user u{}) missed {missing:?}", s.user);
        assert!(leaked.is_empty(), "seed {seed}: conn {i} (user u{}) got foreign {leaked:?}", s.user);
    }
    drop(subscribers);
    assert!(herald.shutdown(Duration::from_secs(5)), "seed {seed}: shutdown left connections open");
}

#[test]
fn each_message_reaches_exactly_its_entitled_connections() {
    let base = std::env::var("HERALD_ISOLATION_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        nanos as u64 ^ u64::from(std::process::id()) << 32
    });
    for case in 0..25 {
        let seed = base.wrapping_add(case * 0x1000_0001);
        eprintln!("isolation case {case}: HERALD_ISOLATION_SEED={seed}");
        run_case(seed);
    }
}
