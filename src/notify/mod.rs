//! Notifications: tell people (and programs) what needs them, through the channels under `notify`
//! in `config.yaml`, at least once, without ever slowing the supervisor.
//!
//! Theory of operation. Nothing here is called by the supervisor loop. The loop records what
//! happened the way it always does: task transitions become `task_events` rows in the SQLite
//! mirror (numbered in commit order, restored by the reconciler after a crash), and agent events
//! (cooldown, needs_login, stalled, budget) become `notices` rows through the same writer. The
//! [`sender`] runs on a thread of its own beside the loop: each pass it moves, per channel, what is
//! past the channel's cursor into the outbox (the event built, filtered and queued in the
//! transaction that moves the cursor), then delivers what is due: one try, then again after 1 s,
//! 2 s, 4 s … (at most 5 min apart), until it is accepted or the channel's `give_up_minutes` have
//! passed, when it is marked given up and `orchestrate status` shows it. Every delivery of an
//! event carries the same id, so a receiver that got it twice (a crash between its answer and our
//! record of it) can tell.
//!
//! - [`Event`]: what a channel is sent, built from a task event or a notice;
//! - [`deliver`]: one try on one channel (a webhook POST, signed; a command with the event on
//!   stdin), and `orchestrate notify test`;
//! - [`sender`]: the thread, the cursors and the back-off.
//!
//! It never writes the tree and never decides about a task; it reads the mirror and writes only
//! the outbox's own tables.

use serde::{Deserialize, Serialize};

use crate::config::{NotifyChannel, NotifyOn};
use crate::mirror::outbox::{Notice, TaskEvent};

pub mod deliver;
pub mod sender;

/// The event a channel receives (a webhook's JSON body, a command's stdin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Stable across retries and restarts: `<host>:<task>:v<version>` for a task event,
    /// `<host>:<kind>:<agent>:<unix ms>` for an agent event.
    pub id: String,
    /// One of the `on` values (`test` from `orchestrate notify test`).
    pub kind: String,
    /// When it happened (RFC 3339, UTC).
    pub at: String,
    /// The supervisor's host.
    pub host: String,
    /// A short line ("task_007 failed").
    pub title: String,
    /// What a person reads.
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// When an agent's pause ends (cooldown, budget), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskInfo>,
}

/// The task a task event is about, as the mirror has it (redacted like every mirror row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    pub id: String,
    /// `completed` or `failed`.
    pub state: String,
    pub version: u64,
    pub description: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    pub review_required: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files_modified: Vec<String>,
    /// How its changes landed: `applied`, `committed`, `kept` or `conflict`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_file: Option<String>,
}

impl Event {
    /// The kind as the `on` list names it (`None` for `test`).
    pub fn on(&self) -> Option<NotifyOn> {
        NotifyOn::parse(&self.kind)
    }
}

/// The first line of `s`, at most `n` characters.
fn line(s: &str, n: usize) -> String {
    let l = s.lines().find(|l| !l.trim().is_empty()).unwrap_or_default();
    if l.chars().count() > n {
        format!("{}…", l.chars().take(n - 1).collect::<String>())
    } else {
        l.to_string()
    }
}

/// The event a task transition is, if it is one a channel can want (a task reaching `completed`
/// or `failed`; `pending` and `running` are not).
pub fn task_event(e: &TaskEvent) -> Option<Event> {
    let kind = match e.state.as_str() {
        "failed" => NotifyOn::Failed,
        "completed" => {
            let p = e.payload.as_ref();
            if p.and_then(|p| p.workspace.as_ref())
                .is_some_and(|w| w.merge.as_deref() == Some("conflict"))
            {
                NotifyOn::MergeConflict
            } else if p.is_some_and(|p| p.review_required) {
                NotifyOn::ReviewRequired
            } else {
                NotifyOn::Completed
            }
        }
        _ => return None,
    };
    let p = e.payload.clone().unwrap_or_default();
    let id = &e.task_id;
    let on = e
        .agent
        .as_deref()
        .map(|a| format!(" on {a}"))
        .unwrap_or_default();
    let ws = p.workspace.clone().unwrap_or_default();
    let (title, mut message) = match kind {
        NotifyOn::Failed => (
            format!("{id} failed"),
            format!(
                "{id} failed{on}: {}",
                line(p.error.as_deref().unwrap_or("no error recorded"), 300)
            ),
        ),
        NotifyOn::MergeConflict => (
            format!("{id} has a merge conflict"),
            format!(
                "{id} completed{on}, but its changes conflict with the working tree ({}); they are kept on branch {}: resolve, then `orchestrate merge {id}`",
                ws.conflicts.join(", "),
                ws.branch.as_deref().unwrap_or("-")
            ),
        ),
        NotifyOn::ReviewRequired => (
            format!("{id} needs review"),
            format!(
                "{id} completed{on} and changed a file under security.review_paths; review it: {} file(s) changed",
                p.files_modified_total
                    .unwrap_or(p.files_modified.len() as u64)
            ),
        ),
        _ => (
            format!("{id} completed"),
            format!(
                "{id} completed{on}: {} file(s) changed",
                p.files_modified_total
                    .unwrap_or(p.files_modified.len() as u64)
            ),
        ),
    };
    if !p.description.is_empty() {
        message.push_str(&format!("\nTask: {}", line(&p.description, 200)));
    }
    Some(Event {
        id: format!("{}:{id}:v{}", e.host, e.version),
        kind: kind.as_str().into(),
        at: e.at.clone(),
        host: e.host.clone(),
        title: format!("orchestrate: {title}"),
        message,
        agent: e.agent.clone(),
        until: None,
        task: Some(TaskInfo {
            id: id.clone(),
            state: e.state.clone(),
            version: e.version,
            description: p.description,
            labels: p.labels,
            error: p.error,
            attempts: p.attempts,
            cost_usd: p.cost_usd,
            review_required: p.review_required,
            files_modified: p.files_modified,
            merge: ws.merge,
            branch: ws.branch,
            conflicts: ws.conflicts,
            output_file: p.output_file,
            diff_file: p.diff_file,
        }),
    })
}

