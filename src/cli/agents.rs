//! `orchestrate agents`: what is configured, whether it can run, and what it has done.
//!
//! It only reads (the configuration, the mirror, cooldowns, login marks, `--version` of each CLI),
//! except `--reset NAME`, which clears one agent's "needs login" mark.

use anyhow::{Context, Result};
use serde::Serialize;

use super::{Cli, Project};

#[derive(Serialize)]
struct AgentInfo {
    name: String,
    kind: String,
    command: String,
    found: Option<String>,
    available: bool,
    problem: Option<String>,
    install_hint: Option<String>,
    /// What `<command> --version` printed (first line), when the program was found.
    version: Option<String>,
    running: usize,
    max_instances: usize,
    /// Resting after a rate limit or an exhausted quota until this time.
    cooldown_until: Option<String>,
    /// `rate_limited` or `quota_exhausted`.
    cooldown_outcome: Option<String>,
    cooldown_reason: Option<String>,
    /// Its credentials were refused: no task goes to it until this clears.
    needs_login: Option<LoginState>,
    attempts: u64,
    completed: u64,
    failed: u64,
    cost_usd: f64,
    input_tokens: u64,
    output_tokens: u64,
}

#[derive(Serialize)]
struct LoginState {
    since: String,
    /// What the agent said.
    reason: String,
    /// What to do about it.
    hint: String,
    /// When the supervisor looks again by itself (its CLI's login check, or the next task tries
    /// it); `None`: only a change of its configuration, environment or credentials, or `--reset`.
    next_check: Option<String>,
}

/// `--reset NAME`: clear the agent's "needs login" mark.
pub fn reset(project: &Project, name: &str) -> Result<i32> {
    let marks = crate::login::Logins::read(&project.layout);
    if !project.cfg.agents.contains_key(name) && !marks.contains_key(name) {
        return Err(crate::error::UsageError(format!(
            "no agent `{name}` (configured: {})",
            project.cfg.agent_names()
        ))
        .into());
    }
    let cleared = crate::login::reset(&project.layout, name).with_context(|| {
        format!(
            "cannot clear the mark in {}",
            project.rel(&project.layout.needs_login())
        )
    })?;
    let mut out = super::Out::new();
    if cleared {
        outln!(
            out,
            "{name}: needs-login mark cleared; a running supervisor gives it tasks again at its next heartbeat"
        )?;
    } else {
        outln!(out, "{name}: no needs-login mark")?;
    }
    Ok(0)
}

/// `<program> --version`, bounded: a CLI that hangs (first-run prompt, network) must not hang us.
fn version_of(program: &std::path::Path) -> Option<String> {
    use std::io::Read;
    let mut child = std::process::Command::new(program)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let mut out = String::new();
    child.stdout.take()?.read_to_string(&mut out).ok()?;
    out.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(String::from)
}

pub fn run(cli: &Cli, project: &Project) -> Result<i32> {
    let reader = project.reader(cli)?;
    let totals = reader.agent_totals()?;
    let running = reader.list(Some("running"))?;
    let cooldowns = crate::cooldown::Cooldowns::read(&project.layout);
    let logins = crate::login::Logins::read(&project.layout);
    let now = time::OffsetDateTime::now_utc();
    // Node CLIs take a second or so each to print a version: ask them all at once.
    let found_paths: Vec<Option<std::path::PathBuf>> = project
        .cfg
        .agents
        .iter()
        .map(|(name, a)| crate::process::find_program(&a.program(name)))
        .collect();
    let versions: Vec<Option<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = project
            .cfg
            .agents
            .values()
            .zip(&found_paths)
            .map(|(a, p)| {
                s.spawn(move || match (a.kind, p) {
                    // A `command` agent is any program: `--version` might do something else.
                    (crate::config::AgentKind::Command, _) | (_, None) => None,
                    (_, Some(p)) => version_of(p),
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().ok().flatten())
            .collect()
    });
    let mut out = Vec::new();
    for (i, (name, a)) in project.cfg.agents.iter().enumerate() {
        let program = a.program(name);
        let found = if a.kind == crate::config::AgentKind::Openai {
            Some(format!(
                "built in, {}",
                a.base_url.as_deref().unwrap_or("no base_url")
            ))
        } else {
            found_paths[i].as_ref().map(|p| p.display().to_string())
        };
        let cooling = cooldowns
            .get(name)
            .filter(|c| crate::cooldown::until_of(c).is_some_and(|u| u > now));
        let problem = crate::agents::unavailable_reason(name, a);
        let t = totals.iter().find(|t| &t.agent == name);
        out.push(AgentInfo {
            name: name.clone(),
            kind: a.kind.as_str().into(),
            command: program,
            available: problem.is_none(),
            install_hint: if found.is_none() {
                crate::agents::install_hint(a.kind).map(String::from)
            } else {
                None
            },
            found,
            version: versions[i].clone(),
            problem,
            cooldown_until: cooling.map(|c| c.until.clone()),
            cooldown_outcome: cooling.map(|c| c.outcome.as_str().to_string()),
            cooldown_reason: cooling.map(|c| c.reason.clone()),
            needs_login: logins.get(name).filter(|m| m.active()).map(|m| LoginState {
                since: m.since.clone(),
                reason: m.reason.clone(),
                hint: m.hint.clone(),
                next_check: m.next_check.clone(),
            }),
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
    let mut w = super::Out::new();
    outln!(
        w,
        "{:<10} {:<8} {:>7} {:>8} {:>9} {:>9} {:>15}  STATUS",
        "AGENT",
        "KIND",
        "RUNNING",
        "ATTEMPTS",
        "COMPLETED",
        "COST",
        "TOKENS IN/OUT"
    )?;
    for a in out {
        let status = match (&a.problem, &a.needs_login, &a.cooldown_until) {
            (Some(p), _, _) => p.clone(),
            (None, Some(l), _) => {
                format!("needs login: {} ({})", super::short(&l.reason, 80), l.hint)
            }
            (None, None, Some(until)) => format!(
                "cooling down until {until} ({}): {}",
                match a.cooldown_outcome.as_deref() {
                    Some("quota_exhausted") => "quota exhausted",
                    _ => "rate limited",
                },
                super::short(a.cooldown_reason.as_deref().unwrap_or("-"), 60)
            ),
            (None, None, None) => format!(
                "ready: {}{}",
                a.found.as_deref().unwrap_or("-"),
                a.version
                    .as_deref()
                    .map(|v| format!(" ({v})"))
                    .unwrap_or_default()
            ),
        };
        outln!(
            w,
            "{:<10} {:<8} {:>7} {:>8} {:>9} {:>9} {:>15}  {}",
            a.name,
            a.kind,
            format!("{}/{}", a.running, a.max_instances),
            a.attempts,
            a.completed,
            format!("${:.4}", a.cost_usd),
            format!("{}/{}", a.input_tokens, a.output_tokens),
            status
        )?;
    }
    w.flush()?;
    Ok(0)
}
