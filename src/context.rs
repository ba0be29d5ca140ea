//! Everything under `context/`: prompts in, outputs and diffs out, and the state files.
//!
//! The prompt an agent sees is assembled here from the task, `context/project_overview.md`, the task's
//! `context_files` (each must resolve inside the project root) and its dependencies' outputs. After a
//! run, the agent's text goes to `agent_outputs/<id>_output.md` and the diff `snapshot` computed to
//! `diffs/<id>.diff`; `current_state.md` and `completed_tasks.json` are regenerated from the
//! supervisor's view. All writes are atomic and go through the [`Redactor`]. This module never moves
//! task files and never runs anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use crate::config::Config;
use crate::fsutil::{atomic_write, atomic_write_derived};
use crate::layout::Layout;
use crate::record::Attempt;
use crate::redact::Redactor;
use crate::task::Task;

/// Resolve `rel` against `base` and require the result (symlinks followed) to stay inside one of `roots`.
pub fn resolve_inside(base: &Path, rel: &str, roots: &[PathBuf], what: &str) -> Result<PathBuf> {
    let joined = if Path::new(rel).is_absolute() {
        PathBuf::from(rel)
    } else {
        base.join(rel)
    };
    let real = joined
        .canonicalize()
        .with_context(|| format!("{what} `{rel}` does not exist ({})", joined.display()))?;
    for root in roots {
        if let Ok(r) = root.canonicalize()
            && real.starts_with(&r)
        {
            return Ok(real);
        }
    }
    bail!(
        "{what} `{rel}` resolves to {}, outside the allowed root{} {}",
        real.display(),
        if roots.len() > 1 { "s" } else { "" },
        roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The first `cap` bytes of a regular file as text. Anything else (a FIFO an agent left in place of
/// an output, a device) is an error, never opened for a read that could block.
fn read_capped(path: &Path, cap: u64) -> Result<String> {
    use std::io::Read;
    let mut f = crate::fsutil::open_regular(path)?;
    let mut buf = Vec::new();
    f.by_ref().take(cap).read_to_end(&mut buf)?;
    let mut s = String::from_utf8_lossy(&buf).into_owned();
    if f.read(&mut [0u8; 1])? > 0 {
        s.push_str(&format!("\n[... cut at {cap} bytes ...]\n"));
    }
    Ok(s)
}

/// The workdir a task runs in, checked against `security.workspace_roots`.
pub fn task_workdir(layout: &Layout, cfg: &Config, task: &Task) -> Result<PathBuf> {
    let roots: Vec<PathBuf> = cfg
        .security
        .workspace_roots
        .iter()
        .map(|r| layout.root.join(r))
        .collect();
    resolve_inside(
        &layout.root,
        task.file.workdir.as_deref().unwrap_or("."),
        &roots,
        "workdir",
    )
}

/// Build the prompt for one attempt.
pub fn build_prompt(
    layout: &Layout,
    cfg: &Config,
    task: &Task,
    previous: &[Attempt],
) -> Result<String> {
    let cap = cfg.context.max_context_file_bytes;
    let mut p = String::new();
    p.push_str(&format!(
        "# Task {}\n\n{}\n",
        task.id,
        task.file.description.trim_end()
    ));
    let overview = layout.project_overview();
    if let Ok(text) = read_capped(&overview, cap)
        && !text.trim().is_empty()
    {
        p.push_str(&format!("\n## Project overview\n\n{}\n", text.trim_end()));
    }
    let roots = [layout.root.clone()];
    for (i, rel) in task.file.context_files.iter().enumerate() {
        let path = resolve_inside(&layout.root, rel, &roots, "context file")
            .with_context(|| format!("context_files[{i}]"))?;
        if !path.is_file() {
            bail!("context_files[{i}]: `{rel}` is not a regular file");
        }
        if i == 0 {
            p.push_str("\n## Context files\n");
        }
        p.push_str(&format!(
            "\n### {rel}\n\n```\n{}\n```\n",
            read_capped(&path, cap)?.trim_end()
        ));
    }
    if let Some(parent) = task
        .file
        .parent
        .as_ref()
        .filter(|_| task.file.candidate.is_none())
    {
        // Subtask: the whole task it is a step of, read from the parent's file (it waits in pending/).
        let n = task.id.rsplit('.').next().unwrap_or("?");
        let parent_file = Layout::task_file(&layout.pending, parent);
        let whole = crate::task::read_task(&parent_file, cfg.orchestrator.max_task_bytes)
            .map(|(t, _)| {
                let steps = t.file.subtasks.len();
                format!(
                    "step {n} of {steps} of task {parent}: {}",
                    t.file.description.trim()
                )
            })
            .unwrap_or_else(|_| format!("step {n} of task {parent}"));
        p.push_str(&format!(
            "\n## This task is one step of a larger one\n\nThis is {whole}\n"
        ));
    }
    let mut first = true;
    for dep in &task.file.dependencies {
        if let Ok(text) = read_capped(&layout.output_path(dep), cap) {
            if first {
                p.push_str("\n## Results of the tasks this one depends on\n");
                first = false;
            }
            p.push_str(&format!("\n### {dep}\n\n{}\n", text.trim_end()));
        }
    }
    let failed: Vec<&Attempt> = previous
        .iter()
        .filter(|a| a.outcome.counts_as_failure())
        .collect();
    if !failed.is_empty() {
        p.push_str("\n## Earlier attempts at this task failed\n\n");
        for a in failed {
            p.push_str(&format!(
                "- attempt {} on {}: {}{}\n",
                a.n,
                a.agent,
                a.outcome.as_str(),
                a.error
                    .as_deref()
                    .map(|e| format!(": {}", first_line(e, 300)))
                    .unwrap_or_default()
            ));
        }
        // The check's verdict comes first: it is what the next attempt has to fix.
        if let Some(last) = previous.last()
            && last.outcome == crate::record::Outcome::CheckFailed
            && let Some(check) = &last.check
        {
            let keep = (cfg.context.max_context_file_bytes as usize).min(HANDOFF_BYTES);
            let said = check
                .log_file
                .as_ref()
                .and_then(|f| read_capped(&layout.root.join(f), OUTPUT_READ_BYTES).ok())
                .map(|log| check_output(&log))
                .filter(|o| !o.trim().is_empty())
                .or_else(|| last.error.clone())
                .unwrap_or_default();
            p.push_str(&format!(
                "\n### The check `{}` failed with (last {keep} bytes at most):\n\n```\n{}\n```\n\n\
                 The task is done only when this check passes (exits with code 0) in the workdir.\n",
                check.command,
                tail_str(&said, keep).trim_end(),
            ));
        }
        // The handoff: what the last failed attempt produced, so the next one (often another
        // agent) builds on it instead of starting blind. The output file still holds that attempt.
        if let Some(last) = previous.last().filter(|a| a.outcome.counts_as_failure())
            && let Ok(text) = read_capped(&layout.output_path(&task.id), OUTPUT_READ_BYTES)
            && !text.trim().is_empty()
        {
            let keep = (cfg.context.max_context_file_bytes as usize).min(HANDOFF_BYTES);
            p.push_str(&format!(
                "\n### What attempt {} on {} produced before it failed (last {} bytes at most)\n\n```\n{}\n```\n",
                last.n,
                last.agent,
                keep,
                tail_str(&text, keep).trim_end()
            ));
        }
    }
    Ok(p)
}

/// What a check printed, from its log: orchestrate's own lines there (which command, how it ended)
/// left out, except the last, which says how it ended.
fn check_output(log: &str) -> String {
    let mut lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.starts_with("[orchestrate: "))
        .collect();
    if let Some(end) = log.lines().rev().find(|l| l.starts_with("[orchestrate: ")) {
        lines.push(end);
    }
    lines.join("\n")
}

/// How much of a failed attempt's output is handed to the next attempt.
const HANDOFF_BYTES: usize = 4096;

/// More than an output file holds (the agent's text is kept within a few MiB).
const OUTPUT_READ_BYTES: u64 = 64 * 1024 * 1024;

/// The last `max` bytes of `s`, cut at a character boundary.
fn tail_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn first_line(s: &str, max: usize) -> String {
    let l = s.lines().next().unwrap_or_default();
    if l.len() > max {
        let mut end = max;
        while !l.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &l[..end])
    } else {
        l.to_string()
    }
}

/// Files in `files` that match a `security.review_paths` glob.
pub fn review_matches(cfg: &Config, files: &[String]) -> Vec<String> {
    let pats = &cfg.security.review_globs;
    let opts = glob::MatchOptions {
        require_literal_separator: false,
        ..Default::default()
    };
    files
        .iter()
        .filter(|f| {
            let base = Path::new(f)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            pats.iter()
                .any(|p| p.matches_with(f, opts) || p.matches(&base))
        })
        .cloned()
        .collect()
}

pub struct OutputHeader<'a> {
    pub task: &'a Task,
    pub agent: &'a str,
    pub attempt: u32,
    pub duration: std::time::Duration,
    pub exit: String,
}

