//! Presence: the API (fleet-wide with Redis), the events (exactly one per fleet-wide
//! transition, on the Redis channel and the signed webhook), the sweep of an instance killed
//! without closing its connections, and fleet-wide `/api/disconnect`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(5);
/// SPEC §8: presence is correct within 1 s after a connect or a clean close.
const PRESENCE_LAG: Duration = Duration::from_secs(1);
const WEBHOOK_SECRET: &str = "webhook-secret-for-tests";

/// Presence events on the Redis channel, as (user, status, connections).
fn next_event(sub: &mut RedisSub, within: Duration) -> Option<(String, String, u64)> {
    let raw = sub.next(within)?;
    let event: Value = serde_json::from_str(&raw).expect("presence events are JSON");
    assert_eq!(event["type"], "presence", "{event}");
    assert!(event["timestamp"].as_str().is_some_and(is_rfc3339_millis_utc), "{event}");
    let user = match &event["user_id"] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    Some((user, event["status"].as_str().unwrap_or_default().to_string(), event["connections"].as_u64().unwrap_or(99)))
}

fn fleet(redis: &Redis, n: usize) -> Vec<Herald> {
    let instances: Vec<Herald> = (0..n).map(|_| herald().redis(redis).api_key().start()).collect();
    redis.wait_subscribers(n, Duration::from_secs(10));
    instances
}

#[test]
fn presence_is_fleet_wide_and_follows_connects_and_closes() {
    let redis = Redis::start();
    let hs = fleet(&redis, 2);
    assert_eq!(presence_of(&hs[1], "p1"), json!({"user_id": "p1", "online": false, "connections": 0}));
    let a1 = hs[0].ws(&token("p1"));
    wait_presence(&hs[1], "p1", 1, PRESENCE_LAG);
    let b1 = hs[1].ws(&token("p1"));
    let b2 = hs[1].ws(&token("p1"));
    wait_presence(&hs[0], "p1", 3, PRESENCE_LAG);
    drop(b1);
    wait_presence(&hs[0], "p1", 2, PRESENCE_LAG);
    drop((a1, b2));
    wait_presence(&hs[1], "p1", 0, PRESENCE_LAG);
    // Numeric ids come back as numbers, as elsewhere in herald's API.
    let _c = hs[0].ws(&token("42"));
    wait_presence(&hs[0], "42", 1, PRESENCE_LAG);
    assert_eq!(presence_of(&hs[1], "42")["user_id"], 42);
    // Bulk: unknown users are offline, order is kept.
    let auth = format!("Bearer {API_KEY}");
    let body = json!({"user_ids": ["nobody", 42, "p1"]}).to_string();
    let r = hs[1].http("POST", "/api/presence", &[("Authorization", &auth)], body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"presence": {
            "nobody": {"online": false, "connections": 0},
            "42": {"online": true, "connections": 1},
            "p1": {"online": false, "connections": 0},
        }})
    );
}

#[test]
fn presence_queries_are_bounded_and_authorized() {
    for redis in [None, Some(Redis::start())] {
        let h = match &redis {
            Some(redis) => herald().redis(redis).api_key().start(),
            None => herald().api_key().start(),
        };
        let auth = format!("Bearer {API_KEY}");
        let ids: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
        let r = h.http(
            "POST",
            "/api/presence",
            &[("Authorization", &auth)],
            json!({"user_ids": ids}).to_string().as_bytes(),
        );
        assert_eq!(r.status, 400, "1001 ids: {}", r.text());
        let ids: Vec<String> = (0..1000).map(|i| format!("u{i}")).collect();
        let r = h.http(
            "POST",
            "/api/presence",
            &[("Authorization", &auth)],
            json!({"user_ids": ids}).to_string().as_bytes(),
        );
        assert_eq!(r.status, 200, "1000 ids: {}", r.text());
        assert_eq!(r.json()["presence"].as_object().map(|m| m.len()), Some(1000));
        for bad in [json!({}), json!({"user_ids": "u1"}), json!({"user_ids": [""]}), json!({"user_ids": [1.5]})] {
            let r = h.http("POST", "/api/presence", &[("Authorization", &auth)], bad.to_string().as_bytes());
            assert_eq!(r.status, 400, "{bad}: {}", r.text());
        }
        assert_eq!(h.http("GET", "/api/presence/u1", &[], b"").status, 401);
        let own = format!("Bearer {}", token("me"));
        assert_eq!(h.http("GET", "/api/presence/me", &[("Authorization", &own)], b"").status, 200);
        assert_eq!(h.http("GET", "/api/presence/someone", &[("Authorization", &own)], b"").status, 403);
        let body = json!({"user_ids": ["me", "someone"]}).to_string();
        assert_eq!(h.http("POST", "/api/presence", &[("Authorization", &own)], body.as_bytes()).status, 403);
        assert_eq!(h.http("GET", "/api/presence/", &[("Authorization", &auth)], b"").status, 400);
        // Embedded, the instance is the fleet.
        let _ws = h.ws(&token("here"));
        wait_presence(&h, "here", 1, PRESENCE_LAG);
    }
}

