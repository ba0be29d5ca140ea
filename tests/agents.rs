//! End-to-end tests with the real agent CLIs (Claude Code, Codex, Gemini CLI, installed pinned by
//! `tools/test` into tools/agents/node_modules) talking to a scripted model server on 127.0.0.1, and
//! the `openai` kind and the router against the same server's chat-completions endpoint.
//!
//! A test that drives a CLI lives in a module named after it (`claude::`, `codex::`, `gemini::`); one
//! that drives two lives in both (`claude::codex::`). That is how `tools/test` finds, by name alone,
//! the tests to skip on a machine without a CLI. Run any other way, a test whose CLI is missing fails
//! and says so: it never passes without running. The `openai` and router tests need no CLI.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::model_server::{self, Api, ModelServer, Reply};
use common::*;

/// The CLI's installed binary (from ORCHESTRATE_AGENT_BIN_DIR when set). The test fails when it is
/// missing, or when the test is outside the CLI's module, where `tools/test` could not skip it.
#[track_caller]
fn cli(name: &str) -> PathBuf {
    assert_grouped(name, None, name);
    pinned_cli(name)
}

/// Which real CLI, and how it reaches the model server.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cli {
    Claude,
    Codex,
    Gemini,
}

impl Cli {
    fn bin_name(self) -> &'static str {
        match self {
            Cli::Claude => "claude",
            Cli::Codex => "codex",
            Cli::Gemini => "gemini",
        }
    }

    fn api(self) -> Api {
        match self {
            Cli::Claude => Api::Anthropic,
            Cli::Codex => Api::Responses,
            Cli::Gemini => Api::Gemini,
        }
    }
}

/// The `agents:` entry for one CLI, pointed at the server, with a private home directory so
/// nothing of the machine's own configuration is read or written.
fn agent_block(
    name: &str,
    which: Cli,
    bin: &std::path::Path,
    server: &ModelServer,
    home: &std::path::Path,
) -> String {
    std::fs::create_dir_all(home).expect("mkdir home");
    let url = server.url();
    let common = format!(
        "    kind: {kind}\n    command: {bin}\n    max_instances: 2\n",
        kind = which.bin_name(),
        bin = bin.display()
    );
    match which {
        Cli::Claude => format!(
            "  {name}:\n{common}    base_url: {url}\n    env:\n      HOME: {home}\n      ANTHROPIC_API_KEY: test-key\n      CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC: \"1\"\n      CLAUDE_CODE_MAX_RETRIES: \"0\"\n",
            home = home.display()
        ),
        Cli::Codex => {
            let codex_home = home.join(".codex");
            std::fs::create_dir_all(&codex_home).expect("mkdir codex home");
            format!(
                "  {name}:\n{common}    base_url: {url}/v1\n    model: gpt-test\n    args: [-c, model_providers.orchestrate.request_max_retries=0, -c, model_providers.orchestrate.stream_max_retries=0, -c, check_for_update_on_startup=false]\n    env:\n      HOME: {home}\n      CODEX_HOME: {codex_home}\n      OPENAI_API_KEY: test-key\n",
                home = home.display(),
                codex_home = codex_home.display()
            )
        }
        Cli::Gemini => {
            let gdir = home.join(".gemini");
            std::fs::create_dir_all(&gdir).expect("mkdir gemini home");
            std::fs::write(
                gdir.join("settings.json"),
                r#"{"security":{"auth":{"selectedType":"gemini-api-key"}},"privacy":{"usageStatisticsEnabled":false},"general":{"maxAttempts":1}}"#,
            )
            .expect("write gemini settings");
            format!(
                "  {name}:\n{common}    base_url: {url}\n    model: gemini-2.5-flash\n    env:\n      HOME: {home}\n      GEMINI_CLI_HOME: {home}\n      GEMINI_API_KEY: test-key\n      GEMINI_CLI_NO_RELAUNCH: \"true\"\n",
                home = home.display()
            )
        }
    }
}

/// A project whose agents are the given CLIs (in fallback order) against `server`.
fn project(agents: &[(&str, Cli, PathBuf)], server: &ModelServer, extra: &str) -> Project {
    let tmp = tempfile::tempdir().expect("tempdir").keep();
    let mut blocks = String::new();
    for (name, which, bin) in agents {
        blocks.push_str(&agent_block(
            name,
            *which,
            bin,
            server,
            &tmp.join(format!("home-{name}")),
        ));
    }
    let fallback: Vec<&str> = agents.iter().map(|(n, _, _)| *n).collect();
    let config = format!(
        "orchestrator:\n  max_concurrent: 4\n  settle_ms: 100\n  rescan_seconds: 2\n  kill_grace_seconds: 1\n  heartbeat_seconds: 1\nagents:\n{blocks}routing:\n  fallback: [{}]\ntask_queue:\n  timeout_minutes: 2\n  max_retries: 0\n  retry_delay_seconds: 0.2\nsecurity:\n  env_allow: [PATH, LANG]\n{extra}",
        fallback.join(", ")
    );
    let p = Project::with_config(&config);
    std::fs::create_dir_all(p.path("work")).expect("mkdir work");
    p
}

/// No worktree folder under the state directory and none in `repo`'s records once a task is over.
fn assert_nothing_left(p: &Project, repo: &std::path::Path) {
    let left: Vec<_> = std::fs::read_dir(p.path(".orchestrate/worktrees"))
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(git(repo, &["worktree", "list"]).lines().count(), 1);
}

fn wait_terminal(p: &Project, id: &str, limit: Duration) -> (String, serde_json::Value) {
    wait_for(&format!("{id} to finish"), limit, || {
        p.tasks_in("completed").contains(&id.to_string())
            || p.tasks_in("failed").contains(&id.to_string())
    });
    let state = if p.tasks_in("completed").contains(&id.to_string()) {
        "completed"
    } else {
        "failed"
    };
    (state.to_string(), p.result(state, id))
}

