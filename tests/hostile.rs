//! Hostile and accidental input: what editors, git, sync clients, phones, attackers and misbehaving
//! agents throw at `tasks/pending/`, against the real binary, real files and real processes.
//!
//! Every case prints one line `RELIABILITY hostile <case>: thrown N, lost L` (L must be 0) so
//! RELIABILITY.md can quote the figures; `cargo nextest run --test hostile --no-capture` shows them.
//! A task is "lost" when it did not end where it must: completed exactly once, or in `failed/` with
//! an explanation, or in `quarantine/` with a reason, or (for files that are not tasks) left alone.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::*;

/// Print the figures for RELIABILITY.md, then insist nothing was lost.
#[track_caller]
fn report(case: &str, thrown: usize, lost: usize) {
    eprintln!("RELIABILITY hostile {case}: thrown {thrown}, lost {lost}");
    assert_eq!(lost, 0, "{case}: {lost} of {thrown} lost");
}

/// The test configuration with `orchestrator:` keys replaced or added.
fn config_with(orch: &[(&str, &str)], extra: &str) -> String {
    let mut c = test_config(extra);
    for (k, v) in orch {
        let key = format!("  {k}: ");
        match c.lines().find(|l| l.starts_with(&key)) {
            Some(line) => c = c.replacen(line, &format!("{key}{v}"), 1),
            None => c = c.replacen("orchestrator:\n", &format!("orchestrator:\n{key}{v}\n"), 1),
        }
    }
    c
}

#[track_caller]
fn assert_alive(sup: &mut Supervisor) {
    let status = sup
        .child
        .as_mut()
        .expect("running")
        .try_wait()
        .expect("try_wait");
    assert!(
        status.is_none(),
        "supervisor died ({status:?}):\n{}",
        sup.output()
    );
}

/// Peak resident memory of a process (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM");
    kb / 1024
}

/// Direct children of a process (all threads), with their state letter.
fn children(pid: u32) -> Vec<(u32, char)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in rd.flatten() {
        let list = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for c in list
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            let state = std::fs::read_to_string(format!("/proc/{c}/stat"))
                .ok()
                .and_then(|s| s.rsplit(')').next().and_then(|r| r.trim().chars().next()))
                .unwrap_or('?');
            out.push((c, state));
        }
    }
    out
}

/// Live processes whose environment carries an `ORCHESTRATE_RUN` marker for one of `ids`.
fn marked_processes(ids: &[&str]) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        for var in env.split(|&b| b == 0) {
            let var = String::from_utf8_lossy(var);
            if let Some(m) = var.strip_prefix("ORCHESTRATE_RUN=")
                && ids.iter().any(|id| m.contains(&format!("/{id}/")))
                && !process_gone(pid)
            {
                found.push((pid, m.to_string()));
            }
        }
    }
    found
}

/// How many times a result file says the task was attempted.
fn attempts_in(p: &Project, state: &str, id: &str) -> usize {
    p.read(&format!("tasks/{state}/{id}_result.yaml"))
        .lines()
        .filter(|l| l.trim_start().starts_with("outcome:"))
        .count()
}

/// Write a file in place the way a plain `open(O_TRUNC)`, write, close does (no rename).
fn write_in_place(path: &Path, content: &[u8]) {
    let mut f = std::fs::File::create(path).expect("create");
    f.write_all(content).expect("write");
}

fn append(path: &Path, chunk: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open for append");
    f.write_all(chunk.as_bytes()).expect("append");
}

fn set_mtime(path: &Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(t))
        .expect("set mtime");
}

/// Ids that completed exactly once with a single attempt; the rest are counted as lost.
fn lost_unless_completed_once(p: &Project, ids: &[&str]) -> usize {
    not_completed_once(p, ids).len()
}

/// The ids that are not in `completed/` with a single attempt.
fn not_completed_once<'a>(p: &Project, ids: &[&'a str]) -> Vec<&'a str> {
    let done = p.tasks_in("completed");
    ids.iter()
        .filter(|id| !(done.iter().any(|d| d == *id) && attempts_in(p, "completed", id) == 1))
        .copied()
        .collect()
}

// ---- editors, git, sync clients, phones ------------------------------------------------------------

#[test]
fn slow_writers_and_truncate_then_write_saves_are_read_once_complete() {
    let p = Project::new(); // settle_ms: 100
    std::fs::create_dir_all(p.path("counts")).expect("mkdir");
    let mut sup = p.start();
    let pending = p.path("tasks/pending");

    // A writer holding the file open and appending in chunks, each pause shorter than settle_ms. Every
    // intermediate state is invalid (an open quote), so reading one early would show.
    let held = pending.join("held.yaml");
    let mut f = std::fs::File::create(&held).expect("create");
    for chunk in [
        "descr",
        "iption: \"@fake fail-until=counts/held:1 ",
        "print=held",
        "_open",
        "_to_the_end",
        "\"\n",
    ] {
        f.write_all(chunk.as_bytes()).expect("write");
        f.flush().expect("flush");
        std::thread::sleep(Duration::from_millis(40));
    }
    drop(f);

    // `echo >> x.yaml` in a loop: each chunk opens, appends and closes, so every chunk ends with a
    // close-write on a file that is not complete yet.
    let appended = pending.join("appended.yaml");
    for chunk in [
        "description: \"@fake fail-until=counts/appended:1",
        " print=appended",
        "_in",
        "_chunks",
        "\"\n",
    ] {
        append(&appended, chunk);
        std::thread::sleep(Duration::from_millis(40));
    }

    // VS Code style save of a task still waiting in pending/: truncate (the file is empty for a moment,
    // and closed), then write the new content.
    let vsc = pending.join("vscode.yaml");
    p.drop_task(
        "vscode.yaml",
        "description: \"@fake print=old_version\"\ndependencies: [vscode_gate]\n",
    );
    wait_for("vscode queued", Duration::from_secs(10), || {
        sup.output().contains("queued     vscode")
    });
    write_in_place(&vsc, b"");
    std::thread::sleep(Duration::from_millis(30));
    write_in_place(
        &vsc,
        b"description: \"@fake fail-until=counts/vscode:1 print=new_version\"\n",
    );

    let ids = ["appended", "held", "vscode"];
    wait_for("all three completed", Duration::from_secs(20), || {
        p.tasks_in("completed").len() == 3 || !p.tasks_in("failed").is_empty()
    });
    assert_alive(&mut sup);
    assert_eq!(
        p.tasks_in("failed"),
        Vec::<String>::new(),
        "{}",
        sup.output()
    );
    assert_eq!(p.tasks_in("completed"), ids);
    for (id, text) in [
        ("held", "held open to the end"),
        ("appended", "appended in chunks"),
        ("vscode", "new version"),
    ] {
        let out = p.read(&format!("context/agent_outputs/{id}_output.md"));
        assert!(out.contains(text), "{id}: {out}");
        assert_eq!(
            p.read(&format!("counts/{id}")).trim(),
            "1",
            "{id} ran twice"
        );
    }
    assert!(sup.stop().success());
    report(
        "slow-writer-and-truncate-then-write",
        3,
        lost_unless_completed_once(&p, &ids),
    );
}

