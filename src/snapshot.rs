//! Diffs of the workdir a task ran in: a snapshot of its files before the run, compared with the
//! tree after it. No workdir is diffed through git; this module is the only diff there is.
//!
//! The workdir is opened once, before the run ([`Workdir::open`]: one path component at a time,
//! none of them through a symlink), and that handle is held until the diff. Both walks go through
//! it, each step relative to the directory above (`openat`, `statat` with `O_NOFOLLOW`), so nothing
//! a task does to the path (a symlink to `/` in its place, the directory renamed away) takes a walk
//! outside the directory that was checked. If after the run the path no longer names that
//! directory, the diff says so and reads nothing. Symlinks inside are recorded as their target
//! text, never followed.
//!
//! Only regular files are read: opened without following a link and without blocking, then checked
//! with `fstat` on the opened file. FIFOs, sockets and devices are listed as such and never opened.
//! Each walk has a time budget (`context.max_diff_seconds`); past it the walk stops, and the diff
//! says where and why. A read can still hang inside the kernel (a dead network file system), so the
//! caller runs each walk on a thread of its own and stops waiting for it when its budget is spent.
//!
//! The snapshot keeps sizes and mtimes of every file and the contents of small files (up to
//! `context.max_snapshot_bytes` in all), shared with the previous snapshot of the same workdir when
//! nothing changed, so back-to-back tasks in one folder cost a stat per file. The spool, context and
//! state folders, `.git`, `target`, `node_modules` and `context.diff_exclude` are never looked at.
//! Paths in the diff are quoted the way git quotes them (`"a/x\ny"`), so no file name can add a line
//! of its own to a diff. Tests can hold a read with the pause points `snapshot.read` and `diff.read`
//! (`failpoint`), as a hung file system would.
//!
//! This module only reads the workdir; it never writes anywhere.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, Stat};

use crate::config::Config;
use crate::console::quote_path;
use crate::layout::Layout;

/// Deeper directories are not looked into: each level of a walk holds a descriptor open.
const MAX_DEPTH: usize = 100;

/// How many of the directories a walk could not look into are named in the diff.
const SKIPPED_NAMED: usize = 5;

/// Opening a directory on the way down: never through a symlink.
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// The directory a task runs in, held open from before the run until its diff.
#[derive(Debug)]
pub struct Workdir {
    path: PathBuf,
    dir: OwnedFd,
    /// (device, inode) of the directory held.
    id: (u64, u64),
}

impl Workdir {
    /// Open the directory `path` names (absolute, symlinks already resolved: a checked workdir)
    /// from `/` down, one component at a time and none of them through a symlink, so the directory
    /// held is the one that was checked even if a component is swapped for a link meanwhile.
    pub fn open(path: &Path) -> io::Result<Workdir> {
        let mut dir = rustix::fs::open("/", DIR_FLAGS, Mode::empty())?;
        for c in path.components() {
            match c {
                Component::RootDir => {}
                Component::Normal(name) => {
                    dir = rustix::fs::openat(&dir, name, DIR_FLAGS, Mode::empty())?
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "not an absolute path without `.` or `..`",
                    ));
                }
            }
        }
        let id = file_id(&rustix::fs::fstat(&dir)?);
        Ok(Workdir {
            path: path.to_path_buf(),
            dir,
            id,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why the path no longer names the directory held, if it does not: removed, renamed away,
    /// or replaced by another directory or by a symlink to one.
    pub fn replaced(&self) -> Option<String> {
        let p = self.path.display();
        match std::fs::canonicalize(&self.path) {
            Err(e) => Some(format!("{p} is gone ({e})")),
            Ok(real) if real != self.path => Some(format!("{p} now leads to {}", real.display())),
            Ok(_) => match rustix::fs::stat(&self.path) {
                Ok(st) if file_id(&st) == self.id => None,
                Ok(_) => Some(format!("{p} is another directory now")),
                Err(e) => Some(format!("{p} cannot be looked at: {e}")),
            },
        }
    }
}

/// Where a walk is, so that a walk given up on can be reported with the path it was stuck at.
#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<Mutex<PathBuf>>);

impl Progress {
    fn at(&self, rel: &Path) {
        if let Ok(mut p) = self.0.lock() {
            p.as_mut_os_string().clear();
            p.push(rel);
        }
    }

    /// The last path the walk looked at, relative to the workdir.
    pub fn last(&self) -> String {
        self.0
            .lock()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }
}

// The field types of `struct stat` differ between architectures; `from` fits them all.
#[allow(clippy::useless_conversion)]
fn file_id(st: &Stat) -> (u64, u64) {
    (u64::from(st.st_dev), u64::from(st.st_ino))
}

/// What an entry is. Directories are walked, never listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
    Unknown,
}

