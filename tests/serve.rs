//! `orchestrate serve`: the JSON API, the event stream and `/metrics` against a real supervisor and
//! real files, and the token rules. HTTP is spoken over a plain `TcpStream` so the test sees exactly
//! what goes over the wire (status lines, `id:` fields of the event stream).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SECRET: (&str, &str) = ("ORCH_SERVE_SECRET", "serve-secret-5f4e3d2c1b");

/// A running `orchestrate serve`, stopped when dropped.
struct Server {
    child: Child,
    addr: String,
    /// What it printed after the address line (a generated token's lines).
    lines: Vec<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `serve` with `args` and read the address it bound from its first line.
fn serve(p: &Project, args: &[&str], extra_lines: usize) -> Server {
    let (child, addr, lines) = spawn_serve(p, args, SECRET, extra_lines);
    Server { child, addr, lines }
}

struct Response {
    status: u16,
    head: String,
    body: String,
}

impl Response {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request, `Connection: close`, read to the end (bounded by a read timeout).
fn request(addr: &str, method: &str, path: &str, headers: &[&str], body: &str) -> Response {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("set a read timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for h in headers {
        req.push_str(&format!("{h}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .expect("status")
        .parse()
        .expect("code");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Response {
        status,
        head: head.to_string(),
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").expect("chunk size");
        let n = usize::from_str_radix(size.trim(), 16).expect("hex size");
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}

fn get(addr: &str, path: &str) -> Response {
    request(addr, "GET", path, &[], "")
}

/// Read server-sent events from `path` until `enough` says so (bounded): each as (id, data).
fn events(
    addr: &str,
    path: &str,
    last_event_id: Option<i64>,
    mut enough: impl FnMut(&[(i64, serde_json::Value)]) -> bool,
) -> Vec<(i64, serde_json::Value)> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("set a read timeout");
    let last = last_event_id
        .map(|n| format!("Last-Event-ID: {n}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{last}\r\n"
    )
    .expect("send");
    let mut reader = BufReader::new(s);
    let mut got = Vec::new();
    let (mut id, mut data) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !enough(&got) {
        assert!(Instant::now() < deadline, "events so far: {got:?}");
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => panic!("event stream ended; so far: {got:?}"),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(e) => panic!("reading events: {e}"),
        }
        let line = line.trim_end();
        if let Some(v) = line.strip_prefix("id:") {
            id = v.trim().parse::<i64>().ok();
        } else if let Some(v) = line.strip_prefix("data:") {
            data = serde_json::from_str(v.trim()).ok();
        } else if line.is_empty()
            && let (Some(i), Some(d)) = (id.take(), data.take())
        {
            got.push((i, d));
        }
    }
    got
}

fn config() -> String {
    test_config("").replace(
        "security:\n  env_allow: [PATH, HOME]",
        &format!(
            "security:\n  env_allow: [PATH, HOME, {0}]\n  secrets: [{0}]",
            SECRET.0
        ),
    )
}

fn states_of(evs: &[(i64, serde_json::Value)], id: &str) -> Vec<String> {
    evs.iter()
        .filter(|(_, e)| e["task_id"] == id)
        .map(|(_, e)| e["state"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn every_endpoint_against_a_running_supervisor() {
    let p = Project::with_config(&config());
    let mut sup = p.start_with_env(&[SECRET]);
    let srv = serve(&p, &[], 0);
    let a = srv.addr.as_str();
    let mut bodies = Vec::new();

    // Written through the API, run by the supervisor; its description carries a secret.
    let add = request(
        a,
        "POST",
        "/api/v1/tasks",
        &[],
        &format!(
            r#"{{"description": "say hi {}\n@fake print=done-by-fake"}}"#,
            SECRET.1
        ),
    );
    assert_eq!(add.status, 201, "{}", add.body);
    let id = add.json()["id"].as_str().expect("an id").to_string();
    wait_for(
        "the added task to complete",
        Duration::from_secs(60),
        || get(a, &format!("/api/v1/tasks/{id}")).json()["state"] == "completed",
    );
    assert!(
        p.path(&format!("tasks/completed/{id}.yaml")).exists(),
        "the task file went through the spool"
    );
    let shown = get(a, &format!("/api/v1/tasks/{id}"));
    assert_eq!(shown.status, 200);
    assert!(
        shown.json()["output"]
            .as_str()
            .unwrap_or_default()
            .contains("done-by-fake"),
        "{}",
        shown.body
    );
    assert!(shown.json()["result"].is_object(), "{}", shown.body);
    assert!(
        !shown.json()["attempts"]
            .as_array()
            .expect("attempts")
            .is_empty()
    );
    bodies.push(shown.body);

    // The event stream from the beginning: the task's transitions in order.
    let from_start = events(a, "/api/v1/events?since=0", None, |got| {
        states_of(got, &id).last().map(String::as_str) == Some("completed")
    });
    let states = states_of(&from_start, &id);
    assert_eq!(
        states.first().map(String::as_str),
        Some("pending"),
        "{states:?}"
    );
    assert!(states.contains(&"running".to_string()), "{states:?}");
    let seqs: Vec<i64> = from_start.iter().map(|(s, _)| *s).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "ids ascend: {seqs:?}");
    for (seq, e) in &from_start {
        assert_eq!(
            e["seq"].as_i64(),
            Some(*seq),
            "the event id is the mirror's sequence number"
        );
    }
    // Reconnecting after the first event gets exactly the rest.
    let first = from_start[0].0;
    let rest = events(a, "/api/v1/events", Some(first), |got| {
        got.len() >= from_start.len() - 1
    });
    assert_eq!(
        rest.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        seqs[1..].to_vec(),
        "Last-Event-ID resumes after that event"
    );

    // Lists and filters.
    let listed = get(a, "/api/v1/tasks?state=completed&agent=fake");
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert!(
        listed
            .json()
            .as_array()
            .expect("a list")
            .iter()
            .any(|t| t["id"] == id.as_str())
    );
    assert_eq!(
        get(a, &format!("/api/v1/tasks?after={id}")).json(),
        serde_json::json!([])
    );
    let bad = get(a, "/api/v1/tasks?state=sleeping");
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["error"]
            .as_str()
            .unwrap_or_default()
            .contains("sleeping")
    );
    assert_eq!(get(a, "/api/v1/tasks/task_999").status, 404);
    bodies.push(listed.body);

    let status = get(a, "/api/v1/status");
    assert_eq!(status.status, 200);
    assert_eq!(status.json()["counts"]["completed"], 1, "{}", status.body);
    assert_eq!(
        status.json()["supervisors"].as_array().map(Vec::len),
        Some(1)
    );
    bodies.push(status.body);
    let agents = get(a, "/api/v1/agents");
    assert_eq!(agents.status, 200);
    assert_eq!(agents.json()[0]["name"], "fake");
    assert_eq!(agents.json()[0]["completed"], 1, "{}", agents.body);
    bodies.push(agents.body);

    // A running task: its log so far, then cancelled through the API, then retried.
    let add = request(
        a,
        "POST",
        "/api/v1/tasks",
        &[],
        r#"{"description": "@fake ticks=100:0.1", "max_retries": 0}"#,
    );
    let slow = add.json()["id"].as_str().expect("an id").to_string();
    wait_for("its log to show ticks", Duration::from_secs(60), || {
        let r = get(a, &format!("/api/v1/tasks/{slow}/log"));
        r.status == 200 && r.body.contains("tick 2")
    });
    // `?follow=1` sends the log as it grows and ends with the attempt (the cancel below).
    let before = get(a, &format!("/api/v1/tasks/{slow}/log")).body;
    let follower = {
        let (a, slow) = (a.to_string(), slow.clone());
        std::thread::spawn(move || get(&a, &format!("/api/v1/tasks/{slow}/log?follow=1")))
    };
    assert_eq!(
        get(a, &format!("/api/v1/tasks/{slow}/log?follow=yes")).status,
        400
    );
    std::thread::sleep(Duration::from_millis(1500));
    let cancel = request(a, "POST", &format!("/api/v1/tasks/{slow}/cancel"), &[], "");
    assert_eq!(cancel.status, 200, "{}", cancel.body);
    let followed = follower.join().expect("the follower ends with the attempt");
    assert_eq!(followed.status, 200);
    assert!(followed.body.starts_with(&before), "{}", followed.body);
    assert!(
        followed.body.matches("tick ").count() > before.matches("tick ").count() + 5,
        "the log grew while followed:\n{}",
        followed.body
    );
    bodies.push(followed.body);
    assert_eq!(
        get(a, &format!("/api/v1/tasks/{slow}")).json()["state"],
        "failed"
    );
    assert_eq!(
        get(a, &format!("/api/v1/tasks/{slow}/log")).status,
        400,
        "not running any more"
    );
    let again = request(a, "POST", &format!("/api/v1/tasks/{slow}/cancel"), &[], "");
    assert_eq!(again.status, 400, "{}", again.body);
    let retry = request(a, "POST", &format!("/api/v1/tasks/{slow}/retry"), &[], "");
    assert_eq!(retry.status, 200, "{}", retry.body);
    assert_eq!(retry.json()["state"], "pending");
    wait_for("the retried task to run", Duration::from_secs(60), || {
        get(a, &format!("/api/v1/tasks/{slow}")).json()["state"] == "running"
    });
    request(a, "POST", &format!("/api/v1/tasks/{slow}/cancel"), &[], "");
    // Newest change first: the task just cancelled, then the first one.
    let newest = get(a, "/api/v1/tasks?order=newest");
    let ids: Vec<_> = newest
        .json()
        .as_array()
        .expect("a list")
        .iter()
        .map(|t| t["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(ids, [slow.clone(), id.clone()], "{}", newest.body);
    let bad = get(a, "/api/v1/tasks?order=sideways");
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("sideways"), "{}", bad.body);

    // Bad input is named.
    let bad = request(
        a,
        "POST",
        "/api/v1/tasks",
        &[],
        r#"{"description": "x", "agent": "nobody"}"#,
    );
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["error"]
            .as_str()
            .unwrap_or_default()
            .contains("nobody")
    );
    let bad = request(a, "POST", "/api/v1/tasks", &[], r#"{"descripton": "x"}"#);
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["error"]
            .as_str()
            .unwrap_or_default()
            .contains("descripton")
    );

    // Metrics, parsed as the Prometheus text format.
    let m = get(a, "/metrics");
    assert_eq!(m.status, 200);
    let lines = m.body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("the Prometheus text format");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no sample {name} {labels:?} in\n{}", m.body));
        match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} is not a number"),
        }
    };
    assert_eq!(value("orchestrate_tasks", &[("state", "completed")]), 1.0);
    assert!(
        value(
            "orchestrate_task_transitions_total",
            &[("state", "completed"), ("agent", "fake")]
        ) >= 1.0
    );
    assert_eq!(value("orchestrate_agent_slots", &[("agent", "fake")]), 8.0);
    assert_eq!(value("orchestrate_supervisors", &[]), 1.0);
    assert!(
        value(
            "orchestrate_agent_attempts_total",
            &[("agent", "fake"), ("outcome", "completed")]
        ) >= 1.0
    );
    // Histograms from the events: at least the first task waited, then ran.
    for name in [
        "orchestrate_attempt_duration_seconds",
        "orchestrate_queue_wait_seconds",
    ] {
        let observed = scrape
            .samples
            .iter()
            .find_map(|s| match &s.value {
                prometheus_parse::Value::Histogram(b) if s.metric == name => {
                    b.iter().map(|c| c.count).reduce(f64::max)
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("no histogram {name} in\n{}", m.body));
        assert!(observed >= 2.0, "{name}: {observed} observations");
    }
    bodies.push(m.body);

    for b in &bodies {
        assert!(!b.contains(SECRET.1), "a secret was served: {b}");
    }
    sup.stop();
}

#[test]
fn token_rules() {
    let p = Project::with_config(&config());
    // Anything but loopback needs a token, refused before binding.
    let r = p.run(&["serve", "--listen", "0.0.0.0:0"]);
    r.assert_code(2);
    assert!(r.stderr().contains("--token"), "{}", r.stderr());

    let srv = serve(&p, &["--generate-token"], 2);
    let token = srv.lines[0]
        .strip_prefix("token (shown once): ")
        .expect("the token line")
        .to_string();
    let a = srv.addr.as_str();
    let r = get(a, "/api/v1/status");
    assert_eq!(r.status, 401);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or_default()
            .contains("token")
    );
    assert_eq!(
        request(a, "POST", "/api/v1/tasks", &[], r#"{"description": "x"}"#).status,
        401
    );
    assert_eq!(get(a, "/metrics").status, 401);
    let bearer = format!("Authorization: Bearer {token}");
    assert_eq!(
        request(a, "GET", "/api/v1/status", &[&bearer], "").status,
        200
    );
    assert_eq!(
        request(
            a,
            "GET",
            "/api/v1/status",
            &["Authorization: Bearer nope"],
            ""
        )
        .status,
        401
    );
    // The printed link sets a cookie that lets a browser in.
    let link = get(a, &format!("/api/v1/status?token={token}"));
    assert_eq!(link.status, 200);
    let cookie = link
        .head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .expect("a cookie")
        .split(';')
        .next()
        .expect("name=value")
        .to_string();
    assert_eq!(
        request(
            a,
            "GET",
            "/api/v1/agents",
            &[&format!("Cookie: {cookie}")],
            ""
        )
        .status,
        200
    );
    // Only its hash is kept.
    let stored = p.read(".orchestrate/serve-token.sha256");
    assert!(
        !stored.contains(&token) && stored.trim().len() == 64,
        "{stored}"
    );
    drop(srv);

    // Read-only with a token: a write without it is 401 (who asks comes first), with it 403.
    let ro = serve(&p, &["--read-only", "--token", "t0ken"], 0);
    let r = request(
        &ro.addr,
        "POST",
        "/api/v1/tasks",
        &[],
        r#"{"description": "x"}"#,
    );
    assert_eq!(r.status, 401);
    let r = request(
        &ro.addr,
        "POST",
        "/api/v1/tasks",
        &["Authorization: Bearer t0ken"],
        r#"{"description": "x"}"#,
    );
    assert_eq!(r.status, 403);
    drop(ro);

    let ro = serve(&p, &["--read-only"], 0);
    let r = request(
        &ro.addr,
        "POST",
        "/api/v1/tasks",
        &[],
        r#"{"description": "x"}"#,
    );
    assert_eq!(r.status, 403);
    assert!(p.tasks_in("pending").is_empty(), "nothing written");
    assert_eq!(get(&ro.addr, "/api/v1/status").status, 200);
}

/// `start --serve ADDR` answers the API beside the supervisor in one process, and stops with it; an
/// address it may not use stops the start before the supervisor begins.
#[test]
fn start_serve_answers_beside_the_supervisor() {
    let p = Project::with_config(&config());
    let refused = p.run(&["start", "--serve", "0.0.0.0:0"]);
    refused.assert_code(2);
    assert!(
        refused.stderr().contains("not a loopback address"),
        "{}",
        refused.stderr()
    );
    assert!(
        !p.path(".orchestrate/instances").exists() || p.files(".orchestrate/instances").is_empty(),
        "no supervisor ran"
    );
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
    wait_for("it says where it serves", Duration::from_secs(15), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        addr = text
            .lines()
            .find_map(|l| l.split("serving    http://").nth(1))
            .unwrap_or_default()
            .trim()
            .to_string();
        !addr.is_empty() && text.contains("watching")
    });
    p.drop_task("one.yaml", "description: \"@fake\"\n");
    wait_for(
        "the task completes, seen through the API",
        Duration::from_secs(60),
        || get(&addr, "/api/v1/tasks/one").json()["state"] == "completed",
    );
    assert_eq!(get(&addr, "/").status, 200, "the dashboard");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_child(&mut child, Duration::from_secs(30)).expect("exits on SIGTERM");
    assert!(
        status.success(),
        "{status:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        TcpStream::connect(&addr).is_err(),
        "the server stopped with it"
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("completed  one"), "{text}");
}

/// Spend against budget through the API and `/metrics`: an `openai` agent priced at a dollar a
/// token (the model server reports 11 + 7 tokens, so $18 an attempt) within its own $20 a day, but
/// over `orchestrator.budget`'s 10 tokens a day, which pauses every agent: the next task waits,
/// saying why.
#[test]
fn budgets_show_in_the_api_and_the_metrics() {
    use common::model_server::{Api, ModelServer};
    let server = ModelServer::start();
    let (zone, label) = noon_zone();
    let config = format!(
        "orchestrator:\n  timezone: \"{zone}\"\n  settle_ms: 100\n  rescan_seconds: 2\n  kill_grace_seconds: 1\n  budget: {{daily_tokens: 10}}\nagents:\n  local:\n    kind: openai\n    base_url: {}/v1\n    model: local-model\n    prices: {{input_per_mtok: 1000000, output_per_mtok: 1000000}}\n    budget: {{daily_usd: 20}}\nrouting:\n  fallback: [local]\ntask_queue:\n  max_retries: 0\nsecurity:\n  env_allow: [PATH]\n",
        server.url()
    );
    let p = Project::with_config(&config);
    let mut sup = p.start();
    p.drop_task("one.yaml", "description: Plan\n");
    wait_for("one to complete", Duration::from_secs(60), || {
        p.tasks_in("completed").contains(&"one".to_string())
    });
    p.drop_task("two.yaml", "description: Plan again\n");
    let srv = serve(&p, &[], 0);
    let a = srv.addr.as_str();
    let note = format!(
        "agent local: budget of all agents (orchestrator.budget): 18 of 10 tokens today, resets at 00:00 {label}"
    );
    wait_for(
        "two to wait for the budget",
        Duration::from_secs(30),
        || {
            get(a, "/api/v1/tasks/two").json()["note"]
                .as_str()
                .is_some_and(|n| n.contains(&note))
        },
    );
    let agents = get(a, "/api/v1/agents").json();
    let local = agents
        .as_array()
        .and_then(|v| v.iter().find(|x| x["name"] == "local"))
        .expect("local listed")
        .clone();
    assert_eq!(local["budget"]["today"]["usd"], 18.0, "{local}");
    assert_eq!(local["budget"]["limits"]["daily_usd"], 20.0, "{local}");
    assert!(
        local["budget"]["paused"]
            .as_str()
            .is_some_and(|r| r
                .starts_with("budget of all agents (orchestrator.budget): 18 of 10 tokens today")),
        "{local}"
    );
    let status = get(a, "/api/v1/status").json();
    let budgets = status["budgets"].as_array().expect("budgets").clone();
    assert_eq!(budgets.len(), 2, "{status}");
    assert_eq!(budgets[0]["scope"], "all");
    assert_eq!(budgets[0]["today"]["tokens"], 18);
    assert_eq!(
        budgets[0]["paused"],
        format!("budget: 18 of 10 tokens today, resets at 00:00 {label}")
    );
    assert_eq!(budgets[1]["scope"], "local");
    assert_eq!(budgets[1]["today"]["usd"], 18.0);

    let m = get(a, "/metrics");
    assert_eq!(m.status, 200);
    let lines = m.body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("the Prometheus text format");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no sample {name} {labels:?} in\n{}", m.body));
        match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} is not a number"),
        }
    };
    let day = |scope| [("scope", scope), ("window", "day")];
    assert_eq!(value("orchestrate_budget_spent_usd", &day("local")), 18.0);
    assert_eq!(value("orchestrate_budget_limit_usd", &day("local")), 20.0);
    assert_eq!(value("orchestrate_budget_spent_tokens", &day("all")), 18.0);
    assert_eq!(value("orchestrate_budget_limit_tokens", &day("all")), 10.0);
    assert_eq!(value("orchestrate_budget_paused", &[("scope", "all")]), 1.0);
    // Within its own limit, the agent is paused all the same by the one over all agents.
    assert_eq!(
        value("orchestrate_budget_paused", &[("scope", "local")]),
        1.0
    );
    assert_eq!(server.conversations(Api::Chat), 1);
    assert!(sup.stop().success(), "{}", sup.output());
}

mod postgres {
    use super::*;

