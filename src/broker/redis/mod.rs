//! Redis, on herald's own sockets: the reader thread (subscribed; routes what Redis pushes
//! straight to the loops) and the publisher thread (pipelined PUBLISHes on behalf of HTTP
//! publishes and relays). Both speak RESP through [`resp`], connect as [`redis_url`] says,
//! reconnect by themselves with capped, jittered backoff, and report their state to
//! `/health`. Pub/sub has no replay: what was published while herald was disconnected is gone.
//!
//! A Redis Cluster ([`Endpoint::Cluster`]) in sharded pub/sub has a reader ([`sharded`]) and
//! a publisher ([`shard_publisher`]) with a connection per master, both following the slot
//! map that [`topology`] keeps ([`slots`]: slot math and the map). In classic pub/sub the
//! standalone reader and publisher serve, on the first seed that answers.

mod conn;
pub mod fleet;
mod fleet_links;
mod node_links;
mod presence_sync;
pub mod publish_link;
mod publisher;
mod reader;
pub mod redis_url;
pub mod resp;
mod shard_publisher;
mod sharded;
pub mod slots;
mod stream;
pub mod subscriptions;
mod survey;
mod topology;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{Outgoing, Routing};
use crate::ids::ReplyTo;
use crate::mailbox::Mailbox;
use crate::message;
use crate::metrics::Metrics;
pub use conn::RedisTls;
use fleet::{FleetHandle, FleetSettings, FleetThread};
pub use publish_link::PublishLink;
use publisher::{Message, PublishJob};
pub use reader::pattern_for;
use redis_url::RedisUrl;
use subscriptions::Reports;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a Redis thread waits for room in a loop's inbox before that loop misses a message
/// (or an answer): meanwhile a burst backs up into Redis, which bounds it with
/// client-output-buffer-limit, instead of into herald's memory.
const LOOP_PATIENCE: Duration = Duration::from_millis(500);
/// Publish jobs waiting for the publisher before HTTP publishes are refused (503).
const JOBS_CAPACITY: usize = 16 * 1024;

/// Capped exponential backoff with jitter, so a fleet of instances does not reconnect in step.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: BACKOFF_START }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_START;
    }

    /// The next wait, jittered; each call doubles the one after, up to the cap.
    fn next_delay(&mut self) -> Duration {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let jitter = self.next.mul_f64(0.25 * f64::from(nanos % 1000) / 1000.0);
        let delay = self.next + jitter;
        self.next = (self.next * 2).min(BACKOFF_CAP);
        delay
    }
}

/// What the Redis threads need to know of the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub user_prefix: String,
    pub topic_prefix: String,
    pub max_message_bytes: usize,
    /// What `rediss://` connections trust; `None` for `redis://`.
    pub tls: Option<RedisTls>,
}

/// What the Redis threads share with the rest of herald.
#[derive(Clone)]
pub struct Context {
    pub settings: Arc<Settings>,
    pub routing: Arc<Routing>,
    pub metrics: Arc<Metrics>,
}

/// How the reader subscribes (HERALD_REDIS_SUBSCRIBE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeMode {
    /// A channel per user and topic this instance holds: each instance receives its own share.
    Exact,
    /// One pattern per prefix: every instance receives every message.
    Pattern,
}

/// How herald uses a Redis Cluster's pub/sub (HERALD_REDIS_CLUSTER_PUBSUB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterPubsub {
    /// SSUBSCRIBE/SPUBLISH: each channel lives on the master serving its slot.
    Sharded,
    /// SUBSCRIBE/PUBLISH on one node, which the cluster bus relays to every other node.
    Classic,
}

/// Where herald's Redis is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// HERALD_REDIS_URL.
    Standalone(RedisUrl),
    /// HERALD_REDIS_CLUSTER: seed nodes, in the order given.
    Cluster { seeds: Vec<RedisUrl>, pubsub: ClusterPubsub },
}

