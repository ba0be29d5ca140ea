//! The supervisor: the loop that turns files into runs and runs into files.
//!
//! # Theory of operation
//!
//! One tokio task owns all state. Its `select!` turns each source into an `Event`: watcher hints
//! (a file in `pending/` may be ready, or everything must be looked at again), a chunk of a scan
//! to read, the settle ticker (files seen only by scans or modify events must stay unchanged for
//! `settle_ms`), attempts' claim news and reports, finished commits, the router's answers, agent
//! login checks, retry back-off timers, the heartbeat, the state-files ticker, and signals. It decides nothing there:
//! `Supervisor::handle` decides what each event means and runs the phases it calls for. After
//! each turn the dispatch phase asks the scheduler which pending tasks can run, and starts them.
//!
//! The state lives in the part that owns it: `Intake` (the pending queue and what is known about
//! the files in `pending/`), `Dispatch` (router answers, cooldowns, logins, wake-ups), `Runs` (attempts in
//! flight), `Commits` (terminal commits in flight) and `Ledger` (what has finished), and changes
//! only through that part's methods. Handlers never call each other: the work that must follow
//! (read a requeued file, fail a task, commit a result) comes back as `Action`s, which
//! `Supervisor::apply` carries out at once, in order.
//!
//! Claims and terminal commits do not wait on the loop (requeues for retries, heartbeats and the
//! rare paths still do). An attempt runs as its own tokio task (`attempt.rs`): on a blocking
//! thread it claims the task through the spool (the rename, the claim record, their fsyncs), tells
//! the loop and the mirror, assembles the prompt and snapshots the workdir; then it runs the agent
//! through `process`, diffs the workdir and writes the output, and reports back. The loop decides
//! what the outcome means (`finish.rs`: retry, cooldown, needs login, done) and hands a terminal result to
//! another blocking thread that commits it (result file, rename, fsyncs). Several claims and
//! commits are on the disk at once, and their directory fsyncs are shared (`fsutil::fsync_dir`).
//! Each task has at most one such job at a time, and the loop holds it as running or finishing
//! until the job is back, so its transitions stay in order. Each transition is mirrored after the
//! file moved and is durable: the mirror may lag the tree, never lead it.
//!
//! Shutdown (SIGINT/SIGTERM): stop claiming, SIGTERM every running agent group, wait for the grace
//! period, SIGKILL; interrupted tasks go back to `pending/` without using up a retry. A second signal
//! kills at once.
//!
//! # Where things are
//!
//! - `events.rs`: every event the loop reacts to, every action one part may ask of another.
//! - `mod.rs` (here): the loop, `handle`, `apply`, and when the loop may end.
//! - `intake.rs`: `pending/`: scans, settling, reading, rejecting, quarantining, subtasks.
//! - `dispatch.rs`: what runs next (scheduler, router), and starting it.
//! - `runs.rs`: the attempts in flight.
//! - `attempt.rs`: one attempt, off the loop.
//! - `check.rs`: an attempt's `check` command, run after its agent.
//! - `fan_out.rs`: a fan-out's judge and pick: stop the losers, land the winner, record them all.
//! - `finish.rs`: a report's verdict (a pure function), requeues, retries, terminal commits.
//! - `ledger.rs`: what has finished.
//! - `spend.rs`: what the agents spent against their budgets.
//! - `recovery.rs`: start-up recovery, the heartbeat, cancels, state files.
//! - `tests.rs`: the loop's decisions, event by event, without agents.
//!
//! This file holds no task state and does no file work of its own beyond the final clean-up.

mod attempt;
mod check;
mod cluster;
mod dispatch;
mod events;
mod fan_out;
mod finish;
mod intake;
mod ledger;
mod notices;
mod recovery;
mod reload;
mod runs;
mod spend;
#[cfg(test)]
mod tests;
mod workspace;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::console;
use crate::cooldown::Cooldowns;
use crate::fsutil;
use crate::instance::Instance;
use crate::layout::Layout;
use crate::login::Logins;
use crate::mirror::{self, Op, Writer};
use crate::redact::Redactor;
use crate::router::Routed;
use crate::spool::Spool;
use crate::task::Task;
use crate::watch as watcher;

