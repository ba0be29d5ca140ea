//! `orchestrate add`: write a valid task file atomically and print its id.
//!
//! It goes through the spool like any other way in ([`Project::add_task`]) and never talks to a
//! running supervisor.

use anyhow::Result;

use super::{Cli, Command, Project};
use crate::project::NewTask;

pub fn run(cli: &Cli, project: &Project) -> Result<i32> {
    let Command::Add {
        description,
        priority,
        agent,
        after,
        context,
        task_type,
        workdir,
        timeout_minutes,
        max_retries,
        max_cost_usd,
        id,
        check,
        fan_out,
        pick,
        judge,
    } = &cli.command
    else {
        unreachable!("dispatched on Add")
    };
    let (tid, file) = project.add_task(&NewTask {
        description: description.clone(),
        priority: *priority,
        agent: agent.clone(),
        after: after.clone(),
        context: context.clone(),
        task_type: task_type.clone(),
        workdir: workdir.clone(),
        timeout_minutes: *timeout_minutes,
        max_retries: *max_retries,
        max_cost_usd: *max_cost_usd,
        id: id.clone(),
        check: check.clone(),
        labels: vec![],
        fan_out: fan_out.clone(),
        pick: *pick,
        judge: judge.clone(),
    })?;
    if cli.json {
        super::print_json(&serde_json::json!({ "id": tid, "file": file }))?;
    } else {
        let mut out = super::Out::new();
        outln!(out, "{tid}")?;
        out.flush()?;
    }
    Ok(0)
}
