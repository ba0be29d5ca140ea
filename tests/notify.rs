//! Notifications end to end: the real `orchestrate start` with the fake agent, and a webhook
//! receiver on 127.0.0.1 in this file that answers what each test scripts, records every request,
//! and checks nothing itself (the tests do: the HMAC with the `hmac` crate, the event's fields).

mod common;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hmac::{KeyInit, Mac};

/// One request as the receiver read it.
#[derive(Debug, Clone)]
struct Got {
    path: String,
    /// Names lower-cased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The status it was answered with.
    answered: u16,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }
}

#[derive(Default)]
struct Script {
    /// Statuses for the next requests, in order; then `default`.
    next: VecDeque<u16>,
    default: u16,
    got: Vec<Got>,
    /// Requests are read and recorded, but not answered while this holds (at most 60 s).
    hold: bool,
}

/// A webhook receiver: a plain HTTP/1.1 server on 127.0.0.1 (one connection at a time,
/// `Connection: close`).
struct Receiver {
    port: u16,
    script: Arc<Mutex<Script>>,
}

impl Receiver {
    fn start(statuses: &[u16], default: u16) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let script = Arc::new(Mutex::new(Script {
            next: statuses.iter().copied().collect(),
            default,
            got: vec![],
            hold: false,
        }));
        let s = script.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let mut reader = BufReader::new(conn);
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut headers = Vec::new();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.trim_end().split_once(':') {
                        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                    }
                }
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0; len];
                if reader.read_exact(&mut body).is_err() {
                    continue;
                }
                let status = {
                    let mut sc = s.lock().expect("lock");
                    let status = sc.next.pop_front().unwrap_or(sc.default);
                    sc.got.push(Got {
                        path,
                        headers,
                        body,
                        answered: status,
                    });
                    status
                };
                let held = std::time::Instant::now();
                while s.lock().expect("lock").hold && held.elapsed() < Duration::from_secs(60) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let text = if status == 200 {
                    "ok thanks\nsecond line"
                } else {
                    "receiver broken\nsecond line"
                };
                let mut conn = reader.into_inner();
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
                let _ = conn.flush();
            }
        });
        Receiver { port, script }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn got(&self) -> Vec<Got> {
        self.script.lock().expect("lock").got.clone()
    }

    fn answer(&self, status: u16) {
        self.script.lock().expect("lock").default = status;
    }

    fn hold(&self, hold: bool) {
        self.script.lock().expect("lock").hold = hold;
    }

    /// Wait until a request satisfies `f`; returns the requests seen by then.
    #[track_caller]
    fn wait(&self, what: &str, f: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        wait_for(what, Duration::from_secs(60), || f(&self.got()));
        self.got()
    }
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("any key length");
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn failing_task(p: &Project, id: &str) {
    p.drop_task(
        &format!("{id}.yaml"),
        "description: \"@fake stderr=kaput exit=3\"\nmax_retries: 0\n",
    );
}

/// Rows of the outbox: (channel, event id, state, tries).
fn outbox(p: &Project) -> Vec<(String, String, String, u32)> {
    let db = p.db();
    let mut st = db
        .prepare(
            "SELECT channel, event_id, state, tries FROM notify_outbox ORDER BY channel, rowid",
        )
        .expect("prepare");
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .expect("query")
        .map(|r| r.expect("row"))
        .collect()
}

