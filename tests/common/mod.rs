//! Shared helpers for herald's integration tests.
//!
//! Everything here drives real processes over real sockets: the herald binary built by
//! cargo, a real `redis-server` on a free port, std `TcpStream`s and tungstenite clients.
//! Every wait is bounded by a deadline and every child process is killed on drop.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::http::{HeaderName, HeaderValue};
use tungstenite::protocol::WebSocket;

pub mod cluster;

/// HS256 secret every test herald is started with (unless a test says otherwise).
pub const SECRET: &str = "herald-integration-test-secret-3f9a1c";
/// API key used by tests that configure HERALD_API_KEY.
pub const API_KEY: &str = "test-api-key-7b2e";

pub type Ws = WebSocket<TcpStream>;

// ---------------------------------------------------------------------------------------
// time, ports, polling
// ---------------------------------------------------------------------------------------

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A TCP port that was free a moment ago (bind 127.0.0.1:0, read the port, drop).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes. Returns whether it did.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join(name)
}

/// `^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$` without a regex crate.
pub fn is_rfc3339_millis_utc(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 24 {
        return false;
    }
    let pattern = b"dddd-dd-ddTdd:dd:dd.dddZ";
    b.iter().zip(pattern.iter()).all(|(c, p)| match p {
        b'd' => c.is_ascii_digit(),
        other => c == other,
    })
}

// ---------------------------------------------------------------------------------------
// base64url + JWT minting
// ---------------------------------------------------------------------------------------

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

pub fn b64url_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = match chunk.len() {
            3 => (chunk[0] as u32) << 16 | (chunk[1] as u32) << 8 | chunk[2] as u32,
            2 => (chunk[0] as u32) << 16 | (chunk[1] as u32) << 8,
            _ => (chunk[0] as u32) << 16,
        };
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

pub fn b64url_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            b'=' => continue,
            _ => panic!("bad base64url char {c:?} in {s:?}"),
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Claims payload of a JWT, decoded without verification.
pub fn jwt_claims(token: &str) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert!(parts.len() == 3, "not a JWT: {token:?}");
    serde_json::from_slice(&b64url_decode(parts[1])).expect("JWT payload is JSON")
}

/// Header of a JWT, decoded without verification.
pub fn jwt_header(token: &str) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert!(parts.len() == 3, "not a JWT: {token:?}");
    serde_json::from_slice(&b64url_decode(parts[0])).expect("JWT header is JSON")
}

/// HS256 token with arbitrary claims, signed with `secret`.
pub fn token_hs256(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode HS256")
}

/// HS256 token with these claims, signed with the test SECRET.
pub fn token_claims(claims: Value) -> String {
    token_hs256(&claims, SECRET)
}

/// A valid user token for `sub` (exp in one hour), signed with SECRET.
pub fn token(sub: &str) -> String {
    let now = now_secs();
    token_claims(json!({"sub": sub, "iat": now, "exp": now + 3600}))
}

/// RS256 token signed with a fixture key, named by its PEM file (e.g. "rsa_private.pem");
/// the signature uses the PKCS1 DER copy of that key (`rsa_private.pkcs1.der`).
pub fn token_rs256(claims: &Value, private_pem: &str) -> String {
    let der_name = private_pem.replace(".pem", ".pkcs1.der");
    let der = std::fs::read(fixture(&der_name)).expect("read RSA DER key fixture");
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        claims,
        &jsonwebtoken::EncodingKey::from_rsa_der(&der),
    )
    .expect("encode RS256")
}

/// ES256 token signed with a fixture key, named by its PEM file (e.g. "ec_private.pem");
/// the signature uses the PKCS8 DER copy of that key (`ec_private.pkcs8.der`).
pub fn token_es256(claims: &Value, private_pem: &str) -> String {
    let der_name = private_pem.replace(".pem", ".pkcs8.der");
    let der = std::fs::read(fixture(&der_name)).expect("read EC DER key fixture");
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        claims,
        &jsonwebtoken::EncodingKey::from_ec_der(&der),
    )
    .expect("encode ES256")
}

/// The signing key of a fixture, named by its PEM file, and the algorithm it signs with
/// (RS256 for `rsa_*`, ES256 for `ec_*`), read from its DER copy as the helpers above do.
pub fn fixture_signing_key(private_pem: &str) -> (jsonwebtoken::EncodingKey, jsonwebtoken::Algorithm) {
    if private_pem.starts_with("ec") {
        let der = std::fs::read(fixture(&private_pem.replace(".pem", ".pkcs8.der"))).expect("read EC DER key fixture");
        (jsonwebtoken::EncodingKey::from_ec_der(&der), jsonwebtoken::Algorithm::ES256)
    } else {
        let der = std::fs::read(fixture(&private_pem.replace(".pem", ".pkcs1.der"))).expect("read RSA DER key fixture");
        (jsonwebtoken::EncodingKey::from_rsa_der(&der), jsonwebtoken::Algorithm::RS256)
    }
}

/// A token whose header names `kid`, signed with a fixture key (RS256 for `rsa_*.pem`,
/// ES256 for `ec_*.pem`).
pub fn token_kid(claims: &Value, private_pem: &str, kid: &str) -> String {
    let (key, alg) = fixture_signing_key(private_pem);
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, &key).expect("encode token with kid")
}

/// RS256 token whose header names `kid`, signed with a fixture RSA key.
pub fn token_rs256_kid(claims: &Value, private_pem: &str, kid: &str) -> String {
    assert!(private_pem.starts_with("rsa"), "{private_pem} is not an RSA fixture");
    token_kid(claims, private_pem, kid)
}

/// ES256 token whose header names `kid`, signed with a fixture EC key.
pub fn token_es256_kid(claims: &Value, private_pem: &str, kid: &str) -> String {
    assert!(private_pem.starts_with("ec"), "{private_pem} is not an EC fixture");
    token_kid(claims, private_pem, kid)
}

/// An unsigned token with `alg: none`.
pub fn token_alg_none(claims: &Value) -> String {
    let header = b64url_encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64url_encode(claims.to_string().as_bytes());
    format!("{header}.{payload}.")
}

// ---------------------------------------------------------------------------------------
// child process plumbing
// ---------------------------------------------------------------------------------------

fn drain<R: Read + Send + 'static>(mut r: R, sink: Arc<Mutex<String>>) {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    });
}

/// Environment variables herald reads; removed from every child so the developer's or
/// CI's environment can't leak in.
fn scrub_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        if k.starts_with("HERALD_") || k == "JWT_SECRET_KEY" || k == "REDIS_URL" || k == "RUST_LOG" {
            cmd.env_remove(&k);
        }
    }
}

