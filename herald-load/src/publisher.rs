//! The publisher thread: messages on a fixed schedule (open loop) or as fast as deliveries
//! come back (closed loop, bounded in-flight), over Redis (pipelined PUBLISH, raw RESP) or
//! HTTP or HTTPS (keep-alive POSTs, one request in flight per connection).
//!
//! Open loop: message k is due at start + k / rate and carries that scheduled time as `t`,
//! whenever it actually leaves; a publisher (or server) that falls behind therefore shows
//! up as latency instead of hiding it (no coordinated omission). A timerfd wakes the loop
//! at each due time with nanosecond precision.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use hdrhistogram::Histogram;
use rustls::ClientConnection;

use crate::cli::{Endpoint, Rate, Template, Vars};
use crate::shared::Shared;
use crate::sys::{Epoll, TimerFd, clock::realtime_ns};

type TcpStream = StdTcpStream;
use crate::worker::new_histogram;

/// Where messages go.
#[derive(Debug)]
pub enum Target {
    /// Round-robin over these users; message k goes to user k mod n with seq k / n.
    Users(Vec<String>),
    /// Every message to one user (user index 0 of the connections).
    User(String),
    /// Every message to one topic, which every connection subscribed to.
    Topic(String),
    /// Round-robin over users no connection belongs to: nothing to deliver, the publish API
    /// alone is measured.
    Absent(Vec<String>),
}

#[derive(Debug)]
pub enum Transport {
    Redis {
        addr: SocketAddr,
        channel: Template,
        command: String,
    },
    /// `tls`: https://, with this configuration.
    Http {
        endpoint: Endpoint,
        body: Template,
        auth: Option<String>,
        conns: usize,
        tls: Option<crate::tls::Client>,
        /// Messages per request: above 1, the body is `{"items":[<body>, …]}`.
        batch: usize,
    },
}

#[derive(Debug)]
pub struct PubPlan {
    pub transport: Transport,
    pub rate: Rate,
    pub target: Target,
    pub payload_bytes: usize,
    pub max_inflight: u64,
    /// Open loop: minimum time between two wakeups, ns.
    pub batch_ns: u64,
    /// Publishing runs over [start_ns, end_ns) (CLOCK_REALTIME); then at most `drain` more
    /// to send a backlog.
    pub start_ns: u64,
    pub end_ns: u64,
    pub drain: Duration,
}

/// What the publisher did.
#[derive(Debug)]
pub struct PubReport {
    pub sent_all: u64,
    pub sent_window: u64,
    /// Deliveries the live connections should have seen.
    pub expected_all: u64,
    pub expected_window: u64,
    pub replies_ok: u64,
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    /// Redis replied 0 subscribers / herald replied "sent":false.
    pub not_routed: u64,
    /// Responses on a connection with no request in flight: the server closing an idle
    /// keep-alive connection (herald answers 408 when its request deadline passes). No
    /// message was carried, so they are not errors.
    pub idle_closes: u64,
    /// Scheduled messages still queued when the drain time ran out.
    pub unsent: u64,
    pub backlog_max: u64,
    /// --rate max: in-flight deliveries given up on after a second without progress.
    pub written_off: u64,
    /// Actual send time - scheduled time, ns.
    pub lag: Histogram<u64>,
    /// Realtime ns when the last window message was handed to the socket.
    pub last_send_ns: u64,
}

const TIMER: u64 = u64::MAX;
const REDIS: u64 = 0;
const MAX_BACKLOG: usize = 4_000_000;

struct HttpConn {
    stream: TcpStream,
    /// https://: the session; `wbuf` then holds plaintext not yet handed to it.
    tls: Option<ClientConnection>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    busy: bool,
    /// Messages in the request in flight.
    items: u64,
}

