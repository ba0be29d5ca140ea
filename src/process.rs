//! Child supervision: one agent run as a process group we can always take down.
//!
//! The child starts in its own process group with a null or piped stdin and an allow-listed
//! environment. stdout and stderr are drained concurrently with `wait()` and the timers, so a chatty
//! child never blocks on a full pipe. On timeout or stop: SIGTERM to the whole group, keep draining,
//! SIGKILL after the grace period. After the leader exits the group gets a SIGKILL too, so grandchildren
//! that ignored everything do not outlive the attempt; pipes a stray process still holds are abandoned
//! after a short bound instead of hanging the supervisor. The child is always reaped.
//!
//! Output goes to the attempt log with a size cap that keeps the head and the tail and counts what was
//! dropped. Configured secrets are redacted before anything is written or returned.
//!
//! A child watched for stalls (`Spec::stall`) is stopped the way a timeout stops it once it has gone
//! `after` with neither a byte of output nor a change in its workdir's stamp; the last line it
//! printed says what it was waiting for. The workdir is only looked at after a quiet `after`, so a
//! chatty child costs nothing.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::marker;
use crate::redact::Redactor;

/// Why a running child is being stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// `orchestrate cancel`: terminate, grace, kill.
    Cancel,
    /// Supervisor shutting down: terminate, grace, kill; the task is requeued.
    Shutdown,
    /// Second signal: kill now.
    KillNow,
}

pub struct Spec {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub stdin: Option<Vec<u8>>,
    pub timeout: Duration,
    pub grace: Duration,
    pub log_path: PathBuf,
    /// Add to the log rather than start it: what ran before (a worktree's setup) stays above.
    pub log_append: bool,
    pub max_log_bytes: u64,
    pub redactor: Arc<Redactor>,
    /// `ORCHESTRATE_RUN` value for this attempt; set in the child's environment and used to find
    /// descendants that left the process group (`setsid`, daemonizing tools).
    pub marker: String,
    /// Stop the child when it stops making progress; `None`: only the timeout ends a silent child.
    pub stall: Option<StallWatch>,
}

/// A cheap fingerprint of a workdir (what files there are, their newest mtime, their sizes): a
/// different value means the agent changed something.
pub type WorkdirStamp = Arc<dyn Fn() -> u64 + Send + Sync>;

/// How to tell a stalled child from a busy one.
#[derive(Clone)]
pub struct StallWatch {
    /// Neither output nor a workdir change for this long: the child is stopped.
    pub after: Duration,
    /// Runs on a blocking thread whenever output has been quiet for `after` (and at the start when
    /// there is no `baseline`).
    pub workdir: Option<WorkdirStamp>,
    /// The workdir's stamp when the agent started, if the caller has it already.
    pub baseline: Option<u64>,
}

/// Why a child was stopped as stalled.
#[derive(Debug, Clone, PartialEq)]
pub struct Stalled {
    /// The `after` it was watched with.
    pub after: Duration,
    /// The last non-empty line it printed (stdout or stderr, whichever came last), without
    /// terminal colours, redacted; `None` when it printed nothing.
    pub last_line: Option<String>,
}

#[derive(Debug, Default)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stopped: Option<StopKind>,
    /// stdout (head and tail kept within [`STDOUT_KEEP`] bytes each), redacted.
    pub stdout: String,
    /// The last bytes of stderr, redacted.
    pub stderr_tail: String,
    pub duration: Duration,
    pub log_bytes: u64,
    pub log_bytes_dropped: u64,
    pub spawn_error: Option<String>,
    /// Descendants that had left the process group and were killed after the agent exited.
    pub escaped: usize,
    pub spawn_errno: Option<i32>,
    /// The timeout this run had (reported in errors; the duration includes the grace period).
    pub limit: Duration,
    /// Stopped for making no progress (see [`StallWatch`]).
    pub stalled: Option<Stalled>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    Cancelled,
    Shutdown,
}

const STDOUT_KEEP: usize = 2 * 1024 * 1024;
const STDERR_TAIL: usize = 16 * 1024;
/// How long to keep reading pipes after the group was killed: only a process that left the group
/// can still hold them, and it must not hang the supervisor.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Head+tail capped buffer: the first `keep` bytes, then a ring of the last `keep` bytes.
struct HeadTail {
    head_keep: usize,
    tail_keep: usize,
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    dropped: u64,
}

impl HeadTail {
    fn new(keep: usize) -> Self {
        Self::with(keep, keep)
    }