impl Kind {
    fn of(st: &Stat) -> Kind {
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => Kind::File,
            FileType::Symlink => Kind::Symlink,
            FileType::Fifo => Kind::Fifo,
            FileType::Socket => Kind::Socket,
            FileType::CharacterDevice => Kind::CharDevice,
            FileType::BlockDevice => Kind::BlockDevice,
            _ => Kind::Unknown,
        }
    }

    /// Neither a regular file nor a symlink: never opened, never read.
    fn special(self) -> bool {
        !matches!(self, Kind::File | Kind::Symlink)
    }

    fn what(self) -> &'static str {
        match self {
            Kind::File => "a regular file",
            Kind::Symlink => "a symbolic link",
            Kind::Fifo => "a FIFO",
            Kind::Socket => "a socket",
            Kind::CharDevice => "a character device",
            Kind::BlockDevice => "a block device",
            Kind::Unknown => "a file of unknown type",
        }
    }
}

/// What a file looked like before the run (or after it).
#[derive(Debug, Clone)]
struct FileState {
    kind: Kind,
    size: u64,
    mtime_ns: i128,
    ino: u64,
    /// A regular file's bytes, or a symlink's target; `None` when not read.
    content: Option<Arc<Vec<u8>>>,
}

impl FileState {
    // The field types of `struct stat` differ between architectures; `from` fits them all.
    #[allow(clippy::useless_conversion)]
    fn looked_at(st: &Stat, content: Option<Arc<Vec<u8>>>) -> FileState {
        FileState {
            kind: Kind::of(st),
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime_ns: i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec),
            ino: u64::from(st.st_ino),
            content,
        }
    }

    /// Same kind, size, mtime and inode: taken as unchanged without reading it.
    fn same(&self, other: &FileState) -> bool {
        self.kind == other.kind
            && self.size == other.size
            && self.mtime_ns == other.mtime_ns
            && self.ino == other.ino
    }
}

/// The latest snapshot per workdir (contents shared with the snapshots themselves, not copied).
type SnapshotCache = Mutex<HashMap<PathBuf, Arc<HashMap<PathBuf, FileState>>>>;

fn snapshot_cache() -> &'static SnapshotCache {
    static CACHE: std::sync::OnceLock<SnapshotCache> = std::sync::OnceLock::new();
    CACHE.get_or_init(Default::default)
}

#[derive(Clone)]
struct Excludes {
    names: Vec<glob::Pattern>,
    /// (device, inode) of the directories never diffed: the spool, context and state directories,
    /// wherever the walk meets them and however their path is spelled.
    dirs: Vec<(u64, u64)>,
}

impl Excludes {
    fn new(layout: &Layout, cfg: &Config) -> Excludes {
        let dirs = layout
            .own_folders()
            .into_iter()
            .filter_map(|d| rustix::fs::stat(d.as_path()).ok())
            .map(|st| file_id(&st))
            .collect();
        Excludes {
            names: cfg.context.diff_exclude_globs.clone(),
            dirs,
        }
    }

    fn skip_name(&self, name: &str) -> bool {
        matches!(name, ".git" | "target" | "node_modules" | ".orchestrate")
            || self.names.iter().any(|g| g.matches(name))
    }
}

/// One entry a walk found (anything but a directory), with the directory it is in.
struct Entry<'a> {
    rel: &'a Path,
    dir: BorrowedFd<'a>,
    name: &'a CStr,
    state: FileState,
}

/// One walk of the held workdir, within its time budget.
struct Walk<'a> {
    excludes: &'a Excludes,
    progress: &'a Progress,
    limit: Duration,
    deadline: Instant,
    /// Why the walk stopped before the end.
    cut: Option<String>,
    /// Directories not looked into, and why; the first few are named.
    skipped: Vec<String>,
    skipped_total: usize,
}

