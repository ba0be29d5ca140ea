//! `orchestrate show ID`: everything about one task, from the tree (the truth) and the mirror.
//!
//! It only reads.

use anyhow::{Result, bail};

use super::{Cli, Project};
use crate::error::UsageError;
use crate::mirror::read::Reader;

pub fn run(cli: &Cli, project: &Project, id: &str) -> Result<i32> {
    let reader = project.reader(cli.database_url.as_deref())?;
    if !reader.is_local() {
        return remote(cli, &reader, id);
    }
    let shown = project.show(&reader, id)?;
    if cli.json {
        super::print_json(&shown)?;
        return Ok(0);
    }
    let mut out = super::Out::new();
    outln!(
        out,
        "task {} — {} ({})",
        shown.id,
        shown.state,
        shown.file.as_deref().unwrap_or("-")
    )?;
    if let Some(n) = &shown.note {
        outln!(out, "waiting: {n}")?;
    }
    if let Some(c) = &shown.claim {
        outln!(
            out,
            "running on {} since {} (attempt {}, {} pid {})",
            c.agent,
            c.started_at,
            c.attempt,
            c.host,
            c.pid
        )?;
    }
    if let Some(e) = &shown.error {
        outln!(out, "error: {}", e.trim_end())?;
    }
    // Earlier attempts of a task that is not finished: its claim carries them while it runs, the
    // history beside its file while it waits (a retry after a stall, a login, a rate limit).
    let earlier = match (&shown.result, &shown.claim, shown.state.as_str()) {
        (Some(r), _, _) => r.attempts.clone(),
        (None, Some(c), _) => c.history.clone(),
        (None, None, "pending") => project
            .spool
            .read_history(id)
            .map(|h| h.attempts)
            .unwrap_or_default(),
        _ => vec![],
    };
    for a in &earlier {
        outln!(
            out,
            "  attempt {} on {}: {}{}{}",
            a.n,
            a.agent,
            a.outcome.as_str(),
            a.exit_code
                .map(|c| format!(", exit {c}"))
                .unwrap_or_default(),
            a.error
                .as_deref()
                .map(|e| format!(" — {}", super::short(e, 100)))
                .unwrap_or_default()
        )?;
        if let Some(c) = &a.check {
            outln!(out, "    {}", check_line(c))?;
        }
    }
    if let Some(r) = &shown.result {
        if r.review_required {
            let files: Vec<String> = r
                .review_files
                .iter()
                .map(|f| crate::console::quote_path(f.as_bytes()))
                .collect();
            outln!(out, "REVIEW REQUIRED: touches {}", files.join(", "))?;
        }
        if let Some(why) = &r.chosen_because {
            outln!(out, "agent chosen: {why}")?;
        }
        if let Some(w) = &r.workspace {
            let short = |c: &Option<String>| {
                c.as_deref()
                    .map(|c| c.chars().take(12).collect::<String>())
                    .unwrap_or_else(|| "-".into())
            };
            outln!(
                out,
                "isolation: {}, base {}, head {}{}",
                w.isolation,
                short(&w.base),
                short(&w.head),
                w.branch
                    .as_deref()
                    .map(|b| format!(", branch {}", crate::console::quote_path(b.as_bytes())))
                    .unwrap_or_default()
            )?;
            if let Some(m) = &w.merge {
                let files: Vec<String> = w
                    .conflicts
                    .iter()
                    .map(|f| crate::console::quote_path(f.as_bytes()))
                    .collect();
                outln!(
                    out,
                    "merge: {m}{}{}",
                    if files.is_empty() {
                        String::new()
                    } else {
                        format!(" in {}", files.join(", "))
                    },
                    w.error
                        .as_deref()
                        .map(|e| format!(" — {}", super::short(e, 200)))
                        .unwrap_or_default()
                )?;
            }
        }
    }
    if let Some(f) = shown.result.as_ref().and_then(|r| r.fan_out.as_deref()) {
        outln!(
            out,
            "fan-out, pick {}: winner {}{}{}",
            f.pick,
            f.winner.as_deref().unwrap_or("none"),
            f.picked_because
                .as_deref()
                .map(|b| format!(" — {}", super::short(b, 200)))
                .unwrap_or_default(),
            f.cost_usd
                .map(|c| format!("; ${c:.4} over all candidates"))
                .unwrap_or_default()
        )?;
        for c in &f.candidates {
            outln!(
                out,
                "  candidate {} ({}, {}): {}{}{}{}",
                c.name,
                c.task_id,
                c.agent.as_deref().unwrap_or("-"),
                c.status,
                c.check
                    .as_ref()
                    .map(|k| format!(", {}", check_line(k)))
                    .unwrap_or_default(),
                c.branch
                    .as_deref()
                    .map(|b| format!(", branch {b}"))
                    .unwrap_or_default(),
                c.error
                    .as_deref()
                    .filter(|_| c.status != "completed")
                    .map(|e| format!(" — {}", super::short(e, 100)))
                    .unwrap_or_default()
            )?;
        }
    }
    if let Some(t) = &shown.task {
        outln!(out, "\n--- task file ---\n{}", t.trim_end())?;
    }
    if let Some(o) = &shown.output {
        outln!(
            out,
            "\n--- output ({}) ---\n{}",
            project.rel(&project.layout.output_path(id)),
            o.trim_end()
        )?;
    }
    if let Some(d) = &shown.diff {
        if d.is_empty() {
            outln!(out, "\n--- diff: no files changed ---")?;
        } else {
            outln!(
                out,
                "\n--- diff ({}) ---\n{}",
                project.rel(&project.layout.diff_path(id)),
                d.trim_end()
            )?;
        }
    }
    out.flush()?;
    Ok(0)
}

