//! The project's status (`orchestrate status`, `GET /api/v1/status`): counts, what runs, what waits
//! and why, who supervises, how the PostgreSQL mirror is doing, the cluster's hosts (cluster mode),
//! the task worktrees on disk and the branches whose changes wait to be merged or discarded.
//!
//! It only reads, through the mirror's read API and the folder, and stays quick on any tree: the
//! kept branches come from the mirror (not from result files), and worktrees are measured within
//! one budget of entries and time.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;

use super::Project;
use crate::mirror::read::Reader;
use crate::mirror::{TaskRow, postgres::Health};

#[derive(Serialize)]
pub struct Status {
    /// `local` (the folder and its SQLite mirror) or `postgres`.
    pub source: &'static str,
    pub counts: BTreeMap<String, usize>,
    /// Files in tasks/quarantine/ (only known locally).
    pub quarantined: Option<usize>,
    pub running: Vec<Running>,
    pub waiting: Vec<Waiting>,
    pub supervisors: Vec<Supervisor>,
    pub last_event_seq: i64,
    /// The PostgreSQL mirror as the local supervisor last saw it (local status, database configured).
    pub postgres: Option<Health>,
    /// Agents resting after a rate limit, and until when (only known locally).
    pub cooldowns: Vec<CoolingAgent>,
    /// Agents whose credentials were refused: no task goes to them until that clears (only known
    /// locally).
    pub needs_login: Vec<LoggedOutAgent>,
    /// Task files in `pending/` that a process holds open for writing right now: not read until
    /// it closes them (only known locally).
    pub being_written: Vec<BeingWritten>,
    /// The folders under `state_dir/worktrees` with their disk use (only known locally).
    pub worktrees: Vec<WorktreeUse>,
    /// Completed tasks whose changes stayed on their branch (`merge: kept` or `conflict`).
    pub kept_branches: Vec<KeptBranch>,
    /// Each configured budget's spend against its limits (`all`: `orchestrator.budget`).
    pub budgets: Vec<super::BudgetStanding>,
    /// Notifications given up on (the last week's) or still being retried after a failure (only
    /// known locally: the outbox is in the SQLite mirror).
    pub notifications: Vec<crate::mirror::outbox::Trouble>,
    /// The hosts of the cluster, when there is one to read (cluster mode on here, or
    /// `--database-url` naming a schema with the cluster tables); `None` otherwise.
    pub hosts: Option<Vec<super::cluster::Host>>,
    /// Why the cluster could not be read (the rest of the status stands).
    pub cluster_error: Option<String>,
}

#[derive(Serialize)]
pub struct WorktreeUse {
    /// The task it belongs to; `None` for an idle worktree in the pool.
    pub task: Option<String>,
    /// Relative to the project root.
    pub path: String,
    /// Allocated bytes (hard-linked files once; symlinks not followed, other file systems not entered).
    pub bytes: u64,
    /// `false`: the measuring budget ran out (or an entry could not be read) and `bytes` is a lower bound.
    pub complete: bool,
}

#[derive(Serialize)]
pub struct KeptBranch {
    pub id: String,
    pub branch: String,
    /// `kept` or `conflict`.
    pub merge: String,
    /// With `conflict`: the files that did not apply.
    pub conflicts: Vec<String>,
    /// Why landing could not even be tried, when it could not.
    pub error: Option<String>,
}

/// How far the worktree measuring may go, all worktrees together: enough for a few worktrees of
/// a large repository, and `status` still answers in about two seconds at worst.
const WALK_ENTRIES: u64 = 200_000;
const WALK_TIME: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Serialize)]
pub struct BeingWritten {
    /// Relative to the project root.
    pub file: String,
    pub pid: u32,
    pub command: String,
}

#[derive(Serialize)]
pub struct CoolingAgent {
    pub agent: String,
    pub until: String,
    pub outcome: String,
    pub reason: String,
}

#[derive(Serialize)]
pub struct LoggedOutAgent {
    pub agent: String,
    pub since: String,
    pub reason: String,
    pub hint: String,
}