pub fn write_output(
    layout: &Layout,
    h: &OutputHeader,
    text: &str,
    redactor: &Redactor,
) -> Result<PathBuf> {
    let path = layout.output_path(&h.task.id);
    let title = first_line(&h.task.file.description, 120);
    let body = format!(
        "# {}: {}\n\n- agent: {}\n- attempt: {}\n- duration: {:.2} s\n- exit: {}\n\n{}\n",
        h.task.id,
        title,
        h.agent,
        h.attempt,
        h.duration.as_secs_f64(),
        h.exit,
        text.trim_end()
    );
    std::fs::create_dir_all(path.parent().expect("output path has a parent"))?;
    atomic_write(&path, redactor.redact(&body).as_bytes())?;
    Ok(path)
}

pub fn write_diff(layout: &Layout, id: &str, diff: &str, redactor: &Redactor) -> Result<PathBuf> {
    let path = layout.diff_path(id);
    std::fs::create_dir_all(path.parent().expect("diff path has a parent"))?;
    atomic_write(&path, redactor.redact(diff).as_bytes())?;
    Ok(path)
}

/// Every file a task changed, one a line, beside its diff (`files_list_path`): the list a result
/// record holds only the first `record::FILES_IN_RECORD` of.
pub fn write_files_list(
    layout: &Layout,
    id: &str,
    files: &[String],
    redactor: &Redactor,
) -> Result<PathBuf> {
    let path = layout.files_list_path(id);
    std::fs::create_dir_all(path.parent().expect("files list path has a parent"))?;
    let mut text = String::with_capacity(files.iter().map(|f| f.len() + 1).sum());
    for f in files {
        text.push_str(f);
        text.push('\n');
    }
    atomic_write(&path, redactor.redact_owned(text).as_bytes())?;
    Ok(path)
}