#[test]
fn editor_and_sync_client_temp_files_are_left_alone_and_their_saves_run_once() {
    let p = Project::with_config(&config_with(&[("rescan_seconds", "1")], ""));
    let mut sup = p.start();
    let pend = |n: &str| p.path(&format!("tasks/pending/{n}"));

    // vim: swap file while editing, the `4913` probe, then the write; the `~` backup stays behind.
    std::fs::write(pend(".vim.yaml.swp"), b"b0VIM 9.0\0\0\0binary swap").expect("swp");
    std::fs::write(pend(".vim.yaml.swx"), b"b0VIM").expect("swx");
    std::fs::write(pend("4913"), b"").expect("4913");
    std::fs::remove_file(pend("4913")).expect("rm 4913");
    std::fs::write(
        pend("vim.yaml~"),
        "description: \"@fake print=stale_backup\"\n",
    )
    .expect("~");
    write_in_place(
        &pend("vim.yaml"),
        b"description: \"@fake print=vim_saved\"\n",
    );

    // emacs: the lock is a dangling symlink `.#x.yaml`, the autosave `#x.yaml#` stays behind.
    std::os::unix::fs::symlink("user@host.12345:1700000000", pend(".#emacs.yaml")).expect("lock");
    std::fs::write(pend("#emacs.yaml#"), "description: autosave\n").expect("autosave");
    write_in_place(
        &pend("emacs.yaml"),
        b"description: \"@fake print=emacs_saved\"\n",
    );

    // JetBrains safe-write of a task that is waiting in pending/: write x___jb_tmp___, rename the
    // original to x___jb_old___, rename the temp file in, delete the old one.
    p.drop_task(
        "jb.yaml",
        "description: \"@fake print=jb_old\"\ndependencies: [jb_gate]\n",
    );
    wait_for("jb queued", Duration::from_secs(10), || {
        sup.output().contains("queued     jb")
    });
    std::fs::write(
        pend("jb.yaml___jb_tmp___"),
        "description: \"@fake print=jb_new\"\n",
    )
    .expect("tmp");
    std::fs::rename(pend("jb.yaml"), pend("jb.yaml___jb_old___")).expect("old");
    std::fs::rename(pend("jb.yaml___jb_tmp___"), pend("jb.yaml")).expect("in");
    std::fs::remove_file(pend("jb.yaml___jb_old___")).expect("rm old");
    std::fs::write(pend("other.yaml___jb_tmp___"), "description: left behind\n").expect("stale");

    // Syncthing: a temp file written slowly, then renamed in; stale temps from interrupted syncs.
    let st = pend(".syncthing.sync.yaml.tmp");
    for chunk in ["description: \"@fake ", "print=synced", "_by_syncthing\"\n"] {
        append(&st, chunk);
        std::thread::sleep(Duration::from_millis(60));
    }
    std::fs::rename(&st, pend("sync.yaml")).expect("syncthing rename");
    std::fs::write(pend(".syncthing.stale.yaml.tmp"), "description: stale\n").expect("stale");
    set_mtime(
        &pend(".syncthing.stale.yaml.tmp"),
        SystemTime::now() - Duration::from_secs(86400),
    );
    std::fs::write(pend("~syncthing~win.yaml.tmp"), "description: stale\n").expect("stale");

    let ids = ["emacs", "jb", "sync", "vim"];
    wait_for("the four saves completed", Duration::from_secs(20), || {
        p.tasks_in("completed").len() == 4
    });
    // Two more rescans: the leftovers must survive them untouched.
    std::thread::sleep(Duration::from_millis(2200));
    assert_alive(&mut sup);
    assert_eq!(p.tasks_in("completed"), ids);
    for (id, text) in [
        ("vim", "vim saved"),
        ("emacs", "emacs saved"),
        ("jb", "jb new"),
        ("sync", "synced by syncthing"),
    ] {
        let out = p.read(&format!("context/agent_outputs/{id}_output.md"));
        assert!(out.contains(text), "{id}: {out}");
    }
    let mut left: Vec<String> = std::fs::read_dir(p.path("tasks/pending"))
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".gitkeep")
        .collect();
    left.sort();
    let leftovers = [
        "#emacs.yaml#",
        ".#emacs.yaml",
        ".syncthing.stale.yaml.tmp",
        ".vim.yaml.swp",
        ".vim.yaml.swx",
        "other.yaml___jb_tmp___",
        "vim.yaml~",
        "~syncthing~win.yaml.tmp",
    ];
    assert_eq!(
        left, leftovers,
        "editor and sync files are left where they are"
    );
    assert!(p.files("tasks/failed").is_empty() && p.files("tasks/quarantine").is_empty());
    assert!(sup.stop().success());
    let lost = lost_unless_completed_once(&p, &ids)
        + leftovers
            .iter()
            .filter(|n| std::fs::symlink_metadata(pend(n)).is_err())
            .count();
    report(
        "editor-and-sync-temp-files",
        ids.len() + leftovers.len(),
        lost,
    );
}

