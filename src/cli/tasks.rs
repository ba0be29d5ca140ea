//! `orchestrate tasks [--status S] [--limit N]`.
//!
//! It only reads, through the mirror's read API. When there is a cluster queue with tasks in it
//! (cluster mode on here, or `--database-url` naming a schema with the cluster tables), each task
//! of that queue also shows its HOST (`host` in `--json`): the host that holds or last held its claim, or,
//! while no host has claimed it, the host that published it.

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
    // The cluster is optional here: a listing must not fail because the queue cannot be read, and
    // an empty queue adds nothing to it.
    let cluster = match project.cluster(cli.database_url.as_deref()) {
        Some(Ok(view)) if !view.queue.is_empty() => Some(view),
        Some(Ok(_)) => None,
        Some(Err(e)) => {
            super::note(&format!("warning: {e:#}"));
            None
        }
        None => None,
    };
    let hosts: std::collections::HashMap<&str, &str> = cluster
        .iter()
        .flat_map(|c| &c.queue)
        .map(|q| (q.id.as_str(), q.host.as_str()))
        .collect();
    let host_of = |id: &str| -> Option<&str> { hosts.get(id).copied() };
    if cli.json {
        let mut listed = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut v = serde_json::to_value(r)?;
            if let (Some(h), Some(obj)) = (host_of(&r.id), v.as_object_mut()) {
                obj.insert("host".into(), h.into());
            }
            listed.push(v);
        }
        super::print_json(&listed)?;
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
    // The HOST column only when there is a cluster: one host's listing stays as it was.
    let host_col = |h: &str| {
        if cluster.is_some() {
            format!("{h:<12} ")
        } else {
            String::new()
        }
    };
    outln!(
        out,
        "{:<20} {:<10} {:<10} {}{:>3} {:<24} DESCRIPTION",
        "ID",
        "STATE",
        "AGENT",
        host_col("HOST"),
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
            "{:<20} {:<10} {:<10} {}{:>3} {:<24} {}",
            r.id,
            r.state,
            r.agent.as_deref().unwrap_or("-"),
            host_col(host_of(&r.id).unwrap_or("-")),
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
