//! Hints that something in `pending/` may have changed.
//!
//! Events are hints, the scan is the truth: notify (inotify) makes us react within milliseconds, and
//! a full rescan runs at start, every `rescan_seconds`, and whenever notify reports an overflow, asks
//! for a rescan or fails. A watcher that reports nothing costs latency, never tasks.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hint {
    /// A file was renamed into the folder: whole, the protocol that needs no other proof.
    Renamed(PathBuf),
    /// A writer closed a file. Not proof that it is whole: another process (a child that inherited
    /// the descriptor's parent, say) may still hold it open for writing.
    Closed(PathBuf),
    /// A file appeared or changed; it must settle before it is read.
    Changed(PathBuf),
    /// Look at the whole directory again.
    Rescan,
}

/// Keeps the watcher alive; dropping it stops the events.
pub struct WatchHandle {
    _watcher: Arc<Mutex<Option<notify::RecommendedWatcher>>>,
}

/// For tests only: `ORCHESTRATE_NO_WATCH=1` starts no file watcher, so a test can prove that the
/// periodic rescan alone processes everything (as it must when inotify is unavailable or silent).
const NO_WATCH_ENV: &str = "ORCHESTRATE_NO_WATCH";

/// How often we check whether the watched directory was replaced (deleted and re-created, or another
/// directory renamed over it). inotify watches an inode, not a path: without a fresh watch, a re-created
/// `pending/` would only be seen by the slow periodic rescan.
const REWATCH_CHECK: Duration = Duration::from_millis(500);

/// What tells a re-created directory from the old one. The inode number alone does not: ext4 hands a
/// freed number straight to the next directory made, so the creation time is part of it.
fn dir_identity(dir: &Path) -> Option<(u64, u64, Option<std::time::SystemTime>)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.created().ok()))
}

/// Start watching `dir`, sending hints to `tx`. A rescan ticker runs alongside. If the watcher cannot be
/// created (inotify limits), we warn and live on the ticker alone.
pub fn start(dir: &Path, rescan: Duration, tx: mpsc::UnboundedSender<Hint>) -> WatchHandle {
    let disabled = std::env::var_os(NO_WATCH_ENV).is_some_and(|v| v == "1");
    // Taken before the watch starts, so a replacement in between is noticed too.
    let first_identity = dir_identity(dir);
    let watcher = if disabled {
        crate::console::warn(&format!(
            "file watcher disabled ({NO_WATCH_ENV}=1); relying on the rescan every {} s",
            rescan.as_secs()
        ));
        None
    } else {
        new_watcher(dir, rescan, tx.clone())
    };
    let watcher = Arc::new(Mutex::new(watcher));
    if !disabled {
        let (dir, tx, watcher) = (dir.to_path_buf(), tx.clone(), watcher.clone());
        tokio::spawn(async move {
            let mut watched = first_identity;
            let mut tick = tokio::time::interval(REWATCH_CHECK);
            loop {
                tick.tick().await;
                let now = dir_identity(&dir);
                if now.is_none() || now == watched {
                    continue;
                }
                // The directory was replaced: the old watch died with the old inode. Watch the new one
                // and look at what it already holds (a directory renamed in arrives full of files).
                watched = now;
                let fresh = new_watcher(&dir, rescan, tx.clone());
                *watcher.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
                if tx.send(Hint::Rescan).is_err() {
                    break;
                }
            }
        });
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(rescan);
        tick.tick().await;
        loop {
            tick.tick().await;
            if tx.send(Hint::Rescan).is_err() {
                break;
            }
        }
    });
    WatchHandle { _watcher: watcher }
}

fn new_watcher(
    dir: &Path,
    rescan: Duration,
    ev_tx: mpsc::UnboundedSender<Hint>,
) -> Option<notify::RecommendedWatcher> {
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let hints = match res {
            Ok(ev) => classify(&ev),
            Err(e) => {
                crate::console::warn(&format!("watcher error, rescanning: {e}"));
                vec![Hint::Rescan]
            }
        };
        for h in hints {
            let _ = ev_tx.send(h);
        }
    });
    match watcher {
        Ok(mut w) => match w.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => Some(w),
            Err(e) => {
                crate::console::warn(&format!(
                    "cannot watch {} ({e}); relying on the rescan every {} s",
                    dir.display(),
                    rescan.as_secs()
                ));
                None
            }
        },
        Err(e) => {
            crate::console::warn(&format!(
                "cannot create a file watcher ({e}); relying on the periodic rescan"
            ));
            None
        }
    }
}

fn classify(ev: &notify::Event) -> Vec<Hint> {
    if ev.need_rescan() {
        return vec![Hint::Rescan];
    }
    match ev.kind {
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
            ev.paths.iter().cloned().map(Hint::Renamed).collect()
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => ev
            .paths
            .get(1)
            .cloned()
            .map(Hint::Renamed)
            .into_iter()
            .collect(),
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
            ev.paths.iter().cloned().map(Hint::Closed).collect()
        }
        EventKind::Create(CreateKind::Folder) => vec![Hint::Rescan],
        EventKind::Create(_) | EventKind::Modify(_) => {
            ev.paths.iter().cloned().map(Hint::Changed).collect()
        }
        EventKind::Other | EventKind::Any => vec![Hint::Rescan],
        _ => vec![],
    }
}
