//! Reports, results and commits.

use super::*;

/// A terminal commit, done: the task, its result, and whether the spool took it.
pub(super) struct Committed {
    pub(super) task: Task,
    pub(super) result: TaskResult,
    pub(super) outcome: Result<(), String>,
}

impl Supervisor {
    /// This claim's record is in `assigned/`: the claim got at least that far.
    pub(super) fn claim_on_disk(&self, claim: &Claim) -> bool {
        self.spool
            .read_claim(&claim.task_id)
            .is_some_and(|c| c.instance == claim.instance && c.version == claim.version)
    }

    /// The claim of `task` from `path` did not give us the task (see [`Claimed`]); nothing ran.
    pub(super) fn on_unclaimed(
        &mut self,
        task: &Task,
        claim: &Claim,
        path: &Path,
        cancelling: bool,
        how: Claimed,
    ) {
        let id = task.id.clone();
        self.claiming.remove(path);
        match how {
            Claimed::Ours => {}
            Claimed::Lost => {
                console::debug(&format!("lost race  {id}: claimed by another supervisor"));
            }
            Claimed::Failed(e) => {
                console::error(&format!("claim of {id} failed: {e}"));
                // Failed after the rename (the fsync, say): the file is in `assigned/` under our
                // live claim, where nothing would look at it again until we stop. Put it back.
                if self.claim_on_disk(claim) {
                    match self.spool.unclaim(&id, path) {
                        Ok(()) => self.start_settling(path, (0, 0, 0)),
                        Err(e) => console::error(&format!("cannot return {id} to pending: {e:#}")),
                    }
                }
            }
            Claimed::Stopping if cancelling => {
                // `orchestrate cancel` saw the claim record before the agent started: the task ends
                // cancelled, with no attempt, instead of going back to pending.
                self.spool.drop_history(&id);
                let result = TaskResult::failed(
                    &id,
                    claim.version + 1,
                    &task.file.description,
                    claim.history.clone(),
                    "cancelled by user".into(),
                );
                self.commit_terminal(task, result);
            }
            Claimed::Changed | Claimed::Stopping => {
                if let Err(e) = self.spool.unclaim(&id, path) {
                    console::error(&format!("cannot return {id} to pending: {e:#}"));
                    return;
                }
                if matches!(how, Claimed::Changed) {
                    console::info(&format!(
                        "changed    {id}: file changed while being claimed; back to pending to settle"
                    ));
                    self.start_settling(path, (0, 0, 0));
                }
            }
        }
    }

    pub(super) fn on_report(&mut self, r: Report) {
        let Some(run) = self.running.remove(&r.id) else {
            return;
        };
        if let Some(n) = self.per_agent.get_mut(&run.claim.agent) {
            *n = n.saturating_sub(1);
        }
        self.state_dirty = true;
        if let Some(how) = r.unclaimed {
            self.on_unclaimed(&run.task, &run.claim, &run.path, run.cancelling, how);
            return;
        }
        // Normally gone already (the claim's message came first); a crashed attempt never sent it.
        self.claiming.remove(&run.path);
        let mut attempts = run.claim.history.clone();
        attempts.push(r.attempt.clone());
        let outcome = r.attempt.outcome;
        let rel = |p: &Option<PathBuf>| p.as_ref().map(|p| self.layout.rel(p));
        if r.stopped == Some(StopKind::Shutdown) && outcome != Outcome::Completed {
            let history = History {
                task_id: r.id.clone(),
                version: run.claim.version + 1,
                attempts,
                not_before: None,
                reason: Some("interrupted by a supervisor shutdown".into()),
            };
            self.requeue(&run.task, history, "interrupted by shutdown");
            return;
        }
        let agent = run.claim.agent.clone();
        if matches!(outcome, Outcome::RateLimited | Outcome::QuotaExhausted) && r.stopped.is_none()
        {
            // Not the task's fault and not a failed attempt: the agent rests, and the task goes back
            // to pending at once, where the scheduler hands it to the next agent in its chain.
            let base = self.cfg.agents[&agent]
                .cooldown_seconds
                .map(Duration::from_secs);
            let error = r
                .attempt
                .error
                .clone()
                .unwrap_or_else(|| outcome.as_str().into());
            let until = self
                .cooldowns
                .rate_limited(&agent, outcome, r.retry_after, base, &error);
            let until = fsutil::fmt_time(until);
            console::warn(&format!(
                "cooldown   {agent} until {until}: {} ({error})",
                outcome.as_str()
            ));
            self.full_pass_due = true;
            let history = History {
                task_id: r.id.clone(),
                version: run.claim.version + 1,
                attempts,
                not_before: None,
                reason: Some(format!(
                    "{} on {agent}; cooling down until {until}",
                    outcome.as_str()
                )),
            };
            self.requeue(
                &run.task,
                history,
                &format!("{} on {agent}: re-dispatched", outcome.as_str()),
            );
            return;
        }
        if outcome == Outcome::Completed {
            self.cooldowns.succeeded(&agent);
        }
        let failures = attempts
            .iter()
            .filter(|a| a.outcome.counts_as_failure())
            .count() as u32;
        let max_retries = self.max_retries_of(&run.task);
        let retryable = outcome != Outcome::Completed
            && outcome != Outcome::Cancelled
            && !r.permanent
            && failures <= max_retries;
        if retryable {
            let delay = scheduler::retry_delay(&self.cfg, failures);
            let at = time::OffsetDateTime::now_utc() + delay;
            let history = History {
                task_id: r.id.clone(),
                version: run.claim.version + 1,
                attempts,
                not_before: Some(fsutil::fmt_time(at)),
                reason: r.attempt.error.clone(),
            };
            let why = format!(
                "{}: {}; retry {failures} of {max_retries} in {:.0} s",
                outcome.as_str(),
                r.attempt.error.as_deref().unwrap_or("-"),
                delay.as_secs_f64()
            );
            self.requeue(&run.task, history, &why);
            return;
        }
        let review = context::review_matches(&self.cfg, &r.files_modified);
        let status = if outcome == Outcome::Completed {
            Terminal::Completed
        } else {
            Terminal::Failed
        };
        let result = TaskResult {
            task_id: r.id.clone(),
            status,
            version: run.claim.version + 1,
            agent: Some(run.claim.agent.clone()),
            description: run.task.file.description.clone(),
            finished_at: r
                .attempt
                .finished_at
                .clone()
                .unwrap_or_else(fsutil::now_rfc3339),
            attempts,
            output_file: rel(&r.text_file),
            diff_file: rel(&r.diff_file),
            files_modified: r.files_modified.clone(),
            review_required: !review.is_empty(),
            review_files: review,
            error: match outcome {
                Outcome::Completed => None,
                Outcome::Cancelled => Some("cancelled by user".into()),
                _ if r.permanent => r.attempt.error.clone(),
                _ => Some(format!(
                    "{} (after {failures} failed attempt(s); max_retries {max_retries})",
                    r.attempt.error.as_deref().unwrap_or(outcome.as_str())
                )),
            },
            chosen_because: run.claim.chosen_because.clone(),
        };
        self.commit_terminal(&run.task, result);
    }

