//! Helpers shared by the fuzz targets: a deterministic byte-driven RNG, a real `Shared`
//! built the way `server::start` builds one, token minting, and checks of herald's frames
//! (the framing itself is the shared `wsframe` crate).
//!
//! Strict mode (`HERALD_FUZZ_STRICT=1`) turns the known, already-reported deviations listed in
//! fuzz/README.md back into assertion failures, to reproduce them from fuzz/regressions/.

use std::sync::OnceLock;

pub mod routing;
pub mod tls;

use base64::Engine as _;
use herald::auth::Verifier;
use herald::config::{Cli, Config, JwtKey};
use herald::shared::Shared;

/// HS256 secret of every fuzz `Shared` and of the checked-in seed tokens.
pub const SECRET: &str = "herald-fuzz-secret";
/// Origins the upgrade target's config allows (anything else must get 403).
pub const ALLOWED_ORIGINS: &[&str] = &["https://app.example", "http://localhost:3000"];
/// ES256 key pair used only by the fuzz targets (generated for them; never deployed).
pub const ES256_PUBLIC_PEM: &[u8] = include_bytes!("../keys/es256-public.pem");
pub const ES256_PRIVATE_PKCS8_PEM: &[u8] = include_bytes!("../keys/es256-private-pkcs8.pem");

/// Whether known deviations should fail (see the module docs).
pub fn strict() -> bool {
    static STRICT: OnceLock<bool> = OnceLock::new();
    *STRICT.get_or_init(|| std::env::var_os("HERALD_FUZZ_STRICT").is_some_and(|v| v != "0"))
}

/// A config parsed from a command line, exactly as herald parses its own.
pub fn config(args: &[&str]) -> Config {
    use clap::Parser as _;
    let mut full = vec!["herald"];
    full.extend_from_slice(args);
    Cli::try_parse_from(full).expect("fuzz config arguments parse").server.into_config().expect("fuzz config is valid")
}

/// A `Shared` as `server::start` builds it (embedded broker), minus threads and sockets: no
/// loops are attached, so nothing `routes::handle` does can reach a connection.
pub fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let origins = ALLOWED_ORIGINS.join(",");
        let config = config(&[
            "--jwt-secret",
            SECRET,
            "--threads",
            "1",
            "--allowed-origins",
            &origins,
            "--max-connections",
            "4",
            "--max-connections-per-user",
            "2",
            "--api-key",
            "fuzz-api-key",
        ]);
        build_shared(config)
    })
}

pub fn build_shared(config: Config) -> Shared {
    let verifier = Verifier::new(&config.jwt_key).expect("fuzz key is valid");
    let metrics = std::sync::Arc::new(herald::metrics::Metrics::new(config.threads, false));
    let routing = std::sync::Arc::new(herald::broker::Routing::default());
    // Instance 0: `/health` names it, and runs stay comparable.
    Shared::new(config, verifier, metrics, routing, herald::broker::Broker::Embedded { webhook: None, history: None }, 0)
}

/// An HS256 verifier with [`SECRET`] (what `shared().verifier` is, standalone).
pub fn hs256_verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| Verifier::new(&JwtKey::Secret(SECRET.as_bytes().to_vec())).unwrap())
}

/// An ES256 verifier with the fuzz public key.
pub fn es256_verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| Verifier::new(&JwtKey::PublicKeyPem(ES256_PUBLIC_PEM.to_vec())).unwrap())
}

pub fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn b64url_decode(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).ok()
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    herald::auth::unix_now()
}

/// Small deterministic generator fed from fuzz bytes: `byte()` consumes input, then falls
/// back to a xorshift stream so short inputs still drive every knob.
pub struct Bytes<'a> {
    data: &'a [u8],
    state: u64,
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Bytes { data, state: 0x9E37_79B9_7F4A_7C15 }
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn rest(&self) -> &'a [u8] {
        self.data
    }
    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                self.state ^= *b as u64;
                *b
            }
            None => {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                self.state as u8
            }
        }
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { self.u16() as usize % n }
    }
    pub fn bool(&mut self) -> bool {
        self.byte() & 1 == 1
    }
    /// Up to `max` bytes of input (length-prefixed by one byte).
    pub fn slice(&mut self, max: usize) -> &'a [u8] {
        let n = (self.byte() as usize).min(max).min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
    pub fn string(&mut self, max: usize) -> String {
        String::from_utf8_lossy(self.slice(max)).into_owned()
    }
}

