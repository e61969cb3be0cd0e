//! The Server-Sent Events wire format (`text/event-stream`, HTML Living Standard §9.2):
//! encoding only, no I/O and no other herald module, so [`crate::frame`] can build the shared
//! event-stream form of a notification from here.
//!
//! An event is an optional `id:` line, one `data:` line per line of the payload, and a blank
//! line that dispatches it. A line starting with `:` is a comment: the client ignores it, which
//! makes it the keepalive.

/// The path of the event stream.
pub const PATH: &str = "/sse";

/// Milliseconds an EventSource waits before reconnecting after the stream ends; sent first.
pub const RETRY_MS: u32 = 2000;

/// The first bytes of every stream: the reconnection delay, and a blank line (which dispatches
/// nothing, since no data came before it).
pub fn preamble() -> Vec<u8> {
    format!("retry: {RETRY_MS}\n\n").into_bytes()
}

/// The keepalive: a comment, invisible to EventSource, that keeps proxies from timing the
/// stream out and makes the kernel find a dead peer.
pub const PING: &[u8] = b": ping\n\n";

/// Encodes one event carrying `payload` (a notification's JSON, exactly as the WebSocket frame
/// carries it), with an `id:` line when `id` is given.
///
/// The event-stream format ends a line at CR, LF or CRLF and has no escape, so a payload with
/// line breaks is split into several `data:` lines; the client joins them with LF. (JSON from
/// herald has none: its strings escape them.) An id cannot contain a line break or NUL
/// (the client would end the line there, or ignore the field): those bytes are left out.
pub fn encode_event(payload: &[u8], id: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8 + id.map_or(0, |id| id.len() + 5));
    if let Some(id) = id {
        out.extend_from_slice(b"id: ");
        out.extend(id.bytes().filter(|b| !matches!(b, b'\r' | b'\n' | 0)));
        out.push(b'\n');
    }
    for line in lines(payload) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

/// A comment line (`: text`) with a blank line after it, for the last words of a stream
/// (`: close token expired`). Line breaks in `text` become spaces: a comment is one line.
pub fn comment(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 4);
    out.extend_from_slice(b": ");
    out.extend(text.bytes().map(|b| if matches!(b, b'\r' | b'\n') { b' ' } else { b }));
    out.extend_from_slice(b"\n\n");
    out
}

/// The lines of `payload` as the event-stream parser would see them: split at CRLF, CR or LF.
/// An empty payload is one empty line (an event with empty data).
fn lines(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(payload);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.iter().position(|&b| b == b'\r' || b == b'\n') {
            None => {
                rest = None;
                Some(current)
            }
            Some(i) => {
                let skip = if current[i] == b'\r' && current.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
                rest = Some(&current[i + skip..]);
                Some(&current[..i])
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client side of the format, per the HTML standard's event-stream interpretation:
    /// the data of each dispatched event, and the last event id seen with it.
    fn parse(stream: &[u8]) -> Vec<(String, Option<String>)> {
        let text = std::str::from_utf8(stream).unwrap();
        let normalized = text.replace("\r\n", "\n").replace('\r', "\n");
        let (mut events, mut data, mut id) = (Vec::new(), String::new(), None::<String>);
        for line in normalized.split('\n') {
            if line.is_empty() {
                if let Some(d) = data.strip_suffix('\n') {
                    events.push((d.to_owned(), id.clone()));
                }
                data.clear();
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "data" => {
                    data.push_str(value);
                    data.push('\n');
                }
                "id" if !value.contains('\0') => id = Some(value.to_owned()),
                _ => {}
            }
        }
        events
    }

    #[test]
    fn a_json_notification_is_one_data_line() {
        let json = br#"{"type":"notification","payload":{"title":"a: b"}}"#;
        let event = encode_event(json, None);
        assert_eq!(event, [&b"data: "[..], json, b"\n\n"].concat());
        assert_eq!(parse(&event), vec![(String::from_utf8(json.to_vec()).unwrap(), None)]);
    }

    #[test]
    fn an_id_comes_first_and_cannot_break_its_line() {
        let event = encode_event(b"{}", Some("q7kz2m4t:42"));
        assert_eq!(event, b"id: q7kz2m4t:42\ndata: {}\n\n");
        let hostile = encode_event(b"{}", Some("1\r\ndata: injected\n\0"));
        assert_eq!(hostile, b"id: 1data: injected\ndata: {}\n\n");
        assert_eq!(parse(&hostile), vec![("{}".to_string(), Some("1data: injected".to_string()))]);
    }

    #[test]
    fn every_kind_of_line_break_splits_the_data() {
        for (payload, joined) in [
            (&b"a\nb"[..], "a\nb"),
            (b"a\r\nb", "a\nb"),
            (b"a\rb", "a\nb"),
            (b"a\n\nb", "a\n\nb"),
            (b"a\n", "a\n"),
            (b"\ra", "\na"),
            (b"\r\n\r", "\n\n"),
        ] {
            let event = encode_event(payload, None);
            // Nothing but the final blank line may end an event early.
            assert!(!event[..event.len() - 1].windows(2).any(|w| w == b"\n\n"), "{event:?}");
            assert!(!event.contains(&b'\r'), "{event:?}");
            assert_eq!(parse(&event), vec![(joined.to_string(), None)], "payload {payload:?}");
        }
    }

    #[test]
    fn an_empty_payload_is_an_event_with_empty_data() {
        assert_eq!(encode_event(b"", None), b"data: \n\n");
    }

    #[test]
    fn comments_are_one_line() {
        assert_eq!(comment("close token expired"), b": close token expired\n\n");
        assert_eq!(comment("a\r\nb"), b": a  b\n\n");
        assert!(parse(&comment("x\ndata: no")).is_empty());
        assert!(parse(PING).is_empty());
        assert!(parse(&preamble()).is_empty());
    }
}
