//! Server-Sent Events streams. Once open, an event stream is an ordinary [`Session`] in the
//! loop's index (reached by its user and its topics, counted, disconnected, drained and shut
//! down like any other); what differs is carried by its dialect ([`EVENT_STREAM`]): the
//! event-stream form of each notification (`deliver.rs`), comment keepalives and no close
//! frame (`deadlines.rs`, `close.rs`), and input that is never read as messages (`read.rs`).
//!
//! An event-stream client cannot answer a ping, so "nothing arrived for the idle timeout"
//! cannot find a dead one. Instead:
//! * its idle deadline means "output stuck": nothing written for the idle timeout while
//!   something waited (the client stopped reading, or is gone with a full window); closed as
//!   stalled, like a WebSocket that stopped reading;
//! * TCP_USER_TIMEOUT makes the kernel fail the socket when what it sent (a ping at least)
//!   stays unacknowledged for the idle timeout plus a ping interval: a peer that vanished
//!   without a FIN, whose pings still move into the kernel's buffer, costs its slot for at most
//!   about two ping intervals and an idle timeout, not the kernel's ~15 minutes of
//!   retransmissions. (The extra ping interval lets the rule above, which counts and names the
//!   close, come first for a live peer that stopped reading: Linux applies the same timeout
//!   to a zero window.)
//! * the slow-consumer rule (a full send queue while the socket is full) holds as everywhere.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use tracing::debug;

use super::EventLoop;
use crate::conn::{Membership, NO_NODE, Phase, Session, Topics};
use crate::dialect::EVENT_STREAM;
use crate::frame::{self, SharedFrame};
use crate::history::Since;
use crate::http::sse::Open;
use crate::ids::Target;
use crate::metrics::LocalCounters;

impl EventLoop {
    /// Starts an admitted event stream: the head is queued, the session indexed under its user
    /// and topics (and the route table told) before the head can be flushed, so anything
    /// published after the client sees the 200 arrives. With exact Redis subscriptions the
    /// head waits for Redis to confirm them, as a 101 does.
    pub(super) fn open_event_stream(&mut self, key: u32, open: Open) {
        let Open { identity, topics, since, head } = open;
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        if !matches!(conn.phase, Phase::Http(_)) {
            return;
        }
        conn.queue.push_reply(frame::raw(head));
        // An event stream is one-way: bytes the client sent after its request are never
        // served (they go with the HTTP state this replaces).
        let config = &self.shared.config;
        limit_unacknowledged_time(conn, config.idle_timeout.saturating_add(config.ping_interval));
        self.mark_dirty(key);
        self.leave_plain(key);
        let now = self.now_tick;
        let mut session = Session {
            user: Target::user(&identity.user),
            dialect_id: EVENT_STREAM.id,
            awaiting_subscriptions: 0,
            // No runtime subscriptions on an event stream: what it holds is all it needs.
            topics: (!topics.is_empty())
                .then(|| Box::new(Topics { held: Vec::with_capacity(topics.len()), ..Topics::default() })),
            reader: Default::default(),
            user_node: NO_NODE,
            expires: crate::auth::expiry_tick(identity.exp, SystemTime::now(), now),
            last_received: now,
            last_ping: now,
            last_data_sent: now,
        };
        let (node, wait) = self.index_add(&session.user.clone(), key);
        session.user_node = node;
        session.awaiting_subscriptions += u8::from(wait);
        for topic in &topics {
            let topic = Target::topic(topic);
            let (node, wait) = self.index_add(&topic, key);
            // At most MAX_TOPICS_PER_CONNECTION + 1 waits (the route checked): no overflow.
            session.awaiting_subscriptions = session.awaiting_subscriptions.saturating_add(u8::from(wait));
            if let Some(state) = session.topics.as_mut() {
                state.held.push(Membership { topic, node });
            }
        }
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        conn.phase = Phase::Open(session);
        let metrics = &self.shared.metrics.loops[self.id];
        metrics.connections.fetch_add(1, Ordering::Relaxed);
        metrics.event_streams.fetch_add(1, Ordering::Relaxed);
        debug!(topics = topics.len(), resume = since.is_some(), "event stream opened");
        // `Last-Event-ID` / `since` resumes the user's stream, as `since` does on the
        // WebSocket's personal path: through the same replay, so replay then live has no gap
        // and no duplicate. Topics start live. Without history nothing is replayed.
        if let Some(since) = since.filter(|_| self.shared.broker.history_enabled()) {
            self.start_replay(key, Target::user(&identity.user), Since::parse(&since));
        }
        self.arm(key);
    }
}

/// The form of `frame` an event stream receives: encoded by the first event stream a
/// notification reaches (counted), shared by all the others on every loop. `users_stream`
/// says whether the frame reaches the stream as its user's own notification (with an `id:`
/// line) or as a topic's (without).
pub(super) fn event_form<'a>(
    frame: &'a SharedFrame,
    users_stream: bool,
    counters: &mut LocalCounters,
) -> &'a SharedFrame {
    let (event, built) = frame.event_stream_form(users_stream);
    counters.events_encoded += u64::from(built);
    event
}

/// Makes the kernel fail the socket once data it sent has gone unacknowledged for `limit`.
#[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
fn limit_unacknowledged_time(conn: &crate::conn::Conn, limit: std::time::Duration) {
    // Best effort: without it a vanished peer lasts until the kernel gives up on its own.
    let _ = socket2::SockRef::from(&conn.stream).set_tcp_user_timeout(Some(limit));
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "fuchsia")))]
fn limit_unacknowledged_time(_: &crate::conn::Conn, _: std::time::Duration) {}
