//! Codex: `codex exec --json`, the prompt on stdin (`-`; codex would otherwise wait for stdin to
//! close). stdout is JSONL: `thread.started{thread_id}`, `item.completed{item}` for messages, commands
//! and file changes, `turn.completed{usage}` or `turn.failed{error}`. Bare `error` events are retry
//! notices, not failures. Codex reports no cost; prices in config turn its tokens into one.
//!
//! This file builds the invocation and reads the output; it never runs the process or touches files.

use anyhow::Result;
use serde_json::Value;

use super::{
    Adapter, AgentOutcome, Invocation, RunRequest, abnormal, agent_env, bad_output,
    classify_error_text, permissions, stderr_hint,
};
use crate::config::AgentConfig;
use crate::process::Exit;
use crate::record::Outcome;

pub struct CodexAdapter;

/// The provider id orchestrate defines on the command line when the agent has a `base_url`.
const PROVIDER: &str = "orchestrate";

/// A TOML string literal (basic string, escaped), for `-c key=value` overrides.
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

impl Adapter for CodexAdapter {
    fn invocation(&self, name: &str, cfg: &AgentConfig, req: &RunRequest) -> Result<Invocation> {
        let mut args: Vec<String> = vec!["exec".into()];
        if let Some(s) = req.resume_session {
            args.extend(["resume".into(), s.into()]);
        }
        args.push("--json".into());
        // The default sandbox is read-only: edits would fail. `exec resume` has no --sandbox flag,
        // so there it is set as a config override.
        let sandbox = permissions(cfg, "workspace-write");
        if cfg.args_set_permissions() {
            // The user's own flag decides.
        } else if req.resume_session.is_some() {
            args.extend(["-c".into(), format!("sandbox_mode={}", toml_str(sandbox))]);
        } else {
            args.extend(["--sandbox".into(), sandbox.into()]);
        }
        // Workdirs need not be git repositories; orchestrate snapshots and diffs them itself.
        args.push("--skip-git-repo-check".into());
        if let Some(m) = &cfg.model
            && !super::user_sets(cfg, &["--model", "-m"])
        {
            args.extend(["--model".into(), m.clone()]);
        }
        if let Some(url) = &cfg.base_url {
            // A provider defined by overrides: no config file to write into CODEX_HOME.
            let key_var = "OPENAI_API_KEY";
            for (k, v) in [
                ("model_provider".to_string(), toml_str(PROVIDER)),
                (
                    format!("model_providers.{PROVIDER}.name"),
                    toml_str(PROVIDER),
                ),
                (
                    format!("model_providers.{PROVIDER}.base_url"),
                    toml_str(url),
                ),
                (
                    format!("model_providers.{PROVIDER}.wire_api"),
                    toml_str("responses"),
                ),
                (
                    format!("model_providers.{PROVIDER}.env_key"),
                    toml_str(key_var),
                ),
            ] {
                args.extend(["-c".into(), format!("{k}={v}")]);
            }
        }
        args.extend(cfg.args.iter().cloned());
        args.push("-".into());
        Ok(Invocation {
            program: cfg.program(name),
            args,
            env: agent_env(cfg),
            stdin: Some(req.prompt.as_bytes().to_vec()),
            cwd: req.workdir.to_path_buf(),
            session_id: None,
        })
    }

    fn parse(&self, exit: &Exit) -> AgentOutcome {
        if let Some(o) = abnormal(exit) {
            // The thread id comes first in the stream: a killed run can still be resumed.
            let session_id = exit.stdout.lines().find_map(|l| {
                let v: Value = serde_json::from_str(l.trim()).ok()?;
                (v.get("type")?.as_str()? == "thread.started")
                    .then(|| v.get("thread_id")?.as_str().map(String::from))?
            });
            return AgentOutcome {
                text: exit.stdout.clone(),
                session_id,
                ..o
            };
        }
        parse_events(exit)
    }
}