#[test]
fn conflict_copies_in_every_common_format_are_quarantined() {
    let p = Project::new();
    p.drop_task("notes.yaml", "description: \"@fake print=original\"\n");
    let copies = [
        // Dropbox puts the user or device before "conflicted copy".
        "notes (Jane Doe's conflicted copy 2024-01-01).yaml",
        "notes (DESKTOP-7 conflicted copy 2024-01-01).yaml",
        // Nextcloud.
        "notes (conflicted copy 2024-01-01 120000).yaml",
        // Syncthing.
        "notes.sync-conflict-20240101-120000-ABCDEFG.yaml",
        // ownCloud and older Nextcloud.
        "notes_conflict-20240101-120000.yaml",
    ];
    for c in copies {
        p.drop_task(c, "description: \"@fake print=conflict\"\n");
    }
    p.run(&["start", "--once"]).assert_code(0);
    assert_eq!(p.tasks_in("completed"), vec!["notes"]);
    let q = p.files("tasks/quarantine");
    let mut lost = 0;
    for c in copies {
        let ok = q.iter().any(|n| n == c)
            && std::fs::read_to_string(p.path(&format!("tasks/quarantine/{c}.reason.txt")))
                .is_ok_and(|r| r.contains("conflict copy"));
        if !ok {
            eprintln!("not quarantined: {c}");
            lost += 1;
        }
    }
    assert!(
        p.files("tasks/pending").is_empty(),
        "{:?}",
        p.files("tasks/pending")
    );
    let out = p.read("context/agent_outputs/notes_output.md");
    assert!(
        out.contains("original") && !out.contains("conflict"),
        "{out}"
    );
    report(
        "conflict-copies",
        copies.len() + 1,
        lost + lost_unless_completed_once(&p, &["notes"]),
    );
}

#[test]
fn a_task_re_created_after_its_claim_never_runs_twice() {
    let p = Project::new();
    std::fs::create_dir_all(p.path("counts")).expect("mkdir");
    let mut sup = p.start();
    let body = "description: \"@fake fail-until=counts/res:1 sleep=1.5\"\n";
    p.drop_task("res.yaml", body);
    wait_for("res running", Duration::from_secs(10), || {
        p.tasks_in("assigned") == vec!["res"]
    });
    // A sync client resurrects the file it saw before the claim moved it (written in place).
    write_in_place(&p.path("tasks/pending/res.yaml"), body.as_bytes());
    wait_for("resurrection quarantined", Duration::from_secs(10), || {
        p.files("tasks/quarantine").iter().any(|n| n == "res.yaml")
    });
    wait_for("res completed", Duration::from_secs(20), || {
        p.tasks_in("completed") == vec!["res"]
    });
    // `git pull` brings the committed task file back after it finished, as `.yaml` and as `.yml`.
    write_in_place(&p.path("tasks/pending/res.yaml"), body.as_bytes());
    p.drop_task("res.yml", body);
    wait_for("both quarantined", Duration::from_secs(10), || {
        p.files("tasks/quarantine")
            .iter()
            .filter(|n| !n.ends_with(".reason.txt"))
            .count()
            == 3
    });
    // Past a rescan, in case anything would pick them up again.
    std::thread::sleep(Duration::from_millis(2500));
    assert_alive(&mut sup);
    assert!(sup.stop().success());
    assert_eq!(
        p.read("counts/res").trim(),
        "1",
        "the task ran more than once"
    );
    assert_eq!(p.tasks_in("completed"), vec!["res"]);
    assert!(p.tasks_in("pending").is_empty() && p.tasks_in("failed").is_empty());
    let reasons: Vec<String> = p
        .files("tasks/quarantine")
        .into_iter()
        .filter(|n| n.ends_with(".reason.txt"))
        .map(|n| p.read(&format!("tasks/quarantine/{n}")))
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons.iter().all(|r| r.contains("task id res already")),
        "{reasons:?}"
    );
    assert_eq!(p.mirror_states(), p.tree_states());
    let lost = lost_unless_completed_once(&p, &["res"]) + (3 - reasons.len());
    report("resurrected-after-claim", 4, lost);
}

#[test]
fn a_burst_of_ten_thousand_files_with_an_injected_rescan_completes_each_exactly_once() {
    const N: usize = 10_000;
    // `durable: false`: no fsyncs. This case is about the watcher, the scan and exactly-once state
    // transitions, not about surviving power loss (the crash tests cover that), and the fsyncs would
    // double its time.
    let config = r#"orchestrator:
  durable: false
  max_concurrent: 16
  settle_ms: 100
  rescan_seconds: 2
  kill_grace_seconds: 1
  heartbeat_seconds: 1
agents:
  t:
    kind: command
    command: "true"
    max_instances: 16
routing:
  fallback: [t]
security:
  env_allow: [PATH, HOME]
"#;
    let p = Project::with_config(config);
    // An empty workdir keeps the per-attempt snapshot trivial: this measures the spool, not diffs.
    std::fs::create_dir_all(p.path("work")).expect("mkdir");
    let mut sup = p.start();
    let started = Instant::now();
    let pending = p.path("tasks/pending");
    for i in 0..N {
        let body = format!("description: burst {i}\nworkdir: work\n");
        let name = format!("b{i:05}.yaml");
        if i % 2 == 0 {
            let tmp = pending.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, &body).expect("write");
            std::fs::rename(&tmp, pending.join(&name)).expect("rename");
        } else {
            // Written in place: only close-write (or the scan) says it is complete.
            std::fs::write(pending.join(&name), &body).expect("write");
        }
        if i == N / 2 {
            // A directory appearing in pending/ makes the watcher ask for a full rescan mid-burst.
            std::fs::create_dir(pending.join("inject-rescan")).expect("mkdir");
        }
    }
    eprintln!("burst of {N} written in {:?}", started.elapsed());
    // Polled twice a second: listing 20,000 entries every 20 ms would compete with the supervisor
    // for the two cores.
    let results = || {
        std::fs::read_dir(p.path("tasks/completed"))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with("_result.yaml"))
                    .count()
            })
            .unwrap_or(0)
    };
    // Bounded by progress rather than by one fixed time: on an idle 2-core machine the burst takes
    // about 45 s, but other builds sharing the cores can slow it several times over. Fail if nothing
    // completes for 30 s, or after 10 minutes in all.
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut last, mut last_change) = (0, Instant::now());
    loop {
        let n = results();
        if n >= N {
            break;
        }
        if n != last {
            (last, last_change) = (n, Instant::now());
        }
        assert!(
            last_change.elapsed() < Duration::from_secs(30) && Instant::now() < deadline,
            "stalled: {n} of {N} completed after {:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("burst of {N} completed in {:?}", started.elapsed());
    assert_alive(&mut sup);
    let rss = peak_rss_mib(sup.pid());
    assert!(sup.stop().success(), "{}", sup.output());
    assert!(
        rss < 300,
        "supervisor peak RSS {rss} MiB for a 10,000-task burst"
    );
    assert!(p.tasks_in("pending").is_empty() && p.tasks_in("assigned").is_empty());
    assert!(p.tasks_in("failed").is_empty() && p.files("tasks/quarantine").is_empty());
    let done = p.tasks_in("completed");
    let mut lost = 0;
    for i in 0..N {
        let id = format!("b{i:05}");
        if done.binary_search(&id).is_err() || attempts_in(&p, "completed", &id) != 1 {
            lost += 1;
        }
    }
    // Each task went pending → running → completed exactly once in the mirror.
    let db = p.db();
    let bad: i64 = db
        .query_row(
            "SELECT count(*) FROM (SELECT task_id, state, count(*) AS n FROM task_events
             GROUP BY task_id, state HAVING n <> 1)",
            [],
            |r| r.get(0),
        )
        .expect("query");
    let completed_events: i64 = db
        .query_row(
            "SELECT count(DISTINCT task_id) FROM task_events WHERE state = 'completed'",
            [],
            |r| r.get(0),
        )
        .expect("query");
    assert_eq!((bad, completed_events), (0, N as i64));
    assert!(
        p.path("tasks/pending/inject-rescan").is_dir(),
        "directories are left alone"
    );
    report("burst-10000-with-rescan", N, lost);
}

