//! The Redis publisher thread: one connection, pipelined. Every job waiting when the thread
//! wakes is encoded into one write; replies come back in order and are matched to the jobs in
//! flight, so concurrent HTTP publishers share round trips instead of queueing for them. A
//! PING while idle keeps `/health` honest (and measures the round trip).
//!
//! Each event loop publishes on its own connection while that is up (`publish_link.rs`); this
//! thread takes what a loop's link cannot: before it connects, while it is down or full, and
//! what it lost unanswered.
//!
//! When the connection dies, a job none of whose replies had arrived is sent once more on
//! the next connection (after a Redis restart the old connection's writes were never read);
//! any other job in flight is answered with the error.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::{Events, Interest, Poll, Token};
use tracing::warn;

use super::conn::{Conn, Failure};
use super::redis_url::RedisUrl;
use super::resp;
use super::{BACKOFF_CAP, BACKOFF_START, Context, LOOP_PATIENCE};
use crate::ids::{Answer, ReplyTo};
use crate::mailbox::{LoopCmd, Mailbox};

pub const WAKER: Token = Token(0);
const CONN: Token = Token(1);
/// An idle connection is PINGed this often.
const PING_EVERY: Duration = Duration::from_secs(1);
/// A reply not back after this long means the connection is wedged.
const REPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// One notification to one channel.
#[derive(Debug)]
pub struct Message {
    pub channel: Vec<u8>,
    pub payload: Arc<[u8]>,
    /// Through `herald_publish` (stored in the channel's stream), not a plain PUBLISH.
    pub stored: bool,
}

/// Commands on behalf of one request: `counts[i]` consecutive messages belong to item `i`,
/// whose receivers are summed for the answer.
#[derive(Debug)]
pub struct PublishJob {
    pub messages: Vec<Message>,
    pub counts: Vec<u32>,
    pub reply: Option<ReplyTo>,
    /// Written once already, on a connection that died before any reply to it came back.
    pub retried: bool,
}

/// A job (or a PING) whose replies are awaited, in the order its commands were written.
pub(super) struct InFlight {
    pub job: Option<PublishJob>,
    pub sent: Instant,
    /// Receivers per message, as replies arrive.
    pub receivers: Vec<u64>,
    /// Sent once already on a connection that died before answering.
    pub retried: bool,
    /// Why Redis refused one of the job's commands (the first such reply).
    pub refused: Option<Failure>,
}

impl InFlight {
    pub fn new(job: PublishJob, retried: bool) -> InFlight {
        let receivers = Vec::with_capacity(job.messages.len());
        InFlight { receivers, job: Some(job), sent: Instant::now(), retried, refused: None }
    }

    /// A PING, for the connection's health and round trip.
    pub fn ping() -> InFlight {
        InFlight { job: None, sent: Instant::now(), receivers: Vec::new(), retried: false, refused: None }
    }

    /// Takes the next reply to this entry; `true` once every reply is in. An error reply to a
    /// publish fails that job alone: the connection is sound, and Redis ran the commands
    /// written after it, so they must not be sent again. One to a PING is the connection's.
    pub fn take_reply(&mut self, reply: Result<u64, Failure>) -> Result<bool, Failure> {
        match reply {
            Ok(receivers) => self.receivers.push(receivers),
            Err(failure) if self.job.is_some() => {
                self.receivers.push(0);
                self.refused.get_or_insert(failure);
            }
            Err(failure) => return Err(failure),
        }
        Ok(self.receivers.len() == self.expects())
    }

    /// The answer for the job's request, once every reply is in (`None` for a PING).
    pub fn answer(&self) -> Option<Answer> {
        if let Some(refused) = &self.refused {
            return Some(Answer::Failed(format!("redis error: {}", refused.kind())));
        }
        self.per_item().map(Answer::Published)
    }

    /// Replies due: one per message, one for a PING (a job of no messages is a loop's fence,
    /// written as a PING).
    pub fn expects(&self) -> usize {
        self.job.as_ref().map_or(1, |job| job.messages.len().max(1))
    }

    /// Receivers per item of the job, once every reply is in.
    pub fn per_item(&self) -> Option<Box<[u64]>> {
        let job = self.job.as_ref()?;
        let mut receivers = self.receivers.iter();
        Some(job.counts.iter().map(|&n| receivers.by_ref().take(n as usize).sum()).collect())
    }
}

