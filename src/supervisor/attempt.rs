//! One attempt, off the loop: claim the task (the rename, the claim record and their fsyncs), tell
//! the mirror and the loop, write the prompt and snapshot the workdir, run the agent through
//! `process`, diff the workdir, write the output, and report back.
//!
//! Everything here runs in the attempt's own tokio task and on blocking threads, beside other
//! attempts, claims and commits. It never touches the loop's state: it learns what it needs when it
//! is launched and reports back (a `Report` when it ends, a "claimed" message once the claim is
//! durable). The claim is its only move in the spool; the loop makes every later one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};

use super::events::{Claimed, Report};
use crate::agents::{self, RunRequest};
use crate::config::Config;
use crate::console;
use crate::context;
use crate::fsutil;
use crate::layout::Layout;
use crate::mirror::{self, Op, Writer};
use crate::process::{self, Stop, StopKind};
use crate::record::{Attempt, Claim, Outcome};
use crate::redact::Redactor;
use crate::spool::Spool;
use crate::task::Task;

#[derive(Clone)]
pub(super) struct AttemptCtx {
    pub(super) cfg: Arc<Config>,
    pub(super) layout: Layout,
    pub(super) redactor: Arc<Redactor>,
}

/// What an attempt needs to claim its task before it runs.
pub(super) struct ClaimJob {
    pub(super) start: u64,
    pub(super) spool: Spool,
    pub(super) src: PathBuf,
    pub(super) hash: u64,
    pub(super) writer: Writer,
    /// The mirror's row for the running task, sent once the claim is durable.
    pub(super) row: mirror::TaskRow,
    pub(super) because: String,
    pub(super) claimed: mpsc::UnboundedSender<(String, u64)>,
}

/// Claim `src` as `claim.task_id`, then check that the file is the one that was parsed (`hash`): a
/// writer still appending would otherwise run half a task. A `Changed` or `Stopping` task is left in
/// `assigned/` under the claim, for the loop to put back.
pub(super) fn claim_task(
    spool: &Spool,
    src: &Path,
    claim: &Claim,
    hash: u64,
    stop: Option<&watch::Receiver<Option<Stop>>>,
) -> Claimed {
    let id = &claim.task_id;
    match spool.claim(src, claim) {
        Ok(true) => {}
        Ok(false) => return Claimed::Lost,
        Err(e) => return Claimed::Failed(format!("{e:#}")),
    }
    let now_bytes = spool.read_assigned(id).unwrap_or_default();
    if crate::task::content_hash(&now_bytes) != hash {
        return Claimed::Changed;
    }
    if stop.is_some_and(|s| s.borrow().is_some()) {
        return Claimed::Stopping;
    }
    // Only now is the history carried by the claim alone.
    spool.drop_history(id);
    Claimed::Ours
}

/// How an attempt's start went, up to the agent's spawn.
enum Begun {
    NotClaimed(Claimed),
    Ready {
        started_at: String,
        t0: Instant,
        /// Workdir, prompt, prompt file and the workdir's snapshot. Boxed: large beside a
        /// `NotClaimed`.
        prepared: Result<Box<Prepared>>,
    },
}

struct Prepared {
    workdir: PathBuf,
    prompt: String,
    prompt_file: PathBuf,
    before: Before,
}

/// What the workdir looked like before the agent, to diff against afterwards.
enum Before {
    /// The agent works in the workdir itself.
    Snapshot(crate::snapshot::Snapshot),
    /// The agent works in a worktree of its own.
    Worktree(super::workspace::Worktree),
}

