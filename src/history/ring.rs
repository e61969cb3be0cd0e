//! The embedded broker's history: a ring of recent notifications per stream, in memory, all
//! streams together within HERALD_HISTORY_MEMORY. Each stream keeps at most `size` entries,
//! none older than `ttl`; past the memory bound the oldest entries of the whole instance go
//! first, and are counted. Nothing survives a restart: the epoch is new each start, so a
//! client resuming from before it is told its resume is incomplete.
//!
//! Appending and routing happen under the stream's lock, so every connection sees a stream's
//! notifications in offset order, whichever loops publish them.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{EPOCH_BITS, Page, Settings, Since, StreamPos};
use crate::frame::SharedFrame;
use crate::ids::Target;
use crate::metrics::Metrics;

const SHARDS: usize = 32;
/// Bytes one entry costs besides its frame's bytes (the entry, the frame's header and Arc,
/// its place in the eviction order).
const ENTRY_OVERHEAD: usize = 96;

#[derive(Debug)]
struct Entry {
    offset: u64,
    stored: Instant,
    frame: SharedFrame,
}

impl Entry {
    fn cost(&self) -> usize {
        self.frame.bytes.len() + ENTRY_OVERHEAD
    }
}

#[derive(Debug, Default)]
struct Ring {
    /// The newest offset handed out (0: none yet).
    top: u64,
    entries: VecDeque<Entry>,
    /// The user's read marker (acks), as an offset of this epoch.
    acked: Option<u64>,
}

pub struct Rings {
    shards: Box<[Mutex<HashMap<Target, Ring>>]>,
    hasher: RandomState,
    epoch: u64,
    settings: Settings,
    /// Every entry in the order it was stored: the eviction order across streams.
    order: Mutex<VecDeque<(Target, u64)>>,
    entries: AtomicUsize,
    /// Bytes held, by the store's own accounting.
    bytes: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl Rings {
    pub fn new(settings: Settings, metrics: Arc<Metrics>) -> Rings {
        Rings {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            epoch: crate::auth::random_u64() & ((1 << EPOCH_BITS) - 1),
            settings,
            order: Mutex::default(),
            entries: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            metrics,
        }
    }

    fn shard(&self, target: &Target) -> &Mutex<HashMap<Target, Ring>> {
        &self.shards[self.hasher.hash_one(target) as usize % SHARDS]
    }

    /// Stores the next notification of `target`'s stream, framed by `frame_for` at its
    /// position, and hands the frame to `route` while the stream is still locked.
    pub fn append<R>(
        &self,
        target: &Target,
        frame_for: impl FnOnce(StreamPos) -> SharedFrame,
        route: impl FnOnce(&SharedFrame) -> R,
    ) -> R {
        let now = Instant::now();
        let (result, offset) = {
            let mut shard = self.shard(target).lock().unwrap_or_else(|e| e.into_inner());
            let ring = shard.entry(target.clone()).or_default();
            ring.top += 1;
            let pos = StreamPos { epoch: self.epoch, offset: ring.top };
            let frame = frame_for(pos);
            let entry = Entry { offset: pos.offset, stored: now, frame: frame.clone() };
            self.bytes.fetch_add(entry.cost(), Relaxed);
            self.entries.fetch_add(1, Relaxed);
            ring.entries.push_back(entry);
            self.trim(ring, now);
            (route(&frame), pos.offset)
        };
        self.metrics.history.appended.fetch_add(1, Relaxed);
        self.order.lock().unwrap_or_else(|e| e.into_inner()).push_back((target.clone(), offset));
        self.evict();
        result
    }

    /// Drops what is over the stream's size or age.
    fn trim(&self, ring: &mut Ring, now: Instant) {
        while ring.entries.len() > self.settings.size
            || ring.entries.front().is_some_and(|e| now.duration_since(e.stored) > self.settings.ttl)
        {
            if let Some(gone) = ring.entries.pop_front() {
                self.forget(&gone);
            }
        }
    }

    fn forget(&self, entry: &Entry) {
        self.bytes.fetch_sub(entry.cost(), Relaxed);
        self.entries.fetch_sub(1, Relaxed);
    }

    /// Keeps the store within its memory, oldest entries first; also keeps the eviction order
    /// from filling up with entries that size or age already dropped.
    fn evict(&self) {
        loop {
            let over = self.bytes.load(Relaxed) > self.settings.memory;
            let stale = {
                let order = self.order.lock().unwrap_or_else(|e| e.into_inner());
                order.len() > 2 * self.entries.load(Relaxed) + 64
            };
            if !over && !stale {
                return;
            }
            let Some((target, offset)) = self.order.lock().unwrap_or_else(|e| e.into_inner()).pop_front() else {
                return;
            };
            let mut shard = self.shard(&target).lock().unwrap_or_else(|e| e.into_inner());
            let Some(ring) = shard.get_mut(&target) else { continue };
            if ring.entries.front().is_some_and(|e| e.offset == offset) {
                if let Some(gone) = ring.entries.pop_front() {
                    self.forget(&gone);
                    if over {
                        self.metrics.history.evicted.fetch_add(1, Relaxed);
                    }
                }
            }
            if ring.entries.is_empty() && ring.acked.is_none() && over {
                // Nothing left to resume from; a later resume from this stream is
                // incomplete, which is the truth.
                shard.remove(&target);
            }
        }
    }

    /// Up to `limit` entries of `target`'s stream after `since`, oldest first.
    pub fn page(&self, target: &Target, since: Since, limit: usize) -> Page {
        let now = Instant::now();
        let mut shard = self.shard(target).lock().unwrap_or_else(|e| e.into_inner());
        let Some(ring) = shard.get_mut(target) else {
            let complete = match since {
                Since::Beginning => true,
                Since::After(pos) => pos.epoch == self.epoch && pos.offset == 0,
                Since::Unknown => false,
            };
            return Page { entries: Vec::new(), complete, more: false };
        };
        self.trim(ring, now);
        let oldest = ring.entries.front().map_or(ring.top + 1, |e| e.offset);
        let (after, complete) = match since {
            Since::Beginning => (0, oldest == 1),
            Since::After(pos) if pos.epoch == self.epoch && pos.offset <= ring.top => {
                (pos.offset, pos.offset + 1 >= oldest)
            }
            _ => (0, false),
        };
        let skip = (after + 1).saturating_sub(oldest) as usize;
        let entries: Vec<SharedFrame> = ring.entries.iter().skip(skip).take(limit).map(|e| e.frame.clone()).collect();
        let more = ring.entries.len() > skip + entries.len();
        Page { entries, complete, more }
    }

    /// Moves `user`'s read marker to `pos`; false (ignored) for a position this stream never
    /// handed out or one not after the marker.
    pub fn ack(&self, user: &Target, pos: StreamPos) -> bool {
        let mut shard = self.shard(user).lock().unwrap_or_else(|e| e.into_inner());
        let Some(ring) = shard.get_mut(user) else { return false };
        if pos.epoch != self.epoch || pos.offset == 0 || pos.offset > ring.top || ring.acked >= Some(pos.offset) {
            return false;
        }
        ring.acked = Some(pos.offset);
        true
    }

    /// `user`'s read marker.
    pub fn acked(&self, user: &Target) -> Option<StreamPos> {
        let shard = self.shard(user).lock().unwrap_or_else(|e| e.into_inner());
        shard.get(user)?.acked.map(|offset| StreamPos { epoch: self.epoch, offset })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn settings(size: usize, memory: usize) -> Settings {
        Settings { size, ttl: Duration::from_secs(3600), memory }
    }

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(1, false))
    }