/// Encodes a job's commands (a PING for `None`, and for a loop's fence: a job of no messages).
pub(super) fn encode(commands: &mut Vec<u8>, job: Option<&PublishJob>) {
    let Some(job) = job.filter(|job| !job.messages.is_empty()) else {
        resp::encode_command(commands, [b"PING"]);
        return;
    };
    for message in &job.messages {
        if message.stored {
            let args = [b"FCALL".as_slice(), b"herald_publish", b"1", &message.channel, &message.payload];
            resp::encode_command(commands, args);
        } else {
            resp::encode_publish(commands, &message.channel, &message.payload);
        }
    }
}

/// The receivers one reply reports: PUBLISH answers them; herald_publish {offset, epoch,
/// receivers}. An error reply comes back as the failure it names.
pub(super) fn receivers_in(value: resp::Value<'_>) -> Result<u64, Failure> {
    match value.error() {
        Some(error) => Err(Failure::from_reply(error)),
        None => {
            let receivers = value.as_integer().or_else(|| value.items()?.get(2)?.as_integer());
            Ok(receivers.unwrap_or(0).max(0) as u64)
        }
    }
}

struct Publisher {
    /// Where to connect: the first that answers (see [`super::open_first`]).
    urls: Vec<RedisUrl>,
    /// The URL of the current connection, or the last one tried.
    url: usize,
    ctx: Context,
    jobs: Receiver<PublishJob>,
    conn: Option<Conn>,
    poll: Poll,
    /// Jobs to (re)send once connected, oldest first.
    waiting: VecDeque<InFlight>,
    in_flight: VecDeque<InFlight>,
    retry_at: Instant,
    backoff: Duration,
    last_write: Instant,
}

/// Publisher thread body: returns when every job sender is gone.
pub fn run(urls: Vec<RedisUrl>, ctx: Context, jobs: Receiver<PublishJob>, poll: Poll, wake: Arc<Mailbox<PublishJob>>) {
    let now = Instant::now();
    let mut publisher = Publisher {
        urls,
        url: 0,
        ctx,
        jobs,
        conn: None,
        poll,
        waiting: VecDeque::new(),
        in_flight: VecDeque::new(),
        retry_at: now,
        backoff: Duration::ZERO,
        // Ping at once, so /health is accurate from the first second.
        last_write: now - PING_EVERY,
    };
    let mut events = Events::with_capacity(16);
    loop {
        let timeout = publisher.next_wake();
        if let Err(e) = publisher.poll.poll(&mut events, Some(timeout)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                warn!(error = %e, "redis publisher cannot poll; it stops");
                return;
            }
        }
        wake.clear_wake();
        if !publisher.take_jobs() {
            return;
        }
        publisher.step();
    }
}

impl Publisher {
    /// Moves every queued job to `waiting`. `false` once no sender is left.
    fn take_jobs(&mut self) -> bool {
        loop {
            match self.jobs.try_recv() {
                // A job a loop's own link lost unanswered was sent once already.
                Ok(job) => {
                    let retried = job.retried;
                    self.waiting.push_back(InFlight::new(job, retried))
                }
                Err(crossbeam_channel::TryRecvError::Empty) => return true,
                Err(crossbeam_channel::TryRecvError::Disconnected) => return !self.waiting.is_empty(),
            }
        }
    }

    fn next_wake(&self) -> Duration {
        let now = Instant::now();
        let ping = (self.last_write + PING_EVERY).saturating_duration_since(now);
        let reply =
            self.in_flight.front().map_or(Duration::MAX, |f| (f.sent + REPLY_TIMEOUT).saturating_duration_since(now));
        let retry = if self.conn.is_none() && !self.waiting.is_empty() {
            self.retry_at.saturating_duration_since(now)
        } else {
            Duration::MAX
        };
        ping.min(reply).min(retry).max(Duration::from_millis(1))
    }

    fn step(&mut self) {
        let now = Instant::now();
        let wants_ping = now >= self.last_write + PING_EVERY && self.in_flight.is_empty() && self.waiting.is_empty();
        if self.conn.is_none() && (!self.waiting.is_empty() || wants_ping) {
            if now < self.retry_at {
                self.fail_waiting("redis unavailable");
                return;
            }
            self.connect();
            if self.conn.is_none() {
                return;
            }
        }
        if wants_ping && self.conn.is_some() {
            self.waiting.push_back(InFlight::ping());
        }
        if let Err(failure) = self.exchange() {
            self.lost(failure);
        }
    }

