//! JWT verification → [`Identity`], and minting for dev mode and `herald token`.
//!
//! A [`Verifier`] checks tokens against one key with exactly one algorithm: HS256 with a
//! secret, RS256 or ES256 with a public key. `exp` is required and enforced with no leeway,
//! `nbf` too when present. A [`KeySet`] holds every key herald accepts at one moment (current
//! and previous secret, the PEM public key, the JWKS keys by `kid`) and picks the keys a token
//! may be checked against from its header; a [`Keyring`] is the shared, swappable current
//! key set, read once per upgrade or API call. Nothing here logs: a token or a secret never
//! reaches a log line.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::tick::{Tick, ticks};

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `sub`, or `user_id` when `sub` is absent; numbers as their decimal string.
    pub user: Arc<str>,
    /// Topics the holder may receive; an entry ending in `*` allows a prefix.
    pub topics: Vec<String>,
    /// True when the `scope` claim contains `publish`.
    pub can_publish: bool,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

impl Identity {
    /// Whether this identity may receive `topic`.
    pub fn allows_topic(&self, topic: &str) -> bool {
        topic_allowed(&self.topics, topic)
    }
}

/// Whether a `topics` claim allows `topic`: an exact entry, or an entry ending in `*` that
/// is a prefix of it.
pub fn topic_allowed(grants: &[String], topic: &str) -> bool {
    grants.iter().any(|entry| match entry.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => entry == topic,
    })
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<serde_json::Value>,
    user_id: Option<serde_json::Value>,
    exp: u64,
    #[serde(default)]
    topics: Option<Vec<String>>,
    #[serde(default)]
    scope: Option<String>,
}

/// Why a token was refused. The caller answers every variant the same way (401); the
/// distinction is for metrics and debug logs, which never include the token itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Expired,
    Invalid,
    NoUser,
}

/// One key to verify tokens with.
#[derive(Clone)]
pub enum JwtKey {
    /// HS256 with this secret.
    Secret(Vec<u8>),
    /// RS256 or ES256 with this PEM public key.
    PublicKeyPem(Vec<u8>),
    /// No key: what `Config::jwt_key` holds when tokens are verified with public keys only
    /// (HERALD_JWT_PUBLIC_KEY, HERALD_JWKS) and no HS256 secret is set.
    Unset,
}

impl std::fmt::Debug for JwtKey {
    // The secret must never reach a log line, so Debug shows only which kind of key it is.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwtKey::Secret(_) => f.write_str("Secret(..)"),
            JwtKey::PublicKeyPem(_) => f.write_str("PublicKeyPem(..)"),
            JwtKey::Unset => f.write_str("Unset"),
        }
    }
}

/// Verifies tokens with one key and its one algorithm. Cheap to share between threads.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    algorithm: Algorithm,
    validation: Validation,
}

impl Verifier {
    pub fn new(key: &JwtKey) -> Result<Verifier, String> {
        let (key, algorithm) = match key {
            JwtKey::Secret(secret) => (DecodingKey::from_secret(secret), Algorithm::HS256),
            JwtKey::PublicKeyPem(pem) => match DecodingKey::from_rsa_pem(pem) {
                Ok(key) => (key, Algorithm::RS256),
                Err(_) => match DecodingKey::from_ec_pem(pem) {
                    Ok(key) => (key, Algorithm::ES256),
                    Err(_) => return Err("not a PEM RSA or EC (P-256) public key".into()),
                },
            },
            JwtKey::Unset => return Err("no key configured".into()),
        };
        Ok(Verifier::with_key(key, algorithm))
    }

    /// A verifier for `key`, accepting `algorithm` only. The caller pairs them: a JWKS key's
    /// algorithm comes from its `alg` or its key type (see `jwks`).
    pub fn with_key(key: DecodingKey, algorithm: Algorithm) -> Verifier {
        // One algorithm only: a token naming any other (`none`, or HS256 signed with the public
        // key as a secret) fails before its signature is looked at.
        let mut validation = Validation::new(algorithm);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        Verifier { key, algorithm, validation }
    }

