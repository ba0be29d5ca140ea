//! The PostgreSQL mirror: the same rows as SQLite, for remote readers and `LISTEN` subscribers.
//!
//! This file owns the connection (URL, TLS, schema), the migrations and the batched write. Each batch
//! is one transaction that first takes `pg_advisory_xact_lock`, so writers from several supervisors
//! commit one at a time and `task_events.seq` grows in commit order: a follower reading
//! `seq > cursor` can never skip an event that commits later with a lower number. The batch ends with
//! one `pg_notify(channel, max_seq)`; the payload is only the sequence number.
//!
//! - [`writer`]: the writer thread that feeds batches in, queues while the server is away and
//!   reconciles on every (re)connect;
//! - [`read`]: read-only sessions and the queries behind [`Reader`](super::read::Reader);
//! - [`queue`]: the cluster queue (cluster mode), where PostgreSQL is not a mirror but the
//!   coordinator of which host runs which task: leases, fences and results, in tables of its own;
//! - [`cluster_read`]: read-only views of that queue (hosts, leases, who runs what) for `status`,
//!   `tasks`, `watch` and `serve`.
//!
//! Every wait for the server is bounded here, whatever the network does: a connection that stays
//! open but carries nothing (a proxy or NAT that kept the socket and lost the peer) ends each wait
//! with [`NoAnswer`] after [`ANSWER_WITHIN`] (connecting, each statement, each row of a long read),
//! and TCP keepalives and a user timeout let the kernel close a connection whose peer is gone.
//!
//! Nothing here may run on the supervisor loop's thread: a slow or dead server must never touch it
//! (the writer has its own thread and runtime; readers are CLI commands).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, Client};

use super::Op;

pub mod cluster_read;
pub mod queue;
pub mod read;
pub mod writer;

pub use writer::{Health, PgWriter};

/// Bump when the schema changes; migrations below bring older schemas forward. Version 2: the
/// advisory locks' keys became per schema, so a version-1 supervisor would no longer take turns with
/// this one; it refuses a version-2 schema at its next connect instead of writing out of order.
const SCHEMA_VERSION: i32 = 2;
/// Arbitrary constants naming our advisory locks (migrations, event sequencing, the cluster's
/// claims under a cluster-wide limit). Advisory locks are database-wide, so each needs its own
/// number, and [`xact_lock`] mixes in the session's schema: what they order happens within one
/// schema, and another project's schema in the same database must never wait for it.
const MIGRATE_LOCK: i64 = 0x6f72_6368_0001;
const EVENTS_LOCK: i64 = 0x6f72_6368_0002;
const CLAIM_LOCK: i64 = 0x6f72_6368_0003;

/// How long any one answer from the server may take: connecting (TCP, TLS, authentication), each
/// statement, each row of a long read. A server that says nothing for this long is given up on: the
/// writer drops the connection and reconnects, a reader fails with [`NoAnswer`].
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// Waiting for the events lock is waiting for another supervisor's batch to commit, which may take
/// longer than one answer on a slow link; a batch that went silent releases it within
/// [`WRITER_SESSION`]'s `idle_in_transaction_session_timeout`.
const LOCK_WITHIN: Duration = Duration::from_secs(60);
/// Server-side bounds of a writer's session, for when our side is the one that went away: the server
/// ends a statement that outlives our longest wait, and a transaction left open by a writer that
/// went silent mid-batch (releasing the events lock the other supervisors wait for).
const WRITER_SESSION: &str =
    "SET statement_timeout = '60s'; SET idle_in_transaction_session_timeout = '30s'";

/// The server did not answer within the bound: the connection is open but nothing comes back.
#[derive(Debug, thiserror::Error)]
#[error("no answer from PostgreSQL for {} s ({what})", .waited.as_secs())]
pub struct NoAnswer {
    pub waited: Duration,
    pub what: &'static str,
}

/// Whether the server stopped answering (as opposed to answering with an error or closing).
pub fn is_no_answer(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<NoAnswer>())
}

