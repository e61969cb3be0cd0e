//! TLS on the WebSocket port, with rustls's unbuffered API driven by the event loop: bytes read
//! from the socket go in, plaintext comes out; plaintext (shared frames, encrypted only at
//! flush time) goes in, records come out. No I/O here.
//!
//! Memory is the reason for the unbuffered API: rustls's buffered connection keeps a 4 KiB
//! read buffer per connection for its life. Here a connection holds its TLS state and nothing
//! else while idle: received bytes that end mid-record, and records the socket would not take,
//! are kept only until they are used, and the loop's scratch buffers do the rest.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError};

/// Bytes a record adds to its plaintext, at most (header, content type, tag, TLS 1.2 nonce).
const RECORD_OVERHEAD: usize = 5 + 1 + 16 + 8;
/// Bytes received and not yet processed above which a peer is cut off: a record is at most
/// 16 KiB + 256, and a handshake message rustls accepts at most 64 KiB.
const MAX_CARRY: usize = 80 * 1024;

/// Where the certificate and key come from, and the configuration built from them.
pub struct Acceptor {
    cert: PathBuf,
    key: PathBuf,
    config: RwLock<Arc<ServerConfig>>,
}

impl Acceptor {
    /// Loads the PEM certificate chain and private key; the error is one line for the operator.
    pub fn load(cert: &Path, key: &Path) -> Result<Acceptor, String> {
        let config = build_config(cert, key)?;
        Ok(Acceptor { cert: cert.to_path_buf(), key: key.to_path_buf(), config: RwLock::new(config) })
    }

    /// Loads the files again: new handshakes use the new pair, open connections keep theirs.
    /// On error the old pair stays and the error says why.
    pub fn reload(&self) -> Result<(), String> {
        let config = build_config(&self.cert, &self.key)?;
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// A new server-side session for a connection just accepted.
    pub fn session(&self) -> Result<Session, String> {
        let config = self.config.read().unwrap_or_else(|e| e.into_inner()).clone();
        let conn = UnbufferedServerConnection::new(config).map_err(|e| e.to_string())?;
        Ok(Session { conn, carry: Vec::new(), pending: Vec::new(), written: 0, established: false, closing: false })
    }
}

fn build_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("HERALD_TLS_CERT `{}` cannot be read: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("HERALD_TLS_CERT `{}` is not a PEM certificate chain: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("HERALD_TLS_CERT `{}` holds no certificate", cert.display()));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("HERALD_TLS_KEY `{}` is not a readable PEM private key: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| format!("HERALD_TLS_CERT and HERALD_TLS_KEY do not make a usable pair: {e}"))?;
    Ok(Arc::new(config))
}

/// Why a session failed: the peer is not speaking TLS (plain HTTP, garbage), a handshake
/// failed, or it sent more than a record's worth without completing one.
#[derive(Debug)]
pub struct Failed(pub String);

/// What one batch of received bytes amounted to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// The handshake completed with these bytes.
    pub handshake_done: bool,
    /// The peer sent close_notify: no more plaintext will come.
    pub peer_closed: bool,
}

/// One connection's TLS state.
pub struct Session {
    conn: UnbufferedServerConnection,
    /// Received bytes not yet processed (a record split across reads). Empty while idle.
    carry: Vec<u8>,
    /// Records encoded and not yet written, from `written` on. Empty while idle.
    pending: Vec<u8>,
    written: usize,
    /// The handshake completed.
    established: bool,
    /// close_notify was queued.
    closing: bool,
}

impl Session {
    pub fn established(&self) -> bool {
        self.established
    }

    pub fn buffered(&self) -> usize {
        self.carry.len()
    }