pub fn herald_bin() -> &'static str {
    env!("CARGO_BIN_EXE_herald")
}

/// Output of a herald run that is expected to terminate on its own.
pub struct RunOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs herald with `args` and `env` to completion (killed after `timeout`).
pub fn run_herald(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> RunOutput {
    let mut cmd = Command::new(herald_bin());
    scrub_env(&mut cmd);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn herald");
    let out = Arc::new(Mutex::new(String::new()));
    let err = Arc::new(Mutex::new(String::new()));
    drain(child.stdout.take().unwrap(), out.clone());
    drain(child.stderr.take().unwrap(), err.clone());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    // let the drain threads catch the last bytes
    thread::sleep(Duration::from_millis(100));
    let stdout = out.lock().unwrap().clone();
    let stderr = err.lock().unwrap().clone();
    assert!(status.is_some(), "herald {args:?} did not exit within {timeout:?}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    RunOutput { code: status.unwrap().code(), stdout, stderr }
}

// ---------------------------------------------------------------------------------------
// herald server
// ---------------------------------------------------------------------------------------

pub struct HeraldBuilder {
    env: BTreeMap<String, String>,
    args: Vec<String>,
    port: Option<u16>,
    wait_ready: bool,
    rlimit_nofile: Option<u64>,
}

/// A herald builder with HERALD_LISTEN on a free port and HERALD_JWT_SECRET = SECRET.
pub fn herald() -> HeraldBuilder {
    let mut env = BTreeMap::new();
    env.insert("HERALD_JWT_SECRET".to_string(), SECRET.to_string());
    HeraldBuilder { env, args: Vec::new(), port: None, wait_ready: true, rlimit_nofile: None }
}

impl HeraldBuilder {
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.insert(k.to_string(), v.to_string());
        self
    }
    pub fn remove_env(mut self, k: &str) -> Self {
        self.env.remove(k);
        self
    }
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }
    /// No HERALD_JWT_SECRET: dev mode.
    pub fn no_secret(self) -> Self {
        self.remove_env("HERALD_JWT_SECRET")
    }
    pub fn redis(self, r: &Redis) -> Self {
        let url = r.url();
        self.env("HERALD_REDIS_URL", &url)
    }
    pub fn api_key(self) -> Self {
        self.env("HERALD_API_KEY", API_KEY)
    }
    pub fn port(mut self, p: u16) -> Self {
        self.port = Some(p);
        self
    }
    /// Don't wait for /health before returning.
    pub fn no_wait(mut self) -> Self {
        self.wait_ready = false;
        self
    }
    /// Starts herald with RLIMIT_NOFILE = `n` (soft and hard).
    pub fn rlimit_nofile(mut self, n: u64) -> Self {
        self.rlimit_nofile = Some(n);
        self
    }

    pub fn start(self) -> Herald {
        // A port picked by free_port() can, rarely, be taken by someone else before herald
        // binds it; then herald exits at once and we retry on another port.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = self.port.unwrap_or_else(free_port);
            let mut h = self.spawn_on(port);
            if !self.wait_ready {
                return h;
            }
            match h.try_wait_ready(Duration::from_secs(10)) {
                Ok(()) => return h,
                Err(msg) => {
                    let bind_race = self.port.is_none()
                        && !h.is_running()
                        && ["in use", "AddrInUse", "os error 98"].iter().any(|p| h.stderr().contains(p));
                    if bind_race && attempt < 3 {
                        continue;
                    }
                    panic!("{msg}");
                }
            }
        }
    }

    fn spawn_on(&self, port: u16) -> Herald {
        let mut cmd = Command::new(herald_bin());
        scrub_env(&mut cmd);
        cmd.env("HERALD_LISTEN", format!("127.0.0.1:{port}"));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.args(&self.args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        if let Some(n) = self.rlimit_nofile {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit { rlim_cur: n as libc::rlim_t, rlim_max: n as libc::rlim_t };
            // SAFETY: the closure runs in the forked child between fork and exec. It only calls
            // setrlimit (async-signal-safe) on a value captured by copy, and builds an
            // io::Error from the errno without allocating; no lock or allocator is touched.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn herald");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        drain(child.stdout.take().unwrap(), stdout.clone());
        drain(child.stderr.take().unwrap(), stderr.clone());
        Herald { child, port, stdout, stderr }
    }
}

pub struct Herald {
    pub child: Child,
    pub port: u16,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Herald {
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Polls GET /health until it answers 200 or 503 (panics otherwise).
    pub fn wait_ready(&mut self, timeout: Duration) {
        if let Err(msg) = self.try_wait_ready(timeout) {
            panic!("{msg}");
        }
    }

    /// Polls GET /health until it answers 200 or 503; Err describes why it did not.
    pub fn try_wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                thread::sleep(Duration::from_millis(100));
                return Err(format!(
                    "herald exited before becoming ready: {st}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                ));
            }
            if let Some(r) = try_http(self.port, "GET", "/health", &[], b"", Duration::from_secs(2)) {
                if r.status == 200 || r.status == 503 {
                    // make sure it is our process that answered
                    thread::sleep(Duration::from_millis(20));
                    if self.child.try_wait().unwrap().is_none() {
                        return Ok(());
                    }
                    continue;
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "herald not ready on port {} within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.port,
                    self.stdout(),
                    self.stderr()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, sig: i32) {
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.pid());
    }
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn http(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
        http(self.port, method, path, headers, body)
    }

    pub fn health(&self) -> HttpResponse {
        http(self.port, "GET", "/health", &[], b"")
    }

    pub fn health_json(&self) -> Value {
        self.health().json()
    }

    pub fn metrics(&self) -> Value {
        let r = http(self.port, "GET", "/metrics", &[("Accept", "application/json")], b"");
        assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
        r.json()
    }

    /// POST /publish/batch `{"items": items}` with the test API key.
    pub fn publish_batch(&self, items: &[Value]) -> HttpResponse {
        let bearer = format!("Bearer {API_KEY}");
        let body = serde_json::json!({ "items": items }).to_string();
        http(self.port, "POST", "/publish/batch", &[("Authorization", &bearer)], body.as_bytes())
    }

    /// POST /publish with `Authorization: Bearer <auth>`.
    pub fn publish(&self, auth: Option<&str>, body: &Value) -> HttpResponse {
        let bearer;
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(a) = auth {
            bearer = format!("Bearer {a}");
            headers.push(("Authorization", bearer.as_str()));
        }
        http(self.port, "POST", "/publish", &headers, body.to_string().as_bytes())
    }

    /// Current `websocket.active_connections` from /health.
    pub fn active_connections(&self) -> i64 {
        let h = self.health_json();
        h["websocket"]["active_connections"].as_i64().unwrap_or_else(|| panic!("no active_connections in {h}"))
    }

    /// Waits until /health reports exactly `n` active connections.
    pub fn wait_active_connections(&self, n: i64, timeout: Duration) {
        let mut last = -1;
        let ok = wait_until(timeout, || {
            last = self.active_connections();
            last == n
        });
        assert!(ok, "active_connections did not become {n} within {timeout:?} (last seen {last})");
    }

    /// Waits until /health reports exactly `n` unique users (the count may trail the
    /// connection count by a moment).
    pub fn wait_unique_users(&self, n: i64, timeout: Duration) {
        let mut v = Value::Null;
        let ok = wait_until(timeout, || {
            v = self.health_json();
            v["websocket"]["total_unique_users"] == n
        });
        assert!(ok, "websocket.total_unique_users did not become {n} within {timeout:?}: {v}");
    }

    /// Connects a WebSocket to /ws?token=TOKEN (panics if the upgrade is refused).
    pub fn ws(&self, token: &str) -> Ws {
        ws_connect(self.port, token)
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// redis-server
// ---------------------------------------------------------------------------------------

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    /// Arguments added to redis-server's command line (see [`RedisBuilder`]).
    extra: Vec<String>,
    /// For a TLS-only server: the redis-cli flags that reach it.
    tls_cli: Option<Vec<String>>,
}

/// A redis-server with settings of its own: ACL users, TLS.
#[derive(Default)]
pub struct RedisBuilder {
    extra: Vec<String>,
    tls_cli: Option<Vec<String>>,
}

impl RedisBuilder {
    /// Appends to redis-server's command line, e.g. `["--user", "herald", "on", ">pw", "&*", "+@all"]`.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.extra.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Serves TLS only: the port becomes `--tls-port` (with `--port 0`), `server` adds the
    /// `--tls-*` flags, and `cli` are the redis-cli flags that reach it (`--tls --cacert …`):
    /// the readiness check and [`Redis::cli`] use them.
    pub fn tls(mut self, server: &[&str], cli: &[&str]) -> Self {
        self.extra.extend(server.iter().map(|a| a.to_string()));
        self.tls_cli = Some(cli.iter().map(|a| a.to_string()).collect());
        self
    }

    pub fn start(self) -> Redis {
        let mut r = Redis { child: None, port: free_port(), extra: self.extra, tls_cli: self.tls_cli };
        r.spawn();
        r
    }
}

impl Redis {
    pub fn start() -> Redis {
        Redis::builder().start()
    }

    pub fn builder() -> RedisBuilder {
        RedisBuilder::default()
    }

    /// Starts redis-server on a given port.
    pub fn start_on(port: u16) -> Redis {
        let mut r = Redis { child: None, port, extra: Vec::new(), tls_cli: None };
        r.spawn();
        r
    }

    /// Runs `redis-cli` against this server (over TLS for a TLS-only one) and returns its
    /// standard output, trimmed; killed after 5 s.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        cmd.args(self.tls_cli.iter().flatten());
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn redis-cli");
        let out = Arc::new(Mutex::new(String::new()));
        drain(child.stdout.take().unwrap(), out.clone());
        let exited = wait_until(Duration::from_secs(5), || matches!(child.try_wait(), Ok(Some(_))));
        if !exited {
            let _ = child.kill();
        }
        let _ = child.wait();
        // The drain thread ends at EOF, right after the exit.
        wait_until(Duration::from_millis(500), || Arc::strong_count(&out) == 1);
        out.lock().unwrap().trim().to_string()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let port = self.port.to_string();
            let ports = match self.tls_cli {
                None => ["--port", &port, "", ""],
                Some(_) => ["--port", "0", "--tls-port", &port],
            };
            let mut child = Command::new("redis-server")
                .args(ports.iter().filter(|a| !a.is_empty()))
                .args([
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--loglevel",
                    "warning",
                ])
                .args(&self.extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server (is it installed?)");
            // wait for PING
            let ready = wait_until(Duration::from_secs(5), || {
                if let Ok(Some(_)) = child.try_wait() {
                    return true;
                }
                match self.tls_cli {
                    None => redis_ping(self.port),
                    Some(_) => self.cli(&["PING"]) == "PONG",
                }
            });
            if ready && child.try_wait().unwrap().is_none() {
                self.child = Some(child);
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            // the port may still be held (e.g. TIME_WAIT or a racing test): retry
            if Instant::now() >= deadline {
                panic!("redis-server did not start on port {}", self.port);
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Kills redis-server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts redis-server again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn conn(&self) -> RedisConn {
        RedisConn::connect(self.port)
    }

    pub fn publish(&self, channel: &str, payload: &str) -> i64 {
        redis_publish(self.port, channel, payload)
    }

    /// Number of redis clients that hold at least one (p)subscription.
    pub fn subscriber_clients(&self) -> usize {
        let mut c = self.conn();
        let list = match c.command(&["CLIENT", "LIST"]) {
            Resp::Bulk(Some(b)) => String::from_utf8_lossy(&b).to_string(),
            other => panic!("CLIENT LIST: {other:?}"),
        };
        list.lines()
            .filter(|l| {
                l.split(' ').any(|kv| {
                    (kv.starts_with("sub=") || kv.starts_with("psub=") || kv.starts_with("ssub="))
                        && kv.split('=').nth(1).map(|n| n != "0").unwrap_or(false)
                })
            })
            .count()
    }

    /// CLIENT LIST's lines for the clients named `name`.
    pub fn clients_named(&self, name: &str) -> Vec<String> {
        let mut c = self.conn();
        let list = match c.command(&["CLIENT", "LIST"]) {
            Resp::Bulk(Some(b)) => String::from_utf8_lossy(&b).to_string(),
            other => panic!("CLIENT LIST: {other:?}"),
        };
        let wanted = format!("name={name}");
        list.lines().filter(|l| l.split(' ').any(|kv| kv == wanted)).map(str::to_string).collect()
    }

    /// Herald readers connected (named `herald-reader` in CLIENT LIST).
    pub fn herald_readers(&self) -> usize {
        let mut c = self.conn();
        let list = match c.command(&["CLIENT", "LIST"]) {
            Resp::Bulk(Some(b)) => String::from_utf8_lossy(&b).to_string(),
            other => panic!("CLIENT LIST: {other:?}"),
        };
        list.lines().filter(|l| l.split(' ').any(|kv| kv == "name=herald-reader")).count()
    }

    /// Waits until at least `n` herald instances' readers are connected. From then on, a
    /// connection's `101` means its channel is subscribed (exact mode) and a publish reaches
    /// it; in pattern mode use [`Redis::wait_pattern_subscribers`].
    pub fn wait_subscribers(&self, n: usize, timeout: Duration) {
        let mut last = 0;
        let ok = wait_until(timeout, || {
            last = self.herald_readers();
            last >= n
        });
        assert!(ok, "expected {n} herald readers connected to redis within {timeout:?}, saw {last}");
    }

    /// Waits until at least `n` redis clients hold a subscription (pattern-mode instances
    /// ready).
    pub fn wait_pattern_subscribers(&self, n: usize, timeout: Duration) {
        let mut last = 0;
        let ok = wait_until(timeout, || {
            last = self.subscriber_clients();
            last >= n
        });
        assert!(ok, "expected {n} subscribed redis clients within {timeout:?}, saw {last}");
    }

    /// Publishes until at least one subscriber received it (PUBLISH returns >= 1).
    pub fn publish_until_received(&self, channel: &str, payload: &str, timeout: Duration) -> i64 {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.publish(channel, payload);
            if n >= 1 {
                return n;
            }
            assert!(Instant::now() < deadline, "no subscriber received PUBLISH {channel} within {timeout:?}");
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

pub fn resp_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A plain RESP connection to redis-server.
pub struct RedisConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RedisConn {
    pub fn connect(port: u16) -> RedisConn {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        stream.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        stream.set_nodelay(true).unwrap();
        RedisConn { stream, buf: Vec::new() }
    }

    pub fn send(&mut self, args: &[&str]) {
        let a: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
        self.stream.write_all(&resp_command(&a)).expect("write to redis");
    }

    pub fn command(&mut self, args: &[&str]) -> Resp {
        self.send(args);
        self.read_reply(Duration::from_secs(5)).expect("redis reply")
    }

    pub fn publish(&mut self, channel: &str, payload: &str) -> i64 {
        match self.command(&["PUBLISH", channel, payload]) {
            Resp::Int(n) => n,
            other => panic!("PUBLISH reply: {other:?}"),
        }
    }

    /// Pipelines many PUBLISHes; returns the sum of receiver counts.
    pub fn publish_many(&mut self, channel: &str, payloads: &[String]) -> i64 {
        let mut total = 0;
        for batch in payloads.chunks(500) {
            let mut out = Vec::new();
            for p in batch {
                out.extend_from_slice(&resp_command(&[b"PUBLISH", channel.as_bytes(), p.as_bytes()]));
            }
            self.stream.write_all(&out).expect("write to redis");
            for _ in batch {
                match self.read_reply(Duration::from_secs(10)) {
                    Some(Resp::Int(n)) => total += n,
                    other => panic!("PUBLISH reply: {other:?}"),
                }
            }
        }
        total
    }

    fn fill(&mut self, deadline: Instant) -> bool {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return false;
        }
        self.stream.set_read_timeout(Some(remaining.max(Duration::from_millis(1)))).unwrap();
        let mut tmp = [0u8; 16384];
        match self.stream.read(&mut tmp) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => false,
            Err(_) => false,
        }
    }

    fn parse(buf: &[u8]) -> Option<(Resp, usize)> {
        let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&buf[1..line_end]).ok()?;
        let after = line_end + 2;
        match buf.first()? {
            b'+' => Some((Resp::Simple(line.to_string()), after)),
            b'-' => Some((Resp::Error(line.to_string()), after)),
            b':' => Some((Resp::Int(line.parse().ok()?), after)),
            b'$' => {
                let n: i64 = line.parse().ok()?;
                if n < 0 {
                    return Some((Resp::Bulk(None), after));
                }
                let n = n as usize;
                if buf.len() < after + n + 2 {
                    return None;
                }
                Some((Resp::Bulk(Some(buf[after..after + n].to_vec())), after + n + 2))
            }
            b'*' => {
                let n: i64 = line.parse().ok()?;
                if n < 0 {
                    return Some((Resp::Array(None), after));
                }
                let mut items = Vec::new();
                let mut pos = after;
                for _ in 0..n {
                    let (item, used) = Self::parse(&buf[pos..])?;
                    items.push(item);
                    pos += used;
                }
                Some((Resp::Array(Some(items)), pos))
            }
            other => panic!("unexpected RESP byte {other:?}"),
        }
    }

    /// Reads one reply, or None if none arrived by the timeout.
    pub fn read_reply(&mut self, timeout: Duration) -> Option<Resp> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((r, used)) = Self::parse(&self.buf) {
                self.buf.drain(..used);
                return Some(r);
            }
            if !self.fill(deadline) && Instant::now() >= deadline {
                return None;
            }
        }
    }
}

pub fn redis_ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if n >= 5 && &buf[..5] == b"+PONG")
}

/// PUBLISH over a fresh RESP connection; returns the number of receivers.
pub fn redis_publish(port: u16, channel: &str, payload: &str) -> i64 {
    RedisConn::connect(port).publish(channel, payload)
}

/// A raw redis SUBSCRIBE client.
pub struct RedisSub {
    conn: RedisConn,
}

impl RedisSub {
    pub fn subscribe(port: u16, channel: &str) -> RedisSub {
        let mut conn = RedisConn::connect(port);
        conn.send(&["SUBSCRIBE", channel]);
        let r = conn.read_reply(Duration::from_secs(5)).expect("SUBSCRIBE confirmation");
        assert!(matches!(r, Resp::Array(Some(_))), "SUBSCRIBE reply {r:?}");
        RedisSub { conn }
    }

    /// Next published payload, or None by the timeout.
    pub fn next(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.conn.read_reply(remaining)? {
                Resp::Array(Some(items)) if items.len() == 3 && items[0] == Resp::Bulk(Some(b"message".to_vec())) => {
                    if let Resp::Bulk(Some(p)) = &items[2] {
                        return Some(String::from_utf8_lossy(p).to_string());
                    }
                }
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("response body is not JSON ({e}): status {} body {:?}", self.status, self.text())
        })
    }
}

/// Parses one complete response held in `raw` (read to EOF): status, headers, and the body by
/// its Content-Length (or everything after the head).
pub fn parse_http_response(raw: &[u8]) -> Option<HttpResponse> {
    let he = find_header_end(raw)?;
    let (status, headers) = parse_head(&raw[..he])?;
    let cl: Option<usize> =
        headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length")).and_then(|(_, v)| v.parse().ok());
    let body = match cl {
        Some(cl) => raw.get(he..he + cl)?.to_vec(),
        None => raw[he..].to_vec(),
    };
    Some(HttpResponse { status, headers, body })
}

fn find_header_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Parses status line + headers. Returns (status, headers).
fn parse_head(head: &[u8]) -> Option<(u16, Vec<(String, String)>)> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let status: u16 = parts.next()?.parse().ok()?;
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect();
    Some((status, headers))
}

