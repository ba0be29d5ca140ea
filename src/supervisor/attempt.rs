//! One attempt, off the loop: claim the task (the rename, the claim record and their fsyncs), tell
//! the mirror and the loop, write the prompt, open and snapshot the workdir (or make its worktree
//! and warm it: `workspace::setup`), run the agent through `process`, diff the workdir, write the
//! output, and report back.
//!
//! Everything here runs in the attempt's own tokio task and on blocking threads, beside other
//! attempts, claims and commits. It never touches the loop's state: it learns what it needs when it
//! is launched and reports back (a `Report` when it ends, a "claimed" message once the claim is
//! durable). The claim is its only move in the spool; the loop makes every later one.
//!
//! The workdir is the task's, and a task may leave anything in it (a FIFO, a symlink to `/`, a
//! file on a file system that stopped answering). So the workdir is opened once, before the run,
//! and held (`snapshot::Workdir`); the snapshot and the diff each run on a thread of their own
//! ([`off_thread`]) that the attempt stops waiting for when its time is up, when the task is
//! cancelled or when the supervisor stops. A read stuck in the kernel then costs a thread, never
//! the slot, the cancel or the shutdown.

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
use crate::record::{Attempt, Claim, FILES_IN_RECORD, Outcome};
use crate::redact::Redactor;
use crate::snapshot::{DiffResult, Progress, Snapshot, Workdir};
use crate::spool::Spool;
use crate::task::Task;

/// How much longer than `context.max_diff_seconds` an attempt waits for a walk of the workdir that
/// has not stopped on its own (the walk checks its budget between files; this covers one read).
const WALK_SLACK: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub(super) struct AttemptCtx {
    pub(super) cfg: Arc<Config>,
    pub(super) layout: Layout,
    pub(super) redactor: Arc<Redactor>,
    pub(super) pool: Arc<super::workspace::Pool>,
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
    /// A cluster lease's attempt: claimed in the queue already (nothing moves in this host's
    /// spool), run in a worktree made from this base commit, its results gathered into
    /// [`Report::cluster`] and removed from this host's `context/`.
    pub(super) leased_base: Option<String>,
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
        /// Workdir, prompt and prompt file. Boxed: large beside a `NotClaimed`.
        prepared: Result<Box<Prepared>>,
    },
}

struct Prepared {
    workdir: Arc<Workdir>,
    prompt: String,
    prompt_file: PathBuf,
    /// The worktree the agent works in, when the task is isolated; else it works in `workdir`.
    worktree: Option<super::workspace::Worktree>,
}

/// Claim the task; once it is ours, tell the mirror and the loop, write the prompt and open the
/// workdir.
fn begin(
    ctx: &AttemptCtx,
    job: ClaimJob,
    task: &Task,
    claim: &Claim,
    stop: &watch::Receiver<Option<Stop>>,
) -> Begun {
    let leased = job.leased_base.is_some();
    if !leased {
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
    }
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
            workdir.path(),
            !leased && resumable_session(claim).is_some(),
            &ctx.pool,
            job.leased_base.as_deref(),
        )?;
        Ok(Box::new(Prepared {
            workdir: Arc::new(workdir),
            prompt,
            prompt_file,
            worktree,
        }))
    });
    Begun::Ready {
        started_at,
        t0,
        prepared,
    }
}

/// Why a job run by [`off_thread`] was given up on.
enum Abandoned {
    /// A stop (cancel, shutdown, second signal) came first.
    Stopped(Stop),
    /// Its time was up.
    TimedOut(Duration),
    /// It could not start, or it panicked.
    Failed(String),
}

impl Abandoned {
    /// Why the walk `what` ("snapshot", "diff") was left, and where it was.
    fn describe(&self, what: &str, progress: &Progress) -> String {
        let at = progress.last();
        let at = if at.is_empty() {
            String::new()
        } else {
            format!(", at `{at}`")
        };
        match self {
            Abandoned::Stopped(Stop::Cancel) => {
                format!("the task was cancelled while the {what} ran{at}")
            }
            Abandoned::Stopped(_) => {
                format!("the supervisor was stopping while the {what} ran{at}")
            }
            Abandoned::TimedOut(limit) => format!(
                "the {what} did not finish within {} s (context.max_diff_seconds, plus {} s): a read in the workdir is stuck{at}",
                limit.as_secs_f64() - WALK_SLACK.as_secs_f64(),
                WALK_SLACK.as_secs_f64()
            ),
            Abandoned::Failed(e) => format!("the {what} failed: {e}"),
        }
    }
}

