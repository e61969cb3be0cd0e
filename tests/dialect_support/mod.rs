//! Helpers for the dialect tests (tests/dialects.rs): tokens with claims, WebSocket
//! connections on any path, JSON HTTP calls, Redis subscriber counts, and a runner for the
//! seeds' own client scripts (node / python) that reads their output line by line.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;

pub const T: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// tokens
// ---------------------------------------------------------------------------------------

/// A user token (one hour) for `sub` whose `topics` claim is `topics`.
pub fn token_topics(sub: &str, topics: &[&str]) -> String {
    let now = now_secs();
    token_claims(json!({"sub": sub, "iat": now, "exp": now + 3600, "topics": topics}))
}

/// A token with scope `publish` (and the given topics).
pub fn token_publisher(sub: &str, topics: &[&str]) -> String {
    let now = now_secs();
    token_claims(json!({"sub": sub, "iat": now, "exp": now + 3600, "topics": topics, "scope": "publish"}))
}

/// A token that expires `secs` seconds from now.
pub fn token_expiring(sub: &str, topics: &[&str], secs: u64) -> String {
    let now = now_secs();
    token_claims(json!({"sub": sub, "iat": now, "exp": now + secs, "topics": topics}))
}

/// Tokens every dialect must refuse: (label, token).
pub fn bad_tokens() -> Vec<(&'static str, String)> {
    let now = now_secs();
    vec![
        ("garbage", "not-a-jwt".to_string()),
        ("wrong secret", token_hs256(&json!({"sub": "u1", "exp": now + 3600}), "some-other-secret")),
        ("expired", token_claims(json!({"sub": "u1", "iat": now - 7200, "exp": now - 3600}))),
    ]
}

// ---------------------------------------------------------------------------------------
// WebSocket on any path
// ---------------------------------------------------------------------------------------

/// `path?token=TOKEN` (the token is URL-safe base64 and dots: no escaping needed).
pub fn with_token(path: &str, token: &str) -> String {
    format!("{path}?token={token}")
}

/// Upgrades `path?token=TOKEN`; panics when the upgrade is refused.
pub fn connect(port: u16, path: &str, token: &str) -> Ws {
    match ws_try_connect(port, &with_token(path, token), &[]) {
        Upgrade::Ok(ws) => *ws,
        Upgrade::Rejected { status, body } => panic!("upgrade of {path} refused: {status} {body}"),
    }
}

/// Connects to the seed-000 path and consumes (and checks) the `connected` greeting.
pub fn connect_000(port: u16, token: &str) -> Ws {
    let mut ws = connect(port, "/v1/notifications/ws/notifications", token);
    let hello = recv_json(&mut ws, T);
    assert_eq!(hello["type"], "connected", "first message on the seed-000 path: {hello}");
    ws
}

/// Upgrade must succeed (101) and then be closed by the server with `code`.
pub fn expect_open_then_close(port: u16, path_and_query: &str, code: u16, label: &str) {
    match ws_try_connect(port, path_and_query, &[]) {
        Upgrade::Ok(mut ws) => match wait_close(&mut ws, T) {
            Closed::Frame(Some(c), reason) => {
                assert_eq!(c, code, "{label}: {path_and_query}: close code (reason {reason:?})")
            }
            other => panic!("{label}: {path_and_query}: expected close frame {code}, got {other:?}"),
        },
        Upgrade::Rejected { status, body } => {
            panic!("{label}: {path_and_query}: expected 101 then close {code}, got HTTP {status} {body}")
        }
    }
}

pub fn send_text(ws: &mut Ws, text: &str) {
    ws.send(tungstenite::Message::text(text)).unwrap_or_else(|e| panic!("send {text:?}: {e}"));
}

pub fn send_json(ws: &mut Ws, v: &Value) {
    send_text(ws, &v.to_string());
}

