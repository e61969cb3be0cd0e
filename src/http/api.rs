//! What every API endpoint shares: who is calling (the API key, a publisher token, or a user
//! token), and reading a JSON body and ids from it.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use serde::Deserialize;
use serde_json::Value;

use super::{Request, Response, Status};
use crate::auth::MAX_USER_ID_BYTES;
use crate::shared::Shared;

/// Who is calling.
pub enum Caller {
    /// HERALD_API_KEY: any target, no user of its own.
    ApiKey,
    /// A token with scope `publish`: any target; `user` is the caller for seed-004 defaults.
    Publisher { user: Arc<str> },
    /// A plain user token: its own user only.
    User { user: Arc<str> },
}

impl Caller {
    pub fn user(&self) -> Option<&Arc<str>> {
        match self {
            Caller::ApiKey => None,
            Caller::Publisher { user } | Caller::User { user } => Some(user),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn caller(req: &Request, peer: IpAddr, shared: &Shared) -> Result<Caller, Response> {
    let limit = &shared.auth_failures;
    let now = Instant::now();
    if limit.exhausted(peer, now) {
        shared.metrics.api_auth_rate_limited.fetch_add(1, Relaxed);
        return Err(Response::api_error(Status::TOO_MANY_REQUESTS, "too many failed authentications")
            .header("Retry-After", "1"));
    }
    let unauthorized = || {
        limit.failed(peer, now);
        shared.metrics.api_auth_failures.fetch_add(1, Relaxed);
        Response::api_error(Status::UNAUTHORIZED, "missing or invalid credentials")
    };
    let bearer = req.bearer().ok_or_else(unauthorized)?;
    if let Some(key) = &shared.config.api_key {
        if constant_time_eq(bearer.as_bytes(), key.as_bytes()) {
            return Ok(Caller::ApiKey);
        }
    }
    let identity = shared.verifier.verify(bearer).map_err(|_| unauthorized())?;
    Ok(if identity.can_publish {
        Caller::Publisher { user: identity.user }
    } else {
        Caller::User { user: identity.user }
    })
}

/// A user id given as a JSON string or integer.
pub fn id_from_json(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.is_empty() && s.len() <= MAX_USER_ID_BYTES => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// A JSON body, or 400 saying why not.
pub fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| Response::api_error(Status::BAD_REQUEST, &format!("invalid body: {e}")))
}