/// A masked client frame (what a browser sends).
/// `first_byte` goes out as given, RSV bits included.
pub fn client_frame(first_byte: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::new();
    wsframe::encode_into(&mut out, first_byte, payload, Some(mask));
    out
}

/// One server frame decoded from herald's output stream.
#[derive(Debug)]
pub struct ServerFrame<'a> {
    pub first_byte: u8,
    pub payload: &'a [u8],
}

/// Splits herald's output into frames, checking that every one is a well-formed server frame
/// (FIN set, no RSV bits, known opcode, unmasked, shortest length encoding). Returns the
/// frames and how many trailing bytes belong to an incomplete frame.
pub fn decode_server_frames(mut bytes: &[u8]) -> (Vec<ServerFrame<'_>>, usize) {
    let mut frames = Vec::new();
    loop {
        if bytes.len() < 2 {
            return (frames, bytes.len());
        }
        let (b0, b1) = (bytes[0], bytes[1]);
        assert_eq!(b0 & 0xF0, 0x80, "server frame must be FIN with no RSV bits: {b0:#x}");
        assert!(matches!(b0 & 0x0F, 0x1 | 0x8 | 0x9 | 0xA), "unexpected server opcode {b0:#x}");
        assert_eq!(b1 & 0x80, 0, "server frames are never masked");
        let Some(header) = wsframe::parse_header(bytes) else { return (frames, bytes.len()) };
        let len = header.payload_len;
        match header.header_len {
            4 => assert!(len >= 126, "non-minimal 16-bit length {len}"),
            10 => assert!(len > 0xFFFF, "non-minimal 64-bit length {len}"),
            _ => {}
        }
        if b0 & 0x08 != 0 {
            assert!(len <= 125, "control frame of {len} bytes");
        }
        let Some(frame) = wsframe::decode(bytes) else { return (frames, bytes.len()) };
        frames.push(ServerFrame { first_byte: b0, payload: frame.payload });
        bytes = &bytes[frame.len..];
    }
}

/// What serde_json (the reference parser) makes of a text.
#[derive(Debug)]
pub enum Json {
    Invalid,
    NotAnObject,
    /// Every member in order, duplicates included, so callers can tell first-wins from
    /// last-wins semantics.
    Object(Vec<(String, serde_json::Value)>),
}

pub fn reference_json(text: &[u8]) -> Json {
    use serde::de::{Deserializer as _, MapAccess, Visitor};
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<Vec<(String, serde_json::Value)>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                out.push((k, v));
            }
            Ok(Some(out))
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(text);
    let Ok(value) = de.deserialize_any(V) else { return Json::Invalid };
    if de.end().is_err() {
        return Json::Invalid;
    }
    match value {
        Some(members) => Json::Object(members),
        None => Json::NotAnObject,
    }
}

impl Json {
    /// The first member called `name` (simd-json's tape lookup is first-wins).
    pub fn first(&self, name: &str) -> Option<&serde_json::Value> {
        match self {
            Json::Object(m) => m.iter().find(|(k, _)| k == name).map(|(_, v)| v),
            _ => None,
        }
    }
    pub fn has_duplicate_keys(&self) -> bool {
        match self {
            Json::Object(m) => {
                let mut keys: Vec<&str> = m.iter().map(|(k, _)| k.as_str()).collect();
                keys.sort_unstable();
                keys.windows(2).any(|w| w[0] == w[1])
            }
            _ => false,
        }
    }
}

/// Whether `text` is JSON according to serde_json.
pub fn is_json(text: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(text).is_ok()
}

/// Whether `text` holds an integer literal outside i64/u64 (what serde_json reads as an f64).
/// simd-json, as herald builds it (no `big-int-as-float`), refuses the whole document for
/// such a number: a known deviation, tolerated unless strict (see fuzz/README.md).
pub fn has_big_integer(text: &[u8]) -> bool {
    let mut i = 0;
    while i < text.len() {
        if !text[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < text.len() && text[i].is_ascii_digit() {
            i += 1;
        }
        let before = start.checked_sub(1).map(|j| text[j]);
        if matches!(before, Some(b'.' | b'e' | b'E' | b'+')) {
            continue;
        }
        let digits = std::str::from_utf8(&text[start..i]).unwrap_or("0").trim_start_matches('0');
        let negative = before == Some(b'-');
        let too_big = match digits.parse::<u128>() {
            Ok(n) => n > if negative { 1u128 << 63 } else { u64::MAX as u128 },
            Err(_) => true,
        };
        if too_big {
            return true;
        }
    }
    false
}
