//! Redis Cluster slot math and the slot map: which master serves which of the 16,384 slots,
//! as `CLUSTER SHARDS` tells it. No I/O: [`SlotMap::from_shards`] reads a decoded reply.
//!
//! A channel's slot is CRC16 (XMODEM) of its name modulo 16,384, or of its `{hash tag}` when
//! it has one, exactly as for keys: shard channels (SSUBSCRIBE/SPUBLISH) live in a slot and
//! move with it.

use std::collections::HashSet;
use std::fmt;

use super::resp::Value;

/// Slots in a Redis Cluster.
pub const SLOTS: usize = 16_384;

/// CRC16-CCITT as Redis Cluster uses it (XMODEM: polynomial 0x1021, initial value 0, no
/// reflection), from a table built at compile time.
pub fn crc16(data: &[u8]) -> u16 {
    data.iter().fold(0u16, |crc, &b| (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ b)])
}

const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// The slot of a key or shard channel: the part between the first `{` and the first `}`
/// after it is hashed instead of the whole name when that part is not empty.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) % SLOTS as u16
}

/// A cluster node, by the address clients reach it on.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeAddr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// No master serves the slot (a slot map with holes: the cluster is being set up or lost a
/// shard).
const UNSERVED: u16 = u16::MAX;

/// Which master serves each slot, and every node the map named (replicas too: one of them
/// may be the master of tomorrow, and any of them can be asked for the next map).
#[derive(Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// Per slot, an index into `masters`, or [`UNSERVED`].
    owners: Box<[u16]>,
    masters: Vec<NodeAddr>,
    nodes: Vec<NodeAddr>,
}

impl fmt::Debug for SlotMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let served = self.owners.iter().filter(|&&o| o != UNSERVED).count();
        f.debug_struct("SlotMap").field("masters", &self.masters).field("served_slots", &served).finish()
    }
}

/// Why a `CLUSTER SHARDS` reply could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardsError(pub &'static str);

impl fmt::Display for ShardsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unexpected CLUSTER SHARDS reply: {}", self.0)
    }
}

impl SlotMap {
    /// Reads a `CLUSTER SHARDS` reply (RESP2 flat key/value arrays or RESP3 maps). Per shard,
    /// the master is the node with role `master`, an `online` one preferred (after a failover
    /// the failed old master may still be listed). `tls` picks each node's `tls-port`.
    pub fn from_shards(reply: &Value<'_>, tls: bool) -> Result<SlotMap, ShardsError> {
        let shards = reply.items().ok_or(ShardsError("not an array"))?;
        let mut map =
            SlotMap { owners: vec![UNSERVED; SLOTS].into_boxed_slice(), masters: Vec::new(), nodes: Vec::new() };
        let mut seen = HashSet::new();
        for shard in shards {
            let shard = shard.items().ok_or(ShardsError("a shard is not a map"))?;
            let (mut ranges, mut nodes) = (None, None);
            for (key, value) in shard.pairs() {
                match key.as_bytes() {
                    Some(b"slots") => ranges = value.items(),
                    Some(b"nodes") => nodes = value.items(),
                    _ => {}
                }
            }
            let ranges = ranges.ok_or(ShardsError("a shard without slots"))?;
            let nodes = nodes.ok_or(ShardsError("a shard without nodes"))?;
            let mut master: Option<(NodeAddr, bool)> = None;
            for node in nodes {
                let Some(node) = read_node(&node, tls)? else { continue };
                if seen.insert(node.addr.clone()) {
                    map.nodes.push(node.addr.clone());
                }
                if node.master && master.as_ref().is_none_or(|(_, online)| !online && node.online) {
                    master = Some((node.addr, node.online));
                }
            }
            if ranges.is_empty() {
                continue;
            }
            let Some((master, _)) = master else { continue };
            let index = match map.masters.iter().position(|m| *m == master) {
                Some(i) => i,
                None => {
                    map.masters.push(master);
                    map.masters.len() - 1
                }
            };
            let bounds: Vec<i64> = ranges
                .iter()
                .map(|v| v.as_integer().ok_or(ShardsError("a slot is not a number")))
                .collect::<Result<_, _>>()?;
            if bounds.len() % 2 != 0 {
                return Err(ShardsError("slot ranges come in pairs"));
            }
            for pair in bounds.chunks(2) {
                let (start, end) = (pair[0], pair[1]);
                if !(0..SLOTS as i64).contains(&start) || !(start..SLOTS as i64).contains(&end) {
                    return Err(ShardsError("a slot range out of bounds"));
                }
                for slot in start..=end {
                    map.owners[slot as usize] = index as u16;
                }
            }
        }
        if map.masters.is_empty() {
            return Err(ShardsError("no master serves any slot"));
        }
        map.canonical();
        Ok(map)
    }

