//! The reader in sharded cluster mode (HERALD_REDIS_CLUSTER with SSUBSCRIBE): one thread,
//! one subscriber connection per master, each channel SSUBSCRIBEd on the master that serves
//! its slot. Exact subscriptions as in standalone mode: a [`Subscriptions`] per node tracks
//! the commands and confirmations there, a connection waits for its channel's confirmation,
//! and nobody waits for a node that is unreachable.
//!
//! Slots move (resharding, failover) and nodes die; the reader follows:
//! * a `sunsubscribe` the server pushes unasked means the channel's slot left that node: the
//!   channel is subscribed again there, and the `MOVED` that answers says where it went;
//! * a `MOVED` updates the slot map at once and the channel goes to the node it names;
//! * a node's connection lost (EOF, error, a PING unanswered) drops its subscriptions: they
//!   are made again on the next connection, or wherever the next slot map puts their slots
//!   (a replica promoted after its master died), asked for while the node stays unreachable.
//!
//! Commands carry one channel each (SSUBSCRIBE and SUNSUBSCRIBE refuse channels of several
//! slots), pipelined; replies come in order, so a queue of what was sent tells which
//! command an error reply answers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::{Events, Interest, Poll, Token};
use tracing::{info, warn};

use super::conn::{Conn, Failure};
use super::node_links::{NodeLink, NodeLinks};
use super::reader::{HERALD_ENVELOPE, PROBE_AFTER, PROBE_TIMEOUT, READER_NAME, RETRY_READY, Router, WAKER};
use super::resp::{self, Push, ServerError, SubKind};
use super::slots::{self, NodeAddr, SlotMap};
use super::subscriptions::{Change, Reports, Subscriptions};
use super::topology::Topology;
use super::{Backoff, CONNECT_TIMEOUT, Context, Settings};
use crate::ids::{ReplyTo, Target};
use crate::mailbox::LoopCmd;

/// Link tokens start here (the loops' reports wake the reader with [`WAKER`]).
const LINKS: usize = WAKER.0 + 1;
/// While a node holding subscriptions is unreachable, a new slot map is asked for this often:
/// a replica is promoted in its place within seconds.
const ASK_MAP_EVERY: Duration = Duration::from_millis(250);
/// A channel the cluster refused (CLUSTERDOWN during a failover, TRYAGAIN…) is tried again
/// after this long.
const RETRY_REFUSED: Duration = Duration::from_millis(500);
/// Refusals are logged at most this often.
const LOG_REFUSALS_EVERY: Duration = Duration::from_secs(5);

/// Reader thread body: never returns while the process runs.
pub fn run(topology: Arc<Topology>, ctx: Context, poll: Poll, changes: Receiver<Change>, reports: Arc<Reports>) {
    let now = Instant::now();
    let mut reader = Sharded {
        router: Router::new(ctx.clone()),
        ctx,
        poll,
        changes,
        reports,
        topology,
        map: None,
        version: 0,
        links: NodeLinks::default(),
        home: HashMap::new(),
        unplaced: HashSet::new(),
        retry_at: None,
        redirected: Vec::new(),
        ready: Vec::new(),
        unsent_ready: Vec::new(),
        asked_map: now,
        refusals: 0,
        refusals_logged: now - LOG_REFUSALS_EVERY,
    };
    reader.run();
}

struct Sharded {
    ctx: Context,
    router: Router,
    poll: Poll,
    changes: Receiver<Change>,
    reports: Arc<Reports>,
    topology: Arc<Topology>,
    map: Option<Arc<SlotMap>>,
    /// The topology version `map` is.
    version: u64,
    /// One per master of the map (and per former master while it still holds channels).
    links: NodeLinks<Link>,
    /// Where each wanted channel's subscription lives: a key of `links` whose
    /// `subs` wants it.
    home: HashMap<Target, usize>,
    /// Wanted channels with nowhere to go: no slot map yet, a slot no master serves, or the
    /// cluster refused them. Placed again on a new map or at `retry_at`.
    unplaced: HashSet<Target>,
    retry_at: Option<Instant>,
    /// Channels a `MOVED` redirected, with their waiters: placed on the next turn of the loop.
    redirected: Vec<(Target, Vec<ReplyTo>)>,
    /// Connections that may proceed, gathered while reading and sent after.
    ready: Vec<ReplyTo>,
    /// Confirmations a full loop inbox did not take yet.
    unsent_ready: Vec<ReplyTo>,
    asked_map: Instant,
    refusals: u64,
    refusals_logged: Instant,
}