    fn with(head_keep: usize, tail_keep: usize) -> Self {
        HeadTail {
            head_keep,
            tail_keep,
            head: Vec::new(),
            tail: Default::default(),
            dropped: 0,
        }
    }

    fn push(&mut self, mut data: &[u8]) {
        if self.head.len() < self.head_keep {
            let n = (self.head_keep - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
        if data.is_empty() {
            return;
        }
        self.tail.extend(data);
        if self.tail.len() > self.tail_keep {
            let excess = self.tail.len() - self.tail_keep;
            self.tail.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    fn into_bytes(self, marker: impl Fn(u64) -> String) -> Vec<u8> {
        let mut out = self.head;
        if self.dropped > 0 {
            out.extend_from_slice(marker(self.dropped).as_bytes());
        }
        out.extend(self.tail);
        out
    }
}

/// The attempt log: head written straight to the file, tail held in memory until the end.
struct LogSink {
    file: std::fs::File,
    written: u64,
    head_cap: u64,
    tail: HeadTail,
    total: u64,
    pending_line: Vec<u8>,
    redactor: Arc<Redactor>,
}

impl LogSink {
    fn write(&mut self, data: &[u8]) {
        use std::io::Write;
        self.total += data.len() as u64;
        // Redact whole lines so a secret split across reads is still caught; a line with no end is
        // flushed once it gets long, trading perfect redaction of absurd lines for bounded memory.
        self.pending_line.extend_from_slice(data);
        let cut = match self.pending_line.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None if self.pending_line.len() > 64 * 1024 => self.pending_line.len(),
            None => return,
        };
        let chunk: Vec<u8> = self.pending_line.drain(..cut).collect();
        let chunk = self.redactor.redact_bytes(&chunk);
        let room = self.head_cap.saturating_sub(self.written) as usize;
        let n = room.min(chunk.len());
        if n > 0 {
            let _ = self.file.write_all(&chunk[..n]);
            self.written += n as u64;
        }
        if n < chunk.len() {
            self.tail.push(&chunk[n..]);
        }
    }

    fn finish(mut self) -> (u64, u64) {
        use std::io::Write;
        if !self.pending_line.is_empty() {
            let rest = std::mem::take(&mut self.pending_line);
            let rest = self.redactor.redact_bytes(&rest);
            let room = self.head_cap.saturating_sub(self.written) as usize;
            let n = room.min(rest.len());
            let _ = self.file.write_all(&rest[..n]);
            self.written += n as u64;
            self.tail.push(&rest[n..]);
        }
        let dropped = self.tail.dropped;
        let tail = self.tail.into_bytes(|d| {
            format!("\n[orchestrate: {d} bytes of output dropped here (log cap)]\n")
        });
        let _ = self.file.write_all(&tail);
        let _ = self.file.flush();
        (self.total, dropped)
    }
}

/// When the child last printed anything, and its last non-empty line: what a stall report quotes.
struct Progress {
    at: Mutex<Instant>,
    last_line: Mutex<Option<String>>,
}

/// The longest line kept for a stall report, and the longest unfinished line buffered for it.
const LINE_KEEP: usize = 300;
const PARTIAL_KEEP: usize = 4096;

impl Progress {
    fn new() -> Progress {
        Progress {
            at: Mutex::new(Instant::now()),
            last_line: Mutex::new(None),
        }
    }

    /// Note `data`, the next bytes of one stream whose unfinished line so far is `partial`. A line
    /// ends at `\n` or `\r` (progress spinners rewrite their line with `\r`); an unfinished line
    /// counts too, so a CLI that prints "waiting for network" without a newline is quoted.
    fn saw(&self, partial: &mut Vec<u8>, data: &[u8]) {
        *self.at.lock().expect("progress lock is never poisoned") = Instant::now();
        partial.extend_from_slice(data);
        let mut newest = None;
        while let Some(i) = partial.iter().position(|b| *b == b'\n' || *b == b'\r') {
            let line: Vec<u8> = partial.drain(..=i).collect();
            if let Some(l) = plain_line(&line) {
                newest = Some(l);
            }
        }
        if partial.len() > PARTIAL_KEEP {
            let excess = partial.len() - PARTIAL_KEEP;
            partial.drain(..excess);
        }
        if let Some(l) = plain_line(partial) {
            newest = Some(l);
        }
        if newest.is_some() {
            *self
                .last_line
                .lock()
                .expect("progress lock is never poisoned") = newest;
        }
    }
}

/// A line as a person reads it: no colour codes, no surrounding blanks, at most [`LINE_KEEP`]
/// characters; `None` when nothing is left.
fn plain_line(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let plain = strip_ansi(&text);
    let t = plain.trim();
    (!t.is_empty()).then(|| t.chars().take(LINE_KEEP).collect())
}

/// Text without terminal colour and cursor codes.
pub fn strip_ansi(s: &str) -> String {
    static RE: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"\x1b\[[0-9;?]*[ -/]*[@-~]").expect("valid regex")
    });
    RE.replace_all(s, "").into_owned()
}

