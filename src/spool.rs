//! The spool: the directory state machine that is the single source of truth.
//!
//! # Theory of operation
//!
//! A task is wherever its file is. `pending/` holds work nobody owns; `assigned/X.yaml` with its
//! `X.claim.yaml` is owned by the instance the claim names; `completed/` and `failed/` are terminal and
//! hold `X_result.yaml` beside the task. Every transition is one `rename` (atomic on one file system),
//! preceded by whatever record must already exist when the rename becomes visible:
//!
//! * claim:   [lock] rename pending → assigned, write the claim [unlock], fsync both dirs; the agent
//!   starts only after the fsyncs
//! * finish:  write the result (temp, fsync, rename), rename the task beside it, remove the claim
//! * requeue: [lock] write `pending/.X.history.yaml`, rename assigned → pending, remove the claim [unlock]
//!
//! The spool lock (`state_dir/spool.lock`) covers only the steps that would otherwise leave a window
//! where a task sits in `assigned/` without a claim; recovery takes the same lock, so a task without a
//! claim can only mean a claimer that died. Each running instance holds an exclusive lock on its own
//! file under `state_dir/instances/`; a claim whose instance lock is free (or whose boot id changed)
//! belongs to a dead supervisor and is recovered. A live owner is never robbed. The supervisor's loop
//! only ever tries the lock (`requeue`, `unclaim`, `recover` fail at once when it is busy, and the
//! caller tries again later), so a peer stopped while holding it cannot freeze it; a claim, on its
//! blocking thread, and the commands wait a bounded while.
//!
//! This module never runs agents and never talks to the mirror; it returns what it did.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::failpoint;
use crate::fsutil::{self, atomic_write, fsync_dir, move_unique, rename_noreplace};
use crate::instance::Instance;
use crate::layout::{Layout, file_stem};
use crate::marker;
use crate::record::{self, Attempt, Claim, History, Outcome, TaskResult, Terminal};
use crate::redact::Redactor;
use crate::task;

/// The spool of one project: its folders and the redactor its records go through.
#[derive(Debug, Clone)]
pub struct Spool {
    layout: Layout,
    redactor: Redactor,
}

/// One of our records, if it reads: a regular file (a FIFO in its place must not hang the reader)
/// of at most [`record::MAX_RECORD_BYTES`], parsed with the budgets for records.
fn read_record<T: for<'de> serde::Deserialize<'de>>(path: &Path) -> Option<T> {
    use std::io::Read;
    let mut text = String::new();
    fsutil::open_regular(path)
        .ok()?
        .take(record::MAX_RECORD_BYTES + 1)
        .read_to_string(&mut text)
        .ok()?;
    if text.len() as u64 > record::MAX_RECORD_BYTES {
        return None;
    }
    record::from_yaml(&text).ok()
}

/// Where a task id currently lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Pending,
    Assigned,
    Completed,
    Failed,
}

impl Place {
    pub fn state(self) -> &'static str {
        match self {
            Place::Pending => "pending",
            Place::Assigned => "running",
            Place::Completed => "completed",
            Place::Failed => "failed",
        }
    }
}

