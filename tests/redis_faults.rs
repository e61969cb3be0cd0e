//! Redis going away and coming back.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(5);

fn wait_health(h: &Herald, status: u16, what: &str, timeout: Duration) -> Value {
    let mut last = (0, String::new());
    let ok = wait_until(timeout, || {
        let r = h.health();
        last = (r.status, r.text());
        r.status == status && r.json()["status"] == what
    });
    assert!(ok, "/health did not become {status} {what} within {timeout:?}; last: {} {}", last.0, last.1);
    serde_json::from_str(&last.1).unwrap()
}

#[test]
fn redis_outage_keeps_connections_reports_degraded_and_recovers() {
    let mut redis = Redis::start();
    let h = herald().redis(&redis).start();
    redis.wait_subscribers(1, T);
    let mut ws = h.ws(&token("u1"));
    redis.publish_until_received("user_noti:u1", &notification("before").to_string(), T);
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "before");

    redis.kill();
    let v = wait_health(&h, 503, "degraded", Duration::from_secs(6));
    assert_eq!(v["redis"]["status"], "disconnected", "{v}");
    assert_eq!(v["websocket"]["active_connections"], 1, "{v}");
    // the WebSocket stays open and served during the outage
    assert_alive(&mut ws);
    let m = h.metrics();
    assert_eq!(m["connections"]["active"], 1, "{m}");

    redis.restart();
    let v = wait_health(&h, 200, "healthy", Duration::from_secs(12));
    assert_eq!(v["redis"]["status"], "connected", "{v}");
    // resubscription may lag the health check a little: retry until herald hears it
    redis.publish_until_received("user_noti:u1", &notification("after").to_string(), Duration::from_secs(10));
    let m = recv_json(&mut ws, T);
    assert_eq!(m["payload"]["title"], "after", "{m}");
    assert_no_message(&mut ws, Duration::from_millis(300));
}

#[test]
fn new_connections_are_accepted_during_a_redis_outage() {
    let mut redis = Redis::start();
    let h = herald().redis(&redis).start();
    redis.wait_subscribers(1, T);
    redis.kill();
    wait_health(&h, 503, "degraded", Duration::from_secs(6));
    // authentication is local: a client can still connect and is served once Redis is back
    let mut ws = h.ws(&token("late"));
    assert_alive(&mut ws);
    redis.restart();
    wait_health(&h, 200, "healthy", Duration::from_secs(12));
    redis.publish_until_received("user_noti:late", &notification("welcome back").to_string(), Duration::from_secs(10));
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "welcome back");
}

#[test]
fn herald_started_before_redis_reports_degraded_then_connects() {
    let redis_port = free_port();
    let h = herald().env("HERALD_REDIS_URL", &format!("redis://127.0.0.1:{redis_port}")).start();
    let v = wait_health(&h, 503, "degraded", T);
    assert_eq!(v["redis"]["status"], "disconnected", "{v}");
    let mut ws = h.ws(&token("early"));
    // start redis on the port herald is trying
    let redis = Redis::start_on(redis_port);
    wait_health(&h, 200, "healthy", Duration::from_secs(12));
    redis.publish_until_received("user_noti:early", &notification("finally").to_string(), Duration::from_secs(10));
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "finally");
}

// =======================================================================================
// each event loop's own publishing connection
// =======================================================================================

const LINK_NAME: &str = "herald-loop-publisher";

fn field<'l>(line: &'l str, key: &str) -> &'l str {
    line.split(' ').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')).unwrap_or("")
}

/// Publishes over HTTP until one has gone out on a loop's own connection (CLIENT LIST shows
/// the last command of each client; the shared publisher thread only PINGs while idle).
fn publish_until_a_link_carries_one(h: &Herald, redis: &Redis, user: &str, ws: &mut Ws) -> usize {
    let mut sent = 0;
    let carried = wait_until(T, || {
        sent += 1;
        let r = h.publish(Some(API_KEY), &json!({"user_id": user, "message": notification(&format!("n{sent}"))}));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["sent"], true, "{}", r.text());
        assert_eq!(recv_json(ws, T)["payload"]["title"], format!("n{sent}"));
        redis.clients_named(LINK_NAME).iter().any(|l| field(l, "cmd") == "publish")
    });
    assert!(carried, "no HTTP publish went out on a loop's own connection: {:?}", redis.clients_named(LINK_NAME));
    sent
}

/// herald with two event loops, once both loops' own connections are up.
fn herald_with_two_links() -> (Redis, Herald) {
    let redis = Redis::start();
    let h = herald().api_key().env("HERALD_THREADS", "2").redis(&redis).start();
    wait_health(&h, 200, "healthy", T);
    redis.wait_subscribers(1, T);
    assert!(wait_until(T, || redis.clients_named(LINK_NAME).len() == 2), "{:?}", redis.clients_named(LINK_NAME));
    (redis, h)
}

#[test]
fn http_publishes_go_out_on_each_loops_own_redis_connection() {
    let (redis, h) = herald_with_two_links();
    let mut ws = h.ws(&token("linked"));
    publish_until_a_link_carries_one(&h, &redis, "linked", &mut ws);
    assert_no_message(&mut ws, Duration::from_millis(200));
}

/// Redis drops the loops' connections: publishes still succeed, each delivered exactly once
/// (whatever a dead link had written unanswered goes out once more through the publisher
/// thread), and the links come back.
#[test]
fn publishes_survive_redis_dropping_the_loops_connections() {
    let (redis, h) = herald_with_two_links();
    let mut ws = h.ws(&token("dropped"));
    for round in 0..3 {
        for line in redis.clients_named(LINK_NAME) {
            let id = field(&line, "id").to_string();
            redis.conn().command(&["CLIENT", "KILL", "ID", &id]);
        }
        for i in 0..10 {
            let title = format!("r{round}-{i}");
            let r = h.publish(Some(API_KEY), &json!({"user_id": "dropped", "message": notification(&title)}));
            assert_eq!(r.status, 200, "round {round}, publish {i}: {}", r.text());
            assert_eq!(recv_json(&mut ws, T)["payload"]["title"], title);
        }
        assert!(
            wait_until(Duration::from_secs(10), || redis.clients_named(LINK_NAME).len() == 2),
            "the loops did not reconnect: {:?}",
            redis.clients_named(LINK_NAME)
        );
    }
    publish_until_a_link_carries_one(&h, &redis, "dropped", &mut ws);
    assert_no_message(&mut ws, Duration::from_millis(300));
}