fn text_and_tokens(which: Cli) {
    let bin = cli(which.bin_name());
    let server = ModelServer::start();
    server.script(which.api(), vec![Reply::Text("The answer is 42.".into())]);
    let p = project(&[("agent", which, bin)], &server, "");
    let mut sup = p.start();
    p.drop_task(
        "ask.yaml",
        "description: What is six times seven?\nworkdir: work\n",
    );
    let (state, r) = wait_terminal(&p, "ask", Duration::from_secs(120));
    assert_eq!(state, "completed", "{r}\n{}", sup.output());
    let out = p.read("context/agent_outputs/ask_output.md");
    assert!(out.contains("The answer is 42."), "{out}");
    let a = &r["attempts"][0];
    assert!(
        a["input_tokens"].as_u64().unwrap_or(0) >= model_server::INPUT_TOKENS,
        "{r}"
    );
    assert_eq!(
        a["output_tokens"].as_u64(),
        Some(model_server::OUTPUT_TOKENS),
        "{r}"
    );
    assert!(
        a["session_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{r}"
    );
    if which == Cli::Claude {
        assert!(
            a["cost_usd"].as_f64().is_some(),
            "claude reports a cost: {r}"
        );
    }
    assert_eq!(server.conversations(which.api()), 1);
    // The totals reach `orchestrate agents` once the mirror has the terminal transition (it may lag
    // the tree by a few milliseconds, more on a busy machine).
    let me_of = || {
        let agents = p.run(&["agents", "--json"]).assert_code(0).json();
        agents
            .as_array()
            .and_then(|v| v.iter().find(|a| a["name"] == "agent"))
            .expect("agent listed")
            .clone()
    };
    wait_for(
        "the mirror to count the attempt",
        Duration::from_secs(30),
        || me_of()["running"] == 0,
    );
    let me = me_of();
    assert_eq!(me["completed"], 1, "{me}");
    assert_eq!(
        me["output_tokens"].as_u64(),
        Some(model_server::OUTPUT_TOKENS),
        "{me}"
    );
    assert!(
        me["version"].as_str().is_some_and(|v| !v.is_empty()),
        "{me}"
    );
    assert!(sup.stop().success(), "{}", sup.output());
}

fn writes_a_file(which: Cli) {
    let bin = cli(which.bin_name());
    let server = ModelServer::start();
    server.script(
        which.api(),
        vec![Reply::WriteFile {
            path: "hello.txt".into(),
            content: "hello from the model\n".into(),
            then: "I wrote hello.txt.".into(),
        }],
    );
    let p = project(&[("agent", which, bin)], &server, "");
    let mut sup = p.start();
    p.drop_task(
        "write.yaml",
        "description: Create hello.txt\nworkdir: work\n",
    );
    let (state, r) = wait_terminal(&p, "write", Duration::from_secs(120));
    assert_eq!(state, "completed", "{r}\n{}", sup.output());
    assert_eq!(
        std::fs::read_to_string(p.path("work/hello.txt")).expect("hello.txt written"),
        "hello from the model\n"
    );
    let diff = p.read("context/diffs/write.diff");
    assert!(
        diff.contains("+++ b/hello.txt") && diff.contains("+hello from the model"),
        "{diff}"
    );
    assert_eq!(r["files_modified"], serde_json::json!(["hello.txt"]), "{r}");
    let out = p.read("context/agent_outputs/write_output.md");
    assert!(out.contains("I wrote hello.txt."), "{out}");
    assert!(sup.stop().success(), "{}", sup.output());
}

fn hang_is_killed_at_the_timeout(which: Cli) {
    let bin = cli(which.bin_name());
    let server = ModelServer::start();
    server.script(which.api(), vec![Reply::Hang]);
    let p = project(&[("agent", which, bin)], &server, "");
    let mut sup = p.start();
    // 0.1 minutes: six seconds, enough for the CLI to start and send its request.
    p.drop_task(
        "stuck.yaml",
        "description: Wait forever\nworkdir: work\ntimeout_minutes: 0.1\n",
    );
    let (state, r) = wait_terminal(&p, "stuck", Duration::from_secs(90));
    assert_eq!(state, "failed", "{r}");
    assert_eq!(r["attempts"][0]["outcome"], "timeout", "{r}");
    assert!(
        server.conversations(which.api()) >= 1,
        "the CLI never reached the model"
    );
    // Nothing of the CLI is left running: no process has its working directory in the workdir.
    let work = p.path("work").canonicalize().expect("workdir");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|e| std::fs::read_link(e.path().join("cwd")).is_ok_and(|c| c.starts_with(&work)))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "processes left in the workdir: {left:?}");
    assert!(sup.stop().success(), "{}", sup.output());
}

fn rate_limit_sends_the_task_down_the_fallback_chain_and_cools_the_agent() {
    let (claude, codex) = (cli("claude"), cli("codex"));
    let server = ModelServer::start();
    server.script(
        Api::Anthropic,
        vec![Reply::RateLimit {
            retry_after_secs: Some(600),
        }],
    );
    server.script(Api::Responses, vec![Reply::Text("done by codex".into())]);
    let p = project(
        &[
            ("claude", Cli::Claude, claude),
            ("codex", Cli::Codex, codex),
        ],
        &server,
        "",
    );
    let mut sup = p.start();
    p.drop_task(
        "busy.yaml",
        "description: Summarise the repo\nworkdir: work\n",
    );
    let (state, r) = wait_terminal(&p, "busy", Duration::from_secs(120));
    assert_eq!(state, "completed", "{r}\n{}", sup.output());
    let attempts = r["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{r}");
    assert_eq!(attempts[0]["agent"], "claude");
    assert_eq!(attempts[0]["outcome"], "rate_limited", "{r}");
    assert_eq!(attempts[1]["agent"], "codex");
    assert_eq!(attempts[1]["outcome"], "completed");
    assert_eq!(r["agent"], "codex");
    assert!(
        r["chosen_because"]
            .as_str()
            .is_some_and(|b| b.contains("claude: cooling down until")),
        "{r}"
    );
    let out = p.read("context/agent_outputs/busy_output.md");
    assert!(out.contains("done by codex"), "{out}");
    // claude rests (Claude Code does not pass the retry-after header on, so for the default
    // cooldown) and says so.
    let agents = p.run(&["agents", "--json"]).assert_code(0).json();
    let claude = agents
        .as_array()
        .and_then(|v| v.iter().find(|a| a["name"] == "claude"))
        .expect("claude listed")
        .clone();
    assert!(claude["cooldown_until"].as_str().is_some(), "{claude}");
    let status = p.run(&["status"]).assert_code(0).stdout();
    assert!(status.contains("cooldown: claude until"), "{status}");
    // A second task skips claude without asking it.
    let asked = server.conversations(Api::Anthropic);
    p.drop_task("next.yaml", "description: And another\nworkdir: work\n");
    let (state, r) = wait_terminal(&p, "next", Duration::from_secs(120));
    assert_eq!(state, "completed", "{r}");
    assert_eq!(r["agent"], "codex");
    assert_eq!(server.conversations(Api::Anthropic), asked);
    assert!(sup.stop().success(), "{}", sup.output());
}

/// A project with `openai` agents only, all served by the model server's chat endpoint.
fn openai_project(server: &ModelServer, agents: &[&str], routing: &str) -> Project {
    let mut blocks = String::new();
    for a in agents {
        blocks.push_str(&format!(
            "  {a}:\n    kind: openai\n    base_url: {}/v1\n    model: local-model\n    max_instances: 2\n",
            server.url()
        ));
    }
    let config = format!(
        "orchestrator:\n  max_concurrent: 2\n  settle_ms: 100\n  rescan_seconds: 2\n  kill_grace_seconds: 1\nagents:\n{blocks}routing:\n{routing}task_queue:\n  timeout_minutes: 1\n  max_retries: 0\nsecurity:\n  env_allow: [PATH]\n"
    );
    let p = Project::with_config(&config);
    std::fs::create_dir_all(p.path("work")).expect("mkdir work");
    p
}

#[test]
fn openai_agent_answers_through_chat_completions() {
    let server = ModelServer::start();
    server.script(
        Api::Chat,
        vec![Reply::Text("A plan in three steps.".into())],
    );
    let p = openai_project(&server, &["local"], "  fallback: [local]\n");
    let mut sup = p.start();
    p.drop_task(
        "plan.yaml",
        "description: Plan the refactor\nworkdir: work\n",
    );
    let (state, r) = wait_terminal(&p, "plan", Duration::from_secs(60));
    assert_eq!(state, "completed", "{r}\n{}", sup.output());
    let out = p.read("context/agent_outputs/plan_output.md");
    assert!(out.contains("A plan in three steps."), "{out}");
    let a = &r["attempts"][0];
    assert_eq!(
        a["input_tokens"].as_u64(),
        Some(model_server::INPUT_TOKENS),
        "{r}"
    );
    assert_eq!(
        a["output_tokens"].as_u64(),
        Some(model_server::OUTPUT_TOKENS),
        "{r}"
    );
    assert!(sup.stop().success(), "{}", sup.output());
}

