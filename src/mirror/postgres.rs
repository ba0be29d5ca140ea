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
//! - [`read`]: read-only sessions and the queries behind [`Reader`](super::read::Reader).
//!
//! Nothing here may run on the supervisor loop's thread: a slow or dead server must never touch it
//! (the writer has its own thread and runtime; readers are CLI commands).

use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, Client};

use super::Op;

pub mod read;
pub mod writer;

pub use writer::{Health, PgWriter};

/// Bump when the schema changes; migrations below bring older schemas forward.
const SCHEMA_VERSION: i32 = 1;
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
    let (client, _) = open(url).await?;
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema}"
        ))
        .await
        .context("cannot select the schema")?;
    Ok(client)
}

/// The `NOTIFY`s a connection hears, one `()` each (only a session that `LISTEN`s hears any). The
/// channel closes when the connection ends, which is how a follower learns that it did.
pub type Notifications = tokio::sync::mpsc::UnboundedReceiver<()>;

/// Open a connection and drive it on the current runtime, forwarding its notifications.
async fn open(url: &str) -> Result<(Client, Notifications)> {
    let (client, mut conn) = pg_config(url)?
        .connect(tls()?)
        .await
        .context("cannot connect to PostgreSQL")?;
    let (tx, notes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        // Ends when the client is dropped or the server goes away; the error surfaces on the next query.
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(msg)) = messages.next().await {
            if let AsyncMessage::Notification(_) = msg {
                let _ = tx.send(());
            }
        }
    });
    Ok((client, notes))
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
            // Local-only operations: flushes are answered by the SQLite writer, reconciles run in the
            // writer thread (`writer`).
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
