//! Command-line behaviour that needs no running supervisor: init, add, validate, read commands, exit codes.

mod common;

use common::*;

#[test]
fn init_lays_out_the_project() {
    let p = Project::new();
    for d in ["pending", "assigned", "completed", "failed", "quarantine"] {
        assert!(p.path(&format!("tasks/{d}")).is_dir(), "{d}");
    }
    assert!(p.path("context/project_overview.md").is_file());
    assert!(p.path(".orchestrate").is_dir());
    assert!(p.read(".gitignore").contains(".orchestrate/"));
    // Idempotent: a second init changes nothing.
    let again = p.run(&["init"]);
    again.assert_code(0);
    assert!(again.stdout().contains("already set up"));
}

/// The `next:` line `init` prints works when pasted into a shell, with the default configuration.
#[test]
fn regression_the_hint_init_prints_works_as_typed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(BIN)
        .arg("-C")
        .arg(dir.path())
        .arg("init")
        .output()
        .expect("init");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let hint = stdout
        .lines()
        .find_map(|l| l.strip_prefix("next: "))
        .unwrap_or_else(|| panic!("no next: line in {stdout}"));
    let bin_dir = std::path::Path::new(BIN).parent().expect("bin dir");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = std::process::Command::new("sh")
        .args(["-c", hint])
        .current_dir(dir.path())
        .env("PATH", path)
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("sh");
    let status =
        wait_child(&mut child, std::time::Duration::from_secs(60)).expect("the hint finishes");
    assert!(status.success(), "`{hint}` failed: {status:?}");
    let done = std::fs::read_dir(dir.path().join("tasks/completed"))
        .expect("completed/")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with("_result.yaml"))
        .count();
    assert_eq!(done, 1, "`{hint}` did not complete a task");
    let output =
        std::fs::read_to_string(dir.path().join("context/agent_outputs/task_001_output.md"))
            .expect("output");
    assert!(output.contains("hello from orchestrate"), "{output}");
}

#[test]
fn add_writes_valid_tasks_with_unique_ids() {
    let p = Project::new();
    let a = p.run(&["add", "first thing"]);
    a.assert_code(0);
    assert_eq!(a.stdout().trim(), "task_001");
    let b = p.run(&[
        "add",
        "second",
        "--priority",
        "high",
        "--agent",
        "fake",
        "--after",
        "task_001",
        "--context",
        "context/project_overview.md",
    ]);
    assert_eq!(b.stdout().trim(), "task_002");
    // Ids are unique across the whole tree, not just pending/.
    std::fs::rename(
        p.path("tasks/pending/task_002.yaml"),
        p.path("tasks/completed/task_002.yaml"),
    )
    .expect("mv");
    assert_eq!(p.run(&["add", "third"]).stdout().trim(), "task_003");
    p.run(&[
        "validate",
        p.path("tasks/pending/task_001.yaml")
            .to_str()
            .expect("utf8"),
    ])
    .assert_code(0);
    let t = p.read("tasks/pending/task_003.yaml");
    assert!(t.contains("description: third"), "{t}");
    let rows = p.run(&["tasks", "--json"]).assert_code(0).json();
    let ids: Vec<&str> = rows
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"task_001") && ids.contains(&"task_003"),
        "{rows}"
    );
    // Usage errors exit 2 and name the problem.
    let bad = p.run(&["add", "x", "--agent", "nope"]);
    bad.assert_code(2);
    assert!(bad.stderr().contains("unknown agent `nope`"));
    p.run(&["add", "x", "--priority", "urgent"]).assert_code(2);
    // A dependency that exists nowhere is a typo, not a wait.
    let bad = p.run(&["add", "x", "--after", "nosuch"]);
    bad.assert_code(2);
    assert!(
        bad.stderr().contains("no task nosuch exists"),
        "{}",
        bad.stderr()
    );
    assert!(!p.path("tasks/pending/task_004.yaml").exists());
}

#[test]
fn validate_reports_line_and_column_for_ci() {
    let p = Project::new();
    std::fs::write(p.path("good.yaml"), "description: ok\nagent: fake\n").expect("write");
    std::fs::write(
        p.path("bad.yaml"),
        "description: ok\npriority: high\npriority: low\n",
    )
    .expect("write");
    std::fs::write(p.path("agent.yaml"), "description: ok\nagent: clade\n").expect("write");
    let good = p.path("good.yaml");
    let bad = p.path("bad.yaml");
    let agent = p.path("agent.yaml");
    p.run(&["validate", good.to_str().expect("utf8")])
        .assert_code(0);
    let r = p.run(&[
        "validate",
        good.to_str().expect("utf8"),
        bad.to_str().expect("utf8"),
        agent.to_str().expect("utf8"),
    ]);
    r.assert_code(1);
    let err = r.stderr();
    assert!(
        err.contains(&format!(
            "{}:3:1: error: duplicate mapping key",
            bad.display()
        )),
        "{err}"
    );
    assert!(err.contains("agent `clade` is not configured"), "{err}");
    assert!(err.contains("2 of 3 file(s) invalid"), "{err}");
    let j = p
        .run(&["--json", "validate", bad.to_str().expect("utf8")])
        .json();
    assert_eq!(j[0]["line"], 3);
    assert_eq!(j[0]["column"], 1);
}

