//! The client side of RFC 6455, as much as a load generator needs: the upgrade request and
//! its answer, which server frames it accepts (framing itself is the shared `wsframe`
//! crate), and a scanner for the `"seq"` and `"t"` fields of the load messages.

/// A small, fast PRNG (xorshift64*) for WebSocket keys and masks; not for secrets.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from the kernel, or from the clock if /dev/urandom cannot be read.
    pub fn from_entropy() -> Rng {
        use std::io::Read;
        let mut raw = [0u8; 8];
        let seed = match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut raw)) {
            Ok(()) => u64::from_le_bytes(raw),
            Err(_) => crate::sys::clock::realtime_ns() ^ u64::from(std::process::id()),
        };
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A fresh masking key for one client frame.
    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_be_bytes()
    }
}

/// splitmix64: derives independent values from (seed, index) without storing them.
pub fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64(input: &[u8]) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(B64[(n >> 18) as usize & 63] as char);
        out.push(B64[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 { B64[(n >> 6) as usize & 63] as char } else { '=' });
        out.push(if chunk.len() > 2 { B64[n as usize & 63] as char } else { '=' });
    }
    out
}

/// The Sec-WebSocket-Key of connection `index`: 16 bytes derived from `seed`, so the key
/// need not be stored to check the server's accept value later.
pub fn ws_key(seed: u64, index: u64) -> String {
    let a = mix(seed, index * 2);
    let b = mix(seed, index * 2 + 1);
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&a.to_le_bytes());
    raw[8..].copy_from_slice(&b.to_le_bytes());
    base64(&raw)
}

/// Appends the upgrade request for `path` (already substituted) to `out`.
pub fn upgrade_request(out: &mut Vec<u8>, path: &str, host: &str, key: &str) {
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\r\nSec-WebSocket-Version: 13\r\nUser-Agent: herald-load\r\n\r\n");
}

/// The server's answer to an upgrade request.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// More bytes are needed.
    Partial,
    /// 101 with the right accept value; the response took this many bytes.
    Upgraded(usize),
    /// Any other status (or 101 with a wrong accept value: status 0).
    Refused(u16),
    /// Not HTTP.
    Malformed,
}

/// Parses the response head in `buf`, checking `Sec-WebSocket-Accept` against `key`.
pub fn parse_handshake(buf: &[u8], key: &str) -> Handshake {
    let mut headers = [httparse::EMPTY_HEADER; 24];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Partial) => Handshake::Partial,
        Err(_) => Handshake::Malformed,
        Ok(httparse::Status::Complete(len)) => {
            let code = response.code.unwrap_or(0);
            if code != 101 {
                return Handshake::Refused(code);
            }
            let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
            let accepted = response
                .headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept") && h.value == expected.as_bytes());
            if accepted { Handshake::Upgraded(len) } else { Handshake::Refused(0) }
        }
    }
}

pub use wsframe::{OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT};

/// Largest server frame accepted; anything bigger is a protocol error for this client.
pub const MAX_FRAME: u64 = 1 << 20;

/// One complete server frame at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub fin: bool,
    pub opcode: u8,
    pub payload: &'a [u8],
    /// Bytes the whole frame took.
    pub len: usize,
}

/// Parses the frame at the start of `buf`: `Ok(None)` when it is not complete yet; `Err`
/// for what no server may send this client (a mask, RSV bits with no extension negotiated)
/// or a frame over [`MAX_FRAME`], refused from its header alone.
pub fn parse_frame(buf: &[u8]) -> Result<Option<Frame<'_>>, &'static str> {
    let Some(header) = wsframe::parse_header(buf) else { return Ok(None) };
    if header.mask.is_some() {
        return Err("masked frame from server");
    }
    if header.rsv != 0 {
        return Err("reserved bits set");
    }
    if header.payload_len > MAX_FRAME {
        return Err("frame too large");
    }
    match wsframe::decode(buf) {
        Some(f) => Ok(Some(Frame { fin: f.header.fin, opcode: f.header.opcode, payload: f.payload, len: f.len })),
        None => Ok(None),
    }
}

/// Finds `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let last = hay.len() - needle.len();
    let mut i = 0;
    while i <= last {
        match hay[i..=last].iter().position(|&b| b == first) {
            None => return None,
            Some(p) => {
                i += p;
                if &hay[i..i + needle.len()] == needle {
                    return Some(i);
                }
                i += 1;
            }
        }
    }
    None
}

