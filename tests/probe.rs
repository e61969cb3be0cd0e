//! What an adversarial probe found, reproduced against the real binary: replies queued
//! without bound (pipelined HTTP, Ping floods), a read-only topic grant turned into a relay
//! target, plain sockets exhausting file descriptors, and herald's own additions pushing a
//! notification over the size limit in Redis mode.

mod common;
mod dialect_support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use dialect_support::*;
use serde_json::json;

const T: Duration = Duration::from_secs(5);
const MIB: u64 = 1024;

/// Writes `bytes` repeatedly until `total` bytes went out or the peer stopped taking them
/// for `stall` (herald stopped reading: backpressure). Returns the bytes written.
fn write_until_stalled(stream: &mut TcpStream, chunk: &[u8], total: usize, stall: Duration) -> usize {
    stream.set_write_timeout(Some(stall)).unwrap();
    let mut written = 0;
    while written < total {
        match stream.write(chunk) {
            Ok(0) => break,
            Ok(n) => written += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(_) => break,
        }
    }
    written
}

/// Highest RSS (KiB) of `pid` seen while `busy` stays true, sampled every 20 ms.
fn peak_rss_while(pid: i32, busy: &AtomicBool) -> u64 {
    let mut peak = rss_kib(pid);
    while busy.load(Ordering::Acquire) {
        peak = peak.max(rss_kib(pid));
        thread::sleep(Duration::from_millis(20));
    }
    peak.max(rss_kib(pid))
}

// =======================================================================================
// 1. replies are bounded
// =======================================================================================

#[test]
fn pipelined_requests_whose_answers_are_never_read_cannot_grow_memory() {
    let h = herald().env("HERALD_HANDSHAKE_TIMEOUT", "2s").start();
    // Warm up: the first requests allocate the loops' buffers.
    for _ in 0..20 {
        assert_eq!(h.http("GET", "/", &[], b"").status, 200);
    }
    thread::sleep(Duration::from_millis(300));
    let before = rss_kib(h.pid());

    // 4 sockets × 2.7 MB of pipelined `GET /` (the demo page answers ~10 KB each): unbounded
    // replies would need gigabytes.
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1024);
    let busy = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (busy, pid) = (busy.clone(), h.pid());
        thread::spawn(move || peak_rss_while(pid, &busy))
    };
    let attackers: Vec<_> = (0..4)
        .map(|_| {
            let port = h.port;
            let request = request.clone();
            thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                set_recv_buffer(&s, 4096);
                let written = write_until_stalled(&mut s, &request, 2_700_000, Duration::from_secs(1));
                (s, written)
            })
        })
        .collect();
    let mut sockets = Vec::new();
    for a in attackers {
        let (s, written) = a.join().unwrap();
        eprintln!("pipelining attacker wrote {written} bytes before herald stopped reading");
        sockets.push(s);
    }
    // Herald stops reading a peer whose answers pile up, and drops it: after 1,000 requests
    // (keep-alive cap), or when its answers sit unread past the handshake timeout (2 s here).
    // The sockets are still open on this side: only herald can have let go of them.
    let closed = wait_until(Duration::from_secs(15), || Held::of(&h.metrics()).slab_entries <= 1);
    busy.store(false, Ordering::Release);
    let peak = sampler.join().unwrap();
    let m = h.metrics();
    eprintln!("RSS {before} KiB before, peak {peak} KiB; {}", m["errors"]);
    assert!(peak < before + 48 * MIB, "RSS grew from {before} KiB to {peak} KiB under unread pipelined requests");
    assert!(closed, "herald still holds the pipelining peers: {m}");

    // The memory their answers took goes back to the allocator once they are gone.
    drop(sockets);
    let settled = wait_until(Duration::from_secs(10), || rss_kib(h.pid()) < before + 16 * MIB);
    assert!(settled, "RSS stayed at {} KiB after the peers closed (was {before} KiB)", rss_kib(h.pid()));
    // And others were served all along.
    assert_eq!(h.health().status, 200);
}

