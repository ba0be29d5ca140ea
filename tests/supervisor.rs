//! End-to-end tests of the supervisor: the real binary, real files, real child processes.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

#[test]
fn two_hundred_tasks_complete_exactly_once_with_outputs_diffs_and_mirror() {
    let p = Project::new();
    std::fs::create_dir_all(p.path("locks")).expect("mkdir locks");
    let mut sup = p.start();
    for i in 0..200 {
        std::fs::create_dir_all(p.path(&format!("work/t{i:03}"))).expect("mkdir");
        p.drop_task(
            &format!("t{i:03}.yaml"),
            &format!(
                "description: |\n  task number {i}\n  @fake write=made_{i:03}.txt:content_{i} lock=../../locks/t{i:03}.lock\nworkdir: work/t{i:03}\n"
            ),
        );
    }
    wait_for("200 tasks in completed/", Duration::from_secs(180), || {
        p.tasks_in("completed").len() == 200
    });
    assert!(sup.stop().success(), "{}", sup.output());

    assert!(
        p.tasks_in("pending").is_empty()
            && p.tasks_in("assigned").is_empty()
            && p.tasks_in("failed").is_empty()
    );
    for i in 0..200 {
        let id = format!("t{i:03}");
        let r = p.result("completed", &id);
        assert_eq!(r["status"], "completed", "{id}: {r}");
        assert_eq!(
            r["attempts"].as_array().map(Vec::len),
            Some(1),
            "{id} ran more than once: {r}"
        );
        assert_eq!(
            r["files_modified"],
            serde_json::json!([format!("made_{i:03}.txt")]),
            "{id}"
        );
        let out = p.read(&format!("context/agent_outputs/{id}_output.md"));
        assert!(
            out.contains(&format!("fake agent finished Task {id}")),
            "{out}"
        );
        let diff = p.read(&format!("context/diffs/{id}.diff"));
        assert!(
            diff.contains(&format!("+++ b/made_{i:03}.txt"))
                && diff.contains(&format!("+content {i}")),
            "{diff}"
        );
        assert!(
            !p.path(&format!("locks/{id}.lock.overlap")).exists(),
            "{id} ran twice at once"
        );
    }
    // The mirror agrees with the tree, and each task went through each state exactly once.
    assert_eq!(p.mirror_states(), p.tree_states());
    let db = p.db();
    let mut st = db
        .prepare("SELECT task_id, state, count(*) FROM task_events GROUP BY task_id, state")
        .expect("prepare");
    let mut per_task: HashMap<String, Vec<(String, i64)>> = HashMap::new();
    for row in st
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .expect("query")
    {
        let (id, state, n) = row.expect("row");
        per_task.entry(id).or_default().push((state, n));
    }
    assert_eq!(per_task.len(), 200);
    for (id, mut states) in per_task {
        states.sort();
        assert_eq!(
            states,
            vec![
                ("completed".into(), 1),
                ("pending".into(), 1),
                ("running".into(), 1)
            ],
            "events of {id}"
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&p.read("context/completed_tasks.json")).expect("json");
    assert_eq!(json.as_array().map(Vec::len), Some(200));
    assert!(
        p.read("context/current_state.md")
            .contains("| completed | 200 |")
    );
}

#[test]
fn bad_yaml_ends_in_failed_with_line_and_column() {
    let p = Project::new();
    p.drop_task("bad.yaml", "description: fine\npriority: [high\n");
    p.drop_task("unknown.yaml", "description: x\nagnet: fake\n");
    p.drop_task("empty.yaml", "");
    p.run(&["start", "--once"]).assert_code(0);
    assert_eq!(
        p.files("tasks/failed"),
        vec![
            "bad.error.txt",
            "bad.yaml",
            "empty.error.txt",
            "empty.yaml",
            "unknown.error.txt",
            "unknown.yaml"
        ]
    );
    let err = p.read("tasks/failed/bad.error.txt");
    assert!(err.starts_with("bad.yaml:2:"), "{err}");
    let err = p.read("tasks/failed/unknown.error.txt");
    assert!(
        err.starts_with("unknown.yaml:2:1:") && err.contains("agnet"),
        "{err}"
    );
    assert!(
        p.read("tasks/failed/empty.error.txt")
            .contains("empty file")
    );
    let rows = p
        .run(&["tasks", "--status", "failed", "--json"])
        .assert_code(0)
        .json();
    assert_eq!(rows.as_array().map(Vec::len), Some(3), "{rows}");
}

#[test]
fn dependency_chain_runs_in_order_and_passes_outputs_on() {
    let p = Project::new();
    // Dropped in reverse so arrival order cannot explain the run order.
    p.drop_task(
        "c.yaml",
        "description: \"third\\n@fake echo-prompt\"\ndependencies: [b]\n",
    );
    p.drop_task(
        "b.yaml",
        "description: \"second\\n@fake print=from_b sleep=0.2\"\ndependencies: [a]\n",
    );
    p.drop_task(
        "a.yaml",
        "description: \"first\\n@fake print=from_a sleep=0.2\"\n",
    );
    p.run(&["start", "--once"]).assert_code(0);
    assert_eq!(p.tasks_in("completed"), vec!["a", "b", "c"]);
    let t = |id: &str, k: &str| {
        p.result("completed", id)["attempts"][0][k]
            .as_str()
            .expect("time")
            .to_string()
    };
    assert!(
        t("a", "finished_at") <= t("b", "started_at"),
        "b started before a finished"
    );
    assert!(
        t("b", "finished_at") <= t("c", "started_at"),
        "c started before b finished"
    );
    // c's prompt carried its dependency's output (c echoes its prompt).
    let out = p.read("context/agent_outputs/c_output.md");
    assert!(out.contains("### b") && out.contains("from b"), "{out}");
}

#[test]
fn dependency_cycle_fails_every_member_clearly_and_dependents_follow() {
    let p = Project::new();
    p.drop_task("x.yaml", "description: x\ndependencies: [y]\n");
    p.drop_task("y.yaml", "description: y\ndependencies: [x]\n");
    p.drop_task("z.yaml", "description: z\ndependencies: [x]\n");
    p.run(&["start", "--once"]).assert_code(0);
    assert_eq!(p.tasks_in("failed"), vec!["x", "y", "z"]);
    for id in ["x", "y"] {
        let e = p.result("failed", id)["error"]
            .as_str()
            .expect("error")
            .to_string();
        assert!(
            e.contains("dependency cycle") && e.contains("x → y → x"),
            "{id}: {e}"
        );
    }
    assert_eq!(p.result("failed", "z")["error"], "dependency x failed");
}

#[test]
fn subtasks_run_in_order_and_complete_the_parent() {
    let p = Project::new();
    p.drop_task("big.yaml", "description: build it\nsubtasks: [\"design @fake print=designed\", \"implement @fake print=implemented\"]\n");
    p.run(&["start", "--once"]).assert_code(0);
    assert_eq!(p.tasks_in("completed"), vec!["big", "big.1", "big.2"]);
    let t = |id: &str, k: &str| {
        p.result("completed", id)["attempts"][0][k]
            .as_str()
            .expect("time")
            .to_string()
    };
    assert!(t("big.1", "finished_at") <= t("big.2", "started_at"));
    let out = p.read("context/agent_outputs/big_output.md");
    assert!(
        out.contains("designed") && out.contains("implemented"),
        "{out}"
    );
    let prompt = p.read("context/logs/big.2/attempt-1.prompt.md");
    assert!(
        prompt.contains("step 2 of 2 of task big: build it"),
        "{prompt}"
    );
}

#[test]
fn timeout_kills_a_child_that_ignores_sigterm_and_its_grandchild() {
    let p = Project::new();
    p.drop_task(
        "slow.yaml",
        "description: \"@fake pidfile=agent.pid grandchild=grandchild.pid ignore-term sleep=60\"\ntimeout_minutes: 0.02\nmax_retries: 0\n",
    );
    let run = p.run(&["start", "--once"]);
    run.assert_code(0);
    assert_eq!(p.tasks_in("failed"), vec!["slow"]);
    let r = p.result("failed", "slow");
    assert_eq!(r["attempts"][0]["outcome"], "timeout", "{r}");
    assert_eq!(
        r["attempts"][0]["signal"], 9,
        "SIGTERM was ignored, so SIGKILL ended it: {r}"
    );
    let agent = read_pid(&p.path("agent.pid"));
    let grandchild = read_pid(&p.path("grandchild.pid"));
    wait_for("agent and grandchild gone", Duration::from_secs(5), || {
        process_gone(agent) && process_gone(grandchild)
    });
}

#[test]
fn sigkill_of_the_supervisor_mid_run_loses_and_duplicates_nothing() {
    let p = Project::new();
    std::fs::create_dir_all(p.path("locks")).expect("mkdir");
    let mut sup = p.start();
    for i in 0..12 {
        p.drop_task(
            &format!("k{i:02}.yaml"),
            &format!("description: \"@fake lock=locks/k{i:02}.lock sleep=1.5\"\n"),
        );
    }
    wait_for("tasks running", Duration::from_secs(20), || {
        p.tasks_in("assigned").len() >= 4
    });
    sup.sigkill();
    let orphaned = p.tasks_in("assigned");
    assert!(!orphaned.is_empty());
    // Restart: dead claims are recovered (their orphaned agents killed first), everything finishes.
    let second = p.run(&["start", "--once", "-v"]);
    second.assert_code(0);
    let logs = format!(
        "--- first supervisor\n{}\n--- second\n{}",
        sup.output(),
        second.stdout()
    );
    let mut all = p.tasks_in("completed");
    all.extend(p.tasks_in("failed"));
    all.sort();
    let expected: Vec<String> = (0..12).map(|i| format!("k{i:02}")).collect();
    assert_eq!(
        all, expected,
        "every task ends in exactly one terminal place\n{logs}"
    );
    assert!(p.tasks_in("pending").is_empty() && p.tasks_in("assigned").is_empty());
    for id in &expected {
        assert!(
            !p.path(&format!("locks/{id}.lock.overlap")).exists(),
            "{id} ran twice at the same time"
        );
        assert!(
            p.tasks_in("completed").contains(id),
            "{id} should have completed"
        );
    }
    // A task whose agent had started carries that attempt as `lost`; one caught between the rename and
    // the claim write never started and carries nothing.
    let mut lost = 0;
    for id in &orphaned {
        let r = p.result("completed", id);
        let outcomes: Vec<&str> = r["attempts"]
            .as_array()
            .expect("attempts")
            .iter()
            .filter_map(|a| a["outcome"].as_str())
            .collect();
        assert!(
            outcomes == ["lost", "completed"] || outcomes == ["completed"],
            "{id}: {r}\n{logs}"
        );
        lost += usize::from(outcomes.len() == 2);
    }
    assert!(lost > 0, "no attempt was caught mid-run\n{logs}");
    assert_eq!(p.mirror_states(), p.tree_states());
}

#[test]
fn graceful_stop_requeues_running_tasks_without_using_a_retry() {
    let p = Project::new();
    let mut sup = p.start();
    p.drop_task(
        "long.yaml",
        "description: \"@fake pidfile=long.pid sleep=30\"\nmax_retries: 0\n",
    );
    wait_for("task running", Duration::from_secs(10), || {
        p.path("long.pid").exists()
    });
    let agent = read_pid(&p.path("long.pid"));
    assert!(sup.stop().success());
    assert!(process_gone(agent), "agent outlived the supervisor");
    assert_eq!(p.tasks_in("pending"), vec!["long"]);
    let h = yaml_to_json(&p.read("tasks/pending/.long.history.yaml"));
    assert_eq!(h["attempts"][0]["outcome"], "interrupted");
}

#[test]
fn retry_keeps_history_and_cancel_works_for_pending_and_running() {
    let p = Project::new();
    p.drop_task(
        "flaky.yaml",
        "description: \"@fake fail-until=flaky.count:2\"\nmax_retries: 0\n",
    );
    p.run(&["start", "--once"]).assert_code(0);
    assert_eq!(p.tasks_in("failed"), vec!["flaky"]);
    p.run(&["retry", "flaky"]).assert_code(0);
    assert_eq!(p.tasks_in("pending"), vec!["flaky"]);
    p.run(&["retry", "flaky"]).assert_code(2);
    p.run(&["start", "--once"]).assert_code(0);
    let r = p.result("completed", "flaky");
    let outcomes: Vec<&str> = r["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .map(|a| a["outcome"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(outcomes, vec!["agent_error", "completed"]);

    // Pending: waits on a dependency that does not exist, then is cancelled.
    p.drop_task("waiting.yaml", "description: x\ndependencies: [nowhere]\n");
    p.run(&["cancel", "waiting"]).assert_code(0);
    assert_eq!(p.result("failed", "waiting")["error"], "cancelled by user");

    // Running: stopped by its supervisor, agent killed.
    let mut sup = p.start();
    p.drop_task(
        "busy.yaml",
        "description: \"@fake pidfile=busy.pid sleep=60\"\n",
    );
    wait_for("busy running", Duration::from_secs(10), || {
        p.path("busy.pid").exists()
    });
    let run = p.run(&["cancel", "busy"]);
    run.assert_code(0);
    assert_eq!(
        p.result("failed", "busy")["attempts"][0]["outcome"],
        "cancelled"
    );
    assert!(process_gone(read_pid(&p.path("busy.pid"))));
    p.run(&["cancel", "busy"]).assert_code(2);
    assert!(sup.stop().success(), "{}", sup.output());
}

#[test]
fn conflict_copies_and_duplicate_ids_are_quarantined() {
    let p = Project::new();
    p.drop_task("a.yaml", "description: \"@fake print=one\"\n");
    p.run(&["start", "--once"]).assert_code(0);
    p.drop_task("a.yaml", "description: resurrected\n");
    p.drop_task(
        "notes.sync-conflict-20260101-120000-ABCDEF.yaml",
        "description: conflict\n",
    );
    p.drop_task("other.yaml", "id: a\ndescription: same id\n");
    p.drop_task("README.txt", "ignored");
    p.run(&["start", "--once"]).assert_code(0);
    let q = p.files("tasks/quarantine");
    assert!(
        q.contains(&"a.yaml".to_string()) && q.contains(&"a.yaml.reason.txt".to_string()),
        "{q:?}"
    );
    assert!(q.contains(&"other.yaml".to_string()), "{q:?}");
    assert!(
        q.iter()
            .any(|n| n.contains("sync-conflict") && !n.ends_with(".reason.txt")),
        "{q:?}"
    );
    assert!(
        p.read("tasks/quarantine/a.yaml.reason.txt")
            .contains("already exists in tasks/completed")
    );
    assert_eq!(
        p.files("tasks/pending"),
        vec!["README.txt"],
        "non-task files are left alone"
    );
    assert_eq!(p.tasks_in("completed"), vec!["a"]);
    // The resurrected copy never made the finished task look pending in the mirror.
    assert_eq!(p.mirror_states(), p.tree_states());
    // A name with a multibyte character at the length limit is ignored, not a crash.
    p.drop_task(&format!("{}é.yaml", "a".repeat(199)), "description: x\n");
    p.run(&["start", "--once"]).assert_code(0);
}

#[test]
fn a_task_file_renamed_in_is_claimed_without_waiting_for_a_scan() {
    let p =
        Project::with_config(&test_config("").replace("rescan_seconds: 2", "rescan_seconds: 3600"));
    let mut sup = p.start();
    p.drop_task("quick.yaml", "description: hi\n");
    // With the rescan an hour away, only the watcher can have noticed the file.
    wait_for("quick completed", Duration::from_secs(10), || {
        p.tasks_in("completed") == vec!["quick"]
    });
    assert!(sup.stop().success(), "{}", sup.output());
}

#[test]
fn files_written_in_place_are_read_after_they_settle() {
    let p = Project::new();
    let mut sup = p.start();
    // An editor saving in place: create, write part, pause, write the rest (no rename).
    use std::io::Write;
    let mut f = std::fs::File::create(p.path("tasks/pending/slow.yaml")).expect("create");
    f.write_all(b"descrip").expect("write");
    f.flush().expect("flush");
    std::thread::sleep(Duration::from_millis(30));
    f.write_all(b"tion: \"@fake print=whole\"\n")
        .expect("write");
    drop(f);
    wait_for("slow completed", Duration::from_secs(10), || {
        p.tasks_in("completed") == vec!["slow"]
    });
    assert!(sup.stop().success(), "{}", sup.output());
    assert!(
        p.read("context/agent_outputs/slow_output.md")
            .contains("whole")
    );
}

#[test]
fn a_file_still_open_for_writing_is_not_run_before_its_writer_is_done() {
    let p = Project::new();
    let mut sup = p.start();
    // A shell writes the first lines, and a child holding the same descriptor waits; when the
    // child exits (a close-write the watcher sees) the shell still holds the file and writes the
    // dependency last.
    let mut writer = std::process::Command::new("sh")
        .arg("-c")
        .arg(
            "{ printf 'description: \"@fake print=deploying\"\\n'; \
               sleep 0.3; \
               n=0; while [ ! -e go ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done; \
               echo 'dependencies: [tests_must_pass_first]'; } > tasks/pending/slowC.yaml",
        )
        .current_dir(p.root())
        .spawn()
        .expect("spawn the writer");
    let mut seen = String::new();
    wait_for("status to name the writer", Duration::from_secs(10), || {
        seen = p.run(&["status"]).stdout();
        seen.contains("tasks/pending/slowC.yaml: still open for writing by pid")
    });
    // Long past the settle period (100 ms) and the child's close: still not read.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        p.files("tasks/pending"),
        vec!["slowC.yaml"],
        "{}",
        sup.output()
    );
    assert!(p.mirror_states().is_empty(), "{:?}", p.mirror_states());

    std::fs::write(p.path("go"), "").expect("let the writer finish");
    assert!(
        wait_child(&mut writer, Duration::from_secs(10)).is_some_and(|s| s.success()),
        "the writer did not finish"
    );
    let mut status = String::new();
    wait_for(
        "slowC to wait for its dependency",
        Duration::from_secs(10),
        || {
            status = p.run(&["status"]).stdout();
            status.contains("slowC") && status.contains("tests_must_pass_first")
        },
    );
    assert!(!status.contains("being written"), "{status}");
    assert!(p.tasks_in("completed").is_empty(), "{}", sup.output());
    assert!(sup.stop().success(), "{}", sup.output());
}

#[test]
fn config_changes_apply_while_running_and_invalid_ones_are_refused() {
    let p = Project::new();
    let mut sup = p.start();
    wait_for("the supervisor to watch", Duration::from_secs(10), || {
        sup.output().contains("watching")
    });
    // An agent added to config.yaml, and a task for it at once: no waiting for the next look.
    let with_echoer = test_config("").replace(
        "routing:",
        "  echoer:\n    kind: command\n    command: echo\n    args: [echoed]\nrouting:",
    );
    std::fs::write(p.path("config.yaml"), &with_echoer).expect("write config");
    p.run(&["add", "--agent", "echoer", "hello"]).assert_code(0);
    wait_for(
        "the echoer task to complete",
        Duration::from_secs(10),
        || p.tasks_in("completed") == vec!["task_001"],
    );
    assert!(
        p.read("context/agent_outputs/task_001_output.md")
            .contains("echoed"),
        "{}",
        sup.output()
    );
    assert!(
        sup.output().contains("agents.echoer added"),
        "{}",
        sup.output()
    );

    // An invalid file is refused with its error; the running configuration stays.
    std::fs::write(p.path("config.yaml"), "agents: [unclosed\n").expect("write config");
    wait_for("the refusal", Duration::from_secs(10), || {
        sup.output()
            .contains("changed but is not valid; keeping the running configuration")
    });
    p.drop_task("after.yaml", "agent: echoer\ndescription: still here\n");
    wait_for(
        "a task on the kept configuration",
        Duration::from_secs(10),
        || p.tasks_in("completed").contains(&"after".to_string()),
    );

    // What cannot change under a running supervisor is named, and kept.
    std::fs::write(
        p.path("config.yaml"),
        with_echoer.replace("rescan_seconds: 2", "rescan_seconds: 7"),
    )
    .expect("write config");
    wait_for("the restart note", Duration::from_secs(10), || {
        sup.output().contains(
            "needs a restart to apply (running value kept): orchestrator.rescan_seconds 2 → 7",
        )
    });
    assert!(sup.stop().success(), "{}", sup.output());
}

#[test]
fn outputs_are_capped_and_secrets_redacted() {
    let cfg = test_config("")
        .replace(
            "  env_allow: [PATH, HOME]",
            "  env_allow: [PATH, HOME, ORCH_TEST_TOKEN]\n  secrets: [ORCH_TEST_TOKEN]",
        )
        .replace(
            "  heartbeat_seconds: 1",
            "  heartbeat_seconds: 1\n  max_log_bytes: 65536",
        );
    let p = Project::with_config(&cfg);
    p.drop_task(
        "leak.yaml",
        "description: \"deploy with s3cr3t-value-123\\n@fake env=ORCH_TEST_TOKEN flood=5000000\"\n",
    );
    let out = p
        .cmd(&["start", "--once"])
        .env("ORCH_TEST_TOKEN", "s3cr3t-value-123")
        .output()
        .expect("run");
    assert!(out.status.success());
    let output = p.read("context/agent_outputs/leak_output.md");
    assert!(
        output.contains("ORCH_TEST_TOKEN=***") && !output.contains("s3cr3t"),
        "secret leaked into the output"
    );
    let log = std::fs::metadata(p.path("context/logs/leak/attempt-1.log"))
        .expect("log")
        .len();
    assert!(log < 70_000, "log not capped: {log} bytes");
    assert!(
        p.read("context/logs/leak/attempt-1.log")
            .contains("bytes of output dropped")
    );
    // A secret the user pasted into the description stays out of every record orchestrate writes.
    for f in [
        "tasks/completed/leak_result.yaml",
        "context/completed_tasks.json",
        "context/current_state.md",
        "context/logs/leak/attempt-1.prompt.md",
    ] {
        let text = p.read(f);
        assert!(!text.contains("s3cr3t"), "secret in {f}: {text}");
    }
    let payload: String = p
        .db()
        .query_row("SELECT payload FROM tasks WHERE id = 'leak'", [], |r| {
            r.get(0)
        })
        .expect("row");
    assert!(
        !payload.contains("s3cr3t") && payload.contains("***"),
        "{payload}"
    );
}

#[test]
fn mirror_rebuild_matches_the_tree() {
    let p = Project::new();
    p.drop_task("m1.yaml", "description: \"@fake print=ok\"\n");
    p.drop_task("m2.yaml", "description: \"@fake exit=3\"\nmax_retries: 0\n");
    p.drop_task("m3.yaml", "description: x\ndependencies: [missing]\n");
    p.run(&["start", "--once"]).assert_code(0);
    std::fs::remove_file(p.path(".orchestrate/state.db")).expect("drop the mirror");
    p.run(&["mirror", "rebuild"]).assert_code(0);
    assert_eq!(p.mirror_states(), p.tree_states());
    assert_eq!(
        p.tree_states(),
        vec![
            ("m1".into(), "completed".into()),
            ("m2".into(), "failed".into()),
            ("m3".into(), "pending".into())
        ]
    );
}

#[test]
fn detach_and_stop() {
    let p = Project::new();
    let run = p.run(&["start", "--detach"]);
    run.assert_code(0);
    assert!(run.stdout().contains("started in the background"));
    let pid = read_pid(&p.path(".orchestrate/supervisor.pid"));
    p.drop_task("bg.yaml", "description: hi\n");
    wait_for("bg completed", Duration::from_secs(10), || {
        p.tasks_in("completed") == vec!["bg"]
    });
    let status = p.run(&["status", "--json"]).assert_code(0).json();
    assert_eq!(status["supervisors"][0]["pid"], pid);
    p.run(&["stop"]).assert_code(0);
    wait_for("supervisor gone", Duration::from_secs(5), || {
        process_gone(pid)
    });
}

/// A task fails for good (max_retries 0), `orchestrate retry` puts it back, and it reruns and
/// completes; nothing is quarantined. With `pause_at`, the retry comes while the supervisor is held at
/// that commit point of the failure.
fn retry_reruns_a_failed_task(pause_at: Option<&str>) {
    let p = Project::new();
    let env: Vec<(&str, &str)> = match pause_at {
        Some(point) => vec![
            ("ORCHESTRATE_PAUSE_AT", point),
            ("ORCHESTRATE_PAUSE_MS", "1500"),
        ],
        None => vec![],
    };
    let mut sup = p.start_with_env(&env);
    p.drop_task(
        "x.yaml",
        "description: \"@fake fail-until=x.count:2\"\nmax_retries: 0\n",
    );
    match pause_at {
        Some(point) => wait_for("the commit to pause", Duration::from_secs(10), || {
            sup.output().contains(&format!("paused at {point}"))
        }),
        None => wait_for("x failed", Duration::from_secs(10), || {
            p.tasks_in("failed") == vec!["x"]
        }),
    }
    p.run(&["retry", "x"]).assert_code(0);
    wait_for("x completed", Duration::from_secs(15), || {
        p.tasks_in("completed") == vec!["x"]
    });
    assert!(sup.stop().success(), "{}", sup.output());
    assert!(
        p.files("tasks/quarantine").is_empty(),
        "{:?}",
        p.files("tasks/quarantine")
    );
    assert_eq!(
        p.result("completed", "x")["attempts"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
}

#[test]
fn regression_retry_while_the_supervisor_runs_reruns_instead_of_quarantining() {
    retry_reruns_a_failed_task(None);
}

#[test]
fn regression_a_retry_while_the_failure_is_being_committed_reruns_the_task() {
    retry_reruns_a_failed_task(Some("finish.after_rename"));
}

#[test]
fn regression_an_invalid_file_named_like_a_running_task_is_quarantined_not_failed() {
    let p = Project::new();
    let mut sup = p.start();
    p.drop_task("a.yaml", "description: \"@fake pidfile=a.pid sleep=1\"\n");
    p.drop_task("z.yaml", "description: after a\ndependencies: [a]\n");
    wait_for("a running", Duration::from_secs(10), || {
        p.path("a.pid").exists()
    });
    p.drop_task("a.yaml", "description: [broken\n");
    wait_for("z completed", Duration::from_secs(15), || {
        p.tasks_in("completed").contains(&"z".to_string())
    });
    assert!(sup.stop().success(), "{}", sup.output());
    assert_eq!(p.tasks_in("completed"), vec!["a", "z"]);
    assert!(
        p.files("tasks/failed").is_empty(),
        "{:?}",
        p.files("tasks/failed")
    );
    assert!(
        p.read("tasks/quarantine/a.yaml.reason.txt")
            .contains("named like existing task a")
    );
}

/// A supervisor running task `c`, whose agent ignores SIGTERM, and `orchestrate cancel c` under way:
/// the supervisor has seen the cancel and is inside its kill grace period.
fn cancel_a_stubborn_task(p: &Project) -> (Supervisor, std::process::Child) {
    let sup = p.start();
    p.drop_task(
        "c.yaml",
        "description: \"@fake pidfile=c.pid ignore-term sleep=60\"\n",
    );
    wait_for("c running", Duration::from_secs(10), || {
        p.path("c.pid").exists()
    });
    let cancel = p
        .cmd(&["cancel", "c"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("cancel");
    wait_for("cancel seen", Duration::from_secs(10), || {
        sup.output().contains("cancelling c")
    });
    (sup, cancel)
}

#[test]
fn regression_a_cancel_followed_by_a_shutdown_stays_cancelled() {
    let p = Project::new();
    let (mut sup, mut cancel) = cancel_a_stubborn_task(&p);
    assert!(sup.stop().success());
    let _ = wait_child(&mut cancel, Duration::from_secs(30));
    assert_eq!(
        p.tasks_in("failed"),
        vec!["c"],
        "pending: {:?}",
        p.tasks_in("pending")
    );
    assert_eq!(
        p.result("failed", "c")["attempts"][0]["outcome"],
        "cancelled"
    );
}

#[test]
fn regression_a_grandchild_that_left_the_process_group_does_not_outlive_the_attempt() {
    let p = Project::new();
    p.drop_task(
        "esc.yaml",
        "description: \"@fake escape=escaped.pid print=done\"\n",
    );
    p.run(&["start", "--once"]).assert_code(0);
    assert_eq!(p.tasks_in("completed"), vec!["esc"]);
    let pid = read_pid(&p.path("escaped.pid"));
    wait_for("escaped grandchild gone", Duration::from_secs(5), || {
        process_gone(pid)
    });
}

#[test]
fn regression_recovery_survives_a_duplicate_dropped_while_the_supervisor_was_down() {
    let p = Project::new();
    let mut sup = p.start();
    p.drop_task("r1.yaml", "description: \"@fake pidfile=r1.pid sleep=1\"\n");
    p.drop_task("r2.yaml", "description: \"@fake pidfile=r2.pid sleep=1\"\n");
    wait_for("both running", Duration::from_secs(10), || {
        p.path("r1.pid").exists() && p.path("r2.pid").exists()
    });
    sup.sigkill();
    p.drop_task("r1.yaml", "description: a copy from a sync client\n");
    p.run(&["start", "--once"]).assert_code(0);
    assert_eq!(p.tasks_in("completed"), vec!["r1", "r2"]);
    assert!(p.files("tasks/quarantine").contains(&"r1.yaml".to_string()));
    assert_eq!(
        p.result("completed", "r1")["attempts"][0]["outcome"],
        "lost"
    );
    assert_eq!(p.mirror_states(), p.tree_states());
}

/// (start, end) of each attempt in result files, as comparable strings.
fn spans(p: &Project, ids: &[String]) -> Vec<(String, String)> {
    ids.iter()
        .map(|id| {
            let a = &p.result("completed", id)["attempts"][0];
            (
                a["started_at"].as_str().expect("start").to_string(),
                a["finished_at"].as_str().expect("end").to_string(),
            )
        })
        .collect()
}

#[test]
fn max_instances_limits_how_many_run_at_once() {
    let p = Project::with_config(
        &test_config("").replace("    max_instances: 8", "    max_instances: 2"),
    );
    for i in 0..6 {
        p.drop_task(&format!("m{i}.yaml"), "description: \"@fake sleep=0.3\"\n");
    }
    p.age_pending(&[
        "m0.yaml", "m1.yaml", "m2.yaml", "m3.yaml", "m4.yaml", "m5.yaml",
    ]);
    p.run(&["start", "--once"]).assert_code(0);
    let ids = p.tasks_in("completed");
    assert_eq!(ids.len(), 6);
    let s = spans(&p, &ids);
    // At each start, count the attempts running at that moment (including itself).
    let most = s
        .iter()
        .map(|(t, _)| s.iter().filter(|(a, b)| a <= t && t < b).count())
        .max()
        .unwrap_or(0);
    assert_eq!(most, 2, "{s:?}");
}

#[test]
fn higher_priority_runs_first_and_fifo_within_a_priority() {
    let p = Project::with_config(
        &test_config("").replace("  max_concurrent: 8", "  max_concurrent: 1"),
    );
    // Arrival order l1, n1, h1, n2, h2; all ready at start-up, so only priority and FIFO decide.
    let order = [
        ("l1", "low"),
        ("n1", "normal"),
        ("h1", "high"),
        ("n2", "normal"),
        ("h2", "high"),
    ];
    for (name, prio) in order {
        p.drop_task(
            &format!("{name}.yaml"),
            &format!("description: x\npriority: {prio}\n"),
        );
    }
    p.age_pending(
        &order
            .map(|(n, _)| format!("{n}.yaml"))
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    p.run(&["start", "--once"]).assert_code(0);
    let mut order: Vec<(String, String)> = p
        .tasks_in("completed")
        .into_iter()
        .map(|id| {
            (
                p.result("completed", &id)["attempts"][0]["started_at"]
                    .as_str()
                    .expect("t")
                    .to_string(),
                id,
            )
        })
        .collect();
    order.sort();
    let ids: Vec<&str> = order.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids, vec!["h1", "h2", "n1", "n2", "l1"]);
}

#[test]
fn regression_subtasks_run_on_the_shell_agent_and_survive_a_startup_scan() {
    let cfg = test_config("").replace(
        "routing:",
        "  shell:\n    kind: command\n    command: sh\n    args: [-c, \"{description}\"]\nrouting:",
    );
    let p = Project::with_config(&cfg);
    p.drop_task(
        "steps.yaml",
        "description: two steps\nagent: shell\nsubtasks: [\"echo one > one.txt\", \"cat one.txt\"]\n",
    );
    // Old enough that the start-up scan reads it at once (the path that used to drop the children).
    p.age_pending(&["steps.yaml"]);
    p.run(&["start", "--once"]).assert_code(0);
    assert_eq!(p.tasks_in("completed"), vec!["steps", "steps.1", "steps.2"]);
    assert!(
        p.read("context/agent_outputs/steps.2_output.md")
            .contains("one")
    );
}

#[test]
fn context_files_and_workdirs_outside_the_project_are_refused() {
    let p = Project::new();
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join("secret.txt"), "top secret").expect("write");
    std::os::unix::fs::symlink(outside.path().join("secret.txt"), p.path("link.txt"))
        .expect("symlink");
    p.drop_task(
        "up.yaml",
        "description: x\ncontext_files: [../secret.txt]\n",
    );
    p.drop_task(
        "abs.yaml",
        &format!("description: x\nworkdir: {}\n", outside.path().display()),
    );
    p.drop_task("sym.yaml", "description: x\ncontext_files: [link.txt]\n");
    p.run(&["start", "--once"]).assert_code(0);
    assert_eq!(p.tasks_in("failed"), vec!["abs", "sym", "up"]);
    for id in ["abs", "sym", "up"] {
        let r = p.result("failed", id);
        let err = r["error"].as_str().expect("error");
        assert!(
            err.contains("outside the allowed root") || err.contains("does not exist"),
            "{id}: {err}"
        );
        // Refused before anything ran, and not retried: retrying cannot change where a path points.
        assert_eq!(r["attempts"].as_array().map(Vec::len), Some(1), "{id}: {r}");
        assert!(r["attempts"][0]["exit_code"].is_null(), "{id}: {r}");
    }
    assert!(
        p.result("failed", "sym")["error"]
            .as_str()
            .expect("e")
            .contains("outside the allowed root")
    );
}

#[test]
fn a_rejected_file_that_lost_its_explanation_in_a_crash_gets_one_at_start() {
    let p = Project::new();
    // As a crash between the move to failed/ and the write of X.error.txt would leave it.
    std::fs::write(p.path("tasks/failed/broken.yaml"), "description: [oops\n").expect("write");
    p.run(&["start", "--once"]).assert_code(0);
    let err = p.read("tasks/failed/broken.error.txt");
    assert!(err.starts_with("broken.yaml:1:"), "{err}");
}

#[test]
fn regression_a_retry_that_starts_at_once_is_not_quarantined_as_a_duplicate() {
    // A failed attempt's report and the next start can overtake the first start's "claimed" news.
    let cfg = test_config("")
        .replace("max_retries: 1", "max_retries: 3")
        .replace("retry_delay_seconds: 0.2", "retry_delay_seconds: 0");
    let p = Project::with_config(&cfg);
    let names: Vec<String> = (0..8).map(|i| format!("r{i}.yaml")).collect();
    for n in &names {
        p.drop_task(n, "description: \"@fake exit=3\"\n");
    }
    p.age_pending(&names.iter().map(String::as_str).collect::<Vec<_>>());
    p.run(&["start", "--once"]).assert_code(0);
    assert!(
        p.files("tasks/quarantine").is_empty(),
        "{:?}",
        p.files("tasks/quarantine")
    );
    assert_eq!(p.tasks_in("failed").len(), 8, "{:?}", p.tasks_in("failed"));
    for i in 0..8 {
        assert_eq!(
            p.result("failed", &format!("r{i}"))["attempts"]
                .as_array()
                .map(Vec::len),
            Some(4),
            "r{i}"
        );
    }
}

#[test]
fn regression_a_cancel_while_the_claim_is_under_way_cancels_before_the_agent_starts() {
    let p = Project::new();
    let mut sup = p.start_with_env(&[
        ("ORCHESTRATE_PAUSE_AT", "claim.after_record"),
        ("ORCHESTRATE_PAUSE_MS", "1500"),
    ]);
    p.drop_task("c.yaml", "description: \"@fake pidfile=c.pid\"\n");
    wait_for("the claim to pause", Duration::from_secs(10), || {
        sup.output().contains("paused at claim.after_record")
    });
    let mut cancel = p
        .cmd(&["cancel", "c"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("cancel");
    wait_for("c failed", Duration::from_secs(15), || {
        p.tasks_in("failed") == vec!["c"]
    });
    let _ = wait_child(&mut cancel, Duration::from_secs(30));
    assert!(sup.stop().success(), "{}", sup.output());
    assert!(!p.path("c.pid").exists(), "the agent ran after the cancel");
    let r = p.result("failed", "c");
    assert_eq!(r["error"], "cancelled by user", "{r}");
    assert_eq!(r["attempts"].as_array().map(Vec::len), Some(0), "{r}");
    assert!(p.tasks_in("pending").is_empty() && p.tasks_in("completed").is_empty());
}

#[test]
fn regression_a_rescan_during_a_claim_that_is_put_back_keeps_the_task_history() {
    let p =
        Project::with_config(&test_config("").replace("rescan_seconds: 2", "rescan_seconds: 1"));
    // The second claim (the retry) pauses long enough for a rescan, and finds the file changed.
    let mut sup = p.start_with_env(&[
        ("ORCHESTRATE_PAUSE_AT", "claim.after_record:2"),
        ("ORCHESTRATE_PAUSE_MS", "2500"),
    ]);
    p.drop_task("h.yaml", "description: \"@fake fail-until=h.count:2\"\n");
    wait_for(
        "the retry's claim to pause",
        Duration::from_secs(15),
        || sup.output().contains("paused at claim.after_record"),
    );
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(p.path("tasks/assigned/h.yaml"))
        .expect("open the claimed file");
    std::io::Write::write_all(&mut f, b"# edited while being claimed\n").expect("append");
    drop(f);
    wait_for("h completed", Duration::from_secs(20), || {
        p.tasks_in("completed") == vec!["h"]
    });
    assert!(sup.stop().success(), "{}", sup.output());
    assert!(sup.output().contains("file changed while being claimed"));
    let r = p.result("completed", "h");
    let attempts = r["attempts"].as_array().expect("attempts");
    assert_eq!(
        attempts.len(),
        2,
        "the first, failed attempt was forgotten: {r}"
    );
    assert_eq!(attempts[1]["n"], 2, "{r}");
}

#[test]
fn regression_a_cancel_survives_a_supervisor_killed_before_the_task_stopped() {
    let p = Project::new();
    let (mut sup, mut cancel) = cancel_a_stubborn_task(&p);
    // The agent ignores SIGTERM, so the supervisor is inside its kill grace period: die there.
    sup.sigkill();
    // It would wait for the dead supervisor until its own deadline.
    let _ = cancel.kill();
    let _ = cancel.wait();
    assert_eq!(p.tasks_in("assigned"), vec!["c"]);
    let mut again = p.start();
    wait_for(
        "c failed after the restart",
        Duration::from_secs(20),
        || p.tasks_in("failed") == vec!["c"],
    );
    assert!(again.stop().success(), "{}", again.output());
    let r = p.result("failed", "c");
    assert_eq!(r["error"], "cancelled by user", "{r}");
    assert!(p.tasks_in("completed").is_empty() && p.tasks_in("pending").is_empty());
    assert!(
        p.files(".orchestrate/cancel").is_empty(),
        "{:?}\n{}",
        p.files(".orchestrate/cancel"),
        again.output()
    );
}

#[test]
fn regression_completed_tasks_json_keeps_output_and_diff_files_across_restarts() {
    let p = Project::new();
    p.drop_task("first.yaml", "description: \"@fake print=one\"\n");
    p.run(&["start", "--once"]).assert_code(0);
    p.drop_task("second.yaml", "description: \"@fake print=two\"\n");
    p.run(&["start", "--once"]).assert_code(0);
    let list: serde_json::Value =
        serde_json::from_str(&p.read("context/completed_tasks.json")).expect("json");
    let entries = list.as_array().expect("a list");
    assert_eq!(entries.len(), 2, "{list}");
    for e in entries {
        // The first entry comes from what the second start knew of the first run.
        assert_eq!(
            e["output_file"],
            format!(
                "context/agent_outputs/{}_output.md",
                e["id"].as_str().expect("id")
            ),
            "{list}"
        );
        assert!(e["diff_file"].is_string(), "{list}");
    }
}

#[test]
fn regression_a_second_supervisor_says_it_shares_the_tree() {
    let p = Project::new();
    let mut first = p.start();
    let mut second = p.start();
    let said = format!(
        "another supervisor is running on this tree (pid {}); they will share the work",
        first.pid()
    );
    // Both write to one log, where the first one's `watching` already stands: wait for the line.
    wait_for(
        "the second supervisor to say so",
        Duration::from_secs(15),
        || second.output().contains(&said),
    );
    // It says so before it handles SIGTERM; its own `watching` line comes after (a second one in
    // the shared log), and only then can it stop gracefully.
    wait_for(
        "the second supervisor to watch",
        Duration::from_secs(15),
        || second.output().matches(" watching ").count() == 2,
    );
    assert!(second.stop().success());
    assert!(first.stop().success());
}

#[test]
fn status_shows_how_long_a_task_runs_its_log_and_whole_reasons_when_piped() {
    let p = Project::new();
    let mut sup = p.start();
    p.drop_task(
        "slow.yaml",
        "description: \"@fake pidfile=slow.pid sleep=30\"\n",
    );
    let deps: Vec<String> = (0..12)
        .map(|i| format!("a_dependency_named_at_length_{i}"))
        .collect();
    p.drop_task(
        "blocked.yaml",
        &format!("description: x\ndependencies: [{}]\n", deps.join(", ")),
    );
    wait_for("slow running", Duration::from_secs(10), || {
        p.path("slow.pid").exists()
    });
    wait_for(
        "blocked to wait with a note",
        Duration::from_secs(10),
        || p.run(&["status"]).stdout().contains("blocked"),
    );
    let out = p.run(&["status"]).assert_code(0).stdout();
    assert!(
        out.contains("attempt 1, running ") && out.contains("log context/logs/slow/attempt-1.log"),
        "{out}"
    );
    // Piped, the reason is whole: the last dependency is named, not cut off.
    assert!(out.contains(&deps[11]), "{out}");
    let json = p.run(&["status", "--json"]).assert_code(0).json();
    assert!(json["running"][0]["elapsed_seconds"].is_u64(), "{json}");
    assert!(sup.stop().success(), "{}", sup.output());
}

#[test]
fn follow_lines_carry_the_agent_and_why_a_task_failed() {
    let p = Project::new();
    p.drop_task(
        "bad.yaml",
        "description: \"@fake stderr=the-disk-is-on-fire exit=3\"\nmax_retries: 0\n",
    );
    p.run(&["start", "--once"]).assert_code(0);
    let json = p
        .run(&["follow", "--json", "--since", "0", "--limit", "3"])
        .assert_code(0)
        .stdout();
    let failed: serde_json::Value = json
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line"))
        .find(|e| e["state"] == "failed")
        .unwrap_or_else(|| panic!("no failed event in {json}"));
    assert_eq!(failed["agent"], "fake", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("exited with code 3") && e.contains("the-disk-is-on-fire")),
        "{failed}"
    );
    let human = p
        .run(&["follow", "--since", "0", "--limit", "3"])
        .assert_code(0)
        .stdout();
    let line = human
        .lines()
        .find(|l| l.contains(" failed "))
        .unwrap_or_else(|| panic!("no failed line in {human}"));
    assert!(
        line.contains(" fake ") && line.contains(": exited with code 3"),
        "{line}"
    );
}

#[test]
fn retry_of_a_task_in_its_back_off_runs_it_now() {
    // A back-off of ten minutes: only `retry` can make it run within the test's bound.
    let p = Project::with_config(
        &test_config("").replace("retry_delay_seconds: 0.2", "retry_delay_seconds: 600"),
    );
    let mut sup = p.start();
    p.drop_task(
        "flaky.yaml",
        "description: \"@fake fail-until=flaky.count:2\"\n",
    );
    wait_for("flaky in its back-off", Duration::from_secs(20), || {
        p.run(&["status"]).stdout().contains("retry back-off until")
    });
    let r = p.run(&["retry", "flaky"]);
    r.assert_code(0);
    assert!(
        r.stdout().contains("runs as soon as a slot is free"),
        "{}",
        r.stdout()
    );
    wait_for("flaky completed", Duration::from_secs(20), || {
        p.tasks_in("completed") == vec!["flaky"]
    });
    let result = p.result("completed", "flaky");
    assert_eq!(
        result["attempts"].as_array().map(Vec::len),
        Some(2),
        "{result}"
    );
    assert!(sup.stop().success(), "{}", sup.output());
}

#[test]
fn current_state_md_shows_waiting_and_failed_tasks_and_follows_a_cancel() {
    let p = Project::new();
    let mut sup = p.start();
    p.drop_task("blocked.yaml", "description: x\ndependencies: [nosuch]\n");
    p.drop_task(
        "broke.yaml",
        "description: \"@fake stderr=boom exit=3\"\nmax_retries: 0\n",
    );
    let state = || std::fs::read_to_string(p.path("context/current_state.md")).unwrap_or_default();
    wait_for(
        "the waiting and the failed task on the page",
        Duration::from_secs(20),
        || {
            let s = state();
            s.contains("## Waiting\n\n- blocked: waiting for nosuch (no such task exists yet)")
                && s.contains("## Recently failed\n\n- broke (fake): exited with code 3")
        },
    );
    p.run(&["cancel", "blocked"]).assert_code(0);
    wait_for(
        "the cancelled task to leave the page's waiting list",
        Duration::from_secs(20),
        || !state().contains("- blocked:"),
    );
    assert!(sup.stop().success(), "{}", sup.output());
}
