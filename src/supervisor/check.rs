//! An attempt's `check`: the command a task (or its agent, or `routing`) names to say whether the
//! agent's work is done, run after the agent in the folder the agent worked in, its output in
//! `context/logs/<id>/attempt-<n>.check.log`. Exit 0 is a pass; anything else fails the attempt as
//! `check_failed`, and the next attempt's prompt quotes the end of that log (`context`).
//!
//! It knows nothing of worktrees or landing: the attempt decides where it runs (a worktree after
//! the agent's changes are committed, so what the check makes never enters the task's commit; the
//! workdir after the diff otherwise) and what its verdict means. It never runs a command outside
//! the supervision agents get: own process group, time limit, cancel and shutdown, the run marker
//! recovery looks for, redacted and capped output.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::{Check, Config};
use crate::process::{self, Stop, StopKind};
use crate::record::CheckRecord;
use crate::redact::Redactor;

/// What a check needs besides its command.
pub(super) struct CheckRun<'a> {
    pub(super) cfg: &'a Arc<Config>,
    pub(super) redactor: &'a Arc<Redactor>,
    pub(super) task_id: &'a str,
    pub(super) attempt: u32,
    /// The attempt's run marker: recovery finds what a check left running by it, as an agent's.
    pub(super) marker: &'a str,
    /// Where it runs: where the agent worked.
    pub(super) cwd: &'a Path,
    pub(super) log_path: &'a Path,
    /// `log_path` as the result names it (relative to the project root).
    pub(super) log_file: String,
}

/// How a check went.
pub(super) struct Checked {
    pub(super) record: CheckRecord,
    /// Why the attempt fails, when it did not pass: the command, how it ended, the end of its output.
    pub(super) error: Option<String>,
    /// It was stopped by a cancel or a shutdown (the attempt ends that way, not as `check_failed`).
    pub(super) stopped: Option<StopKind>,
}

/// Run `check` as `/bin/sh -c COMMAND` in `c.cwd`, its output into a log of its own.
pub(super) async fn run(
    c: CheckRun<'_>,
    check: &Check,
    stop: watch::Receiver<Option<Stop>>,
) -> Checked {
    let command = &check.command;
    let header = format!("check in {}: {command}", c.cwd.display());
    let start = write_log(c.log_path, c.redactor, &header, false);
    let extra = BTreeMap::from([
        ("ORCHESTRATE_TASK_ID".to_string(), c.task_id.to_string()),
        ("ORCHESTRATE_ATTEMPT".to_string(), c.attempt.to_string()),
    ]);
    let spec = process::Spec {
        // Not looked up on PATH: the allow-list may not pass one, and every Unix has it here.
        program: "/bin/sh".into(),
        args: vec!["-c".into(), command.clone()],
        env: process::build_env(&c.cfg.security.env_allow, &extra),
        cwd: c.cwd.to_path_buf(),
        stdin: None,
        timeout: check.timeout,
        grace: std::time::Duration::from_secs_f64(c.cfg.orchestrator.kill_grace_seconds),
        log_path: c.log_path.to_path_buf(),
        log_append: true,
        max_log_bytes: c.cfg.orchestrator.max_log_bytes,
        redactor: c.redactor.clone(),
        marker: c.marker.to_string(),
        stall: None,
    };
    let exit = process::run(spec, stop).await;
    let limit = format!(
        "{:.1} s (check_timeout_minutes)",
        check.timeout.as_secs_f64()
    );
    let ended = super::workspace::setup::how_it_ended(&exit, &limit);
    let passed = exit.code == Some(0) && exit.stopped.is_none() && !exit.timed_out;
    // Read before the closing line goes in: the error quotes the command, not orchestrate.
    let tail = if passed || start.is_none() {
        String::new()
    } else {
        super::workspace::setup::output_tail(c.log_path, start.unwrap_or(0))
    };
    write_log(c.log_path, c.redactor, &format!("check {ended}"), true);
    let record = CheckRecord {
        command: command.clone(),
        passed,
        exit_code: exit.code,
        signal: exit.signal,
        timed_out: exit.timed_out,
        duration_ms: exit.duration.as_millis() as u64,
        log_file: start.is_some().then_some(c.log_file),
    };
    // The first line stands alone (consoles, lists, the mirror show only it): it ends with the
    // output's last line, usually the verdict (`test result: FAILED. 3 passed; 1 failed`).
    let error = (!passed).then(|| {
        let what = format!("the check `{command}` {ended}");
        match tail.lines().rev().find(|l| !l.trim().is_empty()) {
            None => format!("{what}; it printed nothing"),
            Some(last) if tail.trim().lines().count() == 1 => format!("{what}: {}", last.trim()),
            Some(last) => format!("{what}: {}\nits output ends with:\n{tail}", last.trim()),
        }
    });
    Checked {
        record,
        error,
        stopped: exit.stopped,
    }
}

/// One line of orchestrate's own in the check's log (started afresh unless `append`); the log's
/// length after it, `None` when it cannot be written (the check runs all the same).
fn write_log(path: &Path, redactor: &Redactor, text: &str, append: bool) -> Option<u64> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).ok()?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(path)
        .ok()?;
    writeln!(f, "[orchestrate: {}]", redactor.redact(text)).ok()?;
    f.metadata().ok().map(|m| m.len())
}
