//! A real Redis Cluster for tests: six `redis-server --cluster-enabled yes` processes on free
//! ports (three masters, three replicas), joined with `redis-cli --cluster create`, with
//! `cluster-node-timeout` 2000 ms so a killed master's replica takes over in about 4 s.
//! Every node is killed and its directory removed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::{RedisConn, Resp, free_port, redis_ping, wait_until};

const NODES: usize = 6;
/// How long the nodes take to call a silent master failed (and promote its replica).
pub const NODE_TIMEOUT_MS: u32 = 2000;

struct Node {
    port: u16,
    child: Option<Child>,
}

pub struct Cluster {
    nodes: Vec<Node>,
    dir: PathBuf,
}

/// One line of CLUSTER NODES.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: String,
    pub port: u16,
    pub master: bool,
    pub failed: bool,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
    pub slots: Vec<(u16, u16)>,
}

fn text(reply: Resp) -> String {
    match reply {
        Resp::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
        Resp::Simple(s) => s,
        other => panic!("expected text from redis, got {other:?}"),
    }
}

impl Cluster {
    /// Starts six nodes and makes them a cluster; returns once every node sees it `ok` and
    /// every replica's link to its master is up.
    pub fn start() -> Cluster {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "herald-cluster-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the cluster's directory");
        let mut cluster = Cluster { nodes: Vec::new(), dir };
        for _ in 0..NODES {
            let node = cluster.spawn_node();
            cluster.nodes.push(node);
        }
        let addrs: Vec<String> = cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(out.status.success(), "redis-cli --cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        cluster.wait_settled(Duration::from_secs(20));
        cluster
    }

