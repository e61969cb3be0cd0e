//! Command line, URL and body templates, source address ranges.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

const AFTER_HELP: &str = "\
Examples (herald with HERALD_JWT_SECRET=s on 127.0.0.1:18090, Redis on :16390):

  # 10,000 connections at 20,000/s, held 10 s; server RSS and CPU per connection
  herald-load connect -n 10000 --secret s --url 'ws://127.0.0.1:18090/ws?token={token}' \\
      --connect-rate 20000 --hold 10s --server-pid $(pgrep -x herald)

  # the same over TLS (herald with HERALD_TLS_CERT/HERALD_TLS_KEY): wss://, and https:// for
  # --publish http; --ca trusts a self-signed certificate, --tls-server-name overrides the name
  herald-load connect -n 10000 --secret s --url 'wss://localhost:18090/ws?token={token}' \\
      --ca cert.pem --connect-rate 0 --hold 10s --server-pid $(pgrep -x herald)

  # unicast: 10,000 users, one connection each, 20,000 msgs/s round-robin through Redis
  herald-load unicast -n 10000 --secret s --url 'ws://127.0.0.1:18090/ws?token={token}' \\
      --redis 127.0.0.1:16390 --rate 20000 --duration 10s

  # highest rate herald sustains (closed loop, bounded in-flight), then fixed fractions of it
  herald-load unicast -n 10000 --secret s --redis 127.0.0.1:16390 --rate max

  # broadcast: 10,000 connections of one user (needs HERALD_MAX_CONNECTIONS_PER_USER=0), 10 msgs/s
  herald-load broadcast -n 10000 --user room --secret s --redis 127.0.0.1:16390 --rate 10

  # the ceiling: a bare server that writes one pre-encoded frame to every socket, and a
  # broadcast against it (its POST endpoint takes the raw body as the message)
  herald-load ceiling-server --listen 127.0.0.1:18099 --threads 2 &
  herald-load broadcast -n 10000 --url 'ws://127.0.0.1:18099/sub/{user}' --publish http \\
      --publish-url 'http://127.0.0.1:18099/pub/{user}' --publish-body '{payload}' --rate 10 \\
      --server-pid $!

  # nginx + Nchan: no token, per-user channel URL, raw-body HTTP publisher
  herald-load unicast -n 5000 --url 'ws://127.0.0.1:8082/sub/{user}' \\
      --publish http --publish-url 'http://127.0.0.1:8082/pub/{user}' --publish-body '{payload}'

