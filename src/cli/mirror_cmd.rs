//! `orchestrate mirror rebuild`.

use anyhow::Result;

use super::{Cli, Project};

pub fn rebuild(cli: &Cli, project: &Project) -> Result<i32> {
    let report = project.reconcile(true)?;
    let mut conn = crate::mirror::open(&project.db_path())?;
    let report = crate::mirror::reconcile(
        &mut conn,
        &project.spool,
        &crate::fsutil::hostname(),
        project.cfg.orchestrator.max_task_bytes,
        true,
    )?;
    if cli.json {
        super::print_json(&report)?;
    } else {
        println!(
            "mirror rebuilt from {}: {} task rows",
            project.rel(&project.spool.tasks_dir),
            report.upserted
        );
    }
    Ok(0)
}
