//! herald on a real 6-node Redis Cluster (HERALD_REDIS_CLUSTER): sharded pub/sub with each
//! channel SSUBSCRIBEd on the master serving its slot, publishes from backends with
//! `redis-cli -c SPUBLISH`, `sent` exact, dead seeds skipped, and the two drills: a master
//! killed (its replica takes over and delivery resumes without restarting herald) and a slot
//! resharded (the server's `sunsubscribe` is followed to the new owner). Classic pub/sub too.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(5);

fn start_herald(cluster_seeds: &str, pubsub: &str) -> Herald {
    let h = herald()
        .env("HERALD_REDIS_CLUSTER", cluster_seeds)
        .env("HERALD_REDIS_CLUSTER_PUBSUB", pubsub)
        .api_key()
        .start();
    let healthy = wait_until(Duration::from_secs(10), || h.health().status == 200);
    assert!(healthy, "herald never became healthy on the cluster: {}\n{}", h.health().text(), h.stderr());
    h
}

fn channel(user: &str) -> String {
    format!("user_noti:{user}")
}

/// The next text frame as JSON, if one arrives within `timeout`.
fn try_recv_json(ws: &mut Ws, timeout: Duration) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        match ws_next(ws, deadline)? {
            Ok(tungstenite::Message::Text(text)) => return Some(serde_json::from_str(&text).expect("JSON")),
            Ok(_) => continue,
            Err(e) => panic!("websocket failed: {e}"),
        }
    }
}

/// `redis-cli -c SPUBLISH`; None when the cluster refused it (CLUSTERDOWN during a failover).
fn try_spublish(cluster: &Cluster, channel: &str, payload: &str) -> Option<i64> {
    cluster.cli(&["SPUBLISH", channel, payload]).parse().ok()
}

/// SPUBLISHes numbered messages to `user` until one arrives on `ws`; returns when.
fn spublish_until_received(cluster: &Cluster, ws: &mut Ws, user: &str, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    for n in 0.. {
        assert!(Instant::now() < deadline, "nothing published to {user} arrived within {within:?}");
        let _ = try_spublish(cluster, &channel(user), &json!({"type": "probe", "n": n}).to_string());
        if let Some(message) = try_recv_json(ws, Duration::from_millis(100)) {
            assert_eq!(message["type"], "probe", "{message}");
            return Instant::now();
        }
    }
    unreachable!()
}

/// Users named `{prefix}{i}`, `per_master` of them on each master.
fn users_on_every_master(cluster: &Cluster, prefix: &str, per_master: usize) -> Vec<(String, u16)> {
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    let mut users: Vec<(String, u16)> = Vec::new();
    for i in 0.. {
        if users.len() == masters.len() * per_master {
            break;
        }
        let user = format!("{prefix}{i}");
        let master = cluster.master_of_slot(cluster.slot_of(&channel(&user)));
        if users.iter().filter(|(_, m)| *m == master).count() < per_master {
            users.push((user, master));
        }
    }
    users
}

fn subscriptions(h: &Herald) -> Value {
    h.metrics()["redis"]["subscriptions"].clone()
}

fn publish_sent(h: &Herald, user: &str, message: Value) -> bool {
    let r = h.publish(Some(API_KEY), &json!({"user_id": user, "message": message}));
    assert_eq!(r.status, 200, "POST /publish: {}", r.text());
    r.json()["sent"].as_bool().expect("sent is a bool")
}

#[test]
fn sharded_pub_sub_reaches_users_on_every_master_through_the_live_seeds() {
    let cluster = Cluster::start();
    // The first seeds are dead: herald takes the slot map from the live ones.
    let dead = format!("redis://127.0.0.1:{},redis://127.0.0.1:{}", free_port(), free_port());
    let h = start_herald(&format!("{dead},{}", cluster.seeds()), "sharded");
    let users = users_on_every_master(&cluster, "spread", 2);
    let mut sockets = Vec::new();
    for (user, _) in &users {
        let mut ws = h.ws(&token(user));
        // The 101 came after the subscription was confirmed: a publish right away arrives.
        let payload = json!({"type": "notification", "to": user}).to_string();
        assert_eq!(cluster.spublish(&channel(user), &payload), 1, "SPUBLISH right after {user}'s 101");
        assert_eq!(recv_json(&mut ws, T)["to"], user.as_str());
        sockets.push(ws);
    }
    // Each channel is subscribed on the master serving its slot, and nowhere else (the
    // fleet's own `herald:` channels aside).
    for master in cluster.masters() {
        let mut expected: Vec<String> = users.iter().filter(|(_, m)| *m == master).map(|(u, _)| channel(u)).collect();
        expected.sort();
        let users_channels: Vec<String> =
            cluster.shard_channels(master).into_iter().filter(|c| c.starts_with("user_noti:")).collect();
        assert_eq!(users_channels, expected, "shard channels of master {master}");
    }
    assert_eq!(subscriptions(&h), json!(users.len()));
    // herald's own publishes: SPUBLISH on the owner, `sent` exact.
    for ((user, _), ws) in users.iter().zip(sockets.iter_mut()) {
        assert!(publish_sent(&h, user, json!({"type": "api", "to": user})), "sent to {user}");
        let message = recv_json(ws, T);
        assert_eq!((message["type"].as_str(), message["to"].as_str()), (Some("api"), Some(user.as_str())));
    }
    assert!(!publish_sent(&h, "nobody-holds-this-user", json!({"type": "api"})));
    for ws in sockets.iter_mut() {
        assert_no_message(ws, Duration::from_millis(100));
    }
    // The last connection of a user gone: its channel is unsubscribed on its master.
    let (gone, master) = users[0].clone();
    drop(sockets.remove(0));
    let unsubscribed = wait_until(T, || !cluster.shard_channels(master).contains(&channel(&gone)));
    assert!(unsubscribed, "{gone}'s channel is still subscribed on {master}");
    let counted = wait_until(T, || subscriptions(&h) == json!(users.len() - 1));
    assert!(counted, "redis.subscriptions = {}", subscriptions(&h));
    assert!(!publish_sent(&h, &gone, json!({"type": "api"})));
}

