//! The loop's vocabulary: the `Event`s its sources become, and the `Action`s its handlers hand back.
//!
//! Read this file first to know everything that can happen to a running supervisor and everything
//! one part of it may ask of another, with the messages the off-loop jobs send back (an attempt's
//! `Report`, a commit's `Committed`, a login check's `LoginChecked`). It holds no state and does
//! nothing: `mod.rs` makes the events and carries out the actions. It uses none of its sibling
//! files, so every part can use it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::task::{Id, JoinError};

use crate::mirror::postgres::queue::{Held, Lease, Outcome};
use crate::process::StopKind;
use crate::record::{Attempt, History, TaskResult};
use crate::router::Routed;
use crate::task::Task;
use crate::watch::Hint;

/// Something happened. The `select!` in `Supervisor::run` only turns its sources into these;
/// `Supervisor::handle` decides what each one means.
pub(super) enum Event {
    /// What the cluster queue said (cluster mode).
    Cluster(News),
    /// The watcher saw a file arrive whole in `pending/`: renamed in.
    Arrived(PathBuf),
    /// The watcher saw a writer close a file in `pending/`: it is read once no process holds it
    /// open for writing any more.
    Closed(PathBuf),
    /// The watcher saw a file in `pending/` appear or change: it must settle before it is read.
    Changed(PathBuf),
    /// The watcher overflowed or failed, or its periodic rescan is due: events are hints, the scan
    /// is the truth, so look at everything again.
    Rescan,
    /// The scan under way has more of its listing to read (one chunk per turn).
    ScanChunk,
    /// The settle ticker: files that kept still for the settle period can be read.
    SettleTick,
    /// An attempt's claim is durable and its file has left `pending/`, for this start of the task.
    Claimed { id: String, start: u64 },
    /// An attempt's task ended: its report, or the panic that ended it.
    AttemptEnded(Result<(Id, Report), JoinError>),
    /// A terminal commit is back from its blocking thread.
    Committed(Result<Committed, JoinError>),
    /// The router answered which agent fits a task.
    Routed { id: String, routed: Routed },
    /// An agent marked "needs login" had its CLI's login check run.
    LoginChecked {
        agent: String,
        checked: LoginChecked,
    },
    /// The earliest known retry back-off or cooldown has ended.
    WakeUp,
    /// The heartbeat ticker.
    Heartbeat,
    /// The state-files ticker, while `current_state.md` and `completed_tasks.json` are behind.
    StateTick,
    /// The configuration-file ticker: apply the file if it changed.
    ConfigCheck,
    /// The earliest held transition (one `tasks/` refused) is due to be tried again.
    RetryHeld,
    /// SIGUSR1: `orchestrate cancel` left a request.
    CancelRequested,
    /// SIGINT or SIGTERM.
    StopRequested,
}

impl From<Hint> for Event {
    fn from(h: Hint) -> Event {
        match h {
            Hint::Renamed(p) => Event::Arrived(p),
            Hint::Closed(p) => Event::Closed(p),
            Hint::Changed(p) => Event::Changed(p),
            Hint::Rescan => Event::Rescan,
        }
    }
}

/// What a handler leaves for others to do. Handlers never call each other: each changes only the
/// state it owns and returns these, and `Supervisor::apply` carries them out at once, in order,
/// each action's own follow-ups before the next action (the order the work had when the handlers
/// called each other directly).
#[must_use]
pub(super) enum Action {
    /// A task entered `pending/`, or its file changed there: whatever the router said about it no
    /// longer applies, and its retry back-off, if it has one, ends at `not_before`.
    Queued {
        id: String,
        not_before: Option<Instant>,
    },
    /// A task left `pending/` without starting (its file went, or was moved away).
    Left(String),
    /// A finished task is pending again (`orchestrate retry`, or its result removed by hand).
    Reopened(String),
    /// Look at a file in `pending/` that is whole (recovery put it back).
    Ingest(PathBuf),
    /// Read a file a requeue has just put back into `pending/`.
    Reread(PathBuf),
    /// A claimed file went back to `pending/`: it must settle before it is read again.
    Settle(PathBuf),
    /// Claim a pending task and run it on `agent`.
    Start {
        id: String,
        agent: String,
        because: String,
    },
    /// Finish a parent whose subtasks all completed, without an agent.
    CompleteParent(String),
    /// A fan-out's candidates settled it: stop the others, then pick and land the winner.
    Pick(String),
    /// Write the judge task of a `pick: judge` fan-out whose candidates all finished.
    Judge(String),
    /// Fail a pending task without running it.
    Fail { id: String, reason: String },
    /// The cancel request for a task has been carried out.
    CancelAnswered(String),
    /// Commit a terminal result off the loop.
    Commit(Box<Commit>),
    /// `tasks/` refused a transition (with the error): hold it and try again later.
    Defer(Box<Deferred>, String),
}

/// A terminal result to commit, and the task it ends.
pub(super) struct Commit {
    pub(super) task: Task,
    pub(super) result: TaskResult,
}

impl Action {
    pub(super) fn commit(task: &Task, result: TaskResult) -> Action {
        Action::Commit(Box::new(Commit {
            task: task.clone(),
            result,
        }))
    }
}

