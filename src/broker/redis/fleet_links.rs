//! The fleet thread's command connections: one to the Redis of a standalone setup, or one per
//! master of a Redis Cluster, each command sent to the master serving its key's slot.
//!
//! Every connection starts with `FUNCTION LOAD REPLACE` of herald's library, before anything
//! else on it: functions live on each node (a cluster does not copy them between masters), so
//! every master herald talks to, including one that appears later (a resharding to a new
//! master, a promoted replica, which has the library by replication but gets it again), is
//! given the library before the first `FCALL` reaches it.
//!
//! Redirects are followed as the publisher does: `MOVED` updates the slot map and the command
//! goes to the node it names, `ASK` sends it there once after `ASKING`; `TRYAGAIN`,
//! `CLUSTERDOWN`, `LOADING`, `READONLY` (the node became a replica) and a function not loaded
//! yet are retried after a short backoff. A command gets [`MAX_TRIES`] sends in all, then
//! fails: a redirect storm never loops. A connection that dies fails what it had not
//! answered (the caller decides what a failure means), and is opened again with backoff.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Interest, Poll, Token};
use tracing::{debug, info, warn};

use super::conn::{Conn, Failure, RedisTls};
use super::node_links::{NodeLink, NodeLinks};
use super::redis_url::RedisUrl;
use super::resp::{self, ServerError, Value};
use super::slots::{self, NodeAddr, SlotMap};
use super::topology::Topology;
use super::{Backoff, CONNECT_TIMEOUT};

/// Sends of one command, redirects and retries included.
pub const MAX_TRIES: u8 = 5;
/// The first retry after TRYAGAIN and the like waits this long, doubling after.
const RETRY_START: Duration = Duration::from_millis(50);
/// A reply not back after this long means the connection is wedged.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes one reply may hold (a sweep step's member list is the largest).
const MAX_REPLY: usize = 1024 * 1024;
/// The name of these connections in CLIENT LIST.
const NAME: &str = "herald-fleet";

/// Where the fleet's Redis is.
pub enum Place {
    Standalone(RedisUrl),
    Cluster(Arc<Topology>),
}

/// A reply, owned (the decoder's values borrow its buffer).
#[derive(Debug)]
pub enum Reply {
    Int(i64),
    Text(String),
    List(Vec<Reply>),
    Nil,
    Error(String),
}

impl Reply {
    fn of(value: &Value<'_>, depth: u8) -> Reply {
        if let Some(text) = error_text(value) {
            return Reply::Error(text);
        }
        if let Some(n) = value.as_integer() {
            return Reply::Int(n);
        }
        if let Some(bytes) = value.as_bytes() {
            return Reply::Text(String::from_utf8_lossy(bytes).into_owned());
        }
        match value.items() {
            Some(items) if depth < 2 => Reply::List(items.iter().map(|v| Reply::of(&v, depth + 1)).collect()),
            _ => Reply::Nil,
        }
    }

    pub fn texts(self) -> Vec<String> {
        match self {
            Reply::List(items) => {
                items.into_iter().filter_map(|r| if let Reply::Text(t) = r { Some(t) } else { None }).collect()
            }
            _ => Vec::new(),
        }
    }
}

fn error_text(value: &Value<'_>) -> Option<String> {
    match *value {
        Value::Error(text) | Value::BulkError(text) => Some(String::from_utf8_lossy(text).into_owned()),
        _ => None,
    }
}

/// One command, owned so that a redirect can send it again.
pub struct Cmd<T> {
    args: Vec<Vec<u8>>,
    slot: u16,
    pub tag: T,
    tries: u8,
}

impl<T> Cmd<T> {
    /// A command whose slot is its key's: the first key of an `FCALL`, else the first
    /// argument (the key, or the channel of a PUBLISH).
    pub fn new(args: &[&[u8]], tag: T) -> Cmd<T> {
        let key =
            if args.first().is_some_and(|a| a.eq_ignore_ascii_case(b"FCALL")) { args.get(3) } else { args.get(1) };
        let slot = key.map_or(0, |k| slots::key_slot(k));
        Cmd { args: args.iter().map(|a| a.to_vec()).collect(), slot, tag, tries: 0 }
    }
}

