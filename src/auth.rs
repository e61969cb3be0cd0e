//! JWT verification → [`Identity`], and minting for dev mode and `herald token`.
//!
//! Tokens are HS256 with the configured secret, or RS256/ES256 with a configured public key;
//! `exp` is required and enforced with no leeway, `nbf` too when present. Nothing here logs:
//! a token or a secret never reaches a log line.

use std::sync::Arc;
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

/// How tokens are verified.
#[derive(Clone)]
pub enum JwtKey {
    /// HS256 with this secret.
    Secret(Vec<u8>),
    /// RS256 or ES256 with this PEM public key.
    PublicKeyPem(Vec<u8>),
}

impl std::fmt::Debug for JwtKey {
    // The secret must never reach a log line, so Debug shows only which kind of key it is.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwtKey::Secret(_) => f.write_str("Secret(..)"),
            JwtKey::PublicKeyPem(_) => f.write_str("PublicKeyPem(..)"),
        }
    }
}

/// Verifies tokens with one configured key. Cheap to share between threads.
pub struct Verifier {
    key: DecodingKey,
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
        };
        // One algorithm only: a token naming any other (`none`, or HS256 signed with the public
        // key as a secret) fails before its signature is looked at.
        let mut validation = Validation::new(algorithm);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        Ok(Verifier { key, validation })
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
