//! The PostgreSQL mirror: the same rows as SQLite, for remote readers and `LISTEN` subscribers.
//!
//! # Theory of operation
//!
//! One writer (its own thread and runtime, so a slow or dead server never touches the supervisor)
//! receives the same [`Op`]s as the SQLite writer. It keeps them in a bounded queue while the server
//! is away, reconnects with exponential backoff, and on every (re)connect migrates the schema and
//! reconciles from the tree before replaying the queue: whatever was dropped or half-written comes
//! back from the files, and version guards make replays harmless.
//!
//! Each batch is one transaction that first takes `pg_advisory_xact_lock`, so writers from several
//! supervisors commit one at a time and `task_events.seq` grows in commit order: a follower reading
//! `seq > cursor` can never skip an event that commits later with a lower number. The batch ends with
//! one `pg_notify(channel, max_seq)`; the payload is only the sequence number.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio_postgres::Client;

use super::{Known, Op, ReconcileReport, TaskRow};
use crate::spool::Spool;

/// Bump when the schema changes; migrations below bring older schemas forward.
const SCHEMA_VERSION: i32 = 1;
/// Ops kept while the server is unreachable; beyond this the oldest are dropped and the reconcile
/// on reconnect restores the rows from the tree.
const MAX_QUEUE: usize = 100_000;
/// Arbitrary constants naming our advisory locks (migrations, event sequencing).
const MIGRATE_LOCK: i64 = 0x6f72_6368_0001;
const EVENTS_LOCK: i64 = 0x6f72_6368_0002;

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

pub fn valid_schema(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

/// The NOTIFY channel for a schema.
pub fn channel(schema: &str) -> String {
    if schema == "public" {
        "orchestrate_events".into()
    } else {
        format!("orchestrate_events_{schema}")
    }
}

/// Connection settings shared by the writer, readers and followers: keepalives so a dead peer is
/// noticed, a connect timeout so an unreachable server fails fast.
pub fn pg_config(url: &str) -> Result<tokio_postgres::Config> {
    let mut cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| anyhow::Error::new(Permanent(format!("invalid database URL: {e}"))))?;
    if cfg.get_application_name().is_none() {
        cfg.application_name("orchestrate");
    }
    cfg.connect_timeout(Duration::from_secs(5))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
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

/// Connect for writing: the schema is created if missing.
pub async fn connect(url: &str, schema: &str) -> Result<Client> {
    let client = open(url).await?;
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema}"
        ))
        .await
        .context("cannot select the schema")?;
    Ok(client)
}

/// Connect for reading: the schema must exist (a typo must not create an empty one).
pub async fn connect_existing(url: &str, schema: &str) -> Result<Client> {
    anyhow::ensure!(valid_schema(schema), "invalid schema name `{schema}`");
    let client = open(url).await?;
    // One question answers both "does the schema exist" and "has a supervisor written to it".
    let ready: bool = client
        .query_one(
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
    client
        .batch_execute(&format!("SET search_path TO {schema}"))
        .await?;
    Ok(client)
}

async fn open(url: &str) -> Result<Client> {
    let (client, conn) = pg_config(url)?
        .connect(tls()?)
        .await
        .context("cannot connect to PostgreSQL")?;
    tokio::spawn(async move {
        // Ends when the client is dropped or the server goes away; the error surfaces on the next query.
        let _ = conn.await;
    });
    Ok(client)
}

/// Create or upgrade the tables. Safe when several supervisors start at once: the DDL runs under an
/// advisory transaction lock, so one migrates and the others find the work done.
pub async fn migrate(client: &mut Client) -> Result<()> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS orchestrate_schema(version integer NOT NULL);
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
             heartbeat_at timestamptz NOT NULL);",
    )
    .await?;
    let current: Option<i32> = tx
        .query_opt("SELECT max(version) FROM orchestrate_schema", &[])
        .await?
        .and_then(|r| r.get(0));
    match current {
        None => {
            tx.execute(
                "INSERT INTO orchestrate_schema(version) VALUES($1)",
                &[&SCHEMA_VERSION],
            )
            .await?;
        }
        Some(v) if v > SCHEMA_VERSION => {
            anyhow::bail!(
                "the database schema is version {v}, newer than this orchestrate understands ({SCHEMA_VERSION})"
            );
        }
        // Future migrations from older versions go here, one step at a time.
        Some(_) => {}
    }
    tx.commit().await?;
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
    output_tokens, session_id)