/// Held while the spool lock is taken; dropping it unlocks.
pub struct SpoolLock(#[allow(dead_code)] File);

/// How long the supervisor's loop waits for the spool lock: not at all.
pub const NO_WAIT: Duration = Duration::ZERO;
/// How long a blocking thread (a claim) or a command (`retry`) waits for it.
pub const WAIT: Duration = Duration::from_secs(10);

impl Spool {
    pub fn new(layout: &Layout, redactor: Redactor) -> Spool {
        Spool {
            layout: layout.clone(),
            redactor,
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    fn write_reason(&self, file: &Path, reason: &str) -> Result<()> {
        let reason = self.redactor.redact(reason);
        atomic_write(&Layout::reason_path(file), format!("{reason}\n").as_bytes())?;
        Ok(())
    }

    /// One of our records as YAML, secrets redacted.
    fn yaml<T: record::Record>(&self, record: &T) -> String {
        record::to_yaml(record, &self.redactor)
    }

    pub fn ensure_dirs(&self) -> Result<()> {
        for d in self.layout.spool_dirs() {
            fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        fs::create_dir_all(self.layout.instances_dir())
            .with_context(|| format!("cannot create {}", self.layout.state_dir.display()))?;
        Ok(())
    }

    /// Rename is atomic only within one file system; a spool split across mounts could lose tasks.
    pub fn check_same_fs(&self) -> Result<()> {
        let first = fsutil::device_of(&self.layout.pending)?;
        for d in self
            .layout
            .spool_dirs()
            .into_iter()
            .skip(1)
            .chain([self.layout.state_dir.as_path()])
        {
            if fsutil::device_of(d)? != first {
                bail!(
                    "{} is on a different file system from {}: renames between them would not be atomic; \
                     keep tasks/ and the state directory on one file system",
                    d.display(),
                    self.layout.pending.display()
                );
            }
        }
        Ok(())
    }

    /// Take the spool lock, waiting at most `wait` for another holder to let go. The supervisor's
    /// loop never waits (`NO_WAIT`): a peer that is stopped (SIGSTOP, a debugger, a laptop lid)
    /// while it holds the lock must not freeze it; what it could not do is tried again later.
    /// Blocking threads and commands wait a bounded while (`WAIT`), then fail saying why.
    pub fn lock_within(&self, wait: Duration) -> io::Result<SpoolLock> {
        let path = self.layout.spool_lock();
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        let deadline = std::time::Instant::now() + wait;
        let mut pause = Duration::from_millis(1);
        loop {
            match f.try_lock() {
                Ok(()) => return Ok(SpoolLock(f)),
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
                Err(std::fs::TryLockError::WouldBlock) => {}
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "the spool lock {} is held by another supervisor (busy, or stopped while holding it)",
                        path.display()
                    ),
                ));
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    pub fn dir(&self, place: Place) -> &Path {
        match place {
            Place::Pending => &self.layout.pending,
            Place::Assigned => &self.layout.assigned,
            Place::Completed => &self.layout.completed,
            Place::Failed => &self.layout.failed,
        }
    }

    pub fn task_path(&self, place: Place, id: &str) -> PathBuf {
        Layout::task_file(self.dir(place), id)
    }

    pub fn claim_path(&self, id: &str) -> PathBuf {
        self.layout.claim_path(id)
    }

    pub fn result_path(&self, t: Terminal, id: &str) -> PathBuf {
        Layout::result_file(self.dir(terminal_place(t)), id)
    }

    pub fn history_path(&self, id: &str) -> PathBuf {
        self.layout.history_path(id)
    }

    /// Where the task with this id is outside `pending/` (pending files may have any name; the
    /// scheduler knows those). Checks the tree itself, so it sees other supervisors' work too.
    pub fn settled_place(&self, id: &str) -> Option<Place> {
        [Place::Assigned, Place::Completed, Place::Failed]
            .into_iter()
            .find(|&p| self.task_path(p, id).exists())
    }

    pub fn read_claim(&self, id: &str) -> Option<Claim> {
        read_record(&self.claim_path(id))
    }

    pub fn read_result(&self, t: Terminal, id: &str) -> Option<TaskResult> {
        read_record(&self.result_path(t, id))
    }

    pub fn read_history(&self, id: &str) -> Option<History> {
        read_record(&self.history_path(id))
    }

    /// Claim `src` (a file in `pending/`) as task `id`. Returns `false` when someone else took it first.
    pub fn claim(&self, src: &Path, claim: &Claim) -> Result<bool> {
        let id = &claim.task_id;
        let lock = self.lock_within(WAIT)?;
        let dst = self.task_path(Place::Assigned, id);
        failpoint::hit("claim.before_rename");
        match rename_noreplace(src, &dst) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e).with_context(|| format!("cannot claim {}", src.display())),
        }
        failpoint::hit("claim.after_rename");
        if let Err(e) =
            fsutil::atomic_write_before_commit(&self.claim_path(id), self.yaml(claim).as_bytes())
        {
            // Disk full, say: no claim may be left without its record, so the task goes back.
            let _ = rename_noreplace(&dst, src);
            return Err(e).with_context(|| format!("cannot write claim for {id}"));
        }
        failpoint::hit("claim.after_record");
        // Other supervisors need only see the record, so the lock ends here; the directory fsyncs
        // after it are shared with the claims and commits running beside this one.
        drop(lock);
        fsync_dir(&self.layout.assigned)?;
        fsync_dir(&self.layout.pending)?;
        failpoint::hit("claim.after_fsync");
        // The history sidecar stays until the caller has checked the claimed file: an unclaim must
        // not lose it.
        Ok(true)
    }

    /// Remove the history sidecar of `id`: its claim carries the history now (or the task ends).
    pub fn drop_history(&self, id: &str) {
        let _ = fs::remove_file(self.history_path(id));
    }

    /// The bytes of a task file just claimed, to check it is the file that was parsed.
    pub fn read_assigned(&self, id: &str) -> io::Result<Vec<u8>> {
        fs::read(self.task_path(Place::Assigned, id))
    }

    /// Drop a new task file into `pending/` as `name`; `false` when that name is taken.
    pub fn add_pending(&self, name: &str, bytes: &[u8]) -> io::Result<bool> {
        fsutil::atomic_create(&self.layout.pending, name, bytes)
    }

    /// The files in `quarantine/` (not their `.reason.txt`), oldest first.
    pub fn quarantined(&self) -> Vec<PathBuf> {
        let Ok(rd) = fs::read_dir(&self.layout.quarantine) else {
            return vec![];
        };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = rd
            .flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                !n.ends_with(".reason.txt") && !n.starts_with('.')
            })
            .filter_map(|e| Some((e.metadata().and_then(|m| m.modified()).ok()?, e.path())))
            .collect();
        files.sort();
        files.into_iter().map(|(_, p)| p).collect()
    }

    /// Ask the supervisor that runs `id` to cancel it (`orchestrate cancel`, which then signals it).
    pub fn request_cancel(&self, id: &str) -> Result<()> {
        fs::create_dir_all(self.layout.cancel_dir())?;
        atomic_write(&self.layout.cancel_request(id), b"")?;
        Ok(())
    }

    /// Ids with a cancel request: `orchestrate cancel` leaves `state_dir/cancel/<id>`, and the
    /// request stays until the task is terminal.
    pub fn cancel_requests(&self) -> Vec<String> {
        let Ok(rd) = fs::read_dir(self.layout.cancel_dir()) else {
            return vec![];
        };
        rd.flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// The cancel request for `id` is answered (or moot).
    pub fn drop_cancel_request(&self, id: &str) {
        let _ = fs::remove_file(self.layout.cancel_request(id));
    }

    /// Put a just-claimed file back under its original name (it changed after we read it).
    pub fn unclaim(&self, id: &str, original: &Path) -> Result<()> {
        let _lock = self.lock_within(NO_WAIT)?;
        rename_noreplace(&self.task_path(Place::Assigned, id), original)
            .with_context(|| format!("cannot return {id} to pending"))?;
        let _ = fs::remove_file(self.claim_path(id));
        fsync_dir(&self.layout.assigned)?;
        fsync_dir(&self.layout.pending)?;
        Ok(())
    }

    pub fn heartbeat(&self, claim: &Claim) -> Result<()> {
        // The claim may be gone already if the task just finished; then there is nothing to refresh.
        if self.claim_path(&claim.task_id).exists() {
            let mut c = claim.clone();
            c.heartbeat_at = fsutil::now_rfc3339();
            atomic_write(&self.claim_path(&c.task_id), self.yaml(&c).as_bytes())?;
        }
        Ok(())
    }

    /// Write the result, then move the task beside it: the task's rename is the commit point.
    pub fn finish(&self, result: &TaskResult) -> Result<()> {
        let id = &result.task_id;
        let place = terminal_place(result.status);
        failpoint::hit("finish.before_result");
        // The task's rename into the same directory fsyncs it, making both names durable at once.
        fsutil::atomic_write_before_commit(
            &self.result_path(result.status, id),
            self.yaml(result).as_bytes(),
        )
        .with_context(|| format!("cannot write result for {id}"))?;
        failpoint::hit("finish.after_result");
        self.move_beside_result(id, place)
    }

    fn move_beside_result(&self, id: &str, place: Place) -> Result<()> {
        let from = self.task_path(Place::Assigned, id);
        let to = self.task_path(place, id);
        match rename_noreplace(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // A task with this id already finished (it was resurrected and slipped past the
                // duplicate check on another host): keep both, never overwrite.
                let q = move_unique(&from, &self.layout.quarantine, &format!("{id}.yaml"))?;
                self.write_reason(
                    &q,
                    &format!(
                        "task {id} finished twice; the earlier copy is in {}",
                        to.display()
                    ),
                )?;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot move {id} to {}", place.state()));
            }
        }
        failpoint::hit("finish.after_rename");
        fsync_dir(self.dir(place))?;
        fsync_dir(&self.layout.assigned)?;
        failpoint::hit("finish.after_fsync");
        let _ = fs::remove_file(self.claim_path(id));
        Ok(())
    }

    /// Move a running task back to `pending/` carrying its history (retry, interrupted, recovered).
    pub fn requeue(&self, history: &History) -> Result<()> {
        let _lock = self.lock_within(NO_WAIT)?;
        self.requeue_locked(history, "already taken by a task in assigned/")
    }

    /// `requeue` under the spool lock; `taken` says why a newcomer under the same name is the
    /// duplicate.
    fn requeue_locked(&self, history: &History, taken: &str) -> Result<()> {
        let id = &history.task_id;
        atomic_write(&self.history_path(id), self.yaml(history).as_bytes())?;
        failpoint::hit("requeue.after_history");
        let from = self.task_path(Place::Assigned, id);
        let to = self.task_path(Place::Pending, id);
        match rename_noreplace(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Someone dropped a new file with this name meanwhile (sync, git); theirs is the
                // duplicate, ours has history.
                let q = move_unique(&to, &self.layout.quarantine, &format!("{id}.yaml"))?;
                self.write_reason(&q, &format!("task id {id} was {taken}"))?;
                rename_noreplace(&from, &to)?;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot requeue {id}")),
        }
        failpoint::hit("requeue.after_rename");
        fsync_dir(&self.layout.pending)?;
        fsync_dir(&self.layout.assigned)?;
        let _ = fs::remove_file(self.claim_path(id));
        Ok(())
    }

    /// Write a terminal task's result again (its kept branch was merged or discarded later). The
    /// task stays where it is; only its record changes.
    pub fn rewrite_result(&self, result: &TaskResult) -> Result<()> {
        atomic_write(
            &self.result_path(result.status, &result.task_id),
            self.yaml(result).as_bytes(),
        )?;
        Ok(())
    }

    /// Keep a finished attempt's result in the state directory while `tasks/` refuses it.
    pub fn keep_unfinished_result(&self, result: &TaskResult) -> Result<()> {
        fs::create_dir_all(self.layout.unfinished_dir())?;
        atomic_write(
            &self.layout.unfinished_result(&result.task_id),
            self.yaml(result).as_bytes(),
        )?;
        Ok(())
    }

    /// Keep a requeue's history in the state directory while `tasks/` refuses it.
    pub fn keep_unfinished_history(&self, history: &History) -> Result<()> {
        fs::create_dir_all(self.layout.unfinished_dir())?;
        atomic_write(
            &self.layout.unfinished_history(&history.task_id),
            self.yaml(history).as_bytes(),
        )?;
        Ok(())
    }

    /// The transition kept for `id` is on disk now.
    pub fn drop_unfinished(&self, id: &str) {
        let _ = fs::remove_file(self.layout.unfinished_result(id));
        let _ = fs::remove_file(self.layout.unfinished_history(id));
    }

    /// Fail a task that never ran from `pending/` (failed dependency, cycle, cancel).
    pub fn fail_pending(&self, src: &Path, result: &TaskResult) -> Result<bool> {
        let id = &result.task_id;
        atomic_write(
            &self.result_path(Terminal::Failed, id),
            self.yaml(result).as_bytes(),
        )?;
        match rename_noreplace(src, &self.task_path(Place::Failed, id)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Claimed by someone else in between: their run wins, our result is void.
                let _ = fs::remove_file(self.result_path(Terminal::Failed, id));
                return Ok(false);
            }
            Err(e) => return Err(e).with_context(|| format!("cannot move {id} to failed")),
        }
        fsync_dir(&self.layout.failed)?;
        fsync_dir(&self.layout.pending)?;
        let _ = fs::remove_file(self.history_path(id));
        Ok(true)
    }

    /// Move a file that is not a valid task to `failed/` with `X.error.txt` beside it.
    pub fn reject(&self, src: &Path, name: &str, explanation: &str) -> Result<PathBuf> {
        let dst = move_unique(src, &self.layout.failed, name)
            .with_context(|| format!("cannot move {} to failed/", src.display()))?;
        fsync_dir(&self.layout.pending)?;
        let err = Layout::error_path(&dst);
        // The explanation quotes the file; the file stays as its author wrote it, the quote does not.
        atomic_write(&err, self.redactor.redact(explanation).as_bytes())?;
        Ok(dst)
    }

    pub fn quarantine(&self, src: &Path, name: &str, reason: &str) -> Result<PathBuf> {
        let dst = move_unique(src, &self.layout.quarantine, name)
            .with_context(|| format!("cannot move {} to quarantine/", src.display()))?;
        fsync_dir(&self.layout.pending)?;
        self.write_reason(&dst, reason)?;
        Ok(dst)
    }

    /// `retry`: move a failed task back to `pending/`, keeping its attempts in the history sidecar.
    pub fn retry(&self, id: &str) -> Result<History> {
        let _lock = self.lock_within(WAIT)?;
        let src = self.task_path(Place::Failed, id);
        if !src.exists() {
            bail!(crate::error::UsageError(format!(
                "task {id} is not in failed/"
            )));
        }
        let result = self.read_result(Terminal::Failed, id);
        let history = History {
            task_id: id.to_string(),
            version: result.as_ref().map(|r| r.version + 1).unwrap_or(2),
            attempts: result.map(|r| r.attempts).unwrap_or_default(),
            not_before: None,
            backoff_seconds: None,
            reason: Some("retried by user".into()),
        };
        atomic_write(&self.history_path(id), self.yaml(&history).as_bytes())?;
        rename_noreplace(&src, &self.task_path(Place::Pending, id))
            .with_context(|| format!("cannot move {id} back to pending"))?;
        fsync_dir(&self.layout.pending)?;
        fsync_dir(&self.layout.failed)?;
        let _ = fs::remove_file(self.result_path(Terminal::Failed, id));
        let _ = fs::remove_file(Layout::error_path(&src));
        Ok(history)
    }

    /// `retry` of a task that waits out a retry back-off in `pending/`: it may run at once. The
    /// history loses its `not_before`, and the task file is written again with the same bytes (a new
    /// inode), so the supervisor reads the file and its history again. Under the spool lock, so a
    /// claim cannot move the file away in between. `false`: the task is not waiting for a back-off.
    pub fn run_now(&self, id: &str) -> Result<bool> {
        let _lock = self.lock_within(WAIT)?;
        let path = self.task_path(Place::Pending, id);
        let Some(mut history) = self.read_history(id) else {
            return Ok(false);
        };
        if history.not_before.is_none() || !path.exists() {
            return Ok(false);
        }
        history.not_before = None;
        history.reason = Some("retried by user: runs now".into());
        atomic_write(&self.history_path(id), self.yaml(&history).as_bytes())?;
        let bytes = fs::read(&path)?;
        atomic_write(&path, &bytes)?;
        Ok(true)
    }

    /// Find claims left by dead supervisors on this host and put their tasks back in a terminal place
    /// or in `pending/`. `max_retries` gives the retry budget of a task (from its file and the config).
    pub fn recover(
        &self,
        me: &Instance,
        max_retries: &dyn Fn(&Path) -> u32,
    ) -> Result<Vec<Recovered>> {
        let _lock = self.lock_within(NO_WAIT)?;
        let mut out = Vec::new();
        let mut claims = Vec::new();
        let mut tasks = Vec::new();
        for entry in fs::read_dir(&self.layout.assigned)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".claim.yaml") {
                claims.push(id.to_string());
            } else if let Some(id) = name.strip_suffix(".yaml")
                && !name.starts_with('.')
            {
                tasks.push(id.to_string());
            }
        }
        // Each task on its own: one that cannot be recovered must not keep the others stuck.
        for id in &tasks {
            match self.recover_one(me, id, max_retries) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => {}
                Err(e) => crate::console::warn(&format!("cannot recover {id}: {e:#}")),
            }
        }
        // Claims whose task is gone: the owner died after moving the task but before removing them.
        for id in claims.iter().filter(|c| !tasks.contains(c)) {
            if let Some(c) = self.read_claim(id)
                && me.owner_alive(&c, &self.layout)
            {
                continue;
            }
            let _ = fs::remove_file(self.claim_path(id));
        }
        // History sidecars whose task left pending/ (claimed by an instance that died before removing it).
        for entry in fs::read_dir(&self.layout.pending)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(id) = name
                .strip_prefix('.')
                .and_then(|n| n.strip_suffix(".history.yaml"))
                && !self.task_path(Place::Pending, id).exists()
                && self.settled_place(id).is_some()
                // A live claimer keeps it until its claim is checked: it may still put the task back.
                && !self
                    .read_claim(id)
                    .is_some_and(|c| me.owner_alive(&c, &self.layout))
            {
                let _ = fs::remove_file(self.layout.pending.join(&name));
            }
        }
        Ok(out)
    }
}

