//! Request bytes → `parse_request` → `routes::handle` with a real `Shared` (HS256 secret,
//! restricted origins, 4 connections, 2 per user, an API key), as the event loop calls it.
//! The checks live in `herald_fuzz::routing` (shared with `tls_upgrade`); see its docs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    herald_fuzz::routing::check(data);
});
