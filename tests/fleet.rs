//! Herald instances over one Redis as one system: exact subscriptions (an instance is
//! subscribed to exactly the channels of the users and topics it holds), confirmed before a
//! connection's 101, and made again after Redis comes back.

mod common;

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(20);
const CLIENT_THREADS: usize = 4;

fn send_json(ws: &mut Ws, v: &serde_json::Value) {
    ws.send(tungstenite::Message::text(v.to_string())).expect("send");
}

/// The channels Redis has subscribers for, matching `pattern`.
fn subscribed_channels(redis: &Redis, pattern: &str) -> BTreeSet<String> {
    match redis.conn().command(&["PUBSUB", "CHANNELS", pattern]) {
        Resp::Array(Some(items)) => items
            .into_iter()
            .map(|item| match item {
                Resp::Bulk(Some(b)) => String::from_utf8(b).expect("channel names are UTF-8"),
                other => panic!("PUBSUB CHANNELS item: {other:?}"),
            })
            .collect(),
        other => panic!("PUBSUB CHANNELS: {other:?}"),
    }
}

/// Waits until Redis's subscribed user channels are exactly those of `users`, and herald's
/// own count agrees.
fn wait_channels_are(redis: &Redis, h: &Herald, users: &BTreeSet<usize>, timeout: Duration) {
    let expected: BTreeSet<String> = users.iter().map(|u| format!("user_noti:fleet{u}")).collect();
    let mut seen = BTreeSet::new();
    let ok = wait_until(timeout, || {
        seen = subscribed_channels(redis, "user_noti:*");
        seen == expected
    });
    let missing: Vec<_> = expected.difference(&seen).take(5).collect();
    let extra: Vec<_> = seen.difference(&expected).take(5).collect();
    assert!(
        ok,
        "Redis has {} user channels subscribed, herald holds {} users; missing {missing:?}, extra {extra:?}",
        seen.len(),
        expected.len()
    );
    let ok = wait_until(T, || h.metrics()["redis"]["subscriptions"] == json!(expected.len()));
    assert!(ok, "herald counts {} subscriptions, Redis {}", h.metrics()["redis"]["subscriptions"], expected.len());
}

/// Reads one HTTP response head; returns its status line.
fn read_status(s: &mut TcpStream) -> Result<String, String> {
    let mut buf = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    // Byte by byte: nothing after the head (a first message) may be consumed by accident.
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(0) => return Err(format!("EOF after {:?}", String::from_utf8_lossy(&buf))),
            Ok(_) => buf.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(String::from_utf8_lossy(&buf).lines().next().unwrap_or_default().to_string())
}

/// Opens one upgraded connection per entry of `users` (several threads, every upgrade sent
/// before any answer is read, as a burst of clients would).
fn open_burst(port: u16, users: &[usize]) -> Vec<(usize, TcpStream)> {
    let per_thread = users.len().div_ceil(CLIENT_THREADS).max(1);
    let handles: Vec<_> = users
        .chunks(per_thread)
        .map(|chunk| {
            let chunk = chunk.to_vec();
            thread::spawn(move || -> Result<Vec<(usize, TcpStream)>, String> {
                let mut socks = Vec::with_capacity(chunk.len());
                for user in chunk {
                    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
                    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
                    let request = upgrade_request(port, &format!("/ws?token={}", token(&format!("fleet{user}"))), &[]);
                    s.write_all(request.as_bytes()).map_err(|e| format!("write upgrade: {e}"))?;
                    socks.push((user, s));
                }
                for (_, s) in socks.iter_mut() {
                    let status = read_status(s)?;
                    if !status.starts_with("HTTP/1.1 101") {
                        return Err(format!("upgrade answered {status:?}"));
                    }
                }
                Ok(socks)
            })
        })
        .collect();
    let mut open = Vec::with_capacity(users.len());
    for h in handles {
        open.extend(h.join().expect("client thread panicked").unwrap_or_else(|e| panic!("burst failed: {e}")));
    }
    open
}

