//! Warm worktrees: `workspace.setup` commands run in a new worktree before the agent (their output
//! opening the attempt's log, a failure failing the attempt), and `workspace.link` makes ignored
//! folders and files of the user's tree available there without ever entering the task's commit.
//! Real repositories made with `git init` in temp dirs, the real binary, `sh` as the agent.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// A project whose root is a git repository with one commit holding `files`, configured with the
/// `shell` agent and the `workspace` keys in `workspace`.
fn repo_project(workspace: &str, files: &[(&str, &str)]) -> Project {
    let config = test_config(&format!("workspace:\n{workspace}")).replace(
        "agents:\n",
        "agents:\n  shell:\n    kind: command\n    command: sh\n    args: [-c, \"{description}\"]\n    max_instances: 4\n",
    );
    let p = Project::with_config(&config);
    git(p.root(), &["init", "-q"]);
    for (name, text) in files {
        if let Some(dir) = Path::new(name).parent() {
            std::fs::create_dir_all(p.path(&dir.to_string_lossy())).expect("mkdir");
        }
        std::fs::write(p.path(name), text).expect("write");
        git(p.root(), &["add", name]);
    }
    git(p.root(), &["commit", "-qm", "first"]);
    p
}

fn shell_task(p: &Project, id: &str, script: &str) {
    p.drop_task(
        &format!("{id}.yaml"),
        &format!(
            "agent: shell\ndescription: {}\n",
            serde_json::to_string(script).expect("json string")
        ),
    );
}

fn wait_done(p: &Project, n: usize) {
    wait_for(
        &format!("{n} tasks finished"),
        Duration::from_secs(90),
        || p.tasks_in("completed").len() + p.tasks_in("failed").len() >= n,
    );
}

/// Nothing of any worktree left: no folder, no git record, no task branch.
fn assert_no_worktree_left(p: &Project) {
    assert!(
        p.files(".orchestrate/worktrees").is_empty(),
        "{:?}",
        p.files(".orchestrate/worktrees")
    );
    let list = git(p.root(), &["worktree", "list"]);
    assert_eq!(list.lines().count(), 1, "{list}");
    assert_eq!(git(p.root(), &["branch", "--list", "orchestrate/*"]), "");
}

#[test]
fn setup_copies_an_ignored_env_file_from_the_source_and_the_agent_reads_it() {
    let p = repo_project(
        "  setup:\n    - 'cp \"$ORCHESTRATE_SOURCE/.env\" . && echo copied for $ORCHESTRATE_TASK_ID'\n    - 'test \"$ORCHESTRATE_WORKTREE\" = \"$(pwd)\" && echo in the worktree top'\n",
        &[(".gitignore", ".env\n"), ("README", "hello\n")],
    );
    std::fs::write(p.path(".env"), "TOKEN=abc123\n").expect("write .env");
    shell_task(&p, "envtask", "echo agent starts; cp .env seen.txt");
    let mut s = p.start();
    wait_done(&p, 1);
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("completed", "envtask");
    assert_eq!(r["files_modified"], serde_json::json!(["seen.txt"]), "{r}");
    assert_eq!(p.read("seen.txt"), "TOKEN=abc123\n");
    // The copy stayed in the worktree: ignored, so neither committed nor landed over the user's.
    let diff = p.read("context/diffs/envtask.diff");
    assert!(!diff.contains("b/.env"), "{diff}");
    assert_eq!(p.read(".env"), "TOKEN=abc123\n");
    let log = p.read(r["attempts"][0]["log_file"].as_str().expect("log_file"));
    let at = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("`{needle}` not in the log:\n{log}"))
    };
    assert!(at("setup 1/2 in ") < at("copied for envtask"), "{log}");
    assert!(at("copied for envtask") < at("setup 1/2 exited with code 0 after"));
    assert!(at("setup 2/2 exited with code 0") > at("in the worktree top"));
    // The agent's own output comes after its setup's, in the same file.
    assert!(
        at("setup 2/2 exited with code 0") < at("agent starts"),
        "{log}"
    );
    assert_no_worktree_left(&p);
}

