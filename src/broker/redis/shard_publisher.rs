//! The publisher in sharded cluster mode: one thread, a pipelined connection per master, each
//! message SPUBLISHed on the master serving its channel's slot (whose reply counts the
//! subscribers of that shard: every instance holding the target is subscribed there, so
//! `sent` stays exact).
//!
//! Redirects are followed: `MOVED` updates the slot map and the message goes to the node it
//! names, `ASK` sends it there once after `ASKING`; `TRYAGAIN`, `CLUSTERDOWN` and `LOADING` are
//! retried after a short backoff. A message gets [`MAX_TRIES`] sends in all, then its request
//! is answered with the failure: a redirect storm never loops. A connection that dies takes
//! its unanswered messages along: each is sent once more (to the slot's owner by the next
//! map), then given up.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tracing::warn;

use super::conn::{Conn, Failure};
use super::node_links::{NodeLink, NodeLinks};
use super::publisher::PublishJob;
use super::resp::{self, ServerError};
use super::slots::{self, NodeAddr, SlotMap};
use super::topology::Topology;
use super::{Backoff, CONNECT_TIMEOUT, Context, LOOP_PATIENCE};
use crate::ids::Answer;
use crate::mailbox::{LoopCmd, Mailbox};

/// Link tokens start after the one the jobs mailbox (and the topology) wake the thread with.
const LINKS: usize = super::publisher::WAKER.0 + 1;
/// Sends of one message, redirects and retries included.
const MAX_TRIES: u8 = 5;
/// The first retry after TRYAGAIN/CLUSTERDOWN/LOADING waits this long, doubling after.
const RETRY_START: Duration = Duration::from_millis(50);
/// An idle connection is PINGed this often (for `/health`).
const PING_EVERY: Duration = Duration::from_secs(1);
/// A reply not back after this long means the connection is wedged.
const REPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// One message of a job on its way.
#[derive(Debug, Clone, Copy)]
struct Msg {
    /// Key of its job in `open`.
    job: usize,
    index: usize,
    tries: u8,
    /// Preceded by ASKING (an ASK redirect).
    asking: bool,
}

/// A job whose replies are awaited.
struct Open {
    job: PublishJob,
    receivers: Vec<u64>,
    left: usize,
    failure: Option<String>,
}

/// A command awaiting its reply on a link.
enum Entry {
    Msg(Msg),
    Asking,
    Ping,
}

struct Link {
    addr: NodeAddr,
    conn: Option<Conn>,
    retry_at: Instant,
    backoff: Backoff,
    /// Messages to write once connected, oldest first.
    waiting: VecDeque<Msg>,
    /// Written and not answered, with when they were written.
    in_flight: VecDeque<(Entry, Instant)>,
    last_write: Instant,
    /// The last PING's round trip.
    rtt: Duration,
    warned: bool,
}

impl NodeLink for Link {
    fn addr(&self) -> &NodeAddr {
        &self.addr
    }
}

struct ShardPublisher {
    topology: Arc<Topology>,
    ctx: Context,
    jobs: Receiver<PublishJob>,
    poll: Poll,
    map: Option<Arc<SlotMap>>,
    version: u64,
    links: NodeLinks<Link>,
    open: Slab<Open>,
    /// Messages to send again later (TRYAGAIN and the like).
    delayed: Vec<(Instant, Msg)>,
    /// Messages to route again (redirected, or their connection died).
    reroute: Vec<(Msg, Option<NodeAddr>)>,
}

