//! History and resume (SPEC §9): stream ids, `since` on connect and on subscribe, the
//! `resumed` message, no gap and no duplicate between replay and live, long replays that a
//! reading client survives, acks, the history API, and the Redis store across a restart.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(5);

fn publish(h: &Herald, body: Value) {
    let r = h.publish(Some(API_KEY), &body);
    assert_eq!(r.status, 200, "{}", r.text());
}

fn note(user: &str, n: u64) -> Value {
    json!({"user_id": user, "message": {"type": "n", "n": n}})
}

fn embedded(size: usize) -> Herald {
    herald().api_key().env("HERALD_HISTORY_SIZE", &size.to_string()).start()
}

#[test]
fn a_client_that_comes_back_gets_what_it_missed_then_live() {
    let h = embedded(100);
    let mut ws = h.ws(&token("u"));
    publish(&h, note("u", 1));
    publish(&h, note("u", 2));
    let first = recv_json(&mut ws, T);
    let second = recv_json(&mut ws, T);
    assert_eq!((first["n"].as_u64(), second["n"].as_u64()), (Some(1), Some(2)));
    let (a, b) = (first["stream_id"].as_str().unwrap(), second["stream_id"].as_str().unwrap());
    let (epoch, offset) = b.split_once(':').expect("epoch:offset");
    assert_eq!(a, format!("{epoch}:{}", offset.parse::<u64>().unwrap() - 1), "offsets grow by one");
    assert!(first["timestamp"].is_string());
    drop(ws);
    for n in 3..=5 {
        publish(&h, note("u", n));
    }
    let mut ws = connect_since(&h, "u", b);
    let (ns, resumed) = replayed(&mut ws);
    assert_eq!(ns, vec![3, 4, 5]);
    assert_eq!(resumed, json!({"type": "resumed", "replayed": 3, "complete": true}));
    publish(&h, note("u", 6));
    assert_eq!(recv_json(&mut ws, T)["n"], 6);
    // From the beginning, and from the newest (nothing missed).
    let (ns, resumed) = replayed(&mut connect_since(&h, "u", "0"));
    assert_eq!((ns, resumed["complete"].clone()), ((1..=6).collect::<Vec<_>>(), json!(true)));
    let last = recv_json(&mut connect_since(&h, "u", b), T);
    assert_eq!(last["type"], "n", "still the replay of 3..6");
    let m = h.metrics();
    assert!(m["history"]["resumes"].as_u64() >= Some(2), "{m}");
}

#[test]
fn a_foreign_or_lost_position_replays_what_is_kept_and_says_incomplete() {
    let h = embedded(3);
    for n in 1..=5 {
        publish(&h, note("u", n));
    }
    for since in ["garbage", "zzzzzzzz:1", "aaaaaaaa:999999", "%00"] {
        let (ns, resumed) = replayed(&mut connect_since(&h, "u", since));
        assert_eq!(ns, vec![3, 4, 5], "since={since}");
        assert_eq!(resumed["complete"], false, "since={since}");
    }
    // A position whose successors were dropped (the store keeps 3).
    let mut ws = h.ws(&token("u"));
    publish(&h, note("u", 6));
    let six = recv_json(&mut ws, T)["stream_id"].as_str().unwrap().to_string();
    let (epoch, _) = six.split_once(':').unwrap();
    let (ns, resumed) = replayed(&mut connect_since(&h, "u", &format!("{epoch}:1")));
    assert_eq!((ns, resumed["complete"].clone()), (vec![4, 5, 6], json!(false)));
    assert!(h.metrics()["history"]["incomplete_resumes"].as_u64() >= Some(5));
}

#[test]
fn nothing_is_lost_or_repeated_between_replay_and_live() {
    let h = embedded(2000);
    let mut ws = h.ws(&token("u"));
    publish(&h, note("u", 0));
    let start = recv_json(&mut ws, T)["stream_id"].as_str().unwrap().to_string();
    drop(ws);
    // A backlog long enough to take many pages…
    let backlog: Vec<Value> = (1..=600).map(|n| note("u", n)).collect();
    let r = h.publish_batch(&backlog);
    assert_eq!(r.status, 200, "{}", r.text());
    // …and a publisher that keeps going while the client reconnects and replays.
    let port = h.port;
    let publisher = std::thread::spawn(move || {
        for n in 601..=1000 {
            let body = note("u", n).to_string();
            let r = http(port, "POST", "/publish", &[("Authorization", &format!("Bearer {API_KEY}"))], body.as_bytes());
            assert_eq!(r.status, 200);
        }
    });
    std::thread::sleep(Duration::from_millis(20));
    let mut ws = connect_since(&h, "u", &start);
    // Slow to read at first: the replay stalls on the send queue while live ones pile up.
    std::thread::sleep(Duration::from_millis(100));
    let (mut ns, resumed) = replayed(&mut ws);
    assert_eq!(resumed["complete"], true);
    publisher.join().expect("publisher");
    while ns.last() != Some(&1000) {
        let m = recv_json(&mut ws, T);
        ns.push(m["n"].as_u64().unwrap_or_else(|| panic!("{m}")));
    }
    assert_eq!(ns, (1..=1000).collect::<Vec<_>>(), "every notification once, in order");
}