impl HttpConn {
    /// Connects (and, for https://, completes the TLS handshake, blocking: before publishing
    /// starts, or on a reconnect, which is an error path anyway).
    fn open(addr: SocketAddr, tls: Option<&crate::tls::Client>) -> io::Result<HttpConn> {
        let mut stream = connect_stream(addr)?;
        let session = match tls {
            None => None,
            Some(client) => {
                let mut session = client.connect().map_err(io::Error::other)?;
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                stream.set_write_timeout(Some(Duration::from_secs(5)))?;
                while session.is_handshaking() {
                    session.complete_io(&mut stream)?;
                }
                stream.set_read_timeout(None)?;
                stream.set_write_timeout(None)?;
                stream.set_nonblocking(true)?;
                Some(session)
            }
        };
        Ok(HttpConn { stream, tls: session, rbuf: Vec::new(), wbuf: Vec::new(), busy: false, items: 0 })
    }

    /// Writes as much of the queued request as the socket takes.
    fn flush(&mut self) -> io::Result<()> {
        let Some(session) = self.tls.as_mut() else { return flush(&mut self.stream, &mut self.wbuf) };
        if !self.wbuf.is_empty() {
            session.writer().write_all(&self.wbuf)?;
            self.wbuf.clear();
        }
        crate::tls::flush(session, &mut self.stream).map(|_| ())
    }
}

struct Publisher<'a> {
    plan: &'a PubPlan,
    shared: &'a Shared,
    poll: Epoll,
    report: PubReport,
    queue: VecDeque<(u64, u64)>,
    scratch: Vec<u8>,
    payload: Vec<u8>,
    /// (scheduled time, recipients) of the messages in the request being built.
    batch: Vec<(u64, u64)>,
    redis: Option<(TcpStream, Vec<u8>, Vec<u8>)>,
    http: Vec<HttpConn>,
    window_start: u64,
    window_end: u64,
}

pub fn run(plan: PubPlan, shared: Arc<Shared>) -> Result<PubReport, String> {
    crate::sys::tighten_timer_slack();
    let poll = Epoll::new().map_err(|e| format!("publisher: {e}"))?;
    let mut p = Publisher {
        plan: &plan,
        shared: &shared,
        poll,
        report: PubReport {
            sent_all: 0,
            sent_window: 0,
            expected_all: 0,
            expected_window: 0,
            replies_ok: 0,
            errors: 0,
            error_kinds: BTreeMap::new(),
            not_routed: 0,
            idle_closes: 0,
            unsent: 0,
            backlog_max: 0,
            written_off: 0,
            lag: new_histogram(),
            last_send_ns: 0,
        },
        queue: VecDeque::new(),
        scratch: Vec::with_capacity(64 * 1024),
        payload: Vec::with_capacity(1024),
        batch: Vec::new(),
        redis: None,
        http: Vec::new(),
        window_start: shared.window_start_ns.load(Relaxed),
        window_end: shared.window_end_ns.load(Relaxed),
    };
    p.connect()?;
    p.run().map_err(|e| format!("publisher: {e}"))?;
    Ok(p.report)
}

fn connect_stream(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = StdTcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_nonblocking(true)?;
    Ok(stream)
}

