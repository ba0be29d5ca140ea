//! `orchestrate mirror rebuild`.
//!
//! It rewrites only the SQLite mirror, from the tree; it never touches a task file.

use anyhow::Result;

use super::{Cli, Project};

pub fn rebuild(cli: &Cli, project: &Project) -> Result<i32> {
    let report = project.reconcile(true)?;
    if cli.json {
        super::print_json(&report)?;
    } else {
        let mut out = super::Out::new();
        outln!(
            out,
            "mirror rebuilt from {}: {} task rows",
            project.rel(&project.spool.layout().tasks_dir),
            report.upserted
        )?;
        out.flush()?;
    }
    Ok(0)
}
