//! Coarse time for connection deadlines: 100 ms ticks counted from a loop's start. Protocol
//! logic takes a tick as `now` instead of reading a clock.

use std::time::{Duration, Instant};

/// Ticks since a loop started. 32 bits: 13 years of 100 ms ticks, and idle connections are
/// many; arithmetic on ticks saturates, so "never" stays never.
pub type Tick = u32;

/// Length of one tick.
pub const TICK: Duration = Duration::from_millis(100);

/// Converts instants to ticks since the loop started.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    pub fn new(start: Instant) -> Clock {
        Clock { start }
    }

    pub fn tick_at(&self, at: Instant) -> Tick {
        Tick::try_from(at.saturating_duration_since(self.start).as_millis() / TICK.as_millis()).unwrap_or(Tick::MAX)
    }

    /// When `tick` begins.
    pub fn instant_of(&self, tick: Tick) -> Instant {
        self.start.checked_add(TICK.saturating_mul(tick)).unwrap_or(self.start)
    }
}

/// Whole ticks in `d`, rounded up so a deadline never fires early. Saturates at
/// `Tick::MAX` (a `Duration` can hold 2^64 seconds, far more ticks than a `Tick` counts):
/// a truncating cast would turn a deadline centuries away into one that is already due.
pub fn ticks(d: Duration) -> Tick {
    // In nanoseconds: rounding down to milliseconds first could put a deadline up to a
    // millisecond early.
    Tick::try_from(d.as_nanos().div_ceil(TICK.as_nanos())).unwrap_or(Tick::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_round_up() {
        assert_eq!(ticks(Duration::from_millis(1)), 1);
        assert_eq!(ticks(Duration::from_millis(100)), 1);
        assert_eq!(ticks(Duration::from_millis(101)), 2);
        assert_eq!(ticks(Duration::from_nanos(100_000_001)), 2);
        assert_eq!(ticks(Duration::ZERO), 0);
    }

    #[test]
    fn ticks_saturate_instead_of_wrapping() {
        assert_eq!(ticks(Duration::MAX), Tick::MAX);
        assert_eq!(ticks(Duration::from_secs(i64::MAX as u64)), Tick::MAX);
        assert_eq!(ticks(Duration::from_secs(u64::from(Tick::MAX) / 10)), Tick::MAX - 5);
    }
}