/// What came of the commands: the caller's half.
pub enum Event<T> {
    Reply(T, Reply),
    /// Not sent, redirected too often, or its connection died before the reply.
    Failed(T, String),
    /// A connection opened (and the library was sent first on it): Redis there may have lost
    /// what this instance told it.
    Connected(NodeAddr),
    /// `FUNCTION LOAD` refused for a reason other than a passing cluster state.
    LoadRefused(String),
}

enum Sent<T> {
    Load,
    Asking,
    Cmd(Cmd<T>),
}

struct Link<T> {
    addr: NodeAddr,
    conn: Option<Conn>,
    retry_at: Instant,
    backoff: Backoff,
    in_flight: VecDeque<(Sent<T>, Instant)>,
    /// A failure to reach it was logged; quiet until it is reached again.
    warned: bool,
}

impl<T> NodeLink for Link<T> {
    fn addr(&self) -> &NodeAddr {
        &self.addr
    }
}

/// How a reply is to be taken.
enum Parsed {
    Reply(Reply),
    Moved(u16, NodeAddr),
    Ask(NodeAddr),
    /// Worth another try shortly.
    Later(String),
}

/// Whether a link to `addr` should be kept: it is the one Redis, or a master of the map.
fn wanted(place: &Place, map: &Option<Arc<SlotMap>>, addr: &NodeAddr) -> bool {
    match (place, map) {
        (Place::Standalone(_), _) => true,
        (Place::Cluster(_), Some(map)) => map.masters().contains(addr),
        (Place::Cluster(_), None) => false,
    }
}

pub struct Links<T> {
    place: Place,
    tls: Option<RedisTls>,
    library: String,
    token_base: usize,
    links: NodeLinks<Link<T>>,
    map: Option<Arc<SlotMap>>,
    version: u64,
    /// Commands to send again later (TRYAGAIN and the like), by when.
    delayed: Vec<(Instant, Cmd<T>)>,
    events: Vec<Event<T>>,
}

impl<T> Links<T> {
    pub fn new(place: Place, tls: Option<RedisTls>, library: String, token_base: usize) -> Links<T> {
        let mut links = Links {
            place,
            tls,
            library,
            token_base,
            links: NodeLinks::default(),
            map: None,
            version: 0,
            delayed: Vec::new(),
            events: Vec::new(),
        };
        if let Place::Standalone(url) = &links.place {
            let addr = NodeAddr { host: url.host.clone(), port: url.port };
            links.link_for(&addr);
        }
        links
    }

    /// The node that serves `slot` now (the only one, standalone).
    pub fn owner(&self, slot: u16) -> Option<NodeAddr> {
        match &self.place {
            Place::Standalone(_) => self.links.iter().next().map(|(_, l)| l.addr.clone()),
            Place::Cluster(_) => self.map.as_ref()?.owner(slot).cloned(),
        }
    }

    /// The URL to reach `addr` on.
    pub fn url_of(&self, addr: &NodeAddr) -> RedisUrl {
        match &self.place {
            Place::Standalone(url) => url.clone(),
            Place::Cluster(topology) => topology.url_of(addr),
        }
    }

    /// Whether `addr` has an open connection.
    pub fn is_up(&self, addr: &NodeAddr) -> bool {
        self.links.by_addr(addr).is_some_and(|l| l.conn.is_some())
    }

    /// Whether any connection is open: presence is worth flushing.
    pub fn any_up(&self) -> bool {
        self.links.iter().any(|(_, l)| l.conn.is_some())
    }

    pub fn topology(&self) -> Option<&Arc<Topology>> {
        match &self.place {
            Place::Cluster(topology) => Some(topology),
            Place::Standalone(_) => None,
        }
    }

    /// Takes a newer slot map, if there is one: a link per master (opened, and so given the
    /// library, at once). True when the map changed.
    pub fn sync_map(&mut self) -> bool {
        let Place::Cluster(topology) = &self.place else { return false };
        let Some(map) = topology.map_if_newer(&mut self.version) else { return false };
        self.map = map;
        if let Some(map) = self.map.clone() {
            for master in map.masters() {
                self.link_for(master);
            }
        }
        true
    }

    fn wanted(&self, addr: &NodeAddr) -> bool {
        wanted(&self.place, &self.map, addr)
    }

    fn link_for(&mut self, addr: &NodeAddr) -> usize {
        let (key, _) = self.links.key_for(addr, || Link {
            addr: addr.clone(),
            conn: None,
            retry_at: Instant::now(),
            backoff: Backoff::new(),
            in_flight: VecDeque::new(),
            warned: false,
        });
        key
    }