impl<'a> Walk<'a> {
    fn new(excludes: &'a Excludes, progress: &'a Progress, limit: Duration) -> Walk<'a> {
        Walk {
            excludes,
            progress,
            limit,
            deadline: Instant::now() + limit,
            cut: None,
            skipped: vec![],
            skipped_total: 0,
        }
    }

    fn run(&mut self, root: BorrowedFd, visit: &mut dyn FnMut(Entry)) {
        self.dir(root, &mut PathBuf::new(), 0, visit);
    }

    /// Past the budget: stop, saying where.
    fn out_of_time(&mut self, at: &Path) -> bool {
        if self.cut.is_none() && Instant::now() >= self.deadline {
            self.cut = Some(format!(
                "it took longer than {} s (context.max_diff_seconds) and stopped at `{}`",
                self.limit.as_secs_f64(),
                at.display()
            ));
        }
        self.cut.is_some()
    }

    fn skip(&mut self, rel: &Path, why: impl std::fmt::Display) {
        self.skipped_total += 1;
        if self.skipped.len() < SKIPPED_NAMED {
            self.skipped.push(format!("{}/ ({why})", rel.display()));
        }
    }

    fn dir(
        &mut self,
        fd: BorrowedFd,
        rel: &mut PathBuf,
        depth: usize,
        visit: &mut dyn FnMut(Entry),
    ) {
        // All names first: the listing's own descriptor is closed before going deeper.
        let names: Vec<CString> = match Dir::read_from(fd) {
            Ok(d) => d
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_owned())
                .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
                .collect(),
            Err(e) => {
                self.skip(rel, io::Error::from(e));
                return;
            }
        };
        for name in names {
            rel.push(OsStr::from_bytes(name.as_bytes()));
            self.entry(fd, &name, rel, depth, visit);
            rel.pop();
            if self.cut.is_some() {
                return;
            }
        }
    }

    fn entry(
        &mut self,
        fd: BorrowedFd,
        name: &CStr,
        rel: &mut PathBuf,
        depth: usize,
        visit: &mut dyn FnMut(Entry),
    ) {
        if self.out_of_time(rel) {
            return;
        }
        self.progress.at(rel);
        if self
            .excludes
            .skip_name(&String::from_utf8_lossy(name.to_bytes()))
        {
            return;
        }
        // Gone since the listing: nothing to record.
        let Ok(st) = rustix::fs::statat(fd, name, AtFlags::SYMLINK_NOFOLLOW) else {
            return;
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            if self.excludes.dirs.contains(&file_id(&st)) {
                return;
            }
            if depth + 1 >= MAX_DEPTH {
                self.skip(rel, format_args!("deeper than {MAX_DEPTH} levels"));
                return;
            }
            // Swapped for a symlink since `statat` looked: refused here, never followed.
            match rustix::fs::openat(fd, name, DIR_FLAGS, Mode::empty()) {
                Ok(sub) => self.dir(sub.as_fd(), rel, depth + 1, visit),
                Err(e) => self.skip(rel, io::Error::from(e)),
            }
            return;
        }
        visit(Entry {
            rel,
            dir: fd,
            name,
            state: FileState::looked_at(&st, None),
        });
    }

    /// What the diff says about a walk that did not see everything, as comment lines.
    fn notes(&self, what: &str) -> String {
        let mut s = String::new();
        if let Some(cut) = &self.cut {
            s.push_str(&format!(
                "# the {what} was cut short: {cut}; changes after that point are not listed\n"
            ));
        }
        if self.skipped_total > 0 {
            s.push_str(&format!(
                "# {} director{} not looked into: {}{}\n",
                self.skipped_total,
                if self.skipped_total == 1 { "y" } else { "ies" },
                self.skipped.join(", "),
                if self.skipped_total > self.skipped.len() {
                    ", …"
                } else {
                    ""
                }
            ));
        }
        s
    }
}

/// The bytes of the regular file `name` in `dir`, if it is one and holds at most `max` bytes.
/// Opened without following a link and without blocking (a FIFO put in its place since the walk
/// looked would otherwise wait for a writer), and checked as opened: only a regular file is read.
fn read_regular(dir: BorrowedFd, name: &CStr, max: u64) -> Option<Vec<u8>> {
    let flags =
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, name, flags, Mode::empty()).ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    let size = u64::try_from(st.st_size).unwrap_or(u64::MAX);
    if Kind::of(&st) != Kind::File || size > max {
        return None;
    }
    let mut buf = Vec::with_capacity(size as usize);
    std::fs::File::from(fd)
        .take(max + 1)
        .read_to_end(&mut buf)
        .ok()?;
    (buf.len() as u64 <= max).then_some(buf)
}

