//! wss:// and https:// for the generator: rustls's buffered client connection, driven by the
//! caller's non-blocking sockets. Ciphertext is read from the socket by the caller (into its
//! one shared buffer, as for plaintext) and handed over; the records rustls wants to send are
//! written straight to the socket and stay in the connection while it would block.
//!
//! Every connection does a full handshake (no resumption): what a storm of new clients
//! costs a server, and the same for each of N connections however large N is.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

/// Where trusted roots come from when `--ca` is not given: the system bundle.
const SYSTEM_BUNDLES: [&str; 3] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

/// What every TLS connection of one run shares.
#[derive(Debug, Clone)]
pub struct Client {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl Client {
    /// Trusts the PEM certificates in `ca` (or, without it, `SSL_CERT_FILE` or the system
    /// bundle) and checks the server's certificate against `server_name`.
    pub fn new(ca: Option<&Path>, server_name: &str) -> Result<Client, String> {
        let bundle = match ca {
            Some(path) => path.to_path_buf(),
            None => std::env::var_os("SSL_CERT_FILE")
                .map(std::path::PathBuf::from)
                .or_else(|| SYSTEM_BUNDLES.iter().map(Path::new).find(|p| p.is_file()).map(Path::to_path_buf))
                .ok_or("TLS: no system certificate bundle found; give --ca FILE")?,
        };
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(&bundle)
            .map_err(|e| format!("TLS: cannot read {}: {e}", bundle.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("TLS: {} is not PEM certificates: {e}", bundle.display()))?;
            // A system bundle may hold a certificate webpki cannot parse; --ca may not.
            match roots.add(cert) {
                Err(e) if ca.is_some() => {
                    return Err(format!("TLS: a certificate in {} is not usable: {e}", bundle.display()));
                }
                _ => {}
            }
        }
        if roots.is_empty() {
            return Err(format!("TLS: no certificate in {}", bundle.display()));
        }
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|_| format!("TLS: not a valid server name: {server_name}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.resumption = Resumption::disabled();
        Ok(Client { config: Arc::new(config), name })
    }

    /// A new client session; its ClientHello is queued at once.
    pub fn connect(&self) -> Result<ClientConnection, String> {
        ClientConnection::new(self.config.clone(), self.name.clone()).map_err(|e| format!("tls: {e}"))
    }
}

/// Feeds `ciphertext` (bytes read from the socket) to the session and appends the plaintext
/// it carries to `plain`. `Ok(true)`: the peer sent close_notify.
pub fn receive(conn: &mut ClientConnection, mut ciphertext: &[u8], plain: &mut Vec<u8>) -> Result<bool, String> {
    let mut peer_closed = false;
    loop {
        // rustls takes at most one buffer's worth per call: alternate until all is in.
        if !ciphertext.is_empty() {
            match conn.read_tls(&mut ciphertext) {
                Ok(0) => peer_closed = true,
                Ok(_) => {}
                Err(e) => return Err(format!("tls: {e}")),
            }
        }
        let state = conn.process_new_packets().map_err(|e| format!("tls: {e}"))?;
        peer_closed |= state.peer_has_closed();
        let mut want = state.plaintext_bytes_to_read();
        while want > 0 {
            let start = plain.len();
            plain.resize(start + want, 0);
            match conn.reader().read(&mut plain[start..]) {
                Ok(n) => {
                    plain.truncate(start + n);
                    want -= n.min(want);
                    if n == 0 {
                        break;
                    }
                }
                Err(e) => {
                    plain.truncate(start);
                    if e.kind() != io::ErrorKind::WouldBlock {
                        return Err(format!("tls: {e}"));
                    }
                    break;
                }
            }
        }
        if ciphertext.is_empty() || peer_closed {
            return Ok(peer_closed);
        }
    }
}

/// Writes the records the session has queued to `sink`: `Ok(true)` when all are out,
/// `Ok(false)` when the socket would block (the rest waits in the session).
pub fn flush<W: Write>(conn: &mut ClientConnection, sink: &mut W) -> io::Result<bool> {
    while conn.wants_write() {
        match conn.write_tls(sink) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Queues `plaintext` for the peer (held back until the handshake completes) and writes
/// what the socket takes.
pub fn send<W: Write>(conn: &mut ClientConnection, sink: &mut W, plaintext: &[u8]) -> io::Result<bool> {
    conn.writer().write_all(plaintext)?;
    flush(conn, sink)
}

/// "TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519" once the handshake is done.
pub fn describe(conn: &ClientConnection) -> Option<String> {
    let version = conn.protocol_version()?;
    let suite = conn.negotiated_cipher_suite()?;
    let group = conn.negotiated_key_exchange_group().map_or_else(String::new, |g| format!(" {:?}", g.name()));
    Some(format!("{version:?} {:?}{group}", suite.suite()))
}

/// A self-signed certificate for `localhost` in a temporary directory, for the tests here
/// and in the worker.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;

    pub(crate) struct SelfSigned {
        pub dir: PathBuf,
        generated: rcgen::CertifiedKey,
    }

    impl SelfSigned {
        pub(crate) fn new() -> SelfSigned {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Relaxed);
            let dir = std::env::temp_dir().join(format!("herald-load-tls-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
            std::fs::write(dir.join("ca.pem"), generated.cert.pem()).unwrap();
            SelfSigned { dir, generated }
        }

        /// The PEM file a client trusts (`--ca`).
        pub(crate) fn ca_path(&self) -> PathBuf {
            self.dir.join("ca.pem")
        }

        pub(crate) fn server_config(&self) -> Arc<rustls::ServerConfig> {
            let key = PrivateKeyDer::from_pem_slice(self.generated.key_pair.serialize_pem().as_bytes()).unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![self.generated.cert.der().clone()], key)
                .unwrap();
            Arc::new(config)
        }
    }

    impl Drop for SelfSigned {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::testing::SelfSigned;

    /// A client trusting a fresh certificate, a server session for it, and their files.
    fn pair() -> (Client, rustls::ServerConnection, SelfSigned) {
        let cert = SelfSigned::new();
        let client = Client::new(Some(&cert.ca_path()), "localhost").unwrap();
        (client, rustls::ServerConnection::new(cert.server_config()).unwrap(), cert)
    }

    /// Moves the server's records to the client in reads of `chunk` bytes.
    fn to_client(server: &mut rustls::ServerConnection, client: &mut ClientConnection, chunk: usize) -> Vec<u8> {
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        let mut plain = Vec::new();
        for piece in wire.chunks(chunk) {
            receive(client, piece, &mut plain).unwrap();
        }
        plain
    }

    fn to_server(client: &mut ClientConnection, server: &mut rustls::ServerConnection) -> Vec<u8> {
        let mut wire = Vec::new();
        assert!(flush(client, &mut wire).unwrap());
        let mut reader = &wire[..];
        let mut plain = Vec::new();
        while !reader.is_empty() {
            server.read_tls(&mut reader).unwrap();
            server.process_new_packets().unwrap();
            let _ = server.reader().read_to_end(&mut plain);
        }
        plain
    }

    #[test]
    fn early_plaintext_waits_for_the_handshake_and_records_split_anywhere() {
        for chunk in [1, 5, 100, 1 << 20] {
            let (client, mut server, _dir) = pair();
            let mut conn = client.connect().unwrap();
            let mut wire = Vec::new();
            assert!(send(&mut conn, &mut wire, b"GET / HTTP/1.1\r\n\r\n").unwrap());
            assert!(!wire.windows(3).any(|w| w == b"GET"), "nothing in clear");
            let mut reader = &wire[..];
            while !reader.is_empty() {
                server.read_tls(&mut reader).unwrap();
            }
            server.process_new_packets().unwrap();
            assert!(to_client(&mut server, &mut conn, chunk).is_empty());
            assert_eq!(to_server(&mut conn, &mut server), b"GET / HTTP/1.1\r\n\r\n");
            assert!(describe(&conn).unwrap().starts_with("TLSv1_3"));
            server.writer().write_all(&[b'x'; 40_000]).unwrap();
            server.send_close_notify();
            let mut plain = Vec::new();
            let mut wire = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut wire).unwrap();
            }
            let mut closed = false;
            for piece in wire.chunks(chunk) {
                closed |= receive(&mut conn, piece, &mut plain).unwrap();
            }
            assert_eq!(plain.len(), 40_000, "read size {chunk}");
            assert!(closed, "close_notify seen");
        }
    }

    #[test]
    fn a_certificate_not_trusted_or_for_another_name_fails() {
        let (_, mut server, dir) = pair();
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(dir.dir.join("other.pem"), other.cert.pem()).unwrap();
        let untrusting = Client::new(Some(&dir.dir.join("other.pem")), "localhost").unwrap();
        let mut conn = untrusting.connect().unwrap();
        to_server(&mut conn, &mut server);
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        let err = receive(&mut conn, &wire, &mut Vec::new()).unwrap_err();
        assert!(err.contains("certificate"), "{err}");

        std::fs::write(dir.dir.join("bad.pem"), "not a certificate").unwrap();
        assert!(Client::new(Some(&dir.dir.join("bad.pem")), "localhost").is_err());
        assert!(Client::new(Some(&dir.dir.join("missing.pem")), "localhost").is_err());
        assert!(Client::new(Some(&dir.dir.join("other.pem")), "not a name!").is_err());

        let (client, mut server, _dir) = pair();
        let mut wrong_name = Client { name: ServerName::try_from("example.com").unwrap(), ..client }.connect().unwrap();
        to_server(&mut wrong_name, &mut server);
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        assert!(receive(&mut wrong_name, &wire, &mut Vec::new()).is_err());
    }
}
