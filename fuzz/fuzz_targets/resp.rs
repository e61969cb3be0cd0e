//! Bytes from a Redis server → `broker::redis::resp::Decoder`, as the reader and publisher drive it:
//! decode, drop what was consumed, and after `Incomplete { needed }` wait for that many bytes.
//!
//! Layout: 5 config bytes (max bulk, max elements, max depth, max line, mode), then either the
//! server's byte stream (raw mode) or bytes that drive a generator of valid values, written by
//! an encoder independent of herald's (generated mode: lengths with leading zeros, signed
//! integers, attributes before values, every type).
//!
//! Invariants: no panics; `consumed` ≥ 1 and ≤ the input; `needed` > the bytes given and, for
//! a prefix of a value, ≤ that value's length; the same stream fed in input-chosen chunks
//! gives the same values and the same end (error or incomplete) as in one piece; every value
//! is within the limits and borrows from the buffer; re-encoding a value with `encode_value`
//! and decoding it gives the same value; in generated mode the decoded value is the generated
//! one, or a limit error when the generator overstepped a limit; `encode_command` output
//! decodes to its arguments; the classifiers never panic and borrow from the buffer.
#![no_main]

use herald::broker::redis::resp::{
    self, Decoded, Decoder, HARD_MAX_BULK, HARD_MAX_DEPTH, Limits, ProtocolError, Value, classify_error, classify_push,
};
use herald_fuzz::Bytes;
use libfuzzer_sys::fuzz_target;

/// A decoded value, owned, for comparing across buffers. Doubles by bit pattern, NaNs as one.
#[derive(Clone, Debug, PartialEq)]
enum Owned {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Integer(i64),
    Bulk(Vec<u8>),
    Null,
    Boolean(bool),
    Double(u64),
    BigNumber(Vec<u8>),
    BulkError(Vec<u8>),
    Verbatim(Vec<u8>, Vec<u8>),
    Array(Vec<Owned>),
    Set(Vec<Owned>),
    Map(Vec<Owned>),
    Push(Vec<Owned>),
}

fn double_bits(d: f64) -> u64 {
    if d.is_nan() { f64::NAN.to_bits() } else { d.to_bits() }
}

fn own(v: &Value<'_>) -> Owned {
    let list = |items: resp::Items<'_>| items.iter().map(|v| own(&v)).collect::<Vec<_>>();
    match *v {
        Value::Simple(s) => Owned::Simple(s.to_vec()),
        Value::Error(s) => Owned::Error(s.to_vec()),
        Value::Integer(n) => Owned::Integer(n),
        Value::Bulk(s) => Owned::Bulk(s.to_vec()),
        Value::Null => Owned::Null,
        Value::Boolean(b) => Owned::Boolean(b),
        Value::Double(d) => Owned::Double(double_bits(d)),
        Value::BigNumber(s) => Owned::BigNumber(s.to_vec()),
        Value::BulkError(s) => Owned::BulkError(s.to_vec()),
        Value::Verbatim { format, text } => Owned::Verbatim(format.to_vec(), text.to_vec()),
        Value::Array(i) => Owned::Array(list(i)),
        Value::Set(i) => Owned::Set(list(i)),
        Value::Map(i) => Owned::Map(list(i)),
        Value::Push(i) => Owned::Push(list(i)),
    }
}

fn within(buf: &[u8], s: &[u8]) -> bool {
    let range = buf.as_ptr_range();
    s.is_empty() || (range.start <= s.as_ptr() && s.as_ptr_range().end <= range.end)
}

