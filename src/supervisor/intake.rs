//! Intake of `pending/`: noticing task files, waiting until they are whole, reading them into the
//! pending queue, and turning away what must not run: invalid files go to `failed/` with an
//! explanation, conflict copies and second files with a known id to `quarantine/`. A task with
//! subtasks is expanded here into one child task file per subtask.
//!
//! Events are hints, the scan is the truth: the watcher's news is read at once, and a scan lists
//! the whole folder (at start, periodically, after a watcher overflow) and reads it a chunk per
//! loop turn. A file seen only by a scan or by modify events must keep its size, mtime and inode
//! for `settle_ms` before it is read.
//!
//! Owns the pending queue (the scheduler's `Pending` tasks), which file holds which task, the files
//! settling, the scan under way and the files being claimed. It never starts, stops or finishes a
//! task and never changes another part's state: what the others must hear of comes back as
//! `Action`s.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::View;
use super::events::Action;
use crate::console;
use crate::fsutil;
use crate::mirror::{self, Op};
use crate::record::History;
use crate::scheduler::{self, Pending, Scheduler};
use crate::task::{self, Task};

/// (size, mtime in ns, inode): a file that keeps these is unchanged.
type Sig = (u64, i128, u64);

/// A scan of `pending/` in progress: the listing still to read, and what it has read.
struct Scan {
    queue: VecDeque<(PathBuf, std::fs::Metadata)>,
    seen: HashSet<PathBuf>,
}

/// A file in `pending/` that must stay unchanged for the settle period before it is read.
struct Settling {
    sig: Sig,
    since: Instant,
}

/// How many files of a scan's listing are read per loop turn.
const CHUNK: usize = 256;

#[derive(Default)]
pub(super) struct Intake {
    /// The pending tasks; the scheduler decides among them.
    pub(super) queue: Scheduler,
    /// Which pending task each file in `pending/` holds.
    by_path: HashMap<PathBuf, String>,
    settling: HashMap<PathBuf, Settling>,
    scan: Option<Scan>,
    /// `pending/` files being claimed right now: the watcher's and the scan's news of them is ours.
    claiming: HashSet<PathBuf>,
    /// The pending set changed since dependency cycles were last looked for.
    cycles_dirty: bool,
}