#[test]
fn a_failing_setup_fails_each_attempt_with_its_output_and_leaves_no_worktree() {
    let p = repo_project(
        "  setup:\n    - 'echo installing; echo \"npm ERR! cannot find left-pad\" >&2; exit 3'\n",
        &[("README", "hello\n")],
    );
    shell_task(&p, "broken", "echo ran > ran.txt");
    let mut s = p.start();
    wait_done(&p, 1);
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("failed", "broken");
    // The test config's max_retries is 1: two attempts, both stopped by the setup.
    let attempts = r["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{r}");
    for a in attempts {
        assert_eq!(a["outcome"], "setup_failed", "{r}");
        let e = a["error"].as_str().expect("error");
        assert!(e.starts_with("workspace.setup[0] `echo installing;"), "{e}");
        assert!(e.contains("exited with code 3 after"), "{e}");
        // stdout and stderr, both (their order is the pipes').
        assert!(e.contains("its output ends with:\n"), "{e}");
        assert!(e.lines().any(|l| l == "installing"), "{e}");
        assert!(
            e.lines().any(|l| l == "npm ERR! cannot find left-pad"),
            "{e}"
        );
        assert!(!e.contains("[orchestrate:"), "{e}");
        let log = p.read(a["log_file"].as_str().expect("log_file"));
        assert!(log.contains("npm ERR! cannot find left-pad"), "{log}");
        assert!(log.contains("setup 1/1 exited with code 3"), "{log}");
    }
    let error = r["error"].as_str().expect("error");
    assert!(error.contains("npm ERR! cannot find left-pad"), "{error}");
    assert!(error.contains("after 2 failed attempt(s)"), "{error}");
    // The agent never ran.
    assert!(!p.path("ran.txt").exists());
    assert_no_worktree_left(&p);
}

#[test]
fn a_linked_node_modules_is_seen_by_the_agent_and_never_committed() {
    // A `name/` pattern matches folders only: a plain symlink named node_modules would be committed.
    let p = repo_project(
        "  link: [node_modules, .cache/tool.db]\n",
        &[
            (".gitignore", "node_modules/\n.cache/\n"),
            ("README", "hi\n"),
        ],
    );
    std::fs::create_dir_all(p.path("node_modules/left-pad")).expect("mkdir");
    std::fs::write(
        p.path("node_modules/left-pad/index.js"),
        "module.exports = 1;\n",
    )
    .expect("w");
    std::fs::create_dir_all(p.path(".cache")).expect("mkdir");
    std::fs::write(p.path(".cache/tool.db"), "warm\n").expect("w");
    // It reads through the links, and adds an entry of its own at the top of node_modules.
    let script = "cat node_modules/left-pad/index.js .cache/tool.db > seen.txt; echo new > node_modules/added-by-agent.js";
    shell_task(&p, "reader", script);
    p.drop_task(
        "kept.yaml",
        &format!(
            "agent: shell\nmerge: branch\ndescription: {}\n",
            serde_json::to_string("cat node_modules/left-pad/index.js > kept.txt").expect("json")
        ),
    );
    let mut s = p.start();
    wait_done(&p, 2);
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("completed", "reader");
    assert_eq!(r["files_modified"], serde_json::json!(["seen.txt"]), "{r}");
    assert_eq!(p.read("seen.txt"), "module.exports = 1;\nwarm\n");
    let diff = p.read("context/diffs/reader.diff");
    assert_eq!(diff.matches("diff --git").count(), 1, "{diff}");
    // The commit itself holds no link: the kept branch's tree is the base plus the agent's file.
    let k = p.result("completed", "kept");
    assert_eq!(k["workspace"]["merge"], "kept", "{k}");
    let base = k["workspace"]["base"].as_str().expect("base");
    let changed = git(p.root(), &["diff", "--name-only", base, "orchestrate/kept"]);
    assert_eq!(changed, "kept.txt\n");
    let tree = git(
        p.root(),
        &["ls-tree", "-r", "--name-only", "orchestrate/kept"],
    );
    assert!(
        !tree.contains("node_modules") && !tree.contains(".cache"),
        "{tree}"
    );
    // The user's folder is as it was: a real folder, the agent's new entry went with the worktree.
    let meta = std::fs::symlink_metadata(p.path("node_modules")).expect("there");
    assert!(meta.is_dir(), "{meta:?}");
    assert_eq!(p.files("node_modules"), vec!["left-pad".to_string()]);
    assert_eq!(
        p.files("node_modules/left-pad"),
        vec!["index.js".to_string()]
    );
    assert_eq!(
        p.read("node_modules/left-pad/index.js"),
        "module.exports = 1;\n"
    );
    assert_eq!(p.read(".cache/tool.db"), "warm\n");
    let log = p.read(r["attempts"][0]["log_file"].as_str().expect("log_file"));
    assert!(
        log.contains("workspace.link[0] `node_modules`: symlinked from "),
        "{log}"
    );
    assert!(p.files(".orchestrate/worktrees").is_empty());
}

