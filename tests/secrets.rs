//! Secrets never reach anything orchestrate writes.
//!
//! A secret is the value of an environment variable named in one of three ways: by an agent's
//! `api_key_env`, in `security.secrets`, or as the conventional key variable of a configured agent's
//! kind. Agents of several kinds print those values in their answers, errors, stderr and session
//! ids, and one task's own description carries them; afterwards no file under the project (tree,
//! context, logs, state files, the SQLite mirror, the supervisor's log) and no row of the PostgreSQL
//! mirror may contain any of them. The one exception is the task file a person wrote: it keeps what
//! they wrote.
//!
//! The agents are small scripts that print each CLI's recorded output shape (see
//! `tests/fixtures/agents`) with the secrets spliced in: a real CLI chooses its own session ids, so
//! only a script can put a secret there.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// Named only by the claude agent's `api_key_env`.
const API_KEY_ENV_ONLY: (&str, &str) = ("MY_VENDOR_KEY", "sk-vendor-only-api-key-env-5f1e2d");
/// Named only in `security.secrets`.
const LISTED_ONLY: (&str, &str) = ("ORCH_LISTED_SECRET", "listed-only-secret-9c8b7a6d");
/// Named nowhere: the conventional key variable of the cursor kind.
const CONVENTIONAL_ONLY: (&str, &str) = ("CURSOR_API_KEY", "cursor-conventional-key-3e4d5c");

const SECRETS: [(&str, &str); 3] = [API_KEY_ENV_ONLY, LISTED_ONLY, CONVENTIONAL_ONLY];

fn script(dir: &Path, name: &str, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path.display().to_string()
}

/// Every secret value that appears in `bytes`, by variable name.
fn leaked(bytes: &[u8]) -> Vec<&'static str> {
    SECRETS
        .iter()
        .filter(|(_, v)| bytes.windows(v.len()).any(|w| w == v.as_bytes()))
        .map(|(n, _)| *n)
        .collect()
}

/// The test searches the PostgreSQL mirror's rows too, so it lives in a module named `postgres`:
/// `tools/test` skips it when the server is down.
mod postgres {
    use super::*;

