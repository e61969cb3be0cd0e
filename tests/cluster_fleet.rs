//! The fleet on a real 6-node Redis Cluster (sharded pub/sub), two herald instances: presence
//! and `/api/disconnect` fleet-wide for users whose keys live on different masters, history
//! stored, read, replayed and acked on every master, and all of it again after a master is
//! killed and its replica takes over. No log storm of redirects on the way.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(5);
/// SPEC §8: presence is correct within 1 s after a connect or a clean close.
const PRESENCE_LAG: Duration = Duration::from_secs(1);
/// Lines of a herald's log that may mention a redirect (a MOVED followed is not logged).
const MOVED_LINES_ALLOWED: usize = 3;

fn start_herald(cluster: &Cluster, history: bool, pubsub: &str) -> Herald {
    let mut builder =
        herald().env("HERALD_REDIS_CLUSTER", &cluster.seeds()).env("HERALD_REDIS_CLUSTER_PUBSUB", pubsub).api_key();
    if history {
        builder = builder.env("HERALD_HISTORY_SIZE", "100");
    }
    let h = builder.start();
    let healthy = wait_until(Duration::from_secs(10), || h.health().status == 200);
    assert!(healthy, "herald never became healthy on the cluster: {}\n{}", h.health().text(), h.stderr());
    h
}

/// Two instances, both subscribed to the fleet's control channel (on its slot's master).
fn fleet(cluster: &Cluster, history: bool) -> Vec<Herald> {
    let hs: Vec<Herald> = (0..2).map(|_| start_herald(cluster, history, "sharded")).collect();
    let control = cluster.master_of_slot(cluster.slot_of("herald:control"));
    let subscribed = wait_until(Duration::from_secs(10), || shard_subscribers(control, "herald:control") == 2);
    assert!(subscribed, "both instances SSUBSCRIBE herald:control on {control}");
    hs
}

