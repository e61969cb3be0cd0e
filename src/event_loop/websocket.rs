//! WebSocket sessions: the upgrade, then what clients send (pings, subscriptions, relays).
//! Frames are parsed into actions first and applied after, so the parser's borrow of the
//! session never overlaps the loop's other work.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use tracing::debug;

use super::EventLoop;
use crate::broker::{Outgoing, Published};
use crate::conn::inbound::{Flow, Inbound, Violation};
use crate::conn::{Membership, NO_NODE, Phase, Session, Topics};
use crate::dialect::Stream;
use crate::frame::{self, SharedFrame, code};
use crate::history::{Since, StreamPos};
use crate::http::routes::Upgrade;
use crate::ids::{ConnRef, Exclusion, MAX_TOPICS_PER_CONNECTION, Origin, ReplyTo, Target};
use crate::message::{self, ClientMessage};
use crate::route::{Joined, Sender};

/// Something a client's message asks for, applied after its frames are parsed.
enum Action {
    Reply(SharedFrame),
    /// Answers a Ping; replaces a Pong still waiting to be written.
    Pong(SharedFrame),
    /// The client sent a close frame: answer it and close.
    CloseReply(u16),
    Subscribe {
        topic: String,
        silent: bool,
        since: Option<String>,
    },
    /// The client read up to this stream position (history on).
    Ack(Option<String>),
    Unsubscribe {
        topic: String,
        silent: bool,
    },
    /// A focus-session member's JSON object, for the session's other members.
    Relay(String),
}

