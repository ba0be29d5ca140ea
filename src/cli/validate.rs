//! `orchestrate validate FILE...`: lint task files (or the config) for CI jobs that commit them.
//! Prints `file:line:column: error: message` per problem; exit 1 if any file is invalid. With
//! `--check-config`, the configuration's notes (valid, but worth knowing) come first, as
//! `file: note: message`.
//!
//! It only reads; nothing is moved or written.

use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use super::Cli;
use crate::config::Config;
use crate::error::UsageError;

#[derive(Serialize)]
struct Finding {
    file: String,
    ok: bool,
    id: Option<String>,
    line: Option<usize>,
    column: Option<usize>,
    message: Option<String>,
}

pub fn run(cli: &Cli, files: &[PathBuf], check_config: bool) -> Result<i32> {
    let root = cli.root.clone().unwrap_or_else(|| PathBuf::from("."));
    if check_config {
        let path = cli
            .config
            .clone()
            .unwrap_or_else(|| crate::layout::Layout::config_file(&root));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| UsageError(format!("{}: {e}", path.display())))?;
        return match Config::parse(&text, &path.display().to_string()) {
            Ok(cfg) => {
                // Notes are not errors: the file is valid, and CI jobs keep exit 0.
                for n in &cfg.notes {
                    super::note(&format!("{}: note: {n}", path.display()));
                }
                let mut out = super::Out::new();
                outln!(out, "{}: ok", path.display())?;
                out.flush()?;
                Ok(0)
            }
            Err(e) => {
                super::note(&e.to_string());
                if let crate::error::ConfigError::Yaml { problem, .. } = &e
                    && let Some(x) = &problem.excerpt
                {
                    super::note(x);
                }
                Ok(1)
            }
        };
    }
    if files.is_empty() {
        return Err(UsageError("give one or more task files (or --check-config)".into()).into());
    }
    // Agent names are checked against the project's configuration when there is one.
    let cfg_path = cli
        .config
        .clone()
        .unwrap_or_else(|| crate::layout::Layout::config_file(&root));
    let cfg = Config::load(&cfg_path)?;
    let mut findings = Vec::new();
    // Flushed after each line: the errors go to stderr, and the two stay in order on a terminal.
    let mut out = super::Out::new();
    for f in files {
        let shown = f.display().to_string();
        let finding = match crate::task::read_task(f, cfg.orchestrator.max_task_bytes) {
            Ok((task, _)) => match &task.file.agent {
                Some(a) if !cfg.agents.contains_key(a) => Finding {
                    file: shown.clone(),
                    ok: false,
                    id: Some(task.id.clone()),
                    line: None,
                    column: None,
                    message: Some(format!(
                        "agent `{a}` is not configured in {} (known: {})",
                        cfg_path.display(),
                        cfg.agent_names()
                    )),
                },
                _ => Finding {
                    file: shown.clone(),
                    ok: true,
                    id: Some(task.id),
                    line: None,
                    column: None,
                    message: None,
                },
            },
            Err(e) => {
                if !cli.json {
                    super::note(&format!("{}: error: {}", e.problem.at(&shown), e.message()));
                    if let Some(x) = &e.problem.excerpt {
                        super::note(&x.replace(
                            &format!(
                                    "{}:",
                                    f.file_name()
                                        .map(|n| n.to_string_lossy().into_owned())
                                        .unwrap_or_default()
                                ),
                            &format!("{shown}:"),
                        ));
                    }
                }
                Finding {
                    file: shown.clone(),
                    ok: false,
                    id: None,
                    line: e.problem.line,
                    column: e.problem.column,
                    message: Some(e.message().to_string()),
                }
            }
        };
        if !cli.json {
            if finding.ok {
                outln!(
                    out,
                    "{shown}: ok ({})",
                    finding.id.as_deref().unwrap_or("-")
                )?;
                out.flush()?;
            } else if finding.line.is_none() && finding.id.is_some() {
                super::note(&format!(
                    "{shown}: error: {}",
                    finding.message.as_deref().unwrap_or_default()
                ));
            }
        }
        findings.push(finding);
    }
    let bad = findings.iter().filter(|f| !f.ok).count();
    if cli.json {
        super::print_json(&findings)?;
    } else if bad > 0 {
        super::note(&format!("{bad} of {} file(s) invalid", findings.len()));
    }
    Ok(if bad > 0 { 1 } else { 0 })
}
