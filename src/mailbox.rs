//! The way into a thread that waits in `mio::Poll` (an event loop, the Redis publisher): a
//! bounded channel and a `mio::Waker`, with wake-ups coalesced so a burst of commands costs one
//! wake syscall.
//!
//! Overload policy: an inbox holds at most [`INBOX_CAPACITY`] commands. Threads that may wait
//! (the Redis reader, the publisher, the signal handler) block for a bounded time, so a burst
//! backs up into Redis instead of into herald's memory. Event loops never wait on each other:
//! a loop whose send finds another loop's inbox full drops that delivery and counts it
//! (`messages.dropped_overload`). Memory is never unbounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TrySendError};
use mio::{Poll, Token, Waker};

use crate::frame::SharedFrame;
use crate::history::Page;
use crate::ids::{Answer, ConnRef, DeliverTo, Exclusion, ReplyTo, Target};

/// Commands one loop's inbox holds before senders wait or drop.
pub const INBOX_CAPACITY: usize = 16 * 1024;

/// The token a loop's waker fires on.
pub const WAKER: Token = Token(usize::MAX);

/// Work sent to a loop.
#[derive(Debug)]
pub enum LoopCmd {
    /// Queue `frame` to every connection here that holds one of `to`, but not to `exclusion`.
    Deliver { to: DeliverTo, frame: SharedFrame, exclusion: Option<Box<Exclusion>> },
    /// Redis confirmed a subscription `conn` waited for (or gave up on Redis for now): its
    /// output may flow.
    SubscriptionReady { conn: ConnRef },
    /// A page of a stream a connection here is replaying; `None`: it could not be read.
    ReplayPage { conn: ConnRef, target: Target, page: Option<Box<Page>> },
    /// The answer to a request parked on this loop.
    Answer { conn: ConnRef, answer: Answer },
    /// Close every connection of `user` here, add the count to the tally, and let the last
    /// loop to finish answer the request.
    Disconnect { user: Arc<str>, tally: Arc<DisconnectTally> },
    /// Close every WebSocket with 1001, spread evenly until `until`, so clients do not all
    /// reconnect at once; keep serving HTTP meanwhile (`/ready` says 503).
    Drain { until: std::time::Instant },
    /// Stop accepting, close every connection with 1001 after flushing, then exit.
    Shutdown,
}

/// Counts connections closed by `/api/disconnect` across loops.
#[derive(Debug)]
pub struct DisconnectTally {
    pub remaining: AtomicUsize,
    pub closed: AtomicU64,
    pub reply: TallyReply,
}

/// Who hears a disconnect's total.
#[derive(Debug, Clone)]
pub enum TallyReply {
    /// The request parked on a loop of this instance.
    Request(ReplyTo),
    /// Another instance's (or this one's) fleet-wide survey: the fleet thread answers it.
    Fleet { survey: u64, asker: Arc<str> },
}

impl DisconnectTally {
    pub fn new(loops: usize, reply: TallyReply) -> DisconnectTally {
        DisconnectTally { remaining: loops.into(), closed: 0.into(), reply }
    }

    /// Adds one loop's count; returns the total when it was the last loop to report.
    pub fn add(&self, closed: u64) -> Option<u64> {
        self.closed.fetch_add(closed, Ordering::AcqRel);
        (self.remaining.fetch_sub(1, Ordering::AcqRel) == 1).then(|| self.closed.load(Ordering::Acquire))
    }
}

/// The inbox was full: the command was not delivered.
#[derive(Debug, PartialEq, Eq)]
pub struct Overloaded;

/// The sending side of a mailbox.
pub struct Mailbox<T> {
    tx: Sender<T>,
    waker: Waker,
    /// Set while a wake-up is outstanding; the owner clears it before draining its inbox.
    wake_pending: AtomicBool,
}

/// The sending side of a loop.
pub type LoopHandle = Mailbox<LoopCmd>;

