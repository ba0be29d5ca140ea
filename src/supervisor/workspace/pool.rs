//! Idle worktrees kept for the next attempt on the same repository. Making a worktree writes every
//! file of the checkout and removing it deletes them all, which on a large repository costs more
//! than supervising most tasks; a worktree handed on instead is moved into place (`git worktree
//! move`, a rename) and reset to the new base, which writes only the files that differ and deletes
//! every file git does not track there, ignored ones included, so the agent finds exactly what a
//! fresh worktree would hold.
//!
//! Idle worktrees live under `state_dir/worktrees/.pool/<instance id>/`, are removed once idle for
//! `workspace.pool_idle_seconds` and when the supervisor stops, and a pool whose supervisor died is
//! removed by the next start's sweep. It never hands out a worktree it could not reset: one that
//! fails is removed and the attempt gets a fresh one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::console;
use crate::git;
use crate::layout::Layout;

pub(crate) struct Pool {
    /// This supervisor's pool folder.
    dir: PathBuf,
    state: Mutex<State>,
    /// A tidy (trim and sweep) is under way.
    tidying: Arc<AtomicBool>,
}

/// The turn to tidy, given back when dropped.
pub(crate) struct TidyTurn(Arc<AtomicBool>);

impl Drop for TidyTurn {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[derive(Default)]
struct State {
    idle: Vec<Idle>,
    /// The next folder name.
    next: u64,
}

struct Idle {
    /// The top of the user's work tree the worktree belongs to.
    root: PathBuf,
    path: PathBuf,
    since: Instant,
}

impl Pool {
    pub(crate) fn new(layout: &Layout, instance: &str) -> Pool {
        Pool {
            dir: layout.worktree_pool().join(instance),
            state: Mutex::new(State::default()),
            tidying: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The turn to tidy, unless a tidy is still under way.
    pub(crate) fn tidy_turn(&self) -> Option<TidyTurn> {
        (!self.tidying.swap(true, Ordering::AcqRel)).then(|| TidyTurn(self.tidying.clone()))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remove every idle worktree, once a tidy under way is over (it would otherwise be cut short
    /// by the process ending, leaving half a worktree behind). Bounded by git's time limit.
    pub(crate) fn drain(&self) {
        let deadline = Instant::now() + git::TIMEOUT;
        let turn = loop {
            if let Some(t) = self.tidy_turn() {
                break Some(t);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.trim(Duration::ZERO);
        drop(turn);
    }

    /// Put an idle worktree of `root` at `to`, on `branch` reset to `base`. False when none is
    /// idle or reusing it failed (it is removed then, and `to` is left free).
    pub(crate) fn take(&self, root: &Path, to: &Path, branch: &str, base: &str) -> bool {
        let idle = {
            let mut st = self.state();
            // The most recently used first: its files are the likeliest to be in the page cache.
            let i = st.idle.iter().rposition(|w| w.root == root);
            i.map(|i| st.idle.remove(i))
        };
        let Some(idle) = idle else {
            return false;
        };
        let moved = git::move_worktree(root, &idle.path, to);
        let reset = moved.and_then(|()| git::reset_worktree(to, branch, base));
        match reset {
            Ok(()) => {
                crate::failpoint::hit("worktree.after_reuse");
                true
            }
            Err(e) => {
                console::debug(&format!(
                    "cannot reuse the worktree {}: {e:#}; making a new one",
                    idle.path.display()
                ));
                for p in [&idle.path, &to.to_path_buf()] {
                    if p.exists()
                        && let Err(e) = git::remove_orphan(p)
                    {
                        console::warn(&format!("cannot remove {}: {e:#}", p.display()));
                    }
                }
                false
            }
        }
    }

    /// Keep the worktree at `path` (of `root`, no longer on any branch) for a later attempt.
    pub(crate) fn give(&self, root: &Path, path: &Path) -> Result<()> {
        let to = {
            let mut st = self.state();
            st.next += 1;
            self.dir.join(st.next.to_string())
        };
        git::move_worktree(root, path, &to)?;
        self.state().idle.push(Idle {
            root: root.to_path_buf(),
            path: to,
            since: Instant::now(),
        });
        Ok(())
    }

    /// Remove the worktrees idle for `idle_for` or longer (all of them with zero); how many.
    pub(crate) fn trim(&self, idle_for: Duration) -> usize {
        let old: Vec<Idle> = {
            let mut st = self.state();
            let (old, keep) = std::mem::take(&mut st.idle)
                .into_iter()
                .partition(|w| w.since.elapsed() >= idle_for);
            st.idle = keep;
            old
        };
        for w in &old {
            if let Err(e) = git::remove_worktree(&w.root, &w.path) {
                console::warn(&format!(
                    "cannot remove the idle worktree {}: {e:#}",
                    w.path.display()
                ));
            }
        }
        if self.state().idle.is_empty() {
            // Only when empty, and `.pool` too when no other supervisor's pool is in it: a
            // supervisor that went idle leaves no folder behind.
            let _ = std::fs::remove_dir(&self.dir);
            if let Some(all) = self.dir.parent() {
                let _ = std::fs::remove_dir(all);
            }
        }
        old.len()
    }
}
