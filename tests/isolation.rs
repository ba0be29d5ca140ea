//! Isolation: tasks in a git repository run in worktrees of their own and land their changes back;
//! tasks outside git (or with `isolation: none`) run in their workdir, one at a time per workdir.
//! Real repositories made with `git init` in temp dirs, the real binary, the fake agent.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// The project root made a git repository with one commit holding `files`.
fn repo_project(config: &str, files: &[(&str, &str)]) -> Project {
    let p = Project::with_config(config);
    git(p.root(), &["init", "-q"]);
    for (name, text) in files {
        if let Some(dir) = p.path(name).parent() {
            std::fs::create_dir_all(dir).expect("mkdir");
        }
        std::fs::write(p.path(name), text).expect("write");
        git(p.root(), &["add", name]);
    }
    git(p.root(), &["commit", "-qm", "first"]);
    p
}

/// The test configuration with the `shell` agent of the default one.
fn config_with_shell() -> String {
    test_config("").replace(
        "agents:\n",
        "agents:\n  shell:\n    kind: command\n    command: sh\n    args: [-c, \"{description}\"]\n    max_instances: 4\n",
    )
}

fn worktree_count(p: &Project) -> usize {
    git(p.root(), &["worktree", "list"]).lines().count()
}

/// Every worktree folder under the state directory: tasks' and idle pooled ones
/// (`.pool/<instance>/<n>`).
fn worktrees_left(p: &Project) -> Vec<String> {
    let mut left = p.files(".orchestrate/worktrees");
    for pool in p.files(".orchestrate/worktrees/.pool") {
        for w in p.files(&format!(".orchestrate/worktrees/.pool/{pool}")) {
            left.push(format!(".pool/{pool}/{w}"));
        }
    }
    left
}

/// The idle worktrees in the pools.
fn pooled(p: &Project) -> Vec<String> {
    worktrees_left(p)
        .into_iter()
        .filter(|w| w.starts_with(".pool/"))
        .collect()
}

fn wait_done(p: &Project, n: usize, limit: Duration) {
    wait_for(&format!("{n} tasks finished"), limit, || {
        p.tasks_in("completed").len() + p.tasks_in("failed").len() >= n
    });
}

#[test]
fn fifty_tasks_in_one_repository_each_land_exactly_their_own_file() {
    let p = repo_project(&test_config(""), &[("base.txt", "base\n")]);
    for i in 0..50 {
        p.drop_task(
            &format!("t{i:02}.yaml"),
            &format!("description: \"write one file\\n@fake write=f_{i:02}.txt:content_{i}\"\n"),
        );
    }
    let mut s = p.start();
    wait_done(&p, 50, Duration::from_secs(240));
    assert!(s.stop().success(), "{}", s.output());
    assert_eq!(p.tasks_in("completed").len(), 50, "{}", s.output());
    for i in 0..50 {
        let id = format!("t{i:02}");
        let r = p.result("completed", &id);
        let own = format!("f_{i:02}.txt");
        assert_eq!(r["files_modified"], serde_json::json!([own]), "{r}");
        assert_eq!(r["workspace"]["isolation"], "worktree", "{r}");
        assert_eq!(r["workspace"]["merge"], "applied", "{r}");
        assert!(r["workspace"]["base"].as_str().is_some(), "{r}");
        assert!(r["workspace"]["head"].as_str().is_some(), "{r}");
        let diff = p.read(&format!("context/diffs/{id}.diff"));
        assert_eq!(diff.matches("diff --git").count(), 1, "{diff}");
        assert!(diff.contains(&format!("b/{own}")), "{diff}");
        assert_eq!(
            std::fs::read_to_string(p.path(&own)).expect("landed"),
            format!("content {i}\n")
        );
    }
    assert_eq!(
        worktree_count(&p),
        1,
        "{}",
        git(p.root(), &["worktree", "list"])
    );
    assert!(worktrees_left(&p).is_empty(), "{:?}", worktrees_left(&p));
    // Landed changes are uncommitted, the index and the branch list as they were.
    assert_eq!(git(p.root(), &["branch", "--list", "orchestrate/*"]), "");
    assert_eq!(git(p.root(), &["diff", "--cached", "--name-only"]), "");
    assert_eq!(git(p.root(), &["rev-list", "--count", "HEAD"]).trim(), "1");
}

#[test]
fn two_tasks_editing_the_same_line_land_one_and_keep_the_other_on_its_branch() {
    let p = repo_project(&test_config(""), &[("a.txt", "original\n")]);
    let gate = tempfile::tempdir().expect("tempdir");
    let go = gate.path().join("go");
    for who in ["x", "y"] {
        p.drop_task(
            &format!("{who}.yaml"),
            &format!(
                "description: \"edit a.txt\\n@fake wait-for={} write=a.txt:from_{who}\"\n",
                go.display()
            ),
        );
    }
    let mut s = p.start();
    // Both start from the same base before either writes.
    wait_for("both tasks running", Duration::from_secs(60), || {
        p.files("tasks/assigned")
            .iter()
            .filter(|f| f.ends_with(".claim.yaml"))
            .count()
            == 2
            && p.files(".orchestrate/worktrees").len() == 2
    });
    std::fs::write(&go, "").expect("gate");
    wait_done(&p, 2, Duration::from_secs(60));
    assert!(s.stop().success(), "{}", s.output());
    let results: Vec<(String, serde_json::Value)> = ["x", "y"]
        .iter()
        .map(|w| (w.to_string(), p.result("completed", w)))
        .collect();
    let merges: Vec<&str> = results
        .iter()
        .map(|(_, r)| r["workspace"]["merge"].as_str().unwrap_or("-"))
        .collect();
    let mut sorted = merges.clone();
    sorted.sort();
    assert_eq!(sorted, ["applied", "conflict"], "{results:?}");
    let (applied, _) = &results[merges.iter().position(|m| *m == "applied").unwrap_or(0)];
    let (conflicted, r) = &results[merges.iter().position(|m| *m == "conflict").unwrap_or(0)];
    assert_eq!(
        r["workspace"]["conflicts"],
        serde_json::json!(["a.txt"]),
        "{r}"
    );
    assert_eq!(
        r["workspace"]["branch"],
        format!("orchestrate/{conflicted}")
    );
    // The user's tree holds exactly the version that landed; the other is intact on its branch.
    assert_eq!(
        std::fs::read_to_string(p.path("a.txt")).expect("a.txt"),
        format!("from {applied}\n")
    );
    assert_eq!(
        git(
            p.root(),
            &["show", &format!("orchestrate/{conflicted}:a.txt")]
        ),
        format!("from {conflicted}\n")
    );
    assert_eq!(
        git(p.root(), &["branch", "--list", "orchestrate/*"]).trim(),
        format!("orchestrate/{conflicted}")
    );
    assert_eq!(worktree_count(&p), 1);
    assert!(worktrees_left(&p).is_empty());
    let shown = p.run(&["show", conflicted]);
    assert!(
        shown.stdout().contains("merge: conflict in a.txt"),
        "{}",
        shown.stdout()
    );

    // `merge` by hand follows the same rules: still conflicting, nothing is written.
    let refused = p.run(&["merge", conflicted]);
    refused.assert_code(1);
    assert!(refused.stdout().contains("a.txt"), "{}", refused.stdout());
    assert_eq!(
        std::fs::read_to_string(p.path("a.txt")).expect("a.txt"),
        format!("from {applied}\n")
    );
    // Once the user takes the landed change back, it merges, and the branch goes.
    git(p.root(), &["checkout", "--", "a.txt"]);
    p.run(&["merge", conflicted]).assert_code(0);
    assert_eq!(
        std::fs::read_to_string(p.path("a.txt")).expect("a.txt"),
        format!("from {conflicted}\n")
    );
    let r = p.result("completed", conflicted);
    assert_eq!(r["workspace"]["merge"], "applied", "{r}");
    assert!(r["workspace"]["branch"].is_null(), "{r}");
    assert!(
        git(p.root(), &["branch", "--list", "orchestrate/*"])
            .trim()
            .is_empty()
    );
    // Nothing left to merge or discard.
    p.run(&["discard", conflicted]).assert_code(2);
}

