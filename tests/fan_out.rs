//! Fan-out: one task raced by several candidates, each its own task in its own worktree and
//! branch; `pick` decides which lands (the first to pass, a judge's choice, or none until a person
//! merges one). Real git repositories, the real binary, fake agents that differ by their arguments
//! (all candidates share the task's prompt). The real CLIs race in tests/agents.rs.

mod common;

use std::time::Duration;

use common::*;

/// Agents `fa` (writes a.txt, done a second later), `fb` (writes b.txt at once), `slow` (writes s.txt after a wait) and the
/// judge `fj`, whose answer is `judge_says`.
fn config(judge_says: &str) -> String {
    let bin = env!("CARGO_BIN_EXE_orchestrate");
    let agent = |name: &str, args: &str| {
        format!(
            "  {name}:\n    kind: command\n    command: {bin}\n    args: [fake-agent, {args}]\n    max_instances: 4\n"
        )
    };
    let agents = [
        agent("fa", "'write=a.txt:from-a', 'sleep=1'"),
        agent("fb", "'write=b.txt:from-b'"),
        agent("slow", "'sleep=60', 'write=s.txt:from-slow'"),
        agent("fj", &format!("'print={judge_says}'")),
    ]
    .concat();
    test_config("")
        .replace("agents:\n", &format!("agents:\n{agents}"))
        .replace("max_retries: 1", "max_retries: 0")
}

fn repo(config: &str) -> Project {
    let p = Project::with_config(config);
    git_init_commit(p.root());
    p
}

fn run_once(p: &Project) -> String {
    let r = p.run(&["start", "--once", "-v"]);
    let logs = format!("{}{}", r.stdout(), r.stderr());
    r.assert_code(0);
    logs
}

fn branches(p: &Project) -> String {
    git(p.root(), &["branch", "--list", "orchestrate/*"])
}

fn candidate<'a>(r: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    r["fan_out"]["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no candidate {name}: {r}"))
}

#[test]
fn first_pass_lands_the_first_candidate_whose_check_passes_and_stops_the_others() {
    let p = repo(&config("-"));
    p.drop_task(
        "race.yaml",
        "description: make the file\nfan_out: [fa, fb, slow]\ncheck: test -f a.txt\n",
    );
    let logs = run_once(&p);
    let r = p.result("completed", "race");
    assert_eq!(r["fan_out"]["pick"], "first_pass", "{r}\n{logs}");
    assert_eq!(r["fan_out"]["winner"], "fa", "{r}\n{logs}");
    assert!(
        r["fan_out"]["picked_because"]
            .as_str()
            .is_some_and(|b| b.contains("first candidate to complete with its check passing")),
        "{r}"
    );
    assert_eq!(r["agent"], "fa");
    // Only the winner's change landed; the others' never did.
    assert_eq!(p.read("a.txt"), "from-a\n");
    assert!(!p.path("b.txt").exists() && !p.path("s.txt").exists());
    assert_eq!(r["files_modified"], serde_json::json!(["a.txt"]), "{r}");
    assert_eq!(r["workspace"]["merge"], "applied", "{r}");
    // Each candidate is a task of its own, with its own outcome.
    assert_eq!(candidate(&r, "fa")["status"], "completed");
    assert_eq!(candidate(&r, "fa")["check"]["passed"], true);
    let fb = p.result("failed", "race.fb");
    assert_eq!(fb["attempts"][0]["outcome"], "check_failed", "{fb}");
    assert_eq!(candidate(&r, "fb")["status"], "failed");
    assert_eq!(candidate(&r, "fb")["check"]["passed"], false);
    // The slow one was stopped when fa won, and says why.
    let slow = p.result("failed", "race.slow");
    assert_eq!(slow["attempts"][0]["outcome"], "cancelled", "{slow}");
    assert_eq!(slow["attempts"][0]["error"], slow["error"], "{slow}");
    assert!(
        slow["error"]
            .as_str()
            .is_some_and(|e| e.contains("another candidate of race completed first")),
        "{slow}"
    );
    assert_eq!(candidate(&r, "slow")["status"], "cancelled");
    // Per-candidate context files, and the task's own: the winner's.
    assert!(p.read("context/diffs/race.fa.diff").contains("+from-a"));
    assert!(p.read("context/diffs/race.diff").contains("+from-a"));
    assert!(p.path("context/agent_outputs/race.fa_output.md").exists());
    let out = p.read("context/agent_outputs/race_output.md");
    assert!(out.contains("Winner: fa"), "{out}");
    // No branch is left: the winner's landed, the losers' went with them.
    assert_eq!(branches(&p), "", "{logs}");
    let winner = p.result("completed", "race.fa");
    assert_eq!(winner["workspace"]["merge"], "applied", "{winner}");
    // `show` lists the candidates.
    let shown = p.run(&["show", "race"]);
    shown.assert_code(0);
    let text = shown.stdout();
    assert!(
        text.contains("fan-out, pick first_pass: winner fa"),
        "{text}"
    );
    assert!(
        text.contains("candidate slow (race.slow, slow): cancelled"),
        "{text}"
    );
    assert_eq!(p.mirror_states(), p.tree_states());
}

