//! Who may open a WebSocket, and who may keep trying: the instance's connection limit, the
//! per-user cap (counted in the route table, which knows each user's connections), the per-IP
//! connect rate, and the per-IP budget of failed API authentications. One type reserves and
//! releases a connection, so the counts cannot drift apart.
//!
//! This is the only mutable state threads share besides the route table, and it is touched
//! once per connection, never per message.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crate::route::RouteTable;

const SHARDS: usize = 16;

/// Why an upgrade was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// HERALD_MAX_CONNECTIONS reached.
    InstanceFull,
    /// HERALD_MAX_CONNECTIONS_PER_USER reached for this user.
    UserFull,
}

pub struct Admission {
    max_websockets: usize,
    per_user_cap: u32,
    connect_rate_per_ip: u32,
    /// Open WebSockets, instance wide.
    websockets: AtomicUsize,
    rates: ConnectRate,
}

impl Admission {
    pub fn new(max_websockets: usize, per_user_cap: u32, connect_rate_per_ip: u32) -> Admission {
        Admission {
            max_websockets,
            per_user_cap,
            connect_rate_per_ip,
            websockets: AtomicUsize::new(0),
            rates: ConnectRate::default(),
        }
    }

    /// Reserves one WebSocket for `user`; returns the user's connections on this instance now.
    /// Every success must be paired with one [`release`].
    ///
    /// [`release`]: Admission::release
    pub fn reserve(&self, routes: &RouteTable, user: &str) -> Result<u32, Refusal> {
        let max = self.max_websockets;
        self.websockets
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .map_err(|_| Refusal::InstanceFull)?;
        routes.add_connection(user, self.per_user_cap).map_err(|_| {
            self.websockets.fetch_sub(1, Ordering::AcqRel);
            Refusal::UserFull
        })
    }

    /// Gives back what [`Admission::reserve`] took for `user`; returns the user's connections
    /// on this instance now.
    pub fn release(&self, routes: &RouteTable, user: &str) -> u32 {
        self.websockets.fetch_sub(1, Ordering::AcqRel);
        routes.remove_connection(user)
    }

    pub fn websockets(&self) -> usize {
        self.websockets.load(Ordering::Acquire)
    }

    /// Takes one token of `ip`'s connect rate; `false` means over the rate.
    pub fn admit_connection(&self, ip: IpAddr, now: Instant) -> bool {
        self.rates.admit(ip, self.connect_rate_per_ip, now)
    }
}

fn shard_of<K: std::hash::Hash + ?Sized>(key: &K) -> usize {
    // A fixed hasher: the shard only needs to be stable within the process.
    let hasher = std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
    (hasher.hash_one(key) as usize) % SHARDS
}

/// Token buckets of new connections per client IP (HERALD_CONNECT_RATE_PER_IP).
#[derive(Default)]
struct ConnectRate {
    shards: [Mutex<HashMap<IpAddr, (f64, Instant)>>; SHARDS],
}

