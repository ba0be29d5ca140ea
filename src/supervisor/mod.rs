//! The supervisor: the loop that turns files into runs and runs into files.
//!
//! # Theory of operation
//!
//! One tokio task owns all state. It reacts to: watcher hints (a file in `pending/` may be ready),
//! finished attempts and commits, the settle ticker (files seen only by scans or modify events must
//! stay unchanged for `settle_ms`), retry back-off timers, the heartbeat/rescan ticker, and signals.
//! After each reaction it asks the scheduler which pending tasks can run, and starts them.
//!
//! Claims and terminal commits do not wait on the loop (requeues for retries, heartbeats and the
//! rare paths still do). An attempt runs as its own tokio task: on a blocking
//! thread it claims the task through the spool (the rename, the claim record, their fsyncs), tells the
//! loop and the mirror, assembles the prompt and snapshots the workdir; then it runs the agent through
//! `process`, diffs the workdir and writes the output, and reports back. The loop decides what the
//! outcome means (retry, cooldown, done) and hands a terminal result to another blocking thread that
//! commits it (result file, rename, fsyncs). Several claims and commits are on the disk at once, and
//! their directory fsyncs are shared (`fsutil::fsync_dir`). Each task has at most one such job at a
//! time, and the loop holds it as running or finishing until the job is back, so its transitions stay
//! in order. Each transition is mirrored after the file moved and is durable: the mirror may lag the
//! tree, never lead it.
//!
//! Shutdown (SIGINT/SIGTERM): stop claiming, SIGTERM every running agent group, wait for the grace
//! period, SIGKILL; interrupted tasks go back to `pending/` without using up a retry. A second signal
//! kills at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::agents::{self, RunRequest};
use crate::config::Config;
use crate::console;
use crate::context::{self, CompletedEntry, Layout, Redactor};
use crate::cooldown::Cooldowns;
use crate::fsutil;
use crate::mirror::{self, Op, Writer};
use crate::process::{self, Stop, StopKind};
use crate::router::{self, Routed};
use crate::scheduler::{
    self, Capacity, Decision, DepState, Pending, Scheduler, Unavailable, WaitReason,
};
use crate::spool::{self, Instance, Place, Spool};
use crate::task::{self, Attempt, Claim, History, Outcome, Task, TaskResult, Terminal};
use crate::watch::{self as watcher, Hint};

pub struct Options {
    pub once: bool,
}

mod attempt;
mod dispatch;
mod finish;
mod intake;
mod recovery;

use attempt::*;
use dispatch::*;
use finish::*;
use intake::*;

pub struct Supervisor {
    cfg: Arc<Config>,
    layout: Layout,
    spool: Spool,
    me: Instance,
    writer: Writer,
    redactor: Arc<Redactor>,
    sched: Scheduler,
    by_path: HashMap<PathBuf, String>,
    settling: HashMap<PathBuf, Settling>,
    scan: Option<Scan>,
    running: HashMap<String, Running>,
    per_agent: HashMap<String, usize>,
    done: scheduler::Done,
    completed: Vec<CompletedEntry>,
    attempts: JoinSet<Report>,
    /// Which task each attempt runs, so a panicked attempt still releases its task.
    attempt_ids: HashMap<tokio::task::Id, String>,
    /// Terminal commits (result file, task rename, fsyncs) run on blocking threads, several at once,
    /// so the loop goes on claiming while the disk works; a task is `finishing` until its commit
    /// is back.
    commits: JoinSet<Committed>,
    finishing: HashMap<String, tokio::task::Id>,
    /// `pending/` files being claimed right now: the watcher's and the scan's news of them is ours.
    claiming: HashSet<PathBuf>,
    /// "Claimed" news from attempts, by task and start: a message from an earlier start of the
    /// same task (its report was handled first and the task started again) must not count.
    claimed_tx: mpsc::UnboundedSender<(String, u64)>,
    claimed_rx: Option<mpsc::UnboundedReceiver<(String, u64)>>,
    starts: u64,
    /// The next scheduling pass looks at every pending task (see `schedule`).
    full_pass_due: bool,
    /// When the earliest retry back-off ends, as far as known.
    next_wake: Option<Instant>,
    /// Agents that cannot run and why, with when that was checked.
    unavailable: Option<(Instant, HashMap<String, Unavailable>)>,
    /// Agents resting after a rate limit.
    cooldowns: Cooldowns,
    /// The router's answers, by task, and the tasks it is being asked about (`None`).
    routes: HashMap<String, Option<Routed>>,
    route_tx: mpsc::UnboundedSender<(String, Routed)>,
    route_rx: Option<mpsc::UnboundedReceiver<(String, Routed)>>,
    state_dirty: bool,
    cycles_dirty: bool,
    shutting_down: bool,
    opts: Options,
}