    /// Opens the connections that are due: every master's (or the one Redis's).
    pub fn connect_due(&mut self, poll: &Poll) {
        let now = Instant::now();
        let due: Vec<usize> = self
            .links
            .iter()
            .filter(|(_, l)| l.conn.is_none() && now >= l.retry_at && self.wanted(&l.addr))
            .map(|(k, _)| k)
            .collect();
        for key in due {
            self.connect(key, poll);
        }
        self.prune(poll);
    }

    fn connect(&mut self, key: usize, poll: &Poll) -> bool {
        let url = self.url_of(&self.links[key].addr);
        let token = Token(self.token_base + key);
        let opened = Conn::open(&url, self.tls.as_ref(), NAME, CONNECT_TIMEOUT, MAX_REPLY).and_then(|mut conn| {
            poll.registry().register(&mut conn.stream, token, Interest::READABLE | Interest::WRITABLE)?;
            Ok(conn)
        });
        let link = &mut self.links[key];
        match opened {
            Ok(mut conn) => {
                resp::encode_command(
                    conn.commands(),
                    [b"FUNCTION".as_slice(), b"LOAD", b"REPLACE", self.library.as_bytes()],
                );
                link.in_flight.push_back((Sent::Load, Instant::now()));
                link.conn = Some(conn);
                if link.warned {
                    info!(redis = %url.redacted(), "fleet connection back");
                }
                link.warned = false;
                self.events.push(Event::Connected(link.addr.clone()));
                true
            }
            Err(failure) => {
                if link.warned {
                    debug!(error = %failure, redis = %url.redacted(), "fleet connection attempt failed");
                } else {
                    warn!(error = %failure, redis = %url.redacted(), "fleet cannot reach redis; retrying");
                    link.warned = true;
                }
                link.retry_at = Instant::now() + link.backoff.next_delay();
                if let Some(topology) = self.topology() {
                    topology.refresh();
                }
                false
            }
        }
    }

    /// Closes links to nodes that serve nothing now, once nothing is pending on them.
    fn prune(&mut self, poll: &Poll) {
        let (place, map) = (&self.place, &self.map);
        let idle = self.links.remove_where(|l| !wanted(place, map, &l.addr) && l.in_flight.is_empty());
        for mut link in idle {
            if let Some(conn) = link.conn.as_mut() {
                let _ = poll.registry().deregister(&mut conn.stream);
            }
        }
    }

    /// Sends `cmd` to the node serving its slot, or to `to` (an ASK target, after ASKING).
    pub fn send(&mut self, cmd: Cmd<T>, poll: &Poll) {
        self.send_to(cmd, None, poll);
    }

    fn send_to(&mut self, cmd: Cmd<T>, ask: Option<NodeAddr>, poll: &Poll) {
        let asking = ask.is_some();
        let Some(addr) = ask.or_else(|| self.owner(cmd.slot)) else {
            if let Some(topology) = self.topology() {
                topology.refresh();
            }
            self.events.push(Event::Failed(cmd.tag, "no redis node serves the key's slot".into()));
            return;
        };
        let key = self.link_for(&addr);
        if self.links[key].conn.is_none() && (Instant::now() < self.links[key].retry_at || !self.connect(key, poll)) {
            // The master may be gone for good (a failover): the map is asked for again while
            // commands need it (the topology spaces its fetches), not only at reconnects,
            // whose backoff grows.
            if let Some(topology) = self.topology() {
                topology.refresh();
            }
            self.events.push(Event::Failed(cmd.tag, "redis unavailable".into()));
            return;
        }
        let link = &mut self.links[key];
        let Some(conn) = link.conn.as_mut() else { return };
        let now = Instant::now();
        if asking {
            resp::encode_command(conn.commands(), [b"ASKING".as_slice()]);
            link.in_flight.push_back((Sent::Asking, now));
        }
        resp::encode_command(conn.commands(), cmd.args.iter());
        link.in_flight.push_back((Sent::Cmd(cmd), now));
    }