#[test]
fn exactly_one_event_per_fleet_wide_transition_even_when_instances_race() {
    let redis = Redis::start();
    let hs = fleet(&redis, 3);
    let mut events = RedisSub::subscribe(redis.port, "herald:presence");
    for round in 0..5 {
        let user = format!("race{round}");
        // The user's first connections open on three instances at once…
        let opened: Vec<Ws> = thread::scope(|s| {
            let handles: Vec<_> = hs.iter().map(|h| s.spawn(|| h.ws(&token(&user)))).collect();
            handles.into_iter().map(|t| t.join().expect("connect")).collect()
        });
        wait_presence(&hs[0], &user, 3, PRESENCE_LAG);
        let (who, status, connections) = next_event(&mut events, T).expect("an online event");
        assert_eq!((who.as_str(), status.as_str()), (user.as_str(), "online"));
        assert!((1..=3).contains(&connections), "{connections}");
        // …and close at once.
        drop(opened);
        wait_presence(&hs[1], &user, 0, PRESENCE_LAG);
        assert_eq!(next_event(&mut events, T), Some((user.clone(), "offline".into(), 0)));
        assert_eq!(next_event(&mut events, Duration::from_millis(300)), None, "a second event for {user}");
    }
    let emitted: u64 = hs.iter().map(|h| h.metrics()["presence"]["events"].as_u64().unwrap_or(0)).sum();
    assert_eq!(emitted, 10, "five users, two transitions each, counted once fleet-wide");
}

#[test]
fn a_killed_instance_stops_counting_within_30_seconds() {
    let redis = Redis::start();
    let mut hs = fleet(&redis, 2);
    let mut events = RedisSub::subscribe(redis.port, "herald:presence");
    let _on_b = hs[1].ws(&token("shared"));
    let on_a: Vec<Ws> = (0..3).map(|_| hs[0].ws(&token("shared"))).collect();
    let _only_a = hs[0].ws(&token("lonely"));
    wait_presence(&hs[1], "shared", 4, PRESENCE_LAG);
    wait_presence(&hs[1], "lonely", 1, PRESENCE_LAG);
    while next_event(&mut events, Duration::from_millis(300)).is_some() {}
    let killed = Instant::now();
    hs[0].signal(9);
    hs[0].wait_exit(T);
    wait_presence(&hs[1], "shared", 1, Duration::from_secs(30));
    wait_presence(&hs[1], "lonely", 0, Duration::from_secs(30) - killed.elapsed().min(Duration::from_secs(29)));
    eprintln!("swept {:?} after the SIGKILL", killed.elapsed());
    assert_eq!(next_event(&mut events, T), Some(("lonely".into(), "offline".into(), 0)));
    assert_eq!(next_event(&mut events, Duration::from_millis(300)), None, "shared is still online on B");
    drop(on_a);
}

#[test]
fn fleet_wide_disconnect_sums_every_instance() {
    let redis = Redis::start();
    let hs = fleet(&redis, 3);
    let mut on_a: Vec<Ws> = (0..2).map(|_| hs[0].ws(&token("gone"))).collect();
    let mut on_b = hs[1].ws(&token("gone"));
    let mut other = hs[1].ws(&token("stays"));
    let auth = format!("Bearer {API_KEY}");
    let body = json!({"user_id": "gone"}).to_string();
    // Asked on the instance that holds none of them.
    let r = hs[2].http("POST", "/api/disconnect", &[("Authorization", &auth)], body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"status": "success", "closed": 3}));
    for ws in on_a.iter_mut().chain(std::iter::once(&mut on_b)) {
        assert!(matches!(wait_close(ws, T), Closed::Frame(Some(_), _)));
    }
    assert_no_message(&mut other, Duration::from_millis(300));
    let r = hs[0].http("POST", "/api/disconnect", &[("Authorization", &auth)], body.as_bytes());
    assert_eq!(r.json(), json!({"status": "success", "closed": 0}), "nobody left");
}