use dispatch::Dispatch;
use events::{Action, Commit, Event, LoginChecked};
use finish::Commits;
use intake::{Arrival, Intake};
use ledger::Ledger;
use runs::Runs;

#[derive(Default)]
pub struct Options {
    pub once: bool,
    /// The configuration file to follow while running (`None`: the configuration never changes).
    pub config_file: Option<std::path::PathBuf>,
    /// `-v` count, for the log level a reloaded configuration sets.
    pub verbose: u8,
}

/// What every part of the loop reads and none owns.
struct Env {
    cfg: Arc<Config>,
    layout: Layout,
    spool: Spool,
    me: Instance,
    writer: Writer,
    redactor: Arc<Redactor>,
    /// Idle worktrees, handed from one attempt to the next.
    pool: Arc<workspace::Pool>,
}

impl Env {
    fn max_retries_of(&self, task: &Task) -> u32 {
        task.file
            .max_retries
            .unwrap_or(self.cfg.task_queue.max_retries)
    }

    /// This supervisor's row in the mirror: alive (with a fresh heartbeat), or stopped.
    fn announce(&self, alive: bool) {
        self.writer.send(Op::Supervisor {
            instance: self.me.id.clone(),
            pid: self.me.pid,
            started_at: self.me.started_at.clone(),
            heartbeat_at: fsutil::now_rfc3339(),
            alive,
        });
    }
}

/// A read-only look at the parts a decision depends on but does not own.
struct View<'a> {
    env: &'a Env,
    runs: &'a Runs,
    commits: &'a Commits,
    ledger: &'a Ledger,
    shutting_down: bool,
    /// Cluster mode: tasks are published to the shared queue, never started from `pending/`.
    cluster: bool,
}

impl View<'_> {
    /// Running, or finishing: the task is ours and out of `pending/`.
    fn in_hand(&self, id: &str) -> bool {
        self.runs.contains(id) || self.commits.contains(id)
    }

    /// Its terminal commit is under way, and no new attempt of it runs.
    fn committing(&self, id: &str) -> bool {
        self.commits.contains(id) && !self.runs.contains(id)
    }
}

/// The receiving ends of the channels the loop's helpers report on; `run` takes them.
struct Inbox {
    claimed: mpsc::UnboundedReceiver<(String, u64)>,
    routed: mpsc::UnboundedReceiver<(String, Routed)>,
    login_checked: mpsc::UnboundedReceiver<(String, LoginChecked)>,
    cluster: Option<mpsc::UnboundedReceiver<cluster::link::News>>,
}

pub struct Supervisor {
    env: Env,
    intake: Intake,
    dispatch: Dispatch,
    runs: Runs,
    commits: Commits,
    ledger: Ledger,
    /// Cluster mode: the shared queue in PostgreSQL decides who runs what.
    cluster: Option<cluster::Cluster>,
    inbox: Option<Inbox>,
    /// The configuration file, looked at every second for a change to apply.
    config_file: Option<reload::ConfigFile>,
    /// `current_state.md` and `completed_tasks.json` are behind.
    state_dirty: bool,
    /// SIGINT and SIGTERM seen: the first stops gracefully, the second kills.
    signals: u32,
    shutting_down: bool,
    opts: Options,
}