/// A symlink's target, as text: what the link says, never what it leads to.
fn link_target(dir: BorrowedFd, name: &CStr) -> Option<Vec<u8>> {
    rustix::fs::readlinkat(dir, name, Vec::new())
        .ok()
        .map(CString::into_bytes)
}

/// Contents are read while a budget lasts (`context.max_snapshot_bytes`), each file up to
/// `max_file` bytes.
struct Reader {
    max_file: u64,
    budget: u64,
    /// The failpoint a test may hold each read at.
    point: &'static str,
}

impl Reader {
    fn content(&mut self, e: &Entry) -> Option<Arc<Vec<u8>>> {
        match e.state.kind {
            Kind::Symlink => link_target(e.dir, e.name).map(Arc::new),
            Kind::File if e.state.size <= self.max_file.min(self.budget) => {
                crate::failpoint::hit(self.point);
                let c = read_regular(e.dir, e.name, self.max_file.min(self.budget))?;
                self.budget -= c.len() as u64;
                Some(Arc::new(c))
            }
            _ => None,
        }
    }
}

/// The workdir before a run, to diff against afterwards.
/// How many files a workdir stamp looks at, at most: a stall check must stay cheap in any tree.
pub const STAMP_MAX_FILES: usize = 50_000;

/// A cheap fingerprint of the files a diff would look at (how many, their sizes, their newest
/// mtime, up to [`STAMP_MAX_FILES`] of them): a different value means something was written,
/// created or removed. For the stall watch, which calls it only after output has been quiet for a
/// while. Read through the held workdir with the same symlink-refusing walk as the diff.
pub fn workdir_stamp(workdir: &Workdir, layout: &Layout, cfg: &Config) -> u64 {
    let excludes = Excludes::new(layout, cfg);
    let progress = Progress::default();
    let mut walk = Walk::new(
        &excludes,
        &progress,
        Duration::from_secs(cfg.context.max_diff_seconds),
    );
    let mut stamp = Stamp::default();
    walk.run(workdir.dir.as_fd(), &mut |e| stamp.add(&e.state));
    stamp.value()
}

/// [`workdir_stamp`] as it is being added up, one file at a time in walk order.
#[derive(Default)]
struct Stamp {
    files: u64,
    bytes: u64,
    newest: Option<i128>,
}

impl Stamp {
    fn add(&mut self, f: &FileState) {
        if self.files as usize >= STAMP_MAX_FILES {
            return;
        }
        self.files += 1;
        self.bytes = self.bytes.wrapping_add(f.size);
        self.newest = self.newest.max(Some(f.mtime_ns));
    }

    fn value(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.files, self.bytes, self.newest).hash(&mut h);
        h.finish()
    }
}

pub struct Snapshot {
    workdir: Arc<Workdir>,
    files: HashMap<PathBuf, FileState>,
    excludes: Excludes,
    max_file: u64,
    max_bytes: u64,
    limit: Duration,
    /// Why the snapshot is not whole; then there is nothing to diff against.
    unfinished: Option<String>,
    /// The [`workdir_stamp`] of the tree as this snapshot found it, added up on the same walk.
    pub stamp: u64,
}

