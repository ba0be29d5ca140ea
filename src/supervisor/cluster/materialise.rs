//! An outcome of a task this host published, made part of its tree: the result record, the
//! output, the diff and the log tail in `context/`, and the change landed by the task's merge
//! policy, exactly as if the task had run here. The commit goes through `Commits` like any
//! terminal result; the queue is told it was delivered only once it is on disk.
//!
//! Doing it twice (a crash before the queue heard of it) writes the same files and lands nothing
//! new: the tree tells what was done.

use super::super::Supervisor;
use super::super::events::Action;
use super::link::Ask;
use crate::config::{Config, MergeMode};
use crate::console;
use crate::git::{self, Landed, Merge};
use crate::layout::Layout;
use crate::mirror::postgres::queue::Outcome;
use crate::record::{Attempt, Claim, TaskResult, Terminal, WorkspaceResult};
use crate::redact::Redactor;
use crate::spool::Place;
use crate::task::Task;

impl Supervisor {
    /// Take outcome `o` (with the attempts its task made before the deciding one).
    #[must_use = "the actions are the rest of the work: apply them"]
    pub(in crate::supervisor) fn materialise(
        &mut self,
        o: Outcome,
        earlier: Vec<Attempt>,
    ) -> Vec<Action> {
        let id = o.id.clone();
        let c = self.cluster.as_mut().expect("cluster mode");
        if c.materialising.contains(&id) {
            return vec![];
        }
        if !self.intake.queue.contains(&id) {
            match self.env.spool.settled_place(&id) {
                // Materialised before (a crash before the queue heard it): say so now.
                Some(Place::Completed | Place::Failed) => c.link.ask(Ask::Delivered(id)),
                // Not read yet (the start-up scan is under way): offered again later.
                _ => c.pending_outcomes.push((o, earlier)),
            }
            return vec![];
        }
        let (p, claim) = match self.claim_agentless(&id, "its outcome came back from the cluster") {
            Ok(claimed) => claimed,
            Err(actions) => return actions,
        };
        let c = self.cluster.as_mut().expect("cluster mode");
        c.materialising.insert(id.clone());
        let job = Job {
            cfg: self.env.cfg.clone(),
            layout: self.env.layout.clone(),
            redactor: self.env.redactor.clone(),
            task: p.task.clone(),
            claim,
            outcome: o,
            earlier,
        };
        self.commits
            .start_with(&self.env.spool, p.task, move || job.run());
        self.state_dirty = true;
        vec![]
    }

    /// A materialised outcome is on disk: the queue stops offering it.
    pub(in crate::supervisor) fn delivered(&mut self, id: &str) {
        if let Some(c) = self.cluster.as_mut()
            && c.materialising.remove(id)
        {
            c.link.ask(Ask::Delivered(id.to_string()));
        }
    }

    /// Outcomes that came before their task was read: offered to `materialise` again.
    pub(in crate::supervisor) fn retry_outcomes(&mut self) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        if c.pending_outcomes.is_empty() || self.intake.is_scanning() {
            return;
        }
        for (o, earlier) in std::mem::take(&mut c.pending_outcomes) {
            let more = self.materialise(o, earlier);
            self.apply(more);
        }
    }
}

struct Job {
    cfg: std::sync::Arc<Config>,
    layout: Layout,
    redactor: std::sync::Arc<Redactor>,
    task: Task,
    claim: Claim,
    outcome: Outcome,
    earlier: Vec<Attempt>,
}