/// The event an agent notice is.
pub fn notice_event(n: &Notice, host: &str) -> Event {
    let who = n.agent.as_deref().unwrap_or("all agents");
    let title = match n.kind {
        NotifyOn::Cooldown => format!("{who} is cooling down"),
        NotifyOn::Budget => format!("{who} reached its budget"),
        NotifyOn::NeedsLogin => format!("{who} needs a login"),
        NotifyOn::Stalled => format!(
            "{} stalled on {who}",
            n.task_id.as_deref().unwrap_or("a task")
        ),
        other => format!("{who}: {}", other.as_str()),
    };
    Event {
        id: n.id.clone(),
        kind: n.kind.as_str().into(),
        at: n.at.clone(),
        host: host.to_string(),
        title: format!("orchestrate: {title}"),
        message: n.message.clone(),
        agent: n.agent.clone(),
        until: n.until.clone(),
        task: None,
    }
}

/// The sample `orchestrate notify test` sends.
pub fn sample(host: &str, channel: &str) -> Event {
    let now = time::OffsetDateTime::now_utc();
    Event {
        id: format!(
            "{host}:test:{channel}:{}",
            now.unix_timestamp_nanos() / 1_000_000
        ),
        kind: "test".into(),
        at: crate::fsutil::fmt_time(now),
        host: host.to_string(),
        title: "orchestrate: test notification".into(),
        message: format!(
            "A test from orchestrate on {host} (channel {channel}): this channel works."
        ),
        agent: None,
        until: None,
        task: None,
    }
}

/// Whether `channel` wants `event`: its kind is in `on`, and it passes the filter.
pub fn wanted(channel: &NotifyChannel, event: &Event) -> bool {
    let Some(kind) = event.on() else {
        return false;
    };
    if !channel.wants(kind) {
        return false;
    }
    let f = &channel.filter;
    if !f.agents.is_empty() && !event.agent.as_ref().is_some_and(|a| f.agents.contains(a)) {
        return false;
    }
    if !f.labels.is_empty()
        && !event
            .task
            .as_ref()
            .is_some_and(|t| t.labels.iter().any(|l| f.labels.contains(l)))
    {
        return false;
    }
    if let Some(re) = &f.regex
        && !event
            .task
            .as_ref()
            .is_some_and(|t| re.is_match(&t.description))
    {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::mirror::Payload;

    fn ev(state: &str, payload: Payload) -> TaskEvent {
        TaskEvent {
            seq: 1,
            host: "h".into(),
            task_id: "t1".into(),
            version: 3,
            state: state.into(),
            at: "2026-01-01T00:00:00.000Z".into(),
            agent: Some("a".into()),
            payload: Some(payload),
        }
    }

    #[test]
    fn a_completed_task_is_the_most_specific_kind() {
        let plain = task_event(&ev("completed", Payload::default())).expect("event");
        assert_eq!(
            (plain.kind.as_str(), plain.id.as_str()),
            ("completed", "h:t1:v3")
        );
        let review = Payload {
            review_required: true,
            ..Default::default()
        };
        assert_eq!(
            task_event(&ev("completed", review)).expect("event").kind,
            "review_required"
        );
        let conflict = Payload {
            review_required: true,
            workspace: Some(crate::record::WorkspaceResult {
                merge: Some("conflict".into()),
                conflicts: vec!["a.txt".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = task_event(&ev("completed", conflict)).expect("event");
        assert_eq!(c.kind, "merge_conflict");
        assert!(c.message.contains("a.txt"), "{}", c.message);
        assert!(task_event(&ev("running", Payload::default())).is_none());
    }

    #[test]
    fn filters_take_only_matching_tasks() {
        let cfg = Config::parse(
            "agents:\n  a: {kind: command, command: sh}\n  b: {kind: command, command: sh}\nnotify:\n  - command: x\n    on: [failed, completed, cooldown]\n    filter: {labels: [ci], agents: [a], description: deploy}\n",
            "config.yaml",
        )
        .expect("valid");
        let ch = &cfg.notify[0];
        let p = |labels: &[&str], d: &str| Payload {
            labels: labels.iter().map(|s| s.to_string()).collect(),
            description: d.into(),
            error: Some("boom".into()),
            ..Default::default()
        };
        let e = |state: &str, pl| task_event(&ev(state, pl)).expect("event");
        assert!(wanted(ch, &e("failed", p(&["ci"], "deploy now"))));
        assert!(wanted(
            ch,
            &e("completed", p(&["x", "ci"], "please deploy"))
        ));
        assert!(!wanted(ch, &e("failed", p(&["other"], "deploy now"))));
        assert!(!wanted(ch, &e("failed", p(&["ci"], "build"))));
        let mut other_agent = e("failed", p(&["ci"], "deploy"));
        other_agent.agent = Some("b".into());
        assert!(!wanted(ch, &other_agent));
        // An agent event has no task: a label or description filter lets none through.
        let n = Notice::new(
            "h",
            NotifyOn::Cooldown,
            Some("a"),
            None,
            "rests".into(),
            None,
        );
        assert!(!wanted(ch, &notice_event(&n, "h")));
    }
}