/// One master and the reader's subscriber connection to it.
struct Link {
    addr: NodeAddr,
    phase: Phase,
    subs: Subscriptions,
    /// Commands sent and not answered yet, oldest first.
    sent: VecDeque<Sent>,
    backoff: Backoff,
    /// Was ready once: the next time is a reconnect.
    was_ready: bool,
    /// The current outage was logged.
    warned: bool,
}

impl NodeLink for Link {
    fn addr(&self) -> &NodeAddr {
        &self.addr
    }
}

enum Phase {
    /// Not connected; the next attempt at `retry_at`.
    Down { retry_at: Instant },
    /// Connected. `ready` once the PING sent after the first subscriptions came back.
    Up { conn: Conn, ready: bool, last_heard: Instant, probe_sent: Option<Instant> },
}

impl Link {
    fn is_up(&self) -> bool {
        matches!(self.phase, Phase::Up { .. })
    }

    fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Up { ready: true, .. })
    }

    fn wants_any(&self) -> bool {
        self.subs.wanted().next().is_some()
    }
}

/// A command awaiting its reply.
#[derive(Debug)]
enum Sent {
    Subscribe(Target),
    Unsubscribe(Target),
    Ping,
}

/// What one value from a node was.
enum Heard {
    Message,
    Subscription { kind: SubKind, target: Option<Target> },
    Pong,
    Other,
    Refused(Refusal),
}

enum Refusal {
    Moved { slot: u16, addr: NodeAddr },
    Other(Failure),
}

fn slot_of(target: &Target, settings: &Settings) -> u16 {
    slots::key_slot(super::super::channel_of(target, &settings.user_prefix, &settings.topic_prefix).as_bytes())
}

