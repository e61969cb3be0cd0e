//! Key rotation against the real binary: HERALD_JWT_SECRET_PREVIOUS, HERALD_JWKS served by a
//! local HTTP server that rotates its keys (or fails), JWKS and PEM files reloaded on SIGHUP.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// a JWKS endpoint
// ---------------------------------------------------------------------------------------

/// What the JWKS server answers.
#[derive(Clone)]
enum Reply {
    /// 200 with this body.
    Body(String),
    /// This status, empty body.
    Status(u16),
    /// Reads the request and never answers (until stopped, or 30 s).
    Hang,
}

/// A one-thread HTTP server answering every GET with the current [`Reply`], counting requests.
struct JwksServer {
    port: u16,
    reply: Arc<Mutex<Reply>>,
    requests: Arc<AtomicUsize>,
    /// Requests read and not answered yet.
    in_flight: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl JwksServer {
    fn start(reply: Reply) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind JWKS server");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let reply = Arc::new(Mutex::new(reply));
        let requests = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, n, f, s) = (reply.clone(), requests.clone(), in_flight.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => serve(stream, &r, &n, &f, &s),
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        JwksServer { port, reply, requests, in_flight, stop, thread: Some(thread) }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/.well-known/jwks.json", self.port)
    }

    fn set(&self, reply: Reply) {
        *self.reply.lock().unwrap() = reply;
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn wait_requests(&self, n: usize) {
        let ok = wait_until(T, || self.requests() >= n);
        assert!(ok, "the JWKS server saw {} requests, expected {n}", self.requests());
        assert_eq!(self.requests(), n, "more requests than expected");
    }

    /// Closes the listener: from now on connections are refused.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(
    mut stream: TcpStream,
    reply: &Mutex<Reply>,
    requests: &AtomicUsize,
    in_flight: &AtomicUsize,
    stop: &AtomicBool,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut request = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        if Instant::now() >= deadline || request.len() > 64 * 1024 {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    requests.fetch_add(1, Ordering::SeqCst);
    let reply = reply.lock().unwrap().clone();
    let (status, body) = match reply {
        Reply::Body(body) => (200, body),
        Reply::Status(status) => (status, String::new()),
        Reply::Hang => {
            in_flight.fetch_add(1, Ordering::SeqCst);
            let until = Instant::now() + Duration::from_secs(30);
            // Hold the connection open, answering nothing, until herald gives up or we stop.
            while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    _ => thread::sleep(Duration::from_millis(10)),
                }
            }
            in_flight.fetch_sub(1, Ordering::SeqCst);
            return;
        }
    };
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
}

// ---------------------------------------------------------------------------------------
// keys and tokens
// ---------------------------------------------------------------------------------------

/// The public JWK of a fixture key under `kid`.
fn jwk(private_pem: &str, kid: &str) -> Value {
    let (key, alg) = fixture_signing_key(private_pem);
    let mut jwk = serde_json::to_value(jsonwebtoken::jwk::Jwk::from_encoding_key(&key, alg).expect("JWK")).unwrap();
    jwk["kid"] = json!(kid);
    jwk["use"] = json!("sig");
    jwk
}

fn jwks(keys: &[(&str, &str)]) -> String {
    json!({ "keys": keys.iter().map(|(pem, kid)| jwk(pem, kid)).collect::<Vec<_>>() }).to_string()
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now_secs() + 3600})
}

/// A herald with HERALD_JWKS = `source`. herald honours the HTTP(S)_PROXY variables for the
/// fetch; the key server here is local, so no proxy set around the tests may take it.
fn herald_with_jwks(source: &str) -> HeraldBuilder {
    herald().no_secret().env("HERALD_JWKS", source).env("NO_PROXY", "*")
}

/// Whether an upgrade with `token` is accepted (101) or refused with 401.
fn accepted(h: &Herald, token: &str) -> bool {
    match ws_try_connect(h.port, &format!("/ws?token={token}"), &[]) {
        Upgrade::Ok(_) => true,
        Upgrade::Rejected { status: 401, .. } => false,
        Upgrade::Rejected { status, body } => panic!("unexpected refusal {status}: {body}"),
    }
}

fn jwks_metrics(h: &Herald) -> (u64, u64) {
    let m = h.metrics();
    (m["jwks"]["refreshes"].as_u64().unwrap(), m["jwks"]["refresh_failures"].as_u64().unwrap())
}

fn wait_jwks_metrics(h: &Herald, expected: (u64, u64)) {
    let mut last = (0, 0);
    let ok = wait_until(T, || {
        last = jwks_metrics(h);
        last == expected
    });
    assert!(ok, "jwks (refreshes, failures) did not become {expected:?}: {last:?}\n{}", h.stderr());
}

