//! Which processes hold files of a folder open for writing, read from `/proc`.
//!
//! A task file must never be read while some process may still write to it: a shell's
//! `{ …; sleep 3; echo more; } > pending/t.yaml`, an editor, `git` or a sync client writing in
//! place. inotify's close-write only says that *one* writer closed the file (a child that inherited
//! the descriptor closes it long before its parent), and quiet for the settle period proves
//! nothing, so before a file is read the supervisor asks the kernel who still has it open.
//!
//! One look walks every process's descriptor table once and answers for a whole folder, so a batch
//! of files costs one walk. It only reads `/proc` and never opens the files it reports on.
//!
//! Limits: `/proc/PID/fd` of another user's process is unreadable unless we run as root (or `/proc`
//! is mounted with `hidepid`): such a writer is not seen. Renaming a finished file into the folder
//! is the protocol that needs no look at all, and the docs say so.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::Path;

/// A process holding a file open for writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    pub pid: u32,
    /// The process's command name (`/proc/PID/comm`), for people reading the note.
    pub command: String,
}

impl std::fmt::Display for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.command.is_empty() {
            write!(f, "pid {}", self.pid)
        } else {
            write!(f, "pid {} ({})", self.pid, self.command)
        }
    }
}

/// The names of the files directly in `dir` that some process holds open for writing (write-only
/// or read-write), each with one such process. Processes we may not look into are passed over.
pub fn open_for_writing(dir: &Path) -> HashMap<OsString, Writer> {
    let mut out = HashMap::new();
    // Descriptors name the file by its resolved path; compare against the same.
    let Ok(dir) = dir.canonicalize() else {
        return out;
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let name = p.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let fd_dir = p.path().join("fd");
        // EACCES (another user's process) and ENOENT (it just exited) are both "nothing to see".
        let Ok(fds) = std::fs::read_dir(&fd_dir) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(name) = target.file_name() else {
                continue;
            };
            if target.parent() != Some(dir.as_path()) || out.contains_key(name) {
                continue;
            }
            if !writable(&p.path(), &fd.file_name()) {
                continue;
            }
            out.insert(
                name.to_os_string(),
                Writer {
                    pid,
                    command: std::fs::read_to_string(p.path().join("comm"))
                        .map(|s| s.trim_end().to_string())
                        .unwrap_or_default(),
                },
            );
        }
    }
    out
}

/// Whether descriptor `fd` of the process at `proc_dir` was opened for writing: the access mode
/// in the `flags:` line of its fdinfo (octal) is `O_WRONLY` or `O_RDWR`.
fn writable(proc_dir: &Path, fd: &OsStr) -> bool {
    let Ok(info) = std::fs::read_to_string(proc_dir.join("fdinfo").join(fd)) else {
        return false;
    };
    info.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .is_some_and(|flags| {
            let mode = flags & libc::O_ACCMODE as u32;
            mode == libc::O_WRONLY as u32 || mode == libc::O_RDWR as u32
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_open_for_writing_is_seen_and_one_open_for_reading_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("w.yaml");
        let r = dir.path().join("r.yaml");
        std::fs::write(&r, "x").unwrap();
        let mut wf = std::fs::File::create(&w).unwrap();
        wf.write_all(b"description: x\n").unwrap();
        let _rf = std::fs::File::open(&r).unwrap();
        let found = open_for_writing(dir.path());
        let me = found
            .get(OsStr::new("w.yaml"))
            .expect("the file this test holds open for writing");
        assert_eq!(me.pid, std::process::id());
        assert!(!found.contains_key(OsStr::new("r.yaml")), "{found:?}");
        drop(wf);
        assert!(open_for_writing(dir.path()).is_empty());
    }

    #[test]
    fn files_of_other_folders_are_not_reported() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let _f = std::fs::File::create(sub.join("t.yaml")).unwrap();
        assert!(open_for_writing(dir.path()).is_empty());
        assert_eq!(open_for_writing(&sub).len(), 1);
    }
}
