//! The SQLite mirror of the spool (`state_dir/state.db`).
//!
//! The tree is the truth; this is a copy that answers read commands fast and feeds followers. One
//! writer thread owns the connection and batches transitions (a few ms), one transaction per batch:
//! version-guarded upserts (`WHERE excluded.version > tasks.version`, so a stale or replayed
//! transition can never move a task backwards) and one `task_events` row per applied transition, with
//! a sequence number. The reconciler rebuilds rows from the tree; it runs at start, periodically and as
//! `orchestrate mirror rebuild`. Losing the database loses nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::record::{Attempt, TaskResult, Terminal};
use crate::redact::Redactor;
use crate::spool::{Place, Spool};
use crate::task::{self, Task};

pub mod postgres;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS tasks(
    id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    agent TEXT,
    payload TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    note TEXT
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state);
CREATE TABLE IF NOT EXISTS attempts(
    task_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    agent TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    outcome TEXT NOT NULL,
    exit_code INTEGER,
    cost_usd REAL,
    input_tokens INTEGER,
    output_tokens INTEGER,
    session_id TEXT,
    PRIMARY KEY(task_id, n)
);
CREATE TABLE IF NOT EXISTS task_events(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    host TEXT NOT NULL,
    task_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    at TEXT NOT NULL,
    UNIQUE(task_id, version)
);
CREATE TABLE IF NOT EXISTS supervisors(
    host TEXT NOT NULL,
    instance TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    heartbeat_at TEXT NOT NULL
);
"#;

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

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

impl Op {
    /// The op with every free text a secret could hide in replaced by the redactor: descriptions,
    /// errors, notes, changed files, session ids (ids and paths orchestrate chose are left alone: the
    /// reconciler compares them with the tree). Every op reaches a database through here (the writer, the
    /// reconcile plan and the CLI's writes), so no backend has to remember to redact.
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
                        a.error = opt(a.error.take());
                        a.session_id = opt(a.session_id.take());
                        a
                    })
                    .collect();
                Op::Upsert { row, attempts }
            }
            Op::Note { id, note } => Op::Note {
                id,
                note: opt(note),
            },
            other => other,
        }
    }
}

pub fn open(path: &Path) -> Result<Connection> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let conn = Connection::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

/// Open for reading only; `None` when there is no database yet.
pub fn open_read(path: &Path) -> Result<Option<Connection>> {
    if !path.exists() {
        return Ok(None);
    }
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(Some(conn))
}

