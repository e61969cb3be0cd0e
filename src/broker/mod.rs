//! The broker seam: live publishing (and, behind the same type, subscriptions, fleet control
//! and history as they arrive). Event loops and the HTTP layer hand it validated
//! notifications and get back either "routed, this many receivers" or "pending, the answer
//! will come to your `ReplyTo`"; they never see a Redis command.
//!
//! * [`Broker::Embedded`]: the calling loop stamps and frames the message once and routes it
//!   through the route table itself: straight to each owning loop, inline for its own share.
//! * [`Broker::Redis`]: the message goes to Redis as published; every instance's reader
//!   stamps and frames what it receives, once, and routes it the same way.

pub mod redis;

use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

use crate::frame::SharedFrame;
use crate::history::ring::Rings;
use crate::history::{PAGE, Page, Since, StreamPos};
use crate::ids::{Answer, DeliverTo, Exclusion, HistoryItems, ReplyTo, Target};
use crate::mailbox::Loops;
use crate::message::{self, Valid};
use crate::metrics::Metrics;
use crate::presence;
use crate::route::{RouteTable, Sender};
use crate::webhook::Webhook;
use redis::fleet::{FleetHandle, FleetJob};

/// A validated notification on its way out.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub targets: Vec<Target>,
    /// The message as published: validated, trailing whitespace cut.
    pub message: Box<[u8]>,
    pub has_timestamp: bool,
    pub exclusion: Exclusion,
    /// Delivered live only, never stored (focus-session relays: chatter, not notifications).
    pub live_only: bool,
}

impl Outgoing {
    pub fn new(targets: Vec<Target>, valid: Valid<'_>, exclusion: Exclusion) -> Outgoing {
        Outgoing { targets, message: valid.raw.into(), has_timestamp: valid.has_timestamp, exclusion, live_only: false }
    }

    /// This notification is not kept in history.
    pub fn live_only(self) -> Outgoing {
        Outgoing { live_only: true, ..self }
    }
}

/// A loop's own way to its broker, beside the shared one: with Redis (unless a sharded
/// cluster must place each channel on its master), a pipelined publishing connection the loop
/// drives on its own poller (see `redis::PublishLink`). Empty with the embedded broker.
#[derive(Default)]
pub struct LoopLink(Option<redis::PublishLink>);

impl LoopLink {
    /// The token the link's socket is registered with on the loop's poller.
    pub const TOKEN: mio::Token = redis::publish_link::TOKEN;

    /// Once per pass of the loop, before it polls (see `PublishLink::drive`).
    pub fn drive(&mut self, registry: &mio::Registry, readable: bool, answers: &mut Vec<(ReplyTo, Answer)>) {
        if let Some(link) = &mut self.0 {
            link.drive(registry, readable, answers);
        }
    }

    /// Takes an answer meant for the link itself (`true`), not for a connection of the loop.
    pub fn take_answer(&mut self, conn: crate::ids::ConnRef) -> bool {
        self.0.as_mut().is_some_and(|link| link.take_fence(conn))
    }

    /// When the loop must look at its link even if nothing else happens.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.0.as_ref().and_then(|link| link.next_deadline())
    }
}

/// What the routing parts of herald share: the route table and every loop's mailbox.
#[derive(Default)]
pub struct Routing {
    pub table: RouteTable,
    loops: OnceLock<Loops>,
}

impl Routing {
    /// Attaches the loops once they exist.
    pub fn attach(&self, loops: Loops) {
        let _ = self.loops.set(loops);
    }

    pub fn loops(&self) -> &[crate::mailbox::LoopHandle] {
        self.loops.get().map_or(&[], |l| l)
    }
}

/// A delivery the calling loop performs itself: its own share of a message.
#[derive(Debug)]
pub struct Local {
    pub to: DeliverTo,
    pub frame: SharedFrame,
    pub exclusion: Exclusion,
}