#[test]
fn config_errors_exit_2_naming_file_key_and_line() {
    let p = Project::with_config("orchestrator:\n  max_concurrent: 4\n  max_concurent: 8\n");
    let r = p.run(&["status"]);
    r.assert_code(2);
    assert!(
        r.stderr().contains("config.yaml:3:") && r.stderr().contains("max_concurent"),
        "{}",
        r.stderr()
    );
    let p = Project::with_config(
        &test_config("").replace("fallback: [fake]", "fallback: [fake, ghost]"),
    );
    let r = p.run(&["start", "--once"]);
    r.assert_code(2);
    assert!(
        r.stderr().contains("routing.fallback[1]") && r.stderr().contains("ghost"),
        "{}",
        r.stderr()
    );
    let r = p.run(&["validate", "--check-config"]);
    r.assert_code(1);
    assert!(r.stderr().contains("ghost"), "{}", r.stderr());
}

#[test]
fn read_commands_work_without_a_supervisor_and_speak_json() {
    let p = Project::new();
    p.run(&["add", "hello"]).assert_code(0);
    let s = p.run(&["status", "--json"]).assert_code(0).json();
    assert_eq!(s["counts"]["pending"], 1);
    assert!(s["supervisors"].as_array().expect("list").is_empty());
    let human = p.run(&["status"]).assert_code(0).stdout();
    assert!(
        human.contains("1 pending") && human.contains("not running"),
        "{human}"
    );
    let shown = p.run(&["show", "task_001", "--json"]).assert_code(0).json();
    assert_eq!(shown["state"], "pending");
    assert!(shown["task"].as_str().expect("file").contains("hello"));
    p.run(&["show", "task_999"]).assert_code(2);
    let agents = p.run(&["agents", "--json"]).assert_code(0).json();
    let fake = agents
        .as_array()
        .expect("agents")
        .iter()
        .find(|a| a["name"] == "fake")
        .expect("fake agent");
    assert_eq!(fake["available"], true);
    p.run(&["tasks", "--status", "bogus"]).assert_code(2);
}

#[test]
fn agents_reports_missing_clis_with_install_hints() {
    let p = Project::with_config(&test_config("").replace(
        "routing:",
        "  claude:\n    kind: claude\n    command: claude-not-installed-here\nrouting:",
    ));
    let agents = p.run(&["agents", "--json"]).assert_code(0).json();
    let c = agents
        .as_array()
        .expect("agents")
        .iter()
        .find(|a| a["name"] == "claude")
        .expect("claude");
    assert_eq!(c["available"], false);
    assert_eq!(
        c["install_hint"],
        "npm install -g @anthropic-ai/claude-code"
    );
}

#[test]
fn tasks_for_unavailable_agents_fall_back_or_wait_with_a_reason() {
    let cfg = test_config("").replace(
        "routing:\n  fallback: [fake]",
        "  missing:\n    kind: command\n    command: definitely-not-installed-cmd\nrouting:\n  fallback: [missing, fake]",
    );
    let p = Project::with_config(&cfg);
    p.drop_task("routed.yaml", "description: hi\n");
    p.drop_task("named.yaml", "description: hi\nagent: missing\n");
    p.run(&["start", "--once"]).assert_code(0);
    let r = p.result("completed", "routed");
    assert_eq!(r["agent"], "fake");
    assert!(
        r["chosen_because"]
            .as_str()
            .expect("why")
            .contains("definitely-not-installed-cmd` not found"),
        "{r}"
    );
    // Named agent missing: falls down the chain too.
    assert_eq!(p.result("completed", "named")["agent"], "fake");
}

#[test]
fn tasks_takes_a_limit_active_and_quarantined() {
    let p = Project::new();
    for d in ["one", "two", "three"] {
        p.run(&["add", d]).assert_code(0);
    }
    let last_two = p
        .run(&["tasks", "--json", "--limit", "2"])
        .assert_code(0)
        .json();
    let ids: Vec<&str> = last_two
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["task_002", "task_003"], "{last_two}");
    // Nothing runs without a supervisor: `active` is `running`.
    let active = p
        .run(&["tasks", "--json", "--status", "active"])
        .assert_code(0)
        .json();
    assert_eq!(active, serde_json::json!([]));
    std::fs::write(p.path("tasks/quarantine/dup.yaml"), "description: x\n").expect("write");
    std::fs::write(
        p.path("tasks/quarantine/dup.yaml.reason.txt"),
        "task id dup already exists in completed/\n",
    )
    .expect("write");
    let q = p
        .run(&["tasks", "--json", "--status", "quarantined"])
        .assert_code(0)
        .json();
    assert_eq!(
        q,
        serde_json::json!([{
            "file": "tasks/quarantine/dup.yaml",
            "reason": "task id dup already exists in completed/"
        }])
    );
    p.run(&["tasks", "--status", "nonsense"]).assert_code(2);
}
