//! The TLS-wrapped upgrade path: bytes from the socket → `tls::Session::receive` → plaintext
//! → `parse_request` → `routes::handle` → response → `Session::encrypt` / `tls::Writer` →
//! records read by a real rustls client. herald's `Acceptor` serves a certificate generated
//! when the target starts (see `herald_fuzz::tls`).
//!
//! Input: 8 header bytes, a chunk list, then the payload.
//!
//! * byte 0, mode (mod 4): 0 the payload is a hostile peer's bytes from the first byte on;
//!   1 the same after a real client's ClientHello; 2 the same after a completed handshake;
//!   3 a real client completes the handshake and sends the payload as its request (or
//!   writes it first, so that it leaves with the client's Finished, as browsers do).
//! * byte 1, flags: bits 0-1 versions the client offers (0/3 both, 1 TLS 1.2, 2 TLS 1.3);
//!   bit 2 the client sends close_notify after its data; bit 3 the server sends
//!   close_notify after its answer; bit 4 the answer goes through `tls::Writer` into a socket
//!   that would-blocks and is interrupted (else `Session::encrypt` and `wrote`); bit 5 the
//!   client writes its request before the handshake (it goes out right after Finished: the
//!   read that completes the handshake carries plaintext too). Modes 0-2: bit 7 the server
//!   answers through `tls::Writer` after the hostile bytes (the handshake timeout's 408), bit 6
//!   then queues close_notify, as a closing connection does.
//! * byte 2: client record size (0 rustls's default, else 32 + 64 (b - 1), 255 the largest).
//! * byte 3 / 4: KiB of filler the client sends after the payload / the server after its
//!   answer (big transfers: many records, reads of up to `READ_CHUNK`). Modes 0-2: byte 3 is
//!   the KiB the hostile stream is stretched to by repeating the payload after its first
//!   byte-5 bytes (a handshake header, then records by the thousand: `MAX_CARRY` is reachable
//!   although inputs are at most 16 KiB).
//! * byte 5: client write size (0 one write, else 61 b bytes per write).
//! * byte 6: socket pattern for `tls::Writer` (low nibble would-block, high nibble
//!   interrupted, per call mod 4; never two failures in a row).
//! * byte 7: server encrypt size (0 one call, else 97 b bytes per call).
//! * chunk list: a count byte (mod 16), then that many u16 LE sizes (+1, so 1 ..= 65536 =
//!   `READ_CHUNK`): the sizes, in turn, of every read either side makes. Each phase starts
//!   again at the head of the list. No list: reads of `READ_CHUNK`.
//!
//! Invariants, every mode: no panic; `receive` either fails (the loop drops the peer) or
//! waits for more; bytes carried between reads never exceed `MAX_CARRY`; no plaintext comes
//! out of a session whose handshake has not completed, and `handshake_done` is reported
//! exactly once, when `established()` turns true. Modes 0-2: the hostile bytes never complete
//! a handshake nor produce plaintext (they cannot know the keys), and the server's answer to
//! them stays small. Mode 3: the handshake completes for every chunking and record size;
//! the server gets exactly the bytes the client sent, nothing carried once they are all in,
//! and the peer's close_notify after them; the routing checks of the `upgrade` target hold
//! (`herald_fuzz::routing`); the client decrypts exactly the bytes the server encrypted, then
//! a clean EOF if the server closed.
//!
//! Two herald bugs this target found are fixed and kept as regressions (`strict-*`): a read
//! that brought the carried bytes plus the read over `MAX_CARRY` dropped a real client even
//! when it completed the record; and `encrypt` / `close_notify` ran rustls on an empty buffer
//! while it held its place in carried bytes (a handshake message spanning records), and
//! rustls panicked.
#![no_main]

use std::io::{self, Read, Write};

use herald::tls::{self, Session};
use herald_fuzz::tls::{MAX_CARRY, MAX_CLIENT_RECORD, READ_CHUNK, Versions, acceptor, client, client_config};
use libfuzzer_sys::fuzz_target;
use rustls::ClientConnection;

