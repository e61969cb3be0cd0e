//! `herald-load ceiling-server`: the cost floor of a broadcast.
//!
//! A server with no herald logic at all, measured by the same generator: it accepts TCP,
//! answers the WebSocket upgrade of any `GET` (any path, no authentication), keeps every
//! upgraded socket in a slab, and on `POST <any path>` (keep-alive HTTP/1.1 with a
//! Content-Length body, on the same port) takes the body as the message, encodes its
//! unmasked text frame once and writes that same frame to every socket in a tight loop.
//! No queues, no routing, no JSON validation: a socket that would block is skipped (and
//! counted; a partial write keeps its remainder so the stream stays well-framed).
//!
//! `--threads N` event loops share the port (SO_REUSEPORT), each owning the sockets it
//! accepted; the loop that receives a POST writes its own sockets and hands the encoded frame
//! (one `Arc`) to the other loops through a channel and a waker.
//!
//! Drive it with `herald-load broadcast --url 'ws://HOST:PORT/sub/{user}' --publish http
//! --publish-url 'http://HOST:PORT/pub/{user}' --publish-body '{payload}' --server-pid PID`.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};

const LISTENER: Token = Token(usize::MAX);
const WAKER: Token = Token(usize::MAX - 1);
/// The answer to a publish.
const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 32\r\n\r\n{\"status\":\"success\",\"sent\":true}";
/// Largest request head or body the ceiling accepts.
const MAX_REQUEST: usize = 64 * 1024;

/// Every loop's inbox of encoded frames and the waker that tells it to look.
type Peers = Arc<Vec<(Sender<Arc<Vec<u8>>>, Arc<Waker>)>>;

#[derive(Default)]
struct Stats {
    upgraded: AtomicU64,
    live: AtomicU64,
    published: AtomicU64,
    frames_written: AtomicU64,
    skipped_would_block: AtomicU64,
    partial_writes: AtomicU64,
}

enum Kind {
    /// Reading HTTP requests (upgrade or publish).
    Http,
    /// Upgraded: receives broadcast frames; what it sends is read and discarded.
    Ws,
}

struct Conn {
    stream: TcpStream,
    kind: Kind,
    rbuf: Vec<u8>,
    /// Bytes the socket did not take (partial write); while non-empty, new frames skip it.
    pending: Vec<u8>,
}

pub fn run(listen: &str, threads: usize) -> Result<(), String> {
    let addr: SocketAddr = listen.parse().map_err(|_| format!("--listen: not an address: {listen}"))?;
    crate::sys::raise_open_file_limit();
    let stats = Arc::new(Stats::default());
    let mut polls = Vec::new();
    let mut wakers = Vec::new();
    let mut rxs = Vec::new();
    let mut txs = Vec::new();
    for _ in 0..threads {
        let poll = Poll::new().map_err(|e| e.to_string())?;
        wakers.push(Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| e.to_string())?));
        polls.push(poll);
        let (tx, rx) = crossbeam_channel::unbounded::<Arc<Vec<u8>>>();
        txs.push(tx);
        rxs.push(rx);
    }
    let peers: Peers = Arc::new(txs.into_iter().zip(wakers.iter().cloned()).collect());
    let mut handles = Vec::new();
    for (id, (poll, rx)) in polls.into_iter().zip(rxs).enumerate() {
        let listener = bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let (stats, peers) = (stats.clone(), peers.clone());
        handles.push(
            thread::Builder::new()
                .name(format!("ceiling-{id}"))
                .spawn(move || Loop { id, poll, listener, rx, peers, stats, conns: Slab::new() }.run())
                .map_err(|e| e.to_string())?,
        );
    }
    eprintln!("herald-load ceiling-server: listening on {addr} with {threads} thread(s), pid {}", std::process::id());
    let mut last = (u64::MAX, u64::MAX);
    let started = Instant::now();
    loop {
        thread::sleep(Duration::from_secs(5));
        if handles.iter().any(thread::JoinHandle::is_finished) {
            return Err("an event loop stopped".into());
        }
        let now = (stats.live.load(Relaxed), stats.published.load(Relaxed));
        if now != last {
            last = now;
            eprintln!(
                "ceiling [{:.0}s]: {} live ({} upgraded), {} published, {} frames written, {} skipped (would block), {} partial writes",
                started.elapsed().as_secs_f64(),
                now.0,
                stats.upgraded.load(Relaxed),
                now.1,
                stats.frames_written.load(Relaxed),
                stats.skipped_would_block.load(Relaxed),
                stats.partial_writes.load(Relaxed)
            );
        }
    }
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(TcpListener::from_std(socket.into()))
}

