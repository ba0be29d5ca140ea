//! `orchestrate tasks [--status S]`.
//!
//! It only reads, through the mirror's read API.

use anyhow::{Result, bail};

use super::{Cli, Project, short};
use crate::error::UsageError;

pub fn run(cli: &Cli, project: &Project, status: Option<&str>) -> Result<i32> {
    if let Some(s) = status
        && !["pending", "running", "completed", "failed"].contains(&s)
    {
        bail!(UsageError(format!(
            "--status must be pending, running, completed or failed, not `{s}`"
        )));
    }
    let rows = project.reader(cli)?.list(status)?;
    if cli.json {
        super::print_json(&rows)?;
        return Ok(0);
    }
    if rows.is_empty() {
        println!(
            "no tasks{}",
            status.map(|s| format!(" in state {s}")).unwrap_or_default()
        );
        return Ok(0);
    }
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    writeln!(
        out,
        "{:<20} {:<10} {:<10} {:>3} {:<24} DESCRIPTION",
        "ID", "STATE", "AGENT", "TRY", "UPDATED"
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
        writeln!(
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
    Ok(0)
}
