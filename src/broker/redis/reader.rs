//! The Redis reader: one thread, one connection, subscribed to herald's channels. Each pushed
//! message is decoded in place from the read buffer, validated, stamped and framed once, and
//! sent straight to the loops that hold its target (no thread in between).
//!
//! In exact mode (the default) the reader is subscribed to a channel exactly while this
//! instance holds a connection receiving it: the loops report instance-wide joins and leaves,
//! the reader batches them into SUBSCRIBE/UNSUBSCRIBE commands ([`Subscriptions`]) and tells
//! a waiting connection when its channel is confirmed. In pattern mode it PSUBSCRIBEs each
//! prefix and receives everything.
//!
//! The reader reconnects by itself with capped, jittered backoff and subscribes again; an
//! idle connection is probed with PING, so a wedged one is noticed within seconds. While
//! Redis is unreachable nobody waits for it: a connection's upgrade completes at once, and
//! its subscription is made when Redis is back.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Receiver;
use mio::{Events, Interest, Poll, Token};
use tracing::{info, warn};

use super::conn::{Conn, Failure};
use super::redis_url::RedisUrl;
use super::resp::{self, Push, SubKind};
use super::stream;
use super::subscriptions::{Change, Reports, Subscriptions};
use super::{Backoff, Context, LOOP_PATIENCE};
use crate::ids::{ReplyTo, Target};
use crate::mailbox::LoopCmd;
use crate::message::{self, JsonScratch};
use crate::route;

const CONN: Token = Token(0);
/// The reader's name in CLIENT LIST.
pub const READER_NAME: &str = "herald-reader";
/// The loops' reports wake the reader with this token.
pub const WAKER: Token = Token(1);
/// A connection silent this long gets a PING…
pub(super) const PROBE_AFTER: Duration = Duration::from_secs(5);
/// …and is given up on if nothing at all arrives this long after it.
pub(super) const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How soon to try again to tell a loop whose inbox was full that a subscription is ready.
pub(super) const RETRY_READY: Duration = Duration::from_millis(10);
/// Most bytes herald's own wrapping (a relay's envelope: session and sender ids) adds to a
/// message it built from bounded input.
pub(super) const HERALD_ENVELOPE: usize = 4096;

/// A PSUBSCRIBE pattern matching every channel that starts with `prefix`.
pub fn pattern_for(prefix: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('*');
    pattern
}

/// How the reader subscribes.
pub enum Mode {
    /// One PSUBSCRIBE per prefix.
    Pattern,
    /// A channel per target held, as the loops report on `changes`.
    Exact { changes: Receiver<Change>, reports: Arc<Reports> },
}

/// Reader thread body: never returns while the process runs. Each connection goes to the
/// first of `urls` that answers (one URL for a standalone Redis; a cluster's seeds in
/// classic pub/sub, where any node hears every channel).
pub fn run(urls: Vec<RedisUrl>, ctx: Context, poll: Poll, mode: Mode) {
    let mut reader = Reader {
        router: Router::new(ctx.clone()),
        ctx,
        poll,
        mode,
        subscriptions: Subscriptions::default(),
        connected: false,
        unsent_ready: Vec::new(),
        connected_before: false,
        backoff: Backoff::new(),
    };
    loop {
        let (failure, url) = reader.session(&urls);
        reader.disconnected();
        reader.ctx.metrics.redis.set_error(failure.kind());
        warn!(error = %failure, redis = %url.redacted(), "redis reader disconnected; retrying");
        let delay = reader.backoff.next_delay();
        reader.idle(delay);
    }
}

struct Reader {
    ctx: Context,
    router: Router,
    poll: Poll,
    mode: Mode,
    subscriptions: Subscriptions,
    /// A connection to Redis is open: a waiting connection may wait for its confirmation.
    connected: bool,
    /// Confirmations a full loop inbox did not take yet.
    unsent_ready: Vec<ReplyTo>,
    connected_before: bool,
    backoff: Backoff,
}

/// What one value from Redis was.
enum Heard {
    Message,
    /// A (un)subscribe confirmation of a channel (exact mode) or a pattern.
    Subscription {
        kind: SubKind,
        target: Option<Target>,
    },
    Pong,
    Other,
    Refused(Failure),
}

