//! The mirror: copies of the spool's state in SQLite (always, `state_dir/state.db`) and in
//! PostgreSQL (when `database.url` is set), for read commands, remote readers and followers.
//!
//! This file owns what both databases share: the row model ([`TaskRow`] and its [`Payload`],
//! [`Op`], [`Event`], [`SupervisorRow`], [`AttemptLine`], [`AgentTotals`]), the row builders that
//! turn a task's files into a row ([`pending_row`], [`running_row`], [`terminal_row`],
//! [`rejected_row`]), and the [`Writer`] fan-out: one SQLite writer thread that batches transitions
//! (a few ms, one transaction per batch) and rebuilds the database from the tree when its file was
//! deleted or replaced under it, plus a copy of every transition to the PostgreSQL writer when one
//! is configured. The rest lives beside it:
//!
//! - [`sqlite`]: the SQLite backend (schema, connections, batched version-guarded writes, reads);
//! - [`postgres`]: the PostgreSQL backend (connections, migrations, writes with `NOTIFY`, its writer
//!   thread, reads);
//! - [`reconcile`]: the tree → rows plan both backends reconcile by;
//! - [`read`]: one read API over either database, for every surface;
//! - [`outbox`]: the notification outbox (SQLite only): channels' cursors, undelivered events and
//!   the agent events ([`outbox::Notice`]) the loop sends as [`Op::Notice`].
//!
//! The mirror never leads the tree: nothing here moves, writes or decides about a task file, and
//! losing either database loses nothing (the reconciler and `orchestrate mirror rebuild` bring the
//! rows back from the files). Nor does it ever block the supervisor loop on a database: a transition
//! is a channel send; commits, retries and reconnects happen on the writers' own threads, and only
//! [`Writer::flush`] and [`Writer::reconcile`] (start and shutdown) wait, for a bounded time.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::record::{Attempt, Record, TaskResult};
use crate::redact::Redactor;
use crate::spool::{Place, Spool};
use crate::task::Task;
use reconcile::ReconcileReport;

pub mod outbox;
pub mod postgres;
pub mod read;
pub mod reconcile;
pub mod sqlite;

/// What the mirror keeps about a task beyond its state: enough for `tasks` and `show` to answer
/// without opening files.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Payload {
    pub description: String,
    #[serde(default)]
    pub priority: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_type: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dependencies: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The task's labels (notification filters match on them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// The task file, relative to the tasks directory.
    pub file: String,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default)]
    pub review_required: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files_modified: Vec<String>,
    /// As the result says: how many changed in all, and the file listing them, when
    /// `files_modified` holds only the first `record::FILES_IN_RECORD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_modified_total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_modified_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// A finished task's output and diff, relative to the project root (as its result file says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_file: Option<String>,
    /// A finished worktree task's git facts, as its result says: `status` lists the branches kept
    /// (`merge: kept` or `conflict`) from these without opening result files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<crate::record::WorkspaceResult>,
    /// A fan-out's candidates and winner, so remote readers (`show --database-url`, the API) list
    /// them. Its costs are the candidates', which have rows of their own: sums over rows use
    /// `cost_usd`, never these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fan_out: Option<crate::record::FanOutResult>,
}

/// What a mirror holds per task, as the reconciler compares it with the tree: (state, version, task
/// file relative to the tasks dir).
pub type Known = std::collections::HashMap<String, (String, u64, String)>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskRow {
    pub id: String,
    pub version: u64,
    pub state: String,
    pub agent: Option<String>,
    pub payload: Payload,
    pub updated_at: String,
    /// Why a pending task is not running (free text, not versioned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

// Ops move through a channel one at a time; boxing the large variant would add an allocation per
// transition and save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Op {
    Upsert {
        row: TaskRow,
        attempts: Vec<Attempt>,
    },
    Note {
        id: String,
        note: Option<String>,
    },
    Delete(String),
    Supervisor {
        instance: String,
        pid: u32,
        started_at: String,
        heartbeat_at: String,
        alive: bool,
    },
    /// An agent event for the notification outbox (SQLite only: the sender reads it there).
    Notice(outbox::Notice),
    Flush(mpsc::Sender<()>),
    /// Run the reconciler on the writer's connection, so it is serialised with every other write.
    Reconcile {
        spool: Box<Spool>,
        max_task_bytes: u64,
        /// Leave pending/ to the caller, who reads it anyway (a starting supervisor).
        skip_pending: bool,
        reply: Option<mpsc::Sender<Result<ReconcileReport, String>>>,
    },
}

