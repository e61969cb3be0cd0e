//! Resume: a connection that comes back with `since` (an event stream: `Last-Event-ID` too)
//! gets what it missed of one stream, then `{"type":"resumed","replayed":N,"complete":bool}`,
//! then live notifications, with no gap and no duplicate in between. An event stream gets each
//! of them in its event form (`event_form`), the same shared one live delivery uses.
//!
//! The connection is in the index before the first page is asked for, so nothing published
//! from then on can be missed; while it replays, live notifications of that stream wait aside
//! (`pending`), and only those after the last replayed position follow `resumed`. Pages come
//! from the broker (the embedded store at once; Redis through the fleet thread, off the loop)
//! and go into the send queue only while it has room, so a client that reads can replay a
//! whole stream without being taken for a slow consumer. If more live notifications arrive
//! during a long replay than can wait aside, they are dropped from `pending` and read back
//! from the store instead: the replay only ends once it has caught up with the stream.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;

use super::EventLoop;
use crate::conn::Phase;
use crate::frame::{self, SharedFrame};
use crate::history::{Page, Since, StreamPos};
use crate::ids::{ConnRef, ReplyTo, Target};

#[derive(Debug)]
pub(super) struct Replay {
    /// Where the client asked to start.
    since: Since,
    /// The last position queued to the client.
    cursor: Option<StreamPos>,
    complete: bool,
    first_page: bool,
    replayed: u32,
    /// Fetched, not yet queued.
    ready: VecDeque<SharedFrame>,
    /// The store had more after the last page.
    more: bool,
    /// A page was asked for and has not come.
    fetching: bool,
    /// Live notifications of the stream that arrived during the replay.
    pending: Vec<SharedFrame>,
    /// Some live notifications were dropped from `pending`: read further before ending.
    overflowed: bool,
}

impl EventLoop {
    /// Starts replaying `target`'s stream to `key` from `since`. The connection is indexed
    /// under `target` already.
    pub(super) fn start_replay(&mut self, key: u32, target: Target, since: Since) {
        let replay = Replay {
            since,
            cursor: None,
            complete: true,
            first_page: true,
            replayed: 0,
            ready: VecDeque::new(),
            more: true,
            fetching: false,
            pending: Vec::new(),
            overflowed: false,
        };
        self.replays.insert((key, target.clone()), replay);
        self.pump(key, &target);
    }

    /// Whether resumes are in progress or just done (deliveries must ask [`held_for_replay`]).
    ///
    /// [`held_for_replay`]: EventLoop::held_for_replay
    pub(super) fn resuming(&self) -> bool {
        !self.replays.is_empty() || !self.replay_floors.is_empty()
    }

    /// Whether a live notification of `target` for `key` is not to be queued now: during its
    /// replay it waits aside (or is dropped, to be read back from the store); just after, it
    /// is dropped if the replay already sent it.
    pub(super) fn held_for_replay(&mut self, key: u32, target: &Target, frame: &SharedFrame) -> bool {
        let id = (key, target.clone());
        if let Some(replay) = self.replays.get_mut(&id) {
            if replay.pending.len() < self.shared.config.send_queue {
                replay.pending.push(frame.clone());
            } else {
                replay.overflowed = true;
            }
            return true;
        }
        let Some(floor) = self.replay_floors.get(&id) else { return false };
        match frame.stream {
            // Stored before the last page was read, routed here after: already replayed.
            Some(pos) if !pos.is_after(floor) => true,
            // Past the floor: the stream is in order from here, the floor can go.
            _ => {
                self.replay_floors.remove(&id);
                false
            }
        }
    }

    /// A page the broker fetched.
    pub(super) fn on_replay_page(&mut self, conn: ConnRef, target: Target, page: Page) {
        if self.conns.get(conn.key as usize).is_none_or(|c| c.id != conn.id) {
            return;
        }
        let Some(replay) = self.replays.get_mut(&(conn.key, target.clone())) else { return };
        replay.fetching = false;
        if replay.first_page {
            replay.first_page = false;
            replay.complete = page.complete;
        } else if let (Some(cursor), Some(first)) = (replay.cursor, page.entries.first().and_then(|f| f.stream)) {
            // Entries between pages were dropped (size, age) or the store was reset.
            if first.epoch != cursor.epoch || first.offset > cursor.offset + 1 {
                replay.complete = false;
            }
        }
        replay.more = page.more;
        replay.ready.extend(page.entries);
        self.pump(conn.key, &target);
    }

    /// The broker could not fetch (Redis unavailable): the resume ends incomplete.
    pub(super) fn replay_failed(&mut self, conn: ConnRef, target: Target) {
        if let Some(replay) = self.replays.get_mut(&(conn.key, target.clone())) {
            replay.fetching = false;
            replay.more = false;
            replay.complete = false;
            replay.ready.clear();
            self.pump(conn.key, &target);
        }
    }

