//! Reads of the cluster queue for the views (`status`, `tasks`, `watch`, `serve`): which hosts are
//! in the cluster, whether each is alive, the leases it holds, and which host runs which task.
//!
//! It opens a read-only session of its own (`default_transaction_read_only`), bounded like every
//! other read ([`ANSWER_WITHIN`] for connecting, each statement and each row), so a view may look
//! from any machine without a host name, an instance or a lease of its own, and never changes the
//! queue. Ages and lease times are the database's clock (`now()` in the statement), as in
//! [`queue`](super::queue); no statement takes a time from the caller.
//!
//! A schema without the cluster tables (cluster mode never switched on there) is not an error: the
//! answer is empty and says so ([`Cluster::present`]). Nothing here creates a table or a schema,
//! and nothing here decides anything about the queue: that is [`queue`](super::queue)'s alone.

use std::time::Duration;

use anyhow::Result;
use tokio_postgres::Client;

use super::queue::HostRow;
use super::{ANSWER_WITHIN, answer, one, open, rows};
use crate::config::valid_schema;

/// The cluster as a view sees it at one moment of the database's clock.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cluster {
    /// The schema has the cluster tables (some host has connected in cluster mode).
    pub present: bool,
    /// Every host that ever registered, by name.
    pub hosts: Vec<HostRow>,
    /// Every task in the queue, oldest first.
    pub queue: Vec<QueueRow>,
}

/// One task of the cluster queue, without its payload.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueRow {
    pub id: String,
    /// The host that published it (whose tree it lands in).
    pub origin: String,
    /// `pending`, `running` or `done`.
    pub state: String,
    /// `completed` or `failed` once done.
    pub outcome: Option<String>,
    /// The host running it now: set only while it runs and its lease has not run out.
    pub owner: Option<String>,
    /// The host that claimed it last, whatever became of the claim: for a finished task the host
    /// that ran it, for a running one whose lease ran out, or a pending one put back by a reclaim,
    /// the host that lost it. A retry or a release clears it.
    pub last_owner: Option<String>,
    /// The current claim's fencing token (0 before the first claim).
    pub fence: i64,
    pub attempts: u32,
    /// How long the running claim still holds, by the database's clock; `None` when it is not
    /// running or its lease has run out.
    pub lease_left: Option<Duration>,
}

/// The hosts, read as `queue::Queue::hosts` reads them (one statement for both).
use super::queue::HOSTS;

const QUEUE: &str = "
SELECT id, origin, state, outcome,
    CASE WHEN state = 'running' AND lease_until >= now() THEN owner END,
    owner, fence, attempts,
    CASE WHEN state = 'running' AND lease_until >= now()
        THEN extract(epoch FROM lease_until - now())::float8 END
FROM cluster_queue ORDER BY created_at, id";

/// Every statement sent here, for the test that none takes a time from the caller.
pub const STATEMENTS: &[&str] = &[HOSTS, QUEUE];

fn from_secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)
}

/// A read-only session on `schema`, or `None` when it has no cluster tables.
pub async fn connect(url: &str, schema: &str) -> Result<Option<Client>> {
    anyhow::ensure!(valid_schema(schema), "invalid schema name `{schema}`");
    let (client, _, _) = open(url, None).await?;
    let present: bool = one(
        &client,
        None,
        "looking for the cluster tables",
        "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
        &[
            &format!("{schema}.cluster_hosts"),
            &format!("{schema}.cluster_queue"),
        ],
    )
    .await?
    .get(0);
    if !present {
        return Ok(None);
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
    Ok(Some(client))
}

/// Every host that ever registered; `lease` decides which count as alive.
pub async fn hosts(client: &Client, lease: Duration) -> Result<Vec<HostRow>> {
    let lease = lease.as_secs_f64();
    let rows = rows(client, None, "reading hosts", HOSTS, &[&lease]).await?;
    Ok(rows
        .iter()
        .map(|r| HostRow {
            name: r.get(0),
            instance: r.get(1),
            labels: r.get(2),
            started_at: r.get(3),
            heartbeat_age: from_secs(r.get(4)),
            alive: r.get(5),
            leases: u32::try_from(r.get::<_, i64>(6)).unwrap_or(u32::MAX),
        })
        .collect())
}

/// Every task of the queue, without payloads.
pub async fn queue(client: &Client) -> Result<Vec<QueueRow>> {
    let rows = rows(client, None, "reading the cluster queue", QUEUE, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| QueueRow {
            id: r.get(0),
            origin: r.get(1),
            state: r.get(2),
            outcome: r.get(3),
            owner: r.get(4),
            last_owner: r.get(5),
            fence: r.get(6),
            attempts: u32::try_from(r.get::<_, i32>(7)).unwrap_or(0),
            lease_left: r.get::<_, Option<f64>>(8).map(from_secs),
        })
        .collect())
}

/// Hosts and queue in one session; empty (`present: false`) when the schema has no cluster
/// tables.
pub async fn read(url: &str, schema: &str, lease: Duration) -> Result<Cluster> {
    let Some(client) = connect(url, schema).await? else {
        return Ok(Cluster::default());
    };
    Ok(Cluster {
        present: true,
        hosts: hosts(&client, lease).await?,
        queue: queue(&client).await?,
    })
}

/// [`read`] for a synchronous caller (a CLI command, a server's blocking thread), on a runtime of
/// its own. Never call it on an async runtime's thread.
pub fn read_blocking(url: &str, schema: &str, lease: Duration) -> Result<Cluster> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(read(url, schema, lease))
}
