//! The finished-task ledger: which tasks are terminal as far as this supervisor knows, and the
//! completed ones with what they left behind (for `completed_tasks.json` and `current_state.md`).
//!
//! Owns that record and nothing else. It never reads or moves task files: the loop tells it what
//! finished (a commit came back, recovery finished a move, the mirror said so at start) and what is
//! pending again.

use std::collections::VecDeque;

use crate::context::{CompletedEntry, FailedEntry};
use crate::record::{TaskResult, Terminal};
use crate::scheduler;

/// How many recent failures `current_state.md` lists.
const RECENT_FAILURES: usize = 20;

#[derive(Default)]
pub(super) struct Ledger {
    done: scheduler::Done,
    completed: Vec<CompletedEntry>,
    /// The latest failures, oldest first.
    failed: VecDeque<FailedEntry>,
}

impl Ledger {
    pub(super) fn status(&self, id: &str) -> Option<Terminal> {
        self.done.get(id).copied()
    }

    pub(super) fn is_done(&self, id: &str) -> bool {
        self.done.contains_key(id)
    }

    /// `id` is terminal (its details, if completed, are not known here).
    pub(super) fn record(&mut self, id: String, status: Terminal) {
        self.done.insert(id, status);
    }

    /// A result this supervisor committed.
    pub(super) fn record_result(&mut self, result: &TaskResult) {
        if result.status == Terminal::Completed {
            self.completed.push(CompletedEntry {
                id: result.task_id.clone(),
                description: result.description.clone(),
                agent: result.agent.clone(),
                finished_at: result.finished_at.clone(),
                output_file: result.output_file.clone(),
                diff_file: result.diff_file.clone(),
                files_modified: result.files_modified.clone(),
                files_modified_total: result.files_modified_total,
                files_modified_file: result.files_modified_file.clone(),
            });
        } else {
            self.push_failed(FailedEntry {
                id: result.task_id.clone(),
                agent: result.agent.clone(),
                finished_at: result.finished_at.clone(),
                error: result.error.clone().unwrap_or_default(),
            });
        }
        self.done.insert(result.task_id.clone(), result.status);
    }

    /// Failed tasks known from the mirror at start, in any order.
    pub(super) fn load_failed(&mut self, mut entries: Vec<FailedEntry>) {
        entries.sort_by(|a, b| a.finished_at.cmp(&b.finished_at));
        for e in entries {
            self.done.insert(e.id.clone(), Terminal::Failed);
            self.push_failed(e);
        }
    }

    fn push_failed(&mut self, e: FailedEntry) {
        self.failed.retain(|f| f.id != e.id);
        self.failed.push_back(e);
        while self.failed.len() > RECENT_FAILURES {
            self.failed.pop_front();
        }
    }

    pub(super) fn recent_failures(&self) -> impl Iterator<Item = &FailedEntry> {
        self.failed.iter()
    }

    /// Completed tasks known from the mirror at start, in any order.
    pub(super) fn load_completed(&mut self, entries: Vec<CompletedEntry>) {
        for e in entries {
            self.done.insert(e.id.clone(), Terminal::Completed);
            self.completed.push(e);
        }
        self.completed
            .sort_by(|a, b| a.finished_at.cmp(&b.finished_at));
    }

    /// Back in `pending/`: the tree says it is not finished any more, so neither are we.
    pub(super) fn reopen(&mut self, id: &str) {
        self.done.remove(id);
        self.completed.retain(|c| c.id != id);
        self.failed.retain(|f| f.id != id);
    }

    /// (completed, failed)
    pub(super) fn counts(&self) -> (usize, usize) {
        let (mut c, mut f) = (0, 0);
        for t in self.done.values() {
            match t {
                Terminal::Completed => c += 1,
                Terminal::Failed => f += 1,
            }
        }
        (c, f)
    }

    pub(super) fn completed(&self) -> &[CompletedEntry] {
        &self.completed
    }
}