/// What the server may answer to a hostile peer's bytes in one read: its first flight with
/// the generated certificate (about 1.5 KB) or a HelloRetryRequest, and an alert.
const MAX_ANSWER_TO_GARBAGE: usize = 8 * 1024;
/// `PLAINTEXT_PER_WRITE` of src/tls.rs (private there): `tls::Writer` encrypts no further
/// buffer of a `write_vectored` once it has taken this much.
const PLAINTEXT_PER_WRITE: usize = 64 * 1024;
/// Reads after which the chunk list is abandoned for reads of `READ_CHUNK`: 1-byte reads of a
/// 256 KiB transfer would take the fuzzer's time without finding more.
const MAX_SMALL_READS: usize = 20_000;

struct Chunks {
    sizes: Vec<usize>,
    at: usize,
    reads: usize,
}

impl Chunks {
    fn next(&mut self) -> usize {
        self.reads += 1;
        if self.sizes.is_empty() || self.reads > MAX_SMALL_READS {
            return READ_CHUNK;
        }
        let size = self.sizes[self.at % self.sizes.len()];
        self.at += 1;
        size
    }

    fn restart(&mut self) {
        self.at = 0;
    }
}

struct Config<'a> {
    mode: u8,
    versions: Versions,
    client_close: bool,
    server_close: bool,
    writer: bool,
    eager: bool,
    close_after_garbage: bool,
    answer_after_garbage: bool,
    max_fragment: Option<usize>,
    client_filler: usize,
    server_filler: usize,
    client_write: usize,
    /// Modes 0-2: bytes of the payload before the repeated part.
    prefix: usize,
    socket_pattern: u8,
    encrypt_size: usize,
    chunks: Chunks,
    payload: &'a [u8],
}

fn parse(data: &[u8]) -> Option<Config<'_>> {
    let (head, rest) = data.split_first_chunk::<8>()?;
    let (&count, mut rest) = rest.split_first()?;
    let mut sizes = Vec::new();
    for _ in 0..count % 16 {
        let (size, tail) = rest.split_first_chunk::<2>()?;
        sizes.push(u16::from_le_bytes(*size) as usize + 1);
        rest = tail;
    }
    let flags = head[1];
    let per = |b: u8, unit: usize| if b == 0 { usize::MAX } else { b as usize * unit };
    Some(Config {
        mode: head[0] % 4,
        versions: match flags & 3 {
            1 => Versions::Tls12,
            2 => Versions::Tls13,
            _ => Versions::Both,
        },
        client_close: flags & 4 != 0,
        server_close: flags & 8 != 0,
        writer: flags & 16 != 0,
        eager: flags & 32 != 0,
        close_after_garbage: flags & 64 != 0,
        answer_after_garbage: flags & 128 != 0,
        max_fragment: match head[2] {
            0 => None,
            255 => Some(16 * 1024 + 5),
            b => Some(32 + 64 * (b as usize - 1)),
        },
        client_filler: head[3] as usize * 1024,
        server_filler: head[4] as usize * 1024,
        client_write: per(head[5], 61),
        prefix: head[5] as usize,
        socket_pattern: head[6],
        encrypt_size: per(head[7], 97),
        chunks: Chunks { sizes, at: 0, reads: 0 },
        payload: rest,
    })
}

/// Bytes that make a reordering or a lost byte visible.
fn filler(len: usize, salt: u8) -> impl Iterator<Item = u8> {
    (0..len).map(move |i| (i.wrapping_mul(31) as u8) ^ salt)
}

/// The server side of one connection, as the event loop drives it.
struct Server {
    session: Session,
    /// All plaintext `receive` produced.
    plain: Vec<u8>,
    /// All bytes `receive` was given (what is carried is their tail).
    fed: Vec<u8>,
    handshakes: u32,
    peer_closed: bool,
    /// Why `receive` failed: the loop has dropped the peer.
    failed: Option<String>,
    /// The peer is a real client: it never has more than a partial record in flight.
    legitimate: bool,
}

impl Server {
    fn new(legitimate: bool) -> Server {
        let session = acceptor().session().expect("a new session");
        Server {
            session,
            plain: Vec::new(),
            fed: Vec::new(),
            handshakes: 0,
            peer_closed: false,
            failed: None,
            legitimate,
        }
    }