/// Round trip `ping`/`pong`: everything sent before has been processed by the server.
pub fn barrier(ws: &mut Ws) {
    send_text(ws, "ping");
    let t = recv_text(ws, T);
    assert_eq!(t, "pong", "expected the barrier pong, got {t:?}");
}

/// Drops `timestamp` (if any) from a delivered object.
pub fn without_timestamp(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("timestamp");
    }
    v
}

/// Receives the next JSON message, skipping seed-000 heartbeats.
pub fn recv_data(ws: &mut Ws, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = recv_json(ws, left.max(Duration::from_millis(1)));
        if m["type"] != "heartbeat" {
            return m;
        }
    }
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

/// POST `path` with a JSON (or raw) body and an optional bearer.
pub fn post(h: &Herald, path: &str, auth: Option<&str>, body: &[u8]) -> HttpResponse {
    let bearer;
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = auth {
        bearer = format!("Bearer {a}");
        headers.push(("Authorization", bearer.as_str()));
    }
    h.http("POST", path, &headers, body)
}

pub fn post_json(h: &Herald, path: &str, auth: Option<&str>, body: &Value) -> HttpResponse {
    post(h, path, auth, body.to_string().as_bytes())
}

/// POST that must answer 200; returns the JSON body.
pub fn post_ok(h: &Herald, path: &str, auth: Option<&str>, body: &Value) -> Value {
    let r = post_json(h, path, auth, body);
    assert_eq!(r.status, 200, "POST {path} {body}: {}", r.text());
    r.json()
}

/// POST /publish with the API key; returns the `sent` flag.
pub fn publish_key(h: &Herald, body: &Value) -> bool {
    let v = post_ok(h, "/publish", Some(API_KEY), body);
    assert_eq!(v["status"], "success", "{v}");
    v["sent"].as_bool().unwrap_or_else(|| panic!("no boolean sent in {v}"))
}

/// POST /publish (API key) until it reports `sent: true` (with Redis, a subscriber may join
/// a moment after the connection opened). `sent: false` means nobody received it.
pub fn publish_until_sent(h: &Herald, body: &Value) {
    let ok = wait_until(T, || publish_key(h, body));
    assert!(ok, "POST /publish {body} never reported sent:true");
}

/// An integer counter from GET /metrics (JSON).
pub fn metric(h: &Herald, section: &str, name: &str) -> i64 {
    let m = h.metrics();
    m[section][name].as_i64().unwrap_or_else(|| panic!("metrics has no integer {section}.{name}: {m}"))
}

/// Asserts a 400/401/403 error body `{"status":"error","error":<string>}`.
pub fn assert_api_error(r: &HttpResponse, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "error", "{what}: {v}");
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: error must be a string: {v}");
}

// ---------------------------------------------------------------------------------------
// seed client scripts
// ---------------------------------------------------------------------------------------

pub fn seed_client(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("seed_clients").join(name)
}

/// Why node can't run the browser-style seed snippets, or None when it can.
pub fn node_missing() -> Option<String> {
    let out = Command::new("node")
        .args([
            "--experimental-websocket",
            "-e",
            "if (typeof WebSocket !== 'function' || typeof fetch !== 'function') process.exit(3)",
        ])
        .stdin(Stdio::null())
        .output();
    match out {
        Err(e) => Some(format!("`node` could not be run: {e}")),
        Ok(o) if !o.status.success() => Some(format!(
            "`node --experimental-websocket` has no global WebSocket/fetch (exit {:?}): {}",
            o.status.code(),
            String::from_utf8_lossy(&o.stderr)
        )),
        Ok(_) => None,
    }
}

/// Why python3 can't run the Python seed client, or None when it can.
pub fn python_missing() -> Option<String> {
    let out = Command::new("python3").args(["-c", "import websocket, requests"]).stdin(Stdio::null()).output();
    match out {
        Err(e) => Some(format!("`python3` could not be run: {e}")),
        Ok(o) if !o.status.success() => {
            Some(format!("python3 lacks websocket-client/requests: {}", String::from_utf8_lossy(&o.stderr).trim()))
        }
        Ok(_) => None,
    }
}