    /// The one algorithm this verifier accepts.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// This verifier, also requiring `aud` and `iss` when given (then a token must carry a
    /// matching claim; without them the claims are not looked at).
    pub fn requiring(mut self, audience: Option<&str>, issuer: Option<&str>) -> Verifier {
        let mut required = vec!["exp"];
        if let Some(audience) = audience {
            self.validation.set_audience(&[audience]);
            self.validation.validate_aud = true;
            required.push("aud");
        }
        if let Some(issuer) = issuer {
            self.validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        self.validation.set_required_spec_claims(&required);
        self
    }

    /// Verifies `token` at the current time.
    pub fn verify(&self, token: &str) -> Result<Identity, Rejection> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => Rejection::Expired,
            _ => Rejection::Invalid,
        })?;
        let claims = data.claims;
        let user = claims
            .sub
            .as_ref()
            .and_then(claim_as_id)
            .or_else(|| claims.user_id.as_ref().and_then(claim_as_id))
            .ok_or(Rejection::NoUser)?;
        Ok(Identity {
            user: Arc::from(user),
            topics: claims.topics.unwrap_or_default(),
            can_publish: claims.scope.as_deref().is_some_and(|s| s.split_ascii_whitespace().any(|w| w == "publish")),
            exp: claims.exp,
        })
    }
}

/// A user id claim: a non-empty string, or an integer used as its decimal string.
fn claim_as_id(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) if !s.is_empty() && s.len() <= MAX_USER_ID_BYTES => Some(s.clone()),
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// Longest user id accepted; ids become Redis channel names and map keys.
pub const MAX_USER_ID_BYTES: usize = 256;

/// A public key from a JSON Web Key Set: selected by a token's `kid`, used with one algorithm.
pub struct SetKey {
    pub kid: String,
    pub algorithm: Algorithm,
    pub key: DecodingKey,
}

/// What a token must carry besides a valid signature, applied to every key of a set.
#[derive(Debug, Clone, Default)]
pub struct Requirements {
    pub audience: Option<String>,
    pub issuer: Option<String>,
}

impl Requirements {
    fn apply(&self, verifier: Verifier) -> Verifier {
        verifier.requiring(self.audience.as_deref(), self.issuer.as_deref())
    }
}

/// Every key herald accepts at one moment. Never changed in place: a reload or a JWKS refresh
/// builds a new set and swaps it into the [`Keyring`].
///
/// Which keys a token is checked against follows from its header alone. An HS256 token: the
/// secrets, current first. An RS256/ES256 token whose `kid` names a JWKS key: that key only,
/// whose one algorithm must be the token's. Any other RS256/ES256 token: the PEM public key,
/// if it has that algorithm. So no key is ever tried with an algorithm other than its own.
#[derive(Clone, Default)]
pub struct KeySet {
    /// HS256, the current secret first.
    secrets: Arc<[Verifier]>,
    /// HERALD_JWT_PUBLIC_KEY.
    public_key: Option<Arc<Verifier>>,
    /// HERALD_JWKS, by `kid`.
    by_kid: Arc<HashMap<String, Verifier>>,
    /// Whether a JWKS is configured at all: only then is an unknown `kid` worth a refresh.
    jwks: bool,
}

impl KeySet {
    /// Verifies `token` at the current time.
    pub fn verify(&self, token: &str) -> Result<Identity, Rejection> {
        self.check(token).0
    }

    /// Verifies `token`; the flag says it was refused for want of the JWKS key its `kid` names.
    fn check(&self, token: &str) -> (Result<Identity, Rejection>, bool) {
        let Ok(header) = jsonwebtoken::decode_header(token) else { return (Err(Rejection::Invalid), false) };
        // A `kid` selects among public keys only: HS256 tokens go to the secrets whatever
        // their header says, so a secret is never looked up by a client-chosen name.
        let kid = header.kid.as_deref().filter(|_| header.alg != Algorithm::HS256);
        if let Some(verifier) = kid.and_then(|kid| self.by_kid.get(kid)) {
            return (verifier.verify(token), false);
        }
        let mut result = Err(Rejection::Invalid);
        let candidates = self.secrets.iter().chain(self.public_key.as_deref());
        for verifier in candidates.filter(|v| v.algorithm == header.alg) {
            match verifier.verify(token) {
                Ok(identity) => return (Ok(identity), false),
                Err(Rejection::Invalid) => {}
                // The signature held and the claims did not: no other key changes that.
                Err(other) => {
                    result = Err(other);
                    break;
                }
            }
        }
        let unknown_kid = kid.is_some() && self.jwks && result == Err(Rejection::Invalid);
        (result, unknown_kid)
    }

