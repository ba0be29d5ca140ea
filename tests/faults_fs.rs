//! Faults in the files orchestrate reads after a task ran: a workdir holding a FIFO, a workdir the
//! task replaced with a symlink out of the project, a read that never returns, and a task that
//! changed 200,000 files. The real binary, real files, real `sh` tasks.
//!
//! Every case prints one line `RELIABILITY faults_fs <case>: thrown N, lost L[, ...]` (L must be 0)
//! for RELIABILITY.md; `cargo nextest run --test faults_fs --no-capture` shows them. A task is
//! "lost" when it did not end where it must (completed, cancelled in `failed/`, or back in
//! `pending/` after a stop) or when orchestrate cannot read it back.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// Print the figures for RELIABILITY.md, then insist nothing was lost.
#[track_caller]
fn report(case: &str, thrown: usize, lost: usize, more: &str) {
    eprintln!("RELIABILITY faults_fs {case}: thrown {thrown}, lost {lost}{more}");
    assert_eq!(lost, 0, "{case}: {lost} of {thrown} lost");
}

/// The test configuration with an `sh` agent running each task's description as a shell command.
/// `security` lines go right after its `env_allow`; other sections after them.
fn sh_config(security: &str, sections: &str) -> String {
    test_config(&format!("{security}{sections}")).replace(
        "routing:",
        "  sh:\n    kind: command\n    command: sh\n    args: [-c, \"{description}\"]\n    max_instances: 4\nrouting:",
    )
}

/// A task file for the `sh` agent: `script` as a YAML block, in `workdir`.
fn sh_task(script: &str, workdir: &str) -> String {
    format!("description: |\n  {script}\nagent: sh\nworkdir: {workdir}\n")
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `id` completed, exactly once.
fn completed_once(p: &Project, id: &str) -> bool {
    p.tasks_in("completed").iter().any(|t| t == id)
        && p.result("completed", id)["attempts"]
            .as_array()
            .map(Vec::len)
            == Some(1)
}

/// Every file under `dir`, recursively (symlinks not followed).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let t = e.file_type().expect("file type");
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// Run an orchestrate command whose output may be larger than a pipe holds (`show` prints the whole
/// diff): its stdout goes to a file, and the wait is bounded.
fn run_to_file(p: &Project, args: &[&str]) -> serde_json::Value {
    let out = p.path(&format!("out-{}.json", std::process::id()));
    let mut child = p
        .cmd(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out).expect("create"))
        .spawn()
        .expect("spawn orchestrate");
    let status = wait_child(&mut child, Duration::from_secs(120)).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("orchestrate {args:?} did not finish within 120 s")
    });
    assert!(status.success(), "orchestrate {args:?}: {status}");
    let text = std::fs::read(&out).expect("read output");
    std::fs::remove_file(&out).expect("rm");
    serde_json::from_slice(&text).expect("json")
}

// ---- a FIFO in the workdir ------------------------------------------------------------------------

