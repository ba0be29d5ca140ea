//! The `openai` agent kind: one chat completion through [`crate::llm`], run as a child process of
//! orchestrate's own binary (`orchestrate openai-agent`, see `cli/openai_agent.rs`) so that
//! timeouts, cancel, logs and kill work exactly as for the CLI kinds. It produces text only, for
//! analysis, planning and routing; it never touches files and never talks HTTP itself.
//!
//! It owns the adapter and the parent/child protocol: the child prints one line of JSON
//! ([`agent_stdout`]) and the parent reads it back ([`parse_agent_stdout`]). Whatever a child
//! printed, crashed or not, the parse never panics: output that is not that line is `BadOutput`,
//! keeping the text.

use std::time::Duration;

use serde_json::Value;

use crate::agents::AgentOutcome;
use crate::llm::{ChatError, ChatReply};
use crate::record::Outcome;

/// Reads what `orchestrate openai-agent` printed on stdout (one JSON object, see
/// `cli/openai_agent.rs`) into the outcome of the attempt. Output that is not that object is
/// `BadOutput`, keeping the raw text; no output at all from a failed process is `AgentError`.
pub fn parse_agent_stdout(stdout: &str, code: Option<i32>) -> AgentOutcome {
    let trimmed = stdout.trim();
    let parsed = serde_json::from_str::<Value>(trimmed).ok().or_else(|| {
        trimmed
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .and_then(|l| serde_json::from_str::<Value>(l.trim()).ok())
    });
    let Some(v) = parsed.filter(Value::is_object) else {
        if trimmed.is_empty() && code != Some(0) {
            return AgentOutcome::failed(
                Outcome::AgentError,
                format!("openai-agent {} and printed no result", exit_text(code)),
            );
        }
        let mut out = AgentOutcome::failed(
            Outcome::BadOutput,
            format!(
                "openai-agent {} and its output is not the expected JSON",
                exit_text(code)
            ),
        );
        out.text = stdout.to_string();
        return out;
    };
    if let Some(e) = v.get("error") {
        let outcome = e
            .get("outcome")
            .cloned()
            .and_then(|o| serde_json::from_value::<Outcome>(o).ok())
            .filter(|o| *o != Outcome::Completed)
            .unwrap_or(Outcome::AgentError);
        let message = e
            .get("message")
            .and_then(Value::as_str)
            .map(String::from)
            .unwrap_or_else(|| e.to_string());
        let mut out = AgentOutcome::failed(outcome, message);
        out.retry_after = e
            .get("retry_after_seconds")
            .and_then(Value::as_f64)
            .and_then(|s| Duration::try_from_secs_f64(s).ok());
        return out;
    }
    let Some(text) = v.get("text").and_then(Value::as_str) else {
        let mut out = AgentOutcome::failed(
            Outcome::BadOutput,
            "openai-agent printed JSON with neither `text` nor `error`",
        );
        out.text = stdout.to_string();
        return out;
    };
    let mut out = AgentOutcome::new(Outcome::Completed);
    out.text = text.to_string();
    out.input_tokens = v.get("input_tokens").and_then(Value::as_u64);
    out.output_tokens = v.get("output_tokens").and_then(Value::as_u64);
    out.cached_tokens = v.get("cached_tokens").and_then(Value::as_u64);
    out
}

fn exit_text(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("exited with code {c}"),
        None => "did not exit normally".to_string(),
    }
}

/// The JSON line `openai-agent` prints for a result; [`parse_agent_stdout`] reads it back.
pub fn agent_stdout(result: &Result<ChatReply, ChatError>) -> String {
    match result {
        Ok(r) => serde_json::json!({
            "text": r.text,
            "input_tokens": r.input_tokens,
            "output_tokens": r.output_tokens,
            "cached_tokens": r.cached_tokens,
            "model": r.model,
        }),
        Err(e) => serde_json::json!({
            "error": {
                "outcome": e.outcome.as_str(),
                "message": e.message,
                "retry_after_seconds": e.retry_after.map(|d| d.as_secs_f64()),
            }
        }),
    }
    .to_string()
}