    fn push(rings: &Rings, target: &Target, n: usize) -> Vec<StreamPos> {
        (0..n)
            .map(|_| {
                rings.append(
                    target,
                    |pos| crate::frame::notification_in_stream(b"{\"type\":\"x\"}", Instant::now(), Some(pos)),
                    |frame| frame.stream.expect("stored frames know their place"),
                )
            })
            .collect()
    }

    fn offsets(page: &Page) -> Vec<u64> {
        page.entries.iter().map(|f| f.stream.map_or(0, |p| p.offset)).collect()
    }

    #[test]
    fn a_stream_keeps_its_newest_entries_and_says_when_a_resume_is_complete() {
        let rings = Rings::new(settings(5, 1 << 20), metrics());
        let user = Target::user("u");
        let ids = push(&rings, &user, 8);
        assert_eq!(ids.iter().map(|p| p.offset).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
        let page = rings.page(&user, Since::After(ids[5]), 10);
        assert_eq!((offsets(&page), page.complete, page.more), (vec![7, 8], true, false));
        let page = rings.page(&user, Since::After(ids[0]), 10);
        assert_eq!((offsets(&page), page.complete), (vec![4, 5, 6, 7, 8], false), "2 and 3 were dropped");
        let page = rings.page(&user, Since::After(ids[2]), 2);
        assert_eq!((offsets(&page), page.complete, page.more), (vec![4, 5], true, true));
        let page = rings.page(&user, Since::Beginning, 10);
        assert_eq!((offsets(&page).len(), page.complete), (5, false));
        let foreign = StreamPos { epoch: ids[0].epoch ^ 1, offset: 3 };
        let page = rings.page(&user, Since::After(foreign), 10);
        assert_eq!((offsets(&page).len(), page.complete), (5, false));
        let future = StreamPos { offset: 99, ..ids[0] };
        assert!(!rings.page(&user, Since::After(future), 10).complete);
        assert!(rings.page(&user, Since::After(ids[7]), 10).complete, "nothing missed");
    }

    #[test]
    fn memory_evicts_the_oldest_entries_of_the_instance_first() {
        let one = br#"{"type":"x"}"#.len() + 2 + ENTRY_OVERHEAD;
        let rings = Rings::new(settings(100, 10 * one), metrics());
        let (a, b) = (Target::user("a"), Target::topic("b"));
        push(&rings, &a, 6);
        push(&rings, &b, 6);
        assert_eq!(rings.metrics.history.evicted.load(Relaxed), 2);
        assert!(rings.bytes.load(Relaxed) <= 10 * one);
        assert_eq!(offsets(&rings.page(&a, Since::Beginning, 10)), vec![3, 4, 5, 6]);
        assert_eq!(offsets(&rings.page(&b, Since::Beginning, 10)).len(), 6);
    }

    #[test]
    fn the_eviction_order_does_not_outgrow_what_is_stored() {
        let rings = Rings::new(settings(2, 1 << 30), metrics());
        let user = Target::user("u");
        push(&rings, &user, 10_000);
        assert!(rings.order.lock().unwrap().len() <= 2 * 2 + 64 + 1);
        assert_eq!(rings.metrics.history.evicted.load(Relaxed), 0, "size trimming is not eviction");
    }

    #[test]
    fn acks_only_move_forward_over_positions_handed_out() {
        let rings = Rings::new(settings(10, 1 << 20), metrics());
        let user = Target::user("u");
        let ids = push(&rings, &user, 3);
        assert!(rings.ack(&user, ids[1]));
        assert!(!rings.ack(&user, ids[0]), "back");
        assert!(!rings.ack(&user, ids[1]), "same");
        assert!(!rings.ack(&user, StreamPos { offset: 9, ..ids[0] }), "never handed out");
        assert!(!rings.ack(&Target::user("other"), ids[2]));
        assert_eq!(rings.acked(&user), Some(ids[1]));
    }
}