impl Snapshot {
    /// Walk the workdir held in `workdir`, within `context.max_diff_seconds`.
    pub fn take(
        workdir: Arc<Workdir>,
        layout: &Layout,
        cfg: &Config,
        progress: &Progress,
    ) -> Snapshot {
        let mut snap = Snapshot::unfinished(workdir, layout, cfg, None);
        let mut reader = Reader {
            max_file: snap.max_file,
            budget: snap.max_bytes,
            point: "snapshot.read",
        };
        // The last snapshot of this workdir: files whose kind, size, mtime and inode are unchanged
        // since reuse its content instead of being read again (a 10,000-file workdir costs a walk).
        let previous = snapshot_cache()
            .lock()
            .ok()
            .and_then(|c| c.get(&snap.workdir.path).cloned())
            .unwrap_or_default();
        let mut walk = Walk::new(&snap.excludes, progress, snap.limit);
        let files = &mut snap.files;
        let mut stamp = Stamp::default();
        walk.run(snap.workdir.dir.as_fd(), &mut |e| {
            stamp.add(&e.state);
            if let Some(old) = previous.get(e.rel)
                && old.same(&e.state)
                && (old.content.is_some() || old.kind != Kind::File || old.size > reader.max_file)
            {
                reader.budget -= old
                    .content
                    .as_ref()
                    .map_or(0, |c| c.len() as u64)
                    .min(reader.budget);
                files.insert(e.rel.to_path_buf(), old.clone());
                return;
            }
            let content = reader.content(&e);
            files.insert(e.rel.to_path_buf(), FileState { content, ..e.state });
        });
        snap.unfinished = walk.cut.take();
        snap.stamp = stamp.value();
        if let Ok(mut c) = snapshot_cache().lock() {
            c.insert(snap.workdir.path.clone(), Arc::new(snap.files.clone()));
        }
        snap
    }

    /// A snapshot that could not be taken (`why`), or an empty one to fill (`None`).
    pub fn unfinished(
        workdir: Arc<Workdir>,
        layout: &Layout,
        cfg: &Config,
        why: Option<String>,
    ) -> Snapshot {
        Snapshot {
            workdir,
            files: HashMap::new(),
            excludes: Excludes::new(layout, cfg),
            max_file: cfg.context.max_diff_file_bytes,
            max_bytes: cfg.context.max_snapshot_bytes,
            limit: Duration::from_secs(cfg.context.max_diff_seconds),
            unfinished: why,
            stamp: 0,
        }
    }

    /// Compare with the tree now: a unified diff and the list of changed paths.
    pub fn diff(&self, progress: &Progress) -> DiffResult {
        if let Some(why) = &self.unfinished {
            return DiffResult::not_diffed(format!(
                "the snapshot before the run was not finished ({why}); not diffed"
            ));
        }
        if let Some(why) = self.workdir.replaced() {
            return DiffResult::not_diffed(format!(
                "the workdir was replaced during the run; not diffed ({why})"
            ));
        }
        let mut reader = Reader {
            max_file: self.max_file,
            budget: self.max_bytes,
            point: "diff.read",
        };
        let mut changed: BTreeMap<PathBuf, (Option<&FileState>, Option<FileState>)> =
            BTreeMap::new();
        let mut seen = HashSet::new();
        let mut walk = Walk::new(&self.excludes, progress, self.limit);
        walk.run(self.workdir.dir.as_fd(), &mut |e| {
            seen.insert(e.rel.to_path_buf());
            let old = self.files.get(e.rel);
            if old.is_some_and(|o| o.same(&e.state)) {
                return;
            }
            let content = reader.content(&e);
            changed.insert(
                e.rel.to_path_buf(),
                (old, Some(FileState { content, ..e.state })),
            );
        });
        // Deletions only from a whole walk: a file after the cut was not seen, not deleted.
        if walk.cut.is_none() {
            for (rel, old) in &self.files {
                if !seen.contains(rel) {
                    changed.insert(rel.clone(), (Some(old), None));
                }
            }
        }
        let mut text = String::new();
        let mut files = Vec::new();
        for (rel, (old, new)) in changed {
            if walk.out_of_time(&rel) {
                break;
            }
            if let Some(block) = self.render(&rel, old, new.as_ref()) {
                files.push(rel.display().to_string());
                text.push_str(&block);
            }
        }
        let notes = walk.notes("diff");
        DiffResult {
            incomplete: walk.cut.clone(),
            text: notes + &text,
            files,
        }
    }

