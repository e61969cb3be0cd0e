//! Counters and gauges, and their two renderings: seed 003's JSON and Prometheus text.
//!
//! Each event-loop thread counts into plain integers ([`LocalCounters`]) and folds them into
//! its own cache-line-aligned atomics once per loop iteration, so the delivery path pays no
//! atomic operation per message and no two threads write the same line.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::webhook::WebhookMetrics;

/// Upper bounds (seconds) of the publish → socket-write latency histogram.
pub const LATENCY_BOUNDS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
const BUCKETS: usize = LATENCY_BOUNDS.len() + 1;

/// Plain counters a loop thread owns and folds in with [`LoopMetrics::absorb`].
#[derive(Debug, Default)]
pub struct LocalCounters {
    pub sent: u64,
    pub failed: u64,
    pub slow_consumers: u64,
    pub acked: u64,
    pub ignored_client_messages: u64,
    pub protocol_errors: u64,
    pub rejected_upgrades: u64,
    pub accept_errors: u64,
    pub token_expired_closes: u64,
    pub idle_closes: u64,
    /// Peers closed because their output stayed over its bound (they stopped reading).
    pub output_stalled: u64,
    /// Plain HTTP connections closed to make room for new ones at the cap.
    pub http_evicted: u64,
    /// Connections refused over HERALD_CONNECT_RATE_PER_IP.
    pub rate_limited: u64,
    /// TLS handshakes completed.
    pub tls_handshakes: u64,
    /// Connections dropped for not speaking TLS or failing it (plain HTTP, garbage, handshake
    /// errors).
    pub tls_failures: u64,
    /// Notifications encoded into their Server-Sent Events form (once each, however many
    /// event streams receive them).
    pub events_encoded: u64,
    pub latency_buckets: [u64; BUCKETS],
    pub latency_sum_micros: u64,
}

impl LocalCounters {
    /// Records one delivery that took `elapsed` from entering herald to leaving the socket.
    pub fn delivered(&mut self, elapsed: Duration) {
        self.sent += 1;
        let secs = elapsed.as_secs_f64();
        let bucket = LATENCY_BOUNDS.iter().position(|&b| secs <= b).unwrap_or(BUCKETS - 1);
        self.latency_buckets[bucket] += 1;
        self.latency_sum_micros += elapsed.as_micros() as u64;
    }
}

/// One loop's counters, written by that loop only.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct LoopMetrics {
    pub connections: AtomicI64,
    /// Of `connections`, the Server-Sent Events streams.
    pub event_streams: AtomicI64,
    sent: AtomicU64,
    failed: AtomicU64,
    slow_consumers: AtomicU64,
    acked: AtomicU64,
    ignored_client_messages: AtomicU64,
    protocol_errors: AtomicU64,
    rejected_upgrades: AtomicU64,
    accept_errors: AtomicU64,
    token_expired_closes: AtomicU64,
    idle_closes: AtomicU64,
    output_stalled: AtomicU64,
    http_evicted: AtomicU64,
    rate_limited: AtomicU64,
    tls_handshakes: AtomicU64,
    tls_failures: AtomicU64,
    events_encoded: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS],
    latency_sum_micros: AtomicU64,
    /// Connections of any kind (HTTP included) in this loop's slab.
    pub slab_entries: AtomicU64,
    /// Keys in this loop's user and topic index.
    pub index_entries: AtomicU64,
}

impl LoopMetrics {
    /// Adds `local` into the shared counters and zeroes it.
    pub fn absorb(&self, local: &mut LocalCounters) {
        let add = |counter: &AtomicU64, value: &mut u64| {
            if *value != 0 {
                counter.fetch_add(*value, Relaxed);
                *value = 0;
            }
        };
        add(&self.sent, &mut local.sent);
        add(&self.failed, &mut local.failed);
        add(&self.slow_consumers, &mut local.slow_consumers);
        add(&self.acked, &mut local.acked);
        add(&self.ignored_client_messages, &mut local.ignored_client_messages);
        add(&self.protocol_errors, &mut local.protocol_errors);
        add(&self.rejected_upgrades, &mut local.rejected_upgrades);
        add(&self.accept_errors, &mut local.accept_errors);
        add(&self.token_expired_closes, &mut local.token_expired_closes);
        add(&self.idle_closes, &mut local.idle_closes);
        add(&self.output_stalled, &mut local.output_stalled);
        add(&self.http_evicted, &mut local.http_evicted);
        add(&self.rate_limited, &mut local.rate_limited);
        add(&self.tls_handshakes, &mut local.tls_handshakes);
        add(&self.tls_failures, &mut local.tls_failures);
        add(&self.events_encoded, &mut local.events_encoded);
        for (shared, value) in self.latency_buckets.iter().zip(local.latency_buckets.iter_mut()) {
            add(shared, value);
        }
        add(&self.latency_sum_micros, &mut local.latency_sum_micros);
    }
}

