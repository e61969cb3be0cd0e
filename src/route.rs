//! The route table: for each user and topic, which event loops hold at least one connection
//! that receives it, and (for users) how many connections this instance holds on any path.
//!
//! Loop bits change only when a loop's first connection of a target arrives or its last one
//! leaves; the table is read by whoever routes a message (the Redis reader, or the loop that
//! parsed an HTTP publish), which then sends the shared frame straight to each owning loop.
//! There is no router thread between a publisher and the loops. Connection counts change at
//! every upgrade and close; they answer the per-user cap, `/health`'s user count and presence.
//!
//! Targets are keyed by a 64-bit keyed hash (random keys per process), so an entry costs 24
//! bytes whatever the id's length. A collision could only send a loop a message it then finds
//! no connection for: each loop's own index matches exact targets, so delivery never depends on
//! the hash.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::frame::SharedFrame;
use crate::ids::{DeliverTo, Exclusion, LoopId, Target};
use crate::mailbox::{LoopCmd, LoopHandle, Overloaded};

/// Bit `i` set = loop `i` holds at least one connection of the target.
pub type LoopMask = u64;

/// Most event-loop threads a mask can describe.
pub const MAX_LOOPS: usize = 64;

const SHARDS: usize = 32;

/// The key is already a hash: use it as is.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are ever hashed here.
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// What the instance holds of one target. Invariant: an entry exists only while one of its
/// fields is non-zero.
#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    loops: LoopMask,
    /// Connections of this user on any path (always 0 for topics).
    connections: u32,
    /// Redis confirmed this instance's exact subscription to the target's channel, and it has
    /// not been released since: a connection joining now needs no round trip to Redis.
    subscribed: bool,
}

type Shard = HashMap<u64, Entry, BuildHasherDefault<Prehashed>>;

/// What a join found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    /// No other loop of this instance held the target.
    pub first: bool,
    /// The target's exact subscription is confirmed (see [`RouteTable::set_subscribed`]).
    pub subscribed: bool,
}

/// The per-user cap was reached.
#[derive(Debug, PartialEq, Eq)]
pub struct AtCap;

pub struct RouteTable {
    shards: Box<[RwLock<Shard>]>,
    hasher: RandomState,
    /// Topics held by at least one loop.
    topics: AtomicU64,
    /// Users with at least one connection.
    users: AtomicU64,
}

impl Default for RouteTable {
    fn default() -> Self {
        RouteTable {
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            topics: AtomicU64::new(0),
            users: AtomicU64::new(0),
        }
    }
}

/// Where a message went.
#[derive(Debug, Default)]
pub struct Dispatched {
    /// Loops holding at least one target (the caller's own included).
    pub reached: LoopMask,
    /// What the calling loop must deliver itself (it owns targets of the message).
    pub local: Option<DeliverTo>,
    /// Loops whose inbox was full: they miss this message (counted by the caller).
    pub dropped: u32,
}

/// How a sender may wait for room in a loop's inbox.
#[derive(Debug, Clone, Copy)]
pub enum Sender {
    /// An event loop: never waits; `here` is its own id.
    Loop { here: LoopId },
    /// An event loop routing a stream whose order must hold across publishers (history on):
    /// never waits, and its own share goes through its own inbox like everyone else's.
    InOrder,
    /// Any other thread: waits up to `patience`.
    Thread { patience: Duration },
}

impl RouteTable {
    fn key(&self, is_user: bool, name: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write_u8(u8::from(is_user));
        h.write(name.as_bytes());
        h.finish()
    }

    fn key_of(&self, target: &Target) -> u64 {
        self.key(target.is_user(), target.name())
    }

    fn shard(&self, key: u64) -> &RwLock<Shard> {
        &self.shards[(key >> 58) as usize % SHARDS]
    }

    /// Changes the entry of `key`, creating it if needed and dropping it once empty.
    fn update<R>(&self, key: u64, change: impl FnOnce(&mut Entry) -> R) -> R {
        let mut shard = self.shard(key).write().unwrap_or_else(|e| e.into_inner());
        let entry = shard.entry(key).or_default();
        let result = change(entry);
        if entry.loops == 0 && entry.connections == 0 && !entry.subscribed {
            shard.remove(&key);
            if shard.capacity() > 64 && shard.len() * 4 < shard.capacity() {
                // After a burst leaves, keep the table proportional to those remaining.
                let keep = shard.len() * 2;
                shard.shrink_to(keep);
            }
        }
        result
    }

    fn read(&self, key: u64) -> Entry {
        self.shard(key).read().unwrap_or_else(|e| e.into_inner()).get(&key).copied().unwrap_or_default()
    }

    /// Records that `loop_id` now holds `target`.
    pub fn join(&self, loop_id: LoopId, target: &Target) -> Joined {
        let joined = self.update(self.key_of(target), |entry| {
            let first = entry.loops == 0;
            entry.loops |= 1 << loop_id;
            Joined { first, subscribed: entry.subscribed }
        });
        if joined.first && !target.is_user() {
            self.topics.fetch_add(1, Relaxed);
        }
        joined
    }