fn shard_subscribers(port: u16, channel: &str) -> i64 {
    match RedisConn::connect(port).command(&["PUBSUB", "SHARDNUMSUB", channel]) {
        Resp::Array(Some(items)) => match items.get(1) {
            Some(Resp::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    }
}

/// herald's library as node `port` has it (`FUNCTION LIST WITHCODE`), empty without it.
fn library_on(port: u16) -> String {
    fn flatten(reply: &Resp, out: &mut String) {
        match reply {
            Resp::Bulk(Some(b)) => out.push_str(&String::from_utf8_lossy(b)),
            Resp::Simple(s) => out.push_str(s),
            Resp::Array(Some(items)) => items.iter().for_each(|i| flatten(i, out)),
            _ => {}
        }
    }
    let mut text = String::new();
    flatten(&RedisConn::connect(port).command(&["FUNCTION", "LIST", "LIBRARYNAME", "herald", "WITHCODE"]), &mut text);
    text
}

fn assert_library_on_every_master(cluster: &Cluster) {
    for master in cluster.masters() {
        let library = library_on(master);
        assert!(library.contains("herald_publish"), "herald's functions on master {master}: {library:?}");
        assert!(library.contains("local PUBLISH = 'SPUBLISH'"), "sharded: herald_publish SPUBLISHes on {master}");
    }
}

fn channel(user: &str) -> String {
    format!("user_noti:{user}")
}

/// One user per master: `(user, port of the master serving its channel's slot)`.
fn users_on_every_master(cluster: &Cluster, prefix: &str) -> Vec<(String, u16)> {
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    let mut users: Vec<(String, u16)> = Vec::new();
    for i in 0.. {
        if users.len() == masters.len() {
            break;
        }
        let user = format!("{prefix}{i}");
        let master = cluster.master_of_slot(cluster.slot_of(&channel(&user)));
        if !users.iter().any(|(_, m)| *m == master) {
            users.push((user, master));
        }
    }
    users
}

/// The masters serving `keys`, deduplicated.
fn masters_of(cluster: &Cluster, keys: &[String]) -> Vec<u16> {
    let mut masters: Vec<u16> = keys.iter().map(|k| cluster.master_of_slot(cluster.slot_of(k))).collect();
    masters.sort();
    masters.dedup();
    masters
}

fn auth() -> String {
    format!("Bearer {API_KEY}")
}

/// Lines of `h`'s log that mention a MOVED redirect.
fn moved_lines(h: &Herald) -> usize {
    h.stderr().lines().filter(|l| l.contains("MOVED") || l.contains("Moved")).count()
}

fn assert_quiet_log(hs: &[Herald]) {
    for h in hs {
        let moved = moved_lines(h);
        assert!(moved <= MOVED_LINES_ALLOWED, "{moved} log lines about MOVED:\n{}", h.stderr());
        let refused = h.stderr().lines().filter(|l| l.contains("refused by redis")).count();
        assert!(refused <= MOVED_LINES_ALLOWED, "{refused} refusals logged:\n{}", h.stderr());
    }
}

#[test]
fn presence_and_disconnect_are_fleet_wide_for_users_on_every_master() {
    let cluster = Cluster::start();
    let hs = fleet(&cluster, false);
    let users = users_on_every_master(&cluster, "present");
    let presence_keys: Vec<String> = users.iter().map(|(u, _)| format!("herald:presence:{{{}}}", channel(u))).collect();
    let spread = masters_of(&cluster, &presence_keys);
    assert!(spread.len() >= 2, "presence keys on {spread:?}: the test needs several masters");
    // Presence events are published by herald's function on the user's master; the cluster
    // bus relays them to a subscriber on any node.
    let listener_port = cluster.live_ports()[cluster.live_ports().len() - 1];
    let mut events = RedisSub::subscribe(listener_port, "herald:presence");

    // Each user: one connection on the first instance, two on the second.
    let mut sockets = Vec::new();
    for (user, _) in &users {
        sockets.push(hs[0].ws(&token(user)));
        sockets.push(hs[1].ws(&token(user)));
        sockets.push(hs[1].ws(&token(user)));
    }
    for (user, _) in &users {
        wait_presence(&hs[0], user, 3, PRESENCE_LAG);
        wait_presence(&hs[1], user, 3, PRESENCE_LAG);
    }
    let mut online = Vec::new();
    while let Some(raw) = events.next(Duration::from_millis(500)) {
        let event: Value = serde_json::from_str(&raw).expect("JSON event");
        assert_eq!(event["status"], "online", "{event}");
        online.push(event["user_id"].as_str().unwrap_or_default().to_string());
    }
    online.sort();
    let mut expected: Vec<String> = users.iter().map(|(u, _)| u.clone()).collect();
    expected.sort();
    assert_eq!(online, expected, "one online event per user, from every master");

    // Bulk, across masters, with an unknown user.
    let ids: Vec<&str> = users.iter().map(|(u, _)| u.as_str()).chain(["nobody-here"]).collect();
    let body = json!({"user_ids": ids}).to_string();
    let r = hs[0].http("POST", "/api/presence", &[("Authorization", &auth())], body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    for (user, _) in &users {
        assert_eq!(r.json()["presence"][user], json!({"online": true, "connections": 3}), "{}", r.text());
    }
    assert_eq!(r.json()["presence"]["nobody-here"], json!({"online": false, "connections": 0}));

    // A clean close of the first user's connection on the first instance.
    drop(sockets.remove(0));
    wait_presence(&hs[1], &users[0].0, 2, PRESENCE_LAG);

    // Fleet-wide disconnect, asked on each instance for a user on another master: both
    // instances close, and `closed` sums them.
    for (i, (user, _)) in users.iter().enumerate().skip(1) {
        let r = hs[i % 2].http(
            "POST",
            "/api/disconnect",
            &[("Authorization", &auth())],
            json!({"user_id": user}).to_string().as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), json!({"status": "success", "closed": 3}), "disconnect {user}");
        wait_presence(&hs[(i + 1) % 2], user, 0, PRESENCE_LAG);
    }
    // Their sockets saw a close frame, on both instances.
    for ws in sockets.iter_mut().skip(2) {
        assert!(matches!(wait_close(ws, T), Closed::Frame(Some(_), _)));
    }
    // The first user still has its two connections on the second instance; closing them
    // makes it offline fleet-wide.
    sockets.truncate(2);
    drop(sockets);
    wait_presence(&hs[0], &users[0].0, 0, PRESENCE_LAG);
    let mut offline = 0;
    while let Some(raw) = events.next(Duration::from_millis(500)) {
        let event: Value = serde_json::from_str(&raw).expect("JSON event");
        if event["status"] == "offline" {
            offline += 1;
        }
    }
    assert_eq!(offline, users.len(), "one offline event per user");
    assert_quiet_log(&hs);
}

fn note(user: &str, n: u64) -> Value {
    json!({"user_id": user, "message": {"type": "n", "n": n}})
}

fn try_publish(h: &Herald, body: &Value) -> bool {
    h.publish(Some(API_KEY), body).status == 200
}

fn publish(h: &Herald, body: &Value) {
    let r = h.publish(Some(API_KEY), body);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), h.stderr());
}