    /// One file's part of the diff; `None` when it did not really change (touched, or rewritten
    /// with the same bytes).
    fn render(
        &self,
        rel: &Path,
        old: Option<&FileState>,
        new: Option<&FileState>,
    ) -> Option<String> {
        // Quoted as git quotes them: a name with a line break or an escape sequence stays on its
        // line, and cannot pass for a header of its own.
        let raw = rel.as_os_str().as_bytes();
        let quoted = |prefix: &str| quote_path(&[prefix.as_bytes(), raw].concat());
        let name = quoted("");
        let (a_name, b_name) = (
            if old.is_some() {
                quoted("a/")
            } else {
                "/dev/null".into()
            },
            if new.is_some() {
                quoted("b/")
            } else {
                "/dev/null".into()
            },
        );
        let head = format!("diff --orchestrate {a_name} {b_name}\n");
        let target = |s: &FileState| {
            bytes(Some(s)).map_or("?".into(), |t| String::from_utf8_lossy(t).into_owned())
        };
        let kinds = (old.map(|s| s.kind), new.map(|s| s.kind));
        let body = match kinds {
            // Devices, sockets, FIFOs: named, never read.
            _ if kinds.0.is_some_and(Kind::special) || kinds.1.is_some_and(Kind::special) => {
                match (old, new) {
                    (None, Some(n)) => format!("{name} is {} (not read)\n", n.kind.what()),
                    (Some(o), None) => format!("{name} ({}) was deleted\n", o.kind.what()),
                    (Some(o), Some(n)) if o.kind == n.kind => {
                        format!("{name} ({}) changed (not read)\n", n.kind.what())
                    }
                    (Some(o), Some(n)) => format!(
                        "{name} was {}, is now {} (not read)\n",
                        o.kind.what(),
                        n.kind.what()
                    ),
                    (None, None) => return None,
                }
            }
            (Some(Kind::Symlink), Some(Kind::Symlink)) => {
                let (o, n) = (old?, new?);
                if bytes(old) == bytes(new) {
                    return None;
                }
                format!(
                    "Symbolic link {name} changed: {} → {}\n",
                    target(o),
                    target(n)
                )
            }
            (Some(Kind::Symlink), _) | (_, Some(Kind::Symlink)) => match (old, new) {
                (None, Some(n)) => format!("Symbolic link {name} → {}\n", target(n)),
                (Some(o), None) => format!("Symbolic link {name} → {} deleted\n", target(o)),
                (Some(o), Some(n)) if o.kind == Kind::Symlink => format!(
                    "{name} was a symbolic link → {}, is now {}\n",
                    target(o),
                    n.kind.what()
                ),
                (Some(o), Some(n)) => format!(
                    "{name} was {}, is now a symbolic link → {}\n",
                    o.kind.what(),
                    target(n)
                ),
                (None, None) => return None,
            },
            _ => {
                let empty: &[u8] = &[];
                let a = if old.is_some() {
                    bytes(old)
                } else {
                    Some(empty)
                };
                let b = if new.is_some() {
                    bytes(new)
                } else {
                    Some(empty)
                };
                match (a, b) {
                    // mtime moved but the bytes are the same (touched, or rewritten unchanged).
                    (Some(a), Some(b)) if a == b && old.is_some() && new.is_some() => return None,
                    (Some(a), Some(b)) if !is_binary(a) && !is_binary(b) => {
                        let (a, b) = (String::from_utf8_lossy(a), String::from_utf8_lossy(b));
                        let d = similar::TextDiff::from_lines(a.as_ref(), b.as_ref());
                        let mut s = d
                            .unified_diff()
                            .context_radius(3)
                            .header(&a_name, &b_name)
                            .to_string();
                        if !s.is_empty() && !s.ends_with('\n') {
                            s.push('\n');
                        }
                        s
                    }
                    (Some(a), Some(b)) => format!(
                        "Binary files {a_name} and {b_name} differ ({} → {} bytes)\n",
                        a.len(),
                        b.len()
                    ),
                    _ => {
                        let size = new.map(|n| n.size);
                        let largest = size.unwrap_or(0).max(old.map_or(0, |o| o.size));
                        let why = if largest > self.max_file {
                            format!("too large to diff, limit {} bytes", self.max_file)
                        } else {
                            "not read: the context.max_snapshot_bytes budget for file contents was spent".into()
                        };
                        format!(
                            "File {name} changed{} ({why})\n",
                            size.map(|s| format!(", now {s} bytes")).unwrap_or_default()
                        )
                    }
                }
            }
        };
        Some(head + &body)
    }
}

/// What was read of a file: a regular file's bytes, a symlink's target.
fn bytes(s: Option<&FileState>) -> Option<&[u8]> {
    s.and_then(|s| s.content.as_deref().map(Vec::as_slice))
}

fn is_binary(b: &[u8]) -> bool {
    b[..b.len().min(8000)].contains(&0) || std::str::from_utf8(b).is_err()
}

