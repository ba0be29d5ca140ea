//! `orchestrate merge ID` and `orchestrate discard ID`: what becomes of a completed task's changes
//! that stayed on its branch (`merge: branch`, or a conflict when they were to be applied).
//!
//! `merge` lands them by the same rules as the supervisor (a three-way merge checked before
//! anything is written, all or nothing); `discard` deletes the branch. Both rewrite the task's
//! result record and tell the mirror. They never touch a task that is not completed, and never
//! write to the user's tree unless the merge is clean.

use anyhow::{Context, Result, bail};

use super::{Cli, Project};
use crate::error::UsageError;
use crate::git::{self, Landed, Merge};
use crate::mirror::{self, Op};
use crate::record::{TaskResult, Terminal};
use crate::spool::Place;

/// The completed task `id`, its result and the repository its branch lives in.
fn kept(
    project: &Project,
    id: &str,
) -> Result<(crate::task::Task, TaskResult, std::path::PathBuf)> {
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

fn save(project: &Project, task: &crate::task::Task, result: &mut TaskResult) -> Result<()> {
    // A new version of the task's record: the mirrors take only rows newer than theirs (their
    // reconcilers, PostgreSQL's too, compare versions), so the same version would leave them
    // listing a branch that is gone.
    result.version += 1;
    project
        .spool
        .rewrite_result(result)
        .with_context(|| format!("cannot rewrite the result of {}", result.task_id))?;
    project.mirror_write(vec![Op::Upsert {
        row: mirror::terminal_row(&project.spool, result, Some(task)),
        attempts: result.attempts.clone(),
    }]);
    Ok(())
}

pub fn merge(cli: &Cli, project: &Project, id: &str, commit: bool) -> Result<i32> {
    let (task, mut result, root) = kept(project, id)?;
    let ws = result.workspace.clone().unwrap_or_default();
    let (base, head, branch) = (
        ws.base.unwrap_or_default(),
        ws.head.unwrap_or_default(),
        ws.branch.unwrap_or_default(),
    );
    let excludes = project.layout.own_folders();
    let how = if commit { Merge::Commit } else { Merge::Apply };
    let message = format!("orchestrate: task {id}, merged by hand\n");
    let landed = git::land(&root, &base, &head, how, &excludes, &message)?;
    let mut out = super::Out::new();
    let merge = match &landed {
        Landed::Conflict(files) => {
            if cli.json {
                super::print_json(
                    &serde_json::json!({"id": id, "merge": "conflict", "conflicts": files}),
                )?;
            } else {
                outln!(
                    out,
                    "{id}: not merged, nothing written: {} conflict with your working tree; its branch {branch} is kept",
                    files.join(", ")
                )?;
                out.flush()?;
            }
            return Ok(1);
        }
        Landed::Applied => "applied",
        Landed::Committed(_) => "committed",
        Landed::Kept => "kept",
    };
    drop_kept_folder(project, id, &branch);
    let _ = git::delete_branch(&root, &branch);
    if let Some(w) = result.workspace.as_mut() {
        w.merge = Some(merge.into());
        w.branch = None;
        w.conflicts.clear();
        w.error = None;
    }
    save(project, &task, &mut result)?;
    if cli.json {
        super::print_json(&serde_json::json!({"id": id, "merge": merge}))?;
    } else {
        outln!(out, "{id}: {merge}; branch {branch} deleted")?;
        out.flush()?;
    }
    Ok(0)
}

/// The task's worktree folder kept by `workspace.keep`, still on `branch`, goes with the branch:
/// git deletes no branch a worktree has checked out.
fn drop_kept_folder(project: &Project, id: &str, branch: &str) {
    let folder = project.layout.worktree_path(id);
    if git::current_branch(&folder).as_deref() == Some(branch)
        && let Err(e) = git::remove_orphan(&folder)
    {
        crate::console::warn(&format!("cannot remove {}: {e:#}", folder.display()));
    }
}

pub fn discard(cli: &Cli, project: &Project, id: &str) -> Result<i32> {
    let (task, mut result, root) = kept(project, id)?;
    let branch = result
        .workspace
        .as_ref()
        .and_then(|w| w.branch.clone())
        .unwrap_or_default();
    drop_kept_folder(project, id, &branch);
    git::delete_branch(&root, &branch)?;
    if let Some(w) = result.workspace.as_mut() {
        w.merge = Some("discarded".into());
        w.branch = None;
    }
    save(project, &task, &mut result)?;
    if cli.json {
        super::print_json(&serde_json::json!({"id": id, "merge": "discarded"}))?;
    } else {
        let mut out = super::Out::new();
        outln!(
            out,
            "{id}: branch {branch} deleted; its changes are discarded"
        )?;
        out.flush()?;
    }
    Ok(0)
}
