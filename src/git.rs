//! Every git operation orchestrate makes: snapshot commits of a user's working tree, one worktree
//! per attempt, the task's own commit, its diff, landing it back in the user's tree, and removing
//! what an attempt left.
//!
//! It runs the `git` command rather than linking a library: users already have git, with their own
//! configuration (credentials, `safe.directory`, filters, large-file setups, sparse checkouts), and
//! the command is what honours all of it; a library reimplements part of git and differs on the
//! edges (worktrees, `merge-tree`, index extensions). Every call is bounded by a timeout, never
//! prompts (`GIT_TERMINAL_PROMPT=0`), runs no hooks (`core.hooksPath=/dev/null`) and ignores the
//! `GIT_DIR`-style variables of whoever started the supervisor.
//!
//! It must never touch the user's index or `HEAD`, except when landing with `commit`, and never
//! leave a change half-applied in the user's working tree: a landing is merged in a temporary index
//! first and written to the tree only when it is clean. It knows nothing of tasks or the spool.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// No git operation orchestrate makes should take longer (the largest is a worktree checkout).
pub const TIMEOUT: Duration = Duration::from_secs(300);

/// Who orchestrate's own commits are by.
pub const AUTHOR_NAME: &str = "orchestrate";
pub const AUTHOR_EMAIL: &str = "orchestrate@localhost";

/// Held while a user's working tree is read for a snapshot or written by a landing, so a snapshot
/// never sees a landing half-way. One lock for all repositories: both steps are short.
static TREE_LOCK: Mutex<()> = Mutex::new(());

fn tree_lock() -> std::sync::MutexGuard<'static, ()> {
    TREE_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Variables that would point git somewhere else than the directory it is run in.
const FOREIGN_VARS: &[&str] = &[
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_PREFIX",
];

/// One git invocation in `dir`.
struct Git<'a> {
    dir: &'a Path,
    args: Vec<String>,
    env: Vec<(String, String)>,
    input: Option<Vec<u8>>,
}

struct Out {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
}

impl<'a> Git<'a> {
    fn new(dir: &'a Path, args: &[&str]) -> Self {
        Git {
            dir,
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            input: None,
        }
    }

    /// What git reads on its standard input (otherwise it reads nothing).
    fn input(mut self, bytes: Vec<u8>) -> Self {
        self.input = Some(bytes);
        self
    }

    fn arg(mut self, a: impl AsRef<std::ffi::OsStr>) -> Self {
        self.args.push(a.as_ref().to_string_lossy().into_owned());
        self
    }

    fn env(mut self, k: &str, v: impl AsRef<std::ffi::OsStr>) -> Self {
        self.env
            .push((k.into(), v.as_ref().to_string_lossy().into_owned()));
        self
    }

    fn index(self, index: &Path) -> Self {
        self.env("GIT_INDEX_FILE", index)
    }

    fn author(self) -> Self {
        self.env("GIT_AUTHOR_NAME", AUTHOR_NAME)
            .env("GIT_AUTHOR_EMAIL", AUTHOR_EMAIL)
            .env("GIT_COMMITTER_NAME", AUTHOR_NAME)
            .env("GIT_COMMITTER_EMAIL", AUTHOR_EMAIL)
    }

    /// Run to the end, within [`TIMEOUT`]; the exit status is the caller's to judge.
    fn output(&self) -> Result<Out> {
        let mut cmd = Command::new("git");
        cmd.arg("-c")
            .arg("core.hooksPath=/dev/null")
            .args(&self.args)
            .current_dir(self.dir)
            .stdin(if self.input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_OPTIONAL_LOCKS", "0")
            .env("LC_ALL", "C");
        for v in FOREIGN_VARS {
            cmd.env_remove(v);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let what = format!("git {}", self.args.join(" "));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run {what} in {}", self.dir.display()))?;
        // Input fed and both pipes drained beside the wait, so no pipe can block git.
        let t_in = child.stdin.take().map(|mut si| {
            let bytes = self.input.clone().unwrap_or_default();
            std::thread::spawn(move || {
                use std::io::Write;
                let _ = si.write_all(&bytes);
            })
        });
        let mut so = child.stdout.take().expect("piped");
        let mut se = child.stderr.take().expect("piped");
        let t_out = std::thread::spawn(move || {
            let mut b = vec![];
            let _ = so.read_to_end(&mut b);
            b
        });
        let t_err = std::thread::spawn(move || {
            let mut b = vec![];
            let _ = se.read_to_end(&mut b);
            b
        });
        let deadline = Instant::now() + TIMEOUT;
        let mut pause = Duration::from_millis(1);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{what} in {} took longer than {} s and was stopped",
                    self.dir.display(),
                    TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        };
        if let Some(t) = t_in {
            let _ = t.join();
        }
        let stdout = t_out.join().unwrap_or_default();
        let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default())
            .trim()
            .to_string();
        Ok(Out {
            code: status.code(),
            stdout,
            stderr,
        })
    }

    /// Run and require success; stdout comes back.
    fn run(&self) -> Result<Vec<u8>> {
        let out = self.output()?;
        if out.code != Some(0) {
            bail!(
                "git {} in {} failed: {}",
                self.args.join(" "),
                self.dir.display(),
                if out.stderr.is_empty() {
                    format!("exit {:?}", out.code)
                } else {
                    out.stderr
                }
            );
        }
        Ok(out.stdout)
    }

    /// Run, require success, and return the first line of stdout.
    fn line(&self) -> Result<String> {
        let out = self.run()?;
        Ok(String::from_utf8_lossy(&out)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string())
    }
}

/// The top of the work tree `dir` is in, or `None` when it is in none.
pub fn toplevel(dir: &Path) -> Result<Option<PathBuf>> {
    let out = Git::new(dir, &["rev-parse", "--show-toplevel"]).output()?;
    if out.code != Some(0) {
        return Ok(None);
    }
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok((!s.is_empty()).then(|| PathBuf::from(s)))
}

/// A temporary index file beside the repository's own (never the user's), removed when dropped.
struct TempIndex(PathBuf);

impl TempIndex {
    fn new(root: &Path) -> Result<TempIndex> {
        let git_dir = Git::new(root, &["rev-parse", "--absolute-git-dir"]).line()?;
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(TempIndex(PathBuf::from(git_dir).join(format!(
            "orchestrate-index-{}-{n}",
            std::process::id()
        ))))
    }
}