pub struct DiffResult {
    pub text: String,
    pub files: Vec<String>,
    /// Why the diff does not show every change, when it does not.
    pub incomplete: Option<String>,
}

impl DiffResult {
    /// No diff, and why: said in the diff file itself, where a reader looks for it.
    pub fn not_diffed(why: String) -> DiffResult {
        DiffResult {
            text: format!("# {why}\n"),
            files: vec![],
            incomplete: Some(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf, Config) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical");
        let mut cfg = Config::parse("", "test").expect("the empty config is valid");
        cfg.context.max_diff_file_bytes = 1000;
        (dir, root, cfg)
    }

    fn take(root: &Path, cfg: &Config) -> Snapshot {
        let wd = Arc::new(Workdir::open(root).expect("open workdir"));
        Snapshot::take(wd, &cfg.layout(root), cfg, &Progress::default())
    }

    #[test]
    fn the_stamp_changes_with_writes_creations_and_removals_only() {
        let (_dir, root, cfg) = setup();
        let layout = cfg.layout(&root);
        std::fs::write(root.join("a.txt"), "a\n").expect("write");
        let snap = take(&root, &cfg);
        let held = Workdir::open(&root).expect("open workdir");
        let stamp = || workdir_stamp(&held, &layout, &cfg);
        // The snapshot's own stamp is the one a later look computes for the same tree.
        assert_eq!(snap.stamp, stamp());
        // What the agent's log grows into (the context folder) is not the workdir changing.
        std::fs::create_dir_all(&layout.context_dir).expect("mkdir context");
        std::fs::write(layout.context_dir.join("log"), "output").expect("write");
        assert_eq!(snap.stamp, stamp());
        std::fs::write(root.join("b.txt"), "b\n").expect("create");
        let created = stamp();
        assert_ne!(created, snap.stamp);
        std::fs::write(root.join("b.txt"), "bb\n").expect("rewrite");
        let written = stamp();
        assert_ne!(written, created);
        std::fs::remove_file(root.join("b.txt")).expect("rm");
        assert_ne!(stamp(), written);
    }

    #[test]
    fn names_with_line_breaks_are_quoted_in_headers() {
        let (_dir, root, cfg) = setup();
        let snap = take(&root, &cfg);
        // A name cannot hold a slash, but it can hold line breaks.
        let name = "x\n+++ evil\ndiff --git evil evil";
        std::fs::write(root.join(name), "hi\n").expect("write");
        let d = snap.diff(&Progress::default());
        assert_eq!(d.files, vec![name.to_string()]);
        let quoted = "\"b/x\\n+++ evil\\ndiff --git evil evil\"";
        assert!(d.text.contains(&format!("+++ {quoted}\n")), "{}", d.text);
        let headers: Vec<&str> = d
            .text
            .lines()
            .filter(|l| l.starts_with("+++") || l.starts_with("diff "))
            .collect();
        assert_eq!(headers.len(), 2, "{}", d.text);
        assert!(
            !d.text.lines().any(|l| l.starts_with("diff --git")),
            "{}",
            d.text
        );
    }

    #[test]
    fn diff_covers_text_binary_large_deleted_and_untouched() {
        let (_dir, root, cfg) = setup();
        std::fs::write(root.join("keep.txt"), "a\nb\nc\n").expect("write");
        std::fs::write(root.join("touched.txt"), "same\n").expect("write");
        std::fs::write(root.join("gone.txt"), "bye\n").expect("write");
        std::fs::create_dir_all(root.join("target")).expect("mkdir");
        let snap = take(&root, &cfg);
        std::fs::write(root.join("keep.txt"), "a\nB\nc\n").expect("write");
        std::fs::write(root.join("touched.txt"), "same\n").expect("rewrite unchanged");
        std::fs::remove_file(root.join("gone.txt")).expect("rm");
        std::fs::write(root.join("bin.dat"), [0u8, 159, 146, 150]).expect("write");
        std::fs::write(root.join("big.txt"), "x".repeat(5000)).expect("write");
        std::fs::write(root.join("target/ignored.o"), "built").expect("write");
        let d = snap.diff(&Progress::default());
        assert_eq!(d.files, vec!["big.txt", "bin.dat", "gone.txt", "keep.txt"]);
        assert!(d.text.contains("-b\n+B\n"), "{}", d.text);
        assert!(
            d.text
                .contains("Binary files /dev/null and b/bin.dat differ"),
            "{}",
            d.text
        );
        assert!(
            d.text
                .contains("File big.txt changed, now 5000 bytes (too large to diff"),
            "{}",
            d.text
        );
        assert!(
            d.text.contains("--- a/gone.txt\n+++ /dev/null\n"),
            "{}",
            d.text
        );
        assert!(
            !d.text.contains("touched.txt") && !d.text.contains("ignored.o"),
            "{}",
            d.text
        );
        assert!(d.incomplete.is_none());
    }

    #[test]
    fn fifos_and_sockets_are_listed_and_never_opened() {
        let (_dir, root, cfg) = setup();
        let snap = take(&root, &cfg);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("pipe").as_path(),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .expect("mkfifo");
        let _sock = std::os::unix::net::UnixListener::bind(root.join("sock")).expect("bind");
        std::fs::write(root.join("after.txt"), "x\n").expect("write");
        // A FIFO without a writer: opening it to read would block this test forever.
        let d = snap.diff(&Progress::default());
        assert_eq!(d.files, vec!["after.txt", "pipe", "sock"]);
        assert!(d.text.contains("pipe is a FIFO (not read)"), "{}", d.text);
        assert!(d.text.contains("sock is a socket (not read)"), "{}", d.text);
        // The next snapshot of the same workdir walks past them too.
        let again = take(&root, &cfg);
        std::fs::remove_file(root.join("pipe")).expect("rm");
        let d = again.diff(&Progress::default());
        assert_eq!(d.files, vec!["pipe"]);
        assert!(d.text.contains("pipe (a FIFO) was deleted"), "{}", d.text);
    }

    #[test]
    fn symlinks_are_recorded_as_their_target_and_never_followed() {
        let (_dir, root, cfg) = setup();
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("secret.txt"), "SECRET-BYTES").expect("write");
        std::fs::create_dir(root.join("sub")).expect("mkdir");
        let snap = take(&root, &cfg);
        std::os::unix::fs::symlink(outside.path().join("secret.txt"), root.join("link"))
            .expect("symlink");
        // A subdirectory swapped for a link out: the walk does not go through it.
        std::fs::rename(root.join("sub"), root.join("sub.orig")).expect("mv");
        std::os::unix::fs::symlink(outside.path(), root.join("sub")).expect("symlink");
        let d = snap.diff(&Progress::default());
        assert!(!d.text.contains("SECRET-BYTES"), "{}", d.text);
        assert!(
            d.text.contains(&format!(
                "Symbolic link link → {}",
                outside.path().join("secret.txt").display()
            )),
            "{}",
            d.text
        );
        assert_eq!(d.files, vec!["link", "sub"]);
    }