/// Claim the task; once it is ours, tell the mirror and the loop, write the prompt and snapshot
/// the workdir.
fn begin(
    ctx: &AttemptCtx,
    job: ClaimJob,
    task: &Task,
    claim: &Claim,
    stop: &watch::Receiver<Option<Stop>>,
) -> Begun {
    let claimed = claim_task(&job.spool, &job.src, claim, job.hash, Some(stop));
    if !matches!(claimed, Claimed::Ours) {
        return Begun::NotClaimed(claimed);
    }
    // The mirror follows the durable claim, never runs ahead of it.
    job.writer.send(Op::Upsert {
        attempts: {
            let mut a = claim.history.clone();
            a.push(mirror::running_attempt(claim));
            a
        },
        row: job.row,
    });
    let _ = job.claimed.send((task.id.clone(), job.start));
    console::info(&format!(
        "started    {} on {} (attempt {}; {})",
        task.id, claim.agent, claim.attempt, job.because
    ));
    let started_at = fsutil::now_rfc3339();
    let t0 = Instant::now();
    let prepared = prepare(ctx, task, claim).and_then(|(workdir, prompt, prompt_file)| {
        let worktree = super::workspace::prepare(
            &ctx.cfg,
            &ctx.layout,
            task,
            &claim.agent,
            claim.attempt,
            &workdir,
        )?;
        let before = match worktree {
            Some(w) => Before::Worktree(w),
            None => Before::Snapshot(crate::snapshot::Snapshot::take(
                &workdir,
                &ctx.layout,
                &ctx.cfg,
            )),
        };
        Ok(Box::new(Prepared {
            workdir,
            prompt,
            prompt_file,
            before,
        }))
    });
    Begun::Ready {
        started_at,
        t0,
        prepared,
    }
}