    /// An attempt task panicked (a bug in orchestrate, not the agent's fault): record it as a failed
    /// attempt so the task retries or fails like any other, and its slot is released.
    pub(super) fn on_attempt_crash(&mut self, e: tokio::task::JoinError) {
        let Some(id) = self.attempt_ids.remove(&e.id()) else {
            console::error(&format!("attempt task failed: {e}"));
            return;
        };
        console::error(&format!("attempt of {id} crashed: {e}"));
        let Some(run) = self.running.get(&id) else {
            return;
        };
        // Crashed before the claim was done: nothing ran, and the spool put the file back unless the
        // claim record was written (then `on_unclaimed` does). The "claimed" message may simply not be
        // handled yet, so the claim record decides.
        let unclaimed = (!run.claimed && !self.claim_on_disk(&run.claim))
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
        self.on_report(Report {
            unclaimed,
            ..Report::new(&id, attempt)
        });
    }

    /// Hand the result to a blocking thread that commits it; `on_committed` takes it from there.
    pub(super) fn commit_terminal(&mut self, task: &Task, result: TaskResult) {
        let id = result.task_id.clone();
        let spool = self.spool.clone();
        let task = task.clone();
        let handle = self.commits.spawn_blocking(move || {
            let outcome = spool.finish(&result).map_err(|e| format!("{e:#}"));
            Committed {
                task,
                result,
                outcome,
            }
        });
        self.finishing.insert(id, handle.id());
    }

    pub(super) fn on_committed(&mut self, done: Result<Committed, tokio::task::JoinError>) {
        let Committed {
            task,
            result,
            outcome,
        } = match done {
            Ok(c) => c,
            Err(e) => {
                // A bug of ours: the claim stays, and recovery at the next start settles the task.
                self.finishing.retain(|id, h| {
                    let it = *h == e.id();
                    if it {
                        console::error(&format!("commit of {id} crashed: {e}"));
                    }
                    !it
                });
                return;
            }
        };
        let task = &task;
        let id = result.task_id.clone();
        self.finishing.remove(&id);
        if let Err(e) = outcome {
            // The claim stays; recovery at the next start finishes the move from the result file.
            console::error(&format!("cannot finish {id}: {e}"));
            return;
        }
        // A cancel request, if any, is answered now that the task is terminal on disk.
        self.spool.drop_cancel_request(&id);
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
                if result.files_modified.is_empty() {
                    String::new()
                } else {
                    format!(", changed {}", result.files_modified.len())
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
        self.writer.send(Op::Upsert {
            row: mirror::terminal_row(&self.spool, &result, Some(task)),
            attempts: result.attempts.clone(),
        });
        if result.status == Terminal::Completed {
            self.completed.push(CompletedEntry {
                id: id.clone(),
                description: result.description.clone(),
                agent: result.agent.clone(),
                finished_at: result.finished_at.clone(),
                output_file: result.output_file.clone(),
                diff_file: result.diff_file.clone(),
                files_modified: result.files_modified.clone(),
            });
        }
        self.done.insert(id, result.status);
        self.state_dirty = true;
    }

    pub(super) fn requeue(&mut self, task: &Task, history: History, why: &str) {
        let id = task.id.clone();
        if let Err(e) = self.spool.requeue(&history) {
            console::error(&format!("cannot requeue {id}: {e:#}"));
            return;
        }
        console::info(&format!("requeued   {id}: {why}"));
        let path = self.spool.task_path(Place::Pending, &id);
        let sig = std::fs::metadata(&path)
            .map(|m| sig_of(&m))
            .unwrap_or_default();
        self.ingest_ready(&path, &format!("{id}.yaml"), sig);
    }
}
