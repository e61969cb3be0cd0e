//! herald's drop-in dialects (SPEC §4, §6; seeds 000, 001, 002 and 004): every path, its
//! auth failure and close codes, the client messages, topics, focus-session relays, the
//! seed-specific HTTP API, and the seeds' own client snippets run against herald.
//!
//! Everything is real: the herald binary, redis-server on a free port where Redis matters,
//! tungstenite clients over std TcpStreams, node / python3 for the seeds' client code.

mod common;
mod dialect_support;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use dialect_support::*;
use serde_json::{Value, json};

/// Seed 000's path.
const P000: &str = "/v1/notifications/ws/notifications";
/// Seeds 001 and 004.
const P001: &str = "/ws/notifications";
/// Seed 002 (trailing slash).
const P002: &str = "/ws/notifications/";

const QUIET: Duration = Duration::from_millis(400);

const EV_TASK: &str = "/api/v1/realtime/events/task";
const EV_WORKSPACE: &str = "/api/v1/realtime/events/workspace";
const EV_SYSTEM: &str = "/api/v1/realtime/events/system";

fn start() -> Herald {
    herald().api_key().start()
}

fn sorted_keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap_or_else(|| panic!("not an object: {v}")).keys().cloned().collect();
    k.sort();
    k
}

/// `YYYY-MM-DDTHH:MM:SS[.fff](Z|±hh:mm)`.
fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.clone().all(|i| b.get(i).is_some_and(|c| c.is_ascii_digit()));
    b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && (b[10] == b'T' || b[10] == b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && (s.ends_with('Z') || s.ends_with('z') || s[19..].contains('+') || s[19..].contains('-'))
}

/// Checks seed 004's notification shape; returns the message without `timestamp`.
fn seed004(m: Value) -> Value {
    let m = without_timestamp(m);
    let mut keys = sorted_keys(&m);
    keys.retain(|k| k != "timestamp");
    assert_eq!(
        keys,
        [
            "content",
            "created_at",
            "data",
            "notification_id",
            "notification_type",
            "related_entity_id",
            "related_entity_type",
            "title",
            "type"
        ],
        "seed-004 notification keys of {m}"
    );
    assert_eq!(m["type"], "notification", "{m}");
    assert!(m["notification_id"].is_u64() || m["notification_id"].is_i64(), "notification_id must be an integer: {m}");
    let created = m["created_at"].as_str().unwrap_or_else(|| panic!("created_at must be a string: {m}"));
    assert!(is_rfc3339(created), "created_at {created:?} is not RFC 3339");
    assert!(m["data"].is_object(), "data must be an object: {m}");
    m
}

// =======================================================================================
// paths and auth failures (SPEC §4 table)
// =======================================================================================

#[test]
fn seed000_path_greets_with_connected_first() {
    let h = start();
    let mut ws = connect(h.port, P000, &token("u000"));
    let hello = recv_json(&mut ws, T);
    assert_eq!(sorted_keys(&hello), ["timestamp", "type"], "greeting {hello}");
    assert_eq!(hello["type"], "connected");
    assert_timestamp_is_now(hello["timestamp"].as_str().unwrap_or_else(|| panic!("timestamp string: {hello}")), 30.0);
    // personal notifications follow
    assert!(publish_key(&h, &json!({"user_id": "u000", "message": {"type": "task_update", "data": {"task_id": "t"}}})));
    let m = recv_json(&mut ws, T);
    assert_eq!(m["type"], "task_update", "{m}");
    assert_eq!(m["data"]["task_id"], "t");
}

/// Server-side time of a message (its `timestamp`), in seconds.
fn server_time(m: &Value) -> f64 {
    parse_timestamp(m["timestamp"].as_str().unwrap_or_else(|| panic!("no timestamp in {m}")))
}

#[test]
fn seed000_json_heartbeat_after_interval_of_silence_ping_frames_do_not_count() {
    // Ping frames every 300 ms must not hold the 1 s JSON heartbeat back.
    let h = herald().api_key().env("HERALD_HEARTBEAT_INTERVAL", "1s").env("HERALD_PING_INTERVAL", "300ms").start();
    let mut ws = connect(h.port, P000, &token("hb"));
    let hello = recv_json(&mut ws, T);
    assert_eq!(hello["type"], "connected", "{hello}");
    // gaps measured with herald's own timestamps, so a slow test machine can't skew them
    let mut prev = server_time(&hello);
    for n in 1..=2 {
        let beat = recv_json(&mut ws, Duration::from_secs(4));
        assert_eq!(beat["type"], "heartbeat", "message {n}: {beat}");
        assert_eq!(sorted_keys(&beat), ["timestamp", "type"], "heartbeat {beat}");
        assert_timestamp_is_now(beat["timestamp"].as_str().unwrap(), 30.0);
        let gap = server_time(&beat) - prev;
        assert!((0.85..=2.0).contains(&gap), "heartbeat {n} came {gap:.3} s after the previous message, expected ~1 s");
        prev = server_time(&beat);
    }
}

#[test]
fn seed000_data_messages_reset_the_heartbeat_silence() {
    let h = herald().api_key().env("HERALD_HEARTBEAT_INTERVAL", "1s").start();
    let mut ws = connect_000(h.port, &token("hb2"));
    // sync on a first heartbeat
    let first = recv_json(&mut ws, Duration::from_secs(4));
    assert_eq!(first["type"], "heartbeat", "{first}");
    // A data message every 400 ms for 2.8 s: never 1 s of silence, so no heartbeat. (Should
    // this machine stall the test for over a second, a heartbeat is fine: each one must come
    // at least ~1 s after the previous outbound message, by herald's own timestamps.)
    let mut last = server_time(&first);
    let mut beats_during_data = 0;
    let until = Instant::now() + Duration::from_millis(2800);
    let mut i = 0;
    while Instant::now() < until {
        let sent_at = Instant::now();
        i += 1;
        assert!(publish_key(&h, &json!({"user_id": "hb2", "message": {"type": "task_update", "data": {"n": i}}})));
        loop {
            let m = recv_json(&mut ws, T);
            let at = server_time(&m);
            if m["type"] == "heartbeat" {
                assert!(at - last >= 0.85, "heartbeat only {:.3} s after the previous data message", at - last);
                beats_during_data += 1;
                last = at;
                continue;
            }
            assert_eq!(m["type"], "task_update", "{m}");
            assert_eq!(m["data"]["n"], i);
            last = at;
            break;
        }
        thread::sleep(Duration::from_millis(400).saturating_sub(sent_at.elapsed()));
    }
    if beats_during_data > 0 {
        eprintln!("note: {beats_during_data} heartbeat(s) while data flowed: the test was stalled for over 1 s");
    }
    // silence again: the heartbeat returns about 1 s after the last data message
    let beat = recv_json(&mut ws, Duration::from_secs(4));
    assert_eq!(beat["type"], "heartbeat", "{beat}");
    let gap = server_time(&beat) - last;
    assert!((0.85..=2.0).contains(&gap), "heartbeat {gap:.3} s after the last data message, expected ~1 s");
}

#[test]
fn seed000_bad_or_missing_token_opens_then_closes_4401() {
    let h = start();
    expect_open_then_close(h.port, P000, 4401, "missing token");
    for (label, tok) in bad_tokens() {
        expect_open_then_close(h.port, &with_token(P000, &tok), 4401, label);
    }
    assert_eq!(h.active_connections(), 0);
}

#[test]
fn seed001_bad_or_missing_token_opens_then_closes_1008() {
    let h = start();
    expect_open_then_close(h.port, P001, 1008, "missing token");
    for (label, tok) in bad_tokens() {
        expect_open_then_close(h.port, &with_token(P001, &tok), 1008, label);
    }
}

