//! `orchestrate add`: write a valid task file atomically and print its id.
//!
//! It goes through the spool like any other way in and never talks to a running supervisor.

use anyhow::{Result, bail};

use super::{Cli, Command, Project};
use crate::error::UsageError;
use crate::task::{self, TaskFile};

/// The next free `task_NNN` across the whole tree.
fn next_number(project: &Project) -> u64 {
    let mut max = 0;
    for dir in project.spool.layout().spool_dirs() {
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(rest) = name.strip_prefix("task_") {
                let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                if let Ok(n) = digits.parse::<u64>() {
                    max = max.max(n);
                }
            }
        }
    }
    max + 1
}

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
        check,
        id,
    } = &cli.command
    else {
        unreachable!("dispatched on Add")
    };
    if !project.spool.layout().pending.is_dir() {
        bail!(UsageError(format!(
            "{} does not exist: run `orchestrate init` first (or pass -C DIR)",
            project.spool.layout().pending.display()
        )));
    }
    if let Some(a) = agent
        && !project.cfg.agents.contains_key(a)
    {
        bail!(UsageError(format!(
            "unknown agent `{a}` (configured: {})",
            project.cfg.agent_names()
        )));
    }
    // A task file may name a dependency that has not arrived yet (the next `git pull` brings it);
    // `add` is typed by a person, for whom a dependency that exists nowhere is a mistake.
    for dep in after {
        let known = project.spool.settled_place(dep).is_some()
            || project
                .spool
                .task_path(crate::spool::Place::Pending, dep)
                .exists()
            || match crate::mirror::sqlite::open_read(&project.db_path())? {
                Some(conn) => crate::mirror::sqlite::get(&conn, dep)?.is_some(),
                None => false,
            };
        if !known {
            bail!(UsageError(format!(
                "--after {dep}: no task {dep} exists (pending, running, completed or failed)"
            )));
        }
    }
    let mut file = TaskFile {
        id: None,
        description: description.clone(),
        priority: *priority,
        agent: agent.clone(),
        task_type: task_type.clone(),
        labels: vec![],
        dependencies: after.clone(),
        context_files: context.clone(),
        workdir: workdir.clone(),
        timeout_minutes: *timeout_minutes,
        max_retries: *max_retries,
        subtasks: vec![],
        parent: None,
        isolation: None,
        merge: None,
        check: check.clone(),
        check_timeout_minutes: None,
    };
    let mut n = next_number(project);
    for _ in 0..1000 {
        let tid = id.clone().unwrap_or_else(|| format!("task_{n:03}"));
        file.id = Some(tid.clone());
        let text = file.to_yaml();
        // Validate exactly what we write: `add` must never produce a file the supervisor rejects.
        let parsed = task::parse_task(&text, &tid, "<new task>")
            .map_err(|e| UsageError(e.message().to_string()))?;
        if project.spool.settled_place(&tid).is_some() {
            if id.is_some() {
                bail!(UsageError(format!("task id {tid} already exists")));
            }
            n += 1;
            continue;
        }
        let path = project.spool.task_path(crate::spool::Place::Pending, &tid);
        let name = path
            .file_name()
            .expect("a task path has a file name")
            .to_string_lossy();
        if project.spool.add_pending(&name, text.as_bytes())? {
            project.mirror_write(vec![crate::mirror::Op::Upsert {
                row: crate::mirror::pending_row(&project.spool, &parsed, &path, None),
                attempts: vec![],
            }]);
            if cli.json {
                super::print_json(&serde_json::json!({ "id": tid, "file": project.rel(&path) }))?;
            } else {
                let mut out = super::Out::new();
                outln!(out, "{tid}")?;
                out.flush()?;
            }
            return Ok(0);
        }
        if id.is_some() {
            bail!(UsageError(format!(
                "task id {tid} already exists in pending/"
            )));
        }
        n += 1;
    }
    bail!("could not find a free task id")
}