#[test]
fn discard_deletes_a_kept_branch_and_says_so_in_the_result() {
    let p = repo_project(
        &test_config("workspace:\n  merge: branch\n"),
        &[("a.txt", "original\n")],
    );
    p.drop_task("k.yaml", "description: \"@fake write=a.txt:kept_change\"\n");
    let mut s = p.start();
    wait_done(&p, 1, Duration::from_secs(60));
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("completed", "k");
    assert_eq!(r["workspace"]["merge"], "kept", "{r}");
    assert_eq!(
        git(p.root(), &["branch", "--list", "orchestrate/*"]).trim(),
        "orchestrate/k"
    );
    p.run(&["discard", "k"]).assert_code(0);
    assert!(
        git(p.root(), &["branch", "--list", "orchestrate/*"])
            .trim()
            .is_empty()
    );
    let r = p.result("completed", "k");
    assert_eq!(r["workspace"]["merge"], "discarded", "{r}");
    assert_eq!(
        std::fs::read_to_string(p.path("a.txt")).expect("a.txt"),
        "original\n",
        "discard never touches the tree"
    );
    // The mirror follows.
    let shown = p.run(&["show", "k"]).stdout();
    assert!(shown.contains("discarded"), "{shown}");
}

#[test]
fn the_base_holds_uncommitted_and_untracked_files_and_the_index_is_untouched() {
    let p = repo_project(&config_with_shell(), &[("t.txt", "committed\n")]);
    std::fs::write(p.path("t.txt"), "uncommitted\n").expect("write");
    std::fs::write(p.path("s.txt"), "staged\n").expect("write");
    git(p.root(), &["add", "s.txt"]);
    std::fs::write(p.path("u.txt"), "untracked\n").expect("write");
    let index_before = git(p.root(), &["ls-files", "-s"]);
    p.drop_task(
        "look.yaml",
        "agent: shell\ndescription: \"cat t.txt s.txt u.txt > seen.txt\"\n",
    );
    let mut s = p.start();
    wait_done(&p, 1, Duration::from_secs(60));
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("completed", "look");
    assert_eq!(r["files_modified"], serde_json::json!(["seen.txt"]), "{r}");
    assert_eq!(
        std::fs::read_to_string(p.path("seen.txt")).expect("landed"),
        "uncommitted\nstaged\nuntracked\n"
    );
    assert_eq!(git(p.root(), &["ls-files", "-s"]), index_before);
    assert_eq!(
        git(p.root(), &["diff", "--cached", "--name-only"]),
        "s.txt\n"
    );
    assert_eq!(
        std::fs::read_to_string(p.path("t.txt")).expect("t"),
        "uncommitted\n"
    );
    assert_eq!(worktree_count(&p), 1);
}

#[test]
fn a_workdir_outside_git_runs_in_place_as_before() {
    let p = Project::new();
    p.drop_task("plain.yaml", "description: \"@fake write=x.txt:made\"\n");
    let mut s = p.start();
    wait_done(&p, 1, Duration::from_secs(60));
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("completed", "plain");
    assert!(r.get("workspace").is_none(), "{r}");
    assert_eq!(r["files_modified"], serde_json::json!(["x.txt"]), "{r}");
    assert_eq!(p.read("x.txt"), "made\n");
    assert!(!p.path(".orchestrate/worktrees").exists());
}

#[test]
fn isolation_none_runs_tasks_sharing_a_workdir_one_at_a_time() {
    let p = repo_project(&test_config(""), &[("a.txt", "a\n")]);
    let locks = tempfile::tempdir().expect("tempdir");
    let lock = locks.path().join("workdir.lock");
    for who in ["p", "q"] {
        p.drop_task(
            &format!("{who}.yaml"),
            &format!(
                "description: \"@fake lock={} sleep=1 write={who}.txt:{who}\"\nisolation: none\nworkdir: work\n",
                lock.display()
            ),
        );
    }
    std::fs::create_dir(p.path("work")).expect("mkdir");
    let mut s = p.start();
    wait_done(&p, 2, Duration::from_secs(60));
    assert!(s.stop().success(), "{}", s.output());
    let log = s.output();
    assert_eq!(p.tasks_in("completed"), ["p", "q"], "{log}");
    assert!(
        !locks.path().join("workdir.lock.overlap").exists(),
        "two tasks ran in one workdir at once"
    );
    assert!(
        log.contains("waiting for workdir work, held by task"),
        "{log}"
    );
    for who in ["p", "q"] {
        let r = p.result("completed", who);
        assert!(r.get("workspace").is_none(), "{r}");
        assert_eq!(
            r["files_modified"],
            serde_json::json!([format!("{who}.txt")]),
            "{r}"
        );
    }
    assert!(!p.path(".orchestrate/worktrees").exists());
}

