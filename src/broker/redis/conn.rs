//! One Redis connection for a dedicated thread (the reader or the publisher): opened,
//! TLS-wrapped for `rediss://` and authenticated with blocking calls bounded by timeouts, then
//! driven non-blocking from that thread's own mio poller. Replies and pushes are decoded in
//! place from the read buffer: a value borrows it until the caller has acted on it, and no
//! value is copied.
//!
//! TLS uses rustls's buffered `ClientConnection`: there is one connection per thread, so the
//! few KiB it keeps for its life cost nothing worth the unbuffered API's bookkeeping (which
//! the WebSocket port needs, with thousands of connections).

use std::io::{self, BufRead, Read, Write};
use std::net::{TcpStream as StdStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

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
    /// NOPERM: the ACL user may not run a command herald needs, or not on its channels.
    Denied(String),
    /// The TLS handshake failed (a certificate was refused, no common protocol…) or the
    /// session broke.
    Tls(String),
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
            Failure::Denied(_) => "permission denied",
            Failure::Tls(_) => "tls error",
            Failure::Io(_) => "io error",
            Failure::Protocol(_) => "protocol error",
        }
    }

    /// An error reply, as a failure.
    pub fn from_reply(error: ServerError<'_>) -> Failure {
        match error {
            ServerError::NoAuth(text) | ServerError::Auth(text) => {
                Failure::Auth(String::from_utf8_lossy(text).into_owned())
            }
            ServerError::NoPerm(text) => Failure::Denied(String::from_utf8_lossy(text).into_owned()),
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
            Failure::Denied(detail) => write!(
                f,
                "permission denied by the Redis ACL: {detail} (herald's user needs the channels of its \
                 prefixes and herald:*, the keys herald:*, and the commands it runs: see SECURITY.md)"
            ),
            Failure::Tls(detail) => write!(f, "TLS error: {detail}"),
            Failure::Io(e) => write!(f, "i/o error: {e}"),
            Failure::Protocol(detail) => write!(f, "protocol error: {detail}"),
        }
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        if let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<TlsBroke>()) {
            return Failure::Tls(tls.0.clone());
        }
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

/// A TLS error met by `fill`, carried in the `io::Error` it returns so that the callers'
/// `Failure::from` reports it as a TLS failure rather than as plain i/o.
#[derive(Debug)]
struct TlsBroke(String);

impl std::fmt::Display for TlsBroke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsBroke {}

/// What `rediss://` connections trust and present, loaded once at start (so a bad file stops
/// herald with one line instead of failing every reconnection).
#[derive(Clone)]
pub struct RedisTls {
    config: Arc<ClientConfig>,
    /// Whom herald trusts, for the log line of a refused certificate.
    trusts: Arc<str>,
    client_certificate: bool,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("trusts", &self.trusts)
            .field("client_certificate", &self.client_certificate)
            .finish()
    }
}

