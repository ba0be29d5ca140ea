//! `orchestrate cancel ID`: a pending task goes straight to failed/; a running one is stopped by its
//! supervisor (asked through `state_dir/cancel/ID` and SIGUSR1), which then moves it to failed/.
//!
//! It never kills an agent itself: only the supervisor that owns the claim stops what it runs
//! ([`Project::cancel`]).

use anyhow::Result;

use super::{Cli, Project};

pub fn run(cli: &Cli, project: &Project, id: &str) -> Result<i32> {
    let what = project.cancel(id)?;
    if cli.json {
        super::print_json(&serde_json::json!({"id": id, "result": what}))?;
    } else {
        let mut out = super::Out::new();
        outln!(out, "{id}: {what}")?;
        out.flush()?;
    }
    Ok(0)
}