/// Redis connection state as the health endpoint reports it.
#[derive(Debug, Default)]
pub struct RedisHealth {
    pub configured: bool,
    /// Redis was reached (and subscribed to) at least once since start.
    pub ever_up: AtomicBool,
    pub subscriber_up: AtomicBool,
    pub publisher_up: AtomicBool,
    /// Channels (exact mode) or patterns the reader is subscribed to, confirmed by Redis.
    pub subscriptions: AtomicU64,
    pub ping_micros: AtomicU64,
    pub last_error: Mutex<&'static str>,
}

impl RedisHealth {
    pub fn is_up(&self) -> bool {
        self.subscriber_up.load(Relaxed) && self.publisher_up.load(Relaxed)
    }

    /// Records the kind of the latest failure (`"connection refused"`, `"authentication
    /// failed"`, …): /health shows it to anyone, so never the error's own text.
    pub fn set_error(&self, kind: &'static str) {
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = kind;
        }
    }
}

/// Everything counted, process wide.
#[derive(Debug)]
pub struct Metrics {
    pub started: Instant,
    pub loops: Box<[LoopMetrics]>,
    pub received_from_redis: AtomicU64,
    pub received_from_http: AtomicU64,
    pub dropped_invalid: AtomicU64,
    pub redis_reconnects: AtomicU64,
    /// Deliveries a loop missed because its inbox was full (see `mailbox`).
    pub dropped_overload: AtomicU64,
    /// Publish-API requests whose credential was missing or wrong.
    pub api_auth_failures: AtomicU64,
    /// Publish-API requests refused (429) after too many failures from their address.
    pub api_auth_rate_limited: AtomicU64,
    /// HERALD_JWKS refreshes after start that put a key set in force.
    pub jwks_refreshes: AtomicU64,
    /// HERALD_JWKS refreshes that failed (unreachable, error status, malformed): the keys in
    /// force stayed.
    pub jwks_refresh_failures: AtomicU64,
    pub redis: RedisHealth,
    /// Presence transitions this instance emitted (to the Redis channel and the webhook).
    pub presence_events: AtomicU64,
    pub webhook: Arc<WebhookMetrics>,
    pub history: HistoryCounters,
}

/// What history did (rare events: resumes and acks, not deliveries).
#[derive(Debug, Default)]
pub struct HistoryCounters {
    /// Notifications stored (embedded: this instance's store; Redis: this instance's publishes).
    pub appended: AtomicU64,
    /// Entries the embedded store dropped for memory.
    pub evicted: AtomicU64,
    pub resumes: AtomicU64,
    pub replayed: AtomicU64,
    pub incomplete_resumes: AtomicU64,
    pub acks: AtomicU64,
    /// Acks of positions that do not exist or are not after the marker.
    pub acks_ignored: AtomicU64,
}