Every published message is {\"type\":\"load\",\"seq\":N,\"t\":NANOS,\"pad\":\"xxx\"} where t is the
scheduled publish time (CLOCK_REALTIME ns): latency = receive time - t, so a late publisher
shows up as latency (no coordinated omission). Unicast: seq counts per user; broadcast: one
seq per message, every connection must see each once. The JSON report goes to stdout (and
--json-out), a summary to stderr.";

/// Load generator for herald (and any WebSocket fan-out server with a URL-addressed
/// subscribe endpoint): connection storms, unicast and broadcast delivery with open-loop
/// latency, server and generator CPU/RSS per connection and per delivery.
#[derive(Parser, Debug)]
#[command(name = "herald-load", version, after_help = AFTER_HELP)]
pub struct Args {
    /// connect: open N connections, hold, close. unicast: N users, publish round-robin over
    /// them. broadcast: N connections of one user (--user) or one topic (--topic).
    /// ceiling-server: not a client but the cost floor of a broadcast, a bare server to
    /// measure against (see --listen).
    #[arg(value_enum)]
    pub mode: Mode,

    /// ceiling-server: address to listen on (WebSocket upgrades on any GET path; a POST to
    /// any path, e.g. /pub/room, is the message: its body framed once and written to every
    /// upgraded socket). --threads event loops share the port.
    #[arg(long, default_value = "127.0.0.1:18099")]
    pub listen: String,

    /// WebSocket URL template; {token} is the minted JWT, {user} the user id. ws:// or wss://
    /// (TLS: see --ca and --tls-server-name).
    #[arg(long, default_value = "ws://127.0.0.1:8081/ws?token={token}")]
    pub url: String,

    /// wss:// and https://: trust the certificates in this PEM file (a self-signed server
    /// certificate, or the CA that issued it). Default: SSL_CERT_FILE or the system bundle.
    #[arg(long)]
    pub ca: Option<PathBuf>,

    /// wss:// and https://: the name the server's certificate must be valid for (and the SNI
    /// sent). Default: the URL's host.
    #[arg(long)]
    pub tls_server_name: Option<String>,

    /// Connections to open.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub connections: usize,

    /// Distinct users (connect, unicast); connection i belongs to user i mod USERS.
    /// Default: one user per connection.
    #[arg(long)]
    pub users: Option<usize>,

    /// User ids are PREFIX + index.
    #[arg(long, default_value = "load-")]
    pub user_prefix: String,

    /// broadcast: the one user every connection authenticates as (herald needs
    /// HERALD_MAX_CONNECTIONS_PER_USER=0 or >= N).
    #[arg(long, default_value = "load-broadcast")]
    pub user: String,

    /// broadcast to this topic instead of a user: each connection is its own user with a
    /// token allowing the topic, and subscribes after opening (see --subscribe-message).
    #[arg(long)]
    pub topic: Option<String>,

    /// Text sent after the upgrade when --topic is given ({topic} substituted); counted live
    /// once a reply containing "subscribed" arrives. Empty: send nothing, live at once.
    #[arg(long, default_value = r#"{"type":"subscribe","topic":"{topic}"}"#)]
    pub subscribe_message: String,

    /// HS256 secret to mint tokens with (needed when the URL has {token}).
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,

    /// Lifetime of minted tokens.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub token_ttl: Duration,

    /// Worker threads, each one event loop owning its share of the connections.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,

    /// Local addresses to bind, round-robin: comma list of IPs and IPv4 ranges
    /// (127.0.0.1-127.0.0.20). Each gives ~28k ephemeral ports. "auto": 127.0.0.1-127.0.0.16
    /// when the target is loopback, else the kernel's choice. "none": the kernel's choice.
    #[arg(long, default_value = "auto")]
    pub source_ips: String,

    /// New connections per second, spread over the threads; 0 = as fast as possible
    /// (bounded by --max-pending).
    #[arg(long, default_value_t = 20000.0)]
    pub connect_rate: f64,

    /// At most this many connections in TCP connect or upgrade at once, per thread.
    #[arg(long, default_value_t = 2000)]
    pub max_pending: usize,

    /// A connection not upgraded within this time counts as failed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// connect: how long to hold the connections open before closing them.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub hold: Duration,

    /// unicast, broadcast: length of the measured window.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// unicast, broadcast: start publishing (the warmup) at this Unix time, in seconds (may
    /// be fractional), instead of right after the connect phase: several generator
    /// processes then share one window. A connect phase that ends later starts at once.
    #[arg(long)]
    pub start_at: Option<f64>,

    /// Publishing before the measured window (not counted).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// After the window: how long to wait for messages still in flight.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub drain: Duration,

    /// Messages per second on a fixed schedule (open loop), or "max": as fast as the
    /// deliveries come back, with at most --max-inflight deliveries outstanding (closed loop:
    /// a throughput figure; its latency is queueing, not service latency).
    #[arg(long, default_value = "1000", value_parser = parse_rate)]
    pub rate: Rate,

    /// Open loop: wake the publisher at most once per this interval and send everything due
    /// (t stays the scheduled time, so the batching delay, at most this, is inside the
    /// measured latency). 0 = a wakeup per message. Cuts publisher CPU at high rates.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub publish_batch: Duration,

    /// --rate max: deliveries outstanding at most. Default: max(2000, 2 x connections) for
    /// broadcast, 2000 otherwise.
    #[arg(long)]
    pub max_inflight: Option<u64>,

    /// Size of each published message in bytes (the pad field fills it up; herald refuses
    /// messages over HERALD_MAX_MESSAGE_BYTES, 512 by default).
    #[arg(long, default_value_t = 128)]
    pub payload_bytes: usize,

    /// How to publish: redis (PUBLISH, pipelined, one connection), http (keep-alive POSTs),
    /// auto: redis when --redis is given, else http.
    #[arg(long, value_enum, default_value_t = Transport::Auto)]
    pub publish: Transport,

    /// Redis address (host:port) for --publish redis.
    #[arg(long)]
    pub redis: Option<String>,

    /// Redis channel template; default user_noti:{user}, or topic_noti:{topic} with --topic.
    #[arg(long)]
    pub redis_channel: Option<String>,

    /// --publish redis: PUBLISH, or SPUBLISH for a Redis Cluster's sharded pub/sub (every
    /// channel must then be served by the --redis node: give the users a hash tag of that
    /// node's, e.g. --user-prefix '{t3}u').
    #[arg(long, default_value = "PUBLISH", value_parser = ["PUBLISH", "SPUBLISH"])]
    pub redis_command: String,

    /// HTTP publish URL template ({user}, {topic}), http:// or https://; default
    /// http://HOST:PORT/publish of --url (https:// when --url is wss://).
    #[arg(long)]
    pub publish_url: Option<String>,

    /// HTTP publish body template ({user}, {topic}, {payload}); default herald's
    /// {"user_id":"{user}","message":{payload}} (or "topic" with --topic).
    #[arg(long)]
    pub publish_body: Option<String>,

    /// Keep-alive HTTP connections for publishing (one request in flight on each).
    #[arg(long, default_value_t = 4)]
    pub publish_conns: usize,

    /// HTTP publish: up to N messages per request, as herald's batch body
    /// {"items":[<body>, …]} (each item the --publish-body template); the publish URL then
    /// defaults to http://HOST:PORT/publish/batch. 1: one message per request, unwrapped.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub batch: u32,

    /// unicast: publish round-robin to this many users that no connection belongs to (ids
    /// PREFIX + "absent-" + index) instead of the connected ones: nothing is delivered, so
    /// only the publish API is measured (publish.rate_achieved = messages accepted/s).
    #[arg(long, default_value_t = 0)]
    pub absent_users: usize,

    /// Bearer key for the HTTP publish API. Default: a token with scope "publish" minted with
    /// --secret; with neither, no Authorization header (Nchan).
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Server process id(s), comma list (summed): RSS and CPU from /proc over each phase.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,

    /// Other process id(s), comma list (summed), e.g. redis-server: CPU over the measured
    /// window, reported apart from the server's (aux.*).
    #[arg(long, value_delimiter = ',')]
    pub aux_pid: Vec<u32>,

    /// Also write the JSON report to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,

    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Connect,
    Unicast,
    Broadcast,
    CeilingServer,
    /// One client of --user connecting with the --url as given (put `since=0` in it), timed
    /// up to `resumed`, -n times in a row: replay speed (src/replay.rs).
    Replay,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Auto,
    Redis,
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    Fixed(f64),
    Max,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    if s.eq_ignore_ascii_case("max") {
        return Ok(Rate::Max);
    }
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(Rate::Fixed(r)),
        _ => Err(format!("not a positive rate or \"max\": {s}")),
    }
}