#[test]
fn with_the_watcher_off_the_periodic_scan_alone_processes_everything() {
    let p = Project::with_config(&config_with(&[("rescan_seconds", "1")], ""));
    let mut sup = p.start_with_env(&[("ORCHESTRATE_NO_WATCH", "1")]);
    assert!(
        sup.output().contains("file watcher disabled"),
        "{}",
        sup.output()
    );
    let mut ids = Vec::new();
    for i in 0..20 {
        let id = format!("nw{i:02}");
        let body = format!("description: \"@fake print=scanned_{i}\"\n");
        if i % 2 == 0 {
            p.drop_task(&format!("{id}.yaml"), &body);
        } else {
            write_in_place(
                &p.path(&format!("tasks/pending/{id}.yaml")),
                body.as_bytes(),
            );
        }
        ids.push(id);
    }
    p.drop_task("nwbad.yaml", "description: [unclosed\n");
    wait_for(
        "all 20 completed by the scan",
        Duration::from_secs(20),
        || p.tasks_in("completed").len() == 20,
    );
    wait_for("the bad one rejected", Duration::from_secs(10), || {
        p.files("tasks/failed")
            .contains(&"nwbad.error.txt".to_string())
    });
    assert_alive(&mut sup);
    assert!(sup.stop().success());
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let lost = lost_unless_completed_once(&p, &refs)
        + usize::from(
            !p.read("tasks/failed/nwbad.error.txt")
                .starts_with("nwbad.yaml:1:"),
        );
    report("watcher-reports-nothing", 21, lost);
}

#[test]
fn pending_replaced_by_a_full_directory_and_the_whole_tree_recreated_are_picked_up() {
    // The periodic rescan is an hour away: only the watcher (re-armed on the new directory) can see.
    let p = Project::with_config(&config_with(&[("rescan_seconds", "3600")], ""));
    // Each task counts its runs in counts/ (outside tasks/, so the counts outlive the tree).
    std::fs::create_dir_all(p.path("counts")).expect("mkdir");
    let body = |id: &str| format!("description: \"@fake fail-until=counts/{id}:1 print={id}\"\n");
    let mut sup = p.start();
    p.drop_task("before.yaml", &body("before"));
    wait_for("before completed", Duration::from_secs(10), || {
        p.tasks_in("completed") == vec!["before"]
    });

    // A directory arrives with its files already inside (a sync client or `git checkout` creating
    // the folder): rename it over pending/.
    let staging = p.path("tasks/staging");
    std::fs::create_dir(&staging).expect("mkdir");
    let full: Vec<String> = (0..10).map(|i| format!("full{i}")).collect();
    for id in &full {
        std::fs::write(staging.join(format!("{id}.yaml")), body(id)).expect("write");
    }
    std::fs::remove_dir_all(p.path("tasks/pending")).expect("rm pending");
    std::fs::rename(&staging, p.path("tasks/pending")).expect("rename in");
    wait_for(
        "the ten in the new pending/ completed",
        Duration::from_secs(15),
        || p.tasks_in("completed").len() == 11,
    );
    // Then a task dropped into it is seen at once, not an hour later.
    p.drop_task("after_swap.yaml", &body("after_swap"));
    wait_for("after_swap completed", Duration::from_secs(10), || {
        p.tasks_in("completed").len() == 12
    });
    // The twelve of the first tree, accounted for before it goes: each completed with one attempt.
    let mut first: Vec<&str> = vec!["before", "after_swap"];
    first.extend(full.iter().map(String::as_str));
    let mut lost = not_completed_once(&p, &first);

    // The whole tasks/ tree deleted and re-created (as `git checkout` restores it, with every folder).
    std::fs::remove_dir_all(p.path("tasks")).expect("rm -r tasks");
    std::thread::sleep(Duration::from_millis(700));
    assert_alive(&mut sup);
    for d in ["pending", "assigned", "completed", "failed", "quarantine"] {
        std::fs::create_dir_all(p.path(&format!("tasks/{d}"))).expect("mkdir");
    }
    let again = ["re0", "re1", "re2", "re3", "re4"];
    for id in again {
        p.drop_task(&format!("{id}.yaml"), &body(id));
    }
    wait_for(
        "the five in the recreated tree completed",
        Duration::from_secs(15),
        || p.tasks_in("completed").len() == 5,
    );
    assert_alive(&mut sup);
    assert!(sup.stop().success(), "{}", sup.output());
    // Every task thrown ran exactly once, across both trees: none lost, none run twice.
    lost.extend(not_completed_once(&p, &again));
    let thrown: Vec<&str> = first.iter().chain(&again).copied().collect();
    for id in &thrown {
        let runs = std::fs::read_to_string(p.path(&format!("counts/{id}"))).unwrap_or_default();
        if runs.trim() != "1" {
            eprintln!("{id} ran {} times", runs.trim().parse::<u32>().unwrap_or(0));
            lost.push(*id);
        }
    }
    lost.sort_unstable();
    lost.dedup();
    if !lost.is_empty() {
        eprintln!("lost: {lost:?}");
    }
    report(
        "pending-replaced-and-tree-recreated",
        thrown.len(),
        lost.len(),
    );
}

