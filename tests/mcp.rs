//! `orchestrate mcp`: the MCP server spoken to by the SDK's own client over stdio, as a real agent
//! would: the tools it lists, each of them called against a running supervisor and real task
//! files, wrong input answered with a tool error the model can act on, and a client that goes away
//! in the middle of a call.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::transport::TokioChildProcess;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};

const SECRET: (&str, &str) = ("ORCH_MCP_SECRET", "mcp-secret-9a8b7c6d5e");
/// Every call of a test is bounded by this.
const LIMIT: Duration = Duration::from_secs(120);

fn config() -> String {
    test_config("").replace(
        "security:\n  env_allow: [PATH, HOME]",
        &format!(
            "security:\n  env_allow: [PATH, HOME, {0}]\n  secrets: [{0}]",
            SECRET.0
        ),
    )
}

type Client = RunningService<RoleClient, ()>;

async fn connect(p: &Project) -> Client {
    let mut cmd = tokio::process::Command::from(p.cmd(&["mcp"]));
    cmd.env(SECRET.0, SECRET.1).stderr(Stdio::inherit());
    let transport = TokioChildProcess::new(cmd).expect("spawn orchestrate mcp");
    tokio::time::timeout(LIMIT, ().serve(transport))
        .await
        .expect("initialised in time")
        .expect("initialise")
}

async fn call(c: &Client, tool: &str, args: Value) -> CallToolResult {
    let Value::Object(args) = args else {
        panic!("arguments must be an object")
    };
    tokio::time::timeout(
        LIMIT,
        c.call_tool(CallToolRequestParams::new(tool.to_string()).with_arguments(args)),
    )
    .await
    .unwrap_or_else(|_| panic!("{tool} answered in time"))
    .unwrap_or_else(|e| panic!("{tool}: protocol error {e}"))
}

/// A successful call's structured result.
async fn ok(c: &Client, tool: &str, args: Value) -> Value {
    let r = call(c, tool, args).await;
    assert_ne!(r.is_error, Some(true), "{tool} failed: {:?}", text(&r));
    r.structured_content
        .unwrap_or_else(|| panic!("{tool} gave no structured result"))
}

/// A failed call's message (it must be a tool error, not a protocol error).
async fn tool_error(c: &Client, tool: &str, args: Value) -> String {
    let r = call(c, tool, args).await;
    assert_eq!(r.is_error, Some(true), "{tool} should have failed: {r:?}");
    text(&r)
}

fn text(r: &CallToolResult) -> String {
    r.content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n")
}

const TOOLS: &[&str] = &[
    "add_task",
    "cancel_task",
    "discard_task",
    "get_log",
    "get_task",
    "list_agents",
    "list_tasks",
    "merge_task",
    "retry_task",
    "status",
    "wait_for_task",
];

