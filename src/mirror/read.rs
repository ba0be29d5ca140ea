//! One read API over either mirror: [`Reader`] answers the same questions with the same types
//! whether this folder's SQLite mirror or a PostgreSQL mirror (`--database-url`) holds the rows, and
//! [`Source::follow`] is the one event feed (`orchestrate follow`, and any later live view).
//!
//! Surfaces call these methods and never see SQL or a backend; which database answers is chosen
//! once, by whoever builds the [`Source`] (the CLI's `Project`). The only backend difference a caller
//! may ask about is [`Reader::is_local`]: whether the folder is at hand beside the rows.
//!
//! Never writes: SQLite readers get connections of their own (the writer thread keeps its one), and
//! PostgreSQL sessions are read-only.

use std::time::Duration;

use anyhow::Result;
use rusqlite::Connection;
use tokio_postgres::Client;

use super::postgres::{self, Notifications, read as pg};
use super::{AgentTotals, AttemptLine, Event, SpentRow, SupervisorRow, TaskRow, sqlite};

/// Events read per query while catching up.
const BATCH: usize = 1000;
/// How often the local mirror is polled for events (SQLite has no `NOTIFY`).
const POLL: Duration = Duration::from_millis(200);
/// How often PostgreSQL events are re-read even without a notification: the safety net for a lost one.
const SAFETY_NET: Duration = Duration::from_secs(2);
/// The first wait before a follower reconnects; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Where reads come from, chosen once per command.
pub enum Source {
    /// This folder's SQLite mirror, already open.
    Sqlite(Connection),
    /// A PostgreSQL mirror; connected by [`Source::reader`] or, reconnecting, by [`Source::follow`].
    Postgres { url: String, schema: String },
}

/// An open mirror to read from. Every method means the same on both backends.
pub enum Reader {
    Sqlite(Connection),
    Postgres(Remote),
}

/// A read-only PostgreSQL session with the runtime that drives it.
pub struct Remote {
    client: Client,
    notes: Notifications,
    // Dropped last: the connection task lives on it until the client is gone.
    rt: tokio::runtime::Runtime,
}

impl Remote {
    fn connect<F: Future<Output = Result<(Client, Notifications)>>>(
        connect: impl FnOnce() -> F,
    ) -> Result<Remote> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (client, notes) = rt.block_on(connect())?;
        Ok(Remote { client, notes, rt })
    }
}

impl Source {
    /// Open for one-shot reads. A PostgreSQL schema no supervisor has written to is an error here
    /// (nothing to wait for), unlike in [`Source::follow`].
    pub fn reader(self) -> Result<Reader> {
        match self {
            Source::Sqlite(conn) => Ok(Reader::Sqlite(conn)),
            Source::Postgres { url, schema } => Ok(Reader::Postgres(Remote::connect(|| {
                pg::connect_read_only(&url, &schema)
            })?)),
        }
    }

