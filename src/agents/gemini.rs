//! Gemini CLI: `gemini --output-format json`, the prompt on stdin. Success is one JSON object
//! (`response`, `stats.models.<model>.tokens`, `session_id`). Fatal errors print nothing on stdout,
//! `{"error": {"message", "code"}}` on stderr, and exit with the HTTP status & 0xFF (429 → 173).
//! Gemini reports no cost; prices in config turn its tokens into one.
//!
//! This file builds the invocation and reads the output; it never runs the process or touches files.

use anyhow::Result;
use serde_json::Value;

use super::{
    Adapter, AgentOutcome, Invocation, RunRequest, agent_env, bad_output, classify_error_text,
    json_document, permissions, retry_after_in_text, stderr_hint,
};
use crate::config::AgentConfig;
use crate::process::Exit;
use crate::record::Outcome;

pub struct GeminiAdapter;

impl Adapter for GeminiAdapter {
    fn invocation(&self, name: &str, cfg: &AgentConfig, req: &RunRequest) -> Result<Invocation> {
        let mut args: Vec<String> = vec!["--output-format".into(), "json".into()];
        // The default mode asks before each edit, and nobody is there to answer.
        if !cfg.args_set_permissions() {
            args.extend([
                "--approval-mode".into(),
                permissions(cfg, "auto_edit").into(),
            ]);
        }
        // Headless runs refuse folders not trusted interactively beforehand; the workdir was
        // chosen by whoever configured orchestrate and checked against workspace_roots.
        if !super::user_sets(cfg, &["--skip-trust"]) {
            args.push("--skip-trust".into());
        }
        if let Some(m) = &cfg.model
            && !super::user_sets(cfg, &["--model", "-m"])
        {
            args.extend(["--model".into(), m.clone()]);
        }
        let session = super::session_args(req, &mut args);
        args.extend(cfg.args.iter().cloned());
        let mut env = agent_env(cfg);
        if let Some(u) = &cfg.base_url {
            env.entry("GOOGLE_GEMINI_BASE_URL".into())
                .or_insert_with(|| u.clone());
        }
        Ok(Invocation {
            program: cfg.program(name),
            args,
            env,
            stdin: Some(req.prompt.as_bytes().to_vec()),
            cwd: req.workdir.to_path_buf(),
            session_id: Some(session),
        })
    }

    fn parse(&self, exit: &Exit) -> AgentOutcome {
        if let Some(o) = super::abnormal_with_output(exit) {
            return o;
        }
        let doc = json_document(&exit.stdout);
        let err = json_document(&exit.stderr_tail)
            .filter(|v| v.get("error").is_some())
            .or_else(|| doc.clone().filter(|v| v.get("error").is_some()));
        if let Some(e) = err {
            return from_error(&e["error"], exit);
        }
        let Some(doc) = doc else {
            return super::failed_without_result(exit, "gemini");
        };
        let Some(text) = doc.get("response").and_then(Value::as_str) else {
            return bad_output(exit, "gemini's JSON has no `response`");
        };
        let mut o = AgentOutcome::new(if exit.code == Some(0) {
            Outcome::Completed
        } else {
            Outcome::AgentError
        });
        if exit.code != Some(0) {
            o.error = Some(format!(
                "gemini exited with code {}{}",
                exit.code.map(|c| c.to_string()).unwrap_or("?".into()),
                stderr_hint(exit)
            ));
        }
        o.text = text.to_string();
        o.session_id = doc
            .get("session_id")
            .and_then(Value::as_str)
            .map(String::from);
        // Several models may have served one run (the CLI's own routing); their tokens add up.
        if let Some(models) = doc.pointer("/stats/models").and_then(Value::as_object) {
            let sum = |k: &str| {
                models
                    .values()
                    .filter_map(|m| m.pointer(&format!("/tokens/{k}")).and_then(Value::as_u64))
                    .reduce(|a, b| a + b)
            };
            o.input_tokens = sum("prompt");
            o.output_tokens = match (sum("candidates"), sum("thoughts")) {
                (Some(c), Some(t)) => Some(c + t),
                (c, t) => c.or(t),
            };
            o.cached_tokens = sum("cached");
        }
        o
    }

    /// `--output-format json` prints one object when the run is over, nothing before.
    fn streams_progress(&self) -> bool {
        false
    }
}

