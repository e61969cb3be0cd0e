//! Connection churn: many rounds of thousands of clients connecting and disconnecting leave
//! herald holding nothing: no descriptor, no slab entry, no index key, no memory growth.
//!
//! HERALD_CHURN_ROUNDS (default 50) and HERALD_CHURN_CLIENTS (default 5000) scale it.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const CONNS_PER_USER: usize = 10;
const CLIENT_THREADS: usize = 4;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Reads one HTTP response head; returns its status line.
fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<String, String> {
    buf.clear();
    let mut tmp = [0u8; 512];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            return Ok(head.lines().next().unwrap_or_default().to_string());
        }
        match s.read(&mut tmp) {
            Ok(0) => return Err(format!("EOF after {:?}", String::from_utf8_lossy(buf))),
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// One client thread's share of a round: connect and send every upgrade, then read every
/// response, then close every socket (one in four says goodbye with a close frame first).
fn churn_batch(port: u16, requests: &[Arc<Vec<u8>>]) -> Result<(), String> {
    let mut socks = Vec::with_capacity(requests.len());
    for req in requests {
        let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        s.write_all(req).map_err(|e| format!("write upgrade: {e}"))?;
        socks.push(s);
    }
    let mut buf = Vec::with_capacity(512);
    for s in socks.iter_mut() {
        let status = read_head(s, &mut buf)?;
        if !status.starts_with("HTTP/1.1 101") {
            return Err(format!("upgrade answered {status:?}"));
        }
    }
    let close = encode_frame(true, 0x8, &1000u16.to_be_bytes(), Some([1, 2, 3, 4]));
    for (i, mut s) in socks.into_iter().enumerate() {
        if i % 4 == 0 {
            let _ = s.write_all(&close);
        }
        drop(s);
    }
    Ok(())
}

fn run_round(port: u16, requests: &[Arc<Vec<u8>>]) {
    let per_thread = requests.len().div_ceil(CLIENT_THREADS);
    let handles: Vec<_> = requests
        .chunks(per_thread)
        .map(|chunk| {
            let chunk = chunk.to_vec();
            thread::spawn(move || churn_batch(port, &chunk))
        })
        .collect();
    for h in handles {
        if let Err(e) = h.join().expect("client thread panicked") {
            panic!("churn round failed: {e}");
        }
    }
}

/// Waits until herald holds no connection at all (per /metrics).
fn wait_nothing_held(h: &Herald, baseline: Held, timeout: Duration) -> Held {
    let mut last = baseline;
    let ok = wait_until(timeout, || {
        last = Held::of(&h.metrics());
        last == baseline
    });
    assert!(ok, "herald still holds {last:?} (baseline {baseline:?}) {timeout:?} after the clients left");
    last
}

#[test]
fn connection_churn_leaves_no_descriptor_entry_or_memory_behind() {
    let rounds = env_usize("HERALD_CHURN_ROUNDS", 50);
    let clients = env_usize("HERALD_CHURN_CLIENTS", 5000);
    let users = clients.div_ceil(CONNS_PER_USER).max(1);
    let h = herald().env("HERALD_MAX_CONNECTIONS", &(clients + 100).to_string()).start();
    let port = h.port;
    let user_requests: Vec<Arc<Vec<u8>>> = (0..users)
        .map(|u| {
            Arc::new(upgrade_request(port, &format!("/ws?token={}", token(&format!("churn{u}"))), &[]).into_bytes())
        })
        .collect();
    // 10 connections per user, spread so that each thread's batch mixes users
    let requests: Vec<Arc<Vec<u8>>> = (0..clients).map(|i| user_requests[i % users].clone()).collect();

    std::thread::sleep(Duration::from_millis(300));
    let base_fds = fd_count(h.pid());
    let baseline = Held::NONE;
    wait_nothing_held(&h, baseline, Duration::from_secs(5));
    eprintln!("churn: {rounds} rounds x {clients} clients ({users} users); baseline fds {base_fds}, {baseline:?}");

    let started = Instant::now();
    let mut rss_after_first = 0;
    let mut rss_trend = Vec::new();
    for round in 0..rounds {
        let t = Instant::now();
        run_round(port, &requests);
        if round == 0 {
            wait_nothing_held(&h, baseline, Duration::from_secs(30));
            rss_after_first = rss_kib(h.pid());
            eprintln!("churn: round 1 took {:?}; RSS after it {rss_after_first} KiB", t.elapsed());
        } else {
            // the next round starts once herald has let go of this one's connections
            wait_nothing_held(&h, baseline, Duration::from_secs(30));
        }
        if (round + 1) % 5 == 0 {
            rss_trend.push(rss_kib(h.pid()));
        }
    }
    let elapsed = started.elapsed();

    let held = wait_nothing_held(&h, baseline, Duration::from_secs(30));
    let mut fds = 0;
    let fds_ok = wait_until(Duration::from_secs(10), || {
        fds = fd_count(h.pid());
        fds == base_fds
    });
    let rss_end = rss_kib(h.pid());
    let m = h.metrics();
    eprintln!("churn: RSS (KiB) every 5 rounds: {rss_trend:?}");
    eprintln!(
        "churn: {rounds} rounds x {clients} clients in {elapsed:?} ({:.0} connections/s); fds {fds} (baseline \
         {base_fds}); RSS {rss_after_first} KiB after round 1, {rss_end} KiB at the end; {held:?}; metrics {m}",
        (rounds * clients) as f64 / elapsed.as_secs_f64()
    );
    assert!(fds_ok, "herald holds {fds} file descriptors after the churn, {base_fds} before");
    assert_eq!((held.active, held.slab_entries, held.index_entries), (0, 0, 0), "{held:?}");
    assert!(
        rss_end as f64 <= rss_after_first as f64 * 1.10,
        "RSS grew from {rss_after_first} KiB after the first round to {rss_end} KiB after {rounds} rounds"
    );
    // herald is still fine
    let mut ws = h.ws(&token("after-churn"));
    assert_alive(&mut ws);
}