pub fn skip_loudly(test: &str, why: &str) {
    // Straight to the process's stderr: libtest captures eprintln! of passing tests.
    let bar = "!".repeat(90);
    let _ = writeln!(
        std::io::stderr(),
        "\n{bar}\n!!! SKIPPED {test}: {why}\n!!! (this test checked NOTHING; install the tool to run it)\n{bar}\n"
    );
}

/// A running client script: its stdout and stderr as one stream of lines.
pub struct Script {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Lines received but not matched yet.
    pending: Vec<String>,
    seen: Arc<Mutex<Vec<String>>>,
    name: String,
}

fn pump<R: Read + Send + 'static>(r: R, tx: Sender<String>, seen: Arc<Mutex<Vec<String>>>, tag: &'static str) {
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            seen.lock().unwrap().push(format!("{tag}{line}"));
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

impl Script {
    pub fn spawn(mut cmd: Command, name: &str) -> Script {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let (tx, rx) = channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        pump(child.stdout.take().unwrap(), tx.clone(), seen.clone(), "");
        pump(child.stderr.take().unwrap(), tx, seen.clone(), "[stderr] ");
        let stdin = child.stdin.take();
        Script { child, stdin, lines: rx, pending: Vec::new(), seen, name: name.to_string() }
    }

    /// Runs `node --experimental-websocket tests/seed_clients/<file>` with the given env.
    pub fn node(file: &str, env: &[(&str, &str)]) -> Script {
        let mut cmd = Command::new("node");
        cmd.arg("--experimental-websocket").arg("--no-warnings").arg(seed_client(file));
        for (k, v) in env {
            cmd.env(k, v);
        }
        Script::spawn(cmd, file)
    }

    /// Everything the script printed so far.
    pub fn output(&self) -> String {
        self.seen.lock().unwrap().join("\n")
    }

    /// Waits for a line containing every one of `parts` and returns it. Lines are matched
    /// in any order: lines skipped here stay available to later `expect`s (output of
    /// concurrent events — a fetch answer and a WebSocket message — has no fixed order).
    pub fn expect(&mut self, parts: &[&str], timeout: Duration) -> String {
        let matches = |line: &str| parts.iter().all(|p| line.contains(p));
        if let Some(i) = self.pending.iter().position(|l| matches(l)) {
            return self.pending.remove(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if matches(&line) => return line,
                Ok(line) => self.pending.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{}: no line containing {parts:?} within {timeout:?}; output:\n{}", self.name, self.output())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    thread::sleep(Duration::from_millis(100));
                    panic!("{}: ended without a line containing {parts:?}; output:\n{}", self.name, self.output())
                }
            }
        }
    }

    /// Asserts no line containing `part` was printed so far or appears during `dur`.
    pub fn expect_none(&mut self, part: &str, dur: Duration) {
        let deadline = Instant::now() + dur;
        loop {
            if let Some(line) = self.pending.iter().find(|l| l.contains(part)) {
                panic!("{}: unexpected line {line:?}; output:\n{}", self.name, self.output());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.pending.push(line),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    if let Some(line) = self.pending.iter().find(|l| l.contains(part)) {
                        panic!("{}: unexpected line {line:?}; output:\n{}", self.name, self.output());
                    }
                    return;
                }
            }
        }
    }

    /// Sends a command line to the script's harness (stdin).
    pub fn command(&mut self, cmd: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{cmd}").and_then(|_| stdin.flush()).unwrap_or_else(|e| panic!("{}: stdin: {e}", self.name));
    }

    /// Waits for the script to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                thread::sleep(Duration::from_millis(100));
                return st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{} did not exit within {timeout:?}; output:\n{}", self.name, self.output());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        self.stdin.take();
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
