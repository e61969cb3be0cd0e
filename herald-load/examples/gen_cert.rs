//! A throwaway self-signed ECDSA P-256 certificate for `localhost` and 127.0.0.1, for
//! benches/tls.sh on machines without the openssl CLI:
//!
//!     cargo run -q -p herald-load --example gen_cert -- DIR    # writes DIR/cert.pem, DIR/key.pem
//!
//! The key is written with mode 0600 and belongs to that directory only: never check one in.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

fn main() {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: gen_cert DIR");
        std::process::exit(2);
    };
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let generated = match rcgen::generate_simple_self_signed(names) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("gen_cert: {e}");
            std::process::exit(1);
        }
    };
    let write = |name: &str, mode: u32, text: &str| {
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&path);
        if let Err(e) = file.and_then(|mut f| f.write_all(text.as_bytes())) {
            eprintln!("gen_cert: cannot write {}: {e}", path.display());
            std::process::exit(1);
        }
    };
    write("key.pem", 0o600, &generated.key_pair.serialize_pem());
    write("cert.pem", 0o644, &generated.cert.pem());
}
