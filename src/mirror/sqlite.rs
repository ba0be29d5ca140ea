//! The SQLite mirror (`state_dir/state.db`): schema, connections, batched writes and reads.
//!
//! It answers the read commands fast and feeds local followers. Writes come in batches, one
//! transaction each: version-guarded upserts (`WHERE excluded.version > tasks.version`, so a stale or
//! replayed transition can never move a task backwards) and one `task_events` row per applied
//! transition, with a sequence number. WAL and `synchronous=NORMAL`: readers on their own connections
//! never wait for the writer, and a power cut can lose only the last commits, which the reconciler
//! restores from the tree.
//!
//! The writer's connection ([`WriterDb`]) knows which file it opened: a database deleted or replaced
//! under a running supervisor (by hand, by a cleanup script, by `orchestrate` reading a mirror that
//! was gone) is noticed within [`IDENTITY_CHECK`] of the next write, and the file at the path is
//! opened (or created) in its place for the writer to rebuild from the tree.
//!
//! This file never decides what a row should say (the row builders and the reconcile plan do), and
//! it never writes from the supervisor loop's thread: the [`Writer`](super::Writer) thread and the
//! CLI's one-shot writes (`add`, `retry`, `cancel`, reconciles) are its only writers.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};

use super::Known;
use super::{AgentTotals, AttemptLine, Event, Op, SpentRow, SupervisorRow, TaskRow};

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
    check_result TEXT,
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

pub fn open(path: &Path) -> Result<Connection> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if !path.exists() {
        create(path)?;
    }
    let conn = Connection::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(SCHEMA)?;
    conn.execute_batch(super::outbox::SCHEMA)?;
    // A database made before attempts had checks gains the column (`CREATE TABLE IF NOT EXISTS`
    // leaves an existing table as it is).
    if !has_check_column(&conn)? {
        conn.execute_batch("ALTER TABLE attempts ADD COLUMN check_result TEXT")?;
    }
    Ok(conn)
}

/// Whether `attempts` has its `check_result` column (a database written by an older orchestrate,
/// not yet opened by a writer since, has not).
fn has_check_column(conn: &Connection) -> Result<bool> {
    let mut stmt =
        conn.prepare("SELECT 1 FROM pragma_table_info('attempts') WHERE name = 'check_result'")?;
    Ok(stmt.exists([])?)
}

/// How often, at most, the writer looks at whether its file is still the one at the path: one
/// `stat`, before a batch (the supervisor's heartbeat sends one even when idle).
pub const IDENTITY_CHECK: Duration = Duration::from_secs(1);

/// The writer thread's connection and the identity of the file it opened.
pub struct WriterDb {
    pub conn: Connection,
    path: PathBuf,
    /// (device, inode) of the file when it was opened.
    id: Option<(u64, u64)>,
    /// The `-wal` and `-shm` files beside it, with their (device, inode) once opened.
    sidecars: Vec<(PathBuf, Option<(u64, u64)>)>,
    checked: Instant,
    /// Opening a new file failed and was said: said again only once it works.
    failing: bool,
}

/// The `-wal` and `-shm` files of the database at `path`, with their identities.
fn sidecars(path: &Path) -> Vec<(PathBuf, Option<(u64, u64)>)> {
    ["-wal", "-shm"]
        .iter()
        .map(|suffix| {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            let p = PathBuf::from(name);
            let id = file_id(&p);
            (p, id)
        })
        .collect()
}