/// A string with `{token}`, `{user}`, `{topic}` and `{payload}` placeholders; every other
/// brace is literal (JSON bodies are full of them).
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Lit(Vec<u8>),
    Token,
    User,
    Topic,
    Payload,
}

/// Values for a template.
#[derive(Debug, Default, Clone, Copy)]
pub struct Vars<'a> {
    pub token: &'a str,
    pub user: &'a str,
    pub topic: &'a str,
    pub payload: &'a [u8],
}

impl Template {
    pub fn new(s: &str) -> Template {
        const NAMES: [(&str, Part); 4] =
            [("{token}", Part::Token), ("{user}", Part::User), ("{topic}", Part::Topic), ("{payload}", Part::Payload)];
        let mut parts = Vec::new();
        let mut lit = Vec::new();
        let mut rest = s;
        'outer: while !rest.is_empty() {
            for (name, part) in &NAMES {
                if let Some(after) = rest.strip_prefix(name) {
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(part.clone());
                    rest = after;
                    continue 'outer;
                }
            }
            let ch = rest.chars().next().map_or(1, char::len_utf8);
            lit.extend_from_slice(&rest.as_bytes()[..ch]);
            rest = &rest[ch..];
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Template { parts }
    }

    pub fn render(&self, out: &mut Vec<u8>, vars: &Vars<'_>) {
        for part in &self.parts {
            match part {
                Part::Lit(b) => out.extend_from_slice(b),
                Part::Token => out.extend_from_slice(vars.token.as_bytes()),
                Part::User => out.extend_from_slice(vars.user.as_bytes()),
                Part::Topic => out.extend_from_slice(vars.topic.as_bytes()),
                Part::Payload => out.extend_from_slice(vars.payload),
            }
        }
    }

    pub fn render_string(&self, vars: &Vars<'_>) -> String {
        let mut out = Vec::new();
        self.render(&mut out, vars);
        String::from_utf8_lossy(&out).into_owned()
    }

    pub fn uses_token(&self) -> bool {
        self.parts.contains(&Part::Token)
    }
}

/// `scheme://host:port/path?query` split into what a client needs.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The Host header value.
    pub host: String,
    /// wss:// or https://.
    pub tls: bool,
    /// The host without port or brackets: the default TLS server name.
    pub hostname: String,
    /// Path and query, a template.
    pub path: Template,
}

