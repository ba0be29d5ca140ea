//! The notification outbox in the SQLite mirror: what each channel has been sent, what it still
//! owes, and the agent events (notices) nothing else records.
//!
//! Task events need no copy: `task_events` numbers every applied transition in commit order, and
//! the reconciler adds the ones a crash kept from the mirror at the next start. Each channel keeps
//! a cursor into it (and into `notices`, where the loop's writer puts agent events: cooldowns,
//! logins, stalls, budgets), and the sender moves what is past the cursor into `notify_outbox`,
//! one row per (channel, event), in the same transaction that moves the cursor. A row stays
//! `pending` until it is delivered or given up on; a restart finds it there.
//!
//! A channel seen for the first time starts at the end of both streams, and takes only events from
//! after that moment (`since`): neither the project's history nor a rebuilt mirror (whose cursors
//! are gone and whose events, made again from the tree, carry the tasks' old times) is announced.
//!
//! This file holds the tables and their statements only: what an event says and where it goes is
//! the `notify` module's.

use anyhow::Result;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::config::NotifyOn;

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS notices(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    agent TEXT,
    task_id TEXT,
    message TEXT NOT NULL,
    until TEXT,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS notify_cursors(
    channel TEXT PRIMARY KEY,
    task_seq INTEGER NOT NULL,
    notice_seq INTEGER NOT NULL,
    since TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS notify_outbox(
    channel TEXT NOT NULL,
    event_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    queued_ms INTEGER NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0,
    next_ms INTEGER NOT NULL,
    last_error TEXT,
    state TEXT NOT NULL DEFAULT 'pending',
    done_ms INTEGER,
    PRIMARY KEY(channel, event_id)
);
CREATE INDEX IF NOT EXISTS notify_outbox_due ON notify_outbox(state, next_ms);
"#;

/// An event about an agent (or about all of them), decided by the supervisor loop and written by
/// the mirror's writer ([`super::Op::Notice`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    /// Stable: `<host>:<kind>:<agent>:<unix ms>`.
    pub id: String,
    pub kind: NotifyOn,
    pub agent: Option<String>,
    /// The task whose attempt showed it, when one did.
    pub task_id: Option<String>,
    /// One line a person reads ("rate_limited on claude; cooling down until …").
    pub message: String,
    /// When the pause ends, when it is known.
    pub until: Option<String>,
    pub at: String,
}

impl Notice {
    pub fn new(
        host: &str,
        kind: NotifyOn,
        agent: Option<&str>,
        task_id: Option<&str>,
        message: String,
        until: Option<String>,
    ) -> Notice {
        let now = time::OffsetDateTime::now_utc();
        let ms = now.unix_timestamp_nanos() / 1_000_000;
        Notice {
            id: format!("{host}:{}:{}:{ms}", kind.as_str(), agent.unwrap_or("all")),
            kind,
            agent: agent.map(String::from),
            task_id: task_id.map(String::from),
            message,
            until,
            at: crate::fsutil::fmt_time(now),
        }
    }
}

/// Written by the mirror's writer in the batch it arrives in.
pub(super) fn insert_notice(tx: &rusqlite::Transaction, n: &Notice) -> Result<()> {
    tx.execute(
        "INSERT OR IGNORE INTO notices(id, kind, agent, task_id, message, until, at)
         VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            n.id,
            n.kind.as_str(),
            n.agent,
            n.task_id,
            n.message,
            n.until,
            n.at
        ],
    )?;
    Ok(())
}

/// Where a channel is in the event streams.
#[derive(Debug, Clone, PartialEq)]
pub struct Cursor {
    pub task_seq: i64,
    pub notice_seq: i64,
    /// Events from before this time are not for the channel (it did not exist yet).
    pub since: String,
}