/// Publisher thread body: returns when every job sender is gone.
pub fn run(
    topology: Arc<Topology>,
    ctx: Context,
    jobs: Receiver<PublishJob>,
    poll: Poll,
    wake: Arc<Mailbox<PublishJob>>,
) {
    let mut publisher = ShardPublisher {
        topology,
        ctx,
        jobs,
        poll,
        map: None,
        version: 0,
        links: NodeLinks::default(),
        open: Slab::new(),
        delayed: Vec::new(),
        reroute: Vec::new(),
    };
    let mut events = Events::with_capacity(64);
    loop {
        wake.clear_wake();
        publisher.sync_map();
        if !publisher.take_jobs() {
            return;
        }
        publisher.step();
        publisher.report();
        let timeout = publisher.next_wake();
        if let Err(e) = publisher.poll.poll(&mut events, Some(timeout)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                warn!(error = %e, "redis publisher cannot poll; it stops");
                return;
            }
        }
    }
}

impl ShardPublisher {
    /// Moves every queued job to its links. `false` once no sender is left and nothing is
    /// pending.
    fn take_jobs(&mut self) -> bool {
        loop {
            match self.jobs.try_recv() {
                Ok(job) => {
                    let count = job.messages.len();
                    if count == 0 {
                        let counts = job.counts.iter().map(|_| 0).collect();
                        answer(&self.ctx, job, Answer::Published(counts));
                        continue;
                    }
                    let key = self.open.insert(Open { job, receivers: vec![0; count], left: count, failure: None });
                    for index in 0..count {
                        self.route(Msg { job: key, index, tries: 0, asking: false }, None);
                    }
                }
                Err(crossbeam_channel::TryRecvError::Empty) => return true,
                Err(crossbeam_channel::TryRecvError::Disconnected) => return !self.open.is_empty(),
            }
        }
    }

    /// Queues `msg` on the master serving its channel's slot, or on `to` (an ASK target).
    fn route(&mut self, msg: Msg, to: Option<NodeAddr>) {
        let Some(open) = self.open.get(msg.job) else { return };
        let slot = slots::key_slot(&open.job.messages[msg.index].channel);
        let Some(addr) = to.or_else(|| self.map.as_ref().and_then(|m| m.owner(slot).cloned())) else {
            self.topology.refresh();
            self.settle(msg, Err("redis cluster unavailable: no node serves the channel's slot".into()));
            return;
        };
        let key = self.link_for(&addr);
        self.links[key].waiting.push_back(msg);
    }

    fn link_for(&mut self, addr: &NodeAddr) -> usize {
        let now = Instant::now();
        let (key, _) = self.links.key_for(addr, || Link {
            addr: addr.clone(),
            conn: None,
            retry_at: now,
            backoff: Backoff::new(),
            waiting: VecDeque::new(),
            in_flight: VecDeque::new(),
            // PING at once, so /health is accurate from the first second.
            last_write: now - PING_EVERY,
            rtt: Duration::ZERO,
            warned: false,
        });
        key
    }

    fn sync_map(&mut self) {
        let Some(map) = self.topology.map_if_newer(&mut self.version) else { return };
        self.map = map;
        let Some(map) = self.map.clone() else { return };
        for master in map.masters() {
            self.link_for(master);
        }
        // Links to nodes that serve nothing now: what waits there goes where the map says,
        // and they close once nothing is in flight.
        let retired: Vec<usize> =
            self.links.iter().filter(|(_, l)| !map.masters().contains(&l.addr)).map(|(k, _)| k).collect();
        for key in retired {
            let waiting: Vec<Msg> = self.links[key].waiting.drain(..).collect();
            self.reroute.extend(waiting.into_iter().map(|m| (m, None)));
        }
        self.flush_reroutes();
    }

    fn flush_reroutes(&mut self) {
        for (msg, to) in std::mem::take(&mut self.reroute) {
            self.route(msg, to);
        }
    }

