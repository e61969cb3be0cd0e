//! A connection's ordered output: shared frames, written with writev.
//!
//! The queue holds pointers (`Arc<Frame>`), so 256 queued notifications cost 256 pointers,
//! not 256 copies; it starts empty and grows on demand. Notifications count against the
//! bound; replies (pong, close, HTTP) do not, since each answers something the client sent
//! and the inbound side bounds those.

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

#[derive(Debug, Default)]
pub struct SendQueue {
    frames: VecDeque<SharedFrame>,
    /// Bytes of `frames[0]` already written. Invariant: zero if `frames` is empty.
    /// (u32: frames are bounded far below 4 GiB, and idle connections are many.)
    head_written: u32,
    /// Notifications in `frames` (replies are not counted).
    notifications: u32,
}

impl SendQueue {
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Queues a notification unless `limit` notifications are already waiting.
    pub fn push_notification(&mut self, frame: SharedFrame, limit: usize) -> Result<(), Full> {
        if self.notifications as usize >= limit {
            return Err(Full);
        }
        self.notifications += 1;
        self.frames.push_back(frame);
        Ok(())
    }

    /// Queues a reply (control frame or HTTP response), outside the notification bound.
    pub fn push_reply(&mut self, frame: SharedFrame) {
        self.frames.push_back(frame);
    }

    /// Drops every frame not yet started (a partly written head stays, or the peer would see a
    /// torn frame). Returns how many notifications were dropped.
    pub fn discard_unsent(&mut self) -> usize {
        let keep = usize::from(self.head_written > 0);
        let dropped = self.frames.drain(keep..).filter(|f| f.born.is_some()).count();
        self.notifications -= dropped as u32;
        if self.frames.capacity() > 16 {
            self.frames.shrink_to_fit();
        }
        dropped
    }

    /// Writes queued frames until the queue is empty, the socket would block, or `budget`
    /// bytes went out. `on_sent` sees each frame once its last byte is written.
    pub fn flush<W: Write>(
        &mut self,
        sink: &mut W,
        budget: usize,
        mut on_sent: impl FnMut(&Frame),
    ) -> io::Result<Flushed> {
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
            let mut written = match sink.write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flushed::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            written_total += written;
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
        // A burst can leave a large ring behind; idle connections should cost little.
        if self.frames.capacity() > 32 {
            self.frames.shrink_to_fit();
        }
        Ok(Flushed::Empty)
    }
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
        assert_eq!(queue.discard_unsent(), 1);
        assert_eq!(queue.len(), 1);
        queue.push_notification(n, 2).unwrap();
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
}