    /// Sends again the delayed commands whose time has come.
    pub fn send_delayed(&mut self, poll: &Poll) {
        if self.delayed.is_empty() {
            return;
        }
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.delayed).into_iter().partition(|(at, _)| *at <= now);
        self.delayed = later;
        self.sync_map();
        for (_, cmd) in due {
            self.send(cmd, poll);
        }
    }

    /// Writes what is encoded and reads every reply that arrived, on every connection.
    pub fn exchange(&mut self, poll: &Poll) {
        let keys: Vec<usize> = self.links.iter().map(|(k, _)| k).collect();
        for key in keys {
            if let Err(failure) = self.exchange_one(key, poll) {
                self.lost(key, failure, poll);
            }
        }
    }

    /// Writes what waits on every connection.
    pub fn flush(&mut self, poll: &Poll) {
        let keys: Vec<usize> = self.links.iter().map(|(k, _)| k).collect();
        for key in keys {
            let result = self.links[key].conn.as_mut().map_or(Ok(true), |c| c.flush());
            if let Err(e) = result {
                self.lost(key, Failure::Io(e), poll);
            }
        }
    }

    fn exchange_one(&mut self, key: usize, poll: &Poll) -> Result<(), Failure> {
        let Some(conn) = self.links[key].conn.as_mut() else { return Ok(()) };
        conn.flush()?;
        conn.fill()?;
        loop {
            let link = &mut self.links[key];
            let Some(conn) = link.conn.as_mut() else { return Ok(()) };
            let own_host = &link.addr.host;
            let Some(parsed) = conn.next(|value| parse(&value, own_host))? else { break };
            let Some((sent, _)) = link.in_flight.pop_front() else {
                return Err(Failure::Protocol("a reply nobody asked for".into()));
            };
            let clustered = matches!(self.place, Place::Cluster(_));
            match (sent, parsed) {
                (Sent::Asking, _) => {}
                (Sent::Load, Parsed::Reply(Reply::Error(error))) => {
                    if is_passing(&error) {
                        // Not the moment (loading, a replica now): this connection goes, and
                        // the next one, to whatever the map says then, loads again.
                        return Err(Failure::Protocol(error));
                    }
                    self.events.push(Event::LoadRefused(error));
                }
                (Sent::Load, Parsed::Later(error)) => return Err(Failure::Protocol(error)),
                (Sent::Load, _) => {
                    link.backoff.reset();
                    debug!(node = %link.addr, "herald's functions loaded");
                }
                (Sent::Cmd(cmd), Parsed::Reply(reply)) => self.events.push(Event::Reply(cmd.tag, reply)),
                (Sent::Cmd(cmd), Parsed::Moved(slot, addr)) if clustered => {
                    if let Some(topology) = self.topology() {
                        topology.moved(slot, addr);
                    }
                    self.sync_map();
                    self.retry(cmd, None, Duration::ZERO, "too many MOVED redirects", poll);
                }
                (Sent::Cmd(cmd), Parsed::Ask(addr)) if clustered => {
                    self.retry(cmd, Some(addr), Duration::ZERO, "too many ASK redirects", poll);
                }
                (Sent::Cmd(cmd), Parsed::Later(error)) if clustered => {
                    if error.starts_with("READONLY") {
                        if let Some(topology) = self.topology() {
                            topology.refresh();
                        }
                    }
                    let delay = RETRY_START * 2u32.pow(u32::from(cmd.tries));
                    self.retry(cmd, None, delay, &error, poll);
                }
                (Sent::Cmd(cmd), Parsed::Moved(..) | Parsed::Ask(..)) => {
                    self.events.push(Event::Failed(cmd.tag, "a cluster redirect from a standalone redis".into()));
                }
                (Sent::Cmd(cmd), Parsed::Later(error)) => self.events.push(Event::Failed(cmd.tag, error)),
            }
        }
        let link = &self.links[key];
        if link.in_flight.front().is_some_and(|(_, sent)| sent.elapsed() >= REPLY_TIMEOUT) {
            return Err(Failure::Timeout);
        }
        Ok(())
    }

    /// Sends `cmd` again (to `ask`, or to its slot's owner) after `delay`, unless it had its
    /// tries: then it fails with `why`.
    fn retry(&mut self, mut cmd: Cmd<T>, ask: Option<NodeAddr>, delay: Duration, why: &str, poll: &Poll) {
        cmd.tries += 1;
        if cmd.tries >= MAX_TRIES {
            self.events.push(Event::Failed(cmd.tag, format!("redis cluster: {why}")));
        } else if delay.is_zero() {
            self.send_to(cmd, ask, poll);
        } else {
            self.delayed.push((Instant::now() + delay, cmd));
        }
    }

    /// A connection died: what it had not answered fails; it opens again after a backoff.
    fn lost(&mut self, key: usize, failure: Failure, poll: &Poll) {
        let link = &mut self.links[key];
        let url = match &self.place {
            Place::Standalone(url) => url.clone(),
            Place::Cluster(topology) => topology.url_of(&link.addr),
        };
        warn!(error = %failure, redis = %url.redacted(), "fleet command connection lost; retrying");
        link.warned = true;
        if let Some(mut conn) = link.conn.take() {
            let _ = poll.registry().deregister(&mut conn.stream);
        }
        link.retry_at = Instant::now() + link.backoff.next_delay();
        let why = format!("redis connection lost: {}", failure.kind());
        for (sent, _) in std::mem::take(&mut link.in_flight) {
            if let Sent::Cmd(cmd) = sent {
                self.events.push(Event::Failed(cmd.tag, why.clone()));
            }
        }
        if let Some(topology) = self.topology() {
            topology.refresh();
        }
    }

    /// What happened since the last call.
    pub fn take_events(&mut self) -> Vec<Event<T>> {
        std::mem::take(&mut self.events)
    }

    /// When something here needs the thread: a reconnect, a retry, a reply overdue.
    pub fn next_wake(&self) -> Option<Instant> {
        let mut at: Option<Instant> = self.delayed.iter().map(|(at, _)| *at).min();
        let mut earliest = |t: Instant| at = Some(at.map_or(t, |a| a.min(t)));
        for (_, link) in &self.links {
            if link.conn.is_none() && self.wanted(&link.addr) {
                earliest(link.retry_at);
            }
            if let Some((_, sent)) = link.in_flight.front() {
                earliest(*sent + REPLY_TIMEOUT);
            }
        }
        at
    }
}