impl Drop for TempIndex {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(self.0.with_extension("lock"));
    }
}

/// `:(exclude)` pathspecs for `excludes` that lie inside `root` (orchestrate's own folders, whose
/// files come and go while `add` walks the tree). Ignored ones need none: `add` never enters them,
/// and naming them would make it fail.
fn exclude_specs(root: &Path, excludes: &[PathBuf]) -> Result<Vec<String>> {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let mut specs = vec![];
    for p in excludes {
        let p = p.canonicalize().unwrap_or_else(|_| p.clone());
        let Ok(rel) = p.strip_prefix(&root) else {
            continue;
        };
        let rel = rel.to_string_lossy().into_owned();
        if rel.is_empty() {
            continue;
        }
        let ignored = Git::new(&root, &["check-ignore", "-q", "--no-index", "--"])
            .arg(format!("{rel}/"))
            .output()?;
        if ignored.code != Some(0) {
            specs.push(format!(":(exclude,top,literal){rel}"));
        }
    }
    Ok(specs)
}

/// The commit of `HEAD` in `root`, refusing an unborn branch with a clear error.
fn head(root: &Path) -> Result<String> {
    let out = Git::new(root, &["rev-parse", "--verify", "-q", "HEAD^{commit}"]).output()?;
    if out.code != Some(0) {
        bail!(
            "the git repository at {} has no commit yet (an unborn branch): commit once, or set \
             `isolation: none` for this task",
            root.display()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Refuse, before anything is made, a repository whose shape worktrees cannot serve: today an
/// unborn branch (no commit to start from). Detached `HEAD`s, sparse checkouts and submodules are
/// served; what cannot land from them is refused when landing, naming the paths.
pub fn check_repository(root: &Path) -> Result<()> {
    head(root)?;
    Ok(())
}

/// Whether `HEAD` at `root` is a branch (not detached).
fn on_branch(root: &Path) -> Result<bool> {
    let out = Git::new(root, &["symbolic-ref", "-q", "HEAD"]).output()?;
    match out.code {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => bail!(
            "git symbolic-ref HEAD in {} failed: {}",
            root.display(),
            out.stderr
        ),
    }
}

/// Whether the work tree `dir` is a sparse checkout (`git sparse-checkout`, cone or not).
fn is_sparse(dir: &Path) -> Result<bool> {
    let out = Git::new(dir, &["config", "--bool", "core.sparseCheckout"]).output()?;
    Ok(out.code == Some(0) && String::from_utf8_lossy(&out.stdout).trim() == "true")
}

/// The submodule folders of the work tree `dir` that are not empty: files written there (or a
/// submodule checked out there) belong to no commit of `dir`'s repository.
pub fn filled_submodule_folders(dir: &Path) -> Result<Vec<String>> {
    let out = Git::new(dir, &["ls-files", "-s", "-z"]).run()?;
    let mut filled = vec![];
    for entry in out.split(|b| *b == 0) {
        let entry = String::from_utf8_lossy(entry);
        let Some((meta, path)) = entry.split_once('\t') else {
            continue;
        };
        if meta.starts_with("160000 ")
            && std::fs::read_dir(dir.join(path)).is_ok_and(|mut rd| rd.next().is_some())
        {
            filled.push(path.to_string());
        }
    }
    Ok(filled)
}

/// The entries of the user's index at `root` marked skip-worktree (outside a sparse checkout, so
/// absent from the tree): `(mode, object, path)`.
fn skip_worktree_entries(root: &Path, paths: &[String]) -> Result<Vec<(String, String, String)>> {
    let mut ls = Git::new(root, &["ls-files", "-s", "-t", "-z", "--"]);
    for p in paths {
        ls = ls.arg(format!(":(literal,top){p}"));
    }
    let out = ls.run()?;
    let mut entries = vec![];
    for entry in out.split(|b| *b == 0) {
        let entry = String::from_utf8_lossy(entry);
        // "S <mode> <object> <stage>\t<path>"
        let Some(rest) = entry.strip_prefix("S ") else {
            continue;
        };
        let Some((info, path)) = rest.split_once('\t') else {
            continue;
        };
        let mut f = info.split(' ');
        if let (Some(mode), Some(object)) = (f.next(), f.next()) {
            entries.push((mode.to_string(), object.to_string(), path.to_string()));
        }
    }
    Ok(entries)
}

/// The paths `from` → `to` (commits or trees) touches, both paths of a rename included.
fn changed_paths(root: &Path, from: &str, to: &str) -> Result<Vec<String>> {
    let names = Git::new(
        root,
        &[
            "diff",
            "--no-ext-diff",
            "-M",
            "--name-status",
            "-z",
            from,
            to,
        ],
    )
    .run()?;
    let mut files = vec![];
    let mut fields = names
        .split(|b| *b == 0)
        .filter(|f| !f.is_empty())
        .map(|f| String::from_utf8_lossy(f).into_owned());
    while let Some(status) = fields.next() {
        // Renames and copies carry two paths, everything else one.
        let n = if status.starts_with('R') || status.starts_with('C') {
            2
        } else {
            1
        };
        for _ in 0..n {
            if let Some(p) = fields.next()
                && !files.contains(&p)
            {
                files.push(p);
            }
        }
    }
    Ok(files)
}

/// The submodules (gitlinks) whose commit `from` → `to` changes, adds or removes.
fn changed_submodules(root: &Path, from: &str, to: &str) -> Result<Vec<String>> {
    let raw = Git::new(
        root,
        &[
            "diff",
            "--raw",
            "-z",
            "--no-renames",
            "--no-abbrev",
            from,
            to,
        ],
    )
    .run()?;
    let mut paths = vec![];
    let mut fields = raw.split(|b| *b == 0).filter(|f| !f.is_empty());
    // ":<old mode> <new mode> <old> <new> <status>" then the path.
    while let (Some(meta), Some(path)) = (fields.next(), fields.next()) {
        let meta = String::from_utf8_lossy(meta);
        let mut modes = meta.trim_start_matches(':').split(' ');
        if modes.next() == Some("160000") || modes.next() == Some("160000") {
            paths.push(String::from_utf8_lossy(path).into_owned());
        }
    }
    Ok(paths)
}

/// A commit of what the user sees in `root` now: `HEAD` plus uncommitted changes to tracked files
/// plus untracked files that are not ignored, leaving out `excludes`; files outside a sparse
/// checkout as the user's index holds them. Made in a temporary index, so the user's index and tree
/// stay as they are.
pub fn snapshot(root: &Path, excludes: &[PathBuf], message: &str) -> Result<String> {
    let _tree = tree_lock();
    snapshot_locked(root, excludes, message)
}

/// [`snapshot`], with the tree lock already held.
fn snapshot_locked(root: &Path, excludes: &[PathBuf], message: &str) -> Result<String> {
    let head = head(root)?;
    match seeded_index(root)? {
        Some(index) => {
            let made = snapshot_in(root, &index, true, &head, excludes, message);
            if made.is_err() {
                // Whatever state a failed step left it in, the next snapshot starts afresh.
                forget_seed(&index);
            }
            made
        }
        None => {
            let index = TempIndex::new(root)?;
            snapshot_in(root, &index.0, false, &head, excludes, message)
        }
    }
}

/// Indexes that snapshots start from, one per repository (by the path of the user's index): a
/// copy of the user's index, kept and brought up to date by each snapshot, so `add` hashes only
/// the files changed since the last snapshot or since git last looked (from `HEAD` alone it
/// would hash every file of the tree). The copy keeps the user's index's time, so entries racily
/// clean there are compared by content here too. Skip-worktree bits of a sparse checkout come along.
/// Seeded again whenever the user's index changes (a commit, a `git add`, a new sparse pattern).
static SEEDS: Mutex<Option<std::collections::HashMap<PathBuf, Seed>>> = Mutex::new(None);

struct Seed {
    /// Our index, in the repository's git folder (beside the user's, where split-index files are
    /// looked for).
    file: PathBuf,
    /// The user's index as it was when copied: modification time, size, inode.
    from: (std::time::SystemTime, u64, u64),
}

fn seeds() -> std::sync::MutexGuard<'static, Option<std::collections::HashMap<PathBuf, Seed>>> {
    SEEDS.lock().unwrap_or_else(|p| p.into_inner())
}

/// The index a snapshot of `root` starts from (see [`SEEDS`]); `None` when the user's index does
/// not exist (a snapshot starts from `HEAD` then). Called with the tree lock held.
fn seeded_index(root: &Path) -> Result<Option<PathBuf>> {
    use std::os::unix::fs::MetadataExt;
    let user = PathBuf::from(
        Git::new(
            root,
            &["rev-parse", "--path-format=absolute", "--git-path", "index"],
        )
        .line()?,
    );
    let meta = match std::fs::metadata(&user) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", user.display())),
    };
    let from = (meta.modified()?, meta.len(), meta.ino());
    let mut seeds = seeds();
    let seeds = seeds.get_or_insert_with(Default::default);
    if let Some(s) = seeds.get(&user)
        && s.from == from
        && s.file.exists()
    {
        return Ok(Some(s.file.clone()));
    }
    let dir = user.parent().unwrap_or(Path::new("."));
    if !seeds.contains_key(&user) {
        remove_dead_temp_files(dir);
    }
    let file = dir.join(format!("orchestrate-index-{}", std::process::id()));
    // The user's index is replaced by a rename whenever git writes it: the copy is one whole
    // version.
    std::fs::copy(&user, &file).with_context(|| format!("cannot copy {}", user.display()))?;
    // Dated as the user's index: git judges an entry "racily clean" (and compares contents, not
    // stat data) by the index file's time, in whole seconds. A copy dated now would make git trust
    // the stat data of a file edited in the second the user's index was written, same size, and
    // the snapshot would hold the old contents.
    std::fs::File::options()
        .write(true)
        .open(&file)
        .and_then(|f| f.set_modified(from.0))
        .with_context(|| format!("cannot date {}", file.display()))?;
    seeds.insert(
        user,
        Seed {
            file: file.clone(),
            from,
        },
    );
    Ok(Some(file))
}

/// Drop the seed kept in `index` (it is removed; the next snapshot seeds again).
fn forget_seed(index: &Path) {
    if let Some(seeds) = seeds().as_mut() {
        seeds.retain(|_, s| s.file != index);
    }
    let _ = std::fs::remove_file(index);
    let _ = std::fs::remove_file(index.with_extension("lock"));
}

/// Remove every index kept for snapshots (the supervisor is stopping).
pub fn forget_seeds() {
    let files: Vec<PathBuf> = seeds()
        .take()
        .map(|m| m.into_values().map(|s| s.file).collect())
        .unwrap_or_default();
    for f in files {
        let _ = std::fs::remove_file(&f);
        let _ = std::fs::remove_file(f.with_extension("lock"));
    }
}

/// Remove orchestrate's temporary index files in the git folder `dir` whose process is gone (a
/// supervisor killed during a snapshot or a landing).
fn remove_dead_temp_files(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("orchestrate-index-") else {
            continue;
        };
        let pid = rest
            .split(['-', '.'])
            .next()
            .and_then(|p| p.parse::<i32>().ok());
        // SAFETY: signal 0 only asks whether the process exists.
        let alive = pid.is_some_and(|p| {
            p as u32 == std::process::id()
                || unsafe { libc::kill(p, 0) } == 0
                || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
        });
        if !alive {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A snapshot made in the index file `index` (`seeded`: it starts as a copy of the user's index;
/// otherwise it is empty and starts from `head`).
fn snapshot_in(
    root: &Path,
    index: &Path,
    seeded: bool,
    head: &str,
    excludes: &[PathBuf],
    message: &str,
) -> Result<String> {
    if !seeded {
        Git::new(root, &["read-tree", head]).index(index).run()?;
    }
    let sparse = is_sparse(root)?;
    if sparse && !seeded {
        // Files outside a sparse checkout are absent from the tree by design. The temporary index
        // gets the user's entries for them, marked skip-worktree as in the user's index, so `add`
        // keeps them instead of recording them deleted (a base that deleted them would land
        // deleting them).
        let entries = skip_worktree_entries(root, &[])?;
        if !entries.is_empty() {
            let mut info = vec![];
            let mut paths = vec![];
            for (mode, object, path) in entries {
                info.extend(format!("{mode} {object}\t{path}\0").into_bytes());
                paths.extend(path.into_bytes());
                paths.push(0);
            }
            Git::new(root, &["update-index", "-z", "--index-info"])
                .index(index)
                .input(info)
                .run()?;
            Git::new(root, &["update-index", "-z", "--skip-worktree", "--stdin"])
                .index(index)
                .input(paths)
                .run()?;
        }
    }
    let mut add = Git::new(root, &["add", "-A"]).index(index);
    if sparse {
        // An untracked file the user made outside the sparse checkout is part of what they see;
        // without `--sparse`, `add` refuses the whole walk over it.
        add = add.arg("--sparse");
    }
    add = add.arg("--").arg(".");
    for s in exclude_specs(root, excludes)? {
        add = add.arg(s);
    }
    add.run()?;
    let tree = Git::new(root, &["write-tree"]).index(index).line()?;
    Git::new(root, &["commit-tree", &tree, "-p", head, "-m", message])
        .author()
        .line()
}

/// A new worktree at `path` on branch `branch` (created at `base`, or reset there when a stale one
/// of the same name exists).
pub fn add_worktree(root: &Path, path: &Path, branch: &str, base: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    Git::new(root, &["worktree", "add", "-f", "-q", "-B", branch])
        .arg(path)
        .arg(base)
        .run()?;
    Ok(())
}

/// Move the worktree at `from` to `to` (its folder and git's records of it): how a pooled
/// worktree changes hands without creating or deleting a file of its checkout.
pub fn move_worktree(root: &Path, from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    Git::new(root, &["worktree", "move"])
        .arg(from)
        .arg(to)
        .run()?;
    Ok(())
}

/// Make the existing worktree `wt` what [`add_worktree`] would have made: on `branch` (created or
/// reset) at `base`, with no file git does not track at `base`, ignored ones included. Only the
/// files that differ between its checkout and `base` are written.
pub fn reset_worktree(wt: &Path, branch: &str, base: &str) -> Result<()> {
    Git::new(
        wt,
        &[
            "checkout",
            "-q",
            "-f",
            "--ignore-other-worktrees",
            "-B",
            branch,
            base,
        ],
    )
    .run()?;
    Git::new(wt, &["clean", "-q", "-ffdx"]).run()?;
    Ok(())
}

/// Put the worktree `wt` back to its `HEAD`: tracked files as committed, files git does not track
/// and does not ignore removed. Ignored files stay.
pub fn restore_to_head(wt: &Path) -> Result<()> {
    Git::new(wt, &["reset", "-q", "--hard", "HEAD"]).run()?;
    Git::new(wt, &["clean", "-q", "-ffd"]).run()?;
    Ok(())
}

/// Leave the worktree `wt` on its current commit without a branch, so the branch can be deleted
/// or checked out elsewhere; no file is touched.
pub fn detach(wt: &Path) -> Result<()> {
    let head = Git::new(wt, &["rev-parse", "HEAD"]).line()?;
    Git::new(wt, &["update-ref", "--no-deref", "HEAD", &head]).run()?;
    Ok(())
}

/// The worktree `wt`'s own git folder (`<common dir>/worktrees/<name>`), read from its `.git`
/// file without git; it goes when the worktree is removed.
pub fn private_dir(wt: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(wt.join(".git")).ok()?;
    Some(PathBuf::from(text.strip_prefix("gitdir:")?.trim()))
}

/// The repository's common git folder (the main worktree's `.git`), as an absolute path.
pub fn common_dir(root: &Path) -> Result<PathBuf> {
    let dir = Git::new(
        root,
        &["rev-parse", "--path-format=absolute", "--git-common-dir"],
    )
    .line()?;
    Ok(PathBuf::from(dir))
}

/// The branch `wt` has checked out (`None` when detached or unreadable).
pub fn current_branch(wt: &Path) -> Option<String> {
    Git::new(wt, &["symbolic-ref", "-q", "--short", "HEAD"])
        .line()
        .ok()
        .filter(|s| !s.is_empty())
}

/// The commit `HEAD` of the worktree `wt` is on, when it is a working worktree.
pub fn worktree_head(wt: &Path) -> Option<String> {
    Git::new(wt, &["rev-parse", "--verify", "-q", "HEAD^{commit}"])
        .line()
        .ok()
        .filter(|s| !s.is_empty())
}

/// Commit everything in the worktree `wt` (it is on its branch) and return the commit. Made even
/// when nothing changed, so every attempt has a head to diff.
pub fn commit_all(wt: &Path, message: &str) -> Result<String> {
    // A worktree of a sparse checkout is sparse too (git copies the patterns): what the agent
    // wrote outside them is recorded all the same, and what is absent there is not deleted.
    if is_sparse(wt)? {
        Git::new(wt, &["add", "-A", "--sparse", "--", "."]).run()?;
    } else {
        Git::new(wt, &["add", "-A", "--", "."]).run()?;
    }
    let tree = Git::new(wt, &["write-tree"]).line()?;
    // The agent may have committed on its own: build on whatever the worktree's HEAD is now.
    let parent = Git::new(wt, &["rev-parse", "HEAD"]).line()?;
    let commit = Git::new(wt, &["commit-tree", &tree, "-p", &parent, "-m", message])
        .author()
        .line()?;
    Git::new(wt, &["update-ref", "HEAD", &commit, &parent]).run()?;
    Ok(commit)
}

/// The diff `base` → `head` (renames detected, binary files as git shows them) and the files it
/// touches, both paths of a rename included.
pub fn diff(root: &Path, base: &str, head: &str) -> Result<(String, Vec<String>)> {
    let text = Git::new(
        root,
        &[
            "diff",
            "--no-color",
            "--no-ext-diff",
            "-M",
            "--binary",
            base,
            head,
        ],
    )
    .run()?;
    let files = changed_paths(root, base, head)?;
    Ok((String::from_utf8_lossy(&text).into_owned(), files))
}

/// How a task's changes were landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    Apply,
    Commit,
    Branch,
}

/// What landing did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Landed {
    /// Written to the user's tree as uncommitted changes.
    Applied,
    /// Written to the tree and committed on the current branch.
    Committed(String),
    /// Left on the branch only.
    Kept,
    /// Not applied at all: these files conflict with what the user's tree holds now.
    Conflict(Vec<String>),
}

/// A three-way merge of `theirs` into `ours` from `base`, as `git merge-tree` computes it without
/// touching any tree or index: exit 0 and the merged tree's id, or 1 and the conflicting paths.
fn merge_tree(root: &Path, base: &str, ours: &str, theirs: &str) -> Result<Out> {
    Git::new(
        root,
        &[
            "merge-tree",
            "--write-tree",
            "--name-only",
            "--no-messages",
            "-z",
        ],
    )
    .arg(format!("--merge-base={base}"))
    .arg(ours)
    .arg(theirs)
    .output()
}

/// `onto` with the changes `from` → `to` merged in, three-way in git's object store (no tree or
/// index is touched): a new commit with parents `onto` and `to`, or the files that conflict.
pub fn merge_into(
    root: &Path,
    onto: &str,
    from: &str,
    to: &str,
    message: &str,
) -> Result<std::result::Result<String, Vec<String>>> {
    let out = merge_tree(root, from, onto, to)?;
    let mut fields = out
        .stdout
        .split(|b| *b == 0)
        .map(|f| String::from_utf8_lossy(f).into_owned());
    let tree = fields.next().unwrap_or_default();
    match out.code {
        Some(0) => {}
        Some(1) => {
            let mut files: Vec<String> = fields.filter(|f| !f.is_empty()).collect();
            files.dedup();
            return Ok(Err(files));
        }
        _ => bail!(
            "git merge-tree in {} failed: {}",
            root.display(),
            out.stderr
        ),
    }
    let commit = Git::new(
        root,
        &["commit-tree", &tree, "-p", onto, "-p", to, "-m", message],
    )
    .author()
    .line()?;
    Ok(Ok(commit))
}

/// Whether `commit` is a commit in the repository at `root`.
pub fn has_commit(root: &Path, commit: &str) -> bool {
    Git::new(root, &["cat-file", "-e"])
        .arg(format!("{commit}^{{commit}}"))
        .output()
        .is_ok_and(|o| o.code == Some(0))
}

/// Land `base` → `head` in the user's tree at `root`. The three-way merge runs in git's object
/// store (`merge-tree` against a snapshot of the tree as it is now); only a clean result is written
/// to the tree, by one `git apply` that checks every hunk before it writes any.
pub fn land(
    root: &Path,
    base: &str,
    head_commit: &str,
    how: Merge,
    excludes: &[PathBuf],
    message: &str,
) -> Result<Landed> {
    if how == Merge::Branch {
        return Ok(Landed::Kept);
    }
    if how == Merge::Commit && !on_branch(root)? {
        bail!(
            "the git repository at {} has a detached HEAD: `merge: commit` would make a commit no \
             branch holds, so nothing was written and the changes stay on the task's branch; check \
             out a branch (`git switch -c NAME`) and run `orchestrate merge ID --commit`, or use \
             `merge: apply`",
            root.display()
        );
    }
    let submodules = changed_submodules(root, base, head_commit)?;
    if !submodules.is_empty() {
        bail!(
            "the task changed the submodule {} of the git repository at {} (a commit made in the \
             task's worktree, which lands nowhere): nothing was written and the changes stay on the \
             task's branch; give a task that works on a submodule a workdir inside it",
            submodules.join(", submodule "),
            root.display()
        );
    }
    // Held from the snapshot of the tree to the end of the write: a landing of another task in
    // between would make the merge stale.
    let _tree = tree_lock();
    let now = snapshot_locked(
        root,
        excludes,
        "orchestrate: the working tree before landing",
    )?;
    let out = merge_tree(root, base, &now, head_commit)?;
    let mut fields = out
        .stdout
        .split(|b| *b == 0)
        .map(|f| String::from_utf8_lossy(f).into_owned());
    let merged = fields.next().unwrap_or_default();
    match out.code {
        Some(0) => {}
        Some(1) => {
            let mut files: Vec<String> = fields.filter(|f| !f.is_empty()).collect();
            files.dedup();
            return Ok(Landed::Conflict(files));
        }
        _ => bail!(
            "git merge-tree in {} failed: {}",
            root.display(),
            out.stderr
        ),
    }
    // What the tree must gain: its present state → the merged one, as one patch.
    let patch = Git::new(
        root,
        &[
            "diff",
            "--no-color",
            "--no-ext-diff",
            "--binary",
            "--full-index",
        ],
    )
    .arg(format!("{now}^{{tree}}"))
    .arg(&merged)
    .run()?;
    if !patch.is_empty() && is_sparse(root)? {
        // A file outside the user's sparse checkout is not in the tree to be written: landing
        // there would need the checkout widened.
        let paths = changed_paths(root, &format!("{now}^{{tree}}"), &merged)?;
        let outside: Vec<String> = skip_worktree_entries(root, &paths)?
            .into_iter()
            .map(|(_, _, p)| p)
            .collect();
        if !outside.is_empty() {
            bail!(
                "the task changed {} outside the sparse checkout of the git repository at {}: \
                 nothing was written and the changes stay on the task's branch; widen the checkout \
                 (`git sparse-checkout add DIR`) and run `orchestrate merge ID`",
                outside.join(", "),
                root.display()
            );
        }
    }
    if !patch.is_empty() {
        let file = TempIndex::new(root)?;
        std::fs::write(&file.0, &patch)
            .with_context(|| format!("cannot write {}", file.0.display()))?;
        // `git apply` without --index writes the tree only, and all or nothing.
        let out = Git::new(root, &["apply", "--whitespace=nowarn"])
            .arg(&file.0)
            .output()?;
        if out.code != Some(0) {
            // The tree changed under us between the snapshot and now: nothing was written.
            bail!(
                "the changes could not be applied to {} (nothing was changed): {}",
                root.display(),
                out.stderr
            );
        }
    }
    if how == Merge::Apply {
        return Ok(Landed::Applied);
    }
    // `commit`: the task's changes on top of HEAD, committed; the index follows for those paths.
    let user_head = head(root)?;
    let out = merge_tree(root, base, &user_head, head_commit)?;
    if out.code != Some(0) {
        // Applied to the tree, but HEAD itself conflicts (the user's uncommitted changes made it
        // apply): leave it applied, uncommitted.
        return Ok(Landed::Applied);
    }
    let tree = String::from_utf8_lossy(&out.stdout)
        .split('\0')
        .next()
        .unwrap_or_default()
        .to_string();
    // HEAD holds these changes already (the same landing again, after a crash): no empty commit.
    if Git::new(root, &["rev-parse", &format!("{user_head}^{{tree}}")]).line()? == tree {
        return Ok(Landed::Committed(user_head));
    }
    let commit = Git::new(
        root,
        &["commit-tree", &tree, "-p", &user_head, "-m", message],
    )
    .author()
    .line()?;
    Git::new(
        root,
        &["update-ref", "-m", message, "HEAD", &commit, &user_head],
    )
    .run()?;
    let (_, files) = diff(root, &user_head, &commit)?;
    if !files.is_empty() {
        let mut reset = Git::new(root, &["reset", "-q", &commit, "--"]);
        for f in &files {
            reset = reset.arg(format!(":(literal,top){f}"));
        }
        reset.run()?;
    }
    Ok(Landed::Committed(commit))
}

/// Whether git in the work tree `root` ignores `rel` (a path relative to its top; `dir` says it
/// names a folder, as a `name/` pattern only matches folders). A tracked path is never ignored.
pub fn is_ignored(root: &Path, rel: &str, dir: bool) -> Result<bool> {
    let path = if dir {
        format!("{}/", rel.trim_end_matches('/'))
    } else {
        rel.to_string()
    };
    let out = Git::new(root, &["check-ignore", "-q", "--"])
        .arg(path)
        .output()?;
    match out.code {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => bail!(
            "git check-ignore {rel} in {} failed: {}",
            root.display(),
            out.stderr
        ),
    }
}

/// Files git tracks at or under `rel` in the work tree `root` (at most a few: enough to name one).
pub fn tracked_under(root: &Path, rel: &str) -> Result<Vec<String>> {
    let out = Git::new(root, &["ls-files", "-z", "--"])
        .arg(format!(":(top,literal){rel}"))
        .run()?;
    Ok(out
        .split(|b| *b == 0)
        .filter(|f| !f.is_empty())
        .take(3)
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect())
}

/// Untracked files at or under `rel` in the work tree `root` that git does not ignore: what
/// `git add -A` would take into a commit.
pub fn unignored_under(root: &Path, rel: &str) -> Result<Vec<String>> {
    let out = Git::new(
        root,
        &["ls-files", "-z", "--others", "--exclude-standard", "--"],
    )
    .arg(format!(":(top,literal){rel}"))
    .run()?;
    Ok(out
        .split(|b| *b == 0)
        .filter(|f| !f.is_empty())
        .take(3)
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect())
}

/// Remove the worktree at `path` (its folder and git's record of it), then prune records of
/// worktrees whose folders are gone.
pub fn remove_worktree(root: &Path, path: &Path) -> Result<()> {
    let out = Git::new(root, &["worktree", "remove", "--force", "--force"])
        .arg(path)
        .output()?;
    if path.exists() {
        std::fs::remove_dir_all(path).with_context(|| {
            format!(
                "cannot remove the worktree {} ({})",
                path.display(),
                out.stderr
            )
        })?;
    }
    Git::new(root, &["worktree", "prune"]).run()?;
    Ok(())
}

/// Delete `branch` (a local branch orchestrate made).
pub fn delete_branch(root: &Path, branch: &str) -> Result<()> {
    Git::new(root, &["branch", "-q", "-D", branch]).run()?;
    Ok(())
}

/// The repository a worktree folder belongs to, read from its `.git` file (`gitdir: <repo>/.git/
/// worktrees/<name>`), without git: the folder may be half made.
pub fn worktree_repo(path: &Path) -> Option<PathBuf> {
    let gitdir = private_dir(path)?;
    // <common git dir>/worktrees/<name>
    let common = gitdir.parent()?.parent()?;
    Some(common.to_path_buf())
}

/// Remove an orphaned worktree folder: through git when its repository is known, by hand
/// otherwise, and prune the repository's records.
pub fn remove_orphan(path: &Path) -> Result<()> {
    if let Some(common) = worktree_repo(path)
        && common.is_dir()
    {
        let _ = Git::new(&common, &["worktree", "remove", "--force", "--force"])
            .arg(path)
            .output();
        if path.exists() {
            std::fs::remove_dir_all(path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
        Git::new(&common, &["worktree", "prune"]).run()?;
        return Ok(());
    }
    if path.exists() {
        std::fs::remove_dir_all(path)
            .with_context(|| format!("cannot remove {}", path.display()))?;
    }
    Ok(())
}

/// The commit `HEAD` names in the repository at `root`; `None` before the first commit.
pub fn head_commit(root: &Path) -> Option<String> {
    Git::new(root, &["rev-parse", "--verify", "-q", "HEAD^{commit}"])
        .line()
        .ok()
        .filter(|c| !c.is_empty())
}

/// Make `commit` present at `root`: there already, or fetched from the `origin` remote. The error
/// says which it was not (no such remote, or the remote does not have it).
pub fn fetch_commit(root: &Path, commit: &str) -> Result<()> {
    if has_commit(root, commit) {
        return Ok(());
    }
    let remote = Git::new(root, &["remote", "get-url", "origin"]).line().ok();
    let Some(url) = remote.filter(|u| !u.is_empty()) else {
        bail!(
            "commit {commit} is not in this repository, and it has no `origin` remote to fetch it from"
        );
    };
    Git::new(root, &["fetch", "-q", "--no-tags", "origin"])
        .arg(commit)
        .run()
        .with_context(|| {
            format!("commit {commit} is not in this repository nor fetchable from origin ({url})")
        })?;
    if !has_commit(root, commit) {
        bail!(
            "commit {commit} is not in this repository, and fetching it from origin ({url}) did not bring it"
        );
    }
    Ok(())
}

/// A commit of `patch` (as [`diff`] writes it) on top of `base`, made in git's object store alone
/// (a private index; no tree or branch is touched). Fails when the patch does not apply to `base`.
pub fn commit_patch(root: &Path, base: &str, patch: &str, message: &str) -> Result<String> {
    let dir = common_dir(root)?;
    // Several outcomes land at once: each its own index.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let index = dir.join(format!(
        "orchestrate-patch-{}-{n}.index",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&index);
    let made = (|| -> Result<String> {
        Git::new(root, &["read-tree", base]).index(&index).run()?;
        if !patch.trim().is_empty() {
            Git::new(
                root,
                &["apply", "--cached", "--binary", "--whitespace=nowarn", "-"],
            )
            .index(&index)
            .input(patch.as_bytes().to_vec())
            .run()?;
        }
        let tree = Git::new(root, &["write-tree"]).index(&index).line()?;
        Git::new(root, &["commit-tree", &tree, "-p", base, "-m", message])
            .author()
            .line()
    })();
    let _ = std::fs::remove_file(&index);
    made
}

/// Point branch `name` at `commit` (made or moved).
pub fn set_branch(root: &Path, name: &str, commit: &str) -> Result<()> {
    Git::new(root, &["update-ref"])
        .arg(format!("refs/heads/{name}"))
        .arg(commit)
        .run()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn repo() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        sh(d.path(), &["init", "-q"]);
        std::fs::write(d.path().join("a.txt"), "one\ntwo\n").unwrap();
        std::fs::write(d.path().join(".gitignore"), "ignored/\n").unwrap();
        sh(d.path(), &["add", "."]);
        sh(d.path(), &["commit", "-qm", "init"]);
        d
    }

    #[test]
    fn snapshot_holds_uncommitted_and_untracked_files_and_leaves_the_index_alone() {
        let d = repo();
        let r = d.path();
        std::fs::write(r.join("a.txt"), "one\nTWO\n").unwrap();
        std::fs::write(r.join("new.txt"), "new\n").unwrap();
        std::fs::create_dir(r.join("ignored")).unwrap();
        std::fs::write(r.join("ignored/x"), "x").unwrap();
        std::fs::create_dir(r.join("own")).unwrap();
        std::fs::write(r.join("own/y"), "y").unwrap();
        let index_before = std::fs::read(r.join(".git/index")).unwrap();
        let c = snapshot(r, &[r.join("own")], "snap").unwrap();
        assert_eq!(sh(r, &["show", &format!("{c}:a.txt")]), "one\nTWO\n");
        assert_eq!(sh(r, &["show", &format!("{c}:new.txt")]), "new\n");
        let files = sh(r, &["ls-tree", "-r", "--name-only", &c]);
        assert!(!files.contains("ignored/x"), "{files}");
        assert!(!files.contains("own/y"), "{files}");
        assert_eq!(std::fs::read(r.join(".git/index")).unwrap(), index_before);
        assert!(sh(r, &["status", "--porcelain"]).contains("?? new.txt"));
        let author = sh(r, &["log", "-1", "--format=%an <%ae>", &c]);
        assert_eq!(author.trim(), "orchestrate <orchestrate@localhost>");
    }

    /// An edit made within the second the user's index was written (git compares times in whole
    /// seconds) can leave the file's stat data as the index recorded it: the entry is "racily
    /// clean", and git compares contents, so must a snapshot. Its copy of the index keeps the
    /// user's index's time; a copy dated a second later would make git trust the stat data and
    /// miss the edit (seen in CI). Made deterministic here: the file's and the index's times are
    /// put ten seconds back, and ctime is not trusted.
    #[test]
    fn a_racily_clean_edit_is_in_the_snapshot() {
        let d = repo();
        let r = d.path();
        sh(r, &["config", "core.trustctime", "false"]);
        let set = |p: &Path, t: std::time::SystemTime| {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        };
        let a = r.join("a.txt");
        let then = std::time::SystemTime::now() - Duration::from_secs(10);
        set(&a, then);
        sh(r, &["update-index", "--refresh"]);
        std::fs::write(&a, "one\nTWO\n").unwrap();
        set(&a, then);
        set(&r.join(".git/index"), then);
        let c = snapshot(r, &[], "snap").unwrap();
        assert_eq!(sh(r, &["show", &format!("{c}:a.txt")]), "one\nTWO\n");
    }

    #[test]
    fn an_unborn_branch_is_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        sh(d.path(), &["init", "-q"]);
        let e = check_repository(d.path()).unwrap_err().to_string();
        assert!(e.contains("no commit yet"), "{e}");
        assert!(e.contains(&d.path().display().to_string()), "{e}");
        let e = snapshot(d.path(), &[], "snap").unwrap_err().to_string();
        assert!(e.contains("no commit yet"), "{e}");
        check_repository(repo().path()).unwrap();
    }

    /// Files outside a sparse checkout are absent from the tree but not deleted: the snapshot
    /// keeps them (as the user's index has them), takes in an untracked file made outside it, and
    /// leaves the user's skip-worktree bits alone.
    #[test]
    fn a_snapshot_of_a_sparse_checkout_keeps_the_files_outside_it() {
        let d = repo();
        let r = d.path();
        std::fs::create_dir_all(r.join("in")).unwrap();
        std::fs::create_dir_all(r.join("out/deep")).unwrap();
        std::fs::write(r.join("in/i.txt"), "i\n").unwrap();
        std::fs::write(r.join("out/o.txt"), "o\n").unwrap();
        std::fs::write(r.join("out/deep/d.txt"), "d\n").unwrap();
        sh(r, &["add", "."]);
        sh(r, &["commit", "-qm", "dirs"]);
        sh(r, &["sparse-checkout", "set", "in"]);
        assert!(!r.join("out/o.txt").exists());
        std::fs::create_dir_all(r.join("out")).unwrap();
        std::fs::write(r.join("out/mine.txt"), "mine\n").unwrap();
        // Another size than before: a same-size rewrite within the index's timestamp second is
        // one git may not look at again (racily clean), which is git's business, not the test's.
        std::fs::write(r.join("in/i.txt"), "I, changed\n").unwrap();
        let tagged_before = sh(r, &["ls-files", "-t"]);
        let c = snapshot(r, &[], "snap").unwrap();
        let files = sh(r, &["ls-tree", "-r", "--name-only", &c]);
        assert_eq!(
            files,
            ".gitignore\na.txt\nin/i.txt\nout/deep/d.txt\nout/mine.txt\nout/o.txt\n"
        );
        assert_eq!(sh(r, &["show", &format!("{c}:in/i.txt")]), "I, changed\n");
        assert_eq!(sh(r, &["show", &format!("{c}:out/o.txt")]), "o\n");
        assert_eq!(sh(r, &["ls-files", "-t"]), tagged_before);
        assert!(tagged_before.contains("S out/o.txt"), "{tagged_before}");
    }

    #[test]
    fn commit_mode_on_a_detached_head_writes_nothing_and_says_why() {
        let d = repo();
        let r = d.path();
        sh(r, &["checkout", "-q", "--detach"]);
        let before = sh(r, &["rev-parse", "HEAD"]);
        let wts = tempfile::tempdir().unwrap();
        let base = snapshot(r, &[], "snap").unwrap();
        let wt = wts.path().join("t4-1");
        add_worktree(r, &wt, "orchestrate/t4", &base).unwrap();
        std::fs::write(wt.join("e.txt"), "e\n").unwrap();
        let head = commit_all(&wt, "t4").unwrap();
        let e = land(r, &base, &head, Merge::Commit, &[], "m")
            .unwrap_err()
            .to_string();
        assert!(e.contains("detached HEAD"), "{e}");
        assert!(!r.join("e.txt").exists());
        assert_eq!(sh(r, &["rev-parse", "HEAD"]), before);
        assert_eq!(
            land(r, &base, &head, Merge::Apply, &[], "m").unwrap(),
            Landed::Applied
        );
        assert_eq!(std::fs::read_to_string(r.join("e.txt")).unwrap(), "e\n");
        remove_worktree(r, &wt).unwrap();
    }

    #[test]
    fn a_submodule_folder_with_files_is_named() {
        let lib = repo();
        let d = repo();
        let r = d.path();
        assert!(filled_submodule_folders(r).unwrap().is_empty());
        sh(
            r,
            &[
                "-c",
                "protocol.file.allow=always",
                "submodule",
                "add",
                "-q",
                lib.path().to_str().unwrap(),
                "vendor/lib",
            ],
        );
        // `submodule add` checks it out: its folder is filled.
        assert_eq!(filled_submodule_folders(r).unwrap(), ["vendor/lib"]);
    }

    #[test]
    fn worktree_commit_diff_land_and_remove() {
        let d = repo();
        let r = d.path();
        let wts = tempfile::tempdir().unwrap();
        let base = snapshot(r, &[], "snap").unwrap();
        let wt = wts.path().join("t1-1");
        add_worktree(r, &wt, "orchestrate/t1", &base).unwrap();
        std::fs::write(wt.join("a.txt"), "one\ntwo\nthree\n").unwrap();
        std::fs::write(wt.join("b.bin"), [0u8, 1, 2, 255]).unwrap();
        let head = commit_all(&wt, "task t1 by shell").unwrap();
        let (text, files) = diff(r, &base, &head).unwrap();
        assert_eq!(files, vec!["a.txt".to_string(), "b.bin".to_string()]);
        assert!(text.contains("+three"), "{text}");
        assert!(text.contains("GIT binary patch"), "{text}");
        // The user edits another line meanwhile: a three-way landing keeps both.
        std::fs::write(r.join("a.txt"), "ONE\ntwo\n").unwrap();
        let landed = land(r, &base, &head, Merge::Apply, &[], "m").unwrap();
        assert_eq!(landed, Landed::Applied);
        assert_eq!(
            std::fs::read_to_string(r.join("a.txt")).unwrap(),
            "ONE\ntwo\nthree\n"
        );
        assert_eq!(std::fs::read(r.join("b.bin")).unwrap(), [0u8, 1, 2, 255]);
        // Nothing staged: the index is the user's.
        assert_eq!(sh(r, &["diff", "--cached", "--name-only"]), "");
        remove_worktree(r, &wt).unwrap();
        assert!(!wt.exists());
        assert_eq!(sh(r, &["worktree", "list"]).lines().count(), 1);
        delete_branch(r, "orchestrate/t1").unwrap();
    }

    #[test]
    fn a_conflict_changes_nothing_and_names_the_file() {
        let d = repo();
        let r = d.path();
        let wts = tempfile::tempdir().unwrap();
        let base = snapshot(r, &[], "snap").unwrap();
        let wt = wts.path().join("t2-1");
        add_worktree(r, &wt, "orchestrate/t2", &base).unwrap();
        std::fs::write(wt.join("a.txt"), "one\nfrom the task\n").unwrap();
        std::fs::write(wt.join("c.txt"), "c\n").unwrap();
        let head = commit_all(&wt, "t2").unwrap();
        std::fs::write(r.join("a.txt"), "one\nfrom the user\n").unwrap();
        let landed = land(r, &base, &head, Merge::Apply, &[], "m").unwrap();
        assert_eq!(landed, Landed::Conflict(vec!["a.txt".into()]));
        assert_eq!(
            std::fs::read_to_string(r.join("a.txt")).unwrap(),
            "one\nfrom the user\n"
        );
        assert!(!r.join("c.txt").exists(), "half applied");
        remove_worktree(r, &wt).unwrap();
    }

    #[test]
    fn commit_mode_commits_on_the_current_branch() {
        let d = repo();
        let r = d.path();
        let wts = tempfile::tempdir().unwrap();
        let before = sh(r, &["rev-parse", "HEAD"]);
        let base = snapshot(r, &[], "snap").unwrap();
        let wt = wts.path().join("t3-1");
        add_worktree(r, &wt, "orchestrate/t3", &base).unwrap();
        std::fs::write(wt.join("d.txt"), "d\n").unwrap();
        let head = commit_all(&wt, "t3").unwrap();
        let landed = land(r, &base, &head, Merge::Commit, &[], "task t3 by shell").unwrap();
        let Landed::Committed(c) = landed else {
            panic!("{landed:?}")
        };
        assert_eq!(sh(r, &["rev-parse", "HEAD"]).trim(), c);
        assert_eq!(sh(r, &["rev-parse", "HEAD^"]), before);
        assert_eq!(sh(r, &["status", "--porcelain"]), "");
        remove_worktree(r, &wt).unwrap();
    }
}
