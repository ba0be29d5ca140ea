//! What becomes of a completed task's changes that stayed on its branch (`merge: branch`, or a
//! conflict when they were to be applied): [`Project::merge_kept`] lands them by the same rules as
//! the supervisor (a three-way merge checked before anything is written, all or nothing),
//! [`Project::discard_kept`] deletes the branch. Both rewrite the task's result record and tell the
//! mirror. They never touch a task that is not completed, and never write to the user's tree unless
//! the merge is clean.

use anyhow::{Context, Result, bail};

use super::Project;
use crate::error::UsageError;
use crate::git::{self, Landed, Merge};
use crate::mirror::{self, Op};
use crate::record::{TaskResult, Terminal};
use crate::spool::Place;

/// What [`Project::merge_kept`] did.
pub enum Merged {
    /// Nothing written: these files conflict with the working tree; the branch is kept.
    Conflict { files: Vec<String>, branch: String },
    /// `applied` or `committed` (or `kept`); the branch is deleted.
    Landed { how: &'static str, branch: String },
}

impl Project {
    /// The completed task `id`, its result and the repository its branch lives in.
    fn kept(&self, id: &str) -> Result<(crate::task::Task, TaskResult, std::path::PathBuf)> {
        let project = self;
        let Some(result) = project.spool.read_result(Terminal::Completed, id) else {
            bail!(UsageError(format!("task {id} is not in completed/")));
        };
        let Some(ws) = result.workspace.as_ref().filter(|w| w.branch.is_some()) else {
            bail!(UsageError(format!(
                "task {id} has no kept branch (its changes were applied, committed or discarded)"
            )));
        };
        if ws.base.is_none() || ws.head.is_none() {
            bail!(UsageError(format!(
                "task {id}'s result does not say which commits its branch holds"
            )));
        }
        let path = project.spool.task_path(Place::Completed, id);
        let (task, _) = crate::task::read_task(&path, u64::MAX)
            .map_err(|e| anyhow::anyhow!("{}", e.render(&project.rel(&path))))?;
        let workdir = crate::context::task_workdir(&project.layout, &project.cfg, &task)?;
        let Some(root) = git::toplevel(&workdir)? else {
            bail!(
                "the workdir {} is no longer inside a git work tree",
                workdir.display()
            );
        };
        Ok((task, result, root))
    }

    fn save_result(&self, task: &crate::task::Task, result: &mut TaskResult) -> Result<()> {
        // A new version of the task's record: the mirrors take only rows newer than theirs (their
        // reconcilers, PostgreSQL's too, compare versions), so the same version would leave them
        // listing a branch that is gone.
        result.version += 1;
        self.spool
            .rewrite_result(result)
            .with_context(|| format!("cannot rewrite the result of {}", result.task_id))?;
        self.mirror_write(vec![Op::Upsert {
            row: mirror::terminal_row(&self.spool, result, Some(task)),
            attempts: result.attempts.clone(),
        }]);
        Ok(())
    }

    /// Land completed task `id`'s kept branch into the working tree (`commit`: and commit it).
    pub fn merge_kept(&self, id: &str, commit: bool) -> Result<Merged> {
        let (task, mut result, root) = self.kept(id)?;
        let ws = result.workspace.clone().unwrap_or_default();
        let (base, head, branch) = (
            ws.base.unwrap_or_default(),
            ws.head.unwrap_or_default(),
            ws.branch.unwrap_or_default(),
        );
        let excludes = self.layout.own_folders();
        let how = if commit { Merge::Commit } else { Merge::Apply };
        let message = format!("orchestrate: task {id}, merged by hand\n");
        let landed = git::land(&root, &base, &head, how, &excludes, &message)?;
        let how = match landed {
            Landed::Conflict(files) => return Ok(Merged::Conflict { files, branch }),
            Landed::Applied => "applied",
            Landed::Committed(_) => "committed",
            Landed::Kept => "kept",
        };
        self.drop_kept_folder(id, &branch);
        let _ = git::delete_branch(&root, &branch);
        if let Some(w) = result.workspace.as_mut() {
            w.merge = Some(how.into());
            w.branch = None;
            w.conflicts.clear();
            w.error = None;
        }
        self.save_result(&task, &mut result)?;
        Ok(Merged::Landed { how, branch })
    }