impl Publisher<'_> {
    fn connect(&mut self) -> Result<(), String> {
        match &self.plan.transport {
            Transport::Redis { addr, .. } => {
                let stream = connect_stream(*addr).map_err(|e| format!("cannot connect to Redis at {addr}: {e}"))?;
                // Replies are read once per loop turn, not on their own wakeup: one PUBLISH
                // would otherwise cost two wakeups of this thread.
                self.poll.add(stream.as_raw_fd(), REDIS, false, true).map_err(|e| e.to_string())?;
                self.redis = Some((stream, Vec::new(), Vec::new()));
            }
            Transport::Http { endpoint, conns, tls, .. } => {
                for i in 0..(*conns).max(1) {
                    let conn = HttpConn::open(endpoint.addr, tls.as_ref())
                        .map_err(|e| format!("cannot connect to publish URL {}: {e}", endpoint.addr))?;
                    self.poll.add(conn.stream.as_raw_fd(), i as u64 + 1, true, true).map_err(|e| e.to_string())?;
                    self.http.push(conn);
                }
            }
        }
        Ok(())
    }

    fn scheduled(&self, k: u64, rate: f64) -> u64 {
        self.plan.start_ns + (k as f64 * 1e9 / rate) as u64
    }

    fn recipients(&self, k: u64) -> (usize, u64, u64) {
        match &self.plan.target {
            Target::Users(names) => {
                let n = names.len().max(1) as u64;
                let user = (k % n) as usize;
                let live = self.shared.live_per_user.get(user).map_or(0, |c| u64::from(c.load(Relaxed)));
                (user, k / n, live)
            }
            Target::User(_) | Target::Topic(_) => (0, k, self.shared.live_total.load(Relaxed)),
            Target::Absent(names) => {
                let n = names.len().max(1) as u64;
                ((k % n) as usize, k / n, 0)
            }
        }
    }

    fn transport_idle(&self) -> bool {
        match &self.redis {
            Some((_, out, _)) => out.is_empty(),
            None => self.http.iter().all(|c| !c.busy),
        }
    }

    fn run(&mut self) -> io::Result<()> {
        let timer = TimerFd::new()?;
        self.poll.add(timer.raw_fd(), TIMER, true, false)?;
        let mut events = Vec::with_capacity(64);
        let mut k: u64 = 0;
        let drain_ns = self.plan.drain.as_nanos() as u64;
        let mut last_received = 0u64;
        let mut stalled_since = realtime_ns();
        loop {
            let now = realtime_ns();
            let mut wait = Duration::from_millis(20);
            match self.plan.rate {
                Rate::Fixed(rate) => loop {
                    let t = self.scheduled(k, rate);
                    if t > now || t >= self.plan.end_ns {
                        if t < self.plan.end_ns {
                            timer.arm_at(t.max(now + self.plan.batch_ns))?;
                        }
                        break;
                    }
                    if self.queue.len() < MAX_BACKLOG {
                        self.queue.push_back((k, t));
                    } else {
                        self.report.unsent += 1;
                    }
                    k += 1;
                },
                Rate::Max if now < self.plan.end_ns => {
                    let received = self.shared.sum(|w| &w.received_all);
                    let inflight = self.report.expected_all.saturating_sub(received + self.report.written_off);
                    if received != last_received {
                        last_received = received;
                        stalled_since = now;
                    } else if inflight > 0 && now.saturating_sub(stalled_since) > 1_000_000_000 {
                        // Nothing came back for a second: those deliveries are lost; go on.
                        self.report.written_off += inflight;
                        stalled_since = now;
                    }
                    let room = self.plan.max_inflight.saturating_sub(inflight);
                    let per_request = match &self.plan.transport {
                        Transport::Http { batch, .. } => (*batch).max(1) as u64,
                        Transport::Redis { .. } => 1,
                    };
                    let capacity = match &self.redis {
                        Some((_, out, _)) if out.len() < 256 * 1024 => 512,
                        Some(_) => 0,
                        None => self.http.iter().filter(|c| !c.busy).count() as u64 * per_request,
                    };
                    // Each message may fan out to many deliveries: keep the room in messages.
                    let per_msg = match &self.plan.target {
                        Target::Users(_) | Target::Absent(_) => 1,
                        _ => self.shared.live_total.load(Relaxed).max(1),
                    };
                    let n = (room / per_msg).min(capacity).saturating_sub(self.queue.len() as u64);
                    for _ in 0..n {
                        self.queue.push_back((k, now));
                        k += 1;
                    }
                    wait = Duration::from_millis(1);
                }
                Rate::Max => {}
            }
            // Everything due before the end is queued by now; stop once it is out, or at the
            // end of the drain time.
            if now >= self.plan.end_ns {
                if self.queue.is_empty() && self.transport_idle() {
                    break;
                }
                if now >= self.plan.end_ns + drain_ns {
                    self.report.unsent += self.queue.len() as u64;
                    break;
                }
            }
            self.report.backlog_max = self.report.backlog_max.max(self.queue.len() as u64);
            self.dispatch()?;
            if let Some((stream, out, _)) = self.redis.as_mut() {
                flush(stream, out)?;
            }
            if self.redis.is_some() {
                self.on_redis()?;
            }
            events.clear();
            self.poll.wait(&mut events, wait.as_millis() as i32)?;
            for &token in &events {
                match token {
                    // Re-arming resets the timerfd's expiry count: no read needed.
                    TIMER => {}
                    REDIS if self.redis.is_some() => self.on_redis()?,
                    i => self.on_http(i as usize - 1)?,
                }
            }
        }
        Ok(())
    }

    /// The message bytes for (k, t) into `self.payload`; returns (user index, recipients).
    fn build(&mut self, k: u64, t: u64) -> u64 {
        let (_, seq, live) = self.recipients(k);
        let p = &mut self.payload;
        p.clear();
        let _ = write!(p, r#"{{"type":"load","seq":{seq},"t":{t},"pad":""#);
        let pad = self.plan.payload_bytes.saturating_sub(p.len() + 2);
        p.resize(p.len() + pad, b'x');
        p.extend_from_slice(b"\"}");
        live
    }

    fn account(&mut self, t: u64, live: u64) {
        let now = realtime_ns();
        self.report.sent_all += 1;
        self.report.expected_all += live;
        self.report.lag.saturating_record(now.saturating_sub(t).max(1));
        if t >= self.window_start && t < self.window_end {
            self.report.sent_window += 1;
            self.report.expected_window += live;
            self.report.last_send_ns = now;
        }
    }
}

