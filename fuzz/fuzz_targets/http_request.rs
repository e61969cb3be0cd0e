//! Request bytes → `http::parse_request`, the parser every connection starts with.
//!
//! Invariants: never panics; `consumed` never exceeds the input; the body is exactly the
//! bytes after the head; a complete request parses the same from exactly its own bytes and
//! with more bytes after it (pipelining); a request that completes never looked like an error
//! while its bytes were still arriving (the event loop re-parses on every read, so an error on
//! a prefix would refuse a valid request split across TCP segments); size limits hold.
#![no_main]

use herald::http::{MAX_BODY_BYTES, MAX_HEAD_BYTES, Parsed, Request, parse_request};
use libfuzzer_sys::fuzz_target;

fn check_request(data: &[u8], request: &Request, consumed: usize) {
    assert!(consumed <= data.len(), "consumed {consumed} > input {}", data.len());
    assert!(request.body.len() <= MAX_BODY_BYTES);
    let head_len = consumed - request.body.len();
    assert!(head_len <= MAX_HEAD_BYTES, "head of {head_len} bytes accepted");
    assert_eq!(request.body, data[head_len..consumed], "body is not the bytes after the head");
    assert!(data[..head_len].ends_with(b"\n"), "head does not end at a line break");
    assert!(!request.path.contains('?'), "query left in path {:?}", request.path);
    // Everything the request carries came from the head.
    for text in [Some(&request.path), request.query.as_ref(), request.authorization.as_ref(), request.host.as_ref()]
        .into_iter()
        .flatten()
    {
        assert!(text.len() <= head_len);
    }
}

fn same(a: &Parsed, b: &Parsed) -> bool {
    match (a, b) {
        (Parsed::Partial, Parsed::Partial) => true,
        (Parsed::Error(x), Parsed::Error(y)) => x == y,
        (Parsed::Complete { request: r1, consumed: c1 }, Parsed::Complete { request: r2, consumed: c2 }) => {
            c1 == c2 && format!("{r1:?}") == format!("{r2:?}")
        }
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let parsed = parse_request(data);
    match &parsed {
        Parsed::Complete { request, consumed } => {
            let consumed = *consumed;
            check_request(data, request, consumed);
            // Exactly its own bytes, and with a pipelined request behind it.
            let exact = parse_request(&data[..consumed]);
            assert!(same(&parsed, &exact), "request parses differently from its own bytes: {exact:?}");
            let mut more = data.to_vec();
            more.extend_from_slice(b"GET /health HTTP/1.1\r\n\r\n");
            assert!(same(&parsed, &parse_request(&more)), "trailing bytes changed the request");
            // Prefixes, as the bytes arrive: never complete early, never an error.
            let head_len = consumed - request.body.len();
            let mut cuts = vec![consumed - 1, head_len.saturating_sub(1), head_len / 2, 1];
            cuts.retain(|&c| c < consumed);
            for cut in cuts {
                match parse_request(&data[..cut]) {
                    Parsed::Partial => {}
                    other => panic!("prefix of {cut}/{consumed} bytes of a valid request gave {other:?}"),
                }
            }
        }
        Parsed::Partial => {
            // Waiting is only allowed while the head or a bounded body may still be arriving.
            assert!(data.len() < MAX_HEAD_BYTES + MAX_BODY_BYTES, "partial after {} bytes", data.len());
        }
        Parsed::Error(status) => {
            assert!((400..500).contains(&status.0), "parser produced status {status:?}");
        }
    }
});
