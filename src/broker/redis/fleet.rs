//! The fleet thread: what makes instances over one Redis one system beyond routing messages.
//!
//! * Fleet-wide `/api/disconnect`: the asking instance publishes the request on the control
//!   channel; every instance closes the user's connections and answers on the asker's reply
//!   channel; the asker sums what came within a second ([`Surveys`]).
//! * Presence: each user's fleet-wide connections live in a hash in Redis (field = instance),
//!   written by herald's functions, which also emit exactly one event per online/offline
//!   transition. Instances beat every few seconds; one that stops (SIGKILL, power loss) is
//!   swept by the others: its fields go, and users it alone held go offline.
//!
//! Two connections of its own: one subscribed (control and reply channels), one for commands,
//! pipelined, replies matched in order. Nothing here ever blocks an event loop: loops report
//! by an unbounded mailbox and get answers by their own inboxes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Receiver;
use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::conn::{Conn, Failure, RedisTls};
use super::presence_sync::PresenceSync;
use super::redis_url::RedisUrl;
use super::resp::{self, Push, SubKind, Value};
use super::stream::{self, HistoryReply};
use super::survey::Surveys;
use super::{Backoff, CONNECT_TIMEOUT, Context, LOOP_PATIENCE};
use crate::history::{self, Page, Since, StreamPos};
use crate::ids::{Answer, HistoryItems, ReplyTo, Target, id_as_json};
use crate::mailbox::{DisconnectTally, LoopCmd, Mailbox, TallyReply};
use crate::message::JsonScratch;
use crate::presence::{self, Status};
use crate::webhook::Webhook;

pub const WAKER: Token = Token(0);
const SUB: Token = Token(1);
const CMD: Token = Token(2);

/// Where fleet-wide requests go; every instance subscribes.
pub const CONTROL_CHANNEL: &str = "herald:control";
/// Instances by the time they count as dead (Redis's clock, so hosts' clocks do not matter).
pub const INSTANCES_KEY: &str = "herald:presence:instances";

/// How often an instance says it is alive…
const BEAT_EVERY: Duration = Duration::from_secs(5);
/// …and how long one beat lasts. A dead instance is swept within BEAT_LIFETIME + BEAT_EVERY.
const BEAT_LIFETIME: Duration = Duration::from_secs(15);
/// Presence changes are written this often (SPEC §8: correct within 1 s)…
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// …at most this many users per flush, so one burst cannot starve the rest.
const UPDATES_PER_FLUSH: usize = 4096;
/// Users of a dead instance taken per sweep step.
const SWEEP_BATCH: usize = 1000;
/// A reply not back after this long means the connection is wedged.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes one reply may hold (a sweep step's member list is the largest).
const MAX_REPLY: usize = 1024 * 1024;

/// What the loops (and the fleet thread itself) ask of the fleet thread.
#[derive(Debug)]
pub enum FleetJob {
    /// A user's connection count on this instance changed (the route table has the count).
    Presence(Arc<str>),
    /// Close `user`'s connections on every instance; answer `reply` with the total.
    Disconnect { user: Arc<str>, reply: ReplyTo },
    /// This instance's loops closed `closed` connections for another instance's survey.
    Closed { survey: u64, asker: Arc<str>, closed: u64 },
    /// Fleet-wide connections of each of `users`.
    Query { users: Vec<Arc<str>>, reply: ReplyTo },
    /// A page of `target`'s stream after `since`, for a connection replaying it.
    History { target: Target, since: Since, reply: ReplyTo },
    /// A client acknowledged `pos` of `user`'s stream.
    Ack { user: Target, pos: StreamPos },
    /// `/api/history`: up to `limit` of `user`'s stored notifications after `since`.
    HistoryApi { user: Target, since: Since, limit: usize, reply: ReplyTo },
}

/// The loops' side.
pub type FleetHandle = Mailbox<FleetJob>;

/// A request on the control channel.
#[derive(Serialize, Deserialize)]
struct ControlRequest {
    op: String,
    user_id: String,
    survey: u64,
    asker: String,
}

