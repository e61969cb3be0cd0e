//! herald-load: the load generator shipped with herald.
//!
//! One process: a few worker threads, each a mio event loop owning thousands of client
//! WebSocket connections (spread over many source addresses), and one publisher thread
//! (Redis or HTTP, fixed schedule or closed loop). The main thread orchestrates the phases
//! (connect, warm up, measure, drain, close), samples /proc of the server and of itself
//! at the phase boundaries, and prints one JSON report.

mod ceiling;
mod cli;
mod publisher;
mod replay;
mod report;
mod shared;
mod sys;
mod tls;
mod worker;
mod ws;

use std::sync::Arc;
use std::sync::atomic::Ordering::{Relaxed, Release};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use clap::Parser;

use cli::{Args, Mode, Template, Transport, Vars};
use report::{Phase, Report};
use shared::{ConnPlan, PHASE_CLOSE, PHASE_RUN, Shared, Users};
use sys::clock::realtime_ns;
use worker::{Worker, WorkerReport};

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("herald-load: {e}");
            std::process::exit(2);
        }
    }
}

fn progress(args: &Args, line: impl FnOnce() -> String) {
    if !args.quiet {
        eprintln!("herald-load: {}", line());
    }
}

fn run(args: &Args) -> Result<(), String> {
    if args.mode == Mode::CeilingServer {
        return ceiling::run(&args.listen, args.threads.clamp(1, 64));
    }
    if args.mode == Mode::Replay {
        return replay::run(args);
    }
    if args.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    if !(1..=64).contains(&args.threads) {
        return Err("--threads must be between 1 and 64".into());
    }
    let endpoint = cli::parse_endpoint(&args.url)?;
    let source_ips = cli::parse_source_ips(&args.source_ips, endpoint.addr)?;
    sys::raise_open_file_limit();
    let fd_limit = sys::open_file_limit();
    if args.connections as u64 + 64 > fd_limit {
        progress(args, || {
            format!("warning: {} connections need as many file descriptors; the limit is {fd_limit}", args.connections)
        });
    }
    let users = match (args.mode, &args.topic) {
        (Mode::Broadcast, None) => Users::Single(args.user.clone()),
        (Mode::Broadcast, Some(_)) => Users::Numbered { prefix: args.user_prefix.clone(), count: args.connections },
        _ => Users::Numbered {
            prefix: args.user_prefix.clone(),
            count: args.users.unwrap_or(args.connections).clamp(1, args.connections),
        },
    };
    let topic = args.topic.clone().unwrap_or_default();
    let secret = args.secret.as_deref().filter(|s| !s.is_empty());
    let topics: Vec<String> = args.topic.iter().cloned().collect();

    // Tokens are minted before the clock starts: signing is the server's cost to verify,
    // not a cost of the connection the generator should carry into its CPU figures.
    let tokens = if endpoint.path.uses_token() {
        let secret = secret.ok_or("the URL has {token}: give --secret (or HERALD_JWT_SECRET)")?;
        let minted: Vec<String> = (0..users.count())
            .map(|i| herald::auth::mint(secret.as_bytes(), &users.name(i), args.token_ttl, &topics, None))
            .collect();
        Some(Arc::new(minted))
    } else {
        None
    };
    let subscribe = match &args.topic {
        Some(t) if !args.subscribe_message.is_empty() => Some(
            Template::new(&args.subscribe_message).render_string(&Vars { topic: t, ..Vars::default() }).into_bytes(),
        ),
        _ => None,
    };
    let plan = Arc::new(ConnPlan {
        endpoint: endpoint.clone(),
        source_ips: source_ips.clone(),
        connections: args.connections,
        threads: args.threads,
        connect_rate: args.connect_rate.max(0.0),
        max_pending: args.max_pending.max(1),
        connect_timeout: args.connect_timeout,
        users: users.clone(),
        topic: topic.clone(),
        subscribe,
        key_seed: ws::Rng::from_entropy().next_u64(),
        tls: tls_client(args, &endpoint)?,
    });
    let publish_plan = match args.mode {
        Mode::Connect | Mode::CeilingServer | Mode::Replay => None,
        Mode::Unicast | Mode::Broadcast => Some(publish_transport(args, &endpoint, secret)?),
    };

    let shared = Arc::new(Shared::new(users.count(), args.threads));
    let mut rep = Report::new(args, &endpoint, source_ips.len());
    let server_start = sys::sample_pids(&args.server_pid);
    let gen_start = sys::sample_self();
    progress(args, || {
        format!(
            "{:?}: {} connections to {} from {} source addresses, {} thread(s)",
            args.mode,
            args.connections,
            endpoint.addr,
            source_ips.len().max(1),
            args.threads
        )
    });

    let workers: Vec<JoinHandle<std::io::Result<WorkerReport>>> = (0..args.threads)
        .map(|id| {
            let worker = Worker::new(id, plan.clone(), shared.clone(), tokens.clone());
            thread::Builder::new().name(format!("load-w{id}")).spawn(move || worker.run())
        })
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot start worker threads: {e}"))?;
    drop(tokens);

    // Connect phase: until every connection is up or has failed.
    let connect_started = Instant::now();
    let mut last_print = Instant::now();
    while !shared.all_done_connecting() {
        if workers.iter().any(JoinHandle::is_finished) {
            break;
        }
        thread::sleep(Duration::from_millis(5));
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            progress(args, || {
                format!(
                    "connecting: {} established, {} failed, {} pending ({:.1}s)",
                    shared.sum(|w| &w.established),
                    shared.sum(|w| &w.failed),
                    shared.sum(|w| &w.pending),
                    connect_started.elapsed().as_secs_f64()
                )
            });
        }
    }
    let connected_at_ns = realtime_ns();
    let server_connected = sys::sample_pids(&args.server_pid);
    let gen_connected = sys::sample_self();
    rep.connect_phase = Phase::new(server_start, server_connected, gen_start, gen_connected);
    shared.phase.store(PHASE_RUN, Release);
    progress(args, || {
        format!(
            "connected: {} established, {} failed in {:.2}s",
            shared.sum(|w| &w.established),
            shared.sum(|w| &w.failed),
            connect_started.elapsed().as_secs_f64()
        )
    });

    let mut pub_report = None;
    match publish_plan {
        None => {
            let until = Instant::now() + args.hold;
            while Instant::now() < until {
                thread::sleep((until - Instant::now()).min(Duration::from_secs(1)));
                progress(args, || {
                    format!(
                        "holding: {} live, {} unexpected closes",
                        shared.live_total.load(Relaxed),
                        shared.sum(|w| &w.unexpected_closes)
                    )
                });
            }
            let server_end = sys::sample_pids(&args.server_pid);
            let gen_end = sys::sample_self();
            rep.hold_phase = Phase::new(server_connected, server_end, gen_connected, gen_end);
        }
        Some(transport) => {
            let soonest = realtime_ns() + 50_000_000;
            let start_ns = match args.start_at {
                Some(at) if (at * 1e9) as u64 > soonest => {
                    progress(args, || {
                        format!("waiting {:.1}s for --start-at", ((at * 1e9) as u64 - soonest) as f64 / 1e9)
                    });
                    (at * 1e9) as u64
                }
                Some(_) => {
                    progress(args, || "warning: the connect phase ended after --start-at; starting now".into());
                    soonest
                }
                None => soonest,
            };
            let window_start = start_ns + args.warmup.as_nanos() as u64;
            let window_end = window_start + args.duration.as_nanos() as u64;
            shared.window_start_ns.store(window_start, Relaxed);
            shared.window_end_ns.store(window_end, Relaxed);
            let target = match (args.mode, &args.topic) {
                (Mode::Broadcast, Some(topic)) => publisher::Target::Topic(topic.clone()),
                (Mode::Broadcast, None) => publisher::Target::User(args.user.clone()),
                _ if args.absent_users > 0 => publisher::Target::Absent(
                    (0..args.absent_users).map(|i| format!("{}absent-{i}", args.user_prefix)).collect(),
                ),
                _ => publisher::Target::Users((0..users.count()).map(|i| users.name(i)).collect()),
            };
            let max_inflight = args.max_inflight.unwrap_or(match args.mode {
                Mode::Broadcast => (2 * args.connections as u64).max(2000),
                _ => 2000,
            });
            let pplan = publisher::PubPlan {
                transport,
                rate: args.rate,
                target,
                payload_bytes: args.payload_bytes,
                max_inflight,
                batch_ns: args.publish_batch.as_nanos() as u64,
                start_ns,
                end_ns: window_end,
                drain: args.drain,
            };
            let pshared = shared.clone();
            let publisher = thread::Builder::new()
                .name("load-pub".into())
                .spawn(move || publisher::run(pplan, pshared))
                .map_err(|e| format!("cannot start the publisher: {e}"))?;
            sleep_until_ns(window_start);
            let server_w0 = sys::sample_pids(&args.server_pid);
            let aux_w0 = sys::sample_pids(&args.aux_pid);
            let gen_w0 = sys::sample_self();
            let threads_w0 = sys::sample_threads();
            let received_w0 = shared.sum(|w| &w.received_all);
            let mut last = received_w0;
            while realtime_ns() < window_end && !publisher.is_finished() {
                sleep_until_ns((realtime_ns() + 1_000_000_000).min(window_end));
                let now_received = shared.sum(|w| &w.received_all);
                progress(args, || {
                    format!(
                        "measuring: {} deliveries/s, {} live, {} unexpected closes",
                        now_received - last,
                        shared.live_total.load(Relaxed),
                        shared.sum(|w| &w.unexpected_closes)
                    )
                });
                last = now_received;
            }
            let server_w1 = sys::sample_pids(&args.server_pid);
            rep.aux_window = aux_w0.zip(sys::sample_pids(&args.aux_pid));
            let gen_w1 = sys::sample_self();
            rep.window_phase = Phase::new(server_w0, server_w1, gen_w0, gen_w1);
            rep.window_threads = Some((threads_w0, sys::sample_threads()));
            let report = publisher.join().map_err(|_| "the publisher thread panicked".to_string())??;
            // Drain: wait for what is still in flight.
            let deadline = Instant::now() + args.drain;
            while shared.sum(|w| &w.received_window) < report.expected_window && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            pub_report = Some(report);
        }
    }
    rep.server_end = sys::sample_pids(&args.server_pid);
    rep.gen_end = Some(sys::sample_self());

    shared.phase.store(PHASE_CLOSE, Release);
    let mut reports = Vec::new();
    for (i, w) in workers.into_iter().enumerate() {
        match w.join() {
            Ok(Ok(r)) => reports.push(r),
            Ok(Err(e)) => return Err(format!("worker {i}: {e}")),
            Err(_) => return Err(format!("worker {i} panicked")),
        }
    }
    let mut json = rep.finish(reports, pub_report);
    if args.mode != Mode::Connect {
        // Absolute times, so reports of several generator processes can be lined up.
        let unix_s =
            |ns: u64| if ns == u64::MAX { serde_json::Value::Null } else { serde_json::json!(ns as f64 / 1e9) };
        json["window"] = serde_json::json!({
            "connected_at_unix_s": connected_at_ns as f64 / 1e9,
            "start_unix_s": unix_s(shared.window_start_ns.load(Relaxed)),
            "end_unix_s": unix_s(shared.window_end_ns.load(Relaxed)),
        });
    }
    let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
    println!("{text}");
    if let Some(path) = &args.json_out {
        std::fs::write(path, format!("{text}\n")).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    eprint!("{}", report::summary(&json));
    Ok(())
}

