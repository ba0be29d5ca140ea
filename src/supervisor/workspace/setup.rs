//! A new worktree made warm before its agent starts: the `workspace.link` paths of the user's work
//! tree (ignored folders such as `node_modules` or `target`, files such as `.env`) linked or cloned
//! in, then the `workspace.setup` commands run in the worktree's top, their output at the head of
//! the attempt's log.
//!
//! It runs once per attempt, after the worktree is ready and before the agent. It never links a path
//! git tracks or does not ignore (the agent's edits would reach the user's tree behind the diff's
//! back), never leaves a link that `git add -A` would take into the task's commit, and never runs a
//! command outside the supervision agents get (own process group, time limit, cancel and shutdown,
//! the run marker recovery looks for, redacted output). It does not remove the worktree when it
//! fails: the attempt finishes it, as any worktree whose agent never ran.
//!
//! A folder is linked as a real folder whose entries are symlinks to the entries of the user's
//! folder, not as one symlink: git's `name/` patterns (`node_modules/`) match folders only, so a
//! symlink named `node_modules` is not ignored and would be committed; a real folder is.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Worktree;
use crate::config::{Config, LinkMode};
use crate::console;
use crate::git;
use crate::process::{self, Stop, StopKind};
use crate::redact::Redactor;

/// Why a worktree could not be made ready: the attempt fails (or stops) with this, the agent never
/// runs.
#[derive(Debug)]
pub(in crate::supervisor) struct SetupFailed {
    /// What failed, with the end of its output.
    pub(in crate::supervisor) error: String,
    /// The setup was stopped by a cancel or a shutdown, not failed.
    pub(in crate::supervisor) stopped: Option<Stop>,
    /// Retrying cannot help (a `link` path git tracks): the task fails at once.
    pub(in crate::supervisor) permanent: bool,
}

impl SetupFailed {
    fn new(error: String) -> SetupFailed {
        SetupFailed {
            error,
            stopped: None,
            permanent: false,
        }
    }

    fn permanent(error: String) -> SetupFailed {
        SetupFailed {
            permanent: true,
            ..SetupFailed::new(error)
        }
    }
}

/// What a setup needs besides the worktree.
pub(in crate::supervisor) struct Setup<'a> {
    pub(in crate::supervisor) cfg: &'a Arc<Config>,
    pub(in crate::supervisor) redactor: &'a Arc<Redactor>,
    pub(in crate::supervisor) task_id: &'a str,
    /// The attempt's run marker: recovery finds what a setup left running by it, as an agent's.
    pub(in crate::supervisor) marker: &'a str,
    pub(in crate::supervisor) log_path: &'a Path,
}

/// The most of a failed command's output its error quotes.
const TAIL_LINES: usize = 20;
const TAIL_BYTES: usize = 2000;

/// Link `workspace.link` into `wt` and run `workspace.setup` there. `Ok(true)` when it started the
/// attempt's log (the agent then adds to it), `Ok(false)` when there was nothing to do.
pub(in crate::supervisor) async fn run(
    s: Setup<'_>,
    wt: &Worktree,
    stop: &watch::Receiver<Option<Stop>>,
) -> Result<bool, SetupFailed> {
    let ws = &s.cfg.workspace;
    if ws.link.is_empty() && ws.setup.is_empty() {
        return Ok(false);
    }
    let notes = if ws.link.is_empty() {
        vec![]
    } else {
        let (root, path, links, mode) = (
            wt.root.clone(),
            wt.path.clone(),
            ws.link.clone(),
            ws.link_mode,
        );
        let limit = Duration::from_secs(ws.setup_timeout_seconds);
        tokio::task::spawn_blocking(move || link_all(&root, &path, &links, mode, limit))
            .await
            .map_err(|e| SetupFailed::new(format!("linking `workspace.link` failed: {e}")))??
    };
    let mut log = start_log(s.log_path).map_err(|e| {
        SetupFailed::new(format!(
            "cannot start the log {}: {e}",
            s.log_path.display()
        ))
    })?;
    for n in &notes {
        log_line(&mut log, s.redactor, n);
    }
    drop(log);
    let total = ws.setup.len();
    for (i, command) in ws.setup.iter().enumerate() {
        run_one(&s, wt, i, total, command, stop).await?;
    }
    Ok(true)
}

/// The attempt's log, started empty (a log of the same attempt number from a run that never
/// ended goes).
fn start_log(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::File::create(path)
}

