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
use crate::context::{self, CompletedEntry};
use crate::cooldown::Cooldowns;
use crate::fsutil;
use crate::instance::Instance;
use crate::layout::Layout;
use crate::mirror::{self, Op, Writer};
use crate::process::{self, Stop, StopKind};
use crate::record::{Attempt, Claim, History, Outcome, TaskResult, Terminal};
use crate::redact::Redactor;
use crate::router::{self, Routed};
use crate::scheduler::{self, Capacity, Decision, DepState, Pending, Scheduler};
use crate::spool::{self, Place, Spool};
use crate::task::{self, Task};
use crate::watch::{self as watcher, Hint};

pub struct Options {
    pub once: bool,
}

struct Running {
    task: Task,
    claim: Claim,
    stop: watch::Sender<Option<Stop>>,
    /// A cancel was requested: a later shutdown must not turn it into a requeue.
    cancelling: bool,
    /// Where the task file was in `pending/` before the claim.
    path: PathBuf,
    /// Which start of the supervisor's this is (see `claimed_tx`).
    start: u64,
    /// The claim is done and the task file is ours (the claim runs in the attempt's task, off the
    /// loop); until then there is no claim record to refresh.
    claimed: bool,
}

/// How claiming a task came out.
enum Claimed {
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

/// A scan of `pending/` in progress: the listing still to read, and what it has read.
struct Scan {
    queue: std::collections::VecDeque<(PathBuf, std::fs::Metadata)>,
    seen: HashSet<PathBuf>,
}

/// A file in `pending/` that must stay unchanged for the settle period before it is read.
struct Settling {
    sig: (u64, i128, u64),
    since: Instant,
}

/// A terminal commit, done: the task, its result, and whether the spool took it.
struct Committed {
    task: Task,
    result: TaskResult,
    outcome: Result<(), String>,
}

/// What an attempt task reports back.
struct Report {
    id: String,
    attempt: Attempt,
    text_file: Option<PathBuf>,
    diff_file: Option<PathBuf>,
    files_modified: Vec<String>,
    /// The task itself is at fault (bad workdir, missing context file): retrying cannot help.
    permanent: bool,
    stopped: Option<StopKind>,
    /// For rate limits: when the provider said to come back.
    retry_after: Option<Duration>,
    /// Set when the claim did not give us the task: nothing ran.
    unclaimed: Option<Claimed>,
}

impl Report {
    /// An attempt that got nowhere beyond `attempt` says.
    fn new(id: &str, attempt: Attempt) -> Report {
        Report {
            id: id.to_string(),
            attempt,
            text_file: None,
            diff_file: None,
            files_modified: vec![],
            permanent: false,
            stopped: None,
            retry_after: None,
            unclaimed: None,
        }
    }
}

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
    unavailable: Option<(Instant, HashMap<String, String>)>,
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

fn sig_of(m: &std::fs::Metadata) -> (u64, i128, u64) {
    use std::os::unix::fs::MetadataExt;
    (
        m.len(),
        m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        m.ino(),
    )
}

/// Longest file stem stored in `failed/` or `quarantine/`. The explanation beside it
/// (`<stem>.error.txt`, `<name>.reason.txt`), a uniqueness suffix and the temp name it is written
/// under (`.<name>.<pid>.<n>.tmp`) must all fit in the 255-byte limit of a file name: a 255-byte task
/// file used to be moved to `failed/` and then lose its explanation to ENAMETOOLONG.
const MAX_STORED_STEM: usize = 170;

/// `name`, shortened if needed so it can be stored with its explanation; the note says what it was.
fn storable_name(name: &str) -> (String, Option<String>) {
    let stem = crate::layout::file_stem(name);
    if stem.len() <= MAX_STORED_STEM {
        return (name.to_string(), None);
    }
    let ext = &name[stem.len()..];
    let mut cut = MAX_STORED_STEM;
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    let short = format!("{}-truncated{ext}", &stem[..cut]);
    let note = format!(
        "(file name shortened from {} to fit beside this explanation)",
        name.escape_debug()
    );
    (short, Some(note))
}

fn hash_bytes(b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
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
        let (mut writer, _handle) =
            Writer::start(layout.state_db(), me.host.clone(), redactor.clone())?;
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
        let cooldowns = Cooldowns::load(&layout);
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

    /// Recover dead claims, bring the mirror in line, load what is already finished.
    fn startup(&mut self) -> Result<()> {
        self.recover();
        if let Err(e) = self.spool.repair_rejected() {
            console::warn(&format!(
                "cannot check failed/ for lost explanations: {e:#}"
            ));
        }
        let report = self
            .writer
            // pending/ is read by the start-up scan right after, which mirrors what it finds.
            .reconcile(&self.spool, self.cfg.orchestrator.max_task_bytes, true)
            .map_err(|e| anyhow::anyhow!("mirror reconcile failed: {e}"))?;
        console::debug(&format!(
            "mirror reconciled: {} rows updated, {} removed",
            report.upserted, report.deleted
        ));
        let conn = mirror::sqlite::open(&self.layout.state_db())?;
        for row in mirror::sqlite::list(&conn, Some("completed"))? {
            self.done.insert(row.id.clone(), Terminal::Completed);
            self.completed.push(CompletedEntry {
                id: row.id,
                description: row.payload.description,
                agent: row.agent,
                finished_at: row.payload.finished_at.unwrap_or(row.updated_at),
                output_file: None,
                diff_file: None,
                files_modified: row.payload.files_modified,
            });
        }
        self.completed
            .sort_by(|a, b| a.finished_at.cmp(&b.finished_at));
        // Rows of supervisors on this host that died without saying so (SIGKILL, power cut).
        for row in mirror::sqlite::supervisors(&conn)? {
            let lock = self.layout.instance_lock(&row.instance);
            if row.host == self.me.host && !crate::instance::instance_lock_held(&lock) {
                self.writer.send(Op::Supervisor {
                    instance: row.instance,
                    pid: row.pid,
                    started_at: row.started_at,
                    heartbeat_at: row.heartbeat_at,
                    alive: false,
                });
            }
        }
        for row in mirror::sqlite::list(&conn, Some("failed"))? {
            self.done.insert(row.id, Terminal::Failed);
        }
        self.writer.send(Op::Supervisor {
            instance: self.me.id.clone(),
            pid: self.me.pid,
            started_at: self.me.started_at.clone(),
            heartbeat_at: fsutil::now_rfc3339(),
            alive: true,
        });
        Ok(())
    }

    fn recover(&mut self) {
        let cfg = self.cfg.clone();
        let max = move |p: &Path| {
            task::read_task(p, u64::MAX)
                .ok()
                .and_then(|(t, _)| t.file.max_retries)
                .unwrap_or(cfg.task_queue.max_retries)
        };
        match self.spool.recover(&self.me, &max) {
            Ok(list) => {
                for r in list {
                    match r {
                        spool::Recovered::Requeued(id) => {
                            console::info(&format!(
                                "recovered  {id}: its supervisor stopped mid-run; back to pending"
                            ));
                            self.ingest_path(&self.spool.task_path(Place::Pending, &id), true);
                        }
                        spool::Recovered::Finished(id, t) => {
                            console::info(&format!(
                                "recovered  {id}: finished before its supervisor stopped → {}",
                                t.dir_name()
                            ));
                            if let Some(r) = self.spool.read_result(t, &id) {
                                self.writer.send(Op::Upsert {
                                    row: mirror::terminal_row(&self.spool, &r, None),
                                    attempts: r.attempts.clone(),
                                });
                            }
                            self.done.insert(id, t);
                        }
                    }
                }
            }
            Err(e) => console::warn(&format!("recovery failed: {e:#}")),
        }
    }

    pub async fn run(mut self) -> Result<()> {
        self.startup()?;
        let (hint_tx, mut hints) = mpsc::unbounded_channel();
        let _watch = watcher::start(
            &self.spool.layout().pending,
            Duration::from_secs(self.cfg.orchestrator.rescan_seconds),
            hint_tx,
        );
        console::info(&format!(
            "orchestrate {} watching {} (instance {}, max_concurrent {})",
            env!("CARGO_PKG_VERSION"),
            self.layout.rel(&self.spool.layout().pending),
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
                    let pending = &self.sched.pending;
                    self.routes.retain(|id, _| pending.contains_key(id));
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
        let _ = std::fs::remove_file(self.me.lock_path(&self.layout));
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
        // Pending tasks that can still make progress without new input: waiting on a retry back-off,
        // or on a dependency that itself can run.
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
            && self.sched.pending.values().any(|p| {
                p.note
                    .as_deref()
                    .is_some_and(|n| n.contains("cooling down until"))
            })
        {
            return false;
        }
        let now = Instant::now();
        !self.sched.pending.values().any(|p| {
            p.not_before.is_some_and(|t| t > now)
                || p.waits_for().iter().any(|d| {
                    self.sched
                        .pending
                        .get(d)
                        .is_some_and(|dp| dp.not_before.is_some_and(|t| t > now))
                })
        })
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

    // ---- intake ----------------------------------------------------------------------------------

    fn on_hint(&mut self, h: Hint) {
        match h {
            Hint::Rescan => {
                self.rescan();
                self.recover();
                self.writer
                    .reconcile_later(&self.spool, self.cfg.orchestrator.max_task_bytes);
            }
            Hint::Complete(p) => self.ingest_path(&p, true),
            Hint::Changed(p) => self.ingest_path(&p, false),
        }
    }

    /// The scan is the truth: look at every file in `pending/`, forget tasks whose file is gone.
    /// The listing is taken now; the files are read a chunk per loop turn (`scan_step`), so a
    /// backlog of 100,000 files does not hold up the attempts that finish meanwhile.
    fn rescan(&mut self) {
        let rd = match std::fs::read_dir(&self.spool.layout().pending) {
            Ok(rd) => rd,
            Err(e) => {
                console::warn(&format!(
                    "cannot list {}: {e}; recreating it",
                    self.spool.layout().pending.display()
                ));
                let _ = self.spool.ensure_dirs();
                return;
            }
        };
        let mut paths: Vec<(PathBuf, std::fs::Metadata)> = rd
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((e.path(), m))
            })
            .collect();
        // FIFO for files found by a scan: oldest first, then by name.
        paths.sort_by(|a, b| {
            a.1.modified()
                .ok()
                .cmp(&b.1.modified().ok())
                .then(a.0.cmp(&b.0))
        });
        // A scan still under way is superseded: this listing is newer.
        self.scan = Some(Scan {
            queue: paths.into(),
            seen: HashSet::new(),
        });
        self.scan_step();
    }

    /// Read the next chunk of the scan's listing; at its end, forget what is gone. Priorities apply
    /// among the tasks read so far: with a huge backlog, work starts while the rest is read.
    fn scan_step(&mut self) {
        const CHUNK: usize = 256;
        let Some(mut scan) = self.scan.take() else {
            return;
        };
        for _ in 0..CHUNK {
            let Some((p, m)) = scan.queue.pop_front() else {
                break;
            };
            scan.seen.insert(p.clone());
            // Unchanged known files need no second look.
            if let Some(id) = self.by_path.get(&p)
                && self
                    .sched
                    .pending
                    .get(id)
                    .is_some_and(|pd| pd.sig == sig_of(&m))
            {
                continue;
            }
            // A file nobody has written to for the settle period is as good as closed by its writer.
            let quiet = m
                .modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= Duration::from_millis(self.cfg.orchestrator.settle_ms));
            self.ingest_path(&p, quiet);
        }
        // Cancels asked of a supervisor that died before it could finish them, for tasks this chunk
        // found again (requeued by recovery, say): before the scheduler sees them.
        self.check_cancels();
        if !scan.queue.is_empty() {
            self.scan = Some(scan);
            return;
        }
        let seen = scan.seen;
        let gone: Vec<PathBuf> = self
            .by_path
            .keys()
            // Files that arrived after the listing (subtask children, new drops) are not gone.
            .filter(|p| !seen.contains(*p) && !p.exists())
            .cloned()
            .collect();
        for p in gone {
            self.forget_path(&p);
        }
        self.settling.retain(|p, _| seen.contains(p) || p.exists());
    }

    fn forget_path(&mut self, p: &Path) {
        if let Some(id) = self.by_path.remove(p) {
            // The file may have been claimed (by us, then it is in `running`) or removed by the user.
            if self.sched.pending.get(&id).is_some_and(|pd| pd.path == p) {
                self.sched.remove(&id);
                self.routes.remove(&id);
                self.cycles_dirty = true;
                if !self.in_hand(&id) && self.spool.settled_place(&id).is_none() {
                    console::info(&format!("removed    {id}: its file left pending/"));
                    self.writer.send(Op::Delete(id));
                }
            }
        }
    }

    fn ingest_path(&mut self, path: &Path, complete: bool) {
        if self.shutting_down {
            return;
        }
        let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            return;
        };
        if path.parent() != Some(self.spool.layout().pending.as_path())
            || self.claiming.contains(path)
        {
            return;
        }
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(_) => {
                self.settling.remove(path);
                self.forget_path(path);
                return;
            }
        };
        if task::is_conflict_copy(&name) && !name.starts_with('.') {
            self.quarantine(path, &name, "a sync client's conflict copy: never run automatically; merge it by hand and drop the result into pending/");
            return;
        }
        if !task::is_task_file_name(&name) {
            return;
        }
        let sig = sig_of(&meta);
        if let Some(id) = self.by_path.get(path)
            && self.sched.pending.get(id).is_some_and(|p| p.sig == sig)
        {
            return;
        }
        if !meta.file_type().is_file() {
            // Directories, FIFOs and symlinks named like tasks: reject without opening them.
            self.reject(path, &name, "not a regular file (directory, symlink, FIFO or device); task files must be plain files");
            return;
        }
        if !complete {
            match self.settling.get_mut(path) {
                Some(s) if s.sig == sig => {
                    if s.since.elapsed() < Duration::from_millis(self.cfg.orchestrator.settle_ms) {
                        return;
                    }
                }
                Some(s) => {
                    s.sig = sig;
                    s.since = Instant::now();
                    return;
                }
                None => {
                    self.start_settling(path, sig);
                    return;
                }
            }
        }
        self.settling.remove(path);
        self.ingest_ready(path, &name, sig);
    }

    /// Watch `path` until it has kept `sig` for the settle period.
    fn start_settling(&mut self, path: &Path, sig: (u64, i128, u64)) {
        self.settling.insert(
            path.to_path_buf(),
            Settling {
                sig,
                since: Instant::now(),
            },
        );
    }

    fn check_settling(&mut self) {
        let settle = Duration::from_millis(self.cfg.orchestrator.settle_ms);
        // Oldest first (mtime, then name): files that settle together keep their arrival order.
        let mut ready: Vec<(i128, PathBuf)> = self
            .settling
            .iter()
            .filter(|(_, s)| s.since.elapsed() >= settle)
            .map(|(p, s)| (s.sig.1, p.clone()))
            .collect();
        ready.sort();
        let ready: Vec<PathBuf> = ready.into_iter().map(|(_, p)| p).collect();
        for p in ready {
            // Re-stat: ingest_path restarts the clock if the file changed since it was last seen.
            self.ingest_path(&p, false);
        }
    }

    fn reject(&mut self, path: &Path, name: &str, explanation: &str) {
        // An invalid file named like a real task must not land beside that task in failed/ or be
        // mistaken for it: it goes to quarantine with the explanation.
        let stem = crate::layout::file_stem(name);
        let clashes = self.in_hand(stem)
            || self.spool.settled_place(stem).is_some()
            || self.sched.pending.get(stem).is_some_and(|p| p.path != path);
        if clashes {
            self.quarantine(
                path,
                name,
                &format!("invalid, and named like existing task {stem}: {explanation}"),
            );
            return;
        }
        let (stored, note) = storable_name(name);
        let text = match &note {
            Some(n) => format!("{explanation}\n{n}\n"),
            None => format!("{explanation}\n"),
        };
        match self.spool.reject(path, &stored, &text) {
            Ok(dst) => {
                console::info(&format!(
                    "rejected   {name}: {} → {}",
                    explanation.lines().next().unwrap_or_default(),
                    self.layout.rel(&dst)
                ));
                self.writer.send(Op::Upsert {
                    row: mirror::rejected_row(&self.spool, &dst, explanation),
                    attempts: vec![],
                });
            }
            Err(e) => console::warn(&format!("cannot reject {name}: {e:#}")),
        }
        self.forget_path(path);
    }

    fn ingest_ready(&mut self, path: &Path, name: &str, sig: (u64, i128, u64)) {
        let (task, bytes) = match task::read_task(path, self.cfg.orchestrator.max_task_bytes) {
            Ok(t) => t,
            Err(e) => {
                if !path.exists() {
                    return;
                }
                // A writer that closes between chunks (`echo >> x.yaml`, a save that truncates, closes
                // and writes again) fires close-write on a half-written file. If it changed within the
                // settle period, let it settle and read it again: only a file that stays invalid after
                // a quiet settle period is rejected (then its mtime is older than `settle_ms`).
                let settle = Duration::from_millis(self.cfg.orchestrator.settle_ms);
                let fresh = std::fs::symlink_metadata(path)
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age < settle);
                if fresh {
                    self.start_settling(path, sig);
                    return;
                }
                self.reject(path, name, &e.render(name));
                return;
            }
        };
        let id = task.id.clone();
        // One id, one task: a second file with a known id is a resurrection or a copy, never run.
        if let Some(other) = self.sched.pending.get(&id).map(|p| p.path.clone())
            && other != path
        {
            self.quarantine(
                path,
                name,
                &format!(
                    "task id {id} is already pending as {}",
                    self.layout.rel(&other)
                ),
            );
            return;
        }
        if self.done.contains_key(&id) && self.spool.settled_place(&id).is_none() {
            // Back from failed/ (`orchestrate retry`) or removed by hand: the tree says it is not
            // finished any more, so neither are we.
            self.done.remove(&id);
            self.completed.retain(|c| c.id != id);
        }
        if self.finishing.contains_key(&id) && !self.running.contains_key(&id) {
            // Its commit is under way off the loop, and this may be `orchestrate retry` putting it
            // back the moment it landed in failed/: look again once the commit is in.
            self.start_settling(path, sig);
            return;
        }
        if self.in_hand(&id) || self.spool.settled_place(&id).is_some() {
            let place = self
                .spool
                .settled_place(&id)
                .map(|p| self.layout.rel(self.spool.dir(p)))
                .unwrap_or_else(|| "the tree".into());
            self.quarantine(path, name, &format!("task id {id} already exists in {place} (re-created by a sync client, git or a re-save?)"));
            return;
        }
        let history = self.spool.read_history(&id).unwrap_or_else(|| History {
            task_id: id.clone(),
            version: 1,
            ..Default::default()
        });
        let not_before = history
            .not_before
            .as_deref()
            .and_then(fsutil::parse_time)
            .map(|t| {
                let left = (t - time::OffsetDateTime::now_utc())
                    .as_seconds_f64()
                    .max(0.0);
                Instant::now() + Duration::from_secs_f64(left.min(86400.0 * 30.0))
            });
        if !task.file.subtasks.is_empty() {
            self.expand_subtasks(&task);
        }
        let is_new = !self.sched.pending.contains_key(&id);
        let seq = match self.sched.pending.get(&id) {
            Some(p) => p.seq,
            None => self.sched.next_seq(),
        };
        let row = mirror::pending_row(&self.spool, &task, path, Some(&history));
        if is_new {
            console::info(&format!(
                "queued     {id}{}",
                if history.attempts.is_empty() {
                    String::new()
                } else {
                    format!(" (after {} attempt(s))", history.attempts.len())
                }
            ));
        } else {
            console::debug(&format!("updated    {id}: file changed while pending"));
        }
        self.writer.send(Op::Upsert {
            row,
            attempts: history.attempts.clone(),
        });
        self.by_path.insert(path.to_path_buf(), id.clone());
        if let Some(t) = not_before {
            self.next_wake = Some(self.next_wake.map_or(t, |w| w.min(t)));
        }
        // New or edited: whatever the router said about an earlier version no longer applies.
        self.routes.remove(&id);
        self.sched.insert(Pending {
            task,
            path: path.to_path_buf(),
            hash: hash_bytes(&bytes),
            sig,
            seq,
            enqueued: Instant::now(),
            history,
            not_before,
            note: None,
        });
        self.cycles_dirty = true;
    }

    fn quarantine(&mut self, path: &Path, name: &str, reason: &str) {
        let (stored, note) = storable_name(name);
        let reason = match &note {
            Some(n) => format!("{reason}\n{n}"),
            None => reason.to_string(),
        };
        match self.spool.quarantine(path, &stored, &reason) {
            Ok(dst) => console::info(&format!(
                "quarantine {name}: {reason} → {}",
                self.layout.rel(&dst)
            )),
            Err(e) => console::warn(&format!("cannot quarantine {name}: {e:#}")),
        }
        self.forget_path(path);
    }

    /// Write a child task per subtask, each depending on the one before. Idempotent: a child that
    /// exists anywhere in the tree is left alone, so a crash mid-way is finished on the next pass.
    fn expand_subtasks(&mut self, parent: &Task) {
        for n in 1..=parent.file.subtasks.len() {
            let id = scheduler::subtask_id(&parent.id, n);
            if self.sched.pending.contains_key(&id)
                || self.spool.settled_place(&id).is_some()
                || self.done.contains_key(&id)
            {
                continue;
            }
            let child = scheduler::subtask_file(parent, n);
            let name = format!("{id}.yaml");
            match fsutil::atomic_create(
                &self.spool.layout().pending,
                &name,
                crate::record::to_yaml(&child, &self.redactor).as_bytes(),
            ) {
                Ok(true) => {
                    let p = self.spool.layout().pending.join(&name);
                    let sig = std::fs::metadata(&p)
                        .map(|m| sig_of(&m))
                        .unwrap_or_default();
                    self.ingest_ready(&p, &name, sig);
                }
                Ok(false) => {}
                Err(e) => console::warn(&format!("cannot write subtask {id}: {e}")),
            }
        }
    }

    // ---- scheduling ------------------------------------------------------------------------------

    fn dep_state(&self, id: &str) -> DepState {
        if let Some(t) = self.done.get(id) {
            return match t {
                Terminal::Completed => DepState::Completed,
                Terminal::Failed => DepState::Failed,
            };
        }
        if self.in_hand(id) {
            return DepState::Running;
        }
        if self.sched.pending.contains_key(id) {
            return DepState::Pending;
        }
        // Finished or claimed by another supervisor sharing the tree.
        match self.spool.settled_place(id) {
            Some(Place::Completed) => DepState::Completed,
            Some(Place::Failed) => DepState::Failed,
            Some(Place::Assigned) => DepState::Running,
            Some(Place::Pending) => DepState::Pending,
            None => DepState::Missing,
        }
    }

    fn schedule(&mut self) {
        if self.shutting_down {
            return;
        }
        if self.cycles_dirty && self.sched.has_edges() {
            self.cycles_dirty = false;
            for (id, cycle) in self.sched.cycles() {
                self.fail_pending(&id, &format!("dependency cycle: {cycle}"));
            }
        }
        // Which agents can run, refreshed at most once a second: a PATH lookup per agent on every
        // pass would be the scheduler's main cost in a burst, and installs are not that quick.
        let fresh = self
            .unavailable
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < Duration::from_secs(1));
        if !fresh {
            let mut map = HashMap::new();
            for (name, a) in &self.cfg.agents {
                if let Some(r) = agents::unavailable_reason(name, a) {
                    map.insert(name.clone(), r);
                }
            }
            self.unavailable = Some((Instant::now(), map));
        }
        // A handful of entries: cloning is cheaper than fighting the borrow of `self` below.
        let mut unavailable = self
            .unavailable
            .as_ref()
            .map(|(_, m)| m.clone())
            .unwrap_or_default();
        let now = Instant::now();
        let wall = time::OffsetDateTime::now_utc();
        for (agent, c) in self.cooldowns.active(wall) {
            unavailable.entry(agent.to_string()).or_insert_with(|| {
                format!(
                    "agent {agent}: cooling down until {} ({})",
                    c.until,
                    c.outcome.as_str()
                )
            });
        }

        let cfg = self.cfg.clone();
        // A full pass looks at every pending task (wait notes, back-off wake-ups); otherwise the pass
        // ends once every slot is taken, so a long queue costs nothing while agents are busy.
        let full = std::mem::take(&mut self.full_pass_due);
        if !full && self.running.len() >= cfg.orchestrator.max_concurrent {
            return;
        }
        if full {
            self.next_wake = None;
        }
        if let Some(d) = self.cooldowns.next_end(wall) {
            // Wake when the first cooldown ends, so the tasks waiting for it are looked at again.
            let t = now + d;
            self.next_wake = Some(self.next_wake.map_or(t, |w| w.min(t)));
        }
        let order = self.sched.take_order(&cfg, now);
        for entry in &order {
            if !full && self.running.len() >= cfg.orchestrator.max_concurrent {
                break;
            }
            let id = &entry.2;
            let Some(p) = self.sched.pending.get(id).filter(|p| p.seq == entry.1) else {
                continue;
            };
            if full && let Some(t) = p.not_before.filter(|t| *t > now) {
                self.next_wake = Some(self.next_wake.map_or(t, |w| w.min(t)));
            }
            let cap = Capacity {
                running_total: self.running.len(),
                running_per_agent: &self.per_agent,
                unavailable: &unavailable,
            };
            let routed = self.routes.get(id).and_then(Option::as_ref);
            let decision = scheduler::decide(&cfg, p, now, &cap, &|d| self.dep_state(d), routed);
            match decision {
                Decision::Route => self.ask_router(id),
                Decision::Run { agent, because } => self.start(id, &agent, &because),
                Decision::CompleteParent => self.complete_parent(id),
                Decision::Fail(reason) => self.fail_pending(id, &reason),
                Decision::Wait(reason) => {
                    let p = self
                        .sched
                        .pending
                        .get_mut(id)
                        .expect("present: looked up above");
                    if p.note.as_deref() != Some(reason.as_str()) {
                        console::debug(&format!("waiting    {id}: {reason}"));
                        p.note = Some(reason.clone());
                        self.writer.send(Op::Note {
                            id: id.clone(),
                            note: Some(reason),
                        });
                    }
                }
            }
        }
        self.sched.put_order(order);
    }

    /// Ask the router about a task, once; it waits with a note until the answer comes.
    fn ask_router(&mut self, id: &str) {
        if self.routes.contains_key(id) {
            return;
        }
        let Some(p) = self.sched.pending.get_mut(id) else {
            return;
        };
        let router = self
            .cfg
            .routing
            .router
            .as_ref()
            .map(|r| r.agent.clone())
            .unwrap_or_default();
        // A burst of unrouted tasks must not become a burst of requests to one local model.
        let asking = self.routes.values().filter(|r| r.is_none()).count();
        if asking >= self.cfg.orchestrator.max_concurrent.max(1) {
            let note =
                format!("waiting to ask the router ({router}): {asking} questions outstanding");
            if p.note.as_deref() != Some(note.as_str()) {
                p.note = Some(note.clone());
                self.writer.send(Op::Note {
                    id: id.to_string(),
                    note: Some(note),
                });
            }
            return;
        }
        let note = format!("asking the router ({router}) which agent fits");
        p.note = Some(note.clone());
        self.writer.send(Op::Note {
            id: id.to_string(),
            note: Some(note),
        });
        self.routes.insert(id.to_string(), None);
        let (cfg, task, tx) = (self.cfg.clone(), p.task.clone(), self.route_tx.clone());
        let id = id.to_string();
        // Its own small runtime on a blocking thread: the HTTP client's stream is not `Send`.
        tokio::task::spawn_blocking(move || {
            let routed = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(router::route(&cfg, &task)),
                Err(e) => Routed {
                    agent: None,
                    because: format!("router not asked ({e}); routing.fallback"),
                },
            };
            let _ = tx.send((id, routed));
        });
    }

    fn on_routed(&mut self, id: String, routed: Routed) {
        if routed.agent.is_none() {
            console::warn(&format!("router     {id}: {}", routed.because));
        } else {
            console::debug(&format!("router     {id}: {}", routed.because));
        }
        // Only for tasks still waiting for it; one that left pending meanwhile is forgotten.
        if self.sched.pending.contains_key(&id) {
            self.routes.insert(id, Some(routed));
            self.full_pass_due = true;
        } else {
            self.routes.remove(&id);
        }
    }

    fn claim_record(&self, p: &Pending, agent: &str, because: &str) -> Claim {
        let now = fsutil::now_rfc3339();
        Claim {
            task_id: p.task.id.clone(),
            version: p.history.version + 1,
            host: self.me.host.clone(),
            pid: self.me.pid,
            boot_id: self.me.boot_id.clone(),
            instance: self.me.id.clone(),
            attempt: p.history.attempts.len() as u32 + 1,
            agent: agent.to_string(),
            started_at: now.clone(),
            heartbeat_at: now,
            history: p.history.attempts.clone(),
            chosen_because: Some(because.to_string()),
        }
    }

    /// Start a pending task: the attempt's own task claims it (the rename, the claim record and
    /// their fsyncs run there, beside other claims and commits), then runs the agent.
    fn start(&mut self, id: &str, agent: &str, because: &str) {
        let Some(p) = self.sched.remove(id) else {
            return;
        };
        self.by_path.remove(&p.path);
        self.cycles_dirty = true;
        self.claiming.insert(p.path.clone());
        let claim = self.claim_record(&p, agent, because);
        // A retry asks again: the answer may differ once an agent has failed it.
        self.routes.remove(id);
        let (stop_tx, stop_rx) = watch::channel(None);
        *self.per_agent.entry(agent.to_string()).or_default() += 1;
        let ctx = AttemptCtx {
            cfg: self.cfg.clone(),
            layout: self.layout.clone(),
            redactor: self.redactor.clone(),
        };
        self.starts += 1;
        let job = ClaimJob {
            start: self.starts,
            spool: self.spool.clone(),
            src: p.path.clone(),
            hash: p.hash,
            writer: self.writer.clone(),
            row: mirror::running_row(&self.spool, &p.task, &claim),
            because: because.to_string(),
            claimed: self.claimed_tx.clone(),
        };
        let task = p.task.clone();
        let c = claim.clone();
        let handle = self
            .attempts
            .spawn(async move { run_attempt(ctx, job, task, c, stop_rx).await });
        self.attempt_ids.insert(handle.id(), id.to_string());
        self.running.insert(
            id.to_string(),
            Running {
                task: p.task,
                claim,
                stop: stop_tx,
                cancelling: false,
                path: p.path,
                start: self.starts,
                claimed: false,
            },
        );
        self.state_dirty = true;
    }

    /// The attempt's task holds the claim now: the file has left `pending/`.
    fn on_claimed(&mut self, id: &str, start: u64) {
        if let Some(r) = self.running.get_mut(id).filter(|r| r.start == start) {
            r.claimed = true;
            self.claiming.remove(&r.path);
        }
    }

    /// This claim's record is in `assigned/`: the claim got at least that far.
    fn claim_on_disk(&self, claim: &Claim) -> bool {
        self.spool
            .read_claim(&claim.task_id)
            .is_some_and(|c| c.instance == claim.instance && c.version == claim.version)
    }

    /// The claim of `task` from `path` did not give us the task (see [`Claimed`]); nothing ran.
    fn on_unclaimed(
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
                let _ = std::fs::remove_file(self.spool.history_path(&id));
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

    fn complete_parent(&mut self, id: &str) {
        let Some(p) = self.sched.remove(id) else {
            return;
        };
        self.by_path.remove(&p.path);
        self.cycles_dirty = true;
        let claim = self.claim_record(&p, "-", "all subtasks completed");
        // Rare and quick (no agent runs): claimed on the loop.
        match claim_task(&self.spool, &p.path, &claim, p.hash, None) {
            Claimed::Ours => {}
            how => {
                self.on_unclaimed(&p.task, &claim, &p.path, false, how);
                return;
            }
        }
        let mut text = String::new();
        for i in 1..=p.task.file.subtasks.len() {
            let child = scheduler::subtask_id(id, i);
            if let Ok(t) = std::fs::read_to_string(self.layout.output_path(&child)) {
                text.push_str(&t);
                text.push('\n');
            }
        }
        let header = context::OutputHeader {
            task: &p.task,
            agent: "-",
            attempt: claim.attempt,
            duration: Duration::ZERO,
            exit: "all subtasks completed".into(),
        };
        let output = context::write_output(&self.layout, &header, &text, &self.redactor).ok();
        let result = TaskResult {
            task_id: id.to_string(),
            status: Terminal::Completed,
            version: claim.version + 1,
            agent: None,
            description: p.task.file.description.clone(),
            finished_at: fsutil::now_rfc3339(),
            attempts: claim.history.clone(),
            output_file: output.map(|o| self.layout.rel(&o)),
            diff_file: None,
            files_modified: vec![],
            review_required: false,
            review_files: vec![],
            error: None,
            chosen_because: Some("all subtasks completed".into()),
        };
        self.commit_terminal(&p.task, result);
    }

    /// Fail a pending task without running it.
    fn fail_pending(&mut self, id: &str, reason: &str) {
        self.routes.remove(id);
        let Some(p) = self.sched.remove(id) else {
            return;
        };
        self.by_path.remove(&p.path);
        self.cycles_dirty = true;
        let result = TaskResult::failed(
            id,
            p.history.version + 1,
            &p.task.file.description,
            p.history.attempts.clone(),
            reason.to_string(),
        );
        match self.spool.fail_pending(&p.path, &result) {
            Ok(true) => {
                console::info(&format!("failed     {id}: {reason}"));
                self.writer.send(Op::Upsert {
                    row: mirror::terminal_row(&self.spool, &result, Some(&p.task)),
                    attempts: result.attempts.clone(),
                });
                self.done.insert(id.to_string(), Terminal::Failed);
                self.state_dirty = true;
            }
            Ok(false) => {}
            Err(e) => console::error(&format!("cannot fail {id}: {e:#}")),
        }
    }

    // ---- completion ------------------------------------------------------------------------------

    fn on_report(&mut self, r: Report) {
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
    fn on_attempt_crash(&mut self, e: tokio::task::JoinError) {
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

    /// Running, or finishing: the task is ours and out of `pending/`.
    fn in_hand(&self, id: &str) -> bool {
        self.running.contains_key(id) || self.finishing.contains_key(id)
    }

    /// Hand the result to a blocking thread that commits it; `on_committed` takes it from there.
    fn commit_terminal(&mut self, task: &Task, result: TaskResult) {
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

    fn on_committed(&mut self, done: Result<Committed, tokio::task::JoinError>) {
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
        let _ = std::fs::remove_file(self.layout.cancel_dir().join(&id));
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

    fn requeue(&mut self, task: &Task, history: History, why: &str) {
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

    // ---- housekeeping ----------------------------------------------------------------------------

    fn heartbeat(&mut self) {
        for r in self.running.values().filter(|r| r.claimed) {
            if let Err(e) = self.spool.heartbeat(&r.claim) {
                console::warn(&format!("heartbeat for {} failed: {e:#}", r.claim.task_id));
            }
        }
        self.writer.send(Op::Supervisor {
            instance: self.me.id.clone(),
            pid: self.me.pid,
            started_at: self.me.started_at.clone(),
            heartbeat_at: fsutil::now_rfc3339(),
            alive: true,
        });
    }

    /// `orchestrate cancel` leaves `state_dir/cancel/<id>` and sends SIGUSR1. The request stays
    /// until the task is in `failed/`: a supervisor that dies before then finds it again at its next
    /// start, when recovery has put the task back in `pending/`, and cancels it there.
    fn check_cancels(&mut self) {
        let dir = self.layout.cancel_dir();
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if let Some(r) = self.running.get_mut(&id) {
                if !r.cancelling {
                    console::info(&format!("cancelling {id}"));
                    r.cancelling = true;
                    let _ = r.stop.send(Some(Stop::Cancel));
                }
            } else if self.sched.pending.contains_key(&id) {
                self.fail_pending(&id, "cancelled by user");
                let _ = std::fs::remove_file(e.path());
            } else if !self.finishing.contains_key(&id)
                && matches!(
                    self.spool.settled_place(&id),
                    Some(Place::Completed | Place::Failed)
                )
            {
                // Finished, cancelled or not: nothing left to cancel.
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    fn write_state_files(&mut self) {
        self.state_dirty = false;
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        counts.insert("pending", self.sched.pending.len());
        // A finishing task is still running as far as anyone reading the tree can tell.
        counts.insert("running", self.running.len() + self.finishing.len());
        let (mut c, mut f) = (0, 0);
        for t in self.done.values() {
            match t {
                Terminal::Completed => c += 1,
                Terminal::Failed => f += 1,
            }
        }
        counts.insert("completed", c);
        counts.insert("failed", f);
        let running: Vec<(String, String, String)> = self
            .running
            .values()
            .map(|r| {
                (
                    r.claim.task_id.clone(),
                    r.claim.agent.clone(),
                    r.claim.started_at.clone(),
                )
            })
            .collect();
        if let Err(e) = context::write_state_files(
            &self.layout,
            &self.completed,
            &counts,
            &running,
            &self.redactor,
        ) {
            console::warn(&format!("cannot write context state files: {e:#}"));
        }
    }
}

#[derive(Clone)]
struct AttemptCtx {
    cfg: Arc<Config>,
    layout: Layout,
    redactor: Arc<Redactor>,
}

/// What an attempt needs to claim its task before it runs.
struct ClaimJob {
    start: u64,
    spool: Spool,
    src: PathBuf,
    hash: u64,
    writer: Writer,
    /// The mirror's row for the running task, sent once the claim is durable.
    row: mirror::TaskRow,
    because: String,
    claimed: mpsc::UnboundedSender<(String, u64)>,
}

/// Claim `src` as `claim.task_id`, then check that the file is the one that was parsed (`hash`): a
/// writer still appending would otherwise run half a task. A `Changed` or `Stopping` task is left in
/// `assigned/` under the claim, for the loop to put back.
fn claim_task(
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
    let now_bytes = std::fs::read(spool.task_path(Place::Assigned, id)).unwrap_or_default();
    if hash_bytes(&now_bytes) != hash {
        return Claimed::Changed;
    }
    if stop.is_some_and(|s| s.borrow().is_some()) {
        return Claimed::Stopping;
    }
    // Only now is the history carried by the claim alone.
    let _ = std::fs::remove_file(spool.history_path(id));
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
    snapshot: crate::snapshot::Snapshot,
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
    let prepared = prepare(ctx, task, claim).map(|(workdir, prompt, prompt_file)| {
        let snapshot = crate::snapshot::Snapshot::take(&workdir, &ctx.layout, &ctx.cfg);
        Box::new(Prepared {
            workdir,
            prompt,
            prompt_file,
            snapshot,
        })
    });
    Begun::Ready {
        started_at,
        t0,
        prepared,
    }
}

/// One attempt, start to end: claim, prompt, snapshot, run, diff, output. The claim is its only
/// move in the spool; the loop makes every later one.
async fn run_attempt(
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
            // A bug of ours: `on_attempt_crash` looks at the claim record to decide what ran.
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
        snapshot,
    } = match prepared {
        Ok(v) => *v,
        Err(e) => {
            attempt.error = Some(ctx.redactor.redact(&format!("{e:#}")));
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
        workdir: &workdir,
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
    let (text_file, diff_file, files_modified) = {
        let (layout, redactor, task, agent) = (
            ctx.layout.clone(),
            ctx.redactor.clone(),
            task.clone(),
            claim.agent.clone(),
        );
        let (attempt_n, duration) = (claim.attempt, exit.duration);
        let text = std::mem::take(&mut parsed.text);
        tokio::task::spawn_blocking(move || {
            let diff = snapshot.diff();
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
            let diff_file = context::write_diff(&layout, &task.id, &diff.text, &redactor)
                .map_err(|e| console::warn(&format!("cannot write diff of {}: {e:#}", task.id)))
                .ok();
            (text_file, diff_file, diff.files)
        })
        .await
        .unwrap_or_else(|e| {
            // A bug of ours, after the agent ran: keep its outcome rather than run it again.
            console::error(&format!("diff or output of {} failed: {e}", report.id));
            (None, None, vec![])
        })
    };
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
    for f in &parsed.files_reported {
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
    std::fs::create_dir_all(prompt_file.parent().expect("has parent"))?;
    // A copy for people to read; it is rebuilt from the task for every attempt, so no fsync.
    fsutil::atomic_write_derived(&prompt_file, prompt.as_bytes())
        .context("cannot write the prompt file")?;
    Ok((workdir, prompt, prompt_file))
}
