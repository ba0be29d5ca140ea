//! An attempt's workspace: whether it runs in a git worktree of its own, making that worktree at
//! claim time (from a snapshot of what the user's tree holds then), and afterwards committing what
//! the agent changed, diffing it, landing it in the user's tree and handing the worktree to the
//! pool (or removing it).
//!
//! Runs on the attempt's blocking threads, never on the loop. Every git operation goes through
//! `git`; this file decides only which ones, in what order, and what the result records. It never
//! leaves a worktree folder behind unless `workspace.keep` asks for it or the task's next attempt
//! resumes in it, and never deletes a branch whose changes did not land.

mod pool;
pub(super) mod setup;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};

pub(crate) use pool::Pool;

use crate::config::{Config, Isolation, MergeMode};
use crate::console;
use crate::git::{self, Landed, Merge};
use crate::layout::Layout;
use crate::record::WorkspaceResult;
use crate::task::Task;

/// Worktree folders an attempt is making or finishing right now: the periodic sweep leaves them
/// alone, and an attempt never starts on a folder the sweep is removing.
static BUSY: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

/// A folder marked busy until dropped.
struct Busy(PathBuf);

impl Busy {
    /// Mark `path`, waiting (bounded by git's own time limit) while someone else has it.
    fn wait(path: &Path) -> Busy {
        let deadline = std::time::Instant::now() + git::TIMEOUT;
        loop {
            if let Some(b) = Busy::try_mark(path) {
                return b;
            }
            if std::time::Instant::now() >= deadline {
                // Whoever holds it is stuck past every git call's limit: go on rather than hang.
                return Busy(path.to_path_buf());
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    fn try_mark(path: &Path) -> Option<Busy> {
        let mut set = BUSY.lock().unwrap_or_else(|p| p.into_inner());
        set.get_or_insert_with(HashSet::new)
            .insert(path.to_path_buf())
            .then(|| Busy(path.to_path_buf()))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut set = BUSY.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = set.as_mut() {
            s.remove(&self.0);
        }
    }
}

/// The file in a worktree's own git folder that names the base its task started from, so an
/// attempt that resumes in the worktree diffs and lands from the same base.
const BASE_NOTE: &str = "orchestrate-base";

/// An attempt's worktree, ready for the agent.
pub(super) struct Worktree {
    /// The top of the user's work tree.
    root: PathBuf,
    /// The worktree folder, under `state_dir/worktrees`.
    path: PathBuf,
    /// Where the agent works: the task's workdir, as the same place inside the worktree.
    pub(super) cwd: PathBuf,
    branch: String,
    base: String,
    merge: MergeMode,
    keep: bool,
    /// orchestrate's own folders, never part of a snapshot.
    excludes: Vec<PathBuf>,
    /// Where the worktree goes when the attempt is over (`None`: removed).
    pool: Option<Arc<Pool>>,
    /// The folder is this attempt's until it is finished: no sweep touches it.
    _busy: Arc<Busy>,
    /// The attempt continues in the worktree an earlier attempt's session left.
    pub(super) resumed: bool,
    /// A cluster lease's attempt: its change goes back to the task's origin as a patch, and
    /// nothing lands in this host's tree.
    leased: bool,
}

/// Make the worktree for attempt `attempt` of `task` on `agent` when its isolation asks for one;
/// `None` when it runs in `workdir` itself. An attempt that `resumes` a CLI session continues in
/// the worktree the session left, when it is still there. `pool` offers idle worktrees.
#[allow(clippy::too_many_arguments)]
pub(super) fn prepare(
    cfg: &Config,
    layout: &Layout,
    task: &Task,
    agent: &str,
    attempt: u32,
    workdir: &Path,
    resumes: bool,
    pool: &Arc<Pool>,
    leased_base: Option<&str>,
) -> Result<Option<Worktree>> {
    let isolation = task
        .file
        .isolation
        .or_else(|| cfg.agents.get(agent).and_then(|a| a.isolation))
        .unwrap_or(cfg.workspace.isolation);
    // A task from the cluster always runs in a worktree made from its origin's commit: this
    // host's own tree is never the agent's to change.
    if isolation == Isolation::None && leased_base.is_none() {
        return Ok(None);
    }
    let Some(root) = git::toplevel(workdir)? else {
        if isolation == Isolation::Auto && leased_base.is_none() {
            return Ok(None);
        }
        bail!(
            "isolation `worktree`{}: the workdir {} is not inside a git work tree",
            if leased_base.is_some() {
                " (every task runs in one in cluster mode)"
            } else {
                ""
            },
            workdir.display()
        );
    };
    let root = root.canonicalize().unwrap_or(root);
    git::check_repository(&root)?;
    let sub = workdir
        .strip_prefix(&root)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let excludes = layout.own_folders();
    let id = &task.id;
    let path = layout.worktree_path(id);
    let busy = Arc::new(Busy::wait(&path));
    let branch = task_branch(cfg, task);
    let pooled = (cfg.workspace.pool_idle_seconds > 0 && !cfg.workspace.keep).then(|| pool.clone());
    let made = |base: String, resumed: bool| {
        let cwd = path.join(&sub);
        // The workdir may hold nothing git tracks yet (an empty folder): it still exists for the
        // agent.
        std::fs::create_dir_all(&cwd)?;
        Ok(Some(Worktree {
            root: root.clone(),
            path: path.clone(),
            cwd,
            branch: branch.clone(),
            base,
            merge: task.file.merge.unwrap_or(cfg.workspace.merge),
            keep: cfg.workspace.keep,
            excludes: excludes.clone(),
            pool: pooled.clone(),
            _busy: busy.clone(),
            resumed,
            leased: leased_base.is_some(),
        }))
    };
    if resumes && let Some(base) = resumable(&root, &path, &branch) {
        console::debug(&format!("{id} resumes in its worktree (base {base})"));
        return made(base, true);
    }
    let message = format!("orchestrate: base of task {id}, attempt {attempt}");
    let leased = match leased_base {
        Some(base) => {
            git::fetch_commit(&root, base).with_context(|| {
                format!(
                    "the base commit of task {id} is not available on this host ({})",
                    root.display()
                )
            })?;
            Some(base.to_string())
        }
        None => None,
    };
    // A file removed while `git add` walks the tree (a build running beside us) fails the walk;
    // the next walk sees the tree as it is then.
    let mut tries = 0;
    let t0 = std::time::Instant::now();
    let base = loop {
        if let Some(b) = &leased {
            break b.clone();
        }
        tries += 1;
        match git::snapshot(&root, &excludes, &message) {
            Ok(c) => break c,
            Err(e) if tries < 3 && !format!("{e:#}").contains("no commit yet") => {
                console::debug(&format!(
                    "snapshot of {} for {id}: {e:#}; again",
                    root.display()
                ));
            }
            Err(e) => return Err(e),
        }
    };
    let base = if leased.is_some() {
        base
    } else {
        with_dependencies(layout, task, &root, base)?
    };
    if path.exists() {
        // Left by an earlier attempt that is not resumed, or by one that never ended (a crash):
        // start clean.
        git::remove_orphan(&path)?;
    }
    let t1 = std::time::Instant::now();
    let reused = pooled
        .as_ref()
        .is_some_and(|p| p.take(&root, &path, &branch, &base));
    if !reused {
        // Two `git worktree add` at once on one repository can read each other's half-made
        // metadata (`failed to read .git/worktrees/X/commondir`): one at a time per process.
        static ADDING: Mutex<()> = Mutex::new(());
        let _one = ADDING.lock().unwrap_or_else(|p| p.into_inner());
        git::add_worktree(&root, &path, &branch, &base)?;
    }
    console::debug(&format!(
        "worktree   {id}: snapshot {} ms, {} {} ms",
        (t1 - t0).as_millis(),
        if reused { "reused" } else { "made" },
        t1.elapsed().as_millis()
    ));
    crate::failpoint::hit("worktree.after_add");
    if let Some(dir) = git::private_dir(&path) {
        std::fs::write(dir.join(BASE_NOTE), format!("{base}\n"))?;
    }
    made(base, false)
}

/// The branch a task's worktree is on: `<prefix><id>`, and for a fan-out candidate
/// `<prefix><parent>/<name>`, so a fan-out's branches sit together.
pub(super) fn task_branch(cfg: &Config, task: &Task) -> String {
    let prefix = &cfg.workspace.branch_prefix;
    match (&task.file.parent, &task.file.candidate) {
        (Some(parent), Some(name)) => format!("{prefix}{parent}/{name}"),
        _ => format!("{prefix}{}", task.id),
    }
}

/// `base` with the changes of `task`'s dependencies that stayed on their branches (`merge: branch`,
/// or a conflict) merged in, so the task builds on its dependencies' results as it does when they
/// landed in the user's tree. A dependency's change that conflicts with the tree is an error that
/// names it: the task cannot have both.
fn with_dependencies(layout: &Layout, task: &Task, root: &Path, base: String) -> Result<String> {
    let mut base = base;
    for dep in &task.file.dependencies {
        let file = Layout::result_file(&layout.completed, dep);
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let Ok(result) = crate::record::from_yaml::<crate::record::TaskResult>(&text) else {
            continue;
        };
        let Some(ws) = result.workspace else {
            continue;
        };
        // Applied or committed: the user's tree holds it, and so does the snapshot.
        if !matches!(ws.merge.as_deref(), Some("kept" | "conflict")) {
            continue;
        }
        let (Some(from), Some(to), Some(branch)) = (ws.base, ws.head, ws.branch) else {
            continue;
        };
        // Another repository's task, or a branch discarded since: nothing of it here.
        if !git::has_commit(root, &to) || !git::has_commit(root, &from) {
            continue;
        }
        let message = format!(
            "orchestrate: base of task {}, with {dep}'s changes",
            task.id
        );
        match git::merge_into(root, &base, &from, &to, &message)? {
            Ok(with) => {
                console::debug(&format!(
                    "{}: base includes {dep}'s changes from {branch}",
                    task.id
                ));
                base = with;
            }
            Err(files) => bail!(
                "the changes of dependency {dep}, kept on its branch {branch}, conflict with your \
                 working tree in {}: land them (`orchestrate merge {dep}`) or discard them \
                 (`orchestrate discard {dep}`), then `orchestrate retry {}`",
                files.join(", "),
                task.id
            ),
        }
    }
    Ok(base)
}

/// The base of the worktree at `path` when an attempt can resume in it: a working worktree of
/// `root`, on `branch`, with its base noted.
fn resumable(root: &Path, path: &Path, branch: &str) -> Option<String> {
    let repo = git::worktree_repo(path)?;
    let common = git::common_dir(root).ok()?;
    if repo.canonicalize().ok()? != common.canonicalize().ok()? {
        return None;
    }
    git::worktree_head(path)?;
    if git::current_branch(path).as_deref() != Some(branch) {
        return None;
    }
    let note = std::fs::read_to_string(git::private_dir(path)?.join(BASE_NOTE)).ok()?;
    let base = note.trim();
    (!base.is_empty()).then(|| base.to_string())
}

/// What the agent did in a worktree: the diff's text and files, and the git facts for the result.
pub(super) struct Finished {
    pub(super) diff: String,
    pub(super) files: Vec<String>,
    pub(super) result: WorkspaceResult,
}

/// The agent's changes committed on the task's branch and diffed, not yet landed.
pub(super) struct Committed {
    pub(super) diff: String,
    pub(super) files: Vec<String>,
    pub(super) result: WorkspaceResult,
    /// The commit's message, reused when landing commits.
    message: String,
    /// The branch holds changes that must not go with the worktree (the commit failed).
    keep_branch: bool,
    /// Each step's time, for the debug log.
    steps: Vec<(&'static str, u128)>,
    /// The worktree may go to the pool (nothing is left in it that `git clean` would not remove).
    poolable: bool,
}

impl Committed {
    /// The task ends here without landing (its `max_cost_usd` is spent): its branch stays, with
    /// what the agent did, for a person to take on.
    pub(super) fn keep_branch(&mut self) {
        self.keep_branch = true;
    }

    /// The task's commit, when it was made.
    pub(super) fn head(&self) -> Option<&str> {
        self.result.head.as_deref()
    }
}

impl Worktree {
    /// Commit what the agent changed, diff it against the base, land it when the attempt
    /// `completed`, and hand the worktree to the pool or remove it (its branch too, unless the
    /// changes stayed on it). With `hold` (the next attempt may resume the agent's session) the
    /// worktree stays where it is, on its branch, for that attempt.
    pub(super) fn finish(
        self,
        task: &Task,
        agent: &str,
        attempt: u32,
        completed: bool,
        hold: bool,
    ) -> Finished {
        let committed = self.commit(task, agent, attempt);
        self.land_and_release(task, committed, completed, hold)
    }

    /// The first half of [`Worktree::finish`]: commit what the agent changed on the task's branch
    /// and diff it against the base. What happens in the worktree afterwards (a check's build
    /// output) is in neither.
    pub(super) fn commit(&self, task: &Task, agent: &str, attempt: u32) -> Committed {
        let id = &task.id;
        let mut result = WorkspaceResult {
            isolation: "worktree".into(),
            base: Some(self.base.clone()),
            branch: Some(self.branch.clone()),
            ..Default::default()
        };
        let (mut diff, mut files) = (String::new(), vec![]);
        let summary = task.file.description.lines().next().unwrap_or_default();
        let message =
            format!("orchestrate: task {id} by {agent} (attempt {attempt})\n\n{summary}\n");
        let mut keep_branch = false;
        let mut steps: Vec<(&str, u128)> = vec![];
        let mut t = std::time::Instant::now();
        let mut lap = |name, steps: &mut Vec<(&str, u128)>| {
            steps.push((name, t.elapsed().as_millis()));
            t = std::time::Instant::now();
        };
        // What is written inside a submodule's folder is in no commit of this repository: said,
        // and such a worktree is not handed on (`git clean` leaves those folders alone).
        let filled = git::filled_submodule_folders(&self.path).unwrap_or_default();
        let poolable = filled.is_empty();
        let stray = (!filled.is_empty()).then(|| {
            format!(
                "files inside the submodule folder(s) {} are not part of this repository: they \
                 were neither committed nor landed (give the task a workdir inside the submodule \
                 to work on its files)",
                filled.join(", ")
            )
        });
        if let Some(s) = &stray {
            console::warn(&format!("{id}: {s}"));
        }
        match git::commit_all(&self.path, &message) {
            Ok(head) => {
                lap("commit", &mut steps);
                crate::failpoint::hit("worktree.after_commit");
                match git::diff(&self.root, &self.base, &head) {
                    Ok((d, f)) => (diff, files) = (d, f),
                    Err(e) => console::warn(&format!("cannot diff {id}: {e:#}")),
                }
                lap("diff", &mut steps);
                result.head = Some(head);
            }
            Err(e) => {
                console::warn(&format!("cannot commit the changes of {id}: {e:#}"));
                result.error = Some(format!("{e:#}"));
                keep_branch = true;
            }
        }
        if let Some(s) = stray
            && result.error.is_none()
        {
            result.error = Some(s);
        }
        Committed {
            diff,
            files,
            result,
            message,
            keep_branch,
            steps,
            poolable,
        }
    }

    /// The second half of [`Worktree::finish`]: land `c` when the attempt `completed`, then hold
    /// the worktree (`hold`: its session may be resumed), or hand it to the pool or remove it.
    pub(super) fn land_and_release(
        self,
        task: &Task,
        c: Committed,
        completed: bool,
        hold: bool,
    ) -> Finished {
        let id = &task.id;
        let Committed {
            diff,
            files,
            mut result,
            message,
            mut keep_branch,
            mut steps,
            poolable,
        } = c;
        let mut t = std::time::Instant::now();
        let mut lap = |name, steps: &mut Vec<(&str, u128)>| {
            steps.push((name, t.elapsed().as_millis()));
            t = std::time::Instant::now();
        };
        if let Some(head) = result.head.clone()
            && completed
            && !files.is_empty()
            && !self.leased
        {
            let how = match self.merge {
                MergeMode::Apply => Merge::Apply,
                MergeMode::Commit => Merge::Commit,
                MergeMode::Branch => Merge::Branch,
            };
            let landed = git::land(&self.root, &self.base, &head, how, &self.excludes, &message);
            let merge = match landed {
                Ok(Landed::Applied) => "applied",
                Ok(Landed::Committed(_)) => "committed",
                Ok(Landed::Kept) => "kept",
                Ok(Landed::Conflict(f)) => {
                    result.conflicts = f;
                    "conflict"
                }
                Err(e) => {
                    // Nothing was written to the tree; the branch holds the changes.
                    result.error = Some(format!("{e:#}"));
                    "conflict"
                }
            };
            lap("land", &mut steps);
            crate::failpoint::hit("worktree.after_land");
            keep_branch = matches!(merge, "kept" | "conflict");
            result.merge = Some(merge.into());
        }
        if self.keep {
            return Finished {
                diff,
                files,
                result,
            };
        }
        if hold && !completed && result.head.is_some() {
            // The resumed session finds its files as it left them, not what ran after it (a
            // check's build output would otherwise enter the next commit). Ignored files stay:
            // caches and linked folders are part of a warm worktree.
            if let Err(e) = git::restore_to_head(&self.path) {
                console::warn(&format!("cannot tidy the worktree of {id}: {e:#}"));
            }
            return Finished {
                diff,
                files,
                result,
            };
        }
        let done = self.release(poolable);
        if done.is_ok() {
            crate::failpoint::hit("worktree.after_release");
        }
        lap("release", &mut steps);
        let steps: Vec<String> = steps.iter().map(|(n, ms)| format!("{n} {ms} ms")).collect();
        console::debug(&format!("worktree   {id}: {}", steps.join(", ")));
        if let Err(e) = done {
            console::warn(&format!("cannot remove the worktree of {id}: {e:#}"));
        } else if !keep_branch && let Err(e) = git::delete_branch(&self.root, &self.branch) {
            console::warn(&format!("cannot delete the branch {}: {e:#}", self.branch));
        }
        if !keep_branch {
            result.branch = None;
        }
        Finished {
            diff,
            files,
            result,
        }
    }
}

impl Worktree {
    /// Off the branch, then into the pool when there is one, the worktree may go there and the pool
    /// takes it; removed otherwise.
    fn release(&self, poolable: bool) -> Result<()> {
        if let Some(pool) = self.pool.as_ref().filter(|_| poolable) {
            match git::detach(&self.path).and_then(|()| pool.give(&self.root, &self.path)) {
                Ok(()) => return Ok(()),
                Err(e) => console::debug(&format!(
                    "cannot keep the worktree {} for reuse: {e:#}",
                    self.path.display()
                )),
            }
            if !self.path.exists() {
                return Ok(());
            }
        }
        git::remove_worktree(&self.root, &self.path)
    }
}

/// Remove worktrees under `state_dir/worktrees` that nothing will use: a task's worktree unless an
/// attempt has it now, a claim names the task (an attempt of this supervisor or another is on it),
/// its task waits in `pending/` (its next attempt may resume in it) or `workspace.keep` keeps
/// folders; and idle pools of supervisors that are gone. Called at start, before this supervisor
/// claims anything (claims of dead supervisors are settled then), and from the heartbeat on a
/// blocking thread.
pub(super) fn sweep(cfg: &Config, layout: &Layout, spool: &crate::spool::Spool, me: &str) {
    let Ok(entries) = std::fs::read_dir(layout.worktrees_dir()) else {
        return;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = Layout::worktree_owner(&name) else {
            if e.path() == layout.worktree_pool() {
                removed += sweep_pools(layout, me);
            }
            continue;
        };
        // Marked first: an attempt that starts now waits for the verdict, one that has the
        // folder keeps it.
        let Some(_busy) = Busy::try_mark(&e.path()) else {
            continue;
        };
        if cfg.workspace.keep
            || spool.task_path(crate::spool::Place::Pending, id).exists()
            || spool.read_claim(id).is_some()
        {
            continue;
        }
        // A worktree held for a resume whose task then ended without it (its retries spent) is
        // still on the task's branch: that branch holds nothing that landed, and goes with it.
        // (A fan-out candidate `<parent>.<name>` is on `<prefix><parent>/<name>`.)
        let own = format!("{}{id}", cfg.workspace.branch_prefix);
        let candidate = id
            .rsplit_once('.')
            .map(|(p, c)| format!("{}{p}/{c}", cfg.workspace.branch_prefix));
        let branch = git::current_branch(&e.path()).unwrap_or_default();
        let on_branch = branch == own || Some(&branch) == candidate.as_ref();
        let repo = git::worktree_repo(&e.path());
        match git::remove_orphan(&e.path()) {
            Ok(()) => {
                removed += 1;
                console::info(&format!("removed    the orphaned worktree {name}"));
                if on_branch
                    && let Some(repo) = repo
                    && let Err(e) = git::delete_branch(&repo, &branch)
                {
                    console::warn(&format!("cannot delete the branch {branch}: {e:#}"));
                }
            }
            Err(e) => console::warn(&format!("cannot remove the worktree {name}: {e:#}")),
        }
    }
    if removed > 0 {
        console::debug(&format!("sweep removed {removed} worktree(s)"));
    }
}

/// Remove the idle pools of supervisors that are no longer running; how many worktrees went.
fn sweep_pools(layout: &Layout, me: &str) -> usize {
    let Ok(pools) = std::fs::read_dir(layout.worktree_pool()) else {
        return 0;
    };
    let mut removed = 0;
    for p in pools.flatten() {
        let owner = p.file_name().to_string_lossy().into_owned();
        if owner == me || crate::instance::instance_lock_held(&layout.instance_lock(&owner)) {
            continue;
        }
        for w in std::fs::read_dir(p.path()).into_iter().flatten().flatten() {
            match git::remove_orphan(&w.path()) {
                Ok(()) => removed += 1,
                Err(e) => console::warn(&format!(
                    "cannot remove the idle worktree {}: {e:#}",
                    w.path().display()
                )),
            }
        }
        let _ = std::fs::remove_dir(p.path());
    }
    removed
}

/// The workdir `task` would run in directly on `agent` when its isolation is `none`: tasks sharing
/// it take turns, so each diff is that task's alone. Decided without git, so the loop may ask.
pub(super) fn exclusive_workdir(
    cfg: &crate::config::Config,
    layout: &crate::layout::Layout,
    task: &Task,
    agent: &str,
) -> Option<PathBuf> {
    use crate::config::Isolation;
    let isolation = task
        .file
        .isolation
        .or_else(|| cfg.agents.get(agent).and_then(|a| a.isolation))
        .unwrap_or(cfg.workspace.isolation);
    let dir = layout
        .root
        .join(task.file.workdir.as_deref().unwrap_or("."));
    let dir = dir.canonicalize().unwrap_or(dir);
    // `auto` outside git keeps running tasks side by side, as before isolation existed; only an
    // explicit `none` asks for turns.
    (isolation == Isolation::None).then_some(dir)
}
