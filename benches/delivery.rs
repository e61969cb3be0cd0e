//! The delivery path on a real event loop with real loopback sockets: one notification to one
//! of N connections (unicast), and one to all N (broadcast), each time through the loop's own
//! index, send queues and writev — what a load run measures, without one.
//!
//! Run: `cargo bench --bench delivery`. Time is per delivered message (unicast) or per
//! broadcast; throughput is in deliveries. Only the deliver + flush is timed: reading the
//! clients' sockets (so they never fill) happens outside the measured part.

use std::hint::black_box;
use std::time::{Duration, Instant};

use clap::Parser;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use herald::config::{Cli, Config};
use herald::event_loop::bench::DeliveryBench;
use herald::frame::{self, SharedFrame};

const NOTIFICATION: &[u8] =
    br#"{"type":"notification","payload":{"title":"New Order","message":"You have a new order #12345"},"timestamp":"2025-01-21T10:30:00.123Z"}"#;

fn config() -> Config {
    let cli = Cli::try_parse_from(["herald", "--jwt-secret", "bench-secret-bench-secret-bench-secret", "--log", "off"])
        .expect("flags parse");
    cli.server.into_config().expect("valid config")
}

fn bench(n: usize) -> DeliveryBench {
    DeliveryBench::new(config(), n).expect("sessions open")
}

fn event_stream_bench(n: usize) -> DeliveryBench {
    DeliveryBench::event_streams(config(), n).expect("streams open")
}

/// Time spent in `iters` broadcasts of the frames `next_frame` makes; reading the clients'
/// sockets in between is not timed.
fn timed_broadcasts(bench: &mut DeliveryBench, iters: u64, mut next_frame: impl FnMut() -> SharedFrame) -> Duration {
    let mut spent = Duration::ZERO;
    for _ in 0..iters {
        let frame = next_frame();
        let started = Instant::now();
        bench.broadcast(&frame);
        spent += started.elapsed();
        bench.drain();
    }
    spent
}

fn unicast(c: &mut Criterion) {
    let mut group = c.benchmark_group("deliver_unicast");
    group.throughput(Throughput::Elements(1));
    for n in [1usize, 1000, 4000] {
        let mut bench = bench(n);
        let frame = frame::notification(NOTIFICATION, Instant::now());
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            let mut next = 0usize;
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for i in 0..iters {
                    let started = Instant::now();
                    bench.unicast(black_box(next), &frame);
                    spent += started.elapsed();
                    next = (next + 7919) % n;
                    if i % 64 == 63 {
                        bench.drain();
                    }
                }
                bench.drain();
                spent
            })
        });
        assert_eq!(bench.open_sessions(), n, "no session may be lost to the benchmark");
    }
    group.finish();
}

fn broadcast(c: &mut Criterion) {
    let mut group = c.benchmark_group("deliver_broadcast");
    for n in [100usize, 1000, 4000] {
        let mut bench = bench(n);
        let frame = frame::notification(NOTIFICATION, Instant::now());
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| timed_broadcasts(&mut bench, iters, || frame.clone()))
        });
        assert_eq!(bench.open_sessions(), n, "no session may be lost to the benchmark");
    }
    group.finish();
}

/// A broadcast to N WebSockets, then to N event streams, each with a fresh frame (as every
/// notification is): the event streams pay one encoding of the event form per broadcast, not
/// one per stream.
fn broadcast_fresh(c: &mut Criterion) {
    let mut group = c.benchmark_group("deliver_broadcast_fresh");
    for n in [1000usize, 4000] {
        for (name, mut bench) in [("ws", bench(n)), ("sse", event_stream_bench(n))] {
            group.throughput(Throughput::Elements(n as u64));
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter_custom(|iters| {
                    timed_broadcasts(&mut bench, iters, || frame::notification(NOTIFICATION, Instant::now()))
                })
            });
            assert_eq!(bench.open_sessions(), n, "no session may be lost to the benchmark");
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3));
    targets = unicast, broadcast, broadcast_fresh
}
criterion_main!(benches);
