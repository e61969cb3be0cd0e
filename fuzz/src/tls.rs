//! TLS pieces for `tls_upgrade`: herald's `Acceptor` for a certificate generated when the
//! target starts, and rustls clients that trust it.
//!
//! The certificate comes from rcgen (herald's own dev-dependency for its TLS unit tests) once
//! per process: nothing secret is checked in, and the pair never leaves the process (the PEM
//! files `Acceptor::load` needs are deleted as soon as it has read them).

use std::sync::{Arc, OnceLock};

use herald::tls::Acceptor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

/// `MAX_CARRY` of src/tls.rs (private there): received bytes a session keeps while waiting
/// for the rest of a record, above which the peer is cut off.
pub const MAX_CARRY: usize = 80 * 1024;
/// The event loop's read size (`READ_CHUNK` in src/event_loop/mod.rs): one `receive` gets at
/// most this many bytes.
pub const READ_CHUNK: usize = 64 * 1024;
/// The largest record a rustls client sends: 16 KiB of plaintext plus TLS 1.2's explicit
/// nonce and tag and the header (TLS 1.3 adds 22 bytes).
pub const MAX_CLIENT_RECORD: usize = 16 * 1024 + 8 + 16 + 5;

struct Fixture {
    acceptor: Acceptor,
    roots: Arc<RootCertStore>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen certificate");
        let cert_pem = generated.cert.pem();
        let dir = std::env::temp_dir().join(format!("herald-fuzz-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, &cert_pem).expect("write cert.pem");
        std::fs::write(&key, generated.key_pair.serialize_pem()).expect("write key.pem");
        let acceptor = Acceptor::load(&cert, &key);
        let _ = std::fs::remove_dir_all(&dir);
        let acceptor = acceptor.expect("herald loads the generated pair");
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("PEM certificate")).expect("root");
        Fixture { acceptor, roots: Arc::new(roots) }
    })
}

/// herald's acceptor for the generated certificate.
pub fn acceptor() -> &'static Acceptor {
    &fixture().acceptor
}

/// Protocol versions a client offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Versions {
    Both,
    Tls12,
    Tls13,
}

/// A client config trusting the generated certificate, without resumption (every handshake
/// is a full one, and runs do not depend on each other), sending records of at most
/// `max_fragment` bytes (rustls's range: 32 ..= 16 KiB + 5; `None` for its default).
pub fn client_config(versions: Versions, max_fragment: Option<usize>) -> Arc<ClientConfig> {
    static BASE: OnceLock<[Arc<ClientConfig>; 3]> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let build = |versions: &[&'static rustls::SupportedProtocolVersion]| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(versions)
                .expect("ring supports TLS 1.2 and 1.3")
                .with_root_certificates(fixture().roots.clone())
                .with_no_client_auth();
            config.resumption = rustls::client::Resumption::disabled();
            Arc::new(config)
        };
        [
            build(&[&rustls::version::TLS13, &rustls::version::TLS12]),
            build(&[&rustls::version::TLS12]),
            build(&[&rustls::version::TLS13]),
        ]
    });
    let config = &base[versions as usize];
    match max_fragment {
        None => config.clone(),
        Some(size) => {
            let mut config = (**config).clone();
            config.max_fragment_size = Some(size);
            Arc::new(config)
        }
    }
}

/// A client about to say hello to `localhost`.
pub fn client(config: Arc<ClientConfig>) -> ClientConnection {
    let name = ServerName::try_from("localhost").expect("valid name");
    let mut client = ClientConnection::new(config, name).expect("client connection");
    // Everything written is encrypted at once: the test decides when the server reads it.
    client.set_buffer_limit(None);
    client
}
