//! `replay`: how fast a server hands a reconnecting client its backlog.
//!
//! One client connects with the URL as given (it should carry `since=`, e.g. `since=0`),
//! reads every notification up to `{"type":"resumed",…}`, closes, and does it again, -n
//! times in a row. Each replay is timed from the upgrade request to the `resumed` message, so
//! the figure includes the handshake and the first page read (with Redis, a round trip)
//! but no live traffic. Server CPU (--server-pid) is summed over all the replays.
//!
//! Blocking I/O on one socket: a replay is one stream to one reader, and the question is how
//! fast the server can feed it, not how many the generator can juggle.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use serde_json::{Value, json};

use crate::cli::{Args, Vars};
use crate::{sys, ws};

/// What one replay saw.
struct Run {
    notifications: u64,
    bytes: u64,
    seconds: f64,
    /// The `resumed` message's `replayed`, and `complete`.
    replayed: Option<u64>,
    complete: Option<bool>,
}

pub fn run(args: &Args) -> Result<(), String> {
    let endpoint = crate::cli::parse_endpoint(&args.url)?;
    if endpoint.tls {
        return Err("replay: ws:// only".into());
    }
    let token = if endpoint.path.uses_token() {
        let secret = args
            .secret
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or("the URL has {token}: give --secret (or HERALD_JWT_SECRET)")?;
        herald::auth::mint(secret.as_bytes(), &args.user, args.token_ttl, &[], None)
    } else {
        String::new()
    };
    let path = endpoint.path.render_string(&Vars { token: &token, user: &args.user, ..Vars::default() });
    let repeats = args.connections.max(1);
    let mut rng = ws::Rng::from_entropy();
    let server_start = sys::sample_pids(&args.server_pid);
    let mut runs = Vec::with_capacity(repeats);
    for i in 0..repeats {
        let r = replay_once(&endpoint, &path, args, &mut rng)?;
        if !args.quiet {
            eprintln!(
                "herald-load: replay {}/{repeats}: {} notifications in {:.3}s ({:.0}/s), resumed replayed={:?} complete={:?}",
                i + 1,
                r.notifications,
                r.seconds,
                r.notifications as f64 / r.seconds.max(1e-9),
                r.replayed,
                r.complete
            );
        }
        runs.push(r);
    }
    let server_end = sys::sample_pids(&args.server_pid);
    let server_cpu = match (&server_start, &server_end) {
        (Some(a), Some(b)) => Some(b.cpu_seconds - a.cpu_seconds),
        _ => None,
    };
    let notifications: u64 = runs.iter().map(|r| r.notifications).sum();
    let seconds: f64 = runs.iter().map(|r| r.seconds).sum();
    let mut rates: Vec<f64> = runs.iter().map(|r| r.notifications as f64 / r.seconds.max(1e-9)).collect();
    rates.sort_by(f64::total_cmp);
    let median = rates.get(rates.len() / 2).copied().unwrap_or(0.0);
    let round = |x: f64, d: i32| (x * 10f64.powi(d)).round() / 10f64.powi(d);
    let report = json!({
        "mode": "replay",
        "config": {"url": args.url, "user": args.user, "repeats": repeats, "server_pids": args.server_pid},
        "replays": runs.iter().map(|r| json!({
            "notifications": r.notifications,
            "bytes": r.bytes,
            "seconds": round(r.seconds, 4),
            "notifications_per_sec": round(r.notifications as f64 / r.seconds.max(1e-9), 0),
            "resumed_replayed": r.replayed,
            "resumed_complete": r.complete,
        })).collect::<Vec<Value>>(),
        "notifications": notifications,
        "seconds": round(seconds, 4),
        "notifications_per_sec": round(notifications as f64 / seconds.max(1e-9), 0),
        "notifications_per_sec_median": round(median, 0),
        "server": {
            "cpu_seconds": server_cpu.map(|c| round(c, 3)),
            "cpu_us_per_notification": server_cpu.filter(|_| notifications > 0).map(|c| round(c * 1e6 / notifications as f64, 3)),
        },
    });
    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    println!("{text}");
    if let Some(path) = &args.json_out {
        std::fs::write(path, format!("{text}\n")).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    eprintln!(
        "replay: {repeats} x {} notifications, {:.0}/s overall, median {median:.0}/s; server CPU {}",
        notifications / repeats as u64,
        notifications as f64 / seconds.max(1e-9),
        report["server"]["cpu_us_per_notification"].as_f64().map_or("n/a".into(), |c| format!("{c} us/notification")),
    );
    Ok(())
}

/// One connection: upgrade, read until `resumed`, close.
fn replay_once(endpoint: &crate::cli::Endpoint, path: &str, args: &Args, rng: &mut ws::Rng) -> Result<Run, String> {
    let key = ws::ws_key(rng.next_u64(), 0);
    let mut request = Vec::new();
    ws::upgrade_request(&mut request, path, &endpoint.host, &key);
    let started = Instant::now();
    let mut sock = TcpStream::connect_timeout(&endpoint.addr, args.connect_timeout)
        .map_err(|e| format!("connect {}: {e}", endpoint.addr))?;
    sock.set_nodelay(true).map_err(|e| e.to_string())?;
    // A server that stops sending mid-replay ends the run instead of hanging it.
    sock.set_read_timeout(Some(args.connect_timeout)).map_err(|e| e.to_string())?;
    sock.write_all(&request).map_err(|e| format!("upgrade request: {e}"))?;

    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut chunk = vec![0u8; 1 << 18];
    let mut upgraded = false;
    let mut run = Run { notifications: 0, bytes: 0, seconds: 0.0, replayed: None, complete: None };
    loop {
        let n = match sock.read(&mut chunk) {
            Ok(0) => return Err(format!("the server closed after {} notifications", run.notifications)),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read after {} notifications: {e}", run.notifications)),
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        if !upgraded {
            match ws::parse_handshake(&buf, &key) {
                ws::Handshake::Partial => continue,
                ws::Handshake::Upgraded(len) => {
                    upgraded = true;
                    at = len;
                }
                ws::Handshake::Refused(code) => return Err(format!("upgrade refused: HTTP {code}")),
                ws::Handshake::Malformed => return Err("upgrade answered with something not HTTP".into()),
            }
        }
        loop {
            let frame = match ws::parse_frame(&buf[at..]) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(format!("bad frame from the server: {e}")),
            };
            at += frame.len;
            match frame.opcode {
                ws::OP_TEXT if ws::find(frame.payload, b"\"stream_id\"").is_some() => {
                    run.notifications += 1;
                    run.bytes += frame.payload.len() as u64;
                }
                ws::OP_TEXT if ws::find(frame.payload, b"\"resumed\"").is_some() => {
                    run.seconds = started.elapsed().as_secs_f64();
                    let m: Value = serde_json::from_slice(frame.payload).unwrap_or(Value::Null);
                    run.replayed = m["replayed"].as_u64();
                    run.complete = m["complete"].as_bool();
                    let _ = sock.write_all(&wsframe::masked_close(1000, rng.mask()));
                    return Ok(run);
                }
                ws::OP_CLOSE => return Err(format!("the server sent close after {} notifications", run.notifications)),
                ws::OP_PING => {
                    let pong = wsframe::encode(true, ws::OP_PONG, frame.payload, Some(rng.mask()));
                    sock.write_all(&pong).map_err(|e| format!("pong: {e}"))?;
                }
                _ => {}
            }
        }
        buf.drain(..at);
    }
}