#[test]
fn drill_a_killed_master_is_replaced_by_its_replica_and_delivery_resumes() {
    let mut cluster = Cluster::start();
    let h = start_herald(&cluster.seeds(), "sharded");
    let users = users_on_every_master(&cluster, "drill", 1);
    let (victim, master) = users[0].clone();
    let (survivor, _) = users[1].clone();
    let mut victim_ws = h.ws(&token(&victim));
    let mut survivor_ws = h.ws(&token(&survivor));
    assert_eq!(cluster.spublish(&channel(&victim), r#"{"type":"before"}"#), 1);
    assert_eq!(recv_json(&mut victim_ws, T)["type"], "before");
    let replica = cluster.replica_of(master);

    cluster.kill(master);
    let killed = Instant::now();
    // /health says degraded while a master holding subscriptions is unreachable.
    let degraded = wait_until(T, || h.health().status == 503);
    assert!(degraded, "/health stayed healthy with {victim}'s master dead: {}", h.health().text());
    let resumed = spublish_until_received(&cluster, &mut victim_ws, &victim, Duration::from_secs(10));
    let took = resumed.duration_since(killed);
    assert!(took < Duration::from_secs(10), "delivery resumed after {took:?}");
    eprintln!("delivery to {victim} resumed {took:?} after its master was killed");

    // The promoted replica serves the slot and holds the subscription.
    assert_eq!(cluster.master_of_slot(cluster.slot_of(&channel(&victim))), replica);
    assert!(cluster.shard_channels(replica).contains(&channel(&victim)));
    let healthy = wait_until(T, || h.health().status == 200);
    assert!(healthy, "/health: {}", h.health().text());
    assert_eq!(subscriptions(&h), json!(2));
    assert!(h.metrics()["redis"]["reconnects"].as_u64().is_some());
    // Both users receive, through backends and through herald's own publishes.
    assert!(publish_sent(&h, &victim, json!({"type": "after"})));
    assert_eq!(try_recv_json(&mut victim_ws, T).expect("victim's message")["type"], "after");
    assert_eq!(cluster.spublish(&channel(&survivor), r#"{"type":"after"}"#), 1);
    assert_eq!(try_recv_json(&mut survivor_ws, T).expect("survivor's message")["type"], "after");
}

#[test]
fn drill_a_resharded_slot_is_followed_to_its_new_master() {
    let cluster = Cluster::start();
    let h = start_herald(&cluster.seeds(), "sharded");
    let (user, from) = users_on_every_master(&cluster, "moved", 1).remove(0);
    let mut ws = h.ws(&token(&user));
    assert_eq!(cluster.spublish(&channel(&user), r#"{"type":"before"}"#), 1);
    assert_eq!(recv_json(&mut ws, T)["type"], "before");
    let to = *cluster.masters().iter().find(|&&m| m != from).expect("another master");

    let slot = cluster.slot_of(&channel(&user));
    cluster.move_slot(slot, to);
    let moved = Instant::now();
    // The old master pushed `sunsubscribe`; herald subscribes on the new one.
    let resumed = spublish_until_received(&cluster, &mut ws, &user, T);
    eprintln!("delivery to {user} resumed {:?} after its slot moved", resumed.duration_since(moved));
    assert_eq!(cluster.master_of_slot(slot), to);
    assert!(cluster.shard_channels(to).contains(&channel(&user)), "subscribed on the new master");
    assert!(!cluster.shard_channels(from).contains(&channel(&user)), "not on the old one");
    assert_eq!(subscriptions(&h), json!(1));
    assert_eq!(h.health().status, 200);
    // herald's publisher follows the move as well (MOVED, then the new map).
    assert!(publish_sent(&h, &user, json!({"type": "api"})));
    assert_eq!(recv_json(&mut ws, T)["type"], "api");
    // A backend's SPUBLISH reaches exactly one subscriber: the new master's.
    assert_eq!(cluster.spublish(&channel(&user), r#"{"type":"again"}"#), 1);
    assert_eq!(recv_json(&mut ws, T)["type"], "again");
}

#[test]
fn classic_pub_sub_delivers_through_the_cluster_bus() {
    let cluster = Cluster::start();
    let h = start_herald(&cluster.seeds(), "classic");
    let mut ws = h.ws(&token("classic-user"));
    // herald subscribed on the first seed; a backend's PUBLISH on any node is relayed to it.
    let ports = cluster.live_ports();
    let elsewhere = ports[ports.len() - 1];
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &elsewhere.to_string(), "PUBLISH", "user_noti:classic-user", r#"{"type":"bus"}"#])
        .output()
        .expect("redis-cli");
    assert!(out.status.success());
    assert_eq!(recv_json(&mut ws, T)["type"], "bus");
    // herald's own PUBLISH goes where its reader is: `sent` counts it.
    assert!(publish_sent(&h, "classic-user", json!({"type": "api"})));
    assert_eq!(recv_json(&mut ws, T)["type"], "api");
    assert!(!publish_sent(&h, "nobody-holds-this-user", json!({"type": "api"})));
    assert_eq!(subscriptions(&h), json!(1));
}