fn parse_events(exit: &Exit) -> AgentOutcome {
    let mut o = AgentOutcome::new(Outcome::Completed);
    let mut events = 0usize;
    let mut messages: Vec<String> = Vec::new();
    let mut completed = false;
    let mut failure: Option<String> = None;
    let mut last_notice: Option<String> = None;
    for line in exit.stdout.lines() {
        let Ok(ev) = serde_json::from_str::<Value>(line.trim()) else {
            continue;
        };
        let Some(kind) = ev.get("type").and_then(Value::as_str) else {
            continue;
        };
        events += 1;
        match kind {
            "thread.started" => {
                o.session_id = ev
                    .get("thread_id")
                    .and_then(Value::as_str)
                    .map(String::from);
            }
            "item.completed" => {
                let item = &ev["item"];
                match item.get("type").and_then(Value::as_str) {
                    Some("agent_message") => {
                        if let Some(t) = item.get("text").and_then(Value::as_str) {
                            messages.push(t.to_string());
                        }
                    }
                    Some("file_change") => {
                        for c in item
                            .get("changes")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                        {
                            if let Some(p) = c.get("path").and_then(Value::as_str)
                                && !o.files_reported.iter().any(|f| f == p)
                            {
                                o.files_reported.push(p.to_string());
                            }
                        }
                    }
                    Some("error") => {
                        last_notice = item
                            .get("message")
                            .and_then(Value::as_str)
                            .map(String::from);
                    }
                    _ => {}
                }
            }
            "turn.completed" => {
                completed = true;
                let u = &ev["usage"];
                let add = |a: Option<u64>, k: &str| match (a, u.get(k).and_then(Value::as_u64)) {
                    (Some(a), Some(b)) => Some(a + b),
                    (a, b) => a.or(b),
                };
                o.input_tokens = add(o.input_tokens, "input_tokens");
                o.cached_tokens = add(o.cached_tokens, "cached_input_tokens");
                o.output_tokens = add(o.output_tokens, "output_tokens");
            }
            "turn.failed" => {
                failure = Some(
                    ev.pointer("/error/message")
                        .and_then(Value::as_str)
                        .unwrap_or("turn failed")
                        .to_string(),
                );
            }
            // Retry notices ("Reconnecting... 1/5"); kept only to explain a failure that follows.
            "error" => {
                last_notice = ev.get("message").and_then(Value::as_str).map(String::from);
            }
            _ => {}
        }
    }
    o.text = messages.last().cloned().unwrap_or_default();
    if let Some(msg) = failure {
        let (outcome, retry_after) = classify_error_text(&msg)
            .or_else(|| missing_key(&msg))
            .unwrap_or((Outcome::AgentError, None));
        o.outcome = outcome;
        o.retry_after = retry_after;
        o.error = Some(one_line(&msg));
        return o;
    }
    if completed && exit.code == Some(0) {
        return o;
    }
    if events == 0 {
        if exit.code == Some(0) {
            return bad_output(exit, "codex printed no JSON events");
        }
        let text = format!("{}\n{}", exit.stdout, exit.stderr_tail);
        if let Some((outcome, retry_after)) = classify_error_text(&text) {
            return AgentOutcome {
                retry_after,
                text: exit.stdout.clone(),
                ..AgentOutcome::failed(outcome, one_line(&text))
            };
        }
        return AgentOutcome {
            text: exit.stdout.clone(),
            ..AgentOutcome::failed(
                Outcome::AgentError,
                format!(
                    "codex exited with code {}{}",
                    exit.code.map(|c| c.to_string()).unwrap_or("?".into()),
                    stderr_hint(exit)
                ),
            )
        };
    }
    // Events, but no end of turn: the stream broke off.
    let why = last_notice.unwrap_or_else(|| {
        format!(
            "codex ended without completing its turn (exit code {}){}",
            exit.code.map(|c| c.to_string()).unwrap_or("?".into()),
            stderr_hint(exit)
        )
    });
    let (outcome, retry_after) = classify_error_text(&why).unwrap_or((Outcome::AgentError, None));
    o.outcome = outcome;
    o.retry_after = retry_after;
    o.error = Some(one_line(&why));
    o
}