    /// Starts one node on free ports (client and bus), retrying if a port was taken meanwhile.
    fn spawn_node(&self) -> Node {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (port, bus) = (free_port(), free_port());
            if port == bus {
                continue;
            }
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--cluster-port", &bus.to_string()])
                .args(["--cluster-enabled", "yes", "--cluster-config-file", &format!("nodes-{port}.conf")])
                .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"])
                .args(["--loglevel", "warning", "--dir"])
                .arg(&self.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server (is it installed?)");
            let up = wait_until(Duration::from_secs(5), || matches!(child.try_wait(), Ok(Some(_))) || redis_ping(port));
            if up && matches!(child.try_wait(), Ok(None)) {
                return Node { port, child: Some(child) };
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(Instant::now() < deadline, "a cluster node did not start");
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every live node says `cluster_state:ok` with every slot served and sees
    /// three masters with a replica each, and every replica's link is up.
    pub fn wait_settled(&self, timeout: Duration) {
        let mut last = String::new();
        let ok = wait_until(timeout, || {
            for port in self.live_ports() {
                let info = text(RedisConn::connect(port).command(&["CLUSTER", "INFO"]));
                if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") {
                    last = format!("node {port}: {}", info.lines().next().unwrap_or_default());
                    return false;
                }
                let nodes = self.nodes_seen_by(port);
                let live_masters = nodes.iter().filter(|n| n.master && !n.failed && !n.slots.is_empty()).count();
                if live_masters != 3 {
                    last = format!("node {port} sees {live_masters} serving masters");
                    return false;
                }
                let replication = text(RedisConn::connect(port).command(&["INFO", "replication"]));
                if replication.contains("role:slave") && !replication.contains("master_link_status:up") {
                    last = format!("replica {port}: link to its master not up");
                    return false;
                }
            }
            true
        });
        assert!(ok, "the cluster did not settle within {timeout:?}: {last}");
    }

    /// Ports of the nodes still running.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.port).collect()
    }

    /// `redis://127.0.0.1:<port>` of every node, comma separated (HERALD_REDIS_CLUSTER).
    pub fn seeds(&self) -> String {
        self.nodes.iter().map(|n| format!("redis://127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    /// CLUSTER NODES as node `port` sees it.
    pub fn nodes_seen_by(&self, port: u16) -> Vec<NodeInfo> {
        let listing = text(RedisConn::connect(port).command(&["CLUSTER", "NODES"]));
        listing
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                let addr = fields[1].split('@').next().unwrap_or_default();
                let node_port = addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a node's port");
                let flags = fields[2];
                let slots = fields[8..]
                    .iter()
                    .filter(|r| !r.starts_with('['))
                    .map(|r| match r.split_once('-') {
                        Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                        None => (r.parse().unwrap(), r.parse().unwrap()),
                    })
                    .collect();
                NodeInfo {
                    id: fields[0].to_string(),
                    port: node_port,
                    master: flags.contains("master"),
                    failed: flags.contains("fail"),
                    master_id: Some(fields[3]).filter(|m| *m != "-").map(str::to_string),
                    slots,
                }
            })
            .collect()
    }

    fn any_live_port(&self) -> u16 {
        *self.live_ports().first().expect("a live node")
    }

    /// The slot of a key or channel, as Redis computes it.
    pub fn slot_of(&self, name: &str) -> u16 {
        match RedisConn::connect(self.any_live_port()).command(&["CLUSTER", "KEYSLOT", name]) {
            Resp::Int(n) => n as u16,
            other => panic!("CLUSTER KEYSLOT: {other:?}"),
        }
    }

    /// The port of the master serving `slot`, as a live node sees it.
    pub fn master_of_slot(&self, slot: u16) -> u16 {
        self.nodes_seen_by(self.any_live_port())
            .into_iter()
            .find(|n| n.master && !n.failed && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// The ports of the masters serving slots.
    pub fn masters(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .nodes_seen_by(self.any_live_port())
            .into_iter()
            .filter(|n| n.master && !n.failed && !n.slots.is_empty())
            .map(|n| n.port)
            .collect();
        ports.sort();
        ports
    }

    /// The port of a replica of master `port`.
    pub fn replica_of(&self, port: u16) -> u16 {
        let nodes = self.nodes_seen_by(self.any_live_port());
        let id = &nodes.iter().find(|n| n.port == port).expect("the master").id;
        nodes.iter().find(|n| n.master_id.as_ref() == Some(id)).map(|n| n.port).expect("a replica")
    }

    /// SIGKILLs node `port`.
    pub fn kill(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).expect("a node of this cluster");
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Moves `slot` to master `to`, as a resharding does: IMPORTING on the target, MIGRATING
    /// on the source, its keys MIGRATEd, then NODE on the target, the source and the rest.
    pub fn move_slot(&self, slot: u16, to: u16) {
        let from = self.master_of_slot(slot);
        assert_ne!(from, to, "slot {slot} is on {to} already");
        let id = |port: u16| text(RedisConn::connect(port).command(&["CLUSTER", "MYID"]));
        let (from_id, to_id) = (id(from), id(to));
        let slot = slot.to_string();
        let setslot = |port: u16, args: &[&str]| {
            let mut command = vec!["CLUSTER", "SETSLOT", slot.as_str()];
            command.extend_from_slice(args);
            let reply = RedisConn::connect(port).command(&command);
            assert_eq!(reply, Resp::Simple("OK".into()), "CLUSTER SETSLOT {slot} {args:?} on {port}");
        };
        setslot(to, &["IMPORTING", &from_id]);
        setslot(from, &["MIGRATING", &to_id]);
        let to_port = to.to_string();
        loop {
            let keys = match RedisConn::connect(from).command(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"]) {
                Resp::Array(Some(keys)) => keys.into_iter().map(text).collect::<Vec<_>>(),
                other => panic!("CLUSTER GETKEYSINSLOT: {other:?}"),
            };
            if keys.is_empty() {
                break;
            }
            let mut command = vec!["MIGRATE", "127.0.0.1", to_port.as_str(), "", "0", "5000", "KEYS"];
            command.extend(keys.iter().map(String::as_str));
            let reply = RedisConn::connect(from).command(&command);
            assert_eq!(reply, Resp::Simple("OK".into()), "MIGRATE of slot {slot}'s keys to {to}");
        }
        setslot(to, &["NODE", &to_id]);
        setslot(from, &["NODE", &to_id]);
        for port in self.masters() {
            if port != from && port != to {
                setslot(port, &["NODE", &to_id]);
            }
        }
    }

    /// `redis-cli -c -p <a live node> <args>`, as a backend would run it; its output trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-c", "-p", &self.any_live_port().to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `redis-cli -c SPUBLISH channel payload`: the number of receivers.
    pub fn spublish(&self, channel: &str, payload: &str) -> i64 {
        let out = self.cli(&["SPUBLISH", channel, payload]);
        out.parse().unwrap_or_else(|_| panic!("SPUBLISH {channel}: {out:?}"))
    }

    /// The shard channels node `port` has subscribers for.
    pub fn shard_channels(&self, port: u16) -> Vec<String> {
        match RedisConn::connect(port).command(&["PUBSUB", "SHARDCHANNELS"]) {
            Resp::Array(Some(items)) => {
                let mut names: Vec<String> = items.into_iter().map(text).collect();
                names.sort();
                names
            }
            other => panic!("PUBSUB SHARDCHANNELS: {other:?}"),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