fn target_names(plan: &PubPlan, k: u64) -> (&str, &str) {
    match &plan.target {
        Target::Users(names) | Target::Absent(names) => (names[(k % names.len().max(1) as u64) as usize].as_str(), ""),
        Target::User(name) => (name.as_str(), ""),
        Target::Topic(topic) => ("", topic.as_str()),
    }
}

impl Publisher<'_> {
    fn dispatch(&mut self) -> io::Result<()> {
        let plan = self.plan;
        match &plan.transport {
            Transport::Redis { channel, command, .. } => {
                while let Some((k, t)) = self.queue.pop_front() {
                    let live = self.build(k, t);
                    let (user, topic) = target_names(plan, k);
                    self.scratch.clear();
                    channel.render(&mut self.scratch, &Vars { user, topic, ..Vars::default() });
                    let Some((_, out, _)) = self.redis.as_mut() else { break };
                    let _ = write!(out, "*3\r\n${}\r\n{command}\r\n${}\r\n", command.len(), self.scratch.len());
                    out.extend_from_slice(&self.scratch);
                    let _ = write!(out, "\r\n${}\r\n", self.payload.len());
                    out.extend_from_slice(&self.payload);
                    out.extend_from_slice(b"\r\n");
                    self.account(t, live);
                }
            }
            Transport::Http { endpoint, body, auth, batch, .. } => {
                let batch = (*batch).max(1);
                for i in 0..self.http.len() {
                    if self.http[i].busy {
                        continue;
                    }
                    if self.queue.is_empty() {
                        break;
                    }
                    let mut path = Vec::with_capacity(64);
                    self.scratch.clear();
                    self.batch.clear();
                    if batch > 1 {
                        self.scratch.extend_from_slice(br#"{"items":["#);
                    }
                    while self.batch.len() < batch {
                        let Some((k, t)) = self.queue.pop_front() else { break };
                        let live = self.build(k, t);
                        let (user, topic) = target_names(plan, k);
                        let vars = Vars { user, topic, payload: &self.payload, token: "" };
                        if self.batch.is_empty() {
                            endpoint.path.render(&mut path, &vars);
                        } else {
                            self.scratch.push(b',');
                        }
                        body.render(&mut self.scratch, &vars);
                        self.batch.push((t, live));
                    }
                    if batch > 1 {
                        self.scratch.extend_from_slice(b"]}");
                    }
                    let conn = &mut self.http[i];
                    let req = &mut conn.wbuf;
                    req.extend_from_slice(b"POST ");
                    req.extend_from_slice(&path);
                    let _ = write!(
                        req,
                        " HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
                        endpoint.host,
                        self.scratch.len()
                    );
                    if let Some(auth) = auth {
                        let _ = write!(req, "Authorization: Bearer {auth}\r\n");
                    }
                    req.extend_from_slice(b"\r\n");
                    req.extend_from_slice(&self.scratch);
                    conn.busy = true;
                    conn.items = self.batch.len() as u64;
                    if let Err(e) = conn.flush() {
                        self.http_failed(i, &e)?;
                    }
                    for j in 0..self.batch.len() {
                        let (t, live) = self.batch[j];
                        self.account(t, live);
                    }
                }
            }
        }
        Ok(())
    }

    fn error(&mut self, kind: String) {
        self.errors(kind, 1);
    }

    /// A failed request counts once per message it carried.
    fn errors(&mut self, kind: String, messages: u64) {
        self.report.errors += messages;
        *self.report.error_kinds.entry(kind).or_default() += messages;
    }

    fn on_redis(&mut self) -> io::Result<()> {
        let Some((stream, out, inbuf)) = self.redis.as_mut() else { return Ok(()) };
        flush(stream, out)?;
        let mut chunk = [0u8; 16 * 1024];
        let mut replies = Vec::new();
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "Redis closed the connection")),
                Ok(n) => inbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // (S)PUBLISH answers one line each: ":<receivers>" or "-ERR ...".
        let mut used = 0;
        while let Some(end) = inbuf[used..].windows(2).position(|w| w == b"\r\n") {
            let line = &inbuf[used..used + end];
            used += end + 2;
            replies.push(match line.first() {
                Some(b':') => Ok(line[1..] != *b"0"),
                _ => Err(String::from_utf8_lossy(line).chars().take(80).collect::<String>()),
            });
        }
        inbuf.drain(..used);
        for reply in replies {
            match reply {
                Ok(true) => self.report.replies_ok += 1,
                Ok(false) => {
                    self.report.replies_ok += 1;
                    self.report.not_routed += 1;
                }
                Err(line) => self.error(format!("redis: {line}")),
            }
        }
        Ok(())
    }

    fn on_http(&mut self, i: usize) -> io::Result<()> {
        let Some(conn) = self.http.get_mut(i) else { return Ok(()) };
        if let Err(e) = conn.flush() {
            return self.http_failed(i, &e);
        }
        let mut chunk = [0u8; 8 * 1024];
        let mut eof = false;
        loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => match conn.tls.as_mut() {
                    None => conn.rbuf.extend_from_slice(&chunk[..n]),
                    Some(session) => match crate::tls::receive(session, &chunk[..n], &mut conn.rbuf) {
                        Ok(peer_closed) => eof |= peer_closed,
                        Err(why) => {
                            self.error(format!("http: {why}"));
                            return self.reconnect(i);
                        }
                    },
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.http_failed(i, &e),
            }
        }
        loop {
            let conn = &mut self.http[i];
            let (status, len, close, not_routed) = match parse_http_response(&conn.rbuf) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(why) => {
                    self.error(format!("http: {why}"));
                    return self.reconnect(i);
                }
            };
            conn.rbuf.drain(..len);
            if !std::mem::replace(&mut conn.busy, false) {
                self.report.idle_closes += 1;
                if close {
                    return self.reconnect(i);
                }
                continue;
            }
            let items = std::mem::take(&mut conn.items).max(1);
            if (200..300).contains(&status) {
                self.report.replies_ok += items;
                self.report.not_routed += not_routed;
            } else {
                self.errors(format!("http {status}"), items);
            }
            if close {
                return self.reconnect(i);
            }
        }
        if eof {
            if self.http[i].busy {
                self.error("http: connection closed before the response".into());
            }
            return self.reconnect(i);
        }
        Ok(())
    }

    fn http_failed(&mut self, i: usize, e: &io::Error) -> io::Result<()> {
        self.error(format!("http: {}", e.kind()));
        self.reconnect(i)
    }

    fn reconnect(&mut self, i: usize) -> io::Result<()> {
        let plan = self.plan;
        let Transport::Http { endpoint, tls, .. } = &plan.transport else { return Ok(()) };
        self.poll.remove(self.http[i].stream.as_raw_fd());
        let conn = HttpConn::open(endpoint.addr, tls.as_ref())?;
        self.poll.add(conn.stream.as_raw_fd(), i as u64 + 1, true, true)?;
        self.http[i] = conn;
        Ok(())
    }
}

