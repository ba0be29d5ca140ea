//! Finishing an attempt. Its report becomes a [`Verdict`], a pure function of the report and the
//! task's facts (`verdict`, unit-tested below); the verdict becomes a requeue (interrupted by a
//! shutdown; rate-limited: the agent cools down; refused credentials: the agent needs a login), a
//! retry after a back-off, or a terminal result.
//! A terminal result is committed off the loop (`Commits`: result file, rename, fsyncs on a blocking
//! thread) and recorded once the commit is back (`on_committed`). A pending task that must not run
//! (a failed dependency, a cycle, a cancel) is failed here without an attempt (`fail_pending`).
//!
//! A transition `tasks/` refuses (a full or read-only disk, the spool lock held by a stopped peer) is
//! never dropped: its outcome is held (`Held`) in memory and, when the state directory takes it,
//! in `state_dir/unfinished/` (so a restart commits it instead of running the agent again), and it
//! is tried again with back-off. The task stays in hand meanwhile, its mirror row says why.
//!
//! Owns the commits in flight and the held ones. It never starts an attempt and never reads
//! `pending/`: a requeued task goes back to intake as an `Action`. A task has at most one commit in
//! flight or held, and the loop counts it as in hand until the commit is back, so its transitions
//! stay in order.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use tokio::task::{Id, JoinError, JoinSet};

use super::dispatch::{claim_on_disk, unclaim, unclaimed};
use super::events::Action;
use super::events::{Claimed, Committed, Deferred, Report};
use super::{Env, Supervisor};
use crate::config::Config;
use crate::console;
use crate::context;
use crate::fsutil;
use crate::mirror::{self, Op};
use crate::process::StopKind;
use crate::record::{Attempt, History, Outcome, TaskResult, Terminal};
use crate::scheduler;
use crate::spool::{Place, Spool};
use crate::task::Task;

/// What an attempt's report means for its task.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Verdict {
    /// A supervisor shutdown stopped it before it completed: back to `pending/`, no retry used.
    Interrupted,
    /// The agent hit a rate limit or its quota: not the task's fault and not a failed attempt. The
    /// agent rests, and the task goes back to `pending/` at once, where the scheduler hands it to
    /// the next agent in its chain.
    CoolDown,
    /// The agent's credentials were refused or missing: not the task's fault, and no retry on that
    /// agent can help. The agent is marked "needs login", and the task goes back to `pending/` at
    /// once for the next agent in its chain (or waits, saying which agent needs a login).
    NeedsLogin,
    /// A failure with retries left (`failures` so far): back to `pending/`, to run after `delay`.
    Retry { failures: u32, delay: Duration },
    /// Finished for good: completed, or failed with `error`.
    Done {
        status: Terminal,
        error: Option<String>,
    },
}

/// The facts a verdict is made from.
pub(super) struct Judged<'a> {
    /// The attempt that just ended.
    pub(super) attempt: &'a Attempt,
    /// The task's attempts before it.
    pub(super) earlier: &'a [Attempt],
    /// Why the supervisor stopped the agent, if it did.
    pub(super) stopped: Option<StopKind>,
    /// The task itself is at fault (bad workdir, missing context file): retrying cannot help.
    pub(super) permanent: bool,
    pub(super) max_retries: u32,
    /// The task's `max_cost_usd`: what its attempts together may cost.
    pub(super) max_cost_usd: Option<f64>,
}

/// Decide what an attempt's report means. Pure: no clock, no disk, no state.
pub(super) fn verdict(j: &Judged, cfg: &Config) -> Verdict {
    let outcome = j.attempt.outcome;
    // A task that spent its `max_cost_usd` is not run again, whatever ended the attempt (a failure,
    // a rate limit, a shutdown): another attempt could only spend more. Its work stays on its branch.
    let all = || j.earlier.iter().chain([j.attempt]);
    if !matches!(outcome, Outcome::Completed | Outcome::Cancelled)
        && (outcome == Outcome::BudgetExhausted
            || crate::budget::task_spent(j.max_cost_usd, all()).is_some())
    {
        let n = all().count();
        let spent = crate::budget::usd(all().filter_map(|a| a.cost_usd).sum());
        // Without `max_cost_usd` the cap was the agent's own (`--max-budget-usd` in its `args`).
        let cap = match j.max_cost_usd {
            Some(max) => format!("max_cost_usd ${}", crate::budget::usd(max)),
            None => "the agent's own cost cap".into(),
        };
        return Verdict::Done {
            status: Terminal::Failed,
            error: Some(format!(
                "budget_exhausted: spent ${spent} of {cap} in {n} attempt(s); last: {}",
                j.attempt.error.as_deref().unwrap_or(outcome.as_str())
            )),
        };
    }
    if j.stopped == Some(StopKind::Shutdown) && outcome != Outcome::Completed {
        return Verdict::Interrupted;
    }
    if matches!(outcome, Outcome::RateLimited | Outcome::QuotaExhausted) && j.stopped.is_none() {
        return Verdict::CoolDown;
    }
    if outcome == Outcome::Auth && j.stopped.is_none() {
        return Verdict::NeedsLogin;
    }
    let failures = j
        .earlier
        .iter()
        .chain([j.attempt])
        .filter(|a| a.outcome.counts_as_failure())
        .count() as u32;
    let retryable = outcome != Outcome::Completed
        && outcome != Outcome::Cancelled
        && !j.permanent
        && failures <= j.max_retries;
    if retryable {
        let delay = scheduler::retry_delay(cfg, failures);
        return Verdict::Retry { failures, delay };
    }
    let error = match outcome {
        Outcome::Completed => None,
        Outcome::Cancelled => Some("cancelled by user".into()),
        _ if j.permanent => j.attempt.error.clone(),
        _ => Some(format!(
            "{} (after {failures} failed attempt(s); max_retries {})",
            j.attempt.error.as_deref().unwrap_or(outcome.as_str()),
            j.max_retries
        )),
    };
    let status = if outcome == Outcome::Completed {
        Terminal::Completed
    } else {
        Terminal::Failed
    };
    Verdict::Done { status, error }
}