    /// How many keys of each kind, for log lines.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match self.secrets.len() {
            0 => {}
            1 => parts.push("HS256 (secret)".to_string()),
            n => parts.push(format!("HS256 ({n} secrets, current first)")),
        }
        if let Some(key) = &self.public_key {
            parts.push(format!("{:?} (public key file)", key.algorithm));
        }
        if self.jwks {
            let mut kids: Vec<&str> = self.by_kid.keys().map(String::as_str).collect();
            kids.sort_unstable();
            parts.push(format!("JWKS ({} keys: {})", kids.len(), kids.join(", ")));
        }
        if parts.is_empty() { "no keys".to_string() } else { parts.join("; ") }
    }

    /// The JWKS keys' ids, sorted.
    pub fn kids(&self) -> Vec<String> {
        let mut kids: Vec<String> = self.by_kid.keys().cloned().collect();
        kids.sort_unstable();
        kids
    }
}

/// Where the JWKS fetcher learns that a refresh is wanted. Set by verifying threads (an
/// unknown `kid`) and by SIGHUP; read and cleared by the fetcher. Flags rather than queued
/// messages: any number of requests before the fetcher looks is one request.
#[derive(Debug, Default)]
pub struct RefreshRequests {
    unknown_kid: AtomicBool,
    reload: AtomicBool,
}

impl RefreshRequests {
    /// Whether a token with an unknown `kid` was refused since the flag was last cleared.
    pub fn unknown_kid_pending(&self) -> bool {
        self.unknown_kid.load(Ordering::SeqCst)
    }

    pub fn clear_unknown_kid(&self) {
        self.unknown_kid.store(false, Ordering::SeqCst);
    }

    /// Whether SIGHUP asked for a reload since the last call; clears the request.
    pub fn take_reload(&self) -> bool {
        self.reload.swap(false, Ordering::SeqCst)
    }
}

/// The current [`KeySet`], shared by every thread that verifies tokens and replaced whole by
/// reloads and JWKS refreshes. A verification reads it once (a read lock held just long
/// enough to clone an `Arc`) and never waits on a file or the network: refreshes happen on
/// the JWKS fetcher's thread, which only takes the write lock to swap in a finished set.
pub struct Keyring {
    current: RwLock<Arc<KeySet>>,
    requirements: Requirements,
    /// HERALD_JWT_PUBLIC_KEY, re-read on SIGHUP.
    public_key_file: Option<PathBuf>,
    /// With HERALD_JWKS: how to reach the fetcher. Its wake channel disconnects when the
    /// keyring is dropped, which ends the fetcher.
    refresh: Option<(crossbeam_channel::Sender<()>, Arc<RefreshRequests>)>,
}

/// What a [`Keyring`] starts with.
pub struct KeyMaterial {
    /// HS256 secrets, the current one first.
    pub secrets: Vec<Vec<u8>>,
    /// HERALD_JWT_PUBLIC_KEY: the file and its PEM as read at start.
    pub public_key: Option<(PathBuf, Vec<u8>)>,
    /// HERALD_JWKS: its keys as first loaded.
    pub jwks: Option<Vec<SetKey>>,
    pub requirements: Requirements,
}

/// Largest PEM public key file read (a 16384-bit RSA key is under 3 KiB).
pub const MAX_PEM_BYTES: u64 = 64 * 1024;

/// Reads at most `limit` bytes of `path`; a longer file is an error, not a truncation.
pub fn read_bounded(path: &std::path::Path, limit: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot be read: {e}"))?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot be read: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!("is larger than {limit} bytes"));
    }
    Ok(bytes)
}