#[derive(Serialize)]
pub struct Running {
    pub id: String,
    pub agent: Option<String>,
    pub since: Option<String>,
    pub attempt: u32,
    /// How long the attempt has run, by this machine's clock.
    pub elapsed_seconds: Option<u64>,
    /// The attempt's log so far, relative to the project root.
    pub log: String,
    /// Why its end is not on disk yet (`cannot finish: No space left on device; trying again`).
    pub note: Option<String>,
    /// In cluster mode, the host whose lease it runs under (absent when no host holds one now).
    pub host: Option<String>,
}

#[derive(Serialize)]
pub struct Waiting {
    pub id: String,
    pub reason: String,
}

#[derive(Serialize)]
pub struct Supervisor {
    pub pid: u32,
    pub instance: String,
    pub host: Option<String>,
    pub heartbeat_at: Option<String>,
    /// What it says is wrong now (only known locally): a finish the disk refuses, say.
    pub problems: Vec<String>,
}

fn counts_of(rows: Vec<(String, usize)>) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> = ["pending", "running", "completed", "failed"]
        .iter()
        .map(|s| (s.to_string(), 0))
        .collect();
    counts.extend(rows);
    counts
}

fn running_of(rows: Vec<TaskRow>, layout: &crate::layout::Layout) -> Vec<Running> {
    rows.into_iter()
        .map(|r| {
            let elapsed_seconds = r
                .payload
                .started_at
                .as_deref()
                .and_then(crate::fsutil::seconds_since);
            Running {
                log: layout.rel(&layout.log_path(&r.id, r.payload.attempts.max(1))),
                id: r.id,
                agent: r.agent,
                since: r.payload.started_at,
                attempt: r.payload.attempts,
                elapsed_seconds,
                note: r.note,
                host: None,
            }
        })
        .collect()
}

/// How many characters of a reason fit after the id column: all of them when the output is not a
/// terminal (a pipe or a file wants the whole text), else the terminal's width.
fn waiting_of(rows: Vec<TaskRow>) -> Vec<Waiting> {
    rows.into_iter()
        .filter_map(|r| {
            r.note.map(|n| Waiting {
                id: r.id,
                reason: n,
            })
        })
        .collect()
}

/// The state of the whole project as `reader` and, when it is local, the folder tell it; with the
/// cluster's hosts when there is a cluster to read (`database_url`: see [`Project::cluster`]).
pub fn status(project: &Project, reader: &Reader, database_url: Option<&str>) -> Result<Status> {
    let mut st = Status {
        source: reader.kind(),
        counts: counts_of(reader.counts()?),
        quarantined: None,
        running: running_of(reader.list(Some("running"))?, &project.layout),
        waiting: waiting_of(reader.waiting()?),
        supervisors: vec![],
        last_event_seq: reader.max_seq()?,
        postgres: None,
        cooldowns: vec![],
        needs_login: vec![],
        being_written: vec![],
        worktrees: vec![],
        kept_branches: kept_of(reader.kept_branches()?),
        budgets: project.budgets(reader)?,
        notifications: vec![],
        hosts: None,
        cluster_error: None,
    };
    match project.cluster(database_url) {
        None => {}
        Some(Ok(view)) => {
            for r in &mut st.running {
                r.host = view.task(&r.id).and_then(|q| q.owner.clone());
            }
            st.hosts = Some(view.hosts);
        }
        Some(Err(e)) => st.cluster_error = Some(format!("{e:#}")),
    }
    if reader.is_local() {
        add_local(&mut st, project);
    } else {
        // Heartbeat rows are all a reader without the folder can know about supervisors.
        st.supervisors = reader
            .supervisors()?
            .into_iter()
            .map(|s| Supervisor {
                pid: s.pid,
                instance: s.instance,
                host: Some(s.host),
                heartbeat_at: Some(s.heartbeat_at),
                problems: vec![],
            })
            .collect();
    }
    Ok(st)
}

