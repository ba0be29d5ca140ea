//! Everything under `context/`: prompts in, outputs and diffs out.
//!
//! The prompt an agent sees is assembled here from the task, `context/project_overview.md`, the task's
//! `context_files` (each must resolve inside the project root) and its dependencies' outputs. After a
//! run, the agent's text goes to `agent_outputs/<id>_output.md` and the changes it made under its
//! workdir to `diffs/<id>.diff`, computed by comparing a snapshot taken before the run with the tree
//! after it. All writes are atomic. Secrets are redacted from everything written.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

fn read_capped(path: &Path, cap: u64) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
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
    if let Some(parent) = &task.file.parent {
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
        // The handoff: what the last failed attempt produced, so the next one (often another
        // agent) builds on it instead of starting blind. The output file still holds that attempt.
        if let Some(last) = previous.last().filter(|a| a.outcome.counts_as_failure())
            && let Ok(text) = std::fs::read_to_string(layout.output_path(&task.id))
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

/// How much of a failed attempt's output is handed to the next attempt.
const HANDOFF_BYTES: usize = 4096;

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

/// What a file looked like before the run.
#[derive(Debug, Clone)]
struct FileState {
    size: u64,
    mtime_ns: i128,
    ino: u64,
    content: Option<Arc<Vec<u8>>>,
    symlink: bool,
}

/// The latest snapshot per workdir (contents shared with the snapshots themselves, not copied).
type SnapshotCache = std::sync::Mutex<HashMap<PathBuf, Arc<HashMap<PathBuf, FileState>>>>;

fn snapshot_cache() -> &'static SnapshotCache {
    static CACHE: std::sync::OnceLock<SnapshotCache> = std::sync::OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The workdir before a run, to diff against afterwards.
pub struct Snapshot {
    root: PathBuf,
    files: HashMap<PathBuf, FileState>,
    excludes: Excludes,
    max_file: u64,
}

#[derive(Clone)]
struct Excludes {
    names: Vec<glob::Pattern>,
    /// Absolute paths never diffed: the spool, context and state directories.
    paths: Vec<PathBuf>,
}

impl Excludes {
    fn skip(&self, path: &Path, name: &str) -> bool {
        matches!(name, ".git" | "target" | "node_modules" | ".orchestrate")
            || self.names.iter().any(|g| g.matches(name))
            || self.paths.iter().any(|p| path == p)
    }
}

fn stat(path: &Path) -> Option<(std::fs::Metadata, i128)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    let ns = m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128;
    Some((m, ns))
}

fn walk(root: &Path, ex: &Excludes) -> impl Iterator<Item = (PathBuf, std::fs::Metadata, i128)> {
    let ex = ex.clone();
    let root_owned = root.to_path_buf();
    walkdir::WalkDir::new(root)
        .follow_links(false)
        .into_iter()
        .filter_entry(move |e| {
            e.depth() == 0 || !ex.skip(e.path(), &e.file_name().to_string_lossy())
        })
        .filter_map(Result::ok)
        .filter(|e| !e.file_type().is_dir())
        .filter_map(move |e| {
            let (m, ns) = stat(e.path())?;
            let rel = e.path().strip_prefix(&root_owned).ok()?.to_path_buf();
            Some((rel, m, ns))
        })
}

