//! Redis: the subscriber that routes what Redis sends, and the publisher HTTP publishes go
//! through.
//!
//! Both threads reconnect by themselves with capped exponential backoff; the subscriber
//! re-issues its PSUBSCRIBEs on every connection, so delivery resumes without anyone's help.
//! Pub/sub has no replay: what was published while herald was disconnected is gone.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tracing::{info, warn};

use super::{Outgoing, Routing};
use crate::ids::{Answer, ReplyTo, Target};
use crate::mailbox::LoopCmd;
use crate::message::{self, JsonScratch};
use crate::metrics::Metrics;
use crate::route;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(3);
const PING_EVERY: Duration = Duration::from_secs(1);
/// How long the reader waits for room in a loop's inbox before that loop misses a message:
/// meanwhile a burst backs up into Redis (which bounds it with client-output-buffer-limit)
/// instead of into herald's memory.
const LOOP_PATIENCE: Duration = Duration::from_millis(500);
/// Most bytes herald's own wrapping (a relay's envelope: session and sender ids) adds to a
/// message it built from bounded input.
const HERALD_ENVELOPE: usize = 2048;

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

    fn wait(&mut self) {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let jitter = self.next.mul_f64(0.25 * (nanos % 1000) as f64 / 1000.0);
        std::thread::sleep(self.next + jitter);
        self.next = (self.next * 2).min(BACKOFF_CAP);
    }
}

/// A PSUBSCRIBE pattern matching every channel that starts with `prefix`.
fn pattern_for(prefix: &str) -> String {
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

/// Where a Redis URL keeps its password, as a byte range of `url` (still percent-encoded):
/// `user:password@` in the authority of redis:// and rediss:// URLs, the `pass` query
/// parameter of unix:// ones. `None` when there is no password field at all; an empty
/// range for `redis://:@host`.
fn password_span(url: &str) -> Option<std::ops::Range<usize>> {
    let (scheme, _) = url.split_once("://")?;
    let start = scheme.len() + 3;
    if scheme.ends_with("unix") {
        let query = url.find('?')? + 1;
        let query_end = url[query..].find('#').map_or(url.len(), |i| query + i);
        let mut at = query;
        for pair in url[query..query_end].split('&') {
            if let Some(value) = pair.strip_prefix("pass=") {
                return Some(at + 5..at + 5 + value.len());
            }
            at += pair.len() + 1;
        }
        return None;
    }
    let authority_end = url[start..].find(['/', '?', '#']).map_or(url.len(), |i| start + i);
    let userinfo_end = url[start..authority_end].rfind('@')?;
    let colon = url[start..start + userinfo_end].find(':')?;
    Some(start + colon + 1..start + userinfo_end)
}

/// Whether `url` carries a (non-empty) password.
pub fn url_has_password(url: &str) -> bool {
    password_span(url).is_some_and(|span| !span.is_empty())
}

/// `url` with its password, if any, replaced by `<redacted>`: fit for a log line.
pub fn redact_url(url: &str) -> String {
    match password_span(url) {
        Some(span) if !span.is_empty() => format!("{}<redacted>{}", &url[..span.start], &url[span.end..]),
        _ => url.to_string(),
    }
}

/// Puts `password` (from HERALD_REDIS_PASSWORD_FILE) into `url`, percent-encoded, where the
/// redis crate reads it: the authority, or `pass=` for a unix socket. A URL that already has
/// a password field is an error: two sources for one secret is a mistake waiting to happen.
pub fn url_with_password(url: &str, password: &str) -> Result<String, String> {
    if password_span(url).is_some() {
        return Err("HERALD_REDIS_URL already contains a password; give it in one place only".into());
    }
    let encoded: String = password
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let Some((scheme, _)) = url.split_once("://") else { return Err("HERALD_REDIS_URL is not a URL".into()) };
    let start = scheme.len() + 3;
    if scheme.ends_with("unix") {
        let (head, fragment) = url.split_at(url.find('#').unwrap_or(url.len()));
        let separator = match head.find('?') {
            None => "?",
            Some(_) if head.ends_with(['?', '&']) => "",
            Some(_) => "&",
        };
        return Ok(format!("{head}{separator}pass={encoded}{fragment}"));
    }
    let authority_end = url[start..].find(['/', '?', '#']).map_or(url.len(), |i| start + i);
    Ok(match url[start..authority_end].rfind('@') {
        // `user@host`: the password follows the user name.
        Some(at) => format!("{}:{encoded}{}", &url[..start + at], &url[start + at..]),
        None => format!("{}:{encoded}@{}", &url[..start], &url[start..]),
    })
}

/// What kind of failure a Redis error is, for /health: unauthenticated callers learn that
/// Redis is unreachable or refusing herald, never the server's own words (which can name
/// users, hosts or ACL rules). The full error goes to the log.
pub fn failure_kind(error: &redis::RedisError) -> &'static str {
    use redis::{ErrorKind, ServerErrorKind};
    if error.is_connection_refusal() {
        "connection refused"
    } else if error.is_timeout() {
        "timeout"
    } else if error.kind() == ErrorKind::AuthenticationFailed
        || matches!(error.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
        || error.kind() == ErrorKind::Server(ServerErrorKind::NoPerm)
    {
        "authentication failed"
    } else if error.is_io_error() || error.is_connection_dropped() {
        "io error"
    } else {
        "protocol error"
    }
}

/// Validates the URL before any thread starts, so a typo is a start-up error.
pub fn client(url: &str) -> Result<redis::Client, String> {
    redis::Client::open(url).map_err(|e| format!("HERALD_REDIS_URL is not usable: {e}"))
}

/// What the Redis threads need to know of the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub user_prefix: String,
    pub topic_prefix: String,
    pub max_message_bytes: usize,
}