fn append_log(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// One line of orchestrate's own in the log, marked as such (a failed write costs only the line).
fn log_line(log: &mut std::fs::File, redactor: &Redactor, text: &str) {
    let _ = writeln!(log, "[orchestrate: {}]", redactor.redact(text));
}

/// Run `workspace.setup[i]` with `sh -c` in the worktree's top, its output into the log.
async fn run_one(
    s: &Setup<'_>,
    wt: &Worktree,
    i: usize,
    total: usize,
    command: &str,
    stop: &watch::Receiver<Option<Stop>>,
) -> Result<(), SetupFailed> {
    let ws = &s.cfg.workspace;
    let what = format!("workspace.setup[{i}] `{command}`");
    let start_of_output = {
        let mut log = append_log(s.log_path).map_err(|e| {
            SetupFailed::new(format!(
                "cannot write the log {}: {e}",
                s.log_path.display()
            ))
        })?;
        log_line(
            &mut log,
            s.redactor,
            &format!(
                "setup {}/{total} in {}: {command}",
                i + 1,
                wt.path.display()
            ),
        );
        log.metadata().map(|m| m.len()).unwrap_or(0)
    };
    let extra = BTreeMap::from([
        ("ORCHESTRATE_TASK_ID".to_string(), s.task_id.to_string()),
        (
            "ORCHESTRATE_WORKTREE".to_string(),
            wt.path.display().to_string(),
        ),
        (
            "ORCHESTRATE_SOURCE".to_string(),
            wt.root.display().to_string(),
        ),
    ]);
    let spec = process::Spec {
        // Not looked up on PATH: the allow-list may not pass one, and every Unix has it here.
        program: "/bin/sh".into(),
        args: vec!["-c".into(), command.into()],
        env: process::build_env(&s.cfg.security.env_allow, &extra),
        cwd: wt.path.clone(),
        stdin: None,
        timeout: Duration::from_secs(ws.setup_timeout_seconds),
        grace: Duration::from_secs_f64(s.cfg.orchestrator.kill_grace_seconds),
        log_path: s.log_path.to_path_buf(),
        log_append: true,
        max_log_bytes: s.cfg.orchestrator.max_log_bytes,
        redactor: s.redactor.clone(),
        marker: s.marker.to_string(),
        stall: None,
    };
    let exit = process::run(spec, stop.clone()).await;
    let ended = how_it_ended(
        &exit,
        &format!(
            "{} s (workspace.setup_timeout_seconds)",
            ws.setup_timeout_seconds
        ),
    );
    // Read before the closing line goes in: the error quotes the command, not orchestrate.
    let ok = exit.code == Some(0) && exit.stopped.is_none() && !exit.timed_out;
    let tail = if ok {
        String::new()
    } else {
        output_tail(s.log_path, start_of_output)
    };
    if let Ok(mut log) = append_log(s.log_path) {
        log_line(
            &mut log,
            s.redactor,
            &format!("setup {}/{total} {ended}", i + 1),
        );
    }
    if ok {
        return Ok(());
    }
    if let Some(kind) = exit.stopped {
        let stopped = stop.borrow().unwrap_or(match kind {
            StopKind::Cancelled => Stop::Cancel,
            StopKind::Shutdown => Stop::Shutdown,
        });
        return Err(SetupFailed {
            stopped: Some(stopped),
            ..SetupFailed::new(format!("{what} {ended}"))
        });
    }
    let error = if tail.is_empty() {
        format!("{what} {ended}; it printed nothing")
    } else {
        format!("{what} {ended}; its output ends with:\n{tail}")
    };
    Err(SetupFailed::new(error))
}

/// How a command run by orchestrate (a setup command, a check) ended, to follow its name:
/// `exited with code 1 after 2.0 s`. `limit` names its time limit and where it comes from.
pub(in crate::supervisor) fn how_it_ended(exit: &process::Exit, limit: &str) -> String {
    let took = format!("{:.1} s", exit.duration.as_secs_f64());
    match (&exit.spawn_error, exit.code, exit.signal) {
        (Some(e), _, _) => format!("could not start: {e}"),
        _ if exit.stopped.is_some() => format!("was stopped after {took}"),
        _ if exit.timed_out => format!("did not finish within {limit} and was killed"),
        (None, Some(c), _) => format!("exited with code {c} after {took}"),
        (None, None, Some(sig)) => format!("was killed by signal {sig} after {took}"),
        (None, None, None) => format!("ended after {took}"),
    }
}

/// The last lines a command printed into the log after `from` (already redacted there).
pub(in crate::supervisor) fn output_tail(log: &Path, from: u64) -> String {
    let Ok(bytes) = std::fs::read(log) else {
        return String::new();
    };
    let out = bytes.get(from as usize..).unwrap_or_default();
    let text = String::from_utf8_lossy(out);
    let lines: Vec<&str> = text.lines().collect();
    let mut tail = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
    if tail.len() > TAIL_BYTES {
        let mut cut = tail.len() - TAIL_BYTES;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        tail = format!("…{}", &tail[cut..]);
    }
    tail.trim_end().to_string()
}

/// Said once per supervisor: the file system of the worktrees cannot clone.
static CLONE_FELL_BACK: AtomicBool = AtomicBool::new(false);

/// Make each `links` path of `root` available at the same place in the worktree `wt`; what the log
/// should say about it comes back.
fn link_all(
    root: &Path,
    wt: &Path,
    links: &[String],
    mode: LinkMode,
    limit: Duration,
) -> Result<Vec<String>, SetupFailed> {
    let git_failed = |e: anyhow::Error| SetupFailed::new(format!("workspace.link: {e:#}"));
    let mut notes = vec![];
    for (i, rel) in links.iter().enumerate() {
        let rel = rel.trim_end_matches('/');
        let key = format!("workspace.link[{i}] `{rel}`");
        let src = root.join(rel);
        if std::fs::symlink_metadata(&src).is_err() {
            notes.push(format!("{key}: not in {}, not linked", root.display()));
            continue;
        }
        // A folder, or a symlink to one (a user's own linked cache).
        let dir = src.is_dir();
        if !git::is_ignored(root, rel, dir).map_err(git_failed)? {
            return Err(SetupFailed::permanent(format!(
                "{key} is not ignored by git in {} (it is tracked, or no ignore pattern matches \
                 it): linking it would let the agent's edits reach your tree without a diff; \
                 list only ignored paths, such as node_modules or target",
                root.display()
            )));
        }
        let tracked = git::tracked_under(root, rel).map_err(git_failed)?;
        if let Some(f) = tracked.first() {
            return Err(SetupFailed::permanent(format!(
                "{key} holds files git tracks (`{f}`): linking it would let the agent's edits \
                 reach your tree without a diff; link the ignored paths inside it instead"
            )));
        }
        let dst = wt.join(rel);
        if std::fs::symlink_metadata(&dst).is_ok() {
            return Err(SetupFailed::permanent(format!(
                "{key} already exists in the worktree {}: part of it is in the task's base",
                wt.display()
            )));
        }
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                SetupFailed::new(format!("{key}: cannot create {}: {e}", parent.display()))
            })?;
        }
        let how = match mode {
            LinkMode::Clone => match clone(&src, &dst, limit) {
                Ok(()) => "cloned (copy-on-write)".to_string(),
                Err(why) => {
                    remove_any(&dst);
                    if !CLONE_FELL_BACK.swap(true, Ordering::Relaxed) {
                        console::warn(&format!(
                            "workspace.link_mode clone: cannot clone into {} ({why}); linking \
                             with symlinks instead (said once)",
                            wt.display()
                        ));
                    }
                    symlink(&src, &dst, dir).map_err(|e| {
                        SetupFailed::new(format!("{key}: cannot link {}: {e}", dst.display()))
                    })?;
                    format!("symlinked (the file system cannot clone: {why})")
                }
            },
            LinkMode::Symlink => {
                symlink(&src, &dst, dir).map_err(|e| {
                    SetupFailed::new(format!("{key}: cannot link {}: {e}", dst.display()))
                })?;
                "symlinked".to_string()
            }
        };
        // The proof that the task's commit will not take it: git in the worktree ignores it all.
        let seen = git::unignored_under(wt, rel).map_err(git_failed)?;
        if let Some(f) = seen.first() {
            remove_any(&dst);
            return Err(SetupFailed::permanent(format!(
                "{key}: git in the worktree does not ignore `{f}` once linked, so the task's \
                 commit would take it; make its ignore pattern match it (for example `{rel}` \
                 rather than a pattern of its contents)"
            )));
        }
        notes.push(format!("{key}: {how} from {}", src.display()));
    }
    Ok(notes)
}