#[tokio::test(flavor = "multi_thread")]
async fn every_tool_against_a_running_supervisor() {
    let p = Project::with_config(&config());
    let mut sup = p.start_with_env(&[SECRET]);
    let c = connect(&p).await;

    let info = c.peer_info().expect("the server introduced itself");
    assert_eq!(info.server_info.name, "orchestrate");
    let tools = c.list_all_tools().await.expect("list tools");
    let mut names: Vec<String> = tools.iter().map(|t| t.name.to_string()).collect();
    names.sort();
    assert_eq!(names, TOOLS);
    for t in &tools {
        assert!(
            t.description.as_deref().is_some_and(|d| d.len() > 20),
            "{} has no description a model can act on",
            t.name
        );
        assert_eq!(t.input_schema["type"], "object", "{}", t.name);
    }
    let add = tools
        .iter()
        .find(|t| t.name == "add_task")
        .expect("add_task");
    let props = add.input_schema["properties"]
        .as_object()
        .expect("properties");
    for field in [
        "description",
        "agent",
        "priority",
        "after",
        "context_files",
        "workdir",
        "check",
        "labels",
        "fan_out",
        "pick",
        "judge",
    ] {
        assert!(props.contains_key(field), "add_task's schema lacks {field}");
    }
    assert_eq!(add.input_schema["required"], json!(["description"]));
    // Each tool but `status` (whose answer is `status --json`'s) shows the shape of its answer.
    let outputs: std::collections::HashMap<String, Value> = tools
        .iter()
        .filter_map(|t| {
            let schema = t.output_schema.as_ref()?;
            Some((t.name.to_string(), Value::Object((**schema).clone())))
        })
        .collect();
    for t in TOOLS.iter().filter(|t| **t != "status") {
        let schema = outputs
            .get(*t)
            .unwrap_or_else(|| panic!("{t} has no output schema"));
        assert!(
            schema["properties"]
                .as_object()
                .is_some_and(|p| !p.is_empty()),
            "{t}: {schema}"
        );
    }
    // An answer has every field its schema requires, and no field the schema does not name.
    let conforms = |tool: &str, answer: &Value| {
        let schema = &outputs[tool];
        let props = schema["properties"].as_object().expect("properties");
        for r in schema["required"].as_array().into_iter().flatten() {
            let r = r.as_str().expect("a name");
            assert!(
                answer.get(r).is_some(),
                "{tool} answered without {r}: {answer}"
            );
        }
        for k in answer.as_object().expect("an object").keys() {
            assert!(
                props.contains_key(k),
                "{tool} answered {k}, not in its schema {schema}"
            );
        }
    };

    // Added, run by the supervisor's fake agent, waited for; the description carries a secret.
    let added = ok(
        &c,
        "add_task",
        json!({"description": format!("say hi {}\n@fake print=done-by-fake", SECRET.1), "agent": "fake", "priority": "high", "labels": ["mcp"]}),
    )
    .await;
    conforms("add_task", &added);
    let id = added["id"].as_str().expect("an id").to_string();
    let done = ok(
        &c,
        "wait_for_task",
        json!({"id": id, "timeout_seconds": 90}),
    )
    .await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["terminal"], true);
    conforms("wait_for_task", &done);
    assert!(
        done["output"]
            .as_str()
            .unwrap_or_default()
            .contains("done-by-fake"),
        "{done}"
    );
    let got = ok(&c, "get_task", json!({"id": id})).await;
    conforms("get_task", &got);
    assert_eq!(got["state"], "completed");
    assert!(!got["attempts"].as_array().expect("attempts").is_empty());
    let file = got["task"].as_str().unwrap_or_default();
    assert!(
        file.contains("labels:\n- mcp") && file.contains("priority: high"),
        "{file}"
    );
    assert!(
        !got.to_string().contains(SECRET.1),
        "a secret was returned: {got}"
    );
    assert!(
        got["task"]
            .as_str()
            .unwrap_or_default()
            .contains("say hi ***"),
        "the redaction shows: {got}"
    );

    let listed = ok(
        &c,
        "list_tasks",
        json!({"state": "completed", "agent": "fake", "limit": 5}),
    )
    .await;
    let ids: Vec<&str> = listed["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .filter_map(|t| t["id"].as_str())
        .collect();
    assert_eq!(ids, [id.as_str()]);
    conforms("list_tasks", &listed);
    let agents = ok(&c, "list_agents", json!({})).await;
    conforms("list_agents", &agents);
    assert_eq!(agents["agents"][0]["name"], "fake", "{agents}");
    let status = ok(&c, "status", json!({})).await;
    assert!(status.to_string().contains("completed"), "{status}");

    // A running task: its log, then cancelled, waited for, retried.
    let long = ok(
        &c,
        "add_task",
        json!({"description": "@fake ticks=100:0.2"}),
    )
    .await;
    let lid = long["id"].as_str().expect("an id").to_string();
    wait_for("the long task to run", LIMIT, || {
        p.tasks_in("assigned").contains(&lid)
    });
    let mut log = Value::Null;
    for _ in 0..100 {
        // Until its claim is written the task is not running yet: that answer is an error too.
        let r = call(&c, "get_log", json!({"id": lid})).await;
        log = r.structured_content.unwrap_or(Value::Null);
        if log["log"].as_str().unwrap_or_default().contains("tick 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        log["log"].as_str().unwrap_or_default().contains("tick 1"),
        "{log}"
    );
    conforms("get_log", &log);
    let cancelled = ok(&c, "cancel_task", json!({"id": lid})).await;
    conforms("cancel_task", &cancelled);
    assert!(
        cancelled["cancelled"]
            .as_str()
            .unwrap_or_default()
            .contains("failed"),
        "{cancelled}"
    );
    let failed = ok(
        &c,
        "wait_for_task",
        json!({"id": lid, "timeout_seconds": 5}),
    )
    .await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        tool_error(&c, "get_log", json!({"id": lid}))
            .await
            .contains("not running")
    );
    let retried = ok(&c, "retry_task", json!({"id": lid})).await;
    assert_eq!(retried["retried"], "pending", "{retried}");
    conforms("retry_task", &retried);
    // Cancelled again wherever it is (a claim is written just after the move to assigned/).
    let mut again = call(&c, "cancel_task", json!({"id": lid})).await;
    for _ in 0..100 {
        if again.is_error != Some(true) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        again = call(&c, "cancel_task", json!({"id": lid})).await;
    }
    assert_ne!(again.is_error, Some(true), "{}", text(&again));
    wait_for("the retried task to end", LIMIT, || {
        p.tasks_in("failed").contains(&lid)
    });

    // No kept branch here: merge and discard say so and change nothing.
    let m = tool_error(&c, "merge_task", json!({"id": id})).await;
    assert!(m.contains("no kept branch"), "{m}");
    let d = tool_error(&c, "discard_task", json!({"id": id})).await;
    assert!(d.contains("no kept branch"), "{d}");

    c.cancel().await.expect("close the client");
    sup.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_input_is_a_tool_error_the_model_can_correct() {
    let p = Project::with_config(&config());
    let c = connect(&p).await;
    let cases = [
        (
            "add_task",
            json!({"description": "x", "agent": "nope"}),
            "unknown agent `nope` (configured: fake)",
        ),
        (
            "add_task",
            json!({"description": "x", "priority": "urgent"}),
            "`priority`",
        ),
        (
            "add_task",
            json!({"description": "x", "labels": ["ok", 7]}),
            "`labels[1]`",
        ),
        (
            "add_task",
            json!({"description": "x", "colour": "red"}),
            "unknown field `colour`",
        ),
        (
            "add_task",
            json!({"agent": "fake"}),
            "missing field `description`",
        ),
        (
            "add_task",
            json!({"description": "x", "after": ["task_999"]}),
            "no task task_999 exists",
        ),
        (
            "add_task",
            json!({"description": "x", "timeout_minutes": -1}),
            "timeout_minutes",
        ),
        (
            "add_task",
            json!({"description": "x", "fan_out": 1}),
            "`fan_out` must be between 2 and 16 candidates",
        ),
        (
            "add_task",
            json!({"description": "x", "fan_out": ["fake"], "pick": "best"}),
            "`pick`",
        ),
        (
            "add_task",
            json!({"description": "x", "fan_out": ["fake"], "pick": "judge"}),
            "needs `judge: AGENT`",
        ),
        (
            "list_tasks",
            json!({"state": "done"}),
            "state must be pending, running, completed or failed",
        ),
        ("list_tasks", json!({"limit": "ten"}), "`limit`"),
        ("get_task", json!({"id": "task_404"}), "no task task_404"),
        (
            "wait_for_task",
            json!({"id": "task_404", "timeout_seconds": 100000}),
            "at most 300",
        ),
        ("cancel_task", json!({"id": "task_404"}), "no task task_404"),
        (
            "status",
            json!({"verbose": true}),
            "unknown field `verbose`",
        ),
    ];
    for (tool, args, want) in cases {
        let msg = tool_error(&c, tool, args.clone()).await;
        assert!(
            msg.contains(want),
            "{tool} {args}: {msg:?} does not say {want:?}"
        );
    }
    assert!(
        p.tasks_in("pending").is_empty(),
        "a rejected task was written"
    );
    // Still serving.
    let added = ok(&c, "add_task", json!({"description": "fine"})).await;
    assert_eq!(added["id"], "task_001");
    // A fan-out is written as its task file says one.
    let raced = ok(
        &c,
        "add_task",
        json!({"description": "race", "fan_out": ["fake"], "pick": "all"}),
    )
    .await;
    let file = p.read(&format!(
        "tasks/pending/{}.yaml",
        raced["id"].as_str().expect("an id")
    ));
    assert!(
        file.contains("fan_out:\n- fake") && file.contains("pick: all"),
        "{file}"
    );
    c.cancel().await.expect("close the client");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_goes_away_mid_call_ends_the_server_cleanly() {
    let p = Project::with_config(&config());
    p.run(&["add", "never run: no supervisor"]).assert_code(0);
    let mut child = tokio::process::Command::from(p.cmd(&["mcp"]))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn orchestrate mcp");
    let (stdin, stdout) = (
        child.stdin.take().expect("stdin"),
        child.stdout.take().expect("stdout"),
    );
    let c: Client = tokio::time::timeout(LIMIT, ().serve((stdout, stdin)))
        .await
        .expect("initialised in time")
        .expect("initialise");
    // A call that would wait five minutes, and a first one answered to show it is alive.
    ok(&c, "status", json!({})).await;
    let peer = c.peer().clone();
    let pending = tokio::spawn(async move {
        let args = json!({"id": "task_001", "timeout_seconds": 300});
        let Value::Object(args) = args else {
            unreachable!()
        };
        peer.call_tool(CallToolRequestParams::new("wait_for_task").with_arguments(args))
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!pending.is_finished(), "the wait returned early");
    drop(c);
    // The wait in progress ends with its client: the server does not sit out rmcp's five-second
    // grace for calls still running (a bound on the wait, not a measure of speed).
    let status = tokio::time::timeout(Duration::from_secs(3), child.wait())
        .await
        .expect("the server exits once its client is gone, without finishing the wait")
        .expect("wait");
    let mut err = String::new();
    use tokio::io::AsyncReadExt;
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .await
        .expect("stderr");
    assert!(status.success(), "exit {status:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    pending.abort();
    // Nothing was lost: the task is still pending.
    assert_eq!(p.tasks_in("pending"), ["task_001"]);
}

/// A client that speaks the protocol's tasks can run `wait_for_task` as one: the call answers at
/// once with a task, `tasks/get` says it is working until the supervisor has finished the orchestrate
/// task, and `tasks/result` gives what the plain call would have. The other tools are not offered
/// as tasks.
#[tokio::test(flavor = "multi_thread")]
async fn wait_for_task_runs_as_a_protocol_task() {
    use rmcp::model::{ClientRequest, ServerResult};
    let p = Project::with_config(&config());
    let c = connect(&p).await;
    let caps = &c.peer_info().expect("introduced").capabilities;
    assert!(caps.tasks.is_some(), "no tasks capability: {caps:?}");
    let tools = c.list_all_tools().await.expect("list tools");
    for t in &tools {
        let support = t.task_support();
        if t.name == "wait_for_task" {
            assert_eq!(support, rmcp::model::TaskSupport::Optional);
        } else {
            assert_eq!(support, rmcp::model::TaskSupport::Forbidden, "{}", t.name);
        }
    }
    let added = ok(
        &c,
        "add_task",
        json!({"description": "@fake print=done-as-a-task"}),
    )
    .await;
    let id = added["id"].as_str().expect("an id").to_string();
    let request = |v: Value| -> ClientRequest { serde_json::from_value(v).expect("a request") };
    let send = |r: ClientRequest| {
        let peer = c.peer().clone();
        async move {
            tokio::time::timeout(LIMIT, peer.send_request(r))
                .await
                .expect("answered in time")
                .expect("answered")
        }
    };
    let created = send(request(json!({
        "method": "tools/call",
        "params": {"name": "wait_for_task", "arguments": {"id": id, "timeout_seconds": 120}, "task": {}}
    })))
    .await;
    let ServerResult::CreateTaskResult(created) = created else {
        panic!("not a task: {created:?}")
    };
    let task_id = created.task.task_id.clone();
    // No supervisor yet: the task stays at work.
    let info = send(request(
        json!({"method": "tasks/get", "params": {"taskId": task_id}}),
    ))
    .await;
    let ServerResult::GetTaskResult(info) = info else {
        panic!("{info:?}")
    };
    assert_eq!(info.task.status, rmcp::model::TaskStatus::Working);
    let mut sup = p.start_with_env(&[SECRET]);
    let result = send(request(
        json!({"method": "tasks/result", "params": {"taskId": task_id}}),
    ))
    .await;
    let payload = match result {
        ServerResult::GetTaskPayloadResult(r) => r.0,
        other => serde_json::to_value(&other).expect("json"),
    };
    let waited = &payload["structuredContent"];
    assert_eq!(waited["state"], "completed", "{payload}");
    assert!(
        waited["output"]
            .as_str()
            .unwrap_or_default()
            .contains("done-as-a-task"),
        "{payload}"
    );
    c.cancel().await.expect("close the client");
    assert!(sup.stop().success(), "{}", sup.output());
}

#[test]
fn print_config_names_this_project_for_each_client() {
    let p = Project::with_config(&config());
    let root = p.root().display().to_string();
    for client in ["claude", "gemini", "cursor"] {
        let out = p.run(&["mcp", "--print-config", client]);
        out.assert_code(0);
        let text = out.stdout();
        let json_part = &text[text.find('{').expect("a JSON object")..];
        let v: Value = serde_json::from_str(json_part).expect("valid JSON");
        let server = &v["mcpServers"]["orchestrate"];
        assert_eq!(server["command"], "orchestrate", "{client}: {text}");
        assert_eq!(
            server["args"],
            json!(["-C", root, "mcp"]),
            "{client}: {text}"
        );
    }
    let claude = p.run(&["mcp", "--print-config", "claude"]).stdout();
    assert!(
        claude.contains(&format!(
            "claude mcp add orchestrate -- orchestrate -C {root} mcp"
        )),
        "{claude}"
    );
    let codex = p.run(&["mcp", "--print-config", "codex"]).stdout();
    assert!(
        codex.contains("[mcp_servers.orchestrate]")
            && codex.contains(&format!("args = [\"-C\", \"{root}\", \"mcp\"]")),
        "{codex}"
    );
    let bad = p.run(&["mcp", "--print-config", "vim"]);
    bad.assert_code(2);
    assert!(
        bad.stderr().contains("claude, codex, gemini, cursor"),
        "{}",
        bad.stderr()
    );
}

/// Resources: the two context pages are listed, a task's output and diff are offered by template,
/// each reads with its secret redacted, and an unknown or hostile URI is a resource error.
#[tokio::test(flavor = "multi_thread")]
async fn context_pages_and_task_results_read_as_resources() {
    let p = Project::with_config(&config());
    let mut sup = p.start_with_env(&[SECRET]);
    p.drop_task(
        "res.yaml",
        &format!(
            "description: \"note {} \\n@fake print=resource-output write=r.txt:from_res\"\n",
            SECRET.1
        ),
    );
    wait_for("res completes", LIMIT, || {
        p.tasks_in("completed").contains(&"res".to_string())
    });
    let c = connect(&p).await;
    let listed = c.list_all_resources().await.expect("list resources");
    let mut uris: Vec<String> = listed.iter().map(|r| r.uri.clone()).collect();
    uris.sort();
    assert_eq!(
        uris,
        [
            "orchestrate://context/current_state.md",
            "orchestrate://context/project_overview.md"
        ]
    );
    let templates = c
        .list_all_resource_templates()
        .await
        .expect("list templates");
    let mut tpl: Vec<String> = templates.iter().map(|t| t.uri_template.clone()).collect();
    tpl.sort();
    assert_eq!(
        tpl,
        [
            "orchestrate://tasks/{id}/diff",
            "orchestrate://tasks/{id}/output"
        ]
    );
    let read = |uri: &'static str| {
        let c = &c;
        async move {
            tokio::time::timeout(
                LIMIT,
                c.read_resource(rmcp::model::ReadResourceRequestParams::new(uri)),
            )
            .await
            .expect("answered in time")
        }
    };
    let text_of = |r: rmcp::model::ReadResourceResult| match &r.contents[0] {
        rmcp::model::ResourceContents::TextResourceContents { text, .. } => text.clone(),
        other => panic!("not text: {other:?}"),
    };
    let state = text_of(
        read("orchestrate://context/current_state.md")
            .await
            .expect("state"),
    );
    assert!(!state.is_empty());
    let output = text_of(
        read("orchestrate://tasks/res/output")
            .await
            .expect("output"),
    );
    assert!(output.contains("resource-output"), "{output}");
    assert!(
        !output.contains(SECRET.1),
        "a secret reached a resource: {output}"
    );
    let diff = text_of(read("orchestrate://tasks/res/diff").await.expect("diff"));
    assert!(diff.contains("+from res"), "{diff}");
    for bad in [
        "orchestrate://tasks/nope/output",
        "orchestrate://tasks/../../etc/passwd/output",
        "file:///etc/passwd",
    ] {
        let e = read(bad).await.expect_err(bad).to_string();
        assert!(
            e.contains("no resource") || e.contains("cannot read"),
            "{bad}: {e}"
        );
    }
    c.cancel().await.expect("close the client");
    assert!(sup.stop().success(), "{}", sup.output());
}

/// `orchestrate serve` on a free loopback port with `args`, and its address once it listens.
fn serve(p: &Project, args: &[&str]) -> (std::process::Child, String) {
    let (child, addr, _) = spawn_serve(p, args, SECRET, 0);
    (child, addr)
}

/// The SDK's client over streamable HTTP at `http://ADDR/mcp`, with `token` as a bearer token.
async fn connect_http(
    addr: &str,
    token: Option<&str>,
) -> Result<Client, rmcp::service::ClientInitializeError> {
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    // reqwest is built without a TLS provider of its own (as orchestrate's is): give it ring's.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = StreamableHttpClientTransportConfig::with_uri(format!("http://{addr}/mcp"));
    if let Some(t) = token {
        config = config.auth_header(t);
    }
    let transport = StreamableHttpClientTransport::from_config(config);
    tokio::time::timeout(LIMIT, ().serve(transport))
        .await
        .expect("answered in time")
}

/// `orchestrate serve` answers MCP at `/mcp` on its own listener and token: with the token a client
/// lists every tool, adds a task the supervisor runs and waits for it over the HTTP event stream;
/// without it, or with a wrong one, it is refused before a session begins.
#[tokio::test(flavor = "multi_thread")]
async fn serve_answers_mcp_over_http_behind_its_token() {
    let p = Project::with_config(&config());
    let mut sup = p.start_with_env(&[SECRET]);
    let token = "mcp-http-token-5f4e3d";
    let (mut server, addr) = serve(&p, &["--token", token]);

    for wrong in [None, Some("not-the-token")] {
        let refused = connect_http(&addr, wrong).await;
        let e = refused
            .err()
            .unwrap_or_else(|| panic!("{wrong:?} was let in"));
        assert!(
            format!("{e:?}").contains("401")
                || format!("{e:?}").to_lowercase().contains("unauthorized"),
            "{wrong:?}: {e:?}"
        );
    }

    let c = connect_http(&addr, Some(token)).await.expect("initialise");
    assert_eq!(
        c.peer_info().expect("introduced").server_info.name,
        "orchestrate"
    );
    let mut names: Vec<String> = c
        .list_all_tools()
        .await
        .expect("list tools")
        .iter()
        .map(|t| t.name.to_string())
        .collect();
    names.sort();
    assert_eq!(names, TOOLS);
    let added = ok(
        &c,
        "add_task",
        json!({"description": format!("over http {}\n@fake sleep=1 print=done-over-http", SECRET.1), "agent": "fake"}),
    )
    .await;
    assert_eq!(added["id"], "task_001", "{added}");
    let done = ok(
        &c,
        "wait_for_task",
        json!({"id": "task_001", "timeout_seconds": 90}),
    )
    .await;
    assert_eq!(done["state"], "completed", "{done}");
    assert!(
        done["output"]
            .as_str()
            .unwrap_or_default()
            .contains("done-over-http"),
        "{done}"
    );
    assert!(
        !done.to_string().contains(SECRET.1),
        "a secret was returned: {done}"
    );
    let e = tool_error(&c, "get_task", json!({"id": "task_404"})).await;
    assert!(e.contains("no task task_404"), "{e}");
    c.cancel().await.expect("close the client");
    let _ = server.kill();
    let _ = server.wait();
    assert!(sup.stop().success(), "{}", sup.output());
}

/// `start --serve` mounts the MCP server too: a client adds a task there, the supervisor of the same
/// process runs it, and the wait answers; SIGTERM ends the process with the client still connected.
#[tokio::test(flavor = "multi_thread")]
async fn start_serve_answers_mcp_beside_the_supervisor() {
    let p = Project::with_config(&config());
    let log = p.path("start-serve.log");
    let f = std::fs::File::create(&log).expect("log");
    let mut child = p
        .cmd(&["start", "--serve", "127.0.0.1:0"])
        .env_remove("ORCHESTRATE_SERVE_TOKEN")
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("clone"))
        .stderr(f)
        .spawn()
        .expect("spawn");
    let mut addr = String::new();
    wait_for("it says where it serves", LIMIT, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        addr = text
            .lines()
            .find_map(|l| l.split("serving    http://").nth(1))
            .unwrap_or_default()
            .trim()
            .to_string();
        !addr.is_empty() && text.contains("watching")
    });
    let c = connect_http(&addr, None).await.expect("initialise");
    let added = ok(&c, "add_task", json!({"description": "@fake print=beside"})).await;
    let done = ok(
        &c,
        "wait_for_task",
        json!({"id": added["id"], "timeout_seconds": 90}),
    )
    .await;
    assert_eq!(done["state"], "completed", "{done}");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_child(&mut child, Duration::from_secs(30));
    if status.is_none() {
        let _ = child.kill();
    }
    let status = status.unwrap_or_else(|| {
        panic!(
            "start --serve did not end on SIGTERM with an MCP client connected:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    drop(c);
}

/// `serve --read-only` offers only the tools that read: a write tool is not listed, and a call of
/// one is refused without a file written.
#[tokio::test(flavor = "multi_thread")]
async fn read_only_serve_offers_no_write_tools() {
    let p = Project::with_config(&config());
    p.run(&["add", "already here"]).assert_code(0);
    let (mut server, addr) = serve(&p, &["--read-only"]);
    let c = connect_http(&addr, None).await.expect("initialise");
    let mut names: Vec<String> = c
        .list_all_tools()
        .await
        .expect("list tools")
        .iter()
        .map(|t| t.name.to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "get_log",
            "get_task",
            "list_agents",
            "list_tasks",
            "status",
            "wait_for_task"
        ]
    );
    let listed = ok(&c, "list_tasks", json!({})).await;
    assert_eq!(listed["tasks"][0]["id"], "task_001", "{listed}");
    let Value::Object(args) = json!({"description": "not allowed"}) else {
        unreachable!()
    };
    let refused = tokio::time::timeout(
        LIMIT,
        c.call_tool(CallToolRequestParams::new("add_task").with_arguments(args)),
    )
    .await
    .expect("answered in time");
    assert!(
        refused.is_err() || refused.as_ref().is_ok_and(|r| r.is_error == Some(true)),
        "{refused:?}"
    );
    assert_eq!(p.tasks_in("pending"), ["task_001"]);
    c.cancel().await.expect("close the client");
    let _ = server.kill();
    let _ = server.wait();
}

/// The conversation issue 17 describes, scripted: add two tasks (the second after the first, named
/// by the id the first call returned), then wait for each. `tag` marks what each task prints.
fn two_tasks_then_wait(tag: &str) -> common::model_server::Reply {
    use common::model_server::{Call, Reply};
    Reply::CallTools {
        calls: vec![
            Call::new(
                "add_task",
                json!({"description": format!("@fake sleep=1 print=first-{tag}"), "agent": "fake"}),
            ),
            Call::new(
                "add_task",
                json!({"description": format!("@fake print=second-{tag}"), "agent": "fake", "after": ["{{0:/id}}"]}),
            ),
            Call::new(
                "wait_for_task",
                json!({"id": "{{0:/id}}", "timeout_seconds": 90}),
            ),
            Call::new(
                "wait_for_task",
                json!({"id": "{{1:/id}}", "timeout_seconds": 90}),
            ),
        ],
        then: "Both tasks finished.".into(),
    }
}

/// What the model's requests carried back from [`two_tasks_then_wait`]: each call's result in
/// order, named `add` and `wait` as the CLI names the tools; the ids add_task gave, the dependency
/// the model named from the first result, and both tasks finished with what they printed.
fn assert_two_tasks_done(
    p: &Project,
    results: &[(String, Value)],
    add: &str,
    wait: &str,
    tag: &str,
) {
    let names: Vec<&str> = results.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, [add, add, wait, wait], "{results:?}");
    let (first, second) = (&results[0].1, &results[1].1);
    assert_eq!(first["id"], "task_001", "{results:?}");
    assert_eq!(first["state"], "pending", "{results:?}");
    assert_eq!(second["id"], "task_002", "{results:?}");
    assert!(
        p.read("tasks/completed/task_002.yaml").contains("task_001"),
        "the dependency the model named is missing"
    );
    for (n, id) in ["task_001", "task_002"].into_iter().enumerate() {
        let printed = format!("{}-{tag}", ["first", "second"][n]);
        let waited = &results[2 + n].1;
        assert_eq!(waited["id"], id, "{waited}");
        assert_eq!(waited["state"], "completed", "{waited}");
        assert_eq!(waited["terminal"], true, "{waited}");
        assert!(
            waited["output"]
                .as_str()
                .unwrap_or_default()
                .contains(&printed),
            "{waited}"
        );
    }
    assert_eq!(p.tasks_in("completed"), ["task_001", "task_002"]);
}

/// A real MCP client: the pinned Claude Code CLI, against the scripted model server, loads the
/// server from `--mcp-config`, lists its tools to the model, and carries out the model's
/// `add_task` call; a running supervisor completes the task, and the model's next request carries
/// the tool's result.
mod claude {
    use super::*;
    use common::model_server::{Api, ModelServer, Reply};

    /// The pinned CLI (tools/test installs it; a test in this module is skipped where it is not).
    fn claude() -> std::path::PathBuf {
        pinned_cli("claude")
    }

    /// Run the pinned Claude Code CLI on `prompt` with `orchestrate mcp` for `p` registered through
    /// `--mcp-config`, against `server`, allowed to call `tools`; its exit status and what it said.
    fn run_claude(
        p: &Project,
        server: &ModelServer,
        prompt: &str,
        tools: &[&str],
    ) -> (bool, String) {
        let stdio = json!({
            "command": BIN,
            "args": ["-C", p.root().display().to_string(), "mcp"]
        });
        run_claude_with(p, server, prompt, tools, stdio)
    }

    /// [`run_claude`] with `entry` as the server's `mcpServers` entry.
    fn run_claude_with(
        p: &Project,
        server: &ModelServer,
        prompt: &str,
        tools: &[&str],
        entry: Value,
    ) -> (bool, String) {
        let bin = claude();
        let mcp = p.path("mcp.json");
        std::fs::write(
            &mcp,
            json!({"mcpServers": {"orchestrate": entry}}).to_string(),
        )
        .expect("write mcp.json");
        let allowed: Vec<String> = tools
            .iter()
            .map(|t| format!("mcp__orchestrate__{t}"))
            .collect();
        let home = tempfile::tempdir().expect("home");
        let mut child = std::process::Command::new(&bin)
            .args(["-p", prompt])
            .arg("--mcp-config")
            .arg(&mcp)
            .arg("--allowedTools")
            .arg(allowed.join(","))
            .current_dir(p.root())
            .env("HOME", home.path())
            .env("ANTHROPIC_BASE_URL", server.url())
            .env("ANTHROPIC_API_KEY", "test-key")
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .env("CLAUDE_CODE_MAX_RETRIES", "0")
            // MCP tools offered to the model at once, not deferred behind its ToolSearch tool.
            .env("ENABLE_TOOL_SEARCH", "false")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run claude");
        let status = wait_child(&mut child, LIMIT).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("claude did not finish in time")
        });
        let out = child.wait_with_output().expect("output");
        let said = format!(
            "{status:?}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (status.success(), said)
    }

    /// The bodies of the conversation requests the model server received.
    fn posts(server: &ModelServer) -> Vec<String> {
        server
            .requests()
            .into_iter()
            .filter(|(m, _, _)| m == "POST")
            .map(|(_, _, b)| b)
            .collect()
    }

    /// Every tool result (its text read as JSON) the requests carried, in order, each once, with
    /// the name of the tool whose call it answers.
    fn tool_results(posts: &[String]) -> Vec<(String, Value)> {
        let mut calls = std::collections::HashMap::new();
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for body in posts {
            let Ok(v) = serde_json::from_str::<Value>(body) else {
                continue;
            };
            let messages = v["messages"].as_array().cloned().unwrap_or_default();
            for part in messages
                .iter()
                .flat_map(|m| m["content"].as_array().cloned().unwrap_or_default())
            {
                match part["type"].as_str() {
                    Some("tool_use") => {
                        calls.insert(
                            part["id"].as_str().unwrap_or_default().to_string(),
                            part["name"].as_str().unwrap_or_default().to_string(),
                        );
                    }
                    Some("tool_result") => {
                        let id = part["tool_use_id"].as_str().unwrap_or_default().to_string();
                        if seen.contains(&id) {
                            continue;
                        }
                        seen.push(id.clone());
                        let text = match &part["content"] {
                            Value::String(s) => s.clone(),
                            Value::Array(a) => a
                                .iter()
                                .filter_map(|t| t["text"].as_str())
                                .collect::<Vec<_>>()
                                .join("\n"),
                            _ => String::new(),
                        };
                        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
                        out.push((calls.get(&id).cloned().unwrap_or_default(), value));
                    }
                    _ => {}
                }
            }
        }
        out
    }

    #[test]
    fn claude_code_adds_a_task_through_the_mcp_server() {
        let server = ModelServer::start();
        server.script(
            Api::Anthropic,
            vec![Reply::CallTool {
                tool: "add_task".into(),
                args: json!({"description": "@fake print=done-via-mcp", "agent": "fake", "id": "viamcp"}),
                then: "I queued task viamcp.".into(),
            }],
        );
        let p = Project::with_config(&config());
        let mut sup = p.start_with_env(&[SECRET]);
        let (ok, said) = run_claude(
            &p,
            &server,
            "Queue a task that prints done-via-mcp.",
            &["add_task"],
        );
        assert!(ok, "{said}");
        assert!(said.contains("I queued task viamcp."), "{said}");
        wait_for("the task added through MCP completes", LIMIT, || {
            p.tasks_in("completed").contains(&"viamcp".to_string())
        });
        assert!(
            p.read("context/agent_outputs/viamcp_output.md")
                .contains("done-via-mcp")
        );
        let posts = posts(&server);
        // Claude Code offered the model every tool it loaded from the server.
        for tool in TOOLS {
            let name = format!("mcp__orchestrate__{tool}");
            assert!(
                posts.iter().any(|b| b.contains(&name)),
                "{name} was not offered"
            );
        }
        // The follow-up carried add_task's structured result: the new task's id and file.
        let results = tool_results(&posts);
        assert_eq!(results.len(), 1, "{results:?}");
        assert_eq!(results[0].0, "mcp__orchestrate__add_task");
        assert_eq!(results[0].1["id"], "viamcp", "{results:?}");
        assert_eq!(
            results[0].1["file"], "tasks/pending/viamcp.yaml",
            "{results:?}"
        );
        assert!(sup.stop().success(), "{}", sup.output());
    }

    /// Claude Code reaches the server over HTTP at `serve`'s `/mcp` with the bearer token, as the
    /// README registers it, and the model's call adds a task there.
    #[test]
    fn claude_code_reaches_the_server_over_http_with_the_token() {
        let server = ModelServer::start();
        server.script(
            Api::Anthropic,
            vec![Reply::CallTool {
                tool: "add_task".into(),
                args: json!({"description": "@fake print=done-via-http", "agent": "fake", "id": "viahttp"}),
                then: "I queued task viahttp.".into(),
            }],
        );
        let p = Project::with_config(&config());
        let token = "claude-http-token-0a1b2c";
        let (mut serving, addr) = serve(&p, &["--token", token]);
        let entry = json!({
            "type": "http",
            "url": format!("http://{addr}/mcp"),
            "headers": {"Authorization": format!("Bearer {token}")}
        });
        let (ok, said) = run_claude_with(&p, &server, "Queue a task.", &["add_task"], entry);
        let _ = serving.kill();
        let _ = serving.wait();
        assert!(ok, "{said}");
        assert!(said.contains("I queued task viahttp."), "{said}");
        assert_eq!(p.tasks_in("pending"), ["viahttp"]);
        let results = tool_results(&posts(&server));
        assert_eq!(results.len(), 1, "{results:?}");
        assert_eq!(results[0].1["id"], "viahttp", "{results:?}");
    }

    /// The conversation the issue describes: the model adds two tasks (the second after the first,
    /// naming it by the id the first call returned), then waits for each; the supervisor runs them
    /// while Claude Code waits on the server, and each of the model's following requests carries the
    /// results: the ids add_task gave, and the finished tasks wait_for_task returned.
    #[test]
    fn claude_code_adds_two_tasks_and_waits_for_them() {
        let server = ModelServer::start();
        server.script(Api::Anthropic, vec![two_tasks_then_wait("via-mcp")]);
        let p = Project::with_config(&config());
        let mut sup = p.start_with_env(&[SECRET]);
        let (ok, said) = run_claude(
            &p,
            &server,
            "Queue two tasks, the second after the first, and tell me when both are done.",
            &["add_task", "wait_for_task"],
        );
        assert!(ok, "{said}");
        assert!(said.contains("Both tasks finished."), "{said}");
        let results = tool_results(&posts(&server));
        assert_two_tasks_done(
            &p,
            &results,
            "mcp__orchestrate__add_task",
            "mcp__orchestrate__wait_for_task",
            "via-mcp",
        );
        assert!(sup.stop().success(), "{}", sup.output());
    }
}

/// The same with the pinned Codex CLI: `orchestrate mcp` registered through `-c mcp_servers.…`
/// overrides, the scripted model's calls made over the OpenAI Responses API.
mod codex {
    use super::*;
    use common::model_server::{Api, ModelServer};

    fn codex() -> std::path::PathBuf {
        pinned_cli("codex")
    }

    /// Every MCP tool result the Responses requests carried (read as JSON from the text after
    /// Codex's `Wall time: …` header), in order, each once, with `namespace.tool` of its call.
    fn tool_results(server: &ModelServer) -> Vec<(String, Value)> {
        let mut calls = std::collections::HashMap::new();
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for (_, _, body) in server.requests() {
            let Ok(v) = serde_json::from_str::<Value>(&body) else {
                continue;
            };
            for item in v["input"].as_array().cloned().unwrap_or_default() {
                let call_id = item["call_id"].as_str().unwrap_or_default().to_string();
                match item["type"].as_str() {
                    Some("function_call") => {
                        let name = format!(
                            "{}.{}",
                            item["namespace"].as_str().unwrap_or_default(),
                            item["name"].as_str().unwrap_or_default()
                        );
                        calls.insert(call_id, name);
                    }
                    Some("function_call_output") if !seen.contains(&call_id) => {
                        seen.push(call_id.clone());
                        let text = match &item["output"] {
                            Value::String(s) => s.clone(),
                            Value::Array(a) => a
                                .iter()
                                .filter_map(|t| t["text"].as_str())
                                .collect::<Vec<_>>()
                                .join("\n"),
                            _ => String::new(),
                        };
                        let value = text
                            .find('{')
                            .and_then(|i| serde_json::from_str(&text[i..]).ok())
                            .unwrap_or(Value::String(text));
                        out.push((calls.get(&call_id).cloned().unwrap_or_default(), value));
                    }
                    _ => {}
                }
            }
        }
        out
    }

    /// Codex offers an MCP server's tools to the model in a `namespace` tool (`mcp__orchestrate`)
    /// and runs a call of one through `orchestrate mcp`. Two settings make that happen offline and
    /// unattended: a model slug Codex has no metadata for (for the slugs it knows, such as `gpt-5.5`,
    /// Codex 0.169 offers MCP tools only behind its own `tool_search` tool, which the model must
    /// call first), and `default_tools_approval_mode = "approve"` (`codex exec` runs with the
    /// approval policy `never`, under which a tool needing approval is refused with "MCP tool call
    /// requires approval, but approval policy is never").
    #[test]
    fn codex_adds_two_tasks_and_waits_for_them() {
        let bin = codex();
        let server = ModelServer::start();
        server.script(Api::Responses, vec![two_tasks_then_wait("via-codex")]);
        let p = Project::with_config(&config());
        let mut sup = p.start_with_env(&[SECRET]);
        let home = tempfile::tempdir().expect("home");
        let codex_home = home.path().join(".codex");
        std::fs::create_dir_all(&codex_home).expect("codex home");
        let toml_str = |s: &str| serde_json::to_string(s).expect("a string");
        let overrides = [
            "model_provider=orch".to_string(),
            "model_providers.orch.name=\"orch\"".to_string(),
            format!(
                "model_providers.orch.base_url={}",
                toml_str(&format!("{}/v1", server.url()))
            ),
            "model_providers.orch.wire_api=\"responses\"".to_string(),
            "model_providers.orch.env_key=\"ORCH_API_KEY\"".to_string(),
            "model_providers.orch.request_max_retries=0".to_string(),
            "model_providers.orch.stream_max_retries=0".to_string(),
            "check_for_update_on_startup=false".to_string(),
            "features.plugins=false".to_string(),
            "mcp_servers.orchestrate.default_tools_approval_mode=\"approve\"".to_string(),
            format!("mcp_servers.orchestrate.command={}", toml_str(BIN)),
            format!(
                "mcp_servers.orchestrate.args=[\"-C\", {}, \"mcp\"]",
                toml_str(&p.root().display().to_string())
            ),
        ];
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["exec", "--json", "--skip-git-repo-check", "-m", "gpt-test"]);
        for o in &overrides {
            cmd.arg("-c").arg(o);
        }
        let mut child = cmd
            .arg("Queue two tasks, the second after the first, and tell me when both are done.")
            .current_dir(p.root())
            .env("HOME", home.path())
            .env("CODEX_HOME", &codex_home)
            .env("ORCH_API_KEY", "test-key")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run codex");
        let status = wait_child(&mut child, LIMIT);
        if status.is_none() {
            let _ = child.kill();
        }
        let out = child.wait_with_output().expect("output");
        let said = format!(
            "{status:?}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(status.is_some_and(|s| s.success()), "{said}");
        assert!(said.contains("Both tasks finished."), "{said}");
        // Codex offered the model every tool it loaded from the server, in its namespace.
        let first: Value = server
            .requests()
            .iter()
            .find(|(m, _, _)| m == "POST")
            .and_then(|(_, _, b)| serde_json::from_str(b).ok())
            .expect("a request");
        let namespace = first["tools"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["name"] == "mcp__orchestrate"))
            .unwrap_or_else(|| panic!("no mcp__orchestrate namespace: {}", first["tools"]));
        let mut offered: Vec<&str> = namespace["tools"]
            .as_array()
            .expect("tools")
            .iter()
            .filter_map(|t| t["name"].as_str())
            .collect();
        offered.sort();
        assert_eq!(offered, TOOLS);
        let results = tool_results(&server);
        assert_two_tasks_done(
            &p,
            &results,
            "mcp__orchestrate.add_task",
            "mcp__orchestrate.wait_for_task",
            "via-codex",
        );
        assert!(sup.stop().success(), "{}", sup.output());
    }
}
