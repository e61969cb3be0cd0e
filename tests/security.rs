//! Security: algorithm confusion, topic isolation on every route, no compression, request
//! size limits, slowloris at scale, and no secret ever reaching the logs.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tungstenite::Message;

const T: Duration = Duration::from_secs(5);
const MASK: Option<[u8; 4]> = Some([0x5a, 0x01, 0xc3, 0x7e]);
const P000: &str = "/v1/notifications/ws/notifications";
const P001: &str = "/ws/notifications";
const P002: &str = "/ws/notifications/";

fn upgrade_status(port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    match ws_try_connect(port, path, headers) {
        Upgrade::Ok(_) => (101, String::new()),
        Upgrade::Rejected { status, body } => (status, body),
    }
}

fn assert_invalid_token(port: u16, tok: &str, what: &str) {
    let (status, body) = upgrade_status(port, &format!("/ws?token={tok}"), &[]);
    assert_eq!(status, 401, "{what} (query): body {body}");
    assert!(body.contains("invalid or expired token"), "{what}: body {body}");
    let bearer = format!("Bearer {tok}");
    let (status, body) = upgrade_status(port, "/ws", &[("Authorization", &bearer)]);
    assert_eq!(status, 401, "{what} (Bearer header): body {body}");
}

fn send_json(ws: &mut Ws, v: &Value) {
    ws.send(Message::text(v.to_string())).expect("send");
}

fn connect_path(port: u16, path: &str, tok: &str) -> Ws {
    let sep = if path.contains('?') { '&' } else { '?' };
    match ws_try_connect(port, &format!("{path}{sep}token={tok}"), &[]) {
        Upgrade::Ok(ws) => *ws,
        Upgrade::Rejected { status, body } => panic!("{path}: upgrade refused {status} {body}"),
    }
}

// =======================================================================================
// algorithm confusion
// =======================================================================================

#[test]
fn rs256_and_es256_tokens_are_refused_by_an_hs256_herald() {
    let h = herald().start();
    let claims = json!({"sub": "mallory", "exp": now_secs() + 3600});
    // properly signed, but with a key kind this herald is not configured for
    assert_invalid_token(h.port, &token_rs256(&claims, "rsa_private.pem"), "RS256 token");
    assert_invalid_token(h.port, &token_es256(&claims, "ec_private.pem"), "ES256 token");
    // an RS256 publish-scope token does not open the publish API either
    let publisher =
        token_rs256(&json!({"sub": "svc", "scope": "publish", "exp": now_secs() + 3600}), "rsa_private.pem");
    let r = h.publish(Some(&publisher), &json!({"user_id": "victim", "message": notification("x")}));
    assert_eq!(r.status, 401, "{}", r.text());
    // the HS256 token of the same claims is fine
    let mut ws = h.ws(&token_claims(claims));
    assert_alive(&mut ws);
}

#[test]
fn hs256_tokens_signed_with_the_secret_are_refused_by_a_public_key_herald() {
    // both a secret and a public key configured: the public key decides, HS256 is not accepted
    for (pem, good) in [
        ("rsa_public.pem", token_rs256(&json!({"sub": "kid", "exp": now_secs() + 3600}), "rsa_private.pem")),
        ("ec_public.pem", token_es256(&json!({"sub": "kid", "exp": now_secs() + 3600}), "ec_private.pem")),
    ] {
        let key = fixture(pem);
        let h = herald().env("HERALD_JWT_PUBLIC_KEY", key.to_str().unwrap()).start();
        assert_invalid_token(h.port, &token("kid"), &format!("HS256 token signed with HERALD_JWT_SECRET ({pem})"));
        let pem_text = std::fs::read_to_string(&key).unwrap();
        let confused = token_hs256(&json!({"sub": "kid", "exp": now_secs() + 3600}), &pem_text);
        assert_invalid_token(h.port, &confused, &format!("HS256 token signed with the public key ({pem})"));
        // publish API: an HS256 publish-scope token signed with the secret is refused
        let publisher = token_claims(json!({"sub": "svc", "scope": "publish", "exp": now_secs() + 3600}));
        let r = h.publish(Some(&publisher), &json!({"user_id": "kid", "message": notification("x")}));
        assert_eq!(r.status, 401, "{pem}: {}", r.text());
        // dialect paths refuse it too (each with its own failure shape)
        let hs = token("kid");
        let (status, _) = upgrade_status(h.port, &format!("{P002}?token={hs}"), &[]);
        assert_eq!(status, 403, "{pem}: seed-002 path with an HS256 token");
        let mut ws = connect_path(h.port, P001, &hs);
        expect_close_code(&mut ws, 1008, T);
        // while a token signed with the private key is accepted
        let mut ws = h.ws(&good);
        assert_alive(&mut ws);
    }
}

