//! A connection's ordered output: shared frames, written with writev.
//!
//! The queue holds pointers (`Arc<Frame>`), so 256 queued notifications cost 256 pointers,
//! not 256 copies; it starts empty and grows on demand. Notifications count against the
//! notification bound (HERALD_SEND_QUEUE). Every frame, replies included, counts in
//! [`SendQueue::bytes`]: the event loop stops reading a peer whose output is over its byte
//! bound, so what a peer sends can never make herald queue more than that for it.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use crate::frame::{Frame, SharedFrame};

/// Most frames handed to one writev call.
const IOV_BATCH: usize = 64;

/// The queue was full: the connection is a slow consumer.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

/// How a flush ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Everything was written.
    Empty,
    /// The socket would block; wait for WRITABLE.
    WouldBlock,
    /// The per-wake-up byte budget ran out; come back after other connections had a turn.
    Budget,
}

/// A connection's output. Nothing at all while it is empty, which is most of the time: an
/// idle connection pays one pointer, and its frames and counters exist only while it has
/// something to write.
#[derive(Debug, Default)]
pub struct SendQueue {
    /// Invariant: `None` if and only if nothing is queued.
    pending: Option<Box<Pending>>,
}

impl SendQueue {
    pub fn is_empty(&self) -> bool {
        self.pending.is_none()
    }

    pub fn len(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.frames.len())
    }

    /// Bytes queued and not yet written.
    pub fn bytes(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.unsent as usize)
    }

    fn pending(&mut self) -> &mut Pending {
        self.pending.get_or_insert_with(Box::default)
    }

    /// Drops the pending state once it holds nothing.
    fn settle(&mut self) {
        if self.pending.as_ref().is_some_and(|p| p.frames.is_empty()) {
            self.pending = None;
        }
    }

    /// Queues a notification unless `limit` notifications are already waiting.
    pub fn push_notification(&mut self, frame: SharedFrame, limit: usize) -> Result<(), Full> {
        let result = self.pending().push_notification(frame, limit);
        self.settle();
        result
    }

    /// Queues a notification whose first `written` bytes the socket already took, on a queue
    /// that was empty (a write-through that the kernel cut short): the rest goes out first.
    pub fn push_partly_written(&mut self, frame: SharedFrame, written: usize) {
        debug_assert!(self.is_empty() && written < frame.bytes.len());
        let pending = self.pending();
        pending.notifications += 1;
        pending.push(frame);
        pending.head_written = written as u32;
        pending.unsent -= written as u32;
    }

    /// Queues a reply (control frame or HTTP response), outside the notification bound.
    pub fn push_reply(&mut self, frame: SharedFrame) {
        self.pending().push(frame);
    }

    /// Queues a Pong, replacing a Pong still waiting at the tail: RFC 6455 §5.5.3 lets an
    /// endpoint answer only the most recent of several Pings, so a Ping flood costs one frame.
    pub fn push_pong(&mut self, pong: SharedFrame) {
        self.pending().push_pong(pong);
    }

    /// Drops every frame not yet started (a partly written head stays, or the peer would see a
    /// torn frame).
    pub fn discard_unsent(&mut self) -> Discarded {
        let discarded = self.pending.as_mut().map(|p| p.discard_unsent()).unwrap_or_default();
        self.settle();
        discarded
    }

    /// Writes queued frames until the queue is empty, the socket would block, or `budget`
    /// bytes went out. `on_sent` sees each frame once its last byte is written.
    pub fn flush<W: Write>(&mut self, sink: &mut W, budget: usize, on_sent: impl FnMut(&Frame)) -> io::Result<Flushed> {
        let Some(pending) = self.pending.as_mut() else { return Ok(Flushed::Empty) };
        let result = pending.flush(sink, budget, on_sent);
        self.settle();
        result
    }
}

/// What a non-empty queue holds.
#[derive(Debug, Default)]
struct Pending {
    frames: VecDeque<SharedFrame>,
    /// Bytes of `frames[0]` already written. Invariant: zero if `frames` is empty.
    /// (u32: frames are bounded far below 4 GiB, and idle connections are many.)
    head_written: u32,
    /// Notifications in `frames` (replies are not counted).
    notifications: u32,
    /// Bytes in `frames` not yet written. Invariant: zero if `frames` is empty.
    unsent: u32,
}

