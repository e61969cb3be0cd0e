//! Command line and environment → one validated [`Config`].
//!
//! Every setting is a flag and a `HERALD_*` variable of the same name; clap gives the flag
//! precedence. Validation that clap cannot express (ranges, files, addresses) happens in
//! [`Cli::into_config`], so a bad setting is reported once, in one line, before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::broker::redis::RedisTls;
use crate::broker::redis::redis_url::RedisUrl;
use crate::broker::redis::{ClusterPubsub, Endpoint, SubscribeMode};

/// A Redis URL as the raw arguments hold it, fit for a log line: its password hidden.
fn redact_url(url: &str) -> String {
    RedisUrl::parse(url).map_or_else(|_| "<not a valid Redis URL>".to_string(), |r| r.redacted().to_string())
}

/// HERALD_REDIS_CLUSTER as the raw arguments hold it, each seed's password hidden.
fn redact_seeds(seeds: &str) -> String {
    seeds.split(',').map(|seed| redact_url(seed.trim())).collect::<Vec<_>>().join(",")
}

/// herald: a WebSocket notification gateway.
///
/// Backends publish notifications through Redis pub/sub (`PUBLISH user_noti:<user> '{"type":…}'`)
/// or `POST /publish`; herald pushes each one to every live WebSocket of that user.
/// Without HERALD_REDIS_URL it runs its embedded broker; without HERALD_JWT_SECRET it runs in
/// dev mode and prints a ready token.
#[derive(Debug, Parser)]
#[command(name = "herald", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub server: ServerArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mint a token signed with the configured HS256 secret and print it.
    Token(TokenArgs),
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// User id (the `sub` claim).
    #[arg(long)]
    pub sub: String,
    /// Lifetime of the token (at most 100 years).
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// Topics the holder may receive, comma separated; `prefix*` allows a prefix.
    #[arg(long, value_delimiter = ',')]
    pub topics: Vec<String>,
    /// Space-separated scopes, e.g. `publish`.
    #[arg(long)]
    pub scope: Option<String>,
}

#[derive(Args)]
pub struct ServerArgs {
    /// Address for WebSocket and HTTP (one port).
    #[arg(long, env = "HERALD_LISTEN", default_value = "0.0.0.0:8081", global = true)]
    pub listen: String,
    /// HS256 secret (alias JWT_SECRET_KEY). Absent: dev mode with a random secret.
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true, global = true)]
    pub jwt_secret: Option<String>,
    /// File holding the HS256 secret (trailing newline ignored); keeps it out of `ps` and
    /// the environment.
    #[arg(long, env = "HERALD_JWT_SECRET_FILE", global = true)]
    pub jwt_secret_file: Option<PathBuf>,
    /// The previous HS256 secret, still accepted after HERALD_JWT_SECRET (key rotation).
    #[arg(long, env = "HERALD_JWT_SECRET_PREVIOUS", hide_env_values = true, global = true)]
    pub jwt_secret_previous: Option<String>,
    /// File holding the previous HS256 secret (trailing newline ignored).
    #[arg(long, env = "HERALD_JWT_SECRET_PREVIOUS_FILE", global = true)]
    pub jwt_secret_previous_file: Option<PathBuf>,
    /// PEM file with an RSA or EC public key: accept RS256/ES256 tokens (re-read on SIGHUP).
    #[arg(long, env = "HERALD_JWT_PUBLIC_KEY", global = true)]
    pub jwt_public_key: Option<PathBuf>,
    /// JSON Web Key Set (http:// or https:// URL, or file): RS256/ES256 keys chosen by `kid`.
    #[arg(long, env = "HERALD_JWKS", global = true)]
    pub jwks: Option<String>,
    /// Required `aud` claim: when set, a token must name this audience.
    #[arg(long, env = "HERALD_JWT_AUDIENCE", global = true)]
    pub jwt_audience: Option<String>,
    /// Required `iss` claim: when set, a token must come from this issuer.
    #[arg(long, env = "HERALD_JWT_ISSUER", global = true)]
    pub jwt_issuer: Option<String>,
    /// `redis://[[user]:password@]host:port[/db]` (alias REDIS_URL), `rediss://…` for TLS.
    /// Absent: embedded broker.
    #[arg(long, env = "HERALD_REDIS_URL", hide_env_values = true, global = true)]
    pub redis_url: Option<String>,
    /// File holding the Redis password (trailing newline ignored), added to HERALD_REDIS_URL.
    #[arg(long, env = "HERALD_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,
    /// PEM bundle of the CAs that sign Redis's certificate (`rediss://`). Absent: the
    /// system's root certificates.
    #[arg(long, env = "HERALD_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// PEM certificate chain herald presents to Redis over TLS (for `tls-auth-clients yes`),
    /// with HERALD_REDIS_CLIENT_KEY.
    #[arg(long, env = "HERALD_REDIS_CLIENT_CERT")]
    pub redis_client_cert: Option<PathBuf>,
    /// PEM private key of HERALD_REDIS_CLIENT_CERT.
    #[arg(long, env = "HERALD_REDIS_CLIENT_KEY")]
    pub redis_client_key: Option<PathBuf>,
    /// `exact`: subscribe to each user's and topic's channel while this instance holds it;
    /// `pattern`: one PSUBSCRIBE per prefix (every instance receives every message).
    #[arg(long, env = "HERALD_REDIS_SUBSCRIBE", default_value = "exact", value_parser = ["exact", "pattern"])]
    pub redis_subscribe: String,
    /// Redis Cluster seed nodes, comma separated (`redis://h1:p1,redis://h2:p2`): cluster
    /// mode, instead of HERALD_REDIS_URL. The first seeds that answer give the slot map.
    #[arg(long, env = "HERALD_REDIS_CLUSTER", hide_env_values = true)]
    pub redis_cluster: Option<String>,
    /// `sharded`: SSUBSCRIBE/SPUBLISH on the master serving each channel's slot (Redis ≥ 7;
    /// backends publish with SPUBLISH); `classic`: SUBSCRIBE/PUBLISH on one node, relayed
    /// to every node by the cluster bus.
    #[arg(long, env = "HERALD_REDIS_CLUSTER_PUBSUB", default_value = "sharded", value_parser = ["sharded", "classic"])]
    pub redis_cluster_pubsub: String,
    /// Redis channel of a user = prefix + user id.
    #[arg(long, env = "HERALD_USER_CHANNEL_PREFIX", default_value = "user_noti:")]
    pub user_channel_prefix: String,
    /// Redis channel of a topic = prefix + topic.
    #[arg(long, env = "HERALD_TOPIC_CHANNEL_PREFIX", default_value = "topic_noti:")]
    pub topic_channel_prefix: String,
    /// Event-loop threads (default: number of CPUs).
    #[arg(long, env = "HERALD_THREADS")]
    pub threads: Option<usize>,
    /// Most WebSocket connections this instance holds.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Most connections of one user on this instance; 0 = unlimited.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS_PER_USER", default_value_t = 64)]
    pub max_connections_per_user: u32,
    /// Largest notification and largest inbound WebSocket message, in bytes.
    #[arg(long, env = "HERALD_MAX_MESSAGE_BYTES", default_value_t = 512)]
    pub max_message_bytes: usize,
    /// Messages queued per connection before it counts as a slow consumer.
    #[arg(long, env = "HERALD_SEND_QUEUE", default_value_t = 256)]
    pub send_queue: usize,
    /// Interval between WebSocket Ping frames to each connection.
    #[arg(long, env = "HERALD_PING_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub ping_interval: Duration,
    /// Close a connection from which nothing (pong included) arrived for this long.
    #[arg(long, env = "HERALD_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// JSON heartbeat interval on dialect-000 connections with no outbound traffic.
    #[arg(long, env = "HERALD_HEARTBEAT_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// An HTTP request or upgrade not complete by then is dropped.
    #[arg(long, env = "HERALD_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// On SIGTERM/SIGINT: time to flush and close before exit (after the drain period).
    #[arg(long, env = "HERALD_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// PEM certificate chain: with HERALD_TLS_KEY, the port serves TLS only (wss://, https://).
    #[arg(long, env = "HERALD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of HERALD_TLS_CERT.
    #[arg(long, env = "HERALD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// On SIGTERM/SIGINT: /ready turns 503 at once and open connections are closed (1001)
    /// spread evenly over this period, so clients do not all reconnect at the same instant.
    #[arg(long, env = "HERALD_DRAIN_PERIOD", default_value = "0s", value_parser = parse_duration)]
    pub drain_period: Duration,
    /// Notifications kept per user stream and per topic stream (newest N, at most 100,000);
    /// 0 = history off.
    #[arg(long, env = "HERALD_HISTORY_SIZE", default_value_t = 0)]
    pub history_size: usize,
    /// History entries older than this are dropped.
    #[arg(long, env = "HERALD_HISTORY_TTL", default_value = "24h", value_parser = parse_duration)]
    pub history_ttl: Duration,
    /// Embedded mode: memory all history may take (e.g. 64MiB); oldest entries evicted first.
    #[arg(long, env = "HERALD_HISTORY_MEMORY", default_value = "64MiB", value_parser = parse_bytes)]
    pub history_memory: usize,
    /// Bearer key accepted by the HTTP publish/admin API.
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// File holding the API key (trailing newline ignored).
    #[arg(long, env = "HERALD_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Redis channel presence events are published to (Redis mode); empty = none.
    #[arg(long, env = "HERALD_PRESENCE_CHANNEL", default_value = "herald:presence")]
    pub presence_channel: String,
    /// http:// or https:// URL that receives presence events as POSTed JSON.
    #[arg(long, env = "HERALD_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// HMAC-SHA256 key for the `X-Herald-Signature: sha256=<hex>` header of webhook posts.
    #[arg(long, env = "HERALD_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// File holding the webhook secret (trailing newline ignored).
    #[arg(long, env = "HERALD_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// Comma list of allowed Origin values for upgrades, or `*`.
    #[arg(long, env = "HERALD_ALLOWED_ORIGINS", default_value = "*")]
    pub allowed_origins: String,
    /// New connections per second per client IP (token bucket, burst = 2x); 0 = off.
    #[arg(long, env = "HERALD_CONNECT_RATE_PER_IP", default_value_t = 0)]
    pub connect_rate_per_ip: u32,
    /// Log filter (tracing EnvFilter syntax). Tokens and secrets are never logged.
    #[arg(long, env = "HERALD_LOG", default_value = "info", global = true)]
    pub log: String,
    /// Which secret-bearing settings came from the command line (see [`Cli::parse_with_sources`]).
    #[arg(skip)]
    pub given_as_flags: Vec<&'static str>,
}