    /// With `--database-url` the server reads PostgreSQL alone (no folder beside it) and refuses writes.
    #[test]
    fn serves_from_postgres_alone_and_read_only() {
        let s = PgSchema::new("serve_remote");
        let p = Project::with_config(&pg_config(&s.url(), &s.name));
        p.drop_task("r1.yaml", "description: \"@fake print=ok\"\n");
        p.drop_task("r2.yaml", "description: \"@fake exit=4\"\nmax_retries: 0\n");
        p.run(&["start", "--once"]).assert_code(0);
        // A folder holding only a config that names the schema.
        let elsewhere = config_only_folder(&s.name);
        let mut child = std::process::Command::new(BIN)
            .arg("-C")
            .arg(elsewhere.path())
            .args([
                "--database-url",
                &pg_url(),
                "serve",
                "--listen",
                "127.0.0.1:0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn serve");
        let mut first = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut first)
            .expect("a line");
        let srv = Server {
            child,
            addr: first
                .trim()
                .strip_prefix("listening on http://")
                .unwrap_or_else(|| panic!("unexpected first line: {first}"))
                .to_string(),
            lines: vec![],
        };
        let a = srv.addr.as_str();
        let st = get(a, "/api/v1/status").json();
        assert_eq!(st["source"], "postgres");
        assert_eq!(st["counts"]["completed"], 1);
        assert_eq!(st["counts"]["failed"], 1);
        let failed = get(a, "/api/v1/tasks?state=failed").json();
        assert_eq!(failed[0]["id"], "r2");
        let shown = get(a, "/api/v1/tasks/r2").json();
        assert_eq!(shown["attempts"][0]["exit_code"], 4, "{shown}");
        assert_eq!(get(a, "/api/v1/tasks/nope").status, 404);
        let evs = events(a, "/api/v1/events?since=0", None, |got| {
            states_of(got, "r2").last().map(String::as_str) == Some("failed")
        });
        assert_eq!(
            states_of(&evs, "r2").first().map(String::as_str),
            Some("pending")
        );
        let m = get(a, "/metrics");
        prometheus_parse::Scrape::parse(m.body.lines().map(|l| Ok(l.to_string())))
            .expect("the Prometheus text format");
        assert!(
            m.body.contains("orchestrate_tasks{state=\"completed\"} 1"),
            "{}",
            m.body
        );
        let w = request(a, "POST", "/api/v1/tasks", &[], r#"{"description": "x"}"#);
        assert_eq!(w.status, 403, "{}", w.body);
        assert_eq!(
            request(a, "POST", "/api/v1/tasks/r2/retry", &[], "").status,
            403
        );
        assert!(
            !elsewhere.path().join(".orchestrate").exists(),
            "reading PostgreSQL creates no local state"
        );
    }
}

/// The dashboard in a real browser: Chromium, headless, driven over the Chrome DevTools Protocol.
mod chromium {
    use super::*;
    use std::net::TcpStream;
    use std::process::Command;

