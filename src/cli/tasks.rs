//! `orchestrate tasks [--status S] [--limit N]`.
//!
//! It only reads, through the mirror's read API.

use anyhow::{Result, bail};

use super::{Cli, Project, short};
use crate::error::UsageError;

pub fn run(
    cli: &Cli,
    project: &Project,
    status: Option<&str>,
    limit: Option<usize>,
) -> Result<i32> {
    // `active` is what people call a running task.
    let status = status.map(|s| if s == "active" { "running" } else { s });
    if status == Some("quarantined") {
        return quarantined(cli, project, limit);
    }
    if let Some(s) = status
        && !["pending", "running", "completed", "failed"].contains(&s)
    {
        bail!(UsageError(format!(
            "--status must be pending, running (or active), completed, failed or quarantined, not `{s}`"
        )));
    }
    let mut rows = project.reader(cli.database_url.as_deref())?.list(status)?;
    if let Some(n) = limit {
        rows.drain(..rows.len().saturating_sub(n));
    }
    if cli.json {
        super::print_json(&rows)?;
        return Ok(0);
    }
    let mut out = super::Out::new();
    if rows.is_empty() {
        outln!(
            out,
            "no tasks{}",
            status.map(|s| format!(" in state {s}")).unwrap_or_default()
        )?;
        out.flush()?;
        return Ok(0);
    }
    outln!(
        out,
        "{:<20} {:<10} {:<10} {:>3} {:<24} DESCRIPTION",
        "ID",
        "STATE",
        "AGENT",
        "TRY",
        "UPDATED"
    )?;
    for r in rows {
        let desc = match (&r.note, &r.payload.error) {
            (_, Some(e)) if r.state == "failed" => {
                format!("{} — {}", short(&r.payload.description, 40), short(e, 60))
            }
            (Some(n), _) if r.state == "pending" => {
                format!("{} — {}", short(&r.payload.description, 40), short(n, 60))
            }
            _ => short(&r.payload.description, 80),
        };
        outln!(
            out,
            "{:<20} {:<10} {:<10} {:>3} {:<24} {}",
            r.id,
            r.state,
            r.agent.as_deref().unwrap_or("-"),
            r.payload.attempts,
            r.updated_at,
            desc
        )?;
    }
    out.flush()?;
    Ok(0)
}

/// The files in `quarantine/` and why each is there (its `.reason.txt`): they are not tasks, so the
/// mirror does not list them.
fn quarantined(cli: &Cli, project: &Project, limit: Option<usize>) -> Result<i32> {
    if cli.database_url.is_some() {
        bail!(UsageError(
            "--status quarantined reads the folder; it does not work with --database-url".into()
        ));
    }
    let mut files = project.spool.quarantined();
    if let Some(n) = limit {
        files.drain(..files.len().saturating_sub(n));
    }
    let listed: Vec<serde_json::Value> = files
        .iter()
        .map(|path| {
            let reason = std::fs::read_to_string(crate::layout::Layout::reason_path(path))
                .unwrap_or_default();
            serde_json::json!({
                "file": project.rel(path),
                "reason": reason.trim_end(),
            })
        })
        .collect();
    if cli.json {
        super::print_json(&listed)?;
        return Ok(0);
    }
    let mut out = super::Out::new();
    if listed.is_empty() {
        outln!(out, "no quarantined files")?;
    }
    for q in listed {
        outln!(
            out,
            "{}  {}",
            // A file name with a line break stays on its line.
            crate::console::quote_path(q["file"].as_str().unwrap_or_default().as_bytes()),
            short(q["reason"].as_str().unwrap_or_default(), 100)
        )?;
    }
    out.flush()?;
    Ok(0)
}
