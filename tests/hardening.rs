//! Hardening against hostile numbers, identifiers and configuration (issue 8): tokens whose
//! claims overflow time arithmetic, id and scope spoofing, aud/iss, secrets handling, failed
//! API authentication, channel prefixes, and what /health and the logs reveal.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tungstenite::Message;

const T: Duration = Duration::from_secs(5);

/// herald still serves: /health answers and a fresh connection works.
fn assert_serving(h: &mut Herald, what: &str) {
    assert!(h.is_running(), "{what}: herald exited\nstderr:\n{}", h.stderr());
    let health = try_http(h.port, "GET", "/health", &[], b"", T);
    assert!(health.is_some(), "{what}: /health no longer answers\nstderr:\n{}", h.stderr());
    let mut ws = h.ws(&token("bystander"));
    assert_alive(&mut ws);
}

fn connect_path(port: u16, path: &str, tok: &str) -> Ws {
    match ws_try_connect(port, &format!("{path}?token={tok}"), &[]) {
        Upgrade::Ok(ws) => *ws,
        Upgrade::Rejected { status, body } => panic!("{path}: upgrade refused {status} {body}"),
    }
}

fn upgrade_status(port: u16, tok: &str) -> u16 {
    match ws_try_connect(port, &format!("/ws?token={tok}"), &[]) {
        Upgrade::Ok(_) => 101,
        Upgrade::Rejected { status, .. } => status,
    }
}

fn claims_token(extra: Value) -> String {
    let now = now_secs();
    let mut claims = json!({"iat": now, "exp": now + 3600});
    for (k, v) in extra.as_object().expect("claims object") {
        claims[k] = v.clone();
    }
    token_claims(claims)
}

/// A file in a per-test scratch directory, removed with it.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("herald-hardening-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn file(&self, name: &str, contents: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path.to_string_lossy().into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits for /health to show Redis disconnected with an error, and returns /health.
fn wait_redis_error(h: &Herald) -> Value {
    let mut last = Value::Null;
    let seen = wait_until(Duration::from_secs(10), || {
        last = h.health_json();
        last["redis"]["status"] == "disconnected" && last["redis"]["error"] != "not connected yet"
    });
    assert!(seen, "no Redis error on /health: {last}\nstderr:\n{}", h.stderr());
    last
}

// =======================================================================================
// A. token claims and durations that overflow time arithmetic
// =======================================================================================