impl Snapshot {
    pub fn take(root: &Path, layout: &Layout, cfg: &Config) -> Snapshot {
        use std::os::unix::fs::MetadataExt;
        let excludes = Excludes {
            names: cfg.context.diff_exclude_globs.clone(),
            paths: vec![
                layout.tasks_dir.clone(),
                layout.context_dir.clone(),
                layout.state_dir.clone(),
            ],
        };
        let max_file = cfg.context.max_diff_file_bytes;
        let mut budget = cfg.context.max_snapshot_bytes;
        let mut files = HashMap::new();
        // The last snapshot of this workdir: files whose size, mtime and inode are unchanged since
        // reuse its content instead of being read again (a 10,000-file workdir costs a stat walk).
        let previous = snapshot_cache()
            .lock()
            .ok()
            .and_then(|c| c.get(root).cloned())
            .unwrap_or_default();
        for (rel, m, ns) in walk(root, &excludes) {
            let symlink = m.file_type().is_symlink();
            if let Some(old) = previous.get(&rel)
                && old.size == m.len()
                && old.mtime_ns == ns
                && old.ino == m.ino()
                && old.symlink == symlink
                && (old.content.is_some() || m.len() > max_file)
            {
                budget -= old
                    .content
                    .as_ref()
                    .map_or(0, |c| c.len() as u64)
                    .min(budget);
                files.insert(rel, old.clone());
                continue;
            }
            let content = if symlink {
                std::fs::read_link(root.join(&rel))
                    .ok()
                    .map(|t| Arc::new(t.as_os_str().as_encoded_bytes().to_vec()))
            } else if m.len() <= max_file && m.len() <= budget {
                std::fs::read(root.join(&rel)).ok().map(|c| {
                    budget -= (c.len() as u64).min(budget);
                    Arc::new(c)
                })
            } else {
                None
            };
            files.insert(
                rel,
                FileState {
                    size: m.len(),
                    mtime_ns: ns,
                    ino: m.ino(),
                    content,
                    symlink,
                },
            );
        }
        if let Ok(mut c) = snapshot_cache().lock() {
            c.insert(root.to_path_buf(), Arc::new(files.clone()));
        }
        Snapshot {
            root: root.to_path_buf(),
            files,
            excludes,
            max_file,
        }
    }

    /// Compare with the tree now: a unified diff and the list of changed paths.
    pub fn diff(&self) -> DiffResult {
        use std::os::unix::fs::MetadataExt;
        let mut changed: BTreeMap<PathBuf, Change> = BTreeMap::new();
        let mut seen = std::collections::HashSet::new();
        for (rel, m, ns) in walk(&self.root, &self.excludes) {
            seen.insert(rel.clone());
            match self.files.get(&rel) {
                Some(old) if old.size == m.len() && old.mtime_ns == ns && old.ino == m.ino() => {}
                Some(old) => {
                    changed.insert(rel, Change::Modified(old.clone()));
                }
                None => {
                    changed.insert(rel, Change::Added);
                }
            }
        }
        for (rel, old) in &self.files {
            if !seen.contains(rel) {
                changed.insert(rel.clone(), Change::Deleted(old.clone()));
            }
        }
        let mut text = String::new();
        let mut files = Vec::new();
        for (rel, change) in changed {
            let name = rel.display().to_string();
            let new_path = self.root.join(&rel);
            let (old, new): (Option<Vec<u8>>, Option<Vec<u8>>) = match &change {
                Change::Added => (Some(vec![]), read_new(&new_path, self.max_file)),
                Change::Deleted(o) => (o.content.as_deref().cloned(), Some(vec![])),
                Change::Modified(o) => (
                    o.content.as_deref().cloned(),
                    read_new(&new_path, self.max_file),
                ),
            };
            // mtime moved but content is identical (touched, or rewritten unchanged): not a change.
            if let (Some(a), Some(b)) = (&old, &new)
                && a == b
                && !matches!(change, Change::Added | Change::Deleted(_))
            {
                continue;
            }
            files.push(name.clone());
            let (a_name, b_name) = match change {
                Change::Added => ("/dev/null".to_string(), format!("b/{name}")),
                Change::Deleted(_) => (format!("a/{name}"), "/dev/null".to_string()),
                Change::Modified(_) => (format!("a/{name}"), format!("b/{name}")),
            };
            let is_symlink = match &change {
                Change::Deleted(o) | Change::Modified(o) => o.symlink,
                Change::Added => false,
            };
            match (old, new) {
                (Some(a), Some(b)) if !is_binary(&a) && !is_binary(&b) && !is_symlink => {
                    let (a, b) = (String::from_utf8_lossy(&a), String::from_utf8_lossy(&b));
                    let d = similar::TextDiff::from_lines(a.as_ref(), b.as_ref());
                    text.push_str(&format!("diff --orchestrate {a_name} {b_name}\n"));
                    text.push_str(
                        &d.unified_diff()
                            .context_radius(3)
                            .header(&a_name, &b_name)
                            .to_string(),
                    );
                    if !text.ends_with('\n') {
                        text.push('\n');
                    }
                }
                (Some(a), Some(b)) if is_binary(&a) || is_binary(&b) => {
                    text.push_str(&format!(
                        "diff --orchestrate {a_name} {b_name}\nBinary files {a_name} and {b_name} differ ({} → {} bytes)\n",
                        a.len(),
                        b.len()
                    ));
                }
                _ => {
                    let size = std::fs::symlink_metadata(&new_path).map(|m| m.len()).ok();
                    text.push_str(&format!(
                        "diff --orchestrate {a_name} {b_name}\nFile {name} changed{} (too large to diff, limit {} bytes)\n",
                        size.map(|s| format!(", now {s} bytes")).unwrap_or_default(),
                        self.max_file
                    ));
                }
            }
        }
        DiffResult { text, files }
    }
}

