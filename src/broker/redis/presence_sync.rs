//! What this instance has told Redis about its users' connections, and what it must tell
//! next. The loops only say "this user's count changed"; the route table holds the count
//! itself, so a burst of opens and closes of one user costs one update, and a user who came
//! and went between two flushes costs none.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// One user's count to write to its presence hash.
#[derive(Debug, PartialEq, Eq)]
pub struct Update {
    pub user: Arc<str>,
    pub count: u32,
    /// The user was not listed in this instance's members set: add it first (the sweeper
    /// finds a dead instance's users there).
    pub join_members: bool,
    /// The count is 0: take the user out of the members set once written.
    pub leave_members: bool,
}

/// A count Redis may or may not have (its write failed): whatever the route table says next
/// differs from it, and is written.
const UNKNOWN: u32 = u32::MAX;

#[derive(Debug, Default)]
pub struct PresenceSync {
    dirty: HashSet<Arc<str>>,
    /// The count last sent for each user this instance holds (absent = 0).
    reported: HashMap<Arc<str>, u32>,
}

impl PresenceSync {
    pub fn touch(&mut self, user: Arc<str>) {
        self.dirty.insert(user);
    }

    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Takes up to `max` users whose count differs from what was sent; `count_of` reads the
    /// route table.
    pub fn take_updates(&mut self, max: usize, count_of: impl Fn(&str) -> u32) -> Vec<Update> {
        let users: Vec<Arc<str>> = self.dirty.iter().take(max).cloned().collect();
        let mut updates = Vec::with_capacity(users.len());
        for user in users {
            self.dirty.remove(&user);
            let count = count_of(&user);
            let before = self.reported.get(&user).copied().unwrap_or(0);
            if count == before {
                continue;
            }
            if count == 0 {
                self.reported.remove(&user);
            } else {
                self.reported.insert(user.clone(), count);
            }
            // After a failed write the members set may or may not list the user: adding and
            // removing again is harmless.
            let join_members = count > 0 && (before == 0 || before == UNKNOWN);
            updates.push(Update { user, count, join_members, leave_members: count == 0 });
        }
        updates
    }

    /// The write of `user`'s count failed: Redis may hold the old count or the new one, so
    /// the next update is sent whatever it is. The caller touches the user when it wants the
    /// write tried again.
    pub fn forget(&mut self, user: &Arc<str>) {
        self.reported.insert(user.clone(), UNKNOWN);
    }

    /// Redis lost what it knew (a new connection: it may have restarted, or swept this
    /// instance as dead while it was away, or a replica took over without the last writes):
    /// send every user again, a count whose write failed included.
    pub fn resend_all(&mut self) {
        for (user, count) in self.reported.iter_mut() {
            *count = UNKNOWN;
            self.dirty.insert(user.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changes_are_sent_and_membership_follows_zero() {
        let mut sync = PresenceSync::default();
        let counts: HashMap<&str, u32> = [("a", 2), ("b", 0)].into();
        let count_of = |u: &str| counts.get(u).copied().unwrap_or(0);
        sync.touch("a".into());
        sync.touch("b".into());
        let updates = sync.take_updates(10, count_of);
        assert_eq!(updates, vec![Update { user: "a".into(), count: 2, join_members: true, leave_members: false }]);
        assert!(!sync.has_dirty());
        sync.touch("a".into());
        assert!(sync.take_updates(10, count_of).is_empty(), "unchanged");
        sync.touch("a".into());
        let updates = sync.take_updates(10, |_| 0);
        assert_eq!(updates, vec![Update { user: "a".into(), count: 0, join_members: false, leave_members: true }]);
        assert!(sync.reported.is_empty());
    }

    #[test]
    fn resend_all_sends_every_held_user_again() {
        let mut sync = PresenceSync::default();
        sync.touch("a".into());
        sync.take_updates(10, |_| 1);
        sync.resend_all();
        let updates = sync.take_updates(10, |_| 1);
        assert_eq!(updates, vec![Update { user: "a".into(), count: 1, join_members: true, leave_members: false }]);
    }

    #[test]
    fn a_failed_write_is_sent_again_even_when_the_count_is_back_where_it_was() {
        let mut sync = PresenceSync::default();
        sync.touch("a".into());
        sync.take_updates(10, |_| 1);
        // The write of 0 failed: 0 is sent again.
        sync.touch("a".into());
        assert_eq!(sync.take_updates(10, |_| 0).len(), 1);
        sync.forget(&"a".into());
        sync.touch("a".into());
        let updates = sync.take_updates(10, |_| 0);
        assert_eq!(updates, vec![Update { user: "a".into(), count: 0, join_members: false, leave_members: true }]);
        // The write of 2 failed: 2 is sent again, the members set told again.
        sync.touch("a".into());
        sync.take_updates(10, |_| 2);
        sync.forget(&"a".into());
        sync.touch("a".into());
        let updates = sync.take_updates(10, |_| 2);
        assert_eq!(updates, vec![Update { user: "a".into(), count: 2, join_members: true, leave_members: false }]);
        sync.touch("a".into());
        assert!(sync.take_updates(10, |_| 2).is_empty(), "written now");
        // A failed write of 0, then a new connection: 0 is still sent.
        sync.touch("a".into());
        sync.take_updates(10, |_| 0);
        sync.forget(&"a".into());
        sync.resend_all();
        assert_eq!(sync.take_updates(10, |_| 0).len(), 1);
    }

    #[test]
    fn updates_are_taken_in_bounded_slices() {
        let mut sync = PresenceSync::default();
        for i in 0..25 {
            sync.touch(i.to_string().into());
        }
        assert_eq!(sync.take_updates(10, |_| 1).len(), 10);
        assert_eq!(sync.take_updates(10, |_| 1).len(), 10);
        assert_eq!(sync.take_updates(10, |_| 1).len(), 5);
        assert!(!sync.has_dirty());
    }
}
