//! One loop's index: which of its connections receive each user's and topic's messages.
//!
//! Each target maps to a doubly linked list of nodes, one node per (connection, target)
//! membership, kept in a pool. A connection remembers the node of each of its memberships, so
//! leaving is O(1) however many connections share the target (closing N tabs of one user costs
//! N, not N²), and the lists cost 12 bytes a membership.

use std::collections::HashMap;

use crate::ids::Target;

/// No node: the end of a list, or a connection without this membership.
pub const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Node {
    conn: u32,
    prev: u32,
    next: u32,
}

/// Nodes by number, with a free list threaded through the vacant ones (`conn == NIL`):
/// 12 bytes a node, where a slab's tagged entries take 16.
#[derive(Debug)]
struct Pool {
    nodes: Vec<Node>,
    free: u32,
    used: usize,
}

impl Default for Pool {
    fn default() -> Self {
        Pool { nodes: Vec::new(), free: NIL, used: 0 }
    }
}

impl Pool {
    fn insert(&mut self, node: Node) -> u32 {
        self.used += 1;
        if self.free != NIL {
            let id = self.free;
            self.free = self.nodes[id as usize].next;
            self.nodes[id as usize] = node;
            return id;
        }
        self.nodes.push(node);
        (self.nodes.len() - 1) as u32
    }

    fn remove(&mut self, id: u32) -> Option<Node> {
        let slot = self.nodes.get_mut(id as usize).filter(|n| n.conn != NIL)?;
        let node = std::mem::replace(slot, Node { conn: NIL, prev: NIL, next: self.free });
        self.free = id;
        self.used -= 1;
        if self.used == 0 {
            // Everyone left: a burst's pool is not kept.
            *self = Pool::default();
        }
        Some(node)
    }

    fn get(&self, id: u32) -> Option<&Node> {
        self.nodes.get(id as usize).filter(|n| n.conn != NIL)
    }

    fn at(&mut self, id: u32) -> &mut Node {
        &mut self.nodes[id as usize]
    }
}

#[derive(Debug, Default)]
pub struct Index {
    heads: HashMap<Target, u32>,
    nodes: Pool,
}

impl Index {
    /// Adds connection `conn` under `target`. Returns its node, and whether `target` is new on
    /// this loop (the route table must then learn that this loop holds it).
    pub fn add(&mut self, target: &Target, conn: u32) -> (u32, bool) {
        let node = self.nodes.insert(Node { conn, prev: NIL, next: NIL });
        match self.heads.get_mut(target) {
            Some(head) => {
                let old = std::mem::replace(head, node);
                self.nodes.at(node).next = old;
                self.nodes.at(old).prev = node;
                (node, false)
            }
            None => {
                self.heads.insert(target.clone(), node);
                (node, true)
            }
        }
    }

    /// Removes `node` from `target`'s list. Returns whether `target` is now gone from this loop.
    pub fn remove(&mut self, target: &Target, node: u32) -> bool {
        let Some(Node { prev, next, .. }) = self.nodes.remove(node) else { return false };
        if next != NIL {
            self.nodes.at(next).prev = prev;
        }
        if prev != NIL {
            self.nodes.at(prev).next = next;
            return false;
        }
        if next != NIL {
            if let Some(head) = self.heads.get_mut(target) {
                *head = next;
            }
            return false;
        }
        self.heads.remove(target);
        if self.heads.capacity() > 64 && self.heads.len() * 4 < self.heads.capacity() {
            // After a burst leaves, keep the table proportional to what remains.
            let keep = self.heads.len() * 2;
            self.heads.shrink_to(keep);
        }
        true
    }

    /// The connections under `target`, newest first.
    pub fn connections(&self, target: &Target) -> Connections<'_> {
        Connections { nodes: &self.nodes, next: self.heads.get(target).copied().unwrap_or(NIL) }
    }

    /// Targets with at least one connection here.
    pub fn targets(&self) -> usize {
        self.heads.len()
    }
}

pub struct Connections<'a> {
    nodes: &'a Pool,
    next: u32,
}

impl Iterator for Connections<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        let node = self.nodes.get(self.next)?;
        self.next = node.next;
        Some(node.conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str) -> Target {
        Target::user(id)
    }

    #[test]
    fn lists_follow_adds_and_removes_in_any_order() {
        let mut index = Index::default();
        let (a, first) = index.add(&user("u"), 10);
        assert!(first);
        let (b, first) = index.add(&user("u"), 11);
        assert!(!first);
        let (c, _) = index.add(&user("u"), 12);
        index.add(&user("v"), 13);
        assert_eq!(index.connections(&user("u")).collect::<Vec<_>>(), vec![12, 11, 10]);
        assert!(!index.remove(&user("u"), b), "middle");
        assert_eq!(index.connections(&user("u")).collect::<Vec<_>>(), vec![12, 10]);
        assert!(!index.remove(&user("u"), c), "head");
        assert_eq!(index.connections(&user("u")).collect::<Vec<_>>(), vec![10]);
        assert!(index.remove(&user("u"), a), "last");
        assert_eq!(index.connections(&user("u")).count(), 0);
        assert_eq!(index.targets(), 1);
        assert!(!index.remove(&user("u"), a), "removing twice is harmless");
        assert_eq!(index.connections(&user("v")).collect::<Vec<_>>(), vec![13]);
    }

    #[test]
    fn freed_nodes_are_reused_and_an_emptied_pool_is_released() {
        let mut index = Index::default();
        let (a, _) = index.add(&user("u"), 1);
        let (b, _) = index.add(&user("v"), 2);
        index.remove(&user("u"), a);
        let (c, _) = index.add(&user("w"), 3);
        assert_eq!(c, a, "the vacant node is taken first");
        assert_eq!(index.nodes.nodes.len(), 2);
        index.remove(&user("v"), b);
        index.remove(&user("w"), c);
        assert_eq!(index.nodes.nodes.capacity(), 0);
        assert!(!index.remove(&user("w"), c), "a stale node is ignored");
    }

    #[test]
    fn many_connections_of_one_target_leave_in_constant_time_each() {
        let mut index = Index::default();
        let nodes: Vec<u32> = (0..10_000).map(|c| index.add(&user("tabs"), c).0).collect();
        for (i, node) in nodes.iter().enumerate() {
            let emptied = index.remove(&user("tabs"), *node);
            assert_eq!(emptied, i == nodes.len() - 1);
        }
        assert_eq!(index.targets(), 0);
    }
}