#[test]
fn a_repository_without_commits_is_refused_by_name() {
    let p = Project::new();
    git(p.root(), &["init", "-q"]);
    p.drop_task(
        "early.yaml",
        "description: \"@fake write=x.txt:x\"\nmax_retries: 0\n",
    );
    let mut s = p.start();
    wait_done(&p, 1, Duration::from_secs(60));
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("failed", "early");
    let e = r["error"].as_str().unwrap_or_default().to_string()
        + r["attempts"][0]["error"].as_str().unwrap_or_default();
    assert!(e.contains("no commit yet"), "{r}");
    assert!(!p.path("x.txt").exists());
}

#[test]
fn orphaned_worktrees_are_removed_at_start() {
    let p = repo_project(&test_config(""), &[("a.txt", "a\n")]);
    let orphan = p.path(".orchestrate/worktrees/ghost");
    git(
        p.root(),
        &[
            "worktree",
            "add",
            "-q",
            "--detach",
            orphan.to_str().expect("utf-8"),
            "HEAD",
        ],
    );
    assert_eq!(worktree_count(&p), 2);
    let mut s = p.start();
    assert!(s.stop().success(), "{}", s.output());
    assert!(!orphan.exists(), "{}", s.output());
    assert_eq!(worktree_count(&p), 1);
}

#[test]
fn merge_branch_keeps_the_changes_on_the_branch_and_merge_commit_commits_them() {
    let p = repo_project(&test_config(""), &[("a.txt", "a\n")]);
    p.drop_task(
        "kept.yaml",
        "description: \"@fake write=k.txt:kept\"\nmerge: branch\n",
    );
    p.drop_task(
        "landed.yaml",
        "description: \"@fake write=c.txt:committed\"\nmerge: commit\n",
    );
    let mut s = p.start();
    wait_done(&p, 2, Duration::from_secs(60));
    assert!(s.stop().success(), "{}", s.output());
    let kept = p.result("completed", "kept");
    assert_eq!(kept["workspace"]["merge"], "kept", "{kept}");
    assert_eq!(kept["workspace"]["branch"], "orchestrate/kept", "{kept}");
    assert!(!p.path("k.txt").exists());
    assert_eq!(git(p.root(), &["show", "orchestrate/kept:k.txt"]), "kept\n");
    let landed = p.result("completed", "landed");
    assert_eq!(landed["workspace"]["merge"], "committed", "{landed}");
    assert!(landed["workspace"].get("branch").is_none(), "{landed}");
    assert_eq!(p.read("c.txt"), "committed\n");
    assert_eq!(
        git(p.root(), &["log", "-1", "--format=%an <%ae>%n%s"]),
        "orchestrate <orchestrate@localhost>\norchestrate: task landed by fake (attempt 1)\n"
    );
    assert_eq!(git(p.root(), &["show", "HEAD:c.txt"]), "committed\n");
    // Committed, so neither staged nor modified; the kept task's file never reached the tree.
    let status = git(p.root(), &["status", "--porcelain", "--", "c.txt", "k.txt"]);
    assert_eq!(status, "", "{status}");
    assert_eq!(
        git(p.root(), &["branch", "--list", "orchestrate/*"]).trim(),
        "orchestrate/kept"
    );
    assert_eq!(worktree_count(&p), 1);
}

#[test]
fn an_agent_with_isolation_none_runs_in_place_and_keep_true_keeps_the_folder() {
    let config = test_config("workspace:\n  keep: true\n").replace(
        "agents:\n",
        "agents:\n  inplace:\n    kind: command\n    command: sh\n    args: [-c, \"{description}\"]\n    isolation: none\n",
    );
    let p = repo_project(&config, &[("a.txt", "a\n")]);
    std::fs::create_dir(p.path("work")).expect("mkdir");
    p.drop_task(
        "here.yaml",
        "agent: inplace\nworkdir: work\ndescription: \"echo here > here.txt\"\n",
    );
    p.drop_task("there.yaml", "description: \"@fake write=t.txt:there\"\n");
    let mut s = p.start();
    wait_done(&p, 2, Duration::from_secs(60));
    assert!(s.stop().success(), "{}", s.output());
    let here = p.result("completed", "here");
    assert!(here.get("workspace").is_none(), "{here}");
    assert_eq!(
        here["files_modified"],
        serde_json::json!(["here.txt"]),
        "{here}"
    );
    assert_eq!(p.read("work/here.txt"), "here\n");
    let there = p.result("completed", "there");
    assert_eq!(there["workspace"]["merge"], "applied", "{there}");
    assert_eq!(p.read("t.txt"), "there\n");
    // keep: true leaves the attempt's folder (and its branch) for inspection.
    assert_eq!(worktrees_left(&p), ["there"]);
    assert_eq!(p.read(".orchestrate/worktrees/there/t.txt"), "there\n");
    assert_eq!(worktree_count(&p), 2);
}

/// SIGKILL at each step of an isolated attempt (worktree made, changes committed, check run,
/// changes landed), then a restart: every task completes, each file is in the user's tree once with
/// its content (and nothing its check built), no worktree, branch or lock is left in the
/// repository, and nothing ran twice at once.
#[test]
fn a_crash_at_each_worktree_step_leaves_nothing_behind_and_loses_nothing() {
    let points: Vec<&str> = orchestrate::failpoint::POINTS
        .iter()
        .copied()
        .filter(|p| p.starts_with("worktree.") || *p == "attempt.after_check")
        .collect();
    assert_eq!(points.len(), 6);
    let mut thrown = 0;
    for point in &points {
        let p = repo_project(
            &test_config("").replace("max_retries: 1", "max_retries: 3"),
            &[("base.txt", "base\n")],
        );
        // A chain, so each task after the first takes over its predecessor's worktree from the
        // pool.
        for i in 0..3 {
            let after = if i == 0 {
                String::new()
            } else {
                format!("dependencies: [t{}]\n", i - 1)
            };
            p.drop_task(
                &format!("t{i}.yaml"),
                &format!(
                    "{after}description: \"@fake write=f_{i}.txt:content_{i} lock={}\"\n\
                     check: 'echo built > built_{i}.out; test -f f_{i}.txt'\n",
                    p.path(&format!("lock_{i}")).display()
                ),
            );
        }
        thrown += 3;
        let crashed = p.run_until_crash(&format!("{point}:1"));
        let again = p.run(&["start", "--once", "-v"]);
        let logs = format!(
            "--- {point}\n{crashed}\n--- restart\n{}{}",
            again.stdout(),
            again.stderr()
        );
        again.assert_code(0);
        assert_eq!(p.tasks_in("completed"), vec!["t0", "t1", "t2"], "{logs}");
        for i in 0..3 {
            assert_eq!(
                std::fs::read_to_string(p.path(&format!("f_{i}.txt")))
                    .ok()
                    .as_deref(),
                Some(format!("content {i}\n").as_str()),
                "{point}: f_{i}.txt\n{logs}"
            );
            assert!(
                !p.path(&format!("lock_{i}.overlap")).exists(),
                "{point}: t{i} ran twice at once\n{logs}"
            );
            assert!(
                !p.path(&format!("built_{i}.out")).exists(),
                "{point}: what t{i}'s check built landed\n{logs}"
            );
        }
        assert_eq!(
            worktree_count(&p),
            1,
            "{point}: {}",
            git(p.root(), &["worktree", "list"])
        );
        assert!(
            worktrees_left(&p).is_empty(),
            "{point}: {:?}",
            worktrees_left(&p)
        );
        assert!(
            !p.path(".git/index.lock").exists(),
            "{point}: index.lock left"
        );
        let temp: Vec<String> = std::fs::read_dir(p.path(".git"))
            .expect(".git")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("orchestrate-"))
            .collect();
        assert!(temp.is_empty(), "{point}: left in .git: {temp:?}");
        let branches = git(p.root(), &["branch", "--list", "orchestrate/*"]);
        assert!(
            branches.trim().is_empty(),
            "{point}: branches left: {branches}"
        );
    }
    eprintln!(
        "RELIABILITY crash-worktree: {} points, {thrown} tasks thrown, 0 lost",
        points.len()
    );
}