impl std::fmt::Debug for ServerArgs {
    // Like `Config`'s: the raw settings hold the same secrets, and must not print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ServerArgs {
            listen,
            jwt_secret,
            jwt_secret_file,
            jwt_secret_previous,
            jwt_secret_previous_file,
            jwt_public_key,
            jwks,
            jwt_audience,
            jwt_issuer,
            redis_url,
            redis_password_file,
            redis_ca_file,
            redis_client_cert,
            redis_client_key,
            redis_subscribe,
            redis_cluster,
            redis_cluster_pubsub,
            user_channel_prefix,
            topic_channel_prefix,
            threads,
            max_connections,
            max_connections_per_user,
            max_message_bytes,
            send_queue,
            ping_interval,
            idle_timeout,
            heartbeat_interval,
            handshake_timeout,
            shutdown_grace,
            drain_period,
            history_size,
            history_ttl,
            history_memory,
            tls_cert,
            tls_key,
            api_key,
            api_key_file,
            presence_channel,
            webhook_url,
            webhook_secret,
            webhook_secret_file,
            allowed_origins,
            connect_rate_per_ip,
            log,
            given_as_flags,
        } = self;
        f.debug_struct("ServerArgs")
            .field("listen", listen)
            .field("jwt_secret", &jwt_secret.as_ref().map(|_| "<redacted>"))
            .field("jwt_secret_file", jwt_secret_file)
            .field("jwt_secret_previous", &jwt_secret_previous.as_ref().map(|_| "<redacted>"))
            .field("jwt_secret_previous_file", jwt_secret_previous_file)
            .field("jwt_public_key", jwt_public_key)
            .field(
                "jwks",
                &jwks.as_deref().map(|text| JwksSource::parse(text).map_or_else(|_| "<invalid>".into(), |s| s.shown())),
            )
            .field("jwt_audience", jwt_audience)
            .field("jwt_issuer", jwt_issuer)
            .field("redis_url", &redis_url.as_deref().map(redact_url))
            .field("redis_password_file", redis_password_file)
            .field("redis_ca_file", redis_ca_file)
            .field("redis_client_cert", redis_client_cert)
            .field("redis_client_key", redis_client_key)
            .field("redis_subscribe", redis_subscribe)
            .field("redis_cluster", &redis_cluster.as_deref().map(redact_seeds))
            .field("redis_cluster_pubsub", redis_cluster_pubsub)
            .field("user_channel_prefix", user_channel_prefix)
            .field("topic_channel_prefix", topic_channel_prefix)
            .field("threads", threads)
            .field("max_connections", max_connections)
            .field("max_connections_per_user", max_connections_per_user)
            .field("max_message_bytes", max_message_bytes)
            .field("send_queue", send_queue)
            .field("ping_interval", ping_interval)
            .field("idle_timeout", idle_timeout)
            .field("heartbeat_interval", heartbeat_interval)
            .field("handshake_timeout", handshake_timeout)
            .field("shutdown_grace", shutdown_grace)
            .field("drain_period", drain_period)
            .field("history_size", history_size)
            .field("history_ttl", history_ttl)
            .field("history_memory", history_memory)
            .field("tls_cert", tls_cert)
            .field("tls_key", tls_key)
            .field("api_key", &api_key.as_ref().map(|_| "<redacted>"))
            .field("api_key_file", api_key_file)
            .field("presence_channel", presence_channel)
            .field("webhook_url", webhook_url)
            .field("webhook_secret", &webhook_secret.as_ref().map(|_| "<redacted>"))
            .field("webhook_secret_file", webhook_secret_file)
            .field("allowed_origins", allowed_origins)
            .field("connect_rate_per_ip", connect_rate_per_ip)
            .field("log", log)
            .field("given_as_flags", given_as_flags)
            .finish()
    }
}

