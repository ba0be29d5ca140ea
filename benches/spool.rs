//! Supervisor benchmarks against the real binary (`cargo bench --bench spool -- [scenario...]`).
//!
//! Scenarios (all by default): `latency` (drop → claim, drop → agent started, 1,000 drops one at a time),
//! `throughput` (5,000 no-op tasks, durable and not), `reads` (status / tasks --json at 10k and 100k
//! tasks), `startup` (100,000 files already pending: time to first claim, RSS), `idle` (RSS and CPU with
//! nothing to do), `diff` (per-task cost of diff capture on a 10,000-file workdir), `isolation` (per-task cost of
//! worktrees on a 10,000-file repository, against a bare `git worktree add`/`remove`), `sse` (drop →
//! event at 20 clients of `serve`'s event stream, the server's RSS and CPU), `pueue` (the same
//! no-op work through pueue, when `pueue`/`pueued` are on PATH). Figures only; nothing is asserted.
//!
//! No tree is deleted until every scenario has run. On ext4 without a journal (this project's VM),
//! creating a file scans past every inode deleted in the last minute or more (`recently_deleted` in
//! the kernel's inode allocator), so removing one scenario's 10,000 files halves the throughput of the
//! next. Throughput runs first, before the other scenarios have made and deleted anything.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_orchestrate");

struct Tree {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
}

/// Trees kept until the end of the run (see the module comment).
static KEEP: std::sync::Mutex<Vec<tempfile::TempDir>> = std::sync::Mutex::new(Vec::new());

impl Drop for Tree {
    fn drop(&mut self) {
        if let Some(d) = self.dir.take() {
            KEEP.lock().unwrap_or_else(|e| e.into_inner()).push(d);
        }
    }
}

impl Tree {
    fn new(config: &str) -> Tree {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let ok = Command::new(BIN)
            .arg("-C")
            .arg(&root)
            .arg("init")
            .output()
            .expect("init")
            .status
            .success();
        assert!(ok, "init failed");
        std::fs::write(root.join("config.yaml"), config).expect("config");
        Tree {
            dir: Some(dir),
            root,
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn start(&self, extra: &[&str]) -> Child {
        Command::new(BIN)
            .arg("-C")
            .arg(&self.root)
            .arg("start")
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start")
    }

    /// Write `n` task files straight into pending/ with an mtime in the past (ready at once).
    fn fill_pending(&self, n: usize, body: &str) {
        for i in 0..n {
            self.drop_ready(&format!("n{i:06}"), body);
        }
    }

    /// Write `pending/<name>.yaml` with an mtime in the past: ready at once, no settling.
    fn drop_ready(&self, name: &str, body: &str) {
        let path = self.p(&format!("tasks/pending/{name}.yaml"));
        std::fs::write(&path, body).expect("write");
        let old = std::time::SystemTime::now() - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(old))
            .expect("mtime");
    }

    fn count(&self, dir: &str) -> usize {
        std::fs::read_dir(self.p(dir))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with("_result.yaml"))
                    .count()
            })
            .unwrap_or(0)
    }
}