/// Since when a session has been waiting for the server, shared with whoever reports on it (the
/// writer's health file) while the wait is under way.
#[derive(Debug, Default)]
pub struct Answers {
    /// When the current wait began, and its bound.
    since: Mutex<Option<(Instant, Duration)>>,
}

impl Answers {
    /// How long the current wait has lasted, and how long it may; `None` when nothing is being
    /// waited for.
    pub fn waiting(&self) -> Option<(Duration, Duration)> {
        self.since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|(t, limit)| (t.elapsed(), limit))
    }

    fn set(&self, since: Option<(Instant, Duration)>) {
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) = since;
    }
}

/// Take the advisory lock `lock` of this session's schema until transaction `tx` ends, waiting at
/// most `limit` for it. The key is `lock` hashed with `current_schema()` (the session's
/// `search_path` is its schema alone), so supervisors of one project take turns and other projects
/// sharing the database are not held up by them.
pub(super) async fn xact_lock(
    tx: &tokio_postgres::Transaction<'_>,
    answers: Option<&Answers>,
    limit: Duration,
    what: &'static str,
    lock: i64,
) -> Result<()> {
    answer(
        answers,
        limit,
        what,
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(current_schema(), $1))",
            &[&lock],
        ),
    )
    .await?;
    Ok(())
}

/// How long a migration that has work to do waits for a table lock before it gives up. While it
/// waits for `ALTER TABLE`'s exclusive lock, every later statement on that table queues behind it:
/// the running supervisors' writes and claims stall, so the wait is kept short.
const DDL_LOCK_WAIT: &str = "SET LOCAL lock_timeout = '5s'";

/// What a migration's DDL makes: the relations (tables and indexes) it creates and the columns it
/// adds, read from its statements, or `None` when a statement is not one of the three forms it
/// knows (`CREATE TABLE IF NOT EXISTS`, `CREATE INDEX IF NOT EXISTS`, `ALTER TABLE … ADD COLUMN IF
/// NOT EXISTS`): then the schema is never taken to be current and the DDL always runs.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Made {
    relations: Vec<String>,
    columns: Vec<(String, String)>,
}

pub(super) fn made_by(ddl: &str) -> Option<Made> {
    let mut made = Made::default();
    for stmt in ddl.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let w: Vec<&str> = stmt.split_whitespace().collect();
        let name = |t: &str| t.split('(').next().unwrap_or(t).to_string();
        match w.as_slice() {
            ["CREATE", "TABLE" | "INDEX", "IF", "NOT", "EXISTS", n, ..] => {
                made.relations.push(name(n));
            }
            [
                "ALTER",
                "TABLE",
                t,
                "ADD",
                "COLUMN",
                "IF",
                "NOT",
                "EXISTS",
                c,
                ..,
            ] => {
                made.columns.push((name(t), name(c)));
            }
            _ => return None,
        }
    }
    Some(made)
}

/// Whether everything `ddl` makes is already in this session's schema. Asked before any lock is
/// taken: `CREATE INDEX IF NOT EXISTS` and `ALTER TABLE … ADD COLUMN IF NOT EXISTS` lock their table
/// even when there is nothing to do, and a start or a reconnect must not wait for (or hold up) the
/// transactions of the supervisors already running.
pub(super) async fn schema_has(
    client: &impl tokio_postgres::GenericClient,
    answers: Option<&Answers>,
    what: &'static str,
    ddl: &str,
) -> Result<bool> {
    let Some(made) = made_by(ddl) else {
        return Ok(false);
    };
    let (tables, columns): (Vec<String>, Vec<String>) = made.columns.iter().cloned().unzip();
    let found: i64 = one(
        client,
        answers,
        what,
        "SELECT (SELECT count(*) FROM unnest($1::text[]) r
                 WHERE to_regclass(format('%I.%I', current_schema(), r)) IS NOT NULL)
              + (SELECT count(*) FROM unnest($2::text[], $3::text[]) AS w(rel, col)
                 WHERE EXISTS (SELECT 1 FROM pg_attribute a
                               WHERE a.attrelid = to_regclass(format('%I.%I', current_schema(), w.rel))
                                 AND a.attname = w.col AND a.attnum > 0 AND NOT a.attisdropped))",
        &[&made.relations, &tables, &columns],
    )
    .await?
    .get(0);
    Ok(found == (made.relations.len() + made.columns.len()) as i64)
}