    fn step(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.delayed).into_iter().partition(|(at, _)| *at <= now);
        self.delayed = later;
        for (_, msg) in due {
            self.route(msg, None);
        }
        // Redirected messages go out at once; each has a bounded number of tries, so this
        // ends.
        for _ in 0..=MAX_TRIES {
            self.pass();
            if self.reroute.is_empty() {
                break;
            }
            self.sync_map();
            self.flush_reroutes();
        }
        self.prune();
    }

    /// Connects, PINGs, writes and reads every link once.
    fn pass(&mut self) {
        let now = Instant::now();
        let keys: Vec<usize> = self.links.iter().map(|(k, _)| k).collect();
        for key in keys {
            let link = &self.links[key];
            let is_master = self.map.as_ref().is_some_and(|m| m.masters().contains(&link.addr));
            let wants_ping = is_master && now >= link.last_write + PING_EVERY && link.in_flight.is_empty();
            if link.conn.is_none() && (!link.waiting.is_empty() || wants_ping) {
                if now < link.retry_at {
                    if !link.waiting.is_empty() {
                        // A failover may have replaced the node: look again while publishes
                        // need it, not only at the next (backed off) reconnect.
                        self.topology.refresh();
                    }
                    self.fail_waiting(key, "redis unavailable");
                    continue;
                }
                self.connect(key);
            }
            let link = &mut self.links[key];
            if let Some(conn) = link.conn.as_mut().filter(|_| wants_ping) {
                resp::encode_command(conn.commands(), [b"PING"]);
                link.in_flight.push_back((Entry::Ping, now));
                link.last_write = now;
            }
            if let Err(failure) = self.exchange(key) {
                self.lost(key, failure);
            }
        }
    }

    /// Closes links to nodes that serve no slot any more once nothing is pending there.
    fn prune(&mut self) {
        let Some(map) = &self.map else { return };
        let idle = self
            .links
            .remove_where(|l| !map.masters().contains(&l.addr) && l.waiting.is_empty() && l.in_flight.is_empty());
        for mut link in idle {
            if let Some(conn) = link.conn.as_mut() {
                let _ = self.poll.registry().deregister(&mut conn.stream);
            }
        }
    }

    fn connect(&mut self, key: usize) {
        let url = self.topology.url_of(&self.links[key].addr);
        let opened = Conn::open(&url, self.ctx.settings.tls.as_ref(), "herald-publisher", CONNECT_TIMEOUT, 64 * 1024)
            .and_then(|mut conn| {
                self.poll
                    .registry()
                    .register(&mut conn.stream, Token(LINKS + key), Interest::READABLE | Interest::WRITABLE)
                    .map_err(Failure::Io)?;
                Ok(conn)
            });
        let link = &mut self.links[key];
        match opened {
            Ok(conn) => {
                link.conn = Some(conn);
                link.backoff.reset();
                link.warned = false;
            }
            Err(failure) => {
                if !link.warned {
                    warn!(node = %link.addr, error = %failure, "redis publisher cannot reach a cluster node");
                    link.warned = true;
                }
                link.retry_at = Instant::now() + link.backoff.next_delay();
                self.ctx.metrics.redis.set_error(failure.kind());
                self.topology.refresh();
                self.fail_waiting(key, &format!("redis error: {}", failure.kind()));
            }
        }
    }

    fn fail_waiting(&mut self, key: usize, why: &str) {
        let waiting: Vec<Msg> = self.links[key].waiting.drain(..).collect();
        for msg in waiting {
            self.settle(msg, Err(why.to_string()));
        }
    }

    /// Writes link `key`'s waiting messages, then reads every reply that has arrived.
    fn exchange(&mut self, key: usize) -> Result<(), Failure> {
        let now = Instant::now();
        let link = &mut self.links[key];
        let Some(conn) = link.conn.as_mut() else { return Ok(()) };
        while let Some(msg) = link.waiting.pop_front() {
            let Some(open) = self.open.get(msg.job) else { continue };
            if msg.asking {
                resp::encode_command(conn.commands(), [b"ASKING"]);
                link.in_flight.push_back((Entry::Asking, now));
            }
            let message = &open.job.messages[msg.index];
            if message.stored {
                // Stored and published in one call on the slot's master (the library is loaded
                // there with SPUBLISH).
                let args = [b"FCALL".as_slice(), b"herald_publish", b"1", &message.channel, &message.payload];
                resp::encode_command(conn.commands(), args);
            } else {
                resp::encode_spublish(conn.commands(), &message.channel, &message.payload);
            }
            link.in_flight.push_back((Entry::Msg(msg), now));
            link.last_write = now;
        }
        conn.flush()?;
        conn.fill()?;
        loop {
            let link = &mut self.links[key];
            let Some(conn) = link.conn.as_mut() else { return Ok(()) };
            let own_host = &link.addr.host;
            let reply = conn.next(|value| match value.error() {
                // SPUBLISH answers the receivers; herald_publish {offset, epoch, receivers}.
                None => {
                    let receivers = value.as_integer().or_else(|| value.items()?.get(2)?.as_integer());
                    Reply::Count(receivers.unwrap_or(0).max(0) as u64)
                }
                Some(ServerError::Moved { slot, host, port }) => Reply::Moved(slot, node(host, port, own_host)),
                Some(ServerError::Ask { host, port, .. }) => Reply::Ask(node(host, port, own_host)),
                Some(error @ (ServerError::TryAgain(_) | ServerError::ClusterDown(_) | ServerError::Loading(_))) => {
                    Reply::Later(Failure::from_reply(error))
                }
                // A master that joined a moment ago: the fleet thread is loading herald's
                // functions on it.
                Some(error @ ServerError::Other(text)) if text.starts_with(b"ERR Function not found") => {
                    Reply::Later(Failure::from_reply(error))
                }
                Some(error) => Reply::Refused(Failure::from_reply(error)),
            })?;
            let Some(reply) = reply else { break };
            let Some((entry, sent)) = link.in_flight.pop_front() else {
                return Err(Failure::Protocol("a reply nobody asked for".into()));
            };
            match (entry, reply) {
                (Entry::Ping, Reply::Count(_)) => link.rtt = sent.elapsed(),
                (Entry::Ping, Reply::Refused(failure) | Reply::Later(failure)) => return Err(failure),
                (Entry::Ping | Entry::Asking, _) => {}
                (Entry::Msg(msg), Reply::Count(receivers)) => self.settle(msg, Ok(receivers)),
                (Entry::Msg(msg), Reply::Moved(slot, addr)) => {
                    self.topology.moved(slot, addr);
                    self.retry(msg, None, Duration::ZERO, "too many MOVED redirects");
                }
                (Entry::Msg(msg), Reply::Ask(addr)) => {
                    self.retry(Msg { asking: true, ..msg }, Some(addr), Duration::ZERO, "too many ASK redirects")
                }
                (Entry::Msg(msg), Reply::Later(failure)) => {
                    let delay = RETRY_START * 2u32.pow(u32::from(msg.tries));
                    self.retry(msg, None, delay, &format!("redis error: {}", failure.kind()));
                }
                (Entry::Msg(msg), Reply::Refused(failure)) => {
                    warn!(error = %failure, "redis refused a publish");
                    self.settle(msg, Err(format!("redis error: {}", failure.kind())));
                }
            }
        }
        let link = &self.links[key];
        if link.in_flight.front().is_some_and(|(_, sent)| sent.elapsed() >= REPLY_TIMEOUT) {
            return Err(Failure::Timeout);
        }
        Ok(())
    }

    /// Sends `msg` again (to `to`, or to its slot's owner) after `delay`, unless it had its
    /// tries: then its request fails with `why`.
    fn retry(&mut self, mut msg: Msg, to: Option<NodeAddr>, delay: Duration, why: &str) {
        msg.tries += 1;
        if msg.tries >= MAX_TRIES {
            self.settle(msg, Err(format!("redis cluster: {why}")));
        } else if delay.is_zero() {
            if to.is_none() {
                msg.asking = false;
            }
            self.reroute.push((msg, to));
        } else {
            msg.asking = false;
            self.delayed.push((Instant::now() + delay, msg));
        }
    }

    /// Link `key`'s connection died: messages it had not answered are sent once more.
    fn lost(&mut self, key: usize, failure: Failure) {
        let link = &mut self.links[key];
        if !link.warned {
            warn!(node = %link.addr, error = %failure, "redis publisher lost a cluster node");
            link.warned = true;
        }
        if let Some(mut conn) = link.conn.take() {
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
        link.retry_at = Instant::now() + link.backoff.next_delay();
        let in_flight: Vec<(Entry, Instant)> = link.in_flight.drain(..).collect();
        self.ctx.metrics.redis.set_error(failure.kind());
        self.topology.refresh();
        for (entry, _) in in_flight {
            if let Entry::Msg(msg) = entry {
                self.retry(msg, None, Duration::ZERO, &format!("redis error: {}", failure.kind()));
            }
        }
    }

    /// Records one message's outcome; answers its request once every message has one.
    fn settle(&mut self, msg: Msg, outcome: Result<u64, String>) {
        let Some(open) = self.open.get_mut(msg.job) else { return };
        match outcome {
            Ok(receivers) => open.receivers[msg.index] = receivers,
            Err(why) => {
                open.failure.get_or_insert(why);
            }
        }
        open.left -= 1;
        if open.left > 0 {
            return;
        }
        let open = self.open.remove(msg.job);
        let reply = match open.failure {
            Some(why) => Answer::Failed(why),
            None => {
                let mut receivers = open.receivers.iter();
                Answer::Published(open.job.counts.iter().map(|&n| receivers.by_ref().take(n as usize).sum()).collect())
            }
        };
        answer(&self.ctx, open.job, reply);
    }

    /// Up while a map is known and every master has a connection.
    fn report(&self) {
        let health = &self.ctx.metrics.redis;
        let Some(map) = &self.map else {
            health.publisher_up.store(false, Relaxed);
            return;
        };
        let mut up = true;
        let mut rtt = Duration::ZERO;
        for master in map.masters() {
            match self.links.by_addr(master) {
                Some(link) if link.conn.is_some() => rtt = rtt.max(link.rtt),
                _ => up = false,
            }
        }
        health.publisher_up.store(up, Relaxed);
        if up {
            health.ping_micros.store(rtt.as_micros() as u64, Relaxed);
        }
    }

    fn next_wake(&self) -> Duration {
        let now = Instant::now();
        let mut wait = PING_EVERY;
        for (_, link) in &self.links {
            wait = wait.min((link.last_write + PING_EVERY).saturating_duration_since(now));
            if let Some((_, sent)) = link.in_flight.front() {
                wait = wait.min((*sent + REPLY_TIMEOUT).saturating_duration_since(now));
            }
            if link.conn.is_none() {
                wait = wait.min(link.retry_at.saturating_duration_since(now));
            }
        }
        if !self.reroute.is_empty() {
            return Duration::from_millis(1);
        }
        for (at, _) in &self.delayed {
            wait = wait.min(at.saturating_duration_since(now));
        }
        wait.max(Duration::from_millis(1))
    }
}

enum Reply {
    Count(u64),
    Moved(u16, NodeAddr),
    Ask(NodeAddr),
    /// Worth another try shortly.
    Later(Failure),
    Refused(Failure),
}

/// A redirect's node; an empty host means the host of the connection that got it.
fn node(host: &[u8], port: u16, own_host: &str) -> NodeAddr {
    let host = if host.is_empty() { own_host.to_string() } else { String::from_utf8_lossy(host).into_owned() };
    NodeAddr { host, port }
}

fn answer(ctx: &Context, job: PublishJob, answer: Answer) {
    let Some(reply) = job.reply else { return };
    if let Some(handle) = ctx.routing.loops().get(reply.loop_id) {
        let _ = handle.send_waiting(LoopCmd::Answer { conn: reply.conn, answer }, LOOP_PATIENCE);
    }
}