#[test]
fn a_failed_task_is_posted_signed_with_the_event_fields() {
    let rx = Receiver::start(&[], 200);
    let p = Project::with_config(&test_config(&format!(
        "notify:\n  - name: hook\n    webhook:\n      url: {}\n      secret: \"${{HOOK_SECRET}}\"\n      headers: {{X-Extra: yes-please}}\n",
        rx.url("/hook")
    )));
    let mut sup = p.start_with_env(&[("HOOK_SECRET", "correct horse battery")]);
    p.drop_task(
        "broken.yaml",
        "description: \"@fake stderr=kaput exit=3\\nDeploy with correct horse battery\"\nmax_retries: 0\n",
    );
    let got = rx.wait("the failure's POST", |g| !g.is_empty());
    let req = &got[0];
    assert_eq!(req.path, "/hook");
    assert_eq!(req.answered, 200);
    let sig = req.header("x-orchestrate-signature").expect("signed");
    assert_eq!(
        sig,
        format!("sha256={}", hmac_hex("correct horse battery", &req.body))
    );
    assert_ne!(
        sig,
        format!("sha256={}", hmac_hex("another secret", &req.body)),
        "the signature depends on the secret"
    );
    assert_eq!(req.header("x-extra"), Some("yes-please"));
    assert_eq!(req.header("content-type"), Some("application/json"));
    let ev = req.json();
    assert_eq!(ev["kind"], "failed");
    assert_eq!(ev["task"]["id"], "broken");
    assert_eq!(ev["task"]["state"], "failed");
    assert_eq!(ev["agent"], "fake");
    assert!(
        ev["task"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("exited with code 3: kaput")),
        "{ev}"
    );
    assert!(
        ev["message"]
            .as_str()
            .expect("message")
            .contains("broken failed on fake")
    );
    let id = format!(
        "{}:broken:v{}",
        ev["host"].as_str().expect("host"),
        ev["task"]["version"]
    );
    assert_eq!(ev["id"], id.as_str());
    assert_eq!(req.header("x-orchestrate-event-id"), Some(id.as_str()));
    assert_eq!(req.header("x-orchestrate-event"), Some("failed"));
    // A variable the webhook names is a secret: redacted from what orchestrate writes and sends,
    // like an agent's key (the task's description quoted it).
    let body = String::from_utf8_lossy(&req.body).into_owned();
    assert!(
        !body.contains("correct horse battery") && body.contains("Deploy with ***"),
        "{body}"
    );
    wait_for("the delivery recorded", Duration::from_secs(10), || {
        outbox(&p) == vec![("hook".into(), id.clone(), "delivered".into(), 1)]
    });
    sup.stop();
}

#[test]
fn a_receiver_failing_three_times_gets_the_same_event_four_times_then_no_more() {
    let rx = Receiver::start(&[500, 500, 500], 200);
    let p = Project::with_config(&test_config(&format!(
        "notify:\n  - webhook: {{url: {}}}\n",
        rx.url("/")
    )));
    let _sup = p.start();
    failing_task(&p, "flaky");
    rx.wait("the first try", |g| !g.is_empty());
    // While it retries, `status` says so, with what the receiver answered (once the sender has
    // recorded the answer it read).
    wait_for("status to show the retry", Duration::from_secs(30), || {
        let st = p.run(&["status"]);
        st.assert_code(0);
        let out = st.stdout();
        out.contains("notify: webhook-0: failed")
            && out.contains("not delivered yet")
            && out.contains("HTTP 500 Internal Server Error: receiver broken")
    });
    let got = rx.wait("the fourth try, accepted", |g| {
        g.iter().any(|r| r.answered == 200)
    });
    assert_eq!(
        got.iter().map(|r| r.answered).collect::<Vec<_>>(),
        [500, 500, 500, 200]
    );
    let ids: Vec<_> = got
        .iter()
        .map(|r| r.header("x-orchestrate-event-id").expect("id").to_string())
        .collect();
    assert!(ids.iter().all(|i| i == &ids[0]), "{ids:?}");
    assert!(
        got.iter().all(|r| r.body == got[0].body),
        "the same body each time"
    );
    // Then no more: another event goes out after it, and the first is still at four.
    failing_task(&p, "later");
    let got = rx.wait("the next event", |g| g.len() >= 5);
    assert_eq!(got.len(), 5, "{got:?}");
    assert_eq!(got[4].json()["task"]["id"], "later");
    let rows = outbox(&p);
    assert_eq!(
        rows[0],
        ("webhook-0".into(), ids[0].clone(), "delivered".into(), 4)
    );
    let st = p.run(&["status"]);
    assert!(!st.stdout().contains("notify:"), "{}", st.stdout());
}

