//! Client bytes → `FrameReader::feed` (in input-chosen read sizes) → `parse_client_message`
//! → the real `SendQueue`, flushed into an in-memory socket that accepts input-chosen amounts,
//! would-block, or is interrupted — the way the event loop drives a live connection.
//!
//! Layout: 4 config bytes (max message, notification bound, socket behaviour, flush budget),
//! then the client's byte stream. Read sizes and socket behaviour come from a generator
//! seeded by the config bytes.
//!
//! Invariants: no panics; the reader's buffering stays within its design bound (see
//! `BUFFER_BOUND`); text events are valid UTF-8 within the limit; events stop at a close;
//! the queue mirrors a model (order, notification bound, torn-head handling of
//! `discard_unsent`, Pongs coalesced at the tail, the unsent byte count, `on_sent` once per
//! frame in order); the socket receives exactly the queued frames' bytes, and every frame in
//! it is a well-formed server frame.
#![no_main]

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use herald::conn::inbound::{Flow, FrameReader, Inbound};
use herald::conn::send_queue::{Flushed, Full, SendQueue};
use herald::frame::{self, Frame, SharedFrame};
use herald::message::{self, ClientMessage, JsonScratch};
use herald_fuzz::{Bytes, decode_server_frames, strict};
use libfuzzer_sys::fuzz_target;

/// A socket that takes what the generator allows per call.
struct Socket {
    out: Vec<u8>,
    rng: u64,
    interrupted_once: bool,
}