impl Keyring {
    /// A keyring holding `material`; `refresh` is the fetcher's wake channel and flags.
    pub fn new(
        material: KeyMaterial,
        refresh: Option<(crossbeam_channel::Sender<()>, Arc<RefreshRequests>)>,
    ) -> Result<Keyring, String> {
        let requirements = material.requirements;
        let secrets: Vec<Verifier> = material
            .secrets
            .iter()
            .map(|secret| requirements.apply(Verifier::with_key(DecodingKey::from_secret(secret), Algorithm::HS256)))
            .collect();
        let (public_key_file, public_key) = match material.public_key {
            None => (None, None),
            Some((path, pem)) => {
                let verifier = Verifier::new(&JwtKey::PublicKeyPem(pem))?;
                (Some(path), Some(Arc::new(requirements.apply(verifier))))
            }
        };
        let jwks = material.jwks.is_some();
        let by_kid = Arc::new(by_kid(&requirements, material.jwks.unwrap_or_default()));
        let set = KeySet { secrets: secrets.into(), public_key, by_kid, jwks };
        Ok(Keyring { current: RwLock::new(Arc::new(set)), requirements, public_key_file, refresh })
    }

    /// The key set in force now.
    pub fn keys(&self) -> Arc<KeySet> {
        // A panic while holding the write lock can only have happened between building a
        // set and storing it; the stored `Arc` is whole either way.
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn swap(&self, change: impl FnOnce(&KeySet) -> KeySet) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        *current = Arc::new(change(&current));
    }

    /// Verifies `token` against the current key set. A token refused because its `kid` names
    /// no known key asks the fetcher for a refresh, and is refused all the same: the answer
    /// never waits on the network.
    pub fn verify(&self, token: &str) -> Result<Identity, Rejection> {
        let (result, unknown_kid) = self.keys().check(token);
        if unknown_kid {
            if let Some((wake, requests)) = &self.refresh {
                // Only the first of a burst wakes the fetcher; the rest find the flag set.
                if !requests.unknown_kid.swap(true, Ordering::SeqCst) {
                    let _ = wake.try_send(());
                }
            }
        }
        result
    }

    /// Puts `keys` in force as the JWKS keys, keeping every other key.
    pub fn replace_jwks(&self, keys: Vec<SetKey>) {
        let by_kid = Arc::new(by_kid(&self.requirements, keys));
        self.swap(|old| KeySet { by_kid, jwks: true, ..old.clone() });
    }

    /// Re-reads HERALD_JWT_PUBLIC_KEY: `None` when it is not configured, else the algorithm
    /// of the key now in force, or why the file was refused (the old key then stays).
    pub fn reload_public_key(&self) -> Option<Result<Algorithm, String>> {
        let path = self.public_key_file.as_ref()?;
        let loaded = read_bounded(path, MAX_PEM_BYTES)
            .and_then(|pem| Verifier::new(&JwtKey::PublicKeyPem(pem)))
            .map(|verifier| Arc::new(self.requirements.apply(verifier)));
        Some(loaded.map(|verifier| {
            let algorithm = verifier.algorithm;
            self.swap(|old| KeySet { public_key: Some(verifier), ..old.clone() });
            algorithm
        }))
    }

    /// The HERALD_JWT_PUBLIC_KEY file, when one is configured.
    pub fn public_key_file(&self) -> Option<&std::path::Path> {
        self.public_key_file.as_deref()
    }

    /// Asks the JWKS fetcher to reload now (SIGHUP); false when there is no JWKS.
    pub fn request_jwks_reload(&self) -> bool {
        let Some((wake, requests)) = &self.refresh else { return false };
        requests.reload.store(true, Ordering::SeqCst);
        let _ = wake.try_send(());
        true
    }
}

fn by_kid(requirements: &Requirements, keys: Vec<SetKey>) -> HashMap<String, Verifier> {
    keys.into_iter().map(|k| (k.kid, requirements.apply(Verifier::with_key(k.key, k.algorithm)))).collect()
}