    /// Every replay of `key` moves on: called when its output drained.
    pub(super) fn pump_all(&mut self, key: u32) {
        let targets: Vec<Target> = self.replays.keys().filter(|(k, _)| *k == key).map(|(_, t)| t.clone()).collect();
        for target in targets {
            self.pump(key, &target);
        }
    }

    /// Moves a replay as far as it can go now: queue what is ready while there is room, ask
    /// for the next page, or finish.
    fn pump(&mut self, key: u32, target: &Target) {
        let room = (self.shared.config.send_queue / 2).max(1);
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        let id = conn.id;
        let waits_for_redis = matches!(&conn.phase, Phase::Open(s) if s.awaiting_subscriptions > 0);
        let event_stream = matches!(&conn.phase, Phase::Open(s) if s.is_event_stream());
        let Some(replay) = self.replays.get_mut(&(key, target.clone())) else { return };
        let mut queued = false;
        while conn.queue.len() < room {
            let Some(entry) = replay.ready.pop_front() else { break };
            if let (Some(cursor), Some(pos)) = (replay.cursor, entry.stream) {
                if !pos.is_after(&cursor) {
                    continue;
                }
            }
            replay.cursor = entry.stream.or(replay.cursor);
            replay.replayed += 1;
            let entry = if event_stream {
                super::sse::event_form(&entry, target.is_user(), &mut self.counters).clone()
            } else {
                entry
            };
            // Below the bound by construction: the room checked above is half of it.
            let _ = conn.queue.push_notification(entry, usize::MAX);
            queued = true;
        }
        if queued && !conn.dirty {
            conn.dirty = true;
            self.dirty.push(key);
        }
        if !replay.ready.is_empty() || replay.fetching {
            return;
        }
        if replay.more || replay.overflowed {
            if replay.overflowed {
                // What waited aside is incomplete; the store has all of it.
                replay.overflowed = false;
                replay.pending.clear();
            }
            if waits_for_redis {
                // Asked once the channel is confirmed (`subscription_ready`): a page read
                // before then could miss what is published meanwhile.
                return;
            }
            replay.fetching = true;
            let since = replay.cursor.map_or(replay.since, Since::After);
            let reply = ReplyTo { loop_id: self.id, conn: ConnRef { key, id } };
            match self.shared.broker.history_page(target, since, reply) {
                Some(page) => {
                    // The embedded store answers at once.
                    return self.on_replay_page(ConnRef { key, id }, target.clone(), page);
                }
                None => return,
            }
        }
        let Some(replay) = self.replays.remove(&(key, target.clone())) else { return };
        if let Some(cursor) = replay.cursor {
            // A notification the store showed may still be on its way here live.
            self.replay_floors.insert((key, target.clone()), cursor);
        }
        let counts = &self.shared.metrics.history;
        counts.resumes.fetch_add(1, Relaxed);
        counts.replayed.fetch_add(u64::from(replay.replayed), Relaxed);
        if !replay.complete {
            counts.incomplete_resumes.fetch_add(1, Relaxed);
        }
        let resumed =
            format!("{{\"type\":\"resumed\",\"replayed\":{},\"complete\":{}}}", replay.replayed, replay.complete);
        let conn = &mut self.conns[key as usize];
        // An event stream gets the same JSON as an event (no id: it is no stream's entry).
        let event_stream = matches!(&conn.phase, Phase::Open(s) if s.is_event_stream());
        let resumed = if event_stream {
            frame::raw(crate::sse::encode_event(resumed.as_bytes(), None))
        } else {
            frame::reply_text(resumed.as_bytes())
        };
        conn.queue.push_reply(resumed);
        let limit = self.shared.config.send_queue;
        for frame in replay.pending {
            let after = match (frame.stream, replay.cursor) {
                (Some(pos), Some(cursor)) => pos.is_after(&cursor),
                _ => true,
            };
            if !after {
                continue;
            }
            let frame = if event_stream {
                super::sse::event_form(&frame, target.is_user(), &mut self.counters).clone()
            } else {
                frame
            };
            if conn.queue.push_notification(frame, limit).is_err() {
                self.slow.push(key);
                break;
            }
        }
        self.mark_dirty(key);
        for key in std::mem::take(&mut self.slow) {
            self.close_slow_consumer(key);
        }
    }

    /// Forgets the replays of a connection that is going.
    pub(super) fn drop_replays(&mut self, key: u32) {
        if self.resuming() {
            self.replays.retain(|(k, _), _| *k != key);
            self.replay_floors.retain(|(k, _), _| *k != key);
        }
    }
}