impl Job {
    fn run(self) -> TaskResult {
        let id = &self.task.id;
        let o = &self.outcome;
        let Some(row) = &o.result else {
            let reason = o
                .reason
                .clone()
                .unwrap_or_else(|| "failed in the cluster".into());
            let mut r = TaskResult::failed(
                id,
                self.claim.version + 1,
                &self.task.file.description,
                self.earlier.clone(),
                reason,
            );
            r.chosen_because = Some("failed by the cluster queue".into());
            return r;
        };
        let mut result: TaskResult = match crate::record::from_yaml(&row.record) {
            Ok(r) => r,
            Err(e) => TaskResult::failed(
                id,
                0,
                &self.task.file.description,
                self.earlier.clone(),
                format!("the result host {} sent cannot be read: {e}", row.host),
            ),
        };
        // The queue's own word on the end (a retry asked for on the last attempt it allowed).
        if let Some(why) = &o.reason {
            result.error = Some(match result.error.take() {
                Some(e) => format!("{e}; {why}"),
                None => why.clone(),
            });
        }
        result.task_id = id.clone();
        result.version = self.claim.version + 1;
        result.description = self.task.file.description.clone();
        result.finished_at = crate::fsutil::now_rfc3339();
        // The output, the diff and the log's end, where `cat` finds them on this host.
        if !row.output.is_empty()
            && crate::fsutil::atomic_write_derived(
                &self.layout.output_path(id),
                row.output.as_bytes(),
            )
            .map_err(|e| console::warn(&format!("cannot write the output of {id}: {e:#}")))
            .is_ok()
        {
            result.output_file = Some(self.layout.rel(&self.layout.output_path(id)));
        }
        let diff = self.layout.diff_path(id);
        if let Some(dir) = diff.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if crate::fsutil::atomic_write_derived(&diff, self.redactor.redact(&row.patch).as_bytes())
            .is_ok()
        {
            result.diff_file = Some(self.layout.rel(&diff));
        }
        if let Some(last) = result.attempts.last_mut() {
            let log = self.layout.log_path(id, last.n);
            if let Some(dir) = log.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if !row.log_tail.is_empty()
                && crate::fsutil::atomic_write_derived(&log, row.log_tail.as_bytes()).is_ok()
            {
                last.log_file = Some(self.layout.rel(&log));
            }
        }
        let because = format!(
            "ran on host {} (fence {}){}",
            row.host,
            row.fence,
            result
                .chosen_because
                .as_ref()
                .map(|b| format!("; {b}"))
                .unwrap_or_default()
        );
        result.chosen_because = Some(because);
        if result.status == Terminal::Completed && !row.patch.trim().is_empty() {
            result.workspace = Some(Box::new(self.land(&row.patch, o.base_commit.as_deref())));
        } else if let Some(ws) = result.workspace.as_mut() {
            // The runner's branch and head are its own: nothing of them is here.
            ws.branch = None;
            ws.merge = None;
        }
        result
    }

    /// Land `patch` (against `base`) in this tree by the task's merge policy, through a commit of
    /// it on the task's branch, as an isolated task lands here.
    fn land(&self, patch: &str, base: Option<&str>) -> WorkspaceResult {
        let mut ws = WorkspaceResult {
            isolation: "worktree".into(),
            base: base.map(str::to_string),
            ..Default::default()
        };
        let id = &self.task.id;
        let root = crate::context::task_workdir(&self.layout, &self.cfg, &self.task)
            .ok()
            .and_then(|wd| git::toplevel(&wd).ok().flatten());
        let (Some(root), Some(base)) = (root, base) else {
            ws.error = Some("no git repository or base commit to land the change in".into());
            return ws;
        };
        let summary = self
            .task
            .file
            .description
            .lines()
            .next()
            .unwrap_or_default();
        let message = format!("orchestrate: task {id} (from the cluster)\n\n{summary}\n");
        let head = match git::commit_patch(&root, base, patch, &message) {
            Ok(h) => h,
            Err(e) => {
                ws.error = Some(format!(
                    "the change does not apply to its base commit: {e:#}"
                ));
                return ws;
            }
        };
        let branch = super::super::workspace::task_branch(&self.cfg, &self.task);
        ws.head = Some(head.clone());
        if let Err(e) = git::set_branch(&root, &branch, &head) {
            ws.error = Some(format!("{e:#}"));
            return ws;
        }
        ws.branch = Some(branch.clone());
        let how = match self.task.file.merge.unwrap_or(self.cfg.workspace.merge) {
            MergeMode::Apply => Merge::Apply,
            MergeMode::Commit => Merge::Commit,
            MergeMode::Branch => Merge::Branch,
        };
        let merge = match git::land(
            &root,
            base,
            &head,
            how,
            &self.layout.own_folders(),
            &message,
        ) {
            Ok(Landed::Applied) => "applied",
            Ok(Landed::Committed(_)) => "committed",
            Ok(Landed::Kept) => "kept",
            Ok(Landed::Conflict(f)) => {
                ws.conflicts = f;
                "conflict"
            }
            Err(e) => {
                ws.error = Some(format!("{e:#}"));
                "conflict"
            }
        };
        crate::failpoint::hit("cluster.after_land");
        ws.merge = Some(merge.into());
        if !matches!(merge, "kept" | "conflict") {
            if let Err(e) = git::delete_branch(&root, &branch) {
                console::warn(&format!("cannot delete the branch {branch}: {e:#}"));
            }
            ws.branch = None;
        }
        ws
    }
}
