//! Several hosts, one queue: figures for `cluster.enabled` (`cargo bench --bench cluster --
//! [scenario...]`; needs PostgreSQL on 127.0.0.1:5432, or ORCHESTRATE_TEST_DATABASE_URL).
//!
//! Scenarios (all by default):
//! - `claim`: the queue alone (`mirror::postgres::queue`), two hosts in this process, each on its
//!   own thread, runtime and connection: one publishes a task, the other, woken by `NOTIFY`, claims
//!   it. 500 tasks one at a time: publish → claimed, p50/p95/p99.
//! - `handoff`: whole supervisors (the release binary), each on its own clone of one repository: a
//!   file dropped into the origin's `tasks/pending/` → the agent started on the other host (the only
//!   one with the label the task requires). 100 drops one at a time.
//! - `throughput`: the same tasks through one host and through three, tasks per second: no-op
//!   agents (what the coordination costs), and agents that take 1 s with 4 slots per host (what
//!   more hosts add).
//! - `reclaim`: the host running a task SIGKILLed → the task leased on the other worker, 5 times
//!   with a 3 s lease.
//!
//! Figures only; nothing is asserted but that the work was done.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use orchestrate::mirror::postgres::queue::{Capacity, End, Finished, Publish, Queue, Settings};

const BIN: &str = env!("CARGO_BIN_EXE_orchestrate");