fn dechunk(body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let rel = body[pos..].windows(2).position(|w| w == b"\r\n")?;
        let size_str = std::str::from_utf8(&body[pos..pos + rel]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        pos += rel + 2;
        if size == 0 {
            return Some(out);
        }
        if body.len() < pos + size + 2 {
            return None;
        }
        out.extend_from_slice(&body[pos..pos + size]);
        pos += size + 2;
    }
}

/// Reads one HTTP response from `stream` (until complete or EOF) within `timeout`.
pub fn read_http_response(stream: &mut TcpStream, timeout: Duration) -> Option<HttpResponse> {
    read_http_response_buf(stream, timeout, &mut Vec::new())
}

/// Reads one response from `stream`, keeping bytes that follow it in `buf` for the next call
/// (pipelined responses).
pub fn read_http_response_buf(stream: &mut TcpStream, timeout: Duration, buf: &mut Vec<u8>) -> Option<HttpResponse> {
    let deadline = Instant::now() + timeout;
    let mut eof = false;
    loop {
        if let Some(he) = find_header_end(buf) {
            let (status, headers) = parse_head(&buf[..he])?;
            let cl = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse::<usize>().ok());
            let chunked = headers.iter().any(|(k, v)| {
                k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
            });
            if status == 101 {
                let rest = buf.split_off(he);
                let resp = HttpResponse { status, headers, body: Vec::new() };
                *buf = rest;
                return Some(resp);
            }
            if let Some(cl) = cl {
                if buf.len() >= he + cl {
                    let body = buf[he..he + cl].to_vec();
                    buf.drain(..he + cl);
                    return Some(HttpResponse { status, headers, body });
                }
            } else if chunked {
                if let Some(body) = dechunk(&buf[he..]) {
                    return Some(HttpResponse { status, headers, body });
                }
            } else if eof {
                return Some(HttpResponse { status, headers, body: buf[he..].to_vec() });
            }
        }
        if eof {
            return None;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return None;
        }
        stream.set_read_timeout(Some(remaining)).unwrap();
        let mut tmp = [0u8; 8192];
        match stream.read(&mut tmp) {
            Ok(0) => eof = true,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => return None,
            Err(_) => eof = true,
        }
    }
}