#[test]
fn seed002_bad_or_missing_token_is_http_403() {
    let h = start();
    let mut cases = vec![("missing token", P002.to_string())];
    for (label, tok) in bad_tokens() {
        cases.push((label, with_token(P002, &tok)));
    }
    for (label, path) in cases {
        match ws_try_connect(h.port, &path, &[]) {
            Upgrade::Rejected { status, .. } => assert_eq!(status, 403, "{label}"),
            Upgrade::Ok(_) => panic!("{label}: upgrade of {path} succeeded, expected HTTP 403"),
        }
    }
    // a good token is accepted on the same path
    let mut ws = connect(h.port, P002, &token("ok"));
    assert_alive(&mut ws);
}

#[test]
fn seed001_token_with_user_id_claim_gets_personal_notifications() {
    // seed 001's tokens carry user_id (+ username) instead of sub; a numeric id is its string
    let h = start();
    let tok = token_claims(json!({"user_id": 123, "username": "alice", "exp": now_secs() + 3600}));
    let mut ws = connect(h.port, P001, &tok);
    assert!(publish_key(&h, &json!({"user_id": "123", "message": {"type": "info"}})));
    assert_eq!(recv_json(&mut ws, T)["type"], "info");
}

#[test]
fn non_upgrade_requests_on_dialect_paths_get_426() {
    let h = start();
    for path in [P000, P001, P002, "/ws/tenant/t1", "/ws/tasks/5", "/ws/focus-session/s1"] {
        let r = h.http("GET", &with_token(path, &token("u")), &[], b"");
        assert_eq!(r.status, 426, "plain GET {path}: {}", r.text());
    }
}

#[test]
fn token_expiry_closes_with_each_dialects_code() {
    let h = start();
    let tok = token_expiring("exp1", &["tenant:t1", "workspace:3", "focus-session:f1", "device:d1"], 2);
    let cases = [
        (P000, 4401),
        (P001, 1008),
        (P002, 1008),
        ("/ws/tenant/t1", 1008),
        ("/ws/device/d1", 1008),
        ("/ws/tasks/3", 1008),
        ("/ws/focus-session/f1", 1008),
    ];
    let mut conns: Vec<(&str, u16, Ws)> = cases.iter().map(|(p, c)| (*p, *c, connect(h.port, p, &tok))).collect();
    let exp = jwt_claims(&tok)["exp"].as_f64().unwrap();
    for (n, (path, code, ws)) in conns.iter_mut().enumerate() {
        match wait_close(ws, Duration::from_secs(6)) {
            Closed::Frame(Some(c), reason) => assert_eq!(c, *code, "{path}: close code on expiry (reason {reason:?})"),
            other => panic!("{path}: expected close {code} on token expiry, got {other:?}"),
        }
        if n == 0 {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
            assert!(now >= exp - 1.2, "closed {:.2} s before the token's exp", exp - now);
        }
    }
}

// =======================================================================================
// /api/disconnect
// =======================================================================================

#[test]
fn api_disconnect_closes_personal_connections_with_each_dialects_code() {
    let h = start();
    let tok = token("u9");
    let mut c000 = connect_000(h.port, &tok);
    let mut c001 = connect(h.port, P001, &tok);
    let mut c002 = connect(h.port, P002, &tok);
    let mut c003 = connect(h.port, "/ws", &tok);
    let mut other = connect(h.port, P001, &token("u10"));
    h.wait_active_connections(5, T);
    let v = post_ok(&h, "/api/disconnect", Some(API_KEY), &json!({"user_id": "u9"}));
    assert_eq!(v, json!({"status": "success", "closed": 4}));
    expect_close_code(&mut c000, 4401, T);
    expect_close_code(&mut c001, 1008, T);
    expect_close_code(&mut c002, 1008, T);
    expect_close_code(&mut c003, 1008, T);
    assert_alive(&mut other);
    let v = post_ok(&h, "/api/disconnect", Some(API_KEY), &json!({"user_id": "nobody"}));
    assert_eq!(v, json!({"status": "success", "closed": 0}));
    // numeric ids, as seeds 001/004 use them
    let mut n = connect(h.port, P001, &token_claims(json!({"user_id": 42, "exp": now_secs() + 3600})));
    let v = post_ok(&h, "/api/disconnect", Some(API_KEY), &json!({"user_id": 42}));
    assert_eq!(v, json!({"status": "success", "closed": 1}));
    expect_close_code(&mut n, 1008, T);
}

#[test]
fn api_disconnect_also_closes_the_users_topic_path_connections() {
    // "closes every connection of that user": topic paths belong to the token's user too.
    let h = start();
    let tok = token_topics("u11", &["tenant:t1", "workspace:3", "focus-session:f1"]);
    let mut conns: Vec<(&str, Ws)> = ["/ws/tenant/t1", "/ws/tasks/3", "/ws/focus-session/f1"]
        .into_iter()
        .map(|p| (p, connect(h.port, p, &tok)))
        .collect();
    h.wait_active_connections(3, T);
    let v = post_ok(&h, "/api/disconnect", Some(API_KEY), &json!({"user_id": "u11"}));
    assert_eq!(v, json!({"status": "success", "closed": 3}), "/api/disconnect of a user connected on 3 topic paths");
    for (path, ws) in conns.iter_mut() {
        match wait_close(ws, Duration::from_secs(2)) {
            Closed::Frame(Some(c), _) => assert_eq!(c, 1008, "{path}"),
            other => panic!("{path}: expected close 1008 after /api/disconnect, got {other:?}"),
        }
    }
}

// =======================================================================================
// client → server messages (all dialects)
// =======================================================================================

#[test]
fn client_ping_ack_and_unknown_messages_on_every_dialect_path() {
    let h = start();
    let tok = token_topics("cm", &["tenant:t1", "workspace:5", "focus-session:f1"]);
    let paths = [P000, P001, P002, "/ws/tenant/t1", "/ws/tasks/5", "/ws/focus-session/f1"];
    let acked0 = metric(&h, "messages", "acked");
    let ignored0 = metric(&h, "messages", "ignored_client_messages");
    let mut ignored = 0;
    for path in paths {
        let mut ws = if path == P000 { connect_000(h.port, &tok) } else { connect(h.port, path, &tok) };
        send_text(&mut ws, "ping");
        assert_eq!(recv_text(&mut ws, T), "pong", "{path}: text ping");
        send_json(&mut ws, &json!({"action": "ping"}));
        assert_eq!(recv_json(&mut ws, T), json!({"action": "pong"}), "{path}: action ping");
        send_json(&mut ws, &json!({"type": "ping"}));
        assert_eq!(recv_json(&mut ws, T), json!({"type": "pong"}), "{path}: type ping");
        // acks: no answer (the barrier's pong is the next message)
        send_json(&mut ws, &json!({"action": "ack", "notification_id": "optional_notification_id"}));
        send_json(&mut ws, &json!({"action": "ack", "notification_id": 123}));
        barrier(&mut ws);
        // unknown messages: ignored
        send_text(&mut ws, "hello there");
        send_text(&mut ws, "[1,2,3]");
        ignored += 2;
        if !path.starts_with("/ws/focus-session/") {
            // (on a focus session any other JSON object is relayed instead)
            send_json(&mut ws, &json!({"type": "something_else", "x": 1}));
            send_json(&mut ws, &json!({"action": "dance"}));
            ignored += 2;
        }
        barrier(&mut ws);
        assert_no_message(&mut ws, Duration::from_millis(100));
    }
    let want_acked = acked0 + 2 * paths.len() as i64;
    let ok = wait_until(T, || metric(&h, "messages", "acked") >= want_acked);
    assert!(ok, "messages.acked: want {want_acked}, have {}", metric(&h, "messages", "acked"));
    let want_ignored = ignored0 + ignored;
    let ok = wait_until(T, || metric(&h, "messages", "ignored_client_messages") >= want_ignored);
    assert!(
        ok,
        "messages.ignored_client_messages: want {want_ignored}, have {}",
        metric(&h, "messages", "ignored_client_messages")
    );
}