/// Wait at most `limit` for one answer from the server; `answers` (when given) knows meanwhile.
pub async fn answer<T, E>(
    answers: Option<&Answers>,
    limit: Duration,
    what: &'static str,
    fut: impl Future<Output = std::result::Result<T, E>>,
) -> Result<T>
where
    E: Into<anyhow::Error>,
{
    if let Some(a) = answers {
        a.set(Some((Instant::now(), limit)));
    }
    let out = tokio::time::timeout(limit, fut).await;
    if let Some(a) = answers {
        a.set(None);
    }
    match out {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(NoAnswer {
            waited: limit,
            what,
        }
        .into()),
    }
}

/// A query's rows, each bounded by [`ANSWER_WITHIN`] rather than the whole result: a long result
/// on a slow link is fine as long as rows keep coming.
pub async fn rows(
    client: &impl tokio_postgres::GenericClient,
    answers: Option<&Answers>,
    what: &'static str,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>> {
    let stream = answer(
        answers,
        ANSWER_WITHIN,
        what,
        client.query_raw(sql, params.iter().copied()),
    )
    .await?;
    futures_util::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(row) = answer(answers, ANSWER_WITHIN, what, async {
        stream.next().await.transpose()
    })
    .await?
    {
        out.push(row);
    }
    Ok(out)
}

/// Exactly one row (a query that always returns one), bounded like [`rows`].
pub async fn one(
    client: &impl tokio_postgres::GenericClient,
    answers: Option<&Answers>,
    what: &'static str,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<tokio_postgres::Row> {
    rows(client, answers, what, sql, params)
        .await?
        .into_iter()
        .next()
        .with_context(|| format!("no row from PostgreSQL ({what})"))
}

/// An error that retrying cannot fix (wrong URL, missing tables): followers give up on it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Permanent(pub String);

/// Whether retrying cannot fix this error: our own [`Permanent`] ones, and server answers about
/// missing objects, authentication or privileges.
pub fn is_permanent(e: &anyhow::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.chain().any(|c| {
        c.is::<Permanent>()
            || c.downcast_ref::<tokio_postgres::Error>()
                .and_then(|e| e.code())
                .is_some_and(|code| {
                    [
                        SqlState::UNDEFINED_TABLE,
                        SqlState::INVALID_SCHEMA_NAME,
                        SqlState::INVALID_CATALOG_NAME,
                        SqlState::INVALID_PASSWORD,
                        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                        SqlState::INSUFFICIENT_PRIVILEGE,
                    ]
                    .contains(code)
                })
    })
}

/// The NOTIFY channel for a schema.
pub fn channel(schema: &str) -> String {
    if schema == "public" {
        "orchestrate_events".into()
    } else {
        format!("orchestrate_events_{schema}")
    }
}

/// Connection settings shared by the writer, readers and followers: a connect timeout so an
/// unreachable server fails fast; keepalives (probe after 10 s idle, every 5 s, give up after 3) and
/// a TCP user timeout (30 s of unacknowledged data) so the kernel closes a connection whose peer is
/// gone, even while nothing waits on it (an idle follower). They cannot see a peer that keeps the
/// socket and forwards nothing (a proxy's kernel acknowledges for it): [`ANSWER_WITHIN`] covers that.
pub fn pg_config(url: &str) -> Result<tokio_postgres::Config> {
    let mut cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| anyhow::Error::new(Permanent(format!("invalid database URL: {e}"))))?;
    if cfg.get_application_name().is_none() {
        cfg.application_name("orchestrate");
    }
    cfg.connect_timeout(Duration::from_secs(5))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(30));
    Ok(cfg)
}

