//! Starts herald: listeners, event loops, the router, the Redis threads; then waits for
//! SIGTERM/SIGINT and shuts down gracefully (a second signal exits at once).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing::{info, warn};

use crate::auth::Verifier;
use crate::config::{Config, JwtKey};
use crate::event_loop::{self, EventLoop, LoopCmd};
use crate::router::{Router, RouterMsg};
use crate::shared::Shared;

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
    raise_fd_limit();
    let verifier = Verifier::new(&config.jwt_key)?;
    let redis_client = match &config.redis_url {
        Some(url) => Some(crate::broker::redis::client(url)?),
        None => None,
    };
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
        let (poll, handle, inbox) = event_loop::prepare().map_err(|e| format!("cannot create a poller: {e}"))?;
        polls.push(poll);
        handles.push(handle);
        inboxes.push(inbox);
    }
    let (router_tx, router_rx) = crossbeam_channel::unbounded();
    let (publisher_tx, publisher_rx) = match redis_client {
        Some(_) => {
            let (tx, rx) = crossbeam_channel::unbounded();
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let shared = Arc::new(Shared::new(config, verifier, router_tx, publisher_tx));
    let loops: Arc<[event_loop::LoopHandle]> = handles.into();
    let _ = shared.loops.set(loops.clone());

    let router_shared = shared.clone();
    spawn("herald-router", move || Router::new(loops).run(router_rx, &router_shared.metrics))?;
    if let (Some(client), Some(jobs)) = (redis_client, publisher_rx) {
        let (sub_client, sub_shared) = (client.clone(), shared.clone());
        spawn("herald-redis-sub", move || crate::broker::redis::run_subscriber(sub_client, sub_shared))?;
        let pub_shared = shared.clone();
        spawn("herald-redis-pub", move || crate::broker::redis::run_publisher(client, jobs, pub_shared))?;
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
    /// Stops accepting, closes every connection with 1001 after its queue is flushed, and
    /// waits for the loops, at most `grace`. Returns whether everything closed in time.
    pub fn shutdown(self, grace: Duration) -> bool {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        for handle in self.shared.loops() {
            handle.send(LoopCmd::Shutdown);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !self.loop_threads.iter().all(|t| t.is_finished()) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let clean = self.loop_threads.iter().all(|t| t.is_finished());
        let _ = self.shared.router.send(RouterMsg::Stop);
        clean
    }
}

/// Prints what a new user needs to try herald in dev mode. This goes to stdout on purpose:
/// it is the one place a token is shown, and only a token for a throwaway secret.
fn dev_banner(config: &Config, addr: SocketAddr) {
    let JwtKey::Secret(secret) = &config.jwt_key else { return };
    let user = "dev-user";
    let token = crate::auth::mint(secret, user, Duration::from_secs(24 * 3600), &[], None);
    let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
    let base = format!("{host}:{}", addr.port());
    let message = r#"{"type":"notification","payload":{"title":"hi"}}"#;
    // Host, port and db only: a Redis password never reaches the banner (redis-cli asks for it).
    let redis = config.redis_url.as_deref().and_then(|url| {
        let info = redis::IntoConnectionInfo::into_connection_info(url).ok()?;
        let mut cli = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => format!("redis-cli -h {host} -p {port}"),
            redis::ConnectionAddr::Unix(path) => format!("redis-cli -s {}", path.display()),
            _ => return None,
        };
        let settings = info.redis_settings();
        if settings.db() != 0 {
            cli.push_str(&format!(" -n {}", settings.db()));
        }
        if let Some(name) = settings.username() {
            cli.push_str(&format!(" --user {name}"));
        }
        if settings.password().is_some() {
            cli.push_str(" --askpass");
        }
        Some(format!("  redis:    {cli} PUBLISH {}{user} '{message}'\n", config.user_channel_prefix))
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

/// Runs until a signal stops it.
pub fn run(config: Config) -> Result<(), String> {
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(|e| format!("cannot handle signals: {e}"))?;
    let grace = config.shutdown_grace;
    let dev_mode = config.dev_mode;
    let mode = if config.redis_url.is_some() { "redis" } else { "embedded broker" };
    let threads = config.threads;
    let banner_config = config.clone();
    let running = start(config)?;
    info!(addr = %running.local_addr, threads, mode, "herald listening on {}", running.local_addr);
    if dev_mode {
        warn!("dev mode: tokens are signed with a random secret; set HERALD_JWT_SECRET in production");
        dev_banner(&banner_config, running.local_addr);
    }
    let first = signals.forever().next();
    info!(signal = ?first, "shutting down: closing connections (grace {:?})", grace);
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            warn!("second signal: exiting now");
            std::process::exit(130);
        }
    });
    if !running.shutdown(grace) {
        warn!("shutdown grace period ended with connections still open");
    }
    info!("stopped");
    Ok(())
}