impl ConnectRate {
    /// Takes one token for `ip`; `false` means over the rate. Burst is twice the rate.
    fn admit(&self, ip: IpAddr, per_second: u32, now: Instant) -> bool {
        if per_second == 0 {
            return true;
        }
        let rate = f64::from(per_second);
        let burst = 2.0 * rate;
        let mut map = self.shards[shard_of(&ip)].lock().unwrap_or_else(|e| e.into_inner());
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

/// Failed API authentications tolerated from one client address before it is refused…
const AUTH_FAILURE_BURST: f64 = 20.0;
/// …and how many more it may make per second after that.
const AUTH_FAILURE_REFILL_PER_SECOND: f64 = 5.0;
const AUTH_FAILURE_SHARDS: usize = 16;
/// Addresses tracked per shard; past it, fully refilled buckets are forgotten.
const AUTH_FAILURE_MAX_TRACKED: usize = 4096;

/// Token buckets of failed API authentications per client address, so the API key and
/// token signatures cannot be guessed at the speed of the network. Only failures take a
/// token; a caller whose credential is good never waits or counts. IPv6 clients are
/// bucketed per /64, the smallest block one subscriber usually holds.
#[derive(Default)]
pub struct AuthFailureLimit {
    shards: [Mutex<HashMap<IpAddr, (f64, Instant)>>; AUTH_FAILURE_SHARDS],
}

impl AuthFailureLimit {
    fn bucket_key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            },
        }
    }

    fn shard(&self, key: &IpAddr) -> &Mutex<HashMap<IpAddr, (f64, Instant)>> {
        use std::hash::BuildHasher;
        let hasher = std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
        &self.shards[(hasher.hash_one(key) as usize) % AUTH_FAILURE_SHARDS]
    }

    fn refilled(tokens: f64, since: Instant, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(since).as_secs_f64();
        (tokens + elapsed * AUTH_FAILURE_REFILL_PER_SECOND).min(AUTH_FAILURE_BURST)
    }

    /// Whether `ip` has used up its failures: answer without looking at the credential.
    pub fn exhausted(&self, ip: IpAddr, now: Instant) -> bool {
        let key = Self::bucket_key(ip);
        let Ok(map) = self.shard(&key).lock() else { return false };
        map.get(&key).is_some_and(|&(tokens, since)| Self::refilled(tokens, since, now) < 1.0)
    }

    /// Counts one failed authentication from `ip`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let key = Self::bucket_key(ip);
        let Ok(mut map) = self.shard(&key).lock() else { return };
        if map.len() >= AUTH_FAILURE_MAX_TRACKED && !map.contains_key(&key) {
            // Full: forget the buckets that have refilled, they hold no information. If that
            // frees too little, forget them all: whoever fails from this many addresses has
            // this many budgets anyway, and clearing keeps the cost per failure O(1) amortized
            // instead of a scan of the shard for every new address.
            map.retain(|_, &mut (tokens, since)| Self::refilled(tokens, since, now) < AUTH_FAILURE_BURST);
            if map.len() > AUTH_FAILURE_MAX_TRACKED * 3 / 4 {
                map.clear();
            }
        }
        let (tokens, since) = map.entry(key).or_insert((AUTH_FAILURE_BURST, now));
        *tokens = (Self::refilled(*tokens, *since, now) - 1.0).max(0.0);
        *since = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn reserve_and_release_keep_every_count_in_step() {
        let (admission, routes) = (Admission::new(3, 2, 0), RouteTable::default());
        assert_eq!(admission.reserve(&routes, "u"), Ok(1));
        assert_eq!(admission.reserve(&routes, "u"), Ok(2));
        assert_eq!(admission.reserve(&routes, "u"), Err(Refusal::UserFull));
        assert_eq!(admission.websockets(), 2, "a refusal gives its slot back");
        assert_eq!(admission.reserve(&routes, "v"), Ok(1));
        assert_eq!(admission.reserve(&routes, "w"), Err(Refusal::InstanceFull));
        assert_eq!((routes.user_count(), routes.connections_of("u")), (2, 2));
        assert_eq!(admission.release(&routes, "u"), 1);
        assert_eq!(admission.release(&routes, "u"), 0);
        assert_eq!(admission.websockets(), 1);
        assert_eq!((routes.user_count(), routes.connections_of("u")), (1, 0));
    }

    #[test]
    fn no_per_user_cap_still_counts_users() {
        let (admission, routes) = (Admission::new(10, 0, 0), RouteTable::default());
        for _ in 0..5 {
            admission.reserve(&routes, "many").unwrap();
        }
        assert_eq!((routes.user_count(), routes.connections_of("many")), (1, 5));
    }

    #[test]
    fn connect_rate_allows_a_burst_then_refills() {
        let admission = Admission::new(10, 0, 2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        let admitted = (0..10).filter(|_| admission.admit_connection(ip, t0)).count();
        assert_eq!(admitted, 4);
        assert!(admission.admit_connection(ip, t0 + Duration::from_millis(600)));
        assert!(admission.admit_connection("10.0.0.2".parse().unwrap(), t0));
    }

    #[test]
    fn failed_authentications_are_limited_per_address_and_refill() {
        let limit = AuthFailureLimit::default();
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..20 {
            assert!(!limit.exhausted(a, t0));
            limit.failed(a, t0);
        }
        assert!(limit.exhausted(a, t0));
        assert!(!limit.exhausted(b, t0), "another address is not affected");
        // 5 per second: one more failure allowed after 200 ms.
        let later = t0 + std::time::Duration::from_millis(200);
        assert!(!limit.exhausted(a, later));
        limit.failed(a, later);
        assert!(limit.exhausted(a, later));
        assert!(!limit.exhausted(a, later + std::time::Duration::from_secs(4)));
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_64() {
        let limit = AuthFailureLimit::default();
        let t0 = Instant::now();
        for i in 0..20u16 {
            limit.failed(format!("2001:db8:1:2::{i:x}").parse().unwrap(), t0);
        }
        assert!(limit.exhausted("2001:db8:1:2:ffff::1".parse().unwrap(), t0));
        assert!(!limit.exhausted("2001:db8:1:3::1".parse().unwrap(), t0));
        for _ in 0..20 {
            limit.failed("::ffff:192.0.2.9".parse().unwrap(), t0);
        }
        assert!(limit.exhausted("192.0.2.9".parse().unwrap(), t0), "v4-mapped is the v4 address");
    }

    #[test]
    fn tracking_is_bounded() {
        let limit = AuthFailureLimit::default();
        let t0 = Instant::now();
        for i in 0..(AUTH_FAILURE_MAX_TRACKED * AUTH_FAILURE_SHARDS * 2) as u32 {
            limit.failed(IpAddr::V4(i.into()), t0);
        }
        let tracked: usize = limit.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(tracked <= AUTH_FAILURE_MAX_TRACKED * AUTH_FAILURE_SHARDS, "{tracked}");
    }
}