/// The outcome of a publish.
#[derive(Debug)]
pub enum Published {
    /// Routed now. Per item, the receivers reached (loops holding a target); `local` is the
    /// calling loop's own share, to deliver before it does anything else.
    Routed { receivers: Box<[u64]>, local: Vec<Local> },
    /// Handed to Redis: the answer goes to the `ReplyTo` given.
    Pending,
    /// It could not be published (reason for the client).
    Failed(String),
}

pub enum Broker {
    /// One instance: routing, history, presence transitions and webhook posts all happen here.
    Embedded {
        webhook: Option<Arc<Webhook>>,
        history: Option<Rings>,
    },
    Redis(redis::RedisBroker),
}

impl Broker {
    /// Loop `loop_id`'s own link to this broker.
    pub fn loop_link(&self, loop_id: usize) -> LoopLink {
        match self {
            Broker::Redis(redis) => LoopLink(redis.publish_link(loop_id)),
            Broker::Embedded { .. } => LoopLink::default(),
        }
    }

    pub fn is_redis(&self) -> bool {
        matches!(self, Broker::Redis(_))
    }

    /// Where loops report instance-wide joins and leaves, when subscriptions follow them
    /// (Redis in exact mode).
    pub fn subscription_reports(&self) -> Option<&redis::subscriptions::Reports> {
        match self {
            Broker::Redis(redis) => redis.subscription_reports(),
            Broker::Embedded { .. } => None,
        }
    }

    /// Whether notifications are stored (HERALD_HISTORY_SIZE > 0).
    pub fn history_enabled(&self) -> bool {
        match self {
            Broker::Embedded { history, .. } => history.is_some(),
            Broker::Redis(redis) => redis.history_enabled(),
        }
    }

    /// A page of `target`'s stream after `since`: at once from the embedded store, or later
    /// (`LoopCmd::ReplayPage` to `reply`) from Redis.
    pub fn history_page(&self, target: &Target, since: Since, reply: ReplyTo) -> Option<Page> {
        match self {
            Broker::Embedded { history: Some(rings), .. } => Some(rings.page(target, since, PAGE)),
            Broker::Embedded { history: None, .. } => Some(Page { complete: false, ..Page::default() }),
            Broker::Redis(redis) => {
                let job = FleetJob::History { target: target.clone(), since, reply };
                redis.fleet().try_send(job).err().map(|_| Page { complete: false, ..Page::default() })
            }
        }
    }

    /// The history API's answer, when this instance has the store (embedded); `None` with
    /// Redis, which answers through the fleet thread.
    pub fn history_now(&self, user: &Target, since: Since, limit: usize) -> Option<HistoryItems> {
        let Broker::Embedded { history: Some(rings), .. } = self else { return None };
        let page = rings.page(user, since, limit);
        Some(HistoryItems {
            acked: rings.acked(user),
            items: crate::history::items_json(&page.entries),
            complete: page.complete,
        })
    }

    /// A client acknowledged `pos` of its user's stream: the read marker moves forward.
    pub fn ack(&self, user: &Target, pos: StreamPos, metrics: &Metrics) {
        use std::sync::atomic::Ordering::Relaxed;
        match self {
            Broker::Embedded { history: Some(rings), .. } => {
                let counter = if rings.ack(user, pos) { &metrics.history.acks } else { &metrics.history.acks_ignored };
                counter.fetch_add(1, Relaxed);
            }
            Broker::Embedded { history: None, .. } => {}
            Broker::Redis(redis) => {
                let _ = redis.fleet().try_send(FleetJob::Ack { user: user.clone(), pos });
            }
        }
    }

    /// The fleet thread (Redis): fleet-wide disconnects and presence.
    pub fn fleet(&self) -> Option<&FleetHandle> {
        match self {
            Broker::Redis(redis) => Some(redis.fleet()),
            Broker::Embedded { .. } => None,
        }
    }

