//! Coarse time for connection deadlines: 100 ms ticks counted from a loop's start. Protocol
//! logic takes a tick as `now` instead of reading a clock.

use std::time::{Duration, Instant};

/// Ticks since a loop started.
pub type Tick = u64;

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
        (at.saturating_duration_since(self.start).as_millis() / TICK.as_millis()) as Tick
    }

    /// When `tick` begins.
    pub fn instant_of(&self, tick: Tick) -> Instant {
        let offset = TICK.saturating_mul(u32::try_from(tick).unwrap_or(u32::MAX));
        self.start.checked_add(offset).unwrap_or(self.start)
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
        assert_eq!(ticks(Duration::from_secs(u64::MAX / 1000)), (u64::MAX / 1000) * 10);
    }
}
