//! `orchestrate retry ID`: failed → pending, attempt history kept; a task waiting out a retry
//! back-off in pending/ runs now.
//!
//! It moves files only through the spool; it never runs the task itself.

use anyhow::Result;

use super::{Cli, Project};
use crate::mirror::{self, Op};
use crate::spool::Place;

pub fn run(cli: &Cli, project: &Project, id: &str) -> Result<i32> {
    if project.spool.settled_place(id).is_none() && project.spool.run_now(id)? {
        if cli.json {
            super::print_json(&serde_json::json!({"id": id, "state": "pending", "runs": "now"}))?;
        } else {
            let mut out = super::Out::new();
            outln!(
                out,
                "{id}: its retry back-off is over; it runs as soon as a slot is free"
            )?;
            out.flush()?;
        }
        return Ok(0);
    }
    let history = project.spool.retry(id)?;
    let path = project.spool.task_path(Place::Pending, id);
    if let Ok((task, _)) = crate::task::read_task(&path, u64::MAX) {
        let row = mirror::pending_row(&project.spool, &task, &path, Some(&history));
        project.mirror_write(vec![Op::Upsert {
            row,
            attempts: history.attempts.clone(),
        }]);
    }
    if cli.json {
        super::print_json(
            &serde_json::json!({"id": id, "state": "pending", "previous_attempts": history.attempts.len()}),
        )?;
    } else {
        let mut out = super::Out::new();
        outln!(
            out,
            "{id}: back in pending ({} earlier attempt(s) kept)",
            history.attempts.len()
        )?;
        out.flush()?;
    }
    Ok(0)
}
