//! Tokens → `auth::Verifier::verify`, with an HS256 verifier (HERALD_JWT_SECRET) and an ES256
//! verifier (HERALD_JWT_PUBLIC_KEY).
//!
//! Two halves per input: the input itself as a token string, and a structured token built
//! from the input (header algorithm, claim shapes, signing key, formatting twists) with valid
//! base64url segments, so the fuzzer reaches claim handling behind a real signature.
//!
//! Invariants: no panics; a token is accepted only if its header names the verifier's one
//! algorithm, it is signed with the verifier's key (never `none`, never HS256 keyed with the
//! public key), `exp` is in the future and `nbf` (if any) not, and it names a user; the
//! identity is `sub` (else `user_id`), numbers as decimal strings, with `topics` and the
//! `publish` scope as claimed. Well-formed tokens are accepted whenever those hold, and
//! refused as `Expired` exactly when only the expiry is wrong.
#![no_main]

use std::sync::OnceLock;

use herald::auth::{Identity, MAX_USER_ID_BYTES, Rejection, Verifier};
use herald_fuzz::{Bytes, ES256_PRIVATE_PKCS8_PEM, ES256_PUBLIC_PEM, SECRET, b64url, b64url_decode, es256_verifier, hs256_verifier, now};
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fn es256_key() -> &'static EncodingKey {
    static K: OnceLock<EncodingKey> = OnceLock::new();
    K.get_or_init(|| EncodingKey::from_ec_pem(ES256_PRIVATE_PKCS8_PEM).expect("fuzz EC key"))
}

/// The user a claims object names, as herald should resolve it.
fn user_of(claims: &Value) -> Option<String> {
    let id = |v: Option<&Value>| match v? {
        Value::String(s) if !s.is_empty() && s.len() <= MAX_USER_ID_BYTES => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    };
    id(claims.get("sub")).or_else(|| id(claims.get("user_id")))
}

/// For a token that verified: re-derive everything from its segments and compare.
fn check_accepted(token: &str, identity: &Identity, alg: &str) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "accepted token without three segments: {token:?}");
    let header: Value = serde_json::from_slice(&b64url_decode(parts[0]).expect("header is base64url"))
        .expect("header is JSON");
    assert_eq!(header["alg"], alg, "accepted a token whose header names {:?}", header["alg"]);
    assert!(!parts[2].is_empty(), "accepted an unsigned token");
    let claims: Value =
        serde_json::from_slice(&b64url_decode(parts[1]).expect("claims are base64url")).expect("claims are JSON");
    let exp = claims["exp"].as_u64().expect("accepted without an integer exp");
    assert!(exp >= now(), "accepted an expired token (exp {exp})");
    assert_eq!(identity.exp, exp);
    if let Some(nbf) = claims.get("nbf").and_then(Value::as_f64) {
        assert!(nbf <= now() as f64 + 1.0, "accepted before nbf {nbf}");
    }
    assert_eq!(Some(identity.user.to_string()), user_of(&claims), "identity user differs from the claims");
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Signer {
    Secret,
    WrongSecret,
    /// HS256 keyed with the PEM public key: the classic RS/ES → HS confusion.
    PublicKeyAsSecret,
    Es256,
    Unsigned,
}