/// Limits hold, strings borrow from `buf`, and the value's shape is self-consistent.
fn check_value(v: &Value<'_>, buf: &[u8], limits: &Limits, depth: usize) {
    match *v {
        Value::Simple(s) | Value::Error(s) | Value::BigNumber(s) => {
            assert!(within(buf, s), "string outside the buffer");
            assert!(s.len() <= limits.max_line, "line of {} > {}", s.len(), limits.max_line);
            assert!(!s.contains(&b'\r') && !s.contains(&b'\n'), "CR/LF inside a line value");
        }
        Value::Bulk(s) | Value::BulkError(s) => {
            assert!(within(buf, s), "bulk outside the buffer");
            assert!(s.len() <= limits.max_bulk, "bulk of {} > {}", s.len(), limits.max_bulk);
        }
        Value::Verbatim { format, text } => {
            assert!(within(buf, format) && within(buf, text));
            assert_eq!(format.len(), 3);
            assert!(4 + text.len() <= limits.max_bulk);
        }
        Value::Integer(_) | Value::Null | Value::Boolean(_) | Value::Double(_) => {}
        Value::Array(items) | Value::Set(items) | Value::Map(items) | Value::Push(items) => {
            assert!(depth < limits.max_depth, "aggregate at depth {} with max {}", depth + 1, limits.max_depth);
            assert!(items.len() <= limits.max_elements, "{} elements > {}", items.len(), limits.max_elements);
            if matches!(v, Value::Map(_)) {
                assert_eq!(items.len() % 2, 0, "odd map");
                assert_eq!(items.pairs().count(), items.len() / 2);
            }
            assert_eq!(items.iter().len(), items.len());
            let mut n = 0;
            for item in items.iter() {
                check_value(&item, buf, limits, depth + 1);
                n += 1;
            }
            assert_eq!(n, items.len());
            if let Some(last) = items.len().checked_sub(1) {
                assert!(items.get(last).is_some() && items.get(items.len()).is_none());
            }
        }
    }
    // The classifiers accept anything and only ever point into the buffer.
    if let Some(push) = classify_push(v) {
        let slices: Vec<&[u8]> = match push {
            resp::Push::Message { channel, payload } | resp::Push::SMessage { channel, payload } => {
                vec![channel, payload]
            }
            resp::Push::PMessage { pattern, channel, payload } => vec![pattern, channel, payload],
            resp::Push::Subscription { channel, .. } => channel.into_iter().collect(),
            resp::Push::Pong { payload } => vec![payload],
        };
        assert!(slices.iter().all(|s| within(buf, s)), "push borrows outside the buffer");
    }
    if let Some(e) = v.error() {
        match e {
            resp::ServerError::Moved { slot, host, .. } | resp::ServerError::Ask { slot, host, .. } => {
                assert!(slot < 16384);
                assert!(within(buf, host));
            }
            _ => {}
        }
    }
}

#[derive(Debug, PartialEq)]
enum End {
    Clean,
    Incomplete,
    Error(ProtocolError),
}

/// Decodes `stream` fed as `chunks` (sizes; the last chunk takes the rest), the way a reader
/// does. Returns every value (owned, with its length) and how the stream ended.
fn run(limits: Limits, stream: &[u8], chunk_sizes: &[usize]) -> (Vec<(Owned, usize)>, End) {
    let mut decoder = Decoder::new(limits);
    let enforced = decoder.limits();
    let mut buf = Vec::new();
    let mut values = Vec::new();
    let mut needed = 0;
    let mut pos = 0;
    let mut sizes = chunk_sizes.iter();
    while pos < stream.len() {
        let size = sizes.next().copied().unwrap_or(stream.len());
        let end = (pos + size.max(1)).min(stream.len());
        buf.extend_from_slice(&stream[pos..end]);
        pos = end;
        if buf.len() < needed {
            continue;
        }
        loop {
            match decoder.decode(&buf) {
                Ok(Decoded::Complete { value, consumed }) => {
                    assert!(consumed >= 1 && consumed <= buf.len(), "consumed {consumed} of {}", buf.len());
                    check_value(&value, &buf, &enforced, 0);
                    values.push((own(&value), consumed));
                    buf.drain(..consumed);
                }
                Ok(Decoded::Incomplete { needed: n }) => {
                    assert!(n > buf.len(), "needed {n} with {} buffered", buf.len());
                    needed = n;
                    break;
                }
                Err(e) => return (values, End::Error(e)),
            }
        }
    }
    (values, if buf.is_empty() { End::Clean } else { End::Incomplete })
}