#[test]
fn a_judge_picks_among_the_candidates_that_completed_and_says_why() {
    let p = repo(&config(
        r#"{"winner": "fb", "reason": "b.txt is what was asked"}"#,
    ));
    p.drop_task(
        "judged.yaml",
        "description: make the file\nfan_out: [fa, fb]\npick: judge\njudge: fj\n",
    );
    let logs = run_once(&p);
    let r = p.result("completed", "judged");
    assert_eq!(r["fan_out"]["winner"], "fb", "{r}\n{logs}");
    assert_eq!(
        r["fan_out"]["picked_because"], "judge fj: b.txt is what was asked",
        "{r}"
    );
    assert_eq!(p.read("b.txt"), "from-b\n");
    assert!(!p.path("a.txt").exists());
    // Both finished before the judge was asked, and it was shown both diffs.
    assert_eq!(candidate(&r, "fa")["status"], "completed");
    let prompt = p.read("context/logs/judged.judge/attempt-1.prompt.md");
    assert!(
        prompt.contains("+from-a") && prompt.contains("+from-b"),
        "{prompt}"
    );
    assert!(prompt.contains("\"winner\""), "{prompt}");
    assert_eq!(branches(&p), "", "{logs}");
    let loser = p.result("completed", "judged.fa");
    assert!(
        loser["workspace"]["merge"]
            .as_str()
            .is_some_and(|m| m.starts_with("discarded")),
        "{loser}"
    );
}