/// Parses a ws://, wss://, http:// or https:// URL template; the host part may not hold
/// placeholders.
pub fn parse_endpoint(url: &str) -> Result<Endpoint, String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("not a URL: {url}"))?;
    let (default_port, tls) = match scheme {
        "ws" | "http" => (80, false),
        "wss" | "https" => (443, true),
        _ => return Err(format!("unsupported scheme {scheme}: {url}")),
    };
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if host.is_empty() {
        return Err(format!("no host in {url}"));
    }
    let has_port = host
        .rsplit_once(':')
        .is_some_and(|(h, p)| p.parse::<u16>().is_ok() && (!h.starts_with('[') || h.ends_with(']')));
    let with_port = if has_port { host.to_string() } else { format!("{host}:{default_port}") };
    let bare = if has_port { host.rsplit_once(':').map_or(host, |(h, _)| h) } else { host };
    let hostname = bare.trim_start_matches('[').trim_end_matches(']').to_string();
    let addrs: Vec<SocketAddr> =
        with_port.to_socket_addrs().map_err(|e| format!("cannot resolve {host}: {e}"))?.collect();
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| format!("{host} resolves to nothing"))?;
    Ok(Endpoint { addr, host: host.to_string(), tls, hostname, path: Template::new(path) })
}

/// Parses `--source-ips` for a connection to `target`.
pub fn parse_source_ips(spec: &str, target: SocketAddr) -> Result<Vec<IpAddr>, String> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("none") || spec.is_empty() {
        return Ok(Vec::new());
    }
    if spec.eq_ignore_ascii_case("auto") {
        return Ok(if target.ip().is_loopback() && target.is_ipv4() {
            (1..=16).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i))).collect()
        } else {
            Vec::new()
        });
    }
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Some((a, b)) = item.split_once('-') {
            let a: Ipv4Addr = a.trim().parse().map_err(|_| format!("bad address {a} in --source-ips"))?;
            let b: Ipv4Addr = b.trim().parse().map_err(|_| format!("bad address {b} in --source-ips"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a > 65_536 {
                return Err(format!("bad range {item} in --source-ips"));
            }
            out.extend((a..=b).map(|n| IpAddr::V4(Ipv4Addr::from(n))));
        } else {
            out.push(item.parse().map_err(|_| format!("bad address {item} in --source-ips"))?);
        }
    }
    if out.iter().any(|ip| ip.is_ipv4() != target.is_ipv4()) {
        return Err("--source-ips must be of the same family as the target".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_substitute_only_known_placeholders() {
        let t = Template::new(r#"{"user_id":"{user}","message":{payload}}"#);
        let vars = Vars { user: "u1", payload: br#"{"type":"load"}"#, ..Vars::default() };
        assert_eq!(t.render_string(&vars), r#"{"user_id":"u1","message":{"type":"load"}}"#);
        let u = Template::new("/ws?token={token}&x={y}");
        assert!(u.uses_token());
        assert_eq!(u.render_string(&Vars { token: "T", ..Vars::default() }), "/ws?token=T&x={y}");
    }

    #[test]
    fn endpoints_and_source_ranges_parse() {
        let e = parse_endpoint("ws://127.0.0.1:18090/ws?token={token}").unwrap();
        assert_eq!(e.addr, "127.0.0.1:18090".parse().unwrap());
        assert_eq!(e.host, "127.0.0.1:18090");
        let e = parse_endpoint("http://127.0.0.1").unwrap();
        assert_eq!(e.addr.port(), 80);
        assert!(!e.tls);
        assert!(parse_endpoint("ftp://x:1/").is_err());
        let w = parse_endpoint("wss://localhost:18443/ws?token={token}").unwrap();
        assert!(w.tls);
        assert_eq!((w.addr.port(), w.host.as_str(), w.hostname.as_str()), (18443, "localhost:18443", "localhost"));
        let h = parse_endpoint("https://[::1]/publish").unwrap();
        assert!(h.tls);
        assert_eq!((h.addr.port(), h.hostname.as_str()), (443, "::1"));
        let ips = parse_source_ips("127.0.0.1-127.0.0.3, 127.0.0.9", e.addr).unwrap();
        assert_eq!(ips.len(), 4);
        assert_eq!(parse_source_ips("auto", e.addr).unwrap().len(), 16);
        assert!(parse_source_ips("127.0.0.5-127.0.0.1", e.addr).is_err());
    }
}
