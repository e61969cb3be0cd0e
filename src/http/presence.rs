//! The presence API: `GET /api/presence/{user_id}` and `POST /api/presence {"user_ids":[…]}`
//! (at most [`MAX_USERS`]). Authenticated as the publish API; a plain user token may ask
//! about itself only. The answer comes from the broker: the route table embedded, Redis's
//! presence hashes fleet-wide.

use std::net::IpAddr;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::api::{self, Caller};
use super::{Request, Response, Status};
use crate::auth::MAX_USER_ID_BYTES;
use crate::ids::id_as_json;
use crate::percent::percent_decode;
use crate::shared::Shared;

/// Most users one POST may ask about.
pub const MAX_USERS: usize = 1000;

/// Who was asked about, and in which form to answer.
#[derive(Debug, PartialEq, Eq)]
pub struct PresenceQuery {
    pub users: Vec<Arc<str>>,
    /// `GET /api/presence/{id}`: one object, not a map.
    pub single: bool,
}

impl PresenceQuery {
    /// Renders fleet-wide connection counts, one per user asked about (missing = 0).
    pub fn render(&self, counts: &[u64]) -> Response {
        let entry = |i: usize| {
            let n = counts.get(i).copied().unwrap_or(0);
            (n > 0, n)
        };
        let body = if self.single {
            let (online, connections) = entry(0);
            let user = self.users.first().map_or(Value::Null, |u| id_as_json(u));
            json!({"user_id": user, "online": online, "connections": connections})
        } else {
            let mut map = Map::with_capacity(self.users.len());
            for (i, user) in self.users.iter().enumerate() {
                let (online, connections) = entry(i);
                map.insert(user.to_string(), json!({"online": online, "connections": connections}));
            }
            json!({ "presence": map })
        };
        Response::json(Status::OK, body.to_string())
    }
}

/// `GET /api/presence/{user_id}`; `segment` is the raw path segment after the prefix.
pub fn one(segment: &str, req: &Request, peer: IpAddr, shared: &Shared) -> Result<PresenceQuery, Response> {
    let caller = api::caller(req, peer, shared)?;
    let user = percent_decode(segment)
        .filter(|u| !u.is_empty() && u.len() <= MAX_USER_ID_BYTES && !u.contains('/'))
        .ok_or_else(|| bad_request("the path must end in a user id"))?;
    let query = PresenceQuery { users: vec![user.into()], single: true };
    permitted(&caller, &query)?;
    Ok(query)
}

/// `POST /api/presence {"user_ids":[…]}`.
pub fn many(req: &Request, peer: IpAddr, shared: &Shared) -> Result<PresenceQuery, Response> {
    #[derive(Deserialize)]
    struct Body {
        user_ids: Option<Vec<Value>>,
    }
    let caller = api::caller(req, peer, shared)?;
    let body: Body = api::parse(&req.body)?;
    let ids = body.user_ids.ok_or_else(|| bad_request("missing user_ids (an array of strings or integers)"))?;
    if ids.len() > MAX_USERS {
        return Err(bad_request(&format!("at most {MAX_USERS} user_ids per request")));
    }
    let users = ids
        .iter()
        .map(|id| api::id_from_json(id).map(Arc::from))
        .collect::<Option<Vec<Arc<str>>>>()
        .ok_or_else(|| bad_request("each user_id must be a non-empty string or an integer"))?;
    let query = PresenceQuery { users, single: false };
    permitted(&caller, &query)?;
    Ok(query)
}

/// A plain user token may ask about its own user only.
fn permitted(caller: &Caller, query: &PresenceQuery) -> Result<(), Response> {
    match caller {
        Caller::User { user } if query.users.iter().any(|u| u != user) => {
            Err(Response::api_error(Status::FORBIDDEN, "a user token may ask about its own user only"))
        }
        _ => Ok(()),
    }
}

fn bad_request(message: &str) -> Response {
    Response::api_error(Status::BAD_REQUEST, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(response: Response) -> Value {
        serde_json::from_slice(&response.body).unwrap()
    }

    #[test]
    fn answers_name_users_as_given_and_count_connections() {
        let one = PresenceQuery { users: vec!["42".into()], single: true };
        assert_eq!(body(one.render(&[3])), json!({"user_id": 42, "online": true, "connections": 3}));
        let many = PresenceQuery { users: vec!["b".into(), "a".into()], single: false };
        assert_eq!(
            body(many.render(&[0, 1])),
            json!({"presence": {"b": {"online": false, "connections": 0}, "a": {"online": true, "connections": 1}}})
        );
    }
}
