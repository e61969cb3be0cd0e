//! State every thread reads: configuration, the token verifier, metrics, admission, the
//! routing fabric (route table + loop mailboxes) and the broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use crate::admission::{Admission, AuthFailureLimit};
use crate::auth::Verifier;
use crate::broker::{Broker, Routing};
use crate::config::Config;
use crate::metrics::Metrics;

pub struct Shared {
    pub config: Config,
    pub verifier: Verifier,
    pub metrics: Arc<Metrics>,
    pub admission: Admission,
    pub routing: Arc<Routing>,
    pub broker: Broker,
    /// Present when the port serves TLS: the certificate in use, reloadable.
    pub tls: Option<crate::tls::Acceptor>,
    /// Failed publish-API authentications per client address.
    pub auth_failures: AuthFailureLimit,
    pub shutting_down: AtomicBool,
    /// Random per process: tells this instance's relayed messages apart from others'.
    pub instance_id: u64,
    /// Unique per instance, for seed-004 `notification_id`s.
    pub next_notification_id: AtomicU64,
    /// Most plain (not upgraded) connections one loop holds; see [`plain_connection_cap`].
    pub plain_cap_per_loop: usize,
}

impl Shared {
    /// State for a server about to start: counters at zero, loops not yet attached.
    pub fn new(
        config: Config,
        verifier: Verifier,
        metrics: Arc<Metrics>,
        routing: Arc<Routing>,
        broker: Broker,
        instance_id: u64,
    ) -> Shared {
        Shared {
            admission: Admission::new(
                config.max_connections,
                config.max_connections_per_user,
                config.connect_rate_per_ip,
            ),
            verifier,
            metrics,
            routing,
            broker,
            tls: None,
            auth_failures: AuthFailureLimit::default(),
            shutting_down: AtomicBool::new(false),
            next_notification_id: AtomicU64::new(0),
            instance_id,
            plain_cap_per_loop: plain_connection_cap(open_file_limit()).div_ceil(config.threads),
            config,
        }
    }

    pub fn loops(&self) -> &[crate::mailbox::LoopHandle] {
        self.routing.loops()
    }
}

/// How an instance names itself: in `/health`, in Redis (presence fields, reply channels,
/// CLIENT LIST), in logs.
pub fn instance_name(instance_id: u64) -> String {
    format!("{instance_id:016x}")
}

/// Descriptors kept back for what is not a client: listeners, pollers, wakers, Redis, logs.
const RESERVED_FDS: usize = 64;

/// Plain HTTP connections (health checks, publishes, upgrades in progress) an instance holds at
/// most: a quarter of its descriptors, so unauthenticated sockets can never take the ones
/// WebSockets need. At the cap the oldest plain connection makes room for a new one.
pub fn plain_connection_cap(open_files: usize) -> usize {
    (open_files.saturating_sub(RESERVED_FDS) / 4).clamp(16, 16_384)
}

/// The process's soft limit on open files.
pub fn open_file_limit() -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the `rlimit` struct we pass by pointer, which lives on this
    // stack frame for the duration of the call.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    if ok { usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX) } else { 1024 }
}
