//! Timers: each connection has one live entry in the wheel, at its next deadline (request
//! completion, keepalive, token expiry, close linger). What a deadline means is decided by the
//! connection's own policy methods; this file carries it out. Also: handing freed memory back
//! to the kernel after churn.

use std::time::{Duration, SystemTime};

use super::EventLoop;
use crate::conn::{Due, NO_TIMER, Phase};
use crate::frame::{self, code};
use crate::http::Status;
use crate::ids::{Answer, ConnRef};
use crate::message;
use crate::tick::ticks;

/// How often a loop considers handing freed memory back, and the smallest drop in
/// connections that makes it worth a malloc_trim.
const TRIM_EVERY: Duration = Duration::from_secs(5);
const TRIM_MIN_DROP: usize = 1000;
/// Bytes of replies freed since the last trim that make another one worthwhile.
const TRIM_RELEASED_BYTES: usize = 32 * 1024 * 1024;
/// Shortest gap between two trims for freed replies.
pub(super) const TRIM_MIN_GAP: Duration = Duration::from_secs(1);

impl EventLoop {
    /// Files the connection's next deadline, unless an earlier entry is already live.
    pub(super) fn arm(&mut self, key: u32) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        let at = conn.deadline(&self.timeouts);
        if at < conn.timer_tick {
            if conn.timer_tick != NO_TIMER {
                self.wheel.cancel(conn.timer_tick, (key, conn.id));
            }
            conn.timer_tick = self.wheel.insert(at, (key, conn.id));
        }
    }

    pub(super) fn fire_timers(&mut self) {
        self.trim_memory();
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
        let timeouts = self.timeouts;
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        let paused = conn.input_paused();
        let drained = !conn.has_output();
        let conn_ref = ConnRef { key, id: conn.id };
        match &mut conn.phase {
            Phase::Http(http) if now >= http.deadline => match http.waiting {
                Some(_) => self.on_answer(conn_ref, Answer::Failed("timed out".into())),
                None if paused => {
                    // Its answers have sat unread since the deadline was last renewed: no 408
                    // could reach it either.
                    self.counters.output_stalled += 1;
                    self.reset(key);
                }
                None => self.reject(key, Status::REQUEST_TIMEOUT),
            },
            Phase::Closing { deadline, .. } if now >= *deadline => {
                if !conn.has_output() {
                    self.remove(key);
                } else {
                    // The peer would not take even our last bytes (a slow consumer with a
                    // full socket).
                    self.reset(key);
                }
            }
            Phase::Open(session) => match session.due_given_output(now, drained, &timeouts) {
                Due::Expired => {
                    let code = session.dialect().auth_close_code;
                    self.counters.token_expired_closes += 1;
                    self.close_with(key, code, "token expired");
                }
                // Silent only because herald stopped reading it: its output sat unread. (An
                // event stream is never silent by choice: idle, its output is stuck.)
                Due::Idle if paused || session.is_event_stream() => {
                    self.counters.output_stalled += 1;
                    self.close_with(key, code::POLICY_VIOLATION, "slow consumer");
                }
                Due::Idle => {
                    self.counters.idle_closes += 1;
                    self.close_with(key, code::GOING_AWAY, "idle timeout");
                }
                Due::Keepalive { ping, heartbeat } => {
                    if ping {
                        let ping =
                            if session.is_event_stream() { frame::event_stream_ping() } else { self.ping.clone() };
                        conn.queue.push_reply(ping);
                    }
                    if heartbeat {
                        let beat = format!(
                            "{{\"type\":\"heartbeat\",\"timestamp\":\"{}\"}}",
                            message::rfc3339_millis(SystemTime::now())
                        );
                        conn.queue.push_reply(frame::reply_text(beat.as_bytes()));
                    }
                    self.mark_dirty(key);
                }
                Due::Nothing => {}
            },
            _ => {}
        }
    }

    /// Whether freed reply memory waits for a trim (the loop then wakes up for it).
    pub(super) fn trim_pending(&self) -> bool {
        self.released_bytes >= TRIM_RELEASED_BYTES
    }

    /// After most of a burst of connections has gone (or a burst arrived), or after many
    /// replies were freed,
    /// returns the freed heap to the kernel: glibc keeps freed chunks mapped, so without this
    /// a peak stays in RSS for good.
    fn trim_memory(&mut self) {
        let held = self.conns.len();
        self.peak_connections = self.peak_connections.max(held);
        let emptied = held == 0;
        let due = self.now_tick >= self.last_trim.saturating_add(ticks(TRIM_EVERY));
        let churned = self.peak_connections >= TRIM_MIN_DROP && held * 2 < self.peak_connections && (emptied || due);
        let replies_freed = self.trim_pending() && self.now_tick >= self.last_trim.saturating_add(ticks(TRIM_MIN_GAP));
        // A burst of connects leaves the handshakes' buffers (requests, JWT decoding, 101s)
        // freed but mapped.
        let grew = due && held >= self.held_at_trim + TRIM_MIN_DROP;
        self.held_at_trim = self.held_at_trim.min(held);
        if churned || replies_freed || grew {
            release_free_heap();
            self.held_at_trim = held;
            self.released_bytes = 0;
            self.peak_connections = held;
            self.last_trim = self.now_tick;
        } else if due {
            self.peak_connections = held;
            self.last_trim = self.now_tick;
        }
    }
}

/// Hands free heap pages back to the kernel where the allocator can (glibc).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_heap() {
    // SAFETY: malloc_trim only releases free memory inside glibc's allocator, takes its own
    // arena locks, and touches no memory Rust owns.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators (musl's among them) return freed pages by themselves or not at all.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_heap() {}