fn from_error(e: &Value, exit: &Exit) -> AgentOutcome {
    let message = e
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("gemini reported an error")
        .to_string();
    let code = e.get("code").and_then(|c| {
        c.as_u64()
            .or_else(|| c.as_str().and_then(|s| s.parse().ok()))
    });
    let lower = message.to_ascii_lowercase();
    let (outcome, retry_after) = match code {
        Some(429) => {
            if lower.contains("quota") && (lower.contains("per day") || lower.contains("billing")) {
                (Outcome::QuotaExhausted, retry_after_in_text(&lower))
            } else {
                (Outcome::RateLimited, retry_after_in_text(&lower))
            }
        }
        // 41 is the CLI's own exit code for authentication errors (`FatalAuthenticationError`: no
        // key, no auth method chosen), which it puts in `code` too.
        Some(401) | Some(403) | Some(41) => (Outcome::Auth, None),
        _ if exit.code == Some(41) => (Outcome::Auth, None),
        _ => classify_error_text(&message).unwrap_or((Outcome::AgentError, None)),
    };
    let one: String = message
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(500)
        .collect();
    AgentOutcome {
        retry_after,
        text: exit.stdout.clone(),
        ..AgentOutcome::failed(
            outcome,
            // Gemini puts its exit code (1) in `code` when it has no HTTP status: only a status
            // is worth naming as one.
            match code {
                Some(c) if (100..600).contains(&c) => format!("API error {c}: {one}"),
                _ => one,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::fixture::{exit_from, fixture};

    #[test]
    fn parses_success() {
        let o = GeminiAdapter.parse(&fixture("gemini", "success"));
        assert_eq!(o.outcome, Outcome::Completed, "{:?}", o.error);
        assert!(!o.text.is_empty());
        assert!(o.input_tokens.unwrap_or(0) > 0 && o.output_tokens.unwrap_or(0) > 0);
    }

    #[test]
    fn parses_server_error() {
        let o = GeminiAdapter.parse(&fixture("gemini", "server_error"));
        assert_eq!(o.outcome, Outcome::AgentError, "{:?}", o.error);
        assert!(o.error.is_some_and(|e| !e.is_empty()));
    }

    #[test]
    fn parses_rate_limit() {
        let o = GeminiAdapter.parse(&fixture("gemini", "rate_limit"));
        assert_eq!(o.outcome, Outcome::RateLimited, "{:?}", o.error);
    }

    #[test]
    fn error_on_stderr_and_garbage() {
        let o = GeminiAdapter.parse(&exit_from(
            "",
            r#"{"error":{"type":"Error","message":"API key not valid. Please pass a valid API key.","code":400}}"#,
            Some(144),
        ));
        assert_eq!(o.outcome, Outcome::Auth);
        let o = GeminiAdapter.parse(&exit_from("{\"unexpected\": true}", "", Some(0)));
        assert_eq!(o.outcome, Outcome::BadOutput);
        assert_eq!(o.text, "{\"unexpected\": true}");
    }

    /// What gemini 0.61.0 prints without a key (exit 41, the error object on stdout).
    #[test]
    fn no_key_is_auth() {
        let out = r#"{"session_id":"s","error":{"type":"Error","message":"When using Gemini API, you must specify the GEMINI_API_KEY environment variable.\nUpdate your environment and try again (no reload needed if using .env)!","code":41}}"#;
        let o = GeminiAdapter.parse(&exit_from(out, "", Some(41)));
        assert_eq!(o.outcome, Outcome::Auth, "{:?}", o.error);
        assert!(
            o.error
                .as_deref()
                .is_some_and(|e| e.starts_with("When using Gemini API")),
            "{:?}",
            o.error
        );
    }

    #[test]
    fn an_exit_code_in_the_error_is_not_called_an_api_error() {
        let o = GeminiAdapter.parse(&exit_from(
            "",
            r#"{"error":{"type":"Error","message":"fetch failed","code":1}}"#,
            Some(1),
        ));
        assert_eq!(o.error.as_deref(), Some("fetch failed"));
        let o = GeminiAdapter.parse(&exit_from(
            "",
            r#"{"error":{"message":"Internal error","code":500}}"#,
            Some(244),
        ));
        assert_eq!(o.error.as_deref(), Some("API error 500: Internal error"));
    }
}