impl RedisTls {
    /// Trusts the CAs of `ca_file` (PEM), or the system's roots without one, and presents
    /// the certificate chain and key of `client` (PEM files) when Redis asks for one. The
    /// error is one line for the operator, naming the setting at fault.
    pub fn load(ca_file: Option<&Path>, client: Option<(&Path, &Path)>) -> Result<RedisTls, String> {
        let mut roots = RootCertStore::empty();
        let trusts = match ca_file {
            Some(path) => {
                let shown = path.display();
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("HERALD_REDIS_CA_FILE `{shown}` cannot be read: {e}"))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("HERALD_REDIS_CA_FILE `{shown}` is not a PEM certificate bundle: {e}"))?;
                if certs.is_empty() {
                    return Err(format!("HERALD_REDIS_CA_FILE `{shown}` holds no PEM certificate"));
                }
                // Every certificate of a bundle the operator named must be usable: one that is
                // silently skipped would make a CA they rely on missing.
                for (i, cert) in certs.into_iter().enumerate() {
                    roots.add(cert).map_err(|e| {
                        format!("HERALD_REDIS_CA_FILE `{shown}`: certificate {} is not a usable CA: {e}", i + 1)
                    })?;
                }
                format!("the CAs in HERALD_REDIS_CA_FILE `{shown}`")
            }
            None => {
                // The operating system's store (or SSL_CERT_FILE / SSL_CERT_DIR): what the
                // operator already maintains, private CAs included.
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    let why = found.errors.first().map_or_else(|| "none found".to_string(), |e| e.to_string());
                    return Err(format!(
                        "HERALD_REDIS_URL is rediss:// but the system's root certificates cannot be loaded \
                         ({why}); set HERALD_REDIS_CA_FILE to the CA that signed Redis's certificate"
                    ));
                }
                format!("the system's {added} root certificates (set HERALD_REDIS_CA_FILE to trust a private CA)")
            }
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| format!("HERALD_REDIS_CLIENT_CERT `{}` cannot be read: {e}", cert.display()))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| {
                        format!("HERALD_REDIS_CLIENT_CERT `{}` is not a PEM certificate chain: {e}", cert.display())
                    })?;
                if chain.is_empty() {
                    return Err(format!("HERALD_REDIS_CLIENT_CERT `{}` holds no certificate", cert.display()));
                }
                let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    format!("HERALD_REDIS_CLIENT_KEY `{}` is not a readable PEM private key: {e}", key.display())
                })?;
                builder.with_client_auth_cert(chain, private).map_err(|e| {
                    format!("HERALD_REDIS_CLIENT_CERT and HERALD_REDIS_CLIENT_KEY do not make a usable pair: {e}")
                })?
            }
        };
        Ok(RedisTls { config: Arc::new(config), trusts: trusts.into(), client_certificate: client.is_some() })
    }

    /// A new session with the server named `host` (a DNS name or an IP address; either is
    /// what its certificate must name).
    fn session(&self, host: &str) -> Result<ClientConnection, Failure> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| Failure::Tls(format!("`{host}` cannot be checked against a certificate")))?;
        ClientConnection::new(self.config.clone(), name).map_err(|e| Failure::Tls(e.to_string()))
    }

    /// A TLS error for the log, with what herald trusts when a certificate is the problem,
    /// and what to check when Redis refused the handshake.
    fn explain(&self, e: rustls::Error) -> String {
        use rustls::AlertDescription::{BadCertificate, CertificateRequired, HandshakeFailure, UnknownCA};
        match e {
            rustls::Error::InvalidCertificate(_) => {
                format!("Redis's certificate was refused ({e}); herald trusts {}", self.trusts)
            }
            rustls::Error::AlertReceived(
                alert @ (CertificateRequired | BadCertificate | UnknownCA | HandshakeFailure),
            ) => {
                if self.client_certificate {
                    format!(
                        "Redis refused the handshake ({alert:?}): is herald's client certificate \
                         (HERALD_REDIS_CLIENT_CERT) signed by a CA in Redis's tls-ca-cert-file?"
                    )
                } else {
                    format!(
                        "Redis refused the handshake ({alert:?}); if it requires client certificates \
                         (tls-auth-clients yes), set HERALD_REDIS_CLIENT_CERT and HERALD_REDIS_CLIENT_KEY"
                    )
                }
            }
            other => other.to_string(),
        }
    }
}

pub struct Conn {
    pub stream: TcpStream,
    /// The TLS session of a `rediss://` connection; `None` for `redis://`.
    tls: Option<Box<(ClientConnection, RedisTls)>>,
    /// Encoded commands not yet written, from `written` on.
    out: Vec<u8>,
    written: usize,
    /// Bytes read and not yet decoded, from `start` on.
    input: Vec<u8>,
    start: usize,
    /// What a plain socket is read into before its bytes join `input`: zeroed once here, so a
    /// read costs a copy of what arrived, not the zeroing of a whole chunk (most reads bring a
    /// few hundred bytes, and every drain ends with a read that brings none).
    scratch: Box<[u8]>,
    decoder: Decoder,
}