#[test]
fn subscribe_and_unsubscribe_topics_on_personal_paths() {
    let h = start();
    for (i, path) in [P000, P001, P002].into_iter().enumerate() {
        let user = format!("sub{i}");
        let news = format!("news{i}");
        let alerts = format!("alerts:eu{i}");
        let secret = format!("secret{i}");
        let tok = token_topics(&user, &[&news, "alerts:*"]);
        let mut ws = if path == P000 { connect_000(h.port, &tok) } else { connect(h.port, path, &tok) };

        send_json(&mut ws, &json!({"type": "subscribe", "topic": news}));
        assert_eq!(recv_json(&mut ws, T), json!({"type": "subscribed", "topic": news}), "{path}");
        assert!(publish_key(&h, &json!({"topic": news, "message": {"type": "news", "n": 1}})), "{path}");
        let m = recv_json(&mut ws, T);
        assert_eq!((m["type"].clone(), m["n"].clone()), (json!("news"), json!(1)), "{path}: {m}");

        // prefix claim
        send_json(&mut ws, &json!({"type": "subscribe", "topic": alerts}));
        assert_eq!(recv_json(&mut ws, T), json!({"type": "subscribed", "topic": alerts}), "{path}");
        assert!(publish_key(&h, &json!({"topic": alerts, "message": {"type": "alert"}})), "{path}");
        assert_eq!(recv_json(&mut ws, T)["type"], "alert", "{path}");

        // personal messages still arrive
        assert!(publish_key(&h, &json!({"user_id": user, "message": {"type": "personal"}})));
        assert_eq!(recv_json(&mut ws, T)["type"], "personal", "{path}");

        send_json(&mut ws, &json!({"type": "unsubscribe", "topic": news}));
        assert_eq!(recv_json(&mut ws, T), json!({"type": "unsubscribed", "topic": news}), "{path}");
        assert!(!publish_key(&h, &json!({"topic": news, "message": {"type": "news", "n": 2}})), "{path}");
        assert_no_message(&mut ws, QUIET);

        // not allowed: error, and T never arrives
        send_json(&mut ws, &json!({"type": "subscribe", "topic": secret}));
        let e = recv_json(&mut ws, T);
        assert_eq!(e["type"], "error", "{path}: subscribe to a topic the token does not allow: {e}");
        assert!(e["message"].as_str().is_some_and(|s| !s.is_empty()), "{path}: error message string: {e}");
        assert!(!publish_key(&h, &json!({"topic": secret, "message": {"type": "secret"}})), "{path}");
        assert_no_message(&mut ws, QUIET);
    }
}

// =======================================================================================
// seed 002: subscribe_project
// =======================================================================================

fn seed002_milestone(title: &str) -> Value {
    json!({
        "type": "notification_received",
        "title": "Milestone Created",
        "message": format!("Milestone '{title}' has been created"),
        "event_type": "milestone_created",
        "timestamp": "2025-10-24T14:30:00Z",
        "actor": {"id": 5, "username": "jane_smith", "first_name": "Jane", "last_name": "Smith"},
        "project_id": 2,
        "project_title": "Mobile App Development",
        "data": {"id": 42, "title": title, "progress": 0}
    })
}

#[test]
fn seed002_subscribe_project_is_silent_and_delivers_project_topic() {
    let h = start();
    let mut ws = connect(h.port, P002, &token_topics("p1", &["project:*"]));
    send_json(&mut ws, &json!({"type": "subscribe_project", "project_id": 123}));
    barrier(&mut ws); // no answer: the pong is the next message
    let msg = seed002_milestone("Sprint Planning");
    assert!(publish_key(&h, &json!({"topic": "project:123", "message": msg})));
    assert_eq!(recv_json(&mut ws, T), msg, "delivered unchanged (it has a timestamp)");
    // another project: not subscribed
    assert!(!publish_key(&h, &json!({"topic": "project:124", "message": seed002_milestone("x")})));
    assert_no_message(&mut ws, QUIET);
    send_json(&mut ws, &json!({"type": "unsubscribe_project", "project_id": 123}));
    barrier(&mut ws);
    assert!(!publish_key(&h, &json!({"topic": "project:123", "message": seed002_milestone("After")})));
    assert_no_message(&mut ws, QUIET);
}

#[test]
fn seed002_subscribe_project_not_allowed_answers_error() {
    let h = start();
    let mut ws = connect(h.port, P002, &token_topics("p2", &["project:1"]));
    send_json(&mut ws, &json!({"type": "subscribe_project", "project_id": 2}));
    let e = recv_json(&mut ws, T);
    assert_eq!(e["type"], "error", "{e}");
    assert!(e["message"].as_str().is_some_and(|s| !s.is_empty()), "{e}");
    assert!(!publish_key(&h, &json!({"topic": "project:2", "message": {"type": "x"}})));
    assert_no_message(&mut ws, QUIET);
    // the allowed project is silent and works
    send_json(&mut ws, &json!({"type": "subscribe_project", "project_id": 1}));
    barrier(&mut ws);
    assert!(publish_key(&h, &json!({"topic": "project:1", "message": {"type": "ok"}})));
    assert_eq!(recv_json(&mut ws, T)["type"], "ok");
}

#[test]
fn topic_claim_is_required_on_every_route_to_the_topic() {
    let h = start();
    // "project:90" is not a prefix claim: it does not allow project:9
    let tok = token_topics("nc", &["project:90", "tenant:*"]);
    // path
    expect_open_then_close(h.port, &with_token("/ws/project/9", &tok), 1008, "topic path");
    // subscribe (every personal path)
    let mut subs = Vec::new();
    for path in [P000, P001, P002] {
        let mut ws = if path == P000 { connect_000(h.port, &tok) } else { connect(h.port, path, &tok) };
        send_json(&mut ws, &json!({"type": "subscribe", "topic": "project:9"}));
        let e = recv_json(&mut ws, T);
        assert_eq!(e["type"], "error", "{path}: {e}");
        subs.push(ws);
    }
    // subscribe_project
    let mut p = connect(h.port, P002, &tok);
    send_json(&mut p, &json!({"type": "subscribe_project", "project_id": 9}));
    let e = recv_json(&mut p, T);
    assert_eq!(e["type"], "error", "subscribe_project: {e}");
    // nobody receives project:9
    assert!(!publish_key(&h, &json!({"topic": "project:9", "message": {"type": "leak"}})));
    for ws in subs.iter_mut().chain([&mut p]) {
        assert_no_message(ws, Duration::from_millis(150));
    }
}

// =======================================================================================
// topic-only paths
// =======================================================================================