async fn drain<R: AsyncRead + Unpin>(
    mut r: R,
    sink: Arc<Mutex<LogSink>>,
    capture: Arc<Mutex<HeadTail>>,
    progress: Arc<Progress>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut partial = Vec::new();
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                sink.lock()
                    .expect("log sink lock is never poisoned: no panics inside")
                    .write(&buf[..n]);
                capture
                    .lock()
                    .expect("capture lock is never poisoned")
                    .push(&buf[..n]);
                progress.saw(&mut partial, &buf[..n]);
            }
        }
    }
}

/// The stamp of the workdir, on a blocking thread (a bounded walk); `None` if that thread failed.
async fn stamp_of(workdir: &Option<WorkdirStamp>) -> Option<u64> {
    let f = workdir.clone()?;
    tokio::task::spawn_blocking(move || f()).await.ok()
}

fn signal_group(pgid: u32, sig: i32) {
    if pgid == 0 || pgid > i32::MAX as u32 {
        return;
    }
    // SAFETY: killpg only sends a signal; ESRCH (group gone) is fine and ignored.
    unsafe {
        libc::killpg(pgid as i32, sig);
    }
}

/// Run the child to completion, honouring the timeout and `stop`.
pub async fn run(spec: Spec, mut stop: watch::Receiver<Option<Stop>>) -> Exit {
    let started = Instant::now();
    let mut exit = Exit {
        limit: spec.timeout,
        ..Exit::default()
    };
    if let Some(dir) = spec.log_path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let opened = if spec.log_append {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_path)
    } else {
        std::fs::File::create(&spec.log_path)
    };
    let file = match opened {
        Ok(f) => f,
        Err(e) => {
            exit.spawn_error = Some(format!(
                "cannot create log {}: {e}",
                spec.log_path.display()
            ));
            return exit;
        }
    };
    let half = (spec.max_log_bytes / 2).max(1024);
    let sink = Arc::new(Mutex::new(LogSink {
        file,
        written: 0,
        head_cap: half,
        tail: HeadTail::with(0, half as usize),
        total: 0,
        pending_line: Vec::new(),
        redactor: spec.redactor.clone(),
    }));

    // An absolute path lets std use posix_spawn (vfork-like) instead of fork: with an environment of
    // our own, std will not let posix_spawnp search PATH, and forking a busy supervisor costs page-table
    // copies and TLB shootdowns on every attempt. Resolve against the PATH the child will see.
    let child_path = spec
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| std::ffi::OsStr::new(v.as_str()));
    let program =
        search_path(&spec.program, child_path).unwrap_or_else(|| PathBuf::from(&spec.program));
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&spec.args)
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .env(marker::RUN_MARKER, &spec.marker)
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            exit.spawn_errno = e.raw_os_error();
            exit.spawn_error = Some(format!("cannot start `{}`: {e}", spec.program));
            exit.duration = started.elapsed();
            if let Ok(s) = Arc::try_unwrap(sink) {
                let _ = s.into_inner().map(LogSink::finish);
            }
            return exit;
        }
    };
    let pid = child.id().unwrap_or(0);
    let spawned_at = marker::start_ticks(pid).unwrap_or(0);

    if let (Some(input), Some(mut stdin)) = (spec.stdin.clone(), child.stdin.take()) {
        // A child that never reads stdin must not block us: the write runs on its own task and a
        // broken pipe is ignored.
        tokio::spawn(async move {
            let _ = stdin.write_all(&input).await;
            let _ = stdin.shutdown().await;
        });
    }
    let out_cap = Arc::new(Mutex::new(HeadTail::new(STDOUT_KEEP)));
    // Of stderr only the end matters: it explains why the agent failed.
    let err_cap = Arc::new(Mutex::new(HeadTail::with(0, STDERR_TAIL)));
    let progress = Arc::new(Progress::new());
    let out_task = child
        .stdout
        .take()
        .map(|r| tokio::spawn(drain(r, sink.clone(), out_cap.clone(), progress.clone())));
    let err_task = child
        .stderr
        .take()
        .map(|r| tokio::spawn(drain(r, sink.clone(), err_cap.clone(), progress.clone())));

    let deadline = tokio::time::Instant::now() + spec.timeout;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut stop_closed = false;
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    // The stall watch looks a few times per `after`: a stall is noticed at most an eighth late.
    let stall = spec.stall.clone();
    let mut stall_tick =
        tokio::time::interval(stall.as_ref().map_or(Duration::from_secs(3600), |w| {
            (w.after / 8).clamp(Duration::from_millis(100), Duration::from_secs(15))
        }));
    stall_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The workdir as the agent found it (taken beside its start when the caller did not have it);
    // a later stamp that differs is progress.
    let mut workdir_stamp: Option<u64> = stall.as_ref().and_then(|w| w.baseline);
    let mut baseline = stall
        .as_ref()
        .filter(|w| w.baseline.is_none())
        .and_then(|w| {
            let f = w.workdir.clone()?;
            Some(tokio::task::spawn_blocking(move || f()))
        });
    let mut workdir_changed_at = Instant::now();
    let status = loop {
        tokio::select! {
            s = child.wait() => break s,
            _ = tokio::time::sleep_until(deadline), if kill_at.is_none() => {
                exit.timed_out = true;
                signal_group(pid, libc::SIGTERM);
                kill_at = Some(tokio::time::Instant::now() + spec.grace);
            }
            _ = stall_tick.tick(), if kill_at.is_none() && stall.is_some() => {
                let Some(watch) = &stall else { continue };
                let printed_at = *progress.at.lock().expect("progress lock is never poisoned");
                if printed_at.max(workdir_changed_at).elapsed() < watch.after {
                    continue;
                }
                // Quiet for `after`: has the workdir changed since it was last looked at?
                if let Some(b) = baseline.take() {
                    workdir_stamp = b.await.ok();
                }
                let now_stamp = stamp_of(&watch.workdir).await;
                if now_stamp.is_some() && now_stamp != workdir_stamp {
                    workdir_stamp = now_stamp;
                    workdir_changed_at = Instant::now();
                    continue;
                }
                let last_line = progress
                    .last_line
                    .lock()
                    .expect("progress lock is never poisoned")
                    .as_deref()
                    .map(|l| spec.redactor.redact(l));
                exit.stalled = Some(Stalled { after: watch.after, last_line });
                signal_group(pid, libc::SIGTERM);
                kill_at = Some(tokio::time::Instant::now() + spec.grace);
            }
            _ = tokio::time::sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() => {
                signal_group(pid, libc::SIGKILL);
                kill_at = Some(far);
            }
            changed = stop.changed(), if !stop_closed => {
                if changed.is_err() {
                    // The supervisor dropped its end: keep the timeout, stop listening.
                    stop_closed = true;
                    continue;
                }
                let req = *stop.borrow_and_update();
                match req {
                    Some(Stop::KillNow) => {
                        exit.stopped.get_or_insert(StopKind::Shutdown);
                        signal_group(pid, libc::SIGKILL);
                        kill_at = Some(far);
                    }
                    Some(s @ (Stop::Cancel | Stop::Shutdown)) => {
                        // A cancel stays a cancel even if a shutdown follows it.
                        exit.stopped.get_or_insert(if s == Stop::Cancel { StopKind::Cancelled } else { StopKind::Shutdown });
                        if kill_at.is_none() {
                            signal_group(pid, libc::SIGTERM);
                            kill_at = Some(tokio::time::Instant::now() + spec.grace);
                        }
                    }
                    None => {}
                }
            }
        }
    };
    // The leader is gone; anything left in its group is a grandchild that must not outlive the attempt.
    signal_group(pid, libc::SIGKILL);
    // Descendants that left the group still carry the marker: find them too (a /proc sweep, a few ms).
    let marker = spec.marker.clone();
    exit.escaped =
        tokio::task::spawn_blocking(move || marker::kill_marked_since(&marker, spawned_at, pid))
            .await
            .unwrap_or(0);
    for t in [out_task, err_task].into_iter().flatten() {
        let abort = t.abort_handle();
        if tokio::time::timeout(DRAIN_AFTER_EXIT, t).await.is_err() {
            abort.abort();
        }
    }
    match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            exit.code = s.code();
            exit.signal = s.signal();
        }
        Err(e) => exit.spawn_error = Some(format!("wait failed: {e}")),
    }
    exit.duration = started.elapsed();
    let out = std::mem::replace(&mut *out_cap.lock().expect("lock"), HeadTail::new(0));
    let out = out.into_bytes(|d| format!("\n[... {d} bytes of output omitted ...]\n"));
    exit.stdout = spec.redactor.redact(&String::from_utf8_lossy(&out));
    let err = std::mem::replace(&mut *err_cap.lock().expect("lock"), HeadTail::new(0));
    exit.stderr_tail = spec
        .redactor
        .redact(&String::from_utf8_lossy(&err.into_bytes(|_| String::new())));
    // Every drain task has ended or been aborted, so this is the last reference.
    match Arc::try_unwrap(sink) {
        Ok(s) => {
            let s = s.into_inner().expect("lock");
            let (total, dropped) = s.finish();
            exit.log_bytes = total;
            exit.log_bytes_dropped = dropped;
        }
        Err(shared) => {
            // An aborted drain may still be dropping its reference; flush what we have.
            use std::io::Write;
            if let Ok(mut s) = shared.lock() {
                let _ = s.file.flush();
                exit.log_bytes = s.total;
            }
        }
    }
    exit
}

