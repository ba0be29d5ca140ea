//! The run marker and the sweep of escaped processes.
//!
//! Every agent process carries `ORCHESTRATE_RUN=<instance>/<task>/<attempt>` in its environment, and
//! its descendants inherit it. A process that left its group (a daemonizing grandchild) or outlived a
//! crashed supervisor can still be found by that marker and killed, so a task never runs twice at
//! the same time: after each attempt (`process`), and at recovery before a dead owner's task is
//! requeued (`spool`).
//!
//! This module only signals processes that carry our marker; it never starts any.

/// Environment variable every agent process carries, naming the claim it runs for. Descendants
/// inherit it, so after a supervisor crash recovery can find and kill what that attempt left running
/// before the task is requeued: a task never runs twice at the same time.
pub const RUN_MARKER: &str = "ORCHESTRATE_RUN";

pub fn run_marker(instance: &str, task_id: &str, attempt: u32) -> String {
    format!("{instance}/{task_id}/{attempt}")
}

/// SIGKILL every process (of ours) whose environment carries `ORCHESTRATE_RUN=<marker>`, and its
/// process group. Returns how many were found.
pub fn kill_marked(marker: &str) -> usize {
    kill_marked_since(marker, 0, 0)
}

/// Start time of a process in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: count from the last ')'.
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// [`kill_marked`] limited to processes started at or after `since` (clock ticks since boot): a
/// descendant of an attempt cannot be older than the attempt's agent, and skipping the others avoids
/// reading the environment of every process on the machine after every attempt.
///
/// `first_pid` (the agent's pid) narrows it further without opening anything: pids are handed out in
/// increasing order, so a descendant has a larger one, unless the counter wrapped since (then every
/// process is looked at).
pub fn kill_marked_since(marker: &str, since: u64, first_pid: u32) -> usize {
    let needle = format!("{RUN_MARKER}={marker}");
    let me = std::process::id();
    let last_pid: u32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u32::MAX);
    let floor = if first_pid > 0 && last_pid >= first_pid {
        first_pid
    } else {
        0
    };
    let mut killed = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if pid < floor || (since > 0 && start_ticks(pid).is_none_or(|t| t < since)) {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()) {
            killed.push(pid);
            // SAFETY: signalling a process (and its group) that carries our marker.
            unsafe {
                let pgid = libc::getpgid(pid as i32);
                if pgid > 1 && pgid as u32 == pid {
                    libc::killpg(pgid, libc::SIGKILL);
                }
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
    }
    // SIGKILL is delivered, not done: until they are gone, a new run of the same task would overlap
    // them (recovery runs the task again right after). Bounded: a process stuck in the kernel
    // (uninterruptible I/O) does not hold recovery up for more than a few seconds.
    let deadline = std::time::Instant::now() + KILL_WAIT;
    while killed.iter().any(|&p| !gone(p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    killed.len()
}

/// How long [`kill_marked_since`] waits for the processes it killed to be gone.
const KILL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether `pid` has exited (no such process, or a zombie waiting for its parent to reap it).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state is the first field after the command name, which may contain ')'.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
    }
}