/// What the Redis threads share with the rest of herald.
#[derive(Clone)]
pub struct Context {
    pub settings: Arc<Settings>,
    pub routing: Arc<Routing>,
    pub metrics: Arc<Metrics>,
}

/// The event loops' handle on Redis: publishing goes through the publisher thread.
pub struct RedisBroker {
    jobs: Sender<PublishJob>,
    settings: Arc<Settings>,
}

/// PUBLISH commands on behalf of one request: `counts[i]` consecutive messages belong to
/// item `i`, whose receivers are summed for the answer.
#[derive(Debug)]
pub struct PublishJob {
    messages: Vec<(String, Arc<[u8]>)>,
    counts: Vec<u32>,
    reply: Option<ReplyTo>,
}

impl RedisBroker {
    /// Starts the subscriber and publisher threads.
    pub fn start(url: &str, ctx: Context) -> Result<RedisBroker, String> {
        let client = client(url)?;
        let (jobs, inbox) = crossbeam_channel::unbounded();
        let settings = ctx.settings.clone();
        let (sub_client, sub_ctx) = (client.clone(), ctx.clone());
        spawn("herald-redis-sub", move || run_subscriber(sub_client, sub_ctx))?;
        spawn("herald-redis-pub", move || run_publisher(client, inbox, ctx))?;
        Ok(RedisBroker { jobs, settings })
    }

    /// Queues `items` for the publisher; the answer goes to `reply`.
    pub fn publish(&self, items: Vec<Outgoing>, reply: Option<ReplyTo>) -> Result<(), String> {
        let mut messages = Vec::new();
        let mut counts = Vec::with_capacity(items.len());
        for item in items {
            // Published as it came, with any exclusion embedded so that every instance
            // honours it; each receiving instance stamps and frames it once.
            let payload: Arc<[u8]> = Arc::from(message::embed_exclusion(&item.message, &item.exclusion));
            counts.push(item.targets.len() as u32);
            for target in &item.targets {
                let channel = super::channel_of(target, &self.settings.user_prefix, &self.settings.topic_prefix);
                messages.push((channel, payload.clone()));
            }
        }
        self.jobs.send(PublishJob { messages, counts, reply }).map_err(|_| "redis publisher stopped".to_string())
    }
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> Result<(), String> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(body)
        .map(|_| ())
        .map_err(|e| format!("cannot start thread {name}: {e}"))
}