/// TLS for URLs that ask for it (`sslmode=prefer`, the default, or `require`).
///
/// The same promise as libpq's modes: the connection is encrypted when the server offers TLS, but
/// the server's certificate is not checked (libpq checks it only for `verify-ca`/`verify-full`).
/// Authenticate the server by reaching it over a private network or an SSH tunnel.
pub fn tls() -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS setup")?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(EncryptOnly(provider)))
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Accepts any server certificate but still checks the handshake signatures (libpq `require`).
#[derive(Debug)]
struct EncryptOnly(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A connection for writing: the client, the task that drives its socket, and what it waits for.
/// Dropping it aborts that task, so a connection that went silent is closed at once instead of
/// waiting forever for the answers it was promised.
pub struct Session {
    client: Client,
    driver: tokio::task::AbortHandle,
    answers: Arc<Answers>,
}

impl Session {
    /// What this session waits for, readable while a call on it is under way.
    pub fn answers(&self) -> Arc<Answers> {
        self.answers.clone()
    }

    /// Whether the connection has ended (the server closed it or it broke).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Connect for writing: the schema is created if missing, and the session gets the server-side
/// bounds of [`WRITER_SESSION`].
pub async fn connect(url: &str, schema: &str) -> Result<Session> {
    let answers = Arc::new(Answers::default());
    let (client, _, driver) = open(url, Some(&answers)).await?;
    let session = Session {
        client,
        driver,
        answers,
    };
    answer(
        Some(&session.answers),
        ANSWER_WITHIN,
        "selecting the schema",
        session.client.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema}; {WRITER_SESSION}"
        )),
    )
    .await
    .context("cannot select the schema")?;
    Ok(session)
}

/// The `NOTIFY`s a connection hears, one `()` each (only a session that `LISTEN`s hears any). The
/// channel closes when the connection ends, which is how a follower learns that it did.
pub type Notifications = tokio::sync::mpsc::UnboundedReceiver<()>;

/// Open a connection (bounded by [`ANSWER_WITHIN`] as a whole: TCP, TLS, authentication) and drive
/// it on the current runtime, forwarding its notifications. The handle aborts the driving task.
async fn open(
    url: &str,
    answers: Option<&Answers>,
) -> Result<(Client, Notifications, tokio::task::AbortHandle)> {
    let (client, mut conn) = answer(
        answers,
        ANSWER_WITHIN,
        "connecting",
        pg_config(url)?.connect(tls()?),
    )
    .await
    .context("cannot connect to PostgreSQL")?;
    let (tx, notes) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        // Ends when the client is dropped or the server goes away; the error surfaces on the next query.
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(msg)) = messages.next().await {
            if let AsyncMessage::Notification(_) = msg {
                let _ = tx.send(());
            }
        }
    });
    Ok((client, notes, driver.abort_handle()))
}

/// The mirror's tables, in their newest form; each statement is one [`made_by`] knows.
const MIRROR_DDL: &str = "
CREATE TABLE IF NOT EXISTS orchestrate_schema(version integer NOT NULL);
CREATE TABLE IF NOT EXISTS tasks(
    id text PRIMARY KEY,
    version bigint NOT NULL,
    state text NOT NULL,
    agent text,
    payload jsonb NOT NULL,
    updated_at timestamptz NOT NULL,
    note text);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state);
CREATE TABLE IF NOT EXISTS attempts(
    task_id text NOT NULL,
    n integer NOT NULL,
    agent text NOT NULL,
    started_at timestamptz NOT NULL,
    finished_at timestamptz,
    outcome text NOT NULL,
    exit_code integer,
    cost_usd double precision,
    input_tokens bigint,
    output_tokens bigint,
    session_id text,
    PRIMARY KEY(task_id, n));
ALTER TABLE attempts ADD COLUMN IF NOT EXISTS check_result jsonb;
CREATE TABLE IF NOT EXISTS task_events(
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    host text NOT NULL,
    task_id text NOT NULL,
    version bigint NOT NULL,
    state text NOT NULL,
    at timestamptz NOT NULL,
    UNIQUE(task_id, version));
