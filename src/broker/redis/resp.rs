//! RESP2/RESP3 codec for herald's own Redis connections: commands out, replies and pushes in.
//!
//! No I/O, no clock, no allocation on the hot path. Encoding appends to a caller's `Vec<u8>`
//! (pipelining = append every pending command, write once). Decoding re-parses from the start
//! of the unconsumed bytes on every call and returns either [`Decoded::Incomplete`] (with a
//! lower bound on the bytes the value needs, so a reader can skip re-parsing until they are
//! there) or one [`Value`] that borrows from the buffer: strings are `&[u8]` into it, never
//! copies. Aggregates need somewhere to keep their element positions; that is the
//! [`Decoder`]'s tape, a `Vec` reused across values, so a pub/sub message (a 3- or 4-element
//! array of bulk strings) costs no allocation once the tape has grown to a few nodes.
//!
//! Every size the server sends is checked against [`Limits`] before it is believed: bulk
//! lengths, element counts, nesting depth and line lengths. The tape grows only as elements
//! actually arrive (never reserved from a count), so memory follows the bytes received.
//! Malformed input is a [`ProtocolError`], never a panic; the connection is then unusable
//! (the byte stream has lost its framing) and the caller reconnects.

use std::fmt;

/// Largest bulk string any [`Limits`] allows (Redis's own `proto-max-bulk-len` default).
pub const HARD_MAX_BULK: usize = 512 * 1024 * 1024;
/// Deepest aggregate nesting any [`Limits`] allows; bounds the decoder's recursion.
pub const HARD_MAX_DEPTH: usize = 32;
/// Longest line accepted for a length, count, integer, boolean or null, without its CRLF.
/// `-9223372036854775808` is 20 bytes; anything much longer is not a number Redis sent.
const MAX_NUMBER_LINE: usize = 32;
/// Tape capacity (nodes) kept between values; a larger one (after a big reply) is shrunk.
const TAPE_KEEP: usize = 1024;

/// Caps on what one decoded value may claim. Values above the hard maxima are clamped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest bulk string, bulk error or verbatim string, in bytes (≤ [`HARD_MAX_BULK`]).
    pub max_bulk: usize,
    /// Most elements in one array, set or push; a map or attribute of n pairs counts 2n.
    pub max_elements: usize,
    /// Deepest aggregate nesting: a top-level array is depth 1 (≤ [`HARD_MAX_DEPTH`]).
    pub max_depth: usize,
    /// Longest simple string, simple error, double or big number line, without its CRLF.
    pub max_line: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_bulk: HARD_MAX_BULK, max_elements: 1 << 20, max_depth: HARD_MAX_DEPTH, max_line: 64 * 1024 }
    }
}

impl Limits {
    /// Default limits with bulk strings capped at `max_bulk` (e.g. herald's message size
    /// limit plus its envelope).
    pub fn with_max_bulk(max_bulk: usize) -> Limits {
        Limits { max_bulk, ..Limits::default() }
    }

    /// The limits actually enforced: each field at most its hard maximum.
    pub fn clamped(self) -> Limits {
        Limits {
            max_bulk: self.max_bulk.min(HARD_MAX_BULK),
            max_elements: self.max_elements,
            max_depth: self.max_depth.min(HARD_MAX_DEPTH),
            max_line: self.max_line,
        }
    }
}

/// Why bytes from the server are not RESP herald accepts. The stream has lost its framing:
/// the caller drops the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// A value starts with a byte that is no RESP2/RESP3 type.
    UnknownType(u8),
    /// A line is not ended by CRLF (a lone CR or LF), or a bulk payload is not followed by CRLF.
    MissingCrlf,
    /// A length or count that is neither `-1` (where a null is allowed) nor a decimal in range.
    BadLength,
    /// An integer or big number that is not decimal, or an integer that overflows i64.
    BadInteger,
    /// A double that does not parse.
    BadDouble,
    /// A boolean other than `#t` / `#f`.
    BadBoolean,
    /// A null (`_`) with something before its CRLF.
    BadNull,
    /// A verbatim string without its 3-byte format and colon.
    BadVerbatim,
    /// A streamed string or aggregate (`$?`, `*?`): RESP3 has them, Redis never sends them.
    Streamed,
    /// A line longer than its limit.
    LineTooLong { max: usize },
    /// A bulk string longer than [`Limits::max_bulk`].
    BulkTooLarge { len: u64, max: usize },
    /// An aggregate with more elements than [`Limits::max_elements`].
    TooManyElements { count: u64, max: usize },
    /// Aggregates nested deeper than [`Limits::max_depth`].
    TooDeep { max: usize },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::UnknownType(b) => write!(f, "RESP: unknown type byte {:?}", b.escape_ascii().to_string()),
            ProtocolError::MissingCrlf => f.write_str("RESP: missing CRLF"),
            ProtocolError::BadLength => f.write_str("RESP: malformed length"),
            ProtocolError::BadInteger => f.write_str("RESP: malformed integer"),
            ProtocolError::BadDouble => f.write_str("RESP: malformed double"),
            ProtocolError::BadBoolean => f.write_str("RESP: malformed boolean"),
            ProtocolError::BadNull => f.write_str("RESP: malformed null"),
            ProtocolError::BadVerbatim => f.write_str("RESP: malformed verbatim string"),
            ProtocolError::Streamed => f.write_str("RESP: streamed strings and aggregates are not supported"),
            ProtocolError::LineTooLong { max } => write!(f, "RESP: line longer than {max} bytes"),
            ProtocolError::BulkTooLarge { len, max } => write!(f, "RESP: bulk string of {len} bytes (limit {max})"),
            ProtocolError::TooManyElements { count, max } => {
                write!(f, "RESP: aggregate of {count} elements (limit {max})")
            }
            ProtocolError::TooDeep { max } => write!(f, "RESP: aggregates nested deeper than {max}"),
        }
    }
}

impl std::error::Error for ProtocolError {}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// Appends `prefix`, the decimal `n` and CRLF, without allocating.
fn put_header(out: &mut Vec<u8>, prefix: u8, n: u64) {
    out.push(prefix);
    put_digits(out, n);
    out.extend_from_slice(b"\r\n");
}

fn put_digits(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn put_bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    put_header(out, b'$', bytes.len() as u64);
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// Appends one command: an array of bulk strings, the command name first.
pub fn encode_command<I>(out: &mut Vec<u8>, args: I)
where
    I: IntoIterator,
    I::IntoIter: ExactSizeIterator,
    I::Item: AsRef<[u8]>,
{
    let args = args.into_iter();
    put_header(out, b'*', args.len() as u64);
    for arg in args {
        put_bulk(out, arg.as_ref());
    }
}

/// Appends `name` followed by `args`, e.g. `SUBSCRIBE` and a batch of channels.
pub fn encode_command_with<I>(out: &mut Vec<u8>, name: &[u8], args: I)
where
    I: IntoIterator,
    I::IntoIter: ExactSizeIterator,
    I::Item: AsRef<[u8]>,
{
    let args = args.into_iter();
    put_header(out, b'*', args.len() as u64 + 1);
    put_bulk(out, name);
    for arg in args {
        put_bulk(out, arg.as_ref());
    }
}

/// Appends `PUBLISH channel payload` (reply: the number of receivers, an integer).
pub fn encode_publish(out: &mut Vec<u8>, channel: &[u8], payload: &[u8]) {
    encode_command(out, [b"PUBLISH".as_slice(), channel, payload]);
}

/// Appends `SPUBLISH channel payload` (Redis ≥ 7, cluster: the channel's slot owner counts).
pub fn encode_spublish(out: &mut Vec<u8>, channel: &[u8], payload: &[u8]) {
    encode_command(out, [b"SPUBLISH".as_slice(), channel, payload]);
}

/// Appends `<kind's command> channel…`. An unsubscribe with no channels means all of them;
/// a subscribe with none is an error reply from the server.
pub fn encode_subscription<I>(out: &mut Vec<u8>, kind: SubKind, channels: I)
where
    I: IntoIterator,
    I::IntoIter: ExactSizeIterator,
    I::Item: AsRef<[u8]>,
{
    encode_command_with(out, kind.command(), channels);
}

/// Appends `value` in RESP3 (nulls as `_`). Simple strings and errors are written as they
/// are: ones the decoder produced never hold CR or LF. For tests, fuzzing and tools; herald
/// itself only sends commands.
pub fn encode_value(out: &mut Vec<u8>, value: &Value<'_>) {
    match *value {
        Value::Simple(s) => put_line(out, b'+', s),
        Value::Error(s) => put_line(out, b'-', s),
        Value::Integer(n) => {
            out.push(b':');
            if n < 0 {
                out.push(b'-');
            }
            put_digits(out, n.unsigned_abs());
            out.extend_from_slice(b"\r\n");
        }
        Value::Bulk(s) => put_bulk(out, s),
        Value::Null => out.extend_from_slice(b"_\r\n"),
        Value::Boolean(b) => out.extend_from_slice(if b { b"#t\r\n" } else { b"#f\r\n" }),
        Value::Double(d) => {
            let text = if d.is_nan() {
                "nan".to_string()
            } else if d.is_infinite() {
                if d > 0.0 { "inf".to_string() } else { "-inf".to_string() }
            } else {
                // Exponent form: the shortest text that parses back to the same f64.
                format!("{d:e}")
            };
            put_line(out, b',', text.as_bytes());
        }
        Value::BigNumber(s) => put_line(out, b'(', s),
        Value::BulkError(s) => {
            put_header(out, b'!', s.len() as u64);
            out.extend_from_slice(s);
            out.extend_from_slice(b"\r\n");
        }
        Value::Verbatim { format, text } => {
            put_header(out, b'=', (format.len() + 1 + text.len()) as u64);
            out.extend_from_slice(format);
            out.push(b':');
            out.extend_from_slice(text);
            out.extend_from_slice(b"\r\n");
        }
        Value::Array(items) | Value::Set(items) | Value::Map(items) | Value::Push(items) => {
            let (prefix, n) = match value {
                Value::Array(_) => (b'*', items.len()),
                Value::Set(_) => (b'~', items.len()),
                Value::Push(_) => (b'>', items.len()),
                _ => (b'%', items.len() / 2),
            };
            put_header(out, prefix, n as u64);
            for item in items.iter() {
                encode_value(out, &item);
            }
        }
    }
}

fn put_line(out: &mut Vec<u8>, prefix: u8, text: &[u8]) {
    out.push(prefix);
    out.extend_from_slice(text);
    out.extend_from_slice(b"\r\n");
}

// ---------------------------------------------------------------------------------------------
// Decoded values
// ---------------------------------------------------------------------------------------------

/// One decoded RESP value, borrowing from the read buffer and the decoder's tape.
#[derive(Clone, Copy, PartialEq)]
pub enum Value<'a> {
    /// `+OK`
    Simple(&'a [u8]),
    /// `-ERR …` (classify with [`Value::error`] / [`classify_error`]).
    Error(&'a [u8]),
    /// `:n`
    Integer(i64),
    /// `$n` bulk string.
    Bulk(&'a [u8]),
    /// `$-1`, `*-1` (RESP2) and `_` (RESP3).
    Null,
    /// `#t` / `#f`
    Boolean(bool),
    /// `,1.5`
    Double(f64),
    /// `(123…`: the decimal digits (with a sign if the server sent one).
    BigNumber(&'a [u8]),
    /// `!n` bulk error.
    BulkError(&'a [u8]),
    /// `=n` verbatim string: a 3-byte format (`txt`, `mkd`) and the text.
    Verbatim { format: &'a [u8], text: &'a [u8] },
    /// `*n`
    Array(Items<'a>),
    /// `~n`
    Set(Items<'a>),
    /// `%n`: 2n items, key then value ([`Items::pairs`]).
    Map(Items<'a>),
    /// `>n`: out-of-band data (pub/sub messages on a RESP3 connection).
    Push(Items<'a>),
}

impl<'a> Value<'a> {
    /// The bytes of a simple string, bulk string or verbatim text.
    pub fn as_bytes(&self) -> Option<&'a [u8]> {
        match *self {
            Value::Simple(s) | Value::Bulk(s) => Some(s),
            Value::Verbatim { text, .. } => Some(text),
            _ => None,
        }
    }

    pub fn as_integer(&self) -> Option<i64> {
        match *self {
            Value::Integer(n) => Some(n),
            _ => None,
        }
    }

    /// The elements of an array, set or push, or a map's keys and values alternating.
    pub fn items(&self) -> Option<Items<'a>> {
        match *self {
            Value::Array(i) | Value::Set(i) | Value::Map(i) | Value::Push(i) => Some(i),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// A simple or bulk error, classified.
    pub fn error(&self) -> Option<ServerError<'a>> {
        match *self {
            Value::Error(text) | Value::BulkError(text) => Some(classify_error(text)),
            _ => None,
        }
    }
}

impl fmt::Debug for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Simple(s) => write!(f, "Simple(\"{}\")", s.escape_ascii()),
            Value::Error(s) => write!(f, "Error(\"{}\")", s.escape_ascii()),
            Value::Integer(n) => write!(f, "Integer({n})"),
            Value::Bulk(s) => write!(f, "Bulk(\"{}\")", s.escape_ascii()),
            Value::Null => f.write_str("Null"),
            Value::Boolean(b) => write!(f, "Boolean({b})"),
            Value::Double(d) => write!(f, "Double({d:?})"),
            Value::BigNumber(s) => write!(f, "BigNumber({})", s.escape_ascii()),
            Value::BulkError(s) => write!(f, "BulkError(\"{}\")", s.escape_ascii()),
            Value::Verbatim { format, text } => {
                write!(f, "Verbatim(\"{}\", \"{}\")", format.escape_ascii(), text.escape_ascii())
            }
            Value::Array(i) => write!(f, "Array{i:?}"),
            Value::Set(i) => write!(f, "Set{i:?}"),
            Value::Map(i) => write!(f, "Map{i:?}"),
            Value::Push(i) => write!(f, "Push{i:?}"),
        }
    }
}

/// The elements of an aggregate. Cheap to copy; `get(i)` walks from the first element, so
/// iterate rather than index in loops over long aggregates.
#[derive(Clone, Copy)]
pub struct Items<'a> {
    buf: &'a [u8],
    tape: &'a [Node],
    /// Tape index of the first element (elements are consecutive subtrees).
    first: usize,
    len: usize,
}

impl<'a> Items<'a> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> ItemsIter<'a> {
        ItemsIter { buf: self.buf, tape: self.tape, next: self.first, remaining: self.len }
    }

    pub fn get(&self, index: usize) -> Option<Value<'a>> {
        self.iter().nth(index)
    }

    /// Consecutive (key, value) pairs, as a map's items are laid out. A trailing odd item is
    /// not returned (maps always have an even count).
    pub fn pairs(&self) -> Pairs<'a> {
        Pairs { items: self.iter() }
    }
}

