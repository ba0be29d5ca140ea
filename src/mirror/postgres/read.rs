//! Reads from the PostgreSQL mirror: read-only sessions for `--database-url` and followers, and the
//! queries behind [`Reader`](crate::mirror::read::Reader), one per SQLite read with the same meaning.
//!
//! Every session is read-only (`default_transaction_read_only`), so a remote device can look but
//! never change anything. Every wait for the server is bounded (connecting, each statement, each
//! row: [`ANSWER_WITHIN`]), so a read command facing a server that stopped answering fails with
//! [`NoAnswer`](super::NoAnswer) instead of hanging, and a follower reconnects. Timestamps come back as text in the form the SQLite mirror stores
//! (RFC 3339, UTC, milliseconds), so both backends answer with the same strings. Nothing here writes
//! or creates a schema: a typo in a schema name must not leave an empty one behind.

use anyhow::Result;
use tokio_postgres::Client;

use super::{ANSWER_WITHIN, Notifications, Permanent, answer, channel, one, open, rows};
use crate::config::valid_schema;
use crate::mirror::{AgentTotals, AttemptLine, Event, SpentRow, SupervisorRow, TaskRow};

/// A read-only session on a schema a supervisor has written to. A schema without our tables is a
/// [`Permanent`] error: a one-shot read has nothing to wait for.
pub async fn connect_read_only(url: &str, schema: &str) -> Result<(Client, Notifications)> {
    anyhow::ensure!(valid_schema(schema), "invalid schema name `{schema}`");
    let (client, notes, _) = open(url, None).await?;
    // One question answers both "does the schema exist" and "has a supervisor written to it".
    let ready: bool = one(
        &client,
        None,
        "looking for the schema",
        "SELECT to_regclass($1) IS NOT NULL",
        &[&format!("{schema}.task_events")],
    )
    .await?
    .get(0);
    if !ready {
        return Err(anyhow::Error::new(Permanent(format!(
            "schema `{schema}` has no orchestrate tables in that database: no supervisor has written to it yet, \
             or the schema name is wrong (database.schema in the config file)"
        ))));
    }
    answer(
        None,
        ANSWER_WITHIN,
        "opening a read-only session",
        client.batch_execute(&format!(
            "SET search_path TO {schema}; SET default_transaction_read_only = on"
        )),
    )
    .await?;
    Ok((client, notes))
}

/// A read-only session that `LISTEN`s for new events *before* anything is read, so no event falls
/// between a catch-up read and the first notification. A schema without our tables is a passing
/// error here: a follower may start before any supervisor has written (like `tail -F`).
pub async fn connect_following(url: &str, schema: &str) -> Result<(Client, Notifications)> {
    let (client, notes, _) = open(url, None).await?;
    anyhow::ensure!(valid_schema(schema), "invalid schema name `{schema}`");
    answer(
        None,
        ANSWER_WITHIN,
        "starting to listen",
        client.batch_execute(&format!(
            "SET search_path TO {schema}; SET default_transaction_read_only = on; LISTEN {}",
            channel(schema)
        )),
    )
    .await?;
    let ready: bool = one(
        &client,
        None,
        "looking for the schema",
        "SELECT to_regclass('task_events') IS NOT NULL",
        &[],
    )
    .await?
    .get(0);
    if !ready {
        // Say what we wait for (a wrong schema name shows up here too); the caller keeps waiting.
        anyhow::bail!(
            "schema `{schema}` has no orchestrate tables yet: waiting for a supervisor to write to it \
             (if none should be needed, check database.schema in the config file)"
        );
    }
    Ok((client, notes))
}

/// A timestamp column as the SQLite mirror stores it.
macro_rules! text_time {
    ($col:literal) => {
        concat!(
            "to_char(",
            $col,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        )
    };
}

fn row_from_pg(r: &tokio_postgres::Row) -> TaskRow {
    let payload: serde_json::Value = r.get(4);
    TaskRow {
        id: r.get(0),
        version: r.get::<_, i64>(1) as u64,
        state: r.get(2),
        agent: r.get(3),
        payload: serde_json::from_value(payload).unwrap_or_default(),
        updated_at: r.get(5),
        note: r.get(6),
    }
}

const ROW_COLUMNS: &str = concat!(
    "id, version, state, agent, payload, ",
    text_time!("updated_at"),
    ", note"
);

async fn task_rows(
    client: &Client,
    filter: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<TaskRow>> {
    let rows = rows(
        client,
        None,
        "reading tasks",
        &format!("SELECT {ROW_COLUMNS} FROM tasks {filter} ORDER BY updated_at, id"),
        params,
    )
    .await?;
    Ok(rows.iter().map(row_from_pg).collect())
}

pub async fn list(client: &Client, state: Option<&str>) -> Result<Vec<TaskRow>> {
    match state {
        Some(s) => task_rows(client, "WHERE state = $1", &[&s]).await,
        None => task_rows(client, "", &[]).await,
    }
}

/// Pending tasks with a wait reason, without loading the rest of the pending set.
pub async fn waiting(client: &Client) -> Result<Vec<TaskRow>> {
    task_rows(client, "WHERE state = 'pending' AND note IS NOT NULL", &[]).await
}

/// Completed tasks whose changes stayed on their branch (the result names one), oldest first.
pub async fn kept_branches(client: &Client) -> Result<Vec<TaskRow>> {
    task_rows(
        client,
        "WHERE state = 'completed' AND payload->'workspace'->>'branch' IS NOT NULL",
        &[],
    )
    .await
}

pub async fn get(client: &Client, id: &str) -> Result<Option<TaskRow>> {
    Ok(task_rows(client, "WHERE id = $1", &[&id]).await?.pop())
}

pub async fn counts(client: &Client) -> Result<Vec<(String, usize)>> {
    let rows = rows(
        client,
        None,
        "counting tasks",
        "SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state",
        &[],
    )
    .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as usize))
        .collect())
}

