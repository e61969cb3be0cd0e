//! Notifications into send queues: each recipient's queue gets a pointer to the shared frame.
//! A connection whose queue is full while its socket is full too is a slow consumer: it is
//! closed once the delivery is done, and no one else waits for it.

use std::time::Instant;

use tracing::debug;

use super::EventLoop;
use super::output::write_queued;
use crate::conn::Phase;
use crate::frame::{SharedFrame, code};
use crate::ids::{ConnRef, DeliverTo, Exclusion};

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
        let mut flush_time: Option<Instant> = None;
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