impl Supervisor {
    pub fn new(cfg: Config, root: &Path, opts: Options) -> Result<Supervisor> {
        let layout = Layout::new(root, &cfg);
        let spool = Spool::new(&layout.tasks_dir, &layout.state_dir);
        spool.ensure_dirs()?;
        std::fs::create_dir_all(&layout.context_dir)?;
        spool.check_same_fs()?;
        fsutil::set_durable(cfg.orchestrator.durable);
        let me = Instance::register(&layout.state_dir)?;
        let (mut writer, _handle) =
            Writer::start(layout.state_dir.join("state.db"), me.host.clone())?;
        if let Some(url) = &cfg.database.url {
            // Never blocks the start: the writer connects (and reconnects) on its own thread.
            let pg = mirror::postgres::PgWriter::start(
                url.clone(),
                cfg.database.schema.clone(),
                me.host.clone(),
                spool.clone(),
                cfg.orchestrator.max_task_bytes,
                layout.state_dir.join("postgres.json"),
            )?;
            writer = writer.with_postgres(pg);
        }
        // API keys named per agent are secrets too, listed or not.
        let mut secrets = cfg.security.secrets.clone();
        secrets.extend(cfg.agents.values().filter_map(|a| a.api_key_env.clone()));
        secrets.extend(
            cfg.agents
                .values()
                .filter_map(|a| agents::default_key_var(a.kind).map(String::from)),
        );
        let redactor = Arc::new(Redactor::from_env(&secrets));
        context::install_redactor(&secrets);
        let cooldowns = Cooldowns::load(&layout.state_dir);
        let (route_tx, route_rx) = mpsc::unbounded_channel();
        let (claimed_tx, claimed_rx) = mpsc::unbounded_channel();
        Ok(Supervisor {
            cfg: Arc::new(cfg),
            layout,
            spool,
            me,
            writer,
            redactor,
            sched: Scheduler::new(),
            by_path: HashMap::new(),
            settling: HashMap::new(),
            scan: None,
            running: HashMap::new(),
            per_agent: HashMap::new(),
            done: HashMap::new(),
            completed: Vec::new(),
            attempts: JoinSet::new(),
            attempt_ids: HashMap::new(),
            commits: JoinSet::new(),
            finishing: HashMap::new(),
            claiming: HashSet::new(),
            claimed_tx,
            claimed_rx: Some(claimed_rx),
            starts: 0,
            full_pass_due: true,
            next_wake: None,
            unavailable: None,
            cooldowns,
            routes: HashMap::new(),
            route_tx,
            route_rx: Some(route_rx),
            state_dirty: true,
            cycles_dirty: true,
            shutting_down: false,
            opts,
        })
    }

    pub fn instance_id(&self) -> &str {
        &self.me.id
    }

    fn max_retries_of(&self, task: &Task) -> u32 {
        task.file
            .max_retries
            .unwrap_or(self.cfg.task_queue.max_retries)
    }

