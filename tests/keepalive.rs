//! Ping frames, idle timeout, text ping/pong, handshake timeout.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tungstenite::Message;

const T: Duration = Duration::from_secs(5);

/// Waits for the next Ping frame; panics on text/close/timeout.
fn next_ping(ws: &mut Ws, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        match ws_next(ws, deadline) {
            None => panic!("no Ping frame within {timeout:?}"),
            Some(Ok(Message::Ping(_))) => return Instant::now(),
            Some(Ok(Message::Pong(_))) => continue,
            Some(Ok(m)) => panic!("unexpected message while waiting for Ping: {m:?}"),
            Some(Err(e)) => panic!("connection error while waiting for Ping: {e}"),
        }
    }
}

#[test]
fn server_sends_ping_frames_at_the_configured_interval() {
    let h = herald().env("HERALD_PING_INTERVAL", "1s").start();
    let mut ws = h.ws(&token("u1"));
    let start = Instant::now();
    let p1 = next_ping(&mut ws, Duration::from_secs(3));
    let p2 = next_ping(&mut ws, Duration::from_secs(3));
    let p3 = next_ping(&mut ws, Duration::from_secs(3));
    assert!(p1 - start <= Duration::from_millis(2500), "first ping after {:?}", p1 - start);
    let gap = (p3 - p1) / 2;
    assert!(
        gap >= Duration::from_millis(500) && gap <= Duration::from_millis(2000),
        "pings should come about every 1 s, average gap was {gap:?}"
    );
    let _ = p2;
}

#[test]
fn no_ping_frames_before_the_default_interval() {
    // the default is 30 s: a fresh connection gets no Ping within 2 s
    let h = herald().start();
    let mut ws = h.ws(&token("u1"));
    let deadline = Instant::now() + Duration::from_secs(2);
    match ws_next(&mut ws, deadline) {
        None => {}
        Some(Ok(Message::Ping(_))) => panic!("Ping frame long before the 30 s default interval"),
        Some(Ok(other)) => panic!("unexpected message {other:?}"),
        Some(Err(e)) => panic!("connection error {e}"),
    }
}

#[test]
fn silent_client_is_closed_after_idle_timeout() {
    let h = herald().env("HERALD_PING_INTERVAL", "1s").env("HERALD_IDLE_TIMEOUT", "2s").start();
    let mut raw = RawWs::connect(h.port, &token("silent"));
    let start = Instant::now();
    h.wait_active_connections(1, T);
    // never answer anything; just wait for the server to give up
    thread::sleep(Duration::from_millis(1200));
    assert!(h.active_connections() == 1, "closed before the idle timeout");
    assert!(raw.wait_eof(Duration::from_secs(5)), "silent client still open {:?} after connect", start.elapsed());
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(1500), "closed after only {took:?}; idle timeout is 2 s");
    h.wait_active_connections(0, T);
}

#[test]
fn client_answering_pings_stays_open_past_idle_timeout() {
    let h = herald().env("HERALD_PING_INTERVAL", "500ms").env("HERALD_IDLE_TIMEOUT", "2s").start();
    let mut ws = h.ws(&token("lively"));
    // tungstenite answers every Ping with a Pong while we read
    let deadline = Instant::now() + Duration::from_millis(4500);
    let mut pings = 0;
    while let Some(m) = ws_next(&mut ws, deadline) {
        match m {
            Ok(Message::Ping(_)) => {
                pings += 1;
                ws.flush().ok();
            }
            Ok(other) => panic!("unexpected message {other:?}"),
            Err(e) => panic!("a client answering pings was disconnected: {e}"),
        }
    }
    assert!(pings >= 4, "expected ~9 pings in 4.5 s, got {pings}");
    assert_alive(&mut ws);
}

#[test]
fn client_sending_data_is_not_idle() {
    let h = herald().env("HERALD_IDLE_TIMEOUT", "2s").start();
    let mut raw = RawWs::connect(h.port, &token("chatty"));
    let end = Instant::now() + Duration::from_millis(3500);
    while Instant::now() < end {
        raw.send(0x1, b"ping").expect("connection closed although the client keeps sending");
        match raw.read_frame(Instant::now() + T) {
            Ok(f) => {
                assert_eq!(f.opcode, 0x1, "expected a text pong, got {f:?}");
                assert_eq!(f.payload, b"pong");
            }
            Err(e) => panic!("connection ended although the client keeps sending: {e:?}"),
        }
        thread::sleep(Duration::from_millis(400));
    }
}

