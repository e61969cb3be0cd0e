//! `GET /api/history/{user_id}?since=&limit=`: a user's stored notifications after `since`
//! (from the oldest kept when absent), oldest first, exactly as they were delivered, with the
//! user's read marker. Authenticated as the publish API; a user token may read its own.

use std::net::IpAddr;
use std::sync::Arc;

use super::api::{self, Caller};
use super::{Request, Response, Status};
use crate::auth::MAX_USER_ID_BYTES;
use crate::history::Since;
use crate::ids::{HistoryItems, id_as_json};
use crate::percent::percent_decode;
use crate::shared::Shared;

/// Most items one request may ask for, and how many it gets when it does not say.
pub const MAX_LIMIT: usize = 1000;
const DEFAULT_LIMIT: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryQuery {
    pub user: Arc<str>,
    pub since: Since,
    pub limit: usize,
}

/// Parses and authorizes a request; `segment` is the path after the prefix.
pub fn query(segment: &str, req: &Request, peer: IpAddr, shared: &Shared) -> Result<HistoryQuery, Response> {
    let caller = api::caller(req, peer, shared)?;
    let user = percent_decode(segment)
        .filter(|u| !u.is_empty() && u.len() <= MAX_USER_ID_BYTES && !u.contains('/'))
        .ok_or_else(|| bad_request("the path must end in a user id"))?;
    if let Caller::User { user: own } = &caller {
        if **own != *user {
            return Err(Response::api_error(Status::FORBIDDEN, "a user token may read its own history only"));
        }
    }
    let limit = match req.query_param("limit") {
        None => DEFAULT_LIMIT,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => return Err(bad_request(&format!("limit must be between 1 and {MAX_LIMIT}"))),
        },
    };
    let since = req.query_param("since").filter(|s| !s.is_empty()).map_or(Since::Beginning, |s| Since::parse(&s));
    Ok(HistoryQuery { user: user.into(), since, limit })
}

impl HistoryQuery {
    pub fn render(&self, answer: &HistoryItems) -> Response {
        let acked = answer.acked.map_or("null".to_string(), |pos| format!("\"{}\"", pos.render()));
        let body = format!(
            "{{\"user_id\":{},\"acked\":{acked},\"items\":[{}],\"complete\":{}}}",
            id_as_json(&self.user),
            answer.items,
            answer.complete
        );
        Response::json(Status::OK, body)
    }
}

fn bad_request(message: &str) -> Response {
    Response::api_error(Status::BAD_REQUEST, message)
}