#[test]
fn a_judge_that_answers_nonsense_falls_back_to_the_first_to_complete() {
    let p = repo(&config("I cannot decide, both look fine"));
    p.drop_task(
        "unsure.yaml",
        "description: make the file\nfan_out: [fa, fb]\npick: judge\njudge: fj\n",
    );
    let logs = run_once(&p);
    let r = p.result("completed", "unsure");
    // The first to complete, by the candidates' own results.
    let finished = |id: &str| {
        p.result("completed", id)["finished_at"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let first = if finished("unsure.fa") <= finished("unsure.fb") {
        "fa"
    } else {
        "fb"
    };
    assert_eq!(r["fan_out"]["winner"], first, "{r}\n{logs}");
    let why = r["fan_out"]["picked_because"].as_str().unwrap_or_default();
    assert!(
        why.contains("answer was not usable") && why.contains("first candidate to complete"),
        "{why}"
    );
    let (won, lost) = if first == "fa" {
        ("a.txt", "b.txt")
    } else {
        ("b.txt", "a.txt")
    };
    assert_eq!(p.read(won), format!("from-{}\n", &first[1..]));
    assert!(!p.path(lost).exists());
}

#[test]
fn pick_all_keeps_every_branch_until_a_person_merges_one() {
    let p = repo(&config("-"));
    p.drop_task(
        "both.yaml",
        "description: make the file\nfan_out: [fa, fb]\npick: all\n",
    );
    let logs = run_once(&p);
    let r = p.result("completed", "both");
    assert!(r["fan_out"]["winner"].is_null(), "{r}\n{logs}");
    assert_eq!(candidate(&r, "fa")["branch"], "orchestrate/both/fa", "{r}");
    assert_eq!(candidate(&r, "fb")["branch"], "orchestrate/both/fb", "{r}");
    assert!(!p.path("a.txt").exists() && !p.path("b.txt").exists());
    let listed = branches(&p);
    assert!(
        listed.contains("orchestrate/both/fa") && listed.contains("orchestrate/both/fb"),
        "{listed}"
    );
    // An unknown candidate is named as such; then fb is merged by hand.
    let wrong = p.run(&["merge", "both", "--candidate", "gemini"]);
    wrong.assert_code(2);
    assert!(
        wrong.stderr().contains("no candidate `gemini`"),
        "{}",
        wrong.stderr()
    );
    p.run(&["merge", "both", "--candidate", "fb"])
        .assert_code(0);
    assert_eq!(p.read("b.txt"), "from-b\n");
    assert!(!p.path("a.txt").exists());
    let r = p.result("completed", "both");
    assert_eq!(r["fan_out"]["winner"], "fb", "{r}");
    assert!(candidate(&r, "fb")["branch"].is_null(), "{r}");
    // The other candidate's branch went with the choice; its record says so.
    assert_eq!(branches(&p), "");
    assert!(candidate(&r, "fa")["branch"].is_null(), "{r}");
    assert!(
        p.result("completed", "both.fa")["workspace"]["merge"]
            .as_str()
            .is_some_and(|m| m.starts_with("discarded")),
        "{r}"
    );
    // Once one landed, another cannot.
    let again = p.run(&["merge", "both", "--candidate", "fa"]);
    again.assert_code(2);
    assert!(again.stderr().contains("already won"), "{}", again.stderr());
}

#[test]
fn a_fan_out_whose_candidates_all_fail_fails_and_names_them() {
    let p = repo(&config("-"));
    p.drop_task(
        "none.yaml",
        "description: make the file\nfan_out: [fa, fb]\ncheck: test -f c.txt\n",
    );
    let logs = run_once(&p);
    let r = p.result("failed", "none");
    let error = r["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("no candidate completed") && error.contains("none.fa, none.fb"),
        "{error}\n{logs}"
    );
    assert!(!p.path("a.txt").exists() && !p.path("b.txt").exists());
    assert_eq!(branches(&p), "");
    // Retried once the check can pass: the candidates run again, and one lands.
    std::fs::write(p.path("c.txt"), "now\n").expect("write");
    git(p.root(), &["add", "c.txt"]);
    git(p.root(), &["commit", "-qm", "c"]);
    p.run(&["retry", "none"]).assert_code(0);
    assert_eq!(p.tasks_in("failed"), Vec::<String>::new());
    let logs = run_once(&p);
    let r = p.result("completed", "none");
    let winner = r["fan_out"]["winner"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(winner == "fa" || winner == "fb", "{r}\n{logs}");
    let won = p.result("completed", &format!("none.{winner}"));
    assert_eq!(won["attempts"].as_array().map(Vec::len), Some(2), "{won}");
}

#[test]
fn a_fan_out_naming_an_unknown_agent_fails_at_once_without_candidates() {
    let p = repo(&config("-"));
    p.drop_task(
        "typo.yaml",
        "description: make the file\nfan_out: [fa, gemini]\n",
    );
    run_once(&p);
    let r = p.result("failed", "typo");
    assert!(
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("fan_out: agent `gemini` is not configured")),
        "{r}"
    );
    assert!(p.tasks_in("completed").is_empty(), "no candidate ran");
    assert_eq!(p.tasks_in("failed"), vec!["typo"]);
}

#[test]
fn cancelling_a_fan_out_cancels_its_candidates() {
    let p = repo(&config("-"));
    p.drop_task(
        "stop.yaml",
        "description: make the file\nfan_out: [slow, fb]\ncheck: 'false'\n",
    );
    let mut s = p.start();
    wait_for("slow running", Duration::from_secs(30), || {
        p.tasks_in("assigned").contains(&"stop.slow".to_string())
    });
    let cancel = p.run(&["cancel", "stop"]);
    cancel.assert_code(0);
    assert!(
        cancel.stdout().contains("of its candidates"),
        "{}",
        cancel.stdout()
    );
    wait_for("all failed", Duration::from_secs(30), || {
        p.tasks_in("failed").len() == 3
    });
    assert!(s.stop().success(), "{}", s.output());
    let slow = p.result("failed", "stop.slow");
    assert_eq!(slow["attempts"][0]["outcome"], "cancelled", "{slow}");
    assert!(!p.path("s.txt").exists());
}

#[test]
fn task_files_with_wrong_fan_out_fields_are_rejected_naming_the_field() {
    let p = repo(&config("-"));
    let cases = [
        ("fan_out: 1\n", "between 2 and 16"),
        ("fan_out: [fa, fa]\n", "listed twice"),
        ("fan_out: [fa, judge]\n", "name of the fan-out's judge"),
        ("fan_out: [fa, fb]\npick: judge\n", "needs `judge: AGENT`"),
        ("pick: all\n", "only applies with `fan_out`"),
        ("fan_out: [fa, fb]\nsubtasks: [x]\n", "cannot be combined"),
        ("fan_out: [fa, fb]\nisolation: none\n", "isolation: none"),
    ];
    for (i, (extra, want)) in cases.iter().enumerate() {
        let name = format!("bad{i}.yaml");
        let path = p.path(&name);
        std::fs::write(&path, format!("description: d\n{extra}")).expect("write");
        let r = p.run(&["validate", path.to_str().expect("utf8")]);
        r.assert_code(1);
        let text = format!("{}{}", r.stdout(), r.stderr());
        assert!(text.contains(want), "{extra}: {text}");
    }
}

/// Killed right after the winner landed and before anything recorded it: the restart picks the
/// same winner, lands nothing twice (one commit with `merge: commit`), and leaves no branch.
#[test]
fn a_crash_right_after_the_winner_landed_lands_it_once() {
    for merge in ["apply", "commit"] {
        let p = repo(&config("-"));
        p.drop_task(
            "crash.yaml",
            // fb fails its check: fa is the only possible winner, before and after the crash.
            &format!(
                "description: make the file\nfan_out: [fa, fb]\nmerge: {merge}\ncheck: test -f a.txt\n"
            ),
        );
        let commits_before = git(p.root(), &["rev-list", "--count", "HEAD"]);
        let crashed = p.run_until_crash("fanout.after_land:1");
        assert_eq!(p.read("a.txt"), "from-a\n", "landed before the crash");
        let logs = run_once(&p);
        assert_eq!(
            p.tasks_in("completed"),
            vec!["crash", "crash.fa"],
            "{merge}\n{crashed}\n{logs}"
        );
        let r = p.result("completed", "crash");
        assert_eq!(
            r["fan_out"]["winner"], "fa",
            "{merge}: {r}\n{crashed}\n{logs}"
        );
        assert_eq!(p.read("a.txt"), "from-a\n");
        assert!(!p.path("b.txt").exists());
        assert_eq!(branches(&p), "", "{merge}\n{logs}");
        let commits_after = git(p.root(), &["rev-list", "--count", "HEAD"]);
        let added: u32 = commits_after.trim().parse::<u32>().expect("a count")
            - commits_before.trim().parse::<u32>().expect("a count");
        assert_eq!(
            added,
            u32::from(merge == "commit"),
            "{merge}: commits added"
        );
        assert_eq!(p.mirror_states(), p.tree_states(), "{merge}");
    }
}