enum Change {
    Added,
    Deleted(FileState),
    Modified(FileState),
}

fn read_new(path: &Path, max: u64) -> Option<Vec<u8>> {
    let m = std::fs::symlink_metadata(path).ok()?;
    if m.file_type().is_symlink() {
        return std::fs::read_link(path)
            .ok()
            .map(|t| t.as_os_str().as_encoded_bytes().to_vec());
    }
    if m.len() > max {
        return None;
    }
    std::fs::read(path).ok()
}

fn is_binary(b: &[u8]) -> bool {
    b[..b.len().min(8000)].contains(&0) || std::str::from_utf8(b).is_err()
}

pub struct DiffResult {
    pub text: String,
    pub files: Vec<String>,
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

/// One line of `completed_tasks.json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CompletedEntry {
    pub id: String,
    pub description: String,
    pub agent: Option<String>,
    pub finished_at: String,
    pub output_file: Option<String>,
    pub diff_file: Option<String>,
    pub files_modified: Vec<String>,
}

/// Regenerate `completed_tasks.json` and `current_state.md` from the supervisor's view.
pub fn write_state_files(
    layout: &Layout,
    completed: &[CompletedEntry],
    counts: &BTreeMap<&'static str, usize>,
    running: &[(String, String, String)],
    redactor: &Redactor,
) -> Result<()> {
    let json = redactor.redact_owned(serde_json::to_string_pretty(completed)?);
    // Both are rebuilt from the result files at every start: atomic for readers, no disk flush.
    atomic_write_derived(&layout.completed_tasks(), json.as_bytes())?;
    let mut md = String::from("# Current state\n\n");
    md.push_str(&format!("Updated {}.\n\n", crate::fsutil::now_rfc3339()));
    md.push_str("| state | tasks |\n|---|---|\n");
    for (k, v) in counts {
        md.push_str(&format!("| {k} | {v} |\n"));
    }
    if !running.is_empty() {
        md.push_str("\n## Running\n\n");
        for (id, agent, since) in running {
            md.push_str(&format!("- {id} on {agent} since {since}\n"));
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
                if c.files_modified.is_empty() {
                    String::new()
                } else {
                    format!(" — changed {}", c.files_modified.join(", "))
                }
            ));
        }
    }
    atomic_write_derived(
        &layout.current_state(),
        redactor.redact_owned(md).as_bytes(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_covers_text_binary_large_deleted_and_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let mut cfg = Config::parse("", "test").expect("the empty config is valid");
        cfg.context.max_diff_file_bytes = 1000;
        let layout = cfg.layout(&root);
        std::fs::write(root.join("keep.txt"), "a\nb\nc\n").expect("write");
        std::fs::write(root.join("touched.txt"), "same\n").expect("write");
        std::fs::write(root.join("gone.txt"), "bye\n").expect("write");
        std::fs::create_dir_all(root.join("target")).expect("mkdir");
        let snap = Snapshot::take(&root, &layout, &cfg);
        std::fs::write(root.join("keep.txt"), "a\nB\nc\n").expect("write");
        std::fs::write(root.join("touched.txt"), "same\n").expect("rewrite unchanged");
        std::fs::remove_file(root.join("gone.txt")).expect("rm");
        std::fs::write(root.join("bin.dat"), [0u8, 159, 146, 150]).expect("write");
        std::fs::write(root.join("big.txt"), "x".repeat(5000)).expect("write");
        std::fs::write(root.join("target/ignored.o"), "built").expect("write");
        let d = snap.diff();
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
    }

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