/// An instance's answer on the asker's reply channel.
#[derive(Serialize, Deserialize)]
struct ControlAnswer {
    survey: u64,
    closed: u64,
}

/// A reply on the command connection, owned (the decoder's values borrow its buffer).
#[derive(Debug)]
enum Reply {
    Int(i64),
    Text(String),
    List(Vec<Reply>),
    Nil,
    Error(String),
}

impl Reply {
    fn of(value: &Value<'_>, depth: u8) -> Reply {
        if let Some(error) = value.error() {
            return Reply::Error(format!("{error:?}"));
        }
        if let Some(n) = value.as_integer() {
            return Reply::Int(n);
        }
        if let Some(bytes) = value.as_bytes() {
            return Reply::Text(String::from_utf8_lossy(bytes).into_owned());
        }
        match value.items() {
            Some(items) if depth < 2 => Reply::List(items.iter().map(|v| Reply::of(&v, depth + 1)).collect()),
            _ => Reply::Nil,
        }
    }

    fn texts(self) -> Vec<String> {
        match self {
            Reply::List(items) => {
                items.into_iter().filter_map(|r| if let Reply::Text(t) = r { Some(t) } else { None }).collect()
            }
            _ => Vec::new(),
        }
    }

    /// A sum of counts: HVALS of a presence hash.
    fn sum(self) -> u64 {
        self.texts().iter().filter_map(|t| t.parse::<u64>().ok()).sum()
    }

    /// `{status, total}` from `herald_presence_set`.
    fn transition(self) -> Option<(Status, u64)> {
        let Reply::List(items) = self else { return None };
        let mut items = items.into_iter();
        let status = match items.next()? {
            Reply::Text(s) if s == "online" => Status::Online,
            Reply::Text(s) if s == "offline" => Status::Offline,
            _ => return None,
        };
        let total = match items.next()? {
            Reply::Int(n) => n.max(0) as u64,
            _ => 0,
        };
        Some((status, total))
    }
}

/// What a command's reply is for, in the order the commands were written.
#[derive(Debug)]
enum Expect {
    Ignore,
    FunctionLoad,
    SurveyPublished(u64),
    Presence(Arc<str>),
    Dead,
    SweepMembers(Arc<str>),
    Swept(Arc<str>),
    QueryPart { query: u64, index: usize },
    History { target: Target, since: Since, reply: ReplyTo },
    Ack,
    HistoryApi { since: Since, reply: ReplyTo },
}

struct Query {
    reply: ReplyTo,
    counts: Vec<u64>,
    left: usize,
}

/// One of the two connections, with its own reconnect schedule.
struct Link {
    conn: Option<Conn>,
    token: Token,
    name: &'static str,
    retry_at: Instant,
    backoff: Backoff,
}

impl Link {
    fn new(token: Token, name: &'static str) -> Link {
        Link { conn: None, token, name, retry_at: Instant::now(), backoff: Backoff::new() }
    }
}

pub struct FleetThread {
    url: RedisUrl,
    ctx: Context,
    instance: Arc<str>,
    reply_channel: String,
    members_key: String,
    presence_channel: String,
    webhook: Option<Arc<Webhook>>,
    poll: Poll,
    jobs: Receiver<FleetJob>,
    mailbox: Arc<FleetHandle>,
    sub: Link,
    /// Both channels confirmed: this instance hears fleet requests and answers.
    sub_ready: bool,
    cmd: Link,
    expect: VecDeque<(Expect, Instant)>,
    surveys: Surveys,
    presence: PresenceSync,
    queries: HashMap<u64, Query>,
    next_query: u64,
    next_beat: Instant,
    next_flush: Instant,
    history: history::Settings,
    /// herald.lua with this instance's settings, loaded on every new command connection.
    library: String,
    scratch: JsonScratch,
}

/// The parts of the configuration the fleet thread needs.
pub struct FleetSettings {
    pub instance: Arc<str>,
    pub presence_channel: String,
    pub webhook: Option<Arc<Webhook>>,
    pub history: history::Settings,
}

