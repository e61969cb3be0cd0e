//! Fault drills: a Redis that answers garbage or stalls, clients that vanish in every state,
//! a second shutdown signal, running out of file descriptors.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(5);
const MASK: Option<[u8; 4]> = Some([0x11, 0x22, 0x33, 0x44]);

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

fn reconnects(h: &Herald) -> i64 {
    let m = h.metrics();
    m["redis"]["reconnects"].as_i64().unwrap_or_else(|| panic!("no redis.reconnects in {m}"))
}

fn has_redis_warning(stderr: &str) -> bool {
    stderr.lines().any(|l| l.contains("WARN") && l.to_ascii_lowercase().contains("redis"))
}

// =======================================================================================
// Redis that is not Redis, Redis that stalls
// =======================================================================================

/// Degraded with an error string, WebSocket upgrades still served.
fn assert_degraded_but_serving(h: &Herald, user: &str, timeout: Duration) -> Ws {
    let v = wait_health(h, 503, "degraded", timeout);
    assert_eq!(v["redis"]["status"], "disconnected", "{v}");
    let err = v["redis"]["error"].as_str().unwrap_or_else(|| panic!("redis.error is not a string: {v}"));
    assert!(!err.is_empty(), "redis.error is empty: {v}");
    let mut ws = h.ws(&token(user));
    assert_alive(&mut ws);
    ws
}

