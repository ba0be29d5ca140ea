//! Claude Code: `claude -p --output-format json`, the prompt on stdin. The answer is one JSON object
//! (`result`, `total_cost_usd`, `usage`, `session_id`); API failures come back in that same object
//! with `is_error: true` and `api_error_status`, and exit code 1.
//!
//! This file builds the invocation and reads the output; it never runs the process or touches files.

use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use super::{
    Adapter, AgentOutcome, Invocation, RunRequest, agent_env, bad_output, classify_error_text,
    json_document, permissions, retry_after_in_text,
};
use crate::config::AgentConfig;
use crate::process::Exit;
use crate::record::Outcome;

pub struct ClaudeAdapter;

impl Adapter for ClaudeAdapter {
    fn invocation(&self, name: &str, cfg: &AgentConfig, req: &RunRequest) -> Result<Invocation> {
        let mut args: Vec<String> = vec!["-p".into(), "--output-format".into(), "json".into()];
        // Without a mode that accepts edits, writes are denied silently and the run "succeeds".
        if !cfg.args_set_permissions() {
            args.extend([
                "--permission-mode".into(),
                permissions(cfg, "acceptEdits").into(),
            ]);
        }
        if let Some(m) = &cfg.model
            && !super::user_sets(cfg, &["--model"])
        {
            args.extend(["--model".into(), m.clone()]);
        }
        // The task's cost cap, which Claude Code enforces itself between turns.
        if let Some(max) = req.max_cost_usd
            && !super::user_sets(cfg, &["--max-budget-usd"])
        {
            args.extend(["--max-budget-usd".into(), format!("{max:.6}")]);
        }
        let session = super::session_args(req, &mut args);
        args.extend(cfg.args.iter().cloned());
        Ok(Invocation {
            program: cfg.program(name),
            args,
            env: claude_env(cfg),
            // stdin, not an argument: a prompt with large context files would overflow argv.
            stdin: Some(req.prompt.as_bytes().to_vec()),
            cwd: req.workdir.to_path_buf(),
            session_id: Some(session),
        })
    }

    fn parse(&self, exit: &Exit) -> AgentOutcome {
        if let Some(o) = super::abnormal_with_output(exit) {
            return o;
        }
        let Some(doc) = json_document(&exit.stdout) else {
            return super::failed_without_result(exit, "claude");
        };
        parse_result(&doc, exit)
    }

    /// `--output-format json` prints one object when the run is over, nothing before.
    fn streams_progress(&self) -> bool {
        false
    }

    /// `claude auth status`: exit 0 when it has a login or a key (from the environment, a key
    /// helper, a stored login), 1 when it has none; it reads local state only, in a third of a
    /// second. It does not ask the server, so a key the server refuses still "looks" logged in:
    /// the next task finds out, and the agent is marked again (with a longer wait).
    fn login_check(&self, name: &str, cfg: &AgentConfig, cwd: &Path) -> Option<Invocation> {
        Some(Invocation {
            program: cfg.program(name),
            args: vec!["auth".into(), "status".into()],
            env: claude_env(cfg),
            stdin: None,
            cwd: cwd.to_path_buf(),
            session_id: None,
        })
    }
}

/// The environment every `claude` run gets: the agent's own and its key, where the API is, and the
/// settings that keep a supervised run from updating itself or retrying for minutes.
fn claude_env(cfg: &AgentConfig) -> std::collections::BTreeMap<String, String> {
    let mut env = agent_env(cfg);
    if let Some(u) = &cfg.base_url {
        env.entry("ANTHROPIC_BASE_URL".into())
            .or_insert_with(|| u.clone());
    }
    // A supervisor run must not update the CLI under a running task.
    env.entry("DISABLE_AUTOUPDATER".into())
        .or_insert_with(|| "1".into());
    // Claude Code retries a 429 ten times with back-off, minutes in which another agent could
    // have taken the task: one retry for a blip, then orchestrate's cooldown and fallback.
    env.entry("CLAUDE_CODE_MAX_RETRIES".into())
        .or_insert_with(|| "1".into());
    env
}

fn first_words(text: &str) -> String {
    let t = text.split_whitespace().collect::<Vec<_>>().join(" ");
    t.chars().take(500).collect()
}