#[test]
fn an_event_undelivered_when_the_supervisor_is_killed_is_delivered_after_the_restart() {
    let rx = Receiver::start(&[], 500);
    let p = Project::with_config(&test_config(&format!(
        "notify:\n  - webhook: {{url: {}, preset: slack}}\n",
        rx.url("/slack")
    )));
    let mut sup = p.start();
    failing_task(&p, "crashy");
    rx.wait("a refused try", |g| !g.is_empty());
    sup.sigkill();
    let before = rx.got();
    assert!(before.iter().all(|r| r.answered == 500));
    rx.answer(200);
    let _sup = p.start();
    let got = rx.wait("the event, accepted after the restart", |g| {
        g.iter().any(|r| r.answered == 200)
    });
    let accepted = got.iter().find(|r| r.answered == 200).expect("accepted");
    assert_eq!(
        accepted.header("x-orchestrate-event-id"),
        before[0].header("x-orchestrate-event-id")
    );
    // The Slack preset: text a person reads.
    let text = accepted.json()["text"].as_str().expect("text").to_string();
    assert!(text.contains("crashy failed on fake"), "{text}");
    wait_for("the delivery recorded", Duration::from_secs(10), || {
        outbox(&p).iter().any(|r| r.2 == "delivered")
    });
}

#[test]
fn a_command_hook_gets_the_event_on_stdin_and_in_its_environment() {
    let p = Project::with_config(&test_config(
        "notify:\n  - name: script\n    command: \"cat > hook-event.json && printf '%s %s %s' \\\"$ORCHESTRATE_TASK_ID\\\" \\\"$ORCHESTRATE_STATE\\\" \\\"$ORCHESTRATE_EVENT\\\" > hook-env.txt.tmp && mv hook-env.txt.tmp hook-env.txt\"\n",
    ));
    let _sup = p.start();
    failing_task(&p, "hooked");
    wait_for("the hook's run", Duration::from_secs(60), || {
        p.path("hook-env.txt").exists()
    });
    assert_eq!(p.read("hook-env.txt"), "hooked failed failed");
    let ev: serde_json::Value =
        serde_json::from_str(&p.read("hook-event.json")).expect("the event as JSON");
    assert_eq!(ev["kind"], "failed");
    assert_eq!(ev["task"]["id"], "hooked");
    wait_for("the delivery recorded", Duration::from_secs(10), || {
        outbox(&p)
            .iter()
            .any(|r| r.0 == "script" && r.2 == "delivered")
    });
}