/// One attempt as the mirror lists it (`show`): the columns of the `attempts` table that readers
/// use, fewer than the result file's [`Attempt`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AttemptLine {
    pub n: u32,
    pub agent: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub outcome: String,
    pub exit_code: Option<i32>,
    /// The attempt's check, when one ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<crate::record::CheckRecord>,
}

/// One finished attempt's spend (`crate::budget` sums them per window).
#[derive(Debug, Clone, PartialEq)]
pub struct SpentRow {
    pub task_id: String,
    pub n: u32,
    pub agent: String,
    pub finished_at: String,
    pub cost_usd: Option<f64>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
}

/// One `task_events` row: a transition the mirror applied, numbered in commit order.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    pub seq: i64,
    pub host: String,
    pub task_id: String,
    pub version: u64,
    pub state: String,
    pub at: String,
    /// The task's agent as its row names it when the event is read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Why it failed: only on a `failed` event, and only while the task's row is still that
    /// transition (a retried task's old failure has its result file, not a current row).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A supervisor as its heartbeat row tells it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SupervisorRow {
    pub host: String,
    pub instance: String,
    pub pid: u32,
    pub started_at: String,
    pub heartbeat_at: String,
}

/// What an agent's attempts add up to (`orchestrate agents`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AgentTotals {
    pub agent: String,
    pub attempts: u64,
    pub completed: u64,
    /// Finished attempts that did not complete (a running attempt is neither).
    pub failed: u64,
    pub cost_usd: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl Op {
    /// The op with every free text a secret could hide in replaced by the redactor: descriptions,
    /// errors, notes, changed files, session ids (ids and paths orchestrate chose are left alone: the
    /// reconciler compares them with the tree). Every op reaches a database through here (the writer,
    /// the reconcile plan and the CLI's writes), so no backend has to remember to redact.
    pub fn redacted(self, r: &Redactor) -> Op {
        let opt = |s: Option<String>| s.map(|s| r.redact_owned(s));
        match self {
            Op::Upsert { mut row, attempts } => {
                let p = &mut row.payload;
                p.description = r.redact_owned(std::mem::take(&mut p.description));
                p.task_type = opt(p.task_type.take());
                p.error = opt(p.error.take());
                p.owner = opt(p.owner.take());
                p.files_modified = p
                    .files_modified
                    .drain(..)
                    .map(|s| r.redact_owned(s))
                    .collect();
                row.note = opt(row.note.take());
                let attempts = attempts
                    .into_iter()
                    .map(|mut a| {
                        a.redact(r);
                        a
                    })
                    .collect();
                Op::Upsert { row, attempts }
            }
            Op::Note { id, note } => Op::Note {
                id,
                note: opt(note),
            },
            Op::Notice(mut n) => {
                n.message = r.redact_owned(n.message);
                Op::Notice(n)
            }
            other => other,
        }
    }
}

/// Handle to the writer thread. Cloning the sender is cheap; the thread ends when all senders drop.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Op>,
    redactor: Redactor,
    /// The PostgreSQL mirror, when configured: it gets a copy of every transition.
    pg: Option<postgres::PgWriter>,
}

impl Writer {
    /// The SQLite writer thread on `db`. `spool` and `max_task_bytes` are what it rebuilds the
    /// database from should the file be deleted or replaced while it runs.
    pub fn start(
        db: PathBuf,
        host: String,
        redactor: Redactor,
        spool: &Spool,
        max_task_bytes: u64,
    ) -> Result<(Writer, std::thread::JoinHandle<()>)> {
        let db = sqlite::WriterDb::open(&db)?;
        let (tx, rx) = mpsc::channel::<Op>();
        let rebuild = Op::Reconcile {
            spool: Box::new(spool.clone()),
            max_task_bytes,
            skip_pending: false,
            reply: None,
        };
        let handle = std::thread::Builder::new()
            .name("mirror-writer".into())
            .spawn(move || write_sqlite(db, &host, &rx, &rebuild))?;
        Ok((
            Writer {
                tx,
                redactor,
                pg: None,
            },
            handle,
        ))
    }