/// One attempt, start to end: claim, prompt, snapshot, run, diff, output. The claim is its only
/// move in the spool; the loop makes every later one.
pub(super) async fn run_attempt(
    ctx: AttemptCtx,
    job: ClaimJob,
    task: Task,
    claim: Claim,
    stop: watch::Receiver<Option<Stop>>,
) -> Report {
    // One trip to a blocking thread for everything before the agent starts: the claim and its
    // fsyncs, the prompt file, the workdir snapshot.
    let begun = {
        let (ctx, task, claim, stop) = (ctx.clone(), task.clone(), claim.clone(), stop.clone());
        match tokio::task::spawn_blocking(move || begin(&ctx, job, &task, &claim, &stop)).await {
            Ok(b) => b,
            // A bug of ours: `Supervisor::crash_report` looks at the claim record to decide what ran.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Begun::NotClaimed(Claimed::Failed(format!("internal error: {e}"))),
        }
    };
    let (started_at, t0, prepared) = match begun {
        Begun::NotClaimed(claimed) => {
            let attempt = Attempt::new(
                claim.attempt,
                &claim.agent,
                &claim.started_at,
                Outcome::Interrupted,
            );
            return Report {
                unclaimed: Some(claimed),
                ..Report::new(&task.id, attempt)
            };
        }
        Begun::Ready {
            started_at,
            t0,
            prepared,
        } => (started_at, t0, prepared),
    };
    let log_path = ctx.layout.log_path(&task.id, claim.attempt);
    let mut attempt = Attempt {
        log_file: Some(ctx.layout.rel(&log_path)),
        ..Attempt::new(
            claim.attempt,
            &claim.agent,
            &started_at,
            Outcome::AgentError,
        )
    };
    let mut report = Report::new(&task.id, attempt.clone());
    let Prepared {
        workdir,
        prompt,
        prompt_file,
        before,
    } = match prepared {
        Ok(v) => *v,
        Err(e) => {
            let error = ctx.redactor.redact(&format!("{e:#}"));
            if environment_fault(&e) {
                // The disk's fault, not the task's: it waits, and no attempt is counted.
                report.environment = Some(error);
                return report;
            }
            attempt.error = Some(error);
            attempt.finished_at = Some(fsutil::now_rfc3339());
            attempt.duration_ms = Some(t0.elapsed().as_millis() as u64);
            report.attempt = attempt;
            report.permanent = true;
            return report;
        }
    };
    let agent_cfg = ctx.cfg.agents[&claim.agent].clone();
    let adapter = agents::adapter_for(agent_cfg.kind)
        .expect("the scheduler only picks agents with an adapter");
    let req = RunRequest {
        task_id: &task.id,
        description: &task.file.description,
        prompt: &prompt,
        prompt_file: &prompt_file,
        workdir: match &before {
            Before::Worktree(w) => &w.cwd,
            Before::Snapshot(_) => &workdir,
        },
        resume_session: resumable_session(&claim),
    };
    let inv = match adapter.invocation(&claim.agent, &agent_cfg, &req) {
        Ok(i) => i,
        Err(e) => {
            attempt.error = Some(format!("{e:#}"));
            attempt.finished_at = Some(fsutil::now_rfc3339());
            report.attempt = attempt;
            return report;
        }
    };
    let mut env = process::build_env(&ctx.cfg.security.env_allow, &inv.env);
    env.push((
        crate::marker::RUN_MARKER.into(),
        crate::marker::run_marker(&claim.instance, &task.id, claim.attempt),
    ));
    let spec = process::Spec {
        program: inv.program,
        args: inv.args,
        env,
        cwd: inv.cwd,
        stdin: inv.stdin,
        timeout: ctx
            .cfg
            .attempt_timeout(task.file.timeout_minutes, &agent_cfg),
        grace: Duration::from_secs_f64(ctx.cfg.orchestrator.kill_grace_seconds),
        log_path: log_path.clone(),
        max_log_bytes: ctx.cfg.orchestrator.max_log_bytes,
        redactor: ctx.redactor.clone(),
        marker: crate::marker::run_marker(&claim.instance, &task.id, claim.attempt),
    };
    if crate::failpoint::armed("attempt.running") {
        tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            crate::failpoint::hit("attempt.running");
        });
    }
    let exit = process::run(spec, stop).await;
    if exit.spawn_errno == Some(libc::E2BIG) {
        // Retrying cannot make the prompt shorter.
        report.permanent = true;
    }
    if exit.escaped > 0 {
        console::info(&format!(
            "{}: killed {} process(es) the agent left running outside its process group",
            task.id, exit.escaped
        ));
    }
    let mut parsed = adapter.parse(&exit);
    if agent_cfg.kind == crate::config::AgentKind::Codex
        && let Some(prev) = resumable_session(&claim).and(claim.history.last())
    {
        // `codex exec resume` reports the whole thread's usage, earlier turns included; the
        // earlier attempt already counted those.
        let less = |now: Option<u64>, before: Option<u64>| {
            now.map(|n| n.saturating_sub(before.unwrap_or(0)))
        };
        parsed.input_tokens = less(parsed.input_tokens, prev.input_tokens);
        parsed.output_tokens = less(parsed.output_tokens, prev.output_tokens);
        parsed.cached_tokens = less(parsed.cached_tokens, prev.cached_tokens);
    }
    agents::fill_cost(&agent_cfg, &mut parsed);
    if parsed.session_id.is_none() {
        // Known before the run (the adapter chose it), so a killed run can still be resumed.
        parsed.session_id = inv.session_id.clone();
    }
    if exit.stopped == Some(StopKind::Cancelled) {
        parsed.outcome = Outcome::Cancelled;
        parsed.error = Some("cancelled by user".into());
    } else if exit.stopped == Some(StopKind::Shutdown) && parsed.outcome != Outcome::Completed {
        parsed.outcome = Outcome::Interrupted;
        parsed.error = Some("interrupted by a supervisor shutdown".into());
    }
    attempt.finished_at = Some(fsutil::now_rfc3339());
    attempt.duration_ms = Some(exit.duration.as_millis() as u64);
    attempt.exit_code = exit.code;
    attempt.signal = exit.signal;
    attempt.outcome = parsed.outcome;
    attempt.error = parsed.error.clone();
    attempt.cost_usd = parsed.cost_usd;
    attempt.input_tokens = parsed.input_tokens;
    attempt.output_tokens = parsed.output_tokens;
    attempt.cached_tokens = parsed.cached_tokens;
    attempt.session_id = parsed.session_id.clone();
    attempt.retry_at = parsed
        .retry_after
        .map(|d| fsutil::fmt_time(time::OffsetDateTime::now_utc() + d));
    report.retry_after = parsed.retry_after;
    let exit_text = match (exit.code, exit.signal, &parsed.error) {
        (_, _, Some(e)) => format!("{} ({e})", parsed.outcome.as_str()),
        (Some(c), _, None) => format!("code {c}"),
        (None, Some(s), None) => format!("signal {s}"),
        _ => "-".into(),
    };
    // Off the runtime's worker threads, in one trip: the diff reads the workdir, and both writes
    // wait for the disk.
    let isolated = matches!(before, Before::Worktree(_));
    let completed = parsed.outcome == Outcome::Completed;
    let (text_file, diff_file, files_modified, workspace) = {
        let (layout, redactor, task, agent) = (
            ctx.layout.clone(),
            ctx.redactor.clone(),
            task.clone(),
            claim.agent.clone(),
        );
        let (attempt_n, duration) = (claim.attempt, exit.duration);
        let text = std::mem::take(&mut parsed.text);
        tokio::task::spawn_blocking(move || {
            let (diff, files, workspace) = match before {
                Before::Snapshot(snapshot) => {
                    let d = snapshot.diff();
                    (d.text, d.files, None)
                }
                Before::Worktree(w) => {
                    let f = w.finish(&task, &agent, attempt_n, completed);
                    (f.diff, f.files, Some(f.result))
                }
            };
            let header = context::OutputHeader {
                task: &task,
                agent: &agent,
                attempt: attempt_n,
                duration,
                exit: exit_text,
            };
            let text_file = context::write_output(&layout, &header, &text, &redactor)
                .map_err(|e| console::warn(&format!("cannot write output of {}: {e:#}", task.id)))
                .ok();
            let diff_file = context::write_diff(&layout, &task.id, &diff, &redactor)
                .map_err(|e| console::warn(&format!("cannot write diff of {}: {e:#}", task.id)))
                .ok();
            (text_file, diff_file, files, workspace)
        })
        .await
        .unwrap_or_else(|e| {
            // A bug of ours, after the agent ran: keep its outcome rather than run it again.
            console::error(&format!("diff or output of {} failed: {e}", report.id));
            (None, None, vec![], None)
        })
    };
    report.workspace = workspace;
    report.text_file = text_file;
    report.diff_file = diff_file;
    if exit.log_bytes_dropped > 0 {
        console::debug(&format!(
            "{}: {} bytes of output dropped by the log cap",
            task.id, exit.log_bytes_dropped
        ));
    }
    report.files_modified = files_modified;
    // Files the agent says it changed but the diff did not see (outside the snapshot's limits, or
    // changed back): listed too, relative to the workdir when inside it.
    // In a worktree git saw every change: its list is exact.
    for f in parsed.files_reported.iter().filter(|_| !isolated) {
        let p = Path::new(f);
        let rel = p
            .strip_prefix(&workdir)
            .map(|r| r.to_string_lossy().into_owned())
            .unwrap_or_else(|_| f.clone());
        if !report.files_modified.contains(&rel) {
            report.files_modified.push(rel);
        }
    }
    report.stopped = exit.stopped;
    report.attempt = attempt;
    report
}

