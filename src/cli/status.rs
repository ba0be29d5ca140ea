//! `orchestrate status`: counts, what runs, what waits and why, who supervises, how the
//! PostgreSQL mirror is doing, the cluster's hosts (cluster mode), the task worktrees on disk and the branches whose changes wait to be
//! merged or discarded. With `--database-url` it answers from PostgreSQL alone (no folder needed).
//!
//! It only reads, through the mirror's read API and the folder, and stays quick on any tree: the
//! kept branches come from the mirror (not from result files), and worktrees are measured within
//! one budget of entries and time.

use anyhow::Result;

use super::{Cli, Project, short};
use crate::project::status::Status;

pub fn run(cli: &Cli, project: &Project) -> Result<i32> {
    let reader = project.reader(cli.database_url.as_deref())?;
    render(
        cli,
        &crate::project::status::status(project, &reader, cli.database_url.as_deref())?,
    )
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
    for b in &st.budgets {
        let who = if b.scope == "all" {
            "all agents".to_string()
        } else {
            b.scope.clone()
        };
        let spent = super::agents::budget_line(&b.standing).unwrap_or_default();
        match &b.standing.paused {
            Some(p) => outln!(out, "{who}: PAUSED: {p} ({spent})")?,
            None => outln!(out, "{who}: {spent}")?,
        }
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
    for n in &st.notifications {
        if n.state == "gave_up" {
            outln!(
                out,
                "notify: {}: GAVE UP on {} {} after {} tries (queued {}): {}",
                n.channel,
                n.kind,
                n.event_id,
                n.tries,
                n.queued_at,
                short(&n.error, 120)
            )?;
        } else {
            outln!(
                out,
                "notify: {}: {} {} not delivered yet, retrying ({} tries since {}): {}",
                n.channel,
                n.kind,
                n.event_id,
                n.tries,
                n.queued_at,
                short(&n.error, 120)
            )?;
        }
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
    render_hosts(&mut out, st)?;
    if !st.running.is_empty() {
        outln!(out, "\nrunning:")?;
        for r in &st.running {
            outln!(
                out,
                "  {:<20} {:<10} {}attempt {}, running {} (since {}), log {}{}",
                r.id,
                r.agent.as_deref().unwrap_or("-"),
                r.host
                    .as_deref()
                    .map(|h| format!("on {h}, "))
                    .unwrap_or_default(),
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

/// The cluster's hosts: alive or gone, the leases each holds, its last heartbeat, its labels and
/// what it runs.
fn render_hosts(out: &mut super::Out, st: &Status) -> Result<()> {
    use crate::fsutil::duration_text;
    if let Some(e) = &st.cluster_error {
        outln!(out, "hosts: {}", short(e, 200))?;
    }
    let Some(hosts) = &st.hosts else {
        return Ok(());
    };
    if hosts.is_empty() {
        outln!(out, "hosts: none has joined the cluster yet")?;
        return Ok(());
    }
    outln!(out, "\nhosts:")?;
    for h in hosts {
        let labels = if h.labels.is_empty() {
            String::new()
        } else {
            format!(", labels {}", h.labels.join(","))
        };
        let runs = if h.running.is_empty() {
            String::new()
        } else {
            format!(", runs {}", h.running.join(" "))
        };
        outln!(
            out,
            "  {:<20} {:<5} {}, last heartbeat {} ago{labels}{runs}",
            h.name,
            if h.alive { "alive" } else { "gone" },
            crate::project::cluster::leases_text(h.leases),
            duration_text(h.heartbeat_age_seconds)
        )?;
    }
    Ok(())
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