fn sig_of(m: &std::fs::Metadata) -> Sig {
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

impl Intake {
    pub(super) fn new() -> Intake {
        Intake {
            cycles_dirty: true,
            ..Default::default()
        }
    }

    pub(super) fn is_settling(&self) -> bool {
        !self.settling.is_empty()
    }

    pub(super) fn is_scanning(&self) -> bool {
        self.scan.is_some()
    }

    /// `path` is being claimed: news of it is ours until `release`.
    pub(super) fn hold(&mut self, path: &Path) {
        self.claiming.insert(path.to_path_buf());
    }

    pub(super) fn release(&mut self, path: &Path) {
        self.claiming.remove(path);
    }

    /// Take `id` out of the queue (to start it, finish it without an agent, or fail it).
    pub(super) fn take(&mut self, id: &str) -> Option<Pending> {
        let p = self.queue.remove(id)?;
        self.by_path.remove(&p.path);
        self.cycles_dirty = true;
        Some(p)
    }

    /// Whether to look for dependency cycles now: the queue changed and has edges.
    pub(super) fn cycles_due(&mut self) -> bool {
        let due = self.cycles_dirty && self.queue.has_edges();
        if due {
            self.cycles_dirty = false;
        }
        due
    }

    /// A claimed file went back to `pending/`: read it again once it has settled.
    pub(super) fn settle(&mut self, path: &Path) {
        self.start_settling(path, (0, 0, 0));
    }

    /// The scan is the truth: take a listing of `pending/` to look at every file in it (a chunk per
    /// loop turn, `scan_chunk`, so a backlog of 100,000 files does not hold up the attempts that
    /// finish meanwhile) and, at its end, forget tasks whose file is gone. `false`: no listing.
    pub(super) fn rescan(&mut self, view: &View) -> bool {
        let spool = &view.env.spool;
        let rd = match std::fs::read_dir(&spool.layout().pending) {
            Ok(rd) => rd,
            Err(e) => {
                console::warn(&format!(
                    "cannot list {}: {e}; recreating it",
                    spool.layout().pending.display()
                ));
                let _ = spool.ensure_dirs();
                return false;
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
        true
    }

    /// Read the next chunk of the scan's listing. Priorities apply among the tasks read so far:
    /// with a huge backlog, work starts while the rest is read.
    #[must_use = "the actions are the rest of the work: apply them"]
    pub(super) fn scan_chunk(&mut self, view: &View) -> Vec<Action> {
        let mut out = vec![];
        let Some(mut scan) = self.scan.take() else {
            return out;
        };
        let settle = Duration::from_millis(view.env.cfg.orchestrator.settle_ms);
        for _ in 0..CHUNK {
            let Some((p, m)) = scan.queue.pop_front() else {
                break;
            };
            scan.seen.insert(p.clone());
            // Unchanged known files need no second look.
            if let Some(id) = self.by_path.get(&p)
                && self.queue.get(id).is_some_and(|pd| pd.sig == sig_of(&m))
            {
                continue;
            }
            // A file nobody has written to for the settle period is as good as closed by its writer.
            let quiet = m
                .modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= settle);
            self.ingest_path(view, &p, quiet, &mut out);
        }
        self.scan = Some(scan);
        out
    }

    /// If the scan has read its whole listing: forget the tasks whose file is gone, and end it.
    #[must_use = "the actions are the rest of the work: apply them"]
    pub(super) fn end_scan(&mut self, view: &View) -> Vec<Action> {
        let mut out = vec![];
        let Some(scan) = self.scan.take_if(|s| s.queue.is_empty()) else {
            return out;
        };
        let seen = scan.seen;
        let gone: Vec<PathBuf> = self
            .by_path
            .keys()
            // Files that arrived after the listing (subtask children, new drops) are not gone.
            .filter(|p| !seen.contains(*p) && !p.exists())
            .cloned()
            .collect();
        for p in gone {
            self.forget_path(view, &p, &mut out);
        }
        self.settling.retain(|p, _| seen.contains(p) || p.exists());
        out
    }

    /// Files that kept still for the settle period are read, oldest first.
    #[must_use = "the actions are the rest of the work: apply them"]
    pub(super) fn settle_tick(&mut self, view: &View) -> Vec<Action> {
        let mut out = vec![];
        let settle = Duration::from_millis(view.env.cfg.orchestrator.settle_ms);
        // Oldest first (mtime, then name): files that settle together keep their arrival order.
        let mut ready: Vec<(i128, PathBuf)> = self
            .settling
            .iter()
            .filter(|(_, s)| s.since.elapsed() >= settle)
            .map(|(p, s)| (s.sig.1, p.clone()))
            .collect();
        ready.sort();
        for (_, p) in ready {
            // Re-stat: ingest_path restarts the clock if the file changed since it was last seen.
            self.ingest_path(view, &p, false, &mut out);
        }
        out
    }

    /// News of a file in `pending/`; `complete`: it arrived whole (renamed in, closed by its writer,
    /// put back by recovery), so it need not settle.
    #[must_use = "the actions are the rest of the work: apply them"]
    pub(super) fn ingest(&mut self, view: &View, path: &Path, complete: bool) -> Vec<Action> {
        let mut out = vec![];
        self.ingest_path(view, path, complete, &mut out);
        out
    }

    /// A requeue has just put `path` back: read it now.
    #[must_use = "the actions are the rest of the work: apply them"]
    pub(super) fn reread(&mut self, view: &View, path: &Path) -> Vec<Action> {
        let mut out = vec![];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let sig = std::fs::metadata(path)
            .map(|m| sig_of(&m))
            .unwrap_or_default();
        self.ingest_ready(view, path, &name, sig, &mut out);
        out
    }

    fn forget_path(&mut self, view: &View, p: &Path, out: &mut Vec<Action>) {
        if let Some(id) = self.by_path.remove(p) {
            // The file may have been claimed (by us, then `Runs` has it) or removed by the user.
            if self.queue.get(&id).is_some_and(|pd| pd.path == p) {
                self.queue.remove(&id);
                self.cycles_dirty = true;
                if !view.in_hand(&id) && view.env.spool.settled_place(&id).is_none() {
                    console::info(&format!("removed    {id}: its file left pending/"));
                    view.env.writer.send(Op::Delete(id.clone()));
                }
                out.push(Action::Left(id));
            }
        }
    }

    fn ingest_path(&mut self, view: &View, path: &Path, complete: bool, out: &mut Vec<Action>) {
        if view.shutting_down {
            return;
        }
        let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            return;
        };
        if path.parent() != Some(view.env.spool.layout().pending.as_path())
            || self.claiming.contains(path)
        {
            return;
        }
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(_) => {
                self.settling.remove(path);
                self.forget_path(view, path, out);
                return;
            }
        };
        if task::is_conflict_copy(&name) && !name.starts_with('.') {
            self.quarantine(view, path, &name, "a sync client's conflict copy: never run automatically; merge it by hand and drop the result into pending/", out);
            return;
        }
        if !task::is_task_file_name(&name) {
            return;
        }
        let sig = sig_of(&meta);
        if let Some(id) = self.by_path.get(path)
            && self.queue.get(id).is_some_and(|p| p.sig == sig)
        {
            return;
        }
        if !meta.file_type().is_file() {
            // Directories, FIFOs and symlinks named like tasks: reject without opening them.
            self.reject(view, path, &name, "not a regular file (directory, symlink, FIFO or device); task files must be plain files", out);
            return;
        }
        if !complete {
            match self.settling.get_mut(path) {
                Some(s) if s.sig == sig => {
                    if s.since.elapsed()
                        < Duration::from_millis(view.env.cfg.orchestrator.settle_ms)
                    {
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
        self.ingest_ready(view, path, &name, sig, out);
    }

    /// Watch `path` until it has kept `sig` for the settle period.
    fn start_settling(&mut self, path: &Path, sig: Sig) {
        self.settling.insert(
            path.to_path_buf(),
            Settling {
                sig,
                since: Instant::now(),
            },
        );
    }

    fn reject(
        &mut self,
        view: &View,
        path: &Path,
        name: &str,
        explanation: &str,
        out: &mut Vec<Action>,
    ) {
        let (spool, layout) = (&view.env.spool, &view.env.layout);
        // An invalid file named like a real task must not land beside that task in failed/ or be
        // mistaken for it: it goes to quarantine with the explanation.
        let stem = crate::layout::file_stem(name);
        let clashes = view.in_hand(stem)
            || spool.settled_place(stem).is_some()
            || self.queue.get(stem).is_some_and(|p| p.path != path);
        if clashes {
            self.quarantine(
                view,
                path,
                name,
                &format!("invalid, and named like existing task {stem}: {explanation}"),
                out,
            );
            return;
        }
        let (stored, note) = storable_name(name);
        let text = match &note {
            Some(n) => format!("{explanation}\n{n}\n"),
            None => format!("{explanation}\n"),
        };
        match spool.reject(path, &stored, &text) {
            Ok(dst) => {
                console::info(&format!(
                    "rejected   {name}: {} → {}",
                    spool
                        .redactor()
                        .redact(explanation.lines().next().unwrap_or_default()),
                    layout.rel(&dst)
                ));
                view.env.writer.send(Op::Upsert {
                    row: mirror::rejected_row(spool, &dst, explanation),
                    attempts: vec![],
                });
            }
            Err(e) => console::warn(&format!("cannot reject {name}: {e:#}")),
        }
        self.forget_path(view, path, out);
    }

    fn ingest_ready(
        &mut self,
        view: &View,
        path: &Path,
        name: &str,
        sig: Sig,
        out: &mut Vec<Action>,
    ) {
        let (cfg, spool, layout) = (&view.env.cfg, &view.env.spool, &view.env.layout);
        let (task, bytes) = match task::read_task(path, cfg.orchestrator.max_task_bytes) {
            Ok(t) => t,
            Err(e) => {
                if !path.exists() {
                    return;
                }
                // A writer that closes between chunks (`echo >> x.yaml`, a save that truncates, closes
                // and writes again) fires close-write on a half-written file. If it changed within the
                // settle period, let it settle and read it again: only a file that stays invalid after
                // a quiet settle period is rejected (then its mtime is older than `settle_ms`).
                let settle = Duration::from_millis(cfg.orchestrator.settle_ms);
                let fresh = std::fs::symlink_metadata(path)
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age < settle);
                if fresh {
                    self.start_settling(path, sig);
                    return;
                }
                self.reject(view, path, name, &e.render(name), out);
                return;
            }
        };
        let id = task.id.clone();
        // One id, one task: a second file with a known id is a resurrection or a copy, never run.
        if let Some(other) = self.queue.get(&id).map(|p| p.path.clone())
            && other != path
        {
            self.quarantine(
                view,
                path,
                name,
                &format!("task id {id} is already pending as {}", layout.rel(&other)),
                out,
            );
            return;
        }
        if view.ledger.is_done(&id) && spool.settled_place(&id).is_none() {
            // Back from failed/ (`orchestrate retry`) or removed by hand: the tree says it is not
            // finished any more, so neither are we.
            out.push(Action::Reopened(id.clone()));
        }
        if view.committing(&id) {
            // Its commit is under way off the loop, and this may be `orchestrate retry` putting it
            // back the moment it landed in failed/: look again once the commit is in.
            self.start_settling(path, sig);
            return;
        }
        if view.in_hand(&id) || spool.settled_place(&id).is_some() {
            let place = spool
                .settled_place(&id)
                .map(|p| layout.rel(spool.dir(p)))
                .unwrap_or_else(|| "the tree".into());
            self.quarantine(view, path, name, &format!("task id {id} already exists in {place} (re-created by a sync client, git or a re-save?)"), out);
            return;
        }
        let history = spool.read_history(&id).unwrap_or_else(|| History {
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
            self.expand_subtasks(view, &task, out);
        }
        let is_new = !self.queue.contains(&id);
        let seq = match self.queue.get(&id) {
            Some(p) => p.seq,
            None => self.queue.next_seq(),
        };
        let row = mirror::pending_row(spool, &task, path, Some(&history));
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
        view.env.writer.send(Op::Upsert {
            row,
            attempts: history.attempts.clone(),
        });
        self.by_path.insert(path.to_path_buf(), id.clone());
        // New or edited: whatever the router said about an earlier version no longer applies.
        out.push(Action::Queued {
            id: id.clone(),
            not_before,
        });
        self.queue.insert(Pending {
            task,
            path: path.to_path_buf(),
            hash: task::content_hash(&bytes),
            sig,
            seq,
            enqueued: Instant::now(),
            history,
            not_before,
            note: None,
        });
        self.cycles_dirty = true;
    }

    fn quarantine(
        &mut self,
        view: &View,
        path: &Path,
        name: &str,
        reason: &str,
        out: &mut Vec<Action>,
    ) {
        let (stored, note) = storable_name(name);
        let reason = match &note {
            Some(n) => format!("{reason}\n{n}"),
            None => reason.to_string(),
        };
        match view.env.spool.quarantine(path, &stored, &reason) {
            Ok(dst) => console::info(&format!(
                "quarantine {name}: {} → {}",
                view.env.spool.redactor().redact(&reason),
                view.env.layout.rel(&dst)
            )),
            Err(e) => console::warn(&format!("cannot quarantine {name}: {e:#}")),
        }
        self.forget_path(view, path, out);
    }

    /// Write a child task per subtask, each depending on the one before. Idempotent: a child that
    /// exists anywhere in the tree is left alone, so a crash mid-way is finished on the next pass.
    fn expand_subtasks(&mut self, view: &View, parent: &Task, out: &mut Vec<Action>) {
        let spool = &view.env.spool;
        for n in 1..=parent.file.subtasks.len() {
            let id = scheduler::subtask_id(&parent.id, n);
            if self.queue.contains(&id)
                || spool.settled_place(&id).is_some()
                || view.ledger.is_done(&id)
            {
                continue;
            }
            let child = scheduler::subtask_file(parent, n);
            let name = format!("{id}.yaml");
            match spool.add_pending(&name, child.to_yaml().as_bytes()) {
                Ok(true) => {
                    let p = spool.layout().pending.join(&name);
                    let sig = std::fs::metadata(&p)
                        .map(|m| sig_of(&m))
                        .unwrap_or_default();
                    self.ingest_ready(view, &p, &name, sig, out);
                }
                Ok(false) => {}
                Err(e) => console::warn(&format!("cannot write subtask {id}: {e}")),
            }
        }
    }
}