/// How a short check command (an agent CLI's "am I logged in?") ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// Its exit code; `None` when it was killed, timed out or could not start.
    pub code: Option<i32>,
    /// Why it has no exit code, or the first line of what it printed.
    pub said: String,
}

/// Run a short command to its end, within `limit`: its own process group (killed whole at the
/// limit), no stdin, the environment given and nothing else, output read up to a few KB. For checks
/// that must never hang the caller, not for agents.
pub async fn check(
    program: &str,
    args: &[String],
    env: &[(String, String)],
    cwd: &std::path::Path,
    limit: Duration,
) -> Checked {
    let child_path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| std::ffi::OsStr::new(v.as_str()));
    let path = search_path(program, child_path).unwrap_or_else(|| PathBuf::from(program));
    let spawned = tokio::process::Command::new(&path)
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return Checked {
                code: None,
                said: format!("cannot start `{program}`: {e}"),
            };
        }
    };
    let pid = child.id().unwrap_or(0);
    let read = |r: Option<Box<dyn AsyncRead + Unpin + Send>>| async move {
        let mut out = Vec::new();
        if let Some(r) = r {
            let _ = r.take(4096).read_to_end(&mut out).await;
        }
        out
    };
    let stdout = child
        .stdout
        .take()
        .map(|r| Box::new(r) as Box<dyn AsyncRead + Unpin + Send>);
    let stderr = child
        .stderr
        .take()
        .map(|r| Box::new(r) as Box<dyn AsyncRead + Unpin + Send>);
    let run = async {
        let (out, err) = tokio::join!(read(stdout), read(stderr));
        let status = child.wait().await;
        (status, out, err)
    };
    match tokio::time::timeout(limit, run).await {
        Ok((Ok(status), out, err)) => {
            let first = |b: &[u8]| {
                String::from_utf8_lossy(b)
                    .lines()
                    .map(|l| strip_ansi(l).trim().to_string())
                    .find(|l| !l.is_empty())
            };
            Checked {
                code: status.code(),
                said: first(&out)
                    .or_else(|| first(&err))
                    .unwrap_or_else(|| match status.code() {
                        Some(c) => format!("exit code {c}"),
                        None => "killed by a signal".into(),
                    }),
            }
        }
        Ok((Err(e), _, _)) => Checked {
            code: None,
            said: format!("wait failed: {e}"),
        },
        Err(_) => {
            signal_group(pid, libc::SIGKILL);
            Checked {
                code: None,
                said: format!("no answer within {} s", limit.as_secs()),
            }
        }
    }
}

