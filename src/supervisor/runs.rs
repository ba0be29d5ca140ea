//! The attempts in flight, as the loop sees them: which task each one runs, on which agent, under
//! which claim, and the handle that stops it.
//!
//! Owns the `Running` records, the count per agent and the attempts' join set. It never claims,
//! runs, stops on its own or finishes anything: `dispatch` launches attempts through it, `attempt`
//! runs them off the loop, `finish` takes their reports, and cancels and shutdowns reach the agents
//! through its stop handles.

use std::collections::HashMap;
use std::path::PathBuf;

use tokio::sync::{mpsc, watch};
use tokio::task::{Id, JoinError, JoinSet};

use super::Env;
use super::attempt::{AttemptCtx, ClaimJob, run_attempt};
use super::events::Report;
use crate::mirror;
use crate::process::Stop;
use crate::record::Claim;
use crate::scheduler::Pending;
use crate::task::Task;

pub(super) struct Running {
    pub(super) task: Task,
    pub(super) claim: Claim,
    stop: watch::Sender<Option<Stop>>,
    /// A cancel was requested: a later shutdown must not turn it into a requeue.
    pub(super) cancelling: bool,
    /// Why, when orchestrate itself cancelled it (another fan-out candidate won); `None` for
    /// `orchestrate cancel`.
    pub(super) cancel_reason: Option<String>,
    /// Where the task file was in `pending/` before the claim.
    pub(super) path: PathBuf,
    /// Which start of the supervisor's this is (see `Runs::claimed_tx`).
    start: u64,
    /// The claim is done and the task file is ours (the claim runs in the attempt's task, off the
    /// loop); until then there is no claim record to refresh.
    pub(super) claimed: bool,
    /// The workdir this attempt runs in directly (no worktree): no other task may run there meanwhile.
    pub(super) exclusive: Option<PathBuf>,
}

pub(super) struct Runs {
    running: HashMap<String, Running>,
    per_agent: HashMap<String, usize>,
    tasks: JoinSet<Report>,
    /// Which task each attempt runs, so a panicked attempt still releases its task.
    ids: HashMap<Id, String>,
    /// "Claimed" news from attempts, by task and start: a message from an earlier start of the
    /// same task (its report was handled first and the task started again) must not count.
    claimed_tx: mpsc::UnboundedSender<(String, u64)>,
    starts: u64,
}

/// How an attempt's task ended: its report, or the panic that ended it.
pub(super) type Ended = Result<(Id, Report), JoinError>;

impl Runs {
    /// The attempts' "claimed" news arrives on the receiver.
    pub(super) fn new() -> (Runs, mpsc::UnboundedReceiver<(String, u64)>) {
        let (claimed_tx, claimed_rx) = mpsc::unbounded_channel();
        let runs = Runs {
            running: HashMap::new(),
            per_agent: HashMap::new(),
            tasks: JoinSet::new(),
            ids: HashMap::new(),
            claimed_tx,
            starts: 0,
        };
        (runs, claimed_rx)
    }

