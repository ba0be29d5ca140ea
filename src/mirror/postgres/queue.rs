//! The cluster queue: PostgreSQL as the coordinator of who runs what across hosts.
//!
//! # Theory of operation
//!
//! In cluster mode a task's origin host publishes it into `cluster_queue` (its id is the primary
//! key, so an id is unique across the cluster); any host whose agents, labels and name fit claims it
//! with `SELECT … FOR UPDATE SKIP LOCKED`, which hands each row to one claimer and lets the others
//! pass it by without waiting. A claim is a **lease** (the row's `lease_until`) and a **fence**
//! (`fence`, one more on every claim of that task). While the attempt runs its host renews the lease;
//! a lease that runs out (the host paused, partitioned or dead) lets any host claim the task again,
//! with a higher fence and one more attempt. Every write of an attempt carries its fence and is
//! refused once the fence is not the task's current one, or its lease has run out: a late host can
//! never renew, finish or land what another host now owns. Its finish is still kept, as a *stale*
//! result row beside the real outcome, so nothing it did is lost from view.
//!
//! Results flow back by pull: the origin is offered the outcomes of its tasks ([`Queue::outcomes`])
//! until it acknowledges them ([`Queue::delivered`]); `NOTIFY` on the cluster's [`channel`] wakes
//! idle hosts and origins ([`Queue::listen`]), as a hint beside their polling.
//!
//! Time is the database's alone. Every lease, heartbeat and age is computed by `now()` in the
//! statement that reads or writes it; no statement here takes a time from the caller (a test
//! prepares [`STATEMENTS`] and checks that none has a time parameter), so the hosts' clocks may
//! disagree by any amount.
//!
//! This module owns the three `cluster_*` tables and the statements on them. It never touches the
//! files of a tree, the mirror's tables, or the supervisor: what a lease means for an agent (start
//! it, stop it when [`Held::Fenced`]) and what a result means for the origin's tree is the caller's.
//! Like the rest of `postgres`, it must never run on the supervisor loop's thread.

use std::time::Duration;

use anyhow::{Context, Result};

use super::{
    ANSWER_WITHIN, CLAIM_LOCK, DDL_LOCK_WAIT, LOCK_WITHIN, MIGRATE_LOCK, Notifications, Session,
    answer, connect, is_no_answer, open, schema_has, xact_lock,
};

/// Settings of one host's queue handle. The configuration has no `cluster:` section yet; the caller
/// passes them.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a claim holds a task without a renewal (the issue's `lease_seconds`, default 30 s).
    pub lease: Duration,
    /// One level of priority more per `aging` waited since publishing, so low priorities are never
    /// starved (as `task_queue.aging_minutes` on one host); zero turns aging off.
    pub aging: Duration,
    /// How many tasks may hold a live lease at once across the cluster (`cluster.max_concurrent`);
    /// `None`: no such limit. Claims then take turns under an advisory lock, so two hosts cannot
    /// both see one slot free.
    pub max_running: Option<u32>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            lease: Duration::from_secs(30),
            aging: Duration::ZERO,
            max_running: None,
        }
    }
}

/// A task as its origin publishes it.
#[derive(Debug, Clone, Default)]
pub struct Publish {
    pub id: String,
    /// The task file's text, as the origin validated it.
    pub payload: String,
    /// Higher runs first (the task's `priority`).
    pub priority: i64,
    /// Labels a host must all have to claim it.
    pub requires: Vec<String>,
    /// The one host that may claim it.
    pub pinned_host: Option<String>,
    /// The agent the task names; `None` when any agent may run it.
    pub agent: Option<String>,
    /// Ids that must have completed (anywhere in the cluster) before it may be claimed.
    pub dependencies: Vec<String>,
    /// Claims allowed in all (the first plus `max_retries`); at least 1.
    pub max_attempts: u32,
    /// The commit the task's change is to be made on and its patch taken against.
    pub base_commit: Option<String>,
    /// The agent the origin's router chose (a preference: a runner without it uses its fallback
    /// chain), and why.
    pub routed_agent: Option<String>,
    pub routed_because: Option<String>,
}

/// What a host may run, for [`Queue::claim`].
#[derive(Debug, Clone, Default)]
pub struct Capacity {
    /// This host's labels: a task's `requires` must be among them.
    pub labels: Vec<String>,
    /// Agents this host can start now (configured, not cooling down, within their limits): a task
    /// that names an agent is claimed only by a host offering it. Empty claims nothing.
    pub agents: Vec<String>,
    /// How many tasks to claim at most.
    pub limit: u32,
}

/// A claimed task: the host runs it while it can renew the lease with this fence.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub id: String,
    pub fence: i64,
    /// This claim's attempt number (1 for the first).
    pub attempt: u32,
    /// How many attempts the task has: the origin's word, which the runner's verdicts follow.
    pub max_attempts: u32,
    pub origin: String,
    pub priority: i64,
    pub base_commit: Option<String>,
    pub payload: String,
    /// The claim just before this one, when its lease ran out: taken over here, or put back to
    /// `pending` by [`Queue::reclaim`] first.
    pub reclaimed_from: Option<LostClaim>,
    /// What the origin's router chose ([`Publish::routed_agent`]).
    pub routed_agent: Option<String>,
    pub routed_because: Option<String>,
}

/// A claim whose lease ran out, as the claim after it learns of it.
#[derive(Debug, Clone, PartialEq)]
pub struct LostClaim {
    pub host: String,
    /// When it was claimed and when its lease ran out (RFC 3339, the database's clock).
    pub claimed_at: String,
    pub lease_ended: String,
}

