//! One worker thread: a mio event loop owning its share of the client connections, from the
//! non-blocking connect through the upgrade to counting and timing every load message.
//!
//! A connection costs about a hundred bytes here: its socket, a state byte, a sequence
//! window, and two buffers that stay unallocated unless a frame or a write is split across
//! reads. All reads go through one buffer per worker. A wss:// connection adds its rustls
//! session (buffered: its state and the buffers rustls keeps; decrypted bytes go through a
//! second buffer per worker), and its writes wait in the session instead of `wbuf`.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::{Acquire, Relaxed};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::ClientConnection;
use socket2::{Domain, Protocol, Socket, Type};

use crate::cli::Vars;
use crate::shared::{ConnPlan, PHASE_CLOSE, Shared};
use crate::sys::clock::realtime_ns;
use crate::tls;
use crate::ws::{self, Handshake, Rng, Seen, SeqWindow};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Connecting,
    Handshaking,
    /// Upgraded, waiting for the subscription to be confirmed.
    Subscribing,
    Open,
    Closed,
}

#[derive(Debug)]
struct Conn {
    stream: Option<TcpStream>,
    state: State,
    /// Monotonic ns since `Shared::epoch` when the connect started.
    started_ns: u64,
    seq: SeqWindow,
    /// Load messages stamped inside the measured window this connection received.
    window_msgs: u32,
    /// Realtime ns of its last new load message (any phase); 0: none yet.
    last_rx_ns: u64,
    /// Bytes of an incomplete response head or frame.
    rbuf: Vec<u8>,
    /// Bytes the socket did not take yet (plaintext connections).
    wbuf: Vec<u8>,
    /// wss://: the TLS session, from the TCP connect on.
    tls: Option<Box<ClientConnection>>,
}

/// Counters of one worker.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub attempted: u64,
    pub established: u64,
    pub failed: u64,
    pub pending: u64,
    pub unexpected_closes: u64,
    pub received_all: u64,
    pub received_window: u64,
    pub duplicates_all: u64,
    pub duplicates_window: u64,
    /// Load messages too far out of order to check for duplicates (counted as received).
    pub unchecked_reordered: u64,
    /// Text frames that were not load messages.
    pub other_messages: u64,
    pub pings: u64,
    /// Connections still open when the run ended (before the generator closed them).
    pub open_at_end: u64,
    /// ... of which received no load message stamped in the measured window.
    pub silent_at_end: u64,
    /// Fewest window messages any connection open at the end received (u64::MAX: none open).
    pub min_window_msgs: u64,
    /// Longest time, among connections open at the end, since their last load message (ns,
    /// measured when the generator stops; a connection that never received counts from the
    /// window start).
    pub max_silence_ns: u64,
    /// Monotonic ns since the shared epoch.
    pub first_attempt_ns: u64,
    pub last_established_ns: u64,
}

/// What a worker hands back when it stops.
#[derive(Debug)]
pub struct WorkerReport {
    pub counts: Counts,
    /// Publish → receive latency of window messages, nanoseconds.
    pub latency: Histogram<u64>,
    /// TCP connect start → 101 received, nanoseconds.
    pub connect_latency: Histogram<u64>,
    pub failures: BTreeMap<String, u64>,
    pub closes: BTreeMap<String, u64>,
    /// wss://: what the first upgraded connection negotiated (version, suite, group).
    pub tls: Option<String>,
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 1 h at 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("static histogram bounds are valid")
}

/// Everything a connection's bytes are accounted to.
struct Sink<'a> {
    shared: &'a Shared,
    plan: &'a ConnPlan,
    counts: Counts,
    latency: Histogram<u64>,
    connect_latency: Histogram<u64>,
    failures: BTreeMap<String, u64>,
    closes: BTreeMap<String, u64>,
    rng: Rng,
    /// Realtime ns of the current read.
    now_rt: u64,
    window_start: u64,
    window_end: u64,
    /// User index and global index of the connection being handled.
    user_index: usize,
    conn_index: u64,
    tls_info: Option<String>,
}