/// Re-encodes each value and decodes it again (default limits: the canonical form of a
/// double can be longer than the server's); checks prefixes of the value never complete
/// early, never error, and never ask for more than the value's length.
fn check_round_trip_and_prefixes(limits: Limits, stream: &[u8], values: &[(Owned, usize)], cut_seed: &mut Bytes<'_>) {
    let mut decoder = Decoder::new(limits);
    let mut again = Decoder::default();
    let mut pos = 0;
    for (owned, len) in values {
        let bytes = &stream[pos..pos + len];
        pos += len;
        let Ok(Decoded::Complete { value, consumed }) = decoder.decode(bytes) else {
            panic!("value does not decode from exactly its own bytes");
        };
        assert_eq!(consumed, *len);
        assert_eq!(own(&value), *owned);
        let mut re = Vec::new();
        resp::encode_value(&mut re, &value);
        match again.decode(&re) {
            Ok(Decoded::Complete { value: back, consumed }) => {
                assert_eq!(consumed, re.len(), "re-encoded value decodes short");
                assert_eq!(own(&back), *owned, "re-encoded value differs: {:?}", re.escape_ascii().to_string());
            }
            other => panic!("re-encoded value does not decode: {other:?} from {:?}", re.escape_ascii().to_string()),
        }
        for cut in [len - 1, len / 2, cut_seed.below(*len)] {
            match decoder.decode(&bytes[..cut]) {
                Ok(Decoded::Incomplete { needed }) => {
                    assert!(needed > cut && needed <= *len, "prefix {cut}/{len}: needed {needed}")
                }
                other => panic!("prefix {cut} of a {len}-byte value gave {other:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Generated mode
// ---------------------------------------------------------------------------------------------

struct Gen<'a> {
    src: Bytes<'a>,
    limits: Limits,
    /// Set when the generator wrote something the limits refuse (then an error is expected).
    over: bool,
    /// Aggregates written so far (bounds the size of one generated input).
    budget: usize,
}

impl Gen<'_> {
    fn len_prefix(&mut self, out: &mut Vec<u8>, t: u8, n: usize) {
        out.push(t);
        // Leading zeros are legal (and stay within the 32-byte number line).
        for _ in 0..(self.src.byte() % 8).saturating_sub(5) {
            out.push(b'0');
        }
        out.extend_from_slice(n.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    fn text(&mut self, max: usize) -> Vec<u8> {
        let n = self.src.below(max + 1);
        (0..n).map(|_| self.src.byte()).collect()
    }

    /// A line value's content: no CR or LF.
    fn line(&mut self, max: usize) -> Vec<u8> {
        self.text(max).into_iter().map(|b| if b == b'\r' || b == b'\n' { b'.' } else { b }).collect()
    }

    fn value(&mut self, out: &mut Vec<u8>, depth: usize) -> Owned {
        // Occasionally an attribute first: decoded, checked, dropped.
        if self.src.byte() % 16 == 0 && self.budget > 0 {
            self.budget -= 1;
            let n = self.src.below(3);
            if depth >= self.limits.max_depth || 2 * n > self.limits.max_elements {
                self.over = true;
            }
            self.len_prefix(out, b'|', n);
            for _ in 0..2 * n {
                self.value(out, depth + 1);
            }
        }
        let kind = self.src.byte() % 16;
        match kind {
            0 => {
                let s = self.line(12);
                self.over |= s.len() > self.limits.max_line;
                out.push(b'+');
                out.extend_from_slice(&s);
                out.extend_from_slice(b"\r\n");
                Owned::Simple(s)
            }
            1 => {
                let s = self.line(12);
                self.over |= s.len() > self.limits.max_line;
                out.push(b'-');
                out.extend_from_slice(&s);
                out.extend_from_slice(b"\r\n");
                Owned::Error(s)
            }
            2 => {
                let n = i64::from_le_bytes(std::array::from_fn(|_| self.src.byte()));
                let n = if self.src.bool() { n } else { n % 1000 };
                out.push(b':');
                if n >= 0 && self.src.byte() % 4 == 0 {
                    out.push(b'+');
                }
                out.extend_from_slice(n.to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
                Owned::Integer(n)
            }
            3 | 4 | 5 => {
                let s = self.text(40);
                self.over |= s.len() > self.limits.max_bulk;
                self.len_prefix(out, b'$', s.len());
                out.extend_from_slice(&s);
                out.extend_from_slice(b"\r\n");
                Owned::Bulk(s)
            }
            6 => {
                out.extend_from_slice(match self.src.byte() % 3 {
                    0 => b"$-1\r\n".as_slice(),
                    1 => b"*-1\r\n",
                    _ => b"_\r\n",
                });
                Owned::Null
            }
            7 => {
                let b = self.src.bool();
                out.extend_from_slice(if b { b"#t\r\n" } else { b"#f\r\n" });
                Owned::Boolean(b)
            }
            8 => {
                let d = f64::from_bits(u64::from_le_bytes(std::array::from_fn(|_| self.src.byte())));
                let text = match self.src.byte() % 3 {
                    _ if d.is_nan() => "nan".to_string(),
                    _ if d.is_infinite() => (if d > 0.0 { "inf" } else { "-inf" }).to_string(),
                    0 => format!("{d}"),
                    1 => format!("{d:e}"),
                    _ => format!("{d:E}"),
                };
                self.over |= text.len() > self.limits.max_line;
                out.push(b',');
                out.extend_from_slice(text.as_bytes());
                out.extend_from_slice(b"\r\n");
                Owned::Double(double_bits(d))
            }
            9 => {
                let digits: Vec<u8> = (0..1 + self.src.below(50)).map(|_| b'0' + self.src.byte() % 10).collect();
                let mut s = Vec::new();
                if self.src.bool() {
                    s.push(b'-');
                }
                s.extend_from_slice(&digits);
                self.over |= s.len() > self.limits.max_line;
                out.push(b'(');
                out.extend_from_slice(&s);
                out.extend_from_slice(b"\r\n");
                Owned::BigNumber(s)
            }
            10 => {
                let s = self.text(20);
                self.over |= s.len() > self.limits.max_bulk;
                self.len_prefix(out, b'!', s.len());
                out.extend_from_slice(&s);
                out.extend_from_slice(b"\r\n");
                Owned::BulkError(s)
            }
            11 => {
                let format: Vec<u8> = (0..3).map(|_| b'a' + self.src.byte() % 26).collect();
                let text = self.text(20);
                self.over |= 4 + text.len() > self.limits.max_bulk;
                self.len_prefix(out, b'=', 4 + text.len());
                out.extend_from_slice(&format);
                out.push(b':');
                out.extend_from_slice(&text);
                out.extend_from_slice(b"\r\n");
                Owned::Verbatim(format, text)
            }
            _ => {
                if self.budget == 0 {
                    out.extend_from_slice(b":0\r\n");
                    return Owned::Integer(0);
                }
                self.budget -= 1;
                // Deep chains sometimes, to reach the depth limit.
                let n = if self.src.byte() % 8 == 0 { 1 } else { self.src.below(5) };
                let (t, count) = match kind {
                    12 | 13 => (b'*', n),
                    14 => (b'~', n),
                    _ => match self.src.byte() % 2 {
                        0 => (b'%', 2 * n),
                        _ => (b'>', n),
                    },
                };
                if depth >= self.limits.max_depth || count > self.limits.max_elements {
                    self.over = true;
                }
                self.len_prefix(out, t, if t == b'%' { n } else { count });
                let items: Vec<Owned> = (0..count).map(|_| self.value(out, depth + 1)).collect();
                match t {
                    b'*' => Owned::Array(items),
                    b'~' => Owned::Set(items),
                    b'%' => Owned::Map(items),
                    _ => Owned::Push(items),
                }
            }
        }
    }
}

fn is_limit_error(e: &ProtocolError) -> bool {
    matches!(
        e,
        ProtocolError::BulkTooLarge { .. }
            | ProtocolError::TooManyElements { .. }
            | ProtocolError::TooDeep { .. }
            | ProtocolError::LineTooLong { .. }
    )
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let (config, rest) = data.split_at(5);
    let limits = Limits {
        max_bulk: if config[0] == 255 { HARD_MAX_BULK } else { config[0] as usize * 3 },
        max_elements: if config[1] == 255 { Limits::default().max_elements } else { config[1] as usize % 64 },
        // Up to 39: above HARD_MAX_DEPTH checks the clamp.
        max_depth: config[2] as usize % 40,
        max_line: if config[3] == 255 { Limits::default().max_line } else { config[3] as usize % 100 },
    };
    let enforced = Decoder::new(limits).limits();
    assert!(enforced.max_bulk <= HARD_MAX_BULK && enforced.max_depth <= HARD_MAX_DEPTH);
    let generated = config[4] % 4 == 3;

    let mut expected = Vec::new();
    let mut over = false;
    let stream: Vec<u8> = if generated {
        let mut g = Gen { src: Bytes::new(rest), limits: enforced, over: false, budget: 200 };
        let mut out = Vec::new();
        while !g.src.is_empty() && expected.len() < 32 {
            let v = g.value(&mut out, 0);
            if g.over {
                // The offending value stays in the stream: it must be refused with a limit error.
                over = true;
                break;
            }
            expected.push(v);
        }
        out
    } else {
        rest.to_vec()
    };

    // One piece, then chunks chosen by the input.
    let (values, end) = run(limits, &stream, &[]);
    let mut chunker = Bytes::new(config);
    let mut sizes = Vec::new();
    for _ in 0..64 {
        sizes.push(match chunker.byte() % 4 {
            0 => 1,
            1 => 1 + chunker.below(8),
            2 => 1 + chunker.below(200),
            _ => 1 + chunker.below(4000),
        });
    }
    let (chunked, chunked_end) = run(limits, &stream, &sizes);
    assert_eq!(chunked, values, "chunked feeding changed the values");
    assert_eq!(chunked_end, end, "chunked feeding changed how the stream ends");
    // Byte at a time re-parses an aggregate once per byte: only for short streams (the
    // chunked run above also feeds single bytes at input-chosen places).
    if stream.len() <= 256 {
        let ones = vec![1; stream.len()];
        let (bytewise, bytewise_end) = run(limits, &stream, &ones);
        assert_eq!(bytewise, values);
        assert_eq!(bytewise_end, end);
    }
    let total: usize = values.iter().map(|(_, n)| n).sum();
    assert!(total <= stream.len());
    check_round_trip_and_prefixes(limits, &stream, &values, &mut chunker);

    if generated {
        let got: Vec<&Owned> = values.iter().map(|(v, _)| v).collect();
        let want: Vec<&Owned> = expected.iter().collect();
        assert_eq!(got, want, "generated values decode differently");
        if over {
            match &end {
                End::Error(e) => assert!(is_limit_error(e), "an over-limit value gave {e:?}"),
                other => panic!("an over-limit value was not refused: {other:?}"),
            }
        } else {
            assert_eq!(end, End::Clean, "generated stream did not decode cleanly");
        }
    }

    // Commands built from the input decode to their arguments.
    let args: Vec<&[u8]> = rest.split(|&b| b == 0xFE).take(8).collect();
    let mut out = Vec::new();
    resp::encode_command(&mut out, &args);
    let mut d = Decoder::default();
    match d.decode(&out) {
        Ok(Decoded::Complete { value: Value::Array(items), consumed }) => {
            assert_eq!(consumed, out.len());
            let back: Vec<&[u8]> = items.iter().map(|v| v.as_bytes().expect("bulk")).collect();
            assert_eq!(back, args);
        }
        other => panic!("encoded command decodes as {other:?}"),
    }
    let _ = classify_error(rest);
});