/// Whether a fenced write went through.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// The fence is the task's current one and its lease had not run out: the write is done.
    Ok,
    /// A newer claim exists, or the lease ran out: nothing changed for the task (a finish is kept as
    /// a stale result). Stop the attempt; never land its work.
    Fenced,
}

/// How an attempt ended, as the runner reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Completed,
    Failed,
    /// Run it again (a retryable failure with attempts left), not before `after` has passed.
    Retry {
        after: Duration,
    },
    /// The runner gave its lease up (no renewal was answered in time) and stopped the attempt: the
    /// result is kept as a stale attempt whatever it says, and the task goes back to pending unless
    /// another host took it meanwhile (the attempt counts, as after a crash).
    Abandoned,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Completed => "completed",
            End::Failed => "failed",
            End::Retry { .. } => "retry",
            End::Abandoned => "failed",
        }
    }
}

/// An attempt's result, for the origin to materialise into its tree.
#[derive(Debug, Clone)]
pub struct Finished {
    pub end: End,
    /// The result record (`X_result.yaml`), as text.
    pub record: String,
    /// What the agent said.
    pub output: String,
    /// The change, as a patch against the task's base commit.
    pub patch: String,
    /// The end of the attempt's log.
    pub log_tail: String,
}

/// One row of `cluster_results`: what one attempt reported, as the outcome or as a stale attempt.
/// A task the cluster failed itself (its last lease ran out) has no row here: its queue row says
/// why (`reason`).
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    pub task_id: String,
    pub fence: i64,
    pub host: String,
    /// `completed`, `failed` or `retry`.
    pub end: String,
    /// The attempt had lost its lease when it finished: this is not the task's outcome.
    pub stale: bool,
    pub record: String,
    pub output: String,
    pub patch: String,
    pub log_tail: String,
}

/// A running task whose lease ran out (by the database's clock).
#[derive(Debug, Clone, PartialEq)]
pub struct Expired {
    pub id: String,
    pub owner: String,
    pub fence: i64,
    pub attempts: u32,
    pub max_attempts: u32,
    /// How long ago the lease ran out.
    pub overdue: Duration,
}

/// What [`Queue::reclaim`] did with an expired lease.
#[derive(Debug, Clone, PartialEq)]
pub struct Reclaimed {
    pub id: String,
    /// The host that held the lease.
    pub owner: String,
    /// `true`: its attempts are spent and it failed; `false`: it is pending again.
    pub failed: bool,
}

/// One host of the cluster, for `status`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRow {
    pub name: String,
    pub instance: String,
    pub labels: Vec<String>,
    /// RFC 3339, UTC, by the database's clock.
    pub started_at: String,
    /// How long ago its last heartbeat was.
    pub heartbeat_age: Duration,
    /// It has not left and its last heartbeat is within one lease.
    pub alive: bool,
    /// Leases it holds that have not run out.
    pub leases: u32,
}

/// A finished task of this origin, for it to materialise into its tree and land.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub id: String,
    pub completed: bool,
    /// The claim that decided it.
    pub fence: i64,
    pub attempts: u32,
    pub base_commit: Option<String>,
    /// Why the cluster failed it itself (its last lease ran out); then `result` is `None`.
    pub reason: Option<String>,
    /// What the deciding attempt reported (never a stale attempt's).
    pub result: Option<ResultRow>,
}

/// A task with this id is already in the queue: the caller quarantines the new file.
#[derive(Debug, thiserror::Error)]
#[error("task id {id} is already in the cluster queue (published by host {origin}, {state})")]
pub struct Clash {
    pub id: String,
    pub origin: String,
    pub state: String,
    /// Its origin took delivery of its outcome: the id is spent.
    pub delivered: bool,
}

impl Clash {
    /// The row is this very task, published before by `host` and not yet settled in its tree (a
    /// restart, or a crash before an outcome was taken, publishes it again): no clash at all.
    pub fn is_own_unsettled(&self, host: &str) -> bool {
        self.origin == host && !self.delivered
    }
}

/// Another live process holds this host name.
#[derive(Debug, thiserror::Error)]
#[error(
    "host name {name} is in use by another live supervisor (instance {instance}, last heartbeat {} s ago): give each host its own name",
    .age.as_secs()
)]
pub struct NameInUse {
    pub name: String,
    pub instance: String,
    pub age: Duration,
}

pub(super) const DDL: &str = "
CREATE TABLE IF NOT EXISTS cluster_hosts(
    name text PRIMARY KEY,
    instance text NOT NULL,
    labels text[] NOT NULL,
    started_at timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    alive boolean NOT NULL);
CREATE TABLE IF NOT EXISTS cluster_queue(
    id text PRIMARY KEY,
    origin text NOT NULL,
    state text NOT NULL CHECK (state IN ('pending', 'running', 'done')),
    outcome text CHECK (outcome IN ('completed', 'failed')),
    priority bigint NOT NULL,
    requires text[] NOT NULL,
    pinned_host text,
    agent text,
    dependencies text[] NOT NULL,
    max_attempts integer NOT NULL CHECK (max_attempts >= 1),
    payload text NOT NULL,
    base_commit text,
    owner text,
    lease_until timestamptz,
    fence bigint NOT NULL,
    attempts integer NOT NULL,
    not_before timestamptz,
    created_at timestamptz NOT NULL,
    claimed_at timestamptz,
    finished_at timestamptz,
    reason text,
    delivered_at timestamptz,
    CHECK (state <> 'running' OR (owner IS NOT NULL AND lease_until IS NOT NULL)),
    CHECK ((state = 'done') = (outcome IS NOT NULL)));
ALTER TABLE cluster_queue ADD COLUMN IF NOT EXISTS routed_agent text;
ALTER TABLE cluster_queue ADD COLUMN IF NOT EXISTS routed_because text;
CREATE INDEX IF NOT EXISTS cluster_queue_open ON cluster_queue(priority DESC, created_at)
    WHERE state <> 'done';
