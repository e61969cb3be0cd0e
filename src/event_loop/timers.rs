//! A hashed timer wheel with coarse ticks.
//!
//! Each connection has at most one live entry, at the tick of its next deadline (ping, idle,
//! expiry, handshake, close linger). Advancing the wheel touches only the slots that came
//! due, so the cost per tick follows the connections that have something to do, never the
//! number that are merely open. Entries are never removed early: an entry whose connection
//! has since moved its deadline is recognised as stale when it fires and ignored.

use crate::tick::Tick;

/// Slots in the wheel; deadlines further out are clamped and re-armed when they fire.
const SLOTS: usize = 4096;

/// An entry: slab key and connection id.
pub type Entry = (u32, u32);

pub struct TimerWheel {
    slots: Vec<Vec<Entry>>,
    /// First tick not yet expired.
    next: Tick,
    len: usize,
}

impl Default for TimerWheel {
    fn default() -> Self {
        TimerWheel { slots: (0..SLOTS).map(|_| Vec::new()).collect(), next: 0, len: 0 }
    }
}

impl TimerWheel {
    /// Schedules `entry` at `tick` (clamped into the wheel's window); returns the tick used.
    pub fn insert(&mut self, tick: Tick, entry: Entry) -> Tick {
        let tick = tick.clamp(self.next, self.next.saturating_add(SLOTS as Tick - 1));
        self.slots[(tick % SLOTS as Tick) as usize].push(entry);
        self.len += 1;
        tick
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removes `entry` filed at `tick` (a connection that closed or moved its deadline), so
    /// closed connections leave nothing behind under churn.
    pub fn cancel(&mut self, tick: Tick, entry: Entry) {
        if tick < self.next || tick >= self.next.saturating_add(SLOTS as Tick) {
            return;
        }
        let slot = &mut self.slots[(tick % SLOTS as Tick) as usize];
        if let Some(position) = slot.iter().position(|e| *e == entry) {
            slot.swap_remove(position);
            self.len -= 1;
            if slot.is_empty() {
                // Churn spreads short-lived entries over the whole wheel; empty slots hold
                // no memory.
                *slot = Vec::new();
            }
        }
    }

    /// Moves every entry due at or before `now` into `due`, with the tick it was filed at.
    pub fn expire(&mut self, now: Tick, due: &mut Vec<(Entry, Tick)>) {
        // After a long stall, one lap of the wheel visits every slot.
        let last = now.min(self.next.saturating_add(SLOTS as Tick - 1));
        while self.next <= last {
            // Taken, not drained: a slot is next used a whole lap later, and keeping every
            // slot's peak capacity would hold memory long after a burst of connections.
            let slot = std::mem::take(&mut self.slots[(self.next % SLOTS as Tick) as usize]);
            self.len -= slot.len();
            due.extend(slot.into_iter().map(|e| (e, self.next)));
            if self.next == Tick::MAX {
                return;
            }
            self.next += 1;
        }
        self.next = self.next.max(now.saturating_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_fire_at_their_tick_and_not_before() {
        let mut wheel = TimerWheel::default();
        assert_eq!(wheel.insert(5, (1, 1)), 5);
        assert_eq!(wheel.insert(3, (2, 2)), 3);
        let mut due = Vec::new();
        wheel.expire(2, &mut due);
        assert!(due.is_empty());
        wheel.expire(4, &mut due);
        assert_eq!(due, vec![((2, 2), 3)]);
        due.clear();
        wheel.expire(10, &mut due);
        assert_eq!(due, vec![((1, 1), 5)]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn far_and_past_deadlines_are_clamped_into_the_window() {
        let mut wheel = TimerWheel::default();
        let mut due = Vec::new();
        wheel.expire(100, &mut due);
        assert_eq!(wheel.insert(50, (1, 1)), 101);
        let far = wheel.insert(1_000_000, (2, 2));
        assert_eq!(far, 101 + SLOTS as Tick - 1);
        wheel.expire(far, &mut due);
        assert_eq!(due.len(), 2);
    }

    #[test]
    fn a_long_stall_still_expires_everything() {
        let mut wheel = TimerWheel::default();
        for t in 0..100 {
            wheel.insert(t * 7, (t, 0));
        }
        let mut due = Vec::new();
        wheel.expire(1_000_000, &mut due);
        assert_eq!(due.len(), 100);
        assert!(wheel.is_empty());
    }

    #[test]
    fn cancelled_entries_never_fire() {
        let mut wheel = TimerWheel::default();
        wheel.insert(5, (1, 1));
        wheel.insert(5, (2, 2));
        wheel.cancel(5, (1, 1));
        wheel.cancel(5, (9, 9));
        let mut due = Vec::new();
        wheel.expire(10, &mut due);
        assert_eq!(due, vec![((2, 2), 5)]);
        assert!(wheel.is_empty());
    }
}
