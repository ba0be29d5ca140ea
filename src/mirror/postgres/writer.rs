//! The PostgreSQL writer: the thread that copies every transition into PostgreSQL.
//!
//! # Theory of operation
//!
//! One writer (its own thread and runtime, so a slow or dead server never touches the supervisor)
//! receives the same [`Op`]s as the SQLite writer. It keeps them in a bounded queue while the server
//! is away, reconnects with exponential backoff, and on every (re)connect migrates the schema and
//! reconciles from the tree before replaying the queue: whatever was dropped or half-written comes
//! back from the files, and version guards make replays harmless. Its state goes to
//! `state_dir/postgres.json` ([`Health`]), which `orchestrate status` shows.
//!
//! Sending to it never waits: the supervisor must never block on the database.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio_postgres::Client;

use super::{apply, channel, connect, migrate};
use crate::mirror::Known;
use crate::mirror::Op;
use crate::mirror::reconcile::{self, ReconcileReport};
use crate::spool::Spool;

/// Ops kept while the server is unreachable; beyond this the oldest are dropped and the reconcile
/// on reconnect restores the rows from the tree.
const MAX_QUEUE: usize = 100_000;

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
                        reconcile::without_queued(plan, &queued)
                            .into_iter()
                            .map(|op| (now, op)),
                    );
                    needs_reconcile = false;
                    // Tasks left to another writer are looked at again soon, in case it died.
                    next_reconcile = Instant::now()
                        + if report.skipped_recent > 0 {
                            reconcile::RECENT + Duration::from_secs(5)
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
async fn reconcile_plan(
    client: &Client,
    spool: &Spool,
    max_task_bytes: u64,
) -> Result<(Vec<Op>, ReconcileReport)> {
    let known = known_rows(client).await?;
    let spool = spool.clone();
    tokio::task::spawn_blocking(move || {
        reconcile::reconcile_plan(&spool, max_task_bytes, &known, false, false)
    })
    .await
    .context("reconcile planning failed")?
}