pub struct Worker {
    id: usize,
    plan: Arc<ConnPlan>,
    shared: Arc<Shared>,
    /// Minted tokens by user index; dropped once every connection has been started.
    tokens: Option<Arc<Vec<String>>>,
}

impl Worker {
    pub fn new(id: usize, plan: Arc<ConnPlan>, shared: Arc<Shared>, tokens: Option<Arc<Vec<String>>>) -> Worker {
        Worker { id, plan, shared, tokens }
    }

    /// Global index of this worker's k-th connection.
    fn global(&self, k: usize) -> usize {
        self.id + k * self.plan.threads
    }

    pub fn run(mut self) -> io::Result<WorkerReport> {
        let plan = self.plan.clone();
        let shared = self.shared.clone();
        let mine = (plan.connections + plan.threads - 1 - self.id) / plan.threads;
        let mut conns: Vec<Conn> = (0..mine)
            .map(|_| Conn {
                stream: None,
                state: State::Idle,
                started_ns: 0,
                seq: SeqWindow::default(),
                window_msgs: 0,
                last_rx_ns: 0,
                rbuf: Vec::new(),
                wbuf: Vec::new(),
                tls: None,
            })
            .collect();
        let mut poll = Poll::new()?;
        let mut events = Events::with_capacity(4096);
        let mut buf = vec![0u8; 64 * 1024];
        let mut plain = Vec::with_capacity(if plan.tls.is_some() { 64 * 1024 } else { 0 });
        let mut scratch = Vec::with_capacity(1024);
        let mut sink = Sink {
            shared: &shared,
            plan: &plan,
            counts: Counts::default(),
            latency: new_histogram(),
            connect_latency: new_histogram(),
            failures: BTreeMap::new(),
            closes: BTreeMap::new(),
            rng: Rng::from_entropy(),
            now_rt: 0,
            window_start: u64::MAX,
            window_end: u64::MAX,
            user_index: 0,
            conn_index: 0,
            tls_info: None,
        };
        let counters = &shared.workers[self.id];
        let rate = if plan.connect_rate > 0.0 { plan.connect_rate / plan.threads as f64 } else { 0.0 };
        let timeout_ns = plan.connect_timeout.as_nanos() as u64;
        let start = Instant::now();
        let mut next = 0usize;
        let mut in_progress: VecDeque<u32> = VecDeque::new();
        loop {
            if shared.phase.load(Acquire) == PHASE_CLOSE {
                break;
            }
            let now = Instant::now();
            let mut wait = Duration::from_millis(100);
            while next < mine {
                if sink.counts.pending >= plan.max_pending as u64 {
                    break;
                }
                if rate > 0.0 {
                    let due = start + Duration::from_secs_f64(next as f64 / rate);
                    if due > now {
                        wait = wait.min(due - now);
                        break;
                    }
                }
                self.start_connect(next, &mut conns[next], &poll, &mut sink);
                if matches!(conns[next].state, State::Connecting | State::Handshaking) {
                    in_progress.push_back(next as u32);
                }
                next += 1;
            }
            if next == mine && sink.counts.pending == 0 {
                // Every upgrade request is written: the tokens are not needed any more.
                self.tokens = None;
            }
            // Connections past their deadline fail; the queue is in start order.
            let now_ns = shared.epoch.elapsed().as_nanos() as u64;
            while let Some(&k) = in_progress.front() {
                let conn = &mut conns[k as usize];
                if !matches!(conn.state, State::Connecting | State::Handshaking) {
                    in_progress.pop_front();
                } else if now_ns.saturating_sub(conn.started_ns) >= timeout_ns {
                    in_progress.pop_front();
                    fail(conn, &mut sink, "timeout".into());
                } else {
                    break;
                }
            }
            if next < mine && sink.counts.pending >= plan.max_pending as u64 {
                wait = wait.min(Duration::from_millis(5));
            }
            publish_counts(counters, &sink.counts, next == mine);
            match poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            sink.window_start = shared.window_start_ns.load(Relaxed);
            sink.window_end = shared.window_end_ns.load(Relaxed);
            for event in events.iter() {
                let k = event.token().0;
                let Some(conn) = conns.get_mut(k) else { continue };
                sink.conn_index = self.global(k) as u64;
                sink.user_index = plan.users.index_of_conn(self.global(k));
                if conn.state == State::Connecting {
                    self.on_connected(k, conn, &mut sink, &mut scratch);
                }
                if event.is_writable() && wants_flush(conn) && conn.stream.is_some() {
                    flush(conn, &mut sink);
                }
                if matches!(conn.state, State::Handshaking | State::Subscribing | State::Open) {
                    on_readable(conn, &mut buf, &mut plain, &mut sink);
                }
            }
        }
        // Is every connection still receiving? Per-connection tallies before closing.
        sink.counts.min_window_msgs = u64::MAX;
        let end_rt = realtime_ns();
        let window_start = shared.window_start_ns.load(Relaxed);
        for conn in conns.iter().filter(|c| c.state == State::Open) {
            sink.counts.open_at_end += 1;
            if conn.window_msgs == 0 {
                sink.counts.silent_at_end += 1;
            }
            sink.counts.min_window_msgs = sink.counts.min_window_msgs.min(u64::from(conn.window_msgs));
            let since = if conn.last_rx_ns > 0 { conn.last_rx_ns } else { window_start.min(end_rt) };
            sink.counts.max_silence_ns = sink.counts.max_silence_ns.max(end_rt.saturating_sub(since));
        }
        // Close frames where the socket takes them; then the sockets go.
        for (k, conn) in conns.iter_mut().enumerate() {
            if let Some(stream) = conn.stream.as_mut() {
                if matches!(conn.state, State::Open | State::Subscribing) && conn.wbuf.is_empty() {
                    let frame = wsframe::masked_close(1000, sink.rng.mask());
                    match conn.tls.as_mut() {
                        Some(session) => {
                            let _ = session.writer().write_all(&frame);
                            session.send_close_notify();
                            let _ = tls::flush(session, stream);
                        }
                        None => {
                            let _ = stream.write(&frame);
                        }
                    }
                }
                sink.user_index = plan.users.index_of_conn(self.global(k));
                set_live(conn, &mut sink, false);
                conn.stream = None;
                conn.tls = None;
                conn.state = State::Closed;
            }
        }
        sink.counts.pending = 0;
        publish_counts(counters, &sink.counts, true);
        Ok(WorkerReport {
            counts: sink.counts,
            latency: sink.latency,
            connect_latency: sink.connect_latency,
            failures: sink.failures,
            closes: sink.closes,
            tls: sink.tls_info,
        })
    }