VALUES($1, $2, $3, $4::text::timestamptz, $5::text::timestamptz, $6, $7, $8, $9, $10, $11)
ON CONFLICT (task_id, n) DO UPDATE SET agent = excluded.agent, started_at = excluded.started_at,
    finished_at = excluded.finished_at, outcome = excluded.outcome, exit_code = excluded.exit_code,
    cost_usd = excluded.cost_usd, input_tokens = excluded.input_tokens, output_tokens = excluded.output_tokens,
    session_id = excluded.session_id";

/// Apply a batch in one transaction; returns the highest event sequence written (0 if none).
pub async fn apply(client: &mut Client, host: &str, channel: &str, ops: &[Op]) -> Result<i64> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&EVENTS_LOCK])
        .await?;
    let upsert = tx.prepare(UPSERT).await?;
    let attempt = tx.prepare(ATTEMPT).await?;
    let mut max_seq = 0i64;
    for op in ops {
        match op {
            Op::Upsert { row, attempts } => {
                let payload = serde_json::to_string(&row.payload)?;
                let version = row.version as i64;
                let r = tx
                    .query_one(
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
                    )
                    .await?;
                let applied: i64 = r.get(0);
                if let Some(seq) = r.get::<_, Option<i64>>(1) {
                    max_seq = max_seq.max(seq);
                }
                if applied == 0 {
                    continue;
                }
                for a in attempts {
                    let n = a.n as i32;
                    let input = a.input_tokens.map(|v| v as i64);
                    let output = a.output_tokens.map(|v| v as i64);
                    tx.execute(
                        &attempt,
                        &[
                            &row.id,
                            &n,
                            &a.agent,
                            &a.started_at,
                            &a.finished_at,
                            &a.outcome.as_str(),
                            &a.exit_code,
                            &a.cost_usd,
                            &input,
                            &output,
                            &a.session_id,
                        ],
                    )
                    .await?;
                }
            }
            Op::Note { id, note } => {
                tx.execute("UPDATE tasks SET note = $2 WHERE id = $1", &[id, note])
                    .await?;
            }
            Op::Delete(id) => {
                tx.execute("DELETE FROM tasks WHERE id = $1", &[id]).await?;
                tx.execute("DELETE FROM attempts WHERE task_id = $1", &[id])
                    .await?;
            }
            Op::Supervisor {
                instance,
                pid,
                started_at,
                heartbeat_at,
                alive,
            } => {
                if *alive {
                    let pid = *pid as i32;
                    tx.execute(
                        "INSERT INTO supervisors(host, instance, pid, started_at, heartbeat_at)
                         VALUES($1, $2, $3, $4::text::timestamptz, $5::text::timestamptz)
                         ON CONFLICT (instance) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                        &[&host, instance, &pid, started_at, heartbeat_at],
                    )
                    .await?;
                } else {
                    tx.execute("DELETE FROM supervisors WHERE instance = $1", &[instance])
                        .await?;
                }
            }
            // Local-only operations: flushes are answered by the SQLite writer, reconciles run below.
            Op::Flush(_) | Op::Reconcile { .. } => {}
        }
    }
    if max_seq > 0 {
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&channel, &max_seq.to_string()],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(max_seq)
}

async fn known_rows(client: &Client) -> Result<Known> {
    let rows = client
        .query(
            "SELECT id, state, version, coalesce(payload->>'file', '') FROM tasks",
            &[],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                (
                    r.get::<_, String>(1),
                    r.get::<_, i64>(2) as u64,
                    r.get::<_, String>(3),
                ),
            )
        })
        .collect())
}