/// A deferred transition with what went wrong and when to try again.
pub(super) struct Held {
    what: Deferred,
    pub(super) error: String,
    tries: u32,
    next: Instant,
}

/// The first retry of a refused transition comes after this; each next waits twice as long.
const HELD_FIRST: Duration = Duration::from_secs(1);
/// No retry of a refused transition waits longer.
const HELD_MAX: Duration = Duration::from_secs(30);

/// Terminal commits (result file, task rename, fsyncs) run on blocking threads, several at once,
/// so the loop goes on claiming while the disk works.
#[derive(Default)]
pub(super) struct Commits {
    tasks: JoinSet<Committed>,
    /// The tasks whose commit is under way, by the commit's task id.
    finishing: HashMap<String, Id>,
    /// Transitions `tasks/` refused, by task id.
    held: BTreeMap<String, Held>,
    /// Tries so far of a held transition that is being tried again right now.
    retrying: HashMap<String, (u32, String)>,
}

impl Commits {
    pub(super) fn contains(&self, id: &str) -> bool {
        self.finishing.contains_key(id) || self.held.contains_key(id)
    }

    pub(super) fn len(&self) -> usize {
        self.finishing.len() + self.held.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.finishing.is_empty() && self.held.is_empty()
    }

    /// The held transitions, by task id.
    pub(super) fn held(&self) -> impl Iterator<Item = (&str, &Held)> {
        self.held.iter().map(|(id, h)| (id.as_str(), h))
    }

    /// When the earliest held transition is due again.
    pub(super) fn next_retry(&self) -> Option<Instant> {
        self.held.values().map(|h| h.next).min()
    }

    /// Keep `what` to try again later; the tries it had, if it was being retried. `true` the first
    /// time (say it loudly), and whenever the error changes.
    fn hold(&mut self, what: Deferred, error: String) -> (bool, u32) {
        let id = what.id().to_string();
        let (tries, last) = self.retrying.remove(&id).unwrap_or((0, String::new()));
        let tries = tries + 1;
        let wait = HELD_FIRST
            .saturating_mul(1 << (tries - 1).min(16))
            .min(HELD_MAX);
        let news = tries == 1 || last != error;
        self.held.insert(
            id,
            Held {
                what,
                error,
                tries,
                next: Instant::now() + wait,
            },
        );
        (news, tries)
    }

