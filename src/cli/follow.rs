//! `orchestrate follow`: task events as they happen.
//!
//! From PostgreSQL (`--database-url`): a dedicated connection LISTENs *before* catching up, so no
//! event falls between the catch-up read and the first notification. Events are read by sequence
//! (`seq > cursor`), which also dedupes; a re-read every few seconds is the safety net for a lost
//! notification; a broken connection is re-opened with backoff and the cursor carries over, so a
//! follower that was away prints everything it missed, once, in order.
//! From the local SQLite mirror (no URL): the same cursor logic, polling (SQLite has no NOTIFY).

use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use tokio_postgres::AsyncMessage;

use super::{Cli, Project};
use crate::mirror::{self, Event, postgres};

/// How often the events are re-read even without a notification.
const SAFETY_NET: Duration = Duration::from_secs(2);

struct Printer {
    json: bool,
    cursor: Option<i64>,
    printed: u64,
    limit: Option<u64>,
}

impl Printer {
    /// Print events past the cursor; returns true once the limit is reached.
    fn print(&mut self, events: &[Event]) -> Result<bool> {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for e in events {
            if self.cursor.is_some_and(|c| e.seq <= c) {
                continue;
            }
            if self.json {
                writeln!(out, "{}", serde_json::to_string(e)?)?;
            } else {
                writeln!(
                    out,
                    "{:>7} {} {:<24} {:<10} v{} ({})",
                    e.seq, e.at, e.task_id, e.state, e.version, e.host
                )?;
            }
            self.cursor = Some(e.seq);
            self.printed += 1;
            if self.limit.is_some_and(|l| self.printed >= l) {
                out.flush()?;
                return Ok(true);
            }
        }
        out.flush()?;
        Ok(false)
    }
}

pub fn run(cli: &Cli, project: &Project, since: Option<i64>, limit: Option<u64>) -> Result<i32> {
    let mut p = Printer {
        json: cli.json,
        cursor: since,
        printed: 0,
        limit,
    };
    if limit == Some(0) {
        return Ok(0);
    }
    match &cli.database_url {
        Some(url) => {
            super::remote::block_on(follow_postgres(url, &project.cfg.database.schema, &mut p))
        }
        None => follow_local(project, &mut p),
    }
}

fn follow_local(project: &Project, p: &mut Printer) -> Result<i32> {
    let conn = project.mirror_read()?;
    if p.cursor.is_none() {
        p.cursor = Some(conn.query_row(
            "SELECT coalesce(max(seq), 0) FROM task_events",
            [],
            |r| r.get(0),
        )?);
    }
    loop {
        let events = mirror::events_since(&conn, p.cursor.unwrap_or(0), 1000)?;
        if p.print(&events)? {
            return Ok(0);
        }
        if events.len() < 1000 {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

async fn follow_postgres(url: &str, schema: &str, p: &mut Printer) -> Result<i32> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match session(url, schema, p, &mut backoff).await {
            Ok(()) => return Ok(0),
            Err(e) if postgres::is_permanent(&e) => return Err(e),
            Err(e) => {
                eprintln!(
                    "follow: {e:#}; reconnecting in {:.1} s",
                    backoff.as_secs_f64()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// One connection's life. Returns Ok when the limit is reached, Err when the connection is lost.
async fn session(url: &str, schema: &str, p: &mut Printer, backoff: &mut Duration) -> Result<()> {
    let (client, mut conn) = postgres::pg_config(url)?
        .connect(postgres::tls()?)
        .await
        .context("cannot connect to PostgreSQL")?;
    let (note_tx, mut notes) = tokio::sync::mpsc::unbounded_channel::<()>();
    // Drive the connection ourselves to see its notifications; when it ends, `notes` closes.
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(msg)) = messages.next().await {
            if let AsyncMessage::Notification(_) = msg {
                let _ = note_tx.send(());
            }
        }
    });
    let result = async {
        anyhow::ensure!(
            postgres::valid_schema(schema),
            "invalid schema name `{schema}`"
        );
        client
            .batch_execute(&format!(
                "SET search_path TO {schema}; SET default_transaction_read_only = on; LISTEN {}",
                postgres::channel(schema)
            ))
            .await?;
        let ready: bool = client
            .query_one("SELECT to_regclass('task_events') IS NOT NULL", &[])
            .await?
            .get(0);
        if !ready {
            // Like `tail -F`: a follower may start before any supervisor has written here. Say what
            // we wait for (a wrong schema name shows up here too) and keep waiting.
            anyhow::bail!(
                "schema `{schema}` has no orchestrate tables yet: waiting for a supervisor to write to it \
                 (if none should be needed, check database.schema in the config file)"
            );
        }
        if p.cursor.is_none() {
            p.cursor = Some(postgres::max_seq(&client).await?);
        }
        // Connected and listening: the next failure starts its backoff from the beginning.
        *backoff = Duration::from_millis(200);
        loop {
            loop {
                let events = postgres::events_since(&client, p.cursor.unwrap_or(0), 1000).await?;
                if p.print(&events)? {
                    return Ok(());
                }
                if events.len() < 1000 {
                    break;
                }
            }
            tokio::select! {
                n = notes.recv() => if n.is_none() {
                    anyhow::bail!("connection lost");
                },
                _ = tokio::time::sleep(SAFETY_NET) => {}
            }
            // Several notifications may have queued up; one read covers them all.
            while notes.try_recv().is_ok() {}
        }
    }
    .await;
    driver.abort();
    result
}