#[test]
fn a_fifo_in_the_workdir_is_listed_never_read_and_the_workdir_stays_usable() {
    let p = Project::with_config(&sh_config("", ""));
    std::fs::create_dir(p.path("w")).expect("mkdir");
    let mut sup = p.start();
    // The FIFO has no writer: a diff that opened it to read would wait forever.
    p.drop_task(
        "mk.yaml",
        &sh_task("mkfifo pipe && echo made > made.txt", "w"),
    );
    wait_for("mk completed", Duration::from_secs(60), || {
        p.tasks_in("completed").contains(&"mk".to_string())
    });
    // The next task in the same workdir: its snapshot walks past the FIFO before the agent starts.
    p.drop_task("next.yaml", &sh_task("echo two > two.txt", "w"));
    wait_for("next completed", Duration::from_secs(60), || {
        p.tasks_in("completed").contains(&"next".to_string())
    });
    // A long task there: the cancel reaches it.
    p.drop_task(
        "long.yaml",
        &sh_task("echo $$ > ../long.pid; exec sleep 60", "w"),
    );
    wait_for("long running", Duration::from_secs(60), || {
        p.path("long.pid").exists()
    });
    p.run(&["cancel", "long"]).assert_code(0);
    let long_pid = read_pid(&p.path("long.pid"));
    // And so does a stop: the task goes back to pending/.
    p.drop_task(
        "held.yaml",
        &sh_task("echo $$ > ../held.pid; exec sleep 60", "w"),
    );
    wait_for("held running", Duration::from_secs(60), || {
        p.path("held.pid").exists()
    });
    let t = Instant::now();
    assert!(sup.stop().success(), "{}", sup.output());
    let stop_s = t.elapsed().as_secs_f64();

    let mut lost = 0;
    let mk = p.result("completed", "mk");
    if ids(&mk["files_modified"]) != ["made.txt", "pipe"] {
        eprintln!("mk: {mk}");
        lost += 1;
    }
    let diff = p.read("context/diffs/mk.diff");
    assert!(diff.contains("pipe is a FIFO (not read)"), "{diff}");
    assert!(diff.contains("+made"), "{diff}");
    let next = p.result("completed", "next");
    if ids(&next["files_modified"]) != ["two.txt"] {
        eprintln!("next: {next}");
        lost += 1;
    }
    let cancelled = p.result("failed", "long");
    if cancelled["attempts"][0]["outcome"] != "cancelled" || !process_gone(long_pid) {
        eprintln!("long: {cancelled}");
        lost += 1;
    }
    if p.tasks_in("pending") != ["held"] {
        eprintln!("held not back in pending/: {:?}", p.tree_states());
        lost += 1;
    }
    lost += ["mk", "next"]
        .iter()
        .filter(|id| !completed_once(&p, id))
        .count();
    report(
        "fifo-in-workdir",
        4,
        lost,
        &format!(", stop took {stop_s:.1} s"),
    );
}

// ---- a read that never returns ----------------------------------------------------------------------

/// A hung file system, played by a pause point: the first read of a walk (`snapshot.read` or
/// `diff.read`) does not return for ten minutes.
fn stuck_at(point: &str) -> [(&str, &str); 2] {
    [
        ("ORCHESTRATE_PAUSE_AT", point),
        ("ORCHESTRATE_PAUSE_MS", "600000"),
    ]
}

/// Start a supervisor with a log of its own: every start of a test appends to one log file, and
/// the harness waits for words an earlier supervisor wrote there already.
fn start_afresh(p: &Project, env: &[(&str, &str)]) -> Supervisor {
    let log = p.path(&format!("supervisor-{}.log", std::process::id()));
    if let Ok(old) = std::fs::read(&log) {
        let mut all = std::fs::read(p.path("earlier.log")).unwrap_or_default();
        all.extend(old);
        std::fs::write(p.path("earlier.log"), all).expect("keep the earlier log");
        std::fs::remove_file(&log).expect("rm log");
    }
    p.start_with_env(env)
}

