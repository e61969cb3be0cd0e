//! An event loop's own pipelined connection to Redis for publishing, driven on the loop's
//! poller. Without it every HTTP publish in Redis mode crossed two threads and back: loop →
//! publisher thread (a wake-up) → Redis → publisher thread → loop (another wake-up), and the
//! publisher thread slept and woke for most messages. With it the loop writes what it
//! published during a pass in one write before it polls, and reads the replies when they come.
//!
//! Connecting blocks (TCP, TLS, AUTH, SELECT), which a loop must never do: a short-lived
//! thread opens the connection and hands it over. Until it is up, and whenever it is down or
//! full, publishes take the shared publisher thread, as before. When the connection dies, a
//! job none of whose replies came back is handed to the publisher thread to be sent once more
//! (Redis cannot have seen it, or did not answer it); any other job in flight is answered with
//! the error, exactly as the publisher thread treats its own.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use mio::{Interest, Registry, Token};
use tracing::debug;

use super::conn::{Conn, Failure};
use super::publisher::{self, InFlight, PublishJob};
use super::redis_url::RedisUrl;
use super::{Backoff, Context};
use crate::ids::{Answer, ConnRef, ReplyTo};
use crate::mailbox::Mailbox;

/// The token a loop registers its link's socket with.
pub const TOKEN: Token = Token(usize::MAX - 2);
/// Jobs awaiting replies before further publishes take the publisher thread.
const MAX_IN_FLIGHT: usize = 4096;
/// Encoded bytes Redis has not taken yet before further publishes take the publisher thread.
const MAX_UNWRITTEN: usize = 1 << 20;
/// A reply not back after this long means the connection is wedged.
const REPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// What a connector thread hands over.
type Opened = Result<Conn, Failure>;

enum State {
    /// Not connected; a connection is tried again from `retry_at` on.
    Down {
        retry_at: Instant,
    },
    /// A thread is opening a connection and will send it on `handoff`.
    Connecting,
    /// Connected, but publishes still take the publisher thread until it answers fence
    /// `seq`: a PING queued behind everything this loop handed it. Once Redis has answered
    /// those, nothing the link writes can overtake them.
    Fencing {
        conn: Box<Conn>,
        seq: u32,
        since: Instant,
    },
    Up(Box<Conn>),
}

/// The connection key a fence's answer names: no connection has it (slab keys are small).
const FENCE_KEY: u32 = u32::MAX;
/// A fence not answered by then (its answer was dropped, the thread is stuck) is given up:
/// the link reconnects and fences again.
const FENCE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct PublishLink {
    loop_id: usize,
    urls: Arc<[RedisUrl]>,
    ctx: Context,
    /// The publisher thread: takes whatever this link cannot.
    fallback: Arc<Mailbox<PublishJob>>,
    state: State,
    in_flight: VecDeque<InFlight>,
    backoff: Backoff,
    handoff: (Sender<Opened>, Receiver<Opened>),
    fences: u32,
}

impl PublishLink {
    pub(super) fn new(
        loop_id: usize,
        urls: Arc<[RedisUrl]>,
        ctx: Context,
        fallback: Arc<Mailbox<PublishJob>>,
    ) -> PublishLink {
        PublishLink {
            loop_id,
            urls,
            ctx,
            fallback,
            state: State::Down { retry_at: Instant::now() },
            in_flight: VecDeque::new(),
            backoff: Backoff::new(),
            handoff: crossbeam_channel::bounded(1),
            fences: 0,
        }
    }

    /// Writes `job`'s commands at the end of this pass, or gives the job back when the link
    /// is not up or has enough waiting already (the caller hands it to the publisher thread).
    pub(super) fn submit(&mut self, job: PublishJob) -> Result<(), PublishJob> {
        let State::Up(conn) = &mut self.state else { return Err(job) };
        if self.in_flight.len() >= MAX_IN_FLIGHT || conn.unwritten() >= MAX_UNWRITTEN {
            return Err(job);
        }
        publisher::encode(conn.commands(), Some(&job));
        self.in_flight.push_back(InFlight::new(job, false));
        Ok(())
    }

    /// Called once per pass of the loop, before it polls: takes a connection a connector
    /// handed over, starts one when due, reads the replies that came (`readable`: the socket
    /// had an event), writes what was published during the pass. Answers for requests parked
    /// on this loop go to `answers`.
    pub fn drive(&mut self, registry: &Registry, readable: bool, answers: &mut Vec<(ReplyTo, Answer)>) {
        match &mut self.state {
            State::Down { retry_at } => {
                if Instant::now() >= *retry_at {
                    self.connect();
                }
                return;
            }
            State::Connecting => {
                self.adopt(registry);
                return;
            }
            State::Fencing { conn, since, .. } => {
                // Redis sends nothing on it yet; an event means it closed or failed.
                let failed = match readable.then(|| conn.fill()) {
                    Some(Err(e)) => Some(Failure::from(e)),
                    _ if since.elapsed() >= FENCE_TIMEOUT => Some(Failure::Timeout),
                    _ => None,
                };
                if let Some(failure) = failed {
                    self.lost(registry, failure, answers);
                }
                return;
            }
            State::Up(_) => {}
        }
        if let Err(failure) = self.exchange(readable, answers) {
            self.lost(registry, failure, answers);
        }
    }