struct Loop {
    id: usize,
    poll: Poll,
    listener: TcpListener,
    rx: Receiver<Arc<Vec<u8>>>,
    peers: Peers,
    stats: Arc<Stats>,
    conns: Slab<Conn>,
}

enum Request {
    Partial,
    Bad,
    Upgrade { len: usize, accept: String },
    Publish { len: usize, body: (usize, usize) },
}

fn parse_request(buf: &[u8]) -> Request {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return if buf.len() > MAX_REQUEST { Request::Bad } else { Request::Partial },
        Err(_) => return Request::Bad,
    };
    let header = |name: &str| req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    match req.method {
        Some("GET") => match header("sec-websocket-key") {
            Some(key) => Request::Upgrade { len: head, accept: tungstenite::handshake::derive_accept_key(key) },
            None => Request::Bad,
        },
        Some("POST") | Some("PUT") => {
            let length = header("content-length")
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if length > MAX_REQUEST {
                Request::Bad
            } else if buf.len() < head + length {
                Request::Partial
            } else {
                Request::Publish { len: head + length, body: (head, head + length) }
            }
        }
        _ => Request::Bad,
    }
}

impl Loop {
    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let mut buf = vec![0u8; 64 * 1024];
        if let Err(e) = self.poll.registry().register(&mut self.listener, LISTENER, Interest::READABLE) {
            eprintln!("ceiling-{}: {e}", self.id);
            return;
        }
        loop {
            match self.poll.poll(&mut events, None) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("ceiling-{}: poll: {e}", self.id);
                    return;
                }
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {
                        while let Ok(frame) = self.rx.try_recv() {
                            self.broadcast(&frame);
                        }
                    }
                    Token(k) => {
                        if event.is_writable() {
                            self.flush_pending(k);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.on_readable(k, &mut buf);
                        }
                    }
                }
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let entry = self.conns.vacant_entry();
                    let token = Token(entry.key());
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                        .is_ok()
                    {
                        entry.insert(Conn { stream, kind: Kind::Http, rbuf: Vec::new(), pending: Vec::new() });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: try again on the next wakeup.
                    eprintln!("ceiling-{}: accept: {e}", self.id);
                    return;
                }
            }
        }
    }

    fn drop_conn(&mut self, k: usize) {
        if let Some(mut conn) = self.conns.try_remove(k) {
            let _ = self.poll.registry().deregister(&mut conn.stream);
            if matches!(conn.kind, Kind::Ws) {
                self.stats.live.fetch_sub(1, Relaxed);
            }
        }
    }

    fn on_readable(&mut self, k: usize, buf: &mut [u8]) {
        loop {
            let Some(conn) = self.conns.get_mut(k) else { return };
            match conn.stream.read(buf) {
                Ok(0) => return self.drop_conn(k),
                Ok(n) => {
                    if matches!(conn.kind, Kind::Http) {
                        conn.rbuf.extend_from_slice(&buf[..n]);
                        if !self.on_http(k) {
                            return self.drop_conn(k);
                        }
                    }
                    // WebSocket input (pongs, the final close frame) is discarded.
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.drop_conn(k),
            }
        }
    }

    /// Handles the complete requests buffered on connection `k`; false: drop it.
    fn on_http(&mut self, k: usize) -> bool {
        loop {
            let Some(conn) = self.conns.get_mut(k) else { return false };
            if !matches!(conn.kind, Kind::Http) {
                return true;
            }
            match parse_request(&conn.rbuf) {
                Request::Partial => return true,
                Request::Bad => {
                    let _ = conn
                        .stream
                        .write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    return false;
                }
                Request::Upgrade { len, accept } => {
                    conn.rbuf.drain(..len);
                    let response = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                    );
                    if conn.stream.write(response.as_bytes()).ok() != Some(response.len()) {
                        return false;
                    }
                    conn.kind = Kind::Ws;
                    conn.rbuf = Vec::new();
                    self.stats.upgraded.fetch_add(1, Relaxed);
                    self.stats.live.fetch_add(1, Relaxed);
                    return true;
                }
                Request::Publish { len, body } => {
                    let frame = Arc::new(wsframe::encode(true, wsframe::OP_TEXT, &conn.rbuf[body.0..body.1], None));
                    conn.rbuf.drain(..len);
                    // Answer first, as herald does (it delivers after answering): the
                    // publisher's next request then overlaps this broadcast.
                    // A tiny response on a keep-alive socket the publisher reads: it fits.
                    if conn.stream.write(RESPONSE).ok() != Some(RESPONSE.len()) {
                        return false;
                    }
                    self.stats.published.fetch_add(1, Relaxed);
                    for (i, (tx, waker)) in self.peers.iter().enumerate() {
                        if i != self.id && tx.send(frame.clone()).is_ok() {
                            let _ = waker.wake();
                        }
                    }
                    self.broadcast(&frame);
                }
            }
        }
    }

    /// The tight loop: the same bytes to every upgraded socket of this loop.
    fn broadcast(&mut self, frame: &[u8]) -> u64 {
        let (mut written, mut skipped, mut partial) = (0u64, 0u64, 0u64);
        let mut dead = Vec::new();
        for (k, conn) in self.conns.iter_mut() {
            if !matches!(conn.kind, Kind::Ws) {
                continue;
            }
            if !conn.pending.is_empty() {
                skipped += 1;
                continue;
            }
            match conn.stream.write(frame) {
                Ok(n) if n == frame.len() => written += 1,
                Ok(n) => {
                    partial += 1;
                    conn.pending.extend_from_slice(&frame[n..]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => skipped += 1,
                Err(_) => dead.push(k),
            }
        }
        for k in dead {
            self.drop_conn(k);
        }
        self.stats.frames_written.fetch_add(written, Relaxed);
        self.stats.skipped_would_block.fetch_add(skipped, Relaxed);
        self.stats.partial_writes.fetch_add(partial, Relaxed);
        written
    }

    fn flush_pending(&mut self, k: usize) {
        let Some(conn) = self.conns.get_mut(k) else { return };
        while !conn.pending.is_empty() {
            match conn.stream.write(&conn.pending) {
                Ok(0) => return self.drop_conn(k),
                Ok(n) => {
                    conn.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.drop_conn(k),
            }
        }
        conn.pending = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_frames() {
        let up = b"GET /sub/u1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        match parse_request(up) {
            Request::Upgrade { len, accept } => {
                assert_eq!(len, up.len());
                assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
            }
            _ => panic!("not an upgrade"),
        }
        let p = b"POST /pub/room HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloPOST";
        match parse_request(p) {
            Request::Publish { len, body } => {
                assert_eq!(&p[body.0..body.1], b"hello");
                assert_eq!(len, p.len() - 4);
            }
            _ => panic!("not a publish"),
        }
        assert!(matches!(parse_request(&p[..30]), Request::Partial));
        let head = RESPONSE.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(RESPONSE.len() - head, 32);
    }
}
