//! An event-loop thread: its own poller, listener, connections, index and timers.
//!
//! No other thread touches a connection: others reach a loop only through its mailbox. One
//! pass of the loop: flush every connection with pending output, poll, handle socket events,
//! resume connections whose input waited, drain commands, fire due timers, fold counters into
//! the shared metrics. Each concern lives in its own file:
//!
//! | file | concern |
//! |---|---|
//! | `accept.rs` | accepting, the plain-connection cap, the per-IP rate |
//! | `read.rs` | reading sockets, backpressure, EOF |
//! | `requests.rs` | HTTP requests: answering, parking, publishing, disconnecting |
//! | `websocket.rs` | upgrades and client messages (subscriptions, relays) |
//! | `sse.rs` | opening Server-Sent Events streams |
//! | `deliver.rs` | notifications into send queues, slow consumers |
//! | `output.rs` | flushing queues with writev |
//! | `close.rs` | closing and removing connections, shutdown |
//! | `deadlines.rs` | timers: handshakes, keepalive, expiry, linger; memory trims |
//! | `commands.rs` | the mailbox |
//! | `index.rs`, `timers.rs` | the loop's data structures |

mod accept;
#[doc(hidden)]
pub mod bench;
mod close;
mod commands;
mod deadlines;
mod deliver;
pub mod index;
mod output;
mod read;
mod replay;
mod requests;
mod sse;
pub mod timers;
mod websocket;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tracing::warn;

use crate::broker::LoopLink;
use crate::conn::{Conn, Timeouts};
use crate::frame::{self, SharedFrame};
use crate::ids::{Answer, ReplyTo, StreamPos, Target};
use crate::mailbox::{LoopCmd, WAKER};
use crate::message::JsonScratch;
use crate::metrics::LocalCounters;
use crate::shared::Shared;
use crate::tick::{Clock, Tick, ticks};
use index::Index;
use timers::TimerWheel;

const LISTENER: Token = Token(usize::MAX - 1);

pub struct EventLoop {
    id: usize,
    shared: Arc<Shared>,
    poll: Poll,
    listener: Option<TcpListener>,
    inbox: Receiver<LoopCmd>,
    conns: Slab<Conn>,
    /// Which connections of this loop receive each user's and topic's messages.
    index: Index,
    wheel: TimerWheel,
    clock: Clock,
    timeouts: Timeouts,
    now: Instant,
    now_tick: Tick,
    /// Connections with output to flush before the next poll.
    dirty: Vec<u32>,
    /// Connections to read again: cut short for fairness, or output drained below its bound.
    reread: Vec<u32>,
    /// Slow consumers found during a delivery, closed once it is done.
    slow: Vec<u32>,
    due: Vec<(timers::Entry, Tick)>,
    read_buf: Vec<u8>,
    /// Plaintext of the TLS records one read brought (reused).
    tls_plain: Vec<u8>,
    json: JsonScratch,
    counters: LocalCounters,
    next_conn_id: u32,
    /// The connections of the delivery in progress (reused: deliveries allocate nothing).
    delivery_keys: Vec<u32>,
    ping: SharedFrame,
    more_commands: bool,
    /// This loop's own link to the broker (a Redis publishing connection), and whether its
    /// socket had an event in this poll.
    link: LoopLink,
    link_ready: bool,
    /// Answers the link brought in a pass (reused).
    link_answers: Vec<(ReplyTo, Answer)>,
    /// Socket events of this poll not handled yet: more deliveries may be on their way.
    more_events: bool,
    /// The request being served is not the last one its connection sent.
    more_input: bool,
    accept_paused_until: Option<Instant>,
    last_accept_warning: Option<Instant>,
    shutting_down: bool,
    /// The WebSockets still to close while draining, and the schedule they close on.
    drain: Option<close::Drain>,
    /// Most connections held since memory was last handed back, and when that was.
    peak_connections: usize,
    last_trim: Tick,
    /// Connections held at the last trim.
    held_at_trim: usize,
    /// Bytes of replies written or discarded since the last trim: memory freed back to malloc.
    released_bytes: usize,
    /// Plain (not upgraded) connections in accept order, oldest first; entries for
    /// connections that upgraded or closed since are skipped when met.
    plain_order: VecDeque<(u32, u32)>,
    /// Live plain connections on this loop; at the cap the oldest is evicted.
    plain_count: usize,
    /// Resumes in progress, by connection and stream: few at a time, empty most of the time
    /// (deliveries check it only when it is not).
    replays: HashMap<(u32, Target), replay::Replay>,
    /// Resumes just done: the last position each replayed, until live delivery has passed it.
    replay_floors: HashMap<(u32, Target), StreamPos>,
}