impl EventLoop {
    /// Completes an upgrade: the 101 is queued, the session indexed (and the route table told)
    /// before the 101 can be flushed, so anything published after the client sees it arrives.
    /// With exact Redis subscriptions, the 101 is held until Redis confirms the first one.
    pub(super) fn open(&mut self, key: u32, upgrade: Upgrade) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        let Phase::Http(state) = &mut conn.phase else { return };
        let early_frames = std::mem::take(&mut state.buf);
        conn.queue.push_reply(frame::raw(upgrade.response));
        self.mark_dirty(key);
        self.leave_plain(key);
        let identity = match upgrade.identity {
            Ok(identity) => identity,
            Err(close_code) => {
                self.counters.rejected_upgrades += 1;
                self.close_with(key, close_code, "unauthorized");
                return;
            }
        };
        let expires = crate::auth::expiry_tick(identity.exp, SystemTime::now(), self.now_tick);
        let now = self.now_tick;
        let topic_path = matches!(upgrade.stream, Stream::Topic(_));
        let topics = (topic_path || !identity.topics.is_empty())
            .then(|| Box::new(Topics { allowed: identity.topics.into_boxed_slice(), ..Topics::default() }));
        let mut session = Session {
            user: Target::user(&identity.user),
            dialect_id: upgrade.dialect.id,
            awaiting_subscriptions: 0,
            topics,
            reader: Default::default(),
            user_node: NO_NODE,
            expires,
            last_received: now,
            last_ping: now,
            last_data_sent: now,
        };
        match upgrade.stream {
            // A topic path receives that topic only, not the user's personal stream.
            Stream::Topic(topic) => {
                let topic = Target::topic(&topic);
                let (node, wait) = self.index_add(&topic, key);
                session.awaiting_subscriptions += u8::from(wait);
                if let Some(topics) = session.topics.as_mut() {
                    topics.held.push(Membership { topic, node });
                }
            }
            Stream::Personal => {
                let (node, wait) = self.index_add(&session.user.clone(), key);
                session.user_node = node;
                session.awaiting_subscriptions += u8::from(wait);
            }
        }
        let greets = session.dialect().greets;
        let stream = match session.path_topic() {
            Some(topic) => topic.clone(),
            None => session.user.clone(),
        };
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        conn.phase = Phase::Open(session);
        self.shared.metrics.loops[self.id].connections.fetch_add(1, Ordering::Relaxed);
        if greets {
            let greeting =
                format!("{{\"type\":\"connected\",\"timestamp\":\"{}\"}}", message::rfc3339_millis(SystemTime::now()));
            self.queue_reply(key, frame::reply_text(greeting.as_bytes()));
        }
        if let Some(since) = upgrade.since.filter(|_| self.shared.broker.history_enabled()) {
            self.start_replay(key, stream, Since::parse(&since));
        }
        self.arm(key);
        if !early_frames.is_empty() {
            let mut input = early_frames;
            self.on_frames(key, &mut input);
        }
    }

    pub(super) fn on_frames(&mut self, key: u32, input: &mut [u8]) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        let Phase::Open(session) = &mut conn.phase else { return };
        session.last_received = self.now_tick;
        let max = self.shared.config.max_message_bytes;
        let json = &mut self.json;
        let counters = &mut self.counters;
        let dialect = session.dialect();
        let mut actions = Vec::new();
        let result = session.reader.feed(input, max, |event| match event {
            Inbound::Ping(payload) => {
                actions.push(Action::Pong(frame::pong(payload)));
                Flow::Continue
            }
            Inbound::Pong => Flow::Continue,
            Inbound::Close(code) => {
                actions.push(Action::CloseReply(code.unwrap_or(code::NORMAL)));
                Flow::Stop
            }
            Inbound::Text(text) => {
                match message::parse_client_message(text, json) {
                    ClientMessage::Ping(style) => actions.push(Action::Reply(style.answer_frame())),
                    ClientMessage::Ack(id) => {
                        counters.acked += 1;
                        actions.push(Action::Ack(id));
                    }
                    ClientMessage::Subscribe { topic, since } => {
                        actions.push(Action::Subscribe { topic, silent: false, since })
                    }
                    ClientMessage::Unsubscribe(topic) => actions.push(Action::Unsubscribe { topic, silent: false }),
                    ClientMessage::SubscribeProject(id) if dialect.project_subscriptions => {
                        actions.push(Action::Subscribe { topic: format!("project:{id}"), silent: true, since: None })
                    }
                    ClientMessage::UnsubscribeProject(id) if dialect.project_subscriptions => {
                        actions.push(Action::Unsubscribe { topic: format!("project:{id}"), silent: true })
                    }
                    ClientMessage::OtherObject if dialect.relays => actions.push(Action::Relay(text.to_owned())),
                    _ => counters.ignored_client_messages += 1,
                }
                Flow::Continue
            }
        });
        for action in actions {
            self.apply(key, action);
        }
        if let Err(Violation { code, reason }) = result {
            self.counters.protocol_errors += 1;
            debug!(code, reason, "closing a connection for a protocol violation");
            self.close_with(key, code, reason);
        }
    }

    fn apply(&mut self, key: u32, action: Action) {
        match action {
            Action::Reply(reply) => self.queue_reply(key, reply),
            Action::Pong(pong) => {
                if let Some(conn) = self.conns.get_mut(key as usize).filter(|c| matches!(c.phase, Phase::Open(_))) {
                    conn.queue.push_pong(pong);
                    self.mark_dirty(key);
                }
            }
            // Echo the client's code (RFC 6455 §5.5.1); an absent code becomes 1000.
            Action::CloseReply(code) => self.close_with(key, code, ""),
            Action::Subscribe { topic, silent, since } => self.subscribe(key, topic, silent, since),
            Action::Ack(id) => self.ack(key, id),
            Action::Unsubscribe { topic, silent } => self.unsubscribe(key, topic, silent),
            Action::Relay(data) => self.relay(key, &data),
        }
    }

    /// Sends a focus-session member's object to the other members, on every instance.
    fn relay(&mut self, key: u32, data: &str) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        let origin = Origin { instance: self.shared.instance_id, loop_id: self.id, conn: ConnRef { key, id: conn.id } };
        let Phase::Open(session) = &mut conn.phase else { return };
        // Only ever the path's own session: never a topic the member merely may read.
        let Some(topic) = session.path_topic().cloned() else { return };
        if !session.take_relay(self.now_tick, &self.timeouts) {
            self.counters.ignored_client_messages += 1;
            return;
        }
        let session_id = topic.name().strip_prefix("focus-session:").unwrap_or(topic.name());
        let update = format!(
            "{{\"type\":\"focus_session_update\",\"session_id\":{},\"sender_id\":{},\"data\":{data}}}",
            serde_json::Value::from(session_id),
            crate::ids::id_as_json(session.user.name()),
        );
        // Built by herald around an object the inbound limit already bounded: valid, and its
        // envelope must never be what makes it too large.
        let valid = message::Valid { raw: update.as_bytes(), has_timestamp: false };
        let exclusion = Exclusion { users: None, origin: Some(origin) };
        let item = Outgoing::new(vec![topic], valid, exclusion).live_only();
        let shared = self.shared.clone();
        let from = Sender::Loop { here: self.id };
        if let Published::Routed { local, .. } =
            shared.broker.publish(&shared.routing, &shared.metrics, vec![item], from, None, &mut self.link)
        {
            self.deliver_local(local);
        }
    }

    /// Moves the user's read marker (history on); an id that is not a stream position of
    /// this herald is ignored and counted.
    fn ack(&mut self, key: u32, id: Option<String>) {
        if !self.shared.broker.history_enabled() {
            return;
        }
        let Some(Phase::Open(session)) = self.conns.get(key as usize).map(|c| &c.phase) else { return };
        match id.as_deref().and_then(StreamPos::parse) {
            Some(pos) => self.shared.broker.ack(&session.user, pos, &self.shared.metrics),
            None => {
                self.shared.metrics.history.acks_ignored.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(super) fn subscribe(&mut self, key: u32, topic: String, silent: bool, since: Option<String>) {
        let Some(Phase::Open(session)) = self.conns.get_mut(key as usize).map(|c| &mut c.phase) else { return };
        let held = session.held().iter().any(|m| m.topic.name() == topic);
        let allowed = session.topics.as_ref().is_some_and(|t| crate::auth::topic_allowed(&t.allowed, &topic));
        let reply = if !allowed {
            Some(serde_json::json!({"type": "error", "message": format!("not allowed to subscribe to {topic}")}))
        } else if !held && session.held().len() >= MAX_TOPICS_PER_CONNECTION {
            Some(serde_json::json!({"type": "error", "message": "too many topics on this connection"}))
        } else {
            if !held {
                let name = Target::topic(&topic);
                let (node, wait) = self.index_add(&name, key);
                if let Some(Phase::Open(session)) = self.conns.get_mut(key as usize).map(|c| &mut c.phase) {
                    // The `subscribed` reply (and what follows) waits for Redis too. At most
                    // MAX_TOPICS_PER_CONNECTION + 1 waits are ever outstanding: no overflow.
                    session.awaiting_subscriptions = session.awaiting_subscriptions.saturating_add(u8::from(wait));
                    // Allowed implies the session has topic state (its token grants topics).
                    if let Some(topics) = session.topics.as_mut() {
                        topics.held.push(Membership { topic: name, node });
                    }
                }
            }
            (!silent).then(|| serde_json::json!({"type": "subscribed", "topic": topic}))
        };
        let refused = reply.as_ref().is_some_and(|r| r["type"] == "error");
        if let Some(reply) = reply {
            self.queue_reply(key, frame::reply_text(reply.to_string().as_bytes()));
        }
        if let Some(since) = since.filter(|_| !refused && self.shared.broker.history_enabled()) {
            let target = Target::topic(&topic);
            if !self.replays.contains_key(&(key, target.clone())) {
                self.start_replay(key, target, Since::parse(&since));
            }
        }
    }

    fn unsubscribe(&mut self, key: u32, topic: String, silent: bool) {
        let Some(Phase::Open(session)) = self.conns.get_mut(key as usize).map(|c| &mut c.phase) else { return };
        if session.path_topic().is_some_and(|t| t.name() == topic) {
            let reply = serde_json::json!({"type": "error", "message": format!("{topic} is this path's own topic")});
            self.queue_reply(key, frame::reply_text(reply.to_string().as_bytes()));
            return;
        }
        if let Some(topics) = session.topics.as_mut() {
            if let Some(i) = topics.held.iter().position(|m| m.topic.name() == topic) {
                // Never index 0 on a topic path (refused above), so the path topic stays first.
                let removed = topics.held.swap_remove(i);
                self.index_remove(&removed.topic, removed.node);
            }
        }
        if !silent {
            let reply = serde_json::json!({"type": "unsubscribed", "topic": topic});
            self.queue_reply(key, frame::reply_text(reply.to_string().as_bytes()));
        }
    }

    pub(super) fn queue_reply(&mut self, key: u32, reply: SharedFrame) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        if matches!(conn.phase, Phase::Closing { .. }) {
            return;
        }
        conn.queue.push_reply(reply);
        self.mark_dirty(key);
    }

    /// Indexes connection `key` under `target`; tells the route table when this loop is new to
    /// it, and (exact Redis subscriptions) the reader when the instance is. Returns the
    /// membership's node, and whether the connection must hold its output until Redis has
    /// confirmed the target's subscription.
    pub(super) fn index_add(&mut self, target: &Target, key: u32) -> (u32, bool) {
        let (node, first_here) = self.index.add(target, key);
        let table = &self.shared.routing.table;
        let Some(reports) = self.shared.broker.subscription_reports() else {
            if first_here {
                table.join(self.id, target);
            }
            return (node, false);
        };
        let joined = if first_here {
            table.join(self.id, target)
        } else {
            Joined { first: false, subscribed: table.is_subscribed(target) }
        };
        if joined.subscribed {
            if joined.first {
                reports.changed(target.clone());
            }
            return (node, false);
        }
        let Some(conn) = self.conns.get(key as usize) else { return (node, false) };
        reports.wait(target.clone(), ReplyTo { loop_id: self.id, conn: ConnRef { key, id: conn.id } });
        (node, true)
    }

    /// Removes a membership; tells the route table when this loop no longer holds the target
    /// (and the reader when the instance no longer does).
    pub(super) fn index_remove(&mut self, target: &Target, node: u32) {
        if self.index.remove(target, node) && self.shared.routing.table.leave(self.id, target) {
            if let Some(reports) = self.shared.broker.subscription_reports() {
                reports.changed(target.clone());
            }
        }
    }

    /// A subscription the session waited for is confirmed: once none is left, its output
    /// (the 101 first) flows.
    pub(super) fn subscription_ready(&mut self, conn: ConnRef) {
        let Some(c) = self.conns.get_mut(conn.key as usize) else { return };
        if c.id != conn.id {
            return;
        }
        if let Phase::Open(session) = &mut c.phase {
            session.awaiting_subscriptions = session.awaiting_subscriptions.saturating_sub(1);
            if session.awaiting_subscriptions == 0 {
                self.mark_dirty(conn.key);
                // A replay reads the store only once its channel is confirmed.
                if !self.replays.is_empty() {
                    self.pump_all(conn.key);
                }
            }
        }
    }
}