/// Apply a batch of operations in one transaction. Returns the number of events written.
pub fn apply(conn: &mut Connection, host: &str, ops: &mut Vec<Op>) -> Result<usize> {
    let tx = conn.transaction()?;
    let mut events = 0;
    let mut replies = Vec::new();
    {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO tasks(id, version, state, agent, payload, updated_at, note) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT(id) DO UPDATE SET version = excluded.version, state = excluded.state, agent = excluded.agent,
               payload = excluded.payload, updated_at = excluded.updated_at, note = excluded.note
             WHERE excluded.version > tasks.version",
        )?;
        let mut event = tx.prepare_cached(
            "INSERT OR IGNORE INTO task_events(host, task_id, version, state, at) VALUES(?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut attempt = tx.prepare_cached(
            "INSERT OR REPLACE INTO attempts(task_id, n, agent, started_at, finished_at, outcome, exit_code, cost_usd,
               input_tokens, output_tokens, session_id) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for op in ops.drain(..) {
            match op {
                Op::Upsert { row, attempts } => {
                    let payload = serde_json::to_string(&row.payload)?;
                    let changed = upsert.execute(params![
                        row.id,
                        row.version as i64,
                        row.state,
                        row.agent,
                        payload,
                        row.updated_at,
                        row.note
                    ])?;
                    if changed == 0 {
                        continue;
                    }
                    events += event.execute(params![
                        host,
                        row.id,
                        row.version as i64,
                        row.state,
                        row.updated_at
                    ])?;
                    for a in &attempts {
                        attempt.execute(params![
                            row.id,
                            a.n,
                            a.agent,
                            a.started_at,
                            a.finished_at,
                            a.outcome.as_str(),
                            a.exit_code,
                            a.cost_usd,
                            a.input_tokens.map(|v| v as i64),
                            a.output_tokens.map(|v| v as i64),
                            a.session_id
                        ])?;
                    }
                }
                Op::Note { id, note } => {
                    tx.execute(
                        "UPDATE tasks SET note = ?2 WHERE id = ?1",
                        params![id, note],
                    )?;
                }
                Op::Delete(id) => {
                    tx.execute("DELETE FROM tasks WHERE id = ?1", params![id])?;
                    tx.execute("DELETE FROM attempts WHERE task_id = ?1", params![id])?;
                }
                Op::Supervisor {
                    instance,
                    pid,
                    started_at,
                    heartbeat_at,
                    alive,
                } => {
                    if alive {
                        tx.execute(
                            "INSERT INTO supervisors(host, instance, pid, started_at, heartbeat_at) VALUES(?1, ?2, ?3, ?4, ?5)
                             ON CONFLICT(instance) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                            params![host, instance, pid, started_at, heartbeat_at],
                        )?;
                    } else {
                        tx.execute(
                            "DELETE FROM supervisors WHERE instance = ?1",
                            params![instance],
                        )?;
                    }
                }
                // Answered once the commit holding everything sent before them is durable.
                Op::Flush(reply) => replies.push(reply),
                Op::Reconcile { .. } => {
                    unreachable!("the writer thread runs reconciles outside batches")
                }
            }
        }
    }
    tx.commit()?;
    for r in replies {
        let _ = r.send(());
    }
    Ok(events)
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
    pub fn start(
        db: PathBuf,
        host: String,
        redactor: Redactor,
    ) -> Result<(Writer, std::thread::JoinHandle<()>)> {
        let mut conn = open(&db)?;
        let (tx, rx) = mpsc::channel::<Op>();
        let handle = std::thread::Builder::new()
            .name("mirror-writer".into())
            .spawn(move || {
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
                        commit_with_retries(&mut conn, &host, &mut ops);
                        let r = (|| -> Result<ReconcileReport> {
                            let known = known_rows(&conn)?;
                            let (plan, report) = reconcile_plan(
                                &spool,
                                max_task_bytes,
                                &known,
                                false,
                                skip_pending,
                            )?;
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
                            let mut plan = without_queued(plan, &queued);
                            apply(&mut conn, &host, &mut plan)?;
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
                    commit_with_retries(&mut conn, &host, &mut ops);
                }
            })?;
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
            && !matches!(op, Op::Flush(_) | Op::Reconcile { .. })
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

fn commit_with_retries(conn: &mut Connection, host: &str, ops: &mut Vec<Op>) {
    if ops.is_empty() {
        return;
    }
    for attempt in 1..=3 {
        let mut batch = std::mem::take(ops);
        let keep = batch.clone();
        match apply(conn, host, &mut batch) {
            Ok(_) => return,
            Err(e) => {
                crate::console::warn(&format!("mirror: write failed (try {attempt} of 3): {e:#}"));
                *ops = keep;
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    // Given up on this batch: the next reconcile rebuilds what it held from the tree.
    ops.clear();
}

fn place_state(place: Place) -> &'static str {
    place.state()
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
            cost_usd: {
                let c: f64 = result.attempts.iter().filter_map(|a| a.cost_usd).sum();
                (c > 0.0).then_some(c)
            },
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

/// Rows read from the tree with their attempts, and every id present in the tree.
pub type TreeRows = (
    Vec<(TaskRow, Vec<Attempt>)>,
    std::collections::HashSet<String>,
);

/// One attempt as the mirror lists it: (n, agent, started_at, finished_at, outcome, exit_code).
pub type AttemptLine = (u32, String, String, Option<String>, String, Option<i32>);

/// Rows for everything in the tree, read from the files. `known` holds the mirror's current
/// (state, version, file) per id; rows whose state and file already match are skipped unread.
pub fn rows_from_tree(
    spool: &Spool,
    max_task_bytes: u64,
    known: &Known,
    skip_pending: bool,
) -> Result<TreeRows> {
    let mut rows = Vec::new();
    let mut present = std::collections::HashSet::new();
    let pending_files: HashMap<&str, &str> = known
        .iter()
        .filter(|(_, (s, _, _))| s == "pending")
        .map(|(id, (_, _, f))| (f.as_str(), id.as_str()))
        .collect();
    let matches = |id: &str, state: &str, file: &str| {
        known
            .get(id)
            .is_some_and(|(s, _, f)| s == state && f == file)
    };
    // Furthest place first: a task is where its furthest file is, and a copy left in pending/ (a
    // resurrection awaiting quarantine) must never make a finished task look pending.
    for place in [
        Place::Completed,
        Place::Failed,
        Place::Assigned,
        Place::Pending,
    ] {
        if skip_pending && place == Place::Pending {
            // The caller reads pending/ itself (a starting supervisor): keep what the mirror knows.
            present.extend(
                known
                    .iter()
                    .filter(|(_, (st, _, _))| st == "pending")
                    .map(|(id, _)| id.clone()),
            );
            continue;
        }
        let dir = spool.dir(place);
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !task::is_task_file_name(&name)
                || (place == Place::Pending && task::is_conflict_copy(&name))
                || name.ends_with("_result.yaml")
                || name.ends_with(".claim.yaml")
            {
                continue;
            }
            let path = entry.path();
            let rel = rel_to(&spool.layout().tasks_dir, &path);
            let stem = crate::layout::file_stem(&name).to_string();
            match place {
                Place::Pending => {
                    // The id of a pending file is inside it; a file the mirror already lists is trusted.
                    if let Some(id) = pending_files.get(rel.as_str()) {
                        present.insert(id.to_string());
                        continue;
                    }
                    if let Ok((t, _)) = task::read_task(&path, max_task_bytes) {
                        if !present.insert(t.id.clone()) {
                            continue;
                        }
                        if !matches(&t.id, "pending", &rel) {
                            let h = spool.read_history(&t.id);
                            let row = pending_row(spool, &t, &path, h.as_ref());
                            rows.push((row, h.map(|h| h.attempts).unwrap_or_default()));
                        }
                    }
                }
                Place::Assigned => {
                    present.insert(stem.clone());
                    if matches(&stem, place_state(place), &rel) {
                        continue;
                    }
                    if let (Ok((t, _)), Some(c)) =
                        (task::read_task(&path, u64::MAX), spool.read_claim(&stem))
                    {
                        let mut attempts = c.history.clone();
                        attempts.push(running_attempt(&c));
                        rows.push((running_row(spool, &t, &c), attempts));
                    }
                }
                Place::Completed | Place::Failed => {
                    present.insert(stem.clone());
                    if matches(&stem, place_state(place), &rel) {
                        continue;
                    }
                    let t = if place == Place::Completed {
                        Terminal::Completed
                    } else {
                        Terminal::Failed
                    };
                    if let Some(r) = spool.read_result(t, &stem) {
                        let task = task::read_task(&path, u64::MAX).ok().map(|(t, _)| t);
                        rows.push((terminal_row(spool, &r, task.as_ref()), r.attempts.clone()));
                    } else if place == Place::Failed {
                        let err = std::fs::read_to_string(crate::layout::Layout::error_path(&path))
                            .unwrap_or_default();
                        rows.push((rejected_row(spool, &path, &err), vec![]));
                    }
                }
            }
        }
    }
    Ok((rows, present))
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

/// Bring the mirror in line with the tree. With `rebuild`, start from empty tables.
pub fn reconcile(
    conn: &mut Connection,
    spool: &Spool,
    host: &str,
    max_task_bytes: u64,
    rebuild: bool,
) -> Result<ReconcileReport> {
    if rebuild {
        conn.execute_batch("DELETE FROM tasks; DELETE FROM attempts;")?;
    }
    let known = known_rows(conn)?;
    let (mut ops, report) = reconcile_plan(spool, max_task_bytes, &known, rebuild, false)?;
    apply(conn, host, &mut ops)?;
    Ok(report)
}

/// Drop from a reconcile plan every operation on a task that `queued` transitions will bring forward.
///
/// The tree is read before the queue is drained, so it can be ahead of transitions still on their way
/// (a task already `completed` whose `running` op has not been written). Writing the tree's newer
/// version first would make the queued one stale and lose its event; the queue carries those tasks,
/// one event per transition, and the plan fills in only the rest.
pub fn without_queued(plan: Vec<Op>, queued: &[Op]) -> Vec<Op> {
    let ids: std::collections::HashSet<&str> = queued
        .iter()
        .filter_map(|op| match op {
            Op::Upsert { row, .. } => Some(row.id.as_str()),
            Op::Delete(id) | Op::Note { id, .. } => Some(id.as_str()),
            _ => None,
        })
        .collect();
    plan.into_iter()
        .filter(|op| match op {
            Op::Upsert { row, .. } => !ids.contains(row.id.as_str()),
            Op::Delete(id) => !ids.contains(id.as_str()),
            _ => true,
        })
        .collect()
}

/// What a mirror holds per task: (state, version, task file relative to the tasks dir).
pub type Known = HashMap<String, (String, u64, String)>;

/// The operations that bring a mirror holding `known` in line with the tree. Shared by the SQLite
/// and PostgreSQL backends so both reconcile by the same rules.
pub fn reconcile_plan(
    spool: &Spool,
    max_task_bytes: u64,
    known: &Known,
    rebuild: bool,
    skip_pending: bool,
) -> Result<(Vec<Op>, ReconcileReport)> {
    let (rows, present) = rows_from_tree(spool, max_task_bytes, known, skip_pending)?;
    // With another supervisor live on this tree, a transition it just made may still be on its way
    // to the mirrors; writing the tree's state first would make its op stale and lose its event. Such
    // tasks are left to their writer, and a later reconcile catches them if that writer died.
    // A rebuild starts from empty tables: leaving anything out would only make it wrong for longer.
    let others_live = !rebuild && crate::instance::live_instances(spool.layout()).len() > 1;
    let now = std::time::SystemTime::now();
    let recent = |rel: &str| {
        use std::os::unix::fs::MetadataExt;
        // A file gone since the tree was read has just moved: that is as recent as it gets.
        others_live
            && std::fs::symlink_metadata(spool.layout().tasks_dir.join(rel))
                .ok()
                .is_none_or(|m| {
                    // ctime, not mtime: a rename between spool directories changes only the ctime.
                    let changed = std::time::UNIX_EPOCH
                        + Duration::new(
                            m.ctime().max(0) as u64,
                            m.ctime_nsec().clamp(0, 999_999_999) as u32,
                        );
                    now.duration_since(changed).unwrap_or_default() < RECENT
                })
    };
    let mut report = ReconcileReport {
        upserted: 0,
        deleted: 0,
        skipped_recent: 0,
    };
    let mut ops: Vec<Op> = Vec::new();
    for (row, attempts) in rows {
        if recent(&row.payload.file) {
            report.skipped_recent += 1;
            continue;
        }
        // Rows read from the tree must win over whatever the mirror holds, even at an equal or lower
        // version (the mirror may hold a transition the tree later undid by hand): delete first.
        if let Some((state, version, _)) = known.get(&row.id)
            && *version >= row.version
            && *state != row.state
            && row.state != "pending"
        {
            ops.push(Op::Delete(row.id.clone()));
        }
        report.upserted += 1;
        ops.push(Op::Upsert { row, attempts });
    }
    for (id, (_, _, file)) in known.iter().filter(|(id, _)| !present.contains(*id)) {
        // Look again: a task renamed between two directory listings was in neither.
        if spool.settled_place(id).is_some()
            || (!file.is_empty() && spool.layout().tasks_dir.join(file).exists())
        {
            continue;
        }
        ops.push(Op::Delete(id.clone()));
        report.deleted += 1;
    }
    let ops = ops
        .into_iter()
        .map(|op| op.redacted(spool.redactor()))
        .collect();
    Ok((ops, report))
}

/// How long a task's latest transition belongs to the writer that made it (see [`reconcile_plan`]).
pub const RECENT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ReconcileReport {
    pub upserted: usize,
    pub deleted: usize,
    /// Tasks left alone because another live supervisor changed them moments ago.
    pub skipped_recent: usize,
}

fn known_rows(conn: &Connection) -> Result<Known> {
    let mut stmt =
        conn.prepare("SELECT id, state, version, json_extract(payload, '$.file') FROM tasks")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            (
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)? as u64,
                r.get::<_, Option<String>>(3)?.unwrap_or_default(),
            ),
        ))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

// ---- reads -------------------------------------------------------------------------------------

fn row_from_sql(r: &rusqlite::Row) -> rusqlite::Result<TaskRow> {
    let payload: String = r.get(4)?;
    Ok(TaskRow {
        id: r.get(0)?,
        version: r.get::<_, i64>(1)? as u64,
        state: r.get(2)?,
        agent: r.get(3)?,
        payload: serde_json::from_str(&payload).unwrap_or_default(),
        updated_at: r.get(5)?,
        note: r.get(6)?,
    })
}

pub fn list(conn: &Connection, state: Option<&str>) -> Result<Vec<TaskRow>> {
    let sql = "SELECT id, version, state, agent, payload, updated_at, note FROM tasks";
    let mut out = Vec::new();
    match state {
        Some(s) => {
            let mut stmt =
                conn.prepare(&format!("{sql} WHERE state = ?1 ORDER BY updated_at, id"))?;
            for r in stmt.query_map([s], row_from_sql)? {
                out.push(r?);
            }
        }
        None => {
            let mut stmt = conn.prepare(&format!("{sql} ORDER BY updated_at, id"))?;
            for r in stmt.query_map([], row_from_sql)? {
                out.push(r?);
            }
        }
    }
    Ok(out)
}

/// Pending tasks with a wait reason, without loading the rest of the pending set.
pub fn waiting(conn: &Connection) -> Result<Vec<TaskRow>> {
    let mut stmt = conn.prepare(
        "SELECT id, version, state, agent, payload, updated_at, note FROM tasks
         WHERE state = 'pending' AND note IS NOT NULL ORDER BY updated_at, id",
    )?;
    let rows = stmt.query_map([], row_from_sql)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn get(conn: &Connection, id: &str) -> Result<Option<TaskRow>> {
    Ok(conn
        .query_row(
            "SELECT id, version, state, agent, payload, updated_at, note FROM tasks WHERE id = ?1",
            [id],
            row_from_sql,
        )
        .optional()?)
}

pub fn counts(conn: &Connection) -> Result<Vec<(String, usize)>> {
    let mut stmt =
        conn.prepare("SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as usize))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentTotals {
    pub agent: String,
    pub attempts: u64,
    pub completed: u64,
    pub failed: u64,
    pub cost_usd: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

pub fn agent_totals(conn: &Connection) -> Result<Vec<AgentTotals>> {
    let mut stmt = conn.prepare(
        "SELECT agent, count(*), sum(outcome = 'completed'), sum(outcome != 'completed' AND finished_at IS NOT NULL),
                coalesce(sum(cost_usd), 0), coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0)
         FROM attempts GROUP BY agent ORDER BY agent",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(AgentTotals {
            agent: r.get(0)?,
            attempts: r.get::<_, i64>(1)? as u64,
            completed: r.get::<_, i64>(2)? as u64,
            failed: r.get::<_, i64>(3)? as u64,
            cost_usd: r.get(4)?,
            input_tokens: r.get::<_, i64>(5)? as u64,
            output_tokens: r.get::<_, i64>(6)? as u64,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub seq: i64,
    pub host: String,
    pub task_id: String,
    pub version: u64,
    pub state: String,
    pub at: String,
}

pub fn events_since(conn: &Connection, seq: i64, limit: usize) -> Result<Vec<Event>> {
    let mut stmt = conn.prepare(
        "SELECT seq, host, task_id, version, state, at FROM task_events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![seq, limit as i64], |r| {
        Ok(Event {
            seq: r.get(0)?,
            host: r.get(1)?,
            task_id: r.get(2)?,
            version: r.get::<_, i64>(3)? as u64,
            state: r.get(4)?,
            at: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[derive(Debug, Clone, Serialize)]
pub struct SupervisorRow {
    pub host: String,
    pub instance: String,
    pub pid: u32,
    pub started_at: String,
    pub heartbeat_at: String,
}

pub fn supervisors(conn: &Connection) -> Result<Vec<SupervisorRow>> {
    let mut stmt = conn.prepare(
        "SELECT host, instance, pid, started_at, heartbeat_at FROM supervisors ORDER BY started_at",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(SupervisorRow {
            host: r.get(0)?,
            instance: r.get(1)?,
            pid: r.get(2)?,
            started_at: r.get(3)?,
            heartbeat_at: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn attempts_of(conn: &Connection, id: &str) -> Result<Vec<AttemptLine>> {
    let mut stmt = conn.prepare(
        "SELECT n, agent, started_at, finished_at, outcome, exit_code FROM attempts WHERE task_id = ?1 ORDER BY n",
    )?;
    let rows = stmt.query_map([id], |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
        ))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}
