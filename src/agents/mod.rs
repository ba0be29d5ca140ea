//! Agent adapters: one per kind. An adapter turns a task's prompt into a command line and the
//! finished process into one [`AgentOutcome`]. Adapters never spawn or wait themselves; the
//! `process` module does that for all of them, so limits, timeouts and capture are the same everywhere.

pub mod command;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::config::{AgentConfig, AgentKind};
use crate::process::Exit;
use crate::task::Outcome;

/// What the adapter needs to know about the attempt.
pub struct RunRequest<'a> {
    pub task_id: &'a str,
    pub description: &'a str,
    pub prompt: &'a str,
    pub prompt_file: &'a std::path::Path,
    pub workdir: &'a std::path::Path,
}

/// The command line for one attempt.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub program: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub stdin: Option<Vec<u8>>,
    pub cwd: PathBuf,
}

/// Everything orchestrate learns from one finished attempt.
#[derive(Debug, Clone)]
pub struct AgentOutcome {
    pub outcome: Outcome,
    /// The agent's final answer (for `command` agents, their stdout).
    pub text: String,
    pub error: Option<String>,
    pub cost_usd: Option<f64>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub session_id: Option<String>,
    /// When the provider said to come back (rate limits).
    pub retry_after: Option<Duration>,
}

impl AgentOutcome {
    pub fn failed(outcome: Outcome, error: impl Into<String>) -> AgentOutcome {
        AgentOutcome {
            outcome,
            text: String::new(),
            error: Some(error.into()),
            cost_usd: None,
            input_tokens: None,
            output_tokens: None,
            session_id: None,
            retry_after: None,
        }
    }
}

pub trait Adapter: Send + Sync {
    fn invocation(&self, name: &str, cfg: &AgentConfig, req: &RunRequest) -> Result<Invocation>;
    fn parse(&self, exit: &Exit) -> AgentOutcome;
}

/// The adapter for a kind, or `None` when this build cannot drive that kind yet; the scheduler then
/// treats the agent as unavailable and routes around it.
pub fn adapter_for(kind: AgentKind) -> Option<&'static dyn Adapter> {
    match kind {
        AgentKind::Command => Some(&command::CommandAdapter),
        AgentKind::Claude
        | AgentKind::Codex
        | AgentKind::Gemini
        | AgentKind::Cursor
        | AgentKind::Openai => None,
    }
}

/// Why an agent cannot take work right now, if it cannot.
pub fn unavailable_reason(name: &str, cfg: &AgentConfig) -> Option<String> {
    if adapter_for(cfg.kind).is_none() {
        return Some(format!(
            "agent {name}: kind `{}` has no adapter in this build",
            cfg.kind.as_str()
        ));
    }
    let program = cfg.program(name);
    if crate::process::find_program(&program).is_none() {
        return Some(format!("agent {name}: `{program}` not found on PATH"));
    }
    None
}

/// Outcome of a process that did not finish normally (timeout, signal, spawn failure), shared by adapters.
pub fn abnormal(exit: &Exit) -> Option<AgentOutcome> {
    if let Some(e) = &exit.spawn_error {
        return Some(AgentOutcome::failed(Outcome::AgentError, e.clone()));
    }
    if exit.timed_out {
        return Some(AgentOutcome::failed(
            Outcome::Timeout,
            format!(
                "timed out: still running after its {:.1} s limit, stopped (SIGTERM, then SIGKILL after the grace period)",
                exit.limit.as_secs_f64()
            ),
        ));
    }
    if let Some(sig) = exit.signal {
        return Some(AgentOutcome::failed(
            Outcome::AgentError,
            format!("killed by signal {sig}{}", stderr_hint(exit)),
        ));
    }
    None
}

/// The last lines of stderr, for error messages.
pub fn stderr_hint(exit: &Exit) -> String {
    let lines: Vec<&str> = exit
        .stderr_tail
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    let start = lines.len().saturating_sub(5);
    format!(": {}", lines[start..].join(" | "))
}