/// One HTTP/1.1 request with `Connection: close`; None if no complete response came.
pub fn try_http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Option<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&format!("127.0.0.1:{port}").parse().unwrap(), timeout).ok()?;
    s.set_write_timeout(Some(timeout)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes).ok()?;
    read_http_response(&mut s, timeout)
}

/// Like `try_http` but panics when no response arrives within 10 s.
pub fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
    try_http(port, method, path, headers, body, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no HTTP response to {method} {path} on port {port}"))
}

/// Sends raw bytes, returns whatever response is parsed (None if the connection closed
/// without a parsable response or nothing arrived by the timeout).
pub fn http_raw(port: u16, bytes: &[u8], timeout: Duration) -> Option<HttpResponse> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to herald");
    s.set_write_timeout(Some(timeout)).unwrap();
    let _ = s.write_all(bytes);
    read_http_response(&mut s, timeout)
}

// ---------------------------------------------------------------------------------------
// WebSocket (tungstenite)
// ---------------------------------------------------------------------------------------

/// Outcome of an upgrade attempt: either a socket or the HTTP rejection.
pub enum Upgrade {
    Ok(Box<Ws>),
    Rejected { status: u16, body: String },
}

/// Attempts a WebSocket upgrade to `path_and_query` with extra request headers.
pub fn ws_try_connect(port: u16, path_and_query: &str, headers: &[(&str, &str)]) -> Upgrade {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to herald");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut req = format!("ws://127.0.0.1:{port}{path_and_query}").into_client_request().expect("request");
    for (k, v) in headers {
        req.headers_mut().insert(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
    }
    match tungstenite::client(req, stream) {
        Ok((ws, resp)) => {
            assert_eq!(resp.status().as_u16(), 101);
            Upgrade::Ok(Box::new(ws))
        }
        Err(HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            let status = resp.status().as_u16();
            let body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).to_string()).unwrap_or_default();
            Upgrade::Rejected { status, body }
        }
        Err(HandshakeError::Failure(e)) => panic!("WebSocket handshake failed: {e}"),
        Err(HandshakeError::Interrupted(_)) => panic!("WebSocket handshake timed out"),
    }
}