// =======================================================================================
// a token for topic A never receives topic B
// =======================================================================================

#[test]
fn topic_token_cannot_receive_another_topic_on_any_route() {
    topic_isolation("exact");
}

#[test]
fn topic_token_cannot_receive_another_topic_on_any_route_in_pattern_mode() {
    topic_isolation("pattern");
}

/// With exact subscriptions herald is not even subscribed to the other topic; with patterns
/// it receives it and must route it nowhere.
fn topic_isolation(mode: &str) {
    let redis = Redis::start();
    let h = herald().api_key().redis(&redis).env("HERALD_REDIS_SUBSCRIBE", mode).start();
    redis.wait_subscribers(1, T);
    let tok = token_claims(json!({"sub": "alice", "topics": ["project:7"], "exp": now_secs() + 3600}));

    // path: /ws/project/8 opens, then closes 1008 (also with tricks around the id)
    for path in ["/ws/project/8", "/ws/project/8/", "/ws/project/08", "/ws/project/8?topic=project:7"] {
        match ws_try_connect(h.port, &format!("{path}{}token={tok}", if path.contains('?') { '&' } else { '?' }), &[]) {
            Upgrade::Ok(mut ws) => match wait_close(&mut ws, T) {
                Closed::Frame(Some(1008), _) => {}
                other => panic!("{path}: expected close 1008, got {other:?}"),
            },
            Upgrade::Rejected { status, .. } => {
                assert!((400..500).contains(&status), "{path}: refused with {status}")
            }
        }
    }
    // the legitimate routes to topic A
    let mut on_path = connect_path(h.port, "/ws/project/7", &tok);
    // runtime subscribe on /ws
    let mut personal = h.ws(&tok);
    send_json(&mut personal, &json!({"type": "subscribe", "topic": "project:8"}));
    let e = recv_json(&mut personal, T);
    assert_eq!(e["type"], "error", "subscribe to project:8: {e}");
    send_json(&mut personal, &json!({"type": "subscribe", "topic": "project:7"}));
    assert_eq!(recv_json(&mut personal, T), json!({"type": "subscribed", "topic": "project:7"}));
    // subscribe_project on the seed-002 path
    let mut p002 = connect_path(h.port, P002, &tok);
    for id in [json!(8), json!("8")] {
        send_json(&mut p002, &json!({"type": "subscribe_project", "project_id": id}));
        let e = recv_json(&mut p002, T);
        assert_eq!(e["type"], "error", "subscribe_project {id}: {e}");
    }
    send_json(&mut p002, &json!({"type": "subscribe_project", "project_id": 7}));
    // runtime subscribe on the seed-002 path too
    send_json(&mut p002, &json!({"type": "subscribe", "topic": "project:8"}));
    assert_eq!(recv_json(&mut p002, T)["type"], "error");

    // topic B is published through Redis and through the HTTP API
    let leak = json!({"type": "leak", "topic": "project:8"});
    if mode == "pattern" {
        redis.publish_until_received("topic_noti:project:8", &leak.to_string(), T);
    } else {
        assert_eq!(redis.publish("topic_noti:project:8", &leak.to_string()), 0, "subscribed to a topic nobody holds");
    }
    let r = h.publish(Some(API_KEY), &json!({"topic": "project:8", "message": leak}));
    assert_eq!(r.status, 200, "{}", r.text());
    // then topic A: it is the next (and only) thing each connection receives
    redis.publish("topic_noti:project:7", &json!({"type": "marker", "via": "redis"}).to_string());
    let r = h.publish(Some(API_KEY), &json!({"topic": "project:7", "message": {"type": "marker", "via": "http"}}));
    assert_eq!(r.status, 200, "{}", r.text());
    for (name, ws) in [("/ws/project/7", &mut on_path), ("/ws + subscribe", &mut personal), (P002, &mut p002)] {
        for via in ["redis", "http"] {
            let m = recv_json(ws, T);
            assert_eq!((m["type"].as_str(), m["via"].as_str()), (Some("marker"), Some(via)), "{name} got {m}");
        }
        assert_no_message(ws, Duration::from_millis(300));
    }
}