/// A small deterministic generator: the test is the same on every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn exact_subscriptions_follow_20000_connections_opened_and_closed_in_bursts() {
    const BURSTS: usize = 4;
    const PER_BURST: usize = 5_000;
    const USERS: u64 = 7_000;
    let redis = Redis::start();
    let h = herald().redis(&redis).env("HERALD_MAX_CONNECTIONS", "12000").start();
    redis.wait_subscribers(1, Duration::from_secs(10));
    let mut rng = Lcg(7);
    let mut open: Vec<(usize, TcpStream)> = Vec::new();
    let started = Instant::now();
    for burst in 0..BURSTS {
        // Users repeat within and across bursts: a channel is shared by several connections,
        // sometimes on different loops, and must stay while any of them does.
        let users: Vec<usize> = (0..PER_BURST).map(|_| (rng.next() % USERS) as usize).collect();
        open.extend(open_burst(h.port, &users));
        let held: BTreeSet<usize> = open.iter().map(|(u, _)| *u).collect();
        wait_channels_are(&redis, &h, &held, Duration::from_secs(30));
        // Half of everything open goes, at once.
        let mut kept = Vec::with_capacity(open.len() / 2 + 1);
        for (i, conn) in open.into_iter().enumerate() {
            if (i as u64 + rng.next()) % 2 == 0 {
                kept.push(conn);
            }
        }
        open = kept;
        let held: BTreeSet<usize> = open.iter().map(|(u, _)| *u).collect();
        wait_channels_are(&redis, &h, &held, Duration::from_secs(30));
        eprintln!(
            "burst {burst}: {} connections, {} users held, {:?} so far",
            open.len(),
            held.len(),
            started.elapsed()
        );
        // Held users receive, and only through their own channel.
        let sample = *held.iter().next().expect("some users are held");
        assert_eq!(redis.publish(&format!("user_noti:fleet{sample}"), r#"{"type":"probe"}"#), 1);
        let gone = (0..USERS as usize).find(|u| !held.contains(u)).expect("some users are not held");
        assert_eq!(redis.publish(&format!("user_noti:fleet{gone}"), r#"{"type":"probe"}"#), 0);
    }
    drop(open);
    wait_channels_are(&redis, &h, &BTreeSet::new(), Duration::from_secs(30));
    h.wait_unique_users(0, T);
}

#[test]
fn a_message_published_right_after_the_101_is_delivered() {
    let redis = Redis::start();
    let h = herald().redis(&redis).start();
    redis.wait_subscribers(1, Duration::from_secs(10));
    for i in 0..100 {
        // A user new to the instance each time: its channel is subscribed during this upgrade.
        let user = format!("fresh{i}");
        let mut ws = h.ws(&token(&user));
        let receivers = redis.publish(&format!("user_noti:{user}"), &json!({"type": "first", "n": i}).to_string());
        assert_eq!(receivers, 1, "the 101 of {user} came before its subscription");
        assert_eq!(recv_json(&mut ws, T)["n"], i);
    }
    // The same holds for a topic subscribed at run time: `subscribed` comes after Redis's.
    let tok = token_claims(json!({"sub": "t", "topics": ["room:*"], "exp": now_secs() + 3600}));
    let mut ws = h.ws(&tok);
    for i in 0..50 {
        let topic = format!("room:{i}");
        send_json(&mut ws, &json!({"type": "subscribe", "topic": topic}));
        assert_eq!(recv_json(&mut ws, T)["type"], "subscribed");
        assert_eq!(redis.publish(&format!("topic_noti:{topic}"), r#"{"type":"t"}"#), 1, "{topic}");
        assert_eq!(recv_json(&mut ws, T)["type"], "t");
    }
}

#[test]
fn every_held_channel_is_subscribed_again_after_redis_comes_back() {
    let mut redis = Redis::start();
    let h = herald().redis(&redis).start();
    redis.wait_subscribers(1, Duration::from_secs(10));
    let before: Vec<_> = (0..300).map(|u| h.ws(&token(&format!("fleet{u}")))).collect();
    wait_channels_are(&redis, &h, &(0..300).collect(), T);
    redis.kill();
    // While Redis is away, upgrades do not wait for it.
    let during: Vec<_> = (300..400).map(|u| h.ws(&token(&format!("fleet{u}")))).collect();
    redis.restart();
    wait_channels_are(&redis, &h, &(0..400).collect(), Duration::from_secs(20));
    let mut last = during.into_iter().last().expect("connections made during the outage");
    redis.publish("user_noti:fleet399", r#"{"type":"after"}"#);
    assert_eq!(recv_json(&mut last, T)["type"], "after");
    drop(before);
    wait_channels_are(&redis, &h, &(399..400).collect(), T);
}