    /// One read's worth of bytes, as `on_readable` hands them over.
    fn receive(&mut self, bytes: &[u8]) {
        assert!(self.failed.is_none(), "a dropped peer is not read again");
        assert!(bytes.len() <= READ_CHUNK);
        let carried = self.session.buffered();
        let was_established = self.session.established();
        self.fed.extend_from_slice(bytes);
        let mut input = bytes.to_vec();
        let mut plain = Vec::new();
        let result = self.session.receive(&mut input, &mut plain);
        if !self.session.established() {
            assert!(plain.is_empty(), "{} bytes of plaintext before the handshake completed", plain.len());
        }
        match result {
            Err(failed) => {
                self.failed = Some(failed.0);
            }
            Ok(received) => {
                assert!(self.session.buffered() <= MAX_CARRY, "{} bytes carried", self.session.buffered());
                if self.legitimate {
                    assert!(self.session.buffered() < MAX_CLIENT_RECORD, "{} bytes carried", self.session.buffered());
                }
                assert!(
                    self.session.buffered() <= carried + bytes.len(),
                    "carried {} > {carried} + {}",
                    self.session.buffered(),
                    bytes.len()
                );
                assert_eq!(received.handshake_done, !was_established && self.session.established());
                self.handshakes += u32::from(received.handshake_done);
                assert!(self.handshakes <= 1);
                if self.peer_closed {
                    assert!(plain.is_empty(), "plaintext after the peer's close_notify");
                }
                self.peer_closed |= received.peer_closed;
            }
        }
        self.plain.extend_from_slice(&plain);
    }

    /// Feeds `wire` in the chunk list's read sizes until it is all in or the peer is dropped.
    fn receive_all(&mut self, wire: &[u8], chunks: &mut Chunks) {
        let mut at = 0;
        while at < wire.len() && self.failed.is_none() {
            let n = chunks.next().min(READ_CHUNK).min(wire.len() - at);
            self.receive(&wire[at..at + n]);
            at += n;
        }
    }

    /// Takes the records waiting for the socket, in the chunk list's write sizes.
    fn take_output(&mut self, chunks: &mut Chunks) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let pending = self.session.pending_output();
            if pending.is_empty() {
                return out;
            }
            let n = chunks.next().min(pending.len());
            out.extend_from_slice(&pending[..n]);
            self.session.wrote(n);
        }
    }
}

/// The client's view of the bytes the server sent.
#[derive(Default)]
struct Received {
    plain: Vec<u8>,
    eof: bool,
}

/// Hands `wire` to the client in the chunk list's read sizes, decrypting as it goes. The
/// client must accept every byte: herald only sends what rustls encoded.
fn client_receive(client: &mut ClientConnection, wire: &[u8], chunks: &mut Chunks, got: &mut Received) {
    let mut at = 0;
    while at < wire.len() {
        let n = chunks.next().min(wire.len() - at);
        let mut piece = &wire[at..at + n];
        while !piece.is_empty() {
            let read = client.read_tls(&mut piece).expect("the client reads the server's records");
            assert!(read > 0, "the client stopped reading with {} bytes left", piece.len());
            client.process_new_packets().expect("the client accepts the server's records");
            let mut buf = [0u8; 16 * 1024];
            loop {
                match client.reader().read(&mut buf) {
                    Ok(0) => {
                        got.eof = true;
                        break;
                    }
                    Ok(n) => {
                        assert!(!got.eof, "plaintext after close_notify");
                        got.plain.extend_from_slice(&buf[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("client read: {e}"),
                }
            }
        }
        at += n;
    }
}

fn client_output(client: &mut ClientConnection) -> Vec<u8> {
    let mut wire = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut wire).expect("writing to a Vec");
    }
    wire
}

/// Moves handshake records both ways until neither side has more to say. Returns what the
/// client decrypted meanwhile (nothing: the server sends no application data yet).
fn handshake(client: &mut ClientConnection, server: &mut Server, chunks: &mut Chunks) -> Received {
    let mut got = Received::default();
    for _ in 0..16 {
        let wire = client_output(client);
        chunks.restart();
        server.receive_all(&wire, chunks);
        if server.failed.is_some() {
            return got;
        }
        chunks.restart();
        let answer = server.take_output(chunks);
        chunks.restart();
        client_receive(client, &answer, chunks, &mut got);
        if wire.is_empty() && answer.is_empty() {
            break;
        }
    }
    got
}

/// A socket for `tls::Writer`: takes the chunk list's sizes, would-blocks and is interrupted
/// as the pattern says, never twice in a row (the loop waits for writability in between).
struct Socket<'a> {
    wire: Vec<u8>,
    pattern: u8,
    calls: usize,
    failed_last: bool,
    chunks: &'a mut Chunks,
}