/// An error that a moment's wait or the next slot map cures.
fn is_passing(error: &str) -> bool {
    ["LOADING", "TRYAGAIN", "CLUSTERDOWN", "READONLY", "MASTERDOWN", "MOVED", "ASK"]
        .iter()
        .any(|code| error.starts_with(code))
}

fn parse(value: &Value<'_>, own_host: &str) -> Parsed {
    let node = |host: &[u8], port: u16| {
        let host = if host.is_empty() { own_host.to_string() } else { String::from_utf8_lossy(host).into_owned() };
        NodeAddr { host, port }
    };
    match value.error() {
        None => Parsed::Reply(Reply::of(value, 0)),
        Some(ServerError::Moved { slot, host, port }) => Parsed::Moved(slot, node(host, port)),
        Some(ServerError::Ask { host, port, .. }) => Parsed::Ask(node(host, port)),
        Some(ServerError::TryAgain(text) | ServerError::ClusterDown(text) | ServerError::Loading(text)) => {
            Parsed::Later(String::from_utf8_lossy(text).into_owned())
        }
        // A replica now (a failover the map has not caught up with), or a master whose
        // library is not there yet (it joined a moment ago).
        Some(ServerError::Other(text)) if text.starts_with(b"READONLY") || is_function_missing(text) => {
            Parsed::Later(String::from_utf8_lossy(text).into_owned())
        }
        Some(_) => Parsed::Reply(Reply::of(value, 0)),
    }
}

fn is_function_missing(text: &[u8]) -> bool {
    text.starts_with(b"ERR Function not found") || text.starts_with(b"ERR Function does not exist")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_is_routed_by_its_key_and_an_fcall_by_its_first_key() {
        let key = b"herald:presence:{user_noti:alice}".as_slice();
        let cmd = Cmd::new(&[b"HVALS", key], ());
        assert_eq!(cmd.slot, slots::key_slot(b"user_noti:alice"));
        let cmd = Cmd::new(&[b"FCALL", b"herald_history", b"1", b"user_noti:u1", b"", b"0", b"100"], ());
        assert_eq!(cmd.slot, 2322, "CLUSTER KEYSLOT user_noti:u1");
        let cmd = Cmd::new(&[b"fcall", b"herald_presence_beat", b"1", b"herald:presence:instances"], ());
        assert_eq!(cmd.slot, slots::key_slot(b"herald:presence:instances"));
    }

    #[test]
    fn passing_errors_are_told_from_refusals() {
        assert!(is_passing("LOADING Redis is loading the dataset in memory"));
        assert!(is_passing("READONLY You can't write against a read only replica."));
        assert!(!is_passing("ERR unknown command 'FUNCTION'"));
        assert!(is_function_missing(b"ERR Function not found"));
    }
}
