//! The Redis Cluster's slot map, kept current by a thread of its own: fetched with
//! `CLUSTER SHARDS` from the first seed that answers (then from any node the last map named),
//! every 30 s and whenever the reader or the publisher asks (a `MOVED`, a shard channel
//! dropped by the server, a node gone). A `MOVED` redirect is applied to the map at once,
//! before the full refresh it triggers comes back.
//!
//! The fetch blocks (connect, one command, bounded by timeouts), which is why it runs here and
//! not on the reader or the publisher, whose other nodes keep flowing meanwhile. Whoever uses
//! the map registers a callback that wakes it when the map changes, and compares versions.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use tracing::{info, warn};

use super::RedisTls;
use super::conn::{Conn, Failure};
use super::redis_url::RedisUrl;
use super::resp;
use super::slots::{NodeAddr, SlotMap};
use super::{BACKOFF_CAP, BACKOFF_START, CONNECT_TIMEOUT, Context};

/// A map is fetched again this often even when nothing asks.
const PERIOD: Duration = Duration::from_secs(30);
/// Fetches are at least this far apart, however often they are asked for: a failover makes
/// every connection to the lost master ask at once, and again on each retry.
const MIN_INTERVAL: Duration = Duration::from_millis(200);
/// The longest a `CLUSTER SHARDS` reply may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// The name of the topology connection in CLIENT LIST.
const NAME: &str = "herald-topology";

type Notify = Box<dyn Fn() + Send + Sync>;

struct State {
    map: Option<Arc<SlotMap>>,
    /// Someone asked for a fresh map.
    asked: bool,
    notify: Vec<Notify>,
}

/// The current slot map and the means to ask for a newer one.
pub struct Topology {
    seeds: Vec<RedisUrl>,
    /// What `rediss://` nodes are trusted with.
    tls: Option<RedisTls>,
    state: Mutex<State>,
    asked: Condvar,
    /// Bumped on every change of the map; 0 while there is none.
    version: AtomicU64,
}