#[test]
fn openai_agent_rate_limit_cools_it_down_and_the_task_waits() {
    let server = ModelServer::start();
    server.script(
        Api::Chat,
        vec![Reply::RateLimit {
            retry_after_secs: Some(3600),
        }],
    );
    let p = openai_project(&server, &["local"], "  fallback: [local]\n");
    let mut sup = p.start();
    p.drop_task("later.yaml", "description: Plan\nworkdir: work\n");
    // With no other agent, the task waits in pending, and status says until when.
    wait_for(
        "the cooldown to show in status",
        Duration::from_secs(60),
        || {
            let s = p.run(&["status"]).stdout();
            s.contains("cooldown: local until") && s.contains("cooling down until")
        },
    );
    assert_eq!(p.tasks_in("pending"), vec!["later".to_string()]);
    assert_eq!(server.conversations(Api::Chat), 1);
    assert!(sup.stop().success(), "{}", sup.output());
}

#[test]
fn router_picks_the_agent_and_the_result_says_why() {
    let server = ModelServer::start();
    server.script(
        Api::Chat,
        vec![
            Reply::Text(
                r#"{"category": "planning", "agent": "planner", "confidence": 0.93}"#.into(),
            ),
            Reply::Text("planned".into()),
        ],
    );
    let p = openai_project(
        &server,
        &["router", "writer", "planner"],
        "  fallback: [writer]\n  router: {agent: router, timeout_seconds: 10}\n",
    );
    let mut sup = p.start();
    p.drop_task(
        "route.yaml",
        "description: Plan the next release\nworkdir: work\n",
    );
    let (state, r) = wait_terminal(&p, "route", Duration::from_secs(60));
    assert_eq!(state, "completed", "{r}\n{}", sup.output());
    assert_eq!(r["agent"], "planner", "{r}");
    let because = r["chosen_because"].as_str().unwrap_or_default();
    assert!(
        because.contains("router router: category planning, confidence 0.93"),
        "{because}"
    );
    // The router saw the task and the agents it may choose from.
    let reqs = server.requests();
    let first = reqs
        .iter()
        .find(|(_, path, _)| path.contains("chat/completions"))
        .expect("router asked");
    assert!(
        first.2.contains("Plan the next release") && first.2.contains("planner"),
        "{}",
        first.2
    );
    assert!(sup.stop().success(), "{}", sup.output());
}

#[test]
fn router_nonsense_or_silence_falls_back_to_the_chain() {
    for (name, first) in [
        ("nonsense", Reply::Text("I would pick the best one.".into())),
        ("silence", Reply::Hang),
    ] {
        let server = ModelServer::start();
        server.script(Api::Chat, vec![first, Reply::Text("written".into())]);
        let p = openai_project(
            &server,
            &["router", "writer", "planner"],
            "  fallback: [writer]\n  router: {agent: router, timeout_seconds: 2}\n",
        );
        let mut sup = p.start();
        p.drop_task(
            "t.yaml",
            "description: Write the changelog\nworkdir: work\n",
        );
        let (state, r) = wait_terminal(&p, "t", Duration::from_secs(60));
        assert_eq!(state, "completed", "{name}: {r}\n{}", sup.output());
        assert_eq!(r["agent"], "writer", "{name}: {r}");
        let because = r["chosen_because"].as_str().unwrap_or_default();
        let expected = match name {
            "nonsense" => "router router answered no JSON object",
            _ => "router router failed (timeout",
        };
        assert!(because.contains(expected), "{name}: {because}");
        assert!(because.contains("routing.fallback"), "{name}: {because}");
        assert!(
            sup.output().contains("router     t:"),
            "{name}: the fallback is logged\n{}",
            sup.output()
        );
        assert!(sup.stop().success(), "{}", sup.output());
    }
}

fn a_retry_after_a_timeout_resumes_the_session(which: Cli) {
    let bin = cli(which.bin_name());
    let server = ModelServer::start();
    server.script(
        which.api(),
        vec![Reply::Hang, Reply::Text("resumed and done".into())],
    );
    let p = project(&[("agent", which, bin)], &server, "");
    // One retry, right away.
    let cfg = std::fs::read_to_string(p.path("config.yaml"))
        .expect("config")
        .replace("max_retries: 0", "max_retries: 1");
    std::fs::write(p.path("config.yaml"), cfg).expect("config");
    let mut sup = p.start();
    p.drop_task(
        "again.yaml",
        "description: Long job\nworkdir: work\ntimeout_minutes: 0.1\n",
    );
    let (state, r) = wait_terminal(&p, "again", Duration::from_secs(120));
    assert_eq!(state, "completed", "{r}\n{}", sup.output());
    let a = r["attempts"].as_array().expect("attempts");
    assert_eq!(a.len(), 2, "{r}");
    assert_eq!(a[0]["outcome"], "timeout", "{r}");
    let first = a[0]["session_id"]
        .as_str()
        .expect("the killed attempt's session is known");
    assert_eq!(a[1]["session_id"].as_str(), Some(first), "{r}");
    let out = p.read("context/agent_outputs/again_output.md");
    assert!(out.contains("resumed and done"), "{out}");
    // The resumed request carried the first one's conversation.
    let sent = server
        .requests()
        .into_iter()
        .filter(|(m, _, b)| m == "POST" && b.contains("Long job"))
        .count();
    assert!(sent >= 2, "the task's prompt was sent {sent} time(s)");
    assert!(sup.stop().success(), "{}", sup.output());
}

/// A task with a check the model's first answer does not pass: the attempt fails as
/// `check_failed`, the retry continues the same session in the same worktree with the check's
/// output in its prompt, the model fixes the file, the check passes, and only the fixed file lands
/// (not what the check built).
fn a_failed_check_is_fixed_on_the_same_session(which: Cli) {
    let bin = cli(which.bin_name());
    let server = ModelServer::start();
    server.script(
        which.api(),
        vec![
            Reply::WriteFile {
                path: "answer.txt".into(),
                content: "wrong\n".into(),
                then: "I wrote answer.txt.".into(),
            },
            Reply::WriteFile {
                path: "answer.txt".into(),
                content: "right\n".into(),
                then: "I fixed answer.txt.".into(),
            },
        ],
    );
    let p = project(&[("agent", which, bin)], &server, "");
    let cfg = std::fs::read_to_string(p.path("config.yaml"))
        .expect("config")
        .replace("max_retries: 0", "max_retries: 1");
    std::fs::write(p.path("config.yaml"), cfg).expect("config");
    let work = p.path("work");
    std::fs::write(work.join("readme.txt"), "hello\n").expect("write");
    git_init_commit(&work);
    let mut sup = p.start();
    p.drop_task(
        "answer.yaml",
        "description: Write the answer into answer.txt\nworkdir: work\n\
         check: 'echo built > build.out; grep -q right answer.txt || { echo \"answer.txt says $(cat answer.txt)\"; exit 1; }'\n",
    );
    let (state, r) = wait_terminal(&p, "answer", Duration::from_secs(180));
    assert_eq!(state, "completed", "{r}\n{}", sup.output());
    let a = r["attempts"].as_array().expect("attempts");
    assert_eq!(a.len(), 2, "{r}");
    assert_eq!(a[0]["outcome"], "check_failed", "{r}");
    assert_eq!(a[0]["check"]["exit_code"], 1, "{r}");
    assert_eq!(a[1]["check"]["passed"], true, "{r}");
    let session = a[0]["session_id"].as_str().expect("a session");
    assert_eq!(a[1]["session_id"].as_str(), Some(session), "{r}");
    // The retry's request carried the check's complaint; the first one's did not.
    let told: Vec<bool> = server
        .requests()
        .into_iter()
        .filter(|(m, _, b)| m == "POST" && b.contains("Write the answer"))
        .map(|(_, _, b)| b.contains("answer.txt says wrong"))
        .collect();
    assert!(
        told.first() == Some(&false) && told.contains(&true),
        "{told:?}"
    );
    assert!(
        p.read("context/logs/answer/attempt-2.prompt.md")
            .contains("answer.txt says wrong")
    );
    assert_eq!(
        std::fs::read_to_string(work.join("answer.txt")).expect("landed"),
        "right\n"
    );
    assert_eq!(
        r["files_modified"],
        serde_json::json!(["answer.txt"]),
        "{r}"
    );
    assert!(!work.join("build.out").exists());
    assert!(sup.stop().success(), "{}", sup.output());
    assert_nothing_left(&p, &work);
}

