//! Fleet-wide requests that every instance answers (`/api/disconnect`): the asking instance
//! publishes the request on the control channel, learns from PUBLISH how many instances
//! received it, and sums their answers until all have come or the deadline passes. No I/O
//! here: the fleet thread feeds in what happened and sends the results.
//!
//! Answers may arrive before PUBLISH's own reply does (they travel on another connection), so
//! a survey counts them from the start and completes once the expected number is known and
//! reached.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::ids::ReplyTo;

/// How long the asker waits for the fleet (SPEC §8: "answered within 1 s").
pub const DEADLINE: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Pending {
    reply: ReplyTo,
    /// Instances that received the request; unknown until PUBLISH answers.
    expected: Option<u64>,
    answers: u64,
    closed: u64,
    deadline: Instant,
}

impl Pending {
    fn complete(&self) -> bool {
        self.expected.is_some_and(|n| self.answers >= n)
    }
}

/// A finished survey: who asked, and the sum of what the fleet answered.
#[derive(Debug, PartialEq, Eq)]
pub struct Done {
    pub reply: ReplyTo,
    pub closed: u64,
}

#[derive(Debug, Default)]
pub struct Surveys {
    next_id: u64,
    pending: HashMap<u64, Pending>,
}

impl Surveys {
    /// Starts a survey for `reply`; returns its id, to put in the request.
    pub fn start(&mut self, reply: ReplyTo, now: Instant) -> u64 {
        self.next_id += 1;
        let pending = Pending { reply, expected: None, answers: 0, closed: 0, deadline: now + DEADLINE };
        self.pending.insert(self.next_id, pending);
        self.next_id
    }

    /// PUBLISH said `receivers` instances got request `id`.
    pub fn published(&mut self, id: u64, receivers: u64) -> Option<Done> {
        self.pending.get_mut(&id)?.expected = Some(receivers);
        self.finish_if_complete(id)
    }

    /// An instance answered request `id`.
    pub fn answered(&mut self, id: u64, closed: u64) -> Option<Done> {
        let pending = self.pending.get_mut(&id)?;
        pending.answers += 1;
        pending.closed = pending.closed.saturating_add(closed);
        self.finish_if_complete(id)
    }

    /// The request could not be sent: answer with nothing closed.
    pub fn failed(&mut self, id: u64) -> Option<Done> {
        self.pending.remove(&id).map(|p| Done { reply: p.reply, closed: p.closed })
    }

    /// Surveys past their deadline, with what they have.
    pub fn expire(&mut self, now: Instant) -> Vec<Done> {
        let due: Vec<u64> = self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(id, _)| *id).collect();
        due.into_iter().filter_map(|id| self.failed(id)).collect()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    fn finish_if_complete(&mut self, id: u64) -> Option<Done> {
        if self.pending.get(&id)?.complete() { self.failed(id) } else { None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ConnRef;

    fn asker() -> ReplyTo {
        ReplyTo { loop_id: 1, conn: ConnRef { key: 2, id: 3 } }
    }

    #[test]
    fn completes_when_every_receiver_answered_in_any_order() {
        let now = Instant::now();
        let mut s = Surveys::default();
        let id = s.start(asker(), now);
        assert_eq!(s.answered(id, 2), None, "the fleet's size is not known yet");
        assert_eq!(s.published(id, 3), None);
        assert_eq!(s.answered(id, 0), None);
        assert_eq!(s.answered(id, 5), Some(Done { reply: asker(), closed: 7 }));
        assert_eq!(s.answered(id, 1), None, "a late answer to a finished survey is ignored");
        assert!(s.next_deadline().is_none());
    }

    #[test]
    fn the_deadline_answers_with_what_came() {
        let now = Instant::now();
        let mut s = Surveys::default();
        let id = s.start(asker(), now);
        s.published(id, 3);
        s.answered(id, 4);
        assert!(s.expire(now + DEADLINE / 2).is_empty());
        assert_eq!(s.expire(now + DEADLINE), vec![Done { reply: asker(), closed: 4 }]);
    }

    #[test]
    fn nobody_listening_completes_at_once() {
        let mut s = Surveys::default();
        let id = s.start(asker(), Instant::now());
        assert_eq!(s.published(id, 0), Some(Done { reply: asker(), closed: 0 }));
    }
}