CREATE INDEX IF NOT EXISTS cluster_queue_undelivered ON cluster_queue(origin, finished_at)
    WHERE state = 'done' AND delivered_at IS NULL;
CREATE INDEX IF NOT EXISTS cluster_queue_leases ON cluster_queue(lease_until) WHERE state = 'running';
CREATE TABLE IF NOT EXISTS cluster_results(
    task_id text NOT NULL REFERENCES cluster_queue(id) ON DELETE CASCADE,
    fence bigint NOT NULL,
    host text NOT NULL,
    outcome text NOT NULL CHECK (outcome IN ('completed', 'failed', 'retry')),
    stale boolean NOT NULL,
    record text NOT NULL,
    output text NOT NULL,
    patch text NOT NULL,
    log_tail text NOT NULL,
    at timestamptz NOT NULL,
    PRIMARY KEY(task_id, fence));";

const REGISTER: &str = "
INSERT INTO cluster_hosts AS h(name, instance, labels, started_at, heartbeat_at, alive)
VALUES($1, $2, $3, now(), now(), true)
ON CONFLICT (name) DO UPDATE SET instance = excluded.instance, labels = excluded.labels,
    started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, alive = true
WHERE h.instance = excluded.instance OR NOT h.alive OR h.heartbeat_at < now() - $4::float8 * interval '1 second'
    OR h.instance = $5
RETURNING name";

const HOLDER: &str = "
SELECT instance, extract(epoch FROM now() - heartbeat_at)::float8 FROM cluster_hosts WHERE name = $1";

const HEARTBEAT: &str = "
UPDATE cluster_hosts SET heartbeat_at = now(), alive = true WHERE name = $1 AND instance = $2";

const LEAVE: &str = "UPDATE cluster_hosts SET alive = false WHERE name = $1 AND instance = $2";

const PUBLISH: &str = "
INSERT INTO cluster_queue(id, origin, state, priority, requires, pinned_host, agent, dependencies,
    max_attempts, payload, base_commit, routed_agent, routed_because, fence, attempts, created_at)
VALUES($1, $2, 'pending', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 0, 0, now())
ON CONFLICT (id) DO NOTHING
RETURNING id";

const CLASH: &str =
    "SELECT origin, state, delivered_at IS NOT NULL FROM cluster_queue WHERE id = $1";

/// One statement: pick what this host may run, best first, skipping rows another claim holds, and
/// take them. A running row whose lease ran out is taken like a pending one (the fence and the
/// attempt count grow either way); one whose attempts are spent is left to [`Queue::reclaim`].
/// Its clock is the statement's start, not the transaction's: under a cluster-wide limit the claim
/// first waits for a lock in its transaction, and a lease must not be dated before that wait.
const CLAIM: &str = "
WITH picked AS (
    SELECT q.id, q.owner AS prev_owner,
        CASE WHEN q.owner IS NOT NULL THEN extract(epoch FROM q.claimed_at)::float8 END AS prev_claimed,
        extract(epoch FROM q.lease_until)::float8 AS prev_until
    FROM cluster_queue q
    WHERE (q.state = 'pending' OR (q.state = 'running' AND q.lease_until < statement_timestamp()))
      AND q.attempts < q.max_attempts
      AND (q.not_before IS NULL OR q.not_before <= statement_timestamp())
      AND (q.pinned_host IS NULL OR q.pinned_host = $1)
      AND q.requires <@ $2::text[]
      AND (q.agent IS NULL OR q.agent = ANY($3::text[]))
      AND NOT EXISTS (
          SELECT 1 FROM unnest(q.dependencies) AS d(id)
          WHERE NOT EXISTS (
              SELECT 1 FROM cluster_queue x
              WHERE x.id = d.id AND x.state = 'done' AND x.outcome = 'completed'))
    ORDER BY q.priority + CASE WHEN $5::float8 > 0
            THEN floor(extract(epoch FROM statement_timestamp() - q.created_at) / $5::float8)::bigint
            ELSE 0 END DESC,
        q.created_at, q.id
    LIMIT $4
    FOR UPDATE OF q SKIP LOCKED)
UPDATE cluster_queue q
SET state = 'running', owner = $1, lease_until = statement_timestamp() + $6::float8 * interval '1 second',
    fence = q.fence + 1, attempts = q.attempts + 1, claimed_at = statement_timestamp(), not_before = NULL
FROM picked WHERE q.id = picked.id
RETURNING q.id, q.fence, q.attempts, q.origin, q.priority, q.base_commit, q.payload, picked.prev_owner,
    extract(epoch FROM q.created_at)::float8, q.routed_agent, q.routed_because, q.max_attempts,
    picked.prev_claimed, picked.prev_until";

/// Tasks holding a live lease, anywhere in the cluster (a lease run out is a dead host's, and is
/// the next claim's to take).
const RUNNING: &str = "SELECT count(*) FROM cluster_queue WHERE state = 'running' AND lease_until >= statement_timestamp()";

const RENEW: &str = "
UPDATE cluster_queue SET lease_until = now() + $4::float8 * interval '1 second'
WHERE id = $1 AND fence = $2 AND owner = $3 AND state = 'running' AND lease_until >= now()";

/// [`RENEW`] for every lease a host holds, in one statement: the ids renewed come back.
const RENEW_ALL: &str = "
UPDATE cluster_queue q SET lease_until = now() + $4::float8 * interval '1 second'
FROM unnest($1::text[], $2::bigint[]) AS h(id, fence)
WHERE q.id = h.id AND q.fence = h.fence AND q.owner = $3 AND q.state = 'running'
  AND q.lease_until >= now()