pub async fn agent_totals(client: &Client) -> Result<Vec<AgentTotals>> {
    // Sums of bigint are numeric in PostgreSQL: cast back. Byte order of names, as SQLite sorts.
    let rows = rows(
        client,
        None,
        "reading attempts",
        "SELECT agent, count(*), count(*) FILTER (WHERE outcome = 'completed'),
                    count(*) FILTER (WHERE outcome <> 'completed' AND finished_at IS NOT NULL),
                    coalesce(sum(cost_usd), 0), coalesce(sum(input_tokens), 0)::bigint,
                    coalesce(sum(output_tokens), 0)::bigint
             FROM attempts GROUP BY agent ORDER BY agent COLLATE \"C\"",
        &[],
    )
    .await?;
    Ok(rows
        .iter()
        .map(|r| AgentTotals {
            agent: r.get(0),
            attempts: r.get::<_, i64>(1) as u64,
            completed: r.get::<_, i64>(2) as u64,
            failed: r.get::<_, i64>(3) as u64,
            cost_usd: r.get(4),
            input_tokens: r.get::<_, i64>(5) as u64,
            output_tokens: r.get::<_, i64>(6) as u64,
        })
        .collect())
}

pub async fn events_since(client: &Client, seq: i64, limit: usize) -> Result<Vec<Event>> {
    let rows = rows(
        client,
        None,
        "reading events",
        concat!(
            "SELECT e.seq, e.host, e.task_id, e.version, e.state, ",
            text_time!("e.at"),
            ", t.agent, CASE WHEN e.state = 'failed' AND t.version = e.version",
            " THEN t.payload->>'error' END",
            " FROM task_events e LEFT JOIN tasks t ON t.id = e.task_id",
            " WHERE e.seq > $1 ORDER BY e.seq LIMIT $2"
        ),
        &[&seq, &(limit as i64)],
    )
    .await?;
    Ok(rows
        .iter()
        .map(|r| Event {
            seq: r.get(0),
            host: r.get(1),
            task_id: r.get(2),
            version: r.get::<_, i64>(3) as u64,
            state: r.get(4),
            at: r.get(5),
            agent: r.get(6),
            error: r.get(7),
        })
        .collect())
}

/// The latest event's sequence number (0 when there is none).
pub async fn max_seq(client: &Client) -> Result<i64> {
    Ok(one(
        client,
        None,
        "reading events",
        "SELECT coalesce(max(seq), 0) FROM task_events",
        &[],
    )
    .await?
    .get(0))
}

pub async fn supervisors(client: &Client) -> Result<Vec<SupervisorRow>> {
    let rows = rows(
        client,
        None,
        "reading supervisors",
        concat!(
            "SELECT host, instance, pid, ",
            text_time!("started_at"),
            ", ",
            text_time!("heartbeat_at"),
            " FROM supervisors ORDER BY started_at"
        ),
        &[],
    )
    .await?;
    Ok(rows
        .iter()
        .map(|r| SupervisorRow {
            host: r.get(0),
            instance: r.get(1),
            pid: r.get::<_, i32>(2) as u32,
            started_at: r.get(3),
            heartbeat_at: r.get(4),
        })
        .collect())
}

pub async fn spent_since(client: &Client, since: &str) -> Result<Vec<SpentRow>> {
    let rows = rows(
        client,
        None,
        "reading attempts",
        concat!(
            "SELECT task_id, n, agent, ",
            text_time!("finished_at"),
            ", cost_usd, input_tokens, output_tokens FROM attempts
             WHERE finished_at >= $1::text::timestamptz ORDER BY finished_at, task_id COLLATE \"C\", n"
        ),
        &[&since],
    )
    .await?;
    Ok(rows
        .iter()
        .map(|r| SpentRow {
            task_id: r.get(0),
            n: r.get::<_, i32>(1) as u32,
            agent: r.get(2),
            finished_at: r.get(3),
            cost_usd: r.get(4),
            input_tokens: r.get::<_, Option<i64>>(5).map(|v| v.max(0) as u64),
            output_tokens: r.get::<_, Option<i64>>(6).map(|v| v.max(0) as u64),
        })
        .collect())
}

pub async fn attempts_of(client: &Client, id: &str) -> Result<Vec<AttemptLine>> {
    let rows = rows(
        client,
        None,
        "reading attempts",
        concat!(
            "SELECT n, agent, ",
            text_time!("started_at"),
            ", ",
            text_time!("finished_at"),
            ", outcome, exit_code, check_result::text FROM attempts WHERE task_id = $1 ORDER BY n"
        ),
        &[&id],
    )
    .await?;
    Ok(rows
        .iter()
        .map(|r| AttemptLine {
            n: r.get::<_, i32>(0) as u32,
            agent: r.get(1),
            started_at: r.get(2),
            finished_at: r.get(3),
            outcome: r.get(4),
            exit_code: r.get(5),
            check: r
                .get::<_, Option<String>>(6)
                .and_then(|j| serde_json::from_str(&j).ok()),
        })
        .collect())
}