    /// `user` now has `connections` on this instance, one more (`opened`) or one less. With
    /// Redis the fleet thread writes the count, and Redis decides fleet-wide transitions;
    /// embedded, this instance is the fleet, and the count decides.
    pub fn presence_changed(&self, user: &str, connections: u32, opened: bool, metrics: &Metrics) {
        match self {
            Broker::Redis(redis) => {
                let _ = redis.fleet().try_send(FleetJob::Presence(user.into()));
            }
            Broker::Embedded { webhook, .. } => {
                let Some(status) = presence::Status::of_change(opened, connections) else { return };
                metrics.presence_events.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(webhook) = webhook {
                    webhook.post(presence::event_json(user, status, connections.into(), SystemTime::now()));
                }
            }
        }
    }

    /// Publishes `items`. `from` is the calling loop (its share comes back as `Local`);
    /// `reply`, when set, is where a pending answer goes.
    pub fn publish(
        &self,
        routing: &Routing,
        metrics: &Metrics,
        items: Vec<Outgoing>,
        from: Sender,
        reply: Option<ReplyTo>,
        link: &mut LoopLink,
    ) -> Published {
        match self {
            Broker::Embedded { history: Some(rings), .. } if items.iter().all(|i| !i.live_only) => {
                Published::Routed { receivers: publish_in_order(rings, routing, metrics, items), local: Vec::new() }
            }
            Broker::Embedded { .. } => {
                let now = (SystemTime::now(), Instant::now());
                let mut receivers = Vec::with_capacity(items.len());
                let mut local = Vec::new();
                for item in items {
                    let frame = message::frame_valid(
                        Valid { raw: &item.message, has_timestamp: item.has_timestamp },
                        now.0,
                        now.1,
                    );
                    let out = routing.table.dispatch(routing.loops(), from, &item.targets, &frame, &item.exclusion);
                    metrics.count_overload(out.dropped);
                    receivers.push(u64::from(out.reached.count_ones()));
                    if let Some(to) = out.local {
                        local.push(Local { to, frame, exclusion: item.exclusion });
                    }
                }
                Published::Routed { receivers: receivers.into(), local }
            }
            Broker::Redis(redis) => match redis.publish(items, reply, link.0.as_mut()) {
                Ok(()) => Published::Pending,
                Err(why) => Published::Failed(why),
            },
        }
    }
}

/// Embedded with history: each target's notification is stored in its stream and routed
/// under the stream's lock, every share (the caller's too) through the loops' inboxes, so
/// every connection sees each stream in offset order. A notification to several targets has
/// one stream position, and so one frame, per target.
fn publish_in_order(rings: &Rings, routing: &Routing, metrics: &Metrics, items: Vec<Outgoing>) -> Box<[u64]> {
    let now = (SystemTime::now(), Instant::now());
    let mut receivers = Vec::with_capacity(items.len());
    for item in items {
        let valid = Valid { raw: &item.message, has_timestamp: item.has_timestamp };
        let mut reached = 0;
        for target in &item.targets {
            let out = rings.append(
                target,
                |pos| message::frame_in_stream(valid, now.0, now.1, pos),
                |frame| {
                    routing.table.dispatch(
                        routing.loops(),
                        Sender::InOrder,
                        std::slice::from_ref(target),
                        frame,
                        &item.exclusion,
                    )
                },
            );
            metrics.count_overload(out.dropped);
            reached |= out.reached;
        }
        receivers.push(u64::from(reached.count_ones()));
    }
    receivers.into()
}

/// The channel a target's notifications travel on in Redis.
pub fn channel_of(target: &Target, user_prefix: &str, topic_prefix: &str) -> String {
    let prefix = if target.is_user() { user_prefix } else { topic_prefix };
    format!("{prefix}{}", target.name())
}

/// The target a Redis channel stands for, if it has one of herald's prefixes.
pub fn target_of<'a>(channel: &'a str, user_prefix: &str, topic_prefix: &str) -> Option<(bool, &'a str)> {
    if let Some(user) = channel.strip_prefix(user_prefix) {
        Some((true, user))
    } else {
        channel.strip_prefix(topic_prefix).map(|topic| (false, topic))
    }
}

/// Shared handle type for the parts Redis threads need.
pub type SharedRouting = Arc<Routing>;
