//! One Redis connection for a dedicated thread (the reader or the publisher): opened and
//! authenticated with blocking calls bounded by timeouts, then driven non-blocking from that
//! thread's own mio poller. Replies and pushes are decoded in place from the read buffer: a
//! value borrows it until the caller has acted on it, and no value is copied.

use std::io::{self, Read, Write};
use std::net::{TcpStream as StdStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use super::redis_url::RedisUrl;
use super::resp::{self, Decoded, Decoder, Limits, ProtocolError, ServerError, Value};

/// Bytes read per `read` call.
const READ_CHUNK: usize = 64 * 1024;
/// A read buffer that grew past this (one huge reply) is given back once drained.
const KEEP_INPUT: usize = 256 * 1024;

/// Why a connection failed, by what the operator can do about it. `/health` shows the kind
/// only; the detail goes to the log (it never holds a password: herald's own commands are
/// not echoed in it).
#[derive(Debug)]
pub enum Failure {
    Refused(String),
    Timeout,
    Auth(String),
    Io(io::Error),
    Protocol(String),
}

impl Failure {
    /// The kind, for `/health`.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Refused(_) => "connection refused",
            Failure::Timeout => "timeout",
            Failure::Auth(_) => "authentication failed",
            Failure::Io(_) => "io error",
            Failure::Protocol(_) => "protocol error",
        }
    }

    /// An error reply, as a failure.
    pub fn from_reply(error: ServerError<'_>) -> Failure {
        match error {
            ServerError::NoAuth(text) | ServerError::Auth(text) | ServerError::NoPerm(text) => {
                Failure::Auth(String::from_utf8_lossy(text).into_owned())
            }
            other => Failure::Protocol(format!("{other:?}")),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused(detail) => write!(f, "connection refused ({detail})"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Auth(detail) => write!(f, "authentication failed: {detail}"),
            Failure::Io(e) => write!(f, "i/o error: {e}"),
            Failure::Protocol(detail) => write!(f, "protocol error: {detail}"),
        }
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Failure::Timeout,
            io::ErrorKind::ConnectionRefused => Failure::Refused(e.to_string()),
            _ => Failure::Io(e),
        }
    }
}

impl From<ProtocolError> for Failure {
    fn from(e: ProtocolError) -> Failure {
        Failure::Protocol(e.to_string())
    }
}

pub struct Conn {
    pub stream: TcpStream,
    /// Encoded commands not yet written, from `written` on.
    out: Vec<u8>,
    written: usize,
    /// Bytes read and not yet decoded, from `start` on.
    input: Vec<u8>,
    start: usize,
    decoder: Decoder,
}

impl Conn {
    /// Connects to `url`, authenticates, selects its database and names the connection
    /// `name` (what CLIENT LIST shows operators), all within `timeout`. Returns the
    /// connection, non-blocking from then on.
    pub fn open(url: &RedisUrl, name: &str, timeout: Duration, max_bulk: usize) -> Result<Conn, Failure> {
        if url.tls {
            return Err(Failure::Protocol("rediss:// (TLS to Redis) is not supported by this build".into()));
        }
        let deadline = Instant::now() + timeout;
        let addrs = (url.host.as_str(), url.port).to_socket_addrs().map_err(|e| Failure::Refused(e.to_string()))?;
        let mut last = Failure::Refused(format!("{} resolves to no address", url.redacted()));
        let mut std_stream = None;
        for addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::Timeout);
            }
            match StdStream::connect_timeout(&addr, left) {
                Ok(s) => {
                    std_stream = Some(s);
                    break;
                }
                Err(e) => last = e.into(),
            }
        }
        let mut std_stream = std_stream.ok_or(last)?;
        std_stream.set_nodelay(true)?;
        let mut handshake = Vec::new();
        let replies = url.handshake(&mut handshake) + 1;
        resp::encode_command(&mut handshake, [b"CLIENT".as_slice(), b"SETNAME", name.as_bytes()]);
        let mut decoder = Decoder::new(Limits::with_max_bulk(max_bulk));
        let mut input = Vec::new();
        std_stream.set_write_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(MIN_WAIT)))?;
        std_stream.write_all(&handshake)?;
        for reply in 1..=replies {
            let error = read_blocking(&mut std_stream, &mut decoder, &mut input, deadline, |v| {
                v.error().map(Failure::from_reply)
            })?;
            // The name is a courtesy: an ACL user may lack `client|setname`, and still work.
            let naming = reply == replies;
            if let Some(failure) = error.filter(|_| !naming) {
                return Err(failure);
            }
        }
        std_stream.set_nonblocking(true)?;
        Ok(Conn { stream: TcpStream::from_std(std_stream), out: Vec::new(), written: 0, input, start: 0, decoder })
    }

    /// The buffer commands are encoded into; [`Conn::flush`] writes it.
    pub fn commands(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Writes what the socket takes. `Ok(true)` when everything went out.
    pub fn flush(&mut self) -> io::Result<bool> {
        while self.written < self.out.len() {
            match self.stream.write(&self.out[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.written = 0;
        Ok(true)
    }

    /// Reads what the socket has. `Err` on EOF (Redis closed the connection) or an error.
    pub fn fill(&mut self) -> io::Result<()> {
        self.compact();
        loop {
            let len = self.input.len();
            self.input.resize(len + READ_CHUNK, 0);
            let result = self.stream.read(&mut self.input[len..]);
            match result {
                Ok(0) => {
                    self.input.truncate(len);
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                Ok(n) => self.input.truncate(len + n),
                Err(e) => {
                    self.input.truncate(len);
                    match e.kind() {
                        io::ErrorKind::WouldBlock => return Ok(()),
                        io::ErrorKind::Interrupted => {}
                        _ => return Err(e),
                    }
                }
            }
        }
    }

    /// Decodes the next complete value and hands it to `act`; `None` when the bytes read so
    /// far hold no complete value.
    pub fn next<R>(&mut self, act: impl FnOnce(Value<'_>) -> R) -> Result<Option<R>, ProtocolError> {
        match self.decoder.decode(&self.input[self.start..])? {
            Decoded::Incomplete { .. } => Ok(None),
            Decoded::Complete { value, consumed } => {
                let result = act(value);
                self.start += consumed;
                Ok(Some(result))
            }
        }
    }

    /// Drops decoded bytes from the front of the read buffer.
    fn compact(&mut self) {
        if self.start == self.input.len() {
            self.input.clear();
            if self.input.capacity() > KEEP_INPUT {
                self.input = Vec::new();
            }
        } else if self.start > 0 {
            self.input.drain(..self.start);
        }
        self.start = 0;
    }
}

/// The shortest time a blocking call is given, so a nearly spent deadline still lets it fail
/// cleanly instead of with a zero timeout (which means "no timeout").
const MIN_WAIT: Duration = Duration::from_millis(10);

/// Reads until one value is complete and returns what `act` makes of it.
fn read_blocking<R>(
    stream: &mut StdStream,
    decoder: &mut Decoder,
    input: &mut Vec<u8>,
    deadline: Instant,
    act: impl FnOnce(Value<'_>) -> R,
) -> Result<R, Failure> {
    let mut act = Some(act);
    loop {
        if let Decoded::Complete { value, consumed } = decoder.decode(input)? {
            let result = act.take().map(|act| act(value));
            input.drain(..consumed);
            if let Some(result) = result {
                return Ok(result);
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failure::Timeout);
        }
        stream.set_read_timeout(Some(left.max(MIN_WAIT)))?;
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) => return Err(Failure::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => input.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}