    /// Whether Redis confirmed this instance's subscription to `target` (exact mode).
    pub fn is_subscribed(&self, target: &Target) -> bool {
        self.read(self.key_of(target)).subscribed
    }

    /// Marks `target`'s subscription confirmed (or lost).
    pub fn set_subscribed(&self, target: &Target, subscribed: bool) {
        self.update(self.key_of(target), |entry| entry.subscribed = subscribed);
    }

    /// If no loop holds `target`, forgets its subscription (it is about to be unsubscribed)
    /// and returns true. Atomic with [`join`](Self::join): a connection joining either finds
    /// the target still held (and the subscription stays), or finds it unsubscribed and waits
    /// for a new one; never a subscription that is on its way out.
    pub fn release_if_unheld(&self, target: &Target) -> bool {
        self.update(self.key_of(target), |entry| {
            let unheld = entry.loops == 0;
            if unheld {
                entry.subscribed = false;
            }
            unheld
        })
    }

    /// Records that `loop_id` no longer holds `target`. Returns true when no loop of this
    /// instance holds it any more.
    pub fn leave(&self, loop_id: LoopId, target: &Target) -> bool {
        let last = self.update(self.key_of(target), |entry| {
            let held = entry.loops != 0;
            entry.loops &= !(1 << loop_id);
            held && entry.loops == 0
        });
        if last && !target.is_user() {
            self.topics.fetch_sub(1, Relaxed);
        }
        last
    }

    /// The loops holding `target`.
    pub fn holders(&self, target: &Target) -> LoopMask {
        self.read(self.key_of(target)).loops
    }

    /// Counts one more connection of `user`, unless it already has `cap` (0 = no cap).
    /// Returns the user's connections now.
    pub fn add_connection(&self, user: &str, cap: u32) -> Result<u32, AtCap> {
        let count = self.update(self.key(true, user), |entry| {
            if cap != 0 && entry.connections >= cap {
                return Err(AtCap);
            }
            entry.connections += 1;
            Ok(entry.connections)
        })?;
        if count == 1 {
            self.users.fetch_add(1, Relaxed);
        }
        Ok(count)
    }

    /// Counts one connection of `user` less. Returns the user's connections now.
    pub fn remove_connection(&self, user: &str) -> u32 {
        let (last, count) = self.update(self.key(true, user), |entry| {
            let had = entry.connections > 0;
            entry.connections = entry.connections.saturating_sub(1);
            (had && entry.connections == 0, entry.connections)
        });
        if last {
            self.users.fetch_sub(1, Relaxed);
        }
        count
    }

    /// Open connections of `user` on this instance, on any path.
    pub fn connections_of(&self, user: &str) -> u32 {
        self.read(self.key(true, user)).connections
    }

    /// Distinct users with a connection on this instance.
    pub fn user_count(&self) -> u64 {
        self.users.load(Relaxed)
    }

    /// Topics held anywhere on this instance.
    pub fn topic_count(&self) -> u64 {
        self.topics.load(Relaxed)
    }

    /// Sends `frame` once to each loop holding one of `targets` (with the targets it holds).
    /// The caller's own loop gets nothing sent: its share comes back as `local`.
    pub fn dispatch(
        &self,
        loops: &[LoopHandle],
        from: Sender,
        targets: &[Target],
        frame: &SharedFrame,
        exclusion: &Exclusion,
    ) -> Dispatched {
        let exclusion = (!exclusion.is_empty()).then(|| Box::new(exclusion.clone()));
        let mut out = Dispatched::default();
        if let [target] = targets {
            // The common case: one target, no per-loop list to build.
            let mask = self.holders(target);
            out.reached = mask;
            for loop_id in bits(mask) {
                let to = DeliverTo::One(target.clone());
                if matches!(from, Sender::Loop { here } if here == loop_id) {
                    out.local = Some(to);
                    continue;
                }
                let cmd = LoopCmd::Deliver { to, frame: frame.clone(), exclusion: exclusion.clone() };
                if send(&loops[loop_id], cmd, from).is_err() {
                    out.dropped += 1;
                }
            }
            return out;
        }
        let masks: Vec<LoopMask> = targets.iter().map(|t| self.holders(t)).collect();
        out.reached = masks.iter().fold(0, |a, m| a | m);
        for loop_id in bits(out.reached) {
            let here: Box<[Target]> =
                targets.iter().zip(&masks).filter(|(_, m)| *m & (1 << loop_id) != 0).map(|(t, _)| t.clone()).collect();
            let to = if here.len() == 1 { DeliverTo::One(here[0].clone()) } else { DeliverTo::Many(here) };
            if matches!(from, Sender::Loop { here } if here == loop_id) {
                out.local = Some(to);
                continue;
            }
            let cmd = LoopCmd::Deliver { to, frame: frame.clone(), exclusion: exclusion.clone() };
            if send(&loops[loop_id], cmd, from).is_err() {
                out.dropped += 1;
            }
        }
        out
    }
}

