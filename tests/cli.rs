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
    // A cost cap is written as `max_cost_usd`; one that is not a positive amount is refused.
    let bad = p.run(&["add", "x", "--max-cost-usd", "0"]);
    bad.assert_code(2);
    assert!(
        bad.stderr()
            .contains("`max_cost_usd` must be a positive number"),
        "{}",
        bad.stderr()
    );
    assert!(!p.path("tasks/pending/task_004.yaml").exists());
    p.run(&["add", "capped", "--max-cost-usd", "2.5"])
        .assert_code(0);
    let t = p.read("tasks/pending/task_004.yaml");
    assert!(t.contains("max_cost_usd: 2.5"), "{t}");
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

/// `orchestrate ARGS` run in `dir` with no project around it: no `-C`, no `ORCHESTRATE_ROOT`, output
/// into files (a completion script is larger than a pipe holds), bounded.
fn run_outside(dir: &std::path::Path, args: &[&str]) -> Run {
    let out_path = dir.join(".stdout");
    let err_path = dir.join(".stderr");
    let mut child = std::process::Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("ORCHESTRATE_ROOT")
        .env_remove("DATABASE_URL")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn orchestrate");
    let status = wait_child(&mut child, std::time::Duration::from_secs(60))
        .unwrap_or_else(|| panic!("orchestrate {args:?} did not finish within 60 s"));
    let read = |p: &std::path::Path| std::fs::read(p).expect("captured output");
    let run = Run {
        args: args.iter().map(|s| s.to_string()).collect(),
        out: std::process::Output {
            status,
            stdout: read(&out_path),
            stderr: read(&err_path),
        },
    };
    let _ = std::fs::remove_file(out_path);
    let _ = std::fs::remove_file(err_path);
    run
}

/// A folder that is no project, with a config.yaml that would stop any command that read it.
fn not_a_project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("config.yaml"),
        "orchestrator: [this is not valid\n",
    )
    .expect("write");
    dir
}

/// The subcommands `--help` lists (the visible ones), read from the binary so that a new one is
/// checked without editing this test.
fn visible_subcommands(dir: &std::path::Path) -> Vec<String> {
    let help = run_outside(dir, &["--help"]).assert_code(0).stdout();
    let names: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|n| n != "help")
        .collect();
    assert!(
        names.len() > 10 && names.iter().any(|n| n == "completions"),
        "{help}"
    );
    names
}

/// A program on PATH, or `None` after saying that the check needing it is skipped (the test's other
/// checks still run). With `CI` set nothing may be skipped: `.ci/run` installs these programs.
fn installed(program: &str, check: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{program} is not installed and CI is set: {check} must run (.ci/run installs it)"
        );
        eprintln!("SKIPPED: {program} is not installed; {check} not run");
    }
    found
}

/// Run a shell command line (bounded) and return its stdout; it must succeed.
#[track_caller]
fn shell_ok(program: &std::path::Path, args: &[&str], dir: &std::path::Path) -> String {
    let out_path = dir.join(".shell-out");
    let mut child = std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("out file"))
        .stderr(std::fs::File::create(dir.join(".shell-err")).expect("err file"))
        .spawn()
        .expect("spawn shell");
    let status = wait_child(&mut child, std::time::Duration::from_secs(60))
        .unwrap_or_else(|| panic!("{} {args:?} did not finish within 60 s", program.display()));
    let out = std::fs::read_to_string(&out_path).expect("out");
    let err = std::fs::read_to_string(dir.join(".shell-err")).expect("err");
    assert!(
        status.success(),
        "{} {args:?}: {status:?}\n--- stdout\n{out}\n--- stderr\n{err}",
        program.display()
    );
    out
}

#[test]
fn completions_for_every_shell_need_no_project_and_offer_every_subcommand() {
    let dir = not_a_project();
    let subcommands = visible_subcommands(dir.path());
    for (shell, opening) in [
        ("bash", "_orchestrate() {"),
        ("zsh", "#compdef orchestrate"),
        ("fish", "# Print an optspec for argparse"),
        ("elvish", "\nuse builtin;"),
        (
            "powershell",
            "\nusing namespace System.Management.Automation",
        ),
    ] {
        let r = run_outside(dir.path(), &["completions", shell]);
        r.assert_code(0);
        let script = r.stdout();
        assert!(script.starts_with(opening), "{shell}: {script:.200}");
        for sub in &subcommands {
            assert!(script.contains(sub.as_str()), "{shell} lacks `{sub}`");
        }
        // Test plumbing is hidden from `--help`, and so from completion.
        assert!(
            !script.contains("fake-agent") && !script.contains("openai-agent"),
            "{shell} offers a hidden subcommand"
        );
        assert!(r.stderr().is_empty(), "{shell}: {}", r.stderr());
    }
    // `-C` naming a folder that does not exist does not matter either: nothing is read.
    run_outside(
        dir.path(),
        &["-C", "/nonexistent/orchestrate", "completions", "bash"],
    )
    .assert_code(0);
    let bad = run_outside(dir.path(), &["completions", "tcsh"]);
    bad.assert_code(2);
    assert!(
        bad.stderr().contains("invalid value 'tcsh'") && bad.stderr().contains("bash"),
        "{}",
        bad.stderr()
    );
}

