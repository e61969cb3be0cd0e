//! An event-loop thread: its own poller, listener, connections, index and timers.
//!
//! No other thread touches a connection. The router (and the Redis publisher) talk to a loop
//! only through its command channel, waking it with its `mio::Waker`. One pass of the loop:
//! flush every connection with pending output, poll, handle socket events, drain commands,
//! fire due timers, fold counters into the shared metrics.

pub mod timers;

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use tracing::{debug, warn};

use crate::conn::inbound::{Flow, Inbound, Violation};
use crate::conn::send_queue::Flushed;
use crate::conn::{Conn, NO_TIMER, Phase, Session, Tick};
use crate::dialect::Stream;
use crate::frame::{self, SharedFrame, code};
use crate::http::publish::{PendingPublish, Responder};
use crate::http::routes::{self, Outcome};
use crate::http::{self, Parsed, Response, Status};
use crate::message::{self, ClientMessage, JsonScratch};
use crate::metrics::LocalCounters;
use crate::router::{DeliverTo, Exclusion, RouterMsg, Target};
use crate::shared::Shared;
use timers::{Clock, TimerWheel, ticks};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX);

/// Bytes written to one connection per pass before others get their turn.
const WRITE_BUDGET: usize = 256 * 1024;
/// Reads from one connection per readiness event before others get their turn.
const READS_PER_EVENT: usize = 8;
/// Size of the loop's shared read buffer.
const READ_CHUNK: usize = 64 * 1024;
/// Commands handled per pass before sockets get a turn.
const COMMANDS_PER_PASS: usize = 8192;
/// How long a closing connection may take to read our last bytes and hang up.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// How long accepting pauses after the process ran out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Identifies a connection across threads (slab key + id, since keys are reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRef {
    key: u32,
    id: u32,
}

impl ConnRef {
    pub fn to_parts(self) -> (u32, u32) {
        (self.key, self.id)
    }

    pub fn from_parts(key: u32, id: u32) -> ConnRef {
        ConnRef { key, id }
    }
}

/// Work sent to a loop.
#[derive(Debug)]
pub enum LoopCmd {
    Deliver {
        targets: DeliverTo,
        frame: SharedFrame,
        exclusion: Exclusion,
    },
    /// The answer to a request this loop handed off: how many were addressed (loops holding
    /// a target, Redis receivers, or connections closed), or why it failed.
    Answer {
        conn: ConnRef,
        result: Result<u64, String>,
    },
    /// Close every connection of `user` here, add the count to the tally, and let the last
    /// loop to finish answer the HTTP request.
    Disconnect {
        user: Arc<str>,
        tally: Arc<DisconnectTally>,
    },
    /// Stop accepting, close every connection with 1001 after flushing, then exit.
    Shutdown,
}

/// Counts connections closed by `/api/disconnect` across loops.
#[derive(Debug)]
pub struct DisconnectTally {
    pub remaining: std::sync::atomic::AtomicUsize,
    pub closed: std::sync::atomic::AtomicU64,
    pub reply: (usize, ConnRef),
}

/// The sending side of a loop, shared with the router and the publisher.
pub struct LoopHandle {
    tx: Sender<LoopCmd>,
    waker: Waker,
    /// Set while a wake-up is outstanding, so a burst of commands costs one wake syscall.
    wake_pending: AtomicBool,
}

impl LoopHandle {
    pub fn send(&self, cmd: LoopCmd) {
        if self.tx.send(cmd).is_ok() && !self.wake_pending.swap(true, Ordering::AcqRel) {
            let _ = self.waker.wake();
        }
    }
}

/// Creates a loop's poller and handle; the poller moves into the loop thread.
pub fn prepare() -> io::Result<(Poll, LoopHandle, Receiver<LoopCmd>)> {
    let poll = Poll::new()?;
    let waker = Waker::new(poll.registry(), WAKER)?;
    let (tx, rx) = crossbeam_channel::unbounded();
    Ok((poll, LoopHandle { tx, waker, wake_pending: AtomicBool::new(false) }, rx))
}

/// Something a client's message asks for, applied after its frames are parsed.
enum Action {
    Reply(SharedFrame),
    /// The client sent a close frame: answer it and close.
    CloseReply(u16),
    Subscribe {
        topic: String,
        silent: bool,
    },
    Unsubscribe {
        topic: String,
        silent: bool,
    },
    /// A focus-session member's JSON object, for the session's other members.
    Relay(String),
}