/// Size of the loop's shared read buffer.
const READ_CHUNK: usize = 64 * 1024;
/// How long a closing connection may take to read our last bytes and hang up.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

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
        let link = shared.broker.loop_link(id);
        let config = &shared.config;
        let timeouts = Timeouts {
            ping: ticks(config.ping_interval),
            idle: ticks(config.idle_timeout),
            heartbeat: ticks(config.heartbeat_interval),
            handshake: ticks(config.handshake_timeout),
            close_linger: ticks(CLOSE_LINGER),
            ticks_per_second: ticks(Duration::from_secs(1)),
        };
        Ok(EventLoop {
            id,
            shared,
            poll,
            listener: Some(listener),
            inbox,
            conns: Slab::new(),
            index: Index::default(),
            wheel: TimerWheel::default(),
            clock: Clock::new(now),
            timeouts,
            now,
            now_tick: 0,
            dirty: Vec::new(),
            reread: Vec::new(),
            slow: Vec::new(),
            due: Vec::new(),
            read_buf: vec![0; READ_CHUNK],
            tls_plain: Vec::new(),
            json: JsonScratch::default(),
            counters: LocalCounters::default(),
            next_conn_id: 0,
            delivery_keys: Vec::new(),
            ping: frame::ping(),
            more_commands: false,
            link,
            link_ready: false,
            link_answers: Vec::new(),
            more_events: false,
            more_input: false,
            accept_paused_until: None,
            last_accept_warning: None,
            shutting_down: false,
            drain: None,
            peak_connections: 0,
            last_trim: 0,
            held_at_trim: 0,
            released_bytes: 0,
            plain_order: VecDeque::new(),
            plain_count: 0,
            replays: HashMap::new(),
            replay_floors: HashMap::new(),
        })
    }

    /// Runs until shutdown has closed every connection.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            self.drive_link();
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
            let mut ready = events.iter().peekable();
            while let Some(event) = ready.next() {
                self.more_events = ready.peek().is_some();
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    LoopLink::TOKEN => self.link_ready = true,
                    Token(key) => {
                        let key = key as u32;
                        if event.is_writable() {
                            self.flush(key);
                            if !self.replays.is_empty() {
                                // What the kernel took makes room for more of a replay.
                                self.pump_all(key);
                            }
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.on_readable(key);
                        }
                    }
                }
            }
            self.more_events = false;
            self.resume_accepting();
            for key in std::mem::take(&mut self.reread) {
                self.resume_input(key);
            }
            self.drain_commands();
            self.drain_step();
            self.fire_timers();
            self.shared.metrics.loops[self.id].absorb(&mut self.counters);
        }
    }

    /// Writes what this pass published on the loop's own Redis link, and answers the requests
    /// whose replies it read.
    fn drive_link(&mut self) {
        let readable = std::mem::take(&mut self.link_ready);
        let mut answers = std::mem::take(&mut self.link_answers);
        self.link.drive(self.poll.registry(), readable, &mut answers);
        for (reply, answer) in answers.drain(..) {
            self.on_answer(reply.conn, answer);
        }
        self.link_answers = answers;
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.dirty.is_empty() || !self.reread.is_empty() || self.more_commands {
            return Some(Duration::ZERO);
        }
        let mut timeout: Option<Duration> = None;
        let mut at_most = |wait: Duration| timeout = Some(timeout.map_or(wait, |t: Duration| t.min(wait)));
        if !self.wheel.is_empty() {
            at_most(self.clock.instant_of(self.now_tick + 1).saturating_duration_since(Instant::now()));
        }
        if let Some(at) = self.link.next_deadline() {
            at_most(at.saturating_duration_since(Instant::now()));
        }
        if let Some(at) = self.accept_paused_until {
            at_most(at.saturating_duration_since(Instant::now()));
        }
        if let Some(drain) = &self.drain {
            at_most(drain.next_step(Instant::now()));
        }
        if self.trim_pending() {
            // Wake up to hand freed memory back even if nothing else happens.
            at_most(deadlines::TRIM_MIN_GAP);
        }
        timeout
    }

    fn publish_gauges(&self) {
        let m = &self.shared.metrics.loops[self.id];
        m.slab_entries.store(self.conns.len() as u64, Ordering::Relaxed);
        m.index_entries.store(self.index.targets() as u64, Ordering::Relaxed);
    }
}
