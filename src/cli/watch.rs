//! `orchestrate watch`: the terminal UI ([`crate::tui`]) when stdout is a terminal; otherwise one
//! plain snapshot (a pipe, a file, a CI log), and with `--follow` the events after it, as `follow`
//! prints them.

use std::io::IsTerminal;

use anyhow::Result;

use super::{Cli, Project};

pub fn run(cli: &Cli, project: &Project, follow: bool) -> Result<i32> {
    let db = cli.database_url.as_deref();
    if std::io::stdout().is_terminal() && std::io::stdin().is_terminal() {
        crate::tui::run(project, db)?;
        return Ok(0);
    }
    let reader = project.reader(db)?;
    let snapshot = crate::tui::model::Snapshot::load(project, &reader, db)?;
    drop(reader);
    let mut out = super::Out::new();
    for line in snapshot.plain_lines() {
        out.line(&line)?;
    }
    out.flush()?;
    drop(out);
    if follow {
        // From the snapshot's last event on: nothing between the two is missed or printed twice.
        return super::follow::run(cli, project, Some(snapshot.seq), None);
    }
    Ok(0)
}