#[test]
fn a_token_expiring_beyond_2_pow_63_neither_crashes_nor_closes_early() {
    let mut h = herald().env("HERALD_THREADS", "1").start();
    for exp in [1u64 << 63, u64::MAX, i64::MAX as u64, (i64::MAX as u64) / 1000 + 7] {
        let tok = token_claims(json!({"sub": "far-future", "exp": exp}));
        match ws_try_connect(h.port, &format!("/ws?token={tok}"), &[]) {
            Upgrade::Ok(mut ws) => {
                // Far in the future means open now, and still open a moment later.
                assert_alive(&mut ws);
                assert_no_message(&mut ws, Duration::from_millis(300));
                assert_alive(&mut ws);
            }
            Upgrade::Rejected { status, body } => assert_eq!(status, 401, "exp {exp}: {body}"),
        }
        assert_serving(&mut h, &format!("after a token with exp {exp}"));
    }
    // The same tokens on the publish API: no arithmetic there, but it must hold too.
    let publisher = token_claims(json!({"sub": "svc", "scope": "publish", "exp": u64::MAX}));
    let r = h.publish(Some(&publisher), &json!({"user_id": "far-future", "message": notification("x")}));
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn herald_token_refuses_a_lifetime_beyond_100_years() {
    let env = [("HERALD_JWT_SECRET", SECRET)];
    for ttl in ["300000000000y", "101y"] {
        let out = run_herald(&["token", "--sub", "u", "--ttl", ttl], &env, T);
        assert_eq!(out.code, Some(2), "--ttl {ttl}: stdout {:?} stderr {:?}", out.stdout, out.stderr);
        assert!(out.stdout.is_empty(), "a token was printed for --ttl {ttl}: {}", out.stdout);
        assert_eq!(out.stderr.trim().lines().count(), 1, "one error line: {}", out.stderr);
        assert!(out.stderr.contains("--ttl") && out.stderr.contains("100 years"), "{}", out.stderr);
        assert!(!out.stderr.contains("HERALD_TTL"), "no such variable: {}", out.stderr);
    }
    // 100 years is fine, and the token it mints works.
    let out = run_herald(&["token", "--sub", "centenarian", "--ttl", "100y"], &env, T);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let tok = out.stdout.trim().to_string();
    let exp = jwt_claims(&tok)["exp"].as_u64().expect("integer exp");
    assert!(exp > now_secs() + 99 * 365 * 86_400 && exp < now_secs() + 101 * 365 * 86_400, "exp {exp}");
    let h = herald().start();
    let mut ws = h.ws(&tok);
    assert_alive(&mut ws);
}

#[test]
fn durations_beyond_a_day_are_configuration_errors() {
    for variable in [
        "HERALD_SHUTDOWN_GRACE",
        "HERALD_PING_INTERVAL",
        "HERALD_IDLE_TIMEOUT",
        "HERALD_HEARTBEAT_INTERVAL",
        "HERALD_HANDSHAKE_TIMEOUT",
    ] {
        let env = [("HERALD_JWT_SECRET", SECRET), ("HERALD_LISTEN", "127.0.0.1:0"), (variable, "300000000000y")];
        let out = run_herald(&[], &env, T);
        assert_eq!(out.code, Some(2), "{variable}: stderr {}", out.stderr);
        assert_eq!(out.stderr.trim().lines().count(), 1, "{variable}: {}", out.stderr);
        assert!(out.stderr.contains(variable), "{variable} not named: {}", out.stderr);
    }
}

// =======================================================================================
// B. ids, scope, aud/iss
// =======================================================================================

#[test]
fn relayed_sender_ids_keep_their_own_form() {
    let h = herald().start();
    let path = "/ws/focus-session/9";
    let member =
        |sub: &str| connect_path(h.port, path, &claims_token(json!({"sub": sub, "topics": ["focus-session:9"]})));
    let mut listener = member("listener");
    // (sub, sender_id as the others see it)
    let cases = [
        ("0042", json!("0042")),
        ("+42", json!("+42")),
        ("42", json!(42)),
        ("0", json!(0)),
        ("-7", json!(-7)),
        ("-0", json!("-0")),
        ("9223372036854775808", json!("9223372036854775808")),
    ];
    for (sub, want) in cases {
        let mut ws = member(sub);
        ws.send(Message::text(json!({"cursor": 1}).to_string())).expect("send");
        let got = recv_json(&mut listener, T);
        assert_eq!(got["type"], "focus_session_update", "{got}");
        assert_eq!(got["sender_id"], want, "sender {sub:?}: {got}");
    }
}

#[test]
fn seed004_actor_ids_keep_their_own_form() {
    let h = herald().start();
    let mut recipient = connect_path(h.port, "/ws/notifications", &token("r1"));
    for (sub, want) in [("0042", json!("0042")), ("+42", json!("+42")), ("42", json!(42))] {
        let publisher = claims_token(json!({"sub": sub, "scope": "publish"}));
        let body = json!({"task_id": "007", "title": "t", "action": "updated", "target_user_ids": ["r1"]});
        let r = h.http(
            "POST",
            "/api/v1/realtime/events/task",
            &[("Authorization", &format!("Bearer {publisher}")), ("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let m = recv_json(&mut recipient, T);
        assert_eq!(m["data"]["actor_id"], want, "actor {sub:?}: {m}");
        assert_eq!(m["data"]["task_id"], "007", "{m}");
    }
}

#[test]
fn publishing_needs_the_exact_scope_word_publish() {
    // Already held before issue 8: the scope is split on whitespace and compared word by word.
    let mut h = herald().start();
    let body = json!({"user_id": "victim", "message": notification("scoped")});
    let granted = ["publish", "read  publish", "publish read", " publish "];
    for scope in granted {
        let r = h.publish(Some(&claims_token(json!({"sub": "svc", "scope": scope}))), &body);
        assert_eq!(r.status, 200, "scope {scope:?}: {}", r.text());
    }
    let plain = ["nopublish", "publish:read", "publisher", "PUBLISH", "read,publish", "", "pub lish"];
    for scope in plain {
        let r = h.publish(Some(&claims_token(json!({"sub": "svc", "scope": scope}))), &body);
        assert_eq!(r.status, 403, "scope {scope:?} must not grant publishing: {}", r.text());
    }
    // Not a string: the token is malformed for herald and refused outright, never granted.
    for scope in [json!(["publish"]), json!(1), json!({"publish": true}), json!(true)] {
        let tok = claims_token(json!({"sub": "svc", "scope": scope}));
        let r = h.publish(Some(&tok), &body);
        assert_eq!(r.status, 401, "scope {scope}: {}", r.text());
        assert_eq!(upgrade_status(h.port, &tok), 401, "scope {scope}");
    }
    assert_serving(&mut h, "after odd scopes");
}

#[test]
fn audience_and_issuer_are_required_when_configured() {
    let h = herald().env("HERALD_JWT_AUDIENCE", "herald-test").arg("--jwt-issuer").arg("https://auth.example").start();
    let good = json!({"aud": "herald-test", "iss": "https://auth.example"});
    let cases = [
        (json!({}), 401),
        (json!({"aud": "herald-test"}), 401),
        (json!({"iss": "https://auth.example"}), 401),
        (json!({"aud": "other", "iss": "https://auth.example"}), 401),
        (json!({"aud": "herald-test", "iss": "https://evil.example"}), 401),
        (json!({"aud": 7, "iss": "https://auth.example"}), 401),
        (good.clone(), 101),
        (json!({"aud": ["other", "herald-test"], "iss": "https://auth.example"}), 101),
    ];
    let body = json!({"user_id": "someone", "message": notification("aud")});
    for (claims, want) in cases {
        let mut upgrade = json!({"sub": "u"});
        let mut publisher = json!({"sub": "svc", "scope": "publish"});
        for (k, v) in claims.as_object().unwrap() {
            upgrade[k] = v.clone();
            publisher[k] = v.clone();
        }
        assert_eq!(upgrade_status(h.port, &claims_token(upgrade)), want, "upgrade with {claims}");
        let r = h.publish(Some(&claims_token(publisher)), &body);
        let want_api = if want == 101 { 200 } else { 401 };
        assert_eq!(r.status, want_api, "publish with {claims}: {}", r.text());
    }
    // `herald token` mints what this configuration requires.
    let env = [
        ("HERALD_JWT_SECRET", SECRET),
        ("HERALD_JWT_AUDIENCE", "herald-test"),
        ("HERALD_JWT_ISSUER", "https://auth.example"),
    ];
    let out = run_herald(&["token", "--sub", "minted"], &env, T);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let tok = out.stdout.trim();
    assert_eq!(jwt_claims(tok)["aud"], "herald-test");
    assert_eq!(upgrade_status(h.port, tok), 101);
}

// =======================================================================================
// B. secrets: weak, on the command line, in files, in the Debug output
// =======================================================================================

#[test]
fn a_short_jwt_secret_draws_a_warning_that_does_not_show_it() {
    let h = herald().env("HERALD_JWT_SECRET", "tiny-s3cr3t").start();
    let warned = wait_until(T, || h.stderr().contains("HERALD_JWT_SECRET is 11 bytes"));
    assert!(warned, "no weak-secret warning:\n{}", h.stderr());
    assert!(h.stderr().contains("WARN"), "{}", h.stderr());
    assert!(!h.stderr().contains("tiny-s3cr3t"), "the secret reached stderr:\n{}", h.stderr());
    // A secret of 32 bytes or more draws none.
    let strong = herald().start();
    thread::sleep(Duration::from_millis(200));
    assert!(!strong.stderr().contains("bytes long"), "{}", strong.stderr());
}

#[test]
fn secrets_given_as_flags_draw_a_warning() {
    let redis = Redis::start();
    let url = format!("redis://:flag-pw-31@127.0.0.1:{}", redis.port);
    let h = herald()
        .remove_env("HERALD_JWT_SECRET")
        .arg("--jwt-secret")
        .arg(SECRET)
        .arg("--api-key")
        .arg(API_KEY)
        .arg("--redis-url")
        .arg(&url)
        .no_wait()
        .start();
    let all = || ["--jwt-secret", "--api-key", "--redis-url"].iter().all(|f| h.stderr().contains(f));
    assert!(wait_until(T, all), "missing flag warnings:\n{}", h.stderr());
    assert!(h.stderr().contains("ps"), "{}", h.stderr());
    for secret in [SECRET, API_KEY, "flag-pw-31"] {
        assert!(!h.stderr().contains(secret), "{secret} reached stderr:\n{}", h.stderr());
    }
    // The same settings through the environment draw no warning.
    let quiet = herald().api_key().redis(&redis).start();
    thread::sleep(Duration::from_millis(200));
    assert!(!quiet.stderr().contains("command line"), "{}", quiet.stderr());
}

#[test]
fn secrets_can_come_from_files() {
    let dir = Scratch::new("files");
    let redis = PasswordRedis::start("file-pw @:/%");
    let h = herald()
        .remove_env("HERALD_JWT_SECRET")
        .env("HERALD_JWT_SECRET_FILE", &dir.file("jwt", &format!("{SECRET}\n")))
        .env("HERALD_API_KEY_FILE", &dir.file("api", &format!("{API_KEY}\r\n")))
        .env("HERALD_REDIS_URL", &format!("redis://127.0.0.1:{}", redis.port))
        .env("HERALD_REDIS_PASSWORD_FILE", &dir.file("redis", "file-pw @:/%\n"))
        .start();
    let connected = wait_until(Duration::from_secs(10), || h.health_json()["redis"]["status"] == "connected");
    assert!(connected, "redis with the file's password: {}\n{}", h.health_json(), h.stderr());
    let mut ws = h.ws(&token("filed"));
    assert_alive(&mut ws);
    let r = h.publish(Some(API_KEY), &json!({"user_id": "filed", "message": notification("from file")}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "from file");
    assert!(!h.stderr().contains("file-pw"), "{}", h.stderr());
}

#[test]
fn unusable_secret_files_stop_herald_naming_the_variable() {
    let dir = Scratch::new("bad-files");
    let empty = dir.file("empty", "\n");
    let missing = dir.0.join("missing").to_string_lossy().into_owned();
    let directory = dir.0.to_string_lossy().into_owned();
    let redis_url = ("HERALD_REDIS_URL", "redis://127.0.0.1:1");
    for (variable, path) in [
        ("HERALD_JWT_SECRET_FILE", &missing),
        ("HERALD_API_KEY_FILE", &directory),
        ("HERALD_REDIS_PASSWORD_FILE", &missing),
        ("HERALD_JWT_SECRET_FILE", &empty),
    ] {
        let env = [("HERALD_LISTEN", "127.0.0.1:0"), redis_url, (variable, path.as_str())];
        let out = run_herald(&[], &env, T);
        assert_eq!(out.code, Some(2), "{variable}={path}: {}", out.stderr);
        assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
        assert!(out.stderr.contains(variable), "{variable} not named: {}", out.stderr);
    }
    // A password in the URL and in a file: two sources for one secret.
    let pw = dir.file("pw", "x\n");
    let env = [
        ("HERALD_LISTEN", "127.0.0.1:0"),
        ("HERALD_REDIS_URL", "redis://:inline-pw@127.0.0.1:1"),
        ("HERALD_REDIS_PASSWORD_FILE", pw.as_str()),
    ];
    let out = run_herald(&[], &env, T);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("HERALD_REDIS_PASSWORD_FILE"), "{}", out.stderr);
    assert!(!out.stderr.contains("inline-pw"), "{}", out.stderr);
}

#[test]
fn the_configuration_logged_at_debug_level_hides_every_secret() {
    let dir = Scratch::new("debug");
    let h = herald()
        .api_key()
        .env("HERALD_REDIS_URL", "redis://operator:debug-pw-77@127.0.0.1:1/0")
        .env("HERALD_LOG", "herald=debug")
        .no_wait()
        .start();
    let logged = wait_until(T, || h.stderr().contains("configuration"));
    assert!(logged, "no configuration debug line:\n{}", h.stderr());
    let line = h.stderr().lines().find(|l| l.contains("configuration")).unwrap_or_default().to_string();
    assert!(line.contains("redis://operator:<redacted>@127.0.0.1:1/0"), "{line}");
    for secret in [SECRET, API_KEY, "debug-pw-77"] {
        assert!(!h.stderr().contains(secret), "{secret} reached stderr:\n{}", h.stderr());
    }
    drop(dir);
}

// =======================================================================================
// B. failed API authentication is rate-limited per client address
// =======================================================================================

fn publish_from(source: &str, port: u16, auth: &str) -> HttpResponse {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&format!("{source}:0").parse::<SocketAddr>().unwrap().into()).expect("bind source address");
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    socket.connect_timeout(&target.into(), T).expect("connect");
    let mut stream: TcpStream = socket.into();
    let body = json!({"user_id": "rl", "message": notification("rl")}).to_string();
    let bearer = format!("Bearer {auth}");
    let headers = [("Authorization", bearer.as_str()), ("Content-Type", "application/json"), ("Connection", "close")];
    http_on(&mut stream, "POST", "/publish", &headers, body.as_bytes(), T).expect("an HTTP answer")
}

#[test]
fn failed_api_authentication_is_rate_limited_per_address() {
    let h = herald().api_key().start();
    // Successes are never counted: many of them leave the whole failure budget intact.
    for _ in 0..40 {
        assert_eq!(publish_from("127.0.0.1", h.port, API_KEY).status, 200);
    }
    let mut failures = 0;
    let limited = loop {
        let r = publish_from("127.0.0.1", h.port, "wrong-key");
        if r.status == 429 {
            break r;
        }
        assert_eq!(r.status, 401, "{}", r.text());
        failures += 1;
        assert!(failures < 60, "still not limited after {failures} failures");
    };
    assert!(failures >= 20, "limited after only {failures} failures");
    assert_eq!(limited.json(), json!({"status": "error", "error": "too many failed authentications"}));
    // While the address is limited the credential is not even looked at: the right key gets
    // 429 too (else the limit would tell a guesser when it is right). The bucket refills at
    // 5/s, so on a slow machine one request may slip into a fresh token: a few rounds.
    let refused_good_key = (0..5).any(|_| {
        while publish_from("127.0.0.1", h.port, "wrong-key").status != 429 {}
        publish_from("127.0.0.1", h.port, API_KEY).status == 429
    });
    assert!(refused_good_key, "the right key went through while the address was limited");
    // Another address is unaffected.
    assert_eq!(publish_from("127.0.0.2", h.port, "wrong-key").status, 401);
    assert_eq!(publish_from("127.0.0.2", h.port, API_KEY).status, 200);
    // Refilled after a while.
    thread::sleep(Duration::from_millis(1200));
    assert_eq!(publish_from("127.0.0.1", h.port, "wrong-key").status, 401);
    assert_eq!(publish_from("127.0.0.1", h.port, API_KEY).status, 200);
    let m = h.metrics();
    assert!(m["errors"]["api_auth_rate_limited"].as_u64().is_some_and(|n| n >= 2), "{m}");
    assert!(m["errors"]["api_auth_failures"].as_u64().is_some_and(|n| n >= 21), "{m}");
    let prom = h.http("GET", "/metrics", &[("Accept", "text/plain")], b"").text();
    assert!(prom.contains("herald_api_auth_rate_limited_total "), "{prom}");
}

// =======================================================================================
// B. channel prefixes
// =======================================================================================

#[test]
fn empty_or_overlapping_channel_prefixes_are_configuration_errors() {
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[("HERALD_USER_CHANNEL_PREFIX", "")], "HERALD_USER_CHANNEL_PREFIX"),
        (&[("HERALD_TOPIC_CHANNEL_PREFIX", "")], "HERALD_TOPIC_CHANNEL_PREFIX"),
        (&[("HERALD_USER_CHANNEL_PREFIX", "noti:"), ("HERALD_TOPIC_CHANNEL_PREFIX", "noti:topic:")], "PREFIX"),
        (&[("HERALD_USER_CHANNEL_PREFIX", "same:"), ("HERALD_TOPIC_CHANNEL_PREFIX", "same:")], "PREFIX"),
    ];
    for (settings, named) in cases {
        let mut env = vec![("HERALD_JWT_SECRET", SECRET), ("HERALD_LISTEN", "127.0.0.1:0")];
        env.extend_from_slice(settings);
        let out = run_herald(&[], &env, T);
        assert_eq!(out.code, Some(2), "{settings:?}: {}", out.stderr);
        assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
        assert!(out.stderr.contains(named), "{settings:?}: {}", out.stderr);
    }
    let out = run_herald(&["--user-channel-prefix", ""], &[("HERALD_LISTEN", "127.0.0.1:0")], T);
    assert_eq!(out.code, Some(2), "flag form: {}", out.stderr);
}

// =======================================================================================
// B. /health shows the kind of Redis failure, not Redis's words
// =======================================================================================

#[test]
fn health_reports_the_kind_of_redis_failure_only() {
    let redis = PasswordRedis::start("right-pw-5");
    let kinds = ["connection refused", "authentication failed", "timeout", "protocol error", "io error"];
    for (url, want) in [
        (format!("redis://:wrong-pw-9@127.0.0.1:{}", redis.port), "authentication failed"),
        (format!("redis://127.0.0.1:{}", redis.port), "authentication failed"),
        (format!("redis://127.0.0.1:{}", free_port()), "connection refused"),
    ] {
        let h = herald().env("HERALD_REDIS_URL", &url).start();
        let v = wait_redis_error(&h);
        let error = v["redis"]["error"].as_str().unwrap_or_default();
        assert!(kinds.contains(&error), "{url}: error {error:?} is not one of {kinds:?}: {v}");
        assert_eq!(error, want, "{url}: {v}");
        // The details are in the log for the operator, without the password.
        assert!(wait_until(T, || h.stderr().contains("WARN")), "{}", h.stderr());
        assert!(!h.stderr().contains("wrong-pw-9"), "{}", h.stderr());
    }
    // And with the right password it connects.
    let url = format!("redis://:right-pw-5@127.0.0.1:{}", redis.port);
    let h = herald().env("HERALD_REDIS_URL", &url).start();
    let connected = wait_until(Duration::from_secs(10), || h.health_json()["redis"]["status"] == "connected");
    assert!(connected, "{}", h.health_json());
}