/// In a git repository, the retry that resumes a timed-out session runs in the worktree the session
/// left (the same folder, so the CLI finds its session, and the same base, so the user's edits made
/// meanwhile are not part of it), and nothing is left once the task is over.
fn a_resumed_attempt_continues_in_its_worktree(which: Cli) {
    let bin = cli(which.bin_name());
    let server = ModelServer::start();
    server.script(
        which.api(),
        vec![Reply::Hang, Reply::Text("resumed and done".into())],
    );
    let p = project(&[("agent", which, bin)], &server, "");
    let cfg = std::fs::read_to_string(p.path("config.yaml"))
        .expect("config")
        .replace("max_retries: 0", "max_retries: 1");
    std::fs::write(p.path("config.yaml"), cfg).expect("config");
    let work = p.path("work");
    let git = |args: &[&str]| git(&work, args);
    std::fs::write(work.join("readme.txt"), "hello\n").expect("write");
    git_init_commit(&work);
    let mut sup = p.start();
    p.drop_task(
        "again.yaml",
        "description: Long job\nworkdir: work\ntimeout_minutes: 0.1\n",
    );
    let held = p.path(".orchestrate/worktrees/again");
    wait_for(
        "the first attempt's worktree",
        Duration::from_secs(60),
        || held.exists(),
    );
    // After the first attempt's base was taken: a new base would hold this file.
    std::fs::write(work.join("later.txt"), "later\n").expect("write");
    let (state, r) = wait_terminal(&p, "again", Duration::from_secs(120));
    assert_eq!(state, "completed", "{r}\n{}", sup.output());
    let a = r["attempts"].as_array().expect("attempts");
    assert_eq!(a.len(), 2, "{r}");
    assert_eq!(a[0]["outcome"], "timeout", "{r}");
    assert_eq!(a[1]["session_id"], a[0]["session_id"], "{r}");
    let base = r["workspace"]["base"].as_str().expect("a base").to_string();
    let files = git(&["ls-tree", "--name-only", &base]);
    assert!(files.contains("readme.txt"), "{files}");
    assert!(
        !files.contains("later.txt"),
        "the resumed attempt kept the first one's base: {files}"
    );
    // Both runs told the model the same working directory: the held worktree.
    let held = held.canonicalize().unwrap_or(held);
    let dirs: Vec<bool> = server
        .requests()
        .into_iter()
        .filter(|(m, _, b)| m == "POST" && b.contains("Long job"))
        .map(|(_, _, b)| b.contains(&held.display().to_string()))
        .collect();
    assert!(dirs.len() >= 2 && dirs.iter().all(|d| *d), "{dirs:?}");
    assert!(sup.stop().success(), "{}", sup.output());
    assert_nothing_left(&p, &work);
}

/// The worktree held for a resume that never comes (the timed-out attempt was the last) is removed
/// with its branch by the supervisor's periodic sweep, the supervisor still running.
fn a_held_worktree_goes_when_its_task_fails(which: Cli) {
    let bin = cli(which.bin_name());
    let server = ModelServer::start();
    server.script(which.api(), vec![Reply::Hang]);
    let p = project(&[("agent", which, bin)], &server, "");
    let work = p.path("work");
    let git = |args: &[&str]| git(&work, args);
    std::fs::write(work.join("readme.txt"), "hello\n").expect("write");
    git_init_commit(&work);
    let mut sup = p.start();
    p.drop_task(
        "once.yaml",
        "description: Long job\nworkdir: work\ntimeout_minutes: 0.05\n",
    );
    let (state, r) = wait_terminal(&p, "once", Duration::from_secs(120));
    assert_eq!(state, "failed", "{r}");
    assert_eq!(r["attempts"][0]["outcome"], "timeout", "{r}");
    wait_for(
        "the held worktree and its branch are removed",
        Duration::from_secs(30),
        || {
            git(&["worktree", "list"]).lines().count() == 1
                && git(&["branch", "--list", "orchestrate/*"])
                    .trim()
                    .is_empty()
        },
    );
    assert!(!p.path(".orchestrate/worktrees/once").exists());
    assert!(sup.stop().success(), "{}", sup.output());
}

