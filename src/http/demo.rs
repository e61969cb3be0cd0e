//! The browser side, embedded in the binary: `GET /` (the demo page), `GET /herald.js` (the
//! client module the page is built on, for any page to import) and `GET /favicon.ico`.
//!
//! The page's style and script are inline, so the page is one request and needs no other
//! route; its Content-Security-Policy allows exactly those two by their SHA-256 hashes, so
//! nothing else inline can run, whatever a notification contains.

use std::sync::LazyLock;

use ring::digest;

use super::{Request, Response, Status};

/// The client module, as served at `/herald.js`.
pub const HERALD_JS: &str = include_str!("assets/herald.js");
const PAGE_TEMPLATE: &str = include_str!("assets/demo.html");
const PAGE_CSS: &str = include_str!("assets/demo.css");
const PAGE_JS: &str = include_str!("assets/demo.js");
const FAVICON: &str = include_str!("assets/favicon.svg");

/// Browsers may reuse `/herald.js` this long before revalidating it with its ETag.
const HERALD_JS_CACHE: &str = "public, max-age=300";
const FAVICON_CACHE: &str = "public, max-age=86400";

struct Page {
    html: String,
    csp: String,
}

static PAGE: LazyLock<Page> = LazyLock::new(|| Page {
    html: PAGE_TEMPLATE.replacen("{{style}}", PAGE_CSS, 1).replacen("{{script}}", PAGE_JS, 1),
    csp: format!(
        "default-src 'self'; script-src 'self' 'sha256-{}'; style-src 'sha256-{}'; img-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        base64(digest::digest(&digest::SHA256, PAGE_JS.as_bytes()).as_ref()),
        base64(digest::digest(&digest::SHA256, PAGE_CSS.as_bytes()).as_ref()),
    ),
});

static HERALD_JS_ETAG: LazyLock<String> = LazyLock::new(|| etag(HERALD_JS));
static FAVICON_ETAG: LazyLock<String> = LazyLock::new(|| etag(FAVICON));

/// `GET /`.
pub fn page() -> Response {
    Response::text(Status::OK, "text/html; charset=utf-8", PAGE.html.as_bytes())
        .header("Content-Security-Policy", PAGE.csp.as_str())
        .header("X-Content-Type-Options", "nosniff")
        .header("Referrer-Policy", "no-referrer")
}

/// `GET /herald.js`. Any origin may import it: it is public code and carries no credentials.
pub fn herald_js(req: &Request) -> Response {
    cacheable(req, "text/javascript; charset=utf-8", HERALD_JS, &HERALD_JS_ETAG, HERALD_JS_CACHE)
        .header("Access-Control-Allow-Origin", "*")
}

/// `GET /favicon.ico`: an SVG (browsers go by the Content-Type, not the name), so that no
/// page of herald's gets a 404 in its console.
pub fn favicon(req: &Request) -> Response {
    cacheable(req, "image/svg+xml", FAVICON, &FAVICON_ETAG, FAVICON_CACHE)
}

fn cacheable(req: &Request, content_type: &'static str, body: &str, etag: &str, cache: &'static str) -> Response {
    let response = if req.if_none_match.as_deref().is_some_and(|tags| matches_etag(tags, etag)) {
        Response::text(Status::NOT_MODIFIED, content_type, Vec::new())
    } else {
        Response::text(Status::OK, content_type, body.as_bytes())
    };
    response.cache(cache).header("ETag", etag).header("X-Content-Type-Options", "nosniff")
}

/// A strong validator: the first 128 bits of the content's SHA-256.
fn etag(content: &str) -> String {
    let hash = digest::digest(&digest::SHA256, content.as_bytes());
    let hex: String = hash.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}

/// `If-None-Match` holds `*` or a list of entity tags; GET compares them weakly (RFC 9110
/// §13.1.2), so a `W/` prefix is ignored.
fn matches_etag(header: &str, etag: &str) -> bool {
    header.split(',').map(str::trim).any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag)
}

/// Standard base64 with padding, as CSP hash sources are written.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, encoded) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE=")]
        {
            assert_eq!(base64(input.as_bytes()), encoded);
        }
    }

    #[test]
    fn the_page_inlines_its_style_and_script_once_and_hashes_them() {
        let page = &*PAGE;
        assert!(!page.html.contains("{{"), "a placeholder was left in the page");
        assert_eq!(page.html.matches(PAGE_JS).count(), 1);
        assert_eq!(page.html.matches(PAGE_CSS).count(), 1);
        // The script must not end its own element early.
        assert!(!PAGE_JS.contains("</script") && !PAGE_CSS.contains("</style"));
        // Python: base64.b64encode(hashlib.sha256(b"").digest())
        assert_eq!(
            base64(digest::digest(&digest::SHA256, b"").as_ref()),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
    }

    #[test]
    fn if_none_match_revalidates_herald_js() {
        let etag = &*HERALD_JS_ETAG;
        assert!(matches_etag(etag, etag));
        assert!(matches_etag(&format!("\"x\", W/{etag}"), etag));
        assert!(matches_etag("*", etag));
        assert!(!matches_etag("\"x\"", etag));
    }
}