/// The channel's cursor, made (at the end of both streams, from now) when it has none. Reading
/// an existing one writes nothing: the sender asks every pass, and must not contend with the
/// mirror's writer for the database's write lock while idle.
pub fn cursor(conn: &Connection, channel: &str) -> Result<Cursor> {
    let read = |conn: &Connection| {
        conn.query_row(
            "SELECT task_seq, notice_seq, since FROM notify_cursors WHERE channel = ?1",
            [channel],
            |r| {
                Ok(Cursor {
                    task_seq: r.get(0)?,
                    notice_seq: r.get(1)?,
                    since: r.get(2)?,
                })
            },
        )
        .optional()
    };
    if let Some(c) = read(conn)? {
        return Ok(c);
    }
    conn.execute(
        "INSERT OR IGNORE INTO notify_cursors(channel, task_seq, notice_seq, since)
         VALUES(?1, (SELECT coalesce(max(seq), 0) FROM task_events),
                (SELECT coalesce(max(seq), 0) FROM notices), ?2)",
        params![channel, crate::fsutil::now_rfc3339()],
    )?;
    read(conn)?.ok_or_else(|| anyhow::anyhow!("the cursor of {channel} was not made"))
}

/// A task event with the task as its row says, when the row is still at that transition.
#[derive(Debug, Clone)]
pub struct TaskEvent {
    pub seq: i64,
    pub host: String,
    pub task_id: String,
    pub version: u64,
    pub state: String,
    pub at: String,
    pub agent: Option<String>,
    /// The row's payload when the row is still this transition's (a task retried since has moved on).
    pub payload: Option<super::Payload>,
}