/// One line of `completed_tasks.json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CompletedEntry {
    pub id: String,
    pub description: String,
    pub agent: Option<String>,
    pub finished_at: String,
    pub output_file: Option<String>,
    pub diff_file: Option<String>,
    /// The first `record::FILES_IN_RECORD` changed files, as the result lists them.
    pub files_modified: Vec<String>,
    /// How many changed, and the file listing them all, when `files_modified` does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_modified_total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_modified_file: Option<String>,
}

/// How many changed files a line of `current_state.md` names.
const FILES_NAMED: usize = 5;

/// A task that failed, for the recent failures in `current_state.md`.
#[derive(Debug, Clone)]
pub struct FailedEntry {
    pub id: String,
    pub agent: Option<String>,
    pub finished_at: String,
    pub error: String,
}

/// How many waiting tasks `current_state.md` lists by name.
pub const WAITING_SHOWN: usize = 20;

/// What `current_state.md` shows besides the completed tasks.
pub struct StateView<'a> {
    pub counts: &'a BTreeMap<&'static str, usize>,
    /// (id, agent, started at)
    pub running: &'a [(String, String, String)],
    /// (id, why it waits): the first [`WAITING_SHOWN`] by id.
    pub waiting: &'a [(String, String)],
    /// How many wait in all.
    pub waiting_total: usize,
    /// Oldest first.
    pub failed: &'a [&'a FailedEntry],
    /// (file, who holds it open for writing and for how long): files in `pending/` not read yet
    /// because a writer has held them open for a long while.
    pub being_written: &'a [(String, String)],
}

