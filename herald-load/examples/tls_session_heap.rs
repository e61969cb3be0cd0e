//! What an idle TLS connection keeps on herald's heap: N herald TLS sessions
//! (`herald::tls::Session`, rustls's unbuffered server connection) complete a full handshake
//! with a rustls client, the clients go, and a counting allocator reports the live bytes per
//! session and the allocations they are made of (by size: match them to rustls's types).
//!
//!     cargo run --release -p herald-load --example tls_session_heap -- 2000
//!
//! Requested sizes: malloc adds its own header and rounding (about 16 B per allocation).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

use rustls::pki_types::pem::PemObject;

/// Live bytes, and live allocations by size (the last slot: this size or more).
struct Counting;
const SLOTS: usize = 1 << 16;
static LIVE: AtomicIsize = AtomicIsize::new(0);
static BY_SIZE: [AtomicIsize; SLOTS] = [const { AtomicIsize::new(0) }; SLOTS];

fn count(size: usize, n: isize) {
    LIVE.fetch_add(n * size as isize, Relaxed);
    BY_SIZE[size.min(SLOTS - 1)].fetch_add(n, Relaxed);
}

// SAFETY: every call is passed to the system allocator unchanged; the counters only add.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), 1);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(layout.size(), -1);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(layout.size(), -1);
        count(new_size, 1);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Moves records both ways until the handshake is done and nothing is left to say.
fn handshake(client: &mut rustls::ClientConnection, server: &mut herald::tls::Session) -> Result<(), String> {
    let mut plain = Vec::new();
    for _ in 0..20 {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).map_err(|e| e.to_string())?;
        }
        if !wire.is_empty() {
            server.receive(&mut wire, &mut plain).map_err(|e| e.0)?;
        }
        let out = server.pending_output().to_vec();
        server.wrote(out.len());
        if wire.is_empty() && out.is_empty() {
            break;
        }
        let mut records = &out[..];
        while !records.is_empty() {
            client.read_tls(&mut records).map_err(|e| e.to_string())?;
            client.process_new_packets().map_err(|e| e.to_string())?;
        }
        let mut sink = [0u8; 4096];
        while let Ok(n) = client.reader().read(&mut sink) {
            if n == 0 {
                break;
            }
        }
    }
    if server.established() { Ok(()) } else { Err("the handshake did not complete".into()) }
}

fn main() -> Result<(), String> {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000).max(1);
    let dir = std::env::temp_dir().join(format!("herald-tls-heap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    // The certificate benches/tls.sh uses: ECDSA P-256, self-signed for localhost.
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).map_err(|e| e.to_string())?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, generated.cert.pem()).map_err(|e| e.to_string())?;
    std::fs::write(&key, generated.key_pair.serialize_pem()).map_err(|e| e.to_string())?;
    let acceptor = herald::tls::Acceptor::load(&cert, &key);
    let _ = std::fs::remove_dir_all(&dir);
    let acceptor = acceptor?;

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            rustls::pki_types::CertificateDer::from_pem_slice(generated.cert.pem().as_bytes())
                .map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    let config = Arc::new(config);
    let open = || -> Result<Box<herald::tls::Session>, String> {
        let name = "localhost".try_into().map_err(|_| "server name")?;
        let mut client = rustls::ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
        let mut server = Box::new(acceptor.session()?);
        handshake(&mut client, &mut server)?;
        Ok(server)
    };

    // First what all sessions share: lazily built tables, and the server's session cache
    // (256 entries by default), full before counting starts.
    drop((0..300).map(|_| open()).collect::<Result<Vec<_>, _>>()?);
    let mut held = Vec::with_capacity(n);
    let before: Vec<isize> = BY_SIZE.iter().map(|c| c.load(Relaxed)).collect();
    let live_before = LIVE.load(Relaxed);
    for _ in 0..n {
        held.push(open()?);
    }
    let per_session = (LIVE.load(Relaxed) - live_before) as f64 / n as f64;

    println!("{n} idle TLS sessions after a full handshake each");
    println!("live heap per session: {per_session:.0} B (requested sizes)");
    println!("size_of herald::tls::Session: {} B", std::mem::size_of::<herald::tls::Session>());
    println!(
        "size_of rustls::server::UnbufferedServerConnection: {} B",
        std::mem::size_of::<rustls::server::UnbufferedServerConnection>()
    );
    println!("live allocations per session, by size:");
    let mut rows: Vec<(usize, f64)> = BY_SIZE
        .iter()
        .enumerate()
        .map(|(size, c)| (size, (c.load(Relaxed) - before[size]) as f64 / n as f64))
        .filter(|(_, per)| per.abs() >= 0.5)
        .collect();
    rows.sort_by(|a, b| (b.0 as f64 * b.1).total_cmp(&(a.0 as f64 * a.1)));
    for (size, per) in rows {
        println!("  {size:6} B x {per:.2} = {:7.0} B", size as f64 * per);
    }
    drop(held);
    Ok(())
}
