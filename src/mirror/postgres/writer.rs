//! The PostgreSQL writer: the thread that copies every transition into PostgreSQL.
//!
//! # Theory of operation
//!
//! One writer (its own thread and runtime, so a slow or dead server never touches the supervisor)
//! receives the same [`Op`]s as the SQLite writer. It keeps them in a bounded queue while the server
//! is away, reconnects with exponential backoff, and on every (re)connect migrates the schema,
//! replays the queue (so each transition gets its event) and then reconciles from the tree: whatever
//! was dropped or half-written comes back from the files, and version guards make replays harmless. Its state goes to
//! `state_dir/postgres.json` ([`Health`]), which `orchestrate status` shows.
//!
//! Every call to the server is bounded (`ANSWER_WITHIN`, per statement), and while one is under way
//! the writer keeps taking ops and keeps the health file current (`Inbox::meanwhile`): a server
//! that stops answering shows as `stalled` within [`STALL_AFTER`], with the queue and its lag growing
//! behind it, and once the bound passes the connection is dropped, said once on the console, and
//! made again; the batch in flight stays queued and is written again (version guards make a batch
//! that did commit unseen harmless).
//!
//! Sending to it never waits: the supervisor must never block on the database.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use super::{Answers, Session, apply, channel, connect, is_no_answer, migrate};
use crate::mirror::Known;
use crate::mirror::Op;
use crate::mirror::reconcile::{self, ReconcileReport};
use crate::spool::Spool;

/// Ops kept while the server is unreachable; beyond this the oldest are dropped and the reconcile
/// on reconnect restores the rows from the tree.
const MAX_QUEUE: usize = 100_000;
/// A call to the server waiting this long shows as `stalled` in the health file, well before the
/// bound that gives up on the connection.
pub const STALL_AFTER: Duration = Duration::from_secs(2);

/// What `orchestrate status` shows about the PostgreSQL mirror (`state_dir/postgres.json`).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Health {
    /// A session is open. It may still be `stalled`.
    pub connected: bool,
    /// Connected, but the server has not answered for `waiting_ms` (at least [`STALL_AFTER`]): the
    /// connection is given up on once the wait reaches the bound.
    #[serde(default)]
    pub stalled: bool,
    /// How long the writer has been waiting for the server's current answer (0 when not waiting).
    #[serde(default)]
    pub waiting_ms: u64,
    /// How long that wait may last before the connection is given up on (0 when not waiting).
    #[serde(default)]
    pub bound_ms: u64,
    pub last_ok_at: Option<String>,
    pub last_error: Option<String>,
    /// Transitions waiting to be written, including a batch in flight.
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

/// What the writer holds besides its connection: the ops from the supervisor, the queue, waiting
/// flushes and the health it reports. Apart from the connection so that a call on the connection can
/// be waited for while ops keep coming in (`Inbox::meanwhile`).
struct Inbox {
    rx: tokio::sync::mpsc::UnboundedReceiver<Op>,
    /// The supervisor still holds a sender.
    open: bool,
    queue: VecDeque<(Instant, Op)>,
    /// The first this many ops of the queue are being written: an overflow drops after them.
    in_flight: usize,
    // Waiting `flush` callers: answered once the queue is written, or at once while the server is
    // away (waiting would not help, and the tree holds everything).
    flushes: Vec<std::sync::mpsc::Sender<()>>,
    health: Health,
    health_file: PathBuf,
    /// What the health file holds, so an idle writer leaves it alone.
    written: Vec<u8>,
}

impl Inbox {
    fn new(rx: tokio::sync::mpsc::UnboundedReceiver<Op>, health_file: PathBuf) -> Inbox {
        Inbox {
            rx,
            open: true,
            queue: VecDeque::new(),
            in_flight: 0,
            flushes: Vec::new(),
            health: Health::default(),
            health_file,
            written: Vec::new(),
        }
    }

    /// Take one op from the supervisor: flushes wait for the queue, local-only ops are ignored.
    fn accept(&mut self, op: Op) {
        match op {
            Op::Flush(reply) => self.flushes.push(reply),
            Op::Reconcile { .. } => {}
            op => {
                self.queue.push_back((Instant::now(), op));
                if self.queue.len() > MAX_QUEUE {
                    // The oldest op not in flight: the batch in flight is drained by count.
                    self.queue.remove(self.in_flight);
                    self.health.dropped += 1;
                }
            }
        }
    }

    fn answer_flushes(&mut self) {
        for f in self.flushes.drain(..) {
            let _ = f.send(());
        }
    }