/// What [`SendQueue::discard_unsent`] dropped.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Discarded {
    pub notifications: usize,
    pub bytes: usize,
}

impl Pending {
    fn push(&mut self, frame: SharedFrame) {
        self.unsent = self.unsent.saturating_add(frame.bytes.len().try_into().unwrap_or(u32::MAX));
        self.frames.push_back(frame);
    }

    fn push_notification(&mut self, frame: SharedFrame, limit: usize) -> Result<(), Full> {
        if self.notifications as usize >= limit {
            return Err(Full);
        }
        self.notifications += 1;
        self.push(frame);
        Ok(())
    }

    fn push_pong(&mut self, pong: SharedFrame) {
        let tail_unstarted = self.frames.len() > 1 || self.head_written == 0;
        if let Some(tail) = self.frames.back_mut().filter(|t| tail_unstarted && is_pong(t)) {
            let old = tail.bytes.len() as u32;
            *tail = pong;
            self.unsent = self.unsent - old + tail.bytes.len() as u32;
            return;
        }
        self.push(pong);
    }

    fn discard_unsent(&mut self) -> Discarded {
        let keep = usize::from(self.head_written > 0);
        let mut discarded = Discarded::default();
        for frame in self.frames.drain(keep..) {
            discarded.bytes += frame.bytes.len();
            discarded.notifications += usize::from(frame.born.is_some());
        }
        self.notifications -= discarded.notifications as u32;
        self.unsent = self.frames.front().map_or(0, |head| (head.bytes.len() as u32) - self.head_written);
        discarded
    }

    fn flush<W: Write>(&mut self, sink: &mut W, budget: usize, mut on_sent: impl FnMut(&Frame)) -> io::Result<Flushed> {
        let mut written_total = 0;
        while !self.frames.is_empty() {
            if written_total >= budget {
                return Ok(Flushed::Budget);
            }
            let mut slices = [IoSlice::new(&[]); IOV_BATCH];
            let mut count = 0;
            for (i, frame) in self.frames.iter().take(IOV_BATCH).enumerate() {
                let start = if i == 0 { self.head_written as usize } else { 0 };
                slices[i] = IoSlice::new(&frame.bytes[start..]);
                count += 1;
            }
            // One frame (the common case: a notification to an idle connection) goes out with
            // write(2): writev's iovec import is measurable kernel time per delivery.
            let result = if count == 1 { sink.write(&slices[0]) } else { sink.write_vectored(&slices[..count]) };
            let mut written = match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flushed::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            written_total += written;
            self.unsent -= written as u32;
            while written > 0 {
                let Some(head) = self.frames.front() else { break };
                let left = head.bytes.len() - self.head_written as usize;
                if written < left {
                    self.head_written += written as u32;
                    break;
                }
                written -= left;
                self.head_written = 0;
                if let Some(done) = self.frames.pop_front() {
                    if done.born.is_some() {
                        self.notifications -= 1;
                    }
                    on_sent(&done);
                }
            }
        }
        Ok(Flushed::Empty)
    }
}