/// Connects to /ws?token=TOKEN; panics if the upgrade is refused.
pub fn ws_connect(port: u16, token: &str) -> Ws {
    match ws_try_connect(port, &format!("/ws?token={token}"), &[]) {
        Upgrade::Ok(ws) => *ws,
        Upgrade::Rejected { status, body } => panic!("upgrade refused: {status} {body}"),
    }
}

/// Reads the next message (of any kind) before `deadline`.
/// None: nothing arrived in time. Some(Err): the connection failed/closed.
pub fn ws_next(ws: &mut Ws, deadline: Instant) -> Option<Result<Message, tungstenite::Error>> {
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return None;
        }
        ws.get_ref().set_read_timeout(Some(remaining.min(Duration::from_millis(250)))).unwrap();
        match ws.read() {
            Ok(m) => return Some(Ok(m)),
            Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                continue;
            }
            Err(e) => return Some(Err(e)),
        }
    }
}

/// Next text frame within `timeout` (pings/pongs skipped). Panics on close/timeout.
pub fn recv_text(ws: &mut Ws, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        match ws_next(ws, deadline) {
            None => panic!("no text message within {timeout:?}"),
            Some(Ok(Message::Text(t))) => return t.as_str().to_string(),
            Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => continue,
            Some(Ok(Message::Close(f))) => panic!("connection closed while waiting for a message: {f:?}"),
            Some(Ok(other)) => panic!("unexpected message while waiting for text: {other:?}"),
            Some(Err(e)) => panic!("connection error while waiting for a message: {e}"),
        }
    }
}

/// Next text frame parsed as JSON.
pub fn recv_json(ws: &mut Ws, timeout: Duration) -> Value {
    let t = recv_text(ws, timeout);
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("message is not JSON ({e}): {t:?}"))
}

