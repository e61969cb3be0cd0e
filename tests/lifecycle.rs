//! Process lifecycle: configuration errors, flags vs environment, dev mode, the `token`
//! subcommand, graceful shutdown.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(5);

fn assert_config_error(env: &[(&str, &str)], args: &[&str]) {
    let mut full_env = vec![("HERALD_JWT_SECRET", SECRET)];
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    if !env.iter().any(|(k, _)| *k == "HERALD_LISTEN") && !args.contains(&"--listen") {
        full_env.push(("HERALD_LISTEN", &listen));
    }
    full_env.extend_from_slice(env);
    let out = run_herald(args, &full_env, T);
    assert_eq!(
        out.code,
        Some(2),
        "env {env:?} args {args:?}: exit code\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "env {env:?} args {args:?}: expected exactly one error line on stderr, got:\n{}",
        out.stderr
    );
}

#[test]
fn invalid_max_connections_exits_2_with_one_error_line() {
    assert_config_error(&[("HERALD_MAX_CONNECTIONS", "abc")], &[]);
}

#[test]
fn invalid_duration_exits_2_with_one_error_line() {
    assert_config_error(&[("HERALD_PING_INTERVAL", "banana")], &[]);
    assert_config_error(&[("HERALD_IDLE_TIMEOUT", "10 parsecs")], &[]);
}

#[test]
fn invalid_listen_address_exits_2_with_one_error_line() {
    assert_config_error(&[("HERALD_LISTEN", "nonsense")], &[]);
}

#[test]
fn invalid_flag_value_exits_2_with_one_error_line() {
    assert_config_error(&[], &["--max-connections", "lots"]);
    assert_config_error(&[], &["--shutdown-grace", "soon"]);
}

#[test]
fn unusable_public_key_file_is_a_config_error() {
    assert_config_error(&[("HERALD_JWT_PUBLIC_KEY", "/nonexistent/herald-test-key.pem")], &[]);
}

#[test]
fn flag_wins_over_environment() {
    let env_port = free_port();
    let flag_port = free_port();
    let h = herald()
        .port(flag_port)
        .env("HERALD_LISTEN", &format!("127.0.0.1:{env_port}"))
        .env("HERALD_MAX_CONNECTIONS", "abc") // would be a config error if it were read
        .arg("--listen")
        .arg(&format!("127.0.0.1:{flag_port}"))
        .arg("--max-connections")
        .arg("1")
        .start();
    assert!(TcpStream::connect(("127.0.0.1", env_port)).is_err(), "herald listens on the env address too");
    let _a = h.ws(&token("u1"));
    let (r, _) = raw_upgrade_response(h.port, &format!("/ws?token={}", token("u2")), &[]);
    assert_eq!(r.status, 503, "--max-connections 1 not applied: {}", r.text());
}

#[test]
fn help_documents_the_flags() {
    let out = run_herald(&["--help"], &[], T);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    for flag in [
        "--listen",
        "--jwt-secret",
        "--jwt-public-key",
        "--redis-url",
        "--user-channel-prefix",
        "--threads",
        "--max-connections",
        "--max-connections-per-user",
        "--max-message-bytes",
        "--send-queue",
        "--ping-interval",
        "--idle-timeout",
        "--handshake-timeout",
        "--shutdown-grace",
        "--api-key",
        "--allowed-origins",
    ] {
        assert!(out.stdout.contains(flag), "--help does not mention {flag}:\n{}", out.stdout);
    }
}

/// Parses `ws://HOST:PORT/ws?token=JWT` out of the dev-mode banner.
fn banner_url(stdout: &str) -> Option<(String, String)> {
    // other lines (logs) may mention ws:// too: take the first URL that carries a token
    stdout.match_indices("ws://").find_map(|(start, _)| {
        let url: String =
            stdout[start..].chars().take_while(|c| !c.is_whitespace() && *c != '\'' && *c != '"').collect();
        let (base, token) = url.split_once("/ws?token=")?;
        // a JWT is base64url segments joined by dots (stop at e.g. an ANSI colour code)
        let token: String = token.chars().take_while(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c)).collect();
        if token.is_empty() {
            return None;
        }
        Some((base.to_string(), token.to_string()))
    })
}