#[test]
fn bash_completion_loads_in_a_real_bash_and_completes() {
    let Some(bash) = installed("bash", "loading the bash completion") else {
        return;
    };
    let dir = not_a_project();
    let script = run_outside(dir.path(), &["completions", "bash"])
        .assert_code(0)
        .stdout();
    std::fs::write(dir.path().join("orchestrate.bash"), script).expect("write");
    // What a user's ~/.bashrc does, then what bash does on TAB after `orchestrate va` and after
    // `orchestrate add --pri`.
    let out = shell_ok(
        &bash,
        &[
            "--norc",
            "--noprofile",
            "-c",
            r#"set -e
source ./orchestrate.bash
complete -p orchestrate
COMP_WORDS=(orchestrate va); COMP_CWORD=1
_orchestrate orchestrate va orchestrate
echo "words: ${COMPREPLY[*]}"
COMP_WORDS=(orchestrate add --pri); COMP_CWORD=2
_orchestrate orchestrate --pri add
echo "words: ${COMPREPLY[*]}""#,
        ],
        dir.path(),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("complete ") && lines[0].ends_with("-F _orchestrate orchestrate"),
        "{out}"
    );
    assert_eq!(
        lines[1..],
        ["words: validate", "words: --priority"],
        "{out}"
    );
}

/// The `shell` script as a user installs it: in the shape the generator writes, with every
/// subcommand in it. Without the shell itself, that is all that can be checked.
fn completion_script(dir: &std::path::Path, shell: &str, opening: &str) -> String {
    let script = run_outside(dir, &["completions", shell])
        .assert_code(0)
        .stdout();
    assert!(script.starts_with(opening), "{shell}: {script:.200}");
    for sub in visible_subcommands(dir) {
        assert!(script.contains(&sub), "{shell} lacks `{sub}`");
    }
    script
}

#[test]
fn zsh_completion_loads_in_a_real_zsh() {
    let dir = not_a_project();
    let script = completion_script(dir.path(), "zsh", "#compdef orchestrate\n");
    let Some(zsh) = installed("zsh", "loading the zsh completion") else {
        return;
    };
    std::fs::create_dir(dir.path().join("zfunc")).expect("mkdir");
    std::fs::write(dir.path().join("zfunc/_orchestrate"), script).expect("write");
    // Installed as a user does, into a folder on fpath: it must parse, and compinit must register it.
    let out = shell_ok(
        &zsh,
        &[
            "-f",
            "-c",
            r#"zsh -n zfunc/_orchestrate || exit 1
fpath=(./zfunc $fpath)
autoload -Uz compinit && compinit -u -D
print -r -- "registered: ${_comps[orchestrate]}""#,
        ],
        dir.path(),
    );
    assert!(out.contains("registered: _orchestrate"), "{out}");
}

#[test]
fn fish_completion_loads_in_a_real_fish_and_completes() {
    let dir = not_a_project();
    let script = completion_script(dir.path(), "fish", "# Print an optspec for argparse");
    let Some(fish) = installed("fish", "loading the fish completion") else {
        return;
    };
    std::fs::write(dir.path().join("orchestrate.fish"), script).expect("write");
    // `complete -C` asks fish what it would offer at that point of a command line.
    let out = shell_ok(
        &fish,
        &[
            "--no-config",
            "-c",
            "source ./orchestrate.fish; and complete -C 'orchestrate '; and complete -C 'orchestrate add --pri'",
        ],
        dir.path(),
    );
    let offered: Vec<&str> = out.lines().filter_map(|l| l.split('\t').next()).collect();
    for sub in visible_subcommands(dir.path()) {
        assert!(
            offered.contains(&sub.as_str()),
            "fish offers no `{sub}`: {out}"
        );
    }
    assert!(offered.contains(&"--priority"), "{out}");
    assert!(!offered.contains(&"fake-agent"), "{out}");
}