#[test]
fn redis_answering_garbage_or_nothing_keeps_herald_serving_and_it_recovers() {
    let port = free_port();
    // 1. herald starts against a "Redis" that answers garbage
    let mut fake = FakeRedis::start_on(port, FakeRedisMode::Garbage);
    let mut h = herald().api_key().env("HERALD_REDIS_URL", &format!("redis://127.0.0.1:{port}")).start();
    let mut early = assert_degraded_but_serving(&h, "early", Duration::from_secs(8));
    assert!(fake.accepted() >= 1, "herald never connected to the fake redis");
    assert!(wait_until(T, || has_redis_warning(&h.stderr())), "no redis warning in stderr:\n{}", h.stderr());
    assert!(h.is_running(), "herald died talking to garbage");

    // 2. the real redis-server takes the port over: herald recovers
    fake.stop();
    let mut redis = Redis::start_on(port);
    let v = wait_health(&h, 200, "healthy", Duration::from_secs(15));
    assert_eq!(v["redis"]["status"], "connected", "{v}");
    redis.publish_until_received("user_noti:early", &notification("recovered").to_string(), Duration::from_secs(10));
    assert_eq!(recv_json(&mut early, T)["payload"]["title"], "recovered");
    let first_recovery_reconnects = reconnects(&h);

    // 3. redis goes away and a "Redis" that accepts and never answers takes its port
    redis.kill();
    let mut silent = FakeRedis::start_on(port, FakeRedisMode::Silent);
    let mut during = assert_degraded_but_serving(&h, "during", Duration::from_secs(10));
    assert!(wait_until(T, || silent.accepted() >= 2), "herald did not connect to the silent fake");
    // as long as nothing answers, herald never claims to be healthy (its PING times out after 3 s)
    let silent_since = Instant::now();
    while silent_since.elapsed() < Duration::from_secs(4) {
        let r = h.health();
        assert_eq!(r.status, 503, "healthy while redis never answers: {}", r.text());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_alive(&mut early);

    // 4. the real one comes back: recovery, and a reconnection is counted
    silent.stop();
    let redis = Redis::start_on(port);
    wait_health(&h, 200, "healthy", Duration::from_secs(15));
    redis.publish_until_received("user_noti:during", &notification("back").to_string(), Duration::from_secs(10));
    assert_eq!(recv_json(&mut during, T)["payload"]["title"], "back");
    // delivery through the HTTP API (which publishes through redis) works again too
    let r = h.publish(Some(API_KEY), &json!({"user_id": "early", "message": notification("via http")}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(recv_json(&mut early, T)["payload"]["title"], "via http");
    let n = reconnects(&h);
    assert!(
        n >= 1,
        "redis.reconnects is {n} after a connection was lost and re-established \
         (it was {first_recovery_reconnects} after the first recovery from a garbage-only start)"
    );
    eprintln!("redis.reconnects: {first_recovery_reconnects} after first recovery, {n} at the end");
}

/// Redis restarts faster than herald's 1 s publisher PING: once /health says healthy again,
/// an HTTP publish must go through (not fail on the connection Redis closed).
#[test]
fn http_publish_right_after_a_quick_redis_restart_succeeds() {
    let mut redis = Redis::start();
    let h = herald().api_key().redis(&redis).start();
    wait_health(&h, 200, "healthy", T);
    redis.wait_subscribers(1, T);
    let mut ws = h.ws(&token("quick"));
    let r = h.publish(Some(API_KEY), &json!({"user_id": "quick", "message": notification("before")}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "before");
    redis.restart();
    wait_health(&h, 200, "healthy", Duration::from_secs(15));
    redis.wait_subscribers(1, Duration::from_secs(10));
    let r = h.publish(Some(API_KEY), &json!({"user_id": "quick", "message": notification("after")}));
    assert_eq!(r.status, 200, "first HTTP publish after redis restarted, with /health healthy: {}", r.text());
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "after");
}

#[test]
fn redis_stalling_makes_health_degraded_and_keeps_websockets_open() {
    let redis = Redis::start();
    let relay = Relay::start(redis.port);
    let h = herald().env("HERALD_REDIS_URL", &format!("redis://127.0.0.1:{}", relay.port)).start();
    wait_health(&h, 200, "healthy", T);
    redis.wait_subscribers(1, T);
    let mut ws = h.ws(&token("patient"));
    let mut other = h.ws(&token("other"));
    redis.publish_until_received("user_noti:patient", &notification("before").to_string(), T);
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "before");

    // Redis stops answering: herald's sockets to it stay open but nothing comes back
    relay.stall();
    let stalled_at = Instant::now();
    let v = wait_health(&h, 503, "degraded", Duration::from_secs(8));
    let took = stalled_at.elapsed();
    eprintln!("degraded {took:?} after redis stalled");
    assert!(v["redis"]["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    assert_eq!(v["websocket"]["active_connections"], 2, "{v}");
    // existing connections stay open and served, for longer than a ping timeout
    assert_alive(&mut ws);
    std::thread::sleep(Duration::from_secs(3));
    assert_alive(&mut ws);
    assert_alive(&mut other);
    assert!(h.health().status == 503, "still degraded while redis is stalled");

    // un-stalled: healthy again, and messages flow
    relay.resume();
    wait_health(&h, 200, "healthy", Duration::from_secs(15));
    redis.publish_until_received("user_noti:patient", &notification("after").to_string(), Duration::from_secs(10));
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "after");
    assert_no_message(&mut other, Duration::from_millis(200));
}

// =======================================================================================
// clients that vanish: everything they held is given back
// =======================================================================================

const IDLE: Duration = Duration::from_secs(2);

/// herald with a 2 s idle timeout and 1 s pings; the baseline of what it holds.
fn reclaiming_herald(extra: &[(&str, &str)]) -> (Herald, usize, Held) {
    let mut b = herald().api_key().env("HERALD_IDLE_TIMEOUT", "2s").env("HERALD_PING_INTERVAL", "1s");
    for (k, v) in extra {
        b = b.env(k, v);
    }
    let h = b.start();
    // let the readiness probe's connection go away before taking the baseline
    std::thread::sleep(Duration::from_millis(300));
    let fds = fd_count(h.pid());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(fd_count(h.pid()), fds, "fd count not stable at baseline");
    let mut seen = Held::NONE;
    let fresh = wait_until(T, || {
        seen = Held::of(&h.metrics());
        seen == Held::NONE
    });
    assert!(fresh, "a fresh herald holds {seen:?}");
    (h, fds, Held::NONE)
}

/// Waits until herald's fd count and held connections/indexes are back to the baseline.
fn assert_reclaimed(h: &Herald, fds: usize, held: Held, timeout: Duration, what: &str) -> Duration {
    let start = Instant::now();
    let mut last = (0, held);
    let ok = wait_until(timeout, || {
        // count descriptors first: the /metrics request below holds one while it runs
        let f = fd_count(h.pid());
        let m = Held::of(&h.metrics());
        last = (f, m);
        f == fds && m == held
    });
    assert!(
        ok,
        "{what}: herald did not give everything back within {timeout:?}: \
         fds {} (baseline {fds}), held {:?} (baseline {held:?})",
        last.0, last.1
    );
    start.elapsed()
}

#[test]
fn clients_vanishing_mid_handshake_are_reclaimed() {
    let (h, fds, held) = reclaiming_herald(&[]);
    let mut socks = Vec::new();
    for i in 0..20 {
        let mut s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
        let req = upgrade_request(h.port, &format!("/ws?token={}", token(&format!("ghost{i}"))), &[]);
        s.write_all(&req.as_bytes()[..1 + i * req.len() / 21]).unwrap();
        socks.push(s);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(fd_count(h.pid()) >= fds + 20, "herald should hold the 20 half-sent requests");
    drop(socks);
    let took = assert_reclaimed(&h, fds, held, IDLE + Duration::from_secs(4), "mid-handshake");
    eprintln!("mid-handshake: reclaimed in {took:?}");
    let mut ws = h.ws(&token("after"));
    assert_alive(&mut ws);
}

#[test]
fn clients_vanishing_mid_frame_are_reclaimed() {
    let (h, fds, held) = reclaiming_herald(&[]);
    let mut raws: Vec<RawWs> = (0..20).map(|i| RawWs::connect(h.port, &token(&format!("half{}", i % 7)))).collect();
    h.wait_active_connections(20, T);
    for (i, raw) in raws.iter_mut().enumerate() {
        let frame = encode_frame(true, 0x1, "y".repeat(100 + i).as_bytes(), MASK);
        raw.write_raw(&frame[..2 + i]).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    drop(raws);
    let took = assert_reclaimed(&h, fds, held, IDLE + Duration::from_secs(4), "mid-frame");
    eprintln!("mid-frame: reclaimed in {took:?}");
}

#[test]
fn clients_vanishing_with_a_full_send_queue_are_reclaimed() {
    const QUEUE: usize = 16;
    let (h, fds, held) = reclaiming_herald(&[("HERALD_SEND_QUEUE", "16"), ("HERALD_MAX_MESSAGE_BYTES", "60000")]);
    let users: Vec<String> = (0..5).map(|i| format!("flooded{i}")).collect();
    let mut raws: Vec<RawWs> =
        users.iter().map(|u| RawWs::connect_with(h.port, &token(u), |s| set_recv_buffer(s, 1024))).collect();
    let ports: Vec<u16> = raws.iter().map(|r| r.stream.local_addr().unwrap().port()).collect();
    h.wait_active_connections(5, T);
    let filler = "z".repeat(50_000);
    let mut n = 0;
    let mut publish = || {
        let r =
            h.publish(Some(API_KEY), &json!({"user_ids": users, "message": {"type": "flood", "n": n, "pad": filler}}));
        assert_eq!(r.status, 200, "{}", r.text());
        n += 1;
    };
    let send_queues = || -> Vec<u64> { tcp_send_queues(h.port, &ports).into_iter().map(|q| q.unwrap_or(0)).collect() };
    // The clients read nothing, but they are not silent: unsolicited Pongs keep them from the
    // 2 s idle timeout. Returns what the kernel holds once herald has written all it could.
    let settle = |raws: &mut [RawWs]| -> Vec<u64> {
        let mut prev = send_queues();
        for _ in 0..40 {
            for raw in raws.iter_mut() {
                if let Err(e) = raw.send(0xA, b"") {
                    panic!("pong: {e}; metrics {}", h.metrics());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
            let now = send_queues();
            if now == prev {
                break;
            }
            prev = now;
        }
        prev
    };
    // flood until herald's kernel send buffers stop taking more: from then on, what is
    // published waits in herald's own per-connection queue
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut history = vec![settle(&mut raws)];
    // full: twice in a row, less than one 50 KB message got into any kernel buffer
    let full = |history: &Vec<Vec<u64>>| {
        history.len() > 2 && {
            let (then, now) = (&history[history.len() - 3], &history[history.len() - 1]);
            now.iter().zip(then).all(|(a, b)| a.saturating_sub(*b) < 50_000)
        }
    };
    while !full(&history) {
        assert!(Instant::now() < deadline, "herald's send buffers never filled: {:?}", history.last());
        // while the kernel took 8 messages or more last time, 4 at once cannot reach the queue
        let took_last = match history.len() {
            1 => 0,
            n => history[n - 1].iter().zip(&history[n - 2]).map(|(a, b)| a.saturating_sub(*b)).min().unwrap(),
        };
        for _ in 0..if took_last >= 8 * 50_000 { 4 } else { 1 } {
            publish();
        }
        history.push(settle(&mut raws));
    }
    let last = history.last().unwrap().clone();
    assert!(last.iter().all(|q| *q > 0), "send queues {last:?}: sockets not found in /proc/net/tcp?");
    // at least 2 messages wait in herald's queue by now; fill it to QUEUE - 2
    for _ in 2..QUEUE - 2 {
        publish();
    }
    std::thread::sleep(Duration::from_millis(100));
    let m = h.metrics();
    eprintln!(
        "full queue: {n} messages of 50 KB sent, kernel send queues {last:?} bytes, {} of 5 still open \
         ({} slow consumers) when the clients vanish",
        m["connections"]["active"], m["messages"]["slow_consumers"]
    );
    assert_eq!(m["connections"]["active"], 5, "a flooded client was closed before it could vanish: {m}");
    // the clients go away with unread data in their buffers (their close is a reset)
    drop(raws);
    let took = assert_reclaimed(&h, fds, held, IDLE + Duration::from_secs(4), "full send queue");
    eprintln!("full send queue: reclaimed in {took:?}");
}

#[test]
fn half_open_clients_without_fin_are_reclaimed_by_the_idle_timeout() {
    let (h, fds, held) = reclaiming_herald(&[]);
    let relay = Relay::start(h.port);
    // connections through the relay work normally
    let mut via: Vec<Ws> = (0..10).map(|i| ws_connect(relay.port, &token(&format!("halfopen{}", i % 4)))).collect();
    for ws in via.iter_mut() {
        assert_alive(ws);
    }
    h.wait_active_connections(10, T);
    let idle_before = h.metrics()["errors"]["idle_closes"].as_i64().unwrap();
    // the network goes silent: no byte either way, no FIN, no RST; sockets stay open
    relay.stall();
    let took = assert_reclaimed(&h, fds, held, IDLE + Duration::from_secs(4), "half-open");
    eprintln!("half-open: reclaimed in {took:?} (idle timeout {IDLE:?})");
    let idle_after = h.metrics()["errors"]["idle_closes"].as_i64().unwrap();
    assert!(idle_after - idle_before >= 10, "idle_closes went from {idle_before} to {idle_after}");
    drop(via);
    drop(relay);
}

// =======================================================================================
// shutdown: a second signal exits at once
// =======================================================================================

/// A herald with a 10 s grace and a client that reads nothing, with messages stuck for it.
fn herald_stuck_in_shutdown(first: i32) -> (Herald, RawWs, Instant) {
    let h = herald().api_key().env("HERALD_SHUTDOWN_GRACE", "10s").start();
    let deaf = RawWs::connect_with(h.port, &token("deaf"), |s| set_recv_buffer(s, 1024));
    h.wait_active_connections(1, T);
    let pad = "q".repeat(400);
    for i in 0..100 {
        let r = h.publish(Some(API_KEY), &json!({"user_id": "deaf", "message": {"type": "stuck", "n": i, "pad": pad}}));
        assert_eq!(r.status, 200);
    }
    h.signal(first);
    let start = Instant::now();
    (h, deaf, start)
}

fn second_signal_exits_at_once(first: i32, second: i32) {
    let (mut h, _deaf, start) = herald_stuck_in_shutdown(first);
    // herald is waiting for the deaf client (it cannot flush nor complete the close)
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        h.is_running(),
        "herald exited by itself {:?} after the first signal: no second-signal case",
        start.elapsed()
    );
    let sent = Instant::now();
    h.signal(second);
    let st = h.wait_exit(Duration::from_secs(3)).expect("herald did not exit within 3 s of the second signal");
    let took = sent.elapsed();
    eprintln!("second signal: exited {took:?} after it ({:?} after the first), status {st}", start.elapsed());
    assert!(took <= Duration::from_millis(1000), "herald took {took:?} to exit after the second signal (grace 10 s)");
}

#[test]
fn second_sigterm_during_shutdown_exits_at_once() {
    second_signal_exits_at_once(libc::SIGTERM, libc::SIGTERM);
}

#[test]
fn sigint_after_sigterm_exits_at_once() {
    second_signal_exits_at_once(libc::SIGTERM, libc::SIGINT);
}

// =======================================================================================
// out of file descriptors
// =======================================================================================

#[test]
fn fd_exhaustion_counts_accept_errors_keeps_serving_and_resumes() {
    let mut h = herald().rlimit_nofile(64).env("HERALD_THREADS", "1").env("HERALD_HANDSHAKE_TIMEOUT", "60s").start();
    std::thread::sleep(Duration::from_millis(200));
    let base_fds = fd_count(h.pid());
    eprintln!("fd exhaustion: herald holds {base_fds} fds at rest, limit 64");
    // a keep-alive HTTP connection made while descriptors are plentiful
    let mut admin = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    let r = http_on(&mut admin, "GET", "/metrics", &[("Accept", "application/json")], b"", T).expect("metrics");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["errors"]["accept"], 0, "{}", r.text());

    let mut clients: Vec<RawWs> = Vec::new();
    let mut failures = Vec::new();
    for i in 0..100 {
        let path = format!("/ws?token={}", token(&format!("fd{}", i % 30)));
        match raw_try_upgrade(h.port, &path, &[], Duration::from_millis(700)) {
            Ok((resp, raw)) if resp.status == 101 => clients.push(raw),
            Ok((resp, _)) => failures.push(format!("HTTP {} {}", resp.status, resp.text())),
            Err(e) => failures.push(e),
        }
        if failures.len() >= 3 {
            break;
        }
    }
    eprintln!("fd exhaustion: {} upgrades succeeded, then {:?}", clients.len(), failures);
    assert!(failures.len() >= 3, "never ran out of descriptors with RLIMIT_NOFILE 64 ({} clients)", clients.len());
    assert!(clients.len() >= 20, "only {} upgrades before failures: {failures:?}", clients.len());
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", h.pid())).unwrap();
    let nofile = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_string();
    assert!(nofile.split_whitespace().filter(|w| *w == "64").count() == 2, "RLIMIT_NOFILE not applied: {nofile}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(h.is_running(), "herald died when it ran out of descriptors");

    // existing connections are still served, /metrics answers on the existing connection
    for raw in clients.iter_mut().take(3) {
        raw.send(0x1, b"ping").unwrap();
        let f = raw.read_frame(Instant::now() + T).expect("pong while out of descriptors");
        assert_eq!((f.opcode, f.payload.as_slice()), (0x1, &b"pong"[..]));
    }
    let r = http_on(&mut admin, "GET", "/metrics", &[("Accept", "application/json")], b"", T)
        .expect("/metrics on the keep-alive connection while out of descriptors");
    let m = r.json();
    let accept_errors = m["errors"]["accept"].as_i64().unwrap();
    eprintln!("fd exhaustion: errors.accept = {accept_errors}, active = {}", m["connections"]["active"]);
    assert!(accept_errors > 0, "errors.accept not counted: {m}");
    assert!(h.stderr().contains("accept failed"), "no accept warning in stderr:\n{}", h.stderr());

    // free half the descriptors: new upgrades succeed again
    let keep = clients.split_off(clients.len() / 2);
    drop(clients);
    let resumed = Instant::now();
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(5), || {
        match raw_try_upgrade(h.port, &format!("/ws?token={}", token("again")), &[], Duration::from_millis(500)) {
            Ok((resp, _)) if resp.status == 101 => true,
            Ok((resp, _)) => {
                last = format!("HTTP {}", resp.status);
                false
            }
            Err(e) => {
                last = e;
                false
            }
        }
    });
    assert!(ok, "upgrades did not succeed again after closing half the clients: {last}");
    eprintln!("fd exhaustion: service resumed {:?} after closing half the clients", resumed.elapsed());
    let mut more: Vec<Ws> = (0..5).map(|i| h.ws(&token(&format!("more{i}")))).collect();
    for ws in more.iter_mut() {
        assert_alive(ws);
    }
    drop(keep);
}