impl Spool {
    /// Rejected files whose explanation was lost to a crash between the move and the write. Only a
    /// crash leaves them, so this runs at start, not with every periodic recovery.
    pub fn repair_rejected(&self) -> Result<()> {
        for entry in fs::read_dir(&self.layout.failed)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !task::is_task_file_name(&name) || name.ends_with("_result.yaml") {
                continue;
            }
            let stem = file_stem(&name);
            if !Layout::result_file(&self.layout.failed, stem).exists()
                && !Layout::error_path(&path).exists()
            {
                let msg = match task::read_task(&path, u64::MAX) {
                    Err(e) => e.render(&name),
                    Ok(_) => format!(
                        "{name}: rejected, but the reason was lost in a crash; run `orchestrate retry {stem}` to run it"
                    ),
                };
                atomic_write(
                    &Layout::error_path(&path),
                    self.redactor.redact(&msg).as_bytes(),
                )?;
            }
        }
        Ok(())
    }

    fn recover_one(
        &self,
        me: &Instance,
        id: &str,
        max_retries: &dyn Fn(&Path) -> u32,
    ) -> Result<Option<Recovered>> {
        let claim = self.read_claim(id);
        let owner_dead = match &claim {
            Some(c) => !me.owner_alive(c, &self.layout),
            // No claim although we hold the spool lock: the claimer died between rename and write,
            // unless the task has just finished (a finish moves the task before it removes the
            // claim, and takes no lock).
            None => self.task_path(Place::Assigned, id).exists(),
        };
        if !owner_dead {
            return Ok(None);
        }
        // Finished but not yet moved: complete the move, never run it again. A result older than
        // the claim is a leftover of an earlier life of the task (retried), not this attempt's.
        let claim_version = claim.as_ref().map(|c| c.version).unwrap_or(0);
        // An outcome its supervisor knew but could not put in `tasks/` (disk full): commit it.
        let kept_result: Option<TaskResult> = fs::read_to_string(self.layout.unfinished_result(id))
            .ok()
            .and_then(|t| record::from_yaml(&t).ok())
            .filter(|r: &TaskResult| r.version > claim_version);
        if let Some(result) = kept_result {
            self.finish(&result)?;
            self.drop_unfinished(id);
            return Ok(Some(Recovered::Finished(id.to_string(), result.status)));
        }
        let kept_history: Option<History> = fs::read_to_string(self.layout.unfinished_history(id))
            .ok()
            .and_then(|t| record::from_yaml(&t).ok())
            .filter(|h: &History| h.version > claim_version);
        if let Some(history) = kept_history {
            self.requeue_locked(&history, "taken by a task being recovered from assigned/")?;
            self.drop_unfinished(id);
            return Ok(Some(Recovered::Requeued(id.to_string())));
        }
        for t in [Terminal::Completed, Terminal::Failed] {
            if self
                .read_result(t, id)
                .is_some_and(|r| r.version > claim_version)
            {
                self.move_beside_result(id, terminal_place(t))?;
                return Ok(Some(Recovered::Finished(id.to_string(), t)));
            }
        }
        let (mut attempts, version) = match &claim {
            Some(c) => (c.history.clone(), c.version + 1),
            None => {
                let h = self.read_history(id).unwrap_or_default();
                (h.attempts, h.version.max(1) + 1)
            }
        };
        if let Some(c) = &claim {
            // Its agent may still be running as an orphan: stop it before anyone can run the task again.
            if c.host == me.host && c.boot_id == me.boot_id {
                let n = marker::kill_marked(&marker::run_marker(&c.instance, id, c.attempt));
                if n > 0 {
                    crate::console::info(&format!(
                        "recovery   {id}: killed {n} process(es) left by the stopped supervisor"
                    ));
                }
            }
            // Orchestrate's own work (no agent ran) is done again at no cost to the task.
            let outcome = if c.agent == record::NO_AGENT {
                Outcome::Interrupted
            } else {
                Outcome::Lost
            };
            attempts.push(Attempt {
                finished_at: Some(fsutil::now_rfc3339()),
                error: Some(format!(
                    "supervisor {} (pid {}) stopped while this attempt ran",
                    c.instance, c.pid
                )),
                ..Attempt::new(c.attempt, &c.agent, &c.started_at, outcome)
            });
        }
        let failures = attempts
            .iter()
            .filter(|a| a.outcome.counts_as_failure())
            .count() as u32;
        let task_path = self.task_path(Place::Assigned, id);
        if failures > max_retries(&task_path) {
            let description = task::read_task(&task_path, u64::MAX)
                .map(|(t, _)| t.file.description)
                .unwrap_or_default();
            let result = TaskResult::failed(
                id,
                version,
                &description,
                attempts,
                "the supervisor stopped during every allowed attempt (max_retries reached)".into(),
            );
            atomic_write(
                &self.result_path(Terminal::Failed, id),
                self.yaml(&result).as_bytes(),
            )?;
            self.move_beside_result(id, Place::Failed)?;
            return Ok(Some(Recovered::Finished(id.to_string(), Terminal::Failed)));
        }
        let history = History {
            task_id: id.to_string(),
            version,
            attempts,
            not_before: None,
            backoff_seconds: None,
            reason: Some("recovered from a stopped supervisor".into()),
        };
        self.requeue_locked(&history, "taken by a task being recovered from assigned/")?;
        Ok(Some(Recovered::Requeued(id.to_string())))
    }
}

pub fn terminal_place(t: Terminal) -> Place {
    match t {
        Terminal::Completed => Place::Completed,
        Terminal::Failed => Place::Failed,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    Requeued(String),
    Finished(String, Terminal),
}