CREATE TABLE IF NOT EXISTS supervisors(
    host text NOT NULL,
    instance text PRIMARY KEY,
    pid integer NOT NULL,
    started_at timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL);";

/// The schema's version, when the tables are there: an error if it is newer than this build.
async fn schema_version(
    client: &impl tokio_postgres::GenericClient,
    answers: Option<&Answers>,
) -> Result<Option<i32>> {
    let v: Option<i32> = one(
        client,
        answers,
        "migrating",
        "SELECT max(version) FROM orchestrate_schema",
        &[],
    )
    .await?
    .get(0);
    if let Some(v) = v
        && v > SCHEMA_VERSION
    {
        anyhow::bail!(
            "the database schema is version {v}, newer than this orchestrate understands ({SCHEMA_VERSION})"
        );
    }
    Ok(v)
}

/// Create or upgrade the tables. Safe when several supervisors start at once: the DDL runs under an
/// advisory transaction lock, so one migrates and the others find the work done. A schema that
/// has everything already is only read: no lock is taken and nothing waits.
pub async fn migrate(session: &mut Session) -> Result<()> {
    let a = session.answers.clone();
    let a = Some(&*a);
    if schema_has(&session.client, a, "migrating", MIRROR_DDL).await?
        && schema_version(&session.client, a).await? == Some(SCHEMA_VERSION)
    {
        return Ok(());
    }
    let tx = answer(a, ANSWER_WITHIN, "migrating", session.client.transaction()).await?;
    xact_lock(
        &tx,
        a,
        LOCK_WITHIN,
        "waiting for the migration lock",
        MIGRATE_LOCK,
    )
    .await?;
    // Another supervisor may have migrated while this one waited for the lock: then the DDL, which
    // locks tables even with nothing to do, is not run at all.
    let current = schema_has(&tx, a, "migrating", MIRROR_DDL).await?
        && schema_version(&tx, a).await? == Some(SCHEMA_VERSION);
    if !current {
        answer(
            a,
            ANSWER_WITHIN,
            "migrating",
            tx.batch_execute(DDL_LOCK_WAIT),
        )
        .await?;
        // Several table locks may be waited for, each up to `DDL_LOCK_WAIT`.
        answer(a, LOCK_WITHIN, "migrating", tx.batch_execute(MIRROR_DDL)).await?;
        match schema_version(&tx, a).await? {
            None => {
                answer(
                    a,
                    ANSWER_WITHIN,
                    "migrating",
                    tx.execute(
                        "INSERT INTO orchestrate_schema(version) VALUES($1)",
                        &[&SCHEMA_VERSION],
                    ),
                )
                .await?;
            }
            // 1 → 2 changed no table (the lock keys); later steps go here, one at a time.
            Some(v) if v < SCHEMA_VERSION => {
                answer(
                    a,
                    ANSWER_WITHIN,
                    "migrating",
                    tx.execute(
                        "UPDATE orchestrate_schema SET version = $1",
                        &[&SCHEMA_VERSION],
                    ),
                )
                .await?;
            }
            Some(_) => {}
        }
    }
    answer(a, ANSWER_WITHIN, "migrating", tx.commit()).await?;
    Ok(())
}

const UPSERT: &str = "
WITH up AS (
    INSERT INTO tasks(id, version, state, agent, payload, updated_at, note)
    VALUES($1, $2, $3, $4, $5::text::jsonb, $6::text::timestamptz, $7)
    ON CONFLICT (id) DO UPDATE SET version = excluded.version, state = excluded.state, agent = excluded.agent,
        payload = excluded.payload, updated_at = excluded.updated_at, note = excluded.note
    WHERE excluded.version > tasks.version
    RETURNING id, version, state, updated_at),