/// How claiming a task came out.
pub(super) enum Claimed {
    /// Ours: in `assigned/` with a durable claim record.
    Ours,
    /// Another supervisor sharing the tree took it first (or the file is gone).
    Lost,
    /// The file is not what was parsed (a writer is still at it): it goes back to settle.
    Changed,
    /// The supervisor began to stop before the agent started: the task goes back untouched.
    Stopping,
    Failed(String),
}

/// What an attempt task reports back.
pub(super) struct Report {
    pub(super) id: String,
    pub(super) attempt: Attempt,
    pub(super) text_file: Option<PathBuf>,
    pub(super) diff_file: Option<PathBuf>,
    /// Every file the attempt changed (the result lists the first `record::FILES_IN_RECORD`).
    pub(super) files_modified: Vec<String>,
    /// The file listing them all, when there are more than a result lists.
    pub(super) files_file: Option<PathBuf>,
    /// A worktree attempt's git facts (base, branch, head, how it landed).
    pub(super) workspace: Option<crate::record::WorkspaceResult>,
    /// The task itself is at fault (bad workdir, missing context file): retrying cannot help.
    pub(super) permanent: bool,
    pub(super) stopped: Option<StopKind>,
    /// For rate limits: when the provider said to come back.
    pub(super) retry_after: Option<Duration>,
    /// Set when the claim did not give us the task: nothing ran.
    pub(super) unclaimed: Option<Claimed>,
    /// The environment kept the agent from starting (a full or read-only `context/`): not the
    /// task's fault, so no attempt is counted and the task waits.
    pub(super) environment: Option<String>,
    /// A cluster lease's attempt: what goes back to the task's origin.
    pub(super) cluster: Option<LeasedResult>,
}

/// What a leased attempt gathered for its origin (its files are gone from this host's tree).
#[derive(Default)]
pub(super) struct LeasedResult {
    pub(super) output: String,
    pub(super) log_tail: String,
    /// The change against the task's base commit, as `git apply` takes it.
    pub(super) patch: String,
}

impl Report {
    /// An attempt that got nowhere beyond `attempt` says.
    pub(super) fn new(id: &str, attempt: Attempt) -> Report {
        Report {
            id: id.to_string(),
            attempt,
            text_file: None,
            diff_file: None,
            files_modified: vec![],
            files_file: None,
            workspace: None,
            permanent: false,
            stopped: None,
            retry_after: None,
            unclaimed: None,
            environment: None,
            cluster: None,
        }
    }
}

/// What an agent's login check found: the command that ran and how it ended.
pub(super) struct LoginChecked {
    pub(super) command: String,
    pub(super) checked: crate::process::Checked,
}

/// A terminal commit, done: the task, its result, and whether the spool took it.
pub(super) struct Committed {
    pub(super) task: Task,
    pub(super) result: TaskResult,
    pub(super) outcome: Result<(), String>,
}

/// A transition `tasks/` refused, to be tried again.
pub(super) enum Deferred {
    /// A terminal result (the agent's outcome is known: it must never run again for it).
    Finish { task: Task, result: TaskResult },
    /// Back to `pending/` with this history.
    Requeue {
        task: Task,
        history: History,
        why: String,
    },
    /// A just-claimed file back to `pending/` under its name (`settle`: read it again after).
    Unclaim {
        id: String,
        path: PathBuf,
        settle: bool,
    },
}

impl Deferred {
    pub(super) fn id(&self) -> &str {
        match self {
            Deferred::Finish { task, .. } | Deferred::Requeue { task, .. } => &task.id,
            Deferred::Unclaim { id, .. } => id,
        }
    }
}

/// A lease with the attempts its task made before it (read from the earlier results), so the
/// prompt and the verdict see them as after a retry on one host.
pub(in crate::supervisor) struct Leased {
    pub(in crate::supervisor) lease: Lease,
    pub(in crate::supervisor) earlier: Vec<Attempt>,
}

/// Why a lease is no longer this host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::supervisor) enum LostWhy {
    /// The queue refused the renewal: another host holds the task now, or it ended.
    Fenced,
    /// No renewal was answered before the lease would run out (the database out of reach, or this
    /// host paused): given up before another host may take the task, so it never runs twice.
    Unrenewed,
}

/// What the queue said, for the loop.
pub(in crate::supervisor) enum News {
    /// The database did not answer: published again at a later pass.
    PublishFailed(String),
    Published {
        id: String,
        /// Why it was refused: another task has the id (the file goes to quarantine).
        clash: Option<String>,
    },
    Claimed(Vec<Leased>),
    /// A claim went wrong (the database out of reach): try again at the next poll.
    ClaimFailed,
    /// An attempt's finish was stored; `Fenced`: as a stale attempt, not the outcome.
    Finished {
        id: String,
        held: Held,
    },
    /// These leases are no longer this host's: stop their agents, never land their work.
    Lost {
        leases: Vec<(String, i64)>,
        why: LostWhy,
    },
    /// Outcomes of tasks this host published, to materialise.
    Outcomes(Vec<(Outcome, Vec<Attempt>)>),
    /// Something may be claimable now.
    Wake,
}