    fn start_connect(&self, k: usize, conn: &mut Conn, poll: &Poll, sink: &mut Sink<'_>) {
        let g = self.global(k);
        let now_ns = sink.shared.epoch.elapsed().as_nanos() as u64;
        if sink.counts.attempted == 0 {
            sink.counts.first_attempt_ns = now_ns;
        }
        sink.counts.attempted += 1;
        conn.started_ns = now_ns;
        conn.state = State::Connecting;
        sink.counts.pending += 1;
        let source = (!sink.plan.source_ips.is_empty()).then(|| sink.plan.source_ips[g % sink.plan.source_ips.len()]);
        let stream = match open_socket(sink.plan.endpoint.addr, source) {
            Ok(stream) => stream,
            Err(e) => return fail(conn, sink, error_reason("connect", &e)),
        };
        let mut stream = TcpStream::from_std(stream);
        if let Err(e) = poll.registry().register(&mut stream, Token(k), Interest::READABLE | Interest::WRITABLE) {
            return fail(conn, sink, error_reason("register", &e));
        }
        // A loopback connect may complete at once; the first writable event says so either way.
        conn.stream = Some(stream);
    }

    fn on_connected(&self, k: usize, conn: &mut Conn, sink: &mut Sink<'_>, scratch: &mut Vec<u8>) {
        let Some(stream) = conn.stream.as_mut() else { return };
        match stream.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => return fail(conn, sink, error_reason("connect", &e)),
        }
        match stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
            Err(e) => return fail(conn, sink, error_reason("connect", &e)),
        }
        let g = self.global(k);
        let user = sink.plan.users.name(sink.user_index);
        let token = self.tokens.as_ref().and_then(|t| t.get(sink.user_index)).map_or("", String::as_str);
        let vars = Vars { token, user: &user, topic: &sink.plan.topic, payload: b"" };
        let mut path = Vec::with_capacity(256);
        sink.plan.endpoint.path.render(&mut path, &vars);
        let key = ws::ws_key(sink.plan.key_seed, g as u64);
        scratch.clear();
        ws::upgrade_request(scratch, &String::from_utf8_lossy(&path), &sink.plan.endpoint.host, &key);
        conn.state = State::Handshaking;
        if let Some(client) = &sink.plan.tls {
            // The request waits in the session until the TLS handshake is done.
            match client.connect() {
                Ok(session) => conn.tls = Some(Box::new(session)),
                Err(why) => return fail(conn, sink, why),
            }
        }
        send(conn, sink, scratch);
    }
}