fn is_pong(frame: &Frame) -> bool {
    frame.born.is_none() && frame.bytes.first() == Some(&(0x80 | 0xA))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;
    use std::time::Instant;

    /// A sink that accepts at most `chunk` bytes per call and then `WouldBlock` after `cap`.
    struct Trickle {
        out: Vec<u8>,
        chunk: usize,
        cap: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let room = self.cap - self.out.len();
            if room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.chunk - n).min(room - n);
                self.out.extend_from_slice(&b[..take]);
                n += take;
                if n == self.chunk.min(room) {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_resume_mid_frame_and_count_completions() {
        let mut queue = SendQueue::default();
        let a = frame::notification(b"{\"type\":\"a\"}", Instant::now());
        let b = frame::notification(b"{\"type\":\"bb\"}", Instant::now());
        queue.push_notification(a.clone(), 8).unwrap();
        queue.push_notification(b.clone(), 8).unwrap();
        let mut sink = Trickle { out: Vec::new(), chunk: 5, cap: 9 };
        let mut sent = 0;
        assert_eq!(queue.flush(&mut sink, 1 << 20, |_| sent += 1).unwrap(), Flushed::WouldBlock);
        assert_eq!(sent, 0);
        sink.cap = 1000;
        assert_eq!(queue.flush(&mut sink, 1 << 20, |_| sent += 1).unwrap(), Flushed::Empty);
        assert_eq!(sent, 2);
        assert_eq!(sink.out, [&a.bytes[..], &b.bytes[..]].concat());
    }

    #[test]
    fn the_bound_counts_notifications_only_and_discard_keeps_a_torn_head() {
        let mut queue = SendQueue::default();
        let n = frame::notification(b"{\"type\":\"a\"}", Instant::now());
        queue.push_notification(n.clone(), 2).unwrap();
        queue.push_reply(frame::pong(b""));
        queue.push_notification(n.clone(), 2).unwrap();
        assert_eq!(queue.push_notification(n.clone(), 2), Err(Full));
        let mut sink = Trickle { out: Vec::new(), chunk: 3, cap: 3 };
        let _ = queue.flush(&mut sink, 1 << 20, |_| {});
        assert_eq!(queue.discard_unsent().notifications, 1);
        assert_eq!(queue.len(), 1);
        assert_eq!(queue.bytes(), n.bytes.len() - 3);
        queue.push_notification(n, 2).unwrap();
    }

    #[test]
    fn a_partly_written_frame_resumes_where_the_socket_stopped() {
        let mut queue = SendQueue::default();
        let n = frame::notification(b"{\"type\":\"abc\"}", Instant::now());
        queue.push_partly_written(n.clone(), 4);
        assert_eq!(queue.bytes(), n.bytes.len() - 4);
        // A torn head stays when the rest is discarded: the peer already has its start.
        assert_eq!(queue.discard_unsent().notifications, 0);
        let mut sink = Trickle { out: Vec::new(), chunk: 100, cap: 100 };
        let mut sent = 0;
        assert_eq!(queue.flush(&mut sink, 1 << 20, |_| sent += 1).unwrap(), Flushed::Empty);
        assert_eq!((sent, &sink.out[..]), (1, &n.bytes[4..]));
        assert!(queue.is_empty());
    }

    #[test]
    fn budget_stops_a_flush_early() {
        let mut queue = SendQueue::default();
        for _ in 0..10 {
            queue.push_notification(frame::notification(&[b'x'; 100], Instant::now()), 100).unwrap();
        }
        let mut sink = Trickle { out: Vec::new(), chunk: 150, cap: 1 << 20 };
        assert_eq!(queue.flush(&mut sink, 300, |_| {}).unwrap(), Flushed::Budget);
        assert!(sink.out.len() >= 300 && sink.out.len() < 1020);
    }

    #[test]
    fn bytes_follow_pushes_and_writes() {
        let mut queue = SendQueue::default();
        let n = frame::notification(b"{\"type\":\"a\"}", Instant::now());
        queue.push_notification(n.clone(), 8).unwrap();
        queue.push_reply(frame::reply_text(b"pong"));
        assert_eq!(queue.bytes(), n.bytes.len() + 6);
        let mut sink = Trickle { out: Vec::new(), chunk: 5, cap: 5 };
        let _ = queue.flush(&mut sink, 1 << 20, |_| {});
        assert_eq!(queue.bytes(), n.bytes.len() + 6 - 5);
        sink.cap = 1000;
        assert_eq!(queue.flush(&mut sink, 1 << 20, |_| {}).unwrap(), Flushed::Empty);
        assert_eq!(queue.bytes(), 0);
    }

    #[test]
    fn only_the_latest_pong_waits() {
        let mut queue = SendQueue::default();
        queue.push_pong(frame::pong(b"1"));
        queue.push_pong(frame::pong(b"22"));
        assert_eq!(queue.len(), 1, "an unsent pong is replaced");
        assert_eq!(queue.bytes(), 4);
        queue.push_reply(frame::reply_text(b"x"));
        queue.push_pong(frame::pong(b"3"));
        assert_eq!(queue.len(), 3, "a pong behind other output is queued");
        // A pong that is partly written is never replaced.
        let mut single = SendQueue::default();
        single.push_pong(frame::pong(b"abc"));
        let mut sink = Trickle { out: Vec::new(), chunk: 2, cap: 2 };
        let _ = single.flush(&mut sink, 1 << 20, |_| {});
        single.push_pong(frame::pong(b"d"));
        assert_eq!(single.len(), 2);
        sink.cap = 100;
        let _ = single.flush(&mut sink, 1 << 20, |_| {});
        assert_eq!(sink.out, [&frame::pong(b"abc").bytes[..], &frame::pong(b"d").bytes[..]].concat());
    }
}
