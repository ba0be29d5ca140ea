//! A supervisor instance's identity and liveness.
//!
//! Each running supervisor holds an exclusive lock on its own file in `state_dir/instances/` for as
//! long as it lives; a claim names the instance that made it. Recovery asks [`Instance::owner_alive`]
//! before it requeues anything: a live owner is never robbed, and an owner on another host is assumed
//! alive (we cannot check it). A lock file nobody holds is removed when it is found.
//!
//! The same file carries the instance's current problems (a commit `tasks/` refuses, say) for
//! `status` to show: a fixed-size area reserved at registration and overwritten in place, so it can
//! be written even when the disk is full and nothing else can.
//!
//! This module never moves task files; the spool decides what a dead owner's claim becomes.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::fsutil;
use crate::layout::Layout;
use crate::record::Claim;

/// This supervisor's identity and the lock that proves it is alive.
pub struct Instance {
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub boot_id: String,
    pub started_at: String,
    lock_file: Option<File>,
    /// Where the problems area starts in the lock file.
    problems_at: u64,
}

/// The line before the problems area of an instance file.
const PROBLEMS_MARK: &str = "problems:\n";
/// The size of the problems area: what does not fit is cut.
const PROBLEMS_BYTES: usize = 4096;

impl Instance {
    /// Identity for a process that does not run tasks (CLI commands): it holds no lock.
    pub fn observer() -> Instance {
        Instance {
            id: String::new(),
            host: fsutil::hostname(),
            pid: std::process::id(),
            boot_id: fsutil::boot_id(),
            started_at: fsutil::now_rfc3339(),
            lock_file: None,
            problems_at: 0,
        }
    }

    /// Create and lock `state_dir/instances/<id>.lock`, held until the process exits.
    pub fn register(layout: &Layout) -> Result<Instance> {
        let mut me = Instance::observer();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        me.id = format!("{}-{}-{:08x}", me.host, me.pid, nanos);
        let dir = layout.instances_dir();
        fs::create_dir_all(&dir)?;
        let path = layout.instance_lock(&me.id);
        // Locked before it becomes visible under its real name: an observer that can lock a
        // `.lock` file treats its owner as dead and deletes it, so a live instance's file must never
        // be seen unlocked.
        let tmp = dir.join(format!(".{}.tmp", me.id));
        let mut f = OpenOptions::new().create_new(true).write(true).open(&tmp)?;
        f.try_lock()
            .map_err(|e| anyhow::anyhow!("cannot lock {}: {e:?}", tmp.display()))?;
        let header = format!(
            "pid: {}\nhost: {}\nboot_id: {}\nstarted_at: {}\n{PROBLEMS_MARK}",
            me.pid, me.host, me.boot_id, me.started_at
        );
        f.write_all(header.as_bytes())?;
        // Reserved now, while there is room: later writes overwrite it in place.
        f.write_all(&[b' '; PROBLEMS_BYTES])?;
        me.problems_at = header.len() as u64;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        me.lock_file = Some(f);
        Ok(me)
    }

    /// Say what is wrong now (empty: nothing), for `status`. Written in place into space reserved
    /// at registration, so it needs no free space; a text too long is cut.
    pub fn set_problems(&self, text: &str) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let Some(f) = &self.lock_file else {
            return Ok(());
        };
        let mut cut = text.len().min(PROBLEMS_BYTES);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut area = vec![b' '; PROBLEMS_BYTES];
        area[..cut].copy_from_slice(&text.as_bytes()[..cut]);
        f.write_all_at(&area, self.problems_at)
    }

    pub fn lock_path(&self, layout: &Layout) -> PathBuf {
        layout.instance_lock(&self.id)
    }

    /// Whether the owner of a claim is alive. Claims from other hosts are assumed alive: we cannot
    /// check them, and robbing a live owner would run the task twice.
    pub fn owner_alive(&self, claim: &Claim, layout: &Layout) -> bool {
        if claim.instance == self.id && self.lock_file.is_some() {
            return true;
        }
        if claim.host != self.host {
            return true;
        }
        if claim.boot_id != self.boot_id {
            return false;
        }
        // On the same boot a vanished pid is conclusive. The lock alone is not: a child caught
        // between fork and exec shares the lock's open file description for a moment after its
        // parent died.
        if !fsutil::pid_alive(claim.pid) {
            return false;
        }
        instance_lock_held(&layout.instance_lock(&claim.instance))
    }
}

/// Whether some live process holds this instance lock file. A free lock file is removed.
pub fn instance_lock_held(path: &Path) -> bool {
    let Ok(f) = OpenOptions::new().write(true).open(path) else {
        return false;
    };
    match f.try_lock() {
        Ok(()) => {
            let _ = fs::remove_file(path);
            false
        }
        Err(_) => true,
    }
}

/// What the instance whose lock file is `path` last said is wrong (empty: nothing).
pub fn problems_of(path: &Path) -> String {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.split_once(PROBLEMS_MARK)
                .map(|(_, p)| p.trim().to_string())
        })
        .unwrap_or_default()
}

/// Live supervisors on this tree: (pid, lock path), from the held instance locks.
pub fn live_instances(layout: &Layout) -> Vec<(u32, PathBuf)> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(layout.instances_dir()) else {
        return out;
    };
    for e in rd.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "lock") && instance_lock_held(&path) {
            let pid = fs::read_to_string(&path)
                .ok()
                .and_then(|s| {
                    s.lines()
                        .next()
                        .and_then(|l| l.strip_prefix("pid: "))
                        .and_then(|p| p.trim().parse().ok())
                })
                .unwrap_or(0);
            out.push((pid, path));
        }
    }
    out
}