/// `Missing environment variable: `OPENAI_API_KEY`.`: codex was given no key for its provider, which
/// no retry can fix.
fn missing_key(msg: &str) -> Option<(Outcome, Option<std::time::Duration>)> {
    msg.contains("Missing environment variable")
        .then_some((Outcome::Auth, None))
}

fn one_line(s: &str) -> String {
    let t = s.split_whitespace().collect::<Vec<_>>().join(" ");
    t.chars().take(500).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::fixture::{exit_from, fixture};

    #[test]
    fn parses_success() {
        let o = CodexAdapter.parse(&fixture("codex", "success"));
        assert_eq!(o.outcome, Outcome::Completed, "{:?}", o.error);
        assert!(!o.text.is_empty());
        assert!(o.session_id.is_some());
        assert!(o.input_tokens.unwrap_or(0) > 0 && o.output_tokens.unwrap_or(0) > 0);
        assert!(o.cost_usd.is_none(), "codex reports no cost");
    }

    #[test]
    fn parses_file_change() {
        let o = CodexAdapter.parse(&fixture("codex", "write_file"));
        assert_eq!(o.outcome, Outcome::Completed, "{:?}", o.error);
        assert!(
            o.files_reported.iter().any(|f| f.ends_with("hello.txt")),
            "{:?}",
            o.files_reported
        );
    }

    #[test]
    fn parses_server_error() {
        let o = CodexAdapter.parse(&fixture("codex", "server_error"));
        assert_eq!(o.outcome, Outcome::AgentError, "{:?}", o.error);
        assert!(o.error.is_some_and(|e| !e.is_empty()));
    }

    #[test]
    fn parses_rate_limit() {
        let o = CodexAdapter.parse(&fixture("codex", "rate_limit"));
        assert_eq!(o.outcome, Outcome::RateLimited, "{:?}", o.error);
    }

    #[test]
    fn retry_notices_are_not_failures() {
        let out = concat!(
            r#"{"type":"thread.started","thread_id":"t-1"}"#,
            "\n",
            r#"{"type":"error","message":"Reconnecting... 1/5"}"#,
            "\n",
            r#"{"type":"item.completed","item":{"id":"i","type":"agent_message","text":"done"}}"#,
            "\n",
            r#"{"type":"turn.completed","usage":{"input_tokens":5,"cached_input_tokens":1,"output_tokens":2}}"#,
            "\n"
        );
        let o = CodexAdapter.parse(&exit_from(out, "", Some(0)));
        assert_eq!(o.outcome, Outcome::Completed);
        assert_eq!(o.text, "done");
        assert_eq!(
            (o.input_tokens, o.cached_tokens, o.output_tokens),
            (Some(5), Some(1), Some(2))
        );
    }

    #[test]
    fn quota_and_garbage() {
        let out = r#"{"type":"turn.failed","error":{"message":"You exceeded your current quota, please check your plan and billing details."}}"#;
        let o = CodexAdapter.parse(&exit_from(out, "", Some(1)));
        assert_eq!(o.outcome, Outcome::QuotaExhausted);
        let out = "{\"type\":\"turn.failed\",\"error\":{\"message\":\"Missing environment variable: `OPENAI_API_KEY`.\"}}";
        let o = CodexAdapter.parse(&exit_from(out, "", Some(1)));
        assert_eq!(o.outcome, Outcome::Auth, "{:?}", o.error);
        let o = CodexAdapter.parse(&exit_from("\u{0}\u{1}garbage", "", Some(0)));
        assert_eq!(o.outcome, Outcome::BadOutput);
        assert_eq!(o.text, "\u{0}\u{1}garbage");
    }
}