pub fn send(handle: &LoopHandle, cmd: LoopCmd, from: Sender) -> Result<(), Overloaded> {
    match from {
        Sender::Loop { .. } | Sender::InOrder => handle.try_send(cmd),
        Sender::Thread { patience } => handle.send_waiting(cmd, patience),
    }
}

/// Indexes of the set bits of `mask`, lowest first.
pub fn bits(mut mask: LoopMask) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        Some(i)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str) -> Target {
        Target::user(id)
    }

    #[test]
    fn bits_lists_set_positions() {
        assert_eq!(bits(0b1010_0001).collect::<Vec<_>>(), vec![0, 5, 7]);
        assert_eq!(bits(0).count(), 0);
        assert_eq!(bits(1 << 63).collect::<Vec<_>>(), vec![63]);
    }

    #[test]
    fn joins_and_leaves_report_the_instance_wide_first_and_last() {
        let table = RouteTable::default();
        assert!(table.join(0, &user("a")).first);
        assert!(!table.join(3, &user("a")).first);
        assert_eq!(table.holders(&user("a")), 0b1001);
        assert!(!table.leave(0, &user("a")));
        assert!(table.leave(3, &user("a")));
        assert_eq!(table.holders(&user("a")), 0);
        assert!(!table.leave(3, &user("a")), "leaving twice is harmless");
        let topic = Target::topic("a");
        assert!(table.join(1, &topic).first);
        assert_eq!(table.holders(&user("a")), 0, "a user and a topic of the same name are distinct");
        assert_eq!(table.topic_count(), 1);
    }

    #[test]
    fn a_subscription_outlives_its_last_holder_only_until_released() {
        let table = RouteTable::default();
        assert_eq!(table.join(0, &user("a")), Joined { first: true, subscribed: false });
        table.set_subscribed(&user("a"), true);
        assert!(!table.release_if_unheld(&user("a")), "still held: the subscription stays");
        assert!(table.leave(0, &user("a")));
        assert_eq!(table.join(1, &user("a")), Joined { first: true, subscribed: true }, "no round trip needed");
        table.leave(1, &user("a"));
        assert!(table.release_if_unheld(&user("a")));
        assert_eq!(table.join(1, &user("a")), Joined { first: true, subscribed: false }, "must wait again");
        table.leave(1, &user("a"));
        assert!(table.release_if_unheld(&user("a")));
        assert!(table.shards.iter().all(|s| s.read().unwrap().is_empty()));
    }

    #[test]
    fn connections_are_counted_per_user_on_any_path_and_capped() {
        let table = RouteTable::default();
        assert_eq!(table.add_connection("a", 2), Ok(1));
        assert!(table.join(0, &user("a")).first);
        assert_eq!(table.add_connection("a", 2), Ok(2));
        assert_eq!(table.add_connection("a", 2), Err(AtCap));
        assert_eq!((table.connections_of("a"), table.user_count()), (2, 1));
        table.leave(0, &user("a"));
        assert_eq!(table.connections_of("a"), 2, "a topic-path connection still counts");
        table.remove_connection("a");
        table.remove_connection("a");
        table.remove_connection("a");
        assert_eq!((table.connections_of("a"), table.user_count()), (0, 0));
        assert!(table.shards.iter().all(|s| s.read().unwrap().is_empty()), "no entry outlives its last use");
    }

    #[test]
    fn dispatch_keeps_the_callers_share_and_sends_the_rest() {
        let table = RouteTable::default();
        let mut polls = Vec::new();
        let mut handles = Vec::new();
        let mut inboxes = Vec::new();
        for _ in 0..3 {
            let (poll, handle, rx) = crate::mailbox::prepare().unwrap();
            polls.push(poll);
            handles.push(handle);
            inboxes.push(rx);
        }
        table.join(0, &user("a"));
        table.join(2, &user("a"));
        table.join(2, &user("b"));
        let frame = crate::frame::reply_text(b"x");
        let out =
            table.dispatch(&handles, Sender::Loop { here: 0 }, &[user("a"), user("b")], &frame, &Exclusion::default());
        assert_eq!(out.reached, 0b101);
        assert!(matches!(out.local, Some(DeliverTo::One(ref t)) if *t == user("a")));
        assert!(inboxes[0].try_recv().is_err() && inboxes[1].try_recv().is_err());
        match inboxes[2].try_recv().unwrap() {
            LoopCmd::Deliver { to: DeliverTo::Many(ts), .. } => assert_eq!(&*ts, &[user("a"), user("b")]),
            other => panic!("{other:?}"),
        }
    }
}
