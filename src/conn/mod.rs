//! One client connection and its phases.
//!
//! A connection starts as an HTTP request being read, may wait for the broker (a publish in
//! Redis mode), becomes a WebSocket [`Session`] after a successful upgrade, and ends in
//! `Closing` (final bytes queued, write side shut after the flush, then dropped). The event
//! loop owns every `Conn`; nothing here does I/O except through the loop's calls.

pub mod inbound;
pub mod send_queue;

use std::net::IpAddr;
use std::sync::Arc;

use mio::Interest;
use mio::net::TcpStream;

use crate::dialect::Dialect;
use inbound::FrameReader;
use send_queue::SendQueue;

/// Timer ticks (see `event_loop::timers`).
pub type Tick = u64;

/// No timer entry is live for this connection.
pub const NO_TIMER: Tick = Tick::MAX;

pub struct Conn {
    pub stream: TcpStream,
    /// Distinguishes this connection from later ones reusing its slab slot.
    pub id: u32,
    pub peer: IpAddr,
    pub phase: Phase,
    pub queue: SendQueue,
    /// Interest currently registered with the poller.
    pub registered: Interest,
    /// The last write hit WouldBlock; WRITABLE interest is needed.
    pub write_blocked: bool,
    /// Listed in the loop's to-flush list.
    pub dirty: bool,
    /// Tick of this connection's live timer entry, or `NO_TIMER`.
    pub timer_tick: Tick,
    /// Sequence number of the last delivery queued here, so a message addressed to several
    /// targets reaches a connection once.
    pub delivery_seq: u32,
    /// Accepted and not (yet) upgraded: counts against the loop's cap on plain HTTP
    /// connections, so unauthenticated sockets cannot take every file descriptor.
    pub plain: bool,
}

/// Output bytes above which herald stops reading a peer until it has read what it was sent:
/// replies (HTTP responses, pongs, errors) answer input, so this bounds what any input can
/// make herald hold for one connection.
pub const OUTPUT_PAUSE_BYTES: usize = 64 * 1024;
/// HTTP responses queued and unsent above which pipelined requests wait.
pub const MAX_PIPELINED: usize = 16;

impl Conn {
    /// Reading waits while the peer has not taken enough of what it was sent. Derived from the
    /// queue alone, so there is no flag to keep in step.
    pub fn input_paused(&self) -> bool {
        self.queue.bytes() >= OUTPUT_PAUSE_BYTES
            || (matches!(self.phase, Phase::Request { .. }) && self.queue.len() >= MAX_PIPELINED)
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
}

pub enum Phase {
    /// Reading an HTTP request (also between keep-alive requests). `served` counts the
    /// requests answered on this connection so far.
    Request { buf: Vec<u8>, deadline: Tick, served: u16 },
    /// A request was handed to the broker; reading pauses until the answer arrives.
    Awaiting { buf: Vec<u8>, keep_alive: bool, deadline: Tick, served: u16, respond: crate::http::publish::Responder },
    /// An upgraded WebSocket.
    Open(Box<Session>),
    /// Last bytes queued; after they are written the write side is shut, and the
    /// connection is dropped at the peer's EOF or at `deadline`.
    Closing { deadline: Tick, fin_sent: bool },
}

/// A live WebSocket.
pub struct Session {
    pub user: Arc<str>,
    pub dialect: &'static Dialect,
    /// Topics this connection receives. On a topic path (`personal` false) the first entry is
    /// the path's own topic, set at the upgrade and never removed: relays go there and only
    /// there. Later entries are runtime subscriptions.
    pub topics: Vec<Arc<str>>,
    /// The token's `topics` claim, for runtime subscriptions.
    pub allowed_topics: Box<[String]>,
    pub expires: Tick,
    pub last_received: Tick,
    pub last_ping: Tick,
    /// Last data message queued (seed 000 heartbeats count silence from here).
    pub last_data_sent: Tick,
    /// Receives the user's personal stream (false on a topic-only path).
    pub personal: bool,
    /// Second (in ticks / 10) of the relay rate window, and relays sent in it.
    pub relay_window: Tick,
    pub relays_in_window: u16,
    pub reader: FrameReader,
}

impl Session {
    /// The topic a topic path was opened for, fixed for the connection's life.
    pub fn path_topic(&self) -> Option<&Arc<str>> {
        if self.personal { None } else { self.topics.first() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_state_stays_small() {
        // Memory per idle connection decides how many fit on a host; see README "Performance".
        eprintln!("Conn {} Session {} Phase {}", size_of::<Conn>(), size_of::<Session>(), size_of::<Phase>());
        assert!(size_of::<Conn>() <= 152, "Conn grew to {} bytes", size_of::<Conn>());
        assert!(size_of::<Session>() <= 120, "Session grew to {} bytes", size_of::<Session>());
    }
}