    /// Wait for `call` (one call to the server) while taking ops and, every second, writing the
    /// health file with the queue as it stands and how long the server has kept us waiting.
    async fn meanwhile<T>(
        &mut self,
        answers: Option<&Answers>,
        call: impl Future<Output = T>,
    ) -> T {
        tokio::pin!(call);
        let second = Duration::from_secs(1);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + second, second);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let out = loop {
            tokio::select! {
                out = &mut call => break out,
                op = self.rx.recv(), if self.open => match op {
                    Some(op) => self.accept(op),
                    None => self.open = false,
                },
                _ = tick.tick() => {
                    let (waiting, bound) = answers.and_then(Answers::waiting).unwrap_or_default();
                    self.health.waiting_ms = waiting.as_millis() as u64;
                    self.health.bound_ms = bound.as_millis() as u64;
                    self.health.stalled = self.health.connected && waiting >= STALL_AFTER;
                    self.write_health();
                }
            }
        };
        self.health.waiting_ms = 0;
        self.health.bound_ms = 0;
        self.health.stalled = false;
        out
    }

    /// The health file, with the queue's size and the age of its oldest op; written only when it
    /// says something new.
    fn write_health(&mut self) {
        let h = &mut self.health;
        h.queued = self.queue.len();
        h.lag_ms = self
            .queue
            .front()
            .map(|(t, _)| t.elapsed().as_millis() as u64)
            .unwrap_or(0);
        if let Ok(json) = serde_json::to_vec_pretty(h)
            && json != self.written
            && crate::fsutil::atomic_write(&self.health_file, &json).is_ok()
        {
            self.written = json;
        }
    }

    /// The connection failed (`e`, while `doing` when that says more than the error): say so (on
    /// the console once per outage; the retries are for -v) and remember it for `status`.
    fn lost(&mut self, e: &anyhow::Error, doing: Option<&str>) {
        let msg = match doing {
            // A `NoAnswer` says itself what it was doing.
            Some(d) if !is_no_answer(e) => format!("{d}: {e:#}"),
            _ => format!("{e:#}"),
        };
        if self.health.connected || self.health.last_error.is_none() {
            let then = if is_no_answer(e) {
                format!(
                    "giving up on this connection and reconnecting ({} writes queued; tasks keep running and nothing is lost)",
                    self.queue.len()
                )
            } else {
                "tasks keep running, retrying with backoff".into()
            };
            crate::console::warn(&format!("postgres mirror: {msg}; {then}"));
        } else {
            crate::console::debug(&format!("postgres mirror: {msg}"));
        }
        self.health.connected = false;
        self.health.last_error = Some(format!("{e:#}"));
    }
}