// ---- YAML attacks and mistakes -------------------------------------------------------------------

#[test]
fn yaml_bombs_huge_and_malformed_files_fail_clearly_with_bounded_memory() {
    let p = Project::new();
    let mut sup = p.start();
    let pending = p.path("tasks/pending");
    let put = |name: &str, bytes: &[u8]| {
        let tmp = pending.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes).expect("write");
        std::fs::rename(&tmp, pending.join(name)).expect("rename");
    };
    // Billion laughs, in known keys so the parser has to look at the aliases.
    let mut laughs =
        String::from("description: x\nlabels: [&a [lol,lol,lol,lol,lol,lol,lol,lol,lol],");
    for (c, prev) in "bcdefghi".chars().zip("abcdefgh".chars()) {
        laughs += &format!("&{c} [{}],", vec![format!("*{prev}"); 9].join(","));
    }
    laughs += "*i]\n";
    put("laughs.yaml", laughs.as_bytes());
    // One big anchored scalar referenced a thousand times (≈ 900 MB if expanded).
    let big = format!(
        "description: &d {}\nlabels: [{}]\n",
        "A".repeat(900_000),
        vec!["*d"; 1000].join(",")
    );
    put("aliasbomb.yaml", big.as_bytes());
    put(
        "deep.yaml",
        format!(
            "description: x\nlabels: {}{}\n",
            "[".repeat(100_000),
            "]".repeat(100_000)
        )
        .as_bytes(),
    );
    // 100 MB: rejected by its size, without being read.
    {
        let tmp = pending.join(".huge.yaml.tmp");
        let mut f = std::fs::File::create(&tmp).expect("create");
        f.write_all(b"description: ").expect("w");
        let block = vec![b'x'; 1 << 20];
        for _ in 0..100 {
            f.write_all(&block).expect("w");
        }
        drop(f);
        std::fs::rename(&tmp, pending.join("huge.yaml")).expect("rename");
    }
    put(
        "dupkey.yaml",
        b"description: one\npriority: high\ndescription: two\n",
    );
    put("twodocs.yaml", b"description: one\n---\ndescription: two\n");
    put("utf16.yaml", &{
        let mut v = vec![0xff, 0xfe];
        v.extend("description: x\n".encode_utf16().flat_map(u16::to_le_bytes));
        v
    });
    put(
        "utf16nobom.yaml",
        &"description: x\n"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect::<Vec<u8>>(),
    );
    put("nul.yaml", b"description: x\0y\n");
    put("latin1.yaml", b"description: caf\xe9\n");
    put(
        "merge.yaml",
        b"description: x\n<<<<<<< HEAD\npriority: high\n=======\npriority: low\n>>>>>>> theirs\n",
    );
    // A BOM is fine: the task runs.
    put(
        "bom.yaml",
        b"\xef\xbb\xbfdescription: \"@fake print=bom_ok\"\n",
    );

    // (file stem, text the error must contain, position prefix it must start with, if any)
    let expect: [(&str, &str, Option<&str>); 11] = [
        ("laughs", "expected string", Some("laughs.yaml:2:")),
        ("aliasbomb", "budget", Some("aliasbomb.yaml:2:")),
        ("deep", "recursion limit", Some("deep.yaml:2:")),
        ("huge", "over the 1048576-byte limit", None),
        ("dupkey", "duplicate", Some("dupkey.yaml:3:1:")),
        ("twodocs", "several YAML documents", Some("twodocs.yaml:3:")),
        ("utf16", "UTF-16", None),
        ("utf16nobom", "NUL bytes", None),
        ("nul", "NUL bytes", None),
        ("latin1", "not valid UTF-8", Some("latin1.yaml:1:")),
        ("merge", "git conflict marker", Some("merge.yaml:2:1:")),
    ];
    let started = Instant::now();
    wait_for("every bad file rejected", Duration::from_secs(30), || {
        expect
            .iter()
            .all(|(s, _, _)| p.path(&format!("tasks/failed/{s}.error.txt")).exists())
    });
    wait_for("bom completed", Duration::from_secs(10), || {
        p.tasks_in("completed") == vec!["bom"]
    });
    eprintln!("hostile YAML handled in {:?}", started.elapsed());
    assert_alive(&mut sup);
    let rss = peak_rss_mib(sup.pid());
    assert!(rss < 200, "supervisor peak RSS {rss} MiB");
    let mut lost = 0;
    for (stem, text, pos) in expect {
        let err = p.read(&format!("tasks/failed/{stem}.error.txt"));
        let ok = err.contains(text) && pos.is_none_or(|pre| err.starts_with(pre));
        if !ok {
            eprintln!("{stem}: unexpected explanation:\n{err}");
            lost += 1;
        }
        assert!(
            p.path(&format!("tasks/failed/{stem}.yaml")).exists(),
            "{stem}"
        );
    }
    assert!(sup.stop().success());
    eprintln!("RELIABILITY hostile yaml-attacks: supervisor peak RSS {rss} MiB");
    report(
        "yaml-attacks",
        expect.len() + 1,
        lost + lost_unless_completed_once(&p, &["bom"]),
    );
}