fn url() -> String {
    std::env::var("ORCHESTRATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh schema for one scenario (dropped first if an earlier run left it).
fn schema(name: &str) -> String {
    let schema = format!("bench_cluster_{name}_{}", std::process::id());
    let rt = runtime();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&url(), tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL");
        let driver = tokio::spawn(conn);
        c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await
            .expect("drop schema");
        driver.abort();
    });
    schema
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(name: &str, v: &mut [f64]) {
    let (p50, p95, p99) = (pct(v, 0.5), pct(v, 0.95), pct(v, 0.99));
    let max = v.iter().copied().fold(0.0, f64::max);
    println!(
        "{name}: p50 {p50:.2} ms, p95 {p95:.2} ms, p99 {p99:.2} ms, max {max:.2} ms (n = {})",
        v.len()
    );
}

/// Poll `done` every millisecond for at most `within`; when it became true.
fn wait(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        if done() {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn claim(n: usize) {
    let schema = schema("claim");
    let settings = Settings::default();
    let rt = runtime();
    let mut publisher = rt
        .block_on(Queue::connect(
            &url(),
            &schema,
            "a",
            "a-1",
            settings.clone(),
        ))
        .expect("host a connects");
    // The claimer: its own thread, runtime and connection, woken by NOTIFY (a poll every second
    // as a fallback, as the supervisor does). Sends (id, when claimed).
    let (tx, rx) = std::sync::mpsc::channel::<(String, Instant)>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let s2 = schema.clone();
    let claimer = std::thread::spawn(move || {
        let rt = runtime();
        rt.block_on(async move {
            let mut q = Queue::connect(&url(), &s2, "b", "b-1", settings)
                .await
                .expect("host b connects");
            let mut wake = q.listen().await.expect("listen");
            let cap = Capacity {
                labels: vec![],
                agents: vec!["any".into()],
                limit: 16,
            };
            let done = Finished {
                end: End::Completed,
                record: "status: completed\n".into(),
                output: String::new(),
                patch: String::new(),
                log_tail: String::new(),
            };
            let _ = ready_tx.send(());
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = tokio::time::timeout(Duration::from_secs(1), wake.next()).await;
                for l in q.claim(&cap).await.expect("claim") {
                    let _ = tx.send((l.id.clone(), Instant::now()));
                    let _ = q.finish(&l.id, l.fence, &done).await.expect("finish");
                }
            }
        });
    });
    ready_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("claimer ready");
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("c{i:05}");
        let t0 = Instant::now();
        rt.block_on(publisher.publish(&Publish {
            id: id.clone(),
            payload: "description: bench\n".into(),
            max_attempts: 1,
            ..Publish::default()
        }))
        .expect("publish");
        let (got, at) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("claimed within 10 s");
        assert_eq!(got, id);
        lat.push((at - t0).as_secs_f64() * 1000.0);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    // The claimer wakes within its 1 s poll.
    rt.block_on(publisher.publish(&Publish {
        id: "last".into(),
        payload: "description: bench\n".into(),
        max_attempts: 1,
        ..Publish::default()
    }))
    .expect("publish");
    claimer.join().expect("claimer");
    summary(
        "queue: publish on host a → claimed on host b (NOTIFY)",
        &mut lat,
    );
}

fn git(dir: &Path, args: &[&str]) {
    let ok = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "bench")
        .env("GIT_AUTHOR_EMAIL", "bench@localhost")
        .env("GIT_COMMITTER_NAME", "bench")
        .env("GIT_COMMITTER_EMAIL", "bench@localhost")
        .output()
        .expect("git")
        .status
        .success();
    assert!(ok, "git {args:?} failed in {}", dir.display());
}

/// One repository every host of a scenario clones, and the schema they share.
struct Cluster {
    dir: tempfile::TempDir,
    bare: PathBuf,
    schema: String,
}

struct Host {
    root: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Cluster {
    fn new(name: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let up = dir.path().join("upstream");
        std::fs::create_dir_all(&up).expect("mkdir");
        std::fs::write(up.join("README"), "the project\n").expect("write");
        git(&up, &["init", "-q", "-b", "main"]);
        git(&up, &["add", "."]);
        git(&up, &["commit", "-qm", "first"]);
        let bare = dir.path().join("origin.git");
        git(
            &up,
            &["clone", "-q", "--bare", ".", bare.to_str().expect("utf-8")],
        );
        Cluster {
            dir,
            bare,
            schema: schema(name),
        }
    }

    /// A host: a clone with `config.yaml` for the cluster; `agent` is `command` and `args`.
    fn host(&self, name: &str, labels: &str, lease: u64, slots: u32, agent: (&str, &str)) -> Host {
        let root = self.dir.path().join(name);
        std::fs::create_dir_all(&root).expect("mkdir");
        let ok = Command::new(BIN)
            .arg("-C")
            .arg(&root)
            .arg("init")
            .output()
            .expect("init")
            .status
            .success();
        assert!(ok, "init failed");
        git(&root, &["init", "-q", "-b", "main"]);
        git(
            &root,
            &[
                "remote",
                "add",
                "origin",
                self.bare.to_str().expect("utf-8"),
            ],
        );
        git(&root, &["fetch", "-q", "origin"]);
        git(&root, &["reset", "-q", "--hard", "origin/main"]);
        let (cmd, args) = agent;
        let config = format!(
            "orchestrator: {{max_concurrent: {slots}, settle_ms: 50, log_level: info}}\n\
             agents: {{a: {{kind: command, command: \"{cmd}\", args: {args}, max_instances: {slots}}}}}\n\
             routing: {{fallback: [a]}}\n\
             task_queue: {{max_retries: 2, retry_delay_seconds: 0.2}}\n\
             database: {{url: \"{}\", schema: {}}}\n\
             cluster: {{enabled: true, host: {name}, labels: [{labels}], lease_seconds: {lease}, poll_ms: 200}}\n",
            url(),
            self.schema
        );
        std::fs::write(root.join("config.yaml"), config).expect("config");
        let log = root.join("supervisor.log");
        Host {
            root,
            child: None,
            log,
        }
    }
}

impl Host {
    fn start(&mut self) {
        let f = std::fs::File::create(&self.log).expect("log");
        let child = Command::new(BIN)
            .arg("-C")
            .arg(&self.root)
            .args(["start", "-v"])
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("clone"))
            .stderr(f)
            .spawn()
            .expect("start");
        self.child = Some(child);
        wait(
            "the host joined the cluster",
            Duration::from_secs(30),
            || self.log_text().contains("joined as host"),
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Write a task file with an mtime in the past (no settling wait), by rename.
    fn drop_task(&self, id: &str, body: &str) {
        let tmp = self.root.join(format!("tasks/pending/.{id}.tmp"));
        std::fs::write(&tmp, body).expect("write");
        let old = std::time::SystemTime::now() - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&tmp)
            .and_then(|f| f.set_modified(old))
            .expect("mtime");
        std::fs::rename(&tmp, self.root.join(format!("tasks/pending/{id}.yaml"))).expect("rename");
    }

    fn settled(&self) -> usize {
        ["tasks/completed", "tasks/failed"]
            .iter()
            .map(|d| {
                std::fs::read_dir(self.root.join(d))
                    .map(|rd| {
                        rd.flatten()
                            .filter(|e| e.file_name().to_string_lossy().ends_with("_result.yaml"))
                            .count()
                    })
                    .unwrap_or(0)
            })
            .sum()
    }

    fn failed(&self) -> usize {
        std::fs::read_dir(self.root.join("tasks/failed"))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with("_result.yaml"))
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop();
    }
}

fn handoff(drops: usize) {
    let c = Cluster::new("handoff");
    let started = c.dir.path().join("started");
    std::fs::create_dir_all(&started).expect("mkdir");
    let touch = format!("[\"{}/{{task_id}}\"]", started.display());
    let mut origin = c.host("origin", "", 30, 4, ("touch", &touch));
    let mut worker = c.host("worker", "worker", 30, 4, ("touch", &touch));
    origin.start();
    worker.start();
    let mut lat = Vec::with_capacity(drops);
    for i in 0..drops {
        let id = format!("h{i:04}");
        let t0 = Instant::now();
        origin.drop_task(&id, "description: handoff probe\nrequires: [worker]\n");
        let mark = started.join(&id);
        let at = wait(
            "the agent started on the worker",
            Duration::from_secs(30),
            || mark.exists(),
        );
        lat.push((at - t0).as_secs_f64() * 1000.0);
        // The outcome lands on the origin before the next drop: each drop meets idle hosts.
        wait(
            "the origin settled the task",
            Duration::from_secs(30),
            || origin.settled() > i,
        );
    }
    assert_eq!(origin.failed(), 0, "{}", origin.log_text());
    summary(
        "supervisors: drop into the origin's pending/ → agent started on the other host",
        &mut lat,
    );
}

/// `n` tasks through `hosts` hosts, dropped round-robin into their `pending/` folders at once;
/// tasks per second from the first drop to the last result file.
fn run_through(name: &str, hosts: usize, n: usize, slots: u32, agent: (&str, &str)) -> f64 {
    let c = Cluster::new(name);
    let mut all: Vec<Host> = (0..hosts)
        .map(|i| c.host(&format!("h{i}"), "", 30, slots, agent))
        .collect();
    for h in &mut all {
        h.start();
    }
    let t0 = Instant::now();
    for i in 0..n {
        all[i % hosts].drop_task(&format!("t{i:05}"), "description: bench\n");
    }
    wait("every task settled", Duration::from_secs(1800), || {
        all.iter().map(Host::settled).sum::<usize>() >= n
    });
    let secs = t0.elapsed().as_secs_f64();
    let failed: usize = all.iter().map(Host::failed).sum();
    assert_eq!(failed, 0, "{}", all[0].log_text());
    for h in &mut all {
        h.stop();
    }
    secs
}

fn throughput(noop: usize, slow: usize) {
    for hosts in [1, 3] {
        let secs = run_through(&format!("noop{hosts}"), hosts, noop, 8, ("true", "[]"));
        println!(
            "throughput, no-op agents, {hosts} host(s) × 8 slots: {noop} tasks in {secs:.2} s = {:.1} tasks/s",
            noop as f64 / secs
        );
    }
    for hosts in [1, 3] {
        let secs = run_through(
            &format!("slow{hosts}"),
            hosts,
            slow,
            4,
            ("sleep", "[\"1\"]"),
        );
        println!(
            "throughput, 1 s agents, {hosts} host(s) × 4 slots: {slow} tasks in {secs:.2} s = {:.2} tasks/s",
            slow as f64 / secs
        );
    }
}

fn reclaim(rounds: usize) {
    let mut took = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let c = Cluster::new(&format!("reclaim{r}"));
        let agent = ("sleep", "[\"30\"]");
        let mut origin = c.host("origin", "", 3, 4, agent);
        let mut a = c.host("a", "worker", 3, 4, agent);
        let mut b = c.host("b", "worker", 3, 4, agent);
        origin.start();
        a.start();
        b.start();
        origin.drop_task("slow", "description: slow\nrequires: [worker]\n");
        wait("a worker leased the task", Duration::from_secs(30), || {
            a.log_text().contains("leased     slow ") || b.log_text().contains("leased     slow ")
        });
        let (dead, other) = if a.log_text().contains("leased     slow ") {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        let t0 = Instant::now();
        dead.kill();
        let at = wait(
            "the other worker leased it",
            Duration::from_secs(60),
            || other.log_text().contains("leased     slow "),
        );
        took.push((at - t0).as_secs_f64() * 1000.0);
        other.stop();
        origin.stop();
    }
    summary(
        "reclaim: SIGKILL of the host running a task → leased on another (lease 3 s, heartbeat 1 s)",
        &mut took,
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    if want("claim") {
        claim(500);
    }
    if want("handoff") {
        handoff(100);
    }
    if want("throughput") {
        throughput(600, 120);
    }
    if want("reclaim") {
        reclaim(5);
    }
}
