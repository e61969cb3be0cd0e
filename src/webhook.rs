//! Presence webhook: each event is POSTed as JSON to HERALD_WEBHOOK_URL, signed with
//! HMAC-SHA256 over the exact body (`X-Herald-Signature: sha256=<hex>`) when a secret is set.
//!
//! Never in the way of delivery: events go to a bounded queue that one thread of its own
//! drains; a full queue drops the event and counts it. A 5xx, 408, 429, timeout or connection
//! failure is retried 3 times with growing pauses, then the event is dropped and counted;
//! other 4xx answers are the receiver refusing it, counted as dropped at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tracing::{debug, warn};

/// Events waiting to be posted before new ones are dropped.
const QUEUE: usize = 10_000;
/// Pauses before the retries.
const RETRY_PAUSES: [Duration; 3] = [Duration::from_millis(200), Duration::from_secs(1), Duration::from_secs(3)];
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the webhook did, for `/metrics`.
#[derive(Debug, Default)]
pub struct WebhookMetrics {
    pub delivered: AtomicU64,
    pub retries: AtomicU64,
    pub dropped: AtomicU64,
}

pub struct Webhook {
    queue: Sender<String>,
    metrics: Arc<WebhookMetrics>,
}

impl Webhook {
    /// Starts the posting thread for `url` (http:// or https://).
    pub fn start(url: String, secret: Option<Vec<u8>>, metrics: Arc<WebhookMetrics>) -> Result<Arc<Webhook>, String> {
        let (queue, events) = crossbeam_channel::bounded(QUEUE);
        let poster = Poster {
            url,
            key: secret.map(|s| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &s)),
            agent: agent(),
            metrics: metrics.clone(),
        };
        std::thread::Builder::new()
            .name("herald-webhook".into())
            .spawn(move || poster.run(events))
            .map_err(|e| format!("cannot start the webhook thread: {e}"))?;
        Ok(Arc::new(Webhook { queue, metrics }))
    }

    /// Queues one event; never waits.
    pub fn post(&self, body: String) {
        match self.queue.try_send(body) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.metrics.dropped.fetch_add(1, Relaxed);
            }
        }
    }
}

/// `sha256=<hex of HMAC-SHA256(key, body)>`.
pub fn signature(key: &ring::hmac::Key, body: &[u8]) -> String {
    let tag = ring::hmac::sign(key, body);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for byte in tag.as_ref() {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_global(Some(ATTEMPT_TIMEOUT))
        // Statuses are ours to judge (retry or not), not errors.
        .http_status_as_error(false)
        // A redirect would replay a signed body to a place nobody configured.
        .max_redirects(0)
        .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent()
}

struct Poster {
    url: String,
    key: Option<ring::hmac::Key>,
    agent: ureq::Agent,
    metrics: Arc<WebhookMetrics>,
}

/// How one attempt went.
enum Attempt {
    Delivered,
    /// Worth another try (5xx, 408, 429, timeout, connection failure).
    Retry(String),
    /// The receiver refused it; trying again would not help.
    Refused(u16),
}

impl Poster {
    fn run(self, events: Receiver<String>) {
        while let Ok(body) = events.recv() {
            self.deliver(&body);
        }
    }

    fn deliver(&self, body: &str) {
        let signature = self.key.as_ref().map(|key| signature(key, body.as_bytes()));
        let mut pauses = RETRY_PAUSES.iter();
        loop {
            match self.attempt(body, signature.as_deref()) {
                Attempt::Delivered => {
                    self.metrics.delivered.fetch_add(1, Relaxed);
                    return;
                }
                Attempt::Refused(status) => {
                    warn!(status, "presence webhook refused an event; dropped");
                    self.metrics.dropped.fetch_add(1, Relaxed);
                    return;
                }
                Attempt::Retry(why) => match pauses.next() {
                    Some(pause) => {
                        debug!(why, "presence webhook attempt failed; retrying");
                        self.metrics.retries.fetch_add(1, Relaxed);
                        std::thread::sleep(*pause);
                    }
                    None => {
                        warn!(why, "presence webhook failed 4 times; event dropped");
                        self.metrics.dropped.fetch_add(1, Relaxed);
                        return;
                    }
                },
            }
        }
    }

    fn attempt(&self, body: &str, signature: Option<&str>) -> Attempt {
        let mut request = self.agent.post(&self.url).header("Content-Type", "application/json");
        if let Some(signature) = signature {
            request = request.header("X-Herald-Signature", signature);
        }
        match request.send(body) {
            Ok(response) => match response.status().as_u16() {
                200..=299 => Attempt::Delivered,
                status @ (408 | 429 | 500..=599) => Attempt::Retry(format!("status {status}")),
                status => Attempt::Refused(status),
            },
            Err(e) => Attempt::Retry(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe");
        assert_eq!(
            signature(&key, b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
