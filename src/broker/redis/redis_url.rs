//! `redis://` and `rediss://` URLs: where herald's own Redis connections go, how they log in,
//! and the commands that do it.
//!
//! Accepted: `redis[s]://[[user]:password@]host[:port][/db]`. The user and password are
//! percent-decoded; an IPv6 host is written in brackets. Anything else (another scheme, a
//! query, a user without a password, a bad port) is refused with a one-line reason that never
//! quotes the URL, so no part of a password can end up in a log. `Debug` and [`RedisUrl::redacted`]
//! print `<redacted>` for the password.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use super::resp;

pub const DEFAULT_PORT: u16 = 6379;

/// A parsed Redis URL.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// `rediss://`: the connection is TLS.
    pub tls: bool,
    /// A host name or IP address (an IPv6 address without its brackets, ready for
    /// `(host, port)` socket address resolution).
    pub host: String,
    pub port: u16,
    /// ACL user (Redis ≥ 6); None logs in as the default user.
    pub user: Option<String>,
    /// Never printed: `Debug` and `redacted()` show `<redacted>`.
    pub password: Option<String>,
    /// Logical database (`SELECT`); Redis Cluster only has 0.
    pub db: u32,
}

/// Why a URL was refused. The text is fixed per cause: it never contains the URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UrlError(&'static str);

impl UrlError {
    /// The reason alone, e.g. "port must be a number from 1 to 65535".
    pub fn reason(&self) -> &'static str {
        self.0
    }
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid Redis URL: {}", self.0)
    }
}

impl std::error::Error for UrlError {}

impl FromStr for RedisUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<RedisUrl, UrlError> {
        RedisUrl::parse(s)
    }
}

impl RedisUrl {
    pub fn parse(url: &str) -> Result<RedisUrl, UrlError> {
        let (tls, rest) = if let Some(rest) = strip_prefix_ignore_case(url, "redis://") {
            (false, rest)
        } else if let Some(rest) = strip_prefix_ignore_case(url, "rediss://") {
            (true, rest)
        } else {
            return Err(UrlError("the scheme must be redis:// or rediss://"));
        };
        if rest.contains(['?', '#']) {
            return Err(UrlError("query strings and fragments are not supported"));
        }
        if rest.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(UrlError("whitespace or control characters (percent-encode them)"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if path.contains('@') {
            return Err(UrlError("a / in the user or password must be percent-encoded as %2F"));
        }
        // The last '@' ends the user info: a raw '@' in a password still parses.
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(info) => {
                let Some((user, password)) = info.split_once(':') else {
                    return Err(UrlError("user info without a password (write [user]:password@)"));
                };
                let user = percent_decode(user)?;
                let password = percent_decode(password)?;
                match (user.is_empty(), password.is_empty()) {
                    (false, true) => return Err(UrlError("a user needs a password")),
                    (true, true) => (None, None),
                    (true, false) => (None, Some(password)),
                    (false, false) => (Some(user), Some(password)),
                }
            }
        };
        let (host, port) = parse_host_port(hostport)?;
        let db = match path {
            "" | "/" => 0,
            p => {
                let digits = &p[1..];
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(UrlError("the path must be /<database number>"));
                }
                digits.parse::<u32>().map_err(|_| UrlError("database number out of range"))?
            }
        };
        Ok(RedisUrl { tls, host, port, user, password, db })
    }

    /// The URL with the password replaced by `<redacted>`, for logs and status pages.
    pub fn redacted(&self) -> Redacted<'_> {
        Redacted(self)
    }

    /// Appends the commands a new connection sends before any other, for one pipelined
    /// write, and returns how many replies to read before the connection is ready: each is
    /// `+OK` or an error ([`resp::ServerError::Auth`] for bad credentials, `NOPERM`, a
    /// SELECT refused by a cluster…). The first error decides; later replies may be
    /// consequences of it (a SELECT after a failed AUTH gets NOAUTH).
    ///
    /// `AUTH [user] password` then `SELECT db`, rather than `HELLO 3 AUTH …`: AUTH and
    /// SELECT work on every Redis herald may meet (Redis 5, managed services and proxies
    /// that lack HELLO; AUTH with a user needs Redis 6, and only a URL with a user sends
    /// it), each reply is a plain `+OK`, and the connection stays RESP2, so pub/sub
    /// messages keep the array shape every Redis version sends. HELLO would fail on old
    /// servers and need a second round trip to fall back. The decoder reads RESP3 as well,
    /// so switching to HELLO later is a change here only.
    pub fn handshake(&self, out: &mut Vec<u8>) -> usize {
        let mut replies = 0;
        if let Some(password) = &self.password {
            match &self.user {
                Some(user) => resp::encode_command(out, [b"AUTH".as_slice(), user.as_bytes(), password.as_bytes()]),
                None => resp::encode_command(out, [b"AUTH".as_slice(), password.as_bytes()]),
            }
            replies += 1;
        }
        if self.db != 0 {
            let mut digits = [0u8; 10];
            let db = format_u32(self.db, &mut digits);
            resp::encode_command(out, [b"SELECT".as_slice(), db]);
            replies += 1;
        }
        replies
    }

    /// Whether the host is an IPv6 address (written in brackets in a URL).
    pub fn host_is_ipv6(&self) -> bool {
        self.host.contains(':')
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisUrl")
            .field("tls", &self.tls)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("db", &self.db)
            .finish()
    }
}

