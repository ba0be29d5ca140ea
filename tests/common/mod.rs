//! Test harness: a project in a temp dir, the real `orchestrate` binary, and bounded waits.
//! The fake agent is the binary itself (`orchestrate fake-agent`), told what to do by `@fake` lines in
//! the task description.
#![allow(dead_code)]

pub mod model_server;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_orchestrate");

pub struct Project {
    pub dir: tempfile::TempDir,
}

/// A supervisor running in the background; killed if the test ends without stopping it.
pub struct Supervisor {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Supervisor {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM and wait (bounded) for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        wait_child(&mut child, Duration::from_secs(30))
            .expect("supervisor exits within 30 s of SIGTERM")
    }

    pub fn sigkill(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn wait_child(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Poll `cond` every 20 ms until it holds or `limit` passes; panics with `what` on timeout.
#[track_caller]
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `orchestrator.timezone` for a test: an offset at which it is about noon now, so no day or
/// month of the test's budget windows ends while it runs. With the label `reached` reasons use.
pub fn noon_zone() -> (String, String) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let hour = (now / 3600 % 24) as i64;
    let offset = (12 - hour + 36) % 24 - 12;
    let zone = format!(
        "{}{:02}:00",
        if offset < 0 { '-' } else { '+' },
        offset.abs()
    );
    let label = if offset == 0 {
        "UTC".to_string()
    } else {
        zone.clone()
    };
    (zone, label)
}

/// The test configuration: a `fake` agent (this binary) and short timings.
pub fn test_config(extra: &str) -> String {
    format!(
        r#"orchestrator:
  max_concurrent: 8
  settle_ms: 100
  rescan_seconds: 2
  kill_grace_seconds: 1
  heartbeat_seconds: 1
agents:
  fake:
    kind: command
    command: {BIN}
    args: [fake-agent]
    max_instances: 8
routing:
  fallback: [fake]
task_queue:
  timeout_minutes: 2
  max_retries: 1
  retry_delay_seconds: 0.2
security:
  env_allow: [PATH, HOME]
{extra}"#
    )
}

impl Project {
    /// `orchestrate init` in a fresh temp dir, then the test configuration.
    pub fn new() -> Project {
        Self::with_config(&test_config(""))
    }

    pub fn with_config(config: &str) -> Project {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = Project { dir };
        p.run(&["init"]).assert_code(0);
        std::fs::write(p.path("config.yaml"), config).expect("write config");
        p
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("-C")
            .arg(self.root())
            .args(args)
            .env_remove("DATABASE_URL");
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let mut c = self.cmd(args);
        c.stdin(Stdio::null());
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn orchestrate");
        // Bounded: a command that hangs fails the test instead of hanging it.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if child.try_wait().expect("try_wait").is_some() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("orchestrate {args:?} did not finish within 120 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Run {
            args: args.iter().map(|s| s.to_string()).collect(),
            out: child.wait_with_output().expect("output"),
        }
    }

    /// Start `orchestrate start` in the background with output to a log file.
    /// Run a supervisor with a crash armed at `spec` (`point:nth`, see src/failpoint.rs); it must
    /// die by SIGKILL, the point reached. Returns what it printed.
    pub fn run_until_crash(&self, spec: &str) -> String {
        use std::os::unix::process::ExitStatusExt;
        let log = self.path("crashed.log");
        let f = std::fs::File::create(&log).expect("log");
        let mut child = self
            .cmd(&["start", "-v"])
            .env("ORCHESTRATE_CRASH_AT", spec)
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("clone"))
            .stderr(f)
            .spawn()
            .expect("spawn");
        let status = wait_child(&mut child, Duration::from_secs(60));
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        let Some(status) = status else {
            let _ = child.kill();
            panic!("{spec}: the supervisor never reached the crash point\n{out}");
        };
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{spec}: expected death by SIGKILL, got {status:?}\n{out}"
        );
        out
    }

    pub fn start(&self) -> Supervisor {
        self.start_with_env(&[])
    }

    /// [`Project::start`] with extra environment for the supervisor.
    pub fn start_with_env(&self, env: &[(&str, &str)]) -> Supervisor {
        let log = self.path(&format!("supervisor-{}.log", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log");
        let mut cmd = self.cmd(&["start", "-v"]);
        cmd.envs(env.iter().copied());
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("clone"))
            .stderr(f)
            .spawn()
            .expect("spawn supervisor");
        let mut s = Supervisor {
            child: Some(child),
            log,
        };
        // Bounded, and a supervisor that refused to start or is slow to says so with its log. The
        // bound is above the longest wait of a start itself (20 s for a cluster's queue to answer).
        let limit = Duration::from_secs(30);
        let deadline = Instant::now() + limit;
        while !s.output().contains("watching") {
            if let Ok(Some(status)) = s.child.as_mut().expect("running").try_wait() {
                panic!(
                    "the supervisor exited ({status}) before it was watching\n{}",
                    s.output()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {limit:?} waiting for the supervisor to watch\n{}",
                    s.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// Drop a task file the way careful tools do: write a hidden temp file, then rename it in.
    pub fn drop_task(&self, name: &str, yaml: &str) {
        let tmp = self.path(&format!("tasks/pending/.{name}.tmp"));
        std::fs::write(&tmp, yaml).expect("write temp");
        std::fs::rename(&tmp, self.path(&format!("tasks/pending/{name}")))
            .expect("rename into pending");
    }

    /// [`Project::drop_task`] into another folder (a `tasks_dir` configured elsewhere).
    pub fn drop_task_in(&self, pending: &Path, name: &str, yaml: &str) {
        let tmp = pending.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml).expect("write temp");
        std::fs::rename(&tmp, pending.join(name)).expect("rename into pending");
    }

    /// Give the task files in `pending/` modification times a minute in the past, one second apart
    /// in the order given: the start-up scan then finds them all ready at once, in that arrival order.
    pub fn age_pending(&self, names: &[&str]) {
        let base = std::time::SystemTime::now() - Duration::from_secs(60);
        for (i, name) in names.iter().enumerate() {
            std::fs::File::options()
                .write(true)
                .open(self.path(&format!("tasks/pending/{name}")))
                .and_then(|f| f.set_modified(base + Duration::from_secs(i as u64)))
                .unwrap_or_else(|e| panic!("set mtime of {name}: {e}"));
        }
    }

    /// Files (not dot-files) in a directory under the project, sorted.
    pub fn files(&self, rel: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.path(rel))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Task files (not results or error files) in a spool directory.
    pub fn tasks_in(&self, state: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .files(&format!("tasks/{state}"))
            .into_iter()
            .filter(|n| {
                n.ends_with(".yaml") && !n.ends_with("_result.yaml") && !n.ends_with(".claim.yaml")
            })
            .map(|n| n.trim_end_matches(".yaml").to_string())
            .collect();
        v.sort();
        v
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }

    pub fn result(&self, state: &str, id: &str) -> serde_json::Value {
        let text = self.read(&format!("tasks/{state}/{id}_result.yaml"));
        yaml_to_json(&text)
    }

    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.path(".orchestrate/state.db")).expect("open mirror")
    }

    /// (id, state) of every mirror row, sorted.
    pub fn mirror_states(&self) -> Vec<(String, String)> {
        let db = self.db();
        let mut st = db
            .prepare("SELECT id, state FROM tasks ORDER BY id")
            .expect("prepare");
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .map(|r| r.expect("row"))
            .collect()
    }

    /// (id, state) from the tree, sorted: what the mirror must agree with.
    pub fn tree_states(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        for (dir, state) in [
            ("pending", "pending"),
            ("assigned", "running"),
            ("completed", "completed"),
            ("failed", "failed"),
        ] {
            for id in self.tasks_in(dir) {
                v.push((id, state.to_string()));
            }
        }
        v.sort();
        v
    }
}

/// Our result files are YAML; tests look at them as JSON values.
pub fn yaml_to_json(text: &str) -> serde_json::Value {
    serde_saphyr::from_str::<serde_json::Value>(text).expect("result file is valid YAML")
}

pub struct Run {
    pub args: Vec<String>,
    pub out: Output,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.out.status.code(),
            Some(code),
            "orchestrate {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.args,
            self.stdout(),
            self.stderr()
        );
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", self.stdout()))
    }
}