/// What would bring the database in line with the tree (the same plan as the SQLite reconciler).
pub async fn reconcile_plan(
    client: &Client,
    spool: &Spool,
    max_task_bytes: u64,
) -> Result<(Vec<Op>, ReconcileReport)> {
    let known = known_rows(client).await?;
    let spool = spool.clone();
    tokio::task::spawn_blocking(move || {
        super::reconcile_plan(&spool, max_task_bytes, &known, false, false)
    })
    .await
    .context("reconcile planning failed")?
}

/// What `orchestrate status` shows about the PostgreSQL mirror (`state_dir/postgres.json`).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Health {
    pub connected: bool,
    pub last_ok_at: Option<String>,
    pub last_error: Option<String>,
    /// Transitions waiting to be written.
    pub queued: usize,
    /// Transitions dropped while the server was away (restored from the tree on reconnect).
    pub dropped: u64,
    pub last_seq: i64,
    /// Age of the oldest transition not yet written, in milliseconds.
    pub lag_ms: u64,
}

/// Handle to the PostgreSQL writer thread.
#[derive(Clone)]
pub struct PgWriter {
    // Unbounded and synchronous to send into: the supervisor must never wait for the database.
    tx: tokio::sync::mpsc::UnboundedSender<Op>,
}

impl PgWriter {
    pub fn start(
        url: String,
        schema: String,
        host: String,
        spool: Spool,
        max_task_bytes: u64,
        health_file: PathBuf,
    ) -> Result<PgWriter> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Op>();
        std::thread::Builder::new()
            .name("postgres-writer".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        crate::console::error(&format!(
                            "postgres mirror: cannot start its runtime: {e}"
                        ));
                        return;
                    }
                };
                rt.block_on(run_writer(
                    url,
                    schema,
                    host,
                    spool,
                    max_task_bytes,
                    health_file,
                    rx,
                ));
            })?;
        Ok(PgWriter { tx })
    }

    pub fn send(&self, op: Op) {
        let _ = self.tx.send(op);
    }

    /// Wait (at most `limit`) until what was sent before is in the database, or the writer gave up
    /// for now because the server is unreachable.
    pub fn flush(&self, limit: Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(Op::Flush(tx));
        let _ = rx.recv_timeout(limit);
    }
}

