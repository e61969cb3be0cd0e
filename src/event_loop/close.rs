//! Ending connections: a close frame queued behind what is pending (then FIN after the flush,
//! then removal at the peer's EOF or the linger deadline), an immediate reset, and shutdown.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::EventLoop;
use crate::conn::{NO_TIMER, Phase, Session};
use crate::frame::{self, code};

impl EventLoop {
    /// Queues a close frame after whatever is queued, and stops deliveries to the connection.
    pub(super) fn close_with(&mut self, key: u32, code: u16, reason: &str) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        if matches!(conn.phase, Phase::Closing { .. }) {
            return;
        }
        let last = match &conn.phase {
            Phase::Open(session) if session.is_event_stream() => frame::event_stream_close(reason),
            _ => frame::close(code, reason),
        };
        conn.queue.push_reply(last);
        self.mark_dirty(key);
        self.set_phase_closing(key);
    }

    pub(super) fn set_phase_closing(&mut self, key: u32) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        let deadline = self.now_tick.saturating_add(self.timeouts.close_linger);
        let old = std::mem::replace(&mut conn.phase, Phase::Closing { deadline, fin_sent: false });
        if let Phase::Open(session) = old {
            self.detach(key, &session);
        }
        self.arm(key);
    }

    /// Removes a session from the index, the route table and admission.
    fn detach(&mut self, key: u32, session: &Session) {
        self.drop_replays(key);
        if session.personal() {
            self.index_remove(&session.user, session.user_node);
        }
        for membership in session.held() {
            self.index_remove(&membership.topic, membership.node);
        }
        self.shared.metrics.loops[self.id].connections.fetch_sub(1, Ordering::Relaxed);
        if session.is_event_stream() {
            self.shared.metrics.loops[self.id].event_streams.fetch_sub(1, Ordering::Relaxed);
        }
        let connections = self.shared.admission.release(&self.shared.routing.table, session.user.name());
        self.shared.broker.presence_changed(session.user.name(), connections, false, &self.shared.metrics);
    }

    /// Drops a connection now.
    pub(super) fn remove(&mut self, key: u32) {
        if !self.conns.contains(key as usize) {
            return;
        }
        self.leave_plain(key);
        let mut conn = self.conns.remove(key as usize);
        self.released_bytes += conn.queue.bytes();
        let _ = self.poll.registry().deregister(&mut conn.stream);
        if conn.timer_tick != NO_TIMER {
            self.wheel.cancel(conn.timer_tick, (key, conn.id));
        }
        if let Phase::Open(session) = conn.phase {
            // The client vanished; what was queued for it is lost.
            let lost = conn.queue.discard_unsent();
            self.counters.failed += lost.notifications as u64;
            self.detach(key, &session);
        }
    }

    /// Drops a connection with a reset: for peers that would not take even our last bytes,
    /// so the kernel does not trickle them to a zero window and the peer learns at once.
    pub(super) fn reset(&mut self, key: u32) {
        if let Some(conn) = self.conns.get(key as usize) {
            let _ = socket2::SockRef::from(&conn.stream).set_linger(Some(Duration::ZERO));
        }
        self.remove(key);
    }

    /// Starts closing every WebSocket held now, evenly spread until `until`.
    pub(super) fn begin_drain(&mut self, until: Instant) {
        let open: Vec<(u32, u32)> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.phase, Phase::Open(_)))
            .map(|(k, c)| (k as u32, c.id))
            .collect();
        self.drain = Some(Drain::new(open, Instant::now(), until));
    }

    /// Closes the WebSockets the drain schedule says are due by now.
    pub(super) fn drain_step(&mut self) {
        let Some(drain) = self.drain.as_mut() else { return };
        let due = drain.due(Instant::now());
        let batch: Vec<(u32, u32)> = drain.remaining.drain(..due.min(drain.remaining.len())).collect();
        if drain.remaining.is_empty() {
            self.drain = None;
        }
        for (key, id) in batch {
            if self.conns.get(key as usize).is_some_and(|c| c.id == id) {
                self.close_with(key, code::GOING_AWAY, "server shutdown");
            }
        }
    }

    pub(super) fn begin_shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let keys: Vec<u32> = self.conns.iter().map(|(k, _)| k as u32).collect();
        for key in keys {
            match self.conns.get(key as usize).map(|c| (&c.phase, !c.has_output())) {
                Some((Phase::Open(_), _)) => self.close_with(key, code::GOING_AWAY, "server shutdown"),
                Some((Phase::Http(_), true)) => self.remove(key),
                Some((Phase::Http(_), false)) => self.set_phase_closing(key),
                _ => {}
            }
        }
    }
}

/// Closes spread evenly over a period: at any moment, the share of connections closed is the
/// share of the period gone by.
#[derive(Debug)]
pub(super) struct Drain {
    /// Connections (slab key, id) not yet closed, in the order they will be.
    remaining: Vec<(u32, u32)>,
    total: usize,
    start: Instant,
    until: Instant,
}

/// How often a drain closes its next batch.
const DRAIN_STEP: Duration = Duration::from_millis(20);

impl Drain {
    fn new(remaining: Vec<(u32, u32)>, start: Instant, until: Instant) -> Drain {
        Drain { total: remaining.len(), remaining, start, until }
    }

    /// How many of the remaining connections are due to close at `now`.
    fn due(&self, now: Instant) -> usize {
        let period = self.until.saturating_duration_since(self.start).as_secs_f64();
        let share = if period == 0.0 {
            1.0
        } else {
            (now.saturating_duration_since(self.start).as_secs_f64() / period).min(1.0)
        };
        let closed = self.total - self.remaining.len();
        ((share * self.total as f64).ceil() as usize).saturating_sub(closed)
    }

    /// How long until the next batch.
    pub(super) fn next_step(&self, now: Instant) -> Duration {
        if now >= self.until { Duration::ZERO } else { DRAIN_STEP }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_closes_in_proportion_to_the_time_gone_by() {
        let start = Instant::now();
        let drain = Drain::new((0..100).map(|k| (k, k)).collect(), start, start + Duration::from_secs(2));
        assert_eq!(drain.due(start), 0);
        assert_eq!(drain.due(start + Duration::from_millis(500)), 25);
        assert_eq!(drain.due(start + Duration::from_secs(3)), 100);
        let mut half = Drain::new((0..100).map(|k| (k, k)).collect(), start, start + Duration::from_secs(2));
        half.remaining.drain(..40);
        assert_eq!(half.due(start + Duration::from_secs(1)), 10, "40 closed, 50 due");
        let instant = Drain::new(vec![(1, 1)], start, start);
        assert_eq!(instant.due(start), 1, "no period: all at once");
    }
}