/// Subscriber thread body: never returns while the process runs.
fn run_subscriber(client: redis::Client, ctx: Context) {
    let mut backoff = Backoff::new();
    let mut scratch = JsonScratch::default();
    let mut ids = Interner::default();
    let health = &ctx.metrics.redis;
    let mut connected_before = false;
    loop {
        let session =
            client.get_connection_with_timeout(CONNECT_TIMEOUT).and_then(|mut conn| -> redis::RedisResult<()> {
                let mut pubsub = conn.as_pubsub();
                pubsub.psubscribe(pattern_for(&ctx.settings.user_prefix))?;
                pubsub.psubscribe(pattern_for(&ctx.settings.topic_prefix))?;
                health.subscriber_up.store(true, Relaxed);
                if connected_before {
                    ctx.metrics.redis_reconnects.fetch_add(1, Relaxed);
                    info!("redis subscriber reconnected and resubscribed");
                } else {
                    info!("redis subscriber connected");
                }
                connected_before = true;
                backoff.reset();
                loop {
                    let msg = pubsub.get_message()?;
                    route(&ctx, &mut scratch, &mut ids, msg.get_channel_name(), msg.get_payload_bytes());
                }
            });
        health.subscriber_up.store(false, Relaxed);
        if let Err(e) = session {
            warn!(error = %e, "redis subscriber disconnected; retrying");
            health.set_error(failure_kind(&e));
        }
        backoff.wait();
    }
}