/// Asserts that no text/binary frame arrives during `dur` and that the connection stays open.
pub fn assert_no_message(ws: &mut Ws, dur: Duration) {
    let deadline = Instant::now() + dur;
    loop {
        match ws_next(ws, deadline) {
            None => return,
            Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => continue,
            Some(Ok(m)) => panic!("expected no message, got {m:?}"),
            Some(Err(e)) => panic!("expected the connection to stay open, got error {e}"),
        }
    }
}

#[derive(Debug, PartialEq)]
pub enum Closed {
    /// A close frame arrived, with this code (None: empty close frame).
    Frame(Option<u16>, String),
    /// The connection ended without a close frame.
    Dropped(String),
}

/// Waits for the server to close the connection; data frames before it are skipped.
pub fn wait_close(ws: &mut Ws, timeout: Duration) -> Closed {
    let deadline = Instant::now() + timeout;
    loop {
        match ws_next(ws, deadline) {
            None => panic!("connection was not closed within {timeout:?}"),
            Some(Ok(Message::Close(f))) => {
                return match f {
                    Some(f) => Closed::Frame(Some(u16::from(f.code)), f.reason.as_str().to_string()),
                    None => Closed::Frame(None, String::new()),
                };
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Closed::Dropped(e.to_string()),
        }
    }
}

/// Asserts that the server closes with a close frame carrying `code` within `timeout`.
pub fn expect_close_code(ws: &mut Ws, code: u16, timeout: Duration) {
    match wait_close(ws, timeout) {
        Closed::Frame(Some(c), reason) => assert_eq!(c, code, "close code (reason {reason:?})"),
        other => panic!("expected a close frame with code {code}, got {other:?}"),
    }
}

/// Connection is still usable: a text `ping` gets a text `pong`.
pub fn assert_alive(ws: &mut Ws) {
    ws.send(Message::text("ping")).expect("send ping");
    let t = recv_text(ws, Duration::from_secs(5));
    assert_eq!(t, "pong");
}

// ---------------------------------------------------------------------------------------
// raw WebSocket (hand-made upgrade and frames)
// ---------------------------------------------------------------------------------------

pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

#[derive(Debug, PartialEq)]
pub enum RawRead {
    Timeout,
    Eof,
    Error(String),
}

pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

pub fn upgrade_request(port: u16, path: &str, extra: &[(&str, &str)]) -> String {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// Sends a hand-written upgrade request; returns the response (status 101 included).
pub fn raw_upgrade_response(port: u16, path: &str, extra: &[(&str, &str)]) -> (HttpResponse, RawWs) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to herald");
    stream.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.set_nodelay(true).unwrap();
    stream.write_all(upgrade_request(port, path, extra).as_bytes()).expect("write upgrade");
    let mut buf = Vec::new();
    let resp = read_http_response_buf(&mut stream, Duration::from_secs(5), &mut buf)
        .unwrap_or_else(|| panic!("no response to upgrade of {path}"));
    (resp, RawWs { stream, buf })
}

impl RawWs {
    /// Hand-made upgrade to /ws?token=TOKEN; asserts 101.
    pub fn connect(port: u16, token: &str) -> RawWs {
        Self::connect_with(port, token, |_| {})
    }

    /// Like `connect`, over a socket whose receive buffer is set to `rcvbuf` bytes before the
    /// TCP handshake (set after it, the window already negotiated stays large): a client that
    /// can hold almost nothing it does not read.
    pub fn connect_small_window(port: u16, token: &str, rcvbuf: usize) -> RawWs {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
        socket.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into()).expect("connect to herald");
        let stream: TcpStream = socket.into();
        Self::upgrade_on(stream, port, token)
    }

    fn upgrade_on(mut stream: TcpStream, port: u16, token: &str) -> RawWs {
        stream.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        stream.set_nodelay(true).unwrap();
        let path = format!("/ws?token={token}");
        stream.write_all(upgrade_request(port, &path, &[]).as_bytes()).expect("write upgrade");
        let mut buf = Vec::new();
        let resp = read_http_response_buf(&mut stream, Duration::from_secs(5), &mut buf).expect("upgrade response");
        assert_eq!(resp.status, 101, "upgrade status, body {:?}", resp.text());
        RawWs { stream, buf }
    }

    /// Like `connect`, with a hook to set socket options before the upgrade is sent.
    pub fn connect_with(port: u16, token: &str, setup: impl FnOnce(&TcpStream)) -> RawWs {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to herald");
        setup(&stream);
        stream.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        stream.set_nodelay(true).unwrap();
        let path = format!("/ws?token={token}");
        stream.write_all(upgrade_request(port, &path, &[]).as_bytes()).expect("write upgrade");
        let mut buf = Vec::new();
        let resp = read_http_response_buf(&mut stream, Duration::from_secs(5), &mut buf).expect("upgrade response");
        assert_eq!(resp.status, 101, "upgrade status, body {:?}", resp.text());
        assert_eq!(resp.header("sec-websocket-accept"), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "Sec-WebSocket-Accept");
        RawWs { stream, buf }
    }

    pub fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Writes one frame; `mask` None sends it unmasked.
    pub fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> std::io::Result<()> {
        self.write_raw(&encode_frame(fin, opcode, payload, mask))
    }

    /// A final, masked frame.
    pub fn send(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        self.send_frame(true, opcode, payload, Some(wsframe::FIXED_MASK))
    }

    fn fill(&mut self, deadline: Instant) -> Result<(), RawRead> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(RawRead::Timeout);
        }
        self.stream.set_read_timeout(Some(remaining)).unwrap();
        let mut tmp = [0u8; 65536];
        match self.stream.read(&mut tmp) {
            Ok(0) => Err(RawRead::Eof),
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => Err(RawRead::Timeout),
            Err(e) => Err(RawRead::Error(e.to_string())),
        }
    }

    /// Reads one frame before `deadline`.
    pub fn read_frame(&mut self, deadline: Instant) -> Result<RawFrame, RawRead> {
        loop {
            if let Some((f, used)) = decode_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(f);
            }
            self.fill(deadline)?;
        }
    }

    /// Reads frames until a close frame (returns its code; None if it had no payload).
    /// Err if the connection ended without one or nothing came by the timeout.
    pub fn read_close(&mut self, timeout: Duration) -> Result<Option<u16>, RawRead> {
        let deadline = Instant::now() + timeout;
        loop {
            let f = self.read_frame(deadline)?;
            if f.opcode == 0x8 {
                if f.payload.len() >= 2 {
                    return Ok(Some(u16::from_be_bytes([f.payload[0], f.payload[1]])));
                }
                return Ok(None);
            }
        }
    }

    /// Asserts the server sends a close frame with `code` within `timeout`.
    pub fn expect_close_code(&mut self, code: u16, timeout: Duration) {
        match self.read_close(timeout) {
            Ok(Some(c)) => assert_eq!(c, code, "close code"),
            other => panic!("expected close frame with code {code}, got {other:?}"),
        }
    }

    /// Reads and discards everything until EOF/reset; true if that happened by `timeout`.
    pub fn wait_eof(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        self.buf.clear();
        loop {
            match self.fill(deadline) {
                Ok(()) => self.buf.clear(),
                Err(RawRead::Timeout) => return false,
                Err(_) => return true,
            }
        }
    }

    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// One frame as a client writes it (`mask` None leaves it unmasked, to test that herald