/// Settings whose value is a secret, by clap id: given as flags, they show in `ps`.
const SECRET_FLAGS: [&str; 6] =
    ["jwt_secret", "jwt_secret_previous", "api_key", "redis_url", "redis_cluster", "webhook_secret"];

impl Cli {
    /// Parses a command line (with the environment, as clap does), remembering which secrets
    /// were given as flags rather than through the environment or a file, so that
    /// [`ServerArgs::into_config`] can warn about them.
    pub fn parse_with_sources<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::parser::ValueSource;
        use clap::{CommandFactory, FromArgMatches};
        let matches = Cli::command().try_get_matches_from(args)?;
        let mut cli = Cli::from_arg_matches(&matches)?;
        // Global flags may be written after the subcommand (`herald token --jwt-secret …`).
        let levels: Vec<&clap::ArgMatches> =
            std::iter::once(&matches).chain(matches.subcommand().map(|(_, m)| m)).collect();
        cli.server.given_as_flags = SECRET_FLAGS
            .into_iter()
            .filter(|id| {
                levels.iter().any(|m| {
                    m.try_get_raw(id).is_ok_and(|v| v.is_some()) && m.value_source(id) == Some(ValueSource::CommandLine)
                })
            })
            .collect();
        Ok(cli)
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration like 30s, 500ms or 2m ({e})"))
}

/// `65536`, `64KiB`, `64MiB`, `1GiB` (also KB/MB/GB, meaning the same powers of 1024).
fn parse_bytes(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("`{text}` is not a size like 65536, 64KiB or 64MiB")),
    };
    let n: usize = digits.parse().map_err(|_| format!("`{text}` is not a size like 65536, 64KiB or 64MiB"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("`{text}` is too large"))
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_duration(text)?;
    if ttl > crate::auth::MAX_TOKEN_TTL {
        return Err(format!("`{text}` is longer than the longest token lifetime, 100 years"));
    }
    Ok(ttl)
}

/// Longest interval or timeout a setting may hold. Far beyond any useful value, and far
/// below what `Instant + Duration` or the tick arithmetic could overflow on.
pub const MAX_DURATION_SETTING: Duration = Duration::from_secs(24 * 3600);

/// Shortest HS256 secret that draws no warning: 256 bits, the hash's own size (RFC 7518 §3.2).
pub const MIN_SECRET_BYTES: usize = 32;

/// Reads a secret from the file a `*_FILE` setting names. A trailing newline (what editors
/// and `echo` add) is not part of the secret; an empty secret is refused rather than taken
/// as "unset", which for the JWT secret would mean dev mode.
fn read_secret_file(variable: &str, path: &std::path::Path) -> Result<Vec<u8>, String> {
    let mut bytes = std::fs::read(path).map_err(|e| format!("{variable} `{}` cannot be read: {e}", path.display()))?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(format!("{variable} `{}` is empty", path.display()));
    }
    Ok(bytes)
}

/// HERALD_REDIS_CLUSTER: comma-separated `redis://` URLs of seed nodes. A cluster has database
/// 0 only, and one set of users: every seed must say the same scheme and credentials (nodes
/// learnt from the slot map are reached with them). Errors name a seed by its position, never
/// by its text (it may hold a password).
fn parse_seeds(list: &str) -> Result<Vec<RedisUrl>, String> {
    let mut seeds: Vec<RedisUrl> = Vec::new();
    for (i, seed) in list.split(',').map(str::trim).enumerate() {
        if seed.is_empty() {
            continue;
        }
        let n = i + 1;
        let url = RedisUrl::parse(seed).map_err(|e| {
            format!(
                "HERALD_REDIS_CLUSTER seed {n}: {}: each must look like redis://[[user]:password@]host:port",
                e.reason()
            )
        })?;
        if url.db != 0 {
            return Err(format!("HERALD_REDIS_CLUSTER seed {n}: a Redis Cluster has database 0 only"));
        }
        if let Some(first) = seeds.first() {
            if (first.tls, &first.user, &first.password) != (url.tls, &url.user, &url.password) {
                return Err(format!(
                    "HERALD_REDIS_CLUSTER seed {n}: every seed must use the same scheme and credentials as the first"
                ));
            }
        }
        seeds.push(url);
    }
    if seeds.is_empty() {
        return Err("HERALD_REDIS_CLUSTER names no seed node".into());
    }
    Ok(seeds)
}

fn read_secret_text(variable: &str, path: &std::path::Path) -> Result<String, String> {
    String::from_utf8(read_secret_file(variable, path)?)
        .map_err(|_| format!("{variable} `{}` is not UTF-8 text", path.display()))
}

pub use crate::auth::JwtKey;

/// Where HERALD_JWKS is read from.
#[derive(Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// Fetched with GET. `shown` is the URL without credentials, query or fragment, the form
    /// log lines and errors use.
    Url {
        url: String,
        shown: String,
        https: bool,
    },
    File(PathBuf),
}

impl JwksSource {
    /// An `http://` or `https://` URL, or else a file path; any other `scheme://` is refused
    /// rather than taken for a file name.
    pub fn parse(text: &str) -> Result<JwksSource, String> {
        let lower = text.get(..8).unwrap_or(text).to_ascii_lowercase();
        let https = lower.starts_with("https://");
        if !https && !lower.starts_with("http://") {
            if text.contains("://") {
                // Not echoed: a URL may carry credentials.
                return Err("HERALD_JWKS must be an http:// or https:// URL or a file path".into());
            }
            return Ok(JwksSource::File(PathBuf::from(text)));
        }
        let uri: ureq::http::Uri = text
            .parse()
            .map_err(|_| "HERALD_JWKS is not a valid URL (it must look like https://host/path)".to_string())?;
        let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
            return Err("HERALD_JWKS URL has no host (it must look like https://host/path)".into());
        };
        let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
        let scheme = if https { "https" } else { "http" };
        let shown = format!("{scheme}://{host}{port}{}", uri.path());
        Ok(JwksSource::Url { url: text.to_string(), shown, https })
    }

    /// The source as log lines show it: a URL without credentials or query, or the path.
    pub fn shown(&self) -> String {
        match self {
            JwksSource::Url { shown, .. } => shown.clone(),
            JwksSource::File(path) => path.display().to_string(),
        }
    }
}

impl std::fmt::Debug for JwksSource {
    // A URL may carry credentials in its user part or query: Debug shows the redacted form.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.shown())
    }
}

