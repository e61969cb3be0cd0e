//! Starts herald: listeners, event loops, the broker's threads, the JWKS fetcher; then waits
//! for signals: SIGHUP reloads (see [`reload`]), SIGTERM/SIGINT shut down gracefully (a
//! second one exits at once).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tracing::{info, warn};

use crate::broker::{Broker, Routing, redis};
use crate::config::{Config, JwtKey};
use crate::event_loop::EventLoop;
use crate::mailbox::{self, LoopCmd, Loops};
use crate::metrics::Metrics;
use crate::shared::{Shared, instance_name};
use crate::webhook::Webhook;

/// A started server, before it is told to stop.
pub struct Running {
    pub shared: Arc<Shared>,
    pub local_addr: SocketAddr,
    loop_threads: Vec<std::thread::JoinHandle<()>>,
}

/// Binds `addr` with SO_REUSEPORT, so each loop (and other herald processes) can hold its
/// own listener on the same port and the kernel spreads connections between them.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Raises the soft open-file limit to the hard limit: every connection is a descriptor.
fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the `rlimit` struct we pass by pointer,
    // which lives on this stack frame for the duration of each call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            let wanted = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                limit = wanted;
            }
        }
    }
    info!(open_files = limit.rlim_cur, "file descriptor limit");
}

/// Starts every thread; returns once the listeners are bound.
pub fn start(config: Config) -> Result<Running, String> {
    let endpoint = config.redis_endpoint();
    let metrics = Arc::new(Metrics::new(config.threads, endpoint.is_some()));
    // First of all: a key set that cannot be loaded stops herald with its one error line.
    let (keyring, jwks_fetcher) = crate::jwks::keyring(&config, &metrics)?;
    raise_fd_limit();
    info!(keys = %keyring.keys().describe(), "accepting tokens");
    let first = bind(config.listen).map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let local_addr = first.local_addr().map_err(|e| e.to_string())?;
    let mut listeners = vec![first];
    for _ in 1..config.threads {
        listeners.push(bind(local_addr).map_err(|e| format!("cannot listen on {local_addr}: {e}"))?);
    }
    let mut polls = Vec::new();
    let mut handles = Vec::new();
    let mut inboxes = Vec::new();
    for _ in 0..config.threads {
        let (poll, handle, inbox) = mailbox::prepare().map_err(|e| format!("cannot create a poller: {e}"))?;
        polls.push(poll);
        handles.push(handle);
        inboxes.push(inbox);
    }
    let routing = Arc::new(Routing::default());
    let loops: Loops = handles.into();
    routing.attach(loops);
    let instance_id = crate::auth::random_u64();
    let webhook = match &config.webhook {
        Some((url, secret)) => Some(Webhook::start(url.clone(), secret.clone(), metrics.webhook.clone())?),
        None => None,
    };
    let broker = match &endpoint {
        None => Broker::Embedded {
            webhook,
            history: config
                .history
                .enabled()
                .then(|| crate::history::ring::Rings::new(config.history, metrics.clone())),
        },
        Some(endpoint) => {
            let settings = redis::Settings {
                user_prefix: config.user_channel_prefix.clone(),
                topic_prefix: config.topic_channel_prefix.clone(),
                max_message_bytes: config.max_message_bytes,
                tls: config.redis_tls.clone(),
            };
            let ctx =
                redis::Context { settings: Arc::new(settings), routing: routing.clone(), metrics: metrics.clone() };
            let fleet = redis::fleet::FleetSettings {
                instance: instance_name(instance_id).into(),
                presence_channel: config.presence_channel.clone(),
                webhook,
                history: config.history,
            };
            Broker::Redis(redis::RedisBroker::start(endpoint, config.redis_subscribe, fleet, ctx)?)
        }
    };
    let tls = match &config.tls {
        Some((cert, key)) => Some(crate::tls::Acceptor::load(cert, key)?),
        None => None,
    };
    let mut shared = Shared::new(config, keyring, metrics, routing, broker, instance_id);
    shared.tls = tls;
    let shared = Arc::new(shared);
    if let Some(fetcher) = jwks_fetcher {
        fetcher.spawn(Arc::downgrade(&shared.verifier))?;
    }
    let mut loop_threads = Vec::new();
    for (id, ((poll, listener), inbox)) in polls.into_iter().zip(listeners).zip(inboxes).enumerate() {
        let event_loop = EventLoop::new(id, shared.clone(), poll, listener, inbox)
            .map_err(|e| format!("cannot start event loop {id}: {e}"))?;
        loop_threads.push(spawn(&format!("herald-loop-{id}"), move || event_loop.run())?);
    }
    Ok(Running { shared, local_addr, loop_threads })
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> Result<std::thread::JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(body)
        .map_err(|e| format!("cannot start thread {name}: {e}"))
}

