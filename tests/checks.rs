//! Checks: a task's `check` command runs after its agent, in the folder the agent worked in; a
//! check that fails fails the attempt as `check_failed`, its output reaches the next attempt's
//! prompt, and the task runs until the check passes or its retries are spent. Real git
//! repositories, the real binary, the fake agent (which corrects its file when the prompt quotes
//! the check's complaint: `write-if`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=user", "-c", "user.email=user@example.com"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?} in {dir:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The project root made a git repository with one commit.
fn repo_project(config: &str) -> Project {
    let p = Project::with_config(config);
    git(p.root(), &["init", "-q"]);
    std::fs::write(p.path("base.txt"), "base\n").expect("write");
    git(p.root(), &["add", "base.txt"]);
    git(p.root(), &["commit", "-qm", "first"]);
    p
}

/// A check that builds something (`build.out`, which must never reach the task's changes), says
/// which task and attempt it is and whether it sees a variable outside `security.env_allow`, and
/// passes only when `answer.txt` says `right`.
const CHECK: &str = r#"echo built > build.out; echo "task $ORCHESTRATE_TASK_ID attempt $ORCHESTRATE_ATTEMPT hidden ${HIDDEN_FROM_CHECKS:-unset}"; grep -q right answer.txt || { echo "answer.txt says $(cat answer.txt)"; exit 1; }"#;

/// A task whose agent writes the wrong answer, and the right one once its prompt carries the
/// check's complaint.
fn fixing_task() -> String {
    format!(
        "description: \"Answer.\\n@fake write=answer.txt:wrong\\n@fake write-if=says_wrong:answer.txt:right\"\ncheck: '{CHECK}'\n"
    )
}

fn worktrees_left(p: &Project) -> Vec<String> {
    p.files(".orchestrate/worktrees")
        .into_iter()
        .filter(|w| w != ".pool")
        .collect()
}

#[test]
fn a_check_that_fails_once_is_retried_with_its_output_in_the_prompt_until_it_passes() {
    let p = repo_project(&test_config(""));
    p.drop_task("fix.yaml", &fixing_task());
    // Not in `security.env_allow`: the check must not see it.
    let mut s = p.start_with_env(&[("HIDDEN_FROM_CHECKS", "leaked")]);
    wait_for("fix finished", Duration::from_secs(60), || {
        !p.tasks_in("completed").is_empty() || !p.tasks_in("failed").is_empty()
    });
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("completed", "fix");
    let a = r["attempts"].as_array().expect("attempts");
    assert_eq!(a.len(), 2, "{r}");
    assert_eq!(a[0]["outcome"], "check_failed", "{r}");
    let error = a[0]["error"].as_str().expect("an error");
    // Its first line, all that a console line shows, ends with what the check said last.
    let first_line = error.lines().next().unwrap_or_default();
    assert!(
        first_line.contains("exited with code 1")
            && first_line.ends_with(": answer.txt says wrong"),
        "{error}"
    );
    assert!(error.contains("task fix attempt 1"), "{error}");
    let first = &a[0]["check"];
    assert_eq!(first["passed"], false, "{r}");
    assert_eq!(first["exit_code"], 1, "{r}");
    assert_eq!(first["command"], CHECK, "{r}");
    assert_eq!(first["log_file"], "context/logs/fix/attempt-1.check.log");
    let log = p.read("context/logs/fix/attempt-1.check.log");
    assert!(log.contains("task fix attempt 1 hidden unset"), "{log}");
    assert!(log.contains("answer.txt says wrong"), "{log}");
    assert_eq!(a[1]["outcome"], "completed", "{r}");
    assert_eq!(a[1]["check"]["passed"], true, "{r}");
    assert_eq!(a[1]["check"]["exit_code"], 0, "{r}");
    assert!(
        p.read("context/logs/fix/attempt-2.check.log")
            .contains("task fix attempt 2")
    );
    // The second attempt was told what the check said; the first was told nothing of it.
    let prompt = p.read("context/logs/fix/attempt-2.prompt.md");
    assert!(prompt.contains("The check `"), "{prompt}");
    assert!(prompt.contains("answer.txt says wrong"), "{prompt}");
    assert!(
        !p.read("context/logs/fix/attempt-1.prompt.md")
            .contains("The check `")
    );
    // The right answer landed, and nothing the check built.
    assert_eq!(p.read("answer.txt"), "right\n");
    assert_eq!(
        r["files_modified"],
        serde_json::json!(["answer.txt"]),
        "{r}"
    );
    assert!(!p.path("build.out").exists());
    let diff = p.read("context/diffs/fix.diff");
    assert!(!diff.contains("build.out"), "{diff}");
    assert!(worktrees_left(&p).is_empty(), "{:?}", worktrees_left(&p));
    assert_eq!(git(p.root(), &["branch", "--list", "orchestrate/*"]), "");
    // `show` says how each check went, from the result and from the mirror.
    let shown = p.run(&["show", "fix"]);
    shown.assert_code(0);
    let out = shown.stdout();
    assert!(out.contains("check_failed"), "{out}");
    assert!(
        out.contains("failed (exit 1)") && out.contains("attempt-1.check.log"),
        "{out}"
    );
    assert!(out.contains(": passed in "), "{out}");
    let json = p.run(&["show", "fix", "--json"]).json();
    assert_eq!(json["attempts"][0]["check"]["passed"], false, "{json}");
    assert_eq!(json["attempts"][1]["check"]["passed"], true, "{json}");
}