/// Whether a process is gone (or a zombie waiting for a reaper that is not us).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

pub fn read_pid(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("pid file {}: {e}", path.display()))
        .trim()
        .parse()
        .expect("pid")
}

// ---- What a test needs from the machine ------------------------------------------------------------
//
// `tools/test` skips the tests that need a part the machine lacks (PostgreSQL, an agent CLI) by their
// names alone: the `postgres` test binary and modules named `postgres`, and modules named after each
// CLI. A test that needs a part and sits outside its group could not be skipped, so it fails here on
// every machine; and a test run without a part it needs fails, saying what is missing: it never
// passes without doing its work.

/// Whether the running test sits in a module named `module`, at any depth. libtest names each
/// test's thread after the test (`claude::codex::name`); another thread cannot tell, so it passes.
fn test_in_module(module: &str) -> bool {
    let thread = std::thread::current();
    let Some(name) = thread.name() else {
        return true;
    };
    // The modules are every part but the last, which is the test's own name.
    name.rsplit_once("::")
        .is_some_and(|(modules, _)| modules.split("::").any(|m| m == module))
}

/// A pinned agent CLI (`claude`, `codex`, `gemini`) as tools/test installs it, or from
/// `ORCHESTRATE_AGENT_BIN_DIR`; a missing one fails the test saying how to get it.
pub fn pinned_cli(name: &str) -> PathBuf {
    let dir = std::env::var_os("ORCHESTRATE_AGENT_BIN_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/agents/node_modules/.bin")
        });
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{name} is missing: {} does not exist. Install the pinned CLIs with \
         `npm ci --prefix tools/agents`, or run the tests with tools/test, which installs them and \
         skips the {name} tests when it cannot (and fails under CI).",
        bin.display()
    );
    bin
}

