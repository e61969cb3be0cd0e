//! Bad input: malformed HTTP, oversized headers, protocol violations in WebSocket frames,
//! clients vanishing half-way. The offender gets a clear status or close code; nothing else
//! is affected.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(5);
const MASK: Option<[u8; 4]> = Some([1, 2, 3, 4]);

/// A herald and a bystander connection that must survive whatever the test does.
fn herald_with_bystander() -> (Herald, Ws) {
    let h = herald().start();
    let ws = h.ws(&token("bystander"));
    (h, ws)
}

fn assert_bystander_fine(h: &Herald, ws: &mut Ws, expected_active: i64) {
    assert_alive(ws);
    assert_eq!(h.health().status, 200);
    h.wait_active_connections(expected_active, T);
}

#[test]
fn unmasked_client_frame_closes_1002() {
    let (h, mut other) = herald_with_bystander();
    let mut raw = RawWs::connect(h.port, &token("u1"));
    raw.send_frame(true, 0x1, b"ping", None).unwrap();
    raw.expect_close_code(1002, T);
    assert_bystander_fine(&h, &mut other, 1);
}

#[test]
fn invalid_utf8_text_frame_closes_1007() {
    let (h, mut other) = herald_with_bystander();
    let mut raw = RawWs::connect(h.port, &token("u1"));
    raw.send(0x1, &[b'h', b'i', 0xff, 0xfe, 0xc3, 0x28]).unwrap();
    raw.expect_close_code(1007, T);
    assert_bystander_fine(&h, &mut other, 1);
}

#[test]
fn binary_frame_closes_1003() {
    let (h, mut other) = herald_with_bystander();
    let mut raw = RawWs::connect(h.port, &token("u1"));
    raw.send(0x2, &[0, 1, 2, 3]).unwrap();
    raw.expect_close_code(1003, T);
    assert_bystander_fine(&h, &mut other, 1);
}

#[test]
fn text_frame_over_max_message_bytes_closes_1009() {
    let (h, mut other) = herald_with_bystander();
    let mut raw = RawWs::connect(h.port, &token("u1"));
    // within the default 512-byte limit: accepted (ignored), connection stays
    raw.send(0x1, "a".repeat(500).as_bytes()).unwrap();
    raw.send(0x1, b"ping").unwrap();
    let f = raw.read_frame(Instant::now() + T).expect("pong after a 500-byte frame");
    assert_eq!((f.opcode, f.payload.as_slice()), (0x1, &b"pong"[..]));
    // over it
    raw.send(0x1, "b".repeat(600).as_bytes()).unwrap();
    raw.expect_close_code(1009, T);
    assert_bystander_fine(&h, &mut other, 1);
}

#[test]
fn configured_max_message_bytes_applies_to_inbound_frames() {
    let h = herald().env("HERALD_MAX_MESSAGE_BYTES", "64").start();
    let mut raw = RawWs::connect(h.port, &token("u1"));
    raw.send(0x1, "c".repeat(100).as_bytes()).unwrap();
    raw.expect_close_code(1009, T);
}

#[test]
fn huge_declared_frame_length_closes_1009_without_waiting_for_payload() {
    let (h, mut other) = herald_with_bystander();
    let mut raw = RawWs::connect(h.port, &token("u1"));
    // header of a masked text frame claiming 64 MiB, then only a few bytes
    let mut hdr = vec![0x81, 0x80 | 127];
    hdr.extend_from_slice(&(64u64 << 20).to_be_bytes());
    hdr.extend_from_slice(&[9, 9, 9, 9]);
    hdr.extend_from_slice(b"abc");
    raw.write_raw(&hdr).unwrap();
    raw.expect_close_code(1009, T);
    assert_bystander_fine(&h, &mut other, 1);
}

#[test]
fn unknown_opcode_closes_1002() {
    let (h, mut other) = herald_with_bystander();
    let mut raw = RawWs::connect(h.port, &token("u1"));
    raw.send_frame(true, 0x3, b"??", MASK).unwrap();
    raw.expect_close_code(1002, T);
    assert_bystander_fine(&h, &mut other, 1);
}

#[test]
fn reserved_bits_without_extension_close_1002() {
    let h = herald().start();
    let mut raw = RawWs::connect(h.port, &token("u1"));
    let mut frame = encode_frame(true, 0x1, b"ping", MASK);
    frame[0] |= 0x40; // RSV1
    raw.write_raw(&frame).unwrap();
    raw.expect_close_code(1002, T);
}

#[test]
fn continuation_without_a_start_closes_1002() {
    let h = herald().start();
    let mut raw = RawWs::connect(h.port, &token("u1"));
    raw.send_frame(true, 0x0, b"orphan", MASK).unwrap();
    raw.expect_close_code(1002, T);
}

#[test]
fn fragmented_text_message_is_reassembled() {
    let h = herald().start();
    let mut raw = RawWs::connect(h.port, &token("u1"));
    raw.send_frame(false, 0x1, b"pi", MASK).unwrap();
    // a control frame may be interleaved between fragments
    raw.send_frame(true, 0x9, b"mid", MASK).unwrap();
    raw.send_frame(true, 0x0, b"ng", MASK).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + T;
    while got.len() < 2 {
        let f = raw.read_frame(deadline).unwrap_or_else(|e| panic!("after fragments: {e:?}, got {got:?}"));
        got.push((f.opcode, String::from_utf8_lossy(&f.payload).to_string()));
    }
    assert!(got.contains(&(0xA, "mid".to_string())), "no pong for the interleaved ping: {got:?}");
    assert!(got.contains(&(0x1, "pong".to_string())), "fragmented 'ping' was not answered: {got:?}");
}