impl Sharded {
    fn run(&mut self) {
        let mut events = Events::with_capacity(64);
        loop {
            self.sync_map();
            self.place_redirected();
            self.take_changes();
            self.retry_unplaced();
            self.connect_due();
            self.send_all();
            self.prune();
            self.flush_ready();
            self.report();
            let timeout = self.next_timeout();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    warn!(error = %e, "redis reader cannot poll");
                    std::thread::sleep(RETRY_READY);
                }
            }
            for event in events.iter() {
                if let Some(key) = event.token().0.checked_sub(LINKS) {
                    if let Err(failure) = self.read(key) {
                        self.lost(key, failure);
                    }
                }
            }
            self.probe();
        }
    }

    fn table(&self) -> &crate::route::RouteTable {
        &self.ctx.routing.table
    }

    /// Whether `target` is still received here (the route table is the truth).
    fn wanted(&self, target: &Target) -> bool {
        !self.table().release_if_unheld(target)
    }

    fn owner(&self, target: &Target) -> Option<NodeAddr> {
        self.map.as_ref()?.owner(slot_of(target, &self.ctx.settings)).cloned()
    }

    /// Takes a newer slot map, if there is one: a link per master, and every channel whose
    /// slot is served elsewhere now moves there.
    fn sync_map(&mut self) {
        let Some(map) = self.topology.map_if_newer(&mut self.version) else { return };
        self.map = map;
        let Some(map) = self.map.clone() else { return };
        for master in map.masters() {
            self.link_for(master);
        }
        let settings = &self.ctx.settings;
        let mut moves = Vec::new();
        for (key, link) in &self.links {
            for target in link.subs.wanted() {
                if map.owner(slot_of(target, settings)) != Some(&link.addr) {
                    moves.push((key, target.clone()));
                }
            }
        }
        for (key, target) in moves {
            self.unhome(key, &target);
        }
        for target in std::mem::take(&mut self.unplaced) {
            if self.wanted(&target) {
                self.place(target, Vec::new());
            }
        }
    }

    /// Places the channels a `MOVED` sent elsewhere, by the map that now knows it.
    fn place_redirected(&mut self) {
        for (target, waiters) in std::mem::take(&mut self.redirected) {
            if self.wanted(&target) {
                self.place(target, waiters);
            } else {
                self.ready.extend(waiters);
            }
        }
    }

    /// Moves `target` away from link `key` to wherever the map says it belongs now.
    fn unhome(&mut self, key: usize, target: &Target) {
        let waiters = self.links[key].subs.forget(target);
        self.table().set_subscribed(target, false);
        if self.home.get(target) == Some(&key) {
            self.home.remove(target);
        }
        if self.wanted(target) {
            self.place(target.clone(), waiters);
        } else {
            self.ready.extend(waiters);
        }
    }

    /// The link to `addr`, made (and connected) if there is none.
    fn link_for(&mut self, addr: &NodeAddr) -> usize {
        let (key, new) = self.links.key_for(addr, || Link {
            addr: addr.clone(),
            phase: Phase::Down { retry_at: Instant::now() },
            subs: Subscriptions::default(),
            sent: VecDeque::new(),
            backoff: Backoff::new(),
            was_ready: false,
            warned: false,
        });
        if new {
            self.connect(key);
        }
        key
    }

    /// Subscribes `target` on the master serving its slot; `waiters` wait for it there, or
    /// proceed now if that master is unreachable or unknown.
    fn place(&mut self, target: Target, waiters: Vec<ReplyTo>) {
        let Some(addr) = self.owner(&target) else {
            self.ready.extend(waiters);
            self.unplace(target);
            return;
        };
        let key = self.link_for(&addr);
        let link = &mut self.links[key];
        let up = link.is_up();
        self.ready.extend(link.subs.reconcile(&target, true, None));
        for waiter in waiters {
            if up {
                self.ready.extend(link.subs.reconcile(&target, true, Some(waiter)));
            } else {
                self.ready.push(waiter);
            }
        }
        self.home.insert(target, key);
    }

    fn unplace(&mut self, target: Target) {
        self.unplaced.insert(target);
        self.retry_at.get_or_insert_with(|| Instant::now() + RETRY_REFUSED);
    }

    fn retry_unplaced(&mut self) {
        if self.retry_at.is_none_or(|at| at > Instant::now()) {
            return;
        }
        self.retry_at = None;
        for target in std::mem::take(&mut self.unplaced) {
            if self.wanted(&target) {
                self.place(target, Vec::new());
            }
        }
    }

    /// Takes the loops' reports and brings each target's subscription in line with the route
    /// table.
    fn take_changes(&mut self) {
        self.reports.clear_wake();
        while let Ok(change) = self.changes.try_recv() {
            let (target, waiter) = match change {
                Change::Changed(target) => (target, None),
                Change::Wait(target, waiter) => (target, Some(waiter)),
            };
            let wanted = self.wanted(&target);
            let home = self.home.get(&target).copied().filter(|&key| self.links.contains(key));
            match home {
                Some(key) if wanted => {
                    let stays = self.owner(&target).is_none_or(|owner| owner == self.links[key].addr);
                    if stays {
                        let link = &mut self.links[key];
                        match waiter {
                            Some(waiter) if !link.is_up() => {
                                self.ready.push(waiter);
                                self.ready.extend(link.subs.reconcile(&target, true, None));
                            }
                            waiter => self.ready.extend(link.subs.reconcile(&target, true, waiter)),
                        }
                    } else {
                        self.ready.extend(waiter);
                        self.unhome(key, &target);
                    }
                }
                Some(key) => {
                    self.home.remove(&target);
                    self.ready.extend(self.links[key].subs.reconcile(&target, false, waiter));
                }
                None if wanted => {
                    self.unplaced.remove(&target);
                    self.place(target, waiter.into_iter().collect());
                }
                None => {
                    self.unplaced.remove(&target);
                    self.ready.extend(waiter);
                }
            }
        }
    }

    /// Opens link `key`'s connection and sends what it should subscribe.
    fn connect(&mut self, key: usize) {
        let url = self.topology.url_of(&self.links[key].addr);
        let max_bulk = self.ctx.settings.max_message_bytes * 4 + HERALD_ENVELOPE;
        let opened = Conn::open(&url, self.ctx.settings.tls.as_ref(), READER_NAME, CONNECT_TIMEOUT, max_bulk).and_then(
            |mut conn| {
                self.poll
                    .registry()
                    .register(&mut conn.stream, Token(LINKS + key), Interest::READABLE | Interest::WRITABLE)
                    .map_err(Failure::Io)?;
                Ok(conn)
            },
        );
        let now = Instant::now();
        match opened {
            Ok(conn) => {
                let link = &mut self.links[key];
                link.phase = Phase::Up { conn, ready: false, last_heard: now, probe_sent: Some(now) };
                self.send(key);
                let link = &mut self.links[key];
                if let Phase::Up { conn, .. } = &mut link.phase {
                    // Answered after every confirmation of the above: then the node is ready.
                    resp::encode_command(conn.commands(), [b"PING"]);
                    link.sent.push_back(Sent::Ping);
                }
            }
            Err(failure) => {
                let link = &mut self.links[key];
                link.phase = Phase::Down { retry_at: now + link.backoff.next_delay() };
                if !link.warned {
                    warn!(node = %link.addr, error = %failure, "redis reader cannot reach a cluster node; retrying");
                    link.warned = true;
                }
                self.ctx.metrics.redis.set_error(failure.kind());
                self.ask_map();
            }
        }
    }

    fn connect_due(&mut self) {
        let now = Instant::now();
        let due: Vec<usize> = self
            .links
            .iter()
            .filter(|(_, link)| matches!(link.phase, Phase::Down { retry_at } if retry_at <= now))
            .map(|(key, _)| key)
            .collect();
        for key in due {
            self.connect(key);
        }
    }

    fn ask_map(&mut self) {
        self.topology.refresh();
        self.asked_map = Instant::now();
    }

    /// Link `key`'s connection is gone: its subscriptions went with it. They are made again
    /// on the next connection, or on the node the next slot map names; whoever waited for
    /// one proceeds now.
    fn lost(&mut self, key: usize, failure: Failure) {
        let Some(link) = self.links.get_mut(key) else { return };
        let retry_at = Instant::now() + link.backoff.next_delay();
        if let Phase::Up { mut conn, .. } = std::mem::replace(&mut link.phase, Phase::Down { retry_at }) {
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
        link.sent.clear();
        for target in link.subs.wanted() {
            self.ctx.routing.table.set_subscribed(target, false);
        }
        self.ready.extend(link.subs.connection_lost());
        if !link.warned {
            warn!(node = %link.addr, error = %failure, "redis reader lost a cluster node; subscribing again");
            link.warned = true;
        }
        self.ctx.metrics.redis.set_error(failure.kind());
        self.ask_map();
    }

    /// Sends every link's queued commands.
    fn send_all(&mut self) {
        let keys: Vec<usize> = self.links.iter().filter(|(_, l)| l.is_up()).map(|(k, _)| k).collect();
        for key in keys {
            self.send(key);
            let Phase::Up { conn, .. } = &mut self.links[key].phase else { continue };
            if let Err(e) = conn.flush() {
                self.lost(key, Failure::Io(e));
            }
        }
    }

    /// Encodes link `key`'s queued SSUBSCRIBE and SUNSUBSCRIBE commands, one channel each.
    fn send(&mut self, key: usize) {
        let settings = self.ctx.settings.clone();
        let map = self.map.clone();
        let link = &mut self.links[key];
        let Phase::Up { conn, .. } = &mut link.phase else { return };
        if !link.subs.has_queued() {
            return;
        }
        for (subscribe, targets) in link.subs.take_batches() {
            for target in targets {
                let channel = super::super::channel_of(&target, &settings.user_prefix, &settings.topic_prefix);
                if subscribe {
                    resp::encode_subscription(conn.commands(), SubKind::SSubscribe, [channel.as_bytes()]);
                    link.sent.push_back(Sent::Subscribe(target));
                } else if map.as_ref().is_some_and(|m| m.owner(slots::key_slot(channel.as_bytes())) != Some(&link.addr))
                {
                    // The slot is served elsewhere now: its subscriptions here went with it.
                    self.ready.extend(link.subs.confirmed(&target).ready);
                } else {
                    resp::encode_subscription(conn.commands(), SubKind::SUnsubscribe, [channel.as_bytes()]);
                    link.sent.push_back(Sent::Unsubscribe(target));
                }
            }
        }
    }

    /// Reads what link `key` has; `Err` when its connection must be dropped.
    fn read(&mut self, key: usize) -> Result<(), Failure> {
        {
            let Some(link) = self.links.get_mut(key) else { return Ok(()) };
            let Phase::Up { conn, .. } = &mut link.phase else { return Ok(()) };
            conn.fill()?;
        }
        loop {
            let Some(link) = self.links.get_mut(key) else { return Ok(()) };
            let Link { phase, addr, .. } = link;
            let Phase::Up { conn, last_heard, probe_sent, .. } = phase else { return Ok(()) };
            let (router, settings) = (&mut self.router, &self.ctx.settings);
            let heard = conn.next(|value| match resp::classify_push(&value) {
                Some(Push::SMessage { channel, payload } | Push::Message { channel, payload }) => {
                    router.route(channel, payload);
                    Heard::Message
                }
                Some(Push::PMessage { .. }) => Heard::Other,
                Some(Push::Subscription { kind, channel, .. }) => {
                    Heard::Subscription { kind, target: channel.and_then(|c| router.target_of(c, settings)) }
                }
                Some(Push::Pong { .. }) => Heard::Pong,
                None => match value.error() {
                    Some(ServerError::Moved { slot, host, port }) => {
                        let host = if host.is_empty() {
                            addr.host.clone()
                        } else {
                            String::from_utf8_lossy(host).into_owned()
                        };
                        Heard::Refused(Refusal::Moved { slot, addr: NodeAddr { host, port } })
                    }
                    Some(error) => Heard::Refused(Refusal::Other(Failure::from_reply(error))),
                    None => Heard::Other,
                },
            })?;
            let Some(heard) = heard else { return Ok(()) };
            *last_heard = Instant::now();
            *probe_sent = None;
            self.heard(key, heard)?;
        }
    }

    fn heard(&mut self, key: usize, heard: Heard) -> Result<(), Failure> {
        let link = &mut self.links[key];
        match heard {
            Heard::Message | Heard::Other => {}
            Heard::Subscription { kind: SubKind::SSubscribe, target: Some(target) } => {
                match link.sent.pop_front() {
                    Some(Sent::Subscribe(sent)) if sent == target => {}
                    other => return Err(out_of_order("ssubscribe", other)),
                }
                let settled = link.subs.confirmed(&target);
                if settled.active == Some(true) {
                    self.ctx.routing.table.set_subscribed(&target, true);
                }
                self.ready.extend(settled.ready);
            }
            Heard::Subscription { kind: SubKind::SUnsubscribe, target: Some(target) } => {
                if matches!(link.sent.front(), Some(Sent::Unsubscribe(sent)) if *sent == target) {
                    link.sent.pop_front();
                    self.ready.extend(link.subs.confirmed(&target).ready);
                } else {
                    // Pushed unasked: the slot left this node (resharding, failover). Asked
                    // again here, the node answers with a MOVED to the new owner.
                    self.ctx.routing.table.set_subscribed(&target, false);
                    link.subs.dropped(&target);
                    self.ask_map();
                }
            }
            Heard::Subscription { .. } => {}
            Heard::Pong => {
                match link.sent.pop_front() {
                    Some(Sent::Ping) => {}
                    other => return Err(out_of_order("pong", other)),
                }
                if let Phase::Up { ready: ready @ false, .. } = &mut link.phase {
                    *ready = true;
                    link.backoff.reset();
                    link.warned = false;
                    let channels = link.subs.active();
                    if link.was_ready {
                        self.ctx.metrics.redis_reconnects.fetch_add(1, Relaxed);
                        info!(node = %link.addr, channels, "redis reader reconnected to a cluster node and subscribed again");
                    } else {
                        info!(node = %link.addr, "redis reader connected to a cluster node");
                    }
                    link.was_ready = true;
                }
            }
            Heard::Refused(refusal) => match link.sent.pop_front() {
                Some(Sent::Subscribe(target)) => self.refused(key, target, refusal)?,
                Some(Sent::Unsubscribe(target)) => {
                    // Not subscribed there, whatever the reason.
                    self.ready.extend(link.subs.confirmed(&target).ready);
                }
                Some(Sent::Ping) | None => {
                    return Err(match refusal {
                        Refusal::Other(failure) => failure,
                        Refusal::Moved { .. } => Failure::Protocol("a MOVED nobody asked for".into()),
                    });
                }
            },
        }
        Ok(())
    }

    /// The node refused to SSUBSCRIBE `target`.
    fn refused(&mut self, key: usize, target: Target, refusal: Refusal) -> Result<(), Failure> {
        match refusal {
            Refusal::Moved { slot, addr } if addr != self.links[key].addr => {
                if slot != slot_of(&target, &self.ctx.settings) {
                    return Err(Failure::Protocol("a MOVED for another slot than the channel's".into()));
                }
                let waiters = self.links[key].subs.forget(&target);
                self.table().set_subscribed(&target, false);
                if self.home.get(&target) == Some(&key) {
                    self.home.remove(&target);
                }
                // The map learns it at once, and every other channel of the slot moves with
                // it once the reader takes the map (after this read: a reshard's redirects
                // come by the thousand); a full refresh follows from the topology thread.
                self.topology.moved(slot, addr);
                self.redirected.push((target, waiters));
            }
            Refusal::Moved { .. } => {
                let failure = Failure::Protocol("a node redirected a channel to itself".into());
                return self.refused(key, target, Refusal::Other(failure));
            }
            Refusal::Other(failure) => {
                self.refusals += 1;
                if self.refusals_logged.elapsed() >= LOG_REFUSALS_EVERY {
                    warn!(node = %self.links[key].addr, error = %failure, refused = self.refusals,
                        "redis cluster refused shard subscriptions; retrying");
                    self.refusals_logged = Instant::now();
                    self.refusals = 0;
                }
                let waiters = self.links[key].subs.forget(&target);
                self.ready.extend(waiters);
                self.table().set_subscribed(&target, false);
                if self.home.get(&target) == Some(&key) {
                    self.home.remove(&target);
                }
                self.unplace(target);
                self.ask_map();
            }
        }
        Ok(())
    }

    /// PINGs idle links; drops links whose PING went unanswered.
    fn probe(&mut self) {
        let now = Instant::now();
        let mut dead = Vec::new();
        let mut down_with_channels = false;
        for (key, link) in self.links.iter_mut() {
            match &mut link.phase {
                Phase::Up { probe_sent: Some(at), .. } if now.duration_since(*at) >= PROBE_TIMEOUT => dead.push(key),
                Phase::Up { conn, probe_sent: probe @ None, last_heard, .. }
                    if now.duration_since(*last_heard) >= PROBE_AFTER =>
                {
                    resp::encode_command(conn.commands(), [b"PING"]);
                    link.sent.push_back(Sent::Ping);
                    *probe = Some(now);
                }
                Phase::Down { .. } if link.subs.wanted().next().is_some() => down_with_channels = true,
                _ => {}
            }
        }
        for key in dead {
            self.lost(key, Failure::Timeout);
        }
        if down_with_channels && self.asked_map.elapsed() >= ASK_MAP_EVERY {
            self.ask_map();
        }
    }

    /// Closes links to nodes that serve no slot any more once nothing is wanted there.
    fn prune(&mut self) {
        let Some(map) = &self.map else { return };
        let gone = self.links.remove_where(|link| !map.masters().contains(&link.addr) && !link.wants_any());
        for mut link in gone {
            if let Phase::Up { conn, .. } = &mut link.phase {
                let _ = self.poll.registry().deregister(&mut conn.stream);
            }
        }
    }

    /// Up while a slot map is known and every node holding wanted channels is connected.
    fn report(&self) {
        let mut up = self.map.is_some() && self.unplaced.is_empty();
        let mut active = 0;
        for (_, link) in &self.links {
            active += link.subs.active();
            if !link.is_ready() && link.wants_any() {
                up = false;
            }
        }
        let redis = &self.ctx.metrics.redis;
        redis.subscriptions.store(active as u64, Relaxed);
        redis.subscriber_up.store(up, Relaxed);
        if up {
            redis.ever_up.store(true, Relaxed);
        }
    }

    fn next_timeout(&self) -> Duration {
        let now = Instant::now();
        let mut wait = Duration::from_secs(1);
        let mut down_with_channels = false;
        for (_, link) in &self.links {
            let at = match &link.phase {
                Phase::Up { probe_sent: Some(at), .. } => *at + PROBE_TIMEOUT,
                Phase::Up { last_heard, .. } => *last_heard + PROBE_AFTER,
                Phase::Down { retry_at } => {
                    down_with_channels |= link.wants_any();
                    *retry_at
                }
            };
            wait = wait.min(at.saturating_duration_since(now));
        }
        if down_with_channels {
            wait = wait.min((self.asked_map + ASK_MAP_EVERY).saturating_duration_since(now));
        }
        if let Some(at) = self.retry_at {
            wait = wait.min(at.saturating_duration_since(now));
        }
        if !self.unsent_ready.is_empty() {
            wait = wait.min(RETRY_READY);
        }
        wait.max(Duration::from_millis(1))
    }

    /// Tells loops that connections may proceed; what a full inbox refuses is tried again.
    fn flush_ready(&mut self) {
        let mut ready = std::mem::take(&mut self.ready);
        ready.append(&mut self.unsent_ready);
        let loops = self.ctx.routing.loops();
        for waiter in ready {
            let Some(handle) = loops.get(waiter.loop_id) else { continue };
            if handle.send_waiting(LoopCmd::SubscriptionReady { conn: waiter.conn }, Duration::ZERO).is_err() {
                self.unsent_ready.push(waiter);
            }
        }
    }
}

fn out_of_order(what: &str, expected: Option<Sent>) -> Failure {
    Failure::Protocol(format!("a {what} reply where {expected:?} was expected"))
}