/// (device, inode) of the file at `path`, `None` when there is none.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl WriterDb {
    pub fn open(path: &Path) -> Result<WriterDb> {
        let conn = open(path)?;
        Ok(WriterDb {
            conn,
            path: path.to_path_buf(),
            id: file_id(path),
            sidecars: sidecars(path),
            checked: Instant::now(),
            failing: false,
        })
    }

    /// Whether the file was deleted or replaced since it was opened and the writer now holds a
    /// connection to the file at the path instead (created if need be, with empty tables): the
    /// caller rebuilds it from the tree. Looks at most once per [`IDENTITY_CHECK`].
    pub fn reopen_if_replaced(&mut self) -> bool {
        if self.checked.elapsed() < IDENTITY_CHECK {
            return false;
        }
        self.checked = Instant::now();
        let now = file_id(&self.path);
        if now.is_some() && now == self.id {
            return false;
        }
        // Only the database was deleted: its `-wal` and `-shm` are still ours, and a new database
        // must not start from them (SQLite would read our old pages into it). Our connection keeps
        // them open; only the names go.
        for (p, id) in &self.sidecars {
            if id.is_some() && file_id(p) == *id {
                let _ = std::fs::remove_file(p);
            }
        }
        match open(&self.path) {
            Ok(conn) => {
                // Closing the old connection must not checkpoint or delete `-wal`/`-shm` by name:
                // those names may belong to the new file now.
                let _ = self.conn.set_db_config(
                    rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
                    true,
                );
                self.conn = conn;
                self.id = file_id(&self.path);
                self.sidecars = sidecars(&self.path);
                self.failing = false;
                crate::console::warn(&format!(
                    "mirror: {} was deleted or replaced while the supervisor ran; writing to {} now, rebuilt from the tree",
                    self.path.display(),
                    if now.is_none() {
                        "a new one"
                    } else {
                        "the file there now"
                    }
                ));
                true
            }
            Err(e) => {
                if !self.failing {
                    crate::console::warn(&format!(
                        "mirror: {} was deleted or replaced while the supervisor ran, and cannot be \
                         opened again: {e:#}; will try again (the tree is unaffected)",
                        self.path.display()
                    ));
                    self.failing = true;
                }
                false
            }
        }
    }
}

