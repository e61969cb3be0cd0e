//! Command line and environment → one validated [`Config`].
//!
//! Every setting is a flag and a `HERALD_*` variable of the same name; clap gives the flag
//! precedence. Validation that clap cannot express (ranges, files, addresses) happens in
//! [`Cli::into_config`], so a bad setting is reported once, in one line, before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

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
    /// Lifetime of the token.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Topics the holder may receive, comma separated; `prefix*` allows a prefix.
    #[arg(long, value_delimiter = ',')]
    pub topics: Vec<String>,
    /// Space-separated scopes, e.g. `publish`.
    #[arg(long)]
    pub scope: Option<String>,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address for WebSocket and HTTP (one port).
    #[arg(long, env = "HERALD_LISTEN", default_value = "0.0.0.0:8081", global = true)]
    pub listen: String,
    /// HS256 secret (alias JWT_SECRET_KEY). Absent: dev mode with a random secret.
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true, global = true)]
    pub jwt_secret: Option<String>,
    /// PEM file with an RSA or EC public key: accept RS256/ES256 tokens instead of HS256.
    #[arg(long, env = "HERALD_JWT_PUBLIC_KEY", global = true)]
    pub jwt_public_key: Option<PathBuf>,
    /// `redis://[:password@]host:port[/db]` (alias REDIS_URL). Absent: embedded broker.
    #[arg(long, env = "HERALD_REDIS_URL", hide_env_values = true, global = true)]
    pub redis_url: Option<String>,
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
    /// On SIGTERM/SIGINT: time to flush and close before exit.
    #[arg(long, env = "HERALD_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Bearer key accepted by the HTTP publish/admin API.
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Comma list of allowed Origin values for upgrades, or `*`.
    #[arg(long, env = "HERALD_ALLOWED_ORIGINS", default_value = "*")]
    pub allowed_origins: String,
    /// New connections per second per client IP (token bucket, burst = 2x); 0 = off.
    #[arg(long, env = "HERALD_CONNECT_RATE_PER_IP", default_value_t = 0)]
    pub connect_rate_per_ip: u32,
    /// Log filter (tracing EnvFilter syntax). Tokens and secrets are never logged.
    #[arg(long, env = "HERALD_LOG", default_value = "info", global = true)]
    pub log: String,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration like 30s, 500ms or 2m ({e})"))
}

/// How tokens are verified.
#[derive(Clone)]
pub enum JwtKey {
    /// HS256 with this secret.
    Secret(Vec<u8>),
    /// RS256 or ES256 with this PEM public key.
    PublicKeyPem(Vec<u8>),
}

impl std::fmt::Debug for JwtKey {
    // The secret must never reach a log line, so Debug shows only which kind of key it is.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwtKey::Secret(_) => f.write_str("Secret(..)"),
            JwtKey::PublicKeyPem(_) => f.write_str("PublicKeyPem(..)"),
        }
    }
}

/// The validated settings the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub jwt_key: JwtKey,
    /// True when no secret was configured and one was generated for this run.
    pub dev_mode: bool,
    pub redis_url: Option<String>,
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
    pub api_key: Option<String>,
    /// `None` allows every Origin.
    pub allowed_origins: Option<Vec<String>>,
    pub connect_rate_per_ip: u32,
    pub log: String,
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
        let listen: SocketAddr = self
            .listen
            .parse()
            .map_err(|_| format!("HERALD_LISTEN `{}` is not an address like 0.0.0.0:8081", self.listen))?;
        let secret = non_empty(self.jwt_secret).or_else(|| env_alias("JWT_SECRET_KEY"));
        let (jwt_key, dev_mode) = match (&self.jwt_public_key, secret) {
            (Some(path), _) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("HERALD_JWT_PUBLIC_KEY `{}` cannot be read: {e}", path.display()))?;
                crate::auth::Verifier::new(&JwtKey::PublicKeyPem(pem.clone()))
                    .map_err(|e| format!("HERALD_JWT_PUBLIC_KEY `{}`: {e}", path.display()))?;
                (JwtKey::PublicKeyPem(pem), false)
            }
            (None, Some(secret)) => (JwtKey::Secret(secret.into_bytes()), false),
            (None, None) => (JwtKey::Secret(crate::auth::random_secret()), true),
        };
        let redis_url = non_empty(self.redis_url).or_else(|| env_alias("REDIS_URL"));
        if let Some(url) = &redis_url {
            if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://")) {
                return Err("HERALD_REDIS_URL must look like redis://[:password@]host:port[/db]".into());
            }
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
            dev_mode,
            redis_url,
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
            api_key: non_empty(self.api_key),
            allowed_origins,
            connect_rate_per_ip: self.connect_rate_per_ip,
            log: self.log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut full = vec!["herald"];
        full.extend_from_slice(args);
        Cli::try_parse_from(full).map_err(|e| e.to_string())?.server.into_config()
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
}