    /// Feeds bytes read from the socket; appends the plaintext they carry to `plain`. Records
    /// to send (handshake replies) are queued for [`Session::pending_output`].
    pub fn receive(&mut self, input: &mut [u8], plain: &mut Vec<u8>) -> Result<Received, Failed> {
        if self.carry.is_empty() {
            let (consumed, received) = self.process(input, plain)?;
            if consumed < input.len() {
                self.carry.extend_from_slice(&input[consumed..]);
            }
            return self.bounded().map(|()| received);
        }
        // The bound applies to what is left once the new bytes are processed: a read that
        // completes a record carried so far is fine, however the reads were cut.
        self.carry.extend_from_slice(input);
        let mut carry = std::mem::take(&mut self.carry);
        let result = self.process(&mut carry, plain);
        if let Ok((consumed, _)) = &result {
            carry.drain(..*consumed);
            if carry.is_empty() {
                carry = Vec::new();
            }
            self.carry = carry;
        }
        let received = result.map(|(_, received)| received)?;
        self.bounded().map(|()| received)
    }

    fn bounded(&self) -> Result<(), Failed> {
        if self.carry.len() > MAX_CARRY {
            return Err(Failed("more than a record's worth of bytes without a complete record".into()));
        }
        Ok(())
    }

    /// Runs `step` (given the pending output) over the state machine with the carried bytes: rustls keeps its place in
    /// bytes it has read but not released, and must be shown them again on every call (an
    /// empty buffer there makes it index past the end).
    fn with_carry<R>(
        &mut self,
        mut step: impl FnMut(
            &mut Vec<u8>,
            rustls::unbuffered::UnbufferedStatus<'_, '_, rustls::server::ServerConnectionData>,
        ) -> Step<R>,
    ) -> R {
        let mut carry = std::mem::take(&mut self.carry);
        let mut consumed = 0;
        let result = loop {
            let status = self.conn.process_tls_records(&mut carry[consumed..]);
            consumed += status.discard;
            match step(&mut self.pending, status) {
                Step::Again => continue,
                Step::Done(result) => break result,
            }
        };
        carry.drain(..consumed.min(carry.len()));
        if !carry.is_empty() {
            self.carry = carry;
        }
        result
    }

    /// Runs the state machine over `incoming` until it needs more bytes; returns how many
    /// bytes were used up.
    fn process(&mut self, incoming: &mut [u8], plain: &mut Vec<u8>) -> Result<(usize, Received), Failed> {
        let mut consumed = 0;
        let mut received = Received::default();
        loop {
            let status = self.conn.process_tls_records(&mut incoming[consumed..]);
            let discard = status.discard;
            let state = status.state.map_err(|e| Failed(e.to_string()))?;
            let mut extra = 0;
            let more = match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(|e| Failed(e.to_string()))?;
                        extra += record.discard;
                        plain.extend_from_slice(record.payload);
                    }
                    true
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_into(&mut self.pending, |out| encode.encode(out))?;
                    true
                }
                ConnectionState::TransmitTlsData(transmit) => {
                    // The records stay in `pending` until the socket takes them.
                    transmit.done();
                    true
                }
                ConnectionState::WriteTraffic(_) => {
                    received.handshake_done |= !self.established;
                    self.established = true;
                    false
                }
                ConnectionState::BlockedHandshake => false,
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    received.peer_closed = true;
                    false
                }
                ConnectionState::ReadEarlyData(_) => return Err(Failed("unexpected early data".into())),
                _ => false,
            };
            consumed += discard + extra;
            if !more {
                return Ok((consumed, received));
            }
        }
    }

    /// Encrypts `plaintext` (one or more frames) into records queued for the socket.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<(), Failed> {
        self.with_carry(|pending, status| {
            let state = match status.state {
                Ok(state) => state,
                Err(e) => return Step::Done(Err(Failed(e.to_string()))),
            };
            match state {
                ConnectionState::WriteTraffic(mut traffic) => Step::Done(encode_into(pending, |out| {
                    traffic.encrypt(plaintext, out).map_err(|e| match e {
                        EncryptError::InsufficientSize(size) => EncodeError::InsufficientSize(size),
                        EncryptError::EncryptExhausted => EncodeError::AlreadyEncoded,
                    })
                })),
                ConnectionState::EncodeTlsData(mut encode) => match encode_into(pending, |out| encode.encode(out)) {
                    Ok(()) => Step::Again,
                    Err(e) => Step::Done(Err(e)),
                },
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    Step::Again
                }
                // Mid-handshake (a 408 before it completed): nothing can be sent encrypted.
                _ => Step::Done(Err(Failed("not ready to send application data".into()))),
            }
        })
    }

    /// Queues close_notify once (best effort: a session that cannot send it just goes quiet).
    pub fn close_notify(&mut self) {
        if std::mem::replace(&mut self.closing, true) {
            return;
        }
        self.with_carry(|pending, status| {
            if let Ok(ConnectionState::WriteTraffic(mut traffic)) = status.state {
                let _ = encode_into(pending, |out| {
                    traffic.queue_close_notify(out).map_err(|_| EncodeError::AlreadyEncoded)
                });
            }
            Step::Done(())
        })
    }

    /// Records waiting for the socket.
    pub fn pending_output(&self) -> &[u8] {
        &self.pending[self.written..]
    }

    /// `n` bytes of [`Session::pending_output`] were written.
    pub fn wrote(&mut self, n: usize) {
        self.written += n;
        if self.written >= self.pending.len() {
            self.pending = Vec::new();
            self.written = 0;
        }
    }
}

