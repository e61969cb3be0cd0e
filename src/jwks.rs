//! HERALD_JWKS: a JSON Web Key Set (RFC 7517) read from a URL or a file, whose RS256/ES256
//! keys verify tokens by their `kid`, kept fresh by a thread of its own.
//!
//! The set is loaded once before herald listens (a failure stops it: exit 2), then refreshed
//! every [`REFRESH_PERIOD`], on SIGHUP, and when a token names a `kid` the set lacks, at most
//! once per [`UNKNOWN_KID_COOLDOWN`]. A refresh that fails (endpoint down, error status,
//! malformed set) keeps the keys in force and is logged and counted. Verification never
//! waits for any of this: the fetcher swaps a finished set into the [`Keyring`].

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use tracing::{debug, info, warn};

use crate::auth::{KeyMaterial, Keyring, RefreshRequests, Requirements, SetKey, read_bounded};
use crate::config::{Config, JwksSource, JwtKey};
use crate::metrics::Metrics;

/// How often the set is fetched when nothing asks sooner.
pub const REFRESH_PERIOD: Duration = Duration::from_secs(5 * 60);
/// Least time between two refreshes caused by unknown `kid`s: anyone can send a token with a
/// made-up `kid`, and must not be able to make herald hammer the key server.
pub const UNKNOWN_KID_COOLDOWN: Duration = Duration::from_secs(60);
/// Largest key set read; real ones are a few KiB. A larger body is an error, whatever its
/// Content-Length says.
pub const MAX_JWKS_BYTES: u64 = 256 * 1024;
/// Most entries in `keys`.
pub const MAX_KEYS: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole request, from resolving the name to the last byte of the body.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_REDIRECTS: u32 = 3;
/// Longest base64url `n` accepted: a 16384-bit modulus.
const MAX_RSA_N_CHARS: usize = 2731;
/// Shortest: a 2048-bit modulus (smaller RSA keys are skipped as too weak).
const MIN_RSA_N_CHARS: usize = 342;
/// A P-256 coordinate: 32 bytes, base64url without padding.
const P256_COORDINATE_CHARS: usize = 43;

