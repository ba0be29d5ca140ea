//! A supervisor instance's identity and liveness.
//!
//! Each running supervisor holds an exclusive lock on its own file in `state_dir/instances/` for as
//! long as it lives; a claim names the instance that made it. Recovery asks [`Instance::owner_alive`]
//! before it requeues anything: a live owner is never robbed, and an owner on another host is assumed
//! alive (we cannot check it). A lock file nobody holds is removed when it is found.
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
}

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
        writeln!(
            f,
            "pid: {}\nhost: {}\nboot_id: {}\nstarted_at: {}",
            me.pid, me.host, me.boot_id, me.started_at
        )?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        me.lock_file = Some(f);
        Ok(me)
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
