//! `orchestrate follow`: task events as they happen, one line (or JSON object) each.
//!
//! The events come from the mirror's one event feed ([`Source::follow`](crate::mirror::read::Source::follow)):
//! from PostgreSQL with `--database-url` (woken by `LISTEN`, reconnecting with backoff), else from
//! the local SQLite mirror (polled). This file only prints them and says when it reconnects.

use anyhow::Result;

use super::{Cli, Project};
use crate::mirror::Event;

struct Printer {
    json: bool,
    printed: u64,
    limit: Option<u64>,
}

impl Printer {
    /// Print one event; returns true once the limit is reached.
    fn print(&mut self, e: &Event) -> Result<bool> {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if self.json {
            writeln!(out, "{}", serde_json::to_string(e)?)?;
        } else {
            write!(
                out,
                "{:>7} {} {:<24} {:<10} {:<10} v{} ({})",
                e.seq,
                e.at,
                e.task_id,
                e.state,
                e.agent.as_deref().unwrap_or("-"),
                e.version,
                e.host
            )?;
            match &e.error {
                Some(err) => writeln!(out, ": {}", super::short(err, 200))?,
                None => writeln!(out)?,
            }
        }
        out.flush()?;
        self.printed += 1;
        Ok(self.limit.is_some_and(|l| self.printed >= l))
    }
}

pub fn run(cli: &Cli, project: &Project, since: Option<i64>, limit: Option<u64>) -> Result<i32> {
    let mut p = Printer {
        json: cli.json,
        printed: 0,
        limit,
    };
    if limit == Some(0) {
        return Ok(0);
    }
    project.source(cli)?.follow(
        since,
        |e| p.print(e),
        |e, wait| eprintln!("follow: {e:#}; reconnecting in {:.1} s", wait.as_secs_f64()),
    )?;
    Ok(0)
}