    /// A headless Chromium and one page of it, killed when dropped (a failing test included).
    struct Browser {
        child: Child,
        ws: tungstenite::WebSocket<TcpStream>,
        session: String,
        next: u64,
        _profile: tempfile::TempDir,
    }

    impl Drop for Browser {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Browser {
        fn launch() -> Browser {
            assert_grouped("Chromium", None, "chromium");
            let profile = tempfile::tempdir().expect("a profile folder");
            let mut child = Command::new("chromium")
                .args([
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--remote-debugging-port=0",
                    "--window-size=1280,1100",
                ])
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg("about:blank")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run chromium ({e}): this test drives the dashboard in it. tools/test \
                         skips the tests of modules named chromium when it is missing (and fails under CI)"
                    )
                });
            let stderr = child.stderr.take().expect("stderr");
            let (tx, rx) = std::sync::mpsc::channel();
            // Drained to the end, so Chromium never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(url) = line.split("DevTools listening on ").nth(1) {
                        let _ = tx.send(url.trim().to_string());
                    }
                }
            });
            let url = match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(url) => url,
                Err(_) => {
                    let _ = child.kill();
                    panic!("chromium did not print its DevTools address within 60 s");
                }
            };
            let hostport = url
                .strip_prefix("ws://")
                .and_then(|r| r.split('/').next())
                .expect("a ws:// address");
            let stream = TcpStream::connect(hostport).expect("connect to DevTools");
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .expect("a read timeout");
            let (ws, _) = tungstenite::client(url.as_str(), stream).expect("a DevTools websocket");
            let mut b = Browser {
                child,
                ws,
                session: String::new(),
                next: 0,
                _profile: profile,
            };
            let target = b.call(
                "Target.createTarget",
                serde_json::json!({"url": "about:blank"}),
            );
            let attached = b.call(
                "Target.attachToTarget",
                serde_json::json!({"targetId": target["targetId"], "flatten": true}),
            );
            b.session = attached["sessionId"]
                .as_str()
                .expect("a session")
                .to_string();
            b
        }

        /// One command, its result (events in between are passed over).
        fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
            self.next += 1;
            let mut msg = serde_json::json!({"id": self.next, "method": method, "params": params});
            if !self.session.is_empty() {
                msg["sessionId"] = self.session.clone().into();
            }
            self.ws
                .send(tungstenite::Message::text(msg.to_string()))
                .expect("send to DevTools");
            loop {
                let m = self.ws.read().expect("a DevTools message");
                let Ok(text) = m.to_text() else { continue };
                let v: serde_json::Value = serde_json::from_str(text).expect("DevTools JSON");
                if v["id"] == self.next {
                    if let Some(e) = v.get("error") {
                        panic!("{method}: {e}");
                    }
                    return v["result"].clone();
                }
            }
        }

        /// The value of a JavaScript expression in the page.
        fn eval(&mut self, expr: &str) -> serde_json::Value {
            let r = self.call(
                "Runtime.evaluate",
                serde_json::json!({"expression": expr, "returnByValue": true}),
            );
            if let Some(e) = r.get("exceptionDetails") {
                panic!("{expr}: {e}");
            }
            r["result"]["value"].clone()
        }

        fn wait(&mut self, what: &str, expr: &str) {
            let deadline = Instant::now() + Duration::from_secs(60);
            while self.eval(expr) != serde_json::Value::Bool(true) {
                if Instant::now() >= deadline {
                    let text = self.eval("document.body.innerText");
                    panic!("timed out after 60 s waiting for: {what}\nthe page shows:\n{text}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }

        /// Save a PNG of the page under target/test-artifacts and say where.
        fn screenshot(&mut self, name: &str) -> std::path::PathBuf {
            use base64::Engine;
            let shot = self.call(
                "Page.captureScreenshot",
                serde_json::json!({"format": "png", "captureBeyondViewport": true}),
            );
            let png = base64::engine::general_purpose::STANDARD
                .decode(shot["data"].as_str().expect("image data"))
                .expect("base64");
            assert!(png.starts_with(b"\x89PNG"), "a PNG");
            let dir =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
            std::fs::create_dir_all(&dir).expect("target/test-artifacts");
            let path = dir.join(name);
            std::fs::write(&path, png).expect("write the screenshot");
            println!("screenshot: {}", path.display());
            path
        }
    }

    #[test]
    fn dashboard_shows_a_dropped_task_run_then_complete_without_a_reload() {
        let p = Project::with_config(&config());
        let mut sup = p.start_with_env(&[SECRET]);
        let token = "dashboard-token-7c1e";
        let srv = serve(&p, &["--token", token], 0);
        let mut b = Browser::launch();
        b.call("Page.enable", serde_json::json!({}));
        b.call(
            "Page.navigate",
            serde_json::json!({"url": format!("http://{}/?token={token}", srv.addr)}),
        );
        // The token came once in the link; the cookie it set carries the page's requests and its
        // event stream from then on.
        b.wait(
            "the event stream to connect",
            "document.getElementById('conn')?.dataset.live === '1'",
        );
        b.wait(
            "the agents table",
            "!!document.querySelector('#agents tr[data-agent=\"fake\"]')",
        );
        assert_eq!(
            b.eval("location.search"),
            "",
            "the token left the address bar"
        );
        b.eval("window.testMarker = 'the same page'");

        let release = p.path("release-dash");
        p.drop_task(
            "dash.yaml",
            &format!(
                "description: |\n  from the dashboard test <b id=injected>{}</b>\n  @fake wait-for={} print=dashboard-done\n",
                SECRET.1,
                release.display()
            ),
        );
        let row =
            "document.querySelector('#tasks tr[data-id=\"dash\"] [data-state]')?.dataset.state";
        b.wait(
            "the dropped task to show as running",
            &format!(
                "{row} === 'running' && !!document.querySelector('#running tr[data-id=\"dash\"]')"
            ),
        );
        // The running task is selected: its detail says so.
        b.wait(
            "the running task's detail",
            "document.getElementById('detail-state')?.dataset.state === 'running'",
        );
        b.screenshot("dashboard-running.png");

        std::fs::write(&release, "").expect("release the task");
        b.wait(
            "the task to show as completed",
            &format!(
                "{row} === 'completed' && !document.querySelector('#running tr[data-id]') \
                 && document.querySelector('#counts [data-count=\"completed\"]')?.textContent === 'completed 1'"
            ),
        );
        b.wait(
            "the detail to show its output",
            "document.getElementById('detail-state')?.dataset.state === 'completed' \
             && document.getElementById('log').textContent.includes('dashboard-done')",
        );
        assert_eq!(b.eval("window.testMarker"), "the same page", "no reload");
        assert_eq!(b.eval("window.dashboardLoads"), 1, "loaded once");
        let text = b.eval("document.body.innerText").to_string();
        assert!(!text.contains(SECRET.1), "a secret reached the page");
        // What the server sends is shown as text, never parsed as markup.
        assert!(text.contains("<b id=injected>"), "{text}");
        assert_eq!(b.eval("document.getElementById('injected') === null"), true);
        b.screenshot("dashboard.png");
        // A phone's screen: one column, nothing wider than the screen.
        b.call(
            "Emulation.setDeviceMetricsOverride",
            serde_json::json!({"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true}),
        );
        b.wait(
            "one column on a narrow screen",
            "document.documentElement.scrollWidth <= 390 \
             && getComputedStyle(document.querySelector('main')).gridTemplateColumns.split(' ').length === 1",
        );
        b.screenshot("dashboard-phone.png");
        drop(b);
        sup.stop();
    }
}
