//! Extreme claim values behind a valid HS256 signature → `auth::Verifier::verify` (a plain
//! verifier, and one built by `Verifier::requiring` that requires `aud` and `iss`) →
//! `auth::expiry_tick`, the function the event loop schedules a token's close with.
//!
//! The claims are written as raw JSON text, so `exp`, `nbf` and `iat` can be what no
//! `serde_json::Value` holds: integers beyond 64 bits, `-0`, exponents. Each of them is one
//! of: absent, ordinary, the 2^63 / `i64::MAX` / `u64::MAX` edges and one past them, negative,
//! fractional or exponent floats, numeric strings, `null`, booleans, arrays, objects, or an
//! input-chosen `u64`. `sub` / `user_id`, `scope`, `topics`, `aud` and `iss` get odd types too,
//! and sometimes a key appears twice.
//!
//! Invariants: no panic; a token is either refused or accepted with an `exp` that was a plain
//! integer literal, not in the past, and its expiry tick is ≥ the loop's current tick and
//! never before `exp` (at most one tick after); `nbf`, if a number, has passed; a non-string
//! `scope` never grants, and `publish` is granted exactly by a whitespace-separated word; the
//! user is the claimed one and `id_as_json` maps it to a number only in canonical form; the
//! aud/iss verifier accepts only a matching audience and issuer. `expiry_tick` also gets
//! input-chosen `exp`, wall clocks (before the epoch, far future) and ticks (up to
//! `Tick::MAX`), and `mint_token` input-chosen lifetimes.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald::auth::{self, Identity, MAX_TOKEN_TTL, MAX_USER_ID_BYTES, TokenSpec, Verifier};
use herald::tick::Tick;
use herald::ids::id_as_json;
use herald_fuzz::{Bytes, SECRET, b64url, config, hs256_verifier, now};
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const AUDIENCE: &str = "herald-fuzz";
const ISSUER: &str = "https://issuer.example";

/// A verifier for a herald started with HERALD_JWT_AUDIENCE and HERALD_JWT_ISSUER.
fn aud_iss_verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let config = config(&["--jwt-secret", SECRET, "--jwt-audience", AUDIENCE, "--jwt-issuer", ISSUER]);
        Verifier::new(&config.jwt_key)
            .expect("fuzz aud/iss verifier")
            .requiring(config.jwt_audience.as_deref(), config.jwt_issuer.as_deref())
    })
}

/// One of the time-claim shapes, as JSON text; `None` leaves the claim out.
fn time_literal(b: &mut Bytes<'_>, n: u64) -> Option<String> {
    Some(match b.below(26) {
        0 => return None,
        1 => (n + 3600).to_string(),
        2 => u64::MAX.to_string(),
        3 => (1u64 << 63).to_string(),
        4 => i64::MAX.to_string(),
        5 => "18446744073709551616".into(),
        6 => "1e19".into(),
        7 => "1.8446744073709552e19".into(),
        8 => "-1".into(),
        9 => i64::MIN.to_string(),
        10 => format!("{}.5", n + 3600),
        11 => format!("\"{}\"", n + 3600),
        12 => "null".into(),
        13 => "true".into(),
        14 => format!("[{}]", n + 3600),
        15 => "{}".into(),
        16 => (n - 1).to_string(),
        17 => n.to_string(),
        18 => (n + u64::from(b.u32())).to_string(),
        19 => u64::from_le_bytes(std::array::from_fn(|_| b.byte())).to_string(),
        20 => "0".into(),
        21 => "-0".into(),
        22 => "1e18".into(),
        23 => "100000000000000000000000000000".into(),
        24 => (u64::MAX - u64::from(b.u16())).to_string(),
        _ => format!("{}e0", n + 60),
    })
}

/// A user-id shape as JSON text, and the user herald should take from it.
fn id_literal(b: &mut Bytes<'_>) -> Option<(String, Option<String>)> {
    let text = |s: &str| (serde_json::to_string(s).unwrap(), Some(s.to_string()));
    Some(match b.below(18) {
        0 => return None,
        1 => text("alice"),
        2 => ("\"\"".into(), None),
        3 => {
            let long = "u".repeat(MAX_USER_ID_BYTES + b.below(3) - 1);
            let user = (long.len() <= MAX_USER_ID_BYTES).then(|| long.clone());
            (serde_json::to_string(&long).unwrap(), user)
        }
        4 => ("42".into(), Some("42".into())),
        5 => ("-7".into(), Some("-7".into())),
        6 => text("0042"),
        7 => text("+42"),
        8 => (u64::MAX.to_string(), Some(u64::MAX.to_string())),
        9 => ("18446744073709551616".into(), None),
        10 => ("1.5".into(), None),
        11 => ("true".into(), None),
        12 => ("null".into(), None),
        13 => ("[\"a\"]".into(), None),
        14 => ("{}".into(), None),
        15 => (i64::MIN.to_string(), Some(i64::MIN.to_string())),
        16 => ("1e3".into(), None),
        _ => {
            let s = b.string(12);
            (serde_json::to_string(&s).unwrap(), (!s.is_empty()).then_some(s))
        }
    })
}