#[test]
fn start_once_waits_for_the_router_before_exiting() {
    let server = ModelServer::start();
    server.script(
        Api::Chat,
        vec![
            Reply::Text(r#"{"category": "docs", "agent": "writer", "confidence": 0.8}"#.into()),
            Reply::Text("written".into()),
        ],
    );
    let p = openai_project(
        &server,
        &["router", "writer", "planner"],
        "  fallback: [planner]\n  router: {agent: router, timeout_seconds: 10}\n",
    );
    p.drop_task("once.yaml", "description: Write the docs\nworkdir: work\n");
    p.run(&["start", "--once"]).assert_code(0);
    assert_eq!(p.tasks_in("completed"), vec!["once".to_string()]);
    assert_eq!(p.result("completed", "once")["agent"], "writer");
}

/// Claude Code without a key or a login says "Not logged in": the task goes to the next agent
/// without spending a retry, claude is marked "needs login" with what to do, and its own login
/// check (`claude auth status`) clears the mark once it has a way to log in.
fn claude_without_a_login_is_marked_until_its_login_check_passes() {
    let (claude, codex) = (cli("claude"), cli("codex"));
    let server = ModelServer::start();
    server.script(Api::Anthropic, vec![Reply::Text("done by claude".into())]);
    server.script(Api::Responses, vec![Reply::Text("done by codex".into())]);
    let p = project(
        &[
            ("claude", Cli::Claude, claude.clone()),
            ("codex", Cli::Codex, codex),
        ],
        &server,
        "",
    );
    // No key for claude (a variable nobody sets, so the machine's own key cannot leak in), and a
    // quick first recheck.
    let key_var = "ORCH_TEST_CLAUDE_KEY_NEVER_SET";
    let cfg = p
        .read("config.yaml")
        .replace("      ANTHROPIC_API_KEY: test-key\n", "")
        .replacen(
            "    base_url: ",
            &format!("    api_key_env: {key_var}\n    base_url: "),
            1,
        )
        .replace(
            "  heartbeat_seconds: 1\n",
            "  heartbeat_seconds: 1\n  login_recheck_seconds: 1\n",
        );
    std::fs::write(p.path("config.yaml"), &cfg).expect("write config");
    let home = cfg
        .lines()
        .find(|l| l.trim_start().starts_with("HOME:") && l.contains("home-claude"))
        .map(|l| PathBuf::from(l.trim_start().trim_start_matches("HOME:").trim()))
        .expect("claude's HOME");
    let mut sup = p.start();
    p.drop_task("first.yaml", "description: Say hello\nworkdir: work\n");
    let mark_of = || {
        let agents = p.run(&["agents", "--json"]).assert_code(0).json();
        agents
            .as_array()
            .and_then(|v| v.iter().find(|a| a["name"] == "claude"))
            .expect("claude listed")["needs_login"]
            .clone()
    };
    wait_for("claude to be marked", Duration::from_secs(120), || {
        !mark_of().is_null()
    });
    let mark = mark_of();
    assert_eq!(
        mark["reason"], "Not logged in · Please run /login",
        "{mark}"
    );
    assert_eq!(
        mark["hint"],
        format!(
            "run `{}` once to log in, or set {key_var}",
            claude.display()
        ),
        "{mark}"
    );
    let (state, r) = wait_terminal(&p, "first", Duration::from_secs(120));
    assert_eq!(state, "completed", "{r}\n{}", sup.output());
    let a = r["attempts"].as_array().expect("attempts");
    assert_eq!(
        (a[0]["agent"].as_str(), a[0]["outcome"].as_str()),
        (Some("claude"), Some("auth")),
        "{r}"
    );
    assert_eq!(a[0]["error"], "Not logged in · Please run /login", "{r}");
    assert_eq!(r["agent"], "codex", "{r}");
    assert_eq!(server.conversations(Api::Anthropic), 0);
    // A way to log in appears (a key helper in claude's settings): `claude auth status` passes at
    // its next look and the mark goes.
    std::fs::create_dir_all(home.join(".claude")).expect("mkdir .claude");
    std::fs::write(
        home.join(".claude/settings.json"),
        r#"{"apiKeyHelper": "echo test-key"}"#,
    )
    .expect("write settings");
    wait_for(
        "claude's login check to pass",
        Duration::from_secs(120),
        || sup.output().contains("auth status` says it is logged in"),
    );
    assert!(mark_of().is_null(), "{}", mark_of());
    p.drop_task(
        "second.yaml",
        "description: Say hello again\nworkdir: work\n",
    );
    let (state, r) = wait_terminal(&p, "second", Duration::from_secs(120));
    assert_eq!(state, "completed", "{r}\n{}", sup.output());
    assert_eq!(r["agent"], "claude", "{r}");
    let out = p.read("context/agent_outputs/second_output.md");
    assert!(out.contains("done by claude"), "{out}");
    assert!(sup.stop().success(), "{}", sup.output());
}

// ---- the tests of each CLI, in modules named after what they need ----------------------------------

/// A fan-out project: claude and codex against `server`, the workdir `work` a git repository, and
/// an `openai` agent `local` (the judge) on the server's chat endpoint.
fn fan_out_project(server: &ModelServer) -> (Project, PathBuf) {
    let p = project(
        &[
            ("claude", Cli::Claude, cli("claude")),
            ("codex", Cli::Codex, cli("codex")),
        ],
        server,
        "",
    );
    let local = format!(
        "  local:\n    kind: openai\n    base_url: {}/v1\n    model: judge-model\n    max_instances: 1\nrouting:\n",
        server.url()
    );
    let cfg = std::fs::read_to_string(p.path("config.yaml"))
        .expect("config")
        .replacen("routing:\n", &local, 1);
    std::fs::write(p.path("config.yaml"), cfg).expect("config");
    let work = p.path("work");
    std::fs::write(work.join("readme.txt"), "hello\n").expect("write");
    git_init_commit(&work);
    (p, work)
}

fn writes(path: &str, who: &str) -> Reply {
    Reply::WriteFile {
        path: path.into(),
        content: format!("from {who}\n"),
        then: format!("I wrote {path}."),
    }
}

fn fan_out_candidate<'a>(r: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    r["fan_out"]["candidates"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no candidate {name}: {r}"))
}

/// claude writes a.txt, codex b.txt; the check wants a.txt (and takes its time when it passes, so
/// codex's failed check is in before claude's passes): claude wins, codex's candidate failed on its
/// check, and only a.txt lands.
fn fan_out_first_pass_lands_the_candidate_whose_check_passes() {
    let server = ModelServer::start();
    server.script(Api::Anthropic, vec![writes("a.txt", "claude")]);
    server.script(Api::Responses, vec![writes("b.txt", "codex")]);
    let (p, work) = fan_out_project(&server);
    let mut sup = p.start();
    p.drop_task(
        "race.yaml",
        "description: Create the file the check wants\nworkdir: work\nfan_out: [claude, codex]\n\
         check: 'if test -f a.txt; then sleep 8; else echo no a.txt; exit 1; fi'\n",
    );
    let (state, r) = wait_terminal(&p, "race", Duration::from_secs(180));
    assert_eq!(state, "completed", "{r}\n{}", sup.output());
    assert_eq!(r["fan_out"]["winner"], "claude", "{r}");
    assert_eq!(r["agent"], "claude");
    let codex = fan_out_candidate(&r, "codex");
    assert_eq!(codex["status"], "failed", "{r}");
    assert_eq!(codex["check"]["passed"], false, "{r}");
    let own = p.result("failed", "race.codex");
    assert_eq!(own["attempts"][0]["outcome"], "check_failed", "{own}");
    assert_eq!(
        std::fs::read_to_string(work.join("a.txt")).expect("a.txt landed"),
        "from claude\n"
    );
    assert!(!work.join("b.txt").exists());
    assert!(
        p.read("context/diffs/race.codex.diff")
            .contains("+from codex")
    );
    assert!(p.read("context/diffs/race.diff").contains("+from claude"));
    assert_eq!(git(&work, &["branch", "--list", "orchestrate/*"]), "");
    assert!(sup.stop().success(), "{}", sup.output());
    assert_nothing_left(&p, &work);
}

/// Both candidates complete; the `openai` judge, shown both diffs, answers codex: codex's change
/// lands and the result says why.
fn fan_out_judge_picks_codex() {
    let server = ModelServer::start();
    server.script(Api::Anthropic, vec![writes("a.txt", "claude")]);
    server.script(Api::Responses, vec![writes("b.txt", "codex")]);
    server.script(
        Api::Chat,
        vec![Reply::Text(
            r#"{"winner": "codex", "reason": "b.txt is the file the task names"}"#.into(),
        )],
    );
    let (p, work) = fan_out_project(&server);
    let mut sup = p.start();
    p.drop_task(
        "judged.yaml",
        "description: Create b.txt\nworkdir: work\nfan_out: [claude, codex]\npick: judge\njudge: local\n",
    );
    let (state, r) = wait_terminal(&p, "judged", Duration::from_secs(180));
    assert_eq!(state, "completed", "{r}\n{}", sup.output());
    assert_eq!(r["fan_out"]["winner"], "codex", "{r}");
    assert_eq!(
        r["fan_out"]["picked_because"],
        "judge local: b.txt is the file the task names"
    );
    assert_eq!(fan_out_candidate(&r, "claude")["status"], "completed");
    assert_eq!(
        std::fs::read_to_string(work.join("b.txt")).expect("b.txt landed"),
        "from codex\n"
    );
    assert!(!work.join("a.txt").exists());
    // The judge's request carried both candidates' changes.
    let asked: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|(m, path, _)| m == "POST" && path.contains("chat/completions"))
        .map(|(_, _, b)| b)
        .collect();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(
        asked[0].contains("+from claude") && asked[0].contains("+from codex"),
        "{}",
        asked[0]
    );
    assert_eq!(git(&work, &["branch", "--list", "orchestrate/*"]), "");
    assert!(sup.stop().success(), "{}", sup.output());
    assert_nothing_left(&p, &work);
}