/// Writes as much of `out` as the socket takes.
fn flush(stream: &mut TcpStream, out: &mut Vec<u8>) -> io::Result<()> {
    let mut done = 0;
    while done < out.len() {
        match stream.write(&out[done..]) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "socket closed")),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    out.drain(..done);
    Ok(())
}

/// One complete response at the start of `buf`: (status, bytes, server closes, messages not
/// routed: `"sent":false`, or the `false`s of a batch's `"sent":[…]`).
fn parse_http_response(buf: &[u8]) -> Result<Option<(u16, usize, bool, u64)>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("malformed response"),
    };
    let status = response.code.unwrap_or(0);
    let mut length = None;
    let mut chunked = false;
    let mut close = response.version == Some(0);
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<usize>().ok());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h.value.windows(7).any(|w| w.eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.windows(5).any(|w| w.eq_ignore_ascii_case(b"close"));
        }
    }
    let total = if chunked {
        match crate::ws::find(&buf[head..], b"0\r\n\r\n") {
            Some(i) => head + i + 5,
            None => return Ok(None),
        }
    } else {
        head + length.unwrap_or(0)
    };
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((status, total, close, not_routed(&buf[head..total]))))
}

fn not_routed(body: &[u8]) -> u64 {
    let Some(at) = crate::ws::find(body, b"\"sent\":") else { return 0 };
    let rest = &body[at + 7..];
    if rest.starts_with(b"false") {
        return 1;
    }
    if !rest.starts_with(b"[") {
        return 0;
    }
    let list = &rest[..rest.iter().position(|&b| b == b']').unwrap_or(rest.len())];
    list.windows(5).filter(|w| *w == b"false").count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_responses_are_framed() {
        let body = r#"{"status":"success","sent":false}"#;
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        let r = format!("{head}HTTP/1.1 200");
        assert_eq!(parse_http_response(r.as_bytes()).unwrap(), Some((200, head.len(), false, 1)));
        assert_eq!(parse_http_response(&r.as_bytes()[..30]).unwrap(), None);
        let c = b"HTTP/1.1 401 No\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse_http_response(c).unwrap(), Some((401, c.len(), true, 0)));
        let ch = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        assert_eq!(parse_http_response(ch).unwrap(), Some((201, ch.len(), false, 0)));
        let batch = br#"{"status":"success","sent":[true,false,false,true]} false"#;
        assert_eq!(not_routed(batch), 2);
        assert_eq!(not_routed(br#"{"status":"success","sent":true}"#), 0);
    }

    /// Serves `POST /publish/batch` on a real socket: checks each body is a batch of at most
    /// `max_items` well-formed items addressed to absent users, and answers every second item
    /// "not sent". Returns (requests, items, items answered false).
    fn batch_server(listener: std::net::TcpListener, max_items: usize) -> (u64, u64, u64) {
        let (mut sock, _) = listener.accept().expect("accept");
        sock.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let (mut requests, mut items, mut falses) = (0u64, 0u64, 0u64);
        let mut buf = Vec::new();
        let mut chunk = [0u8; 64 * 1024];
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(head)) = req.parse(&buf) {
                assert_eq!((req.method, req.path), (Some("POST"), Some("/publish/batch")));
                let len = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                    .expect("content-length");
                if buf.len() >= head + len {
                    let body: serde_json::Value = serde_json::from_slice(&buf[head..head + len]).expect("JSON body");
                    let list = body["items"].as_array().expect("items");
                    assert!(!list.is_empty() && list.len() <= max_items, "{} items", list.len());
                    let mut sent = Vec::new();
                    for (j, item) in list.iter().enumerate() {
                        assert!(item["user_id"].as_str().is_some_and(|u| u.starts_with("u-absent-")), "{item}");
                        assert_eq!(item["message"]["type"], "load");
                        sent.push(j % 2 == 0);
                    }
                    requests += 1;
                    items += list.len() as u64;
                    falses += sent.iter().filter(|s| !**s).count() as u64;
                    let reply = serde_json::json!({"status": "success", "sent": sent}).to_string();
                    let out = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{reply}", reply.len());
                    sock.write_all(out.as_bytes()).expect("reply");
                    buf.drain(..head + len);
                    continue;
                }
            }
            match sock.read(&mut chunk) {
                Ok(0) | Err(_) => return (requests, items, falses),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The first connection gets an unsolicited 408 and is closed (what herald does to an
    /// idle keep-alive connection); the second is served. Returns the requests served.
    fn idle_closing_server(listener: std::net::TcpListener) -> u64 {
        let (mut first, _) = listener.accept().expect("accept");
        first
            .write_all(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            .expect("408");
        drop(first);
        let (mut sock, _) = listener.accept().expect("accept again");
        sock.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let (mut served, mut buf, mut chunk) = (0u64, Vec::new(), [0u8; 16 * 1024]);
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(head)) = req.parse(&buf) {
                let len = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                    .expect("content-length");
                if buf.len() >= head + len {
                    let reply = r#"{"status":"success","sent":true}"#;
                    let out = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{reply}", reply.len());
                    sock.write_all(out.as_bytes()).expect("reply");
                    buf.drain(..head + len);
                    served += 1;
                    continue;
                }
            }
            match sock.read(&mut chunk) {
                Ok(0) | Err(_) => return served,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Publishing over one HTTP connection, `batch` messages a request, to users who are not
    /// connected, from `start_ns` to `end_ns`.
    fn http_plan(
        endpoint: Endpoint,
        batch: usize,
        rate: Rate,
        users: Vec<String>,
        start_ns: u64,
        end_ns: u64,
    ) -> PubPlan {
        PubPlan {
            transport: Transport::Http {
                endpoint,
                body: Template::new(r#"{"user_id":"{user}","message":{payload}}"#),
                auth: None,
                conns: 1,
                tls: None,
                batch,
            },
            rate,
            target: Target::Absent(users),
            payload_bytes: 100,
            max_inflight: 2000,
            batch_ns: 0,
            start_ns,
            end_ns,
            drain: Duration::from_secs(2),
        }
    }

    #[test]
    fn a_response_on_an_idle_connection_is_no_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || idle_closing_server(listener));
        let endpoint = crate::cli::parse_endpoint(&format!("http://{addr}/publish")).expect("endpoint");
        // Publishing starts late enough for the 408 to arrive on the idle connection first.
        let start = realtime_ns() + 300_000_000;
        let shared = Arc::new(Shared::new(1, 1));
        shared.window_start_ns.store(start, Relaxed);
        shared.window_end_ns.store(start + 200_000_000, Relaxed);
        let plan = http_plan(endpoint, 1, Rate::Fixed(100.0), vec!["u-absent-0".into()], start, start + 200_000_000);
        let report = run(plan, shared).expect("publisher");
        let served = server.join().expect("server thread");
        assert!(served > 0);
        assert_eq!((report.idle_closes, report.errors), (1, 0), "{:?}", report.error_kinds);
        assert_eq!((report.sent_all, report.replies_ok), (served, served));
    }

    #[test]
    fn batches_carry_up_to_n_messages_and_count_per_message() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || batch_server(listener, 7));
        let endpoint = crate::cli::parse_endpoint(&format!("http://{addr}/publish/batch")).expect("endpoint");
        let now = realtime_ns();
        let shared = Arc::new(Shared::new(1, 1));
        shared.window_start_ns.store(now, Relaxed);
        shared.window_end_ns.store(now + 300_000_000, Relaxed);
        let users = (0..10).map(|i| format!("u-absent-{i}")).collect();
        let plan = http_plan(endpoint, 7, Rate::Max, users, now, now + 300_000_000);
        let report = run(plan, shared).expect("publisher");
        // The publisher is done: its socket is closed, so the server's read returns 0.
        let (requests, items, falses) = server.join().expect("server thread");
        assert!(requests > 1, "{requests} requests");
        assert!(items > requests, "batches of one: {items} items in {requests} requests");
        assert_eq!((report.sent_all, report.replies_ok, report.errors), (items, items, 0));
        assert_eq!(report.not_routed, falses);
        assert_eq!(report.expected_all, 0, "absent users receive nothing");
    }
}