/// The `openai` kind as an adapter: the request runs in a child process (`orchestrate
/// openai-agent`), so timeouts, cancel, logs and kill work exactly as for the CLI kinds.
pub struct OpenaiAdapter;

impl super::Adapter for OpenaiAdapter {
    fn invocation(
        &self,
        _name: &str,
        cfg: &crate::config::AgentConfig,
        req: &super::RunRequest,
    ) -> anyhow::Result<super::Invocation> {
        use anyhow::Context;
        let exe = std::env::current_exe().context("cannot find the orchestrate executable")?;
        let env = super::agent_env(cfg);
        let mut args = vec![
            "openai-agent".to_string(),
            "--base-url".into(),
            cfg.base_url.clone().unwrap_or_default(),
            "--model".into(),
            cfg.model.clone().unwrap_or_default(),
        ];
        // `agent_env` has put the key (from `api_key_env`) under OPENAI_API_KEY when it is set;
        // local servers usually want none.
        if env.contains_key("OPENAI_API_KEY") {
            args.extend(["--api-key-env".into(), "OPENAI_API_KEY".into()]);
        }
        args.extend(cfg.args.iter().cloned());
        Ok(super::Invocation {
            program: exe.display().to_string(),
            args,
            env,
            stdin: Some(req.prompt.as_bytes().to_vec()),
            cwd: req.workdir.to_path_buf(),
            session_id: None,
        })
    }

    fn parse(&self, exit: &crate::process::Exit) -> AgentOutcome {
        if let Some(o) = super::abnormal(exit) {
            return o;
        }
        parse_agent_stdout(&exit.stdout, exit.code)
    }

    /// The child prints its one line of JSON when the answer is complete, nothing before.
    fn streams_progress(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_stdout_round_trips_through_the_parser() {
        let ok = Ok(ChatReply {
            text: "answer\nwith \"quotes\"".into(),
            input_tokens: Some(10),
            output_tokens: Some(2),
            cached_tokens: None,
            model: Some("m".into()),
        });
        let out = parse_agent_stdout(&format!("{}\n", agent_stdout(&ok)), Some(0));
        assert_eq!(out.outcome, Outcome::Completed);
        assert_eq!(out.text, "answer\nwith \"quotes\"");
        assert_eq!(
            (out.input_tokens, out.output_tokens, out.cached_tokens),
            (Some(10), Some(2), None)
        );
        assert_eq!(out.error, None);

        let err = Err(ChatError {
            outcome: Outcome::RateLimited,
            message: "slow down".into(),
            retry_after: Some(Duration::from_millis(2500)),
        });
        let out = parse_agent_stdout(&agent_stdout(&err), Some(1));
        assert_eq!(out.outcome, Outcome::RateLimited);
        assert_eq!(out.error.as_deref(), Some("slow down"));
        assert_eq!(out.retry_after, Some(Duration::from_millis(2500)));

        let unknown = parse_agent_stdout(r#"{"error":{"outcome":"weird","message":"m"}}"#, Some(1));
        assert_eq!(unknown.outcome, Outcome::AgentError);
    }

    #[test]
    fn unparseable_agent_stdout_is_bad_output_keeping_the_text() {
        let out = parse_agent_stdout("thread 'main' panicked", Some(101));
        assert_eq!(out.outcome, Outcome::BadOutput);
        assert_eq!(out.text, "thread 'main' panicked");
        let out = parse_agent_stdout("[1, 2]", Some(0));
        assert_eq!(out.outcome, Outcome::BadOutput);
        let out = parse_agent_stdout(r#"{"nothing": true}"#, Some(0));
        assert_eq!(out.outcome, Outcome::BadOutput);
        let out = parse_agent_stdout("", Some(2));
        assert_eq!(out.outcome, Outcome::AgentError);
        assert!(out.error.unwrap().contains("code 2"));
        // Stray lines before the result line do not hide it.
        let out = parse_agent_stdout("noise\n{\"text\":\"t\"}\n", Some(0));
        assert_eq!((out.outcome, out.text.as_str()), (Outcome::Completed, "t"));
    }
}