fn sleep_until_ns(at: u64) {
    let now = realtime_ns();
    if at > now {
        thread::sleep(Duration::from_nanos(at - now));
    }
}

/// The publisher's transport from the flags.
fn publish_transport(args: &Args, ws: &cli::Endpoint, secret: Option<&str>) -> Result<publisher::Transport, String> {
    let use_redis = match args.publish {
        Transport::Redis => true,
        Transport::Http => false,
        Transport::Auto => args.redis.is_some(),
    };
    if use_redis {
        let redis = args.redis.as_deref().unwrap_or("127.0.0.1:6379");
        let addr = cli::parse_endpoint(&format!("http://{redis}"))?.addr;
        let default_channel = if args.topic.is_some() { "topic_noti:{topic}" } else { "user_noti:{user}" };
        let channel = Template::new(args.redis_channel.as_deref().unwrap_or(default_channel));
        return Ok(publisher::Transport::Redis { addr, channel, command: args.redis_command.clone() });
    }
    let url = match &args.publish_url {
        Some(url) => url.clone(),
        None => format!(
            "{}://{}/publish{}",
            if ws.tls { "https" } else { "http" },
            ws.host,
            if args.batch > 1 { "/batch" } else { "" }
        ),
    };
    let endpoint = cli::parse_endpoint(&url)?;
    let default_body = if args.topic.is_some() {
        r#"{"topic":"{topic}","message":{payload}}"#
    } else {
        r#"{"user_id":"{user}","message":{payload}}"#
    };
    let body = Template::new(args.publish_body.as_deref().unwrap_or(default_body));
    let auth = match (&args.api_key, secret) {
        (Some(key), _) if !key.is_empty() => Some(key.clone()),
        (_, Some(secret)) => Some(herald::auth::mint(
            secret.as_bytes(),
            "herald-load",
            Duration::from_secs(86_400),
            &[],
            Some("publish"),
        )),
        _ => None,
    };
    let tls = tls_client(args, &endpoint)?;
    Ok(publisher::Transport::Http { endpoint, body, auth, conns: args.publish_conns, tls, batch: args.batch as usize })
}

/// The TLS client for a wss:// or https:// endpoint (None for ws:// and http://).
fn tls_client(args: &Args, endpoint: &cli::Endpoint) -> Result<Option<tls::Client>, String> {
    if !endpoint.tls {
        return Ok(None);
    }
    let name = args.tls_server_name.as_deref().unwrap_or(&endpoint.hostname);
    tls::Client::new(args.ca.as_deref(), name).map(Some)
}