/// codex answers 429: it cools down, its candidate waits and is stopped when claude's wins. A
/// second fan-out with `fan_out_skip_cooling` drops codex's candidate at once instead, without
/// asking codex again.
fn fan_out_candidate_on_a_rate_limited_agent() {
    let server = ModelServer::start();
    server.script(
        Api::Anthropic,
        vec![writes("a.txt", "claude"), writes("c.txt", "claude")],
    );
    server.script(
        Api::Responses,
        vec![Reply::RateLimit {
            retry_after_secs: Some(600),
        }],
    );
    let (p, work) = fan_out_project(&server);
    let mut sup = p.start();
    p.drop_task(
        "busy.yaml",
        "description: Create a.txt\nworkdir: work\nfan_out: [claude, codex]\n",
    );
    let (state, r) = wait_terminal(&p, "busy", Duration::from_secs(180));
    assert_eq!(state, "completed", "{r}\n{}", sup.output());
    assert_eq!(r["fan_out"]["winner"], "claude", "{r}");
    let codex = p.result("failed", "busy.codex");
    assert_eq!(codex["attempts"][0]["outcome"], "rate_limited", "{codex}");
    assert!(
        codex["error"]
            .as_str()
            .is_some_and(|e| e.contains("another candidate of busy completed first")),
        "{codex}"
    );
    let agents = p.run(&["agents", "--json"]).assert_code(0).json();
    assert!(
        agents
            .as_array()
            .and_then(|v| v.iter().find(|a| a["name"] == "codex"))
            .is_some_and(|a| a["cooldown_until"].is_string()),
        "{agents}"
    );
    let asked = server.conversations(Api::Responses);
    p.drop_task(
        "skip.yaml",
        "description: Create c.txt\nworkdir: work\nfan_out: [claude, codex]\npick: all\nfan_out_skip_cooling: true\n",
    );
    let (state, r) = wait_terminal(&p, "skip", Duration::from_secs(180));
    assert_eq!(state, "completed", "{r}\n{}", sup.output());
    let codex = fan_out_candidate(&r, "codex");
    assert_eq!(codex["status"], "not run", "{r}");
    assert!(
        codex["error"]
            .as_str()
            .is_some_and(|e| e.contains("candidate dropped (fan_out_skip_cooling)")),
        "{r}"
    );
    assert_eq!(fan_out_candidate(&r, "claude")["status"], "completed");
    assert_eq!(
        server.conversations(Api::Responses),
        asked,
        "codex was not asked again"
    );
    // The first fan-out landed claude's a.txt; `pick: all` keeps claude's c.txt on its branch.
    assert_eq!(
        std::fs::read_to_string(work.join("a.txt")).expect("a.txt landed"),
        "from claude\n"
    );
    assert!(!work.join("c.txt").exists());
    assert_eq!(
        git(&work, &["branch", "--list", "orchestrate/*"]).trim(),
        "orchestrate/skip/claude"
    );
    assert!(sup.stop().success(), "{}", sup.output());
}

/// One agent as `orchestrate agents --json` lists it.
fn agent_info(p: &Project, name: &str) -> serde_json::Value {
    let agents = p.run(&["agents", "--json"]).assert_code(0).json();
    agents
        .as_array()
        .and_then(|v| v.iter().find(|a| a["name"] == name))
        .expect("agent listed")
        .clone()
}

/// What `status` says `id` waits for, if it waits.
fn wait_note(p: &Project, id: &str) -> Option<String> {
    let st = p.run(&["status", "--json"]).assert_code(0).json();
    st["waiting"]
        .as_array()?
        .iter()
        .find(|w| w["id"] == id)
        .and_then(|w| w["reason"].as_str().map(String::from))
}

/// An `openai` agent priced at a dollar a token costs $18 an attempt (the model server reports 11
/// input and 7 output tokens): its $20 daily budget lets two attempts start, then pauses it. The
/// third task waits, saying why; a restart recounts the $36 from the records (neither forgets them
/// nor counts them twice), and the task still waits.
#[test]
fn a_spent_budget_pauses_the_agent_and_a_restart_counts_the_spend_once() {
    let server = ModelServer::start();
    let p = openai_project(&server, &["local"], "  fallback: [local]\n");
    let (zone, label) = noon_zone();
    let cfg = p
        .read("config.yaml")
        .replace(
            "    model: local-model\n",
            "    model: local-model\n    prices: {input_per_mtok: 1000000, output_per_mtok: 1000000}\n    budget: {daily_usd: 20, monthly_tokens: 1000}\n",
        )
        .replace("orchestrator:\n", &format!("orchestrator:\n  timezone: \"{zone}\"\n"));
    // A `budget` notice goes to a command hook, once.
    let hook = p.path("budget-events.jsonl");
    let cfg = format!(
        "{cfg}notify:\n  - name: hook\n    on: [budget]\n    command: 'cat >> {}; echo >> {}'\n",
        hook.display(),
        hook.display()
    );
    std::fs::write(p.path("config.yaml"), cfg).expect("config");
    let mut sup = p.start();
    for (i, id) in ["one", "two"].iter().enumerate() {
        p.drop_task(&format!("{id}.yaml"), "description: Plan\nworkdir: work\n");
        let (state, r) = wait_terminal(&p, id, Duration::from_secs(60));
        assert_eq!(state, "completed", "{r}\n{}", sup.output());
        assert_eq!(r["attempts"][0]["cost_usd"].as_f64(), Some(18.0), "{r}");
        // The mirror (which `agents` reads) may lag the tree by a moment.
        let spent = 18.0 * (i + 1) as f64;
        wait_for("agents to count the spend", Duration::from_secs(30), || {
            agent_info(&p, "local")["budget"]["today"]["usd"].as_f64() == Some(spent)
        });
    }
    let local = agent_info(&p, "local");
    let reason = format!("budget: $36.00 of $20.00 today, resets at 00:00 {label}");
    assert_eq!(
        local["budget"]["paused"].as_str(),
        Some(reason.as_str()),
        "{local}"
    );
    assert_eq!(local["budget"]["this_month"]["tokens"], 36, "{local}");
    assert_eq!(local["budget"]["limits"]["daily_usd"], 20.0, "{local}");
    let table = p.run(&["agents"]).assert_code(0).stdout();
    assert!(table.contains(&reason), "{table}");
    assert!(
        table.contains("budget: spent today $36.00 of $20.00, this month 36 of 1000 tokens"),
        "{table}"
    );
    p.drop_task("three.yaml", "description: Plan\nworkdir: work\n");
    let note = format!("no agent available: agent local: {reason}");
    wait_for(
        "three to wait for the budget",
        Duration::from_secs(30),
        || wait_note(&p, "three").as_deref() == Some(note.as_str()),
    );
    let status = p.run(&["status"]).assert_code(0).stdout();
    assert!(
        status.contains(&format!("local: PAUSED: {reason}")),
        "{status}"
    );
    // Delivered beside the supervisor, a moment after the pause.
    wait_for("the budget notice", Duration::from_secs(30), || {
        std::fs::read_to_string(&hook).is_ok_and(|t| t.contains("\"budget\""))
    });
    assert!(sup.stop().success(), "{}", sup.output());
    assert!(
        sup.output().contains("budget     agent local paused"),
        "{}",
        sup.output()
    );
    let events: Vec<serde_json::Value> = std::fs::read_to_string(&hook)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("an event"))
        .collect();
    assert_eq!(events.len(), 1, "{events:?}\n{}", sup.output());
    assert_eq!(events[0]["kind"], "budget", "{events:?}");
    assert_eq!(events[0]["agent"], "local", "{events:?}");
    assert!(
        events[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&reason)),
        "{events:?}"
    );

    // Restarted: the records say $36 today, not 0 and not 72.
    let mut sup = p.start();
    wait_for(
        "the restarted supervisor to look at three",
        Duration::from_secs(30),
        || sup.output().contains("budget     agent local: paused"),
    );
    assert_eq!(wait_note(&p, "three").as_deref(), Some(note.as_str()));
    assert_eq!(
        agent_info(&p, "local")["budget"]["today"]["usd"].as_f64(),
        Some(36.0)
    );
    assert!(p.tasks_in("pending").contains(&"three".to_string()));
    assert_eq!(server.conversations(Api::Chat), 2);
    assert!(sup.stop().success(), "{}", sup.output());
    // The restart found the limit reached; it did not announce it again.
    let sent = std::fs::read_to_string(&hook).unwrap_or_default();
    assert_eq!(sent.matches("\"budget\"").count(), 1, "{sent}");
}

