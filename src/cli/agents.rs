//! `orchestrate agents`: what is configured, whether it can run, and what it has done.

use anyhow::Result;
use serde::Serialize;

use super::{Cli, Project};
use crate::mirror;

#[derive(Serialize)]
struct AgentInfo {
    name: String,
    kind: String,
    command: String,
    found: Option<String>,
    available: bool,
    problem: Option<String>,
    install_hint: Option<String>,
    running: usize,
    max_instances: usize,
    attempts: u64,
    completed: u64,
    failed: u64,
    cost_usd: f64,
    input_tokens: u64,
    output_tokens: u64,
}

fn install_hint(kind: crate::config::AgentKind) -> Option<&'static str> {
    use crate::config::AgentKind::*;
    match kind {
        Claude => Some("npm install -g @anthropic-ai/claude-code"),
        Codex => Some("npm install -g @openai/codex"),
        Gemini => Some("npm install -g @google/gemini-cli"),
        Cursor => Some("curl https://cursor.com/install -fsS | bash"),
        Command | Openai => None,
    }
}

pub fn run(cli: &Cli, project: &Project) -> Result<i32> {
    let conn = project.mirror_read()?;
    let totals = mirror::agent_totals(&conn)?;
    let running = mirror::list(&conn, Some("running"))?;
    let mut out = Vec::new();
    for (name, a) in &project.cfg.agents {
        let program = a.program(name);
        let found = crate::process::find_program(&program).map(|p| p.display().to_string());
        let problem = crate::agents::unavailable_reason(name, a);
        let t = totals.iter().find(|t| &t.agent == name);
        out.push(AgentInfo {
            name: name.clone(),
            kind: a.kind.as_str().into(),
            command: program,
            available: problem.is_none(),
            install_hint: if found.is_none() {
                install_hint(a.kind).map(String::from)
            } else {
                None
            },
            found,
            problem,
            running: running
                .iter()
                .filter(|r| r.agent.as_deref() == Some(name))
                .count(),
            max_instances: a.max_instances,
            attempts: t.map(|t| t.attempts).unwrap_or(0),
            completed: t.map(|t| t.completed).unwrap_or(0),
            failed: t.map(|t| t.failed).unwrap_or(0),
            cost_usd: t.map(|t| t.cost_usd).unwrap_or(0.0),
            input_tokens: t.map(|t| t.input_tokens).unwrap_or(0),
            output_tokens: t.map(|t| t.output_tokens).unwrap_or(0),
        });
    }
    if cli.json {
        super::print_json(&out)?;
        return Ok(0);
    }
    println!(
        "{:<10} {:<8} {:<10} {:>7} {:>9} {:>9} {:>9}  STATUS",
        "AGENT", "KIND", "COMMAND", "RUNNING", "ATTEMPTS", "COMPLETED", "COST"
    );
    for a in out {
        let status = match (&a.problem, &a.install_hint) {
            (None, _) => format!("ready ({})", a.found.as_deref().unwrap_or("-")),
            (Some(p), Some(h)) => format!("{p}; install: {h}"),
            (Some(p), None) => p.clone(),
        };
        println!(
            "{:<10} {:<8} {:<10} {:>7} {:>9} {:>9} {:>9}  {}",
            a.name,
            a.kind,
            super::short(&a.command, 10),
            format!("{}/{}", a.running, a.max_instances),
            a.attempts,
            a.completed,
            format!("${:.2}", a.cost_usd),
            status
        );
    }
    Ok(0)
}