/// [`RedisUrl::redacted`]: `redis[s]://[user]:<redacted>@host:port/db` (always with port and db).
pub struct Redacted<'a>(&'a RedisUrl);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = self.0;
        f.write_str(if url.tls { "rediss://" } else { "redis://" })?;
        if let Some(user) = &url.user {
            for b in user.bytes() {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                    write!(f, "{}", b as char)?;
                } else {
                    write!(f, "%{b:02X}")?;
                }
            }
        }
        if url.password.is_some() {
            f.write_str(":<redacted>@")?;
        }
        if url.host_is_ipv6() {
            write!(f, "[{}]:{}/{}", url.host, url.port, url.db)
        } else {
            write!(f, "{}:{}/{}", url.host, url.port, url.db)
        }
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

fn parse_host_port(hostport: &str) -> Result<(String, u16), UrlError> {
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return Err(UrlError("an IPv6 host needs its closing ]"));
        };
        if inside.parse::<Ipv6Addr>().is_err() {
            return Err(UrlError("the host in brackets is not an IPv6 address"));
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(UrlError("only :port may follow an IPv6 host"))?),
        };
        (inside, port)
    } else {
        let (host, port) = match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        };
        if host.is_empty() {
            return Err(UrlError("the host is missing"));
        }
        if host.len() > 253 || !host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')) {
            return Err(UrlError(
                "the host must be a name, an IPv4 address or an IPv6 address in brackets, and at most 253 bytes",
            ));
        }
        (host, port)
    };
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => {
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(UrlError("the port must be a number from 1 to 65535"));
            }
            match p.parse::<u16>() {
                Ok(n) if n != 0 => n,
                _ => return Err(UrlError("the port must be a number from 1 to 65535")),
            }
        }
    };
    Ok((host.to_string(), port))
}

/// Strict RFC 3986 decoding: `%` must be followed by two hex digits, and the result must be
/// UTF-8.
fn percent_decode(text: &str) -> Result<String, UrlError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |b: u8| (b as char).to_digit(16);
            let (Some(hi), Some(lo)) = (bytes.get(i + 1).and_then(|&b| hex(b)), bytes.get(i + 2).and_then(|&b| hex(b)))
            else {
                return Err(UrlError("a % in the user or password is not followed by two hex digits"));
            };
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UrlError("the user or password is not UTF-8 once percent-decoded"))
}

