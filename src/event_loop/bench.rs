//! A real event loop with real sockets, for the delivery-path benchmarks (`benches/delivery.rs`):
//! `n` WebSocket sessions (or Server-Sent Events streams) are opened straight into the loop (the
//! HTTP upgrade is not what is measured), and a delivery runs the loop's own code: index
//! lookup, send queues, writev.
//! Not part of herald's API; it exists so a regression in the delivery path shows without a
//! load run.

use std::io::{self, Read};
use std::net::{TcpListener, TcpStream as StdStream};
use std::sync::Arc;
use std::time::SystemTime;

use super::EventLoop;
use crate::auth::Verifier;
use crate::broker::{Broker, Routing};
use crate::config::Config;
use crate::conn::{Conn, Http, NO_TIMER, Phase};
use crate::dialect::{SEED_003, Stream};
use crate::frame::SharedFrame;
use crate::http::routes::Upgrade;
use crate::ids::{DeliverTo, Exclusion, Target};
use crate::metrics::Metrics;
use crate::shared::Shared;

/// One loop holding `clients.len()` sessions; `clients[i]` is the peer socket of user `i`'s
/// connection (users are `u0`, `u1`, …; every session also receives the topic `all`).
pub struct DeliveryBench {
    event_loop: EventLoop,
    pub clients: Vec<StdStream>,
    users: Vec<Target>,
    all: Target,
    buf: Vec<u8>,
}

impl DeliveryBench {
    /// Opens `n` sessions of `n` users on a loop of a server configured by `config`.
    pub fn new(config: Config, n: usize) -> io::Result<DeliveryBench> {
        DeliveryBench::open(config, n, false)
    }

    /// Like [`DeliveryBench::new`], with Server-Sent Events streams instead of WebSockets.
    pub fn event_streams(config: Config, n: usize) -> io::Result<DeliveryBench> {
        DeliveryBench::open(config, n, true)
    }

    fn open(config: Config, n: usize, event_streams: bool) -> io::Result<DeliveryBench> {
        let verifier = Verifier::new(&config.jwt_key).map_err(io::Error::other)?;
        let metrics = Arc::new(Metrics::new(1, false));
        let routing = Arc::new(Routing::default());
        let (poll, handle, inbox) = crate::mailbox::prepare()?;
        routing.attach(Arc::from(vec![handle]));
        let shared = Arc::new(Shared::new(
            config,
            verifier,
            metrics,
            routing,
            Broker::Embedded { webhook: None, history: None },
            0,
        ));
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let loop_listener = mio::net::TcpListener::from_std(listener.try_clone()?);
        let mut event_loop = EventLoop::new(0, shared, poll, loop_listener, inbox)?;
        let mut clients = Vec::with_capacity(n);
        let mut users = Vec::with_capacity(n);
        for i in 0..n {
            let client = StdStream::connect(addr)?;
            client.set_nonblocking(true)?;
            let (server, peer) = loop {
                match listener.accept() {
                    Ok(pair) => break pair,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                    Err(e) => return Err(e),
                }
            };
            server.set_nonblocking(true)?;
            let user = format!("u{i}");
            let stream = mio::net::TcpStream::from_std(server);
            if event_streams {
                event_loop.install_event_stream(stream, peer.ip(), &user)?;
            } else {
                let key = event_loop.install(stream, peer.ip(), &user)?;
                event_loop.subscribe_for_bench(key, "all");
            }
            clients.push(client);
            users.push(Target::user(&user));
        }
        event_loop.flush_dirty();
        let mut bench = DeliveryBench { event_loop, clients, users, all: Target::topic("all"), buf: vec![0; 1 << 16] };
        bench.drain();
        Ok(bench)
    }

    /// Delivers `frame` to user `i`'s connection and flushes it to the socket.
    pub fn unicast(&mut self, i: usize, frame: &SharedFrame) {
        let to = DeliverTo::One(self.users[i % self.users.len()].clone());
        self.event_loop.deliver(&to, frame, &Exclusion::default());
        self.event_loop.flush_dirty();
    }

    /// Delivers `frame` to every connection (the topic they all hold) and flushes.
    pub fn broadcast(&mut self, frame: &SharedFrame) {
        let to = DeliverTo::One(self.all.clone());
        self.event_loop.deliver(&to, frame, &Exclusion::default());
        self.event_loop.flush_dirty();
    }

    /// Reads and discards what the clients received, so their sockets never fill.
    pub fn drain(&mut self) -> usize {
        let mut total = 0;
        for client in &mut self.clients {
            loop {
                match client.read(&mut self.buf) {
                    Ok(0) => break,
                    Ok(n) => total += n,
                    Err(_) => break,
                }
            }
        }
        total
    }

    /// Sessions still open (a slow consumer would have been closed).
    pub fn open_sessions(&self) -> usize {
        self.event_loop.conns.iter().filter(|(_, c)| matches!(c.phase, Phase::Open(_))).count()
    }
}

impl EventLoop {
    /// Puts `stream` into the slab and opens a session of `user` on it, as an upgrade would.
    fn install(&mut self, stream: mio::net::TcpStream, peer: std::net::IpAddr, user: &str) -> io::Result<u32> {
        let key = self.insert_plain(stream, peer)?;
        let upgrade = Upgrade {
            dialect: &SEED_003,
            stream: Stream::Personal,
            identity: Ok(bench_identity(user)),
            response: b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec(),
            since: None,
        };
        self.shared.admission.reserve(&self.shared.routing.table, user).map_err(|_| io::Error::other("admission"))?;
        self.open(key, upgrade);
        Ok(key)
    }

    /// Puts `stream` into the slab and opens an event stream of `user` (with topic `all`) on it.
    fn install_event_stream(
        &mut self,
        stream: mio::net::TcpStream,
        peer: std::net::IpAddr,
        user: &str,
    ) -> io::Result<u32> {
        let key = self.insert_plain(stream, peer)?;
        let open = crate::http::sse::Open {
            identity: bench_identity(user),
            topics: vec!["all".into()],
            since: None,
            head: b"HTTP/1.1 200 OK\r\n\r\n".to_vec(),
        };
        self.shared.admission.reserve(&self.shared.routing.table, user).map_err(|_| io::Error::other("admission"))?;
        self.open_event_stream(key, open);
        Ok(key)
    }

    fn insert_plain(&mut self, mut stream: mio::net::TcpStream, peer: std::net::IpAddr) -> io::Result<u32> {
        let entry = self.conns.vacant_entry();
        let key = entry.key() as u32;
        self.poll.registry().register(&mut stream, mio::Token(key as usize), mio::Interest::READABLE)?;
        self.next_conn_id = self.next_conn_id.wrapping_add(1);
        entry.insert(Conn {
            stream,
            tls: None,
            id: self.next_conn_id,
            phase: Phase::Http(Box::new(Http::new(peer, self.now_tick.saturating_add(self.timeouts.handshake)))),
            queue: Default::default(),
            timer_tick: NO_TIMER,
            registered: mio::Interest::READABLE,
            write_blocked: false,
            dirty: false,
            plain: false,
        });
        Ok(key)
    }

    fn subscribe_for_bench(&mut self, key: u32, topic: &str) {
        self.subscribe(key, topic.to_string(), true, None);
    }
}

fn bench_identity(user: &str) -> crate::auth::Identity {
    let exp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()) + 3600;
    crate::auth::Identity { user: Arc::from(user), topics: vec!["all".into()], can_publish: false, exp }
}
