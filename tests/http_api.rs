//! HTTP API on the WebSocket port: /health, /metrics, POST /publish (embedded broker).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(5);

fn counter(m: &Value, section: &str, name: &str) -> i64 {
    m[section][name].as_i64().unwrap_or_else(|| panic!("metrics has no integer {section}.{name}: {m}"))
}

// ----------------------------------------------------------------------------- /health

#[test]
fn health_in_embedded_mode_is_healthy_with_embedded_broker() {
    let h = herald().start();
    let r = h.health();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("content-type").unwrap_or("").starts_with("application/json"), "{:?}", r.headers);
    let v = r.json();
    assert_eq!(v["status"], "healthy", "{v}");
    assert_eq!(v["redis"]["status"], "embedded", "{v}");
    assert_timestamp_is_now(v["timestamp"].as_str().expect("timestamp string"), 30.0);
    assert_eq!(v["websocket"]["active_connections"], 0);
    assert_eq!(v["websocket"]["total_unique_users"], 0);
    assert!(v["uptime_seconds"].is_u64(), "uptime_seconds must be an integer: {v}");
    assert_keys(&v, &["status", "timestamp", "redis", "websocket", "uptime_seconds", "instance"]);
    assert!(v["instance"].as_str().is_some_and(|i| i.len() == 16 && i.bytes().all(|b| b.is_ascii_hexdigit())), "{v}");
    assert_keys(&v["websocket"], &["active_connections", "total_unique_users"]);
}

/// The object has exactly these keys (seed 003 §2 is the exact shape of /health, plus
/// `instance` from SPEC §8).
fn assert_keys(v: &Value, keys: &[&str]) {
    let mut got: Vec<&str> =
        v.as_object().unwrap_or_else(|| panic!("not an object: {v}")).keys().map(|k| k.as_str()).collect();
    got.sort();
    let mut want = keys.to_vec();
    want.sort();
    assert_eq!(got, want, "keys of {v}");
}

#[test]
fn health_with_redis_reports_connected_and_ping_ms() {
    let redis = Redis::start();
    let h = herald().redis(&redis).start();
    let mut v = Value::Null;
    let ok = wait_until(T, || {
        v = h.health_json();
        v["redis"]["status"] == "connected"
    });
    assert!(ok, "redis never reported connected: {v}");
    let r = h.health();
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["status"], "healthy");
    let ping = v["redis"]["ping_ms"].as_f64().unwrap_or_else(|| panic!("ping_ms must be a number: {v}"));
    assert!((0.0..1000.0).contains(&ping), "ping_ms {ping}");
    assert_keys(&v, &["status", "timestamp", "redis", "websocket", "uptime_seconds", "instance"]);
    assert_keys(&v["redis"], &["status", "ping_ms"]);
}

#[test]
fn health_counts_connections_and_unique_users() {
    let h = herald().start();
    let a1 = h.ws(&token("u1"));
    let a2 = h.ws(&token("u1"));
    let mut b = h.ws(&token("u2"));
    h.wait_active_connections(3, T);
    h.wait_unique_users(2, Duration::from_secs(2));
    let m = h.metrics();
    assert_eq!(m["connections"]["active"], 3, "{m}");
    assert_eq!(m["connections"]["total_unique_users"], 2, "{m}");
    drop(a1);
    drop(a2);
    h.wait_active_connections(1, T);
    h.wait_unique_users(1, Duration::from_secs(2));
    b.close(None).unwrap();
    let _ = wait_close(&mut b, T);
    h.wait_active_connections(0, T);
    h.wait_unique_users(0, Duration::from_secs(2));
}