/// Opens a connection to the first of `urls` that answers; on failure, the last failure and
/// where it happened.
fn open_first<'u>(
    urls: &'u [RedisUrl],
    tls: Option<&RedisTls>,
    name: &str,
    max_bulk: usize,
) -> Result<(conn::Conn, &'u RedisUrl), (conn::Failure, &'u RedisUrl)> {
    let mut last = None;
    for url in urls {
        match conn::Conn::open(url, tls, name, CONNECT_TIMEOUT, max_bulk) {
            Ok(conn) => return Ok((conn, url)),
            Err(failure) => last = Some((failure, url)),
        }
    }
    Err(last.unwrap_or_else(|| (conn::Failure::Refused("no Redis URL".into()), &urls[0])))
}

/// The event loops' handle on Redis: publishing goes through the publisher thread; joins and
/// leaves (exact mode) go to the reader.
pub struct RedisBroker {
    jobs: Arc<Mailbox<PublishJob>>,
    /// Where each loop's own publishing link connects (`publish_link`); `None` where the
    /// sharded publisher thread must place each channel on its master.
    link_urls: Option<Arc<[RedisUrl]>>,
    ctx: Context,
    settings: Arc<Settings>,
    reports: Option<Arc<Reports>>,
    fleet: Arc<FleetHandle>,
    history_on: bool,
}

impl RedisBroker {
    /// Starts the reader, publisher and fleet threads (and, for a cluster in sharded mode,
    /// the thread that keeps its slot map).
    pub fn start(
        endpoint: &Endpoint,
        mode: SubscribeMode,
        fleet_settings: FleetSettings,
        ctx: Context,
    ) -> Result<RedisBroker, String> {
        let poller = || mio::Poll::new().map_err(|e| format!("cannot create a poller for Redis: {e}"));
        let waker_error = |e: std::io::Error| format!("cannot create a waker for Redis: {e}");
        let poll = poller()?;
        let (jobs, inbox) = Mailbox::new(&poll, publisher::WAKER, JOBS_CAPACITY).map_err(waker_error)?;
        let jobs = Arc::new(jobs);
        let settings = ctx.settings.clone();
        let reader_poll = poller()?;
        let (reader_mode, reports) = match mode {
            SubscribeMode::Pattern => (reader::Mode::Pattern, None),
            SubscribeMode::Exact => {
                let (mailbox, changes) = Mailbox::unbounded(&reader_poll, reader::WAKER).map_err(waker_error)?;
                let reports = Arc::new(Reports(mailbox));
                (reader::Mode::Exact { changes, reports: reports.clone() }, Some(reports))
            }
        };
        if let Endpoint::Cluster { seeds, .. } = endpoint {
            if seeds.is_empty() {
                return Err("a Redis Cluster needs at least one seed node".into());
            }
        }
        let urls = match endpoint {
            Endpoint::Standalone(url) => vec![url.clone()],
            Endpoint::Cluster { seeds, .. } => seeds.clone(),
        };
        let history_on = fleet_settings.history.enabled();
        if history_on && matches!(endpoint, Endpoint::Cluster { pubsub: ClusterPubsub::Classic, .. }) {
            // herald_publish stores in the channel's slot, on its master; the classic
            // publisher holds one connection, to the first seed, and could store there only.
            return Err(
                "history (HERALD_HISTORY_SIZE) on a Redis Cluster needs HERALD_REDIS_CLUSTER_PUBSUB=sharded".into()
            );
        }
        let fleet_poll = poller()?;
        let (fleet, fleet_jobs) = Mailbox::unbounded(&fleet_poll, fleet::WAKER).map_err(waker_error)?;
        let fleet = Arc::new(fleet);
        // The fleet's keys live on every master of a cluster, whichever pub/sub it uses.
        let topology = match endpoint {
            Endpoint::Cluster { seeds, .. } => Some(topology::Topology::start(seeds.clone(), ctx.clone())?),
            Endpoint::Standalone(_) => None,
        };
        let sharded = matches!(endpoint, Endpoint::Cluster { pubsub: ClusterPubsub::Sharded, .. });
        if sharded && !matches!(reader_mode, reader::Mode::Exact { .. }) {
            return Err("sharded pub/sub needs exact subscriptions (Redis has no shard patterns)".into());
        }
        let place = match &topology {
            Some(topology) => {
                let wake_fleet = fleet.clone();
                topology.on_change(move || wake_fleet.nudge());
                fleet_links::Place::Cluster(topology.clone())
            }
            None => fleet_links::Place::Standalone(urls[0].clone()),
        };
        let thread =
            FleetThread::new(place, sharded, ctx.clone(), fleet_settings, fleet_poll, fleet_jobs, fleet.clone());
        spawn("herald-redis-fleet", move || thread.run())?;
        if let (true, Some(topology)) = (sharded, topology) {
            let reader::Mode::Exact { changes, reports } = reader_mode else {
                return Err("sharded pub/sub needs exact subscriptions (Redis has no shard patterns)".into());
            };
            let broker_reports = reports.clone();
            let (wake_reader, wake_publisher) = (reports.clone(), jobs.clone());
            topology.on_change(move || wake_reader.0.nudge());
            topology.on_change(move || wake_publisher.nudge());
            let (reader_topology, reader_ctx) = (topology.clone(), ctx.clone());
            spawn("herald-redis-read", move || {
                sharded::run(reader_topology, reader_ctx, reader_poll, changes, reports)
            })?;
            let (wake, broker_ctx) = (jobs.clone(), ctx.clone());
            spawn("herald-redis-pub", move || shard_publisher::run(topology, ctx, inbox, poll, wake))?;
            let reports = Some(broker_reports);
            return Ok(RedisBroker { jobs, link_urls: None, ctx: broker_ctx, settings, reports, fleet, history_on });
        }
        let (reader_urls, reader_ctx) = (urls.clone(), ctx.clone());
        spawn("herald-redis-read", move || reader::run(reader_urls, reader_ctx, reader_poll, reader_mode))?;
        let (wake, link_urls, broker_ctx) = (jobs.clone(), Some(Arc::from(urls.as_slice())), ctx.clone());
        spawn("herald-redis-pub", move || publisher::run(urls, ctx, inbox, poll, wake))?;
        Ok(RedisBroker { jobs, link_urls, ctx: broker_ctx, settings, reports, fleet, history_on })
    }