impl Running {
    /// Turns `/ready` to 503 and refuses new upgrades, then closes every WebSocket (1001)
    /// spread evenly over `period`, so clients and load balancers move elsewhere gradually.
    /// HTTP keeps being served meanwhile. Returns when the period is over.
    pub fn drain(&self, period: Duration) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        let until = Instant::now() + period;
        for handle in self.shared.loops() {
            let _ = handle.send_waiting(LoopCmd::Drain { until }, period);
        }
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
    }

    /// Stops accepting, closes every connection with 1001 after its queue is flushed, and
    /// waits for the loops, at most `grace`. Returns whether everything closed in time.
    pub fn shutdown(self, grace: Duration) -> bool {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        let deadline = Instant::now().checked_add(grace);
        for handle in self.shared.loops() {
            // The one command that must get through: wait for room as long as the grace lasts.
            let _ = handle.send_waiting(LoopCmd::Shutdown, grace);
        }
        while deadline.is_none_or(|d| Instant::now() < d) && !self.loop_threads.iter().all(|t| t.is_finished()) {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.loop_threads.iter().all(|t| t.is_finished())
    }
}

/// Prints what a new user needs to try herald in dev mode. This goes to stdout on purpose:
/// it is the one place a token is shown, and only a token for a throwaway secret.
fn dev_banner(config: &Config, addr: SocketAddr) {
    let JwtKey::Secret(secret) = &config.jwt_key else { return };
    let user = "dev-user";
    let (audience, issuer, ttl) =
        (config.jwt_audience.as_deref(), config.jwt_issuer.as_deref(), Duration::from_secs(24 * 3600));
    let token = crate::auth::mint_token(
        secret,
        &crate::auth::TokenSpec { sub: user, ttl, topics: &[], scope: None, audience, issuer },
    );
    let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
    let base = format!("{host}:{}", addr.port());
    let message = r#"{"type":"notification","payload":{"title":"hi"}}"#;
    // Host, port and db only: a Redis password never reaches the banner (redis-cli asks for it).
    let sharded = config.redis.is_none() && config.redis_cluster_pubsub == redis::ClusterPubsub::Sharded;
    let redis = config.redis.as_ref().or(config.redis_cluster.first()).map(|url| {
        let host = if url.host_is_ipv6() { format!("[{}]", url.host) } else { url.host.clone() };
        let cluster = if config.redis.is_none() { " -c" } else { "" };
        let mut cli = format!("redis-cli{cluster} -h {host} -p {}", url.port);
        if url.tls {
            cli.push_str(" --tls");
        }
        if url.db != 0 {
            cli.push_str(&format!(" -n {}", url.db));
        }
        if let Some(name) = &url.user {
            cli.push_str(&format!(" --user {name}"));
        }
        if url.password.is_some() {
            cli.push_str(" --askpass");
        }
        let publish = if sharded { "SPUBLISH" } else { "PUBLISH" };
        format!("  redis:    {cli} {publish} {}{user} '{message}'\n", config.user_channel_prefix)
    });
    println!(
        "\n  herald is in DEV MODE: no HERALD_JWT_SECRET was set, so a random secret signs tokens\n  \
         for this run only. Never run production like this.\n\n  \
         token (user {user}, 24h): {token}\n\n  \
         connect:  websocat 'ws://{base}/ws?token={token}'\n  \
         ws url:   ws://{base}/ws?token={token}\n  \
         publish:  curl -s -X POST http://{base}/publish -H 'Authorization: Bearer {token}' \
         -H 'Content-Type: application/json' -d '{{\"user_id\":\"{user}\",\"message\":{message}}}'\n\
         {}  demo:     http://{base}/\n",
        redis.unwrap_or_default()
    );
}