impl PartialEq for Items<'_> {
    fn eq(&self, other: &Items<'_>) -> bool {
        self.len == other.len && self.iter().zip(other.iter()).all(|(a, b)| a == b)
    }
}

impl fmt::Debug for Items<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a> IntoIterator for Items<'a> {
    type Item = Value<'a>;
    type IntoIter = ItemsIter<'a>;
    fn into_iter(self) -> ItemsIter<'a> {
        self.iter()
    }
}

/// Iterator over [`Items`].
#[derive(Clone)]
pub struct ItemsIter<'a> {
    buf: &'a [u8],
    tape: &'a [Node],
    next: usize,
    remaining: usize,
}

impl<'a> Iterator for ItemsIter<'a> {
    type Item = Value<'a>;

    fn next(&mut self) -> Option<Value<'a>> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let (value, after) = view(self.buf, self.tape, self.next);
        self.next = after;
        Some(value)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for ItemsIter<'_> {}

/// Iterator over a map's (key, value) pairs.
#[derive(Clone)]
pub struct Pairs<'a> {
    items: ItemsIter<'a>,
}

impl<'a> Iterator for Pairs<'a> {
    type Item = (Value<'a>, Value<'a>);

    fn next(&mut self) -> Option<(Value<'a>, Value<'a>)> {
        if self.items.remaining < 2 {
            return None;
        }
        Some((self.items.next()?, self.items.next()?))
    }
}

