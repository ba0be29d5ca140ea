//! Cursor: `cursor-agent -p --output-format json PROMPT`. One JSON object
//! (`type: "result"`, `is_error`, `result`, `session_id`); failures exit non-zero with text on
//! stderr. Cursor has no documented base-URL override and no npm package, so it is the one CLI
//! whose tests use hand-written outputs (in the documented shape) rather than recordings.
//!
//! This file builds the invocation and reads the output; it never runs the process or touches files.

use anyhow::Result;
use serde_json::Value;

use super::{
    Adapter, AgentOutcome, Invocation, RunRequest, agent_env, classify_error_text, json_document,
    permissions, stderr_hint,
};
use crate::config::AgentConfig;
use crate::process::Exit;
use crate::record::Outcome;

pub struct CursorAdapter;

impl Adapter for CursorAdapter {
    fn invocation(&self, name: &str, cfg: &AgentConfig, req: &RunRequest) -> Result<Invocation> {
        let mut args: Vec<String> = vec!["-p".into(), "--output-format".into(), "json".into()];
        if permissions(cfg, "force") == "force" && !cfg.args_set_permissions() {
            // Without it, cursor-agent only proposes changes in print mode.
            args.push("--force".into());
        }
        if let Some(m) = &cfg.model
            && !super::user_sets(cfg, &["--model", "-m"])
        {
            args.extend(["--model".into(), m.clone()]);
        }
        if let Some(s) = req.resume_session {
            args.extend(["--resume".into(), s.into()]);
        }
        args.extend(cfg.args.iter().cloned());
        // cursor-agent takes the prompt as an argument only.
        args.push(req.prompt.to_string());
        Ok(Invocation {
            program: cfg.program(name),
            args,
            env: agent_env(cfg),
            stdin: None,
            cwd: req.workdir.to_path_buf(),
            session_id: None,
        })
    }

    fn parse(&self, exit: &Exit) -> AgentOutcome {
        if let Some(o) = super::abnormal_with_output(exit) {
            return o;
        }
        let doc = json_document(&exit.stdout);
        let Some(doc) = doc.filter(|d| d.get("type").and_then(Value::as_str) == Some("result"))
        else {
            return super::failed_without_result(exit, "cursor-agent");
        };
        let mut o = AgentOutcome::new(Outcome::Completed);
        o.text = doc
            .get("result")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        o.session_id = doc
            .get("session_id")
            .and_then(Value::as_str)
            .map(String::from);
        if let Some(u) = doc.get("usage") {
            let n = |k: &str| u.get(k).and_then(Value::as_u64);
            o.input_tokens = n("input_tokens").or(n("inputTokens"));
            o.output_tokens = n("output_tokens").or(n("outputTokens"));
        }
        let is_error = doc
            .get("is_error")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if is_error || exit.code != Some(0) {
            let (outcome, retry_after) =
                classify_error_text(&format!("{}\n{}", o.text, exit.stderr_tail))
                    .unwrap_or((Outcome::AgentError, None));
            o.outcome = outcome;
            o.retry_after = retry_after;
            o.error = Some(format!(
                "cursor-agent reported an error{}",
                if o.text.is_empty() {
                    stderr_hint(exit)
                } else {
                    format!(": {}", o.text.chars().take(500).collect::<String>())
                }
            ));
        }
        o
    }

    /// `--output-format json` prints one object when the run is over, nothing before.
    fn streams_progress(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::fixture::fixture;

    #[test]
    fn parses_documented_shapes() {
        let o = CursorAdapter.parse(&fixture("cursor", "success"));
        assert_eq!(o.outcome, Outcome::Completed, "{:?}", o.error);
        assert_eq!(
            o.session_id.as_deref(),
            Some("c0ffee00-1111-2222-3333-444455556666")
        );
        assert!(!o.text.is_empty());
        let o = CursorAdapter.parse(&fixture("cursor", "rate_limit"));
        assert_eq!(o.outcome, Outcome::RateLimited, "{:?}", o.error);
        let o = CursorAdapter.parse(&fixture("cursor", "auth"));
        assert_eq!(o.outcome, Outcome::Auth, "{:?}", o.error);
        let o = CursorAdapter.parse(&fixture("cursor", "garbage"));
        assert_eq!(o.outcome, Outcome::BadOutput);
    }
}