/// A chain `a → b` where b reads what a wrote: a's change has landed in the working tree before b
/// is claimed, so b's base (a snapshot of that tree) holds it.
#[test]
fn a_dependent_task_starts_from_a_base_that_holds_its_dependencys_change() {
    let p = repo_project(&config_with_shell(), &[("base.txt", "base\n")]);
    p.drop_task(
        "a.yaml",
        "agent: shell\ndescription: \"echo from-a > a.txt\"\n",
    );
    p.drop_task(
        "b.yaml",
        "agent: shell\ndependencies: [a]\ndescription: \"cat a.txt > b.txt\"\n",
    );
    let mut s = p.start();
    wait_done(&p, 2, Duration::from_secs(60));
    assert!(s.stop().success(), "{}", s.output());
    assert_eq!(p.tasks_in("completed"), vec!["a", "b"], "{}", s.output());
    let r = p.result("completed", "b");
    assert_eq!(r["files_modified"], serde_json::json!(["b.txt"]), "{r}");
    assert_eq!(
        std::fs::read_to_string(p.path("b.txt")).expect("b landed"),
        "from-a\n"
    );
}

/// The id of `HEAD` in `dir`, or the word `detached` when it names no branch.
fn head_branch(dir: &Path) -> String {
    let out = Command::new("git")
        .args(["symbolic-ref", "-q", "--short", "HEAD"])
        .current_dir(dir)
        .output()
        .expect("git runs");
    if out.status.success() {
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    } else {
        "detached".into()
    }
}

/// On a detached `HEAD` (a CI checkout, a bisect), `apply` lands as anywhere else; `commit` would
/// make a commit no branch holds, so it is refused: nothing is written, the result says why, and
/// the branch keeps the changes for `orchestrate merge` once a branch is checked out.
#[test]
fn a_detached_head_lands_with_apply_and_refuses_commit_keeping_the_branch() {
    let p = repo_project(&test_config(""), &[("a.txt", "a\n")]);
    git(p.root(), &["commit", "-q", "--allow-empty", "-m", "second"]);
    git(p.root(), &["checkout", "-q", "--detach", "HEAD~1"]);
    let detached_at = git(p.root(), &["rev-parse", "HEAD"]);
    p.drop_task(
        "ap.yaml",
        "description: \"@fake write=ap.txt:applied\"\nmerge: apply\n",
    );
    p.drop_task(
        "co.yaml",
        "description: \"@fake write=co.txt:committed\"\nmerge: commit\n",
    );
    let mut s = p.start();
    wait_done(&p, 2, Duration::from_secs(60));
    assert!(s.stop().success(), "{}", s.output());
    let ap = p.result("completed", "ap");
    assert_eq!(ap["workspace"]["merge"], "applied", "{ap}");
    assert_eq!(p.read("ap.txt"), "applied\n");
    let co = p.result("completed", "co");
    assert_eq!(co["workspace"]["merge"], "conflict", "{co}");
    assert_eq!(co["workspace"]["branch"], "orchestrate/co", "{co}");
    let e = co["workspace"]["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("detached HEAD") && e.contains(&p.root().display().to_string()),
        "{co}"
    );
    assert!(e.contains("git switch"), "says what to do: {co}");
    assert!(!p.path("co.txt").exists(), "nothing written");
    assert_eq!(git(p.root(), &["rev-parse", "HEAD"]), detached_at);
    assert_eq!(head_branch(p.root()), "detached");
    // On a branch, the kept changes land by the same rules.
    git(p.root(), &["switch", "-q", "-c", "work"]);
    p.run(&["merge", "co", "--commit"]).assert_code(0);
    assert_eq!(git(p.root(), &["show", "work:co.txt"]), "committed\n");
    assert_eq!(worktree_count(&p), 1);
}