#[derive(Deserialize)]
struct RawSet {
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
struct RawKey {
    kty: Option<String>,
    #[serde(rename = "use")]
    usage: Option<String>,
    alg: Option<String>,
    kid: Option<String>,
    n: Option<String>,
    e: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// A key set as herald uses it.
pub struct Parsed {
    pub keys: Vec<SetKey>,
    /// Keys left out and why (not for signatures, unsupported type or algorithm, no `kid`).
    pub skipped: Vec<String>,
}

/// Parses a JWKS document. Keys herald cannot use are skipped (and listed); a document that is
/// not a key set, a supported key with broken material, a repeated `kid`, or a set with no
/// usable key at all is an error, so that a broken set never replaces a working one.
pub fn parse(bytes: &[u8]) -> Result<Parsed, String> {
    let set: RawSet = serde_json::from_slice(bytes).map_err(|e| format!("is not a JSON Web Key Set: {e}"))?;
    if set.keys.len() > MAX_KEYS {
        return Err(format!("has {} keys; at most {MAX_KEYS} are read", set.keys.len()));
    }
    let mut parsed = Parsed { keys: Vec::new(), skipped: Vec::new() };
    for (index, raw) in set.keys.iter().enumerate() {
        let name = match &raw.kid {
            Some(kid) => format!("key {index} (kid {:?})", shorten(kid)),
            None => format!("key {index}"),
        };
        match usable(raw).map_err(|e| format!("{name}: {e}"))? {
            Usable::Key(key) => {
                if parsed.keys.iter().any(|k| k.kid == key.kid) {
                    return Err(format!("{name}: the kid appears twice"));
                }
                parsed.keys.push(key);
            }
            Usable::Skip(reason) => parsed.skipped.push(format!("{name}: {reason}")),
        }
    }
    if parsed.keys.is_empty() {
        let why = if parsed.skipped.is_empty() { String::new() } else { format!(" ({})", parsed.skipped.join("; ")) };
        return Err(format!("has no usable key: herald needs RSA or EC P-256 signing keys with a kid{why}"));
    }
    Ok(parsed)
}

enum Usable {
    Key(SetKey),
    Skip(String),
}

/// One key: a verifying key with its single algorithm, a reason to leave it out, or an error.
fn usable(raw: &RawKey) -> Result<Usable, String> {
    if let Some(usage) = raw.usage.as_deref().filter(|u| *u != "sig") {
        return Ok(Usable::Skip(format!("use {:?} is not sig", shorten(usage))));
    }
    let algorithm = match (raw.kty.as_deref(), raw.crv.as_deref()) {
        (Some("RSA"), _) => Algorithm::RS256,
        (Some("EC"), Some("P-256")) => Algorithm::ES256,
        (Some("EC"), crv) => return Ok(Usable::Skip(format!("curve {:?} is not supported (P-256 is)", crv))),
        (Some(kty), _) => {
            return Ok(Usable::Skip(format!("key type {:?} is not supported (RSA, EC are)", shorten(kty))));
        }
        (None, _) => return Err("has no kty".into()),
    };
    // The key's own `alg`, when given, must be the one herald pairs with its type: a key
    // published for RS512 or PS256 is not silently used for RS256.
    if let Some(alg) = raw.alg.as_deref().filter(|alg| *alg != format!("{algorithm:?}")) {
        return Ok(Usable::Skip(format!(
            "alg {:?} is not supported for this key type ({algorithm:?} is)",
            shorten(alg)
        )));
    }
    let Some(kid) = raw.kid.clone() else {
        return Ok(Usable::Skip("has no kid, and tokens choose keys by kid".into()));
    };
    let key = match algorithm {
        Algorithm::RS256 => {
            let (Some(n), Some(e)) = (raw.n.as_deref(), raw.e.as_deref()) else {
                return Err("an RSA key needs n and e".into());
            };
            if n.len() > MAX_RSA_N_CHARS || e.is_empty() || e.len() > 12 {
                return Err("n or e has an impossible length".into());
            }
            if n.len() < MIN_RSA_N_CHARS {
                return Ok(Usable::Skip("RSA key shorter than 2048 bits".into()));
            }
            DecodingKey::from_rsa_components(n, e).map_err(|_| "n or e is not base64url".to_string())?
        }
        _ => {
            let (Some(x), Some(y)) = (raw.x.as_deref(), raw.y.as_deref()) else {
                return Err("an EC key needs x and y".into());
            };
            if x.len() != P256_COORDINATE_CHARS || y.len() != P256_COORDINATE_CHARS {
                return Err("x and y must be 32-byte P-256 coordinates".into());
            }
            DecodingKey::from_ec_components(x, y).map_err(|_| "x or y is not base64url".to_string())?
        }
    };
    Ok(Usable::Key(SetKey { kid, algorithm, key }))
}

/// A remote string as an error message quotes it: at most 64 characters.
fn shorten(text: &str) -> &str {
    text.char_indices().nth(64).map_or(text, |(end, _)| &text[..end])
}

/// Reads the set's bytes, bounded in size and (for a URL) in time.
fn read(source: &JwksSource, agent: &ureq::Agent) -> Result<Vec<u8>, String> {
    match source {
        JwksSource::File(path) => read_bounded(path, MAX_JWKS_BYTES),
        JwksSource::Url { url, .. } => {
            let mut response = agent.get(url).call().map_err(|e| format!("cannot be fetched: {e}"))?;
            response
                .body_mut()
                .with_config()
                .limit(MAX_JWKS_BYTES)
                .read_to_vec()
                .map_err(|e| format!("cannot be fetched: {e}"))
        }
    }
}

fn agent(source: &JwksSource) -> ureq::Agent {
    let https = matches!(source, JwksSource::Url { https: true, .. });
    ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_global(Some(FETCH_TIMEOUT))
        // An https:// set is never fetched over plain HTTP, redirects included.
        .https_only(https)
        .max_redirects(MAX_REDIRECTS)
        .http_status_as_error(true)
        .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
        .accept("application/jwk-set+json, application/json")
        .build()
        .new_agent()
}

/// Why a refresh runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// SIGHUP.
    Reload,
    /// A token named a `kid` the set lacks.
    UnknownKid,
    /// [`REFRESH_PERIOD`] passed.
    Periodic,
}

/// When the next refresh is due. Reads no clock: every call is given `now`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    last_fetch: Instant,
    last_unknown_kid_fetch: Option<Instant>,
}