/// Regenerate `completed_tasks.json` and `current_state.md` (the at-a-glance page a phone syncing
/// the folder reads: counts, running, waiting and why, recent failures and why, recent completions).
pub fn write_state_files(
    layout: &Layout,
    completed: &[CompletedEntry],
    view: &StateView,
    redactor: &Redactor,
) -> Result<()> {
    let json = redactor.redact_owned(serde_json::to_string_pretty(completed)?);
    let json = crate::console::json_visible(&json);
    // Both are rebuilt from the result files at every start: atomic for readers, no disk flush.
    atomic_write_derived(&layout.completed_tasks(), json.as_bytes())?;
    let mut md = String::from("# Current state\n\n");
    md.push_str(&format!("Updated {}.\n\n", crate::fsutil::now_rfc3339()));
    md.push_str("| state | tasks |\n|---|---|\n");
    for (k, v) in view.counts {
        md.push_str(&format!("| {k} | {v} |\n"));
    }
    if !view.running.is_empty() {
        md.push_str("\n## Running\n\n");
        for (id, agent, since) in view.running {
            let elapsed = crate::fsutil::seconds_since(since)
                .map(|s| format!(", {}", crate::fsutil::duration_text(s)))
                .unwrap_or_default();
            md.push_str(&format!("- {id} on {agent} since {since}{elapsed}\n"));
        }
    }
    if !view.waiting.is_empty() {
        md.push_str("\n## Waiting\n\n");
        for (id, why) in view.waiting {
            md.push_str(&format!("- {id}: {}\n", first_line(why, 200)));
        }
        if view.waiting_total > view.waiting.len() {
            md.push_str(&format!(
                "- … and {} more\n",
                view.waiting_total - view.waiting.len()
            ));
        }
    }
    if !view.being_written.is_empty() {
        md.push_str("\n## Still being written\n\n");
        for (file, who) in view.being_written {
            md.push_str(&format!("- {file}: {who}\n"));
        }
    }
    if !view.failed.is_empty() {
        md.push_str("\n## Recently failed\n\n");
        for f in view.failed.iter().rev() {
            md.push_str(&format!(
                "- {} ({}): {}\n",
                f.id,
                f.agent.as_deref().unwrap_or("-"),
                first_line(&f.error, 200)
            ));
        }
    }
    let recent: Vec<&CompletedEntry> = completed.iter().rev().take(20).collect();
    if !recent.is_empty() {
        md.push_str("\n## Recently completed\n\n");
        for c in recent {
            md.push_str(&format!(
                "- {} ({}): {}{}\n",
                c.id,
                c.agent.as_deref().unwrap_or("-"),
                first_line(&c.description, 100),
                changed_files(c)
            ));
        }
    }
    // A page people print: what agents and task files wrote is shown, not obeyed (escape sequences,
    // overrides), and file names are quoted as in the diffs; completed_tasks.json has them as JSON
    // escapes.
    // Redacted first: a secret is matched as it was written.
    let md = redactor.redact_owned(md);
    atomic_write_derived(
        &layout.current_state(),
        crate::console::visible(&md).as_bytes(),
    )?;
    Ok(())
}

/// " — changed a, b" for a line of `current_state.md`: a few names, and how many in all.
fn changed_files(c: &CompletedEntry) -> String {
    let total = c
        .files_modified_total
        .unwrap_or(c.files_modified.len() as u64);
    if total == 0 {
        return String::new();
    }
    let named: Vec<String> = c.files_modified[..c.files_modified.len().min(FILES_NAMED)]
        .iter()
        .map(|f| crate::console::quote_path(f.as_bytes()))
        .collect();
    let named = named.join(", ");
    if total as usize > FILES_NAMED {
        format!(" — changed {total} files: {named}, …")
    } else {
        format!(" — changed {named}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_refuses_escape() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("proj");
        std::fs::create_dir_all(root.join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("secret.txt"), "x").expect("write");
        let roots = [root.clone()];
        assert!(resolve_inside(&root, "sub", &roots, "workdir").is_ok());
        let e = resolve_inside(&root, "../secret.txt", &roots, "context file").unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
        std::os::unix::fs::symlink(dir.path().join("secret.txt"), root.join("link"))
            .expect("symlink");
        assert!(resolve_inside(&root, "link", &roots, "context file").is_err());
    }
}