fn check_expiry(exp: u64, wall: SystemTime, now_tick: Tick) {
    let tick = auth::expiry_tick(exp, wall, now_tick);
    assert!(tick >= now_tick, "expiry tick {tick} before the current tick {now_tick} (exp {exp})");
    let lifetime = auth::time_until_exp(exp, wall).as_nanos();
    let tick_nanos = 100_000_000u128;
    // The exact answer, in arbitrary precision: whole ticks rounded up, plus the current one.
    let exact = u128::from(now_tick) + lifetime.div_ceil(tick_nanos) + 1;
    if exact >= u128::from(Tick::MAX) {
        assert_eq!(tick, Tick::MAX, "exp {exp}: saturation expected");
    } else {
        assert_eq!(u128::from(tick), exact, "exp {exp}, now_tick {now_tick}, lifetime {lifetime} ns");
        // Never before exp, at most one tick after it.
        let covered = u128::from(tick - now_tick - 1) * tick_nanos;
        assert!(covered >= lifetime && covered < lifetime + tick_nanos, "exp {exp}: {covered} vs {lifetime}");
    }
}

/// Checks an accepted identity against the claims that produced it.
#[allow(clippy::too_many_arguments)]
fn check_accepted(
    identity: &Identity,
    exp: Option<&str>,
    nbf: Option<&str>,
    scope: Option<&str>,
    user: Option<&Option<String>>,
    duplicated: bool,
    checked_at: u64,
) {
    if !duplicated {
        let literal = exp.expect("accepted without exp");
        let value: u64 = literal.parse().unwrap_or_else(|_| panic!("accepted with exp {literal}"));
        assert_eq!(identity.exp, value);
        if let Some(nbf) = nbf.filter(|n| *n != "null") {
            let value: f64 = nbf.parse().unwrap_or_else(|_| panic!("accepted with nbf {nbf}"));
            assert!(value.round() <= checked_at as f64 + 1.0, "accepted before nbf {nbf}");
        }
        match scope.map(serde_json::from_str::<Value>) {
            None | Some(Ok(Value::Null)) => assert!(!identity.can_publish),
            Some(Ok(Value::String(s))) => {
                assert_eq!(identity.can_publish, s.split_ascii_whitespace().any(|w| w == "publish"), "scope {s:?}")
            }
            other => panic!("accepted a token whose scope is {other:?}"),
        }
        assert_eq!(Some(&Some(identity.user.to_string())), user, "user differs from the claims");
    }
    assert!(identity.exp >= checked_at, "accepted an expired token (exp {})", identity.exp);
    match id_as_json(&identity.user) {
        Value::Number(n) => assert_eq!(n.to_string(), *identity.user, "non-canonical id rendered as a number"),
        Value::String(s) => assert_eq!(s, *identity.user),
        other => panic!("id rendered as {other}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let n = now();
    let exp = time_literal(&mut b, n);
    let nbf = time_literal(&mut b, n);
    let iat = time_literal(&mut b, n);
    let sub = id_literal(&mut b);
    let user_id = id_literal(&mut b);
    let scope: Option<String> = match b.below(11) {
        0 | 1 => None,
        2 => Some("\"publish\"".into()),
        3 => Some("\"nopublish\"".into()),
        4 => Some("\"publish:read\"".into()),
        5 => Some("\"publisher\"".into()),
        6 => Some("\"read  publish\"".into()),
        7 => Some("[\"publish\"]".into()),
        8 => Some(["1", "null", "true", "{\"publish\":true}"][b.below(4)].into()),
        9 => Some(serde_json::to_string(&b.string(16)).unwrap()),
        _ => Some("\"PUBLISH\"".into()),
    };
    let topics = ["", "[\"project:*\"]", "\"project:*\"", "[1]", "null"][b.below(5)];
    let aud = ["", "\"herald-fuzz\"", "\"other\"", "[\"x\",\"herald-fuzz\"]", "[]", "7", "null"][b.below(7)];
    let iss = ["", "\"https://issuer.example\"", "\"https://evil.example\"", "[\"https://issuer.example\"]", "5"]
        [b.below(5)];
    let duplicate = match b.below(8) {
        0 => time_literal(&mut b, n),
        _ => None,
    };

    let mut pairs: Vec<String> = Vec::new();
    let mut put = |key: &str, literal: Option<&str>| {
        if let Some(literal) = literal.filter(|l| !l.is_empty()) {
            pairs.push(format!("\"{key}\":{literal}"));
        }
    };
    put("exp", exp.as_deref());
    put("nbf", nbf.as_deref());
    put("iat", iat.as_deref());
    put("sub", sub.as_ref().map(|(l, _)| l.as_str()));
    put("user_id", user_id.as_ref().map(|(l, _)| l.as_str()));
    put("scope", scope.as_deref());
    put("topics", Some(topics));
    put("aud", Some(aud));
    put("iss", Some(iss));
    put("exp", duplicate.as_deref());
    let claims = format!("{{{}}}", pairs.join(","));
    let header = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
    let signing_input = format!("{header}.{}", b64url(claims.as_bytes()));
    let signature =
        jsonwebtoken::crypto::sign(signing_input.as_bytes(), &EncodingKey::from_secret(SECRET.as_bytes()), Algorithm::HS256)
            .expect("HS256 signs");
    let token = format!("{signing_input}.{signature}");

    // The user herald should take: `sub` when it is a usable id, else `user_id`.
    let user = sub.as_ref().and_then(|(_, u)| u.clone()).or_else(|| user_id.as_ref().and_then(|(_, u)| u.clone()));
    let user = Some(user);
    let duplicated = duplicate.is_some();
    let wall = SystemTime::now();
    let ticks = [0, b.u32(), Tick::MAX - Tick::from(b.byte()), Tick::MAX];

    let plain = hs256_verifier().verify(&token);
    if let Ok(identity) = &plain {
        check_accepted(identity, exp.as_deref(), nbf.as_deref(), scope.as_deref(), user.as_ref(), duplicated, n);
        for now_tick in ticks {
            check_expiry(identity.exp, wall, now_tick);
        }
    }
    let strict = aud_iss_verifier().verify(&token);
    if let Ok(identity) = &strict {
        check_accepted(identity, exp.as_deref(), nbf.as_deref(), scope.as_deref(), user.as_ref(), duplicated, n);
        let aud_ok = matches!(aud, "\"herald-fuzz\"" | "[\"x\",\"herald-fuzz\"]");
        let iss_ok = matches!(iss, "\"https://issuer.example\"" | "[\"https://issuer.example\"]");
        assert!(aud_ok, "accepted with aud {aud}");
        assert!(iss_ok, "accepted with iss {iss}");
        assert!(plain.is_ok(), "the aud/iss verifier accepted what the plain one refused");
    }

    // The expiry function on its own, with input-chosen exp, clocks and ticks.
    let raw_exp = u64::from_le_bytes(std::array::from_fn(|_| b.byte()));
    let offset = Duration::new(u64::from_le_bytes(std::array::from_fn(|_| b.byte())), b.u32() % 1_000_000_000);
    let clocks = [
        wall,
        UNIX_EPOCH,
        UNIX_EPOCH.checked_sub(Duration::from_secs(1 + u64::from(b.u16()))).unwrap_or(UNIX_EPOCH),
        UNIX_EPOCH.checked_add(offset).unwrap_or(wall),
    ];
    for exp in [raw_exp, u64::MAX, 1 << 63, i64::MAX as u64, n] {
        for clock in clocks {
            for now_tick in ticks {
                check_expiry(exp, clock, now_tick);
            }
        }
    }

    // Minting with any lifetime: capped, never overflowing, and the token verifies.
    let ttl = match b.below(4) {
        0 => Duration::MAX,
        1 => Duration::from_secs(u64::from_le_bytes(std::array::from_fn(|_| b.byte()))),
        2 => MAX_TOKEN_TTL + Duration::from_secs(1),
        _ => Duration::from_secs(u64::from(b.u32())),
    };
    let spec = TokenSpec { sub: "minted", ttl, topics: &[], scope: None, audience: Some(AUDIENCE), issuer: Some(ISSUER) };
    let minted = aud_iss_verifier().verify(&auth::mint_token(SECRET.as_bytes(), &spec)).expect("a minted token verifies");
    assert!(minted.exp <= now() + MAX_TOKEN_TTL.as_secs(), "minted beyond the cap: exp {}", minted.exp);
    assert!(minted.exp > n, "minted an expired token");
});