impl FleetThread {
    pub fn new(
        url: RedisUrl,
        ctx: Context,
        settings: FleetSettings,
        poll: Poll,
        jobs: Receiver<FleetJob>,
        mailbox: Arc<FleetHandle>,
    ) -> FleetThread {
        let now = Instant::now();
        let instance = settings.instance;
        FleetThread {
            url,
            ctx,
            reply_channel: format!("herald:reply:{instance}"),
            members_key: format!("herald:presence:members:{{{instance}}}"),
            instance,
            presence_channel: settings.presence_channel,
            webhook: settings.webhook,
            poll,
            jobs,
            mailbox,
            sub: Link::new(SUB, "herald-fleet-sub"),
            sub_ready: false,
            cmd: Link::new(CMD, "herald-fleet"),
            expect: VecDeque::new(),
            surveys: Surveys::default(),
            presence: PresenceSync::default(),
            queries: HashMap::new(),
            next_query: 0,
            next_beat: now,
            next_flush: now,
            history: settings.history,
            library: stream::library(&settings.history, "PUBLISH"),
            scratch: JsonScratch::default(),
        }
    }

    /// Thread body: never returns while the process runs.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(16);
        loop {
            let timeout = self.next_wake();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    warn!(error = %e, "redis fleet thread cannot poll; it stops");
                    return;
                }
            }
            self.mailbox.clear_wake();
            self.connect_if_due();
            self.take_jobs();
            if let Err(failure) = self.read_sub() {
                self.lost_sub(failure);
            }
            if let Err(failure) = self.read_cmd() {
                self.lost_cmd(failure);
            }
            self.on_timers();
            if let Some(conn) = self.sub.conn.as_mut() {
                if let Err(e) = conn.flush() {
                    self.lost_sub(Failure::Io(e));
                }
            }
            if let Some(conn) = self.cmd.conn.as_mut() {
                if let Err(e) = conn.flush() {
                    self.lost_cmd(Failure::Io(e));
                }
            }
        }
    }

    fn next_wake(&self) -> Duration {
        let now = Instant::now();
        let mut at = self.next_beat;
        if self.presence.has_dirty() {
            at = at.min(self.next_flush);
        }
        if let Some(deadline) = self.surveys.next_deadline() {
            at = at.min(deadline);
        }
        if let Some((_, sent)) = self.expect.front() {
            at = at.min(*sent + REPLY_TIMEOUT);
        }
        for link in [&self.sub, &self.cmd] {
            if link.conn.is_none() {
                at = at.min(link.retry_at);
            }
        }
        at.saturating_duration_since(now).max(Duration::from_millis(1))
    }

    fn connect_if_due(&mut self) {
        let now = Instant::now();
        if self.sub.conn.is_none() && now >= self.sub.retry_at {
            if let Some(mut conn) = open(&self.url, self.ctx.settings.tls.as_ref(), &mut self.sub, &self.poll) {
                let channels = [CONTROL_CHANNEL, self.reply_channel.as_str()];
                resp::encode_subscription(conn.commands(), SubKind::Subscribe, channels.iter().map(|c| c.as_bytes()));
                self.sub.conn = Some(conn);
            }
        }
        if self.cmd.conn.is_none() && now >= self.cmd.retry_at {
            if let Some(mut conn) = open(&self.url, self.ctx.settings.tls.as_ref(), &mut self.cmd, &self.poll) {
                resp::encode_command(
                    conn.commands(),
                    [b"FUNCTION".as_slice(), b"LOAD", b"REPLACE", self.library.as_bytes()],
                );
                self.expect.push_back((Expect::FunctionLoad, Instant::now()));
                self.cmd.conn = Some(conn);
                // Redis may have restarted, or swept this instance while it was away.
                self.presence.resend_all();
                self.next_beat = Instant::now();
                self.next_flush = Instant::now();
            }
        }
    }

    fn take_jobs(&mut self) {
        while let Ok(job) = self.jobs.try_recv() {
            match job {
                FleetJob::Presence(user) => self.presence.touch(user),
                FleetJob::Disconnect { user, reply } => self.start_disconnect(user, reply),
                FleetJob::Closed { survey, asker, closed } => {
                    let answer = ControlAnswer { survey, closed };
                    let channel = format!("herald:reply:{asker}");
                    let body = serde_json::to_string(&answer).unwrap_or_default();
                    self.command([b"PUBLISH".as_slice(), channel.as_bytes(), body.as_bytes()], Expect::Ignore);
                }
                FleetJob::Query { users, reply } => self.start_query(users, reply),
                FleetJob::History { target, since, reply } => {
                    let expect = Expect::History { target: target.clone(), since, reply };
                    if !self.read_history(&target, since, history::PAGE, expect) {
                        self.send_page(reply, target, None);
                    }
                }
                FleetJob::HistoryApi { user, since, limit, reply } => {
                    if !self.read_history(&user, since, limit, Expect::HistoryApi { since, reply }) {
                        self.answer(reply, Answer::Failed("redis unavailable".into()));
                    }
                }
                FleetJob::Ack { user, pos } => {
                    let channel = self.channel_of(&user);
                    let (epoch, offset) = (history::epoch_text(pos.epoch), pos.offset.to_string());
                    let args = [
                        b"FCALL".as_slice(),
                        b"herald_ack",
                        b"1",
                        channel.as_bytes(),
                        epoch.as_bytes(),
                        offset.as_bytes(),
                    ];
                    if !self.command(args, Expect::Ack) {
                        self.ctx.metrics.history.acks_ignored.fetch_add(1, Relaxed);
                    }
                }
            }
        }
    }

    /// Writes one command on the command connection, if there is one.
    fn command<const N: usize>(&mut self, args: [&[u8]; N], expect: Expect) -> bool {
        let Some(conn) = self.cmd.conn.as_mut() else { return false };
        resp::encode_command(conn.commands(), args);
        self.expect.push_back((expect, Instant::now()));
        true
    }

    fn start_disconnect(&mut self, user: Arc<str>, reply: ReplyTo) {
        if !self.sub_ready || self.cmd.conn.is_none() {
            // The fleet cannot be reached: this instance does its own part and answers.
            self.disconnect_here(user, TallyReply::Request(reply));
            return;
        }
        let survey = self.surveys.start(reply, Instant::now());
        let request = ControlRequest {
            op: "disconnect".into(),
            user_id: user.to_string(),
            survey,
            asker: self.instance.to_string(),
        };
        let body = serde_json::to_string(&request).unwrap_or_default();
        self.command(
            [b"PUBLISH".as_slice(), CONTROL_CHANNEL.as_bytes(), body.as_bytes()],
            Expect::SurveyPublished(survey),
        );
    }

    /// Has every loop close `user`'s connections; the last loop to finish reports to `reply`.
    fn disconnect_here(&self, user: Arc<str>, reply: TallyReply) {
        let loops = self.ctx.routing.loops();
        let tally = Arc::new(DisconnectTally::new(loops.len(), reply));
        for handle in loops {
            let cmd = LoopCmd::Disconnect { user: user.clone(), tally: tally.clone() };
            if handle.send_waiting(cmd, LOOP_PATIENCE).is_err() {
                // That loop is overloaded: its share counts as none rather than never.
                if let Some(total) = tally.add(0) {
                    self.tally_done(&tally, total);
                }
            }
        }
    }

    /// A tally this thread completed itself (its last loop could not be reached).
    fn tally_done(&self, tally: &DisconnectTally, total: u64) {
        match &tally.reply {
            TallyReply::Request(reply) => self.answer(*reply, Answer::Closed(total)),
            TallyReply::Fleet { survey, asker } => {
                let job = FleetJob::Closed { survey: *survey, asker: asker.clone(), closed: total };
                let _ = self.mailbox.try_send(job);
            }
        }
    }

    fn start_query(&mut self, users: Vec<Arc<str>>, reply: ReplyTo) {
        if self.cmd.conn.is_none() {
            self.answer(reply, Answer::Failed("redis unavailable".into()));
            return;
        }
        if users.is_empty() {
            self.answer(reply, Answer::Presence(Box::default()));
            return;
        }
        self.next_query += 1;
        let query = self.next_query;
        for (index, user) in users.iter().enumerate() {
            let key = self.presence_key(user);
            self.command([b"HVALS".as_slice(), key.as_bytes()], Expect::QueryPart { query, index });
        }
        self.queries.insert(query, Query { reply, counts: vec![0; users.len()], left: users.len() });
    }

    fn channel_of(&self, target: &Target) -> String {
        super::super::channel_of(target, &self.ctx.settings.user_prefix, &self.ctx.settings.topic_prefix)
    }

    /// Asks for up to `limit` entries of `target`'s stream after `since`; false when there is
    /// no connection to ask on.
    fn read_history(&mut self, target: &Target, since: Since, limit: usize, expect: Expect) -> bool {
        let channel = self.channel_of(target);
        let (epoch, offset) = match since {
            Since::After(pos) => (history::epoch_text(pos.epoch), pos.offset),
            Since::Beginning | Since::Unknown => (String::new(), 0),
        };
        let (offset, limit) = (offset.to_string(), limit.to_string());
        let args = [
            b"FCALL".as_slice(),
            b"herald_history",
            b"1",
            channel.as_bytes(),
            epoch.as_bytes(),
            offset.as_bytes(),
            limit.as_bytes(),
        ];
        self.command(args, expect)
    }

    fn send_page(&self, reply: ReplyTo, target: Target, page: Option<Page>) {
        if let Some(handle) = self.ctx.routing.loops().get(reply.loop_id) {
            let cmd = LoopCmd::ReplayPage { conn: reply.conn, target, page: page.map(Box::new) };
            let _ = handle.send_waiting(cmd, LOOP_PATIENCE);
        }
    }

    fn presence_key(&self, user: &str) -> String {
        // In the user's channel's slot: a cluster keeps a user's state on one node.
        format!("herald:presence:{{{}{user}}}", self.ctx.settings.user_prefix)
    }

    fn answer(&self, reply: ReplyTo, answer: Answer) {
        if let Some(handle) = self.ctx.routing.loops().get(reply.loop_id) {
            let _ = handle.send_waiting(LoopCmd::Answer { conn: reply.conn, answer }, LOOP_PATIENCE);
        }
    }

    fn read_sub(&mut self) -> Result<(), Failure> {
        let Some(conn) = self.sub.conn.as_mut() else { return Ok(()) };
        conn.fill()?;
        let mut heard = Vec::new();
        let mut confirmed = 0;
        loop {
            let next = conn.next(|value| match resp::classify_push(&value) {
                Some(Push::Message { channel, payload }) => Ok(Some((channel.to_vec(), payload.to_vec()))),
                Some(Push::Subscription { kind: SubKind::Subscribe, .. }) => {
                    confirmed += 1;
                    Ok(None)
                }
                _ => match value.error() {
                    Some(error) => Err(Failure::from_reply(error)),
                    None => Ok(None),
                },
            })?;
            match next {
                None => break,
                Some(result) => heard.extend(result?),
            }
        }
        if confirmed > 0 && !self.sub_ready {
            self.sub_ready = true;
            self.sub.backoff.reset();
            debug!("fleet control channel subscribed");
        }
        for (channel, payload) in heard {
            if channel == CONTROL_CHANNEL.as_bytes() {
                self.on_control(&payload);
            } else if channel == self.reply_channel.as_bytes() {
                self.on_survey_answer(&payload);
            }
        }
        Ok(())
    }

    fn on_control(&mut self, payload: &[u8]) {
        match serde_json::from_slice::<ControlRequest>(payload) {
            Ok(request) if request.op == "disconnect" => {
                let reply = TallyReply::Fleet { survey: request.survey, asker: request.asker.into() };
                self.disconnect_here(request.user_id.into(), reply);
            }
            // A newer instance's request this one does not know: it answers nothing, and the
            // asker's deadline covers it.
            Ok(request) => debug!(op = request.op, "unknown fleet request ignored"),
            Err(e) => warn!(error = %e, "malformed message on the fleet control channel ignored"),
        }
    }

    fn on_survey_answer(&mut self, payload: &[u8]) {
        let Ok(answer) = serde_json::from_slice::<ControlAnswer>(payload) else {
            warn!("malformed answer on this instance's reply channel ignored");
            return;
        };
        if let Some(done) = self.surveys.answered(answer.survey, answer.closed) {
            self.answer(done.reply, Answer::Closed(done.closed));
        }
    }

    fn read_cmd(&mut self) -> Result<(), Failure> {
        let Some(conn) = self.cmd.conn.as_mut() else { return Ok(()) };
        conn.fill()?;
        let mut replies = Vec::new();
        while let Some(reply) = conn.next(|value| Reply::of(&value, 0))? {
            replies.push(reply);
        }
        for reply in replies {
            let Some((expect, _)) = self.expect.pop_front() else {
                return Err(Failure::Protocol("a reply nobody asked for".into()));
            };
            self.on_reply(expect, reply)?;
        }
        if self.expect.front().is_some_and(|(_, sent)| sent.elapsed() >= REPLY_TIMEOUT) {
            return Err(Failure::Timeout);
        }
        Ok(())
    }

    fn on_reply(&mut self, expect: Expect, reply: Reply) -> Result<(), Failure> {
        if let Reply::Error(error) = &reply {
            return self.on_error(expect, error);
        }
        match expect {
            Expect::Ignore => {}
            Expect::FunctionLoad => {
                self.cmd.backoff.reset();
                info!(instance = %self.instance, "fleet presence and control connected");
            }
            Expect::SurveyPublished(survey) => {
                let receivers = if let Reply::Int(n) = reply { n.max(0) as u64 } else { 0 };
                if let Some(done) = self.surveys.published(survey, receivers) {
                    self.answer(done.reply, Answer::Closed(done.closed));
                }
            }
            Expect::Presence(user) | Expect::Swept(user) => {
                if let Some((status, total)) = reply.transition() {
                    self.emitted(&user, status, total);
                }
            }
            Expect::Dead => {
                for dead in reply.texts() {
                    if *dead != *self.instance {
                        self.sweep_step(dead.into());
                    }
                }
            }
            Expect::SweepMembers(dead) => {
                let users = reply.texts();
                if users.is_empty() {
                    info!(instance = %dead, "swept a dead instance's presence");
                    let members = format!("herald:presence:members:{{{dead}}}");
                    self.command([b"ZREM".as_slice(), INSTANCES_KEY.as_bytes(), dead.as_bytes()], Expect::Ignore);
                    self.command([b"DEL".as_slice(), members.as_bytes()], Expect::Ignore);
                    return Ok(());
                }
                for user in users {
                    self.write_count(&user, &dead, 0, Expect::Swept(user.as_str().into()));
                    let members = format!("herald:presence:members:{{{dead}}}");
                    self.command([b"SREM".as_slice(), members.as_bytes(), user.as_bytes()], Expect::Ignore);
                }
                self.sweep_step(dead);
            }
            Expect::History { target, since, reply: asker } => {
                let reading = stream::Reading {
                    since,
                    ttl: self.history.ttl,
                    max_bytes: self.ctx.settings.max_message_bytes,
                    scratch: &mut self.scratch,
                };
                let page = history_reply(reply).page(reading);
                self.send_page(asker, target, Some(page));
            }
            Expect::HistoryApi { since, reply: asker } => {
                let reply = history_reply(reply);
                let acked =
                    reply.epoch.filter(|_| reply.acked > 0).map(|epoch| StreamPos { epoch, offset: reply.acked });
                let reading = stream::Reading {
                    since,
                    ttl: self.history.ttl,
                    max_bytes: self.ctx.settings.max_message_bytes,
                    scratch: &mut self.scratch,
                };
                let page = reply.page(reading);
                let items = HistoryItems { acked, items: history::items_json(&page.entries), complete: page.complete };
                self.answer(asker, Answer::History(Box::new(items)));
            }
            Expect::Ack => {
                let moved = matches!(reply, Reply::Int(1));
                let history = &self.ctx.metrics.history;
                (if moved { &history.acks } else { &history.acks_ignored }).fetch_add(1, Relaxed);
            }
            Expect::QueryPart { query, index } => {
                let Some(pending) = self.queries.get_mut(&query) else { return Ok(()) };
                if let Some(count) = pending.counts.get_mut(index) {
                    *count = reply.sum();
                }
                pending.left -= 1;
                if pending.left == 0 {
                    if let Some(done) = self.queries.remove(&query) {
                        self.answer(done.reply, Answer::Presence(done.counts.into()));
                    }
                }
            }
        }
        Ok(())
    }

    /// An error reply. The connection stays unless Redis refuses herald as a whole.
    fn on_error(&mut self, expect: Expect, error: &str) -> Result<(), Failure> {
        match expect {
            Expect::FunctionLoad if self.history.enabled() => {
                // History cannot work at all without them: say so once and stop, rather than
                // run without the resume clients were promised.
                tracing::error!(
                    error,
                    "redis refused herald's functions (FUNCTION LOAD needs Redis 7.0 or later); \
                     history (HERALD_HISTORY_SIZE) cannot work: exiting"
                );
                std::process::exit(2);
            }
            Expect::FunctionLoad => {
                warn!(error, "redis refused herald's functions: presence is unavailable (FUNCTION LOAD needs Redis 7)");
            }
            Expect::History { target, reply, .. } => {
                warn!(error, "history read refused by redis");
                self.send_page(reply, target, None);
            }
            Expect::HistoryApi { reply, .. } => {
                warn!(error, "history read refused by redis");
                self.answer(reply, Answer::Failed("redis refused the history read".into()));
            }
            Expect::Presence(user) => {
                warn!(error, "presence update refused by redis");
                self.presence.touch(user);
            }
            Expect::SurveyPublished(survey) => {
                warn!(error, "fleet request refused by redis");
                if let Some(done) = self.surveys.failed(survey) {
                    self.answer(done.reply, Answer::Failed("redis refused the fleet request".into()));
                }
            }
            Expect::QueryPart { query, .. } => {
                if let Some(done) = self.queries.remove(&query) {
                    self.answer(done.reply, Answer::Failed("redis refused the presence query".into()));
                }
            }
            other => debug!(error, ?other, "fleet command refused"),
        }
        Ok(())
    }

    /// One step of sweeping a dead instance: the next batch of its users.
    fn sweep_step(&mut self, dead: Arc<str>) {
        let members = format!("herald:presence:members:{{{dead}}}");
        let batch = SWEEP_BATCH.to_string();
        self.command([b"SRANDMEMBER".as_slice(), members.as_bytes(), batch.as_bytes()], Expect::SweepMembers(dead));
    }

    /// Writes `instance`'s count of `user` through `herald_presence_set`.
    fn write_count(&mut self, user: &str, instance: &str, count: u32, expect: Expect) {
        let key = self.presence_key(user);
        let user_json = id_as_json(user).to_string();
        let count = count.to_string();
        let timestamp = crate::message::rfc3339_millis(SystemTime::now());
        let channel = self.presence_channel.clone();
        self.command(
            [
                b"FCALL".as_slice(),
                b"herald_presence_set",
                b"1",
                key.as_bytes(),
                instance.as_bytes(),
                count.as_bytes(),
                user_json.as_bytes(),
                channel.as_bytes(),
                timestamp.as_bytes(),
            ],
            expect,
        );
    }

    /// A transition this instance's call saw: Redis's channel already has the event; the
    /// webhook gets it too.
    fn emitted(&self, user: &str, status: Status, connections: u64) {
        self.ctx.metrics.presence_events.fetch_add(1, Relaxed);
        if let Some(webhook) = &self.webhook {
            webhook.post(presence::event_json(user, status, connections, SystemTime::now()));
        }
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        for done in self.surveys.expire(now) {
            self.answer(done.reply, Answer::Closed(done.closed));
        }
        if self.cmd.conn.is_none() {
            return;
        }
        if self.presence.has_dirty() && now >= self.next_flush {
            self.next_flush = now + FLUSH_EVERY;
            let table = &self.ctx.routing.table;
            let updates = self.presence.take_updates(UPDATES_PER_FLUSH, |user| table.connections_of(user));
            let (instance, members) = (self.instance.clone(), self.members_key.clone());
            for update in updates {
                if update.join_members {
                    self.command([b"SADD".as_slice(), members.as_bytes(), update.user.as_bytes()], Expect::Ignore);
                }
                self.write_count(&update.user, &instance, update.count, Expect::Presence(update.user.clone()));
                if update.leave_members {
                    self.command([b"SREM".as_slice(), members.as_bytes(), update.user.as_bytes()], Expect::Ignore);
                }
            }
        }
        if now >= self.next_beat {
            self.next_beat = now + BEAT_EVERY;
            let lifetime = BEAT_LIFETIME.as_millis().to_string();
            let instance = self.instance.clone();
            let (key, one) = (INSTANCES_KEY.as_bytes(), b"1".as_slice());
            let beat =
                [b"FCALL".as_slice(), b"herald_presence_beat", one, key, instance.as_bytes(), lifetime.as_bytes()];
            self.command(beat, Expect::Ignore);
            self.command([b"FCALL".as_slice(), b"herald_presence_dead", one, key], Expect::Dead);
        }
    }

    fn lost_sub(&mut self, failure: Failure) {
        warn!(error = %failure, redis = %self.url.redacted(), "fleet control connection lost; retrying");
        drop_conn(&mut self.sub, &self.poll);
        self.sub_ready = false;
    }

    fn lost_cmd(&mut self, failure: Failure) {
        warn!(error = %failure, redis = %self.url.redacted(), "fleet command connection lost; retrying");
        drop_conn(&mut self.cmd, &self.poll);
        for (expect, _) in std::mem::take(&mut self.expect) {
            match expect {
                Expect::SurveyPublished(survey) => {
                    if let Some(done) = self.surveys.failed(survey) {
                        self.answer(done.reply, Answer::Closed(done.closed));
                    }
                }
                Expect::QueryPart { query, .. } => {
                    if let Some(done) = self.queries.remove(&query) {
                        self.answer(done.reply, Answer::Failed("redis connection lost".into()));
                    }
                }
                Expect::History { target, reply, .. } => self.send_page(reply, target, None),
                Expect::HistoryApi { reply, .. } => self.answer(reply, Answer::Failed("redis connection lost".into())),
                _ => {}
            }
        }
    }
}