#[test]
fn uptime_advances() {
    let h = herald().start();
    let u0 = h.health_json()["uptime_seconds"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    let u1 = h.health_json()["uptime_seconds"].as_u64().unwrap();
    assert!(u1 > u0 && u1 <= u0 + 4, "uptime {u0} -> {u1} over ~2 s");
}

// ----------------------------------------------------------------------------- /metrics

#[test]
fn metrics_json_has_the_seed_shape() {
    let h = herald().start();
    let r = h.http("GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let m = r.json();
    assert!(m["service"].is_string(), "{m}");
    assert_timestamp_is_now(m["timestamp"].as_str().expect("timestamp"), 30.0);
    assert!(m["uptime_seconds"].is_u64(), "{m}");
    assert_eq!(m["connections"]["active"], 0);
    assert_eq!(m["connections"]["total_unique_users"], 0);
    for k in ["received_from_redis", "sent_to_clients", "failed"] {
        assert!(m["messages"][k].is_u64(), "messages.{k} missing: {m}");
    }
}

#[test]
fn metrics_count_deliveries_from_redis() {
    let redis = Redis::start();
    let h = herald().redis(&redis).start();
    redis.wait_subscribers(1, T);
    let mut a1 = h.ws(&token("u1"));
    let mut a2 = h.ws(&token("u1"));
    h.wait_active_connections(2, T);
    let before = h.metrics();
    let mut conn = redis.conn();
    for i in 0..3 {
        conn.publish("user_noti:u1", &json!({"type": "n", "i": i}).to_string());
    }
    for ws in [&mut a1, &mut a2] {
        for i in 0..3 {
            assert_eq!(recv_json(ws, T)["i"], i);
        }
    }
    let mut after = Value::Null;
    let ok = wait_until(T, || {
        after = h.metrics();
        counter(&after, "messages", "sent_to_clients") - counter(&before, "messages", "sent_to_clients") >= 6
    });
    assert!(ok, "sent_to_clients did not grow by 6: {before} -> {after}");
    assert_eq!(
        counter(&after, "messages", "sent_to_clients") - counter(&before, "messages", "sent_to_clients"),
        6,
        "3 messages x 2 connections"
    );
    assert_eq!(
        counter(&after, "messages", "received_from_redis") - counter(&before, "messages", "received_from_redis"),
        3
    );
    assert_eq!(counter(&after, "messages", "failed"), counter(&before, "messages", "failed"));
}

#[test]
fn metrics_count_dropped_invalid_messages() {
    let redis = Redis::start();
    let h = herald().redis(&redis).start();
    redis.wait_subscribers(1, T);
    let mut ws = h.ws(&token("u1"));
    let before = h.metrics();
    let mut conn = redis.conn();
    conn.publish("user_noti:u1", "not json");
    conn.publish("user_noti:u1", "[1]");
    conn.publish("user_noti:u1", r#"{"no":"type"}"#);
    conn.publish("user_noti:u1", &notification("ok").to_string());
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "ok");
    let mut after = Value::Null;
    let ok = wait_until(T, || {
        after = h.metrics();
        after["messages"]["dropped_invalid"].as_i64().unwrap_or(0)
            - before["messages"]["dropped_invalid"].as_i64().unwrap_or(0)
            == 3
    });
    assert!(ok, "messages.dropped_invalid should grow by 3: {before} -> {after}");
    // counters may trail the socket write a little
    let ok = wait_until(Duration::from_secs(2), || {
        after = h.metrics();
        counter(&after, "messages", "sent_to_clients") - counter(&before, "messages", "sent_to_clients") == 1
    });
    assert!(ok, "sent_to_clients should grow by 1 (the valid message only): {before} -> {after}");
}

#[test]
fn metrics_in_prometheus_text_format() {
    let h = herald().api_key().start();
    let mut ws = h.ws(&token("u1"));
    let r = h.publish(Some(API_KEY), &json!({"user_id": "u1", "message": notification("prom")}));
    assert_eq!(r.status, 200);
    recv_json(&mut ws, T);
    // counters may trail the socket write a little: wait for the delivery to be counted
    let mut r = h.http("GET", "/metrics", &[("Accept", "text/plain")], b"");
    wait_until(Duration::from_secs(2), || {
        r = h.http("GET", "/metrics", &[("Accept", "text/plain")], b"");
        r.text().lines().any(|l| l.starts_with("herald_delivery_latency_seconds_count") && !l.ends_with(" 0"))
    });
    assert_eq!(r.status, 200);
    let ct = r.header("content-type").unwrap_or("");
    assert!(ct.starts_with("text/plain"), "content-type {ct:?}");
    let text = r.text();
    let value_of = |name: &str| -> f64 {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find(|l| l.split([' ', '{']).next() == Some(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no sample for {name} in:\n{text}"))
    };
    assert_eq!(value_of("herald_connections_active"), 1.0);
    assert!(value_of("herald_messages_sent_total") >= 1.0);
    value_of("herald_messages_received_total");
    value_of("herald_messages_failed_total");
    assert!(text.contains("herald_delivery_latency_seconds_bucket{le=\""), "no histogram buckets:\n{text}");
    assert!(text.contains("herald_delivery_latency_seconds_bucket{le=\"+Inf\"}"), "no +Inf bucket:\n{text}");
    value_of("herald_delivery_latency_seconds_sum");
    assert!(value_of("herald_delivery_latency_seconds_count") >= 1.0);
    assert!(text.contains("# TYPE herald_delivery_latency_seconds histogram"), "no TYPE line:\n{text}");
    // JSON is still the default
    let j = h.http("GET", "/metrics", &[], b"");
    j.json();
}

// ----------------------------------------------------------------------------- POST /publish

#[test]
fn publish_with_api_key_delivers_in_embedded_mode() {
    let h = herald().api_key().start();
    let mut ws = h.ws(&token("u1"));
    let mut other = h.ws(&token("u2"));
    let r = h.publish(Some(API_KEY), &json!({"user_id": "u1", "message": notification("embedded")}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"status": "success", "sent": true}));
    let m = recv_json(&mut ws, T);
    assert_eq!(strip_timestamp(m), notification("embedded"));
    assert_no_message(&mut other, Duration::from_millis(500));
}

#[test]
fn publish_to_offline_user_reports_sent_false() {
    let h = herald().api_key().start();
    let _ws = h.ws(&token("online"));
    let r = h.publish(Some(API_KEY), &json!({"user_id": "offline", "message": notification("nobody")}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"status": "success", "sent": false}));
}

#[test]
fn publish_user_ids_delivers_to_each_user() {
    let h = herald().api_key().start();
    let mut a = h.ws(&token("a"));
    let mut a2 = h.ws(&token("a"));
    let mut b = h.ws(&token("b"));
    let mut c = h.ws(&token("c"));
    let r = h.publish(Some(API_KEY), &json!({"user_ids": ["a", "b", "nobody"], "message": notification("multi")}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["sent"], true);
    for ws in [&mut a, &mut a2, &mut b] {
        assert_eq!(recv_json(ws, T)["payload"]["title"], "multi");
    }
    assert_no_message(&mut c, Duration::from_millis(500));
    // each recipient got it once
    assert_no_message(&mut a, Duration::from_millis(100));
}

#[test]
fn publish_keeps_an_existing_timestamp() {
    let h = herald().api_key().start();
    let mut ws = h.ws(&token("u1"));
    let msg = json!({"type": "update", "payload": {"entity": "order"}, "timestamp": "2025-01-21T10:30:00.123Z"});
    let r = h.publish(Some(API_KEY), &json!({"user_id": "u1", "message": msg}));
    assert_eq!(r.status, 200);
    assert_eq!(recv_json(&mut ws, T), msg);
}

#[test]
fn publish_without_or_with_wrong_auth_is_401() {
    let h = herald().api_key().start();
    let mut ws = h.ws(&token("u1"));
    let body = json!({"user_id": "u1", "message": notification("nope")});
    assert_eq!(h.publish(None, &body).status, 401);
    assert_eq!(h.publish(Some("wrong-key"), &body).status, 401);
    let bad_jwt = token_hs256(&json!({"sub": "u1", "exp": now_secs() + 60, "scope": "publish"}), "other-secret");
    assert_eq!(h.publish(Some(&bad_jwt), &body).status, 401);
    let expired = token_claims(json!({"sub": "u1", "exp": now_secs() - 100, "scope": "publish"}));
    assert_eq!(h.publish(Some(&expired), &body).status, 401);
    // Basic auth with the key is not a bearer token
    let r = h.http(
        "POST",
        "/publish",
        &[("Authorization", &format!("Basic {API_KEY}")), ("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 401);
    assert_no_message(&mut ws, Duration::from_millis(300));
}

#[test]
fn publish_scope_jwt_may_publish_to_other_users() {
    let h = herald().start();
    let mut ws = h.ws(&token("target"));
    let publisher = token_claims(json!({"sub": "backend", "exp": now_secs() + 600, "scope": "read publish"}));
    let r = h.publish(Some(&publisher), &json!({"user_id": "target", "message": notification("scoped")}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["sent"], true);
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "scoped");
}

#[test]
fn plain_user_jwt_may_publish_to_itself_only() {
    let h = herald().start();
    let mut me = h.ws(&token("me"));
    let mut victim = h.ws(&token("victim"));
    let mine = token("me");
    let r = h.publish(Some(&mine), &json!({"user_id": "me", "message": notification("self")}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(recv_json(&mut me, T)["payload"]["title"], "self");
    let r = h.publish(Some(&mine), &json!({"user_id": "victim", "message": notification("spoof")}));
    assert_eq!(r.status, 403, "{}", r.text());
    let r = h.publish(Some(&mine), &json!({"user_ids": ["me", "victim"], "message": notification("spoof2")}));
    assert_eq!(r.status, 403, "{}", r.text());
    // a scope that merely contains the letters is not the publish scope
    let sneaky = token_claims(json!({"sub": "me", "exp": now_secs() + 600, "scope": "nopublish"}));
    let r = h.publish(Some(&sneaky), &json!({"user_id": "victim", "message": notification("spoof3")}));
    assert_eq!(r.status, 403, "{}", r.text());
    assert_no_message(&mut victim, Duration::from_millis(500));
}

fn assert_400(r: &HttpResponse) {
    assert_eq!(r.status, 400, "body {:?}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "error", "{v}");
    assert!(v["error"].as_str().map(|s| !s.is_empty()).unwrap_or(false), "error string: {v}");
}

#[test]
fn publish_bad_requests_are_400() {
    let h = herald().api_key().start();
    let mut ws = h.ws(&token("u1"));
    let auth = format!("Bearer {API_KEY}");
    let post = |body: &[u8]| {
        h.http("POST", "/publish", &[("Authorization", &auth), ("Content-Type", "application/json")], body)
    };
    assert_400(&post(b"{not json"));
    assert_400(&post(b""));
    assert_400(&post(b"[1,2]"));
    assert_400(&post(json!({"message": notification("no target")}).to_string().as_bytes()));
    assert_400(&post(json!({"user_id": "u1"}).to_string().as_bytes()));
    assert_400(&post(json!({"user_id": "u1", "message": "text"}).to_string().as_bytes()));
    assert_400(&post(json!({"user_id": "u1", "message": {"payload": {}}}).to_string().as_bytes()));
    assert_400(&post(json!({"user_id": "u1", "message": {"type": 3}}).to_string().as_bytes()));
    assert_400(&post(json!({"user_id": "u1", "message": [1]}).to_string().as_bytes()));
    assert_no_message(&mut ws, Duration::from_millis(300));
    // still fine afterwards
    let r = post(json!({"user_id": "u1", "message": notification("good")}).to_string().as_bytes());
    assert_eq!(r.status, 200);
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "good");
}

#[test]
fn publish_oversized_message_is_not_delivered() {
    let h = herald().api_key().start();
    let mut ws = h.ws(&token("u1"));
    let big = json!({"type": "notification", "payload": {"title": "z".repeat(700)}});
    let r = h.publish(Some(API_KEY), &json!({"user_id": "u1", "message": big}));
    assert!(r.status == 400 || r.status == 413 || r.status == 200, "status {}", r.status);
    assert_no_message(&mut ws, Duration::from_millis(500));
}

#[test]
fn publish_counts_in_metrics() {
    let h = herald().api_key().start();
    let mut a = h.ws(&token("u1"));
    let mut b = h.ws(&token("u1"));
    let before = h.metrics();
    for i in 0..3 {
        let r = h.publish(Some(API_KEY), &json!({"user_id": "u1", "message": {"type": "n", "i": i}}));
        assert_eq!(r.status, 200);
    }
    for ws in [&mut a, &mut b] {
        for i in 0..3 {
            assert_eq!(recv_json(ws, T)["i"], i);
        }
    }
    let mut after = Value::Null;
    let ok = wait_until(T, || {
        after = h.metrics();
        counter(&after, "messages", "sent_to_clients") - counter(&before, "messages", "sent_to_clients") == 6
    });
    assert!(ok, "sent_to_clients should grow by 6: {before} -> {after}");
}

// ----------------------------------------------------------------------------- admin

#[test]
fn api_disconnect_closes_every_connection_of_the_user_with_1008() {
    let h = herald().api_key().start();
    let mut a1 = h.ws(&token("kick"));
    let mut a2 = h.ws(&token("kick"));
    let mut b = h.ws(&token("stay"));
    h.wait_active_connections(3, T);
    let body = json!({"user_id": "kick"}).to_string();
    let r = h.http("POST", "/api/disconnect", &[("Content-Type", "application/json")], body.as_bytes());
    assert_eq!(r.status, 401, "disconnect without auth: {}", r.text());
    let auth = format!("Bearer {API_KEY}");
    let r = h.http(
        "POST",
        "/api/disconnect",
        &[("Authorization", &auth), ("Content-Type", "application/json")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"status": "success", "closed": 2}));
    expect_close_code(&mut a1, 1008, T);
    expect_close_code(&mut a2, 1008, T);
    assert_alive(&mut b);
    h.wait_active_connections(1, T);
}

#[test]
fn ack_messages_are_counted() {
    let h = herald().start();
    let mut ws = h.ws(&token("u1"));
    let before = h.metrics();
    ws.send(tungstenite::Message::text(json!({"action": "ack", "notification_id": 17}).to_string())).unwrap();
    ws.send(tungstenite::Message::text(json!({"action": "ack", "notification_id": 18}).to_string())).unwrap();
    assert_no_message(&mut ws, Duration::from_millis(300));
    let mut after = Value::Null;
    let ok = wait_until(Duration::from_secs(2), || {
        after = h.metrics();
        after["messages"]["acked"].as_i64().unwrap_or(0) - before["messages"]["acked"].as_i64().unwrap_or(0) == 2
    });
    assert!(ok, "messages.acked should grow by 2: {before} -> {after}");
}

#[test]
fn root_serves_a_demo_page() {
    let h = herald().start();
    let r = h.http("GET", "/", &[], b"");
    assert_eq!(r.status, 200);
    let ct = r.header("content-type").unwrap_or("");
    assert!(ct.starts_with("text/html"), "content-type {ct:?}");
    let body = r.text();
    assert!(body.contains("/ws") && body.contains("/publish"), "demo page should connect to /ws and publish:\n{body}");
}

// ----------------------------------------------------------------------------- users on any path

#[test]
fn health_counts_users_connected_only_on_topic_paths() {
    let h = herald().start();
    let claims = json!({"sub": "tenant-user", "exp": now_secs() + 600, "topics": ["tenant:t1"]});
    let (resp, _topic_only) =
        raw_upgrade_response(h.port, &format!("/ws/tenant/t1?token={}", token_claims(claims)), &[]);
    assert_eq!(resp.status, 101);
    h.wait_active_connections(1, T);
    h.wait_unique_users(1, Duration::from_secs(2));
    let _personal = h.ws(&token("tenant-user"));
    let _other = h.ws(&token("someone-else"));
    h.wait_active_connections(3, T);
    h.wait_unique_users(2, Duration::from_secs(2));
}

// ----------------------------------------------------------------------------- /publish/batch

fn post_batch(h: &Herald, body: &[u8]) -> HttpResponse {
    let bearer = format!("Bearer {API_KEY}");
    h.http("POST", "/publish/batch", &[("Authorization", &bearer), ("Content-Type", "application/json")], body)
}

#[test]
fn publish_batch_delivers_every_item_and_answers_sent_in_order() {
    let h = herald().api_key().start();
    let mut u1 = h.ws(&token("b1"));
    let mut u2 = h.ws(&token("b2"));
    let items: Vec<Value> = vec![
        json!({"user_id": "b1", "message": notification("one")}),
        json!({"user_id": "nobody", "message": notification("lost")}),
        json!({"user_ids": ["b1", "b2"], "message": notification("both")}),
        json!({"user_id": "b2", "message": notification("two")}),
    ];
    let r = post_batch(&h, json!({ "items": items }).to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"status": "success", "sent": [true, false, true, true]}));
    assert_eq!(recv_json(&mut u1, T)["payload"]["title"], "one");
    assert_eq!(recv_json(&mut u1, T)["payload"]["title"], "both");
    assert_eq!(recv_json(&mut u2, T)["payload"]["title"], "both");
    assert_eq!(recv_json(&mut u2, T)["payload"]["title"], "two");
    assert_no_message(&mut u1, Duration::from_millis(200));
}

#[test]
fn a_bad_batch_item_fails_the_whole_batch_naming_its_index() {
    let h = herald().api_key().start();
    let mut u1 = h.ws(&token("c1"));
    let items = json!({"items": [
        {"user_id": "c1", "message": notification("fine")},
        {"user_id": "c1", "message": {"no": "type"}},
    ]});
    let r = post_batch(&h, items.to_string().as_bytes());
    assert_eq!(r.status, 400, "{}", r.text());
    let error = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(error.starts_with("item 1: "), "{error}");
    assert_no_message(&mut u1, Duration::from_millis(300));

    let oversized = json!({"items": [{"user_id": "c1", "message": {"type": "x", "p": "z".repeat(600)}}]});
    let r = post_batch(&h, oversized.to_string().as_bytes());
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap_or_default().starts_with("item 0: "), "{}", r.text());

    for bad in [json!({"items": []}), json!({"items": "x"}), json!({}), json!([1])] {
        let r = post_batch(&h, bad.to_string().as_bytes());
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    let too_many: Vec<Value> = (0..1001).map(|_| json!({"user_id": "c1", "message": notification("x")})).collect();
    let r = post_batch(&h, json!({ "items": too_many }).to_string().as_bytes());
    assert_eq!(r.status, 400, "{}", r.text());
    assert_no_message(&mut u1, Duration::from_millis(300));

    // A plain user token may publish to itself only, in a batch as anywhere.
    let mine = json!({"items": [{"user_id": "c1", "message": notification("self")}, {"user_id": "c2", "message": notification("other")}]});
    let bearer = format!("Bearer {}", token("c1"));
    let r = h.http("POST", "/publish/batch", &[("Authorization", &bearer)], mine.to_string().as_bytes());
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("item 1"), "{}", r.text());
}

#[test]
fn publish_batch_accepts_a_thousand_items_up_to_a_mebibyte() {
    let h = herald().api_key().start();
    let mut ws = h.ws(&token("many"));
    let pad = "p".repeat(100);
    let items: Vec<Value> =
        (0..1000).map(|i| json!({"user_id": "many", "message": {"type": "n", "i": i, "pad": pad}})).collect();
    let body = json!({ "items": items }).to_string();
    assert!(body.len() > 64 * 1024, "the batch must exceed the single-publish body limit");
    let r = post_batch(&h, body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["sent"].as_array().map(|a| a.len()), Some(1000));
    for i in 0..1000 {
        assert_eq!(recv_json(&mut ws, T)["i"], i, "in item order");
    }
    let huge = vec![b' '; 1024 * 1024 + 1];
    let r = post_batch(&h, &huge);
    assert_eq!(r.status, 413, "{}", r.text());
}

#[test]
fn publish_batch_through_redis_answers_each_item() {
    let redis = Redis::start();
    let h = herald().api_key().redis(&redis).start();
    redis.wait_subscribers(1, Duration::from_secs(10));
    let mut ws = h.ws(&token("r1"));
    let items = json!({"items": [
        {"user_id": "r1", "message": notification("a")},
        {"topic": "nobody-listens", "message": notification("b")},
        {"user_id": "r1", "message": notification("c")},
    ]});
    let r = post_batch(&h, items.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["sent"], json!([true, false, true]), "exact mode: sent says whether anyone holds it");
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "a");
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "c");
}

#[test]
fn in_pattern_mode_sent_only_says_an_instance_heard_it() {
    let redis = Redis::start();
    let h = herald().api_key().redis(&redis).env("HERALD_REDIS_SUBSCRIBE", "pattern").start();
    redis.wait_pattern_subscribers(1, Duration::from_secs(10));
    let mut ws = h.ws(&token("r1"));
    let items = json!({"items": [
        {"user_id": "r1", "message": notification("a")},
        {"topic": "nobody-listens", "message": notification("b")},
    ]});
    let r = post_batch(&h, items.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["sent"], json!([true, true]), "every instance receives everything");
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "a");
    let m = h.metrics();
    assert_eq!(m["redis"]["subscriptions"], 2, "one pattern per prefix: {m}");
}
