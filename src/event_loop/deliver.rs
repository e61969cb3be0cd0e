//! Notifications into send queues: each recipient's queue gets a pointer to the shared frame.
//! A connection whose queue is full while its socket is full too is a slow consumer: it is
//! closed once the delivery is done, and no one else waits for it.

use std::io::Write;
use std::time::Instant;

use tracing::debug;

use super::EventLoop;
use super::output::write_queued;
use crate::conn::{Conn, Phase};
use crate::frame::{SharedFrame, code};
use crate::ids::{ConnRef, DeliverTo, Exclusion};

/// What a write-through left to do.
enum WriteThrough {
    Done,
    /// The kernel took this many bytes, not all.
    Partly(usize),
    /// Nothing written: the socket is full or failed.
    NotTaken,
}

fn write_through_one(conn: &mut Conn, frame: &SharedFrame, now_tick: crate::tick::Tick) -> WriteThrough {
    loop {
        return match conn.stream.write(&frame.bytes) {
            Ok(n) if n == frame.bytes.len() => {
                // An event stream counts output that moves as a sign of life.
                conn.note_output_progress(0, now_tick);
                WriteThrough::Done
            }
            Ok(0) => WriteThrough::NotTaken,
            Ok(n) => WriteThrough::Partly(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => WriteThrough::NotTaken,
        };
    }
}

impl EventLoop {
    pub(super) fn deliver(&mut self, to: &DeliverTo, frame: &SharedFrame, exclusion: &Exclusion) {
        match to {
            DeliverTo::One(target) => {
                // A connection is in a target's list once: no duplicates to rule out.
                let mut keys = std::mem::take(&mut self.delivery_keys);
                keys.extend(self.index.connections(target));
                if self.resuming() {
                    keys.retain(|&key| !self.held_for_replay(key, target, frame));
                }
                self.deliver_to(&keys, frame, target.is_user(), exclusion);
                keys.clear();
                self.delivery_keys = keys;
            }
            DeliverTo::Many(targets) => {
                // A connection holding several of the targets gets the message once.
                let mut keys = std::mem::take(&mut self.delivery_keys);
                for target in targets.iter() {
                    let start = keys.len();
                    keys.extend(self.index.connections(target));
                    if self.resuming() {
                        let mut i = start;
                        while i < keys.len() {
                            if self.held_for_replay(keys[i], target, frame) {
                                keys.swap_remove(i);
                            } else {
                                i += 1;
                            }
                        }
                    }
                }
                keys.sort_unstable();
                keys.dedup();
                // One frame for several targets has no single stream an id could name.
                self.deliver_to(&keys, frame, false, exclusion);
                keys.clear();
                self.delivery_keys = keys;
            }
        }
    }

    /// `users_stream`: the frame reaches these connections as their user's own notification
    /// (so an event stream gets its stream id as the event's `id:`), not as a topic's.
    fn deliver_to(&mut self, keys: &[u32], frame: &SharedFrame, users_stream: bool, exclusion: &Exclusion) {
        let excluded_conn =
            exclusion.origin.filter(|o| o.instance == self.shared.instance_id && o.loop_id == self.id).map(|o| o.conn);
        let limit = self.shared.config.send_queue;
        let now_tick = self.now_tick;
        // Nothing else is due before the flush: a recipient with an empty queue gets the frame
        // written now, sparing the queue, its allocation and a second pass over every
        // recipient. When more is due (a burst), frames queue and leave in one writev each.
        let write_through = !self.more_events && !self.more_input && self.inbox.is_empty();
        let mut flush_time: Option<Instant> = None;
        let mut written_through = 0u32;
        for &key in keys {
            let Some(conn) = self.conns.get_mut(key as usize) else { continue };
            if excluded_conn == Some(ConnRef { key, id: conn.id }) {
                continue;
            }
            let Phase::Open(session) = &mut conn.phase else { continue };
            if exclusion.excludes_user(session.user.name()) {
                continue;
            }
            session.last_data_sent = now_tick;
            let frame = if session.is_event_stream() {
                super::sse::event_form(frame, users_stream, &mut self.counters)
            } else {
                frame
            };
            if write_through && conn.tls.is_none() && !conn.has_output() && !conn.output_held() {
                match write_through_one(conn, frame, now_tick) {
                    WriteThrough::Done => {
                        if let Some(born) = frame.born {
                            // A broadcast writes for tens of milliseconds: the clock is read
                            // again now and then, so the latency histogram sees that time.
                            if written_through % 32 == 0 {
                                flush_time = Some(Instant::now());
                            }
                            written_through += 1;
                            let now = *flush_time.get_or_insert_with(Instant::now);
                            self.counters.delivered(now.saturating_duration_since(born));
                        }
                        continue;
                    }
                    WriteThrough::Partly(written) => {
                        conn.queue.push_partly_written(frame.clone(), written);
                        if !conn.dirty {
                            conn.dirty = true;
                            self.dirty.push(key);
                        }
                        continue;
                    }
                    // Queued as usual: the flush registers for WRITABLE, or finds the error.
                    WriteThrough::NotTaken => {}
                }
            }
            if conn.queue.push_notification(frame.clone(), limit).is_err() {
                // A full queue is only slow if the socket is full too: a burst larger
                // than the queue must reach a client that reads. Write what the kernel
                // takes now, then judge. (Errors are left for the flush to find: this
                // loop must not remove connections while it delivers.)
                let now = *flush_time.get_or_insert_with(Instant::now);
                let _ = write_queued(conn, &mut self.counters, &mut self.released_bytes, now);
                if conn.queue.push_notification(frame.clone(), limit).is_err() {
                    self.slow.push(key);
                    continue;
                }
            }
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(key);
            }
        }
        for key in std::mem::take(&mut self.slow) {
            self.close_slow_consumer(key);
        }
    }

    pub(super) fn close_slow_consumer(&mut self, key: u32) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        if !matches!(conn.phase, Phase::Open(_)) {
            return;
        }
        let dropped = conn.queue.discard_unsent();
        self.released_bytes += dropped.bytes;
        self.counters.failed += dropped.notifications as u64 + 1;
        self.counters.slow_consumers += 1;
        debug!("closing a slow consumer");
        self.close_with(key, code::POLICY_VIOLATION, "slow consumer");
    }
}