    /// Land candidate `name` of the completed fan-out task `id` (its own task `<id>.<name>` holds
    /// the branch), then record it as the fan-out's winner.
    pub fn merge_candidate(&self, id: &str, name: &str, commit: bool) -> Result<Merged> {
        let Some(mut result) = self.spool.read_result(Terminal::Completed, id) else {
            bail!(UsageError(format!("task {id} is not in completed/")));
        };
        let Some(fan) = result.fan_out.as_deref() else {
            bail!(UsageError(format!(
                "task {id} did not fan out to candidates"
            )));
        };
        let Some(c) = fan.candidates.iter().find(|c| c.name == name) else {
            let names: Vec<&str> = fan.candidates.iter().map(|c| c.name.as_str()).collect();
            bail!(UsageError(format!(
                "task {id} has no candidate `{name}` (its candidates: {})",
                names.join(", ")
            )));
        };
        if let Some(w) = fan.winner.as_deref().filter(|w| *w != name) {
            bail!(UsageError(format!(
                "task {id}'s candidate `{w}` already won and landed; `{name}` lost and its branch is gone"
            )));
        }
        let child = c.task_id.clone();
        let merged = self.merge_kept(&child, commit)?;
        if let Merged::Landed { .. } = merged {
            let path = self.spool.task_path(Place::Completed, id);
            let (task, _) = crate::task::read_task(&path, u64::MAX)
                .map_err(|e| anyhow::anyhow!("{}", e.render(&self.rel(&path))))?;
            // One candidate landed: the others' branches go (their diffs stay in context/).
            let others: Vec<String> = fan
                .candidates
                .iter()
                .filter(|c| c.name != name && c.branch.is_some())
                .map(|c| c.task_id.clone())
                .collect();
            let mut discarded = vec![];
            for other in others {
                match self.discard_kept(&other) {
                    Ok(_) => discarded.push(other),
                    Err(e) => crate::console::warn(&format!(
                        "cannot discard the branch of {other}: {e:#}"
                    )),
                }
            }
            if let Some(f) = result.fan_out.as_deref_mut() {
                f.winner = Some(name.to_string());
                f.picked_because = Some("merged by hand (`orchestrate merge --candidate`)".into());
                for c in f.candidates.iter_mut() {
                    if c.name == name || discarded.contains(&c.task_id) {
                        c.branch = None;
                    }
                }
            }
            self.save_result(&task, &mut result)?;
        }
        Ok(merged)
    }

    /// Delete completed task `id`'s kept branch; returns the branch's name.
    pub fn discard_kept(&self, id: &str) -> Result<String> {
        let (task, mut result, root) = self.kept(id)?;
        let branch = result
            .workspace
            .as_ref()
            .and_then(|w| w.branch.clone())
            .unwrap_or_default();
        self.drop_kept_folder(id, &branch);
        git::delete_branch(&root, &branch)?;
        if let Some(w) = result.workspace.as_mut() {
            w.merge = Some("discarded".into());
            w.branch = None;
        }
        self.save_result(&task, &mut result)?;
        Ok(branch)
    }

    /// The task's worktree folder kept by `workspace.keep`, still on `branch`, goes with the
    /// branch: git deletes no branch a worktree has checked out.
    fn drop_kept_folder(&self, id: &str, branch: &str) {
        let folder = self.layout.worktree_path(id);
        if git::current_branch(&folder).as_deref() == Some(branch)
            && let Err(e) = git::remove_orphan(&folder)
        {
            crate::console::warn(&format!("cannot remove {}: {e:#}", folder.display()));
        }
    }
}
