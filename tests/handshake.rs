//! WebSocket upgrade on /ws: authentication, limits, origin checks, token expiry.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(5);

fn upgrade_status(h: &Herald, path: &str, extra: &[(&str, &str)]) -> HttpResponse {
    raw_upgrade_response(h.port, path, extra).0
}

fn assert_401(resp: &HttpResponse, error: &str) {
    assert_eq!(resp.status, 401, "status (body {:?})", resp.text());
    assert_eq!(resp.json(), json!({ "error": error }), "401 body");
}

#[test]
fn valid_token_in_query_upgrades_with_101() {
    let h = herald().start();
    let (resp, _raw) = raw_upgrade_response(h.port, &format!("/ws?token={}", token("alice")), &[]);
    assert_eq!(resp.status, 101, "body {:?}", resp.text());
    assert!(resp.header("upgrade").unwrap_or("").eq_ignore_ascii_case("websocket"));
    assert_eq!(resp.header("sec-websocket-accept"), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    // and a real client works end to end
    let mut ws = h.ws(&token("alice"));
    assert_alive(&mut ws);
}

#[test]
fn bearer_header_token_is_accepted() {
    let h = herald().start();
    let auth = format!("Bearer {}", token("bob"));
    match ws_try_connect(h.port, "/ws", &[("Authorization", &auth)]) {
        Upgrade::Ok(mut ws) => assert_alive(&mut ws),
        Upgrade::Rejected { status, body } => panic!("Bearer token rejected: {status} {body}"),
    }
}

#[test]
fn missing_token_is_rejected_with_401() {
    let h = herald().start();
    assert_401(&upgrade_status(&h, "/ws", &[]), "missing token parameter");
    // an empty token parameter is still a missing token or an invalid one, never an upgrade
    let r = upgrade_status(&h, "/ws?token=", &[]);
    assert_eq!(r.status, 401, "empty token: body {:?}", r.text());
}

#[test]
fn garbage_token_is_rejected_with_401() {
    let h = herald().start();
    assert_401(&upgrade_status(&h, "/ws?token=not-a-jwt", &[]), "invalid or expired token");
    assert_401(&upgrade_status(&h, "/ws?token=a.b.c", &[]), "invalid or expired token");
}

#[test]
fn wrong_signature_token_is_rejected_with_401() {
    let h = herald().start();
    let now = now_secs();
    let t = token_hs256(&json!({"sub": "alice", "exp": now + 3600}), "some-other-secret");
    assert_401(&upgrade_status(&h, &format!("/ws?token={t}"), &[]), "invalid or expired token");
    // tampered payload with the original signature
    let good = token("alice");
    let parts: Vec<&str> = good.split('.').collect();
    let forged_payload = b64url_encode(json!({"sub": "admin", "exp": now + 3600}).to_string().as_bytes());
    let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    assert_401(&upgrade_status(&h, &format!("/ws?token={forged}"), &[]), "invalid or expired token");
}

#[test]
fn expired_token_is_rejected_with_401() {
    let h = herald().start();
    let now = now_secs();
    let t = token_claims(json!({"sub": "alice", "iat": now - 7200, "exp": now - 3600}));
    assert_401(&upgrade_status(&h, &format!("/ws?token={t}"), &[]), "invalid or expired token");
}

#[test]
fn recently_expired_token_is_rejected_without_leeway() {
    let h = herald().start();
    let now = now_secs();
    let t = token_claims(json!({"sub": "alice", "iat": now - 60, "exp": now - 5}));
    assert_401(&upgrade_status(&h, &format!("/ws?token={t}"), &[]), "invalid or expired token");
}

#[test]
fn token_without_exp_is_rejected_with_401() {
    let h = herald().start();
    let t = token_claims(json!({"sub": "alice", "iat": now_secs()}));
    assert_401(&upgrade_status(&h, &format!("/ws?token={t}"), &[]), "invalid or expired token");
}

#[test]
fn token_with_future_nbf_is_rejected_with_401() {
    let h = herald().start();
    let now = now_secs();
    let t = token_claims(json!({"sub": "alice", "nbf": now + 600, "exp": now + 3600}));
    assert_401(&upgrade_status(&h, &format!("/ws?token={t}"), &[]), "invalid or expired token");
}

#[test]
fn alg_none_token_is_rejected_with_401() {
    let h = herald().start();
    let t = token_alg_none(&json!({"sub": "alice", "exp": now_secs() + 3600}));
    assert_401(&upgrade_status(&h, &format!("/ws?token={t}"), &[]), "invalid or expired token");
}

#[test]
fn token_without_user_id_is_rejected_with_401() {
    let h = herald().start();
    let t = token_claims(json!({"email": "x@example.com", "exp": now_secs() + 3600}));
    let r = upgrade_status(&h, &format!("/ws?token={t}"), &[]);
    assert_eq!(r.status, 401, "a token with neither sub nor user_id must not upgrade; body {:?}", r.text());
}

#[test]
fn invalid_bearer_header_is_rejected_with_401() {
    let h = herald().start();
    let r = upgrade_status(&h, "/ws", &[("Authorization", "Bearer not-a-jwt")]);
    assert_401(&r, "invalid or expired token");
}

#[test]
fn user_id_claim_is_used_when_sub_is_absent() {
    let h = herald().api_key().start();
    let t = token_claims(json!({"user_id": "legacy-7", "exp": now_secs() + 3600}));
    let mut ws = h.ws(&t);
    let r = h.publish(Some(API_KEY), &json!({"user_id": "legacy-7", "message": notification("via user_id")}));
    assert_eq!(r.status, 200, "{}", r.text());
    let m = recv_json(&mut ws, Duration::from_secs(5));
    assert_eq!(m["payload"]["title"], "via user_id");
}

#[test]
fn numeric_sub_is_used_as_decimal_string() {
    let h = herald().api_key().start();
    let t = token_claims(json!({"sub": 42, "exp": now_secs() + 3600}));
    let mut ws = h.ws(&t);
    let r = h.publish(Some(API_KEY), &json!({"user_id": "42", "message": notification("for 42")}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["sent"], true, "publish to user 42 should reach the numeric-sub connection");
    let m = recv_json(&mut ws, Duration::from_secs(5));
    assert_eq!(m["payload"]["title"], "for 42");
}

#[test]
fn numeric_user_id_claim_is_used_as_decimal_string() {
    let h = herald().api_key().start();
    let t = token_claims(json!({"user_id": 1007, "exp": now_secs() + 3600}));
    let mut ws = h.ws(&t);
    let r = h.publish(Some(API_KEY), &json!({"user_id": "1007", "message": notification("for 1007")}));
    assert_eq!(r.status, 200, "{}", r.text());
    let m = recv_json(&mut ws, Duration::from_secs(5));
    assert_eq!(m["payload"]["title"], "for 1007");
}

#[test]
fn non_upgrade_get_ws_returns_426() {
    let h = herald().start();
    let r = h.http("GET", &format!("/ws?token={}", token("alice")), &[], b"");
    assert_eq!(r.status, 426, "body {:?}", r.text());
}

#[test]
fn disallowed_origin_gets_403_and_allowed_or_absent_origin_upgrades() {
    let h = herald().env("HERALD_ALLOWED_ORIGINS", "https://app.example.com,https://admin.example.com").start();
    let path = format!("/ws?token={}", token("alice"));
    let r = upgrade_status(&h, &path, &[("Origin", "https://evil.example.com")]);
    assert_eq!(r.status, 403, "foreign Origin: body {:?}", r.text());
    let r = upgrade_status(&h, &path, &[("Origin", "https://admin.example.com")]);
    assert_eq!(r.status, 101, "allowed Origin: body {:?}", r.text());
    let r = upgrade_status(&h, &path, &[]);
    assert_eq!(r.status, 101, "no Origin header: body {:?}", r.text());
}

#[test]
fn any_origin_is_allowed_by_default() {
    let h = herald().start();
    let path = format!("/ws?token={}", token("alice"));
    let r = upgrade_status(&h, &path, &[("Origin", "https://anything.example.org")]);
    assert_eq!(r.status, 101, "body {:?}", r.text());
}

#[test]
fn over_max_connections_gets_503_until_one_closes() {
    let h = herald().env("HERALD_MAX_CONNECTIONS", "2").start();
    let mut a = h.ws(&token("u1"));
    let _b = h.ws(&token("u2"));
    h.wait_active_connections(2, Duration::from_secs(5));
    let r = upgrade_status(&h, &format!("/ws?token={}", token("u3")), &[]);
    assert_eq!(r.status, 503, "third connection: body {:?}", r.text());
    assert_eq!(r.json(), json!({"error": "connection limit reached"}));
    // health keeps answering at the limit
    assert_eq!(h.health().status, 200);
    a.close(None).unwrap();
    let _ = wait_close(&mut a, Duration::from_secs(5));
    drop(a);
    h.wait_active_connections(1, Duration::from_secs(5));
    let r = upgrade_status(&h, &format!("/ws?token={}", token("u3")), &[]);
    assert_eq!(r.status, 101, "after a slot freed: body {:?}", r.text());
}

#[test]
fn over_max_connections_per_user_gets_503() {
    let h = herald().env("HERALD_MAX_CONNECTIONS_PER_USER", "2").start();
    let _a = h.ws(&token("u1"));
    let _b = h.ws(&token("u1"));
    let r = upgrade_status(&h, &format!("/ws?token={}", token("u1")), &[]);
    assert_eq!(r.status, 503, "third connection of u1: body {:?}", r.text());
    assert!(r.json()["error"].is_string(), "503 body must carry an error string: {}", r.text());
    // other users are unaffected
    let r = upgrade_status(&h, &format!("/ws?token={}", token("u2")), &[]);
    assert_eq!(r.status, 101, "u2: body {:?}", r.text());
}

#[test]
fn expired_token_is_closed_with_1008() {
    let h = herald().start();
    let exp = now_secs() + 2;
    let t = token_claims(json!({"sub": "shortlived", "exp": exp}));
    let mut ws = h.ws(&t);
    assert_alive(&mut ws);
    let start = Instant::now();
    expect_close_code(&mut ws, 1008, Duration::from_secs(5));
    // closed at expiry, not long after (exp is at most 2 s after connect)
    assert!(start.elapsed() < Duration::from_millis(4500), "closed after {:?}", start.elapsed());
    assert!(now_secs() >= exp, "closed before the token expired");
    // a connection with a long-lived token on the same instance is unaffected
    let mut other = h.ws(&token("longlived"));
    assert_alive(&mut other);
}

#[test]
fn rs256_token_is_accepted_with_rsa_public_key() {
    let key = fixture("rsa_public.pem");
    let h = herald().no_secret().env("HERALD_JWT_PUBLIC_KEY", key.to_str().unwrap()).start();
    let claims = json!({"sub": "rsa-user", "exp": now_secs() + 3600});
    let t = token_rs256(&claims, "rsa_private.pem");
    let mut ws = h.ws(&t);
    assert_alive(&mut ws);
    // signed by another RSA key
    let bad = token_rs256(&claims, "rsa_other_private.pem");
    assert_401(&upgrade_status(&h, &format!("/ws?token={bad}"), &[]), "invalid or expired token");
    // algorithm confusion: HS256 with the public key bytes as the HMAC secret
    let pem = std::fs::read_to_string(&key).unwrap();
    let confused = token_hs256(&claims, &pem);
    assert_401(&upgrade_status(&h, &format!("/ws?token={confused}"), &[]), "invalid or expired token");
    // alg none
    let none = token_alg_none(&claims);
    assert_401(&upgrade_status(&h, &format!("/ws?token={none}"), &[]), "invalid or expired token");
}

#[test]
fn es256_token_is_accepted_with_ec_public_key() {
    let key = fixture("ec_public.pem");
    let h = herald().no_secret().env("HERALD_JWT_PUBLIC_KEY", key.to_str().unwrap()).start();
    let claims = json!({"sub": "ec-user", "exp": now_secs() + 3600});
    let t = token_es256(&claims, "ec_private.pem");
    let mut ws = h.ws(&t);
    assert_alive(&mut ws);
    // an RS256 token is not signed by this EC key
    let rsa = token_rs256(&claims, "rsa_private.pem");
    assert_401(&upgrade_status(&h, &format!("/ws?token={rsa}"), &[]), "invalid or expired token");
    let expired = token_es256(&json!({"sub": "ec-user", "exp": now_secs() - 100}), "ec_private.pem");
    assert_401(&upgrade_status(&h, &format!("/ws?token={expired}"), &[]), "invalid or expired token");
}

#[test]
fn jwt_secret_key_alias_is_honoured() {
    let h = herald().remove_env("HERALD_JWT_SECRET").env("JWT_SECRET_KEY", "alias-secret-xyz").start();
    let now = now_secs();
    let t = token_hs256(&json!({"sub": "alias", "exp": now + 3600}), "alias-secret-xyz");
    let mut ws = h.ws(&t);
    assert_alive(&mut ws);
    // a token for another secret (e.g. a dev-mode random one) is refused
    let r = upgrade_status(&h, &format!("/ws?token={}", token("alias")), &[]);
    assert_eq!(r.status, 401);
}

#[test]
fn connect_rate_per_ip_over_limit_gets_429() {
    let h = herald().env("HERALD_CONNECT_RATE_PER_IP", "2").start();
    let path = format!("/ws?token={}", token("rapid"));
    let mut statuses = Vec::new();
    let mut keep = Vec::new();
    for _ in 0..12 {
        let (r, raw) = raw_upgrade_response(h.port, &path, &[]);
        statuses.push(r.status);
        keep.push(raw);
    }
    assert_eq!(statuses[0], 101, "the first connection is within the burst: {statuses:?}");
    assert!(statuses.contains(&429), "12 upgrades in a burst at 2/s (burst 4) never got 429: {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 101 || *s == 429), "{statuses:?}");
    let accepted = statuses.iter().filter(|s| **s == 101).count();
    assert!(accepted <= 6, "{accepted} accepted: the limit is not enforced ({statuses:?})");
}

#[test]
fn default_per_user_cap_is_64_and_zero_means_unlimited() {
    let h = herald().start();
    let conns: Vec<Ws> = (0..64).map(|_| h.ws(&token("tabby"))).collect();
    let r = upgrade_status(&h, &format!("/ws?token={}", token("tabby")), &[]);
    assert_eq!(r.status, 503, "65th connection of one user under the default cap of 64: {}", r.text());
    drop(conns);

    let h = herald().env("HERALD_MAX_CONNECTIONS_PER_USER", "0").start();
    let conns: Vec<Ws> = (0..70).map(|_| h.ws(&token("tabby"))).collect();
    h.wait_active_connections(70, T);
    drop(conns);
}