/// A sparse checkout (cone, non-cone, and cone with a sparse index): files outside it are in `HEAD` but not on disk. The base
/// keeps them (a snapshot that took their absence for a deletion would land deleting them), an
/// untracked file the user made outside it is part of the base as any untracked file, a change
/// inside it lands, and a change to a file outside it is refused by name, nothing written.
#[test]
fn a_sparse_checkout_keeps_files_outside_it_and_lands_changes_inside_it() {
    for cone in ["cone", "no-cone", "sparse-index"] {
        let p = repo_project(
            &config_with_shell(),
            &[
                ("top.txt", "top\n"),
                ("in/a.txt", "a\n"),
                ("out/b.txt", "b\n"),
            ],
        );
        match cone {
            "cone" => git(p.root(), &["sparse-checkout", "set", "in"]),
            "no-cone" => git(
                p.root(),
                &["sparse-checkout", "set", "--no-cone", "/*", "!/out/"],
            ),
            _ => git(
                p.root(),
                &["sparse-checkout", "set", "--sparse-index", "in"],
            ),
        };
        assert!(!p.path("out/b.txt").exists(), "cone {cone}: sparse");
        std::fs::create_dir_all(p.path("out")).expect("mkdir");
        std::fs::write(p.path("out/mine.txt"), "mine\n").expect("write");
        p.drop_task(
            "inside.yaml",
            "agent: shell\ndescription: \"cat in/a.txt > in/new.txt; test -e out/b.txt || echo sparse > in/seen.txt\"\n",
        );
        p.drop_task(
            "outside.yaml",
            "agent: shell\ndependencies: [inside]\ndescription: \"mkdir -p out; echo changed > out/b.txt\"\n",
        );
        let mut s = p.start();
        wait_done(&p, 2, Duration::from_secs(60));
        assert!(s.stop().success(), "{}", s.output());
        let r = p.result("completed", "inside");
        assert_eq!(r["workspace"]["merge"], "applied", "cone {cone}: {r}");
        assert_eq!(
            r["files_modified"],
            serde_json::json!(["in/new.txt", "in/seen.txt"]),
            "cone {cone}: {r}"
        );
        let base = r["workspace"]["base"].as_str().expect("base").to_string();
        assert_eq!(
            git(p.root(), &["show", &format!("{base}:out/b.txt")]),
            "b\n"
        );
        assert_eq!(
            git(p.root(), &["show", &format!("{base}:out/mine.txt")]),
            "mine\n"
        );
        assert_eq!(p.read("in/new.txt"), "a\n");
        // The agent's worktree is sparse like the user's.
        assert_eq!(p.read("in/seen.txt"), "sparse\n", "cone {cone}");
        let diff = p.read("context/diffs/inside.diff");
        assert!(!diff.contains("deleted file"), "cone {cone}: {diff}");
        let status = git(
            p.root(),
            &["status", "--porcelain", "--", "in", "out", "top.txt"],
        );
        assert_eq!(
            status, "?? in/new.txt\n?? in/seen.txt\n?? out/mine.txt\n",
            "cone {cone}"
        );
        let out = p.result("completed", "outside");
        assert_eq!(out["workspace"]["merge"], "conflict", "cone {cone}: {out}");
        let e = out["workspace"]["error"].as_str().unwrap_or_default();
        assert!(
            e.contains("out/b.txt") && e.contains("sparse checkout"),
            "cone {cone}: {out}"
        );
        assert_eq!(out["workspace"]["branch"], "orchestrate/outside", "{out}");
        assert!(!p.path("out/b.txt").exists(), "cone {cone}");
        assert_eq!(
            git(
                p.root(),
                &["status", "--porcelain", "--", "in", "out", "top.txt"]
            ),
            status,
            "cone {cone}"
        );
        assert_eq!(worktree_count(&p), 1);
    }
}

/// A repository with a submodule: the worktree holds the superproject's files (the submodule's
/// folder is there, empty: it is not checked out again for each task), an edit to the superproject
/// lands and the submodule is neither shown changed nor touched; a task that moves the submodule
/// to a commit of its own is refused by name, since that commit lives only in the task's worktree;
/// a task whose workdir is inside the submodule works in a worktree of the submodule's repository.
#[test]
fn a_repository_with_a_submodule_lands_superproject_edits_and_refuses_submodule_moves() {
    let lib = tempfile::tempdir().expect("tempdir");
    git(lib.path(), &["init", "-q"]);
    std::fs::write(lib.path().join("l.txt"), "lib\n").expect("write");
    git(lib.path(), &["add", "."]);
    git(lib.path(), &["commit", "-qm", "lib"]);
    let p = repo_project(&config_with_shell(), &[("s.txt", "s\n")]);
    git(
        p.root(),
        &[
            "-c",
            "protocol.file.allow=always",
            "submodule",
            "add",
            "-q",
            lib.path().to_str().expect("utf-8"),
            "vendor/lib",
        ],
    );
    git(p.root(), &["commit", "-qm", "submodule"]);
    let sub_head = git(&p.path("vendor/lib"), &["rev-parse", "HEAD"]);
    p.drop_task(
        "edit.yaml",
        "agent: shell\ndescription: \"echo more >> s.txt; ls -A vendor/lib > listed.txt\"\n",
    );
    p.drop_task(
        "bump.yaml",
        "agent: shell\ndependencies: [edit]\ndescription: \"git -c protocol.file.allow=always submodule update --init -q && cd vendor/lib && echo bumped >> l.txt && git -c user.name=a -c user.email=a@a commit -qam bump\"\n",
    );
    p.drop_task(
        "inlib.yaml",
        "agent: shell\ndependencies: [bump]\nworkdir: vendor/lib\ndescription: \"cat l.txt > copy.txt\"\n",
    );
    let mut s = p.start();
    wait_done(&p, 3, Duration::from_secs(60));
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("completed", "edit");
    assert_eq!(r["workspace"]["merge"], "applied", "{r}");
    assert_eq!(
        r["files_modified"],
        serde_json::json!(["listed.txt", "s.txt"]),
        "{r}"
    );
    assert_eq!(p.read("s.txt"), "s\nmore\n");
    assert_eq!(p.read("listed.txt"), "", "the submodule is not checked out");
    let diff = p.read("context/diffs/edit.diff");
    assert!(!diff.contains("vendor/lib"), "{diff}");
    let b = p.result("completed", "bump");
    assert_eq!(b["workspace"]["merge"], "conflict", "{b}");
    let e = b["workspace"]["error"].as_str().unwrap_or_default();
    assert!(e.contains("submodule vendor/lib"), "{b}");
    assert_eq!(b["workspace"]["branch"], "orchestrate/bump", "{b}");
    assert_eq!(git(&p.path("vendor/lib"), &["rev-parse", "HEAD"]), sub_head);
    assert_eq!(p.read("vendor/lib/l.txt"), "lib\n");
    assert_eq!(
        git(
            p.root(),
            &["status", "--porcelain", "--", "s.txt", ".gitmodules"]
        ),
        " M s.txt\n"
    );
    let inlib = p.result("completed", "inlib");
    assert_eq!(inlib["workspace"]["merge"], "applied", "{inlib}");
    assert_eq!(inlib["files_modified"], serde_json::json!(["copy.txt"]));
    assert_eq!(p.read("vendor/lib/copy.txt"), "lib\n");
    assert_eq!(
        git(&p.path("vendor/lib"), &["status", "--porcelain"]),
        "?? copy.txt\n"
    );
    assert_eq!(
        git(&p.path("vendor/lib"), &["worktree", "list"])
            .lines()
            .count(),
        1
    );
    assert_eq!(worktree_count(&p), 1);
    assert!(worktrees_left(&p).is_empty(), "{:?}", worktrees_left(&p));
}