impl Reader {
    /// One connection's life; returns why it ended, and where it was (or was last tried).
    fn session<'u>(&mut self, urls: &'u [RedisUrl]) -> (Failure, &'u RedisUrl) {
        let max_bulk = self.ctx.settings.max_message_bytes * 4 + HERALD_ENVELOPE;
        let (mut conn, url) = match super::open_first(urls, self.ctx.settings.tls.as_ref(), READER_NAME, max_bulk) {
            Ok(opened) => opened,
            Err(failed) => return failed,
        };
        if let Err(e) = self.poll.registry().register(&mut conn.stream, CONN, Interest::READABLE | Interest::WRITABLE) {
            return (Failure::Io(e), url);
        }
        self.connected = true;
        let failure = self.converse(&mut conn);
        let _ = self.poll.registry().deregister(&mut conn.stream);
        (failure, url)
    }

    fn converse(&mut self, conn: &mut Conn) -> Failure {
        match &self.mode {
            Mode::Pattern => {
                let settings = &self.ctx.settings;
                let patterns = [pattern_for(&settings.user_prefix), pattern_for(&settings.topic_prefix)];
                resp::encode_subscription(conn.commands(), SubKind::PSubscribe, patterns.iter().map(|p| p.as_bytes()));
            }
            Mode::Exact { .. } => {
                self.take_changes();
                self.send_subscriptions(conn);
            }
        }
        // Redis answers in order: the PONG comes after every confirmation of the above.
        resp::encode_command(conn.commands(), [b"PING"]);
        let mut starting = true;
        let mut events = Events::with_capacity(16);
        let mut last_heard = Instant::now();
        let mut probe_sent: Option<Instant> = None;
        loop {
            if let Err(e) = conn.flush() {
                return Failure::Io(e);
            }
            let mut wait = match probe_sent {
                Some(at) => PROBE_TIMEOUT.saturating_sub(at.elapsed()),
                None => PROBE_AFTER.saturating_sub(last_heard.elapsed()),
            };
            if !self.unsent_ready.is_empty() {
                wait = wait.min(RETRY_READY);
            }
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Failure::Io(e);
                }
            }
            if let Err(e) = conn.fill() {
                return e.into();
            }
            loop {
                let (router, prefixes) = (&mut self.router, &self.ctx.settings);
                let outcome = conn.next(|value| match resp::classify_push(&value) {
                    Some(
                        Push::PMessage { channel, payload, .. }
                        | Push::Message { channel, payload }
                        | Push::SMessage { channel, payload },
                    ) => {
                        router.route(channel, payload);
                        Heard::Message
                    }
                    Some(Push::Subscription { kind, channel, .. }) => {
                        let target = channel.and_then(|c| router.target_of(c, prefixes));
                        Heard::Subscription { kind, target }
                    }
                    Some(Push::Pong { .. }) => Heard::Pong,
                    None => match value.error() {
                        Some(error) => Heard::Refused(Failure::from_reply(error)),
                        None => Heard::Other,
                    },
                });
                let heard = match outcome {
                    Ok(None) => break,
                    Ok(Some(Heard::Refused(failure))) => return failure,
                    Ok(Some(heard)) => heard,
                    Err(e) => return e.into(),
                };
                last_heard = Instant::now();
                probe_sent = None;
                match heard {
                    Heard::Subscription { kind, target: Some(target) }
                        if !matches!(kind, SubKind::PSubscribe | SubKind::PUnsubscribe) =>
                    {
                        self.confirmed(&target, kind)
                    }
                    Heard::Subscription { kind: SubKind::PSubscribe, .. } => {
                        self.ctx.metrics.redis.subscriptions.fetch_add(1, Relaxed);
                    }
                    Heard::Pong if starting => {
                        starting = false;
                        self.subscribed();
                    }
                    _ => {}
                }
            }
            self.take_changes();
            self.send_subscriptions(conn);
            self.send_ready(Vec::new());
            match probe_sent {
                Some(at) if at.elapsed() >= PROBE_TIMEOUT => return Failure::Timeout,
                None if last_heard.elapsed() >= PROBE_AFTER => {
                    resp::encode_command(conn.commands(), [b"PING"]);
                    probe_sent = Some(Instant::now());
                }
                _ => {}
            }
        }
    }

    /// Takes the loops' reports and brings each target's subscription in line with the route
    /// table (the truth: reports only say where to look).
    fn take_changes(&mut self) {
        let Mode::Exact { changes, reports } = &self.mode else { return };
        reports.clear_wake();
        let table = &self.ctx.routing.table;
        let mut ready = Vec::new();
        while let Ok(change) = changes.try_recv() {
            let (target, waiter) = match change {
                Change::Changed(target) => (target, None),
                Change::Wait(target, waiter) => (target, Some(waiter)),
            };
            let wanted = !table.release_if_unheld(&target);
            match waiter {
                // Nobody waits for a Redis that is not there.
                Some(waiter) if !self.connected => {
                    ready.push(waiter);
                    ready.extend(self.subscriptions.reconcile(&target, wanted, None));
                }
                waiter => ready.extend(self.subscriptions.reconcile(&target, wanted, waiter)),
            }
        }
        self.send_ready(ready);
    }

    /// Sends the queued SUBSCRIBE and UNSUBSCRIBE commands.
    fn send_subscriptions(&mut self, conn: &mut Conn) {
        if !self.subscriptions.has_queued() {
            return;
        }
        let settings = &self.ctx.settings;
        for (subscribe, targets) in self.subscriptions.take_batches() {
            let kind = if subscribe { SubKind::Subscribe } else { SubKind::Unsubscribe };
            let channels: Vec<String> = targets
                .iter()
                .map(|t| super::super::channel_of(t, &settings.user_prefix, &settings.topic_prefix))
                .collect();
            resp::encode_subscription(conn.commands(), kind, channels.iter().map(|c| c.as_bytes()));
        }
        self.publish_count();
    }

    /// Redis confirmed a SUBSCRIBE or UNSUBSCRIBE of `target`.
    fn confirmed(&mut self, target: &Target, kind: SubKind) {
        if kind == SubKind::SUnsubscribe && !self.subscriptions.is_settling(target) {
            // Pushed unasked: the channel's slot left the node.
            self.ctx.routing.table.set_subscribed(target, false);
            self.subscriptions.dropped(target);
            self.publish_count();
            return;
        }
        let settled = self.subscriptions.confirmed(target);
        if settled.active == Some(true) {
            self.ctx.routing.table.set_subscribed(target, true);
        }
        self.publish_count();
        self.send_ready(settled.ready);
    }

    fn publish_count(&self) {
        if let Mode::Exact { .. } = self.mode {
            self.ctx.metrics.redis.subscriptions.store(self.subscriptions.active() as u64, Relaxed);
        }
    }

    /// Tells loops that connections may proceed; what a full inbox refuses is tried again.
    fn send_ready(&mut self, mut ready: Vec<ReplyTo>) {
        ready.append(&mut self.unsent_ready);
        let loops = self.ctx.routing.loops();
        for waiter in ready {
            let Some(handle) = loops.get(waiter.loop_id) else { continue };
            let cmd = LoopCmd::SubscriptionReady { conn: waiter.conn };
            if handle.send_waiting(cmd, Duration::ZERO).is_err() {
                self.unsent_ready.push(waiter);
            }
        }
    }

    fn subscribed(&mut self) {
        let redis = &self.ctx.metrics.redis;
        redis.subscriber_up.store(true, Relaxed);
        redis.ever_up.store(true, Relaxed);
        if self.connected_before {
            self.ctx.metrics.redis_reconnects.fetch_add(1, Relaxed);
            info!(channels = self.subscriptions.active(), "redis reader reconnected and subscribed again");
        } else {
            info!("redis reader connected");
        }
        self.connected_before = true;
        self.backoff.reset();
    }

    /// The connection is gone: every subscription is to be made again on the next one, and
    /// whoever waited for one proceeds now.
    fn disconnected(&mut self) {
        self.connected = false;
        let metrics = &self.ctx.metrics;
        metrics.redis.subscriber_up.store(false, Relaxed);
        metrics.redis.subscriptions.store(0, Relaxed);
        for target in self.subscriptions.wanted() {
            self.ctx.routing.table.set_subscribed(target, false);
        }
        let waiters = self.subscriptions.connection_lost();
        self.send_ready(waiters);
    }

    /// Waits `delay` before the next attempt, answering the loops' reports meanwhile.
    fn idle(&mut self, delay: Duration) {
        let until = Instant::now() + delay;
        let mut events = Events::with_capacity(4);
        loop {
            self.take_changes();
            self.send_ready(Vec::new());
            let mut left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            if !self.unsent_ready.is_empty() {
                left = left.min(RETRY_READY);
            }
            let _ = self.poll.poll(&mut events, Some(left));
        }
    }
}