async fn run_writer(
    url: String,
    schema: String,
    host: String,
    spool: Spool,
    max_task_bytes: u64,
    health_file: PathBuf,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Op>,
) {
    let channel = channel(&schema);
    let mut queue: VecDeque<(Instant, Op)> = VecDeque::new();
    let mut health = Health::default();
    let mut backoff = Duration::from_millis(200);
    let mut client: Option<Client> = None;
    let mut open = true;
    let mut next_reconcile = Instant::now();
    let mut needs_reconcile = true;
    // Waiting `flush` callers: answered once the queue is written, or at once while the server is
    // away (waiting would not help, and the tree holds everything).
    let mut flushes: Vec<std::sync::mpsc::Sender<()>> = Vec::new();
    loop {
        // Take what has arrived; wait briefly when idle so a burst lands in one transaction.
        // Idle: wait up to 200 ms for the first op; once one is here, only 3 ms more for company.
        let mut deadline =
            Instant::now() + Duration::from_millis(if queue.is_empty() { 200 } else { 3 });
        // The deadline is checked before each receive: `timeout` polls the receive first, so a
        // steady stream of ops would otherwise keep us here forever.
        while open && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(op)) => {
                    accept(op, &mut queue, &mut flushes, &mut health);
                    deadline = deadline.min(Instant::now() + Duration::from_millis(3));
                }
                Err(_) => break,
                Ok(None) => open = false,
            }
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = None;
            match connect_and_migrate(&url, &schema).await {
                Ok(c) => {
                    client = Some(c);
                    backoff = Duration::from_millis(200);
                    health.connected = true;
                    health.last_error = None;
                    health.last_ok_at = Some(crate::fsutil::now_rfc3339());
                    // After the queue is replayed (so every transition it holds gets its event), the
                    // tree fills in whatever the queue lost while the server was away.
                    needs_reconcile = true;
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    // Say it once at the default level; the retries are for -v.
                    if health.connected || health.last_error.is_none() {
                        crate::console::warn(&format!(
                            "postgres mirror: {msg}; tasks keep running, retrying with backoff"
                        ));
                    } else {
                        crate::console::debug(&format!(
                            "postgres mirror: {msg}; retrying in {} ms",
                            backoff.as_millis()
                        ));
                    }
                    health.connected = false;
                    health.last_error = Some(msg);
                    for f in flushes.drain(..) {
                        let _ = f.send(());
                    }
                    if !open {
                        write_health(&health_file, &mut health, &queue);
                        return;
                    }
                    // Wait out the backoff in one-second steps, taking ops and keeping the health
                    // file (and so the lag `status` shows) current.
                    let until = Instant::now() + backoff;
                    while open && Instant::now() < until {
                        write_health(&health_file, &mut health, &queue);
                        let step = until
                            .saturating_duration_since(Instant::now())
                            .min(Duration::from_secs(1));
                        if let Ok(op) = tokio::time::timeout(step, rx.recv()).await {
                            match op {
                                Some(op) => accept(op, &mut queue, &mut flushes, &mut health),
                                None => open = false,
                            }
                        }
                        for f in flushes.drain(..) {
                            let _ = f.send(());
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            }
        }
        let c = client.as_mut().expect("connected above");
        while !queue.is_empty() {
            let n = queue.len().min(500);
            let batch: Vec<Op> = queue.iter().take(n).map(|(_, op)| op.clone()).collect();
            match apply(c, &host, &channel, &batch).await {
                Ok(seq) => {
                    queue.drain(..n);
                    health.last_seq = health.last_seq.max(seq);
                    health.last_ok_at = Some(crate::fsutil::now_rfc3339());
                }
                Err(e) => {
                    // Keep the batch: it is replayed after reconnecting, and version guards make that safe.
                    health.connected = false;
                    health.last_error = Some(format!("{e:#}"));
                    crate::console::warn(&format!(
                        "postgres mirror: write failed, will reconnect: {e:#}"
                    ));
                    client = None;
                    break;
                }
            }
        }
        if let Some(c) = client.as_mut()
            && queue.is_empty()
            && (needs_reconcile || Instant::now() >= next_reconcile)
        {
            // Also the periodic safety net: whatever was lost anywhere comes back from the files.
            match reconcile_plan(c, &spool, max_task_bytes).await {
                Ok((plan, report)) => {
                    // The tree was read first; what was sent meanwhile joins the queue, and the plan
                    // leaves those tasks to it (see `without_queued`).
                    while let Ok(op) = rx.try_recv() {
                        accept(op, &mut queue, &mut flushes, &mut health);
                    }
                    let queued: Vec<Op> = queue.iter().map(|(_, op)| op.clone()).collect();
                    let now = Instant::now();
                    queue.extend(
                        super::without_queued(plan, &queued)
                            .into_iter()
                            .map(|op| (now, op)),
                    );
                    needs_reconcile = false;
                    // Tasks left to another writer are looked at again soon, in case it died.
                    next_reconcile = Instant::now()
                        + if report.skipped_recent > 0 {
                            super::RECENT + Duration::from_secs(5)
                        } else {
                            Duration::from_secs(300)
                        };
                    // Write the plan now (and whatever came with it), not after the next wait.
                    continue;
                }
                Err(e) => {
                    crate::console::warn(&format!("postgres mirror: reconcile failed: {e:#}"));
                    health.connected = false;
                    health.last_error = Some(format!("{e:#}"));
                    client = None;
                }
            }
            next_reconcile = Instant::now() + Duration::from_secs(300);
        }
        write_health(&health_file, &mut health, &queue);
        if queue.is_empty() || client.is_none() {
            for f in flushes.drain(..) {
                let _ = f.send(());
            }
        }
        if !open && queue.is_empty() {
            return;
        }
        if !open && client.is_none() {
            // Shutting down with the server away: the tree holds everything; the next start reconciles.
            return;
        }
    }
}