#[test]
fn dev_mode_banner_token_works_end_to_end() {
    let h = herald().no_secret().start();
    let mut parsed = None;
    let ok = wait_until(T, || {
        parsed = banner_url(&h.stdout());
        parsed.is_some() && h.stdout().contains("curl")
    });
    assert!(ok, "no ws://…/ws?token=… URL and curl command on stdout:\n{}", h.stdout());
    let (base, tok) = parsed.unwrap();
    let stdout = h.stdout();
    assert!(stdout.to_lowercase().contains("dev"), "banner must say it is dev mode:\n{stdout}");
    assert!(base.ends_with(&format!(":{}", h.port)), "banner URL {base} does not point at port {}", h.port);
    assert!(stdout.contains("/publish"), "curl command should publish via /publish:\n{stdout}");
    let claims = jwt_claims(&tok);
    let sub = claims["sub"]
        .as_str()
        .map(|s| s.to_string())
        .or_else(|| claims["sub"].as_i64().map(|n| n.to_string()))
        .unwrap_or_else(|| panic!("banner token has no sub: {claims}"));
    assert!(claims["exp"].as_u64().unwrap_or(0) > now_secs(), "banner token must carry a future exp: {claims}");

    let mut ws = h.ws(&tok);
    let r = h
        .publish(Some(&tok), &json!({"user_id": sub, "message": {"type": "notification", "payload": {"title": "hi"}}}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["sent"], true);
    let m = recv_json(&mut ws, T);
    assert_eq!(strip_timestamp(m), json!({"type": "notification", "payload": {"title": "hi"}}));
    // the test secret is not the dev secret
    let (r, _) = raw_upgrade_response(h.port, &format!("/ws?token={}", token(&sub)), &[]);
    assert_eq!(r.status, 401, "a token signed with another secret was accepted in dev mode");
}

#[test]
fn dev_mode_secret_is_random_per_instance() {
    let a = herald().no_secret().start();
    let b = herald().no_secret().start();
    let mut ta = None;
    assert!(wait_until(T, || {
        ta = banner_url(&a.stdout());
        ta.is_some()
    }));
    let (_, ta) = ta.unwrap();
    let (r, _) = raw_upgrade_response(b.port, &format!("/ws?token={ta}"), &[]);
    assert_eq!(r.status, 401, "instance B accepted instance A's dev token: secrets are not random");
}

#[test]
fn token_subcommand_mints_a_valid_token() {
    let before = now_secs();
    let out = run_herald(
        &["token", "--sub", "alice", "--ttl", "2h", "--topics", "a,b", "--scope", "publish"],
        &[("HERALD_JWT_SECRET", SECRET)],
        T,
    );
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "stdout must be only the token:\n{}", out.stdout);
    let tok = lines[0].trim();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.validate_aud = false;
    validation.leeway = 0;
    let data =
        jsonwebtoken::decode::<Value>(tok, &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()), &validation)
            .unwrap_or_else(|e| panic!("minted token does not verify with the secret: {e}: {tok}"));
    let c = data.claims;
    assert_eq!(c["sub"], "alice", "{c}");
    let exp = c["exp"].as_u64().unwrap_or_else(|| panic!("no exp: {c}"));
    let expected = before + 7200;
    assert!(exp + 5 >= expected && exp <= now_secs() + 7200 + 5, "exp {exp} is not now+2h ({expected}): {c}");
    assert_eq!(c["topics"], json!(["a", "b"]), "{c}");
    let scope = c["scope"].as_str().unwrap_or_else(|| panic!("scope should be a string: {c}"));
    assert!(scope.split(' ').any(|s| s == "publish"), "{c}");

    // the minted token is what a herald with that secret accepts, including for publishing
    let h = herald().start();
    let mut ws = h.ws(&token("bob"));
    let r = h.publish(Some(tok), &json!({"user_id": "bob", "message": notification("from minted")}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(recv_json(&mut ws, T)["payload"]["title"], "from minted");
}

#[test]
fn token_subcommand_default_ttl_and_other_secret() {
    let out = run_herald(&["token", "--sub", "carol"], &[("HERALD_JWT_SECRET", "another-secret")], T);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let tok = out.stdout.trim().to_string();
    assert!(!tok.contains('\n'), "stdout must be one line: {:?}", out.stdout);
    let c = jwt_claims(&tok);
    assert_eq!(c["sub"], "carol");
    assert!(c["exp"].as_u64().unwrap() > now_secs() + 60, "default ttl should be well in the future: {c}");
    assert_eq!(jwt_header(&tok)["alg"], "HS256");
    // signed with "another-secret", so the test herald rejects it
    let h = herald().start();
    let (r, _) = raw_upgrade_response(h.port, &format!("/ws?token={tok}"), &[]);
    assert_eq!(r.status, 401);
    let h2 = herald().env("HERALD_JWT_SECRET", "another-secret").start();
    let mut ws = h2.ws(&tok);
    assert_alive(&mut ws);
}

#[test]
fn sigterm_closes_clients_with_1001_and_exits_0() {
    let mut h = herald().env("HERALD_SHUTDOWN_GRACE", "3s").start();
    let mut a = h.ws(&token("u1"));
    let mut b = h.ws(&token("u2"));
    h.wait_active_connections(2, T);
    let start = Instant::now();
    h.sigterm();
    expect_close_code(&mut a, 1001, Duration::from_secs(4));
    expect_close_code(&mut b, 1001, Duration::from_secs(4));
    let st = h.wait_exit(Duration::from_secs(4)).expect("herald did not exit within grace + 1 s after SIGTERM");
    assert_eq!(st.code(), Some(0), "exit status {st}");
    assert!(start.elapsed() <= Duration::from_secs(4));
}

#[test]
fn sigint_also_shuts_down_gracefully() {
    let mut h = herald().env("HERALD_SHUTDOWN_GRACE", "3s").start();
    let mut a = h.ws(&token("u1"));
    h.signal(libc::SIGINT);
    expect_close_code(&mut a, 1001, Duration::from_secs(4));
    let st = h.wait_exit(Duration::from_secs(4)).expect("herald did not exit after SIGINT");
    assert_eq!(st.code(), Some(0), "exit status {st}");
}

#[test]
fn sigterm_with_no_clients_exits_promptly() {
    let mut h = herald().start(); // default grace 10 s: nothing to wait for, so it must not use it
    let start = Instant::now();
    h.sigterm();
    let st = h.wait_exit(Duration::from_secs(5)).expect("idle herald did not exit within 5 s of SIGTERM");
    assert_eq!(st.code(), Some(0));
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn sigterm_flushes_queued_messages_before_1001() {
    let mut h = herald().api_key().env("HERALD_SHUTDOWN_GRACE", "5s").start();
    let mut ws = h.ws(&token("u1"));
    for i in 0..30 {
        let r = h.publish(Some(API_KEY), &json!({"user_id": "u1", "message": {"type": "n", "i": i}}));
        assert_eq!(r.status, 200);
    }
    h.sigterm();
    for i in 0..30 {
        let m = recv_json(&mut ws, T);
        assert_eq!(m["i"], i, "message lost or reordered at shutdown");
    }
    expect_close_code(&mut ws, 1001, T);
    let st = h.wait_exit(Duration::from_secs(6)).expect("no exit");
    assert_eq!(st.code(), Some(0));
}

#[test]
fn sigterm_with_unresponsive_client_exits_within_grace() {
    let mut h = herald().env("HERALD_SHUTDOWN_GRACE", "2s").start();
    // a client that never reads nor answers the close handshake
    let _raw = RawWs::connect(h.port, &token("deaf"));
    let mut polite = h.ws(&token("polite"));
    h.wait_active_connections(2, T);
    let start = Instant::now();
    h.sigterm();
    expect_close_code(&mut polite, 1001, Duration::from_secs(3));
    let st = h.wait_exit(Duration::from_secs(3)).expect("herald did not exit within grace (2 s) + 1 s");
    assert_eq!(st.code(), Some(0), "exit status {st}");
    assert!(start.elapsed() <= Duration::from_secs(3), "took {:?}", start.elapsed());
}

/// The pieces of the banner's `curl … /publish` command: (path, headers, body).
type CurlParts = (String, Vec<(String, String)>, String);

fn banner_curl(stdout: &str) -> Option<CurlParts> {
    let line = stdout.lines().find(|l| l.contains("curl") && l.contains("/publish"))?;
    let url_start = line.find("http://")?;
    let url: String = line[url_start..].chars().take_while(|c| !c.is_whitespace() && *c != '\'' && *c != '"').collect();
    let path = url.splitn(4, '/').nth(3).map(|p| format!("/{p}"))?;
    // quoted arguments following -H and -d
    let mut headers = Vec::new();
    let mut body = None;
    let mut rest = line;
    while let Some(pos) = rest.find(" -") {
        rest = &rest[pos + 2..];
        let flag: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
        let after = rest[flag.len()..].trim_start();
        let quote = after.chars().next()?;
        if quote != '\'' && quote != '"' {
            continue;
        }
        let end = after[1..].find(quote)? + 1;
        let arg = &after[1..end];
        match flag.as_str() {
            "H" | "-header" => {
                let (k, v) = arg.split_once(':')?;
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
            "d" | "-data" | "-data-raw" => body = Some(arg.to_string()),
            _ => {}
        }
        rest = &after[end..];
    }
    Some((path, headers, body?))
}

#[test]
fn dev_mode_curl_command_publishes_to_the_banner_user() {
    let h = herald().no_secret().start();
    let mut parsed = None;
    let ok = wait_until(T, || {
        parsed = banner_url(&h.stdout()).zip(banner_curl(&h.stdout()));
        parsed.is_some()
    });
    assert!(ok, "banner lacks a ws:// URL or a curl … /publish command with -H and -d:\n{}", h.stdout());
    let ((_, tok), (path, headers, body)) = parsed.unwrap();
    let mut ws = h.ws(&tok);
    // replay exactly what the printed curl command sends
    let hdrs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = h.http("POST", &path, &hdrs, body.as_bytes());
    assert_eq!(r.status, 200, "the banner's curl command failed: {} {}", r.status, r.text());
    assert_eq!(r.json()["sent"], true, "the curl command did not address the banner token's user");
    let published: Value = serde_json::from_str(&body).expect("curl -d body is JSON");
    let m = recv_json(&mut ws, T);
    assert_eq!(strip_timestamp(m), published["message"], "delivered message differs from the curl command's");
}

#[test]
fn secrets_and_tokens_are_never_logged() {
    let h = herald().api_key().env("HERALD_LOG", "trace").start();
    let tok = token("logged-user");
    let mut ws = h.ws(&tok);
    let r = h.publish(Some(API_KEY), &json!({"user_id": "logged-user", "message": notification("x")}));
    assert_eq!(r.status, 200);
    recv_json(&mut ws, T);
    // failures are logged too: a bad token, a wrong key, a user token publishing elsewhere
    let bad = token_hs256(&json!({"sub": "mallory", "exp": now_secs() + 60}), "wrong-secret");
    let (r, _) = raw_upgrade_response(h.port, &format!("/ws?token={bad}"), &[]);
    assert_eq!(r.status, 401);
    assert_eq!(
        h.publish(Some("wrong-api-key-123"), &json!({"user_id": "a", "message": notification("x")})).status,
        401
    );
    assert_eq!(h.publish(Some(&tok), &json!({"user_id": "other", "message": notification("x")})).status, 403);
    ws.close(None).unwrap();
    let _ = wait_close(&mut ws, T);
    std::thread::sleep(Duration::from_millis(300));
    let logs = format!("{}\n{}", h.stdout(), h.stderr());
    assert!(!logs.is_empty(), "expected some log output at HERALD_LOG=trace");
    for (what, secret) in [
        ("the JWT secret", SECRET),
        ("the API key", API_KEY),
        ("a user token", tok.as_str()),
        ("a rejected token", bad.as_str()),
        ("a rejected API key", "wrong-api-key-123"),
    ] {
        assert!(!logs.contains(secret), "{what} appears in the logs");
    }
    // nor the signature part of tokens on its own
    let sig = tok.rsplit('.').next().unwrap();
    assert!(!logs.contains(sig), "a token signature appears in the logs");
}
