//! Diffs of workdirs that git does not track: a snapshot of the files before a run, compared with the
//! tree after it.
//!
//! The snapshot keeps sizes and mtimes of every file and the contents of small text files (up to
//! `context.max_snapshot_bytes` in all), shared with the previous snapshot of the same workdir when
//! nothing changed, so back-to-back tasks in one folder cost a stat per file. The spool, context and
//! state folders, `.git`, `target`, `node_modules` and `context.diff_exclude` are never looked at.
//! Paths in the diff's headers are quoted the way git quotes them (`"a/x\ny"`), so no file name can
//! add a line of its own to a diff. This module only reads the workdir; it never writes anywhere.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Config;
use crate::console::quote_path;
use crate::layout::Layout;

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
    /// The [`workdir_stamp`] of the tree as this snapshot found it, added up on the same walk.
    pub stamp: u64,
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

impl Excludes {
    /// What diffs never look at: `context.diff_exclude` and the spool, context and state folders
    /// (the attempt's own log grows in `context/`).
    fn of(layout: &Layout, cfg: &Config) -> Excludes {
        Excludes {
            names: cfg.context.diff_exclude_globs.clone(),
            paths: vec![
                layout.tasks_dir.clone(),
                layout.context_dir.clone(),
                layout.state_dir.clone(),
            ],
        }
    }
}

/// How many files a workdir stamp looks at, at most: a stall check must stay cheap in any tree.
pub const STAMP_MAX_FILES: usize = 50_000;

/// A cheap fingerprint of the files a diff would look at (how many, their sizes, their newest
/// mtime, up to [`STAMP_MAX_FILES`] of them): a different value means something was written,
/// created or removed. For the stall watch, which calls it only after output has been quiet for a
/// while.
pub fn workdir_stamp(root: &Path, layout: &Layout, cfg: &Config) -> u64 {
    let excludes = Excludes::of(layout, cfg);
    let mut stamp = Stamp::default();
    for (_, m, ns) in walk(root, &excludes).take(STAMP_MAX_FILES) {
        stamp.add(&m, ns);
    }
    stamp.value()
}

/// [`workdir_stamp`] as it is being added up, one file at a time in walk order.
#[derive(Default)]
struct Stamp {
    files: u64,
    bytes: u64,
    newest: Option<i128>,
}

impl Stamp {
    fn add(&mut self, m: &std::fs::Metadata, mtime_ns: i128) {
        if self.files as usize >= STAMP_MAX_FILES {
            return;
        }
        self.files += 1;
        self.bytes = self.bytes.wrapping_add(m.len());
        self.newest = self.newest.max(Some(mtime_ns));
    }

    fn value(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.files, self.bytes, self.newest).hash(&mut h);
        h.finish()
    }
}

impl Snapshot {
    pub fn take(root: &Path, layout: &Layout, cfg: &Config) -> Snapshot {
        use std::os::unix::fs::MetadataExt;
        let excludes = Excludes::of(layout, cfg);
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
        let mut stamp = Stamp::default();
        for (rel, m, ns) in walk(root, &excludes) {
            stamp.add(&m, ns);
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
            stamp: stamp.value(),
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
            files.push(name);
            // Quoted as git quotes them: a name with a line break or an escape sequence stays on
            // its header line, and cannot pass for a header of its own.
            let raw = {
                use std::os::unix::ffi::OsStrExt;
                rel.as_os_str().as_bytes()
            };
            let quoted = |prefix: &str| quote_path(&[prefix.as_bytes(), raw].concat());
            let (a_name, b_name) = match change {
                Change::Added => ("/dev/null".to_string(), quoted("b/")),
                Change::Deleted(_) => (quoted("a/"), "/dev/null".to_string()),
                Change::Modified(_) => (quoted("a/"), quoted("b/")),
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
                        "diff --orchestrate {a_name} {b_name}\nFile {} changed{} (too large to diff, limit {} bytes)\n",
                        quoted(""),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stamp_changes_with_writes_creations_and_removals_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let cfg = Config::parse("", "test").expect("the empty config is valid");
        let layout = cfg.layout(&root);
        std::fs::write(root.join("a.txt"), "a\n").expect("write");
        let snap = Snapshot::take(&root, &layout, &cfg);
        let stamp = || workdir_stamp(&root, &layout, &cfg);
        // The snapshot's own stamp is the one a later look computes for the same tree.
        assert_eq!(snap.stamp, stamp());
        // What the agent's log grows into (the context folder) is not the workdir changing.
        std::fs::create_dir_all(&layout.context_dir).expect("mkdir context");
        std::fs::write(layout.context_dir.join("log"), "output").expect("write");
        assert_eq!(snap.stamp, stamp());
        std::fs::write(root.join("b.txt"), "b\n").expect("create");
        let created = stamp();
        assert_ne!(created, snap.stamp);
        std::fs::write(root.join("b.txt"), "bb\n").expect("rewrite");
        let written = stamp();
        assert_ne!(written, created);
        std::fs::remove_file(root.join("b.txt")).expect("rm");
        assert_ne!(stamp(), written);
    }

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
    fn names_with_line_breaks_are_quoted_in_headers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let cfg = Config::parse("", "test").expect("the empty config is valid");
        let layout = cfg.layout(&root);
        let snap = Snapshot::take(&root, &layout, &cfg);
        // A name cannot hold a slash, but it can hold line breaks.
        let name = "x\n+++ evil\ndiff --git evil evil";
        std::fs::write(root.join(name), "hi\n").expect("write");
        let d = snap.diff();
        assert_eq!(d.files, vec![name.to_string()]);
        let quoted = "\"b/x\\n+++ evil\\ndiff --git evil evil\"";
        assert!(d.text.contains(&format!("+++ {quoted}\n")), "{}", d.text);
        let headers: Vec<&str> = d
            .text
            .lines()
            .filter(|l| l.starts_with("+++") || l.starts_with("diff "))
            .collect();
        assert_eq!(headers.len(), 2, "{}", d.text);
        assert!(
            !d.text.lines().any(|l| l.starts_with("diff --git")),
            "{}",
            d.text
        );
    }
}
