//! `orchestrate retry ID`: failed → pending, attempt history kept; a task waiting out a retry
//! back-off in pending/ runs now.
//!
//! It moves files only through the spool ([`Project::retry`]); it never runs the task itself.

use anyhow::Result;

use super::{Cli, Project};
use crate::project::Retried;

pub fn run(cli: &Cli, project: &Project, id: &str) -> Result<i32> {
    let mut out = super::Out::new();
    match project.retry(id)? {
        Retried::RunsNow if cli.json => {
            super::print_json(&serde_json::json!({"id": id, "state": "pending", "runs": "now"}))?
        }
        Retried::RunsNow => outln!(
            out,
            "{id}: its retry back-off is over; it runs as soon as a slot is free"
        )?,
        Retried::Pending { previous_attempts } if cli.json => super::print_json(
            &serde_json::json!({"id": id, "state": "pending", "previous_attempts": previous_attempts}),
        )?,
        Retried::Pending { previous_attempts } => outln!(
            out,
            "{id}: back in pending ({previous_attempts} earlier attempt(s) kept)"
        )?,
    }
    out.flush()?;
    Ok(0)
}