/// `orchestrate serve` for `p` on a free loopback port with `args` (and `env` set): the process,
/// the address it printed first, and the `extra_lines` it printed after that (a generated token).
pub fn spawn_serve(
    p: &Project,
    args: &[&str],
    env: (&str, &str),
    extra_lines: usize,
) -> (Child, String, Vec<String>) {
    let mut all = vec!["serve", "--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let mut child = p
        .cmd(&all)
        .env(env.0, env.1)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn serve");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("serve prints where it listens");
    let addr = first
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line: {first}"))
        .to_string();
    let lines = (0..extra_lines)
        .map(|_| rx.recv_timeout(Duration::from_secs(10)).expect("a line"))
        .collect();
    (child, addr, lines)
}

/// Fail the running test unless `tools/test` can select it by its name as one that needs `part`:
/// it sits in the test binary `binary` (when given) or in a module named `module`.
#[track_caller]
pub fn assert_grouped(part: &str, binary: Option<&str>, module: &str) {
    let in_binary = binary.is_some_and(|b| b == env!("CARGO_CRATE_NAME"));
    if !in_binary && !test_in_module(module) {
        let test = std::thread::current().name().unwrap_or("?").to_string();
        let place = match binary {
            Some(b) => format!("in tests/{b}.rs or in a module named `{module}`"),
            None => format!("in a module named `{module}`"),
        };
        panic!(
            "test `{test}` in tests/{}.rs needs {part} but is not {place}: tools/test could not \
             skip it on a machine without {part}; move it there (see docs/testing.md)",
            env!("CARGO_CRATE_NAME")
        );
    }
}

// ---- PostgreSQL ------------------------------------------------------------------------------------

/// The test server when ORCHESTRATE_TEST_DATABASE_URL names none. `tools/test` reads this line to
/// check the same server, so keep it on one line as it is.
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The test server, after making sure (once per test process) that the test may use it and that it
/// answers; otherwise the test fails, saying what is missing.
pub fn pg_url() -> String {
    static READY: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let url = std::env::var("ORCHESTRATE_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_PG_URL.into());
    assert_grouped("PostgreSQL", Some("postgres"), "postgres");
    if let Err(e) = READY.get_or_init(|| pg_reachable(&url)) {
        panic!(
            "PostgreSQL is missing: {e}. This test needs it: start the server (the default, \
             {DEFAULT_PG_URL}, lets user postgres into database test without a password) or point \
             ORCHESTRATE_TEST_DATABASE_URL at another. tools/test skips the PostgreSQL tests when \
             the server is down (and fails under CI)."
        );
    }
    url
}

/// Whether a connection to `url` opens within ten seconds. On a thread of its own, so that it may
/// be called from inside a runtime too.
fn pg_reachable(url: &str) -> Result<(), String> {
    let url = url.to_string();
    std::thread::spawn(move || pg_connects(&url))
        .join()
        .expect("the PostgreSQL check panicked")
}

fn pg_connects(url: &str) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        match tokio::time::timeout(
            Duration::from_secs(10),
            tokio_postgres::connect(url, tokio_postgres::NoTls),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                // tokio-postgres keeps the reason (connection refused, no such database, ...) in
                // the source.
                let why = std::error::Error::source(&e).map(|s| format!(" ({s})"));
                Err(format!(
                    "cannot connect to {url}: {e}{}",
                    why.unwrap_or_default()
                ))
            }
            Err(_) => Err(format!("no answer from {url} within 10 s")),
        }
    })
}