fn open_socket(target: SocketAddr, source: Option<std::net::IpAddr>) -> io::Result<std::net::TcpStream> {
    let socket = Socket::new(Domain::for_address(target), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        // Port chosen at connect time from the full 4-tuple, not reserved at bind: each
        // source address then gives the whole ephemeral range for this one destination.
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on our own socket with a pointer to a c_int and its size.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(socket.into())
}

fn error_reason(what: &str, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => format!("{what}: connection refused"),
        Some(libc::ECONNRESET) => format!("{what}: connection reset"),
        Some(libc::EMFILE) => format!("{what}: too many open files (EMFILE)"),
        Some(libc::EADDRNOTAVAIL) => format!("{what}: no free local port (EADDRNOTAVAIL)"),
        Some(libc::ETIMEDOUT) => format!("{what}: timed out"),
        _ => format!("{what}: {}", e.kind()),
    }
}

fn publish_counts(counters: &crate::shared::WorkerCounters, c: &Counts, all_started: bool) {
    counters.attempted.store(c.attempted, Relaxed);
    counters.established.store(c.established, Relaxed);
    counters.failed.store(c.failed, Relaxed);
    counters.pending.store(c.pending, Relaxed);
    counters.unexpected_closes.store(c.unexpected_closes, Relaxed);
    counters.received_all.store(c.received_all, Relaxed);
    counters.received_window.store(c.received_window, Relaxed);
    counters.done_connecting.store(all_started && c.pending == 0, Relaxed);
}

/// A connection that never opened.
fn fail(conn: &mut Conn, sink: &mut Sink<'_>, reason: String) {
    if matches!(conn.state, State::Connecting | State::Handshaking) {
        sink.counts.pending = sink.counts.pending.saturating_sub(1);
        sink.counts.failed += 1;
        *sink.failures.entry(reason).or_default() += 1;
    }
    conn.stream = None;
    conn.tls = None;
    conn.state = State::Closed;
    conn.rbuf = Vec::new();
    conn.wbuf = Vec::new();
}

/// An open connection that ended: a close frame, EOF, an error, or a protocol violation.
fn closed(conn: &mut Conn, sink: &mut Sink<'_>, reason: String) {
    if matches!(conn.state, State::Connecting | State::Handshaking) {
        return fail(conn, sink, reason);
    }
    if conn.state == State::Closed {
        return;
    }
    set_live(conn, sink, false);
    if sink.shared.phase.load(Relaxed) != PHASE_CLOSE {
        sink.counts.unexpected_closes += 1;
    }
    *sink.closes.entry(reason).or_default() += 1;
    conn.stream = None;
    conn.tls = None;
    conn.state = State::Closed;
    conn.rbuf = Vec::new();
    conn.wbuf = Vec::new();
}

/// Counts the connection in (or out of) the live totals the publisher uses for expectations.
fn set_live(conn: &Conn, sink: &mut Sink<'_>, live: bool) {
    if conn.state != State::Open {
        return;
    }
    let shared = sink.shared;
    if live {
        shared.live_total.fetch_add(1, Relaxed);
        if let Some(u) = shared.live_per_user.get(sink.user_index) {
            u.fetch_add(1, Relaxed);
        }
    } else {
        shared.live_total.fetch_sub(1, Relaxed);
        if let Some(u) = shared.live_per_user.get(sink.user_index) {
            u.fetch_sub(1, Relaxed);
        }
    }
}