/// `herald_history`'s answer, owned.
fn history_reply(reply: Reply) -> HistoryReply {
    let Reply::List(items) = reply else { return HistoryReply::default() };
    let mut items = items.into_iter();
    let text = |r: Option<Reply>| if let Some(Reply::Text(t)) = r { t } else { String::new() };
    let number = |r: Option<Reply>| match r {
        Some(Reply::Int(n)) => n.max(0) as u64,
        Some(Reply::Text(t)) => t.parse().unwrap_or(0),
        _ => 0,
    };
    let epoch = history::parse_epoch(&text(items.next()));
    let (top, oldest, acked) = (number(items.next()), number(items.next()), number(items.next()));
    let entries = match items.next() {
        Some(Reply::List(entries)) => entries
            .into_iter()
            .filter_map(|e| if let Reply::Text(t) = e { Some(t.into_bytes()) } else { None })
            .collect(),
        _ => Vec::new(),
    };
    HistoryReply { epoch, top, oldest, acked, entries }
}

fn open(url: &RedisUrl, tls: Option<&RedisTls>, link: &mut Link, poll: &Poll) -> Option<Conn> {
    let result = Conn::open(url, tls, link.name, CONNECT_TIMEOUT, MAX_REPLY).and_then(|mut conn| {
        poll.registry()
            .register(&mut conn.stream, link.token, Interest::READABLE | Interest::WRITABLE)
            .map_err(Failure::Io)?;
        Ok(conn)
    });
    match result {
        Ok(conn) => Some(conn),
        Err(failure) => {
            debug!(error = %failure, connection = link.name, "fleet connection attempt failed");
            link.retry_at = Instant::now() + link.backoff.next_delay();
            None
        }
    }
}

fn drop_conn(link: &mut Link, poll: &Poll) {
    if let Some(mut conn) = link.conn.take() {
        let _ = poll.registry().deregister(&mut conn.stream);
    }
    link.retry_at = Instant::now() + link.backoff.next_delay();
}