impl Supervisor {
    pub fn new(cfg: Config, root: &Path, opts: Options) -> Result<Supervisor> {
        let layout = cfg.layout(root);
        let redactor = cfg.redactor();
        let spool = Spool::new(&layout, redactor.clone());
        spool.ensure_dirs()?;
        std::fs::create_dir_all(&layout.context_dir)?;
        spool.check_same_fs()?;
        fsutil::set_durable(cfg.orchestrator.durable);
        let me = Instance::register(&layout)?;
        let (mut writer, _handle) = Writer::start(
            layout.state_db(),
            me.host.clone(),
            redactor.clone(),
            &spool,
            cfg.orchestrator.max_task_bytes,
        )?;
        if let Some(url) = &cfg.database.url {
            // Never blocks the start: the writer connects (and reconnects) on its own thread.
            let pg = mirror::postgres::PgWriter::start(
                url.clone(),
                cfg.database.schema.clone(),
                me.host.clone(),
                spool.clone(),
                cfg.orchestrator.max_task_bytes,
                layout.postgres_health(),
            )?;
            writer = writer.with_postgres(pg);
        }
        let redactor = Arc::new(redactor);
        let (dispatch, helpers) = Dispatch::new(Cooldowns::load(&layout), Logins::load(&layout));
        let (runs, claimed) = Runs::new();
        let pool = Arc::new(workspace::Pool::new(&layout, &me.id));
        let mut cluster = None;
        if cfg.cluster.enabled {
            // The instance of this tree that joined the cluster last: when its lock here is free
            // it is dead (a crash), and the host name is ours at once rather than after a lease.
            // Another tree's or a live process's name is never taken.
            let last = layout.state_dir.join("cluster-instance");
            let replaces = std::fs::read_to_string(&last)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|id| {
                    !id.is_empty()
                        && *id != me.id
                        && !crate::instance::instance_lock_held(&layout.instance_lock(id))
                });
            let url = cfg
                .database
                .url
                .clone()
                .expect("checked with the configuration");
            let link = cluster::link::Link::start(cluster::link::Start {
                url,
                schema: cfg.database.schema.clone(),
                host: cfg.cluster.host.clone().unwrap_or_else(|| me.host.clone()),
                instance: me.id.clone(),
                replaces,
                labels: cfg.cluster.labels.clone(),
                lease: Duration::from_secs(cfg.cluster.lease_seconds),
                aging: Duration::from_secs_f64(cfg.task_queue.aging_minutes * 60.0),
                poll: Duration::from_millis(cfg.cluster.poll_ms),
                max_running: cfg.cluster.max_concurrent,
            })?;
            // Torn by a crash, it names no instance and the next start waits out the lease.
            if let Err(e) = fsutil::atomic_write(&last, me.id.as_bytes()) {
                console::warn(&format!("cannot write {}: {e}", last.display()));
            }
            cluster = Some(cluster::Cluster::new(
                link,
                cfg.cluster.labels.clone(),
                Duration::from_millis(cfg.cluster.poll_ms),
            ));
        }
        let cluster_news = cluster.as_mut().and_then(|c| c.link.news.take());
        Ok(Supervisor {
            env: Env {
                cfg: Arc::new(cfg),
                pool,
                layout,
                spool,
                me,
                writer,
                redactor,
            },
            intake: Intake::new(),
            dispatch,
            runs,
            commits: Commits::default(),
            ledger: Ledger::default(),
            cluster,
            inbox: Some(Inbox {
                claimed,
                routed: helpers.routed,
                login_checked: helpers.login_checked,
                cluster: cluster_news,
            }),
            config_file: opts.config_file.clone().map(reload::ConfigFile::new),
            state_dirty: true,
            signals: 0,
            shutting_down: false,
            opts,
        })
    }

    pub fn instance_id(&self) -> &str {
        &self.env.me.id
    }

    pub async fn run(mut self) -> Result<()> {
        // Signals first: start-up already moves files (recovery, cancels, the first claims), and a
        // SIGTERM in that window must be a graceful stop at the first turn of the loop, not the
        // default action killing the process between two steps of one transition.
        use tokio::signal::unix::{SignalKind, signal};
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigusr1 = signal(SignalKind::user_defined1())?;
        // Several supervisors may share a tree (claims are renames): say so, it is rarely by accident
        // and never silent. Said once the signals are ours, so a stop right after it is graceful.
        let others: Vec<String> = crate::instance::live_instances(&self.env.layout)
            .into_iter()
            .filter(|(pid, _)| *pid != self.env.me.pid)
            .map(|(pid, _)| pid.to_string())
            .collect();
        if !others.is_empty() {
            console::info(&format!(
                "another supervisor is running on this tree (pid {}); they will share the work",
                others.join(", ")
            ));
        }
        self.startup()?;
        let (hint_tx, mut hints) = mpsc::unbounded_channel();
        let _watch = watcher::start(
            &self.env.spool.layout().pending,
            Duration::from_secs(self.env.cfg.orchestrator.rescan_seconds),
            hint_tx,
        );
        console::info(&format!(
            "orchestrate {} watching {} (instance {}, max_concurrent {})",
            env!("CARGO_PKG_VERSION"),
            self.env.layout.rel(&self.env.spool.layout().pending),
            self.env.me.id,
            self.env.cfg.orchestrator.max_concurrent
        ));
        self.scan_pending();
        self.dispatch_phase();

        let (mut heartbeat, mut settle_tick) = self.tickers();
        let mut periods = self.periods();
        let mut config_tick = tokio::time::interval(reload::CHECK_EVERY);
        config_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut state_tick = tokio::time::interval(Duration::from_millis(250));
        let Inbox {
            mut claimed,
            mut routed,
            mut login_checked,
            cluster: mut cluster_news,
        } = self.inbox.take().expect("run is called once");
        loop {
            if self.opts.once && self.nothing_left() {
                console::info("nothing left to run (--once)");
                break;
            }
            if self.shutting_down && self.runs.is_empty() && !self.commits.has_tasks() {
                break;
            }
            let wake = self.dispatch.wake_deadline();
            let held = self.commits.next_retry();
            let far = || Instant::now() + Duration::from_secs(3600);
            // Only sources into events.
            let events = tokio::select! {
                Some(h) = hints.recv() => burst(h, || hints.try_recv().ok(), Event::from),
                Some(ended) = self.runs.join_next(), if self.runs.has_tasks() => {
                    burst(ended, || self.runs.try_join_next(), Event::AttemptEnded)
                }
                Some(done) = self.commits.join_next(), if self.commits.has_tasks() => {
                    burst(done, || self.commits.try_join_next(), Event::Committed)
                }
                Some((id, routed)) = routed.recv() => vec![Event::Routed { id, routed }],
                Some(news) = async {
                    match cluster_news.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => vec![Event::Cluster(news)],
                Some((agent, checked)) = login_checked.recv() => {
                    vec![Event::LoginChecked { agent, checked }]
                }
                Some(news) = claimed.recv() => {
                    let event = |(id, start)| Event::Claimed { id, start };
                    burst(news, || claimed.try_recv().ok(), event)
                }
                _ = settle_tick.tick(), if self.intake.is_settling() => vec![Event::SettleTick],
                // Always ready while a scan is under way; select's random choice among the ready
                // branches interleaves its chunks with everything else.
                _ = std::future::ready(()), if self.intake.is_scanning() => vec![Event::ScanChunk],
                _ = tokio::time::sleep_until(wake.unwrap_or_else(far).into()), if wake.is_some() => {
                    vec![Event::WakeUp]
                }
                _ = tokio::time::sleep_until(held.unwrap_or_else(far).into()), if held.is_some() => {
                    vec![Event::RetryHeld]
                }
                _ = heartbeat.tick() => vec![Event::Heartbeat],
                _ = config_tick.tick(), if self.config_file.is_some() => vec![Event::ConfigCheck],
                _ = state_tick.tick(), if self.state_dirty => vec![Event::StateTick],
                _ = sigusr1.recv() => vec![Event::CancelRequested],
                _ = sigint.recv() => vec![Event::StopRequested],
                _ = sigterm.recv() => vec![Event::StopRequested],
            };
            for event in events {
                self.handle(event);
            }
            if self.periods() != periods {
                // A reloaded configuration changed how often they tick.
                periods = self.periods();
                (heartbeat, settle_tick) = self.tickers();
            }
            if !self.shutting_down {
                self.dispatch_phase();
                self.cluster_phase();
                self.retry_outcomes();
            }
        }
        self.leave_cluster();
        self.write_state_files();
        let env = &self.env;
        // Nothing runs now: no idle worktree outlives the supervisor.
        env.pool.drain();
        crate::git::forget_seeds();
        // Leave the mirror agreeing with the tree: files quarantined or removed while we ran may
        // have rows that only a reconcile clears.
        if let Err(e) = env
            .writer
            .reconcile(&env.spool, env.cfg.orchestrator.max_task_bytes, false)
        {
            console::warn(&format!("final mirror reconcile failed: {e}"));
        }
        env.announce(false);
        env.writer.flush();
        let _ = std::fs::remove_file(env.me.lock_path(&env.layout));
        console::info("supervisor stopped");
        Ok(())
    }

    /// The heartbeat and settle periods, as the running configuration sets them.
    fn periods(&self) -> (u64, u64) {
        let o = &self.env.cfg.orchestrator;
        (o.heartbeat_seconds, o.settle_ms)
    }

    fn tickers(&self) -> (tokio::time::Interval, tokio::time::Interval) {
        let o = &self.env.cfg.orchestrator;
        let start = tokio::time::Instant::now();
        // The heartbeat's first tick is a period away, not at once: the start-up already did its work.
        let period = Duration::from_secs(o.heartbeat_seconds.max(1));
        let heartbeat = tokio::time::interval_at(start + period, period);
        // An interval, not a sleep re-armed each pass: a steady stream of events must not starve it.
        let mut settle_tick =
            tokio::time::interval(Duration::from_millis((o.settle_ms / 4).clamp(10, 250)));
        settle_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        (heartbeat, settle_tick)
    }

    /// If the configuration file changed and is valid: run with it from now on. Whether it did.
    fn reload_config(&mut self) -> bool {
        let Some(file) = &mut self.config_file else {
            return false;
        };
        let Some(reload) = file.check(&self.env.cfg, &self.env.redactor) else {
            return false;
        };
        let cfg = reload.cfg;
        // New agents' keys are secrets from now on, everywhere a record is written.
        self.env.redactor.widen(&cfg.redactor());
        fsutil::set_durable(cfg.orchestrator.durable);
        console::set_level(&cfg.orchestrator.log_level, self.opts.verbose);
        self.env.cfg = Arc::new(cfg);
        // Limits, agents and routing changed: every pending task is decided again.
        self.dispatch.want_full_pass();
        true
    }

    /// Decide what an event means, and run the phases it calls for.
    fn handle(&mut self, event: Event) {
        // `current_state.md` follows every transition (written at most every 250 ms): any event
        // may change what it shows but its own tick and the periodic rescan (what the rescan finds
        // arrives as events of its own), and the heartbeat only moves the clocks of running tasks.
        // An idle supervisor leaves the file alone, so a syncing phone is not woken for nothing.
        match &event {
            // The settle ticker says itself whether it changed anything (below).
            Event::StateTick | Event::Rescan | Event::SettleTick | Event::ConfigCheck => {}
            Event::Heartbeat => self.state_dirty |= !self.runs.is_empty(),
            _ => self.state_dirty = true,
        }
        match event {
            Event::Arrived(path) => self.ingest(&path, Arrival::Renamed),
            Event::Closed(path) => self.ingest(&path, Arrival::Closed),
            Event::Changed(path) => self.ingest(&path, Arrival::Changed),
            Event::Rescan => {
                self.scan_pending();
                // Claims of supervisors that died since we started (another one sharing the tree).
                let recovered = self.recover();
                self.apply(recovered);
                let env = &self.env;
                env.writer
                    .reconcile_later(&env.spool, env.cfg.orchestrator.max_task_bytes);
            }
            Event::ScanChunk => self.scan_chunk(),
            Event::SettleTick => {
                let (intake, _, view) = self.parts();
                let settled = intake.settle_tick(&view);
                self.state_dirty |= self.intake.take_news();
                self.apply(settled);
            }
            Event::Claimed { id, start } => {
                if let Some(path) = self.runs.claimed(&id, start) {
                    self.intake.release(&path);
                }
            }
            Event::AttemptEnded(Ok((tid, report))) => {
                self.runs.joined(tid);
                let next = self.on_report(report);
                self.apply(next);
            }
            Event::AttemptEnded(Err(e)) => {
                if let Some(report) = self.crash_report(e) {
                    let next = self.on_report(report);
                    self.apply(next);
                }
            }
            Event::Committed(done) => self.on_committed(done),
            Event::ConfigCheck => {
                self.state_dirty |= self.reload_config();
            }
            Event::RetryHeld => {
                let next = self.retry_held();
                self.apply(next);
            }
            Event::Routed { id, routed } => {
                // A task the cluster waits to publish until its origin's router answered.
                if let Some(c) = self.cluster.as_mut()
                    && c.routing.remove(&id)
                {
                    c.fresh.push(id.clone());
                }
                self.dispatch.on_routed(&self.intake.queue, id, routed);
            }
            Event::LoginChecked { agent, checked } => {
                self.dispatch.on_login_checked(&self.env, &agent, checked);
            }
            // The dispatch after every turn lets the task whose back-off ended run; at the top of
            // the next turn `wake_deadline` sees the time has passed and asks for a full pass.
            Event::WakeUp => {}
            Event::Heartbeat => self.on_heartbeat(),
            Event::StateTick => self.write_state_files(),
            Event::CancelRequested => {
                let cancels = self.check_cancels();
                self.apply(cancels);
            }
            Event::StopRequested => self.on_stop_signal(),
            Event::Cluster(news) => self.on_cluster(news),
        }
    }

    /// Carry out actions at once, in order, each one's own follow-ups before the next.
    fn apply(&mut self, actions: Vec<Action>) {
        let mut stack = actions;
        stack.reverse();
        while let Some(action) = stack.pop() {
            let mut more = self.carry_out(action);
            more.reverse();
            stack.append(&mut more);
        }
    }

    #[must_use = "the actions are the rest of the work: apply them"]
    fn carry_out(&mut self, action: Action) -> Vec<Action> {
        match action {
            Action::Queued { id, not_before } => {
                if let Some(c) = self.cluster.as_mut() {
                    c.fresh.push(id.clone());
                }
                // Its earlier attempts count against the budgets, once (a mirror rebuilt at start
                // has no rows for `pending/` yet).
                if let Some(p) = self.intake.queue.get(&id) {
                    for a in &p.history.attempts {
                        self.dispatch.spending.attempt_finished(&id, a);
                    }
                }
                self.dispatch.queued(&id, not_before)
            }
            Action::Left(id) => self.dispatch.forget(&id),
            Action::Reopened(id) => self.ledger.reopen(&id),
            Action::Ingest(path) => {
                let (intake, _, view) = self.parts();
                return intake.ingest(&view, &path, Arrival::Renamed);
            }
            Action::Reread(path) => {
                let (intake, _, view) = self.parts();
                return intake.reread(&view, &path);
            }
            Action::Settle(path) => self.intake.settle(&path),
            Action::Start { id, agent, because } => self.start(&id, &agent, &because),
            Action::CompleteParent(id) => return self.complete_parent(&id),
            Action::Pick(id) => return self.pick(&id),
            Action::Judge(id) => return self.write_judge(&id),
            Action::Fail { id, reason } => {
                let more = self.stop_candidates_of(&id, &reason);
                self.fail_pending(&id, &reason);
                return more;
            }
            Action::CancelAnswered(id) => self.env.spool.drop_cancel_request(&id),
            Action::Commit(commit) => {
                let Commit { task, result } = *commit;
                self.commits.start(&self.env.spool, task, result);
            }
            Action::Defer(what, error) => self.defer(*what, error),
        }
        vec![]
    }

    /// The parts a handler may change, and a view of the rest.
    fn parts(&mut self) -> (&mut Intake, &mut Dispatch, View<'_>) {
        let Supervisor {
            env,
            intake,
            dispatch,
            runs,
            commits,
            ledger,
            shutting_down,
            cluster,
            ..
        } = self;
        let view = View {
            env,
            runs,
            commits,
            ledger,
            shutting_down: *shutting_down,
            cluster: cluster.is_some(),
        };
        (intake, dispatch, view)
    }

    fn ingest(&mut self, path: &Path, arrival: Arrival) {
        let (intake, _, view) = self.parts();
        let next = intake.ingest(&view, path, arrival);
        self.apply(next);
    }

    /// Take a new listing of `pending/` and read its first chunk.
    fn scan_pending(&mut self) {
        let (intake, _, view) = self.parts();
        if intake.rescan(&view) {
            self.scan_chunk();
        }
    }

    /// The scan's next chunk, in its phases.
    fn scan_chunk(&mut self) {
        if !self.intake.is_scanning() {
            return;
        }
        let (intake, _, view) = self.parts();
        let read = intake.scan_chunk(&view);
        self.apply(read);
        // Cancels asked of a supervisor that died before it could finish them, for tasks this chunk
        // found again (requeued by recovery, say): before the scheduler sees them.
        let cancels = self.check_cancels();
        self.apply(cancels);
        let (intake, _, view) = self.parts();
        let gone = intake.end_scan(&view);
        self.apply(gone);
    }

    /// SIGINT or SIGTERM: the first stops claiming and stops the agents gracefully; the second
    /// kills them.
    fn on_stop_signal(&mut self) {
        self.signals += 1;
        if self.signals == 1 {
            console::info(&format!(
                "stopping: no new claims; {} running agent(s) get SIGTERM, then SIGKILL after {} s (signal again to kill now)",
                self.runs.len(),
                self.env.cfg.orchestrator.kill_grace_seconds
            ));
            self.shutting_down = true;
            self.runs.shut_down();
        } else {
            console::info("second signal: killing running agents now");
            self.runs.kill_all();
        }
    }

    /// `--once` may stop: nothing runs or waits for something that will come without new input.
    fn nothing_left(&self) -> bool {
        if !self.runs.is_empty()
            || self.intake.is_settling()
            || !self.commits.is_empty()
            || self.intake.is_scanning()
        {
            return false;
        }
        // A task waiting for the router's answer will go on when it comes.
        if self.dispatch.asking_router() {
            return false;
        }
        // A task waiting for an agent's cooldown to end will run when it does (one that waits for
        // something else, say a CLI that is not installed, does not keep `--once` alive).
        if self.dispatch.cooling_down() && self.intake.queue.waits_for_cooldown() {
            return false;
        }
        // A task in a retry back-off runs when it ends (and so may a task that depends on it: such a
        // dependency is pending itself, so the same check covers it).
        !self.intake.queue.backing_off(Instant::now())
    }
}

/// `first` and whatever else its source has ready now, as events: a burst is handled in one turn,
/// with one dispatch after it.
fn burst<T>(first: T, more: impl FnMut() -> Option<T>, event: impl Fn(T) -> Event) -> Vec<Event> {
    std::iter::once(first)
        .chain(std::iter::from_fn(more))
        .map(event)
        .collect()
}