/// `show --database-url`: what the mirror knows, without the files (a remote device has none).
fn remote(cli: &Cli, reader: &Reader, id: &str) -> Result<i32> {
    let (row, attempts) = (reader.get(id)?, reader.attempts_of(id)?);
    let Some(row) = row else {
        bail!(UsageError(format!("no task {id} in the database")));
    };
    if cli.json {
        super::print_json(&serde_json::json!({"task": row, "attempts": attempts}))?;
        return Ok(0);
    }
    let mut out = super::Out::new();
    outln!(
        out,
        "task {} — {} (v{}, updated {})",
        row.id,
        row.state,
        row.version,
        row.updated_at
    )?;
    outln!(out, "agent: {}", row.agent.as_deref().unwrap_or("-"))?;
    if let Some(n) = &row.note {
        outln!(out, "waiting: {n}")?;
    }
    if let Some(e) = &row.payload.error {
        outln!(out, "error: {e}")?;
    }
    for a in attempts {
        outln!(
            out,
            "  attempt {} on {}: {}{}, {} → {}",
            a.n,
            a.agent,
            a.outcome,
            a.exit_code
                .map(|c| format!(", exit {c}"))
                .unwrap_or_default(),
            a.started_at,
            a.finished_at.as_deref().unwrap_or("running")
        )?;
        if let Some(c) = &a.check {
            outln!(out, "    {}", check_line(c))?;
        }
    }
    outln!(out, "\n{}", row.payload.description.trim_end())?;
    out.flush()?;
    Ok(0)
}

/// One line on an attempt's check: the command, how it went, its log.
fn check_line(c: &crate::record::CheckRecord) -> String {
    let how = match (c.passed, c.timed_out, c.exit_code, c.signal) {
        (true, ..) => "passed".to_string(),
        (false, true, ..) => "failed (out of time)".to_string(),
        (false, false, Some(code), _) => format!("failed (exit {code})"),
        (false, false, None, Some(sig)) => format!("failed (signal {sig})"),
        (false, false, None, None) => "failed".to_string(),
    };
    format!(
        "check `{}`: {how} in {:.1} s{}",
        c.command,
        c.duration_ms as f64 / 1000.0,
        c.log_file
            .as_deref()
            .map(|f| format!(", log {f}"))
            .unwrap_or_default()
    )
}
