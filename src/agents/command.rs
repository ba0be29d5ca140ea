//! The `command` kind: any executable. The prompt goes into the argument list through placeholders
//! (`{prompt}`, `{description}`, `{prompt_file}`, `{task_id}`, `{workdir}`) or, when no argument
//! mentions the prompt, on stdin. Exit code 0 is success and stdout is the agent's answer.
//!
//! This file builds the invocation and reads the output; it never runs the process or touches files.

use anyhow::Result;

use super::{Adapter, AgentOutcome, Invocation, RunRequest, stderr_hint};
use crate::config::{AgentConfig, PromptVia};
use crate::process::Exit;
use crate::record::Outcome;

pub struct CommandAdapter;

const PROMPT_PLACEHOLDERS: [&str; 3] = ["{prompt}", "{description}", "{prompt_file}"];

fn expand(arg: &str, req: &RunRequest) -> String {
    // One pass over the template so text substituted in (a prompt containing "{task_id}") is never
    // expanded again.
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let (value, len) = if tail.starts_with("{prompt}") {
            (req.prompt.to_string(), 8)
        } else if tail.starts_with("{description}") {
            (req.description.to_string(), 13)
        } else if tail.starts_with("{prompt_file}") {
            (req.prompt_file.display().to_string(), 13)
        } else if tail.starts_with("{task_id}") {
            (req.task_id.to_string(), 9)
        } else if tail.starts_with("{workdir}") {
            (req.workdir.display().to_string(), 9)
        } else {
            ("{".to_string(), 1)
        };
        out.push_str(&value);
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

impl Adapter for CommandAdapter {
    fn invocation(&self, name: &str, cfg: &AgentConfig, req: &RunRequest) -> Result<Invocation> {
        let mentions_prompt = cfg
            .args
            .iter()
            .any(|a| PROMPT_PLACEHOLDERS.iter().any(|p| a.contains(p)));
        let stdin = match cfg.prompt_via {
            PromptVia::Stdin => true,
            PromptVia::Arg => false,
            PromptVia::Auto => !mentions_prompt,
        };
        Ok(Invocation {
            program: cfg.program(name),
            args: cfg.args.iter().map(|a| expand(a, req)).collect(),
            env: super::agent_env(cfg),
            stdin: stdin.then(|| req.prompt.as_bytes().to_vec()),
            cwd: req.workdir.to_path_buf(),
            session_id: None,
        })
    }

    fn parse(&self, exit: &Exit) -> AgentOutcome {
        if let Some(o) = super::abnormal_with_output(exit) {
            return o;
        }
        match exit.code {
            Some(0) => AgentOutcome {
                text: exit.stdout.clone(),
                ..AgentOutcome::new(Outcome::Completed)
            },
            code => AgentOutcome {
                text: exit.stdout.clone(),
                ..AgentOutcome::failed(
                    Outcome::AgentError,
                    format!(
                        "exited with code {}{}",
                        code.map(|c| c.to_string()).unwrap_or("?".into()),
                        stderr_hint(exit)
                    ),
                )
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn placeholders_expand_once() {
        let req = RunRequest {
            task_id: "t1",
            description: "say {task_id}",
            prompt: "P",
            prompt_file: Path::new("/p.md"),
            workdir: Path::new("/w"),
            resume_session: None,
            max_cost_usd: None,
        };
        assert_eq!(
            expand("{description}|{task_id}|{workdir}|{x}|{prompt_file}", &req),
            "say {task_id}|t1|/w|{x}|/p.md"
        );
    }
}