pub struct EventLoop {
    id: usize,
    shared: Arc<Shared>,
    poll: Poll,
    listener: Option<TcpListener>,
    inbox: Receiver<LoopCmd>,
    conns: Slab<Conn>,
    /// Which connections of this loop receive each user's and topic's messages.
    index: HashMap<Target, Vec<u32>>,
    wheel: TimerWheel,
    clock: Clock,
    now: Instant,
    now_tick: Tick,
    /// Connections with output to flush before the next poll.
    dirty: Vec<u32>,
    /// Connections whose reads were cut short for fairness.
    reread: Vec<u32>,
    /// Slow consumers found during a delivery, closed once it is done.
    slow: Vec<u32>,
    due: Vec<(timers::Entry, Tick)>,
    read_buf: Vec<u8>,
    actions: Vec<Action>,
    json: JsonScratch,
    counters: LocalCounters,
    next_conn_id: u32,
    delivery_seq: u32,
    ping: SharedFrame,
    more_commands: bool,
    accept_paused_until: Option<Instant>,
    last_accept_warning: Option<Instant>,
    shutting_down: bool,
    /// Most connections held since memory was last handed back, and when that was.
    peak_connections: usize,
    last_trim: Tick,
}

impl EventLoop {
    pub fn new(
        id: usize,
        shared: Arc<Shared>,
        poll: Poll,
        mut listener: TcpListener,
        inbox: Receiver<LoopCmd>,
    ) -> io::Result<EventLoop> {
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let now = Instant::now();
        Ok(EventLoop {
            id,
            shared,
            poll,
            listener: Some(listener),
            inbox,
            conns: Slab::new(),
            index: HashMap::new(),
            wheel: TimerWheel::default(),
            clock: Clock::new(now),
            now,
            now_tick: 0,
            dirty: Vec::new(),
            reread: Vec::new(),
            slow: Vec::new(),
            due: Vec::new(),
            read_buf: vec![0; READ_CHUNK],
            actions: Vec::new(),
            json: JsonScratch::default(),
            counters: LocalCounters::default(),
            next_conn_id: 0,
            delivery_seq: 0,
            ping: frame::ping(),
            more_commands: false,
            accept_paused_until: None,
            last_accept_warning: None,
            shutting_down: false,
            peak_connections: 0,
            last_trim: 0,
        })
    }

    fn handle(&self) -> &LoopHandle {
        &self.shared.loops()[self.id]
    }

