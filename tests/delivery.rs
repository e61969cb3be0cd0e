//! Delivery of notifications from Redis (and the HTTP API through Redis) to WebSocket clients.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(5);

/// Redis + a herald subscribed to it.
fn redis_and_herald() -> (Redis, Herald) {
    let redis = Redis::start();
    let h = herald().redis(&redis).start();
    redis.wait_subscribers(1, Duration::from_secs(10));
    (redis, h)
}

#[test]
fn redis_message_is_delivered_with_timestamp() {
    let (redis, h) = redis_and_herald();
    let mut ws = h.ws(&token("u1"));
    let published = r#"{"type":"notification","payload":{"title":"hi"}}"#;
    let n = redis.publish_until_received("user_noti:u1", published, T);
    assert_eq!(n, 1, "exactly one herald instance should be subscribed");
    let m = recv_json(&mut ws, T);
    let ts = m["timestamp"].as_str().unwrap_or_else(|| panic!("no timestamp in {m}")).to_string();
    assert_timestamp_is_now(&ts, 30.0);
    assert_eq!(strip_timestamp(m), json!({"type":"notification","payload":{"title":"hi"}}));
}

#[test]
fn message_reaches_every_connection_of_the_user_and_nobody_else() {
    let (redis, h) = redis_and_herald();
    let mut a1 = h.ws(&token("u1"));
    let mut a2 = h.ws(&token("u1"));
    let mut b = h.ws(&token("u2"));
    let mut c = h.ws(&token("u10"));
    h.wait_active_connections(4, T);
    redis.publish_until_received("user_noti:u1", &notification("for u1").to_string(), T);
    for ws in [&mut a1, &mut a2] {
        let m = recv_json(ws, T);
        assert_eq!(m["type"], "notification");
        assert_eq!(m["payload"]["title"], "for u1");
    }
    assert_no_message(&mut b, Duration::from_millis(700));
    assert_no_message(&mut c, Duration::from_millis(100));
    // and the other way round
    redis.publish("user_noti:u2", &notification("for u2").to_string());
    assert_eq!(recv_json(&mut b, T)["payload"]["title"], "for u2");
    assert_no_message(&mut a1, Duration::from_millis(500));
    assert_no_message(&mut a2, Duration::from_millis(100));
    assert_no_message(&mut c, Duration::from_millis(100));
}

#[test]
fn message_with_timestamp_is_delivered_unchanged() {
    let (redis, h) = redis_and_herald();
    let mut ws = h.ws(&token("u1"));
    let original = json!({
        "type": "alert",
        "payload": {"level": "warning", "message": "Your subscription expires in 3 days",
                    "action": {"label": "Renew Now", "url": "/subscriptions"}},
        "timestamp": "2020-02-29T23:59:59.999Z"
    });
    redis.publish_until_received("user_noti:u1", &original.to_string(), T);
    let m = recv_json(&mut ws, T);
    assert_eq!(m, original);
}

#[test]
fn arbitrary_fields_and_unicode_are_preserved() {
    let (redis, h) = redis_and_herald();
    let mut ws = h.ws(&token("u1"));
    let original = json!({
        "type": "order_status_changed",
        "payload": {"order_id": "12345", "price": 12.5, "tags": ["a", "b"], "nested": {"ok": true, "none": null}},
        "title": "Grüße \u{1F514} \"quoted\" \\ back",
        "extra": 7
    });
    redis.publish_until_received("user_noti:u1", &original.to_string(), T);
    let m = recv_json(&mut ws, T);
    assert_eq!(strip_timestamp(m), original);
}

#[test]
fn invalid_messages_are_dropped_and_a_following_valid_one_arrives() {
    let (redis, h) = redis_and_herald();
    let mut ws = h.ws(&token("u1"));
    let mut conn = redis.conn();
    // make sure herald hears the channel before the sequence starts
    redis.publish_until_received("user_noti:u1", &notification("first").to_string(), T);
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "first");
    let big_title = "x".repeat(600);
    let invalid = [
        "not json at all".to_string(),
        "{\"type\":\"notification\",".to_string(),
        "[1,2,3]".to_string(),
        "\"just a string\"".to_string(),
        "42".to_string(),
        "null".to_string(),
        "{}".to_string(),
        json!({"payload": {"title": "no type"}}).to_string(),
        json!({"type": 5, "payload": {}}).to_string(),
        json!({"type": null}).to_string(),
        json!({"type": ["notification"]}).to_string(),
        json!({"type": "notification", "payload": {"title": big_title}}).to_string(),
    ];
    for p in &invalid {
        conn.publish("user_noti:u1", p);
    }
    conn.publish("user_noti:u1", &notification("after").to_string());
    let m = recv_json(&mut ws, T);
    assert_eq!(m["payload"]["title"], "after", "first message after the invalid ones: {m}");
    assert_no_message(&mut ws, Duration::from_millis(300));
}

