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
//! Connections of its own: one subscribed (control and reply channels), and the command
//! connections of [`super::fleet_links`] (one, or one per cluster master), pipelined, replies matched
//! in order. Nothing here ever blocks an event loop: loops report by an unbounded mailbox and
//! get answers by their own inboxes.
//!
//! In a Redis Cluster every key has its slot's master: a user's presence hash and history
//! stream live in the slot of the user's channel (`{hash tag}`), an instance's members set in
//! its own, the instances set (one key for the fleet) in its own; [`super::fleet_links`] sends each
//! command to the master of its key. The control and reply channels carry no key: they share
//! one slot (the reply channels take `{herald:control}` as hash tag), and every instance
//! subscribes on that slot's master and publishes there. In sharded mode with SSUBSCRIBE and
//! SPUBLISH, not PUBLISH: a classic PUBLISH would be relayed to every node of the cluster,
//! and its reply counts the subscribers of the node it was sent to only, while a survey needs
//! the exact number of instances that received it; SPUBLISH counts the shard's subscribers,
//! which are all the instances, and costs one node. A shard channel moved by a resharding or a
//! failover is pushed back (`sunsubscribe`) or its connection dies, and the subscription is
//! made again on the slot's new master. In classic mode SUBSCRIBE and PUBLISH on that same
//! master keep the count exact as well.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Receiver;
use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::conn::{Conn, Failure};
use super::fleet_links::{Cmd, Event, Links, Place, Reply};
use super::presence_sync::PresenceSync;
use super::resp::{self, Push, SubKind};
use super::slots::{self, NodeAddr};
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
/// Command connections take the tokens from here on.
const LINKS: usize = 2;

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
/// Bytes one reply on the subscribed connection may hold.
const MAX_SUB_REPLY: usize = 64 * 1024;
/// Refusals of the same kind are logged at most this often (the rest are counted).
const COMPLAIN_EVERY: Duration = Duration::from_secs(10);

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

impl Reply {
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

/// What a command's reply is for.
#[derive(Debug)]
enum Expect {
    Ignore,
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

/// The subscribed connection, with its own reconnect schedule.
struct SubLink {
    conn: Option<Conn>,
    /// The node it is (or is to be) open to.
    addr: Option<NodeAddr>,
    retry_at: Instant,
    backoff: Backoff,
    /// Both channels confirmed: this instance hears fleet requests and answers.
    ready: bool,
    warned: bool,
}

/// One kind of refusal, logged at most every [`COMPLAIN_EVERY`].
#[derive(Default)]
struct Complaint {
    logged_at: Option<Instant>,
    quiet: u64,
}

impl Complaint {
    /// Whether to log now; `quiet` says how many went unlogged since the last time.
    fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.logged_at.is_some_and(|at| now < at + COMPLAIN_EVERY) {
            self.quiet += 1;
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.quiet))
    }
}

