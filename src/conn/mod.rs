//! One client connection, its phases, and the policy that decides its deadlines.
//!
//! A connection starts as HTTP (requests read, possibly one parked while another thread
//! answers it), becomes a WebSocket [`Session`] after a successful upgrade, and ends in
//! `Closing` (final bytes queued, write side shut after the flush, then dropped). The event
//! loop owns every `Conn` and does the I/O; the decisions here take `now` as an argument and
//! touch no socket and no clock, so they are unit-tested without either.

pub mod inbound;
pub mod send_queue;

use mio::Interest;
use mio::net::TcpStream;
use std::net::IpAddr;

use crate::dialect::Dialect;
use crate::http::publish::Responder;
use crate::ids::Target;
use inbound::FrameReader;
use send_queue::SendQueue;

pub use crate::tick::Tick;

/// No timer entry is live for this connection.
pub const NO_TIMER: Tick = Tick::MAX;

/// No index node (see `event_loop::index`).
pub const NO_NODE: u32 = u32::MAX;

/// Output bytes above which herald stops reading a peer until it has read what it was sent:
/// replies (HTTP responses, pongs, errors) answer input, so this bounds what any input can
/// make herald hold for one connection.
pub const OUTPUT_PAUSE_BYTES: usize = 64 * 1024;
/// HTTP responses queued and unsent above which pipelined requests wait.
pub const MAX_PIPELINED: usize = 16;
/// Requests answered on one keep-alive connection before it is closed (as nginx's
/// `keepalive_requests`): a connection cannot be held forever by a trickle of requests.
pub const MAX_KEEPALIVE_REQUESTS: u16 = 1000;

pub struct Conn {
    pub stream: TcpStream,
    /// The TLS session when the port serves TLS; everything read and written goes through it.
    pub tls: Option<Box<crate::tls::Session>>,
    /// Distinguishes this connection from later ones reusing its slab slot.
    pub id: u32,
    pub phase: Phase,
    pub queue: SendQueue,
    /// Tick of this connection's live timer entry, or `NO_TIMER`.
    pub timer_tick: Tick,
    /// Interest currently registered with the poller.
    pub registered: Interest,
    /// The last write hit WouldBlock; WRITABLE interest is needed.
    pub write_blocked: bool,
    /// Listed in the loop's to-flush list.
    pub dirty: bool,
    /// Accepted and not (yet) upgraded: counts against the loop's cap on plain HTTP
    /// connections, so unauthenticated sockets cannot take every file descriptor.
    pub plain: bool,
}

impl Conn {
    /// Output is held while the session waits for its subscriptions (see
    /// [`Session::awaiting_subscriptions`]).
    pub fn output_held(&self) -> bool {
        matches!(&self.phase, Phase::Open(session) if session.awaiting_subscriptions > 0)
    }

    /// Reading waits while the peer has not taken enough of what it was sent, or while a
    /// request of its waits for an answer. Derived from state alone: no flag to keep in step.
    pub fn input_paused(&self) -> bool {
        self.queue.bytes() >= OUTPUT_PAUSE_BYTES
            || match &self.phase {
                Phase::Http(http) => http.waiting.is_some() || self.queue.len() >= MAX_PIPELINED,
                _ => false,
            }
    }

    /// Whether anything waits to be written: queued frames, or TLS records the socket did not
    /// take yet.
    pub fn has_output(&self) -> bool {
        !self.queue.is_empty() || self.tls.as_ref().is_some_and(|t| !t.pending_output().is_empty())
    }

    /// Interest follows from state: readable always, writable only while output is blocked.
    pub fn interest(&self) -> Interest {
        if self.write_blocked { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE }
    }

    pub fn session(&self) -> Option<&Session> {
        match &self.phase {
            Phase::Open(session) => Some(session),
            _ => None,
        }
    }

    /// When this connection next needs the loop's attention.
    pub fn deadline(&self, timeouts: &Timeouts) -> Tick {
        match &self.phase {
            Phase::Http(http) => http.deadline,
            Phase::Open(session) => session.next_deadline(timeouts),
            Phase::Closing { deadline, .. } => *deadline,
        }
    }
}

pub enum Phase {
    /// HTTP/1.1 on the WebSocket port: keep-alive requests, possibly pipelined.
    Http(Box<Http>),
    /// An upgraded WebSocket (inline: most connections are in this phase, and a box would
    /// cost them an allocation's overhead and a pointer).
    Open(Session),
    /// Last bytes queued; after they are written the write side is shut, and the
    /// connection is dropped at the peer's EOF or at `deadline`.
    Closing { deadline: Tick, fin_sent: bool },
}

/// A connection before (or instead of) a WebSocket upgrade.
pub struct Http {
    /// Bytes received and not yet parsed into a request.
    pub buf: Vec<u8>,
    /// The current request must be complete by then.
    pub deadline: Tick,
    /// Requests answered on this connection so far.
    pub served: u16,
    pub peer: IpAddr,
    /// Set while a request waits for another thread's answer; reading pauses meanwhile.
    pub waiting: Option<Waiting>,
}