async fn run_writer(
    url: String,
    schema: String,
    host: String,
    spool: Spool,
    max_task_bytes: u64,
    health_file: PathBuf,
    rx: tokio::sync::mpsc::UnboundedReceiver<Op>,
) {
    let channel = channel(&schema);
    let mut inbox = Inbox::new(rx, health_file);
    let mut backoff = Duration::from_millis(200);
    let mut session: Option<Session> = None;
    let mut next_reconcile = Instant::now();
    let mut needs_reconcile = true;
    // The server's last answer, and whether the connection was lost since: for the line that says
    // it is back.
    let mut last_answer = Instant::now();
    let mut lost = false;
    loop {
        // Take what has arrived; wait briefly when idle so a burst lands in one transaction.
        // Idle: wait up to 200 ms for the first op; once one is here, only 3 ms more for company.
        let mut deadline =
            Instant::now() + Duration::from_millis(if inbox.queue.is_empty() { 200 } else { 3 });
        // The deadline is checked before each receive: `timeout` polls the receive first, so a
        // steady stream of ops would otherwise keep us here forever.
        while inbox.open && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, inbox.rx.recv()).await {
                Ok(Some(op)) => {
                    inbox.accept(op);
                    deadline = deadline.min(Instant::now() + Duration::from_millis(3));
                }
                Err(_) => break,
                Ok(None) => inbox.open = false,
            }
        }
        if session.as_ref().is_none_or(Session::is_closed) {
            session = None;
            // Each step of connecting is bounded, and ops keep coming in meanwhile.
            let connected = inbox
                .meanwhile(None, connect_and_migrate(&url, &schema))
                .await;
            match connected {
                Ok(s) => {
                    session = Some(s);
                    backoff = Duration::from_millis(200);
                    if std::mem::take(&mut lost) {
                        crate::console::info(&format!(
                            "postgres mirror: connected again, {} s after the server's last answer; writing {} queued transitions",
                            last_answer.elapsed().as_secs(),
                            inbox.queue.len()
                        ));
                    }
                    last_answer = Instant::now();
                    inbox.health.connected = true;
                    inbox.health.last_error = None;
                    inbox.health.last_ok_at = Some(crate::fsutil::now_rfc3339());
                    // After the queue is replayed (so every transition it holds gets its event), the
                    // tree fills in whatever the queue lost while the server was away.
                    needs_reconcile = true;
                }
                Err(e) => {
                    inbox.lost(&e, None);
                    lost = true;
                    inbox.answer_flushes();
                    if !inbox.open {
                        inbox.write_health();
                        return;
                    }
                    // Wait out the backoff in one-second steps, taking ops and keeping the health
                    // file (and so the lag `status` shows) current.
                    let until = Instant::now() + backoff;
                    while inbox.open && Instant::now() < until {
                        inbox.write_health();
                        let step = until
                            .saturating_duration_since(Instant::now())
                            .min(Duration::from_secs(1));
                        if let Ok(op) = tokio::time::timeout(step, inbox.rx.recv()).await {
                            match op {
                                Some(op) => inbox.accept(op),
                                None => inbox.open = false,
                            }
                        }
                        inbox.answer_flushes();
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            }
        }
        let s = session.as_mut().expect("connected above");
        let answers = s.answers();
        while !inbox.queue.is_empty() {
            let n = inbox.queue.len().min(500);
            let batch: Vec<Op> = inbox
                .queue
                .iter()
                .take(n)
                .map(|(_, op)| op.clone())
                .collect();
            inbox.in_flight = n;
            let written = inbox
                .meanwhile(Some(&answers), apply(s, &host, &channel, &batch))
                .await;
            inbox.in_flight = 0;
            match written {
                Ok(seq) => {
                    last_answer = Instant::now();
                    inbox.queue.drain(..n);
                    inbox.health.last_seq = inbox.health.last_seq.max(seq);
                    inbox.health.last_ok_at = Some(crate::fsutil::now_rfc3339());
                }
                Err(e) => {
                    // Keep the batch: it is replayed after reconnecting, and version guards make that safe.
                    inbox.lost(&e, Some("write failed"));
                    lost = true;
                    break;
                }
            }
        }
        if !inbox.health.connected {
            // Dropping the session aborts its connection: a silent one must not linger.
            session = None;
        }
        if let Some(s) = session.as_mut()
            && inbox.queue.is_empty()
            && (needs_reconcile || Instant::now() >= next_reconcile)
        {
            // Also the periodic safety net: whatever was lost anywhere comes back from the files.
            let answers = s.answers();
            let planned = inbox
                .meanwhile(
                    Some(&answers),
                    reconcile_plan(s, &answers, &spool, max_task_bytes),
                )
                .await;
            match planned {
                Ok((plan, report)) => {
                    last_answer = Instant::now();
                    // The tree was read first; what was sent meanwhile joins the queue, and the plan
                    // leaves those tasks to it (see `without_queued`).
                    while let Ok(op) = inbox.rx.try_recv() {
                        inbox.accept(op);
                    }
                    let queued: Vec<Op> = inbox.queue.iter().map(|(_, op)| op.clone()).collect();
                    let now = Instant::now();
                    inbox.queue.extend(
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
                    inbox.lost(&e, Some("reconcile failed"));
                    lost = true;
                    session = None;
                }
            }
            next_reconcile = Instant::now() + Duration::from_secs(300);
        }
        inbox.write_health();
        if inbox.queue.is_empty() || session.is_none() {
            inbox.answer_flushes();
        }
        if !inbox.open && inbox.queue.is_empty() {
            return;
        }
        if !inbox.open && session.is_none() {
            // Shutting down with the server away: the tree holds everything; the next start reconciles.
            return;
        }
    }
}

async fn connect_and_migrate(url: &str, schema: &str) -> Result<Session> {
    let mut s = connect(url, schema).await?;
    migrate(&mut s).await?;
    Ok(s)
}

async fn known_rows(session: &Session, answers: &Answers) -> Result<Known> {
    let rows = super::rows(
        &session.client,
        Some(answers),
        "reading rows to reconcile",
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
    session: &Session,
    answers: &Answers,
    spool: &Spool,
    max_task_bytes: u64,
) -> Result<(Vec<Op>, ReconcileReport)> {
    let known = known_rows(session, answers).await?;
    let spool = spool.clone();
    tokio::task::spawn_blocking(move || {
        reconcile::reconcile_plan(&spool, max_task_bytes, &known, false, false)
    })
    .await
    .context("reconcile planning failed")?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(i: usize) -> Op {
        Op::Note {
            id: format!("t{i}"),
            note: None,
        }
    }

    fn id(op: &Op) -> &str {
        match op {
            Op::Note { id, .. } => id,
            _ => "",
        }
    }

    #[test]
    fn a_full_queue_drops_the_oldest_op_not_being_written() {
        let (_tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut inbox = Inbox::new(rx, dir.path().join("postgres.json"));
        for i in 0..MAX_QUEUE {
            inbox.accept(note(i));
        }
        // A batch of two is being written: it is drained by count once it commits, so it stays.
        inbox.in_flight = 2;
        inbox.accept(note(MAX_QUEUE));
        assert_eq!(inbox.queue.len(), MAX_QUEUE);
        assert_eq!(inbox.health.dropped, 1);
        let ids: Vec<&str> = inbox.queue.iter().take(3).map(|(_, op)| id(op)).collect();
        assert_eq!(ids, ["t0", "t1", "t3"]);
        assert_eq!(inbox.queue.back().map(|(_, op)| id(op)), Some("t100000"));
        // The health file says what the queue holds.
        inbox.write_health();
        let h: Health = serde_json::from_slice(
            &std::fs::read(dir.path().join("postgres.json")).expect("health file"),
        )
        .expect("health");
        assert_eq!((h.queued, h.dropped), (MAX_QUEUE, 1));
    }
}