    #[test]
    fn a_workdir_replaced_during_the_run_is_not_diffed() {
        let (dir, root, cfg) = setup();
        let w = root.join("w");
        std::fs::create_dir(&w).expect("mkdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("secret.txt"), "SECRET-BYTES").expect("write");
        let snap = take(&w, &cfg);
        std::fs::rename(&w, root.join("w.orig")).expect("mv");
        std::os::unix::fs::symlink(outside.path(), &w).expect("symlink");
        let d = snap.diff(&Progress::default());
        assert!(
            d.text
                .starts_with("# the workdir was replaced during the run; not diffed ("),
            "{}",
            d.text
        );
        assert!(!d.text.contains("SECRET"), "{}", d.text);
        assert!(d.files.is_empty());
        // Another directory at the same path is not the one that was checked either.
        std::fs::remove_file(&w).expect("rm");
        std::fs::create_dir(&w).expect("mkdir");
        let d = snap.diff(&Progress::default());
        assert!(d.text.contains("is another directory now"), "{}", d.text);
        drop(dir);
    }

    #[test]
    fn a_walk_past_its_budget_stops_and_says_so() {
        let (_dir, root, mut cfg) = setup();
        std::fs::write(root.join("a.txt"), "a\n").expect("write");
        cfg.context.max_diff_seconds = 0;
        let s = take(&root, &cfg);
        let d = s.diff(&Progress::default());
        assert!(
            d.text.starts_with("# the snapshot before the run was not finished (it took longer than 0 s (context.max_diff_seconds)"),
            "{}",
            d.text
        );
        assert!(d.files.is_empty());
    }
}
