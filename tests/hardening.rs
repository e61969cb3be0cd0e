//! Hardening against hostile numbers, identifiers and configuration (issue 8): tokens whose
//! claims overflow time arithmetic, id and scope spoofing, aud/iss, secrets handling, failed
//! API authentication, channel prefixes, and what /health and the logs reveal.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(5);

/// herald still serves: /health answers and a fresh connection works.
fn assert_serving(h: &mut Herald, what: &str) {
    assert!(h.is_running(), "{what}: herald exited\nstderr:\n{}", h.stderr());
    let health = try_http(h.port, "GET", "/health", &[], b"", T);
    assert!(health.is_some(), "{what}: /health no longer answers\nstderr:\n{}", h.stderr());
    let mut ws = h.ws(&token("bystander"));
    assert_alive(&mut ws);
}

// =======================================================================================
// A. token claims that overflow time arithmetic
// =======================================================================================

#[test]
fn a_token_expiring_beyond_2_pow_63_neither_crashes_nor_closes_early() {
    let mut h = herald().env("HERALD_THREADS", "1").start();
    for exp in [1u64 << 63, u64::MAX, i64::MAX as u64, (i64::MAX as u64) / 1000 + 7] {
        let tok = token_claims(json!({"sub": "far-future", "exp": exp}));
        match ws_try_connect(h.port, &format!("/ws?token={tok}"), &[]) {
            Upgrade::Ok(mut ws) => {
                // Far in the future means open now, and still open a moment later.
                assert_alive(&mut ws);
                assert_no_message(&mut ws, Duration::from_millis(300));
                assert_alive(&mut ws);
            }
            Upgrade::Rejected { status, body } => assert_eq!(status, 401, "exp {exp}: {body}"),
        }
        assert_serving(&mut h, &format!("after a token with exp {exp}"));
    }
}
