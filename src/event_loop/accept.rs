//! Accepting connections: each starts as plain HTTP, counted against the loop's cap on plain
//! connections and the per-IP connect rate, before anything it sends is read.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use mio::net::TcpStream;
use mio::{Interest, Token};
use tracing::warn;

use super::EventLoop;
use crate::conn::{Conn, Http, NO_TIMER, Phase};
use crate::http::{Response, Status};

/// How long accepting pauses after the process ran out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl EventLoop {
    pub(super) fn accept(&mut self) {
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

    /// Accepts again once the pause after running out of descriptors is over.
    pub(super) fn resume_accepting(&mut self) {
        if self.accept_paused_until.is_some_and(|t| self.now >= t) {
            self.accept_paused_until = None;
            self.accept();
        }
    }

    fn admit(&mut self, mut stream: TcpStream, peer: IpAddr) {
        if self.shutting_down {
            return;
        }
        if self.plain_count >= self.shared.plain_cap_per_loop {
            self.evict_oldest_plain();
        }
        let _ = stream.set_nodelay(true);
        let tls = match &self.shared.tls {
            None => None,
            Some(acceptor) => match acceptor.session() {
                Ok(session) => Some(Box::new(session)),
                Err(e) => {
                    warn!(error = %e, "cannot start a TLS session");
                    return;
                }
            },
        };
        let entry = self.conns.vacant_entry();
        let key = entry.key() as u32;
        if self.poll.registry().register(&mut stream, Token(key as usize), Interest::READABLE).is_err() {
            return;
        }
        self.next_conn_id = self.next_conn_id.wrapping_add(1);
        let deadline = self.now_tick.saturating_add(self.timeouts.handshake);
        entry.insert(Conn {
            stream,
            tls,
            id: self.next_conn_id,
            phase: Phase::Http(Box::new(Http::new(peer, deadline))),
            queue: Default::default(),
            timer_tick: NO_TIMER,
            registered: Interest::READABLE,
            write_blocked: false,
            dirty: false,
            plain: true,
        });
        self.plain_count += 1;
        self.plain_order.push_back((key, self.next_conn_id));
        self.arm(key);
        if !self.shared.admission.admit_connection(peer, self.now) {
            // Every connection counts against the per-IP rate, not only upgrades: a plain
            // socket costs a descriptor just the same. Over TLS there is no way to say 429
            // before a handshake the peer should not get: it is dropped.
            self.counters.rate_limited += 1;
            if self.conns.get(key as usize).is_some_and(|c| c.tls.is_some()) {
                self.reset(key);
                return;
            }
            let refusal = Response::error(Status::TOO_MANY_REQUESTS, "too many connections from this address");
            self.respond(key, refusal, false, true);
            return;
        }
        // Data may already be waiting (edge-triggered: no event will announce it again).
        self.on_readable(key);
    }

    /// Closes the oldest plain connection on this loop to make room for a new one. Its
    /// descriptor is worth more to the next client than to a socket that has had its turn.
    fn evict_oldest_plain(&mut self) {
        while let Some((key, id)) = self.plain_order.pop_front() {
            if self.conns.get(key as usize).is_some_and(|c| c.id == id && c.plain) {
                self.counters.http_evicted += 1;
                self.reset(key);
                return;
            }
        }
    }

    /// Marks a connection as no longer plain (upgraded or removed).
    pub(super) fn leave_plain(&mut self, key: u32) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        if conn.plain {
            conn.plain = false;
            self.plain_count -= 1;
            // Stale entries are skipped lazily; compact when they outnumber live ones.
            if self.plain_order.len() > 2 * self.plain_count + 64 {
                let conns = &self.conns;
                self.plain_order.retain(|(k, id)| conns.get(*k as usize).is_some_and(|c| c.id == *id && c.plain));
            }
        }
    }
}