#[test]
fn messages_arrive_in_publish_order() {
    let (redis, h) = redis_and_herald();
    let mut ws = h.ws(&token("orderly"));
    redis.publish_until_received("user_noti:orderly", &json!({"type": "seq", "n": -1}).to_string(), T);
    assert_eq!(recv_json(&mut ws, T)["n"], -1);
    let payloads: Vec<String> = (0..200).map(|i| json!({"type": "seq", "n": i}).to_string()).collect();
    redis.conn().publish_many("user_noti:orderly", &payloads);
    for i in 0..200 {
        let m = recv_json(&mut ws, T);
        assert_eq!(m["n"], i, "message {i} out of order: {m}");
    }
}

#[test]
fn max_message_bytes_is_configurable() {
    let redis = Redis::start();
    let h = herald().redis(&redis).env("HERALD_MAX_MESSAGE_BYTES", "2048").start();
    redis.wait_subscribers(1, T);
    let mut ws = h.ws(&token("big"));
    let medium = json!({"type": "notification", "payload": {"title": "m".repeat(1200)}});
    redis.publish_until_received("user_noti:big", &medium.to_string(), T);
    let m = recv_json(&mut ws, T);
    assert_eq!(m["payload"]["title"].as_str().unwrap().len(), 1200, "a 1.2 KB message fits a 2 KB limit");
    let huge = json!({"type": "notification", "payload": {"title": "h".repeat(3000)}});
    redis.publish("user_noti:big", &huge.to_string());
    redis.publish("user_noti:big", &notification("marker").to_string());
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "marker", "the 3 KB message must be dropped");
}

#[test]
fn custom_user_channel_prefix_is_used() {
    let redis = Redis::start();
    let h = herald().redis(&redis).env("HERALD_USER_CHANNEL_PREFIX", "alerts:").start();
    redis.wait_subscribers(1, T);
    let mut ws = h.ws(&token("u1"));
    redis.publish_until_received("alerts:u1", &notification("custom prefix").to_string(), T);
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "custom prefix");
    redis.publish("user_noti:u1", &notification("default prefix").to_string());
    assert_no_message(&mut ws, Duration::from_millis(700));
}

#[test]
fn redis_url_alias_is_honoured() {
    let redis = Redis::start();
    let h = herald().env("REDIS_URL", &redis.url()).start();
    redis.wait_subscribers(1, Duration::from_secs(10));
    let mut health = serde_json::Value::Null;
    let connected = wait_until(T, || {
        health = h.health_json();
        health["redis"]["status"] == "connected"
    });
    assert!(connected, "redis never reported connected via REDIS_URL: {health}");
    let mut ws = h.ws(&token("u1"));
    redis.publish_until_received("user_noti:u1", &notification("alias").to_string(), T);
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "alias");
}