pub struct FleetThread {
    ctx: Context,
    instance: Arc<str>,
    /// Sharded cluster: SSUBSCRIBE/SPUBLISH for the control and reply channels.
    sharded: bool,
    /// `herald:reply:` (`herald:reply:{herald:control}:` in a cluster) + an instance.
    reply_prefix: &'static str,
    reply_channel: String,
    members_key: String,
    presence_channel: String,
    webhook: Option<Arc<Webhook>>,
    poll: Poll,
    jobs: Receiver<FleetJob>,
    mailbox: Arc<FleetHandle>,
    sub: SubLink,
    links: Links<Expect>,
    surveys: Surveys,
    presence: PresenceSync,
    /// Users whose presence write failed, written again at `presence_retry_at`.
    presence_retry: Vec<Arc<str>>,
    presence_retry_at: Option<Instant>,
    presence_backoff: Backoff,
    presence_refused: Complaint,
    commands_failed: Complaint,
    queries: HashMap<u64, Query>,
    next_query: u64,
    next_beat: Instant,
    next_flush: Instant,
    history: history::Settings,
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
    /// `sharded`: a cluster in sharded pub/sub (herald_publish SPUBLISHes, the control
    /// channels are shard channels).
    pub fn new(
        place: Place,
        sharded: bool,
        ctx: Context,
        settings: FleetSettings,
        poll: Poll,
        jobs: Receiver<FleetJob>,
        mailbox: Arc<FleetHandle>,
    ) -> FleetThread {
        let now = Instant::now();
        let instance = settings.instance;
        let reply_prefix = match place {
            Place::Standalone(_) => "herald:reply:",
            Place::Cluster(_) => "herald:reply:{herald:control}:",
        };
        // herald_publish reaches a channel's subscribers the way the reader subscribes.
        let library = stream::library(&settings.history, if sharded { "SPUBLISH" } else { "PUBLISH" });
        let links = Links::new(place, ctx.settings.tls.clone(), library, LINKS);
        FleetThread {
            ctx,
            sharded,
            reply_prefix,
            reply_channel: format!("{reply_prefix}{instance}"),
            members_key: format!("herald:presence:members:{{{instance}}}"),
            instance,
            presence_channel: settings.presence_channel,
            webhook: settings.webhook,
            poll,
            jobs,
            mailbox,
            sub: SubLink {
                conn: None,
                addr: None,
                retry_at: now,
                backoff: Backoff::new(),
                ready: false,
                warned: false,
            },
            links,
            surveys: Surveys::default(),
            presence: PresenceSync::default(),
            presence_retry: Vec::new(),
            presence_retry_at: None,
            presence_backoff: Backoff::new(),
            presence_refused: Complaint::default(),
            commands_failed: Complaint::default(),
            queries: HashMap::new(),
            next_query: 0,
            next_beat: now,
            next_flush: now,
            history: settings.history,
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
            self.links.sync_map();
            self.follow_control_slot();
            self.links.connect_due(&self.poll);
            self.connect_sub_if_due();
            self.take_jobs();
            self.links.send_delayed(&self.poll);
            if let Err(failure) = self.read_sub() {
                self.lost_sub(failure);
            }
            self.links.exchange(&self.poll);
            self.on_events();
            self.on_timers();
            self.on_events();
            if let Some(conn) = self.sub.conn.as_mut() {
                if let Err(e) = conn.flush() {
                    self.lost_sub(Failure::Io(e));
                }
            }
            self.links.flush(&self.poll);
            self.on_events();
        }
    }

    fn next_wake(&self) -> Duration {
        let now = Instant::now();
        let mut at = self.next_beat;
        if self.presence.has_dirty() {
            at = at.min(self.next_flush);
        }
        if let Some(retry) = self.presence_retry_at {
            at = at.min(retry);
        }
        if let Some(deadline) = self.surveys.next_deadline() {
            at = at.min(deadline);
        }
        if let Some(links) = self.links.next_wake() {
            at = at.min(links);
        }
        if self.sub.conn.is_none() {
            at = at.min(self.sub.retry_at);
        }
        at.saturating_duration_since(now).max(Duration::from_millis(1))
    }

    /// The slot of the control and reply channels.
    fn control_slot() -> u16 {
        slots::key_slot(CONTROL_CHANNEL.as_bytes())
    }

    /// When the slot map gives the control slot another master, the subscription moves
    /// there. (A slot without a master keeps the connection it has: there is no better one.)
    fn follow_control_slot(&mut self) {
        let Some(owner) = self.links.owner(Self::control_slot()) else { return };
        if self.sub.conn.is_some() && self.sub.addr.as_ref() != Some(&owner) {
            let from = self.sub.addr.as_ref().map(|a| a.to_string()).unwrap_or_default();
            info!(from, to = %owner, "fleet control channel moves to its slot's new master");
            self.drop_sub();
            self.sub.retry_at = Instant::now();
        }
    }