    fn connect(&mut self) {
        match super::open_first(&self.urls, self.ctx.settings.tls.as_ref(), "herald-publisher", 64 * 1024) {
            Ok((mut conn, url)) => {
                self.url = self.urls.iter().position(|u| u == url).unwrap_or(0);
                if let Err(e) =
                    self.poll.registry().register(&mut conn.stream, CONN, Interest::READABLE | Interest::WRITABLE)
                {
                    self.failed(Failure::Io(e));
                    return;
                }
                self.conn = Some(conn);
                self.backoff = Duration::ZERO;
            }
            Err((failure, url)) => {
                self.url = self.urls.iter().position(|u| u == url).unwrap_or(0);
                self.failed(failure)
            }
        }
    }

    /// Records a failure to connect and answers everyone waiting.
    fn failed(&mut self, failure: Failure) {
        warn!(error = %failure, redis = %self.urls[self.url].redacted(), "redis publisher cannot connect");
        self.ctx.metrics.redis.set_error(failure.kind());
        self.ctx.metrics.redis.publisher_up.store(false, Relaxed);
        self.backoff = (self.backoff * 2).clamp(BACKOFF_START, BACKOFF_CAP);
        self.retry_at = Instant::now() + self.backoff;
        self.fail_waiting(&format!("redis error: {}", failure.kind()));
    }

    fn fail_waiting(&mut self, why: &str) {
        for entry in std::mem::take(&mut self.waiting) {
            self.answer(entry, Answer::Failed(why.to_string()));
        }
    }

    /// Writes every waiting command, then reads every reply that has arrived.
    fn exchange(&mut self) -> Result<(), Failure> {
        let Some(conn) = self.conn.as_mut() else { return Ok(()) };
        while let Some(mut entry) = self.waiting.pop_front() {
            encode(conn.commands(), entry.job.as_ref());
            entry.sent = Instant::now();
            self.in_flight.push_back(entry);
            self.last_write = Instant::now();
        }
        conn.flush()?;
        conn.fill()?;
        let mut done = Vec::new();
        loop {
            let reply = conn.next(receivers_in)?;
            let Some(receivers) = reply else { break };
            let Some(front) = self.in_flight.front_mut() else {
                return Err(Failure::Protocol("a reply nobody asked for".into()));
            };
            if front.take_reply(receivers)? {
                done.extend(self.in_flight.pop_front());
            }
        }
        for entry in done {
            self.complete(entry);
        }
        if self.in_flight.front().is_some_and(|f| f.sent.elapsed() >= REPLY_TIMEOUT) {
            return Err(Failure::Timeout);
        }
        Ok(())
    }

    fn complete(&mut self, done: InFlight) {
        let health = &self.ctx.metrics.redis;
        health.publisher_up.store(true, Relaxed);
        let Some(answer) = done.answer() else {
            health.ping_micros.store(done.sent.elapsed().as_micros() as u64, Relaxed);
            return;
        };
        self.answer(done, answer);
    }

    /// The connection died: resend what Redis cannot have seen, answer the rest.
    fn lost(&mut self, failure: Failure) {
        warn!(error = %failure, redis = %self.urls[self.url].redacted(), "redis publisher connection lost");
        self.ctx.metrics.redis.set_error(failure.kind());
        self.ctx.metrics.redis.publisher_up.store(false, Relaxed);
        self.conn = None;
        let why = format!("redis error: {}", failure.kind());
        let mut resend = VecDeque::new();
        for mut entry in std::mem::take(&mut self.in_flight) {
            if entry.job.is_none() {
                continue;
            }
            if entry.receivers.is_empty() && !entry.retried {
                entry.retried = true;
                resend.push_back(entry);
            } else {
                self.answer(entry, Answer::Failed(why.clone()));
            }
        }
        resend.append(&mut self.waiting);
        self.waiting = resend;
        if !self.waiting.is_empty() {
            // One attempt on a fresh connection right away; the backoff applies after that.
            self.connect();
            if let Err(failure) = self.exchange() {
                self.conn = None;
                self.failed(failure);
                for entry in std::mem::take(&mut self.in_flight) {
                    self.answer(entry, Answer::Failed(why.clone()));
                }
            }
        }
    }

    fn answer(&self, entry: InFlight, answer: Answer) {
        let Some(reply) = entry.job.and_then(|job| job.reply) else { return };
        if let Some(handle) = self.ctx.routing.loops().get(reply.loop_id) {
            let _ = handle.send_waiting(LoopCmd::Answer { conn: reply.conn, answer }, LOOP_PATIENCE);
        }
    }
}
