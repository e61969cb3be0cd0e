//! The loop's mailbox: deliveries, confirmed subscriptions, answers to parked requests,
//! disconnects, drain and shutdown.

use super::EventLoop;
use crate::ids::Exclusion;
use crate::mailbox::LoopCmd;

/// Commands handled per pass before sockets get a turn.
const COMMANDS_PER_PASS: usize = 8192;

impl EventLoop {
    /// Handles every command already in the inbox. Called before this loop delivers its own
    /// share of a message inline: a delivery another loop routed here earlier (and whose
    /// publisher may already have had its answer) must reach each connection first.
    pub(super) fn catch_up(&mut self) {
        for _ in 0..crate::mailbox::INBOX_CAPACITY / COMMANDS_PER_PASS + 1 {
            self.drain_commands();
            if !self.more_commands {
                return;
            }
        }
    }

    pub(super) fn drain_commands(&mut self) {
        self.shared.loops()[self.id].clear_wake();
        self.more_commands = false;
        for _ in 0..COMMANDS_PER_PASS {
            let Ok(cmd) = self.inbox.try_recv() else { return };
            match cmd {
                LoopCmd::Deliver { to, frame, exclusion } => {
                    let none = Exclusion::default();
                    self.deliver(&to, &frame, exclusion.as_deref().unwrap_or(&none));
                }
                LoopCmd::SubscriptionReady { conn } => self.subscription_ready(conn),
                LoopCmd::ReplayPage { conn, target, page: Some(page) } => self.on_replay_page(conn, target, *page),
                LoopCmd::ReplayPage { conn, target, page: None } => self.replay_failed(conn, target),
                LoopCmd::Answer { conn, answer } => {
                    if !self.link.take_answer(conn) {
                        self.on_answer(conn, answer);
                    }
                }
                LoopCmd::Disconnect { user, tally } => self.disconnect_user(&user, &tally),
                LoopCmd::Drain { until } => self.begin_drain(until),
                LoopCmd::Shutdown => self.begin_shutdown(),
            }
        }
        self.more_commands = true;
    }
}