/// A consistent-enough read of all counters for one response.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub uptime_seconds: u64,
    pub active_connections: i64,
    pub event_streams: i64,
    pub unique_users: u64,
    pub unique_topics: u64,
    pub received_from_redis: u64,
    pub received_from_http: u64,
    pub dropped_invalid: u64,
    pub dropped_overload: u64,
    pub redis_reconnects: u64,
    pub redis_subscriptions: u64,
    pub presence_events: u64,
    pub history: [u64; 7],
    pub webhook_delivered: u64,
    pub webhook_retries: u64,
    pub webhook_dropped: u64,
    pub api_auth_failures: u64,
    pub api_auth_rate_limited: u64,
    pub jwks_refreshes: u64,
    pub jwks_refresh_failures: u64,
    pub sent: u64,
    pub failed: u64,
    pub slow_consumers: u64,
    pub acked: u64,
    pub ignored_client_messages: u64,
    pub protocol_errors: u64,
    pub rejected_upgrades: u64,
    pub accept_errors: u64,
    pub token_expired_closes: u64,
    pub idle_closes: u64,
    pub output_stalled: u64,
    pub http_evicted: u64,
    pub rate_limited: u64,
    pub tls_handshakes: u64,
    pub tls_failures: u64,
    pub events_encoded: u64,
    pub slab_entries: u64,
    pub index_entries: u64,
    pub latency_buckets: [u64; BUCKETS],
    pub latency_sum_micros: u64,
}

impl Metrics {
    pub fn new(loops: usize, redis_configured: bool) -> Metrics {
        Metrics {
            started: Instant::now(),
            loops: (0..loops).map(|_| LoopMetrics::default()).collect(),
            received_from_redis: AtomicU64::new(0),
            received_from_http: AtomicU64::new(0),
            dropped_invalid: AtomicU64::new(0),
            redis_reconnects: AtomicU64::new(0),
            dropped_overload: AtomicU64::new(0),
            api_auth_failures: AtomicU64::new(0),
            api_auth_rate_limited: AtomicU64::new(0),
            jwks_refreshes: AtomicU64::new(0),
            jwks_refresh_failures: AtomicU64::new(0),
            redis: RedisHealth { configured: redis_configured, ..RedisHealth::default() },
            presence_events: AtomicU64::new(0),
            webhook: Arc::default(),
            history: HistoryCounters::default(),
        }
    }

    /// Counts deliveries lost to full loop inboxes.
    pub fn count_overload(&self, dropped: u32) {
        if dropped != 0 {
            self.dropped_overload.fetch_add(u64::from(dropped), Relaxed);
        }
    }

    /// Reads every counter; `unique_users` and `unique_topics` are the caller's (they live in
    /// admission and the route table).
    pub fn snapshot(&self, unique_users: u64, unique_topics: u64) -> Snapshot {
        let mut s = Snapshot {
            uptime_seconds: self.started.elapsed().as_secs(),
            unique_users,
            unique_topics,
            dropped_overload: self.dropped_overload.load(Relaxed),
            received_from_redis: self.received_from_redis.load(Relaxed),
            received_from_http: self.received_from_http.load(Relaxed),
            dropped_invalid: self.dropped_invalid.load(Relaxed),
            redis_reconnects: self.redis_reconnects.load(Relaxed),
            redis_subscriptions: self.redis.subscriptions.load(Relaxed),
            presence_events: self.presence_events.load(Relaxed),
            history: {
                let h = &self.history;
                [&h.appended, &h.evicted, &h.resumes, &h.replayed, &h.incomplete_resumes, &h.acks, &h.acks_ignored]
                    .map(|c| c.load(Relaxed))
            },
            webhook_delivered: self.webhook.delivered.load(Relaxed),
            webhook_retries: self.webhook.retries.load(Relaxed),
            webhook_dropped: self.webhook.dropped.load(Relaxed),
            api_auth_failures: self.api_auth_failures.load(Relaxed),
            api_auth_rate_limited: self.api_auth_rate_limited.load(Relaxed),
            jwks_refreshes: self.jwks_refreshes.load(Relaxed),
            jwks_refresh_failures: self.jwks_refresh_failures.load(Relaxed),
            ..Snapshot::default()
        };
        for l in self.loops.iter() {
            s.active_connections += l.connections.load(Relaxed);
            s.event_streams += l.event_streams.load(Relaxed);
            s.sent += l.sent.load(Relaxed);
            s.failed += l.failed.load(Relaxed);
            s.slow_consumers += l.slow_consumers.load(Relaxed);
            s.acked += l.acked.load(Relaxed);
            s.ignored_client_messages += l.ignored_client_messages.load(Relaxed);
            s.protocol_errors += l.protocol_errors.load(Relaxed);
            s.rejected_upgrades += l.rejected_upgrades.load(Relaxed);
            s.accept_errors += l.accept_errors.load(Relaxed);
            s.token_expired_closes += l.token_expired_closes.load(Relaxed);
            s.idle_closes += l.idle_closes.load(Relaxed);
            s.output_stalled += l.output_stalled.load(Relaxed);
            s.http_evicted += l.http_evicted.load(Relaxed);
            s.rate_limited += l.rate_limited.load(Relaxed);
            s.tls_handshakes += l.tls_handshakes.load(Relaxed);
            s.tls_failures += l.tls_failures.load(Relaxed);
            s.events_encoded += l.events_encoded.load(Relaxed);
            s.slab_entries += l.slab_entries.load(Relaxed);
            s.index_entries += l.index_entries.load(Relaxed);
            for (total, b) in s.latency_buckets.iter_mut().zip(l.latency_buckets.iter()) {
                *total += b.load(Relaxed);
            }
            s.latency_sum_micros += l.latency_sum_micros.load(Relaxed);
        }
        s
    }
}