RETURNING q.id";

/// Give a claim back unused: the attempt never began, so it is not counted (the fence stays, as
/// fences only grow).
const RELEASE: &str = "
UPDATE cluster_queue SET state = 'pending', owner = NULL, lease_until = NULL, attempts = attempts - 1
WHERE id = $1 AND fence = $2 AND owner = $3 AND state = 'running' AND lease_until >= now()";

/// The task row, locked for a finish (finishes of one task go one at a time).
const LOCK_TASK: &str = "SELECT fence, origin FROM cluster_queue WHERE id = $1 FOR UPDATE";

const SAME_FINISH: &str = "SELECT stale FROM cluster_results WHERE task_id = $1 AND fence = $2";

/// The outcome, only while the fence is current and its lease has not run out. `$4` is the next
/// state: `done` for an end, `pending` for a retry (after `$6` seconds). The queue counts the
/// attempts (a claim is one, whatever became of it): a task sent back to `pending` with none left
/// fails here, saying why, rather than waiting for a claim that can never come. The state it took
/// comes back.
const FINISH: &str = "
UPDATE cluster_queue
SET state = CASE WHEN $4 = 'pending' AND attempts >= max_attempts THEN 'done' ELSE $4 END,
    outcome = CASE WHEN $4 = 'pending' AND attempts >= max_attempts THEN 'failed' ELSE $5 END,
    reason = CASE WHEN $4 = 'pending' AND attempts >= max_attempts
        THEN 'attempt ' || attempts || ' on host ' || owner || ' was the last (' || max_attempts
            || ' allowed): ' || $7
        ELSE reason END,
    lease_until = NULL, finished_at = now(),
    owner = CASE WHEN $4 = 'pending' AND attempts < max_attempts THEN NULL ELSE owner END,
    not_before = CASE WHEN $4 = 'pending' AND attempts < max_attempts
        THEN now() + $6::float8 * interval '1 second' END
WHERE id = $1 AND fence = $2 AND owner = $3 AND state = 'running' AND lease_until >= now()
RETURNING state";

const RESULT: &str = "
INSERT INTO cluster_results(task_id, fence, host, outcome, stale, record, output, patch, log_tail, at)
VALUES($1, $2, $3, $4, $5, $6, $7, $8, $9, now())";

const EXPIRED: &str = "
SELECT id, owner, fence, attempts, max_attempts, extract(epoch FROM now() - lease_until)::float8
FROM cluster_queue WHERE state = 'running' AND lease_until < now() ORDER BY lease_until, id";

/// Expired leases, decided: back to pending, or failed (with the reason on the row) when the
/// attempts are spent. A task back in `pending` keeps the lost claim's owner and lease end (a
/// retry or a release clears them), so the next claim can say whose attempt it takes over.
const RECLAIM: &str = "
WITH gone AS (
    SELECT id, owner, attempts >= max_attempts AS spent FROM cluster_queue
    WHERE state = 'running' AND lease_until < now()
    FOR UPDATE SKIP LOCKED)
UPDATE cluster_queue q
SET state = CASE WHEN gone.spent THEN 'done' ELSE 'pending' END,
    outcome = CASE WHEN gone.spent THEN 'failed' END,
    lease_until = CASE WHEN gone.spent THEN NULL ELSE q.lease_until END,
    finished_at = CASE WHEN gone.spent THEN now() END,
    reason = CASE WHEN gone.spent THEN 'the lease of attempt ' || q.attempts || ' ran out on host '
        || gone.owner || ' and no attempts are left' END
FROM gone WHERE q.id = gone.id
RETURNING q.id, gone.owner, gone.spent, q.origin";

const RESULTS: &str = "
SELECT task_id, fence, host, outcome, stale, record, output, patch, log_tail
FROM cluster_results WHERE task_id = $1 ORDER BY fence";

/// Outcomes of an origin's tasks that it has not taken delivery of, with the result that decided
/// each (none when the cluster failed the task itself: then `reason` says why).
const OUTCOMES: &str = "
SELECT q.id, q.outcome, q.fence, q.attempts, q.base_commit, q.reason,
    r.host, r.outcome, r.record, r.output, r.patch, r.log_tail
FROM cluster_queue q
LEFT JOIN cluster_results r ON r.task_id = q.id AND r.fence = q.fence AND NOT r.stale
WHERE q.origin = $1 AND q.state = 'done' AND q.delivered_at IS NULL
ORDER BY q.finished_at, q.id
LIMIT $2";

const DELIVERED: &str = "
UPDATE cluster_queue SET delivered_at = now()
WHERE id = $1 AND origin = $2 AND state = 'done' AND delivered_at IS NULL";

