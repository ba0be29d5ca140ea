//! Hints that something in `pending/` may have changed.
//!
//! Events are hints, the scan is the truth: notify (inotify) makes us react within milliseconds, and
//! a full rescan runs at start, every `rescan_seconds`, and whenever notify reports an overflow, asks
//! for a rescan or fails. A watcher that reports nothing costs latency, never tasks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hint {
    /// A file is known complete: it arrived by rename or its writer closed it.
    Complete(PathBuf),
    /// A file appeared or changed; it must settle before it is read.
    Changed(PathBuf),
    /// Look at the whole directory again.
    Rescan,
}

/// Keeps the watcher alive; dropping it stops the events.
pub struct WatchHandle {
    _watcher: Option<notify::RecommendedWatcher>,
}

/// Start watching `dir`, sending hints to `tx`. A rescan ticker runs alongside. If the watcher cannot be
/// created (inotify limits), we warn and live on the ticker alone.
pub fn start(dir: &Path, rescan: Duration, tx: mpsc::UnboundedSender<Hint>) -> WatchHandle {
    let ev_tx = tx.clone();
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
    let watcher = match watcher {
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
    };
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

fn classify(ev: &notify::Event) -> Vec<Hint> {
    if ev.need_rescan() {
        return vec![Hint::Rescan];
    }
    match ev.kind {
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
            ev.paths.iter().cloned().map(Hint::Complete).collect()
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => ev
            .paths
            .get(1)
            .cloned()
            .map(Hint::Complete)
            .into_iter()
            .collect(),
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
            ev.paths.iter().cloned().map(Hint::Complete).collect()
        }
        EventKind::Create(CreateKind::Folder) => vec![Hint::Rescan],
        EventKind::Create(_) | EventKind::Modify(_) => {
            ev.paths.iter().cloned().map(Hint::Changed).collect()
        }
        EventKind::Other | EventKind::Any => vec![Hint::Rescan],
        _ => vec![],
    }
}