    pub async fn run(mut self) -> Result<()> {
        self.startup()?;
        let (hint_tx, mut hints) = mpsc::unbounded_channel();
        let _watch = watcher::start(
            &self.spool.pending,
            Duration::from_secs(self.cfg.orchestrator.rescan_seconds),
            hint_tx,
        );
        console::info(&format!(
            "orchestrate {} watching {} (instance {}, max_concurrent {})",
            env!("CARGO_PKG_VERSION"),
            self.layout.rel(&self.spool.pending),
            self.me.id,
            self.cfg.orchestrator.max_concurrent
        ));
        self.rescan();
        self.schedule();

        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut sigusr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
        let mut heartbeat = tokio::time::interval(Duration::from_secs(
            self.cfg.orchestrator.heartbeat_seconds.max(1),
        ));
        heartbeat.tick().await;
        // An interval, not a sleep re-armed each pass: a steady stream of events must not starve it.
        let mut settle_tick = tokio::time::interval(Duration::from_millis(
            (self.cfg.orchestrator.settle_ms / 4).clamp(10, 250),
        ));
        settle_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut state_tick = tokio::time::interval(Duration::from_millis(250));
        let mut signals = 0;
        let mut routes = self.route_rx.take().expect("run is called once");
        let mut claimed = self.claimed_rx.take().expect("run is called once");
        loop {
            if self.opts.once && self.nothing_left() {
                console::info("nothing left to run (--once)");
                break;
            }
            if self.shutting_down && self.running.is_empty() && self.commits.is_empty() {
                break;
            }
            let wake = self.next_wakeup();
            tokio::select! {
                Some(h) = hints.recv() => {
                    self.on_hint(h);
                    // Take whatever else is queued before scheduling: a burst is handled in one pass.
                    while let Ok(h) = hints.try_recv() {
                        self.on_hint(h);
                    }
                }
                Some(done) = self.attempts.join_next_with_id(), if !self.attempts.is_empty() => {
                    let mut done = Some(done);
                    // Every attempt that has finished by now, in this one turn.
                    while let Some(d) = done {
                        match d {
                            Ok((tid, report)) => {
                                self.attempt_ids.remove(&tid);
                                self.on_report(report);
                            }
                            Err(e) => self.on_attempt_crash(e),
                        }
                        done = self.attempts.try_join_next_with_id();
                    }
                }
                Some(done) = self.commits.join_next(), if !self.commits.is_empty() => {
                    let mut done = Some(done);
                    while let Some(d) = done {
                        self.on_committed(d);
                        done = self.commits.try_join_next();
                    }
                }
                Some((id, routed)) = routes.recv() => self.on_routed(id, routed),
                Some((id, start)) = claimed.recv() => {
                    self.on_claimed(&id, start);
                    while let Ok((id, start)) = claimed.try_recv() {
                        self.on_claimed(&id, start);
                    }
                }
                _ = settle_tick.tick(), if !self.settling.is_empty() => self.check_settling(),
                // Always ready while a scan is under way; select's random choice among the ready
                // branches interleaves its chunks with everything else.
                _ = std::future::ready(()), if self.scan.is_some() => self.scan_step(),
                _ = tokio::time::sleep_until(wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)).into()), if wake.is_some() => {}
                _ = heartbeat.tick() => {
                    self.heartbeat();
                    // Answers for tasks that left pending without starting (failed, cancelled,
                    // deleted): a task re-created under the same id is asked afresh.
                    let pending = &self.sched;
                    self.routes.retain(|id, _| pending.contains(id));
                    // Refresh every waiting task's note now and then, even while all slots are busy.
                    self.full_pass_due = true;
                    // A cancel whose SIGUSR1 came before our handler existed is still seen.
                    self.check_cancels();
                }
                _ = state_tick.tick(), if self.state_dirty => self.write_state_files(),
                _ = sigusr1.recv() => self.check_cancels(),
                _ = sigint.recv() => { signals += 1; self.shutdown(signals); }
                _ = sigterm.recv() => { signals += 1; self.shutdown(signals); }
            }
            if !self.shutting_down {
                self.schedule();
            }
        }
        self.write_state_files();
        // Leave the mirror agreeing with the tree: files quarantined or removed while we ran may
        // have rows that only a reconcile clears.
        if let Err(e) =
            self.writer
                .reconcile(&self.spool, self.cfg.orchestrator.max_task_bytes, false)
        {
            console::warn(&format!("final mirror reconcile failed: {e}"));
        }
        self.writer.send(Op::Supervisor {
            instance: self.me.id.clone(),
            pid: self.me.pid,
            started_at: self.me.started_at.clone(),
            heartbeat_at: fsutil::now_rfc3339(),
            alive: false,
        });
        self.writer.flush();
        let _ = std::fs::remove_file(self.me.lock_path(&self.layout.state_dir));
        console::info("supervisor stopped");
        Ok(())
    }

    fn nothing_left(&self) -> bool {
        if !self.running.is_empty()
            || !self.settling.is_empty()
            || !self.finishing.is_empty()
            || self.scan.is_some()
        {
            return false;
        }
        // A task waiting for the router's answer will go on when it comes.
        if self.routes.values().any(Option::is_none) {
            return false;
        }
        // A task waiting for an agent's cooldown to end will run when it does (one that waits for
        // something else, say a CLI that is not installed, does not keep `--once` alive).
        if self
            .cooldowns
            .next_end(time::OffsetDateTime::now_utc())
            .is_some()
            && self.sched.waits_for_cooldown()
        {
            return false;
        }
        // A task in a retry back-off runs when it ends (and so may a task that depends on it: such a
        // dependency is pending itself, so the same check covers it).
        !self.sched.backing_off(Instant::now())
    }

    /// The earliest retry back-off still ahead, from the last full pass and later requeues. When it
    /// has passed, the next pass is a full one that finds the next.
    fn next_wakeup(&mut self) -> Option<Instant> {
        match self.next_wake {
            Some(t) if t > Instant::now() => Some(t),
            Some(_) => {
                self.next_wake = None;
                self.full_pass_due = true;
                None
            }
            None => None,
        }
    }

    fn shutdown(&mut self, n: u32) {
        if n == 1 {
            console::info(&format!(
                "stopping: no new claims; {} running agent(s) get SIGTERM, then SIGKILL after {} s (signal again to kill now)",
                self.running.len(),
                self.cfg.orchestrator.kill_grace_seconds
            ));
            self.shutting_down = true;
            for r in self.running.values().filter(|r| !r.cancelling) {
                let _ = r.stop.send(Some(Stop::Shutdown));
            }
        } else {
            console::info("second signal: killing running agents now");
            for r in self.running.values() {
                let _ = r.stop.send(Some(Stop::KillNow));
            }
        }
    }

    /// Running, or finishing: the task is ours and out of `pending/`.
    fn in_hand(&self, id: &str) -> bool {
        self.running.contains_key(id) || self.finishing.contains_key(id)
    }
}