impl From<Verifier> for Keyring {
    /// A keyring of one key that never changes (tests, benches, fuzzing): the verifier's own
    /// audience and issuer requirements stay as they are.
    fn from(verifier: Verifier) -> Keyring {
        let mut set = KeySet::default();
        if verifier.algorithm == Algorithm::HS256 {
            set.secrets = Arc::from(vec![verifier]);
        } else {
            set.public_key = Some(Arc::new(verifier));
        }
        Keyring {
            current: RwLock::new(Arc::new(set)),
            requirements: Requirements::default(),
            public_key_file: None,
            refresh: None,
        }
    }
}

#[derive(Serialize)]
struct MintClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    topics: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
}

/// What [`mint_token`] puts in a token.
#[derive(Debug, Clone, Copy)]
pub struct TokenSpec<'a> {
    pub sub: &'a str,
    /// At least a second, at most [`MAX_TOKEN_TTL`].
    pub ttl: Duration,
    pub topics: &'a [String],
    pub scope: Option<&'a str>,
    /// `aud` and `iss`: what a herald with HERALD_JWT_AUDIENCE / HERALD_JWT_ISSUER requires.
    pub audience: Option<&'a str>,
    pub issuer: Option<&'a str>,
}

/// Longest lifetime `herald token` mints: a century is already no expiry at all in practice,
/// and anything near 2^63 seconds overflows other software's time arithmetic.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600 + 25 * 24 * 3600);

/// Signs an HS256 token for `sub`, valid for `ttl` (at least a second, at most
/// [`MAX_TOKEN_TTL`]).
pub fn mint(secret: &[u8], sub: &str, ttl: Duration, topics: &[String], scope: Option<&str>) -> String {
    mint_token(secret, &TokenSpec { sub, ttl, topics, scope, audience: None, issuer: None })
}

/// Signs an HS256 token as `spec` says.
pub fn mint_token(secret: &[u8], spec: &TokenSpec<'_>) -> String {
    let now = unix_now();
    let lifetime = spec.ttl.min(MAX_TOKEN_TTL).as_secs().max(1);
    let claims = MintClaims {
        sub: spec.sub,
        iat: now,
        exp: now.saturating_add(lifetime),
        topics: spec.topics,
        scope: spec.scope,
        aud: spec.audience,
        iss: spec.issuer,
    };
    // Encoding an in-memory struct with a secret key has no failure mode but a serializer bug.
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
        .expect("HS256 encoding of plain claims cannot fail")
}

/// How long from `now` until `exp` (seconds since the Unix epoch); zero once it has passed.
/// Exact to the nanosecond and total: `exp` is whatever a validly signed token says, up to
/// `u64::MAX`, and `now` may even precede the epoch on a badly set clock.
pub fn time_until_exp(exp: u64, now: SystemTime) -> Duration {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    Duration::from_secs(exp).saturating_sub(since_epoch)
}