/// Whether `e` is the environment's fault rather than the task's: a full, read-only or failing
/// disk, or no file handles left. Retrying the same task later can succeed; failing it cannot help.
fn environment_fault(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| {
            matches!(
                io.raw_os_error(),
                Some(
                    libc::ENOSPC
                        | libc::EROFS
                        | libc::EDQUOT
                        | libc::EIO
                        | libc::EMFILE
                        | libc::ENFILE
                )
            )
        })
}

/// The session to continue: the previous attempt ran on this same agent and was cut short (timeout,
/// supervisor shutdown), so the agent picks up where it was rather than starting over.
fn resumable_session(claim: &Claim) -> Option<&str> {
    let last = claim.history.last()?;
    (last.agent == claim.agent && matches!(last.outcome, Outcome::Timeout | Outcome::Interrupted))
        .then_some(last.session_id.as_deref())
        .flatten()
}

fn prepare(ctx: &AttemptCtx, task: &Task, claim: &Claim) -> Result<(PathBuf, String, PathBuf)> {
    let workdir = context::task_workdir(&ctx.layout, &ctx.cfg, task)?;
    if !workdir.is_dir() {
        anyhow::bail!("workdir {} is not a directory", workdir.display());
    }
    let prompt = ctx.redactor.redact(&context::build_prompt(
        &ctx.layout,
        &ctx.cfg,
        task,
        &claim.history,
    )?);
    let prompt_file = ctx.layout.prompt_path(&task.id, claim.attempt);
    let prompt_dir = prompt_file.parent().expect("has parent");
    std::fs::create_dir_all(prompt_dir)
        .with_context(|| format!("cannot create {}", ctx.layout.rel(prompt_dir)))?;
    // A copy for people to read; it is rebuilt from the task for every attempt, so no fsync.
    fsutil::atomic_write_derived(&prompt_file, prompt.as_bytes()).with_context(|| {
        format!(
            "cannot write the prompt file {}",
            ctx.layout.rel(&prompt_file)
        )
    })?;
    Ok((workdir, prompt, prompt_file))
}