/// Turns what Redis pushes into deliveries.
pub(super) struct Router {
    ctx: Context,
    scratch: JsonScratch,
    ids: Interner,
}

impl Router {
    pub(super) fn new(ctx: Context) -> Router {
        Router { ctx, scratch: JsonScratch::default(), ids: Interner::default() }
    }

    /// The target a channel stands for, if it has one of herald's prefixes.
    pub(super) fn target_of(&mut self, channel: &[u8], settings: &super::Settings) -> Option<Target> {
        let channel = std::str::from_utf8(channel).ok()?;
        let (is_user, name) = super::super::target_of(channel, &settings.user_prefix, &settings.topic_prefix)?;
        Some(self.ids.intern(is_user, name))
    }

    /// Routes one message to the loops holding its target, or drops it as invalid.
    pub(super) fn route(&mut self, channel: &[u8], payload: &[u8]) {
        let (settings, metrics) = (&self.ctx.settings, &self.ctx.metrics);
        metrics.received_from_redis.fetch_add(1, Relaxed);
        let Ok(channel) = std::str::from_utf8(channel) else { return };
        let target = match super::super::target_of(channel, &settings.user_prefix, &settings.topic_prefix) {
            Some((is_user, name)) => self.ids.intern(is_user, name),
            None => return,
        };
        // The size limit applies to what the publisher wrote; an exclusion herald itself
        // embedded is metadata, stripped here before validation. A message that carried one was
        // built by herald (a relay, a seed-004 event) from input it had already bounded, and its
        // envelope is herald's own addition: that must never be what makes it too large.
        if let Some((stored, json)) = stream::open_envelope(payload) {
            return self.route_stored(target, stored, json);
        }
        let stripped = message::strip_exclusion(payload);
        let (payload, exclusion, limit) = match &stripped {
            Some((bytes, exclusion)) => {
                (bytes.as_slice(), exclusion.clone(), settings.max_message_bytes + HERALD_ENVELOPE)
            }
            None => (payload, Default::default(), settings.max_message_bytes),
        };
        let frame =
            match message::encode_notification(payload, limit, &mut self.scratch, SystemTime::now(), Instant::now()) {
                Ok(frame) => frame,
                Err(why) => {
                    metrics.dropped_invalid.fetch_add(1, Relaxed);
                    warn!(channel, reason = why.describe(), bytes = payload.len(), "dropped a published message");
                    return;
                }
            };
        let from = route::Sender::Thread { patience: LOOP_PATIENCE };
        let out = self.ctx.routing.table.dispatch(self.ctx.routing.loops(), from, &[target], &frame, &exclusion);
        metrics.count_overload(out.dropped);
    }
}

