//! `orchestrate agents`: what is configured, whether it can run, and what it has done.
//!
//! It only reads (the configuration, the mirror, cooldowns, login marks, `--version` of each CLI),
//! except `--reset NAME`, which clears one agent's "needs login" mark.

use anyhow::{Context, Result};

use super::{Cli, Project};

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

pub fn run(cli: &Cli, project: &Project) -> Result<i32> {
    let reader = project.reader(cli.database_url.as_deref())?;
    let out = project.agents(&reader)?;
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
            // A cooldown or a login ends sooner than a budget window, and says more: they come
            // first; a reached budget comes before "ready".
            (None, None, None) if a.budget.paused.is_some() => {
                a.budget.paused.clone().unwrap_or_default()
            }
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
        if let Some(line) = budget_line(&a.budget) {
            outln!(w, "{:<10} {line}", "")?;
        }
    }
    w.flush()?;
    Ok(0)
}

/// `spent today $0.42 of $20.00, this month $3.10 of $100.00` for an agent with a budget; spend
/// alone (no line) for one without.
pub(super) fn budget_line(b: &crate::budget::Standing) -> Option<String> {
    let l = &b.limits;
    let mut parts = Vec::new();
    for (when, spend, usd, tokens) in [
        ("today", b.today, l.daily_usd, l.daily_tokens),
        ("this month", b.this_month, l.monthly_usd, l.monthly_tokens),
    ] {
        if let Some(max) = usd {
            parts.push(format!(
                "{when} ${} of ${}",
                crate::budget::usd(spend.usd),
                crate::budget::usd(max)
            ));
        }
        if let Some(max) = tokens {
            parts.push(format!("{when} {} of {max} tokens", spend.tokens));
        }
    }
    (!parts.is_empty()).then(|| format!("budget: spent {}", parts.join(", ")))
}