#[test]
fn pipelined_requests_are_all_answered_in_order_when_the_client_reads() {
    let h = herald().start();
    let mut s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    let n = 600;
    let mut batch = Vec::new();
    for i in 0..n {
        batch.extend_from_slice(format!("GET /nope-{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    }
    let writer = {
        let mut w = s.try_clone().unwrap();
        thread::spawn(move || w.write_all(&batch).unwrap())
    };
    let mut seen = 0;
    let mut buf = Vec::new();
    while seen < n {
        let r = read_http_response_buf(&mut s, T, &mut buf).unwrap_or_else(|| panic!("response {seen} of {n} missing"));
        assert_eq!(r.status, 404, "response {seen}");
        seen += 1;
    }
    writer.join().unwrap();
    assert_eq!(h.http("GET", "/health", &[], b"").status, 200);
}

#[test]
fn a_ping_flood_without_reading_is_bounded_and_pongs_are_coalesced() {
    let h = herald().env("HERALD_IDLE_TIMEOUT", "2s").env("HERALD_PING_INTERVAL", "30s").start();
    let mut warm = RawWs::connect(h.port, &token("warm"));
    warm.send(0x9, b"").unwrap();
    warm.read_frame(Instant::now() + T).unwrap();
    thread::sleep(Duration::from_millis(200));
    let before = rss_kib(h.pid());

    let mut raw = RawWs::connect_small_window(h.port, &token("flooder"), 4096);
    let ping = encode_frame(true, 0x9, b"", Some([1, 2, 3, 4])).repeat(4096);
    let written = write_until_stalled(&mut raw.stream, &ping, 2_000_000, Duration::from_secs(1));
    thread::sleep(Duration::from_millis(300));
    let after = rss_kib(h.pid());
    eprintln!("ping flood: {written} bytes ({} pings) written; RSS {before} → {after} KiB", written / 6);
    assert!(after < before + 4 * MIB, "RSS grew from {before} KiB to {after} KiB under an unread Ping flood");

    // RFC 6455 §5.5.3: only the latest Ping needs its Pong.
    let mut pongs = 0;
    let deadline = Instant::now() + Duration::from_secs(1);
    while let Ok(f) = raw.read_frame(deadline) {
        if f.opcode == 0xA {
            pongs += 1;
        }
    }
    eprintln!("ping flood: {pongs} pongs for {} pings", written / 6);
    assert!(pongs * 10 < written / 6, "{pongs} pongs for {} pings: not coalesced", written / 6);

    // A client that reads gets the Pong of its latest Ping.
    let mut ok = RawWs::connect(h.port, &token("reader"));
    for i in 0..200 {
        ok.send(0x9, format!("{i}").as_bytes()).unwrap();
    }
    let mut last = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(800);
    while let Ok(f) = ok.read_frame(deadline) {
        if f.opcode == 0xA {
            last = f.payload;
        }
    }
    assert_eq!(last, b"199", "the last Pong answers the last Ping");
}

#[test]
fn a_websocket_that_never_reads_its_replies_is_closed_and_counted() {
    let h = herald().env("HERALD_IDLE_TIMEOUT", "2s").start();
    let mut raw = RawWs::connect_small_window(h.port, &token("deaf"), 4096);
    // Text pings answered with text pongs: replies, not notifications.
    // Enough that the pongs overflow the kernel's socket buffers (up to 4 MB each way here)
    // and then herald's own bound.
    let pings = encode_frame(true, 0x1, b"ping", Some([9, 8, 7, 6])).repeat(4096);
    let written = write_until_stalled(&mut raw.stream, &pings, 64_000_000, Duration::from_secs(3));
    eprintln!("a deaf client wrote {written} bytes of text pings before herald stopped reading");
    let counted =
        wait_until(Duration::from_secs(15), || h.metrics()["errors"]["output_stalled"].as_i64().unwrap_or(0) >= 1);
    assert!(counted, "a peer that never reads was not closed as stalled: {}", h.metrics());
    assert!(raw.wait_eof(Duration::from_secs(5)), "the stalled peer's socket stayed open");
}

// =======================================================================================
// 3. a relay goes only to the path's own session
// =======================================================================================

#[test]
fn a_focus_session_relay_never_reaches_a_topic_the_member_may_only_read() {
    let h = herald().start();
    let grants = ["focus-session:42", "workspace:7", "project:9"];
    let mut member = connect(h.port, "/ws/focus-session/42", &token_topics("mallory", &grants));
    let mut other_member = connect(h.port, "/ws/focus-session/42", &token_topics("bob", &["focus-session:42"]));
    let mut workspace = connect(h.port, "/ws/tasks/7", &token_topics("victim", &["workspace:7"]));
    let mut project = connect(h.port, "/ws/project/9", &token_topics("victim2", &["project:9"]));
    h.wait_active_connections(4, T);

    for topic in ["workspace:7", "project:9"] {
        send_json(&mut member, &json!({"type": "subscribe", "topic": topic}));
        assert_eq!(recv_json(&mut member, T), json!({"type": "subscribed", "topic": topic}));
    }
    // Whatever the member does with its subscriptions, its relays stay tied to the path's
    // own session (herald may refuse this unsubscribe or accept it).
    send_json(&mut member, &json!({"type": "unsubscribe", "topic": "focus-session:42"}));
    let answer = recv_json(&mut member, T);
    assert!(answer["type"] == "error" || answer["type"] == "unsubscribed", "{answer}");

    send_json(&mut member, &json!({"phish": "click here"}));
    let got = recv_json(&mut other_member, T);
    assert_eq!(got["type"], "focus_session_update");
    assert_eq!(got["session_id"], json!("42"));
    assert_no_message(&mut workspace, Duration::from_millis(500));
    assert_no_message(&mut project, Duration::from_millis(200));
}

// =======================================================================================
// 4. plain sockets cannot exhaust file descriptors
// =======================================================================================

#[test]
fn plain_sockets_held_open_cannot_starve_upgrades_or_health() {
    let h = herald().rlimit_nofile(1000).env("HERALD_HANDSHAKE_TIMEOUT", "5s").start();
    // 1,100 sockets, each kept alive with a `HEAD /health` every 2 s.
    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers = Vec::new();
    for t in 0..4 {
        let (stop, port) = (stop.clone(), h.port);
        attackers.push(thread::spawn(move || {
            let mut socks: Vec<TcpStream> = Vec::new();
            for _ in 0..275 {
                if let Ok(s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500)) {
                    let _ = s.set_nonblocking(true);
                    socks.push(s);
                }
            }
            let mut sink = [0u8; 4096];
            while !stop.load(Ordering::Acquire) {
                for s in socks.iter_mut() {
                    let _ = s.write(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n");
                    while let Ok(n) = s.read(&mut sink) {
                        if n == 0 {
                            break;
                        }
                    }
                }
                for _ in 0..20 {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            }
            eprintln!("attacker thread {t}: {} sockets", socks.len());
        }));
    }
    thread::sleep(Duration::from_secs(2));

    // Legitimate clients are served while the attack holds its sockets.
    let mut clients = Vec::new();
    for i in 0..20 {
        match raw_try_upgrade(h.port, &format!("/ws?token={}", token(&format!("legit{i}"))), &[], T) {
            Ok((r, raw)) if r.status == 101 => clients.push(raw),
            Ok((r, _)) => panic!("upgrade {i} refused during the attack: {} {}", r.status, r.text()),
            Err(e) => panic!("upgrade {i} failed during the attack: {e}"),
        }
    }
    for _ in 0..5 {
        let r = try_http(h.port, "GET", "/health", &[], b"", T).expect("/health during the attack");
        assert_eq!(r.status, 200);
        let m = try_http(h.port, "GET", "/metrics", &[("Accept", "application/json")], b"", T)
            .expect("/metrics during the attack");
        assert_eq!(m.status, 200);
    }
    let m = h.metrics();
    stop.store(true, Ordering::Release);
    for a in attackers {
        a.join().unwrap();
    }
    eprintln!("plain-socket attack: {m}");
    assert!(m["errors"]["http_evicted"].as_i64().unwrap_or(0) > 0, "no plain connection was evicted: {m}");
    for raw in clients.iter_mut() {
        raw.send(0x1, b"ping").unwrap();
        assert_eq!(raw.read_frame(Instant::now() + T).unwrap().payload, b"pong");
    }
}

#[test]
fn the_per_ip_connect_rate_applies_to_plain_http_connections_too() {
    let h = herald().env("HERALD_CONNECT_RATE_PER_IP", "2").start();
    thread::sleep(Duration::from_secs(2));
    let statuses: Vec<u16> =
        (0..12).map(|_| try_http(h.port, "GET", "/health", &[], b"", T).map_or(0, |r| r.status)).collect();
    assert!(statuses.contains(&429), "12 plain requests in a burst at 2/s (burst 4) never got 429: {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
}

#[test]
fn keep_alive_connections_answer_a_bounded_number_of_requests() {
    let h = herald().start();
    let mut s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    let mut last: Option<HttpResponse> = None;
    for i in 0..1000 {
        let r = http_on(&mut s, "GET", "/health", &[], b"", T).unwrap_or_else(|| panic!("request {i}"));
        last = Some(r);
    }
    let last = last.unwrap();
    assert_eq!(last.header("connection"), Some("close"), "the 1000th request on one connection closes it");
    assert!(http_on(&mut s, "GET", "/health", &[], b"", Duration::from_secs(1)).is_none());
}

// =======================================================================================
// 5. size accounting: herald's own additions never cause a drop
// =======================================================================================

fn message_of_len(len: usize) -> serde_json::Value {
    let base = json!({"type": "notification", "payload": ""}).to_string().len();
    json!({"type": "notification", "payload": "x".repeat(len - base)})
}

#[test]
fn a_notification_within_the_limit_is_delivered_in_redis_mode_and_one_over_is_413() {
    let redis = Redis::start();
    let h = herald().api_key().redis(&redis).start();
    redis.wait_subscribers(1, Duration::from_secs(10));
    let mut ws = h.ws(&token("sizer"));
    for len in [499, 512] {
        let message = message_of_len(len);
        assert_eq!(message.to_string().len(), len);
        let r = h.publish(Some(API_KEY), &json!({"user_id": "sizer", "message": message}));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["sent"], true);
        let got = recv_json(&mut ws, T);
        assert_eq!(got["payload"], message["payload"], "a {len}-byte notification must arrive");
    }
    let r = h.publish(Some(API_KEY), &json!({"user_id": "sizer", "message": message_of_len(513)}));
    assert_eq!(r.status, 413, "{}", r.text());
    assert_no_message(&mut ws, Duration::from_millis(300));
}

#[test]
fn a_relay_of_an_object_within_the_inbound_limit_crosses_redis() {
    let redis = Redis::start();
    let h = herald().api_key().redis(&redis).start();
    redis.wait_subscribers(1, Duration::from_secs(10));
    let path = "/ws/focus-session/big";
    let mut a = connect(h.port, path, &token_topics("a", &["focus-session:big"]));
    let mut b = connect(h.port, path, &token_topics("b", &["focus-session:big"]));
    h.wait_active_connections(2, T);
    let data = json!({"note": "y".repeat(490)});
    assert!(data.to_string().len() <= 512);
    send_json(&mut a, &data);
    let got = recv_json(&mut b, T);
    assert_eq!(got["data"], data);
}