#[test]
fn a_check_that_never_passes_fails_the_task_once_its_retries_are_spent_and_nothing_lands() {
    let p = repo_project(&test_config(""));
    p.drop_task(
        "never.yaml",
        "description: \"@fake write=answer.txt:wrong\"\ncheck: 'echo still broken; exit 3'\n",
    );
    let mut s = p.start();
    wait_for("never finished", Duration::from_secs(60), || {
        !p.tasks_in("failed").is_empty() || !p.tasks_in("completed").is_empty()
    });
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("failed", "never");
    let a = r["attempts"].as_array().expect("attempts");
    // max_retries 1: two attempts.
    assert_eq!(a.len(), 2, "{r}");
    for at in a {
        assert_eq!(at["outcome"], "check_failed", "{r}");
        assert_eq!(at["check"]["exit_code"], 3, "{r}");
    }
    let error = r["error"].as_str().expect("error");
    assert!(
        error.contains("the check `echo still broken; exit 3` exited with code 3"),
        "{error}"
    );
    assert!(!p.path("answer.txt").exists(), "a failed check landed");
    assert!(worktrees_left(&p).is_empty(), "{:?}", worktrees_left(&p));
    assert_eq!(git(p.root(), &["branch", "--list", "orchestrate/*"]), "");
}

#[test]
fn a_task_outside_git_runs_its_check_in_its_workdir_after_the_diff() {
    let p = Project::new();
    std::fs::create_dir_all(p.path("work")).expect("mkdir");
    p.drop_task("plain.yaml", &format!("{}workdir: work\n", fixing_task()));
    let mut s = p.start();
    wait_for("plain finished", Duration::from_secs(60), || {
        !p.tasks_in("completed").is_empty() || !p.tasks_in("failed").is_empty()
    });
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("completed", "plain");
    assert!(r.get("workspace").is_none(), "{r}");
    let a = r["attempts"].as_array().expect("attempts");
    assert_eq!(a.len(), 2, "{r}");
    assert_eq!(a[0]["outcome"], "check_failed", "{r}");
    assert_eq!(a[1]["check"]["passed"], true, "{r}");
    assert!(
        p.read("context/logs/plain/attempt-2.prompt.md")
            .contains("answer.txt says wrong")
    );
    assert_eq!(p.read("work/answer.txt"), "right\n");
    // The check ran where the agent worked, after the diff was taken.
    assert_eq!(p.read("work/build.out"), "built\n");
    assert_eq!(
        r["files_modified"],
        serde_json::json!(["answer.txt"]),
        "{r}"
    );
}