    pub(super) fn len(&self) -> usize {
        self.running.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    pub(super) fn contains(&self, id: &str) -> bool {
        self.running.contains_key(id)
    }

    pub(super) fn get(&self, id: &str) -> Option<&Running> {
        self.running.get(id)
    }

    pub(super) fn all(&self) -> impl Iterator<Item = &Running> {
        self.running.values()
    }

    /// The running task that holds `dir` for itself, if one does.
    pub(super) fn holder_of(&self, dir: &std::path::Path) -> Option<&str> {
        self.running
            .values()
            .find(|r| r.exclusive.as_deref() == Some(dir))
            .map(|r| r.task.id.as_str())
    }

    pub(super) fn per_agent(&self) -> &HashMap<String, usize> {
        &self.per_agent
    }

    /// Start an attempt of `p` under `claim`: its own task claims the file (the rename, the claim
    /// record and their fsyncs run there, beside other claims and commits), then runs the agent.
    pub(super) fn launch(
        &mut self,
        env: &Env,
        p: Pending,
        claim: Claim,
        because: &str,
        leased_base: Option<String>,
    ) {
        let id = p.task.id.clone();
        let (stop_tx, stop_rx) = watch::channel(None);
        *self.per_agent.entry(claim.agent.clone()).or_default() += 1;
        let ctx = AttemptCtx {
            cfg: env.cfg.clone(),
            layout: env.layout.clone(),
            redactor: env.redactor.clone(),
            pool: env.pool.clone(),
        };
        self.starts += 1;
        let job = ClaimJob {
            start: self.starts,
            spool: env.spool.clone(),
            src: p.path.clone(),
            hash: p.hash,
            writer: env.writer.clone(),
            row: mirror::running_row(&env.spool, &p.task, &claim),
            because: because.to_string(),
            claimed: self.claimed_tx.clone(),
            leased_base,
        };
        let exclusive =
            super::workspace::exclusive_workdir(&env.cfg, &env.layout, &p.task, &claim.agent);
        let task = p.task.clone();
        let c = claim.clone();
        let handle = self
            .tasks
            .spawn(async move { run_attempt(ctx, job, task, c, stop_rx).await });
        self.ids.insert(handle.id(), id.clone());
        self.running.insert(
            id,
            Running {
                task: p.task,
                claim,
                stop: stop_tx,
                cancelling: false,
                cancel_reason: None,
                path: p.path,
                start: self.starts,
                claimed: false,
                exclusive,
            },
        );
    }

    /// Some attempt's task has not been joined yet.
    pub(super) fn has_tasks(&self) -> bool {
        !self.tasks.is_empty()
    }

    pub(super) async fn join_next(&mut self) -> Option<Ended> {
        self.tasks.join_next_with_id().await
    }

    pub(super) fn try_join_next(&mut self) -> Option<Ended> {
        self.tasks.try_join_next_with_id()
    }

    /// The attempt task `tid` ended; returns the task it ran.
    pub(super) fn joined(&mut self, tid: Id) -> Option<String> {
        self.ids.remove(&tid)
    }

    /// The claim of this start of `id` is durable; returns the `pending/` path it came from.
    pub(super) fn claimed(&mut self, id: &str, start: u64) -> Option<PathBuf> {
        let r = self.running.get_mut(id).filter(|r| r.start == start)?;
        r.claimed = true;
        Some(r.path.clone())
    }

    /// The attempt of `id` is over: its slot is free.
    pub(super) fn end(&mut self, id: &str) -> Option<Running> {
        let run = self.running.remove(id)?;
        if let Some(n) = self.per_agent.get_mut(&run.claim.agent) {
            *n = n.saturating_sub(1);
        }
        Some(run)
    }

    /// Ask `id`'s agent to stop for a cancel. `None`: it is not running; `Some(false)`: it was
    /// asked already.
    pub(super) fn cancel(&mut self, id: &str) -> Option<bool> {
        let r = self.running.get_mut(id)?;
        if r.cancelling {
            return Some(false);
        }
        r.cancelling = true;
        let _ = r.stop.send(Some(Stop::Cancel));
        Some(true)
    }

    /// Stop `id`'s agent because `reason` (orchestrate's own cancel: a fan-out decided without
    /// it). `None`: it is not running.
    pub(super) fn cancel_because(&mut self, id: &str, reason: &str) -> Option<bool> {
        let newly = self.cancel(id)?;
        if newly && let Some(r) = self.running.get_mut(id) {
            r.cancel_reason = Some(reason.to_string());
        }
        Some(newly)
    }

    /// Stop `id`'s agent at once (SIGKILL, no grace) because `reason`: its work can never count
    /// (a cluster lease this host no longer holds), and another host may start it soon. `None`:
    /// it is not running.
    pub(super) fn kill_because(&mut self, id: &str, reason: &str) -> Option<()> {
        let r = self.running.get_mut(id)?;
        if !r.cancelling {
            r.cancelling = true;
            r.cancel_reason = Some(reason.to_string());
        }
        let _ = r.stop.send(Some(Stop::KillNow));
        Some(())
    }

    /// A graceful stop: every agent not being cancelled gets SIGTERM, then SIGKILL after the grace
    /// period; their tasks go back to `pending/`.
    pub(super) fn shut_down(&self) {
        for r in self.running.values().filter(|r| !r.cancelling) {
            let _ = r.stop.send(Some(Stop::Shutdown));
        }
    }

    /// A second signal: every agent is killed now.
    pub(super) fn kill_all(&self) {
        for r in self.running.values() {
            let _ = r.stop.send(Some(Stop::KillNow));
        }
    }
}
