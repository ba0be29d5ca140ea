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
    pub max_log_bytes: u64,
    pub redactor: Arc<Redactor>,
    /// `ORCHESTRATE_RUN` value for this attempt; set in the child's environment and used to find
    /// descendants that left the process group (`setsid`, daemonizing tools).
    pub marker: String,
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

async fn drain<R: AsyncRead + Unpin>(
    mut r: R,
    sink: Arc<Mutex<LogSink>>,
    capture: Arc<Mutex<HeadTail>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
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
            }
        }
    }
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
    let file = match std::fs::File::create(&spec.log_path) {
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
    let out_task = child
        .stdout
        .take()
        .map(|r| tokio::spawn(drain(r, sink.clone(), out_cap.clone())));
    let err_task = child
        .stderr
        .take()
        .map(|r| tokio::spawn(drain(r, sink.clone(), err_cap.clone())));

    let deadline = tokio::time::Instant::now() + spec.timeout;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut stop_closed = false;
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    let status = loop {
        tokio::select! {
            s = child.wait() => break s,
            _ = tokio::time::sleep_until(deadline), if kill_at.is_none() => {
                exit.timed_out = true;
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