fn history_of(h: &Herald, user: &str, query: &str) -> Value {
    let r = h.http("GET", &format!("/api/history/{user}{query}"), &[("Authorization", &auth())], b"");
    assert_eq!(r.status, 200, "GET /api/history/{user}{query}: {}\n{}", r.text(), h.stderr());
    r.json()
}

fn ns_of(history: &Value) -> Vec<u64> {
    history["items"].as_array().map(|i| i.iter().filter_map(|i| i["n"].as_u64()).collect()).unwrap_or_default()
}

#[test]
fn history_is_stored_replayed_and_acked_on_every_master_and_survives_a_failover() {
    let mut cluster = Cluster::start();
    let hs = fleet(&cluster, true);
    let users = users_on_every_master(&cluster, "stored");
    let stream_keys: Vec<String> = users.iter().map(|(u, _)| format!("herald:{{{}}}:h", channel(u))).collect();
    let spread = masters_of(&cluster, &stream_keys);
    assert!(spread.len() >= 2, "streams on {spread:?}: the test needs several masters");
    assert_library_on_every_master(&cluster);

    let mut ids = Vec::new();
    for (user, _) in &users {
        // Live on the second instance, published through the first.
        let mut ws = hs[1].ws(&token(user));
        for n in 1..=2 {
            publish(&hs[0], &note(user, n));
        }
        let first = recv_json(&mut ws, T);
        let second = recv_json(&mut ws, T);
        assert_eq!((first["n"].as_u64(), second["n"].as_u64()), (Some(1), Some(2)), "{user}");
        let since = first["stream_id"].as_str().expect("a stream_id with history on").to_string();
        drop(ws);
        // Missed while away, then replayed after `since`, on the other instance.
        for n in 3..=4 {
            publish(&hs[1], &note(user, n));
        }
        let (ns, resumed) = replayed(&mut connect_since(&hs[0], user, &since));
        assert_eq!(ns, vec![2, 3, 4], "{user}");
        assert_eq!(resumed["complete"], true, "{user}: {resumed}");
        assert_eq!(ns_of(&history_of(&hs[1], user, "")), vec![1, 2, 3, 4], "{user}");
        ids.push((since, second["stream_id"].as_str().expect("stream_id").to_string()));
    }
    // Acks move each user's marker, on whichever master holds it.
    for ((user, _), (_, second)) in users.iter().zip(&ids) {
        let mut ws = hs[0].ws(&token(user));
        ws.send(tungstenite::Message::text(json!({"action": "ack", "stream_id": second}).to_string()))
            .expect("send the ack");
        let moved = wait_until(T, || history_of(&hs[1], user, "")["acked"] == second.as_str());
        assert!(moved, "{user}'s marker: {}", history_of(&hs[1], user, ""));
    }
    let acked: u64 = hs.iter().map(|h| h.metrics()["history"]["acks"].as_u64().unwrap_or(0)).sum();
    assert_eq!(acked, users.len() as u64);
    assert_quiet_log(&hs);

    // A master dies; its replica takes over. Storing, reading and replaying resume on it.
    let (victim, master) = users[0].clone();
    let replica = cluster.replica_of(master);
    cluster.kill(master);
    let killed = Instant::now();
    let within = Duration::from_secs(10);
    let stored = wait_until(within, || try_publish(&hs[0], &note(&victim, 5)));
    assert!(stored, "no publish to {victim} stored within {within:?} of the failover\n{}", hs[0].stderr());
    let mut last = Value::Null;
    let readable = wait_until(within.saturating_sub(killed.elapsed()).max(T), || {
        let r = hs[1].http("GET", &format!("/api/history/{victim}"), &[("Authorization", &auth())], b"");
        last = if r.status == 200 { r.json() } else { json!({"status": r.status}) };
        ns_of(&last).last() == Some(&5)
    });
    assert!(readable, "{victim}'s history after the failover: {last}\n{}", hs[1].stderr());
    eprintln!("history of {victim} served {:?} after its master was killed", killed.elapsed());
    assert_eq!(cluster.master_of_slot(cluster.slot_of(&channel(&victim))), replica);
    assert_library_on_every_master(&cluster);
    // The promoted replica has what was stored before (replicated), and resumes from it.
    let (ns, resumed) = replayed(&mut connect_since(&hs[0], &victim, &ids[0].0));
    assert_eq!(ns.last(), Some(&5), "{ns:?}");
    assert!(ns.starts_with(&[2, 3, 4]), "{ns:?}");
    assert_eq!(resumed["complete"], true, "{resumed}");
    // Live and stored together again, through both instances.
    let mut ws = hs[1].ws(&token(&victim));
    publish(&hs[0], &note(&victim, 6));
    let live = recv_json(&mut ws, T);
    assert_eq!(live["n"], 6);
    assert!(live["stream_id"].is_string(), "{live}");
    // Presence on the promoted master works too.
    wait_presence(&hs[0], &victim, 1, Duration::from_secs(10));
    // The failover is logged, not a loop of refusals.
    assert_quiet_log(&hs);
    for h in &hs {
        let warnings = h.stderr().lines().filter(|l| l.contains("WARN")).count();
        eprintln!("{warnings} warnings logged through the failover");
        assert!(warnings < 30, "{warnings} warnings:\n{}", h.stderr());
    }
}