ev AS (
    INSERT INTO task_events(host, task_id, version, state, at)
    SELECT $8, id, version, state, updated_at FROM up
    ON CONFLICT (task_id, version) DO NOTHING
    RETURNING seq)
SELECT (SELECT count(*) FROM up), (SELECT max(seq) FROM ev)";

const ATTEMPT: &str = "
INSERT INTO attempts(task_id, n, agent, started_at, finished_at, outcome, exit_code, cost_usd, input_tokens,
    output_tokens, session_id, check_result)
VALUES($1, $2, $3, $4::text::timestamptz, $5::text::timestamptz, $6, $7, $8, $9, $10, $11, $12::text::jsonb)
ON CONFLICT (task_id, n) DO UPDATE SET agent = excluded.agent, started_at = excluded.started_at,
    finished_at = excluded.finished_at, outcome = excluded.outcome, exit_code = excluded.exit_code,
    cost_usd = excluded.cost_usd, input_tokens = excluded.input_tokens, output_tokens = excluded.output_tokens,
    session_id = excluded.session_id, check_result = excluded.check_result";

/// Apply a batch in one transaction; returns the highest event sequence written (0 if none). Each
/// statement is bounded ([`ANSWER_WITHIN`]; the events lock, [`LOCK_WITHIN`]).
pub async fn apply(session: &mut Session, host: &str, channel: &str, ops: &[Op]) -> Result<i64> {
    const WHAT: &str = "writing a batch";
    let a = session.answers.clone();
    let a = Some(&*a);
    let tx = answer(a, ANSWER_WITHIN, WHAT, session.client.transaction()).await?;
    xact_lock(
        &tx,
        a,
        LOCK_WITHIN,
        "waiting for the events lock",
        EVENTS_LOCK,
    )
    .await?;
    let upsert = answer(a, ANSWER_WITHIN, WHAT, tx.prepare(UPSERT)).await?;
    let attempt = answer(a, ANSWER_WITHIN, WHAT, tx.prepare(ATTEMPT)).await?;
    let mut max_seq = 0i64;
    for op in ops {
        match op {
            Op::Upsert { row, attempts } => {
                let payload = serde_json::to_string(&row.payload)?;
                let version = row.version as i64;
                let r = answer(
                    a,
                    ANSWER_WITHIN,
                    WHAT,
                    tx.query_one(
                        &upsert,
                        &[
                            &row.id,
                            &version,
                            &row.state,
                            &row.agent,
                            &payload,
                            &row.updated_at,
                            &row.note,
                            &host,
                        ],
                    ),
                )
                .await?;
                let applied: i64 = r.get(0);
                if let Some(seq) = r.get::<_, Option<i64>>(1) {
                    max_seq = max_seq.max(seq);
                }
                if applied == 0 {
                    continue;
                }
                for at in attempts {
                    let n = at.n as i32;
                    let input = at.input_tokens.map(|v| v as i64);
                    let output = at.output_tokens.map(|v| v as i64);
                    let check = at.check.as_ref().map(serde_json::to_string).transpose()?;
                    answer(
                        a,
                        ANSWER_WITHIN,
                        WHAT,
                        tx.execute(
                            &attempt,
                            &[
                                &row.id,
                                &n,
                                &at.agent,
                                &at.started_at,
                                &at.finished_at,
                                &at.outcome.as_str(),
                                &at.exit_code,
                                &at.cost_usd,
                                &input,
                                &output,
                                &at.session_id,
                                &check,
                            ],
                        ),
                    )
                    .await?;
                }
            }
            Op::Note { id, note } => {
                answer(
                    a,
                    ANSWER_WITHIN,
                    WHAT,
                    tx.execute("UPDATE tasks SET note = $2 WHERE id = $1", &[id, note]),
                )
                .await?;
            }
            Op::Delete(id) => {
                answer(
                    a,
                    ANSWER_WITHIN,
                    WHAT,
                    tx.execute("DELETE FROM tasks WHERE id = $1", &[id]),
                )
                .await?;
                answer(
                    a,
                    ANSWER_WITHIN,
                    WHAT,
                    tx.execute("DELETE FROM attempts WHERE task_id = $1", &[id]),
                )
                .await?;
            }
            Op::Supervisor {
                instance,
                pid,
                started_at,
                heartbeat_at,
                alive,
            } => {
                let pid = *pid as i32;
                let write = async {
                    if *alive {
                        tx.execute(
                            "INSERT INTO supervisors(host, instance, pid, started_at, heartbeat_at)
                             VALUES($1, $2, $3, $4::text::timestamptz, $5::text::timestamptz)
                             ON CONFLICT (instance) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                            &[&host, instance, &pid, started_at, heartbeat_at],
                        )
                        .await
                    } else {
                        tx.execute("DELETE FROM supervisors WHERE instance = $1", &[instance])
                            .await
                    }
                };
                answer(a, ANSWER_WITHIN, WHAT, write).await?;
            }
            // Local-only operations: flushes are answered by the SQLite writer, reconciles run in the
            // writer thread (`writer`).
            Op::Flush(_) | Op::Reconcile { .. } | Op::Notice(_) => {}
        }
    }
    if max_seq > 0 {
        answer(
            a,
            ANSWER_WITHIN,
            WHAT,
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&channel, &max_seq.to_string()],
            ),
        )
        .await?;
    }
    answer(a, ANSWER_WITHIN, "committing a batch", tx.commit()).await?;
    Ok(max_seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// Every statement of both migrations is one `made_by` reads, so a schema that has it all is
    /// recognised as current; a statement of another form makes it never so (the DDL always runs).
    #[test]
    fn the_migrations_list_what_they_make() {
        let mirror = made_by(MIRROR_DDL).expect("every mirror statement is known");
        assert_eq!(
            mirror.relations,
            [
                "orchestrate_schema",
                "tasks",
                "tasks_state",
                "attempts",
                "task_events",
                "supervisors"
            ]
        );
        assert_eq!(
            mirror.columns,
            [("attempts".to_string(), "check_result".to_string())]
        );
        let queue = made_by(queue::DDL).expect("every queue statement is known");
        assert_eq!(queue.relations.len(), 6, "{queue:?}");
        assert_eq!(queue.columns.len(), 2, "{queue:?}");
        assert_eq!(
            made_by("CREATE TABLE IF NOT EXISTS a(x int); DROP TABLE b"),
            None
        );
    }

    #[test]
    fn a_call_the_server_never_answers_ends_with_no_answer() {
        let answers = Answers::default();
        let never = std::future::pending::<Result<(), tokio_postgres::Error>>();
        let e = runtime()
            .block_on(answer(
                Some(&answers),
                Duration::from_millis(20),
                "testing",
                never,
            ))
            .expect_err("bounded");
        assert!(is_no_answer(&e), "{e:#}");
        assert!(!is_permanent(&e), "a follower retries it");
        assert_eq!(e.to_string(), "no answer from PostgreSQL for 0 s (testing)");
        assert_eq!(answers.waiting(), None, "nothing is waited for any more");
    }

    #[test]
    fn a_wait_in_progress_is_visible_and_an_answer_passes_through() {
        let answers = Answers::default();
        let rt = runtime();
        let (seen, out) = rt.block_on(async {
            let call = answer(Some(&answers), ANSWER_WITHIN, "testing", async {
                tokio::time::sleep(Duration::from_millis(30)).await;
                Ok::<_, tokio_postgres::Error>(7)
            });
            tokio::pin!(call);
            // Poll the call once, so its wait has begun, then look from outside.
            let seen = tokio::select! {
                biased;
                _ = &mut call => None,
                _ = std::future::ready(()) => answers.waiting(),
            };
            (seen, call.await)
        });
        assert_eq!(
            seen.map(|(_, bound)| bound),
            Some(ANSWER_WITHIN),
            "the wait shows while it lasts, with its bound"
        );
        assert_eq!(out.expect("answered"), 7);
        assert_eq!(answers.waiting(), None);
    }
}
