//! Intake of `pending/`.

use super::*;

/// A scan of `pending/` in progress: the listing still to read, and what it has read.
pub(super) struct Scan {
    pub(super) queue: std::collections::VecDeque<(PathBuf, std::fs::Metadata)>,
    pub(super) seen: HashSet<PathBuf>,
}

/// A file in `pending/` that must stay unchanged for the settle period before it is read.
pub(super) struct Settling {
    pub(super) sig: (u64, i128, u64),
    pub(super) since: Instant,
}

pub(super) fn sig_of(m: &std::fs::Metadata) -> (u64, i128, u64) {
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
pub(super) const MAX_STORED_STEM: usize = 170;

/// `name`, shortened if needed so it can be stored with its explanation; the note says what it was.
pub(super) fn storable_name(name: &str) -> (String, Option<String>) {
    let stem = task::file_stem(name);
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

pub(super) fn hash_bytes(b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

impl Supervisor {
    pub(super) fn on_hint(&mut self, h: Hint) {
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
    pub(super) fn rescan(&mut self) {
        let rd = match std::fs::read_dir(&self.spool.pending) {
            Ok(rd) => rd,
            Err(e) => {
                console::warn(&format!(
                    "cannot list {}: {e}; recreating it",
                    self.spool.pending.display()
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
    pub(super) fn scan_step(&mut self) {
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
                && self.sched.get(id).is_some_and(|pd| pd.sig == sig_of(&m))
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

    pub(super) fn forget_path(&mut self, p: &Path) {
        if let Some(id) = self.by_path.remove(p) {
            // The file may have been claimed (by us, then it is in `running`) or removed by the user.
            if self.sched.get(&id).is_some_and(|pd| pd.path == p) {
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

    pub(super) fn ingest_path(&mut self, path: &Path, complete: bool) {
        if self.shutting_down {
            return;
        }
        let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            return;
        };
        if path.parent() != Some(self.spool.pending.as_path()) || self.claiming.contains(path) {
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
            && self.sched.get(id).is_some_and(|p| p.sig == sig)
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
    pub(super) fn start_settling(&mut self, path: &Path, sig: (u64, i128, u64)) {
        self.settling.insert(
            path.to_path_buf(),
            Settling {
                sig,
                since: Instant::now(),
            },
        );
    }

    pub(super) fn check_settling(&mut self) {
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

    pub(super) fn reject(&mut self, path: &Path, name: &str, explanation: &str) {
        // An invalid file named like a real task must not land beside that task in failed/ or be
        // mistaken for it: it goes to quarantine with the explanation.
        let stem = task::file_stem(name);
        let clashes = self.in_hand(stem)
            || self.spool.settled_place(stem).is_some()
            || self.sched.get(stem).is_some_and(|p| p.path != path);
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

    pub(super) fn ingest_ready(&mut self, path: &Path, name: &str, sig: (u64, i128, u64)) {
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
        if let Some(other) = self.sched.get(&id).map(|p| p.path.clone())
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
        let is_new = !self.sched.contains(&id);
        let seq = match self.sched.get(&id) {
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

    pub(super) fn quarantine(&mut self, path: &Path, name: &str, reason: &str) {
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
    pub(super) fn expand_subtasks(&mut self, parent: &Task) {
        for n in 1..=parent.file.subtasks.len() {
            let id = scheduler::subtask_id(&parent.id, n);
            if self.sched.contains(&id)
                || self.spool.settled_place(&id).is_some()
                || self.done.contains_key(&id)
            {
                continue;
            }
            let child = scheduler::subtask_file(parent, n);
            let name = format!("{id}.yaml");
            match self
                .spool
                .add_pending(&name, task::to_yaml(&child).as_bytes())
            {
                Ok(true) => {
                    let p = self.spool.pending.join(&name);
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
}