/// What SIGHUP does: re-reads what can change without a restart (the TLS certificate and
/// key, the JWT public key, the JWKS) and logs what it did. A reload that fails keeps what
/// is in force.
pub fn reload(shared: &Shared) {
    let keys = &shared.verifier;
    let mut reloaded = false;
    if let Some(acceptor) = &shared.tls {
        reloaded = true;
        match acceptor.reload() {
            Ok(()) => info!("SIGHUP: TLS certificate reloaded: new handshakes use it"),
            Err(e) => warn!(error = %e, "SIGHUP: TLS certificate not reloaded; the current one stays in use"),
        }
    }
    if let Some(result) = keys.reload_public_key() {
        reloaded = true;
        let path = keys.public_key_file().map(|p| p.display().to_string()).unwrap_or_default();
        match result {
            Ok(algorithm) => info!(%path, ?algorithm, "SIGHUP: HERALD_JWT_PUBLIC_KEY reloaded"),
            Err(e) => warn!(%path, error = %e, "SIGHUP: HERALD_JWT_PUBLIC_KEY not reloaded; the key in force stays"),
        }
    }
    // The fetcher's thread does the reading and logs the outcome: the signal thread never
    // waits on the network.
    if keys.request_jwks_reload() {
        reloaded = true;
        info!("SIGHUP: HERALD_JWKS refresh requested");
    }
    if !reloaded {
        info!("SIGHUP: nothing to reload (no TLS certificate, HERALD_JWT_PUBLIC_KEY or HERALD_JWKS)");
    }
}

/// Runs until a signal stops it.
pub fn run(config: Config) -> Result<(), String> {
    // SIGHUP is handled from here on: before, its default action would end the process.
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| format!("cannot handle signals: {e}"))?;
    let grace = config.shutdown_grace;
    let drain = config.drain_period;
    let dev_mode = config.dev_mode;
    let mode = match (&config.redis, config.redis_cluster.is_empty()) {
        (Some(_), _) => "redis",
        (None, false) => "redis cluster",
        (None, true) => "embedded broker",
    };
    let threads = config.threads;
    let banner_config = config.clone();
    let running = start(config)?;
    info!(addr = %running.local_addr, threads, mode, "herald listening on {}", running.local_addr);
    if dev_mode {
        warn!("dev mode: tokens are signed with a random secret; set HERALD_JWT_SECRET in production");
        dev_banner(&banner_config, running.local_addr);
    }
    let first = signals.forever().find(|&signal| {
        if signal == SIGHUP {
            reload(&running.shared);
        }
        signal != SIGHUP
    });
    info!(signal = ?first, "shutting down: closing connections (grace {:?})", grace);
    std::thread::spawn(move || {
        // A reload while shutting down is pointless: SIGHUP is ignored from here on.
        if signals.forever().any(|signal| signal != SIGHUP) {
            warn!("second signal: exiting now");
            std::process::exit(130);
        }
    });
    if !drain.is_zero() {
        info!(period = ?drain, "draining: /ready is 503, connections close spread over the period");
        running.drain(drain);
    }
    if !running.shutdown(grace) {
        warn!("shutdown grace period ended with connections still open");
    }
    info!("stopped");
    Ok(())
}