/// Routes one Redis message to the loops holding its target, or drops it as invalid.
fn route(ctx: &Context, scratch: &mut JsonScratch, ids: &mut Interner, channel: &str, payload: &[u8]) {
    let config = &ctx.settings;
    let metrics = &ctx.metrics;
    metrics.received_from_redis.fetch_add(1, Relaxed);
    let target = match super::target_of(channel, &config.user_prefix, &config.topic_prefix) {
        Some((is_user, name)) => ids.intern(is_user, name),
        None => return,
    };
    // The size limit applies to what the publisher wrote; an exclusion herald itself embedded
    // is metadata, stripped here before validation. A message that carried one was built by
    // herald (a relay, a seed-004 event) from input it had already bounded, and its envelope
    // is herald's own addition: that must never be what makes it too large.
    let stripped = message::strip_exclusion(payload);
    let (payload, exclusion, limit) = match &stripped {
        Some((bytes, exclusion)) => (bytes.as_slice(), exclusion.clone(), config.max_message_bytes + HERALD_ENVELOPE),
        None => (payload, Default::default(), config.max_message_bytes),
    };
    let frame = match message::encode_notification(payload, limit, scratch, SystemTime::now(), Instant::now()) {
        Ok(frame) => frame,
        Err(why) => {
            metrics.dropped_invalid.fetch_add(1, Relaxed);
            warn!(channel, reason = why.describe(), bytes = payload.len(), "dropped a published message");
            return;
        }
    };
    let from = route::Sender::Thread { patience: LOOP_PATIENCE };
    let out = ctx.routing.table.dispatch(ctx.routing.loops(), from, &[target], &frame, &exclusion);
    metrics.count_overload(out.dropped);
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

/// Publisher thread body: PUBLISHes jobs from HTTP handlers, PINGs while idle. Returns when
/// every job sender is gone.
fn run_publisher(client: redis::Client, jobs: Receiver<PublishJob>, ctx: Context) {
    let health = &ctx.metrics.redis;
    let mut conn: Option<redis::Connection> = None;
    let mut retry_at = Instant::now();
    let mut backoff = Duration::ZERO;
    // Ping at once, so /health is accurate from the first second.
    let mut next_ping = Instant::now();
    loop {
        let job = match jobs.recv_timeout(next_ping.saturating_duration_since(Instant::now())) {
            Ok(job) => Some(job),
            Err(RecvTimeoutError::Timeout) => {
                next_ping = Instant::now() + PING_EVERY;
                None
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if conn.is_none() && Instant::now() >= retry_at {
            match connect(&client) {
                Ok(c) => {
                    conn = Some(c);
                    backoff = Duration::ZERO;
                }
                Err(e) => {
                    if backoff.is_zero() {
                        warn!(error = %e, "redis publisher cannot connect; retrying");
                    }
                    health.publisher_up.store(false, Relaxed);
                    health.set_error(failure_kind(&e));
                    backoff = (backoff * 2).clamp(BACKOFF_START, BACKOFF_CAP);
                    retry_at = Instant::now() + backoff;
                }
            }
        }
        let outcome = match conn.as_mut() {
            None => Err("redis unavailable".to_string()),
            Some(c) => match &job {
                Some(job) => publish(c, job)
                    .or_else(|first| {
                        // The connection may have died since the last PING (a Redis restart):
                        // one retry on a fresh connection before answering with an error.
                        let fresh = connect(&client).map_err(|_| first)?;
                        *c = fresh;
                        publish(c, job)
                    })
                    .map(Some),
                None => ping(c, health).map(|()| None),
            }
            .map_err(|e| {
                warn!(error = %e, "redis publisher lost its connection");
                health.set_error(failure_kind(&e));
                format!("redis error: {}", failure_kind(&e))
            }),
        };
        match &outcome {
            Ok(_) => health.publisher_up.store(true, Relaxed),
            Err(_) => {
                health.publisher_up.store(false, Relaxed);
                conn = None;
            }
        }
        if let Some(reply) = job.as_ref().and_then(|job| job.reply) {
            let answer = match outcome {
                Ok(Some(receivers)) => Answer::Published(receivers.into()),
                Ok(None) => continue,
                Err(why) => Answer::Failed(why),
            };
            if let Some(handle) = ctx.routing.loops().get(reply.loop_id) {
                let _ = handle.send_waiting(LoopCmd::Answer { conn: reply.conn, answer }, LOOP_PATIENCE);
            }
        }
    }
}

fn connect(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let conn = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(conn)
}

/// Sends every message of the job in one pipeline; returns the receivers of each item.
fn publish(conn: &mut redis::Connection, job: &PublishJob) -> redis::RedisResult<Vec<u64>> {
    let mut pipe = redis::pipe();
    for (channel, payload) in &job.messages {
        pipe.cmd("PUBLISH").arg(channel).arg(&payload[..]);
    }
    let counts: Vec<i64> = pipe.query(conn)?;
    let mut counts = counts.into_iter();
    Ok(job.counts.iter().map(|&n| counts.by_ref().take(n as usize).map(|c| c.max(0) as u64).sum()).collect())
}

fn ping(conn: &mut redis::Connection, health: &crate::metrics::RedisHealth) -> redis::RedisResult<()> {
    let started = Instant::now();
    redis::cmd("PING").query::<String>(conn)?;
    health.ping_micros.store(started.elapsed().as_micros() as u64, Relaxed);
    Ok(())
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
    fn passwords_are_found_redacted_and_inserted() {
        assert!(!url_has_password("redis://127.0.0.1:6379"));
        assert!(!url_has_password("redis://user@host:1/0"));
        assert!(url_has_password("redis://:s3cret@host:1"));
        assert!(url_has_password("rediss://user:s3cret@host/2?x=1"));
        assert!(url_has_password("unix:///run/redis.sock?db=1&pass=s3cret"));
        assert!(!url_has_password("redis://host/0?x=a:b@c"));
        assert_eq!(redact_url("redis://u:s3cret@host:1/0"), "redis://u:<redacted>@host:1/0");
        assert_eq!(redact_url("unix:///r.sock?pass=s3cret&db=2"), "unix:///r.sock?pass=<redacted>&db=2");
        assert_eq!(redact_url("redis://host:1"), "redis://host:1");

        assert_eq!(url_with_password("redis://host:1/0", "a b@:/%").unwrap(), "redis://:a%20b%40%3A%2F%25@host:1/0");
        assert_eq!(url_with_password("redis://user@host", "pw").unwrap(), "redis://user:pw@host");
        assert_eq!(url_with_password("unix:///r.sock", "p+w").unwrap(), "unix:///r.sock?pass=p%2Bw");
        assert_eq!(url_with_password("unix:///r.sock?db=1", "pw").unwrap(), "unix:///r.sock?db=1&pass=pw");
        assert!(url_with_password("redis://:old@host", "pw").is_err());
        assert!(url_with_password("redis://u:@host", "pw").is_err());
    }

    #[test]
    fn inserted_passwords_reach_the_redis_client_intact() {
        for password in ["plain", "a b@:/%?#&+=\"", "ünïcødé"] {
            let url = url_with_password("redis://127.0.0.1:6379/0", password).unwrap();
            let info = redis::Client::open(url.as_str()).unwrap().get_connection_info().clone();
            assert_eq!(info.redis_settings().password(), Some(password), "{url}");
            let url = url_with_password("unix:///tmp/r.sock", password).unwrap();
            let info = redis::Client::open(url.as_str()).unwrap().get_connection_info().clone();
            assert_eq!(info.redis_settings().password(), Some(password), "{url}");
        }
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