/// Take one op from the supervisor: flushes wait for the queue, local-only ops are ignored.
fn accept(
    op: Op,
    queue: &mut VecDeque<(Instant, Op)>,
    flushes: &mut Vec<std::sync::mpsc::Sender<()>>,
    health: &mut Health,
) {
    match op {
        Op::Flush(reply) => flushes.push(reply),
        Op::Reconcile { .. } => {}
        op => {
            queue.push_back((Instant::now(), op));
            if queue.len() > MAX_QUEUE {
                queue.pop_front();
                health.dropped += 1;
            }
        }
    }
}

async fn connect_and_migrate(url: &str, schema: &str) -> Result<Client> {
    let mut c = connect(url, schema).await?;
    migrate(&mut c).await?;
    Ok(c)
}

fn write_health(path: &std::path::Path, health: &mut Health, queue: &VecDeque<(Instant, Op)>) {
    health.queued = queue.len();
    health.lag_ms = queue
        .front()
        .map(|(t, _)| t.elapsed().as_millis() as u64)
        .unwrap_or(0);
    if let Ok(json) = serde_json::to_vec_pretty(health) {
        let _ = crate::fsutil::atomic_write(path, &json);
    }
}

// ---- reads (for --database-url and follow) -----------------------------------------------------

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

const ROW_COLUMNS: &str = "id, version, state, agent, payload, \
    to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), note";

pub async fn list(client: &Client, state: Option<&str>) -> Result<Vec<TaskRow>> {
    let rows =
        match state {
            Some(s) => client
                .query(
                    &format!(
                        "SELECT {ROW_COLUMNS} FROM tasks WHERE state = $1 ORDER BY updated_at, id"
                    ),
                    &[&s],
                )
                .await?,
            None => {
                client
                    .query(
                        &format!("SELECT {ROW_COLUMNS} FROM tasks ORDER BY updated_at, id"),
                        &[],
                    )
                    .await?
            }
        };
    Ok(rows.iter().map(row_from_pg).collect())
}

pub async fn get(client: &Client, id: &str) -> Result<Option<TaskRow>> {
    Ok(client
        .query_opt(
            &format!("SELECT {ROW_COLUMNS} FROM tasks WHERE id = $1"),
            &[&id],
        )
        .await?
        .as_ref()
        .map(row_from_pg))
}

pub async fn counts(client: &Client) -> Result<Vec<(String, usize)>> {
    let rows = client
        .query(
            "SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as usize))
        .collect())
}

pub async fn events_since(client: &Client, seq: i64, limit: i64) -> Result<Vec<super::Event>> {
    let rows = client
        .query(
            "SELECT seq, host, task_id, version, state,
                    to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')
             FROM task_events WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&seq, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| super::Event {
            seq: r.get(0),
            host: r.get(1),
            task_id: r.get(2),
            version: r.get::<_, i64>(3) as u64,
            state: r.get(4),
            at: r.get(5),
        })
        .collect())
}

pub async fn max_seq(client: &Client) -> Result<i64> {
    Ok(client
        .query_one("SELECT coalesce(max(seq), 0) FROM task_events", &[])
        .await?
        .get(0))
}

pub async fn supervisors(client: &Client) -> Result<Vec<super::SupervisorRow>> {
    let rows = client
        .query(
            "SELECT host, instance, pid,
                    to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                    to_char(heartbeat_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')
             FROM supervisors ORDER BY started_at",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| super::SupervisorRow {
            host: r.get(0),
            instance: r.get(1),
            pid: r.get::<_, i32>(2) as u32,
            started_at: r.get(3),
            heartbeat_at: r.get(4),
        })
        .collect())
}

pub async fn attempts_of(client: &Client, id: &str) -> Result<Vec<super::AttemptLine>> {
    let rows = client
        .query(
            "SELECT n, agent, to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                    to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), outcome, exit_code
             FROM attempts WHERE task_id = $1 ORDER BY n",
            &[&id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, i32>(0) as u32,
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
            )
        })
        .collect())
}