/// Make a database with the tables at `path`, appearing there whole: a reader that finds the file
/// (`status` while a supervisor creates it) finds the tables in it. Built under a name of its own and
/// linked into place, so a file made there meanwhile by someone else is kept, never replaced.
fn create(path: &Path) -> Result<()> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".new-{}-{nanos}", std::process::id()));
    let tmp = PathBuf::from(name);
    let built = (|| -> Result<()> {
        // Rollback-journal mode until it is in place: a WAL file would be named after this name.
        Connection::open(&tmp)?.execute_batch(SCHEMA)?;
        match std::fs::hard_link(&tmp, path) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            // A file system without hard links: a rename could replace a file made meanwhile,
            // which its writer then notices (`WriterDb`) and rebuilds.
            Err(_) => Ok(std::fs::rename(&tmp, path)?),
            Ok(()) => Ok(()),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    built.with_context(|| format!("cannot create {}", path.display()))
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
               input_tokens, output_tokens, session_id, check_result)
               VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
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
                            a.session_id,
                            a.check.as_ref().map(serde_json::to_string).transpose()?
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
                Op::Notice(n) => super::outbox::insert_notice(&tx, &n)?,
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

/// Apply a batch, up to three tries 50 ms apart, on the writer thread (never the loop). `ops` ends
/// empty either way: a batch that still fails is dropped, and the tree still has it.
pub fn commit_with_retries(conn: &mut Connection, host: &str, ops: &mut Vec<Op>) {
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

/// What the mirror holds per task, for the reconcile plan.
pub fn known_rows(conn: &Connection) -> Result<Known> {
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

// ---- reads (through `read::Reader` for the surfaces) --------------------------------------------

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

/// Completed tasks whose changes stayed on their branch (the result names one), oldest first.
pub fn kept_branches(conn: &Connection) -> Result<Vec<TaskRow>> {
    let mut stmt = conn.prepare(
        "SELECT id, version, state, agent, payload, updated_at, note FROM tasks
         WHERE state = 'completed' AND json_extract(payload, '$.workspace.branch') IS NOT NULL
         ORDER BY updated_at, id",
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

pub fn events_since(conn: &Connection, seq: i64, limit: usize) -> Result<Vec<Event>> {
    let mut stmt = conn.prepare(
        "SELECT e.seq, e.host, e.task_id, e.version, e.state, e.at, t.agent,
                CASE WHEN e.state = 'failed' AND t.version = e.version
                     THEN json_extract(t.payload, '$.error') END
         FROM task_events e LEFT JOIN tasks t ON t.id = e.task_id
         WHERE e.seq > ?1 ORDER BY e.seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![seq, limit as i64], |r| {
        Ok(Event {
            seq: r.get(0)?,
            host: r.get(1)?,
            task_id: r.get(2)?,
            version: r.get::<_, i64>(3)? as u64,
            state: r.get(4)?,
            at: r.get(5)?,
            agent: r.get(6)?,
            error: r.get(7)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The latest event's sequence number (0 when there is none).
pub fn max_seq(conn: &Connection) -> Result<i64> {
    Ok(
        conn.query_row("SELECT coalesce(max(seq), 0) FROM task_events", [], |r| {
            r.get(0)
        })?,
    )
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

/// The attempts finished at or after `since` (RFC 3339, as the mirror writes times).
pub fn spent_since(conn: &Connection, since: &str) -> Result<Vec<SpentRow>> {
    let mut stmt = conn.prepare(
        "SELECT task_id, n, agent, finished_at, cost_usd, input_tokens, output_tokens
         FROM attempts WHERE finished_at >= ?1 ORDER BY finished_at, task_id, n",
    )?;
    let rows = stmt.query_map([since], |r| {
        Ok(SpentRow {
            task_id: r.get(0)?,
            n: r.get(1)?,
            agent: r.get(2)?,
            finished_at: r.get(3)?,
            cost_usd: r.get(4)?,
            input_tokens: r.get::<_, Option<i64>>(5)?.map(|v| v.max(0) as u64),
            output_tokens: r.get::<_, Option<i64>>(6)?.map(|v| v.max(0) as u64),
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn attempts_of(conn: &Connection, id: &str) -> Result<Vec<AttemptLine>> {
    let check = if has_check_column(conn)? {
        "check_result"
    } else {
        "NULL"
    };
    let mut stmt = conn.prepare(&format!(
        "SELECT n, agent, started_at, finished_at, outcome, exit_code, {check} FROM attempts WHERE task_id = ?1 ORDER BY n",
    ))?;
    let rows = stmt.query_map([id], |r| {
        Ok(AttemptLine {
            n: r.get(0)?,
            agent: r.get(1)?,
            started_at: r.get(2)?,
            finished_at: r.get(3)?,
            outcome: r.get(4)?,
            exit_code: r.get(5)?,
            check: r
                .get::<_, Option<String>>(6)?
                .and_then(|j| serde_json::from_str(&j).ok()),
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_from_before_checks_is_read_as_it_is_and_gains_the_column_when_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        let old = SCHEMA.replace("    check_result TEXT,\n", "");
        assert_ne!(old, SCHEMA);
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch(&old).expect("old schema");
        conn.execute(
            "INSERT INTO attempts(task_id, n, agent, started_at, outcome) VALUES('t', 1, 'a', 'x', 'completed')",
            [],
        )
        .expect("insert");
        drop(conn);
        let reader = open_read(&path).expect("open").expect("exists");
        let lines = attempts_of(&reader, "t").expect("read without the column");
        assert_eq!((lines.len(), lines[0].check.clone()), (1, None));
        drop(reader);
        let writer = open(&path).expect("open for writing");
        assert!(has_check_column(&writer).expect("pragma"));
        writer
            .execute(
                "UPDATE attempts SET check_result = ?1",
                [r#"{"command":"make test","passed":false,"exit_code":2,"duration_ms":5}"#],
            )
            .expect("update");
        let check = attempts_of(&writer, "t").expect("read")[0]
            .check
            .clone()
            .expect("a check");
        assert_eq!(
            (check.command.as_str(), check.exit_code),
            ("make test", Some(2))
        );
        // Opening again finds the column there and leaves it.
        drop(writer);
        open(&path).expect("open again");
    }
}