/// A task whose workdir is a subfolder runs in the same subfolder of its worktree; its paths land
/// where they belong, and files with CRLF line endings under `core.autocrlf` are left byte for byte.
#[test]
fn a_subfolder_workdir_lands_in_place_and_line_endings_of_other_files_stay() {
    let p = repo_project(
        &config_with_shell(),
        &[
            (".gitattributes", "*.txt text eol=crlf\n"),
            ("sub/a.txt", "a\n"),
            ("b.txt", "b\n"),
        ],
    );
    // Checked out again with the attributes: both files are CRLF on disk, LF in git.
    std::fs::remove_file(p.path("sub/a.txt")).expect("rm");
    std::fs::remove_file(p.path("b.txt")).expect("rm");
    git(p.root(), &["checkout", "--", "sub/a.txt", "b.txt"]);
    assert_eq!(p.read("b.txt"), "b\r\n");
    p.drop_task(
        "sub.yaml",
        "agent: shell\nworkdir: sub\ndescription: \"pwd > where.txt; printf 'x\\\\n' >> a.txt\"\n",
    );
    let mut s = p.start();
    wait_done(&p, 1, Duration::from_secs(60));
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("completed", "sub");
    assert_eq!(r["workspace"]["merge"], "applied", "{r}");
    assert_eq!(
        r["files_modified"],
        serde_json::json!(["sub/a.txt", "sub/where.txt"]),
        "{r}"
    );
    assert!(p.read("sub/where.txt").trim_end().ends_with("/sub"));
    assert!(!p.path("where.txt").exists());
    assert_eq!(p.read("b.txt"), "b\r\n", "an unrelated file is untouched");
    assert_eq!(
        git(p.root(), &["status", "--porcelain", "--", "b.txt", "sub"]),
        " M sub/a.txt\n?? sub/where.txt\n"
    );
}

/// A task whose change conflicts with what the user wrote meanwhile: `gate` holds the agent until
/// the test has edited `a.txt` in the working tree (after the claim took its snapshot).
fn run_into_a_conflict(p: &Project, id: &str, gate: &Path) {
    p.drop_task(
        &format!("{id}.yaml"),
        &format!(
            "description: \"edit a.txt\\n@fake wait-for={} write=a.txt:from_task\"\n",
            gate.display()
        ),
    );
    let mut s = p.start();
    wait_for("the worktree is made", Duration::from_secs(60), || {
        p.path(&format!("tasks/assigned/{id}.claim.yaml")).exists()
            && p.path(&format!(".orchestrate/worktrees/{id}/a.txt"))
                .exists()
    });
    std::fs::write(p.path("a.txt"), "edited by the user\n").expect("user edit");
    std::fs::write(gate, "").expect("gate");
    wait_done(p, 1, Duration::from_secs(60));
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("completed", id);
    assert_eq!(r["workspace"]["merge"], "conflict", "{r}");
}

#[test]
fn status_lists_a_conflicted_branch_with_its_files_until_it_is_merged() {
    let p = repo_project(&test_config(""), &[("a.txt", "original\n")]);
    let gate = tempfile::tempdir().expect("tempdir");
    run_into_a_conflict(&p, "clash", &gate.path().join("go"));

    let st = p.run(&["status"]);
    st.assert_code(0);
    let out = st.stdout();
    assert!(out.contains("kept branches"), "{out}");
    assert!(
        out.contains("clash                orchestrate/clash: conflict in a.txt"),
        "{out}"
    );
    assert!(out.contains("orchestrate merge ID"), "{out}");
    assert!(out.contains("orchestrate discard ID"), "{out}");
    assert!(!out.contains("worktrees:"), "no worktree is left: {out}");
    let json = p.run(&["status", "--json"]).json();
    assert_eq!(
        json["kept_branches"],
        serde_json::json!([{
            "id": "clash",
            "branch": "orchestrate/clash",
            "merge": "conflict",
            "conflicts": ["a.txt"],
            "error": null,
        }]),
        "{json}"
    );
    assert_eq!(json["worktrees"], serde_json::json!([]), "{json}");

    // Once the user gives way, it merges; the mirror follows, and `status` no longer lists it.
    git(p.root(), &["checkout", "--", "a.txt"]);
    p.run(&["merge", "clash"]).assert_code(0);
    let out = p.run(&["status"]).stdout();
    assert!(!out.contains("kept branches"), "{out}");
    let json = p.run(&["status", "--json"]).json();
    assert_eq!(json["kept_branches"], serde_json::json!([]), "{json}");
    // So does a mirror rebuilt from the tree.
    p.run(&["mirror", "rebuild"]).assert_code(0);
    let json = p.run(&["status", "--json"]).json();
    assert_eq!(json["kept_branches"], serde_json::json!([]), "{json}");
}

#[test]
fn status_shows_a_kept_worktree_and_an_idle_one_with_their_disk_use() {
    let p = repo_project(
        &test_config("workspace:\n  keep: true\n  merge: branch\n"),
        &[("a.txt", "original\n")],
    );
    p.drop_task("held.yaml", "description: \"@fake write=big.txt:data\"\n");
    let mut s = p.start();
    wait_done(&p, 1, Duration::from_secs(60));
    assert!(s.stop().success(), "{}", s.output());
    assert_eq!(worktrees_left(&p), ["held"]);
    // An idle worktree as the pool keeps one: a folder of its own under `.pool`.
    let idle = p.path(".orchestrate/worktrees/.pool/w1");
    std::fs::create_dir_all(&idle).expect("pool folder");
    std::fs::write(idle.join("blob"), vec![1u8; 256 * 1024]).expect("blob");

    let out = p.run(&["status"]).stdout();
    assert!(out.contains("worktrees:"), "{out}");
    let line = |start: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(start))
            .unwrap_or_else(|| panic!("no line for {start}: {out}"))
            .to_string()
    };
    assert!(
        line("held").ends_with(".orchestrate/worktrees/held"),
        "{out}"
    );
    assert!(
        line("idle (pool)").ends_with(".orchestrate/worktrees/.pool/w1"),
        "{out}"
    );
    assert!(
        line("total").contains("KiB") || line("total").contains("MiB"),
        "{out}"
    );
    // The branch is kept, and listed with it.
    assert!(
        out.contains("held                 orchestrate/held: kept"),
        "{out}"
    );

    let json = p.run(&["status", "--json"]).json();
    let w = json["worktrees"].as_array().expect("worktrees");
    assert_eq!(w.len(), 2, "{json}");
    assert_eq!(w[0]["task"], "held", "{json}");
    assert_eq!(w[0]["path"], ".orchestrate/worktrees/held", "{json}");
    assert_eq!(w[1]["task"], serde_json::Value::Null, "{json}");
    assert!(w.iter().all(|w| w["complete"] == true), "{json}");
    assert!(
        w[1]["bytes"].as_u64().expect("bytes") >= 256 * 1024,
        "the pool folder's blob counts: {json}"
    );
    assert!(w[0]["bytes"].as_u64().expect("bytes") > 0, "{json}");
    assert_eq!(json["kept_branches"][0]["merge"], "kept", "{json}");
}