/// What only the folder knows: quarantined files, live supervisors (their instance locks are the
/// truth, where the mirror's heartbeat rows may outlive a killed one), cooldowns, login marks, and the
/// PostgreSQL writer's health as the local supervisor last saw it.
fn add_local(st: &mut Status, project: &Project) {
    st.quarantined = Some(project.spool.quarantined().len());
    st.supervisors = crate::instance::live_instances(&project.layout)
        .into_iter()
        .map(|(pid, path)| Supervisor {
            pid,
            instance: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            host: None,
            heartbeat_at: None,
            problems: crate::instance::problems_of(&path)
                .lines()
                .map(String::from)
                .collect(),
        })
        .collect();
    st.postgres = project.cfg.database.url.as_ref().map(|_| {
        std::fs::read(project.layout.postgres_health())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    });
    st.cooldowns = cooling(&project.layout);
    st.needs_login = crate::login::Logins::read(&project.layout)
        .into_iter()
        .filter(|(_, m)| m.active())
        .map(|(agent, m)| LoggedOutAgent {
            agent,
            since: m.since,
            reason: m.reason,
            hint: m.hint,
        })
        .collect();
    let pending = &project.layout.pending;
    st.being_written = crate::writers::open_for_writing(pending)
        .into_iter()
        .filter(|(name, _)| crate::task::is_task_file_name(&name.to_string_lossy()))
        .map(|(name, w)| BeingWritten {
            file: project.layout.rel(&pending.join(name)),
            pid: w.pid,
            command: w.command,
        })
        .collect();
    st.being_written.sort_by(|a, b| a.file.cmp(&b.file));
    st.worktrees = worktrees(&project.layout);
    // A mirror that cannot be read has no troubles to tell; the counts above already failed loudly.
    st.notifications = crate::mirror::sqlite::open_read(&project.layout.state_db())
        .ok()
        .flatten()
        .and_then(|conn| crate::mirror::outbox::troubles(&conn).ok())
        .unwrap_or_default()
        .into_iter()
        // A channel no longer configured is retried by nobody: its rows are history.
        .filter(|t| project.cfg.notify.iter().any(|c| c.name() == t.channel))
        .collect();
}

/// The folders under `state_dir/worktrees` (a task's) and under its pool (idle ones), by name,
/// each measured while the shared budget lasts.
fn worktrees(layout: &crate::layout::Layout) -> Vec<WorktreeUse> {
    use crate::layout::Layout;
    // Folders only (a worktree is one), by name; a symlink is not followed anywhere.
    let folders = |dir: &std::path::Path| -> Vec<(String, std::path::PathBuf)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        v.sort();
        v
    };
    // The tasks' worktrees first, then the idle ones; other hidden folders are not worktrees.
    let mut found: Vec<(Option<String>, std::path::PathBuf)> = folders(&layout.worktrees_dir())
        .into_iter()
        .filter_map(|(name, path)| Some((Some(Layout::worktree_owner(&name)?.to_string()), path)))
        .collect();
    found.extend(
        folders(&layout.worktree_pool())
            .into_iter()
            .map(|(_, p)| (None, p)),
    );
    let mut budget = crate::fsutil::WalkBudget::new(WALK_ENTRIES, WALK_TIME);
    found
        .into_iter()
        .map(|(task, path)| {
            let used = crate::fsutil::disk_use(&path, &mut budget);
            WorktreeUse {
                task,
                path: layout.rel(&path),
                bytes: used.bytes,
                complete: used.complete,
            }
        })
        .collect()
}

fn kept_of(rows: Vec<TaskRow>) -> Vec<KeptBranch> {
    rows.into_iter()
        .filter_map(|r| {
            let w = r.payload.workspace?;
            Some(KeptBranch {
                id: r.id,
                branch: w.branch?,
                merge: w.merge.unwrap_or_else(|| "kept".into()),
                conflicts: w.conflicts,
                error: w.error,
            })
        })
        .collect()
}

/// Agents resting after a rate limit or an exhausted quota right now (the folder's cooldown file).
pub fn cooling(layout: &crate::layout::Layout) -> Vec<CoolingAgent> {
    let now = time::OffsetDateTime::now_utc();
    crate::cooldown::Cooldowns::read(layout)
        .into_iter()
        .filter(|(_, c)| crate::cooldown::until_of(c).is_some_and(|u| u > now))
        .map(|(agent, c)| CoolingAgent {
            agent,
            until: c.until,
            outcome: c.outcome.as_str().into(),
            reason: c.reason,
        })
        .collect()
}