    /// The master serving `slot`, if any.
    pub fn owner(&self, slot: u16) -> Option<&NodeAddr> {
        self.masters.get(usize::from(*self.owners.get(usize::from(slot))?))
    }

    /// The masters serving at least one slot.
    pub fn masters(&self) -> &[NodeAddr] {
        &self.masters
    }

    /// Every node named (masters and replicas).
    pub fn nodes(&self) -> &[NodeAddr] {
        &self.nodes
    }

    /// Whether every slot has a master.
    pub fn is_complete(&self) -> bool {
        self.owners.iter().all(|&o| o != UNSERVED)
    }

    /// This map with `slot` served by `addr`, as a `MOVED` redirect says.
    pub fn with_moved(&self, slot: u16, addr: &NodeAddr) -> SlotMap {
        let mut map = self.clone();
        let index = match map.masters.iter().position(|m| m == addr) {
            Some(i) => i,
            None => {
                map.masters.push(addr.clone());
                if !map.nodes.contains(addr) {
                    map.nodes.push(addr.clone());
                }
                map.masters.len() - 1
            }
        };
        if let Some(owner) = map.owners.get_mut(usize::from(slot)) {
            *owner = index as u16;
        }
        map.masters_in_use();
        map.canonical();
        map
    }

    /// Nodes answer `CLUSTER SHARDS` in orders of their own: sorted, two maps of the same
    /// cluster compare equal.
    fn canonical(&mut self) {
        self.nodes.sort();
        if self.masters.is_sorted() {
            return;
        }
        let mut order: Vec<usize> = (0..self.masters.len()).collect();
        order.sort_by(|&a, &b| self.masters[a].cmp(&self.masters[b]));
        let mut renumber = vec![UNSERVED; self.masters.len()];
        for (new, &old) in order.iter().enumerate() {
            renumber[old] = new as u16;
        }
        self.masters = order.iter().map(|&old| self.masters[old].clone()).collect();
        for o in self.owners.iter_mut().filter(|o| **o != UNSERVED) {
            *o = renumber[usize::from(*o)];
        }
    }

    /// Drops masters that no longer serve a slot (a `MOVED` took their last one), keeping
    /// the indices in `owners` right.
    fn masters_in_use(&mut self) {
        let mut used = vec![false; self.masters.len()];
        for &o in self.owners.iter().filter(|&&o| o != UNSERVED) {
            used[usize::from(o)] = true;
        }
        if used.iter().all(|&u| u) {
            return;
        }
        let mut renumber = vec![UNSERVED; self.masters.len()];
        let mut kept = Vec::new();
        for (i, master) in std::mem::take(&mut self.masters).into_iter().enumerate() {
            if used[i] {
                renumber[i] = kept.len() as u16;
                kept.push(master);
            }
        }
        self.masters = kept;
        for o in self.owners.iter_mut().filter(|o| **o != UNSERVED) {
            *o = renumber[usize::from(*o)];
        }
    }
}

struct ShardNode {
    addr: NodeAddr,
    master: bool,
    online: bool,
}