/// One tape entry. Strings are spans of the buffer the value was decoded from; an aggregate
/// is followed by its elements' subtrees, and `end` is the index just past the last of them.
#[derive(Clone, Copy, Debug)]
enum Node {
    Text { kind: TextKind, start: usize, len: usize },
    Integer(i64),
    Double(f64),
    Boolean(bool),
    Null,
    Aggregate { kind: AggKind, len: usize, end: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TextKind {
    Simple,
    Error,
    Bulk,
    BulkError,
    BigNumber,
    /// Span covers `fmt:text`; the decoder checked the colon at index 3.
    Verbatim,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AggKind {
    Array,
    Set,
    Map,
    Push,
    /// Decoded to check and skip, never viewed: the tape is cut back after it.
    Attribute,
}

/// The value at tape index `idx` and the index of the node after its subtree.
fn view<'a>(buf: &'a [u8], tape: &'a [Node], idx: usize) -> (Value<'a>, usize) {
    match tape[idx] {
        Node::Text { kind, start, len } => {
            let s = &buf[start..start + len];
            let v = match kind {
                TextKind::Simple => Value::Simple(s),
                TextKind::Error => Value::Error(s),
                TextKind::Bulk => Value::Bulk(s),
                TextKind::BulkError => Value::BulkError(s),
                TextKind::BigNumber => Value::BigNumber(s),
                TextKind::Verbatim => Value::Verbatim { format: &s[..3], text: &s[4..] },
            };
            (v, idx + 1)
        }
        Node::Integer(n) => (Value::Integer(n), idx + 1),
        Node::Double(d) => (Value::Double(d), idx + 1),
        Node::Boolean(b) => (Value::Boolean(b), idx + 1),
        Node::Null => (Value::Null, idx + 1),
        Node::Aggregate { kind, len, end } => {
            let items = Items { buf, tape, first: idx + 1, len };
            let v = match kind {
                AggKind::Array | AggKind::Attribute => Value::Array(items),
                AggKind::Set => Value::Set(items),
                AggKind::Map => Value::Map(items),
                AggKind::Push => Value::Push(items),
            };
            (v, end)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

/// The result of one [`Decoder::decode`] call.
#[derive(Debug, PartialEq)]
pub enum Decoded<'a> {
    /// The buffer holds only the start of a value. It needs at least `needed` bytes (counted
    /// from the start of the buffer passed in; always more than its length) before another
    /// call can make progress: a reader may wait for that many, and size its buffer for it.
    Incomplete { needed: usize },
    /// One whole value, made of the first `consumed` bytes of the buffer.
    Complete { value: Value<'a>, consumed: usize },
}

/// Decodes values one at a time. Keep one per connection: its tape is reused, so decoding
/// allocates only while the tape grows to the largest value seen (and is trimmed back to
/// [`TAPE_KEEP`] nodes after an exceptionally large one).
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    tape: Vec<Node>,
}

impl Default for Decoder {
    fn default() -> Decoder {
        Decoder::new(Limits::default())
    }
}

impl Decoder {
    pub fn new(limits: Limits) -> Decoder {
        Decoder { limits: limits.clamped(), tape: Vec::with_capacity(8) }
    }

    /// The limits in force (clamped to the hard maxima).
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Decodes the value at the start of `buf`. Attributes (`|`) are checked and skipped: the
    /// value they annotate is returned, and `consumed` covers both. The value borrows `buf`
    /// and the decoder's tape until it is dropped: act on it (build the frame, match the
    /// reply), then drop the consumed bytes and call again.
    pub fn decode<'a>(&'a mut self, buf: &'a [u8]) -> Result<Decoded<'a>, ProtocolError> {
        if self.tape.capacity() > TAPE_KEEP {
            self.tape.clear();
            self.tape.shrink_to(TAPE_KEEP);
        }
        self.tape.clear();
        let mut parser = Parser { buf, limits: self.limits, tape: &mut self.tape };
        match parser.value(0, 0) {
            Ok(consumed) => {
                debug_assert!(consumed <= buf.len());
                let tape = &self.tape[..];
                let (value, _) = view(buf, tape, 0);
                Ok(Decoded::Complete { value, consumed })
            }
            Err(Stop::Incomplete(needed)) => {
                debug_assert!(needed > buf.len());
                Ok(Decoded::Incomplete { needed })
            }
            Err(Stop::Error(e)) => Err(e),
        }
    }

    #[cfg(test)]
    fn tape_identity(&self) -> (*const Node, usize) {
        (self.tape.as_ptr(), self.tape.capacity())
    }
}

/// Why the parser stopped short of a value.
enum Stop {
    Incomplete(usize),
    Error(ProtocolError),
}

impl From<ProtocolError> for Stop {
    fn from(e: ProtocolError) -> Stop {
        Stop::Error(e)
    }
}

struct Parser<'b, 't> {
    buf: &'b [u8],
    limits: Limits,
    tape: &'t mut Vec<Node>,
}

impl Parser<'_, '_> {
    /// Parses one value (after any attributes) starting at `pos`, at nesting `depth` (the
    /// number of aggregates around it); returns the position after it.
    fn value(&mut self, mut pos: usize, depth: usize) -> Result<usize, Stop> {
        loop {
            let Some(&kind) = self.buf.get(pos) else { return Err(Stop::Incomplete(pos + 1)) };
            match kind {
                b'+' => return self.text_line(pos, TextKind::Simple),
                b'-' => return self.text_line(pos, TextKind::Error),
                b'(' => {
                    let (start, cr) = self.line(pos + 1, self.limits.max_line)?;
                    let digits = &self.buf[start..cr];
                    let digits = digits.strip_prefix(b"-").or_else(|| digits.strip_prefix(b"+")).unwrap_or(digits);
                    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                        return Err(ProtocolError::BadInteger.into());
                    }
                    self.tape.push(Node::Text { kind: TextKind::BigNumber, start, len: cr - start });
                    return Ok(cr + 2);
                }
                b':' => {
                    let (start, cr) = self.line(pos + 1, MAX_NUMBER_LINE)?;
                    let n = parse_i64(&self.buf[start..cr]).ok_or(ProtocolError::BadInteger)?;
                    self.tape.push(Node::Integer(n));
                    return Ok(cr + 2);
                }
                b',' => {
                    let (start, cr) = self.line(pos + 1, self.limits.max_line)?;
                    let d = std::str::from_utf8(&self.buf[start..cr])
                        .ok()
                        .and_then(|s| s.parse::<f64>().ok())
                        .ok_or(ProtocolError::BadDouble)?;
                    self.tape.push(Node::Double(d));
                    return Ok(cr + 2);
                }
                b'#' => {
                    let (start, cr) = self.line(pos + 1, MAX_NUMBER_LINE)?;
                    let b = match &self.buf[start..cr] {
                        b"t" => true,
                        b"f" => false,
                        _ => return Err(ProtocolError::BadBoolean.into()),
                    };
                    self.tape.push(Node::Boolean(b));
                    return Ok(cr + 2);
                }
                b'_' => {
                    let (start, cr) = self.line(pos + 1, MAX_NUMBER_LINE)?;
                    if cr != start {
                        return Err(ProtocolError::BadNull.into());
                    }
                    self.tape.push(Node::Null);
                    return Ok(cr + 2);
                }
                b'$' => return self.bulk(pos, TextKind::Bulk),
                b'!' => return self.bulk(pos, TextKind::BulkError),
                b'=' => return self.bulk(pos, TextKind::Verbatim),
                b'*' => return self.aggregate(pos, depth, AggKind::Array),
                b'~' => return self.aggregate(pos, depth, AggKind::Set),
                b'%' => return self.aggregate(pos, depth, AggKind::Map),
                b'>' => return self.aggregate(pos, depth, AggKind::Push),
                b'|' => {
                    let mark = self.tape.len();
                    pos = self.aggregate(pos, depth, AggKind::Attribute)?;
                    self.tape.truncate(mark);
                }
                other => return Err(ProtocolError::UnknownType(other).into()),
            }
        }
    }

    /// Finds the CRLF ending the line that starts at `start`, whose content may be at most
    /// `max` bytes. Returns (start, index of the CR). A lone CR or LF is an error; so is a
    /// line that has grown past `max` without an end, as soon as that is visible.
    fn line(&self, start: usize, max: usize) -> Result<(usize, usize), Stop> {
        let buf = self.buf;
        if start > buf.len() {
            return Err(Stop::Incomplete(start + 1));
        }
        let window_end = start.saturating_add(max).saturating_add(1).min(buf.len());
        match buf[start..window_end].iter().position(|&b| b == b'\r' || b == b'\n') {
            Some(i) => {
                let cr = start + i;
                if buf[cr] == b'\n' {
                    return Err(ProtocolError::MissingCrlf.into());
                }
                match buf.get(cr + 1) {
                    None => Err(Stop::Incomplete(cr + 2)),
                    Some(b'\n') => Ok((start, cr)),
                    Some(_) => Err(ProtocolError::MissingCrlf.into()),
                }
            }
            None if window_end - start > max => Err(ProtocolError::LineTooLong { max }.into()),
            None => Err(Stop::Incomplete(buf.len() + 1)),
        }
    }

    fn text_line(&mut self, pos: usize, kind: TextKind) -> Result<usize, Stop> {
        let (start, cr) = self.line(pos + 1, self.limits.max_line)?;
        self.tape.push(Node::Text { kind, start, len: cr - start });
        Ok(cr + 2)
    }

    /// `$`, `!` and `=`: a length line, then exactly that many bytes and CRLF.
    fn bulk(&mut self, pos: usize, kind: TextKind) -> Result<usize, Stop> {
        let (start, cr) = self.line(pos + 1, MAX_NUMBER_LINE)?;
        let Some(len) = parse_len(&self.buf[start..cr])? else {
            if kind == TextKind::Bulk {
                self.tape.push(Node::Null);
                return Ok(cr + 2);
            }
            return Err(ProtocolError::BadLength.into());
        };
        let max = self.limits.max_bulk;
        if len > max as u64 {
            return Err(ProtocolError::BulkTooLarge { len, max }.into());
        }
        // len ≤ max_bulk ≤ 512 MiB: fits a usize; positions are within a slice, so no overflow.
        let start = cr + 2;
        let end = start + len as usize;
        if self.buf.len() < end + 2 {
            return Err(Stop::Incomplete(end + 2));
        }
        if &self.buf[end..end + 2] != b"\r\n" {
            return Err(ProtocolError::MissingCrlf.into());
        }
        if kind == TextKind::Verbatim && (len < 4 || self.buf[start + 3] != b':') {
            return Err(ProtocolError::BadVerbatim.into());
        }
        self.tape.push(Node::Text { kind, start, len: len as usize });
        Ok(end + 2)
    }

    fn aggregate(&mut self, pos: usize, depth: usize, kind: AggKind) -> Result<usize, Stop> {
        let (start, cr) = self.line(pos + 1, MAX_NUMBER_LINE)?;
        let Some(n) = parse_len(&self.buf[start..cr])? else {
            if kind == AggKind::Array {
                self.tape.push(Node::Null);
                return Ok(cr + 2);
            }
            return Err(ProtocolError::BadLength.into());
        };
        let count = match kind {
            AggKind::Map | AggKind::Attribute => n.checked_mul(2).ok_or(ProtocolError::BadLength)?,
            _ => n,
        };
        let max = self.limits.max_elements;
        if count > max as u64 {
            return Err(ProtocolError::TooManyElements { count, max }.into());
        }
        if depth >= self.limits.max_depth {
            return Err(ProtocolError::TooDeep { max: self.limits.max_depth }.into());
        }
        let idx = self.tape.len();
        let count = count as usize;
        self.tape.push(Node::Aggregate { kind, len: count, end: 0 });
        let mut pos = cr + 2;
        for _ in 0..count {
            pos = self.value(pos, depth + 1)?;
        }
        let end = self.tape.len();
        if let Node::Aggregate { end: e, .. } = &mut self.tape[idx] {
            *e = end;
        }
        Ok(pos)
    }
}

/// A RESP length: `-1` (None: a null where the type allows one) or decimal digits.
fn parse_len(line: &[u8]) -> Result<Option<u64>, ProtocolError> {
    match line {
        b"-1" => Ok(None),
        b"?" => Err(ProtocolError::Streamed),
        [] => Err(ProtocolError::BadLength),
        digits => {
            let mut n: u64 = 0;
            for &d in digits {
                if !d.is_ascii_digit() {
                    return Err(ProtocolError::BadLength);
                }
                n = n
                    .checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(d - b'0')))
                    .ok_or(ProtocolError::BadLength)?;
            }
            Ok(Some(n))
        }
    }
}

/// An optionally signed decimal i64, no spaces, no overflow.
fn parse_i64(line: &[u8]) -> Option<i64> {
    let (negative, digits) = match line {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        rest => (false, rest),
    };
    if digits.is_empty() {
        return None;
    }
    // Accumulate negatively so i64::MIN parses without overflow.
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_sub(i64::from(d - b'0'))?;
    }
    if negative { Some(n) } else { n.checked_neg() }
}

// ---------------------------------------------------------------------------------------------
// Pub/sub pushes
// ---------------------------------------------------------------------------------------------

/// The subscribe/unsubscribe commands, and the confirmations the server pushes for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubKind {
    Subscribe,
    PSubscribe,
    SSubscribe,
    Unsubscribe,
    PUnsubscribe,
    SUnsubscribe,
}

impl SubKind {
    /// The command name, as sent.
    pub fn command(self) -> &'static [u8] {
        match self {
            SubKind::Subscribe => b"SUBSCRIBE",
            SubKind::PSubscribe => b"PSUBSCRIBE",
            SubKind::SSubscribe => b"SSUBSCRIBE",
            SubKind::Unsubscribe => b"UNSUBSCRIBE",
            SubKind::PUnsubscribe => b"PUNSUBSCRIBE",
            SubKind::SUnsubscribe => b"SUNSUBSCRIBE",
        }
    }

    /// Whether this confirms a subscription (as opposed to its end).
    pub fn is_subscribe(self) -> bool {
        matches!(self, SubKind::Subscribe | SubKind::PSubscribe | SubKind::SSubscribe)
    }

    fn from_push_name(name: &[u8]) -> Option<SubKind> {
        [
            SubKind::Subscribe,
            SubKind::PSubscribe,
            SubKind::SSubscribe,
            SubKind::Unsubscribe,
            SubKind::PUnsubscribe,
            SubKind::SUnsubscribe,
        ]
        .into_iter()
        .find(|k| k.command().eq_ignore_ascii_case(name))
    }
}