// =======================================================================================
// no compression, ever
// =======================================================================================

#[test]
fn permessage_deflate_is_never_negotiated_and_rsv1_frames_close_1002() {
    let h = herald().api_key().start();
    let tok = token("squeeze");
    let offers = [
        "permessage-deflate; client_max_window_bits",
        "permessage-deflate",
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover, x-webkit-deflate-frame",
    ];
    for path in ["/ws", P000, P001, P002] {
        for offer in offers {
            let (resp, _raw) =
                raw_upgrade_response(h.port, &format!("{path}?token={tok}"), &[("Sec-WebSocket-Extensions", offer)]);
            assert_eq!(resp.status, 101, "{path} with {offer:?}: {}", resp.text());
            assert_eq!(resp.header("sec-websocket-extensions"), None, "{path}: extension negotiated for {offer:?}");
        }
    }
    let (resp, mut raw) = raw_upgrade_response(
        h.port,
        &format!("/ws?token={tok}"),
        &[("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")],
    );
    assert_eq!(resp.status, 101);
    // what herald sends is never compressed: RSV bits clear
    let r = h.publish(Some(API_KEY), &json!({"user_id": "squeeze", "message": notification("plain")}));
    assert_eq!(r.status, 200);
    let (head, f) = raw.read_frame_with_head(Instant::now() + T).expect("a notification frame");
    assert_eq!(head & 0x70, 0, "RSV bits set on a server frame: {head:#04x}");
    assert_eq!(f.opcode, 0x1);
    let m: Value = serde_json::from_slice(&f.payload).expect("plain JSON");
    assert_eq!(m["payload"]["title"], "plain");
    // a "compressed" frame (RSV1, raw deflate of "ping") is a protocol error, never inflated
    let mut frame = encode_frame(true, 0x1, &[0x2b, 0xc8, 0xcc, 0x4b, 0x07, 0x00], MASK);
    frame[0] |= 0x40;
    raw.write_raw(&frame).unwrap();
    raw.expect_close_code(1002, T);
}

// =======================================================================================
// request size and framing limits
// =======================================================================================

fn publish_body_of_len(len: usize) -> Vec<u8> {
    let head = br#"{"user_id":"sizer","message":{"type":"t"},"pad":""#;
    let tail = br#""}"#;
    assert!(len >= head.len() + tail.len());
    let mut body = head.to_vec();
    body.resize(len - tail.len(), b'a');
    body.extend_from_slice(tail);
    assert_eq!(body.len(), len);
    body
}

