//! Reading sockets. Reading waits while a connection's output is over its bound (or a request
//! of its is parked): the flush that drains the output puts it back on the reread list.

use std::io::{self, Read};

use tracing::debug;

use super::{EventLoop, READ_CHUNK};
use crate::conn::Phase;
use crate::http::{self, Status};

/// Reads from one connection per readiness event before others get their turn.
const READS_PER_EVENT: usize = 8;

impl EventLoop {
    pub(super) fn on_readable(&mut self, key: u32) {
        let mut reads = 0;
        loop {
            let Some(conn) = self.conns.get_mut(key as usize) else { return };
            if conn.input_paused() {
                // Backpressure: whatever drains the output (or answers the request) resumes.
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
            match conn.tls.as_mut() {
                None => {
                    let mut input = std::mem::take(&mut self.read_buf);
                    self.on_input(key, &mut input[..n]);
                    self.read_buf = input;
                }
                Some(tls) => {
                    let mut plain = std::mem::take(&mut self.tls_plain);
                    plain.clear();
                    let received = tls.receive(&mut self.read_buf[..n], &mut plain);
                    let has_records = !tls.pending_output().is_empty();
                    match received {
                        Err(failed) => {
                            // Plain HTTP, garbage or a failed handshake: nothing to answer it
                            // with that it could read.
                            self.counters.tls_failures += 1;
                            debug!(reason = %failed.0, "dropping a connection that does not speak TLS");
                            self.tls_plain = plain;
                            self.reset(key);
                            return;
                        }
                        Ok(received) => {
                            self.counters.tls_handshakes += u64::from(received.handshake_done);
                            if has_records {
                                self.mark_dirty(key);
                            }
                            self.on_input(key, &mut plain);
                            if plain.capacity() > READ_CHUNK {
                                plain = Vec::new();
                            }
                            self.tls_plain = plain;
                            if received.peer_closed {
                                self.on_eof(key);
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Hands received plaintext to the connection's phase.
    fn on_input(&mut self, key: u32, input: &mut [u8]) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        match &mut conn.phase {
            Phase::Http(http) => {
                if http.buf.len() + input.len() > http::MAX_HEAD_BYTES + http::MAX_BATCH_BODY_BYTES + READ_CHUNK {
                    self.reject(key, Status::HEADERS_TOO_LARGE);
                    return;
                }
                http.buf.extend_from_slice(input);
                self.serve_requests(key);
            }
            // An event stream is one-way: what its client sends is dropped unread.
            Phase::Open(session) if session.is_event_stream() => {}
            Phase::Open(_) => self.on_frames(key, input),
            // Bytes after our close are discarded; we only wait for the peer's EOF.
            Phase::Closing { .. } => {}
        }
    }

    /// Reads again after output drained below its bound, an answer arrived, or a fairness cut:
    /// first the requests already buffered, then the socket.
    pub(super) fn resume_input(&mut self, key: u32) {
        if self.conns.get(key as usize).is_some_and(|c| matches!(c.phase, Phase::Http(_))) {
            self.serve_requests(key);
        }
        self.on_readable(key);
    }

    fn on_eof(&mut self, key: u32) {
        let Some(conn) = self.conns.get(key as usize) else { return };
        match conn.phase {
            // A client that half-closed after sending its last request still gets its answers.
            Phase::Http(_) if conn.has_output() => self.set_phase_closing(key),
            Phase::Closing { fin_sent: false, .. } => {}
            _ => self.remove(key),
        }
    }
}