/// The validated settings the server runs with.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// The current HS256 secret (what `herald token` and dev mode sign with), or
    /// [`JwtKey::Unset`] when tokens are verified with public keys only.
    pub jwt_key: JwtKey,
    /// HERALD_JWT_SECRET_PREVIOUS: also accepted for HS256, after the current secret.
    pub jwt_secret_previous: Option<Vec<u8>>,
    /// HERALD_JWT_PUBLIC_KEY: the file (re-read on SIGHUP) and the PEM read from it at start.
    pub jwt_public_key: Option<(PathBuf, Vec<u8>)>,
    /// HERALD_JWKS, loaded when the server starts.
    pub jwks: Option<JwksSource>,
    /// True when no secret was configured and one was generated for this run.
    pub dev_mode: bool,
    /// When set, a token's `aud` must name it.
    pub jwt_audience: Option<String>,
    /// When set, a token's `iss` must equal it.
    pub jwt_issuer: Option<String>,
    /// Parsed, with the password from HERALD_REDIS_PASSWORD_FILE, if any, already in it
    /// (its `Debug` hides the password).
    pub redis: Option<RedisUrl>,
    /// Trust (and client certificate) for a `rediss://` URL, loaded.
    pub redis_tls: Option<RedisTls>,
    pub redis_subscribe: SubscribeMode,
    /// HERALD_REDIS_CLUSTER's seeds (password from HERALD_REDIS_PASSWORD_FILE in each);
    /// empty without a cluster. Never set together with `redis`.
    pub redis_cluster: Vec<RedisUrl>,
    pub redis_cluster_pubsub: ClusterPubsub,
    pub user_channel_prefix: String,
    pub topic_channel_prefix: String,
    pub threads: usize,
    pub max_connections: usize,
    pub max_connections_per_user: u32,
    pub max_message_bytes: usize,
    pub send_queue: usize,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub handshake_timeout: Duration,
    pub shutdown_grace: Duration,
    pub drain_period: Duration,
    pub history: crate::history::Settings,
    /// Certificate and key files when the port serves TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub api_key: Option<String>,
    /// Empty: presence events are not published to Redis.
    pub presence_channel: String,
    /// Where presence events are POSTed, and the key that signs them.
    pub webhook: Option<(String, Option<Vec<u8>>)>,
    /// `None` allows every Origin.
    pub allowed_origins: Option<Vec<String>>,
    pub connect_rate_per_ip: u32,
    pub log: String,
    /// Things the operator should hear about at start (weak or exposed secrets); never
    /// containing a secret.
    pub warnings: Vec<String>,
}

impl std::fmt::Debug for Config {
    // Written out, not derived: the API key and the Redis password must never reach a log
    // line. Destructured without `..`, so a new field does not compile until it is placed
    // here, redacted if it is a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Config {
            listen,
            jwt_key,
            jwt_secret_previous,
            jwt_public_key,
            jwks,
            dev_mode,
            jwt_audience,
            jwt_issuer,
            redis,
            redis_tls,
            redis_subscribe,
            redis_cluster,
            redis_cluster_pubsub,
            user_channel_prefix,
            topic_channel_prefix,
            threads,
            max_connections,
            max_connections_per_user,
            max_message_bytes,
            send_queue,
            ping_interval,
            idle_timeout,
            heartbeat_interval,
            handshake_timeout,
            shutdown_grace,
            drain_period,
            history,
            tls,
            api_key,
            presence_channel,
            webhook,
            allowed_origins,
            connect_rate_per_ip,
            log,
            warnings,
        } = self;
        f.debug_struct("Config")
            .field("listen", listen)
            .field("jwt_key", jwt_key)
            .field("jwt_secret_previous", &jwt_secret_previous.as_ref().map(|_| "<redacted>"))
            .field("jwt_public_key", &jwt_public_key.as_ref().map(|(path, _)| path))
            .field("jwks", jwks)
            .field("dev_mode", dev_mode)
            .field("jwt_audience", jwt_audience)
            .field("jwt_issuer", jwt_issuer)
            .field("redis_url", &redis.as_ref().map(|r| r.redacted().to_string()))
            .field("redis_tls", redis_tls)
            .field("redis_subscribe", redis_subscribe)
            .field("redis_cluster", &redis_cluster.iter().map(|r| r.redacted().to_string()).collect::<Vec<_>>())
            .field("redis_cluster_pubsub", redis_cluster_pubsub)
            .field("user_channel_prefix", user_channel_prefix)
            .field("topic_channel_prefix", topic_channel_prefix)
            .field("threads", threads)
            .field("max_connections", max_connections)
            .field("max_connections_per_user", max_connections_per_user)
            .field("max_message_bytes", max_message_bytes)
            .field("send_queue", send_queue)
            .field("ping_interval", ping_interval)
            .field("idle_timeout", idle_timeout)
            .field("heartbeat_interval", heartbeat_interval)
            .field("handshake_timeout", handshake_timeout)
            .field("shutdown_grace", shutdown_grace)
            .field("drain_period", drain_period)
            .field("history", history)
            .field("tls", tls)
            .field("api_key", &api_key.as_ref().map(|_| "<redacted>"))
            .field("presence_channel", presence_channel)
            .field("webhook_url", &webhook.as_ref().map(|(url, _)| url))
            .field("webhook_secret", &webhook.as_ref().and_then(|(_, s)| s.as_ref()).map(|_| "<redacted>"))
            .field("allowed_origins", allowed_origins)
            .field("connect_rate_per_ip", connect_rate_per_ip)
            .field("log", log)
            .field("warnings", warnings)
            .finish()
    }
}

/// Loads the TLS settings of a `rediss://` URL now, so a bad file stops herald with one line.
/// They are refused without one: an operator who set a CA file believes the connection is
/// encrypted.
fn redis_tls(
    redis: Option<&RedisUrl>,
    ca_file: Option<&std::path::Path>,
    client_cert: Option<&std::path::Path>,
    client_key: Option<&std::path::Path>,
) -> Result<Option<RedisTls>, String> {
    let client = match (client_cert, client_key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => return Err("HERALD_REDIS_CLIENT_CERT and HERALD_REDIS_CLIENT_KEY go together: set both or neither".into()),
    };
    let set = [("HERALD_REDIS_CA_FILE", ca_file.is_some()), ("HERALD_REDIS_CLIENT_CERT", client.is_some())]
        .into_iter()
        .find_map(|(name, set)| set.then_some(name));
    match (redis, set) {
        (Some(url), _) if url.tls => RedisTls::load(ca_file, client).map(Some),
        (None, Some(name)) => Err(format!("{name} is set but HERALD_REDIS_URL is not")),
        (Some(_), Some(name)) => {
            Err(format!("{name} is set but HERALD_REDIS_URL is redis://, which does not use TLS: use rediss://"))
        }
        (_, None) => Ok(None),
    }
}

impl Config {
    /// Where Redis is, if herald uses one (HERALD_REDIS_URL or HERALD_REDIS_CLUSTER).
    pub fn redis_endpoint(&self) -> Option<Endpoint> {
        match &self.redis {
            Some(url) => Some(Endpoint::Standalone(url.clone())),
            None if self.redis_cluster.is_empty() => None,
            None => Some(Endpoint::Cluster { seeds: self.redis_cluster.clone(), pubsub: self.redis_cluster_pubsub }),
        }
    }
}

/// Most event-loop threads: the router tracks which loops hold a user in a 64-bit mask.
pub const MAX_THREADS: usize = 64;

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

fn env_alias(name: &str) -> Option<String> {
    non_empty(std::env::var(name).ok())
}