fn open(conn: &mut Conn, sink: &mut Sink<'_>) {
    conn.state = State::Open;
    set_live(conn, sink, true);
}

/// Writes `bytes` after whatever is still queued.
fn send(conn: &mut Conn, sink: &mut Sink<'_>, bytes: &[u8]) {
    if let (Some(session), Some(stream)) = (conn.tls.as_mut(), conn.stream.as_mut()) {
        if let Err(e) = tls::send(session, stream, bytes) {
            closed(conn, sink, error_reason("write", &e));
        }
        return;
    }
    if !conn.wbuf.is_empty() {
        conn.wbuf.extend_from_slice(bytes);
        return flush(conn, sink);
    }
    let Some(stream) = conn.stream.as_mut() else { return };
    let mut done = 0;
    while done < bytes.len() {
        match stream.write(&bytes[done..]) {
            Ok(0) => return closed(conn, sink, "write: socket closed".into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return closed(conn, sink, error_reason("write", &e)),
        }
    }
    if done < bytes.len() {
        conn.wbuf.extend_from_slice(&bytes[done..]);
    }
}

/// Something waits for the socket to take it.
fn wants_flush(conn: &Conn) -> bool {
    !conn.wbuf.is_empty() || conn.tls.as_ref().is_some_and(|s| s.wants_write())
}

fn flush(conn: &mut Conn, sink: &mut Sink<'_>) {
    let Some(stream) = conn.stream.as_mut() else { return };
    if let Some(session) = conn.tls.as_mut() {
        if let Err(e) = tls::flush(session, stream) {
            closed(conn, sink, error_reason("write", &e));
        }
        return;
    }
    let mut done = 0;
    while done < conn.wbuf.len() {
        match stream.write(&conn.wbuf[done..]) {
            Ok(0) => return closed(conn, sink, "write: socket closed".into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return closed(conn, sink, error_reason("write", &e)),
        }
    }
    if done == conn.wbuf.len() {
        conn.wbuf = Vec::new();
    } else {
        conn.wbuf.drain(..done);
    }
}

/// Reads until the socket is empty (edge-triggered), handing every byte (decrypted into
/// `plain` first on a TLS connection) to `consume`.
fn on_readable(conn: &mut Conn, buf: &mut [u8], plain: &mut Vec<u8>, sink: &mut Sink<'_>) {
    loop {
        let Some(stream) = conn.stream.as_mut() else { return };
        let n = match stream.read(buf) {
            Ok(0) => return closed(conn, sink, "eof".into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return closed(conn, sink, error_reason("read", &e)),
        };
        sink.now_rt = realtime_ns();
        match conn.tls.as_mut() {
            None => deliver(conn, &buf[..n], sink),
            Some(session) => {
                plain.clear();
                let received = tls::receive(session, &buf[..n], plain);
                // Handshake records, and the upgrade request once the handshake is done; an
                // alert after a failure (best effort).
                if session.wants_write() {
                    flush(conn, sink);
                }
                match received {
                    Ok(peer_closed) => {
                        deliver(conn, plain, sink);
                        if peer_closed {
                            closed(conn, sink, "tls: close_notify".into());
                        }
                    }
                    Err(why) => closed(conn, sink, why),
                }
            }
        }
        if conn.state == State::Closed {
            return;
        }
        if n < buf.len() {
            // A short read almost always means the socket is empty; one more read would
            // just return WouldBlock. Edge-triggered epoll reports new data later anyway.
            return;
        }
    }
}

/// Hands `data` to `consume` after the bytes of an incomplete head or frame kept from before;
/// keeps what is still incomplete.
fn deliver(conn: &mut Conn, data: &[u8], sink: &mut Sink<'_>) {
    if conn.rbuf.is_empty() {
        let used = consume(conn, data, sink);
        if conn.state != State::Closed && used < data.len() {
            conn.rbuf.extend_from_slice(&data[used..]);
        }
    } else {
        let mut pending = std::mem::take(&mut conn.rbuf);
        pending.extend_from_slice(data);
        let used = consume(conn, &pending, sink);
        if conn.state != State::Closed && used < pending.len() {
            pending.drain(..used);
            conn.rbuf = pending;
        }
    }
}

/// Handles every complete response head / frame in `data`; returns the bytes used.
fn consume(conn: &mut Conn, data: &[u8], sink: &mut Sink<'_>) -> usize {
    let mut used = 0;
    if conn.state == State::Handshaking {
        // Recompute the key from the connection's global index: nothing stored per connection.
        let key = ws::ws_key(sink.plan.key_seed, sink.conn_index);
        match ws::parse_handshake(data, &key) {
            Handshake::Partial => {
                if data.len() > 16 * 1024 {
                    fail(conn, sink, "upgrade: response head too large".into());
                }
                return 0;
            }
            Handshake::Malformed => {
                fail(conn, sink, "upgrade: malformed response".into());
                return data.len();
            }
            Handshake::Refused(0) => {
                fail(conn, sink, "upgrade: wrong Sec-WebSocket-Accept".into());
                return data.len();
            }
            Handshake::Refused(code) => {
                fail(conn, sink, format!("upgrade: HTTP {code}"));
                return data.len();
            }
            Handshake::Upgraded(len) => {
                used = len;
                sink.counts.pending = sink.counts.pending.saturating_sub(1);
                sink.counts.established += 1;
                let now_ns = sink.shared.epoch.elapsed().as_nanos() as u64;
                sink.counts.last_established_ns = now_ns;
                sink.connect_latency.saturating_record(now_ns.saturating_sub(conn.started_ns).max(1));
                if sink.tls_info.is_none() {
                    sink.tls_info = conn.tls.as_deref().and_then(tls::describe);
                }
                match sink.plan.subscribe.as_deref() {
                    Some(text) => {
                        conn.state = State::Subscribing;
                        let frame = wsframe::masked_text(text, sink.rng.mask());
                        send(conn, sink, &frame);
                    }
                    None => open(conn, sink),
                }
            }
        }
    }
    while conn.state != State::Closed {
        let frame = match ws::parse_frame(&data[used..]) {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(why) => {
                closed(conn, sink, format!("protocol: {why}"));
                return data.len();
            }
        };
        used += frame.len;
        match frame.opcode {
            ws::OP_TEXT | ws::OP_BINARY if frame.fin => on_message(conn, frame.payload, sink),
            ws::OP_TEXT | ws::OP_BINARY | ws::OP_CONT => sink.counts.other_messages += 1,
            ws::OP_PING => {
                sink.counts.pings += 1;
                let echo = &frame.payload[..frame.payload.len().min(125)];
                let pong = wsframe::encode(true, ws::OP_PONG, echo, Some(sink.rng.mask()));
                send(conn, sink, &pong);
            }
            ws::OP_PONG => {}
            ws::OP_CLOSE => {
                let code = match frame.payload {
                    [a, b, ..] => u16::from_be_bytes([*a, *b]).to_string(),
                    _ => "none".into(),
                };
                let reason = String::from_utf8_lossy(frame.payload.get(2..).unwrap_or_default()).into_owned();
                let reason = if reason.is_empty() { format!("close {code}") } else { format!("close {code} {reason}") };
                closed(conn, sink, reason);
                return data.len();
            }
            _ => {
                closed(conn, sink, format!("protocol: opcode {}", frame.opcode));
                return data.len();
            }
        }
    }
    used
}

fn on_message(conn: &mut Conn, payload: &[u8], sink: &mut Sink<'_>) {
    let Some((seq, t)) = ws::load_fields(payload) else {
        if conn.state == State::Subscribing && ws::find(payload, b"subscribed").is_some() {
            open(conn, sink);
        } else {
            sink.counts.other_messages += 1;
        }
        return;
    };
    let in_window = t >= sink.window_start && t < sink.window_end;
    match conn.seq.observe(seq.min(u64::from(u32::MAX)) as u32) {
        Seen::Duplicate => {
            sink.counts.duplicates_all += 1;
            if in_window {
                sink.counts.duplicates_window += 1;
            }
        }
        seen => {
            if seen == Seen::TooOld {
                sink.counts.unchecked_reordered += 1;
            }
            sink.counts.received_all += 1;
            conn.last_rx_ns = sink.now_rt;
            if in_window {
                conn.window_msgs = conn.window_msgs.saturating_add(1);
                sink.counts.received_window += 1;
                sink.latency.saturating_record(sink.now_rt.saturating_sub(t).max(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream as StdTcpStream};
    use std::sync::Arc;
    use std::sync::atomic::Ordering::Release;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::shared::{Shared, Users};
    use crate::tls::testing::SelfSigned;

    /// One wss:// server connection on its own thread (blocking rustls): the upgrade, one load
    /// message, then whatever the client sends until it goes away.
    fn serve(tcp: StdTcpStream, config: Arc<rustls::ServerConfig>) {
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let Ok(session) = rustls::ServerConnection::new(config) else { return };
        let mut tls = rustls::StreamOwned::new(session, tcp);
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match tls.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => return, // a client that refused the certificate
            }
        }
        let head = String::from_utf8_lossy(&head);
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .expect("the upgrade request has a key")
            .trim();
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let reply = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        let message = format!(r#"{{"type":"load","seq":0,"t":{}}}"#, realtime_ns());
        let mut out = reply.into_bytes();
        out.extend_from_slice(&wsframe::encode(true, ws::OP_TEXT, message.as_bytes(), None));
        tls.write_all(&out).unwrap();
        let mut sink = [0u8; 1024];
        while matches!(tls.read(&mut sink), Ok(n) if n > 0) {}
    }

    /// Runs one worker with `conns` connections to a wss:// server with `cert`, trusting
    /// `trusted`, until `done` or 10 s; returns its report.
    fn run(conns: usize, cert: &SelfSigned, trusted: &SelfSigned, done: impl Fn(&Shared) -> bool) -> WorkerReport {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = cert.server_config();
        let server = std::thread::spawn(move || {
            let mut handlers = Vec::new();
            for _ in 0..conns {
                let Ok((tcp, _)) = listener.accept() else { break };
                let config = config.clone();
                handlers.push(std::thread::spawn(move || serve(tcp, config)));
            }
            for h in handlers {
                let _ = h.join();
            }
        });
        let plan = Arc::new(ConnPlan {
            endpoint: crate::cli::parse_endpoint(&format!("wss://localhost:{port}/ws")).unwrap(),
            source_ips: Vec::new(),
            connections: conns,
            threads: 1,
            connect_rate: 0.0,
            max_pending: 100,
            connect_timeout: Duration::from_secs(5),
            users: Users::Numbered { prefix: "u".into(), count: conns },
            topic: String::new(),
            subscribe: None,
            key_seed: 7,
            tls: Some(crate::tls::Client::new(Some(&trusted.ca_path()), "localhost").unwrap()),
        });
        let shared = Arc::new(Shared::new(conns, 1));
        let worker = Worker::new(0, plan, shared.clone(), None);
        let handle = std::thread::spawn(move || worker.run());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(&shared) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        shared.phase.store(PHASE_CLOSE, Release);
        let report = handle.join().unwrap().unwrap();
        server.join().unwrap();
        report
    }

    #[test]
    fn wss_connections_upgrade_and_receive_through_the_event_loop() {
        let cert = SelfSigned::new();
        let report = run(5, &cert, &cert, |s| s.sum(|w| &w.received_all) >= 5);
        let c = report.counts;
        assert_eq!((c.established, c.failed, c.received_all, c.duplicates_all), (5, 0, 5, 0), "{:?}", report.failures);
        assert!(report.tls.as_deref().is_some_and(|t| t.starts_with("TLSv1_3")), "{:?}", report.tls);
        assert!(report.connect_latency.len() == 5);
    }

    #[test]
    fn an_untrusted_certificate_fails_every_connection() {
        let (cert, other) = (SelfSigned::new(), SelfSigned::new());
        let report = run(3, &cert, &other, |s| s.sum(|w| &w.failed) >= 3);
        assert_eq!((report.counts.established, report.counts.failed), (0, 3));
        assert!(report.failures.keys().all(|k| k.contains("certificate")), "{:?}", report.failures);
        assert!(report.tls.is_none());
    }
}