    #[test]
    fn secrets_named_any_of_three_ways_appear_in_no_file_and_no_row() {
        // The scripts live outside the project: the project's own files are what is searched.
        let bin = tempfile::tempdir().expect("tempdir");
        let all = "$MY_VENDOR_KEY $ORCH_LISTED_SECRET $CURSOR_API_KEY";
        let claude = script(
            bin.path(),
            "claude.sh",
            &format!(
                r#"echo "claude stderr {all}" >&2
printf '{{"type":"result","subtype":"success","is_error":false,"result":"answer %s","session_id":"%s","total_cost_usd":0.001,"usage":{{"input_tokens":3,"output_tokens":2}}}}\n' "{all}" "$MY_VENDOR_KEY""#
            ),
        );
        let codex = script(
            bin.path(),
            "codex.sh",
            &format!(
                r#"printf '{{"type":"thread.started","thread_id":"%s"}}\n' "$ORCH_LISTED_SECRET"
printf '{{"type":"turn.failed","error":{{"message":"turn failed: %s"}}}}\n' "{all}"
exit 1"#
            ),
        );
        let cursor = script(
            bin.path(),
            "cursor.sh",
            &format!(
                r#"printf '{{"type":"result","is_error":false,"result":"cursor says %s","session_id":"%s"}}\n' "{all}" "$CURSOR_API_KEY""#
            ),
        );
        let gemini = script(
            bin.path(),
            "gemini.sh",
            &format!(
                r#"printf '{{"error":{{"code":500,"message":"internal: %s"}}}}\n' "{all}" >&2
exit 244"#
            ),
        );
        let shell = script(
            bin.path(),
            "shell.sh",
            &format!("echo \"shell out {all}\"\necho \"shell err {all}\" >&2\nexit 3"),
        );
        let schema = PgSchema::new("secrets");
        let p = Project::with_config(&format!(
            r#"orchestrator:
  max_concurrent: 8
  settle_ms: 100
  rescan_seconds: 2
  kill_grace_seconds: 1
  heartbeat_seconds: 1
database:
  url: "{url}"
  schema: {schema}
agents:
  claude: {{kind: claude, command: {claude}, api_key_env: MY_VENDOR_KEY}}
  codex: {{kind: codex, command: {codex}}}
  cursor: {{kind: cursor, command: {cursor}}}
  gemini: {{kind: gemini, command: {gemini}}}
  shell: {{kind: command, command: {shell}}}
routing:
  fallback: [shell]
task_queue:
  timeout_minutes: 2
  max_retries: 0
  retry_delay_seconds: 0.2
security:
  env_allow: [PATH, HOME, MY_VENDOR_KEY, ORCH_LISTED_SECRET, CURSOR_API_KEY]
  secrets: [ORCH_LISTED_SECRET]
"#,
            url = schema.url(),
            schema = schema.name,
        ));
        let mut sup = p.start_with_env(&SECRETS);
        let agents = ["claude", "codex", "cursor", "gemini", "shell"];
        for a in agents {
            p.drop_task(
                &format!("t_{a}.yaml"),
                &format!("description: report what you know\nagent: {a}\n"),
            );
        }
        // Text that reaches records without passing through an agent: a description (copied into the
        // result file, the state files and both mirrors' payloads) that starts with a secret (a record
        // redacted as text would read back as a YAML alias), a file whose parse error quotes one, a task
        // added through the CLI, and one that stays pending (the reconciler writes its row).
        let all = SECRETS.map(|(_, v)| v).join(" ");
        p.drop_task(
            "t_described.yaml",
            &format!("description: \"{all} are the keys\"\nagent: shell\n"),
        );
        p.drop_task(
            "t_broken.yaml",
            &format!("description: \"use {all}\nagent: [\n"),
        );
        p.drop_task(
            "t_waiting.yaml",
            &format!("description: \"later: {all}\"\ndependencies: [never_done]\n"),
        );
        let added = p
            .cmd(&[
                "add",
                "--id",
                "t_added",
                "--after",
                "t_waiting",
                &format!("added: {all}"),
            ])
            .envs(SECRETS)
            .output()
            .expect("add");
        assert!(added.status.success(), "{added:?}");
        // The files their authors wrote keep what they wrote; everything derived from them must not.
        let authored = [
            "tasks/failed/t_described.yaml",
            "tasks/failed/t_broken.yaml",
            "tasks/pending/t_waiting.yaml",
            "tasks/pending/t_added.yaml",
        ];
        let tasks = agents.len() + 2;
        wait_for("every task to finish", Duration::from_secs(60), || {
            p.tasks_in("completed").len() + p.tasks_in("failed").len() == tasks
        });
        let r = p.result("failed", "t_described");
        assert_eq!(r["description"], "*** *** *** are the keys", "{r}");
        // The file is moved first and explained right after.
        wait_for("t_broken explained", Duration::from_secs(10), || {
            p.path("tasks/failed/t_broken.error.txt").exists()
        });
        assert!(p.read("tasks/failed/t_broken.error.txt").contains("***"));
        // Outcomes as the scripts meant them: the secrets went through every path (answer, error, session).
        assert_eq!(
            p.tasks_in("completed"),
            vec!["t_claude", "t_cursor"],
            "{}",
            sup.output()
        );
        let r = p.result("completed", "t_claude");
        assert_eq!(r["attempts"][0]["session_id"], "***", "{r}");
        let r = p.result("failed", "t_codex");
        assert!(
            r["error"]
                .as_str()
                .is_some_and(|e| e.contains("turn failed")),
            "{r}"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while schema.states() != p.tree_states() {
            assert!(
                std::time::Instant::now() < deadline,
                "the PostgreSQL mirror did not catch up in 30 s: {:?} vs the tree's {:?}\n{}",
                schema.states(),
                p.tree_states(),
                sup.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(sup.stop().success(), "{}", sup.output());
        // Rows as the supervisor and the CLI (`add`) wrote them, before a rebuild replaces them.
        assert_no_row_leaks(&p, &schema);
        // The reconciler writes rows from the tree: the waiting task's row comes from its own file.
        let rebuilt = p
            .cmd(&["mirror", "rebuild"])
            .envs(SECRETS)
            .output()
            .expect("mirror rebuild");
        assert!(rebuilt.status.success(), "{rebuilt:?}");
        assert!(
            p.mirror_states()
                .contains(&("t_waiting".to_string(), "pending".to_string()))
        );

        let mut files = 0;
        for entry in walkdir::WalkDir::new(p.root()) {
            let entry = entry.expect("walk the project");
            if !entry.file_type().is_file() {
                continue;
            }
            if authored.iter().any(|a| entry.path().ends_with(a)) {
                continue;
            }
            files += 1;
            let bytes = std::fs::read(entry.path()).expect("read");
            let found = leaked(&bytes);
            assert!(
                found.is_empty(),
                "{} holds the value of {found:?}",
                entry.path().display()
            );
        }
        assert!(files > 20, "only {files} files searched");

        assert_no_row_leaks(&p, &schema);
        // Every finished task ran once, but the broken file, which never became a task.
        assert_eq!(
            schema.count("SELECT count(*) FROM attempts"),
            tasks as i64 - 1
        );
    }
}

/// Every row of every table, as text, in both databases.
fn assert_no_row_leaks(p: &Project, schema: &PgSchema) {
    let db = p.db();
    for table in ["tasks", "attempts", "task_events", "supervisors"] {
        let mut st = db
            .prepare(&format!("SELECT * FROM {table}"))
            .expect("prepare");
        let n = st.column_count();
        let rows: Vec<String> = st
            .query_map([], |row| {
                Ok((0..n)
                    .map(|i| match row.get_ref(i).expect("column") {
                        rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into(),
                        other => format!("{other:?}"),
                    })
                    .collect::<Vec<_>>()
                    .join("|"))
            })
            .expect("query")
            .map(|r| r.expect("row"))
            .collect();
        assert!(
            !rows.is_empty() || table == "supervisors",
            "{table} is empty"
        );
        for row in rows {
            assert!(leaked(row.as_bytes()).is_empty(), "SQLite {table}: {row}");
        }
        for row in schema.query(&format!("SELECT t::text FROM {table} t")) {
            let text = row[0].clone().unwrap_or_default();
            assert!(
                leaked(text.as_bytes()).is_empty(),
                "PostgreSQL {table}: {text}"
            );
        }
    }
}