impl Snapshot {
    /// Seed 003 §3, plus herald's own counters in extra fields.
    pub fn to_json(&self, timestamp: &str) -> String {
        serde_json::json!({
            "service": "herald",
            "timestamp": timestamp,
            "uptime_seconds": self.uptime_seconds,
            "connections": {
                "active": self.active_connections,
                "total_unique_users": self.unique_users,
                "total_unique_topics": self.unique_topics,
                "sse": self.event_streams,
            },
            "messages": {
                "received_from_redis": self.received_from_redis,
                "received_from_http": self.received_from_http,
                "sent_to_clients": self.sent,
                "failed": self.failed,
                "dropped_invalid": self.dropped_invalid,
                "dropped_overload": self.dropped_overload,
                "slow_consumers": self.slow_consumers,
                "acked": self.acked,
                "ignored_client_messages": self.ignored_client_messages,
                "sse_encoded": self.events_encoded,
            },
            "errors": {
                "protocol": self.protocol_errors,
                "rejected_upgrades": self.rejected_upgrades,
                "accept": self.accept_errors,
                "token_expired_closes": self.token_expired_closes,
                "idle_closes": self.idle_closes,
                "output_stalled": self.output_stalled,
                "http_evicted": self.http_evicted,
                "rate_limited": self.rate_limited,
                "tls_failures": self.tls_failures,
                "api_auth_failures": self.api_auth_failures,
                "api_auth_rate_limited": self.api_auth_rate_limited,
            },
            "redis": { "reconnects": self.redis_reconnects, "subscriptions": self.redis_subscriptions },
            "presence": {
                "events": self.presence_events,
                "webhook": {
                    "delivered": self.webhook_delivered,
                    "retries": self.webhook_retries,
                    "dropped": self.webhook_dropped,
                },
            },
            "tls": { "handshakes": self.tls_handshakes, "failures": self.tls_failures },
            "history": {
                "appended": self.history[0],
                "evicted": self.history[1],
                "resumes": self.history[2],
                "replayed": self.history[3],
                "incomplete_resumes": self.history[4],
                "acks": self.history[5],
                "acks_ignored": self.history[6],
            },
            "jwks": { "refreshes": self.jwks_refreshes, "refresh_failures": self.jwks_refresh_failures },
            "internals": { "slab_entries": self.slab_entries, "index_entries": self.index_entries },
        })
        .to_string()
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
        };
        metric("herald_uptime_seconds", "gauge", "Seconds since start.", self.uptime_seconds.to_string());
        metric(
            "herald_connections_active",
            "gauge",
            "Open connections (WebSocket and Server-Sent Events).",
            self.active_connections.to_string(),
        );
        metric(
            "herald_connections_sse",
            "gauge",
            "Open Server-Sent Events streams (included in herald_connections_active).",
            self.event_streams.to_string(),
        );
        metric("herald_users_unique", "gauge", "Distinct users with a connection.", self.unique_users.to_string());
        metric("herald_topics_unique", "gauge", "Distinct topics with a subscriber.", self.unique_topics.to_string());
        metric(
            "herald_redis_subscriptions",
            "gauge",
            "Redis channels (exact mode) or patterns this instance is subscribed to.",
            self.redis_subscriptions.to_string(),
        );
        let counters: [(&str, &str, u64); 36] = [
            ("herald_history_appended_total", "Notifications stored in history.", self.history[0]),
            ("herald_history_evicted_total", "History entries dropped for HERALD_HISTORY_MEMORY.", self.history[1]),
            ("herald_history_resumes_total", "Resumes (since / Last-Event-ID) served.", self.history[2]),
            ("herald_history_replayed_total", "Notifications replayed to resuming clients.", self.history[3]),
            (
                "herald_history_incomplete_resumes_total",
                "Resumes that could not replay everything after their position.",
                self.history[4],
            ),
            ("herald_history_acks_total", "Acks that moved a read marker.", self.history[5]),
            ("herald_history_acks_ignored_total", "Acks of unknown or old positions.", self.history[6]),
            ("herald_messages_received_total", "Notifications received from Redis.", self.received_from_redis),
            ("herald_messages_received_http_total", "Notifications received by the HTTP API.", self.received_from_http),
            ("herald_messages_sent_total", "Notifications written to clients.", self.sent),
            (
                "herald_sse_events_encoded_total",
                "Notifications encoded as Server-Sent Events (once each, shared by every stream).",
                self.events_encoded,
            ),
            ("herald_messages_failed_total", "Deliveries that failed (slow consumers, closed sockets).", self.failed),
            ("herald_messages_dropped_invalid_total", "Published messages dropped as invalid.", self.dropped_invalid),
            (
                "herald_messages_dropped_overload_total",
                "Deliveries an event loop missed because its inbox was full.",
                self.dropped_overload,
            ),
            ("herald_slow_consumers_total", "Connections closed as slow consumers.", self.slow_consumers),
            ("herald_messages_acked_total", "Client acknowledgements.", self.acked),
            ("herald_client_messages_ignored_total", "Client messages not understood.", self.ignored_client_messages),
            (
                "herald_protocol_errors_total",
                "Connections closed for WebSocket protocol violations.",
                self.protocol_errors,
            ),
            (
                "herald_upgrades_rejected_total",
                "Upgrade requests refused (auth, limits, origin).",
                self.rejected_upgrades,
            ),
            ("herald_accept_errors_total", "Failed accept() calls (e.g. out of file descriptors).", self.accept_errors),
            (
                "herald_token_expired_closes_total",
                "Connections closed because their token expired.",
                self.token_expired_closes,
            ),
            ("herald_idle_closes_total", "Connections closed after the idle timeout.", self.idle_closes),
            (
                "herald_output_stalled_total",
                "Peers closed because they left their output unread past the bound.",
                self.output_stalled,
            ),
            ("herald_http_evicted_total", "Plain HTTP connections closed to make room at the cap.", self.http_evicted),
            ("herald_rate_limited_total", "Connections refused over the per-IP connect rate.", self.rate_limited),
            ("herald_tls_handshakes_total", "TLS handshakes completed.", self.tls_handshakes),
            (
                "herald_tls_failures_total",
                "Connections dropped for not speaking TLS or failing its handshake.",
                self.tls_failures,
            ),
            ("herald_redis_reconnects_total", "Redis reconnections.", self.redis_reconnects),
            ("herald_presence_events_total", "Presence transitions this instance emitted.", self.presence_events),
            ("herald_webhook_delivered_total", "Presence events the webhook accepted.", self.webhook_delivered),
            ("herald_webhook_retries_total", "Webhook attempts retried.", self.webhook_retries),
            (
                "herald_webhook_dropped_total",
                "Presence events dropped: queue full, refused, or failed 4 times.",
                self.webhook_dropped,
            ),
            (
                "herald_api_auth_failures_total",
                "Publish-API requests with a missing or wrong credential.",
                self.api_auth_failures,
            ),
            (
                "herald_api_auth_rate_limited_total",
                "Publish-API requests refused after too many failed authentications from their address.",
                self.api_auth_rate_limited,
            ),
            ("herald_jwks_refreshes_total", "HERALD_JWKS refreshes that put a key set in force.", self.jwks_refreshes),
            (
                "herald_jwks_refresh_failures_total",
                "HERALD_JWKS refreshes that failed; the keys in force stayed.",
                self.jwks_refresh_failures,
            ),
        ];
        for (name, help, value) in counters {
            metric(name, "counter", help, value.to_string());
        }
        let name = "herald_delivery_latency_seconds";
        let _ = write!(
            out,
            "# HELP {name} Time from a notification entering herald to its last byte written to a client.\n# TYPE {name} histogram\n"
        );
        let mut cumulative = 0;
        for (i, count) in self.latency_buckets.iter().enumerate() {
            cumulative += count;
            let bound = LATENCY_BOUNDS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_sum {}", self.latency_sum_micros as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {cumulative}");
        out
    }
}

