//! tuning/: what operators copy onto a host. Every variable the environment file names is one
//! herald reads, the systemd unit reloads with SIGHUP and gives a drain the time it needs, and
//! herald runs with the environment file as shipped (only its listen address, Redis port and
//! drain period swapped for the test's), reloads on SIGHUP and drains on SIGTERM.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(5);

fn tuning_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `(name, value, set)` for every `HERALD_…=` line of the environment file; `set` is false for
/// the commented-out ones (`#HERALD_…=`), which document options.
fn env_example() -> Vec<(String, String, bool)> {
    tuning_file("herald.env.example")
        .lines()
        .filter_map(|line| {
            let trimmed = line.trim();
            let (set, rest) = match trimmed.strip_prefix('#') {
                Some(rest) => (false, rest.trim_start()),
                None => (true, trimmed),
            };
            let (name, value) = rest.split_once('=')?;
            name.starts_with("HERALD_").then(|| (name.to_string(), value.to_string(), set))
        })
        .collect()
}

fn value_of(vars: &[(String, String, bool)], name: &str) -> String {
    vars.iter()
        .find(|(n, _, set)| n == name && *set)
        .map(|(_, v, _)| v.clone())
        .unwrap_or_else(|| panic!("herald.env.example sets no {name}"))
}

/// Seconds of a systemd or humantime duration written as `<n>s` or `<n>` (what these files use).
fn seconds(value: &str) -> u64 {
    value.trim().trim_end_matches('s').parse().unwrap_or_else(|_| panic!("not a duration in seconds: {value:?}"))
}

#[test]
fn every_variable_the_env_example_names_is_one_herald_reads() {
    let vars = env_example();
    assert!(vars.len() >= 10, "the env example names only {} variables", vars.len());
    let help = run_herald(&["--help"], &[], T);
    assert_eq!(help.code, Some(0), "{}", help.stderr);
    for (name, _, _) in &vars {
        let documented = help.stdout.split(|c: char| !(c.is_ascii_uppercase() || c == '_')).any(|word| word == name);
        assert!(documented, "herald.env.example names {name}, which herald does not read");
    }
}

#[test]
fn the_unit_reloads_with_hup_and_outlasts_drain_plus_grace() {
    let unit = tuning_file("herald.service");
    let setting = |key: &str| -> String {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("herald.service has no {key}="))
            .to_string()
    };
    assert_eq!(setting("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(setting("KillSignal"), "SIGTERM");
    assert!(!setting("MemoryMax").is_empty());
    assert!(
        setting("LimitNOFILE").parse::<u64>().unwrap_or(0) >= 100_000,
        "LimitNOFILE too low for the unit's purpose"
    );
    let vars = env_example();
    let drain = seconds(&value_of(&vars, "HERALD_DRAIN_PERIOD"));
    let grace = seconds(&value_of(&vars, "HERALD_SHUTDOWN_GRACE"));
    let stop = seconds(&setting("TimeoutStopSec"));
    assert!(stop > drain + grace, "TimeoutStopSec={stop} would kill herald inside drain {drain}s + grace {grace}s");
}

#[test]
fn herald_runs_with_the_env_example_reloads_on_hup_and_drains_on_term() {
    let vars = env_example();
    let redis_url = value_of(&vars, "HERALD_REDIS_URL");
    // The file's password and database, on the test's Redis.
    let (credentials, rest) = redis_url
        .strip_prefix("redis://")
        .and_then(|u| u.split_once('@'))
        .unwrap_or_else(|| panic!("HERALD_REDIS_URL without credentials: {redis_url}"));
    let password = credentials.trim_start_matches(':');
    let database = rest.rsplit_once('/').map_or("0", |(_, db)| db);
    let redis = PasswordRedis::start(password);
    let mut builder = herald();
    for (name, value, set) in &vars {
        if *set && name != "HERALD_LISTEN" {
            builder = builder.env(name, value);
        }
    }
    let mut h = builder
        .env("HERALD_REDIS_URL", &format!("redis://:{password}@127.0.0.1:{}/{database}", redis.port))
        // 30 s as shipped; shortened so one connection's close comes quickly.
        .env("HERALD_DRAIN_PERIOD", "1s")
        .start();
    let secret = value_of(&vars, "HERALD_JWT_SECRET");
    let user_token = |user: &str| {
        let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
        token_hs256(&json!({"sub": user, "exp": exp}), &secret)
    };
    let origin = value_of(&vars, "HERALD_ALLOWED_ORIGINS");
    let port = h.port;
    let connect = |user: &str| match ws_try_connect(
        port,
        &format!("/ws?token={}", user_token(user)),
        &[("Origin", origin.split(',').next().unwrap_or_default())],
    ) {
        Upgrade::Ok(ws) => *ws,
        Upgrade::Rejected { status, body } => panic!("upgrade refused: {status} {body}"),
    };
    // What a load balancer waits for: /ready is 200 once the Redis links are up (until then
    // upgrades are served but nothing published reaches them).
    let ready = wait_until(Duration::from_secs(10), || http(port, "GET", "/ready", &[], b"").status == 200);
    assert!(ready, "/ready never answered 200 with the env example's settings");
    let mut before = connect("ops-1");
    let publish = |user: &str, n: u64| {
        let key = value_of(&vars, "HERALD_API_KEY");
        let r = http(
            port,
            "POST",
            "/publish",
            &[("Authorization", &format!("Bearer {key}"))],
            json!({"user_id": user, "message": {"type": "n", "n": n}}).to_string().as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["sent"], true, "{}", r.text());
    };
    publish("ops-1", 1);
    assert_eq!(recv_json(&mut before, T)["n"], 1);

    // `systemctl reload herald`: nothing to reload here (no TLS, no public key), and nothing
    // may change for the connection that is open.
    h.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert!(h.is_running(), "SIGHUP stopped herald: {}", h.stderr());
    publish("ops-1", 2);
    assert_eq!(recv_json(&mut before, T)["n"], 2);
    let mut after = connect("ops-2");
    publish("ops-2", 3);
    assert_eq!(recv_json(&mut after, T)["n"], 3);

    // `systemctl stop herald`: closes with 1001 within the drain, exits within drain + grace.
    let stopped = Instant::now();
    h.sigterm();
    expect_close_code(&mut before, 1001, Duration::from_secs(3));
    expect_close_code(&mut after, 1001, Duration::from_secs(3));
    let grace = seconds(&value_of(&vars, "HERALD_SHUTDOWN_GRACE"));
    let exited = h.wait_exit(Duration::from_secs(1 + grace + 2));
    assert!(exited.is_some(), "herald did not exit within drain + grace: {:?}", stopped.elapsed());
    assert!(!h.stderr().contains(password), "the Redis password reached the log");
}