#[test]
fn on_and_filter_decide_which_channel_hears_of_what() {
    let rx = Receiver::start(&[], 200);
    let p = Project::with_config(&test_config(&format!(
        "notify:\n  - name: people\n    webhook: {{url: {}}}\n  - name: ci\n    on: [completed]\n    filter: {{labels: [ci]}}\n    webhook: {{url: {}}}\n",
        rx.url("/people"),
        rx.url("/ci")
    )));
    let _sup = p.start();
    p.drop_task("plain.yaml", "description: \"@fake print=done\"\n");
    p.drop_task(
        "labelled.yaml",
        "description: \"@fake print=done\"\nlabels: [ci, other]\n",
    );
    // After both, so its event comes after theirs: once it is through, theirs are decided.
    p.drop_task(
        "bad.yaml",
        "description: \"@fake exit=3\"\nmax_retries: 0\nlabels: [ci]\ndependencies: [plain, labelled]\n",
    );
    let got = rx.wait(
        "the failure (people) and the labelled completion (ci)",
        |g| g.iter().any(|r| r.path == "/people") && g.iter().any(|r| r.path == "/ci"),
    );
    let seen: Vec<(String, String, String)> = got
        .iter()
        .map(|r| {
            let e = r.json();
            (
                r.path.clone(),
                e["kind"].as_str().unwrap_or("").to_string(),
                e["task"]["id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    // Both channels' cursors are past every event: what is in the outbox is all they will get.
    let db = p.db();
    wait_for(
        "both cursors past the failure",
        Duration::from_secs(10),
        || {
            let last: i64 = db
                .query_row(
                    "SELECT max(seq) FROM task_events WHERE task_id = 'bad' AND state = 'failed'",
                    [],
                    |r| r.get(0),
                )
                .unwrap_or(i64::MAX);
            let min: i64 = db
                .query_row("SELECT min(task_seq) FROM notify_cursors", [], |r| r.get(0))
                .unwrap_or(0);
            min >= last
        },
    );
    let queued: Vec<(String, String)> = outbox(&p)
        .into_iter()
        .map(|(c, id, _, _)| (c, id))
        .collect();
    assert_eq!(queued.len(), 2, "{queued:?}");
    assert!(
        queued[0].0 == "ci" && queued[0].1.contains(":labelled:"),
        "{queued:?}"
    );
    assert!(
        queued[1].0 == "people" && queued[1].1.contains(":bad:"),
        "{queued:?}"
    );
    let mut seen = seen;
    seen.sort();
    let want: Vec<(String, String, String)> = vec![
        ("/ci".into(), "completed".into(), "labelled".into()),
        ("/people".into(), "failed".into(), "bad".into()),
    ];
    assert_eq!(seen, want);
}

#[test]
fn notify_test_reports_what_each_receiver_answered() {
    let ok = Receiver::start(&[], 200);
    let broken = Receiver::start(&[], 500);
    let p = Project::with_config(&test_config(&format!(
        "notify:\n  - name: phone\n    webhook: {{url: {}, preset: ntfy}}\n  - name: down\n    webhook: {{url: {}}}\n",
        ok.url("/mytopic"),
        broken.url("/x")
    )));
    let r = p.run(&["notify", "test", "phone"]);
    r.assert_code(0);
    assert_eq!(
        r.stdout().trim(),
        "phone: delivered: HTTP 200 OK: ok thanks"
    );
    let got = ok.got();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header("x-orchestrate-event"), Some("test"));
    assert_eq!(
        got[0].header("title"),
        Some("orchestrate: test notification")
    );
    assert!(String::from_utf8_lossy(&got[0].body).contains("this channel works"));
    assert!(broken.got().is_empty(), "only the channel named");
    let r = p.run(&["notify", "test"]);
    r.assert_code(1);
    assert!(
        r.stdout().contains("phone: delivered")
            && r.stdout()
                .contains("down: FAILED: HTTP 500 Internal Server Error: receiver broken"),
        "{}",
        r.stdout()
    );
    let r = p.run(&["notify", "test", "nosuch"]);
    r.assert_code(2);
    assert!(r.stderr().contains("no channel named `nosuch`") && r.stderr().contains("phone, down"));
    // Nothing listening: the error says where it could not connect.
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let q = Project::with_config(&test_config(&format!(
        "notify:\n  - command: [\"true\"]\n  - webhook: {{url: \"http://127.0.0.1:{port}/\"}}\n"
    )));
    let r = q.run(&["notify", "test"]);
    r.assert_code(1);
    assert!(
        r.stdout().contains("command-0: delivered: exit 0"),
        "{}",
        r.stdout()
    );
    assert!(
        r.stdout()
            .contains("webhook-1: FAILED: POST http://127.0.0.1"),
        "{}",
        r.stdout()
    );
}

#[test]
fn a_bad_channel_stops_the_start_naming_the_key() {
    let p = Project::with_config(&test_config(
        "notify:\n  - name: ok\n    command: [\"true\"]\n  - webhook: {url: \"ftp://example.com/x\"}\n",
    ));
    let r = p.run(&["start", "--once"]);
    r.assert_code(2);
    assert!(
        r.stderr().contains("notify[1].webhook.url") && r.stderr().contains("http:// or https://"),
        "{}",
        r.stderr()
    );
    let r = p.run(&["validate", "--check-config"]);
    assert_ne!(r.out.status.code(), Some(0));
    assert!(
        r.stdout().contains("notify[1].webhook.url")
            || r.stderr().contains("notify[1].webhook.url")
    );
}

#[test]
fn an_event_given_up_on_shows_in_status() {
    let rx = Receiver::start(&[], 503);
    let p = Project::with_config(&test_config(&format!(
        "notify:\n  - name: pager\n    give_up_minutes: 0.001\n    webhook: {{url: {}}}\n",
        rx.url("/")
    )));
    let _sup = p.start();
    failing_task(&p, "lost");
    wait_for("the event given up on", Duration::from_secs(60), || {
        outbox(&p).iter().any(|r| r.2 == "gave_up")
    });
    let st = p.run(&["status"]);
    assert!(
        st.stdout().contains("notify: pager: GAVE UP on failed")
            && st.stdout().contains(":lost:v")
            && st.stdout().contains("HTTP 503"),
        "{}",
        st.stdout()
    );
    let tries = rx.got().len();
    assert!(tries >= 1);
    let json = p.run(&["--json", "status"]).json();
    assert_eq!(json["notifications"][0]["state"], "gave_up");
    assert_eq!(json["notifications"][0]["channel"], "pager");
}

#[test]
fn a_new_channel_announces_no_history_and_start_once_sends_before_it_exits() {
    let rx = Receiver::start(&[], 200);
    let p = Project::new();
    failing_task(&p, "old");
    p.run(&["start", "--once"]).assert_code(0);
    assert_eq!(p.tasks_in("failed"), ["old"]);
    std::fs::write(
        p.path("config.yaml"),
        test_config(&format!("notify:\n  - webhook: {{url: {}}}\n", rx.url("/"))),
    )
    .expect("config");
    failing_task(&p, "new");
    // `--once` exits when the queue is done; its last event goes out before that.
    p.run(&["start", "--once"]).assert_code(0);
    let got = rx.got();
    let ids: Vec<_> = got
        .iter()
        .map(|r| r.json()["task"]["id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        ids,
        ["new"],
        "the failure from before the channel is history"
    );
}

#[test]
fn a_task_touching_a_review_path_is_announced_as_needing_review() {
    let rx = Receiver::start(&[], 200);
    let p = Project::with_config(&test_config(&format!(
        "notify:\n  - webhook: {{url: {}, preset: discord}}\n",
        rx.url("/")
    )));
    let _sup = p.start();
    p.drop_task(
        "deps.yaml",
        "description: \"@fake write=package.json:{}\"\n",
    );
    let got = rx.wait("the review event", |g| !g.is_empty());
    assert_eq!(
        got[0].header("x-orchestrate-event"),
        Some("review_required")
    );
    let content = got[0].json()["content"]
        .as_str()
        .expect("discord content")
        .to_string();
    assert!(
        content.contains("deps needs review") && content.contains("review_paths"),
        "{content}"
    );
}

#[test]
fn a_failure_the_mirror_never_recorded_before_a_crash_is_announced_after_the_restart() {
    let rx = Receiver::start(&[], 200);
    let p = Project::with_config(&test_config(&format!(
        "notify:\n  - webhook: {{url: {}}}\n",
        rx.url("/")
    )));
    // Killed right after the task's move to failed/ is durable, before the mirror hears of it.
    let mut sup = p.start_with_env(&[("ORCHESTRATE_CRASH_AT", "finish.after_fsync")]);
    failing_task(&p, "unrecorded");
    let mut child = sup.child.take().expect("running");
    wait_child(&mut child, Duration::from_secs(60)).expect("the supervisor killed itself");
    assert_eq!(p.tasks_in("failed"), ["unrecorded"]);
    let recorded: i64 = p
        .db()
        .query_row(
            "SELECT count(*) FROM task_events WHERE task_id = 'unrecorded' AND state = 'failed'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(recorded, 0, "the mirror write was lost with the process");
    assert!(rx.got().is_empty());
    // The reconciler finds the transition in the tree at the next start; the event goes out.
    let _sup = p.start();
    let got = rx.wait("the failure, after the restart", |g| !g.is_empty());
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].json()["task"]["id"], "unrecorded");
    assert_eq!(got[0].header("x-orchestrate-event"), Some("failed"));
}

#[test]
fn a_receiver_that_does_not_answer_holds_up_no_task() {
    let rx = Receiver::start(&[], 200);
    rx.hold(true);
    let p = Project::with_config(&test_config(&format!(
        "notify:\n  - webhook: {{url: {}}}\n    on: [failed, completed]\n",
        rx.url("/")
    )));
    let _sup = p.start();
    failing_task(&p, "first");
    rx.wait("the first event, read and not answered", |g| g.len() == 1);
    // The sender waits for an answer; the supervisor does not.
    p.drop_task("second.yaml", "description: \"@fake print=done\"\n");
    wait_for("the second task completed", Duration::from_secs(60), || {
        p.tasks_in("completed") == ["second"]
    });
    assert_eq!(rx.got().len(), 1, "still waiting for the first answer");
    rx.hold(false);
    let got = rx.wait("the second task's event", |g| g.len() == 2);
    assert_eq!(got[1].json()["task"]["id"], "second");
}
