//! `orchestrate cancel ID`: a pending task goes straight to failed/; a running one is stopped by its
//! supervisor (asked through `state_dir/cancel/ID` and SIGUSR1), which then moves it to failed/.
//!
//! It never kills an agent itself: only the supervisor that owns the claim stops what it runs.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::{Cli, Project};
use crate::error::UsageError;
use crate::mirror::{self, Op};
use crate::record::TaskResult;
use crate::spool::Place;

pub fn run(cli: &Cli, project: &Project, id: &str) -> Result<i32> {
    let spool = &project.spool;
    match spool.settled_place(id) {
        Some(Place::Completed) | Some(Place::Failed) => {
            bail!(UsageError(format!(
                "task {id} has already finished ({}); nothing to cancel",
                spool.settled_place(id).map(Place::state).unwrap_or("?")
            )));
        }
        Some(Place::Assigned) => return cancel_running(cli, project, id),
        _ => {}
    }
    // Pending: find its file (any name) by parsing pending/ if it is not `<id>.yaml`.
    let mut file = spool.task_path(Place::Pending, id);
    if !file.exists() {
        let found = std::fs::read_dir(&spool.layout().pending)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                crate::task::read_task(p, project.cfg.orchestrator.max_task_bytes)
                    .is_ok_and(|(t, _)| t.id == id)
            });
        match found {
            Some(p) => file = p,
            None => bail!(UsageError(format!(
                "no task {id} in {}",
                project.rel(&spool.layout().tasks_dir)
            ))),
        }
    }
    let (task, _) =
        crate::task::read_task(&file, u64::MAX).map_err(|e| anyhow::anyhow!(e.render(id)))?;
    let history = spool.read_history(id).unwrap_or_default();
    let result = TaskResult::failed(
        id,
        history.version.max(1) + 1,
        &task.file.description,
        history.attempts,
        "cancelled by user".into(),
    );
    if spool.fail_pending(&file, &result)? {
        project.mirror_write(vec![Op::Upsert {
            row: mirror::terminal_row(spool, &result, Some(&task)),
            attempts: result.attempts.clone(),
        }]);
        report(cli, id, "cancelled (it had not started)")?;
        return Ok(0);
    }
    // Claimed between our look and the move: stop it as a running task.
    cancel_running(cli, project, id)
}

fn cancel_running(cli: &Cli, project: &Project, id: &str) -> Result<i32> {
    let spool = &project.spool;
    let Some(claim) = spool.read_claim(id) else {
        bail!(
            "task {id} is in assigned/ without a claim; its supervisor is starting or stopping, try again"
        );
    };
    if claim.host != crate::fsutil::hostname() {
        bail!("task {id} runs on host {}; cancel it there", claim.host);
    }
    spool.request_cancel(id)?;
    // SAFETY: plain signal to the supervisor pid recorded in the claim.
    unsafe {
        libc::kill(claim.pid as i32, libc::SIGUSR1);
    }
    let grace = project.cfg.orchestrator.kill_grace_seconds;
    let deadline = Instant::now() + Duration::from_secs_f64(grace + 30.0);
    while Instant::now() < deadline {
        if spool.settled_place(id) == Some(Place::Failed)
            || spool.settled_place(id) == Some(Place::Completed)
        {
            let state = spool.settled_place(id).map(Place::state).unwrap_or("?");
            report(cli, id, &format!("stopped; now {state}"))?;
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!(
        "asked supervisor pid {} to cancel {id}, but it has not finished after {:.0} s",
        claim.pid,
        grace + 30.0
    )
}

fn report(cli: &Cli, id: &str, what: &str) -> Result<()> {
    if cli.json {
        super::print_json(&serde_json::json!({"id": id, "result": what}))
    } else {
        let mut out = super::Out::new();
        outln!(out, "{id}: {what}")?;
        out.flush()
    }
}