#[test]
fn publish_api_with_redis_goes_through_redis_to_every_instance() {
    let redis = Redis::start();
    let a = herald().redis(&redis).api_key().start();
    let b = herald().redis(&redis).api_key().start();
    redis.wait_subscribers(2, Duration::from_secs(10));
    let mut sub = RedisSub::subscribe(redis.port, "user_noti:u1");
    let mut on_a = a.ws(&token("u1"));
    let mut on_b = b.ws(&token("u1"));
    let mut other = b.ws(&token("u2"));
    let r = a.publish(Some(API_KEY), &json!({"user_id": "u1", "message": notification("cross-instance")}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "success");
    assert_eq!(r.json()["sent"], true);
    let raw = sub.next(T).expect("the raw Redis subscriber saw nothing: POST /publish did not go to Redis");
    let raw: Value = serde_json::from_str(&raw).expect("published payload is JSON");
    assert_eq!(raw["type"], "notification");
    assert_eq!(raw["payload"]["title"], "cross-instance");
    assert_eq!(recv_json(&mut on_b, T)["payload"]["title"], "cross-instance");
    assert_eq!(recv_json(&mut on_a, T)["payload"]["title"], "cross-instance");
    assert_no_message(&mut other, Duration::from_millis(500));
    assert_no_message(&mut on_a, Duration::from_millis(100));
}

#[test]
fn publish_api_user_ids_reaches_each_user_through_redis() {
    let redis = Redis::start();
    let h = herald().redis(&redis).api_key().start();
    redis.wait_subscribers(1, T);
    let mut a = h.ws(&token("a"));
    let mut b = h.ws(&token("b"));
    let mut c = h.ws(&token("c"));
    let r = h.publish(Some(API_KEY), &json!({"user_ids": ["a", "b"], "message": notification("multi")}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(recv_json(&mut a, T)["payload"]["title"], "multi");
    assert_eq!(recv_json(&mut b, T)["payload"]["title"], "multi");
    assert_no_message(&mut c, Duration::from_millis(500));
    assert_no_message(&mut a, Duration::from_millis(100));
}

#[test]
fn slow_consumer_is_closed_and_others_keep_receiving() {
    let redis = Redis::start();
    let h = herald().redis(&redis).env("HERALD_SEND_QUEUE", "8").start();
    redis.wait_subscribers(1, T);
    let mut slow = RawWs::connect_with(h.port, &token("slow"), |s| set_recv_buffer(s, 4096));
    let fast_ws = h.ws(&token("fast"));
    h.wait_active_connections(2, T);
    let before = h.metrics();

    // the fast client reads everything addressed to it in a thread
    let reader = thread::spawn(move || {
        let mut ws = fast_ws;
        let mut got = Vec::new();
        loop {
            let m = recv_json(&mut ws, Duration::from_secs(20));
            if m["type"] == "done" {
                return (got, ws);
            }
            got.push(m["n"].as_i64().unwrap());
        }
    });

    let mut conn = redis.conn();
    let filler = "p".repeat(340);
    let batch: Vec<String> =
        (0..1000).map(|i| json!({"type": "flood", "n": i, "payload": {"body": filler}}).to_string()).collect();
    assert!(batch[0].len() > 380 && batch[0].len() < 430);
    let mut slow_receivers = 0;
    for round in 0..20 {
        slow_receivers += conn.publish_many("user_noti:slow", &batch);
        conn.publish("user_noti:fast", &json!({"type": "tick", "n": round}).to_string());
    }
    assert!(slow_receivers > 0, "herald was not subscribed");
    conn.publish("user_noti:fast", &json!({"type": "done"}).to_string());

    let (got, mut fast_ws) = reader.join().expect("fast client must receive everything addressed to it");
    assert_eq!(got, (0..20).collect::<Vec<i64>>(), "fast client missed messages");

    // the slow client: read what was buffered; the server must have closed it
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut texts = 0usize;
    let mut close_code = None;
    let ended = loop {
        match slow.read_frame(deadline) {
            Ok(f) if f.opcode == 0x1 => texts += 1,
            Ok(f) if f.opcode == 0x8 => {
                close_code =
                    Some(if f.payload.len() >= 2 { u16::from_be_bytes([f.payload[0], f.payload[1]]) } else { 0 });
            }
            Ok(_) => {}
            Err(RawRead::Timeout) => break false,
            Err(_) => break true,
        }
    };
    eprintln!("slow consumer: read {texts} messages before the end, close frame {close_code:?}");
    assert!(ended, "slow consumer was not disconnected (read {texts} messages, close frame {close_code:?})");
    assert!(texts < 20_000, "slow consumer got all {texts} messages: it was never treated as slow");
    if let Some(code) = close_code {
        assert_eq!(code, 1008, "slow consumer close code");
    }
    let after = h.metrics();
    let failed_before = before["messages"]["failed"].as_i64().unwrap_or(0);
    let failed_after = after["messages"]["failed"].as_i64().unwrap_or_else(|| panic!("no messages.failed in {after}"));
    assert!(failed_after > failed_before, "messages.failed did not grow: {before} -> {after}");
    h.wait_active_connections(1, T);
    // the fast client still works
    redis.publish("user_noti:fast", &json!({"type": "later"}).to_string());
    assert_eq!(recv_json(&mut fast_ws, T)["type"], "later");
}

#[test]
fn burst_larger_than_send_queue_reaches_a_reading_client() {
    // A client that reads as fast as it can is not a slow consumer, even when one burst is
    // bigger than the per-connection queue (default 256): 1000 small messages are ~40 KB,
    // which the kernel socket buffers alone could hold, so the queue drains into the socket.
    let redis = Redis::start();
    let h = herald().redis(&redis).start();
    redis.wait_subscribers(1, T);
    let mut ws = h.ws(&token("reader"));
    redis.publish_until_received("user_noti:reader", &json!({"type": "seq", "n": -1}).to_string(), T);
    assert_eq!(recv_json(&mut ws, T)["n"], -1);
    let payloads: Vec<String> = (0..1000).map(|i| json!({"type": "seq", "n": i}).to_string()).collect();
    redis.conn().publish_many("user_noti:reader", &payloads);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut next = 0;
    while next < 1000 {
        match ws_next(&mut ws, deadline) {
            Some(Ok(tungstenite::Message::Text(t))) => {
                let m: Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(m["n"], next, "out of order: {m}");
                next += 1;
            }
            Some(Ok(tungstenite::Message::Ping(_))) | Some(Ok(tungstenite::Message::Pong(_))) => {}
            other => panic!("after {next} of 1000 messages of the burst: {other:?}"),
        }
    }
}

#[test]
fn topic_subscription_on_ws_delivers_topic_messages() {
    let redis = Redis::start();
    let h = herald().redis(&redis).start();
    redis.wait_subscribers(1, T);
    let t = token_claims(json!({"sub": "u1", "exp": now_secs() + 3600, "topics": ["project:*", "news"]}));
    let mut ws = h.ws(&t);
    let mut bystander = h.ws(&token("u2"));
    ws.send(tungstenite::Message::text(json!({"type": "subscribe", "topic": "project:7"}).to_string())).unwrap();
    assert_eq!(recv_json(&mut ws, T), json!({"type": "subscribed", "topic": "project:7"}));
    // a topic the token does not allow
    ws.send(tungstenite::Message::text(json!({"type": "subscribe", "topic": "secret:1"}).to_string())).unwrap();
    let e = recv_json(&mut ws, T);
    assert_eq!(e["type"], "error", "{e}");
    assert!(e["message"].is_string(), "{e}");

    redis.publish_until_received("topic_noti:project:7", &notification("topic msg").to_string(), T);
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "topic msg");
    assert_no_message(&mut bystander, Duration::from_millis(300));
    redis.publish("topic_noti:secret:1", &notification("secret").to_string());
    assert_no_message(&mut ws, Duration::from_millis(300));

    ws.send(tungstenite::Message::text(json!({"type": "unsubscribe", "topic": "project:7"}).to_string())).unwrap();
    assert_eq!(recv_json(&mut ws, T), json!({"type": "unsubscribed", "topic": "project:7"}));
    redis.publish("topic_noti:project:7", &notification("after unsubscribe").to_string());
    assert_no_message(&mut ws, Duration::from_millis(500));
}

#[test]
fn publish_api_topic_target_reaches_subscribers() {
    let h = herald().api_key().start();
    let t = token_claims(json!({"sub": "u1", "exp": now_secs() + 3600, "topics": ["news"]}));
    let mut ws = h.ws(&t);
    let mut other = h.ws(&token("u2"));
    ws.send(tungstenite::Message::text(json!({"type": "subscribe", "topic": "news"}).to_string())).unwrap();
    assert_eq!(recv_json(&mut ws, T), json!({"type": "subscribed", "topic": "news"}));
    let r = h.publish(Some(API_KEY), &json!({"topic": "news", "message": notification("headline")}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"status": "success", "sent": true}));
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "headline");
    assert_no_message(&mut other, Duration::from_millis(300));
}

#[test]
fn fan_out_across_event_loops_reaches_every_connection_once() {
    let redis = Redis::start();
    let h = herald().redis(&redis).env("HERALD_THREADS", "4").start();
    redis.wait_subscribers(1, T);
    let mut conns: Vec<Ws> = (0..12).map(|_| h.ws(&token("many"))).collect();
    let mut others: Vec<Ws> = (0..4).map(|i| h.ws(&token(&format!("other{i}")))).collect();
    h.wait_active_connections(16, T);
    redis.publish_until_received("user_noti:many", &notification("fan-out").to_string(), T);
    redis.publish("user_noti:many", &notification("second").to_string());
    for (i, ws) in conns.iter_mut().enumerate() {
        assert_eq!(recv_json(ws, T)["payload"]["title"], "fan-out", "connection {i}");
        assert_eq!(recv_json(ws, T)["payload"]["title"], "second", "connection {i}");
    }
    for ws in conns.iter_mut() {
        assert_no_message(ws, Duration::from_millis(50));
    }
    for ws in others.iter_mut() {
        assert_no_message(ws, Duration::from_millis(50));
    }
}