/// A request handed to another thread (a Redis publish, a disconnect on every loop).
#[derive(Debug, Clone)]
pub struct Waiting {
    pub keep_alive: bool,
    pub respond: Responder,
}

impl Http {
    pub fn new(peer: IpAddr, deadline: Tick) -> Http {
        Http { buf: Vec::new(), deadline, served: 0, peer, waiting: None }
    }

    /// Counts one more request; returns whether it must be the last on this connection.
    pub fn count_request(&mut self) -> bool {
        self.served = self.served.saturating_add(1);
        self.served >= MAX_KEEPALIVE_REQUESTS
    }

    /// Parks the current request until its answer arrives (at most until `deadline`).
    pub fn wait(&mut self, waiting: Waiting, deadline: Tick) {
        self.waiting = Some(waiting);
        self.deadline = deadline;
    }

    /// The answer came: the request is no longer parked.
    pub fn answered(&mut self) -> Option<Waiting> {
        self.waiting.take()
    }
}

/// A connection's membership in a topic: the topic and its node in the loop's index.
#[derive(Debug, Clone)]
pub struct Membership {
    pub topic: Target,
    pub node: u32,
}

/// A live WebSocket.
pub struct Session {
    /// The token's user (also this connection's index key on a personal path).
    pub user: Target,
    /// What a connection with topics holds; `None` for the many that have none and may
    /// subscribe to none.
    pub topics: Option<Box<Topics>>,
    pub reader: FrameReader,
    /// Index node of the user's personal stream, or `NO_NODE` on a topic-only path.
    pub user_node: u32,
    /// The path's dialect, by [`Dialect::id`] (a byte, not a pointer: sessions are many).
    pub dialect_id: u8,
    /// Exact subscriptions this session waits for Redis to confirm; its output is held
    /// until none is left, so nothing published after the client hears from us is missed.
    pub awaiting_subscriptions: u8,
    pub expires: Tick,
    pub last_received: Tick,
    pub last_ping: Tick,
    /// Last data message queued (seed 000 heartbeats count silence from here).
    pub last_data_sent: Tick,
}

/// A session's topics: what it receives, what its token allows, and its relay allowance.
#[derive(Debug, Default)]
pub struct Topics {
    /// On a topic path the first entry is the path's own topic, set at the upgrade and never
    /// removed: relays go there and only there. Later entries are runtime subscriptions.
    pub held: Vec<Membership>,
    /// The token's `topics` claim, for runtime subscriptions.
    pub allowed: Box<[String]>,
    /// The one-second window of the relay rate (in ticks / ticks-per-second), and relays
    /// sent in it.
    pub relay_window: Tick,
    pub relays_in_window: u16,
}

/// The connection timeouts, in ticks.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub ping: Tick,
    pub idle: Tick,
    pub heartbeat: Tick,
    pub handshake: Tick,
    pub close_linger: Tick,
    pub ticks_per_second: Tick,
}

/// What a session's deadline means when it comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// The token reached `exp`.
    Expired,
    /// Nothing (not even a pong) arrived for the idle timeout.
    Idle,
    /// Time for a Ping frame and/or a seed-000 JSON heartbeat.
    Keepalive { ping: bool, heartbeat: bool },
    /// A stale timer: nothing to do.
    Nothing,
}

/// Focus-session messages one connection may relay per second; more are ignored (counted).
pub const RELAYS_PER_SECOND: u16 = 20;