/// `host:port` of the test server, for a proxy in front of it.
pub fn pg_addr() -> String {
    let url = pg_url();
    let config: tokio_postgres::Config = url
        .parse()
        .unwrap_or_else(|e| panic!("ORCHESTRATE_TEST_DATABASE_URL {url}: {e}"));
    let host = match config.get_hosts() {
        [tokio_postgres::config::Host::Tcp(h)] => h.clone(),
        _ => panic!("{url}: a proxy needs the URL to name one TCP host"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

/// A schema of its own for one test, dropped when the test ends.
pub struct PgSchema {
    pub name: String,
}

impl PgSchema {
    pub fn new(test: &str) -> PgSchema {
        let name = format!("t_{}_{}", test, std::process::id());
        pg_exec(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"));
        PgSchema { name }
    }

    /// The server URL with this test's application name, so the test can single out its own
    /// connections (tests run in parallel against one server).
    pub fn url(&self) -> String {
        self.url_on(&pg_url())
    }

    pub fn url_on(&self, base: &str) -> String {
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}application_name={}", self.name)
    }

    /// Kill this test's server connections (writer and followers), as an admin would.
    pub fn terminate_backends(&self) -> i64 {
        pg_rows(
            "SELECT 1",
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE application_name = '{}' AND pid <> pg_backend_pid()",
                self.name
            ),
        )[0][0]
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// A count that is 0 while the tables do not exist yet.
    pub fn count_or_zero(&self, sql: &str) -> i64 {
        let exists = pg_rows(
            "SELECT 1",
            &format!("SELECT to_regclass('{}.tasks') IS NOT NULL", self.name),
        );
        if exists[0][0].as_deref() != Some("t") {
            return 0;
        }
        self.count(sql)
    }

    /// Rows of a query inside this schema, every column read as text.
    pub fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        pg_rows(&format!("SET search_path TO {}", self.name), sql)
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.query(sql)[0][0]
            .as_deref()
            .and_then(|v| v.parse().ok())
            .expect("a count")
    }

    /// (id, state) of every task row, sorted: compare with `Project::tree_states`.
    pub fn states(&self) -> Vec<(String, String)> {
        self.query("SELECT id, state FROM tasks ORDER BY id")
            .into_iter()
            .map(|r| {
                (
                    r[0].clone().unwrap_or_default(),
                    r[1].clone().unwrap_or_default(),
                )
            })
            .collect()
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        pg_exec(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
    }
}

fn pg_client<T>(f: impl AsyncFnOnce(&tokio_postgres::Client) -> T) -> T {
    let url = pg_url();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
        tokio::spawn(conn);
        f(&client).await
    })
}

pub fn pg_exec(sql: &str) {
    pg_client(async |c| {
        c.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    });
}

fn pg_rows(setup: &str, sql: &str) -> Vec<Vec<Option<String>>> {
    pg_client(async |c| {
        c.batch_execute(setup).await.expect("setup");
        let rows = c
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        rows.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(String::from)).collect())
                }
                _ => None,
            })
            .collect()
    })
}

