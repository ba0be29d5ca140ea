//! Every path of a project, spelled once.
//!
//! A project is a root with three configured folders: `tasks/` (the spool: `pending/`, `assigned/`,
//! `completed/`, `failed/`, `quarantine/`), `context/` (prompts in, outputs, diffs and logs out) and
//! the host-local state directory (`.orchestrate/`: the SQLite mirror, instance locks, cancel
//! requests, cooldowns, agents that need a login). Every file name orchestrate reads or writes is
//! built here, so a reader finds the whole tree in one place and no two modules can disagree about
//! where a file lives.
//!
//! This module only computes paths: it never touches the file system.

use std::path::{Component, Path, PathBuf};

/// The project's folders, absolute and normalized, and the names of the files in them.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
    pub tasks_dir: PathBuf,
    pub pending: PathBuf,
    pub assigned: PathBuf,
    pub completed: PathBuf,
    pub failed: PathBuf,
    pub quarantine: PathBuf,
    pub context_dir: PathBuf,
    pub state_dir: PathBuf,
}

impl Layout {
    /// `tasks_dir`, `context_dir` and `state_dir` as configured: relative ones are taken from `root`.
    pub fn new(root: &Path, tasks_dir: &Path, context_dir: &Path, state_dir: &Path) -> Layout {
        let abs = |p: &Path| {
            normalize(&if p.is_absolute() {
                p.to_path_buf()
            } else {
                root.join(p)
            })
        };
        let tasks_dir = abs(tasks_dir);
        Layout {
            root: root.to_path_buf(),
            pending: tasks_dir.join("pending"),
            assigned: tasks_dir.join("assigned"),
            completed: tasks_dir.join("completed"),
            failed: tasks_dir.join("failed"),
            quarantine: tasks_dir.join("quarantine"),
            tasks_dir,
            context_dir: abs(context_dir),
            state_dir: abs(state_dir),
        }
    }

    /// Where the configuration is looked for when none is named (`-c`/`--config`).
    pub fn config_file(root: &Path) -> PathBuf {
        root.join("config.yaml")
    }

    /// The spool's folders, `pending/` first.
    pub fn spool_dirs(&self) -> [&Path; 5] {
        [
            &self.pending,
            &self.assigned,
            &self.completed,
            &self.failed,
            &self.quarantine,
        ]
    }

    // --- tasks/ ---

    /// `<dir>/<id>.yaml`: a task file as orchestrate names it once it has left `pending/`.
    pub fn task_file(dir: &Path, id: &str) -> PathBuf {
        dir.join(format!("{id}.yaml"))
    }

    /// `<dir>/<id>_result.yaml`, beside a finished task.
    pub fn result_file(dir: &Path, id: &str) -> PathBuf {
        dir.join(format!("{id}_result.yaml"))
    }

    pub fn claim_path(&self, id: &str) -> PathBuf {
        self.assigned.join(format!("{id}.claim.yaml"))
    }

    /// What a requeued task carries back to `pending/`; the leading dot hides it from the name whitelist.
    pub fn history_path(&self, id: &str) -> PathBuf {
        self.pending.join(format!(".{id}.history.yaml"))
    }

    /// `X.error.txt` beside a rejected task file `X.yaml` (or `X.yml`).
    pub fn error_path(task_file: &Path) -> PathBuf {
        let name = task_file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        task_file.with_file_name(format!("{}.error.txt", file_stem(&name)))
    }

    /// `<file name>.reason.txt` beside a quarantined file.
    pub fn reason_path(file: &Path) -> PathBuf {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        file.with_file_name(format!("{name}.reason.txt"))
    }

    // --- context/ ---

    pub fn project_overview(&self) -> PathBuf {
        self.context_dir.join("project_overview.md")
    }

    pub fn current_state(&self) -> PathBuf {
        self.context_dir.join("current_state.md")
    }

    pub fn completed_tasks(&self) -> PathBuf {
        self.context_dir.join("completed_tasks.json")
    }

    pub fn output_path(&self, id: &str) -> PathBuf {
        self.context_dir
            .join("agent_outputs")
            .join(format!("{id}_output.md"))
    }

    pub fn diff_path(&self, id: &str) -> PathBuf {
        self.context_dir.join("diffs").join(format!("{id}.diff"))
    }

    /// Every file a task changed, one a line, beside its diff: written when there are more than a
    /// result record lists.
    pub fn files_list_path(&self, id: &str) -> PathBuf {
        self.context_dir
            .join("diffs")
            .join(format!("{id}.files.txt"))
    }

    pub fn log_path(&self, id: &str, attempt: u32) -> PathBuf {
        self.logs_dir(id).join(format!("attempt-{attempt}.log"))
    }

    /// The prompt an attempt was given, beside its log.
    pub fn prompt_path(&self, id: &str, attempt: u32) -> PathBuf {
        self.logs_dir(id)
            .join(format!("attempt-{attempt}.prompt.md"))
    }

    /// What an attempt's `check` printed, beside its log.
    pub fn check_log_path(&self, id: &str, attempt: u32) -> PathBuf {
        self.logs_dir(id)
            .join(format!("attempt-{attempt}.check.log"))
    }

    fn logs_dir(&self, id: &str) -> PathBuf {
        self.context_dir.join("logs").join(id)
    }

    // --- the state directory ---

