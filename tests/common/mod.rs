//! Test harness: a project in a temp dir, the real `orchestrate` binary, and bounded waits.
//! The fake agent is the binary itself (`orchestrate fake-agent`), told what to do by `@fake` lines in
//! the task description.
#![allow(dead_code)]

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
    pub fn start(&self) -> Supervisor {
        let log = self.path(&format!("supervisor-{}.log", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log");
        let child = self
            .cmd(&["start", "-v"])
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("clone"))
            .stderr(f)
            .spawn()
            .expect("spawn supervisor");
        let s = Supervisor {
            child: Some(child),
            log,
        };
        wait_for("supervisor to register", Duration::from_secs(15), || {
            s.output().contains("watching")
        });
        s
    }

    /// Drop a task file the way careful tools do: write a hidden temp file, then rename it in.
    pub fn drop_task(&self, name: &str, yaml: &str) {
        let tmp = self.path(&format!("tasks/pending/.{name}.tmp"));
        std::fs::write(&tmp, yaml).expect("write temp");
        std::fs::rename(&tmp, self.path(&format!("tasks/pending/{name}")))
            .expect("rename into pending");
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