#[test]
fn a_read_that_never_returns_holds_neither_the_slot_nor_a_cancel_nor_a_stop() {
    let p = Project::with_config(&sh_config("", "context:\n  max_diff_seconds: 1\n"));
    std::fs::create_dir(p.path("w")).expect("mkdir");
    std::fs::write(p.path("w/old.txt"), "old\n").expect("write");
    let mut lost = 0;

    // The diff is stuck: the attempt gives up on it after its time (1 s + 5 s), the task completes,
    // its diff says why, and the next task runs.
    let mut sup = start_afresh(&p, &stuck_at("diff.read"));
    p.drop_task("d.yaml", &sh_task("echo new > new.txt", "w"));
    wait_for("d completed", Duration::from_secs(60), || {
        p.tasks_in("completed").contains(&"d".to_string())
    });
    p.drop_task("after.yaml", &sh_task("echo after", "."));
    wait_for("after completed", Duration::from_secs(60), || {
        p.tasks_in("completed").contains(&"after".to_string())
    });
    assert!(sup.stop().success(), "{}", sup.output());
    let diff = p.read("context/diffs/d.diff");
    assert!(
        diff.contains(
            "the diff was not finished: the diff did not finish within 1 s (context.max_diff_seconds, plus 5 s): a read in the workdir is stuck, at `new.txt`"
        ),
        "{diff}"
    );

    // Stuck again, and the supervisor asked to stop meanwhile: the diff gets the kill grace period
    // (1 s), then the supervisor leaves it; the agent's work is done, so the task completes.
    let mut sup = start_afresh(&p, &stuck_at("diff.read"));
    p.drop_task("e.yaml", &sh_task("echo e > e.txt", "w"));
    wait_for("e's diff stuck", Duration::from_secs(60), || {
        sup.output().contains("paused at diff.read")
    });
    let t = Instant::now();
    assert!(sup.stop().success(), "{}", sup.output());
    let stop_diff_s = t.elapsed().as_secs_f64();
    let diff = p.read("context/diffs/e.diff");
    assert!(
        diff.contains(
            "the diff was not finished: the supervisor was stopping while the diff ran, at `e.txt`"
        ),
        "{diff}"
    );

    // A read slower than the budget, but one that returns: the walk stops at its budget and the
    // diff says where.
    let mut sup = start_afresh(
        &p,
        &[
            ("ORCHESTRATE_PAUSE_AT", "diff.read"),
            ("ORCHESTRATE_PAUSE_MS", "2500"),
        ],
    );
    p.drop_task("slow.yaml", &sh_task("echo a > a.txt; echo b > b.txt", "w"));
    wait_for("slow completed", Duration::from_secs(60), || {
        p.tasks_in("completed").contains(&"slow".to_string())
    });
    assert!(sup.stop().success(), "{}", sup.output());
    let diff = p.read("context/diffs/slow.diff");
    assert!(
        diff.starts_with(
            "# the diff was cut short: it took longer than 1 s (context.max_diff_seconds) and stopped at `"
        ),
        "{diff}"
    );

    // The snapshot is stuck: a cancel ends the attempt at once; the agent never starts.
    let mut sup = start_afresh(&p, &stuck_at("snapshot.read"));
    p.drop_task("c.yaml", &sh_task("echo ran > ran_c.txt", "w"));
    wait_for("c's snapshot stuck", Duration::from_secs(60), || {
        sup.output().contains("paused at snapshot.read")
    });
    let t = Instant::now();
    p.run(&["cancel", "c"]).assert_code(0);
    let cancel_s = t.elapsed().as_secs_f64();
    assert!(sup.stop().success(), "{}", sup.output());
    let c = p.result("failed", "c");
    if c["attempts"][0]["outcome"] != "cancelled" || p.path("w/ran_c.txt").exists() {
        eprintln!("c: {c}");
        lost += 1;
    }

    // Stuck again: a stop does not wait for it; the task goes back to pending/ and runs later.
    let mut sup = start_afresh(&p, &stuck_at("snapshot.read"));
    p.drop_task("s.yaml", &sh_task("echo ran > ran_s.txt", "w"));
    wait_for("s's snapshot stuck", Duration::from_secs(60), || {
        sup.output().contains("paused at snapshot.read")
    });
    let t = Instant::now();
    assert!(sup.stop().success(), "{}", sup.output());
    let stop_snapshot_s = t.elapsed().as_secs_f64();
    assert_eq!(p.tasks_in("pending"), ["s"], "{:?}", p.tree_states());
    assert!(!p.path("w/ran_s.txt").exists());
    p.run(&["start", "--once"]).assert_code(0);
    let s = p.result("completed", "s");
    let outcomes: Vec<&str> = s["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .filter_map(|a| a["outcome"].as_str())
        .collect();
    if outcomes != ["interrupted", "completed"] || !p.path("w/ran_s.txt").exists() {
        eprintln!("s: {s}");
        lost += 1;
    }
    lost += ["d", "after", "e", "slow"]
        .iter()
        .filter(|id| !completed_once(&p, id))
        .count();
    assert_eq!(p.mirror_states(), p.tree_states());
    report(
        "stuck-read",
        6,
        lost,
        &format!(
            ", stop with a stuck diff {stop_diff_s:.1} s, cancel with a stuck snapshot {cancel_s:.1} s, stop with a stuck snapshot {stop_snapshot_s:.1} s"
        ),
    );
}

// ---- a workdir replaced by a symlink ----------------------------------------------------------------

#[test]
fn a_workdir_swapped_for_a_symlink_out_is_not_diffed_and_nothing_outside_is_read() {
    let p = Project::with_config(&sh_config("", ""));
    let outside = tempfile::tempdir().expect("tempdir");
    let secret = "OUTSIDE-SECRET-7731";
    std::fs::write(outside.path().join("secret.txt"), secret).expect("write");
    std::fs::create_dir(outside.path().join("deeper")).expect("mkdir");
    std::fs::write(outside.path().join("deeper/more.txt"), secret).expect("write");
    for w in ["w", "w2", "w3"] {
        std::fs::create_dir(p.path(w)).expect("mkdir");
    }
    let out = outside.path().display().to_string();
    // The workdir renamed away and a symlink out of the project in its place.
    p.drop_task(
        "swap.yaml",
        &sh_task(&format!("cd .. && mv w w.orig && ln -s {out} w"), "w"),
    );
    // The same with the whole file system: a walk of it would read devices and hang.
    p.drop_task(
        "root.yaml",
        &sh_task("cd .. && mv w2 w2.orig && ln -s / w2", "w2"),
    );
    // Links made inside the workdir: recorded as links, never followed.
    p.drop_task(
        "links.yaml",
        &sh_task(
            &format!("ln -s {out}/secret.txt link && mkdir sub && ln -s {out} sub/out"),
            "w3",
        ),
    );
    let t = Instant::now();
    p.run(&["start", "--once"]).assert_code(0);
    let run_s = t.elapsed().as_secs_f64();

    let mut lost = ["swap", "root", "links"]
        .iter()
        .filter(|id| !completed_once(&p, id))
        .count();
    let mut diff_bytes = 0;
    for id in ["swap", "root"] {
        let diff = p.read(&format!("context/diffs/{id}.diff"));
        diff_bytes = diff_bytes.max(diff.len());
        let r = p.result("completed", id);
        if !diff.starts_with("# the workdir was replaced during the run; not diffed (")
            || diff.len() > 4096
            || !ids(&r["files_modified"]).is_empty()
        {
            eprintln!("{id}: {r}\n{diff}");
            lost += 1;
        }
    }
    let links = p.read("context/diffs/links.diff");
    assert!(
        links.contains(&format!("Symbolic link link → {out}/secret.txt"))
            && links.contains(&format!("Symbolic link sub/out → {out}")),
        "{links}"
    );
    let leaked: Vec<PathBuf> = files_under(&p.path("context"))
        .into_iter()
        .filter(|f| {
            std::fs::read(f)
                .map(|b| String::from_utf8_lossy(&b).contains(secret))
                .unwrap_or(false)
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "the secret outside was copied into {leaked:?}"
    );
    report(
        "workdir-replaced",
        3,
        lost,
        &format!(", largest diff {diff_bytes} bytes, run {run_s:.1} s"),
    );
}

// ---- a task that changes 200,000 files ---------------------------------------------------------

/// A folder on a memory file system when there is one (200,000 files on ext4 cost minutes of
/// journal on a busy 2-core machine; on tmpfs seconds), else the temp folder.
fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("orchestrate-faults-")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("scratch dir")
}

#[test]
fn a_task_that_changes_200000_files_completes_and_stays_visible() {
    const DIRS: usize = 200;
    const PER_DIR: usize = 1000;
    const N: usize = DIRS * PER_DIR;
    let scratch = scratch_dir();
    let scratch_path = scratch.path().canonicalize().expect("canonical");
    std::fs::create_dir(scratch_path.join("w")).expect("mkdir");
    let p = Project::with_config(&sh_config(
        &format!("  workspace_roots: [., {}]\n", scratch_path.display()),
        "",
    ));
    let script = format!(
        "d=0; while [ $d -lt {DIRS} ]; do mkdir d$d; f=0; while [ $f -lt {PER_DIR} ]; do : > d$d/f$f; f=$((f+1)); done; d=$((d+1)); done"
    );
    let mut sup = p.start();
    let t = Instant::now();
    p.drop_task(
        "many.yaml",
        &format!(
            "{}timeout_minutes: 10\n",
            sh_task(&script, &scratch_path.join("w").display().to_string())
        ),
    );
    wait_for("many completed", Duration::from_secs(600), || {
        p.tasks_in("completed").contains(&"many".to_string()) || !p.tasks_in("failed").is_empty()
    });
    let took_s = t.elapsed().as_secs_f64();
    // The final reconcile reads every result back from the tree.
    assert!(sup.stop().success(), "{}", sup.output());

    let mut lost = 0;
    let result_text = p.read("tasks/completed/many_result.yaml");
    let r = yaml_to_json(&result_text);
    let listed = r["files_modified"].as_array().map_or(0, Vec::len);
    if listed != 1000
        || r["files_modified_total"] != N
        || r["files_modified_file"] != "context/diffs/many.files.txt"
    {
        eprintln!(
            "result lists {listed} files, total {}, file {}",
            r["files_modified_total"], r["files_modified_file"]
        );
        lost += 1;
    }
    let list = p.read("context/diffs/many.files.txt");
    let lines: std::collections::BTreeSet<&str> = list.lines().collect();
    assert_eq!(list.lines().count(), N, "one line per file");
    assert_eq!(lines.len(), N, "no file listed twice");
    for d in 0..DIRS {
        for f in [0, PER_DIR - 1] {
            assert!(lines.contains(format!("d{d}/f{f}").as_str()), "d{d}/f{f}");
        }
    }
    // Visible everywhere a user looks.
    let tasks = p.run(&["tasks", "--json"]).assert_code(0).json();
    let row = tasks
        .as_array()
        .and_then(|a| a.iter().find(|t| t["id"] == "many"))
        .cloned();
    if row.as_ref().map(|r| r["state"].clone()) != Some("completed".into()) {
        eprintln!("tasks: {tasks}");
        lost += 1;
    }
    let shown = run_to_file(&p, &["show", "many", "--json"]);
    if shown["state"] != "completed" || shown["result"]["files_modified_total"] != N {
        eprintln!(
            "show: state {} result {}",
            shown["state"], shown["result"]["files_modified_total"]
        );
        lost += 1;
    }
    let status = p.run(&["status", "--json"]).assert_code(0).json();
    if status["counts"]["completed"] != 1 {
        eprintln!("status: {status}");
        lost += 1;
    }
    let completed: serde_json::Value =
        serde_json::from_str(&p.read("context/completed_tasks.json")).expect("json");
    let entry = completed
        .as_array()
        .and_then(|a| a.iter().find(|e| e["id"] == "many"))
        .cloned()
        .unwrap_or_default();
    if entry["files_modified"].as_array().map(Vec::len) != Some(1000)
        || entry["files_modified_total"] != N
    {
        eprintln!("completed_tasks.json: {entry}");
        lost += 1;
    }
    assert_eq!(p.mirror_states(), p.tree_states());
    let diff_mib = std::fs::metadata(p.path("context/diffs/many.diff"))
        .map(|m| m.len())
        .unwrap_or(0) as f64
        / 1048576.0;
    report(
        "200000-files",
        1,
        lost,
        &format!(
            ", {N} files changed, task to completed {took_s:.1} s, result {} KiB, diff {diff_mib:.1} MiB",
            result_text.len() / 1024
        ),
    );
}
