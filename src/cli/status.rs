//! `orchestrate status`: counts, what runs, what waits and why, who supervises, how the
//! PostgreSQL mirror is doing, the task worktrees on disk and the branches whose changes wait to be
//! merged or discarded. With `--database-url` it answers from PostgreSQL alone (no folder needed).
//!
//! It only reads, through the mirror's read API and the folder, and stays quick on any tree: the
//! kept branches come from the mirror (not from result files), and worktrees are measured within
//! one budget of entries and time.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;

use super::{Cli, Project, short};
use crate::mirror::{TaskRow, postgres::Health};

#[derive(Serialize)]
struct Status {
    /// `local` (the folder and its SQLite mirror) or `postgres`.
    source: &'static str,
    counts: BTreeMap<String, usize>,
    /// Files in tasks/quarantine/ (only known locally).
    quarantined: Option<usize>,
    running: Vec<Running>,
    waiting: Vec<Waiting>,
    supervisors: Vec<Supervisor>,
    last_event_seq: i64,
    /// The PostgreSQL mirror as the local supervisor last saw it (local status, database configured).
    postgres: Option<Health>,
    /// Agents resting after a rate limit, and until when (only known locally).
    cooldowns: Vec<CoolingAgent>,
    /// Agents whose credentials were refused: no task goes to them until that clears (only known
    /// locally).
    needs_login: Vec<LoggedOutAgent>,
    /// Task files in `pending/` that a process holds open for writing right now: not read until
    /// it closes them (only known locally).
    being_written: Vec<BeingWritten>,
    /// The folders under `state_dir/worktrees` with their disk use (only known locally).
    worktrees: Vec<WorktreeUse>,
    /// Completed tasks whose changes stayed on their branch (`merge: kept` or `conflict`).
    kept_branches: Vec<KeptBranch>,
}

#[derive(Serialize)]
struct WorktreeUse {
    /// The task it belongs to; `None` for an idle worktree in the pool.
    task: Option<String>,
    /// Relative to the project root.
    path: String,
    /// Allocated bytes (hard-linked files once; symlinks not followed, other file systems not entered).
    bytes: u64,
    /// `false`: the measuring budget ran out (or an entry could not be read) and `bytes` is a lower bound.
    complete: bool,
}

#[derive(Serialize)]
struct KeptBranch {
    id: String,
    branch: String,
    /// `kept` or `conflict`.
    merge: String,
    /// With `conflict`: the files that did not apply.
    conflicts: Vec<String>,
    /// Why landing could not even be tried, when it could not.
    error: Option<String>,
}

/// How far the worktree measuring may go, all worktrees together: enough for a few worktrees of
/// a large repository, and `status` still answers in about two seconds at worst.
const WALK_ENTRIES: u64 = 200_000;
const WALK_TIME: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Serialize)]
struct BeingWritten {
    /// Relative to the project root.
    file: String,
    pid: u32,
    command: String,
}

#[derive(Serialize)]
struct CoolingAgent {
    agent: String,
    until: String,
    outcome: String,
    reason: String,
}

#[derive(Serialize)]
struct LoggedOutAgent {
    agent: String,
    since: String,
    reason: String,
    hint: String,
}

#[derive(Serialize)]
struct Running {
    id: String,
    agent: Option<String>,
    since: Option<String>,
    attempt: u32,
    /// How long the attempt has run, by this machine's clock.
    elapsed_seconds: Option<u64>,
    /// The attempt's log so far, relative to the project root.
    log: String,
    /// Why its end is not on disk yet (`cannot finish: No space left on device; trying again`).
    note: Option<String>,
}

#[derive(Serialize)]
struct Waiting {
    id: String,
    reason: String,
}

#[derive(Serialize)]
struct Supervisor {
    pid: u32,
    instance: String,
    host: Option<String>,
    heartbeat_at: Option<String>,
    /// What it says is wrong now (only known locally): a finish the disk refuses, say.
    problems: Vec<String>,
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
            }
        })
        .collect()
}

