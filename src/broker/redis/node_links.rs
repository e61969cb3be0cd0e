//! A Redis thread's links to cluster nodes, by address: a slab, whose keys make the links'
//! poller tokens, and an index from address to key, kept in step. The subscriber, the shard
//! publisher and the fleet each hold one, with their own kind of link.

use std::collections::HashMap;
use std::ops::{Deref, Index, IndexMut};

use slab::Slab;

use super::slots::NodeAddr;

/// A link that knows which node it is to.
pub trait NodeLink {
    fn addr(&self) -> &NodeAddr;
}

pub struct NodeLinks<L> {
    links: Slab<L>,
    by_addr: HashMap<NodeAddr, usize>,
}

impl<L> Default for NodeLinks<L> {
    fn default() -> Self {
        NodeLinks { links: Slab::new(), by_addr: HashMap::new() }
    }
}

impl<L: NodeLink> NodeLinks<L> {
    /// The key of the link to `addr`.
    pub fn key_of(&self, addr: &NodeAddr) -> Option<usize> {
        self.by_addr.get(addr).copied()
    }

    /// The link to `addr`.
    pub fn by_addr(&self, addr: &NodeAddr) -> Option<&L> {
        self.key_of(addr).and_then(|key| self.links.get(key))
    }

    /// The key of the link to `addr`, made with `make` if there is none; `true` if it is new.
    pub fn key_for(&mut self, addr: &NodeAddr, make: impl FnOnce() -> L) -> (usize, bool) {
        if let Some(key) = self.key_of(addr) {
            return (key, false);
        }
        let key = self.links.insert(make());
        self.by_addr.insert(addr.clone(), key);
        (key, true)
    }

    /// Takes out every link `gone` picks; the caller closes what they hold.
    pub fn remove_where(&mut self, gone: impl Fn(&L) -> bool) -> Vec<L> {
        let keys: Vec<usize> = self.links.iter().filter(|(_, link)| gone(link)).map(|(key, _)| key).collect();
        let removed: Vec<L> = keys.into_iter().map(|key| self.links.remove(key)).collect();
        for link in &removed {
            self.by_addr.remove(link.addr());
        }
        removed
    }

    pub fn get_mut(&mut self, key: usize) -> Option<&mut L> {
        self.links.get_mut(key)
    }

    pub fn iter_mut(&mut self) -> slab::IterMut<'_, L> {
        self.links.iter_mut()
    }
}

/// Reading goes straight to the slab; adding and removing go through the methods above, so
/// the address index cannot fall out of step.
impl<L> Deref for NodeLinks<L> {
    type Target = Slab<L>;

    fn deref(&self) -> &Slab<L> {
        &self.links
    }
}

impl<'a, L> IntoIterator for &'a NodeLinks<L> {
    type Item = (usize, &'a L);
    type IntoIter = slab::Iter<'a, L>;

    fn into_iter(self) -> slab::Iter<'a, L> {
        self.links.iter()
    }
}

impl<L> Index<usize> for NodeLinks<L> {
    type Output = L;

    fn index(&self, key: usize) -> &L {
        &self.links[key]
    }
}

impl<L> IndexMut<usize> for NodeLinks<L> {
    fn index_mut(&mut self, key: usize) -> &mut L {
        &mut self.links[key]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Probe(NodeAddr, u32);

    impl NodeLink for Probe {
        fn addr(&self) -> &NodeAddr {
            &self.0
        }
    }

    fn node(port: u16) -> NodeAddr {
        NodeAddr { host: "10.0.0.1".into(), port }
    }

    #[test]
    fn one_link_per_address_and_removal_keeps_the_index_in_step() {
        let mut links = NodeLinks::default();
        let (a, new_a) = links.key_for(&node(7000), || Probe(node(7000), 1));
        let (again, new_again) = links.key_for(&node(7000), || Probe(node(7000), 2));
        assert_eq!((a, new_a, again, new_again), (a, true, a, false));
        assert_eq!(links[a].1, 1, "the existing link is kept, not replaced");
        let (b, _) = links.key_for(&node(7001), || Probe(node(7001), 3));
        let removed = links.remove_where(|p| p.0.port == 7000);
        assert_eq!(removed.len(), 1);
        assert!(links.key_of(&node(7000)).is_none());
        assert_eq!(links.by_addr(&node(7001)).map(|p| p.1), Some(3));
        let (c, new_c) = links.key_for(&node(7000), || Probe(node(7000), 4));
        assert!(new_c);
        assert_ne!(links[c].1, links[b].1);
        assert_eq!(links.len(), 2);
    }
}