    /// Runs until shutdown has closed every connection.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            self.flush_dirty();
            self.publish_gauges();
            if self.shutting_down && self.conns.is_empty() {
                return;
            }
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!(error = %e, loop_id = self.id, "poll failed; loop stops");
                return;
            }
            self.now = Instant::now();
            self.now_tick = self.clock.tick_at(self.now);
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(key) => {
                        let key = key as u32;
                        if event.is_writable() {
                            self.flush(key);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.on_readable(key);
                        }
                    }
                }
            }
            if self.accept_paused_until.is_some_and(|t| self.now >= t) {
                self.accept_paused_until = None;
                self.accept();
            }
            for key in std::mem::take(&mut self.reread) {
                self.on_readable(key);
            }
            self.drain_commands();
            self.fire_timers();
            self.shared.metrics.loops[self.id].absorb(&mut self.counters);
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.dirty.is_empty() || !self.reread.is_empty() || self.more_commands {
            return Some(Duration::ZERO);
        }
        let mut timeout: Option<Duration> = None;
        if !self.wheel.is_empty() {
            let next = self.clock.instant_of(self.now_tick + 1);
            timeout = Some(next.saturating_duration_since(Instant::now()));
        }
        if let Some(at) = self.accept_paused_until {
            let wait = at.saturating_duration_since(Instant::now());
            timeout = Some(timeout.map_or(wait, |t| t.min(wait)));
        }
        timeout
    }

    fn publish_gauges(&self) {
        let m = &self.shared.metrics.loops[self.id];
        m.slab_entries.store(self.conns.len() as u64, Ordering::Relaxed);
        m.index_entries.store(self.index.len() as u64, Ordering::Relaxed);
    }

    // ---- accepting ----

    fn accept(&mut self) {
        if self.accept_paused_until.is_some() {
            return;
        }
        loop {
            let Some(listener) = self.listener.as_ref() else { return };
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer.ip()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.counters.accept_errors += 1;
                    let out_of_resources =
                        matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM));
                    if self.last_accept_warning.is_none_or(|t| self.now.duration_since(t) > Duration::from_secs(5)) {
                        warn!(error = %e, "accept failed");
                        self.last_accept_warning = Some(self.now);
                    }
                    if out_of_resources {
                        // The connection stays in the backlog; retry once descriptors free up.
                        self.accept_paused_until = Some(self.now + ACCEPT_BACKOFF);
                        return;
                    }
                }
            }
        }
    }

    fn admit(&mut self, mut stream: TcpStream, peer: std::net::IpAddr) {
        if self.shutting_down {
            return;
        }
        let _ = stream.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if self.poll.registry().register(&mut stream, Token(key), Interest::READABLE).is_err() {
            return;
        }
        self.next_conn_id = self.next_conn_id.wrapping_add(1);
        let deadline = self.now_tick + ticks(self.shared.config.handshake_timeout);
        entry.insert(Conn {
            stream,
            id: self.next_conn_id,
            peer,
            phase: Phase::Request { buf: Vec::new(), deadline },
            queue: Default::default(),
            registered: Interest::READABLE,
            write_blocked: false,
            dirty: false,
            timer_tick: NO_TIMER,
            delivery_seq: 0,
        });
        self.arm(key as u32);
        // Data may already be waiting (edge-triggered: no event will announce it again).
        self.on_readable(key as u32);
    }

    // ---- reading ----

    fn on_readable(&mut self, key: u32) {
        let mut reads = 0;
        loop {
            let Some(conn) = self.conns.get_mut(key as usize) else { return };
            if matches!(conn.phase, Phase::Awaiting { .. }) {
                return;
            }
            if reads == READS_PER_EVENT {
                self.reread.push(key);
                return;
            }
            reads += 1;
            let n = match conn.stream.read(&mut self.read_buf) {
                Ok(0) => {
                    self.on_eof(key);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.remove(key);
                    return;
                }
            };
            match &mut conn.phase {
                Phase::Request { buf, .. } => {
                    if buf.len() + n > http::MAX_HEAD_BYTES + http::MAX_BODY_BYTES + READ_CHUNK {
                        self.reject(key, Status::HEADERS_TOO_LARGE);
                        return;
                    }
                    buf.extend_from_slice(&self.read_buf[..n]);
                    self.serve_requests(key);
                }
                Phase::Open(_) => {
                    let mut input = std::mem::take(&mut self.read_buf);
                    self.on_frames(key, &mut input[..n]);
                    self.read_buf = input;
                }
                // Bytes after our close are discarded; we only wait for the peer's EOF.
                Phase::Closing { .. } | Phase::Awaiting { .. } => {}
            }
        }
    }

    fn on_eof(&mut self, key: u32) {
        let Some(conn) = self.conns.get(key as usize) else { return };
        match conn.phase {
            // A client that half-closed after sending its last request still gets its answers.
            Phase::Request { .. } if !conn.queue.is_empty() => {
                self.set_phase_closing(key);
            }
            Phase::Closing { fin_sent: false, .. } => {}
            _ => self.remove(key),
        }
    }

    // ---- HTTP ----

    /// Serves every complete request in the connection's buffer (keep-alive and pipelining).
    fn serve_requests(&mut self, key: u32) {
        loop {
            let Some(conn) = self.conns.get_mut(key as usize) else { return };
            let Phase::Request { buf, .. } = &mut conn.phase else { return };
            if buf.is_empty() {
                return;
            }
            let (request, consumed) = match http::parse_request(buf) {
                Parsed::Partial => return,
                Parsed::Error(status) => {
                    self.reject(key, status);
                    return;
                }
                Parsed::Complete { request, consumed } => (request, consumed),
            };
            buf.drain(..consumed);
            let peer = conn.peer;
            let head_only = request.method() == http::Method::Head;
            let is_ws_path = crate::dialect::for_path(&request.path).is_some();
            match routes::handle(&request, peer, &self.shared, &mut self.json) {
                Outcome::Respond(response) => {
                    if is_ws_path {
                        self.counters.rejected_upgrades += 1;
                    }
                    let close = response.close || !request.keep_alive || self.shutting_down;
                    self.respond(key, response, head_only, close);
                    if close {
                        return;
                    }
                }
                Outcome::Upgrade(upgrade) => {
                    self.open(key, *upgrade);
                    return;
                }
                Outcome::Publish(pending) => {
                    self.start_publish(key, *pending, request.keep_alive);
                    return;
                }
                Outcome::Disconnect(user) => {
                    self.start_disconnect(key, user, request.keep_alive);
                    return;
                }
            }
        }
    }

    /// Queues an HTTP response; closes afterwards when `close`.
    fn respond(&mut self, key: u32, mut response: Response, head_only: bool, close: bool) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        response.close = close;
        conn.queue.push_reply(frame::raw(response.render(head_only)));
        if let (false, Phase::Request { deadline, .. }) = (close, &mut conn.phase) {
            // Keep-alive: the next request gets a fresh handshake deadline.
            *deadline = self.now_tick + ticks(self.shared.config.handshake_timeout);
        }
        self.mark_dirty(key);
        if close {
            self.set_phase_closing(key);
        }
    }

    /// Answers a request that cannot be parsed or served, and closes.
    fn reject(&mut self, key: u32, status: Status) {
        let message = match status.0 {
            431 => "request headers too large",
            413 => "request body too large",
            411 => "a Content-Length is required",
            408 => "request not completed in time",
            _ => "malformed request",
        };
        self.respond(key, Response::error(status, message), false, true);
    }

    /// Pauses the connection's requests until another thread answers; returns its ref.
    fn await_answer(&mut self, key: u32, keep_alive: bool, respond: Responder) -> Option<ConnRef> {
        let conn = self.conns.get_mut(key as usize)?;
        let Phase::Request { buf, .. } = &mut conn.phase else { return None };
        let buf = std::mem::take(buf);
        let deadline = self.now_tick + ticks(self.shared.config.handshake_timeout);
        conn.phase = Phase::Awaiting { buf, keep_alive, deadline, respond };
        Some(ConnRef { key, id: conn.id })
    }

    fn start_disconnect(&mut self, key: u32, user: Arc<str>, keep_alive: bool) {
        let Some(conn) = self.await_answer(key, keep_alive, Responder::Closed) else { return };
        let loops = self.shared.loops();
        let tally =
            Arc::new(DisconnectTally { remaining: loops.len().into(), closed: 0.into(), reply: (self.id, conn) });
        for handle in loops {
            handle.send(LoopCmd::Disconnect { user: user.clone(), tally: tally.clone() });
        }
    }

    fn disconnect_user(&mut self, user: Arc<str>, tally: &DisconnectTally) {
        // Topic-path connections are not in the user's index entry, so look at every session:
        // an admin action, rare enough for a scan of this loop's slab.
        let keys: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, c)| c.session().is_some_and(|s| s.user == user))
            .map(|(k, _)| k as u32)
            .collect();
        let mut closed = 0;
        for key in keys {
            if let Some(code) =
                self.conns.get(key as usize).and_then(|c| c.session()).map(|s| s.dialect.auth_close_code)
            {
                self.close_with(key, code, "disconnected by the server");
                closed += 1;
            }
        }
        tally.closed.fetch_add(closed, Ordering::AcqRel);
        if tally.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let (loop_id, conn) = tally.reply;
            let total = tally.closed.load(Ordering::Acquire);
            if let Some(handle) = self.shared.loops().get(loop_id) {
                handle.send(LoopCmd::Answer { conn, result: Ok(total) });
            }
        }
    }

    fn start_publish(&mut self, key: u32, pending: PendingPublish, keep_alive: bool) {
        let Some(conn) = self.await_answer(key, keep_alive, pending.respond) else { return };
        let reply = (self.id, conn);
        match (pending.redis_messages, &self.shared.publisher) {
            (Some(messages), Some(publisher)) => {
                let job = crate::broker::PublishJob { messages, reply: Some(reply) };
                if publisher.send(job).is_err() {
                    self.finish_publish(key, Err("redis publisher stopped".into()));
                }
            }
            _ => {
                let mut publication = pending.publication;
                publication.reply = Some(reply);
                if self.shared.router.send(RouterMsg::Publish(publication)).is_err() {
                    self.finish_publish(key, Err("router stopped".into()));
                }
            }
        }
    }

    fn finish_publish(&mut self, key: u32, result: Result<u64, String>) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        let Phase::Awaiting { buf, keep_alive, respond, .. } = &mut conn.phase else { return };
        let (buf, keep_alive, respond) = (std::mem::take(buf), *keep_alive, *respond);
        conn.phase = Phase::Request { buf, deadline: self.now_tick };
        let response = match result {
            Ok(count) => respond.render(count),
            Err(error) => Response::api_error(Status::SERVICE_UNAVAILABLE, &error),
        };
        self.respond(key, response, false, !keep_alive || self.shutting_down);
        self.arm(key);
        self.serve_requests(key);
        self.on_readable(key);
    }

    // ---- WebSocket ----

    fn open(&mut self, key: u32, upgrade: routes::Upgrade) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        let Phase::Request { buf, .. } = &mut conn.phase else { return };
        let early_frames = std::mem::take(buf);
        conn.queue.push_reply(frame::raw(upgrade.response));
        self.mark_dirty(key);
        let identity = match upgrade.identity {
            Ok(identity) => identity,
            Err(close_code) => {
                self.counters.rejected_upgrades += 1;
                self.close_with(key, close_code, "unauthorized");
                return;
            }
        };
        // Rounded up to whole ticks: the close comes at or just after `exp`, never before.
        let expires = crate::auth::expiry_tick(identity.exp, std::time::SystemTime::now(), self.now_tick);
        let mut session = Box::new(Session {
            user: identity.user,
            dialect: upgrade.dialect,
            topics: Vec::new(),
            allowed_topics: identity.topics.into_boxed_slice(),
            expires,
            last_received: self.now_tick,
            last_ping: self.now_tick,
            last_data_sent: self.now_tick,
            personal: true,
            relay_window: 0,
            relays_in_window: 0,
            reader: Default::default(),
        });
        if let Stream::Topic(topic) = upgrade.stream {
            session.topics.push(Arc::from(topic));
            session.personal = false;
        }
        let greets = session.dialect.greets;
        let user = session.user.clone();
        let topics = session.topics.clone();
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        conn.phase = Phase::Open(session);
        self.shared.metrics.loops[self.id].connections.fetch_add(1, Ordering::Relaxed);
        match topics.first() {
            // A topic path receives that topic only, not the user's personal stream.
            Some(topic) => self.index_add(Target::Topic(topic.clone()), key),
            None => self.index_add(Target::User(user), key),
        }
        if greets {
            let greeting = format!(
                "{{\"type\":\"connected\",\"timestamp\":\"{}\"}}",
                message::rfc3339_millis(std::time::SystemTime::now())
            );
            self.queue_reply(key, frame::reply_text(greeting.as_bytes()));
        }
        self.arm(key);
        if !early_frames.is_empty() {
            let mut input = early_frames;
            self.on_frames(key, &mut input);
        }
    }

    fn on_frames(&mut self, key: u32, input: &mut [u8]) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        let Phase::Open(session) = &mut conn.phase else { return };
        session.last_received = self.now_tick;
        let max = self.shared.config.max_message_bytes;
        let json = &mut self.json;
        let actions = &mut self.actions;
        let counters = &mut self.counters;
        let dialect = session.dialect;
        let result = session.reader.feed(input, max, |event| match event {
            Inbound::Ping(payload) => {
                actions.push(Action::Reply(frame::pong(payload)));
                Flow::Continue
            }
            Inbound::Pong => Flow::Continue,
            Inbound::Close(code) => {
                actions.push(Action::CloseReply(code.unwrap_or(code::NORMAL)));
                Flow::Stop
            }
            Inbound::Text(text) => {
                match message::parse_client_message(text, json) {
                    ClientMessage::Ping(style) => actions.push(Action::Reply(frame::reply_text(style.answer()))),
                    ClientMessage::Ack => counters.acked += 1,
                    ClientMessage::Subscribe(topic) => actions.push(Action::Subscribe { topic, silent: false }),
                    ClientMessage::Unsubscribe(topic) => actions.push(Action::Unsubscribe { topic, silent: false }),
                    ClientMessage::SubscribeProject(id) if dialect.project_subscriptions => {
                        actions.push(Action::Subscribe { topic: format!("project:{id}"), silent: true })
                    }
                    ClientMessage::UnsubscribeProject(id) if dialect.project_subscriptions => {
                        actions.push(Action::Unsubscribe { topic: format!("project:{id}"), silent: true })
                    }
                    ClientMessage::OtherObject if dialect.relays => actions.push(Action::Relay(text.to_owned())),
                    _ => counters.ignored_client_messages += 1,
                }
                Flow::Continue
            }
        });
        let mut actions = std::mem::take(&mut self.actions);
        for action in actions.drain(..) {
            self.apply(key, action);
        }
        self.actions = actions;
        if let Err(Violation { code, reason }) = result {
            self.counters.protocol_errors += 1;
            debug!(code, reason, "closing a connection for a protocol violation");
            self.close_with(key, code, reason);
        }
    }

    fn apply(&mut self, key: u32, action: Action) {
        match action {
            Action::Reply(reply) => self.queue_reply(key, reply),
            Action::CloseReply(code) => {
                // Echo the client's code (RFC 6455 §5.5.1); 1005-style absence becomes 1000.
                self.close_with(key, code, "");
            }
            Action::Subscribe { topic, silent } => self.subscribe(key, topic, silent),
            Action::Unsubscribe { topic, silent } => self.unsubscribe(key, topic, silent),
            Action::Relay(data) => self.relay(key, &data),
        }
    }

    /// Sends a focus-session member's object to the other members, on every instance.
    fn relay(&mut self, key: u32, data: &str) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        let conn_ref = ConnRef { key, id: conn.id };
        let Phase::Open(session) = &mut conn.phase else { return };
        let window = self.now_tick / ticks(Duration::from_secs(1));
        if session.relay_window != window {
            session.relay_window = window;
            session.relays_in_window = 0;
        }
        let Some(topic) = session.topics.first().cloned() else { return };
        if session.relays_in_window >= RELAYS_PER_SECOND {
            self.counters.ignored_client_messages += 1;
            return;
        }
        session.relays_in_window += 1;
        let session_id = topic.strip_prefix("focus-session:").unwrap_or(&topic);
        let update = format!(
            "{{\"type\":\"focus_session_update\",\"session_id\":{},\"sender_id\":{},\"data\":{data}}}",
            serde_json::Value::from(session_id),
            crate::http::publish::id_as_json(&session.user),
        );
        // The wrapper adds a fixed envelope to an object the inbound limit already bounded.
        let limit = self.shared.config.max_message_bytes + 256;
        let now = std::time::SystemTime::now();
        let Ok(frame) = message::encode_notification(update.as_bytes(), limit, &mut self.json, now, self.now) else {
            self.counters.ignored_client_messages += 1;
            return;
        };
        let exclusion = Exclusion { users: None, origin: Some((self.shared.instance_id, self.id, conn_ref)) };
        let pending =
            crate::http::publish::package(&self.shared, vec![Target::Topic(topic)], frame, exclusion, Responder::Sent);
        match (pending.redis_messages, &self.shared.publisher) {
            (Some(messages), Some(publisher)) => {
                let _ = publisher.send(crate::broker::PublishJob { messages, reply: None });
            }
            _ => {
                let _ = self.shared.router.send(RouterMsg::Publish(pending.publication));
            }
        }
    }

    fn subscribe(&mut self, key: u32, topic: String, silent: bool) {
        let Some(Phase::Open(session)) = self.conns.get_mut(key as usize).map(|c| &mut c.phase) else { return };
        let allowed = crate::auth::topic_allowed(&session.allowed_topics, &topic);
        let reply = if !allowed {
            Some(serde_json::json!({"type": "error", "message": format!("not allowed to subscribe to {topic}")}))
        } else if session.topics.len() >= MAX_TOPICS_PER_CONNECTION && !session.topics.iter().any(|t| **t == *topic) {
            Some(serde_json::json!({"type": "error", "message": "too many topics on this connection"}))
        } else {
            if !session.topics.iter().any(|t| **t == *topic) {
                let topic: Arc<str> = Arc::from(topic.as_str());
                session.topics.push(topic.clone());
                self.index_add(Target::Topic(topic), key);
            }
            (!silent).then(|| serde_json::json!({"type": "subscribed", "topic": topic}))
        };
        if let Some(reply) = reply {
            self.queue_reply(key, frame::reply_text(reply.to_string().as_bytes()));
        }
    }

    fn unsubscribe(&mut self, key: u32, topic: String, silent: bool) {
        let Some(Phase::Open(session)) = self.conns.get_mut(key as usize).map(|c| &mut c.phase) else { return };
        if let Some(i) = session.topics.iter().position(|t| **t == *topic) {
            let removed = session.topics.swap_remove(i);
            self.index_remove(&Target::Topic(removed), key);
        }
        if !silent {
            let reply = serde_json::json!({"type": "unsubscribed", "topic": topic});
            self.queue_reply(key, frame::reply_text(reply.to_string().as_bytes()));
        }
    }

    fn queue_reply(&mut self, key: u32, reply: SharedFrame) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        if matches!(conn.phase, Phase::Closing { .. }) {
            return;
        }
        conn.queue.push_reply(reply);
        self.mark_dirty(key);
    }

    // ---- delivery ----

    fn deliver(&mut self, targets: &DeliverTo, frame: &SharedFrame, exclusion: &Exclusion) {
        let excluded_conn = exclusion
            .origin
            .filter(|(instance, loop_id, _)| *instance == self.shared.instance_id && *loop_id == self.id)
            .map(|(_, _, conn)| conn);
        self.delivery_seq = self.delivery_seq.wrapping_add(1);
        let seq = self.delivery_seq;
        let limit = self.shared.config.send_queue;
        let now_tick = self.now_tick;
        let mut flush_time: Option<Instant> = None;
        for target in targets.as_slice() {
            let Some(keys) = self.index.get(target) else { continue };
            for &key in keys {
                let Some(conn) = self.conns.get_mut(key as usize) else { continue };
                if conn.delivery_seq == seq || excluded_conn == Some(ConnRef { key, id: conn.id }) {
                    continue;
                }
                conn.delivery_seq = seq;
                let Phase::Open(session) = &mut conn.phase else { continue };
                if exclusion.users.as_ref().is_some_and(|users| users.contains(&session.user)) {
                    continue;
                }
                session.last_data_sent = now_tick;
                if conn.queue.push_notification(frame.clone(), limit).is_err() {
                    // A full queue is only slow if the socket is full too: a burst larger
                    // than the queue must reach a client that reads. Write what the kernel
                    // takes now, then judge. (Errors are left for the flush to find: this
                    // loop must not remove connections while it walks the index.)
                    let now = *flush_time.get_or_insert_with(Instant::now);
                    let _ = write_queued(conn, &mut self.counters, now);
                    if conn.queue.push_notification(frame.clone(), limit).is_err() {
                        self.slow.push(key);
                        continue;
                    }
                }
                if !conn.dirty {
                    conn.dirty = true;
                    self.dirty.push(key);
                }
            }
        }
        for key in std::mem::take(&mut self.slow) {
            self.close_slow_consumer(key);
        }
    }

    fn close_slow_consumer(&mut self, key: u32) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        if !matches!(conn.phase, Phase::Open(_)) {
            return;
        }
        let dropped = conn.queue.discard_unsent();
        self.counters.failed += dropped as u64 + 1;
        self.counters.slow_consumers += 1;
        debug!("closing a slow consumer");
        self.close_with(key, code::POLICY_VIOLATION, "slow consumer");
    }

    // ---- closing ----

    /// Queues a close frame after whatever is queued, and stops deliveries to the connection.
    fn close_with(&mut self, key: u32, code: u16, reason: &str) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        if matches!(conn.phase, Phase::Closing { .. }) {
            return;
        }
        conn.queue.push_reply(frame::close(code, reason));
        self.mark_dirty(key);
        self.set_phase_closing(key);
    }

    fn set_phase_closing(&mut self, key: u32) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        let deadline = self.now_tick + ticks(CLOSE_LINGER);
        let old = std::mem::replace(&mut conn.phase, Phase::Closing { deadline, fin_sent: false });
        if let Phase::Open(session) = old {
            self.detach(key, &session);
        }
        self.arm(key);
    }

    /// Removes a session from the index and the admission counters.
    fn detach(&mut self, key: u32, session: &Session) {
        if session.personal {
            self.index_remove(&Target::User(session.user.clone()), key);
        }
        for topic in &session.topics {
            self.index_remove(&Target::Topic(topic.clone()), key);
        }
        self.shared.metrics.loops[self.id].connections.fetch_sub(1, Ordering::Relaxed);
        self.shared.release_websocket();
        if self.shared.config.max_connections_per_user != 0 {
            self.shared.per_user.release(&session.user);
        }
    }

    /// Drops a connection now.
    fn remove(&mut self, key: u32) {
        if !self.conns.contains(key as usize) {
            return;
        }
        let mut conn = self.conns.remove(key as usize);
        let _ = self.poll.registry().deregister(&mut conn.stream);
        if conn.timer_tick != NO_TIMER {
            self.wheel.cancel(conn.timer_tick, (key, conn.id));
        }
        if let Phase::Open(session) = conn.phase {
            // The client vanished; what was queued for it is lost.
            let lost = conn.queue.discard_unsent();
            self.counters.failed += lost as u64;
            self.detach(key, &session);
        }
    }

    // ---- index ----

    fn index_add(&mut self, target: Target, key: u32) {
        let keys = self.index.entry(target.clone()).or_default();
        if keys.is_empty() {
            let _ = self.shared.router.send(RouterMsg::Join { loop_id: self.id, target });
        }
        keys.push(key);
    }

    fn index_remove(&mut self, target: &Target, key: u32) {
        let Some(keys) = self.index.get_mut(target) else { return };
        if let Some(i) = keys.iter().position(|k| *k == key) {
            keys.swap_remove(i);
        }
        if keys.is_empty() {
            self.index.remove(target);
            let _ = self.shared.router.send(RouterMsg::Leave { loop_id: self.id, target: target.clone() });
        }
    }

    // ---- writing ----

    fn mark_dirty(&mut self, key: u32) {
        if let Some(conn) = self.conns.get_mut(key as usize) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    fn flush_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for &key in &dirty {
            if let Some(conn) = self.conns.get_mut(key as usize) {
                conn.dirty = false;
                self.flush(key);
            }
        }
        // Reuse the allocation unless flushing re-filled the list.
        if self.dirty.is_empty() {
            let mut dirty = dirty;
            dirty.clear();
            self.dirty = dirty;
        }
    }

    fn flush(&mut self, key: u32) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        let result = if conn.queue.is_empty() {
            // Nothing to write, but a closing connection may still owe its FIN.
            Ok(Flushed::Empty)
        } else {
            write_queued(conn, &mut self.counters, Instant::now())
        };
        match result {
            Err(_) => {
                self.remove(key);
                return;
            }
            Ok(Flushed::Empty) => {
                conn.write_blocked = false;
                if let Phase::Closing { fin_sent, .. } = &mut conn.phase {
                    if !*fin_sent {
                        *fin_sent = true;
                        // FIN after the last byte; reading on until the peer's EOF keeps the
                        // kernel from answering its late bytes with a reset that would
                        // destroy our close frame before it was read.
                        let _ = conn.stream.shutdown(Shutdown::Write);
                    }
                }
            }
            Ok(Flushed::WouldBlock) => conn.write_blocked = true,
            Ok(Flushed::Budget) => {
                conn.write_blocked = false;
                if !conn.dirty {
                    conn.dirty = true;
                    self.dirty.push(key);
                }
            }
        }
        let wanted = conn.interest();
        if wanted != conn.registered {
            conn.registered = wanted;
            if self.poll.registry().reregister(&mut conn.stream, Token(key as usize), wanted).is_err() {
                self.remove(key);
            }
        }
    }

    // ---- commands ----

    fn drain_commands(&mut self) {
        self.handle().wake_pending.store(false, Ordering::Release);
        self.more_commands = false;
        for _ in 0..COMMANDS_PER_PASS {
            let Ok(cmd) = self.inbox.try_recv() else { return };
            match cmd {
                LoopCmd::Deliver { targets, frame, exclusion } => self.deliver(&targets, &frame, &exclusion),
                LoopCmd::Answer { conn, result } => {
                    if self.conns.get(conn.key as usize).is_some_and(|c| c.id == conn.id) {
                        self.finish_publish(conn.key, result);
                    }
                }
                LoopCmd::Disconnect { user, tally } => self.disconnect_user(user, &tally),
                LoopCmd::Shutdown => self.begin_shutdown(),
            }
        }
        self.more_commands = true;
    }

    fn begin_shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let keys: Vec<u32> = self.conns.iter().map(|(k, _)| k as u32).collect();
        for key in keys {
            match self.conns.get(key as usize).map(|c| &c.phase) {
                Some(Phase::Open(_)) => self.close_with(key, code::GOING_AWAY, "server shutdown"),
                Some(Phase::Request { .. }) => {
                    if self.conns.get(key as usize).is_some_and(|c| c.queue.is_empty()) {
                        self.remove(key);
                    } else {
                        self.set_phase_closing(key);
                    }
                }
                _ => {}
            }
        }
    }

    // ---- timers ----

    /// Files the connection's next deadline, unless an earlier entry is already live.
    fn arm(&mut self, key: u32) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        let config = &self.shared.config;
        let at = match &conn.phase {
            Phase::Request { deadline, .. } | Phase::Awaiting { deadline, .. } | Phase::Closing { deadline, .. } => {
                *deadline
            }
            Phase::Open(s) => {
                let mut at = (s.last_ping + ticks(config.ping_interval))
                    .min(s.last_received + ticks(config.idle_timeout))
                    .min(s.expires);
                if s.dialect.json_heartbeat {
                    at = at.min(s.last_data_sent + ticks(config.heartbeat_interval));
                }
                at
            }
        };
        if at < conn.timer_tick {
            if conn.timer_tick != NO_TIMER {
                self.wheel.cancel(conn.timer_tick, (key, conn.id));
            }
            conn.timer_tick = self.wheel.insert(at, (key, conn.id));
        }
    }

    /// After most of a burst of connections has gone, returns the freed heap to the kernel:
    /// glibc keeps freed chunks mapped, so without this a churn peak stays in RSS for good.
    fn trim_after_churn(&mut self) {
        let held = self.conns.len();
        self.peak_connections = self.peak_connections.max(held);
        let emptied = held == 0;
        let due = self.now_tick >= self.last_trim + ticks(TRIM_EVERY);
        if self.peak_connections >= TRIM_MIN_DROP && held * 2 < self.peak_connections && (emptied || due) {
            // SAFETY: malloc_trim only releases free memory inside glibc's allocator, takes its
            // own arena locks, and touches no memory Rust owns.
            unsafe {
                libc::malloc_trim(0);
            }
            self.peak_connections = held;
            self.last_trim = self.now_tick;
        } else if due {
            self.peak_connections = held;
            self.last_trim = self.now_tick;
        }
    }

    fn fire_timers(&mut self) {
        self.trim_after_churn();
        let mut due = std::mem::take(&mut self.due);
        self.wheel.expire(self.now_tick, &mut due);
        for ((key, id), tick) in due.drain(..) {
            let Some(conn) = self.conns.get_mut(key as usize) else { continue };
            if conn.id != id || conn.timer_tick != tick {
                continue;
            }
            conn.timer_tick = NO_TIMER;
            self.on_timer(key);
            self.arm(key);
        }
        self.due = due;
    }

    fn on_timer(&mut self, key: u32) {
        let now = self.now_tick;
        let config = &self.shared.config;
        let (ping_every, idle_after, heartbeat_every) =
            (ticks(config.ping_interval), ticks(config.idle_timeout), ticks(config.heartbeat_interval));
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        match &mut conn.phase {
            Phase::Request { deadline, .. } if now >= *deadline => self.reject(key, Status::REQUEST_TIMEOUT),
            Phase::Awaiting { deadline, .. } if now >= *deadline => {
                self.finish_publish(key, Err("publish timed out".into()));
            }
            Phase::Closing { deadline, .. } if now >= *deadline => {
                if !conn.queue.is_empty() {
                    // The peer would not take even our last bytes (a slow consumer with a
                    // full socket): reset instead of leaving the kernel to trickle megabytes
                    // to a zero window, so the peer learns at once and the buffers are freed.
                    let _ = socket2::SockRef::from(&conn.stream).set_linger(Some(Duration::ZERO));
                }
                self.remove(key);
            }
            Phase::Open(session) => {
                if now >= session.expires {
                    let code = session.dialect.auth_close_code;
                    self.counters.token_expired_closes += 1;
                    self.close_with(key, code, "token expired");
                } else if now >= session.last_received + idle_after {
                    self.counters.idle_closes += 1;
                    self.close_with(key, code::GOING_AWAY, "idle timeout");
                } else {
                    if now >= session.last_ping + ping_every {
                        session.last_ping = now;
                        conn.queue.push_reply(self.ping.clone());
                    }
                    if session.dialect.json_heartbeat && now >= session.last_data_sent + heartbeat_every {
                        session.last_data_sent = now;
                        let beat = format!(
                            "{{\"type\":\"heartbeat\",\"timestamp\":\"{}\"}}",
                            message::rfc3339_millis(std::time::SystemTime::now())
                        );
                        conn.queue.push_reply(frame::reply_text(beat.as_bytes()));
                    }
                    self.mark_dirty(key);
                }
            }
            _ => {}
        }
    }
}

/// Writes a connection's queue (up to the per-wake-up budget), counting each notification
/// whose last byte left as a delivery with its latency.
fn write_queued(conn: &mut Conn, counters: &mut LocalCounters, now: Instant) -> io::Result<Flushed> {
    conn.queue.flush(&mut conn.stream, WRITE_BUDGET, |frame| {
        if let Some(born) = frame.born {
            counters.delivered(now.saturating_duration_since(born));
        }
    })
}

/// How often a loop considers handing freed memory back, and the smallest drop in
/// connections that makes it worth a malloc_trim.
const TRIM_EVERY: Duration = Duration::from_secs(5);
const TRIM_MIN_DROP: usize = 1000;

/// Focus-session messages one connection may relay per second; more are ignored (counted).
const RELAYS_PER_SECOND: u16 = 20;

/// Most topics one connection may hold.
pub const MAX_TOPICS_PER_CONNECTION: usize = 128;
