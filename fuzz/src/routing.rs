//! The `upgrade` target's checks, shared with `tls_upgrade`: request bytes →
//! `parse_request` → `routes::handle` with the fuzz `Shared` (HS256 secret, restricted
//! origins, 4 connections, 2 per user, an API key), as the event loop calls it.
//!
//! Invariants: no panics; an upgrade with an identity only for a GET with the upgrade
//! headers, a valid key, an allowed (or absent) Origin and a token that verifies (and allows
//! the path's topic); its 101 answer carries the RFC 6455 accept key; an auth failure only
//! opens for dialects that report failures after opening; refusals render as HTTP; admission
//! counters return to zero when the connection is "closed" again.

use std::net::{IpAddr, Ipv4Addr};

use herald::dialect::{self, AuthFailure, Stream};
use herald::http::routes::{self, Outcome};
use herald::http::{Method, Parsed, Request, parse_request};
use herald::message::JsonScratch;

use crate::{ALLOWED_ORIGINS, shared};

fn accept_key(key: &str) -> String {
    tungstenite_free_accept(key)
}

/// RFC 6455 accept key: base64(SHA-1(key + GUID)), with a tiny SHA-1 so the check does not
/// reuse herald's own dependency.
fn tungstenite_free_accept(key: &str) -> String {
    let mut msg = key.as_bytes().to_vec();
    msg.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(sha1(&msg))
}

fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for chunk in msg.chunks(64) {
        let mut w = [0u32; 80];
        for i in 0..16 {
            w[i] = u32::from_be_bytes(chunk[i * 4..i * 4 + 4].try_into().unwrap());
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a.rotate_left(5).wrapping_add(f).wrapping_add(e).wrapping_add(k).wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

/// The token a request presents: `?token=` when not empty, else `Authorization: Bearer`.
fn request_token(request: &Request) -> Option<String> {
    request.query_param("token").filter(|t| !t.is_empty()).or_else(|| request.bearer().map(str::to_owned))
}

/// Parses `data` as the event loop's HTTP phase does, routes the request with the fuzz
/// `Shared` and checks the outcome (module docs). Returns what the server writes back at once:
/// the 101 of an upgrade or a rendered response; `None` for an incomplete or invalid request
/// and for the publish API, whose answer waits for the broker.
pub fn check(data: &[u8]) -> Option<Vec<u8>> {
    let Parsed::Complete { request, .. } = parse_request(data) else { return None };
    let shared = shared();
    let mut scratch = JsonScratch::default();
    let peer = IpAddr::V4(Ipv4Addr::new(203, 0, 113, data.len() as u8));
    let before = shared.admission.websockets();
    assert_eq!(before, 0, "admission counter leaked between runs");
    assert_eq!(shared.routing.table.user_count(), 0, "per-user counts leaked between runs");
    let outcome = routes::handle(&request, peer, shared, &mut scratch);
    let route = dialect::for_path(&request.path);
    let sent = match outcome {
        Outcome::Upgrade(upgrade) => {
            let (dialect, stream) = route.expect("upgrade on a path with no dialect");
            assert!(std::ptr::eq(upgrade.dialect, dialect));
            assert_eq!(upgrade.stream, stream);
            assert_eq!(request.method(), Method::Get);
            assert!(request.upgrade_websocket && request.connection_upgrade);
            assert_eq!(request.ws_version.as_deref(), Some("13"));
            if let Some(origin) = request.origin.as_deref() {
                let origin = origin.trim_end_matches('/').to_ascii_lowercase();
                assert!(ALLOWED_ORIGINS.contains(&origin.as_str()), "origin {origin:?} let through");
            }
            let key = request.ws_key.as_deref().expect("upgrade without a key");
            let response = String::from_utf8(upgrade.response.clone()).expect("101 is text");
            assert!(response.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
            assert!(response.ends_with("\r\n\r\n"));
            assert!(
                response.contains(&format!("\r\nSec-WebSocket-Accept: {}\r\n", accept_key(key))),
                "wrong accept key for {key:?}: {response}"
            );
            match &upgrade.identity {
                Ok(identity) => {
                    let token = request_token(&request).expect("identity without a token");
                    let again = shared.verifier.verify(&token).expect("identity from a token that does not verify");
                    assert_eq!(&again, identity);
                    if let Stream::Topic(topic) = &upgrade.stream {
                        assert!(identity.allows_topic(topic), "topic {topic:?} not allowed by {:?}", identity.topics);
                    }
                    // The connection closes again: give back what admission took.
                    shared.admission.release(&shared.routing.table, &identity.user);
                }
                Err(code) => {
                    assert_eq!(dialect.auth_failure, AuthFailure::CloseAfterOpen(*code));
                }
            }
            Some(upgrade.response)
        }
        Outcome::Respond(response) => {
            let status = response.status.0;
            assert!((200..600).contains(&status) && status != 101);
            let rendered = response.render(request.method() == Method::Head);
            assert!(rendered.starts_with(format!("HTTP/1.1 {status} ").as_bytes()));
            if route.is_some() {
                // A dialect path never answers 2xx without upgrading.
                assert!(status >= 400, "dialect path answered {status}");
            }
            Some(rendered)
        }
        Outcome::EventStream(open) => {
            // `GET /sse`: an authenticated stream whose topics the token allows, from an
            // allowed origin, answered 200 text/event-stream at once.
            assert_eq!(request.method(), Method::Get);
            assert_eq!(request.path, "/sse");
            assert!(route.is_none(), "an event stream on a WebSocket path");
            if let Some(origin) = request.origin.as_deref() {
                let origin = origin.trim_end_matches('/').to_ascii_lowercase();
                assert!(ALLOWED_ORIGINS.contains(&origin.as_str()), "origin {origin:?} let through");
            }
            let token = request_token(&request).expect("an event stream without a token");
            let again = shared.verifier.verify(&token).expect("a stream from a token that does not verify");
            assert_eq!(again, open.identity);
            for topic in &open.topics {
                assert!(open.identity.allows_topic(topic), "topic {topic:?} not allowed by {:?}", open.identity.topics);
            }
            let head = String::from_utf8(open.head.clone()).expect("the stream's head is text");
            assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
            assert!(head.contains("\r\nContent-Type: text/event-stream"), "{head}");
            // The stream closes again: give back what admission took.
            shared.admission.release(&shared.routing.table, &open.identity.user);
            Some(open.head)
        }
        Outcome::Publish(_) | Outcome::Disconnect(_) => {
            assert_eq!(request.method(), Method::Post);
            None
        }
        Outcome::Presence(_) => {
            // `GET /api/presence/{id}` or `POST /api/presence`; answered by the broker.
            assert!(matches!(request.method(), Method::Get | Method::Post));
            assert!(request.path.starts_with("/api/presence"));
            None
        }
        Outcome::History(query) => {
            // `GET /api/history/{id}`, authorized, with a bounded limit.
            assert_eq!(request.method(), Method::Get);
            assert!(request.path.starts_with("/api/history/"));
            assert!((1..=1000).contains(&query.limit), "limit {} let through", query.limit);
            None
        }
    };
    assert_eq!(shared.admission.websockets(), 0, "admission counter leaked");
    assert_eq!(shared.routing.table.user_count(), 0, "per-user counts leaked");
    sent
}