impl Socket {
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let r = self.next();
        match r % 16 {
            0 => return Err(io::ErrorKind::WouldBlock.into()),
            1 if !self.interrupted_once => {
                self.interrupted_once = true;
                return Err(io::ErrorKind::Interrupted.into());
            }
            _ => {}
        }
        let mut room = match (r >> 8) % 4 {
            0 => 1 + (r >> 16) as usize % 7,
            1 => 1 + (r >> 16) as usize % 200,
            _ => usize::MAX,
        };
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(room);
            self.out.extend_from_slice(&b[..take]);
            n += take;
            room -= take;
            if room == 0 {
                break;
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The queue as the model sees it.
#[derive(Default)]
struct Model {
    frames: VecDeque<SharedFrame>,
    /// Bytes of every frame completely written, in order.
    completed: Vec<u8>,
}

impl Model {
    fn notifications(&self) -> usize {
        self.frames.iter().filter(|f| f.born.is_some()).count()
    }
}

struct Harness {
    queue: SendQueue,
    model: Model,
    socket: Socket,
    limit: usize,
    budget: usize,
}

impl Harness {
    fn reply(&mut self, frame: SharedFrame) {
        self.queue.push_reply(frame.clone());
        self.model.frames.push_back(frame);
        self.check_len();
    }

    /// A Pong replaces a Pong still waiting, untouched, at the tail (RFC 6455 §5.5.3).
    fn pong(&mut self, frame: SharedFrame) {
        self.queue.push_pong(frame.clone());
        let head_started = self.socket.out.len() > self.model.completed.len();
        let tail_untouched = self.model.frames.len() > 1 || !head_started;
        match self.model.frames.back_mut() {
            Some(tail) if tail_untouched && tail.born.is_none() && tail.bytes[0] == 0x8A => *tail = frame,
            _ => self.model.frames.push_back(frame),
        }
        self.check_len();
    }

    /// Returns false when the queue was full (slow consumer: the loop closes the connection).
    fn notify(&mut self, frame: SharedFrame) -> bool {
        let full = self.model.notifications() >= self.limit;
        match self.queue.push_notification(frame.clone(), self.limit) {
            Ok(()) => {
                assert!(!full, "queue took a notification over its bound of {}", self.limit);
                self.model.frames.push_back(frame);
                self.check_len();
                true
            }
            Err(Full) => {
                assert!(full, "queue refused a notification under its bound");
                let torn = self.socket.out.len() > self.model.completed.len();
                let keep = usize::from(torn);
                let dropped = self.model.frames.iter().skip(keep).filter(|f| f.born.is_some()).count();
                let dropped_bytes: usize = self.model.frames.iter().skip(keep).map(|f| f.bytes.len()).sum();
                let discarded = self.queue.discard_unsent();
                assert_eq!(discarded.notifications, dropped, "discard_unsent miscounted");
                assert_eq!(discarded.bytes, dropped_bytes, "discard_unsent miscounted bytes");
                self.model.frames.truncate(keep);
                self.check_len();
                self.reply(frame::close(1008, "slow consumer"));
                false
            }
        }
    }

    fn check_len(&self) {
        assert_eq!(self.queue.len(), self.model.frames.len());
        assert_eq!(self.queue.is_empty(), self.model.frames.is_empty());
        let head_written = self.socket.out.len() - self.model.completed.len();
        let unsent = self.model.frames.iter().map(|f| f.bytes.len()).sum::<usize>() - head_written;
        assert_eq!(self.queue.bytes(), unsent, "queued byte count drifted");
    }

    fn flush(&mut self, budget: usize) {
        let model = &mut self.model;
        let result = self.queue.flush(&mut self.socket, budget, |sent: &Frame| {
            let expected = model.frames.pop_front().expect("on_sent with nothing queued");
            assert!(std::ptr::eq(sent, Arc::as_ptr(&expected)), "frames completed out of order");
            model.completed.extend_from_slice(&expected.bytes);
        });
        let out = &self.socket.out;
        assert!(out.starts_with(&model.completed), "socket bytes differ from the completed frames");
        let in_head = out.len() - model.completed.len();
        match model.frames.front() {
            Some(head) => {
                assert!(in_head < head.bytes.len(), "head fully written but not completed");
                assert_eq!(out[model.completed.len()..], head.bytes[..in_head], "torn head bytes differ");
            }
            None => assert_eq!(in_head, 0, "bytes written past the queued frames"),
        }
        match result {
            Ok(Flushed::Empty) => assert!(model.frames.is_empty()),
            Ok(Flushed::WouldBlock) | Ok(Flushed::Budget) => {}
            Err(e) => panic!("flush failed: {e}"),
        }
        self.check_len();
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (config, stream) = data.split_at(4);
    let max_message = 16 + config[0] as usize * 4; // 16..=1036 (herald's minimum is 16)
    let limit = 1 + (config[1] % 8) as usize;
    let seed = u64::from_le_bytes([config[2], config[3], 1, 2, 3, 4, 5, 6]);
    let budget = 64 + (config[3] as usize) * 64;
    let mut chunks = Bytes::new(&config[..]);
    let mut h = Harness {
        queue: SendQueue::default(),
        model: Model::default(),
        socket: Socket { out: Vec::new(), rng: seed | 1, interrupted_once: false },
        limit,
        budget,
    };
    let mut reader = FrameReader::default();
    let mut scratch = JsonScratch::default();
    let notification = message::encode_notification(
        br#"{"type":"notification","payload":{"title":"hi"}}"#,
        512,
        &mut scratch,
        SystemTime::UNIX_EPOCH,
        Instant::now(),
    )
    .expect("the fixed notification is valid");
    // Partial frame (max_message + 14, kept to 4x before shrinking) + fragments (grown by
    // doubling up to the message limit). The module doc's "never more than max_message + 14"
    // holds for the partial frame's bytes alone; strict mode checks that literal bound.
    let design_bound = 4 * (max_message + 14) + 2 * max_message;
    let strict_bound = max_message + 14;

    let mut pos = 0;
    let mut closed = false;
    let mut round = 0usize;
    while pos < stream.len() && !closed {
        let size = match chunks.byte() % 4 {
            0 => 1 + chunks.below(3),
            1 => 1 + chunks.below(32),
            2 => 1 + chunks.below(2048),
            _ => stream.len(),
        };
        let end = (pos + size).min(stream.len());
        let mut read = stream[pos..end].to_vec();
        pos = end;
        let mut events = Vec::new();
        let result = reader.feed(&mut read, max_message, |event| {
            let stop = matches!(event, Inbound::Close(_));
            events.push(match event {
                Inbound::Text(t) => {
                    assert!(t.len() <= max_message, "text of {} bytes over the limit {max_message}", t.len());
                    Ok(t.to_owned())
                }
                Inbound::Ping(p) => {
                    assert!(p.len() <= 125);
                    Err(frame::pong(p))
                }
                Inbound::Pong => return Flow::Continue,
                Inbound::Close(code) => {
                    if let Some(c) = code {
                        assert!(matches!(c, 1000..=1003 | 1007..=1014 | 3000..=4999), "close code {c}");
                    }
                    Err(frame::close(code.unwrap_or(1000), ""))
                }
            });
            if stop { Flow::Stop } else { Flow::Continue }
        });
        let buffered = reader.buffered();
        assert!(buffered <= design_bound, "reader buffers {buffered} bytes (max message {max_message})");
        if strict() {
            assert!(buffered <= strict_bound, "reader buffers {buffered} > max+14 = {strict_bound}");
        }
        for event in events {
            match event {
                Ok(text) => match message::parse_client_message(&text, &mut scratch) {
                    ClientMessage::Ping(style) => h.reply(style.answer_frame()),
                    ClientMessage::Subscribe { topic, .. } | ClientMessage::Unsubscribe(topic) => {
                        let reply = serde_json::json!({ "type": "subscribed", "topic": topic }).to_string();
                        h.reply(frame::reply_text(reply.as_bytes()));
                    }
                    _ => {}
                },
                Err(control) if control.bytes[0] == 0x8A => h.pong(control),
                Err(control) => {
                    let is_close = control.bytes[0] == 0x88;
                    h.reply(control);
                    if is_close {
                        closed = true;
                    }
                }
            }
        }
        match result {
            Ok(Flow::Stop) => {
                assert!(closed, "reader stopped without a close");
            }
            Ok(Flow::Continue) => {}
            Err(violation) => {
                assert!(matches!(violation.code, 1002 | 1003 | 1007 | 1009), "violation {violation:?}");
                h.reply(frame::close(violation.code, violation.reason));
                closed = true;
            }
        }
        if !closed && round % 2 == 0 && !h.notify(notification.clone()) {
            closed = true;
        }
        round += 1;
        let budget = h.budget;
        h.flush(budget);
    }
    // Drain: the socket eventually takes everything.
    for _ in 0..10_000 {
        if h.queue.is_empty() {
            break;
        }
        h.flush(usize::MAX);
    }
    assert!(h.queue.is_empty(), "queue never drained");
    let (frames, tail) = decode_server_frames(&h.socket.out);
    assert_eq!(tail, 0, "output ends inside a frame");
    for f in &frames {
        if f.first_byte & 0x0F == 0x1 {
            assert!(std::str::from_utf8(f.payload).is_ok(), "text frame is not UTF-8");
        }
    }
});
