//! Writing: every dirty connection is flushed with writev before the loop polls again, up to a
//! byte budget per pass; WRITABLE interest is registered only for what the kernel would not take.

use std::io;
use std::net::Shutdown;
use std::time::Instant;

use mio::Token;

use super::EventLoop;
use crate::conn::send_queue::Flushed;
use crate::conn::{Conn, Phase};
use crate::metrics::LocalCounters;
use crate::tls;

/// Bytes written to one connection per pass before others get their turn.
const WRITE_BUDGET: usize = 256 * 1024;

impl EventLoop {
    pub(super) fn mark_dirty(&mut self, key: u32) {
        if let Some(conn) = self.conns.get_mut(key as usize) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    pub(super) fn flush_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for &key in &dirty {
            if let Some(conn) = self.conns.get_mut(key as usize) {
                conn.dirty = false;
                self.flush(key);
                if !self.replays.is_empty() {
                    // What was written makes room for more of a replay.
                    self.pump_all(key);
                }
            }
        }
        // Reuse the allocation unless flushing re-filled the list.
        if self.dirty.is_empty() {
            let mut dirty = dirty;
            dirty.clear();
            self.dirty = dirty;
        }
    }

    pub(super) fn flush(&mut self, key: u32) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        if conn.output_held() {
            // Flushed when its subscriptions are confirmed (`subscription_ready`).
            return;
        }
        let was_paused = conn.input_paused();
        let unsent_before = conn.queue.bytes();
        let mut result = if conn.has_output() {
            write_queued(conn, &mut self.counters, &mut self.released_bytes, Instant::now())
        } else {
            // Nothing to write, but a closing connection may still owe its FIN.
            Ok(Flushed::Empty)
        };
        if let (Ok(Flushed::Empty), Phase::Closing { fin_sent: false, .. }, Some(tls)) =
            (&result, &conn.phase, conn.tls.as_mut())
        {
            // A TLS peer is told the stream ends before the FIN says so.
            tls.close_notify();
            result = match tls::drain(tls, &mut conn.stream) {
                Ok(true) => Ok(Flushed::Empty),
                Ok(false) => Ok(Flushed::WouldBlock),
                Err(e) => Err(e),
            };
        }
        if was_paused && !conn.input_paused() && !matches!(conn.phase, Phase::Closing { .. }) {
            // The peer took enough of its output: read (and serve) what it sent meanwhile.
            self.reread.push(key);
        }
        if result.is_ok() {
            conn.note_output_progress(unsent_before, self.now_tick);
        }
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
}

/// Writes a connection's queue (up to the per-pass budget), counting each notification whose
/// last byte left as a delivery with its latency, and each reply's bytes as memory released.
/// On a TLS connection frames are encrypted here, as they go out, and records the socket does
/// not take yet count as unwritten output (`Flushed::WouldBlock`).
pub(super) fn write_queued(
    conn: &mut Conn,
    counters: &mut LocalCounters,
    released_bytes: &mut usize,
    now: Instant,
) -> io::Result<Flushed> {
    let on_sent = |frame: &crate::frame::Frame| match frame.born {
        Some(born) => counters.delivered(now.saturating_duration_since(born)),
        // Replies belong to this connection alone: writing one frees it.
        None => *released_bytes += frame.bytes.len(),
    };
    let Some(session) = conn.tls.as_mut() else {
        return conn.queue.flush(&mut conn.stream, WRITE_BUDGET, on_sent);
    };
    let mut writer = tls::Writer { session, sink: &mut conn.stream };
    let flushed = conn.queue.flush(&mut writer, WRITE_BUDGET, on_sent)?;
    match (flushed, tls::drain(writer.session, writer.sink)?) {
        (Flushed::Empty, false) => Ok(Flushed::WouldBlock),
        (flushed, _) => Ok(flushed),
    }
}
