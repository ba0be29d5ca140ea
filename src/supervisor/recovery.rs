//! Keeping the tree honest around the loop: start-up (recovering the claims of supervisors that
//! died, bringing the mirror in line, loading what has finished), the heartbeat's phases, cancel
//! requests, and the state files people read (`current_state.md`, `completed_tasks.json`).
//!
//! Owns no task state of its own: it reads and changes the parts through their methods, and what
//! must follow (a recovered task to read, a pending task to fail) comes back as `Action`s. It never
//! robs a live owner's claim: that judgement is the spool's.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use super::Supervisor;
use super::events::Action;
use crate::console;
use crate::context::{self, CompletedEntry, FailedEntry, StateView};
use crate::mirror::{self, Op};
use crate::record::Terminal;
use crate::spool::{Place, Recovered};
use crate::task;

impl Supervisor {
    /// Recover dead claims, bring the mirror in line, load what is already finished.
    pub(super) fn startup(&mut self) -> Result<()> {
        let recovered = self.recover();
        self.apply(recovered);
        // Claims of dead supervisors are settled: a worktree no live claim names is an orphan,
        // unless its task waits in pending/ to resume in it.
        let env = &self.env;
        super::workspace::sweep(&env.cfg, &env.layout, &env.spool, &env.me.id);
        // Marks an earlier run left hold until what the login depends on changes: say which hold.
        self.dispatch.check_logins(&self.env);
        for (agent, m) in self.dispatch.marked_logins() {
            console::warn(&format!(
                "login      {agent} needs login since {}: {} ({})",
                m.since, m.reason, m.hint
            ));
        }
        let env = &self.env;
        if let Err(e) = env.spool.repair_rejected() {
            console::warn(&format!(
                "cannot check failed/ for lost explanations: {e:#}"
            ));
        }
        let report = env
            .writer
            // pending/ is read by the start-up scan right after, which mirrors what it finds.
            .reconcile(&env.spool, env.cfg.orchestrator.max_task_bytes, true)
            .map_err(|e| anyhow::anyhow!("mirror reconcile failed: {e}"))?;
        console::debug(&format!(
            "mirror reconciled: {} rows updated, {} removed",
            report.upserted, report.deleted
        ));
        let conn = mirror::sqlite::open(&env.layout.state_db())?;
        // The mirror now holds the records' attempts: what this month cost so far.
        self.dispatch.spending.load(env, &conn);
        let completed = mirror::sqlite::list(&conn, Some("completed"))?
            .into_iter()
            .map(|row| {
                let (mut output_file, mut diff_file) =
                    (row.payload.output_file, row.payload.diff_file);
                // Rows mirrored before the mirror kept these: the result file has them.
                if output_file.is_none()
                    && diff_file.is_none()
                    && let Some(r) = env.spool.read_result(Terminal::Completed, &row.id)
                {
                    (output_file, diff_file) = (r.output_file, r.diff_file);
                }
                CompletedEntry {
                    id: row.id,
                    description: row.payload.description,
                    agent: row.agent,
                    finished_at: row.payload.finished_at.unwrap_or(row.updated_at),
                    output_file,
                    diff_file,
                    files_modified: row.payload.files_modified,
                    files_modified_total: row.payload.files_modified_total,
                    files_modified_file: row.payload.files_modified_file,
                }
            })
            .collect();
        self.ledger.load_completed(completed);
        // Rows of supervisors on this host that died without saying so (SIGKILL, power cut).
        for row in mirror::sqlite::supervisors(&conn)? {
            let lock = env.layout.instance_lock(&row.instance);
            if row.host == env.me.host && !crate::instance::instance_lock_held(&lock) {
                env.writer.send(Op::Supervisor {
                    instance: row.instance,
                    pid: row.pid,
                    started_at: row.started_at,
                    heartbeat_at: row.heartbeat_at,
                    alive: false,
                });
            }
        }
        let failed = mirror::sqlite::list(&conn, Some("failed"))?
            .into_iter()
            .map(|row| FailedEntry {
                finished_at: row.payload.finished_at.unwrap_or(row.updated_at),
                error: row.payload.error.unwrap_or_default(),
                agent: row.agent,
                id: row.id,
            })
            .collect();
        self.ledger.load_failed(failed);
        env.announce(true);
        Ok(())
    }

    /// Claims whose supervisor died are settled by the spool: finished ones are recorded here, and
    /// requeued ones come back for intake to read.
    #[must_use = "the actions are the rest of the work: apply them"]
    pub(super) fn recover(&mut self) -> Vec<Action> {
        let env = &self.env;
        let default = env.cfg.task_queue.max_retries;
        let max = move |p: &Path| {
            task::read_task(p, u64::MAX)
                .ok()
                .and_then(|(t, _)| t.file.max_retries)
                .unwrap_or(default)
        };
        let list = match env.spool.recover(&env.me, &max) {
            Ok(list) => list,
            Err(e) => {
                console::warn(&format!("recovery failed: {e:#}"));
                return vec![];
            }
        };
        let mut out = vec![];
        for r in list {
            match r {
                Recovered::Requeued(id) => {
                    console::info(&format!(
                        "recovered  {id}: its supervisor stopped mid-run; back to pending"
                    ));
                    out.push(Action::Ingest(env.spool.task_path(Place::Pending, &id)));
                }
                Recovered::Finished(id, t) => {
                    console::info(&format!(
                        "recovered  {id}: finished before its supervisor stopped → {}",
                        t.dir_name()
                    ));
                    if let Some(r) = env.spool.read_result(t, &id) {
                        env.writer.send(Op::Upsert {
                            row: mirror::terminal_row(&env.spool, &r, None),
                            attempts: r.attempts.clone(),
                        });
                    }
                    self.ledger.record(id, t);
                }
            }
        }
        out
    }