fn wait_log(h: &Herald, needle: &str, count: usize) {
    let ok = wait_until(T, || h.stderr().matches(needle).count() >= count);
    assert!(ok, "{count}x {needle:?} not logged:\n{}", h.stderr());
}

fn assert_no_token_logged(h: &Herald, tokens: &[&str]) {
    let logs = format!("{}{}", h.stderr(), h.stdout());
    for token in tokens {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!logs.contains(signature), "a token reached the logs:\n{logs}");
    }
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("herald-keys-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        // Written beside and renamed, as an operator's deploy tool would: never half a file.
        let partial = self.0.join(format!(".{name}.partial"));
        std::fs::write(&partial, text).unwrap();
        std::fs::rename(&partial, &path).unwrap();
        path.to_string_lossy().into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// tests
// ---------------------------------------------------------------------------------------

#[test]
fn rotated_jwks_keys_are_fetched_on_an_unknown_kid_at_most_once_a_minute() {
    let server = JwksServer::start(Reply::Body(jwks(&[("rsa_private.pem", "k1")])));
    let h = herald_with_jwks(&server.url()).env("HERALD_JWT_SECRET", SECRET).start();
    server.wait_requests(1);
    let old = token_rs256_kid(&claims("alice"), "rsa_private.pem", "k1");
    let new = token_rs256_kid(&claims("bob"), "rsa_other_private.pem", "k2");
    let ec = token_es256_kid(&claims("carol"), "ec_private.pem", "k3");
    assert!(accepted(&h, &old));
    // A public key decides: the secret left beside the JWKS is ignored, and said so.
    assert!(!accepted(&h, &token("dave")), "an HS256 token was accepted beside a JWKS");
    assert!(h.stderr().contains("HERALD_JWT_SECRET (and HERALD_JWT_SECRET_PREVIOUS) are ignored"), "{}", h.stderr());

    // The issuer rotates: k1 retires, k2 and k3 arrive. A token with k2 is refused at once
    // (nothing waits for the key server) and makes herald fetch the set again.
    server.set(Reply::Body(jwks(&[("rsa_other_private.pem", "k2"), ("ec_private.pem", "k3")])));
    assert!(!accepted(&h, &new));
    server.wait_requests(2);
    assert!(wait_until(T, || accepted(&h, &new)), "k2 not accepted after the refresh");
    assert!(accepted(&h, &ec));
    assert!(!accepted(&h, &old), "a retired kid is refused");
    wait_jwks_metrics(&h, (1, 0));

    // A kid's key only, with that key's one algorithm.
    let wrong_key = token_rs256_kid(&claims("eve"), "rsa_private.pem", "k2");
    let wrong_alg = token_es256_kid(&claims("eve"), "ec_private.pem", "k2");
    let hs256_with_kid = {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some("k2".into());
        let jwk_bytes = jwk("rsa_other_private.pem", "k2").to_string();
        let key = jsonwebtoken::EncodingKey::from_secret(jwk_bytes.as_bytes());
        jsonwebtoken::encode(&header, &claims("eve"), &key).unwrap()
    };
    for forged in [&wrong_key, &wrong_alg, &hs256_with_kid] {
        assert!(!accepted(&h, forged));
    }

    // More unknown kids within the minute: refused, and no more fetches.
    for kid in ["k4", "k5", "k1"] {
        assert!(!accepted(&h, &token_rs256_kid(&claims("mallory"), "rsa_private.pem", kid)));
    }
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(server.requests(), 2, "unknown kids fetched the set more than once a minute");
    assert_no_token_logged(&h, &[&old, &new, &ec, &wrong_key]);
}

#[test]
fn a_jwks_endpoint_that_is_down_keeps_the_keys_and_is_counted() {
    let mut server = JwksServer::start(Reply::Body(jwks(&[("rsa_private.pem", "k1")])));
    let h = herald_with_jwks(&server.url()).start();
    server.wait_requests(1);
    let old = token_rs256_kid(&claims("alice"), "rsa_private.pem", "k1");
    assert!(accepted(&h, &old));

    server.set(Reply::Status(503));
    h.signal(libc::SIGHUP);
    server.wait_requests(2);
    wait_jwks_metrics(&h, (0, 1));
    assert!(accepted(&h, &old), "an error status replaced the keys");

    server.stop();
    assert!(!accepted(&h, &token_rs256_kid(&claims("bob"), "rsa_other_private.pem", "k2")));
    wait_jwks_metrics(&h, (0, 2));
    assert!(accepted(&h, &old), "a refused connection replaced the keys");
    wait_log(&h, "JWKS refresh failed", 2);

    let text = h.http("GET", "/metrics", &[("Accept", "text/plain")], b"").text();
    assert!(text.contains("herald_jwks_refresh_failures_total 2\n"), "{text}");
    assert!(text.contains("herald_jwks_refreshes_total 0\n"), "{text}");
    assert_no_token_logged(&h, &[&old]);
}

#[test]
fn a_hanging_jwks_endpoint_never_holds_up_a_handshake() {
    let server = JwksServer::start(Reply::Body(jwks(&[("rsa_private.pem", "k1")])));
    let h = herald_with_jwks(&server.url()).start();
    server.wait_requests(1);
    server.set(Reply::Hang);
    let old = token_rs256_kid(&claims("alice"), "rsa_private.pem", "k1");
    assert!(!accepted(&h, &token_rs256_kid(&claims("bob"), "rsa_other_private.pem", "k2")));
    assert!(wait_until(T, || server.in_flight.load(Ordering::SeqCst) == 1), "no refresh started");
    // The refresh is waiting on the key server; upgrades go on with the keys in force.
    for _ in 0..3 {
        assert!(accepted(&h, &old));
    }
    assert_eq!(server.in_flight.load(Ordering::SeqCst), 1, "the refresh ended before the handshakes were checked");
    // herald's own timeout ends the fetch (10 s), counted as a failure; the keys stay.
    wait_jwks_metrics(&h, (0, 1));
    assert!(accepted(&h, &old));
}

#[test]
fn a_malformed_jwks_at_a_refresh_keeps_the_old_keys() {
    let server = JwksServer::start(Reply::Body(jwks(&[("rsa_private.pem", "k1")])));
    let h = herald_with_jwks(&server.url()).start();
    server.wait_requests(1);
    let old = token_rs256_kid(&claims("alice"), "rsa_private.pem", "k1");
    let mut expected = (0, 0);
    for broken in [
        "not json at all",
        r#"{"keys": 5}"#,
        r#"{"keys": []}"#,
        r#"{"keys": [{"kty": "RSA", "kid": "k9", "n": "!!", "e": "AQAB"}]}"#,
    ] {
        server.set(Reply::Body(broken.into()));
        h.signal(libc::SIGHUP);
        expected.1 += 1;
        wait_jwks_metrics(&h, expected);
        assert!(accepted(&h, &old), "{broken} replaced the keys");
    }
    server.set(Reply::Body(jwks(&[("rsa_other_private.pem", "k2")])));
    h.signal(libc::SIGHUP);
    wait_jwks_metrics(&h, (1, 4));
    assert!(accepted(&h, &token_rs256_kid(&claims("bob"), "rsa_other_private.pem", "k2")));
    assert!(!accepted(&h, &old));
    assert!(h.stderr().contains("JWKS refresh failed"), "{}", h.stderr());
}

#[test]
fn a_jwks_that_cannot_be_loaded_at_start_exits_2_with_one_line() {
    let dir = Scratch::new("start");
    let garbage = dir.write("garbage.json", "{ not json");
    let mut encryption_key = jwk("rsa_private.pem", "k1");
    encryption_key["use"] = json!("enc");
    let no_usable = dir.write("enc.json", &json!({ "keys": [encryption_key] }).to_string());
    let missing = dir.0.join("missing.json").to_string_lossy().into_owned();
    let wrong_shape = JwksServer::start(Reply::Body(r#"{"keys": "x"}"#.into()));
    let not_found = JwksServer::start(Reply::Status(404));
    let closed = format!("http://127.0.0.1:{}/jwks.json", free_port());
    for (source, expected) in [
        (garbage.as_str(), "not a JSON Web Key Set"),
        (no_usable.as_str(), "no usable key"),
        (missing.as_str(), "cannot be read"),
        (&wrong_shape.url(), "not a JSON Web Key Set"),
        (&not_found.url(), "404"),
        (&closed, "cannot be fetched"),
        ("ftp://127.0.0.1/jwks.json", "http://"),
    ] {
        let env = [("HERALD_LISTEN", "127.0.0.1:0"), ("HERALD_JWKS", source), ("NO_PROXY", "*")];
        let out = run_herald(&[], &env, T);
        assert_eq!(out.code, Some(2), "{source}: {}", out.stderr);
        let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{source}: one error line expected:\n{}", out.stderr);
        assert!(lines[0].starts_with("herald: error: HERALD_JWKS"), "{source}: {}", lines[0]);
        assert!(lines[0].contains(expected), "{source}: {expected:?} not in {}", lines[0]);
    }
}

#[test]
fn sighup_reloads_the_jwks_file_and_the_public_key_file() {
    let dir = Scratch::new("sighup");
    let set = dir.write("jwks.json", &jwks(&[("rsa_private.pem", "k1")]));
    let ec_pem = std::fs::read_to_string(fixture("ec_public.pem")).unwrap();
    let rsa_pem = std::fs::read_to_string(fixture("rsa_public.pem")).unwrap();
    let pem = dir.write("key.pem", &ec_pem);
    let h = herald_with_jwks(&set).env("HERALD_JWT_PUBLIC_KEY", &pem).start();
    let k1 = token_rs256_kid(&claims("alice"), "rsa_private.pem", "k1");
    let k2 = token_rs256_kid(&claims("bob"), "rsa_other_private.pem", "k2");
    let es256 = token_es256(&claims("carol"), "ec_private.pem");
    let rs256 = token_rs256(&claims("dave"), "rsa_private.pem");
    assert!(accepted(&h, &k1));
    assert!(accepted(&h, &es256), "a token without kid goes to the PEM key");
    assert!(!accepted(&h, &rs256));
    // k2 is unknown: that spends the once-a-minute refresh on the old file, so what follows
    // is SIGHUP's doing.
    assert!(!accepted(&h, &k2));
    wait_jwks_metrics(&h, (1, 0));

    dir.write("jwks.json", &jwks(&[("rsa_other_private.pem", "k2")]));
    dir.write("key.pem", &rsa_pem);
    h.signal(libc::SIGHUP);
    wait_jwks_metrics(&h, (2, 0));
    wait_log(&h, "HERALD_JWT_PUBLIC_KEY reloaded", 1);
    assert!(accepted(&h, &k2));
    assert!(accepted(&h, &rs256));
    assert!(!accepted(&h, &es256));
    // k1 left the set, but its key is now the PEM key, which takes tokens whose kid names no
    // JWKS key.
    assert!(accepted(&h, &k1));
    let k1_other_key = token_rs256_kid(&claims("eve"), "rsa_other_private.pem", "k1");
    assert!(!accepted(&h, &k1_other_key));

    // A broken key file on SIGHUP: the key in force stays.
    dir.write("key.pem", "-----BEGIN PUBLIC KEY-----\nnonsense\n-----END PUBLIC KEY-----\n");
    h.signal(libc::SIGHUP);
    wait_log(&h, "HERALD_JWT_PUBLIC_KEY not reloaded", 1);
    wait_jwks_metrics(&h, (3, 0));
    assert!(accepted(&h, &rs256));
    assert!(accepted(&h, &k2));
}

#[test]
fn sighup_with_nothing_to_reload_is_harmless() {
    let mut h = herald().start();
    let mut ws = h.ws(&token("alice"));
    for n in 1..=3 {
        h.signal(libc::SIGHUP);
        // Signals of one kind that arrive together are delivered as one: wait for each.
        wait_log(&h, "nothing to reload", n);
    }
    assert!(h.is_running());
    assert_eq!(h.health().status, 200);
    assert!(accepted(&h, &token("bob")));
    assert_alive(&mut ws);
    // SIGTERM still shuts down as before.
    h.sigterm();
    assert_eq!(h.wait_exit(T).and_then(|s| s.code()), Some(0), "{}", h.stderr());
}

#[test]
fn the_previous_secret_is_accepted_and_a_third_is_refused() {
    let dir = Scratch::new("previous");
    let current = "current-secret-current-secret-0123456";
    let previous = "previous-secret-previous-secret-01234";
    let file = dir.write("previous", &format!("{previous}\n"));
    let h = herald()
        .env("HERALD_JWT_SECRET", current)
        .env("HERALD_JWT_SECRET_PREVIOUS_FILE", &file)
        .env("HERALD_LOG", "debug")
        .start();
    let sign = |secret: &str, claims: Value| token_hs256(&claims, secret);
    assert!(accepted(&h, &sign(current, claims("alice"))));
    assert!(accepted(&h, &sign(previous, claims("bob"))));
    assert!(!accepted(&h, &sign("third-secret-third-secret-third-0123", claims("eve"))));
    assert!(!accepted(&h, &sign(previous, json!({"sub": "bob", "exp": now_secs() - 5}))));

    // The publish API takes the same keys.
    let publisher = |secret: &str| sign(secret, json!({"sub": "svc", "exp": now_secs() + 60, "scope": "publish"}));
    let body = json!({"user_id": "alice", "message": {"type": "notification", "payload": {"n": 1}}});
    assert_eq!(h.publish(Some(&publisher(previous)), &body).status, 200);
    assert_eq!(h.publish(Some(&publisher(current)), &body).status, 200);
    assert_eq!(h.publish(Some(&publisher("third-secret-third-secret-third-0123")), &body).status, 401);

    let logs = h.stderr();
    for secret in [current, previous] {
        assert!(!logs.contains(secret), "a secret reached the logs:\n{logs}");
    }
}