fuzz_target!(|data: &[u8]| {
    // Half one: the input as a token.
    let text = String::from_utf8_lossy(data);
    for (verifier, alg) in [(hs256_verifier(), "HS256"), (es256_verifier(), "ES256")] {
        if let Ok(identity) = verifier.verify(&text) {
            check_accepted(&text, &identity, alg);
        }
    }

    // Half two: a structured token.
    let mut b = Bytes::new(data);
    let n = now();
    let mut exact = true; // every choice below has a defined outcome
    // ES256 verification costs milliseconds under ASAN (the rest microseconds), so ES256
    // headers are 1 in 16: the target still checks them without running at a crawl.
    let header_alg = match b.below(32) {
        0 | 1 => "ES256",
        n => ["HS256", "HS384", "none", "RS256", "hs256", "HS512", "HS256"][n % 7],
    };
    let signer = [Signer::Secret, Signer::WrongSecret, Signer::PublicKeyAsSecret, Signer::Es256, Signer::Unsigned][b.below(5)];
    let mut header = json!({ "alg": header_alg });
    match b.below(4) {
        0 => header["typ"] = json!("JWT"),
        1 => header["kid"] = json!(b.string(8)),
        2 => {
            header["x"] = json!(b.string(8));
            exact = false;
        }
        _ => {}
    }
    let some_id = |b: &mut Bytes<'_>, exact: &mut bool| -> Option<Value> {
        match b.below(8) {
            0 => None,
            1 => Some(json!(b.string(24))),
            2 => Some(json!(b.u32() as i64 - (1 << 31))),
            3 => Some(json!(1.5)),
            4 => Some(json!("")),
            5 => Some(json!("u".repeat(250 + b.below(12)))),
            6 => Some(json!(true)),
            _ => {
                *exact = false;
                Some(json!(u64::MAX))
            }
        }
    };
    let mut claims = serde_json::Map::new();
    if let Some(v) = some_id(&mut b, &mut exact) {
        claims.insert("sub".into(), v);
    }
    if let Some(v) = some_id(&mut b, &mut exact) {
        claims.insert("user_id".into(), v);
    }
    let exp_ok;
    match b.below(6) {
        0 => {
            claims.insert("exp".into(), json!(n + 3600));
            exp_ok = Some(true);
        }
        1 => {
            claims.insert("exp".into(), json!(n - 3600));
            exp_ok = Some(false);
        }
        2 => exp_ok = None, // missing
        3 => {
            claims.insert("exp".into(), json!((n + 3600).to_string()));
            exp_ok = None;
            exact = false;
        }
        4 => {
            claims.insert("exp".into(), json!(n as f64 + 3600.5));
            exp_ok = None;
            exact = false;
        }
        _ => {
            claims.insert("exp".into(), json!(-1));
            exp_ok = None;
            exact = false;
        }
    }
    let nbf_ok = match b.below(4) {
        0 => {
            claims.insert("nbf".into(), json!(n + 3600));
            false
        }
        1 => {
            claims.insert("nbf".into(), json!(n - 3600));
            true
        }
        2 => {
            claims.insert("nbf".into(), json!("soon"));
            exact = false;
            false
        }
        _ => true,
    };
    let mut topics_ok = true;
    let mut topics = Vec::new();
    match b.below(4) {
        0 => {
            topics = (0..b.below(4)).map(|_| b.string(16)).collect::<Vec<_>>();
            claims.insert("topics".into(), json!(topics));
        }
        1 => {
            claims.insert("topics".into(), json!("project:*"));
            topics_ok = false;
        }
        2 => {
            claims.insert("topics".into(), Value::Null);
        }
        _ => {}
    }
    let mut scope_ok = true;
    let scope = match b.below(5) {
        0 => Some("publish"),
        1 => Some("read publish"),
        2 => Some("publisher"),
        3 => {
            claims.insert("scope".into(), json!(["publish"]));
            scope_ok = false;
            None
        }
        _ => None,
    };
    if let Some(s) = scope {
        claims.insert("scope".into(), json!(s));
    }
    if b.bool() {
        claims.insert("extra".into(), json!({ "nested": [b.string(8)] }));
    }
    let claims = Value::Object(claims);
    let signing_input = format!("{}.{}", b64url(header.to_string().as_bytes()), b64url(claims.to_string().as_bytes()));
    let hs = |key: &[u8]| {
        jsonwebtoken::crypto::sign(signing_input.as_bytes(), &EncodingKey::from_secret(key), Algorithm::HS256).unwrap()
    };
    let signature = match signer {
        Signer::Secret => hs(SECRET.as_bytes()),
        Signer::WrongSecret => hs(b"not-the-secret"),
        Signer::PublicKeyAsSecret => hs(ES256_PUBLIC_PEM),
        // ECDSA signing is ~100x slower than the rest under ASAN: sign for real only when the
        // header says ES256 (the one case where the signature is looked at); otherwise any
        // well-formed 64-byte signature exercises the same refusal.
        Signer::Es256 if header_alg == "ES256" => {
            jsonwebtoken::crypto::sign(signing_input.as_bytes(), es256_key(), Algorithm::ES256).unwrap()
        }
        Signer::Es256 => b64url(&[0x5a; 64]),
        Signer::Unsigned => String::new(),
    };
    let mut token = format!("{signing_input}.{signature}");
    match b.below(8) {
        0 => {
            token.push('=');
            exact = false;
        }
        1 => {
            token = token.replace('-', "+").replace('_', "/");
            exact = false;
        }
        2 => {
            token.pop();
            exact = false;
        }
        3 => {
            token = format!(" {token} ");
            exact = false;
        }
        _ => {}
    }

    let user = user_of(&claims);
    let fields_ok = topics_ok && scope_ok && nbf_ok;
    let check = |verifier: &Verifier, alg: &str, signed_right: bool| {
        let result = verifier.verify(&token);
        let valid_sig = header_alg == alg && signed_right;
        match &result {
            Ok(identity) => {
                assert!(valid_sig, "{alg} verifier accepted alg {header_alg} signed {signer:?}");
                assert_eq!(exp_ok, Some(true), "accepted with exp {:?}", claims.get("exp"));
                assert!(nbf_ok, "accepted before nbf");
                check_accepted(&token, identity, alg);
                assert_eq!(identity.topics, topics);
                assert_eq!(identity.can_publish, matches!(scope, Some("publish" | "read publish")));
            }
            Err(rejection) if exact => {
                let expected = if !valid_sig || exp_ok.is_none() || !topics_ok || !scope_ok {
                    Some(Rejection::Invalid)
                } else if exp_ok == Some(false) {
                    Some(Rejection::Expired)
                } else if !nbf_ok {
                    Some(Rejection::Invalid)
                } else if user.is_none() {
                    Some(Rejection::NoUser)
                } else {
                    None
                };
                let _ = fields_ok;
                assert_eq!(
                    Some(*rejection),
                    expected,
                    "{alg} verifier: alg {header_alg} signed {signer:?}, claims {claims}"
                );
            }
            Err(_) => {}
        }
    };
    check(hs256_verifier(), "HS256", signer == Signer::Secret);
    check(es256_verifier(), "ES256", signer == Signer::Es256);
});