/// A local webhook receiver: answers each post with the next status of `statuses` (then
/// 200), and hands over (signature header, body) of every post.
fn webhook_receiver(statuses: Vec<u16>) -> (String, mpsc::Receiver<(Option<String>, String)>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/hooks/presence", listener.local_addr().expect("addr"));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut statuses = statuses.into_iter();
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let Some((signature, body)) = read_post(&stream) else { continue };
            let status = statuses.next().unwrap_or(200);
            let mut stream = stream;
            let _ = write!(stream, "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            if tx.send((signature, body)).is_err() {
                return;
            }
        }
    });
    (url, rx)
}

fn read_post(stream: &TcpStream) -> Option<(Option<String>, String)> {
    stream.set_read_timeout(Some(T)).ok()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    assert!(line.starts_with("POST /hooks/presence "), "{line}");
    let (mut length, mut signature) = (0, None);
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().ok()?,
            "x-herald-signature" => signature = Some(value.trim().to_string()),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some((signature, String::from_utf8(body).ok()?))
}

fn expected_signature(body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, WEBHOOK_SECRET.as_bytes());
    let tag = ring::hmac::sign(&key, body.as_bytes());
    format!("sha256={}", tag.as_ref().iter().map(|b| format!("{b:02x}")).collect::<String>())
}

#[test]
fn webhook_posts_are_signed_and_sent_once_per_transition_in_either_mode() {
    for with_redis in [false, true] {
        let (url, posts) = webhook_receiver(Vec::new());
        let redis = with_redis.then(Redis::start);
        let mut builder =
            herald().api_key().env("HERALD_WEBHOOK_URL", &url).env("HERALD_WEBHOOK_SECRET", WEBHOOK_SECRET);
        if let Some(redis) = &redis {
            builder = builder.redis(redis);
        }
        let h = builder.start();
        let first = h.ws(&token("hooked"));
        let second = h.ws(&token("hooked"));
        let (signature, body) = posts.recv_timeout(T).expect("an online post");
        assert_eq!(signature.as_deref(), Some(expected_signature(&body).as_str()), "redis: {with_redis}");
        let event: Value = serde_json::from_str(&body).expect("JSON body");
        assert_eq!((event["user_id"].as_str(), event["status"].as_str()), (Some("hooked"), Some("online")), "{event}");
        drop((first, second));
        let (_, body) = posts.recv_timeout(T).expect("an offline post");
        let event: Value = serde_json::from_str(&body).expect("JSON body");
        assert_eq!((event["status"].as_str(), event["connections"].as_u64()), (Some("offline"), Some(0)), "{event}");
        assert!(posts.recv_timeout(Duration::from_millis(500)).is_err(), "one post per transition");
        assert_eq!(h.metrics()["presence"]["webhook"]["delivered"], 2);
    }
}

#[test]
fn webhook_failures_are_retried_three_times_then_dropped() {
    // 500, 503, 502 then 200: delivered on the 4th attempt. Then four 500s: dropped.
    let (url, posts) = webhook_receiver(vec![500, 503, 502, 200, 500, 500, 500, 500]);
    let h = herald().env("HERALD_WEBHOOK_URL", &url).env("HERALD_WEBHOOK_SECRET", WEBHOOK_SECRET).start();
    let ws = h.ws(&token("flaky"));
    let bodies: Vec<String> = (0..4).map(|_| posts.recv_timeout(T).expect("a retried post").1).collect();
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "every retry posts the same signed body");
    drop(ws);
    for _ in 0..4 {
        posts.recv_timeout(Duration::from_secs(10)).expect("a retried post");
    }
    let ok = wait_until(T, || h.metrics()["presence"]["webhook"]["dropped"] == 1);
    let webhook = &h.metrics()["presence"]["webhook"];
    assert!(ok, "{webhook}");
    assert_eq!((webhook["delivered"].as_u64(), webhook["retries"].as_u64()), (Some(1), Some(6)), "{webhook}");
}