impl ServerArgs {
    /// Validates the arguments. The error is one line meant for the operator.
    pub fn into_config(self) -> Result<Config, String> {
        let mut warnings = Vec::new();
        let flag_warning = |flag: &str, instead: &str| {
            format!("{flag} puts a secret on the command line, where `ps` shows it to every local user; use {instead}")
        };
        let listen: SocketAddr = self
            .listen
            .parse()
            .map_err(|_| format!("HERALD_LISTEN `{}` is not an address like 0.0.0.0:8081", self.listen))?;
        let secret = match (non_empty(self.jwt_secret), &self.jwt_secret_file) {
            (Some(_), Some(_)) => {
                return Err("set HERALD_JWT_SECRET or HERALD_JWT_SECRET_FILE, not both".into());
            }
            (Some(secret), None) => {
                if self.given_as_flags.contains(&"jwt_secret") {
                    warnings.push(flag_warning("--jwt-secret", "HERALD_JWT_SECRET_FILE or HERALD_JWT_SECRET"));
                }
                Some(secret.into_bytes())
            }
            (None, Some(path)) => Some(read_secret_file("HERALD_JWT_SECRET_FILE", path)?),
            (None, None) => env_alias("JWT_SECRET_KEY").map(String::into_bytes),
        };
        let previous = match (non_empty(self.jwt_secret_previous), &self.jwt_secret_previous_file) {
            (Some(_), Some(_)) => {
                return Err("set HERALD_JWT_SECRET_PREVIOUS or HERALD_JWT_SECRET_PREVIOUS_FILE, not both".into());
            }
            (Some(previous), None) => {
                if self.given_as_flags.contains(&"jwt_secret_previous") {
                    warnings.push(flag_warning(
                        "--jwt-secret-previous",
                        "HERALD_JWT_SECRET_PREVIOUS_FILE or HERALD_JWT_SECRET_PREVIOUS",
                    ));
                }
                Some(previous.into_bytes())
            }
            (None, Some(path)) => Some(read_secret_file("HERALD_JWT_SECRET_PREVIOUS_FILE", path)?),
            (None, None) => None,
        };
        let jwt_public_key = match &self.jwt_public_key {
            None => None,
            Some(path) => {
                let pem = crate::auth::read_bounded(path, crate::auth::MAX_PEM_BYTES)
                    .map_err(|e| format!("HERALD_JWT_PUBLIC_KEY `{}` {e}", path.display()))?;
                crate::auth::Verifier::new(&JwtKey::PublicKeyPem(pem.clone()))
                    .map_err(|e| format!("HERALD_JWT_PUBLIC_KEY `{}`: {e}", path.display()))?;
                Some((path.clone(), pem))
            }
        };
        let jwks = non_empty(self.jwks).map(|text| JwksSource::parse(&text)).transpose()?;
        if secret.is_none() && previous.is_some() {
            return Err("HERALD_JWT_SECRET_PREVIOUS is set but HERALD_JWT_SECRET is not: \
                        the previous secret is accepted only beside a current one"
                .into());
        }
        // A public key decides: with HERALD_JWT_PUBLIC_KEY or HERALD_JWKS only RS256/ES256
        // tokens are accepted, and secrets are ignored (with a warning). That was herald's rule
        // before key rotation, and keeping it means a secret left over in the environment
        // never widens what an upgraded herald accepts. The PEM key and the JWKS combine.
        let public_keys = jwt_public_key.is_some() || jwks.is_some();
        let (secret, previous) = if public_keys && secret.is_some() {
            warnings.push(
                "HERALD_JWT_SECRET (and HERALD_JWT_SECRET_PREVIOUS) are ignored: with HERALD_JWT_PUBLIC_KEY or \
                 HERALD_JWKS herald accepts RS256/ES256 tokens only"
                    .into(),
            );
            (None, None)
        } else {
            (secret, previous)
        };
        for (name, value) in [("HERALD_JWT_SECRET", &secret), ("HERALD_JWT_SECRET_PREVIOUS", &previous)] {
            if let Some(value) = value.as_ref().filter(|v| v.len() < MIN_SECRET_BYTES) {
                warnings.push(format!(
                    "{name} is {} bytes long; anyone who guesses it can sign tokens for any user. \
                     Use at least {MIN_SECRET_BYTES} random bytes (e.g. `openssl rand -hex 32`)",
                    value.len()
                ));
            }
        }
        if previous.is_some() && previous == secret {
            warnings.push("HERALD_JWT_SECRET_PREVIOUS is the same as HERALD_JWT_SECRET; it can be removed".into());
        }
        let (jwt_key, dev_mode) = match secret {
            Some(secret) => (JwtKey::Secret(secret), false),
            None if public_keys => (JwtKey::Unset, false),
            None => (JwtKey::Secret(crate::auth::random_secret()), true),
        };
        let cluster = non_empty(self.redis_cluster);
        if cluster.is_some() && non_empty(self.redis_url.clone()).is_some() {
            return Err("set HERALD_REDIS_URL or HERALD_REDIS_CLUSTER, not both".into());
        }
        // In cluster mode the REDIS_URL alias (often set for other programs) is not ours.
        let redis_url =
            if cluster.is_some() { None } else { non_empty(self.redis_url).or_else(|| env_alias("REDIS_URL")) };
        let mut redis = match &redis_url {
            None => None,
            Some(url) => Some(RedisUrl::parse(url).map_err(|e| {
                format!(
                    "HERALD_REDIS_URL {}: it must look like redis[s]://[[user]:password@]host:port[/db]",
                    e.reason()
                )
            })?),
        };
        if self.given_as_flags.contains(&"redis_url") && redis.as_ref().is_some_and(|r| r.password.is_some()) {
            warnings.push(flag_warning("--redis-url with a password", "HERALD_REDIS_PASSWORD_FILE"));
        }
        let pubsub =
            if self.redis_cluster_pubsub == "classic" { ClusterPubsub::Classic } else { ClusterPubsub::Sharded };
        let mut redis_cluster = match &cluster {
            Some(seeds) => parse_seeds(seeds)?,
            None => Vec::new(),
        };
        if self.given_as_flags.contains(&"redis_cluster") && redis_cluster.iter().any(|r| r.password.is_some()) {
            warnings.push(flag_warning("--redis-cluster with a password", "HERALD_REDIS_PASSWORD_FILE"));
        }
        if !redis_cluster.is_empty() && pubsub == ClusterPubsub::Sharded && self.redis_subscribe == "pattern" {
            return Err("HERALD_REDIS_SUBSCRIBE=pattern needs HERALD_REDIS_CLUSTER_PUBSUB=classic: \
                        sharded pub/sub has no patterns"
                .into());
        }
        if let Some(path) = &self.redis_password_file {
            let urls: Vec<&mut RedisUrl> = redis.iter_mut().chain(redis_cluster.iter_mut()).collect();
            if urls.is_empty() {
                return Err(
                    "HERALD_REDIS_PASSWORD_FILE is set but neither HERALD_REDIS_URL nor HERALD_REDIS_CLUSTER is".into(),
                );
            }
            if urls.iter().any(|url| url.password.is_some()) {
                return Err(
                    "HERALD_REDIS_PASSWORD_FILE: the Redis URL already contains a password; give it in one place only"
                        .into(),
                );
            }
            let password = read_secret_text("HERALD_REDIS_PASSWORD_FILE", path)?;
            for url in urls {
                url.password = Some(password.clone());
            }
        }
        let redis_tls = redis_tls(
            redis.as_ref().or(redis_cluster.first()),
            self.redis_ca_file.as_deref(),
            self.redis_client_cert.as_deref(),
            self.redis_client_key.as_deref(),
        )?;
        let api_key = match (non_empty(self.api_key), &self.api_key_file) {
            (Some(_), Some(_)) => return Err("set HERALD_API_KEY or HERALD_API_KEY_FILE, not both".into()),
            (Some(key), None) => {
                if self.given_as_flags.contains(&"api_key") {
                    warnings.push(flag_warning("--api-key", "HERALD_API_KEY_FILE or HERALD_API_KEY"));
                }
                Some(key)
            }
            (None, Some(path)) => Some(read_secret_text("HERALD_API_KEY_FILE", path)?),
            (None, None) => None,
        };
        let webhook_secret = match (non_empty(self.webhook_secret), &self.webhook_secret_file) {
            (Some(_), Some(_)) => {
                return Err("set HERALD_WEBHOOK_SECRET or HERALD_WEBHOOK_SECRET_FILE, not both".into());
            }
            (Some(secret), None) => {
                if self.given_as_flags.contains(&"webhook_secret") {
                    warnings
                        .push(flag_warning("--webhook-secret", "HERALD_WEBHOOK_SECRET_FILE or HERALD_WEBHOOK_SECRET"));
                }
                Some(secret.into_bytes())
            }
            (None, Some(path)) => Some(read_secret_text("HERALD_WEBHOOK_SECRET_FILE", path)?.into_bytes()),
            (None, None) => None,
        };
        let webhook = match non_empty(self.webhook_url) {
            None if webhook_secret.is_some() => {
                return Err("HERALD_WEBHOOK_SECRET is set without HERALD_WEBHOOK_URL".into());
            }
            None => None,
            Some(url) => {
                let valid = url
                    .parse::<ureq::http::Uri>()
                    .ok()
                    .is_some_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
                if !valid {
                    return Err(format!("HERALD_WEBHOOK_URL `{url}` must be an http:// or https:// URL"));
                }
                if webhook_secret.is_none() {
                    warnings.push(
                        "HERALD_WEBHOOK_URL is set without HERALD_WEBHOOK_SECRET: the receiver cannot tell herald's \
                         posts from anyone else's"
                            .into(),
                    );
                }
                Some((url, webhook_secret))
            }
        };
        // Each prefix must claim a namespace of its own: an empty prefix PSUBSCRIBEs every
        // channel on the server, and nested prefixes route one kind of channel as the other.
        let (user_prefix, topic_prefix) = (&self.user_channel_prefix, &self.topic_channel_prefix);
        for (name, prefix) in
            [("HERALD_USER_CHANNEL_PREFIX", user_prefix), ("HERALD_TOPIC_CHANNEL_PREFIX", topic_prefix)]
        {
            if prefix.is_empty() {
                return Err(format!("{name} must not be empty: it would subscribe to every Redis channel"));
            }
        }
        if user_prefix.starts_with(topic_prefix.as_str()) || topic_prefix.starts_with(user_prefix.as_str()) {
            return Err(format!(
                "HERALD_USER_CHANNEL_PREFIX `{user_prefix}` and HERALD_TOPIC_CHANNEL_PREFIX `{topic_prefix}` \
                 overlap: neither may be a prefix of the other"
            ));
        }
        let threads = match self.threads {
            Some(0) => return Err("HERALD_THREADS must be at least 1".into()),
            Some(n) if n > MAX_THREADS => return Err(format!("HERALD_THREADS must be at most {MAX_THREADS}")),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_THREADS),
        };
        if self.max_message_bytes < 16 || self.max_message_bytes > 16 * 1024 * 1024 {
            return Err("HERALD_MAX_MESSAGE_BYTES must be between 16 and 16777216".into());
        }
        if self.send_queue == 0 {
            return Err("HERALD_SEND_QUEUE must be at least 1".into());
        }
        for (name, value) in [
            ("HERALD_PING_INTERVAL", self.ping_interval),
            ("HERALD_IDLE_TIMEOUT", self.idle_timeout),
            ("HERALD_HEARTBEAT_INTERVAL", self.heartbeat_interval),
            ("HERALD_HANDSHAKE_TIMEOUT", self.handshake_timeout),
        ] {
            if value < Duration::from_millis(100) {
                return Err(format!("{name} must be at least 100ms"));
            }
        }
        for (name, value) in [
            ("HERALD_PING_INTERVAL", self.ping_interval),
            ("HERALD_IDLE_TIMEOUT", self.idle_timeout),
            ("HERALD_HEARTBEAT_INTERVAL", self.heartbeat_interval),
            ("HERALD_HANDSHAKE_TIMEOUT", self.handshake_timeout),
            ("HERALD_SHUTDOWN_GRACE", self.shutdown_grace),
            ("HERALD_DRAIN_PERIOD", self.drain_period),
        ] {
            if value > MAX_DURATION_SETTING {
                return Err(format!("{name} must be at most 24h"));
            }
        }
        if self.history_size > crate::history::MAX_SIZE {
            return Err(format!("HERALD_HISTORY_SIZE must be at most {}", crate::history::MAX_SIZE));
        }
        if self.history_size > 0 && self.history_ttl < Duration::from_secs(1) {
            return Err("HERALD_HISTORY_TTL must be at least 1s".into());
        }
        if self.history_size > 0 && self.history_memory < 64 * 1024 {
            return Err("HERALD_HISTORY_MEMORY must be at least 64KiB".into());
        }
        let history =
            crate::history::Settings { size: self.history_size, ttl: self.history_ttl, memory: self.history_memory };
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => {
                // Checked now so a bad pair stops herald with one line, before anything starts.
                crate::tls::Acceptor::load(&cert, &key)?;
                Some((cert, key))
            }
            (None, None) => None,
            _ => return Err("HERALD_TLS_CERT and HERALD_TLS_KEY go together: set both or neither".into()),
        };
        let allowed_origins = {
            let list: Vec<String> = self
                .allowed_origins
                .split(',')
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|o| !o.is_empty())
                .collect();
            if list.iter().any(|o| o == "*") { None } else { Some(list) }
        };
        Ok(Config {
            listen,
            jwt_key,
            jwt_secret_previous: previous,
            jwt_public_key,
            jwks,
            dev_mode,
            jwt_audience: non_empty(self.jwt_audience),
            jwt_issuer: non_empty(self.jwt_issuer),
            redis,
            redis_tls,
            redis_subscribe: if self.redis_subscribe == "pattern" {
                SubscribeMode::Pattern
            } else {
                SubscribeMode::Exact
            },
            redis_cluster,
            redis_cluster_pubsub: pubsub,
            user_channel_prefix: self.user_channel_prefix,
            topic_channel_prefix: self.topic_channel_prefix,
            threads,
            max_connections: self.max_connections,
            max_connections_per_user: self.max_connections_per_user,
            max_message_bytes: self.max_message_bytes,
            send_queue: self.send_queue,
            ping_interval: self.ping_interval,
            idle_timeout: self.idle_timeout,
            heartbeat_interval: self.heartbeat_interval,
            handshake_timeout: self.handshake_timeout,
            shutdown_grace: self.shutdown_grace,
            drain_period: self.drain_period,
            history,
            tls,
            api_key,
            presence_channel: self.presence_channel,
            webhook,
            allowed_origins,
            connect_rate_per_ip: self.connect_rate_per_ip,
            log: self.log,
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut full = vec!["herald"];
        full.extend_from_slice(args);
        Cli::parse_with_sources(full).map_err(|e| e.to_string())?.server.into_config()
    }

    #[test]
    fn defaults_follow_the_spec() {
        let config = parse(&["--jwt-secret", "s"]).expect("defaults are valid");
        assert_eq!(config.listen, "0.0.0.0:8081".parse().unwrap());
        assert_eq!(config.max_connections, 10_000);
        assert_eq!(config.max_connections_per_user, 64);
        assert_eq!(config.max_message_bytes, 512);
        assert_eq!(config.send_queue, 256);
        assert_eq!(config.ping_interval, Duration::from_secs(30));
        assert_eq!(config.idle_timeout, Duration::from_secs(60));
        assert!(config.allowed_origins.is_none());
        assert!(!config.dev_mode);
    }

    #[test]
    fn durations_and_lists_parse() {
        let config = parse(&[
            "--jwt-secret",
            "s",
            "--ping-interval",
            "500ms",
            "--allowed-origins",
            "https://a.example, https://B.example/",
        ])
        .unwrap();
        assert_eq!(config.ping_interval, Duration::from_millis(500));
        assert_eq!(
            config.allowed_origins,
            Some(vec!["https://a.example".to_string(), "https://b.example".to_string()])
        );
    }

    #[test]
    fn bad_values_are_rejected_with_the_setting_named() {
        assert!(parse(&["--listen", "nowhere"]).unwrap_err().contains("HERALD_LISTEN"));
        assert!(parse(&["--threads", "0"]).unwrap_err().contains("HERALD_THREADS"));
        assert!(parse(&["--send-queue", "0"]).unwrap_err().contains("HERALD_SEND_QUEUE"));
        assert!(parse(&["--ping-interval", "banana"]).is_err());
    }

    #[test]
    fn durations_have_an_upper_bound() {
        for flag in
            ["--ping-interval", "--idle-timeout", "--heartbeat-interval", "--handshake-timeout", "--shutdown-grace"]
        {
            let err = parse(&["--jwt-secret", "s", flag, "300000000000y"]).unwrap_err();
            let variable = format!("HERALD_{}", flag[2..].replace('-', "_").to_ascii_uppercase());
            assert!(err.contains(&variable), "{flag}: {err}");
            assert!(parse(&["--jwt-secret", "s", flag, "24h"]).is_ok(), "{flag} 24h");
        }
    }

    #[test]
    fn channel_prefixes_must_be_distinct_namespaces() {
        for (user, topic) in [("", "topic_noti:"), ("user_noti:", ""), ("noti:", "noti:topic:"), ("a:", "a:")] {
            let err = parse(&["--user-channel-prefix", user, "--topic-channel-prefix", topic]).unwrap_err();
            assert!(err.contains("CHANNEL_PREFIX"), "{user:?} {topic:?}: {err}");
        }
        assert!(parse(&["--user-channel-prefix", "u:", "--topic-channel-prefix", "t:"]).is_ok());
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let args = [
            "herald",
            "--jwt-secret",
            "jwt-secret-value-jwt-secret-value-0123",
            "--api-key",
            "api-key-value-42",
            "--redis-url",
            "redis://user:redis-password-7@127.0.0.1:6379/0",
        ];
        let cli = Cli::parse_with_sources(args).unwrap();
        let raw = format!("{cli:?}");
        let config = cli.server.into_config().unwrap();
        let debug = format!("{config:?}\n{raw}");
        for secret in ["jwt-secret-value", "api-key-value-42", "redis-password-7"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(debug.contains("redis://user:<redacted>@127.0.0.1:6379/0"), "{debug}");
        assert!(debug.contains("api_key: Some(\"<redacted>\")"), "{debug}");
    }

    #[test]
    fn key_sources_combine_and_the_previous_secret_needs_a_current_one() {
        let dir = std::env::temp_dir().join(format!("herald-config-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let previous = dir.join("previous");
        std::fs::write(&previous, "previous-secret-previous-secret-0123\n").unwrap();
        let previous = previous.to_string_lossy().into_owned();
        let pem = format!("{}/tests/fixtures/ec_public.pem", env!("CARGO_MANIFEST_DIR"));
        let current = "current-secret-current-secret-01234";

        let config = parse(&["--jwt-secret", current, "--jwt-secret-previous-file", &previous]).unwrap();
        assert!(matches!(&config.jwt_key, JwtKey::Secret(s) if s == current.as_bytes()));
        assert_eq!(config.jwt_secret_previous.as_deref(), Some(&b"previous-secret-previous-secret-0123"[..]));
        assert!(config.warnings.iter().all(|w| !w.contains("PREVIOUS")), "{:?}", config.warnings);

        let orphan = parse(&["--jwt-secret-previous-file", &previous]).unwrap_err();
        assert!(orphan.contains("HERALD_JWT_SECRET is not"), "{orphan}");
        let both =
            parse(&["--jwt-secret", current, "--jwt-secret-previous", "x", "--jwt-secret-previous-file", &previous])
                .unwrap_err();
        assert!(both.contains("HERALD_JWT_SECRET_PREVIOUS_FILE"), "{both}");
        let short = parse(&["--jwt-secret", current, "--jwt-secret-previous", "old"]).unwrap();
        assert!(
            short.warnings.iter().any(|w| w.contains("HERALD_JWT_SECRET_PREVIOUS is 3 bytes")),
            "{:?}",
            short.warnings
        );
        assert!(short.warnings.iter().any(|w| w.contains("--jwt-secret-previous")), "{:?}", short.warnings);

        // Public keys alone: no secret, and no dev mode either.
        for args in [vec!["--jwks", "https://idp.example/keys"], vec!["--jwt-public-key", &pem]] {
            let config = parse(&args).unwrap();
            assert!(matches!(config.jwt_key, JwtKey::Unset) && !config.dev_mode, "{args:?}");
        }
        // The PEM key and the JWKS combine; a public key makes the secrets ignored, loudly.
        let all = parse(&[
            "--jwt-secret",
            current,
            "--jwt-secret-previous-file",
            &previous,
            "--jwt-public-key",
            &pem,
            "--jwks",
            "/etc/herald/jwks.json",
        ])
        .unwrap();
        assert!(matches!(all.jwt_key, JwtKey::Unset) && all.jwt_secret_previous.is_none() && !all.dev_mode);
        assert!(all.jwt_public_key.is_some());
        assert_eq!(all.jwks, Some(JwksSource::File("/etc/herald/jwks.json".into())));
        assert!(all.warnings.iter().any(|w| w.contains("ignored")), "{:?}", all.warnings);
        let scheme = parse(&["--jwks", "ftp://idp.example/keys"]).unwrap_err();
        assert!(scheme.starts_with("HERALD_JWKS"), "{scheme}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn debug_output_redacts_the_previous_secret_and_jwks_credentials() {
        let args = [
            "herald",
            "--jwt-secret",
            "current-secret-value-current-secret",
            "--jwt-secret-previous",
            "previous-secret-value-previous-secret",
            "--jwks",
            "https://user:jwks-password-9@idp.example/keys?key=jwks-query-8",
        ];
        let cli = Cli::parse_with_sources(args).unwrap();
        let raw = format!("{cli:?}");
        let config = cli.server.into_config().unwrap();
        let debug = format!("{config:?}\n{raw}");
        for secret in ["current-secret-value", "previous-secret-value", "jwks-password-9", "jwks-query-8"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(debug.contains("https://idp.example/keys"), "{debug}");
        let warnings = config.warnings.join("\n");
        assert!(!warnings.contains("previous-secret-value"), "{warnings}");
    }

    #[test]
    fn secrets_given_as_flags_or_too_short_draw_warnings_without_the_secret() {
        let config =
            parse(&["--jwt-secret", "short", "--api-key", "k-123", "--redis-url", "redis://:pw-456@h:1"]).unwrap();
        let all = config.warnings.join("\n");
        assert_eq!(config.warnings.len(), 4, "{all}");
        for flag in ["--jwt-secret", "--api-key", "--redis-url"] {
            assert!(all.contains(flag), "{flag}: {all}");
        }
        assert!(all.contains("5 bytes"), "{all}");
        for secret in ["short", "k-123", "pw-456"] {
            assert!(!all.contains(secret), "{secret} in {all}");
        }
        let empty = parse(&["--jwt-secret-file", "/dev/null"]).unwrap_err();
        assert!(empty.contains("HERALD_JWT_SECRET_FILE") && empty.contains("empty"), "{empty}");
    }

    #[test]
    fn secret_files_are_read_trimmed_and_exclusive() {
        let dir = std::env::temp_dir().join(format!("herald-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.to_string_lossy().into_owned()
        };
        let (secret, key, password) =
            (file("secret", "0123456789abcdef0123456789abcdef\n"), file("key", "k1\r\n"), file("pw", "p@ss w\n"));
        let config = parse(&[
            "--jwt-secret-file",
            &secret,
            "--api-key-file",
            &key,
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--redis-password-file",
            &password,
        ])
        .unwrap();
        assert!(matches!(&config.jwt_key, JwtKey::Secret(s) if s == b"0123456789abcdef0123456789abcdef"));
        assert_eq!(config.api_key.as_deref(), Some("k1"));
        let redis = config.redis.as_ref().unwrap();
        assert_eq!((redis.host.as_str(), redis.port, redis.password.as_deref()), ("127.0.0.1", 6379, Some("p@ss w")));
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
        let both = parse(&["--jwt-secret", "s", "--jwt-secret-file", &secret]).unwrap_err();
        assert!(both.contains("HERALD_JWT_SECRET_FILE"), "{both}");
        let twice = parse(&["--redis-url", "redis://:old@h:1", "--redis-password-file", &password]).unwrap_err();
        assert!(twice.contains("HERALD_REDIS_PASSWORD_FILE"), "{twice}");
        let orphan = parse(&["--redis-password-file", &password]).unwrap_err();
        assert!(orphan.contains("HERALD_REDIS_URL"), "{orphan}");
        let missing = parse(&["--api-key-file", "/nonexistent/herald-key"]).unwrap_err();
        assert!(missing.starts_with("HERALD_API_KEY_FILE"), "{missing}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_cluster_is_a_list_of_seed_urls_instead_of_a_redis_url() {
        let config = parse(&["--redis-cluster", "redis://127.0.0.1:7001, redis://127.0.0.1:7002"]).unwrap();
        assert_eq!(config.redis_cluster.iter().map(|u| u.port).collect::<Vec<_>>(), vec![7001, 7002]);
        assert!(config.redis.is_none());
        assert!(matches!(config.redis_endpoint(), Some(Endpoint::Cluster { pubsub: ClusterPubsub::Sharded, .. })));
        let both = parse(&["--redis-cluster", "redis://h:1", "--redis-url", "redis://h:2"]).unwrap_err();
        assert!(both.contains("HERALD_REDIS_URL or HERALD_REDIS_CLUSTER, not both"), "{both}");
        for (bad, why) in [
            ("redis://h:1/3", "database 0"),
            ("redis://h:1,http://:secret-9@h:2", "seed 2"),
            (" , ", "no seed"),
            ("redis://:secret-9@h:1,redis://:other@h:2", "same scheme and credentials"),
        ] {
            let err = parse(&["--redis-cluster", bad]).unwrap_err();
            assert!(err.contains(why) && err.starts_with("HERALD_REDIS_CLUSTER"), "{bad}: {err}");
            assert!(!err.contains("secret-9"), "{err}");
        }
        let pattern = parse(&["--redis-cluster", "redis://h:1", "--redis-subscribe", "pattern"]).unwrap_err();
        assert!(pattern.contains("HERALD_REDIS_CLUSTER_PUBSUB=classic"), "{pattern}");
        let classic = parse(&[
            "--redis-cluster",
            "redis://h:1",
            "--redis-subscribe",
            "pattern",
            "--redis-cluster-pubsub",
            "classic",
        ])
        .unwrap();
        assert!(matches!(classic.redis_endpoint(), Some(Endpoint::Cluster { pubsub: ClusterPubsub::Classic, .. })));
        assert!(parse(&["--redis-cluster", "redis://h:1", "--redis-cluster-pubsub", "broadcast"]).is_err());
    }

    #[test]
    fn cluster_seed_passwords_are_redacted_and_can_come_from_a_file() {
        let args = ["herald", "--redis-cluster", "redis://u:seed-password-3@h1:7001,redis://u:seed-password-3@h2:7002"];
        let cli = Cli::parse_with_sources(args).unwrap();
        let raw = format!("{cli:?}");
        let config = cli.server.into_config().unwrap();
        let debug = format!("{config:?}\n{raw}");
        assert!(!debug.contains("seed-password-3"), "{debug}");
        assert!(debug.contains("redis://u:<redacted>@h2:7002/0"), "{debug}");
        assert!(config.warnings.iter().any(|w| w.contains("--redis-cluster")), "{:?}", config.warnings);
        let dir = std::env::temp_dir().join(format!("herald-cluster-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pw");
        std::fs::write(&path, "from-file\n").unwrap();
        let path = path.to_string_lossy().into_owned();
        let config = parse(&["--redis-cluster", "redis://h1:1,redis://h2:2", "--redis-password-file", &path]).unwrap();
        assert!(config.redis_cluster.iter().all(|u| u.password.as_deref() == Some("from-file")));
        let twice = parse(&["--redis-cluster", "redis://:x@h1:1", "--redis-password-file", &path]).unwrap_err();
        assert!(twice.contains("HERALD_REDIS_PASSWORD_FILE"), "{twice}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