/// The event-loop tick at which a connection whose token expires at `exp` is closed, when
/// the loop's current tick is `now_tick` and the wall clock reads `now`. Rounded up to whole
/// ticks, plus one for the tick already under way, so the close comes at or just after
/// `exp`, never before. Saturates: a token expiring in 2^63 seconds gets `Tick::MAX`, which
/// the timer wheel treats as "later than anything else".
pub fn expiry_tick(exp: u64, now: SystemTime, now_tick: Tick) -> Tick {
    now_tick.saturating_add(ticks(time_until_exp(exp, now))).saturating_add(1)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// 64 random bits (instance ids).
pub fn random_u64() -> u64 {
    let hex = random_secret();
    u64::from_str_radix(std::str::from_utf8(&hex[..16]).unwrap_or("0"), 16).unwrap_or(0)
}

/// 32 random bytes from the kernel, hex encoded, for dev mode.
pub fn random_secret() -> Vec<u8> {
    use std::io::Read;
    let mut raw = [0u8; 32];
    let filled = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut raw));
    if filled.is_err() {
        // No urandom (a chroot, say): fall back to time and address entropy; dev mode only.
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
            ^ (&raw as *const _ as usize as u128);
        for (i, byte) in raw.iter_mut().enumerate() {
            *byte = (seed >> ((i % 16) * 8)) as u8 ^ (i as u8).wrapping_mul(151);
        }
    }
    raw.iter().map(|b| format!("{b:02x}")).collect::<String>().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(secret: &str) -> Verifier {
        Verifier::new(&JwtKey::Secret(secret.as_bytes().to_vec())).unwrap()
    }

    fn sign(secret: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes()))
            .unwrap()
    }

    #[test]
    fn minted_token_verifies_with_its_claims() {
        let token = mint(b"s3", "alice", Duration::from_secs(60), &["project:*".into()], Some("publish read"));
        let id = verifier("s3").verify(&token).unwrap();
        assert_eq!(&*id.user, "alice");
        assert!(id.can_publish);
        assert!(id.allows_topic("project:7"));
        assert!(!id.allows_topic("workspace:7"));
    }

    #[test]
    fn wrong_secret_expired_and_missing_exp_are_refused() {
        let token = mint(b"a", "u", Duration::from_secs(60), &[], None);
        assert_eq!(verifier("b").verify(&token), Err(Rejection::Invalid));
        let expired = sign("a", serde_json::json!({"sub": "u", "exp": unix_now() - 1}));
        assert_eq!(verifier("a").verify(&expired), Err(Rejection::Expired));
        let no_exp = sign("a", serde_json::json!({"sub": "u"}));
        assert_eq!(verifier("a").verify(&no_exp), Err(Rejection::Invalid));
        let future = sign("a", serde_json::json!({"sub": "u", "exp": unix_now() + 60, "nbf": unix_now() + 30}));
        assert_eq!(verifier("a").verify(&future), Err(Rejection::Invalid));
    }

    #[test]
    fn user_comes_from_sub_then_user_id_and_numbers_become_strings() {
        let exp = unix_now() + 60;
        let v = verifier("k");
        assert_eq!(&*v.verify(&sign("k", serde_json::json!({"sub": 42, "exp": exp}))).unwrap().user, "42");
        assert_eq!(&*v.verify(&sign("k", serde_json::json!({"user_id": "bob", "exp": exp}))).unwrap().user, "bob");
        assert_eq!(v.verify(&sign("k", serde_json::json!({"exp": exp}))), Err(Rejection::NoUser));
        assert_eq!(v.verify(&sign("k", serde_json::json!({"sub": 1.5, "exp": exp}))), Err(Rejection::NoUser));
    }

    #[test]
    fn expiry_is_total_and_never_early() {
        let now = UNIX_EPOCH + Duration::new(1_000, 250_000_000);
        assert_eq!(time_until_exp(900, now), Duration::ZERO);
        assert_eq!(time_until_exp(1_010, now), Duration::from_millis(9_750));
        assert_eq!(expiry_tick(900, now, 40), 41);
        // 9.75 s is 97.5 ticks: rounded up to 98, plus the tick under way.
        assert_eq!(expiry_tick(1_010, now, 40), 40 + 98 + 1);
        for exp in [1u64 << 63, i64::MAX as u64, u64::MAX] {
            assert_eq!(expiry_tick(exp, now, 40), Tick::MAX, "exp {exp}");
        }
        assert_eq!(expiry_tick(1_010, now, Tick::MAX - 3), Tick::MAX);
        let before_epoch = UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(time_until_exp(3, before_epoch), Duration::from_secs(3));
    }

    #[test]
    fn mint_caps_the_lifetime_and_cannot_overflow() {
        let token = mint(b"k", "u", Duration::MAX, &[], None);
        let id = verifier("k").verify(&token).unwrap();
        assert!(id.exp <= unix_now() + MAX_TOKEN_TTL.as_secs());
        assert!(id.exp > unix_now() + 99 * 365 * 24 * 3600);
    }

    #[test]
    fn alg_none_is_refused() {
        let exp = unix_now() + 60;
        let body = format!("{{\"sub\":\"u\",\"exp\":{exp}}}");
        let b64 = |s: &str| {
            use base64_lite::encode;
            encode(s.as_bytes())
        };
        let token = format!("{}.{}.", b64("{\"alg\":\"none\",\"typ\":\"JWT\"}"), b64(&body));
        assert_eq!(verifier("k").verify(&token), Err(Rejection::Invalid));
    }

    const RSA_DER: &[u8] = include_bytes!("../tests/fixtures/rsa_private.pkcs1.der");
    const RSA_OTHER_DER: &[u8] = include_bytes!("../tests/fixtures/rsa_other_private.pkcs1.der");
    const RSA_PUBLIC_PEM: &[u8] = include_bytes!("../tests/fixtures/rsa_public.pem");
    const EC_DER: &[u8] = include_bytes!("../tests/fixtures/ec_private.pkcs8.der");
    const EC_PUBLIC_PEM: &[u8] = include_bytes!("../tests/fixtures/ec_public.pem");

    fn claims() -> serde_json::Value {
        serde_json::json!({"sub": "u", "exp": unix_now() + 60})
    }

    fn signed(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &serde_json::Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, claims, key).unwrap()
    }

    fn set_key(kid: &str, pem: &[u8]) -> SetKey {
        let verifier = Verifier::new(&JwtKey::PublicKeyPem(pem.to_vec())).unwrap();
        SetKey { kid: kid.into(), algorithm: verifier.algorithm, key: verifier.key }
    }

    fn keyring(secrets: &[&str], public_key: Option<&[u8]>, jwks: Option<Vec<SetKey>>) -> Keyring {
        let material = KeyMaterial {
            secrets: secrets.iter().map(|s| s.as_bytes().to_vec()).collect(),
            public_key: public_key.map(|pem| (PathBuf::from("key.pem"), pem.to_vec())),
            jwks,
            requirements: Requirements::default(),
        };
        Keyring::new(material, None).unwrap()
    }

    #[test]
    fn the_previous_secret_verifies_after_the_current_one_and_a_third_does_not() {
        let keys = keyring(&["current", "previous"], None, None);
        for (secret, expected) in [("current", true), ("previous", true), ("third", false)] {
            let token = sign(secret, claims());
            assert_eq!(keys.verify(&token).is_ok(), expected, "{secret}");
        }
        let expired = sign("previous", serde_json::json!({"sub": "u", "exp": unix_now() - 1}));
        assert_eq!(keys.verify(&expired), Err(Rejection::Expired), "the key that signed it decides");
        assert!(keyring(&["current"], None, None).verify(&sign("previous", claims())).is_err());
    }

    #[test]
    fn a_kid_selects_one_jwks_key_whose_algorithm_must_match() {
        let (rsa, ec) = (EncodingKey::from_rsa_der(RSA_DER), EncodingKey::from_ec_der(EC_DER));
        let keys = keyring(&["secret"], None, Some(vec![set_key("r", RSA_PUBLIC_PEM), set_key("e", EC_PUBLIC_PEM)]));
        let set = keys.keys();
        let c = claims();
        assert!(set.check(&signed(Algorithm::RS256, Some("r"), &rsa, &c)).0.is_ok());
        assert!(set.check(&signed(Algorithm::ES256, Some("e"), &ec, &c)).0.is_ok());
        // The right signature under the wrong kid, or another algorithm than the key's.
        assert_eq!(set.check(&signed(Algorithm::RS256, Some("e"), &rsa, &c)), (Err(Rejection::Invalid), false));
        assert_eq!(set.check(&signed(Algorithm::ES256, Some("r"), &ec, &c)), (Err(Rejection::Invalid), false));
        assert_eq!(set.check(&signed(Algorithm::PS256, Some("r"), &rsa, &c)), (Err(Rejection::Invalid), false));
        // HS256 keyed with a public key's bytes, under that key's kid: HS256 goes to the
        // secrets only. A real HS256 token with any kid still verifies with the secret.
        let confused = signed(Algorithm::HS256, Some("r"), &EncodingKey::from_secret(RSA_PUBLIC_PEM), &c);
        assert_eq!(set.check(&confused), (Err(Rejection::Invalid), false));
        assert!(set.check(&signed(Algorithm::HS256, Some("r"), &EncodingKey::from_secret(b"secret"), &c)).0.is_ok());
        // No kid and no PEM key: nothing to check an RS256 token against.
        assert_eq!(set.check(&signed(Algorithm::RS256, None, &rsa, &c)), (Err(Rejection::Invalid), false));
        // A kid the set lacks: refused, and worth a refresh.
        assert_eq!(set.check(&signed(Algorithm::RS256, Some("new"), &rsa, &c)), (Err(Rejection::Invalid), true));
        let other = EncodingKey::from_rsa_der(RSA_OTHER_DER);
        assert_eq!(set.check(&signed(Algorithm::RS256, Some("r"), &other, &c)), (Err(Rejection::Invalid), false));
    }

    #[test]
    fn the_pem_key_takes_tokens_whose_kid_selects_no_jwks_key() {
        let rsa = EncodingKey::from_rsa_der(RSA_DER);
        let ec = EncodingKey::from_ec_der(EC_DER);
        let c = claims();
        let keys = keyring(&[], Some(RSA_PUBLIC_PEM), Some(vec![set_key("e", EC_PUBLIC_PEM)]));
        let set = keys.keys();
        assert!(matches!(set.check(&signed(Algorithm::RS256, None, &rsa, &c)), (Ok(_), false)));
        assert!(matches!(set.check(&signed(Algorithm::RS256, Some("other"), &rsa, &c)), (Ok(_), false)));
        assert_eq!(set.check(&signed(Algorithm::ES256, None, &ec, &c)), (Err(Rejection::Invalid), false));
        assert!(set.check(&signed(Algorithm::HS256, None, &EncodingKey::from_secret(b""), &c)).0.is_err());
        // Without a JWKS an unknown kid is nobody's business.
        let pem_only = keyring(&[], Some(RSA_PUBLIC_PEM), None).keys();
        let other = EncodingKey::from_rsa_der(RSA_OTHER_DER);
        assert_eq!(pem_only.check(&signed(Algorithm::RS256, Some("x"), &other, &c)), (Err(Rejection::Invalid), false));
    }

    #[test]
    fn an_unknown_kid_wakes_the_fetcher_once_per_burst_and_swaps_keep_other_keys() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let requests = Arc::new(RefreshRequests::default());
        let material = KeyMaterial {
            secrets: vec![b"secret".to_vec()],
            public_key: None,
            jwks: Some(vec![set_key("e", EC_PUBLIC_PEM)]),
            requirements: Requirements { audience: Some("herald".into()), issuer: None },
        };
        let keys = Keyring::new(material, Some((tx, requests.clone()))).unwrap();
        let rsa = EncodingKey::from_rsa_der(RSA_DER);
        let with_aud = serde_json::json!({"sub": "u", "exp": unix_now() + 60, "aud": "herald"});
        let new_kid = signed(Algorithm::RS256, Some("r"), &rsa, &with_aud);
        for _ in 0..3 {
            assert_eq!(keys.verify(&new_kid), Err(Rejection::Invalid));
        }
        assert!(requests.unknown_kid_pending());
        assert_eq!(rx.try_iter().count(), 1);
        keys.replace_jwks(vec![set_key("r", RSA_PUBLIC_PEM)]);
        assert!(keys.verify(&new_kid).is_ok());
        // Requirements hold for keys that arrive later too.
        assert!(keys.verify(&signed(Algorithm::RS256, Some("r"), &rsa, &claims())).is_err());
        assert!(keys.verify(&sign("secret", with_aud.clone())).is_ok());
        assert!(keys.request_jwks_reload());
        assert!(requests.take_reload());
        assert!(!keyring(&["s"], None, None).request_jwks_reload());
        assert!(keyring(&["s"], None, None).reload_public_key().is_none());
    }

    /// URL-safe base64 without padding, enough to forge test tokens.
    mod base64_lite {
        pub fn encode(input: &[u8]) -> String {
            const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let mut out = String::new();
            for chunk in input.chunks(3) {
                let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
                for i in 0..=chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                }
            }
            out
        }
    }
}