    fn connect_sub_if_due(&mut self) {
        if self.sub.conn.is_some() || Instant::now() < self.sub.retry_at {
            return;
        }
        // Before the first slot map there is nowhere to go; the map's arrival wakes the thread.
        let Some(addr) = self.links.owner(Self::control_slot()) else { return };
        let url = self.links.url_of(&addr);
        let opened =
            Conn::open(&url, self.ctx.settings.tls.as_ref(), "herald-fleet-sub", CONNECT_TIMEOUT, MAX_SUB_REPLY)
                .and_then(|mut conn| {
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    self.poll.registry().register(&mut conn.stream, SUB, interest).map_err(Failure::Io)?;
                    Ok(conn)
                });
        match opened {
            Ok(mut conn) => {
                let channels = [CONTROL_CHANNEL, self.reply_channel.as_str()];
                let kind = if self.sharded { SubKind::SSubscribe } else { SubKind::Subscribe };
                resp::encode_subscription(conn.commands(), kind, channels.iter().map(|c| c.as_bytes()));
                self.sub.conn = Some(conn);
                self.sub.addr = Some(addr);
            }
            Err(failure) => {
                if self.sub.warned {
                    debug!(error = %failure, redis = %url.redacted(), "fleet control connection attempt failed");
                } else {
                    warn!(error = %failure, redis = %url.redacted(), "fleet control connection failed; retrying");
                    self.sub.warned = true;
                }
                self.sub.retry_at = Instant::now() + self.sub.backoff.next_delay();
                if let Some(topology) = self.links.topology() {
                    topology.refresh();
                }
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
                    let channel = format!("{}{asker}", self.reply_prefix);
                    let body = serde_json::to_string(&answer).unwrap_or_default();
                    self.command([self.publish_command(), channel.as_bytes(), body.as_bytes()], Expect::Ignore);
                }
                FleetJob::Query { users, reply } => self.start_query(users, reply),
                FleetJob::History { target, since, reply } => {
                    let expect = Expect::History { target: target.clone(), since, reply };
                    self.read_history(&target, since, history::PAGE, expect);
                }
                FleetJob::HistoryApi { user, since, limit, reply } => {
                    self.read_history(&user, since, limit, Expect::HistoryApi { since, reply });
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
                    self.command(args, Expect::Ack);
                }
            }
        }
    }

    /// How this instance publishes on the control and reply channels.
    fn publish_command(&self) -> &'static [u8] {
        if self.sharded { b"SPUBLISH" } else { b"PUBLISH" }
    }

    /// Sends one command to the node serving its key; its reply or its failure comes back
    /// as an event.
    fn command<const N: usize>(&mut self, args: [&[u8]; N], expect: Expect) {
        self.links.send(Cmd::new(&args, expect), &self.poll);
    }

    /// Whether the master of the control slot has a command connection.
    fn control_up(&self) -> bool {
        self.links.owner(Self::control_slot()).is_some_and(|addr| self.links.is_up(&addr))
    }

    fn start_disconnect(&mut self, user: Arc<str>, reply: ReplyTo) {
        if !self.sub.ready || !self.control_up() {
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
            [self.publish_command(), CONTROL_CHANNEL.as_bytes(), body.as_bytes()],
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
        if users.is_empty() {
            self.answer(reply, Answer::Presence(Box::default()));
            return;
        }
        self.next_query += 1;
        let query = self.next_query;
        // Registered first: a part may fail at once (its node unreachable).
        self.queries.insert(query, Query { reply, counts: vec![0; users.len()], left: users.len() });
        for (index, user) in users.iter().enumerate() {
            let key = self.presence_key(user);
            self.command([b"HVALS".as_slice(), key.as_bytes()], Expect::QueryPart { query, index });
        }
    }

    fn channel_of(&self, target: &Target) -> String {
        super::super::channel_of(target, &self.ctx.settings.user_prefix, &self.ctx.settings.topic_prefix)
    }

    /// Asks for up to `limit` entries of `target`'s stream after `since`.
    fn read_history(&mut self, target: &Target, since: Since, limit: usize, expect: Expect) {
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
        self.command(args, expect);
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
                Some(Push::Message { channel, payload } | Push::SMessage { channel, payload }) => {
                    Ok(Some((channel.to_vec(), payload.to_vec())))
                }
                Some(Push::Subscription { kind: SubKind::Subscribe | SubKind::SSubscribe, .. }) => {
                    confirmed += 1;
                    Ok(None)
                }
                // The slot left the node (resharding, failover): subscribe where it went.
                Some(Push::Subscription { kind: SubKind::SUnsubscribe, .. }) => {
                    Err(Failure::Protocol("the control channel's slot moved".into()))
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
        if confirmed > 0 && !self.sub.ready {
            self.sub.ready = true;
            self.sub.backoff.reset();
            if self.sub.warned {
                info!("fleet control channel subscribed again");
            }
            self.sub.warned = false;
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

    /// Replies and failures of the commands sent.
    fn on_events(&mut self) {
        for event in self.links.take_events() {
            match event {
                Event::Reply(expect, reply) => self.on_reply(expect, reply),
                Event::Failed(expect, why) => self.on_failed(expect, &why),
                Event::Connected(node) => {
                    info!(instance = %self.instance, %node, "fleet presence and control connected");
                    // Redis may have restarted (or a replica taken over without the latest
                    // writes), or swept this instance while it was away.
                    self.presence.resend_all();
                    self.next_beat = Instant::now();
                    self.next_flush = Instant::now();
                }
                Event::LoadRefused(error) => self.load_refused(&error),
            }
        }
    }

    fn load_refused(&self, error: &str) {
        if self.history.enabled() {
            // History cannot work at all without them: say so once and stop, rather than
            // run without the resume clients were promised.
            tracing::error!(
                error,
                "redis refused herald's functions (FUNCTION LOAD needs Redis 7.0 or later); \
                 history (HERALD_HISTORY_SIZE) cannot work: exiting"
            );
            std::process::exit(2);
        }
        warn!(error, "redis refused herald's functions: presence is unavailable (FUNCTION LOAD needs Redis 7)");
    }

    fn on_reply(&mut self, expect: Expect, reply: Reply) {
        if let Reply::Error(error) = &reply {
            self.on_error(expect, error);
            return;
        }
        match expect {
            Expect::Ignore => {}
            Expect::SurveyPublished(survey) => {
                let receivers = if let Reply::Int(n) = reply { n.max(0) as u64 } else { 0 };
                if let Some(done) = self.surveys.published(survey, receivers) {
                    self.answer(done.reply, Answer::Closed(done.closed));
                }
            }
            Expect::Presence(user) | Expect::Swept(user) => {
                self.presence_backoff.reset();
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
                    return;
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
                let Some(pending) = self.queries.get_mut(&query) else { return };
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
    }

    /// An error reply (redirects were followed before it came to this).
    fn on_error(&mut self, expect: Expect, error: &str) {
        match expect {
            Expect::History { target, reply, .. } => {
                warn!(error, "history read refused by redis");
                self.send_page(reply, target, None);
            }
            Expect::HistoryApi { reply, .. } => {
                warn!(error, "history read refused by redis");
                self.answer(reply, Answer::Failed("redis refused the history read".into()));
            }
            Expect::Presence(user) => {
                if let Some(quiet) = self.presence_refused.due() {
                    warn!(error, quiet, "presence update refused by redis; retrying with backoff");
                }
                self.retry_presence(user);
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
    }

    /// A command that got no reply: not sent (its node unreachable), redirected too often,
    /// or its connection died.
    fn on_failed(&mut self, expect: Expect, why: &str) {
        if let Some(quiet) = self.commands_failed.due() {
            warn!(error = why, quiet, "fleet command failed");
        }
        match expect {
            Expect::SurveyPublished(survey) => {
                // This instance's own part is still done, and counted.
                if let Some(done) = self.surveys.failed(survey) {
                    self.answer(done.reply, Answer::Closed(done.closed));
                }
            }
            Expect::QueryPart { query, .. } => {
                if let Some(done) = self.queries.remove(&query) {
                    self.answer(done.reply, Answer::Failed(format!("redis unavailable: {why}")));
                }
            }
            Expect::History { target, reply, .. } => self.send_page(reply, target, None),
            Expect::HistoryApi { reply, .. } => self.answer(reply, Answer::Failed(format!("redis unavailable: {why}"))),
            Expect::Presence(user) => self.retry_presence(user),
            Expect::Ack => {
                self.ctx.metrics.history.acks_ignored.fetch_add(1, Relaxed);
            }
            // A sweep not finished is taken up again at the next beat: the dead instance is
            // still listed, and so are its users.
            Expect::Ignore | Expect::Dead | Expect::SweepMembers(_) | Expect::Swept(_) => {}
        }
    }

    /// `user`'s count is written again after a backoff that grows while writes keep failing:
    /// a node that refuses or cannot be reached is not hammered every flush.
    fn retry_presence(&mut self, user: Arc<str>) {
        self.presence.forget(&user);
        self.presence_retry.push(user);
        if self.presence_retry_at.is_none() {
            self.presence_retry_at = Some(Instant::now() + self.presence_backoff.next_delay());
        }
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
        if !self.links.any_up() {
            return;
        }
        if self.presence_retry_at.is_some_and(|at| now >= at) {
            self.presence_retry_at = None;
            for user in std::mem::take(&mut self.presence_retry) {
                self.presence.touch(user);
            }
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
        let redis = self.sub.addr.as_ref().map(|a| self.links.url_of(a).redacted().to_string()).unwrap_or_default();
        warn!(error = %failure, redis, "fleet control connection lost; retrying");
        self.sub.warned = true;
        self.drop_sub();
        self.sub.retry_at = Instant::now() + self.sub.backoff.next_delay();
        if let Some(topology) = self.links.topology() {
            topology.refresh();
        }
    }

    fn drop_sub(&mut self) {
        if let Some(mut conn) = self.sub.conn.take() {
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
        self.sub.ready = false;
        self.sub.addr = None;
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