/// Run `job` on a thread of its own and wait for it, but never long: at most `limit`; not at all
/// once a stop is asked if `patience` is `None`, or `patience` more (a second signal: not at all).
/// A job given up on keeps its thread until it ends on its own (a read stuck in the kernel cannot
/// be interrupted) and its result is dropped; nothing here or in the loop waits for it, and the
/// process exits without it.
async fn off_thread<T: Send + 'static>(
    name: &str,
    limit: Duration,
    mut stop: watch::Receiver<Option<Stop>>,
    patience: Option<Duration>,
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Abandoned> {
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("orchestrate-{name}"))
        .spawn(move || {
            let _ = tx.send(job());
        })
        .map_err(|e| Abandoned::Failed(format!("cannot start a thread: {e}")))?;
    let give_up = tokio::time::Instant::now() + limit;
    // The first stop asked, and until when it is given to finish.
    let mut stopping: Option<(Stop, tokio::time::Instant)> = None;
    let mut listening = true;
    loop {
        if let Some(s) = *stop.borrow_and_update() {
            match (s, patience) {
                (Stop::KillNow, _) | (_, None) => {
                    return Err(Abandoned::Stopped(stopping.map_or(s, |(first, _)| first)));
                }
                (_, Some(p)) => {
                    stopping.get_or_insert((s, tokio::time::Instant::now() + p));
                }
            }
        }
        let until = stopping.map_or(give_up, |(_, t)| t.min(give_up));
        tokio::select! {
            done = &mut rx => {
                return done.map_err(|_| Abandoned::Failed("it panicked".into()));
            }
            _ = tokio::time::sleep_until(until) => {
                return Err(match stopping {
                    Some((s, t)) if t <= give_up => Abandoned::Stopped(s),
                    _ => Abandoned::TimedOut(limit),
                });
            }
            changed = stop.changed(), if listening => {
                // The loop dropped its end: no stop will come; the time limit still holds.
                listening = changed.is_ok();
            }
        }
    }
}