#[test]
fn topic_paths_receive_only_their_topic() {
    let h = start();
    let kinds = [
        ("/ws/tenant/t1", "tenant:t1"),
        ("/ws/device/d-1", "device:d-1"),
        ("/ws/project/7", "project:7"),
        ("/ws/tasks/789", "workspace:789"),
        ("/ws/focus-session/s1", "focus-session:s1"),
    ];
    let mut conns: Vec<(&str, &str, Ws)> =
        kinds.iter().map(|(p, t)| (*p, *t, connect(h.port, p, &token_topics("tp", &[t])))).collect();
    // the same user's personal connection
    let mut personal = connect(h.port, P001, &token_topics("tp", &["tenant:t1"]));
    // the user's personal messages do not reach the topic paths
    assert!(publish_key(&h, &json!({"user_id": "tp", "message": {"type": "personal"}})));
    assert_eq!(recv_json(&mut personal, T)["type"], "personal");
    for (_, _, ws) in conns.iter_mut() {
        assert_no_message(ws, Duration::from_millis(100));
    }
    for i in 0..conns.len() {
        let topic = conns[i].1;
        assert!(publish_key(&h, &json!({"topic": topic, "message": {"type": "topical", "topic": topic}})), "{topic}");
        for (j, (path, _, ws)) in conns.iter_mut().enumerate() {
            if i == j {
                let m = recv_json(ws, T);
                assert_eq!((m["type"].clone(), m["topic"].clone()), (json!("topical"), json!(topic)), "{path}: {m}");
            } else {
                assert_no_message(ws, Duration::from_millis(50));
            }
        }
        assert_no_message(&mut personal, Duration::from_millis(50));
    }
    // /ws/tasks/{id} is topic workspace:{id}, not tasks:{id}; other ids are other topics
    assert!(!publish_key(&h, &json!({"topic": "tasks:789", "message": {"type": "wrong"}})));
    assert!(!publish_key(&h, &json!({"topic": "tenant:t2", "message": {"type": "wrong"}})));
    for (_, _, ws) in conns.iter_mut() {
        assert_no_message(ws, Duration::from_millis(100));
    }
}

#[test]
fn topic_paths_accept_exact_and_prefix_claims_and_refuse_others_with_1008() {
    let h = start();
    // accepted
    for (path, claims) in [
        ("/ws/tenant/zz", vec!["tenant:*"]),
        ("/ws/tasks/5", vec!["workspace:5"]),
        ("/ws/device/d1", vec!["other", "device:d*"]),
        ("/ws/focus-session/f1", vec!["focus-session:f1"]),
        ("/ws/project/7", vec!["*"]),
    ] {
        let mut ws = connect(h.port, path, &token_topics("ok", &claims));
        assert_alive(&mut ws);
    }
    // refused: open, then 1008
    let cases: Vec<(&str, String, &str)> = vec![
        ("/ws/tenant/t1", token("u"), "no topics claim"),
        ("/ws/tenant/t1", token_topics("u", &["tenant:t2"]), "other id"),
        ("/ws/tenant/t1", token_topics("u", &["device:t1"]), "other kind"),
        ("/ws/tasks/5", token_topics("u", &["tasks:5"]), "tasks path needs workspace:5"),
        ("/ws/project/7", token_topics("u", &["project:70"]), "exact claim is not a prefix"),
        ("/ws/device/d1", token_topics("u", &["device:d1x*"]), "non-matching prefix"),
        ("/ws/focus-session/f1", token_topics("u", &["focus-session:f2"]), "other session"),
    ];
    for (path, tok, label) in cases {
        expect_open_then_close(h.port, &with_token(path, &tok), 1008, label);
    }
    expect_open_then_close(h.port, "/ws/device/d1", 1008, "missing token");
    for (label, tok) in bad_tokens() {
        expect_open_then_close(h.port, &with_token("/ws/device/d1", &tok), 1008, label);
        expect_open_then_close(h.port, &with_token("/ws/focus-session/f1", &tok), 1008, label);
    }
}

#[test]
fn topics_through_redis_reach_paths_and_subscriptions() {
    let redis = Redis::start();
    let h = herald().api_key().redis(&redis).start();
    redis.wait_subscribers(1, Duration::from_secs(10));
    let tok = token_topics("r1", &["tenant:t1", "device:d1", "project:5", "news", "workspace:9"]);
    let mut tenant = connect(h.port, "/ws/tenant/t1", &tok);
    let mut tasks = connect(h.port, "/ws/tasks/9", &tok);
    let mut s001 = connect(h.port, P001, &tok);
    send_json(&mut s001, &json!({"type": "subscribe", "topic": "device:d1"}));
    assert_eq!(recv_json(&mut s001, T)["type"], "subscribed");
    let mut s002 = connect(h.port, P002, &tok);
    send_json(&mut s002, &json!({"type": "subscribe_project", "project_id": 5}));
    barrier(&mut s002);
    let mut s000 = connect_000(h.port, &tok);
    send_json(&mut s000, &json!({"type": "subscribe", "topic": "news"}));
    assert_eq!(recv_json(&mut s000, T)["type"], "subscribed");

    // Redis PUBLISH topic_noti:{topic}
    for (channel, ws) in [
        ("topic_noti:tenant:t1", &mut tenant),
        ("topic_noti:workspace:9", &mut tasks),
        ("topic_noti:device:d1", &mut s001),
        ("topic_noti:project:5", &mut s002),
    ] {
        let payload = json!({"type": "via_redis", "channel": channel}).to_string();
        redis.publish_until_received(channel, &payload, T);
        let m = recv_json(ws, T);
        assert_eq!(m["channel"], channel, "{m}");
        assert!(is_rfc3339_millis_utc(m["timestamp"].as_str().unwrap_or("")), "timestamp added: {m}");
    }
    // POST /publish {"topic"} through Redis
    publish_until_sent(&h, &json!({"topic": "news", "message": {"type": "via_http"}}));
    assert_eq!(recv_json(&mut s000, T)["type"], "via_http");
    // seed 001 /notify through Redis
    let body = json!({"user_id": "r1", "title": "t", "message": "m", "type": "success"});
    let ok = wait_until(T, || post_ok(&h, "/notify", Some(API_KEY), &body)["sent"] == true);
    assert!(ok, "/notify never reported sent:true");
    // (every personal connection of r1 gets it, whatever its dialect path)
    for ws in [&mut s001, &mut s002, &mut s000] {
        let m = strip_timestamp(recv_json(ws, T));
        assert_eq!(m, json!({"channel": "notifications", "title": "t", "message": "m", "type": "success"}));
    }
    // nothing crossed over to the topic paths or between subscriptions
    for ws in [&mut tenant, &mut tasks, &mut s001, &mut s002, &mut s000] {
        assert_no_message(ws, Duration::from_millis(100));
    }
}

// =======================================================================================
// focus sessions
// =======================================================================================

fn focus_update(session: &str, sender: Value, data: Value) -> Value {
    json!({"type": "focus_session_update", "session_id": session, "sender_id": sender, "data": data})
}

#[test]
fn focus_session_relays_objects_to_other_members_never_to_the_sender() {
    let h = start();
    let path = "/ws/focus-session/123";
    let mut a = connect(h.port, path, &token_topics("101", &["focus-session:*"]));
    let mut a_tab = connect(h.port, path, &token_topics("101", &["focus-session:123"]));
    let mut b = connect(h.port, path, &token_topics("102", &["focus-session:123"]));
    let mut c = connect(h.port, path, &token_topics("alice", &["focus-session:123"]));
    let mut other_session = connect(h.port, "/ws/focus-session/456", &token_topics("103", &["focus-session:456"]));
    h.wait_active_connections(5, T);

    let data = json!({"cursor": 3, "note": "hi", "nested": {"ok": true}});
    send_json(&mut a, &data);
    let want = focus_update("123", json!(101), data.clone());
    for (label, ws) in [("b", &mut b), ("c", &mut c), ("a's other tab", &mut a_tab)] {
        assert_eq!(without_timestamp(recv_json(ws, T)), want, "{label}");
    }
    assert_no_message(&mut a, QUIET);
    assert_no_message(&mut other_session, Duration::from_millis(100));

    // a non-numeric sender id stays a string
    send_json(&mut c, &json!({"state": "paused"}));
    let want = focus_update("123", json!("alice"), json!({"state": "paused"}));
    for ws in [&mut a, &mut a_tab, &mut b] {
        assert_eq!(without_timestamp(recv_json(ws, T)), want);
    }
    assert_no_message(&mut c, QUIET);
    assert_no_message(&mut other_session, Duration::from_millis(100));
}