#[test]
fn yaml_1_1_lookalike_values_keep_their_text_or_fail_clearly() {
    let p = Project::new();
    // `no` would be false and `1.10` would be 1.1 under YAML 1.1 resolution: ids and descriptions are
    // text and must keep exactly what was written.
    p.drop_task("idno.yaml", "id: no\ndescription: \"@fake echo-prompt\"\n");
    p.drop_task("num.yaml", "description: 1.10\n");
    p.drop_task("octal.yaml", "description: 0755\n");
    p.drop_task(
        "yes.yaml",
        "description: yes\ntype: 1.10\nlabels: [0755, no, 1e3]\n",
    );
    p.drop_task("subs.yaml", "description: parent\nsubtasks: [1.10, 0x10]\n");
    // A number where a level or an integer is expected: 0755 is rejected with its position rather
    // than silently read as 493 (octal) or 755.
    p.drop_task("prio.yaml", "description: x\npriority: 0755\n");
    p.drop_task("retries.yaml", "description: x\nmax_retries: no\n");
    p.run(&["start", "--once"]).assert_code(0);
    assert_eq!(
        p.tasks_in("completed"),
        vec!["no", "num", "octal", "subs", "subs.1", "subs.2", "yes"]
    );
    let mut lost = 0;
    for (id, text) in [("num", "1.10"), ("octal", "0755"), ("yes", "yes")] {
        let r = p.result("completed", id);
        if r["description"] != text {
            eprintln!("{id}: description became {}", r["description"]);
            lost += 1;
        }
        let prompt = p.read(&format!("context/logs/{id}/attempt-1.prompt.md"));
        assert!(prompt.contains(text), "{id}: {prompt}");
    }
    let row: String = p
        .db()
        .query_row("SELECT payload FROM tasks WHERE id = 'yes'", [], |r| {
            r.get(0)
        })
        .expect("row");
    let payload: serde_json::Value = serde_json::from_str(&row).expect("json");
    assert_eq!(payload["task_type"], "1.10", "{payload}");
    // Subtask texts that look like numbers stay text in the child tasks.
    for (child, text) in [("subs.1", "1.10"), ("subs.2", "0x10")] {
        let r = p.result("completed", child);
        if r["description"] != text {
            eprintln!("{child}: description became {}", r["description"]);
            lost += 1;
        }
    }
    let prio = p.read("tasks/failed/prio.error.txt");
    assert!(
        prio.starts_with("prio.yaml:2:") && prio.contains("priority"),
        "{prio}"
    );
    let retries = p.read("tasks/failed/retries.error.txt");
    assert!(retries.starts_with("retries.yaml:2:"), "{retries}");
    report("yaml-1.1-lookalikes", 7, lost);
}

#[test]
fn awkward_names_case_twins_nfd_newlines_and_255_bytes() {
    let p = Project::new();
    p.drop_task("Twin.yaml", "description: \"@fake print=upper\"\n");
    p.drop_task("twin.yaml", "description: \"@fake print=lower\"\n");
    // Not in the name whitelist: ignored and left alone, whatever the normalization form.
    let ignored = [
        "caf\u{e9}.yaml",
        "cafe\u{301}.yaml",
        "new\nline.yaml",
        "sp ace.yaml",
    ];
    for n in ignored {
        p.drop_task(n, "description: x\n");
    }
    // 255 bytes, the longest name Linux allows: a valid file name but too long an id.
    let long = format!("{}.yaml", "n".repeat(250));
    std::fs::write(p.path("tasks/pending/.long.tmp"), "description: x\n").expect("write");
    std::fs::rename(
        p.path("tasks/pending/.long.tmp"),
        p.path(&format!("tasks/pending/{long}")),
    )
    .expect("rename");
    // And 200 characters, the longest id: it runs.
    let longest = "m".repeat(200);
    p.drop_task(
        &format!("{longest}.yaml"),
        "description: \"@fake print=longest\"\n",
    );
    p.run(&["start", "--once"]).assert_code(0);
    let done = p.tasks_in("completed");
    assert!(
        done.contains(&"Twin".to_string()) && done.contains(&"twin".to_string()),
        "{done:?}"
    );
    assert!(
        p.read("context/agent_outputs/Twin_output.md")
            .contains("upper")
    );
    assert!(
        p.read("context/agent_outputs/twin_output.md")
            .contains("lower")
    );
    assert!(done.contains(&longest), "{done:?}");
    let mut lost = lost_unless_completed_once(&p, &["Twin", "twin", &longest]);
    for n in ignored {
        if !p.path(&format!("tasks/pending/{n}")).exists() {
            eprintln!("ignored name moved: {n:?}");
            lost += 1;
        }
    }
    // The 255-byte name ends somewhere visible with its explanation, never silently.
    let failed = p.files("tasks/failed");
    let quarantined = p.files("tasks/quarantine");
    let explained = failed
        .iter()
        .chain(&quarantined)
        .any(|n| n.starts_with("nnnn"))
        && failed
            .iter()
            .chain(&quarantined)
            .filter(|n| n.ends_with(".txt"))
            .any(|n| {
                let dir = if failed.contains(n) {
                    "failed"
                } else {
                    "quarantine"
                };
                p.read(&format!("tasks/{dir}/{n}"))
                    .contains("invalid task id")
            });
    if !explained {
        eprintln!("255-byte name: failed {failed:?} quarantine {quarantined:?}");
        lost += 1;
    }
    report("awkward-names", 3 + ignored.len() + 1, lost);
}

#[test]
fn a_fifo_a_directory_and_a_symlink_named_like_tasks_are_rejected_without_hanging() {
    let p = Project::new();
    let mut sup = p.start();
    let pending = p.path("tasks/pending");
    let fifo =
        std::ffi::CString::new(pending.join("fifo.yaml").to_str().expect("utf8")).expect("cstring");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0, "mkfifo");
    std::fs::create_dir(pending.join("dir.yaml")).expect("mkdir");
    std::fs::write(pending.join("dir.yaml/inner.yaml"), "description: inside\n").expect("w");
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        outside.path().join("t.yaml"),
        "description: \"@fake print=followed\"\n",
    )
    .expect("w");
    std::os::unix::fs::symlink(outside.path().join("t.yaml"), pending.join("link.yaml"))
        .expect("symlink");
    // A plain subdirectory with tasks inside is not looked into (pending/ is not recursive).
    std::fs::create_dir(pending.join("batch")).expect("mkdir");
    std::fs::write(pending.join("batch/sub.yaml"), "description: nested\n").expect("w");
    // The loop is still alive: a normal task dropped after them runs.
    p.drop_task("after.yaml", "description: \"@fake print=after\"\n");
    let odd = ["dir", "fifo", "link"];
    wait_for(
        "the three rejected and after completed",
        Duration::from_secs(15),
        || {
            odd.iter()
                .all(|s| p.path(&format!("tasks/failed/{s}.error.txt")).exists())
                && p.tasks_in("completed") == vec!["after"]
        },
    );
    assert_alive(&mut sup);
    assert!(sup.stop().success());
    let mut lost = 0;
    for s in odd {
        let err = p.read(&format!("tasks/failed/{s}.error.txt"));
        if !err.contains("not a regular file") {
            eprintln!("{s}: {err}");
            lost += 1;
        }
    }
    // Moved as they are: the FIFO is still a FIFO, the symlink still a symlink (never followed).
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::symlink_metadata(p.path("tasks/failed/fifo.yaml"))
            .expect("fifo")
            .file_type()
            .is_fifo()
    );
    assert!(
        std::fs::symlink_metadata(p.path("tasks/failed/link.yaml"))
            .expect("link")
            .file_type()
            .is_symlink()
    );
    assert!(p.path("tasks/failed/dir.yaml/inner.yaml").exists());
    assert!(p.path("tasks/pending/batch/sub.yaml").exists());
    assert!(
        !p.read("context/agent_outputs/after_output.md")
            .contains("followed")
    );
    report(
        "fifo-dir-symlink",
        5,
        lost + lost_unless_completed_once(&p, &["after"]),
    );
}

