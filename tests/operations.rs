//! Running herald in production: readiness for load balancers, and a drain that spreads the
//! reconnects of a shutting-down instance's clients over time.

mod common;

use std::io::{ErrorKind, Read};
use std::time::{Duration, Instant};

use common::*;

fn ready(h: &Herald) -> (u16, serde_json::Value) {
    let r = h.http("GET", "/ready", &[], b"");
    (r.status, r.json())
}

#[test]
fn ready_is_200_while_accepting_and_503_once_shutting_down() {
    let h = herald().env("HERALD_DRAIN_PERIOD", "3s").start();
    assert_eq!(ready(&h), (200, serde_json::json!({"status": "ready"})));
    let _ws = h.ws(&token("stays"));
    h.sigterm();
    let turned = wait_until(Duration::from_secs(2), || ready(&h).0 == 503);
    assert!(turned, "/ready still answered 200 after SIGTERM");
    let (_, body) = ready(&h);
    assert_eq!(body["reason"], "draining", "{body}");
    // Still serving HTTP while draining, but no new upgrades.
    assert_eq!(h.health().status, 200);
    let (status, _) = match ws_try_connect(h.port, &format!("/ws?token={}", token("late")), &[]) {
        Upgrade::Ok(_) => (101, String::new()),
        Upgrade::Rejected { status, body } => (status, body),
    };
    assert_eq!(status, 503, "an upgrade during the drain");
}

#[test]
fn ready_waits_for_redis_in_redis_mode() {
    let port = free_port();
    let h = herald().env("HERALD_REDIS_URL", &format!("redis://127.0.0.1:{port}")).start();
    let (status, body) = ready(&h);
    assert_eq!((status, body["reason"].as_str()), (503, Some("waiting for redis")), "{body}");
    let _redis = Redis::start_on(port);
    let became = wait_until(Duration::from_secs(15), || ready(&h).0 == 200);
    assert!(became, "/ready never turned 200 once Redis was up: {:?}", ready(&h));
}

/// Reads every client's socket until its close frame; returns when each closed and its code.
fn close_times(clients: &mut [RawWs], deadline: Instant) -> Vec<Option<(Instant, Option<u16>)>> {
    let mut seen: Vec<Option<(Instant, Option<u16>)>> = vec![None; clients.len()];
    let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); clients.len()];
    for c in clients.iter() {
        c.stream.set_nonblocking(true).unwrap();
    }
    let mut chunk = [0u8; 4096];
    while Instant::now() < deadline && seen.iter().any(Option::is_none) {
        for (i, c) in clients.iter_mut().enumerate() {
            if seen[i].is_some() {
                continue;
            }
            loop {
                match c.stream.read(&mut chunk) {
                    Ok(0) => {
                        seen[i] = Some((Instant::now(), None));
                        break;
                    }
                    Ok(n) => bufs[i].extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        seen[i] = Some((Instant::now(), None));
                        break;
                    }
                }
            }
            while let Some((frame, used)) = decode_frame(&bufs[i]) {
                bufs[i].drain(..used);
                if frame.opcode == 0x8 {
                    let code =
                        (frame.payload.len() >= 2).then(|| u16::from_be_bytes([frame.payload[0], frame.payload[1]]));
                    seen[i] = Some((Instant::now(), code));
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    seen
}

#[test]
fn a_drain_spreads_the_closes_over_the_period_then_exits_within_drain_plus_grace() {
    let mut h = herald()
        .env("HERALD_DRAIN_PERIOD", "2s")
        .env("HERALD_SHUTDOWN_GRACE", "3s")
        .env("HERALD_MAX_CONNECTIONS_PER_USER", "0")
        .start();
    let n = 1000;
    let mut clients: Vec<RawWs> = (0..n).map(|i| RawWs::connect(h.port, &token(&format!("d{}", i % 50)))).collect();
    h.wait_active_connections(n as i64, Duration::from_secs(20));
    let signalled = Instant::now();
    h.sigterm();
    let seen = close_times(&mut clients, signalled + Duration::from_secs(8));
    let exited = h.wait_exit(Duration::from_secs(8));
    assert!(exited.is_some(), "herald did not exit within drain + grace");
    let exit_after = signalled.elapsed();
    let closes: Vec<(Duration, Option<u16>)> = seen
        .iter()
        .map(|s| s.map(|(at, code)| (at.duration_since(signalled), code)))
        .collect::<Option<_>>()
        .unwrap_or_else(|| panic!("{} clients saw no close", seen.iter().filter(|s| s.is_none()).count()));
    assert!(closes.iter().all(|(_, code)| *code == Some(1001)), "not all closed 1001: {:?}", &closes[..5]);
    let first = closes.iter().map(|(t, _)| *t).min().unwrap();
    let last = closes.iter().map(|(t, _)| *t).max().unwrap();
    let buckets: std::collections::BTreeSet<u128> = closes.iter().map(|(t, _)| t.as_millis() / 100).collect();
    eprintln!(
        "drain: first close {first:?}, last {last:?}, {} buckets of 100 ms, exit after {exit_after:?}",
        buckets.len()
    );
    assert!(last - first >= Duration::from_millis(1500), "closes spread over {:?} only", last - first);
    assert!(buckets.len() >= 10, "closes fell in {} 100 ms buckets only", buckets.len());
    assert!(last <= Duration::from_millis(2600), "the last close came {last:?} after SIGTERM (drain 2 s)");
    assert!(exit_after <= Duration::from_secs(5) + Duration::from_millis(500), "exit after {exit_after:?}");
}
