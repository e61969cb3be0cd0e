//! Per-message and per-connection costs of herald's hot paths, each in isolation.
//!
//! Run: `cargo bench --bench core` (HTML reports land in target/criterion).

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use herald::auth::{Verifier, mint};
use herald::broker::redis::resp::{self, Decoded, Decoder, Limits};
use herald::config::JwtKey;
use herald::conn::inbound::{Flow, FrameReader};
use herald::conn::send_queue::SendQueue;
use herald::frame;
use herald::ids::{Exclusion, Target};
use herald::mailbox::{self, LoopCmd};
use herald::message::{self, JsonScratch};
use herald::route::{RouteTable, Sender};

const NOTIFICATION: &[u8] =
    br#"{"type":"notification","payload":{"title":"New Order","message":"You have a new order #12345","icon":"order","link":"/orders/12345"}}"#;

fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Bytes(NOTIFICATION.len() as u64));
    group.bench_function("encode_notification_frame", |b| {
        let born = Instant::now();
        b.iter(|| frame::notification(black_box(NOTIFICATION), born))
    });
    group.finish();
}

fn validation(c: &mut Criterion) {
    let mut group = c.benchmark_group("message");
    let mut scratch = JsonScratch::default();
    let now = SystemTime::now();
    group.throughput(Throughput::Bytes(NOTIFICATION.len() as u64));
    group.bench_function("validate_stamp_frame", |b| {
        b.iter(|| message::encode_notification(black_box(NOTIFICATION), 512, &mut scratch, now, Instant::now()))
    });
    let stamped = br#"{"type":"x","payload":{"a":1},"timestamp":"2025-01-21T10:30:00.123Z"}"#;
    group.bench_function("validate_already_stamped", |b| {
        b.iter(|| message::encode_notification(black_box(stamped), 512, &mut scratch, now, Instant::now()))
    });
    group.bench_function("parse_client_message", |b| {
        b.iter(|| message::parse_client_message(black_box(r#"{"action":"ack","notification_id":123}"#), &mut scratch))
    });
    group.finish();
}

fn jwt(c: &mut Criterion) {
    let secret = b"bench-secret".to_vec();
    let verifier = Verifier::new(&JwtKey::Secret(secret.clone())).expect("secret key");
    let token = mint(&secret, "user123", Duration::from_secs(3600), &["project:*".into()], None);
    c.bench_function("jwt/verify_hs256", |b| b.iter(|| verifier.verify(black_box(&token))));
}

fn inbound(c: &mut Criterion) {
    // Ten masked client text frames, as one read would return them.
    let bytes = wsframe::masked_text(br#"{"action":"ping"}"#, [1, 2, 3, 4]).repeat(10);
    let mut group = c.benchmark_group("inbound");
    group.throughput(Throughput::Elements(10));
    group.bench_function("parse_10_client_frames", |b| {
        let mut reader = FrameReader::default();
        let mut buf = bytes.clone();
        b.iter(|| {
            buf.copy_from_slice(&bytes);
            let mut n = 0;
            let _ = reader.feed(&mut buf, 512, |_| {
                n += 1;
                Flow::Continue
            });
            n
        })
    });
    group.finish();
}

fn send_queue(c: &mut Criterion) {
    let frame = frame::notification(NOTIFICATION, Instant::now());
    let mut group = c.benchmark_group("send_queue");
    for batch in [1usize, 16, 256] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("push_and_writev", batch), &batch, |b, &batch| {
            let mut queue = SendQueue::default();
            let mut sink = std::io::sink();
            b.iter(|| {
                for _ in 0..batch {
                    let _ = queue.push_notification(frame.clone(), 256);
                }
                queue.flush(&mut sink, usize::MAX, |_| {})
            })
        });
    }
    group.finish();
}

fn route(c: &mut Criterion) {
    let mut group = c.benchmark_group("route");
    for loops in [1usize, 4, 16] {
        let mut handles = Vec::new();
        let mut inboxes = Vec::new();
        let mut polls = Vec::new();
        for _ in 0..loops {
            let (poll, handle, inbox) = mailbox::prepare().expect("poller");
            polls.push(poll);
            handles.push(handle);
            inboxes.push(inbox);
        }
        let table = RouteTable::default();
        let user = Target::user("user123");
        for loop_id in 0..loops {
            table.join(loop_id, &user);
        }
        let frame = frame::notification(NOTIFICATION, Instant::now());
        let targets = [user.clone()];
        let none = Exclusion::default();
        let from = Sender::Thread { patience: std::time::Duration::from_millis(100) };
        group.throughput(Throughput::Elements(loops as u64));
        group.bench_with_input(BenchmarkId::new("fan_out_to_loops", loops), &loops, |b, _| {
            b.iter(|| {
                black_box(table.dispatch(&handles, from, &targets, &frame, &none));
                for inbox in &inboxes {
                    while let Ok(cmd) = inbox.try_recv() {
                        black_box(matches!(cmd, LoopCmd::Deliver { .. }));
                    }
                }
            })
        });
    }
    group.finish();
}

/// The Redis reader's and publisher's per-message decoding cost: one `message` push with a
/// 128-byte payload (decode + classify, borrowed: no copy of the payload), and one read
/// holding the 64 `:1` replies to a pipelined batch of PUBLISHes.
fn resp_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("resp");
    let mut push = Vec::new();
    resp::encode_command(&mut push, [b"message".as_slice(), b"user_noti:123456", &[b'x'; 128]]);
    let mut decoder = Decoder::new(Limits::with_max_bulk(64 * 1024));
    group.throughput(Throughput::Elements(1));
    group.bench_function("message_push_128B", |b| {
        b.iter(|| match decoder.decode(black_box(&push)) {
            Ok(Decoded::Complete { value, consumed }) => (resp::classify_push(&value).is_some(), consumed),
            _ => unreachable!(),
        })
    });
    let replies = b":1\r\n".repeat(64);
    group.throughput(Throughput::Elements(64));
    group.bench_function("pipelined_64_int_replies", |b| {
        b.iter(|| {
            let buf = black_box(&replies[..]);
            let (mut pos, mut sum) = (0, 0);
            while let Ok(Decoded::Complete { value, consumed }) = decoder.decode(&buf[pos..]) {
                sum += value.as_integer().unwrap_or(0);
                pos += consumed;
            }
            sum
        })
    });
    group.finish();
}

criterion_group!(benches, frames, validation, jwt, inbound, send_queue, route, resp_decode);
criterion_main!(benches);
