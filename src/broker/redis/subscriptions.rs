//! Exact subscriptions: the reader is subscribed to a user's or topic's channel exactly while
//! this instance holds a connection that receives it. No I/O here: the reader feeds in what
//! the loops reported and what Redis confirmed, and takes out the commands to send.
//!
//! The route table is the truth about what is wanted (a loop updates it before it reports),
//! so a report is only a hint to look again: reports from different loops may arrive in any
//! order and still end right. Commands go out batched (many channels per SUBSCRIBE), and a
//! channel is settled only once every command sent for it has been confirmed, so a quick
//! leave-and-join never counts an old confirmation as the new subscription's.

use std::collections::HashMap;

use crate::ids::{ReplyTo, Target};
use crate::mailbox::Mailbox;

/// Channels per SUBSCRIBE or UNSUBSCRIBE command.
pub const BATCH: usize = 512;

/// What a loop tells the reader.
#[derive(Debug)]
pub enum Change {
    /// `target` was joined or left instance-wide: look again.
    Changed(Target),
    /// Like `Changed`, and the connection `waiter` holds its upgrade (or `subscribed` reply)
    /// until the channel is confirmed.
    Wait(Target, ReplyTo),
}

/// The loops' side: where they report joins and leaves. Never blocks and never loses a
/// report (the channel is unbounded; there is one report per instance-wide first join, last
/// leave or waiting connection, and the reader drains them as they come).
pub struct Reports(pub(super) Mailbox<Change>);

impl Reports {
    /// Called by the reader before it takes the reports: the next one wakes it again.
    pub(super) fn clear_wake(&self) {
        self.0.clear_wake();
    }

    /// `target` was joined or left instance-wide.
    pub fn changed(&self, target: Target) {
        let _ = self.0.try_send(Change::Changed(target));
    }

    /// `waiter` holds its output until `target` is subscribed.
    pub fn wait(&self, target: Target, waiter: ReplyTo) {
        let _ = self.0.try_send(Change::Wait(target, waiter));
    }
}

/// One channel's subscription, as far as commands and confirmations go.
#[derive(Debug, Default)]
struct Channel {
    /// The last command sent: subscribe (true) or unsubscribe (false).
    sent_subscribe: bool,
    /// A command to send with the next batch.
    queued: Option<bool>,
    /// Commands sent and not yet confirmed.
    in_flight: u32,
    /// Counted in [`Subscriptions::active`]: confirmed subscribed, and no unsubscribe sent
    /// since. (A confirmation can settle a channel whose leave is queued but not yet sent.)
    counted: bool,
}

impl Channel {
    /// Where this channel is heading.
    fn goal(&self) -> bool {
        self.queued.unwrap_or(self.sent_subscribe)
    }

    fn settled(&self) -> bool {
        self.in_flight == 0 && self.queued.is_none()
    }
}

/// What the reader should do after a confirmation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// The channel is now subscribed: these connections may proceed.
    pub ready: Vec<ReplyTo>,
    /// Whether the target is now subscribed (`Some(true)`), unsubscribed (`Some(false)`), or
    /// still on its way.
    pub active: Option<bool>,
}

#[derive(Debug, Default)]
pub struct Subscriptions {
    channels: HashMap<Target, Channel>,
    waiters: HashMap<Target, Vec<ReplyTo>>,
    /// Channels with a queued command, in the order they were queued.
    queue: Vec<Target>,
    active: usize,
}

