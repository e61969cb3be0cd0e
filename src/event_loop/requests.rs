//! HTTP on a connection: serving requests (keep-alive and pipelined), answering them, and
//! parking one while another thread finishes its work (a Redis publish, a disconnect that
//! spans every loop). Every answer that arrives later comes through [`EventLoop::on_answer`].

use std::sync::Arc;

use super::EventLoop;
use crate::broker::redis::fleet::FleetJob;
use crate::broker::{Outgoing, Published};
use crate::conn::{Phase, Waiting};
use crate::frame;
use crate::http::history::HistoryQuery;
use crate::http::presence::PresenceQuery;
use crate::http::publish::Responder;
use crate::http::routes::{self, Outcome};
use crate::http::{self, Parsed, Response, Status};
use crate::ids::{Answer, ConnRef, ReplyTo, Target};
use crate::mailbox::{DisconnectTally, LoopCmd, TallyReply};
use crate::route::Sender;

impl EventLoop {
    /// Serves every complete request in the connection's buffer, until the buffer is empty,
    /// the output is over its bound, or a request is parked.
    pub(super) fn serve_requests(&mut self, key: u32) {
        loop {
            let Some(conn) = self.conns.get_mut(key as usize) else { return };
            if conn.input_paused() {
                return;
            }
            let Phase::Http(state) = &mut conn.phase else { return };
            if state.buf.is_empty() {
                return;
            }
            let (request, consumed) = match http::parse_request(&state.buf) {
                Parsed::Partial => return,
                Parsed::Error(status) => {
                    self.reject(key, status);
                    return;
                }
                Parsed::Complete { request, consumed } => (request, consumed),
            };
            state.buf.drain(..consumed);
            let more_input = !state.buf.is_empty();
            let last_allowed = state.count_request();
            let keep_alive = request.keep_alive && !last_allowed && !self.shutting_down;
            let peer = state.peer;
            let head_only = request.method() == http::Method::Head;
            match routes::handle(&request, peer, &self.shared, &mut self.json) {
                Outcome::Respond(response) => {
                    let event_stream_refused = request.path == crate::sse::PATH && response.status.0 >= 400;
                    if crate::dialect::for_path(&request.path).is_some() || event_stream_refused {
                        self.counters.rejected_upgrades += 1;
                    }
                    let close = response.close || !keep_alive;
                    self.respond(key, response, head_only, close);
                    if close {
                        return;
                    }
                }
                Outcome::Upgrade(upgrade) => {
                    self.open(key, *upgrade);
                    return;
                }
                Outcome::EventStream(open) => {
                    self.open_event_stream(key, *open);
                    return;
                }
                Outcome::Publish(publish) => {
                    self.more_input = more_input;
                    self.publish(key, publish.items, publish.respond, keep_alive);
                    self.more_input = false;
                }
                Outcome::Disconnect(user) => self.start_disconnect(key, user, keep_alive),
                Outcome::Presence(query) => self.presence(key, query, keep_alive),
                Outcome::History(query) => self.history(key, query, keep_alive),
            }
        }
    }