    /// The heartbeat, in its phases.
    pub(super) fn on_heartbeat(&mut self) {
        self.refresh_claims();
        self.env.announce(true);
        // Agents that need a login: marks cleared elsewhere, changed credentials, checks due.
        self.dispatch.check_logins(&self.env);
        // Answers for tasks that left pending without starting (failed, cancelled, deleted): a
        // task re-created under the same id is asked afresh.
        self.dispatch.forget_answers_not_in(&self.intake.queue);
        // Refresh every waiting task's note now and then, even while all slots are busy.
        self.dispatch.want_full_pass();
        // A cancel whose SIGUSR1 came before our handler existed is still seen.
        let cancels = self.check_cancels();
        self.apply(cancels);
        self.tidy_worktrees();
    }

    /// Idle worktrees past their time and worktrees nothing will use go, on a blocking thread
    /// (git calls), one tidy at a time.
    fn tidy_worktrees(&self) {
        let env = &self.env;
        let Some(turn) = env.pool.tidy_turn() else {
            return;
        };
        let (cfg, layout, spool, me, pool) = (
            env.cfg.clone(),
            env.layout.clone(),
            env.spool.clone(),
            env.me.id.clone(),
            env.pool.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            pool.trim(Duration::from_secs(cfg.workspace.pool_idle_seconds));
            super::workspace::sweep(&cfg, &layout, &spool, &me);
        });
    }

    /// Our claim records say we are alive (`heartbeat_at`).
    fn refresh_claims(&self) {
        for r in self.runs.all().filter(|r| r.claimed) {
            if let Err(e) = self.env.spool.heartbeat(&r.claim) {
                console::warn(&format!("heartbeat for {} failed: {e:#}", r.claim.task_id));
            }
        }
        // Tasks whose finish `tasks/` refused are still ours. Quietly: their trouble is said already,
        // and the heartbeat most likely fails for the same reason.
        for (id, _) in self.commits.held() {
            if let Some(claim) = self.env.spool.read_claim(id) {
                let _ = self.env.spool.heartbeat(&claim);
            }
        }
    }

    /// `orchestrate cancel` leaves `state_dir/cancel/<id>` and sends SIGUSR1. The request stays
    /// until the task is in `failed/`: a supervisor that dies before then finds it again at its next
    /// start, when recovery has put the task back in `pending/`, and cancels it there.
    #[must_use = "the actions are the rest of the work: apply them"]
    pub(super) fn check_cancels(&mut self) -> Vec<Action> {
        let mut out = vec![];
        for id in self.env.spool.cancel_requests() {
            if let Some(newly) = self.runs.cancel(&id) {
                if newly {
                    console::info(&format!("cancelling {id}"));
                }
            } else if self.intake.queue.contains(&id) {
                out.push(Action::Fail {
                    id: id.clone(),
                    reason: "cancelled by user".into(),
                });
                out.push(Action::CancelAnswered(id));
            } else if !self.commits.contains(&id)
                && matches!(
                    self.env.spool.settled_place(&id),
                    Some(Place::Completed | Place::Failed)
                )
            {
                // Finished, cancelled or not: nothing left to cancel.
                self.env.spool.drop_cancel_request(&id);
            }
        }
        out
    }

    pub(super) fn write_state_files(&mut self) {
        self.state_dirty = false;
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        counts.insert("pending", self.intake.queue.len());
        // A finishing task is still running as far as anyone reading the tree can tell.
        counts.insert("running", self.runs.len() + self.commits.len());
        let (c, f) = self.ledger.counts();
        counts.insert("completed", c);
        counts.insert("failed", f);
        let running: Vec<(String, String, String)> = self
            .runs
            .all()
            .map(|r| {
                (
                    r.claim.task_id.clone(),
                    r.claim.agent.clone(),
                    r.claim.started_at.clone(),
                )
            })
            .collect();
        // The page lists the first few waiting tasks by id; with a backlog of 100,000 only those
        // few are formatted, every quarter second while things change.
        let mut all: Vec<(&str, &crate::scheduler::WaitReason)> =
            self.intake.queue.waiting().collect();
        let waiting_total = all.len();
        if all.len() > context::WAITING_SHOWN {
            all.select_nth_unstable_by_key(context::WAITING_SHOWN - 1, |(id, _)| *id);
            all.truncate(context::WAITING_SHOWN);
        }
        all.sort_unstable_by_key(|(id, _)| *id);
        let waiting: Vec<(String, String)> = all
            .into_iter()
            .map(|(id, why)| (id.to_string(), why.to_string()))
            .collect();
        let failed: Vec<&FailedEntry> = self.ledger.recent_failures().collect();
        let mut being_written: Vec<(String, String)> = self
            .intake
            .held()
            .filter(|(_, h)| h.since.elapsed() >= super::intake::OPEN_NOTE_AFTER)
            .map(|(p, h)| {
                let secs = h.since.elapsed().as_secs();
                (
                    self.env.layout.rel(p),
                    format!(
                        "still open for writing by {} ({}); read once its writer closes it",
                        h.writer,
                        crate::fsutil::duration_text(secs)
                    ),
                )
            })
            .collect();
        being_written.sort();
        let view = StateView {
            counts: &counts,
            running: &running,
            waiting: &waiting,
            waiting_total,
            failed: &failed,
            being_written: &being_written,
        };
        let layout = &self.env.layout;
        if let Err(e) =
            context::write_state_files(layout, self.ledger.completed(), &view, &self.env.redactor)
        {
            console::warn(&format!("cannot write context state files: {e:#}"));
        }
    }
}