impl Router {
    /// A notification `herald_publish` stored: framed with its position and stored time, the
    /// same bytes a replay of it gives.
    fn route_stored(&mut self, target: Target, stored: stream::Stored, json: &[u8]) {
        let (settings, metrics) = (&self.ctx.settings, &self.ctx.metrics);
        let stripped = message::strip_exclusion(json);
        let (json, exclusion, limit) = match &stripped {
            Some((bytes, exclusion)) => {
                (bytes.as_slice(), exclusion.clone(), settings.max_message_bytes + HERALD_ENVELOPE)
            }
            None => (json, Default::default(), settings.max_message_bytes),
        };
        let frame = match message::validate_notification(json, limit, &mut self.scratch) {
            Ok(valid) => message::frame_in_stream(valid, stored.at, Instant::now(), stored.pos),
            Err(why) => {
                metrics.dropped_invalid.fetch_add(1, Relaxed);
                warn!(reason = why.describe(), bytes = json.len(), "dropped a stored message");
                return;
            }
        };
        let from = route::Sender::Thread { patience: LOOP_PATIENCE };
        let out = self.ctx.routing.table.dispatch(self.ctx.routing.loops(), from, &[target], &frame, &exclusion);
        metrics.count_overload(out.dropped);
    }
}

/// Reuses one `Target` per user and topic, so a busy user's messages allocate no id.
#[derive(Default)]
struct Interner {
    targets: HashSet<Target>,
    key: String,
}

impl Interner {
    const MAX: usize = 100_000;

    fn intern(&mut self, is_user: bool, name: &str) -> Target {
        Target::key_of(is_user, name, &mut self.key);
        if let Some(existing) = self.targets.get(self.key.as_str()) {
            return existing.clone();
        }
        if self.targets.len() >= Self::MAX {
            self.targets.clear();
        }
        let target = if is_user { Target::user(name) } else { Target::topic(name) };
        self.targets.insert(target.clone());
        target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_escape_glob_characters() {
        assert_eq!(pattern_for("user_noti:"), "user_noti:*");
        assert_eq!(pattern_for("a*b?[c]"), "a\\*b\\?\\[c\\]*");
    }

    #[test]
    fn interner_reuses_targets() {
        let mut ids = Interner::default();
        let a = ids.intern(true, "u1");
        assert_eq!(a, ids.intern(true, "u1"));
        assert_eq!(ids.targets.len(), 1);
        assert_ne!(a, ids.intern(false, "u1"));
    }
}