/// A floor above any disk holds every claim back with a note that says why; lowering it in the
/// running configuration lets the task run.
#[test]
fn no_claim_below_the_free_disk_floor_and_claims_resume_when_it_is_lowered() {
    let p = Project::with_config(&test_config(
        "workspace:\n  min_free_disk_mb: 1000000000000\n",
    ));
    let mut s = p.start();
    p.drop_task("d.yaml", "description: \"@fake write=out.txt:done\"\n");
    wait_for("the disk note", Duration::from_secs(30), || {
        p.run(&["status"])
            .stdout()
            .contains("waiting for disk space")
    });
    let out = p.run(&["status"]).stdout();
    assert!(
        out.contains(
            "d                    waiting for disk space: less than workspace.min_free_disk_mb (1000000000000 MiB) free on the state directory's file system"
        ),
        "{out}"
    );
    assert!(
        out.contains("problem: no new claims:") && out.contains("below workspace.min_free_disk_mb"),
        "{out}"
    );
    assert_eq!(p.tasks_in("pending"), ["d"]);
    assert!(
        s.output()
            .contains("below workspace.min_free_disk_mb (1000000000000 MiB): no new claims"),
        "{}",
        s.output()
    );
    // A task dropped later is held too (the floor is looked at again and still holds), and the
    // console said it once.
    p.drop_task("e.yaml", "description: \"@fake write=more.txt:done\"\n");
    wait_for(
        "the second task's disk note",
        Duration::from_secs(30),
        || {
            p.run(&["status", "--json"]).json()["waiting"]
                .as_array()
                .is_some_and(|w| {
                    w.len() == 2
                        && w.iter().all(|t| {
                            t["reason"]
                                .as_str()
                                .is_some_and(|r| r.starts_with("waiting for disk space"))
                        })
                })
        },
    );
    assert_eq!(p.tasks_in("pending"), ["d", "e"], "{}", s.output());
    assert_eq!(
        s.output()
            .matches("no new claims until there is more")
            .count(),
        1,
        "said once: {}",
        s.output()
    );

    let cfg = p.read("config.yaml").replace("1000000000000", "0");
    std::fs::write(p.path("config.yaml"), cfg).expect("config");
    wait_done(&p, 2, Duration::from_secs(30));
    assert_eq!(p.tasks_in("completed"), ["d", "e"], "{}", s.output());
    assert!(s.output().contains("claims resume"), "{}", s.output());
    wait_for("the problem cleared", Duration::from_secs(10), || {
        !p.run(&["status"]).stdout().contains("no new claims")
    });
    assert!(s.stop().success(), "{}", s.output());
}

/// The configuration with the shell agent and `pool_idle_seconds`.
fn config_with_pool(idle: u64) -> String {
    format!(
        "{}workspace:\n  pool_idle_seconds: {idle}\n",
        config_with_shell()
    )
}

/// A worktree is handed from one task to the next instead of being made and deleted: the second
/// task runs in the first one's worktree, reset to the second one's base with nothing of the first
/// left in it (ignored files included), and an idle worktree goes once it has been idle for
/// `pool_idle_seconds`, the supervisor still running.
#[test]
fn an_idle_worktree_is_reused_clean_and_removed_once_idle() {
    let p = repo_project(
        &config_with_pool(4),
        &[(".gitignore", "junk/\n"), ("a.txt", "a\n")],
    );
    p.drop_task(
        "one.yaml",
        "agent: shell\ndescription: \"mkdir -p junk && echo j > junk/j.txt && echo one > one.txt\"\n",
    );
    // Claimed as soon as `one` lands, while its worktree is idle.
    p.drop_task(
        "two.yaml",
        "agent: shell\ndependencies: [one]\ndescription: \"if test -e junk/j.txt; then echo dirty; else echo clean; fi > seen.txt; cat one.txt >> seen.txt\"\n",
    );
    let mut s = p.start();
    wait_done(&p, 2, Duration::from_secs(60));
    let two = p.result("completed", "two");
    assert_eq!(
        two["files_modified"],
        serde_json::json!(["seen.txt"]),
        "{two}"
    );
    assert_eq!(p.read("seen.txt"), "clean\none\n", "{two}");
    assert_eq!(p.read("one.txt"), "one\n");
    assert!(
        !p.path("junk").exists(),
        "ignored files stay in the worktree"
    );
    // One worktree served both tasks: a second one would be idle beside it now.
    let idle = pooled(&p);
    assert!(idle.len() <= 1, "{idle:?}\n{}", s.output());
    let private = std::fs::read_dir(p.path(".git/worktrees"))
        .map(|rd| rd.count())
        .unwrap_or(0);
    assert!(private <= 1, "{private} worktree records in .git/worktrees");
    // Its pool folder goes too: a supervisor gone idle leaves no folder behind.
    wait_for(
        "the idle worktree is removed",
        Duration::from_secs(30),
        || {
            worktrees_left(&p).is_empty()
                && worktree_count(&p) == 1
                && !p.path(".orchestrate/worktrees/.pool").exists()
        },
    );
    assert!(s.stop().success(), "{}", s.output());
    assert_eq!(git(p.root(), &["branch", "--list", "orchestrate/*"]), "");
}

/// Idle worktrees of a supervisor that was killed are removed by the next start, and a
/// supervisor that stops removes its own.
#[test]
fn idle_worktrees_go_when_the_supervisor_stops_or_at_the_next_start_after_a_kill() {
    let p = repo_project(&config_with_pool(600), &[("a.txt", "a\n")]);
    p.drop_task(
        "one.yaml",
        "agent: shell\ndescription: \"echo one > one.txt\"\n",
    );
    let mut s = p.start();
    wait_done(&p, 1, Duration::from_secs(60));
    wait_for(
        "the worktree is idle in the pool",
        Duration::from_secs(10),
        || pooled(&p).len() == 1,
    );
    s.sigkill();
    assert_eq!(pooled(&p).len(), 1, "the kill left it");
    assert_eq!(worktree_count(&p), 2);
    let mut s = p.start();
    wait_for("the next start removed it", Duration::from_secs(30), || {
        worktrees_left(&p).is_empty() && worktree_count(&p) == 1
    });
    p.drop_task(
        "two.yaml",
        "agent: shell\ndescription: \"echo two > two.txt\"\n",
    );
    wait_done(&p, 2, Duration::from_secs(60));
    wait_for(
        "the worktree is idle in the pool",
        Duration::from_secs(10),
        || pooled(&p).len() == 1,
    );
    assert!(s.stop().success(), "{}", s.output());
    assert!(worktrees_left(&p).is_empty(), "{:?}", worktrees_left(&p));
    assert_eq!(worktree_count(&p), 1);
    assert_eq!(p.read("two.txt"), "two\n");
}