/// For an agent that does not cap itself, `max_cost_usd` is checked after the attempt: an `openai`
/// agent's $18 answer fails its check, and with retries left the task still ends `budget_exhausted`
/// after that one attempt.
#[test]
fn max_cost_usd_is_checked_after_the_attempt_of_an_agent_without_a_cap() {
    let server = ModelServer::start();
    let p = openai_project(&server, &["local"], "  fallback: [local]\n");
    let cfg = p
        .read("config.yaml")
        .replace(
            "    model: local-model\n",
            "    model: local-model\n    prices: {input_per_mtok: 1000000, output_per_mtok: 1000000}\n",
        )
        .replace("max_retries: 0", "max_retries: 3");
    std::fs::write(p.path("config.yaml"), cfg).expect("config");
    let mut sup = p.start();
    p.drop_task(
        "capped.yaml",
        "description: Plan\nworkdir: work\nmax_cost_usd: 10\ncheck: 'exit 1'\n",
    );
    let (state, r) = wait_terminal(&p, "capped", Duration::from_secs(60));
    assert_eq!(state, "failed", "{r}\n{}", sup.output());
    let a = r["attempts"].as_array().expect("attempts");
    assert_eq!(a.len(), 1, "{r}");
    assert_eq!(a[0]["outcome"], "check_failed", "{r}");
    assert_eq!(
        r["error"].as_str().and_then(|e| e.split("; last:").next()),
        Some("budget_exhausted: spent $18.00 of max_cost_usd $10.00 in 1 attempt(s)"),
        "{r}"
    );
    assert_eq!(server.conversations(Api::Chat), 1);
    assert!(sup.stop().success(), "{}", sup.output());
}

/// A task waiting for its retry holds an attempt that cost $18 in its history: a supervisor started
/// on a lost mirror (the state database deleted) still counts it, from the history it reads in
/// `pending/`, so the next $18 reaches the $30 budget.
#[test]
fn a_restart_on_a_lost_mirror_counts_the_spend_of_a_task_waiting_to_retry() {
    let server = ModelServer::start();
    let p = openai_project(&server, &["local"], "  fallback: [local]\n");
    let (zone, label) = noon_zone();
    let cfg = p
        .read("config.yaml")
        .replace(
            "    model: local-model\n",
            "    model: local-model\n    prices: {input_per_mtok: 1000000, output_per_mtok: 1000000}\n    budget: {daily_usd: 30}\n",
        )
        .replace("orchestrator:\n", &format!("orchestrator:\n  timezone: \"{zone}\"\n"))
        .replace("max_retries: 0", "max_retries: 3\n  retry_delay_seconds: 3600");
    std::fs::write(p.path("config.yaml"), cfg).expect("config");
    let mut sup = p.start();
    p.drop_task(
        "later.yaml",
        "description: Plan\nworkdir: work\ncheck: 'exit 1'\n",
    );
    wait_for(
        "later's first attempt to fail",
        Duration::from_secs(60),
        || p.path("tasks/pending/.later.history.yaml").exists(),
    );
    assert!(sup.stop().success(), "{}", sup.output());
    for f in ["state.db", "state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(p.path(&format!(".orchestrate/{f}")));
    }

    let mut sup = p.start();
    p.drop_task("now.yaml", "description: Plan\nworkdir: work\n");
    let (state, r) = wait_terminal(&p, "now", Duration::from_secs(60));
    assert_eq!(state, "completed", "{r}\n{}", sup.output());
    p.drop_task("next.yaml", "description: Plan\nworkdir: work\n");
    let note = format!(
        "no agent available: agent local: budget: $36.00 of $30.00 today, resets at 00:00 {label}"
    );
    wait_for(
        "next to wait for the budget",
        Duration::from_secs(30),
        || wait_note(&p, "next").as_deref() == Some(note.as_str()),
    );
    assert_eq!(server.conversations(Api::Chat), 2);
    assert!(sup.stop().success(), "{}", sup.output());
}

mod claude {
    use super::*;

    #[test]
    fn answers_text_with_tokens_and_cost() {
        text_and_tokens(Cli::Claude);
    }

    #[test]
    fn writes_a_file_that_reaches_the_diff() {
        writes_a_file(Cli::Claude);
    }

    #[test]
    fn hung_model_is_killed_at_the_timeout() {
        hang_is_killed_at_the_timeout(Cli::Claude);
    }

    #[test]
    fn a_retry_after_a_timeout_resumes_the_session() {
        super::a_retry_after_a_timeout_resumes_the_session(Cli::Claude);
    }

    #[test]
    fn a_resumed_attempt_continues_in_its_worktree() {
        super::a_resumed_attempt_continues_in_its_worktree(Cli::Claude);
    }

    #[test]
    fn a_held_worktree_goes_when_its_task_fails() {
        super::a_held_worktree_goes_when_its_task_fails(Cli::Claude);
    }

    #[test]
    fn a_failed_check_is_fixed_on_the_same_session() {
        super::a_failed_check_is_fixed_on_the_same_session(Cli::Claude);
    }

    /// A project with claude first and the fake agent after it in the fallback chain, `budget`
    /// (a YAML mapping) on claude.
    fn claude_then_fake(server: &ModelServer, budget: &str) -> Project {
        let p = project(&[("claude", Cli::Claude, cli("claude"))], server, "");
        let fake = format!(
            "  fake:\n    kind: command\n    command: {BIN}\n    args: [fake-agent]\n    max_instances: 2\nrouting:\n  fallback: [claude, fake]\n"
        );
        let cfg = p
            .read("config.yaml")
            .replace("routing:\n  fallback: [claude]\n", &fake)
            .replace("  claude:\n", &format!("  claude:\n    budget: {budget}\n"));
        std::fs::write(p.path("config.yaml"), cfg).expect("config");
        p
    }

