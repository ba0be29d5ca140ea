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
    out: super::Out,
}

impl Printer {
    /// Print one event; returns true once the limit is reached.
    fn print(&mut self, e: &Event) -> Result<bool> {
        if self.json {
            self.out.json(&serde_json::to_string(e)?)?;
        } else {
            let mut line = format!(
                "{:>7} {} {:<24} {:<10} {:<10} v{} ({})",
                e.seq,
                e.at,
                e.task_id,
                e.state,
                e.agent.as_deref().unwrap_or("-"),
                e.version,
                e.host
            );
            if let Some(err) = &e.error {
                line.push_str(&format!(": {}", super::short(err, 200)));
            }
            self.out.line(&line)?;
        }
        // Each event as it happens, not when a buffer fills.
        self.out.flush()?;
        self.printed += 1;
        Ok(self.limit.is_some_and(|l| self.printed >= l))
    }
}

pub fn run(cli: &Cli, project: &Project, since: Option<i64>, limit: Option<u64>) -> Result<i32> {
    let mut p = Printer {
        json: cli.json,
        printed: 0,
        limit,
        out: super::Out::new(),
    };
    if limit == Some(0) {
        return Ok(0);
    }
    project.source(cli.database_url.as_deref())?.follow(
        since,
        |e| p.print(e),
        |e, wait| {
            super::note(&format!(
                "follow: {e:#}; reconnecting in {:.1} s",
                wait.as_secs_f64()
            ))
        },
    )?;
    Ok(0)
}
