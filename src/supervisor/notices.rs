//! Agent events for notifications: the loop says what it decided (a cooldown, a login mark, a
//! stalled attempt, a budget pause) and the mirror's writer puts it into the outbox's `notices`
//! table, where the `notify` sender picks it up. A channel send, like every mirror write: it never
//! waits, and it decides nothing.

use crate::config::NotifyOn;
use crate::mirror::Op;
use crate::mirror::outbox::Notice;

use super::Env;

impl Env {
    /// Record an agent event (`agent`: `None` for one about every agent, a global budget).
    pub(super) fn notice(
        &self,
        kind: NotifyOn,
        agent: Option<&str>,
        task_id: Option<&str>,
        message: String,
        until: Option<String>,
    ) {
        let n = Notice::new(&self.me.host, kind, agent, task_id, message, until);
        self.writer.send(Op::Notice(n));
    }
}