/// An attempt stopped before its agent started (its snapshot was still running): cancelled, or
/// interrupted by a shutdown and put back without using a retry.
fn stopped_before_the_agent(
    mut report: Report,
    claim: &Claim,
    started_at: &str,
    t0: Instant,
    stop: Stop,
) -> Report {
    let (outcome, kind, error) = match stop {
        Stop::Cancel => (Outcome::Cancelled, StopKind::Cancelled, "cancelled by user"),
        Stop::Shutdown | Stop::KillNow => (
            Outcome::Interrupted,
            StopKind::Shutdown,
            "interrupted by a supervisor shutdown",
        ),
    };
    report.attempt = Attempt {
        finished_at: Some(fsutil::now_rfc3339()),
        duration_ms: Some(t0.elapsed().as_millis() as u64),
        error: Some(format!("{error} (before the agent started)")),
        ..Attempt::new(claim.attempt, &claim.agent, started_at, outcome)
    };
    report.stopped = Some(kind);
    report
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
    let leased = job.leased_base.is_some();
    // One trip to a blocking thread for the claim and its fsyncs, the prompt file and opening the
    // workdir; the snapshot then runs on a thread of its own (below).
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
        worktree,
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
    // The snapshot, on a thread the attempt stops waiting for: a cancel or a shutdown ends the
    // attempt at once (the agent never starts), and a snapshot out of time is given up on (the
    // agent runs, and the diff says why there is none).
    let walk_limit = Duration::from_secs(ctx.cfg.context.max_diff_seconds) + WALK_SLACK;
    // A worktree needs none: git knows what the agent changed.
    let snapshot = if worktree.is_some() {
        None
    } else {
        let progress = Progress::default();
        let (wd, layout, cfg, pr) = (
            workdir.clone(),
            ctx.layout.clone(),
            ctx.cfg.clone(),
            progress.clone(),
        );
        let job = move || Snapshot::take(wd, &layout, &cfg, &pr);
        Some(
            match off_thread("snapshot", walk_limit, stop.clone(), None, job).await {
                Ok(s) => s,
                Err(Abandoned::Stopped(s)) => {
                    return stopped_before_the_agent(report, &claim, &started_at, t0, s);
                }
                Err(why) => {
                    let why = why.describe("snapshot", &progress);
                    console::warn(&format!("{}: {why}", task.id));
                    Snapshot::unfinished(workdir.clone(), &ctx.layout, &ctx.cfg, Some(why))
                }
            },
        )
    };
    // A worktree is made warm before its agent: `workspace.link`, then `workspace.setup`, whose
    // output starts the log. A failure ends the attempt here, and its worktree goes now.
    let marker = crate::marker::run_marker(&claim.instance, &task.id, claim.attempt);
    let mut log_append = false;
    // A resumed attempt's worktree is the one its session left: made warm already.
    if let Some(w) = worktree.as_ref().filter(|w| !w.resumed) {
        let s = super::workspace::setup::Setup {
            cfg: &ctx.cfg,
            redactor: &ctx.redactor,
            task_id: &task.id,
            marker: &marker,
            log_path: &log_path,
        };
        match super::workspace::setup::run(s, w, &stop).await {
            Ok(logged) => log_append = logged,
            Err(failed) => {
                if let Some(w) = worktree {
                    let (task, agent, n) = (task.clone(), claim.agent.clone(), claim.attempt);
                    let _ = tokio::task::spawn_blocking(move || {
                        w.finish(&task, &agent, n, false, false)
                    })
                    .await;
                }
                if let Some(s) = failed.stopped {
                    return stopped_before_the_agent(report, &claim, &started_at, t0, s);
                }
                let error = ctx.redactor.redact(&failed.error);
                console::warn(&format!(
                    "{}: {}",
                    task.id,
                    error.lines().next().unwrap_or("")
                ));
                attempt.outcome = Outcome::SetupFailed;
                attempt.error = Some(error);
                attempt.finished_at = Some(fsutil::now_rfc3339());
                attempt.duration_ms = Some(t0.elapsed().as_millis() as u64);
                report.attempt = attempt;
                report.permanent = failed.permanent;
                return report;
            }
        }
    }
    // Where the agent works: the task's workdir, or the same place inside its worktree.
    let workdir_path = match &worktree {
        Some(w) => w.cwd.clone(),
        None => workdir.path().to_path_buf(),
    };
    // What the stall watch looks at: the held workdir, or the worktree's (opened the same way).
    let watched = match &worktree {
        Some(w) => Workdir::open(&w.cwd).ok().map(Arc::new),
        None => Some(workdir.clone()),
    };
    let agent_cfg = ctx.cfg.agents[&claim.agent].clone();
    let adapter = agents::adapter_for(agent_cfg.kind)
        .expect("the scheduler only picks agents with an adapter");
    let req = RunRequest {
        task_id: &task.id,
        description: &task.file.description,
        prompt: &prompt,
        prompt_file: &prompt_file,
        workdir: &workdir_path,
        resume_session: resumable_session(&claim),
        max_cost_usd: task.file.max_cost_usd.map(|max| {
            let spent: f64 = claim.history.iter().filter_map(|a| a.cost_usd).sum();
            (max - spent).max(0.0)
        }),
    };
    let inv = match adapter.invocation(&claim.agent, &agent_cfg, &req) {
        Ok(i) => i,
        Err(e) => {
            attempt.error = Some(format!("{e:#}"));
            attempt.finished_at = Some(fsutil::now_rfc3339());
            report.attempt = attempt;
            // The agent never ran: its worktree goes now, not at the next start's sweep.
            if let Some(w) = worktree {
                let (task, agent, n) = (task.clone(), claim.agent.clone(), claim.attempt);
                let _ =
                    tokio::task::spawn_blocking(move || w.finish(&task, &agent, n, false, false))
                        .await;
            }
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
        log_append,
        max_log_bytes: ctx.cfg.orchestrator.max_log_bytes,
        redactor: ctx.redactor.clone(),
        marker: marker.clone(),
        stall: ctx
            .cfg
            .stall_timeout(&agent_cfg, adapter.streams_progress())
            .map(|after| {
                let (layout, cfg) = (ctx.layout.clone(), ctx.cfg.clone());
                let stamp = watched.clone().map(|root| -> process::WorkdirStamp {
                    Arc::new(move || crate::snapshot::workdir_stamp(&root, &layout, &cfg))
                });
                process::StallWatch {
                    after,
                    workdir: stamp,
                    // The snapshot just walked the workdir: no second walk at the start.
                    baseline: snapshot.as_ref().map(|s| s.stamp),
                }
            }),
    };
    if crate::failpoint::armed("attempt.running") {
        tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            crate::failpoint::hit("attempt.running");
        });
    }
    // `process::run` takes its receiver; the diff and the check need their own.
    let stop_for_diff = stop.clone();
    let stop_for_check = stop.clone();
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
    // The task's check, when it has one and the agent says it is done. It runs where the agent
    // worked once the agent's changes are recorded (committed in a worktree, diffed otherwise), so
    // what it makes is never part of them, and before anything lands.
    let check = ctx
        .cfg
        .check_for(&task.file, &agent_cfg)
        .filter(|_| parsed.outcome == Outcome::Completed);
    let check_log = ctx.layout.check_log_path(&task.id, claim.attempt);
    let check_run = |cwd| super::check::CheckRun {
        cfg: &ctx.cfg,
        redactor: &ctx.redactor,
        task_id: &task.id,
        attempt: claim.attempt,
        marker: &marker,
        cwd,
        log_path: &check_log,
        log_file: ctx.layout.rel(&check_log),
    };
    let mut checked = None;
    // The diff, on a thread of its own again. A stop asked now (the agent has ended) gives it the
    // kill grace period to finish, a second signal none; past its time it is given up on. The
    // agent's work stands either way, and the diff file says what is missing.
    // A worktree's changes are committed, diffed by git and landed, on a blocking thread (every git
    // call is bounded).
    let isolated = worktree.is_some();
    let diff = match (worktree, snapshot) {
        (Some(w), _) => {
            let (t, agent, n) = (task.clone(), claim.agent.clone(), claim.attempt);
            let committed = tokio::task::spawn_blocking(move || {
                let c = w.commit(&t, &agent, n);
                (w, c)
            })
            .await;
            match committed {
                Ok((w, mut c)) => {
                    if let Some(check) = check.as_ref().filter(|_| c.head().is_some()) {
                        let run = check_run(&w.cwd);
                        checked = Some(super::check::run(run, check, stop_for_check).await);
                        crate::failpoint::hit("attempt.after_check");
                    }
                    let outcome = after_check(&mut parsed, checked.as_ref());
                    let completed = outcome == Outcome::Completed;
                    // A task whose `max_cost_usd` is spent has no next attempt (see `verdict`):
                    // what it did stays on its branch.
                    let spent = crate::budget::task_spent(
                        task.file.max_cost_usd,
                        claim.history.iter().chain([&attempt]),
                    );
                    let out_of_budget = !completed
                        && outcome != Outcome::Cancelled
                        && (spent.is_some() || outcome == Outcome::BudgetExhausted);
                    if out_of_budget {
                        c.keep_branch();
                    }
                    // The next attempt may continue this one's session: it does so in this worktree.
                    let hold = !out_of_budget && parsed.session_id.is_some() && resumable(outcome);
                    let t = task.clone();
                    let finish = move || w.land_and_release(&t, c, completed, hold);
                    match tokio::task::spawn_blocking(finish).await {
                        Ok(f) => {
                            report.workspace = Some(f.result);
                            DiffResult {
                                incomplete: None,
                                text: f.diff,
                                files: f.files,
                            }
                        }
                        Err(e) => DiffResult::not_diffed(format!(
                            "the worktree could not be finished: {e}"
                        )),
                    }
                }
                Err(e) => {
                    DiffResult::not_diffed(format!("the worktree could not be finished: {e}"))
                }
            }
        }
        (None, Some(snapshot)) => {
            let progress = Progress::default();
            let pr = progress.clone();
            let grace = Duration::from_secs_f64(ctx.cfg.orchestrator.kill_grace_seconds);
            let job = move || snapshot.diff(&pr);
            let diff = off_thread("diff", walk_limit, stop_for_diff, Some(grace), job)
                .await
                .unwrap_or_else(|why| {
                    DiffResult::not_diffed(format!(
                        "the diff was not finished: {}",
                        why.describe("diff", &progress)
                    ))
                });
            if let Some(check) = &check {
                let run = check_run(&workdir_path);
                checked = Some(super::check::run(run, check, stop_for_check).await);
                crate::failpoint::hit("attempt.after_check");
                after_check(&mut parsed, checked.as_ref());
            }
            diff
        }
        (None, None) => DiffResult::not_diffed("no snapshot was taken".into()),
    };
    let check_stopped = checked.as_ref().and_then(|c| c.stopped);
    if let Some(c) = checked {
        if let Some(e) = &c.error {
            console::warn(&format!(
                "{}: {}",
                task.id,
                e.lines().next().unwrap_or_default()
            ));
        }
        attempt.check = Some(c.record);
        attempt.outcome = parsed.outcome;
        attempt.error = parsed.error.clone();
    }
    if let Some(why) = &diff.incomplete {
        console::warn(&format!("{}: diff incomplete: {why}", task.id));
    }
    let mut files_modified = diff.files;
    // Files the agent says it changed but the diff did not see (outside the snapshot's limits, or
    // changed back): listed too, relative to the workdir when inside it. In a worktree git saw
    // every change: its list is exact.
    let mut listed: std::collections::HashSet<String> = files_modified.iter().cloned().collect();
    for f in parsed.files_reported.iter().filter(|_| !isolated) {
        let p = Path::new(f);
        let rel = p
            .strip_prefix(&workdir_path)
            .map(|r| r.to_string_lossy().into_owned())
            .unwrap_or_else(|_| f.clone());
        if listed.insert(rel.clone()) {
            files_modified.push(rel);
        }
    }
    // A leased attempt's change, as the patch its origin applies (never redacted: it must apply).
    let leased_patch: Option<String>;
    // Off the runtime's worker threads, in one trip: the writes wait for the disk.
    let (text_file, diff_file, files_file, files_modified) = {
        let (layout, redactor, task, agent) = (
            ctx.layout.clone(),
            ctx.redactor.clone(),
            task.clone(),
            claim.agent.clone(),
        );
        let (attempt_n, duration) = (claim.attempt, exit.duration);
        let text = std::mem::take(&mut parsed.text);
        let diff_text = diff.text;
        leased_patch = leased.then(|| diff_text.clone());
        tokio::task::spawn_blocking(move || {
            let header = context::OutputHeader {
                task: &task,
                agent: &agent,
                attempt: attempt_n,
                duration,
                exit: exit_text,
            };
            let warn = |what: &str, e: anyhow::Error| {
                console::warn(&format!("cannot write {what} of {}: {e:#}", task.id));
            };
            let text_file = context::write_output(&layout, &header, &text, &redactor)
                .map_err(|e| warn("output", e))
                .ok();
            let diff_file = context::write_diff(&layout, &task.id, &diff_text, &redactor)
                .map_err(|e| warn("diff", e))
                .ok();
            // The whole list when the result will hold only its start; an older list goes.
            let files_file = if files_modified.len() > FILES_IN_RECORD {
                context::write_files_list(&layout, &task.id, &files_modified, &redactor)
                    .map_err(|e| warn("the list of changed files", e))
                    .ok()
            } else {
                let _ = std::fs::remove_file(layout.files_list_path(&task.id));
                None
            };
            (text_file, diff_file, files_file, files_modified)
        })
        .await
        .unwrap_or_else(|e| {
            // A bug of ours, after the agent ran: keep its outcome rather than run it again.
            console::error(&format!("output of {} failed: {e}", report.id));
            (None, None, None, vec![])
        })
    };
    report.text_file = text_file;
    report.diff_file = diff_file;
    report.files_file = files_file;
    report.files_modified = files_modified;
    if exit.log_bytes_dropped > 0 {
        console::debug(&format!(
            "{}: {} bytes of output dropped by the log cap",
            task.id, exit.log_bytes_dropped
        ));
    }
    report.stopped = exit.stopped.or(check_stopped);
    report.attempt = attempt;
    if let Some(patch) = leased_patch {
        let (layout, id, n) = (ctx.layout.clone(), task.id.clone(), claim.attempt);
        let files = [
            report.text_file.take(),
            report.diff_file.take(),
            report.files_file.take(),
        ];
        let gathered = tokio::task::spawn_blocking(move || gather_leased(&layout, &id, n, files))
            .await
            .unwrap_or_default();
        report.cluster = Some(super::events::LeasedResult {
            output: gathered.0,
            log_tail: gathered.1,
            patch,
        });
    }
    report
}