/// Build the environment from the allow-list, plus the agent's own variables.
pub fn build_env(
    allow: &[String],
    extra: &std::collections::BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = allow
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
        .collect();
    for (k, v) in extra {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

/// `program` as a path: itself when it names one, else the first executable of that name on `path`
/// (a PATH-style list). `None` when there is nothing to run.
fn search_path(program: &str, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_exec = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_exec(&p).then_some(p);
    }
    std::env::split_paths(path?)
        .map(|d| d.join(program))
        .find(|p| is_exec(p))
}

/// Whether `program` can be run: a path that exists, or a name found on our PATH.
pub fn find_program(program: &str) -> Option<PathBuf> {
    search_path(program, std::env::var_os("PATH").as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    fn spec(dir: &std::path::Path, script: &str, stall: Option<StallWatch>) -> Spec {
        Spec {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            env: build_env(&["PATH".to_string()], &Default::default()),
            cwd: dir.to_path_buf(),
            stdin: None,
            timeout: Duration::from_secs(60),
            grace: Duration::from_secs(1),
            log_path: dir.join("attempt.log"),
            log_append: false,
            max_log_bytes: 1 << 20,
            redactor: Arc::new(Redactor::from_values(["s3cret".to_string()])),
            // Each run its own marker: the sweep after a run kills what carries it, and tests run
            // side by side.
            marker: format!(
                "test-run-{}-{}",
                std::process::id(),
                RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
            stall,
        }
    }

    async fn run_it(spec: Spec) -> Exit {
        let (_tx, rx) = watch::channel(None);
        run(spec, rx).await
    }

    #[test]
    fn the_last_line_follows_newlines_carriage_returns_and_unfinished_lines() {
        let p = Progress::new();
        let last = || p.last_line.lock().unwrap().clone();
        let mut partial = Vec::new();
        p.saw(&mut partial, b"first\n\x1b[31msecond\x1b[0m\n\n   \n");
        assert_eq!(last().as_deref(), Some("second"));
        // An unfinished line counts, and is whole once its end arrives.
        p.saw(&mut partial, "Reconnecting… waiting".as_bytes());
        assert_eq!(last().as_deref(), Some("Reconnecting… waiting"));
        p.saw(&mut partial, b" for network\n");
        assert_eq!(last().as_deref(), Some("Reconnecting… waiting for network"));
        // A spinner rewriting its line.
        p.saw(&mut partial, b"\rworking 1\rworking 2\r");
        assert_eq!(last().as_deref(), Some("working 2"));
        // Blank output leaves the last line alone.
        p.saw(&mut partial, b"\n  \n");
        assert_eq!(last().as_deref(), Some("working 2"));
    }

    #[tokio::test]
    async fn a_silent_child_is_stopped_as_stalled_with_its_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let watch = StallWatch {
            after: Duration::from_millis(500),
            workdir: None,
            baseline: None,
        };
        let script =
            "echo working; echo 'Reconnecting… waiting for network (key s3cret)'; exec sleep 30";
        let exit = run_it(spec(dir.path(), script, Some(watch))).await;
        let stalled = exit.stalled.expect("stopped as stalled");
        assert_eq!(stalled.after, Duration::from_millis(500));
        assert_eq!(
            stalled.last_line.as_deref(),
            Some("Reconnecting… waiting for network (key ***)")
        );
        assert!(!exit.timed_out);
        assert_eq!(exit.signal, Some(libc::SIGTERM));
        assert!(
            exit.duration < Duration::from_secs(30),
            "{:?}",
            exit.duration
        );
    }

    #[tokio::test]
    async fn output_or_workdir_changes_are_progress() {
        let dir = tempfile::tempdir().unwrap();
        let after = Duration::from_millis(600);
        // Prints every 0.2 s for 2.4 s: never quiet for 0.6 s.
        let chatty = "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo $i; sleep 0.2; done";
        let w = StallWatch {
            after,
            workdir: None,
            baseline: None,
        };
        let exit = run_it(spec(dir.path(), chatty, Some(w))).await;
        assert_eq!((exit.stalled, exit.code), (None, Some(0)));
        // Silent, but writes a new file every 0.2 s.
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let writer = "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo $i > work/f$i; sleep 0.2; done";
        let root = work.clone();
        let stamp: WorkdirStamp =
            Arc::new(move || std::fs::read_dir(&root).map_or(0, |d| d.count() as u64));
        let w = StallWatch {
            after,
            workdir: Some(stamp.clone()),
            baseline: None,
        };
        let exit = run_it(spec(dir.path(), writer, Some(w))).await;
        assert_eq!((exit.stalled, exit.code), (None, Some(0)));
        // The same silence without the writes is a stall, with nothing to quote.
        // With the baseline given: the files already there are not progress.
        let w = StallWatch {
            after,
            baseline: Some(stamp()),
            workdir: Some(stamp),
        };
        let exit = run_it(spec(dir.path(), "exec sleep 30", Some(w))).await;
        let stalled = exit.stalled.expect("stalled");
        assert_eq!(stalled.last_line, None);
    }
}