/// Whether an `Accept` header prefers Prometheus text over JSON (highest q wins; ties go
/// to the earlier entry; no header means JSON, the seed's format).
pub fn prefers_prometheus(accept: Option<&str>) -> bool {
    let Some(accept) = accept else { return false };
    let mut best: Option<(f32, bool)> = None;
    for entry in accept.split(',') {
        let mut parts = entry.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q =
            parts.filter_map(|p| p.trim().strip_prefix("q=")).find_map(|q| q.trim().parse::<f32>().ok()).unwrap_or(1.0);
        let is_text = match media.as_str() {
            "text/plain" | "application/openmetrics-text" => true,
            "application/json" | "application/*" | "*/*" => false,
            _ => continue,
        };
        if q > 0.0 && best.is_none_or(|(best_q, _)| q > best_q) {
            best = Some((q, is_text));
        }
    }
    best.is_some_and(|(_, text)| text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        assert!(!prefers_prometheus(None));
        assert!(prefers_prometheus(Some("text/plain")));
        assert!(prefers_prometheus(Some(
            "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
        assert!(!prefers_prometheus(Some("application/json, text/plain;q=0.9")));
        assert!(!prefers_prometheus(Some("*/*")));
    }

    #[test]
    fn latency_histogram_is_cumulative() {
        let m = Metrics::new(1, false);
        let mut local = LocalCounters::default();
        local.delivered(Duration::from_micros(50));
        local.delivered(Duration::from_millis(3));
        local.delivered(Duration::from_secs(10));
        m.loops[0].absorb(&mut local);
        let text = m.snapshot(0, 0).to_prometheus();
        assert!(text.contains("herald_delivery_latency_seconds_bucket{le=\"0.0001\"} 1\n"));
        assert!(text.contains("herald_delivery_latency_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("herald_delivery_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("herald_messages_sent_total 3\n"));
        assert_eq!(local.sent, 0);
    }

    #[test]
    fn event_stream_gauge_and_counter_are_in_both_renderings() {
        let m = Metrics::new(2, false);
        m.loops[0].connections.fetch_add(3, Relaxed);
        m.loops[0].event_streams.fetch_add(2, Relaxed);
        m.loops[1].event_streams.fetch_add(1, Relaxed);
        m.loops[1].absorb(&mut LocalCounters { events_encoded: 4, ..LocalCounters::default() });
        let snapshot = m.snapshot(0, 0);
        let text = snapshot.to_prometheus();
        assert!(text.contains("herald_connections_sse 3\n"), "{text}");
        assert!(text.contains("herald_sse_events_encoded_total 4\n"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&snapshot.to_json("t")).unwrap();
        assert_eq!(json["connections"]["sse"], 3);
        assert_eq!(json["messages"]["sse_encoded"], 4);
    }

    #[test]
    fn jwks_refresh_counters_are_in_both_renderings() {
        let m = Metrics::new(1, false);
        m.jwks_refreshes.fetch_add(3, Relaxed);
        m.jwks_refresh_failures.fetch_add(2, Relaxed);
        let snapshot = m.snapshot(0, 0);
        let text = snapshot.to_prometheus();
        assert!(text.contains("herald_jwks_refreshes_total 3\n"), "{text}");
        assert!(text.contains("herald_jwks_refresh_failures_total 2\n"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&snapshot.to_json("t")).unwrap();
        assert_eq!(json["jwks"]["refreshes"], 3);
        assert_eq!(json["jwks"]["refresh_failures"], 2);
    }
}