/// A dependency whose changes stayed on its branch (`merge: branch`) is still part of its
/// dependent's base: b reads what a wrote, and b's own diff and landing hold only b's change.
#[test]
fn a_dependent_builds_on_a_dependency_kept_on_its_branch() {
    let p = repo_project(&config_with_shell(), &[("base.txt", "base\n")]);
    p.drop_task(
        "a.yaml",
        "agent: shell\nmerge: branch\ndescription: \"echo from-a > a.txt\"\n",
    );
    p.drop_task(
        "b.yaml",
        "agent: shell\ndependencies: [a]\ndescription: \"cat a.txt > b.txt\"\n",
    );
    let mut s = p.start();
    wait_done(&p, 2, Duration::from_secs(60));
    assert!(s.stop().success(), "{}", s.output());
    assert_eq!(p.tasks_in("completed"), vec!["a", "b"], "{}", s.output());
    let a = p.result("completed", "a");
    assert_eq!(a["workspace"]["merge"], "kept", "{a}");
    let b = p.result("completed", "b");
    assert_eq!(b["files_modified"], serde_json::json!(["b.txt"]), "{b}");
    assert_eq!(b["workspace"]["merge"], "applied", "{b}");
    assert_eq!(p.read("b.txt"), "from-a\n");
    assert!(!p.path("a.txt").exists(), "a's change stays on its branch");
    assert_eq!(
        git(p.root(), &["show", "orchestrate/a:a.txt"]),
        "from-a\n",
        "a's branch is intact"
    );
}

/// A dependency kept on its branch because it conflicted with the user's tree cannot be part of
/// its dependent's base: the dependent fails at once saying which dependency, which files, and
/// what to do.
#[test]
fn a_dependent_of_a_conflicted_dependency_fails_saying_what_to_do() {
    let p = repo_project(&config_with_shell(), &[("a.txt", "original\n")]);
    let gate = tempfile::tempdir().expect("tempdir");
    run_into_a_conflict(&p, "clash", &gate.path().join("go"));
    p.drop_task(
        "after.yaml",
        "agent: shell\ndependencies: [clash]\ndescription: \"echo after > after.txt\"\n",
    );
    let mut s = p.start();
    wait_done(&p, 2, Duration::from_secs(60));
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("failed", "after");
    let text = r.to_string();
    for want in [
        "dependency clash",
        "orchestrate/clash",
        "a.txt",
        "orchestrate merge clash",
    ] {
        assert!(text.contains(want), "{want}: {r}");
    }
    assert_eq!(
        r["attempts"].as_array().map(Vec::len),
        Some(1),
        "not retried: {r}"
    );
    assert!(!p.path("after.txt").exists());
    assert_eq!(p.read("a.txt"), "edited by the user\n");
    assert_eq!(worktree_count(&p), 1);
}

/// With `workspace.keep: true` the worktree folder stays on the task's branch; `discard` removes
/// the folder with the branch (git deletes no branch a worktree has checked out).
#[test]
fn discard_removes_a_folder_kept_by_keep_true_with_its_branch() {
    let p = repo_project(
        &format!(
            "{}workspace:\n  keep: true\n  merge: branch\n",
            config_with_shell()
        ),
        &[("a.txt", "a\n")],
    );
    p.drop_task("k.yaml", "agent: shell\ndescription: \"echo k > k.txt\"\n");
    let mut s = p.start();
    wait_done(&p, 1, Duration::from_secs(60));
    assert!(s.stop().success(), "{}", s.output());
    assert_eq!(worktrees_left(&p), ["k"]);
    assert_eq!(p.read(".orchestrate/worktrees/k/k.txt"), "k\n");
    p.run(&["discard", "k"]).assert_code(0);
    assert!(worktrees_left(&p).is_empty(), "{:?}", worktrees_left(&p));
    assert_eq!(worktree_count(&p), 1);
    assert_eq!(git(p.root(), &["branch", "--list", "orchestrate/*"]), "");
    assert_eq!(
        p.result("completed", "k")["workspace"]["merge"],
        "discarded"
    );
}

/// Files an agent writes inside a submodule's folder (not checked out in the worktree) are in no
/// commit of the superproject: the result says so by name, and that worktree is not handed to the
/// next task (which finds the folder empty, as a new worktree has it).
#[test]
fn files_written_inside_a_submodule_folder_are_named_and_not_handed_on() {
    let lib = tempfile::tempdir().expect("tempdir");
    git(lib.path(), &["init", "-q"]);
    std::fs::write(lib.path().join("l.txt"), "lib\n").expect("write");
    git(lib.path(), &["add", "."]);
    git(lib.path(), &["commit", "-qm", "lib"]);
    let p = repo_project(&config_with_pool(60), &[("s.txt", "s\n")]);
    let url = lib.path().to_str().expect("utf-8");
    git(
        p.root(),
        &[
            "-c",
            "protocol.file.allow=always",
            "submodule",
            "add",
            "-q",
            url,
            "vendor/lib",
        ],
    );
    git(p.root(), &["commit", "-qm", "submodule"]);
    p.drop_task(
        "stray.yaml",
        "agent: shell\ndescription: \"echo lost > vendor/lib/stray.txt; echo kept > top.txt\"\n",
    );
    p.drop_task(
        "next.yaml",
        "agent: shell\ndependencies: [stray]\ndescription: \"ls -A vendor/lib > seen.txt\"\n",
    );
    let mut s = p.start();
    wait_done(&p, 2, Duration::from_secs(60));
    assert!(s.stop().success(), "{}", s.output());
    let r = p.result("completed", "stray");
    assert_eq!(r["files_modified"], serde_json::json!(["top.txt"]), "{r}");
    let e = r["workspace"]["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("vendor/lib") && e.contains("neither committed nor landed"),
        "{r}"
    );
    assert_eq!(p.read("top.txt"), "kept\n");
    assert_eq!(
        p.read("seen.txt"),
        "",
        "the next task's submodule folder is empty"
    );
    assert!(worktrees_left(&p).is_empty(), "{:?}", worktrees_left(&p));
}