/// How much of an attempt's log goes back to the origin.
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// A leased attempt's output and the end of its log, read, then its files removed from this
/// host's `context/`: the task is the origin's, and only the origin's tree keeps what it did.
fn gather_leased(
    layout: &Layout,
    id: &str,
    attempt: u32,
    files: [Option<PathBuf>; 3],
) -> (String, String) {
    let output = files[0]
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let log = layout.log_path(id, attempt);
    let tail = crate::fsutil::read_tail(&log, LOG_TAIL_BYTES).unwrap_or_default();
    for p in files.iter().flatten() {
        let _ = std::fs::remove_file(p);
    }
    for p in [
        log,
        layout.prompt_path(id, attempt),
        layout.check_log_path(id, attempt),
    ] {
        let _ = std::fs::remove_file(&p);
        if let Some(dir) = p.parent() {
            // The task's own folders go once empty; others' are never touched (not empty).
            let _ = std::fs::remove_dir(dir);
        }
    }
    (output, tail)
}

/// The attempt's outcome once its check (if one ran) is taken into account: a check that did not
/// pass turns a completed attempt into `check_failed`, or `cancelled` / `interrupted` when a cancel
/// or a shutdown stopped it.
fn after_check(
    parsed: &mut agents::AgentOutcome,
    checked: Option<&super::check::Checked>,
) -> Outcome {
    if let Some(c) = checked
        && !c.record.passed
    {
        (parsed.outcome, parsed.error) = match c.stopped {
            Some(StopKind::Cancelled) => (
                Outcome::Cancelled,
                Some("cancelled by user (while the check ran)".into()),
            ),
            Some(StopKind::Shutdown) => (
                Outcome::Interrupted,
                Some("interrupted by a supervisor shutdown (while the check ran)".into()),
            ),
            None => (Outcome::CheckFailed, c.error.clone()),
        };
    }
    parsed.outcome
}

/// Whether an attempt that ended so continues in the next one on the same agent, in the same
/// CLI session (and worktree): it was cut short, or its check failed and the agent is told why.
fn resumable(outcome: Outcome) -> bool {
    matches!(
        outcome,
        Outcome::Timeout | Outcome::Stalled | Outcome::Interrupted | Outcome::CheckFailed
    )
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
/// stall, supervisor shutdown) or failed its check, so the agent picks up where it was rather than
/// starting over.
fn resumable_session(claim: &Claim) -> Option<&str> {
    let last = claim.history.last()?;
    (last.agent == claim.agent && resumable(last.outcome))
        .then_some(last.session_id.as_deref())
        .flatten()
}

fn prepare(ctx: &AttemptCtx, task: &Task, claim: &Claim) -> Result<(Workdir, String, PathBuf)> {
    let path = context::task_workdir(&ctx.layout, &ctx.cfg, task)?;
    if !path.is_dir() {
        anyhow::bail!("workdir {} is not a directory", path.display());
    }
    // Held from here to the diff: what the task does to the path cannot move the diff elsewhere.
    let workdir = Workdir::open(&path).with_context(|| {
        format!(
            "cannot open workdir {} (did a part of it just become a symlink?)",
            path.display()
        )
    })?;
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
