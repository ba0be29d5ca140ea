//! `orchestrate openai-agent` (hidden): one chat completion as a child process, so the `openai`
//! kind is timed out, cancelled, logged and killed exactly like every other agent.
//!
//! The prompt comes on stdin. The answer streams to stderr as it arrives (the live log), and at
//! the end stdout gets ONE JSON line, which `agents::openai::parse_agent_stdout` reads:
//! `{"text", "input_tokens", "output_tokens", "cached_tokens", "model"}` with exit code 0, or
//! `{"error": {"outcome", "message", "retry_after_seconds"}}` with exit code 1.
//!
//! It never reads or writes files.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::agents::openai::agent_stdout;
use crate::llm::{self, ChatError, ChatRequest};
use crate::record::Outcome;

#[derive(Debug, Clone, clap::Args)]
pub struct OpenaiAgentArgs {
    /// API root, e.g. http://127.0.0.1:8080/v1 (requests go to {base-url}/chat/completions).
    #[arg(long)]
    pub base_url: String,
    #[arg(long)]
    pub model: String,
    /// Environment variable holding the API key (sent as a Bearer token); none: no key.
    #[arg(long)]
    pub api_key_env: Option<String>,
    /// Bound on the whole request; default: none of its own (the supervisor's limit applies).
    #[arg(long)]
    pub timeout_seconds: Option<u64>,
    /// A system message sent before the prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Ask the server for a JSON object (`response_format: json_object`).
    #[arg(long)]
    pub json_mode: bool,
}

/// Long enough never to fire before the supervisor's own limit.
const NO_LIMIT: Duration = Duration::from_secs(7 * 24 * 3600);

pub fn run(args: OpenaiAgentArgs) -> Result<i32> {
    let mut prompt = Vec::new();
    std::io::stdin()
        .read_to_end(&mut prompt)
        .context("reading the prompt from stdin")?;
    let prompt = String::from_utf8_lossy(&prompt).into_owned();

    let result = match api_key(args.api_key_env.as_deref()) {
        Ok(api_key) => {
            let mut messages = Vec::new();
            if let Some(system) = args.system.filter(|s| !s.is_empty()) {
                messages.push(("system".to_string(), system));
            }
            messages.push(("user".to_string(), prompt));
            let req = ChatRequest {
                base_url: args.base_url,
                model: args.model,
                api_key,
                messages,
                timeout: args.timeout_seconds.map_or(NO_LIMIT, Duration::from_secs),
                json_mode: args.json_mode,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let mut ends_with_newline = true;
            let mut on_delta = |delta: &str| {
                let mut err = std::io::stderr().lock();
                // A closed log pipe must not stop the answer.
                let _ = err.write_all(delta.as_bytes());
                let _ = err.flush();
                ends_with_newline = delta.ends_with('\n');
            };
            let result = runtime.block_on(llm::chat(&req, &mut on_delta));
            if !ends_with_newline {
                eprintln!();
            }
            if let Err(e) = &result {
                eprintln!("openai-agent: {}", e.message);
            }
            result
        }
        Err(e) => Err(e),
    };

    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", agent_stdout(&result))
        .and_then(|()| out.flush())
        .context("writing the result to stdout")?;
    Ok(if result.is_ok() { 0 } else { 1 })
}

fn api_key(var: Option<&str>) -> Result<Option<String>, ChatError> {
    let Some(var) = var else { return Ok(None) };
    match std::env::var(var) {
        Ok(key) if !key.trim().is_empty() => Ok(Some(key.trim().to_string())),
        _ => Err(ChatError {
            outcome: Outcome::Auth,
            message: format!("the API key variable {var} is not set (or empty) in the environment"),
            retry_after: None,
        }),
    }
}