#[test]
fn client_close_frame_is_echoed_and_connection_ends() {
    let (h, mut other) = herald_with_bystander();
    let mut raw = RawWs::connect(h.port, &token("u1"));
    h.wait_active_connections(2, T);
    raw.send(0x8, &[0x03, 0xE8, b'b', b'y', b'e']).unwrap();
    match raw.read_close(T) {
        Ok(Some(code)) => assert_eq!(code, 1000, "echoed close code"),
        Ok(None) => {} // an empty close frame is a valid reply
        Err(e) => panic!("no close frame in reply to the client's close: {e:?}"),
    }
    assert!(raw.wait_eof(T), "server did not close TCP after the close handshake");
    assert_bystander_fine(&h, &mut other, 1);
}

#[test]
fn malformed_http_request_gets_400() {
    let h = herald().start();
    let r = http_raw(h.port, b"THIS IS NOT HTTP\r\n\r\n", T).expect("a response to a malformed request line");
    assert_eq!(r.status, 400);
    let r = http_raw(h.port, b"GET /health HTTP/1.1\r\nHost: x\r\nBroken header line\r\n\r\n", T)
        .expect("a response to a malformed header");
    assert_eq!(r.status, 400);
    assert_eq!(h.health().status, 200);
}

#[test]
fn request_headers_over_8_kib_get_431() {
    let h = herald().start();
    let big = "v".repeat(9000);
    let req = format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let r = http_raw(h.port, req.as_bytes(), T).expect("a response to oversized headers");
    assert_eq!(r.status, 431);
    // many medium headers adding up to more than 8 KiB
    let mut req = String::from("GET /health HTTP/1.1\r\nHost: x\r\n");
    for i in 0..40 {
        req.push_str(&format!("X-H{i}: {}\r\n", "w".repeat(250)));
    }
    req.push_str("\r\n");
    let r = http_raw(h.port, req.as_bytes(), T).expect("a response to oversized headers");
    assert_eq!(r.status, 431);
    assert_eq!(h.health().status, 200);
}

#[test]
fn request_headers_under_8_kib_are_fine() {
    let h = herald().start();
    let r = h.http("GET", "/health", &[("X-Padding", &"p".repeat(6000))], b"");
    assert_eq!(r.status, 200);
    // an upgrade with a long token in the query and a padded header
    let pad = "q".repeat(5000);
    let (resp, _raw) = raw_upgrade_response(h.port, &format!("/ws?token={}", token("u1")), &[("X-Pad", &pad)]);
    assert_eq!(resp.status, 101);
}

#[test]
fn garbage_bytes_close_the_connection_and_server_keeps_serving() {
    let (h, mut other) = herald_with_bystander();
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let mut s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    s.set_write_timeout(Some(T)).unwrap();
    let _ = s.write_all(&garbage);
    match read_http_response(&mut s, T) {
        Some(r) => assert_eq!(r.status, 400, "garbage should get 400 if anything"),
        None => {
            // no parsable response: the connection must at least be closed, not left hanging
            let mut buf = [0u8; 64];
            s.set_read_timeout(Some(T)).unwrap();
            match std::io::Read::read(&mut s, &mut buf) {
                Ok(0) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                    panic!("garbage connection left open")
                }
                _ => {}
            }
        }
    }
    assert_bystander_fine(&h, &mut other, 1);
}

#[test]
fn client_vanishing_mid_handshake_does_not_affect_others() {
    let (h, mut other) = herald_with_bystander();
    for i in 0..5 {
        let mut s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
        let req = upgrade_request(h.port, &format!("/ws?token={}", token("ghost")), &[]);
        s.write_all(&req.as_bytes()[..req.len() / (i + 2)]).unwrap();
        drop(s);
    }
    assert_bystander_fine(&h, &mut other, 1);
    let mut again = h.ws(&token("ghost"));
    assert_alive(&mut again);
    h.wait_active_connections(2, T);
}

#[test]
fn client_vanishing_mid_frame_does_not_affect_others() {
    let (h, mut other) = herald_with_bystander();
    let mut raw = RawWs::connect(h.port, &token("u1"));
    h.wait_active_connections(2, T);
    let frame = encode_frame(true, 0x1, "x".repeat(100).as_bytes(), MASK);
    raw.write_raw(&frame[..30]).unwrap();
    raw.shutdown();
    drop(raw);
    h.wait_active_connections(1, T);
    h.wait_unique_users(1, Duration::from_secs(2));
    assert_bystander_fine(&h, &mut other, 1);
}

#[test]
fn many_abrupt_disconnects_leave_correct_counts() {
    let (h, mut other) = herald_with_bystander();
    let mut conns: Vec<Ws> = (0..20).map(|i| h.ws(&token(&format!("user{}", i % 5)))).collect();
    h.wait_active_connections(21, T);
    h.wait_unique_users(6, Duration::from_secs(2));
    // half close politely, half just drop the socket
    for (i, ws) in conns.iter_mut().enumerate() {
        if i % 2 == 0 {
            let _ = ws.close(None);
            let _ = ws.flush();
        }
    }
    drop(conns);
    h.wait_active_connections(1, T);
    h.wait_unique_users(1, Duration::from_secs(2));
    assert_bystander_fine(&h, &mut other, 1);
}