impl Schedule {
    /// A schedule whose set was just loaded at `now`.
    pub fn new(now: Instant) -> Schedule {
        Schedule { last_fetch: now, last_unknown_kid_fetch: None }
    }

    /// When an unknown `kid` may next cause a refresh.
    fn unknown_kid_allowed_at(&self) -> Option<Instant> {
        self.last_unknown_kid_fetch.and_then(|t| t.checked_add(UNKNOWN_KID_COOLDOWN))
    }

    /// The next moment worth waking at, with an unknown `kid` waiting or not.
    pub fn next_due(&self, unknown_kid_pending: bool) -> Option<Instant> {
        let periodic = self.last_fetch.checked_add(REFRESH_PERIOD);
        match (unknown_kid_pending, self.last_unknown_kid_fetch) {
            (true, None) => Some(self.last_fetch),
            (true, Some(_)) => periodic.min(self.unknown_kid_allowed_at()),
            (false, _) => periodic,
        }
    }

    /// Whether to refresh at `now`, and why.
    pub fn due(&self, now: Instant, reload: bool, unknown_kid_pending: bool) -> Option<Cause> {
        if reload {
            Some(Cause::Reload)
        } else if unknown_kid_pending && self.unknown_kid_allowed_at().is_none_or(|t| now >= t) {
            Some(Cause::UnknownKid)
        } else if self.last_fetch.checked_add(REFRESH_PERIOD).is_some_and(|t| now >= t) {
            Some(Cause::Periodic)
        } else {
            None
        }
    }

    /// Records a refresh started at `now` for `cause`.
    pub fn fetched(&mut self, now: Instant, cause: Cause) {
        self.last_fetch = now;
        if cause == Cause::UnknownKid {
            self.last_unknown_kid_fetch = Some(now);
        }
    }
}

/// The thread that keeps the JWKS fresh; see the module docs.
pub struct Fetcher {
    source: JwksSource,
    agent: ureq::Agent,
    wake: Receiver<()>,
    requests: Arc<RefreshRequests>,
    metrics: Arc<Metrics>,
    schedule: Schedule,
}

/// The keyring `config` describes, with its JWKS loaded, and the fetcher that keeps that set
/// fresh (to be spawned once the keyring is shared). The error is one line for the operator.
pub fn keyring(config: &Config, metrics: &Arc<Metrics>) -> Result<(Keyring, Option<Fetcher>), String> {
    let mut secrets = Vec::new();
    if let JwtKey::Secret(secret) = &config.jwt_key {
        secrets.push(secret.clone());
        secrets.extend(config.jwt_secret_previous.clone());
    }
    let requirements = Requirements { audience: config.jwt_audience.clone(), issuer: config.jwt_issuer.clone() };
    let mut material = KeyMaterial { secrets, public_key: config.jwt_public_key.clone(), jwks: None, requirements };
    let Some(source) = &config.jwks else {
        return Ok((Keyring::new(material, None)?, None));
    };
    let agent = agent(source);
    let parsed = read(source, &agent).and_then(|bytes| parse(&bytes)).map_err(|e| {
        // serde and I/O errors are single lines already; make sure of it.
        format!("HERALD_JWKS `{}` {}", source.shown(), e.replace(['\n', '\r'], " "))
    })?;
    for skipped in &parsed.skipped {
        warn!(source = %source.shown(), "HERALD_JWKS {skipped}: left out");
    }
    material.jwks = Some(parsed.keys);
    let (tx, rx) = crossbeam_channel::bounded(1);
    let requests = Arc::new(RefreshRequests::default());
    let keyring = Keyring::new(material, Some((tx, requests.clone())))?;
    let fetcher = Fetcher {
        source: source.clone(),
        agent,
        wake: rx,
        requests,
        metrics: metrics.clone(),
        schedule: Schedule::new(Instant::now()),
    };
    Ok((keyring, Some(fetcher)))
}

impl Fetcher {
    /// Starts the thread. It ends when the keyring is dropped.
    pub fn spawn(self, keyring: Weak<Keyring>) -> Result<std::thread::JoinHandle<()>, String> {
        std::thread::Builder::new()
            .name("herald-jwks".into())
            .spawn(move || self.run(keyring))
            .map_err(|e| format!("cannot start thread herald-jwks: {e}"))
    }