#[test]
fn oversized_chunked_and_ambiguous_bodies_are_refused() {
    let h = herald().api_key().start();
    let auth = format!("Bearer {API_KEY}");
    let headers = [("Authorization", auth.as_str()), ("Content-Type", "application/json")];
    // 64 KiB + 1 on every publish/admin endpoint
    for path in ["/publish", "/notify", "/api/disconnect", "/api/v1/realtime/events/task"] {
        let r = try_http(h.port, "POST", path, &headers, &publish_body_of_len(64 * 1024 + 1), T)
            .unwrap_or_else(|| panic!("no response to a 64 KiB + 1 body on {path}"));
        assert_eq!(r.status, 413, "{path}: {}", r.text());
    }
    // exactly 64 KiB is within the limit
    let r = try_http(h.port, "POST", "/publish", &headers, &publish_body_of_len(64 * 1024), T).expect("response");
    assert_ne!(r.status, 413, "a 64 KiB body is within the limit: {}", r.text());
    // a huge declared length is refused from the head alone, without waiting for the body
    let head = format!(
        "POST /publish HTTP/1.1\r\nHost: h\r\nAuthorization: {auth}\r\nContent-Length: 10000000000\r\n\r\n{{\"user_id\""
    );
    let r = http_raw(h.port, head.as_bytes(), Duration::from_secs(2)).expect("413 before the body arrives");
    assert_eq!(r.status, 413, "{}", r.text());
    // chunked
    let chunked = format!(
        "POST /publish HTTP/1.1\r\nHost: h\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\n\
         3a\r\n{{\"user_id\":\"sizer\",\"message\":{{\"type\":\"chunky\"}},\"x\":\"0123\"}}\r\n0\r\n\r\n"
    );
    let r = http_raw(h.port, chunked.as_bytes(), T).expect("response to chunked");
    assert_eq!(r.status, 411, "{}", r.text());
    // both Transfer-Encoding and Content-Length (the smuggling shape)
    let both = format!(
        "POST /publish HTTP/1.1\r\nHost: h\r\nAuthorization: {auth}\r\nContent-Length: 4\r\n\
         Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    let r = http_raw(h.port, both.as_bytes(), T).expect("response to TE + CL");
    assert!(r.status == 400 || r.status == 411, "TE + CL: {} {}", r.status, r.text());
    // two different Content-Length headers
    let body = r#"{"user_id":"sizer","message":{"type":"t"}}"#;
    let two = format!(
        "POST /publish HTTP/1.1\r\nHost: h\r\nAuthorization: {auth}\r\nContent-Length: {}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len(),
        body.len() - 1
    );
    let r = http_raw(h.port, two.as_bytes(), T).expect("response to two Content-Length headers");
    assert_eq!(r.status, 400, "{}", r.text());
    // nothing was delivered by any of them, and herald is fine
    let mut ws = h.ws(&token("sizer"));
    assert_no_message(&mut ws, Duration::from_millis(200));
    assert_alive(&mut ws);
}

#[test]
fn content_length_must_be_plain_digits() {
    let h = herald().api_key().start();
    let auth = format!("Bearer {API_KEY}");
    let body = r#"{"user_id":"cl","message":{"type":"t"}}"#;
    let mut wrong = Vec::new();
    for cl in [format!("+{}", body.len()), format!("{}, {}", body.len(), body.len()), format!(" -{}", body.len())] {
        let req =
            format!("POST /publish HTTP/1.1\r\nHost: h\r\nAuthorization: {auth}\r\nContent-Length: {cl}\r\n\r\n{body}");
        let r = http_raw(h.port, req.as_bytes(), T).expect("response");
        if r.status != 400 {
            wrong.push(format!("Content-Length {cl:?} -> {} {}", r.status, r.text()));
        }
    }
    assert!(wrong.is_empty(), "RFC 9112 §6.3: an invalid Content-Length is an unrecoverable error (400): {wrong:#?}");
}

// =======================================================================================
// slowloris at scale
// =======================================================================================

/// Whether the server has closed `s` (EOF or reset), reading away whatever it sent first.
fn closed_by_server(s: &mut TcpStream, got: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

#[test]
fn slowloris_at_scale_is_dropped_while_normal_clients_are_served() {
    const N: usize = 200;
    let h = herald().api_key().env("HERALD_HANDSHAKE_TIMEOUT", "1s").start();
    std::thread::sleep(Duration::from_millis(300));
    let base_fds = fd_count(h.pid());
    let req = upgrade_request(h.port, &format!("/ws?token={}", token("loris")), &[]).into_bytes();
    let mut socks: Vec<TcpStream> = (0..N)
        .map(|_| {
            let s = TcpStream::connect(("127.0.0.1", h.port)).expect("connect");
            s.set_nodelay(true).unwrap();
            s
        })
        .collect();
    let opened = Instant::now();
    // one thread trickles a byte per connection every 200 ms (for at most 6 s)
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<TcpStream> = socks.iter().map(|s| s.try_clone().unwrap()).collect();
    let (stop2, req2) = (stop.clone(), req.clone());
    let trickler = std::thread::spawn(move || {
        let mut writers: Vec<Option<TcpStream>> = writers.into_iter().map(Some).collect();
        let start = Instant::now();
        let mut i = 0;
        while !stop2.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(6) && i < req2.len() {
            for w in writers.iter_mut() {
                if let Some(s) = w {
                    if s.write_all(&req2[i..i + 1]).is_err() {
                        *w = None;
                    }
                }
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    for s in socks.iter() {
        s.set_nonblocking(true).unwrap();
    }

    // meanwhile, a normal client upgrades and gets a message
    let t = Instant::now();
    let mut ws = h.ws(&token("normal"));
    let upgrade_took = t.elapsed();
    let r = h.publish(Some(API_KEY), &json!({"user_id": "normal", "message": notification("unbothered")}));
    assert_eq!(r.status, 200);
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "unbothered");
    assert!(upgrade_took < Duration::from_secs(1), "normal upgrade took {upgrade_took:?} during the slowloris");

    // every trickling connection is dropped
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); N];
    let mut closed = [false; N];
    let all_closed = wait_until(Duration::from_secs(3).saturating_sub(opened.elapsed()), || {
        for (i, s) in socks.iter_mut().enumerate() {
            if !closed[i] {
                closed[i] = closed_by_server(s, &mut got[i]);
            }
        }
        closed.iter().all(|c| *c)
    });
    let took = opened.elapsed();
    stop.store(true, Ordering::SeqCst);
    trickler.join().unwrap();
    let n_closed = closed.iter().filter(|c| **c).count();
    let n_408 = got.iter().filter(|g| g.starts_with(b"HTTP/1.1 408")).count();
    eprintln!("slowloris: {n_closed}/{N} dropped after {took:?} ({n_408} with a 408); normal upgrade {upgrade_took:?}");
    assert!(all_closed, "only {n_closed} of {N} trickling connections were dropped within 3 s (handshake timeout 1 s)");
    assert!(
        got.iter().all(|g| g.is_empty() || g.starts_with(b"HTTP/1.1 408")),
        "a trickling connection got something other than 408"
    );
    drop(socks);
    // herald gives everything back and still serves
    // what is left: the normal client's connection
    let one = Held { active: 1, slab_entries: 1, index_entries: 1 };
    let mut last = (0, Held::NONE);
    let ok = wait_until(T, || {
        last = (fd_count(h.pid()), Held::of(&h.metrics()));
        last == (base_fds + 1, one)
    });
    assert!(
        ok,
        "after the slowloris: fds {} (baseline {base_fds} + 1 client), {:?} (expected {one:?})",
        last.0, last.1
    );
    assert_alive(&mut ws);
}

// =======================================================================================
// logs never contain a credential
// =======================================================================================

#[test]
fn no_token_key_or_secret_reaches_the_logs_even_at_trace() {
    let h = herald().api_key().env("HERALD_LOG", "trace").start();
    let now = now_secs();
    let valid = token("log-user");
    let bearer_only = token("log-bearer");
    let expired = token_claims(json!({"sub": "log-user", "exp": now - 100}));
    let future = token_claims(json!({"sub": "log-user", "exp": now + 3600, "nbf": now + 600}));
    let wrong_sig = token_hs256(&json!({"sub": "log-user", "exp": now + 3600}), "some-other-secret-5d1e");
    let scoped = token_claims(json!({"sub": "svc", "scope": "publish", "exp": now + 3600}));
    let topical = token_claims(json!({"sub": "log-topic", "topics": ["project:1"], "exp": now + 3600}));
    let rsa = token_rs256(&json!({"sub": "log-user", "exp": now + 3600}), "rsa_private.pem");
    let none = token_alg_none(&json!({"sub": "log-user", "exp": now + 3600}));
    let malformed = [
        "malformed-token-9f8e7d6c5b4a".to_string(),
        "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24gYXQgYWxs.c2lnbmF0dXJlLXh5ei0xMjM0".to_string(),
        format!("{valid}tampered"),
        valid.rsplit_once('.').unwrap().0.to_string(),
    ];
    let wrong_key = "wrong-api-key-c0ffee-4242";

    // upgrades: query and Bearer, valid and invalid, on every dialect path
    let mut keep = vec![h.ws(&valid)];
    match ws_try_connect(h.port, "/ws", &[("Authorization", &format!("Bearer {bearer_only}"))]) {
        Upgrade::Ok(ws) => keep.push(*ws),
        Upgrade::Rejected { status, body } => panic!("Bearer upgrade refused: {status} {body}"),
    }
    let invalid: Vec<&str> = [&expired, &future, &wrong_sig, &rsa, &none]
        .into_iter()
        .map(|s| s.as_str())
        .chain(malformed.iter().map(|s| s.as_str()))
        .chain([SECRET, API_KEY])
        .collect();
    for tok in &invalid {
        for path in ["/ws", P000, P001, P002, "/ws/project/1"] {
            let _ = raw_upgrade_response(h.port, &format!("{path}?token={tok}"), &[]);
        }
        let _ = raw_upgrade_response(h.port, "/ws", &[("Authorization", &format!("Bearer {tok}"))]);
    }
    for path in [P000, P001, P002] {
        keep.push(connect_path(h.port, path, &valid));
    }
    let mut topic_ws = connect_path(h.port, "/ws/project/1", &topical);
    send_json(&mut topic_ws, &json!({"type": "subscribe", "topic": "project:2"}));
    let _ = recv_json(&mut topic_ws, T);
    // a token that expires while connected
    let short = token_claims(json!({"sub": "log-short", "exp": now_secs() + 1}));
    let mut short_ws = h.ws(&short);

    // publish API with the key, a scoped JWT, a user JWT, and wrong credentials
    let msg = |u: &str| json!({"user_id": u, "message": notification("logged?")});
    assert_eq!(h.publish(Some(API_KEY), &msg("log-user")).status, 200);
    assert_eq!(h.publish(Some(&scoped), &msg("log-user")).status, 200);
    assert_eq!(h.publish(Some(&valid), &msg("log-user")).status, 200);
    assert_eq!(h.publish(Some(&valid), &msg("someone-else")).status, 403);
    for bad in [wrong_key, expired.as_str(), wrong_sig.as_str(), malformed[0].as_str(), SECRET] {
        assert_eq!(h.publish(Some(bad), &msg("log-user")).status, 401, "publish with {bad:.12}…");
    }
    let auth = format!("Bearer {API_KEY}");
    let r = h.http(
        "POST",
        "/notify",
        &[("Authorization", &auth)],
        br#"{"user_id":"log-user","title":"t","message":"m","type":"info"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = h.http(
        "POST",
        "/api/disconnect",
        &[("Authorization", &format!("Bearer {scoped}"))],
        br#"{"user_id":"nobody"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // the token in a query string of plain HTTP requests
    let _ = h.http("GET", &format!("/health?token={valid}"), &[], b"");
    let _ = h.http("GET", &format!("/nowhere?token={valid}&key={API_KEY}"), &[], b"");
    let _ = h.http("GET", &format!("/ws?token={valid}"), &[], b"");

    expect_close_code(&mut short_ws, 1008, Duration::from_secs(4));
    for ws in keep.iter_mut() {
        let _ = ws.close(None);
    }
    std::thread::sleep(Duration::from_millis(500));

    let logs = format!("{}\n{}", h.stdout(), h.stderr());
    assert!(logs.lines().count() >= 20, "expected plenty of output at HERALD_LOG=trace, got:\n{logs}");
    let mut secrets: Vec<(String, String)> = vec![
        ("the JWT secret".into(), SECRET.into()),
        ("the API key".into(), API_KEY.into()),
        ("a wrong API key".into(), wrong_key.into()),
    ];
    for (name, tok) in [
        ("valid", &valid),
        ("bearer", &bearer_only),
        ("expired", &expired),
        ("nbf", &future),
        ("wrong signature", &wrong_sig),
        ("scoped", &scoped),
        ("topical", &topical),
        ("rs256", &rsa),
        ("short-lived", &short),
    ] {
        secrets.push((format!("the {name} token"), tok.clone()));
        let parts: Vec<&str> = tok.split('.').collect();
        secrets.push((format!("the {name} token's claims"), parts[1].to_string()));
        secrets.push((format!("the {name} token's signature"), parts[2].to_string()));
    }
    secrets.push(("the alg-none token".into(), none.clone()));
    for m in &malformed {
        secrets.push(("a malformed token".into(), m.clone()));
    }
    let leaks: Vec<&String> = secrets.iter().filter(|(_, s)| logs.contains(s.as_str())).map(|(what, _)| what).collect();
    assert!(leaks.is_empty(), "found in herald's output: {leaks:?}");
}