    /// The held transitions due now, taken out to be tried again.
    fn take_due(&mut self, now: Instant) -> Vec<Deferred> {
        let due: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| h.next <= now)
            .map(|(id, _)| id.clone())
            .collect();
        due.into_iter()
            .filter_map(|id| self.held.remove(&id))
            .map(|h| {
                self.retrying
                    .insert(h.what.id().to_string(), (h.tries, h.error));
                h.what
            })
            .collect()
    }

    /// `id`'s transition landed: whether it had been held (and so kept in the state directory).
    fn landed(&mut self, id: &str) -> Option<u32> {
        self.retrying.remove(id).map(|(tries, _)| tries)
    }

    /// Some commit's thread has not been joined yet.
    pub(super) fn has_tasks(&self) -> bool {
        !self.tasks.is_empty()
    }

    /// Hand the result to a blocking thread that commits it; `on_committed` takes it from there.
    pub(super) fn start(&mut self, spool: &Spool, task: Task, result: TaskResult) {
        self.start_with(spool, task, move || result);
    }

    /// Work out the result on a blocking thread (`make`: a fan-out's pick lands its winner
    /// there), then commit it as [`Commits::start`] does.
    pub(super) fn start_with(
        &mut self,
        spool: &Spool,
        task: Task,
        make: impl FnOnce() -> TaskResult + Send + 'static,
    ) {
        let id = task.id.clone();
        let spool = spool.clone();
        let handle = self.tasks.spawn_blocking(move || {
            let result = make();
            let outcome = spool.finish(&result).map_err(|e| format!("{e:#}"));
            Committed {
                task,
                result,
                outcome,
            }
        });
        self.finishing.insert(id, handle.id());
    }

    pub(super) async fn join_next(&mut self) -> Option<Result<Committed, JoinError>> {
        self.tasks.join_next().await
    }

    pub(super) fn try_join_next(&mut self) -> Option<Result<Committed, JoinError>> {
        self.tasks.try_join_next()
    }

    /// A commit is back: it is no longer under way. `None` for a commit that crashed.
    fn done(&mut self, done: Result<Committed, JoinError>) -> Option<Committed> {
        match done {
            Ok(c) => {
                self.finishing.remove(&c.result.task_id);
                Some(c)
            }
            Err(e) => {
                // A bug of ours: the claim stays, and recovery at the next start settles the task.
                self.finishing.retain(|id, h| {
                    let it = *h == e.id();
                    if it {
                        console::error(&format!("commit of {id} crashed: {e}"));
                    }
                    !it
                });
                None
            }
        }
    }
}

/// Move a running task back to `pending/` with its history; intake reads it again at once.
#[must_use = "the actions are the rest of the work: apply them"]
fn requeue(env: &Env, task: &Task, history: History, why: &str) -> Vec<Action> {
    let id = &task.id;
    if let Err(e) = env.spool.requeue(&history) {
        let what = Deferred::Requeue {
            task: task.clone(),
            history,
            why: why.to_string(),
        };
        return vec![Action::Defer(Box::new(what), format!("{e:#}"))];
    }
    console::info(&format!("requeued   {id}: {why}"));
    vec![Action::Reread(env.spool.task_path(Place::Pending, id))]
}