    /// Hand every event after `since` (`None`: from now on) to `sink`, in sequence order and once
    /// each, until `sink` returns true.
    ///
    /// The local mirror is polled. From PostgreSQL, a session `LISTEN`s *before* catching up, so no
    /// event falls between the catch-up read and the first notification; events are read by sequence
    /// (`seq > cursor`), which also dedupes; a re-read every few seconds is the safety net for a lost
    /// notification; a broken connection is re-opened with backoff (`on_retry` is told why and for
    /// how long) and the cursor carries over, so a follower that was away gets everything it missed,
    /// once, in order. Only errors that retrying cannot fix end it, and errors of `sink` itself (a
    /// closed stdout is not the database's fault, and reconnecting would not mend it).
    pub fn follow(
        self,
        since: Option<i64>,
        mut sink: impl FnMut(&Event) -> Result<bool>,
        mut on_retry: impl FnMut(&anyhow::Error, Duration),
    ) -> Result<()> {
        let sink_failed = std::cell::Cell::new(false);
        let mut sink = |e: &Event| {
            let r = sink(e);
            sink_failed.set(sink_failed.get() || r.is_err());
            r
        };
        let mut cursor = since;
        let (url, schema) = match self {
            // A local file has nothing to reconnect to: its errors end the feed.
            Source::Sqlite(conn) => {
                return Reader::Sqlite(conn).feed(&mut cursor, &mut sink, || {});
            }
            Source::Postgres { url, schema } => (url, schema),
        };
        let mut backoff = FIRST_BACKOFF;
        loop {
            let session =
                Remote::connect(|| pg::connect_following(&url, &schema)).and_then(|remote| {
                    // Connected and listening: the next failure starts its backoff from the beginning.
                    Reader::Postgres(remote)
                        .feed(&mut cursor, &mut sink, || backoff = FIRST_BACKOFF)
                });
            match session {
                Ok(()) => return Ok(()),
                Err(e) if sink_failed.get() || postgres::is_permanent(&e) => return Err(e),
                Err(e) => {
                    on_retry(&e, backoff);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// The read methods, each answered by the function of the same name in [`sqlite`] or in
/// [`postgres::read`]: one list, so the two backends cannot drift apart in name or type.
macro_rules! reads {
    ($($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $out:ty;)*) => {
        impl Reader {
            $(
                $(#[$doc])*
                pub fn $name(&self, $($arg: $ty),*) -> Result<$out> {
                    match self {
                        Reader::Sqlite(conn) => sqlite::$name(conn, $($arg),*),
                        Reader::Postgres(r) => r.rt.block_on(pg::$name(&r.client, $($arg),*)),
                    }
                }
            )*
        }
    };
}

reads! {
    /// Tasks, in one state or all, oldest change first.
    fn list(state: Option<&str>) -> Vec<TaskRow>;
    /// One task's row.
    fn get(id: &str) -> Option<TaskRow>;
    /// Pending tasks with a wait reason, without loading the rest of the pending set.
    fn waiting() -> Vec<TaskRow>;
    /// Completed tasks whose changes stayed on their branch, without loading the rest.
    fn kept_branches() -> Vec<TaskRow>;
    /// Tasks per state (states without tasks are absent).
    fn counts() -> Vec<(String, usize)>;
    /// Events after `seq`, at most `limit`, in sequence order.
    fn events_since(seq: i64, limit: usize) -> Vec<Event>;
    /// The latest event's sequence number (0 when there is none).
    fn max_seq() -> i64;
    /// Supervisors with a heartbeat row, oldest first.
    fn supervisors() -> Vec<SupervisorRow>;
    /// One task's attempts, in order.
    fn attempts_of(id: &str) -> Vec<AttemptLine>;
    /// Attempts, outcomes, cost and tokens per agent, by name.
    fn agent_totals() -> Vec<AgentTotals>;
    /// The attempts finished at or after `since` (RFC 3339), with what each spent.
    fn spent_since(since: &str) -> Vec<SpentRow>;
}

impl Reader {
    /// Whether the rows come from this folder's own mirror, so the tree and host-local state
    /// (instance locks, cooldowns) can be read beside them. A PostgreSQL reader may run on a device
    /// that has no folder at all.
    pub fn is_local(&self) -> bool {
        matches!(self, Reader::Sqlite(_))
    }

    /// What `status` names as its source: `local` or `postgres`.
    pub fn kind(&self) -> &'static str {
        if self.is_local() { "local" } else { "postgres" }
    }

    /// Pass events past `cursor` to `sink` until it says stop; `ready` runs once the cursor is set.
    fn feed(
        mut self,
        cursor: &mut Option<i64>,
        sink: &mut impl FnMut(&Event) -> Result<bool>,
        ready: impl FnOnce(),
    ) -> Result<()> {
        if cursor.is_none() {
            *cursor = Some(self.max_seq()?);
        }
        ready();
        loop {
            loop {
                let events = self.events_since(cursor.unwrap_or(0), BATCH)?;
                for e in &events {
                    if sink(e)? {
                        return Ok(());
                    }
                    *cursor = Some(e.seq);
                }
                if events.len() < BATCH {
                    break;
                }
            }
            self.wait_for_events()?;
        }
    }

    /// Wait until new events may be there: a notification or the safety net from PostgreSQL, the
    /// poll interval locally. An error when the PostgreSQL connection is gone.
    fn wait_for_events(&mut self) -> Result<()> {
        match self {
            Reader::Sqlite(_) => std::thread::sleep(POLL),
            Reader::Postgres(r) => {
                let notes = &mut r.notes;
                r.rt.block_on(async {
                    tokio::select! {
                        n = notes.recv() => if n.is_none() {
                            anyhow::bail!("connection lost");
                        },
                        _ = tokio::time::sleep(SAFETY_NET) => {}
                    }
                    anyhow::Ok(())
                })?;
                // Several notifications may have queued up; one read covers them all.
                while r.notes.try_recv().is_ok() {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::{Op, Payload};
    use crate::record::{Attempt, Outcome};

    fn row(id: &str, version: u64, state: &str, agent: Option<&str>, second: u32) -> TaskRow {
        TaskRow {
            id: id.into(),
            version,
            state: state.into(),
            agent: agent.map(String::from),
            payload: Payload {
                description: format!("do {id}"),
                file: format!("{state}/{id}.yaml"),
                attempts: (version - 1) as u32,
                ..Default::default()
            },
            updated_at: format!("2025-01-02T03:04:{second:02}.000Z"),
            note: None,
        }
    }

    fn finished(n: u32, agent: &str, outcome: Outcome, cost: f64) -> Attempt {
        let mut a = Attempt::new(n, agent, "2025-01-02T03:04:00.000Z", outcome);
        a.finished_at = Some("2025-01-02T03:04:05.000Z".into());
        a.exit_code = Some(if outcome == Outcome::Completed { 0 } else { 3 });
        a.cost_usd = Some(cost);
        a.input_tokens = Some(100);
        a.output_tokens = Some(10);
        a
    }

    /// A mirror with one task in each state, a wait reason, attempts and a supervisor.
    fn mirror() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let mut ops = vec![
            Op::Upsert {
                row: row("p", 1, "pending", None, 4),
                attempts: vec![],
            },
            Op::Note {
                id: "p".into(),
                note: Some("waits for c".into()),
            },
            Op::Upsert {
                row: row("r", 2, "running", Some("claude"), 3),
                attempts: vec![Attempt::new(
                    1,
                    "claude",
                    "2025-01-02T03:04:03.000Z",
                    Outcome::Interrupted,
                )],
            },
            Op::Upsert {
                row: row("c", 3, "completed", Some("codex"), 1),
                attempts: vec![
                    finished(1, "codex", Outcome::AgentError, 0.25),
                    finished(2, "codex", Outcome::Completed, 0.5),
                ],
            },
            Op::Upsert {
                row: row("f", 2, "failed", Some("claude"), 2),
                attempts: vec![finished(1, "claude", Outcome::Timeout, 1.0)],
            },
            Op::Supervisor {
                instance: "i1".into(),
                pid: 42,
                started_at: "2025-01-02T03:00:00.000Z".into(),
                heartbeat_at: "2025-01-02T03:04:05.000Z".into(),
                alive: true,
            },
        ];
        sqlite::apply(&mut sqlite::open(&db).unwrap(), "h", &mut ops).unwrap();
        let conn = sqlite::open_read(&db).unwrap().unwrap();
        (dir, conn)
    }

    fn reader() -> (tempfile::TempDir, Reader) {
        let (dir, conn) = mirror();
        (dir, Source::Sqlite(conn).reader().unwrap())
    }

    fn ids(rows: Vec<TaskRow>) -> Vec<String> {
        rows.into_iter().map(|r| r.id).collect()
    }

    #[test]
    fn tasks_read_back_as_written() {
        let (_dir, r) = reader();
        assert!(r.is_local());
        assert_eq!(r.kind(), "local");
        // Oldest change first, whatever the order of writing.
        assert_eq!(ids(r.list(None).unwrap()), ["c", "f", "r", "p"]);
        assert_eq!(ids(r.list(Some("running")).unwrap()), ["r"]);
        let mut want = row("f", 2, "failed", Some("claude"), 2);
        assert_eq!(r.get("f").unwrap(), Some(want.clone()));
        assert_eq!(r.get("nope").unwrap(), None);
        want = row("p", 1, "pending", None, 4);
        want.note = Some("waits for c".into());
        assert_eq!(r.waiting().unwrap(), [want]);
        let counts: Vec<(String, usize)> = ["completed", "failed", "pending", "running"]
            .iter()
            .map(|s| (s.to_string(), 1))
            .collect();
        assert_eq!(r.counts().unwrap(), counts);
    }

    #[test]
    fn kept_branches_are_the_completed_tasks_whose_result_names_a_branch() {
        let (dir, _) = mirror();
        let ws = |merge: &str, branch: Option<&str>| crate::record::WorkspaceResult {
            isolation: "worktree".into(),
            merge: Some(merge.into()),
            branch: branch.map(String::from),
            conflicts: if merge == "conflict" {
                vec!["a.txt".into()]
            } else {
                vec![]
            },
            ..Default::default()
        };
        let mut ops = vec![];
        for (id, second, w) in [
            ("landed", 6, ws("applied", None)),
            ("clash", 8, ws("conflict", Some("orchestrate/clash"))),
            ("kept", 7, ws("kept", Some("orchestrate/kept"))),
        ] {
            let mut r = row(id, 2, "completed", Some("codex"), second);
            r.payload.workspace = Some(w);
            ops.push(Op::Upsert {
                row: r,
                attempts: vec![],
            });
        }
        let db = dir.path().join("state.db");
        sqlite::apply(&mut sqlite::open(&db).unwrap(), "h", &mut ops).unwrap();
        let r = Source::Sqlite(sqlite::open_read(&db).unwrap().unwrap())
            .reader()
            .unwrap();
        let kept = r.kept_branches().unwrap();
        assert_eq!(ids(kept.clone()), ["kept", "clash"]);
        let clash = kept[1].payload.workspace.as_ref().unwrap();
        assert_eq!(clash.conflicts, ["a.txt"]);
    }

    #[test]
    fn events_come_by_sequence_from_a_cursor() {
        let (_dir, r) = reader();
        let all = r.events_since(0, 100).unwrap();
        let seqs: Vec<i64> = all.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        assert_eq!((all[2].task_id.as_str(), all[2].version), ("c", 3));
        assert_eq!(all[2].at, "2025-01-02T03:04:01.000Z");
        assert_eq!(r.events_since(1, 2).unwrap(), all[1..3]);
        assert_eq!(r.max_seq().unwrap(), 4);
        // Following from the start hands over every event once, until told to stop.
        let (_dir, conn) = mirror();
        let mut seen = vec![];
        Source::Sqlite(conn)
            .follow(
                Some(0),
                |e| {
                    seen.push(e.seq);
                    Ok(seen.len() == 4)
                },
                |e, _| panic!("a local feed never retries: {e}"),
            )
            .unwrap();
        assert_eq!(seen, [1, 2, 3, 4]);
    }

    #[test]
    fn attempts_supervisors_and_agent_totals() {
        let (_dir, r) = reader();
        let lines = r.attempts_of("c").unwrap();
        assert_eq!(
            lines[1],
            AttemptLine {
                n: 2,
                agent: "codex".into(),
                started_at: "2025-01-02T03:04:00.000Z".into(),
                finished_at: Some("2025-01-02T03:04:05.000Z".into()),
                outcome: "completed".into(),
                exit_code: Some(0),
                check: None,
            }
        );
        assert_eq!(lines[0].outcome, "agent_error");
        let sup = r.supervisors().unwrap();
        assert_eq!((sup[0].host.as_str(), sup[0].pid), ("h", 42));
        let totals = r.agent_totals().unwrap();
        // claude: one running (neither completed nor failed) and one timeout.
        assert_eq!(
            totals[0],
            AgentTotals {
                agent: "claude".into(),
                attempts: 2,
                completed: 0,
                failed: 1,
                cost_usd: 1.0,
                input_tokens: 100,
                output_tokens: 10,
            }
        );
        assert_eq!(
            (totals[1].attempts, totals[1].completed, totals[1].failed),
            (2, 1, 1)
        );
        assert_eq!(totals[1].cost_usd, 0.75);
    }
}