impl<T> Mailbox<T> {
    /// A mailbox of `capacity` waking `poll` with `token`; the receiver goes to the owner.
    pub fn new(poll: &Poll, token: Token, capacity: usize) -> std::io::Result<(Mailbox<T>, Receiver<T>)> {
        let waker = Waker::new(poll.registry(), token)?;
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        Ok((Mailbox { tx, waker, wake_pending: AtomicBool::new(false) }, rx))
    }

    /// A mailbox without a bound, for reports that must not be lost and whose number is
    /// bounded by something else (one per connection join or leave, drained as they come).
    pub fn unbounded(poll: &Poll, token: Token) -> std::io::Result<(Mailbox<T>, Receiver<T>)> {
        let waker = Waker::new(poll.registry(), token)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        Ok((Mailbox { tx, waker, wake_pending: AtomicBool::new(false) }, rx))
    }

    /// Sends without waiting (from an event loop).
    pub fn try_send(&self, cmd: T) -> Result<(), Overloaded> {
        match self.tx.try_send(cmd) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(Overloaded),
            // The loop has exited (shutdown): nothing there to deliver to.
            Err(TrySendError::Disconnected(_)) => Ok(()),
        }
    }

    /// Sends, waiting at most `patience` for room (from threads that may wait).
    pub fn send_waiting(&self, cmd: T, patience: Duration) -> Result<(), Overloaded> {
        self.wake_if_backlogged();
        match self.tx.send_timeout(cmd, patience) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(SendTimeoutError::Timeout(_)) => Err(Overloaded),
            Err(SendTimeoutError::Disconnected(_)) => Ok(()),
        }
    }

    /// Commands waiting in the inbox.
    pub fn backlog(&self) -> usize {
        self.tx.len()
    }

    fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            let _ = self.waker.wake();
        }
    }

    /// A full inbox must have its loop awake, or a waiting sender waits for nothing.
    fn wake_if_backlogged(&self) {
        if self.tx.is_full() {
            let _ = self.waker.wake();
        }
    }

    /// Wakes the owner without a command: it has something else to look at (a Redis
    /// thread: a new cluster slot map).
    pub fn nudge(&self) {
        let _ = self.waker.wake();
    }

    /// Called by the loop before it drains its inbox: the next command wakes it again.
    pub fn clear_wake(&self) {
        self.wake_pending.store(false, Ordering::Release);
    }
}

/// Every loop's handle, shared by whoever routes.
pub type Loops = Arc<[LoopHandle]>;

/// Creates a loop's poller and mailbox; the poller and receiver move into the loop thread.
pub fn prepare() -> std::io::Result<(Poll, LoopHandle, Receiver<LoopCmd>)> {
    let poll = Poll::new()?;
    let (handle, rx) = Mailbox::new(&poll, WAKER, INBOX_CAPACITY)?;
    Ok((poll, handle, rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_stay_small() {
        // INBOX_CAPACITY slots are allocated per loop up front.
        assert!(size_of::<LoopCmd>() <= 48, "LoopCmd is {} bytes", size_of::<LoopCmd>());
    }

    #[test]
    fn a_full_inbox_refuses_instead_of_growing() {
        let (_poll, handle, rx) = prepare().unwrap();
        for _ in 0..INBOX_CAPACITY {
            handle.try_send(LoopCmd::Shutdown).unwrap();
        }
        assert_eq!(handle.try_send(LoopCmd::Shutdown), Err(Overloaded));
        assert_eq!(handle.send_waiting(LoopCmd::Shutdown, Duration::from_millis(10)), Err(Overloaded));
        rx.try_recv().unwrap();
        assert_eq!(handle.try_send(LoopCmd::Shutdown), Ok(()));
    }

    #[test]
    fn the_last_loop_to_report_gets_the_total() {
        let reply = TallyReply::Request(ReplyTo { loop_id: 0, conn: ConnRef { key: 1, id: 1 } });
        let tally = DisconnectTally::new(3, reply);
        assert_eq!(tally.add(2), None);
        assert_eq!(tally.add(0), None);
        assert_eq!(tally.add(5), Some(7));
    }
}