impl Supervisor {
    /// An attempt reported back: its slot is free, and the verdict says what becomes of the task.
    #[must_use = "the actions are the rest of the work: apply them"]
    pub(super) fn on_report(&mut self, r: Report) -> Vec<Action> {
        let Some(run) = self.runs.end(&r.id) else {
            return vec![];
        };
        self.state_dirty = true;
        // Normally released already (the claim's message came first); a crashed attempt never sent it.
        self.intake.release(&run.path);
        if let Some(how) = r.unclaimed {
            return unclaimed(
                &self.env,
                &run.task,
                &run.claim,
                &run.path,
                run.cancelling,
                how,
            );
        }
        let env = &self.env;
        if let Some(problem) = r.environment {
            // Not the task's fault: back to pending with its history as it was (no attempt
            // counted), to wait a while; its wait note says why.
            let delay = scheduler::retry_delay(&env.cfg, 1);
            let at = time::OffsetDateTime::now_utc() + delay;
            let history = History {
                task_id: r.id.clone(),
                version: run.claim.version + 1,
                attempts: run.claim.history.clone(),
                not_before: Some(fsutil::fmt_time(at)),
                backoff_seconds: Some(delay.as_secs_f64()),
                reason: Some(format!(
                    "{problem} (the environment's fault, not the task's)"
                )),
            };
            let why = format!(
                "{problem}; not counted as an attempt, trying again in {:.0} s",
                delay.as_secs_f64()
            );
            return requeue(env, &run.task, history, &why);
        }
        let max_retries = env.max_retries_of(&run.task);
        let judged = Judged {
            attempt: &r.attempt,
            earlier: &run.claim.history,
            stopped: r.stopped,
            permanent: r.permanent,
            max_retries,
            max_cost_usd: run.task.file.max_cost_usd,
        };
        let verdict = verdict(&judged, &env.cfg);
        // Spent whatever becomes of the task; the agent's budget counts it at once.
        self.dispatch.spending.attempt_finished(&r.id, &r.attempt);
        if r.attempt.outcome == crate::record::Outcome::Stalled {
            env.notice(
                crate::config::NotifyOn::Stalled,
                Some(&run.claim.agent),
                Some(&r.id),
                format!(
                    "{} on {}: {}",
                    r.id,
                    run.claim.agent,
                    r.attempt.error.as_deref().unwrap_or("stalled")
                ),
                None,
            );
        }
        let mut attempts = run.claim.history.clone();
        attempts.push(r.attempt.clone());
        if self
            .cluster
            .as_ref()
            .is_some_and(|c| c.leases.contains_key(&r.id))
        {
            if let Some(a) = attempts.last_mut() {
                a.host = Some(self.cluster.as_ref().expect("checked").link.host.clone());
            }
            return self.on_leased_report(&run, r, verdict, attempts);
        }
        let outcome = r.attempt.outcome;
        let agent = &run.claim.agent;
        let history = |not_before, reason| History {
            task_id: r.id.clone(),
            version: run.claim.version + 1,
            attempts: attempts.clone(),
            not_before,
            backoff_seconds: None,
            reason,
        };
        match verdict {
            Verdict::Interrupted => {
                let reason = "interrupted by a supervisor shutdown";
                let history = history(None, Some(reason.into()));
                requeue(env, &run.task, history, "interrupted by shutdown")
            }
            Verdict::CoolDown => {
                let base = env.cfg.agents[agent]
                    .cooldown_seconds
                    .map(Duration::from_secs);
                let error = r
                    .attempt
                    .error
                    .clone()
                    .unwrap_or_else(|| outcome.as_str().into());
                let until = self
                    .dispatch
                    .cool_down(agent, outcome, r.retry_after, base, &error);
                let until = fsutil::fmt_time(until);
                let outcome = outcome.as_str();
                console::warn(&format!(
                    "cooldown   {agent} until {until}: {outcome} ({error})"
                ));
                env.notice(
                    crate::config::NotifyOn::Cooldown,
                    Some(agent),
                    Some(&r.id),
                    format!("{agent} is cooling down until {until}: {outcome} ({error})"),
                    Some(until.clone()),
                );
                let reason = format!("{outcome} on {agent}; cooling down until {until}");
                let history = history(None, Some(reason));
                let why = format!("{outcome} on {agent}: re-dispatched");
                requeue(env, &run.task, history, &why)
            }
            Verdict::NeedsLogin => {
                let error = r
                    .attempt
                    .error
                    .clone()
                    .unwrap_or_else(|| outcome.as_str().into());
                // The mark is durable before the task moves: a crash between the two leaves the
                // agent marked and the task recovered, never a task retried on a logged-out agent
                // that nothing marked.
                let mark = self.dispatch.needs_login(env, agent, &error);
                console::warn(&format!(
                    "login      {agent} needs login: {error} ({})",
                    mark.hint
                ));
                env.notice(
                    crate::config::NotifyOn::NeedsLogin,
                    Some(agent),
                    Some(&r.id),
                    format!("{agent} needs a login: {error} ({})", mark.hint),
                    None,
                );
                let reason = format!("auth on {agent}: needs login ({error})");
                let history = history(None, Some(reason));
                let why = format!("auth on {agent}: needs login; re-dispatched");
                requeue(env, &run.task, history, &why)
            }
            Verdict::Retry { failures, delay } => {
                let at = time::OffsetDateTime::now_utc() + delay;
                let mut history = history(Some(fsutil::fmt_time(at)), r.attempt.error.clone());
                history.backoff_seconds = Some(delay.as_secs_f64());
                // One console line: an error quoting a command's output (a check's) has more.
                let why = format!(
                    "{}: {}; retry {failures} of {max_retries} in {:.0} s",
                    outcome.as_str(),
                    r.attempt
                        .error
                        .as_deref()
                        .and_then(|e| e.lines().next())
                        .unwrap_or("-"),
                    delay.as_secs_f64()
                );
                requeue(env, &run.task, history, &why)
            }
            Verdict::Done { status, error } => {
                // Orchestrate's own cancel (another candidate won) says so, not "by user".
                let error = match (&run.cancel_reason, outcome) {
                    (Some(why), Outcome::Cancelled) => {
                        if let Some(a) = attempts.last_mut() {
                            a.error = Some(why.clone());
                        }
                        Some(why.clone())
                    }
                    _ => error,
                };
                if status == Terminal::Completed {
                    self.dispatch.succeeded(agent);
                }
                let rel = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| env.layout.rel(p));
                let review = context::review_matches(&env.cfg, &r.files_modified);
                let mut result = TaskResult {
                    task_id: r.id.clone(),
                    status,
                    version: run.claim.version + 1,
                    agent: Some(agent.clone()),
                    description: run.task.file.description.clone(),
                    finished_at: r
                        .attempt
                        .finished_at
                        .clone()
                        .unwrap_or_else(fsutil::now_rfc3339),
                    attempts,
                    output_file: rel(&r.text_file),
                    diff_file: rel(&r.diff_file),
                    files_modified: vec![],
                    files_modified_total: None,
                    files_modified_file: None,
                    review_required: false,
                    review_files: vec![],
                    error,
                    chosen_because: run.claim.chosen_because.clone(),
                    workspace: r.workspace.clone().map(Box::new),
                    fan_out: None,
                };
                // Capped: a task that changed 200,000 files keeps a record that reads back.
                result.set_files(&r.files_modified, rel(&r.files_file), review);
                vec![Action::commit(&run.task, result)]
            }
        }
    }

    /// An attempt task panicked (a bug in orchestrate, not the agent's fault): the report to handle
    /// in its place, a failed attempt, so the task retries or fails like any other and its slot is
    /// released.
    pub(super) fn crash_report(&mut self, e: JoinError) -> Option<Report> {
        let Some(id) = self.runs.joined(e.id()) else {
            console::error(&format!("attempt task failed: {e}"));
            return None;
        };
        console::error(&format!("attempt of {id} crashed: {e}"));
        let run = self.runs.get(&id)?;
        // Crashed before the claim was done: nothing ran, and the spool put the file back unless the
        // claim record was written (then `unclaimed` does). The "claimed" message may simply not be
        // handled yet, so the claim record decides.
        let unclaimed = (!run.claimed && !claim_on_disk(&self.env.spool, &run.claim))
            .then(|| Claimed::Failed(format!("internal error: {e}")));
        let attempt = Attempt {
            finished_at: Some(fsutil::now_rfc3339()),
            error: Some(format!("internal error while running the attempt: {e}")),
            ..Attempt::new(
                run.claim.attempt,
                &run.claim.agent,
                &run.claim.started_at,
                Outcome::AgentError,
            )
        };
        Some(Report {
            unclaimed,
            ..Report::new(&id, attempt)
        })
    }

    /// A commit is back: the task is terminal on disk; tell the console, the mirror and the ledger.
    pub(super) fn on_committed(&mut self, done: Result<Committed, JoinError>) {
        let Some(Committed {
            task,
            result,
            outcome,
        }) = self.commits.done(done)
        else {
            return;
        };
        let id = result.task_id.clone();
        self.delivered(&id);
        let id = &id;
        if let Err(e) = outcome {
            // The claim stays, and so does the outcome: never run the agent again for it.
            self.defer(Deferred::Finish { task, result }, e);
            return;
        }
        self.landed(id);
        // A cancel request, if any, is answered now that the task is terminal on disk.
        self.env.spool.drop_cancel_request(id);
        let secs: u64 = result
            .attempts
            .last()
            .and_then(|a| a.duration_ms)
            .unwrap_or(0);
        match result.status {
            Terminal::Completed => console::info(&format!(
                "completed  {id} on {} in {:.2} s{}{}",
                result.agent.as_deref().unwrap_or("-"),
                secs as f64 / 1000.0,
                match result.files_changed() {
                    0 => String::new(),
                    n => format!(", changed {n}"),
                },
                if result.review_required {
                    format!(" — REVIEW REQUIRED: {}", result.review_files.join(", "))
                } else {
                    String::new()
                }
            )),
            Terminal::Failed => console::info(&format!(
                "failed     {id}: {}",
                result.error.as_deref().unwrap_or("-")
            )),
        }
        self.env.writer.send(Op::Upsert {
            row: mirror::terminal_row(&self.env.spool, &result, Some(&task)),
            attempts: result.attempts.clone(),
        });
        self.ledger.record_result(&result);
        self.state_dirty = true;
    }

    /// `tasks/` refused a transition: hold it, keep it in the state directory when possible, say so
    /// (on the console and in the task's mirror row), and try again later.
    pub(super) fn defer(&mut self, what: Deferred, error: String) {
        let id = what.id().to_string();
        let kept = match &what {
            Deferred::Finish { result, .. } => Some(self.env.spool.keep_unfinished_result(result)),
            Deferred::Requeue { history, .. } => {
                Some(self.env.spool.keep_unfinished_history(history))
            }
            Deferred::Unclaim { .. } => None,
        };
        let (news, tries) = self.commits.hold(what, error.clone());
        self.state_dirty = true;
        if !news {
            return;
        }
        let verb = match self.commits.held.get(&id).map(|h| &h.what) {
            Some(Deferred::Requeue { .. }) | Some(Deferred::Unclaim { .. }) => "requeue",
            _ => "finish",
        };
        let mut line =
            format!("cannot {verb} {id}: {error}; its outcome is kept and the move is tried again");
        if tries > 1 {
            line.push_str(&format!(" (try {tries})"));
        }
        if let Some(Err(e)) = &kept {
            line.push_str(&format!(
                "; it could not be kept in the state directory either ({e:#}): a restart before it lands runs the task again"
            ));
        }
        console::error(&line);
        self.say_problems();
        self.env.writer.send(Op::Note {
            id: id.clone(),
            note: Some(format!("cannot {verb}: {error}; trying again")),
        });
    }

    /// Try the held transitions that are due again.
    #[must_use = "the actions are the rest of the work: apply them"]
    pub(super) fn retry_held(&mut self) -> Vec<Action> {
        let mut out = vec![];
        for what in self.commits.take_due(Instant::now()) {
            match what {
                Deferred::Finish { task, result } => {
                    self.commits.start(&self.env.spool, task, result);
                }
                Deferred::Requeue { task, history, why } => {
                    let next = requeue(&self.env, &task, history, &why);
                    self.landed_unless_deferred(&task.id, &next);
                    out.extend(next);
                }
                Deferred::Unclaim { id, path, settle } => {
                    let next = unclaim(&self.env, &id, path, settle);
                    self.landed_unless_deferred(&id, &next);
                    out.extend(next);
                }
            }
        }
        out
    }

    fn landed_unless_deferred(&mut self, id: &str, next: &[Action]) {
        if !next.iter().any(|a| matches!(a, Action::Defer(..))) {
            self.landed(id);
        }
    }

    /// A held transition landed: its kept copy and its note go.
    fn landed(&mut self, id: &str) {
        if let Some(tries) = self.commits.landed(id) {
            self.env.spool.drop_unfinished(id);
            self.env.writer.send(Op::Note {
                id: id.to_string(),
                note: None,
            });
            console::info(&format!("landed     {id}: after {tries} refused tries"));
            self.say_problems();
        }
    }

    /// The held transitions and the free-space floor, where `status` reads them even when the disk
    /// is full (the mirror, on the same disk, may not take the note).
    pub(super) fn say_problems(&self) {
        let disk = self.dispatch.disk_problem();
        let text: Vec<String> = disk
            .into_iter()
            .chain(self.commits.held().map(|(id, h)| {
                let verb = match h.what {
                    Deferred::Finish { .. } => "finish",
                    _ => "requeue",
                };
                format!("cannot {verb} {id}: {}; trying again", h.error)
            }))
            .collect();
        let _ = self.env.me.set_problems(&text.join("\n"));
    }

    /// Fail a pending task without running it.
    pub(super) fn fail_pending(&mut self, id: &str, reason: &str) {
        self.dispatch.forget(id);
        let Some(p) = self.intake.take(id) else {
            return;
        };
        let result = TaskResult::failed(
            id,
            p.history.version + 1,
            &p.task.file.description,
            p.history.attempts.clone(),
            reason.to_string(),
        );
        let spool = &self.env.spool;
        match spool.fail_pending(&p.path, &result) {
            Ok(true) => {
                console::info(&format!("failed     {id}: {reason}"));
                self.env.writer.send(Op::Upsert {
                    row: crate::mirror::terminal_row(spool, &result, Some(&p.task)),
                    attempts: result.attempts.clone(),
                });
                self.ledger.record_result(&result);
                self.state_dirty = true;
            }
            Ok(false) => {}
            Err(e) => console::error(&format!("cannot fail {id}: {e:#}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::parse(
            "agents:\n  a: {kind: command, command: sh}\ntask_queue: {retry_delay_seconds: 60}\n",
            "c.yaml",
        )
        .expect("valid config")
    }

    fn attempt(outcome: Outcome, error: Option<&str>) -> Attempt {
        Attempt {
            error: error.map(String::from),
            ..Attempt::new(1, "a", "2030-01-01T00:00:00Z", outcome)
        }
    }

    /// The verdict on `this` after `earlier`, with `max_retries` 2.
    fn judge(
        this: &Attempt,
        earlier: &[Attempt],
        stopped: Option<StopKind>,
        permanent: bool,
    ) -> Verdict {
        let j = Judged {
            attempt: this,
            earlier,
            stopped,
            permanent,
            max_retries: 2,
            max_cost_usd: None,
        };
        verdict(&j, &cfg())
    }

    fn failed(error: &str) -> Verdict {
        Verdict::Done {
            status: Terminal::Failed,
            error: Some(error.into()),
        }
    }

    #[test]
    fn a_completed_attempt_completes_the_task() {
        let done = Verdict::Done {
            status: Terminal::Completed,
            error: None,
        };
        assert_eq!(
            judge(&attempt(Outcome::Completed, None), &[], None, false),
            done
        );
        // Even when a shutdown came while it finished: the work is done.
        let stopped = Some(StopKind::Shutdown);
        let this = attempt(Outcome::Completed, None);
        assert_eq!(judge(&this, &[], stopped, false), done);
    }

    #[test]
    fn a_shutdown_interrupts_without_using_a_retry() {
        let this = attempt(
            Outcome::Interrupted,
            Some("interrupted by a supervisor shutdown"),
        );
        let earlier = [
            attempt(Outcome::AgentError, None),
            attempt(Outcome::AgentError, None),
        ];
        // Two failures already and max_retries 2: still requeued, not failed.
        let v = judge(&this, &earlier, Some(StopKind::Shutdown), false);
        assert_eq!(v, Verdict::Interrupted);
        // A failure the agent had on its own during the shutdown is stopped all the same.
        let this = attempt(Outcome::AgentError, Some("exit 1"));
        let v = judge(&this, &[], Some(StopKind::Shutdown), false);
        assert_eq!(v, Verdict::Interrupted);
    }

    #[test]
    fn a_rate_limit_or_quota_cools_the_agent_down_without_using_a_retry() {
        for outcome in [Outcome::RateLimited, Outcome::QuotaExhausted] {
            let this = attempt(outcome, Some("429"));
            assert_eq!(judge(&this, &[], None, false), Verdict::CoolDown);
        }
        // Only when the agent stopped by itself: one the supervisor stopped is not re-dispatched.
        let this = attempt(Outcome::RateLimited, Some("429"));
        let v = judge(&this, &[], Some(StopKind::Cancelled), false);
        assert_ne!(v, Verdict::CoolDown);
    }

    #[test]
    fn refused_credentials_mark_the_agent_without_using_a_retry() {
        let this = attempt(Outcome::Auth, Some("Not logged in · Please run /login"));
        // Even with every retry used up by earlier failures: the login is not the task's fault.
        let earlier = [
            attempt(Outcome::AgentError, None),
            attempt(Outcome::Timeout, None),
        ];
        assert_eq!(judge(&this, &earlier, None, false), Verdict::NeedsLogin);
        // Earlier auth attempts do not count as failures either.
        let earlier = [attempt(Outcome::Auth, None), attempt(Outcome::Auth, None)];
        let this = attempt(Outcome::AgentError, Some("exit 1"));
        assert_eq!(
            judge(&this, &earlier, None, false),
            Verdict::Retry {
                failures: 1,
                delay: Duration::from_secs(60),
            }
        );
        // A cancel or a shutdown decides, as for any attempt the supervisor stopped.
        let this = attempt(Outcome::Auth, Some("401"));
        assert_eq!(
            judge(&this, &[], Some(StopKind::Shutdown), false),
            Verdict::Interrupted
        );
    }

    /// The verdict on `this` after `earlier`, with `max_retries` 2 and `max_cost_usd`.
    fn judge_costly(
        this: &Attempt,
        earlier: &[Attempt],
        stopped: Option<StopKind>,
        max: f64,
    ) -> Verdict {
        let j = Judged {
            attempt: this,
            earlier,
            stopped,
            permanent: false,
            max_retries: 2,
            max_cost_usd: Some(max),
        };
        verdict(&j, &cfg())
    }

    fn costing(outcome: Outcome, cost: Option<f64>) -> Attempt {
        Attempt {
            cost_usd: cost,
            ..attempt(outcome, Some("exit 1"))
        }
    }

    #[test]
    fn a_task_that_spent_its_max_cost_is_not_retried() {
        // Under the cap: retried as usual.
        let this = costing(Outcome::AgentError, Some(0.40));
        assert!(matches!(
            judge_costly(&this, &[], None, 1.0),
            Verdict::Retry { failures: 1, .. }
        ));
        // Earlier attempts count too: 0.40 + 0.60 reaches 1.00, with retries left.
        let earlier = [costing(Outcome::Timeout, Some(0.60))];
        let v = judge_costly(&this, &earlier, None, 1.0);
        assert_eq!(
            v,
            failed(
                "budget_exhausted: spent $1.00 of max_cost_usd $1.00 in 2 attempt(s); last: exit 1"
            )
        );
        // Whatever would have re-run it: a rate limit, a failed check, a shutdown.
        for (outcome, stopped) in [
            (Outcome::RateLimited, None),
            (Outcome::CheckFailed, None),
            (Outcome::Interrupted, Some(StopKind::Shutdown)),
        ] {
            let this = costing(outcome, Some(2.0));
            assert!(
                matches!(judge_costly(&this, &[], stopped, 1.0),
                    Verdict::Done { status: Terminal::Failed, error: Some(e) } if e.starts_with("budget_exhausted: spent $2.00 of max_cost_usd $1.00")),
                "{outcome:?}"
            );
        }
        // A completed task completes, and a cancel is a cancel, whatever they cost.
        let done = costing(Outcome::Completed, Some(5.0));
        assert!(matches!(
            judge_costly(&done, &[], None, 1.0),
            Verdict::Done {
                status: Terminal::Completed,
                ..
            }
        ));
        let cancelled = costing(Outcome::Cancelled, Some(5.0));
        assert_eq!(
            judge_costly(&cancelled, &[], None, 1.0),
            failed("cancelled by user")
        );
        // The CLI stopped itself at its cap (a few cents under it, as the CLI measures): not retried.
        let capped = costing(Outcome::BudgetExhausted, Some(0.97));
        assert!(matches!(
            judge_costly(&capped, &[], None, 1.0),
            Verdict::Done { status: Terminal::Failed, error: Some(e) } if e.starts_with("budget_exhausted: spent $0.97 of max_cost_usd $1.00 in 1 attempt(s)")
        ));
        // A cap in the agent's own `args`: said so.
        let capped = costing(Outcome::BudgetExhausted, Some(0.5));
        assert_eq!(
            judge(&capped, &[], None, false),
            failed(
                "budget_exhausted: spent $0.50 of the agent's own cost cap in 1 attempt(s); last: exit 1"
            )
        );
        // Without a cap nothing changes: an attempt that cost a lot is retried.
        let this = costing(Outcome::AgentError, Some(100.0));
        assert!(matches!(
            judge(&this, &[], None, false),
            Verdict::Retry { .. }
        ));
    }

    #[test]
    fn a_failed_check_uses_a_retry_until_they_are_spent() {
        let this = attempt(
            Outcome::CheckFailed,
            Some(
                "the check `cargo test` exited with code 101 after 3.0 s; its output ends with:\nFAILED",
            ),
        );
        assert_eq!(
            judge(&this, &[], None, false),
            Verdict::Retry {
                failures: 1,
                delay: Duration::from_secs(60),
            }
        );
        let earlier = [
            attempt(Outcome::CheckFailed, None),
            attempt(Outcome::CheckFailed, None),
        ];
        assert!(matches!(
            judge(&this, &earlier, None, false),
            Verdict::Done { status: Terminal::Failed, error: Some(e) }
                if e.starts_with("the check `cargo test` exited with code 101")
                    && e.ends_with("(after 3 failed attempt(s); max_retries 2)")
        ));
    }

    #[test]
    fn a_stall_is_retried_like_a_timeout() {
        let this = attempt(
            Outcome::Stalled,
            Some("stalled: no progress for 600 s; last output: Reconnecting…"),
        );
        assert_eq!(
            judge(&this, &[], None, false),
            Verdict::Retry {
                failures: 1,
                delay: Duration::from_secs(60),
            }
        );
        let earlier = [
            attempt(Outcome::Stalled, None),
            attempt(Outcome::Timeout, None),
        ];
        assert_eq!(
            judge(&this, &earlier, None, false),
            failed(
                "stalled: no progress for 600 s; last output: Reconnecting… (after 3 failed attempt(s); max_retries 2)"
            )
        );
    }

    #[test]
    fn a_failure_with_retries_left_retries_after_a_doubling_back_off() {
        let this = attempt(Outcome::AgentError, Some("exit 1"));
        let first = Verdict::Retry {
            failures: 1,
            delay: Duration::from_secs(60),
        };
        assert_eq!(judge(&this, &[], None, false), first);
        // Rate limits and interruptions before it do not count as failures.
        let earlier = [
            attempt(Outcome::RateLimited, None),
            attempt(Outcome::Interrupted, None),
            attempt(Outcome::Timeout, None),
        ];
        let second = Verdict::Retry {
            failures: 2,
            delay: Duration::from_secs(120),
        };
        assert_eq!(judge(&this, &earlier, None, false), second);
    }

    #[test]
    fn the_last_allowed_failure_fails_the_task_and_says_so() {
        let earlier = [
            attempt(Outcome::AgentError, None),
            attempt(Outcome::Lost, None),
        ];
        let this = attempt(Outcome::Timeout, Some("timed out after 10 s"));
        assert_eq!(
            judge(&this, &earlier, None, false),
            failed("timed out after 10 s (after 3 failed attempt(s); max_retries 2)")
        );
        // Without an error text, the outcome names the failure.
        let this = attempt(Outcome::BadOutput, None);
        assert_eq!(
            judge(&this, &earlier, None, false),
            failed("bad_output (after 3 failed attempt(s); max_retries 2)")
        );
    }

    #[test]
    fn a_permanent_failure_fails_at_once_with_its_own_error() {
        let this = attempt(
            Outcome::AgentError,
            Some("workdir ./nope is not a directory"),
        );
        assert_eq!(
            judge(&this, &[], None, true),
            failed("workdir ./nope is not a directory")
        );
    }

    #[test]
    fn a_cancel_fails_the_task_at_once() {
        let this = attempt(Outcome::Cancelled, Some("cancelled by user"));
        assert_eq!(
            judge(&this, &[], Some(StopKind::Cancelled), false),
            failed("cancelled by user")
        );
        // Whatever else the attempt said, and with retries left.
        let this = attempt(Outcome::Cancelled, Some("something else"));
        assert_eq!(judge(&this, &[], None, false), failed("cancelled by user"));
    }
}