/// `n` in decimal, in `buf`.
fn format_u32(mut n: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::broker::redis::resp::tests::{LiveRedis, read_values};
    use crate::broker::redis::resp::{Decoder, ServerError, classify_error};

    fn url(tls: bool, host: &str, port: u16, user: Option<&str>, password: Option<&str>, db: u32) -> RedisUrl {
        RedisUrl { tls, host: host.into(), port, user: user.map(Into::into), password: password.map(Into::into), db }
    }

    #[test]
    fn accepted_forms() {
        let cases: &[(&str, RedisUrl)] = &[
            ("redis://localhost", url(false, "localhost", 6379, None, None, 0)),
            ("redis://localhost/", url(false, "localhost", 6379, None, None, 0)),
            ("redis://127.0.0.1:6380", url(false, "127.0.0.1", 6380, None, None, 0)),
            ("rediss://cache.example.com:6380/3", url(true, "cache.example.com", 6380, None, None, 3)),
            ("REDISS://h", url(true, "h", 6379, None, None, 0)),
            ("redis://:s3cret@h", url(false, "h", 6379, None, Some("s3cret"), 0)),
            ("redis://herald:pw@h:1/15", url(false, "h", 1, Some("herald"), Some("pw"), 15)),
            ("redis://:@h", url(false, "h", 6379, None, None, 0)),
            // Percent-decoding, and the characters that need it.
            ("redis://us%40er:p%3Aw%2F%3F%23%25%20@h", url(false, "h", 6379, Some("us@er"), Some("p:w/?#% "), 0)),
            ("redis://:%C3%A9t%C3%A9@h", url(false, "h", 6379, None, Some("été"), 0)),
            // A raw ':' after the first, and a raw '@' (the last one ends the user info).
            ("redis://u:a:b@c@h", url(false, "h", 6379, Some("u"), Some("a:b@c"), 0)),
            ("redis://[::1]", url(false, "::1", 6379, None, None, 0)),
            ("redis://[::1]:7000/2", url(false, "::1", 7000, None, None, 2)),
            ("rediss://u:p@[2001:db8::42]:6380", url(true, "2001:db8::42", 6380, Some("u"), Some("p"), 0)),
            ("redis://h:65535/4294967295", url(false, "h", 65535, None, None, u32::MAX)),
            ("redis://my_host-1.internal", url(false, "my_host-1.internal", 6379, None, None, 0)),
        ];
        for (text, expected) in cases {
            assert_eq!(RedisUrl::parse(text).as_ref(), Ok(expected), "{text}");
            assert_eq!(text.parse::<RedisUrl>().as_ref(), Ok(expected), "{text}");
        }
    }

    #[test]
    fn refused_forms_never_echo_the_url() {
        let cases: &[(&str, &str)] = &[
            ("http://h", "the scheme must be redis:// or rediss://"),
            ("unix:///tmp/redis.sock", "the scheme must be redis:// or rediss://"),
            ("redis+unix:///tmp/r.sock", "the scheme must be redis:// or rediss://"),
            ("redis:/h", "the scheme must be redis:// or rediss://"),
            ("h:6379", "the scheme must be redis:// or rediss://"),
            ("", "the scheme must be redis:// or rediss://"),
            ("redis://", "the host is missing"),
            ("redis://:6379", "the host is missing"),
            ("redis://:hunter2@", "the host is missing"),
            ("redis://h?protocol=resp3", "query strings and fragments are not supported"),
            ("redis://:hunter2#x@h", "query strings and fragments are not supported"),
            ("redis://h:0", "the port must be a number from 1 to 65535"),
            ("redis://h:65536", "the port must be a number from 1 to 65535"),
            ("redis://h:", "the port must be a number from 1 to 65535"),
            ("redis://h:+1", "the port must be a number from 1 to 65535"),
            ("redis://h:99999999999999999999", "the port must be a number from 1 to 65535"),
            ("redis://h:1:2", "the port must be a number from 1 to 65535"),
            ("redis://::1:6379", "the host is missing"),
            ("redis://fe80::1", "the port must be a number from 1 to 65535"),
            ("redis://[::1", "an IPv6 host needs its closing ]"),
            ("redis://[not-v6]", "the host in brackets is not an IPv6 address"),
            ("redis://[fe80::1%25eth0]", "the host in brackets is not an IPv6 address"),
            ("redis://[::1]x", "only :port may follow an IPv6 host"),
            ("redis://[::1]:", "the port must be a number from 1 to 65535"),
            (
                "redis://h%41",
                "the host must be a name, an IPv4 address or an IPv6 address in brackets, and at most 253 bytes",
            ),
            ("redis://hunter2@h", "user info without a password (write [user]:password@)"),
            ("redis://user:@h", "a user needs a password"),
            ("redis://:hunt%2@h", "a % in the user or password is not followed by two hex digits"),
            ("redis://:hunt%+f@h", "a % in the user or password is not followed by two hex digits"),
            ("redis://:hunt%zz@h", "a % in the user or password is not followed by two hex digits"),
            ("redis://:hunter%FF@h", "the user or password is not UTF-8 once percent-decoded"),
            ("redis://:hunter 2@h", "whitespace or control characters (percent-encode them)"),
            ("redis://:hunter2\n@h", "whitespace or control characters (percent-encode them)"),
            ("redis://h/x", "the path must be /<database number>"),
            ("redis://h/-1", "the path must be /<database number>"),
            ("redis://h/1/2", "the path must be /<database number>"),
            ("redis://h//", "the path must be /<database number>"),
            ("redis://h/4294967296", "database number out of range"),
            // A '/' in a raw password splits the URL early: still refused, still not quoted.
            ("redis://:hunter/2@h", "a / in the user or password must be percent-encoded as %2F"),
        ];
        for (text, reason) in cases {
            let err = RedisUrl::parse(text).expect_err(text);
            assert_eq!(err.reason(), *reason, "{text}");
            let message = err.to_string();
            assert_eq!(message, format!("invalid Redis URL: {reason}"));
            assert!(!message.contains('\n'));
            assert!(!message.contains("hunt") && !message.contains("2@h"), "{message}");
        }
        let long_host = format!("redis://{}", "a".repeat(254));
        assert!(RedisUrl::parse(&long_host).is_err());
        assert!(RedisUrl::parse(&format!("redis://{}", "a".repeat(253))).is_ok());
    }

    #[test]
    fn debug_and_redacted_hide_the_password() {
        let u = RedisUrl::parse("rediss://us%20er:hunter2@[::1]:7000/3").unwrap();
        let debug = format!("{u:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert_eq!(
            debug,
            r#"RedisUrl { tls: true, host: "::1", port: 7000, user: Some("us er"), password: Some("<redacted>"), db: 3 }"#
        );
        assert_eq!(u.redacted().to_string(), "rediss://us%20er:<redacted>@[::1]:7000/3");
        let alt = format!("{u:#?}");
        assert!(!alt.contains("hunter2"));
        let no_user = RedisUrl::parse("redis://:hunter2@h").unwrap();
        assert_eq!(no_user.redacted().to_string(), "redis://:<redacted>@h:6379/0");
        let plain = RedisUrl::parse("redis://h").unwrap();
        assert_eq!(plain.redacted().to_string(), "redis://h:6379/0");
        assert!(format!("{plain:?}").contains("password: None"));
    }

    #[test]
    fn handshake_commands() {
        let mut out = Vec::new();
        assert_eq!(RedisUrl::parse("redis://h").unwrap().handshake(&mut out), 0);
        assert!(out.is_empty());
        assert_eq!(RedisUrl::parse("redis://:p%40ss@h").unwrap().handshake(&mut out), 1);
        assert_eq!(out, b"*2\r\n$4\r\nAUTH\r\n$4\r\np@ss\r\n");
        out.clear();
        assert_eq!(RedisUrl::parse("redis://herald:pw@h/12").unwrap().handshake(&mut out), 2);
        assert_eq!(out, b"*3\r\n$4\r\nAUTH\r\n$6\r\nherald\r\n$2\r\npw\r\n*2\r\n$6\r\nSELECT\r\n$2\r\n12\r\n");
        out.clear();
        assert_eq!(RedisUrl::parse("redis://h/4294967295").unwrap().handshake(&mut out), 1);
        assert_eq!(out, b"*2\r\n$6\r\nSELECT\r\n$10\r\n4294967295\r\n");
    }

    /// The handshake against a real server: an ACL user, the default user's password, SELECT,
    /// and the failures the caller must tell apart.
    #[test]
    fn handshake_against_a_live_redis() {
        let redis = LiveRedis::start(&["--requirepass", "s3 cret@", "--databases", "4"]);
        let admin = format!("redis://:s3%20cret%40@127.0.0.1:{}", redis.port);
        let mut d = Decoder::default();
        let run = |text: &str, d: &mut Decoder| -> Vec<String> {
            let u = RedisUrl::parse(text).unwrap();
            let mut sock = redis.connect();
            let mut out = Vec::new();
            let n = u.handshake(&mut out);
            resp::encode_command(&mut out, ["PING"]);
            sock.write_all(&out).unwrap();
            read_values(&mut sock, d, n + 1)
        };
        assert_eq!(run(&admin, &mut d), [r#"Simple("OK")"#, r#"Simple("PONG")"#]);
        // Make an ACL user through the admin connection.
        let mut sock = redis.connect();
        let mut out = Vec::new();
        resp::encode_command(&mut out, ["AUTH", "s3 cret@"]);
        resp::encode_command(&mut out, ["ACL", "SETUSER", "herald", "on", ">p:w/d", "+ping", "+select", "&*"]);
        sock.write_all(&out).unwrap();
        assert_eq!(read_values(&mut sock, &mut d, 2), [r#"Simple("OK")"#, r#"Simple("OK")"#]);
        let user = format!("redis://herald:p%3Aw%2Fd@127.0.0.1:{}/3", redis.port);
        assert_eq!(run(&user, &mut d), [r#"Simple("OK")"#, r#"Simple("OK")"#, r#"Simple("PONG")"#]);
        // Wrong password: WRONGPASS (Auth), and what follows is refused with NOAUTH.
        let wrong = format!("redis://herald:nope@127.0.0.1:{}/3", redis.port);
        let got = run(&wrong, &mut d);
        let text = |v: &str| v.trim_start_matches("Error(\"").trim_end_matches("\")").to_string();
        assert!(matches!(classify_error(text(&got[0]).as_bytes()), ServerError::Auth(_)), "{got:?}");
        assert!(matches!(classify_error(text(&got[1]).as_bytes()), ServerError::NoAuth(_)), "{got:?}");
        // No password at all.
        let none = format!("redis://127.0.0.1:{}", redis.port);
        let got = run(&none, &mut d);
        assert!(matches!(classify_error(text(&got[0]).as_bytes()), ServerError::NoAuth(_)), "{got:?}");
        // A database the server does not have.
        let bad_db = format!("redis://:s3%20cret%40@127.0.0.1:{}/9", redis.port);
        let got = run(&bad_db, &mut d);
        assert_eq!(got[1], r#"Error("ERR DB index is out of range")"#);
    }
}