#[test]
fn focus_session_relay_through_redis_is_not_echoed_to_the_sender() {
    let redis = Redis::start();
    let h = herald().api_key().redis(&redis).start();
    let path = "/ws/focus-session/s7";
    let mut a = connect(h.port, path, &token_topics("201", &["focus-session:s7"]));
    let mut b = connect(h.port, path, &token_topics("202", &["focus-session:s7"]));
    redis.wait_subscribers(1, Duration::from_secs(10));
    send_json(&mut a, &json!({"step": 1}));
    assert_eq!(without_timestamp(recv_json(&mut b, T)), focus_update("s7", json!(201), json!({"step": 1})));
    assert_no_message(&mut a, Duration::from_millis(800));
    send_json(&mut b, &json!({"step": 2}));
    assert_eq!(without_timestamp(recv_json(&mut a, T)), focus_update("s7", json!(202), json!({"step": 2})));
    assert_no_message(&mut b, Duration::from_millis(800));
}

#[test]
fn focus_session_relay_crosses_two_instances_sharing_redis() {
    let redis = Redis::start();
    let h1 = herald().api_key().redis(&redis).start();
    let h2 = herald().api_key().redis(&redis).start();
    let path = "/ws/focus-session/77";
    let claim = ["focus-session:77"];
    let mut a = connect(h1.port, path, &token_topics("301", &claim));
    let mut c = connect(h1.port, path, &token_topics("303", &claim));
    let mut b = connect(h2.port, path, &token_topics("302", &claim));
    redis.wait_subscribers(2, Duration::from_secs(10));
    send_json(&mut a, &json!({"timer": 25}));
    let want = focus_update("77", json!(301), json!({"timer": 25}));
    assert_eq!(without_timestamp(recv_json(&mut b, T)), want, "member on the other instance");
    assert_eq!(without_timestamp(recv_json(&mut c, T)), want, "member on the same instance");
    assert_no_message(&mut a, Duration::from_millis(800));
    send_json(&mut b, &json!({"timer": 5}));
    let want = focus_update("77", json!(302), json!({"timer": 5}));
    assert_eq!(without_timestamp(recv_json(&mut a, T)), want);
    assert_eq!(without_timestamp(recv_json(&mut c, T)), want);
    assert_no_message(&mut b, Duration::from_millis(800));
}

// =======================================================================================
// HTTP API: /notify (seed 001)
// =======================================================================================

#[test]
fn notify_delivers_seed001_shape_to_every_connection_and_reports_sent() {
    let h = start();
    let tok = token_claims(json!({"user_id": "123", "username": "alice", "exp": now_secs() + 3600}));
    let mut tab1 = connect(h.port, P001, &tok);
    let mut tab2 = connect(h.port, P001, &tok);
    let mut stranger = connect(h.port, P001, &token("124"));
    let body = json!({"user_id": "123", "title": "New alert", "message": "An anomaly was detected in sensor X", "type": "warning"});
    let v = post_ok(&h, "/notify", Some(API_KEY), &body);
    assert_eq!(v, json!({"status": "success", "sent": true}));
    let want = json!({"channel": "notifications", "title": "New alert",
                      "message": "An anomaly was detected in sensor X", "type": "warning"});
    for ws in [&mut tab1, &mut tab2] {
        let m = recv_json(ws, T);
        assert_eq!(sorted_keys(&m), ["channel", "message", "timestamp", "title", "type"], "{m}");
        assert_timestamp_is_now(m["timestamp"].as_str().unwrap(), 30.0);
        assert_eq!(strip_timestamp(m), want);
    }
    assert_no_message(&mut stranger, Duration::from_millis(200));
    // numeric user id in the body
    let v =
        post_ok(&h, "/notify", Some(API_KEY), &json!({"user_id": 123, "title": "a", "message": "b", "type": "info"}));
    assert_eq!(v["sent"], true);
    assert_eq!(recv_json(&mut tab1, T)["title"], "a");
    // nobody connected: sent false
    let v =
        post_ok(&h, "/notify", Some(API_KEY), &json!({"user_id": "999", "title": "a", "message": "b", "type": "info"}));
    assert_eq!(v, json!({"status": "success", "sent": false}));
}

// =======================================================================================
// HTTP API: seed 004 events
// =======================================================================================

#[test]
fn events_task_reaches_target_users_and_workspace_topic() {
    let h = start();
    let mut u101 = connect(h.port, P001, &token("101"));
    let mut u102 = connect(h.port, P001, &token("102"));
    let mut u103 = connect(h.port, P001, &token("103"));
    let mut member = connect(h.port, "/ws/tasks/789", &token_topics("104", &["workspace:789"]));
    let mut other_ws = connect(h.port, "/ws/tasks/790", &token_topics("105", &["workspace:790"]));
    let body = json!({"task_id": 456, "title": "Task Title", "action": "updated", "workspace_id": 789,
                      "target_user_ids": [101, 102]});
    let v = post_ok(&h, EV_TASK, Some(API_KEY), &body);
    assert_eq!(v, json!({"status": "notifications sent", "recipient_count": 2}));
    let m1 = seed004(recv_json(&mut u101, T));
    assert_eq!(m1["title"], "Task Title");
    assert_eq!(m1["content"], "Task 'Task Title' was updated");
    assert_eq!(m1["notification_type"], "task");
    assert_eq!(m1["related_entity_type"], "task");
    assert_eq!(m1["related_entity_id"], 456);
    assert_eq!(sorted_keys(&m1["data"]), ["action", "actor_id", "task_id", "workspace_id"], "{m1}");
    assert_eq!(m1["data"]["task_id"], 456);
    assert_eq!(m1["data"]["action"], "updated");
    assert_eq!(m1["data"]["workspace_id"], 789);
    let m2 = seed004(recv_json(&mut u102, T));
    let m3 = seed004(recv_json(&mut member, T));
    assert_eq!(m2, m1, "every target gets the same message");
    assert_eq!(m3, m1, "the workspace topic gets the same message");
    assert_no_message(&mut u103, QUIET);
    assert_no_message(&mut other_ws, Duration::from_millis(100));

    // notification ids are unique
    let v = post_ok(
        &h,
        EV_TASK,
        Some(API_KEY),
        &json!({"task_id": 457, "title": "Other", "action": "created", "target_user_ids": ["101"]}),
    );
    assert_eq!(v, json!({"status": "notifications sent", "recipient_count": 1}));
    let n = seed004(recv_json(&mut u101, T));
    assert_eq!(n["content"], "Task 'Other' was created");
    assert_ne!(n["notification_id"], m1["notification_id"], "notification_id must be unique");
    assert_no_message(&mut member, Duration::from_millis(200)); // no workspace_id: no topic
}

