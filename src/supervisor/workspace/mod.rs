//! An attempt's workspace: whether it runs in a git worktree of its own, making that worktree at
//! claim time (from a snapshot of what the user's tree holds then), and afterwards committing what
//! the agent changed, diffing it, landing it in the user's tree and removing the worktree.
//!
//! Runs on the attempt's blocking threads, never on the loop. Every git operation goes through
//! `git`; this file decides only which ones, in what order, and what the result records. It never
//! leaves a worktree folder behind unless `workspace.keep` asks for it, and never deletes a branch
//! whose changes did not land.

pub(super) mod setup;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::config::{Config, Isolation, MergeMode};
use crate::console;
use crate::git::{self, Landed, Merge};
use crate::layout::Layout;
use crate::record::WorkspaceResult;
use crate::task::Task;

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
}

/// Make the worktree for attempt `attempt` of `task` on `agent` when its isolation asks for one;
/// `None` when it runs in `workdir` itself.
pub(super) fn prepare(
    cfg: &Config,
    layout: &Layout,
    task: &Task,
    agent: &str,
    attempt: u32,
    workdir: &Path,
) -> Result<Option<Worktree>> {
    let isolation = task
        .file
        .isolation
        .or_else(|| cfg.agents.get(agent).and_then(|a| a.isolation))
        .unwrap_or(cfg.workspace.isolation);
    if isolation == Isolation::None {
        return Ok(None);
    }
    let Some(root) = git::toplevel(workdir)? else {
        if isolation == Isolation::Auto {
            return Ok(None);
        }
        bail!(
            "isolation `worktree`: the workdir {} is not inside a git work tree",
            workdir.display()
        );
    };
    let root = root.canonicalize().unwrap_or(root);
    let sub = workdir
        .strip_prefix(&root)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let excludes = layout.own_folders();
    let id = &task.id;
    let message = format!("orchestrate: base of task {id}, attempt {attempt}");
    // A file removed while `git add` walks the tree (a build running beside us) fails the walk;
    // the next walk sees the tree as it is then.
    let mut tries = 0;
    let base = loop {
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
    let path = layout.worktree_path(id);
    if path.exists() {
        // Left by an attempt of the same number that never ended (a crash): start clean.
        git::remove_orphan(&path)?;
    }
    let branch = format!("{}{id}", cfg.workspace.branch_prefix);
    git::add_worktree(&root, &path, &branch, &base)?;
    crate::failpoint::hit("worktree.after_add");
    let cwd = path.join(&sub);
    // The workdir may hold nothing git tracks yet (an empty folder): it still exists for the agent.
    std::fs::create_dir_all(&cwd)?;
    Ok(Some(Worktree {
        root,
        path,
        cwd,
        branch,
        base,
        merge: task.file.merge.unwrap_or(cfg.workspace.merge),
        keep: cfg.workspace.keep,
        excludes,
    }))
}

/// What the agent did in a worktree: the diff's text and files, and the git facts for the result.
pub(super) struct Finished {
    pub(super) diff: String,
    pub(super) files: Vec<String>,
    pub(super) result: WorkspaceResult,
}

impl Worktree {
    /// Commit what the agent changed, diff it against the base, land it when the attempt
    /// `completed`, and remove the worktree (its branch too, unless the changes stayed on it).
    pub(super) fn finish(
        self,
        task: &Task,
        agent: &str,
        attempt: u32,
        completed: bool,
    ) -> Finished {
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
        match git::commit_all(&self.path, &message) {
            Ok(head) => {
                crate::failpoint::hit("worktree.after_commit");
                match git::diff(&self.root, &self.base, &head) {
                    Ok((d, f)) => (diff, files) = (d, f),
                    Err(e) => console::warn(&format!("cannot diff {id}: {e:#}")),
                }
                result.head = Some(head.clone());
                if completed && !files.is_empty() {
                    let how = match self.merge {
                        MergeMode::Apply => Merge::Apply,
                        MergeMode::Commit => Merge::Commit,
                        MergeMode::Branch => Merge::Branch,
                    };
                    let landed =
                        git::land(&self.root, &self.base, &head, how, &self.excludes, &message);
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
                    crate::failpoint::hit("worktree.after_land");
                    keep_branch = matches!(merge, "kept" | "conflict");
                    result.merge = Some(merge.into());
                }
            }
            Err(e) => {
                console::warn(&format!("cannot commit the changes of {id}: {e:#}"));
                result.error = Some(format!("{e:#}"));
                keep_branch = true;
            }
        }
        if self.keep {
            return Finished {
                diff,
                files,
                result,
            };
        }
        if let Err(e) = git::remove_worktree(&self.root, &self.path) {
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

/// Remove worktrees under `state_dir/worktrees` that no running attempt owns: one belongs to a
/// running attempt when its task's claim (left after recovery, so a live supervisor's) names the
/// same attempt and another supervisor. Called at start, before this supervisor claims anything.
pub(super) fn sweep(layout: &Layout, spool: &crate::spool::Spool, me: &str) {
    let Ok(entries) = std::fs::read_dir(layout.worktrees_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let owned = Layout::worktree_owner(&name)
            .is_some_and(|id| spool.read_claim(id).is_some_and(|c| c.instance != me));
        if owned {
            continue;
        }
        match git::remove_orphan(&e.path()) {
            Ok(()) => console::info(&format!("removed    the orphaned worktree {name}")),
            Err(e) => console::warn(&format!("cannot remove the worktree {name}: {e:#}")),
        }
    }
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