    /// Where tasks' git worktrees live: one folder per task with an attempt running (or held for
    /// the attempt that resumes it), and [`Layout::worktree_pool`] for idle ones.
    pub fn worktrees_dir(&self) -> PathBuf {
        self.state_dir.join("worktrees")
    }

    /// The worktree of task `id`: the same folder for every attempt, so an attempt that resumes a
    /// CLI session finds it where the session left it.
    pub fn worktree_path(&self, id: &str) -> PathBuf {
        self.worktrees_dir().join(id)
    }

    /// Idle worktrees kept for reuse, one folder each (a task id never starts with `.`).
    pub fn worktree_pool(&self) -> PathBuf {
        self.worktrees_dir().join(".pool")
    }

    /// The task a folder name under [`Layout::worktrees_dir`] stands for (`None` for the pool).
    pub fn worktree_owner(name: &str) -> Option<&str> {
        (!name.starts_with('.')).then_some(name)
    }

    pub fn state_db(&self) -> PathBuf {
        self.state_dir.join("state.db")
    }

    /// The PostgreSQL writer's health, for `status`.
    /// Held by the one notification sender of this state directory (several supervisors on one
    /// tree would otherwise deliver each event once each).
    pub fn notify_lock(&self) -> PathBuf {
        self.state_dir.join("notify").join("sender.lock")
    }

    /// The last run's output of a notification channel's command.
    pub fn notify_log(&self, channel: &str) -> PathBuf {
        self.state_dir.join("notify").join(format!("{channel}.log"))
    }

    pub fn postgres_health(&self) -> PathBuf {
        self.state_dir.join("postgres.json")
    }

    pub fn cooldowns(&self) -> PathBuf {
        self.state_dir.join("cooldowns.json")
    }

    /// orchestrate's own folders (the spool, `context/`, the state directory): never part of a
    /// task's snapshot, diff or landing, even when they sit inside the task's repository.
    pub fn own_folders(&self) -> Vec<PathBuf> {
        vec![
            self.tasks_dir.clone(),
            self.context_dir.clone(),
            self.state_dir.clone(),
        ]
    }

    /// Outcomes known but not yet on disk in `tasks/` (a full disk, a busy lock): kept here, when
    /// possible, so a restart commits them instead of running the agent again.
    pub fn unfinished_dir(&self) -> PathBuf {
        self.state_dir.join("unfinished")
    }

    pub fn unfinished_result(&self, id: &str) -> PathBuf {
        self.unfinished_dir().join(format!("{id}.result.yaml"))
    }

    pub fn unfinished_history(&self, id: &str) -> PathBuf {
        self.unfinished_dir().join(format!("{id}.history.yaml"))
    }

    /// Agents whose credentials were refused, until something may have fixed that.
    pub fn needs_login(&self) -> PathBuf {
        self.state_dir.join("needs_login.json")
    }

    /// Held around every read-modify-write of [`Layout::needs_login`] (supervisors sharing the
    /// tree, `orchestrate agents --reset`).
    pub fn needs_login_lock(&self) -> PathBuf {
        self.state_dir.join("needs_login.lock")
    }

    /// Taken around every spool transition by every supervisor and command sharing the tree.
    pub fn spool_lock(&self) -> PathBuf {
        self.state_dir.join("spool.lock")
    }

    /// One file per cancel request, named after the task.
    pub fn cancel_dir(&self) -> PathBuf {
        self.state_dir.join("cancel")
    }

    /// The request `orchestrate cancel` leaves for the supervisor that runs `id`.
    pub fn cancel_request(&self, id: &str) -> PathBuf {
        self.cancel_dir().join(id)
    }

    pub fn instances_dir(&self) -> PathBuf {
        self.state_dir.join("instances")
    }

    /// The lock file a live supervisor instance holds.
    pub fn instance_lock(&self, instance: &str) -> PathBuf {
        self.instances_dir().join(format!("{instance}.lock"))
    }

    pub fn supervisor_log(&self) -> PathBuf {
        self.state_dir.join("supervisor.log")
    }

    pub fn supervisor_pid(&self) -> PathBuf {
        self.state_dir.join("supervisor.pid")
    }

    /// A path relative to the project root, for records people read.
    pub fn rel(&self, p: &Path) -> String {
        p.strip_prefix(&self.root)
            .unwrap_or(p)
            .display()
            .to_string()
    }
}

/// A task file's name without `.yaml`/`.yml`: its default id.
pub fn file_stem(name: &str) -> &str {
    name.strip_suffix(".yaml")
        .or_else(|| name.strip_suffix(".yml"))
        .unwrap_or(name)
}

/// Lexical normalization (`a/./b/../c` → `a/c`) without touching the file system.
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_removes_dots() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
    }

    #[test]
    fn relative_folders_hang_off_the_root() {
        let l = Layout::new(
            Path::new("/p"),
            Path::new("./tasks"),
            Path::new("ctx/../context"),
            Path::new("/var/state"),
        );
        assert_eq!(l.pending, PathBuf::from("/p/tasks/pending"));
        assert_eq!(l.context_dir, PathBuf::from("/p/context"));
        assert_eq!(
            l.instance_lock("i"),
            PathBuf::from("/var/state/instances/i.lock")
        );
        assert_eq!(
            Layout::error_path(Path::new("/p/tasks/failed/x.yml")),
            PathBuf::from("/p/tasks/failed/x.error.txt")
        );
    }
}