/// One node of a shard; `None` for a node without a usable address or port.
fn read_node(node: &Value<'_>, tls: bool) -> Result<Option<ShardNode>, ShardsError> {
    let fields = node.items().ok_or(ShardsError("a node is not a map"))?;
    let (mut endpoint, mut ip, mut port, mut tls_port) = (None, None, None, None);
    let (mut master, mut online) = (false, false);
    for (key, value) in fields.pairs() {
        match key.as_bytes() {
            Some(b"endpoint") => endpoint = value.as_bytes(),
            Some(b"ip") => ip = value.as_bytes(),
            Some(b"port") => port = value.as_integer(),
            Some(b"tls-port") => tls_port = value.as_integer(),
            Some(b"role") => master = value.as_bytes() == Some(b"master"),
            Some(b"health") => online = value.as_bytes() == Some(b"online"),
            _ => {}
        }
    }
    // `endpoint` is what the operator chose clients should use (cluster-preferred-endpoint-
    // type); `?` or empty means it is unknown, and the IP is the best there is.
    let host = [endpoint, ip].into_iter().flatten().find(|h| !h.is_empty() && *h != b"?");
    let port = if tls { tls_port.or(port) } else { port };
    let (Some(host), Some(port)) = (host, port) else { return Ok(None) };
    let Ok(host) = std::str::from_utf8(host) else { return Ok(None) };
    let Ok(port) = u16::try_from(port) else { return Ok(None) };
    if port == 0 {
        return Ok(None);
    }
    Ok(Some(ShardNode { addr: NodeAddr { host: host.to_string(), port }, master, online }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::redis::resp::{Decoded, Decoder};

    /// `CLUSTER KEYSLOT` answers collected from redis-server 7.0.15.
    #[test]
    fn slots_match_what_redis_computes() {
        let vectors: [(&str, u16); 12] = [
            ("user_noti:u1", 2322),
            ("user_noti:alice", 76),
            ("topic_noti:news", 12413),
            ("foo", 12182),
            ("123456789", 12739),
            ("", 0),
            ("{user1000}.following", 3443),
            ("foo{}{bar}", 8363),
            ("foo{{bar}}zap", 4015),
            ("foo{bar}{zap}", 5061),
            ("{}", 15257),
            ("a{b", 13340),
        ];
        for (key, slot) in vectors {
            assert_eq!(key_slot(key.as_bytes()), slot, "{key:?}");
        }
    }

    #[test]
    fn crc16_is_xmodem() {
        // The check value of CRC-16/XMODEM.
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    #[test]
    fn a_hash_tag_puts_names_in_one_slot() {
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"x{tag}y"), key_slot(b"z{tag}"));
    }

    fn decode(bytes: &[u8], check: impl FnOnce(&Value<'_>)) {
        let mut decoder = Decoder::default();
        match decoder.decode(bytes).expect("valid RESP") {
            Decoded::Complete { value, consumed } => {
                assert_eq!(consumed, bytes.len());
                check(&value);
            }
            Decoded::Incomplete { .. } => panic!("incomplete"),
        }
    }

    fn bulk(s: &str) -> String {
        format!("${}\r\n{s}\r\n", s.len())
    }

    /// A node as RESP2 `CLUSTER SHARDS` writes it.
    fn node(port: u16, role: &str, health: &str) -> String {
        let mut out = String::from("*14\r\n");
        for (k, v) in [("id", "0123abcd"), ("port", ""), ("ip", "127.0.0.1"), ("endpoint", "127.0.0.1"), ("role", role)]
        {
            out += &bulk(k);
            out += &if k == "port" { format!(":{port}\r\n") } else { bulk(v) };
        }
        out += &bulk("replication-offset");
        out += ":154\r\n";
        out += &bulk("health");
        out += &bulk(health);
        out
    }

    fn shard(ranges: &[(u16, u16)], nodes: &[String]) -> String {
        let mut out = format!("*4\r\n{}*{}\r\n", bulk("slots"), ranges.len() * 2);
        for (start, end) in ranges {
            out += &format!(":{start}\r\n:{end}\r\n");
        }
        out += &format!("{}*{}\r\n", bulk("nodes"), nodes.len());
        for n in nodes {
            out += n;
        }
        out
    }

    #[test]
    fn shards_give_each_slot_its_master() {
        let reply = format!(
            "*3\r\n{}{}{}",
            shard(&[(0, 5460)], &[node(7001, "master", "online"), node(7004, "replica", "online")]),
            shard(&[(5461, 10922)], &[node(7002, "master", "online"), node(7005, "replica", "loading")]),
            shard(&[(10923, 16000), (16001, 16383)], &[node(7003, "master", "online")]),
        );
        decode(reply.as_bytes(), |value| {
            let map = SlotMap::from_shards(value, false).expect("parses");
            let port = |slot| map.owner(slot).map(|a| a.port);
            assert_eq!(
                (port(0), port(5460), port(5461), port(16383)),
                (Some(7001), Some(7001), Some(7002), Some(7003))
            );
            assert_eq!(map.masters().len(), 3);
            assert_eq!(map.nodes().len(), 5, "replicas are known too");
            assert!(map.is_complete());
        });
    }

    #[test]
    fn after_a_failover_the_promoted_replica_serves_and_the_failed_master_does_not() {
        // As redis 7.0 answered 4 s after a master was killed: the old master in a shard of
        // its own, without slots, and the promoted replica serving (two ranges around a slot
        // migrated earlier).
        let reply = format!(
            "*2\r\n{}{}",
            shard(&[], &[node(7001, "master", "fail")]),
            shard(&[(0, 2321), (2323, 16383)], &[node(7006, "master", "online")]),
        );
        decode(reply.as_bytes(), |value| {
            let map = SlotMap::from_shards(value, false).expect("parses");
            assert_eq!(map.owner(0).map(|a| a.port), Some(7006));
            assert_eq!(map.owner(2322), None, "a hole");
            assert!(!map.is_complete());
            assert_eq!(map.masters().iter().map(|m| m.port).collect::<Vec<_>>(), vec![7006]);
            assert!(map.nodes().iter().any(|n| n.port == 7001));
        });
        // Both listed as masters in one shard: the online one serves.
        let reply =
            format!("*1\r\n{}", shard(&[(0, 16383)], &[node(7001, "master", "fail"), node(7006, "master", "online")]));
        decode(reply.as_bytes(), |value| {
            assert_eq!(SlotMap::from_shards(value, false).unwrap().owner(9).map(|a| a.port), Some(7006));
        });
    }

    #[test]
    fn a_moved_redirect_updates_one_slot_and_retires_masters_left_without_slots() {
        let reply = format!(
            "*2\r\n{}{}",
            shard(&[(0, 0)], &[node(7001, "master", "online")]),
            shard(&[(1, 16383)], &[node(7002, "master", "online")]),
        );
        decode(reply.as_bytes(), |value| {
            let map = SlotMap::from_shards(value, false).unwrap();
            let new = NodeAddr { host: "127.0.0.1".into(), port: 7009 };
            let moved = map.with_moved(1, &new);
            assert_eq!(moved.owner(1), Some(&new));
            assert_eq!(moved.owner(2).map(|a| a.port), Some(7002));
            let moved = moved.with_moved(0, &new);
            assert_eq!(moved.masters().iter().map(|m| m.port).collect::<Vec<_>>(), vec![7002, 7009]);
            assert_eq!(moved.owner(2).map(|a| a.port), Some(7002));
            assert_eq!((moved.owner(0), moved.owner(1)), (Some(&new), Some(&new)));
        });
    }

    #[test]
    fn maps_read_from_different_nodes_compare_equal() {
        let (a, b) = (
            shard(&[(0, 99)], &[node(7001, "master", "online")]),
            shard(&[(100, 16383)], &[node(7002, "master", "online")]),
        );
        let mut maps = Vec::new();
        for reply in [format!("*2\r\n{a}{b}"), format!("*2\r\n{b}{a}")] {
            decode(reply.as_bytes(), |value| maps.push(SlotMap::from_shards(value, false).unwrap()));
        }
        assert_eq!(maps[0], maps[1]);
        assert_eq!(maps[1].owner(0).map(|n| n.port), Some(7001));
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        for bad in ["+OK\r\n", "*1\r\n:1\r\n", "*1\r\n*2\r\n$5\r\nslots\r\n*1\r\n:1\r\n", "*0\r\n"] {
            decode(bad.as_bytes(), |value| assert!(SlotMap::from_shards(value, false).is_err(), "{bad:?}"));
        }
        let reply = format!("*1\r\n{}", shard(&[(5, 16384)], &[node(7001, "master", "online")]));
        decode(reply.as_bytes(), |value| assert!(SlotMap::from_shards(value, false).is_err()));
    }
}