    /// Reconcile with the tree on the writer's connection and wait for it (bounded).
    pub fn reconcile(
        &self,
        spool: &Spool,
        max_task_bytes: u64,
        skip_pending: bool,
    ) -> Result<ReconcileReport, String> {
        let (tx, rx) = mpsc::channel();
        self.send(Op::Reconcile {
            spool: Box::new(spool.clone()),
            max_task_bytes,
            skip_pending,
            reply: Some(tx),
        });
        rx.recv_timeout(Duration::from_secs(600))
            .map_err(|_| "mirror writer did not answer".to_string())?
    }

    /// Ask for a reconcile without waiting for it.
    pub fn reconcile_later(&self, spool: &Spool, max_task_bytes: u64) {
        self.send(Op::Reconcile {
            spool: Box::new(spool.clone()),
            max_task_bytes,
            skip_pending: false,
            reply: None,
        });
    }

    pub fn with_postgres(mut self, pg: postgres::PgWriter) -> Writer {
        self.pg = Some(pg);
        self
    }

    pub fn send(&self, op: Op) {
        let op = op.redacted(&self.redactor);
        if let Some(pg) = &self.pg
            && !matches!(op, Op::Flush(_) | Op::Reconcile { .. } | Op::Notice(_))
        {
            pg.send(op.clone());
        }
        // The writer only stops when every sender is gone, so a send error cannot happen while we hold one.
        let _ = self.tx.send(op);
    }

    /// Wait until everything sent before has been committed (bounded).
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        self.send(Op::Flush(tx));
        let _ = rx.recv_timeout(Duration::from_secs(30));
        if let Some(pg) = &self.pg {
            pg.flush(Duration::from_secs(10));
        }
    }
}

/// The SQLite writer thread: whatever arrives within a few ms is one commit, and reconciles run
/// between batches on this connection, so they are serialised with every other write. Before a
/// batch, it looks (cheaply, at most once a second) whether its file is still the one at the path;
/// when it was deleted or replaced, the batch starts with `rebuild` (a reconcile) on the new file.
fn write_sqlite(mut db: sqlite::WriterDb, host: &str, rx: &mpsc::Receiver<Op>, rebuild: &Op) {
    let mut batch = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        // Gather whatever arrives within a few ms: one commit for a burst of transitions.
        let until = std::time::Instant::now() + Duration::from_millis(3);
        while batch.len() < 1000 {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        // Reconciles split the batch: what came before is committed first.
        let mut pending: std::collections::VecDeque<Op> = batch.drain(..).collect();
        if db.reopen_if_replaced() {
            // First the tree, leaving the tasks of this batch to it (as any reconcile does).
            pending.push_front(rebuild.clone());
        }
        let conn = &mut db.conn;
        let mut ops = Vec::new();
        while let Some(op) = pending.pop_front() {
            let Op::Reconcile {
                spool,
                max_task_bytes,
                skip_pending,
                reply,
            } = op
            else {
                ops.push(op);
                continue;
            };
            sqlite::commit_with_retries(conn, host, &mut ops);
            let r = (|| -> Result<ReconcileReport> {
                let known = sqlite::known_rows(conn)?;
                let (plan, report) =
                    reconcile::reconcile_plan(&spool, max_task_bytes, &known, false, skip_pending)?;
                // Everything sent while the tree was read joins this batch, and the plan
                // leaves those tasks to it.
                while let Ok(op) = rx.try_recv() {
                    pending.push_back(op);
                }
                let queued: Vec<Op> = pending
                    .iter()
                    .filter(|o| matches!(o, Op::Upsert { .. } | Op::Delete(_)))
                    .cloned()
                    .collect();
                let mut plan = reconcile::without_queued(plan, &queued);
                sqlite::apply(conn, host, &mut plan)?;
                Ok(report)
            })()
            .map_err(|e| format!("{e:#}"));
            if let Err(e) = &r {
                crate::console::warn(&format!("mirror: reconcile failed: {e}"));
            }
            if let Some(reply) = reply {
                let _ = reply.send(r);
            }
        }
        sqlite::commit_with_retries(conn, host, &mut ops);
    }
}

