//! State every thread reads: configuration, the token verifier, metrics, the channels to the
//! router and the Redis publisher, and the admission counters checked at upgrade time.
//!
//! Admission (connection limits, per-user caps, per-IP rates) is the only place threads
//! share mutable state, and it is touched once per connection, never per message.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use crossbeam_channel::Sender;

use crate::auth::Verifier;
use crate::broker::PublishJob;
use crate::config::Config;
use crate::event_loop::LoopHandle;
use crate::metrics::Metrics;
use crate::router::RouterMsg;

pub struct Shared {
    pub config: Config,
    pub verifier: Verifier,
    pub metrics: Metrics,
    pub router: Sender<RouterMsg>,
    /// Present in Redis mode: HTTP publishes go out through this.
    pub publisher: Option<Sender<PublishJob>>,
    /// Every loop's command channel, set once all loops exist.
    pub loops: OnceLock<Arc<[LoopHandle]>>,
    /// Open WebSocket connections, instance wide (HERALD_MAX_CONNECTIONS).
    pub websockets: AtomicUsize,
    pub per_user: PerUserCounts,
    pub connect_rate: ConnectRate,
    /// Failed publish-API authentications per client address.
    pub auth_failures: crate::http::publish::AuthFailureLimit,
    pub shutting_down: AtomicBool,
    /// Random per process: tells this instance's relayed messages apart from others'.
    pub instance_id: u64,
    /// Unique per instance, for seed-004 `notification_id`s.
    pub next_notification_id: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// State for a server about to start: counters at zero, loops not yet attached.
    pub fn new(
        config: Config,
        verifier: Verifier,
        router: Sender<RouterMsg>,
        publisher: Option<Sender<PublishJob>>,
    ) -> Shared {
        Shared {
            metrics: Metrics::new(config.threads, config.redis_url.is_some()),
            verifier,
            router,
            publisher,
            loops: OnceLock::new(),
            websockets: AtomicUsize::new(0),
            per_user: PerUserCounts::default(),
            connect_rate: ConnectRate::default(),
            auth_failures: Default::default(),
            shutting_down: AtomicBool::new(false),
            next_notification_id: Default::default(),
            instance_id: crate::auth::random_u64(),
            config,
        }
    }

    /// Reserves one WebSocket slot; `false` when the instance is full.
    pub fn try_reserve_websocket(&self) -> bool {
        let max = self.config.max_connections;
        self.websockets.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok()
    }

    pub fn release_websocket(&self) {
        self.websockets.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn loops(&self) -> &[LoopHandle] {
        self.loops.get().map_or(&[], |l| l)
    }
}

const SHARDS: usize = 16;

fn shard_of<K: Hash + ?Sized>(key: &K) -> usize {
    // A fixed hasher: the shard only needs to be stable within the process.
    let hasher = std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
    (hasher.hash_one(key) as usize) % SHARDS
}

/// Connections per user on this instance (HERALD_MAX_CONNECTIONS_PER_USER).
#[derive(Default)]
pub struct PerUserCounts {
    shards: [Mutex<HashMap<Arc<str>, u32>>; SHARDS],
}

impl PerUserCounts {
    /// Counts one more connection for `user` unless that would exceed `cap` (0 = no cap).
    pub fn try_acquire(&self, user: &Arc<str>, cap: u32) -> bool {
        let Ok(mut map) = self.shards[shard_of(&**user)].lock() else { return false };
        let count = map.entry(user.clone()).or_insert(0);
        if cap != 0 && *count >= cap {
            if *count == 0 {
                map.remove(&**user);
            }
            return false;
        }
        *count += 1;
        true
    }

    pub fn release(&self, user: &str) {
        let Ok(mut map) = self.shards[shard_of(user)].lock() else { return };
        if let Some(count) = map.get_mut(user) {
            *count -= 1;
            if *count == 0 {
                map.remove(user);
            }
        }
    }
}

/// Token buckets of new connections per client IP (HERALD_CONNECT_RATE_PER_IP).
#[derive(Default)]
pub struct ConnectRate {
    shards: [Mutex<HashMap<IpAddr, (f64, Instant)>>; SHARDS],
}

impl ConnectRate {
    /// Takes one token for `ip`; `false` means over the rate. Burst is twice the rate.
    pub fn admit(&self, ip: IpAddr, per_second: u32, now: Instant) -> bool {
        if per_second == 0 {
            return true;
        }
        let rate = per_second as f64;
        let burst = 2.0 * rate;
        let Ok(mut map) = self.shards[shard_of(&ip)].lock() else { return true };
        if map.len() > 100_000 {
            // Forget buckets that have refilled; they hold no information.
            map.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = map.entry(ip).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn per_user_cap_counts_and_releases() {
        let counts = PerUserCounts::default();
        let u: Arc<str> = Arc::from("u");
        assert!(counts.try_acquire(&u, 2));
        assert!(counts.try_acquire(&u, 2));
        assert!(!counts.try_acquire(&u, 2));
        counts.release("u");
        assert!(counts.try_acquire(&u, 2));
        assert!(counts.try_acquire(&Arc::from("v"), 0));
    }

    #[test]
    fn connect_rate_allows_a_burst_then_refills() {
        let rate = ConnectRate::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        let admitted = (0..10).filter(|_| rate.admit(ip, 2, t0)).count();
        assert_eq!(admitted, 4);
        assert!(rate.admit(ip, 2, t0 + Duration::from_millis(600)));
        assert!(rate.admit("10.0.0.2".parse().unwrap(), 2, t0));
    }
}