/// The unsigned integer right after `key` (e.g. `"seq":`), spaces allowed before it.
pub fn number_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let start = find(hay, key)? + key.len();
    let rest = &hay[start..];
    let rest = &rest[rest.iter().position(|b| *b != b' ')?..];
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for d in &rest[..digits] {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(n)
}

/// `(seq, t)` of a load message, `None` for anything else.
pub fn load_fields(payload: &[u8]) -> Option<(u64, u64)> {
    find(payload, b"\"load\"")?;
    Some((number_after(payload, b"\"seq\":")?, number_after(payload, b"\"t\":")?))
}

/// Which sequence numbers a connection has seen: the highest, and a 64-wide window below it.
#[derive(Debug, Default, Clone, Copy)]
pub struct SeqWindow {
    /// One past the highest seq seen.
    next: u32,
    /// Bit i: seq `next - 1 - i` was seen.
    seen: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    New,
    Duplicate,
    /// More than 64 behind the highest: cannot tell, counted as new.
    TooOld,
}

impl SeqWindow {
    pub fn observe(&mut self, seq: u32) -> Seen {
        if seq >= self.next {
            let shift = u64::from(seq - self.next) + 1;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.next = seq.wrapping_add(1).max(seq);
            Seen::New
        } else {
            let back = self.next - 1 - seq;
            if back >= 64 {
                Seen::TooOld
            } else if self.seen & (1 << back) != 0 {
                Seen::Duplicate
            } else {
                self.seen |= 1 << back;
                Seen::New
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(ws_key(7, 3).len(), 24);
        assert!(ws_key(7, 3).ends_with("=="));
    }

    #[test]
    fn handshake_checks_status_and_accept() {
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi";
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        assert_eq!(parse_handshake(ok, key), Handshake::Upgraded(ok.len() - 4));
        assert_eq!(parse_handshake(&ok[..40], key), Handshake::Partial);
        assert_eq!(parse_handshake(ok, "AAAAAAAAAAAAAAAAAAAAAA=="), Handshake::Refused(0));
        assert_eq!(parse_handshake(b"HTTP/1.1 503 Unavailable\r\n\r\n", key), Handshake::Refused(503));
        assert_eq!(parse_handshake(b"\x00\x01garbage\r\n\r\n", key), Handshake::Malformed);
    }

    #[test]
    fn frames_parse_incrementally() {
        let mut buf = vec![0x81, 5];
        buf.extend_from_slice(b"hello");
        buf.extend_from_slice(&[0x89, 126, 0, 130]);
        buf.extend_from_slice(&[b'p'; 130]);
        let f = parse_frame(&buf).unwrap().unwrap();
        assert_eq!((f.fin, f.opcode, f.payload, f.len), (true, OP_TEXT, &b"hello"[..], 7));
        let g = parse_frame(&buf[7..]).unwrap().unwrap();
        assert_eq!((g.opcode, g.payload.len(), g.len), (OP_PING, 130, 134));
        for cut in 0..7 {
            assert_eq!(parse_frame(&buf[..cut]).unwrap(), None);
        }
        assert!(parse_frame(&[0x81, 0x85, 1, 2, 3, 4, 0]).is_err());
        assert!(parse_frame(&[0x82, 127, 0xFF, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn load_fields_are_found() {
        let msg =
            br#"{"type":"load","seq":42,"t":1700000000123456789,"pad":"xx","timestamp":"2026-01-01T00:00:00.000Z"}"#;
        assert_eq!(load_fields(msg), Some((42, 1_700_000_000_123_456_789)));
        assert_eq!(load_fields(br#"{"type":"subscribed","topic":"t"}"#), None);
        assert_eq!(load_fields(br#"{"type":"load","seq":x}"#), None);
        assert_eq!(number_after(br#"{"seq": 7}"#, b"\"seq\":"), Some(7));
    }

    #[test]
    fn seq_window_finds_duplicates_and_gaps() {
        let mut w = SeqWindow::default();
        assert_eq!(w.observe(0), Seen::New);
        assert_eq!(w.observe(0), Seen::Duplicate);
        assert_eq!(w.observe(2), Seen::New);
        assert_eq!(w.observe(1), Seen::New);
        assert_eq!(w.observe(1), Seen::Duplicate);
        assert_eq!(w.observe(100), Seen::New);
        assert_eq!(w.observe(2), Seen::TooOld);
        assert_eq!(w.observe(99), Seen::New);
        assert_eq!(w.observe(100), Seen::Duplicate);
    }
}