pub fn task_events_after(conn: &Connection, seq: i64, limit: usize) -> Result<Vec<TaskEvent>> {
    let mut stmt = conn.prepare(
        "SELECT e.seq, e.host, e.task_id, e.version, e.state, e.at, t.agent,
                CASE WHEN t.version = e.version THEN t.payload END
         FROM task_events e LEFT JOIN tasks t ON t.id = e.task_id
         WHERE e.seq > ?1 ORDER BY e.seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![seq, limit as i64], |r| {
        Ok(TaskEvent {
            seq: r.get(0)?,
            host: r.get(1)?,
            task_id: r.get(2)?,
            version: r.get::<_, i64>(3)? as u64,
            state: r.get(4)?,
            at: r.get(5)?,
            agent: r.get(6)?,
            payload: r
                .get::<_, Option<String>>(7)?
                .and_then(|p| serde_json::from_str(&p).ok()),
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn notices_after(conn: &Connection, seq: i64, limit: usize) -> Result<Vec<(i64, Notice)>> {
    let mut stmt = conn.prepare(
        "SELECT seq, id, kind, agent, task_id, message, until, at FROM notices
         WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![seq, limit as i64], |r| {
        let kind: String = r.get(2)?;
        Ok((
            r.get(0)?,
            kind,
            Notice {
                id: r.get(1)?,
                // Replaced below; a kind this build does not know is skipped.
                kind: NotifyOn::Budget,
                agent: r.get(3)?,
                task_id: r.get(4)?,
                message: r.get(5)?,
                until: r.get(6)?,
                at: r.get(7)?,
            },
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, kind, mut n) = row?;
        if let Some(k) = NotifyOn::parse(&kind) {
            n.kind = k;
            out.push((seq, n));
        }
    }
    Ok(out)
}

/// What a channel is to be sent: one row of the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    pub event_id: String,
    pub kind: String,
    /// The event as JSON.
    pub body: String,
}

/// Queue `events` for `channel` and move its cursor, in one transaction: either both happen or
/// neither (a crash between them would lose events or send them twice).
pub fn queue(
    conn: &mut Connection,
    channel: &str,
    events: &[Queued],
    task_seq: i64,
    notice_seq: i64,
    now_ms: i64,
) -> Result<()> {
    let tx = conn.transaction()?;
    {
        let mut ins = tx.prepare_cached(
            "INSERT OR IGNORE INTO notify_outbox(channel, event_id, kind, body, queued_ms, next_ms)
             VALUES(?1, ?2, ?3, ?4, ?5, ?5)",
        )?;
        for e in events {
            ins.execute(params![channel, e.event_id, e.kind, e.body, now_ms])?;
        }
    }
    tx.execute(
        "UPDATE notify_cursors SET task_seq = max(task_seq, ?2), notice_seq = max(notice_seq, ?3)
         WHERE channel = ?1",
        params![channel, task_seq, notice_seq],
    )?;
    tx.commit()?;
    Ok(())
}

/// An undelivered event.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub channel: String,
    pub event_id: String,
    pub kind: String,
    pub body: String,
    pub queued_ms: i64,
    pub tries: u32,
}

/// `channel`'s undelivered events whose next try is due, oldest first. Asked per channel, so one
/// channel's backlog never takes the places of another's.
pub fn due(conn: &Connection, channel: &str, now_ms: i64, limit: usize) -> Result<Vec<Pending>> {
    let mut stmt = conn.prepare(
        "SELECT channel, event_id, kind, body, queued_ms, tries FROM notify_outbox
         WHERE channel = ?3 AND state = 'pending' AND next_ms <= ?1
         ORDER BY queued_ms, rowid LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![now_ms, limit as i64, channel], |r| {
        Ok(Pending {
            channel: r.get(0)?,
            event_id: r.get(1)?,
            kind: r.get(2)?,
            body: r.get(3)?,
            queued_ms: r.get(4)?,
            tries: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// How one try went, for [`record_try`].
pub enum Tried<'a> {
    Delivered,
    /// Failed; try again at `next_ms`.
    Retry {
        error: &'a str,
        next_ms: i64,
    },
    /// Failed, and the channel's time for this event is up.
    GiveUp {
        error: &'a str,
    },
}

pub fn record_try(
    conn: &Connection,
    channel: &str,
    event_id: &str,
    tried: Tried,
    now_ms: i64,
) -> Result<()> {
    let (state, error, next) = match tried {
        Tried::Delivered => ("delivered", None, now_ms),
        Tried::Retry { error, next_ms } => ("pending", Some(error), next_ms),
        Tried::GiveUp { error } => ("gave_up", Some(error), now_ms),
    };
    let done = (state != "pending").then_some(now_ms);
    conn.execute(
        "UPDATE notify_outbox SET tries = tries + 1, state = ?3, last_error = coalesce(?4, last_error),
           next_ms = ?5, done_ms = ?6
         WHERE channel = ?1 AND event_id = ?2",
        params![channel, event_id, state, error, next, done],
    )?;
    Ok(())
}

/// A receiver failed: none of `channel`'s waiting events is tried before `until_ms`, so a receiver
/// that is down gets one try per back-off, not one per pass for each of its events.
pub fn hold_channel(conn: &Connection, channel: &str, until_ms: i64) -> Result<()> {
    conn.execute(
        "UPDATE notify_outbox SET next_ms = max(next_ms, ?2)
         WHERE channel = ?1 AND state = 'pending'",
        params![channel, until_ms],
    )?;
    Ok(())
}

/// Events of channels no longer configured are given up on (the list names them in `status` for a
/// week, like any given-up event), rather than waiting forever.
pub fn drop_unconfigured(conn: &Connection, configured: &[&str], now_ms: i64) -> Result<usize> {
    let pending: Vec<String> = conn
        .prepare("SELECT DISTINCT channel FROM notify_outbox WHERE state = 'pending'")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut n = 0;
    for channel in pending.iter().filter(|c| !configured.contains(&c.as_str())) {
        n += conn.execute(
            "UPDATE notify_outbox SET state = 'gave_up', done_ms = ?2,
               last_error = 'the channel is no longer configured'
             WHERE channel = ?1 AND state = 'pending'",
            params![channel, now_ms],
        )?;
    }
    Ok(n)
}

/// Forget delivered events after a day and given-up ones after a week (status shows those).
pub fn prune(conn: &Connection, now_ms: i64) -> Result<()> {
    const DAY: i64 = 24 * 3600 * 1000;
    conn.execute(
        "DELETE FROM notify_outbox WHERE (state = 'delivered' AND done_ms < ?1)
           OR (state = 'gave_up' AND done_ms < ?2)",
        params![now_ms - DAY, now_ms - 7 * DAY],
    )?;
    conn.execute(
        "DELETE FROM notices WHERE seq < (SELECT coalesce(min(notice_seq), 0) FROM notify_cursors)
           AND at < ?1",
        params![crate::fsutil::fmt_time(
            time::OffsetDateTime::now_utc() - time::Duration::days(7)
        )],
    )?;
    Ok(())
}

/// What `status` says about a channel: events given up on (the last week's), and events still
/// being retried after a failure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trouble {
    pub channel: String,
    pub event_id: String,
    pub kind: String,
    /// `gave_up` or `retrying`.
    pub state: String,
    pub tries: u32,
    pub error: String,
    /// When it was queued (RFC 3339).
    pub queued_at: String,
}

/// Channels in trouble, for `status`; empty when the outbox does not exist yet.
pub fn troubles(conn: &Connection) -> Result<Vec<Trouble>> {
    let exists: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'notify_outbox'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if exists.is_none() {
        return Ok(vec![]);
    }
    let mut stmt = conn.prepare(
        "SELECT channel, event_id, kind, CASE state WHEN 'gave_up' THEN 'gave_up' ELSE 'retrying' END,
                tries, coalesce(last_error, ''), queued_ms
         FROM notify_outbox
         WHERE state = 'gave_up' OR (state = 'pending' AND tries > 0)
         ORDER BY queued_ms, rowid LIMIT 50",
    )?;
    let rows = stmt.query_map([], |r| {
        let ms: i64 = r.get(6)?;
        Ok(Trouble {
            channel: r.get(0)?,
            event_id: r.get(1)?,
            kind: r.get(2)?,
            state: r.get(3)?,
            tries: r.get(4)?,
            error: r.get(5)?,
            queued_at: time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
                .map(crate::fsutil::fmt_time)
                .unwrap_or_default(),
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: usize) -> Queued {
        Queued {
            event_id: format!("h:t{i}:v2"),
            kind: "failed".into(),
            body: "{}".into(),
        }
    }

    /// A removed channel's backlog neither hides another channel's events nor waits forever, and a
    /// failure holds back the rest of its own channel until its next try.
    #[test]
    fn one_channel_backlog_holds_up_no_other() {
        let t0 = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let mut conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(SCHEMA).expect("the outbox tables");
        let gone: Vec<Queued> = (0..150).map(event).collect();
        queue(&mut conn, "gone", &gone, 0, 0, t0 + 1_000).expect("queue");
        queue(
            &mut conn,
            "live",
            &[event(999), event(1000)],
            0,
            0,
            t0 + 2_000,
        )
        .expect("queue");
        let due_live = due(&conn, "live", t0 + 5_000, 100).expect("due");
        assert_eq!(due_live.len(), 2, "{due_live:?}");
        assert_eq!(due_live[0].event_id, "h:t999:v2");
        assert_eq!(
            drop_unconfigured(&conn, &["live"], t0 + 5_000).expect("drop"),
            150
        );
        assert!(due(&conn, "gone", t0 + 5_000, 100).expect("due").is_empty());
        let listed = troubles(&conn).expect("troubles");
        assert!(
            listed
                .iter()
                .any(|t| t.channel == "gone" && t.error.contains("no longer configured")),
            "{listed:?}"
        );
        // The first live event fails: the second waits for the same next try.
        hold_channel(&conn, "live", t0 + 9_000).expect("hold");
        record_try(
            &conn,
            "live",
            "h:t999:v2",
            Tried::Retry {
                error: "HTTP 500",
                next_ms: t0 + 9_000,
            },
            t0 + 5_000,
        )
        .expect("record");
        assert!(due(&conn, "live", t0 + 8_999, 100).expect("due").is_empty());
        assert_eq!(due(&conn, "live", t0 + 9_000, 100).expect("due").len(), 2);
    }
}