#[test]
fn text_ping_gets_text_pong() {
    let h = herald().start();
    let mut ws = h.ws(&token("u1"));
    for _ in 0..3 {
        ws.send(Message::text("ping")).unwrap();
        assert_eq!(recv_text(&mut ws, T), "pong");
    }
}

#[test]
fn json_ping_gets_json_pong() {
    let h = herald().start();
    let mut ws = h.ws(&token("u1"));
    ws.send(Message::text(r#"{"type":"ping"}"#)).unwrap();
    assert_eq!(recv_json(&mut ws, T), json!({"type": "pong"}));
    ws.send(Message::text(r#"{"action":"ping"}"#)).unwrap();
    assert_eq!(recv_json(&mut ws, T), json!({"action": "pong"}));
}

#[test]
fn unknown_client_messages_are_ignored() {
    let h = herald().start();
    let mut ws = h.ws(&token("u1"));
    for m in ["hello", r#"{"foo":1}"#, "[]", r#"{"action":"dance"}"#, ""] {
        ws.send(Message::text(m)).unwrap();
    }
    assert_no_message(&mut ws, Duration::from_millis(400));
    assert_alive(&mut ws);
}

#[test]
fn ping_frame_from_client_gets_pong_frame() {
    let h = herald().start();
    let mut raw = RawWs::connect(h.port, &token("u1"));
    raw.send(0x9, b"are-you-there").unwrap();
    let f = raw.read_frame(Instant::now() + T).expect("pong frame");
    assert_eq!(f.opcode, 0xA, "expected Pong, got {f:?}");
    assert_eq!(f.payload, b"are-you-there");
    assert!(!f.masked, "server frames must not be masked");
}

fn assert_dropped_within(mut s: TcpStream, min: Duration, max: Duration, start: Instant) {
    let deadline = start + max;
    let mut buf = [0u8; 1024];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        assert!(!remaining.is_zero(), "connection still open after {max:?}");
        s.set_read_timeout(Some(remaining)).unwrap();
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => break,
            Ok(_) => continue, // e.g. a 408 response before closing
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                panic!("connection still open after {max:?}")
            }
            Err(_) => break, // reset
        }
    }
    let took = start.elapsed();
    assert!(took >= min, "dropped after only {took:?}");
}

#[test]
fn incomplete_http_request_is_dropped_after_handshake_timeout() {
    let h = herald().env("HERALD_HANDSHAKE_TIMEOUT", "1s").start();
    let mut s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    let start = Instant::now();
    write!(s, "GET /ws?token={} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n", token("u1")).unwrap();
    assert_dropped_within(s, Duration::from_millis(700), Duration::from_secs(4), start);
    // other clients are unaffected
    assert_eq!(h.health().status, 200);
}

#[test]
fn silent_tcp_connection_is_dropped_after_handshake_timeout() {
    let h = herald().env("HERALD_HANDSHAKE_TIMEOUT", "1s").start();
    let s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    let start = Instant::now();
    assert_dropped_within(s, Duration::from_millis(700), Duration::from_secs(4), start);
}

#[test]
fn trickling_request_is_dropped_after_handshake_timeout() {
    // the timeout bounds the whole request, not the gap between bytes
    let h = herald().env("HERALD_HANDSHAKE_TIMEOUT", "1s").start();
    let mut s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let start = Instant::now();
    let req = format!("GET /ws?token={} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: {}\r\n", token("u1"), "a".repeat(40));
    let mut dropped = false;
    for b in req.bytes() {
        if s.write_all(&[b]).is_err() {
            dropped = true;
            break;
        }
        // peek whether the server closed
        s.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 256];
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => dropped = true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => dropped = true,
        }
        s.set_nonblocking(false).unwrap();
        if dropped || start.elapsed() > Duration::from_secs(4) {
            break;
        }
        thread::sleep(Duration::from_millis(40));
    }
    let took = start.elapsed();
    assert!(dropped, "trickling client still connected after {took:?}");
    assert!(took >= Duration::from_millis(700) && took <= Duration::from_secs(3), "dropped after {took:?}");
}

#[test]
fn handshake_timeout_does_not_affect_established_connections() {
    let h = herald().env("HERALD_HANDSHAKE_TIMEOUT", "1s").start();
    let mut ws = h.ws(&token("u1"));
    thread::sleep(Duration::from_millis(2000));
    assert_alive(&mut ws);
    // and plain HTTP keeps working
    let v: Value = h.health_json();
    assert_eq!(v["websocket"]["active_connections"], 1);
}
