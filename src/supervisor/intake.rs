//! Intake of `pending/`: noticing task files, waiting until they are whole, reading them into the
//! pending queue, and turning away what must not run: invalid files go to `failed/` with an
//! explanation, conflict copies and second files with a known id to `quarantine/`. A task with
//! subtasks is expanded here into one child task file per subtask.
//!
//! Events are hints, the scan is the truth: the watcher's news is read at once, and a scan lists
//! the whole folder (at start, periodically, after a watcher overflow) and reads it a chunk per
//! loop turn. A file renamed into `pending/` is read at once. Any other file is read only when no
//! process holds it open for writing (`writers`), and one seen only by modify events or by a scan
//! while it was fresh must first keep its size, mtime and inode for `settle_ms`. A file still open
//! for writing is held and looked at again when a writer closes it or every second; after
//! [`OPEN_NOTE_AFTER`] the console and `current_state.md` say who holds it.
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
use crate::writers::{self, Writer};

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

/// How a file came to our attention, which decides what must be true before it is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Arrival {
    /// Renamed into `pending/` (the safe protocol) or put back by us: whole, read at once.
    Renamed,
    /// A writer closed it, or a scan found it quiet: read once no process holds it open for writing.
    Closed,
    /// Seen appearing or changing: it must keep still for the settle period, then as `Closed`.
    Changed,
}

/// A file that some process still holds open for writing.
pub(super) struct Held {
    pub(super) writer: Writer,
    /// When we first found it open.
    pub(super) since: Instant,
    next_look: Instant,
    noted: bool,
}

/// How often a held file is looked at again when no close-write news of it comes.
const HELD_RECHECK: Duration = Duration::from_secs(1);

/// A writer holding a file this long is worth a line in the console and `current_state.md`: a
/// generous bound, since slow writers (a phone syncing over a bad network) are legitimate.
pub(super) const OPEN_NOTE_AFTER: Duration = Duration::from_secs(30);

#[derive(Default)]
pub(super) struct Intake {
    /// The pending tasks; the scheduler decides among them.
    pub(super) queue: Scheduler,
    /// Which pending task each file in `pending/` holds.
    by_path: HashMap<PathBuf, String>,
    settling: HashMap<PathBuf, Settling>,
    /// Files some process still holds open for writing.
    held: HashMap<PathBuf, Held>,
    scan: Option<Scan>,
    /// `pending/` files being claimed right now: the watcher's and the scan's news of them is ours.
    claiming: HashSet<PathBuf>,
    /// The pending set changed since dependency cycles were last looked for.
    cycles_dirty: bool,
    /// Something a reader of `current_state.md` sees has changed since `take_news`: a file was
    /// read, turned away, or noted as held open too long. Settle ticks come four times a second
    /// while a file is held, and must not rewrite the page each time.
    news: bool,
    /// Files a writer closed, to be looked at on the next settle tick: a burst of in-place writes
    /// (a `git pull`) costs one look at `/proc` per tick, not one per file.
    closed: HashSet<PathBuf>,
    /// Who holds files of `pending/` open for writing, while a batch is open (`Some`): found once
    /// per batch (one walk of `/proc`), and only if some file in it needs the answer. A batch is a
    /// settle tick or a scan chunk.
    writers: Option<Option<HashMap<std::ffi::OsString, Writer>>>,
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

    /// Files wait to be read: closed by a writer, settling, or held open by a writer.
    pub(super) fn is_settling(&self) -> bool {
        !self.settling.is_empty() || !self.held.is_empty() || !self.closed.is_empty()
    }

    /// Share one look at who holds files open for writing among everything until `end_batch`.
    /// `false`: a batch was open already (and stays open).
    fn begin_batch(&mut self) -> bool {
        if self.writers.is_some() {
            return false;
        }
        self.writers = Some(None);
        true
    }

    fn end_batch(&mut self, began: bool) {
        if began {
            self.writers = None;
        }
    }

    /// Who holds `name` in `pending/` open for writing, if anyone.
    fn writer_of(&mut self, view: &View, name: &str) -> Option<Writer> {
        let found = match &mut self.writers {
            Some(found) => found,
            // Outside a batch: a look of its own.
            None => {
                return writers::open_for_writing(&view.env.spool.layout().pending)
                    .remove(std::ffi::OsStr::new(name));
            }
        };
        found
            .get_or_insert_with(|| writers::open_for_writing(&view.env.spool.layout().pending))
            .get(std::ffi::OsStr::new(name))
            .cloned()
    }

    /// Whether the settling and held files changed anything a reader sees since the last call.
    pub(super) fn take_news(&mut self) -> bool {
        std::mem::take(&mut self.news)
    }

    /// Pretend every held file was found open `by` earlier and is due for another look.
    #[cfg(test)]
    pub(super) fn backdate_held(&mut self, by: Duration) {
        for h in self.held.values_mut() {
            h.since -= by;
            h.next_look = Instant::now();
        }
    }