#[test]
fn events_task_defaults_to_the_callers_own_user_and_user_tokens_target_only_themselves() {
    let h = start();
    let mut u101 = connect(h.port, P001, &token("101"));
    let mut u102 = connect(h.port, P001, &token("102"));
    // a publisher token with no targets: its own user, actor_id = caller
    let publisher = token_publisher("101", &[]);
    let v =
        post_ok(&h, EV_TASK, Some(&publisher), &json!({"task_id": 7, "title": "Write docs", "action": "completed"}));
    assert_eq!(v, json!({"status": "notifications sent", "recipient_count": 1}));
    let m = seed004(recv_json(&mut u101, T));
    assert_eq!(m["content"], "Task 'Write docs' was completed");
    assert_eq!(m["data"]["actor_id"], 101, "actor_id is the caller (a number when numeric): {m}");
    assert_eq!(m["data"]["task_id"], 7);
    assert_no_message(&mut u102, Duration::from_millis(200));

    // seed 004's frontend example: a plain user token, empty target list → itself
    let user = token("102");
    let v = post_ok(
        &h,
        EV_TASK,
        Some(&user),
        &json!({"task_id": 8, "title": "Mine", "action": "updated", "target_user_ids": []}),
    );
    assert_eq!(v, json!({"status": "notifications sent", "recipient_count": 1}));
    let m = seed004(recv_json(&mut u102, T));
    assert_eq!(m["data"]["actor_id"], 102);
    assert_no_message(&mut u101, Duration::from_millis(200));

    // a plain user may target itself explicitly, not others
    let v = post_ok(
        &h,
        EV_TASK,
        Some(&user),
        &json!({"task_id": 9, "title": "Me", "action": "updated", "target_user_ids": [102]}),
    );
    assert_eq!(v["recipient_count"], 1);
    assert_eq!(seed004(recv_json(&mut u102, T))["title"], "Me");
    let r = post_json(
        &h,
        EV_TASK,
        Some(&user),
        &json!({"task_id": 10, "title": "Them", "action": "updated", "target_user_ids": [101]}),
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert_no_message(&mut u101, QUIET);
}

#[test]
fn events_workspace_goes_to_the_topic_minus_excluded_users() {
    let h = start();
    let claim = ["workspace:*"];
    let mut m101 = connect(h.port, "/ws/tasks/789", &token_topics("101", &claim));
    let mut m102 = connect(h.port, "/ws/tasks/789", &token_topics("102", &claim));
    // subscribers on personal paths
    let mut p101 = connect(h.port, P001, &token_topics("101", &claim));
    send_json(&mut p101, &json!({"type": "subscribe", "topic": "workspace:789"}));
    assert_eq!(recv_json(&mut p101, T)["type"], "subscribed");
    let mut p103 = connect(h.port, P002, &token_topics("103", &claim));
    send_json(&mut p103, &json!({"type": "subscribe", "topic": "workspace:789"}));
    assert_eq!(recv_json(&mut p103, T)["type"], "subscribed");
    let mut outsider = connect(h.port, "/ws/tasks/790", &token_topics("104", &claim));

    let body = json!({"workspace_id": 789, "title": "Workspace Update", "content": "The workspace has been updated.",
                      "type": "workspace", "related_entity_type": "workspace", "related_entity_id": 789,
                      "data": {"k": 1}, "exclude_user_ids": [101]});
    let v = post_ok(&h, EV_WORKSPACE, Some(API_KEY), &body);
    assert_eq!(v, json!({"status": "workspace notification sent"}));
    let a = seed004(recv_json(&mut m102, T));
    assert_eq!(a["title"], "Workspace Update");
    assert_eq!(a["content"], "The workspace has been updated.");
    assert_eq!(a["notification_type"], "workspace");
    assert_eq!(a["related_entity_type"], "workspace");
    assert_eq!(a["related_entity_id"], 789);
    assert_eq!(a["data"], json!({"k": 1}));
    assert_eq!(seed004(recv_json(&mut p103, T)), a);
    assert_no_message(&mut m101, QUIET);
    assert_no_message(&mut p101, Duration::from_millis(100));
    assert_no_message(&mut outsider, Duration::from_millis(100));

    // type defaults to "workspace"; a given type becomes notification_type; no exclusion: all
    let v = post_ok(&h, EV_WORKSPACE, Some(API_KEY), &json!({"workspace_id": "789", "title": "t", "content": "c"}));
    assert_eq!(v, json!({"status": "workspace notification sent"}));
    for ws in [&mut m101, &mut m102, &mut p101, &mut p103] {
        assert_eq!(seed004(recv_json(ws, T))["notification_type"], "workspace");
    }
    post_ok(
        &h,
        EV_WORKSPACE,
        Some(API_KEY),
        &json!({"workspace_id": 789, "title": "t", "content": "c", "type": "announcement"}),
    );
    assert_eq!(seed004(recv_json(&mut m101, T))["notification_type"], "announcement");
    assert_no_message(&mut outsider, Duration::from_millis(100));
}

#[test]
fn events_workspace_exclusion_holds_on_every_instance_through_redis() {
    let redis = Redis::start();
    let h1 = herald().api_key().redis(&redis).start();
    let h2 = herald().api_key().redis(&redis).start();
    let claim = ["workspace:789"];
    let path = "/ws/tasks/789";
    let mut a101 = connect(h1.port, path, &token_topics("101", &claim));
    let mut a102 = connect(h1.port, path, &token_topics("102", &claim));
    let mut b101 = connect(h2.port, path, &token_topics("101", &claim));
    let mut b102 = connect(h2.port, path, &token_topics("102", &claim));
    redis.wait_subscribers(2, Duration::from_secs(10));

    let body = json!({"workspace_id": 789, "title": "Excl", "content": "not for 101", "exclude_user_ids": [101]});
    let v = post_ok(&h1, EV_WORKSPACE, Some(API_KEY), &body);
    assert_eq!(v, json!({"status": "workspace notification sent"}));
    let x = seed004(recv_json(&mut a102, T)); // key check: the exclusion was stripped
    let y = seed004(recv_json(&mut b102, T));
    assert_eq!(x, y, "both instances deliver the same message");
    assert_eq!(x["content"], "not for 101");
    assert_no_message(&mut a101, QUIET);
    assert_no_message(&mut b101, Duration::from_millis(100));

    // the other way round, published through the second instance, ids as strings
    let body = json!({"workspace_id": 789, "title": "Excl2", "content": "not for 102", "exclude_user_ids": ["102"]});
    post_ok(&h2, EV_WORKSPACE, Some(API_KEY), &body);
    assert_eq!(seed004(recv_json(&mut a101, T))["content"], "not for 102");
    assert_eq!(seed004(recv_json(&mut b101, T))["content"], "not for 102");
    assert_no_message(&mut a102, QUIET);
    assert_no_message(&mut b102, Duration::from_millis(100));
}

#[test]
fn events_system_shape_defaults_and_permissions() {
    let h = start();
    let mut u101 = connect(h.port, P001, &token("101"));
    let mut u102 = connect(h.port, P001, &token("102"));
    let body = json!({"title": "System Notification", "content": "Important system message.", "user_id": 101,
                      "data": {"x": 1}});
    let v = post_ok(&h, EV_SYSTEM, Some(API_KEY), &body);
    assert_eq!(v, json!({"status": "system notification sent"}));
    let m = seed004(recv_json(&mut u101, T));
    assert_eq!(m["notification_type"], "system");
    assert_eq!(m["title"], "System Notification");
    assert_eq!(m["content"], "Important system message.");
    assert_eq!(m["data"], json!({"x": 1}));
    assert_no_message(&mut u102, Duration::from_millis(200));

    // default: the caller's own user
    let user = token("102");
    let v = post_ok(&h, EV_SYSTEM, Some(&user), &json!({"title": "Mine", "content": "c"}));
    assert_eq!(v, json!({"status": "system notification sent"}));
    assert_eq!(seed004(recv_json(&mut u102, T))["title"], "Mine");
    // a plain user may not address another user
    let r = post_json(&h, EV_SYSTEM, Some(&user), &json!({"title": "x", "content": "c", "user_id": 101}));
    assert_eq!(r.status, 403, "{}", r.text());
    // a publish-scope token may
    let v = post_ok(
        &h,
        EV_SYSTEM,
        Some(&token_publisher("svc", &[])),
        &json!({"title": "P", "content": "c", "user_id": "101"}),
    );
    assert_eq!(v, json!({"status": "system notification sent"}));
    assert_eq!(seed004(recv_json(&mut u101, T))["title"], "P");
    assert_no_message(&mut u101, Duration::from_millis(200));
}

// =======================================================================================
// HTTP API: auth and validation
// =======================================================================================

#[test]
fn publish_api_auth_is_required_and_bad_bodies_are_400() {
    let now = now_secs();
    // (path, valid body, bodies missing a required field)
    let endpoints: Vec<(&str, Value, Vec<Value>)> = vec![
        (
            "/publish",
            json!({"user_id": "u1", "message": {"type": "x"}}),
            vec![json!({"user_id": "u1"}), json!({"message": {"type": "x"}})],
        ),
        (
            "/notify",
            json!({"user_id": "u1", "title": "t", "message": "m", "type": "info"}),
            vec![json!({"user_id": "u1", "message": "m", "type": "info"}), json!({"title": "t", "message": "m"})],
        ),
        (
            EV_TASK,
            json!({"task_id": 1, "title": "t", "action": "created", "target_user_ids": ["u1"]}),
            vec![json!({"title": "t", "action": "created", "target_user_ids": ["u1"]})],
        ),
        (
            EV_WORKSPACE,
            json!({"workspace_id": 1, "title": "t", "content": "c"}),
            vec![json!({"workspace_id": 1, "title": "t"}), json!({"title": "t", "content": "c"})],
        ),
        (
            EV_SYSTEM,
            json!({"title": "t", "content": "c", "user_id": "u1"}),
            vec![json!({"content": "c", "user_id": "u1"})],
        ),
        ("/api/disconnect", json!({"user_id": "u1"}), vec![json!({})]),
    ];
    let wrong_secret = token_hs256(&json!({"sub": "u1", "exp": now + 3600, "scope": "publish"}), "other-secret");
    let expired = token_claims(json!({"sub": "u1", "iat": now - 7200, "exp": now - 3600, "scope": "publish"}));
    for (path, valid, missing) in &endpoints {
        // One herald per endpoint: failed authentications are rate-limited per address (20).
        let h = start();
        let body = valid.to_string();
        let r = post(&h, path, None, body.as_bytes());
        assert_eq!(r.status, 401, "{path} without auth: {}", r.text());
        for (label, bad) in [
            ("garbage bearer", "garbage"),
            ("wrong API key", "not-the-api-key"),
            ("wrong-secret JWT", &wrong_secret),
            ("expired JWT", &expired),
        ] {
            let r = post(&h, path, Some(bad), body.as_bytes());
            assert_eq!(r.status, 401, "{path} with {label}: {}", r.text());
        }
        let r = h.http("POST", path, &[("Authorization", "Basic dXNlcjpwYXNz")], body.as_bytes());
        assert_eq!(r.status, 401, "{path} with Basic auth: {}", r.text());
        // bad JSON, missing fields
        for bad_json in [&b"{\"user_id\":"[..], b"not json", b""] {
            let r = post(&h, path, Some(API_KEY), bad_json);
            assert_api_error(&r, 400, &format!("{path} with body {:?}", String::from_utf8_lossy(bad_json)));
        }
        for m in missing {
            let r = post_json(&h, path, Some(API_KEY), m);
            assert_api_error(&r, 400, &format!("{path} with {m}"));
        }
        // valid: API key and publish-scope JWT
        let r = post_json(&h, path, Some(API_KEY), valid);
        assert_eq!(r.status, 200, "{path} with the API key: {}", r.text());
        let r = post_json(&h, path, Some(&token_publisher("svc", &[])), valid);
        assert_eq!(r.status, 200, "{path} with a publish-scope token: {}", r.text());
    }
}

#[test]
fn plain_user_token_may_publish_to_itself_only() {
    let h = start();
    let mut me = connect(h.port, P001, &token("u1"));
    let mut other = connect(h.port, P001, &token("u2"));
    let user = token("u1");
    let v = post_ok(&h, "/publish", Some(&user), &json!({"user_id": "u1", "message": {"type": "self"}}));
    assert_eq!(v, json!({"status": "success", "sent": true}));
    assert_eq!(recv_json(&mut me, T)["type"], "self");
    let v =
        post_ok(&h, "/notify", Some(&user), &json!({"user_id": "u1", "title": "t", "message": "m", "type": "info"}));
    assert_eq!(v["sent"], true);
    assert_eq!(recv_json(&mut me, T)["channel"], "notifications");
    for (path, body) in [
        ("/publish", json!({"user_id": "u2", "message": {"type": "x"}})),
        ("/publish", json!({"user_ids": ["u1", "u2"], "message": {"type": "x"}})),
        ("/publish", json!({"topic": "news", "message": {"type": "x"}})),
        ("/notify", json!({"user_id": "u2", "title": "t", "message": "m", "type": "info"})),
        (EV_WORKSPACE, json!({"workspace_id": 1, "title": "t", "content": "c"})),
        ("/api/disconnect", json!({"user_id": "u2"})),
    ] {
        let r = post_json(&h, path, Some(&user), &body);
        assert_eq!(r.status, 403, "plain user token, {path} {body}: {}", r.text());
    }
    assert_no_message(&mut other, QUIET);
    assert_alive(&mut other);
    // a publish-scope token may address anyone
    let v = post_ok(
        &h,
        "/publish",
        Some(&token_publisher("svc", &[])),
        &json!({"user_id": "u2", "message": {"type": "p"}}),
    );
    assert_eq!(v["sent"], true);
    assert_eq!(recv_json(&mut other, T)["type"], "p");
}

// =======================================================================================
// GET /
// =======================================================================================

#[test]
fn demo_page_is_self_contained_html() {
    let h = start();
    let r = h.http("GET", "/", &[], b"");
    assert_eq!(r.status, 200);
    let ct = r.header("content-type").unwrap_or("").to_ascii_lowercase();
    assert!(ct.starts_with("text/html"), "content-type {ct:?}");
    let body = r.text();
    let lower = body.to_ascii_lowercase();
    assert!(lower.contains("<html") && lower.contains("</html>"), "not an HTML page");
    assert!(lower.contains("websocket"), "the demo page should connect a WebSocket");
    // no external assets: no src/href pointing at http(s):// or protocol-relative //
    for attr in ["src=", "href="] {
        let mut rest = lower.as_str();
        while let Some(i) = rest.find(attr) {
            let value = rest[i + attr.len()..].trim_start_matches(['"', '\'', ' ']);
            for scheme in ["http://", "https://", "//"] {
                assert!(!value.starts_with(scheme), "external asset: {attr}{}", &value[..value.len().min(60)]);
            }
            rest = &rest[i + attr.len()..];
        }
    }
    assert!(!lower.contains("@import"), "CSS @import of an external asset");
    assert!(!lower.contains("url(http") && !lower.contains("url('http") && !lower.contains("url(\"http"));
}

// =======================================================================================
// the seeds' own client code (tests/seed_clients/)
// =======================================================================================

fn node_or_skip(test: &str) -> bool {
    match node_missing() {
        None => true,
        Some(why) => {
            skip_loudly(test, &format!("{why}; needs node >= 20 (`node --experimental-websocket`)"));
            false
        }
    }
}

#[test]
fn seed000_javascript_client_runs_against_herald() {
    if !node_or_skip("seed000_javascript_client_runs_against_herald") {
        return;
    }
    let h = start();
    let host = format!("127.0.0.1:{}", h.port);
    // a bad token: the upgrade succeeds, then the seed's onclose sees 4401
    let mut bad = Script::node("seed000_client.js", &[("HERALD_HOST", &host), ("HERALD_TOKEN", "not-a-jwt")]);
    bad.expect(&["Connected to notifications"], T);
    bad.expect(&["Disconnected:", "4401"], T);
    drop(bad);

    let tok = token("js000");
    let env = [("HERALD_HOST", host.as_str()), ("HERALD_TOKEN", tok.as_str()), ("SEED_TIME_SCALE", "0.01")];
    let mut s = Script::node("seed000_client.js", &env);
    s.expect(&["Connected to notifications"], T);
    s.expect(&["Connection confirmed"], T);
    // the seed's three message examples, published to the user
    let examples = [
        json!({"type": "task_update", "timestamp": "2024-01-14T16:00:00Z",
               "data": {"task_id": "task_123", "status": "completed", "title": "Screenshot Task"}}),
        json!({"type": "device_status", "timestamp": "2024-01-14T16:00:00Z",
               "data": {"device_id": "device-uuid", "device_name": "MacBook Pro", "status": "online"}}),
        json!({"type": "approval_needed", "timestamp": "2024-01-14T16:00:00Z",
               "data": {"task_id": "task_456", "title": "High Risk Task",
                        "risk_reasons": ["file_system_access", "sensitive_file"]}}),
    ];
    for m in &examples {
        assert!(publish_key(&h, &json!({"user_id": "js000", "message": m})));
    }
    s.expect(&["updateTaskStatus", r#""task_id":"task_123""#, r#""status":"completed""#], T);
    s.expect(&["updateDeviceStatus", r#""device_name":"MacBook Pro""#, r#""status":"online""#], T);
    s.expect(&["showApprovalRequest", r#""risk_reasons":["file_system_access","sensitive_file"]"#], T);
    // "Heartbeat Implementation": text ping every 25 s (scaled) → "pong"
    s.command("heartbeat");
    s.expect(&["Heartbeat received"], T);
    // "Reconnection Logic": after a 4401 close it reconnects
    s.command("reconnecting");
    s.expect(&["harness: retrying socket open"], T);
    h.wait_active_connections(2, T);
    let v = post_ok(&h, "/api/disconnect", Some(API_KEY), &json!({"user_id": "js000"}));
    assert_eq!(v, json!({"status": "success", "closed": 2}));
    s.expect(&["Disconnected:", "4401"], T);
    s.expect(&["harness: retrying socket closed 4401"], T);
    h.wait_active_connections(1, T); // connectWithRetry came back
}

#[test]
fn seed001_javascript_client_runs_against_herald() {
    if !node_or_skip("seed001_javascript_client_runs_against_herald") {
        return;
    }
    let h = start();
    let host = format!("127.0.0.1:{}", h.port);
    let mut bad = Script::node(
        "seed001_client.js",
        &[("HERALD_HOST", &host), ("HERALD_TOKEN", "not-a-jwt"), ("SEED_TIME_SCALE", "0.01")],
    );
    bad.expect(&["harness: open"], T);
    bad.expect(&["Authentication failed, get new token"], T);
    bad.expect_none("Attempting to reconnect", Duration::from_millis(300));
    drop(bad);

    // seed 001's token claims: user_id + username
    let tok = token_claims(json!({"user_id": 123, "username": "alice", "exp": now_secs() + 3600}));
    let env = [("HERALD_HOST", host.as_str()), ("HERALD_TOKEN", tok.as_str()), ("SEED_TIME_SCALE", "0.01")];
    let mut s = Script::node("seed001_client.js", &env);
    s.expect(&["harness: open"], T);
    s.expect(&["harness: pong received"], T); // the seed's {"action":"ping"} heartbeat
    // the seed's /notify payload
    let v = post_ok(
        &h,
        "/notify",
        Some(API_KEY),
        &json!({"user_id": "123", "title": "New alert", "message": "An anomaly was detected in sensor X", "type": "warning"}),
    );
    assert_eq!(v, json!({"status": "success", "sent": true}));
    s.expect(
        &[
            "displayInAppNotification",
            r#""title":"New alert""#,
            r#""message":"An anomaly was detected in sensor X""#,
            r#""type":"warning""#,
        ],
        T,
    );
    s.expect(&["saveNotificationToHistory New alert"], T);
    let acked = metric(&h, "messages", "acked");
    s.command("ack");
    assert!(wait_until(T, || metric(&h, "messages", "acked") > acked), "the seed's ack was not counted");
    // disconnect: 1008, which the seed treats as "get a new token" (no reconnect)
    let v = post_ok(&h, "/api/disconnect", Some(API_KEY), &json!({"user_id": 123}));
    assert_eq!(v, json!({"status": "success", "closed": 1}));
    s.expect(&["Authentication failed, get new token"], T);
    s.expect_none("Attempting to reconnect", Duration::from_millis(300));
}

#[test]
fn seed002_javascript_client_runs_against_herald() {
    if !node_or_skip("seed002_javascript_client_runs_against_herald") {
        return;
    }
    let h = start();
    let host = format!("127.0.0.1:{}", h.port);
    let mut bad = Script::node("seed002_client.js", &[("HERALD_HOST", &host), ("HERALD_TOKEN", "not-a-jwt")]);
    // (node 20's WebSocket fires `error` on a refused handshake, and never `close`)
    bad.expect(&["harness: error event"], T);
    bad.expect_none("harness: open", Duration::from_millis(200));
    drop(bad);

    let tok = token_topics("202", &["project:*"]);
    let mut s = Script::node("seed002_client.js", &[("HERALD_HOST", &host), ("HERALD_TOKEN", &tok)]);
    s.expect(&["harness: open"], T);
    s.expect(&["harness: pong"], T); // after wsService.subscribe(123)
    assert!(publish_key(&h, &json!({"topic": "project:123", "message": seed002_milestone("Sprint Planning")})));
    s.expect(&["Milestone Created: Milestone 'Sprint Planning' has been created"], T);
    s.command("unsubscribe");
    s.expect(&["harness: pong"], T);
    assert!(!publish_key(&h, &json!({"topic": "project:123", "message": seed002_milestone("Later")})));
    s.expect_none("Milestone 'Later'", QUIET);
}

#[test]
fn seed004_javascript_client_runs_against_herald() {
    if !node_or_skip("seed004_javascript_client_runs_against_herald") {
        return;
    }
    let h = start();
    let host = format!("127.0.0.1:{}", h.port);
    // the seed's frontend posts with the user's own JWT: herald lets a user target itself
    let tok = token("101");
    let mut s = Script::node("seed004_client.js", &[("HERALD_HOST", &host), ("HERALD_TOKEN", &tok)]);
    s.expect(&["Connected to notification websocket"], T);
    s.command("send"); // sendTaskEvent(456, "Task Title", "updated")
    s.expect(&["Event sent:", "notifications sent", "recipient_count: 1"], T);
    s.expect(&["harness: showNotification Task Title | Task 'Task Title' was updated | task"], T);
}

#[test]
fn seed004_python_client_runs_against_herald() {
    if let Some(why) = python_missing() {
        skip_loudly(
            "seed004_python_client_runs_against_herald",
            &format!("{why}; install with: python3 -m pip install websocket-client requests"),
        );
        return;
    }
    let h = start();
    let host = format!("127.0.0.1:{}", h.port);
    // a publish-scope token may add workspace_id (a topic) to its task event
    let tok = token_publisher("101", &["workspace:789"]);
    let mut cmd = Command::new("python3");
    cmd.arg(seed_client("seed004_websocket_client_test.py")).arg(&tok).arg("789").env("HERALD_HOST", &host);
    let mut s = Script::spawn(cmd, "seed004_websocket_client_test.py");
    let status = s.wait_exit(Duration::from_secs(20));
    let out = s.output();
    assert!(status.success(), "python client failed ({status}):\n{out}");
    assert!(out.contains("heartbeat answer: {\"action\": \"pong\"}"), "{out}");
    assert!(out.contains("event response: 200"), "{out}");
    assert!(out.contains("workspace task received"), "{out}");
    assert!(out.contains("done"), "{out}");
}