#[test]
fn a_reading_client_replays_a_whole_stream_without_being_cut() {
    let h = herald().api_key().env("HERALD_HISTORY_SIZE", "3000").env("HERALD_SEND_QUEUE", "64").start();
    let items: Vec<Value> = (1..=1000).map(|n| json!({"user_id": "big", "message": {"type": "n", "n": n}})).collect();
    for chunk in 0..3 {
        let batch: Vec<Value> = items
            .iter()
            .map(|i| {
                let mut i = i.clone();
                i["message"]["n"] = json!(i["message"]["n"].as_u64().unwrap() + chunk * 1000);
                i
            })
            .collect();
        let r = h.publish_batch(&batch);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let (ns, resumed) = replayed(&mut connect_since(&h, "big", "0"));
    assert_eq!(ns, (1..=3000).collect::<Vec<_>>());
    assert_eq!(resumed, json!({"type": "resumed", "replayed": 3000, "complete": true}));
    assert_eq!(h.metrics()["messages"]["slow_consumers"], 0);
}

#[test]
fn topics_resume_on_their_path_and_on_subscribe() {
    let h = embedded(10);
    let tok = token_claims(json!({"sub": "t", "topics": ["room:*"], "exp": now_secs() + 3600}));
    for n in 1..=3 {
        publish(&h, json!({"topic": "room:1", "message": {"type": "n", "n": n}}));
    }
    let mut ws = match ws_try_connect(h.port, &format!("/ws?token={tok}"), &[]) {
        Upgrade::Ok(ws) => *ws,
        Upgrade::Rejected { status, body } => panic!("{status} {body}"),
    };
    ws.send(tungstenite::Message::text(json!({"type": "subscribe", "topic": "room:1", "since": "0"}).to_string()))
        .expect("send");
    assert_eq!(recv_json(&mut ws, T), json!({"type": "subscribed", "topic": "room:1"}));
    let (ns, resumed) = replayed(&mut ws);
    assert_eq!((ns, resumed["complete"].clone()), (vec![1, 2, 3], json!(true)));
    publish(&h, json!({"topic": "room:1", "message": {"type": "n", "n": 4}}));
    assert_eq!(recv_json(&mut ws, T)["n"], 4);
}

#[test]
fn without_history_nothing_changes() {
    let h = herald().api_key().start();
    let mut ws = connect_since(&h, "u", "0");
    publish(&h, note("u", 1));
    let m = recv_json(&mut ws, T);
    assert_eq!(m["n"], 1);
    assert!(m.get("stream_id").is_none(), "{m}");
    let r = h.http("GET", "/api/history/u", &[("Authorization", &format!("Bearer {API_KEY}"))], b"");
    assert_eq!(r.status, 404, "{}", r.text());
}

#[test]
fn acks_move_the_read_marker_and_the_history_api_shows_it() {
    let h = embedded(100);
    let mut ws = h.ws(&token("reader"));
    for n in 1..=3 {
        publish(&h, note("reader", n));
    }
    let ids: Vec<String> = (0..3).map(|_| recv_json(&mut ws, T)["stream_id"].as_str().unwrap().to_string()).collect();
    let auth = format!("Bearer {API_KEY}");
    let get = |query: &str| {
        let r = h.http("GET", &format!("/api/history/reader{query}"), &[("Authorization", &auth)], b"");
        assert_eq!(r.status, 200, "{query}: {}", r.text());
        r.json()
    };
    let all = get("");
    assert_eq!(all["acked"], Value::Null);
    assert_eq!(all["complete"], true);
    let items = all["items"].as_array().unwrap();
    assert_eq!(items.iter().map(|i| i["n"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(items[0]["stream_id"], ids[0].as_str());
    let send = |ws: &mut Ws, v: Value| ws.send(tungstenite::Message::text(v.to_string())).expect("send");
    send(&mut ws, json!({"action": "ack", "stream_id": ids[1]}));
    send(&mut ws, json!({"action": "ack", "stream_id": ids[0]}));
    send(&mut ws, json!({"action": "ack", "stream_id": "nonsense"}));
    let ok = wait_until(T, || get("")["acked"] == ids[1].as_str());
    assert!(ok, "the marker moved to the second: {}", get(""));
    let ok = wait_until(T, || h.metrics()["history"]["acks_ignored"] == 2);
    assert!(ok, "{}", h.metrics()["history"]);
    let after = get(&format!("?since={}&limit=1", ids[0]));
    assert_eq!(after["items"].as_array().map(|i| i.len()), Some(1));
    assert_eq!(after["items"][0]["n"], 2);
    for bad in ["?limit=1001", "?limit=0", "?limit=x"] {
        let r = h.http("GET", &format!("/api/history/reader{bad}"), &[("Authorization", &auth)], b"");
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    let own = format!("Bearer {}", token("reader"));
    assert_eq!(h.http("GET", "/api/history/reader", &[("Authorization", &own)], b"").status, 200);
    assert_eq!(h.http("GET", "/api/history/other", &[("Authorization", &own)], b"").status, 403);
}

#[test]
fn history_settings_are_checked_at_start() {
    let out = run_herald(&[], &[("HERALD_JWT_SECRET", SECRET), ("HERALD_HISTORY_SIZE", "100001")], T);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("HERALD_HISTORY_SIZE"), "{}", out.stderr);
}

#[test]
fn the_redis_store_survives_a_herald_restart_and_takes_backend_publishes() {
    let redis = Redis::start();
    let start = || herald().api_key().redis(&redis).env("HERALD_HISTORY_SIZE", "100").start();
    let h = start();
    redis.wait_subscribers(1, Duration::from_secs(10));
    let mut ws = h.ws(&token("r"));
    publish(&h, note("r", 1));
    let first = recv_json(&mut ws, T);
    assert_eq!(first["n"], 1);
    let since = first["stream_id"].as_str().expect("stream_id with Redis history").to_string();
    drop((ws, h));
    // While herald is down, a backend stores through herald's function.
    for n in 2..=3 {
        let reply = redis.conn().command(&[
            "FCALL",
            "herald_publish",
            "1",
            "user_noti:r",
            &json!({"type": "n", "n": n}).to_string(),
        ]);
        assert!(matches!(reply, Resp::Array(Some(_))), "{reply:?}");
    }
    let h = start();
    redis.wait_subscribers(1, Duration::from_secs(10));
    let mut ws = connect_since(&h, "r", &since);
    let (ns, resumed) = replayed(&mut ws);
    assert_eq!((ns, resumed["complete"].clone()), (vec![2, 3], json!(true)));
    // Live, from a backend, carries its position too.
    let reply = redis.conn().command(&["FCALL", "herald_publish", "1", "user_noti:r", r#"{"type":"n","n":4}"#]);
    assert!(matches!(reply, Resp::Array(Some(_))), "{reply:?}");
    let live = recv_json(&mut ws, T);
    assert_eq!(live["n"], 4);
    assert!(live["stream_id"].as_str().is_some_and(|s| s.ends_with(":4")), "{live}");
    let auth = format!("Bearer {API_KEY}");
    let r = h.http("GET", "/api/history/r?limit=2", &[("Authorization", &auth)], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let items = r.json()["items"].clone();
    assert_eq!(
        items.as_array().map(|i| i.iter().map(|i| i["n"].as_u64().unwrap()).collect::<Vec<_>>()),
        Some(vec![1, 2])
    );
    // The same bytes live and replayed.
    assert_eq!(items[0], first);
}

/// A Redis that refuses herald's functions (an older Redis has no FUNCTION command; here an
/// ACL user denied it answers the same way): history cannot be kept, so herald says why in
/// one line and exits 2 instead of running without the resume its clients were promised.
#[test]
fn history_on_a_redis_that_refuses_functions_stops_herald_with_one_line() {
    let rules = [
        "on",
        ">nofn-pw-7",
        "resetchannels",
        "&user_noti:*",
        "&topic_noti:*",
        "&herald:*",
        "resetkeys",
        "~herald:*",
        "+@all",
        "-@dangerous",
        "-function",
    ];
    let mut args = vec!["--user", "nofn"];
    args.extend_from_slice(&rules);
    let redis = Redis::builder().args(&args).start();
    let url = format!("redis://nofn:nofn-pw-7@127.0.0.1:{}", redis.port);
    let out = run_herald(
        &[],
        &[("HERALD_JWT_SECRET", SECRET), ("HERALD_REDIS_URL", &url), ("HERALD_HISTORY_SIZE", "100")],
        Duration::from_secs(15),
    );
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().filter(|l| l.contains("functions")).collect();
    assert_eq!(lines.len(), 1, "one line says why: {}", out.stderr);
    assert!(lines[0].contains("HERALD_HISTORY_SIZE") && lines[0].contains("Redis 7"), "{}", lines[0]);
    assert!(!out.stderr.contains("nofn-pw-7"), "the password is never logged: {}", out.stderr);
}