/// refuses it); length in its shortest encoding.
pub use wsframe::encode as encode_frame;

/// The frame at the start of `buf` (payload unmasked) and the bytes it took; None until all of
/// it has arrived.
pub fn decode_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    let f = wsframe::decode(buf)?;
    let raw =
        RawFrame { fin: f.header.fin, opcode: f.header.opcode, masked: f.header.mask.is_some(), payload: f.unmasked() };
    Some((raw, f.len))
}

/// Sets SO_RCVBUF on a socket (to make a non-reading client's buffers fill quickly).
pub fn set_recv_buffer(stream: &TcpStream, bytes: i32) {
    use std::os::fd::AsRawFd;
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &bytes as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt SO_RCVBUF");
}

/// A notification message as published by backends in seed 003.
pub fn notification(title: &str) -> Value {
    json!({"type": "notification", "payload": {"title": title}})
}

/// Removes `timestamp` from a delivered message after checking its format.
pub fn strip_timestamp(mut v: Value) -> Value {
    let ts = v.get("timestamp").and_then(|t| t.as_str()).map(|s| s.to_string());
    let ts = ts.unwrap_or_else(|| panic!("delivered message has no string timestamp: {v}"));
    assert!(is_rfc3339_millis_utc(&ts), "timestamp {ts:?} is not RFC 3339 UTC with milliseconds");
    v.as_object_mut().unwrap().remove("timestamp");
    v
}

/// Seconds since the epoch of a `YYYY-MM-DDTHH:MM:SS.mmmZ` timestamp.
pub fn parse_timestamp(s: &str) -> f64 {
    assert!(is_rfc3339_millis_utc(s), "timestamp {s:?} is not RFC 3339 UTC with milliseconds");
    let n = |a: usize, b: usize| s[a..b].parse::<i64>().unwrap();
    let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
    let (hh, mm, ss, ms) = (n(11, 13), n(14, 16), n(17, 19), n(20, 23));
    // days from civil (Howard Hinnant)
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = if y2 >= 0 { y2 } else { y2 - 399 } / 400;
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    (days * 86400 + hh * 3600 + mm * 60 + ss) as f64 + ms as f64 / 1000.0
}

/// Asserts `ts` is a well-formed timestamp within `slack_secs` of the current time.
pub fn assert_timestamp_is_now(ts: &str, slack_secs: f64) {
    let t = parse_timestamp(ts);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((t - now).abs() <= slack_secs, "timestamp {ts} is {:.1}s away from now", t - now);
}

// ---------------------------------------------------------------------------------------
// process introspection, non-panicking clients, fault injection (reliability, security, churn)
// ---------------------------------------------------------------------------------------

/// Number of open file descriptors of process `pid` (entries of /proc/PID/fd).
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
}

/// Resident set size of process `pid` in KiB (VmRSS of /proc/PID/status).
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/PID/status");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmRSS value")
}

/// What herald holds, as reported by /metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub active: i64,
    pub slab_entries: i64,
    pub index_entries: i64,
}

impl Held {
    /// Nothing at all. (A /metrics request may count its own connection in `slab_entries`,
    /// depending on timing: compare with this in a polling loop, not once.)
    pub const NONE: Held = Held { active: 0, slab_entries: 0, index_entries: 0 };

    pub fn of(metrics: &Value) -> Held {
        let n = |v: &Value| v.as_i64().unwrap_or_else(|| panic!("metrics field missing/not a number in {metrics}"));
        Held {
            active: n(&metrics["connections"]["active"]),
            slab_entries: n(&metrics["internals"]["slab_entries"]),
            index_entries: n(&metrics["internals"]["index_entries"]),
        }
    }
}

/// A hand-written upgrade that reports failure (refused, reset, no answer by `timeout`)
/// instead of panicking. Returns the response (any status) and the socket.
pub fn raw_try_upgrade(
    port: u16,
    path: &str,
    extra: &[(&str, &str)],
    timeout: Duration,
) -> Result<(HttpResponse, RawWs), String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    stream.set_write_timeout(Some(timeout)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream.write_all(upgrade_request(port, path, extra).as_bytes()).map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    let resp = read_http_response_buf(&mut stream, timeout, &mut buf).ok_or("no response")?;
    Ok((resp, RawWs { stream, buf }))
}

impl RawWs {
    /// Like `read_frame`, also returning the frame's first byte (FIN, RSV1-3, opcode).
    pub fn read_frame_with_head(&mut self, deadline: Instant) -> Result<(u8, RawFrame), RawRead> {
        loop {
            if let Some((f, used)) = decode_frame(&self.buf) {
                let head = self.buf[0];
                self.buf.drain(..used);
                return Ok((head, f));
            }
            self.fill(deadline)?;
        }
    }

    /// Bytes received after the upgrade response that no frame read has consumed yet.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }
}

/// Sends one HTTP/1.1 request on an existing (keep-alive) connection and reads the response.
pub fn http_on(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Option<HttpResponse> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    stream.set_write_timeout(Some(timeout)).unwrap();
    stream.write_all(&bytes).ok()?;
    read_http_response(stream, timeout)
}

