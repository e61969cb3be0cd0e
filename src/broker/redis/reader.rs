//! The Redis reader: one thread, one connection, subscribed to herald's channels. Each pushed
//! message is decoded in place from the read buffer, validated, stamped and framed once, and
//! sent straight to the loops that hold its target (no thread in between). The reader
//! reconnects by itself with capped, jittered backoff and subscribes again; an idle
//! connection is probed with PING, so a wedged one is noticed within seconds.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use mio::{Events, Interest, Poll, Token};
use tracing::{info, warn};

use super::conn::{Conn, Failure};
use super::redis_url::RedisUrl;
use super::resp::{self, Push, SubKind};
use super::{Backoff, CONNECT_TIMEOUT, Context, LOOP_PATIENCE};
use crate::ids::Target;
use crate::message::{self, JsonScratch};
use crate::route;

const CONN: Token = Token(0);
/// A connection silent this long gets a PING…
const PROBE_AFTER: Duration = Duration::from_secs(5);
/// …and is given up on if nothing at all arrives this long after it.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes herald's own wrapping (a relay's envelope: session and sender ids) adds to a
/// message it built from bounded input.
const HERALD_ENVELOPE: usize = 4096;

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

/// Reader thread body: never returns while the process runs.
pub fn run(url: RedisUrl, ctx: Context) {
    let mut backoff = Backoff::new();
    let mut router = Router { ctx: ctx.clone(), scratch: JsonScratch::default(), ids: Interner::default() };
    let mut connected_before = false;
    loop {
        let failure = session(&url, &mut router, &mut connected_before, &mut backoff);
        ctx.metrics.redis.subscriber_up.store(false, Relaxed);
        ctx.metrics.redis.set_error(failure.kind());
        warn!(error = %failure, redis = %url.redacted(), "redis reader disconnected; retrying");
        backoff.wait();
    }
}

/// One connection's life; returns why it ended.
fn session(url: &RedisUrl, router: &mut Router, connected_before: &mut bool, backoff: &mut Backoff) -> Failure {
    let settings = &router.ctx.settings;
    let tls = settings.tls.as_ref();
    let mut conn = match Conn::open(url, tls, CONNECT_TIMEOUT, settings.max_message_bytes * 4 + HERALD_ENVELOPE) {
        Ok(conn) => conn,
        Err(failure) => return failure,
    };
    let patterns = [pattern_for(&settings.user_prefix), pattern_for(&settings.topic_prefix)];
    resp::encode_subscription(conn.commands(), SubKind::PSubscribe, patterns.iter().map(|p| p.as_bytes()));
    let mut poll = match Poll::new() {
        Ok(poll) => poll,
        Err(e) => return Failure::Io(e),
    };
    if let Err(e) = poll.registry().register(&mut conn.stream, CONN, Interest::READABLE | Interest::WRITABLE) {
        return Failure::Io(e);
    }
    let mut events = Events::with_capacity(16);
    let mut unconfirmed = patterns.len();
    let mut last_heard = Instant::now();
    let mut probe_sent: Option<Instant> = None;
    loop {
        if let Err(e) = conn.flush() {
            return Failure::Io(e);
        }
        let wait = match probe_sent {
            Some(at) => PROBE_TIMEOUT.saturating_sub(at.elapsed()),
            None => PROBE_AFTER.saturating_sub(last_heard.elapsed()),
        };
        if let Err(e) = poll.poll(&mut events, Some(wait)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Failure::Io(e);
            }
        }
        if let Err(e) = conn.fill() {
            return e.into();
        }
        loop {
            let outcome = conn.next(|value| match resp::classify_push(&value) {
                Some(Push::PMessage { channel, payload, .. } | Push::Message { channel, payload }) => {
                    router.route(channel, payload);
                    Heard::Message
                }
                Some(Push::Subscription { kind, .. }) if kind.is_subscribe() => Heard::Confirmed,
                Some(_) => Heard::Other,
                None => match value.error() {
                    Some(error) => Heard::Refused(Failure::from_reply(error)),
                    None => Heard::Other,
                },
            });
            match outcome {
                Ok(None) => break,
                Ok(Some(Heard::Refused(failure))) => return failure,
                Ok(Some(heard)) => {
                    last_heard = Instant::now();
                    probe_sent = None;
                    if matches!(heard, Heard::Confirmed) {
                        unconfirmed = unconfirmed.saturating_sub(1);
                        if unconfirmed == 0 {
                            subscribed(router, connected_before, backoff);
                        }
                    }
                }
                Err(e) => return e.into(),
            }
        }
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

/// What one value from Redis was.
enum Heard {
    Message,
    Confirmed,
    Other,
    Refused(Failure),
}

fn subscribed(router: &Router, connected_before: &mut bool, backoff: &mut Backoff) {
    router.ctx.metrics.redis.subscriber_up.store(true, Relaxed);
    router.ctx.metrics.redis.ever_up.store(true, Relaxed);
    if *connected_before {
        router.ctx.metrics.redis_reconnects.fetch_add(1, Relaxed);
        info!("redis reader reconnected and subscribed again");
    } else {
        info!("redis reader connected");
    }
    *connected_before = true;
    backoff.reset();
}

/// Turns what Redis pushes into deliveries.
struct Router {
    ctx: Context,
    scratch: JsonScratch,
    ids: Interner,
}

impl Router {
    /// Routes one message to the loops holding its target, or drops it as invalid.
    fn route(&mut self, channel: &[u8], payload: &[u8]) {
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
