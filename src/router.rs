//! The router: the only map of which event loops hold which users and topics.
//!
//! Loops report `Join`/`Leave` when their first connection of a user (or topic) arrives or
//! their last one leaves; publications arrive from the Redis reader or, in embedded mode,
//! from HTTP handlers. Each publication goes once to each loop that holds a target, as a
//! pointer to the shared frame; the router never touches a connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use crossbeam_channel::Receiver;

use crate::event_loop::{ConnRef, LoopCmd, LoopHandle};
use crate::frame::SharedFrame;
use crate::metrics::Metrics;

/// Whom a message is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    User(Arc<str>),
    Topic(Arc<str>),
}

/// The sending connection of a relayed message: (instance, loop, connection).
pub type Origin = (u64, usize, ConnRef);

/// Connections that must not receive a message although they hold one of its targets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exclusion {
    /// Every connection of these users (seed 004 `exclude_user_ids`).
    pub users: Option<Arc<[Arc<str>]>>,
    /// The connection a relayed message came from (never echoed to its sender).
    pub origin: Option<Origin>,
}

impl Exclusion {
    pub fn is_empty(&self) -> bool {
        self.users.is_none() && self.origin.is_none()
    }
}

/// A message on its way to every loop holding one of its targets.
#[derive(Debug)]
pub struct Publication {
    pub targets: Vec<Target>,
    pub frame: SharedFrame,
    pub exclusion: Exclusion,
    /// Tell this HTTP connection whether anyone was addressed.
    pub reply: Option<(usize, ConnRef)>,
}

pub enum RouterMsg {
    Join { loop_id: usize, target: Target },
    Leave { loop_id: usize, target: Target },
    Publish(Publication),
    Stop,
}

/// Bit `i` set = loop `i` holds at least one connection of the key.
type LoopMask = u64;

pub struct Router {
    holders: HashMap<Target, LoopMask>,
    loops: Arc<[LoopHandle]>,
    users: u64,
    topics: u64,
}

impl Router {
    pub fn new(loops: Arc<[LoopHandle]>) -> Router {
        Router { holders: HashMap::new(), loops, users: 0, topics: 0 }
    }

    /// Runs until `Stop` or until every sender is gone.
    pub fn run(mut self, inbox: Receiver<RouterMsg>, metrics: &Metrics) {
        while let Ok(msg) = inbox.recv() {
            if !self.handle(msg) {
                break;
            }
            metrics.unique_users.store(self.users, Relaxed);
            metrics.unique_topics.store(self.topics, Relaxed);
        }
    }

    /// Applies one message; `false` to stop.
    pub fn handle(&mut self, msg: RouterMsg) -> bool {
        match msg {
            RouterMsg::Join { loop_id, target } => {
                let is_user = matches!(target, Target::User(_));
                let mask = self.holders.entry(target).or_insert(0);
                if *mask == 0 {
                    if is_user { self.users += 1 } else { self.topics += 1 }
                }
                *mask |= 1 << loop_id;
            }
            RouterMsg::Leave { loop_id, target } => {
                if let Some(mask) = self.holders.get_mut(&target) {
                    *mask &= !(1 << loop_id);
                    if *mask == 0 {
                        match target {
                            Target::User(_) => self.users -= 1,
                            Target::Topic(_) => self.topics -= 1,
                        }
                        self.holders.remove(&target);
                    }
                }
            }
            RouterMsg::Publish(publication) => self.publish(publication),
            RouterMsg::Stop => return false,
        }
        true
    }

    fn mask_of(&self, target: &Target) -> LoopMask {
        self.holders.get(target).copied().unwrap_or(0)
    }

    fn publish(&mut self, publication: Publication) {
        let Publication { targets, frame, exclusion, reply } = publication;
        let mut any = 0;
        if let [target] = targets.as_slice() {
            // The common case: one target, no per-loop list to build.
            let mask = self.mask_of(target);
            any = mask;
            for loop_id in bits(mask) {
                self.loops[loop_id].send(LoopCmd::Deliver {
                    targets: DeliverTo::One(target.clone()),
                    frame: frame.clone(),
                    exclusion: exclusion.clone(),
                });
            }
        } else {
            let masks: Vec<LoopMask> = targets.iter().map(|t| self.mask_of(t)).collect();
            for loop_id in bits(masks.iter().fold(0, |a, m| a | m)) {
                let here: Vec<Target> = targets
                    .iter()
                    .zip(&masks)
                    .filter(|(_, m)| *m & (1 << loop_id) != 0)
                    .map(|(t, _)| t.clone())
                    .collect();
                any |= 1 << loop_id;
                self.loops[loop_id].send(LoopCmd::Deliver {
                    targets: DeliverTo::Many(here.into_boxed_slice()),
                    frame: frame.clone(),
                    exclusion: exclusion.clone(),
                });
            }
        }
        if let Some((loop_id, conn)) = reply {
            if let Some(handle) = self.loops.get(loop_id) {
                handle.send(LoopCmd::Answer { conn, result: Ok(any.count_ones() as u64) });
            }
        }
    }
}

/// The targets of one delivery on one loop.
#[derive(Debug)]
pub enum DeliverTo {
    One(Target),
    Many(Box<[Target]>),
}

impl DeliverTo {
    pub fn as_slice(&self) -> &[Target] {
        match self {
            DeliverTo::One(t) => std::slice::from_ref(t),
            DeliverTo::Many(ts) => ts,
        }
    }
}

/// Indexes of the set bits of `mask`, lowest first.
fn bits(mut mask: LoopMask) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        Some(i)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_lists_set_positions() {
        assert_eq!(bits(0b1010_0001).collect::<Vec<_>>(), vec![0, 5, 7]);
        assert_eq!(bits(0).count(), 0);
        assert_eq!(bits(1 << 63).collect::<Vec<_>>(), vec![63]);
    }
}