/// A transaction held open on a connection of its own until dropped, as a running supervisor's
/// would be: `sql` runs in it first (a `LOCK TABLE`, say), and its locks stay taken meanwhile.
pub struct PgHold {
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PgHold {
    pub fn new(sql: &str) -> PgHold {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let sql = sql.to_string();
        let thread = std::thread::spawn(move || {
            pg_client(async |c| {
                c.batch_execute(&format!("BEGIN; {sql}"))
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                let _ = ready_tx.send(());
                // Bounded: a test that forgets to drop the hold still ends it.
                let _ = tokio::task::spawn_blocking(move || {
                    done_rx.recv_timeout(Duration::from_secs(120))
                })
                .await;
                let _ = c.batch_execute("COMMIT").await;
            })
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the held transaction took its locks");
        PgHold {
            done: Some(done_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for PgHold {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The first column of the first row of a query outside any test schema.
pub fn pg_rows_public(sql: &str) -> Option<String> {
    pg_rows("SELECT 1", sql).first().and_then(|r| r[0].clone())
}

/// A TCP proxy in front of the server that a test can cut (connections dropped, new ones refused),
/// make silent (a blackhole: connections stay open, new ones are accepted, nothing passes either
/// way, as behind a NAT or a proxy that lost its peer) and restore: a database outage without
/// stopping the server other tests share.
pub struct Proxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    silent: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    /// Connections accepted while silent, held open and never forwarded.
    held: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

/// Copy `from` to `to` until either ends, holding what was read while `silent` is set (the peer
/// gets no answer, and once the socket buffers fill, the sender blocks) and passing it on once it
/// is cleared.
fn forward(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    silent: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while silent.load(Ordering::SeqCst) && !cut.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if cut.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

impl Proxy {
    /// A proxy in front of the test server ([`pg_addr`]).
    pub fn start() -> Proxy {
        let target = pg_addr();
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let silent = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::<std::net::TcpStream>::new()));
        let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::<std::net::TcpStream>::new()));
        let (cut2, silent2, conns2, held2) =
            (cut.clone(), silent.clone(), conns.clone(), held.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if cut2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                if silent2.load(Ordering::SeqCst) {
                    held2.lock().expect("lock").push(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let mut list = conns2.lock().expect("lock");
                list.push(client.try_clone().expect("clone"));
                list.push(server.try_clone().expect("clone"));
                drop(list);
                for (from, to) in [
                    (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                    ),
                    (server, client),
                ] {
                    let (silent, cut) = (silent2.clone(), cut2.clone());
                    std::thread::spawn(move || forward(from, to, silent, cut));
                }
            }
        });
        Proxy {
            port,
            cut,
            silent,
            conns,
            held,
        }
    }

    /// The test server's URL with the proxy in place of the server.
    pub fn url(&self) -> String {
        let (url, addr) = (pg_url(), pg_addr());
        assert!(
            url.contains(&addr),
            "{url} does not spell out {addr}, which the proxy must replace"
        );
        url.replacen(&addr, &format!("127.0.0.1:{}", self.port), 1)
    }

    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.conns.lock().expect("lock").drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.held.lock().expect("lock").clear();
    }

    /// Go silent: every connection stays open and nothing passes, either way; new connections are
    /// accepted and held without an answer. No error reaches either side.
    pub fn blackhole(&self) {
        self.silent.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Pass traffic again (after [`Proxy::cut`] or [`Proxy::blackhole`]). Connections held while
    /// silent are closed (their clients gave up on them); what open connections held passes on.
    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
        self.held.lock().expect("lock").clear();
        self.silent
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The test configuration with a PostgreSQL mirror.
pub fn pg_config(url: &str, schema: &str) -> String {
    test_config(&format!(
        "database:\n  url: \"{url}\"\n  schema: {schema}\n"
    ))
}

/// Parse `follow --json` output: the sequence numbers, in the order printed.
pub fn followed_seqs(out: &str) -> Vec<i64> {
    out.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json line")["seq"]
                .as_i64()
                .expect("seq")
        })
        .collect()
}

/// Fails unless the test runs as root (it mounts file systems) and sits in a module named `root`,
/// which `tools/test` skips when not run as root.
#[track_caller]
pub fn require_root() {
    assert_grouped("root (to mount file systems)", None, "root");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "this test mounts file systems, which needs root: run it as root. tools/test skips the \
             tests of modules named root when it does not run as root (and fails under CI)"
        );
    }
}

/// A tmpfs of `size` (as mount(8) takes it, e.g. `1m`) mounted at a fresh folder, unmounted on drop.
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    #[track_caller]
    pub fn mount(size: &str) -> Tmpfs {
        require_root();
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs -o size={size} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write into `name` until the file system refuses: returns the filler's size.
    pub fn fill(&self, name: &str) -> u64 {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path().join(name)).expect("filler");
        let chunk = [0u8; 4096];
        let mut size = 0;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => size += n as u64,
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling: {e}");
                    break;
                }
            }
        }
        size
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a process holds a file there): detach it now, gone when released.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Run git in `dir` as a user would (a fixed author), require success, and return its stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "user")
        .env("GIT_AUTHOR_EMAIL", "user@example.com")
        .env("GIT_COMMITTER_NAME", "user")
        .env("GIT_COMMITTER_EMAIL", "user@example.com")
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?} in {dir:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dir` made a git repository whose one commit holds what `dir` holds now.
pub fn git_init_commit(dir: &Path) {
    git(dir, &["init", "-q"]);
    git(dir, &["add", "."]);
    git(dir, &["commit", "-qm", "first"]);
}

/// A folder holding nothing but a config that names the PostgreSQL `schema` (no `tasks/`, no state
/// directory): where a reader of the mirror alone (`--database-url`) is started from.
pub fn config_only_folder(schema: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("config.yaml"),
        format!("database:\n  schema: {schema}\n"),
    )
    .expect("write config.yaml");
    dir
}