/// How many characters of a reason fit after the id column: all of them when the output is not a
/// terminal (a pipe or a file wants the whole text), else the terminal's width.
fn reason_width() -> usize {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return usize::MAX;
    }
    // SAFETY: TIOCGWINSZ fills a winsize we own; a failure leaves it zeroed.
    let cols = unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws);
        ws.ws_col as usize
    };
    if cols == 0 {
        100
    } else {
        cols.saturating_sub(23).max(40)
    }
}

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

pub fn run(cli: &Cli, project: &Project) -> Result<i32> {
    let reader = project.reader(cli)?;
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
    };
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
    render(cli, &st)
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

fn cooling(layout: &crate::layout::Layout) -> Vec<CoolingAgent> {
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

fn render(cli: &Cli, st: &Status) -> Result<i32> {
    if cli.json {
        super::print_json(st)?;
        return Ok(0);
    }
    let mut out = super::Out::new();
    let c = &st.counts;
    outln!(
        out,
        "tasks: {} pending, {} running, {} completed, {} failed{}",
        c["pending"],
        c["running"],
        c["completed"],
        c["failed"],
        st.quarantined
            .map(|q| format!(", {q} quarantined"))
            .unwrap_or_default()
    )?;
    if st.supervisors.is_empty() && st.source == "postgres" {
        outln!(out, "supervisor: none has a heartbeat in this database")?;
    } else if st.supervisors.is_empty() {
        outln!(
            out,
            "supervisor: not running (start one with `orchestrate start`)"
        )?;
    } else {
        for s in &st.supervisors {
            let line = match (&s.host, &s.heartbeat_at) {
                (Some(h), Some(hb)) => format!(
                    "supervisor: {h} pid {} ({}), last heartbeat {hb}",
                    s.pid, s.instance
                ),
                _ => format!("supervisor: running, pid {} ({})", s.pid, s.instance),
            };
            outln!(out, "{line}")?;
            for p in &s.problems {
                outln!(out, "  problem: {p}")?;
            }
        }
    }
    if let Some(h) = &st.postgres {
        if h.stalled {
            outln!(
                out,
                "postgres mirror: STALLED (connected, but no answer from PostgreSQL for {} s), {} queued (lag {} ms); tasks keep running, the writer reconnects after {} s without an answer",
                h.waiting_ms / 1000,
                h.queued,
                h.lag_ms,
                h.bound_ms / 1000
            )?;
        } else if h.connected {
            outln!(
                out,
                "postgres mirror: connected, {} queued (lag {} ms), last event {}{}",
                h.queued,
                h.lag_ms,
                h.last_seq,
                if h.dropped > 0 {
                    format!(
                        ", {} dropped while away (restored from the tree)",
                        h.dropped
                    )
                } else {
                    String::new()
                }
            )?;
        } else {
            outln!(
                out,
                "postgres mirror: NOT CONNECTED ({}), {} queued (lag {} ms); tasks keep running, the mirror catches up on reconnect",
                h.last_error
                    .as_deref()
                    .map(|e| short(e, 80))
                    .unwrap_or_else(|| "no supervisor has connected yet".into()),
                h.queued,
                h.lag_ms
            )?;
        }
    }
    if st.source == "postgres" {
        outln!(out, "(from PostgreSQL; last event {})", st.last_event_seq)?;
    }
    for c in &st.cooldowns {
        outln!(
            out,
            "cooldown: {} until {} ({}: {})",
            c.agent,
            c.until,
            c.outcome,
            short(&c.reason, 80)
        )?;
    }
    for l in &st.needs_login {
        outln!(
            out,
            "needs login: {} since {} ({}): {}",
            l.agent,
            l.since,
            short(&l.reason, 80),
            l.hint
        )?;
    }
    if !st.running.is_empty() {
        outln!(out, "\nrunning:")?;
        for r in &st.running {
            outln!(
                out,
                "  {:<20} {:<10} attempt {}, running {} (since {}), log {}{}",
                r.id,
                r.agent.as_deref().unwrap_or("-"),
                r.attempt,
                r.elapsed_seconds
                    .map(crate::fsutil::duration_text)
                    .as_deref()
                    .unwrap_or("-"),
                r.since.as_deref().unwrap_or("-"),
                r.log,
                r.note
                    .as_deref()
                    .map(|n| format!(" — {n}"))
                    .unwrap_or_default()
            )?;
        }
    }
    if !st.being_written.is_empty() {
        outln!(
            out,
            "\nbeing written (read once the writer closes the file):"
        )?;
        for b in &st.being_written {
            let who = crate::writers::Writer {
                pid: b.pid,
                command: b.command.clone(),
            };
            outln!(out, "  {}: still open for writing by {who}", b.file)?;
        }
    }
    if !st.waiting.is_empty() {
        outln!(out, "\nwaiting:")?;
        let width = reason_width();
        for w in st.waiting.iter().take(20) {
            outln!(out, "  {:<20} {}", w.id, short(&w.reason, width))?;
        }
        if st.waiting.len() > 20 {
            outln!(
                out,
                "  … and {} more (orchestrate tasks --status pending)",
                st.waiting.len() - 20
            )?;
        }
    }
    render_workspaces(&mut out, st)?;
    out.flush()?;
    Ok(0)
}

/// The worktrees on disk and the branches waiting for `merge` or `discard`.
fn render_workspaces(out: &mut super::Out, st: &Status) -> Result<()> {
    use crate::console::quote_path;
    use crate::fsutil::bytes_text;
    let at_least = |complete: bool| if complete { "" } else { "at least " };
    if !st.worktrees.is_empty() {
        outln!(out, "\nworktrees:")?;
        for w in &st.worktrees {
            outln!(
                out,
                "  {:<20} {:>12}  {}",
                w.task.as_deref().unwrap_or("idle (pool)"),
                format!("{}{}", at_least(w.complete), bytes_text(w.bytes)),
                quote_path(w.path.as_bytes())
            )?;
        }
        let total: u64 = st.worktrees.iter().map(|w| w.bytes).sum();
        let complete = st.worktrees.iter().all(|w| w.complete);
        outln!(
            out,
            "  {:<20} {:>12}{}",
            "total",
            format!("{}{}", at_least(complete), bytes_text(total)),
            if complete {
                ""
            } else {
                "  (measuring stopped at its budget)"
            }
        )?;
    }
    if !st.kept_branches.is_empty() {
        outln!(
            out,
            "\nkept branches (land with `orchestrate merge ID`, drop with `orchestrate discard ID`):"
        )?;
        for k in st.kept_branches.iter().take(20) {
            let what = if k.conflicts.is_empty() {
                k.merge.clone()
            } else {
                let files: Vec<String> = k
                    .conflicts
                    .iter()
                    .take(5)
                    .map(|f| quote_path(f.as_bytes()))
                    .collect();
                let more = k.conflicts.len().saturating_sub(5);
                format!(
                    "{} in {}{}",
                    k.merge,
                    files.join(", "),
                    if more > 0 {
                        format!(" and {more} more (orchestrate show {})", k.id)
                    } else {
                        String::new()
                    }
                )
            };
            let why = k
                .error
                .as_deref()
                .map(|e| format!(" — {}", short(e, 120)))
                .unwrap_or_default();
            outln!(
                out,
                "  {:<20} {}: {what}{why}",
                k.id,
                quote_path(k.branch.as_bytes())
            )?;
        }
        if st.kept_branches.len() > 20 {
            outln!(
                out,
                "  … and {} more (status --json lists them all)",
                st.kept_branches.len() - 20
            )?;
        }
    }
    Ok(())
}