    /// The files held open for writing, with who holds them.
    pub(super) fn held(&self) -> impl Iterator<Item = (&Path, &Held)> {
        self.held.iter().map(|(p, h)| (p.as_path(), h))
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
        let batch = self.begin_batch();
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
            // A file nobody has written to for the settle period need not settle again; it is
            // still read only when no process holds it open for writing.
            let quiet = m
                .modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= settle);
            let arrival = if quiet {
                Arrival::Closed
            } else {
                Arrival::Changed
            };
            self.ingest_path(view, &p, arrival, &mut out);
        }
        self.end_batch(batch);
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
        self.held.retain(|p, _| seen.contains(p) || p.exists());
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
        let batch = self.begin_batch();
        let mut closed: Vec<PathBuf> = self.closed.drain().collect();
        closed.sort();
        for p in closed {
            self.ingest_path(view, &p, Arrival::Closed, &mut out);
        }
        for (_, p) in ready {
            // Re-stat: ingest_path restarts the clock if the file changed since it was last seen.
            self.ingest_path(view, &p, Arrival::Changed, &mut out);
        }
        let now = Instant::now();
        let due: Vec<PathBuf> = self
            .held
            .iter()
            .filter(|(p, h)| h.next_look <= now && !self.settling.contains_key(*p))
            .map(|(p, _)| p.clone())
            .collect();
        for p in due {
            self.ingest_path(view, &p, Arrival::Closed, &mut out);
        }
        self.end_batch(batch);
        out
    }

    /// News of a file in `pending/`, and how it came. A file a writer closed is looked at on the
    /// next settle tick, with the others closed meanwhile.
    #[must_use = "the actions are the rest of the work: apply them"]
    pub(super) fn ingest(&mut self, view: &View, path: &Path, arrival: Arrival) -> Vec<Action> {
        let mut out = vec![];
        if arrival == Arrival::Closed {
            self.closed.insert(path.to_path_buf());
            return out;
        }
        self.ingest_path(view, path, arrival, &mut out);
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

    fn ingest_path(&mut self, view: &View, path: &Path, arrival: Arrival, out: &mut Vec<Action>) {
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
                self.held.remove(path);
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
        if arrival == Arrival::Changed {
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
        if arrival != Arrival::Renamed
            && let Some(writer) = self.writer_of(view, &name)
        {
            self.hold_open(view, path, writer);
            return;
        }
        self.held.remove(path);
        self.news = true;
        self.ingest_ready(view, path, &name, sig, out);
    }

    /// `path` is still open for writing by `writer`: look again when a writer closes it, or soon.
    fn hold_open(&mut self, view: &View, path: &Path, writer: Writer) {
        let now = Instant::now();
        let held = self.held.entry(path.to_path_buf()).or_insert(Held {
            writer: writer.clone(),
            since: now,
            next_look: now,
            noted: false,
        });
        held.writer = writer;
        held.next_look = now + HELD_RECHECK;
        if !held.noted && held.since.elapsed() >= OPEN_NOTE_AFTER {
            held.noted = true;
            self.news = true;
            console::warn(&format!(
                "{} is still open for writing by {} after {}; it is read once its writer closes it",
                view.env.layout.rel(path),
                held.writer,
                fsutil::duration_text(held.since.elapsed().as_secs())
            ));
        }
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
        self.news = true;
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
        let length = history
            .backoff_seconds
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
        let not_before = history
            .not_before
            .as_deref()
            .and_then(fsutil::parse_time)
            .map(|t| {
                Instant::now() + scheduler::backoff_left(t, length, time::OffsetDateTime::now_utc())
            });
        if !task.file.subtasks.is_empty() {
            self.expand_subtasks(view, &task, out);
        }
        if task.file.fan_out.is_some() {
            self.expand_fan_out(view, &task, out);
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

    /// Move pending task `id`'s file to `quarantine/` with `reason` (its id clashes with another
    /// host's task in the cluster queue).
    pub(super) fn quarantine_pending(
        &mut self,
        view: &View,
        id: &str,
        reason: &str,
    ) -> Vec<Action> {
        let mut out = vec![];
        if let Some(path) = self.queue.get(id).map(|p| p.path.clone()) {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| format!("{id}.yaml"));
            self.quarantine(view, &path, &name, reason, &mut out);
        }
        out
    }

    fn quarantine(
        &mut self,
        view: &View,
        path: &Path,
        name: &str,
        reason: &str,
        out: &mut Vec<Action>,
    ) {
        self.news = true;
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

    /// Write a child task per subtask, each depending on the one before.
    fn expand_subtasks(&mut self, view: &View, parent: &Task, out: &mut Vec<Action>) {
        let children = (1..=parent.file.subtasks.len())
            .map(|n| scheduler::subtask_file(parent, n))
            .collect();
        self.write_children(view, children, out);
    }

    /// Write a candidate task per `fan_out` entry. Not one when an agent it names is unknown:
    /// the scheduler fails the task at once, and no candidate should run for it.
    fn expand_fan_out(&mut self, view: &View, parent: &Task, out: &mut Vec<Action>) {
        let Some(fan) = parent.file.fan_out.as_ref() else {
            return;
        };
        let known = |a: &String| view.env.cfg.agents.contains_key(a);
        if let task::FanOut::Agents(agents) = fan
            && !agents.iter().all(known)
        {
            return;
        }
        if parent.file.pick == Some(task::Pick::Judge) && !parent.file.judge.iter().all(known) {
            return;
        }
        let names = fan.names();
        let children = names
            .iter()
            .map(|n| scheduler::fan_out::candidate_file(parent, n))
            .collect();
        self.write_children(view, children, out);
    }

    /// Write child task files orchestrate makes (subtasks, fan-out candidates, a judge) into
    /// `pending/` and read them at once. Idempotent: a child that exists anywhere in the tree is
    /// left alone, so a crash mid-way is finished on the next pass.
    pub(super) fn write_children(
        &mut self,
        view: &View,
        children: Vec<task::TaskFile>,
        out: &mut Vec<Action>,
    ) {
        let spool = &view.env.spool;
        for child in children {
            let Some(id) = child.id.clone() else {
                continue;
            };
            if self.queue.contains(&id)
                || spool.settled_place(&id).is_some()
                || view.ledger.is_done(&id)
            {
                continue;
            }
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
                Err(e) => console::warn(&format!("cannot write task {id}: {e}")),
            }
        }
    }
}