// ---- path escapes ---------------------------------------------------------------------------------

#[test]
fn symlinks_and_dot_dots_out_of_the_project_are_refused_and_links_inside_allowed() {
    let p = Project::new();
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join("secret.txt"), "top secret").expect("write");
    std::os::unix::fs::symlink(outside.path(), p.path("outlink")).expect("symlink");
    std::fs::create_dir_all(p.path("docs")).expect("mkdir");
    std::fs::write(p.path("docs/inside.md"), "inside-marker-42").expect("write");
    std::os::unix::fs::symlink(p.path("docs"), p.path("inlink")).expect("symlink");
    let refused = [
        ("wd_symlink", "workdir: outlink\n".to_string()),
        ("wd_dotdot", "workdir: ../\n".to_string()),
        ("wd_sneaky", "workdir: docs/../../\n".to_string()),
        (
            "ctx_symlink_dir",
            "context_files: [outlink/secret.txt]\n".to_string(),
        ),
        (
            "ctx_absolute",
            format!(
                "context_files: [{}]\n",
                outside.path().join("secret.txt").display()
            ),
        ),
    ];
    for (id, extra) in &refused {
        p.drop_task(
            &format!("{id}.yaml"),
            &format!("description: \"@fake echo-prompt\"\nmax_retries: 3\n{extra}"),
        );
    }
    p.drop_task(
        "inside.yaml",
        "description: \"@fake echo-prompt\"\ncontext_files: [inlink/inside.md]\nworkdir: inlink\n",
    );
    p.run(&["start", "--once"]).assert_code(0);
    let mut lost = 0;
    for (id, _) in &refused {
        let r = p.result("failed", id);
        let err = r["error"].as_str().unwrap_or_default();
        let ok = err.contains("outside the allowed root")
            && r["attempts"].as_array().map(Vec::len) == Some(1)
            && r["attempts"][0]["exit_code"].is_null();
        if !ok {
            eprintln!("{id}: {r}");
            lost += 1;
        }
    }
    let out = p.read("context/agent_outputs/inside_output.md");
    assert!(out.contains("inside-marker-42"), "{out}");
    for f in std::fs::read_dir(p.path("context/agent_outputs"))
        .expect("ls")
        .flatten()
    {
        let text = std::fs::read_to_string(f.path()).unwrap_or_default();
        assert!(!text.contains("top secret"), "{:?}", f.path());
    }
    report(
        "path-escapes",
        refused.len() + 1,
        lost + lost_unless_completed_once(&p, &["inside"]),
    );
}

// ---- secrets and sensitive changes ---------------------------------------------------------------

fn sh_agent_config(extra_security: &str) -> String {
    test_config("")
        .replace(
            "routing:",
            "  sh:\n    kind: command\n    command: sh\n    args: [-c, \"{description}\"]\n    max_instances: 4\nrouting:",
        )
        .replace("  env_allow: [PATH, HOME]", &format!("  env_allow: [PATH, HOME, ORCH_HOSTILE_SECRET, ORCH_HOSTILE_ALLOWED]\n{extra_security}"))
}

#[test]
fn secrets_never_reach_outputs_logs_diffs_results_or_the_mirror_and_env_is_allow_listed() {
    const SECRET: &str = "hunter2-d0nt-l3ak-9f8e7d";
    let p = Project::with_config(&sh_agent_config("  secrets: [ORCH_HOSTILE_SECRET]\n"));
    std::fs::create_dir_all(p.path("work")).expect("mkdir");
    p.drop_task(
        "leak.yaml",
        "agent: sh\nworkdir: work\ndescription: >-\n  echo \"out $ORCH_HOSTILE_SECRET\";\n  echo \"err $ORCH_HOSTILE_SECRET\" >&2;\n  echo \"file $ORCH_HOSTILE_SECRET\" > leaked.txt;\n  env > env.txt;\n  echo \"allowed=${ORCH_HOSTILE_ALLOWED:-unset} blocked=${ORCH_HOSTILE_BLOCKED:-unset}\"\n",
    );
    p.drop_task(
        "fails.yaml",
        "agent: sh\nmax_retries: 0\ndescription: \"echo failing with $ORCH_HOSTILE_SECRET >&2; exit 3\"\n",
    );
    let out = p
        .cmd(&["start", "--once", "-v"])
        .env("ORCH_HOSTILE_SECRET", SECRET)
        .env("ORCH_HOSTILE_ALLOWED", "visible")
        .env("ORCH_HOSTILE_BLOCKED", "should-not-pass")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(p.tasks_in("completed"), vec!["leak"]);
    assert_eq!(p.tasks_in("failed"), vec!["fails"]);
    let output = p.read("context/agent_outputs/leak_output.md");
    assert!(output.contains("out ***"), "{output}");
    assert!(output.contains("allowed=visible blocked=unset"), "{output}");
    assert!(p.read("context/diffs/leak.diff").contains("+file ***"));
    // The agent's environment: the allow-list, the run marker, and what sh itself sets.
    let env = std::fs::read_to_string(p.path("work/env.txt")).expect("env.txt");
    let names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    for n in &names {
        assert!(
            [
                "PATH",
                "HOME",
                "ORCH_HOSTILE_SECRET",
                "ORCH_HOSTILE_ALLOWED",
                "ORCHESTRATE_RUN",
                "PWD",
                "SHLVL",
                "_",
                "OLDPWD"
            ]
            .contains(n),
            "agent got {n} from outside the allow-list: {names:?}"
        );
    }
    // Every byte orchestrate wrote: context/, tasks/, .orchestrate/ (SQLite file and its WAL), and
    // what the supervisor printed.
    let mut leaks = Vec::new();
    let mut scanned = 0;
    let mut stack = vec![p.path("context"), p.path("tasks"), p.path(".orchestrate")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("ls").flatten() {
            let path = e.path();
            if e.file_type().expect("type").is_dir() {
                stack.push(path);
                continue;
            }
            scanned += 1;
            let bytes = std::fs::read(&path).unwrap_or_default();
            if bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()) {
                leaks.push(path);
            }
        }
    }
    let printed = [out.stdout, out.stderr].concat();
    if printed
        .windows(SECRET.len())
        .any(|w| w == SECRET.as_bytes())
    {
        leaks.push("supervisor output".into());
    }
    assert!(scanned > 10, "scanned only {scanned} files");
    assert!(p.path(".orchestrate/state.db").exists());
    eprintln!("secrets: scanned {scanned} files");
    report("secrets", 2, leaks.len());
    assert!(leaks.is_empty(), "secret found in {leaks:?}");
}