impl Conn {
    /// Connects to `url`, completes the TLS handshake of a `rediss://` URL (trusting what
    /// `tls` says), authenticates, selects its database and names the connection `name` (what
    /// CLIENT LIST shows operators), all within `timeout`. Returns the connection,
    /// non-blocking from then on.
    pub fn open(
        url: &RedisUrl,
        tls: Option<&RedisTls>,
        name: &str,
        timeout: Duration,
        max_bulk: usize,
    ) -> Result<Conn, Failure> {
        let tls = match (url.tls, tls) {
            (true, None) => return Err(Failure::Tls("rediss:// without TLS settings".into())),
            (true, Some(tls)) => Some(tls),
            (false, _) => None,
        };
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
        let sock = std_stream.ok_or(last)?;
        sock.set_nodelay(true)?;
        let session = match tls {
            Some(settings) => Some((settings.session(&url.host)?, settings.clone())),
            None => None,
        };
        let mut opening = Opening { sock, tls: session, deadline };
        opening.handshake()?;
        let mut handshake = Vec::new();
        let replies = url.handshake(&mut handshake) + 1;
        resp::encode_command(&mut handshake, [b"CLIENT".as_slice(), b"SETNAME", name.as_bytes()]);
        let mut decoder = Decoder::new(Limits::with_max_bulk(max_bulk));
        let mut input = Vec::new();
        opening.send(&handshake)?;
        for reply in 1..=replies {
            let error = read_blocking(&mut opening, &mut decoder, &mut input, |v| v.error().map(Failure::from_reply))?;
            // The name is a courtesy: an ACL user may lack `client|setname`, and still work.
            let naming = reply == replies;
            if let Some(failure) = error.filter(|_| !naming) {
                return Err(failure);
            }
        }
        let Opening { sock, tls, .. } = opening;
        sock.set_nonblocking(true)?;
        Ok(Conn {
            stream: TcpStream::from_std(sock),
            tls: tls.map(Box::new),
            out: Vec::new(),
            written: 0,
            input,
            start: 0,
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            decoder,
        })
    }