#[test]
fn a_tracked_path_in_link_is_refused_once_with_a_clear_error() {
    let p = repo_project(
        "  link: [src]\n",
        &[("src/main.rs", "fn main() {}\n"), ("README", "hi\n")],
    );
    shell_task(&p, "leaky", "echo changed > src/main.rs");
    let mut s = p.start();
    wait_done(&p, 1);
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("failed", "leaky");
    // Retrying cannot help: one attempt.
    assert_eq!(r["attempts"].as_array().map(Vec::len), Some(1), "{r}");
    assert_eq!(r["attempts"][0]["outcome"], "setup_failed", "{r}");
    let e = r["error"].as_str().expect("error");
    assert!(
        e.starts_with("workspace.link[0] `src` is not ignored by git in "),
        "{e}"
    );
    assert!(e.contains("the agent's edits reach your tree"), "{e}");
    assert_eq!(p.read("src/main.rs"), "fn main() {}\n");
    assert_no_worktree_left(&p);
}

#[test]
fn clone_mode_gives_the_worktree_its_own_copy_or_says_once_why_it_cannot() {
    let p = repo_project(
        "  link: [target]\n  link_mode: clone\n",
        &[(".gitignore", "/target\n"), ("README", "hi\n")],
    );
    std::fs::create_dir_all(p.path("target/debug")).expect("mkdir");
    std::fs::write(p.path("target/debug/app"), "binary\n").expect("w");
    for id in ["c1", "c2"] {
        shell_task(
            &p,
            id,
            &format!("cat target/debug/app > {id}.txt; echo {id} > target/debug/app"),
        );
    }
    let mut s = p.start();
    wait_done(&p, 2);
    assert!(s.stop().success(), "{}", s.output());
    let mut cloned = 0;
    for id in ["c1", "c2"] {
        let r = p.result("completed", id);
        assert_eq!(
            r["files_modified"],
            serde_json::json!([format!("{id}.txt")]),
            "{r}"
        );
        let log = p.read(r["attempts"][0]["log_file"].as_str().expect("log_file"));
        if log.contains("`target`: cloned (copy-on-write)") {
            cloned += 1;
        } else {
            assert!(
                log.contains("`target`: symlinked (the file system cannot clone: "),
                "{log}"
            );
        }
    }
    let out = s.output();
    let said = out
        .matches("workspace.link_mode clone: cannot clone")
        .count();
    if cloned == 2 {
        // Each worktree wrote its own copy: the user's file is untouched.
        assert_eq!(p.read("target/debug/app"), "binary\n");
        assert_eq!(said, 0, "{out}");
    } else {
        // Symlinks share the user's folder (documented): the fallback is said once, not per task.
        assert_eq!(said, 1, "{out}");
    }
    assert!(p.files(".orchestrate/worktrees").is_empty());
}

#[test]
fn a_cancel_during_setup_stops_it_and_removes_the_worktree() {
    let p = repo_project(
        "  setup:\n    - 'echo $$ > \"$ORCHESTRATE_SOURCE/setup.pid\"; exec sleep 60'\n",
        &[(".gitignore", "setup.pid\n"), ("README", "hi\n")],
    );
    shell_task(&p, "slow", "echo ran > ran.txt");
    let mut s = p.start();
    wait_for("the setup running", Duration::from_secs(60), || {
        std::fs::read_to_string(p.path("setup.pid")).is_ok_and(|t| t.ends_with('\n'))
    });
    let pid: u32 = p.read("setup.pid").trim().parse().expect("pid");
    p.run(&["cancel", "slow"]).assert_code(0);
    wait_done(&p, 1);
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("failed", "slow");
    assert_eq!(r["error"], "cancelled by user", "{r}");
    assert_eq!(r["attempts"][0]["outcome"], "cancelled", "{r}");
    assert!(!p.path("ran.txt").exists());
    wait_for("the setup's sleep gone", Duration::from_secs(10), || {
        process_gone(pid)
    });
    assert_no_worktree_left(&p);
}

#[test]
fn a_setup_past_its_time_is_killed_and_fails_the_attempt_saying_so() {
    let p = repo_project(
        "  setup_timeout_seconds: 1\n  setup:\n    - 'echo waiting for the registry; sleep 30'\n",
        &[("README", "hi\n")],
    );
    p.drop_task(
        "stuck.yaml",
        "agent: shell\nmax_retries: 0\ndescription: 'echo ran > ran.txt'\n",
    );
    let mut s = p.start();
    wait_done(&p, 1);
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("failed", "stuck");
    assert_eq!(r["attempts"][0]["outcome"], "setup_failed", "{r}");
    let e = r["error"].as_str().expect("error");
    assert!(
        e.contains("did not finish within 1 s (workspace.setup_timeout_seconds) and was killed"),
        "{e}"
    );
    assert!(e.contains("waiting for the registry"), "{e}");
    assert!(!p.path("ran.txt").exists());
    assert_no_worktree_left(&p);
}