fn config(durable: bool, agent_cmd: &str, agent_args: &str, extra: &str) -> String {
    format!(
        "orchestrator: {{max_concurrent: 8, durable: {durable}, log_level: warn, rescan_seconds: 3600}}\n\
         agents: {{a: {{kind: command, command: \"{agent_cmd}\", args: {agent_args}, max_instances: 8}}}}\n\
         routing: {{fallback: [a]}}\n{extra}"
    )
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(name: &str, v: &mut [f64]) {
    let (p50, p99) = (pct(v, 0.5), pct(v, 0.99));
    let max = v.iter().copied().fold(0.0, f64::max);
    println!(
        "{name}: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms (n = {})",
        v.len()
    );
}

fn stop(mut child: Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

/// (VmRSS, VmHWM) of a process in KiB.
fn rss(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

/// utime + stime of a process in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = s
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn latency(drops: usize) {
    use notify::{
        EventKind, RecursiveMode, Watcher,
        event::{CreateKind, ModifyKind, RenameMode},
    };
    let t = Tree::new(&config(
        true,
        "touch",
        "[\"started/{task_id}\"]",
        "context: {diff_exclude: [started]}\n",
    ));
    std::fs::create_dir_all(t.p("started")).expect("mkdir");
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, PathBuf, bool)>();
    let mut w = notify::recommended_watcher(move |r: notify::Result<notify::Event>| {
        let now = Instant::now();
        if let Ok(ev) = r {
            let claim = matches!(
                ev.kind,
                EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
            );
            let start = matches!(
                ev.kind,
                EventKind::Create(CreateKind::File | CreateKind::Any)
            );
            if claim || start {
                for p in ev.paths {
                    let _ = tx.send((now, p, claim));
                }
            }
        }
    })
    .expect("watcher");
    w.watch(&t.p("tasks/assigned"), RecursiveMode::NonRecursive)
        .expect("watch");
    w.watch(&t.p("started"), RecursiveMode::NonRecursive)
        .expect("watch");
    let sup = t.start(&[]);
    std::thread::sleep(Duration::from_millis(500));
    let (mut to_claim, mut to_start) = (Vec::new(), Vec::new());
    for i in 0..drops {
        let id = format!("l{i:05}");
        let tmp = t.p(&format!("tasks/pending/.{id}.tmp"));
        std::fs::write(&tmp, "description: latency probe\n").expect("write");
        let t0 = Instant::now();
        std::fs::rename(&tmp, t.p(&format!("tasks/pending/{id}.yaml"))).expect("rename");
        let (mut claimed, mut started) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(10);
        while claimed.is_none() || started.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok((at, path, claim)) = rx.recv_timeout(left) else {
                panic!("task {id} not claimed and started in 10 s")
            };
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if claim && name == format!("{id}.yaml") {
                claimed = Some(at - t0);
            } else if !claim && name == id {
                started = Some(at - t0);
            }
        }
        to_claim.push(claimed.expect("claimed").as_secs_f64() * 1000.0);
        to_start.push(started.expect("started").as_secs_f64() * 1000.0);
        // Let the task finish before the next drop, so each drop meets an idle supervisor.
        let done = t.p(&format!("tasks/completed/{id}_result.yaml"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    stop(sup);
    summary("drop → claim", &mut to_claim);
    summary("drop → agent started", &mut to_start);
}

fn throughput(n: usize) {
    for durable in [true, false] {
        let t = Tree::new(&config(durable, "true", "[]", ""));
        t.fill_pending(n, "description: no-op\n");
        let t0 = Instant::now();
        let mut child = t.start(&["--once"]);
        let pid = child.id();
        let mut peak = 0;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            peak = peak.max(rss(pid).1);
            std::thread::sleep(Duration::from_millis(50));
        }
        let secs = t0.elapsed().as_secs_f64();
        assert_eq!(t.count("tasks/completed"), n, "every task completed");
        println!(
            "throughput ({}): {n} tasks in {secs:.2} s = {:.0} tasks/s, peak RSS {:.1} MiB",
            if durable { "durable" } else { "durable: false" },
            n as f64 / secs,
            peak as f64 / 1024.0
        );
    }
}

fn reads() {
    for n in [10_000usize, 100_000] {
        let t = Tree::new(&config(true, "true", "[]", ""));
        // Two thirds finished (task + result file), one third pending: a lived-in tree.
        for i in 0..n {
            let id = format!("r{i:06}");
            if i % 3 == 0 {
                std::fs::write(
                    t.p(&format!("tasks/pending/{id}.yaml")),
                    format!("description: task {i}\n"),
                )
                .expect("w");
            } else {
                std::fs::write(
                    t.p(&format!("tasks/completed/{id}.yaml")),
                    format!("description: task {i}\n"),
                )
                .expect("w");
                std::fs::write(
                    t.p(&format!("tasks/completed/{id}_result.yaml")),
                    format!("task_id: {id}\nstatus: completed\nversion: 3\nagent: a\ndescription: task {i}\nfinished_at: 2026-01-01T00:00:00.000Z\nattempts: []\nfiles_modified: []\nreview_required: false\n"),
                )
                .expect("w");
            }
        }
        let rebuild = Instant::now();
        let ok = Command::new(BIN)
            .arg("-C")
            .arg(&t.root)
            .args(["mirror", "rebuild"])
            .output()
            .expect("rebuild")
            .status
            .success();
        assert!(ok);
        println!(
            "reads at {n} tasks: mirror rebuild {:.0} ms",
            rebuild.elapsed().as_secs_f64() * 1000.0
        );
        for args in [&["status"][..], &["tasks", "--json"][..]] {
            let mut v = Vec::new();
            for _ in 0..20 {
                let t0 = Instant::now();
                let out = Command::new(BIN)
                    .arg("-C")
                    .arg(&t.root)
                    .args(args)
                    .stdout(Stdio::null())
                    .status()
                    .expect("run");
                assert!(out.success());
                v.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            summary(&format!("  {}", args.join(" ")), &mut v);
        }
    }
}

fn startup(n: usize) {
    let t = Tree::new(&config(true, "true", "[]", ""));
    t.fill_pending(n, "description: no-op\n");
    let t0 = Instant::now();
    let child = t.start(&[]);
    let pid = child.id();
    let first = loop {
        let claimed = std::fs::read_dir(t.p("tasks/assigned"))
            .map(|rd| rd.flatten().count())
            .unwrap_or(0)
            + t.count("tasks/completed");
        if claimed > 1 {
            break t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(120) {
            panic!("no claim within 120 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let (_, hwm_first) = rss(pid);
    std::thread::sleep(Duration::from_secs(5));
    let (now, hwm) = rss(pid);
    let done = t.count("tasks/completed");
    stop(child);
    println!(
        "startup with {n} pending: first claim after {:.0} ms (peak RSS then {:.1} MiB); 5 s later {done} done, RSS {:.1} MiB, peak {:.1} MiB",
        first.as_secs_f64() * 1000.0,
        hwm_first as f64 / 1024.0,
        now as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
}

fn idle() {
    let t = Tree::new(&config(true, "true", "[]", ""));
    let child = t.start(&[]);
    let pid = child.id();
    std::thread::sleep(Duration::from_secs(2));
    let c0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(10));
    let ticks = cpu_ticks(pid) - c0;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let (rss_now, _) = rss(pid);
    stop(child);
    println!(
        "idle: RSS {:.1} MiB, CPU {:.3} s over 10 s ({:.2} %)",
        rss_now as f64 / 1024.0,
        ticks as f64 / hz,
        ticks as f64 / hz / 10.0 * 100.0
    );
}

fn run_tasks(t: &Tree, n: usize, workdir: &str) -> f64 {
    for i in 0..n {
        t.drop_ready(
            &format!("d{workdir}{i:04}"),
            &format!("description: no-op\nworkdir: {workdir}\n"),
        );
    }
    let t0 = Instant::now();
    let mut c = t.start(&["--once"]);
    let _ = c.wait();
    t0.elapsed().as_secs_f64()
}

fn diff(files: usize, tasks: usize) {
    // One slot, so each task's snapshot and diff sit on the critical path.
    let t = Tree::new(
        &config(true, "true", "[]", "").replace("max_concurrent: 8", "max_concurrent: 1"),
    );
    std::fs::create_dir_all(t.p("empty")).expect("mkdir");
    for i in 0..files {
        let d = t.p(&format!("big/d{:03}", i / 100));
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(
            d.join(format!("f{i:05}.txt")),
            format!("line {i}\n").repeat(20),
        )
        .expect("w");
    }
    let small = run_tasks(&t, tasks, "empty");
    let big = run_tasks(&t, tasks, "big");
    println!(
        "diff capture: {tasks} tasks on an empty workdir {:.1} ms/task, on {files} files {:.1} ms/task: {:.1} ms/task for snapshot + diff",
        small / tasks as f64 * 1000.0,
        big / tasks as f64 * 1000.0,
        (big - small) / tasks as f64 * 1000.0
    );
}

fn git(dir: &std::path::Path, args: &[&str]) {
    let ok = Command::new("git")
        .args(["-c", "user.name=b", "-c", "user.email=b@b"])
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .status()
        .expect("git")
        .success();
    assert!(ok, "git {args:?}");
}

/// Per-task cost of isolation on a git repository of `files` files (one slot, `tasks` tasks whose
/// agent writes one file), beside a bare `git worktree add` + `remove` of the same repository, and
/// throughput of no-op tasks with and without isolation. Each setting runs `rounds` times,
/// alternating, since this machine is noisy.
fn isolation(files: usize, tasks: usize, rounds: usize) {
    let writer = r#"sh"#;
    let write_args = r#"[-c, "echo $$ > f$$.txt"]"#;
    let make = |isolation: &str, pool: u64, slots: usize, cmd: &str, args: &str| {
        let extra = format!("workspace: {{isolation: {isolation}, pool_idle_seconds: {pool}}}\n");
        let t = Tree::new(
            &config(true, cmd, args, &extra)
                .replace("max_concurrent: 8", &format!("max_concurrent: {slots}")),
        );
        let repo = t.p("repo");
        for i in 0..files {
            let d = repo.join(format!("src/d{:03}", i / 100));
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(
                d.join(format!("f{i:05}.rs")),
                format!("// {i}\n").repeat(30),
            )
            .expect("w");
        }
        std::fs::write(repo.join(".gitignore"), "target/\n").expect("w");
        git(&repo, &["init", "-q"]);
        git(&repo, &["add", "."]);
        git(&repo, &["commit", "-qm", "init"]);
        std::fs::create_dir_all(t.p("plain")).expect("mkdir");
        t
    };
    // The bare git cost, on a repository of the same shape.
    let t = make("worktree", 60, 1, "true", "[]");
    let mut bare = vec![];
    for i in 0..5 {
        let wt = t.p(&format!("bare-wt-{i}"));
        let t0 = Instant::now();
        git(
            &t.p("repo"),
            &[
                "worktree",
                "add",
                "-q",
                "--detach",
                wt.to_str().expect("utf-8 path"),
                "HEAD",
            ],
        );
        git(
            &t.p("repo"),
            &[
                "worktree",
                "remove",
                "--force",
                wt.to_str().expect("utf-8 path"),
            ],
        );
        bare.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    summary(
        &format!("git worktree add + remove, {files} files"),
        &mut bare,
    );
    for round in 1..=rounds {
        // (label, isolation, pool seconds, workdir)
        for (label, iso, pool, wd) in [
            ("not isolated, workdir outside git", "auto", 60, "plain"),
            ("worktree, pool (new)", "worktree", 60, "repo"),
            ("worktree, no pool (as before)", "worktree", 0, "repo"),
        ] {
            let t = make(iso, pool, 1, writer, write_args);
            let secs = run_tasks(&t, tasks, wd);
            let left = std::fs::read_dir(t.p(".orchestrate/worktrees"))
                .map(|rd| rd.flatten().count())
                .unwrap_or(0);
            println!(
                "round {round}: {label}: {tasks} tasks writing one file each, one slot: {:.1} ms/task (worktree folders left: {left})",
                secs / tasks as f64 * 1000.0
            );
        }
        for (label, iso, pool, wd) in [
            ("not isolated", "auto", 60, "plain"),
            ("worktree, pool", "worktree", 60, "repo"),
            ("worktree, no pool", "worktree", 0, "repo"),
        ] {
            let n = 2 * tasks;
            let t = make(iso, pool, 8, "true", "[]");
            let secs = run_tasks(&t, n, wd);
            println!(
                "round {round}: throughput, {label}: {n} no-op tasks, 8 slots: {:.1} tasks/s",
                n as f64 / secs
            );
        }
    }
}

/// The supervisor's own cost of a fan-out: `units` fan-outs of 3 candidates (agents a, b, c, each
/// writing one file at once) against `3 × units` separate isolated tasks on the same agents, in a
/// git repository of 100 files, 3 slots; `rounds` rounds, alternating (this machine is noisy).
fn fan_out(units: usize, rounds: usize) {
    let agent = |name: &str| {
        format!(
            "  {name}: {{kind: command, command: sh, args: [-c, \"echo $$ > f$$.txt\"], max_instances: 3}}\n"
        )
    };
    let make = || {
        let t = Tree::new(&format!(
            "orchestrator: {{max_concurrent: 3, durable: true, log_level: warn, rescan_seconds: 3600}}\n\
             agents:\n{}{}{}routing: {{fallback: [a]}}\n\
             workspace: {{isolation: worktree}}\n",
            agent("a"),
            agent("b"),
            agent("c")
        ));
        let repo = t.p("repo");
        for i in 0..100 {
            let d = repo.join(format!("src/d{}", i / 10));
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join(format!("f{i}.rs")), format!("// {i}\n")).expect("w");
        }
        git(&repo, &["init", "-q"]);
        git(&repo, &["add", "."]);
        git(&repo, &["commit", "-qm", "init"]);
        t
    };
    let run = |t: &Tree, files: &[(String, String)]| {
        for (name, body) in files {
            t.drop_ready(name, body);
        }
        let t0 = Instant::now();
        let mut c = t.start(&["--once"]);
        let _ = c.wait();
        t0.elapsed().as_secs_f64()
    };
    for round in 1..=rounds {
        let t = make();
        let separate: Vec<(String, String)> = (0..units)
            .flat_map(|u| {
                ["a", "b", "c"].map(|a| {
                    (
                        format!("s{u:03}{a}"),
                        format!("description: no-op\nworkdir: repo\nagent: {a}\n"),
                    )
                })
            })
            .collect();
        let secs = run(&t, &separate);
        println!(
            "round {round}: {} separate tasks (3 per unit, each landing its file): {:.1} ms per 3 tasks, {:.1} tasks/s (completed {})",
            3 * units,
            secs / units as f64 * 1000.0,
            (3 * units) as f64 / secs,
            t.count("tasks/completed")
        );
        for pick in ["first_pass", "all"] {
            let t = make();
            let fans: Vec<(String, String)> = (0..units)
                .map(|u| {
                    (
                        format!("f{u:03}"),
                        format!(
                            "description: no-op\nworkdir: repo\nfan_out: [a, b, c]\npick: {pick}\n"
                        ),
                    )
                })
                .collect();
            let secs = run(&t, &fans);
            println!(
                "round {round}: {units} fan-outs of 3, pick {pick}: {:.1} ms per fan-out, {:.1} candidates/s (results {})",
                secs / units as f64 * 1000.0,
                (3 * units) as f64 / secs,
                t.count("tasks/completed") + t.count("tasks/failed")
            );
        }
    }
}

/// Drop → event received by clients of `orchestrate serve`'s event stream (`/api/v1/events`), and
/// the server's RSS and CPU while `clients` clients follow `tasks` no-op tasks dropped one every 5 ms.
fn sse(clients: usize, tasks: usize) {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let t = Tree::new(&config(true, "true", "[]", ""));
    let sup = t.start(&[]);
    let mut serve = Command::new(BIN)
        .arg("-C")
        .arg(&t.root)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let mut line = String::new();
    BufReader::new(serve.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("the server says where it listens");
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .expect("listening on ...")
        .to_string();
    // Per task and state, when client 0 first saw it; every client counts what it got.
    type Seen = HashMap<(String, String), Instant>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let mut readers = vec![];
    for c in 0..clients {
        let (addr, seen, done) = (addr.clone(), seen.clone(), done.clone());
        readers.push(std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(&addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
            write!(
                s,
                "GET /api/v1/events?since=0 HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
            )
            .expect("request");
            let mut r = BufReader::new(s);
            let mut events = 0usize;
            let mut buf = String::new();
            while !done.load(Ordering::Relaxed) {
                buf.clear();
                match r.read_line(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(_) => continue,
                }
                let Some(data) = buf.trim_end().strip_prefix("data: ") else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
                    continue;
                };
                events += 1;
                if c == 0 {
                    let key = (
                        v["task_id"].as_str().unwrap_or_default().to_string(),
                        v["state"].as_str().unwrap_or_default().to_string(),
                    );
                    seen.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(key)
                        .or_insert_with(Instant::now);
                }
            }
            events
        }));
    }
    let (cpu0, t0) = (cpu_ticks(serve.id()), Instant::now());
    let mut dropped = HashMap::new();
    for i in 0..tasks {
        let id = format!("s{i:05}");
        let tmp = t.p(&format!("{id}.tmp"));
        std::fs::write(&tmp, "description: no-op\n").expect("write");
        std::fs::rename(&tmp, t.p(&format!("tasks/pending/{id}.yaml"))).expect("rename");
        dropped.insert(id, Instant::now());
        std::thread::sleep(Duration::from_millis(5));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let completed = |seen: &Seen| seen.keys().filter(|(_, st)| st == "completed").count();
    while completed(&seen.lock().unwrap_or_else(|e| e.into_inner())) < tasks
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(serve.id()) - cpu0) as f64 / 100.0;
    let (_, hwm) = rss(serve.id());
    // The other clients poll on their own clocks: a moment to catch up before they stop.
    std::thread::sleep(Duration::from_secs(2));
    done.store(true, Ordering::Relaxed);
    let counts: Vec<usize> = readers.into_iter().map(|h| h.join().unwrap_or(0)).collect();
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    let mut first = vec![];
    let mut last = vec![];
    for (id, at) in &dropped {
        if let Some(s) = seen.get(&(id.clone(), "pending".into())) {
            first.push(s.duration_since(*at).as_secs_f64() * 1000.0);
        }
        if let Some(s) = seen.get(&(id.clone(), "completed".into())) {
            last.push(s.duration_since(*at).as_secs_f64() * 1000.0);
        }
    }
    println!(
        "sse: {clients} clients, {tasks} tasks; {} of {tasks} seen pending, {} completed",
        first.len(),
        last.len()
    );
    if !first.is_empty() {
        summary("sse: drop -> `pending` event at a client", &mut first);
    }
    if !last.is_empty() {
        summary("sse: drop -> `completed` event at a client", &mut last);
    }
    println!(
        "sse: server RSS peak {} MiB, CPU {:.1} s over {:.1} s ({:.0}% of one core); events per client min {} max {}",
        hwm / 1024,
        cpu,
        secs,
        cpu / secs * 100.0,
        counts.iter().min().copied().unwrap_or(0),
        counts.iter().max().copied().unwrap_or(0)
    );
    let _ = serve.kill();
    let _ = serve.wait();
    stop(sup);
}

fn which(p: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(p))
        .find(|p| p.is_file())
}

fn pueue(n: usize) {
    let (Some(pueue), Some(pueued)) = (which("pueue"), which("pueued")) else {
        println!("pueue: not on PATH (cargo install pueue), skipped");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("pueue.yml");
    // pueued creates its data directory but not its runtime directory.
    std::fs::create_dir_all(dir.path().join("run")).expect("mkdir");
    std::fs::write(
        &cfg,
        format!(
            "shared:\n  pueue_directory: {0}/data\n  runtime_directory: {0}/run\n  use_unix_socket: true\n  unix_socket_path: {0}/pueue.sock\ndaemon:\n  callback: null\n",
            dir.path().display()
        ),
    )
    .expect("cfg");
    let run = |args: &[&str]| {
        Command::new(&pueue)
            .arg("-c")
            .arg(&cfg)
            .args(args)
            .output()
            .expect("pueue")
    };
    let mut daemon = Command::new(&pueued)
        .arg("-c")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pueued");
    let t0 = Instant::now();
    while !run(&["status"]).status.success() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "pueued did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(run(&["parallel", "8"]).status.success());
    // add → started latency, one at a time.
    let mut lat = Vec::new();
    for i in 0..50 {
        let marker = dir.path().join(format!("started{i}"));
        let t0 = Instant::now();
        assert!(
            run(&["add", "--", "touch", marker.to_str().expect("utf8")])
                .status
                .success()
        );
        while !marker.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "pueue task did not start"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    summary("pueue add → started", &mut lat);
    assert!(run(&["clean"]).status.success());
    let t0 = Instant::now();
    for _ in 0..n {
        assert!(run(&["add", "--", "true"]).status.success());
    }
    let added = t0.elapsed().as_secs_f64();
    loop {
        let out = run(&["status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let done = v["tasks"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter(|t| t["status"].get("Done").is_some())
                    .count()
            })
            .unwrap_or(0);
        if done >= n {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "pueue did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "pueue: {n} no-op tasks in {secs:.2} s = {:.1} tasks/s (adding them took {added:.2} s)",
        n as f64 / secs
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    if want("throughput") {
        throughput(5000);
    }
    if want("latency") {
        latency(1000);
    }
    if want("reads") {
        reads();
    }
    if want("startup") {
        startup(100_000);
    }
    if want("idle") {
        idle();
    }
    if want("diff") {
        diff(10_000, 50);
    }
    if want("isolation") {
        isolation(10_000, 20, 2);
    }
    if want("fanout") {
        fan_out(20, 3);
    }
    if want("sse") {
        sse(20, 1000);
    }
    if want("pueue") {
        pueue(300);
    }
    KEEP.lock().unwrap_or_else(|e| e.into_inner()).clear();
}
