//! `orchestrate init`: lay out a project. Never overwrites a file that exists.

use anyhow::{Context, Result};

use super::Cli;
use crate::config::DEFAULT_CONFIG;

/// What `init` suggests to try first; `tests/cli.rs` runs it as printed.
pub const NEXT: &str =
    "orchestrate add --agent shell \"echo hello from orchestrate\" && orchestrate start --once";

const OVERVIEW: &str = "# Project overview\n\nDescribe the project here: what it is, how it is built and tested, and the conventions\nagents must follow. Every prompt orchestrate sends includes this file.\n";

pub fn run(cli: &Cli) -> Result<i32> {
    let root = match &cli.root {
        Some(r) => r.clone(),
        None => std::env::current_dir()?,
    };
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let mut created = Vec::new();
    let mut write_new = |rel: &str, content: &str| -> Result<()> {
        let p = root.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        if !p.exists() {
            std::fs::write(&p, content).with_context(|| format!("cannot write {}", p.display()))?;
            created.push(rel.to_string());
        }
        Ok(())
    };
    write_new("config.yaml", DEFAULT_CONFIG)?;
    for d in ["pending", "assigned", "completed", "failed", "quarantine"] {
        write_new(&format!("tasks/{d}/.gitkeep"), "")?;
    }
    write_new("context/project_overview.md", OVERVIEW)?;
    for d in ["agent_outputs", "diffs", "logs"] {
        write_new(&format!("context/{d}/.gitkeep"), "")?;
    }
    std::fs::create_dir_all(root.join(".orchestrate/instances"))?;
    // Host-local state must never be synced or committed: its locks and pids mean nothing elsewhere.
    let gi = root.join(".gitignore");
    let existing = std::fs::read_to_string(&gi).unwrap_or_default();
    if !existing
        .lines()
        .any(|l| l.trim() == ".orchestrate/" || l.trim() == "/.orchestrate/")
    {
        let mut s = existing.clone();
        if !s.is_empty() && !s.ends_with('\n') {
            s.push('\n');
        }
        s.push_str(
            "# orchestrate: host-local state (SQLite mirror, locks, pid file)\n.orchestrate/\n",
        );
        std::fs::write(&gi, s)?;
        created.push(".gitignore".into());
    }
    let mut out = super::Out::new();
    if created.is_empty() {
        outln!(out, "{} is already set up", root.display())?;
    } else {
        outln!(out, "initialised {}:", root.display())?;
        for c in created {
            outln!(out, "  created {c}")?;
        }
        // A line that works when pasted as it is: the `shell` agent runs the description as a command.
        outln!(out, "next: {NEXT}")?;
    }
    out.flush()?;
    Ok(0)
}
