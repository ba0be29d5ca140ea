//! Crash injection for the reliability suite: `ORCHESTRATE_CRASH_AT=<point>[:<n>]` makes the
//! process SIGKILL itself the n-th time (default: first) it reaches the named commit point, exactly
//! as a power cut or the OOM killer would stop it there: no destructors, no flushing.
//!
//! `ORCHESTRATE_PAUSE_AT=<point>[:<n>]` with `ORCHESTRATE_PAUSE_MS=<ms>` instead holds the thread
//! there for that long, the n-th time, so a test can act inside a window that is otherwise a few
//! microseconds wide (a cancel or a rescan while a claim is under way).
//!
//! Unset (always, outside tests), a point costs two relaxed atomic loads after the first call.
//! The points are listed in [`POINTS`] so the suite can be sure it covers every one.
//!
//! It must never do anything when its variables are unset.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Every commit point of the spool protocol, in protocol order.
pub const POINTS: &[&str] = &[
    // Any record written by temp file + rename: after the temp file, before the rename; after the
    // rename, before the directory fsync.
    "write.before_rename",
    "write.after_rename",
    // Claim: pending/X.yaml → assigned/X.yaml, then the claim record, then the directory fsync.
    "claim.before_rename",
    "claim.after_rename",
    "claim.after_record",
    "claim.after_fsync",
    // The agent runs (a moment after it was started).
    "attempt.running",
    // Finish: the result file, then the task's rename beside it (the commit), then fsyncs.
    "finish.before_result",
    "finish.after_result",
    "finish.after_rename",
    "finish.after_fsync",
    // Requeue (retry, interrupted): the history sidecar, then the rename back to pending/.
    "requeue.after_history",
    "requeue.after_rename",
    // An agent marked "needs login" (state_dir/needs_login.json, written before its task is
    // requeued): after the temporary file, before the rename; after the rename.
    "needs_login.before_rename",
    "needs_login.after_rename",
    // An isolated attempt (a task in a git repository): its worktree made, the agent's changes
    // committed on the task's branch, the changes landed in the user's tree (before the terminal
    // commit), the worktree handed to the pool (moved there, off its branch), and an idle one
    // taken from the pool for the next attempt (moved to the task's folder and reset to its base).
    "worktree.after_add",
    "worktree.after_commit",
    // The task's `check` ran after the agent (in the worktree, after the commit; before landing).
    "attempt.after_check",
    "worktree.after_land",
    "worktree.after_release",
    "worktree.after_reuse",
    // A fan-out's pick landed the winner's branch in the user's tree (before the winner's record
    // says so and before the task's terminal commit).
    "fanout.after_land",
];

struct Target {
    point: String,
    nth: u64,
    seen: AtomicU64,
}

fn parse(var: &str) -> Option<Target> {
    let spec = std::env::var(var).ok()?;
    let (point, nth) = match spec.split_once(':') {
        Some((p, n)) => (p.to_string(), n.parse().unwrap_or(1)),
        None => (spec, 1),
    };
    Some(Target {
        point,
        nth: nth.max(1),
        seen: AtomicU64::new(0),
    })
}

fn target() -> Option<&'static Target> {
    static T: OnceLock<Option<Target>> = OnceLock::new();
    T.get_or_init(|| parse("ORCHESTRATE_CRASH_AT")).as_ref()
}

fn pause() -> Option<&'static (Target, std::time::Duration)> {
    static P: OnceLock<Option<(Target, std::time::Duration)>> = OnceLock::new();
    P.get_or_init(|| {
        let ms = std::env::var("ORCHESTRATE_PAUSE_MS").ok()?.parse().ok()?;
        Some((
            parse("ORCHESTRATE_PAUSE_AT")?,
            std::time::Duration::from_millis(ms),
        ))
    })
    .as_ref()
}

/// Whether this point is the one asked for (to arm timers only in crash runs).
pub fn armed(point: &str) -> bool {
    target().is_some_and(|t| t.point == point)
}

/// Reached a commit point: die here if this is the one (and the n-th time).
pub fn hit(point: &str) {
    if let Some((p, how_long)) = pause()
        && p.point == point
        && p.seen.fetch_add(1, Ordering::SeqCst) + 1 == p.nth
    {
        say(&format!(
            "paused at {point} for {} ms",
            how_long.as_millis()
        ));
        std::thread::sleep(*how_long);
    }
    let Some(t) = target() else { return };
    if t.point != point {
        return;
    }
    if t.seen.fetch_add(1, Ordering::SeqCst) + 1 == t.nth {
        say(&format!("crash injected at {point}"));
        // SAFETY: signalling ourselves.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// A line to stderr, at once (the process may be killed right after it) and whatever became of
/// stderr: a failed write is ignored, never a panic.
fn say(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}
