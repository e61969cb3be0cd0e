//! Ending connections: a close frame queued behind what is pending (then FIN after the flush,
//! then removal at the peer's EOF or the linger deadline), an immediate reset, and shutdown.

use std::sync::atomic::Ordering;
use std::time::Duration;

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
        conn.queue.push_reply(frame::close(code, reason));
        self.mark_dirty(key);
        self.set_phase_closing(key);
    }

    pub(super) fn set_phase_closing(&mut self, key: u32) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        let deadline = self.now_tick.saturating_add(self.timeouts.close_linger);
        let old = std::mem::replace(&mut conn.phase, Phase::Closing { deadline, fin_sent: false });
        if let Phase::Open(session) = old {
            self.detach(&session);
        }
        self.arm(key);
    }

    /// Removes a session from the index, the route table and admission.
    fn detach(&mut self, session: &Session) {
        if session.personal() {
            self.index_remove(&session.user, session.user_node);
        }
        for membership in session.held() {
            self.index_remove(&membership.topic, membership.node);
        }
        self.shared.metrics.loops[self.id].connections.fetch_sub(1, Ordering::Relaxed);
        self.shared.admission.release(&self.shared.routing.table, session.user.name());
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
            self.detach(&session);
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
            match self.conns.get(key as usize).map(|c| (&c.phase, c.queue.is_empty())) {
                Some((Phase::Open(_), _)) => self.close_with(key, code::GOING_AWAY, "server shutdown"),
                Some((Phase::Http(_), true)) => self.remove(key),
                Some((Phase::Http(_), false)) => self.set_phase_closing(key),
                _ => {}
            }
        }
    }
}