    /// Whether notifications are stored (herald's publishes go through `herald_publish`).
    pub fn history_enabled(&self) -> bool {
        self.history_on
    }

    /// The fleet thread's mailbox.
    pub fn fleet(&self) -> &FleetHandle {
        &self.fleet
    }

    /// Where loops report joins and leaves; `None` in pattern mode.
    pub fn subscription_reports(&self) -> Option<&Reports> {
        self.reports.as_deref()
    }

    /// Loop `loop_id`'s own publishing link, where one can serve.
    pub fn publish_link(&self, loop_id: usize) -> Option<PublishLink> {
        let urls = self.link_urls.clone()?;
        Some(PublishLink::new(loop_id, urls, self.ctx.clone(), self.jobs.clone()))
    }

    /// Publishes `items` on the calling loop's `link` when it is up, else through the publisher
    /// thread; the answer goes to `reply`.
    pub fn publish(
        &self,
        items: Vec<Outgoing>,
        reply: Option<ReplyTo>,
        link: Option<&mut PublishLink>,
    ) -> Result<(), String> {
        let mut messages = Vec::new();
        let mut counts = Vec::with_capacity(items.len());
        for item in items {
            // Published as it came, with any exclusion embedded so that every instance
            // honours it; each receiving instance stamps and frames it once. With history on,
            // `herald_publish` stores it and publishes it with its stream position.
            let payload: Arc<[u8]> = Arc::from(message::embed_exclusion(&item.message, &item.exclusion));
            let stored = self.history_on && !item.live_only;
            counts.push(item.targets.len() as u32);
            for target in &item.targets {
                let channel = super::channel_of(target, &self.settings.user_prefix, &self.settings.topic_prefix);
                messages.push(Message { channel: channel.into_bytes(), payload: payload.clone(), stored });
            }
        }
        let mut job = PublishJob { messages, counts, reply, retried: false };
        if let Some(link) = link {
            match link.submit(job) {
                Ok(()) => return Ok(()),
                Err(refused) => job = refused,
            }
        }
        self.jobs.try_send(job).map_err(|_| "redis publisher overloaded".to_string())
    }
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> Result<(), String> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(body)
        .map(|_| ())
        .map_err(|e| format!("cannot start thread {name}: {e}"))
}