/// A mirror row for a parsed pending task.
pub fn pending_row(
    spool: &Spool,
    task: &Task,
    file: &Path,
    history: Option<&crate::record::History>,
) -> TaskRow {
    TaskRow {
        id: task.id.clone(),
        version: history.map(|h| h.version).unwrap_or(1),
        state: "pending".into(),
        agent: task.file.agent.clone(),
        payload: Payload {
            description: task.file.description.clone(),
            priority: task.priority(),
            task_type: task.file.task_type.clone(),
            dependencies: task.file.dependencies.clone(),
            parent: task.file.parent.clone(),
            labels: task.file.labels.clone(),
            file: rel_to(&spool.layout().tasks_dir, file),
            attempts: history.map(|h| h.attempts.len() as u32).unwrap_or(0),
            error: None,
            not_before: history.and_then(|h| h.not_before.clone()),
            ..Default::default()
        },
        updated_at: crate::fsutil::now_rfc3339(),
        note: None,
    }
}

pub fn running_row(spool: &Spool, task: &Task, claim: &crate::record::Claim) -> TaskRow {
    TaskRow {
        id: task.id.clone(),
        version: claim.version,
        state: "running".into(),
        agent: Some(claim.agent.clone()),
        payload: Payload {
            description: task.file.description.clone(),
            priority: task.priority(),
            task_type: task.file.task_type.clone(),
            dependencies: task.file.dependencies.clone(),
            parent: task.file.parent.clone(),
            labels: task.file.labels.clone(),
            file: rel_to(
                &spool.layout().tasks_dir,
                &spool.task_path(Place::Assigned, &task.id),
            ),
            attempts: claim.attempt,
            started_at: Some(claim.started_at.clone()),
            owner: Some(format!("{} pid {}", claim.host, claim.pid)),
            ..Default::default()
        },
        updated_at: claim.started_at.clone(),
        note: None,
    }
}

pub fn terminal_row(spool: &Spool, result: &TaskResult, task: Option<&Task>) -> TaskRow {
    let place = crate::spool::terminal_place(result.status);
    TaskRow {
        id: result.task_id.clone(),
        version: result.version,
        state: result.status.dir_name().into(),
        agent: result.agent.clone(),
        payload: Payload {
            description: result.description.clone(),
            priority: task.map(Task::priority).unwrap_or(1),
            task_type: task.and_then(|t| t.file.task_type.clone()),
            dependencies: task
                .map(|t| t.file.dependencies.clone())
                .unwrap_or_default(),
            parent: task.and_then(|t| t.file.parent.clone()),
            labels: task.map(|t| t.file.labels.clone()).unwrap_or_default(),
            file: rel_to(
                &spool.layout().tasks_dir,
                &spool.task_path(place, &result.task_id),
            ),
            attempts: result.attempts.len() as u32,
            error: result.error.clone(),
            finished_at: Some(result.finished_at.clone()),
            started_at: result.attempts.first().map(|a| a.started_at.clone()),
            review_required: result.review_required,
            files_modified: result.files_modified.clone(),
            files_modified_total: result.files_modified_total,
            files_modified_file: result.files_modified_file.clone(),
            cost_usd: {
                let c: f64 = result.attempts.iter().filter_map(|a| a.cost_usd).sum();
                (c > 0.0).then_some(c)
            },
            output_file: result.output_file.clone(),
            diff_file: result.diff_file.clone(),
            workspace: result.workspace.as_deref().cloned(),
            fan_out: result.fan_out.as_deref().cloned(),
            ..Default::default()
        },
        updated_at: result.finished_at.clone(),
        note: None,
    }
}

/// A row for a file rejected as invalid (no result file, an `.error.txt` beside it).
pub fn rejected_row(spool: &Spool, file: &Path, error: &str) -> TaskRow {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    TaskRow {
        id: crate::layout::file_stem(&name).to_string(),
        // Above any pending version a file of that name might have had: rejection is final.
        version: 1,
        state: "failed".into(),
        agent: None,
        payload: Payload {
            description: String::new(),
            file: rel_to(&spool.layout().tasks_dir, file),
            error: Some(error.lines().next().unwrap_or_default().to_string()),
            ..Default::default()
        },
        updated_at: crate::fsutil::now_rfc3339(),
        note: None,
    }
}

pub fn rel_to(base: &Path, p: &Path) -> String {
    p.strip_prefix(base).unwrap_or(p).display().to_string()
}

/// The attempt a claim stands for, while it runs.
pub fn running_attempt(c: &crate::record::Claim) -> Attempt {
    // `Interrupted` stands for "not finished": if the run is lost, recovery records it as such.
    Attempt::new(
        c.attempt,
        &c.agent,
        &c.started_at,
        crate::record::Outcome::Interrupted,
    )
}