impl Session {
    pub fn dialect(&self) -> &'static Dialect {
        Dialect::by_id(self.dialect_id)
    }

    /// The topic a topic path was opened for, fixed for the connection's life.
    pub fn path_topic(&self) -> Option<&Target> {
        if self.user_node == NO_NODE { self.held().first().map(|m| &m.topic) } else { None }
    }

    /// The topics this connection receives.
    pub fn held(&self) -> &[Membership] {
        self.topics.as_ref().map_or(&[], |t| &t.held)
    }

    /// Whether the connection receives the user's personal stream.
    pub fn personal(&self) -> bool {
        self.user_node != NO_NODE
    }

    pub fn next_deadline(&self, t: &Timeouts) -> Tick {
        let mut at =
            self.last_ping.saturating_add(t.ping).min(self.last_received.saturating_add(t.idle)).min(self.expires);
        if self.dialect().json_heartbeat {
            at = at.min(self.last_data_sent.saturating_add(t.heartbeat));
        }
        at
    }

    /// Decides what is due at `now`, and records a ping or heartbeat as sent.
    pub fn due(&mut self, now: Tick, t: &Timeouts) -> Due {
        if now >= self.expires {
            return Due::Expired;
        }
        if now >= self.last_received.saturating_add(t.idle) {
            return Due::Idle;
        }
        let ping = now >= self.last_ping.saturating_add(t.ping);
        let heartbeat = self.dialect().json_heartbeat && now >= self.last_data_sent.saturating_add(t.heartbeat);
        if ping {
            self.last_ping = now;
        }
        if heartbeat {
            self.last_data_sent = now;
        }
        if ping || heartbeat { Due::Keepalive { ping, heartbeat } } else { Due::Nothing }
    }

    /// Takes one relay from this second's allowance; `false` when it is used up (or the
    /// session has no topic to relay to).
    pub fn take_relay(&mut self, now: Tick, t: &Timeouts) -> bool {
        let Some(topics) = self.topics.as_mut() else { return false };
        let window = now / t.ticks_per_second.max(1);
        if topics.relay_window != window {
            topics.relay_window = window;
            topics.relays_in_window = 0;
        }
        if topics.relays_in_window >= RELAYS_PER_SECOND {
            return false;
        }
        topics.relays_in_window += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect;

    const T: Timeouts =
        Timeouts { ping: 300, idle: 600, heartbeat: 300, handshake: 100, close_linger: 20, ticks_per_second: 10 };

    fn session(dialect: &'static Dialect, expires: Tick) -> Session {
        Session {
            user: Target::user("u"),
            dialect_id: dialect.id,
            awaiting_subscriptions: 0,
            topics: None,
            reader: FrameReader::default(),
            user_node: 0,
            expires,
            last_received: 0,
            last_ping: 0,
            last_data_sent: 0,
        }
    }

    #[test]
    fn connection_state_stays_small() {
        // Memory per idle connection decides how many fit on a host; see README "Performance".
        eprintln!("Conn {} Session {} Phase {}", size_of::<Conn>(), size_of::<Session>(), size_of::<Phase>());
        assert!(size_of::<Session>() <= 64, "Session grew to {} bytes", size_of::<Session>());
        // Release builds; mio's TcpStream carries 12 more bytes in debug builds.
        let conn = size_of::<Conn>() - if cfg!(debug_assertions) { 16 } else { 0 };
        assert!(conn <= 96, "Conn grew to {conn} bytes");
    }

    #[test]
    fn keepalive_expiry_and_idle_come_in_their_order() {
        let mut s = session(&dialect::SEED_003, 10_000);
        assert_eq!(s.next_deadline(&T), 300);
        assert_eq!(s.due(299, &T), Due::Nothing);
        assert_eq!(s.due(300, &T), Due::Keepalive { ping: true, heartbeat: false });
        assert_eq!(s.next_deadline(&T), 600, "idle comes before the next ping");
        s.last_received = 350;
        assert_eq!(s.next_deadline(&T), 600, "the next ping");
        assert_eq!(s.due(950, &T), Due::Idle);
        s.last_received = 9_990;
        assert_eq!(s.due(10_000, &T), Due::Expired, "expiry wins over everything");
    }

    #[test]
    fn seed_000_heartbeats_count_silence_from_the_last_data_message() {
        let mut s = session(&dialect::SEED_000, Tick::MAX);
        s.last_ping = 200;
        s.last_data_sent = 100;
        assert_eq!(s.next_deadline(&T), 400);
        assert_eq!(s.due(400, &T), Due::Keepalive { ping: false, heartbeat: true });
        assert_eq!(s.last_data_sent, 400);
        assert_eq!(s.next_deadline(&T), 500, "the ping now");
    }

    #[test]
    fn deadlines_saturate_instead_of_overflowing() {
        let mut s = session(&dialect::SEED_000, Tick::MAX);
        s.last_received = Tick::MAX - 1;
        s.last_ping = Tick::MAX - 1;
        s.last_data_sent = Tick::MAX - 1;
        assert_eq!(s.next_deadline(&T), Tick::MAX);
        assert_eq!(s.due(Tick::MAX - 1, &T), Due::Nothing);
    }

    #[test]
    fn relays_are_limited_per_second() {
        let mut s = session(&dialect::FOCUS_SESSION, Tick::MAX);
        assert!(!s.take_relay(5, &T), "no topic, nowhere to relay");
        s.topics = Some(Box::default());
        let allowed = (0..30).filter(|_| s.take_relay(5, &T)).count();
        assert_eq!(allowed, RELAYS_PER_SECOND as usize);
        assert!(s.take_relay(10, &T), "a new second, a new allowance");
    }

    #[test]
    fn requests_on_one_connection_are_counted_and_capped() {
        let mut http = Http::new("127.0.0.1".parse().unwrap(), 5);
        for _ in 1..MAX_KEEPALIVE_REQUESTS {
            assert!(!http.count_request());
        }
        assert!(http.count_request(), "the last allowed request closes the connection");
        http.wait(Waiting { keep_alive: true, respond: Responder::Sent }, 9);
        assert_eq!(http.deadline, 9);
        assert!(http.answered().is_some());
        assert!(http.answered().is_none());
    }
}