    /// Claude Code's own cost of one scripted answer reaches a tiny daily budget: claude is paused
    /// (the attempt that reached it completes), the next task goes to the fake agent without
    /// asking claude, and `agents` shows the spend against the budget.
    #[test]
    fn a_spent_budget_pauses_claude_and_the_next_task_goes_down_the_chain() {
        let server = ModelServer::start();
        server.script(Api::Anthropic, vec![Reply::Text("first".into())]);
        let p = claude_then_fake(&server, "{daily_usd: 0.000001}");
        let (zone, label) = noon_zone();
        let cfg = p.read("config.yaml").replace(
            "orchestrator:\n",
            &format!("orchestrator:\n  timezone: \"{zone}\"\n"),
        );
        std::fs::write(p.path("config.yaml"), cfg).expect("config");
        let mut sup = p.start();
        p.drop_task("first.yaml", "description: Say hello\nworkdir: work\n");
        let (state, r) = wait_terminal(&p, "first", Duration::from_secs(120));
        assert_eq!(state, "completed", "{r}\n{}", sup.output());
        assert_eq!(r["agent"], "claude", "{r}");
        let cost = r["attempts"][0]["cost_usd"]
            .as_f64()
            .expect("claude reports a cost");
        assert!(cost > 0.000001, "{r}");
        wait_for(
            "agents to count claude's spend",
            Duration::from_secs(30),
            || agent_info(&p, "claude")["budget"]["today"]["usd"].as_f64() == Some(cost),
        );
        let claude = agent_info(&p, "claude");
        let paused = claude["budget"]["paused"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let spent = format!("${cost:.6}");
        let spent = spent.trim_end_matches('0');
        assert_eq!(
            paused,
            format!("budget: {spent} of $0.000001 today, resets at 00:00 {label}"),
            "{claude}"
        );
        let table = p.run(&["agents"]).assert_code(0).stdout();
        assert!(table.contains(&paused), "{table}");
        assert!(
            table.contains(&format!("budget: spent today {spent} of $0.000001")),
            "{table}"
        );

        let asked = server.conversations(Api::Anthropic);
        p.drop_task(
            "second.yaml",
            "description: Say hello again\nworkdir: work\n",
        );
        let (state, r) = wait_terminal(&p, "second", Duration::from_secs(60));
        assert_eq!(state, "completed", "{r}\n{}", sup.output());
        assert_eq!(r["agent"], "fake", "{r}");
        assert_eq!(r["attempts"].as_array().map(Vec::len), Some(1), "{r}");
        assert!(
            r["chosen_because"]
                .as_str()
                .is_some_and(|b| b.contains(&format!("skipped: agent claude: {paused}"))),
            "{r}"
        );
        assert_eq!(server.conversations(Api::Anthropic), asked);
        assert!(sup.stop().success(), "{}", sup.output());
    }

    /// A task whose first attempt costs more than its `max_cost_usd` (Claude Code is given the cap
    /// as `--max-budget-usd`) and does not complete ends failed, `budget_exhausted`, without a
    /// second attempt although `max_retries` allows one; what the agent wrote stays on its branch.
    #[test]
    fn max_cost_usd_stops_the_retries_and_keeps_the_work_on_its_branch() {
        let server = ModelServer::start();
        server.script(
            Api::Anthropic,
            vec![Reply::WriteFile {
                path: "answer.txt".into(),
                content: "wrong\n".into(),
                then: "I wrote answer.txt.".into(),
            }],
        );
        let p = project(&[("claude", Cli::Claude, cli("claude"))], &server, "");
        let cfg = p
            .read("config.yaml")
            .replace("max_retries: 0", "max_retries: 2");
        std::fs::write(p.path("config.yaml"), cfg).expect("config");
        let work = p.path("work");
        std::fs::write(work.join("readme.txt"), "hello\n").expect("write");
        git_init_commit(&work);
        let mut sup = p.start();
        p.drop_task(
            "costly.yaml",
            "description: Write the answer into answer.txt\nworkdir: work\nmax_cost_usd: 0.0003\n",
        );
        let (state, r) = wait_terminal(&p, "costly", Duration::from_secs(180));
        assert_eq!(state, "failed", "{r}\n{}", sup.output());
        let a = r["attempts"].as_array().expect("attempts");
        assert_eq!(a.len(), 1, "{r}");
        assert!(
            a[0]["cost_usd"].as_f64().is_some_and(|c| c > 0.000001),
            "{r}"
        );
        let error = r["error"].as_str().unwrap_or_default();
        assert!(error.starts_with("budget_exhausted: spent $"), "{r}");
        assert!(
            error.contains("of max_cost_usd $0.0003 in 1 attempt(s)"),
            "{r}"
        );
        // Claude Code was told the cap, and stopped itself at it after its second turn (the file
        // written, the answer costing more than the cap).
        assert_eq!(a[0]["outcome"], "budget_exhausted", "{r}");
        let log = p.read("context/logs/costly/attempt-1.log");
        assert!(log.contains("Reached maximum budget ($0.0003)"), "{log}");
        assert_eq!(server.conversations(Api::Anthropic), 1);
        // The work is on the task's branch, not in the user's tree.
        assert!(!work.join("answer.txt").exists());
        assert_eq!(r["workspace"]["branch"], "orchestrate/costly", "{r}");
        assert_eq!(
            git(&work, &["show", "orchestrate/costly:answer.txt"]),
            "wrong\n"
        );
        assert!(sup.stop().success(), "{}", sup.output());
    }

    /// Claude rate-limited or logged out, codex next in the chain.
    mod codex {
        #[test]
        fn rate_limit_sends_the_task_down_the_fallback_chain_and_cools_the_agent() {
            super::super::rate_limit_sends_the_task_down_the_fallback_chain_and_cools_the_agent();
        }

        #[test]
        fn without_a_login_claude_is_marked_until_its_login_check_passes() {
            super::super::claude_without_a_login_is_marked_until_its_login_check_passes();
        }

        #[test]
        fn fan_out_first_pass_lands_the_candidate_whose_check_passes() {
            super::super::fan_out_first_pass_lands_the_candidate_whose_check_passes();
        }

        #[test]
        fn fan_out_judge_picks_codex() {
            super::super::fan_out_judge_picks_codex();
        }

        #[test]
        fn fan_out_candidate_on_a_rate_limited_agent() {
            super::super::fan_out_candidate_on_a_rate_limited_agent();
        }
    }
}

mod codex {
    use super::*;

    #[test]
    fn answers_text_with_tokens() {
        text_and_tokens(Cli::Codex);
    }

    #[test]
    fn writes_a_file_that_reaches_the_diff() {
        writes_a_file(Cli::Codex);
    }

    #[test]
    fn hung_model_is_killed_at_the_timeout() {
        hang_is_killed_at_the_timeout(Cli::Codex);
    }

    #[test]
    fn a_retry_after_a_timeout_resumes_the_session() {
        super::a_retry_after_a_timeout_resumes_the_session(Cli::Codex);
    }

    #[test]
    fn a_resumed_attempt_continues_in_its_worktree() {
        super::a_resumed_attempt_continues_in_its_worktree(Cli::Codex);
    }

    #[test]
    fn a_failed_check_is_fixed_on_the_same_session() {
        super::a_failed_check_is_fixed_on_the_same_session(Cli::Codex);
    }
}

mod gemini {
    use super::*;

    #[test]
    fn answers_text_with_tokens() {
        text_and_tokens(Cli::Gemini);
    }

    #[test]
    fn writes_a_file_that_reaches_the_diff() {
        writes_a_file(Cli::Gemini);
    }

    #[test]
    fn hung_model_is_killed_at_the_timeout() {
        hang_is_killed_at_the_timeout(Cli::Gemini);
    }

    #[test]
    fn a_retry_after_a_timeout_resumes_the_session() {
        super::a_retry_after_a_timeout_resumes_the_session(Cli::Gemini);
    }

    #[test]
    fn a_resumed_attempt_continues_in_its_worktree() {
        super::a_resumed_attempt_continues_in_its_worktree(Cli::Gemini);
    }

    #[test]
    fn a_failed_check_is_fixed_on_the_same_session() {
        super::a_failed_check_is_fixed_on_the_same_session(Cli::Gemini);
    }
}
