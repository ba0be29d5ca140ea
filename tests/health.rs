//! Failures that retrying cannot fix: an agent whose credentials are refused is marked "needs
//! login" (its tasks go down their chain without spending a retry, or wait saying which agent
//! needs a login; the mark survives a restart and clears when the agent's configuration changes,
//! on `agents --reset`, or after `login_recheck_seconds`), and an agent that makes no progress is
//! stopped as `stalled` and retried.
//!
//! Refused credentials come from the real `openai` kind against the scripted model server (HTTP
//! 401), stalls from the fake agent; both are real processes.

mod common;

use std::time::Duration;

use common::model_server::{Api, ModelServer, Reply};
use common::*;

/// The key the `local` agent is given, so the server's refusal of it is an `auth` outcome.
const KEY_VAR: &str = "ORCH_HEALTH_TEST_KEY";

/// A project whose `local` agent (kind `openai`, against `server`) comes first in the fallback
/// chain, before the fake agent when `fallback_fake`.
fn login_project(server: &ModelServer, fallback_fake: bool, orchestrator_extra: &str) -> Project {
    let chain = if fallback_fake {
        "[local, fake]"
    } else {
        "[local]"
    };
    let config = format!(
        r#"orchestrator:
  max_concurrent: 4
  settle_ms: 100
  rescan_seconds: 2
  kill_grace_seconds: 1
  heartbeat_seconds: 1
{orchestrator_extra}agents:
  local:
    kind: openai
    base_url: {url}/v1
    model: local-model
    api_key_env: {KEY_VAR}
  fake:
    kind: command
    command: {BIN}
    args: [fake-agent]
    max_instances: 4
routing:
  fallback: {chain}
task_queue:
  timeout_minutes: 1
  max_retries: 0
  retry_delay_seconds: 0.2
security:
  env_allow: [PATH, HOME]
"#,
        url = server.url()
    );
    let p = Project::with_config(&config);
    std::fs::create_dir_all(p.path("work")).expect("mkdir work");
    p
}

fn start(p: &Project) -> Supervisor {
    p.start_with_env(&[(KEY_VAR, "test-key")])
}

fn run_once(p: &Project) -> Run {
    let mut c = p.cmd(&["start", "--once", "-v"]);
    c.env(KEY_VAR, "test-key")
        .stdin(std::process::Stdio::null());
    let out = c.output().expect("run start --once");
    Run {
        args: vec!["start".into(), "--once".into()],
        out,
    }
}

fn wait_completed(p: &Project, id: &str) -> serde_json::Value {
    wait_for(&format!("{id} to finish"), Duration::from_secs(60), || {
        p.tasks_in("completed").contains(&id.to_string())
            || p.tasks_in("failed").contains(&id.to_string())
    });
    assert!(
        p.tasks_in("completed").contains(&id.to_string()),
        "{id} failed: {}",
        p.result("failed", id)
    );
    p.result("completed", id)
}