impl Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let bit = 1 << (self.calls % 4);
        self.calls += 1;
        if !std::mem::take(&mut self.failed_last) {
            if (self.pattern >> 4) & bit != 0 {
                self.failed_last = true;
                return Err(io::ErrorKind::Interrupted.into());
            }
            if self.pattern & bit != 0 {
                self.failed_last = true;
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        let n = self.chunks.next().min(buf.len());
        self.wire.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Modes 0-2: hostile bytes, after nothing, a real ClientHello, or a real handshake.
fn hostile(mut config: Config<'_>) {
    let mut server = Server::new(false);
    let chunks = &mut config.chunks;
    match config.mode {
        0 => {}
        1 => {
            let mut client = client(client_config(config.versions, config.max_fragment));
            let hello = client_output(&mut client);
            server.receive_all(&hello, chunks);
            assert!(server.failed.is_none(), "a real ClientHello refused: {:?}", server.failed);
            let answer = server.take_output(chunks);
            assert!(!answer.is_empty() && answer.len() <= MAX_ANSWER_TO_GARBAGE);
        }
        _ => {
            let mut client = client(client_config(config.versions, config.max_fragment));
            let got = handshake(&mut client, &mut server, chunks);
            assert!(server.failed.is_none(), "a real handshake failed: {:?}", server.failed);
            assert!(server.session.established() && !client.is_handshaking());
            assert!(got.plain.is_empty() && !got.eof);
        }
    }
    let established = server.session.established();
    let unit = &config.payload[config.prefix.min(config.payload.len())..];
    let mut stream = config.payload.to_vec();
    while !unit.is_empty() && stream.len() < config.client_filler {
        stream.extend_from_slice(unit);
    }
    chunks.restart();
    let mut at = 0;
    while at < stream.len() && server.failed.is_none() {
        let n = chunks.next().min(stream.len() - at);
        server.receive(&stream[at..at + n]);
        at += n;
        let answer = server.take_output(chunks);
        assert!(answer.len() <= MAX_ANSWER_TO_GARBAGE, "{} bytes answered to one read", answer.len());
    }
    if config.answer_after_garbage && server.failed.is_none() {
        let timeout = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        let mut sink = Vec::new();
        match (tls::Writer { session: &mut server.session, sink: &mut sink }).write(timeout) {
            Ok(n) => assert!(established && n == timeout.len(), "answered {n} bytes"),
            Err(e) => assert!(!established, "an established session refused to answer: {e}"),
        }
        assert!(sink.len() <= timeout.len() + 64, "{} bytes for a {}-byte answer", sink.len(), timeout.len());
        assert!(server.session.pending_output().is_empty(), "a Vec takes every record");
    }
    if config.close_after_garbage && server.failed.is_none() {
        server.session.close_notify();
        server.session.close_notify();
        let answer = server.take_output(chunks);
        // One alert record, or nothing before the handshake completed.
        assert!(answer.len() <= if established { 64 } else { 0 }, "close_notify took {} bytes", answer.len());
    }
    // Forging a Finished or a record needs keys the peer does not have.
    assert_eq!(server.session.established(), established, "hostile bytes completed a handshake");
    assert!(server.plain.is_empty(), "hostile bytes produced {} bytes of plaintext", server.plain.len());
}

/// Mode 3: a real client, the payload as its request, herald's answer back.
fn upgrade(mut config: Config<'_>) {
    let mut client = client(client_config(config.versions, config.max_fragment));
    let mut server = Server::new(true);
    let chunks = &mut config.chunks;
    let mut sent = config.payload.to_vec();
    sent.extend(filler(config.client_filler, 0x5a));
    let write = |client: &mut ClientConnection| {
        for piece in sent.chunks(config.client_write.max(1)) {
            client.writer().write_all(piece).expect("the client encrypts");
        }
    };
    if config.eager {
        write(&mut client);
    }
    let got = handshake(&mut client, &mut server, chunks);
    assert!(server.failed.is_none(), "a real handshake failed: {:?}", server.failed);
    assert!(server.session.established(), "the handshake did not complete");
    assert!(!client.is_handshaking());
    assert_eq!(server.session.buffered(), 0, "bytes carried after complete flights");
    assert!(got.plain.is_empty() && !got.eof);
    if config.eager {
        assert!(server.plain == sent, "the server got {} bytes, the client sent {}", server.plain.len(), sent.len());
    } else {
        assert!(server.plain.is_empty());
        write(&mut client);
    }
    if config.client_close {
        client.send_close_notify();
    }
    let wire = client_output(&mut client);
    chunks.restart();
    server.receive_all(&wire, chunks);
    assert!(server.failed.is_none(), "a real client's records refused: {:?}", server.failed);
    assert!(server.plain == sent, "the server got {} bytes, the client sent {}", server.plain.len(), sent.len());
    assert_eq!(server.session.buffered(), 0, "bytes carried after whole records");
    assert_eq!(server.peer_closed, config.client_close);

    // What the event loop answers at once, checked as the `upgrade` target checks it.
    let mut answer = herald_fuzz::routing::check(&server.plain).unwrap_or_default();
    answer.extend(filler(config.server_filler, 0xa5));

    chunks.restart();
    let handshake_leftovers = server.take_output(chunks);
    let mut got = Received::default();
    client_receive(&mut client, &handshake_leftovers, chunks, &mut got);
    assert!(got.plain.is_empty());

    chunks.restart();
    let wire = if config.writer {
        let mut socket =
            Socket { wire: Vec::new(), pattern: config.socket_pattern, calls: 0, failed_last: false, chunks };
        let mut at = 0;
        let mut rounds = 0;
        while at < answer.len() {
            rounds += 1;
            assert!(rounds < 1_000_000, "the writer makes no progress");
            let end = at.saturating_add(config.encrypt_size).min(answer.len());
            let mid = at + (end - at) / 2;
            let bufs = [io::IoSlice::new(&answer[at..mid]), io::IoSlice::new(&answer[mid..end])];
            let mut writer = tls::Writer { session: &mut server.session, sink: &mut socket };
            match writer.write_vectored(&bufs) {
                Ok(n) => {
                    // Whole buffers only, and a second one only while under the per-write budget.
                    let whole = n == end - at || (n == mid - at && n >= PLAINTEXT_PER_WRITE);
                    assert!(whole, "took {n} of {} + {} bytes", mid - at, end - mid);
                    at += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("writer: {e}"),
            }
        }
        if config.server_close {
            server.session.close_notify();
        }
        while !tls::drain(&mut server.session, &mut socket).expect("drain") {
            rounds += 1;
            assert!(rounds < 1_000_000, "drain makes no progress");
        }
        socket.wire
    } else {
        for piece in answer.chunks(config.encrypt_size.max(1)) {
            server.session.encrypt(piece).expect("the server encrypts");
        }
        if config.server_close {
            server.session.close_notify();
            server.session.close_notify();
        }
        server.take_output(chunks)
    };
    assert!(server.session.pending_output().is_empty());
    chunks.restart();
    client_receive(&mut client, &wire, chunks, &mut got);
    assert!(
        got.plain == answer,
        "the client decrypted {} bytes, the server encrypted {}",
        got.plain.len(),
        answer.len()
    );
    assert_eq!(got.eof, config.server_close, "close_notify seen by the client");
}

fuzz_target!(|data: &[u8]| {
    let Some(config) = parse(data) else { return };
    if config.mode == 3 { upgrade(config) } else { hostile(config) }
});