/// A TCP relay on a free port forwarding to 127.0.0.1:`target`, one connection per accepted
/// one. `stall()` stops it forwarding in both directions while every socket stays open (the
/// peers see silence, no FIN); `resume()` forwards again. Dropping it closes everything.
pub struct Relay {
    pub port: u16,
    stalled: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Relay {
    pub fn start(target: u16) -> Relay {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stalled = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let sockets: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (st, sp, so) = (stalled.clone(), stop.clone(), sockets.clone());
        let acceptor = thread::spawn(move || {
            let mut pumps = Vec::new();
            while !sp.load(SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                        let _ = client.set_nodelay(true);
                        let _ = upstream.set_nodelay(true);
                        so.lock().unwrap().extend([client.try_clone().unwrap(), upstream.try_clone().unwrap()]);
                        for (from, to) in
                            [(client.try_clone().unwrap(), upstream.try_clone().unwrap()), (upstream, client)]
                        {
                            let (st, sp) = (st.clone(), sp.clone());
                            pumps.push(thread::spawn(move || Relay::pump(from, to, &st, &sp)));
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
            for p in pumps {
                let _ = p.join();
            }
        });
        Relay { port, stalled, stop, sockets, threads: vec![acceptor] }
    }

    fn pump(
        mut from: TcpStream,
        mut to: TcpStream,
        stalled: &std::sync::atomic::AtomicBool,
        stop: &std::sync::atomic::AtomicBool,
    ) {
        use std::sync::atomic::Ordering::SeqCst;
        from.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut buf = vec![0u8; 16384];
        while !stop.load(SeqCst) {
            if stalled.load(SeqCst) {
                thread::sleep(Duration::from_millis(10));
                continue;
            }
            match from.read(&mut buf) {
                Ok(0) => {
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        let _ = from.shutdown(Shutdown::Both);
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
                Err(_) => {
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
    }

    /// Stops forwarding (both directions); sockets stay open and unread.
    pub fn stall(&self) {
        self.stalled.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.stalled.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.sockets.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// How a `FakeRedis` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeRedisMode {
    /// Answers whatever it reads (and each new connection) with bytes that are not RESP.
    Garbage,
    /// Accepts and reads, never writes a byte.
    Silent,
}

/// A TCP server on a given port that pretends to be Redis and is not. `stop()` (or drop)
/// closes the listener and every accepted connection.
pub struct FakeRedis {
    pub port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

/// Not RESP: the first byte (a TLS record type) is no RESP type marker.
pub const REDIS_GARBAGE: &[u8] = b"\x16\x03\x01\x00\xff this is not redis \xfe\xff\r\n%%%\r\n";

impl FakeRedis {
    pub fn start_on(port: u16, mode: FakeRedisMode) -> FakeRedis {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "fake redis cannot bind port {port}: {e}");
                    thread::sleep(Duration::from_millis(50));
                }
            }
        };
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (sp, acc) = (stop.clone(), accepted.clone());
        let thread = thread::spawn(move || {
            let mut conns = Vec::new();
            while !sp.load(SeqCst) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        acc.fetch_add(1, SeqCst);
                        s.set_nonblocking(false).unwrap();
                        if mode == FakeRedisMode::Garbage {
                            let _ = s.write_all(REDIS_GARBAGE);
                        }
                        let sp = sp.clone();
                        conns.push(thread::spawn(move || {
                            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                            let mut buf = [0u8; 4096];
                            while !sp.load(SeqCst) {
                                match s.read(&mut buf) {
                                    Ok(0) => return,
                                    Ok(_) => {
                                        if mode == FakeRedisMode::Garbage && s.write_all(REDIS_GARBAGE).is_err() {
                                            return;
                                        }
                                    }
                                    Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
                                    Err(_) => return,
                                }
                            }
                            let _ = s.shutdown(Shutdown::Both);
                        }));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
            drop(listener);
            for c in conns {
                let _ = c.join();
            }
        });
        FakeRedis { port, stop, accepted, thread: Some(thread) }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Closes the listener and every connection; returns once the port is free.
    pub fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FakeRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Bytes in the kernel send queue of the IPv4 TCP sockets `local_port` → each of
/// `remote_ports` (from one read of /proc/net/tcp); None where there is no such socket.
pub fn tcp_send_queues(local_port: u16, remote_ports: &[u16]) -> Vec<Option<u64>> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port_of = |addr: &str| addr.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
    let mut out = vec![None; remote_ports.len()];
    let local = format!(":{local_port:04X} ");
    for line in table.lines().skip(1).filter(|l| l.contains(&local)) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 || port_of(f[1]) != Some(local_port) {
            continue;
        }
        if let Some(i) = remote_ports.iter().position(|p| port_of(f[2]) == Some(*p)) {
            out[i] = f[4].split(':').next().and_then(|tx| u64::from_str_radix(tx, 16).ok());
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// history and presence, as several suites ask for them
// ---------------------------------------------------------------------------------------

/// A WebSocket on `/ws` resuming `user`'s stream after `since`.
pub fn connect_since(h: &Herald, user: &str, since: &str) -> Ws {
    match ws_try_connect(h.port, &format!("/ws?token={}&since={since}", token(user)), &[]) {
        Upgrade::Ok(ws) => *ws,
        Upgrade::Rejected { status, body } => panic!("upgrade with since={since} refused: {status} {body}"),
    }
}

/// Reads notifications until `resumed`; returns their `n`s and the `resumed` message.
pub fn replayed(ws: &mut Ws) -> (Vec<u64>, Value) {
    let mut ns = Vec::new();
    loop {
        let m = recv_json(ws, Duration::from_secs(5));
        if m["type"] == "resumed" {
            return (ns, m);
        }
        assert!(m["stream_id"].is_string(), "a replayed notification has a stream_id: {m}");
        ns.push(m["n"].as_u64().unwrap_or_else(|| panic!("{m}")));
    }
}

/// `GET /api/presence/{user}` with the API key.
pub fn presence_of(h: &Herald, user: &str) -> Value {
    let r = h.http("GET", &format!("/api/presence/{user}"), &[("Authorization", &format!("Bearer {API_KEY}"))], b"");
    assert_eq!(r.status, 200, "GET /api/presence/{user}: {}\n{}", r.text(), h.stderr());
    r.json()
}

/// Waits until the fleet counts `connections` of `user` (and says online exactly when > 0).
pub fn wait_presence(h: &Herald, user: &str, connections: u64, within: Duration) {
    let mut last = Value::Null;
    let ok = wait_until(within, || {
        last = presence_of(h, user);
        last["connections"] == json!(connections)
    });
    assert!(ok, "presence of {user} after {within:?}: {last}, expected {connections}\n{}", h.stderr());
    assert_eq!(last["online"], json!(connections > 0), "{last}");
}

/// A redis-server that requires a password (`--requirepass`), killed on drop.
pub struct PasswordRedis {
    child: Child,
    pub port: u16,
}

impl PasswordRedis {
    pub fn start(password: &str) -> PasswordRedis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--requirepass", password, "--loglevel", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (is it installed?)");
        let redis = PasswordRedis { child, port };
        let up = wait_until(Duration::from_secs(5), || TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(up, "redis-server with a password did not start on port {port}");
        redis
    }
}

impl Drop for PasswordRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