/// `dst` made to show `src`: a file as a symlink to it; a folder as a real folder whose entries are
/// symlinks to `src`'s entries (see the module's header for why).
fn symlink(src: &Path, dst: &Path, dir: bool) -> std::io::Result<()> {
    if !dir {
        return std::os::unix::fs::symlink(src, dst);
    }
    std::fs::create_dir(dst)?;
    for e in std::fs::read_dir(src)? {
        let name = e?.file_name();
        std::os::unix::fs::symlink(src.join(&name), dst.join(&name))?;
    }
    Ok(())
}

/// A copy-on-write clone of `src` at `dst` (`cp --reflink=always`: it fails rather than copy
/// when the file system cannot share blocks), within `limit`.
fn clone(src: &Path, dst: &Path, limit: Duration) -> Result<(), String> {
    let mut child = std::process::Command::new("cp")
        .args(["-a", "--reflink=always", "-T", "--"])
        .arg(src)
        .arg(dst)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run cp: {e}"))?;
    // Drained beside the wait: cp goes on after a file it cannot clone, one line each.
    let mut stderr = child.stderr.take().expect("piped");
    let said = std::thread::spawn(move || {
        use std::io::Read;
        let mut b = vec![];
        let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut b);
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        String::from_utf8_lossy(&b).into_owned()
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("not done within {} s", limit.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("cp: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    let err = said.join().unwrap_or_default();
    let first = err.lines().next().unwrap_or("cp failed").trim().to_string();
    Err(first)
}

/// Remove whatever is at `p` (a symlink, a file, a folder of copies or links), never following a
/// symlink.
fn remove_any(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}