#[test]
fn a_slot_moved_behind_heralds_back_is_followed_by_presence_and_history() {
    let cluster = Cluster::start();
    let hs = fleet(&cluster, true);
    let (user, from) = users_on_every_master(&cluster, "mover").remove(0);
    let to = *cluster.masters().iter().find(|&&m| m != from).expect("another master");
    // Nothing of the user is stored yet: the slot moves empty, and herald's slot maps are
    // stale until a MOVED (or the 30 s refresh) tells them.
    let slot = cluster.slot_of(&channel(&user));
    cluster.move_slot(slot, to);
    let mut ws = hs[1].ws(&token(&user));
    publish(&hs[0], &note(&user, 1));
    let live = recv_json(&mut ws, T);
    assert_eq!(live["n"], 1);
    let since = live["stream_id"].as_str().expect("stored").to_string();
    wait_presence(&hs[0], &user, 1, PRESENCE_LAG);
    publish(&hs[1], &note(&user, 2));
    assert_eq!(recv_json(&mut ws, T)["n"], 2);
    assert_eq!(ns_of(&history_of(&hs[0], &user, "")), vec![1, 2]);
    let (ns, resumed) = replayed(&mut connect_since(&hs[0], &user, &since));
    assert_eq!((ns, resumed["complete"].clone()), (vec![2], json!(true)));
    // Stream and presence hash are on the slot's new master.
    let keys = match RedisConn::connect(to).command(&["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()]) {
        Resp::Int(n) => n,
        other => panic!("CLUSTER COUNTKEYSINSLOT: {other:?}"),
    };
    assert_eq!(keys, 3, "history list, its hash and the presence hash on {to}");
    // The control channel's slot moves too: both instances subscribe again on its new
    // master (the old one pushed `sunsubscribe`), and a fleet-wide disconnect counts both.
    let control_slot = cluster.slot_of("herald:control");
    let control_from = cluster.master_of_slot(control_slot);
    let control_to = *cluster.masters().iter().find(|&&m| m != control_from).expect("another master");
    cluster.move_slot(control_slot, control_to);
    let followed = wait_until(T, || shard_subscribers(control_to, "herald:control") == 2);
    assert!(followed, "herald:control subscribed on {control_to}: {}", shard_subscribers(control_to, "herald:control"));
    assert_eq!(shard_subscribers(control_from, "herald:control"), 0);
    let mut other = hs[0].ws(&token(&user));
    let body = json!({"user_id": user}).to_string();
    let r = hs[0].http("POST", "/api/disconnect", &[("Authorization", &auth())], body.as_bytes());
    assert_eq!(r.json(), json!({"status": "success", "closed": 2}), "{}", hs[0].stderr());
    for ws in [&mut ws, &mut other] {
        assert!(matches!(wait_close(ws, T), Closed::Frame(Some(_), _)));
    }
    wait_presence(&hs[1], &user, 0, PRESENCE_LAG);
    assert_quiet_log(&hs);
}

#[test]
fn history_in_classic_cluster_mode_is_refused_at_start() {
    let seeds = format!("redis://127.0.0.1:{}", free_port());
    let out = run_herald(
        &[],
        &[
            ("HERALD_JWT_SECRET", SECRET),
            ("HERALD_REDIS_CLUSTER", &seeds),
            ("HERALD_REDIS_CLUSTER_PUBSUB", "classic"),
            ("HERALD_HISTORY_SIZE", "100"),
        ],
        T,
    );
    assert_ne!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stderr.contains("HERALD_REDIS_CLUSTER_PUBSUB=sharded"), "{}", out.stderr);
}