impl Subscriptions {
    /// Brings `target` towards `wanted`. Returns the waiters that may proceed at once (the
    /// channel is already subscribed).
    pub fn reconcile(&mut self, target: &Target, wanted: bool, waiter: Option<ReplyTo>) -> Vec<ReplyTo> {
        let channel = self.channels.entry(target.clone()).or_default();
        if channel.goal() != wanted {
            if channel.queued.is_some() {
                // The queued command undoes itself.
                channel.queued = None;
            } else {
                channel.queued = Some(wanted);
                self.queue.push(target.clone());
            }
        }
        let settled_active = channel.settled() && channel.sent_subscribe;
        if channel.settled() && !channel.sent_subscribe {
            self.channels.remove(target);
        }
        if !wanted {
            // Nobody here receives the target any more: whoever waited for it (a topic
            // subscribed and dropped again) has nothing left to wait for.
            let mut ready = self.waiters.remove(target).unwrap_or_default();
            ready.extend(waiter);
            return ready;
        }
        match waiter {
            Some(waiter) if settled_active => vec![waiter],
            Some(waiter) => {
                self.waiters.entry(target.clone()).or_default().push(waiter);
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    /// Whether a command sent for `target` awaits its confirmation.
    pub fn is_settling(&self, target: &Target) -> bool {
        self.channels.get(target).is_some_and(|c| c.in_flight > 0)
    }

    /// Whether commands wait to be sent.
    pub fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Takes the queued commands, at most [`BATCH`] channels per command: (subscribe?, targets).
    pub fn take_batches(&mut self) -> Vec<(bool, Vec<Target>)> {
        let mut subscribe = Vec::new();
        let mut unsubscribe = Vec::new();
        for target in std::mem::take(&mut self.queue) {
            let Some(channel) = self.channels.get_mut(&target) else { continue };
            let Some(command) = channel.queued.take() else { continue };
            if channel.counted && !command {
                channel.counted = false;
                self.active -= 1;
            }
            channel.sent_subscribe = command;
            channel.in_flight += 1;
            if command { subscribe.push(target) } else { unsubscribe.push(target) }
        }
        let mut batches = Vec::new();
        for (kind, targets) in [(false, unsubscribe), (true, subscribe)] {
            for chunk in targets.chunks(BATCH) {
                batches.push((kind, chunk.to_vec()));
            }
        }
        batches
    }

    /// Redis confirmed a (un)subscribe of `target`.
    pub fn confirmed(&mut self, target: &Target) -> Settled {
        let Some(channel) = self.channels.get_mut(target) else { return Settled::default() };
        channel.in_flight = channel.in_flight.saturating_sub(1);
        if !channel.settled() {
            return Settled::default();
        }
        if channel.sent_subscribe {
            if !channel.counted {
                channel.counted = true;
                self.active += 1;
            }
            let ready = self.waiters.remove(target).unwrap_or_default();
            Settled { ready, active: Some(true) }
        } else {
            self.channels.remove(target);
            let ready = self.waiters.remove(target).unwrap_or_default();
            Settled { ready, active: Some(false) }
        }
    }

    /// Redis dropped `target`'s subscription by itself (a shard channel's slot moved):
    /// subscribe again if it is still wanted.
    pub fn dropped(&mut self, target: &Target) {
        if let Some(channel) = self.channels.get_mut(target) {
            if channel.settled() && channel.sent_subscribe {
                if channel.counted {
                    channel.counted = false;
                    self.active -= 1;
                }
                channel.sent_subscribe = false;
                channel.queued = Some(true);
                self.queue.push(target.clone());
            }
        }
    }

    /// Stops tracking `target` without a command: its subscription went away with its slot
    /// (to another node, whose own state takes it over) or was never made. Replies still on
    /// their way for it are ignored. Returns whoever waited for it.
    pub fn forget(&mut self, target: &Target) -> Vec<ReplyTo> {
        if let Some(channel) = self.channels.remove(target) {
            if channel.counted {
                self.active -= 1;
            }
            if channel.queued.is_some() {
                self.queue.retain(|t| t != target);
            }
        }
        self.waiters.remove(target).unwrap_or_default()
    }

    /// The connection was lost: everything wanted is subscribed again on the next one, and
    /// whoever waited proceeds now (the subscription follows when Redis is back).
    pub fn connection_lost(&mut self) -> Vec<ReplyTo> {
        self.channels.retain(|_, c| c.goal());
        self.queue.clear();
        for (target, channel) in self.channels.iter_mut() {
            *channel = Channel { sent_subscribe: false, queued: Some(true), in_flight: 0, counted: false };
            self.queue.push(target.clone());
        }
        self.active = 0;
        self.waiters.drain().flat_map(|(_, w)| w).collect()
    }

    /// Channels subscribed and settled.
    pub fn active(&self) -> usize {
        self.active
    }

    /// Every channel wanted (subscribed or on its way).
    pub fn wanted(&self) -> impl Iterator<Item = &Target> {
        self.channels.iter().filter(|(_, c)| c.goal()).map(|(t, _)| t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ConnRef;

    fn user(id: &str) -> Target {
        Target::user(id)
    }

    fn waiter(n: u32) -> ReplyTo {
        ReplyTo { loop_id: 0, conn: ConnRef { key: n, id: n } }
    }

    #[test]
    fn a_join_subscribes_once_and_releases_its_waiters_on_confirmation() {
        let mut s = Subscriptions::default();
        assert!(s.reconcile(&user("a"), true, Some(waiter(1))).is_empty());
        assert!(s.reconcile(&user("a"), true, Some(waiter(2))).is_empty(), "a second tab waits too");
        assert_eq!(s.take_batches(), vec![(true, vec![user("a")])]);
        assert!(s.take_batches().is_empty(), "sent once");
        let settled = s.confirmed(&user("a"));
        assert_eq!(settled.ready, vec![waiter(1), waiter(2)]);
        assert_eq!((settled.active, s.active()), (Some(true), 1));
        assert_eq!(s.reconcile(&user("a"), true, Some(waiter(3))), vec![waiter(3)], "already subscribed");
    }

    #[test]
    fn a_waiter_is_released_when_nobody_wants_the_channel_any_more() {
        let mut s = Subscriptions::default();
        assert!(s.reconcile(&user("t"), true, Some(waiter(1))).is_empty());
        s.take_batches();
        // The connection unsubscribed the topic (or closed) before Redis answered.
        assert_eq!(s.reconcile(&user("t"), false, None), vec![waiter(1)]);
        assert_eq!(s.reconcile(&user("t"), false, Some(waiter(2))), vec![waiter(2)], "already gone");
        s.take_batches();
        assert_eq!(s.confirmed(&user("t")), Settled::default(), "the subscribe's confirmation");
        assert_eq!(s.confirmed(&user("t")), Settled { ready: Vec::new(), active: Some(false) });
        assert_eq!((s.active(), s.wanted().count()), (0, 0));
    }

    #[test]
    fn leave_then_join_before_sending_cancels_out() {
        let mut s = Subscriptions::default();
        s.reconcile(&user("a"), true, None);
        s.take_batches();
        s.confirmed(&user("a"));
        s.reconcile(&user("a"), false, None);
        s.reconcile(&user("a"), true, None);
        assert!(s.take_batches().is_empty());
        assert_eq!(s.active(), 1);
    }

    #[test]
    fn an_old_confirmation_does_not_settle_a_newer_subscribe() {
        let mut s = Subscriptions::default();
        s.reconcile(&user("a"), true, None);
        s.take_batches(); // SUBSCRIBE
        s.reconcile(&user("a"), false, None);
        s.take_batches(); // UNSUBSCRIBE
        s.reconcile(&user("a"), true, Some(waiter(9)));
        s.take_batches(); // SUBSCRIBE again
        assert_eq!(s.confirmed(&user("a")), Settled::default(), "the first subscribe's confirmation");
        assert_eq!(s.confirmed(&user("a")), Settled::default(), "the unsubscribe's");
        let last = s.confirmed(&user("a"));
        assert_eq!(last.ready, vec![waiter(9)]);
        assert_eq!(s.active(), 1);
    }

    #[test]
    fn batches_hold_at_most_512_channels_and_unsubscribes_go_first() {
        let mut s = Subscriptions::default();
        for i in 0..1000 {
            s.reconcile(&user(&i.to_string()), true, None);
        }
        let batches = s.take_batches();
        assert_eq!(batches.iter().map(|(_, t)| t.len()).collect::<Vec<_>>(), vec![512, 488]);
        for i in 0..1000 {
            s.confirmed(&user(&i.to_string()));
        }
        assert_eq!(s.active(), 1000);
        s.reconcile(&user("0"), false, None);
        s.reconcile(&user("new"), true, None);
        let batches = s.take_batches();
        assert_eq!(batches, vec![(false, vec![user("0")]), (true, vec![user("new")])]);
        assert_eq!(s.active(), 999);
        s.confirmed(&user("0"));
        assert_eq!(s.wanted().count(), 1000);
    }

    #[test]
    fn a_lost_connection_resubscribes_everything_wanted_and_releases_waiters() {
        let mut s = Subscriptions::default();
        s.reconcile(&user("a"), true, None);
        s.reconcile(&user("b"), true, Some(waiter(1)));
        s.take_batches();
        s.confirmed(&user("a"));
        s.reconcile(&user("a"), false, None);
        assert_eq!(s.connection_lost(), vec![waiter(1)]);
        assert_eq!(s.active(), 0);
        assert_eq!(s.take_batches(), vec![(true, vec![user("b")])], "a is no longer wanted");
    }

    #[test]
    fn a_channel_dropped_by_redis_is_subscribed_again() {
        let mut s = Subscriptions::default();
        s.reconcile(&user("a"), true, None);
        s.take_batches();
        s.confirmed(&user("a"));
        s.dropped(&user("a"));
        assert_eq!(s.active(), 0);
        assert_eq!(s.take_batches(), vec![(true, vec![user("a")])]);
    }

    #[test]
    fn a_confirmation_that_arrives_between_a_leave_and_its_unsubscribe_counts_once() {
        let mut s = Subscriptions::default();
        s.reconcile(&user("a"), true, None);
        s.take_batches();
        s.reconcile(&user("a"), false, None);
        let settled = s.confirmed(&user("a"));
        assert_eq!(settled.active, None, "the leave is still to be sent");
        assert_eq!(s.take_batches(), vec![(false, vec![user("a")])]);
        s.confirmed(&user("a"));
        assert_eq!((s.active(), s.wanted().count()), (0, 0));
    }

    #[test]
    fn a_forgotten_channel_releases_its_waiters_and_ignores_late_replies() {
        let mut s = Subscriptions::default();
        s.reconcile(&user("a"), true, None);
        s.take_batches();
        s.confirmed(&user("a"));
        s.reconcile(&user("b"), true, Some(waiter(1)));
        assert_eq!(s.forget(&user("b")), vec![waiter(1)]);
        assert!(s.forget(&user("a")).is_empty());
        assert_eq!((s.active(), s.wanted().count()), (0, 0));
        assert!(s.take_batches().is_empty(), "b's queued subscribe went with it");
        assert_eq!(s.confirmed(&user("a")), Settled::default());
    }
}
