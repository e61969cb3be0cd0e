//! Redis going away and coming back.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

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