fn num(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

fn parse_result(doc: &Value, exit: &Exit) -> AgentOutcome {
    if doc.get("type").and_then(Value::as_str) != Some("result") {
        return bad_output(exit, "claude's JSON is not a `result` object");
    }
    let text = doc
        .get("result")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut o = AgentOutcome::new(Outcome::Completed);
    o.text = text.clone();
    o.cost_usd = doc.get("total_cost_usd").and_then(Value::as_f64);
    o.session_id = doc
        .get("session_id")
        .and_then(Value::as_str)
        .map(String::from);
    if let Some(u) = doc.get("usage") {
        // Anthropic counts cache reads and writes apart from `input_tokens`; orchestrate records
        // the whole prompt as input, with the cached part inside it, as the other providers do.
        let read = num(u, "cache_read_input_tokens").unwrap_or(0);
        let created = num(u, "cache_creation_input_tokens").unwrap_or(0);
        o.input_tokens = num(u, "input_tokens").map(|i| i + read + created);
        o.output_tokens = num(u, "output_tokens");
        o.cached_tokens = Some(read);
    }
    let is_error = doc
        .get("is_error")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let subtype = doc.get("subtype").and_then(Value::as_str).unwrap_or("");
    if !is_error && subtype == "success" && exit.code == Some(0) {
        return o;
    }
    let status = doc.get("api_error_status").and_then(Value::as_u64);
    let message = if text.trim().is_empty() {
        format!("claude reported an error (subtype {subtype})")
    } else {
        // Claude Code prefixes its own "API Error: "; the status is said once, below.
        first_words(text.strip_prefix("API Error: ").unwrap_or(&text))
    };
    let lower = text.to_ascii_lowercase();
    let (outcome, retry_after) = match status {
        Some(429) | Some(529) => {
            let quota = lower.contains("usage limit") || lower.contains("quota");
            (
                if quota {
                    Outcome::QuotaExhausted
                } else {
                    Outcome::RateLimited
                },
                retry_after_in_text(&lower),
            )
        }
        Some(401) | Some(403) => (Outcome::Auth, None),
        Some(402) => (Outcome::QuotaExhausted, None),
        _ if subtype == "error_max_budget_usd" => (Outcome::BudgetExhausted, None),
        _ => classify_error_text(&text).unwrap_or((Outcome::AgentError, None)),
    };
    o.outcome = outcome;
    o.retry_after = retry_after;
    o.error = Some(match status {
        Some(s) => format!("API error {s}: {message}"),
        None if subtype.starts_with("error") => format!("{subtype}: {message}"),
        None => message,
    });
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::fixture::{exit_from, fixture};

    #[test]
    fn parses_success() {
        let exit = fixture("claude", "success");
        let o = ClaudeAdapter.parse(&exit);
        assert_eq!(o.outcome, Outcome::Completed, "{:?}", o.error);
        assert!(!o.text.is_empty());
        assert!(o.cost_usd.is_some());
        assert!(o.session_id.is_some());
        assert!(o.input_tokens.unwrap_or(0) > 0 && o.output_tokens.unwrap_or(0) > 0);
    }

    #[test]
    fn parses_server_error() {
        let o = ClaudeAdapter.parse(&fixture("claude", "server_error"));
        assert_eq!(o.outcome, Outcome::AgentError, "{:?}", o.error);
        assert!(o.error.is_some_and(|e| !e.is_empty()));
    }

    #[test]
    fn parses_rate_limit() {
        let exit = fixture("claude", "rate_limit");
        let o = ClaudeAdapter.parse(&exit);
        assert_eq!(o.outcome, Outcome::RateLimited, "{:?}", o.error);
    }

    #[test]
    fn subscription_limit_with_reset_time() {
        let reset = time::OffsetDateTime::now_utc().unix_timestamp() + 3600;
        let doc = format!(
            r#"{{"type":"result","subtype":"success","is_error":true,"api_error_status":429,"result":"Claude AI usage limit reached|{reset}","session_id":"s1","total_cost_usd":0,"usage":{{"input_tokens":0,"output_tokens":0}}}}"#
        );
        let o = ClaudeAdapter.parse(&exit_from(&doc, "", Some(1)));
        assert_eq!(o.outcome, Outcome::QuotaExhausted);
        let secs = o.retry_after.expect("reset time read").as_secs();
        assert!((3590..=3600).contains(&secs), "{secs}");
    }

    #[test]
    fn garbage_is_bad_output_with_raw_text() {
        let o = ClaudeAdapter.parse(&exit_from("Hello <html>", "", Some(0)));
        assert_eq!(o.outcome, Outcome::BadOutput);
        assert_eq!(o.text, "Hello <html>");
        let o = ClaudeAdapter.parse(&exit_from(r#"{"type":"result""#, "", Some(0)));
        assert_eq!(o.outcome, Outcome::BadOutput);
        let o = ClaudeAdapter.parse(&exit_from(
            "",
            "Invalid API key · Please run /login",
            Some(1),
        ));
        assert_eq!(o.outcome, Outcome::Auth);
    }

    /// What claude 2.1.330 prints without a key or a login (see tools/agents/CLI-NOTES.md).
    #[test]
    fn not_logged_in_is_auth_with_its_words() {
        let doc = r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":null,"result":"Not logged in · Please run /login","session_id":"s1","total_cost_usd":0,"usage":{"input_tokens":0,"output_tokens":0}}"#;
        let o = ClaudeAdapter.parse(&exit_from(doc, "", Some(1)));
        assert_eq!(o.outcome, Outcome::Auth);
        assert_eq!(
            o.error.as_deref(),
            Some("Not logged in · Please run /login")
        );
    }
}