fn outcomes(r: &serde_json::Value) -> Vec<(String, String)> {
    r["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .map(|a| {
            (
                a["agent"].as_str().unwrap_or("?").to_string(),
                a["outcome"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

fn agent_json(p: &Project, name: &str) -> serde_json::Value {
    let agents = p.run(&["agents", "--json"]).assert_code(0).json();
    agents
        .as_array()
        .and_then(|v| v.iter().find(|a| a["name"] == name))
        .unwrap_or_else(|| panic!("{name} listed: {agents}"))
        .clone()
}

fn pair(agent: &str, outcome: &str) -> (String, String) {
    (agent.to_string(), outcome.to_string())
}

#[test]
fn refused_credentials_send_the_task_down_the_chain_and_mark_the_agent_until_its_config_changes() {
    let server = ModelServer::start();
    server.script(Api::Chat, vec![Reply::AuthError]);
    let p = login_project(&server, true, "");
    let mut sup = start(&p);
    // max_retries 0: a spent retry would fail the task.
    p.drop_task(
        "t1.yaml",
        "description: \"@fake print=done_by_fake\"\nworkdir: work\n",
    );
    let r = wait_completed(&p, "t1");
    assert_eq!(
        outcomes(&r),
        [pair("local", "auth"), pair("fake", "completed")],
        "{r}\n{}",
        sup.output()
    );
    assert_eq!(r["agent"], "fake");
    let error = r["attempts"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("HTTP 401"), "{r}");
    assert!(!error.contains("test-key"), "the key is redacted: {error}");
    assert!(
        r["chosen_because"]
            .as_str()
            .is_some_and(|b| b.contains("agent local: needs login: ")),
        "{r}"
    );
    // `agents` and `status` say so, with what to do.
    let local = agent_json(&p, "local");
    let mark = &local["needs_login"];
    assert!(
        mark["reason"]
            .as_str()
            .is_some_and(|r| r.contains("HTTP 401")),
        "{local}"
    );
    assert_eq!(
        mark["hint"],
        format!("check {KEY_VAR} (the key it was given was refused)"),
        "{local}"
    );
    let table = p.run(&["agents"]).assert_code(0).stdout();
    let row = table
        .lines()
        .find(|l| l.starts_with("local "))
        .expect("local's row");
    assert!(row.contains("needs login: POST "), "{table}");
    assert!(
        row.ends_with(&format!(
            "(check {KEY_VAR} (the key it was given was refused))"
        )),
        "{table}"
    );
    let status = p.run(&["status"]).assert_code(0).stdout();
    assert!(status.contains("needs login: local since "), "{status}");
    assert!(
        sup.output().contains("login      local needs login: "),
        "{}",
        sup.output()
    );
    // The next task goes straight to the fallback: local is not asked again.
    assert_eq!(server.conversations(Api::Chat), 1);
    p.drop_task("t2.yaml", "description: \"@fake\"\nworkdir: work\n");
    let r = wait_completed(&p, "t2");
    assert_eq!(outcomes(&r), [pair("fake", "completed")], "{r}");
    assert_eq!(server.conversations(Api::Chat), 1);
    assert!(sup.stop().success(), "{}", sup.output());

    // A restart honours the mark (and says so at start; the log is shared with the first run).
    let mut sup = start(&p);
    wait_for(
        "the restart to name the mark",
        Duration::from_secs(20),
        || sup.output().contains("login      local needs login since "),
    );
    p.drop_task("t3.yaml", "description: \"@fake\"\nworkdir: work\n");
    let r = wait_completed(&p, "t3");
    assert_eq!(outcomes(&r), [pair("fake", "completed")], "{r}");
    assert_eq!(server.conversations(Api::Chat), 1);
    assert!(sup.stop().success(), "{}", sup.output());

    // A change to the agent's configuration clears it: the next task runs on local.
    let cfg = p
        .read("config.yaml")
        .replace("model: local-model", "model: local-model-2");
    std::fs::write(p.path("config.yaml"), cfg).expect("write config");
    server.script(Api::Chat, vec![Reply::Text("done by local".into())]);
    let mut sup = start(&p);
    p.drop_task("t4.yaml", "description: Plan it\nworkdir: work\n");
    let r = wait_completed(&p, "t4");
    assert_eq!(
        outcomes(&r),
        [pair("local", "completed")],
        "{r}\n{}",
        sup.output()
    );
    assert!(
        sup.output()
            .contains("login      local: its configuration, environment or credentials changed"),
        "{}",
        sup.output()
    );
    assert!(agent_json(&p, "local")["needs_login"].is_null());
    assert!(sup.stop().success(), "{}", sup.output());
}

#[test]
fn with_no_other_agent_the_task_waits_naming_the_agent_until_a_reset() {
    let server = ModelServer::start();
    server.script(
        Api::Chat,
        vec![Reply::AuthError, Reply::Text("planned".into())],
    );
    let p = login_project(&server, false, "");
    p.drop_task("plan.yaml", "description: Plan it\nworkdir: work\n");
    // `--once` does not stay for a login: a person has to act.
    let once = run_once(&p);
    once.assert_code(0);
    assert_eq!(p.tasks_in("pending"), ["plan"], "{}", once.stderr());
    let status = p.run(&["status"]).assert_code(0).stdout();
    let waiting = status
        .lines()
        .find(|l| l.trim_start().starts_with("plan "))
        .unwrap_or_else(|| panic!("plan waits: {status}"));
    assert!(
        waiting.contains("no agent available: agent local: needs login: POST ")
            && waiting.ends_with(&format!(
                "(check {KEY_VAR} (the key it was given was refused))"
            )),
        "{status}"
    );
    // The mirror holds the same note (current_state.md reads it from the loop).
    let state = p.read("context/current_state.md");
    assert!(state.contains("agent local: needs login: "), "{state}");
    let shown = p.run(&["show", "plan"]).assert_code(0).stdout();
    assert!(
        shown.contains("waiting: no agent available: agent local: needs login"),
        "{shown}"
    );
    assert!(
        shown.contains("  attempt 1 on local: auth, exit 1 — POST "),
        "{shown}"
    );
    // No retry was spent: the attempt is there, the task is not failed.
    assert!(p.tasks_in("failed").is_empty());

    // An unknown name is refused, naming the agents there are.
    let bad = p.run(&["agents", "--reset", "nope"]);
    bad.assert_code(2);
    assert!(
        bad.stderr()
            .contains("no agent `nope` (configured: fake, local)"),
        "{}",
        bad.stderr()
    );
    let reset = p
        .run(&["agents", "--reset", "local"])
        .assert_code(0)
        .stdout();
    assert!(reset.contains("local: needs-login mark cleared"), "{reset}");
    let again = p
        .run(&["agents", "--reset", "local"])
        .assert_code(0)
        .stdout();
    assert!(again.contains("local: no needs-login mark"), "{again}");
    let once = run_once(&p);
    once.assert_code(0);
    let r = p.result("completed", "plan");
    assert_eq!(
        outcomes(&r),
        [pair("local", "auth"), pair("local", "completed")],
        "{r}\n{}",
        once.stderr()
    );
    assert_eq!(server.conversations(Api::Chat), 2);
}

#[test]
fn a_running_supervisor_tries_the_agent_again_after_the_recheck_interval() {
    let server = ModelServer::start();
    server.script(
        Api::Chat,
        vec![Reply::AuthError, Reply::Text("planned".into())],
    );
    let p = login_project(&server, false, "  login_recheck_seconds: 1\n");
    let mut sup = start(&p);
    p.drop_task("plan.yaml", "description: Plan it\nworkdir: work\n");
    let r = wait_completed(&p, "plan");
    assert_eq!(
        outcomes(&r),
        [pair("local", "auth"), pair("local", "completed")],
        "{r}\n{}",
        sup.output()
    );
    assert!(
        sup.output()
            .contains("login      local: trying it again (login_recheck_seconds passed)"),
        "{}",
        sup.output()
    );
    // A completed attempt forgets the mark altogether.
    wait_for("the mark to be forgotten", Duration::from_secs(10), || {
        !p.read(".orchestrate/needs_login.json")
            .contains("\"local\"")
    });
    assert!(sup.stop().success(), "{}", sup.output());
}

#[test]
fn an_exhausted_quota_says_so_in_agents() {
    let p = Project::new();
    // What a supervisor leaves after an attempt ran out of quota (see cooldown.rs).
    let until = "2999-01-01T00:00:00.000Z";
    std::fs::write(
        p.path(".orchestrate/cooldowns.json"),
        format!(
            r#"{{"fake": {{"until": "{until}", "outcome": "quota_exhausted", "reason": "You exceeded your current quota", "streak": 1}}}}"#
        ),
    )
    .expect("write cooldowns");
    let table = p.run(&["agents"]).assert_code(0).stdout();
    assert!(
        table.contains(&format!(
            "cooling down until {until} (quota exhausted): You exceeded your current quota"
        )),
        "{table}"
    );
    let fake = agent_json(&p, "fake");
    assert_eq!(fake["cooldown_outcome"], "quota_exhausted", "{fake}");
}

/// The test configuration with the fake agent watched for stalls after `stall` seconds.
fn stall_project(stall: &str, extra: &str) -> Project {
    let config = test_config(extra).replace(
        "    max_instances: 8\n",
        &format!("    max_instances: 8\n    stall_timeout_seconds: {stall}\n"),
    );
    assert!(config.contains("stall_timeout_seconds"), "{config}");
    let p = Project::with_config(&config);
    // A workdir of its own: the project root holds the supervisor's log, which grows.
    std::fs::create_dir_all(p.path("work")).expect("mkdir work");
    p
}

#[test]
fn a_silent_agent_is_stopped_as_stalled_with_its_last_line_and_retried() {
    let p = stall_project("1", "");
    let mut sup = p.start();
    p.drop_task(
        "quiet.yaml",
        "description: \"@fake print=Reconnecting..._waiting_for_network sleep=60\"\nworkdir: work\n",
    );
    wait_for("quiet to fail", Duration::from_secs(60), || {
        p.tasks_in("failed").contains(&"quiet".to_string())
    });
    let r = p.result("failed", "quiet");
    // max_retries 1: stopped, retried once, stopped again.
    assert_eq!(
        outcomes(&r),
        [pair("fake", "stalled"), pair("fake", "stalled")],
        "{r}\n{}",
        sup.output()
    );
    let stalled = "stalled: no progress for 1 s; last output: Reconnecting... waiting for network";
    assert_eq!(r["attempts"][0]["error"], stalled, "{r}");
    assert_eq!(
        r["error"],
        format!("{stalled} (after 2 failed attempt(s); max_retries 1)"),
        "{r}"
    );
    // Stopped the way a timeout stops it: SIGTERM to the group, long before its 60 s sleep.
    assert_eq!(r["attempts"][0]["signal"], libc::SIGTERM, "{r}");
    assert!(
        r["attempts"][0]["duration_ms"]
            .as_u64()
            .is_some_and(|d| d < 30_000),
        "{r}"
    );
    // `show`, the mirror and `follow` say it.
    let shown = p.run(&["show", "quiet"]).assert_code(0).stdout();
    assert!(
        shown.contains(&format!("attempt 1 on fake: stalled — {stalled}")),
        "{shown}"
    );
    let db = p.db();
    let mirrored: Vec<String> = db
        .prepare("SELECT outcome FROM attempts WHERE task_id = 'quiet' ORDER BY n")
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .map(|r| r.expect("row"))
        .collect();
    assert_eq!(mirrored, ["stalled", "stalled"]);
    // Every event there is so far, and no more: `follow` waits for the next one.
    let events: i64 = db
        .query_row("SELECT count(*) FROM task_events", [], |r| r.get(0))
        .expect("count events");
    let followed = p
        .run(&["follow", "--since", "0", "--limit", &events.to_string()])
        .assert_code(0)
        .stdout();
    assert!(
        followed
            .lines()
            .any(|l| l.contains(" failed ") && l.contains(stalled)),
        "{followed}"
    );
    assert!(sup.stop().success(), "{}", sup.output());
}

#[test]
fn an_agent_that_keeps_printing_or_writing_is_not_stopped() {
    let p = stall_project("1", "");
    let mut sup = p.start();
    // Two seconds of work in all, each step well inside the one-second stall limit.
    p.drop_task(
        "chatty.yaml",
        "description: \"@fake ticks=8:0.25 print=done\"\nworkdir: work\n",
    );
    let r = wait_completed(&p, "chatty");
    assert_eq!(
        outcomes(&r),
        [pair("fake", "completed")],
        "{r}\n{}",
        sup.output()
    );
    let out = p.read("context/agent_outputs/chatty_output.md");
    assert!(out.contains("tick 8") && out.contains("done"), "{out}");
    assert!(sup.stop().success(), "{}", sup.output());
}

/// Needs a PostgreSQL server: `tools/test` skips the modules named `postgres` without one.
mod postgres {
    use super::*;

    #[test]
    fn a_stalled_attempt_is_mirrored_to_postgresql() {
        let schema = PgSchema::new("health_stall");
        let config = pg_config(&schema.url(), &schema.name).replace(
            "    max_instances: 8\n",
            "    max_instances: 8\n    stall_timeout_seconds: 1\n",
        );
        let p = Project::with_config(&config.replace("max_retries: 1", "max_retries: 0"));
        std::fs::create_dir_all(p.path("work")).expect("mkdir work");
        let mut sup = p.start();
        p.drop_task(
            "pgquiet.yaml",
            "description: \"@fake print=waiting sleep=60\"\nworkdir: work\n",
        );
        wait_for("the stall in PostgreSQL", Duration::from_secs(60), || {
            schema.count_or_zero(
                "SELECT count(*) FROM attempts WHERE task_id = 'pgquiet' AND outcome = 'stalled'",
            ) == 1
        });
        let error = schema.query("SELECT payload->>'error' FROM tasks WHERE id = 'pgquiet'");
        assert_eq!(
            error[0][0].as_deref(),
            Some(
                "stalled: no progress for 1 s; last output: waiting (after 1 failed attempt(s); max_retries 0)"
            ),
            "{}",
            sup.output()
        );
        assert!(sup.stop().success(), "{}", sup.output());
    }
}