/// The hosts: alive means not left and beaten within one lease (`$1`, the caller's setting).
pub(super) const HOSTS: &str = "
SELECT h.name, h.instance, h.labels,
    to_char(h.started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
    extract(epoch FROM now() - h.heartbeat_at)::float8,
    h.alive AND h.heartbeat_at >= now() - $1::float8 * interval '1 second',
    (SELECT count(*) FROM cluster_queue q
     WHERE q.state = 'running' AND q.owner = h.name AND q.lease_until >= now())
FROM cluster_hosts h ORDER BY h.name";

/// Wake the hosts listening on the cluster's channel: something became claimable, or an outcome
/// is waiting for its origin. A hint only (a lost one costs a poll's delay).
const WAKE: &str = "SELECT pg_notify($1, $2)";

/// Every statement this module sends, for the test that none takes a time from the caller.
pub const STATEMENTS: &[&str] = &[
    REGISTER,
    HOLDER,
    HEARTBEAT,
    LEAVE,
    PUBLISH,
    CLASH,
    CLAIM,
    RUNNING,
    RENEW,
    RENEW_ALL,
    RELEASE,
    LOCK_TASK,
    SAME_FINISH,
    FINISH,
    RESULT,
    EXPIRED,
    RECLAIM,
    RESULTS,
    OUTCOMES,
    DELIVERED,
    HOSTS,
    WAKE,
];

/// The `NOTIFY` channel of the cluster queue in a schema (beside the mirror's, which carries event
/// numbers): `orchestrate_cluster`, or `orchestrate_cluster_<schema>` outside `public`, cut to the
/// 63 bytes a channel name may have (schema names are ASCII).
pub fn channel(schema: &str) -> String {
    let mut name = if schema == "public" {
        "orchestrate_cluster".to_string()
    } else {
        format!("orchestrate_cluster_{schema}")
    };
    name.truncate(63);
    name
}

/// A connection that listens on the cluster's channel: each `NOTIFY` is one wake-up. Dropping it
/// closes the connection.
pub struct Wakeups {
    _client: tokio_postgres::Client,
    driver: tokio::task::AbortHandle,
    notes: Notifications,
}

impl Wakeups {
    /// The next wake-up; `None` once the connection ended (listen again).
    pub async fn next(&mut self) -> Option<()> {
        self.notes.recv().await
    }
}

impl Drop for Wakeups {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Create the cluster tables and columns that are missing, under the migration lock the mirror's
/// tables use (so hosts starting together do not race on the DDL). Each change is additive and
/// idempotent (`IF NOT EXISTS`), so the DDL itself is the newest form and no version is kept.
async fn migrate(session: &mut Session) -> Result<()> {
    const WHAT: &str = "migrating the cluster tables";
    let a = session.answers.clone();
    let a = Some(&*a);
    // Every start comes here: with the tables current it reads and locks nothing.
    if schema_has(&session.client, a, WHAT, DDL).await? {
        return Ok(());
    }
    let tx = answer(a, ANSWER_WITHIN, WHAT, session.client.transaction()).await?;
    xact_lock(
        &tx,
        a,
        LOCK_WITHIN,
        "waiting for the migration lock",
        MIGRATE_LOCK,
    )
    .await?;
    // Hosts that start together: the first migrates, the others find it done once they have the
    // lock, and run no DDL (which would lock the tables the first one is already using).
    if !schema_has(&tx, a, WHAT, DDL).await? {
        answer(a, ANSWER_WITHIN, WHAT, tx.batch_execute(DDL_LOCK_WAIT)).await?;
        // Several table locks may be waited for, each up to `DDL_LOCK_WAIT`.
        answer(a, LOCK_WITHIN, WHAT, tx.batch_execute(DDL)).await?;
    }
    answer(a, ANSWER_WITHIN, WHAT, tx.commit()).await?;
    Ok(())
}

/// Seconds since the epoch (the database's clock) as the records write times; `None` for one no
/// record could hold (the mirrors cast these to timestamps).
fn epoch_text(secs: f64) -> Option<String> {
    if !secs.is_finite() {
        return None;
    }
    let nanos = (secs * 1e9) as i128;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .map(crate::fsutil::fmt_time)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn from_secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)
}

fn count(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

/// One host's handle on the queue: its name, its instance, its settings, and a session that is
/// made again on the next call after the connection broke or went silent.
pub struct Queue {
    url: String,
    schema: String,
    host: String,
    instance: String,
    settings: Settings,
    session: Option<Session>,
}

impl Queue {
    /// Connect as `host` (unique in the cluster; `instance` tells this process from an earlier one
    /// of the same host) and create the tables if missing.
    pub async fn connect(
        url: &str,
        schema: &str,
        host: &str,
        instance: &str,
        settings: Settings,
    ) -> Result<Queue> {
        if !crate::config::valid_schema(schema) {
            anyhow::bail!(
                "invalid schema name {schema:?}: a lowercase identifier (letters, digits, _) is needed"
            );
        }
        if host.trim().is_empty() || host.len() > 255 {
            anyhow::bail!("invalid host name {host:?}: 1 to 255 characters are needed");
        }
        if settings.lease.is_zero() {
            anyhow::bail!("invalid lease: it must be longer than zero");
        }
        let mut session = connect(url, schema).await?;
        migrate(&mut session)
            .await
            .context("cannot create the cluster tables")?;
        Ok(Queue {
            url: url.into(),
            schema: schema.into(),
            host: host.into(),
            instance: instance.into(),
            settings,
            session: Some(session),
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The session, made again if the last one broke.
    async fn session(&mut self) -> Result<&mut Session> {
        if self.session.as_ref().is_none_or(|s| s.is_closed()) {
            self.session = None;
            self.session = Some(connect(&self.url, &self.schema).await?);
        }
        Ok(self.session.as_mut().expect("set above"))
    }

    /// Forget the session when the connection broke or went silent, however the failure surfaced
    /// (a client error without a server's answer is one), so the next call connects again. An
    /// answer from the server, or a refusal of our own, leaves the connection in use.
    fn after<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            let broken = is_no_answer(e)
                || e.chain().any(|c| {
                    c.downcast_ref::<tokio_postgres::Error>()
                        .is_some_and(|pg| pg.code().is_none())
                });
            if broken || self.session.as_ref().is_none_or(|s| s.is_closed()) {
                self.session = None;
            }
        }
        r
    }

    async fn query(
        &mut self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let r = async {
            let s = self.session().await?;
            let answers = s.answers.clone();
            super::rows(&s.client, Some(&answers), what, sql, params).await
        }
        .await;
        self.after(r)
    }

    async fn execute(
        &mut self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64> {
        let r = async {
            let s = self.session().await?;
            let answers = s.answers.clone();
            answer(
                Some(&answers),
                ANSWER_WITHIN,
                what,
                s.client.execute(sql, params),
            )
            .await
        }
        .await;
        self.after(r)
    }

    /// Send a wake-up on the cluster's channel; a failure is the next call's to see.
    async fn wake(&mut self, why: &str) {
        let channel = channel(&self.schema);
        let _ = self
            .execute("waking the cluster", WAKE, &[&channel, &why])
            .await;
    }

    /// Listen for wake-ups: a task published, put back or released (`pending`), and an outcome
    /// decided (`done <origin>`). The payloads are hints; claim or read outcomes on each.
    pub async fn listen(&self) -> Result<Wakeups> {
        let (client, notes, driver) = open(&self.url, None).await?;
        answer(
            None,
            ANSWER_WITHIN,
            "starting to listen",
            client.batch_execute(&format!("LISTEN {}", channel(&self.schema))),
        )
        .await?;
        Ok(Wakeups {
            _client: client,
            driver,
            notes,
        })
    }

    /// Enter the cluster (again) under this host's name. Refused with [`NameInUse`] while another
    /// instance holds the name and has beaten within one lease; an instance that left or went
    /// quiet gives the name up.
    pub async fn register_host(&mut self, labels: &[String]) -> Result<()> {
        self.register_host_replacing(labels, None).await
    }

    /// [`Queue::register_host`], taking the name at once from `dead`, an instance the caller knows
    /// is gone (this host's previous process, whose lock is free), instead of after a lease.
    pub async fn register_host_replacing(
        &mut self,
        labels: &[String],
        dead: Option<&str>,
    ) -> Result<()> {
        let (host, instance) = (self.host.clone(), self.instance.clone());
        let lease = secs(self.settings.lease);
        let took = self
            .query(
                "registering the host",
                REGISTER,
                &[&host, &instance, &labels, &lease, &dead],
            )
            .await?;
        if !took.is_empty() {
            return Ok(());
        }
        let holder = self.query("registering the host", HOLDER, &[&host]).await?;
        let (instance, age) = holder
            .first()
            .map(|r| (r.get::<_, String>(0), from_secs(r.get(1))))
            .unwrap_or_default();
        Err(NameInUse {
            name: host,
            instance,
            age,
        }
        .into())
    }

    /// Say this host is alive. An error when another instance took the name meanwhile.
    pub async fn heartbeat_host(&mut self) -> Result<()> {
        let (host, instance) = (self.host.clone(), self.instance.clone());
        let n = self
            .execute("host heartbeat", HEARTBEAT, &[&host, &instance])
            .await?;
        if n == 0 {
            anyhow::bail!(
                "host {host} is no longer registered as instance {instance}: another supervisor took the name"
            );
        }
        Ok(())
    }

    /// Leave the cluster (a clean stop): the host shows as gone at once. Its leases are not given
    /// back here; they run out, or the caller finishes them first.
    pub async fn leave_host(&mut self) -> Result<()> {
        let (host, instance) = (self.host.clone(), self.instance.clone());
        self.execute("leaving the cluster", LEAVE, &[&host, &instance])
            .await?;
        Ok(())
    }

    /// Put a task in the queue with this host as its origin. A task with the same id already there
    /// (from any host, in any state) is a [`Clash`], and nothing changes.
    pub async fn publish(&mut self, task: &Publish) -> Result<()> {
        if task.max_attempts == 0 {
            anyhow::bail!("task {}: max_attempts must be at least 1", task.id);
        }
        let max_attempts = i32::try_from(task.max_attempts).unwrap_or(i32::MAX);
        let origin = self.host.clone();
        let added = self
            .query(
                "publishing a task",
                PUBLISH,
                &[
                    &task.id,
                    &origin,
                    &task.priority,
                    &task.requires,
                    &task.pinned_host,
                    &task.agent,
                    &task.dependencies,
                    &max_attempts,
                    &task.payload,
                    &task.base_commit,
                    &task.routed_agent,
                    &task.routed_because,
                ],
            )
            .await?;
        if !added.is_empty() {
            self.wake("pending").await;
            return Ok(());
        }
        let there = self.query("publishing a task", CLASH, &[&task.id]).await?;
        let (origin, state, delivered) = there
            .first()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .unwrap_or_default();
        Err(Clash {
            id: task.id.clone(),
            origin,
            state,
            delivered,
        }
        .into())
    }

    /// Claim up to `cap.limit` tasks this host may run, best first (effective priority, then the
    /// oldest): pending ones, and running ones whose lease ran out. Each comes with a fresh lease
    /// of [`Settings::lease`] and a fence one higher than the task's last. With
    /// [`Settings::max_running`], no more than the slots the cluster has left.
    pub async fn claim(&mut self, cap: &Capacity) -> Result<Vec<Lease>> {
        if cap.limit == 0 || cap.agents.is_empty() {
            return Ok(Vec::new());
        }
        let host = self.host.clone();
        let limit = i64::from(cap.limit);
        let (aging, lease) = (secs(self.settings.aging), secs(self.settings.lease));
        let rows = match self.settings.max_running {
            None => {
                self.query(
                    "claiming tasks",
                    CLAIM,
                    &[&host, &cap.labels, &cap.agents, &limit, &aging, &lease],
                )
                .await?
            }
            Some(max) => {
                let r = async {
                    const WHAT: &str = "claiming tasks";
                    let s = self.session().await?;
                    let a = s.answers.clone();
                    let a = Some(&*a);
                    let tx = answer(a, ANSWER_WITHIN, WHAT, s.client.transaction()).await?;
                    // A claim waits no longer than any answer: a host that cannot claim now
                    // polls again, and its renewals must not wait behind it.
                    xact_lock(
                        &tx,
                        a,
                        ANSWER_WITHIN,
                        "waiting for the claim lock",
                        CLAIM_LOCK,
                    )
                    .await?;
                    let running: i64 = super::rows(&tx, a, WHAT, RUNNING, &[]).await?[0].get(0);
                    let free = (i64::from(max) - running).min(limit);
                    let rows = if free > 0 {
                        super::rows(
                            &tx,
                            a,
                            WHAT,
                            CLAIM,
                            &[&host, &cap.labels, &cap.agents, &free, &aging, &lease],
                        )
                        .await?
                    } else {
                        vec![]
                    };
                    answer(a, ANSWER_WITHIN, WHAT, tx.commit()).await?;
                    Ok(rows)
                }
                .await;
                self.after(r)?
            }
        };
        let mut out: Vec<(Lease, f64)> = rows
            .iter()
            .map(|r| {
                (
                    Lease {
                        id: r.get(0),
                        fence: r.get(1),
                        attempt: count(r.get(2)),
                        max_attempts: count(r.get(11)),
                        origin: r.get(3),
                        priority: r.get(4),
                        base_commit: r.get(5),
                        payload: r.get(6),
                        // Every claim sets the owner, its time and its lease end together.
                        reclaimed_from: r.get::<_, Option<String>>(7).and_then(|host| {
                            Some(LostClaim {
                                host,
                                claimed_at: epoch_text(r.get::<_, Option<f64>>(12)?)?,
                                lease_ended: epoch_text(r.get::<_, Option<f64>>(13)?)?,
                            })
                        }),
                        routed_agent: r.get(9),
                        routed_because: r.get(10),
                    },
                    r.get(8),
                )
            })
            .collect();
        // RETURNING keeps no order: put them back in the order they were picked in (priority
        // before age; aging moves a task by whole levels, so this can differ from the pick only
        // in ties the caller does not care about).
        out.sort_by(|(a, at), (b, bt)| {
            b.priority
                .cmp(&a.priority)
                .then(at.total_cmp(bt))
                .then(a.id.cmp(&b.id))
        });
        Ok(out.into_iter().map(|(l, _)| l).collect())
    }

    /// Extend a lease by [`Settings::lease`] from now. [`Held::Fenced`] when the task was claimed
    /// again, finished, or the lease had already run out: stop the attempt.
    pub async fn renew(&mut self, id: &str, fence: i64) -> Result<Held> {
        let host = self.host.clone();
        let lease = secs(self.settings.lease);
        let n = self
            .execute("renewing a lease", RENEW, &[&id, &fence, &host, &lease])
            .await?;
        Ok(if n == 1 { Held::Ok } else { Held::Fenced })
    }

    /// Renew every lease this host holds in one statement (the heartbeat's): one answer per lease,
    /// in the order given; a [`Held::Fenced`] one must be stopped.
    pub async fn renew_all(&mut self, leases: &[(String, i64)]) -> Result<Vec<Held>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, fences): (Vec<&str>, Vec<i64>) =
            leases.iter().map(|(id, f)| (id.as_str(), *f)).unzip();
        let host = self.host.clone();
        let lease = secs(self.settings.lease);
        let rows = self
            .query(
                "renewing leases",
                RENEW_ALL,
                &[&ids, &fences, &host, &lease],
            )
            .await?;
        let renewed: std::collections::HashSet<String> =
            rows.iter().map(|r| r.get::<_, String>(0)).collect();
        Ok(ids
            .iter()
            .map(|id| {
                if renewed.contains(*id) {
                    Held::Ok
                } else {
                    Held::Fenced
                }
            })
            .collect())
    }

    /// Give a claimed task back without running it (the agent could not start after all, or the
    /// host is stopping): it is pending again at once and the attempt is not counted. `Fenced` when
    /// the lease was no longer this claim's.
    pub async fn release(&mut self, id: &str, fence: i64) -> Result<Held> {
        let host = self.host.clone();
        let n = self
            .execute("releasing a claim", RELEASE, &[&id, &fence, &host])
            .await?;
        if n == 1 {
            self.wake("pending").await;
        }
        Ok(if n == 1 { Held::Ok } else { Held::Fenced })
    }

    /// Record how an attempt ended. With a current fence and a lease that has not run out, it is
    /// the task's outcome (a retry puts the task back to pending); otherwise it is kept as a stale
    /// result and [`Held::Fenced`] says the work must not land. [`End::Abandoned`] is always kept
    /// as stale, and puts the task back while its fence still holds. Calling it again for the same fence
    /// (an answer lost on the way) answers as the first call did and writes nothing.
    pub async fn finish(&mut self, id: &str, fence: i64, done: &Finished) -> Result<Held> {
        const WHAT: &str = "finishing an attempt";
        let host = self.host.clone();
        let channel = channel(&self.schema);
        let r = async {
            let s = self.session().await?;
            let a = s.answers.clone();
            let a = Some(&*a);
            let tx = answer(a, ANSWER_WITHIN, WHAT, s.client.transaction()).await?;
            let task = super::rows(&tx, a, WHAT, LOCK_TASK, &[&id]).await?;
            if task.is_empty() {
                anyhow::bail!("task {id} is not in the cluster queue");
            }
            let before = super::rows(&tx, a, WHAT, SAME_FINISH, &[&id, &fence]).await?;
            if let Some(row) = before.first() {
                let stale: bool = row.get(0);
                answer(a, ANSWER_WITHIN, WHAT, tx.rollback()).await?;
                return Ok(if stale { Held::Fenced } else { Held::Ok });
            }
            let (next, outcome, after, why_spent) = match done.end {
                End::Completed => ("done", Some("completed"), 0.0, ""),
                End::Failed => ("done", Some("failed"), 0.0, ""),
                End::Retry { after } => (
                    "pending",
                    None,
                    secs(after),
                    "it failed and was to be retried",
                ),
                End::Abandoned => (
                    "pending",
                    None,
                    0.0,
                    "the host gave its lease up (no renewal was answered in time)",
                ),
            };
            let moved = super::rows(
                &tx,
                a,
                WHAT,
                FINISH,
                &[&id, &fence, &host, &next, &outcome, &after, &why_spent],
            )
            .await?;
            let stale = moved.is_empty() || done.end == End::Abandoned;
            if let Some(row) = moved.first() {
                // In the transaction: the wake-up is delivered when the outcome is visible.
                let state: String = row.get(0);
                let why = if state == "pending" {
                    "pending".to_string()
                } else {
                    format!("done {}", task[0].get::<_, String>(1))
                };
                answer(a, ANSWER_WITHIN, WHAT, tx.execute(WAKE, &[&channel, &why])).await?;
            }
            answer(
                a,
                ANSWER_WITHIN,
                WHAT,
                tx.execute(
                    RESULT,
                    &[
                        &id,
                        &fence,
                        &host,
                        &done.end.as_str(),
                        &stale,
                        &done.record,
                        &done.output,
                        &done.patch,
                        &done.log_tail,
                    ],
                ),
            )
            .await?;
            answer(a, ANSWER_WITHIN, WHAT, tx.commit()).await?;
            Ok(if stale { Held::Fenced } else { Held::Ok })
        }
        .await;
        self.after(r)
    }

    /// Running tasks whose lease ran out, by the database's clock, the longest overdue first.
    pub async fn expired_leases(&mut self) -> Result<Vec<Expired>> {
        let rows = self.query("reading expired leases", EXPIRED, &[]).await?;
        Ok(rows
            .iter()
            .map(|r| Expired {
                id: r.get(0),
                owner: r.get(1),
                fence: r.get(2),
                attempts: count(r.get(3)),
                max_attempts: count(r.get(4)),
                overdue: from_secs(r.get(5)),
            })
            .collect())
    }

    /// Settle every expired lease: a task with attempts left goes back to pending (its next claim
    /// counts the next attempt); one without fails, its queue row saying why (`reason`). [`Queue::claim`]
    /// takes expired tasks with attempts left by itself; this is for the ones without, and for
    /// showing pending what no host here can take.
    pub async fn reclaim(&mut self) -> Result<Vec<Reclaimed>> {
        let rows = self.query("reclaiming leases", RECLAIM, &[]).await?;
        let mut out: Vec<Reclaimed> = rows
            .iter()
            .map(|r| Reclaimed {
                id: r.get(0),
                owner: r.get(1),
                failed: r.get(2),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        if out.iter().any(|r| !r.failed) {
            self.wake("pending").await;
        }
        for origin in rows
            .iter()
            .filter(|r| r.get::<_, bool>(2))
            .map(|r| r.get::<_, String>(3))
            .collect::<std::collections::BTreeSet<_>>()
        {
            self.wake(&format!("done {origin}")).await;
        }
        Ok(out)
    }

    /// Every result row of a task (its outcome and its stale attempts), by fence.
    pub async fn results(&mut self, id: &str) -> Result<Vec<ResultRow>> {
        let rows = self.query("reading results", RESULTS, &[&id]).await?;
        Ok(rows
            .iter()
            .map(|r| ResultRow {
                task_id: r.get(0),
                fence: r.get(1),
                host: r.get(2),
                end: r.get(3),
                stale: r.get(4),
                record: r.get(5),
                output: r.get(6),
                patch: r.get(7),
                log_tail: r.get(8),
            })
            .collect())
    }

    /// Up to `limit` finished tasks this host published and has not taken delivery of, the
    /// earliest finished first. They come again until [`Queue::delivered`] is called for them, so
    /// an origin that stops between materialising and acknowledging sees them again (materialising
    /// must be idempotent: the tree tells whether it was done).
    pub async fn outcomes(&mut self, limit: u32) -> Result<Vec<Outcome>> {
        let origin = self.host.clone();
        let limit = i64::from(limit);
        let rows = self
            .query("reading outcomes", OUTCOMES, &[&origin, &limit])
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let id: String = r.get(0);
                let fence: i64 = r.get(2);
                let result = r.get::<_, Option<String>>(6).map(|host| ResultRow {
                    task_id: id.clone(),
                    fence,
                    host,
                    end: r.get(7),
                    stale: false,
                    record: r.get(8),
                    output: r.get(9),
                    patch: r.get(10),
                    log_tail: r.get(11),
                });
                Outcome {
                    completed: r.get::<_, Option<String>>(1).as_deref() == Some("completed"),
                    fence,
                    attempts: count(r.get(3)),
                    base_commit: r.get(4),
                    reason: r.get(5),
                    result,
                    id,
                }
            })
            .collect())
    }

    /// The origin has materialised this outcome: it is not offered again. `false` when it was
    /// not an undelivered outcome of this host's.
    pub async fn delivered(&mut self, id: &str) -> Result<bool> {
        let origin = self.host.clone();
        let n = self
            .execute("acknowledging an outcome", DELIVERED, &[&id, &origin])
            .await?;
        Ok(n == 1)
    }

    /// Every host that ever registered, with whether it is alive and the leases it holds.
    pub async fn hosts(&mut self) -> Result<Vec<HostRow>> {
        let lease = secs(self.settings.lease);
        let rows = self.query("reading hosts", HOSTS, &[&lease]).await?;
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
}