impl Topology {
    /// Starts the thread that keeps the map; the first fetch starts at once.
    pub fn start(seeds: Vec<RedisUrl>, ctx: Context) -> Result<Arc<Topology>, String> {
        if seeds.is_empty() {
            return Err("a Redis Cluster needs at least one seed node".into());
        }
        let topology = Arc::new(Topology {
            seeds,
            tls: ctx.settings.tls.clone(),
            state: Mutex::new(State { map: None, asked: true, notify: Vec::new() }),
            asked: Condvar::new(),
            version: AtomicU64::new(0),
        });
        let keeper = topology.clone();
        super::spawn("herald-redis-topo", move || keeper.run(&ctx))?;
        Ok(topology)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves a consistent State (every field is written
        // whole), so the poison is no reason to stop.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `notify` is called (from another thread) whenever the map changes.
    pub fn on_change(&self, notify: impl Fn() + Send + Sync + 'static) {
        self.lock().notify.push(Box::new(notify));
    }

    /// The version of the current map: compare it to the one last taken to see a change.
    pub fn version(&self) -> u64 {
        self.version.load(SeqCst)
    }

    /// The current map, if one was ever fetched, with its version.
    pub fn map(&self) -> (u64, Option<Arc<SlotMap>>) {
        let state = self.lock();
        (self.version.load(SeqCst), state.map.clone())
    }

    /// The current map when it changed since version `seen`, which moves on to it; `None` while
    /// it has not. What every holder of links per master asks before it follows the map.
    pub fn map_if_newer(&self, seen: &mut u64) -> Option<Option<Arc<SlotMap>>> {
        if self.version() == *seen {
            return None;
        }
        let (version, map) = self.map();
        *seen = version;
        Some(map)
    }

    /// Asks for a fresh map soon.
    pub fn refresh(&self) {
        self.lock().asked = true;
        self.asked.notify_one();
    }

    /// A `MOVED` said `slot` is now served by `addr`: the map says so at once, and a full
    /// refresh follows (other slots likely moved with it).
    pub fn moved(&self, slot: u16, addr: NodeAddr) {
        let mut state = self.lock();
        if let Some(map) = &state.map {
            if map.owner(slot) != Some(&addr) {
                state.map = Some(Arc::new(map.with_moved(slot, &addr)));
                self.version.fetch_add(1, SeqCst);
                for notify in &state.notify {
                    notify();
                }
            }
        }
        state.asked = true;
        self.asked.notify_one();
    }

    /// The URL for a node: the seeds' scheme and credentials (a cluster has one set of
    /// users) at the node's address.
    pub fn url_of(&self, addr: &NodeAddr) -> RedisUrl {
        let mut url = self.seeds[0].clone();
        url.host.clone_from(&addr.host);
        url.port = addr.port;
        url.db = 0;
        url
    }

    fn run(&self, ctx: &Context) {
        let mut last_fetch: Option<Instant> = None;
        let mut backoff = BACKOFF_START;
        let mut failing = false;
        loop {
            {
                let mut state = self.lock();
                loop {
                    let due = last_fetch.is_none_or(|at| at.elapsed() >= PERIOD);
                    if state.asked || due {
                        break;
                    }
                    let left = last_fetch.map_or(Duration::ZERO, |at| PERIOD.saturating_sub(at.elapsed()));
                    state = self.asked.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
                }
                state.asked = false;
            }
            if let Some(at) = last_fetch {
                std::thread::sleep(MIN_INTERVAL.saturating_sub(at.elapsed()));
            }
            last_fetch = Some(Instant::now());
            match self.fetch() {
                Ok(map) => {
                    if failing {
                        info!("redis cluster reachable again");
                    }
                    failing = false;
                    backoff = BACKOFF_START;
                    self.install(map);
                }
                Err(failure) => {
                    ctx.metrics.redis.set_error(failure.kind());
                    if !failing {
                        warn!(error = %failure, "cannot read the redis cluster's slot map from any node; retrying");
                    }
                    failing = true;
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_CAP);
                    self.lock().asked = true;
                }
            }
        }
    }

    fn install(&self, map: SlotMap) {
        let mut state = self.lock();
        if state.map.as_deref() == Some(&map) {
            return;
        }
        let masters: Vec<String> = map.masters().iter().map(|m| m.to_string()).collect();
        if map.is_complete() {
            info!(?masters, "redis cluster slot map");
        } else {
            warn!(?masters, "redis cluster slot map has slots no master serves");
        }
        state.map = Some(Arc::new(map));
        self.version.fetch_add(1, SeqCst);
        for notify in &state.notify {
            notify();
        }
    }

    /// Asks the seeds in order, then every node the current map names, until one answers.
    fn fetch(&self) -> Result<SlotMap, Failure> {
        let known: Vec<RedisUrl> = {
            let state = self.lock();
            state.map.iter().flat_map(|m| m.nodes().iter().map(|n| self.url_of(n))).collect()
        };
        let mut last = Failure::Refused("no node to ask".into());
        let mut asked = Vec::new();
        for url in self.seeds.iter().chain(known.iter()) {
            if asked.contains(&(url.host.as_str(), url.port)) {
                continue;
            }
            asked.push((url.host.as_str(), url.port));
            match shards_from(url, self.tls.as_ref()) {
                Ok(map) => return Ok(map),
                Err(failure) => last = failure,
            }
        }
        Err(last)
    }
}

/// One node's `CLUSTER SHARDS`, read into a map.
fn shards_from(url: &RedisUrl, tls: Option<&RedisTls>) -> Result<SlotMap, Failure> {
    let mut conn = Conn::open(url, tls, NAME, CONNECT_TIMEOUT, 1024 * 1024)?;
    request(&mut conn, &[b"CLUSTER", b"SHARDS"], QUERY_TIMEOUT, |value| match value.error() {
        Some(error) => Err(Failure::from_reply(error)),
        None => SlotMap::from_shards(&value, url.tls).map_err(|e| Failure::Protocol(e.to_string())),
    })?
}

/// Sends one command on a fresh connection and waits (bounded) for its reply.
pub(super) fn request<R>(
    conn: &mut Conn,
    command: &[&[u8]],
    timeout: Duration,
    act: impl FnOnce(resp::Value<'_>) -> R,
) -> Result<R, Failure> {
    const CONN: Token = Token(0);
    let deadline = Instant::now() + timeout;
    let mut poll = Poll::new()?;
    poll.registry().register(&mut conn.stream, CONN, Interest::READABLE | Interest::WRITABLE)?;
    resp::encode_command(conn.commands(), command.iter());
    let mut events = Events::with_capacity(4);
    let mut act = Some(act);
    loop {
        conn.flush()?;
        conn.fill()?;
        if let Some(result) = conn.next(|value| act.take().map(|act| act(value)))? {
            return result.ok_or_else(|| Failure::Protocol("a second reply".into()));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failure::Timeout);
        }
        if let Err(e) = poll.poll(&mut events, Some(left)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
    }
}