#[test]
fn classic_mode_has_presence_and_disconnect_fleet_wide_too() {
    let cluster = Cluster::start();
    let hs: Vec<Herald> = (0..2).map(|_| start_herald(&cluster, false, "classic")).collect();
    // Both SUBSCRIBE the control channel on its slot's master, where requests are PUBLISHed.
    let control = cluster.master_of_slot(cluster.slot_of("herald:control"));
    let subscribed = wait_until(Duration::from_secs(10), || {
        matches!(
            RedisConn::connect(control).command(&["PUBSUB", "NUMSUB", "herald:control"]),
            Resp::Array(Some(items)) if items.get(1) == Some(&Resp::Int(2))
        )
    });
    assert!(subscribed, "both instances SUBSCRIBE herald:control on {control}");
    let users = users_on_every_master(&cluster, "classic");
    let mut sockets = Vec::new();
    for (user, _) in &users {
        sockets.push(hs[0].ws(&token(user)));
        sockets.push(hs[1].ws(&token(user)));
    }
    for (user, _) in &users {
        wait_presence(&hs[1], user, 2, PRESENCE_LAG);
    }
    for (user, _) in &users {
        let body = json!({"user_id": user}).to_string();
        let r = hs[0].http("POST", "/api/disconnect", &[("Authorization", &auth())], body.as_bytes());
        assert_eq!(r.json(), json!({"status": "success", "closed": 2}), "disconnect {user}");
        wait_presence(&hs[1], user, 0, PRESENCE_LAG);
    }
    for ws in sockets.iter_mut() {
        assert!(matches!(wait_close(ws, T), Closed::Frame(Some(_), _)));
    }
    assert_quiet_log(&hs);
}
