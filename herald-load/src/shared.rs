//! State the main thread, the workers and the publisher share: the phase, the measured
//! window, how many connections of each user are live, and per-worker counters that only
//! their worker writes (plain stores, no contended read-modify-write on the hot path).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::cli::Endpoint;

pub const PHASE_CONNECT: u8 = 0;
pub const PHASE_RUN: u8 = 1;
pub const PHASE_CLOSE: u8 = 2;

/// Counters one worker publishes after each loop iteration.
#[repr(align(128))]
#[derive(Debug, Default)]
pub struct WorkerCounters {
    pub attempted: AtomicU64,
    pub established: AtomicU64,
    pub failed: AtomicU64,
    pub pending: AtomicU64,
    pub unexpected_closes: AtomicU64,
    /// New (non-duplicate) load messages, whatever their timestamp.
    pub received_all: AtomicU64,
    /// New load messages stamped inside the measured window.
    pub received_window: AtomicU64,
    /// Every connection attempted and resolved (upgraded or failed).
    pub done_connecting: AtomicBool,
}

#[derive(Debug)]
pub struct Shared {
    pub phase: AtomicU8,
    /// Measured window, CLOCK_REALTIME ns of the message timestamps; u64::MAX until known.
    pub window_start_ns: AtomicU64,
    pub window_end_ns: AtomicU64,
    /// Live (upgraded, and subscribed when that is asked for) connections per user index.
    pub live_per_user: Vec<AtomicU32>,
    pub live_total: AtomicU64,
    pub workers: Vec<WorkerCounters>,
    /// Origin of the monotonic timestamps workers report (connect times).
    pub epoch: Instant,
}

impl Shared {
    pub fn new(users: usize, threads: usize) -> Shared {
        Shared {
            phase: AtomicU8::new(PHASE_CONNECT),
            window_start_ns: AtomicU64::new(u64::MAX),
            window_end_ns: AtomicU64::new(u64::MAX),
            live_per_user: (0..users).map(|_| AtomicU32::new(0)).collect(),
            live_total: AtomicU64::new(0),
            workers: (0..threads).map(|_| WorkerCounters::default()).collect(),
            epoch: Instant::now(),
        }
    }

    pub fn sum(&self, field: impl Fn(&WorkerCounters) -> &AtomicU64) -> u64 {
        self.workers.iter().map(|w| field(w).load(Relaxed)).sum()
    }

    pub fn all_done_connecting(&self) -> bool {
        self.workers.iter().all(|w| w.done_connecting.load(Relaxed))
    }
}

/// Who connection `i` is.
#[derive(Debug, Clone)]
pub enum Users {
    /// User `i mod count`, named prefix + index.
    Numbered { prefix: String, count: usize },
    /// Every connection is this user (index 0).
    Single(String),
}

impl Users {
    pub fn count(&self) -> usize {
        match self {
            Users::Numbered { count, .. } => *count,
            Users::Single(_) => 1,
        }
    }

    pub fn index_of_conn(&self, conn: usize) -> usize {
        match self {
            Users::Numbered { count, .. } => conn % (*count).max(1),
            Users::Single(_) => 0,
        }
    }

    pub fn name(&self, index: usize) -> String {
        match self {
            Users::Numbered { prefix, .. } => format!("{prefix}{index}"),
            Users::Single(name) => name.clone(),
        }
    }
}

/// What every worker needs to open and run its connections.
#[derive(Debug)]
pub struct ConnPlan {
    pub endpoint: Endpoint,
    pub source_ips: Vec<IpAddr>,
    pub connections: usize,
    pub threads: usize,
    /// Per second over all threads; 0 = unlimited.
    pub connect_rate: f64,
    pub max_pending: usize,
    pub connect_timeout: Duration,
    pub users: Users,
    pub topic: String,
    /// Text frame to send once upgraded (topic subscription).
    pub subscribe: Option<Vec<u8>>,
    /// Seed of the Sec-WebSocket-Key values.
    pub key_seed: u64,
    /// wss://: the configuration every connection's TLS session starts from.
    pub tls: Option<crate::tls::Client>,
}