    /// The buffer commands are encoded into; [`Conn::flush`] writes it.
    pub fn commands(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Encoded bytes not written yet.
    pub fn unwritten(&self) -> usize {
        self.out.len() - self.written
    }

    /// Writes what the socket takes. `Ok(true)` when everything went out.
    pub fn flush(&mut self) -> io::Result<bool> {
        let Conn { stream, tls, out, written, .. } = self;
        let done = match tls {
            None => flush_plain(stream, out, written)?,
            Some(tls) => flush_tls(&mut tls.0, stream, out, written)?,
        };
        if done {
            out.clear();
            *written = 0;
        }
        Ok(done)
    }

    /// Reads what the socket has, until it would block (the poller is edge-triggered).
    /// `Err` on EOF (Redis closed the connection) or an error; a TLS error carries its text for
    /// `Failure::from`.
    pub fn fill(&mut self) -> io::Result<()> {
        self.compact();
        let Conn { stream, tls, input, scratch, .. } = self;
        match tls {
            None => read_until_blocked(stream, input, scratch),
            Some(tls) => {
                let (session, settings) = &mut **tls;
                fill_tls(session, settings, stream, input)
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

/// The connection while [`Conn::open`] runs it: blocking, every call bounded by what is left
/// of the deadline.
struct Opening {
    sock: StdStream,
    tls: Option<(ClientConnection, RedisTls)>,
    deadline: Instant,
}

impl Opening {
    /// The time left, or a timeout once it is spent.
    fn left(deadline: Instant) -> Result<Duration, Failure> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() { Err(Failure::Timeout) } else { Ok(left.max(MIN_WAIT)) }
    }

    /// Completes the TLS handshake (no-op without TLS).
    fn handshake(&mut self) -> Result<(), Failure> {
        let Some((session, settings)) = self.tls.as_mut() else { return Ok(()) };
        while session.is_handshaking() {
            if session.wants_write() {
                write_records(session, &mut self.sock, self.deadline)?;
            } else {
                read_records(session, settings, &mut self.sock, self.deadline)?;
            }
        }
        // The client's last flight (its Finished) goes out now, not with the first command.
        write_records(session, &mut self.sock, self.deadline)
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        match self.tls.as_mut() {
            None => {
                self.sock.set_write_timeout(Some(Self::left(self.deadline)?))?;
                self.sock.write_all(bytes)?;
                Ok(())
            }
            Some((session, _)) => {
                session.writer().write_all(bytes)?;
                write_records(session, &mut self.sock, self.deadline)
            }
        }
    }

    /// Reads some bytes (plaintext, under TLS); 0 never: EOF is an error here.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Failure> {
        let n = match self.tls.as_mut() {
            None => {
                self.sock.set_read_timeout(Some(Self::left(self.deadline)?))?;
                loop {
                    match self.sock.read(buf) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        other => break other?,
                    }
                }
            }
            Some((session, settings)) => loop {
                match session.reader().read(buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        read_records(session, settings, &mut self.sock, self.deadline)?;
                    }
                    Err(e) => return Err(e.into()),
                }
            },
        };
        if n == 0 {
            return Err(Failure::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(n)
    }
}

/// Blocking: writes every TLS record the session has queued.
fn write_records(session: &mut ClientConnection, sock: &mut StdStream, deadline: Instant) -> Result<(), Failure> {
    while session.wants_write() {
        sock.set_write_timeout(Some(Opening::left(deadline)?))?;
        match session.write_tls(sock) {
            Ok(0) => return Err(Failure::Io(io::ErrorKind::WriteZero.into())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Blocking: reads one batch of TLS records and processes them.
fn read_records(
    session: &mut ClientConnection,
    settings: &RedisTls,
    sock: &mut StdStream,
    deadline: Instant,
) -> Result<(), Failure> {
    sock.set_read_timeout(Some(Opening::left(deadline)?))?;
    match session.read_tls(sock) {
        Ok(0) if session.is_handshaking() => {
            Err(Failure::Tls("Redis closed the connection during the TLS handshake (is the port TLS?)".into()))
        }
        Ok(0) => Err(Failure::Io(io::ErrorKind::UnexpectedEof.into())),
        Ok(_) => match session.process_new_packets() {
            Ok(_) => Ok(()),
            Err(e) => {
                // Best effort: the alert rustls queued tells Redis's log why.
                let _ = session.write_tls(sock);
                Err(Failure::Tls(settings.explain(e)))
            }
        },
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Reads until one value is complete and returns what `act` makes of it.
fn read_blocking<R>(
    conn: &mut Opening,
    decoder: &mut Decoder,
    input: &mut Vec<u8>,
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
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk)?;
        input.extend_from_slice(&chunk[..n]);
    }
}

/// Non-blocking: writes `out[written..]` until done or the socket would block.
fn flush_plain(stream: &mut TcpStream, out: &[u8], written: &mut usize) -> io::Result<bool> {
    while *written < out.len() {
        match stream.write(&out[*written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => *written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Non-blocking: hands `out[written..]` to the session as its buffer limit allows, and
/// writes the records until done or the socket would block. Done means every record is out
/// too, replies the session owes included (a key update's).
fn flush_tls(
    session: &mut ClientConnection,
    stream: &mut TcpStream,
    out: &[u8],
    written: &mut usize,
) -> io::Result<bool> {
    loop {
        if *written < out.len() {
            *written += session.writer().write(&out[*written..])?;
        }
        if !session.wants_write() {
            if *written == out.len() {
                return Ok(true);
            }
            // Nothing queued, yet plaintext refused: the session is closing.
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the TLS session takes no more data"));
        }
        match session.write_tls(stream) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Non-blocking: appends what the socket has to `input`, until it would block.
fn read_until_blocked(source: &mut TcpStream, input: &mut Vec<u8>, scratch: &mut [u8]) -> io::Result<()> {
    loop {
        match source.read(scratch) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => input.extend_from_slice(&scratch[..n]),
            Err(e) => match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(()),
                io::ErrorKind::Interrupted => {}
                _ => return Err(e),
            },
        }
    }
}

/// Moves the plaintext the session has decrypted to `input`. `Err` once Redis closed the
/// session (close_notify, or EOF without it).
fn take_plaintext(session: &mut ClientConnection, input: &mut Vec<u8>) -> io::Result<()> {
    let mut reader = session.reader();
    loop {
        let taken = match reader.fill_buf() {
            Ok([]) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(chunk) => {
                input.extend_from_slice(chunk);
                chunk.len()
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        };
        reader.consume(taken);
    }
}

/// Non-blocking: reads records until the socket would block, appending their plaintext to
/// `input`. Plaintext already decrypted (during `open`, or before a full buffer stopped a
/// read) is taken first: the poller will not report it again.
fn fill_tls(
    session: &mut ClientConnection,
    settings: &RedisTls,
    stream: &mut TcpStream,
    input: &mut Vec<u8>,
) -> io::Result<()> {
    loop {
        take_plaintext(session, input)?;
        match session.read_tls(stream) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {
                if let Err(e) = session.process_new_packets() {
                    let _ = session.write_tls(stream);
                    return Err(io::Error::new(io::ErrorKind::InvalidData, TlsBroke(settings.explain(e))));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    // What the records asked for (a key update's reply) goes out now if the socket takes
    // it, else with the next flush.
    while session.wants_write() {
        match session.write_tls(stream) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::redis::resp::classify_error;

    #[test]
    fn error_replies_become_failures_by_kind() {
        let kind = |text: &[u8]| Failure::from_reply(classify_error(text)).kind();
        assert_eq!(kind(b"WRONGPASS invalid username-password pair or user is disabled."), "authentication failed");
        assert_eq!(kind(b"NOAUTH Authentication required."), "authentication failed");
        assert_eq!(
            kind(b"NOPERM this user has no permissions to access one of the channels used as arguments"),
            "permission denied"
        );
        assert_eq!(kind(b"ERR unknown command"), "protocol error");
        let denied =
            Failure::from_reply(classify_error(b"NOPERM this user has no permissions to run the 'psubscribe' command"));
        let line = denied.to_string();
        assert!(line.starts_with("permission denied by the Redis ACL: NOPERM"), "{line}");
    }

    #[test]
    fn a_tls_error_from_fill_is_reported_as_tls() {
        let e =
            io::Error::new(io::ErrorKind::InvalidData, TlsBroke("received fatal alert: CertificateRequired".into()));
        let failure = Failure::from(e);
        assert_eq!(failure.kind(), "tls error");
        assert_eq!(failure.to_string(), "TLS error: received fatal alert: CertificateRequired");
        // Other i/o errors keep their kinds.
        assert_eq!(Failure::from(io::Error::from(io::ErrorKind::InvalidData)).kind(), "io error");
        assert_eq!(Failure::from(io::Error::from(io::ErrorKind::TimedOut)).kind(), "timeout");
    }

    /// A directory of PEM files for one test, removed when dropped.
    struct Files(std::path::PathBuf);

    impl Files {
        fn new(test: &str) -> Files {
            let dir = std::env::temp_dir().join(format!("herald-conn-test-{}-{test}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Files(dir)
        }

        fn write(&self, name: &str, text: &str) -> std::path::PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn ca_files_are_checked_when_loaded() {
        let files = Files::new("ca");
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_string()]).unwrap();
        let good = files.write("good-ca.pem", &ca.cert.pem());
        let tls = RedisTls::load(Some(&good), None).unwrap();
        assert!(format!("{tls:?}").contains("good-ca.pem"), "{tls:?}");
        let missing = RedisTls::load(Some(Path::new("/nonexistent/ca.pem")), None).unwrap_err();
        assert!(missing.starts_with("HERALD_REDIS_CA_FILE `/nonexistent/ca.pem` cannot be read"), "{missing}");
        let empty = files.write("empty.pem", "no PEM here\n");
        let err = RedisTls::load(Some(&empty), None).unwrap_err();
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let broken = files.write("broken.pem", "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n");
        let err = RedisTls::load(Some(&broken), None).unwrap_err();
        assert!(err.starts_with("HERALD_REDIS_CA_FILE"), "{err}");
        // A key where the client certificate should be.
        let key = files.write("key.pem", &ca.key_pair.serialize_pem());
        let err = RedisTls::load(Some(&good), Some((&key, &key))).unwrap_err();
        assert!(err.contains("HERALD_REDIS_CLIENT_CERT") && err.contains("holds no certificate"), "{err}");
        let cert = files.write("cert.pem", &ca.cert.pem());
        assert!(RedisTls::load(Some(&good), Some((&cert, &key))).is_ok());
    }

    #[test]
    fn server_names_are_the_url_host() {
        let files = Files::new("names");
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_string()]).unwrap();
        let tls = RedisTls::load(Some(&files.write("names-ca.pem", &ca.cert.pem())), None).unwrap();
        for host in ["redis.internal", "127.0.0.1", "::1"] {
            assert!(tls.session(host).is_ok(), "{host}");
        }
        assert!(matches!(tls.session("bad host"), Err(Failure::Tls(_))));
    }
}