    fn run(mut self, keyring: Weak<Keyring>) {
        loop {
            let due = self.schedule.next_due(self.requests.unknown_kid_pending());
            let wait = due.map_or(REFRESH_PERIOD, |due| due.saturating_duration_since(Instant::now()));
            if let Err(RecvTimeoutError::Disconnected) = self.wake.recv_timeout(wait) {
                return;
            }
            let now = Instant::now();
            let reload = self.requests.take_reload();
            let unknown_kid = self.requests.unknown_kid_pending();
            let Some(cause) = self.schedule.due(now, reload, unknown_kid) else { continue };
            // Whatever caused it, this refresh answers every unknown kid seen so far; one seen
            // after it is fetched for anew (within the cooldown).
            if unknown_kid {
                self.requests.clear_unknown_kid();
            }
            self.schedule.fetched(now, cause);
            let Some(keyring) = keyring.upgrade() else { return };
            self.refresh(&keyring, cause);
        }
    }

    fn refresh(&self, keyring: &Keyring, cause: Cause) {
        use std::sync::atomic::Ordering::Relaxed;
        let shown = self.source.shown();
        let before = keyring.keys().kids();
        match read(&self.source, &self.agent).and_then(|bytes| parse(&bytes)) {
            Ok(parsed) => {
                keyring.replace_jwks(parsed.keys);
                self.metrics.jwks_refreshes.fetch_add(1, Relaxed);
                let after = keyring.keys().kids();
                if after != before || cause == Cause::Reload {
                    info!(source = %shown, ?cause, kids = ?after, "JWKS refreshed");
                } else {
                    debug!(source = %shown, ?cause, kids = ?after, "JWKS refreshed, unchanged");
                }
                for skipped in &parsed.skipped {
                    debug!(source = %shown, "HERALD_JWKS {skipped}: left out");
                }
            }
            Err(e) => {
                self.metrics.jwks_refresh_failures.fetch_add(1, Relaxed);
                warn!(source = %shown, ?cause, error = %e, kept = ?before, "JWKS refresh failed; the keys in force stay");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A base64url 2048-bit modulus (its value does not matter: nothing is verified here).
    fn rsa_n() -> String {
        format!("w{}", "A".repeat(MIN_RSA_N_CHARS - 1))
    }

    fn jwks(keys: serde_json::Value) -> Vec<u8> {
        serde_json::json!({ "keys": keys }).to_string().into_bytes()
    }

    fn ec_key(kid: &str) -> serde_json::Value {
        let coordinate = "A".repeat(P256_COORDINATE_CHARS);
        serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "x": coordinate, "y": coordinate})
    }

    #[test]
    fn rsa_and_p256_keys_are_read_with_their_one_algorithm() {
        let set = jwks(serde_json::json!([
            {"kty": "RSA", "kid": "r", "n": rsa_n(), "e": "AQAB", "use": "sig"},
            ec_key("e"),
        ]));
        let parsed = parse(&set).unwrap();
        let algs: Vec<(&str, Algorithm)> = parsed.keys.iter().map(|k| (k.kid.as_str(), k.algorithm)).collect();
        assert_eq!(algs, [("r", Algorithm::RS256), ("e", Algorithm::ES256)]);
        assert!(parsed.skipped.is_empty());
    }

    #[test]
    fn keys_herald_cannot_use_are_skipped_not_fatal() {
        let set = jwks(serde_json::json!([
            {"kty": "RSA", "kid": "enc", "n": rsa_n(), "e": "AQAB", "use": "enc"},
            {"kty": "RSA", "kid": "ps", "n": rsa_n(), "e": "AQAB", "alg": "PS256"},
            {"kty": "RSA", "kid": "mismatch", "n": rsa_n(), "e": "AQAB", "alg": "ES256"},
            {"kty": "RSA", "kid": "weak", "n": &rsa_n()[..200], "e": "AQAB"},
            {"kty": "RSA", "n": rsa_n(), "e": "AQAB"},
            {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "AA"},
            ec_key("good"),
        ]));
        let parsed = parse(&set).unwrap();
        assert_eq!(parsed.keys.len(), 1);
        assert_eq!(parsed.keys[0].kid, "good");
        assert_eq!(parsed.skipped.len(), 8, "{:?}", parsed.skipped);
    }

    #[test]
    fn malformed_sets_are_errors() {
        for (bytes, expected) in [
            (b"not json".to_vec(), "not a JSON Web Key Set"),
            (br#"{"keys": "x"}"#.to_vec(), "not a JSON Web Key Set"),
            (br#"{"kid": "a"}"#.to_vec(), "not a JSON Web Key Set"),
            (jwks(serde_json::json!([])), "no usable key"),
            (
                jwks(serde_json::json!([{"kty": "RSA", "kid": "a", "use": "enc", "n": rsa_n(), "e": "AQAB"}])),
                "no usable key",
            ),
            (jwks(serde_json::json!([{"kty": "RSA", "kid": "a", "e": "AQAB"}])), "needs n and e"),
            (
                jwks(serde_json::json!([{"kty": "RSA", "kid": "a", "n": format!("{}!", &rsa_n()[1..]), "e": "AQAB"}])),
                "base64url",
            ),
            (jwks(serde_json::json!([{"kty": "EC", "crv": "P-256", "kid": "a", "x": "AA", "y": "AA"}])), "32-byte"),
            (jwks(serde_json::json!([ec_key("a"), ec_key("a")])), "twice"),
            (jwks(serde_json::json!([{"crv": "P-256", "kid": "a"}])), "no kty"),
            (jwks(serde_json::json!([{"kty": 7}])), "not a JSON Web Key Set"),
            (jwks(serde_json::Value::Array(vec![ec_key("a"); MAX_KEYS + 1])), "at most"),
        ] {
            let err = parse(&bytes).err().unwrap_or_else(|| panic!("{} parsed", String::from_utf8_lossy(&bytes)));
            assert!(err.contains(expected), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn unknown_kids_refresh_at_most_once_per_cooldown() {
        let start = Instant::now();
        let mut schedule = Schedule::new(start);
        let at = |secs: u64| start + Duration::from_secs(secs);
        assert_eq!(schedule.due(at(1), false, false), None);
        // The first unknown kid is fetched for at once, even right after the start load.
        assert_eq!(schedule.next_due(true), Some(start));
        assert_eq!(schedule.due(at(1), false, true), Some(Cause::UnknownKid));
        schedule.fetched(at(1), Cause::UnknownKid);
        // The next one waits for the cooldown, then is fetched for.
        assert_eq!(schedule.due(at(30), false, true), None);
        assert_eq!(schedule.next_due(true), Some(at(61)));
        assert_eq!(schedule.due(at(61), false, true), Some(Cause::UnknownKid));
        // SIGHUP is never held back.
        assert_eq!(schedule.due(at(2), true, true), Some(Cause::Reload));
        schedule.fetched(at(2), Cause::Reload);
        assert_eq!(schedule.due(at(40), false, true), None, "a reload does not reset the kid cooldown");
    }

    #[test]
    fn the_set_is_refetched_every_period() {
        let start = Instant::now();
        let mut schedule = Schedule::new(start);
        assert_eq!(schedule.next_due(false), Some(start + REFRESH_PERIOD));
        assert_eq!(schedule.due(start + REFRESH_PERIOD - Duration::from_secs(1), false, false), None);
        assert_eq!(schedule.due(start + REFRESH_PERIOD, false, false), Some(Cause::Periodic));
        schedule.fetched(start + REFRESH_PERIOD, Cause::Periodic);
        assert_eq!(schedule.next_due(false), Some(start + 2 * REFRESH_PERIOD));
        // An unknown kid still gets its first refresh at once after a periodic one.
        assert_eq!(schedule.due(start + REFRESH_PERIOD, false, true), Some(Cause::UnknownKid));
    }

    #[test]
    fn sources_are_urls_or_paths_and_urls_are_shown_without_credentials() {
        let source = JwksSource::parse("https://user:pw@idp.example:8443/keys?token=abc").unwrap();
        assert_eq!(source.shown(), "https://idp.example:8443/keys");
        assert!(!format!("{source:?}").contains("pw"));
        assert!(matches!(JwksSource::parse("HTTP://idp/keys").unwrap(), JwksSource::Url { https: false, .. }));
        assert!(matches!(JwksSource::parse("/etc/herald/jwks.json").unwrap(), JwksSource::File(_)));
        assert!(JwksSource::parse("ftp://idp/keys").unwrap_err().contains("http://"));
        assert!(JwksSource::parse("https:///keys").is_err());
    }
}