#[test]
fn a_diff_touching_review_paths_requires_review_and_lists_the_files() {
    let p = Project::with_config(&sh_agent_config(""));
    for (id, dir, script) in [
        (
            "sensitive",
            "w1",
            "mkdir -p .github/workflows db; echo on > .github/workflows/ci.yml; echo 'DROP TABLE x;' > db/migrate.sql; echo '{}' > package.json; echo hi > notes.txt",
        ),
        (
            "harmless",
            "w2",
            "echo hi > notes.txt; mkdir -p src; echo x > src/main.rs",
        ),
    ] {
        std::fs::create_dir_all(p.path(dir)).expect("mkdir");
        p.drop_task(
            &format!("{id}.yaml"),
            &format!("agent: sh\nworkdir: {dir}\ndescription: \"{script}\"\n"),
        );
    }
    p.run(&["start", "--once"]).assert_code(0);
    assert_eq!(p.tasks_in("completed"), vec!["harmless", "sensitive"]);
    let r = p.result("completed", "sensitive");
    assert_eq!(r["review_required"], true, "{r}");
    let mut files: Vec<String> = r["review_files"]
        .as_array()
        .expect("review_files")
        .iter()
        .map(|v| v.as_str().expect("str").to_string())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [".github/workflows/ci.yml", "db/migrate.sql", "package.json"],
        "{r}"
    );
    let r = p.result("completed", "harmless");
    assert_eq!(r["review_required"], false, "{r}");
    report(
        "review-paths",
        2,
        lost_unless_completed_once(&p, &["harmless", "sensitive"]),
    );
}

// ---- agents that misbehave -----------------------------------------------------------------------

#[test]
fn misbehaving_agents_are_killed_at_their_timeout_capped_and_reaped() {
    let p = Project::with_config(&config_with(&[("max_log_bytes", "65536")], ""));
    let mut sup = p.start();
    let sup_pid = sup.pid();
    let cases = [
        (
            "forker",
            "grandchild=forker.grand pidfile=forker.pid sleep=60",
        ),
        ("stubborn", "ignore-term pidfile=stubborn.pid sleep=60"),
        (
            "closer",
            "close-pipes pidfile=closer.pid ignore-term sleep=60",
        ),
        ("flooder", "flood=1000000000 pidfile=flooder.pid sleep=60"),
    ];
    for (id, d) in cases {
        p.drop_task(
            &format!("{id}.yaml"),
            &format!("description: \"@fake {d}\"\ntimeout_minutes: 0.06\nmax_retries: 0\n"),
        );
    }
    let ids: Vec<&str> = cases.iter().map(|c| c.0).collect();
    let started = Instant::now();
    let mut peak_children = 0;
    wait_for("all four failed", Duration::from_secs(40), || {
        peak_children = peak_children.max(children(sup_pid).len());
        p.tasks_in("failed").len() == 4
    });
    eprintln!("misbehaving agents handled in {:?}", started.elapsed());
    assert!(peak_children >= 1, "never saw an agent running");
    // Nothing left running: no process carries these attempts' marker, and the pids we know are gone.
    wait_for("no marked process left", Duration::from_secs(5), || {
        marked_processes(&ids).is_empty()
    });
    let mut pids: Vec<u32> = ids
        .iter()
        .map(|id| read_pid(&p.path(&format!("{id}.pid"))))
        .collect();
    pids.push(read_pid(&p.path("forker.grand")));
    for pid in &pids {
        assert!(process_gone(*pid), "pid {pid} still running");
    }
    // No zombie: the supervisor reaped every child it had.
    wait_for(
        "supervisor has no children left",
        Duration::from_secs(5),
        || children(sup_pid).is_empty(),
    );
    assert_alive(&mut sup);
    let rss = peak_rss_mib(sup_pid);
    assert!(
        rss < 200,
        "supervisor peak RSS {rss} MiB while an agent flooded"
    );
    assert!(sup.stop().success());
    let mut lost = 0;
    for id in &ids {
        let r = p.result("failed", id);
        if r["attempts"][0]["outcome"] != "timeout" {
            eprintln!("{id}: {r}");
            lost += 1;
        }
        let log = p.path(&format!("context/logs/{id}/attempt-1.log"));
        let size = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        assert!(
            size <= 65536 + 4096,
            "{id}: log of {size} bytes over the cap"
        );
    }
    let flood_log = p.read("context/logs/flooder/attempt-1.log");
    let dropped: u64 = flood_log
        .split("[orchestrate: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    eprintln!(
        "flooder: {dropped} bytes dropped from its log before it was killed; peak RSS {rss} MiB"
    );
    assert!(
        dropped > 10_000_000,
        "the flood was not a flood: {dropped} bytes dropped"
    );
    report("misbehaving-agents", ids.len(), lost);
}
