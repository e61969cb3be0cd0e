//! Who may open a connection, WebSocket or event stream alike: the Origin, the token, and a
//! slot under the connection limits. The upgrade (`routes`) and `/sse` (`sse`) run these
//! checks in the same order.

use std::sync::atomic::Ordering::Relaxed;

use super::{Request, Response, Status};
use crate::admission::Refusal;
use crate::auth::Identity;
use crate::shared::Shared;

/// Whether the request's Origin may open a connection: any, when HERALD_ALLOWED_ORIGINS is
/// `*`; no Origin at all (a non-browser client) is not subject to the list.
pub fn origin_allowed(req: &Request, shared: &Shared) -> bool {
    match (&shared.config.allowed_origins, req.origin.as_deref()) {
        (Some(allowed), Some(origin)) => allowed.contains(&origin.trim_end_matches('/').to_ascii_lowercase()),
        _ => true,
    }
}

/// The connection's token (query `token`, else `Authorization: Bearer`), verified; the error
/// is seed 003's message for the client.
pub fn authenticate(req: &Request, shared: &Shared) -> Result<Identity, &'static str> {
    let token = req.query_param("token").filter(|t| !t.is_empty()).or_else(|| req.bearer().map(str::to_owned));
    match token.as_deref() {
        None => Err("missing token parameter"),
        Some(token) => shared.verifier.verify(token).map_err(|_| "invalid or expired token"),
    }
}

/// Reserves the connection's slot under the instance and per-user limits (the last check
/// before a connection opens: a reservation is released only by the session it becomes).
pub fn admit(identity: &Identity, shared: &Shared) -> Result<(), Response> {
    if shared.shutting_down.load(Relaxed) {
        return Err(Response::error(Status::SERVICE_UNAVAILABLE, "shutting down").closing());
    }
    match shared.admission.reserve(&shared.routing.table, &identity.user) {
        // Reported here, where the count changed: embedded, this count decides transitions.
        Ok(connections) => {
            shared.broker.presence_changed(&identity.user, connections, true, &shared.metrics);
            Ok(())
        }
        Err(Refusal::InstanceFull) => {
            Err(Response::error(Status::SERVICE_UNAVAILABLE, "connection limit reached").closing())
        }
        Err(Refusal::UserFull) => {
            Err(Response::error(Status::SERVICE_UNAVAILABLE, "per-user connection limit reached").closing())
        }
    }
}