#[test]
fn a_check_out_of_time_is_killed_and_fails_the_attempt() {
    let p = repo_project(&test_config("").replace("max_retries: 1", "max_retries: 0"));
    p.drop_task(
        "slow.yaml",
        "description: \"@fake write=a.txt:a\"\ncheck: 'sleep 60'\ncheck_timeout_minutes: 0.02\n",
    );
    let mut s = p.start();
    wait_for("slow finished", Duration::from_secs(60), || {
        !p.tasks_in("failed").is_empty() || !p.tasks_in("completed").is_empty()
    });
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("failed", "slow");
    let a = &r["attempts"][0];
    assert_eq!(a["outcome"], "check_failed", "{r}");
    assert_eq!(a["check"]["timed_out"], true, "{r}");
    assert!(a["check"]["exit_code"].is_null(), "{r}");
    let error = a["error"].as_str().expect("error");
    assert!(
        error.contains("did not finish within 1.2 s (check_timeout_minutes)"),
        "{error}"
    );
    assert!(!p.path("a.txt").exists());
    assert!(worktrees_left(&p).is_empty(), "{:?}", worktrees_left(&p));
}

#[test]
fn a_cancel_while_the_check_runs_stops_it_and_lands_nothing() {
    let p = repo_project(&test_config(""));
    p.drop_task(
        "busy.yaml",
        "description: \"@fake write=a.txt:a\"\ncheck: 'touch check-started; sleep 60'\n",
    );
    let mut s = p.start();
    let started = p.path(".orchestrate/worktrees/busy/check-started");
    wait_for("the check started", Duration::from_secs(60), || {
        started.exists()
    });
    p.run(&["cancel", "busy"]).assert_code(0);
    wait_for("busy failed", Duration::from_secs(30), || {
        !p.tasks_in("failed").is_empty()
    });
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("failed", "busy");
    let a = r["attempts"].as_array().expect("attempts");
    assert_eq!(a.len(), 1, "{r}");
    assert_eq!(a[0]["outcome"], "cancelled", "{r}");
    assert_eq!(a[0]["check"]["passed"], false, "{r}");
    assert!(!p.path("a.txt").exists());
    assert!(!p.path("check-started").exists());
    assert!(worktrees_left(&p).is_empty(), "{:?}", worktrees_left(&p));
}

/// An agent's `check` applies to the tasks it runs, `routing.check` to every task that names none,
/// and a task's `check: ""` turns an inherited one off.
#[test]
fn a_check_comes_from_the_task_else_the_agent_else_routing() {
    let config = test_config("")
        .replace(
            "    args: [fake-agent]\n",
            "    args: [fake-agent]\n    check: 'echo agent-check; exit 5'\n",
        )
        .replace(
            "routing:\n",
            "routing:\n  check: 'echo routing-check; exit 6'\n",
        )
        .replace("max_retries: 1", "max_retries: 0");
    let p = Project::with_config(&config);
    p.drop_task("inherits.yaml", "description: inherits\n");
    p.drop_task("own.yaml", "description: own\ncheck: 'echo own-check'\n");
    p.drop_task("off.yaml", "description: off\ncheck: ''\n");
    let mut s = p.start();
    wait_for("three finished", Duration::from_secs(60), || {
        p.tasks_in("completed").len() + p.tasks_in("failed").len() >= 3
    });
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("failed", "inherits");
    assert_eq!(r["attempts"][0]["check"]["exit_code"], 5, "{r}");
    let r = p.result("completed", "own");
    assert_eq!(
        r["attempts"][0]["check"]["command"], "echo own-check",
        "{r}"
    );
    let r = p.result("completed", "off");
    assert!(r["attempts"][0].get("check").is_none(), "{r}");
}