    /// When the loop must run a pass even if nothing else happens: to connect again, or to
    /// notice a reply that is overdue.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Down { retry_at } => Some(*retry_at),
            State::Connecting => None,
            State::Fencing { since, .. } => Some(*since + FENCE_TIMEOUT),
            State::Up(_) => self.in_flight.front().map(|f| f.sent + REPLY_TIMEOUT),
        }
    }

    fn connect(&mut self) {
        self.state = State::Connecting;
        let (urls, ctx, loop_id) = (self.urls.clone(), self.ctx.clone(), self.loop_id);
        let handoff = self.handoff.0.clone();
        let spawned = std::thread::Builder::new().name("herald-redis-link".into()).spawn(move || {
            let opened = super::open_first(&urls, ctx.settings.tls.as_ref(), "herald-loop-publisher", 64 * 1024)
                .map(|(conn, _)| conn)
                .map_err(|(failure, _)| failure);
            // The loop takes it on its next pass; the nudge makes that pass happen now.
            let _ = handoff.send(opened);
            if let Some(handle) = ctx.routing.loops().get(loop_id) {
                handle.nudge();
            }
        });
        if spawned.is_err() {
            self.state = State::Down { retry_at: Instant::now() + self.backoff.next_delay() };
        }
    }

    fn adopt(&mut self, registry: &Registry) {
        let opened = match self.handoff.1.try_recv() {
            Ok(opened) => opened,
            Err(TryRecvError::Empty) => return,
            Err(TryRecvError::Disconnected) => Err(Failure::Refused("connector vanished".into())),
        };
        let registered = opened.and_then(|mut conn| {
            registry.register(&mut conn.stream, TOKEN, Interest::READABLE | Interest::WRITABLE)?;
            Ok(conn)
        });
        match registered {
            Ok(mut conn) => {
                self.fences = self.fences.wrapping_add(1);
                let seq = self.fences;
                let conn_ref = ConnRef { key: FENCE_KEY, id: seq };
                let fence = PublishJob {
                    messages: Vec::new(),
                    counts: Vec::new(),
                    reply: Some(ReplyTo { loop_id: self.loop_id, conn: conn_ref }),
                    retried: false,
                };
                if self.fallback.try_send(fence).is_err() {
                    let _ = registry.deregister(&mut conn.stream);
                    self.state = State::Down { retry_at: Instant::now() + self.backoff.next_delay() };
                    return;
                }
                self.backoff.reset();
                self.state = State::Fencing { conn: Box::new(conn), seq, since: Instant::now() };
            }
            Err(failure) => {
                // The publisher thread reports Redis being down; this is its shadow.
                debug!(error = %failure, loop_id = self.loop_id, "a loop's redis publishing link cannot connect");
                self.state = State::Down { retry_at: Instant::now() + self.backoff.next_delay() };
            }
        }
    }

    /// Takes the answer to a fence (`true`: it was one, and is consumed): the link opens if
    /// it is the fence it waits for.
    pub fn take_fence(&mut self, conn_ref: ConnRef) -> bool {
        if conn_ref.key != FENCE_KEY {
            return false;
        }
        if matches!(&self.state, State::Fencing { seq, .. } if *seq == conn_ref.id) {
            if let State::Fencing { conn, .. } = std::mem::replace(&mut self.state, State::Connecting) {
                self.state = State::Up(conn);
            }
        }
        true
    }

    /// Reads every reply that has arrived (when the socket said so), then writes what is
    /// waiting.
    fn exchange(&mut self, readable: bool, answers: &mut Vec<(ReplyTo, Answer)>) -> Result<(), Failure> {
        let State::Up(conn) = &mut self.state else { return Ok(()) };
        if readable {
            conn.fill()?;
            while let Some(reply) = conn.next(publisher::receivers_in)? {
                let Some(front) = self.in_flight.front_mut() else {
                    return Err(Failure::Protocol("a reply nobody asked for".into()));
                };
                if front.take_reply(reply)? {
                    if let Some(done) = self.in_flight.pop_front() {
                        answer(done.answer(), done, answers);
                    }
                }
            }
        }
        conn.flush()?;
        if self.in_flight.front().is_some_and(|f| f.sent.elapsed() >= REPLY_TIMEOUT) {
            return Err(Failure::Timeout);
        }
        Ok(())
    }

    /// The connection died: what Redis cannot have answered goes to the publisher thread to be
    /// sent once more; the rest is answered with the error.
    fn lost(&mut self, registry: &Registry, failure: Failure, answers: &mut Vec<(ReplyTo, Answer)>) {
        debug!(error = %failure, loop_id = self.loop_id, "a loop's redis publishing link was lost");
        if let State::Up(conn) | State::Fencing { conn, .. } = &mut self.state {
            let _ = registry.deregister(&mut conn.stream);
        }
        self.state = State::Down { retry_at: Instant::now() + self.backoff.next_delay() };
        let why = format!("redis error: {}", failure.kind());
        for entry in std::mem::take(&mut self.in_flight) {
            let Some(mut job) = entry.job else { continue };
            if entry.receivers.is_empty() && !entry.retried {
                job.retried = true;
                let reply = job.reply;
                if self.fallback.try_send(job).is_err() {
                    if let Some(reply) = reply {
                        answers.push((reply, Answer::Failed("redis publisher overloaded".into())));
                    }
                }
            } else if let Some(reply) = job.reply {
                answers.push((reply, Answer::Failed(why.clone())));
            }
        }
    }
}

fn answer(answer: Option<Answer>, done: InFlight, answers: &mut Vec<(ReplyTo, Answer)>) {
    if let (Some(answer), Some(reply)) = (answer, done.job.and_then(|job| job.reply)) {
        answers.push((reply, answer));
    }
}