/// What a subscribed connection receives, borrowed from the read buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Push<'a> {
    /// A PUBLISH to a channel this connection SUBSCRIBEd to.
    Message { channel: &'a [u8], payload: &'a [u8] },
    /// A PUBLISH to a channel matching a PSUBSCRIBEd pattern.
    PMessage { pattern: &'a [u8], channel: &'a [u8], payload: &'a [u8] },
    /// An SPUBLISH to an SSUBSCRIBEd shard channel.
    SMessage { channel: &'a [u8], payload: &'a [u8] },
    /// A (un)subscribe confirmation: `count` is how many subscriptions of the connection
    /// remain (Redis counts channels and patterns together; shard channels separately).
    /// `channel` is None for an unsubscribe-all on a connection with nothing subscribed.
    /// Redis also sends `sunsubscribe` unasked when a shard channel's slot leaves the node
    /// (resharding, failover): the subscription is gone and must be made again elsewhere.
    Subscription { kind: SubKind, channel: Option<&'a [u8]>, count: i64 },
    /// The answer to PING on a subscribed connection: `["pong", payload]` over RESP2, a plain
    /// `+PONG` over RESP3 (payload empty; a PING with an argument is answered with a plain
    /// bulk string there, which is not recognised as a push).
    Pong { payload: &'a [u8] },
}

/// Recognises a pub/sub push: a RESP2 array on a subscribed connection, or a RESP3 push.
/// None for anything else (a reply, an unknown push kind, a known kind of the wrong shape).
pub fn classify_push<'a>(value: &Value<'a>) -> Option<Push<'a>> {
    let items = match *value {
        Value::Array(items) | Value::Push(items) => items,
        Value::Simple(s) if s.eq_ignore_ascii_case(b"PONG") => return Some(Push::Pong { payload: &[] }),
        _ => return None,
    };
    let mut it = items.iter();
    let name = it.next()?.as_bytes()?;
    let mut next_bytes = || it.next().and_then(|v| v.as_bytes());
    match (name.len(), items.len()) {
        (7, 3) if name.eq_ignore_ascii_case(b"message") => {
            Some(Push::Message { channel: next_bytes()?, payload: next_bytes()? })
        }
        (8, 3) if name.eq_ignore_ascii_case(b"smessage") => {
            Some(Push::SMessage { channel: next_bytes()?, payload: next_bytes()? })
        }
        (8, 4) if name.eq_ignore_ascii_case(b"pmessage") => {
            Some(Push::PMessage { pattern: next_bytes()?, channel: next_bytes()?, payload: next_bytes()? })
        }
        (4, 2) if name.eq_ignore_ascii_case(b"pong") => Some(Push::Pong { payload: next_bytes()? }),
        (_, 3) => {
            let kind = SubKind::from_push_name(name)?;
            let channel = match it.next()? {
                Value::Null => None,
                other => Some(other.as_bytes()?),
            };
            let count = it.next()?.as_integer()?;
            Some(Push::Subscription { kind, channel, count })
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Error replies
// ---------------------------------------------------------------------------------------------

/// An error reply, sorted by what the caller can do about it. Every variant but the
/// redirects carries the whole error text (for logs; it never holds a secret herald sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerError<'a> {
    /// `MOVED slot host:port`: the slot is served by that node from now on (refresh the slot
    /// map). An empty `host` means the host of the connection that got the reply.
    Moved { slot: u16, host: &'a [u8], port: u16 },
    /// `ASK slot host:port`: this one command goes to that node, after `ASKING`.
    Ask { slot: u16, host: &'a [u8], port: u16 },
    /// `NOAUTH`: the server wants AUTH first.
    NoAuth(&'a [u8]),
    /// `WRONGPASS`, or the pre-ACL "invalid password" / "no password is set" answers to AUTH.
    Auth(&'a [u8]),
    /// `NOPERM`: the ACL user may not run this command or use this channel.
    NoPerm(&'a [u8]),
    /// `LOADING`: the server is loading its dataset; retry later.
    Loading(&'a [u8]),
    /// `CROSSSLOT`: the keys or channels of one command hash to different slots.
    CrossSlot(&'a [u8]),
    /// `TRYAGAIN`: a multi-key command during resharding; retry later.
    TryAgain(&'a [u8]),
    /// `CLUSTERDOWN`: the cluster cannot serve this slot now.
    ClusterDown(&'a [u8]),
    /// Anything else, including malformed redirects.
    Other(&'a [u8]),
}

/// Classifies the text of an error reply (without its `-`).
pub fn classify_error(text: &[u8]) -> ServerError<'_> {
    let code = text.split(|&b| b == b' ').next().unwrap_or_default();
    match code {
        b"MOVED" | b"ASK" => match parse_redirect(&text[code.len()..]) {
            Some((slot, host, port)) if code == b"MOVED" => ServerError::Moved { slot, host, port },
            Some((slot, host, port)) => ServerError::Ask { slot, host, port },
            None => ServerError::Other(text),
        },
        b"NOAUTH" => ServerError::NoAuth(text),
        b"WRONGPASS" => ServerError::Auth(text),
        b"NOPERM" => ServerError::NoPerm(text),
        b"LOADING" => ServerError::Loading(text),
        b"CROSSSLOT" => ServerError::CrossSlot(text),
        b"TRYAGAIN" => ServerError::TryAgain(text),
        b"CLUSTERDOWN" => ServerError::ClusterDown(text),
        b"ERR" if is_legacy_auth_failure(text) => ServerError::Auth(text),
        _ => ServerError::Other(text),
    }
}

/// Redis < 6 answers a wrong password with `ERR invalid password`; Redis ≥ 6 answers AUTH
/// without a configured password with `ERR AUTH <password> called without any password
/// configured…` and older ones with `ERR Client sent AUTH, but no password is set`.
fn is_legacy_auth_failure(text: &[u8]) -> bool {
    let rest = &text[3..];
    rest.starts_with(b" invalid password")
        || rest.starts_with(b" invalid username-password pair")
        || rest.starts_with(b" Client sent AUTH, but no password is set")
        || (rest.starts_with(b" AUTH <password> called without any password configured"))
}

/// ` slot host:port` → (slot, host, port). The host may be an unbracketed IPv6 address, so
/// the port is after the last colon.
fn parse_redirect(rest: &[u8]) -> Option<(u16, &[u8], u16)> {
    let rest = rest.strip_prefix(b" ")?;
    let space = rest.iter().position(|&b| b == b' ')?;
    let (slot, addr) = (&rest[..space], &rest[space + 1..]);
    let slot = parse_small(slot).filter(|&s| s < 16384)?;
    let colon = addr.iter().rposition(|&b| b == b':')?;
    let (host, port) = (&addr[..colon], &addr[colon + 1..]);
    if host.contains(&b' ') {
        return None;
    }
    let port = parse_small(port)?;
    Some((slot, host, port))
}

/// 1–5 decimal digits fitting a u16.
fn parse_small(digits: &[u8]) -> Option<u16> {
    if digits.is_empty() || digits.len() > 5 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    u16::try_from(n).ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::*;

    /// What decoding a whole stream produced: each value's Debug form with its length, then
    /// how it ended.
    #[derive(Debug, PartialEq)]
    struct Outcome {
        values: Vec<(String, usize)>,
        end: End,
    }

    #[derive(Debug, PartialEq)]
    enum End {
        /// Every byte consumed.
        Clean,
        /// Leftover bytes that are the start of a value.
        Incomplete,
        Error(ProtocolError),
    }

    /// Feeds `chunks` as successive reads and decodes the way a reader does: drain complete
    /// values, and after `Incomplete { needed }` wait until that many bytes are buffered.
    fn stream(limits: Limits, chunks: &[&[u8]]) -> Outcome {
        let mut decoder = Decoder::new(limits);
        let mut buf: Vec<u8> = Vec::new();
        let mut values = Vec::new();
        let mut needed = 0;
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            if buf.len() < needed {
                continue;
            }
            loop {
                match decoder.decode(&buf) {
                    Ok(Decoded::Complete { value, consumed }) => {
                        assert!(consumed > 0 && consumed <= buf.len());
                        values.push((format!("{value:?}"), consumed));
                        buf.drain(..consumed);
                    }
                    Ok(Decoded::Incomplete { needed: n }) => {
                        assert!(n > buf.len(), "needed {n} with {} bytes buffered", buf.len());
                        needed = n;
                        break;
                    }
                    Err(e) => return Outcome { values, end: End::Error(e) },
                }
            }
        }
        let end = if buf.is_empty() { End::Clean } else { End::Incomplete };
        Outcome { values, end }
    }

    fn one_shot(bytes: &[u8]) -> Outcome {
        stream(Limits::default(), &[bytes])
    }

    fn byte_at_a_time(limits: Limits, bytes: &[u8]) -> Outcome {
        let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        stream(limits, &chunks)
    }

    /// The single value in `bytes`, as Debug text; panics unless it is exactly one value.
    fn decode_one(bytes: &[u8]) -> String {
        let mut d = Decoder::default();
        match d.decode(bytes) {
            Ok(Decoded::Complete { value, consumed }) => {
                assert_eq!(consumed, bytes.len(), "value ends before the input in {:?}", bytes.escape_ascii());
                format!("{value:?}")
            }
            other => panic!("{:?}: {other:?}", bytes.escape_ascii().to_string()),
        }
    }

    fn decode_err(limits: Limits, bytes: &[u8]) -> ProtocolError {
        let mut d = Decoder::new(limits);
        match d.decode(bytes) {
            Err(e) => e,
            other => panic!("{:?}: expected an error, got {other:?}", bytes.escape_ascii().to_string()),
        }
    }

    /// Every value type, each as Redis sends it where a capture exists (`DEBUG PROTOCOL …`
    /// and pub/sub traffic from redis-server 7.0.15), with its expected Debug form.
    const EVERY_TYPE: &[(&[u8], &str)] = &[
        (b"+OK\r\n", r#"Simple("OK")"#),
        (b"+\r\n", r#"Simple("")"#),
        (b"-ERR DB index is out of range\r\n", r#"Error("ERR DB index is out of range")"#),
        (b":12345\r\n", "Integer(12345)"),
        (b":-9223372036854775808\r\n", "Integer(-9223372036854775808)"),
        (b":+9223372036854775807\r\n", "Integer(9223372036854775807)"),
        (b":-0\r\n", "Integer(0)"),
        (b"$11\r\nHello World\r\n", r#"Bulk("Hello World")"#),
        (b"$0\r\n\r\n", r#"Bulk("")"#),
        (b"$4\r\na\r\nb\r\n", r#"Bulk("a\r\nb")"#),
        (b"$-1\r\n", "Null"),
        (b"*-1\r\n", "Null"),
        (b"_\r\n", "Null"),
        (b"#t\r\n", "Boolean(true)"),
        (b"#f\r\n", "Boolean(false)"),
        (b",3.141\r\n", "Double(3.141)"),
        (b",-1.5e10\r\n", "Double(-15000000000.0)"),
        (b",inf\r\n", "Double(inf)"),
        (b",-inf\r\n", "Double(-inf)"),
        (b",nan\r\n", "Double(NaN)"),
        (b"(1234567999999999999999999999999999999\r\n", "BigNumber(1234567999999999999999999999999999999)"),
        (b"(-12\r\n", "BigNumber(-12)"),
        (b"!21\r\nSYNTAX invalid syntax\r\n", r#"BulkError("SYNTAX invalid syntax")"#),
        (b"=29\r\ntxt:This is a verbatim\nstring\r\n", r#"Verbatim("txt", "This is a verbatim\nstring")"#),
        (b"*0\r\n", "Array[]"),
        (b"*3\r\n:0\r\n:1\r\n:2\r\n", "Array[Integer(0), Integer(1), Integer(2)]"),
        (b"~3\r\n:0\r\n:1\r\n:2\r\n", "Set[Integer(0), Integer(1), Integer(2)]"),
        (
            b"%3\r\n:0\r\n#f\r\n:1\r\n#t\r\n:2\r\n#f\r\n",
            "Map[Integer(0), Boolean(false), Integer(1), Boolean(true), Integer(2), Boolean(false)]",
        ),
        (
            b">3\r\n$7\r\nmessage\r\n$11\r\nuser_noti:1\r\n$7\r\n{\"a\":1}\r\n",
            r#"Push[Bulk("message"), Bulk("user_noti:1"), Bulk("{\"a\":1}")]"#,
        ),
        (
            b"*4\r\n$8\r\npmessage\r\n$11\r\nuser_noti:*\r\n$11\r\nuser_noti:1\r\n$7\r\n{\"a\":1}\r\n",
            r#"Array[Bulk("pmessage"), Bulk("user_noti:*"), Bulk("user_noti:1"), Bulk("{\"a\":1}")]"#,
        ),
        (b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n", r#"Array[Bulk("unsubscribe"), Null, Integer(0)]"#),
        (b"*2\r\n*1\r\n*0\r\n%0\r\n", "Array[Array[Array[]], Map[]]"),
        // DEBUG PROTOCOL attrib: the attribute is skipped, the reply after it is the value.
        (
            b"|1\r\n$14\r\nkey-popularity\r\n*2\r\n$7\r\nkey:123\r\n:90\r\n$39\r\nSome real reply following the attribute\r\n",
            r#"Bulk("Some real reply following the attribute")"#,
        ),
        (b"*2\r\n|1\r\n+a\r\n+b\r\n:1\r\n:2\r\n", "Array[Integer(1), Integer(2)]"),
    ];

    #[test]
    fn every_type_decodes_to_a_borrowed_value() {
        for (bytes, expected) in EVERY_TYPE {
            assert_eq!(decode_one(bytes), *expected, "{:?}", bytes.escape_ascii().to_string());
        }
        // Strings point into the buffer, not into copies.
        let bytes = b"*2\r\n$5\r\nhello\r\n+world\r\n";
        let mut d = Decoder::default();
        let Ok(Decoded::Complete { value, .. }) = d.decode(bytes) else { panic!() };
        let items = value.items().unwrap();
        let hello = items.get(0).unwrap().as_bytes().unwrap();
        let world = items.get(1).unwrap().as_bytes().unwrap();
        assert!(std::ptr::eq(hello.as_ptr(), bytes[8..].as_ptr()));
        assert!(std::ptr::eq(world.as_ptr(), bytes[16..].as_ptr()));
    }

    #[test]
    fn every_type_fed_one_byte_at_a_time() {
        for (bytes, expected) in EVERY_TYPE {
            // Every proper prefix is Incomplete, with a hint that never overshoots the value.
            let mut d = Decoder::default();
            for cut in 0..bytes.len() {
                match d.decode(&bytes[..cut]) {
                    Ok(Decoded::Incomplete { needed }) => {
                        assert!(needed > cut && needed <= bytes.len(), "cut {cut}: needed {needed}")
                    }
                    other => panic!("{:?} cut at {cut}: {other:?}", bytes.escape_ascii().to_string()),
                }
            }
            let fed = byte_at_a_time(Limits::default(), bytes);
            assert_eq!(fed, Outcome { values: vec![(expected.to_string(), bytes.len())], end: End::Clean });
        }
    }

    #[test]
    fn split_at_every_chunk_boundary_gives_the_same_values() {
        let all: Vec<u8> = EVERY_TYPE.iter().flat_map(|(b, _)| b.iter().copied()).collect();
        let whole = one_shot(&all);
        assert_eq!(whole.values.len(), EVERY_TYPE.len());
        assert_eq!(whole.end, End::Clean);
        for cut in 0..=all.len() {
            let (a, b) = all.split_at(cut);
            assert_eq!(stream(Limits::default(), &[a, b]), whole, "split at {cut}");
        }
        for stride in [2, 3, 5, 7, 64] {
            let chunks: Vec<&[u8]> = all.chunks(stride).collect();
            assert_eq!(stream(Limits::default(), &chunks), whole, "chunks of {stride}");
        }
        assert_eq!(byte_at_a_time(Limits::default(), &all), whole);
    }

    #[test]
    fn incomplete_hint_covers_a_whole_bulk_payload() {
        let mut d = Decoder::default();
        let mut bytes = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$100\r\n".to_vec();
        let header = bytes.len();
        bytes.extend_from_slice(&[b'x'; 10]);
        assert_eq!(d.decode(&bytes), Ok(Decoded::Incomplete { needed: header + 100 + 2 }));
        // Without the header line's LF, only one more byte is known to be needed.
        assert_eq!(d.decode(&bytes[..header - 1]), Ok(Decoded::Incomplete { needed: header }));
        assert_eq!(d.decode(b""), Ok(Decoded::Incomplete { needed: 1 }));
    }

    #[test]
    fn pipelined_replies_decode_in_order() {
        // Real replies to PUBLISH×3, PING, SET, GET, GET missing, INCR on a string.
        let replies: &[u8] =
            b":0\r\n:0\r\n:0\r\n+PONG\r\n+OK\r\n$1\r\nv\r\n$-1\r\n-ERR value is not an integer or out of range\r\n";
        let out = one_shot(replies);
        let values: Vec<&str> = out.values.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(
            values,
            [
                "Integer(0)",
                "Integer(0)",
                "Integer(0)",
                r#"Simple("PONG")"#,
                r#"Simple("OK")"#,
                r#"Bulk("v")"#,
                "Null",
                r#"Error("ERR value is not an integer or out of range")"#
            ]
        );
        assert_eq!(out.end, End::Clean);
        assert_eq!(out.values.iter().map(|(_, n)| n).sum::<usize>(), replies.len());
    }

    /// `CLUSTER SHARDS` over RESP2, captured from a redis-server 7.0.15 cluster of 3 masters
    /// with 1 replica each, all online.
    const CLUSTER_SHARDS_RESP2: &str = "*3\r\n\
    *4\r\n$5\r\nslots\r\n*2\r\n:10923\r\n:16383\r\n$5\r\nnodes\r\n*2\r\n\
    *14\r\n$2\r\nid\r\n$40\r\ndbfdccfb3705960f7bc88719d7b1a2aa23154e24\r\n$4\r\nport\r\n:7313\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$18\r\nreplication-offset\r\n:14\r\n$6\r\nhealth\r\n$6\r\nonline\r\n\
    *14\r\n$2\r\nid\r\n$40\r\n0294d3ad556c2e98755393b0e294a99bf77b82c5\r\n$4\r\nport\r\n:7314\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$4\r\nrole\r\n$7\r\nreplica\r\n$18\r\nreplication-offset\r\n:14\r\n$6\r\nhealth\r\n$6\r\nonline\r\n\
    *4\r\n$5\r\nslots\r\n*2\r\n:0\r\n:5460\r\n$5\r\nnodes\r\n*2\r\n\
    *14\r\n$2\r\nid\r\n$40\r\n320d44dd917765efe78a0b3aa11148bda455adaa\r\n$4\r\nport\r\n:7311\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$18\r\nreplication-offset\r\n:14\r\n$6\r\nhealth\r\n$6\r\nonline\r\n\
    *14\r\n$2\r\nid\r\n$40\r\n1af55a1b90e45b90857f81b24d0255762b225ade\r\n$4\r\nport\r\n:7315\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$4\r\nrole\r\n$7\r\nreplica\r\n$18\r\nreplication-offset\r\n:14\r\n$6\r\nhealth\r\n$6\r\nonline\r\n\
    *4\r\n$5\r\nslots\r\n*2\r\n:5461\r\n:10922\r\n$5\r\nnodes\r\n*2\r\n\
    *14\r\n$2\r\nid\r\n$40\r\n60c2e05b89c32ce8765d1693b6d69fba9463a95e\r\n$4\r\nport\r\n:7312\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$18\r\nreplication-offset\r\n:14\r\n$6\r\nhealth\r\n$6\r\nonline\r\n\
    *14\r\n$2\r\nid\r\n$40\r\n06284113a61c4b4ba11fec52b5a1ef2581d0f501\r\n$4\r\nport\r\n:7316\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$4\r\nrole\r\n$7\r\nreplica\r\n$18\r\nreplication-offset\r\n:14\r\n$6\r\nhealth\r\n$6\r\nonline\r\n";

    /// `CLUSTER SHARDS` over RESP3 (after HELLO 3), captured from a redis-server 7.0.15 cluster of 3 masters
    /// with 1 replica each, all online.
    const CLUSTER_SHARDS_RESP3: &str = "*3\r\n\
    %2\r\n$5\r\nslots\r\n*2\r\n:10923\r\n:16383\r\n$5\r\nnodes\r\n*2\r\n\
    %7\r\n$2\r\nid\r\n$40\r\ndbfdccfb3705960f7bc88719d7b1a2aa23154e24\r\n$4\r\nport\r\n:7313\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$18\r\nreplication-offset\r\n:14\r\n$6\r\nhealth\r\n$6\r\nonline\r\n\
    %7\r\n$2\r\nid\r\n$40\r\n0294d3ad556c2e98755393b0e294a99bf77b82c5\r\n$4\r\nport\r\n:7314\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$4\r\nrole\r\n$7\r\nreplica\r\n$18\r\nreplication-offset\r\n:14\r\n$6\r\nhealth\r\n$6\r\nonline\r\n\
    %2\r\n$5\r\nslots\r\n*2\r\n:0\r\n:5460\r\n$5\r\nnodes\r\n*2\r\n\
    %7\r\n$2\r\nid\r\n$40\r\n320d44dd917765efe78a0b3aa11148bda455adaa\r\n$4\r\nport\r\n:7311\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$18\r\nreplication-offset\r\n:14\r\n$6\r\nhealth\r\n$6\r\nonline\r\n\
    %7\r\n$2\r\nid\r\n$40\r\n1af55a1b90e45b90857f81b24d0255762b225ade\r\n$4\r\nport\r\n:7315\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$4\r\nrole\r\n$7\r\nreplica\r\n$18\r\nreplication-offset\r\n:14\r\n$6\r\nhealth\r\n$6\r\nonline\r\n\
    %2\r\n$5\r\nslots\r\n*2\r\n:5461\r\n:10922\r\n$5\r\nnodes\r\n*2\r\n\
    %7\r\n$2\r\nid\r\n$40\r\n60c2e05b89c32ce8765d1693b6d69fba9463a95e\r\n$4\r\nport\r\n:7312\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$18\r\nreplication-offset\r\n:14\r\n$6\r\nhealth\r\n$6\r\nonline\r\n\
    %7\r\n$2\r\nid\r\n$40\r\n06284113a61c4b4ba11fec52b5a1ef2581d0f501\r\n$4\r\nport\r\n:7316\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$4\r\nrole\r\n$7\r\nreplica\r\n$18\r\nreplication-offset\r\n:14\r\n$6\r\nhealth\r\n$6\r\nonline\r\n";

    /// (slot range, [(port, role, health)]) per shard, from either reply shape: RESP2 sends
    /// each shard and node as a flat key/value array, RESP3 as a map; `pairs()` reads both.
    type Shard = ((i64, i64), Vec<(i64, String, String)>);

    fn shards(value: &Value<'_>) -> Vec<Shard> {
        let mut out = Vec::new();
        for shard in value.items().expect("an array of shards") {
            let mut slots = (-1, -1);
            let mut nodes = Vec::new();
            for (key, field) in shard.items().expect("shard fields").pairs() {
                match key.as_bytes().expect("field name") {
                    b"slots" => {
                        let range = field.items().expect("slot ranges");
                        slots =
                            (range.get(0).unwrap().as_integer().unwrap(), range.get(1).unwrap().as_integer().unwrap());
                    }
                    b"nodes" => {
                        for node in field.items().expect("nodes") {
                            let (mut port, mut role, mut health) = (0, String::new(), String::new());
                            for (k, v) in node.items().expect("node fields").pairs() {
                                match k.as_bytes().unwrap() {
                                    b"port" => port = v.as_integer().unwrap(),
                                    b"role" => role = String::from_utf8_lossy(v.as_bytes().unwrap()).into(),
                                    b"health" => health = String::from_utf8_lossy(v.as_bytes().unwrap()).into(),
                                    _ => {}
                                }
                            }
                            nodes.push((port, role, health));
                        }
                    }
                    _ => {}
                }
            }
            out.push((slots, nodes));
        }
        out
    }

    #[test]
    fn cluster_shards_from_a_real_cluster_in_both_protocols() {
        let expected = vec![
            ((10923, 16383), vec![(7313, "master".into(), "online".into()), (7314, "replica".into(), "online".into())]),
            ((0, 5460), vec![(7311, "master".into(), "online".into()), (7315, "replica".into(), "online".into())]),
            ((5461, 10922), vec![(7312, "master".into(), "online".into()), (7316, "replica".into(), "online".into())]),
        ];
        for reply in [CLUSTER_SHARDS_RESP2, CLUSTER_SHARDS_RESP3] {
            let bytes = reply.as_bytes();
            let mut d = Decoder::default();
            let Ok(Decoded::Complete { value, consumed }) = d.decode(bytes) else { panic!("not one value") };
            assert_eq!(consumed, bytes.len());
            assert_eq!(shards(&value), expected);
            let fed = byte_at_a_time(Limits::default(), bytes);
            assert_eq!(fed, one_shot(bytes));
            assert_eq!(fed.end, End::Clean);
            // A depth of 4 (shards, shard, nodes, node) is all it needs.
            let shallow = Limits { max_depth: 4, ..Limits::default() };
            assert_eq!(stream(shallow, &[bytes]), one_shot(bytes));
            assert_eq!(
                decode_err(Limits { max_depth: 3, ..Limits::default() }, bytes),
                ProtocolError::TooDeep { max: 3 }
            );
        }
    }

    #[test]
    fn pushes_captured_from_redis_are_classified() {
        // (bytes, expected pushes), RESP2 arrays and RESP3 pushes from redis-server 7.0.15.
        type Case<'a> = (&'a [u8], Vec<Push<'a>>);
        let payload: &[u8] = br#"{"a":1}"#;
        let cases: Vec<Case<'_>> = vec![
            (
                b"*3\r\n$9\r\nsubscribe\r\n$11\r\nuser_noti:1\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$12\r\ntopic_noti:t\r\n:2\r\n",
                vec![
                    Push::Subscription { kind: SubKind::Subscribe, channel: Some(b"user_noti:1"), count: 1 },
                    Push::Subscription { kind: SubKind::Subscribe, channel: Some(b"topic_noti:t"), count: 2 },
                ],
            ),
            (
                b"*3\r\n$10\r\npsubscribe\r\n$11\r\nuser_noti:*\r\n:3\r\n",
                vec![Push::Subscription { kind: SubKind::PSubscribe, channel: Some(b"user_noti:*"), count: 3 }],
            ),
            (
                b"*3\r\n$7\r\nmessage\r\n$11\r\nuser_noti:1\r\n$7\r\n{\"a\":1}\r\n*4\r\n$8\r\npmessage\r\n$11\r\nuser_noti:*\r\n$11\r\nuser_noti:1\r\n$7\r\n{\"a\":1}\r\n",
                vec![
                    Push::Message { channel: b"user_noti:1", payload },
                    Push::PMessage { pattern: b"user_noti:*", channel: b"user_noti:1", payload },
                ],
            ),
            (
                b">3\r\n$7\r\nmessage\r\n$11\r\nuser_noti:1\r\n$7\r\n{\"a\":1}\r\n>4\r\n$8\r\npmessage\r\n$11\r\nuser_noti:*\r\n$11\r\nuser_noti:1\r\n$7\r\n{\"a\":1}\r\n",
                vec![
                    Push::Message { channel: b"user_noti:1", payload },
                    Push::PMessage { pattern: b"user_noti:*", channel: b"user_noti:1", payload },
                ],
            ),
            (
                b"*2\r\n$4\r\npong\r\n$0\r\n\r\n*2\r\n$4\r\npong\r\n$2\r\nhi\r\n+PONG\r\n",
                vec![Push::Pong { payload: b"" }, Push::Pong { payload: b"hi" }, Push::Pong { payload: b"" }],
            ),
            (
                b"*3\r\n$11\r\nunsubscribe\r\n$12\r\ntopic_noti:t\r\n:2\r\n*3\r\n$12\r\npunsubscribe\r\n$11\r\nuser_noti:*\r\n:0\r\n*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n>3\r\n$11\r\nunsubscribe\r\n_\r\n:0\r\n",
                vec![
                    Push::Subscription { kind: SubKind::Unsubscribe, channel: Some(b"topic_noti:t"), count: 2 },
                    Push::Subscription { kind: SubKind::PUnsubscribe, channel: Some(b"user_noti:*"), count: 0 },
                    Push::Subscription { kind: SubKind::Unsubscribe, channel: None, count: 0 },
                    Push::Subscription { kind: SubKind::Unsubscribe, channel: None, count: 0 },
                ],
            ),
            // Cluster: SSUBSCRIBE, SPUBLISH, then the slot moved to another master
            // (CLUSTER SETSLOT … NODE) and the server unsubscribed the channel by itself.
            (
                b"*3\r\n$10\r\nssubscribe\r\n$11\r\nuser_noti:1\r\n:1\r\n*3\r\n$8\r\nsmessage\r\n$11\r\nuser_noti:1\r\n$23\r\n{\"type\":\"notification\"}\r\n*3\r\n$12\r\nsunsubscribe\r\n$11\r\nuser_noti:1\r\n:0\r\n",
                vec![
                    Push::Subscription { kind: SubKind::SSubscribe, channel: Some(b"user_noti:1"), count: 1 },
                    Push::SMessage { channel: b"user_noti:1", payload: br#"{"type":"notification"}"# },
                    Push::Subscription { kind: SubKind::SUnsubscribe, channel: Some(b"user_noti:1"), count: 0 },
                ],
            ),
            (
                b">3\r\n$10\r\nssubscribe\r\n$11\r\nuser_noti:1\r\n:1\r\n>3\r\n$8\r\nsmessage\r\n$11\r\nuser_noti:1\r\n$23\r\n{\"type\":\"notification\"}\r\n>3\r\n$12\r\nsunsubscribe\r\n$11\r\nuser_noti:1\r\n:0\r\n",
                vec![
                    Push::Subscription { kind: SubKind::SSubscribe, channel: Some(b"user_noti:1"), count: 1 },
                    Push::SMessage { channel: b"user_noti:1", payload: br#"{"type":"notification"}"# },
                    Push::Subscription { kind: SubKind::SUnsubscribe, channel: Some(b"user_noti:1"), count: 0 },
                ],
            ),
        ];
        let mut d = Decoder::default();
        for (bytes, expected) in cases {
            let mut pos = 0;
            let mut got = Vec::new();
            while pos < bytes.len() {
                let Ok(Decoded::Complete { value, consumed }) = d.decode(&bytes[pos..]) else { panic!("decode") };
                let push = classify_push(&value).unwrap_or_else(|| panic!("not a push: {value:?}"));
                // Compare by content; the classified slices borrow from `bytes`.
                got.push(format!("{push:?}"));
                pos += consumed;
            }
            let expected: Vec<String> = expected.iter().map(|p| format!("{p:?}")).collect();
            assert_eq!(got, expected);
        }
    }

    #[test]
    fn shapes_that_are_not_pushes_are_not_classified() {
        let not_pushes: &[&[u8]] = &[
            b":1\r\n",
            b"+OK\r\n",
            b"$4\r\npong\r\n",
            b"*0\r\n",
            b"*2\r\n$7\r\nmessage\r\n$2\r\nch\r\n",
            b"*4\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\np\r\n$1\r\nx\r\n",
            b"*3\r\n$7\r\nmessage\r\n:1\r\n$1\r\np\r\n",
            b"*3\r\n$8\r\npmessage\r\n$1\r\np\r\n$1\r\nc\r\n",
            b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n$1\r\n1\r\n",
            b"*3\r\n$9\r\nsubscribe\r\n*0\r\n:1\r\n",
            b"*3\r\n$10\r\ninvalidate\r\n$1\r\nk\r\n:1\r\n",
            b"*3\r\n:1\r\n$2\r\nch\r\n:1\r\n",
            b">2\r\n$16\r\nserver-cpu-usage\r\n:42\r\n",
            b"%1\r\n$7\r\nmessage\r\n$1\r\nx\r\n",
            b"*1\r\n$4\r\npong\r\n",
        ];
        let mut d = Decoder::default();
        for bytes in not_pushes {
            let Ok(Decoded::Complete { value, .. }) = d.decode(bytes) else { panic!() };
            assert_eq!(classify_push(&value), None, "{value:?}");
        }
        // Kind names are matched without regard to case.
        let Ok(Decoded::Complete { value, .. }) = d.decode(b"*3\r\n+MESSAGE\r\n+ch\r\n+p\r\n") else { panic!() };
        assert_eq!(classify_push(&value), Some(Push::Message { channel: b"ch", payload: b"p" }));
    }

    #[test]
    fn error_replies_are_classified() {
        let cases: &[(&[u8], ServerError<'_>)] = &[
            // Captured from redis-server 7.0.15 (cluster and standalone with ACLs).
            (b"MOVED 11811 127.0.0.1:7313", ServerError::Moved { slot: 11811, host: b"127.0.0.1", port: 7313 }),
            (b"ASK 11811 127.0.0.1:7311", ServerError::Ask { slot: 11811, host: b"127.0.0.1", port: 7311 }),
            (
                b"CROSSSLOT Keys in request don't hash to the same slot",
                ServerError::CrossSlot(b"CROSSSLOT Keys in request don't hash to the same slot"),
            ),
            (b"NOAUTH Authentication required.", ServerError::NoAuth(b"NOAUTH Authentication required.")),
            (
                b"WRONGPASS invalid username-password pair or user is disabled.",
                ServerError::Auth(b"WRONGPASS invalid username-password pair or user is disabled."),
            ),
            (
                b"NOPERM this user has no permissions to run the 'publish' command",
                ServerError::NoPerm(b"NOPERM this user has no permissions to run the 'publish' command"),
            ),
            (b"ERR DB index is out of range", ServerError::Other(b"ERR DB index is out of range")),
            // Texts from the Redis sources (server.c, cluster.c, acl.c of 5.0 to 7.2).
            (
                b"LOADING Redis is loading the dataset in memory",
                ServerError::Loading(b"LOADING Redis is loading the dataset in memory"),
            ),
            (b"ERR invalid password", ServerError::Auth(b"ERR invalid password")),
            (b"ERR Client sent AUTH, but no password is set", ServerError::Auth(b"ERR Client sent AUTH, but no password is set")),
            (
                b"ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
                ServerError::Auth(b"ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?"),
            ),
            (b"TRYAGAIN Multiple keys request during rehashing of slot", ServerError::TryAgain(b"TRYAGAIN Multiple keys request during rehashing of slot")),
            (b"CLUSTERDOWN Hash slot not served", ServerError::ClusterDown(b"CLUSTERDOWN Hash slot not served")),
            // Redirect shapes: unbracketed IPv6, a host name, an empty host (same host).
            (b"MOVED 0 ::1:7000", ServerError::Moved { slot: 0, host: b"::1", port: 7000 }),
            (b"MOVED 16383 redis-2.internal:6379", ServerError::Moved { slot: 16383, host: b"redis-2.internal", port: 6379 }),
            (b"ASK 5 :6380", ServerError::Ask { slot: 5, host: b"", port: 6380 }),
            // Malformed redirects are not acted on.
            (b"MOVED 16384 h:1", ServerError::Other(b"MOVED 16384 h:1")),
            (b"MOVED 1 h", ServerError::Other(b"MOVED 1 h")),
            (b"MOVED 1 h:65536", ServerError::Other(b"MOVED 1 h:65536")),
            (b"MOVED x h:1", ServerError::Other(b"MOVED x h:1")),
            (b"MOVED", ServerError::Other(b"MOVED")),
            (b"MOVED 1 a b:1", ServerError::Other(b"MOVED 1 a b:1")),
            (b"moved 1 h:1", ServerError::Other(b"moved 1 h:1")),
            (b"", ServerError::Other(b"")),
            (b"ERR", ServerError::Other(b"ERR")),
            (b"WRONGTYPE Operation against a key", ServerError::Other(b"WRONGTYPE Operation against a key")),
        ];
        for (text, expected) in cases {
            assert_eq!(classify_error(text), *expected, "{}", text.escape_ascii());
        }
        // Through a decoded value, simple and bulk errors alike.
        let mut d = Decoder::default();
        let Ok(Decoded::Complete { value, .. }) = d.decode(b"-MOVED 3999 127.0.0.1:6381\r\n") else { panic!() };
        assert_eq!(value.error(), Some(ServerError::Moved { slot: 3999, host: b"127.0.0.1", port: 6381 }));
        let Ok(Decoded::Complete { value, .. }) = d.decode(b"!16\r\nNOAUTH need AUTH\r\n") else { panic!() };
        assert_eq!(value.error(), Some(ServerError::NoAuth(b"NOAUTH need AUTH")));
        let Ok(Decoded::Complete { value, .. }) = d.decode(b"+MOVED 1 h:1\r\n") else { panic!() };
        assert_eq!(value.error(), None);
    }

    #[test]
    fn malformed_input_is_a_typed_error_for_every_kind() {
        let d = Limits::default();
        let cases: &[(&[u8], ProtocolError)] = &[
            (b"?\r\n", ProtocolError::UnknownType(b'?')),
            (b"\r\n", ProtocolError::UnknownType(b'\r')),
            (b";4\r\nabcd\r\n", ProtocolError::UnknownType(b';')),
            (b"*1\r\n.\r\n", ProtocolError::UnknownType(b'.')),
            (b"+OK\n", ProtocolError::MissingCrlf),
            (b"+OK\rX", ProtocolError::MissingCrlf),
            (b"+O\nK\r\n", ProtocolError::MissingCrlf),
            (b":1\n", ProtocolError::MissingCrlf),
            (b"$2\r\nabc\r\n", ProtocolError::MissingCrlf),
            (b"$2\r\nab\n\r", ProtocolError::MissingCrlf),
            (b"*1\r\n$1\r\nab\r\n", ProtocolError::MissingCrlf),
            (b"$abc\r\n", ProtocolError::BadLength),
            (b"$\r\n", ProtocolError::BadLength),
            (b"$-2\r\n", ProtocolError::BadLength),
            (b"$-0\r\n", ProtocolError::BadLength),
            (b"$+1\r\n", ProtocolError::BadLength),
            (b"$ 1\r\n", ProtocolError::BadLength),
            (b"$99999999999999999999\r\n", ProtocolError::BadLength),
            (b"*1x\r\n", ProtocolError::BadLength),
            (b"%-1\r\n", ProtocolError::BadLength),
            (b"~-1\r\n", ProtocolError::BadLength),
            (b">-1\r\n", ProtocolError::BadLength),
            (b"!-1\r\n", ProtocolError::BadLength),
            (b"=-1\r\n", ProtocolError::BadLength),
            (b"%9223372036854775808\r\n", ProtocolError::BadLength),
            (b":\r\n", ProtocolError::BadInteger),
            (b":-\r\n", ProtocolError::BadInteger),
            (b":1a\r\n", ProtocolError::BadInteger),
            (b": 1\r\n", ProtocolError::BadInteger),
            (b":9223372036854775808\r\n", ProtocolError::BadInteger),
            (b":-9223372036854775809\r\n", ProtocolError::BadInteger),
            (b"(\r\n", ProtocolError::BadInteger),
            (b"(12a\r\n", ProtocolError::BadInteger),
            (b"(-\r\n", ProtocolError::BadInteger),
            (b",\r\n", ProtocolError::BadDouble),
            (b",abc\r\n", ProtocolError::BadDouble),
            (b",1.5x\r\n", ProtocolError::BadDouble),
            (b",\xff\r\n", ProtocolError::BadDouble),
            (b"#x\r\n", ProtocolError::BadBoolean),
            (b"#tt\r\n", ProtocolError::BadBoolean),
            (b"#\r\n", ProtocolError::BadBoolean),
            (b"_x\r\n", ProtocolError::BadNull),
            (b"=3\r\ntxt\r\n", ProtocolError::BadVerbatim),
            (b"=5\r\ntxtab\r\n", ProtocolError::BadVerbatim),
            (b"$?\r\n", ProtocolError::Streamed),
            (b"*?\r\n", ProtocolError::Streamed),
            (b"*3\r\n:1\r\n:2\r\n#?\r\n", ProtocolError::BadBoolean),
        ];
        for (bytes, expected) in cases {
            assert_eq!(decode_err(d, bytes), *expected, "{:?}", bytes.escape_ascii().to_string());
            // A prefix is never a different error: either still incomplete or the same one.
            for cut in 0..bytes.len() {
                let mut dec = Decoder::new(d);
                match dec.decode(&bytes[..cut]) {
                    Ok(Decoded::Incomplete { .. }) => {}
                    Err(e) => assert_eq!(e, *expected, "prefix {cut} of {:?}", bytes.escape_ascii().to_string()),
                    Ok(other) => panic!("prefix {cut} of {:?}: {other:?}", bytes.escape_ascii().to_string()),
                }
            }
            // Streaming gets there too, and never yields a value from the bad bytes.
            assert_eq!(byte_at_a_time(d, bytes), Outcome { values: vec![], end: End::Error(*expected) });
        }
        // Every message is one line.
        for (_, e) in cases {
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn bulk_length_limit_holds_before_the_payload_arrives() {
        let limits = Limits::with_max_bulk(16);
        assert_eq!(stream(limits, &[b"$16\r\n0123456789abcdef\r\n"]).end, End::Clean);
        // Refused from the header alone: nothing waits for (or buffers) 17 bytes.
        assert_eq!(decode_err(limits, b"$17\r\n"), ProtocolError::BulkTooLarge { len: 17, max: 16 });
        assert_eq!(decode_err(limits, b"*2\r\n$1\r\na\r\n!17\r\n"), ProtocolError::BulkTooLarge { len: 17, max: 16 });
        assert_eq!(decode_err(limits, b"=17\r\n"), ProtocolError::BulkTooLarge { len: 17, max: 16 });
        // The hard maximum wins over a larger request.
        let huge = Limits { max_bulk: usize::MAX, max_depth: 1000, ..Limits::default() };
        assert_eq!(Decoder::new(huge).limits().max_bulk, HARD_MAX_BULK);
        assert_eq!(Decoder::new(huge).limits().max_depth, HARD_MAX_DEPTH);
        let over = format!("${}\r\n", HARD_MAX_BULK + 1);
        assert_eq!(
            decode_err(huge, over.as_bytes()),
            ProtocolError::BulkTooLarge { len: HARD_MAX_BULK as u64 + 1, max: HARD_MAX_BULK }
        );
        let at = format!("${HARD_MAX_BULK}\r\n");
        let mut d = Decoder::new(huge);
        assert_eq!(d.decode(at.as_bytes()), Ok(Decoded::Incomplete { needed: at.len() + HARD_MAX_BULK + 2 }));
    }

    #[test]
    fn element_count_limit_holds_before_the_elements_arrive() {
        let limits = Limits { max_elements: 4, ..Limits::default() };
        assert_eq!(stream(limits, &[b"*4\r\n:1\r\n:2\r\n:3\r\n:4\r\n"]).end, End::Clean);
        assert_eq!(stream(limits, &[b"%2\r\n:1\r\n:2\r\n:3\r\n:4\r\n"]).end, End::Clean);
        assert_eq!(decode_err(limits, b"*5\r\n"), ProtocolError::TooManyElements { count: 5, max: 4 });
        assert_eq!(decode_err(limits, b"~5\r\n"), ProtocolError::TooManyElements { count: 5, max: 4 });
        assert_eq!(decode_err(limits, b">5\r\n"), ProtocolError::TooManyElements { count: 5, max: 4 });
        // A map of n pairs holds 2n values.
        assert_eq!(decode_err(limits, b"%3\r\n"), ProtocolError::TooManyElements { count: 6, max: 4 });
        assert_eq!(decode_err(limits, b"|3\r\n"), ProtocolError::TooManyElements { count: 6, max: 4 });
        assert_eq!(decode_err(limits, b"*1\r\n*5\r\n"), ProtocolError::TooManyElements { count: 5, max: 4 });
        // A count far beyond the input is refused without reserving anything for it.
        let d = Limits::default();
        assert_eq!(
            decode_err(d, b"*18446744073709551615\r\n"),
            ProtocolError::TooManyElements { count: u64::MAX, max: d.max_elements }
        );
    }

    #[test]
    fn nesting_limit_holds() {
        fn nested(depth: usize) -> Vec<u8> {
            let mut v = b"*1\r\n".repeat(depth);
            v.extend_from_slice(b":7\r\n");
            v
        }
        let d = Limits::default();
        assert_eq!(d.max_depth, 32);
        assert_eq!(stream(d, &[&nested(32)]).end, End::Clean);
        assert_eq!(decode_err(d, &nested(33)), ProtocolError::TooDeep { max: 32 });
        // Far deeper input is refused at the limit, not after recursing through it.
        assert_eq!(decode_err(d, &nested(100_000)), ProtocolError::TooDeep { max: 32 });
        let two = Limits { max_depth: 2, ..d };
        assert_eq!(stream(two, &[b"*1\r\n%1\r\n:1\r\n:2\r\n"]).end, End::Clean);
        assert_eq!(decode_err(two, b"*1\r\n*1\r\n*0\r\n"), ProtocolError::TooDeep { max: 2 });
        // Attributes count as a level; scalars do not.
        assert_eq!(decode_err(two, b"*1\r\n*1\r\n|1\r\n"), ProtocolError::TooDeep { max: 2 });
        assert_eq!(stream(two, &[b"*1\r\n|1\r\n:1\r\n:2\r\n:3\r\n"]).end, End::Clean);
        let zero = Limits { max_depth: 0, ..d };
        assert_eq!(stream(zero, &[b":1\r\n$1\r\nx\r\n"]).end, End::Clean);
        assert_eq!(decode_err(zero, b"*0\r\n"), ProtocolError::TooDeep { max: 0 });
    }

    #[test]
    fn line_length_limits_hold_without_waiting_for_the_crlf() {
        let limits = Limits { max_line: 8, ..Limits::default() };
        assert_eq!(stream(limits, &[b"+12345678\r\n-12345678\r\n,1.250000\r\n(12345678\r\n"]).end, End::Clean);
        for head in [b'+', b'-', b',', b'('] {
            let mut long = vec![head];
            long.extend_from_slice(b"123456789");
            assert_eq!(decode_err(limits, &long), ProtocolError::LineTooLong { max: 8 });
            long.extend_from_slice(b"\r\n");
            assert_eq!(decode_err(limits, &long), ProtocolError::LineTooLong { max: 8 });
        }
        // Numbers, lengths, booleans and nulls have their own short cap, whatever max_line is.
        let long_number = [b":".as_slice(), &[b'1'; 33]].concat();
        assert_eq!(decode_err(limits, &long_number), ProtocolError::LineTooLong { max: MAX_NUMBER_LINE });
        let long_len = [b"$".as_slice(), &[b'0'; 33]].concat();
        assert_eq!(decode_err(Limits::default(), &long_len), ProtocolError::LineTooLong { max: MAX_NUMBER_LINE });
        // Leading zeros are still a number.
        assert_eq!(decode_one(b"$0000000000000000000000000000003\r\nabc\r\n"), r#"Bulk("abc")"#);
    }

    #[test]
    fn hot_path_reuses_the_tape() {
        let mut bytes = Vec::new();
        for i in 0..1000 {
            let payload = format!("{{\"n\":{i}}}");
            encode_command(&mut bytes, [b"message".as_slice(), b"user_noti:42", payload.as_bytes()]);
            encode_command(&mut bytes, [b"pmessage".as_slice(), b"user_noti:*", b"user_noti:42", payload.as_bytes()]);
        }
        let mut d = Decoder::default();
        let before = d.tape_identity();
        let mut pos = 0;
        let mut n = 0;
        while pos < bytes.len() {
            let Ok(Decoded::Complete { value, consumed }) = d.decode(&bytes[pos..]) else { panic!() };
            assert!(classify_push(&value).is_some());
            pos += consumed;
            n += 1;
        }
        assert_eq!(n, 2000);
        assert_eq!(d.tape_identity(), before, "decoding pub/sub messages reallocated the tape");
        // A big reply grows the tape; the next value trims it back.
        let mut big = Vec::new();
        encode_command(&mut big, (0..5000).map(|i| i.to_string()));
        let Ok(Decoded::Complete { .. }) = d.decode(&big) else { panic!() };
        assert!(d.tape_identity().1 > TAPE_KEEP);
        let Ok(Decoded::Complete { .. }) = d.decode(b":1\r\n") else { panic!() };
        assert!(d.tape_identity().1 <= TAPE_KEEP);
    }

    #[test]
    fn commands_encode_to_the_exact_bytes() {
        let mut out = Vec::new();
        encode_command(&mut out, ["SET", "k", "v"]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n");
        out.clear();
        encode_publish(&mut out, b"user_noti:1", b"a\r\nb");
        assert_eq!(out, b"*3\r\n$7\r\nPUBLISH\r\n$11\r\nuser_noti:1\r\n$4\r\na\r\nb\r\n");
        out.clear();
        encode_spublish(&mut out, b"c", b"");
        assert_eq!(out, b"*3\r\n$8\r\nSPUBLISH\r\n$1\r\nc\r\n$0\r\n\r\n");
        out.clear();
        let channels = vec!["user_noti:1".to_string(), "topic_noti:t".to_string()];
        encode_subscription(&mut out, SubKind::SSubscribe, &channels);
        assert_eq!(out, b"*3\r\n$10\r\nSSUBSCRIBE\r\n$11\r\nuser_noti:1\r\n$12\r\ntopic_noti:t\r\n");
        out.clear();
        encode_subscription(&mut out, SubKind::PUnsubscribe, std::iter::empty::<&[u8]>());
        assert_eq!(out, b"*1\r\n$12\r\nPUNSUBSCRIBE\r\n");
        out.clear();
        encode_command_with(&mut out, b"CLUSTER", [b"SHARDS"]);
        assert_eq!(out, b"*2\r\n$7\r\nCLUSTER\r\n$6\r\nSHARDS\r\n");
        // Appending pipelines: two commands, one buffer, nothing else in between.
        encode_command(&mut out, ["PING"]);
        assert_eq!(out, b"*2\r\n$7\r\nCLUSTER\r\n$6\r\nSHARDS\r\n*1\r\n$4\r\nPING\r\n");
        // Every SubKind names its command, and the push names match them.
        for kind in [
            SubKind::Subscribe,
            SubKind::PSubscribe,
            SubKind::SSubscribe,
            SubKind::Unsubscribe,
            SubKind::PUnsubscribe,
            SubKind::SUnsubscribe,
        ] {
            assert_eq!(SubKind::from_push_name(&kind.command().to_ascii_lowercase()), Some(kind));
            assert_eq!(
                kind.is_subscribe(),
                !kind.command().starts_with(b"UNS") && !kind.command()[1..].starts_with(b"UNS")
            );
        }
    }

    #[test]
    fn encode_then_decode_round_trips() {
        // Commands: an array of the same bulk strings, binary-safe.
        let args: Vec<Vec<u8>> = vec![b"PUBLISH".to_vec(), vec![0, 13, 10, 255], Vec::new(), vec![b'x'; 70_000]];
        let mut out = Vec::new();
        encode_command(&mut out, &args);
        let mut d = Decoder::default();
        let Ok(Decoded::Complete { value, consumed }) = d.decode(&out) else { panic!() };
        assert_eq!(consumed, out.len());
        let back: Vec<&[u8]> = value.items().unwrap().iter().map(|v| v.as_bytes().unwrap()).collect();
        assert_eq!(back, args.iter().map(|a| a.as_slice()).collect::<Vec<_>>());
        // Every value type: decode, re-encode, decode again: equal values.
        for (bytes, expected) in EVERY_TYPE.iter().copied().chain([(CLUSTER_SHARDS_RESP3.as_bytes(), "")]) {
            let mut d1 = Decoder::default();
            let Ok(Decoded::Complete { value, .. }) = d1.decode(bytes) else { panic!() };
            let mut re = Vec::new();
            encode_value(&mut re, &value);
            let mut d2 = Decoder::default();
            let Ok(Decoded::Complete { value: again, consumed }) = d2.decode(&re) else { panic!() };
            assert_eq!(consumed, re.len());
            assert_eq!(format!("{again:?}"), format!("{value:?}"));
            if !expected.contains("NaN") {
                assert_eq!(again, value);
            }
        }
        // Doubles survive exactly, extremes included.
        for x in [0.1, -0.0, 1e300, f64::MIN_POSITIVE, 5e-324, f64::MAX, 123456789.125] {
            let mut re = Vec::new();
            encode_value(&mut re, &Value::Double(x));
            let mut d = Decoder::default();
            let Ok(Decoded::Complete { value: Value::Double(y), .. }) = d.decode(&re) else { panic!() };
            assert_eq!(x.to_bits(), y.to_bits(), "{x}");
        }
        let mut re = Vec::new();
        encode_value(&mut re, &Value::Integer(i64::MIN));
        assert_eq!(re, b":-9223372036854775808\r\n");
    }

    /// A real redis-server on a free port, killed on drop.
    pub(crate) struct LiveRedis {
        child: Child,
        pub(crate) port: u16,
    }

    impl LiveRedis {
        pub(crate) fn start(extra: &[&str]) -> LiveRedis {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed");
            let redis = LiveRedis { child, port };
            let deadline = Instant::now() + Duration::from_secs(10);
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "redis-server did not listen on {port}");
                std::thread::sleep(Duration::from_millis(20));
            }
            redis
        }

        pub(crate) fn connect(&self) -> TcpStream {
            let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        }
    }

    impl Drop for LiveRedis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Reads until `count` values are decoded (or the read timeout fails the test); returns
    /// their Debug forms.
    pub(crate) fn read_values(sock: &mut TcpStream, decoder: &mut Decoder, count: usize) -> Vec<String> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        while out.len() < count {
            while let Decoded::Complete { value, consumed } =
                decoder.decode(&buf).expect("valid RESP from redis-server")
            {
                out.push(format!("{value:?}"));
                buf.drain(..consumed);
                if out.len() == count {
                    assert!(buf.is_empty(), "more bytes than values");
                    return out;
                }
            }
            let n = sock.read(&mut chunk).expect("redis-server answered in time");
            assert!(n > 0, "redis-server closed the connection");
            buf.extend_from_slice(&chunk[..n]);
        }
        out
    }

    #[test]
    fn live_redis_pipelines_and_pushes() {
        let redis = LiveRedis::start(&[]);
        let mut d = Decoder::new(Limits::with_max_bulk(1 << 20));
        // Subscriber over RESP2, another over RESP3.
        let mut sub2 = redis.connect();
        let mut out = Vec::new();
        encode_subscription(&mut out, SubKind::Subscribe, ["user_noti:1", "user_noti:2"]);
        encode_subscription(&mut out, SubKind::PSubscribe, ["topic_noti:*"]);
        sub2.write_all(&out).unwrap();
        assert_eq!(read_values(&mut sub2, &mut d, 3).len(), 3);
        let mut sub3 = redis.connect();
        out.clear();
        encode_command(&mut out, ["HELLO", "3"]);
        encode_subscription(&mut out, SubKind::Subscribe, ["user_noti:1"]);
        sub3.write_all(&out).unwrap();
        let hello = read_values(&mut sub3, &mut d, 2);
        assert!(hello[0].starts_with("Map[Bulk(\"server\"), Bulk(\"redis\")"), "{}", hello[0]);
        assert_eq!(hello[1], r#"Push[Bulk("subscribe"), Bulk("user_noti:1"), Integer(1)]"#);
        // One write of 64 PUBLISHes (plus a payload with CRLF and binary bytes): 64 replies in order.
        let mut publisher = redis.connect();
        out.clear();
        for i in 0..64 {
            let channel = if i % 2 == 0 { "user_noti:1" } else { "topic_noti:x" };
            encode_publish(&mut out, channel.as_bytes(), format!("payload {i}\r\n\0\u{ff}").as_bytes());
        }
        publisher.write_all(&out).unwrap();
        let replies = read_values(&mut publisher, &mut d, 64);
        for (i, r) in replies.iter().enumerate() {
            let receivers = if i % 2 == 0 { 2 } else { 1 };
            assert_eq!(*r, format!("Integer({receivers})"));
        }
        // RESP2 subscriber: 32 `message`s and 32 `pmessage`s, in publish order, classified.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut seen = 0;
        while seen < 64 {
            let n = sub2.read(&mut chunk).unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
            let mut pos = 0;
            while let Ok(Decoded::Complete { value, consumed }) = d.decode(&buf[pos..]) {
                let payload = format!("payload {seen}\r\n\0\u{ff}");
                let expected = if seen % 2 == 0 {
                    Push::Message { channel: b"user_noti:1", payload: payload.as_bytes() }
                } else {
                    Push::PMessage { pattern: b"topic_noti:*", channel: b"topic_noti:x", payload: payload.as_bytes() }
                };
                assert_eq!(classify_push(&value), Some(expected));
                pos += consumed;
                seen += 1;
            }
            buf.drain(..pos);
        }
        // RESP3 subscriber: the same messages as pushes.
        let got = read_values(&mut sub3, &mut d, 32);
        assert_eq!(got[0], r#"Push[Bulk("message"), Bulk("user_noti:1"), Bulk("payload 0\r\n\x00\xc3\xbf")]"#);
        // PING while subscribed, then unsubscribe everything.
        out.clear();
        encode_command(&mut out, ["PING"]);
        encode_subscription(&mut out, SubKind::Unsubscribe, std::iter::empty::<&str>());
        sub2.write_all(&out).unwrap();
        let got = read_values(&mut sub2, &mut d, 3);
        assert_eq!(got[0], r#"Array[Bulk("pong"), Bulk("")]"#);
        assert!(got[1].starts_with(r#"Array[Bulk("unsubscribe"), Bulk("user_noti:"#));
    }
}