#[test]
fn man_pages_need_no_project_and_render() {
    let dir = not_a_project();
    let subcommands = visible_subcommands(dir.path());
    let top = run_outside(dir.path(), &["man"]).assert_code(0).stdout();
    assert!(top.contains("\n.TH ORCHESTRATE 1 "), "{top:.300}");
    for sub in &subcommands {
        assert!(
            top.contains(&format!("orchestrate\\-{}(1)", sub.replace('-', "\\-"))),
            "the page lists no `{sub}`"
        );
    }
    assert!(!top.contains("fake\\-agent"), "a hidden command is listed");
    let pages = dir.path().join("pages");
    let listed = run_outside(dir.path(), &["man", "--dir", pages.to_str().expect("utf8")])
        .assert_code(0)
        .stdout();
    let mut expected: Vec<std::path::PathBuf> = std::iter::once("orchestrate".to_string())
        .chain(subcommands.iter().map(|s| format!("orchestrate-{s}")))
        .chain([
            "orchestrate-mirror-rebuild".to_string(),
            "orchestrate-notify-test".to_string(),
        ])
        .map(|n| pages.join(format!("{n}.1")))
        .collect();
    let mut written: Vec<std::path::PathBuf> =
        listed.lines().map(std::path::PathBuf::from).collect();
    expected.sort();
    written.sort();
    assert_eq!(written, expected);
    let add = std::fs::read_to_string(pages.join("orchestrate-add.1")).expect("add page");
    assert!(add.contains("\n.TH ORCHESTRATE-ADD 1 "), "{add:.300}");
    assert!(add.contains("\\-\\-priority"), "{add}");
    assert_eq!(
        std::fs::read_to_string(pages.join("orchestrate.1")).expect("top page"),
        top,
        "--dir writes the same top-level page"
    );
    // Rendered by a real formatter, warnings on: each page must format cleanly.
    if let Some(groff) = installed("groff", "rendering the man pages") {
        for page in &written {
            let p = page.to_str().expect("utf8");
            let text = shell_ok(
                &groff,
                &["-man", "-Tascii", "-P-cbou", "-ww", p],
                dir.path(),
            );
            let err = std::fs::read_to_string(dir.path().join(".shell-err")).expect("err");
            assert!(err.is_empty(), "{p}: {err}");
            assert!(
                text.contains("NAME") && text.contains("SYNOPSIS"),
                "{p}: {text}"
            );
        }
        let text = shell_ok(
            &groff,
            &[
                "-man",
                "-Tascii",
                pages.join("orchestrate.1").to_str().expect("utf8"),
            ],
            dir.path(),
        );
        for sub in &subcommands {
            assert!(text.contains(&format!("orchestrate-{sub}(1)")), "{text}");
        }
    }
}

#[test]
fn a_permission_flag_in_args_is_a_note_and_a_contradiction_an_error() {
    let with_codex = |extra: &str| {
        test_config("").replace(
            "routing:",
            &format!(
                "  codex:\n    kind: codex\n    command: codex-not-installed-here\n{extra}    args: [--sandbox, workspace-write]\nrouting:"
            ),
        )
    };
    let note = "note: agents.codex.args sets `--sandbox workspace-write`; orchestrate passes your value \
                and not its own. The config key `permissions: workspace-write` says the same.";
    let p = Project::with_config(&with_codex(""));
    let r = p.run(&["validate", "--check-config"]);
    r.assert_code(0);
    assert!(r.stderr().contains(note), "{}", r.stderr());
    assert!(r.stdout().ends_with("config.yaml: ok\n"), "{}", r.stdout());
    // `start` says it once, as it starts.
    let r = p.run(&["start", "--once"]);
    r.assert_code(0);
    assert_eq!(
        r.stdout().matches("agents.codex.args sets").count(),
        1,
        "{}",
        r.stdout()
    );
    // With `permissions` saying otherwise, the flag would silently win: refused, naming both.
    let p = Project::with_config(&with_codex("    permissions: read-only\n"));
    let r = p.run(&["validate", "--check-config"]);
    r.assert_code(1);
    assert!(
        r.stderr().contains("`agents.codex.permissions`")
            && r.stderr().contains(
                "`permissions: read-only` and `--sandbox workspace-write` in `agents.codex.args` disagree"
            ),
        "{}",
        r.stderr()
    );
    p.run(&["start", "--once"]).assert_code(2);
}