    /// Queues an HTTP response; closes afterwards when `close`.
    pub(super) fn respond(&mut self, key: u32, mut response: Response, head_only: bool, close: bool) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        response.close = close;
        conn.queue.push_reply(frame::raw(response.render(head_only)));
        let paused = conn.input_paused();
        if let (false, false, Phase::Http(state)) = (close, paused, &mut conn.phase) {
            // Keep-alive: the next request gets a fresh handshake deadline, but not while the
            // peer leaves its answers unread: then the old deadline stands and ends it.
            state.deadline = self.now_tick.saturating_add(self.timeouts.handshake);
        }
        self.mark_dirty(key);
        if close {
            self.set_phase_closing(key);
        }
    }

    /// Answers a request that cannot be parsed or served, and closes.
    pub(super) fn reject(&mut self, key: u32, status: Status) {
        let message = match status.0 {
            431 => "request headers too large",
            413 => "request body too large",
            411 => "a Content-Length is required",
            408 => "request not completed in time",
            _ => "malformed request",
        };
        self.respond(key, Response::error(status, message), false, true);
    }

    /// Parks the connection's current request until another thread answers it.
    fn park(&mut self, key: u32, waiting: Waiting) -> Option<ReplyTo> {
        let conn = self.conns.get_mut(key as usize)?;
        let Phase::Http(state) = &mut conn.phase else { return None };
        state.wait(waiting, self.now_tick.saturating_add(self.timeouts.handshake));
        let conn_ref = ConnRef { key, id: conn.id };
        self.arm(key);
        Some(ReplyTo { loop_id: self.id, conn: conn_ref })
    }

    /// Publishes through the broker: embedded, the answer is known at once and this loop's own
    /// share is delivered inline; with Redis, the request is parked until the answer comes.
    fn publish(&mut self, key: u32, items: Vec<Outgoing>, respond: Responder, keep_alive: bool) {
        let Some(conn) = self.conns.get(key as usize) else { return };
        let reply = ReplyTo { loop_id: self.id, conn: ConnRef { key, id: conn.id } };
        let shared = self.shared.clone();
        let from = Sender::Loop { here: self.id };
        match shared.broker.publish(&shared.routing, &shared.metrics, items, from, Some(reply), &mut self.link) {
            Published::Routed { receivers, local } => {
                self.deliver_local(local);
                self.respond(key, respond.render(&Answer::Published(receivers)), false, !keep_alive);
            }
            Published::Pending => {
                self.park(key, Waiting { keep_alive, respond });
            }
            Published::Failed(why) => {
                self.respond(key, respond.render(&Answer::Failed(why)), false, !keep_alive);
            }
        }
    }

    /// `/api/presence`: embedded, the route table answers at once; with Redis, the fleet
    /// thread reads the fleet's counts.
    fn presence(&mut self, key: u32, query: PresenceQuery, keep_alive: bool) {
        let shared = self.shared.clone();
        let Some(fleet) = shared.broker.fleet() else {
            let table = &shared.routing.table;
            let counts: Box<[u64]> = query.users.iter().map(|u| u64::from(table.connections_of(u))).collect();
            self.respond(key, query.render(&counts), false, !keep_alive);
            return;
        };
        let users = query.users.clone();
        let respond = Responder::Presence(Arc::new(query));
        let Some(reply) = self.park(key, Waiting { keep_alive, respond }) else { return };
        if fleet.try_send(FleetJob::Query { users, reply }).is_err() {
            self.on_answer(reply.conn, Answer::Failed("redis fleet thread unavailable".into()));
        }
    }

    /// `/api/history`: the embedded store answers at once; Redis through the fleet thread.
    fn history(&mut self, key: u32, query: HistoryQuery, keep_alive: bool) {
        let shared = self.shared.clone();
        if !shared.broker.history_enabled() {
            let response = Response::api_error(Status::NOT_FOUND, "history is off (HERALD_HISTORY_SIZE is 0)");
            self.respond(key, response, false, !keep_alive);
            return;
        }
        let user = Target::user(&query.user);
        if let Some(items) = shared.broker.history_now(&user, query.since, query.limit) {
            self.respond(key, query.render(&items), false, !keep_alive);
            return;
        }
        let Some(fleet) = shared.broker.fleet() else { return };
        let (since, limit) = (query.since, query.limit);
        let Some(reply) = self.park(key, Waiting { keep_alive, respond: Responder::History(Arc::new(query)) }) else {
            return;
        };
        if fleet.try_send(FleetJob::HistoryApi { user, since, limit, reply }).is_err() {
            self.on_answer(reply.conn, Answer::Failed("redis fleet thread unavailable".into()));
        }
    }

    /// Delivers this loop's own share of published messages, after whatever other loops routed
    /// here before (so causal order holds for every connection).
    pub(super) fn deliver_local(&mut self, local: Vec<crate::broker::Local>) {
        if local.is_empty() {
            return;
        }
        self.catch_up();
        for part in local {
            self.deliver(&part.to, &part.frame, &part.exclusion);
        }
    }

    /// `/api/disconnect`: every loop closes the user's connections and reports to a tally;
    /// the last one to report answers. With Redis, every instance does so (the fleet thread
    /// asks them and sums their answers).
    fn start_disconnect(&mut self, key: u32, user: Arc<str>, keep_alive: bool) {
        let Some(reply) = self.park(key, Waiting { keep_alive, respond: Responder::Closed }) else { return };
        let shared = self.shared.clone();
        if let Some(fleet) = shared.broker.fleet() {
            if fleet.try_send(FleetJob::Disconnect { user, reply }).is_err() {
                self.on_answer(reply.conn, Answer::Failed("redis fleet thread unavailable".into()));
            }
            return;
        }
        let loops = shared.loops();
        let tally = Arc::new(DisconnectTally::new(loops.len(), TallyReply::Request(reply)));
        for (loop_id, handle) in loops.iter().enumerate() {
            if loop_id == self.id {
                continue;
            }
            let cmd = LoopCmd::Disconnect { user: user.clone(), tally: tally.clone() };
            if handle.try_send(cmd).is_err() {
                // That loop is overloaded: its share is counted as none rather than waited for.
                self.report_disconnect(&tally, 0);
            }
        }
        self.disconnect_user(&user, &tally);
    }

    /// Closes every connection of `user` on this loop and reports the count to `tally`.
    pub(super) fn disconnect_user(&mut self, user: &str, tally: &DisconnectTally) {
        // Topic-path connections are not in the user's index entry, so look at every session:
        // an admin action, rare enough for a scan of this loop's slab.
        let keys: Vec<(u32, u16)> = self
            .conns
            .iter()
            .filter_map(|(k, c)| {
                c.session().filter(|s| s.user.name() == user).map(|s| (k as u32, s.dialect().auth_close_code))
            })
            .collect();
        let closed = keys.len() as u64;
        for (key, code) in keys {
            self.close_with(key, code, "disconnected by the server");
        }
        self.report_disconnect(tally, closed);
    }

    fn report_disconnect(&mut self, tally: &DisconnectTally, closed: u64) {
        let Some(total) = tally.add(closed) else { return };
        let reply = match &tally.reply {
            TallyReply::Request(reply) => *reply,
            TallyReply::Fleet { survey, asker } => {
                let job = FleetJob::Closed { survey: *survey, asker: asker.clone(), closed: total };
                if let Some(fleet) = self.shared.broker.fleet() {
                    let _ = fleet.try_send(job);
                }
                return;
            }
        };
        if reply.loop_id == self.id {
            self.on_answer(reply.conn, Answer::Closed(total));
        } else if let Some(handle) = self.shared.loops().get(reply.loop_id) {
            let cmd = LoopCmd::Answer { conn: reply.conn, answer: Answer::Closed(total) };
            if handle.try_send(cmd).is_err() {
                // The asking loop is overloaded; its request ends at its deadline instead.
                self.shared.metrics.count_overload(1);
            }
        }
    }

    /// The answer to a parked request: respond, then serve whatever the client sent meanwhile.
    pub(super) fn on_answer(&mut self, conn: ConnRef, answer: Answer) {
        let key = conn.key;
        let Some(c) = self.conns.get_mut(key as usize).filter(|c| c.id == conn.id) else { return };
        let Phase::Http(state) = &mut c.phase else { return };
        let Some(waiting) = state.answered() else { return };
        self.respond(key, waiting.respond.render(&answer), false, !waiting.keep_alive || self.shutting_down);
        self.reread.push(key);
    }
}