/// What a step of [`Session::with_carry`] decided.
enum Step<R> {
    Again,
    Done(R),
}

/// Runs `encode` into the spare room of `out`, growing it to what the record needs.
fn encode_into(
    out: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> Result<(), Failed> {
    let mut room = 2 * RECORD_OVERHEAD + 512;
    loop {
        let start = out.len();
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                out.truncate(start);
                if required_size <= room {
                    return Err(Failed("the TLS library asked for less room than it was given".into()));
                }
                room = required_size;
            }
            Err(EncodeError::AlreadyEncoded) => {
                out.truncate(start);
                return Err(Failed("a TLS record could not be encoded".into()));
            }
        }
    }
}

/// Plaintext encrypted per `write_vectored` call at most: the send queue's writes stay in
/// step with what the socket takes.
const PLAINTEXT_PER_WRITE: usize = 64 * 1024;

/// Writes a session's pending records to `sink` until they are all out (`Ok(true)`) or the
/// socket would block (`Ok(false)`).
pub fn drain<W: Write>(session: &mut Session, sink: &mut W) -> io::Result<bool> {
    loop {
        let pending = session.pending_output();
        if pending.is_empty() {
            return Ok(true);
        }
        match sink.write(pending) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => session.wrote(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The socket as the send queue sees it on a TLS connection: plaintext frames in, records
/// out. A write is accepted once its plaintext is encrypted; records the socket does not take
/// wait in the session, and the next write waits for them first.
pub struct Writer<'a, W> {
    pub session: &'a mut Session,
    pub sink: &'a mut W,
}

impl<W: Write> Write for Writer<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        if !drain(self.session, self.sink)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut taken = 0;
        for buf in bufs {
            if taken >= PLAINTEXT_PER_WRITE {
                break;
            }
            self.session.encrypt(buf).map_err(|e| io::Error::other(e.0))?;
            taken += buf.len();
        }
        drain(self.session, self.sink)?;
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A self-signed certificate for `localhost` in temporary PEM files.
    pub(crate) struct TestCert {
        pub dir: PathBuf,
        pub cert_pem: String,
    }

    impl TestCert {
        pub(crate) fn new(tag: &str) -> TestCert {
            let dir = std::env::temp_dir().join(format!("herald-tls-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
            let cert_pem = generated.cert.pem();
            std::fs::write(dir.join("cert.pem"), &cert_pem).unwrap();
            std::fs::write(dir.join("key.pem"), generated.key_pair.serialize_pem()).unwrap();
            TestCert { dir, cert_pem }
        }

        fn acceptor(&self) -> Acceptor {
            Acceptor::load(&self.dir.join("cert.pem"), &self.dir.join("key.pem")).unwrap()
        }

        fn client(&self) -> rustls::ClientConnection {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap()).unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap()
        }
    }

    impl Drop for TestCert {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Moves bytes both ways until neither side has anything to say; returns the server's
    /// plaintext and the client's. `chunk` splits what the client sends into reads of that size.
    fn pump(client: &mut rustls::ClientConnection, server: &mut Session, chunk: usize) -> (Vec<u8>, Vec<u8>) {
        let (mut plain, mut client_plain) = (Vec::new(), Vec::new());
        for _ in 0..50 {
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            for piece in wire.chunks_mut(chunk.max(1)) {
                server.receive(piece, &mut plain).unwrap();
            }
            let out = server.pending_output().to_vec();
            server.wrote(out.len());
            if wire.is_empty() && out.is_empty() {
                break;
            }
            let mut reader = &out[..];
            while !reader.is_empty() {
                client.read_tls(&mut reader).unwrap();
                client.process_new_packets().unwrap();
                let mut buf = [0u8; 4096];
                while let Ok(n) = client.reader().read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    client_plain.extend_from_slice(&buf[..n]);
                }
            }
        }
        (plain, client_plain)
    }

    #[test]
    fn a_handshake_then_data_both_ways_in_any_read_sizes() {
        let cert = TestCert::new("roundtrip");
        let acceptor = cert.acceptor();
        for chunk in [1, 7, 300, 1 << 20] {
            let mut client = cert.client();
            let mut server = acceptor.session().unwrap();
            client.writer().write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            let (plain, _) = pump(&mut client, &mut server, chunk);
            assert!(server.established());
            assert_eq!(plain, b"GET / HTTP/1.1\r\n\r\n", "read size {chunk}");
            assert!(server.carry.capacity() == 0 && server.pending.capacity() == 0, "idle holds no buffer");
            server.encrypt(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
            server.encrypt(&[b'x'; 40_000]).unwrap();
            let (_, got) = pump(&mut client, &mut server, chunk);
            assert_eq!(got.len(), 19 + 40_000);
            assert!(got.starts_with(b"HTTP/1.1 200 OK"));
        }
    }

    #[test]
    fn plain_http_and_garbage_are_refused() {
        let cert = TestCert::new("garbage");
        let acceptor = cert.acceptor();
        let mut plain = Vec::new();
        let mut http = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert!(acceptor.session().unwrap().receive(&mut http, &mut plain).is_err());
        let mut garbage = vec![0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0];
        assert!(acceptor.session().unwrap().receive(&mut garbage, &mut plain).is_err());
        assert!(plain.is_empty());
    }

    #[test]
    fn close_notify_reaches_the_client() {
        let cert = TestCert::new("close");
        let acceptor = cert.acceptor();
        let mut client = cert.client();
        let mut server = acceptor.session().unwrap();
        pump(&mut client, &mut server, 1 << 20);
        server.close_notify();
        pump(&mut client, &mut server, 1 << 20);
        let mut got = Vec::new();
        assert_eq!(client.reader().read_to_end(&mut got).unwrap(), 0, "a clean EOF");
        assert!(got.is_empty());
    }

    #[test]
    fn a_mismatched_pair_or_missing_file_is_a_clear_error() {
        let (a, b) = (TestCert::new("pair-a"), TestCert::new("pair-b"));
        let err = Acceptor::load(&a.dir.join("cert.pem"), &b.dir.join("key.pem")).err().unwrap();
        assert!(err.contains("usable pair"), "{err}");
        let err = Acceptor::load(&a.dir.join("nope.pem"), &a.dir.join("key.pem")).err().unwrap();
        assert!(err.contains("HERALD_TLS_CERT"), "{err}");
        let acceptor = a.acceptor();
        std::fs::write(a.dir.join("cert.pem"), "not pem").unwrap();
        assert!(acceptor.reload().is_err(), "a broken reload keeps the old pair");
        assert!(acceptor.session().is_ok());
    }
}
